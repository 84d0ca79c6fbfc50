//! Conformance: no panic from the wire. Thousands of random messages after a valid VERSION,
//! and random bytes on fresh connections, must each be answered or dropped without taking
//! the server down; a new client is then served normally.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command, FLAG_ERROR};
use umdev_tests::device::reg;
use umdev_tests::wire::{Raw, RawReply};
use umdev_tests::TestServer;
use umdev_transport::Transport;
use zerocopy::IntoBytes;

/// Field values that get random bodies past the first checks: small counts and indexes,
/// struct sizes, the DMA registers, a page, all ones.
const FIELDS: [u32; 16] = [
    0, 1, 2, 3, 4, 7, 8, 9, 16, 20, 24, 32, 0x10c, 0x110, 0x1000, !0,
];

/// Marsaglia's xorshift64: deterministic, so a failure reproduces.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// A body of random length made of 32-bit fields that are often plausible (small counts,
/// struct sizes, region indexes, page sizes) so that parsing gets past the first checks.
fn random_fields(rng: &mut XorShift) -> Vec<u8> {
    let len = if rng.below(50) == 0 {
        rng.below(8192)
    } else {
        rng.below(96)
    };
    let mut body = Vec::with_capacity(len + 4);
    while body.len() < len {
        let v = if rng.below(4) == 0 {
            u32::try_from(rng.next() >> 32).unwrap()
        } else {
            rng.pick(&FIELDS)
        };
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.truncate(len);
    body
}

fn small(rng: &mut XorShift, n: usize) -> u32 {
    u32::try_from(rng.below(n)).unwrap()
}

/// A well-formed request for `command` with random but mostly valid values, so that the
/// fuzzing reaches the device model and the address space, not just the parsers.
fn template(rng: &mut XorShift, command: u16) -> Vec<u8> {
    let page = u64::from(small(rng, 16)) * 0x1000;
    let access = |rng: &mut XorShift| wire::RegionAccess {
        offset: u64::from(small(rng, 0x140)),
        region: small(rng, 10),
        count: small(rng, 300),
    };
    match Command::from_u16(command) {
        Some(Command::DmaMap) => wire::DmaMap {
            argsz: 32,
            flags: small(rng, 4),
            offset: 0,
            address: page,
            size: u64::from(small(rng, 4)) * 0x1000,
        }
        .as_bytes()
        .to_vec(),
        Some(Command::DmaUnmap) => wire::DmaUnmap {
            argsz: 24,
            flags: small(rng, 4),
            address: page,
            size: u64::from(small(rng, 4)) * 0x1000,
        }
        .as_bytes()
        .to_vec(),
        Some(Command::DeviceGetRegionInfo) => wire::RegionInfo {
            argsz: rng.pick(&[32, 80, 4096]),
            index: small(rng, 10),
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
        Some(Command::DeviceGetIrqInfo | Command::DeviceGetRegionIoFds) => {
            [16u32, 0, small(rng, 10), 0].as_bytes().to_vec()
        }
        Some(Command::DeviceSetIrqs) => {
            let count = small(rng, 9);
            let mut b = wire::IrqSet {
                argsz: 20,
                flags: (1 << small(rng, 3)) | (8 << small(rng, 3)),
                index: small(rng, 6),
                start: small(rng, 9),
                count,
            }
            .as_bytes()
            .to_vec();
            b.extend((0..count).map(|_| u8::from(rng.below(2) == 0)));
            b
        }
        Some(Command::RegionRead) => access(rng).as_bytes().to_vec(),
        Some(Command::RegionWrite) if rng.below(2) == 0 => {
            // Drive the test device's DMA engine at the low pages the maps above use, so
            // that the server sends DMA_READ/DMA_WRITE for fd-less mappings.
            let (offset, value) = match rng.below(3) {
                0 => (reg::DMA_ADDR, page),
                1 => (reg::DMA_LEN, u64::from(small(rng, 64) + 1)),
                _ => (reg::DMA_CMD, u64::from(small(rng, 2) + 1)),
            };
            let data = &value.to_le_bytes()[..if offset == reg::DMA_ADDR { 8 } else { 4 }];
            let a = wire::RegionAccess {
                offset,
                region: 0,
                count: u32::try_from(data.len()).unwrap(),
            };
            let mut b = a.as_bytes().to_vec();
            b.extend_from_slice(data);
            b
        }
        Some(Command::RegionWrite) => {
            let a = access(rng);
            let mut b = a.as_bytes().to_vec();
            b.extend((0..a.count).map(|_| rng.next().to_le_bytes()[0]));
            b
        }
        Some(Command::RegionWriteMulti) if rng.below(2) == 0 => {
            // A whole DMA in one message: address, length, then the command.
            let regs = [
                (reg::DMA_ADDR, page, 8),
                (reg::DMA_LEN, u64::from(small(rng, 64) + 1), 4),
                (reg::DMA_CMD, u64::from(small(rng, 2) + 1), 4),
            ];
            let mut b = 3u64.as_bytes().to_vec();
            for (offset, value, count) in regs {
                let e = wire::WriteMultiEntry {
                    offset,
                    region: 0,
                    count,
                    data: value.to_le_bytes(),
                };
                b.extend_from_slice(e.as_bytes());
            }
            b
        }
        Some(Command::RegionWriteMulti) => {
            let n = rng.below(5);
            let mut b = u64::try_from(n).unwrap().as_bytes().to_vec();
            for _ in 0..n {
                let e = wire::WriteMultiEntry {
                    offset: u64::from(small(rng, 0x140)),
                    region: small(rng, 10),
                    count: small(rng, 10),
                    data: rng.next().to_le_bytes(),
                };
                b.extend_from_slice(e.as_bytes());
            }
            b
        }
        _ => wire::DeviceInfo {
            argsz: 16,
            flags: small(rng, 1 << 19) << 2,
            ..Default::default()
        }
        .as_bytes()
        .to_vec(),
    }
}

/// A template, a template with a few bytes changed or cut, or random fields.
fn random_body(rng: &mut XorShift, command: u16) -> Vec<u8> {
    match rng.below(4) {
        0 => random_fields(rng),
        1 => {
            let mut b = template(rng, command);
            for _ in 0..=rng.below(3) {
                if !b.is_empty() {
                    let at = rng.below(b.len());
                    b[at] = rng.next().to_le_bytes()[0];
                }
            }
            let keep = rng.below(b.len() + 8);
            b.resize(keep, 0);
            b
        }
        _ => template(rng, command),
    }
}

/// Answers a server-to-client DMA request: a good reply or a plain EIO.
fn answer(r: &mut Raw, m: &RawReply, rng: &mut XorShift) {
    let (head, _) = wire::split::<wire::DmaAccess>(&m.body, "DMA request").unwrap();
    if rng.below(2) == 0 {
        r.t.send(&m.header.error_reply(5), &[], &[]).unwrap();
        return;
    }
    let data = if m.header.command == Command::DmaRead as u16 {
        vec![0xa5u8; usize::try_from(head.count).unwrap()]
    } else {
        Vec::new()
    };
    let h = m.header.reply(16 + data.len()).unwrap();
    r.t.send(&h, &[head.as_bytes(), &data], &[]).unwrap();
}

/// A new client gets normal service: device info, and a write that reads back.
fn assert_served_normally(s: &TestServer) {
    let mut r = Raw::negotiated(&s.path);
    r.assert_usable();
    let a = wire::RegionAccess {
        offset: 4,
        region: 1,
        count: 4,
    };
    let w = r.call(Command::RegionWrite as u16, &[a.as_bytes(), b"sane"], &[]);
    assert_eq!(w.errno(), None);
    let back = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
    assert_eq!(back.errno(), None);
    assert_eq!(&back.body[16..], b"sane");
}

fn random_messages_after_version(seed: u64, count: usize) {
    let s = TestServer::test_device();
    let mut rng = XorShift(seed);
    let mut r = Raw::negotiated(&s.path);
    // Half of the low pages the templates use are mapped without an fd from the start, and
    // the DMA engine has a length, so that random DMA commands reach the client.
    let m = wire::DmaMap {
        argsz: 32,
        flags: wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE,
        offset: 0,
        address: 0,
        size: 0x8000,
    };
    assert_eq!(
        r.call(Command::DmaMap as u16, &[m.as_bytes()], &[]).errno(),
        None
    );
    let len = wire::RegionAccess {
        offset: reg::DMA_LEN,
        region: 0,
        count: 4,
    };
    let reply = r.call(
        Command::RegionWrite as u16,
        &[len.as_bytes(), &[16, 0, 0, 0]],
        &[],
    );
    assert_eq!(reply.errno(), None);
    for i in 0..count {
        let command = u16::try_from(rng.below(21)).unwrap();
        let flags = if rng.below(10) == 0 {
            rng.pick(&[2, 0xf, 1 << 6, 1 << 31, FLAG_ERROR])
        } else {
            0
        };
        let body = random_body(&mut rng, command);
        let id = r.send(command, flags, &[&body], &[]);
        loop {
            let m = r.recv();
            if m.header.is_command() {
                answer(&mut r, &m, &mut rng);
                continue;
            }
            assert_eq!(m.header.msg_id, id, "message {i}: command {command}");
            assert_eq!(m.header.command, command, "message {i}");
            break;
        }
    }
    r.assert_usable();
    drop(r);
    assert_served_normally(&s);
}

#[test]
fn thousands_of_random_messages_are_each_answered() {
    random_messages_after_version(0x5eed_0001, 3000);
}

#[test]
fn random_messages_from_another_seed_are_each_answered() {
    random_messages_after_version(0x9e37_79b9_7f4a_7c15, 3000);
}

#[test]
fn random_bytes_on_fresh_connections_never_stop_the_server() {
    let s = TestServer::test_device();
    let mut rng = XorShift(0xdead_beef);
    for _ in 0..40 {
        let r = s.raw();
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next().to_le_bytes()[0]).collect();
        // The server may already have closed this connection (refused or framing lost).
        let _ = r.t.send_raw(&bytes, &[]);
    }
    assert_served_normally(&s);
}
