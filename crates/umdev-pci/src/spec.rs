//! The declaration a device makes of itself: ids, class, BARs, capabilities. Built once,
//! validated, then frozen: nothing about the layout changes while the device is served.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::error::{MsixStructure, SpecError};

/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;

/// What address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O (4..=256 bytes).
    Io,
    /// 32-bit memory.
    Mem32 {
        /// Reads have no side effects.
        prefetchable: bool,
    },
    /// 64-bit memory; takes this BAR slot and the next.
    Mem64 {
        /// Reads have no side effects.
        prefetchable: bool,
    },
}

impl BarKind {
    /// Whether the BAR decodes memory (rather than port I/O).
    pub fn is_memory(self) -> bool {
        !matches!(self, Self::Io)
    }
}

/// A file the client may mmap to reach (parts of) a BAR directly.
#[derive(Clone, Debug)]
pub struct BarMmap {
    /// The file to map.
    pub fd: Arc<OwnedFd>,
    /// Offset of the BAR's first byte within the file.
    pub offset: u64,
    /// Sparse `(offset, size)` areas within the BAR; empty means the whole BAR.
    pub areas: Vec<(u64, u64)>,
}

/// One BAR as declared.
#[derive(Clone, Debug)]
pub struct BarSpec {
    /// Address space and width.
    pub kind: BarKind,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// Direct mapping offered to the client, if any.
    pub mmap: Option<BarMmap>,
}

/// The MSI capability as declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiSpec {
    /// Vectors (1, 2, 4, 8, 16 or 32).
    pub vectors: u32,
    /// Whether the capability carries per-vector mask and pending bits.
    pub per_vector_mask: bool,
}

/// The MSI-X capability as declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixSpec {
    /// Vectors (1..=2048).
    pub vectors: u32,
    /// BAR holding the vector table.
    pub table_bar: u8,
    /// Offset of the table within its BAR.
    pub table_offset: u32,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA within its BAR.
    pub pba_offset: u32,
}

impl MsixSpec {
    /// Bytes of the vector table: 16 per vector.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * 16
    }

    /// Bytes of the PBA: one bit per vector, rounded up to 8-byte words.
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// A validated, frozen description of a PCI function. Build it with [`PciDeviceSpec::builder`].
#[derive(Clone, Debug)]
pub struct PciDeviceSpec {
    vendor_id: u16,
    device_id: u16,
    class: (u8, u8, u8),
    revision: u8,
    subsystem: (u16, u16),
    interrupt_pin: u8,
    bars: [Option<BarSpec>; NUM_BARS],
    msi: Option<MsiSpec>,
    msix: Option<MsixSpec>,
    pcie: bool,
    power_management: bool,
    reset: bool,
    work_threads: usize,
}

/// Most threads a device's work context may have.
pub const MAX_WORK_THREADS: usize = 64;

impl PciDeviceSpec {
    /// Starts a spec for a function with these ids.
    pub fn builder(vendor_id: u16, device_id: u16) -> PciDeviceSpecBuilder {
        PciDeviceSpecBuilder {
            vendor_id,
            device_id,
            class: (0, 0, 0),
            revision: 0,
            subsystem: (0, 0),
            interrupt_pin: 0,
            bars: Vec::new(),
            mmaps: Vec::new(),
            msi: None,
            msix: None,
            pcie: false,
            power_management: false,
            reset: true,
            work_threads: 1,
        }
    }

    /// PCI vendor id.
    pub fn vendor_id(&self) -> u16 {
        self.vendor_id
    }

    /// PCI device id.
    pub fn device_id(&self) -> u16 {
        self.device_id
    }

    /// Class code as `(base, sub, prog_if)`.
    pub fn class(&self) -> (u8, u8, u8) {
        self.class
    }

    /// Revision id.
    pub fn revision(&self) -> u8 {
        self.revision
    }

    /// Subsystem `(vendor, id)`.
    pub fn subsystem(&self) -> (u16, u16) {
        self.subsystem
    }

    /// Interrupt pin: 0 for none, 1..=4 for INTA..INTD.
    pub fn interrupt_pin(&self) -> u8 {
        self.interrupt_pin
    }

    /// The BAR declared at `index`; `None` for an empty slot, the upper half of a 64-bit
    /// BAR, or an index above 5.
    pub fn bar(&self, index: u8) -> Option<&BarSpec> {
        self.bars.get(usize::from(index)).and_then(Option::as_ref)
    }

    /// The MSI capability, if declared.
    pub fn msi(&self) -> Option<MsiSpec> {
        self.msi
    }

    /// The MSI-X capability, if declared.
    pub fn msix(&self) -> Option<MsixSpec> {
        self.msix
    }

    /// Whether the function has a PCI Express capability (and 4 KiB of config space).
    pub fn is_pcie(&self) -> bool {
        self.pcie
    }

    /// Whether the function has a power-management capability.
    pub fn has_power_management(&self) -> bool {
        self.power_management
    }

    /// Whether the function advertises device reset.
    pub fn reset_supported(&self) -> bool {
        self.reset
    }

    /// How many threads the device's work context runs (1: jobs one after another).
    pub fn work_threads(&self) -> usize {
        self.work_threads
    }

    /// Size of the config region: 4096 bytes with PCIe, 256 without.
    pub fn config_size(&self) -> u64 {
        if self.pcie {
            4096
        } else {
            256
        }
    }
}

/// Collects a device's declaration; [`build`](Self::build) validates it.
///
/// Setters never fail; every check happens in `build`, which reports the first problem in
/// the order the BARs and capabilities were declared.
#[derive(Debug)]
pub struct PciDeviceSpecBuilder {
    vendor_id: u16,
    device_id: u16,
    class: (u8, u8, u8),
    revision: u8,
    subsystem: (u16, u16),
    interrupt_pin: u8,
    bars: Vec<(u8, BarKind, u64)>,
    mmaps: Vec<(u8, BarMmap)>,
    msi: Option<MsiSpec>,
    msix: Option<MsixSpec>,
    pcie: bool,
    power_management: bool,
    reset: bool,
    work_threads: usize,
}

impl PciDeviceSpecBuilder {
    /// Class code: base class, sub-class, programming interface.
    pub fn class(mut self, base: u8, sub: u8, prog_if: u8) -> Self {
        self.class = (base, sub, prog_if);
        self
    }

    /// Revision id.
    pub fn revision(mut self, r: u8) -> Self {
        self.revision = r;
        self
    }

    /// Subsystem vendor and id.
    pub fn subsystem(mut self, vendor: u16, id: u16) -> Self {
        self.subsystem = (vendor, id);
        self
    }

    /// Interrupt pin: 1 = INTA .. 4 = INTD. Without it the function has no INTx.
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.interrupt_pin = pin;
        self
    }

    /// Declares BAR `index`.
    pub fn bar(mut self, index: u8, kind: BarKind, size: u64) -> Self {
        self.bars.push((index, kind, size));
        self
    }

    /// Offers the client a direct mapping of (parts of) memory BAR `index`.
    pub fn bar_mmap(mut self, index: u8, mmap: BarMmap) -> Self {
        self.mmaps.push((index, mmap));
        self
    }

    /// Adds an MSI capability (always 64-bit capable).
    pub fn msi(mut self, vectors: u32, per_vector_mask: bool) -> Self {
        self.msi = Some(MsiSpec {
            vectors,
            per_vector_mask,
        });
        self
    }

    /// Adds an MSI-X capability with its table and PBA in the given memory BARs.
    pub fn msix(
        mut self,
        vectors: u32,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Self {
        self.msix = Some(MsixSpec {
            vectors,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        });
        self
    }

    /// Adds a PCI Express endpoint capability; config space grows to 4 KiB.
    pub fn pcie(mut self) -> Self {
        self.pcie = true;
        self
    }

    /// Adds a power-management capability (D0/D3hot, no PME).
    pub fn power_management(mut self) -> Self {
        self.power_management = true;
        self
    }

    /// Whether the function advertises reset (default: yes).
    pub fn reset(mut self, supported: bool) -> Self {
        self.reset = supported;
        self
    }

    /// Runs the device's work context on `threads` threads (default 1, at most
    /// [`MAX_WORK_THREADS`]): jobs then run concurrently, for a device that keeps many
    /// transfers in flight (each message-based DMA waits a round trip). With one thread
    /// jobs run in submission order.
    pub fn work_threads(mut self, threads: usize) -> Self {
        self.work_threads = threads;
        self
    }

    /// Validates the declaration and freezes it.
    pub fn build(self) -> Result<PciDeviceSpec, SpecError> {
        if self.interrupt_pin > 4 {
            return Err(SpecError::InterruptPin(self.interrupt_pin));
        }
        if self.work_threads == 0 || self.work_threads > MAX_WORK_THREADS {
            return Err(SpecError::WorkThreads(self.work_threads));
        }
        let bars = build_bars(&self.bars)?;
        if let Some(msi) = self.msi {
            if !msi.vectors.is_power_of_two() || msi.vectors > 32 {
                return Err(SpecError::MsiVectors(msi.vectors));
            }
        }
        if let Some(msix) = &self.msix {
            check_msix(msix, &bars)?;
        }
        let mut bars = bars;
        for (index, mmap) in self.mmaps {
            check_mmap(index, &mmap, &bars, self.msix.as_ref())?;
            if let Some(bar) = bars.get_mut(usize::from(index)).and_then(Option::as_mut) {
                bar.mmap = Some(mmap);
            }
        }
        Ok(PciDeviceSpec {
            vendor_id: self.vendor_id,
            device_id: self.device_id,
            class: self.class,
            revision: self.revision,
            subsystem: self.subsystem,
            interrupt_pin: self.interrupt_pin,
            bars,
            msi: self.msi,
            msix: self.msix,
            pcie: self.pcie,
            power_management: self.power_management,
            reset: self.reset,
            work_threads: self.work_threads,
        })
    }
}

fn build_bars(decls: &[(u8, BarKind, u64)]) -> Result<[Option<BarSpec>; NUM_BARS], SpecError> {
    let mut bars: [Option<BarSpec>; NUM_BARS] = Default::default();
    let mut used = [false; NUM_BARS];
    for &(index, kind, size) in decls {
        let i = usize::from(index);
        if i >= NUM_BARS {
            return Err(SpecError::BarIndexOutOfRange(index));
        }
        if used[i] {
            return Err(SpecError::BarInUse(index));
        }
        if let BarKind::Mem64 { .. } = kind {
            if i + 1 >= NUM_BARS {
                return Err(SpecError::Mem64AtLastIndex);
            }
            if used[i + 1] {
                return Err(SpecError::BarInUse(index + 1));
            }
        }
        check_bar_size(index, kind, size)?;
        used[i] = true;
        if let BarKind::Mem64 { .. } = kind {
            used[i + 1] = true;
        }
        bars[i] = Some(BarSpec {
            kind,
            size,
            mmap: None,
        });
    }
    Ok(bars)
}

/// Minimum and maximum size of a BAR of this kind.
pub(crate) fn bar_size_limits(kind: BarKind) -> (u64, u64) {
    match kind {
        BarKind::Io => (4, 256),
        BarKind::Mem32 { .. } => (16, 1 << 31),
        BarKind::Mem64 { .. } => (16, 1 << 63),
    }
}

fn check_bar_size(index: u8, kind: BarKind, size: u64) -> Result<(), SpecError> {
    if !size.is_power_of_two() {
        return Err(SpecError::BarSizeNotPowerOfTwo { index, size });
    }
    let (min, max) = bar_size_limits(kind);
    if size < min {
        return Err(SpecError::BarTooSmall { index, size, min });
    }
    if size > max {
        return Err(SpecError::BarTooLarge { index, size, max });
    }
    Ok(())
}

fn check_msix(msix: &MsixSpec, bars: &[Option<BarSpec>; NUM_BARS]) -> Result<(), SpecError> {
    if msix.vectors == 0 || msix.vectors > 2048 {
        return Err(SpecError::MsixVectors(msix.vectors));
    }
    let structures = [
        (
            MsixStructure::Table,
            msix.table_bar,
            msix.table_offset,
            msix.table_size(),
        ),
        (
            MsixStructure::Pba,
            msix.pba_bar,
            msix.pba_offset,
            msix.pba_size(),
        ),
    ];
    for (what, bar, offset, size) in structures {
        let spec = bars
            .get(usize::from(bar))
            .and_then(Option::as_ref)
            .filter(|b| b.kind.is_memory())
            .ok_or(SpecError::MsixNotInMemoryBar { what, bar })?;
        if offset % 8 != 0 {
            return Err(SpecError::MsixMisaligned { what, offset });
        }
        let end = u64::from(offset).checked_add(size);
        if end.is_none_or(|end| end > spec.size) {
            return Err(SpecError::MsixOutsideBar { what, bar, offset });
        }
    }
    if msix.table_bar == msix.pba_bar
        && ranges_overlap(
            u64::from(msix.table_offset),
            msix.table_size(),
            u64::from(msix.pba_offset),
            msix.pba_size(),
        )
    {
        return Err(SpecError::MsixOverlap);
    }
    Ok(())
}

fn check_mmap(
    index: u8,
    mmap: &BarMmap,
    bars: &[Option<BarSpec>; NUM_BARS],
    msix: Option<&MsixSpec>,
) -> Result<(), SpecError> {
    let bar = bars
        .get(usize::from(index))
        .and_then(Option::as_ref)
        .filter(|b| b.kind.is_memory())
        .ok_or(SpecError::MmapMissingBar(index))?;
    if bar.mmap.is_some() {
        return Err(SpecError::MmapTwice(index));
    }
    let whole = [(0, bar.size)];
    let areas: &[(u64, u64)] = if mmap.areas.is_empty() {
        &whole
    } else {
        &mmap.areas
    };
    for &(offset, size) in areas {
        if offset.checked_add(size).is_none_or(|end| end > bar.size) {
            return Err(SpecError::MmapAreaOutsideBar {
                index,
                offset,
                size,
            });
        }
        if let Some(m) = msix {
            let hits_table = m.table_bar == index
                && ranges_overlap(offset, size, u64::from(m.table_offset), m.table_size());
            let hits_pba = m.pba_bar == index
                && ranges_overlap(offset, size, u64::from(m.pba_offset), m.pba_size());
            if hits_table || hits_pba {
                return Err(SpecError::MmapCoversMsix(index));
            }
        }
    }
    Ok(())
}

/// Whether `[a, a+alen)` and `[b, b+blen)` share a byte; empty ranges share none.
pub(crate) fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen != 0 && blen != 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: BarKind = BarKind::Mem32 {
        prefetchable: false,
    };
    const MEM64: BarKind = BarKind::Mem64 {
        prefetchable: false,
    };

    fn b() -> PciDeviceSpecBuilder {
        PciDeviceSpec::builder(0x1234, 0x5678)
    }

    fn memfd() -> Arc<OwnedFd> {
        Arc::new(rustix::fs::memfd_create("bar", rustix::fs::MemfdFlags::CLOEXEC).unwrap())
    }

    #[test]
    fn minimal_spec_builds() {
        let spec = b().class(7, 0, 2).revision(0x10).build().unwrap();
        assert_eq!(spec.vendor_id(), 0x1234);
        assert_eq!(spec.class(), (7, 0, 2));
        assert_eq!(spec.config_size(), 256);
        assert!(spec.reset_supported());
    }

    #[test]
    fn bar_index_above_5_is_refused() {
        let e = b().bar(6, BarKind::Io, 8).build().unwrap_err();
        assert_eq!(e, SpecError::BarIndexOutOfRange(6));
    }

    #[test]
    fn bar_index_in_use_is_refused() {
        let e = b()
            .bar(0, BarKind::Io, 8)
            .bar(0, MEM, 16)
            .build()
            .unwrap_err();
        assert_eq!(e, SpecError::BarInUse(0));
    }

    #[test]
    fn upper_half_of_mem64_is_in_use() {
        let e = b().bar(0, MEM64, 4096).bar(1, MEM, 16).build().unwrap_err();
        assert_eq!(e, SpecError::BarInUse(1));
        let e = b().bar(1, MEM, 16).bar(0, MEM64, 4096).build().unwrap_err();
        assert_eq!(e, SpecError::BarInUse(1));
    }

    #[test]
    fn mem64_at_index_5_is_refused() {
        let e = b().bar(5, MEM64, 4096).build().unwrap_err();
        assert_eq!(e, SpecError::Mem64AtLastIndex);
    }

    #[test]
    fn bar_size_must_be_power_of_two() {
        let e = b().bar(0, MEM, 24).build().unwrap_err();
        assert!(matches!(
            e,
            SpecError::BarSizeNotPowerOfTwo { size: 24, .. }
        ));
        let e = b().bar(0, MEM, 0).build().unwrap_err();
        assert!(matches!(e, SpecError::BarSizeNotPowerOfTwo { size: 0, .. }));
    }

    #[test]
    fn bar_minimum_sizes() {
        assert!(b().bar(0, BarKind::Io, 4).build().is_ok());
        let e = b().bar(0, BarKind::Io, 2).build().unwrap_err();
        assert!(matches!(e, SpecError::BarTooSmall { min: 4, .. }));
        let e = b().bar(0, MEM, 8).build().unwrap_err();
        assert!(matches!(e, SpecError::BarTooSmall { min: 16, .. }));
    }

    #[test]
    fn io_bar_above_256_is_refused() {
        let e = b().bar(0, BarKind::Io, 512).build().unwrap_err();
        assert!(matches!(e, SpecError::BarTooLarge { size: 512, .. }));
    }

    #[test]
    fn interrupt_pin_above_4_is_refused() {
        assert_eq!(
            b().interrupt_pin(5).build().unwrap_err(),
            SpecError::InterruptPin(5)
        );
    }

    #[test]
    fn msi_vectors_must_be_power_of_two_up_to_32() {
        for bad in [0, 3, 64] {
            assert_eq!(
                b().msi(bad, false).build().unwrap_err(),
                SpecError::MsiVectors(bad)
            );
        }
        assert!(b().msi(32, true).build().is_ok());
    }

    #[test]
    fn msix_vector_count_limits() {
        let base = || b().bar(0, MEM, 1 << 16);
        assert_eq!(
            base().msix(0, 0, 0, 0, 0x8000).build().unwrap_err(),
            SpecError::MsixVectors(0)
        );
        assert_eq!(
            base().msix(2049, 0, 0, 0, 0x9000).build().unwrap_err(),
            SpecError::MsixVectors(2049)
        );
        assert!(base().msix(2048, 0, 0, 0, 0x8000).build().is_ok());
    }

    #[test]
    fn msix_must_live_in_a_memory_bar() {
        let e = b().msix(4, 1, 0, 1, 64).build().unwrap_err();
        assert!(matches!(e, SpecError::MsixNotInMemoryBar { bar: 1, .. }));
        let e = b()
            .bar(1, BarKind::Io, 256)
            .msix(4, 1, 0, 1, 64)
            .build()
            .unwrap_err();
        assert!(matches!(e, SpecError::MsixNotInMemoryBar { bar: 1, .. }));
    }

    #[test]
    fn msix_misaligned_is_refused() {
        let e = b()
            .bar(0, MEM, 4096)
            .msix(4, 0, 4, 0, 2048)
            .build()
            .unwrap_err();
        assert!(matches!(e, SpecError::MsixMisaligned { offset: 4, .. }));
    }

    #[test]
    fn msix_outside_bar_is_refused() {
        let e = b().bar(0, MEM, 64).msix(8, 0, 0, 0, 0).build().unwrap_err();
        assert!(matches!(
            e,
            SpecError::MsixOutsideBar {
                what: MsixStructure::Table,
                ..
            }
        ));
    }

    #[test]
    fn msix_table_and_pba_overlap_is_refused() {
        let e = b()
            .bar(0, MEM, 4096)
            .msix(4, 0, 0, 0, 56)
            .build()
            .unwrap_err();
        assert_eq!(e, SpecError::MsixOverlap);
        assert!(b().bar(0, MEM, 4096).msix(4, 0, 0, 0, 64).build().is_ok());
    }

    #[test]
    fn mmap_on_missing_bar_is_refused() {
        let m = BarMmap {
            fd: memfd(),
            offset: 0,
            areas: vec![],
        };
        assert_eq!(
            b().bar_mmap(2, m).build().unwrap_err(),
            SpecError::MmapMissingBar(2)
        );
    }

    #[test]
    fn mmap_area_outside_bar_is_refused() {
        let m = BarMmap {
            fd: memfd(),
            offset: 0,
            areas: vec![(0x800, 0x1000)],
        };
        let e = b().bar(0, MEM, 4096).bar_mmap(0, m).build().unwrap_err();
        assert!(matches!(e, SpecError::MmapAreaOutsideBar { index: 0, .. }));
    }

    #[test]
    fn mmap_over_msix_table_is_refused() {
        let m = BarMmap {
            fd: memfd(),
            offset: 0,
            areas: vec![],
        };
        let e = b()
            .bar(0, MEM, 8192)
            .msix(4, 0, 4096, 0, 6144)
            .bar_mmap(0, m.clone())
            .build()
            .unwrap_err();
        assert_eq!(e, SpecError::MmapCoversMsix(0));
        let sparse = BarMmap {
            areas: vec![(0, 4096)],
            ..m
        };
        let spec = b()
            .bar(0, MEM, 8192)
            .msix(4, 0, 4096, 0, 6144)
            .bar_mmap(0, sparse)
            .build()
            .unwrap();
        assert!(spec.bar(0).unwrap().mmap.is_some());
    }

    #[test]
    fn overlap_helper_ignores_empty_ranges() {
        assert!(!ranges_overlap(0, 0, 0, 10));
        assert!(ranges_overlap(0, 10, 9, 1));
        assert!(!ranges_overlap(0, 10, 10, 1));
        assert!(ranges_overlap(u64::MAX - 1, 10, u64::MAX - 1, 1));
    }
}
