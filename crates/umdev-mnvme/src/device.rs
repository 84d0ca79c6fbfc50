//! The controller as a PCI function: class 01/08/02 (NVM Express), BAR0 64-bit with the
//! registers, the doorbells and the MSI-X table, a vector per queue, INTx when the guest has
//! no MSI-X.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use umdev_pci::{
    BarIndex, BarKind, DeviceContext, Errno, IoFdSpec, IrqMode, MigrationSpec, PciDevice,
    PciDeviceSpec, SpecError, StateReader, StateWriter,
};

use crate::ctrl::{Attached, Ctrl};
use crate::identify::{DEVICE_ID, MAX_IO_QUEUES, VENDOR_ID};
use crate::mem::Guest;
use crate::regs;

/// Size of BAR0: registers (4 KiB), doorbells (4 KiB), MSI-X table and PBA.
pub const BAR0_SIZE: u64 = 16 * 1024;
const MSIX_TABLE: u32 = 0x2000;
const MSIX_PBA: u32 = 0x3000;
/// Work threads: the poller and commands whose DMA goes through messages.
const WORK_THREADS: usize = 16;

/// The PCI layout of a controller.
pub fn spec() -> Result<PciDeviceSpec, SpecError> {
    PciDeviceSpec::builder(VENDOR_ID, DEVICE_ID)
        .class(0x01, 0x08, 0x02)
        .revision(1)
        .subsystem(VENDOR_ID, DEVICE_ID)
        .interrupt_pin(1)
        .bar(
            0,
            BarKind::Mem64 {
                prefetchable: false,
            },
            BAR0_SIZE,
        )
        .msix(u32::from(MAX_IO_QUEUES) + 1, 0, MSIX_TABLE, 0, MSIX_PBA)
        .pcie()
        .power_management()
        .reset(true)
        .work_threads(WORK_THREADS)
        .build()
}

/// Fields of a namespace chunk in the migration stream.
mod chunk_tag {
    /// Byte offset in the namespace.
    pub const OFFSET: u16 = 1;
    /// The bytes there.
    pub const DATA: u16 = 2;
    /// Or: that many bytes of zeroes.
    pub const ZEROES: u16 = 3;
}

/// The device the framework serves.
pub struct Mnvme {
    pub(crate) ctrl: Arc<Ctrl>,
}

impl Mnvme {
    /// The 32-bit register at `off` (the halves of the 64-bit ones).
    #[allow(clippy::cast_possible_truncation)] // each half is taken on purpose
    fn reg32(&self, off: u64) -> u32 {
        match off {
            regs::CAP | regs::ASQ | regs::ACQ => self.ctrl.read_reg(off) as u32,
            o if o == regs::CAP + 4 || o == regs::ASQ_HI || o == regs::ACQ_HI => {
                (self.ctrl.read_reg(o - 4) >> 32) as u32
            }
            o => self.ctrl.read_reg(o) as u32,
        }
    }
}

impl PciDevice for Mnvme {
    fn bar_read(&mut self, _: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        if offset >= regs::DOORBELLS {
            // Doorbells read as zero.
            data.fill(0);
            return Ok(());
        }
        // Any size within the registers: from the 8-byte words that cover the access.
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let word = at & !3;
            *b = self.reg32(word).to_le_bytes()[usize::try_from(at - word).unwrap_or(0)];
        }
        Ok(())
    }

    fn bar_write(&mut self, _: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let aligned = offset % 4 == 0 && (data.len() == 4 || data.len() == 8);
        if !aligned {
            tracing::debug!(
                offset,
                len = data.len(),
                "mnvme: register write of another size ignored"
            );
            return Ok(());
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes(chunk.try_into().map_err(|_| Errno::INVAL)?);
            let at = offset + 4 * i as u64;
            if at >= regs::DOORBELLS {
                self.ctrl.doorbell(at, v);
            } else {
                self.ctrl.write_reg(at, v);
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.ctrl.reset(true);
        Ok(())
    }

    /// The I/O submission queues' tail doorbells as ioeventfds: a signal wakes the poller,
    /// which reads the tail from the shadow doorbell (the eventfd carries no value, so a
    /// driver uses them together with Doorbell Buffer Config).
    fn io_fds(&mut self, bar: BarIndex) -> Vec<IoFdSpec> {
        if bar.get() != 0 {
            return Vec::new();
        }
        (1..=MAX_IO_QUEUES)
            .map(|q| {
                let c = Arc::clone(&self.ctrl);
                IoFdSpec {
                    offset: regs::DOORBELLS + 8 * u64::from(q),
                    size: 4,
                    datamatch: None,
                    notify: Arc::new(move |_| c.doorbell_signalled()),
                }
            })
            .collect()
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), Errno> {
        *self
            .ctrl
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(Attached {
            guest: Guest {
                dma: ctx.dma,
                pins: ctx.pins,
            },
            irqs: ctx.irqs,
            work: ctx.work,
        });
        *self.ctrl.mode.lock().unwrap_or_else(|e| e.into_inner()) = IrqMode::Intx;
        Ok(())
    }

    fn close(&mut self) {
        // The client went (its work is drained): what it set up in its memory goes with it.
        // The controller is reset, its pins given back; the namespace keeps its data and
        // the next client finds a controller just powered on.
        self.ctrl.reset(true);
        self.ctrl.ns.track_stop();
        *self
            .ctrl
            .attached
            .write()
            .unwrap_or_else(|e| e.into_inner()) = None;
        tracing::info!("mnvme: client gone; controller reset");
    }

    fn intx_unmasking(&mut self) {
        // The driver may have consumed entries through its shadow doorbell without ringing:
        // the level follows the shadow heads.
        self.ctrl.update_intx();
    }

    fn irq_mode_changed(&mut self, mode: IrqMode) {
        *self.ctrl.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
        self.ctrl.update_intx();
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) {
        // Queue rings and doorbell buffers in the range fall back to DMA copies; commands
        // hold their data pins only while they run (the framework drains them before the
        // reply).
        let Some(a) = self.ctrl.attached() else {
            return;
        };
        let sqs = self
            .ctrl
            .sqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for q in sqs.iter().flatten() {
            if q.ring.overlaps(iova, len) {
                q.ring.unpin(&a.guest);
            }
        }
        let cqs = self
            .ctrl
            .cqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for q in cqs.iter().flatten() {
            if q.ring.overlaps(iova, len) {
                q.ring.unpin(&a.guest);
            }
        }
        if let Some(d) = &*self.ctrl.dbbuf.read().unwrap_or_else(|e| e.into_inner()) {
            if d.shadow.overlaps(iova, len) || d.eventidx.overlaps(iova, len) {
                tracing::warn!("mnvme: the driver unmapped its shadow doorbell buffers");
                d.shadow.unpin(&a.guest);
                d.eventidx.unpin(&a.guest);
            }
        }
    }

    fn migration(&self) -> Option<MigrationSpec> {
        Some(MigrationSpec {
            device_type: "mnvme".into(),
            version: crate::state::VERSION,
            min_version: 1,
            // Copying the namespace happens while the guest runs: pre-copy.
            flags: if self.ctrl.tuning.copy_on_migrate {
                umdev_pci::migration::PRE_COPY
            } else {
                0
            },
        })
    }

    fn set_running(&mut self, running: bool) -> Result<(), Errno> {
        self.ctrl.running.store(running, Ordering::Release);
        if running {
            // Running again here: a copy in progress was abandoned.
            self.ctrl.ns.track_stop();
            self.ctrl.kick();
        }
        Ok(())
    }

    /// With `copy_on_migrate`, the namespace in 1 MiB chunks: every chunk in the first
    /// pass, then each pass the chunks written since they were sent (holes as zero ranges).
    fn save_chunk(
        &mut self,
        first: bool,
        _budget: usize,
        chunk: &mut StateWriter,
    ) -> Result<bool, Errno> {
        if !self.ctrl.tuning.copy_on_migrate {
            return Ok(false);
        }
        let ns = &self.ctrl.ns;
        if first {
            ns.track_start();
        }
        let Some((offset, len)) = ns.next_changed() else {
            return Ok(false);
        };
        chunk.u64(chunk_tag::OFFSET, offset);
        if ns.is_hole(offset, len) {
            chunk.u64(chunk_tag::ZEROES, len);
            return Ok(true);
        }
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Errno::INVAL)?];
        ns.read(offset, &mut buf).map_err(|e| {
            tracing::warn!(offset, error = %e, "mnvme: cannot read the namespace to copy it");
            Errno::IO
        })?;
        chunk.bytes(chunk_tag::DATA, &buf);
        Ok(true)
    }

    fn load_chunk(&mut self, _version: u32, chunk: &StateReader<'_>) -> Result<(), Errno> {
        let ns = &self.ctrl.ns;
        let offset = chunk.u64(chunk_tag::OFFSET).map_err(|_| Errno::INVAL)?;
        let (len, data) = match chunk.get(chunk_tag::DATA) {
            Some(d) => (d.len() as u64, Some(d)),
            None => (
                chunk.u64(chunk_tag::ZEROES).map_err(|_| Errno::INVAL)?,
                None,
            ),
        };
        if offset.checked_add(len).is_none_or(|end| end > ns.size()) {
            tracing::warn!(offset, len, "mnvme: an incoming chunk past the namespace");
            return Err(Errno::INVAL);
        }
        let r = match data {
            Some(d) => ns.write(offset, d),
            None => ns.deallocate(offset, len),
        };
        r.map_err(|e| {
            tracing::warn!(offset, error = %e, "mnvme: cannot store an incoming chunk");
            Errno::IO
        })
    }

    fn data_pending(&self) -> u64 {
        self.ctrl.ns.changed_bytes()
    }

    fn save(&mut self, state: &mut StateWriter) -> Result<(), Errno> {
        crate::state::save(&self.ctrl, state)
    }

    fn load(&mut self, version: u32, state: &StateReader<'_>) -> Result<(), Errno> {
        crate::state::load(&self.ctrl, version, state)
    }

    /// A live upgrade: the migration state, as it is (the backing file is the same path,
    /// opened again by the next process; without a client the controller is at power-on
    /// and nothing is written).
    fn hand_over(
        &mut self,
        state: &mut StateWriter,
        _fds: &mut Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), Errno> {
        if self.ctrl.attached().is_none() {
            return Ok(());
        }
        crate::state::save(&self.ctrl, state)
    }

    fn take_over(
        &mut self,
        state: &StateReader<'_>,
        _fds: &mut umdev_pci::HandedFds,
    ) -> Result<(), Errno> {
        if !crate::state::present(state) {
            return Ok(());
        }
        // Rings and shadow doorbells are pinned again from the client's mappings, which
        // the framework mapped before this call.
        crate::state::load(&self.ctrl, crate::state::VERSION, state)
    }
}
