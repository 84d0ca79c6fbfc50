//! Admin commands, run by the poller: Identify, Get/Set Features, Get Log Page, queue
//! creation and deletion, Abort, Asynchronous Event Request, Keep Alive, Doorbell Buffer
//! Config. Anything else is Invalid Command Opcode; a bad field gets the status the NVMe
//! specification names for it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::ctrl::{Attached, Cq, Ctrl, DbBuf, Sq};
use crate::identify::{self, AER_LIMIT, MAX_IO_QUEUES, NSID};
use crate::io::prp_segments;
use crate::mem::{dma_write, Region};
use crate::regs::{self, admin, feature, Sqe, Status};

impl Ctrl {
    pub(crate) fn admin(self: &Arc<Self>, a: &Attached, gen: u64, sq: &Arc<Sq>, c: &Sqe) {
        let result = match c.opcode {
            admin::IDENTIFY => self.identify(a, c),
            admin::GET_FEATURES => self.get_features(c),
            admin::SET_FEATURES => self.set_features(c),
            admin::GET_LOG_PAGE => self.get_log_page(a, c),
            admin::CREATE_CQ => self.create_cq(a, c),
            admin::CREATE_SQ => self.create_sq(a, c),
            admin::DELETE_SQ => self.delete_sq(a, c),
            admin::DELETE_CQ => self.delete_cq(a, c),
            // Abort: the command is not aborted (DW0 bit 0); it completes on its own.
            admin::ABORT => Ok(1),
            admin::KEEP_ALIVE => Ok(0),
            admin::DOORBELL_BUFFER_CONFIG => self.doorbell_buffer_config(a, c),
            admin::ASYNC_EVENT => {
                let mut aers = self.aers.lock().unwrap_or_else(|e| e.into_inner());
                if aers.0.len() >= AER_LIMIT {
                    Err(regs::AER_LIMIT_EXCEEDED)
                } else {
                    aers.0.push(c.cid);
                    drop(aers);
                    self.deliver_aers();
                    // Held: completed when an event happens.
                    return;
                }
            }
            op => {
                tracing::debug!(opcode = op, "mnvme: unknown admin opcode");
                Err(regs::INVALID_OPCODE)
            }
        };
        let (dw0, status) = match result {
            Ok(dw0) => (dw0, regs::SUCCESS),
            Err(s) => (0, s),
        };
        self.complete(gen, sq, c.cid, dw0, status);
    }

    /// Copies `data` to the command's PRPs.
    fn give(&self, a: &Attached, c: &Sqe, data: &[u8]) -> Result<u32, Status> {
        let segs = prp_segments(&a.guest, c.prp1, c.prp2, data.len() as u64)?;
        dma_write(&a.guest, &segs, data).map_err(|_| regs::DATA_TRANSFER_ERROR)?;
        Ok(0)
    }

    fn identify(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        let id = self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let data = match c.cdw(10) & 0xff {
            0x00 => {
                if c.nsid != NSID && c.nsid != u32::MAX {
                    return Err(regs::INVALID_NAMESPACE);
                }
                identify::namespace(&id, self.ns.blocks())
            }
            0x01 => identify::controller(&id, 1),
            0x02 => {
                if c.nsid >= 0xffff_fffe {
                    return Err(regs::INVALID_NAMESPACE);
                }
                identify::active_namespaces(c.nsid)
            }
            0x03 => {
                if c.nsid != NSID {
                    return Err(regs::INVALID_NAMESPACE);
                }
                identify::ns_descriptors(&id)
            }
            _ => return Err(regs::INVALID_FIELD),
        };
        self.give(a, c, &data)
    }

    fn granted(&self) -> (u16, u16) {
        let f = self.features.lock().unwrap_or_else(|e| e.into_inner());
        f.queues_granted
            .unwrap_or((MAX_IO_QUEUES - 1, MAX_IO_QUEUES - 1))
    }

    fn get_features(&self, c: &Sqe) -> Result<u32, Status> {
        let fid = (c.cdw(10) & 0xff) as u8;
        let sel = (c.cdw(10) >> 8) & 7;
        if sel == 3 {
            // Supported capabilities: nothing saveable, everything changeable.
            return Ok(0b100);
        }
        let f = *self.features.lock().unwrap_or_else(|e| e.into_inner());
        Ok(match fid {
            feature::NUMBER_OF_QUEUES => {
                let (nsq, ncq) = self.granted();
                u32::from(nsq) | (u32::from(ncq) << 16)
            }
            feature::INTERRUPT_COALESCING => f.coalescing,
            feature::ASYNC_EVENT_CONFIG => f.async_event_config,
            feature::VOLATILE_WRITE_CACHE => u32::from(f.volatile_write_cache),
            feature::INTERRUPT_VECTOR_CONFIG => {
                let iv = c.cdw(11) & 0xffff;
                if iv > u32::from(MAX_IO_QUEUES) {
                    return Err(regs::INVALID_FIELD);
                }
                iv | (((f.coalescing_disabled >> iv) & 1) << 16)
            }
            // 343 K: what the composite temperature threshold defaults to.
            feature::TEMPERATURE_THRESHOLD => 343,
            feature::ARBITRATION
            | feature::POWER_MANAGEMENT
            | feature::ERROR_RECOVERY
            | feature::WRITE_ATOMICITY => 0,
            _ => return Err(regs::INVALID_FIELD),
        })
    }

    fn set_features(&self, c: &Sqe) -> Result<u32, Status> {
        let fid = (c.cdw(10) & 0xff) as u8;
        if c.cdw(10) & (1 << 31) != 0 {
            return Err(regs::FEATURE_NOT_SAVEABLE);
        }
        let v = c.cdw(11);
        let mut f = self.features.lock().unwrap_or_else(|e| e.into_inner());
        match fid {
            feature::NUMBER_OF_QUEUES => {
                if f.io_queues_created {
                    return Err(regs::COMMAND_SEQUENCE_ERROR);
                }
                let (nsq, ncq) = ((v & 0xffff) as u16, (v >> 16) as u16);
                if nsq == 0xffff || ncq == 0xffff {
                    return Err(regs::INVALID_FIELD);
                }
                let g = (nsq.min(MAX_IO_QUEUES - 1), ncq.min(MAX_IO_QUEUES - 1));
                f.queues_granted = Some(g);
                Ok(u32::from(g.0) | (u32::from(g.1) << 16))
            }
            feature::INTERRUPT_COALESCING => {
                f.coalescing = v & 0xffff;
                Ok(0)
            }
            feature::ASYNC_EVENT_CONFIG => {
                f.async_event_config = v;
                Ok(0)
            }
            feature::VOLATILE_WRITE_CACHE => {
                f.volatile_write_cache = v & 1 != 0;
                Ok(0)
            }
            feature::INTERRUPT_VECTOR_CONFIG => {
                // Coalescing Disable (bit 16) for vector IV; the admin queue's vector 0
                // never coalesces.
                let iv = v & 0xffff;
                if iv > u32::from(MAX_IO_QUEUES) {
                    return Err(regs::INVALID_FIELD);
                }
                if v & (1 << 16) != 0 {
                    f.coalescing_disabled |= 1 << iv;
                } else {
                    f.coalescing_disabled &= !(1 << iv);
                }
                Ok(0)
            }
            feature::ARBITRATION
            | feature::POWER_MANAGEMENT
            | feature::TEMPERATURE_THRESHOLD
            | feature::ERROR_RECOVERY
            | feature::WRITE_ATOMICITY => Ok(0),
            _ => Err(regs::INVALID_FIELD),
        }
    }

    fn get_log_page(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        let lid = c.cdw(10) & 0xff;
        let numd = (((c.cdw(11) & 0xffff) << 16) | (c.cdw(10) >> 16)) as u64 + 1;
        let len = numd * 4;
        let offset = u64::from(c.cdw(12)) | (u64::from(c.cdw(13)) << 32);
        if len > 1 << 20 || offset % 4 != 0 {
            return Err(regs::INVALID_FIELD);
        }
        let page = match lid {
            // Error Information: one entry, empty.
            0x01 => vec![0u8; 64],
            0x02 => {
                let s = &self.stats;
                let units = |b: &std::sync::atomic::AtomicU64| {
                    (b.load(Ordering::Relaxed) / 512).div_ceil(1000)
                };
                identify::smart_log(
                    units(&s.read_bytes),
                    units(&s.write_bytes),
                    s.read_cmds.load(Ordering::Relaxed),
                    s.write_cmds.load(Ordering::Relaxed),
                )
            }
            // Firmware Slot Information: slot 1 active, revision 1.0.
            0x03 => {
                let mut p = vec![0u8; 512];
                p[0] = 1;
                p[8..11].copy_from_slice(b"1.0");
                p
            }
            _ => return Err(regs::INVALID_LOG_PAGE),
        };
        let mut out = vec![0u8; usize::try_from(len).map_err(|_| regs::INVALID_FIELD)?];
        if let Ok(off) = usize::try_from(offset) {
            if off < page.len() {
                let n = (page.len() - off).min(out.len());
                out[..n].copy_from_slice(&page[off..off + n]);
            }
        }
        self.give(a, c, &out)
    }

    /// A queue's base: page aligned (no PRP list: CAP.CQR asks for contiguous queues).
    fn queue_base(c: &Sqe) -> Result<u64, Status> {
        if c.prp1 == 0 || c.prp1 % regs::PAGE != 0 {
            return Err(regs::INVALID_FIELD);
        }
        Ok(c.prp1)
    }

    fn queue_size(c: &Sqe) -> Result<u32, Status> {
        let size = (c.cdw(10) >> 16) + 1;
        if !(2..=regs::MAX_QUEUE_ENTRIES).contains(&size) {
            return Err(regs::INVALID_QUEUE_SIZE);
        }
        Ok(size)
    }

    fn create_cq(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        let qid = (c.cdw(10) & 0xffff) as u16;
        let size = Self::queue_size(c)?;
        let flags = c.cdw(11);
        let (pc, ien, iv) = (flags & 1 != 0, flags & 2 != 0, (flags >> 16) as u16);
        if qid == 0 || qid > self.granted().1 + 1 || self.cq(qid).is_some() {
            return Err(regs::INVALID_QUEUE_ID);
        }
        if !pc {
            return Err(regs::INVALID_FIELD);
        }
        if iv > MAX_IO_QUEUES {
            return Err(regs::INVALID_INTERRUPT_VECTOR);
        }
        let base = Self::queue_base(c)?;
        let cq = Arc::new(Cq::new(&a.guest, qid, size, iv, ien, base));
        self.features
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .io_queues_created = true;
        self.cqs.write().unwrap_or_else(|e| e.into_inner())[usize::from(qid)] = Some(cq);
        Ok(0)
    }

    fn create_sq(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        let qid = (c.cdw(10) & 0xffff) as u16;
        let size = Self::queue_size(c)?;
        let flags = c.cdw(11);
        let (pc, cqid) = (flags & 1 != 0, (flags >> 16) as u16);
        if qid == 0 || qid > self.granted().0 + 1 || self.sq(qid).is_some() {
            return Err(regs::INVALID_QUEUE_ID);
        }
        if cqid == 0 || self.cq(cqid).is_none() {
            return Err(regs::CQ_INVALID);
        }
        if !pc {
            return Err(regs::INVALID_FIELD);
        }
        let base = Self::queue_base(c)?;
        let sq = Arc::new(Sq::new(&a.guest, qid, cqid, size, base));
        self.features
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .io_queues_created = true;
        self.sqs.write().unwrap_or_else(|e| e.into_inner())[usize::from(qid)] = Some(sq);
        Ok(0)
    }

    fn delete_sq(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        let qid = (c.cdw(10) & 0xffff) as u16;
        if qid == 0 {
            return Err(regs::INVALID_QUEUE_ID);
        }
        // Any 16-bit id may arrive: one past the queues there can be is no queue.
        let sq = self
            .sqs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(usize::from(qid))
            .and_then(Option::take);
        let sq = sq.ok_or(regs::INVALID_QUEUE_ID)?;
        // Commands of the queue still running (DMA jobs) complete implicitly: no entry of
        // the queue is posted after this one's.
        self.sq_deleted(&sq);
        sq.ring.unpin(&a.guest);
        Ok(0)
    }

    fn delete_cq(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        let qid = (c.cdw(10) & 0xffff) as u16;
        if qid == 0 || self.cq(qid).is_none() {
            return Err(regs::INVALID_QUEUE_ID);
        }
        let in_use = self
            .sqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .any(|sq| sq.cqid == qid);
        if in_use {
            return Err(regs::INVALID_QUEUE_DELETION);
        }
        let cq = self.cqs.write().unwrap_or_else(|e| e.into_inner())[usize::from(qid)].take();
        if let Some(cq) = cq {
            cq.ring.unpin(&a.guest);
        }
        Ok(0)
    }

    /// Doorbell Buffer Config: two page-aligned pages the controller can pin (shared
    /// memory); otherwise Invalid Field, and the driver goes on with real doorbells.
    fn doorbell_buffer_config(&self, a: &Attached, c: &Sqe) -> Result<u32, Status> {
        if !self.tuning.shadow_doorbells {
            return Err(regs::INVALID_OPCODE);
        }
        let aligned = |p: u64| p != 0 && p % regs::PAGE == 0;
        if !aligned(c.prp1) || !aligned(c.prp2) {
            return Err(regs::INVALID_FIELD);
        }
        // On INTx a VMM without an interrupt resampler (QEMU without KVM) takes the guest's
        // next access to the device as the end of the interrupt; a driver that consumes
        // completions through its shadow doorbell makes none, and the line it sees stays
        // asserted. Shadow doorbells need MSI or MSI-X.
        if *self.mode.lock().unwrap_or_else(|e| e.into_inner()) == umdev_pci::IrqMode::Intx {
            tracing::info!("mnvme: shadow doorbells refused: interrupts are INTx");
            return Err(regs::INVALID_FIELD);
        }
        let shadow = Region::new(&a.guest, c.prp1, regs::PAGE);
        let eventidx = Region::new(&a.guest, c.prp2, regs::PAGE);
        if !shadow.is_pinned() || !eventidx.is_pinned() {
            shadow.unpin(&a.guest);
            eventidx.unpin(&a.guest);
            tracing::info!("mnvme: shadow doorbells refused: the buffers are not in shared memory");
            return Err(regs::INVALID_FIELD);
        }
        let old = self
            .dbbuf
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(DbBuf { shadow, eventidx });
        if let Some(d) = old {
            d.shadow.unpin(&a.guest);
            d.eventidx.unpin(&a.guest);
        }
        tracing::info!(
            shadow = c.prp1,
            eventidx = c.prp2,
            "mnvme: shadow doorbells on"
        );
        Ok(0)
    }
}
