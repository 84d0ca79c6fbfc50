//! Translations: a checked handle to a mapped range, found through the dense index.

use std::sync::{Arc, OnceLock, PoisonError, RwLock, Weak};

use crate::dirty::Logging;
use crate::error::DmaError;
use crate::mapping::Mapping;
use crate::range::Prot;
use crate::space::Table;

/// A handle to a range of one fd-backed mapping (from [`AddressSpace::translate`](crate::AddressSpace::translate)): checked,
/// volatile accesses to its memory, valid until the mapping is unmapped.
#[derive(Clone, Debug)]
pub struct Translation {
    pub(crate) table: Arc<RwLock<Table>>,
    /// The mapping's start and identity, as `translate` found them in the index.
    pub(crate) start: u64,
    pub(crate) id: u64,
    /// The mapping, once an access has looked it up in the table.
    pub(crate) mapping: OnceLock<Weak<Mapping>>,
    pub(crate) logging: Arc<Logging>,
    pub(crate) iova: u64,
    pub(crate) len: u64,
    pub(crate) prot: Prot,
}

impl Translation {
    /// First IOVA of the handle.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes (never 0).
    #[allow(clippy::len_without_is_empty)] // Never empty by construction.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Host virtual address of the first byte while the mapping exists, for diagnostics
    /// (two translations of the same file page show the same address: one shared mmap).
    pub fn host_addr(&self) -> Option<usize> {
        self.mapping()?.host_addr(self.iova)
    }

    /// Reads `buf.len()` bytes at `offset` of the handle.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.access(offset, buf.len(), Prot::READ, |m, iova| {
            m.read_at(iova, buf)
        })
    }

    /// Writes `data` at `offset` of the handle (logged dirty while logging is on).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.access(offset, data.len(), Prot::WRITE, |m, iova| {
            m.write_at(iova, data)?;
            m.mark_dirty(&self.logging, iova, iova + data.len() as u64);
            Ok(())
        })
    }

    fn access(
        &self,
        offset: u64,
        len: usize,
        needed: Prot,
        f: impl FnOnce(&Mapping, u64) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let iova = self.iova.saturating_add(offset);
        if !self.prot.contains(needed) {
            return Err(DmaError::PermissionDenied {
                iova,
                needed,
                has: self.prot,
            });
        }
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        if offset.checked_add(len64).is_none_or(|end| end > self.len) {
            return Err(DmaError::Fault { iova });
        }
        if len == 0 {
            return Ok(());
        }
        let m = self.mapping().ok_or(DmaError::Fault { iova })?;
        let _in = m.gate.enter().ok_or(DmaError::Fault { iova })?;
        f(&m, iova)
    }

    /// The mapping while it is in the table. Once gone it never comes back (identities are
    /// not reused), and an access that got it before its unmap meets its closed gate.
    fn mapping(&self) -> Option<Arc<Mapping>> {
        if let Some(m) = self.mapping.get() {
            return m.upgrade();
        }
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        let m = table.get(&self.start).filter(|m| m.id == self.id)?.clone();
        drop(table);
        // Another clone of this handle may have set it first: the same mapping.
        let _ = self.mapping.set(Arc::downgrade(&m));
        Some(m)
    }
}
