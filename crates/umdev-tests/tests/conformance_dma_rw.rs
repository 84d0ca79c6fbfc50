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

/// Programs the DMA engine and sends the command write without waiting for its reply
/// (the server will ask us for memory first); returns the command write's id.
fn kick(r: &mut Raw, iova: u64, len: u32, seed: u8, cmd: u32) -> u16 {
    bar0_write(r, reg::DMA_ADDR, &iova.to_le_bytes());
    bar0_write(r, reg::DMA_LEN, &len.to_le_bytes());
    bar0_write(r, reg::DMA_SEED, &[seed]);
    let a = wire::RegionAccess {
        offset: reg::DMA_CMD,
        region: 0,
        count: 4,
    };
    r.send(
        Command::RegionWrite as u16,
        0,
        &[a.as_bytes(), &cmd.to_le_bytes()],
        &[],
    )
}

/// The next message, which must be a server-to-client command.
fn request(r: &mut Raw, command: u16) -> (RawReply, wire::DmaAccess, Vec<u8>) {
    let m = r.recv();
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

/// Receives the reply to the command write `id`, then reads the DMA status register.
fn status(r: &mut Raw, id: u16) -> u32 {
    let reply = r.recv();
    assert_eq!(reply.header.msg_id, id);
    assert_eq!(reply.errno(), None);
    u32::from_le_bytes(bar0_read(r, reg::DMA_STATUS, 4).try_into().unwrap())
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
    let id = kick(&mut r, IOVA + 0x10, 100, 5, TO_GUEST);
    let (m, head, data) = request(&mut r, DMA_WRITE);
    assert_eq!(m.header.msg_size, 16 + 16 + 100);
    assert_eq!((head.address, head.count), (IOVA + 0x10, 100));
    assert_eq!(data, pattern(5, 100));
    answer(&mut r, &m, &[head.as_bytes()]);
    assert_eq!(status(&mut r, id), 0);
}

#[test]
fn device_read_arrives_as_dma_read_with_address_and_count_only() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA + 0x1000, 23, 0, FROM_GUEST);
    let (m, head, data) = request(&mut r, DMA_READ);
    assert_eq!((head.address, head.count), (IOVA + 0x1000, 23));
    assert!(data.is_empty());
    answer(&mut r, &m, &[head.as_bytes(), &[0; 23]]);
    assert_eq!(status(&mut r, id), 0);
}

#[test]
fn data_in_the_dma_read_reply_reaches_the_device() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 23, 0, FROM_GUEST);
    let (m, head, _) = request(&mut r, DMA_READ);
    answer(&mut r, &m, &[head.as_bytes(), b"hello from guest memory"]);
    assert_eq!(status(&mut r, id), 0);
    assert_eq!(
        bar0_read(&mut r, reg::DMA_BUF, 23),
        b"hello from guest memory"
    );
}

#[test]
fn error_reply_to_dma_write_makes_the_status_the_clients_errno() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 8, 0, TO_GUEST);
    let (m, _, _) = request(&mut r, DMA_WRITE);
    answer_error(&mut r, &m, Errno::IO.raw_os_error());
    assert_eq!(status(&mut r, id), 5);
}

#[test]
fn error_reply_to_dma_read_makes_the_status_the_clients_errno() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 8, 0, FROM_GUEST);
    let (m, _, _) = request(&mut r, DMA_READ);
    answer_error(&mut r, &m, Errno::ACCESS.raw_os_error());
    assert_eq!(status(&mut r, id), 13);
}

/// An error reply with `errno` to the device's DMA read: the DMA must fail.
fn dma_read_fails_on_error_reply(errno: i32) {
    let (_s, mut r) = setup();
    // Fail fast rather than hang for the default 10 s if the session dies.
    let t = Duration::from_secs(2);
    r.t.stream().set_read_timeout(Some(t)).unwrap();
    let id = kick(&mut r, IOVA, 8, 0, FROM_GUEST);
    let (m, _, _) = request(&mut r, DMA_READ);
    answer_error(&mut r, &m, errno);
    let reply = r.try_recv().expect("the session must survive and answer");
    assert_eq!(reply.header.msg_id, id);
    let status = u32::from_le_bytes(bar0_read(&mut r, reg::DMA_STATUS, 4).try_into().unwrap());
    assert_ne!(status, 0, "the DMA failed");
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
    let id = kick(&mut r, IOVA, 8, 0, FROM_GUEST);
    let (m, head, _) = request(&mut r, DMA_READ);
    let wrong = wire::DmaAccess { count: 4, ..head };
    answer(&mut r, &m, &[wrong.as_bytes(), &[0; 4]]);
    assert_eq!(status(&mut r, id), 71);
}

#[test]
fn dma_read_reply_with_short_data_is_eproto() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 8, 0, FROM_GUEST);
    let (m, head, _) = request(&mut r, DMA_READ);
    answer(&mut r, &m, &[head.as_bytes(), &[0; 7]]);
    assert_eq!(status(&mut r, id), 71);
}

#[test]
fn reply_naming_another_command_is_eproto() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, DMA_WRITE);
    let mut h = m.header.reply(16).unwrap();
    h.command = DMA_READ;
    r.t.send(&h, &[head.as_bytes()], &[]).unwrap();
    assert_eq!(status(&mut r, id), 71);
}

#[test]
fn transfers_respect_the_clients_max_data_xfer_size() {
    let (_s, mut r) = setup_with(b"{\"capabilities\":{\"max_data_xfer_size\":64}}\0", RW);
    let id = kick(&mut r, IOVA, 200, 1, TO_GUEST);
    let mut got = Vec::new();
    while got.len() < 200 {
        let (m, head, data) = request(&mut r, DMA_WRITE);
        assert!(head.count <= 64, "count {}", head.count);
        assert_eq!(head.address, IOVA + u64::try_from(got.len()).unwrap());
        got.extend_from_slice(&data);
        answer(&mut r, &m, &[head.as_bytes()]);
    }
    assert_eq!(status(&mut r, id), 0);
    assert_eq!(got, pattern(1, 200));
}

#[test]
fn a_command_sent_while_the_server_waits_is_answered_after_the_current_one() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, DMA_WRITE);
    let info = wire::DeviceInfo {
        argsz: 16,
        ..Default::default()
    };
    let later = r.send(Command::DeviceGetInfo as u16, 0, &[info.as_bytes()], &[]);
    answer(&mut r, &m, &[head.as_bytes()]);
    let first = r.recv();
    assert_eq!(first.header.msg_id, id);
    let second = r.recv();
    assert_eq!((second.header.msg_id, second.errno()), (later, None));
}

#[test]
fn a_stray_reply_while_the_server_waits_is_ignored() {
    let (_s, mut r) = setup();
    let id = kick(&mut r, IOVA, 8, 0, TO_GUEST);
    let (m, head, _) = request(&mut r, DMA_WRITE);
    let mut stray = m.header.reply(16).unwrap();
    stray.msg_id = m.header.msg_id.wrapping_add(1000);
    r.t.send(&stray, &[head.as_bytes()], &[]).unwrap();
    answer(&mut r, &m, &[head.as_bytes()]);
    assert_eq!(status(&mut r, id), 0);
}

#[test]
fn device_read_of_a_write_only_mapping_is_eperm_without_a_message() {
    let (_s, mut r) = setup_with(&[], wire::DMA_MAP_FLAG_WRITE);
    let id = kick(&mut r, IOVA, 8, 0, FROM_GUEST);
    assert_eq!(status(&mut r, id), 1);
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
    kick(&mut r, IOVA, 8, 0, TO_GUEST);
    request(&mut r, DMA_WRITE);
    drop(r);
    Raw::negotiated(&s.path).assert_usable();
}
