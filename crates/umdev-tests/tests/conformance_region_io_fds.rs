//! Conformance: VFIO_USER_DEVICE_GET_REGION_IO_FDS, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::{FromBytes, IntoBytes};

const IO_FDS: u16 = Command::DeviceGetRegionIoFds as u16;

use umdev_tests::negotiated_test_device as setup;

fn req(index: u32) -> wire::RegionIoFds {
    wire::RegionIoFds {
        argsz: 16,
        flags: 0,
        index,
        count: 0,
    }
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
}

#[test]
fn every_region_answers_with_no_sub_regions_and_no_fds() {
    let (_s, mut r) = setup();
    for index in 0..9 {
        let reply = r.call(IO_FDS, &[req(index).as_bytes()], &[]);
        assert_eq!(reply.errno(), None, "region {index}");
        assert!(reply.fds.is_empty(), "region {index}");
        let got = wire::RegionIoFds::read_from_bytes(&reply.body).unwrap();
        assert_eq!(got.count, 0, "region {index}");
    }
}

#[test]
fn reply_echoes_the_index_with_argsz_16_and_flags_0() {
    let (_s, mut r) = setup();
    let reply = r.call(IO_FDS, &[req(2).as_bytes()], &[]);
    let got = wire::RegionIoFds::read_from_bytes(&reply.body).unwrap();
    assert_eq!(got, req(2));
}

#[test]
fn larger_argsz_is_accepted() {
    let (_s, mut r) = setup();
    let big = wire::RegionIoFds {
        argsz: 4096,
        ..req(0)
    };
    assert_eq!(r.call(IO_FDS, &[big.as_bytes()], &[]).errno(), None);
}

#[test]
fn index_9_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(IO_FDS, &[req(9).as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn index_u32_max_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(IO_FDS, &[req(u32::MAX).as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn nonzero_flags_are_einval() {
    let (_s, mut r) = setup();
    let bad = wire::RegionIoFds { flags: 1, ..req(0) };
    let reply = r.call(IO_FDS, &[bad.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn argsz_below_16_is_einval() {
    let (_s, mut r) = setup();
    let bad = wire::RegionIoFds { argsz: 8, ..req(0) };
    let reply = r.call(IO_FDS, &[bad.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(IO_FDS, &[&req(0).as_bytes()[..12]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(IO_FDS, &[req(0).as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}
