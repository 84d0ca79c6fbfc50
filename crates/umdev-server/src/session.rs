//! One client session: negotiation, then commands handled in order until the client goes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use umdev_dma::{dirty_bitmap_size, AddressSpace, Backing, DmaLimits, IovaRange, Pinner, Prot};
use umdev_pci::{ClientId, IrqData, PciFunction};
use umdev_proto::{wire, Capabilities, Command, Header, ProtoError};
use umdev_transport::{Incoming, Message, RecvLimits, Transport, TransportError};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{refuse, RequestError, ServerError};
use crate::remote::RemoteChannel;
use crate::ServerConfig;

/// A successful reply: body bytes after the header, and fds to attach.
struct Reply {
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Reply {
    fn empty() -> Reply {
        Reply {
            body: Vec::new(),
            fds: Vec::new(),
        }
    }

    fn of<T: IntoBytes + Immutable>(v: &T) -> Reply {
        Reply {
            body: v.as_bytes().to_vec(),
            fds: Vec::new(),
        }
    }
}

/// What the client and we agreed on in VERSION.
struct Negotiated {
    write_multiple: bool,
}

pub(crate) struct Session<'a> {
    function: &'a Mutex<PciFunction>,
    config: &'a ServerConfig,
    transport: Arc<dyn Transport>,
    limits: RecvLimits,
    remote: Arc<RemoteChannel>,
    space: Option<Arc<AddressSpace>>,
    pinner: Option<Arc<Pinner>>,
    negotiated: Option<Negotiated>,
    /// Who the client is, given to the device's `open`.
    client: ClientId,
}

/// Parses a body's fixed struct and checks its `argsz` against the struct's size.
fn fixed<'b, T: FromBytes + zerocopy::KnownLayout + Immutable>(
    body: &'b [u8],
    what: &'static str,
    argsz: impl Fn(&T) -> u32,
) -> Result<(T, &'b [u8]), RequestError> {
    let (v, tail) = wire::split::<T>(body, what)?;
    if (argsz(&v) as usize) < std::mem::size_of::<T>() {
        return Err(ProtoError::Invalid("argsz smaller than the struct").into());
    }
    Ok((v, tail))
}

fn no_fds(fds: &[OwnedFd]) -> Result<(), RequestError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(ProtoError::TooManyFds {
            got: fds.len(),
            max: 0,
        }
        .into())
    }
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        function: &'a Mutex<PciFunction>,
        config: &'a ServerConfig,
        transport: Arc<dyn Transport>,
        client: ClientId,
    ) -> Session<'a> {
        let limits = RecvLimits {
            max_body: umdev_proto::max_body_len(config.max_data_xfer_size),
        };
        let remote = Arc::new(RemoteChannel::new(
            transport.clone(),
            limits,
            config.dma_timeout,
        ));
        Session {
            function,
            config,
            transport,
            limits,
            remote,
            space: None,
            pinner: None,
            negotiated: None,
            client,
        }
    }

    fn function(&self) -> std::sync::MutexGuard<'a, PciFunction> {
        self.function.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves the client until it disconnects. Returns `Ok` for a clean disconnect.
    pub(crate) fn run(mut self) -> Result<(), ServerError> {
        let result = self.serve();
        self.teardown();
        result
    }

    fn serve(&mut self) -> Result<(), ServerError> {
        loop {
            let incoming = match self.remote.take_deferred() {
                Some(i) => i,
                None => match self.transport.recv(self.limits) {
                    Ok(i) => i,
                    Err(TransportError::Closed) => return Ok(()),
                    Err(e) => return Err(e.into()),
                },
            };
            match incoming {
                Incoming::Oversized { header } => {
                    let err = RequestError::Proto(ProtoError::TooLarge {
                        size: header.body_len(),
                        max: self.limits.max_body,
                    });
                    self.answer(&header, Err(err))?;
                }
                Incoming::Message(m) if m.header.is_reply() => self.remote.dispatch_reply(m),
                Incoming::Message(m) => {
                    let header = m.header;
                    let result = self.dispatch(m);
                    let fatal = matches!(
                        (&result, header.known_command()),
                        (Err(_), Some(Command::Version))
                    ) && self.negotiated.is_none();
                    self.answer(&header, result)?;
                    if fatal {
                        return Err(ServerError::Negotiation(refuse(
                            Errno::PROTO,
                            "version negotiation failed",
                        )));
                    }
                }
            }
        }
    }

    fn answer(
        &self,
        header: &Header,
        result: Result<Reply, RequestError>,
    ) -> Result<(), ServerError> {
        match result {
            Ok(reply) => {
                if header.no_reply() {
                    return Ok(());
                }
                let rh = header
                    .reply(reply.body.len())
                    .map_err(|e| ServerError::Negotiation(e.into()))?;
                let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|f| f.as_fd()).collect();
                self.transport.send(&rh, &[&reply.body], &fds)?;
            }
            Err(e) => {
                let errno = e.errno();
                tracing::debug!(
                    msg_id = header.msg_id,
                    command = header.command,
                    errno,
                    error = &e as &(dyn std::error::Error + 'static),
                    "request failed"
                );
                if header.no_reply() {
                    tracing::warn!(
                        command = header.command,
                        errno,
                        "a posted request failed; the client asked for no reply"
                    );
                    return Ok(());
                }
                self.transport.send(&header.error_reply(errno), &[], &[])?;
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, m: Message) -> Result<Reply, RequestError> {
        let Message { header, body, fds } = m;
        let bad_flags = !umdev_proto::FLAGS_KNOWN | umdev_proto::FLAG_ERROR;
        if !header.is_command() || header.flags & bad_flags != 0 {
            return Err(ProtoError::UnknownFlags(header.flags).into());
        }
        if fds.len() > self.config.max_msg_fds as usize {
            return Err(ProtoError::TooManyFds {
                got: fds.len(),
                max: self.config.max_msg_fds as usize,
            }
            .into());
        }
        let Some(command) = header.known_command() else {
            return Err(ProtoError::UnknownCommand(header.command).into());
        };
        match command {
            Command::Version => self.version(&body, &fds),
            _ if self.negotiated.is_none() => {
                Err(refuse(Errno::INVAL, "command before VERSION negotiation"))
            }
            Command::DmaMap => self.dma_map(&body, fds),
            Command::DmaUnmap => self.dma_unmap(&body, &fds),
            Command::DeviceGetInfo => self.device_info(&body, &fds),
            Command::DeviceGetRegionInfo => self.region_info(&body, &fds),
            Command::DeviceGetRegionIoFds => self.region_io_fds(&body, &fds),
            Command::DeviceGetIrqInfo => self.irq_info(&body, &fds),
            Command::DeviceSetIrqs => self.set_irqs(&body, fds),
            Command::RegionRead => self.region_read(&body, &fds),
            Command::RegionWrite => self.region_write(&body, &fds),
            Command::DeviceReset => {
                no_fds(&fds)?;
                self.function().reset()?;
                Ok(Reply::empty())
            }
            Command::RegionWriteMulti => self.write_multi(&body, &fds),
            Command::DmaRead | Command::DmaWrite => Err(ProtoError::WrongDirection(command).into()),
            Command::DeviceFeature => self.device_feature(&body, &fds),
            Command::MigDataRead => self.mig_data_read(&body, &fds),
            Command::MigDataWrite => self.mig_data_write(&body, &fds),
        }
    }

    fn version(&mut self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        if self.negotiated.is_some() {
            return Err(refuse(Errno::INVAL, "VERSION was already negotiated"));
        }
        let (v, tail) = wire::split::<wire::Version>(body, "VERSION")?;
        if v.major != umdev_proto::MAJOR {
            return Err(ProtoError::UnsupportedVersion {
                major: v.major,
                minor: v.minor,
            }
            .into());
        }
        let client = Capabilities::parse(tail)?;
        let max_dma_maps = self
            .config
            .max_dma_maps
            .min(client.max_dma_maps_or_default());
        let memory = self.config.locked_memory.client_memory(&self.client);
        let space = Arc::new(AddressSpace::with_client(
            DmaLimits {
                max_mappings: max_dma_maps as usize,
            },
            memory,
        ));
        let pinner = Arc::new(space.pinner());
        self.remote
            .set_client_max_xfer(client.max_data_xfer_size_or_default());
        space.set_remote(Some(self.remote.clone()));
        // The parent driver may refuse this client: then negotiation fails and the
        // connection closes, as a refused open of a VFIO device fd would.
        self.function()
            .open_with_pins(space.clone(), self.client, Some(pinner.clone()))
            .map_err(RequestError::Device)?;
        self.space = Some(space);
        self.pinner = Some(pinner);
        let write_multiple = client.write_multiple == Some(true);
        self.negotiated = Some(Negotiated { write_multiple });
        let ours = Capabilities {
            max_msg_fds: Some(self.config.max_msg_fds),
            max_data_xfer_size: Some(self.config.max_data_xfer_size),
            max_dma_maps: Some(max_dma_maps),
            pgsizes: Some(umdev_proto::DEFAULT_PGSIZES),
            write_multiple: write_multiple.then_some(true),
            ..Capabilities::default()
        };
        let minor = v.minor.min(umdev_proto::MAX_MINOR);
        tracing::info!(
            client_minor = v.minor,
            minor,
            client_max_msg_fds = client.max_msg_fds_or_default(),
            client_max_data_xfer_size = client.max_data_xfer_size_or_default(),
            max_dma_maps,
            write_multiple,
            "client negotiated vfio-user 0.{minor}"
        );
        let mut reply = wire::Version {
            major: umdev_proto::MAJOR,
            minor,
        }
        .as_bytes()
        .to_vec();
        reply.extend_from_slice(&ours.to_wire());
        Ok(Reply {
            body: reply,
            fds: Vec::new(),
        })
    }

    fn space(&self) -> Result<&Arc<AddressSpace>, RequestError> {
        self.space
            .as_ref()
            .ok_or_else(|| refuse(Errno::INVAL, "no address space before VERSION"))
    }

    fn dma_map(&mut self, body: &[u8], mut fds: Vec<OwnedFd>) -> Result<Reply, RequestError> {
        let (req, _) = fixed::<wire::DmaMap>(body, "DMA_MAP", |r| r.argsz)?;
        let known = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
        if req.flags & !known != 0 {
            return Err(ProtoError::UnknownFlags(req.flags).into());
        }
        if fds.len() > 1 {
            return Err(ProtoError::TooManyFds {
                got: fds.len(),
                max: 1,
            }
            .into());
        }
        let prot = Prot::from_bits(u8::try_from(req.flags).unwrap_or(0))
            .ok_or(ProtoError::UnknownFlags(req.flags))?;
        let range = IovaRange::new(req.address, req.size)?;
        let backing = match fds.pop() {
            Some(fd) => Backing::Fd {
                fd,
                offset: req.offset,
            },
            None => Backing::Remote,
        };
        let fd_backed = matches!(backing, Backing::Fd { .. });
        self.space()?.map(range, prot, backing)?;
        tracing::debug!(
            iova = req.address,
            size = req.size,
            flags = req.flags,
            fd_backed,
            "DMA map"
        );
        Ok(Reply::empty())
    }

    /// DMA_UNMAP, in the order of `umdev_dma::Unmapping`: the range is closed to new pins,
    /// the device's `dma_unmap` hook runs if it pins pages there, its pins are waited for
    /// (at most `unpin_timeout`, then revoked), in-flight accesses drain, and only then is
    /// the reply sent. With GET_DIRTY_BITMAP the range's dirty bits come with it.
    fn dma_unmap(&mut self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, tail) = fixed::<wire::DmaUnmap>(body, "DMA_UNMAP", |r| r.argsz)?;
        let all = req.flags & wire::DMA_UNMAP_FLAG_ALL != 0;
        let dirty = req.flags & wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
        if req.flags & !(wire::DMA_UNMAP_FLAG_ALL | wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) != 0 {
            return Err(ProtoError::UnknownFlags(req.flags).into());
        }
        if all && (req.address != 0 || req.size != 0) {
            return Err(ProtoError::Invalid("UNMAP_ALL with an address or size").into());
        }
        if all && dirty {
            // As the kernel's type1: a bitmap of everything is not offered.
            return Err(ProtoError::Invalid("UNMAP_ALL with GET_DIRTY_BITMAP").into());
        }
        let space = self.space()?.clone();
        let mut bitmap = None;
        if dirty {
            let (bm, _) = wire::split::<wire::DmaUnmapBitmap>(tail, "DMA_UNMAP bitmap")?;
            if !space.is_dirty_logging() {
                return Err(refuse(Errno::INVAL, "dirty page logging is not started"));
            }
            let size = dirty_bitmap_size(req.size, bm.pgsize)?;
            if bm.size != size as u64 {
                return Err(ProtoError::Invalid("bitmap size does not match the range").into());
            }
            self.check_count(u32::try_from(size).unwrap_or(u32::MAX))?;
            let needed =
                wire::size_of::<wire::DmaUnmap>() + wire::size_of::<wire::DmaUnmapBitmap>() + size;
            if (req.argsz as usize) < needed {
                return Err(ProtoError::Invalid("argsz too small for the bitmap").into());
            }
            bitmap = Some((bm, vec![0u8; size]));
        }
        let unmapping = if all {
            space.begin_unmap_all()
        } else {
            space.begin_unmap(IovaRange::new(req.address, req.size)?)?
        };
        // This session's device is the only pinner of the space: tell it once per range.
        let mut told: Vec<IovaRange> = Vec::new();
        for n in unmapping.notices() {
            if !told.contains(&n.range) {
                told.push(n.range);
                self.function().dma_unmap(n.range.start(), n.range.len());
            }
        }
        let outcome = unmapping.finish(
            self.config.unpin_timeout,
            bitmap.as_mut().map(|(bm, data)| (bm.pgsize, &mut data[..])),
        );
        tracing::debug!(
            iova = req.address,
            size = req.size,
            flags = req.flags,
            mappings = outcome.mappings,
            revoked = outcome.revoked.len(),
            "DMA unmap"
        );
        let mut reply = wire::DmaUnmap {
            argsz: wire::argsz::<wire::DmaUnmap>(),
            ..req
        };
        let Some((bm, data)) = bitmap else {
            return Ok(Reply::of(&reply));
        };
        reply.argsz = u32::try_from(
            wire::size_of::<wire::DmaUnmap>()
                + wire::size_of::<wire::DmaUnmapBitmap>()
                + data.len(),
        )
        .unwrap_or(u32::MAX);
        let mut out = reply.as_bytes().to_vec();
        out.extend_from_slice(bm.as_bytes());
        out.extend_from_slice(&data);
        Ok(Reply {
            body: out,
            fds: Vec::new(),
        })
    }

    fn device_info(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        fixed::<wire::DeviceInfo>(body, "DEVICE_GET_INFO", |r| r.argsz)?;
        let info = self.function().device_info();
        Ok(Reply::of(&wire::DeviceInfo {
            argsz: wire::argsz::<wire::DeviceInfo>(),
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        }))
    }

    fn region_info(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, _) = fixed::<wire::RegionInfo>(body, "DEVICE_GET_REGION_INFO", |r| r.argsz)?;
        let info = self.function().region_info(req.index)?;
        let base = wire::size_of::<wire::RegionInfo>();
        let mut caps = Vec::new();
        if let Some(mmap) = info.mmap.as_ref().filter(|m| !m.areas.is_empty()) {
            let nr = u32::try_from(mmap.areas.len())
                .map_err(|_| refuse(Errno::OVERFLOW, "too many sparse areas"))?;
            caps.extend_from_slice(
                wire::SparseMmap {
                    header: wire::CapHeader {
                        id: wire::REGION_INFO_CAP_SPARSE_MMAP,
                        version: 1,
                        next: 0,
                    },
                    nr_areas: nr,
                    reserved: 0,
                }
                .as_bytes(),
            );
            for &(offset, size) in &mmap.areas {
                caps.extend_from_slice(wire::SparseMmapArea { offset, size }.as_bytes());
            }
        }
        let needed = u32::try_from(base + caps.len())
            .map_err(|_| refuse(Errno::OVERFLOW, "region info too large"))?;
        let fits = req.argsz >= needed;
        let mut flags = info.flags;
        if !caps.is_empty() {
            flags |= wire::REGION_INFO_FLAG_CAPS;
        }
        let out = wire::RegionInfo {
            argsz: needed,
            flags,
            index: req.index,
            cap_offset: if fits && !caps.is_empty() {
                wire::argsz::<wire::RegionInfo>()
            } else {
                0
            },
            size: info.size,
            offset: info.mmap.as_ref().map_or(0, |m| m.offset),
        };
        let mut body = out.as_bytes().to_vec();
        if fits {
            body.extend_from_slice(&caps);
        }
        let mut fds = Vec::new();
        if let Some(m) = &info.mmap {
            fds.push(
                m.fd.try_clone()
                    .map_err(|_| refuse(Errno::MFILE, "cannot duplicate the region fd"))?,
            );
        }
        Ok(Reply { body, fds })
    }

    fn region_io_fds(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, _) = fixed::<wire::RegionIoFds>(body, "DEVICE_GET_REGION_IO_FDS", |r| r.argsz)?;
        if req.flags != 0 {
            return Err(ProtoError::UnknownFlags(req.flags).into());
        }
        self.function().region_info(req.index)?;
        // No region offers ioeventfds yet: the answer is an empty list.
        Ok(Reply::of(&wire::RegionIoFds {
            argsz: wire::argsz::<wire::RegionIoFds>(),
            flags: 0,
            index: req.index,
            count: 0,
        }))
    }

    fn irq_info(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, _) = fixed::<wire::IrqInfo>(body, "DEVICE_GET_IRQ_INFO", |r| r.argsz)?;
        let info = self.function().irq_info(req.index)?;
        Ok(Reply::of(&wire::IrqInfo {
            argsz: wire::argsz::<wire::IrqInfo>(),
            flags: info.flags,
            index: req.index,
            count: info.count,
        }))
    }

    fn set_irqs(&self, body: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, RequestError> {
        let (req, tail) = fixed::<wire::IrqSet>(body, "DEVICE_SET_IRQS", |r| r.argsz)?;
        let data = match req.flags & wire::IRQ_SET_DATA_MASK {
            wire::IRQ_SET_DATA_EVENTFD => IrqData::Eventfds(fds),
            other => {
                no_fds(&fds)?;
                if other == wire::IRQ_SET_DATA_BOOL {
                    IrqData::Bool(tail.to_vec())
                } else {
                    IrqData::None
                }
            }
        };
        self.function()
            .set_irqs(req.index, req.flags, req.start, req.count, data)?;
        Ok(Reply::empty())
    }

    fn check_count(&self, count: u32) -> Result<(), RequestError> {
        if count > self.config.max_data_xfer_size {
            return Err(ProtoError::TransferTooLarge {
                count: u64::from(count),
                max: self.config.max_data_xfer_size,
            }
            .into());
        }
        Ok(())
    }

    fn region_read(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, _) = wire::split::<wire::RegionAccess>(body, "REGION_READ")?;
        self.check_count(req.count)?;
        let head = wire::size_of::<wire::RegionAccess>();
        let mut out = vec![0u8; head + req.count as usize];
        self.function()
            .region_read(req.region, req.offset, &mut out[head..])?;
        out[..head].copy_from_slice(req.as_bytes());
        Ok(Reply {
            body: out,
            fds: Vec::new(),
        })
    }

    fn region_write(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, data) = wire::split::<wire::RegionAccess>(body, "REGION_WRITE")?;
        self.check_count(req.count)?;
        if data.len() != req.count as usize {
            return Err(ProtoError::Invalid("REGION_WRITE count does not match its data").into());
        }
        self.function().region_write(req.region, req.offset, data)?;
        Ok(Reply::of(&req))
    }

    fn write_multi(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, mut tail) = wire::split::<wire::WriteMulti>(body, "REGION_WRITE_MULTI")?;
        if req.wr_cnt > wire::WRITE_MULTI_MAX as u64 {
            return Err(ProtoError::Invalid("REGION_WRITE_MULTI wr_cnt above 200").into());
        }
        if !self.negotiated.as_ref().is_some_and(|n| n.write_multiple) {
            tracing::debug!("REGION_WRITE_MULTI without negotiating write_multiple; accepted");
        }
        // Validate the whole message before the first write takes effect.
        let mut writes = Vec::with_capacity(wire::WRITE_MULTI_MAX);
        for _ in 0..req.wr_cnt {
            let (w, rest) = wire::split::<wire::WriteMultiEntry>(tail, "REGION_WRITE_MULTI entry")?;
            tail = rest;
            if w.count as usize > wire::WRITE_MULTI_DATA {
                return Err(ProtoError::Invalid("REGION_WRITE_MULTI entry above 8 bytes").into());
            }
            writes.push(w);
        }
        let mut f = self.function();
        for w in &writes {
            f.region_write(w.region, w.offset, &w.data[..w.count as usize])?;
        }
        Ok(Reply::of(&req))
    }

    fn device_feature(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, data) = fixed::<wire::DeviceFeature>(body, "DEVICE_FEATURE", |r| r.argsz)?;
        let known = wire::DEVICE_FEATURE_MASK
            | wire::DEVICE_FEATURE_GET
            | wire::DEVICE_FEATURE_SET
            | wire::DEVICE_FEATURE_PROBE;
        if req.flags & !known != 0 {
            return Err(ProtoError::UnknownFlags(req.flags).into());
        }
        let get_and_set = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET;
        if req.flags & get_and_set == get_and_set && req.flags & wire::DEVICE_FEATURE_PROBE == 0 {
            return Err(ProtoError::Invalid("DEVICE_FEATURE GET and SET without PROBE").into());
        }
        let supported = match req.flags & wire::DEVICE_FEATURE_MASK {
            wire::DEVICE_FEATURE_DMA_LOGGING_START | wire::DEVICE_FEATURE_DMA_LOGGING_STOP => {
                wire::DEVICE_FEATURE_SET
            }
            wire::DEVICE_FEATURE_DMA_LOGGING_REPORT => wire::DEVICE_FEATURE_GET,
            // Migration features exist only for a device that declared migration support.
            wire::DEVICE_FEATURE_MIGRATION | wire::DEVICE_FEATURE_UMDEV_PRECOPY_INFO
                if self.function().migration_spec().is_some() =>
            {
                wire::DEVICE_FEATURE_GET
            }
            wire::DEVICE_FEATURE_MIG_DEVICE_STATE if self.function().migration_spec().is_some() => {
                wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET
            }
            _ => return Err(refuse(Errno::NOTSUP, "the device has no such feature")),
        };
        // As the kernel's vfio_check_feature: an operation the feature lacks is EINVAL, a
        // probe of what it has succeeds with the request echoed, and otherwise one of GET
        // or SET is needed.
        let ops = req.flags & !wire::DEVICE_FEATURE_MASK & !wire::DEVICE_FEATURE_PROBE;
        if ops & !supported != 0 {
            return Err(ProtoError::Invalid("operation not supported by this feature").into());
        }
        if req.flags & wire::DEVICE_FEATURE_PROBE != 0 {
            return Ok(Reply {
                body: body.to_vec(),
                fds: Vec::new(),
            });
        }
        if ops == 0 {
            return Err(ProtoError::Invalid("DEVICE_FEATURE without GET, SET or PROBE").into());
        }
        let space = self.space()?;
        match req.flags & wire::DEVICE_FEATURE_MASK {
            wire::DEVICE_FEATURE_MIGRATION
            | wire::DEVICE_FEATURE_MIG_DEVICE_STATE
            | wire::DEVICE_FEATURE_UMDEV_PRECOPY_INFO => self.migration_feature(req, data),
            wire::DEVICE_FEATURE_DMA_LOGGING_START => {
                let (mut ctl, mut rest) =
                    wire::split::<wire::DmaLoggingControl>(data, "DMA_LOGGING_START")?;
                if !ctl.page_size.is_power_of_two() {
                    return Err(ProtoError::Invalid("logging page size not a power of two").into());
                }
                if ctl.num_ranges > MAX_LOGGING_RANGES {
                    return Err(refuse(Errno::TOOBIG, "too many logging ranges"));
                }
                let mut ranges = Vec::with_capacity(ctl.num_ranges as usize);
                for _ in 0..ctl.num_ranges {
                    let (r, more) = wire::split::<wire::DmaLoggingRange>(rest, "logging range")?;
                    ranges.push(IovaRange::new(r.iova, r.length)?);
                    rest = more;
                }
                ctl.page_size = space.start_dirty_logging(&ranges)?;
                let mut out = req.as_bytes().to_vec();
                out.extend_from_slice(ctl.as_bytes());
                let ranges_len = wire::size_of::<wire::DmaLoggingRange>() * ranges.len();
                let after_ctl = wire::size_of::<wire::DmaLoggingControl>();
                out.extend_from_slice(&data[after_ctl..after_ctl + ranges_len]);
                Ok(Reply {
                    body: out,
                    fds: Vec::new(),
                })
            }
            wire::DEVICE_FEATURE_DMA_LOGGING_STOP => {
                space.stop_dirty_logging();
                Ok(Reply {
                    body: body.to_vec(),
                    fds: Vec::new(),
                })
            }
            _ => {
                let (rep, _) = wire::split::<wire::DmaLoggingReport>(data, "DMA_LOGGING_REPORT")?;
                let size = dirty_bitmap_size(rep.length, rep.page_size)?;
                self.check_count(u32::try_from(size).unwrap_or(u32::MAX))?;
                let head = wire::size_of::<wire::DeviceFeature>()
                    + wire::size_of::<wire::DmaLoggingReport>();
                if (req.argsz as usize) < head + size {
                    return Err(ProtoError::Invalid("argsz too small for the bitmap").into());
                }
                let mut out = vec![0u8; head + size];
                space.dirty_report(rep.iova, rep.length, rep.page_size, &mut out[head..])?;
                let answer = wire::DeviceFeature {
                    argsz: u32::try_from(head + size).unwrap_or(u32::MAX),
                    flags: req.flags,
                };
                out[..8].copy_from_slice(answer.as_bytes());
                out[8..head].copy_from_slice(rep.as_bytes());
                Ok(Reply {
                    body: out,
                    fds: Vec::new(),
                })
            }
        }
    }

    /// DEVICE_FEATURE GET MIGRATION, GET/SET MIG_DEVICE_STATE and GET of the pre-copy
    /// sizing (GET replies carry the data after the header, its length added to argsz, as
    /// the spec says; argsz must leave room for it, as the kernel's `vfio_check_feature`).
    fn migration_feature(
        &self,
        req: wire::DeviceFeature,
        data: &[u8],
    ) -> Result<Reply, RequestError> {
        let mut f = self.function();
        let out: Vec<u8> = match req.flags & wire::DEVICE_FEATURE_MASK {
            wire::DEVICE_FEATURE_MIGRATION => {
                let flags = f.migration_spec().map_or(0, |m| m.flags);
                wire::MigFeature { flags }.as_bytes().to_vec()
            }
            wire::DEVICE_FEATURE_MIG_DEVICE_STATE => {
                let state = if req.flags & wire::DEVICE_FEATURE_SET != 0 {
                    let (set, _) = wire::split::<wire::MigDeviceState>(data, "MIG_DEVICE_STATE")?;
                    f.set_mig_state(set.device_state)?
                } else {
                    f.mig_state()?
                };
                wire::MigDeviceState {
                    device_state: state as u32,
                    data_fd: -1,
                }
                .as_bytes()
                .to_vec()
            }
            _ => {
                let (initial_bytes, dirty_bytes) = f.mig_precopy_info()?;
                wire::MigPrecopyInfo {
                    initial_bytes,
                    dirty_bytes,
                }
                .as_bytes()
                .to_vec()
            }
        };
        let argsz = wire::size_of::<wire::DeviceFeature>() + out.len();
        if (req.argsz as usize) < argsz {
            return Err(ProtoError::Invalid("argsz too small for the feature data").into());
        }
        let mut body = wire::DeviceFeature {
            argsz: u32::try_from(argsz).unwrap_or(u32::MAX),
            flags: req.flags,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(&out);
        Ok(Reply {
            body,
            fds: Vec::new(),
        })
    }

    /// MIG_DATA_READ: up to `size` bytes of the device's outgoing state; a shorter reply
    /// means no more data (for now in PRE_COPY, for good in STOP_COPY).
    fn mig_data_read(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, _) = fixed::<wire::MigData>(body, "MIG_DATA_READ", |r| r.argsz)?;
        self.check_count(req.size)?;
        let head = wire::size_of::<wire::MigData>();
        if (req.argsz as usize) < head + req.size as usize {
            return Err(ProtoError::Invalid("argsz smaller than the data asked for").into());
        }
        let data = self.function().mig_data_read(req.size as usize)?;
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut out = wire::MigData {
            argsz: wire::argsz::<wire::MigData>().saturating_add(n),
            size: n,
        }
        .as_bytes()
        .to_vec();
        out.extend_from_slice(&data);
        Ok(Reply {
            body: out,
            fds: Vec::new(),
        })
    }

    /// MIG_DATA_WRITE: appends to the device's incoming state (RESUMING only).
    fn mig_data_write(&self, body: &[u8], fds: &[OwnedFd]) -> Result<Reply, RequestError> {
        no_fds(fds)?;
        let (req, data) = fixed::<wire::MigData>(body, "MIG_DATA_WRITE", |r| r.argsz)?;
        self.check_count(req.size)?;
        if data.len() != req.size as usize {
            return Err(ProtoError::Invalid("MIG_DATA_WRITE size does not match its data").into());
        }
        self.function().mig_data_write(data)?;
        Ok(Reply::empty())
    }

    fn teardown(&mut self) {
        self.remote.close();
        if self.negotiated.is_some() {
            self.function().close();
        }
        // The device has dropped its context on close; ours goes too, releasing whatever it
        // still pinned. A device that kept a handle is revoked by the unmap below.
        self.pinner = None;
        if let Some(space) = self.space.take() {
            space.stop_dirty_logging();
            let n = space.unmap_all();
            space.set_remote(None);
            tracing::info!(
                mappings = n,
                "client gone: DMA unmapped, interrupts released"
            );
        }
    }
}

/// Most ranges one DMA_LOGGING_START may name (the kernel's `LOG_MAX_RANGES`); E2BIG past it.
const MAX_LOGGING_RANGES: u32 = 256;
