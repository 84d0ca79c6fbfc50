//! The vfio-user server: serves one PCI function to one client at a time.
//!
//! The server takes a listening socket (or an already connected transport) and a
//! [`PciFunction`], and reaches into nothing else, so the same code runs in the daemon's
//! threads or in a worker process of its own.
//!
//! Lifecycle of a session: the client connects and sends VERSION; the server answers with its
//! capabilities and opens the device (the parent driver may refuse); commands are then
//! handled in the order they arrive, with a reply unless the client set No_reply; when the
//! client goes, every DMA mapping is dropped, every interrupt eventfd closed and the device
//! closed, while the device's state is kept for the next client.
//!
//! ```no_run
//! use std::os::unix::net::UnixListener;
//! use umdev_server::{Server, ServerConfig};
//! # fn function() -> umdev_pci::PciFunction { unimplemented!() }
//!
//! let server = Server::new(function(), ServerConfig::default()).unwrap();
//! let stopper = server.stopper();
//! std::thread::spawn(move || {
//!     // ... later, from a signal handler thread:
//!     stopper.stop();
//! });
//! server.serve(UnixListener::bind("/tmp/dev.sock").unwrap()).unwrap();
//! ```
#![warn(missing_docs)]

mod error;
pub mod handover;
mod memory;
pub mod refusals;
mod remote;
mod session;
pub mod stats;

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use umdev_pci::{ClientId, PciFunction, PeerCred};
use umdev_transport::{Transport, UnixTransport};

pub use error::{RequestError, ServerError};
pub use handover::{HandOverCtl, Package, TakenOver};
pub use memory::{LockedMemory, SharedBudgets};

/// Limits and tunables of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest data transfer a client may ask for in one message (announced in VERSION).
    pub max_data_xfer_size: u32,
    /// Most fds a client may send in one message (announced in VERSION).
    pub max_msg_fds: u32,
    /// Most DMA mappings a client may hold at once (announced; the client may lower it).
    pub max_dma_maps: u32,
    /// Poll the socket this long before sleeping when waiting for a request.
    pub spin: Duration,
    /// How long a device thread waits for the client to answer a DMA_READ/DMA_WRITE.
    pub dma_timeout: Duration,
    /// How long DMA_UNMAP waits for a parent driver to release its pins in the range after
    /// its `dma_unmap` hook ran; past it the device's pins are revoked.
    pub unpin_timeout: Duration,
    /// Locked-memory budgets for pins, and the clients' shared memory.
    pub locked_memory: LockedMemory,
    /// How long a client that connected has to complete VERSION; until it has, a new
    /// connection takes its place.
    pub version_timeout: Duration,
    /// Refuse DMA_MAP of a file not sealed against shrinking (`F_SEAL_SHRINK`): its client
    /// could take the memory away under the device. Off by default: such memory is
    /// accepted, and an access to memory that went fails with EFAULT (SIGBUS caught).
    pub refuse_unsealed: bool,
    /// How long a reply (or a DMA request) may wait for room in the client's socket: a
    /// client that stops reading is disconnected after it, instead of holding its device
    /// (and the server's memory) forever.
    pub send_timeout: Duration,
    /// Only peers (SO_PEERCRED) with one of these uids may connect (empty: any peer that
    /// can open the socket).
    pub allow_uids: Vec<u32>,
    /// Only peers with one of these gids may connect (empty: any).
    pub allow_gids: Vec<u32>,
    /// Most requests a client's session handles per second (0: no limit). A client over
    /// it waits (its socket holds the rest), so that one flooding client leaves CPU time
    /// to the others.
    pub max_requests_per_sec: u32,
    /// Connections that may wait to be accepted on a device's socket (a device has one
    /// client at a time; a second is refused once accepted). Past it a connect waits or
    /// fails with EAGAIN. Waiting connections matter during a live upgrade, when nothing
    /// accepts for a few milliseconds.
    pub listen_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: umdev_proto::DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 16,
            max_dma_maps: umdev_proto::DEFAULT_MAX_DMA_MAPS,
            spin: Duration::ZERO,
            dma_timeout: Duration::from_secs(5),
            unpin_timeout: Duration::from_secs(1),
            locked_memory: LockedMemory::default(),
            version_timeout: Duration::from_secs(2),
            refuse_unsealed: false,
            send_timeout: Duration::from_secs(10),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            max_requests_per_sec: 0,
            listen_backlog: 32,
        }
    }
}

/// Connection numbers for [`ClientId`], unique within the process (across servers, so that
/// the mdev core can compare clients of different devices); 0 means unknown.
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A new client identity with the next connection number and `peer`'s credentials.
fn client_id(peer: Option<PeerCred>) -> ClientId {
    ClientId {
        connection: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
        peer,
    }
}

/// The `SO_PEERCRED` credentials of a connected UNIX socket, if the kernel gives them.
fn peer_cred(stream: &std::os::unix::net::UnixStream) -> Option<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(stream).ok()?;
    Some(PeerCred {
        pid: u32::try_from(c.pid.as_raw_nonzero().get()).ok()?,
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

/// How long a new client waits for the previous client's session to end before it is
/// refused as a second client.
const HANDOVER_WAIT: Duration = Duration::from_millis(500);

pub(crate) struct StopSignal {
    stopped: AtomicBool,
    wake: std::os::fd::OwnedFd,
    current: Mutex<Option<Arc<dyn Transport>>>,
    /// A live upgrade's state.
    handover: Arc<handover::HandOverState>,
    /// Set once the device was handed over: nothing here touches it again.
    handed: AtomicBool,
    /// Whether the current session's client has completed VERSION.
    negotiated: Arc<AtomicBool>,
}

impl StopSignal {
    /// Disconnects the current client, if any (its session tears down as usual).
    fn cut_current(&self) {
        if let Some(t) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            t.shutdown();
        }
    }

    /// Wakes the accept loop.
    pub(crate) fn wake(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// Stops a running [`Server::serve`] from another thread: the listener stops accepting and
/// the current client, if any, is disconnected (with the usual cleanup).
#[derive(Clone)]
pub struct Stopper(Arc<StopSignal>);

impl Stopper {
    /// Asks the server to stop; returns at once.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
        if self.0.handed.load(Ordering::Acquire) {
            // The connection is another process's now: leave it alone.
            return;
        }
        self.0.wake();
        self.0.cut_current();
    }
}

/// A vfio-user server for one PCI function.
pub struct Server {
    function: Arc<Mutex<PciFunction>>,
    config: Arc<ServerConfig>,
    stop: Arc<StopSignal>,
    stats: Arc<stats::Stats>,
}

impl Server {
    /// A server for `function` with `config`.
    pub fn new(function: PciFunction, config: ServerConfig) -> Result<Server, ServerError> {
        let wake = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|e| ServerError::Listener(e.into()))?;
        Ok(Server {
            function: Arc::new(Mutex::new(function)),
            config: Arc::new(config),
            stop: Arc::new(StopSignal {
                stopped: AtomicBool::new(false),
                wake,
                current: Mutex::new(None),
                handover: Arc::new(handover::HandOverState::new().map_err(ServerError::Listener)?),
                handed: AtomicBool::new(false),
                negotiated: Arc::new(AtomicBool::new(false)),
            }),
            stats: stats::Stats::new(),
        })
    }

    /// The device's counters ([`stats::Stats::render`]).
    pub fn stats(&self) -> &Arc<stats::Stats> {
        &self.stats
    }

    /// A handle that asks this server to hand its device over to another process (a live
    /// upgrade; see [`handover`]).
    pub fn hand_over_ctl(&self) -> HandOverCtl {
        HandOverCtl {
            state: self.stop.handover.clone(),
            accept_wake: self.stop.clone(),
        }
    }

    /// Takes in a device another process handed over (its [`Package`]): on a session thread
    /// of its own, the client's mappings are mapped again, the device opened for the same
    /// client and the function restored, paused until [`serve_taken_over`](Self::serve_taken_over)
    /// (dropping the result instead leaves it paused). Fails with the reason's errno.
    pub fn take_over(&self, package: Package) -> Result<TakenOver, Errno> {
        let unpacked = package.unpack()?;
        let paused_at = unpacked.paused_at;
        let Some(mut parts) = unpacked.session else {
            self.lock_function()
                .take_over(unpacked.function, None)
                .map_err(|e| Errno::from_raw_os_error(e.errno()))?;
            return Ok(TakenOver {
                session: None,
                paused_at,
                client: None,
            });
        };
        let detached = parts.detached.take().ok_or(Errno::INVAL)?;
        let transport = UnixTransport::resume(detached)
            .with_spin(self.config.spin)
            .with_wake(self.stop.handover.wake.clone());
        let client = parts.client;
        let resumed = session::Resumed::new(Arc::new(transport), parts, unpacked.function);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), Errno>>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let function = self.function.clone();
        let config = self.config.clone();
        let stop = self.stop.clone();
        let stats = self.stats.clone();
        let thread = std::thread::Builder::new()
            .name("umdev-session".into())
            .spawn(move || {
                let client = resumed.client();
                stop.negotiated.store(true, Ordering::Release);
                let s = match session::Session::resumed(&function, &config, resumed) {
                    Ok(s) => s
                        .with_handover(stop.handover.clone())
                        .with_negotiated_flag(stop.negotiated.clone())
                        .with_stats(stats),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                if go_rx.recv().is_err() {
                    // Not to be served here after all; the process is going.
                    return;
                }
                *stop.current.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(s.transport().clone());
                tracing::info!(%client, "client taken over");
                let result = s.run_resumed();
                *stop.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
                log_end(&result);
            })
            .map_err(|_| Errno::AGAIN)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(TakenOver {
                session: Some(TakenSession { thread, go: go_tx }),
                paused_at,
                client: Some(client),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Errno::IO),
        }
    }

    /// Serves a device taken over ([`take_over`](Self::take_over)) on its listening socket
    /// (the old process's), the handed-over client first: as [`serve`](Self::serve).
    pub fn serve_taken_over(
        &self,
        listener: UnixListener,
        taken: TakenOver,
    ) -> Result<(), ServerError> {
        let session = match taken.session {
            Some(t) => {
                let _ = t.go.send(());
                Some(t.thread)
            }
            None => {
                if let Err(e) = self.lock_function().resume() {
                    tracing::warn!(error = %e, "a handed-over device did not run again");
                }
                None
            }
        };
        self.accept_loop(listener, session)
    }

    /// Whether `client` may connect (the allow-lists).
    fn allowed(&self, client: &ClientId) -> bool {
        let Some(p) = client.peer else {
            return self.config.allow_uids.is_empty() && self.config.allow_gids.is_empty();
        };
        (self.config.allow_uids.is_empty() || self.config.allow_uids.contains(&p.uid))
            && (self.config.allow_gids.is_empty() || self.config.allow_gids.contains(&p.gid))
    }

    fn lock_function(&self) -> std::sync::MutexGuard<'_, PciFunction> {
        self.function.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The accept loop's side of a hand-over: with no client, it pauses the device itself.
    /// `true`: handed over, stop.
    fn hand_over_idle(&self, session: &Option<JoinHandle<()>>) -> bool {
        let state = &self.stop.handover;
        loop {
            if self.stop.handed.load(Ordering::Acquire) {
                return true;
            }
            let live = session.as_ref().is_some_and(|h| !h.is_finished());
            let p = state.lock();
            match *p {
                handover::Phase::Idle => return false,
                handover::Phase::Asked if !live => {
                    drop(p);
                    let handed = state.pause_and_deliver(&self.function, || {
                        Some(
                            self.lock_function()
                                .hand_over()
                                .map(|h| Package::make(h, None))
                                .map_err(|e| Errno::from_raw_os_error(e.errno())),
                        )
                    });
                    if handed {
                        self.stop.handed.store(true, Ordering::Release);
                        tracing::info!("device handed over to another process (no client)");
                    }
                    return handed;
                }
                _ => {
                    let _ = state
                        .changed
                        .wait_timeout(p, Duration::from_millis(20))
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
    }

    /// The function served, for callers that need to reach the device (e.g. a daemon's
    /// management side). Lock it only briefly: the session thread needs it for every request.
    pub fn function(&self) -> &Arc<Mutex<PciFunction>> {
        &self.function
    }

    /// A handle that stops [`serve`](Self::serve).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop.clone())
    }

    /// Serves one already connected client until it goes. `Ok` means a clean disconnect.
    /// The client has a fresh connection number and no credentials.
    pub fn serve_transport(&self, transport: Arc<dyn Transport>) -> Result<(), ServerError> {
        serve_one(
            &self.function,
            &self.config,
            &self.stop,
            &self.stats,
            transport,
            client_id(None),
        )
    }

    /// Accepts clients on `listener`, one session at a time, until stopped.
    ///
    /// A client that connects while another is being served is refused at once (its
    /// connection is closed and the refusal logged): a vfio-user device has one client.
    pub fn serve(&self, listener: UnixListener) -> Result<(), ServerError> {
        self.accept_loop(listener, None)
    }

    fn accept_loop(
        &self,
        listener: UnixListener,
        mut session: Option<JoinHandle<()>>,
    ) -> Result<(), ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Listener)?;
        umdev_transport::listen::set_backlog(&listener, self.config.listen_backlog)
            .map_err(ServerError::Listener)?;
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        // When the current session started, while its client has not completed VERSION.
        let mut waiting_since: Option<Instant> = None;
        while !self.stop.stopped.load(Ordering::Acquire) {
            if self.stop.negotiated.load(Ordering::Acquire)
                || session.as_ref().is_none_or(JoinHandle::is_finished)
            {
                waiting_since = None;
            }
            let timeout = waiting_since.map(|t| {
                let left = self.config.version_timeout.saturating_sub(t.elapsed());
                rustix::fs::Timespec {
                    tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(left.subsec_nanos()),
                }
            });
            let mut fds = [
                PollFd::new(&listener, PollFlags::IN),
                PollFd::new(&self.stop.wake, PollFlags::IN),
            ];
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(ServerError::Listener(e.into())),
            }
            if self.stop.stopped.load(Ordering::Acquire) {
                break;
            }
            if self.stop.handover.asked() && self.hand_over_idle(&session) {
                // Another process serves the device and its client now: close nothing.
                std::mem::forget(listener);
                return Ok(());
            }
            if self.stop.handed.load(Ordering::Acquire) {
                std::mem::forget(listener);
                return Ok(());
            }
            if waiting_since.is_some_and(|t| t.elapsed() >= self.config.version_timeout)
                && !self.stop.negotiated.load(Ordering::Acquire)
            {
                refusals::refused(
                    "version-timeout",
                    None,
                    &format!(
                        "no VERSION within {} ms: disconnected",
                        self.config.version_timeout.as_millis()
                    ),
                );
                self.stop.cut_current();
                waiting_since = None;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServerError::Listener(e)),
            };
            if let Some(h) = session.take() {
                if !h.is_finished() && !self.stop.negotiated.load(Ordering::Acquire) {
                    // A client that has not completed VERSION does not hold the device.
                    refusals::refused(
                        "version-yield",
                        None,
                        "a client that sent no VERSION yields to a new connection",
                    );
                    self.stop.cut_current();
                }
                // The previous client may have just gone without its session having noticed
                // yet (a VMM that reconnects): give the session a moment to wind down. The
                // session signals `done` as its last act, so a join after it is immediate.
                if h.is_finished() || done_rx.recv_timeout(HANDOVER_WAIT).is_ok() {
                    let _ = h.join();
                } else {
                    refusals::refused(
                        "second-client",
                        Some(&client_id(peer_cred(&stream))),
                        "the device already has a client",
                    );
                    drop(stream);
                    session = Some(h);
                    continue;
                }
            }
            while done_rx.try_recv().is_ok() {}
            if let Err(e) = stream.set_nonblocking(false) {
                tracing::warn!(error = %e, "cannot make the client socket blocking; dropping it");
                continue;
            }
            let client = client_id(peer_cred(&stream));
            if !self.allowed(&client) {
                refusals::refused(
                    "peer-not-allowed",
                    Some(&client),
                    "its uid and gid are not in the server's allow-lists",
                );
                continue;
            }
            if let Err(e) = stream.set_write_timeout(Some(self.config.send_timeout)) {
                tracing::warn!(error = %e, "cannot set the client socket's send timeout; dropping it");
                continue;
            }
            let transport: Arc<dyn Transport> = Arc::new(
                UnixTransport::new(stream)
                    .with_spin(self.config.spin)
                    .with_wake(self.stop.handover.wake.clone()),
            );
            let function = self.function.clone();
            let config = self.config.clone();
            let stop = self.stop.clone();
            let stats = self.stats.clone();
            let done = done_tx.clone();
            self.stop.negotiated.store(false, Ordering::Release);
            waiting_since = Some(Instant::now());
            session = Some(
                std::thread::Builder::new()
                    .name("umdev-session".into())
                    .spawn(move || {
                        // serve_one logs how the session ended.
                        let _ = serve_one(&function, &config, &stop, &stats, transport, client);
                        let _ = done.send(());
                    })
                    .map_err(ServerError::Listener)?,
            );
        }
        if self.stop.handed.load(Ordering::Acquire) {
            std::mem::forget(listener);
            return Ok(());
        }
        self.stop.cut_current();
        if let Some(h) = session.take() {
            let _ = h.join();
        }
        Ok(())
    }
}

/// The session thread of a device taken over, waiting for the word to run.
pub(crate) struct TakenSession {
    thread: JoinHandle<()>,
    go: std::sync::mpsc::Sender<()>,
}

fn log_end(result: &Result<session::Ended, ServerError>) {
    match result {
        Ok(session::Ended::Gone) => tracing::info!("client disconnected"),
        Ok(session::Ended::HandedOver) => {}
        Err(ServerError::Transport(umdev_transport::TransportError::Io(e)))
            if e.kind() == std::io::ErrorKind::WouldBlock =>
        {
            refusals::refused(
                "stopped-reading",
                None,
                "the client left its replies unread past the send timeout: disconnected",
            );
        }
        Err(e) => tracing::warn!(
            error = e as &(dyn std::error::Error + 'static),
            "client session failed"
        ),
    }
}

fn serve_one(
    function: &Mutex<PciFunction>,
    config: &ServerConfig,
    stop: &StopSignal,
    stats: &Arc<stats::Stats>,
    transport: Arc<dyn Transport>,
    client: ClientId,
) -> Result<(), ServerError> {
    stats.connected();
    *stop.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(transport.clone());
    tracing::info!(%client, "client connected");
    let result = session::Session::new(function, config, transport, client)
        .with_handover(stop.handover.clone())
        .with_negotiated_flag(stop.negotiated.clone())
        .with_stats(stats.clone())
        .run();
    if matches!(result, Ok(session::Ended::HandedOver)) {
        stop.handed.store(true, Ordering::Release);
        stop.wake();
    }
    *stop.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    log_end(&result);
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_cred_names_the_connecting_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let cred = peer_cred(&a).unwrap();
        assert_eq!(cred.pid, std::process::id());
        assert_eq!(cred.uid, rustix::process::getuid().as_raw());
    }

    #[test]
    fn connection_numbers_are_unique_and_nonzero() {
        let a = client_id(None);
        let b = client_id(None);
        assert_ne!(a.connection, 0);
        assert_ne!(a.connection, b.connection);
        assert!(!a.same_client(&b));
    }
}
