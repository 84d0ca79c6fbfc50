//! IOVA ranges and access permissions: the checked value types of the mapping table.

use std::fmt;

use crate::error::DmaError;

/// Page size the address space assumes for file offsets of fd-backed mappings.
///
/// The vfio-user spec lets the client pick any IOVA and length; only the file offset of an
/// fd-backed mapping has to be page-aligned, because `mmap` requires it.
pub const PAGE_SIZE: u64 = 4096;

/// A non-empty range of I/O virtual addresses, `[start, start + len)`.
///
/// The constructor guarantees `len > 0` and that `start + len` does not overflow `u64`, so
/// [`IovaRange::end`] is always exact and every other method is total.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IovaRange {
    start: u64,
    len: u64,
}

impl IovaRange {
    /// Checks and builds a range of `len` bytes from `start`.
    ///
    /// Fails with [`DmaError::InvalidRange`] (EINVAL) when `len` is 0 or when `start + len`
    /// overflows `u64`. The exclusive end must fit in `u64`, so the very last address,
    /// `u64::MAX`, can never be part of a range.
    pub fn new(start: u64, len: u64) -> Result<Self, DmaError> {
        if len == 0 || start.checked_add(len).is_none() {
            return Err(DmaError::InvalidRange { start, len });
        }
        Ok(Self { start, len })
    }

    /// First address of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Number of bytes in the range (never 0).
    #[allow(clippy::len_without_is_empty)] // A range is never empty by construction.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// First address after the range (exclusive end).
    pub fn end(&self) -> u64 {
        // Checked in `new`; saturating keeps this total without a panic path.
        self.start.saturating_add(self.len)
    }

    /// Whether `iova` lies inside the range.
    pub fn contains(&self, iova: u64) -> bool {
        iova >= self.start && iova < self.end()
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.start < other.end() && other.start < self.end()
    }
}

impl fmt::Debug for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IovaRange({:#x}..{:#x})", self.start, self.end())
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end())
    }
}

/// Access permissions of a mapping, as the `VFIO_USER_F_DMA_REGION_{READ,WRITE}` bits.
///
/// Bit 0 is read, bit 1 is write; no other bit exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot(u8);

impl Prot {
    /// No access. A mapping cannot be made with it; it is the identity of [`Prot::union`].
    pub const NONE: Prot = Prot(0);
    /// The device may read the memory.
    pub const READ: Prot = Prot(1);
    /// The device may write the memory.
    pub const WRITE: Prot = Prot(1 << 1);
    /// The device may read and write the memory.
    pub const READ_WRITE: Prot = Prot(Self::READ.0 | Self::WRITE.0);

    /// Whether every permission in `other` is also in `self`.
    pub fn contains(self, other: Prot) -> bool {
        self.0 & other.0 == other.0
    }

    /// Builds a `Prot` from raw bits; `None` if any bit other than 0 (read) and 1 (write) is set.
    ///
    /// `from_bits(0)` is `Some(Prot::NONE)`: an empty set is a valid value, which
    /// [`AddressSpace::map`](crate::AddressSpace::map) then refuses.
    pub fn from_bits(bits: u8) -> Option<Prot> {
        if bits & !Self::READ_WRITE.0 != 0 {
            return None;
        }
        Some(Prot(bits))
    }

    /// The raw bits (0: read, 1: write).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether no permission is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Permissions in `self` or in `other`.
    #[must_use]
    pub fn union(self, other: Prot) -> Prot {
        Prot(self.0 | other.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_length_range_is_invalid() {
        let err = IovaRange::new(0x1000, 0).unwrap_err();
        assert_eq!(err.errno(), rustix::io::Errno::INVAL.raw_os_error());
    }

    #[test]
    fn range_overflowing_u64_is_invalid() {
        assert!(IovaRange::new(u64::MAX, 1).is_err());
        assert!(IovaRange::new(1, u64::MAX).is_err());
    }

    #[test]
    fn range_ending_just_below_2_pow_64_is_valid() {
        let r = IovaRange::new(u64::MAX - 1, 1).unwrap();
        assert_eq!(r.end(), u64::MAX);
        assert!(r.contains(u64::MAX - 1));
        assert!(!r.contains(u64::MAX));
    }

    #[test]
    fn end_is_exclusive() {
        let r = IovaRange::new(0x1000, 0x1000).unwrap();
        assert_eq!(r.end(), 0x2000);
        assert!(r.contains(0x1fff));
        assert!(!r.contains(0x2000));
        assert!(!r.contains(0xfff));
    }

    #[test]
    fn adjacent_ranges_do_not_overlap() {
        let a = IovaRange::new(0, 0x1000).unwrap();
        let b = IovaRange::new(0x1000, 0x1000).unwrap();
        assert!(!a.overlaps(&b));
        assert!(!b.overlaps(&a));
    }

    #[test]
    fn prot_from_bits_refuses_unknown_bits() {
        assert_eq!(Prot::from_bits(0), Some(Prot::NONE));
        assert_eq!(Prot::from_bits(1), Some(Prot::READ));
        assert_eq!(Prot::from_bits(2), Some(Prot::WRITE));
        assert_eq!(Prot::from_bits(3), Some(Prot::READ_WRITE));
        assert_eq!(Prot::from_bits(4), None);
        assert_eq!(Prot::from_bits(0x83), None);
    }

    #[test]
    fn prot_contains_is_subset() {
        assert!(Prot::READ_WRITE.contains(Prot::READ));
        assert!(Prot::READ_WRITE.contains(Prot::WRITE));
        assert!(!Prot::READ.contains(Prot::WRITE));
        assert!(Prot::READ.contains(Prot::NONE));
        assert_eq!(Prot::READ.union(Prot::WRITE), Prot::READ_WRITE);
    }

    proptest! {
        #[test]
        fn overlap_matches_naive_byte_model(
            a in 0u64..64, alen in 1u64..32, b in 0u64..64, blen in 1u64..32,
        ) {
            let ra = IovaRange::new(a, alen).unwrap();
            let rb = IovaRange::new(b, blen).unwrap();
            let naive = (a..a + alen).any(|x| (b..b + blen).contains(&x));
            prop_assert_eq!(ra.overlaps(&rb), naive);
            prop_assert_eq!(rb.overlaps(&ra), naive);
        }

        #[test]
        fn new_accepts_exactly_the_non_overflowing_ranges(start: u64, len: u64) {
            let ok = len > 0 && start.checked_add(len).is_some();
            prop_assert_eq!(IovaRange::new(start, len).is_ok(), ok);
        }
    }
}
