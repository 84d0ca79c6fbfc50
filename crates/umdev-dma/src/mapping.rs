//! One entry of the mapping table: its range, permissions and backing memory, plus the state
//! the IOMMU layer keeps per mapping (the access gate, pin counts, dirty bits).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use vm_memory::VolatileMemory;

use crate::client::{ClientMemory, MmapSlice};
use crate::counts::PageCounts;
use crate::dirty::DirtyBits;
use crate::error::DmaError;
use crate::gate::Gate;
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
    /// A part of a shared mmap of the client's file.
    Mmap(MmapSlice),
    /// Reached through messages to the client.
    Remote,
}

/// The pins of one device (a [`Pinner`](crate::Pinner)) in one mapping, per page of the
/// mapping.
#[derive(Debug)]
pub(crate) struct HolderPins {
    pub(crate) holder: u64,
    /// Pin references per page.
    pub(crate) counts: PageCounts,
    /// How many of those references asked for write access (never above `counts`).
    pub(crate) writable: PageCounts,
}

#[derive(Debug, Default)]
pub(crate) struct MappingPins {
    /// Set when an unmap has begun: no new pin may start.
    pub(crate) unmapping: bool,
    pub(crate) holders: Vec<HolderPins>,
}

impl MappingPins {
    /// Pages pinned by anyone (a page pinned by two devices counts twice).
    pub(crate) fn pinned_pages(&self) -> u64 {
        self.holders.iter().map(|h| h.counts.nonzero()).sum()
    }

    pub(crate) fn holder_mut(&mut self, holder: u64) -> &mut HolderPins {
        let i = match self.holders.iter().position(|h| h.holder == holder) {
            Some(i) => i,
            None => {
                self.holders.push(HolderPins {
                    holder,
                    counts: PageCounts::default(),
                    writable: PageCounts::default(),
                });
                self.holders.len() - 1
            }
        };
        &mut self.holders[i]
    }

    pub(crate) fn holder(&self, holder: u64) -> Option<&HolderPins> {
        self.holders.iter().find(|h| h.holder == holder)
    }

    /// Forgets holders that pin nothing any more.
    pub(crate) fn prune(&mut self) {
        self.holders.retain(|h| h.counts.nonzero() > 0);
    }
}

/// One entry of the table.
#[derive(Debug)]
pub(crate) struct Mapping {
    /// Unique for the life of the process: tells a mapping from a later one of the same
    /// range (see `index`).
    pub(crate) id: u64,
    pub(crate) range: IovaRange,
    pub(crate) prot: Prot,
    pub(crate) memory: Memory,
    /// Accesses in flight; closed by unmap.
    pub(crate) gate: Gate,
    pub(crate) pins: Mutex<MappingPins>,
    /// Signalled when the last pin of a mapping being unmapped is released.
    pub(crate) released: Condvar,
    pub(crate) dirty: DirtyBits,
}

impl Mapping {
    /// Checks the backing and, for a fd, finds or makes its mmap. Nothing is shared with the
    /// table yet, so the caller runs this without holding the table lock.
    pub(crate) fn new(
        range: IovaRange,
        prot: Prot,
        backing: Backing,
        client: &ClientMemory,
    ) -> Result<Self, DmaError> {
        if prot.is_empty() {
            return Err(DmaError::EmptyProt { range });
        }
        let memory = match backing {
            Backing::Remote => Memory::Remote,
            Backing::Fd { fd, offset } => Memory::Mmap(client.mmap(range, prot, fd, offset)?),
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Ok(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            range,
            prot,
            memory,
            gate: Gate::default(),
            pins: Mutex::new(MappingPins::default()),
            released: Condvar::new(),
            dirty: DirtyBits::default(),
        })
    }

    /// Whether the mapping is backed by an mmapped fd.
    pub(crate) fn fd_backed(&self) -> bool {
        matches!(self.memory, Memory::Mmap(_))
    }

    /// What the client gave for this mapping, again: a duplicate of its file and the file
    /// offset of the mapping's first byte (`Backing::Remote` for a fd-less one).
    pub(crate) fn backing(&self) -> std::io::Result<Backing> {
        let Memory::Mmap(s) = &self.memory else {
            return Ok(Backing::Remote);
        };
        let file = s
            .shared
            .region
            .file_offset()
            .ok_or_else(|| std::io::Error::other("a shared mmap without its file"))?
            .file()
            .try_clone()?;
        Ok(Backing::Fd {
            fd: OwnedFd::from(file),
            offset: s.shared.file_start + s.offset as u64,
        })
    }

    pub(crate) fn pins(&self) -> MutexGuard<'_, MappingPins> {
        // Pin bookkeeping is completed before the lock is released.
        self.pins.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// IOVA page frame of the mapping's first byte.
    pub(crate) fn first_frame(&self) -> u64 {
        self.range.start() / PAGE_SIZE
    }

    /// Number of page frames the mapping touches (partial pages included).
    pub(crate) fn frames(&self) -> u64 {
        (self.range.end() - 1) / PAGE_SIZE - self.first_frame() + 1
    }

    /// Copies `buf.len()` bytes at `iova` (inside the mapping) out of its mmap. The caller
    /// has entered the gate.
    pub(crate) fn read_at(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let Memory::Mmap(s) = &self.memory else {
            return Err(DmaError::NoHostMemory { iova });
        };
        let slice = s
            .shared
            .region
            .get_slice(self.host_offset(s, iova)?, buf.len())
            .map_err(|_| DmaError::Fault { iova })?;
        s.check_poison(iova)?;
        // `copy_to` is a `copy_nonoverlapping` (memcpy) for anything longer than a word and
        // volatile word accesses below that: memcpy speed without a `&[u8]` over guest memory.
        if slice.copy_to(buf) != buf.len() {
            return Err(DmaError::Fault { iova });
        }
        // A SIGBUS during the copy gave zeroes: not the client's data.
        s.check_poison(iova)
    }

    /// Copies `data` into the mmap at `iova` (inside the mapping). The caller has entered
    /// the gate.
    pub(crate) fn write_at(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let Memory::Mmap(s) = &self.memory else {
            return Err(DmaError::NoHostMemory { iova });
        };
        let slice = s
            .shared
            .region
            .get_slice(self.host_offset(s, iova)?, data.len())
            .map_err(|_| DmaError::Fault { iova })?;
        s.check_poison(iova)?;
        // `get_slice` returned exactly `data.len()` bytes, so `copy_from` copies all of them.
        slice.copy_from(data);
        // A SIGBUS during the copy sent the bytes to a page that is not the client's.
        s.check_poison(iova)
    }

    /// Byte offset of `iova` in the shared mmap.
    fn host_offset(&self, s: &MmapSlice, iova: u64) -> Result<usize, DmaError> {
        iova.checked_sub(self.range.start())
            .and_then(|d| usize::try_from(d).ok())
            .and_then(|d| d.checked_add(s.offset))
            .ok_or(DmaError::Fault { iova })
    }

    /// Host address of `iova`, for diagnostics (never dereferenced here).
    pub(crate) fn host_addr(&self, iova: u64) -> Option<usize> {
        let Memory::Mmap(s) = &self.memory else {
            return None;
        };
        let off = self.host_offset(s, iova).ok()?;
        Some((s.shared.region.as_ptr() as usize).wrapping_add(off))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};
    use rustix::io::Errno;
    use std::fs::File;

    fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create("umdev-dma-mapping-test", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        fd
    }

    fn client() -> std::sync::Arc<ClientMemory> {
        ClientMemory::new(0, false)
    }

    fn range(start: u64, len: u64) -> IovaRange {
        IovaRange::new(start, len).unwrap()
    }

    #[test]
    fn empty_prot_is_einval() {
        let err = Mapping::new(range(0, 4096), Prot::NONE, Backing::Remote, &client()).unwrap_err();
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn unaligned_file_offset_is_einval() {
        let backing = Backing::Fd {
            fd: memfd(3 * PAGE_SIZE),
            offset: 100,
        };
        let err = Mapping::new(range(0, 4096), Prot::READ, backing, &client()).unwrap_err();
        assert!(matches!(err, DmaError::UnalignedOffset { .. }), "{err:?}");
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn mapping_past_end_of_file_is_einval() {
        let backing = Backing::Fd {
            fd: memfd(PAGE_SIZE),
            offset: PAGE_SIZE,
        };
        let err = Mapping::new(range(0, 4096), Prot::READ, backing, &client()).unwrap_err();
        assert!(matches!(err, DmaError::PastEndOfFile { .. }), "{err:?}");
    }

    #[test]
    fn offset_beyond_off_t_is_einval() {
        let backing = Backing::Fd {
            fd: memfd(PAGE_SIZE),
            offset: 1 << 63,
        };
        let err = Mapping::new(range(0, 4096), Prot::READ, backing, &client()).unwrap_err();
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
            &client(),
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
            &client(),
        )
        .unwrap();
        assert!(m.fd_backed());
    }
}
