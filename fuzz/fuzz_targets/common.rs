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

/// BAR0 doorbells of [`ToyDevice`]: an 8-byte write of an IOVA starts a DMA of
/// [`DMA_LEN`] bytes between the device's buffer and the client's memory.
pub const REG_DMA_READ: u64 = 0x100;
pub const REG_DMA_WRITE: u64 = 0x108;
/// BAR0 doorbell: a 1-byte write raises an interrupt, see [`interrupt`].
pub const REG_IRQ: u64 = 0x110;
/// Where DMA data lands in, and comes from, BAR0.
pub const DMA_BUF: usize = 0x200;
pub const DMA_LEN: usize = 64;

/// A small device: BARs 0, 2 and 4 of plain memory with doorbells in BAR0, which checks
/// what the framework promises a device: every access inside its BAR and outside the
/// ranges of BAR 2 the framework keeps for itself (an MSI-X table and PBA), one open at a
/// time.
pub struct ToyDevice {
    bars: [Vec<u8>; 3],
    /// Ranges of BAR 2 the device must never see (offset, size).
    reserved: Vec<(u64, u64)>,
    ctx: Option<umdev_pci::DeviceContext>,
}

impl ToyDevice {
    /// BARs 0, 2 and 4 of `sizes` bytes.
    pub fn new(sizes: [usize; 3], reserved: &[(u64, u64)]) -> ToyDevice {
        ToyDevice {
            bars: sizes.map(|s| vec![0; s]),
            reserved: reserved.to_vec(),
            ctx: None,
        }
    }

    /// The bytes of an access.
    fn span(&mut self, bar: umdev_pci::BarIndex, offset: u64, len: usize) -> &mut [u8] {
        if bar.get() == 2 {
            let end = offset.saturating_add(len as u64);
            assert!(
                !self
                    .reserved
                    .iter()
                    .any(|&(start, size)| offset < start + size && start < end),
                "access {offset:#x}+{len:#x} reached the device inside an MSI-X structure"
            );
        }
        let mem = match bar.get() {
            0 => &mut self.bars[0],
            2 => &mut self.bars[1],
            4 => &mut self.bars[2],
            n => panic!("access to BAR {n}, which the device did not declare"),
        };
        let size = mem.len();
        usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?))
            .and_then(|r| mem.get_mut(r))
            .unwrap_or_else(|| panic!("access {offset:#x}+{len:#x} past a {size:#x}-byte BAR"))
    }

    fn doorbell(&mut self, offset: u64, data: &[u8]) -> Result<(), umdev_pci::Errno> {
        use umdev_pci::Errno;
        let Some(ctx) = self.ctx.clone() else {
            return Ok(());
        };
        match (offset, data.len()) {
            (REG_DMA_READ, 8) => {
                let iova = u64::from_le_bytes(data.try_into().map_err(|_| Errno::INVAL)?);
                let buf = &mut self.bars[0][DMA_BUF..DMA_BUF + DMA_LEN];
                ctx.dma.read(iova, buf).map_err(|_| Errno::IO)
            }
            (REG_DMA_WRITE, 8) => {
                let iova = u64::from_le_bytes(data.try_into().map_err(|_| Errno::INVAL)?);
                let buf = &self.bars[0][DMA_BUF..DMA_BUF + DMA_LEN];
                ctx.dma.write(iova, buf).map_err(|_| Errno::IO)
            }
            (REG_IRQ, 1) => {
                interrupt(&ctx.irqs, data[0]);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

impl umdev_pci::PciDevice for ToyDevice {
    fn bar_read(
        &mut self,
        bar: umdev_pci::BarIndex,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), umdev_pci::Errno> {
        data.copy_from_slice(self.span(bar, offset, data.len()));
        Ok(())
    }

    fn bar_write(
        &mut self,
        bar: umdev_pci::BarIndex,
        offset: u64,
        data: &[u8],
    ) -> Result<(), umdev_pci::Errno> {
        self.span(bar, offset, data.len()).copy_from_slice(data);
        if bar.get() == 0 {
            self.doorbell(offset, data)?;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), umdev_pci::Errno> {
        for b in &mut self.bars {
            b.fill(0);
        }
        Ok(())
    }

    fn open(&mut self, ctx: umdev_pci::DeviceContext) -> Result<(), umdev_pci::Errno> {
        assert!(self.ctx.is_none(), "opened twice without a close");
        self.ctx = Some(ctx);
        Ok(())
    }

    fn close(&mut self) {
        self.ctx = None;
    }
}

/// Raises an interrupt: the low two bits pick INTx assert, INTx deassert, MSI or MSI-X; the
/// rest is the vector (out-of-range vectors included: the framework must ignore them).
pub fn interrupt(irqs: &umdev_pci::Interrupts, v: u8) {
    let vector = u32::from(v >> 2);
    match v & 3 {
        0 => irqs.set_intx(true),
        1 => irqs.set_intx(false),
        2 => irqs.trigger_msi(vector),
        _ => irqs.trigger_msix(vector),
    }
}
