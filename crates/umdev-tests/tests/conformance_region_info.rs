//! Conformance: VFIO_USER_DEVICE_GET_REGION_INFO, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::device::{BAR2_AREAS, BAR2_SIZE};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::{FromBytes, IntoBytes};

const REGION_INFO: u16 = Command::DeviceGetRegionInfo as u16;
const RW: u32 = wire::REGION_INFO_FLAG_READ | wire::REGION_INFO_FLAG_WRITE;
/// Region info, the sparse mmap header and BAR2's two areas.
const BAR2_NEEDED: u32 = 32 + 16 + 2 * 16;

use umdev_tests::negotiated_test_device as setup;

fn req(index: u32, argsz: u32) -> wire::RegionInfo {
    wire::RegionInfo {
        argsz,
        index,
        ..Default::default()
    }
}

fn call(r: &mut Raw, index: u32, argsz: u32) -> RawReply {
    r.call(REGION_INFO, &[req(index, argsz).as_bytes()], &[])
}

/// The fixed part of a successful reply and the capability bytes after it.
fn info(r: &mut Raw, index: u32, argsz: u32) -> (wire::RegionInfo, Vec<u8>, usize) {
    let reply = call(r, index, argsz);
    assert_eq!(reply.errno(), None, "region {index}");
    let (got, caps) = wire::RegionInfo::read_from_prefix(&reply.body).unwrap();
    (got, caps.to_vec(), reply.fds.len())
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
}

fn assert_absent(index: u32) {
    let (_s, mut r) = setup();
    let (got, caps, fds) = info(&mut r, index, 32);
    assert_eq!((got.size, got.flags, got.index), (0, 0, index));
    assert!(caps.is_empty());
    assert_eq!(fds, 0);
}

#[test]
fn every_index_0_to_8_is_answered_with_its_index() {
    let (_s, mut r) = setup();
    for index in 0..9 {
        let (got, _, _) = info(&mut r, index, 32);
        assert_eq!(got.index, index);
    }
}

#[test]
fn bar0_is_4k_read_write_not_mmapped() {
    let (_s, mut r) = setup();
    let (got, caps, fds) = info(&mut r, 0, 32);
    assert_eq!((got.size, got.flags, got.argsz), (4096, RW, 32));
    assert!(caps.is_empty());
    assert_eq!(fds, 0);
}

#[test]
fn bar1_io_is_16_bytes_read_write() {
    let (_s, mut r) = setup();
    let (got, _, _) = info(&mut r, 1, 32);
    assert_eq!((got.size, got.flags), (16, RW));
}

#[test]
fn bar2_is_mmap_able_with_caps() {
    let (_s, mut r) = setup();
    let (got, _, _) = info(&mut r, 2, BAR2_NEEDED);
    assert_eq!(got.size, BAR2_SIZE);
    assert_eq!(
        got.flags,
        RW | wire::REGION_INFO_FLAG_MMAP | wire::REGION_INFO_FLAG_CAPS
    );
    assert_eq!(got.offset, 0, "mmap offset of BAR2 in its fd");
}

#[test]
fn bar3_the_upper_half_of_64_bit_bar2_is_absent() {
    assert_absent(3);
}

#[test]
fn bar4_holding_msix_is_8k_read_write() {
    let (_s, mut r) = setup();
    let (got, _, fds) = info(&mut r, 4, 32);
    assert_eq!((got.size, got.flags, fds), (8192, RW, 0));
}

#[test]
fn bar5_is_absent() {
    assert_absent(5);
}

#[test]
fn rom_is_absent() {
    assert_absent(6);
}

#[test]
fn config_space_is_4096_bytes_read_write() {
    let (_s, mut r) = setup();
    let (got, _, fds) = info(&mut r, 7, 32);
    assert_eq!((got.size, got.flags, fds), (4096, RW, 0));
}

#[test]
fn vga_is_absent() {
    assert_absent(8);
}

#[test]
fn an_fd_comes_exactly_with_bar2() {
    let (_s, mut r) = setup();
    for index in 0..9 {
        let (_, _, fds) = info(&mut r, index, BAR2_NEEDED);
        assert_eq!(fds, usize::from(index == 2), "region {index}");
    }
}

/// Issue 8: QEMU 11 asks with `argsz` 32 and refuses a reply whose CAPS flag is set while
/// `cap_offset` lies outside it ("failed to get region 2 info"). The reply says how much
/// the whole answer takes (`argsz`) and sets CAPS only when the capabilities are in it.
#[test]
fn small_argsz_gets_the_needed_argsz_and_no_caps_flag() {
    let (_s, mut r) = setup();
    let (got, caps, fds) = info(&mut r, 2, 32);
    assert_eq!(got.argsz, BAR2_NEEDED);
    assert_eq!(got.cap_offset, 0);
    assert!(caps.is_empty());
    assert_eq!(
        got.flags & wire::REGION_INFO_FLAG_CAPS,
        0,
        "no CAPS flag without the caps"
    );
    assert_eq!(fds, 1, "the fd comes even without the caps");
    // Asked again with the argsz the reply gave, the caps come, flagged.
    let (got, caps, _) = info(&mut r, 2, got.argsz);
    assert_ne!(got.flags & wire::REGION_INFO_FLAG_CAPS, 0);
    assert!(!caps.is_empty());
}

#[test]
fn argsz_one_byte_short_still_gets_no_caps() {
    let (_s, mut r) = setup();
    let (got, caps, _) = info(&mut r, 2, BAR2_NEEDED - 1);
    assert_eq!((got.argsz, got.cap_offset), (BAR2_NEEDED, 0));
    assert!(caps.is_empty());
    assert_eq!(got.flags & wire::REGION_INFO_FLAG_CAPS, 0);
}

#[test]
fn enough_argsz_gets_the_sparse_mmap_cap_after_the_struct() {
    let (_s, mut r) = setup();
    let (got, caps, _) = info(&mut r, 2, BAR2_NEEDED);
    assert_eq!((got.argsz, got.cap_offset), (BAR2_NEEDED, 32));
    let (sparse, areas) = wire::SparseMmap::read_from_prefix(&caps).unwrap();
    assert_eq!(sparse.header.id, wire::REGION_INFO_CAP_SPARSE_MMAP);
    assert_eq!(sparse.header.version, 1);
    assert_eq!(sparse.header.next, 0, "the only capability");
    assert_eq!(sparse.nr_areas, 2);
    assert_eq!(areas.len(), 32);
}

#[test]
fn sparse_areas_are_the_declared_ones() {
    let (_s, mut r) = setup();
    let (_, caps, _) = info(&mut r, 2, 4096);
    let areas: Vec<(u64, u64)> = caps[16..]
        .chunks(16)
        .map(|a| {
            let a = wire::SparseMmapArea::read_from_bytes(a).unwrap();
            (a.offset, a.size)
        })
        .collect();
    assert_eq!(areas, BAR2_AREAS.to_vec());
}

#[test]
fn bar2_fd_shares_memory_with_the_region() {
    let (_s, mut r) = setup();
    let reply = call(&mut r, 2, 32);
    let fd = &reply.fds[0];
    rustix::io::pwrite(fd, b"through the fd", 0x1000).unwrap();
    let a = wire::RegionAccess {
        offset: 0x1000,
        region: 2,
        count: 14,
    };
    let read = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
    assert_eq!(&read.body[16..], b"through the fd");
}

#[test]
fn index_9_is_einval() {
    let (_s, mut r) = setup();
    let reply = call(&mut r, 9, 32);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn index_u32_max_is_einval() {
    let (_s, mut r) = setup();
    let reply = call(&mut r, u32::MAX, 32);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn argsz_below_32_is_einval() {
    let (_s, mut r) = setup();
    let reply = call(&mut r, 0, 31);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(REGION_INFO, &[&req(0, 32).as_bytes()[..16]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(REGION_INFO, &[req(0, 32).as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}
