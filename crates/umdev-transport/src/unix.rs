//! UNIX stream socket transport with `SCM_RIGHTS` fd passing.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown,
};
use umdev_proto::{Header, HEADER_SIZE};

use crate::{framed, Incoming, Message, RecvLimits, Transport, TransportError, MAX_WIRE_FDS};

const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_WIRE_FDS));
const DRAIN_CHUNK: usize = 64 * 1024;

/// Size of the receive buffer: most messages fit whole, so one `recvmsg` reads one (or
/// several pipelined) messages instead of one for the header and one for the body.
const RX_BUF: usize = 64 * 1024;

/// Fds that arrived with the bytes at stream positions `start..end`.
///
/// Linux delivers a sender's fds with the first segment of the `sendmsg` that carried them,
/// and a `recvmsg` stops right after a segment with fds. So if every message is sent with
/// one `sendmsg` (as every known client does), the fds belong to the *last message that
/// starts* in `start..end`: the message starting in that range whose end reaches `end`.
struct FdMark {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

struct Rx {
    buf: Box<[u8]>,
    /// Unparsed bytes are `buf[head..tail]`.
    head: usize,
    tail: usize,
    /// Stream position of `buf[head]`.
    pos: u64,
    marks: std::collections::VecDeque<FdMark>,
}

impl Rx {
    fn available(&self) -> usize {
        self.tail - self.head
    }

    fn consume(&mut self, n: usize) {
        self.head += n;
        self.pos += n as u64;
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Fds of the message at stream positions `start..start+len`; stale marks are dropped.
    fn take_fds(&mut self, start: u64, len: u64) -> Vec<OwnedFd> {
        let end = start.saturating_add(len);
        let mut out = Vec::new();
        while let Some(m) = self.marks.front() {
            if m.end <= start {
                // Bytes of an earlier message came with fds that matched none: close them.
                self.marks.pop_front();
                continue;
            }
            if m.start <= start && start < m.end && end >= m.end {
                if let Some(m) = self.marks.pop_front() {
                    out.extend(m.fds);
                }
                continue;
            }
            break;
        }
        out
    }
}

/// A vfio-user connection over a connected `AF_UNIX` stream socket.
pub struct UnixTransport {
    stream: UnixStream,
    send_lock: Mutex<()>,
    rx: Mutex<Rx>,
    spin: Duration,
    wake: Option<Arc<OwnedFd>>,
}

/// A connection taken out of a transport so that another process can go on with it: the
/// socket, and the bytes (and fds) already read from it that no message consumed yet.
#[derive(Debug)]
pub struct Detached {
    /// A duplicate of the connected socket.
    pub stream: UnixStream,
    /// Bytes read but not consumed (the start of the next message, if any).
    pub pending: Vec<u8>,
    /// Fds that came with those bytes: `(start, end, fds)`, positions in `pending`.
    pub fds: Vec<(u64, u64, Vec<OwnedFd>)>,
}

impl std::fmt::Debug for UnixTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnixTransport")
            .field("stream", &self.stream)
            .field("spin", &self.spin)
            .finish_non_exhaustive()
    }
}

impl UnixTransport {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        UnixTransport {
            stream,
            send_lock: Mutex::new(()),
            rx: Mutex::new(Rx {
                buf: vec![0u8; RX_BUF].into_boxed_slice(),
                head: 0,
                tail: 0,
                pos: 0,
                marks: std::collections::VecDeque::new(),
            }),
            spin: Duration::ZERO,
            wake: None,
        }
    }

    /// Goes on with a connection another transport let go of ([`detach`](Self::detach)),
    /// reading what it had buffered first.
    pub fn resume(d: Detached) -> Self {
        let t = UnixTransport::new(d.stream);
        {
            let mut rx = t.rx.lock().unwrap_or_else(|e| e.into_inner());
            // Whole messages may be pending (read while the old reader waited): the buffer
            // takes them all.
            if d.pending.len() > rx.buf.len() {
                rx.buf = vec![0u8; d.pending.len()].into_boxed_slice();
            }
            let n = d.pending.len();
            rx.buf[..n].copy_from_slice(&d.pending);
            rx.tail = n;
            rx.marks = d
                .fds
                .into_iter()
                .map(|(start, end, fds)| FdMark { start, end, fds })
                .collect();
        }
        t
    }

    /// A waiting `recv` returns [`TransportError::Interrupted`] while `wake` (an eventfd)
    /// is readable, if no byte of the next message has arrived: a server pauses a session
    /// between messages this way, without touching the connection.
    pub fn with_wake(mut self, wake: Arc<OwnedFd>) -> Self {
        self.wake = Some(wake);
        self
    }

    /// The connection and what was read of it but not consumed, for another process to go
    /// on with ([`resume`](Self::resume)). This transport stays usable: nothing is taken
    /// from it (the socket and fds are duplicates).
    fn detach_rx(&self) -> std::io::Result<Detached> {
        let rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        let pending = rx.buf[rx.head..rx.tail].to_vec();
        let mut fds = Vec::with_capacity(rx.marks.len());
        for m in &rx.marks {
            let dups = m
                .fds
                .iter()
                .map(|f| f.try_clone())
                .collect::<std::io::Result<Vec<_>>>()?;
            fds.push((
                m.start.saturating_sub(rx.pos),
                m.end.saturating_sub(rx.pos),
                dups,
            ));
        }
        Ok(Detached {
            stream: self.stream.try_clone()?,
            pending,
            fds,
        })
    }

    /// Connects to a listening socket.
    pub fn connect(path: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        Ok(UnixTransport::new(UnixStream::connect(path)?))
    }

    /// Before sleeping in `recv`, poll the socket without blocking for up to `spin`.
    ///
    /// On machines where waking a thread on another CPU costs tens of microseconds, a
    /// short poll lets a request that follows quickly skip the wake-up. Zero disables it.
    pub fn with_spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn sendmsg_all(&self, slices: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        if fds.len() > MAX_WIRE_FDS {
            return Err(TransportError::Io(Errno::TOOBIG.into()));
        }
        let _guard = self.send_lock.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let mut sent = 0usize;
        let mut first = true;
        while sent < total || first {
            // Rebuild the slice list past what was already sent.
            let mut skip = sent;
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(slices.len());
            for s in slices {
                if skip >= s.len() {
                    skip -= s.len();
                    continue;
                }
                iov.push(IoSlice::new(&s[skip..]));
                skip = 0;
            }
            let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
            let mut cmsg = SendAncillaryBuffer::new(&mut space);
            // Fds travel with the first bytes of the message only.
            if first && !fds.is_empty() {
                cmsg.push(SendAncillaryMessage::ScmRights(fds));
            }
            let n = match sendmsg(&self.stream, &iov, &mut cmsg, SendFlags::NOSIGNAL) {
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(Errno::PIPE) | Err(Errno::CONNRESET) => return Err(TransportError::Closed),
                Err(e) => return Err(TransportError::Io(e.into())),
            };
            first = false;
            sent += n;
            if total == 0 {
                break;
            }
        }
        Ok(())
    }

    /// One `recvmsg` into `dst`, recording any fds against stream positions from `pos`.
    /// Returns the byte count (0 at end of stream).
    fn recv_some(
        &self,
        dst: &mut [u8],
        pos: u64,
        marks: &mut std::collections::VecDeque<FdMark>,
        spin: bool,
    ) -> Result<usize, TransportError> {
        let deadline = (spin && !self.spin.is_zero()).then(|| Instant::now() + self.spin);
        // Only between messages (`spin` is set for a message's first bytes): a woken
        // reader leaves a message it has started to the next reader whole.
        let wake = self.wake.as_deref().filter(|_| spin);
        loop {
            let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(dst)];
            let spinning = deadline.is_some_and(|d| Instant::now() < d);
            // With a wake fd the socket is only read when it has data, so a wake can end
            // the wait: a failed non-blocking read, then a poll of both.
            let nonblock = spinning || wake.is_some();
            let mut flags = RecvFlags::CMSG_CLOEXEC;
            if nonblock {
                flags |= RecvFlags::DONTWAIT;
            }
            let r = match recvmsg(&self.stream, &mut iov, &mut cmsg, flags) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) if spinning => {
                    // Yield rather than burn: a client on the same CPU needs it to send.
                    std::thread::yield_now();
                    continue;
                }
                Err(Errno::AGAIN) if nonblock => {
                    if let Some(wake) = wake {
                        if self.wait_or_woken(wake)? {
                            return Err(TransportError::Interrupted);
                        }
                    }
                    continue;
                }
                Err(Errno::CONNRESET) => return Ok(0),
                Err(e) => return Err(TransportError::Io(e.into())),
            };
            let mut fds = Vec::new();
            for m in cmsg.drain() {
                if let RecvAncillaryMessage::ScmRights(rights) = m {
                    fds.extend(rights);
                }
            }
            if r.flags.contains(ReturnFlags::CTRUNC) {
                return Err(TransportError::Io(std::io::Error::other(
                    "ancillary data truncated: peer sent more fds than SCM_MAX_FD",
                )));
            }
            if !fds.is_empty() {
                marks.push_back(FdMark {
                    start: pos,
                    end: pos + r.bytes as u64,
                    fds,
                });
            }
            return Ok(r.bytes);
        }
    }

    /// Waits until the socket is readable (`false`) or `wake` is (`true`).
    fn wait_or_woken(&self, wake: &OwnedFd) -> Result<bool, TransportError> {
        use rustix::event::{poll, PollFd, PollFlags};
        loop {
            let mut fds = [
                PollFd::new(&self.stream, PollFlags::IN),
                PollFd::new(wake, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => return Err(TransportError::Io(e.into())),
            }
            if !fds[1].revents().is_empty() {
                return Ok(true);
            }
            return Ok(false);
        }
    }

    /// Buffers at least `n` bytes (n <= RX_BUF). `Ok(false)` at end of stream with
    /// nothing buffered.
    fn fill(&self, rx: &mut Rx, n: usize, spin: bool) -> Result<bool, TransportError> {
        while rx.available() < n {
            if rx.buf.len() - rx.tail < n - rx.available() {
                rx.buf.copy_within(rx.head..rx.tail, 0);
                rx.tail -= rx.head;
                rx.head = 0;
            }
            let pos = rx.pos + rx.available() as u64;
            let tail = rx.tail;
            let Rx { buf, marks, .. } = rx;
            let got = self.recv_some(&mut buf[tail..], pos, marks, spin)?;
            if got == 0 {
                if rx.available() == 0 {
                    return Ok(false);
                }
                return Err(TransportError::ClosedMidMessage {
                    got: rx.available(),
                    want: n,
                });
            }
            rx.tail += got;
        }
        Ok(true)
    }

    /// Moves the next `dst.len()` stream bytes into `dst`: first what is buffered, then
    /// straight from the socket (large bodies skip the buffer).
    fn read_into(&self, rx: &mut Rx, dst: &mut [u8]) -> Result<(), TransportError> {
        let from_buf = rx.available().min(dst.len());
        dst[..from_buf].copy_from_slice(&rx.buf[rx.head..rx.head + from_buf]);
        rx.consume(from_buf);
        let mut got = from_buf;
        while got < dst.len() {
            let pos = rx.pos;
            let n = self.recv_some(&mut dst[got..], pos, &mut rx.marks, false)?;
            if n == 0 {
                return Err(TransportError::ClosedMidMessage {
                    got,
                    want: dst.len(),
                });
            }
            rx.pos += n as u64;
            got += n;
        }
        Ok(())
    }
}

impl Transport for UnixTransport {
    fn detach(&self) -> std::io::Result<Detached> {
        self.detach_rx()
    }

    fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        self.sendmsg_all(&framed(header, parts)?, fds)
    }

    fn recv(&self, limits: RecvLimits) -> Result<Incoming, TransportError> {
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        if !self.fill(&mut rx, HEADER_SIZE, true)? {
            return Err(TransportError::Closed);
        }
        let mut hbuf = [0u8; HEADER_SIZE];
        hbuf.copy_from_slice(&rx.buf[rx.head..rx.head + HEADER_SIZE]);
        let header = Header::parse(&hbuf).map_err(TransportError::Framing)?;
        let start = rx.pos;
        rx.consume(HEADER_SIZE);
        let body_len = header.body_len();
        if body_len > limits.max_body {
            // Keep framing: read the body away in bounded chunks, then report it.
            let mut chunk = vec![0u8; DRAIN_CHUNK.min(body_len)];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(chunk.len());
                self.read_into(&mut rx, &mut chunk[..n])?;
                left -= n;
            }
            drop(rx.take_fds(start, u64::from(header.msg_size)));
            return Ok(Incoming::Oversized { header });
        }
        let mut body = vec![0u8; body_len];
        if body_len > 0 {
            if body_len <= RX_BUF - HEADER_SIZE {
                // Small bodies usually arrived with the header: one syscall per message.
                if !self.fill(&mut rx, body_len, false)? {
                    return Err(TransportError::ClosedMidMessage {
                        got: HEADER_SIZE,
                        want: header.msg_size as usize,
                    });
                }
            }
            self.read_into(&mut rx, &mut body)?;
        }
        let fds = rx.take_fds(start, u64::from(header.msg_size));
        Ok(Incoming::Message(Message { header, body, fds }))
    }

    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        self.sendmsg_all(&[bytes], fds)
    }

    fn wait_readable(&self, timeout: Duration) -> Result<bool, TransportError> {
        if self
            .rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .available()
            > 0
        {
            return Ok(true);
        }
        let ts = rustix::fs::Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut fds = [rustix::event::PollFd::new(
            &self.stream,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) => Ok(n > 0),
            Err(Errno::INTR) => Ok(false),
            Err(e) => Err(TransportError::Io(e.into())),
        }
    }

    fn shutdown(&self) {
        let _ = rustix::net::shutdown(self.stream.as_fd(), Shutdown::Both);
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test patterns wrap on purpose
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use umdev_proto::Command;
    use zerocopy::IntoBytes;

    fn limits() -> RecvLimits {
        RecvLimits { max_body: 1 << 20 }
    }

    #[test]
    fn a_detached_connection_goes_on_with_what_was_buffered_and_its_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let (p1, _p2) = UnixStream::pair().unwrap();
        let h1 = Header::command(1, Command::DeviceGetInfo, 4).unwrap();
        let h2 = Header::command(2, Command::DmaMap, 8).unwrap();
        // Both arrive in one read: the second, with its fd, stays buffered.
        a.send_raw(
            &[h1.as_bytes(), &[1u8; 4], h2.as_bytes(), &[2u8; 8]].concat(),
            &[p1.as_fd()],
        )
        .unwrap();
        let Incoming::Message(m) = b.recv(limits()).unwrap() else {
            panic!("no message")
        };
        assert_eq!(m.header, h1);
        let d = b.detach().unwrap();
        assert_eq!(d.pending.len(), 16 + 8);
        drop(b);
        let c = UnixTransport::resume(d);
        let Incoming::Message(m) = c.recv(limits()).unwrap() else {
            panic!("no message")
        };
        assert_eq!((m.header, m.body, m.fds.len()), (h2, vec![2u8; 8], 1));
        // And the connection itself is the same: what comes next arrives there.
        a.send(&h1, &[&[3u8; 4]], &[]).unwrap();
        assert!(matches!(c.recv(limits()).unwrap(), Incoming::Message(m) if m.body == [3u8; 4]));
    }

    #[test]
    fn a_wake_interrupts_a_reader_between_messages_only() {
        use rustix::event::{eventfd, EventfdFlags};
        let (a, b) = UnixStream::pair().unwrap();
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap());
        let (a, b) = (
            UnixTransport::new(a),
            UnixTransport::new(b).with_wake(wake.clone()),
        );
        let reader = std::thread::spawn(move || (b.recv(limits()).map(|_| ()), b));
        std::thread::sleep(std::time::Duration::from_millis(20));
        rustix::io::write(&*wake, &1u64.to_ne_bytes()).unwrap();
        let (r, b) = reader.join().unwrap();
        assert!(matches!(r, Err(TransportError::Interrupted)));
        // A message already there is read whole even while the wake is set.
        let h = Header::command(5, Command::DeviceGetInfo, 4).unwrap();
        a.send(&h, &[&[9u8; 4]], &[]).unwrap();
        assert!(matches!(b.recv(limits()).unwrap(), Incoming::Message(m) if m.header == h));
    }

    #[test]
    fn message_with_fds_arrives_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let (p1, _p2) = UnixStream::pair().unwrap();
        let h = Header::command(3, Command::DmaMap, 32).unwrap();
        a.send(&h, &[&[7u8; 32]], &[p1.as_fd()]).unwrap();
        match b.recv(limits()).unwrap() {
            Incoming::Message(m) => {
                assert_eq!(m.header, h);
                assert_eq!(m.body, vec![7u8; 32]);
                assert_eq!(m.fds.len(), 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fds_stay_with_their_message_when_pipelined() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let (p1, _p2) = UnixStream::pair().unwrap();
        let h1 = Header::command(1, Command::DeviceGetInfo, 16).unwrap();
        let h2 = Header::command(2, Command::DmaMap, 32).unwrap();
        a.send(&h1, &[&[0u8; 16]], &[]).unwrap();
        a.send(&h2, &[&[0u8; 32]], &[p1.as_fd(), p1.as_fd()])
            .unwrap();
        let Incoming::Message(m1) = b.recv(limits()).unwrap() else {
            panic!()
        };
        let Incoming::Message(m2) = b.recv(limits()).unwrap() else {
            panic!()
        };
        assert_eq!((m1.header.msg_id, m1.fds.len()), (1, 0));
        assert_eq!((m2.header.msg_id, m2.fds.len()), (2, 2));
    }

    #[test]
    fn oversized_message_is_drained_and_framing_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let big = vec![1u8; 200_000];
        let h = Header::command(5, Command::RegionWrite, big.len()).unwrap();
        let h2 = Header::command(6, Command::DeviceReset, 0).unwrap();
        let t = std::thread::spawn(move || {
            a.send(&h, &[&big], &[]).unwrap();
            a.send(&h2, &[], &[]).unwrap();
            a
        });
        let small = RecvLimits { max_body: 1024 };
        assert!(
            matches!(b.recv(small).unwrap(), Incoming::Oversized { header } if header.msg_id == 5)
        );
        assert!(matches!(b.recv(small).unwrap(), Incoming::Message(m) if m.header.msg_id == 6));
        t.join().unwrap();
    }

    #[test]
    fn fds_of_a_later_message_read_in_the_same_chunk_are_not_given_to_the_earlier_one() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let (p1, _p2) = UnixStream::pair().unwrap();
        // Three messages queued before the reader looks: none, one fd, none.
        for (id, n) in [(1u16, 0usize), (2, 1), (3, 0)] {
            let h = Header::command(id, Command::DmaMap, 32).unwrap();
            let fds: Vec<_> = std::iter::repeat_n(p1.as_fd(), n).collect();
            a.send(&h, &[&[0u8; 32]], &fds).unwrap();
        }
        let got: Vec<(u16, usize)> = (0..3)
            .map(|_| match b.recv(limits()).unwrap() {
                Incoming::Message(m) => (m.header.msg_id, m.fds.len()),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, vec![(1, 0), (2, 1), (3, 0)]);
    }

    #[test]
    fn a_body_larger_than_the_buffer_arrives_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let h = Header::command(9, Command::RegionWrite, big.len()).unwrap();
        let want = big.clone();
        let t = std::thread::spawn(move || a.send(&h, &[&big], &[]).unwrap());
        match b.recv(limits()).unwrap() {
            Incoming::Message(m) => assert_eq!(m.body, want),
            other => panic!("{other:?}"),
        }
        t.join().unwrap();
    }

    #[test]
    fn size_below_header_is_a_framing_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let mut h = Header::command(1, Command::Version, 0).unwrap();
        h.msg_size = 8;
        a.send_raw(h.as_bytes(), &[]).unwrap();
        assert!(matches!(b.recv(limits()), Err(TransportError::Framing(_))));
    }

    #[test]
    fn close_between_messages_and_mid_message_are_told_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        let b = UnixTransport::new(b);
        drop(a);
        assert!(matches!(b.recv(limits()), Err(TransportError::Closed)));

        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (UnixTransport::new(a), UnixTransport::new(b));
        let h = Header::command(1, Command::RegionWrite, 100).unwrap();
        a.send_raw(h.as_bytes(), &[]).unwrap();
        drop(a);
        assert!(matches!(
            b.recv(limits()),
            Err(TransportError::ClosedMidMessage { .. })
        ));
    }

    #[test]
    fn shutdown_wakes_a_blocked_reader() {
        let (_a, b) = UnixStream::pair().unwrap();
        let b = std::sync::Arc::new(UnixTransport::new(b));
        let b2 = b.clone();
        let t = std::thread::spawn(move || b2.recv(limits()));
        std::thread::sleep(Duration::from_millis(50));
        b.shutdown();
        assert!(matches!(t.join().unwrap(), Err(TransportError::Closed)));
    }

    #[test]
    fn send_refuses_a_header_that_lies_about_its_size() {
        let (a, _b) = UnixStream::pair().unwrap();
        let a = UnixTransport::new(a);
        let h = Header::command(1, Command::RegionWrite, 10).unwrap();
        assert!(a.send(&h, &[&[0u8; 4]], &[]).is_err());
    }
}
