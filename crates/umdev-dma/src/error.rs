//! The one error type of this crate and its errno mapping.
//!
//! Errnos are chosen to match what a vfio-user client would get from the kernel's VFIO type1
//! IOMMU backend for the same request, so that a client sees the same answer from umdev as
//! from an in-kernel device:
//!
//! | Request                                   | Variant                   | errno   |
//! |-------------------------------------------|---------------------------|---------|
//! | bad range, bad prot, unaligned offset     | `InvalidRange`, ...       | EINVAL  |
//! | map over an existing mapping              | `Overlap`                 | EEXIST  |
//! | map past the table limit                  | `TooManyMappings`         | ENOSPC  |
//! | unmap of a range that is not one mapping  | `NotMapped`               | ENOENT  |
//! | copy touching an unmapped byte            | `Fault`                   | EFAULT  |
//! | copy lacking read or write permission     | `PermissionDenied`        | EPERM   |
//! | copy into a fd-less mapping, no remote    | `NoRemote`                | EFAULT  |
//! | mmap/fstat failure, remote failure        | `Mmap`, `Stat`, `Remote`  | theirs  |
//! | pin/unpin of more than 512 pages          | `TooManyPages`            | E2BIG   |
//! | pin of an unmapped, fd-less or read-only page, unaligned, 0 pages | `PinInvalid` | EINVAL |
//! | unpin of a page the device has not pinned | `NotPinned`               | EINVAL  |
//! | pin past the locked-memory budget         | `OverBudget`              | ENOMEM  |
//! | pin or handle access of a revoked device  | `Revoked`                 | EIO     |
//! | translation of a fd-less mapping          | `NoHostMemory`            | EINVAL  |
//! | logging started twice                     | `LoggingActive`           | EBUSY   |
//! | dirty report while logging is off         | `LoggingInactive`         | EINVAL  |
//! | bad page size, range or bitmap size       | `BadBitmap`               | EINVAL  |
//! | access to memory the client took away     | `Poisoned`                | EFAULT  |
//!
//! Where the kernel differs: type1's `vfio_pin_pages` answers EPERM for a mapping that lacks
//! the permission; the issue that specified pinning asks for EINVAL, which we follow.

use rustix::io::Errno;

use crate::range::{IovaRange, Prot};

/// Everything that can go wrong in an address space.
///
/// None of these errors is fatal to a connection: each one answers one request.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// A range is empty, or its end (or the end of an access) overflows `u64`. EINVAL.
    #[error("Invalid IOVA range: start {start:#x}, length {len:#x}")]
    InvalidRange {
        /// First address asked for.
        start: u64,
        /// Length asked for.
        len: u64,
    },
    /// A mapping was asked for with no permission at all. EINVAL.
    #[error("Mapping {range} has no access permission")]
    EmptyProt {
        /// The range that was to be mapped.
        range: IovaRange,
    },
    /// The file offset of a fd-backed mapping is not a multiple of [`PAGE_SIZE`](crate::PAGE_SIZE).
    /// EINVAL, as `mmap` itself would say.
    #[error("File offset {offset:#x} of mapping {range} is not page-aligned")]
    UnalignedOffset {
        /// The range that was to be mapped.
        range: IovaRange,
        /// The offending file offset.
        offset: u64,
    },
    /// A fd-backed mapping of a regular file reaches past the end of the file. EINVAL.
    ///
    /// Refused up front because touching such a page would kill the server with SIGBUS.
    #[error("Mapping {range} at file offset {offset:#x} reaches past the end of the file ({file_size:#x} bytes)")]
    PastEndOfFile {
        /// The range that was to be mapped.
        range: IovaRange,
        /// File offset of the mapping.
        offset: u64,
        /// Size of the file when the mapping was asked for.
        file_size: u64,
    },
    /// The range overlaps a mapping that already exists. EEXIST, as the vfio-user spec and
    /// the kernel's type1 backend say.
    #[error("Mapping {range} overlaps existing mapping {existing}")]
    Overlap {
        /// The range that was to be mapped.
        range: IovaRange,
        /// One existing mapping it overlaps.
        existing: IovaRange,
    },
    /// The table already holds its maximum number of mappings. ENOSPC.
    #[error("Too many DMA mappings (limit {max})")]
    TooManyMappings {
        /// The limit from [`DmaLimits`](crate::DmaLimits).
        max: usize,
    },
    /// An unmap named a range that is not exactly one existing mapping. ENOENT.
    #[error("No mapping is exactly {range}")]
    NotMapped {
        /// The range asked for.
        range: IovaRange,
    },
    /// A copy touched an address that no mapping covers. EFAULT: the device asked for a bad
    /// address, like an IOMMU fault.
    #[error("DMA access to unmapped IOVA {iova:#x}")]
    Fault {
        /// First unmapped address the access touched.
        iova: u64,
    },
    /// A copy lacked the permission of the mapping it touched (a read of a write-only or a
    /// write of a read-only mapping). EPERM, as the kernel's `vfio_dma_rw` says.
    #[error("DMA access at IOVA {iova:#x} needs {needed:?}, the mapping has {has:?}")]
    PermissionDenied {
        /// First address whose mapping lacks the permission.
        iova: u64,
        /// Permission the access needed.
        needed: Prot,
        /// Permission the mapping has.
        has: Prot,
    },
    /// A copy reached a fd-less mapping but no [`RemoteDma`](crate::RemoteDma) is set. EFAULT.
    #[error("DMA access at IOVA {iova:#x} needs message-based access, but none is set")]
    NoRemote {
        /// First address of the fd-less mapping the access reached.
        iova: u64,
    },
    /// The [`RemoteDma`](crate::RemoteDma) reports a maximum transfer of 0 bytes. EINVAL.
    #[error("Message-based DMA has a maximum transfer size of 0")]
    ZeroMaxTransfer,
    /// A message-based access failed; `errno` is what the peer (or the transport) said.
    #[error("Message-based DMA of {len:#x} bytes at IOVA {iova:#x} failed")]
    Remote {
        /// First address of the failed transfer.
        iova: u64,
        /// Length of the failed transfer.
        len: u64,
        /// Why it failed.
        #[source]
        errno: Errno,
    },
    /// `mmap` of a fd-backed mapping failed; carries its errno.
    #[error("Cannot mmap {range} at file offset {offset:#x}")]
    Mmap {
        /// The range that was to be mapped.
        range: IovaRange,
        /// File offset of the mapping.
        offset: u64,
        /// What `mmap` said.
        #[source]
        errno: Errno,
    },
    /// A pin or unpin named more pages than [`MAX_PIN_PAGES`](crate::MAX_PIN_PAGES). E2BIG, as
    /// the kernel's `vfio_pin_pages` says.
    #[error("{npages} pages in one call, at most {max}")]
    TooManyPages {
        /// Pages asked for.
        npages: usize,
        /// The limit.
        max: usize,
    },
    /// A pin cannot be made (the reason says why). EINVAL.
    #[error("Cannot pin at IOVA {iova:#x}: {reason}")]
    PinInvalid {
        /// First IOVA of the call.
        iova: u64,
        /// Why.
        reason: &'static str,
    },
    /// An unpin named a page this device has not pinned. EINVAL; nothing was unpinned.
    #[error("IOVA page {iova:#x} is not pinned by this device")]
    NotPinned {
        /// The first such page.
        iova: u64,
    },
    /// The pin would take the client past its locked-memory budget. ENOMEM, as
    /// `RLIMIT_MEMLOCK` in the kernel.
    #[error("Pinning {pages} more pages exceeds the locked-memory budget ({charged} of {limit} pages charged)")]
    OverBudget {
        /// Pages the call would charge.
        pages: u64,
        /// Pages already charged.
        charged: u64,
        /// The budget in pages.
        limit: u64,
    },
    /// The device kept pins past an unmap's deadline and was revoked: it is in an error
    /// state and can neither pin nor use its handles. EIO.
    #[error("Pinning access at IOVA {iova:#x} was revoked")]
    Revoked {
        /// Where the access or call was.
        iova: u64,
    },
    /// A translation or pinned access needs host memory, but the mapping has none (fd-less).
    /// EINVAL.
    #[error("IOVA {iova:#x} is in a message-backed mapping: no host memory")]
    NoHostMemory {
        /// The address.
        iova: u64,
    },
    /// Dirty logging was started while already on. EBUSY.
    #[error("Dirty page logging is already started")]
    LoggingActive,
    /// A dirty report was asked for while logging is off. EINVAL.
    #[error("Dirty page logging is not started")]
    LoggingInactive,
    /// A dirty report or logging start was malformed. EINVAL.
    #[error("Bad dirty bitmap request: {0}")]
    BadBitmap(&'static str),
    /// The client's memory behind the access is gone (it shrank its file, or a memory
    /// error): a SIGBUS was caught (`umdev_sys::sigbus`), and every later access to the same
    /// mmap fails too. EFAULT, as an IOMMU fault.
    #[error("DMA access at IOVA {iova:#x} reached memory the client took away")]
    Poisoned {
        /// Where the access was.
        iova: u64,
    },
    /// `fstat` of a mapping's fd failed; carries its errno.
    #[error("Cannot stat the file of mapping {range}")]
    Stat {
        /// The range that was to be mapped.
        range: IovaRange,
        /// What `fstat` said.
        #[source]
        errno: Errno,
    },
}

impl DmaError {
    /// The positive errno that answers the request that failed.
    pub fn errno(&self) -> i32 {
        self.as_errno().raw_os_error()
    }

    /// The errno as a typed [`Errno`].
    pub fn as_errno(&self) -> Errno {
        match self {
            DmaError::InvalidRange { .. }
            | DmaError::EmptyProt { .. }
            | DmaError::UnalignedOffset { .. }
            | DmaError::PastEndOfFile { .. }
            | DmaError::ZeroMaxTransfer
            | DmaError::PinInvalid { .. }
            | DmaError::NotPinned { .. }
            | DmaError::NoHostMemory { .. }
            | DmaError::LoggingInactive
            | DmaError::BadBitmap(_) => Errno::INVAL,
            DmaError::TooManyPages { .. } => Errno::TOOBIG,
            DmaError::OverBudget { .. } => Errno::NOMEM,
            DmaError::Revoked { .. } => Errno::IO,
            DmaError::LoggingActive => Errno::BUSY,
            DmaError::Overlap { .. } => Errno::EXIST,
            DmaError::TooManyMappings { .. } => Errno::NOSPC,
            DmaError::NotMapped { .. } => Errno::NOENT,
            DmaError::Fault { .. } | DmaError::NoRemote { .. } | DmaError::Poisoned { .. } => {
                Errno::FAULT
            }
            DmaError::PermissionDenied { .. } => Errno::PERM,
            DmaError::Remote { errno, .. }
            | DmaError::Mmap { errno, .. }
            | DmaError::Stat { errno, .. } => *errno,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;

    fn range() -> IovaRange {
        IovaRange::new(0x1000, 0x1000).unwrap()
    }

    #[test]
    fn errnos_are_positive() {
        let errors = [
            DmaError::InvalidRange { start: 0, len: 0 },
            DmaError::Overlap {
                range: range(),
                existing: range(),
            },
            DmaError::TooManyMappings { max: 1 },
            DmaError::NotMapped { range: range() },
            DmaError::Fault { iova: 0 },
            DmaError::ZeroMaxTransfer,
        ];
        for e in errors {
            assert!(e.errno() > 0, "{e}");
        }
    }

    #[test]
    fn overlap_is_eexist() {
        let e = DmaError::Overlap {
            range: range(),
            existing: range(),
        };
        assert_eq!(e.as_errno(), Errno::EXIST);
    }

    #[test]
    fn remote_error_keeps_the_peer_errno() {
        let e = DmaError::Remote {
            iova: 0,
            len: 1,
            errno: Errno::IO,
        };
        assert_eq!(e.errno(), Errno::IO.raw_os_error());
    }

    #[test]
    fn source_is_not_repeated_in_the_message() {
        let e = DmaError::Mmap {
            range: range(),
            offset: 0,
            errno: Errno::NOMEM,
        };
        assert!(!e.to_string().contains(&Errno::NOMEM.to_string()));
        assert!(std::error::Error::source(&e).is_some());
    }
}
