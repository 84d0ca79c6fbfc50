//! The control socket: an accept loop in a thread of its own, and a thread per connection,
//! so that a `stop` waiting for a client to release its device (REQ, up to the release
//! timeout) holds up no other request.
//!
//! At most [`MAX_CONNECTIONS`] are served at once; the accept loop answers any further one
//! with EAGAIN at once (no queue: a queue would only hide a stuck client, and umdevctl says
//! what failed). Stopping closes the listener, cuts the connections that are still waiting
//! for their request, and waits, bounded, for the requests in flight to answer.

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use umdev_api::control::{read_request, write_response, write_response_with_fds};
use umdev_api::{DefinitionStore, Response};
use umdev_core::Core;

use super::Handler;
use crate::daemon::Shared;

/// Connections served at once. Requests are short but for a `stop` waiting on a client;
/// management tools open a handful, so 64 only bounds the threads a runaway script costs.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send its request or to take its reply: a client that
/// connects and says nothing gives its slot back.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `stop` waits for requests in flight beyond the release timeout (the longest a
/// request waits for a client); past it the daemon goes on with its shutdown regardless.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// The connections being served, each by its thread.
#[derive(Default)]
struct Connections {
    live: Mutex<Live>,
    /// Signalled whenever a connection ends.
    ended: Condvar,
}

#[derive(Default)]
struct Live {
    next: u64,
    /// A second handle on each connection, to cut it at stop.
    streams: HashMap<u64, UnixStream>,
}

/// A connection's place among the live ones, given back on drop (even if its thread
/// panics).
struct Slot {
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.lock().streams.remove(&self.id);
        self.connections.ended.notify_all();
    }
}

/// Why a connection was not admitted.
enum Refused {
    Full,
    Io(std::io::Error),
}

impl Connections {
    fn lock(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(self: &Arc<Self>, s: &UnixStream) -> Result<Slot, Refused> {
        let mut live = self.lock();
        if live.streams.len() >= MAX_CONNECTIONS {
            return Err(Refused::Full);
        }
        let handle = s.try_clone().map_err(Refused::Io)?;
        let id = live.next;
        live.next += 1;
        live.streams.insert(id, handle);
        Ok(Slot {
            id,
            connections: self.clone(),
        })
    }

    /// Ends the reading side of every connection: one still waiting for its request reads
    /// end-of-file and closes; one whose request is being answered still writes its reply
    /// (a request already sent is still read whole: shutdown leaves queued bytes).
    fn cut_reads(&self) {
        for s in self.lock().streams.values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }

    /// Waits until every connection has ended or `deadline`; returns how many are left.
    fn wait_ended(&self, deadline: Instant) -> usize {
        let mut live = self.lock();
        loop {
            let now = Instant::now();
            if live.streams.is_empty() || now >= deadline {
                return live.streams.len();
            }
            live = self
                .ended
                .wait_timeout(live, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The control socket's server.
pub struct ControlServer {
    path: PathBuf,
    /// The path's file as bound (device, inode): removed at stop only if still there.
    bound: Option<(u64, u64)>,
    stopped: Arc<AtomicBool>,
    /// Wakes the accept loop (a stop never depends on the path on disk).
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    connections: Arc<Connections>,
    /// How long `stop` waits for requests in flight.
    drain: Duration,
}

impl ControlServer {
    /// Listens at the configured control socket (mode 0600: the API changes devices) and
    /// serves until stopped.
    pub fn start(core: Core, store: DefinitionStore, shared: Arc<Shared>) -> Result<ControlServer> {
        let path = &shared.config.control_socket();
        let listener = umdev_transport::listen::bind(path, &crate::serve::private_policy())
            .with_context(|| format!("listening on {}", path.display()))?;
        let bound = file_identity(path);
        listener
            .set_nonblocking(true)
            .context("making the control socket non-blocking")?;
        let stopped = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(
            rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
                .context("the control socket's wake eventfd")?,
        );
        let connections = Arc::new(Connections::default());
        let drain = core.config().release_timeout + STOP_GRACE;
        let handler = Arc::new(Handler::new(core, store, shared));
        let (stop, conns, w) = (stopped.clone(), connections.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("umdev-control".into())
            .spawn(move || accept_loop(&listener, &w, &stop, &conns, &handler))
            .context("starting the control thread")?;
        Ok(ControlServer {
            path: path.to_owned(),
            bound,
            wake,
            stopped,
            thread: Some(thread),
            connections,
            drain,
        })
    }

    /// Stops accepting and removes the socket, cuts the connections that have not sent
    /// their request, and waits (at most the release timeout and a little more) for the
    /// requests being answered.
    pub fn stop(mut self) {
        self.stopped.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Only our own socket: the path may have been removed, or be another's now.
        if self.bound.is_some() && file_identity(&self.path) == self.bound {
            let _ = std::fs::remove_file(&self.path);
        } else {
            tracing::warn!(path = %self.path.display(), "the control socket's path is not ours any more; left as it is");
        }
        self.connections.cut_reads();
        let left = self.connections.wait_ended(Instant::now() + self.drain);
        if left > 0 {
            // Their threads end with the process; the core's shutdown copes with a
            // request still running (it waits for removals in progress).
            tracing::warn!(
                connections = left,
                "control requests still running at shutdown"
            );
        }
    }
}

/// A file's device and inode, if it exists.
fn file_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn accept_loop(
    listener: &UnixListener,
    wake: &OwnedFd,
    stopped: &AtomicBool,
    connections: &Arc<Connections>,
    handler: &Arc<Handler>,
) {
    use rustix::event::{poll, PollFd, PollFlags};
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                tracing::error!(error = %e, "control socket poll failed; the control API stops");
                return;
            }
        }
        if stopped.load(Ordering::Acquire) {
            break;
        }
        let s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept");
                continue;
            }
        };
        if let Err(e) = s.set_nonblocking(false) {
            tracing::warn!(error = %e, "control connection: blocking mode");
            continue;
        }
        if let Err(e) = s
            .set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        {
            tracing::warn!(error = %e, "control connection: setting timeouts");
            continue;
        }
        let slot = match connections.admit(&s) {
            Ok(slot) => slot,
            Err(Refused::Full) => {
                tracing::warn!(
                    limit = MAX_CONNECTIONS,
                    "refusing a control connection: too many at once"
                );
                refuse(&s);
                continue;
            }
            Err(Refused::Io(e)) => {
                tracing::warn!(error = %e, "control connection");
                continue;
            }
        };
        let handler = handler.clone();
        let spawned = std::thread::Builder::new()
            .name("umdev-control-conn".into())
            .spawn(move || {
                serve_one(&handler, &s);
                drop(slot);
            });
        if let Err(e) = spawned {
            // The closure, with the stream and the slot, is dropped: the client sees EOF.
            tracing::warn!(error = %e, "cannot start a control connection's thread");
        }
    }
}

/// Answers a connection over the limit without reading its request (a reply before the
/// request is fine: the client writes, then reads one line).
fn refuse(s: &UnixStream) {
    let response = Response::Error {
        errno: rustix::io::Errno::AGAIN.raw_os_error(),
        message: format!(
            "umdevd is serving {MAX_CONNECTIONS} control connections already; try again"
        ),
    };
    if let Err(e) = write_response(s, &response) {
        tracing::debug!(error = %e, "control refusal not delivered");
    }
}

fn serve_one(handler: &Handler, s: &UnixStream) {
    let answer = match read_request(s) {
        Ok(Ok(req)) => {
            tracing::debug!(?req, "control request");
            handler.handle(req)
        }
        // Closed (or cut at stop) before a whole request: nobody to answer.
        Ok(Err(e)) if e.is_eof() => {
            tracing::debug!("control connection closed before its request");
            return;
        }
        Ok(Err(e)) => Response::Error {
            errno: rustix::io::Errno::INVAL.raw_os_error(),
            message: format!("malformed request: {e}"),
        }
        .into(),
        Err(e) => {
            tracing::debug!(error = %e, "control connection dropped");
            return;
        }
    };
    let fds: Vec<_> = answer.fds.iter().map(|f| f.as_fd()).collect();
    if let Err(e) = write_response_with_fds(s, &answer.response, &fds) {
        tracing::debug!(error = %e, "control reply not delivered");
    }
}
