//! The channel of a live upgrade between the worker that serves a group and the worker that
//! takes it over: a `SOCK_SEQPACKET` pair the daemon makes, one end given to each.
//!
//! The old worker sends, per device, a header (its UUID, the names of its listening
//! sockets, how many state bytes and fds follow), the state in pieces, then the fds in
//! batches (the listening sockets first, then the server's package's); then an end mark.
//! The new worker answers with one verdict: taken (`K`) or refused with an errno (`X`).
//! Only a `K` makes the old worker let go: if the new one dies first, the old one runs on.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use umdev_server::Package;

/// State bytes per message.
const PIECE: usize = 32 * 1024;
/// Fds per message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 64;
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE));

/// One device as it travels.
pub struct DevicePackage {
    /// The device.
    pub uuid: String,
    /// Its listening sockets (the vfio-user one and its parent's), by name.
    pub sockets: Vec<(String, OwnedFd)>,
    /// The server's package.
    pub package: Package,
}

#[derive(Serialize, Deserialize)]
struct Header {
    uuid: String,
    sockets: Vec<String>,
    state: usize,
    fds: usize,
}

fn send(fd: BorrowedFd<'_>, kind: u8, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Errno> {
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        cmsg.push(SendAncillaryMessage::ScmRights(fds));
    }
    let kind = [kind];
    loop {
        match rustix::net::sendmsg(
            fd,
            &[IoSlice::new(&kind), IoSlice::new(bytes)],
            &mut cmsg,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
}

/// One message: its kind, its bytes and its fds.
fn recv(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(u8, Vec<u8>, Vec<OwnedFd>), Errno> {
    let mut pfd = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::fs::Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    loop {
        match rustix::event::poll(&mut pfd, Some(&ts)) {
            Ok(0) => return Err(Errno::TIMEDOUT),
            Ok(_) => break,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    let mut buf = vec![0u8; PIECE + 4096];
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match rustix::net::recvmsg(fd, &mut iov, &mut cmsg, RecvFlags::CMSG_CLOEXEC) {
            Ok(r) => break r,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    };
    let mut fds = Vec::new();
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if r.bytes == 0 {
        return Err(Errno::PIPE);
    }
    if r.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
        return Err(Errno::MSGSIZE);
    }
    buf.truncate(r.bytes);
    let kind = buf.remove(0);
    Ok((kind, buf, fds))
}

/// Sends every device, then the end mark.
pub fn send_all(fd: BorrowedFd<'_>, devices: &[DevicePackage]) -> Result<(), Errno> {
    for d in devices {
        let header = Header {
            uuid: d.uuid.clone(),
            sockets: d.sockets.iter().map(|(n, _)| n.clone()).collect(),
            state: d.package.state.len(),
            fds: d.sockets.len() + d.package.fds.len(),
        };
        let h = serde_json::to_vec(&header).map_err(|_| Errno::INVAL)?;
        send(fd, b'H', &h, &[])?;
        for piece in d.package.state.chunks(PIECE) {
            send(fd, b'S', piece, &[])?;
        }
        let all: Vec<BorrowedFd<'_>> = d
            .sockets
            .iter()
            .map(|(_, f)| f.as_fd())
            .chain(d.package.fds.iter().map(AsFd::as_fd))
            .collect();
        for batch in all.chunks(FDS_PER_MESSAGE) {
            send(fd, b'F', &[], batch)?;
        }
    }
    send(fd, b'E', &[], &[])
}

/// Receives what [`send_all`] sent (each message within `timeout`).
pub fn recv_all(fd: BorrowedFd<'_>, timeout: Duration) -> Result<Vec<DevicePackage>, Errno> {
    let mut out = Vec::new();
    loop {
        let (kind, bytes, _) = recv(fd, timeout)?;
        match kind {
            b'E' => return Ok(out),
            b'H' => {}
            _ => return Err(Errno::PROTO),
        }
        let h: Header = serde_json::from_slice(&bytes).map_err(|_| Errno::PROTO)?;
        let mut state = Vec::with_capacity(h.state);
        while state.len() < h.state {
            let (kind, bytes, _) = recv(fd, timeout)?;
            if kind != b'S' {
                return Err(Errno::PROTO);
            }
            state.extend_from_slice(&bytes);
        }
        let mut fds = Vec::with_capacity(h.fds);
        while fds.len() < h.fds {
            let (kind, _, got) = recv(fd, timeout)?;
            if kind != b'F' || got.is_empty() {
                return Err(Errno::PROTO);
            }
            fds.extend(got);
        }
        if state.len() != h.state || fds.len() != h.fds || h.sockets.len() > fds.len() {
            return Err(Errno::PROTO);
        }
        let rest = fds.split_off(h.sockets.len());
        out.push(DevicePackage {
            uuid: h.uuid,
            sockets: h.sockets.into_iter().zip(fds).collect(),
            package: Package { state, fds: rest },
        });
    }
}

/// The new worker's verdict.
pub fn send_verdict(fd: BorrowedFd<'_>, verdict: Result<(), Errno>) -> Result<(), Errno> {
    match verdict {
        Ok(()) => send(fd, b'K', &[], &[]),
        Err(e) => send(fd, b'X', &e.raw_os_error().to_le_bytes(), &[]),
    }
}

/// Waits for the new worker's verdict; an error (its errno, or how the channel failed)
/// means the old worker runs on.
pub fn recv_verdict(fd: BorrowedFd<'_>, timeout: Duration) -> Result<(), Errno> {
    let (kind, bytes, _) = recv(fd, timeout)?;
    match kind {
        b'K' => Ok(()),
        b'X' => Err(bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(i32::from_le_bytes)
            .map_or(Errno::PROTO, Errno::from_raw_os_error)),
        _ => Err(Errno::PROTO),
    }
}
