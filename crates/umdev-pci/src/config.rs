//! The emulated config space: a type 0 header with BAR sizing, command/status semantics and
//! the capability chain, accessed at any size and alignment through per-byte write masks.

use crate::caps::{self, CapLayout};
use crate::interrupts::Interrupts;
use crate::spec::{BarKind, PciDeviceSpec, NUM_BARS};

/// Header register offsets.
pub(crate) const VENDOR_ID: usize = 0x00;
pub(crate) const DEVICE_ID: usize = 0x02;
pub(crate) const COMMAND: usize = 0x04;
pub(crate) const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS_PROG_IF: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
pub(crate) const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;

/// Command bits a driver may set: I/O, memory, bus master, parity, SERR, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
/// Command: INTx disable.
pub(crate) const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: INTx asserted (mirrors the line).
pub(crate) const STATUS_INTERRUPT: u8 = 1 << 3;
/// Status: capability list present.
pub(crate) const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status error bits, all write-1-to-clear.
const STATUS_W1C: u16 = 0xf900;

/// Config-space bytes with per-byte write and write-1-to-clear masks.
#[derive(Clone, Debug)]
pub(crate) struct Regs {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
}

impl Regs {
    /// `size` bytes of read-only zeros.
    pub(crate) fn new(size: usize) -> Self {
        Self {
            data: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
        }
    }

    fn put(v: &mut [u8], off: usize, bytes: &[u8]) {
        if let Some(dst) = v.get_mut(off..off + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }

    pub(crate) fn set8(&mut self, off: usize, v: u8) {
        Self::put(&mut self.data, off, &[v]);
    }
    pub(crate) fn set16(&mut self, off: usize, v: u16) {
        Self::put(&mut self.data, off, &v.to_le_bytes());
    }
    pub(crate) fn set32(&mut self, off: usize, v: u32) {
        Self::put(&mut self.data, off, &v.to_le_bytes());
    }
    pub(crate) fn wmask8(&mut self, off: usize, m: u8) {
        Self::put(&mut self.wmask, off, &[m]);
    }
    pub(crate) fn wmask16(&mut self, off: usize, m: u16) {
        Self::put(&mut self.wmask, off, &m.to_le_bytes());
    }
    pub(crate) fn wmask32(&mut self, off: usize, m: u32) {
        Self::put(&mut self.wmask, off, &m.to_le_bytes());
    }
    pub(crate) fn w1c16(&mut self, off: usize, m: u16) {
        Self::put(&mut self.w1c, off, &m.to_le_bytes());
    }
    pub(crate) fn get8(&self, off: usize) -> u8 {
        self.data.get(off).copied().unwrap_or(0)
    }
    pub(crate) fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.get8(off), self.get8(off + 1)])
    }
    #[cfg(test)]
    pub(crate) fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes([0, 1, 2, 3].map(|i| self.get8(off + i)))
    }

    /// Merges a write byte by byte: masked bits take the new value, write-1-to-clear bits
    /// written as 1 clear, everything else (read-only) keeps its value.
    fn write(&mut self, off: usize, bytes: &[u8]) {
        for (i, &b) in bytes.iter().enumerate() {
            let p = off + i;
            if let (Some(d), Some(&m), Some(&c)) =
                (self.data.get_mut(p), self.wmask.get(p), self.w1c.get(p))
            {
                *d = ((*d & !m) | (b & m)) & !(b & c);
            }
        }
    }
}

/// The write mask of a BAR's low dword (and of the upper dword of a 64-bit one).
pub(crate) fn bar_masks(kind: BarKind, size: u64) -> (u32, u32) {
    let addr = !(size.wrapping_sub(1));
    let lo = (addr & 0xffff_ffff) as u32;
    let hi = (addr >> 32) as u32;
    match kind {
        BarKind::Io => (lo & !0x3, 0),
        BarKind::Mem32 { .. } => (lo & !0xf, 0),
        BarKind::Mem64 { .. } => (lo & !0xf, hi),
    }
}

/// The read-only type bits of a BAR's low dword.
pub(crate) fn bar_type_bits(kind: BarKind) -> u32 {
    match kind {
        BarKind::Io => 0x1,
        BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
        BarKind::Mem64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
    }
}

/// The function's config space.
#[derive(Debug)]
pub(crate) struct ConfigSpace {
    regs: Regs,
    power_on: Regs,
    layout: CapLayout,
}

fn touches(off: usize, len: usize, reg: usize, reg_len: usize) -> bool {
    off < reg + reg_len && reg < off + len
}

impl ConfigSpace {
    /// The registers' current bytes (for a hand-over).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.regs.data
    }

    /// Sets every register's bytes (a hand-over's; the caller checked the size).
    pub(crate) fn set_bytes(&mut self, data: &[u8]) {
        if data.len() == self.regs.data.len() {
            self.regs.data.copy_from_slice(data);
        }
    }

    /// Power-on config space for `spec`.
    pub(crate) fn new(spec: &PciDeviceSpec) -> Self {
        let size = usize::try_from(spec.config_size()).unwrap_or(256);
        let mut r = Regs::new(size);
        r.set16(VENDOR_ID, spec.vendor_id());
        r.set16(DEVICE_ID, spec.device_id());
        r.wmask16(COMMAND, COMMAND_WRITABLE);
        r.w1c16(STATUS, STATUS_W1C);
        r.set8(REVISION, spec.revision());
        let (base, sub, prog_if) = spec.class();
        r.set8(CLASS_PROG_IF, prog_if);
        r.set8(CLASS_PROG_IF + 1, sub);
        r.set8(CLASS_PROG_IF + 2, base);
        r.wmask8(CACHE_LINE_SIZE, 0xff);
        r.wmask8(LATENCY_TIMER, 0xff);
        for i in 0..NUM_BARS {
            let Some(bar) = spec.bar(u8::try_from(i).unwrap_or(u8::MAX)) else {
                continue;
            };
            let (lo, hi) = bar_masks(bar.kind, bar.size);
            r.set32(BAR0 + 4 * i, bar_type_bits(bar.kind));
            r.wmask32(BAR0 + 4 * i, lo);
            if let BarKind::Mem64 { .. } = bar.kind {
                r.wmask32(BAR0 + 4 * (i + 1), hi);
            }
        }
        let (sub_vendor, sub_id) = spec.subsystem();
        r.set16(SUBSYSTEM_VENDOR_ID, sub_vendor);
        r.set16(SUBSYSTEM_ID, sub_id);
        r.wmask8(INTERRUPT_LINE, 0xff);
        r.set8(INTERRUPT_PIN, spec.interrupt_pin());
        let layout = caps::add_caps(spec, &mut r);
        if layout.any() {
            r.set16(STATUS, STATUS_CAP_LIST);
        }
        Self {
            power_on: r.clone(),
            regs: r,
            layout,
        }
    }

    #[cfg(test)]
    /// Size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.regs.data.len()
    }

    #[cfg(test)]
    /// Where the capabilities are.
    pub(crate) fn layout(&self) -> CapLayout {
        self.layout
    }

    #[cfg(test)]
    /// The current bytes (for tests and debugging dumps).
    pub(crate) fn regs(&self) -> &Regs {
        &self.regs
    }

    /// Back to power-on values.
    pub(crate) fn reset(&mut self) {
        self.regs = self.power_on.clone();
    }

    /// Reads `data.len()` bytes at `off` (bounds checked by the caller).
    pub(crate) fn read(&self, off: usize, data: &mut [u8], irqs: &Interrupts) {
        if let Some(src) = self.regs.data.get(off..off + data.len()) {
            data.copy_from_slice(src);
        }
        if touches(off, data.len(), STATUS, 1) && irqs.lock().intx_level() {
            data[STATUS - off] |= STATUS_INTERRUPT;
        }
    }

    /// Writes `data` at `off` (bounds checked by the caller) and applies side effects.
    pub(crate) fn write(&mut self, off: usize, data: &[u8], irqs: &Interrupts) {
        let len = data.len();
        let msi_ctrl = self.layout.msi.map(|at| at + caps::MSI_CONTROL);
        let pmcsr = self.layout.pm.map(|at| at + caps::PM_PMCSR);
        let old_pmcsr = pmcsr.map(|at| self.regs.get16(at));
        self.regs.write(off, data);

        if touches(off, len, COMMAND, 2) {
            let cmd = self.regs.get16(COMMAND);
            irqs.lock()
                .set_intx_disabled(cmd & COMMAND_INTX_DISABLE != 0);
        }
        if let Some(at) = msi_ctrl.filter(|&at| touches(off, len, at, 2)) {
            // Multiple Message Enable may not exceed Multiple Message Capable.
            let ctrl = self.regs.get16(at);
            let mmc = (ctrl >> 1) & 7;
            let mme = (ctrl >> caps::MSI_CTRL_MME_SHIFT) & 7;
            if mme > mmc {
                let cleared = ctrl & !(7 << caps::MSI_CTRL_MME_SHIFT);
                self.regs
                    .set16(at, cleared | (mmc << caps::MSI_CTRL_MME_SHIFT));
            }
        }
        if let (Some(at), Some(old)) = (pmcsr, old_pmcsr) {
            // Only D0 and D3hot exist; a write of D1 or D2 is ignored.
            let state = self.regs.get16(at) & caps::PMCSR_STATE;
            if touches(off, len, at, 2) && (state == 1 || state == 2) {
                self.regs.set16(at, old);
            }
        }
        if let Some(at) = self.layout.msix.map(|at| at + caps::MSIX_CONTROL) {
            if touches(off, len, at, 2) {
                let ctrl = self.regs.get16(at);
                let mut s = irqs.lock();
                s.msix.set_function_mask(ctrl & caps::MSIX_CTRL_FMASK != 0);
                s.msix_deliver_pending();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn irqs() -> Interrupts {
        Interrupts::new([1, 1, 0, 1, 1])
    }

    fn read32(c: &ConfigSpace, off: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b, &irqs());
        u32::from_le_bytes(b)
    }

    fn write32(c: &mut ConfigSpace, off: usize, v: u32) {
        c.write(off, &v.to_le_bytes(), &irqs());
    }

    fn spec_with(kind: BarKind, size: u64) -> PciDeviceSpec {
        PciDeviceSpec::builder(0x1af4, 0x1000)
            .bar(0, kind, size)
            .build()
            .unwrap()
    }

    /// Decodes a size the way an OS does: all ones in, mask out, invert.
    fn sized(c: &mut ConfigSpace, kind: BarKind) -> u64 {
        write32(c, BAR0, u32::MAX);
        let lo = read32(c, BAR0);
        match kind {
            BarKind::Io => u64::from(!(lo & !0x3) + 1),
            BarKind::Mem32 { .. } => u64::from(!(lo & !0xf)).wrapping_add(1),
            BarKind::Mem64 { .. } => {
                write32(c, BAR0 + 4, u32::MAX);
                let hi = read32(c, BAR0 + 4);
                let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
                (!mask).wrapping_add(1)
            }
        }
    }

    proptest! {
        #[test]
        fn io_bar_sizes(shift in 2u32..=8) {
            let size = 1u64 << shift;
            let mut c = ConfigSpace::new(&spec_with(BarKind::Io, size));
            prop_assert_eq!(sized(&mut c, BarKind::Io), size);
            prop_assert_eq!(read32(&c, BAR0) & 0x3, 1);
        }

        #[test]
        fn mem32_bar_sizes(shift in 4u32..=31, pf: bool) {
            let size = 1u64 << shift;
            let kind = BarKind::Mem32 { prefetchable: pf };
            let mut c = ConfigSpace::new(&spec_with(kind, size));
            prop_assert_eq!(sized(&mut c, kind), size);
            prop_assert_eq!(read32(&c, BAR0) & 0xf, u32::from(pf) << 3);
        }

        #[test]
        fn mem64_bar_sizes(shift in 4u32..=63, pf: bool) {
            let size = 1u64 << shift;
            let kind = BarKind::Mem64 { prefetchable: pf };
            let mut c = ConfigSpace::new(&spec_with(kind, size));
            prop_assert_eq!(sized(&mut c, kind), size);
            prop_assert_eq!(read32(&c, BAR0) & 0xf, 0x4 | u32::from(pf) << 3);
        }

        #[test]
        fn bar_address_write_keeps_alignment(shift in 4u32..=20, addr: u32) {
            let size = 1u64 << shift;
            let mut c = ConfigSpace::new(&spec_with(BarKind::Mem32 { prefetchable: false }, size));
            write32(&mut c, BAR0, addr);
            prop_assert_eq!(u64::from(read32(&c, BAR0)) % size, 0);
        }
    }

    #[test]
    fn unimplemented_bars_read_zero_and_ignore_writes() {
        let mut c = ConfigSpace::new(&spec_with(BarKind::Io, 8));
        for i in 1..6 {
            write32(&mut c, BAR0 + 4 * i, u32::MAX);
            assert_eq!(read32(&c, BAR0 + 4 * i), 0);
        }
        write32(&mut c, 0x30, u32::MAX);
        assert_eq!(read32(&c, 0x30), 0, "expansion ROM");
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let spec = PciDeviceSpec::builder(0x4348, 0x3253)
            .class(7, 0, 2)
            .revision(0x10)
            .subsystem(0x4348, 0x3253)
            .interrupt_pin(1)
            .build()
            .unwrap();
        let mut c = ConfigSpace::new(&spec);
        let before: Vec<u32> = [0x00, 0x08, 0x2c, 0x34].map(|o| read32(&c, o)).to_vec();
        for off in [0x00, 0x08, 0x2c, 0x34] {
            write32(&mut c, off, 0xdead_beef);
        }
        let after: Vec<u32> = [0x00, 0x08, 0x2c, 0x34].map(|o| read32(&c, o)).to_vec();
        assert_eq!(before, after);
        assert_eq!(read32(&c, 0x08), 0x0700_0210);
        c.write(0x3c, &[0x0b, 0x04], &irqs());
        assert_eq!(c.regs().get16(0x3c), 0x010b, "line RW, pin RO");
    }

    #[test]
    fn command_keeps_only_writable_bits() {
        let mut c = ConfigSpace::new(&spec_with(BarKind::Io, 8));
        c.write(COMMAND, &[0xff, 0xff], &irqs());
        assert_eq!(c.regs().get16(COMMAND), COMMAND_WRITABLE);
    }

    #[test]
    fn status_reflects_intx_level_and_caps() {
        let spec = PciDeviceSpec::builder(1, 2)
            .interrupt_pin(1)
            .msi(1, false)
            .build()
            .unwrap();
        let c = ConfigSpace::new(&spec);
        let i = irqs();
        let mut s = [0u8; 2];
        c.read(STATUS, &mut s, &i);
        assert_eq!(u16::from_le_bytes(s), STATUS_CAP_LIST);
        i.set_intx(true);
        c.read(STATUS, &mut s, &i);
        assert_eq!(s[0], 0x18);
    }

    #[test]
    fn unaligned_access_spanning_registers_merges_bytewise() {
        let mut c = ConfigSpace::new(&spec_with(BarKind::Io, 8));
        // Bytes 0x03..0x06: device id high byte (RO) and command low byte (RW).
        c.write(0x03, &[0xaa, 0x07], &irqs());
        let mut b = [0u8; 3];
        c.read(0x03, &mut b, &irqs());
        assert_eq!(b, [0x10, 0x07, 0x00]);
    }

    #[test]
    fn msi_mme_is_clamped_to_capability() {
        let spec = PciDeviceSpec::builder(1, 2).msi(2, false).build().unwrap();
        let mut c = ConfigSpace::new(&spec);
        let at = c.layout().msi.unwrap() + caps::MSI_CONTROL;
        c.write(at, &0x0071u16.to_le_bytes(), &irqs());
        let ctrl = c.regs().get16(at);
        assert_eq!(ctrl & 1, 1);
        assert_eq!((ctrl >> 4) & 7, 1);
    }

    #[test]
    fn pm_state_accepts_only_d0_and_d3() {
        let spec = PciDeviceSpec::builder(1, 2)
            .power_management()
            .build()
            .unwrap();
        let mut c = ConfigSpace::new(&spec);
        let at = c.layout().pm.unwrap() + caps::PM_PMCSR;
        c.write(at, &[3], &irqs());
        assert_eq!(c.regs().get16(at) & 3, 3);
        c.write(at, &[1], &irqs());
        assert_eq!(c.regs().get16(at) & 3, 3);
    }

    #[test]
    fn reset_restores_power_on_values() {
        let mut c = ConfigSpace::new(&spec_with(
            BarKind::Mem32 {
                prefetchable: false,
            },
            4096,
        ));
        write32(&mut c, BAR0, 0xfebf_0000);
        write32(&mut c, COMMAND, 0x7);
        c.reset();
        assert_eq!(read32(&c, BAR0), 0);
        assert_eq!(read32(&c, COMMAND) & 0xffff, 0);
    }

    #[test]
    fn pcie_config_space_is_4k_with_empty_extended_header() {
        let spec = PciDeviceSpec::builder(1, 2).pcie().build().unwrap();
        let c = ConfigSpace::new(&spec);
        assert_eq!(c.size(), 4096);
        assert_eq!(read32(&c, 0x100), 0);
    }
}
