//! NVM commands: Read, Write, Flush, Write Zeroes, Dataset Management; and PRPs.
//!
//! A Read or Write whose data pages the poller can pin (the client shared that memory) runs
//! on the poller, pins held for the command and released at its completion. Otherwise (the
//! memory goes through DMA_READ/DMA_WRITE messages, or the locked-memory budget is used up),
//! and for Flush, the command is a job of its own on the work context, so many transfers are
//! in flight at once and none runs inside a doorbell's region access.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use umdev_dma::Prot;

use crate::ctrl::{Attached, Ctrl, Sq};
use crate::identify::{LBA_SHIFT, MDTS, NSID};
use crate::mem::{dma_read, dma_write, Guest, Pinned, Segments};
use crate::regs::{self, io, Sqe, Status};

/// Most bytes one command transfers (MDTS).
pub const MAX_TRANSFER: u64 = regs::PAGE << MDTS;

/// The data segments of a transfer of `len` bytes described by PRP1 and PRP2 (a second
/// page, or a PRP list, chained across list pages). PRP Offset Invalid for a misaligned
/// entry; Data Transfer Error when a list cannot be read.
pub(crate) fn prp_segments(g: &Guest, prp1: u64, prp2: u64, len: u64) -> Result<Segments, Status> {
    let mut segs = Segments::default();
    if len == 0 {
        return Ok(segs);
    }
    if prp1 % 4 != 0 {
        return Err(regs::PRP_OFFSET_INVALID);
    }
    let first = len.min(regs::PAGE - prp1 % regs::PAGE);
    segs.list.push((prp1, first));
    let mut left = len - first;
    if left == 0 {
        return Ok(segs);
    }
    if left <= regs::PAGE {
        if prp2 % regs::PAGE != 0 {
            return Err(regs::PRP_OFFSET_INVALID);
        }
        segs.list.push((prp2, left));
        return Ok(segs);
    }
    // A PRP list, possibly chained: the last entry of a full list page points to the next.
    if prp2 % 8 != 0 {
        return Err(regs::PRP_OFFSET_INVALID);
    }
    let mut list = prp2;
    while left > 0 {
        let slots = (regs::PAGE - list % regs::PAGE) / 8;
        let needed = left.div_ceil(regs::PAGE);
        let take = if needed > slots { slots } else { needed };
        let mut raw = vec![0u8; usize::try_from(take * 8).map_err(|_| regs::INVALID_FIELD)?];
        g.dma
            .read(list, &mut raw)
            .map_err(|_| regs::DATA_TRANSFER_ERROR)?;
        let entries: Vec<u64> = raw
            .chunks_exact(8)
            .map(|e| u64::from_le_bytes(e.try_into().unwrap_or([0; 8])))
            .collect();
        let (data, next) = if needed > slots {
            (&entries[..entries.len() - 1], entries.last().copied())
        } else {
            (&entries[..], None)
        };
        for &e in data {
            if e % regs::PAGE != 0 {
                return Err(regs::PRP_OFFSET_INVALID);
            }
            let n = left.min(regs::PAGE);
            segs.list.push((e, n));
            left -= n;
        }
        if let Some(n) = next {
            if n % 8 != 0 {
                return Err(regs::PRP_OFFSET_INVALID);
            }
            list = n;
        }
    }
    Ok(segs)
}

/// A Read or Write, checked.
struct Transfer {
    write: bool,
    offset: u64,
    segs: Segments,
}

impl Ctrl {
    pub(crate) fn io(self: &Arc<Self>, a: &Attached, gen: u64, sq: &Arc<Sq>, c: Sqe) {
        let result = self.io_start(a, gen, sq, &c);
        if let Some(r) = result {
            let (dw0, status) = match r {
                Ok(()) => (0, regs::SUCCESS),
                Err(s) => (0, s),
            };
            self.complete(gen, sq, c.cid, dw0, status);
        }
    }

    /// Runs the command now (`Some`: its result) or hands it to a job (`None`).
    fn io_start(
        self: &Arc<Self>,
        a: &Attached,
        gen: u64,
        sq: &Arc<Sq>,
        c: &Sqe,
    ) -> Option<Result<(), Status>> {
        if c.flags & 0xc0 != 0 {
            // SGLs are not offered.
            return Some(Err(regs::INVALID_FIELD));
        }
        let flush_all = c.opcode == io::FLUSH && c.nsid == u32::MAX;
        if c.nsid != NSID && !flush_all {
            return Some(Err(regs::INVALID_NAMESPACE));
        }
        match c.opcode {
            io::READ | io::WRITE => {
                let t = match self.transfer(&a.guest, c) {
                    Ok(t) => t,
                    Err(s) => return Some(Err(s)),
                };
                let prot = if t.write { Prot::READ } else { Prot::WRITE };
                match Pinned::pin(&a.guest, &t.segs, prot) {
                    Some(p) => {
                        let r =
                            self.move_data(&t, |buf| p.read(&t.segs, buf), |d| p.write(&t.segs, d));
                        p.release(&a.guest);
                        Some(r)
                    }
                    None => {
                        self.in_job(a, gen, sq, c.cid, move |me, g| {
                            me.move_data(
                                &t,
                                |buf| dma_read(g, &t.segs, buf),
                                |d| dma_write(g, &t.segs, d),
                            )
                        });
                        None
                    }
                }
            }
            io::FLUSH => {
                self.in_job(a, gen, sq, c.cid, |me, _| {
                    me.ns.flush().map_err(|e| {
                        tracing::warn!(error = %e, "mnvme: flush failed");
                        regs::INTERNAL_ERROR
                    })
                });
                None
            }
            io::WRITE_ZEROES => {
                let (offset, len) = match self.lba_range(c) {
                    Ok(r) => r,
                    Err(s) => return Some(Err(s)),
                };
                Some(self.ns.deallocate(offset, len).map_err(|e| {
                    tracing::warn!(error = %e, "mnvme: write zeroes failed");
                    regs::INTERNAL_ERROR
                }))
            }
            io::DSM => Some(self.dataset_management(&a.guest, c)),
            _ => Some(Err(regs::INVALID_OPCODE)),
        }
    }

    /// The byte range of a command's SLBA (CDW10-11) and NLB (CDW12, 0-based).
    fn lba_range(&self, c: &Sqe) -> Result<(u64, u64), Status> {
        let slba = u64::from(c.cdw(10)) | (u64::from(c.cdw(11)) << 32);
        let nlb = u64::from(c.cdw(12) & 0xffff) + 1;
        match slba.checked_add(nlb) {
            Some(end) if end <= self.ns.blocks() => Ok((slba << LBA_SHIFT, nlb << LBA_SHIFT)),
            _ => Err(regs::LBA_OUT_OF_RANGE),
        }
    }

    fn transfer(&self, g: &Guest, c: &Sqe) -> Result<Transfer, Status> {
        let (offset, len) = self.lba_range(c)?;
        if len > MAX_TRANSFER {
            return Err(regs::INVALID_FIELD);
        }
        let segs = prp_segments(g, c.prp1, c.prp2, len)?;
        Ok(Transfer {
            write: c.opcode == io::WRITE,
            offset,
            segs,
        })
    }

    /// Moves a transfer's data between guest memory (`from_guest`, `to_guest`) and the
    /// backing file.
    fn move_data(
        &self,
        t: &Transfer,
        from_guest: impl FnOnce(&mut [u8]) -> Result<(), umdev_dma::DmaError>,
        to_guest: impl FnOnce(&[u8]) -> Result<(), umdev_dma::DmaError>,
    ) -> Result<(), Status> {
        let len = usize::try_from(t.segs.len()).map_err(|_| regs::INVALID_FIELD)?;
        // One bounce buffer per thread, grown to the largest transfer seen (MDTS at most).
        thread_local! {
            static BOUNCE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BOUNCE.with_borrow_mut(|bounce| {
            if bounce.len() < len {
                bounce.resize(len, 0);
            }
            self.move_through(t, &mut bounce[..len], from_guest, to_guest)
        })
    }

    fn move_through(
        &self,
        t: &Transfer,
        buf: &mut [u8],
        from_guest: impl FnOnce(&mut [u8]) -> Result<(), umdev_dma::DmaError>,
        to_guest: impl FnOnce(&[u8]) -> Result<(), umdev_dma::DmaError>,
    ) -> Result<(), Status> {
        let len = buf.len() as u64;
        let s = &self.stats;
        if t.write {
            from_guest(buf).map_err(|e| {
                tracing::debug!(error = %e, "mnvme: write's data cannot be read");
                regs::DATA_TRANSFER_ERROR
            })?;
            self.ns.write(t.offset, buf).map_err(|e| {
                tracing::warn!(error = %e, "mnvme: backing file write failed");
                regs::INTERNAL_ERROR
            })?;
            s.write_cmds.fetch_add(1, Ordering::Relaxed);
            s.write_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            self.ns.read(t.offset, buf).map_err(|e| {
                tracing::warn!(error = %e, "mnvme: backing file read failed");
                regs::INTERNAL_ERROR
            })?;
            to_guest(buf).map_err(|e| {
                tracing::debug!(error = %e, "mnvme: read's data cannot be written");
                regs::DATA_TRANSFER_ERROR
            })?;
            s.read_cmds.fetch_add(1, Ordering::Relaxed);
            s.read_bytes.fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Runs `run` as a job of its own and completes the command with its result.
    fn in_job(
        self: &Arc<Self>,
        a: &Attached,
        gen: u64,
        sq: &Arc<Sq>,
        cid: u16,
        run: impl FnOnce(&Arc<Ctrl>, &Guest) -> Result<(), Status> + Send + 'static,
    ) {
        let (me, sq2, g) = (self.clone(), sq.clone(), a.guest.clone());
        let job = move || {
            let status = match run(&me, &g) {
                Ok(()) => regs::SUCCESS,
                Err(s) => s,
            };
            me.complete(gen, &sq2, cid, 0, status);
            if let Some(cq) = me.cq(sq2.cqid) {
                if me.signal(&cq, false) {
                    // Coalescing holds the interrupt: the poller signals it in time.
                    me.kick();
                }
            }
        };
        if let Err(e) = a.work.submit(job) {
            tracing::warn!(errno = %e, "mnvme: cannot queue a command");
            self.complete(gen, sq, cid, 0, regs::INTERNAL_ERROR);
        }
    }

    /// Dataset Management: with the Deallocate attribute, each range becomes a hole.
    fn dataset_management(&self, g: &Guest, c: &Sqe) -> Result<(), Status> {
        let nr = u64::from(c.cdw(10) & 0xff) + 1;
        let deallocate = c.cdw(11) & (1 << 2) != 0;
        let segs = prp_segments(g, c.prp1, c.prp2, nr * 16)?;
        let mut raw = vec![0u8; usize::try_from(nr * 16).map_err(|_| regs::INVALID_FIELD)?];
        dma_read(g, &segs, &mut raw).map_err(|_| regs::DATA_TRANSFER_ERROR)?;
        let ranges: Vec<(u64, u64)> = raw
            .chunks_exact(16)
            .map(|r| {
                let blocks = u64::from(u32::from_le_bytes(r[4..8].try_into().unwrap_or([0; 4])));
                let slba = u64::from_le_bytes(r[8..16].try_into().unwrap_or([0; 8]));
                (slba, blocks)
            })
            .collect();
        for &(slba, blocks) in &ranges {
            if slba
                .checked_add(blocks)
                .is_none_or(|e| e > self.ns.blocks())
            {
                return Err(regs::LBA_OUT_OF_RANGE);
            }
        }
        if deallocate {
            for (slba, blocks) in ranges.into_iter().filter(|r| r.1 > 0) {
                self.ns
                    .deallocate(slba << LBA_SHIFT, blocks << LBA_SHIFT)
                    .map_err(|_| regs::INTERNAL_ERROR)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use umdev_dma::DmaError;

    /// Guest memory as a map of pages, for PRP list walks.
    struct Mem(Mutex<std::collections::BTreeMap<u64, Vec<u8>>>);
    impl umdev_dma::Dma for Mem {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let m = self.0.lock().unwrap();
            let page = m.get(&(iova & !0xfff)).ok_or(DmaError::Fault { iova })?;
            let off = (iova & 0xfff) as usize;
            buf.copy_from_slice(&page[off..off + buf.len()]);
            Ok(())
        }
        fn write(&self, iova: u64, _: &[u8]) -> Result<(), DmaError> {
            Err(DmaError::Fault { iova })
        }
    }

    fn guest(lists: &[(u64, Vec<u64>)]) -> Guest {
        let mut m = std::collections::BTreeMap::new();
        for (addr, entries) in lists {
            let page = m.entry(*addr & !0xfff).or_insert_with(|| vec![0u8; 4096]);
            let off = (*addr & 0xfff) as usize;
            for (i, e) in entries.iter().enumerate() {
                page[off + i * 8..off + i * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
        }
        Guest {
            dma: Arc::new(Mem(Mutex::new(m))),
            pins: None,
        }
    }

    #[test]
    fn one_and_two_pages_need_no_list() {
        let g = guest(&[]);
        let s = prp_segments(&g, 0x1200, 0, 0x200).unwrap();
        assert_eq!(s.list, vec![(0x1200, 0x200)]);
        let s = prp_segments(&g, 0x1800, 0x5000, 0x1000).unwrap();
        assert_eq!(s.list, vec![(0x1800, 0x800), (0x5000, 0x800)]);
        assert_eq!(
            prp_segments(&g, 0x1800, 0x5010, 0x1000).unwrap_err(),
            regs::PRP_OFFSET_INVALID
        );
        assert_eq!(
            prp_segments(&g, 0x1802, 0, 0x10).unwrap_err(),
            regs::PRP_OFFSET_INVALID
        );
    }

    #[test]
    fn a_list_is_walked_and_chained_across_list_pages() {
        // 4 pages from a list at the last two slots of a page, chained to a second page.
        let g = guest(&[
            (0x9ff0, vec![0xa000, 0x20000]),
            (0x20000, vec![0xb000, 0xc000, 0xd000]),
        ]);
        let s = prp_segments(&g, 0x1000, 0x9ff0, 0x4000).unwrap();
        assert_eq!(
            s.list,
            vec![
                (0x1000, 0x1000),
                (0xa000, 0x1000),
                (0xb000, 0x1000),
                (0xc000, 0x1000)
            ]
        );
        let bad = guest(&[(0x8000, vec![0xa000, 0xb008])]);
        assert_eq!(
            prp_segments(&bad, 0x1000, 0x8000, 0x3000).unwrap_err(),
            regs::PRP_OFFSET_INVALID
        );
        assert_eq!(
            prp_segments(&guest(&[]), 0x1000, 0x8000, 0x3000).unwrap_err(),
            regs::DATA_TRANSFER_ERROR,
            "an unmapped list"
        );
    }
}
