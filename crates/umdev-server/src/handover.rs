//! Live upgrade of a served device: the server hands its function, its client's connection
//! and the client's address space to a server in another process, and the client sees a
//! pause, never a reset or a reconnect.
//!
//! The old server is asked through a [`HandOverCtl`]: its session stops between two
//! messages (the socket is left alone: nothing is consumed of a message that has started
//! arriving), the function is paused (`PciFunction::pause`), and a [`Package`] is made:
//! the function's state with its fds (`PciFunction::hand_over`), the connection with what
//! was read of it and not handled (`Transport::detach`), the negotiated limits, the
//! client's identity and every DMA mapping with its file. Everything in it is a duplicate:
//! until [`HandOverCtl::commit`] the old server can [`abort`](HandOverCtl::abort) and run
//! on. After a commit it neither reads nor writes the connection again, and its process is
//! expected to exit without cleaning up (a cleanup would close what the client still uses).
//!
//! The new server takes the package ([`Server::take_over`](crate::Server::take_over): the mappings are mapped again
//! from their files, the device opened for the same client without asking the group rules
//! again, the function's state restored) and, once every device of a hand-over has been
//! taken, runs it ([`Server::serve_taken_over`](crate::Server::serve_taken_over)).

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rustix::io::Errno;
use umdev_dma::{AddressSpace, Backing, DmaLimits, IovaRange, Prot};
use umdev_pci::{push_fd, ClientId, HandOver, HandedFds, PeerCred, StateReader, StateWriter};
use umdev_transport::Detached;

/// A served device's state, as one process hands it to the next.
#[derive(Debug, Default)]
pub struct Package {
    /// Tagged fields (`umdev_pci::StateWriter`).
    pub state: Vec<u8>,
    /// The fds the fields name by index.
    pub fds: Vec<OwnedFd>,
}

/// The package's fields (its tags), for tools that write packages (the fuzz seeds).
pub mod tag {
    /// The function's hand-over state.
    pub const T_FUNCTION: u16 = 1;
    /// How many of the fds are the function's (they come first).
    pub const T_FUNCTION_FDS: u16 = 2;
    /// Whether a client's session comes with it.
    pub const T_SESSION: u16 = 3;
    /// The connection's fd.
    pub const T_STREAM: u16 = 4;
    /// Bytes read from the connection and not handled.
    pub const T_PENDING: u16 = 5;
    /// One per fd mark: start u64, end u64, then fd indexes (u32 each).
    pub const T_MARK: u16 = 6;
    /// The client's connection number.
    pub const T_CONNECTION: u16 = 7;
    /// pid, uid, gid (u32 each).
    pub const T_PEER: u16 = 8;
    /// Whether the client negotiated WRITE_MULTIPLE.
    pub const T_WRITE_MULTIPLE: u16 = 9;
    /// Most fds the client takes in one message.
    pub const T_CLIENT_MAX_FDS: u16 = 10;
    /// Most bytes the client takes in one DMA message.
    pub const T_CLIENT_MAX_XFER: u16 = 11;
    /// Most DMA mappings the client may hold.
    pub const T_MAX_DMA_MAPS: u16 = 12;
    /// One per mapping: start u64, len u64, prot u8, fd u32 (u32::MAX: none), offset u64.
    pub const T_MAPPING: u16 = 13;
    /// CLOCK_MONOTONIC nanoseconds at the pause.
    pub const T_PAUSED_AT: u16 = 14;
}
use tag::*;

/// Nanoseconds of `CLOCK_MONOTONIC`: comparable across the processes of one boot.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// What a session hands over beside the function.
pub(crate) struct SessionParts {
    pub(crate) detached: Option<Detached>,
    pub(crate) client: ClientId,
    pub(crate) write_multiple: bool,
    pub(crate) client_max_fds: u32,
    pub(crate) client_max_xfer: u32,
    pub(crate) max_dma_maps: u32,
    pub(crate) mappings: Vec<(IovaRange, Prot, Backing)>,
}

impl Package {
    /// The package of a paused function, with its session if a client is attached.
    pub(crate) fn make(function: HandOver, session: Option<SessionParts>) -> Package {
        let mut w = StateWriter::new();
        w.u64(T_PAUSED_AT, monotonic_ns());
        w.bytes(T_FUNCTION, &function.state);
        w.u32(
            T_FUNCTION_FDS,
            u32::try_from(function.fds.len()).unwrap_or(u32::MAX),
        );
        let mut fds = function.fds;
        w.bool(T_SESSION, session.is_some());
        if let Some(s) = session {
            let Some(detached) = s.detached else {
                return Package::default();
            };
            let n = push_fd(&mut fds, OwnedFd::from(detached.stream));
            w.u32(T_STREAM, n);
            w.bytes(T_PENDING, &detached.pending);
            for (start, end, marked) in detached.fds {
                let mut b = Vec::new();
                b.extend_from_slice(&start.to_le_bytes());
                b.extend_from_slice(&end.to_le_bytes());
                for fd in marked {
                    b.extend_from_slice(&push_fd(&mut fds, fd).to_le_bytes());
                }
                w.bytes(T_MARK, &b);
            }
            w.u64(T_CONNECTION, s.client.connection);
            if let Some(p) = s.client.peer {
                let b: Vec<u8> = [p.pid, p.uid, p.gid]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                w.bytes(T_PEER, &b);
            }
            w.bool(T_WRITE_MULTIPLE, s.write_multiple);
            w.u32(T_CLIENT_MAX_FDS, s.client_max_fds);
            w.u32(T_CLIENT_MAX_XFER, s.client_max_xfer);
            w.u32(T_MAX_DMA_MAPS, s.max_dma_maps);
            for (range, prot, backing) in s.mappings {
                let (fd, offset) = match backing {
                    Backing::Fd { fd, offset } => (push_fd(&mut fds, fd), offset),
                    Backing::Remote => (u32::MAX, 0),
                };
                let mut b = Vec::with_capacity(29);
                b.extend_from_slice(&range.start().to_le_bytes());
                b.extend_from_slice(&range.len().to_le_bytes());
                b.push(prot.bits());
                b.extend_from_slice(&fd.to_le_bytes());
                b.extend_from_slice(&offset.to_le_bytes());
                w.bytes(T_MAPPING, &b);
            }
        }
        Package {
            state: w.into_payload(),
            fds,
        }
    }

    /// When the old server paused (`CLOCK_MONOTONIC` ns), if the package says.
    pub fn paused_at(&self) -> Option<u64> {
        StateReader::parse(&self.state).ok()?.u64(T_PAUSED_AT).ok()
    }
}

fn bad(what: &str) -> Errno {
    tracing::warn!(what, "a hand-over package cannot be read");
    Errno::INVAL
}

fn le_u32(b: &[u8], at: usize) -> Result<u32, Errno> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad("a short field"))
}

fn le_u64(b: &[u8], at: usize) -> Result<u64, Errno> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| bad("a short field"))
}

/// A package read back.
pub(crate) struct Unpacked {
    pub(crate) function: HandOver,
    pub(crate) session: Option<SessionParts>,
    pub(crate) paused_at: u64,
}

impl Package {
    pub(crate) fn unpack(self) -> Result<Unpacked, Errno> {
        let r = StateReader::parse(&self.state).map_err(|_| bad("the fields"))?;
        let nfn = r.u32(T_FUNCTION_FDS).map_err(|_| bad("function fds"))? as usize;
        let mut all = self.fds;
        if nfn > all.len() {
            return Err(bad("function fds"));
        }
        let rest = all.split_off(nfn);
        let function = HandOver {
            state: r.bytes(T_FUNCTION).map_err(|_| bad("function"))?.to_vec(),
            fds: all,
        };
        // Indexes in the package count the function's fds first.
        let mut fds = HandedFds::new(rest);
        let mut take = |i: u32| {
            i.checked_sub(u32::try_from(nfn).unwrap_or(u32::MAX))
                .ok_or_else(|| bad("an fd index"))
                .and_then(|i| fds.take(i))
        };
        let paused_at = r.u64(T_PAUSED_AT).unwrap_or(0);
        if !r.bool(T_SESSION).map_err(|_| bad("session"))? {
            return Ok(Unpacked {
                function,
                session: None,
                paused_at,
            });
        }
        let stream = UnixStream::from(take(r.u32(T_STREAM).map_err(|_| bad("stream"))?)?);
        let pending = r.bytes(T_PENDING).map_err(|_| bad("pending"))?.to_vec();
        let mut marks = Vec::new();
        for b in r.all(T_MARK) {
            let (start, end) = (le_u64(b, 0)?, le_u64(b, 8)?);
            let mut marked = Vec::new();
            let mut at = 16;
            while at < b.len() {
                marked.push(take(le_u32(b, at)?)?);
                at += 4;
            }
            marks.push((start, end, marked));
        }
        let peer = match r.get(T_PEER) {
            Some(b) => Some(PeerCred {
                pid: le_u32(b, 0)?,
                uid: le_u32(b, 4)?,
                gid: le_u32(b, 8)?,
            }),
            None => None,
        };
        let mut mappings = Vec::new();
        for b in r.all(T_MAPPING) {
            let range = IovaRange::new(le_u64(b, 0)?, le_u64(b, 8)?).map_err(|_| bad("a range"))?;
            let prot = b
                .get(16)
                .and_then(|&p| Prot::from_bits(p))
                .ok_or_else(|| bad("a mapping's protection"))?;
            let fd = le_u32(b, 17)?;
            let offset = le_u64(b, 21)?;
            let backing = if fd == u32::MAX {
                Backing::Remote
            } else {
                Backing::Fd {
                    fd: take(fd)?,
                    offset,
                }
            };
            mappings.push((range, prot, backing));
        }
        Ok(Unpacked {
            function,
            session: Some(SessionParts {
                detached: Some(Detached {
                    stream,
                    pending,
                    fds: marks,
                }),
                client: ClientId {
                    connection: r.u64(T_CONNECTION).map_err(|_| bad("connection"))?,
                    peer,
                },
                write_multiple: r
                    .bool(T_WRITE_MULTIPLE)
                    .map_err(|_| bad("write_multiple"))?,
                client_max_fds: r.u32(T_CLIENT_MAX_FDS).map_err(|_| bad("max fds"))?,
                client_max_xfer: r.u32(T_CLIENT_MAX_XFER).map_err(|_| bad("max xfer"))?,
                max_dma_maps: r.u32(T_MAX_DMA_MAPS).map_err(|_| bad("max maps"))?,
                mappings,
            }),
            paused_at,
        })
    }
}

/// Where a hand-over of one server stands.
#[derive(Debug, Default)]
pub(crate) enum Phase {
    /// Nothing asked.
    #[default]
    Idle,
    /// Asked: the session (or, without one, the accept loop) is to pause.
    Asked,
    /// Paused: the package (or why there is none), for the asker to take.
    Ready(Option<Result<Package, Errno>>),
    /// The asker's verdict: `true` commit (stop for good, touching nothing), `false` run on.
    Decided(bool),
}

/// The hand-over state shared by a server's accept loop, its session and its
/// [`HandOverCtl`].
pub(crate) struct HandOverState {
    /// Set while a pause is asked: a busy session checks it between messages (it may
    /// never wait on its socket long enough to be woken).
    pub(crate) asking: std::sync::atomic::AtomicBool,
    pub(crate) phase: Mutex<Phase>,
    pub(crate) changed: Condvar,
    /// Wakes the session's reader between messages.
    pub(crate) wake: Arc<OwnedFd>,
}

impl HandOverState {
    pub(crate) fn new() -> std::io::Result<HandOverState> {
        Ok(HandOverState {
            asking: std::sync::atomic::AtomicBool::new(false),
            phase: Mutex::new(Phase::Idle),
            changed: Condvar::new(),
            wake: Arc::new(rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )?),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a pause is asked.
    pub(crate) fn asked(&self) -> bool {
        matches!(*self.lock(), Phase::Asked)
    }

    /// Gives the asker the package (or why there is none) and waits for its verdict:
    /// `true` to stop for good.
    pub(crate) fn deliver(&self, package: Result<Package, Errno>) -> bool {
        let mut p = self.lock();
        if !matches!(*p, Phase::Asked) {
            // The asker gave up meanwhile.
            return false;
        }
        let failed = package.is_err();
        *p = Phase::Ready(Some(package));
        self.changed.notify_all();
        if failed {
            return false;
        }
        loop {
            if let Phase::Decided(commit) = *p {
                *p = Phase::Idle;
                self.changed.notify_all();
                return commit;
            }
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The pause and hand-over both sides make (a session between messages, the accept loop
    /// without a client): `function` is paused, `pack` makes the package (`None`: not now,
    /// the pause is tried again later), the asker gets it; unless the asker keeps it, the
    /// device runs again. `true`: handed over, stop serving.
    pub(crate) fn pause_and_deliver(
        &self,
        function: &Mutex<umdev_pci::PciFunction>,
        pack: impl FnOnce() -> Option<Result<Package, Errno>>,
    ) -> bool {
        let lock = || function.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = lock().pause() {
            self.deliver(Err(Errno::from_raw_os_error(e.errno())));
            return false;
        }
        let handed = match pack() {
            Some(Ok(package)) => {
                let kept = self.deliver(Ok(package));
                if !kept {
                    tracing::info!("hand-over abandoned: the device runs on");
                }
                kept
            }
            Some(Err(e)) => self.deliver(Err(e)),
            None => false,
        };
        if !handed {
            if let Err(e) = lock().resume() {
                tracing::warn!(error = %e, "the device did not run again after an abandoned hand-over");
            }
        }
        handed
    }

    /// Whether a pause may be asked (cheap: for every message).
    pub(crate) fn maybe_asked(&self) -> bool {
        self.asking.load(std::sync::atomic::Ordering::Acquire)
    }

    fn clear_wake(&self) {
        self.asking
            .store(false, std::sync::atomic::Ordering::Release);
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&*self.wake, &mut b);
    }
}

/// Asks a running [`Server`](crate::Server) to hand its device over (see the module).
#[derive(Clone)]
pub struct HandOverCtl {
    pub(crate) state: Arc<HandOverState>,
    pub(crate) accept_wake: Arc<crate::StopSignal>,
}

impl HandOverCtl {
    /// Pauses the server between two messages and returns its package; EBUSY when the
    /// device cannot be paused now (a migration), ENOTSUP when it cannot hand over,
    /// ETIMEDOUT when the session did not reach a message boundary within `timeout` (the
    /// server runs on in each case). After `Ok`, call [`commit`](Self::commit) or
    /// [`abort`](Self::abort).
    pub fn pause(&self, timeout: Duration) -> Result<Package, Errno> {
        {
            let mut p = self.state.lock();
            if !matches!(*p, Phase::Idle) {
                return Err(Errno::BUSY);
            }
            *p = Phase::Asked;
        }
        self.state
            .asking
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = rustix::io::write(&*self.state.wake, &1u64.to_ne_bytes());
        self.accept_wake.wake();
        let deadline = std::time::Instant::now() + timeout;
        let mut p = self.state.lock();
        loop {
            if let Phase::Ready(r) = &mut *p {
                let r = r.take().unwrap_or(Err(Errno::INVAL));
                if r.is_err() {
                    *p = Phase::Idle;
                    self.state.clear_wake();
                }
                return r;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                *p = Phase::Idle;
                self.state.clear_wake();
                self.state.changed.notify_all();
                return Err(Errno::TIMEDOUT);
            }
            p = self
                .state
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn decide(&self, commit: bool) {
        let mut p = self.state.lock();
        self.state.clear_wake();
        *p = Phase::Decided(commit);
        self.state.changed.notify_all();
        // The paused side answers by going back to Idle.
        while matches!(*p, Phase::Decided(_)) {
            p = self
                .state
                .changed
                .wait(p)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The package was taken: the server stops for good without touching the connection,
    /// the device or the mappings (its process should now exit).
    pub fn commit(&self) {
        self.decide(true);
    }

    /// The hand-over failed: the server runs on as before.
    pub fn abort(&self) {
        self.decide(false);
    }
}

/// A package taken in by a new server, ready to run (see
/// [`Server::serve_taken_over`](crate::Server::serve_taken_over)(crate::Server::serve_taken_over)).
pub struct TakenOver {
    pub(crate) session: Option<crate::TakenSession>,
    /// When the old server paused (`CLOCK_MONOTONIC` ns).
    pub paused_at: u64,
    pub(crate) client: Option<ClientId>,
}

impl TakenOver {
    /// The client that came with the device, if one was attached.
    pub fn client(&self) -> Option<ClientId> {
        self.client
    }
}

/// The listening socket of a handed-over device, from its fd.
pub fn listener_from(fd: OwnedFd) -> UnixListener {
    UnixListener::from(fd)
}

/// An address space like the old session's, with the same mappings from their files.
pub(crate) fn rebuild_space(
    parts: &mut SessionParts,
    client_memory: Arc<umdev_dma::ClientMemory>,
) -> Result<Arc<AddressSpace>, Errno> {
    let space = Arc::new(AddressSpace::with_client(
        DmaLimits {
            max_mappings: parts.max_dma_maps as usize,
        },
        client_memory,
    ));
    for (range, prot, backing) in std::mem::take(&mut parts.mappings) {
        space.map(range, prot, backing).map_err(|e| {
            tracing::warn!(%range, error = %e, "a handed-over mapping cannot be mapped again");
            e.as_errno()
        })?;
    }
    Ok(space)
}
