//! NVMe 1.4 numbers: controller registers, opcodes, status codes, feature ids, and the
//! layout of submission and completion queue entries.

/// Controller Capabilities (8 bytes).
pub const CAP: u64 = 0x00;
/// Version.
pub const VS: u64 = 0x08;
/// Interrupt Mask Set (INTx and MSI only).
pub const INTMS: u64 = 0x0c;
/// Interrupt Mask Clear.
pub const INTMC: u64 = 0x10;
/// Controller Configuration.
pub const CC: u64 = 0x14;
/// Controller Status.
pub const CSTS: u64 = 0x1c;
/// NVM Subsystem Reset.
pub const NSSR: u64 = 0x20;
/// Admin Queue Attributes.
pub const AQA: u64 = 0x24;
/// Admin Submission Queue Base Address (8 bytes).
pub const ASQ: u64 = 0x28;
/// Admin Submission Queue Base Address, high half.
pub const ASQ_HI: u64 = 0x2c;
/// Admin Completion Queue Base Address (8 bytes).
pub const ACQ: u64 = 0x30;
/// Admin Completion Queue Base Address, high half.
pub const ACQ_HI: u64 = 0x34;
/// The first doorbell: SQ y tail at `DOORBELLS + 8y`, CQ y head at `DOORBELLS + 8y + 4`.
pub const DOORBELLS: u64 = 0x1000;

/// The version this controller implements (1.4.0).
pub const VERSION: u32 = 0x0001_0400;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.SHN (2 bits at 14): 01 normal, 10 abrupt shutdown notification.
pub const CC_SHN_SHIFT: u32 = 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS (fatal status).
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST = 10b: shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// Size of a submission queue entry (SQES 6) and a completion queue entry (CQES 4).
pub const SQE_SIZE: u64 = 64;
/// Completion queue entry size.
pub const CQE_SIZE: u64 = 16;
/// The memory page size (CC.MPS 0: 4 KiB, the only one offered).
pub const PAGE: u64 = 4096;
/// Most entries a queue may have (CAP.MQES is this minus one).
pub const MAX_QUEUE_ENTRIES: u32 = 1024;

/// Admin opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
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
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Doorbell Buffer Config (shadow doorbells and EventIdx).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod io {
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

/// Feature identifiers.
pub mod feature {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// Temperature Threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0a;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

/// A completion status: status code type and status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    /// Status Code Type (0 generic, 1 command specific, 2 media and data integrity).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    const fn generic(sc: u8) -> Status {
        Status {
            sct: 0,
            sc,
            dnr: sc != 0,
        }
    }

    const fn specific(sc: u8) -> Status {
        Status {
            sct: 1,
            sc,
            dnr: true,
        }
    }

    /// The CQE's status field (bits 31:17 of DW3, without the phase bit).
    pub fn field(self) -> u16 {
        u16::from(self.sc) | (u16::from(self.sct & 7) << 8) | (u16::from(self.dnr) << 14)
    }
}

/// Successful Completion.
pub const SUCCESS: Status = Status::generic(0x00);
/// Invalid Command Opcode.
pub const INVALID_OPCODE: Status = Status::generic(0x01);
/// Invalid Field in Command.
pub const INVALID_FIELD: Status = Status::generic(0x02);
/// Command Sequence Error.
pub const COMMAND_SEQUENCE_ERROR: Status = Status::generic(0x0c);
/// Data Transfer Error.
pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
/// Internal Error.
pub const INTERNAL_ERROR: Status = Status::generic(0x06);
/// Command Aborted due to SQ Deletion.
pub const ABORTED_SQ_DELETION: Status = Status::generic(0x08);
/// Invalid Namespace or Format.
pub const INVALID_NAMESPACE: Status = Status::generic(0x0b);
/// PRP Offset Invalid.
pub const PRP_OFFSET_INVALID: Status = Status::generic(0x13);
/// LBA Out of Range.
pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
/// Completion Queue Invalid.
pub const CQ_INVALID: Status = Status::specific(0x00);
/// Invalid Queue Identifier.
pub const INVALID_QUEUE_ID: Status = Status::specific(0x01);
/// Invalid Queue Size.
pub const INVALID_QUEUE_SIZE: Status = Status::specific(0x02);
/// Asynchronous Event Request Limit Exceeded.
pub const AER_LIMIT_EXCEEDED: Status = Status::specific(0x05);
/// Invalid Interrupt Vector.
pub const INVALID_INTERRUPT_VECTOR: Status = Status::specific(0x08);
/// Invalid Log Page.
pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
/// Invalid Queue Deletion.
pub const INVALID_QUEUE_DELETION: Status = Status::specific(0x0c);
/// Feature Identifier Not Saveable.
pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0d);

/// A submission queue entry's fields (command dwords 0 to 15).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation and PSDT (PRP or SGL).
    pub flags: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Sqe {
    /// Parses 64 bytes.
    pub fn parse(b: &[u8; 64]) -> Sqe {
        let d = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let q = |i: usize| u64::from(d(i)) | (u64::from(d(i + 4)) << 32);
        let mut cdw = [0u32; 6];
        for (k, v) in cdw.iter_mut().enumerate() {
            *v = d(40 + 4 * k);
        }
        Sqe {
            opcode: b[0],
            flags: b[1],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: d(4),
            prp1: q(24),
            prp2: q(32),
            cdw,
        }
    }

    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        self.cdw.get(n.wrapping_sub(10)).copied().unwrap_or(0)
    }

    /// The 64 bytes (for tests and drivers).
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0] = self.opcode;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.cid.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (k, v) in self.cdw.iter().enumerate() {
            b[40 + 4 * k..44 + 4 * k].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// A completion queue entry.
pub fn cqe(dw0: u32, sq_head: u16, sqid: u16, cid: u16, phase: bool, status: Status) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&dw0.to_le_bytes());
    b[8..10].copy_from_slice(&sq_head.to_le_bytes());
    b[10..12].copy_from_slice(&sqid.to_le_bytes());
    b[12..14].copy_from_slice(&cid.to_le_bytes());
    let sf = (status.field() << 1) | u16::from(phase);
    b[14..16].copy_from_slice(&sf.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqes_round_trip() {
        let s = Sqe {
            opcode: 2,
            flags: 0,
            cid: 0x1234,
            nsid: 1,
            prp1: 0x1_2345_6000,
            prp2: 0x7000,
            cdw: [10, 11, 12, 13, 14, 15],
        };
        assert_eq!(Sqe::parse(&s.to_bytes()), s);
        assert_eq!(s.cdw(12), 12);
        assert_eq!(s.cdw(9), 0);
    }

    #[test]
    fn cqe_status_and_phase_bits() {
        let c = cqe(7, 3, 1, 0x55, true, LBA_OUT_OF_RANGE);
        let sf = u16::from_le_bytes([c[14], c[15]]);
        assert_eq!(sf & 1, 1, "phase");
        assert_eq!((sf >> 1) & 0xff, 0x80, "SC");
        assert_eq!((sf >> 9) & 7, 0, "SCT");
        assert_eq!(sf >> 15, 1, "DNR");
        let c = cqe(0, 0, 0, 0, false, INVALID_QUEUE_ID);
        let sf = u16::from_le_bytes([c[14], c[15]]);
        assert_eq!(((sf >> 1) & 0xff, (sf >> 9) & 7), (1, 1));
    }
}
