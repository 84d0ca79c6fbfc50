//! What several targets share (included with `#[path]`: each target is a binary of its own,
//! and uses what it needs of this).
#![allow(dead_code)]

use std::sync::OnceLock;

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

/// The input's bytes, front to back; past the end every byte reads as zero.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.0.len());
        a[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        a
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// `n` bytes of data, zero-padded where the input runs out.
    pub fn data(&mut self, n: usize) -> Vec<u8> {
        let mut v = self.0[..n.min(self.0.len())].to_vec();
        self.0 = &self.0[v.len()..];
        v.resize(n, 0);
        v
    }
}

/// Prints `what` when `UMDEV_FUZZ_TRACE=1`.
pub fn trace(what: std::fmt::Arguments<'_>) {
    static TRACE: OnceLock<bool> = OnceLock::new();
    if *TRACE.get_or_init(|| std::env::var_os("UMDEV_FUZZ_TRACE").is_some_and(|v| v == "1")) {
        eprintln!("{what}");
    }
}
