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
//! | 0x110 | 4 | DMA command: 1 = write `seed+i` bytes to guest memory, 2 = read guest memory into the buffer at 0x800 (both on the device's work context), 3 = pin `PIN_PAGES` pages at the DMA address with `PIN_PROT`, 4 = write `seed+i` bytes at the DMA address through a pin the device holds, 5 = unpin `PIN_PAGES` pages at the DMA address, 6 = command 1 done inline, on the session thread (message-based DMA is refused there: EDEADLK) |
//! | 0x114 | 4 | DMA status: [`DMA_BUSY`] while a command runs, then 0 after success or the errno (read-only) |
//! | 0x120 | 4 | IRQ command: 0 = lower INTx, 1 = raise INTx, 2 = MSI vector at 0x124, 3 = MSI-X vector at 0x124, 4 = ERR, 5 = REQ |
//! | 0x124 | 4 | IRQ vector |
//! | 0x128 | 4 | pages to pin or unpin (command 3, 5) |
//! | 0x12c | 4 | pin access: 1 = read, 2 = write, 3 = both |
//! | 0x130 | 4 | unmap hook mode: 0 = unpin at once, 1 = forget (keep the pins: the device gets revoked), 2 = unpin from another thread 200 ms later |
//! | 0x134 | 4 | migration failure (a migratable device only): 1 = stopping fails, 2 = saving fails |
//! | 0x138 | 4 | display: 1 = BAR2's first sparse area is a 64x32 XRGB8888 scan-out ([`PciDevice::display_plane`]), 0 = off |
//! | 0x13c | 4 | misbehave (for the worker sandbox's tests): 1 = open for reading the path held NUL-terminated in scratch RAM, 2 = run `touch <that path>` through `/bin/sh`, 3 = a system call no device needs (`getppid`) |
//! | 0x140 | 4 | what misbehaving got: 0 = it worked, else the errno (read-only in effect) |
//! | 0x800..0x1000 | any | DMA buffer |
//!
//! Copies (commands 1 and 2) run on the device's work context, as every DMA a device may
//! do through messages must: a guest (or test) starts the command and polls the status until
//! it is no longer [`DMA_BUSY`]. The registers live behind a lock the hooks and the work
//! share.
//!
//! [`TestDevice::migratable_function`] serves a device that migrates (STOP_COPY, P2P,
//! PRE_COPY): its state is its BARs and the pins it holds, which it pins again on load.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use umdev_dma::{AddressSpace, Dma, DmaError, PinnedPages, Pinner, Prot, PAGE_SIZE};
use umdev_pci::{
    fourcc, BarIndex, BarKind, BarMmap, DeviceContext, DisplayPlane, Errno, IrqMode, PciDevice,
    PciDeviceSpec, PciFunction,
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
/// The DMA status while a command is still running.
pub const DMA_BUSY: u32 = u32::MAX;
/// The display's size and format (XRGB8888), at [`DISPLAY_OFFSET`] of BAR2.
pub const DISPLAY_WIDTH: u32 = 64;
/// Height of the display.
pub const DISPLAY_HEIGHT: u32 = 32;
/// Where the display's pixels start in BAR2 (its first sparse area).
pub const DISPLAY_OFFSET: u64 = 0x1000;
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
    /// Display on (1) or off (0).
    pub const DISPLAY: u64 = 0x138;
    /// Misbehave: 1 = open a path, 2 = exec, 3 = a system call no device needs.
    pub const MISBEHAVE: u64 = 0x13c;
    /// What misbehaving got: 0 or an errno.
    pub const MISBEHAVE_RESULT: u64 = 0x140;
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
    /// BAR2's memory when a live upgrade handed the device over (it is then not the
    /// memory the device was built with).
    pub bar2: Mutex<Option<Arc<OwnedFd>>>,
}

/// The registers and pins, shared by the hooks (session thread) and the work (the device's
/// work context).
struct Regs {
    bar0: Vec<u8>,
    bar1: Vec<u8>,
    /// Handles of the pins the device holds.
    pins: Vec<PinnedPages>,
}

impl Regs {
    fn reg32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.bar0[o..o + 4].try_into().unwrap_or([0; 4]))
    }

    fn set32(&mut self, off: u64, v: u32) {
        let o = off as usize;
        self.bar0[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn dma_addr(&self) -> u64 {
        let o = reg::DMA_ADDR as usize;
        u64::from_le_bytes(self.bar0[o..o + 8].try_into().unwrap_or([0; 8]))
    }
}

fn status_of(r: Result<(), DmaError>) -> u32 {
    r.map_or_else(|e| e.errno() as u32, |()| 0)
}

/// The test device.
pub struct TestDevice {
    regs: Arc<Mutex<Regs>>,
    bar2: Arc<OwnedFd>,
    ctx: Option<DeviceContext>,
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
        let (spec, dev) = Self::new(migratable);
        let observed = dev.observed.clone();
        (PciFunction::new(spec, Box::new(dev)), observed)
    }

    /// The device's PCI layout and the device, for a parent's `build`.
    pub fn new(migratable: bool) -> (PciDeviceSpec, TestDevice) {
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
        let dev = TestDevice {
            regs: Arc::new(Mutex::new(Regs {
                bar0: vec![0; BAR0_SIZE as usize],
                bar1: vec![0; 16],
                pins: Vec::new(),
            })),
            bar2: fd,
            ctx: None,
            observed: Arc::new(Observed::default()),
            migratable,
        };
        (spec, dev)
    }

    /// What tests can observe of this device.
    pub fn observed(&self) -> Arc<Observed> {
        self.observed.clone()
    }

    /// The memory behind BAR2 (its mmap-able areas).
    pub fn bar2(&self) -> Arc<OwnedFd> {
        self.bar2.clone()
    }

    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy between the DMA buffer and guest memory (command 1 or 2), on `dma`.
    fn copy(regs: &Mutex<Regs>, dma: &dyn Dma, cmd: u32) -> u32 {
        let (addr, len, seed) = {
            let r = regs.lock().unwrap_or_else(|e| e.into_inner());
            let len = (r.reg32(reg::DMA_LEN) as usize).min(2048);
            (r.dma_addr(), len, r.bar0[reg::DMA_SEED as usize])
        };
        if cmd == 2 {
            let mut buf = vec![0u8; len];
            let r = dma.read(addr, &mut buf);
            if r.is_ok() {
                let b = reg::DMA_BUF as usize;
                regs.lock().unwrap_or_else(|e| e.into_inner()).bar0[b..b + len]
                    .copy_from_slice(&buf);
            }
            status_of(r)
        } else {
            let data: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
            status_of(dma.write(addr, &data))
        }
    }

    /// Starts DMA command `cmd`; copies finish on the work context, the rest at once.
    fn run_dma(&mut self, cmd: u32) {
        let Some(ctx) = self.ctx.clone() else {
            self.regs()
                .set32(reg::DMA_STATUS, Errno::NODEV.raw_os_error() as u32);
            return;
        };
        match cmd {
            1 | 2 => {
                self.regs().set32(reg::DMA_STATUS, DMA_BUSY);
                let regs = self.regs.clone();
                let dma = ctx.dma.clone();
                let job = move || {
                    let status = Self::copy(&regs, &*dma, cmd);
                    regs.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .set32(reg::DMA_STATUS, status);
                };
                if let Err(e) = ctx.work.submit(job) {
                    self.regs().set32(reg::DMA_STATUS, e.raw_os_error() as u32);
                }
            }
            6 => {
                let status = Self::copy(&self.regs, &*ctx.dma, 1);
                self.regs().set32(reg::DMA_STATUS, status);
            }
            3..=5 => {
                let mut regs = self.regs();
                let pages = regs.reg32(reg::PIN_PAGES) as usize;
                let prot = Prot::from_bits(regs.reg32(reg::PIN_PROT) as u8).unwrap_or(Prot::NONE);
                let len = (regs.reg32(reg::DMA_LEN) as usize).min(2048);
                let seed = regs.bar0[reg::DMA_SEED as usize];
                let addr = regs.dma_addr();
                let r = match &ctx.pins {
                    None => Ok(()),
                    Some(p) => {
                        Self::pin_command(&mut regs.pins, p, cmd, addr, pages, prot, len, seed)
                    }
                };
                regs.set32(reg::DMA_STATUS, status_of(r));
            }
            _ => self.regs().set32(reg::DMA_STATUS, 0),
        }
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

    /// What a device outside its sandbox would do (register [`reg::MISBEHAVE`]).
    fn misbehave(&self, cmd: u32) -> u32 {
        let path = {
            let r = self.regs();
            let scratch = &r.bar0[..0x100];
            let end = scratch
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(scratch.len());
            String::from_utf8_lossy(&scratch[..end]).into_owned()
        };
        let errno = |e: std::io::Error| e.raw_os_error().map_or(u32::MAX, |n| n as u32);
        match cmd {
            1 => std::fs::File::open(&path).map_or_else(errno, |_| 0),
            2 => std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("touch '{path}'"))
                .status()
                .map_or_else(errno, |s| if s.success() { 0 } else { u32::MAX }),
            3 => {
                let _ = rustix::process::getppid();
                0
            }
            _ => Errno::INVAL.raw_os_error() as u32,
        }
    }

    fn run_irq(&mut self, cmd: u32) {
        let vector = self.regs().reg32(reg::IRQ_VECTOR);
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

/// A fresh memfd with `old`'s BAR2 contents.
fn renewed(old: &OwnedFd) -> Result<OwnedFd, Errno> {
    let fd = rustix::fs::memfd_create("umdev-test-bar2", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, BAR2_SIZE)?;
    let mut buf = vec![0u8; BAR2_SIZE as usize];
    rustix::io::pread(old, &mut buf, 0)?;
    rustix::io::pwrite(&fd, &buf, 0)?;
    Ok(fd)
}

fn range(len: usize, off: u64, n: usize) -> Result<std::ops::Range<usize>, Errno> {
    let start = usize::try_from(off).map_err(|_| Errno::INVAL)?;
    let end = start
        .checked_add(n)
        .filter(|e| *e <= len)
        .ok_or(Errno::INVAL)?;
    Ok(start..end)
}

impl PciDevice for TestDevice {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.observed
            .accesses
            .lock()
            .unwrap()
            .push((bar.get(), offset, data.len(), false));
        match bar.get() {
            0 => {
                let r = self.regs();
                data.copy_from_slice(&r.bar0[range(r.bar0.len(), offset, data.len())?]);
            }
            1 => {
                let r = self.regs();
                data.copy_from_slice(&r.bar1[range(r.bar1.len(), offset, data.len())?]);
            }
            2 => {
                rustix::io::pread(&*self.bar2, data, offset)?;
            }
            _ => data.fill(0),
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
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
                {
                    let mut r = self.regs();
                    let rg = range(r.bar0.len(), offset, data.len())?;
                    r.bar0[rg].copy_from_slice(data);
                }
                if offset == reg::DMA_CMD && data.len() == 4 {
                    let cmd = self.regs().reg32(reg::DMA_CMD);
                    self.run_dma(cmd);
                } else if offset == reg::IRQ_CMD && data.len() == 4 {
                    let cmd = self.regs().reg32(reg::IRQ_CMD);
                    self.run_irq(cmd);
                } else if offset == reg::MISBEHAVE && data.len() == 4 {
                    let cmd = self.regs().reg32(reg::MISBEHAVE);
                    let got = self.misbehave(cmd);
                    self.regs().set32(reg::MISBEHAVE_RESULT, got);
                }
            }
            1 => {
                let mut r = self.regs();
                let rg = range(r.bar1.len(), offset, data.len())?;
                r.bar1[rg].copy_from_slice(data);
            }
            2 => {
                rustix::io::pwrite(&*self.bar2, data, offset)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.observed.resets.fetch_add(1, Ordering::SeqCst);
        self.regs().bar0.fill(0);
        Ok(())
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), Errno> {
        if self.observed.refuse_open.load(Ordering::SeqCst) {
            return Err(Errno::BUSY);
        }
        self.observed.opens.fetch_add(1, Ordering::SeqCst);
        if let Some(p) = &ctx.pins {
            *self.observed.space.lock().unwrap() = Some(p.space().clone());
            *self.observed.pinner.lock().unwrap() = Arc::downgrade(p);
        }
        self.regs().pins.clear();
        self.ctx = Some(ctx);
        Ok(())
    }

    fn close(&mut self) {
        self.observed.closes.fetch_add(1, Ordering::SeqCst);
        // Dropping the context drops the pinner, which releases what the device still pins.
        self.regs().pins.clear();
        self.ctx = None;
        // BAR2's contents move to a fresh memory object: the gone client may have kept the
        // fd (or a mapping) of this one, which must reach nothing of the next client's.
        match renewed(&self.bar2) {
            Ok(fd) => {
                self.bar2 = Arc::new(fd);
                *self.observed.bar2.lock().unwrap() = Some(self.bar2.clone());
            }
            Err(e) => tracing::error!(error = %e, "test device: cannot renew BAR2's memory"),
        }
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

    fn set_running(&mut self, running: bool) -> Result<(), Errno> {
        if !running && self.regs().reg32(reg::MIG_FAIL) == 1 {
            return Err(Errno::IO);
        }
        Ok(())
    }

    fn save(&mut self, w: &mut umdev_pci::StateWriter) -> Result<(), Errno> {
        let r = self.regs();
        if r.reg32(reg::MIG_FAIL) == 2 {
            return Err(Errno::IO);
        }
        let mut bar2 = vec![0u8; BAR2_SIZE as usize];
        rustix::io::pread(&*self.bar2, &mut bar2, 0)?;
        w.bytes(1, &r.bar0).bytes(2, &r.bar1).bytes(3, &bar2);
        for p in &r.pins {
            let mut pin = p.iova().to_le_bytes().to_vec();
            pin.extend_from_slice(&(p.page_count() as u64).to_le_bytes());
            pin.push(p.prot().bits());
            w.bytes(4, &pin);
        }
        Ok(())
    }

    fn load(&mut self, version: u32, r: &umdev_pci::StateReader<'_>) -> Result<(), Errno> {
        use umdev_pci::StreamError;
        let sized = |tag: u16, len: u64| -> Result<Vec<u8>, Errno> {
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
                    .ok_or(Errno::NODEV)?;
                let pinned = pinner
                    .pin(iova, usize::try_from(pages).map_err(|_| bad())?, prot)
                    .map_err(|e| Errno::from_raw_os_error(e.errno()));
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
        rustix::io::pwrite(&*self.bar2, &bar2, 0)?;
        let pinner = self.ctx.as_ref().and_then(|c| c.pins.clone());
        let mut regs = self.regs();
        if let Some(pinner) = pinner {
            for p in std::mem::take(&mut regs.pins) {
                let _ = pinner.unpin(p.iova(), p.page_count());
            }
        }
        regs.bar0 = bar0;
        regs.bar1 = bar1;
        regs.pins = pins;
        Ok(())
    }

    /// BAR2's memory object: the spec's, or the one a live upgrade handed over.
    fn bar_memory(&self, bar: BarIndex) -> Option<Arc<OwnedFd>> {
        (bar.get() == 2).then(|| self.bar2.clone())
    }

    /// A live upgrade: the migration state (registers, BAR2's contents, pins) and BAR2's
    /// memory object, which the client has mapped.
    fn hand_over(
        &mut self,
        w: &mut umdev_pci::StateWriter,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), Errno> {
        self.save(w)?;
        let fd = self.bar2.try_clone().map_err(|_| Errno::IO)?;
        w.u32(5, umdev_pci::push_fd(fds, fd));
        // What the vendor attributes count: the BAR2 accesses seen so far.
        for (bar, off, len, write) in self.observed.accesses.lock().unwrap().iter() {
            if *bar == 2 {
                let mut a = off.to_le_bytes().to_vec();
                a.extend_from_slice(&(*len as u64).to_le_bytes());
                a.push(u8::from(*write));
                w.bytes(6, &a);
            }
        }
        Ok(())
    }

    fn take_over(
        &mut self,
        r: &umdev_pci::StateReader<'_>,
        fds: &mut umdev_pci::HandedFds,
    ) -> Result<(), Errno> {
        self.bar2 = Arc::new(fds.take(r.u32(5)?)?);
        *self.observed.bar2.lock().unwrap() = Some(self.bar2.clone());
        let mut seen = Vec::new();
        for a in r.all(6) {
            let field = |at: usize| {
                a.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or(Errno::INVAL)
            };
            let len = usize::try_from(field(8)?).map_err(|_| Errno::INVAL)?;
            seen.push((2u8, field(0)?, len, a.get(16) == Some(&1)));
        }
        self.observed.accesses.lock().unwrap().splice(0..0, seen);
        self.load(TEST_STATE_VERSION, r)
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) {
        self.observed.unmap_hooks.lock().unwrap().push((iova, len));
        let mode = self.regs().reg32(reg::UNMAP_MODE);
        if mode == 1 {
            return; // "forgets": keeps its pins and handles
        }
        let Some(pinner) = self.ctx.as_ref().and_then(|c| c.pins.clone()) else {
            return;
        };
        let end = iova.saturating_add(len);
        let (gone, kept): (Vec<_>, Vec<_>) = {
            let mut regs = self.regs();
            std::mem::take(&mut regs.pins)
                .into_iter()
                .partition(|p| p.iova() < end && iova < p.iova() + p.len_bytes())
        };
        self.regs().pins = kept;
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

    fn display_plane(&mut self) -> Result<DisplayPlane, Errno> {
        if self.regs().reg32(reg::DISPLAY) != 1 {
            return Err(Errno::NODATA);
        }
        Ok(DisplayPlane {
            fourcc: fourcc(*b"XR24"),
            width: DISPLAY_WIDTH,
            height: DISPLAY_HEIGHT,
            stride: DISPLAY_WIDTH * 4,
            offset: DISPLAY_OFFSET,
            memory: self.bar2.clone(),
        })
    }
}
