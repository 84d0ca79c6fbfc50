//! mtty as an mdev parent driver: types `mtty-1` and `mtty-2` drawn from a pool of ports
//! (24 per parent, as in the kernel sample), so `available_instances` of each type is the
//! number of free ports divided by the type's ports. Each port's host side is a socket in
//! the device's directory (`port0.sock`, `port1.sock`), a PTY, or nothing.
//!
//! The driver entry, [`MttyDriver`], is what a daemon registers; its options are `ports`
//! (the pool), `console` and `peer_to_peer`.

use std::sync::Arc;

use rustix::io::Errno;
use umdev_core::{
    AttrSpec, DeviceDescription, DeviceEnv, DriverError, MdevParts, MdevUuid, OptionSpec, Options,
    Parent, ParentContext, ParentDriver, SandboxPath, TypeSpec, VendorAttrs,
};

use crate::{HostEndpoint, Mtty, MttyConfig, MttyError};

/// Ports per parent in the kernel sample (`MAX_MTTYS`).
pub const POOL_PORTS: u32 = 24;

/// Where each port's host side goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    /// Nowhere: what the guest transmits is discarded.
    None,
    /// A UNIX socket per port in the device's directory, `port<N>.sock`.
    Sockets,
    /// A PTY per port.
    Pty,
}

impl Console {
    fn name(self) -> &'static str {
        match self {
            Console::None => "none",
            Console::Sockets => "socket",
            Console::Pty => "pty",
        }
    }
}

/// The file name of port `n`'s host-side socket in the device's directory.
pub fn port_socket(n: u8) -> String {
    format!("port{n}.sock")
}

/// The mtty parent driver: what `umdevd` registers (`driver = "mtty"`).
#[derive(Clone, Copy, Debug, Default)]
pub struct MttyDriver;

impl ParentDriver for MttyDriver {
    fn name(&self) -> &str {
        "mtty"
    }

    fn description(&self) -> &str {
        "the kernel's sample serial card: a PCI 16550A UART with one or two ports"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![
            OptionSpec::integer(
                "ports",
                1,
                4096,
                i64::from(POOL_PORTS),
                "ports in the parent's pool (mtty-1 takes one, mtty-2 two)",
            ),
            OptionSpec::choice(
                "console",
                &["socket", "pty", "none"],
                "socket",
                "each port's host side: a socket port<N>.sock in the device's directory, a PTY, or nothing",
            ),
            OptionSpec::bool(
                "peer_to_peer",
                false,
                "devices share peer-to-peer resources (a peer_to_peer_resource_uuid attribute groups them)",
            ),
        ]
    }

    fn build(&self, _: &ParentContext, o: &Options) -> Result<Arc<dyn Parent>, DriverError> {
        let ports = o
            .integer("ports")
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(POOL_PORTS);
        let console = match o.text("console") {
            Some("pty") => Console::Pty,
            Some("none") => Console::None,
            _ => Console::Sockets,
        };
        let parent = MttyParent::new(ports, console)
            .with_peer_to_peer(o.bool("peer_to_peer").unwrap_or(false));
        Ok(Arc::new(parent))
    }
}

/// One mtty parent device.
#[derive(Debug)]
pub struct MttyParent {
    ports: u32,
    console: Console,
    peer_to_peer: bool,
}

impl MttyParent {
    /// A parent with `ports` ports in its pool and the given console.
    pub fn new(ports: u32, console: Console) -> MttyParent {
        MttyParent {
            ports,
            console,
            peer_to_peer: false,
        }
    }

    /// Declares its types as sharing peer-to-peer resources: each device gets a
    /// `peer_to_peer_resource_uuid` attribute (a demonstration of opt-in grouping; the
    /// kernel sample has none).
    pub fn with_peer_to_peer(mut self, on: bool) -> MttyParent {
        self.peer_to_peer = on;
        self
    }
}

/// Ports of a type, or `None` for a name that is not one of ours.
fn type_ports(name: &str) -> Option<u8> {
    match name {
        "1" => Some(1),
        "2" => Some(2),
        _ => None,
    }
}

/// The mtty vendor attributes, in a `vendor/` group as the kernel sample has them.
struct MttyAttrs {
    uuid: MdevUuid,
    host: Arc<std::sync::Mutex<Vec<String>>>,
}

const ATTR_SAMPLE: &str = "vendor/sample_mdev_dev";
const ATTR_CONSOLE: &str = "vendor/console";
/// Parent attributes: the pool's size and where consoles go.
const ATTR_POOL: &str = "vendor/pool_ports";
const ATTR_PARENT_CONSOLE: &str = "vendor/console";

impl VendorAttrs for MttyAttrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            ATTR_SAMPLE => Ok(format!("This is MDEV {}\n", self.uuid)),
            ATTR_CONSOLE => Ok(self
                .host
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|h| format!("{h}\n"))
                .collect()),
            _ => Err(Errno::NOENT),
        }
    }
}

impl Parent for MttyParent {
    fn driver(&self) -> &str {
        "mtty"
    }

    fn types(&self) -> Vec<TypeSpec> {
        let attrs = vec![
            AttrSpec::read_only(ATTR_SAMPLE),
            AttrSpec::read_only(ATTR_CONSOLE),
        ];
        [
            (
                "1",
                "Single port serial",
                "A PCI 16550A serial card with one port",
            ),
            (
                "2",
                "Dual port serial",
                "A PCI 16550A serial card with two ports",
            ),
        ]
        .iter()
        .map(|(n, pretty, description)| TypeSpec {
            pretty_name: Some((*pretty).to_owned()),
            description: Some((*description).to_owned()),
            peer_to_peer: self.peer_to_peer,
            attrs: attrs.clone(),
            ..TypeSpec::new(n)
        })
        .collect()
    }

    fn available(&self, name: &str, in_use: &[&str]) -> u32 {
        let used = in_use.iter().fold(0u32, |a, t| {
            a.saturating_add(type_ports(t).map_or(u32::MAX, u32::from))
        });
        let need = type_ports(name).map_or(u32::MAX, u32::from);
        self.ports.saturating_sub(used) / need
    }

    fn create(&self, _: &MdevUuid, name: &str) -> Result<DeviceDescription, Errno> {
        // The pool is counted from the types in use: a card is its type, nothing more.
        type_ports(name).ok_or(Errno::INVAL)?;
        Ok(DeviceDescription::new(name))
    }

    fn build(
        &self,
        uuid: &MdevUuid,
        description: &DeviceDescription,
        env: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        let ports = type_ports(&description.type_name).ok_or(Errno::INVAL)?;
        // Port sockets are bound through the device's environment, which hands them to the
        // device's next process in a live upgrade.
        let mut host = Vec::new();
        let mut listeners = Vec::new();
        for i in 0..ports {
            match self.console {
                Console::None => host.push(HostEndpoint::None),
                Console::Pty => host.push(HostEndpoint::Pty),
                Console::Sockets => {
                    let (listener, path) = env.bind(&port_socket(i)).map_err(|e| {
                        tracing::warn!(%uuid, error = %e, "cannot bind an mtty port's socket");
                        match e.kind() {
                            std::io::ErrorKind::NotADirectory => Errno::NOTDIR,
                            _ => e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error),
                        }
                    })?;
                    host.push(HostEndpoint::UnixSocket(path));
                    listeners.push(Some(listener));
                }
            }
        }
        let config = MttyConfig {
            sockets: *env.policy(),
            ..MttyConfig::new(ports, host)
        };
        let mtty = Mtty::with_listeners(config, listeners).map_err(|e| {
            tracing::warn!(%uuid, error = %e, "cannot build an mtty card");
            match e {
                MttyError::Listen { source, .. } | MttyError::Thread(source) => source
                    .raw_os_error()
                    .map(Errno::from_raw_os_error)
                    .unwrap_or(Errno::IO),
                MttyError::Pty(e) | MttyError::Eventfd(e) => e,
                _ => Errno::INVAL,
            }
        })?;
        let attrs = MttyAttrs {
            uuid: *uuid,
            host: mtty.shown_host_paths(),
        };
        Ok(MdevParts {
            spec: mtty.spec(),
            device: Box::new(mtty),
            attrs: Some(Box::new(attrs)),
        })
    }

    fn sandbox_paths(&self, _: &DeviceDescription) -> Vec<SandboxPath> {
        // A PTY console opens the multiplexer; socket consoles live in the device's own
        // directory.
        match self.console {
            Console::Pty => vec![
                SandboxPath::read_write("/dev/ptmx"),
                SandboxPath::read_write("/dev/pts"),
            ],
            Console::None | Console::Sockets => Vec::new(),
        }
    }

    fn attrs(&self) -> Vec<AttrSpec> {
        vec![
            AttrSpec::read_only(ATTR_POOL),
            AttrSpec::read_only(ATTR_PARENT_CONSOLE),
        ]
    }

    fn show_attr(&self, name: &str) -> Result<String, Errno> {
        match name {
            ATTR_POOL => Ok(format!("{}\n", self.ports)),
            ATTR_PARENT_CONSOLE => Ok(format!("{}\n", self.console.name())),
            _ => Err(Errno::NOENT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use umdev_transport::SocketPolicy;

    #[test]
    fn the_pool_is_shared_between_types() {
        let p = MttyParent::new(POOL_PORTS, Console::None);
        assert_eq!(p.available("1", &[]), 24);
        assert_eq!(p.available("2", &[]), 12);
        assert_eq!(p.available("1", &["2", "1"]), 21);
        assert_eq!(p.available("2", &["2", "1"]), 10);
        let full = ["2"; 12];
        assert_eq!(p.available("1", &full), 0);
        assert_eq!(p.available("2", &["1"; 23]), 0);
    }

    #[test]
    fn types_are_mtty_1_and_mtty_2() {
        let t = MttyParent::new(POOL_PORTS, Console::None).types();
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["1", "2"]);
        assert!(t.iter().all(|t| t.device_api == "vfio-pci"));
    }

    #[test]
    fn built_cards_have_their_ports_and_console_sockets_in_the_device_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = MttyParent::new(POOL_PORTS, Console::Sockets);
        let uuid = MdevUuid::random();
        let env = DeviceEnv::new(uuid, Some(dir.path().to_owned()), SocketPolicy::default());
        let d = p.create(&uuid, "2").unwrap();
        let parts = p.build(&uuid, &d, &env).unwrap();
        assert!(parts.spec.bar(1).is_some());
        let attrs = parts.attrs.as_ref().unwrap();
        let console = attrs.show(ATTR_CONSOLE).unwrap();
        assert_eq!(console.lines().count(), 2);
        assert!(dir.path().join("port1.sock").exists());
        assert_eq!(
            attrs.show(ATTR_SAMPLE).unwrap(),
            format!("This is MDEV {uuid}\n")
        );
        drop(parts);
        assert!(!dir.path().join("port1.sock").exists());
    }

    #[test]
    fn socket_consoles_need_a_device_directory() {
        let p = MttyParent::new(POOL_PORTS, Console::Sockets);
        let uuid = MdevUuid::random();
        let d = p.create(&uuid, "1").unwrap();
        let e = p.build(&uuid, &d, &DeviceEnv::detached(uuid)).unwrap_err();
        assert_eq!(e, Errno::NOTDIR);
    }

    #[test]
    fn the_driver_takes_its_options_and_refuses_others() {
        let mut drivers = umdev_core::Drivers::default();
        drivers.add(MttyDriver);
        let ctx = ParentContext {
            name: "m0".into(),
            state_dir: None,
        };
        let opts = serde_json::json!({"ports": 4, "console": "none"});
        let p = drivers
            .build("mtty", &ctx, opts.as_object().unwrap())
            .unwrap();
        assert_eq!(p.available("2", &[]), 2);
        assert_eq!(p.show_attr(ATTR_POOL).unwrap(), "4\n");
        let bad = serde_json::json!({"port": 4});
        let e = drivers
            .build("mtty", &ctx, bad.as_object().unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("no option port"), "{e}");
    }
}
