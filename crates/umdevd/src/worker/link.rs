//! The link between the daemon and one worker: a `SOCK_SEQPACKET` UNIX socket (one datagram
//! per message, so a message and the fd it carries arrive together and never split), JSON
//! messages, calls in both directions matched by number. A reader thread delivers replies
//! to their callers and hands calls to a handler thread, so a caller never waits behind the
//! handling of another call.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use umdev_core::DeviceDescription;

use crate::config::{SandboxConfig, ServerSection};

/// The largest message: descriptions and attribute texts are small.
const MAX_MESSAGE: usize = 1 << 20;
/// The longest a call waits for its answer: a worker stuck in a device's code must not
/// hold the daemon (whose registry lock a `create` holds while the worker builds).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Room for the one fd a message may carry.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(1));

/// One message.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// A call; the other side answers with a reply of the same number (0: no answer wanted).
    Call {
        /// Its number.
        id: u64,
        /// What is asked.
        call: Call,
    },
    /// The answer to call `id`.
    Reply {
        /// The call's number.
        id: u64,
        /// The answer.
        reply: Reply,
    },
}

/// What one side asks of the other.
#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    /// Daemon to worker, the first message: the devices it will serve (to build their
    /// parents and know what they open) and how to seal itself before serving any.
    Seal {
        /// The devices.
        devices: Vec<StartDevice>,
        /// The sandbox settings.
        sandbox: SandboxConfig,
    },
    /// Daemon to worker: build a device from its description and serve it.
    Start(Box<StartDevice>),
    /// Daemon to worker: stop serving a device (its client goes, its socket is removed).
    Stop {
        /// The device.
        uuid: String,
    },
    /// Daemon to worker: a vendor attribute's text.
    Show {
        /// The device.
        uuid: String,
        /// The attribute.
        name: String,
    },
    /// Daemon to worker: store into a vendor attribute.
    Store {
        /// The device.
        uuid: String,
        /// The attribute.
        name: String,
        /// What was written.
        value: String,
    },
    /// Daemon to worker: raise the device's REQ interrupt.
    Req {
        /// The device.
        uuid: String,
    },
    /// Daemon to worker: the device's display plane (its memory's fd comes with the reply).
    Plane {
        /// The device.
        uuid: String,
    },
    /// Daemon to a worker that outlived its daemon: what it serves, for the registry.
    Adopt,
    /// Worker to daemon: a client wants to open a device (the IOMMU group rules).
    Acquire {
        /// The device.
        uuid: String,
        /// The worker's connection number.
        connection: u64,
        /// The client's pid, uid and gid.
        peer: Option<[u32; 3]>,
    },
    /// Worker to daemon: charge `pages` pinned pages to client `pid`'s budget, shared by
    /// every worker (refused past `limit` pages).
    Charge {
        /// The client's process.
        pid: u32,
        /// Pages newly pinned.
        pages: u64,
        /// The client's budget in pages.
        limit: u64,
    },
    /// Worker to daemon: `pages` of client `pid` are no longer pinned.
    Credit {
        /// The client's process.
        pid: u32,
        /// Pages unpinned.
        pages: u64,
    },
    /// Worker to daemon: the client that was admitted has gone.
    Release {
        /// The device.
        uuid: String,
    },
    /// Daemon to worker: a device's counters as Prometheus text with these labels.
    Metrics {
        /// The device.
        uuid: String,
        /// The labels of every sample.
        labels: String,
    },
    /// Daemon to worker: the worker process's own counters (its refusals).
    ProcessMetrics,
    /// Daemon to a serving worker (a live upgrade): pause every device between two
    /// messages and hand it over on the socket that comes with the call, then exit once
    /// the new worker has it (or run on if it fails).
    HandOver,
    /// Daemon to a new worker, sealed for the same devices: take them over from the socket
    /// that comes with the call and serve them.
    TakeOver,
}

/// A device for a worker to build and serve.
#[derive(Debug, Serialize, Deserialize)]
pub struct StartDevice {
    /// Its UUID.
    pub uuid: String,
    /// Its parent's name, driver and options (the worker builds the parent the same way).
    pub parent: String,
    /// The parent's driver.
    pub driver: String,
    /// The parent's options.
    pub options: Map<String, Value>,
    /// The parent's state directory.
    pub state_dir: Option<PathBuf>,
    /// What the parent's `create` made of the device.
    pub description: DeviceDescription,
    /// The device's own directory (made by the daemon).
    pub dir: PathBuf,
    /// Its sockets' mode and owner.
    pub mode: u32,
    /// Its sockets' owner.
    pub owner: Option<(u32, Option<u32>)>,
    /// The server's tunables.
    pub server: ServerSection,
}

/// A device a worker serves, as a daemon adopting it learns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Adopted {
    /// How it was started.
    pub start: StartDevice,
    /// Its client (connection number and pid, uid, gid), if one holds it.
    pub held: Option<(u64, Option<[u32; 3]>)>,
}

/// An answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The devices of a worker being adopted.
    Adopted(Vec<Adopted>),
    /// A charge refused: the pages the client has charged in all.
    OverBudget(u64),
    /// Done.
    Done,
    /// A text (an attribute's).
    Text(String),
    /// Failed with this errno.
    Failed(i32),
    /// Devices taken over, each with its pause (from the old worker's pause to the new
    /// one's resume, in microseconds).
    TakenOver(Vec<(String, u64)>),
    /// A display plane; its memory's fd travels with the message.
    Plane {
        /// DRM fourcc.
        fourcc: u32,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// Bytes per line.
        stride: u32,
        /// Offset of the first pixel.
        offset: u64,
    },
}

/// What a call got back: the reply and the fd that came with it.
pub type Answer = (Reply, Option<OwnedFd>);

/// Callers waiting for their reply; `None` once the link is down.
type Pending = Option<HashMap<u64, mpsc::Sender<Answer>>>;

/// One end of a link.
pub struct Link {
    fd: OwnedFd,
    next: AtomicU64,
    pending: Mutex<Pending>,
    send: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A connected pair of UNIX `SOCK_SEQPACKET` sockets (for a hand-over between workers).
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A new UNIX `SOCK_SEQPACKET` socket.
fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A listening `SOCK_SEQPACKET` socket at `path` (0600), for one worker to connect to.
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = seqpacket()?;
    let _ = std::fs::remove_file(path);
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600))?;
    rustix::net::listen(&fd, 1)?;
    Ok(fd)
}

/// The first connection to `listener` within `timeout`.
pub fn accept(listener: &OwnedFd, timeout: Duration) -> std::io::Result<Link> {
    let mut fds = [rustix::event::PollFd::new(
        listener,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::fs::Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let forever = timeout == Duration::MAX;
    if rustix::event::poll(&mut fds, (!forever).then_some(&ts))? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the worker did not connect",
        ));
    }
    let fd = rustix::net::accept_with(listener, SocketFlags::CLOEXEC)?;
    Ok(Link::new(fd))
}

/// Connects to the daemon's link socket at `path`.
pub fn connect(path: &Path) -> std::io::Result<Link> {
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(Link::new(fd))
}

impl Link {
    fn new(fd: OwnedFd) -> Link {
        Link {
            fd,
            next: AtomicU64::new(1),
            pending: Mutex::new(Some(HashMap::new())),
            send: Mutex::new(()),
        }
    }

    fn send(&self, frame: &Frame, fd: Option<BorrowedFd<'_>>) -> Result<(), Errno> {
        let bytes = serde_json::to_vec(frame).map_err(|_| Errno::INVAL)?;
        if bytes.len() > MAX_MESSAGE {
            return Err(Errno::MSGSIZE);
        }
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
        let mut cmsg = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            cmsg.push(SendAncillaryMessage::ScmRights(&fds));
        }
        let _one_at_a_time = lock(&self.send);
        loop {
            match rustix::net::sendmsg(
                &self.fd,
                &[IoSlice::new(&bytes)],
                &mut cmsg,
                SendFlags::NOSIGNAL,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::INTR) => {}
                Err(Errno::PIPE | Errno::CONNRESET) => return Err(Errno::NODEV),
                Err(e) => return Err(e),
            }
        }
    }

    /// Asks `call` and waits for the answer; ENODEV if the link is or goes down first,
    /// ETIMEDOUT after [`CALL_TIMEOUT`], the other side's errno if it failed.
    pub fn call(&self, call: Call) -> Result<Answer, Errno> {
        self.call_with(call, None, CALL_TIMEOUT)
    }

    /// [`call`](Self::call) with `fd` attached, waiting up to `timeout`.
    pub fn call_with(
        &self,
        call: Call,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Answer, Errno> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        match lock(&self.pending).as_mut() {
            Some(p) => {
                p.insert(id, tx);
            }
            None => return Err(Errno::NODEV),
        }
        if let Err(e) = self.send(&Frame::Call { id, call }, fd) {
            if let Some(p) = lock(&self.pending).as_mut() {
                p.remove(&id);
            }
            return Err(e);
        }
        match rx.recv_timeout(timeout) {
            Ok((Reply::Failed(errno), _)) => Err(Errno::from_raw_os_error(errno)),
            Ok(answer) => Ok(answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(p) = lock(&self.pending).as_mut() {
                    p.remove(&id);
                }
                tracing::warn!(id, "a call on a worker link was not answered in time");
                Err(Errno::TIMEDOUT)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Errno::NODEV),
        }
    }

    /// Sends `call` without waiting for an answer.
    pub fn cast(&self, call: Call) -> Result<(), Errno> {
        self.send(&Frame::Call { id: 0, call }, None)
    }

    /// Answers call `id`.
    pub fn reply(&self, id: u64, answer: Result<Reply, Errno>, fd: Option<BorrowedFd<'_>>) {
        if id == 0 {
            return;
        }
        let reply = answer.unwrap_or_else(|e| Reply::Failed(e.raw_os_error()));
        if let Err(e) = self.send(&Frame::Reply { id, reply }, fd) {
            tracing::debug!(error = %e, "a reply was not delivered: the link is down");
        }
    }

    /// The next message (`None` at the end of the link, or after one that cannot be read).
    fn recv(&self, buf: &mut [u8]) -> Option<(Frame, Option<OwnedFd>)> {
        loop {
            let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(buf)];
            let r = match rustix::net::recvmsg(
                self.fd.as_fd(),
                &mut iov,
                &mut cmsg,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
                Err(_) => return None,
            };
            let mut fd = None;
            for m in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = m {
                    fd = rights.into_iter().next();
                }
            }
            if r.bytes == 0 {
                return None;
            }
            if r.flags.contains(ReturnFlags::TRUNC) {
                tracing::warn!("a message on a worker link was too large: closing the link");
                return None;
            }
            return match serde_json::from_slice::<Frame>(&buf[..r.bytes]) {
                Ok(frame) => Some((frame, fd)),
                Err(e) => {
                    tracing::warn!(error = %e, "an unreadable message on a worker link: closing it");
                    None
                }
            };
        }
    }

    /// The first message, read before [`Link::serve`] starts any thread.
    pub fn first(&self) -> Option<Frame> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        self.recv(&mut buf).map(|(f, _)| f)
    }

    /// Ends the link: the other side's reader sees its end.
    pub fn shut(&self) {
        let _ = rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Both);
    }

    /// Reads messages until the other side goes (or sends something unreadable), handing
    /// calls to `handle` on a thread of its own; then fails every call still waiting.
    pub fn serve(
        self: &Arc<Self>,
        name: &str,
        mut handle: impl FnMut(u64, Call, Option<OwnedFd>) + Send + 'static,
    ) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<(u64, Call, Option<OwnedFd>)>();
        std::thread::Builder::new()
            .name(format!("{name}-calls"))
            .spawn(move || {
                for (id, call, fd) in rx {
                    handle(id, call, fd);
                }
            })?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        while let Some((frame, fd)) = self.recv(&mut buf) {
            match frame {
                Frame::Call { id, call } => {
                    if tx.send((id, call, fd)).is_err() {
                        break;
                    }
                }
                Frame::Reply { id, reply } => {
                    let waiter = lock(&self.pending).as_mut().and_then(|p| p.remove(&id));
                    if let Some(w) = waiter {
                        let _ = w.send((reply, fd));
                    }
                }
            }
        }
        // Every caller still waiting gets ENODEV; new calls fail at once.
        lock(&self.pending).take();
        Ok(())
    }
}
