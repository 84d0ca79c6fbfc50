//! Errors of the device model: a bad spec at build time, a bad request at run time.

use rustix::io::Errno;

/// Which MSI-X structure a [`SpecError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixStructure {
    /// The vector table (16 bytes per vector).
    Table,
    /// The pending-bit array (one bit per vector, in 8-byte words).
    Pba,
}

impl std::fmt::Display for MsixStructure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Table => f.write_str("MSI-X table"),
            Self::Pba => f.write_str("MSI-X PBA"),
        }
    }
}

/// Why [`PciDeviceSpecBuilder::build`](crate::PciDeviceSpecBuilder::build) refused a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// BAR indexes run from 0 to 5.
    #[error("BAR index {0} is out of range (0..=5)")]
    BarIndexOutOfRange(u8),
    /// The index is already taken by another BAR, or by the upper half of a 64-bit BAR.
    #[error("BAR {0} is already in use")]
    BarInUse(u8),
    /// A 64-bit BAR needs two slots; BAR 5 has no slot above it.
    #[error("a 64-bit BAR cannot start at index 5")]
    Mem64AtLastIndex,
    /// BAR sizes must be powers of two.
    #[error("BAR {index} size {size:#x} is not a power of two")]
    BarSizeNotPowerOfTwo {
        /// The BAR index.
        index: u8,
        /// The size asked for.
        size: u64,
    },
    /// I/O BARs are at least 4 bytes, memory BARs at least 16.
    #[error("BAR {index} size {size:#x} is below the minimum of {min:#x}")]
    BarTooSmall {
        /// The BAR index.
        index: u8,
        /// The size asked for.
        size: u64,
        /// The minimum for the BAR's kind.
        min: u64,
    },
    /// I/O BARs are at most 256 bytes; 32-bit memory BARs at most 2 GiB; 64-bit at most 2^63.
    #[error("BAR {index} size {size:#x} is above the maximum of {max:#x}")]
    BarTooLarge {
        /// The BAR index.
        index: u8,
        /// The size asked for.
        size: u64,
        /// The maximum for the BAR's kind.
        max: u64,
    },
    /// The interrupt pin is 0 (none) or 1..=4 (INTA..INTD).
    #[error("interrupt pin {0} is out of range (1..=4)")]
    InterruptPin(u8),
    /// MSI supports 1, 2, 4, 8, 16 or 32 vectors.
    #[error("MSI vector count {0} is not a power of two in 1..=32")]
    MsiVectors(u32),
    /// MSI-X supports 1..=2048 vectors.
    #[error("MSI-X vector count {0} is out of range (1..=2048)")]
    MsixVectors(u32),
    /// The MSI-X table and PBA must sit in an existing memory BAR.
    #[error("{what} is in BAR {bar}, which is not a memory BAR of this device")]
    MsixNotInMemoryBar {
        /// Table or PBA.
        what: MsixStructure,
        /// The BAR asked for.
        bar: u8,
    },
    /// The MSI-X table and PBA offsets must be 8-byte aligned.
    #[error("{what} offset {offset:#x} is not 8-byte aligned")]
    MsixMisaligned {
        /// Table or PBA.
        what: MsixStructure,
        /// The offset asked for.
        offset: u32,
    },
    /// The structure does not fit inside its BAR.
    #[error("{what} at {offset:#x} does not fit in BAR {bar}")]
    MsixOutsideBar {
        /// Table or PBA.
        what: MsixStructure,
        /// The BAR.
        bar: u8,
        /// The offset asked for.
        offset: u32,
    },
    /// The MSI-X table and PBA overlap.
    #[error("MSI-X table and PBA overlap")]
    MsixOverlap,
    /// An mmap was declared for a BAR that does not exist.
    #[error("mmap declared for BAR {0}, which does not exist")]
    MmapMissingBar(u8),
    /// An mmap was declared twice for the same BAR.
    #[error("mmap declared twice for BAR {0}")]
    MmapTwice(u8),
    /// A sparse mmap area lies (partly) outside its BAR.
    #[error("mmap area {offset:#x}+{size:#x} lies outside BAR {index}")]
    MmapAreaOutsideBar {
        /// The BAR index.
        index: u8,
        /// Start of the area within the BAR.
        offset: u64,
        /// Size of the area.
        size: u64,
    },
    /// A work context has 1 to [`MAX_WORK_THREADS`](crate::spec::MAX_WORK_THREADS) threads.
    #[error("{0} work threads: a device has 1 to 64")]
    WorkThreads(usize),
    /// An mmap area would let the client bypass the emulated MSI-X table or PBA.
    #[error("mmap of BAR {0} covers the emulated MSI-X table or PBA")]
    MmapCoversMsix(u8),
}

/// A failed request on a [`PciFunction`](crate::PciFunction), or an error a device reports.
///
/// Every variant maps to a positive errno through [`DeviceError::errno`], which the
/// vfio-user server puts in its error reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// Region index at or above [`NUM_REGIONS`](crate::NUM_REGIONS).
    #[error("region index {0} is out of range")]
    InvalidRegion(u32),
    /// An access that does not fit in its region.
    #[error("access {offset:#x}+{len:#x} is outside region {region} (size {size:#x})")]
    OutOfBounds {
        /// The region index.
        region: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the region.
        size: u64,
    },
    /// An access that straddles the emulated MSI-X table or PBA and device registers.
    #[error("access {offset:#x}+{len:#x} straddles the MSI-X table or PBA in region {region}")]
    StraddlesMsix {
        /// The region index.
        region: u32,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// IRQ index at or above [`NUM_IRQS`](crate::NUM_IRQS).
    #[error("IRQ index {0} is out of range")]
    InvalidIrqIndex(u32),
    /// A SET_IRQS request the kernel's vfio-pci would refuse with EINVAL.
    #[error("invalid SET_IRQS request: {0}")]
    InvalidSetIrqs(&'static str),
    /// A hook of the device (or of the framework around it, such as the IOMMU group's
    /// owner check at open) failed with this errno.
    #[error("the device failed the request: {}", std::io::Error::from(*.0))]
    Device(Errno),
    /// A migration request failed (its own errno: EINVAL, EBUSY, ENOTSUP, ...).
    #[error("migration request failed")]
    Migration(#[source] crate::migration::MigrationError),
}

impl From<crate::migration::MigrationError> for DeviceError {
    fn from(e: crate::migration::MigrationError) -> Self {
        Self::Migration(e)
    }
}

impl From<Errno> for DeviceError {
    fn from(e: Errno) -> Self {
        Self::Device(e)
    }
}

/// A device's `load` reads its fields with `?`: a field that is missing or malformed is
/// logged with its reason and refuses the whole state with EINVAL.
impl From<crate::state_format::StreamError> for Errno {
    fn from(e: crate::state_format::StreamError) -> Self {
        tracing::warn!(error = %e, "incoming device state refused by the device");
        Errno::INVAL
    }
}

impl From<crate::state_format::StreamError> for DeviceError {
    fn from(e: crate::state_format::StreamError) -> Self {
        Self::Migration(crate::migration::MigrationError::Stream(e))
    }
}

impl DeviceError {
    /// The positive errno to report to the client.
    pub fn errno(&self) -> i32 {
        match self {
            Self::InvalidRegion(_)
            | Self::OutOfBounds { .. }
            | Self::StraddlesMsix { .. }
            | Self::InvalidIrqIndex(_)
            | Self::InvalidSetIrqs(_) => Errno::INVAL.raw_os_error(),
            Self::Device(e) => e.raw_os_error(),
            Self::Migration(e) => e.errno(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_errors_map_to_einval() {
        assert_eq!(DeviceError::InvalidRegion(9).errno(), 22);
        assert_eq!(DeviceError::InvalidSetIrqs("x").errno(), 22);
    }

    #[test]
    fn device_errors_keep_their_errno() {
        assert_eq!(DeviceError::Device(Errno::BUSY).errno(), 16);
        assert_eq!(DeviceError::from(Errno::IO).errno(), 5);
    }
}
