//! umdev-mtty: the kernel's sample mediated serial card (`samples/vfio-mdev/mtty.c`),
//! rebuilt on [`umdev_pci`].
//!
//! A PCI serial card (4348:3253, class 07/00/02, revision 0x10) with one or two 16550A
//! ports (types `mtty-1` and `mtty-2`), port N in its own 8-byte I/O BAR N, one shared INTx
//! line (INTA) and a one-vector MSI capability. A stock Linux guest binds it with
//! `8250_pci` (the WCH CH352 quirk matches the ids) and sees `/dev/ttySn`.
//!
//! Each port is also reachable on the host: a UNIX socket (one peer at a time, a new
//! connection replaces the old one), a PTY in raw mode, or nothing.
//!
//! ```
//! use umdev_mtty::{HostEndpoint, Mtty, MttyConfig};
//!
//! let mtty = Mtty::new(MttyConfig::new(2, vec![HostEndpoint::Pty, HostEndpoint::None]))?;
//! assert!(mtty.host_paths()[0].starts_with("/dev/pts/"));
//! let spec = mtty.spec();
//! assert_eq!((spec.vendor_id(), spec.device_id()), (0x4348, 0x3253));
//! let function = umdev_pci::PciFunction::new(spec, Box::new(mtty));
//! assert_eq!(function.region_info(1)?.size, 8);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod device;
mod handover;
mod host;
pub mod parent;
pub mod regs;
mod state;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use umdev_pci::{BarKind, PciDeviceSpec, SpecError};
use umdev_transport::SocketPolicy;

pub use device::TX_LIMIT;
pub use parent::MttyDriver;

use device::{Card, HostKind};

/// PCI vendor id of the card (the kernel sample's).
pub const VENDOR_ID: u16 = 0x4348;
/// PCI device id of the card.
pub const DEVICE_ID: u16 = 0x3253;
/// Type id of the one-port card.
pub const TYPE_MTTY_1: &str = "mtty-1";
/// Type id of the two-port card.
pub const TYPE_MTTY_2: &str = "mtty-2";
/// Size of each port's I/O BAR.
pub const PORT_BAR_SIZE: u64 = 8;

/// What a port is connected to on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEndpoint {
    /// A UNIX stream socket listening at this path (bound by [`Mtty::new`] with the config's
    /// [`SocketPolicy`], removed on drop).
    UnixSocket(PathBuf),
    /// A new PTY; its `/dev/pts/N` appears in [`Mtty::host_paths`].
    Pty,
    /// Nothing: transmitted bytes are discarded.
    None,
}

/// How to build a card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MttyConfig {
    /// Number of ports: 1 or 2.
    pub ports: u8,
    /// One endpoint per port; an empty list means no host side for any port.
    pub host: Vec<HostEndpoint>,
    /// How port sockets are bound (mode, owner, what to do with a stale path).
    pub sockets: SocketPolicy,
}

impl MttyConfig {
    /// A card of `ports` ports with these host endpoints and default socket modes (0600).
    pub fn new(ports: u8, host: Vec<HostEndpoint>) -> MttyConfig {
        MttyConfig {
            ports,
            host,
            sockets: SocketPolicy::default(),
        }
    }
}

/// Why a card could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MttyError {
    /// The card has 1 or 2 ports.
    #[error("mtty has 1 or 2 ports, not {0}")]
    Ports(u8),
    /// `host` must be empty or name one endpoint per port.
    #[error("{endpoints} host endpoints given for {ports} ports")]
    Endpoints {
        /// Ports asked for.
        ports: u8,
        /// Endpoints given.
        endpoints: usize,
    },
    /// The socket could not be created.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PTY could not be set up.
    #[error("cannot set up a PTY")]
    Pty(#[source] rustix::io::Errno),
    /// The wake eventfd could not be created.
    #[error("cannot create an eventfd")]
    Eventfd(#[source] rustix::io::Errno),
    /// A host I/O thread could not be started.
    #[error("cannot start a host I/O thread")]
    Thread(#[source] std::io::Error),
    /// The PCI spec was refused (a bug: the layout is fixed).
    #[error("invalid PCI spec")]
    Spec(#[source] SpecError),
}

/// The card: the [`PciDevice`](umdev_pci::PciDevice) the framework serves, plus the host
/// I/O threads. Dropping it stops the threads and removes the sockets it created.
pub struct Mtty {
    card: Arc<Mutex<Card>>,
    ports: u8,
    spec: PciDeviceSpec,
    host_paths: Vec<String>,
    wakers: Vec<Option<Arc<OwnedFd>>>,
    stop: Arc<AtomicBool>,
    /// The host thread of each port that has a host side (`None` while parked).
    threads: Vec<Option<JoinHandle<host::Parked>>>,
    /// What parked threads held, by port (a live upgrade in progress).
    parked: Vec<Option<host::Parked>>,
    sockets: Vec<PathBuf>,
    /// What the `vendor/console` attribute shows (a PTY's path changes with a hand-over).
    shown_paths: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Mtty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mtty")
            .field("ports", &self.ports)
            .field("host_paths", &self.host_paths)
            .finish_non_exhaustive()
    }
}

/// The card's PCI layout for `ports` ports.
fn build_spec(ports: u8) -> Result<PciDeviceSpec, SpecError> {
    let mut b = PciDeviceSpec::builder(VENDOR_ID, DEVICE_ID)
        .class(0x07, 0x00, 0x02)
        .revision(0x10)
        .subsystem(VENDOR_ID, DEVICE_ID)
        .interrupt_pin(1)
        .msi(1, false);
    for i in 0..ports {
        b = b.bar(i, BarKind::Io, PORT_BAR_SIZE);
    }
    b.build()
}

impl Mtty {
    /// Builds the card, opens its host endpoints and starts their threads.
    pub fn new(cfg: MttyConfig) -> Result<Self, MttyError> {
        Mtty::with_listeners(cfg, Vec::new())
    }

    /// As [`new`](Self::new), with listening sockets already bound for some
    /// [`HostEndpoint::UnixSocket`] ports (`listeners[port]`, e.g. by
    /// `DeviceEnv::bind`, which a live upgrade hands to the next process); the others are
    /// bound here.
    pub fn with_listeners(
        cfg: MttyConfig,
        mut listeners: Vec<Option<UnixListener>>,
    ) -> Result<Self, MttyError> {
        if !(1..=2).contains(&cfg.ports) {
            return Err(MttyError::Ports(cfg.ports));
        }
        let host = if cfg.host.is_empty() {
            vec![HostEndpoint::None; usize::from(cfg.ports)]
        } else if cfg.host.len() == usize::from(cfg.ports) {
            cfg.host
        } else {
            return Err(MttyError::Endpoints {
                ports: cfg.ports,
                endpoints: cfg.host.len(),
            });
        };
        let spec = build_spec(cfg.ports).map_err(MttyError::Spec)?;

        // Open every endpoint first, so that a failure leaves no thread behind.
        let mut endpoints = Vec::new();
        let mut kinds = Vec::new();
        let mut host_paths = Vec::new();
        let mut sockets = Vec::new();
        let cleanup =
            |sockets: &[PathBuf]| sockets.iter().for_each(|p| drop(std::fs::remove_file(p)));
        listeners.resize_with(host.len(), || None);
        for (ep, bound) in host.into_iter().zip(listeners) {
            match ep {
                HostEndpoint::UnixSocket(path) => {
                    let listener = bound
                        .map_or_else(|| umdev_transport::listen::bind(&path, &cfg.sockets), Ok)
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .map_err(|source| {
                            cleanup(&sockets);
                            MttyError::Listen {
                                path: path.clone(),
                                source,
                            }
                        })?;
                    host_paths.push(path.display().to_string());
                    sockets.push(path);
                    kinds.push(HostKind::Socket);
                    endpoints.push(Some(host::Endpoint::Listener(listener)));
                }
                HostEndpoint::Pty => {
                    let (master, slave, path) = host::open_pty().map_err(|e| {
                        cleanup(&sockets);
                        MttyError::Pty(e)
                    })?;
                    host_paths.push(path);
                    kinds.push(HostKind::Pty);
                    endpoints.push(Some(host::Endpoint::Pty { master, slave }));
                }
                HostEndpoint::None => {
                    host_paths.push(String::new());
                    kinds.push(HostKind::None);
                    endpoints.push(None);
                }
            }
        }

        let mut mtty = Self {
            card: Arc::new(Mutex::new(Card::new(&kinds))),
            ports: cfg.ports,
            spec,
            shown_paths: Arc::new(Mutex::new(host_paths.clone())),
            host_paths,
            wakers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            parked: Vec::new(),
            sockets,
        };
        // From here on, Drop cleans up whatever was started.
        for (port, ep) in endpoints.into_iter().enumerate() {
            mtty.parked.push(None);
            let Some(ep) = ep else {
                mtty.wakers.push(None);
                mtty.threads.push(None);
                continue;
            };
            let wake = Arc::new(host::wake_fd().map_err(MttyError::Eventfd)?);
            mtty.wakers.push(Some(Arc::clone(&wake)));
            let thread = host::spawn(
                Arc::clone(&mtty.card),
                port,
                ep,
                wake,
                Arc::clone(&mtty.stop),
            )
            .map_err(MttyError::Thread)?;
            mtty.threads.push(Some(thread));
        }
        Ok(mtty)
    }

    /// The card's PCI layout (the same every call).
    pub fn spec(&self) -> PciDeviceSpec {
        self.spec.clone()
    }

    /// Per port: the socket path, the PTY's `/dev/pts/N`, or an empty string for none.
    pub fn host_paths(&self) -> Vec<String> {
        self.host_paths.clone()
    }

    /// [`host_paths`](Self::host_paths) as it stays true: a live upgrade hands over a PTY
    /// whose path is the previous process's.
    pub fn shown_host_paths(&self) -> Arc<Mutex<Vec<String>>> {
        Arc::clone(&self.shown_paths)
    }

    /// Number of ports.
    pub fn ports(&self) -> u8 {
        self.ports
    }

    fn wake(&self, port: usize) {
        if let Some(Some(fd)) = self.wakers.get(port) {
            host::wake(fd);
        }
    }
}

impl Drop for Mtty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for port in 0..self.wakers.len() {
            self.wake(port);
        }
        for thread in self.threads.drain(..).flatten() {
            if thread.join().is_err() {
                tracing::warn!("mtty host thread panicked");
            }
        }
        for path in &self.sockets {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove mtty socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_count_must_be_1_or_2() {
        for ports in [0, 3] {
            let e = Mtty::new(MttyConfig::new(ports, vec![])).unwrap_err();
            assert!(matches!(e, MttyError::Ports(p) if p == ports));
        }
    }

    #[test]
    fn endpoint_count_must_match() {
        let e = Mtty::new(MttyConfig::new(2, vec![HostEndpoint::None])).unwrap_err();
        assert!(matches!(
            e,
            MttyError::Endpoints {
                ports: 2,
                endpoints: 1
            }
        ));
    }

    #[test]
    fn spec_matches_the_kernel_sample() {
        let m = Mtty::new(MttyConfig::new(2, vec![])).unwrap();
        let s = m.spec();
        assert_eq!(s.class(), (0x07, 0x00, 0x02));
        assert_eq!(s.revision(), 0x10);
        assert_eq!(s.subsystem(), (0x4348, 0x3253));
        assert_eq!(s.interrupt_pin(), 1);
        assert_eq!(s.msi().map(|m| m.vectors), Some(1));
        for i in 0..2 {
            let bar = s.bar(i).unwrap();
            assert_eq!((bar.kind, bar.size), (BarKind::Io, 8));
        }
        assert!(s.bar(2).is_none());
    }

    #[test]
    fn one_port_card_has_one_bar() {
        let m = Mtty::new(MttyConfig::new(1, vec![HostEndpoint::None])).unwrap();
        assert!(m.spec().bar(0).is_some());
        assert!(m.spec().bar(1).is_none());
    }

    #[test]
    fn existing_socket_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("taken");
        std::fs::write(&path, b"").unwrap();
        let e = Mtty::new(MttyConfig::new(1, vec![HostEndpoint::UnixSocket(path)])).unwrap_err();
        assert!(matches!(e, MttyError::Listen { .. }));
    }

    #[test]
    fn drop_removes_created_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("port0");
        let m = Mtty::new(MttyConfig::new(
            1,
            vec![HostEndpoint::UnixSocket(path.clone())],
        ))
        .unwrap();
        assert!(path.exists());
        assert_eq!(m.host_paths(), vec![path.display().to_string()]);
        drop(m);
        assert!(!path.exists());
    }
}
