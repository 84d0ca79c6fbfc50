//! A vfio-user client: connect, negotiate, map memory, access regions, set up interrupts,
//! and answer the server's DMA requests.
//!
//! It is the client our tests, benchmarks and tools use; it is deliberately strict about
//! what it sends and lets tests send anything with [`Client::request_raw`] and
//! [`Client::send_raw`].
//!
//! ```no_run
//! use umdev_client::Client;
//! let mut c = Client::connect("/tmp/mtty.sock").unwrap();
//! let info = c.device_info().unwrap();
//! let mut lsr = [0u8; 1];
//! c.region_read(0, 5, &mut lsr).unwrap(); // BAR0 + 5: a 16550A's line status register
//! println!("{} regions, LSR {:#x}", info.num_regions, lsr[0]);
//! ```
#![warn(missing_docs)]

mod error;
mod memory;
pub mod migration;
pub mod nvme;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use umdev_proto::{wire, Capabilities, Command, Header};
use umdev_transport::{Incoming, Message, RecvLimits, Transport, UnixTransport};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub use error::ClientError;
pub use memory::{DmaHandler, VecMemory};

/// What the client proposes in VERSION.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Minor version proposed (QEMU 11 proposes 0).
    pub minor: u16,
    /// Capabilities proposed.
    pub caps: Capabilities,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            minor: umdev_proto::MAX_MINOR,
            caps: Capabilities {
                max_msg_fds: Some(16),
                max_data_xfer_size: Some(umdev_proto::DEFAULT_MAX_DATA_XFER_SIZE),
                max_dma_maps: Some(umdev_proto::DEFAULT_MAX_DMA_MAPS),
                pgsizes: Some(umdev_proto::DEFAULT_PGSIZES),
                write_multiple: Some(true),
                ..Capabilities::default()
            },
        }
    }
}

/// A reply: header, body and fds.
#[derive(Debug)]
pub struct Reply {
    /// The reply header.
    pub header: Header,
    /// Bytes after the header.
    pub body: Vec<u8>,
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
}

/// Region information as the server reported it.
#[derive(Debug)]
pub struct RegionInfo {
    /// The fixed struct.
    pub info: wire::RegionInfo,
    /// Sparse mmap areas (offset, size), if the capability was present.
    pub sparse: Vec<(u64, u64)>,
    /// The region fd, if the region is mmap-able.
    pub fd: Option<OwnedFd>,
}

/// A connected, negotiated vfio-user client.
pub struct Client {
    transport: Arc<dyn Transport>,
    next_id: u16,
    server_caps: Capabilities,
    minor: u16,
    dma: Option<Arc<dyn DmaHandler>>,
    limits: RecvLimits,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("minor", &self.minor)
            .field("server_caps", &self.server_caps)
            .finish_non_exhaustive()
    }
}

fn parse<'a, T: FromBytes + KnownLayout + Immutable>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8]), ClientError> {
    Ok(wire::split::<T>(body, what)?)
}

impl Client {
    /// Connects to `path` and negotiates with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects to `path` and negotiates with `options`.
    pub fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let t = UnixTransport::connect(path).map_err(ClientError::Connect)?;
        let mut c = Client::unnegotiated(Arc::new(t));
        c.negotiate(&options)?;
        Ok(c)
    }

    /// Wraps a transport without negotiating (for tests that need to misbehave first).
    pub fn unnegotiated(transport: Arc<dyn Transport>) -> Client {
        Client {
            transport,
            next_id: 0,
            server_caps: Capabilities::default(),
            minor: 0,
            dma: None,
            limits: RecvLimits {
                max_body: umdev_proto::max_body_len(64 << 20),
            },
        }
    }

    /// Sends VERSION with `options` and records the server's answer.
    pub fn negotiate(&mut self, options: &ClientOptions) -> Result<(), ClientError> {
        let mut body = wire::Version {
            major: umdev_proto::MAJOR,
            minor: options.minor,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(&options.caps.to_wire());
        let reply = self.request(Command::Version, &[&body], &[])?;
        let (v, tail) = parse::<wire::Version>(&reply.body, "VERSION reply")?;
        if v.major != umdev_proto::MAJOR || v.minor > options.minor {
            return Err(ClientError::Unexpected(
                "server answered an impossible version",
            ));
        }
        self.minor = v.minor;
        self.server_caps = Capabilities::parse(tail)?;
        Ok(())
    }

    /// The capabilities the server announced.
    pub fn server_caps(&self) -> &Capabilities {
        &self.server_caps
    }

    /// The negotiated minor version.
    pub fn minor(&self) -> u16 {
        self.minor
    }

    /// The transport, for tests that need to reach under the client.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Sets what answers the server's DMA_READ/DMA_WRITE requests.
    pub fn set_dma_handler(&mut self, handler: Arc<dyn DmaHandler>) {
        self.dma = Some(handler);
    }

    fn alloc_id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Sends a command and waits for its reply; an error reply becomes [`ClientError::Remote`].
    pub fn request(
        &mut self,
        command: Command,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ClientError> {
        let reply = self.request_raw(command as u16, 0, parts, fds)?;
        if let Some(errno) = reply.header.error() {
            return Err(ClientError::Remote {
                command: command as u16,
                errno,
            });
        }
        if reply.header.command != command as u16 {
            return Err(ClientError::Unexpected("reply names another command"));
        }
        Ok(reply)
    }

    /// Sends any command number with any extra header flags and returns the raw reply,
    /// error replies included.
    pub fn request_raw(
        &mut self,
        command: u16,
        extra_flags: u32,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ClientError> {
        let id = self.alloc_id();
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = Header::command(id, Command::Version, body)?;
        h.command = command;
        h.flags |= extra_flags;
        self.transport.send(&h, parts, fds)?;
        self.wait_reply(id)
    }

    /// Sends a command with No_reply set; returns once it is sent.
    pub fn post(&mut self, command: Command, parts: &[&[u8]]) -> Result<(), ClientError> {
        let id = self.alloc_id();
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let mut h = Header::command(id, command, body)?;
        h.flags |= umdev_proto::FLAG_NO_REPLY;
        self.transport.send(&h, parts, &[])?;
        Ok(())
    }

    /// Sends raw bytes (for malformed-message tests).
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        Ok(self.transport.send_raw(bytes, fds)?)
    }

    /// Receives the next reply to anything, answering server requests meanwhile.
    pub fn recv_reply(&mut self) -> Result<Reply, ClientError> {
        loop {
            match self.transport.recv(self.limits)? {
                Incoming::Message(m) if m.header.is_command() => self.serve_request(m)?,
                Incoming::Message(m) => {
                    return Ok(Reply {
                        header: m.header,
                        body: m.body,
                        fds: m.fds,
                    })
                }
                Incoming::Oversized { .. } => {
                    return Err(ClientError::Unexpected("oversized message from the server"))
                }
            }
        }
    }

    fn wait_reply(&mut self, id: u16) -> Result<Reply, ClientError> {
        loop {
            let r = self.recv_reply()?;
            if r.header.msg_id == id {
                return Ok(r);
            }
            tracing::warn!(
                msg_id = r.header.msg_id,
                "reply to an earlier request ignored"
            );
        }
    }

    fn serve_request(&mut self, m: Message) -> Result<(), ClientError> {
        const EINVAL: i32 = 22;
        const EFAULT: i32 = 14;
        let h = m.header;
        let result: Result<Vec<u8>, i32> = match (h.known_command(), &self.dma) {
            (Some(Command::DmaRead), Some(dma)) => {
                match wire::split::<wire::DmaAccess>(&m.body, "DMA_READ") {
                    Ok((req, _)) => match usize::try_from(req.count) {
                        Ok(n) if n <= self.limits.max_body => {
                            let mut out = req.as_bytes().to_vec();
                            out.resize(16 + n, 0);
                            dma.dma_read(req.address, &mut out[16..]).map(|()| out)
                        }
                        _ => Err(EINVAL),
                    },
                    Err(_) => Err(EINVAL),
                }
            }
            (Some(Command::DmaWrite), Some(dma)) => {
                match wire::split::<wire::DmaAccess>(&m.body, "DMA_WRITE") {
                    Ok((req, data)) if u64::try_from(data.len()).ok() == Some(req.count) => dma
                        .dma_write(req.address, data)
                        .map(|()| req.as_bytes().to_vec()),
                    _ => Err(EINVAL),
                }
            }
            (Some(Command::DmaRead | Command::DmaWrite), None) => Err(EFAULT),
            _ => Err(EINVAL),
        };
        if h.no_reply() {
            return Ok(());
        }
        match result {
            Ok(body) => self.transport.send(&h.reply(body.len())?, &[&body], &[])?,
            Err(errno) => self.transport.send(&h.error_reply(errno), &[], &[])?,
        }
        Ok(())
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> Result<wire::DeviceInfo, ClientError> {
        let req = wire::DeviceInfo {
            argsz: 16,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetInfo, &[req.as_bytes()], &[])?;
        Ok(parse::<wire::DeviceInfo>(&r.body, "DEVICE_GET_INFO reply")?.0)
    }

    /// DEVICE_GET_REGION_INFO, asking again with a larger buffer if capabilities need it.
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, ClientError> {
        let mut argsz = wire::argsz::<wire::RegionInfo>();
        loop {
            let req = wire::RegionInfo {
                argsz,
                index,
                ..Default::default()
            };
            let mut r = self.request(Command::DeviceGetRegionInfo, &[req.as_bytes()], &[])?;
            let (info, _) = parse::<wire::RegionInfo>(&r.body, "region info reply")?;
            if info.argsz > argsz {
                argsz = info.argsz;
                continue;
            }
            let mut sparse = Vec::new();
            if info.cap_offset != 0 {
                let at = info.cap_offset as usize;
                let caps = r
                    .body
                    .get(at..)
                    .ok_or(ClientError::Unexpected("cap_offset out of range"))?;
                let (cap, mut rest) = parse::<wire::SparseMmap>(caps, "sparse mmap cap")?;
                if cap.header.id == wire::REGION_INFO_CAP_SPARSE_MMAP {
                    for _ in 0..cap.nr_areas {
                        let (a, more) = parse::<wire::SparseMmapArea>(rest, "sparse area")?;
                        sparse.push((a.offset, a.size));
                        rest = more;
                    }
                }
            }
            return Ok(RegionInfo {
                info,
                sparse,
                fd: r.fds.pop(),
            });
        }
    }

    /// DEVICE_GET_REGION_IO_FDS: the region's ioeventfd sub-regions with their fds (asking
    /// again with a larger `argsz` if the first answer says it needs one).
    pub fn region_io_fds(
        &mut self,
        index: u32,
    ) -> Result<Vec<(wire::IoFdSubRegion, OwnedFd)>, ClientError> {
        let mut argsz = wire::argsz::<wire::RegionIoFds>();
        loop {
            let req = wire::RegionIoFds {
                argsz,
                flags: 0,
                index,
                count: 0,
            };
            let r = self.request(Command::DeviceGetRegionIoFds, &[req.as_bytes()], &[])?;
            let (head, mut rest) = parse::<wire::RegionIoFds>(&r.body, "region io fds reply")?;
            if head.argsz > argsz && head.count > 0 && rest.is_empty() {
                argsz = head.argsz;
                continue;
            }
            let mut fds: Vec<Option<OwnedFd>> = r.fds.into_iter().map(Some).collect();
            let mut out = Vec::new();
            for _ in 0..head.count {
                let (sub, more) = parse::<wire::IoFdSubRegion>(rest, "io fd sub-region")?;
                rest = more;
                let fd = fds
                    .get_mut(sub.fd_index as usize)
                    .and_then(Option::take)
                    .ok_or(ClientError::Unexpected("a sub-region names a missing fd"))?;
                out.push((sub, fd));
            }
            return Ok(out);
        }
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> Result<wire::IrqInfo, ClientError> {
        let req = wire::IrqInfo {
            argsz: 16,
            index,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetIrqInfo, &[req.as_bytes()], &[])?;
        Ok(parse::<wire::IrqInfo>(&r.body, "irq info reply")?.0)
    }

    /// DEVICE_SET_IRQS with eventfds (DATA_EVENTFD | `action`).
    pub fn set_irq_eventfds(
        &mut self,
        index: u32,
        action: u32,
        start: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let count =
            u32::try_from(fds.len()).map_err(|_| ClientError::Unexpected("too many fds"))?;
        self.set_irqs(
            index,
            wire::IRQ_SET_DATA_EVENTFD | action,
            start,
            count,
            &[],
            fds,
        )
    }

    /// DEVICE_SET_IRQS with any flags, data and fds.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let req = wire::IrqSet {
            argsz: u32::try_from(20 + data.len()).unwrap_or(u32::MAX),
            flags,
            index,
            start,
            count,
        };
        self.request(Command::DeviceSetIrqs, &[req.as_bytes(), data], fds)?;
        Ok(())
    }

    /// REGION_READ of `buf.len()` bytes.
    pub fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ClientError> {
        let req = wire::RegionAccess {
            offset,
            region,
            count: u32::try_from(buf.len())
                .map_err(|_| ClientError::Unexpected("read too large"))?,
        };
        let r = self.request(Command::RegionRead, &[req.as_bytes()], &[])?;
        let (got, data) = parse::<wire::RegionAccess>(&r.body, "REGION_READ reply")?;
        if got.count as usize != buf.len() || data.len() != buf.len() {
            return Err(ClientError::Unexpected(
                "REGION_READ reply has the wrong count",
            ));
        }
        buf.copy_from_slice(data);
        Ok(())
    }

    /// REGION_WRITE, waiting for the reply.
    pub fn region_write(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = Self::write_req(region, offset, data)?;
        self.request(Command::RegionWrite, &[req.as_bytes(), data], &[])?;
        Ok(())
    }

    /// REGION_WRITE with No_reply (a posted write, as QEMU sends by default).
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        let req = Self::write_req(region, offset, data)?;
        self.post(Command::RegionWrite, &[req.as_bytes(), data])
    }

    fn write_req(region: u32, offset: u64, data: &[u8]) -> Result<wire::RegionAccess, ClientError> {
        Ok(wire::RegionAccess {
            offset,
            region,
            count: u32::try_from(data.len())
                .map_err(|_| ClientError::Unexpected("write too large"))?,
        })
    }

    /// REGION_WRITE_MULTI of up to 200 writes of up to 8 bytes: (region, offset, data).
    pub fn region_write_multi(&mut self, writes: &[(u32, u64, &[u8])]) -> Result<u64, ClientError> {
        let mut body = wire::WriteMulti {
            wr_cnt: writes.len() as u64,
        }
        .as_bytes()
        .to_vec();
        for (region, offset, data) in writes {
            let mut e = wire::WriteMultiEntry {
                offset: *offset,
                region: *region,
                count: u32::try_from(data.len()).unwrap_or(u32::MAX),
                data: [0; 8],
            };
            let n = data.len().min(8);
            e.data[..n].copy_from_slice(&data[..n]);
            body.extend_from_slice(e.as_bytes());
        }
        let r = self.request(Command::RegionWriteMulti, &[&body], &[])?;
        Ok(
            parse::<wire::WriteMulti>(&r.body, "REGION_WRITE_MULTI reply")?
                .0
                .wr_cnt,
        )
    }

    /// DMA_MAP, with an fd (and its offset) or without (then the server reaches the
    /// memory through DMA_READ/DMA_WRITE, answered by the [`DmaHandler`]).
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        flags: u32,
        fd: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<(), ClientError> {
        let req = wire::DmaMap {
            argsz: 32,
            flags,
            offset: fd.as_ref().map_or(0, |f| f.1),
            address: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.0).collect();
        self.request(Command::DmaMap, &[req.as_bytes()], &fds)?;
        Ok(())
    }

    /// DMA_UNMAP of exactly one earlier mapping (or all with `DMA_UNMAP_FLAG_ALL`).
    pub fn dma_unmap(&mut self, iova: u64, size: u64, flags: u32) -> Result<(), ClientError> {
        let req = wire::DmaUnmap {
            argsz: 24,
            flags,
            address: iova,
            size,
        };
        self.request(Command::DmaUnmap, &[req.as_bytes()], &[])?;
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), ClientError> {
        self.request(Command::DeviceReset, &[], &[])?;
        Ok(())
    }
}
