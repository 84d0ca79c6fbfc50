//! Conformance: VFIO_USER_VERSION, negotiation and capabilities, over raw wire.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;

use umdev_proto::{wire, Capabilities, Command};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::{Efd, TestServer};
use umdev_transport::TransportError;
use zerocopy::{FromBytes, IntoBytes};

const VERSION: u16 = Command::Version as u16;

fn nul(json: &str) -> Vec<u8> {
    let mut v = json.as_bytes().to_vec();
    v.push(0);
    v
}

fn caps(json: &str) -> Vec<u8> {
    nul(&format!(r#"{{"capabilities":{json}}}"#))
}

/// Splits a successful VERSION reply into its version and parsed capabilities.
fn parse(reply: &RawReply) -> (wire::Version, Capabilities) {
    assert_eq!(reply.errno(), None, "{:?}", reply.header);
    let (v, tail) = wire::Version::read_from_prefix(&reply.body).unwrap();
    (v, Capabilities::parse(tail).unwrap())
}

fn propose(s: &TestServer, minor: u16, data: &[u8]) -> (Raw, RawReply) {
    let mut r = s.raw();
    let reply = r.version(0, minor, data);
    (r, reply)
}

fn assert_closed(r: &mut Raw) {
    match r.try_recv() {
        Err(TransportError::Closed) => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
}

/// A VERSION that must be refused with EINVAL, after which the server closes.
fn refused(data: &[u8]) {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 0, data);
    assert_eq!(reply.errno(), Some(errno::EINVAL), "{:?}", reply.header);
    assert_closed(&mut r);
    Raw::negotiated(&s.path).assert_usable();
}

#[test]
fn minor_0_is_accepted_and_answered_with_minor_0() {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 0, &[]);
    let (v, _) = parse(&reply);
    assert_eq!((v.major, v.minor), (0, 0));
    r.assert_usable();
}

#[test]
fn minor_1_is_accepted_and_answered_with_minor_1() {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 1, &[]);
    let (v, _) = parse(&reply);
    assert_eq!((v.major, v.minor), (0, 1));
    r.assert_usable();
}

#[test]
fn a_higher_minor_is_answered_with_one_not_above_it() {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 9, &[]);
    let (v, _) = parse(&reply);
    assert_eq!(v.major, 0);
    assert!(v.minor <= 9);
    assert_eq!(v.minor, umdev_proto::MAX_MINOR);
    r.assert_usable();
}

#[test]
fn reply_echoes_the_message_id_and_is_a_reply() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let id = r.send(VERSION, 0, &[wire::Version::default().as_bytes()], &[]);
    let reply = r.recv();
    assert_eq!(reply.header.msg_id, id);
    assert_eq!(reply.header.command, VERSION);
    assert!(reply.header.is_reply());
}

#[test]
fn major_1_is_enotsup_and_the_server_closes() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let reply = r.version(1, 0, &[]);
    assert_eq!(reply.errno(), Some(errno::ENOTSUP));
    assert_closed(&mut r);
    Raw::negotiated(&s.path).assert_usable();
}

#[test]
fn major_ffff_is_enotsup_and_the_server_closes() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_eq!(r.version(0xffff, 0, &[]).errno(), Some(errno::ENOTSUP));
    assert_closed(&mut r);
}

#[test]
fn body_shorter_than_the_version_struct_is_einval_and_the_server_closes() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_eq!(
        r.call(VERSION, &[&[0u8; 3]], &[]).errno(),
        Some(errno::EINVAL)
    );
    assert_closed(&mut r);
}

#[test]
fn an_fd_with_version_is_einval_and_the_server_closes() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let e = Efd::new();
    let v = wire::Version::default();
    let reply = r.call(VERSION, &[v.as_bytes()], &[e.as_fd()]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    assert_closed(&mut r);
}

#[test]
fn caps_without_nul_are_einval_and_the_server_closes() {
    refused(br#"{"capabilities":{}}"#);
}

#[test]
fn caps_that_are_not_json_are_einval_and_the_server_closes() {
    refused(&nul("capabilities: none"));
}

#[test]
fn caps_that_are_not_utf8_are_einval_and_the_server_closes() {
    refused(&[b'{', 0xff, 0xfe, b'}', 0]);
}

#[test]
fn caps_whose_root_is_not_an_object_are_einval_and_the_server_closes() {
    refused(&nul("[1,2]"));
}

#[test]
fn capabilities_that_are_not_an_object_are_einval_and_the_server_closes() {
    refused(&nul(r#"{"capabilities":7}"#));
}

#[test]
fn max_msg_fds_as_a_string_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"max_msg_fds":"many"}"#));
}

#[test]
fn max_msg_fds_above_1024_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"max_msg_fds":100000}"#));
}

#[test]
fn negative_max_data_xfer_size_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"max_data_xfer_size":-1}"#));
}

#[test]
fn max_dma_maps_above_u32_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"max_dma_maps":4294967296}"#));
}

#[test]
fn pgsizes_as_a_string_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"pgsizes":"4k"}"#));
}

#[test]
fn write_multiple_as_a_number_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"write_multiple":1}"#));
}

#[test]
fn migration_of_the_wrong_type_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"migration":true}"#));
}

#[test]
fn twin_socket_of_the_wrong_type_is_einval_and_the_server_closes() {
    refused(&caps(r#"{"twin_socket":true}"#));
}

#[test]
fn empty_version_data_is_accepted() {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 0, &[]);
    parse(&reply);
    r.assert_usable();
}

#[test]
fn a_lone_nul_is_accepted() {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 0, &[0]);
    parse(&reply);
    r.assert_usable();
}

#[test]
fn an_empty_object_is_accepted() {
    let s = TestServer::test_device();
    let (mut r, reply) = propose(&s, 0, &nul("{}"));
    parse(&reply);
    r.assert_usable();
}

#[test]
fn unknown_keys_are_ignored() {
    let s = TestServer::test_device();
    let data = nul(r#"{"capabilities":{"shiny":[1,2],"max_msg_fds":4},"vendor":"x"}"#);
    let (mut r, reply) = propose(&s, 0, &data);
    parse(&reply);
    r.assert_usable();
}

#[test]
fn what_qemu_proposes_is_accepted() {
    let s = TestServer::test_device();
    let data = caps(
        r#"{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true}"#,
    );
    let (mut r, reply) = propose(&s, 0, &data);
    parse(&reply);
    r.assert_usable();
}

#[test]
fn reply_announces_the_servers_limits() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &[]);
    let (_, c) = parse(&reply);
    assert_eq!(c.max_msg_fds, Some(16));
    assert_eq!(c.max_data_xfer_size, Some(1 << 20));
    assert_eq!(c.max_dma_maps, Some(65_535));
    assert_eq!(c.pgsizes, Some(4096));
}

#[test]
fn reply_data_is_nul_terminated_json() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &[]);
    let tail = &reply.body[4..];
    assert_eq!(tail.last(), Some(&0));
    assert_eq!(tail.iter().filter(|b| **b == 0).count(), 1);
    assert!(tail.starts_with(br#"{"capabilities":{"#));
}

#[test]
fn client_max_dma_maps_lowers_the_announced_one() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &caps(r#"{"max_dma_maps":4}"#));
    assert_eq!(parse(&reply).1.max_dma_maps, Some(4));
}

#[test]
fn write_multiple_is_announced_when_proposed() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &caps(r#"{"write_multiple":true}"#));
    assert_eq!(parse(&reply).1.write_multiple, Some(true));
}

#[test]
fn write_multiple_is_not_announced_when_proposed_false() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &caps(r#"{"write_multiple":false}"#));
    assert_ne!(parse(&reply).1.write_multiple, Some(true));
}

#[test]
fn write_multiple_is_not_announced_when_not_proposed() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &[]);
    assert_eq!(parse(&reply).1.write_multiple, None);
}

#[test]
fn twin_socket_is_not_enabled() {
    let s = TestServer::test_device();
    let (_r, reply) = propose(&s, 0, &caps(r#"{"twin_socket":{"supported":true}}"#));
    assert!(reply.fds.is_empty());
    let (_, c) = parse(&reply);
    assert!(c
        .twin_socket
        .is_none_or(|t| t.get("supported") != Some(&true.into())));
}

#[test]
fn a_second_version_is_einval_and_the_connection_stays_usable() {
    let s = TestServer::test_device();
    let mut r = Raw::negotiated(&s.path);
    assert_eq!(r.version(0, 0, &[]).errno(), Some(errno::EINVAL));
    r.assert_usable();
}

#[test]
fn a_device_refusing_open_fails_version_with_its_errno_and_the_server_closes() {
    let s = TestServer::test_device();
    s.observed().refuse_open.store(true, Ordering::SeqCst);
    let (mut r, reply) = propose(&s, 0, &[]);
    assert_eq!(reply.errno(), Some(errno::EBUSY));
    assert_closed(&mut r);
    s.observed().refuse_open.store(false, Ordering::SeqCst);
    Raw::negotiated(&s.path).assert_usable();
}
