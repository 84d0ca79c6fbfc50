//! A served PCI function: the framework's config space, MSI-X table and interrupts around a
//! device that only implements its BARs.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::io::Errno;
use umdev_dma::{Dma, Pinner};

use crate::client::ClientId;
use crate::config::ConfigSpace;
use crate::error::DeviceError;
use crate::interrupts::{Interrupts, IrqData, IrqMode, IrqState, IRQ_SET_ACTION_UNMASK};
use crate::io_fds::{IoFdArea, IoFdSpec, Watcher};
use crate::migration::{GatedDma, Migration, MigrationSpec};
use crate::spec::{ranges_overlap, PciDeviceSpec};
use crate::state_format::{StateReader, StateWriter};
use crate::work::{Pump, Work};
use crate::{BarIndex, IrqIndex, CONFIG_REGION, NUM_IRQS, NUM_REGIONS, ROM_REGION, VGA_REGION};

pub use umdev_proto::wire::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};

/// What a device implements: its BARs, and optional hooks with defaults.
///
/// # Threads and locks
///
/// Every hook runs on the session thread of the device's server, one request at a time:
/// the server holds the function's lock (its `Mutex<PciFunction>`) across each client
/// request, so no two hooks of one device ever run at once and none needs a lock of its own
/// against another hook. No lock of the mdev core is held while a hook runs. The client is
/// waiting for the reply meanwhile, so a hook should be quick; anything slow, and all DMA
/// that may go through messages, belongs on the device's work context
/// ([`DeviceContext::work`]): message-based DMA requested on the session thread is refused
/// with EDEADLK, because the client (QEMU) serves DMA messages from the very loop that is
/// waiting for this request's reply.
///
/// Accesses reach the device with the client's offset and size unchanged, already
/// bounds-checked against the BAR; accesses to an emulated MSI-X table or PBA never do.
/// Every error is an [`Errno`], which the client receives in the error reply.
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes at `offset` of BAR `bar`.
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno>;
    /// Writes `data` at `offset` of BAR `bar`.
    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno>;
    /// Device reset (after the framework has reset config space and interrupts). Only
    /// called when the spec declares reset support; otherwise DEVICE_RESET is refused with
    /// EINVAL, as GET_INFO does not offer it.
    fn reset(&mut self) -> Result<(), Errno> {
        Ok(())
    }
    /// A client attaches (after the framework's checks, such as the IOMMU group's owner);
    /// the device may refuse with an errno, which fails the client's VERSION.
    fn open(&mut self, _ctx: DeviceContext) -> Result<(), Errno> {
        Ok(())
    }
    /// The client has gone: its eventfds are dropped and the work context drained (no job
    /// runs any more); its DMA mappings are removed right after. The device keeps its
    /// state for the next client.
    fn close(&mut self) {}
    /// The client switched the interrupt mode through SET_IRQS.
    fn irq_mode_changed(&mut self, _mode: IrqMode) {}
    /// The client is unmasking INTx (its guest has serviced the interrupt). Called before
    /// the line is unmasked, so a device whose level follows state it learns without an
    /// access (a register the guest writes into its own memory, as NVMe's shadow doorbells)
    /// sets it right first: a line left asserted is signalled again at once.
    fn intx_unmasking(&mut self) {}
    /// The client is unmapping `[iova, iova + len)`, which this device has pinned pages of:
    /// unpin them ([`DeviceContext::pins`]), now or from another thread soon after. The
    /// unmap's reply waits for that, up to the server's `unpin_timeout`, and for the work
    /// context to drain; a device that keeps its pins past the timeout is revoked (see
    /// `umdev_dma::Unmapping`). Devices that never pin need not implement it.
    fn dma_unmap(&mut self, _iova: u64, _len: u64) {}
    /// Whether and how the device migrates; `None` (the default) means not migratable, and
    /// the migration features answer ENOTSUP. Asked once, when the function is built.
    fn migration(&self) -> Option<MigrationSpec> {
        None
    }
    /// The device stops (`false`: entering STOP, STOP_COPY, RESUMING) or runs again (`true`).
    /// Before a stop the work context is drained and then held (work submitted while
    /// stopped runs after the device runs again). A stopped device changes no state of its
    /// own and takes no host input; the framework already refuses its BAR accesses, holds
    /// its interrupts and refuses its DMA writes (pinned pages excepted: the device must not
    /// write through them). An error puts the function in ERROR.
    fn set_running(&mut self, _running: bool) -> Result<(), Errno> {
        Ok(())
    }
    /// Writes the device's state: when PRE_COPY begins (still running: a snapshot) and at
    /// STOP_COPY (stopped: the state that is loaded). An error puts the function in ERROR.
    fn save(&mut self, _state: &mut StateWriter) -> Result<(), Errno> {
        Err(Errno::NOTSUP)
    }
    /// A device with bulk data (a disk's blocks) streams it in chunks: asked while saving
    /// (PRE_COPY and STOP_COPY) whenever the stream runs dry, it writes one chunk of about
    /// `budget` bytes into `chunk` and returns `true`, or `false` when it has nothing more
    /// for now (at STOP_COPY: for good; the final state follows). `first` starts a saving
    /// session: send everything again and track what changes from here. None by default.
    fn save_chunk(
        &mut self,
        _first: bool,
        _budget: usize,
        _chunk: &mut StateWriter,
    ) -> Result<bool, Errno> {
        Ok(false)
    }
    /// A chunk `save_chunk` wrote, on the destination (RESUMING), as it arrives. The final
    /// state comes after the last chunk.
    fn load_chunk(&mut self, _version: u32, _chunk: &StateReader<'_>) -> Result<(), Errno> {
        Err(Errno::NOTSUP)
    }
    /// Bytes of bulk data still to send (for pre-copy sizing).
    fn data_pending(&self) -> u64 {
        0
    }
    /// Replaces the device's state by one `save` wrote with state `version` (between the
    /// spec's `min_version` and `version`; the stream is already checked). All or nothing:
    /// validate every field first; on error the device must be as it was.
    fn load(&mut self, _version: u32, _state: &StateReader<'_>) -> Result<(), Errno> {
        Err(Errno::NOTSUP)
    }
    /// The memory a client maps for BAR `bar` (declared mmap-able in the spec), if not the
    /// spec's: a device that gives each client a memory object of its own (so a client
    /// that has gone, still holding its mapping, cannot reach the next one's) returns the
    /// current one. Asked at every GET_REGION_INFO; `None` (the default) keeps the spec's.
    fn bar_memory(&self, _bar: BarIndex) -> Option<Arc<OwnedFd>> {
        None
    }
    /// Spans of BAR `bar` a client may write through ioeventfds
    /// (DEVICE_GET_REGION_IO_FDS), each with what to call when it is signalled; asked each
    /// time a client asks. None by default. See [`crate::io_fds`].
    fn io_fds(&mut self, _bar: BarIndex) -> Vec<IoFdSpec> {
        Vec::new()
    }
    /// A display device's current scan-out (modelled on VFIO's
    /// `VFIO_DEVICE_QUERY_GFX_PLANE`), for screenshots and remote displays. ENOTSUP (the
    /// default) for a device that is not a display; ENODATA while the display is disabled.
    fn display_plane(&mut self) -> Result<DisplayPlane, Errno> {
        Err(Errno::NOTSUP)
    }
    /// Live upgrade, the old process: writes everything the device needs to go on in
    /// another process: its registers and queues into `state`, and the fds that must stay
    /// the same objects into `fds` ([`push_fd`](crate::push_fd) gives the index to write in
    /// `state`): memory a client has mapped (a BAR's memfd), host-side connections (a
    /// console's socket, a listening socket), a backing file if reopening it would differ.
    /// Called paused (stopped, work drained and held) on the session thread, possibly
    /// without a client; duplicate what you hand over, the device may have to run on if the
    /// new process fails. ENOTSUP (the default) refuses the upgrade for this device.
    fn hand_over(
        &mut self,
        _state: &mut StateWriter,
        _fds: &mut Vec<OwnedFd>,
    ) -> Result<(), Errno> {
        Err(Errno::NOTSUP)
    }
    /// Live upgrade, the new process: the device was just built from the same description
    /// and, if the old one had a client, opened for it (with its DMA mappings in place);
    /// take the state `hand_over` wrote (the fds by index). It runs again after
    /// `set_running(true)`. Where it waits on fds of its own (an ioeventfd, a poller), it
    /// should check once on resume: a signal may have been taken by the old process.
    fn take_over(
        &mut self,
        _state: &StateReader<'_>,
        _fds: &mut crate::HandedFds,
    ) -> Result<(), Errno> {
        Err(Errno::NOTSUP)
    }
}

/// A display's current scan-out: where its pixels are and how to read them.
#[derive(Clone, Debug)]
pub struct DisplayPlane {
    /// Pixel format as a DRM fourcc code (`XR24` is `DRM_FORMAT_XRGB8888`).
    pub fourcc: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes from one line to the next.
    pub stride: u32,
    /// Offset of the first visible pixel in `memory`.
    pub offset: u64,
    /// The memory holding the pixels (a memfd the device owns; read it, never write).
    pub memory: Arc<OwnedFd>,
}

/// The DRM fourcc code of a format name (`fourcc(*b"XR24")`).
pub const fn fourcc(code: [u8; 4]) -> u32 {
    u32::from_le_bytes(code)
}

/// Cross-cutting checks the framework makes around a device's `open` and `close`, outside
/// the device: the mdev core uses it to enforce one client per IOMMU group. `acquire` runs
/// before the device's `open` (an error refuses the client and the device is never told);
/// `release` runs after the device's `close`, or after a refused `open`.
pub trait OpenGuard: Send + Sync {
    /// Client `client` wants to open the device.
    fn acquire(&self, client: &ClientId) -> Result<(), Errno>;
    /// The client that was admitted has gone.
    fn release(&self);
}

/// What a device gets when a client attaches.
#[derive(Clone)]
pub struct DeviceContext {
    /// The function's interrupts; keep the handle to raise interrupts later.
    pub irqs: Interrupts,
    /// Copies to and from the client's memory. From the session thread (inside a hook),
    /// only fd-backed memory can be reached; use [`work`](Self::work) for the rest.
    pub dma: Arc<dyn Dma>,
    /// Who the client is (filled by the server from the socket peer).
    pub client: ClientId,
    /// Pinning of the client's pages for this device (`None` when the front-end offers no
    /// pinning). Dropping the last handle releases the device's pins.
    pub pins: Option<Arc<Pinner>>,
    /// The device's work context: a thread of its own for DMA and slow work, kept in step
    /// with the client by the framework (see [`Work`]).
    pub work: Work,
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext")
            .field("irqs", &self.irqs)
            .field("client", &self.client)
            .field("work", &self.work)
            .finish_non_exhaustive()
    }
}

/// Answer to DEVICE_GET_INFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// [`DEVICE_FLAGS_RESET`] | [`DEVICE_FLAGS_PCI`].
    pub flags: u32,
    /// Always [`NUM_REGIONS`].
    pub num_regions: u32,
    /// Always [`NUM_IRQS`].
    pub num_irqs: u32,
}

/// A mappable file behind a region.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file to map.
    pub fd: Arc<OwnedFd>,
    /// Offset of the region's first byte within the file.
    pub offset: u64,
    /// Sparse `(offset, size)` areas within the region; empty means the whole region.
    pub areas: Vec<(u64, u64)>,
}

/// Answer to GET_REGION_INFO.
#[derive(Clone, Debug)]
pub struct RegionInfo {
    /// Size in bytes; 0 for an absent region.
    pub size: u64,
    /// `REGION_INFO_FLAG_*` bits; 0 for an absent region.
    pub flags: u32,
    /// The file to mmap, when [`REGION_INFO_FLAG_MMAP`] is set.
    pub mmap: Option<RegionMmap>,
}

/// Answer to GET_IRQ_INFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of vectors.
    pub count: u32,
    /// `IRQ_INFO_*` bits.
    pub flags: u32,
}

/// Where a BAR access goes.
enum Target {
    Device(BarIndex),
    MsixTable(usize),
    MsixPba(usize),
}

/// One PCI function served to a client: spec, config space, interrupts and the device.
pub struct PciFunction {
    spec: PciDeviceSpec,
    pub(crate) config: ConfigSpace,
    pub(crate) irqs: Interrupts,
    pub(crate) device: Box<dyn PciDevice>,
    pub(crate) mig: Migration,
    pub(crate) work: Work,
    guard: Option<Arc<dyn OpenGuard>>,
    /// A client is admitted (the guard acquired, the device opened).
    pub(crate) open: bool,
    /// The ioeventfds handed out, by region.
    pub(crate) io_fds: BTreeMap<u32, Watcher>,
    /// The ioeventfds of a paused function (not watched), by region.
    pub(crate) paused_io_fds: BTreeMap<u32, Vec<IoFdArea>>,
}

impl std::fmt::Debug for PciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciFunction")
            .field("spec", &self.spec)
            .field("irqs", &self.irqs)
            .finish_non_exhaustive()
    }
}

impl PciFunction {
    /// Serves `device` as described by `spec`, with config space at power-on values.
    pub fn new(spec: PciDeviceSpec, device: Box<dyn PciDevice>) -> Self {
        let intx = u32::from(spec.interrupt_pin() != 0);
        let msi = spec.msi().map_or(0, |m| m.vectors);
        let msix = spec.msix().map_or(0, |m| m.vectors);
        let work = Work::new("umdev-work", spec.work_threads());
        Self {
            config: ConfigSpace::new(&spec),
            irqs: Interrupts::new([intx, msi, msix, 1, 1]),
            spec,
            mig: Migration::new(device.migration()),
            device,
            work,
            guard: None,
            open: false,
            io_fds: BTreeMap::new(),
            paused_io_fds: BTreeMap::new(),
        }
    }

    /// Runs `guard`'s checks around every `open` and `close` of the device.
    pub fn with_guard(mut self, guard: Arc<dyn OpenGuard>) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Sets what the session thread does while it waits for the device's work context
    /// (the server pumps the client's replies to the device's DMA requests); `None` waits
    /// without pumping.
    pub fn set_pump(&mut self, pump: Option<Pump>) {
        self.work.set_pump(pump);
    }

    /// The device's work context.
    pub fn work(&self) -> &Work {
        &self.work
    }

    /// The spec the function was built from.
    pub fn spec(&self) -> &PciDeviceSpec {
        &self.spec
    }

    /// A handle to the function's interrupts.
    pub fn interrupts(&self) -> Interrupts {
        self.irqs.clone()
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&self) -> DeviceInfo {
        let reset = if self.spec.reset_supported() {
            DEVICE_FLAGS_RESET
        } else {
            0
        };
        DeviceInfo {
            flags: reset | DEVICE_FLAGS_PCI,
            num_regions: NUM_REGIONS,
            num_irqs: NUM_IRQS,
        }
    }

    /// GET_REGION_INFO: EINVAL past [`NUM_REGIONS`]; absent BARs, ROM and VGA have size 0.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, DeviceError> {
        let rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
        let absent = RegionInfo {
            size: 0,
            flags: 0,
            mmap: None,
        };
        match index {
            CONFIG_REGION => Ok(RegionInfo {
                size: self.spec.config_size(),
                flags: rw,
                mmap: None,
            }),
            ROM_REGION | VGA_REGION => Ok(absent),
            i if i >= NUM_REGIONS => Err(DeviceError::InvalidRegion(i)),
            i => {
                let Some(bar) = u8::try_from(i).ok().and_then(|i| self.spec.bar(i)) else {
                    return Ok(absent);
                };
                let own = BarIndex::new(u8::try_from(i).unwrap_or(u8::MAX))
                    .and_then(|b| self.device.bar_memory(b));
                let mmap = bar.mmap.as_ref().map(|m| RegionMmap {
                    fd: own.unwrap_or_else(|| Arc::clone(&m.fd)),
                    offset: m.offset,
                    areas: m.areas.clone(),
                });
                let flags = rw
                    | if mmap.is_some() {
                        REGION_INFO_FLAG_MMAP
                    } else {
                        0
                    };
                Ok(RegionInfo {
                    size: bar.size,
                    flags,
                    mmap,
                })
            }
        }
    }

    /// GET_IRQ_INFO: EINVAL past [`NUM_IRQS`].
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, DeviceError> {
        let idx = IrqIndex::try_from(index).map_err(|_| DeviceError::InvalidIrqIndex(index))?;
        let count = self.irqs.lock().count(idx);
        let flags = match idx {
            IrqIndex::Intx => IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
            IrqIndex::Msi | IrqIndex::Msix => IRQ_INFO_EVENTFD | IRQ_INFO_NORESIZE,
            IrqIndex::Err | IrqIndex::Req => IRQ_INFO_EVENTFD,
        };
        Ok(IrqInfo { count, flags })
    }

    fn region_size(&self, index: u32) -> Result<u64, DeviceError> {
        self.region_info(index).map(|info| info.size)
    }

    /// Checks `offset + len` against the region; returns the offset as `usize` too.
    fn check(&self, index: u32, offset: u64, len: usize) -> Result<(), DeviceError> {
        let size = self.region_size(index)?;
        let len = u64::try_from(len).unwrap_or(u64::MAX);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DeviceError::OutOfBounds {
                region: index,
                offset,
                len,
                size,
            }),
        }
    }

    /// Decides whether a BAR access hits the emulated MSI-X structures.
    fn route(&self, index: u32, offset: u64, len: usize) -> Result<Target, DeviceError> {
        let bar = u8::try_from(index)
            .ok()
            .and_then(BarIndex::new)
            .ok_or(DeviceError::InvalidRegion(index))?;
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        if let Some(m) = self.spec.msix() {
            let structures = [
                (m.table_bar, u64::from(m.table_offset), m.table_size(), true),
                (m.pba_bar, u64::from(m.pba_offset), m.pba_size(), false),
            ];
            for (sbar, start, size, is_table) in structures {
                if sbar != bar.get() || !ranges_overlap(offset, len64, start, size) {
                    continue;
                }
                if offset < start || offset.saturating_add(len64) > start.saturating_add(size) {
                    return Err(DeviceError::StraddlesMsix {
                        region: index,
                        offset,
                        len: len64,
                    });
                }
                let rel = usize::try_from(offset - start).unwrap_or(usize::MAX);
                return Ok(if is_table {
                    Target::MsixTable(rel)
                } else {
                    Target::MsixPba(rel)
                });
            }
        }
        Ok(Target::Device(bar))
    }

    /// REGION_READ of any size within bounds; EINVAL past the end.
    pub fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.check(index, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if index == CONFIG_REGION {
            let off = usize::try_from(offset).unwrap_or(usize::MAX);
            self.config.read(off, data, &self.irqs);
            return Ok(());
        }
        match self.route(index, offset, data.len())? {
            Target::Device(bar) => {
                self.mig.check_access()?;
                Ok(self.device.bar_read(bar, offset, data)?)
            }
            Target::MsixTable(rel) => {
                self.irqs.lock().msix.read_table(rel, data);
                Ok(())
            }
            Target::MsixPba(rel) => {
                self.irqs.lock().msix.read_pba(rel, data);
                Ok(())
            }
        }
    }

    /// REGION_WRITE of any size within bounds; EINVAL past the end.
    pub fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DeviceError> {
        self.check(index, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if index == CONFIG_REGION {
            let off = usize::try_from(offset).unwrap_or(usize::MAX);
            self.config.write(off, data, &self.irqs);
            return Ok(());
        }
        match self.route(index, offset, data.len())? {
            Target::Device(bar) => {
                self.mig.check_access()?;
                Ok(self.device.bar_write(bar, offset, data)?)
            }
            Target::MsixTable(rel) => {
                let mut s = self.irqs.lock();
                if !s.msix.write_table(rel, data).is_empty() {
                    s.msix_deliver_pending();
                }
                Ok(())
            }
            // The PBA is read-only.
            Target::MsixPba(_) => Ok(()),
        }
    }

    /// SET_IRQS, with the kernel vfio-pci's validation; tells the device when the mode changes.
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<(), DeviceError> {
        if index == IrqIndex::Intx as u32 && flags & IRQ_SET_ACTION_UNMASK != 0 {
            self.device.intx_unmasking();
        }
        let changed = IrqState::set_irqs(&mut self.irqs.lock(), index, flags, start, count, data)?;
        if let Some(mode) = changed {
            self.device.irq_mode_changed(mode);
        }
        Ok(())
    }

    /// DEVICE_RESET: config space and emulated interrupt state to power-on values (the
    /// client's eventfds and the interrupt mode stay), then the device's own reset; a
    /// migratable function returns to RUNNING from any state, ERROR included. EINVAL for a
    /// device whose spec declares no reset (GET_INFO does not offer it).
    pub fn reset(&mut self) -> Result<(), DeviceError> {
        if !self.spec.reset_supported() {
            return Err(DeviceError::Device(Errno::INVAL));
        }
        self.config.reset();
        self.irqs.lock().reset();
        self.device.reset()?;
        self.migration_reset()
    }

    /// A client attaches; the device may refuse. The client is unknown
    /// ([`ClientId::default`]); servers use [`open_as`](Self::open_as).
    pub fn open(&mut self, dma: Arc<dyn Dma>) -> Result<(), DeviceError> {
        self.open_as(dma, ClientId::default())
    }

    /// Client `client` attaches; the device may refuse.
    pub fn open_as(&mut self, dma: Arc<dyn Dma>, client: ClientId) -> Result<(), DeviceError> {
        self.open_with_pins(dma, client, None)
    }

    /// Client `client` attaches, and the device may pin its pages through `pins`. The
    /// guard's `acquire` comes first; if it or the device refuses, nothing stays open.
    pub fn open_with_pins(
        &mut self,
        dma: Arc<dyn Dma>,
        client: ClientId,
        pins: Option<Arc<Pinner>>,
    ) -> Result<(), DeviceError> {
        if self.open {
            return Err(DeviceError::Device(Errno::BUSY));
        }
        if let Some(g) = &self.guard {
            g.acquire(&client)?;
        }
        let r = self.open_admitted(dma, client, pins);
        if r.is_err() {
            if let Some(g) = &self.guard {
                g.release();
            }
        }
        r
    }

    /// Opens the device for a client the guard has admitted (or that was admitted by the
    /// process this function was handed over from).
    pub(crate) fn open_admitted(
        &mut self,
        dma: Arc<dyn Dma>,
        client: ClientId,
        pins: Option<Arc<Pinner>>,
    ) -> Result<(), DeviceError> {
        // A migratable device's DMA writes are refused while it is stopped.
        let dma: Arc<dyn Dma> = if self.mig.spec().is_some() {
            Arc::new(GatedDma::new(dma, self.mig.stopped_flag()))
        } else {
            dma
        };
        self.work.open();
        let ctx = DeviceContext {
            irqs: self.irqs.clone(),
            dma,
            client,
            pins,
            work: self.work.clone(),
        };
        if let Err(e) = self.device.open(ctx) {
            self.work.close();
            return Err(e.into());
        }
        self.open = true;
        Ok(())
    }

    /// The client is unmapping `[iova, iova + len)` that the device has pins in: tells the
    /// device ([`PciDevice::dma_unmap`]).
    pub fn dma_unmap(&mut self, iova: u64, len: u64) {
        self.device.dma_unmap(iova, len);
    }

    /// Waits until the device's work context has nothing running or queued (held work of
    /// a stopped device excepted): the server calls it before answering a DMA_UNMAP.
    pub fn drain_work(&self) {
        self.work.wait_idle();
    }

    /// DEVICE_GET_REGION_IO_FDS: the device's ioeventfd spans of region `index` with a
    /// fresh eventfd each, watched from now on (those handed out before for the region are
    /// dropped). Empty for regions that are not BARs or that the device offers none of.
    /// EINVAL past [`NUM_REGIONS`], or for a span the device placed outside its BAR.
    pub fn region_io_fds(&mut self, index: u32) -> Result<Vec<IoFdArea>, DeviceError> {
        if index >= NUM_REGIONS {
            return Err(DeviceError::InvalidRegion(index));
        }
        self.io_fds.remove(&index);
        let Some((bar, spec)) = u8::try_from(index)
            .ok()
            .and_then(|i| Some((BarIndex::new(i)?, self.spec.bar(i)?)))
        else {
            return Ok(Vec::new());
        };
        let specs = self.device.io_fds(bar);
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let bad = specs.iter().find(|s| {
            !matches!(s.size, 0 | 1 | 2 | 4 | 8)
                || s.offset
                    .checked_add(s.size)
                    .is_none_or(|end| end > spec.size)
        });
        if let Some(s) = bad {
            tracing::error!(
                region = index,
                ?s,
                "the device offers an ioeventfd span outside its BAR"
            );
            return Err(DeviceError::Device(Errno::INVAL));
        }
        let n = specs.len();
        let (watcher, areas) =
            Watcher::start(&format!("umdev-bar{index}"), specs).map_err(DeviceError::Device)?;
        self.io_fds.insert(index, watcher);
        tracing::info!(region = index, spans = n, "ioeventfds handed out");
        Ok(areas)
    }

    /// A display device's current scan-out ([`PciDevice::display_plane`]).
    pub fn display_plane(&mut self) -> Result<DisplayPlane, DeviceError> {
        Ok(self.device.display_plane()?)
    }

    /// The client has gone: the work context is drained and closed, the client's eventfds
    /// are dropped, the mode returns to INTx, the device is told, and last the guard.
    pub fn close(&mut self) {
        if self.close_device() {
            if let Some(g) = &self.guard {
                g.release();
            }
        }
    }

    /// `close` but for the guard's release (a refused take-over: the client's hold is the
    /// process's it was handed from). Whether the device was open.
    pub(crate) fn close_device(&mut self) -> bool {
        if !self.open {
            return false;
        }
        self.open = false;
        // No more notifications: the watchers stop before the work context closes.
        self.io_fds.clear();
        self.paused_io_fds.clear();
        self.work.close();
        let old = self.irqs.lock().close();
        if old != IrqMode::Intx {
            self.device.irq_mode_changed(IrqMode::Intx);
        }
        self.migration_client_gone();
        self.device.close();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handover::{Admitted, HandOver, HandedFds};
    use crate::interrupts::{IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE};
    use crate::spec::BarKind;
    use rustix::event::{eventfd, EventfdFlags};
    use std::sync::Mutex;

    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        Read(u8, u64, usize),
        Write(u8, u64, Vec<u8>),
        Reset,
        Open,
        Close,
        Mode(IrqMode),
    }

    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<Call>>>,
        refuse_open: Option<Errno>,
        /// Hand-overs are taken unless this is set.
        refuse_take_over: Option<Errno>,
    }

    impl Recorder {
        fn take(&self) -> Vec<Call> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
        fn push(&self, c: Call) {
            self.calls.lock().unwrap().push(c);
        }
    }

    impl PciDevice for Recorder {
        fn bar_read(&mut self, bar: BarIndex, off: u64, data: &mut [u8]) -> Result<(), Errno> {
            data.fill(0xa5);
            self.push(Call::Read(bar.get(), off, data.len()));
            Ok(())
        }
        fn bar_write(&mut self, bar: BarIndex, off: u64, data: &[u8]) -> Result<(), Errno> {
            self.push(Call::Write(bar.get(), off, data.to_vec()));
            Ok(())
        }
        fn reset(&mut self) -> Result<(), Errno> {
            self.push(Call::Reset);
            Ok(())
        }
        fn open(&mut self, _ctx: DeviceContext) -> Result<(), Errno> {
            self.push(Call::Open);
            self.refuse_open.map_or(Ok(()), Err)
        }
        fn close(&mut self) {
            self.push(Call::Close);
        }
        fn irq_mode_changed(&mut self, mode: IrqMode) {
            self.push(Call::Mode(mode));
        }
        fn hand_over(&mut self, _: &mut StateWriter, _: &mut Vec<OwnedFd>) -> Result<(), Errno> {
            Ok(())
        }
        fn take_over(&mut self, _: &StateReader<'_>, _: &mut HandedFds) -> Result<(), Errno> {
            self.refuse_take_over.map_or(Ok(()), Err)
        }
    }

    /// Counts the guard's calls.
    #[derive(Default)]
    struct Counted {
        acquired: std::sync::atomic::AtomicU32,
        released: std::sync::atomic::AtomicU32,
    }

    impl OpenGuard for Counted {
        fn acquire(&self, _: &ClientId) -> Result<(), Errno> {
            self.acquired
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn release(&self) {
            self.released
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A function with a client, MSI-X on with an eventfd, BAR2 at an address and memory
    /// decoding on, paused and handed over.
    fn handed_over() -> HandOver {
        let (mut f, _) = function();
        f.open(Arc::new(NoDma)).unwrap();
        f.region_write(CONFIG_REGION, 0x18, &0xfe00_0000u32.to_le_bytes())
            .unwrap();
        f.region_write(CONFIG_REGION, 0x04, &2u16.to_le_bytes())
            .unwrap();
        let flags = IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD;
        f.set_irqs(2, flags, 0, 1, IrqData::Eventfds(vec![efd()]))
            .unwrap();
        f.pause().unwrap();
        f.hand_over().unwrap()
    }

    fn config(f: &mut PciFunction) -> Vec<u8> {
        let mut b = vec![0u8; 256];
        f.region_read(CONFIG_REGION, 0, &mut b).unwrap();
        b
    }

    #[test]
    fn a_take_over_the_device_refuses_leaves_the_function_at_power_on() {
        let h = handed_over();
        let rec = Recorder {
            refuse_take_over: Some(Errno::INVAL),
            ..Recorder::default()
        };
        let guard = Arc::new(Counted::default());
        let mut f = PciFunction::new(spec(), Box::new(rec.clone())).with_guard(guard.clone());
        let power_on = config(&mut f);
        let admitted: Admitted = (Arc::new(NoDma), ClientId::default(), None);
        assert_eq!(f.take_over(h, Some(admitted)).unwrap_err().errno(), 22);
        // The device was opened, told of MSI-X, then closed and told of INTx again.
        assert_eq!(
            rec.take(),
            vec![
                Call::Open,
                Call::Mode(IrqMode::Msix),
                Call::Mode(IrqMode::Intx),
                Call::Close
            ]
        );
        // The client's hold stays with the process that handed over.
        assert_eq!(guard.released.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(config(&mut f), power_on);
        assert_eq!(f.irqs.mode(), IrqMode::Intx);
        // Nothing is held: a client opens it and it serves.
        f.open(Arc::new(NoDma)).unwrap();
        let mut b = [0u8; 4];
        f.region_read(2, 0, &mut b).unwrap();
        assert_eq!(b, [0xa5; 4]);
    }

    #[test]
    fn a_take_over_of_a_broken_state_changes_nothing() {
        let h = handed_over();
        // The state with its fds gone: the eventfd named is missing.
        let broken = HandOver {
            state: h.state.clone(),
            fds: Vec::new(),
        };
        let (mut f, rec) = function();
        let power_on = config(&mut f);
        let admitted: Admitted = (Arc::new(NoDma), ClientId::default(), None);
        assert!(f.take_over(broken, Some(admitted)).is_err());
        assert_eq!(rec.take(), vec![], "the device was touched");
        assert_eq!(config(&mut f), power_on);
        // A state cut short.
        let cut = HandOver {
            state: h.state[..h.state.len() / 2].to_vec(),
            fds: h.fds,
        };
        assert!(f.take_over(cut, None).is_err());
        assert_eq!(rec.take(), vec![]);
        f.open(Arc::new(NoDma)).unwrap();
    }

    struct NoDma;
    impl Dma for NoDma {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), umdev_dma::DmaError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), umdev_dma::DmaError> {
            Ok(())
        }
    }

    const MEM: BarKind = BarKind::Mem32 {
        prefetchable: false,
    };

    fn spec() -> PciDeviceSpec {
        PciDeviceSpec::builder(0x1234, 0xabcd)
            .interrupt_pin(1)
            .bar(0, BarKind::Io, 8)
            .bar(2, MEM, 0x2000)
            .msi(2, false)
            .msix(4, 2, 0x1000, 2, 0x1800)
            .build()
            .unwrap()
    }

    fn function() -> (PciFunction, Recorder) {
        let rec = Recorder::default();
        (PciFunction::new(spec(), Box::new(rec.clone())), rec)
    }

    fn efd() -> OwnedFd {
        eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).unwrap()
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        rustix::io::fcntl_dupfd_cloexec(fd, 0).unwrap()
    }

    fn take(fd: &OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        rustix::io::read(fd, &mut b).map_or(0, |_| u64::from_ne_bytes(b))
    }

    #[test]
    fn config_region_reads_ids() {
        let (mut f, _) = function();
        let mut id = [0u8; 4];
        f.region_read(CONFIG_REGION, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0xabcd_1234);
    }

    #[test]
    fn device_info_flags() {
        let (f, _) = function();
        let info = f.device_info();
        assert_eq!(info.flags, DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI);
        assert_eq!((info.num_regions, info.num_irqs), (9, 5));
    }

    #[test]
    fn region_info_sizes_and_flags() {
        let (f, _) = function();
        assert_eq!(f.region_info(0).unwrap().size, 8);
        assert_eq!(f.region_info(2).unwrap().flags, 3);
        let absent = f.region_info(1).unwrap();
        assert_eq!((absent.size, absent.flags), (0, 0));
        assert_eq!(f.region_info(ROM_REGION).unwrap().size, 0);
        assert_eq!(f.region_info(CONFIG_REGION).unwrap().size, 256);
        assert_eq!(f.region_info(NUM_REGIONS).unwrap_err().errno(), 22);
    }

    #[test]
    fn mmap_bar_reports_mmap_flag_and_areas() {
        let fd =
            Arc::new(rustix::fs::memfd_create("bar", rustix::fs::MemfdFlags::CLOEXEC).unwrap());
        let spec = PciDeviceSpec::builder(1, 2)
            .bar(4, MEM, 0x1000)
            .bar_mmap(
                4,
                crate::BarMmap {
                    fd,
                    offset: 0x4000,
                    areas: vec![(0, 0x800)],
                },
            )
            .build()
            .unwrap();
        let f = PciFunction::new(spec, Box::new(Recorder::default()));
        let info = f.region_info(4).unwrap();
        assert_eq!(info.flags, 7);
        let m = info.mmap.unwrap();
        assert_eq!((m.offset, m.areas), (0x4000, vec![(0, 0x800)]));
    }

    #[test]
    fn out_of_bounds_accesses_are_einval() {
        let (mut f, rec) = function();
        let mut b = [0u8; 4];
        assert_eq!(f.region_read(0, 6, &mut b).unwrap_err().errno(), 22);
        assert_eq!(f.region_write(0, u64::MAX, &b).unwrap_err().errno(), 22);
        assert_eq!(
            f.region_read(CONFIG_REGION, 254, &mut b)
                .unwrap_err()
                .errno(),
            22
        );
        assert_eq!(f.region_read(1, 0, &mut b).unwrap_err().errno(), 22);
        assert_eq!(f.region_read(9, 0, &mut b).unwrap_err().errno(), 22);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn zero_length_access_succeeds_without_reaching_the_device() {
        let (mut f, rec) = function();
        f.region_read(0, 8, &mut []).unwrap();
        f.region_write(1, 0, &[]).unwrap();
        assert!(rec.take().is_empty());
    }

    #[test]
    fn large_access_reaches_device_in_one_call() {
        let (mut f, rec) = function();
        let data = vec![7u8; 140];
        f.region_write(2, 0x10, &data).unwrap();
        let mut back = vec![0u8; 140];
        f.region_read(2, 0x10, &mut back).unwrap();
        assert_eq!(
            rec.take(),
            vec![Call::Write(2, 0x10, data), Call::Read(2, 0x10, 140)]
        );
        assert!(back.iter().all(|&b| b == 0xa5));
    }

    #[test]
    fn msix_table_and_pba_accesses_never_reach_the_device() {
        let (mut f, rec) = function();
        let mut entry = [0u8; 16];
        f.region_read(2, 0x1000, &mut entry).unwrap();
        assert_eq!(&entry[12..], &[1, 0, 0, 0], "masked by default");
        f.region_write(2, 0x1010, &[0xff; 16]).unwrap();
        f.region_read(2, 0x1010, &mut entry).unwrap();
        assert_eq!(entry[0], 0xfc);
        let mut pba = [0xffu8; 8];
        f.region_write(2, 0x1800, &pba).unwrap();
        f.region_read(2, 0x1800, &mut pba).unwrap();
        assert_eq!(pba, [0; 8]);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn access_straddling_msix_table_is_einval() {
        let (mut f, rec) = function();
        let mut b = [0u8; 8];
        assert_eq!(f.region_read(2, 0xffc, &mut b).unwrap_err().errno(), 22);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn irq_info_counts_and_flags() {
        let (f, _) = function();
        let get = |i| {
            let info = f.irq_info(i).unwrap();
            (info.count, info.flags)
        };
        assert_eq!(get(0), (1, 7));
        assert_eq!(get(1), (2, 9));
        assert_eq!(get(2), (4, 9));
        assert_eq!(get(3), (1, 1));
        assert_eq!(get(4), (1, 1));
        assert_eq!(f.irq_info(5).unwrap_err().errno(), 22);
    }

    #[test]
    fn intx_count_is_zero_without_a_pin() {
        let spec = PciDeviceSpec::builder(1, 2).build().unwrap();
        let f = PciFunction::new(spec, Box::new(Recorder::default()));
        assert_eq!(f.irq_info(0).unwrap().count, 0);
        assert_eq!(f.irq_info(1).unwrap().count, 0);
    }

    #[test]
    fn mode_changes_reach_the_device() {
        let (mut f, rec) = function();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(2, flags, 0, 1, IrqData::Eventfds(vec![efd()]))
            .unwrap();
        f.set_irqs(2, flags, 1, 1, IrqData::Eventfds(vec![efd()]))
            .unwrap();
        let off = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(2, off, 0, 0, IrqData::None).unwrap();
        assert_eq!(
            rec.take(),
            vec![Call::Mode(IrqMode::Msix), Call::Mode(IrqMode::Intx)]
        );
    }

    #[test]
    fn command_intx_disable_blocks_intx() {
        let (mut f, _) = function();
        let fd = efd();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(0, flags, 0, 1, IrqData::Eventfds(vec![dup(&fd)]))
            .unwrap();
        f.region_write(CONFIG_REGION, 4, &0x0400u16.to_le_bytes())
            .unwrap();
        f.interrupts().set_intx(true);
        assert_eq!(take(&fd), 0);
        f.region_write(CONFIG_REGION, 4, &0u16.to_le_bytes())
            .unwrap();
        assert_eq!(take(&fd), 1);
    }

    #[test]
    fn msix_function_mask_holds_then_delivers() {
        let (mut f, _) = function();
        let fd = efd();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(2, flags, 0, 1, IrqData::Eventfds(vec![dup(&fd)]))
            .unwrap();
        let ctrl = f.config.layout().msix.unwrap() + 2;
        let ctrl = u64::try_from(ctrl).unwrap();
        f.region_write(CONFIG_REGION, ctrl, &0xc000u16.to_le_bytes())
            .unwrap();
        f.interrupts().trigger_msix(0);
        assert_eq!(take(&fd), 0);
        let mut pba = [0u8; 8];
        f.region_read(2, 0x1800, &mut pba).unwrap();
        assert_eq!(pba[0], 1);
        f.region_write(CONFIG_REGION, ctrl, &0x8000u16.to_le_bytes())
            .unwrap();
        assert_eq!(take(&fd), 1);
    }

    #[test]
    fn reset_restores_config_and_keeps_eventfds() {
        let (mut f, rec) = function();
        let fd = efd();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(1, flags, 0, 1, IrqData::Eventfds(vec![dup(&fd)]))
            .unwrap();
        f.region_write(CONFIG_REGION, 0x10, &[0xff; 4]).unwrap();
        f.region_write(CONFIG_REGION, 4, &[0x07]).unwrap();
        f.reset().unwrap();
        let mut b = [0u8; 4];
        f.region_read(CONFIG_REGION, 0x10, &mut b).unwrap();
        assert_eq!(
            u32::from_le_bytes(b),
            1,
            "I/O BAR back to 0 with its type bit"
        );
        f.region_read(CONFIG_REGION, 4, &mut b).unwrap();
        assert_eq!(b[0], 0);
        f.interrupts().trigger_msi(0);
        assert_eq!(take(&fd), 1);
        assert_eq!(rec.take(), vec![Call::Mode(IrqMode::Msi), Call::Reset]);
    }

    #[test]
    fn open_refusal_carries_the_errno() {
        let rec = Recorder {
            refuse_open: Some(Errno::BUSY),
            ..Recorder::default()
        };
        let mut f = PciFunction::new(spec(), Box::new(rec));
        assert_eq!(f.open(Arc::new(NoDma)).unwrap_err().errno(), 16);
    }

    #[test]
    fn close_drops_eventfds_and_tells_the_device() {
        let (mut f, rec) = function();
        f.open(Arc::new(NoDma)).unwrap();
        let fd = efd();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(1, flags, 0, 1, IrqData::Eventfds(vec![dup(&fd)]))
            .unwrap();
        f.close();
        assert_eq!(f.interrupts().mode(), IrqMode::Intx);
        f.interrupts().trigger_msi(0);
        assert_eq!(take(&fd), 0);
        assert_eq!(
            rec.take(),
            vec![
                Call::Open,
                Call::Mode(IrqMode::Msi),
                Call::Mode(IrqMode::Intx),
                Call::Close
            ]
        );
    }
}
