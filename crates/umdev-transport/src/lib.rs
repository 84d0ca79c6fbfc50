//! Transports for vfio-user messages: a UNIX stream socket passing fds with `SCM_RIGHTS`,
//! and an in-memory byte stream with the same semantics for tests and fuzzing.
//!
//! A transport moves whole messages. It reads the header first, checks the announced size
//! against the receiver's limit, then reads exactly the body, so that the fds a peer attached
//! to one message are never confused with the next one's. A message larger than the limit is
//! read and thrown away (framing is kept) and reported as [`Incoming::Oversized`], so the
//! server can answer it with an error instead of dropping the connection.
//!
//! ```
//! use umdev_proto::{Command, Header};
//! use umdev_transport::{Incoming, MemoryTransport, RecvLimits, Transport};
//!
//! let (client, server) = MemoryTransport::pair();
//! let h = Header::command(9, Command::DeviceReset, 0).unwrap();
//! client.send(&h, &[], &[]).unwrap();
//! match server.recv(RecvLimits { max_body: 4096 }).unwrap() {
//!     Incoming::Message(m) => assert_eq!(m.header.msg_id, 9),
//!     Incoming::Oversized { .. } => unreachable!(),
//! }
//! ```
#![warn(missing_docs)]

pub mod listen;
mod memory;
mod unix;

use std::os::fd::{BorrowedFd, OwnedFd};

pub use listen::{PolicyOverride, SocketPolicy, Stale};
pub use memory::MemoryTransport;
use umdev_proto::{Header, ProtoError};
pub use unix::{Detached, UnixTransport};

/// Most fds one message may carry on the wire (the kernel's `SCM_MAX_FD`); the receiver
/// makes room for this many so that none is silently closed, then applies its own limit.
pub const MAX_WIRE_FDS: usize = 253;

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// The header, already checked for framing.
    pub header: Header,
    /// Exactly `header.body_len()` bytes.
    pub body: Vec<u8>,
    /// Fds that arrived with the message.
    pub fds: Vec<OwnedFd>,
}

/// What [`Transport::recv`] got.
#[derive(Debug)]
pub enum Incoming {
    /// A whole message within the limit.
    Message(Message),
    /// A message whose body exceeded the limit; its bytes were discarded, framing is intact.
    Oversized {
        /// Its header.
        header: Header,
    },
}

/// Limits the receiver applies before reading a body.
#[derive(Clone, Copy, Debug)]
pub struct RecvLimits {
    /// Largest body to keep; larger ones are drained and reported as oversized.
    pub max_body: usize,
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer closed the connection between messages.
    #[error("peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("peer closed the connection after {got} of {want} bytes of a message")]
    ClosedMidMessage {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// The header could not be framed.
    #[error("framing lost")]
    Framing(#[source] ProtoError),
    /// An I/O error on the underlying channel.
    #[error("transport I/O failed")]
    Io(#[from] std::io::Error),
    /// The reader was woken (see `UnixTransport::with_wake`) while waiting for a message to
    /// start: nothing of the next message was consumed.
    #[error("woken between messages")]
    Interrupted,
}

/// A bidirectional channel of vfio-user messages.
///
/// `send` may be called from several threads (messages never interleave); `recv` is meant
/// for one reader thread at a time.
pub trait Transport: Send + Sync {
    /// Sends one message: `header`, then `parts` back to back, with `fds` attached.
    /// The header's `msg_size` must equal 16 plus the parts' total length.
    fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError>;

    /// Receives the next message, blocking until it is complete.
    fn recv(&self, limits: RecvLimits) -> Result<Incoming, TransportError>;

    /// Sends raw bytes with no framing check: for conformance tests and fuzzing, which need
    /// to send what a correct sender never would.
    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError>;

    /// Waits up to `timeout` for something to read (a message, or the end of the stream)
    /// and says whether there is; the next `recv` then does not wait for a message to start.
    fn wait_readable(&self, timeout: std::time::Duration) -> Result<bool, TransportError>;

    /// Makes a blocked or later `recv` return [`TransportError::Closed`] and stops sends.
    fn shutdown(&self);

    /// The connection, for another process to go on with (see [`UnixTransport::detach`]);
    /// ENOTSUP for transports that are not a socket.
    fn detach(&self) -> std::io::Result<Detached> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

impl<T: Transport + ?Sized> Transport for std::sync::Arc<T> {
    fn send(
        &self,
        header: &Header,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        (**self).send(header, parts, fds)
    }
    fn recv(&self, limits: RecvLimits) -> Result<Incoming, TransportError> {
        (**self).recv(limits)
    }
    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), TransportError> {
        (**self).send_raw(bytes, fds)
    }
    fn wait_readable(&self, timeout: std::time::Duration) -> Result<bool, TransportError> {
        (**self).wait_readable(timeout)
    }
    fn shutdown(&self) {
        (**self).shutdown()
    }
    fn detach(&self) -> std::io::Result<Detached> {
        (**self).detach()
    }
}

/// The header followed by the parts, as one scatter list, after checking that
/// `header.msg_size` matches them, so no sender can desynchronise a peer by mistake.
fn framed<'a>(header: &'a Header, parts: &[&'a [u8]]) -> Result<Vec<&'a [u8]>, TransportError> {
    use zerocopy::IntoBytes;
    let body: usize = parts.iter().map(|p| p.len()).sum();
    if header.body_len() != body || (header.msg_size as usize) < umdev_proto::HEADER_SIZE {
        return Err(TransportError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "header announces {} bytes but the message has {}",
                header.msg_size,
                body + umdev_proto::HEADER_SIZE
            ),
        )));
    }
    let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
    all.push(header.as_bytes());
    all.extend_from_slice(parts);
    Ok(all)
}
