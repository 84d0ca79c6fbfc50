//! The address space of one client: the mapping table and the copies through it.
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
use crate::mapping::{read_mmap, write_mmap, Backing, Mapping, Memory};
use crate::range::{IovaRange, Prot};
use crate::{Dma, RemoteDma};

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

type Table = BTreeMap<u64, Mapping>;

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

/// Whether a copy reads from or writes to client memory, with its buffer.
enum Transfer<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Transfer<'_> {
    fn len(&self) -> usize {
        match self {
            Transfer::Read(b) => b.len(),
            Transfer::Write(d) => d.len(),
        }
    }

    fn needed(&self) -> Prot {
        match self {
            Transfer::Read(_) => Prot::READ,
            Transfer::Write(_) => Prot::WRITE,
        }
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

    fn read_table(&self) -> RwLockReadGuard<'_, Table> {
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

    fn remote(&self) -> Option<Arc<dyn RemoteDma>> {
        self.remote
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The copy loop shared by `read` and `write`.
    fn transfer(&self, iova: u64, mut xfer: Transfer<'_>) -> Result<(), DmaError> {
        let total = xfer.len();
        if total == 0 {
            return Ok(());
        }
        let len = u64::try_from(total).map_err(|_| DmaError::InvalidRange {
            start: iova,
            len: u64::MAX,
        })?;
        let end = iova
            .checked_add(len)
            .ok_or(DmaError::InvalidRange { start: iova, len })?;
        let needed = xfer.needed();

        let mut guard = Some(self.read_table());
        // Check every byte before copying any, so that a refused access changes nothing.
        if let Some(table) = &guard {
            check_access(table, iova, end, needed)?;
        }

        let mut cur = iova;
        while cur < end {
            // The lock is dropped around remote calls; take it again (and look up again,
            // the table may have changed) for what follows.
            let table = match guard.take() {
                Some(t) => t,
                None => self.read_table(),
            };
            let m = find_with(&table, cur, needed)?;
            let seg_end = end.min(m.range.end());
            // All three fit in usize: they are at most `total`, or inside a mapping whose
            // length was converted to usize when it was mmapped.
            let buf_at = to_usize(cur - iova, iova)?;
            let buf_end = to_usize(seg_end - iova, iova)?;
            match &m.memory {
                Memory::Mmap(region) => {
                    let off = to_usize(cur - m.range.start(), cur)?;
                    match &mut xfer {
                        Transfer::Read(buf) => {
                            read_mmap(region, off, &mut buf[buf_at..buf_end], cur)?
                        }
                        Transfer::Write(data) => {
                            write_mmap(region, off, &data[buf_at..buf_end], cur)?
                        }
                    }
                    // Keep holding the lock for the next segment (see module docs).
                    guard = Some(table);
                }
                Memory::Remote => {
                    drop(table);
                    let remote = self.remote().ok_or(DmaError::NoRemote { iova: cur })?;
                    match &mut xfer {
                        Transfer::Read(buf) => {
                            remote_read(&*remote, cur, &mut buf[buf_at..buf_end])?
                        }
                        Transfer::Write(data) => {
                            remote_write(&*remote, cur, &data[buf_at..buf_end])?
                        }
                    }
                }
            }
            cur = seg_end;
        }
        Ok(())
    }
}

impl Dma for AddressSpace {
    /// Reads `buf.len()` bytes at `iova`; every byte must be mapped with [`Prot::READ`].
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.transfer(iova, Transfer::Read(buf))
    }

    /// Writes `data` at `iova`; every byte must be mapped with [`Prot::WRITE`].
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.transfer(iova, Transfer::Write(data))
    }
}

/// The mapping containing `iova`: the last one starting at or before it, if it reaches it.
fn find(table: &Table, iova: u64) -> Option<&Mapping> {
    table
        .range(..=iova)
        .next_back()
        .map(|(_, m)| m)
        .filter(|m| m.range.contains(iova))
}

fn find_with(table: &Table, iova: u64, needed: Prot) -> Result<&Mapping, DmaError> {
    let m = find(table, iova).ok_or(DmaError::Fault { iova })?;
    if !m.prot.contains(needed) {
        return Err(DmaError::PermissionDenied {
            iova,
            needed,
            has: m.prot,
        });
    }
    Ok(m)
}

/// Checks that `[iova, end)` is covered by adjacent mappings that all allow `needed`.
fn check_access(table: &Table, iova: u64, end: u64, needed: Prot) -> Result<(), DmaError> {
    let mut cur = iova;
    while cur < end {
        cur = find_with(table, cur, needed)?.range.end();
    }
    Ok(())
}

fn to_usize(v: u64, iova: u64) -> Result<usize, DmaError> {
    usize::try_from(v).map_err(|_| DmaError::InvalidRange {
        start: iova,
        len: v,
    })
}

fn chunk_size(remote: &dyn RemoteDma) -> Result<usize, DmaError> {
    match remote.max_transfer() {
        0 => Err(DmaError::ZeroMaxTransfer),
        n => Ok(n),
    }
}

fn remote_read(remote: &dyn RemoteDma, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
    let mut at = iova;
    for chunk in buf.chunks_mut(chunk_size(remote)?) {
        remote.read(at, chunk)?;
        at = advance(at, chunk.len())?;
    }
    Ok(())
}

fn remote_write(remote: &dyn RemoteDma, iova: u64, data: &[u8]) -> Result<(), DmaError> {
    let mut at = iova;
    for chunk in data.chunks(chunk_size(remote)?) {
        remote.write(at, chunk)?;
        at = advance(at, chunk.len())?;
    }
    Ok(())
}

fn advance(iova: u64, by: usize) -> Result<u64, DmaError> {
    u64::try_from(by)
        .ok()
        .and_then(|by| iova.checked_add(by))
        .ok_or(DmaError::InvalidRange {
            start: iova,
            len: u64::MAX,
        })
}
