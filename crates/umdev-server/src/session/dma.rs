//! DMA_MAP and DMA_UNMAP: the client's memory entering and leaving the address space.

use std::os::fd::OwnedFd;

use rustix::io::Errno;
use umdev_dma::{dirty_bitmap_size, Backing, IovaRange, Prot};
use umdev_proto::{request, wire, ProtoError};
use zerocopy::IntoBytes;

use super::{Reply, Session};
use crate::error::{refuse, RequestError};

impl Session<'_> {
    pub(super) fn dma_map(
        &mut self,
        body: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<Reply, RequestError> {
        let req = request::dma_map(body, fds.len())?.map;
        let prot = Prot::from_bits(u8::try_from(req.flags).unwrap_or(0))
            .ok_or(ProtoError::UnknownFlags(req.flags))?;
        let range = IovaRange::new(req.address, req.size)?;
        if self.config.refuse_unsealed {
            if let Some(fd) = fds.last() {
                let sealed = rustix::fs::fcntl_get_seals(fd)
                    .is_ok_and(|s| s.contains(rustix::fs::SealFlags::SHRINK));
                if !sealed {
                    crate::refusals::refused(
                        "unsealed-memory",
                        Some(&self.client),
                        "DMA_MAP of a file not sealed against shrinking (F_SEAL_SHRINK)",
                    );
                    return Err(refuse(
                        Errno::PERM,
                        "the file is not sealed against shrinking",
                    ));
                }
            }
        }
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
    /// the device's `dma_unmap` hook runs if it pins pages there, the device's work context
    /// drains (no job of the device still touches the range), its pins are waited for (at
    /// most `unpin_timeout`, then revoked), in-flight accesses drain, and only then is the
    /// reply sent. With GET_DIRTY_BITMAP the range's dirty bits come with it.
    pub(super) fn dma_unmap(&mut self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let checked = request::dma_unmap(body, fds)?;
        let req = checked.unmap;
        let space = self.space()?.clone();
        let mut bitmap = None;
        if let Some(bm) = checked.bitmap {
            if !space.is_dirty_logging() {
                return Err(refuse(Errno::INVAL, "dirty page logging is not started"));
            }
            let size = dirty_bitmap_size(req.size, bm.pgsize)?;
            if bm.size != size as u64 {
                return Err(ProtoError::Invalid("bitmap size does not match the range").into());
            }
            request::check_count(size as u64, self.config.max_data_xfer_size)?;
            let needed =
                wire::size_of::<wire::DmaUnmap>() + wire::size_of::<wire::DmaUnmapBitmap>() + size;
            if (req.argsz as usize) < needed {
                return Err(ProtoError::Invalid("argsz too small for the bitmap").into());
            }
            bitmap = Some((bm, vec![0u8; size]));
        }
        let unmapping = if checked.all {
            space.begin_unmap_all()
        } else {
            space.begin_unmap(IovaRange::new(req.address, req.size)?)?
        };
        {
            let mut f = self.function();
            // This session's device is the only pinner of the space: tell it once per range.
            let mut told: Vec<IovaRange> = Vec::new();
            for n in unmapping.notices() {
                if !told.contains(&n.range) {
                    told.push(n.range);
                    f.dma_unmap(n.range.start(), n.range.len());
                }
            }
            f.drain_work();
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
        Ok(Reply::bytes(out))
    }
}
