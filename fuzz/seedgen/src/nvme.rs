//! Seeds of `fuzz_targets/nvme.rs`: a header and operations in its input format, over the
//! mnvme controller (the constants below must match the target's).

use umdev_mnvme::identify::NSID;
use umdev_mnvme::regs::{admin, feature, io, Sqe, CC, CC_EN};

/// Header flag bits.
const SHARED: u8 = 1;
const MSIX: u8 = 2;
const IO: u8 = 4;
const DBBUF: u8 = 8;
/// Operation kinds, and the bits of an SQE operation.
const ADMIN: u8 = 0;
const IOQ: u8 = 1;
const REGISTER: u8 = 2;
const RESET: u8 = 5;
const HOLD_CQ: u8 = 6;
const REOPEN: u8 = 7;
const BATCH: u8 = 8;
const FOLD: u8 = 0x10;
const LIST: u8 = 0x20;
/// The target's queue pages.
const IOSQ: u64 = 0x3000;
const IOCQ: u64 = 0x4000;

/// An input under construction.
struct Ops(Vec<u8>);

impl Ops {
    /// Header: flags, then admin SQ, admin CQ and I/O queue entries (`2 + b % 32` each).
    fn new(flags: u8) -> Ops {
        Ops(vec![flags, 14, 30, 14])
    }

    fn sqe(&mut self, op: u8, s: Sqe) -> &mut Self {
        self.0.push(op);
        self.0.extend_from_slice(&s.to_bytes());
        self
    }

    fn register(&mut self, off: u64, v: u32) -> &mut Self {
        self.0.push(REGISTER);
        self.0
            .push(u8::try_from(off / 4).expect("a register below 0x40"));
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    fn op(&mut self, op: u8, operand: Option<u8>) -> &mut Self {
        self.0.push(op);
        self.0.extend(operand);
        self
    }

    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

fn cmd(opcode: u8, cid: u16, nsid: u32, cdw: [u32; 6]) -> Sqe {
    Sqe {
        opcode,
        cid,
        nsid,
        cdw,
        ..Sqe::default()
    }
}

/// A Read or Write of `blocks` (1-based) at `slba`.
fn rw(opcode: u8, cid: u16, slba: u64, blocks: u32) -> Sqe {
    cmd(
        opcode,
        cid,
        NSID,
        [slba as u32, (slba >> 32) as u32, blocks - 1, 0, 0, 0],
    )
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut s = Vec::new();
    let identify = |cid, cns, nsid| cmd(admin::IDENTIFY, cid, nsid, [cns, 0, 0, 0, 0, 0]);
    s.push((
        "identify",
        Ops::new(0)
            .sqe(ADMIN | FOLD, identify(1, 1, 0))
            .sqe(ADMIN | FOLD, identify(2, 0, NSID))
            .sqe(ADMIN | FOLD, identify(3, 2, 0))
            .sqe(ADMIN | FOLD, identify(4, 3, NSID))
            .done(),
    ));
    let mut create_cq = cmd(admin::CREATE_CQ, 1, 0, [(15 << 16) | 1, 0b11, 0, 0, 0, 0]);
    create_cq.prp1 = IOCQ;
    let mut create_sq = cmd(
        admin::CREATE_SQ,
        2,
        0,
        [(15 << 16) | 1, 1 | (1 << 16), 0, 0, 0, 0],
    );
    create_sq.prp1 = IOSQ;
    s.push((
        "create-queues",
        Ops::new(0)
            .sqe(ADMIN, create_cq)
            .sqe(ADMIN, create_sq)
            .sqe(IOQ | FOLD, rw(io::READ, 3, 0, 1))
            .done(),
    ));
    s.push((
        "write-read",
        Ops::new(IO)
            .sqe(IOQ | FOLD, rw(io::WRITE, 1, 8, 8))
            .sqe(IOQ | FOLD, rw(io::READ, 2, 8, 8))
            .done(),
    ));
    let mut listed = rw(io::READ, 2, 0, 128);
    listed.prp2 = 3 << 9;
    let mut chained = rw(io::WRITE, 3, 64, 256);
    chained.prp2 = 500;
    s.push((
        "prp-lists",
        Ops::new(IO | SHARED)
            .sqe(IOQ | LIST, rw(io::WRITE, 1, 0, 128))
            .sqe(IOQ | LIST, listed)
            .sqe(IOQ | LIST, chained)
            .done(),
    ));
    let mut dsm = cmd(io::DSM, 3, NSID, [0, 1 << 2, 0, 0, 0, 0]);
    dsm.prp1 = 0;
    s.push((
        "flush-zeroes-dsm",
        Ops::new(IO)
            .sqe(IOQ, cmd(io::FLUSH, 1, NSID, [0; 6]))
            .sqe(IOQ, cmd(io::FLUSH, 4, u32::MAX, [0; 6]))
            .sqe(IOQ, cmd(io::WRITE_ZEROES, 2, NSID, [16, 0, 7, 0, 0, 0]))
            .sqe(IOQ | FOLD, dsm)
            .done(),
    ));
    let feat = |op, cid, fid: u8, v| cmd(op, cid, 0, [u32::from(fid), v, 0, 0, 0, 0]);
    s.push((
        "features",
        Ops::new(0)
            .sqe(
                ADMIN,
                feat(
                    admin::SET_FEATURES,
                    1,
                    feature::NUMBER_OF_QUEUES,
                    0x0003_0003,
                ),
            )
            .sqe(
                ADMIN,
                feat(admin::GET_FEATURES, 2, feature::NUMBER_OF_QUEUES, 0),
            )
            .sqe(
                ADMIN,
                feat(
                    admin::SET_FEATURES,
                    3,
                    feature::INTERRUPT_COALESCING,
                    0x0103,
                ),
            )
            .sqe(
                ADMIN,
                feat(admin::GET_FEATURES, 4, feature::VOLATILE_WRITE_CACHE, 0),
            )
            .sqe(
                ADMIN,
                feat(
                    admin::SET_FEATURES,
                    5,
                    feature::INTERRUPT_VECTOR_CONFIG,
                    0x10001,
                ),
            )
            .sqe(
                ADMIN,
                feat(admin::GET_FEATURES, 6, feature::ARBITRATION, 3 << 8),
            )
            .done(),
    ));
    let log = |cid, lid: u32, numd: u32| {
        cmd(
            admin::GET_LOG_PAGE,
            cid,
            u32::MAX,
            [lid | (numd << 16), 0, 0, 0, 0, 0],
        )
    };
    s.push((
        "log-pages",
        Ops::new(0)
            .sqe(ADMIN | FOLD, log(1, 1, 15))
            .sqe(ADMIN | FOLD, log(2, 2, 127))
            .sqe(ADMIN | LIST, log(3, 3, 2047))
            .done(),
    ));
    s.push((
        "shadow-doorbells",
        Ops::new(SHARED | MSIX | IO | DBBUF)
            .sqe(IOQ | FOLD, rw(io::WRITE, 1, 0, 8))
            .sqe(IOQ | FOLD | BATCH, rw(io::READ, 2, 0, 8))
            .sqe(IOQ | FOLD, rw(io::READ, 3, 8, 8))
            .done(),
    ));
    s.push((
        "misc-admin",
        Ops::new(MSIX)
            .sqe(ADMIN, cmd(admin::ASYNC_EVENT, 1, 0, [0; 6]))
            .sqe(ADMIN, cmd(admin::ABORT, 2, 0, [1, 0, 0, 0, 0, 0]))
            .sqe(ADMIN, cmd(admin::KEEP_ALIVE, 3, 0, [0; 6]))
            .sqe(ADMIN, cmd(0xc1, 4, 0, [0; 6]))
            // An invalid doorbell: the AER completes with an error event.
            .op(3, Some(0x41))
            .done(),
    ));
    s.push((
        "unknown-io-opcode",
        Ops::new(IO)
            .sqe(IOQ, cmd(0x7f, 1, NSID, [0; 6]))
            .sqe(IOQ, cmd(0x05, 2, NSID, [0; 6]))
            .done(),
    ));
    s.push((
        "out-of-range",
        Ops::new(IO)
            .sqe(IOQ | FOLD, rw(io::READ, 1, (1 << 21) - 1, 2))
            .sqe(IOQ | FOLD, rw(io::WRITE, 2, u64::MAX, 1))
            .sqe(IOQ, cmd(io::WRITE_ZEROES, 3, NSID, [0, 1, 0, 0, 0, 0]))
            .done(),
    ));
    s.push((
        "delete-queues",
        Ops::new(IO)
            .sqe(IOQ | FOLD | BATCH, rw(io::READ, 1, 0, 1))
            .sqe(ADMIN, cmd(admin::DELETE_SQ, 2, 0, [1, 0, 0, 0, 0, 0]))
            .sqe(ADMIN, cmd(admin::DELETE_CQ, 3, 0, [1, 0, 0, 0, 0, 0]))
            .done(),
    ));
    s.push((
        "full-cq",
        Ops::new(IO)
            .op(HOLD_CQ, Some(1))
            .sqe(IOQ | BATCH, cmd(io::FLUSH, 1, NSID, [0; 6]))
            .sqe(IOQ | BATCH, cmd(io::FLUSH, 2, NSID, [0; 6]))
            .sqe(IOQ, cmd(io::FLUSH, 3, NSID, [0; 6]))
            .op(HOLD_CQ, Some(1))
            .done(),
    ));
    s.push((
        "disable-reset-reopen",
        Ops::new(IO)
            .register(CC, 0)
            .register(CC, CC_EN | (6 << 16) | (4 << 20))
            .op(RESET, None)
            .sqe(IOQ | FOLD, rw(io::READ, 1, 0, 1))
            .op(REOPEN, None)
            .sqe(IOQ | FOLD, rw(io::READ, 2, 0, 1))
            .register(CC, CC_EN | (6 << 16) | (4 << 20) | (1 << 14))
            .done(),
    ));
    s
}
