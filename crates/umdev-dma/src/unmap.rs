//! The unmap protocol's handle: what `AddressSpace::begin_unmap` returns and what
//! DMA_UNMAP's reply waits for (the ordering is documented in `space`).

use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::mapping::Mapping;
use crate::pin::PinnerId;
use crate::range::IovaRange;
use crate::space::AddressSpace;

/// A device to tell that a range it pins is being unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnmapNotice {
    /// The device's pinner.
    pub pinner: PinnerId,
    /// The mapping being unmapped (call the device's `dma_unmap(range)`).
    pub range: IovaRange,
}

/// What an unmap did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnmapOutcome {
    /// Mappings removed.
    pub mappings: usize,
    /// Devices that did not release their pins in time and were revoked.
    pub revoked: Vec<PinnerId>,
}

/// An unmap in progress (see the module docs for the protocol). Dropping it without
/// [`finish`](Self::finish) finishes it with no wait.
#[must_use = "an unmap completes when finished"]
pub struct Unmapping<'a> {
    space: &'a AddressSpace,
    mappings: Vec<Arc<Mapping>>,
    done: bool,
}

impl std::fmt::Debug for Unmapping<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.mappings.iter().map(|m| m.range).collect();
        f.debug_struct("Unmapping")
            .field("ranges", &ranges)
            .finish_non_exhaustive()
    }
}

impl<'a> Unmapping<'a> {
    pub(crate) fn new(space: &'a AddressSpace, mappings: Vec<Arc<Mapping>>) -> Self {
        Self {
            space,
            mappings,
            done: false,
        }
    }

    /// Every (device, mapping) pair where the device pins pages of a mapping being removed:
    /// the devices whose `dma_unmap` hook must run.
    pub fn notices(&self) -> Vec<UnmapNotice> {
        let mut v = Vec::new();
        for m in &self.mappings {
            for h in &m.pins().holders {
                v.push(UnmapNotice {
                    pinner: PinnerId(h.holder),
                    range: m.range,
                });
            }
        }
        v
    }

    /// Waits up to `timeout` for the pins to be released, revokes the devices that still
    /// hold some, removes the mappings and waits for accesses in flight (steps 2-7 of the
    /// protocol). With `dirty = Some((page_size, out))`, the dirty bits of the removed
    /// range are read into `out` once no write can happen any more (the caller has checked
    /// that logging is on and sized `out` with [`dirty_bitmap_size`](crate::dirty_bitmap_size)).
    pub fn finish(mut self, timeout: Duration, dirty: Option<(u64, &mut [u8])>) -> UnmapOutcome {
        self.complete(timeout, dirty)
    }

    fn complete(&mut self, timeout: Duration, dirty: Option<(u64, &mut [u8])>) -> UnmapOutcome {
        self.done = true;
        let deadline = Instant::now() + timeout;
        let mut stragglers: Vec<u64> = Vec::new();
        for m in &self.mappings {
            let mut pins = m.pins();
            while pins.pinned_pages() > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                pins = m
                    .released
                    .wait_timeout(pins, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            stragglers.extend(pins.holders.iter().map(|h| h.holder));
        }
        stragglers.sort_unstable();
        stragglers.dedup();
        for &h in &stragglers {
            tracing::error!(
                pinner = h,
                "device kept pins into an unmapped range: pins revoked, device in error state"
            );
            self.space.release_holder(h, true);
        }
        {
            let mut table = self
                .space
                .table
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let mut index = self.space.write_index();
            for m in &self.mappings {
                index.remove(m.range.start(), m.id);
                if table
                    .get(&m.range.start())
                    .is_some_and(|t| Arc::ptr_eq(t, m))
                {
                    table.remove(&m.range.start());
                }
            }
        }
        for m in &self.mappings {
            m.gate.close_and_drain();
            tracing::debug!(range = %m.range, "DMA unmap");
        }
        if let Some((page_size, out)) = dirty {
            let mut bitmap = crate::dirty::ReportOut::new(out);
            if let (Some(first), Some(last)) = (self.mappings.first(), self.mappings.last()) {
                let start = first.range.start();
                let len = last.range.end() - start;
                for m in &self.mappings {
                    m.report_dirty(start, len, page_size, &mut bitmap);
                }
            }
            bitmap.finish();
            self.space.count_reported(out);
        }
        let mappings = std::mem::take(&mut self.mappings);
        let n = mappings.len();
        drop(mappings); // munmap and close what no other mapping shares
        UnmapOutcome {
            mappings: n,
            revoked: stragglers.into_iter().map(PinnerId).collect(),
        }
    }
}

impl Drop for Unmapping<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.complete(Duration::ZERO, None);
        }
    }
}
