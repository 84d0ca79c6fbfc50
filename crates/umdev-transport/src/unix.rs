//! UNIX stream socket transport with `SCM_RIGHTS` fd passing.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, Shutdown,
};
use umdev_proto::{Header, HEADER_SIZE};
use zerocopy::IntoBytes;

use crate::{check_size, Incoming, Message, RecvLimits, Transport, TransportError, MAX_WIRE_FDS};

const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_WIRE_FDS));
const DRAIN_CHUNK: usize = 64 * 1024;

/// A vfio-user connection over a connected `AF_UNIX` stream socket.
#[derive(Debug)]
pub struct UnixTransport {
    stream: UnixStream,
    send_lock: Mutex<()>,
    spin: Duration,
}

impl UnixTransport {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        UnixTransport {
            stream,
            send_lock: Mutex::new(()),
            spin: Duration::ZERO,
        }
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
            if first && !fds.is_empty() {
                if fds.len() > MAX_WIRE_FDS {
                    return Err(TransportError::Io(Errno::TOOBIG.into()));
                }
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

    /// Reads exactly `buf.len()` bytes, collecting any fds that come with them.
    /// Returns `Ok(false)` if the peer closed before the first byte.
    fn recv_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        spin: bool,
    ) -> Result<bool, TransportError> {
        let mut got = 0;
        let deadline = (spin && !self.spin.is_zero()).then(|| Instant::now() + self.spin);
        while got < buf.len() {
            let mut space = vec![MaybeUninit::<u8>::uninit(); CMSG_SPACE];
            let mut cmsg = RecvAncillaryBuffer::new(&mut space);
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let nonblock = got == 0 && deadline.is_some_and(|d| Instant::now() < d);
            let mut flags = RecvFlags::CMSG_CLOEXEC;
            if nonblock {
                flags |= RecvFlags::DONTWAIT;
            }
            let r = match recvmsg(&self.stream, &mut iov, &mut cmsg, flags) {
                Ok(r) => r,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) if nonblock => {
                    std::hint::spin_loop();
                    continue;
                }
                Err(Errno::CONNRESET) => return Err(TransportError::Closed),
                Err(e) => return Err(TransportError::Io(e.into())),
            };
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
            if r.bytes == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(TransportError::ClosedMidMessage {
                    got,
                    want: buf.len(),
                });
            }
            got += r.bytes;
        }
        Ok(true)
    }
}

impl Transport for UnixTransport {
    fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        check_size(header, parts)?;
        let mut slices: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
        slices.push(header.as_bytes());
        slices.extend_from_slice(parts);
        self.sendmsg_all(&slices, fds)
    }

    fn recv(&self, limits: RecvLimits) -> Result<Incoming, TransportError> {
        let mut fds = Vec::new();
        let mut hbuf = [0u8; HEADER_SIZE];
        if !self.recv_exact(&mut hbuf, &mut fds, true)? {
            return Err(TransportError::Closed);
        }
        let header = Header::parse(&hbuf).map_err(TransportError::Framing)?;
        let body_len = header.body_len();
        if body_len > limits.max_body {
            // Keep framing: read the body away in bounded chunks, then report it.
            let mut left = body_len;
            let mut chunk = vec![0u8; DRAIN_CHUNK.min(left)];
            while left > 0 {
                let n = left.min(chunk.len());
                if !self.recv_exact(&mut chunk[..n], &mut fds, false)? {
                    return Err(TransportError::ClosedMidMessage {
                        got: body_len - left,
                        want: body_len,
                    });
                }
                left -= n;
            }
            return Ok(Incoming::Oversized { header });
        }
        let mut body = vec![0u8; body_len];
        if body_len > 0 && !self.recv_exact(&mut body, &mut fds, false)? {
            return Err(TransportError::ClosedMidMessage {
                got: HEADER_SIZE,
                want: header.msg_size as usize,
            });
        }
        Ok(Incoming::Message(Message { header, body, fds }))
    }

    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        self.sendmsg_all(&[bytes], fds)
    }

    fn shutdown(&self) {
        let _ = rustix::net::shutdown(self.stream.as_fd(), Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use umdev_proto::Command;

    fn limits() -> RecvLimits {
        RecvLimits { max_body: 1 << 20 }
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
