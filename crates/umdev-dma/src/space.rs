//! The address space of one client: the mapping table and the unmap protocol (copies are in
//! `copy`, pins in `pin`, dirty logging in `dirty`).
//!
//! # Locking
//!
//! The table is an `RwLock<BTreeMap<start, Arc<Mapping>>>`, held only for O(log n) lookups
//! (read) and single inserts/removals (write): no copy, mmap or munmap runs under it, so a
//! client's map/unmap never waits for device copies and device lookups wait at most for one
//! tree insertion. A lookup clones the mapping's `Arc` and every access to its memory enters
//! the mapping's gate for the duration of that one access.
//!
//! `translate` reads a dense copy of the table instead (`index`, its own `RwLock`, changed
//! under the table's write lock right after the table): no pointer to the mapping and no
//! reference count on the way. Its handle keeps the mapping's start and identity and looks
//! the mapping up in the table at its first access (then keeps a `Weak`): a mapping
//! removed from the table is never found again, even when the range is mapped anew.
//!
//! # The unmap protocol (what DMA_UNMAP's reply means)
//!
//! [`AddressSpace::begin_unmap`] and [`Unmapping::finish`], in this order:
//!
//! 1. the mapping is marked *unmapping* under its pin lock: from now on no pin into it can
//!    start (EINVAL), while copies, translations and existing pins keep working, so a parent
//!    can finish what it is doing;
//! 2. the caller tells every device that pins pages of it ([`Unmapping::notices`]; the
//!    server calls the parent's `dma_unmap` hook), and [`Unmapping::finish`] waits until
//!    those pins are released, at most the given timeout;
//! 3. a device still holding pins then is *revoked*: it is put into an error state (every
//!    pin fails with EIO, every handle it holds fails), all its pins are dropped and
//!    un-charged; this is logged as an error;
//! 4. the mapping leaves the table: no new lookup finds it;
//! 5. its gate is closed and drained: accesses that entered before (a copy, a write through
//!    a stale handle) complete, and none can start after;
//! 6. the dirty bits of the range, if asked for, are read (every write has finished);
//! 7. the `Arc`s are dropped: the shared mmap is unmapped and its fd closed when no other
//!    mapping uses it.
//!
//! When `finish` returns, no pin and no access into the range remains, so the server may
//! reply and the client may reuse the memory.
//!
//! Copies into fd-less mappings are different: they call [`RemoteDma`], which sends a
//! message and waits for the client's answer, without the gate (there is no server memory
//! to protect). Such a copy may still be in flight when `finish` returns; the client, which
//! owns the memory, answers it as it sees fit.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{
    Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
};
use std::time::Duration;

use crate::client::ClientMemory;
use crate::dirty::Logging;
use crate::error::DmaError;
use crate::index::{Entry, Index};
use crate::mapping::{Backing, Mapping};
use crate::pin::HolderState;
use crate::range::{IovaRange, Prot};
use crate::translate::Translation;
use crate::unmap::Unmapping;
use crate::RemoteDma;

/// Limits of one address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaLimits {
    /// Most mappings the table holds at once; one more map fails with ENOSPC.
    pub max_mappings: usize,
}

impl Default for DmaLimits {
    /// 65,535 mappings, the default of the kernel's type1 backend (`dma_entry_limit`).
    fn default() -> Self {
        Self {
            max_mappings: 65_535,
        }
    }
}

/// A read-only description of one mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    /// The IOVA range it covers.
    pub range: IovaRange,
    /// What a device may do with it.
    pub prot: Prot,
    /// Whether the server mmapped it from a fd (otherwise copies go through [`RemoteDma`]).
    pub fd_backed: bool,
}

impl MappingInfo {
    fn of(m: &Mapping) -> Self {
        Self {
            range: m.range,
            prot: m.prot,
            fd_backed: m.fd_backed(),
        }
    }
}

pub(crate) type Table = BTreeMap<u64, Arc<Mapping>>;

/// The DMA address space of one client: its mappings, the copies through them, the pins of
/// its devices and the dirty log.
///
/// Shared between the thread that serves the client's DMA_MAP/DMA_UNMAP and the device
/// threads that copy and pin; every method takes `&self`.
pub struct AddressSpace {
    limits: DmaLimits,
    client: Arc<ClientMemory>,
    pub(crate) table: Arc<RwLock<Table>>,
    /// The same mappings, dense, for `translate` (see `index`).
    index: RwLock<Index>,
    remote: RwLock<Option<Arc<dyn RemoteDma>>>,
    logging: Arc<Logging>,
    holders: Mutex<HashMap<u64, Weak<HolderState>>>,
    next_holder: AtomicU64,
    /// Where copies through mapped memory and dirty reports are counted, once given.
    traffic: OnceLock<Arc<DmaTraffic>>,
}

/// What went through an address space, for metrics: bytes copied through the client's
/// mapped memory (not through messages, not through pins, which the device touches
/// directly) and dirty pages reported to the client. A server keeps one per device and
/// gives it to each client's space ([`AddressSpace::count_traffic`]), so the totals
/// outlive the clients.
#[derive(Debug, Default)]
pub struct DmaTraffic {
    /// Bytes the devices read from mapped client memory.
    pub mapped_read: AtomicU64,
    /// Bytes the devices wrote to mapped client memory.
    pub mapped_written: AtomicU64,
    /// Pages reported dirty (bits set in dirty bitmaps given to the client).
    pub dirty_reported: AtomicU64,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressSpace")
            .field("limits", &self.limits)
            .field("mappings", &self.len())
            .finish_non_exhaustive()
    }
}

impl Default for AddressSpace {
    fn default() -> Self {
        Self::new(DmaLimits::default())
    }
}

impl AddressSpace {
    /// An empty address space with the given limits, no [`RemoteDma`], and a client of its
    /// own whose budget is the daemon's `RLIMIT_MEMLOCK`.
    pub fn new(limits: DmaLimits) -> Self {
        Self::with_client(limits, ClientMemory::with_rlimit())
    }

    /// An empty address space of `client`: its mmaps and pin charges are shared with the
    /// client's other address spaces.
    pub fn with_client(limits: DmaLimits, client: Arc<ClientMemory>) -> Self {
        Self {
            limits,
            client,
            table: Arc::new(RwLock::new(BTreeMap::new())),
            index: RwLock::new(Index::default()),
            remote: RwLock::new(None),
            logging: Arc::new(Logging::default()),
            holders: Mutex::new(HashMap::new()),
            traffic: OnceLock::new(),
            next_holder: AtomicU64::new(0),
        }
    }

    /// The client this address space belongs to.
    pub fn client(&self) -> &Arc<ClientMemory> {
        &self.client
    }

    /// Sets (or clears) the message channel used for fd-less mappings.
    pub fn set_remote(&self, remote: Option<Arc<dyn RemoteDma>>) {
        // A panic elsewhere cannot leave an `Option<Arc>` half-written: ignore poisoning.
        *self.remote.write().unwrap_or_else(PoisonError::into_inner) = remote;
    }

    /// Adds a mapping.
    ///
    /// A fd-backed mapping shares the mmap of an earlier mapping of the same file when one
    /// covers it (see [`ClientMemory`]).
    ///
    /// Errors: [`DmaError::EmptyProt`] / [`DmaError::UnalignedOffset`] /
    /// [`DmaError::PastEndOfFile`] (EINVAL), [`DmaError::Overlap`] (EEXIST),
    /// [`DmaError::TooManyMappings`] (ENOSPC), [`DmaError::Mmap`] (mmap's errno). On any
    /// error the fd, if any, is closed.
    pub fn map(&self, range: IovaRange, prot: Prot, backing: Backing) -> Result<(), DmaError> {
        // Cheap refusals first, so that a bad request costs no mmap.
        if prot.is_empty() {
            return Err(DmaError::EmptyProt { range });
        }
        self.check_insert(&self.read_table(), range)?;
        // mmap without the lock: device threads keep copying meanwhile.
        let mapping = Arc::new(Mapping::new(range, prot, backing, &self.client)?);
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        // Checked again: another map may have raced in since the read lock was dropped.
        // On error the guard, declared after `mapping`, is released before the munmap.
        self.check_insert(&table, range)?;
        tracing::debug!(%range, ?prot, fd_backed = mapping.fd_backed(), "DMA map");
        self.write_index().insert(Entry {
            start: range.start(),
            end: range.end(),
            id: mapping.id,
            prot,
            fd_backed: mapping.fd_backed(),
        });
        table.insert(range.start(), mapping);
        Ok(())
    }

    /// Begins removing the mapping that is exactly `range` (steps 1-2 of the protocol in the
    /// module docs). [`DmaError::NotMapped`] (ENOENT) if no mapping has this start and
    /// length, or one is already being unmapped; a range that covers a part of a mapping, or
    /// several mappings, is refused the same way.
    pub fn begin_unmap(&self, range: IovaRange) -> Result<Unmapping<'_>, DmaError> {
        let m = {
            let table = self.read_table();
            match table.get(&range.start()) {
                Some(m) if m.range == range => m.clone(),
                _ => return Err(DmaError::NotMapped { range }),
            }
        };
        {
            let mut pins = m.pins();
            if pins.unmapping {
                return Err(DmaError::NotMapped { range });
            }
            pins.unmapping = true;
        }
        Ok(Unmapping::new(self, vec![m]))
    }

    /// Begins removing every mapping (UNMAP_ALL, client gone, reset).
    pub fn begin_unmap_all(&self) -> Unmapping<'_> {
        let all: Vec<Arc<Mapping>> = self.read_table().values().cloned().collect();
        let mine = all
            .into_iter()
            .filter(|m| !std::mem::replace(&mut m.pins().unmapping, true))
            .collect();
        Unmapping::new(self, mine)
    }

    /// Removes the mapping that is exactly `range`, revoking at once any device that still
    /// pins pages of it (no hook is called). See [`begin_unmap`](Self::begin_unmap).
    pub fn unmap(&self, range: IovaRange) -> Result<(), DmaError> {
        self.begin_unmap(range)?.finish(Duration::ZERO, None);
        Ok(())
    }

    /// Removes every mapping, revoking at once any device that still pins pages; returns
    /// how many there were.
    ///
    /// Every mmap not used by another address space of the client is unmapped and its fd
    /// closed before this returns.
    pub fn unmap_all(&self) -> usize {
        self.begin_unmap_all().finish(Duration::ZERO, None).mappings
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.read_table().len()
    }

    /// Whether there is no mapping.
    pub fn is_empty(&self) -> bool {
        self.read_table().is_empty()
    }

    /// All mappings, sorted by start address.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.read_table()
            .values()
            .map(|m| MappingInfo::of(m))
            .collect()
    }

    /// Every mapping with what the client gave for it (a duplicate of its file and the
    /// offset, or `Backing::Remote`), sorted by start address: what a server hands to its
    /// successor so that it maps the same memory at the same addresses. Refused (EBUSY)
    /// while dirty logging is on: the log does not travel.
    pub fn export(&self) -> Result<Vec<(IovaRange, Prot, Backing)>, DmaError> {
        if self.is_dirty_logging() {
            return Err(DmaError::LoggingActive);
        }
        self.read_table()
            .values()
            .map(|m| {
                let backing = m.backing().map_err(|e| DmaError::Stat {
                    range: m.range,
                    errno: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
                })?;
                Ok((m.range, m.prot, backing))
            })
            .collect()
    }

    /// The mapping that contains `iova`, if any.
    pub fn lookup(&self, iova: u64) -> Option<MappingInfo> {
        find(&self.read_table(), iova).map(|m| MappingInfo::of(m))
    }

    /// A handle to `[iova, iova + len)` of one fd-backed mapping, for accesses with `prot`.
    ///
    /// The handle stays usable until the mapping is unmapped; every access through it is
    /// checked and fails with EFAULT from then on. Errors: [`DmaError::Fault`] (EFAULT) if
    /// the range is not inside one mapping, [`DmaError::PermissionDenied`] (EPERM) if the
    /// mapping lacks `prot`, [`DmaError::NoHostMemory`] (EINVAL) for a fd-less mapping.
    pub fn translate(&self, iova: u64, len: u64, prot: Prot) -> Result<Translation, DmaError> {
        let end = iova
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(DmaError::InvalidRange { start: iova, len })?;
        // The dense index, not the table: no pointer to the mapping is followed and no
        // reference count is touched; the handle finds its mapping on its first access.
        let index = self.index.read().unwrap_or_else(PoisonError::into_inner);
        let m = *index.find(iova).ok_or(DmaError::Fault { iova })?;
        drop(index);
        if !m.prot.contains(prot) {
            return Err(DmaError::PermissionDenied {
                iova,
                needed: prot,
                has: m.prot,
            });
        }
        if end > m.end {
            return Err(DmaError::Fault { iova: m.end });
        }
        if !m.fd_backed {
            return Err(DmaError::NoHostMemory { iova });
        }
        Ok(Translation {
            table: self.table.clone(),
            start: m.start,
            id: m.id,
            mapping: OnceLock::new(),
            logging: self.logging.clone(),
            iova,
            len,
            prot,
        })
    }

    /// The limits this address space was made with.
    pub fn limits(&self) -> &DmaLimits {
        &self.limits
    }

    /// Counts copies through mapped memory and dirty reports in `traffic` from now on (the
    /// first one given stays).
    pub fn count_traffic(&self, traffic: Arc<DmaTraffic>) {
        let _ = self.traffic.set(traffic);
    }

    pub(crate) fn traffic(&self) -> Option<&DmaTraffic> {
        self.traffic.get().map(|t| &**t)
    }

    /// Pages pinned by all devices of this address space (a page pinned by two devices
    /// counts twice, a page pinned twice by one device once).
    pub fn pinned_pages(&self) -> u64 {
        self.read_table()
            .values()
            .map(|m| m.pins().pinned_pages())
            .sum()
    }

    pub(crate) fn read_table(&self) -> RwLockReadGuard<'_, Table> {
        // Lookups never leave the table half-changed, and map/unmap change it with single
        // BTreeMap operations: a poisoned lock still guards a consistent table.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        // Changed only by single insertions and removals: consistent even if poisoned.
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn logging(&self) -> &Logging {
        &self.logging
    }

    /// The mappings that overlap `range`, in order.
    pub(crate) fn overlapping(&self, range: IovaRange) -> Vec<Arc<Mapping>> {
        let table = self.read_table();
        let from = find(&table, range.start()).map_or(range.start(), |m| m.range.start());
        table
            .range(from..range.end())
            .map(|(_, m)| m.clone())
            .collect()
    }

    pub(crate) fn register_holder(&self, state: &Arc<HolderState>) {
        self.holders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(state.id, Arc::downgrade(state));
    }

    pub(crate) fn next_holder_id(&self) -> u64 {
        self.next_holder.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops every pin of `holder` in every mapping. With `revoke`, the holder is put into
    /// the error state first, so that its handles and later pins fail.
    pub(crate) fn release_holder(&self, holder: u64, revoke: bool) {
        let state = self
            .holders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&holder)
            .and_then(Weak::upgrade);
        if revoke {
            if let Some(s) = &state {
                s.revoke();
            }
        }
        let mappings: Vec<Arc<Mapping>> = self.read_table().values().cloned().collect();
        for m in mappings {
            let mut pins = m.pins();
            if pins.holder(holder).is_some() {
                crate::pin::release_all(&self.client, &m, &mut pins, holder);
            }
        }
        if state.is_none() || revoke {
            self.holders
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&holder);
        }
    }

    fn check_insert(&self, table: &Table, range: IovaRange) -> Result<(), DmaError> {
        // The kernel's type1 checks overlap before the entry limit; so do we.
        let before = table.range(..=range.start()).next_back();
        let after = table
            .range((Bound::Excluded(range.start()), Bound::Unbounded))
            .next();
        for m in before.into_iter().chain(after).map(|(_, m)| m) {
            if m.range.overlaps(&range) {
                return Err(DmaError::Overlap {
                    range,
                    existing: m.range,
                });
            }
        }
        if table.len() >= self.limits.max_mappings {
            return Err(DmaError::TooManyMappings {
                max: self.limits.max_mappings,
            });
        }
        Ok(())
    }

    pub(crate) fn remote(&self) -> Option<Arc<dyn RemoteDma>> {
        self.remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The mapping containing `iova`: the last one starting at or before it, if it reaches it.
pub(crate) fn find(table: &Table, iova: u64) -> Option<&Arc<Mapping>> {
    table
        .range(..=iova)
        .next_back()
        .map(|(_, m)| m)
        .filter(|m| m.range.contains(iova))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use crate::testutil::{memfd, memfd_pair, range, space};
    use crate::{Dma, PAGE_SIZE};
    use proptest::prelude::*;
    use rustix::io::Errno;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn address_space_is_send_and_sync() {
        fn shareable<T: Send + Sync>() {}
        shareable::<AddressSpace>();
    }

    #[test]
    fn default_limit_is_65535_mappings() {
        assert_eq!(space().limits().max_mappings, 65_535);
    }

    #[test]
    fn overlapping_map_is_eexist() {
        let s = space();
        s.map(range(0x1000, 0x2000), Prot::READ, Backing::Remote)
            .unwrap();
        for (start, len) in [
            (0x1000, 0x2000),
            (0x0, 0x1001),
            (0x2fff, 1),
            (0x1800, 0x10),
            (0, 0x10000),
        ] {
            let err = s
                .map(range(start, len), Prot::READ, Backing::Remote)
                .unwrap_err();
            assert_eq!(err.as_errno(), Errno::EXIST, "{start:#x}+{len:#x}");
        }
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn adjacent_maps_are_accepted() {
        let s = space();
        s.map(range(0x1000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        s.map(range(0x0, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        s.map(range(0x2000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn refused_map_closes_the_fd() {
        let name = "umdev-dma-refused";
        let s = space();
        s.map(range(0, PAGE_SIZE), Prot::READ, Backing::Remote)
            .unwrap();
        let fd = memfd(name, PAGE_SIZE);
        let raw = fd.as_raw_fd();
        let err = s
            .map(
                range(0, PAGE_SIZE),
                Prot::READ,
                Backing::Fd { fd, offset: 0 },
            )
            .unwrap_err();
        assert!(matches!(err, DmaError::Overlap { .. }));
        assert!(!fd_target(raw).is_some_and(|t| t.contains(name)));
    }

    #[test]
    fn empty_prot_map_is_einval() {
        let err = space()
            .map(range(0, 0x1000), Prot::NONE, Backing::Remote)
            .unwrap_err();
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn unmap_removes_exact_match() {
        let s = space();
        s.map(range(0x1000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        s.map(range(0x2000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        s.unmap(range(0x1000, 0x1000)).unwrap();
        let left: Vec<_> = s.mappings().iter().map(|m| m.range).collect();
        assert_eq!(left, vec![range(0x2000, 0x1000)]);
    }

    #[test]
    fn unmap_of_part_or_superset_is_enoent() {
        let s = space();
        s.map(range(0x1000, 0x2000), Prot::READ, Backing::Remote)
            .unwrap();
        for (start, len) in [
            (0x1000, 0x1000),
            (0x1000, 0x3000),
            (0x2000, 0x1000),
            (0x0, 0x4000),
        ] {
            let err = s.unmap(range(start, len)).unwrap_err();
            assert_eq!(err.as_errno(), Errno::NOENT, "{start:#x}+{len:#x}");
        }
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn unmap_of_never_mapped_range_is_enoent() {
        let err = space().unmap(range(0x1000, 0x1000)).unwrap_err();
        assert!(matches!(err, DmaError::NotMapped { .. }));
        assert_eq!(err.errno(), Errno::NOENT.raw_os_error());
    }

    #[test]
    fn map_beyond_limit_is_enospc() {
        let s = AddressSpace::new(DmaLimits { max_mappings: 2 });
        s.map(range(0, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        s.map(range(0x1000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
        let err = s
            .map(range(0x2000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap_err();
        assert_eq!(err.as_errno(), Errno::NOSPC);
        // Room again after an unmap.
        s.unmap(range(0, 0x1000)).unwrap();
        s.map(range(0x2000, 0x1000), Prot::READ, Backing::Remote)
            .unwrap();
    }

    #[test]
    fn mappings_are_sorted_by_start() {
        let s = space();
        for start in [0x5000, 0x1000, 0x3000] {
            s.map(range(start, 0x1000), Prot::READ_WRITE, Backing::Remote)
                .unwrap();
        }
        let starts: Vec<_> = s.mappings().iter().map(|m| m.range.start()).collect();
        assert_eq!(starts, vec![0x1000, 0x3000, 0x5000]);
        assert!(s
            .mappings()
            .iter()
            .all(|m| !m.fd_backed && m.prot == Prot::READ_WRITE));
    }

    /// The target of `/proc/self/fd/<fd>`, if that fd is open.
    fn fd_target(fd: i32) -> Option<String> {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    fn maps_mention(name: &str) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .contains(name)
    }

    #[test]
    fn unmap_all_closes_fds_and_munmaps() {
        // Names unique to this test: other tests run in parallel and reuse fd numbers.
        let names = ["umdev-dma-unmap-all-a", "umdev-dma-unmap-all-b"];
        let s = space();
        let mut raw = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let fd = memfd(name, PAGE_SIZE);
            raw.push(fd.as_raw_fd());
            let start = u64::try_from(i).unwrap() * PAGE_SIZE;
            s.map(
                range(start, PAGE_SIZE),
                Prot::READ,
                Backing::Fd { fd, offset: 0 },
            )
            .unwrap();
        }
        s.map(range(0x10000, PAGE_SIZE), Prot::READ, Backing::Remote)
            .unwrap();
        for (fd, name) in raw.iter().zip(names) {
            assert!(fd_target(*fd).unwrap().contains(name));
            assert!(maps_mention(name));
        }

        assert_eq!(s.unmap_all(), 3);
        assert!(s.is_empty());
        for (fd, name) in raw.iter().zip(names) {
            assert!(
                !fd_target(*fd).is_some_and(|t| t.contains(name)),
                "fd {fd} still open"
            );
            assert!(!maps_mention(name), "{name} still mapped");
        }
    }

    #[test]
    fn unmap_closes_the_fd() {
        let name = "umdev-dma-unmap-one";
        let s = space();
        let fd = memfd(name, PAGE_SIZE);
        let raw = fd.as_raw_fd();
        s.map(
            range(0, PAGE_SIZE),
            Prot::READ,
            Backing::Fd { fd, offset: 0 },
        )
        .unwrap();
        s.unmap(range(0, PAGE_SIZE)).unwrap();
        assert!(!fd_target(raw).is_some_and(|t| t.contains(name)));
        assert!(!maps_mention(name));
    }

    #[test]
    fn unmap_waits_for_in_flight_fd_copy() {
        // The copy writes front to back inside the mapping's gate. If unmap returned while
        // it was still running, the last byte of the file would not be written yet.
        const SIZE: u64 = 32 << 20;
        let s = Arc::new(space());
        for _attempt in 0..20 {
            let (backing, file) = memfd_pair("umdev-dma-inflight", SIZE);
            s.map(range(0, SIZE), Prot::READ_WRITE, backing).unwrap();
            let writer = {
                let s = s.clone();
                std::thread::spawn(move || s.write(0, &vec![0x5au8; 32 << 20]))
            };
            // Wait until the copy is inside the mapping's gate.
            let m = find(&s.read_table(), 0).unwrap().clone();
            while m.gate.in_flight() == 0 && !writer.is_finished() {
                std::thread::yield_now();
            }
            drop(m);
            let caught_in_flight = !writer.is_finished();
            s.unmap(range(0, SIZE)).unwrap();
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, SIZE - 1).unwrap();
            writer.join().unwrap().unwrap();
            if caught_in_flight {
                assert_eq!(last, [0x5a], "unmap returned during the copy");
                return;
            }
        }
        panic!("never caught the copy in flight");
    }

    #[test]
    fn translation_fails_after_unmap_even_when_the_range_is_mapped_again() {
        let s = space();
        let (backing, _file) = memfd_pair("umdev-dma-translate", PAGE_SIZE);
        s.map(range(0, PAGE_SIZE), Prot::READ_WRITE, backing)
            .unwrap();
        let t = s.translate(16, 8, Prot::READ_WRITE).unwrap();
        let unused = s.translate(16, 8, Prot::READ).unwrap(); // never accessed before unmap
        t.write(0, &[7; 8]).unwrap();
        let mut buf = [0u8; 8];
        t.read(0, &mut buf).unwrap();
        assert_eq!(buf, [7; 8]);
        s.unmap(range(0, PAGE_SIZE)).unwrap();
        let (backing, _file2) = memfd_pair("umdev-dma-translate-2", PAGE_SIZE);
        s.map(range(0, PAGE_SIZE), Prot::READ_WRITE, backing)
            .unwrap();
        for h in [&t, &unused] {
            assert_eq!(h.read(0, &mut buf).unwrap_err().as_errno(), Errno::FAULT);
            assert!(h.host_addr().is_none());
        }
        assert!(s
            .translate(16, 8, Prot::READ)
            .unwrap()
            .read(0, &mut buf)
            .is_ok());
    }

    /// A client whose memory reads as zeros and swallows writes.
    struct NullClient;

    impl RemoteDma for NullClient {
        fn read(&self, _iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            buf.fill(0);
            Ok(())
        }

        fn write(&self, _iova: u64, _data: &[u8]) -> Result<(), DmaError> {
            Ok(())
        }

        fn max_transfer(&self) -> usize {
            3
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Map(u64, u64, u8),
        Unmap(u64, u64),
        UnmapAll,
        Lookup(u64),
        Read(u64, usize),
        Write(u64, usize),
        Translate(u64, u64, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..64, 1u64..16, 1u8..=3).prop_map(|(s, l, p)| Op::Map(s, l, p)),
            2 => (0u64..64, 1u64..16).prop_map(|(s, l)| Op::Unmap(s, l)),
            1 => Just(Op::UnmapAll),
            2 => (0u64..80).prop_map(Op::Lookup),
            2 => (0u64..80, 0usize..24).prop_map(|(s, l)| Op::Read(s, l)),
            2 => (0u64..80, 0usize..24).prop_map(|(s, l)| Op::Write(s, l)),
            2 => (0u64..80, 0u64..24, 1u8..=3).prop_map(|(s, l, p)| Op::Translate(s, l, p)),
        ]
    }

    /// The naive model: a list of (start, len, prot), scanned linearly, byte by byte.
    #[derive(Default)]
    struct Model {
        maps: Vec<(u64, u64, Prot)>,
    }

    const MODEL_LIMIT: usize = 6;

    impl Model {
        fn find(&self, iova: u64) -> Option<(u64, u64, Prot)> {
            self.maps
                .iter()
                .copied()
                .find(|&(s, l, _)| s <= iova && iova < s + l)
        }

        fn map(&mut self, start: u64, len: u64, prot: Prot) -> Result<(), Errno> {
            let overlaps = (start..start + len).any(|x| self.find(x).is_some());
            if overlaps {
                return Err(Errno::EXIST);
            }
            if self.maps.len() >= MODEL_LIMIT {
                return Err(Errno::NOSPC);
            }
            self.maps.push((start, len, prot));
            Ok(())
        }

        fn unmap(&mut self, start: u64, len: u64) -> Result<(), Errno> {
            let i = self
                .maps
                .iter()
                .position(|&(s, l, _)| s == start && l == len)
                .ok_or(Errno::NOENT)?;
            self.maps.remove(i);
            Ok(())
        }

        fn access(&self, iova: u64, len: usize, needed: Prot) -> Result<(), Errno> {
            for x in iova..iova + u64::try_from(len).unwrap() {
                match self.find(x) {
                    None => return Err(Errno::FAULT),
                    Some((_, _, p)) if !p.contains(needed) => return Err(Errno::PERM),
                    Some(_) => {}
                }
            }
            Ok(())
        }

        /// What `translate` answers: every mapping here is fd-less, so a range inside one
        /// mapping with the permission is EINVAL (no host memory).
        fn translate(&self, iova: u64, len: u64, needed: Prot) -> Result<(), Errno> {
            if len == 0 {
                return Err(Errno::INVAL);
            }
            let (s, l, p) = self.find(iova).ok_or(Errno::FAULT)?;
            if !p.contains(needed) {
                return Err(Errno::PERM);
            }
            if iova + len > s + l {
                return Err(Errno::FAULT);
            }
            Err(Errno::INVAL)
        }

        fn sorted(&self) -> Vec<(u64, u64, Prot)> {
            let mut v = self.maps.clone();
            v.sort_unstable_by_key(|m| m.0);
            v
        }
    }

    fn errno<T>(r: Result<T, DmaError>) -> Result<T, Errno> {
        r.map_err(|e| e.as_errno())
    }

    proptest! {
        #[test]
        fn table_agrees_with_naive_model(ops in proptest::collection::vec(op(), 1..60)) {
            let s = AddressSpace::new(DmaLimits { max_mappings: MODEL_LIMIT });
            s.set_remote(Some(Arc::new(NullClient)));
            let mut model = Model::default();
            for op in ops {
                match op {
                    Op::Map(start, len, bits) => {
                        let prot = Prot::from_bits(bits).unwrap();
                        let got = errno(s.map(range(start, len), prot, Backing::Remote));
                        prop_assert_eq!(got, model.map(start, len, prot), "{:?}", op);
                    }
                    Op::Unmap(start, len) => {
                        prop_assert_eq!(errno(s.unmap(range(start, len))), model.unmap(start, len));
                    }
                    Op::UnmapAll => {
                        prop_assert_eq!(s.unmap_all(), model.maps.len());
                        model.maps.clear();
                    }
                    Op::Lookup(iova) => {
                        let got = s.lookup(iova).map(|m| (m.range.start(), m.range.len(), m.prot));
                        prop_assert_eq!(got, model.find(iova));
                    }
                    Op::Read(iova, len) => {
                        let got = errno(s.read(iova, &mut vec![0; len]));
                        prop_assert_eq!(got, model.access(iova, len, Prot::READ), "{:?}", op);
                    }
                    Op::Write(iova, len) => {
                        let got = errno(s.write(iova, &vec![0; len]));
                        prop_assert_eq!(got, model.access(iova, len, Prot::WRITE), "{:?}", op);
                    }
                    Op::Translate(iova, len, bits) => {
                        let prot = Prot::from_bits(bits).unwrap();
                        let got = errno(s.translate(iova, len, prot).map(|_| ()));
                        prop_assert_eq!(got, model.translate(iova, len, prot), "{:?}", op);
                    }
                }
                let table: Vec<_> = s
                    .mappings()
                    .iter()
                    .map(|m| (m.range.start(), m.range.len(), m.prot))
                    .collect();
                prop_assert_eq!(table, model.sorted());
                prop_assert_eq!(s.len(), model.maps.len());
            }
        }
    }
}
