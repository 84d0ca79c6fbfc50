//! Client memory that answers the server's DMA_READ and DMA_WRITE requests.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Answers server-to-client DMA requests for mappings made without an fd.
pub trait DmaHandler: Send + Sync {
    /// Fills `buf` from client memory at `iova`; returns an errno on failure.
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Stores `data` into client memory at `iova`; returns an errno on failure.
    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), i32>;
}

/// Plain process memory keyed by IOVA, the simplest [`DmaHandler`]: what a VMM with
/// unshared guest RAM does.
#[derive(Debug, Default)]
pub struct VecMemory {
    regions: Mutex<BTreeMap<u64, Vec<u8>>>,
}

const EFAULT: i32 = 14;

impl VecMemory {
    /// An empty memory.
    pub fn new() -> VecMemory {
        VecMemory::default()
    }

    /// Adds a zeroed region of `len` bytes at `iova`.
    pub fn add(&self, iova: u64, len: usize) {
        self.regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iova, vec![0; len]);
    }

    /// Runs `f` on the bytes at `iova..iova+len`, if one region holds them all.
    pub fn with<R>(&self, iova: u64, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        let mut regions = self.regions.lock().unwrap_or_else(|e| e.into_inner());
        let (base, mem) = regions.range_mut(..=iova).next_back()?;
        let start = usize::try_from(iova - *base).ok()?;
        let end = start.checked_add(len)?;
        mem.get_mut(start..end).map(f)
    }
}

impl DmaHandler for VecMemory {
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<(), i32> {
        self.with(iova, buf.len(), |m| buf.copy_from_slice(m))
            .ok_or(EFAULT)
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), i32> {
        self.with(iova, data.len(), |m| m.copy_from_slice(data))
            .ok_or(EFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_memory_reads_back_what_was_written_and_faults_outside() {
        let m = VecMemory::new();
        m.add(0x1000, 16);
        m.dma_write(0x1004, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 4];
        m.dma_read(0x1003, &mut b).unwrap();
        assert_eq!(b, [0, 1, 2, 3]);
        assert_eq!(m.dma_read(0x100e, &mut b), Err(EFAULT));
        assert_eq!(m.dma_read(0x0, &mut b), Err(EFAULT));
    }
}
