//! The address space of one client: the mapping table (the copies are in `copy`).
//!
//! # Locking and the unmap guarantee
//!
//! The table is an `RwLock<BTreeMap<start, Mapping>>`. Copies take the read lock, map and
//! unmap take the write lock.
//!
//! A copy into a fd-backed mapping holds the read lock for the whole copy. `unmap` (and
//! `unmap_all`) cannot take the write lock until every such copy has released it, and a copy
//! that starts after the entry is gone fails its lookup. So once `unmap` returns, no copy
//! into the range is still running and none can start: the server may then reply to
//! DMA_UNMAP and the client may reuse the memory. The mmap itself is dropped (munmapped, fd
//! closed) after the write lock is released, since nothing can reach it any more.
//!
//! Copies into fd-less mappings are different: they call [`RemoteDma`], which sends a
//! message and waits for the client's answer. The server thread that would process that
//! answer may at the same time be waiting for the write lock in `unmap`; holding the read
//! lock across the call could therefore deadlock. Such copies look up the mapping, clone the
//! remote handle, drop the lock, then call. A remote copy may thus still be in flight when
//! `unmap` returns; this is harmless for the server's memory (there is none to free) and the
//! client, which owns the memory, answers it as it sees fit.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use crate::error::DmaError;
use crate::mapping::{Backing, Mapping};
use crate::range::{IovaRange, Prot};
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

pub(crate) type Table = BTreeMap<u64, Mapping>;

/// The DMA address space of one client: its mappings and the copies through them.
///
/// Shared between the thread that serves the client's DMA_MAP/DMA_UNMAP and the device
/// threads that copy; every method takes `&self`.
pub struct AddressSpace {
    limits: DmaLimits,
    table: RwLock<Table>,
    remote: RwLock<Option<Arc<dyn RemoteDma>>>,
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
    /// An empty address space with the given limits and no [`RemoteDma`].
    pub fn new(limits: DmaLimits) -> Self {
        Self {
            limits,
            table: RwLock::new(BTreeMap::new()),
            remote: RwLock::new(None),
        }
    }

    /// Sets (or clears) the message channel used for fd-less mappings.
    pub fn set_remote(&self, remote: Option<Arc<dyn RemoteDma>>) {
        // A panic elsewhere cannot leave an `Option<Arc>` half-written: ignore poisoning.
        *self.remote.write().unwrap_or_else(PoisonError::into_inner) = remote;
    }

    /// Adds a mapping.
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
        let mapping = Mapping::new(range, prot, backing)?;
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        // Checked again: another map may have raced in since the read lock was dropped.
        // On error the guard, declared after `mapping`, is released before the munmap.
        self.check_insert(&table, range)?;
        tracing::debug!(%range, ?prot, fd_backed = mapping.fd_backed(), "DMA map");
        table.insert(range.start(), mapping);
        Ok(())
    }

    /// Removes the mapping that is exactly `range`.
    ///
    /// Returns only once no fd-backed copy into the range is running (see the module docs).
    /// [`DmaError::NotMapped`] (ENOENT) if no mapping has this start and length; a range that
    /// covers a part of a mapping, or several mappings, is refused the same way.
    pub fn unmap(&self, range: IovaRange) -> Result<(), DmaError> {
        let removed = {
            let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
            match table.get(&range.start()) {
                Some(m) if m.range == range => table.remove(&range.start()),
                _ => return Err(DmaError::NotMapped { range }),
            }
        };
        // munmap and close outside the lock: no copy can reach this entry any more.
        drop(removed);
        tracing::debug!(%range, "DMA unmap");
        Ok(())
    }

    /// Removes every mapping (client gone, device reset); returns how many there were.
    ///
    /// Every mmap is unmapped and every fd closed before this returns.
    pub fn unmap_all(&self) -> usize {
        let removed =
            std::mem::take(&mut *self.table.write().unwrap_or_else(PoisonError::into_inner));
        let count = removed.len();
        drop(removed);
        tracing::debug!(count, "DMA unmap all");
        count
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
        self.read_table().values().map(MappingInfo::of).collect()
    }

    /// The mapping that contains `iova`, if any.
    pub fn lookup(&self, iova: u64) -> Option<MappingInfo> {
        find(&self.read_table(), iova).map(MappingInfo::of)
    }

    /// The limits this address space was made with.
    pub fn limits(&self) -> &DmaLimits {
        &self.limits
    }

    pub(crate) fn read_table(&self) -> RwLockReadGuard<'_, Table> {
        // Copies and lookups never leave the table half-changed, and map/unmap change it
        // with single BTreeMap operations: a poisoned lock still guards a consistent table.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
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
pub(crate) fn find(table: &Table, iova: u64) -> Option<&Mapping> {
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
        // The copy writes front to back while holding the read lock. If unmap returned
        // while it was still running, the last byte of the file would not be written yet.
        const SIZE: u64 = 32 << 20;
        let s = Arc::new(space());
        for _attempt in 0..20 {
            let (backing, file) = memfd_pair("umdev-dma-inflight", SIZE);
            s.map(range(0, SIZE), Prot::READ_WRITE, backing).unwrap();
            let writer = {
                let s = s.clone();
                std::thread::spawn(move || s.write(0, &vec![0x5au8; 32 << 20]))
            };
            // Wait until the copy holds the read lock.
            while s.table.try_write().is_ok() && !writer.is_finished() {
                std::thread::yield_now();
            }
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
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..64, 1u64..16, 1u8..=3).prop_map(|(s, l, p)| Op::Map(s, l, p)),
            2 => (0u64..64, 1u64..16).prop_map(|(s, l)| Op::Unmap(s, l)),
            1 => Just(Op::UnmapAll),
            2 => (0u64..80).prop_map(Op::Lookup),
            2 => (0u64..80, 0usize..24).prop_map(|(s, l)| Op::Read(s, l)),
            2 => (0u64..80, 0usize..24).prop_map(|(s, l)| Op::Write(s, l)),
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
