//! A test device that exercises every path of the framework: plain RAM BARs, an I/O BAR,
//! an mmap-able BAR with sparse areas, MSI, MSI-X, and a small DMA engine driven from BAR0.
//!
//! BAR0 (memory, 4 KiB) register map:
//!
//! | offset | width | meaning |
//! |---|---|---|
//! | 0x000..0x100 | any | scratch RAM |
//! | 0x100 | 8 | DMA address (IOVA) |
//! | 0x108 | 4 | DMA length (at most 2 KiB) |
//! | 0x10c | 1 | DMA pattern seed |
//! | 0x110 | 4 | DMA command: 1 = write `seed+i` bytes to guest memory, 2 = read guest memory into the buffer at 0x800, 3 = pin `PIN_PAGES` pages at the DMA address with `PIN_PROT`, 4 = write `seed+i` bytes at the DMA address through a pin the device holds, 5 = unpin `PIN_PAGES` pages at the DMA address |
//! | 0x114 | 4 | DMA status: 0 after success, the errno otherwise (read-only) |
//! | 0x120 | 4 | IRQ command: 0 = lower INTx, 1 = raise INTx, 2 = MSI vector at 0x124, 3 = MSI-X vector at 0x124, 4 = ERR, 5 = REQ |
//! | 0x124 | 4 | IRQ vector |
//! | 0x128 | 4 | pages to pin or unpin (command 3, 5) |
//! | 0x12c | 4 | pin access: 1 = read, 2 = write, 3 = both |
//! | 0x130 | 4 | unmap hook mode: 0 = unpin at once, 1 = forget (keep the pins: the device gets revoked), 2 = unpin from another thread 200 ms later |
//! | 0x134 | 4 | migration failure (a migratable device only): 1 = stopping fails, 2 = saving fails |
//! | 0x800..0x1000 | any | DMA buffer |
//!
//! [`TestDevice::migratable_function`] serves a device that migrates (STOP_COPY, P2P,
//! PRE_COPY): its state is its BARs and the pins it holds, which it pins again on load.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use umdev_dma::{AddressSpace, PinnedPages, Pinner, Prot, PAGE_SIZE};
use umdev_pci::{
    BarIndex, BarKind, BarMmap, DeviceContext, DeviceError, IrqMode, PciDevice, PciDeviceSpec,
    PciFunction,
};

/// Vendor id of the test device (not assigned to anyone we know of; tests only).
pub const TEST_VENDOR: u16 = 0x5ead;
/// Device id of the test device.
pub const TEST_DEVICE: u16 = 0x0001;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 4096;
/// Size of the mmap-able BAR2.
pub const BAR2_SIZE: u64 = 64 * 1024;
/// Sparse mmap areas of BAR2.
pub const BAR2_AREAS: [(u64, u64); 2] = [(0x1000, 0x3000), (0x8000, 0x8000)];
/// Register offsets in BAR0.
pub mod reg {
    /// DMA address.
    pub const DMA_ADDR: u64 = 0x100;
    /// DMA length.
    pub const DMA_LEN: u64 = 0x108;
    /// DMA pattern seed.
    pub const DMA_SEED: u64 = 0x10c;
    /// DMA command.
    pub const DMA_CMD: u64 = 0x110;
    /// DMA status.
    pub const DMA_STATUS: u64 = 0x114;
    /// IRQ command.
    pub const IRQ_CMD: u64 = 0x120;
    /// IRQ vector.
    pub const IRQ_VECTOR: u64 = 0x124;
    /// Pages to pin or unpin.
    pub const PIN_PAGES: u64 = 0x128;
    /// Pin access bits.
    pub const PIN_PROT: u64 = 0x12c;
    /// What the `dma_unmap` hook does.
    pub const UNMAP_MODE: u64 = 0x130;
    /// Migration failure injection.
    pub const MIG_FAIL: u64 = 0x134;
    /// DMA buffer.
    pub const DMA_BUF: u64 = 0x800;
}

/// What the test observes of the device.
#[derive(Debug, Default)]
pub struct Observed {
    /// Every BAR access that reached the device: (bar, offset, len, is_write).
    pub accesses: Mutex<Vec<(u8, u64, usize, bool)>>,
    /// Times `open` was called.
    pub opens: AtomicUsize,
    /// Times `close` was called.
    pub closes: AtomicUsize,
    /// Times `reset` was called.
    pub resets: AtomicUsize,
    /// When set, `open` refuses with EBUSY.
    pub refuse_open: AtomicBool,
    /// Interrupt modes the device was told about.
    pub modes: Mutex<Vec<IrqMode>>,
    /// Every `dma_unmap` hook call: (iova, len).
    pub unmap_hooks: Mutex<Vec<(u64, u64)>>,
    /// The address space of the current (or last) client.
    pub space: Mutex<Option<Arc<AddressSpace>>>,
    /// The device's pinner while a client is attached.
    pub pinner: Mutex<Weak<Pinner>>,
}

/// The test device.
pub struct TestDevice {
    bar0: Vec<u8>,
    bar1: Vec<u8>,
    bar2: Arc<OwnedFd>,
    ctx: Option<DeviceContext>,
    /// Handles of the pins the device holds.
    pins: Vec<PinnedPages>,
    observed: Arc<Observed>,
    /// Declares migration support.
    migratable: bool,
}

/// The test device's migration type and state version (2 added the pins; 1 still loads).
pub const TEST_MIGRATION_TYPE: &str = "umdev-test";
/// The state version the test device writes.
pub const TEST_STATE_VERSION: u32 = 2;

impl TestDevice {
    /// A device and the function serving it, plus what tests can observe.
    pub fn function() -> (PciFunction, Arc<Observed>) {
        Self::function_with(false)
    }

    /// A migratable device and the function serving it.
    pub fn migratable_function() -> (PciFunction, Arc<Observed>) {
        Self::function_with(true)
    }

    fn function_with(migratable: bool) -> (PciFunction, Arc<Observed>) {
        let fd = rustix::fs::memfd_create("umdev-test-bar2", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, BAR2_SIZE).expect("ftruncate");
        let fd = Arc::new(fd);
        let spec = PciDeviceSpec::builder(TEST_VENDOR, TEST_DEVICE)
            .class(0xff, 0x00, 0x00)
            .revision(1)
            .subsystem(TEST_VENDOR, TEST_DEVICE)
            .interrupt_pin(1)
            .bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                BAR0_SIZE,
            )
            .bar(1, BarKind::Io, 16)
            .bar(2, BarKind::Mem64 { prefetchable: true }, BAR2_SIZE)
            .bar_mmap(
                2,
                BarMmap {
                    fd: fd.clone(),
                    offset: 0,
                    areas: BAR2_AREAS.to_vec(),
                },
            )
            .bar(
                4,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                8192,
            )
            .msi(4, true)
            .msix(8, 4, 0, 4, 0x1000)
            .pcie()
            .power_management()
            .reset(true)
            .build()
            .expect("test device spec is valid");
        let observed = Arc::new(Observed::default());
        let dev = TestDevice {
            bar0: vec![0; BAR0_SIZE as usize],
            bar1: vec![0; 16],
            bar2: fd,
            ctx: None,
            pins: Vec::new(),
            observed: observed.clone(),
            migratable,
        };
        (PciFunction::new(spec, Box::new(dev)), observed)
    }

    fn reg32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.bar0[o..o + 4].try_into().unwrap_or([0; 4]))
    }

    fn run_dma(&mut self, cmd: u32) {
        let o = reg::DMA_ADDR as usize;
        let addr = u64::from_le_bytes(self.bar0[o..o + 8].try_into().unwrap_or([0; 8]));
        let len = (self.reg32(reg::DMA_LEN) as usize).min(2048);
        let seed = self.bar0[reg::DMA_SEED as usize];
        let status = match &self.ctx {
            None => 19, // ENODEV: no client
            Some(ctx) => {
                let r = match cmd {
                    1 => {
                        let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
                        ctx.dma.write(addr, &data)
                    }
                    2 => {
                        let b = reg::DMA_BUF as usize;
                        ctx.dma.read(addr, &mut self.bar0[b..b + len])
                    }
                    3..=5 => {
                        let pages = self.reg32(reg::PIN_PAGES) as usize;
                        let prot =
                            Prot::from_bits(self.reg32(reg::PIN_PROT) as u8).unwrap_or(Prot::NONE);
                        match &ctx.pins {
                            None => Ok(()),
                            Some(p) => Self::pin_command(
                                &mut self.pins,
                                p,
                                cmd,
                                addr,
                                pages,
                                prot,
                                len,
                                seed,
                            ),
                        }
                    }
                    _ => Ok(()),
                };
                r.map_or_else(|e| e.errno() as u32, |()| 0)
            }
        };
        let s = reg::DMA_STATUS as usize;
        self.bar0[s..s + 4].copy_from_slice(&status.to_le_bytes());
    }

    #[allow(clippy::too_many_arguments)]
    fn pin_command(
        held: &mut Vec<PinnedPages>,
        pinner: &Pinner,
        cmd: u32,
        addr: u64,
        pages: usize,
        prot: Prot,
        len: usize,
        seed: u8,
    ) -> Result<(), umdev_dma::DmaError> {
        match cmd {
            3 => {
                held.push(pinner.pin(addr, pages, prot)?);
                Ok(())
            }
            4 => {
                let end = addr + len as u64;
                let Some(p) = held.iter().rev().find(|p| {
                    p.iova() <= addr
                        && end <= p.iova() + p.len_bytes()
                        && p.prot().contains(Prot::WRITE)
                }) else {
                    return Err(umdev_dma::DmaError::Fault { iova: addr });
                };
                let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
                p.write(addr - p.iova(), &data)
            }
            _ => {
                pinner.unpin(addr, pages)?;
                let end = addr + pages as u64 * PAGE_SIZE;
                if let Some(i) = held
                    .iter()
                    .position(|p| p.iova() >= addr && p.iova() + p.len_bytes() <= end)
                {
                    held.remove(i);
                }
                Ok(())
            }
        }
    }

    fn run_irq(&mut self, cmd: u32) {
        let vector = self.reg32(reg::IRQ_VECTOR);
        if let Some(ctx) = &self.ctx {
            match cmd {
                0 => ctx.irqs.set_intx(false),
                1 => ctx.irqs.set_intx(true),
                2 => ctx.irqs.trigger_msi(vector),
                3 => ctx.irqs.trigger_msix(vector),
                4 => ctx.irqs.signal_err(),
                5 => ctx.irqs.signal_req(),
                _ => {}
            }
        }
    }
}

fn range(len: usize, off: u64, n: usize) -> Result<std::ops::Range<usize>, DeviceError> {
    let start = usize::try_from(off).map_err(|_| DeviceError::Io(22))?;
    let end = start
        .checked_add(n)
        .filter(|e| *e <= len)
        .ok_or(DeviceError::Io(22))?;
    Ok(start..end)
}

impl PciDevice for TestDevice {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.observed
            .accesses
            .lock()
            .unwrap()
            .push((bar.get(), offset, data.len(), false));
        match bar.get() {
            0 => data.copy_from_slice(&self.bar0[range(self.bar0.len(), offset, data.len())?]),
            1 => data.copy_from_slice(&self.bar1[range(self.bar1.len(), offset, data.len())?]),
            2 => {
                rustix::io::pread(&*self.bar2, data, offset)
                    .map_err(|e| DeviceError::Io(e.raw_os_error()))?;
            }
            _ => data.fill(0),
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.observed
            .accesses
            .lock()
            .unwrap()
            .push((bar.get(), offset, data.len(), true));
        match bar.get() {
            0 => {
                if offset == reg::DMA_STATUS {
                    return Ok(()); // read-only
                }
                let r = range(self.bar0.len(), offset, data.len())?;
                self.bar0[r].copy_from_slice(data);
                if offset == reg::DMA_CMD && data.len() == 4 {
                    self.run_dma(self.reg32(reg::DMA_CMD));
                } else if offset == reg::IRQ_CMD && data.len() == 4 {
                    self.run_irq(self.reg32(reg::IRQ_CMD));
                }
            }
            1 => {
                let r = range(self.bar1.len(), offset, data.len())?;
                self.bar1[r].copy_from_slice(data);
            }
            2 => {
                rustix::io::pwrite(&*self.bar2, data, offset)
                    .map_err(|e| DeviceError::Io(e.raw_os_error()))?;
            }
            _ => {}
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.observed.resets.fetch_add(1, Ordering::SeqCst);
        self.bar0.fill(0);
        Ok(())
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), DeviceError> {
        if self.observed.refuse_open.load(Ordering::SeqCst) {
            return Err(DeviceError::Refused(16)); // EBUSY
        }
        self.observed.opens.fetch_add(1, Ordering::SeqCst);
        if let Some(p) = &ctx.pins {
            *self.observed.space.lock().unwrap() = Some(p.space().clone());
            *self.observed.pinner.lock().unwrap() = Arc::downgrade(p);
        }
        self.pins.clear();
        self.ctx = Some(ctx);
        Ok(())
    }

    fn close(&mut self) {
        self.observed.closes.fetch_add(1, Ordering::SeqCst);
        // Dropping the context drops the pinner, which releases what the device still pins.
        self.pins.clear();
        self.ctx = None;
    }

    fn irq_mode_changed(&mut self, mode: IrqMode) {
        self.observed.modes.lock().unwrap().push(mode);
    }

    fn migration(&self) -> Option<umdev_pci::MigrationSpec> {
        self.migratable.then(|| umdev_pci::MigrationSpec {
            device_type: TEST_MIGRATION_TYPE.into(),
            version: TEST_STATE_VERSION,
            min_version: 1,
            flags: umdev_pci::migration::P2P | umdev_pci::migration::PRE_COPY,
        })
    }

    fn set_running(&mut self, running: bool) -> Result<(), DeviceError> {
        if !running && self.reg32(reg::MIG_FAIL) == 1 {
            return Err(DeviceError::Io(5));
        }
        Ok(())
    }

    fn save(&mut self, w: &mut umdev_pci::StateWriter) -> Result<(), DeviceError> {
        if self.reg32(reg::MIG_FAIL) == 2 {
            return Err(DeviceError::Io(5));
        }
        let mut bar2 = vec![0u8; BAR2_SIZE as usize];
        rustix::io::pread(&*self.bar2, &mut bar2, 0)
            .map_err(|e| DeviceError::Io(e.raw_os_error()))?;
        w.bytes(1, &self.bar0).bytes(2, &self.bar1).bytes(3, &bar2);
        for p in &self.pins {
            let mut pin = p.iova().to_le_bytes().to_vec();
            pin.extend_from_slice(&(p.page_count() as u64).to_le_bytes());
            pin.push(p.prot().bits());
            w.bytes(4, &pin);
        }
        Ok(())
    }

    fn load(&mut self, version: u32, r: &umdev_pci::StateReader<'_>) -> Result<(), DeviceError> {
        use umdev_pci::StreamError;
        let sized = |tag: u16, len: u64| -> Result<Vec<u8>, DeviceError> {
            let b = r.bytes(tag)?;
            if b.len() as u64 != len {
                return Err(StreamError::BadField {
                    tag,
                    why: "wrong size",
                }
                .into());
            }
            Ok(b.to_vec())
        };
        let bar0 = sized(1, BAR0_SIZE)?;
        let bar1 = sized(2, 16)?;
        let bar2 = sized(3, BAR2_SIZE)?;
        // Version 1 had no pins; version 2 lists them, and they are pinned again here,
        // all or nothing, before anything changes.
        let mut pins = Vec::new();
        if version >= 2 {
            for pin in r.all(4) {
                let bad = || StreamError::BadField {
                    tag: 4,
                    why: "not iova, pages, prot",
                };
                if pin.len() != 17 {
                    return Err(bad().into());
                }
                let iova = u64::from_le_bytes(pin[..8].try_into().map_err(|_| bad())?);
                let pages = u64::from_le_bytes(pin[8..16].try_into().map_err(|_| bad())?);
                let prot = Prot::from_bits(pin[16]).ok_or_else(bad)?;
                let pinner = self
                    .ctx
                    .as_ref()
                    .and_then(|c| c.pins.clone())
                    .ok_or(DeviceError::Io(19))?;
                let pinned = pinner
                    .pin(iova, usize::try_from(pages).map_err(|_| bad())?, prot)
                    .map_err(|e| DeviceError::Io(e.errno()));
                match pinned {
                    Ok(p) => pins.push(p),
                    Err(e) => {
                        for p in &pins {
                            let _ = pinner.unpin(p.iova(), p.page_count());
                        }
                        return Err(e);
                    }
                }
            }
        }
        rustix::io::pwrite(&*self.bar2, &bar2, 0).map_err(|e| DeviceError::Io(e.raw_os_error()))?;
        if let Some(pinner) = self.ctx.as_ref().and_then(|c| c.pins.clone()) {
            for p in std::mem::take(&mut self.pins) {
                let _ = pinner.unpin(p.iova(), p.page_count());
            }
        }
        self.bar0 = bar0;
        self.bar1 = bar1;
        self.pins = pins;
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) {
        self.observed.unmap_hooks.lock().unwrap().push((iova, len));
        let mode = self.reg32(reg::UNMAP_MODE);
        if mode == 1 {
            return; // "forgets": keeps its pins and handles
        }
        let Some(pinner) = self.ctx.as_ref().and_then(|c| c.pins.clone()) else {
            return;
        };
        let end = iova.saturating_add(len);
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pins)
            .into_iter()
            .partition(|p| p.iova() < end && iova < p.iova() + p.len_bytes());
        self.pins = kept;
        let release = move || {
            for p in &gone {
                let _ = pinner.unpin(p.iova(), p.page_count());
            }
        };
        if mode == 2 {
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                release();
            });
        } else {
            release();
        }
    }
}
