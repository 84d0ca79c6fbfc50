//! One entry of the mapping table: its range, permissions and backing memory.
//!
//! This is the per-mapping state a later IOMMU layer extends (pin counts, dirty bitmaps,
//! the fd identity used to share one mmap between mappings of the same file).

use std::fs::File;
use std::os::fd::OwnedFd;

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

use crate::error::DmaError;
use crate::range::{IovaRange, Prot, PAGE_SIZE};

/// Where the bytes of a new mapping live.
#[derive(Debug)]
pub enum Backing {
    /// A file (usually the VMM's guest-memory memfd) that is mmapped into the server.
    Fd {
        /// The file; the address space owns it until the mapping is removed.
        fd: OwnedFd,
        /// Offset in the file of the mapping's first byte; a multiple of [`PAGE_SIZE`].
        offset: u64,
    },
    /// No fd: copies go through the [`RemoteDma`](crate::RemoteDma) of the address space.
    Remote,
}

/// The memory behind one mapping, once mapped.
#[derive(Debug)]
pub(crate) enum Memory {
    /// A shared mmap of the client's file. Dropping it munmaps and closes the fd.
    Mmap(MmapRegion),
    /// Reached through messages to the client.
    Remote,
}

/// One entry of the table.
#[derive(Debug)]
pub(crate) struct Mapping {
    pub(crate) range: IovaRange,
    pub(crate) prot: Prot,
    pub(crate) memory: Memory,
}

impl Mapping {
    /// Checks the backing and, for a fd, mmaps it. Nothing is shared with the table yet, so
    /// the caller runs this without holding the table lock.
    pub(crate) fn new(range: IovaRange, prot: Prot, backing: Backing) -> Result<Self, DmaError> {
        if prot.is_empty() {
            return Err(DmaError::EmptyProt { range });
        }
        let memory = match backing {
            Backing::Remote => Memory::Remote,
            Backing::Fd { fd, offset } => Memory::Mmap(mmap_fd(range, prot, fd, offset)?),
        };
        Ok(Self {
            range,
            prot,
            memory,
        })
    }

    /// Whether the mapping is backed by an mmapped fd.
    pub(crate) fn fd_backed(&self) -> bool {
        matches!(self.memory, Memory::Mmap(_))
    }
}

fn mmap_fd(range: IovaRange, prot: Prot, fd: OwnedFd, offset: u64) -> Result<MmapRegion, DmaError> {
    if offset % PAGE_SIZE != 0 {
        return Err(DmaError::UnalignedOffset { range, offset });
    }
    // The kernel takes the offset as a signed off_t; refuse what it would misread.
    let file_end = offset
        .checked_add(range.len())
        .filter(|end| i64::try_from(*end).is_ok())
        .ok_or(DmaError::InvalidRange {
            start: offset,
            len: range.len(),
        })?;
    let size = usize::try_from(range.len()).map_err(|_| DmaError::Mmap {
        range,
        offset,
        errno: Errno::NOMEM,
    })?;

    // A page past the end of a regular file raises SIGBUS when touched, which would take the
    // whole server down; refuse such a mapping now. (A client that shrinks the file later can
    // still do it: guest memory should be sealed against shrinking, F_SEAL_SHRINK.)
    let stat = rustix::fs::fstat(&fd).map_err(|errno| DmaError::Stat { range, errno })?;
    if FileType::from_raw_mode(stat.st_mode).is_file() {
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        if file_end > file_size {
            return Err(DmaError::PastEndOfFile {
                range,
                offset,
                file_size,
            });
        }
    }

    let mut mmap_prot = ProtFlags::READ;
    if prot.contains(Prot::WRITE) {
        mmap_prot |= ProtFlags::WRITE;
    }
    let bits = |b: u32| {
        i32::try_from(b).map_err(|_| DmaError::Mmap {
            range,
            offset,
            errno: Errno::INVAL,
        })
    };
    let file_offset = FileOffset::new(File::from(fd), offset);
    MmapRegion::build(
        Some(file_offset),
        size,
        bits(mmap_prot.bits())?,
        bits(MapFlags::SHARED.bits())?,
    )
    .map_err(|e| DmaError::Mmap {
        range,
        offset,
        errno: mmap_errno(&e),
    })
}

fn mmap_errno(e: &MmapRegionError) -> Errno {
    match e {
        MmapRegionError::Mmap(io) => io
            .raw_os_error()
            .map(Errno::from_raw_os_error)
            .unwrap_or(Errno::INVAL),
        _ => Errno::INVAL,
    }
}

/// Copies `buf.len()` bytes of an mmapped mapping, from byte `offset` of the mapping, into
/// `buf`. The caller has checked the bounds; they are checked again by vm-memory.
pub(crate) fn read_mmap(
    region: &MmapRegion,
    offset: usize,
    buf: &mut [u8],
    iova: u64,
) -> Result<(), DmaError> {
    let slice = region
        .get_slice(offset, buf.len())
        .map_err(|_| DmaError::Fault { iova })?;
    // `copy_to` is a `copy_nonoverlapping` (memcpy) for anything longer than a word and
    // volatile word accesses below that: memcpy speed without a `&[u8]` over guest memory.
    let copied = slice.copy_to(buf);
    if copied != buf.len() {
        return Err(DmaError::Fault { iova });
    }
    Ok(())
}

/// Copies `data` into an mmapped mapping at byte `offset` of the mapping.
pub(crate) fn write_mmap(
    region: &MmapRegion,
    offset: usize,
    data: &[u8],
    iova: u64,
) -> Result<(), DmaError> {
    let slice = region
        .get_slice(offset, data.len())
        .map_err(|_| DmaError::Fault { iova })?;
    // `get_slice` returned exactly `data.len()` bytes, so `copy_from` copies all of them.
    slice.copy_from(data);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};

    fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create("umdev-dma-mapping-test", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        fd
    }

    fn range(start: u64, len: u64) -> IovaRange {
        IovaRange::new(start, len).unwrap()
    }

    #[test]
    fn empty_prot_is_einval() {
        let err = Mapping::new(range(0, 4096), Prot::NONE, Backing::Remote).unwrap_err();
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn unaligned_file_offset_is_einval() {
        let backing = Backing::Fd {
            fd: memfd(3 * PAGE_SIZE),
            offset: 100,
        };
        let err = Mapping::new(range(0, 4096), Prot::READ, backing).unwrap_err();
        assert!(matches!(err, DmaError::UnalignedOffset { .. }), "{err:?}");
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn mapping_past_end_of_file_is_einval() {
        let backing = Backing::Fd {
            fd: memfd(PAGE_SIZE),
            offset: PAGE_SIZE,
        };
        let err = Mapping::new(range(0, 4096), Prot::READ, backing).unwrap_err();
        assert!(matches!(err, DmaError::PastEndOfFile { .. }), "{err:?}");
    }

    #[test]
    fn offset_beyond_off_t_is_einval() {
        let backing = Backing::Fd {
            fd: memfd(PAGE_SIZE),
            offset: 1 << 63,
        };
        let err = Mapping::new(range(0, 4096), Prot::READ, backing).unwrap_err();
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn writable_mapping_of_read_only_fd_fails_with_mmap_errno() {
        let fd = memfd(PAGE_SIZE);
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        let ro: OwnedFd = File::open(path).unwrap().into();
        let err = Mapping::new(
            range(0, 4096),
            Prot::READ_WRITE,
            Backing::Fd { fd: ro, offset: 0 },
        )
        .unwrap_err();
        assert!(matches!(err, DmaError::Mmap { .. }), "{err:?}");
        assert_eq!(err.as_errno(), Errno::ACCESS);
    }

    #[test]
    fn read_only_fd_maps_read_only() {
        let fd = memfd(PAGE_SIZE);
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        let ro: OwnedFd = File::open(path).unwrap().into();
        let m = Mapping::new(
            range(0, 4096),
            Prot::READ,
            Backing::Fd { fd: ro, offset: 0 },
        )
        .unwrap();
        assert!(m.fd_backed());
    }
}
