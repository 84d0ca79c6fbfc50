//! The NVMe command parser of the mnvme sample device (`crates/umdev-mnvme`), driven the
//! way a host driver drives it: through BAR0's registers and doorbells of a
//! `umdev_pci::PciFunction`, with submission and completion queues in guest memory.
//!
//! The device is built once per process through the public driver (`MnvmeDriver`, the
//! smallest type, a pool in the temporary directory, `poll_us = 0`) and opened for a client
//! with 64 KiB of guest memory at IOVA 0; it stays open from input to input (its work
//! threads with it: starting them for each input would cost more than the input), and each
//! input starts with a function reset, the memory cleared and the interrupt mode set (a
//! client with the other kind of memory closes it and opens it again). After each doorbell
//! the target waits for the device's work context to drain (`PciFunction::drain_work`), so
//! a command's completion is posted before the next operation: a run does not depend on
//! timing, except where a doorbell written while the poller runs joins its pass.
//!
//! Guest memory: page 1 the admin SQ, 2 the admin CQ, 3 and 4 the first I/O SQ and CQ, 5 and
//! 6 the shadow doorbell and EventIdx buffers, 7 and 8 two PRP list pages, 9 on data.
//!
//! Input: a 4-byte header, then operations; operands the input runs out of read as zero.
//! An input ends after 96 steps (each ring, register write, reset counts one).
//!
//! - header byte 0, bits: 0 the memory is a shared memfd the device may pin (else it is
//!   reached through DMA copies only), 1 MSI-X with an eventfd on vector 0 (else INTx), 2
//!   create I/O queue pair 1 with valid commands, 3 (with 1 and 2) turn shadow doorbells on
//!   with a valid Doorbell Buffer Config;
//! - header byte 1: admin SQ entries `2 + b % 32`; byte 2: admin CQ entries `2 + b % 32`;
//!   byte 3: I/O SQ and CQ entries `2 + b % 32`.
//!
//! | op % 8 | operation                             | operands                          |
//! | ------ | ------------------------------------- | --------------------------------- |
//! | 0      | an SQE into the admin SQ              | 64 bytes, the SQE                 |
//! | 1      | an SQE into an I/O SQ (`op >> 6` picks one of those there are) | 64 bytes |
//! | 2      | a register write (offset `4 * (b % 16)`) | b, u32 LE                      |
//! | 3      | a doorbell write (doorbell `b`: SQ `b / 2` tail or CQ head) | b, u32 LE   |
//! | 4      | a shadow doorbell write (slot `b % 64`) | b, u32 LE                       |
//! | 5      | function reset, then the header's setup again |                           |
//! | 6      | stop or resume consuming a CQ (`b % 17`) | b                              |
//! | 7      | the client goes and comes back, then the setup again |                    |
//!
//! For ops 0 and 1, bit 3 holds the doorbell (the SQE waits for the next ring: several
//! commands go together) and bits 4-5 choose the PRPs: 0 as given, 1 PRP1 and PRP2 folded
//! into the data pages (PRP1 keeps its offset, PRP2 page aligned), 2 PRP1 folded and PRP2 a
//! PRP list in page 7 at an offset from PRP2, chained to page 8, listing data pages, 3 PRP1
//! folded and PRP2 as given. A doorbell write of a valid value to a queue the target knows
//! is a ring of that queue (SQ: the entries up to it are submitted; CQ: the head it has
//! consumed to); other values and other queues are written as they are.
//!
//! The target consumes every CQ it knows after each step, as a driver does, and checks:
//! nothing panics or hangs; each completion names a submitted, not yet completed command of
//! an SQ bound to that CQ, with an SQ head within that SQ; an unknown admin opcode, and an
//! unknown I/O opcode of a command that names the namespace with PRPs, complete with Invalid
//! Command Opcode; a Read, Write or Write Zeroes past the namespace with LBA Out of Range;
//! queue creation and deletion succeed only as the specification allows; every command of
//! a live SQ completes unless the driver stopped consuming its CQ (AERs excepted); the
//! device writes guest memory only in CQs, the EventIdx buffer and the buffers that Reads,
//! Identify and Get Log Page name (walked from their PRPs as the specification reads
//! them); with DMA copies, no completion of an SQ is posted after its deletion completed;
//! CSTS.CFS only after an enable or a fetch from a queue outside guest memory. When a
//! command's data lands on the rings the target keeps (the driver overwrote its own queues)
//! the bookkeeping stops and only panics and hangs are looked for.
//! `UMDEV_FUZZ_TRACE=1` prints each operation and completion.
#![no_main]

#[path = "common.rs"]
mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::{trace, Input};
use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, EventfdFlags};
use umdev_core::{DeviceEnv, MdevUuid, Options, ParentContext, ParentDriver};
use umdev_dma::{AddressSpace, Backing, ClientMemory, Dma, DmaError, DmaLimits, IovaRange, Prot};
use umdev_mnvme::identify::{LBA_SHIFT, MAX_IO_QUEUES, NSID};
use umdev_mnvme::regs::{self, admin, io, Sqe};
use umdev_mnvme::MnvmeDriver;
use umdev_pci::{
    ClientId, IrqData, IrqIndex, PciFunction, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE,
};

const MEM: u64 = 64 * 1024;
const PAGE: u64 = regs::PAGE;
const ASQ: u64 = 0x1000;
const ACQ: u64 = 0x2000;
const IOSQ: u64 = 0x3000;
const IOCQ: u64 = 0x4000;
const SHADOW: u64 = 0x5000;
const EVENTIDX: u64 = 0x6000;
const LIST_A: u64 = 0x7000;
const LIST_B: u64 = 0x8000;
const DATA: u64 = 0x9000;
const DATA_PAGES: u64 = (MEM - DATA) / PAGE;
const QUEUES: usize = MAX_IO_QUEUES as usize + 1;
const BAR0: u32 = 0;
/// Steps (rings, register writes, resets) of one input; the rest of a longer input is
/// ignored, so that each input stays fast.
const MAX_STEPS: u32 = 96;
/// Command ids of the setup's own commands.
const SETUP_CID: u16 = 0xf000;

const ADMIN_OPCODES: [u8; 12] = [
    admin::DELETE_SQ,
    admin::CREATE_SQ,
    admin::GET_LOG_PAGE,
    admin::DELETE_CQ,
    admin::CREATE_CQ,
    admin::IDENTIFY,
    admin::ABORT,
    admin::SET_FEATURES,
    admin::GET_FEATURES,
    admin::ASYNC_EVENT,
    admin::KEEP_ALIVE,
    admin::DOORBELL_BUFFER_CONFIG,
];

fuzz_target!(|data: &[u8]| {
    run(data);
});

fn run(data: &[u8]) {
    let (f, blocks) = function();
    let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
    let mut input = Input(data);
    let setup = Setup::parse(input.array());
    trace(format_args!("{setup:?}"));
    let guest = Guest::of(setup.shared);
    let mut h = Host {
        f: &mut f,
        guest,
        setup,
        blocks: *blocks,
        sqs: vec![None; QUEUES],
        cqs: vec![None; QUEUES],
        pairs: Vec::new(),
        pending: Vec::new(),
        dbbuf: None,
        lost: false,
        cfs: false,
        step: Step::default(),
        steps: 0,
    };
    h.start();
    h.configure();
    while h.steps < MAX_STEPS {
        let Some(op) = input.byte() else { break };
        match op % 8 {
            0 | 1 => {
                let sqe: [u8; 64] = input.array();
                h.submit(op, sqe);
            }
            2 => {
                let (b, v) = (input.byte().unwrap_or(0), input.u32());
                h.register(4 * u64::from(b % 16), v);
            }
            3 => {
                let (b, v) = (input.byte().unwrap_or(0), input.u32());
                h.doorbell(u16::from(b), v);
            }
            4 => {
                let (b, v) = (input.byte().unwrap_or(0), input.u32());
                h.shadow(u16::from(b % 64), v);
            }
            5 => {
                trace(format_args!("function reset"));
                h.quiet_step(|h| {
                    h.f.reset().expect("mnvme offers reset");
                    h.forget();
                });
                h.configure();
            }
            6 => {
                let q = usize::from(input.byte().unwrap_or(0)) % QUEUES;
                if let Some(cq) = h.cqs[q].as_mut() {
                    cq.hold = !cq.hold;
                    trace(format_args!("CQ {q} hold {}", cq.hold));
                }
                h.quiet_step(|_| {});
            }
            _ => {
                trace(format_args!("close, open"));
                h.quiet_step(|h| {
                    h.f.close();
                    h.forget();
                });
                h.open();
                h.irqs();
                h.configure();
            }
        }
    }
    // The function stays open for the next input (starting threads for each input would
    // cost more than the input): `start` resets it.
}

/// The client's memory of each kind, made once and cleared for each input.
fn guests() -> &'static (Arc<Plain>, Arc<AddressSpace>) {
    static G: OnceLock<(Arc<Plain>, Arc<AddressSpace>)> = OnceLock::new();
    G.get_or_init(|| {
        let plain = Arc::new(Plain {
            bytes: Mutex::new(vec![0; MEM as usize]),
            log: Mutex::new(Vec::new()),
        });
        let fd = rustix::fs::memfd_create("umdev-fuzz-nvme", rustix::fs::MemfdFlags::CLOEXEC)
            .expect("memfd_create");
        rustix::fs::ftruncate(&fd, MEM).expect("ftruncate of a memfd");
        let space = Arc::new(AddressSpace::with_client(
            DmaLimits::default(),
            ClientMemory::new(MEM, false),
        ));
        let range = IovaRange::new(0, MEM).expect("a valid range");
        let backing = Backing::Fd { fd, offset: 0 };
        space
            .map(range, Prot::READ_WRITE, backing)
            .expect("the memfd maps");
        (plain, space)
    })
}

/// Which memory the open client has, if one is open (the function stays open between
/// inputs).
static OPEN: Mutex<Option<bool>> = Mutex::new(None);

/// The function, built once, and the namespace's blocks.
fn function() -> &'static (Mutex<PciFunction>, u64) {
    static F: OnceLock<(Mutex<PciFunction>, u64)> = OnceLock::new();
    F.get_or_init(|| {
        let driver = MnvmeDriver;
        let (name, size) = umdev_mnvme::parent::TYPES
            .iter()
            .copied()
            .min_by_key(|t| t.1)
            .expect("mnvme has types");
        let pool = std::env::temp_dir().join("umdev-fuzz-nvme");
        let uuid = MdevUuid::parse("6e766d65-667a-4000-8000-000000000001").expect("a UUID");
        // A fresh disk per process: what an earlier run wrote goes.
        let _ = std::fs::remove_file(pool.join(format!("{uuid}.img")));
        let mut given = serde_json::Map::new();
        let dir = pool.to_str().expect("the temporary directory is UTF-8");
        given.insert("pool".into(), dir.into());
        given.insert("capacity_gib".into(), (size >> 30).max(1).into());
        given.insert("poll_us".into(), 0.into());
        let options = Options::parse(driver.name(), &driver.options(), &given)
            .expect("the target's mnvme options are valid");
        let ctx = ParentContext {
            name: "fuzz-nvme".into(),
            state_dir: None,
        };
        let parent = driver.build(&ctx, &options).expect("an mnvme parent");
        let desc = parent.create(&uuid, name).expect("an mnvme device");
        let parts = parent
            .build(&uuid, &desc, &DeviceEnv::detached(uuid))
            .expect("an mnvme device builds");
        (
            Mutex::new(PciFunction::new(parts.spec, parts.device)),
            size >> LBA_SHIFT,
        )
    })
}

#[derive(Clone, Copy, Debug)]
struct Setup {
    shared: bool,
    msix: bool,
    io: bool,
    dbbuf: bool,
    asq: u32,
    acq: u32,
    ioq: u32,
}

impl Setup {
    fn parse(b: [u8; 4]) -> Setup {
        let size = |b: u8| 2 + u32::from(b % 32);
        Setup {
            shared: b[0] & 1 != 0,
            msix: b[0] & 2 != 0,
            io: b[0] & 4 != 0,
            dbbuf: b[0] & 8 != 0,
            asq: size(b[1]),
            acq: size(b[2]),
            ioq: size(b[3]),
        }
    }
}

/// Guest memory reached through DMA copies only (messages to the client, in a session).
/// The device's writes are logged in order: where (checked against what it may write), and
/// the bytes of CQE-sized ones (for the deletion check).
struct Plain {
    bytes: Mutex<Vec<u8>>,
    log: Mutex<Vec<Write>>,
}

/// A write to guest memory: where, how long, and the first 16 bytes.
type Write = (u64, u64, [u8; 16]);

fn span(iova: u64, len: usize) -> Result<std::ops::Range<usize>, DmaError> {
    let end = iova
        .checked_add(len as u64)
        .filter(|&e| e <= MEM)
        .ok_or(DmaError::Fault { iova })?;
    Ok(iova as usize..end as usize)
}

impl Dma for Plain {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let r = span(iova, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap_or_else(|e| e.into_inner())[r]);
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        let r = span(iova, data.len())?;
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())[r].copy_from_slice(data);
        let mut head = [0u8; 16];
        let n = data.len().min(16);
        head[..n].copy_from_slice(&data[..n]);
        lock(&self.log).push((iova, data.len() as u64, head));
        Ok(())
    }
}

enum Guest {
    Plain(Arc<Plain>),
    /// A memfd mapped at IOVA 0 that the device may pin.
    Shared(Arc<AddressSpace>),
}

impl Guest {
    fn of(shared: bool) -> Guest {
        let (plain, space) = guests();
        if shared {
            Guest::Shared(space.clone())
        } else {
            Guest::Plain(plain.clone())
        }
    }

    fn dma(&self) -> &dyn Dma {
        match self {
            Guest::Plain(p) => &**p,
            Guest::Shared(s) => &**s,
        }
    }

    fn read(&self, iova: u64, buf: &mut [u8]) {
        self.dma()
            .read(iova, buf)
            .expect("the target reads guest memory in bounds");
    }

    fn write(&self, iova: u64, data: &[u8]) {
        self.dma()
            .write(iova, data)
            .expect("the target writes guest memory in bounds");
    }

    /// A copy of all guest memory.
    fn snapshot(&self) -> Vec<u8> {
        let mut b = lock(&POOL).pop().unwrap_or_else(|| vec![0u8; MEM as usize]);
        self.read(0, &mut b);
        b
    }

    /// From here the device's writes are followed: with DMA copies the log starts again;
    /// with shared memory (pinned pages are written directly), a snapshot to compare with.
    fn mark(&self) -> Option<Vec<u8>> {
        match self {
            Guest::Plain(p) => {
                lock(&p.log).clear();
                None
            }
            Guest::Shared(_) => Some(self.snapshot()),
        }
    }

    fn take_log(&self) -> Option<Vec<Write>> {
        match self {
            Guest::Plain(p) => Some(std::mem::take(&mut *lock(&p.log))),
            Guest::Shared(_) => None,
        }
    }
}

/// Snapshot buffers, used again (fresh 256 KiB buffers cost page faults each time).
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn recycle(b: Option<Vec<u8>>) {
    if let Some(b) = b {
        lock(&POOL).push(b);
    }
}

fn in_mem(base: u64, len: u64) -> bool {
    base.checked_add(len).is_some_and(|e| e <= MEM)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

#[derive(Clone, Debug)]
struct SqInfo {
    base: u64,
    size: u32,
    cqid: u16,
    /// Where the device's head is once it has fetched what was rung (the last tail rung).
    head: u32,
    /// The next slot the target writes.
    tail: u32,
}

#[derive(Clone, Debug)]
struct CqInfo {
    base: u64,
    size: u32,
    head: u32,
    phase: bool,
    /// The driver stopped consuming it (op 6).
    hold: bool,
}

struct Pending {
    sqid: u16,
    sqe: Sqe,
    /// Must complete (not an AER, its SQ not deleted).
    must: bool,
    /// Another command of the same id was outstanding with it (a driver's mistake): which
    /// completion is whose is not known, so its status is not checked.
    ambiguous: bool,
}

/// What one step (a ring, a register write, a reset) may have the device write, and what
/// it did.
#[derive(Default)]
struct Step {
    /// Data buffers of the commands rung (Read, Identify, Get Log Page) and EventIdx pages.
    data_in: Vec<(u64, u64)>,
    /// PRP list pages read.
    lists: Vec<(u64, u64)>,
    /// Delete I/O SQ commands rung: (cid, qid).
    deletes: Vec<(u16, u16)>,
    /// The ids of every admin command rung (a driver may give two the same).
    admin_cids: Vec<u16>,
    creates: bool,
    /// SQs whose Delete completed (in the log's order).
    deleted: Vec<u16>,
    /// A register write: CSTS.CFS may follow an enable.
    register: bool,
}

struct Host<'a> {
    f: &'a mut PciFunction,
    guest: Guest,
    setup: Setup,
    blocks: u64,
    sqs: Vec<Option<SqInfo>>,
    cqs: Vec<Option<CqInfo>>,
    /// (SQ, its CQ, its entries) of every SQ created since the controller was enabled.
    pairs: Vec<(u16, u16, u32)>,
    pending: Vec<Pending>,
    /// Shadow doorbell and EventIdx buffers, once Doorbell Buffer Config succeeded.
    dbbuf: Option<(u64, u64)>,
    /// The bookkeeping lost track (the driver overwrote its own rings): checks stop.
    lost: bool,
    /// CSTS.CFS seen.
    cfs: bool,
    step: Step,
    /// Steps so far (see [`MAX_STEPS`]).
    steps: u32,
}

impl Host<'_> {
    /// The input's client: the function, open for the last input, is reset (or closed and
    /// opened again if that client had the other kind of memory), the memory cleared, and
    /// the interrupt mode set.
    fn start(&mut self) {
        let mut open = lock(&OPEN);
        if *open == Some(self.setup.shared) {
            self.f.reset().expect("mnvme offers reset");
        } else {
            if open.is_some() {
                self.f.close();
            }
            self.open();
            *open = Some(self.setup.shared);
        }
        drop(open);
        self.guest.write(0, &vec![0u8; MEM as usize]);
        self.irqs();
    }

    /// MSI-X with an eventfd on vector 0, or no MSI-X (INTx), as the header says.
    fn irqs(&mut self) {
        let (flags, count, data) = if self.setup.msix {
            let efd = eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).expect("eventfd");
            (IRQ_SET_DATA_EVENTFD, 1, IrqData::Eventfds(vec![efd]))
        } else {
            (IRQ_SET_DATA_NONE, 0, IrqData::None)
        };
        let index = IrqIndex::Msix as u32;
        self.f
            .set_irqs(index, flags | IRQ_SET_ACTION_TRIGGER, 0, count, data)
            .expect("MSI-X vector 0 takes an eventfd, and MSI-X can be disabled");
    }

    fn open(&mut self) {
        let r = match &self.guest {
            Guest::Plain(p) => self.f.open(p.clone()),
            Guest::Shared(s) => {
                self.f
                    .open_with_pins(s.clone(), ClientId::default(), Some(Arc::new(s.pinner())))
            }
        };
        r.expect("a closed function opens for the next client");
    }

    fn reg(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.f
            .region_read(BAR0, off, &mut b)
            .expect("BAR0 reads in bounds succeed");
        u32::from_le_bytes(b)
    }

    fn mmio(&mut self, off: u64, v: u32) {
        self.f
            .region_write(BAR0, off, &v.to_le_bytes())
            .expect("BAR0 writes in bounds succeed");
    }

    /// The controller was reset: no queues, nothing pending.
    fn forget(&mut self) {
        self.sqs = vec![None; QUEUES];
        self.cqs = vec![None; QUEUES];
        self.pairs.clear();
        self.pending.clear();
        self.dbbuf = None;
        self.cfs = false;
    }

    /// The header's setup: the admin queues, the controller enabled, the I/O queue pair and
    /// shadow doorbells if asked.
    fn configure(&mut self) {
        let s = self.setup;
        let aqa = ((s.acq - 1) << 16) | (s.asq - 1);
        self.register(regs::AQA, aqa);
        self.register(regs::ASQ, ASQ as u32);
        self.register(regs::ASQ_HI, 0);
        self.register(regs::ACQ, ACQ as u32);
        self.register(regs::ACQ_HI, 0);
        self.register(regs::CC, regs::CC_EN | (6 << 16) | (4 << 20));
        if !s.io {
            return;
        }
        let size = (s.ioq - 1) << 16;
        let iv = u32::from(s.msix) << 16;
        let cmd = |opcode, cid, prp1, prp2, cdw10, cdw11| Sqe {
            opcode,
            cid,
            prp1,
            prp2,
            cdw: [cdw10, cdw11, 0, 0, 0, 0],
            ..Sqe::default()
        };
        let cq = cmd(admin::CREATE_CQ, SETUP_CID, IOCQ, 0, size | 1, 0b11 | iv);
        self.submit(0, cq.to_bytes());
        let sq = cmd(
            admin::CREATE_SQ,
            SETUP_CID + 1,
            IOSQ,
            0,
            size | 1,
            1 | (1 << 16),
        );
        self.submit(0, sq.to_bytes());
        if s.dbbuf && s.msix {
            let db = cmd(
                admin::DOORBELL_BUFFER_CONFIG,
                SETUP_CID + 2,
                SHADOW,
                EVENTIDX,
                0,
                0,
            );
            self.submit(0, db.to_bytes());
        }
    }

    /// Op 2 (and the setup): a register write; enabling and disabling are followed.
    fn register(&mut self, off: u64, v: u32) {
        trace(format_args!("register {off:#x} = {v:#x}"));
        let before = self.reg(regs::CSTS);
        if off == regs::CC && v & regs::CC_EN != 0 && before & regs::CSTS_RDY == 0 {
            // A driver clears its admin CQ before enabling (no stale phase bits).
            let aqa = self.reg(regs::AQA);
            let acq = u64::from(self.reg(regs::ACQ)) | (u64::from(self.reg(regs::ACQ_HI)) << 32);
            self.clear_cq(acq, ((aqa >> 16) & 0xfff) + 1);
        }
        self.quiet_step(|h| {
            h.step.register = true;
            h.mmio(off, v);
            let after = h.reg(regs::CSTS);
            if before & regs::CSTS_RDY != 0 && after & regs::CSTS_RDY == 0 {
                h.forget();
            }
            if before & regs::CSTS_RDY == 0 && after & regs::CSTS_RDY != 0 {
                h.forget();
                h.learn_admin();
            }
        });
    }

    /// The controller was enabled: its admin queues, from the registers.
    fn learn_admin(&mut self) {
        let aqa = self.reg(regs::AQA);
        let asq = u64::from(self.reg(regs::ASQ)) | (u64::from(self.reg(regs::ASQ_HI)) << 32);
        let acq = u64::from(self.reg(regs::ACQ)) | (u64::from(self.reg(regs::ACQ_HI)) << 32);
        let (sqs, cqs) = ((aqa & 0xfff) + 1, ((aqa >> 16) & 0xfff) + 1);
        self.cqs[0] = Some(CqInfo {
            base: acq,
            size: cqs,
            head: 0,
            phase: true,
            hold: false,
        });
        self.claim(asq, u64::from(sqs) * regs::SQE_SIZE);
        self.sqs[0] = Some(SqInfo {
            base: asq,
            size: sqs,
            cqid: 0,
            head: 0,
            tail: 0,
        });
        self.pairs.push((0, 0, sqs));
        if !in_mem(acq, u64::from(cqs) * regs::CQE_SIZE) {
            // Admin completions cannot be seen.
            self.lost = true;
        }
    }

    /// Zeroes a CQ ring of `entries` at `base` about to be given to the device, unless it
    /// is outside guest memory or on the target's rings.
    fn clear_cq(&mut self, base: u64, entries: u32) {
        let len = u64::from(entries) * regs::CQE_SIZE;
        if in_mem(base, len) && !self.system().iter().any(|&r| overlaps(r, (base, len))) {
            self.guest.write(base, &vec![0u8; len as usize]);
        }
    }

    /// Guest memory the target keeps: rings, shadow doorbell buffers.
    fn system(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = Vec::new();
        for q in self.sqs.iter().flatten() {
            v.push((q.base, u64::from(q.size) * regs::SQE_SIZE));
        }
        for q in self.cqs.iter().flatten() {
            v.push((q.base, u64::from(q.size) * regs::CQE_SIZE));
        }
        if let Some((s, e)) = self.dbbuf {
            v.push((s, PAGE));
            v.push((e, PAGE));
        }
        v
    }

    /// A new ring or buffer at `[base, base + len)`: on top of another, the target loses
    /// track.
    fn claim(&mut self, base: u64, len: u64) {
        if self.system().iter().any(|&r| overlaps(r, (base, len))) {
            trace(format_args!(
                "{base:#x}+{len:#x} overlaps a ring: lost track"
            ));
            self.lost = true;
        }
    }

    /// Ops 0 and 1 (and the setup, with op 0): an SQE into a queue, rung unless held.
    fn submit(&mut self, op: u8, bytes: [u8; 64]) {
        let qid = if op.is_multiple_of(8) {
            0
        } else {
            let io: Vec<usize> = (1..QUEUES).filter(|&q| self.sqs[q].is_some()).collect();
            if io.is_empty() {
                return;
            }
            io[usize::from(op >> 6) % io.len()]
        };
        let Some(sq) = self.sqs[qid].clone() else {
            return;
        };
        if !in_mem(sq.base, u64::from(sq.size) * regs::SQE_SIZE) {
            return;
        }
        if (sq.tail + 1) % sq.size == sq.head {
            self.ring_all();
        }
        let mut sqe = Sqe::parse(&bytes);
        let data = DATA_PAGES * PAGE;
        match (op >> 4) & 3 {
            0 => {}
            mode => {
                sqe.prp1 = DATA + sqe.prp1 % data;
                match mode {
                    1 => sqe.prp2 = DATA + (sqe.prp2 % DATA_PAGES) * PAGE,
                    2 => {
                        let seed = sqe.prp2 >> 9;
                        sqe.prp2 = LIST_A + (sqe.prp2 % 512) * 8;
                        self.fill_lists(seed);
                    }
                    _ => {}
                }
            }
        }
        let Some(sq) = self.sqs[qid].as_mut() else {
            return;
        };
        let at = sq.base + u64::from(sq.tail) * regs::SQE_SIZE;
        sq.tail = (sq.tail + 1) % sq.size;
        trace(format_args!("SQ {qid}: {sqe:x?}"));
        self.guest.write(at, &sqe.to_bytes());
        if op & 8 == 0 {
            self.ring_all();
        }
    }

    /// PRP list pages 7 and 8: data pages from `seed`, page 7's last entry chaining to 8.
    fn fill_lists(&mut self, seed: u64) {
        let entry = |i: u64| DATA + (seed.wrapping_add(i) % DATA_PAGES) * PAGE;
        let mut a: Vec<u8> = (0..512).flat_map(|i| entry(i).to_le_bytes()).collect();
        a[4088..].copy_from_slice(&LIST_B.to_le_bytes());
        let b: Vec<u8> = (512..1024).flat_map(|i| entry(i).to_le_bytes()).collect();
        self.guest.write(LIST_A, &a);
        self.guest.write(LIST_B, &b);
    }

    /// Rings every SQ with entries not rung yet.
    fn ring_all(&mut self) {
        let rings: Vec<(u16, u32)> = (0..QUEUES)
            .filter_map(|q| {
                let sq = self.sqs[q].as_ref()?;
                (sq.tail != sq.head).then_some((q as u16, sq.tail))
            })
            .collect();
        if !rings.is_empty() {
            self.ring(&rings);
        }
    }

    /// Rings SQ tails: `(qid, tail)` of known queues, tails valid.
    fn ring(&mut self, rings: &[(u16, u32)]) {
        // What a driver writes first: shadow doorbells (its own, and the initial values of
        // the buffers a Doorbell Buffer Config being rung names).
        let tail_of = |h: &Host<'_>, q: usize| {
            rings
                .iter()
                .find(|r| usize::from(r.0) == q)
                .map(|r| r.1)
                .or_else(|| h.sqs[q].as_ref().map(|s| s.head))
        };
        let mut shadows: Vec<u64> = self.dbbuf.iter().map(|d| d.0).collect();
        if let Some(&(_, t)) = rings.iter().find(|r| r.0 == 0) {
            for sqe in self.entries(0, t) {
                match sqe.opcode {
                    admin::DOORBELL_BUFFER_CONFIG => shadows.push(sqe.prp1),
                    // A driver clears a CQ before creating it.
                    admin::CREATE_CQ => self.clear_cq(sqe.prp1, (sqe.cdw(10) >> 16) + 1),
                    _ => {}
                }
            }
        }
        for base in shadows {
            if !in_mem(base, PAGE) {
                continue;
            }
            for q in 1..QUEUES {
                if let Some(t) = tail_of(self, q) {
                    self.guest.write(base + 8 * q as u64, &t.to_le_bytes());
                }
                if let Some(cq) = &self.cqs[q] {
                    self.guest
                        .write(base + 8 * q as u64 + 4, &cq.head.to_le_bytes());
                }
            }
        }
        let snap = self.begin();
        for &(q, t) in rings {
            self.admit(q, t);
        }
        for &(q, t) in rings {
            trace(format_args!("ring SQ {q} tail {t}"));
            self.mmio(regs::DOORBELLS + 8 * u64::from(q), t);
        }
        self.settle(snap);
    }

    /// The SQEs between the device's head of SQ `qid` and `tail`, as in guest memory now.
    fn entries(&self, qid: usize, tail: u32) -> Vec<Sqe> {
        let Some(sq) = &self.sqs[qid] else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut i = sq.head;
        while i != tail {
            let mut b = [0u8; 64];
            self.guest
                .read(sq.base + u64::from(i) * regs::SQE_SIZE, &mut b);
            out.push(Sqe::parse(&b));
            i = (i + 1) % sq.size;
        }
        out
    }

    /// Starts a step: a snapshot of guest memory and of nothing allowed yet.
    fn begin(&mut self) -> Option<Vec<u8>> {
        self.new_step();
        self.guest.mark()
    }

    fn new_step(&mut self) {
        self.step = Step::default();
        self.steps += 1;
        if let Some((_, e)) = self.dbbuf {
            self.step.data_in.push((e, PAGE));
        }
    }

    /// A step other than a ring: `action`, then the device settles.
    fn other_step(&mut self, action: impl FnOnce(&mut Self)) {
        let snap = self.begin();
        action(self);
        self.settle(snap);
    }

    /// A step whose action makes the device write no guest memory by itself (a register
    /// write, a reset, a client change): with shared memory no snapshot is taken (it would
    /// cost more than the step); with DMA copies its writes are still checked.
    fn quiet_step(&mut self, action: impl FnOnce(&mut Self)) {
        self.new_step();
        if let Guest::Plain(_) = self.guest {
            self.guest.mark();
        }
        action(self);
        self.settle(None);
    }

    /// The entries of SQ `qid` up to `tail` become pending; what they may write is noted.
    fn admit(&mut self, qid: u16, tail: u32) {
        let q = usize::from(qid);
        for sqe in self.entries(q, tail) {
            if qid == 0 {
                self.step.admin_cids.push(sqe.cid);
            }
            let len = if qid == 0 {
                match sqe.opcode {
                    admin::IDENTIFY => PAGE,
                    admin::GET_LOG_PAGE => {
                        let numd = ((u64::from(sqe.cdw(11)) & 0xffff) << 16)
                            | u64::from(sqe.cdw(10) >> 16);
                        (numd + 1) * 4
                    }
                    admin::DOORBELL_BUFFER_CONFIG => {
                        self.step.data_in.push((sqe.prp2, PAGE));
                        0
                    }
                    admin::DELETE_SQ => {
                        self.step
                            .deletes
                            .push((sqe.cid, (sqe.cdw(10) & 0xffff) as u16));
                        0
                    }
                    admin::CREATE_SQ => {
                        self.step.creates = true;
                        0
                    }
                    _ => 0,
                }
            } else if sqe.opcode == io::READ {
                (u64::from(sqe.cdw(12) & 0xffff) + 1) << LBA_SHIFT
            } else {
                0
            };
            if len > 0 {
                let ranges = self.walk(sqe.prp1, sqe.prp2, len);
                let sys = self.system();
                if ranges.iter().any(|&r| sys.iter().any(|&s| overlaps(r, s))) {
                    trace(format_args!(
                        "cid {:#x}: data onto the target's rings: lost track",
                        sqe.cid
                    ));
                    self.lost = true;
                }
                self.step.data_in.extend(ranges);
            }
            let aer = qid == 0 && sqe.opcode == admin::ASYNC_EVENT;
            self.pending.push(Pending {
                sqid: qid,
                sqe,
                must: !aer,
                ambiguous: false,
            });
        }
        if let Some(sq) = self.sqs[q].as_mut() {
            sq.head = tail;
            sq.tail = tail;
        }
    }

    /// The buffers PRP1 and PRP2 name for a transfer of `len` bytes, read as the
    /// specification describes them (the list pages as in guest memory now, before the
    /// ring); the list pages are noted.
    fn walk(&mut self, prp1: u64, prp2: u64, len: u64) -> Vec<(u64, u64)> {
        let first = len.min(PAGE - prp1 % PAGE);
        let mut out = vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return out;
        }
        if left <= PAGE {
            out.push((prp2, left));
            return out;
        }
        let mut list = prp2;
        for _ in 0..1024 {
            let slots = (PAGE - list % PAGE) / 8;
            let needed = left.div_ceil(PAGE);
            self.step.lists.push((list, needed.min(slots) * 8));
            for k in 0..slots {
                let mut e = [0u8; 8];
                let at = list.wrapping_add(8 * k);
                if self.guest.dma().read(at, &mut e).is_err() {
                    return out;
                }
                let e = u64::from_le_bytes(e);
                if k == slots - 1 && needed > slots {
                    list = e;
                    break;
                }
                let n = left.min(PAGE);
                out.push((e, n));
                left -= n;
                if left == 0 {
                    return out;
                }
            }
        }
        out
    }

    /// After a step: the device's work drained, its writes checked, completions consumed
    /// (each consumption rung, and the device drained again), then what must have
    /// completed.
    fn settle(&mut self, snap: Option<Vec<u8>>) {
        self.f.drain_work();
        self.check_writes(snap.as_deref());
        for _ in 0..4096 {
            let heads = self.consume();
            if heads.is_empty() {
                break;
            }
            if let Some((s, _)) = self.dbbuf.filter(|d| in_mem(d.0, PAGE)) {
                for &(q, head) in &heads {
                    if q != 0 {
                        self.guest
                            .write(s + 8 * u64::from(q) + 4, &head.to_le_bytes());
                    }
                }
            }
            let snap = self.guest.mark();
            for (q, head) in heads {
                self.mmio(regs::DOORBELLS + 8 * u64::from(q) + 4, head);
            }
            self.f.drain_work();
            self.check_writes(snap.as_deref());
            recycle(snap);
        }
        recycle(snap);
        self.check_done();
    }

    /// Guest memory changed only where the device may write; with DMA copies, the order of
    /// its completions.
    fn check_writes(&mut self, snap: Option<&[u8]>) {
        let log = self.guest.take_log();
        if self.lost {
            return;
        }
        let mut allowed = self.step.data_in.clone();
        for q in self.cqs.iter().flatten() {
            allowed.push((q.base, u64::from(q.size) * regs::CQE_SIZE));
        }
        let lists = &self.step.lists;
        let clobbered = self
            .step
            .data_in
            .iter()
            .any(|&d| lists.iter().any(|&l| overlaps(d, l)));
        let outside = |at: u64| !allowed.iter().any(|&r| overlaps(r, (at, 1)));
        if let (false, Some(log)) = (clobbered, &log) {
            for &(iova, len, _) in log {
                // Each byte written in an allowed range (walked range by range).
                let mut at = iova;
                while at < iova.saturating_add(len) {
                    let Some(r) = allowed.iter().find(|&&r| overlaps(r, (at, 1))) else {
                        panic!(
                            "the device wrote guest memory at {at:#x} (a write of {len:#x} \
                             bytes at {iova:#x}), outside the CQs and the buffers the commands \
                             named {allowed:x?}"
                        );
                    };
                    at = r.0.saturating_add(r.1);
                }
            }
        }
        if let (false, Some(snap)) = (clobbered, snap) {
            let now = self.guest.snapshot();
            let pages = now.chunks(PAGE as usize).zip(snap.chunks(PAGE as usize));
            let changed = pages
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .flat_map(|(p, (a, b))| {
                    let lines = a.chunks(64).zip(b.chunks(64)).enumerate();
                    lines
                        .filter(|(_, (a, b))| a != b)
                        .map(move |(l, ab)| (p * PAGE as usize + l * 64, ab))
                });
            for (line, (a, b)) in changed {
                for i in 0..64 {
                    let at = (line + i) as u64;
                    if a[i] != b[i] && outside(at) {
                        panic!(
                            "the device wrote guest memory at {at:#x} ({:#x} -> {:#x}), outside \
                             the CQs and the buffers the commands named {allowed:x?}",
                            b[i], a[i]
                        );
                    }
                }
            }
            recycle(Some(now));
        }
        // Completions of an SQ after its deletion's completion (the log is in the order
        // the device wrote).
        let Some(log) = log else { return };
        let held = self.cqs.iter().flatten().any(|q| q.hold);
        if self.step.creates || held || self.step.deletes.is_empty() {
            return;
        }
        for (iova, len, e) in log {
            if len != regs::CQE_SIZE {
                continue;
            }
            let Some(cqid) = (0..QUEUES).find(|&q| {
                self.cqs[q].as_ref().is_some_and(|c| {
                    iova >= c.base
                        && iova < c.base + u64::from(c.size) * regs::CQE_SIZE
                        && (iova - c.base) % regs::CQE_SIZE == 0
                })
            }) else {
                continue;
            };
            let c = Cqe::parse(&e);
            if self.step.deleted.contains(&c.sqid) {
                panic!(
                    "a completion of SQ {} (cid {:#x}) was posted after its Delete I/O \
                     Submission Queue completed",
                    c.sqid, c.cid
                );
            }
            // A success of the admin queue is a deletion's only if no other admin command
            // rung had its id (then whose it is is not known).
            let alone = self.step.admin_cids.iter().filter(|&&x| x == c.cid).count() == 1;
            if cqid == 0 && c.sqid == 0 && c.status() == (0, 0) && alone {
                let d: Vec<_> = self.step.deletes.iter().filter(|d| d.0 == c.cid).collect();
                if let [(_, q)] = d[..] {
                    self.step.deleted.push(*q);
                }
            }
        }
    }

    /// Reads the new entries of every CQ consumed; the heads to ring.
    fn consume(&mut self) -> Vec<(u16, u32)> {
        let mut heads = Vec::new();
        for q in 0..QUEUES {
            let Some(cq) = self.cqs[q].clone() else {
                continue;
            };
            if cq.hold || !in_mem(cq.base, u64::from(cq.size) * regs::CQE_SIZE) {
                continue;
            }
            let (mut head, mut phase, mut n) = (cq.head, cq.phase, 0);
            while n < cq.size {
                let mut b = [0u8; 16];
                self.guest
                    .read(cq.base + u64::from(head) * regs::CQE_SIZE, &mut b);
                let c = Cqe::parse(&b);
                if c.phase != phase {
                    break;
                }
                head = (head + 1) % cq.size;
                if head == 0 {
                    phase = !phase;
                }
                n += 1;
                self.completed(q as u16, c);
            }
            if n > 0 {
                if let Some(cq) = self.cqs[q].as_mut() {
                    cq.head = head;
                    cq.phase = phase;
                }
                heads.push((q as u16, head));
            }
        }
        heads
    }

    /// One completion on CQ `cqid`: checked against what was submitted.
    fn completed(&mut self, cqid: u16, c: Cqe) {
        trace(format_args!("CQ {cqid}: {c:x?}"));
        if self.lost {
            return;
        }
        let Some(&(_, _, size)) = self
            .pairs
            .iter()
            .rev()
            .find(|p| p.0 == c.sqid && p.1 == cqid)
        else {
            panic!(
                "a completion on CQ {cqid} names SQ {}, not bound to it",
                c.sqid
            );
        };
        assert!(
            u32::from(c.sq_head) < size,
            "SQ head {} of SQ {} is past its {size} entries",
            c.sq_head,
            c.sqid
        );
        let matching: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.sqid == c.sqid && p.sqe.cid == c.cid)
            .map(|(i, _)| i)
            .collect();
        // Of several, one that must complete: an AER of the same id may stay outstanding.
        let first = matching.iter().copied().find(|&i| self.pending[i].must);
        let Some(i) = first.or(matching.first().copied()) else {
            panic!(
                "a completion for cid {:#x} of SQ {}, which has no such command outstanding",
                c.cid, c.sqid
            );
        };
        let unique = matching.len() == 1 && !self.pending[i].ambiguous;
        if matching.len() > 1 {
            for &j in &matching {
                self.pending[j].ambiguous = true;
            }
        }
        let p = self.pending.remove(i);
        if !unique {
            // Which of them completed is not known: a queue's creation or deletion among
            // them loses track.
            let semantic = [
                admin::CREATE_CQ,
                admin::CREATE_SQ,
                admin::DELETE_CQ,
                admin::DELETE_SQ,
                admin::DOORBELL_BUFFER_CONFIG,
            ];
            let any = self.pending.iter().any(|q| {
                q.sqid == c.sqid && q.sqe.cid == c.cid && semantic.contains(&q.sqe.opcode)
            });
            if c.sqid == 0 && (any || semantic.contains(&p.sqe.opcode)) {
                self.lost = true;
            }
            return;
        }
        self.check_status(&p, c.status());
        if c.sqid == 0 && c.status() == (0, 0) {
            self.admin_done(&p.sqe);
        }
    }

    fn check_status(&self, p: &Pending, status: (u8, u8)) {
        let s = &p.sqe;
        if p.sqid == 0 {
            if !ADMIN_OPCODES.contains(&s.opcode) {
                assert_eq!(
                    status,
                    (0, 0x01),
                    "admin opcode {:#x}: Invalid Command Opcode expected",
                    s.opcode
                );
            }
            return;
        }
        if s.nsid != NSID || s.flags & 0xc0 != 0 {
            return;
        }
        match s.opcode {
            io::READ | io::WRITE | io::WRITE_ZEROES => {
                let slba = u64::from(s.cdw(10)) | (u64::from(s.cdw(11)) << 32);
                let nlb = u64::from(s.cdw(12) & 0xffff) + 1;
                if slba.checked_add(nlb).is_none_or(|e| e > self.blocks) {
                    assert_eq!(
                        status,
                        (0, 0x80),
                        "opcode {:#x} of LBAs {slba:#x}+{nlb:#x} past the namespace's {:#x}: \
                         LBA Out of Range expected",
                        s.opcode,
                        self.blocks
                    );
                }
            }
            io::FLUSH | io::DSM => {}
            op => assert_eq!(
                status,
                (0, 0x01),
                "I/O opcode {op:#x}: Invalid Command Opcode expected"
            ),
        }
    }

    /// An admin command succeeded: queues and buffers as it made them.
    fn admin_done(&mut self, s: &Sqe) {
        let qid = (s.cdw(10) & 0xffff) as u16;
        let q = usize::from(qid);
        let size = (s.cdw(10) >> 16) + 1;
        let valid = qid != 0 && qid <= MAX_IO_QUEUES;
        match s.opcode {
            admin::CREATE_CQ => {
                assert!(valid, "Create I/O CQ succeeded for queue id {qid}");
                assert!(self.cqs[q].is_none(), "Create I/O CQ {qid} succeeded twice");
                self.claim(s.prp1, u64::from(size) * regs::CQE_SIZE);
                self.cqs[q] = Some(CqInfo {
                    base: s.prp1,
                    size,
                    head: 0,
                    phase: true,
                    hold: false,
                });
            }
            admin::CREATE_SQ => {
                let cqid = (s.cdw(11) >> 16) as u16;
                assert!(valid, "Create I/O SQ succeeded for queue id {qid}");
                assert!(self.sqs[q].is_none(), "Create I/O SQ {qid} succeeded twice");
                assert!(
                    cqid != 0 && self.cqs.get(usize::from(cqid)).is_some_and(Option::is_some),
                    "Create I/O SQ {qid} succeeded on CQ {cqid}, which does not exist"
                );
                self.claim(s.prp1, u64::from(size) * regs::SQE_SIZE);
                self.sqs[q] = Some(SqInfo {
                    base: s.prp1,
                    size,
                    cqid,
                    head: 0,
                    tail: 0,
                });
                self.pairs.push((qid, cqid, size));
            }
            admin::DELETE_SQ => {
                assert!(
                    valid && self.sqs[q].is_some(),
                    "Delete I/O SQ {qid} succeeded; there is no such queue"
                );
                self.sqs[q] = None;
                for p in self.pending.iter_mut().filter(|p| p.sqid == qid) {
                    p.must = false;
                }
            }
            admin::DELETE_CQ => {
                assert!(
                    valid && self.cqs[q].is_some(),
                    "Delete I/O CQ {qid} succeeded; there is no such queue"
                );
                assert!(
                    !self.sqs.iter().flatten().any(|sq| sq.cqid == qid),
                    "Delete I/O CQ {qid} succeeded while an SQ uses it"
                );
                self.cqs[q] = None;
            }
            admin::DOORBELL_BUFFER_CONFIG => {
                self.dbbuf = None;
                self.claim(s.prp1, PAGE);
                self.claim(s.prp2, PAGE);
                self.dbbuf = Some((s.prp1, s.prp2));
            }
            _ => {}
        }
    }

    /// After a step: CSTS.CFS only where documented; every command that must complete did.
    fn check_done(&mut self) {
        if self.lost {
            return;
        }
        let csts = self.reg(regs::CSTS);
        if csts & regs::CSTS_CFS != 0 {
            if !self.cfs {
                self.cfs = true;
                let outside = self
                    .sqs
                    .iter()
                    .flatten()
                    .any(|q| !in_mem(q.base, u64::from(q.size) * regs::SQE_SIZE));
                assert!(
                    self.step.register || outside,
                    "CSTS.CFS set with every queue in guest memory, without an enable"
                );
            }
            return;
        }
        if csts & regs::CSTS_RDY == 0 {
            return;
        }
        for p in self.pending.iter().filter(|p| p.must) {
            let Some(sq) = &self.sqs[usize::from(p.sqid)] else {
                continue;
            };
            let Some(cq) = &self.cqs[usize::from(sq.cqid)] else {
                continue;
            };
            if cq.hold || !in_mem(cq.base, u64::from(cq.size) * regs::CQE_SIZE) {
                continue;
            }
            // A Delete of its queue that has not completed yet (its completion waits for
            // room in a full admin CQ) may have deleted it already.
            let deleting = self.pending.iter().any(|d| {
                d.sqid == 0
                    && d.sqe.opcode == admin::DELETE_SQ
                    && (d.sqe.cdw(10) & 0xffff) as u16 == p.sqid
            });
            if deleting {
                continue;
            }
            panic!(
                "command {:#x} (opcode {:#x}) of SQ {} never completed",
                p.sqe.cid, p.sqe.opcode, p.sqid
            );
        }
    }

    /// Op 3: a doorbell write.
    fn doorbell(&mut self, n: u16, v: u32) {
        let (q, cq) = (usize::from(n / 2), n % 2 == 1);
        trace(format_args!("doorbell {n} = {v:#x}"));
        if !cq {
            if let Some(sq) = self.sqs.get(q).cloned().flatten() {
                if v < sq.size && in_mem(sq.base, u64::from(sq.size) * regs::SQE_SIZE) {
                    self.ring(&[(q as u16, v)]);
                    return;
                }
            }
        }
        let v = match self.cqs.get(q).cloned().flatten() {
            Some(c) if cq && v < c.size => c.head,
            _ => v,
        };
        self.other_step(|h| h.mmio(regs::DOORBELLS + 4 * u64::from(n), v));
    }

    /// Op 4: a shadow doorbell write (once the buffers are set up in guest memory).
    fn shadow(&mut self, slot: u16, v: u32) {
        let Some((s, _)) = self.dbbuf.filter(|d| in_mem(d.0, PAGE)) else {
            return;
        };
        trace(format_args!("shadow slot {slot} = {v:#x}"));
        let q = usize::from(slot / 2);
        if slot.is_multiple_of(2) && q != 0 {
            if let Some(sq) = self.sqs.get(q).cloned().flatten() {
                if v < sq.size && in_mem(sq.base, u64::from(sq.size) * regs::SQE_SIZE) {
                    self.ring(&[(q as u16, v)]);
                    return;
                }
            }
        }
        let v = match self.cqs.get(q).cloned().flatten() {
            Some(c) if slot % 2 == 1 && v < c.size => c.head,
            _ => v,
        };
        self.guest.write(s + 4 * u64::from(slot), &v.to_le_bytes());
    }
}

/// A completion queue entry.
#[derive(Debug)]
struct Cqe {
    sq_head: u16,
    sqid: u16,
    cid: u16,
    phase: bool,
    sf: u16,
}

impl Cqe {
    fn parse(b: &[u8; 16]) -> Cqe {
        let w = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let sf = w(14);
        Cqe {
            sq_head: w(8),
            sqid: w(10),
            cid: w(12),
            phase: sf & 1 != 0,
            sf: sf >> 1,
        }
    }

    /// (SCT, SC).
    fn status(&self) -> (u8, u8) {
        (((self.sf >> 8) & 7) as u8, (self.sf & 0xff) as u8)
    }
}
