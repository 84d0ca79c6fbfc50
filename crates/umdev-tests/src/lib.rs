//! Shared pieces of umdev's integration tests: a test device that exercises every path of
//! the framework, a server on a real UNIX socket in a temporary directory, and raw-wire
//! helpers for conformance tests.
//!
//! The tests themselves live in `tests/`: one file per vfio-user command for conformance
//! (raw wire, every negative case with its errno), interop with the rust-vmm client, and
//! the real Linux guest driving mtty.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation, missing_docs)]

pub mod cmd;
pub mod device;
pub mod drivers;
pub mod guest;
pub mod kubelet;
pub mod prereq;
pub mod wire;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use umdev_client::Client;
use umdev_pci::PciFunction;
use umdev_server::{Server, ServerConfig, Stopper};

pub use device::{Observed, TestDevice};

/// A server on a real socket in its own temporary directory; stops and cleans up on drop.
pub struct TestServer {
    /// The socket path.
    pub path: PathBuf,
    /// What the test device recorded (when the server serves a [`TestDevice`]).
    pub observed: Option<Arc<Observed>>,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Serves a fresh [`TestDevice`] with the default configuration.
    pub fn test_device() -> TestServer {
        TestServer::test_device_with(ServerConfig::default())
    }

    /// Serves a fresh [`TestDevice`] with `config`.
    pub fn test_device_with(config: ServerConfig) -> TestServer {
        let (f, observed) = TestDevice::function();
        let mut s = TestServer::start(f, config);
        s.observed = Some(observed);
        s
    }

    /// Serves a fresh migratable [`TestDevice`] with the default configuration.
    pub fn migratable_test_device() -> TestServer {
        let (f, observed) = TestDevice::migratable_function();
        let mut s = TestServer::start(f, ServerConfig::default());
        s.observed = Some(observed);
        s
    }

    /// Serves `function`.
    pub fn start(function: PciFunction, config: ServerConfig) -> TestServer {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = Server::new(function, config).unwrap();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.serve(listener).unwrap());
        TestServer {
            path,
            observed: None,
            stopper,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// A negotiated client with default options.
    pub fn client(&self) -> Client {
        Client::connect(&self.path).unwrap()
    }

    /// A raw connection that has not negotiated.
    pub fn raw(&self) -> wire::Raw {
        wire::Raw::connect(&self.path)
    }

    /// The test device's observations.
    pub fn observed(&self) -> &Observed {
        self.observed.as_ref().expect("serving a TestDevice")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A server for a fresh [`TestDevice`] and a raw connection that negotiated 0.0 with it.
pub fn negotiated_test_device() -> (TestServer, wire::Raw) {
    let s = TestServer::test_device();
    let r = wire::Raw::negotiated(&s.path);
    (s, r)
}

/// Polls the test device's DMA status with `read` until its command is done (the status is
/// no longer [`device::DMA_BUSY`]), as a guest driver would; at most 10 s.
pub fn poll_dma_status(mut read: impl FnMut() -> u32) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let s = read();
        if s != device::DMA_BUSY {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the test device's DMA command did not finish in 10 s"
        );
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// A memfd of `size` bytes, as a VMM's shared guest RAM.
pub fn guest_memfd(size: u64) -> std::os::fd::OwnedFd {
    let fd = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// Logs to the test output when `UMDEV_LOG` is set.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("UMDEV_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A non-blocking eventfd for tests: what a VMM hands the server for interrupts.
pub struct Efd(std::os::fd::OwnedFd);

impl Efd {
    /// A fresh, non-blocking eventfd.
    pub fn new() -> Efd {
        use rustix::event::{eventfd, EventfdFlags};
        Efd(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).unwrap())
    }

    /// The fd, to send.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.0.as_fd()
    }

    /// The counter if it was signalled (and resets it), `None` if not.
    pub fn read(&self) -> Option<u64> {
        let mut b = [0u8; 8];
        match rustix::io::read(&self.0, &mut b) {
            Ok(8) => Some(u64::from_ne_bytes(b)),
            _ => None,
        }
    }
}

impl Default for Efd {
    fn default() -> Self {
        Efd::new()
    }
}

/// What an mtty card's port 0 received, read as its guest driver would (LSR's data-ready,
/// then RBR) through client `c`, until `want` bytes or `timeout`.
pub fn mtty_port0_reads(
    c: &mut umdev_client::Client,
    want: usize,
    timeout: std::time::Duration,
) -> Vec<u8> {
    use umdev_mtty::regs::{LSR, LSR_DR, RBR_THR};
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + timeout;
    while got.len() < want && std::time::Instant::now() < deadline {
        let mut lsr = [0u8];
        c.region_read(0, LSR, &mut lsr).unwrap();
        if lsr[0] & LSR_DR != 0 {
            let mut b = [0u8];
            c.region_read(0, RBR_THR, &mut b).unwrap();
            got.push(b[0]);
        } else {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    got
}

/// A negotiated client of the vfio-user socket `socket`, and the pid of the process serving
/// it (the listener's, by `SO_PEERCRED`): the daemon's, or a worker's.
pub fn connect_served(socket: &std::path::Path) -> Result<(umdev_client::Client, u32), String> {
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    let cred = rustix::net::sockopt::socket_peercred(&stream).map_err(|e| e.to_string())?;
    let pid = u32::try_from(cred.pid.as_raw_nonzero().get()).map_err(|e| e.to_string())?;
    let t = umdev_transport::UnixTransport::new(stream);
    let mut c = umdev_client::Client::unnegotiated(Arc::new(t));
    c.negotiate(&umdev_client::ClientOptions::default())
        .map_err(|e| e.to_string())?;
    Ok((c, pid))
}
