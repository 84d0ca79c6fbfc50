//! Conformance: message framing, header validation and ordering, over raw wire.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use umdev_proto::{wire, Command, Header, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_REPLY, HEADER_SIZE};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::{Efd, TestServer};
use umdev_transport::{Transport, TransportError};
use zerocopy::IntoBytes;

const GET_INFO: u16 = Command::DeviceGetInfo as u16;
const REGION_READ: u16 = Command::RegionRead as u16;
const REGION_WRITE: u16 = Command::RegionWrite as u16;
/// The server's default body limit: 1 MiB of data plus 8 KiB of message overhead.
const MAX_BODY: usize = (1 << 20) + 8192;

fn info() -> Vec<u8> {
    wire::DeviceInfo {
        argsz: 16,
        ..Default::default()
    }
    .as_bytes()
    .to_vec()
}

use umdev_tests::negotiated_test_device as setup;

fn assert_closed(r: &mut Raw) {
    match r.try_recv() {
        Err(TransportError::Closed) => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

/// Connects and negotiates; `None` if the server closed the connection instead.
fn try_negotiate(s: &TestServer) -> Option<Raw> {
    let mut r = s.raw();
    let caps = umdev_proto::Capabilities::default().to_wire();
    let v = wire::Version { major: 0, minor: 0 };
    let h = Header::command(1, Command::Version, 4 + caps.len()).unwrap();
    r.t.send(&h, &[v.as_bytes(), &caps], &[]).ok()?;
    match r.try_recv() {
        Ok(reply) if reply.errno().is_none() => Some(r),
        Err(TransportError::Closed) => None,
        other => panic!("VERSION failed: {other:?}"),
    }
}

fn assert_new_client_served(s: &TestServer) {
    Raw::negotiated(&s.path).assert_usable();
}

fn assert_errno(r: &RawReply, want: i32) {
    assert_eq!(r.errno(), Some(want), "{:?}", r.header);
}

fn unknown_command(n: u16) {
    let (_s, mut r) = setup();
    assert_errno(&r.call(n, &[&info()], &[]), errno::ENOSYS);
    r.assert_usable();
}

fn bad_flags(flags: u32) {
    let (_s, mut r) = setup();
    let id = r.send(GET_INFO, flags, &[&info()], &[]);
    let reply = r.recv();
    assert_eq!(reply.header.msg_id, id);
    assert_errno(&reply, errno::EINVAL);
    r.assert_usable();
}

#[test]
fn truncated_header_then_close_ends_the_session_and_the_next_client_is_served() {
    let s = TestServer::test_device();
    let r = Raw::negotiated(&s.path);
    r.send_raw(&Raw::header_bytes(1, GET_INFO, 32, 0)[..8]);
    drop(r);
    assert_new_client_served(&s);
}

#[test]
fn truncated_body_then_close_ends_the_session_and_the_next_client_is_served() {
    let s = TestServer::test_device();
    let r = Raw::negotiated(&s.path);
    let mut msg = Raw::header_bytes(1, GET_INFO, 32, 0);
    msg.extend_from_slice(&[0u8; 7]);
    r.send_raw(&msg);
    drop(r);
    assert_new_client_served(&s);
}

/// Regression (found by this suite, fixed in b6138df): the accept loop refused a client that
/// connected just as the previous session ended, as a reconnecting VMM does.
#[test]
fn a_client_reconnecting_at_once_is_served() {
    let s = TestServer::test_device();
    for i in 0..50 {
        assert!(try_negotiate(&s).is_some(), "connection {i} was refused");
    }
}

#[test]
fn size_below_the_header_closes_the_connection() {
    let (s, mut r) = setup();
    r.send_raw(&Raw::header_bytes(1, GET_INFO, 15, 0));
    assert_closed(&mut r);
    assert_new_client_served(&s);
}

#[test]
fn size_zero_closes_the_connection() {
    let (s, mut r) = setup();
    r.send_raw(&Raw::header_bytes(1, GET_INFO, 0, 0));
    assert_closed(&mut r);
    assert_new_client_served(&s);
}

#[test]
fn size_below_the_header_before_version_closes_the_connection() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    r.send_raw(&Raw::header_bytes(1, Command::Version as u16, 4, 0));
    assert_closed(&mut r);
    assert_new_client_served(&s);
}

#[test]
fn oversized_message_gets_e2big_and_the_connection_stays_usable() {
    let (_s, mut r) = setup();
    let mut body = info();
    body.resize(MAX_BODY + 1, 0xa5);
    let id = r.send(GET_INFO, 0, &[&body], &[]);
    let reply = r.recv();
    assert_eq!(reply.header.msg_id, id);
    assert_eq!(reply.header.command, GET_INFO);
    assert_errno(&reply, errno::E2BIG);
    r.assert_usable();
}

#[test]
fn message_of_exactly_the_size_limit_is_accepted() {
    let (_s, mut r) = setup();
    let mut body = info();
    body.resize(MAX_BODY, 0);
    assert_eq!(r.call(GET_INFO, &[&body], &[]).errno(), None);
    r.assert_usable();
}

#[test]
fn oversized_message_before_version_gets_e2big_and_version_still_works() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let body = vec![0u8; MAX_BODY + 1];
    r.send(Command::Version as u16, 0, &[&body], &[]);
    assert_errno(&r.recv(), errno::E2BIG);
    let caps = umdev_proto::Capabilities::default().to_wire();
    assert_eq!(r.version(0, 0, &caps).errno(), None);
    r.assert_usable();
}

#[test]
fn oversized_announcement_then_close_ends_the_session_and_the_next_client_is_served() {
    let s = TestServer::test_device();
    let r = Raw::negotiated(&s.path);
    r.send_raw(&Raw::header_bytes(1, REGION_WRITE, u32::MAX, 0));
    r.send_raw(&[0u8; 4096]);
    drop(r);
    assert_new_client_served(&s);
}

#[test]
fn command_0_is_enosys() {
    unknown_command(0);
}

#[test]
fn command_14_is_enosys() {
    unknown_command(14);
}

#[test]
fn command_19_is_enosys() {
    unknown_command(19);
}

#[test]
fn command_ffff_is_enosys() {
    unknown_command(0xffff);
}

#[test]
fn unknown_command_before_version_is_enosys_and_version_still_works() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_errno(&r.call(19, &[], &[]), errno::ENOSYS);
    let caps = umdev_proto::Capabilities::default().to_wire();
    assert_eq!(r.version(0, 0, &caps).errno(), None);
}

#[test]
fn message_type_2_is_einval() {
    bad_flags(2);
}

#[test]
fn message_type_15_is_einval() {
    bad_flags(0xf);
}

#[test]
fn undefined_flag_bit_6_is_einval() {
    bad_flags(1 << 6);
}

#[test]
fn undefined_flag_bit_31_is_einval() {
    bad_flags(1 << 31);
}

/// Regression (fixed in b6138df): a command carrying the reply-only Error flag was served.
#[test]
fn error_flag_on_a_command_is_einval() {
    bad_flags(FLAG_ERROR);
}

#[test]
fn stray_reply_gets_no_answer_and_the_connection_stays_usable() {
    let (_s, mut r) = setup();
    // A reply to a request the server never sent: nothing to answer, nothing to break.
    r.send(GET_INFO, FLAG_TYPE_REPLY, &[&info()], &[]);
    r.assert_usable();
}

#[test]
fn nonzero_error_field_in_a_command_is_ignored() {
    let (_s, mut r) = setup();
    let mut msg = Raw::header_bytes(7, GET_INFO, 32, 0);
    msg[12..16].copy_from_slice(&5u32.to_ne_bytes());
    msg.extend_from_slice(&info());
    r.send_raw(&msg);
    let reply = r.recv();
    assert_eq!(reply.header.msg_id, 7);
    assert_eq!(reply.errno(), None);
}

#[test]
fn more_than_16_fds_is_einval() {
    let (_s, mut r) = setup();
    let efds: Vec<Efd> = (0..17).map(|_| Efd::new()).collect();
    let fds: Vec<_> = efds.iter().map(|e| e.as_fd()).collect();
    assert_errno(&r.call(GET_INFO, &[&info()], &fds), errno::EINVAL);
    r.assert_usable();
}

#[test]
fn an_fd_on_a_command_that_takes_none_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    assert_errno(&r.call(GET_INFO, &[&info()], &[e.as_fd()]), errno::EINVAL);
    r.assert_usable();
}

#[test]
fn command_before_version_is_einval_and_version_still_works() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_errno(&r.call(GET_INFO, &[&info()], &[]), errno::EINVAL);
    let caps = umdev_proto::Capabilities::default().to_wire();
    assert_eq!(r.version(0, 0, &caps).errno(), None);
    r.assert_usable();
}

#[test]
fn error_reply_is_a_bare_header_with_the_errno() {
    let (_s, mut r) = setup();
    let reply = r.call(0x77, &[&info()], &[]);
    assert_eq!(reply.header.msg_size as usize, HEADER_SIZE);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header.flags, FLAG_TYPE_REPLY | FLAG_ERROR);
    assert_eq!(reply.header.error, 38);
}

#[test]
fn pipelined_requests_are_answered_in_order_with_their_ids() {
    let (_s, mut r) = setup();
    let ids: Vec<u16> = (0..64)
        .map(|i| {
            if i % 2 == 0 {
                r.send(GET_INFO, 0, &[&info()], &[])
            } else {
                let req = wire::RegionAccess {
                    offset: 0,
                    region: 0,
                    count: 4,
                };
                r.send(REGION_READ, 0, &[req.as_bytes()], &[])
            }
        })
        .collect();
    for (i, id) in ids.into_iter().enumerate() {
        let reply = r.recv();
        assert_eq!(reply.header.msg_id, id);
        let want = if i % 2 == 0 { GET_INFO } else { REGION_READ };
        assert_eq!(reply.header.command, want);
        assert_eq!(reply.errno(), None);
    }
}

#[test]
fn reused_message_ids_are_each_answered() {
    let (_s, mut r) = setup();
    let mut one = Raw::header_bytes(5, GET_INFO, 32, 0);
    one.extend_from_slice(&info());
    r.send_raw(&one);
    r.send_raw(&one);
    for _ in 0..2 {
        let reply = r.recv();
        assert_eq!(reply.header.msg_id, 5);
        assert_eq!(reply.errno(), None);
    }
}

#[test]
fn two_messages_in_one_write_are_both_answered() {
    let (_s, mut r) = setup();
    let mut both = Raw::header_bytes(1, GET_INFO, 32, 0);
    both.extend_from_slice(&info());
    both.extend_from_slice(&Raw::header_bytes(2, GET_INFO, 32, 0));
    both.extend_from_slice(&info());
    r.send_raw(&both);
    assert_eq!(r.recv().header.msg_id, 1);
    assert_eq!(r.recv().header.msg_id, 2);
}

#[test]
fn message_split_across_writes_is_reassembled() {
    let (_s, mut r) = setup();
    let mut msg = Raw::header_bytes(9, GET_INFO, 32, 0);
    msg.extend_from_slice(&info());
    for piece in msg.chunks(5) {
        r.send_raw(piece);
        std::thread::sleep(Duration::from_millis(2));
    }
    let reply = r.recv();
    assert_eq!(reply.header.msg_id, 9);
    assert_eq!(reply.errno(), None);
}

#[test]
fn posted_write_gets_no_reply_but_takes_effect() {
    let (_s, mut r) = setup();
    let w = wire::RegionAccess {
        offset: 0x10,
        region: 0,
        count: 4,
    };
    r.send(REGION_WRITE, FLAG_NO_REPLY, &[w.as_bytes(), b"post"], &[]);
    // The next reply must be the read's (call checks the id), carrying the posted data.
    let reply = r.call(REGION_READ, &[w.as_bytes()], &[]);
    assert_eq!(&reply.body[16..], b"post");
}

#[test]
fn failed_posted_write_gets_no_reply_and_the_connection_stays_usable() {
    let (_s, mut r) = setup();
    let w = wire::RegionAccess {
        offset: 0,
        region: 9,
        count: 4,
    };
    r.send(REGION_WRITE, FLAG_NO_REPLY, &[w.as_bytes(), b"post"], &[]);
    r.assert_usable();
}

#[test]
fn posted_command_with_unknown_number_gets_no_reply() {
    let (_s, mut r) = setup();
    r.send(0x99, FLAG_NO_REPLY, &[&info()], &[]);
    r.assert_usable();
}

#[test]
fn fds_stay_with_their_message_when_pipelined() {
    // Fds attached to the second of two pipelined messages must not be seen by the first.
    let (_s, mut r) = setup();
    let e = Efd::new();
    let first = r.send(GET_INFO, 0, &[&info()], &[]);
    let set = wire::IrqSet {
        argsz: 20,
        flags: wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        index: 3,
        start: 0,
        count: 1,
    };
    let second = r.send(
        Command::DeviceSetIrqs as u16,
        0,
        &[set.as_bytes()],
        &[e.as_fd()],
    );
    let (a, b) = (r.recv(), r.recv());
    assert_eq!((a.header.msg_id, a.errno()), (first, None));
    assert_eq!((b.header.msg_id, b.errno()), (second, None));
}
