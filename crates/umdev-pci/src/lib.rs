//! umdev-pci: the PCI device model.
//!
//! The framework owns PCI config space (header, BAR sizing, capability chain, MSI and
//! MSI-X with its table and PBA, command/status semantics); a device only says what its
//! BARs do. The lifecycle is *declare, validate, freeze, serve*:
//!
//! 1. a device describes itself with [`PciDeviceSpec::builder`]; [`build`] checks the
//!    layout and returns a typed [`SpecError`] for a bad one;
//! 2. [`PciFunction::new`] pairs the frozen spec with a [`PciDevice`];
//! 3. the vfio-user server drives the function: region and IRQ info, region reads and
//!    writes (never split into smaller pieces), SET_IRQS, reset, open and close.
//!
//! Region and IRQ indexes are numbered like the kernel's `VFIO_PCI_*_INDEX`.
//!
//! ```
//! use umdev_pci::{BarIndex, BarKind, Errno, PciDevice, PciDeviceSpec, PciFunction};
//!
//! struct Scratch([u8; 16]);
//! impl PciDevice for Scratch {
//!     fn bar_read(&mut self, _: BarIndex, off: u64, data: &mut [u8]) -> Result<(), Errno> {
//!         let off = usize::try_from(off).map_err(|_| Errno::INVAL)?;
//!         data.copy_from_slice(&self.0[off..off + data.len()]);
//!         Ok(())
//!     }
//!     fn bar_write(&mut self, _: BarIndex, off: u64, data: &[u8]) -> Result<(), Errno> {
//!         let off = usize::try_from(off).map_err(|_| Errno::INVAL)?;
//!         self.0[off..off + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//! }
//!
//! let spec = PciDeviceSpec::builder(0x1b36, 0x0005)
//!     .class(0xff, 0, 0)
//!     .bar(0, BarKind::Mem32 { prefetchable: false }, 16)
//!     .msi(1, false)
//!     .build()?;
//! let mut function = PciFunction::new(spec, Box::new(Scratch([0; 16])));
//!
//! // The framework answers config space; the BAR goes to the device, bounds-checked.
//! let mut ids = [0u8; 4];
//! function.region_read(umdev_pci::CONFIG_REGION, 0, &mut ids)?;
//! assert_eq!(ids, [0x36, 0x1b, 0x05, 0x00]);
//! function.region_write(umdev_pci::BAR0_REGION, 4, b"hi")?;
//! assert_eq!(function.region_write(umdev_pci::BAR0_REGION, 15, b"hi").unwrap_err().errno(), 22);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`build`]: PciDeviceSpecBuilder::build
#![warn(missing_docs)]

mod caps;
mod client;
mod config;
mod error;
mod function;
pub mod handover;
mod interrupts;
pub mod io_fds;
pub mod migration;
mod msix;
mod spec;
pub mod state_format;
mod work;

pub use client::{ClientId, PeerCred};
pub use error::{DeviceError, MsixStructure, SpecError};
pub use function::{
    fourcc, DeviceContext, DeviceInfo, DisplayPlane, IrqInfo, OpenGuard, PciDevice, PciFunction,
    RegionInfo, RegionMmap, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE, REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
pub use handover::{push_fd, HandOver, HandedFds};
pub use interrupts::{
    Interrupts, IrqData, IrqMode, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
pub use io_fds::{IoFdArea, IoFdSpec, IoNotify};
pub use migration::{MigState, MigrationError, MigrationSpec};
pub use msix::MSIX_ENTRY_SIZE;
pub use spec::{
    BarKind, BarMmap, BarSpec, MsiSpec, MsixSpec, PciDeviceSpec, PciDeviceSpecBuilder,
    MAX_WORK_THREADS, NUM_BARS,
};
pub use state_format::{StateReader, StateWriter, StreamError};
pub use work::{Pump, Work};

/// The one error type of every hook a device author writes: a positive errno, which the
/// client gets in its error reply (`Errno::INVAL`, `Errno::BUSY`, ...).
pub use rustix::io::Errno;

/// Region index of BAR 0.
pub const BAR0_REGION: u32 = 0;
/// Region index of BAR 1.
pub const BAR1_REGION: u32 = 1;
/// Region index of BAR 2.
pub const BAR2_REGION: u32 = 2;
/// Region index of BAR 3.
pub const BAR3_REGION: u32 = 3;
/// Region index of BAR 4.
pub const BAR4_REGION: u32 = 4;
/// Region index of BAR 5.
pub const BAR5_REGION: u32 = 5;
/// Region index of the expansion ROM (always absent).
pub const ROM_REGION: u32 = 6;
/// Region index of config space.
pub const CONFIG_REGION: u32 = 7;
/// Region index of legacy VGA (always absent).
pub const VGA_REGION: u32 = 8;
/// Number of region indexes.
pub const NUM_REGIONS: u32 = 9;
/// Number of IRQ indexes.
pub const NUM_IRQS: u32 = 5;

/// A BAR number, 0..=5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BarIndex(u8);

impl BarIndex {
    /// `Some` for 0..=5.
    pub fn new(n: u8) -> Option<BarIndex> {
        (usize::from(n) < NUM_BARS).then_some(BarIndex(n))
    }

    /// The number.
    pub fn get(self) -> u8 {
        self.0
    }
}

/// IRQ indexes, numbered like the kernel's `VFIO_PCI_*_IRQ_INDEX`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqIndex {
    /// Legacy INTx line.
    Intx = 0,
    /// MSI.
    Msi = 1,
    /// MSI-X.
    Msix = 2,
    /// Error notification.
    Err = 3,
    /// Device release request.
    Req = 4,
}

impl TryFrom<u32> for IrqIndex {
    type Error = DeviceError;

    fn try_from(v: u32) -> Result<Self, DeviceError> {
        Ok(match v {
            0 => Self::Intx,
            1 => Self::Msi,
            2 => Self::Msix,
            3 => Self::Err,
            4 => Self::Req,
            _ => return Err(DeviceError::InvalidIrqIndex(v)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_index_accepts_0_to_5_only() {
        assert_eq!(BarIndex::new(5).map(BarIndex::get), Some(5));
        assert!(BarIndex::new(6).is_none());
    }

    #[test]
    fn irq_index_round_trips() {
        for i in 0..NUM_IRQS {
            assert_eq!(IrqIndex::try_from(i).unwrap() as u32, i);
        }
        assert!(IrqIndex::try_from(NUM_IRQS).is_err());
    }
}
