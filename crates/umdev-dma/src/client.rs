//! What one client lends the server as a whole: its files' mmaps, shared by all its address
//! spaces, and the locked-memory budget its pins are charged to.
//!
//! # Mmaps are shared
//!
//! A VMM hands the same guest-memory memfd with every DMA_MAP (with a vIOMMU, thousands of
//! small maps of one file). One mmap and one open fd per map would hit the kernel's
//! `vm.max_map_count` (65,530) and the fd limit long before 65,535 mappings, so the mmap of a
//! file is shared: keyed by `(st_dev, st_ino)`, a regular file is mmapped once as a whole
//! (a range of it for other kinds of file), refcounted by the mappings that use it, and
//! munmapped (its fd closed) when the last one goes. The fds of later maps of the same file
//! are closed at once.
//!
//! # Accounting
//!
//! A pinned page is charged to the client once, however many devices or mappings pin it:
//! the count is kept per page of the shared mmap (the host page), and the budget is charged
//! when that count leaves 0 and credited when it returns to 0. The budget defaults to the
//! daemon's `RLIMIT_MEMLOCK`, like the kernel's type1 backend charging `locked_vm`.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use rustix::fs::FileType;
use rustix::io::Errno;
use rustix::mm::{MapFlags, ProtFlags};
use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion};

use crate::counts::PageCounts;
use crate::error::DmaError;
use crate::range::{IovaRange, Prot, PAGE_SIZE};

/// Identity of a file: `(st_dev, st_ino)`.
pub(crate) type FileKey = (u64, u64);

/// One mmap of (part of) a client's file, shared by the mappings that reach into it.
#[derive(Debug)]
pub(crate) struct SharedMmap {
    /// Unique within the client, for logs.
    pub(crate) id: u64,
    /// The file: keys the host-page pin counts, so that a file page reached through two
    /// mmaps of the file is still one page.
    pub(crate) key: FileKey,
    /// File offset of the first byte of the mmap.
    pub(crate) file_start: u64,
    pub(crate) len: u64,
    pub(crate) writable: bool,
    pub(crate) region: MmapRegion,
    /// SIGBUS in `region` (the client shrank its file, a memory error) poisons this
    /// instead of killing the process: accesses check it (see `umdev_sys::sigbus`).
    pub(crate) guard: umdev_sys::sigbus::Guard,
    live: Arc<AtomicUsize>,
}

impl Drop for SharedMmap {
    fn drop(&mut self) {
        // `region` munmaps and closes its fd right after this.
        self.live.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(id = self.id, len = self.len, "shared mmap released");
    }
}

impl MmapSlice {
    /// EFAULT (`Poisoned`) once an access in the shared mmap took a SIGBUS.
    pub(crate) fn check_poison(&self, iova: u64) -> Result<(), DmaError> {
        if self.shared.guard.poisoned() {
            return Err(DmaError::Poisoned { iova });
        }
        Ok(())
    }
}

/// Where a mapping's bytes are inside a shared mmap.
#[derive(Debug, Clone)]
pub(crate) struct MmapSlice {
    pub(crate) shared: Arc<SharedMmap>,
    /// Byte offset of the mapping's first byte within the mmap.
    pub(crate) offset: usize,
}

#[derive(Default)]
pub(crate) struct Charges {
    /// Pages charged to the budget (by this process).
    pub(crate) charged: u64,
    /// Pin counts per page of each file (by file page), across all devices and mmaps.
    pub(crate) host: HashMap<FileKey, PageCounts>,
    /// The budget's share beyond this process, if the client's pins elsewhere count too.
    shared: Option<Arc<dyn SharedBudget>>,
}

impl std::fmt::Debug for Charges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Charges")
            .field("charged", &self.charged)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl Charges {
    /// `pages` pinned pages fewer (the budget beyond this process is told too).
    pub(crate) fn credit(&mut self, pages: u64) {
        let pages = pages.min(self.charged);
        self.charged -= pages;
        if let (Some(s), true) = (&self.shared, pages > 0) {
            s.credit(pages);
        }
    }
}

/// A client's budget as several processes share it (worker processes serving the same
/// client in different IOMMU groups): every charge is asked of it, every credit told.
pub trait SharedBudget: Send + Sync {
    /// `pages` more; refused with the pages charged in all when that would pass
    /// `limit_pages`.
    fn charge(&self, pages: u64, limit_pages: u64) -> Result<(), u64>;
    /// `pages` fewer.
    fn credit(&self, pages: u64);
}

/// The memory one client lends to the server: shared mmaps and the locked-memory budget.
///
/// Create one per client and give it to each of that client's address spaces
/// ([`AddressSpace::with_client`](crate::AddressSpace::with_client)), so that a page pinned
/// through several of them is charged once and a file mapped many times is mmapped once.
pub struct ClientMemory {
    limit_pages: u64,
    lock_pages: bool,
    charges: Mutex<Charges>,
    mmaps: Mutex<HashMap<FileKey, Vec<Weak<SharedMmap>>>>,
    live: Arc<AtomicUsize>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ClientMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientMemory")
            .field("limit_pages", &self.limit_pages)
            .field("locked_pages", &self.locked_pages())
            .field("mmaps", &self.mmap_count())
            .finish_non_exhaustive()
    }
}

/// The daemon's `RLIMIT_MEMLOCK` (soft limit) in bytes; `u64::MAX` when unlimited.
pub fn memlock_rlimit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Memlock)
        .current
        .unwrap_or(u64::MAX)
}

impl ClientMemory {
    /// A client whose pins may lock at most `limit_bytes` (rounded down to whole pages).
    ///
    /// With `lock_pages`, pinned pages are also locked in memory (`mlock`) while pinned;
    /// otherwise pinning is accounting only (the memory of a memfd stays where it is while
    /// mapped, but may be swapped).
    pub fn new(limit_bytes: u64, lock_pages: bool) -> Arc<ClientMemory> {
        Arc::new(ClientMemory {
            limit_pages: limit_bytes / PAGE_SIZE,
            lock_pages,
            charges: Mutex::new(Charges::default()),
            mmaps: Mutex::new(HashMap::new()),
            live: Arc::new(AtomicUsize::new(0)),
            next_id: AtomicU64::new(0),
        })
    }

    /// A client with the daemon's `RLIMIT_MEMLOCK` as its budget, pages not locked.
    pub fn with_rlimit() -> Arc<ClientMemory> {
        ClientMemory::new(memlock_rlimit(), false)
    }

    /// A client whose budget is shared beyond this process: `shared` is asked for every
    /// charge and told of every credit.
    pub fn with_shared_budget(
        limit_bytes: u64,
        lock_pages: bool,
        shared: Arc<dyn SharedBudget>,
    ) -> Arc<ClientMemory> {
        let m = ClientMemory::new(limit_bytes, lock_pages);
        m.charges().shared = Some(shared);
        m
    }

    /// The budget in bytes (whole pages).
    pub fn limit(&self) -> u64 {
        self.limit_pages.saturating_mul(PAGE_SIZE)
    }

    /// Bytes currently charged for pinned pages.
    pub fn locked_bytes(&self) -> u64 {
        self.locked_pages().saturating_mul(PAGE_SIZE)
    }

    fn locked_pages(&self) -> u64 {
        self.charges().charged
    }

    /// Number of live mmaps (each one open fd).
    pub fn mmap_count(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub(crate) fn lock_pages(&self) -> bool {
        self.lock_pages
    }

    pub(crate) fn charges(&self) -> MutexGuard<'_, Charges> {
        // Every change to the charges is completed before the lock is released.
        self.charges.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Charges `pages` more pages, or refuses with ENOMEM (logged) past the budget (the
    /// whole client's, with a shared budget).
    pub(crate) fn charge(&self, c: &mut Charges, pages: u64) -> Result<(), DmaError> {
        if let Some(shared) = &c.shared {
            if let Err(all) = shared.charge(pages, self.limit_pages) {
                tracing::warn!(
                    pages,
                    charged = all,
                    limit = self.limit_pages,
                    "pin refused: the client's locked-memory budget (shared by its workers) exceeded"
                );
                return Err(DmaError::OverBudget {
                    pages,
                    charged: all,
                    limit: self.limit_pages,
                });
            }
            c.charged = c.charged.saturating_add(pages);
            return Ok(());
        }
        let total = c.charged.saturating_add(pages);
        if total > self.limit_pages {
            tracing::warn!(
                pages,
                charged = c.charged,
                limit = self.limit_pages,
                "pin refused: locked-memory budget (RLIMIT_MEMLOCK) exceeded"
            );
            return Err(DmaError::OverBudget {
                pages,
                charged: c.charged,
                limit: self.limit_pages,
            });
        }
        c.charged = total;
        Ok(())
    }

    /// The mmap that holds `len` bytes of `fd` from `offset`, shared if one exists.
    pub(crate) fn mmap(
        &self,
        range: IovaRange,
        prot: Prot,
        fd: OwnedFd,
        offset: u64,
    ) -> Result<MmapSlice, DmaError> {
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
        let stat = rustix::fs::fstat(&fd).map_err(|errno| DmaError::Stat { range, errno })?;
        let regular = FileType::from_raw_mode(stat.st_mode).is_file();
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        // A page past the end of a regular file raises SIGBUS when touched, which would take
        // the whole server down; refuse such a mapping now. (A client that shrinks the file
        // later can still do it: guest memory should be sealed against shrinking.)
        if regular && file_end > file_size {
            return Err(DmaError::PastEndOfFile {
                range,
                offset,
                file_size,
            });
        }
        let writable = prot.contains(Prot::WRITE);
        let key: FileKey = (stat.st_dev, stat.st_ino);
        let mut mmaps = self.mmaps.lock().unwrap_or_else(PoisonError::into_inner);
        let list = mmaps.entry(key).or_default();
        list.retain(|w| w.strong_count() > 0);
        let found = list.iter().filter_map(Weak::upgrade).find(|m| {
            m.file_start <= offset
                && file_end <= m.file_start.saturating_add(m.len)
                && (m.writable || !writable)
        });
        let shared = match found {
            Some(m) => m, // `fd` is closed here: the shared mmap keeps its own.
            None => {
                // A regular file is mapped whole, so later maps of any part of it reuse this.
                let (file_start, len) = if regular {
                    (0, file_size)
                } else {
                    (offset, range.len())
                };
                let region = mmap_file(range, fd, file_start, len, writable)?;
                let guard = umdev_sys::sigbus::Guard::new(&region).map_err(|errno| {
                    tracing::warn!(%errno, "cannot guard a client's mmap against SIGBUS; refused");
                    DmaError::Mmap {
                        range,
                        offset,
                        errno,
                    }
                })?;
                self.live.fetch_add(1, Ordering::Relaxed);
                let m = Arc::new(SharedMmap {
                    id: self.next_id.fetch_add(1, Ordering::Relaxed),
                    key,
                    file_start,
                    len,
                    writable,
                    region,
                    guard,
                    live: self.live.clone(),
                });
                list.push(Arc::downgrade(&m));
                tracing::debug!(id = m.id, file_start, len, writable, "new shared mmap");
                m
            }
        };
        let offset = usize::try_from(offset - shared.file_start).map_err(|_| DmaError::Mmap {
            range,
            offset,
            errno: Errno::NOMEM,
        })?;
        Ok(MmapSlice { shared, offset })
    }
}

fn mmap_file(
    range: IovaRange,
    fd: OwnedFd,
    offset: u64,
    len: u64,
    writable: bool,
) -> Result<MmapRegion, DmaError> {
    let fail = |errno| DmaError::Mmap {
        range,
        offset,
        errno,
    };
    let size = usize::try_from(len).map_err(|_| fail(Errno::NOMEM))?;
    let mut prot = ProtFlags::READ;
    if writable {
        prot |= ProtFlags::WRITE;
    }
    let bits = |b: u32| i32::try_from(b).map_err(|_| fail(Errno::INVAL));
    MmapRegion::build(
        Some(FileOffset::new(File::from(fd), offset)),
        size,
        bits(prot.bits())?,
        bits(MapFlags::SHARED.bits())?,
    )
    .map_err(|e| fail(mmap_errno(&e)))
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
