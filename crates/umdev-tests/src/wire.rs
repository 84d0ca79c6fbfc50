//! Raw wire access for conformance tests: send exactly the bytes a test wants, read
//! exactly what the server answers.

use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use umdev_proto::{wire, Capabilities, Command, Header};
use umdev_transport::{Incoming, Message, RecvLimits, Transport, TransportError, UnixTransport};
use zerocopy::IntoBytes;

/// Errnos the conformance tests expect, by name.
pub mod errno {
    pub const ENOENT: i32 = 2;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
    pub const ENOSYS: i32 = 38;
    pub const E2BIG: i32 = 7;
    pub const EPERM: i32 = 1;
    pub const ENOTSUP: i32 = 95;
}

/// A connection that speaks raw messages.
pub struct Raw {
    pub t: UnixTransport,
    next_id: u16,
}

/// A received reply.
#[derive(Debug)]
pub struct RawReply {
    pub header: Header,
    pub body: Vec<u8>,
    pub fds: Vec<std::os::fd::OwnedFd>,
}

impl RawReply {
    /// The errno of an error reply, or `None` for success.
    pub fn errno(&self) -> Option<i32> {
        self.header.error()
    }
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw {
            t: UnixTransport::new(s),
            next_id: 100,
        }
    }

    /// Connects and negotiates version 0.`minor` with default capabilities.
    pub fn negotiated(path: &Path) -> Raw {
        let mut r = Raw::connect(path);
        let reply = r.version(0, 0, &Capabilities::default().to_wire());
        assert_eq!(reply.errno(), None, "VERSION failed");
        r
    }

    pub fn version(&mut self, major: u16, minor: u16, caps: &[u8]) -> RawReply {
        let v = wire::Version { major, minor };
        self.call(Command::Version as u16, &[v.as_bytes(), caps], &[])
    }

    /// Sends a command (with the next id) and returns its reply.
    pub fn call(&mut self, command: u16, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> RawReply {
        let id = self.send(command, 0, parts, fds);
        let r = self.recv();
        assert_eq!(r.header.msg_id, id, "reply id must echo the request id");
        assert!(r.header.is_reply());
        assert_eq!(r.header.command, command, "reply must name the command");
        r
    }

    /// Sends a command with extra flags; returns its id.
    pub fn send(
        &mut self,
        command: u16,
        flags: u32,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = Header::command(self.next_id, Command::Version, body).unwrap();
        h.command = command;
        h.flags |= flags;
        self.t.send(&h, parts, fds).unwrap();
        self.next_id
    }

    /// Sends bytes as they are.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.t.send_raw(bytes, &[]).unwrap();
    }

    /// Receives one message.
    pub fn recv(&mut self) -> RawReply {
        match self.t.recv(RecvLimits { max_body: 64 << 20 }).unwrap() {
            Incoming::Message(Message { header, body, fds }) => RawReply { header, body, fds },
            Incoming::Oversized { .. } => panic!("oversized reply"),
        }
    }

    /// Receives, returning the transport error if the server closed the connection.
    pub fn try_recv(&mut self) -> Result<RawReply, TransportError> {
        match self.t.recv(RecvLimits { max_body: 64 << 20 })? {
            Incoming::Message(Message { header, body, fds }) => Ok(RawReply { header, body, fds }),
            Incoming::Oversized { .. } => panic!("oversized reply"),
        }
    }

    /// Checks the connection still answers: a DEVICE_GET_INFO gets a good reply.
    pub fn assert_usable(&mut self) {
        let req = wire::DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        let r = self.call(Command::DeviceGetInfo as u16, &[req.as_bytes()], &[]);
        assert_eq!(r.errno(), None, "connection must stay usable");
    }

    /// A header with an arbitrary size field, for framing tests.
    pub fn header_bytes(id: u16, command: u16, msg_size: u32, flags: u32) -> Vec<u8> {
        Header {
            msg_id: id,
            command,
            msg_size,
            flags,
            error: 0,
        }
        .as_bytes()
        .to_vec()
    }
}
