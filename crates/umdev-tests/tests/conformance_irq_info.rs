//! Conformance: VFIO_USER_DEVICE_GET_IRQ_INFO, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::{FromBytes, IntoBytes};

const IRQ_INFO: u16 = Command::DeviceGetIrqInfo as u16;

use umdev_tests::negotiated_test_device as setup;

fn req(index: u32) -> wire::IrqInfo {
    wire::IrqInfo {
        argsz: 16,
        flags: 0,
        index,
        count: 0,
    }
}

fn info(index: u32) -> wire::IrqInfo {
    let (_s, mut r) = setup();
    let reply = r.call(IRQ_INFO, &[req(index).as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    wire::IrqInfo::read_from_bytes(&reply.body).unwrap()
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
}

#[test]
fn intx_has_one_maskable_automasked_vector() {
    let got = info(0);
    assert_eq!(got.count, 1);
    assert_eq!(
        got.flags,
        wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_MASKABLE | wire::IRQ_INFO_AUTOMASKED
    );
}

#[test]
fn msi_has_four_noresize_vectors() {
    let got = info(1);
    assert_eq!(got.count, 4);
    assert_eq!(got.flags, wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_NORESIZE);
}

#[test]
fn msix_has_eight_noresize_vectors() {
    let got = info(2);
    assert_eq!(got.count, 8);
    assert_eq!(got.flags, wire::IRQ_INFO_EVENTFD | wire::IRQ_INFO_NORESIZE);
}

#[test]
fn err_has_one_eventfd_vector() {
    let got = info(3);
    assert_eq!((got.count, got.flags), (1, wire::IRQ_INFO_EVENTFD));
}

#[test]
fn req_has_one_eventfd_vector() {
    let got = info(4);
    assert_eq!((got.count, got.flags), (1, wire::IRQ_INFO_EVENTFD));
}

#[test]
fn reply_echoes_the_index_with_argsz_16() {
    let got = info(2);
    assert_eq!((got.argsz, got.index), (16, 2));
}

#[test]
fn index_5_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(IRQ_INFO, &[req(5).as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn index_u32_max_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(IRQ_INFO, &[req(u32::MAX).as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn argsz_below_16_is_einval() {
    let (_s, mut r) = setup();
    let bad = wire::IrqInfo { argsz: 4, ..req(0) };
    let reply = r.call(IRQ_INFO, &[bad.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(IRQ_INFO, &[&req(0).as_bytes()[..8]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(IRQ_INFO, &[req(0).as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}
