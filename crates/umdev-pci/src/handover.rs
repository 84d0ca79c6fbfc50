//! Live upgrade: a function handed from one process to another with its client attached.
//!
//! Unlike a migration, a hand-over is local and carries fds: the client's interrupt
//! eventfds, the ioeventfds it was given, and whatever the device declares (a memory object
//! the client has mapped, a console connection). The old process pauses the function
//! ([`PciFunction::pause`]: work drained and held, interrupts held, the device stopped),
//! writes it out ([`PciFunction::hand_over`]) and, if the new process fails, runs on
//! ([`PciFunction::resume`]). The new process builds the device from its description,
//! takes the state in ([`PciFunction::take_over`]) and resumes it. The client sees a
//! pause, never a reset: config space (BAR addresses, command register), the MSI and
//! MSI-X state, the interrupt mode and INTx line all come across as they were.
//!
//! The state is a [`StateWriter`] payload (tagged fields, so a newer binary reads an older
//! one's); fds travel beside it, named by their index in [`HandOver::fds`].

use std::os::fd::OwnedFd;

use rustix::io::Errno;

use crate::error::DeviceError;
use crate::function::PciFunction;
use crate::interrupts::IrqMode;
use crate::io_fds::{IoFdArea, Watcher};
use crate::state_format::{StateReader, StateWriter, StreamError};
use umdev_dma::{Dma, Pinner};

use crate::{BarIndex, ClientId};

/// A function's state as one process hands it to the next.
#[derive(Debug, Default)]
pub struct HandOver {
    /// Tagged fields ([`StateWriter`]).
    pub state: Vec<u8>,
    /// The fds the fields name by index.
    pub fds: Vec<OwnedFd>,
}

/// The fds that came with a hand-over, taken by the index the state names.
#[derive(Debug, Default)]
pub struct HandedFds(Vec<Option<OwnedFd>>);

impl HandedFds {
    /// The fds of a hand-over.
    pub fn new(fds: Vec<OwnedFd>) -> HandedFds {
        HandedFds(fds.into_iter().map(Some).collect())
    }

    /// Fd `index` (each can be taken once); EINVAL if there is none.
    pub fn take(&mut self, index: u32) -> Result<OwnedFd, Errno> {
        self.0
            .get_mut(index as usize)
            .and_then(Option::take)
            .ok_or(Errno::INVAL)
    }
}

/// Adds `fd` to `fds`; returns its index, for the state.
pub fn push_fd(fds: &mut Vec<OwnedFd>, fd: OwnedFd) -> u32 {
    fds.push(fd);
    u32::try_from(fds.len() - 1).unwrap_or(u32::MAX)
}

// Tags of the function's fields.
const T_CONFIG: u16 = 1;
const T_MODE: u16 = 2;
const T_INTX_LEVEL: u16 = 3;
const T_INTX_MASKED: u16 = 4;
const T_INTX_DISABLED: u16 = 5;
/// One per armed vector: index, vector, fd (u32 each).
const T_EVENTFD: u16 = 6;
const T_MSIX_ENTRIES: u16 = 7;
const T_MSIX_PROGRAMMED: u16 = 8;
const T_MSIX_PBA: u16 = 9;
const T_MSIX_FUNCTION_MASK: u16 = 10;
const T_HELD_MSI: u16 = 11;
/// One per ioeventfd: region u32, offset u64, size u64, datamatch present u8, datamatch
/// u64, fd u32.
const T_IOFD: u16 = 12;
const T_OPEN: u16 = 13;
const T_DEVICE: u16 = 14;

fn stream(e: StreamError) -> DeviceError {
    tracing::warn!(error = %e, "a hand-over's state cannot be read");
    DeviceError::Device(Errno::INVAL)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, DeviceError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(DeviceError::Device(Errno::INVAL))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, DeviceError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(DeviceError::Device(Errno::INVAL))
}

fn mode_code(m: IrqMode) -> u8 {
    match m {
        IrqMode::Intx => 0,
        IrqMode::Msi => 1,
        IrqMode::Msix => 2,
    }
}

/// The client a handed-over function is opened for: its DMA, who it is, its pins.
pub type Admitted = (
    std::sync::Arc<dyn Dma>,
    ClientId,
    Option<std::sync::Arc<Pinner>>,
);

impl PciFunction {
    /// Stops the function for a hand-over: the device's work drains and is held, its
    /// interrupts are held (delivered by whoever resumes it), its DMA writes refused, and
    /// the device is told to stop ([`PciDevice::set_running`](crate::PciDevice)). EBUSY
    /// during a migration (the migration state and its stream do not travel).
    pub fn pause(&mut self) -> Result<(), DeviceError> {
        if let Some(state) = self.mig.spec().map(|_| self.mig.current()) {
            if !state.is_running() {
                tracing::warn!(?state, "no hand-over during a migration");
                return Err(DeviceError::Device(Errno::BUSY));
            }
        }
        self.work.hold();
        // No ioeventfd is taken from here on: a signal stays for whoever runs next.
        for (region, watcher) in std::mem::take(&mut self.io_fds) {
            self.paused_io_fds.insert(region, watcher.into_areas());
        }
        self.mig
            .stopped_flag()
            .store(true, std::sync::atomic::Ordering::Release);
        self.irqs.set_gated(true);
        if let Err(e) = self.device.set_running(false) {
            // Its ioeventfds are watched again.
            let _ = self.resume();
            return Err(e.into());
        }
        Ok(())
    }

    /// Runs the function again after [`pause`](Self::pause) (a hand-over that failed) or
    /// [`take_over`](Self::take_over): the ioeventfds are watched again, held interrupts
    /// are delivered, held work runs.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        let mut result = Ok(());
        for (region, areas) in std::mem::take(&mut self.paused_io_fds) {
            if let Err(e) = self.watch_again(region, areas) {
                result = Err(e);
            }
        }
        let r = self.device.set_running(true);
        self.mig
            .stopped_flag()
            .store(false, std::sync::atomic::Ordering::Release);
        self.irqs.set_gated(false);
        self.work.release();
        r?;
        result
    }

    /// Watches the ioeventfds of `region` again, each with what the device now says to do
    /// for its span.
    fn watch_again(&mut self, region: u32, areas: Vec<IoFdArea>) -> Result<(), DeviceError> {
        let bar = u8::try_from(region)
            .ok()
            .and_then(BarIndex::new)
            .ok_or(DeviceError::Device(Errno::INVAL))?;
        let specs = self.device.io_fds(bar);
        let mut watched = Vec::with_capacity(areas.len());
        for a in areas {
            let spec = specs
                .iter()
                .find(|s| s.offset == a.offset && s.size == a.size && s.datamatch == a.datamatch)
                .ok_or_else(|| {
                    tracing::warn!(
                        region,
                        offset = a.offset,
                        "an ioeventfd the device no longer offers"
                    );
                    DeviceError::Device(Errno::INVAL)
                })?;
            watched.push((spec.clone(), a.fd));
        }
        let watcher =
            Watcher::resume(&format!("umdev-bar{region}"), watched).map_err(DeviceError::Device)?;
        self.io_fds.insert(region, watcher);
        Ok(())
    }

    /// The paused function's state for the process that takes it over: config space,
    /// interrupts with the client's eventfds, the ioeventfds handed out, and the device's
    /// own ([`PciDevice::hand_over`](crate::PciDevice); ENOTSUP for a device that cannot).
    /// Everything is duplicated: this function can still [`resume`](Self::resume).
    pub fn hand_over(&mut self) -> Result<HandOver, DeviceError> {
        let mut w = StateWriter::new();
        let mut fds = Vec::new();
        w.bytes(T_CONFIG, self.config.bytes());
        w.bool(T_OPEN, self.open);
        {
            let irqs = self.irqs.lock();
            w.u8(T_MODE, mode_code(irqs.mode));
            w.bool(T_INTX_LEVEL, irqs.intx_level);
            w.bool(T_INTX_MASKED, irqs.intx_masked);
            w.bool(T_INTX_DISABLED, irqs.intx_disabled);
            for (index, slots) in irqs.fds.iter().enumerate() {
                for (vector, slot) in slots.iter().enumerate() {
                    if let Some(fd) = slot {
                        let n = push_fd(&mut fds, fd.try_clone().map_err(io)?);
                        let mut b = Vec::with_capacity(12);
                        let (index, vector) = (
                            u32::try_from(index).unwrap_or(u32::MAX),
                            u32::try_from(vector).unwrap_or(u32::MAX),
                        );
                        b.extend_from_slice(&index.to_le_bytes());
                        b.extend_from_slice(&vector.to_le_bytes());
                        b.extend_from_slice(&n.to_le_bytes());
                        w.bytes(T_EVENTFD, &b);
                    }
                }
            }
            let (entries, programmed, pba, function_mask) = irqs.msix.parts();
            w.bytes(T_MSIX_ENTRIES, entries);
            let programmed: Vec<u8> = programmed.iter().map(|&p| u8::from(p)).collect();
            w.bytes(T_MSIX_PROGRAMMED, &programmed);
            let pba: Vec<u8> = pba.iter().flat_map(|w| w.to_le_bytes()).collect();
            w.bytes(T_MSIX_PBA, &pba);
            w.bool(T_MSIX_FUNCTION_MASK, function_mask);
            let held: Vec<u8> = irqs.held_msi.iter().map(|&h| u8::from(h)).collect();
            w.bytes(T_HELD_MSI, &held);
        }
        for (region, areas) in &self.paused_io_fds {
            for a in areas {
                let n = push_fd(&mut fds, a.fd.try_clone().map_err(io)?);
                let mut b = Vec::with_capacity(33);
                b.extend_from_slice(&region.to_le_bytes());
                b.extend_from_slice(&a.offset.to_le_bytes());
                b.extend_from_slice(&a.size.to_le_bytes());
                b.push(u8::from(a.datamatch.is_some()));
                b.extend_from_slice(&a.datamatch.unwrap_or(0).to_le_bytes());
                b.extend_from_slice(&n.to_le_bytes());
                w.bytes(T_IOFD, &b);
            }
        }
        let mut dev = StateWriter::new();
        self.device.hand_over(&mut dev, &mut fds)?;
        w.bytes(T_DEVICE, &dev.into_payload());
        Ok(HandOver {
            state: w.into_payload(),
            fds,
        })
    }

    /// Takes over a function another process handed over: this one was just built from the
    /// same description and has had no client. With a client in the state, the device is
    /// opened for `client` (the group guard is not asked again: the client was admitted)
    /// with `dma` and `pins`, the interrupts get the client's eventfds, the ioeventfds are
    /// watched again, and the device takes its state ([`PciDevice::take_over`](crate::PciDevice)).
    /// The function stays paused until [`resume`](Self::resume). All or nothing: a state
    /// that does not fit changes nothing, and if the device's own `take_over` refuses, the
    /// device is closed again (the client's hold on its group is left alone: the process
    /// that handed over still serves it) and config space and interrupts are at power-on.
    pub fn take_over(&mut self, h: HandOver, dma: Option<Admitted>) -> Result<(), DeviceError> {
        // All or nothing: the whole state is read and checked first, and the function is
        // changed only once it is known good. The device's own `take_over` runs last; if it
        // refuses, the function is closed and put back at power-on.
        let r = StateReader::parse(&h.state).map_err(stream)?;
        let mut fds = HandedFds::new(h.fds);
        let t = self.read_taken(&r, &mut fds)?;
        if t.open && dma.is_none() {
            return Err(DeviceError::Device(Errno::INVAL));
        }
        let dev = StateReader::parse(t.device).map_err(stream)?;
        // Paused from the start: nothing is delivered or run until resume.
        self.work.hold();
        self.mig
            .stopped_flag()
            .store(true, std::sync::atomic::Ordering::Release);
        self.irqs.set_gated(true);
        let applied = self.device.set_running(false).map_err(DeviceError::from);
        let applied = applied.and_then(|()| match dma {
            Some((dma, client, pins)) if t.open => self.open_admitted(dma, client, pins),
            _ => Ok(()),
        });
        if let Err(e) = applied {
            self.undo_take_over();
            return Err(e);
        }
        self.config.set_bytes(t.config);
        {
            let mut irqs = self.irqs.lock();
            irqs.mode = t.mode;
            irqs.intx_level = t.intx_level;
            irqs.intx_masked = t.intx_masked;
            irqs.intx_disabled = t.intx_disabled;
            for (index, vector, fd) in t.eventfds {
                // Checked by `read_taken`.
                if let Some(slot) = irqs.fds.get_mut(index).and_then(|s| s.get_mut(vector)) {
                    *slot = Some(fd);
                }
            }
            let set = irqs.msix.set_parts(
                t.msix_entries,
                &t.msix_programmed,
                &t.msix_pba,
                t.msix_function_mask,
            );
            debug_assert!(set.is_ok(), "checked by read_taken");
            for (h, &b) in irqs.held_msi.iter_mut().zip(t.held_msi) {
                *h = b != 0;
            }
        }
        for (region, area) in t.io_fds {
            // Watched from `resume`.
            self.paused_io_fds.entry(region).or_default().push(area);
        }
        if t.mode != IrqMode::Intx {
            self.device.irq_mode_changed(t.mode);
        }
        if let Err(e) = self.device.take_over(&dev, &mut fds) {
            self.undo_take_over();
            return Err(e.into());
        }
        Ok(())
    }

    /// Reads and checks every field of a hand-over against this function, taking its fds;
    /// changes nothing.
    fn read_taken<'a>(
        &self,
        r: &StateReader<'a>,
        fds: &mut HandedFds,
    ) -> Result<Taken<'a>, DeviceError> {
        let config = r.bytes(T_CONFIG).map_err(stream)?;
        if config.len() != self.config.bytes().len() {
            tracing::warn!(
                got = config.len(),
                want = self.config.bytes().len(),
                "a hand-over's config space does not fit this device"
            );
            return Err(DeviceError::Device(Errno::INVAL));
        }
        // The identity (vendor, device, revision, class, subsystem) is this device's own: a
        // state that says otherwise is not this device's.
        let ours = self.config.bytes();
        let identity = |b: &[u8]| [&b[0x00..0x04], &b[0x08..0x0c], &b[0x2c..0x30]].concat();
        if identity(config) != identity(ours) {
            tracing::warn!("a hand-over's config space is another device's (its identity differs)");
            return Err(DeviceError::Device(Errno::INVAL));
        }
        let irqs = self.irqs.lock();
        let mut eventfds = Vec::new();
        for b in r.all(T_EVENTFD) {
            let (index, vector, n) = (u32_at(b, 0)?, u32_at(b, 4)?, u32_at(b, 8)?);
            let (index, vector) = (index as usize, vector as usize);
            if irqs.fds.get(index).and_then(|s| s.get(vector)).is_none() {
                return Err(DeviceError::Device(Errno::INVAL));
            }
            eventfds.push((index, vector, fds.take(n)?));
        }
        let msix_programmed: Vec<bool> = r
            .bytes(T_MSIX_PROGRAMMED)
            .map_err(stream)?
            .iter()
            .map(|&b| b != 0)
            .collect();
        let pba = r.bytes(T_MSIX_PBA).map_err(stream)?;
        if pba.len() % 8 != 0 {
            return Err(DeviceError::Device(Errno::INVAL));
        }
        let msix_pba: Vec<u64> = pba
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let msix_entries = r.bytes(T_MSIX_ENTRIES).map_err(stream)?;
        if !irqs.msix.fits(msix_entries, &msix_programmed, &msix_pba) {
            return Err(DeviceError::Device(Errno::INVAL));
        }
        drop(irqs);
        let mut io_fds = Vec::new();
        for b in r.all(T_IOFD) {
            let region = u32_at(b, 0)?;
            let area = IoFdArea {
                offset: u64_at(b, 4)?,
                size: u64_at(b, 12)?,
                datamatch: (b.get(20) == Some(&1)).then(|| u64_at(b, 21)).transpose()?,
                fd: fds.take(u32_at(b, 29)?)?,
            };
            io_fds.push((region, area));
        }
        Ok(Taken {
            config,
            open: r.bool(T_OPEN).map_err(stream)?,
            mode: match r.u8(T_MODE).map_err(stream)? {
                1 => IrqMode::Msi,
                2 => IrqMode::Msix,
                _ => IrqMode::Intx,
            },
            intx_level: r.bool(T_INTX_LEVEL).map_err(stream)?,
            intx_masked: r.bool(T_INTX_MASKED).map_err(stream)?,
            intx_disabled: r.bool(T_INTX_DISABLED).map_err(stream)?,
            eventfds,
            msix_programmed,
            msix_pba,
            msix_entries,
            msix_function_mask: r.bool(T_MSIX_FUNCTION_MASK).map_err(stream)?,
            held_msi: r.bytes(T_HELD_MSI).map_err(stream)?,
            io_fds,
            device: r.bytes(T_DEVICE).map_err(stream)?,
        })
    }

    /// After a refused take-over: the client detached, config space and interrupt state at
    /// power-on, nothing held or paused.
    fn undo_take_over(&mut self) {
        // Not `close`: the client's hold on its group stays with the process that handed
        // the function over (which serves on).
        self.close_device();
        self.paused_io_fds.clear();
        self.config.reset();
        if self.irqs.lock().close() != IrqMode::Intx {
            self.device.irq_mode_changed(IrqMode::Intx);
        }
        self.irqs.set_gated(false);
        self.mig
            .stopped_flag()
            .store(false, std::sync::atomic::Ordering::Release);
        self.work.release();
    }
}

/// A hand-over's fields, read and checked ([`PciFunction::read_taken`]).
struct Taken<'a> {
    config: &'a [u8],
    open: bool,
    mode: IrqMode,
    intx_level: bool,
    intx_masked: bool,
    intx_disabled: bool,
    /// Interrupt index, vector, eventfd.
    eventfds: Vec<(usize, usize, OwnedFd)>,
    msix_programmed: Vec<bool>,
    msix_pba: Vec<u64>,
    msix_entries: &'a [u8],
    msix_function_mask: bool,
    held_msi: &'a [u8],
    io_fds: Vec<(u32, IoFdArea)>,
    device: &'a [u8],
}

fn io(e: std::io::Error) -> DeviceError {
    DeviceError::Device(Errno::from_io_error(&e).unwrap_or(Errno::IO))
}
