//! mtty as an mdev parent: types `mtty-1` and `mtty-2` drawn from a pool of ports (24 per
//! parent, as in the kernel sample), so `available_instances` of each type is the number
//! of free ports divided by the type's ports.

use std::path::PathBuf;

use rustix::io::Errno;
use umdev_core::{AttrSpec, MdevParts, MdevUuid, Parent, TypeSpec, VendorAttrs};

use crate::{HostEndpoint, Mtty, MttyConfig, MttyError};

/// Ports per parent in the kernel sample (`MAX_MTTYS`).
pub const POOL_PORTS: u32 = 24;

/// Where each port's host side goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Console {
    /// Nowhere: what the guest transmits is discarded.
    None,
    /// A UNIX socket per port, `<dir>/<uuid>.port<N>.sock`.
    Sockets(PathBuf),
    /// A PTY per port.
    Pty,
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

fn type_ports(name: &str) -> u32 {
    match name {
        "1" => 1,
        "2" => 2,
        // Unknown names never reach here (the core checks), but a huge cost is safe.
        _ => u32::MAX,
    }
}

/// The mtty vendor attributes, in a `vendor/` group as the kernel sample has them.
struct MttyAttrs {
    uuid: MdevUuid,
    host: Vec<String>,
}

const ATTR_SAMPLE: &str = "vendor/sample_mdev_dev";
const ATTR_CONSOLE: &str = "vendor/console";

impl VendorAttrs for MttyAttrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            ATTR_SAMPLE => Ok(format!("This is MDEV {}\n", self.uuid)),
            ATTR_CONSOLE => Ok(self.host.iter().map(|h| format!("{h}\n")).collect()),
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
            AttrSpec {
                name: ATTR_SAMPLE.to_owned(),
                writable: false,
            },
            AttrSpec {
                name: ATTR_CONSOLE.to_owned(),
                writable: false,
            },
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
        let used = in_use
            .iter()
            .fold(0u32, |a, t| a.saturating_add(type_ports(t)));
        self.ports.saturating_sub(used) / type_ports(name)
    }

    fn create(&self, uuid: &MdevUuid, name: &str) -> Result<MdevParts, Errno> {
        let ports = u8::try_from(type_ports(name)).map_err(|_| Errno::INVAL)?;
        let host = (0..ports)
            .map(|i| match &self.console {
                Console::None => HostEndpoint::None,
                Console::Pty => HostEndpoint::Pty,
                Console::Sockets(dir) => {
                    HostEndpoint::UnixSocket(dir.join(format!("{uuid}.port{i}.sock")))
                }
            })
            .collect();
        let mtty = Mtty::new(MttyConfig { ports, host }).map_err(|e| {
            tracing::warn!(%uuid, error = %e, "cannot create an mtty card");
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
            host: mtty.host_paths(),
        };
        Ok(MdevParts {
            spec: mtty.spec(),
            device: Box::new(mtty),
            attrs: Some(Box::new(attrs)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn created_cards_have_their_ports_and_console_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let p = MttyParent::new(POOL_PORTS, Console::Sockets(dir.path().to_owned()));
        let uuid = MdevUuid::random();
        let parts = p.create(&uuid, "2").unwrap();
        assert!(parts.spec.bar(1).is_some());
        let attrs = parts.attrs.as_ref().unwrap();
        let console = attrs.show(ATTR_CONSOLE).unwrap();
        assert_eq!(console.lines().count(), 2);
        assert!(dir.path().join(format!("{uuid}.port1.sock")).exists());
        assert_eq!(
            attrs.show(ATTR_SAMPLE).unwrap(),
            format!("This is MDEV {uuid}\n")
        );
        drop(parts);
        assert!(!dir.path().join(format!("{uuid}.port1.sock")).exists());
    }
}
