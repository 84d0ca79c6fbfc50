//! Conformance: VFIO_USER_DEVICE_GET_INFO, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::{Efd, TestServer};
use zerocopy::{FromBytes, IntoBytes};

const GET_INFO: u16 = Command::DeviceGetInfo as u16;

use umdev_tests::negotiated_test_device as setup;

fn req(argsz: u32) -> wire::DeviceInfo {
    wire::DeviceInfo {
        argsz,
        ..Default::default()
    }
}

fn info(r: &mut Raw, req: wire::DeviceInfo) -> wire::DeviceInfo {
    let reply = r.call(GET_INFO, &[req.as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    wire::DeviceInfo::read_from_bytes(&reply.body).unwrap()
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
}

#[test]
fn reply_says_pci_with_reset() {
    let (_s, mut r) = setup();
    let got = info(&mut r, req(16));
    assert_eq!(got.flags, wire::DEVICE_FLAGS_PCI | wire::DEVICE_FLAGS_RESET);
}

#[test]
fn reply_counts_9_regions() {
    let (_s, mut r) = setup();
    assert_eq!(info(&mut r, req(16)).num_regions, 9);
}

#[test]
fn reply_counts_5_irq_types() {
    let (_s, mut r) = setup();
    assert_eq!(info(&mut r, req(16)).num_irqs, 5);
}

#[test]
fn reply_is_16_bytes_with_argsz_16() {
    let (_s, mut r) = setup();
    let reply = r.call(GET_INFO, &[req(16).as_bytes()], &[]);
    assert_eq!(reply.body.len(), 16);
    assert_eq!(reply.header.msg_size, 32);
    assert_eq!(
        wire::DeviceInfo::read_from_bytes(&reply.body)
            .unwrap()
            .argsz,
        16
    );
}

#[test]
fn larger_argsz_still_gets_argsz_16() {
    let (_s, mut r) = setup();
    assert_eq!(info(&mut r, req(4096)).argsz, 16);
}

#[test]
fn nonzero_request_fields_do_not_change_the_answer() {
    let (_s, mut r) = setup();
    let noisy = wire::DeviceInfo {
        argsz: 16,
        flags: 0xffff_ffff,
        num_regions: 77,
        num_irqs: 77,
    };
    assert_eq!(info(&mut r, noisy), info(&mut r, req(16)));
}

#[test]
fn argsz_below_16_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(GET_INFO, &[req(15).as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(GET_INFO, &[&req(16).as_bytes()[..12]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn empty_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(GET_INFO, &[], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(GET_INFO, &[req(16).as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn before_version_it_is_einval() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let reply = r.call(GET_INFO, &[req(16).as_bytes()], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
}
