//! What several targets share (included with `#[path]`: each target is a binary of its own).

use umdev_dma::{Dma, DmaError};

/// A client whose memory refuses every access (a device's DMA fails with EFAULT).
pub struct Refuse;

impl Dma for Refuse {
    fn read(&self, iova: u64, _: &mut [u8]) -> Result<(), DmaError> {
        Err(DmaError::Fault { iova })
    }

    fn write(&self, iova: u64, _: &[u8]) -> Result<(), DmaError> {
        Err(DmaError::Fault { iova })
    }
}
