//! The controller's view of guest memory: queue rings and the shadow doorbell buffers
//! pinned for as long as they exist when the client shared that memory (fd-backed), reached
//! through DMA copies otherwise; and each command's data pages, pinned for the command.

use std::sync::{Arc, PoisonError, RwLock};

use umdev_dma::{Dma, DmaError, PinnedPages, Pinner, Prot, PAGE_SIZE};

/// How the controller reaches the client's memory while a client is attached.
#[derive(Clone)]
pub(crate) struct Guest {
    pub dma: Arc<dyn Dma>,
    pub pins: Option<Arc<Pinner>>,
}

/// A range of guest memory used for as long as a queue or a buffer exists.
///
/// No lock is held while its memory is accessed: the pin is taken out of its slot for the
/// access (an `Arc`), so the session thread never waits on a thread that waits for a DMA
/// message's reply (which only the session thread reads).
pub(crate) struct Region {
    iova: u64,
    len: u64,
    /// Pinned while the client shared the memory; `None`: reached through `Dma`.
    pinned: RwLock<Option<Arc<PinnedPages>>>,
}

impl Region {
    /// `len` bytes at `iova` (page aligned): pinned (read-write) if possible.
    pub fn new(g: &Guest, iova: u64, len: u64) -> Region {
        let pages = usize::try_from(len.div_ceil(PAGE_SIZE)).unwrap_or(usize::MAX);
        let pinned = g
            .pins
            .as_ref()
            .and_then(|p| p.pin(iova, pages, Prot::READ_WRITE).ok())
            .map(Arc::new);
        Region {
            iova,
            len,
            pinned: RwLock::new(pinned),
        }
    }

    /// First IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Whether `[iova, iova + len)` overlaps it.
    pub fn overlaps(&self, iova: u64, len: u64) -> bool {
        iova < self.iova.saturating_add(self.len) && self.iova < iova.saturating_add(len)
    }

    fn pin(&self) -> Option<Arc<PinnedPages>> {
        self.pinned
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether it is pinned (fd-backed, fast).
    pub fn is_pinned(&self) -> bool {
        self.pin().is_some()
    }

    /// Gives the pin back (the client unmaps the memory, or the region goes); accesses
    /// go through `Dma` from now on.
    pub fn unpin(&self, g: &Guest) {
        let taken = self
            .pinned
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let (Some(p), Some(pinner)) = (taken, &g.pins) {
            let _ = pinner.unpin(p.iova(), p.page_count());
        }
    }

    pub fn read(&self, g: &Guest, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        match self.pin() {
            Some(p) => p.read(offset, buf),
            None => g.dma.read(self.iova + offset, buf),
        }
    }

    pub fn write(&self, g: &Guest, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        match self.pin() {
            Some(p) => p.write(offset, data),
            None => g.dma.write(self.iova + offset, data),
        }
    }
}

/// A command's data: segments of guest memory in transfer order.
#[derive(Debug, Default)]
pub(crate) struct Segments {
    /// `(iova, len)`, each within one memory page.
    pub list: Vec<(u64, u64)>,
}

impl Segments {
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.list.iter().map(|s| s.1).sum()
    }

    /// Page-aligned runs of contiguous pages covering the segments: `(iova, pages)`.
    fn runs(&self) -> Vec<(u64, usize)> {
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for &(iova, len) in &self.list {
            let first = iova & !(PAGE_SIZE - 1);
            let last = (iova + len - 1) & !(PAGE_SIZE - 1);
            let pages = usize::try_from((last - first) / PAGE_SIZE + 1).unwrap_or(usize::MAX);
            match runs.last_mut() {
                Some((start, n)) if *start + *n as u64 * PAGE_SIZE == first => *n += pages,
                Some((start, n)) if *start + (*n as u64 - 1) * PAGE_SIZE == first => {
                    *n += pages - 1
                }
                _ => runs.push((first, pages)),
            }
        }
        runs
    }
}

/// A command's data pages, pinned for the command (released by [`Pinned::release`]).
pub(crate) struct Pinned {
    pins: Vec<PinnedPages>,
}

impl Pinned {
    /// Pins what `segs` cover with `prot`; `None` (nothing left pinned) when the memory
    /// cannot be pinned (not shared, or the locked-memory budget is used up): the command
    /// then goes through DMA copies.
    pub fn pin(g: &Guest, segs: &Segments, prot: Prot) -> Option<Pinned> {
        let pinner = g.pins.as_ref()?;
        let mut pins = Vec::new();
        for (iova, pages) in segs.runs() {
            let mut at = iova;
            let mut left = pages;
            while left > 0 {
                let n = left.min(umdev_dma::MAX_PIN_PAGES);
                match pinner.pin(at, n, prot) {
                    Ok(p) => pins.push(p),
                    Err(_) => {
                        Pinned { pins }.release(g);
                        return None;
                    }
                }
                at += n as u64 * PAGE_SIZE;
                left -= n;
            }
        }
        Some(Pinned { pins })
    }

    fn find(&self, iova: u64, len: u64) -> Option<(&PinnedPages, u64)> {
        self.pins
            .iter()
            .find(|p| p.iova() <= iova && iova + len <= p.iova() + p.len_bytes())
            .map(|p| (p, iova - p.iova()))
    }

    /// Copies guest memory at the segments into `buf` (in order).
    pub fn read(&self, segs: &Segments, buf: &mut [u8]) -> Result<(), DmaError> {
        let mut at = 0usize;
        for &(iova, len) in &segs.list {
            let n = usize::try_from(len).unwrap_or(0);
            let (p, off) = self.find(iova, len).ok_or(DmaError::Fault { iova })?;
            p.read(off, &mut buf[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Copies `data` into guest memory at the segments (in order).
    pub fn write(&self, segs: &Segments, data: &[u8]) -> Result<(), DmaError> {
        let mut at = 0usize;
        for &(iova, len) in &segs.list {
            let n = usize::try_from(len).unwrap_or(0);
            let (p, off) = self.find(iova, len).ok_or(DmaError::Fault { iova })?;
            p.write(off, &data[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Unpins everything.
    pub fn release(self, g: &Guest) {
        if let Some(pinner) = &g.pins {
            for p in self.pins {
                let _ = pinner.unpin(p.iova(), p.page_count());
            }
        }
    }
}

/// Copies guest memory at `segs` into `buf` through `Dma` (messages where not shared).
pub(crate) fn dma_read(g: &Guest, segs: &Segments, buf: &mut [u8]) -> Result<(), DmaError> {
    let mut at = 0usize;
    for &(iova, len) in &segs.list {
        let n = usize::try_from(len).unwrap_or(0);
        g.dma.read(iova, &mut buf[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// Copies `data` into guest memory at `segs` through `Dma`.
pub(crate) fn dma_write(g: &Guest, segs: &Segments, data: &[u8]) -> Result<(), DmaError> {
    let mut at = 0usize;
    for &(iova, len) in &segs.list {
        let n = usize::try_from(len).unwrap_or(0);
        g.dma.write(iova, &data[at..at + n])?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_contiguous_pages() {
        let s = Segments {
            list: vec![
                (0x1200, 0xe00),
                (0x2000, 0x1000),
                (0x3000, 0x800),
                (0x9000, 0x200),
            ],
        };
        assert_eq!(s.runs(), vec![(0x1000, 3), (0x9000, 1)]);
        assert_eq!(s.len(), 0xe00 + 0x1000 + 0x800 + 0x200);
        let t = Segments {
            list: vec![(0x1000, 0x200), (0x1200, 0x200)],
        };
        assert_eq!(t.runs(), vec![(0x1000, 1)]);
    }
}
