//! Conformance: VFIO_USER_DMA_READ and VFIO_USER_DMA_WRITE, which the server sends to a
//! client that mapped memory without an fd; the client here is raw wire.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rustix::io::Errno;
use umdev_proto::{wire, Command};
use umdev_tests::device::reg;
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::TestServer;
use umdev_transport::Transport;
use zerocopy::{FromBytes, IntoBytes};

const IOVA: u64 = 0x2000_0000;
const DMA_READ: u16 = Command::DmaRead as u16;
const DMA_WRITE: u16 = Command::DmaWrite as u16;
const RW: u32 = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
/// Test device DMA commands.
const TO_GUEST: u32 = 1;
const FROM_GUEST: u32 = 2;

/// A server and a raw client with 8 KiB mapped at [`IOVA`] without an fd.
fn setup_with(caps: &[u8], flags: u32) -> (TestServer, Raw) {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_eq!(r.version(0, 0, caps).errno(), None);
    let m = wire::DmaMap {
        argsz: 32,
        flags,
        offset: 0,
        address: IOVA,
        size: 8192,
    };
    assert_eq!(
        r.call(Command::DmaMap as u16, &[m.as_bytes()], &[]).errno(),
        None
    );
    (s, r)
}

fn setup() -> (TestServer, Raw) {
    setup_with(&[], RW)
}

fn bar0_write(r: &mut Raw, offset: u64, data: &[u8]) {
    let a = wire::RegionAccess {
        offset,
        region: 0,
        count: u32::try_from(data.len()).unwrap(),
    };
    let reply = r.call(Command::RegionWrite as u16, &[a.as_bytes(), data], &[]);
    assert_eq!(reply.errno(), None);
}

fn bar0_read(r: &mut Raw, offset: u64, count: u32) -> Vec<u8> {
    let a = wire::RegionAccess {
        offset,
        region: 0,
        count,
    };
    let reply = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    reply.body[16..].to_vec()
}

/// A server's requests that arrived while we waited for a reply of ours, oldest first.
/// (The device's DMA runs on its work context, so its requests and the session's replies
/// interleave.)
type Early = std::collections::VecDeque<RawReply>;

/// Programs the DMA engine and writes the command; the device starts the copy on its work
/// context and the write is answered at once. Requests the device sent before that answer
/// are kept in `early`.
fn kick(r: &mut Raw, early: &mut Early, iova: u64, len: u32, seed: u8, cmd: u32) {
    bar0_write(r, reg::DMA_ADDR, &iova.to_le_bytes());
    bar0_write(r, reg::DMA_LEN, &len.to_le_bytes());
    bar0_write(r, reg::DMA_SEED, &[seed]);
    let a = wire::RegionAccess {
        offset: reg::DMA_CMD,
        region: 0,
        count: 4,
    };
    let id = r.send(
        Command::RegionWrite as u16,
        0,
        &[a.as_bytes(), &cmd.to_le_bytes()],
        &[],
    );
    loop {
        let m = r.recv();
        if m.header.is_command() {
            early.push_back(m);
            continue;
        }
        assert_eq!((m.header.msg_id, m.errno()), (id, None));
        return;
    }
}

/// The next server request (one that came early first), which must be `command`.
fn request(r: &mut Raw, early: &mut Early, command: u16) -> (RawReply, wire::DmaAccess, Vec<u8>) {
    let m = early.pop_front().unwrap_or_else(|| r.recv());
    assert!(m.header.is_command(), "{:?}", m.header);
    assert_eq!(m.header.command, command);
    assert!(!m.header.no_reply(), "the server needs the answer");
    let (head, data) = wire::DmaAccess::read_from_prefix(&m.body).unwrap();
    let data = data.to_vec();
    (m, head, data)
}

fn answer(r: &mut Raw, to: &RawReply, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum();
    r.t.send(&to.header.reply(len).unwrap(), parts, &[])
        .unwrap();
}

fn answer_error(r: &mut Raw, to: &RawReply, errno: i32) {
    r.t.send(&to.header.error_reply(errno), &[], &[]).unwrap();
}

/// Polls the DMA status register until the device's command is done.
fn status(r: &mut Raw) -> u32 {
    umdev_tests::poll_dma_status(|| {
        u32::from_le_bytes(bar0_read(r, reg::DMA_STATUS, 4).try_into().unwrap())
    })
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..=255u8)
        .cycle()
        .take(len)
        .map(|i| seed.wrapping_add(i))
        .collect()
}

#[test]
fn device_write_arrives_as_dma_write_with_address_count_and_data() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA + 0x10, 100, 5, TO_GUEST);
    let (m, head, data) = request(&mut r, e, DMA_WRITE);
    assert_eq!(m.header.msg_size, 16 + 16 + 100);
    assert_eq!((head.address, head.count), (IOVA + 0x10, 100));
    assert_eq!(data, pattern(5, 100));
    answer(&mut r, &m, &[head.as_bytes()]);
    assert_eq!(status(&mut r), 0);
}

#[test]
fn device_read_arrives_as_dma_read_with_address_and_count_only() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA + 0x1000, 23, 0, FROM_GUEST);
    let (m, head, data) = request(&mut r, e, DMA_READ);
    assert_eq!((head.address, head.count), (IOVA + 0x1000, 23));
    assert!(data.is_empty());
    answer(&mut r, &m, &[head.as_bytes(), &[0; 23]]);
    assert_eq!(status(&mut r), 0);
}

#[test]
fn data_in_the_dma_read_reply_reaches_the_device() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 23, 0, FROM_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_READ);
    answer(&mut r, &m, &[head.as_bytes(), b"hello from guest memory"]);
    assert_eq!(status(&mut r), 0);
    assert_eq!(
        bar0_read(&mut r, reg::DMA_BUF, 23),
        b"hello from guest memory"
    );
}

#[test]
fn error_reply_to_dma_write_makes_the_status_the_clients_errno() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    let (m, _, _) = request(&mut r, e, DMA_WRITE);
    answer_error(&mut r, &m, Errno::IO.raw_os_error());
    assert_eq!(status(&mut r), 5);
}

#[test]
fn error_reply_to_dma_read_makes_the_status_the_clients_errno() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, FROM_GUEST);
    let (m, _, _) = request(&mut r, e, DMA_READ);
    answer_error(&mut r, &m, Errno::ACCESS.raw_os_error());
    assert_eq!(status(&mut r), 13);
}

/// An error reply with `errno` to the device's DMA read: the DMA must fail.
fn dma_read_fails_on_error_reply(errno: i32) {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    // Fail fast rather than hang for the default 10 s if the session dies.
    let t = Duration::from_secs(2);
    r.t.stream().set_read_timeout(Some(t)).unwrap();
    kick(&mut r, e, IOVA, 8, 0, FROM_GUEST);
    let (m, _, _) = request(&mut r, e, DMA_READ);
    answer_error(&mut r, &m, errno);
    // The session survives and answers; the DMA failed.
    assert_ne!(status(&mut r), 0, "the DMA failed");
}

/// Regression (fixed in b6138df): the session thread panicked in rustix's
/// `Errno::from_raw_os_error`, left the client's socket open and skipped its teardown.
#[test]
fn error_reply_with_errno_0_still_fails_the_dma() {
    dma_read_fails_on_error_reply(0);
}

/// Regression (fixed in b6138df): the same panic as for errno 0.
#[test]
fn error_reply_with_an_errno_above_4095_still_fails_the_dma() {
    dma_read_fails_on_error_reply(70_000);
}

#[test]
fn dma_read_reply_with_another_count_is_eproto() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, FROM_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_READ);
    let wrong = wire::DmaAccess { count: 4, ..head };
    answer(&mut r, &m, &[wrong.as_bytes(), &[0; 4]]);
    assert_eq!(status(&mut r), 71);
}

#[test]
fn dma_read_reply_with_short_data_is_eproto() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, FROM_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_READ);
    answer(&mut r, &m, &[head.as_bytes(), &[0; 7]]);
    assert_eq!(status(&mut r), 71);
}

#[test]
fn reply_naming_another_command_is_eproto() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_WRITE);
    let mut h = m.header.reply(16).unwrap();
    h.command = DMA_READ;
    r.t.send(&h, &[head.as_bytes()], &[]).unwrap();
    assert_eq!(status(&mut r), 71);
}

#[test]
fn transfers_respect_the_clients_max_data_xfer_size() {
    let (_s, mut r) = setup_with(b"{\"capabilities\":{\"max_data_xfer_size\":64}}\0", RW);
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 200, 1, TO_GUEST);
    let mut got = Vec::new();
    while got.len() < 200 {
        let (m, head, data) = request(&mut r, e, DMA_WRITE);
        assert!(head.count <= 64, "count {}", head.count);
        assert_eq!(head.address, IOVA + u64::try_from(got.len()).unwrap());
        got.extend_from_slice(&data);
        answer(&mut r, &m, &[head.as_bytes()]);
    }
    assert_eq!(status(&mut r), 0);
    assert_eq!(got, pattern(1, 200));
}

/// The device's DMA waits on its work context, not on the session: a command the client
/// sends meanwhile (as QEMU's vCPUs do) is answered at once, before the DMA is.
#[test]
fn a_command_sent_while_the_device_waits_for_dma_is_answered_at_once() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_WRITE);
    let info = wire::DeviceInfo {
        argsz: 16,
        ..Default::default()
    };
    let later = r.send(Command::DeviceGetInfo as u16, 0, &[info.as_bytes()], &[]);
    let reply = r.recv();
    assert_eq!((reply.header.msg_id, reply.errno()), (later, None));
    assert_eq!(
        u32::from_le_bytes(bar0_read(&mut r, reg::DMA_STATUS, 4).try_into().unwrap()),
        umdev_tests::device::DMA_BUSY,
        "the DMA still waits for its answer"
    );
    answer(&mut r, &m, &[head.as_bytes()]);
    assert_eq!(status(&mut r), 0);
}

/// Message-based DMA asked for on the session thread, inside a region access (the device
/// doing a copy in its `bar_write` hook), would deadlock QEMU: it is refused with EDEADLK,
/// no DMA message is sent, and the connection stays up.
#[test]
fn message_dma_from_a_hook_on_the_session_thread_is_edeadlk() {
    const INLINE_TO_GUEST: u32 = 6;
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, INLINE_TO_GUEST);
    assert!(e.is_empty(), "no DMA message may be sent");
    assert_eq!(status(&mut r), 35, "EDEADLK");
    r.assert_usable();
    // The same copy on the work context goes through.
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_WRITE);
    answer(&mut r, &m, &[head.as_bytes()]);
    assert_eq!(status(&mut r), 0);
}

/// DMA_UNMAP is answered only once the device's work has drained: a copy waiting for its
/// DMA answer holds the unmap's reply back, and the session keeps reading (the answer gets
/// through) while it waits.
#[test]
fn unmap_waits_for_the_devices_dma_in_flight() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_WRITE);
    let u = wire::DmaUnmap {
        argsz: 24,
        flags: 0,
        address: IOVA,
        size: 8192,
    };
    let unmap = r.send(Command::DmaUnmap as u16, 0, &[u.as_bytes()], &[]);
    r.t.stream()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        r.try_recv().is_err(),
        "the unmap must not be answered while the device's DMA is in flight"
    );
    r.t.stream().set_read_timeout(None).unwrap();
    answer(&mut r, &m, &[head.as_bytes()]);
    let reply = r.recv();
    assert_eq!((reply.header.msg_id, reply.errno()), (unmap, None));
    assert_eq!(status(&mut r), 0);
}

#[test]
fn a_stray_reply_while_the_server_waits_is_ignored() {
    let (_s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, e, DMA_WRITE);
    let mut stray = m.header.reply(16).unwrap();
    stray.msg_id = m.header.msg_id.wrapping_add(1000);
    r.t.send(&stray, &[head.as_bytes()], &[]).unwrap();
    answer(&mut r, &m, &[head.as_bytes()]);
    assert_eq!(status(&mut r), 0);
}

#[test]
fn device_read_of_a_write_only_mapping_is_eperm_without_a_message() {
    let (_s, mut r) = setup_with(&[], wire::DMA_MAP_FLAG_WRITE);
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, FROM_GUEST);
    assert_eq!(status(&mut r), 1);
}

#[test]
fn client_sent_dma_read_is_einval() {
    let (_s, mut r) = setup();
    let a = wire::DmaAccess {
        address: IOVA,
        count: 8,
    };
    let reply = r.call(DMA_READ, &[a.as_bytes()], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}

#[test]
fn client_sent_dma_write_is_einval() {
    let (_s, mut r) = setup();
    let a = wire::DmaAccess {
        address: IOVA,
        count: 4,
    };
    let reply = r.call(DMA_WRITE, &[a.as_bytes(), b"data"], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}

#[test]
fn client_leaving_while_the_server_waits_ends_the_session_and_the_next_client_is_served() {
    let (s, mut r) = setup();
    let e = &mut Early::new();
    kick(&mut r, e, IOVA, 8, 0, TO_GUEST);
    request(&mut r, e, DMA_WRITE);
    drop(r);
    Raw::negotiated(&s.path).assert_usable();
}
