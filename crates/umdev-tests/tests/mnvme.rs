#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
//! mnvme through the product: `umdevd` with an `mnvme` parent, controllers created through
//! sysfs (and mdevctl), driven over their vfio-user sockets by the NVMe host driver of
//! `umdev_client::nvme` with memory shared through a memfd (the controller pins it) and
//! with plain memory (every byte through DMA_READ/DMA_WRITE messages).
//!
//! - identity and data: Identify matches the device's attributes; writes with PRP lists
//!   land in the backing file at their offset, the host's writes to the file are read back,
//!   Write Zeroes and deallocation read as zeroes, MSI-X vectors count completions;
//! - many commands in flight on several queues, every block checked;
//! - the negative cases the NVMe specification names a status for, over a real socket;
//! - an unmap of the data's memory while commands are in flight on it;
//! - the pool: accounting under mixed types, ENOSPC, backing files kept or deleted by
//!   policy, adopted through `vendor/backing_file`, kept across `mdevctl stop` and `start`;
//! - migration between two daemons while the client writes.

mod mdev;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use mdev::{errno, new_uuid, Daemon};
use umdev_client::migration::{FileCopier, MigrateOptions, Migration};
use umdev_client::nvme::{op, status, HostMemory, Nvme, NvmeOptions, Sqe};
use umdev_client::Client;

const GIB: u64 = 1 << 30;
/// Where the queues live, and the data buffers (a mapping of their own).
const QUEUE_IOVA: u64 = 0x1000_0000;
const QUEUE_LEN: u64 = 16 << 20;
const DATA_IOVA: u64 = 0x4000_0000;
const DATA_LEN: u64 = 32 << 20;

fn config(capacity_gib: u32) -> String {
    format!(
        "release_timeout_ms = 300\n\n[[parent]]\nname = \"nvme0\"\ndriver = \"mnvme\"\n\
         options = {{ capacity_gib = {capacity_gib} }}\n"
    )
}

fn attr(d: &Daemon, uuid: &str, name: &str) -> String {
    std::fs::read_to_string(d.mdev_dir(uuid).join(name))
        .unwrap()
        .trim_end()
        .to_owned()
}

fn create(d: &Daemon, t: &str) -> String {
    let uuid = new_uuid();
    d.create("nvme0", t, &uuid).unwrap();
    uuid
}

/// Memory kinds: shared (fd-backed) or plain (DMA messages).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mem {
    Shared,
    Plain,
}

fn memory(c: &mut Client, kind: Mem, iova: u64, len: u64) -> Arc<HostMemory> {
    match kind {
        Mem::Shared => HostMemory::shared(c, iova, len).unwrap(),
        Mem::Plain => HostMemory::plain(c, iova, len).unwrap(),
    }
}

/// A driven controller and its data memory.
struct Host {
    n: Nvme,
    data: Arc<HostMemory>,
}

fn connect(d: &Daemon, uuid: &str, kind: Mem, o: &NvmeOptions) -> Host {
    let mut c = Client::connect(d.socket(uuid)).unwrap();
    // Plain memory: one handler answers for both ranges.
    let (q, data) = match kind {
        Mem::Shared => (
            memory(&mut c, kind, QUEUE_IOVA, QUEUE_LEN),
            memory(&mut c, kind, DATA_IOVA, DATA_LEN),
        ),
        Mem::Plain => plain_pair(&mut c),
    };
    Host {
        n: Nvme::enable(c, q, o).unwrap(),
        data,
    }
}

/// Queue and data memory without fds, answered by one handler.
fn plain_pair(c: &mut Client) -> (Arc<HostMemory>, Arc<HostMemory>) {
    let q = HostMemory::plain(c, QUEUE_IOVA, QUEUE_LEN).unwrap();
    let v = q.vec_memory().unwrap().clone();
    let data = HostMemory::plain_in(c, &v, DATA_IOVA, DATA_LEN).unwrap();
    (q, data)
}

/// Block `lba`'s pattern for generation `g`: every byte depends on both.
fn block(lba: u64, g: u8) -> Vec<u8> {
    (0..512u64)
        .map(|i| (lba.wrapping_mul(31) ^ (i * 7) ^ u64::from(g).wrapping_mul(101)) as u8)
        .collect()
}

fn blocks(lba: u64, n: u64, g: u8) -> Vec<u8> {
    (lba..lba + n).flat_map(|l| block(l, g)).collect()
}

impl Host {
    /// Writes `n` blocks at `lba` with generation `g` from a fresh buffer at byte `skew`
    /// into a page (PRP1 with an offset); waits.
    fn write(&mut self, q: u16, lba: u64, n: u32, g: u8, skew: u64) -> u16 {
        let len = u64::from(n) * 512;
        let buf = self.data.alloc(len + 4096, 4096) + skew;
        self.data.write(buf, &blocks(lba, u64::from(n), g)).unwrap();
        let (p1, p2) = self.n.prps(buf, len).unwrap();
        self.n
            .submit_wait(q, Sqe::rw(op::WRITE, 1, lba, n, p1, p2))
            .unwrap()
            .status
    }

    /// Reads `n` blocks at `lba`; waits; returns the bytes.
    fn read(&mut self, q: u16, lba: u64, n: u32, skew: u64) -> Vec<u8> {
        let len = u64::from(n) * 512;
        let buf = self.data.alloc(len + 4096, 4096) + skew;
        let (p1, p2) = self.n.prps(buf, len).unwrap();
        let c = self
            .n
            .submit_wait(q, Sqe::rw(op::READ, 1, lba, n, p1, p2))
            .unwrap();
        assert!(c.ok(), "read at {lba}: status {:#x}", c.status);
        let mut out = vec![0u8; len as usize];
        self.data.read(buf, &mut out).unwrap();
        out
    }
}

fn identity_and_data(kind: Mem) {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    assert_eq!(attr(&d, &uuid, "vendor/size"), GIB.to_string());
    let file = PathBuf::from(attr(&d, &uuid, "vendor/backing_file"));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), GIB, "the backing file has the type's size");
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "and is sparse");

    let mut h = connect(&d, &uuid, kind, &NvmeOptions::default());
    // Identify: the device's identity and size.
    let serial = String::from_utf8_lossy(&h.n.id_ctrl[4..24])
        .trim_end()
        .to_owned();
    assert_eq!(serial, attr(&d, &uuid, "vendor/serial"));
    let nqn = String::from_utf8_lossy(&h.n.id_ctrl[768..1024])
        .trim_end_matches('\0')
        .to_owned();
    assert_eq!(nqn, attr(&d, &uuid, "vendor/subnqn"));
    assert!(nqn.ends_with(&uuid), "{nqn}");
    assert_eq!(h.n.blocks, GIB / 512);

    // A 96 KiB write through a PRP list, and a 12 KiB one whose buffer starts 512 bytes
    // into a page; both read back through other buffers, and found in the backing file.
    assert_eq!(h.write(1, 2048, 192, 1, 0), status::SUCCESS);
    assert_eq!(h.write(1, 9000, 24, 2, 512), status::SUCCESS);
    assert_eq!(h.read(1, 2048, 192, 0), blocks(2048, 192, 1));
    assert_eq!(h.read(1, 9000, 24, 1536), blocks(9000, 24, 2));
    let f = std::fs::File::open(&file).unwrap();
    let mut on_disk = vec![0u8; 192 * 512];
    f.read_exact_at(&mut on_disk, 2048 * 512).unwrap();
    assert!(
        on_disk == blocks(2048, 192, 1),
        "the backing file holds the writes"
    );
    // The host writes the file; the controller reads what it wrote.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&blocks(77_777, 8, 9), 77_777 * 512).unwrap();
    assert_eq!(h.read(1, 77_777, 8, 0), blocks(77_777, 8, 9));

    // Flush; Write Zeroes and Dataset Management deallocation read as zeroes.
    let c = h.n.submit_wait(1, Sqe::new(op::FLUSH, 1)).unwrap();
    assert!(c.ok());
    let c =
        h.n.submit_wait(1, Sqe::new(op::WRITE_ZEROES, 1).cdw(10, 2048).cdw(12, 7))
            .unwrap();
    assert!(c.ok());
    assert_eq!(h.read(1, 2048, 8, 0), vec![0u8; 4096]);
    assert_eq!(
        h.read(1, 2056, 8, 0),
        blocks(2056, 8, 1),
        "only 8 blocks zeroed"
    );
    let range = h.data.alloc(4096, 4096);
    let mut r = vec![0u8; 16];
    r[4..8].copy_from_slice(&24u32.to_le_bytes());
    r[8..16].copy_from_slice(&9000u64.to_le_bytes());
    h.data.write(range, &r).unwrap();
    let c =
        h.n.submit_wait(
            1,
            Sqe::new(op::DSM, 1)
                .prps(range, 0)
                .cdw(10, 0)
                .cdw(11, 1 << 2),
        )
        .unwrap();
    assert!(c.ok());
    assert_eq!(h.read(1, 9000, 24, 0), vec![0u8; 24 * 512]);

    // SMART counts the commands; vector 1 (queue 1's) fired, and only vector 0 besides.
    let log = h.data.alloc(4096, 4096);
    let c =
        h.n.admin(
            Sqe::new(op::GET_LOG_PAGE, u32::MAX)
                .prps(log, 0)
                .cdw(10, 0x02 | (127 << 16)),
        )
        .unwrap();
    assert!(c.ok());
    let mut smart = vec![0u8; 512];
    h.data.read(log, &mut smart).unwrap();
    let writes = u64::from_le_bytes(smart[80..88].try_into().unwrap());
    assert_eq!(writes, 2, "host write commands");
    assert!(h.n.interrupts(1) > 0, "queue 1's vector fired");
    assert!(h.n.interrupts(0) > 0, "the admin queue's vector fired");
}

#[test]
fn identity_and_data_through_shared_memory() {
    identity_and_data(Mem::Shared);
}

#[test]
fn identity_and_data_through_dma_messages() {
    identity_and_data(Mem::Plain);
}

/// 4 queues with 48 writes of 32 KiB each in flight at once (PRP lists), then 48 reads.
fn many_in_flight(kind: Mem) {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    let o = NvmeOptions {
        io_queues: 4,
        depth: 64,
        shadow_doorbells: kind == Mem::Shared,
        interrupts: true,
    };
    let mut h = connect(&d, &uuid, kind, &o);
    assert_eq!(h.n.shadow_doorbells(), kind == Mem::Shared);
    let per = 64u32; // blocks per command: 32 KiB
    let cmds = 48u64;
    let lba = |i: u64| 100_000 + i * 1000;
    let mut bufs = Vec::new();
    for i in 0..cmds {
        let q = 1 + (i % 4) as u16;
        let buf = h.data.alloc(u64::from(per) * 512, 4096);
        h.data
            .write(buf, &blocks(lba(i), u64::from(per), 3))
            .unwrap();
        let (p1, p2) = h.n.prps(buf, u64::from(per) * 512).unwrap();
        h.n.push(q, Sqe::rw(op::WRITE, 1, lba(i), per, p1, p2))
            .unwrap();
    }
    for q in 1..=4 {
        h.n.ring(q).unwrap();
    }
    let mut done = 0;
    while done < cmds {
        for q in 1..=4 {
            if h.n.queues[usize::from(q)].in_flight.is_empty() {
                continue;
            }
            for c in h.n.wait(q).unwrap() {
                assert!(c.ok(), "write status {:#x}", c.status);
                done += 1;
            }
        }
    }
    for i in 0..cmds {
        let q = 1 + (i % 4) as u16;
        let buf = h.data.alloc(u64::from(per) * 512, 4096);
        let (p1, p2) = h.n.prps(buf, u64::from(per) * 512).unwrap();
        h.n.push(q, Sqe::rw(op::READ, 1, lba(i), per, p1, p2))
            .unwrap();
        bufs.push(buf);
    }
    for q in 1..=4 {
        h.n.ring(q).unwrap();
    }
    let mut done = 0;
    while done < cmds {
        for q in 1..=4 {
            if h.n.queues[usize::from(q)].in_flight.is_empty() {
                continue;
            }
            for c in h.n.wait(q).unwrap() {
                assert!(c.ok(), "read status {:#x}", c.status);
                done += 1;
            }
        }
    }
    for (i, buf) in bufs.iter().enumerate() {
        let mut got = vec![0u8; per as usize * 512];
        h.data.read(*buf, &mut got).unwrap();
        assert!(
            got == blocks(lba(i as u64), u64::from(per), 3),
            "command {i}"
        );
    }
}

#[test]
fn many_commands_in_flight_on_four_queues_shared_memory_shadow_doorbells() {
    many_in_flight(Mem::Shared);
}

#[test]
fn many_commands_in_flight_on_four_queues_dma_messages() {
    many_in_flight(Mem::Plain);
}

#[test]
fn what_the_driver_gets_wrong_gets_the_status_the_spec_names() {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    let o = NvmeOptions {
        io_queues: 2,
        ..NvmeOptions::default()
    };
    let mut h = connect(&d, &uuid, Mem::Shared, &o);
    let buf = h.data.alloc(64 << 10, 4096);
    let n = &mut h.n;
    let admin = |n: &mut Nvme, s: Sqe| n.admin(s).unwrap().status;
    let io = |n: &mut Nvme, s: Sqe| n.submit_wait(1, s).unwrap().status;

    // Opcodes and fields.
    assert_eq!(admin(n, Sqe::new(0x7f, 0)), status::INVALID_OPCODE);
    assert_eq!(io(n, Sqe::new(0x7f, 1)), status::INVALID_OPCODE);
    assert_eq!(
        admin(n, Sqe::new(op::IDENTIFY, 0).prps(buf, 0).cdw(10, 0x55)),
        status::INVALID_FIELD
    );
    assert_eq!(
        admin(n, Sqe::new(op::IDENTIFY, 7).prps(buf, 0).cdw(10, 0)),
        status::INVALID_NAMESPACE
    );
    assert_eq!(
        admin(
            n,
            Sqe::new(op::GET_LOG_PAGE, 0)
                .prps(buf, 0)
                .cdw(10, 0x70 | (127 << 16))
        ),
        status::INVALID_LOG_PAGE
    );
    assert_eq!(
        admin(n, Sqe::new(op::GET_FEATURES, 0).cdw(10, 0x55)),
        status::INVALID_FIELD
    );
    // I/O: namespace, range, transfer size, SGLs.
    assert_eq!(
        io(n, Sqe::rw(op::READ, 2, 0, 1, buf, 0)),
        status::INVALID_NAMESPACE
    );
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, GIB / 512 - 1, 2, buf, buf + 4096)),
        status::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, u64::MAX - 1, 4, buf, 0)),
        status::LBA_OUT_OF_RANGE,
        "SLBA + NLB overflows"
    );
    let big = n
        .prp_list(&(1..64).map(|i| buf + i * 4096).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, 0, 512, buf, big)),
        status::INVALID_FIELD,
        "256 KiB is past MDTS (128 KiB)"
    );
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, 0, 1, buf, 0).flags(0x40)),
        status::INVALID_FIELD,
        "SGLs are not offered"
    );
    // PRPs: misaligned, a list entry with an offset, a second page with one, unmapped.
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, 0, 1, buf + 2, 0)),
        status::PRP_OFFSET_INVALID
    );
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, 0, 16, buf, buf + 4096 + 8)),
        status::PRP_OFFSET_INVALID
    );
    let bad_list = n.prp_list(&[buf + 4096, buf + 8192 + 16]).unwrap();
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, 0, 24, buf, bad_list)),
        status::PRP_OFFSET_INVALID
    );
    assert_eq!(
        io(n, Sqe::rw(op::READ, 1, 0, 8, 0x7000_0000, 0)),
        status::DATA_TRANSFER_ERROR,
        "a buffer nothing maps"
    );
    assert_eq!(
        io(n, Sqe::rw(op::WRITE, 1, 0, 24, buf, 0x7000_0000)),
        status::DATA_TRANSFER_ERROR,
        "a PRP list nothing maps"
    );
    // Queues: the number is fixed once queues exist; ids, sizes, vectors, a missing CQ,
    // deleting a CQ in use, deleting nothing. Queue pair 2 deleted to be made again.
    assert_eq!(
        admin(
            n,
            Sqe::new(op::SET_FEATURES, 0)
                .cdw(10, 0x07)
                .cdw(11, 3 | (3 << 16))
        ),
        0x00c,
        "Command Sequence Error"
    );
    assert_eq!(
        admin(n, Sqe::new(op::DELETE_SQ, 0).cdw(10, 2)),
        status::SUCCESS
    );
    assert_eq!(
        admin(n, Sqe::new(op::DELETE_CQ, 0).cdw(10, 2)),
        status::SUCCESS
    );
    let ring = n.mem.alloc(64 * 64, 4096);
    let cq = |qid: u32, size: u32, iv: u32| {
        Sqe::new(op::CREATE_CQ, 0)
            .prps(ring, 0)
            .cdw(10, qid | ((size - 1) << 16))
            .cdw(11, 3 | (iv << 16))
    };
    assert_eq!(admin(n, cq(0, 16, 0)), status::INVALID_QUEUE_ID);
    assert_eq!(
        admin(n, cq(1, 16, 1)),
        status::INVALID_QUEUE_ID,
        "CQ 1 exists"
    );
    assert_eq!(admin(n, cq(200, 16, 1)), status::INVALID_QUEUE_ID);
    assert_eq!(admin(n, cq(2, 1, 1)), status::INVALID_QUEUE_SIZE);
    assert_eq!(admin(n, cq(2, 4096, 1)), status::INVALID_QUEUE_SIZE);
    assert_eq!(admin(n, cq(2, 16, 999)), status::INVALID_INTERRUPT_VECTOR);
    assert_eq!(
        admin(
            n,
            Sqe::new(op::CREATE_CQ, 0)
                .prps(ring + 8, 0)
                .cdw(10, 2 | (15 << 16))
                .cdw(11, 3)
        ),
        status::INVALID_FIELD,
        "a ring that is not page aligned"
    );
    let sq = |qid: u32, cqid: u32| {
        Sqe::new(op::CREATE_SQ, 0)
            .prps(ring, 0)
            .cdw(10, qid | (15 << 16))
            .cdw(11, 1 | (cqid << 16))
    };
    assert_eq!(admin(n, sq(2, 9)), status::CQ_INVALID);
    assert_eq!(admin(n, sq(2, 0)), status::CQ_INVALID);
    assert_eq!(
        admin(n, Sqe::new(op::DELETE_CQ, 0).cdw(10, 1)),
        status::INVALID_QUEUE_DELETION
    );
    assert_eq!(
        admin(n, Sqe::new(op::DELETE_SQ, 0).cdw(10, 9)),
        status::INVALID_QUEUE_ID
    );

    // Asynchronous events: four held, the fifth refused; a doorbell past a queue and one
    // of a queue that does not exist complete two of them with error events.
    let mut aers = Vec::new();
    for _ in 0..4 {
        aers.push(n.push(0, Sqe::new(op::ASYNC_EVENT, 0)).unwrap());
    }
    n.ring(0).unwrap();
    assert_eq!(
        admin(n, Sqe::new(op::ASYNC_EVENT, 0)),
        status::AER_LIMIT_EXCEEDED
    );
    n.client
        .region_write(0, 0x1000 + 8, &4096u32.to_le_bytes())
        .unwrap();
    n.client
        .region_write(0, 0x1000 + 8 * 9, &1u32.to_le_bytes())
        .unwrap();
    let mut events = Vec::new();
    while events.len() < 2 {
        events.extend(n.wait(0).unwrap());
    }
    let mut infos: Vec<u32> = events
        .iter()
        .map(|c| {
            assert!(c.ok() && aers.contains(&c.cid));
            assert_eq!(c.dw0 & 7, 0, "event type: error");
            (c.dw0 >> 8) & 0xff
        })
        .collect();
    infos.sort_unstable();
    assert_eq!(
        infos,
        vec![0, 1],
        "invalid doorbell register, invalid doorbell value"
    );

    // Features: coalescing and the per-vector switch read back; a vector past the last is
    // an invalid field.
    let c = n
        .admin(Sqe::new(op::SET_FEATURES, 0).cdw(10, 0x08).cdw(11, 0x0a07))
        .unwrap();
    assert!(c.ok());
    assert_eq!(
        n.admin(Sqe::new(op::GET_FEATURES, 0).cdw(10, 0x08))
            .unwrap()
            .dw0,
        0x0a07
    );
    assert!(n
        .admin(
            Sqe::new(op::SET_FEATURES, 0)
                .cdw(10, 0x09)
                .cdw(11, 1 | (1 << 16))
        )
        .unwrap()
        .ok());
    assert_eq!(
        n.admin(Sqe::new(op::GET_FEATURES, 0).cdw(10, 0x09).cdw(11, 1))
            .unwrap()
            .dw0,
        1 | (1 << 16)
    );
    assert_eq!(
        admin(n, Sqe::new(op::SET_FEATURES, 0).cdw(10, 0x09).cdw(11, 99)),
        status::INVALID_FIELD
    );

    // After all that, the controller still works.
    assert_eq!(h.write(1, 5, 8, 4, 0), status::SUCCESS);
    assert_eq!(h.read(1, 5, 8, 0), blocks(5, 8, 4));

    // A configuration the controller cannot use is a fatal status, cleared by a reset.
    let n = &mut h.n;
    n.disable().unwrap();
    n.write_reg32(0x14, 1 | (1 << 7) | (6 << 16) | (4 << 20))
        .unwrap(); // MPS 8 KiB
    n.wait_csts(2, 2, "CSTS.CFS").unwrap();
    n.disable().unwrap();
}

/// Shadow doorbells need MSI or MSI-X: on INTx a VMM without a resampler ends the
/// interrupt at the guest's next access to the device, which a driver using its shadow
/// doorbell never makes. The controller refuses them there; the driver goes on ringing.
#[test]
fn shadow_doorbells_are_refused_on_intx_and_the_driver_rings_instead() {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    let o = NvmeOptions {
        shadow_doorbells: true,
        interrupts: false,
        ..NvmeOptions::default()
    };
    let mut h = connect(&d, &uuid, Mem::Shared, &o);
    assert!(!h.n.shadow_doorbells());
    let before = h.n.doorbells;
    assert_eq!(h.write(1, 0, 8, 1, 0), status::SUCCESS);
    assert_eq!(h.read(1, 0, 8, 0), blocks(0, 8, 1));
    assert!(
        h.n.doorbells >= before + 4,
        "every submission and head rang"
    );
}

/// DEVICE_GET_REGION_IO_FDS: the I/O submission queues' tail doorbells as ioeventfds.
/// A driver with shadow doorbells rings through them (no REGION_WRITE for a tail) and the
/// data is right; the reply follows its argsz and the client's max_msg_fds.
#[test]
fn doorbell_ioeventfds_ring_the_controller_with_shadow_doorbells() {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    // The raw protocol first: a short argsz gets the size and the count, no fds; a client
    // that takes one fd per message cannot take sixteen.
    let mut raw = umdev_tests::wire::Raw::negotiated(&d.socket(&uuid));
    let req = |argsz: u32, index: u32| umdev_proto::wire::RegionIoFds {
        argsz,
        flags: 0,
        index,
        count: 0,
    };
    let cmd = umdev_proto::Command::DeviceGetRegionIoFds as u16;
    use zerocopy::IntoBytes;
    let r = raw.call(cmd, &[req(16, 0).as_bytes()], &[]);
    assert_eq!(r.errno(), None);
    assert_eq!(r.body.len(), 16);
    assert!(r.fds.is_empty());
    let argsz = u32::from_le_bytes(r.body[0..4].try_into().unwrap());
    let count = u32::from_le_bytes(r.body[12..16].try_into().unwrap());
    assert_eq!((argsz, count), (16 + 40 * 16, 16));
    let r = raw.call(cmd, &[req(argsz, 0).as_bytes()], &[]);
    assert_eq!(
        r.errno(),
        Some(7),
        "E2BIG: sixteen fds for a client of max_msg_fds 1"
    );
    let r = raw.call(cmd, &[req(4096, 9).as_bytes()], &[]);
    assert_eq!(r.errno(), Some(22), "EINVAL past the last region");
    drop(raw);

    let o = NvmeOptions {
        io_queues: 2,
        depth: 64,
        shadow_doorbells: true,
        interrupts: true,
    };
    let mut h = connect(&d, &uuid, Mem::Shared, &o);
    assert!(h.n.shadow_doorbells());
    let subs = h.n.client.region_io_fds(0).unwrap();
    let offsets: Vec<(u64, u64, u32, u32)> = subs
        .iter()
        .map(|(s, _)| (s.offset, s.size, s.kind, s.flags))
        .collect();
    let want: Vec<(u64, u64, u32, u32)> = (1..=16u64).map(|q| (0x1000 + 8 * q, 4, 0, 0)).collect();
    assert_eq!(offsets, want);
    assert!(
        h.n.client.region_io_fds(2).unwrap().is_empty(),
        "BAR2 is absent"
    );
    assert_eq!(h.n.use_ioeventfds().unwrap(), 16);
    // Bursts of writes and reads on both queues, every block checked.
    let mut bufs = Vec::new();
    for round in 0..20u64 {
        for i in 0..16u64 {
            let q = 1 + (i % 2) as u16;
            let lba = (round * 16 + i) * 8;
            let buf = h.data.alloc(4096, 4096);
            h.data.write(buf, &blocks(lba, 8, 9)).unwrap();
            h.n.push(q, Sqe::rw(op::WRITE, 1, lba, 8, buf, 0)).unwrap();
            bufs.push(buf);
        }
        for q in 1..=2 {
            h.n.ring(q).unwrap();
        }
        for q in 1..=2 {
            while !h.n.queues[usize::from(q)].in_flight.is_empty() {
                for c in h.n.wait(q).unwrap() {
                    assert!(c.ok());
                }
            }
        }
    }
    for lba in [0u64, 8 * 100, 8 * 319] {
        assert_eq!(h.read(1, lba, 8, 0), blocks(lba, 8, 9));
    }
    assert!(h.n.iofd_signals > 0, "doorbells went through ioeventfds");
}

/// An unmap of the data's memory while commands are in flight on it: every command has
/// completed (or failed with an NVMe status) by the unmap's reply, and the controller
/// kept no pin (it goes on working on memory mapped again, which a revoked device could
/// not).
fn unmap_in_flight(kind: Mem) {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    let o = NvmeOptions {
        io_queues: 2,
        depth: 128,
        ..NvmeOptions::default()
    };
    let mut h = connect(&d, &uuid, kind, &o);
    let cmds = 96u64;
    for i in 0..cmds {
        let q = 1 + (i % 2) as u16;
        let buf = h.data.alloc(64 * 512, 4096);
        let (p1, p2) = h.n.prps(buf, 64 * 512).unwrap();
        let opcode = if i % 3 == 0 { op::READ } else { op::WRITE };
        h.n.push(q, Sqe::rw(opcode, 1, i * 64, 64, p1, p2)).unwrap();
    }
    h.n.ring(1).unwrap();
    h.n.ring(2).unwrap();
    h.n.client.dma_unmap(DATA_IOVA, DATA_LEN, 0).unwrap();
    // The reply is back: every command's completion is in memory already.
    let mut statuses = std::collections::BTreeMap::new();
    for q in 1..=2 {
        for c in h.n.reap(q).unwrap() {
            *statuses.entry(c.status).or_insert(0u64) += 1;
        }
        assert!(
            h.n.queues[usize::from(q)].in_flight.is_empty(),
            "queue {q}: commands still in flight after the unmap reply: {statuses:?}"
        );
    }
    for s in statuses.keys() {
        assert!(
            *s == status::SUCCESS || *s == status::DATA_TRANSFER_ERROR,
            "{statuses:?}"
        );
    }
    // Memory mapped again at the same addresses works.
    let fresh = match kind {
        Mem::Shared => HostMemory::shared(&mut h.n.client, DATA_IOVA, DATA_LEN).unwrap(),
        Mem::Plain => {
            let v = h.n.mem.vec_memory().unwrap().clone();
            HostMemory::plain_in(&mut h.n.client, &v, DATA_IOVA, DATA_LEN).unwrap()
        }
    };
    h.data = fresh;
    assert_eq!(h.write(1, 3, 8, 5, 0), status::SUCCESS);
    assert_eq!(h.read(2, 3, 8, 0), blocks(3, 8, 5));
}

#[test]
fn unmap_with_commands_in_flight_shared_memory() {
    unmap_in_flight(Mem::Shared);
}

#[test]
fn unmap_with_commands_in_flight_dma_messages() {
    unmap_in_flight(Mem::Plain);
}

#[test]
fn the_pool_counts_mixed_types_refuses_when_full_and_keeps_or_deletes_files() {
    let d = Daemon::start(&config(6));
    let avail = |t: &str| d.available("nvme0", t);
    assert_eq!(
        (avail("mnvme-1g"), avail("mnvme-4g"), avail("mnvme-16g")),
        (6, 1, 0)
    );
    let pool = PathBuf::from(
        std::fs::read_to_string(d.sys().join("devices/umdev/nvme0/vendor/pool"))
            .unwrap()
            .trim_end(),
    );
    let big = create(&d, "mnvme-4g");
    assert_eq!((avail("mnvme-1g"), avail("mnvme-4g")), (2, 0));
    let small = create(&d, "mnvme-1g");
    assert_eq!(avail("mnvme-1g"), 1);
    let e = d.create("nvme0", "mnvme-4g", &new_uuid()).unwrap_err();
    assert_eq!(errno(&e), 28, "ENOSPC: {e}");
    let e = d.create("nvme0", "mnvme-16g", &new_uuid()).unwrap_err();
    assert_eq!(errno(&e), 28, "ENOSPC: {e}");
    let last = create(&d, "mnvme-1g");
    assert_eq!(avail("mnvme-1g"), 0);
    let big_file = pool.join(format!("{big}.img"));
    assert_eq!(std::fs::metadata(&big_file).unwrap().len(), 4 * GIB);

    // Data written into the 4 GiB device survives its removal and re-creation.
    {
        let mut h = connect(&d, &big, Mem::Shared, &NvmeOptions::default());
        assert_eq!(h.write(1, 4 * GIB / 512 - 8, 8, 6, 0), status::SUCCESS);
    }
    d.remove(&big).unwrap();
    assert!(
        big_file.exists(),
        "removing keeps the backing file by default"
    );
    assert_eq!((avail("mnvme-1g"), avail("mnvme-4g")), (4, 1));
    d.create("nvme0", "mnvme-4g", &big).unwrap();
    {
        let mut h = connect(&d, &big, Mem::Shared, &NvmeOptions::default());
        assert_eq!(
            h.read(1, 4 * GIB / 512 - 8, 8, 0),
            blocks(4 * GIB / 512 - 8, 8, 6)
        );
    }
    for u in [&big, &small, &last] {
        d.remove(u).unwrap();
    }
    assert_eq!(avail("mnvme-1g"), 6);

    // A parent whose policy deletes.
    let dir = tempfile::tempdir().unwrap();
    let out = d.umdevctl(&[
        "add-parent",
        "nvme1",
        "mnvme",
        "--opt",
        &format!("pool={}", dir.path().display()),
        "--opt",
        "capacity_gib=2",
        "--opt",
        "delete_on_remove=true",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let u = new_uuid();
    d.create("nvme1", "mnvme-1g", &u).unwrap();
    let f = dir.path().join(format!("{u}.img"));
    assert!(f.exists());
    d.remove(&u).unwrap();
    assert!(!f.exists(), "delete_on_remove deletes the file");
}

#[test]
fn a_backing_file_is_adopted_only_while_no_client_holds_the_device() {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(GIB).unwrap();
    f.write_all_at(&blocks(10, 4, 7), 10 * 512).unwrap();
    let set = |v: &str| std::fs::write(d.mdev_dir(&uuid).join("vendor/backing_file"), v);
    assert_eq!(errno(&set("relative.img\n").unwrap_err()), 22, "EINVAL");
    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert!(set(&format!("{}\n", small.display())).is_err(), "too small");
    set(&format!("{}\n", disk.display())).unwrap();
    assert_eq!(
        attr(&d, &uuid, "vendor/backing_file"),
        disk.display().to_string()
    );
    let mut h = connect(&d, &uuid, Mem::Shared, &NvmeOptions::default());
    assert_eq!(h.read(1, 10, 4, 0), blocks(10, 4, 7));
    let e = set(&format!("{}\n", small.display())).unwrap_err();
    assert_eq!(errno(&e), 16, "EBUSY while a client holds the device");
}

#[test]
fn mdevctl_stop_and_start_of_a_defined_device_keep_the_disk() {
    let d = Daemon::start(&config(4));
    let mdevctl = umdev_tests::prereq::mdevctl();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(&mdevctl)
            .args(args)
            .env("MDEVCTL_ENV_ROOT", d.root())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mdevctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let uuid = new_uuid();
    run(&["define", "-u", &uuid, "-p", "nvme0", "--type", "mnvme-1g"]);
    run(&["start", "-u", &uuid]);
    {
        let mut h = connect(&d, &uuid, Mem::Shared, &NvmeOptions::default());
        assert_eq!(h.write(1, 1234, 16, 8, 0), status::SUCCESS);
    }
    run(&["stop", "-u", &uuid]);
    assert!(!d.mdev_dir(&uuid).exists());
    run(&["start", "-u", &uuid]);
    let mut h = connect(&d, &uuid, Mem::Shared, &NvmeOptions::default());
    assert_eq!(h.read(1, 1234, 16, 0), blocks(1234, 16, 8));
}

#[test]
fn a_controller_migrates_between_two_daemons_while_the_client_writes() {
    migrate_while_writing(false);
}

/// The same with `copy_on_migrate`: each daemon has its own disk; the namespace travels in
/// the migration stream (every chunk during pre-copy, then what was written since), and the
/// destination's own backing file ends with the data.
#[test]
fn a_controller_and_its_data_migrate_between_two_daemons_while_the_client_writes() {
    migrate_while_writing(true);
}

fn migrate_while_writing(copy: bool) {
    let conf = if copy {
        "release_timeout_ms = 300\n\n[[parent]]\nname = \"nvme0\"\ndriver = \"mnvme\"\n\
         options = { capacity_gib = 4, copy_on_migrate = true }\n"
            .to_owned()
    } else {
        config(4)
    };
    let a = Daemon::start(&conf);
    let b = Daemon::start(&conf);
    let src = create(&a, "mnvme-1g");
    let dst = create(&b, "mnvme-1g");
    let file = attr(&a, &src, "vendor/backing_file");
    if !copy {
        // Shared storage: the destination uses the source's backing file.
        std::fs::write(
            b.mdev_dir(&dst).join("vendor/backing_file"),
            format!("{file}\n"),
        )
        .unwrap();
    }
    // Something the source's disk held before the client came.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all_at(&blocks(999_000, 16, 77), 999_000 * 512)
        .unwrap();
    let serial = attr(&a, &src, "vendor/serial");
    assert_ne!(serial, attr(&b, &dst, "vendor/serial"));

    let o = NvmeOptions {
        io_queues: 2,
        depth: 64,
        shadow_doorbells: true,
        interrupts: true,
    };
    let mut c = Client::connect(a.socket(&src)).unwrap();
    let qmem = HostMemory::shared(&mut c, QUEUE_IOVA, QUEUE_LEN).unwrap();
    let data = HostMemory::shared(&mut c, DATA_IOVA, DATA_LEN).unwrap();
    let mut h = Host {
        n: Nvme::enable(c, qmem.clone(), &o).unwrap(),
        data: data.clone(),
    };
    assert!(h.n.shadow_doorbells());
    // The destination VMM: its own memory, filled by the migration's copy.
    let mut dc = Client::connect(b.socket(&dst)).unwrap();
    let dq = HostMemory::shared_copy_of(&mut dc, &qmem).unwrap();
    let dd = HostMemory::shared_copy_of(&mut dc, &data).unwrap();
    let mut copier = vec![
        FileCopier::new(
            qmem.fd().unwrap().try_clone_to_owned().unwrap(),
            dq.fd().unwrap().try_clone_to_owned().unwrap(),
            QUEUE_IOVA,
            QUEUE_LEN,
        ),
        FileCopier::new(
            data.fd().unwrap().try_clone_to_owned().unwrap(),
            dd.fd().unwrap().try_clone_to_owned().unwrap(),
            DATA_IOVA,
            DATA_LEN,
        ),
    ];

    // Writes acknowledged before the switch-over, and some still in flight at it.
    let mut acked: Vec<(u64, u8)> = Vec::new();
    let mut next = 0u64;
    let mut write_some = |h: &mut Host, n: u64, wait: bool, acked: &mut Vec<(u64, u8)>| {
        let mut pending = Vec::new();
        for _ in 0..n {
            let lba = (next * 40) % 1_000_000;
            let g = (next % 250) as u8 + 1;
            next += 1;
            let q = 1 + (next % 2) as u16;
            let buf = h.data.alloc(8 * 512, 4096);
            h.data.write(buf, &blocks(lba, 8, g)).unwrap();
            let (p1, p2) = h.n.prps(buf, 8 * 512).unwrap();
            let cid = h.n.push(q, Sqe::rw(op::WRITE, 1, lba, 8, p1, p2)).unwrap();
            pending.push((q, cid, lba, g));
        }
        h.n.ring(1).unwrap();
        h.n.ring(2).unwrap();
        if wait {
            while !pending.is_empty() {
                for q in 1..=2 {
                    if h.n.queues[usize::from(q)].in_flight.is_empty() {
                        continue;
                    }
                    for c in h.n.wait(q).unwrap() {
                        assert!(c.ok());
                        let i = pending
                            .iter()
                            .position(|p| p.0 == q && p.1 == c.cid)
                            .unwrap();
                        let p = pending.remove(i);
                        acked.push((p.2, p.3));
                    }
                }
            }
        }
        pending
    };
    write_some(&mut h, 40, true, &mut acked);
    let mut m = Migration::begin(
        &mut h.n.client,
        &mut dc,
        Some(&mut copier),
        MigrateOptions::default(),
    )
    .unwrap();
    write_some(&mut h, 40, true, &mut acked);
    m.precopy_round(&mut h.n.client, &mut dc).unwrap();
    write_some(&mut h, 40, true, &mut acked);
    let in_flight = write_some(&mut h, 30, false, &mut acked);
    let report = m.switchover(&mut h.n.client, &mut dc).unwrap();
    eprintln!("mnvme migration: {report}");

    // The destination from now on; the commands in flight at the stop completed there.
    let old = std::mem::replace(&mut h.n.client, dc);
    drop(old);
    h.n.mem = dq;
    h.data = dd;
    let mut finished = 0;
    for q in 1..=2 {
        for c in h.n.reap(q).unwrap() {
            assert!(c.ok());
            let p = in_flight.iter().find(|p| p.0 == q && p.1 == c.cid).unwrap();
            acked.push((p.2, p.3));
            finished += 1;
        }
    }
    assert_eq!(
        finished,
        in_flight.len(),
        "commands in flight finished before the stop"
    );
    write_some(&mut h, 20, true, &mut acked);
    // Every acknowledged write reads back on the destination (the last generation of each
    // block wins).
    let mut last = std::collections::HashMap::new();
    for (lba, g) in &acked {
        last.insert(*lba, *g);
    }
    for (lba, g) in last {
        assert_eq!(h.read(1, lba, 8, 0), blocks(lba, 8, g), "lba {lba}");
    }
    // The same identity: Identify and the destination's attributes.
    let page = h.n.mem.alloc(4096, 4096);
    assert!(h
        .n
        .admin(Sqe::new(op::IDENTIFY, 0).prps(page, 0).cdw(10, 1))
        .unwrap()
        .ok());
    let mut id = vec![0u8; 4096];
    h.n.mem.read(page, &mut id).unwrap();
    assert_eq!(String::from_utf8_lossy(&id[4..24]).trim_end(), serial);
    assert_eq!(attr(&b, &dst, "vendor/serial"), serial);
    assert_eq!(h.read(1, 999_000, 16, 0), blocks(999_000, 16, 77));
    let dst_file = attr(&b, &dst, "vendor/backing_file");
    assert_eq!(copy, dst_file != file, "copy: each side keeps its own file");
    if copy {
        let f = std::fs::File::open(&dst_file).unwrap();
        let mut got = vec![0u8; 16 * 512];
        f.read_exact_at(&mut got, 999_000 * 512).unwrap();
        assert!(
            got == blocks(999_000, 16, 77),
            "the destination's file has the data"
        );
        assert!(report.rounds[0].device_bytes > 1 << 20, "{report}");
    }
}

/// The README's first command (umdevd with its default parents) serves a small pool,
/// `mnvme0`: 4 GiB under the parent's state directory, a disk created through sysfs
/// works; and `mbochs0`, displays from 256 MiB of VRAM.
#[test]
fn the_default_daemon_serves_a_small_pool() {
    let d = Daemon::start("");
    assert_eq!(d.available("mnvme0", "mnvme-1g"), 4);
    // The display parent is there too: 256 MiB of VRAM.
    assert_eq!(d.available("mbochs0", "mbochs-16m"), 16);
    assert_eq!(d.available("mnvme0", "mnvme-4g"), 1);
    let pool = std::fs::read_to_string(d.sys().join("devices/umdev/mnvme0/vendor/pool")).unwrap();
    assert!(
        PathBuf::from(pool.trim_end()).starts_with(d.root().join("state")),
        "{pool}"
    );
    let uuid = new_uuid();
    d.create("mnvme0", "mnvme-1g", &uuid).unwrap();
    let mut h = connect(&d, &uuid, Mem::Shared, &NvmeOptions::default());
    assert_eq!(h.n.blocks, GIB / 512);
    assert_eq!(h.write(1, 100, 8, 1, 0), status::SUCCESS);
    assert_eq!(h.read(1, 100, 8, 0), blocks(100, 8, 1));
}

/// A client that goes away with commands in flight: the controller finishes or drops them,
/// gives its pins back and is found reset by the next client, which works at once; what
/// the first wrote and had acknowledged is on the disk.
#[test]
fn a_client_that_goes_with_commands_in_flight_leaves_a_working_controller() {
    let d = Daemon::start(&config(4));
    let uuid = create(&d, "mnvme-1g");
    let o = NvmeOptions {
        io_queues: 2,
        depth: 128,
        shadow_doorbells: true,
        interrupts: true,
    };
    for kind in [Mem::Shared, Mem::Plain, Mem::Shared] {
        let mut h = connect(&d, &uuid, kind, &o);
        assert_eq!(h.write(1, 7, 8, 3, 0), status::SUCCESS);
        for i in 0..100u64 {
            let buf = h.data.alloc(32 << 10, 4096);
            let (p1, p2) = h.n.prps(buf, 32 << 10).unwrap();
            let q = 1 + (i % 2) as u16;
            h.n.push(q, Sqe::rw(op::WRITE, 1, 1000 + i * 64, 64, p1, p2))
                .unwrap();
        }
        h.n.ring(1).unwrap();
        h.n.ring(2).unwrap();
        drop(h);
    }
    let mut h = connect(&d, &uuid, Mem::Shared, &o);
    assert_eq!(h.read(1, 7, 8, 0), blocks(7, 8, 3));
    let e = std::fs::write(
        d.mdev_dir(&uuid).join("vendor/backing_file"),
        "/nonexistent/x\n",
    )
    .unwrap_err();
    assert_eq!(errno(&e), 16, "EBUSY: the new client holds it");
}
