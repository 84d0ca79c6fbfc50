//! Dirty page logging: which pages devices wrote while logging was on.
//!
//! The log has one bit per 4 KiB IOVA page ([`DIRTY_PAGE_SIZE`], the device's choice),
//! kept per mapping. A page is dirty when a copy ([`Dma::write`](crate::Dma::write)) or a
//! [`Translation`](crate::Translation) wrote it, and, as in the kernel's type1 backend, for
//! as long as it is pinned writable: the device may write a pinned page at any time
//! without telling anyone, so such pages are marked when pinned, when logging starts, and
//! again after every report.
//!
//! A report reads and clears the bits of a range and renders them at the page size the
//! client asks for (any power of two): bit `(addr - iova) / page_size` of an array of
//! little-endian u64 words, bits outside the range zero. A larger page is dirty when any of
//! its 4 KiB pages is; a smaller one when the 4 KiB page holding it is.
//!
//! Ordering: a copy marks its pages *after* the bytes are written, checking whether logging
//! is on only then; so a write still in progress when logging starts is logged, and a bit
//! read and cleared by a report while a write is still marking shows up in the next report.

// Page indexes and in-page offsets are usize = u64 here: umdev targets 64-bit Linux only
// (lib.rs asserts it at compile time).
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::error::DmaError;
use crate::gate::backoff_until;
use crate::mapping::Mapping;
use crate::range::{IovaRange, PAGE_SIZE};
use crate::space::AddressSpace;

/// The page size of the dirty log: what DMA_LOGGING_START answers.
pub const DIRTY_PAGE_SIZE: u64 = PAGE_SIZE;

/// Dirty bits of one mapping, by page frame relative to the mapping's first frame.
#[derive(Debug, Default)]
pub(crate) struct DirtyBits(OnceLock<DirtyLog>);

/// Two bitmaps, one per epoch. Writers set bits in the current epoch's bitmap, registered
/// in `state` as writers of that epoch for the few instructions it takes. A report of the
/// whole mapping flips the epoch, waits until the old epoch has no writer left, and then
/// owns the old bitmap: it reads and clears it with plain loads and stores, where reading
/// and clearing a bitmap that writers still use takes one atomic swap per non-zero word
/// (about half the words with 1% of the pages dirty at random).
///
/// Invariant between reports (which the mapping's pins lock serialises): the bitmap that
/// is not current is all zero, so the current one alone holds every dirty bit.
#[derive(Debug)]
struct DirtyLog {
    maps: [Box<[AtomicU64]>; 2],
    /// Bit 63: the current epoch. Bits 0-31: writers in epoch 0; bits 32-62: in epoch 1.
    state: AtomicU64,
}

const EPOCH: u64 = 1 << 63;

/// The unit of the writer count of `epoch` in `DirtyLog::state`.
fn writer(epoch: usize) -> u64 {
    if epoch == 0 {
        1
    } else {
        1 << 32
    }
}

fn epoch_of(state: u64) -> usize {
    usize::from(state & EPOCH != 0)
}

fn writers_of(state: u64, epoch: usize) -> u64 {
    if epoch == 0 {
        state & 0xffff_ffff
    } else {
        (state & !EPOCH) >> 32
    }
}

impl DirtyLog {
    fn new(frames: u64) -> Self {
        let words = usize::try_from(frames.div_ceil(64)).unwrap_or(0);
        let map = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Self {
            maps: [map(), map()],
            state: AtomicU64::new(0),
        }
    }

    /// Sets the bits of relative frames `first..=last` in the current epoch's bitmap.
    fn mark(&self, first: u64, last: u64) {
        let epoch = loop {
            let e = epoch_of(self.state.load(Ordering::Relaxed));
            // Registered as a writer of `e` only if `e` was still current when the count
            // went up: a report that flips after this waits for us, one that flipped
            // before is not disturbed (we leave and write into the new epoch instead).
            let before = self.state.fetch_add(writer(e), Ordering::Acquire);
            if epoch_of(before) == e {
                break e;
            }
            self.state.fetch_sub(writer(e), Ordering::Release);
        };
        mark_words(&self.maps[epoch], first, last);
        // Release: the bits are visible to the report that sees the count drop.
        self.state.fetch_sub(writer(epoch), Ordering::Release);
    }

    /// Makes the other bitmap current and returns the old one once no writer uses it.
    fn flip(&self) -> &[AtomicU64] {
        let old = epoch_of(self.state.fetch_xor(EPOCH, Ordering::AcqRel));
        // A writer is in for one bitmap update: a short wait.
        backoff_until(|| writers_of(self.state.load(Ordering::Acquire), old) == 0);
        &self.maps[old]
    }

    fn current(&self) -> &[AtomicU64] {
        &self.maps[epoch_of(self.state.load(Ordering::Acquire))]
    }

    fn clear_all(&self) {
        for w in self.maps.iter().flat_map(|m| m.iter()) {
            w.store(0, Ordering::Relaxed);
        }
    }
}

impl DirtyBits {
    fn ensure(&self, frames: u64) -> &DirtyLog {
        self.0.get_or_init(|| DirtyLog::new(frames))
    }
}

/// Sets the bits of relative frames `first..=last` of `words`.
fn mark_words(words: &[AtomicU64], first: u64, last: u64) {
    let (Ok(first), Ok(last)) = (usize::try_from(first), usize::try_from(last)) else {
        return;
    };
    for w in first / 64..=last / 64 {
        let Some(word) = words.get(w) else { return };
        let lo = if w == first / 64 { first % 64 } else { 0 };
        let hi = if w == last / 64 { last % 64 } else { 63 };
        word.fetch_or(mask(lo, hi), Ordering::Relaxed);
    }
}

/// Reads and clears every bit of `words`, which no writer uses any more (a bitmap of an
/// old epoch), calling `f(first frame of the word, bits)` for each word with bits set.
///
/// Relaxed loads and stores are plain moves: no read-modify-write per word.
fn take_owned(words: &[AtomicU64], mut f: impl FnMut(u64, u64)) {
    for (w, word) in words.iter().enumerate() {
        let v = word.load(Ordering::Relaxed);
        if v != 0 {
            word.store(0, Ordering::Relaxed);
            f(w as u64 * 64, v);
        }
    }
}

/// The bitmap a report fills, mapping by mapping in ascending order, and how much of it
/// is written so far: bytes `..zeroed` hold their final bits but for the mappings still to
/// come, the rest is whatever the caller passed.
///
/// Zeroing the whole bitmap first and ORing every word into it would read and write it
/// twice; the common report (whole mappings at 4 KiB) instead stores each word once.
pub(crate) struct ReportOut<'a> {
    out: &'a mut [u8],
    zeroed: usize,
}

impl<'a> ReportOut<'a> {
    pub(crate) fn new(out: &'a mut [u8]) -> Self {
        Self { out, zeroed: 0 }
    }

    /// All of it, with the part not written yet zeroed, for reports that OR bits in.
    fn zeroed(&mut self) -> &mut [u8] {
        if let Some(rest) = self.out.get_mut(self.zeroed..) {
            rest.fill(0);
        }
        self.zeroed = self.out.len();
        self.out
    }

    /// Zeroes what no mapping wrote.
    pub(crate) fn finish(mut self) {
        self.zeroed();
    }
}

/// [`take_owned`] into a 4 KiB bitmap whose bit `at` is the bitmap's first frame.
///
/// Without a branch per word: with 1% of the pages dirty at random, about half the words
/// are non-zero, and a test of each would be mispredicted every other word (that, more
/// than the atomics, made such reports 10x the read of their bitmap). Every word is read,
/// cleared and stored (shifted across two output words when `at` is not a multiple of
/// 64). Only the first output word can hold bits of an earlier mapping (mappings come in
/// ascending order and do not overlap): it is ORed into, the others are stored.
fn take_owned_into(words: &[AtomicU64], out: &mut ReportOut<'_>, at: u64) {
    let first = usize::try_from(at / 64).unwrap_or(usize::MAX);
    let shift = (at % 64) as u32;
    let start = first.saturating_mul(8);
    if let Some(head) = out.out.get_mut(out.zeroed..start.saturating_add(8)) {
        head.fill(0);
        out.zeroed = out.zeroed.max(start.saturating_add(8));
    }
    let mut chunks = out
        .out
        .get_mut(start..)
        .unwrap_or_default()
        .chunks_exact_mut(8);
    let mut written = start;
    let mut carry = 0u64;
    for (i, word) in words.iter().enumerate() {
        let v = word.load(Ordering::Relaxed);
        word.store(0, Ordering::Relaxed);
        let wide = u128::from(v) << shift;
        let Some(chunk) = chunks.next() else {
            // Bits past the end of `out` belong to frames past the range: none can be set
            // (the range covers the mapping), and the word is cleared all the same.
            continue;
        };
        let bits = wide as u64 | carry;
        if i == 0 {
            or_chunk(chunk, bits);
        } else {
            chunk.copy_from_slice(&bits.to_le_bytes());
        }
        written += 8;
        carry = (wide >> 64) as u64;
    }
    if shift > 0 {
        if let Some(chunk) = chunks.next() {
            chunk.copy_from_slice(&carry.to_le_bytes());
            written += 8;
        }
    }
    out.zeroed = out.zeroed.max(written);
}

fn or_chunk(chunk: &mut [u8], bits: u64) {
    let mut w = [0u8; 8];
    w.copy_from_slice(chunk);
    chunk.copy_from_slice(&(u64::from_le_bytes(w) | bits).to_le_bytes());
}

/// Reads and clears the bits of relative frames `[from, to)` of a bitmap writers may be
/// using, calling `f(first frame of the word, bits)` for each word with bits set.
fn take_shared(words: &[AtomicU64], from: u64, to: u64, mut f: impl FnMut(u64, u64)) {
    if from >= to {
        return;
    }
    let last = to - 1;
    let (Ok(fw), Ok(lw)) = (usize::try_from(from / 64), usize::try_from(last / 64)) else {
        return;
    };
    let Some(range) = words.get(fw..=lw.min(words.len().saturating_sub(1))) else {
        return;
    };
    for (i, word) in range.iter().enumerate() {
        let w = fw + i;
        // A plain load first: most words are clean, and a read-modify-write on every
        // word would cost more than the report's whole read.
        let v = word.load(Ordering::Relaxed);
        if v == 0 {
            continue;
        }
        let lo = if w == fw { (from % 64) as usize } else { 0 };
        let hi = if w == lw { (last % 64) as usize } else { 63 };
        let m = mask(lo, hi);
        if v & m == 0 {
            continue;
        }
        let got = if m == u64::MAX {
            word.swap(0, Ordering::Relaxed)
        } else {
            word.fetch_and(!m, Ordering::Relaxed) & m
        };
        if got != 0 {
            f(w as u64 * 64, got);
        }
    }
}

/// Bits `lo..=hi` of a word.
fn mask(lo: usize, hi: usize) -> u64 {
    let upper = if hi >= 63 {
        u64::MAX
    } else {
        (1u64 << (hi + 1)) - 1
    };
    upper & !((1u64 << lo) - 1)
}

/// Logging state of one address space.
#[derive(Debug, Default)]
pub(crate) struct Logging {
    on: AtomicBool,
    /// The ranges asked for at start (empty: everything); `None` while off.
    ranges: Mutex<Option<Vec<IovaRange>>>,
}

impl Logging {
    pub(crate) fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }
}

/// Size in bytes of the bitmap for `len` bytes at `page_size`: whole u64 words.
///
/// [`DmaError::BadBitmap`] (EINVAL) unless `page_size` is a power of two and `len` is not 0.
pub fn dirty_bitmap_size(len: u64, page_size: u64) -> Result<usize, DmaError> {
    if !page_size.is_power_of_two() {
        return Err(DmaError::BadBitmap("page size is not a power of two"));
    }
    if len == 0 {
        return Err(DmaError::BadBitmap("empty range"));
    }
    let bits = len.div_ceil(page_size);
    usize::try_from(bits.div_ceil(64).saturating_mul(8))
        .map_err(|_| DmaError::BadBitmap("bitmap too large"))
}

impl Mapping {
    /// Marks `[iova, end)` (inside the mapping) dirty, if logging is on.
    pub(crate) fn mark_dirty(&self, logging: &Logging, iova: u64, end: u64) {
        // Checked after the bytes were written (see the module docs). The fence orders the
        // copy's stores before the load, as the start of logging orders its store.
        std::sync::atomic::fence(Ordering::SeqCst);
        if iova >= end || !logging.is_on() {
            return;
        }
        let log = self.dirty.ensure(self.frames());
        let base = self.first_frame();
        log.mark(iova / PAGE_SIZE - base, (end - 1) / PAGE_SIZE - base);
    }

    /// Marks every page pinned writable (caller holds the pins lock, logging is on).
    fn mark_pinned_writable(&self, pins: &crate::mapping::MappingPins) {
        let log = self.dirty.ensure(self.frames());
        for h in &pins.holders {
            for (page, _) in h.writable.iter() {
                let p = page as u64;
                log.mark(p, p);
            }
        }
    }

    /// Reads and clears this mapping's dirty bits inside `[iova, iova + len)` into `out` (a
    /// bitmap at `page_size` for that range), then marks again the pages still pinned
    /// writable.
    pub(crate) fn report_dirty(
        &self,
        iova: u64,
        len: u64,
        page_size: u64,
        out: &mut ReportOut<'_>,
    ) {
        let end = iova.saturating_add(len);
        let pins = self.pins();
        let Some(log) = self.dirty.0.get() else {
            return;
        };
        let base = self.first_frame();
        let lo_frame = (iova / PAGE_SIZE).max(base);
        let hi_frame = end.div_ceil(PAGE_SIZE).min(base + self.frames());
        if lo_frame >= hi_frame {
            return;
        }
        let fast = page_size == PAGE_SIZE && iova % PAGE_SIZE == 0;
        let iova_frame = iova / PAGE_SIZE;
        let whole = lo_frame == base && hi_frame == base + self.frames();
        if whole && fast {
            // The common report: the whole mapping at 4 KiB. `whole` means the range starts
            // at or before the mapping's first frame.
            take_owned_into(log.flip(), out, base - iova_frame);
            self.remark_pinned(&pins);
            return;
        }
        let out = out.zeroed();
        let emit = |first: u64, bits: u64| {
            let abs = base + first; // frame of bit 0 of `bits`
            if fast {
                // Bit i of the word is out bit (abs + i - iova_frame).
                if abs >= iova_frame {
                    or_word(out, abs - iova_frame, bits);
                } else {
                    or_word(out, 0, bits >> (iova_frame - abs));
                }
                return;
            }
            let mut b = bits;
            while b != 0 {
                let i = u64::from(b.trailing_zeros());
                b &= b - 1;
                let page = (abs + i) * PAGE_SIZE;
                let start = page.max(iova);
                let stop = page.saturating_add(PAGE_SIZE).min(end);
                if start < stop {
                    set_bits(
                        out,
                        (start - iova) / page_size,
                        (stop - 1 - iova) / page_size,
                    );
                }
            }
        };
        if whole {
            // Take the bitmap from the writers (see `DirtyLog`).
            take_owned(log.flip(), emit);
        } else {
            take_shared(log.current(), lo_frame - base, hi_frame - base, emit);
        }
        self.remark_pinned(&pins);
    }

    /// Marks again the pages still pinned writable, after a report.
    fn remark_pinned(&self, pins: &crate::mapping::MappingPins) {
        if pins.holders.iter().any(|h| h.writable.nonzero() > 0) {
            self.mark_pinned_writable(pins);
        }
    }
}

/// ORs `bits` into `out` starting at bit `at`.
fn or_word(out: &mut [u8], at: u64, bits: u64) {
    let k = (at / 64) as usize;
    let s = (at % 64) as u32;
    or_at(out, k, bits << s);
    if s > 0 {
        or_at(out, k + 1, bits >> (64 - s));
    }
}

fn or_at(out: &mut [u8], word: usize, bits: u64) {
    if bits == 0 {
        return;
    }
    if let Some(b) = out.get_mut(word * 8..word * 8 + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        b.copy_from_slice(&(u64::from_le_bytes(w) | bits).to_le_bytes());
    }
}

/// Sets bits `lo..=hi` of `out`.
fn set_bits(out: &mut [u8], lo: u64, hi: u64) {
    for w in lo / 64..=hi / 64 {
        let l = if w == lo / 64 { (lo % 64) as usize } else { 0 };
        let h = if w == hi / 64 { (hi % 64) as usize } else { 63 };
        or_at(out, w as usize, mask(l, h));
    }
}

impl AddressSpace {
    /// Starts dirty logging (DMA_LOGGING_START) for `ranges` (empty: every write is
    /// logged); returns the page size of the log, [`DIRTY_PAGE_SIZE`].
    ///
    /// [`DmaError::LoggingActive`] (EBUSY) if logging is already on, as the kernel allows one
    /// start at a time; [`DmaError::BadBitmap`] (EINVAL) for overlapping ranges.
    pub fn start_dirty_logging(&self, ranges: &[IovaRange]) -> Result<u64, DmaError> {
        let mut sorted = ranges.to_vec();
        sorted.sort_unstable_by_key(IovaRange::start);
        if sorted.windows(2).any(|w| w[0].overlaps(&w[1])) {
            return Err(DmaError::BadBitmap("logging ranges overlap"));
        }
        let mut state = self
            .logging()
            .ranges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if state.is_some() {
            return Err(DmaError::LoggingActive);
        }
        let mappings: Vec<Arc<Mapping>> = self.read_table().values().cloned().collect();
        for m in &mappings {
            m.dirty.ensure(m.frames()).clear_all();
        }
        *state = Some(sorted);
        self.logging().on.store(true, Ordering::SeqCst);
        // Pages pinned writable before the start are dirty from now on.
        for m in &mappings {
            let pins = m.pins();
            m.mark_pinned_writable(&pins);
        }
        tracing::debug!(ranges = ranges.len(), "dirty logging started");
        Ok(DIRTY_PAGE_SIZE)
    }

    /// Stops dirty logging (DMA_LOGGING_STOP); returns whether it was on. Stopping when off
    /// is not an error, as in the kernel.
    pub fn stop_dirty_logging(&self) -> bool {
        let mut state = self
            .logging()
            .ranges
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.logging().on.store(false, Ordering::SeqCst);
        let was = state.take().is_some();
        if was {
            tracing::debug!("dirty logging stopped");
        }
        was
    }

    /// Whether dirty logging is on.
    pub fn is_dirty_logging(&self) -> bool {
        self.logging().is_on()
    }

    /// DMA_LOGGING_REPORT: reads and clears the dirty bits of `[iova, iova + len)` into
    /// `out`, a bitmap at `page_size` of exactly [`dirty_bitmap_size`] bytes.
    ///
    /// Errors (all EINVAL): [`DmaError::LoggingInactive`] when logging is off;
    /// [`DmaError::BadBitmap`] for a page size that is not a power of two, an empty range, a
    /// range outside the ranges logging was started for, or a wrong `out` length;
    /// [`DmaError::InvalidRange`] when the range overflows.
    pub fn dirty_report(
        &self,
        iova: u64,
        len: u64,
        page_size: u64,
        out: &mut [u8],
    ) -> Result<(), DmaError> {
        let size = dirty_bitmap_size(len, page_size)?;
        let range = IovaRange::new(iova, len)?;
        if out.len() != size {
            return Err(DmaError::BadBitmap("bitmap size does not match the range"));
        }
        {
            let state = self
                .logging()
                .ranges
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(ranges) = state.as_ref() else {
                return Err(DmaError::LoggingInactive);
            };
            if !ranges.is_empty() && !covered(ranges, range) {
                return Err(DmaError::BadBitmap("range is outside the logged ranges"));
            }
        }
        let mut bitmap = ReportOut::new(out);
        for m in self.overlapping(range) {
            m.report_dirty(iova, len, page_size, &mut bitmap);
        }
        bitmap.finish();
        self.count_reported(out);
        Ok(())
    }

    /// Counts the pages `out`, a bitmap just given to the client, reports dirty.
    pub(crate) fn count_reported(&self, out: &[u8]) {
        if let Some(t) = self.traffic() {
            let pages: u32 = out.iter().map(|b| b.count_ones()).sum();
            t.dirty_reported
                .fetch_add(u64::from(pages), Ordering::Relaxed);
        }
    }
}

/// Whether sorted, disjoint `ranges` cover all of `r`.
fn covered(ranges: &[IovaRange], r: IovaRange) -> bool {
    let mut cur = r.start();
    for x in ranges {
        if x.start() <= cur && cur < x.end() {
            cur = x.end();
            if cur >= r.end() {
                return true;
            }
        }
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;

    #[test]
    fn mask_covers_inclusive_bounds() {
        assert_eq!(mask(0, 63), u64::MAX);
        assert_eq!(mask(0, 0), 1);
        assert_eq!(mask(3, 5), 0b111000);
        assert_eq!(mask(63, 63), 1 << 63);
    }

    #[test]
    fn bitmap_size_is_whole_words() {
        assert_eq!(dirty_bitmap_size(4096, 4096).unwrap(), 8);
        assert_eq!(dirty_bitmap_size(65 * 4096, 4096).unwrap(), 16);
        assert_eq!(dirty_bitmap_size(1, 1 << 21).unwrap(), 8);
        assert_eq!(dirty_bitmap_size(64 << 30, 4096).unwrap(), 2 << 20);
        assert!(dirty_bitmap_size(4096, 3000).is_err());
        assert!(dirty_bitmap_size(4096, 0).is_err());
        assert!(dirty_bitmap_size(0, 4096).is_err());
    }

    #[test]
    fn take_clears_only_the_window() {
        let words: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(u64::MAX)).collect();
        let mut seen = Vec::new();
        take_shared(&words, 60, 130, |f, b| seen.push((f, b)));
        assert_eq!(
            seen,
            vec![(0, mask(60, 63)), (64, u64::MAX), (128, mask(0, 1))]
        );
        assert_eq!(words[0].load(Ordering::Relaxed), mask(0, 59));
        assert_eq!(words[2].load(Ordering::Relaxed), mask(2, 63));
    }

    fn words(v: &[u64]) -> Vec<AtomicU64> {
        v.iter().map(|&w| AtomicU64::new(w)).collect()
    }

    fn out_words(out: &[u8]) -> Vec<u64> {
        out.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn owned_take_shifts_ors_first_word_and_zeroes_the_rest() {
        let src = words(&[u64::MAX, 1 << 63]);
        let mut buf = [0xffu8; 40];
        buf[8..16].copy_from_slice(&1u64.to_le_bytes()); // an earlier mapping's bit
        let mut out = ReportOut::new(&mut buf);
        out.zeroed = 16; // as if that earlier mapping had written words 0 and 1
        take_owned_into(&src, &mut out, 64 + 4);
        out.finish();
        assert_eq!(out_words(&buf), vec![u64::MAX, 1 | !0xf, 0xf, 1 << 3, 0]);
        assert!(src.iter().all(|w| w.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn flip_hands_over_old_bits_and_new_marks_go_to_the_other_bitmap() {
        let log = DirtyLog::new(128);
        log.mark(3, 3);
        let old = log.flip();
        log.mark(70, 70);
        let mut seen = Vec::new();
        take_owned(old, |f, b| seen.push((f, b)));
        assert_eq!(seen, vec![(0, 1 << 3)]);
        let mut next = Vec::new();
        take_owned(log.flip(), |f, b| next.push((f, b)));
        assert_eq!(next, vec![(64, 1 << 6)]);
    }

    #[test]
    fn no_mark_is_lost_across_flips() {
        // A writer marks every frame once while reports flip; every bit shows up in
        // exactly one report.
        const FRAMES: u64 = 1 << 16;
        let log = Arc::new(DirtyLog::new(FRAMES));
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || (0..FRAMES).for_each(|f| log.mark(f, f)))
        };
        let mut got = 0u64;
        while !writer.is_finished() {
            take_owned(log.flip(), |_, b| got += u64::from(b.count_ones()));
        }
        writer.join().unwrap();
        for _ in 0..2 {
            take_owned(log.flip(), |_, b| got += u64::from(b.count_ones()));
        }
        assert_eq!(got, FRAMES);
    }

    #[test]
    fn or_word_straddles_two_words() {
        let mut out = [0u8; 16];
        or_word(&mut out, 60, 0b11111);
        assert_eq!(u64::from_le_bytes(out[..8].try_into().unwrap()), 0xf << 60);
        assert_eq!(u64::from_le_bytes(out[8..].try_into().unwrap()), 1);
    }

    #[test]
    fn coverage_of_a_range_by_several() {
        let r = |s, l| IovaRange::new(s, l).unwrap();
        let ranges = [r(0, 0x1000), r(0x1000, 0x1000), r(0x3000, 0x1000)];
        assert!(covered(&ranges, r(0x800, 0x1000)));
        assert!(!covered(&ranges, r(0x1800, 0x1000)));
        assert!(covered(&ranges, r(0x3000, 0x1000)));
    }
}
