//! An in-memory byte-stream transport: the same framing and fd semantics as the socket,
//! without a socket, so a server can be tested and fuzzed in one process.

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use umdev_proto::{Header, HEADER_SIZE};

use crate::{framed, Incoming, Message, RecvLimits, Transport, TransportError};

#[derive(Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    /// Fds attached to the stream: (stream position of the first byte of their message, fds).
    fds: VecDeque<(u64, Vec<OwnedFd>)>,
    /// Stream position of the next byte to be read.
    read_pos: u64,
    /// Stream position of the next byte to be written.
    write_pos: u64,
    closed: bool,
}

#[derive(Default)]
struct Channel {
    pipe: Mutex<Pipe>,
    ready: Condvar,
}

impl Channel {
    fn close(&self) {
        let mut p = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        p.closed = true;
        self.ready.notify_all();
    }
}

/// One end of an in-memory connection; make both ends with [`MemoryTransport::pair`].
pub struct MemoryTransport {
    inbound: Arc<Channel>,
    outbound: Arc<Channel>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport").finish_non_exhaustive()
    }
}

impl MemoryTransport {
    /// Two connected ends.
    pub fn pair() -> (MemoryTransport, MemoryTransport) {
        let a = Arc::new(Channel::default());
        let b = Arc::new(Channel::default());
        (
            MemoryTransport {
                inbound: a.clone(),
                outbound: b.clone(),
            },
            MemoryTransport {
                inbound: b,
                outbound: a,
            },
        )
    }

    fn push(&self, bytes: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        let owned = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<Result<Vec<_>, _>>()?;
        let mut p = self.outbound.pipe.lock().unwrap_or_else(|e| e.into_inner());
        if p.closed {
            return Err(TransportError::Closed);
        }
        if !owned.is_empty() {
            let pos = p.write_pos;
            p.fds.push_back((pos, owned));
        }
        for b in bytes {
            p.bytes.extend(b.iter());
            p.write_pos += b.len() as u64;
        }
        self.outbound.ready.notify_all();
        Ok(())
    }

    /// Takes exactly `buf.len()` bytes; `Ok(false)` if closed before the first byte.
    fn take(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<bool, TransportError> {
        let mut p = self.inbound.pipe.lock().unwrap_or_else(|e| e.into_inner());
        let mut got = 0;
        while got < buf.len() {
            while p.bytes.is_empty() && !p.closed {
                p = self
                    .inbound
                    .ready
                    .wait(p)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if p.bytes.is_empty() {
                if got == 0 {
                    return Ok(false);
                }
                return Err(TransportError::ClosedMidMessage {
                    got,
                    want: buf.len(),
                });
            }
            // Fds attached at or before the current position arrive with these bytes, as
            // ancillary data does on a socket.
            while p.fds.front().is_some_and(|(pos, _)| *pos <= p.read_pos) {
                if let Some((_, f)) = p.fds.pop_front() {
                    fds.extend(f);
                }
            }
            let n = (buf.len() - got).min(p.bytes.len());
            for (dst, src) in buf[got..got + n].iter_mut().zip(p.bytes.drain(..n)) {
                *dst = src;
            }
            p.read_pos += n as u64;
            got += n;
        }
        Ok(true)
    }
}

impl Transport for MemoryTransport {
    fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        self.push(&framed(header, parts)?, fds)
    }

    fn recv(&self, limits: RecvLimits) -> Result<Incoming, TransportError> {
        let mut fds = Vec::new();
        let mut hbuf = [0u8; HEADER_SIZE];
        if !self.take(&mut hbuf, &mut fds)? {
            return Err(TransportError::Closed);
        }
        let header = Header::parse(&hbuf).map_err(TransportError::Framing)?;
        let body_len = header.body_len();
        if body_len > limits.max_body {
            let mut left = body_len;
            let mut chunk = vec![0u8; left.min(64 * 1024)];
            while left > 0 {
                let n = left.min(chunk.len());
                if !self.take(&mut chunk[..n], &mut fds)? {
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
        if body_len > 0 && !self.take(&mut body, &mut fds)? {
            return Err(TransportError::ClosedMidMessage {
                got: HEADER_SIZE,
                want: header.msg_size as usize,
            });
        }
        Ok(Incoming::Message(Message { header, body, fds }))
    }

    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        self.push(&[bytes], fds)
    }

    fn wait_readable(&self, timeout: std::time::Duration) -> Result<bool, TransportError> {
        let p = self.inbound.pipe.lock().unwrap_or_else(|e| e.into_inner());
        let (p, _) = self
            .inbound
            .ready
            .wait_timeout_while(p, timeout, |p| p.bytes.is_empty() && !p.closed)
            .unwrap_or_else(|e| e.into_inner());
        Ok(!p.bytes.is_empty() || p.closed)
    }

    fn shutdown(&self) {
        self.inbound.close();
        self.outbound.close();
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        // The peer sees end-of-stream, as with a closed socket.
        self.outbound.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use umdev_proto::Command;

    const LIMITS: RecvLimits = RecvLimits { max_body: 4096 };

    #[test]
    fn messages_and_fds_cross_in_order() {
        let (a, b) = MemoryTransport::pair();
        let (s1, _s2) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(
            &Header::command(1, Command::DeviceGetInfo, 2).unwrap(),
            &[&[1, 2]],
            &[],
        )
        .unwrap();
        a.send(
            &Header::command(2, Command::DmaMap, 0).unwrap(),
            &[],
            &[s1.as_fd()],
        )
        .unwrap();
        let Incoming::Message(m1) = b.recv(LIMITS).unwrap() else {
            panic!()
        };
        let Incoming::Message(m2) = b.recv(LIMITS).unwrap() else {
            panic!()
        };
        assert_eq!((m1.body.as_slice(), m1.fds.len()), (&[1u8, 2][..], 0));
        assert_eq!((m2.header.msg_id, m2.fds.len()), (2, 1));
    }

    #[test]
    fn dropping_one_end_closes_the_other() {
        let (a, b) = MemoryTransport::pair();
        drop(a);
        assert!(matches!(b.recv(LIMITS), Err(TransportError::Closed)));
    }

    #[test]
    fn oversized_is_drained() {
        let (a, b) = MemoryTransport::pair();
        a.send(
            &Header::command(1, Command::RegionWrite, 5000).unwrap(),
            &[&[0u8; 5000]],
            &[],
        )
        .unwrap();
        a.send(
            &Header::command(2, Command::DeviceReset, 0).unwrap(),
            &[],
            &[],
        )
        .unwrap();
        assert!(matches!(
            b.recv(LIMITS).unwrap(),
            Incoming::Oversized { .. }
        ));
        assert!(matches!(b.recv(LIMITS).unwrap(), Incoming::Message(m) if m.header.msg_id == 2));
    }
}
