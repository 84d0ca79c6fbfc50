//! Conformance: VFIO_USER_REGION_WRITE_MULTI, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Capabilities, Command};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::{Efd, TestServer};
use zerocopy::{FromBytes, IntoBytes};

const MULTI: u16 = Command::RegionWriteMulti as u16;

/// A server and a client that negotiated `write_multiple`.
fn setup() -> (TestServer, Raw) {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let reply = r.version(0, 0, b"{\"capabilities\":{\"write_multiple\":true}}\0");
    assert_eq!(reply.errno(), None);
    (s, r)
}

fn entry(region: u32, offset: u64, data: &[u8]) -> wire::WriteMultiEntry {
    let mut e = wire::WriteMultiEntry {
        offset,
        region,
        count: u32::try_from(data.len()).unwrap(),
        data: [0; 8],
    };
    e.data[..data.len()].copy_from_slice(data);
    e
}

fn body(wr_cnt: u64, entries: &[wire::WriteMultiEntry]) -> Vec<u8> {
    let mut b = wire::WriteMulti { wr_cnt }.as_bytes().to_vec();
    for e in entries {
        b.extend_from_slice(e.as_bytes());
    }
    b
}

fn multi(r: &mut Raw, entries: &[wire::WriteMultiEntry]) -> RawReply {
    let n = u64::try_from(entries.len()).unwrap();
    r.call(MULTI, &[&body(n, entries)], &[])
}

fn read(r: &mut Raw, region: u32, offset: u64, count: u32) -> Vec<u8> {
    let a = wire::RegionAccess {
        offset,
        region,
        count,
    };
    let reply = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    reply.body[16..].to_vec()
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
}

#[test]
fn write_multiple_is_announced_when_negotiated() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let reply = r.version(0, 0, b"{\"capabilities\":{\"write_multiple\":true}}\0");
    let caps = Capabilities::parse(&reply.body[4..]).unwrap();
    assert_eq!(caps.write_multiple, Some(true));
}

#[test]
fn wr_cnt_0_succeeds() {
    let (_s, mut r) = setup();
    let reply = multi(&mut r, &[]);
    assert_eq!(reply.errno(), None);
    assert_eq!(
        wire::WriteMulti::read_from_bytes(&reply.body)
            .unwrap()
            .wr_cnt,
        0
    );
}

#[test]
fn wr_cnt_1_is_applied() {
    let (_s, mut r) = setup();
    assert_eq!(multi(&mut r, &[entry(0, 0x10, b"one")]).errno(), None);
    assert_eq!(read(&mut r, 0, 0x10, 3), b"one");
}

#[test]
fn reply_echoes_wr_cnt() {
    let (_s, mut r) = setup();
    let reply = multi(&mut r, &[entry(0, 0, b"a"), entry(0, 1, b"b")]);
    assert_eq!(reply.body, wire::WriteMulti { wr_cnt: 2 }.as_bytes());
}

#[test]
fn wr_cnt_200_is_applied_in_order() {
    let (_s, mut r) = setup();
    // 200 one-byte writes over 32 bytes: each byte ends with its last writer's value.
    let entries: Vec<_> = (0..200u8)
        .map(|i| entry(0, u64::from(i % 32), &[i]))
        .collect();
    assert_eq!(multi(&mut r, &entries).errno(), None);
    let want: Vec<u8> = (0..32u8)
        .map(|b| if b < 8 { 192 + b } else { 160 + b })
        .collect();
    assert_eq!(read(&mut r, 0, 0, 32), want);
}

#[test]
fn entries_of_every_size_up_to_8_are_applied() {
    let (_s, mut r) = setup();
    let entries: Vec<_> = (0..=8u8)
        .map(|n| entry(0, 0x400 + 0x10 * u64::from(n), &vec![n; usize::from(n)]))
        .collect();
    assert_eq!(multi(&mut r, &entries).errno(), None);
    assert_eq!(read(&mut r, 0, 0x480, 8), vec![8; 8]);
}

#[test]
fn entries_may_target_different_regions() {
    let (_s, mut r) = setup();
    let entries = [
        entry(0, 0, b"bar0"),
        entry(1, 4, b"bar1"),
        entry(7, 0x3c, &[9]),
    ];
    assert_eq!(multi(&mut r, &entries).errno(), None);
    assert_eq!(read(&mut r, 0, 0, 4), b"bar0");
    assert_eq!(read(&mut r, 1, 4, 4), b"bar1");
    assert_eq!(read(&mut r, 7, 0x3c, 1), vec![9]);
}

#[test]
fn wr_cnt_201_is_einval() {
    let (_s, mut r) = setup();
    let entries: Vec<_> = (0..201).map(|_| entry(0, 0, b"x")).collect();
    let reply = multi(&mut r, &entries);
    assert_refused(&mut r, &reply, errno::EINVAL);
    assert_eq!(read(&mut r, 0, 0, 1), vec![0], "nothing was written");
}

#[test]
fn wr_cnt_u64_max_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(MULTI, &[&body(u64::MAX, &[entry(0, 0, b"x")])], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn entry_count_9_is_einval() {
    let (_s, mut r) = setup();
    let mut e = entry(0, 0, b"12345678");
    e.count = 9;
    let reply = multi(&mut r, &[e]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn missing_entries_are_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(
        MULTI,
        &[&body(3, &[entry(0, 0, b"a"), entry(0, 1, b"b")])],
        &[],
    );
    assert_refused(&mut r, &reply, errno::EINVAL);
}

/// Regression (fixed in b6138df): the entries before a malformed one were applied, then the
/// message was refused.
#[test]
fn a_malformed_message_applies_no_write() {
    let (_s, mut r) = setup();
    let reply = r.call(
        MULTI,
        &[&body(3, &[entry(0, 0, b"a"), entry(0, 1, b"b")])],
        &[],
    );
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    assert_eq!(read(&mut r, 0, 0, 2), vec![0, 0]);
}

#[test]
fn an_entry_for_a_bad_region_is_einval() {
    let (_s, mut r) = setup();
    let reply = multi(&mut r, &[entry(9, 0, b"x")]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_entry_past_the_region_is_einval() {
    let (_s, mut r) = setup();
    let reply = multi(&mut r, &[entry(0, 4094, b"1234")]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(MULTI, &[&[0u8; 4]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(MULTI, &[&body(1, &[entry(0, 0, b"x")])], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
    assert_eq!(read(&mut r, 0, 0, 1), vec![0], "nothing was written");
}

#[test]
fn without_negotiation_it_is_still_served() {
    let s = TestServer::test_device();
    let mut r = Raw::negotiated(&s.path);
    assert_eq!(multi(&mut r, &[entry(0, 0, b"ok")]).errno(), None);
    assert_eq!(read(&mut r, 0, 0, 2), b"ok");
}
