//! The device and its regions: DEVICE_GET_INFO, GET_REGION_INFO (with the sparse-mmap
//! capability and the region fd), GET_REGION_IO_FDS, REGION_READ/WRITE,
//! REGION_WRITE_MULTI and DEVICE_RESET.

use rustix::io::Errno;
use umdev_proto::{request, wire, ProtoError};
use zerocopy::IntoBytes;

use super::{Reply, Session};
use crate::error::{refuse, RequestError};

/// The sparse-mmap capability of a region with these areas (empty: no capability).
fn sparse_mmap_caps(areas: &[(u64, u64)]) -> Result<Vec<u8>, RequestError> {
    let mut caps = Vec::new();
    if areas.is_empty() {
        return Ok(caps);
    }
    let nr = u32::try_from(areas.len()).map_err(|_| ProtoError::TooMany {
        what: "sparse mmap areas",
        max: u32::MAX as usize,
    })?;
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
    for &(offset, size) in areas {
        caps.extend_from_slice(wire::SparseMmapArea { offset, size }.as_bytes());
    }
    Ok(caps)
}

impl Session<'_> {
    pub(super) fn device_info(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        request::no_fds(fds)?;
        request::fixed::<wire::DeviceInfo>(body, "DEVICE_GET_INFO", |r| r.argsz)?;
        let info = self.function().device_info();
        Ok(Reply::of(&wire::DeviceInfo {
            argsz: wire::argsz::<wire::DeviceInfo>(),
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        }))
    }

    /// GET_REGION_INFO. The reply's `argsz` always says how much the whole answer takes;
    /// the capabilities (and the CAPS flag with their offset) are sent only when they fit
    /// in the caller's `argsz`. A client that asked with too small an `argsz` sees no CAPS
    /// flag and can ask again with the `argsz` the reply gave; it never sees CAPS with a
    /// `cap_offset` outside the reply, which QEMU's client refuses (it then fails to
    /// realize a device with a sparse-mmap region).
    pub(super) fn region_info(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        request::no_fds(fds)?;
        let (req, _) =
            request::fixed::<wire::RegionInfo>(body, "DEVICE_GET_REGION_INFO", |r| r.argsz)?;
        let info = self.function().region_info(req.index)?;
        let areas = info.mmap.as_ref().map_or(&[][..], |m| &m.areas[..]);
        let caps = sparse_mmap_caps(areas)?;
        let base = wire::size_of::<wire::RegionInfo>();
        let needed = u32::try_from(base + caps.len())
            .map_err(|_| refuse(Errno::OVERFLOW, "region info too large"))?;
        let with_caps = !caps.is_empty() && req.argsz >= needed;
        let out = wire::RegionInfo {
            argsz: needed,
            flags: info.flags
                | if with_caps {
                    wire::REGION_INFO_FLAG_CAPS
                } else {
                    0
                },
            index: req.index,
            cap_offset: if with_caps {
                wire::argsz::<wire::RegionInfo>()
            } else {
                0
            },
            size: info.size,
            offset: info.mmap.as_ref().map_or(0, |m| m.offset),
        };
        let mut body = out.as_bytes().to_vec();
        if with_caps {
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

    /// GET_REGION_IO_FDS: the device's ioeventfd spans of the region, an eventfd each
    /// (the function watches them from now on). Like GET_REGION_INFO, the reply's `argsz`
    /// says how much the whole answer takes; the sub-regions and their fds are sent only
    /// when they fit in the caller's `argsz` (`count` says how many there are either way).
    pub(super) fn region_io_fds(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        request::no_fds(fds)?;
        let (req, _) =
            request::fixed::<wire::RegionIoFds>(body, "DEVICE_GET_REGION_IO_FDS", |r| r.argsz)?;
        if req.flags != 0 {
            return Err(ProtoError::UnknownFlags(req.flags).into());
        }
        let areas = self.function().region_io_fds(req.index)?;
        let head = wire::size_of::<wire::RegionIoFds>();
        let entry = wire::size_of::<wire::IoFdSubRegion>();
        let needed = u32::try_from(head + entry * areas.len())
            .map_err(|_| refuse(Errno::OVERFLOW, "too many sub-regions"))?;
        let count = u32::try_from(areas.len())
            .map_err(|_| refuse(Errno::OVERFLOW, "too many sub-regions"))?;
        let mut body = wire::RegionIoFds {
            argsz: needed,
            flags: 0,
            index: req.index,
            count,
        }
        .as_bytes()
        .to_vec();
        if req.argsz < needed {
            return Ok(Reply::bytes(body));
        }
        let max = self.negotiated.as_ref().map_or(0, |n| n.client_max_fds);
        if count > max {
            return Err(refuse(
                Errno::TOOBIG,
                "the region's ioeventfds exceed the client's max_msg_fds",
            ));
        }
        let mut out_fds = Vec::with_capacity(areas.len());
        for (i, a) in areas.into_iter().enumerate() {
            let sub = wire::IoFdSubRegion {
                offset: a.offset,
                size: a.size,
                fd_index: u32::try_from(i).unwrap_or(u32::MAX),
                kind: wire::IO_FD_TYPE_IOEVENTFD,
                flags: if a.datamatch.is_some() {
                    wire::IOEVENTFD_FLAG_DATAMATCH
                } else {
                    0
                },
                padding: 0,
                datamatch: a.datamatch.unwrap_or(0),
            };
            body.extend_from_slice(sub.as_bytes());
            out_fds.push(a.fd);
        }
        Ok(Reply { body, fds: out_fds })
    }

    pub(super) fn region_read(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let req = request::region_read(body, fds, self.config.max_data_xfer_size)?;
        let head = wire::size_of::<wire::RegionAccess>();
        let mut out = vec![0u8; head + req.count as usize];
        self.function()
            .region_read(req.region, req.offset, &mut out[head..])?;
        out[..head].copy_from_slice(req.as_bytes());
        Ok(Reply::bytes(out))
    }

    pub(super) fn region_write(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let (req, data) = request::region_write(body, fds, self.config.max_data_xfer_size)?;
        self.function().region_write(req.region, req.offset, data)?;
        Ok(Reply::of(&req))
    }

    pub(super) fn write_multi(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let (req, writes) = request::write_multi(body, fds)?;
        if !self.negotiated.as_ref().is_some_and(|n| n.write_multiple) {
            tracing::debug!("REGION_WRITE_MULTI without negotiating write_multiple; accepted");
        }
        let mut f = self.function();
        for w in &writes {
            f.region_write(w.region, w.offset, &w.data[..w.count as usize])?;
        }
        Ok(Reply::of(&req))
    }

    /// DEVICE_RESET: EINVAL for a device that declares no reset (GET_INFO says so too).
    pub(super) fn reset(&self, fds: usize) -> Result<Reply, RequestError> {
        request::no_fds(fds)?;
        self.function().reset()?;
        tracing::info!(client = %self.client, "device reset by the client");
        Ok(Reply::empty())
    }
}
