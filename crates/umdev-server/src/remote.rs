//! Server-to-client requests: DMA_READ and DMA_WRITE for mappings that came without an fd.
//!
//! One thread reads the socket: the session thread. A device asks for message-based DMA
//! from a thread of its own (its work context): the request is sent and the thread waits
//! (with a deadline) for the session thread to hand it the reply.
//!
//! Asked from the session thread itself (inside a device hook, in the middle of a client
//! request), it is refused with EDEADLK: QEMU serves DMA messages from the loop that is
//! waiting for the reply to that request, so the two would wait for each other until
//! QEMU's timeout drops the connection. The device must use its work context instead.
//!
//! While the session thread waits for the device's work (before an unmap reply, a
//! migration stop, a close), it pumps: it reads what the client sends, hands replies to the
//! waiting threads and keeps commands for after the current one, in order (the spec lets
//! unrelated messages interleave).

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use rustix::io::Errno;
use umdev_dma::{DmaError, RemoteDma};
use umdev_proto::{wire, Command, Header};
use umdev_transport::{Incoming, Message, RecvLimits, Transport, TransportError};
use zerocopy::IntoBytes;

/// Most commands read while waiting for device work that wait to be handled.
const MAX_DEFERRED: usize = 64;

/// Messages read and not handled, as bytes with their fds (`(start, end, fds)` by position).
pub(crate) struct Unread {
    pub(crate) bytes: Vec<u8>,
    pub(crate) marks: Vec<(u64, u64, Vec<OwnedFd>)>,
}

/// The server side of server-to-client requests for one session.
pub(crate) struct RemoteChannel {
    transport: Arc<dyn Transport>,
    session_thread: ThreadId,
    pending: Mutex<HashMap<u16, mpsc::Sender<Message>>>,
    /// What the session thread read while it waited for device work: commands to handle
    /// next, or the end of the connection.
    deferred: Mutex<VecDeque<Result<Incoming, TransportError>>>,
    next_id: AtomicU16,
    client_max_xfer: AtomicU32,
    limits: RecvLimits,
    closed: AtomicBool,
    timeout: Duration,
    /// The device's counters (DMA message bytes).
    pub(crate) stats: std::sync::OnceLock<Arc<crate::stats::Stats>>,
}

impl RemoteChannel {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        limits: RecvLimits,
        timeout: Duration,
    ) -> RemoteChannel {
        RemoteChannel {
            transport,
            session_thread: std::thread::current().id(),
            pending: Mutex::new(HashMap::new()),
            deferred: Mutex::new(VecDeque::new()),
            next_id: AtomicU16::new(0),
            client_max_xfer: AtomicU32::new(umdev_proto::DEFAULT_MAX_DATA_XFER_SIZE),
            limits,
            closed: AtomicBool::new(false),
            timeout,
            stats: std::sync::OnceLock::new(),
        }
    }

    /// Records the client's `max_data_xfer_size`: the most one DMA message may carry.
    pub(crate) fn set_client_max_xfer(&self, n: u32) {
        self.client_max_xfer.store(n.max(1), Ordering::Relaxed);
    }

    /// A command (or the connection's end) read while waiting, to be handled next.
    pub(crate) fn take_deferred(&self) -> Option<Result<Incoming, TransportError>> {
        self.deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// The commands read while waiting and not handled yet, as the bytes they came as and
    /// duplicates of their fds (`(start, end, fds)` by position in the bytes): what a live
    /// upgrade puts before the connection's unread bytes. They stay queued here too.
    /// `None` if something else is queued (an oversized message, the connection's end).
    pub(crate) fn deferred_bytes(&self) -> Option<Unread> {
        let deferred = self.deferred.lock().unwrap_or_else(|e| e.into_inner());
        let mut bytes = Vec::new();
        let mut marks = Vec::new();
        for d in deferred.iter() {
            let Ok(Incoming::Message(m)) = d else {
                return None;
            };
            let start = bytes.len() as u64;
            bytes.extend_from_slice(m.header.as_bytes());
            bytes.extend_from_slice(&m.body);
            if !m.fds.is_empty() {
                let fds = m
                    .fds
                    .iter()
                    .map(|f| f.try_clone().ok())
                    .collect::<Option<Vec<_>>>()?;
                marks.push((start, bytes.len() as u64, fds));
            }
        }
        Some(Unread { bytes, marks })
    }

    /// Whether commands read while waiting are still to be handled.
    pub(crate) fn has_deferred(&self) -> bool {
        !self
            .deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Hands a reply read by the session thread to the thread waiting for it.
    pub(crate) fn dispatch_reply(&self, m: Message) {
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&m.header.msg_id);
        match tx {
            Some(tx) => {
                let _ = tx.send(m);
            }
            None => tracing::warn!(
                msg_id = m.header.msg_id,
                command = m.header.command,
                "dropping a reply that answers no request of ours"
            ),
        }
    }

    /// Fails every waiter; later requests fail at once.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn exchange(
        &self,
        command: Command,
        parts: &[&[u8]],
        iova: u64,
        len: u64,
    ) -> Result<Message, DmaError> {
        let fail = |errno: Errno| DmaError::Remote { iova, len, errno };
        if self.closed.load(Ordering::Acquire) {
            return Err(fail(Errno::NOTCONN));
        }
        if std::thread::current().id() == self.session_thread {
            tracing::error!(
                ?command,
                iova,
                len,
                "refused message-based DMA from a device hook on the session thread: \
                 the client would wait for this thread while it waits for the client; \
                 do DMA on the device's work context (DeviceContext::work)"
            );
            return Err(fail(Errno::DEADLK));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let header = Header::command(id, command, body).map_err(|_| fail(Errno::TOOBIG))?;
        let (tx, rx) = mpsc::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if let Err(e) = self.transport.send(&header, parts, &[]) {
            tracing::warn!(error = %e, "sending {command:?} to the client failed");
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(fail(Errno::NOTCONN));
        }
        let reply = rx.recv_timeout(self.timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                fail(Errno::TIMEDOUT)
            }
            mpsc::RecvTimeoutError::Disconnected => fail(Errno::NOTCONN),
        })?;
        if let Some(errno) = reply.header.error() {
            // The spec lets an error reply carry errno 0; it is still a failure. Values
            // outside the errno range are a peer's nonsense: they fail as EIO too.
            let errno = if (1..4096).contains(&errno) {
                Errno::from_raw_os_error(errno)
            } else {
                Errno::IO
            };
            return Err(fail(errno));
        }
        if reply.header.command != command as u16 {
            return Err(fail(Errno::PROTO));
        }
        Ok(reply)
    }

    /// On the session thread, while it waits for the device's work: reads for at most
    /// `timeout`, hands replies to the threads waiting for them and keeps commands for
    /// later. A connection that fails here is left for the session loop to notice (it reads
    /// the same end of stream next).
    pub(crate) fn pump(&self, timeout: Duration) {
        if std::thread::current().id() != self.session_thread || self.closed.load(Ordering::Acquire)
        {
            std::thread::sleep(timeout);
            return;
        }
        if self
            .deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
            >= MAX_DEFERRED
        {
            // A client that floods commands while the device's work drains waits for them
            // to be handled: its socket, not the server's memory, holds the rest.
            std::thread::sleep(timeout);
            return;
        }
        match self.transport.wait_readable(timeout) {
            Ok(true) => {}
            Ok(false) => return,
            Err(_) => {
                std::thread::sleep(timeout);
                return;
            }
        }
        match self.transport.recv(self.limits) {
            Ok(Incoming::Message(m)) if m.header.is_reply() => self.dispatch_reply(m),
            // A live upgrade's wake: nothing was read; the session loop sees it next.
            Err(TransportError::Interrupted) => std::thread::sleep(timeout),
            other => {
                if let Err(e) = &other {
                    // Waiters fail now; the session loop ends when it takes this.
                    tracing::debug!(error = %e, "client connection ended while waiting for device work");
                    self.close();
                }
                self.deferred
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back(other);
            }
        }
    }
}

impl RemoteDma for RemoteChannel {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let req = wire::DmaAccess {
            address: iova,
            count: len,
        };
        let reply = self.exchange(Command::DmaRead, &[req.as_bytes()], iova, len)?;
        let bad = || DmaError::Remote {
            iova,
            len,
            errno: Errno::PROTO,
        };
        let (got, data) =
            wire::split::<wire::DmaAccess>(&reply.body, "DMA_READ reply").map_err(|_| bad())?;
        if got.count != len || data.len() < buf.len() {
            return Err(bad());
        }
        buf.copy_from_slice(&data[..buf.len()]);
        if let Some(st) = self.stats.get() {
            st.dma_message(false, len);
        }
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let len = u64::try_from(data.len()).unwrap_or(u64::MAX);
        let req = wire::DmaAccess {
            address: iova,
            count: len,
        };
        self.exchange(Command::DmaWrite, &[req.as_bytes(), data], iova, len)?;
        if let Some(st) = self.stats.get() {
            st.dma_message(true, len);
        }
        Ok(())
    }

    fn max_transfer(&self) -> usize {
        self.client_max_xfer.load(Ordering::Relaxed) as usize
    }
}
