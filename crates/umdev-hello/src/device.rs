//! The hello device: its PCI layout, its registers and its work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use umdev_pci::{
    BarIndex, BarKind, DeviceContext, Errno, IrqMode, MigrationSpec, PciDevice, PciDeviceSpec,
    SpecError, StateReader, StateWriter,
};

/// Guest address, low half.
pub const REG_ADDR_LO: u64 = 0x00;
/// Guest address, high half.
pub const REG_ADDR_HI: u64 = 0x04;
/// Bytes to hash.
pub const REG_LEN: u64 = 0x08;
/// Write 1 to start.
pub const REG_CMD: u64 = 0x0c;
/// 0 idle or done, 1 busy, else an errno.
pub const REG_STATUS: u64 = 0x10;
/// The hash.
pub const REG_RESULT: u64 = 0x14;
/// Most bytes one command hashes.
pub const MAX_LEN: u32 = 64 * 1024;
const NREGS: usize = 6;
const BUSY: u32 = 1;

/// The registers, shared by the hooks (on the session thread) and the work (on the
/// device's work context).
#[derive(Default)]
struct Regs {
    r: [u32; NREGS],
    mode: Option<IrqMode>,
}

/// The hand-over's field for the request counter (after the registers' 1..).
const TAG_REQUESTS: u16 = 0x100;

/// What the device shares with its work and its attributes.
#[derive(Clone, Default)]
pub(crate) struct Shared {
    regs: Arc<Mutex<Regs>>,
    requests: Arc<AtomicU64>,
}

impl Shared {
    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// The FNV-1a hash of `data`.
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The device.
pub struct Hello {
    shared: Shared,
    ctx: Option<DeviceContext>,
}

impl Default for Hello {
    fn default() -> Self {
        Hello::new()
    }
}

impl Hello {
    /// A device with its registers at zero.
    pub fn new() -> Hello {
        Hello {
            shared: Shared::default(),
            ctx: None,
        }
    }

    /// The PCI layout: ids, one memory BAR, INTx and one MSI vector, reset supported.
    pub fn spec() -> Result<PciDeviceSpec, SpecError> {
        PciDeviceSpec::builder(0x5ead, 0x4e11)
            .class(0xff, 0x00, 0x00)
            .interrupt_pin(1)
            .bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                4096,
            )
            .msi(1, false)
            .reset(true)
            .build()
    }

    pub(crate) fn shared(&self) -> Shared {
        self.shared.clone()
    }

    /// Starts a command: STATUS busy now, the hash on the work context.
    fn start(&mut self) {
        let Some(ctx) = &self.ctx else {
            self.shared.regs().r[4] = Errno::NODEV.raw_os_error() as u32;
            return;
        };
        let (addr, len) = {
            let mut g = self.shared.regs();
            g.r[4] = BUSY;
            let addr = u64::from(g.r[0]) | (u64::from(g.r[1]) << 32);
            (addr, g.r[2].min(MAX_LEN))
        };
        let (shared, dma, irqs) = (self.shared.clone(), ctx.dma.clone(), ctx.irqs.clone());
        let job = move || {
            let mut buf = vec![0u8; len as usize];
            let status = match dma.read(addr, &mut buf) {
                Ok(()) => 0,
                Err(e) => e.errno() as u32,
            };
            let mode = {
                let mut g = shared.regs();
                g.r[5] = if status == 0 { fnv1a(&buf) } else { 0 };
                g.r[4] = status;
                g.mode
            };
            shared.requests.fetch_add(1, Ordering::Relaxed);
            match mode {
                Some(IrqMode::Msi) => irqs.trigger_msi(0),
                _ => irqs.set_intx(true),
            }
        };
        if let Err(e) = ctx.work.submit(job) {
            self.shared.regs().r[4] = e.raw_os_error() as u32;
        }
    }
}

/// The register a 4-byte access at `offset` names.
fn reg(offset: u64, len: usize) -> Result<usize, Errno> {
    let i = usize::try_from(offset / 4).map_err(|_| Errno::INVAL)?;
    if offset % 4 != 0 || len != 4 || i >= NREGS {
        return Err(Errno::INVAL);
    }
    Ok(i)
}

impl PciDevice for Hello {
    fn bar_read(&mut self, _: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let i = reg(offset, data.len())?;
        let mut g = self.shared.regs();
        data.copy_from_slice(&g.r[i].to_le_bytes());
        // Reading the status acknowledges the interrupt.
        if offset == REG_STATUS && g.r[4] != BUSY {
            g.mode = g.mode.or(Some(IrqMode::Intx));
            drop(g);
            if let Some(ctx) = &self.ctx {
                ctx.irqs.set_intx(false);
            }
        }
        Ok(())
    }

    fn bar_write(&mut self, _: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let i = reg(offset, data.len())?;
        let v = u32::from_le_bytes(data.try_into().map_err(|_| Errno::INVAL)?);
        match offset {
            REG_CMD if v == 1 => self.start(),
            REG_ADDR_LO | REG_ADDR_HI | REG_LEN => self.shared.regs().r[i] = v,
            // STATUS and RESULT are read-only; other commands are ignored.
            _ => {}
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.shared.regs().r = [0; NREGS];
        Ok(())
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), Errno> {
        self.ctx = Some(ctx);
        Ok(())
    }

    fn close(&mut self) {
        self.ctx = None;
    }

    fn irq_mode_changed(&mut self, mode: IrqMode) {
        self.shared.regs().mode = Some(mode);
    }

    fn migration(&self) -> Option<MigrationSpec> {
        Some(MigrationSpec {
            device_type: "hello".into(),
            version: 1,
            min_version: 1,
            flags: 0,
        })
    }

    fn save(&mut self, state: &mut StateWriter) -> Result<(), Errno> {
        let g = self.shared.regs();
        for (tag, v) in (1u16..).zip(g.r) {
            state.u32(tag, v);
        }
        Ok(())
    }

    fn load(&mut self, _version: u32, state: &StateReader<'_>) -> Result<(), Errno> {
        // Every field first: a bad stream leaves the device as it was.
        let mut r = [0u32; NREGS];
        for (tag, v) in (1u16..).zip(r.iter_mut()) {
            *v = state.u32(tag)?;
        }
        self.shared.regs().r = r;
        Ok(())
    }

    /// A live upgrade carries the registers as a migration does, and what a migration
    /// leaves behind but the host still sees here: the request counter of `vendor/requests`.
    /// The device has no fd of its own to hand over.
    fn hand_over(
        &mut self,
        state: &mut StateWriter,
        _fds: &mut Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), Errno> {
        self.save(state)?;
        state.u64(TAG_REQUESTS, self.shared.requests());
        Ok(())
    }

    fn take_over(
        &mut self,
        state: &StateReader<'_>,
        _fds: &mut umdev_pci::HandedFds,
    ) -> Result<(), Errno> {
        let requests = state.u64(TAG_REQUESTS)?;
        self.load(1, state)?;
        self.shared.requests.store(requests, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_of_known_strings() {
        assert_eq!(fnv1a(b""), 0x811c_9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }

    #[test]
    fn registers_take_aligned_4_byte_accesses_only() {
        assert_eq!(reg(0x14, 4), Ok(5));
        assert_eq!(reg(0x15, 4), Err(Errno::INVAL));
        assert_eq!(reg(0x10, 2), Err(Errno::INVAL));
        assert_eq!(reg(0x18, 4), Err(Errno::INVAL));
    }
}
