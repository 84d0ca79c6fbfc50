//! The controller: its registers, its queues, the poller that fetches commands, and the
//! completions and interrupts it posts.
//!
//! Threads. Register accesses and doorbell writes arrive on the session thread (the BAR
//! hooks); they only record values and wake the poller. The poller is a job on the device's
//! work context: it fetches commands from every submission queue (round robin, in bursts),
//! runs admin commands and I/O whose memory it can pin (the client shared it) itself, and
//! hands I/O whose memory goes through DMA messages to further jobs on the work context (so
//! many transfers are in flight at once; each waits a round trip through the client). When
//! there is nothing to do it polls a little longer (the shadow doorbells, when the driver
//! set them up), then arms the EventIdx buffer so the driver rings the real doorbell for
//! its next command, and returns. The framework drains the work context before an unmap
//! reply, a migration stop and a close; the poller then stops polling and returns as soon
//! as what is pending is done.
//!
//! Locks. The session thread (register and doorbell writes) never waits for a lock that
//! another thread may hold across a guest memory access: with plain guest memory that
//! access is a DMA message whose reply only the session thread reads. So doorbells only
//! store atomics and wake the poller; rings are reached without a lock ([`Region`]);
//! completion queue state (held while an entry is written) is the poller's and the jobs'.
//! Work that must touch guest memory (completions waiting for room, asynchronous events)
//! is left to the poller.
//!
//! Resets: a controller reset (CC.EN cleared, or the function's reset) first waits for the
//! work context to be idle, then deletes every queue. A generation number guards the rest:
//! a completion from before a reset is dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use umdev_pci::{Interrupts, IrqMode, Work};

use crate::identify::{Identity, MAX_IO_QUEUES};
use crate::mem::{Guest, Region};
use crate::namespace::Namespace;
use crate::regs::{self, Sqe, Status};

/// SQEs fetched from one queue before the next queue's turn.
const BURST: u32 = 32;
/// Queue slots: the admin queue and the I/O queues.
pub(crate) const QUEUES: usize = MAX_IO_QUEUES as usize + 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The registers the driver writes (the rest are computed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Regs {
    pub cc: u32,
    pub csts: u32,
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
    pub intms: u32,
}

/// A submission queue.
pub(crate) struct Sq {
    pub id: u16,
    pub cqid: u16,
    pub size: u32,
    pub ring: Region,
    pub head: AtomicU32,
    /// The last tail doorbell write.
    pub tail: AtomicU32,
    /// Set by Delete I/O Submission Queue; held while a completion of the queue is posted,
    /// so that none is posted once the deletion is done (its commands still running are
    /// then completed implicitly, as the specification allows, without an entry).
    pub deleted: Mutex<bool>,
}

impl Sq {
    pub fn new(g: &Guest, id: u16, cqid: u16, size: u32, base: u64) -> Sq {
        Sq {
            id,
            cqid,
            size,
            ring: Region::new(g, base, u64::from(size) * regs::SQE_SIZE),
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            deleted: Mutex::new(false),
        }
    }
}

/// A completion waiting for room in its queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Done {
    pub dw0: u32,
    pub sqid: u16,
    pub sq_head: u16,
    pub cid: u16,
    pub status: Status,
}

/// What the threads that post completions share (under [`Cq::st`]).
#[derive(Default)]
pub(crate) struct CqState {
    pub tail: u32,
    pub phase: bool,
    /// The driver's head as last seen (doorbell or shadow doorbell).
    pub head: u32,
    pub overflow: VecDeque<Done>,
}

/// A completion queue.
pub(crate) struct Cq {
    pub id: u16,
    pub size: u32,
    /// Interrupt vector (MSI-X), and whether interrupts are enabled.
    pub iv: u16,
    pub ien: bool,
    pub ring: Region,
    pub st: Mutex<CqState>,
    /// The last head doorbell write (the session thread's only access).
    pub db_head: AtomicU32,
    /// The tail as posted, for the INTx level.
    pub posted_tail: AtomicU32,
    /// Completions waiting for room (mirrors `st.overflow.len()`).
    pub backlog: AtomicU32,
    /// Entries posted since the last interrupt, and when the first of them was.
    pub unsignalled: AtomicU32,
    pub unsignalled_since: Mutex<Option<Instant>>,
}

impl Cq {
    pub fn new(g: &Guest, id: u16, size: u32, iv: u16, ien: bool, base: u64) -> Cq {
        Cq {
            id,
            size,
            iv,
            ien,
            ring: Region::new(g, base, u64::from(size) * regs::CQE_SIZE),
            st: Mutex::new(CqState {
                phase: true,
                ..CqState::default()
            }),
            db_head: AtomicU32::new(0),
            posted_tail: AtomicU32::new(0),
            backlog: AtomicU32::new(0),
            unsignalled: AtomicU32::new(0),
            unsignalled_since: Mutex::new(None),
        }
    }
}

/// The shadow doorbell and EventIdx buffers (Doorbell Buffer Config).
pub(crate) struct DbBuf {
    pub shadow: Region,
    pub eventidx: Region,
}

/// Features the driver sets.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Features {
    /// Interrupt Coalescing (08h): aggregation threshold (bits 7:0, entries, 0-based) and
    /// time (bits 15:8, 100 us units).
    pub coalescing: u32,
    /// Interrupt Vector Configuration (09h): vectors with coalescing disabled (bit = vector).
    pub coalescing_disabled: u32,
    pub async_event_config: u32,
    pub volatile_write_cache: bool,
    /// Queues granted by Number of Queues (0-based), once set.
    pub queues_granted: Option<(u16, u16)>,
    /// An I/O queue was created since the last reset (Number of Queues is fixed from then).
    pub io_queues_created: bool,
}

/// Counters for SMART.
#[derive(Default)]
pub(crate) struct Stats {
    pub read_cmds: AtomicU64,
    pub write_cmds: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

/// What the controller holds while a client is attached.
#[derive(Clone)]
pub(crate) struct Attached {
    pub guest: Guest,
    pub irqs: Interrupts,
    pub work: Work,
}

/// Tunables from the parent's options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    /// How long the poller keeps polling with nothing to do before it sleeps.
    pub poll: Duration,
    /// Whether Doorbell Buffer Config is offered.
    pub shadow_doorbells: bool,
    /// Whether migration copies the namespace (pre-copy) instead of sharing its file.
    pub copy_on_migrate: bool,
}

pub(crate) struct Ctrl {
    pub ns: Namespace,
    pub identity: Mutex<Identity>,
    pub regs: Mutex<Regs>,
    pub sqs: RwLock<Vec<Option<Arc<Sq>>>>,
    pub cqs: RwLock<Vec<Option<Arc<Cq>>>>,
    pub attached: RwLock<Option<Attached>>,
    pub mode: Mutex<IrqMode>,
    /// A poller job is queued or running.
    scheduled: AtomicBool,
    /// Not stopped by migration.
    pub running: AtomicBool,
    /// Bumped at every controller reset.
    pub generation: AtomicU64,
    pub dbbuf: RwLock<Option<DbBuf>>,
    /// Outstanding Asynchronous Event Requests (command ids) and events to report.
    pub aers: Mutex<(Vec<u16>, VecDeque<u32>)>,
    pub features: Mutex<Features>,
    pub stats: Stats,
    pub tuning: Tuning,
    /// The INTx line's level as last set.
    intx: AtomicBool,
    /// A doorbell ioeventfd was used without shadow doorbells (logged once).
    warned_iofd: AtomicBool,
}

impl Ctrl {
    pub fn new(ns: Namespace, identity: Identity, tuning: Tuning) -> Ctrl {
        Ctrl {
            ns,
            identity: Mutex::new(identity),
            regs: Mutex::new(Regs::default()),
            sqs: RwLock::new(vec![None; QUEUES]),
            cqs: RwLock::new(vec![None; QUEUES]),
            attached: RwLock::new(None),
            mode: Mutex::new(IrqMode::Intx),
            scheduled: AtomicBool::new(false),
            running: AtomicBool::new(true),
            generation: AtomicU64::new(0),
            dbbuf: RwLock::new(None),
            aers: Mutex::new((Vec::new(), VecDeque::new())),
            features: Mutex::new(Features {
                volatile_write_cache: true,
                ..Features::default()
            }),
            stats: Stats::default(),
            tuning,
            intx: AtomicBool::new(false),
            warned_iofd: AtomicBool::new(false),
        }
    }

    pub fn attached(&self) -> Option<Attached> {
        self.attached
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn sq(&self, id: u16) -> Option<Arc<Sq>> {
        self.sqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(usize::from(id))
            .cloned()
            .flatten()
    }

    pub fn cq(&self, id: u16) -> Option<Arc<Cq>> {
        self.cqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(usize::from(id))
            .cloned()
            .flatten()
    }

    fn all_sqs(&self) -> Vec<Arc<Sq>> {
        self.sqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    fn all_cqs(&self) -> Vec<Arc<Cq>> {
        self.cqs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn enabled(&self) -> bool {
        lock(&self.regs).csts & regs::CSTS_RDY != 0
    }

    // ---- registers (session thread) ----

    /// CAP: MQES, CQR, TO (10 s), DSTRD 0, CSS (NVM), MPSMIN/MAX 4 KiB.
    pub fn cap() -> u64 {
        u64::from(regs::MAX_QUEUE_ENTRIES - 1) | (1 << 16) | (20 << 24) | (1 << 37)
    }

    pub fn read_reg(&self, off: u64) -> u64 {
        let r = *lock(&self.regs);
        match off {
            regs::CAP => Self::cap(),
            regs::VS => u64::from(regs::VERSION),
            regs::INTMS | regs::INTMC => u64::from(r.intms),
            regs::CC => u64::from(r.cc),
            regs::CSTS => u64::from(r.csts),
            regs::AQA => u64::from(r.aqa),
            regs::ASQ => r.asq,
            regs::ACQ => r.acq,
            _ => 0,
        }
    }

    /// A 4-byte register write at `off` below the doorbells (8-byte writes arrive as two).
    pub fn write_reg(self: &Arc<Self>, off: u64, v32: u32) {
        let v = u64::from(v32);
        match off {
            regs::INTMS => {
                lock(&self.regs).intms |= v32;
                self.update_intx();
            }
            regs::INTMC => {
                lock(&self.regs).intms &= !v32;
                self.update_intx();
                self.signal_all(true);
            }
            regs::CC => self.write_cc(v32),
            regs::AQA => lock(&self.regs).aqa = v32 & 0x0fff_0fff,
            regs::ASQ => {
                let mut r = lock(&self.regs);
                r.asq = (r.asq & !0xffff_ffff) | (v & !0xfff);
            }
            regs::ACQ => {
                let mut r = lock(&self.regs);
                r.acq = (r.acq & !0xffff_ffff) | (v & !0xfff);
            }
            regs::ASQ_HI => {
                let mut r = lock(&self.regs);
                r.asq = (r.asq & 0xffff_ffff) | (v << 32);
            }
            regs::ACQ_HI => {
                let mut r = lock(&self.regs);
                r.acq = (r.acq & 0xffff_ffff) | (v << 32);
            }
            // CAP, VS, CSTS, NSSR (no subsystem reset offered) are read-only here.
            _ => {}
        }
    }

    fn write_cc(self: &Arc<Self>, cc: u32) {
        let old = lock(&self.regs).cc;
        let enable = cc & regs::CC_EN != 0;
        let was = old & regs::CC_EN != 0;
        let shn = (cc >> regs::CC_SHN_SHIFT) & 3;
        let old_shn = (old >> regs::CC_SHN_SHIFT) & 3;
        lock(&self.regs).cc = cc;
        if was && !enable {
            self.reset(false);
            return;
        }
        if !was && enable {
            self.enable();
        }
        if shn != 0 && old_shn == 0 {
            self.shutdown();
        }
    }

    /// CC.EN 0 -> 1: checks the configuration and creates the admin queues.
    fn enable(self: &Arc<Self>) {
        let r = *lock(&self.regs);
        let iosqes = (r.cc >> 16) & 0xf;
        let iocqes = (r.cc >> 20) & 0xf;
        let mps = (r.cc >> 7) & 0xf;
        let css = (r.cc >> 4) & 7;
        let sq_size = (r.aqa & 0xfff) + 1;
        let cq_size = ((r.aqa >> 16) & 0xfff) + 1;
        // IOSQES/IOCQES may still be 0 here (Linux sets them with EN); a later I/O queue
        // creation checks them.
        let bad = mps != 0
            || css != 0
            || (iosqes != 0 && iosqes != 6)
            || (iocqes != 0 && iocqes != 4)
            || sq_size < 2
            || cq_size < 2
            || r.asq == 0
            || r.acq == 0;
        if bad {
            tracing::warn!(
                cc = r.cc,
                aqa = r.aqa,
                "mnvme: controller enabled with an invalid configuration: fatal status"
            );
            lock(&self.regs).csts = regs::CSTS_CFS;
            return;
        }
        let Some(a) = self.attached() else {
            lock(&self.regs).csts = regs::CSTS_CFS;
            return;
        };
        let cq = Arc::new(Cq::new(&a.guest, 0, cq_size, 0, true, r.acq));
        let sq = Arc::new(Sq::new(&a.guest, 0, 0, sq_size, r.asq));
        self.cqs.write().unwrap_or_else(|e| e.into_inner())[0] = Some(cq);
        self.sqs.write().unwrap_or_else(|e| e.into_inner())[0] = Some(sq);
        lock(&self.regs).csts = regs::CSTS_RDY;
        tracing::info!(sq_size, cq_size, "mnvme: controller enabled");
    }

    /// Shutdown notification: everything pending done, the backing file flushed.
    fn shutdown(self: &Arc<Self>) {
        if let Some(a) = self.attached() {
            a.work.wait_idle();
        }
        if let Err(e) = self.ns.flush() {
            tracing::warn!(error = %e, "mnvme: flushing the namespace at shutdown");
        }
        let mut r = lock(&self.regs);
        r.csts = (r.csts & !(3 << 2)) | regs::CSTS_SHST_COMPLETE;
        tracing::info!("mnvme: shutdown complete");
    }

    /// Controller reset (CC.EN cleared: `full` false keeps the admin queue registers) or
    /// function reset (`full`). Waits for the work context first.
    pub fn reset(self: &Arc<Self>, full: bool) {
        let attached = self.attached();
        if let Some(a) = &attached {
            a.work.wait_idle();
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        let guest = attached.as_ref().map(|a| a.guest.clone());
        for q in self
            .sqs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            if let (Some(sq), Some(g)) = (q.take(), &guest) {
                sq.ring.unpin(g);
            }
        }
        for q in self
            .cqs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
        {
            if let (Some(cq), Some(g)) = (q.take(), &guest) {
                cq.ring.unpin(g);
            }
        }
        if let Some(d) = self.dbbuf.write().unwrap_or_else(|e| e.into_inner()).take() {
            if let Some(g) = &guest {
                d.shadow.unpin(g);
                d.eventidx.unpin(g);
            }
        }
        *lock(&self.aers) = (Vec::new(), VecDeque::new());
        *lock(&self.features) = Features {
            volatile_write_cache: true,
            ..Features::default()
        };
        {
            let mut r = lock(&self.regs);
            let keep = *r;
            *r = Regs::default();
            if !full {
                r.aqa = keep.aqa;
                r.asq = keep.asq;
                r.acq = keep.acq;
            }
        }
        self.set_intx(false);
        tracing::info!(full, "mnvme: controller reset");
    }

    // ---- doorbells (session thread) ----

    /// A doorbell write at `off` (from [`regs::DOORBELLS`]): recorded, and the poller
    /// woken when it has something to do.
    pub fn doorbell(self: &Arc<Self>, off: u64, value: u32) {
        let index = (off - regs::DOORBELLS) / 4;
        let qid = u16::try_from(index / 2).unwrap_or(u16::MAX);
        let is_cq = index % 2 == 1;
        if !self.enabled() {
            return;
        }
        if is_cq {
            let Some(cq) = self.cq(qid) else {
                return self
                    .async_error(0x00, "doorbell of a completion queue that does not exist");
            };
            if value >= cq.size {
                return self.async_error(0x01, "completion queue head past the queue");
            }
            cq.db_head.store(value, Ordering::Release);
            self.update_intx();
            if cq.backlog.load(Ordering::Acquire) > 0 {
                self.kick();
            }
        } else {
            let Some(sq) = self.sq(qid) else {
                return self
                    .async_error(0x00, "doorbell of a submission queue that does not exist");
            };
            if value >= sq.size {
                return self.async_error(0x01, "submission queue tail past the queue");
            }
            sq.tail.store(value, Ordering::Release);
            self.kick();
        }
    }

    /// A submission queue's ioeventfd was signalled: the tail is in the shadow doorbell.
    pub fn doorbell_signalled(self: &Arc<Self>) {
        if self
            .dbbuf
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_none()
            && !self.warned_iofd.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "mnvme: a doorbell ioeventfd was signalled without shadow doorbells: the tail it wrote is lost"
            );
        }
        self.kick();
    }

    /// Wakes the poller if it is not running.
    pub fn kick(self: &Arc<Self>) {
        if !self.running.load(Ordering::Acquire) || self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(a) = self.attached() else {
            self.scheduled.store(false, Ordering::Release);
            return;
        };
        let me = self.clone();
        if a.work.submit(move || me.poll()).is_err() {
            self.scheduled.store(false, Ordering::Release);
        }
    }

    /// An error asynchronous event (status type 0: error; `info`: invalid doorbell register
    /// 0, invalid doorbell value 1), reported by the poller to an outstanding AER. An event
    /// already waiting for an AER is not queued (nor logged) again: a driver writing bad
    /// doorbells in a loop grows neither the queue nor the log.
    pub fn async_error(self: &Arc<Self>, info: u32, why: &str) {
        let event = info << 8;
        {
            let mut a = lock(&self.aers);
            if a.1.contains(&event) {
                return;
            }
            a.1.push_back(event);
        }
        tracing::warn!(why, "mnvme: the driver wrote an invalid doorbell");
        self.kick();
    }

    /// Completes outstanding AERs with queued events (poller).
    pub fn deliver_aers(self: &Arc<Self>) {
        let mut done = Vec::new();
        {
            let mut a = lock(&self.aers);
            while !a.0.is_empty() && !a.1.is_empty() {
                let cid = a.0.remove(0);
                let ev = a.1.pop_front().unwrap_or(0);
                done.push((cid, ev));
            }
        }
        let gen = self.generation.load(Ordering::Acquire);
        for (cid, ev) in done {
            if let Some(sq) = self.sq(0) {
                self.complete(gen, &sq, cid, ev, regs::SUCCESS);
            }
        }
    }

    // ---- the poller (work context) ----

    /// Tail of `sq` from the shadow doorbell (I/O queues, once configured), else the last
    /// doorbell write.
    fn tail(&self, sq: &Sq) -> u32 {
        if sq.id != 0 {
            if let Some(a) = self.attached() {
                if let Some(d) = &*self.dbbuf.read().unwrap_or_else(|e| e.into_inner()) {
                    let mut b = [0u8; 4];
                    if d.shadow
                        .read(&a.guest, u64::from(sq.id) * 8, &mut b)
                        .is_ok()
                    {
                        let v = u32::from_le_bytes(b);
                        if v < sq.size {
                            return v;
                        }
                    }
                }
            }
        }
        sq.tail.load(Ordering::Acquire)
    }

    /// Whether the poller has something to do: commands to fetch, completions waiting
    /// for room that now have it, events for outstanding AERs.
    fn has_work(&self, g: &Guest) -> bool {
        let commands = self
            .all_sqs()
            .iter()
            .any(|sq| sq.head.load(Ordering::Acquire) != self.tail(sq));
        let backlog = self.all_cqs().iter().any(|cq| {
            cq.backlog.load(Ordering::Acquire) > 0
                && (cq.posted_tail.load(Ordering::Acquire) + 1) % cq.size != self.cq_head(g, cq)
        });
        let events = {
            let a = lock(&self.aers);
            !a.0.is_empty() && !a.1.is_empty()
        };
        commands || backlog || events
    }

    /// Completions that waited for room, and asynchronous events: the poller's chores
    /// besides commands.
    fn chores(self: &Arc<Self>, g: &Guest) {
        for cq in self.all_cqs() {
            if cq.backlog.load(Ordering::Acquire) > 0 {
                self.cq_room(g, &cq);
            }
        }
        self.deliver_aers();
    }

    /// The poller: fetch and run commands until there is nothing to do (see the module
    /// docs).
    fn poll(self: Arc<Self>) {
        let Some(a) = self.attached() else {
            self.scheduled.store(false, Ordering::Release);
            return;
        };
        let mut idle_since: Option<Instant> = None;
        loop {
            self.chores(&a.guest);
            let did = self.running.load(Ordering::Acquire) && self.process_batch(&a);
            self.signal_all(false);
            if did {
                idle_since = None;
                continue;
            }
            let now = Instant::now();
            let since = *idle_since.get_or_insert(now);
            let stopping = a.work.draining() || !self.running.load(Ordering::Acquire);
            if !stopping && now.duration_since(since) < self.tuning.poll {
                std::thread::yield_now();
                continue;
            }
            // Going to sleep: every posted entry signalled, and the driver must ring for
            // its next command.
            self.signal_all(true);
            self.arm_eventidx(&a.guest);
            std::sync::atomic::fence(Ordering::SeqCst);
            if !stopping && self.has_work(&a.guest) {
                idle_since = None;
                continue;
            }
            self.scheduled.store(false, Ordering::SeqCst);
            if !stopping && self.has_work(&a.guest) && !self.scheduled.swap(true, Ordering::AcqRel)
            {
                idle_since = None;
                continue;
            }
            return;
        }
    }

    /// Fetches and runs up to a burst from each queue; whether anything was fetched.
    fn process_batch(self: &Arc<Self>, a: &Attached) -> bool {
        let mut did = false;
        let gen = self.generation.load(Ordering::Acquire);
        for sq in self.all_sqs() {
            // A queue deleted earlier in this pass (by a Delete I/O Submission Queue on the
            // admin queue) is not fetched from: its commands would complete after the
            // deletion's completion, from a ring the driver may already have freed.
            if !self.sq(sq.id).is_some_and(|live| Arc::ptr_eq(&live, &sq)) {
                continue;
            }
            let tail = self.tail(&sq);
            let mut n = 0;
            while n < BURST {
                let head = sq.head.load(Ordering::Acquire);
                if head == tail {
                    break;
                }
                let mut b = [0u8; 64];
                let fetched = sq
                    .ring
                    .read(&a.guest, u64::from(head) * regs::SQE_SIZE, &mut b);
                if let Err(e) = fetched {
                    tracing::warn!(sq = sq.id, error = %e, "mnvme: cannot fetch a command; controller fatal");
                    lock(&self.regs).csts |= regs::CSTS_CFS;
                    return did;
                }
                sq.head.store((head + 1) % sq.size, Ordering::Release);
                let sqe = Sqe::parse(&b);
                if sq.id == 0 {
                    self.admin(a, gen, &sq, &sqe);
                } else {
                    self.io(a, gen, &sq, sqe);
                }
                n += 1;
                did = true;
            }
            if n > 0 && sq.id != 0 {
                // Busy: the driver need not ring while the poller looks at the shadow tail.
                self.quiet_eventidx(&a.guest, &sq, tail);
            }
        }
        did
    }

    /// Sets every EventIdx to the queue's current shadow value, so that the driver rings
    /// the doorbell for its next submission (and for its next completion queue head, which
    /// a level-triggered INTx needs to see).
    fn arm_eventidx(&self, g: &Guest) {
        let dbbuf = self.dbbuf.read().unwrap_or_else(|e| e.into_inner());
        let Some(d) = &*dbbuf else { return };
        for sq in self.all_sqs().iter().filter(|q| q.id != 0) {
            let mut b = [0u8; 4];
            if d.shadow.read(g, u64::from(sq.id) * 8, &mut b).is_ok() {
                let _ = d.eventidx.write(g, u64::from(sq.id) * 8, &b);
            }
        }
        for cq in self.all_cqs().iter().filter(|q| q.id != 0) {
            let mut b = [0u8; 4];
            if d.shadow.read(g, u64::from(cq.id) * 8 + 4, &mut b).is_ok() {
                let _ = d.eventidx.write(g, u64::from(cq.id) * 8 + 4, &b);
            }
        }
    }

    /// While polling, the EventIdx of `sq` (and of its completion queue) far from where the
    /// driver is: it does not ring for submissions nor for the heads it consumes.
    pub fn quiet_eventidx(&self, g: &Guest, sq: &Sq, tail: u32) {
        if let Some(d) = &*self.dbbuf.read().unwrap_or_else(|e| e.into_inner()) {
            let far = (tail + sq.size / 2) % sq.size;
            let _ = d
                .eventidx
                .write(g, u64::from(sq.id) * 8, &far.to_le_bytes());
            if let Some(cq) = self.cq(sq.cqid) {
                let head = self.cq_head(g, &cq);
                let far = (head + cq.size / 2) % cq.size;
                let _ = d
                    .eventidx
                    .write(g, u64::from(cq.id) * 8 + 4, &far.to_le_bytes());
            }
        }
    }

    // ---- completions and interrupts (poller and worker jobs) ----

    /// The driver's head of `cq`: its shadow doorbell (I/O queues, once configured), else
    /// its last doorbell write.
    fn cq_head(&self, g: &Guest, cq: &Cq) -> u32 {
        if cq.id != 0 {
            if let Some(d) = &*self.dbbuf.read().unwrap_or_else(|e| e.into_inner()) {
                let mut b = [0u8; 4];
                if d.shadow.read(g, u64::from(cq.id) * 8 + 4, &mut b).is_ok() {
                    let v = u32::from_le_bytes(b);
                    if v < cq.size {
                        return v;
                    }
                }
            }
        }
        cq.db_head.load(Ordering::Acquire)
    }

    /// Posts a completion for command `cid` of `sq` (dropped if the controller was reset
    /// since the command was fetched, generation `gen`); a full queue keeps it until the
    /// driver makes room.
    pub fn complete(self: &Arc<Self>, gen: u64, sq: &Sq, cid: u16, dw0: u32, status: Status) {
        if self.generation.load(Ordering::Acquire) != gen {
            return;
        }
        let Some(cq) = self.cq(sq.cqid) else { return };
        let done = Done {
            dw0,
            sqid: sq.id,
            sq_head: u16::try_from(sq.head.load(Ordering::Acquire)).unwrap_or(0),
            cid,
            status,
        };
        let Some(a) = self.attached() else { return };
        let deleted = lock(&sq.deleted);
        if *deleted {
            return;
        }
        let mut st = lock(&cq.st);
        if !st.overflow.is_empty() || self.cq_full(&a.guest, &cq, &mut st) {
            st.overflow.push_back(done);
            cq.backlog.fetch_add(1, Ordering::AcqRel);
            return;
        }
        self.post(&a.guest, &cq, &mut st, done);
    }

    fn cq_full(&self, g: &Guest, cq: &Cq, st: &mut CqState) -> bool {
        if (st.tail + 1) % cq.size != st.head {
            return false;
        }
        st.head = self.cq_head(g, cq);
        (st.tail + 1) % cq.size == st.head
    }

    fn post(&self, g: &Guest, cq: &Cq, st: &mut CqState, d: Done) {
        let entry = regs::cqe(d.dw0, d.sq_head, d.sqid, d.cid, st.phase, d.status);
        let at = u64::from(st.tail) * regs::CQE_SIZE;
        if let Err(e) = cq.ring.write(g, at, &entry) {
            tracing::warn!(cq = cq.id, error = %e, "mnvme: cannot post a completion");
            return;
        }
        st.tail = (st.tail + 1) % cq.size;
        if st.tail == 0 {
            st.phase = !st.phase;
        }
        cq.posted_tail.store(st.tail, Ordering::Release);
        if cq.unsignalled.fetch_add(1, Ordering::AcqRel) == 0 {
            *lock(&cq.unsignalled_since) = Some(Instant::now());
        }
    }

    /// Submission queue `sq` was deleted: no completion of it is posted from now on, and
    /// those waiting for room in its completion queue are dropped.
    pub fn sq_deleted(&self, sq: &Sq) {
        *lock(&sq.deleted) = true;
        if let Some(cq) = self.cq(sq.cqid) {
            let mut st = lock(&cq.st);
            let before = st.overflow.len();
            st.overflow.retain(|d| d.sqid != sq.id);
            let dropped = u32::try_from(before - st.overflow.len()).unwrap_or(u32::MAX);
            cq.backlog.fetch_sub(dropped, Ordering::AcqRel);
        }
    }

    /// Posts what waited for room in `cq` (poller).
    fn cq_room(&self, g: &Guest, cq: &Cq) {
        let mut st = lock(&cq.st);
        while let Some(d) = st.overflow.front().copied() {
            if self.cq_full(g, cq, &mut st) {
                break;
            }
            st.overflow.pop_front();
            cq.backlog.fetch_sub(1, Ordering::AcqRel);
            self.post(g, cq, &mut st, d);
        }
    }

    /// Whether interrupt coalescing (feature 08h) lets `cq` wait: below the aggregation
    /// threshold and younger than the aggregation time, on a vector that coalesces (the
    /// admin queue's never does).
    fn may_wait(&self, cq: &Cq, entries: u32) -> bool {
        if cq.id == 0 {
            return false;
        }
        let f = *lock(&self.features);
        let threshold = (f.coalescing & 0xff) + 1;
        let time = Duration::from_micros(100 * u64::from((f.coalescing >> 8) & 0xff));
        if threshold <= 1 || f.coalescing_disabled & (1 << cq.iv.min(31)) != 0 {
            return false;
        }
        let young = lock(&cq.unsignalled_since).is_some_and(|t| t.elapsed() < time);
        entries < threshold && young
    }

    /// Raises `cq`'s interrupt if entries were posted since the last one (MSI-X: its
    /// vector; MSI: vector 0 unless masked; INTx: the level). Entries posted together get
    /// one interrupt; with coalescing set, an interrupt waits for the threshold or the
    /// time, unless `now` (the poller is going to sleep: it would not come back for them).
    /// Returns whether entries are left unsignalled.
    pub fn signal(&self, cq: &Cq, now: bool) -> bool {
        if !cq.ien {
            return false;
        }
        let n = cq.unsignalled.load(Ordering::Acquire);
        if n == 0 {
            return false;
        }
        if !now && self.may_wait(cq, n) {
            return true;
        }
        cq.unsignalled.store(0, Ordering::Release);
        *lock(&cq.unsignalled_since) = None;
        let Some(a) = self.attached() else {
            return false;
        };
        let mode = *lock(&self.mode);
        match mode {
            IrqMode::Msix => a.irqs.trigger_msix(u32::from(cq.iv)),
            IrqMode::Msi => {
                if lock(&self.regs).intms & 1 == 0 {
                    a.irqs.trigger_msi(0);
                }
            }
            IrqMode::Intx => self.update_intx(),
        }
        false
    }

    /// Signals every completion queue with posted entries (see [`Ctrl::signal`]).
    pub fn signal_all(&self, now: bool) {
        for cq in self.all_cqs() {
            self.signal(&cq, now);
        }
    }

    fn set_intx(&self, level: bool) {
        if self.intx.swap(level, Ordering::AcqRel) != level {
            if let Some(a) = self.attached() {
                a.irqs.set_intx(level);
            }
        }
    }

    /// INTx: asserted while a completion queue with interrupts enabled holds entries the
    /// driver has not consumed, unless masked (INTMS bit 0). Reads only atomics and the
    /// shadow doorbells (never waits for a DMA message: it runs on the session thread).
    pub fn update_intx(&self) {
        let mode = *lock(&self.mode);
        if mode != IrqMode::Intx {
            return;
        }
        let masked = lock(&self.regs).intms & 1 != 0;
        let guest = self.attached().map(|a| a.guest);
        let pending = self.all_cqs().iter().any(|cq| {
            let head = match &guest {
                Some(g) => self.cq_head(g, cq),
                None => cq.db_head.load(Ordering::Acquire),
            };
            cq.ien && cq.posted_tail.load(Ordering::Acquire) != head
        });
        self.set_intx(pending && !masked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Mnvme;
    use umdev_dma::{Dma, DmaError};
    use umdev_pci::PciFunction;

    /// 64 KiB of guest memory at IOVA 0, reached through DMA copies.
    struct Mem(Mutex<Vec<u8>>);

    impl Dma for Mem {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let m = lock(&self.0);
            let at = usize::try_from(iova).map_err(|_| DmaError::Fault { iova })?;
            let src = m.get(at..at + buf.len()).ok_or(DmaError::Fault { iova })?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            let mut m = lock(&self.0);
            let at = usize::try_from(iova).map_err(|_| DmaError::Fault { iova })?;
            m.get_mut(at..at + data.len())
                .ok_or(DmaError::Fault { iova })?
                .copy_from_slice(data);
            Ok(())
        }
    }

    const ASQ: u64 = 0x1000;
    const ACQ: u64 = 0x2000;
    const IOSQ: u64 = 0x3000;
    const IOCQ: u64 = 0x4000;

    fn sqe(opcode: u8, cid: u16, nsid: u32, prp1: u64, cdw10: u32, cdw11: u32) -> [u8; 64] {
        Sqe {
            opcode,
            cid,
            nsid,
            prp1,
            cdw: [cdw10, cdw11, 0, 0, 0, 0],
            ..Sqe::default()
        }
        .to_bytes()
    }

    fn cqe(mem: &Mem, base: u64, slot: u64) -> (u16, u16, bool, u16) {
        let mut b = [0u8; 16];
        mem.read(base + slot * regs::CQE_SIZE, &mut b).unwrap();
        let sf = u16::from_le_bytes([b[14], b[15]]);
        let sqid = u16::from_le_bytes([b[10], b[11]]);
        let cid = u16::from_le_bytes([b[12], b[13]]);
        (sqid, cid, sf & 1 != 0, sf >> 1)
    }

    /// An enabled controller (admin queues of 4 entries) open for a client with `Mem`.
    fn enabled() -> (tempfile::TempDir, Arc<Ctrl>, PciFunction, Arc<Mem>) {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::open(&dir.path().join("ns.img"), 1 << 20).unwrap();
        let tuning = Tuning {
            poll: Duration::ZERO,
            shadow_doorbells: true,
            copy_on_migrate: false,
        };
        let ctrl = Arc::new(Ctrl::new(ns, Identity::of_uuid([7; 16], "t"), tuning));
        let spec = crate::device::spec().unwrap();
        let mut f = PciFunction::new(spec, Box::new(Mnvme { ctrl: ctrl.clone() }));
        let mem = Arc::new(Mem(Mutex::new(vec![0; 64 * 1024])));
        f.open(mem.clone()).unwrap();
        ctrl.write_reg(regs::AQA, (3 << 16) | 3);
        ctrl.write_reg(regs::ASQ, u32::try_from(ASQ).unwrap());
        ctrl.write_reg(regs::ACQ, u32::try_from(ACQ).unwrap());
        ctrl.write_reg(regs::CC, regs::CC_EN | (6 << 16) | (4 << 20));
        assert!(ctrl.enabled());
        (dir, ctrl, f, mem)
    }

    /// Found reviewing the `nvme` fuzz target: every invalid doorbell write queued an
    /// asynchronous event (and logged a warning), so a driver writing them in a loop grew
    /// the daemon's memory and log without bound.
    #[test]
    fn fuzz_nvme_invalid_doorbells_queue_one_event_each_kind() {
        let (_dir, ctrl, mut f, _mem) = enabled();
        for _ in 0..10_000 {
            // Submission queue 5 does not exist; the admin SQ's tail past its 4 entries.
            ctrl.doorbell(regs::DOORBELLS + 5 * 8, 1);
            ctrl.doorbell(regs::DOORBELLS, 100);
        }
        f.drain_work();
        assert_eq!(lock(&ctrl.aers).1.len(), 2);
        f.close();
    }

    /// Found by the `nvme` fuzz target: Delete I/O Submission Queue of a queue id past the
    /// queues there can be indexed past the queue table (a panic on the poller).
    #[test]
    fn fuzz_nvme_delete_sq_of_any_queue_id() {
        let (_dir, ctrl, mut f, mem) = enabled();
        for (slot, qid) in [(0u16, 0x600u32), (1, 17), (2, 0xffff)] {
            let at = ASQ + u64::from(slot) * 64;
            mem.write(at, &sqe(regs::admin::DELETE_SQ, slot, 0, 0, qid, 0))
                .unwrap();
        }
        ctrl.doorbell(regs::DOORBELLS, 3);
        f.drain_work();
        for slot in 0..3u16 {
            let (sqid, cid, phase, status) = cqe(&mem, ACQ, u64::from(slot));
            assert_eq!((sqid, cid, phase), (0, slot, true));
            assert_eq!(status & 0x7ff, regs::INVALID_QUEUE_ID.field() & 0x7ff);
        }
        f.close();
    }

    /// Creates CQ 1 of 4 entries (through admin slots 0 and 1) and SQ 1 of `sq_entries` on it.
    fn io_pair(ctrl: &Arc<Ctrl>, f: &mut PciFunction, mem: &Mem, sq_entries: u32) {
        let create_cq = sqe(regs::admin::CREATE_CQ, 1, 0, IOCQ, (3 << 16) | 1, 1);
        mem.write(ASQ, &create_cq).unwrap();
        let size = (sq_entries - 1) << 16;
        let create_sq = sqe(regs::admin::CREATE_SQ, 2, 0, IOSQ, size | 1, 1 | (1 << 16));
        mem.write(ASQ + 64, &create_sq).unwrap();
        ctrl.doorbell(regs::DOORBELLS, 2);
        f.drain_work();
        assert_eq!(cqe(mem, ACQ, 1), (0, 2, true, 0), "SQ 1 created");
    }

    /// Found reviewing the `nvme` fuzz target: completions of a submission queue that
    /// waited for room in a full completion queue were posted after the queue's deletion
    /// had completed (as could those of commands still running in DMA jobs).
    #[test]
    fn fuzz_nvme_no_completion_waits_out_its_queues_deletion() {
        let (_dir, ctrl, mut f, mem) = enabled();
        let admin_db = regs::DOORBELLS;
        let (sq1_db, cq1_db) = (regs::DOORBELLS + 8, regs::DOORBELLS + 12);
        // CQ 1 of 4 entries (3 usable), SQ 1 of 8.
        io_pair(&ctrl, &mut f, &mem, 8);
        // Six flushes: three fill CQ 1, three wait for room.
        for cid in 0..6u16 {
            mem.write(
                IOSQ + u64::from(cid) * 64,
                &sqe(regs::io::FLUSH, cid, 1, 0, 0, 0),
            )
            .unwrap();
        }
        ctrl.doorbell(sq1_db, 6);
        f.drain_work();
        for slot in 0..3 {
            assert!(
                cqe(&mem, IOCQ, slot).2,
                "slot {slot}: {:?}",
                cqe(&mem, IOCQ, slot)
            );
        }
        mem.write(ASQ + 128, &sqe(regs::admin::DELETE_SQ, 9, 0, 0, 1, 0))
            .unwrap();
        ctrl.doorbell(admin_db, 3);
        f.drain_work();
        assert_eq!(cqe(&mem, ACQ, 2), (0, 9, true, 0), "SQ 1 deleted");
        // The driver makes room: nothing of SQ 1 may come now.
        ctrl.doorbell(cq1_db, 3);
        ctrl.kick();
        f.drain_work();
        assert!(
            !cqe(&mem, IOCQ, 3).2,
            "a completion of SQ 1 was posted after its deletion: {:?}",
            cqe(&mem, IOCQ, 3)
        );
        f.close();
    }

    /// Found by the `nvme` fuzz target: with an I/O command and a Delete I/O Submission
    /// Queue of its queue fetched in the same pass, the command was fetched from the
    /// deleted queue and completed after the deletion's completion.
    #[test]
    fn fuzz_nvme_no_completion_after_sq_deletion() {
        let (_dir, ctrl, mut f, mem) = enabled();
        let admin_db = regs::DOORBELLS;
        let io_db = regs::DOORBELLS + 8;
        io_pair(&ctrl, &mut f, &mem, 4);

        // Both rung while the poller is held, so that one pass fetches them.
        ctrl.running.store(false, Ordering::Release);
        mem.write(IOSQ, &sqe(regs::io::FLUSH, 7, 1, 0, 0, 0))
            .unwrap();
        ctrl.doorbell(io_db, 1);
        mem.write(ASQ + 128, &sqe(regs::admin::DELETE_SQ, 9, 0, 0, 1, 0))
            .unwrap();
        ctrl.doorbell(admin_db, 3);
        ctrl.running.store(true, Ordering::Release);
        ctrl.kick();
        f.drain_work();
        assert_eq!(cqe(&mem, ACQ, 2), (0, 9, true, 0), "SQ 1 deleted");
        assert!(
            !cqe(&mem, IOCQ, 0).2,
            "a command of SQ 1 completed after its deletion: {:?}",
            cqe(&mem, IOCQ, 0)
        );
        f.close();
    }
}
