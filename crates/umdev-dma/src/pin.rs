//! Pinning for parent drivers: the userspace `vfio_pin_pages` / `vfio_unpin_pages`.
//!
//! A device gets a [`Pinner`] for the client's address space. `pin(iova, npages, prot)`
//! returns [`PinnedPages`]: handles to the host memory of those IOVA pages, with checked,
//! volatile access, usable without a table lookup. Pins are keyed by IOVA and counted per
//! device and page, so pinning a page twice needs two unpins. A call pins at most
//! [`MAX_PIN_PAGES`] pages and is all or nothing.
//!
//! Only fd-backed mappings can be pinned: a fd-less mapping has no host memory to hand out
//! (its bytes exist only in the client), so pinning it fails with EINVAL; use the copies of
//! [`Dma`](crate::Dma) for those.
//!
//! Pinned pages are charged to the client ([`ClientMemory`]): once per host page, whatever
//! the number of devices, mappings and pins on it.
//!
//! A handle stays usable while its mapping exists and its device is not revoked; using it
//! after unpinning is a parent driver bug that this layer does not detect, but it cannot
//! outlive the unmap: see the protocol in `space`.

// Page indexes and in-page offsets are usize = u64 here: umdev targets 64-bit Linux only
// (lib.rs asserts it at compile time).
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard, Weak};

use crate::client::{Charges, ClientMemory, FileKey};
use crate::error::DmaError;
use crate::mapping::{Mapping, MappingPins, Memory};
use crate::range::{Prot, PAGE_SIZE};
use crate::space::{find, AddressSpace};

/// Most pages one pin or unpin call may name: the kernel's `VFIO_PIN_PAGES_MAX_ENTRIES`.
pub const MAX_PIN_PAGES: usize = 512;

/// Identifies a [`Pinner`] (one device) within its address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PinnerId(pub(crate) u64);

impl PinnerId {
    /// The raw number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Shared between a pinner and its handles.
#[derive(Debug)]
pub(crate) struct HolderState {
    pub(crate) id: u64,
    revoked: AtomicBool,
}

impl HolderState {
    pub(crate) fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }
}

/// One device's pinning access to an address space. Dropping it releases the device's
/// pins (the device has gone).
pub struct Pinner {
    space: Arc<AddressSpace>,
    state: Arc<HolderState>,
}

impl std::fmt::Debug for Pinner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinner")
            .field("id", &self.state.id)
            .field("revoked", &self.state.is_revoked())
            .finish_non_exhaustive()
    }
}

impl AddressSpace {
    /// A pinner for one device of this address space.
    pub fn pinner(self: &Arc<Self>) -> Pinner {
        let state = Arc::new(HolderState {
            id: self.next_holder_id(),
            revoked: AtomicBool::new(false),
        });
        self.register_holder(&state);
        Pinner {
            space: self.clone(),
            state,
        }
    }
}

impl Drop for Pinner {
    fn drop(&mut self) {
        // Handles that outlive their pinner fail from now on.
        self.state.revoke();
        self.space.release_holder(self.state.id, false);
    }
}

/// One contiguous part of a pin call inside one mapping.
struct Segment {
    mapping: Arc<Mapping>,
    start: u64,
    end: u64,
}

impl Segment {
    /// Index in the mapping's page counters of the page at `iova`.
    fn page(&self, iova: u64) -> usize {
        ((iova - self.mapping.range.start()) / PAGE_SIZE) as usize
    }

    fn pages(&self) -> std::ops::Range<usize> {
        self.page(self.start)..self.page(self.end)
    }
}

/// Host page of mapping page `i`: (file, page index in the file).
fn host_page(m: &Mapping, i: usize) -> Option<(FileKey, usize)> {
    match &m.memory {
        Memory::Mmap(s) => {
            let file_page =
                s.shared.file_start / PAGE_SIZE + (s.offset / PAGE_SIZE as usize) as u64;
            Some((s.shared.key, file_page as usize + i))
        }
        Memory::Remote => None,
    }
}

/// Takes one host-page reference; returns whether it is newly pinned (to be charged).
fn host_inc(c: &mut Charges, m: &Mapping, i: usize) -> bool {
    let Some((id, hp)) = host_page(m, i) else {
        return false;
    };
    c.host.entry(id).or_default().inc(hp) == Some(0)
}

/// Drops one host-page reference, crediting the budget (and unlocking the page, with
/// `lock`) when it was the last.
fn host_dec(c: &mut Charges, m: &Mapping, i: usize, lock: bool) {
    let Some((id, hp)) = host_page(m, i) else {
        return;
    };
    let (last, empty) = match c.host.get_mut(&id) {
        Some(counts) => (counts.dec(hp) == 1, counts.nonzero() == 0),
        None => return,
    };
    if last {
        c.credit(1);
        if lock {
            lock_page(m, i, false);
        }
    }
    if empty {
        c.host.remove(&id);
    }
}

/// Locks (or unlocks) the host page of mapping page `i` in memory.
fn lock_page(m: &Mapping, i: usize, lock: bool) -> bool {
    let Memory::Mmap(s) = &m.memory else {
        return true;
    };
    let at = s.offset + i * PAGE_SIZE as usize;
    let r = if lock {
        umdev_sys::mlock(&s.shared.region, at, PAGE_SIZE as usize)
    } else {
        umdev_sys::munlock(&s.shared.region, at, PAGE_SIZE as usize)
    };
    if let Err(errno) = r {
        tracing::warn!(%errno, lock, "mlock/munlock of a pinned page failed");
        return false;
    }
    true
}

/// Drops every pin of `holder` in `m` (caller holds the pin lock), crediting the budget.
pub(crate) fn release_all(client: &ClientMemory, m: &Mapping, pins: &mut MappingPins, holder: u64) {
    let Some(i) = pins.holders.iter().position(|h| h.holder == holder) else {
        return;
    };
    let h = pins.holders.swap_remove(i);
    let mut c = client.charges();
    for (page, _) in h.counts.iter() {
        host_dec(&mut c, m, page, client.lock_pages());
    }
    drop(c);
    if pins.unmapping && pins.pinned_pages() == 0 {
        m.released.notify_all();
    }
}

impl Pinner {
    /// This pinner's id (as [`UnmapNotice`](crate::UnmapNotice) names it).
    pub fn id(&self) -> PinnerId {
        PinnerId(self.state.id)
    }

    /// The address space pinned into.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    /// Whether this device was revoked (it kept pins past an unmap's deadline).
    pub fn is_revoked(&self) -> bool {
        self.state.is_revoked()
    }

    /// Pages this device has pinned (each counted once however often it is pinned).
    pub fn pinned_pages(&self) -> u64 {
        let id = self.state.id;
        self.space
            .read_table()
            .values()
            .map(|m| m.pins().holder(id).map_or(0, |h| h.counts.nonzero()))
            .sum()
    }

    /// Pins the `npages` IOVA pages from `iova` for accesses with `prot`, and returns
    /// handles to their memory.
    ///
    /// Errors, with nothing pinned: [`DmaError::TooManyPages`] (E2BIG) past
    /// [`MAX_PIN_PAGES`]; [`DmaError::PinInvalid`] (EINVAL) for no pages, an unaligned
    /// `iova`, an empty `prot`, a page that is not wholly mapped, a fd-less mapping, a mapping
    /// lacking `prot`, or a mapping being unmapped; [`DmaError::OverBudget`] (ENOMEM, logged)
    /// when the client's locked-memory budget would be exceeded; [`DmaError::Revoked`] (EIO)
    /// once this device was revoked.
    pub fn pin(&self, iova: u64, npages: usize, prot: Prot) -> Result<PinnedPages, DmaError> {
        if prot.is_empty() {
            return Err(DmaError::PinInvalid {
                iova,
                reason: "no access asked for",
            });
        }
        let segments = self.segments(iova, npages, Some(prot))?;
        let mut locks: Vec<MutexGuard<'_, MappingPins>> =
            segments.iter().map(|s| s.mapping.pins()).collect();
        if locks.iter().any(|p| p.unmapping) {
            return Err(DmaError::PinInvalid {
                iova,
                reason: "the mapping is being unmapped",
            });
        }
        let id = self.state.id;
        let writable = prot.contains(Prot::WRITE);
        let client = self.space.client();
        let mut c = client.charges();
        let mut newly = 0u64;
        let mut done: Vec<(usize, usize)> = Vec::with_capacity(npages);
        let mut overflow = false;
        let mut to_lock: Vec<(usize, usize)> = Vec::new();
        'all: for (si, (s, pins)) in segments.iter().zip(locks.iter_mut()).enumerate() {
            let h = pins.holder_mut(id);
            for page in s.pages() {
                let Some(old) = h.counts.inc(page) else {
                    overflow = true;
                    break 'all;
                };
                if writable {
                    h.writable.inc(page);
                }
                if old == 0 && host_inc(&mut c, &s.mapping, page) {
                    newly += 1;
                    if client.lock_pages() {
                        to_lock.push((si, page));
                    }
                }
                done.push((si, page));
            }
        }
        let mut charged = if overflow {
            Err(DmaError::PinInvalid {
                iova,
                reason: "pin count overflow",
            })
        } else {
            client.charge(&mut c, newly)
        };
        if charged.is_ok() && !to_lock.is_empty() {
            // Really lock the newly pinned pages; if the kernel refuses, the pin fails as
            // a budget overrun would.
            let locked = to_lock
                .iter()
                .take_while(|&&(si, page)| lock_page(&segments[si].mapping, page, true))
                .count();
            if locked < to_lock.len() {
                for &(si, page) in &to_lock[..locked] {
                    lock_page(&segments[si].mapping, page, false);
                }
                c.credit(newly);
                charged = Err(DmaError::OverBudget {
                    pages: newly,
                    charged: c.charged,
                    limit: client.limit() / PAGE_SIZE,
                });
            }
        }
        if let Err(e) = charged {
            // Undo this call's pins. Nothing was charged for this call, and a host count
            // that returns to 0 here was 0 before the call: nothing to credit either.
            for &(si, page) in done.iter().rev() {
                let (s, pins) = (&segments[si], &mut locks[si]);
                let h = pins.holder_mut(id);
                if writable {
                    h.writable.dec(page);
                }
                if h.counts.dec(page) == 1 {
                    if let Some((mid, hp)) = host_page(&s.mapping, page) {
                        if let Some(counts) = c.host.get_mut(&mid) {
                            counts.dec(hp);
                            if counts.nonzero() == 0 {
                                c.host.remove(&mid);
                            }
                        }
                    }
                }
            }
            for pins in locks.iter_mut() {
                pins.prune();
            }
            return Err(e);
        }
        drop(c);
        if writable {
            let logging = self.space.logging();
            for s in &segments {
                s.mapping.mark_dirty(logging, s.start, s.end);
            }
        }
        drop(locks);
        Ok(PinnedPages {
            holder: self.state.clone(),
            iova,
            npages,
            prot,
            segments: segments
                .iter()
                .map(|s| (Arc::downgrade(&s.mapping), s.start, s.end))
                .collect(),
        })
    }

    /// Releases one pin of each of the `npages` IOVA pages from `iova`.
    ///
    /// All or nothing: [`DmaError::NotPinned`] (EINVAL) if this device has not pinned one of
    /// the pages, [`DmaError::TooManyPages`] (E2BIG) past [`MAX_PIN_PAGES`],
    /// [`DmaError::PinInvalid`] (EINVAL) for no pages or an unaligned `iova`,
    /// [`DmaError::Revoked`] (EIO) once revoked (its pins are gone already).
    pub fn unpin(&self, iova: u64, npages: usize) -> Result<(), DmaError> {
        let segments = self.segments(iova, npages, None)?;
        let mut locks: Vec<MutexGuard<'_, MappingPins>> =
            segments.iter().map(|s| s.mapping.pins()).collect();
        let id = self.state.id;
        for (s, pins) in segments.iter().zip(locks.iter()) {
            let h = pins.holder(id);
            if let Some(page) = s.pages().find(|&p| h.is_none_or(|h| h.counts.get(p) == 0)) {
                return Err(DmaError::NotPinned {
                    iova: s.mapping.range.start() + page as u64 * PAGE_SIZE,
                });
            }
        }
        let mut c = self.space.client().charges();
        for (s, pins) in segments.iter().zip(locks.iter_mut()) {
            let h = pins.holder_mut(id);
            for page in s.pages() {
                let left = h.counts.dec(page) - 1;
                if h.writable.get(page) > left {
                    h.writable.dec(page);
                }
                if left == 0 {
                    host_dec(&mut c, &s.mapping, page, self.space.client().lock_pages());
                }
            }
            pins.prune();
            if pins.unmapping && pins.pinned_pages() == 0 {
                s.mapping.released.notify_all();
            }
        }
        Ok(())
    }

    /// Checks a pin or unpin call and splits it by mapping. `prot` is `Some` for a pin
    /// (which checks the mappings' permissions and backing).
    fn segments(
        &self,
        iova: u64,
        npages: usize,
        prot: Option<Prot>,
    ) -> Result<Vec<Segment>, DmaError> {
        let invalid = |reason| DmaError::PinInvalid { iova, reason };
        if self.state.is_revoked() {
            return Err(DmaError::Revoked { iova });
        }
        if npages == 0 {
            return Err(invalid("no pages"));
        }
        if npages > MAX_PIN_PAGES {
            return Err(DmaError::TooManyPages {
                npages,
                max: MAX_PIN_PAGES,
            });
        }
        if iova % PAGE_SIZE != 0 {
            return Err(invalid("address not page-aligned"));
        }
        let len = npages as u64 * PAGE_SIZE;
        let end = iova
            .checked_add(len)
            .ok_or(DmaError::InvalidRange { start: iova, len })?;
        let table = self.space.read_table();
        let mut segments = Vec::with_capacity(1);
        let mut cur = iova;
        while cur < end {
            let Some(m) = find(&table, cur) else {
                return Err(match prot {
                    Some(_) => invalid("page not mapped"),
                    None => DmaError::NotPinned { iova: cur },
                });
            };
            let seg_end = end.min(m.range.end());
            if m.range.start() % PAGE_SIZE != 0 || (seg_end < end && seg_end % PAGE_SIZE != 0) {
                return Err(invalid("mapping not page-aligned"));
            }
            if seg_end % PAGE_SIZE != 0 && seg_end == m.range.end() {
                return Err(invalid("page not wholly mapped"));
            }
            if let Some(prot) = prot {
                if !m.fd_backed() {
                    return Err(invalid("message-backed mappings cannot be pinned"));
                }
                if !m.prot.contains(prot) {
                    return Err(invalid("mapping lacks the permission"));
                }
            }
            segments.push(Segment {
                mapping: m.clone(),
                start: cur,
                end: seg_end,
            });
            cur = seg_end;
        }
        Ok(segments)
    }
}

/// Handles to the memory of pages pinned by one [`Pinner::pin`] call.
///
/// Every access is bounds-checked, volatile, and fails once the mapping is unmapped or the
/// device revoked. Dropping the handles does not unpin: call [`Pinner::unpin`].
#[derive(Clone)]
pub struct PinnedPages {
    holder: Arc<HolderState>,
    iova: u64,
    npages: usize,
    prot: Prot,
    segments: Vec<(Weak<Mapping>, u64, u64)>,
}

impl std::fmt::Debug for PinnedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedPages")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("npages", &self.npages)
            .field("prot", &self.prot)
            .finish_non_exhaustive()
    }
}

impl PinnedPages {
    /// First IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Number of pages.
    pub fn page_count(&self) -> usize {
        self.npages
    }

    /// Bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.npages as u64 * PAGE_SIZE
    }

    /// The access asked for at pin time.
    pub fn prot(&self) -> Prot {
        self.prot
    }

    /// The handle of page `i`.
    pub fn page(&self, i: usize) -> Option<HostPage<'_>> {
        (i < self.npages).then_some(HostPage {
            pages: self,
            index: i,
        })
    }

    /// The handles of every page, in IOVA order.
    pub fn pages(&self) -> impl Iterator<Item = HostPage<'_>> {
        (0..self.npages).map(|index| HostPage { pages: self, index })
    }

    /// Reads `buf.len()` bytes at byte `offset` of the pinned range.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.access(offset, buf.len(), Prot::READ, |m, iova, at, n| {
            m.read_at(iova, &mut buf[at..at + n])
        })
    }

    /// Writes `data` at byte `offset` of the pinned range (needs a writable pin).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.access(offset, data.len(), Prot::WRITE, |m, iova, at, n| {
            m.write_at(iova, &data[at..at + n])
        })
    }

    fn access(
        &self,
        offset: u64,
        len: usize,
        needed: Prot,
        mut f: impl FnMut(&Mapping, u64, usize, usize) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let iova = self.iova.saturating_add(offset);
        if self.holder.is_revoked() {
            return Err(DmaError::Revoked { iova });
        }
        if !self.prot.contains(needed) {
            return Err(DmaError::PermissionDenied {
                iova,
                needed,
                has: self.prot,
            });
        }
        let len64 = len as u64;
        let end = offset
            .checked_add(len64)
            .filter(|e| *e <= self.len_bytes())
            .map(|e| self.iova + e)
            .ok_or(DmaError::Fault { iova })?;
        for (weak, s, e) in &self.segments {
            let (from, to) = (iova.max(*s), end.min(*e));
            if from >= to {
                continue;
            }
            let m = weak.upgrade().ok_or(DmaError::Fault { iova: from })?;
            let _in = m.gate.enter().ok_or(DmaError::Fault { iova: from })?;
            f(&m, from, (from - iova) as usize, (to - from) as usize)?;
        }
        Ok(())
    }
}

/// The handle of one pinned page: 4 KiB of client memory.
#[derive(Clone, Copy)]
pub struct HostPage<'a> {
    pages: &'a PinnedPages,
    index: usize,
}

impl std::fmt::Debug for HostPage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostPage({:#x})", self.iova())
    }
}

impl HostPage<'_> {
    /// IOVA of the page.
    pub fn iova(&self) -> u64 {
        self.pages.iova + self.index as u64 * PAGE_SIZE
    }

    fn offset(&self, offset: u64, len: usize) -> Result<u64, DmaError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= PAGE_SIZE => Ok(self.index as u64 * PAGE_SIZE + offset),
            _ => Err(DmaError::Fault {
                iova: self.iova().saturating_add(offset),
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` within the page.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.pages.read(self.offset(offset, buf.len())?, buf)
    }

    /// Writes `data` at `offset` within the page.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.pages.write(self.offset(offset, data.len())?, data)
    }

    /// Host virtual address of the page while its mapping exists, for diagnostics.
    pub fn host_addr(&self) -> Option<usize> {
        let iova = self.iova();
        self.pages
            .segments
            .iter()
            .find(|(_, s, e)| *s <= iova && iova < *e)
            .and_then(|(w, _, _)| w.upgrade())
            .and_then(|m| m.host_addr(iova))
    }
}
