//! The capability chain: PM, MSI, PCI Express and MSI-X, laid out from 0x40 in that order.

use crate::config::Regs;
use crate::spec::PciDeviceSpec;

/// Offset of the first capability.
pub(crate) const CAP_START: usize = 0x40;

/// Capability ids.
pub(crate) const CAP_ID_PM: u8 = 0x01;
pub(crate) const CAP_ID_MSI: u8 = 0x05;
pub(crate) const CAP_ID_PCIE: u8 = 0x10;
pub(crate) const CAP_ID_MSIX: u8 = 0x11;

/// PM: power management capabilities (version 3, no PME) and control/status.
pub(crate) const PM_PMC: usize = 2;
pub(crate) const PM_PMCSR: usize = 4;
const PM_SIZE: usize = 8;
/// PMCSR: power state field (D0..D3hot) and No_Soft_Reset (D3hot -> D0 keeps state).
pub(crate) const PMCSR_STATE: u16 = 0x0003;
const PMCSR_NO_SOFT_RESET: u16 = 0x0008;

/// MSI: message control and the 64-bit layout's registers.
pub(crate) const MSI_CONTROL: usize = 2;
const MSI_ADDR_LO: usize = 4;
const MSI_ADDR_HI: usize = 8;
const MSI_DATA: usize = 0xc;
const MSI_MASK: usize = 0x10;
pub(crate) const MSI_CTRL_ENABLE: u16 = 1 << 0;
pub(crate) const MSI_CTRL_MME_SHIFT: u16 = 4;
const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_PVM: u16 = 1 << 8;

/// PCI Express capability registers (version 2 layout, 0x3c bytes).
const PCIE_CAPS: usize = 2;
const PCIE_DEVCAP: usize = 4;
const PCIE_DEVCTL: usize = 8;
const PCIE_DEVSTA: usize = 0xa;
const PCIE_LINKCAP: usize = 0xc;
const PCIE_LINKCTL: usize = 0x10;
const PCIE_LINKSTA: usize = 0x12;
const PCIE_LINKCAP2: usize = 0x2c;
const PCIE_LINKCTL2: usize = 0x30;
const PCIE_SIZE: usize = 0x3c;

/// MSI-X: message control, table offset/BIR, PBA offset/BIR.
pub(crate) const MSIX_CONTROL: usize = 2;
const MSIX_TABLE: usize = 4;
const MSIX_PBA: usize = 8;
const MSIX_SIZE: usize = 0xc;
pub(crate) const MSIX_CTRL_FMASK: u16 = 1 << 14;
pub(crate) const MSIX_CTRL_ENABLE: u16 = 1 << 15;

/// Where each capability landed in config space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CapLayout {
    pub(crate) pm: Option<usize>,
    pub(crate) msi: Option<usize>,
    pub(crate) pcie: Option<usize>,
    pub(crate) msix: Option<usize>,
}

impl CapLayout {
    /// Whether the chain is non-empty.
    pub(crate) fn any(&self) -> bool {
        self.pm.is_some() || self.msi.is_some() || self.pcie.is_some() || self.msix.is_some()
    }
}

/// Writes the capability chain into `regs` and links it from the capabilities pointer.
pub(crate) fn add_caps(spec: &PciDeviceSpec, regs: &mut Regs) -> CapLayout {
    let mut layout = CapLayout::default();
    let mut pos = CAP_START;
    // Offset of the byte that must point at the next capability: 0x34 to begin with.
    let mut link = 0x34;
    let mut place = |regs: &mut Regs, id: u8, size: usize| {
        regs.set8(link, u8::try_from(pos).unwrap_or(0));
        regs.set8(pos, id);
        link = pos + 1;
        let at = pos;
        pos += size.next_multiple_of(4);
        at
    };

    if spec.has_power_management() {
        let at = place(regs, CAP_ID_PM, PM_SIZE);
        regs.set16(at + PM_PMC, 0x0003);
        regs.set16(at + PM_PMCSR, PMCSR_NO_SOFT_RESET);
        regs.wmask16(at + PM_PMCSR, PMCSR_STATE);
        layout.pm = Some(at);
    }
    if let Some(msi) = spec.msi() {
        let size = if msi.per_vector_mask { 0x18 } else { 0xe };
        let at = place(regs, CAP_ID_MSI, size);
        let mmc = u16::try_from(msi.vectors.trailing_zeros()).unwrap_or(0);
        let pvm = if msi.per_vector_mask { MSI_CTRL_PVM } else { 0 };
        regs.set16(at + MSI_CONTROL, (mmc << 1) | MSI_CTRL_64BIT | pvm);
        regs.wmask16(
            at + MSI_CONTROL,
            MSI_CTRL_ENABLE | (0x7 << MSI_CTRL_MME_SHIFT),
        );
        regs.wmask32(at + MSI_ADDR_LO, 0xffff_fffc);
        regs.wmask32(at + MSI_ADDR_HI, 0xffff_ffff);
        regs.wmask16(at + MSI_DATA, 0xffff);
        if msi.per_vector_mask {
            let bits = u32::try_from((1u64 << msi.vectors) - 1).unwrap_or(u32::MAX);
            regs.wmask32(at + MSI_MASK, bits);
        }
        layout.msi = Some(at);
    }
    if spec.is_pcie() {
        let at = place(regs, CAP_ID_PCIE, PCIE_SIZE);
        // Version 2, device/port type 0: PCI Express endpoint.
        regs.set16(at + PCIE_CAPS, 0x0002);
        // Max payload 128 bytes; role-based error reporting (required since 1.1).
        regs.set32(at + PCIE_DEVCAP, 1 << 15);
        // Defaults: relaxed ordering, no snoop, max read request 512 bytes.
        regs.set16(at + PCIE_DEVCTL, 0x2810);
        regs.wmask16(at + PCIE_DEVCTL, 0x781f);
        regs.w1c16(at + PCIE_DEVSTA, 0x000f);
        // 2.5 GT/s, x1, for link and its status.
        regs.set32(at + PCIE_LINKCAP, 0x0000_0011);
        regs.wmask16(at + PCIE_LINKCTL, 0x00cb);
        regs.set16(at + PCIE_LINKSTA, 0x0011);
        regs.set32(at + PCIE_LINKCAP2, 0x0000_0002);
        regs.set16(at + PCIE_LINKCTL2, 0x0001);
        layout.pcie = Some(at);
    }
    if let Some(msix) = spec.msix() {
        let at = place(regs, CAP_ID_MSIX, MSIX_SIZE);
        regs.set16(
            at + MSIX_CONTROL,
            u16::try_from(msix.vectors - 1).unwrap_or(0),
        );
        regs.wmask16(at + MSIX_CONTROL, MSIX_CTRL_FMASK | MSIX_CTRL_ENABLE);
        regs.set32(
            at + MSIX_TABLE,
            msix.table_offset | u32::from(msix.table_bar),
        );
        regs.set32(at + MSIX_PBA, msix.pba_offset | u32::from(msix.pba_bar));
        layout.msix = Some(at);
    }
    layout
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::BarKind;

    fn regs_for(spec: &PciDeviceSpec) -> (Regs, CapLayout) {
        let mut regs = Regs::new(4096);
        let layout = add_caps(spec, &mut regs);
        (regs, layout)
    }

    fn full_spec() -> PciDeviceSpec {
        PciDeviceSpec::builder(1, 2)
            .bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                4096,
            )
            .power_management()
            .msi(4, true)
            .pcie()
            .msix(8, 0, 0, 0, 2048)
            .build()
            .unwrap()
    }

    #[test]
    fn chain_follows_declared_order() {
        let (regs, layout) = regs_for(&full_spec());
        let mut ids = Vec::new();
        let mut at = usize::from(regs.get8(0x34));
        while at != 0 {
            assert_eq!(at % 4, 0);
            ids.push(regs.get8(at));
            at = usize::from(regs.get8(at + 1));
        }
        assert_eq!(ids, [CAP_ID_PM, CAP_ID_MSI, CAP_ID_PCIE, CAP_ID_MSIX]);
        assert_eq!(layout.pm, Some(CAP_START));
    }

    #[test]
    fn caps_fit_in_legacy_config_space() {
        let (_, layout) = regs_for(&full_spec());
        assert!(layout.msix.unwrap() + MSIX_SIZE <= 0x100);
    }

    #[test]
    fn msi_control_reports_vectors_and_features() {
        let (regs, layout) = regs_for(&full_spec());
        let ctrl = regs.get16(layout.msi.unwrap() + MSI_CONTROL);
        assert_eq!((ctrl >> 1) & 7, 2, "4 vectors = 2^2");
        assert_ne!(ctrl & MSI_CTRL_64BIT, 0);
        assert_ne!(ctrl & MSI_CTRL_PVM, 0);
    }

    #[test]
    fn msix_registers_hold_size_and_locations() {
        let (regs, layout) = regs_for(&full_spec());
        let at = layout.msix.unwrap();
        assert_eq!(regs.get16(at + MSIX_CONTROL), 7);
        assert_eq!(regs.get32(at + MSIX_PBA), 2048);
    }

    #[test]
    fn no_caps_means_null_pointer() {
        let spec = PciDeviceSpec::builder(1, 2).build().unwrap();
        let (regs, layout) = regs_for(&spec);
        assert!(!layout.any());
        assert_eq!(regs.get8(0x34), 0);
    }
}
