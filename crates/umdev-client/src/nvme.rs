//! A small NVMe host driver over this client: what a VMM's guest driver does to an NVMe
//! controller served over vfio-user, for tests and benchmarks.
//!
//! It keeps its own copy of the NVMe numbers it needs (from the NVMe 1.4 specification),
//! so it checks a controller rather than sharing its definitions. It drives one BAR0
//! (registers at 0, doorbells at 0x1000, stride 4), keeps an admin queue pair and any
//! number of I/O queue pairs in [`HostMemory`], writes doorbells as trapped region writes
//! or, after Doorbell Buffer Config, as shadow doorbells with EventIdx (ringing the real
//! doorbell only when the controller asks), and finds completions by their phase bit.
//!
//! Memory shared with the server (a memfd) is read and written in place; plain memory
//! (no fd: every byte goes through DMA_READ/DMA_WRITE messages) is answered by this
//! client's [`DmaHandler`](crate::DmaHandler) while the driver waits, since waiting reads CSTS (a round trip
//! that serves the server's requests queued before its reply).
//!
//! ```no_run
//! use umdev_client::{Client, nvme::{HostMemory, Nvme, NvmeOptions}};
//! let mut c = Client::connect("/run/umdev/devices/UUID/vfio-user.sock").unwrap();
//! let mem = HostMemory::shared(&mut c, 0x1000_0000, 64 << 20).unwrap();
//! let mut n = Nvme::enable(c, mem, &NvmeOptions::default()).unwrap();
//! let buf = n.mem.alloc(4096, 4096);
//! let done = n.read(1, 0, 8, buf).unwrap();
//! assert!(done.ok());
//! ```
// NVMe packs fields into dwords: each cast below takes the bits it means to.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

use crate::{Client, ClientError, VecMemory};

/// Register offsets in BAR0.
pub mod reg {
    /// Controller Capabilities.
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: u64 = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: u64 = 0x10;
    /// Controller Configuration.
    pub const CC: u64 = 0x14;
    /// Controller Status.
    pub const CSTS: u64 = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: u64 = 0x24;
    /// Admin Submission Queue base.
    pub const ASQ: u64 = 0x28;
    /// Admin Completion Queue base.
    pub const ACQ: u64 = 0x30;
    /// Submission queue `q`'s tail doorbell.
    pub const fn sq_tail(q: u16) -> u64 {
        0x1000 + 8 * q as u64
    }
    /// Completion queue `q`'s head doorbell.
    pub const fn cq_head(q: u16) -> u64 {
        0x1000 + 8 * q as u64 + 4
    }
}

/// Opcodes.
pub mod op {
    /// Delete I/O SQ.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O SQ.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O CQ.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O CQ.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0c;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Status values as `(SCT << 8) | SC`.
pub mod status {
    /// Successful Completion.
    pub const SUCCESS: u16 = 0x000;
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: u16 = 0x001;
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u16 = 0x002;
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: u16 = 0x004;
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: u16 = 0x00b;
    /// PRP Offset Invalid.
    pub const PRP_OFFSET_INVALID: u16 = 0x013;
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: u16 = 0x080;
    /// Completion Queue Invalid.
    pub const CQ_INVALID: u16 = 0x100;
    /// Invalid Queue Identifier.
    pub const INVALID_QUEUE_ID: u16 = 0x101;
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: u16 = 0x102;
    /// Asynchronous Event Request Limit Exceeded.
    pub const AER_LIMIT_EXCEEDED: u16 = 0x105;
    /// Invalid Interrupt Vector.
    pub const INVALID_INTERRUPT_VECTOR: u16 = 0x108;
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: u16 = 0x109;
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: u16 = 0x10c;
}

const PAGE: u64 = 4096;
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 2;
/// How long a wait for a completion or a status lasts before it is an error.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Why a driver call failed.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The vfio-user connection failed.
    #[error("vfio-user: {0}")]
    Client(#[from] ClientError),
    /// The controller did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The controller reported a fatal status (CSTS.CFS).
    #[error("controller fatal status")]
    Fatal,
    /// Host memory ran out or an address is outside it.
    #[error("host memory: {0}")]
    Memory(String),
    /// A completion the driver did not expect.
    #[error("unexpected completion: {0}")]
    Unexpected(String),
}

/// The memory a VMM gives its guest: shared with the server through a memfd, or plain
/// (the server reaches it through DMA messages). Addresses are IOVAs; [`HostMemory::alloc`]
/// hands out pieces of it.
pub struct HostMemory {
    iova: u64,
    len: u64,
    kind: Kind,
    next: AtomicU64,
}

enum Kind {
    Shared { region: MmapRegion, fd: OwnedFd },
    Plain(Arc<VecMemory>),
}

impl HostMemory {
    /// `len` bytes of a memfd, mapped here and DMA-mapped read-write at `iova` with the fd.
    pub fn shared(c: &mut Client, iova: u64, len: u64) -> Result<Arc<HostMemory>, NvmeError> {
        let fd = rustix::fs::memfd_create("nvme-host", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| NvmeError::Memory(format!("memfd: {e}")))?;
        rustix::fs::ftruncate(&fd, len).map_err(|e| NvmeError::Memory(format!("size: {e}")))?;
        Self::shared_fd(c, fd, iova, len)
    }

    /// `fd` (at least `len` bytes), mapped here and DMA-mapped read-write at `iova`.
    pub fn shared_fd(
        c: &mut Client,
        fd: OwnedFd,
        iova: u64,
        len: u64,
    ) -> Result<Arc<HostMemory>, NvmeError> {
        let file = std::fs::File::from(
            fd.try_clone()
                .map_err(|e| NvmeError::Memory(format!("dup: {e}")))?,
        );
        let size = usize::try_from(len).map_err(|_| NvmeError::Memory("too large".into()))?;
        let region = MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| NvmeError::Memory(format!("mmap: {e}")))?;
        c.dma_map(iova, len, 3, Some((fd.as_fd(), 0)))?;
        Ok(Arc::new(HostMemory {
            iova,
            len,
            kind: Kind::Shared { region, fd },
            next: AtomicU64::new(iova),
        }))
    }

    /// A migration destination's memory for `src`: a new memfd of the same size, mapped
    /// at the same IOVA on `c`, with the same allocations (their bytes arrive with the
    /// migration's copy).
    pub fn shared_copy_of(c: &mut Client, src: &HostMemory) -> Result<Arc<HostMemory>, NvmeError> {
        let m = Self::shared(c, src.iova, src.len)?;
        m.next
            .store(src.next.load(Ordering::Acquire), Ordering::Release);
        Ok(m)
    }

    /// `len` bytes of this process's memory, DMA-mapped at `iova` without an fd: the
    /// client answers the server's DMA_READ/DMA_WRITE for it (with a handler of its own).
    pub fn plain(c: &mut Client, iova: u64, len: u64) -> Result<Arc<HostMemory>, NvmeError> {
        let m = Arc::new(VecMemory::new());
        c.set_dma_handler(m.clone());
        Self::plain_in(c, &m, iova, len)
    }

    /// Like [`HostMemory::plain`], in the handler `vec` the client already answers with
    /// (a second range of the same guest).
    pub fn plain_in(
        c: &mut Client,
        vec: &Arc<VecMemory>,
        iova: u64,
        len: u64,
    ) -> Result<Arc<HostMemory>, NvmeError> {
        vec.add(
            iova,
            usize::try_from(len).map_err(|_| NvmeError::Memory("too large".into()))?,
        );
        c.dma_map(iova, len, 3, None)?;
        Ok(Arc::new(HostMemory {
            iova,
            len,
            kind: Kind::Plain(vec.clone()),
            next: AtomicU64::new(iova),
        }))
    }

    /// The handler behind plain memory.
    pub fn vec_memory(&self) -> Option<&Arc<VecMemory>> {
        match &self.kind {
            Kind::Plain(v) => Some(v),
            Kind::Shared { .. } => None,
        }
    }

    /// The memfd behind shared memory.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            Kind::Shared { fd, .. } => Some(fd.as_fd()),
            Kind::Plain(_) => None,
        }
    }

    /// Whether the server reaches it in place (fd-backed).
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Shared { .. })
    }

    /// First IOVA and length.
    pub fn range(&self) -> (u64, u64) {
        (self.iova, self.len)
    }

    /// `len` bytes aligned to `align` (a power of two), zeroed; panics when memory runs out
    /// (a test's sizing mistake).
    pub fn alloc(&self, len: u64, align: u64) -> u64 {
        self.try_alloc(len, align)
            .unwrap_or_else(|| panic!("host memory exhausted allocating {len} bytes"))
    }

    /// `len` bytes aligned to `align`, zeroed, if there is room.
    pub fn try_alloc(&self, len: u64, align: u64) -> Option<u64> {
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let at = cur.checked_add(align - 1)? & !(align - 1);
            let end = at.checked_add(len)?;
            if end > self.iova + self.len {
                return None;
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.fill(at, len, 0).ok()?;
                    return Some(at);
                }
                Err(now) => cur = now,
            }
        }
    }

    fn offset(&self, iova: u64, len: usize) -> Result<usize, NvmeError> {
        let ok = iova >= self.iova && iova - self.iova + len as u64 <= self.len;
        if !ok {
            return Err(NvmeError::Memory(format!(
                "{iova:#x}+{len:#x} is outside host memory"
            )));
        }
        usize::try_from(iova - self.iova).map_err(|_| NvmeError::Memory("offset".into()))
    }

    /// Copies memory at `iova` into `buf`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), NvmeError> {
        let off = self.offset(iova, buf.len())?;
        match &self.kind {
            Kind::Shared { region, .. } => {
                let s = region
                    .get_slice(off, buf.len())
                    .map_err(|e| NvmeError::Memory(e.to_string()))?;
                s.copy_to(buf);
            }
            Kind::Plain(m) => {
                m.with(iova, buf.len(), |b| buf.copy_from_slice(b));
            }
        }
        Ok(())
    }

    /// Copies `data` into memory at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), NvmeError> {
        let off = self.offset(iova, data.len())?;
        match &self.kind {
            Kind::Shared { region, .. } => {
                let s = region
                    .get_slice(off, data.len())
                    .map_err(|e| NvmeError::Memory(e.to_string()))?;
                s.copy_from(data);
            }
            Kind::Plain(m) => {
                m.with(iova, data.len(), |b| b.copy_from_slice(data));
            }
        }
        Ok(())
    }

    /// Sets `len` bytes at `iova` to `byte`.
    pub fn fill(&self, iova: u64, len: u64, byte: u8) -> Result<(), NvmeError> {
        let chunk = vec![byte; 64 << 10];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(chunk.len() as u64);
            self.write(iova + at, &chunk[..usize::try_from(n).unwrap_or(0)])?;
            at += n;
        }
        Ok(())
    }

    /// The aligned 32-bit word at `iova`, read with acquire ordering.
    pub fn load32(&self, iova: u64) -> Result<u32, NvmeError> {
        let off = self.offset(iova, 4)?;
        match &self.kind {
            Kind::Shared { region, .. } => region
                .as_volatile_slice()
                .load::<u32>(off, Ordering::Acquire)
                .map_err(|e| NvmeError::Memory(e.to_string())),
            Kind::Plain(_) => {
                let mut b = [0u8; 4];
                self.read(iova, &mut b)?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    /// Stores the aligned 32-bit word `v` at `iova` with release ordering.
    pub fn store32(&self, iova: u64, v: u32) -> Result<(), NvmeError> {
        let off = self.offset(iova, 4)?;
        match &self.kind {
            Kind::Shared { region, .. } => region
                .as_volatile_slice()
                .store(v, off, Ordering::Release)
                .map_err(|e| NvmeError::Memory(e.to_string())),
            Kind::Plain(_) => self.write(iova, &v.to_le_bytes()),
        }
    }
}

/// A submission queue entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe(pub [u32; 16]);

impl Sqe {
    /// An entry with `opcode` and namespace `nsid`.
    pub fn new(opcode: u8, nsid: u32) -> Sqe {
        let mut s = Sqe::default();
        s.0[0] = u32::from(opcode);
        s.0[1] = nsid;
        s
    }

    /// Sets PRP1 and PRP2.
    pub fn prps(mut self, prp1: u64, prp2: u64) -> Sqe {
        self.0[6] = prp1 as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = prp2 as u32;
        self.0[9] = (prp2 >> 32) as u32;
        self
    }

    /// Sets command dword `n` (10..=15).
    pub fn cdw(mut self, n: usize, v: u32) -> Sqe {
        self.0[n] = v;
        self
    }

    /// Sets the flags byte of dword 0 (FUSE, PSDT).
    pub fn flags(mut self, f: u8) -> Sqe {
        self.0[0] = (self.0[0] & !0xff00) | (u32::from(f) << 8);
        self
    }

    /// A Read or Write of `nlb` blocks at `slba` (NLB is written 0-based).
    pub fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, prp1: u64, prp2: u64) -> Sqe {
        Sqe::new(opcode, nsid)
            .prps(prp1, prp2)
            .cdw(10, slba as u32)
            .cdw(11, (slba >> 32) as u32)
            .cdw(12, nlb.saturating_sub(1) & 0xffff)
    }

    fn bytes(&self, cid: u16) -> [u8; 64] {
        let mut d = self.0;
        d[0] = (d[0] & 0xffff) | (u32::from(cid) << 16);
        let mut b = [0u8; 64];
        for (i, w) in d.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        b
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: u32,
    /// The submission queue's head when it was posted.
    pub sq_head: u16,
    /// The submission queue.
    pub sqid: u16,
    /// The command.
    pub cid: u16,
    /// `(SCT << 8) | SC`.
    pub status: u16,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Completion {
    /// Successful.
    pub fn ok(&self) -> bool {
        self.status == status::SUCCESS
    }
}

/// One submission/completion queue pair (I/O queues pair SQ n with CQ n).
#[derive(Debug)]
pub struct Queue {
    /// Queue id.
    pub id: u16,
    /// Entries.
    pub size: u32,
    /// Submission ring IOVA.
    pub sq: u64,
    /// Completion ring IOVA.
    pub cq: u64,
    tail: u32,
    /// The tail the controller was last told (doorbell or shadow).
    told_tail: u32,
    head: u32,
    phase: bool,
    /// Command ids in flight.
    pub in_flight: HashSet<u16>,
    next_cid: u16,
}

impl Queue {
    fn new(id: u16, size: u32, sq: u64, cq: u64) -> Queue {
        Queue {
            id,
            size,
            sq,
            cq,
            tail: 0,
            told_tail: 0,
            head: 0,
            phase: true,
            in_flight: HashSet::new(),
            next_cid: 0,
        }
    }

    /// Free submission slots.
    pub fn room(&self) -> u32 {
        self.size - 1 - u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX)
    }
}

/// How the driver sets the controller up.
#[derive(Clone, Debug)]
pub struct NvmeOptions {
    /// I/O queue pairs.
    pub io_queues: u16,
    /// Entries per I/O queue.
    pub depth: u32,
    /// Ask for shadow doorbells (Doorbell Buffer Config) when the controller offers it.
    pub shadow_doorbells: bool,
    /// Interrupt vector per I/O completion queue (MSI-X vector = queue id), interrupts on.
    pub interrupts: bool,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        NvmeOptions {
            io_queues: 1,
            depth: 256,
            shadow_doorbells: false,
            interrupts: true,
        }
    }
}

/// The shadow doorbell and EventIdx pages.
#[derive(Clone, Copy, Debug)]
struct DbBuf {
    shadow: u64,
    eventidx: u64,
}

/// A driven controller.
pub struct Nvme {
    /// The connection (BAR0 is region 0).
    pub client: Client,
    /// Host memory the queues and buffers live in.
    pub mem: Arc<HostMemory>,
    /// Queue 0 is the admin queue; the I/O queues follow.
    pub queues: Vec<Queue>,
    dbbuf: Option<DbBuf>,
    /// Identify Controller data.
    pub id_ctrl: Vec<u8>,
    /// Identify Namespace data of namespace 1.
    pub id_ns: Vec<u8>,
    /// Namespace 1's size in 512-byte blocks.
    pub blocks: u64,
    /// Doorbell writes sent to the controller (region writes).
    pub doorbells: u64,
    /// Doorbell writes are posted (No_reply) instead of waiting for their replies.
    posted_doorbells: bool,
    /// One eventfd per MSI-X vector (vector `q` is queue `q`'s), when interrupts are on.
    pub irqs: Vec<OwnedFd>,
    /// Doorbell ioeventfds by BAR0 offset ([`Nvme::use_ioeventfds`]).
    iofds: std::collections::HashMap<u64, OwnedFd>,
    /// Doorbells rung through an ioeventfd instead of a region write.
    pub iofd_signals: u64,
}

/// The Linux driver's test for whether a shadow doorbell update must also ring: whether
/// the controller's EventIdx lies in `[old, new)`.
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Nvme {
    /// The interrupts vector `v` counted since the last call (its eventfd's counter).
    pub fn interrupts(&self, v: usize) -> u64 {
        let mut b = [0u8; 8];
        match self.irqs.get(v).map(|fd| rustix::io::read(fd, &mut b)) {
            Some(Ok(8)) => u64::from_le_bytes(b),
            _ => 0,
        }
    }

    /// Resets and enables the controller, identifies it and namespace 1, creates the I/O
    /// queues (and sets up shadow doorbells if asked and offered).
    pub fn enable(
        client: Client,
        mem: Arc<HostMemory>,
        o: &NvmeOptions,
    ) -> Result<Nvme, NvmeError> {
        let admin_size = 32;
        let asq = mem.alloc(u64::from(admin_size) * 64, PAGE);
        let acq = mem.alloc(u64::from(admin_size) * 16, PAGE);
        let mut n = Nvme {
            client,
            mem: mem.clone(),
            queues: vec![Queue::new(0, admin_size, asq, acq)],
            dbbuf: None,
            id_ctrl: Vec::new(),
            id_ns: Vec::new(),
            blocks: 0,
            doorbells: 0,
            posted_doorbells: false,
            irqs: Vec::new(),
            iofds: std::collections::HashMap::new(),
            iofd_signals: 0,
        };
        n.disable()?;
        if o.interrupts {
            // MSI-X, a vector per queue: what a guest driver enables first.
            for _ in 0..=o.io_queues {
                let flags =
                    rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC;
                n.irqs.push(
                    rustix::event::eventfd(0, flags)
                        .map_err(|e| NvmeError::Memory(format!("eventfd: {e}")))?,
                );
            }
            let fds: Vec<BorrowedFd<'_>> = n.irqs.iter().map(AsFd::as_fd).collect();
            n.client.set_irq_eventfds(2, 1 << 5, 0, &fds)?;
        }
        n.write_reg32(reg::AQA, (admin_size - 1) | ((admin_size - 1) << 16))?;
        n.write_reg64(reg::ASQ, asq)?;
        n.write_reg64(reg::ACQ, acq)?;
        // EN, CSS NVM, MPS 4 KiB, round robin, IOSQES 6, IOCQES 4.
        n.write_reg32(reg::CC, 1 | (6 << 16) | (4 << 20))?;
        n.wait_csts(CSTS_RDY, CSTS_RDY, "CSTS.RDY")?;
        let page = mem.alloc(PAGE, PAGE);
        let c = n.admin(Sqe::new(op::IDENTIFY, 0).prps(page, 0).cdw(10, 1))?;
        n.check(c, "identify controller")?;
        n.id_ctrl = vec![0; 4096];
        mem.read(page, &mut n.id_ctrl)?;
        let c = n.admin(Sqe::new(op::IDENTIFY, 1).prps(page, 0).cdw(10, 0))?;
        n.check(c, "identify namespace")?;
        n.id_ns = vec![0; 4096];
        mem.read(page, &mut n.id_ns)?;
        n.blocks = u64::from_le_bytes(n.id_ns[0..8].try_into().unwrap_or([0; 8]));
        let want = u32::from(o.io_queues.saturating_sub(1));
        let c = n.admin(
            Sqe::new(op::SET_FEATURES, 0)
                .cdw(10, 0x07)
                .cdw(11, want | (want << 16)),
        )?;
        n.check(c, "set number of queues")?;
        for q in 1..=o.io_queues {
            n.create_io_queue(q, o.depth, o.interrupts)?;
        }
        let oacs = u16::from_le_bytes([n.id_ctrl[256], n.id_ctrl[257]]);
        if o.shadow_doorbells && oacs & (1 << 8) != 0 {
            let shadow = mem.alloc(PAGE, PAGE);
            let eventidx = mem.alloc(PAGE, PAGE);
            let c = n.admin(Sqe::new(op::DOORBELL_BUFFER_CONFIG, 0).prps(shadow, eventidx))?;
            if c.ok() {
                n.dbbuf = Some(DbBuf { shadow, eventidx });
            }
        }
        Ok(n)
    }

    /// Whether shadow doorbells are in use.
    pub fn shadow_doorbells(&self) -> bool {
        self.dbbuf.is_some()
    }

    /// Sends doorbell writes from now on as posted REGION_WRITEs (No_reply, what QEMU
    /// sends by default) instead of waiting for each reply; register writes still wait.
    /// The server handles a connection's messages in order, so a later request's reply
    /// still comes after every doorbell posted before it.
    pub fn set_posted_doorbells(&mut self, posted: bool) {
        self.posted_doorbells = posted;
    }

    /// Whether doorbell writes are posted.
    pub fn posted_doorbells(&self) -> bool {
        self.posted_doorbells
    }

    /// Asks the controller for doorbell ioeventfds (DEVICE_GET_REGION_IO_FDS of BAR0); with
    /// shadow doorbells, a doorbell that has one is rung by signalling it (the value is in
    /// the shadow doorbell: an eventfd carries none). Returns how many it offered.
    pub fn use_ioeventfds(&mut self) -> Result<usize, NvmeError> {
        let subs = self.client.region_io_fds(0)?;
        let n = subs.len();
        self.iofds = subs.into_iter().map(|(sub, fd)| (sub.offset, fd)).collect();
        Ok(n)
    }

    /// A doorbell write at `off` in BAR0: with shadow doorbells, a signal of its ioeventfd
    /// if it has one (counted in [`Nvme::iofd_signals`]); else a region write, posted or
    /// waited for (see [`Nvme::set_posted_doorbells`]), counted in [`Nvme::doorbells`].
    fn write_doorbell(&mut self, off: u64, v: u32) -> Result<(), NvmeError> {
        if self.dbbuf.is_some() {
            if let Some(fd) = self.iofds.get(&off) {
                rustix::io::write(fd, &1u64.to_ne_bytes())
                    .map_err(|e| NvmeError::Memory(format!("ioeventfd: {e}")))?;
                self.iofd_signals += 1;
                return Ok(());
            }
        }
        self.doorbells += 1;
        if self.posted_doorbells {
            self.client.region_write_posted(0, off, &v.to_le_bytes())?;
        } else {
            self.client.region_write(0, off, &v.to_le_bytes())?;
        }
        Ok(())
    }

    /// Creates I/O queue pair `q` with `depth` entries (CQ `q` on MSI-X vector `q`).
    pub fn create_io_queue(&mut self, q: u16, depth: u32, irq: bool) -> Result<(), NvmeError> {
        let sq = self.mem.alloc(u64::from(depth) * 64, PAGE);
        let cq = self.mem.alloc(u64::from(depth) * 16, PAGE);
        let flags = 1 | (u32::from(irq) << 1) | (u32::from(q) << 16);
        let c = self.admin(
            Sqe::new(op::CREATE_CQ, 0)
                .prps(cq, 0)
                .cdw(10, u32::from(q) | ((depth - 1) << 16))
                .cdw(11, flags),
        )?;
        self.check(c, "create I/O completion queue")?;
        let c = self.admin(
            Sqe::new(op::CREATE_SQ, 0)
                .prps(sq, 0)
                .cdw(10, u32::from(q) | ((depth - 1) << 16))
                .cdw(11, 1 | (u32::from(q) << 16)),
        )?;
        self.check(c, "create I/O submission queue")?;
        let i = usize::from(q);
        if self.queues.len() <= i {
            self.queues
                .resize_with(i + 1, || Queue::new(u16::MAX, 2, 0, 0));
        }
        self.queues[i] = Queue::new(q, depth, sq, cq);
        Ok(())
    }

    fn check(&self, c: Completion, what: &str) -> Result<(), NvmeError> {
        if c.ok() {
            Ok(())
        } else {
            Err(NvmeError::Unexpected(format!(
                "{what} failed with status {:#x}",
                c.status
            )))
        }
    }

    // ---- registers ----

    /// A 32-bit register read.
    pub fn read_reg32(&mut self, off: u64) -> Result<u32, NvmeError> {
        let mut b = [0u8; 4];
        self.client.region_read(0, off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A 64-bit register read (one 8-byte access).
    pub fn read_reg64(&mut self, off: u64) -> Result<u64, NvmeError> {
        let mut b = [0u8; 8];
        self.client.region_read(0, off, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A 32-bit register write.
    pub fn write_reg32(&mut self, off: u64, v: u32) -> Result<(), NvmeError> {
        self.client.region_write(0, off, &v.to_le_bytes())?;
        Ok(())
    }

    /// A 64-bit register write (one 8-byte access).
    pub fn write_reg64(&mut self, off: u64, v: u64) -> Result<(), NvmeError> {
        self.client.region_write(0, off, &v.to_le_bytes())?;
        Ok(())
    }

    /// Waits until `CSTS & mask == value`; a fatal status is an error.
    pub fn wait_csts(
        &mut self,
        mask: u32,
        value: u32,
        what: &'static str,
    ) -> Result<(), NvmeError> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let csts = self.read_reg32(reg::CSTS)?;
            if csts & CSTS_CFS != 0 && mask & CSTS_CFS == 0 {
                return Err(NvmeError::Fatal);
            }
            if csts & mask == value {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(NvmeError::Timeout(what));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Clears CC.EN and waits for CSTS.RDY to clear; the driver's queues are forgotten.
    pub fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.read_reg32(reg::CC)?;
        self.write_reg32(reg::CC, cc & !1)?;
        self.wait_csts(CSTS_RDY | CSTS_CFS, 0, "CSTS.RDY to clear")?;
        self.queues.truncate(1);
        let admin = &mut self.queues[0];
        *admin = Queue::new(0, admin.size, admin.sq, admin.cq);
        self.dbbuf = None;
        Ok(())
    }

    // ---- submission and completion ----

    /// Writes `sqe` into queue `q`'s ring and returns its command id; the controller is
    /// told at the next [`Nvme::ring`].
    pub fn push(&mut self, q: u16, sqe: Sqe) -> Result<u16, NvmeError> {
        let mem = self.mem.clone();
        let queue = self.queue(q)?;
        if queue.room() == 0 {
            return Err(NvmeError::Unexpected(format!("queue {q} is full")));
        }
        let mut cid = queue.next_cid;
        while queue.in_flight.contains(&cid) {
            cid = cid.wrapping_add(1);
        }
        queue.next_cid = cid.wrapping_add(1);
        mem.write(queue.sq + u64::from(queue.tail) * 64, &sqe.bytes(cid))?;
        queue.tail = (queue.tail + 1) % queue.size;
        queue.in_flight.insert(cid);
        Ok(cid)
    }

    /// Tells the controller queue `q`'s new tail: a doorbell write, or with shadow
    /// doorbells (I/O queues) the shadow value and a doorbell write only if EventIdx asks.
    pub fn ring(&mut self, q: u16) -> Result<(), NvmeError> {
        let dbbuf = self.dbbuf;
        let mem = self.mem.clone();
        let queue = self.queue(q)?;
        let (new, old) = (queue.tail, queue.told_tail);
        if new == old {
            return Ok(());
        }
        queue.told_tail = new;
        if let (Some(d), true) = (dbbuf, q != 0) {
            mem.store32(d.shadow + u64::from(q) * 8, new)?;
            fence(Ordering::SeqCst);
            let ev = mem.load32(d.eventidx + u64::from(q) * 8)?;
            if !need_event(ev as u16, new as u16, old as u16) {
                return Ok(());
            }
        }
        self.write_doorbell(reg::sq_tail(q), new)
    }

    /// Completions of queue `q` posted so far (the head doorbell is updated when any).
    pub fn reap(&mut self, q: u16) -> Result<Vec<Completion>, NvmeError> {
        let dbbuf = self.dbbuf;
        let mem = self.mem.clone();
        let queue = self.queue(q)?;
        let mut out = Vec::new();
        let old = queue.head;
        loop {
            let at = queue.cq + u64::from(queue.head) * 16;
            let dw3 = mem.load32(at + 12)?;
            if (dw3 >> 16) & 1 != u32::from(queue.phase) {
                break;
            }
            let mut b = [0u8; 16];
            mem.read(at, &mut b)?;
            let w = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
            let field = (w(3) >> 17) as u16;
            let c = Completion {
                dw0: w(0),
                sq_head: w(2) as u16,
                sqid: (w(2) >> 16) as u16,
                cid: w(3) as u16,
                status: field & 0x7ff,
                dnr: field & (1 << 14) != 0,
            };
            if !queue.in_flight.remove(&c.cid) {
                return Err(NvmeError::Unexpected(format!(
                    "queue {q}: completion of command {} not in flight",
                    c.cid
                )));
            }
            out.push(c);
            queue.head = (queue.head + 1) % queue.size;
            if queue.head == 0 {
                queue.phase = !queue.phase;
            }
        }
        if out.is_empty() {
            return Ok(out);
        }
        let new = queue.head;
        if let (Some(d), true) = (dbbuf, q != 0) {
            mem.store32(d.shadow + u64::from(q) * 8 + 4, new)?;
            fence(Ordering::SeqCst);
            let ev = mem.load32(d.eventidx + u64::from(q) * 8 + 4)?;
            if !need_event(ev as u16, new as u16, old as u16) {
                return Ok(out);
            }
        }
        self.write_doorbell(reg::cq_head(q), new)?;
        Ok(out)
    }

    /// Waits for at least one completion on queue `q`. While nothing is there it reads
    /// CSTS: a round trip that also serves the server's DMA requests (plain memory) and
    /// notices a fatal status.
    pub fn wait(&mut self, q: u16) -> Result<Vec<Completion>, NvmeError> {
        let deadline = Instant::now() + TIMEOUT;
        let mut spins = 0u32;
        loop {
            let got = self.reap(q)?;
            if !got.is_empty() {
                return Ok(got);
            }
            spins += 1;
            if self.mem.is_shared() && spins % 64 != 0 {
                std::hint::spin_loop();
                continue;
            }
            if self.read_reg32(reg::CSTS)? & CSTS_CFS != 0 {
                return Err(NvmeError::Fatal);
            }
            if Instant::now() > deadline {
                return Err(NvmeError::Timeout("a completion"));
            }
        }
    }

    /// Submits one command on queue `q` and waits for its completion.
    pub fn submit_wait(&mut self, q: u16, sqe: Sqe) -> Result<Completion, NvmeError> {
        let cid = self.push(q, sqe)?;
        self.ring(q)?;
        loop {
            let got = self.wait(q)?;
            if let Some(c) = got.into_iter().find(|c| c.cid == cid) {
                return Ok(c);
            }
        }
    }

    /// An admin command, waited for.
    pub fn admin(&mut self, sqe: Sqe) -> Result<Completion, NvmeError> {
        self.submit_wait(0, sqe)
    }

    /// Reads `nlb` blocks at `slba` into `buf` (its PRPs are built with [`Nvme::prps`]).
    pub fn read(&mut self, q: u16, slba: u64, nlb: u32, buf: u64) -> Result<Completion, NvmeError> {
        let (p1, p2) = self.prps(buf, u64::from(nlb) * 512)?;
        self.submit_wait(q, Sqe::rw(op::READ, 1, slba, nlb, p1, p2))
    }

    /// Writes `nlb` blocks at `slba` from `buf`.
    pub fn write(
        &mut self,
        q: u16,
        slba: u64,
        nlb: u32,
        buf: u64,
    ) -> Result<Completion, NvmeError> {
        let (p1, p2) = self.prps(buf, u64::from(nlb) * 512)?;
        self.submit_wait(q, Sqe::rw(op::WRITE, 1, slba, nlb, p1, p2))
    }

    /// PRP1 and PRP2 for `len` bytes of contiguous host memory at `buf`: a second page, or
    /// a PRP list allocated in host memory (chained when it needs more than a page).
    pub fn prps(&mut self, buf: u64, len: u64) -> Result<(u64, u64), NvmeError> {
        let first = len.min(PAGE - buf % PAGE);
        if len <= first {
            return Ok((buf, 0));
        }
        let rest = len - first;
        let second = buf + first;
        if rest <= PAGE {
            return Ok((buf, second));
        }
        let pages: Vec<u64> = (0..rest.div_ceil(PAGE))
            .map(|i| second + i * PAGE)
            .collect();
        Ok((buf, self.prp_list(&pages)?))
    }

    /// Writes a PRP list of `pages` into host memory (chaining list pages, each holding 511
    /// entries and a pointer to the next when more follow); returns its address.
    pub fn prp_list(&mut self, pages: &[u64]) -> Result<u64, NvmeError> {
        let per = (PAGE / 8) as usize;
        let lists = if pages.len() <= per {
            1
        } else {
            (pages.len() - 1).div_ceil(per - 1)
        };
        let addrs: Vec<u64> = (0..lists).map(|_| self.mem.alloc(PAGE, PAGE)).collect();
        let mut rest = pages;
        for (i, &at) in addrs.iter().enumerate() {
            let last = i + 1 == lists;
            let take = if last { rest.len() } else { per - 1 };
            let mut raw: Vec<u8> = rest[..take].iter().flat_map(|p| p.to_le_bytes()).collect();
            if !last {
                raw.extend_from_slice(&addrs[i + 1].to_le_bytes());
            }
            self.mem.write(at, &raw)?;
            rest = &rest[take..];
        }
        Ok(addrs[0])
    }

    /// Queue `q` (the admin queue is 0).
    pub fn queue(&mut self, q: u16) -> Result<&mut Queue, NvmeError> {
        self.queues
            .get_mut(usize::from(q))
            .filter(|x| x.id == q)
            .ok_or_else(|| NvmeError::Unexpected(format!("no queue {q}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_event_index_rule() {
        // EventIdx 5, the tail moves from 5 to 6: ring. From 6 to 8: no.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 8, 6));
        // Moves that pass it: ring.
        assert!(need_event(5, 9, 3));
        // Across the wrap of the 16-bit index.
        assert!(need_event(0xffff, 2, 0xfffe));
    }

    #[test]
    fn an_sqe_carries_its_command_id_and_fields() {
        let s = Sqe::rw(op::WRITE, 1, 0x1_0000_0002, 8, 0x1000, 0x2000);
        let b = s.bytes(0x1234);
        assert_eq!(b[0], op::WRITE);
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 0x1234);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(b[32..40].try_into().unwrap()), 0x2000);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 7);
    }
}
