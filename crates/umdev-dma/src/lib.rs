//! The DMA address space of one client of a device server.
//!
//! A client (a VMM) tells the server which of its memory a device may reach: ranges of I/O
//! virtual addresses (IOVAs), each with read/write permissions, backed either by a file the
//! server can mmap (guest memory shared as a memfd) or by nothing, in which case every access
//! is a message to the client. [`AddressSpace`] is that table for one client, and implements
//! [`Dma`], the bounds- and permission-checked copies device models use.
//!
//! This crate knows nothing of any wire protocol: the server fills the table from the
//! client's requests and provides a [`RemoteDma`] for fd-less mappings. On the same table
//! it is the IOMMU layer for parent drivers: [`Pinner`] pins pages and hands out checked
//! handles to them, charged to the client's locked-memory budget ([`ClientMemory`]);
//! unmapping a pinned range follows the protocol of [`Unmapping`] (the device is told, its
//! pins are waited for, then revoked); writes are logged for dirty page reporting
//! ([`AddressSpace::start_dirty_logging`], [`AddressSpace::dirty_report`]).
//!
//! # Lifecycle
//!
//! ```
//! use std::os::unix::fs::FileExt;
//! use umdev_dma::{AddressSpace, Backing, Dma, DmaLimits, IovaRange, Prot, PAGE_SIZE};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The client's guest memory: 4 pages of a memfd.
//! let memfd = rustix::fs::memfd_create("guest-ram", rustix::fs::MemfdFlags::CLOEXEC)?;
//! rustix::fs::ftruncate(&memfd, 4 * PAGE_SIZE)?;
//! let guest = std::fs::File::from(memfd.try_clone()?);
//!
//! // DMA_MAP: IOVA 0x10000.. is the file from offset 0.
//! let space = AddressSpace::new(DmaLimits::default());
//! let range = IovaRange::new(0x10000, 4 * PAGE_SIZE)?;
//! space.map(range, Prot::READ_WRITE, Backing::Fd { fd: memfd, offset: 0 })?;
//!
//! // A device writes a descriptor and reads it back; the client sees it in its memory.
//! space.write(0x10100, b"hello")?;
//! let mut buf = [0u8; 5];
//! space.read(0x10100, &mut buf)?;
//! assert_eq!(&buf, b"hello");
//! let mut seen = [0u8; 5];
//! guest.read_exact_at(&mut seen, 0x100)?;
//! assert_eq!(&seen, b"hello");
//!
//! // An address outside every mapping faults.
//! assert_eq!(space.read(0x0, &mut buf).unwrap_err().errno(), rustix::io::Errno::FAULT.raw_os_error());
//!
//! // DMA_UNMAP: exactly the range that was mapped.
//! space.unmap(range)?;
//! assert!(space.is_empty());
//! # Ok(())
//! # }
//! ```

mod client;
mod copy;
mod counts;
mod dirty;
mod error;
mod gate;
mod index;
mod mapping;
mod pin;
mod range;
mod space;
#[cfg(test)]
mod testutil;
mod translate;
mod unmap;

// Page indexes, mmap offsets and guest-memory sizes are handled as usize = u64.
const _: () = assert!(usize::BITS == 64, "umdev targets 64-bit Linux only");

pub use client::{memlock_rlimit, ClientMemory, SharedBudget};
pub use dirty::{dirty_bitmap_size, DIRTY_PAGE_SIZE};
pub use error::DmaError;
pub use mapping::Backing;
pub use pin::{HostPage, PinnedPages, Pinner, PinnerId, MAX_PIN_PAGES};
pub use range::{IovaRange, Prot, PAGE_SIZE};
pub use space::{AddressSpace, DmaLimits, DmaTraffic, MappingInfo};
pub use translate::Translation;
pub use unmap::{UnmapNotice, UnmapOutcome, Unmapping};

/// Message-based access for mappings that came without an fd (the server implements it by
/// sending DMA_READ/DMA_WRITE to the client).
///
/// The address space calls it without holding any lock of its own, so an implementation
/// may block until the client answers.
pub trait RemoteDma: Send + Sync {
    /// Reads `buf.len()` bytes of client memory at `iova` (at most [`max_transfer`](Self::max_transfer)).
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Writes `data` to client memory at `iova` (at most [`max_transfer`](Self::max_transfer) bytes).
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;
    /// Largest transfer one message may carry; the address space splits longer accesses into
    /// chunks of at most this size. Must not be 0.
    fn max_transfer(&self) -> usize;
}

/// What a device model uses: copies to/from client memory that need no pinning.
///
/// An access may span several adjacent mappings; every byte must be mapped with the
/// permission the access needs, and the whole access is checked before any byte is copied.
/// A zero-length access succeeds.
pub trait Dma: Send + Sync {
    /// Reads `buf.len()` bytes of client memory at `iova`.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Writes `data` to client memory at `iova`.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError>;
}
