//! Conformance: VFIO_USER_DMA_MAP, over raw wire.
#![allow(clippy::unwrap_used)]

use std::os::fd::{AsFd, BorrowedFd};

use rustix::io::Errno;
use umdev_proto::{wire, Command};
use umdev_tests::device::reg;
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::{Efd, TestServer};
use zerocopy::IntoBytes;

const MAP: u16 = Command::DmaMap as u16;
const RW: u32 = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;

use umdev_tests::negotiated_test_device as setup;

use umdev_tests::guest_memfd as memfd;

fn req(flags: u32, offset: u64, address: u64, size: u64) -> wire::DmaMap {
    wire::DmaMap {
        argsz: 32,
        flags,
        offset,
        address,
        size,
    }
}

fn map(r: &mut Raw, m: wire::DmaMap, fds: &[BorrowedFd<'_>]) -> RawReply {
    r.call(MAP, &[m.as_bytes()], fds)
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
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

/// Runs the test device's DMA engine (1 = write `seed+i` to guest memory); returns its status.
fn device_dma_write(r: &mut Raw, iova: u64, len: u32, seed: u8) -> u32 {
    bar0_write(r, reg::DMA_ADDR, &iova.to_le_bytes());
    bar0_write(r, reg::DMA_LEN, &len.to_le_bytes());
    bar0_write(r, reg::DMA_SEED, &[seed]);
    bar0_write(r, reg::DMA_CMD, &1u32.to_le_bytes());
    let a = wire::RegionAccess {
        offset: reg::DMA_STATUS,
        region: 0,
        count: 4,
    };
    umdev_tests::poll_dma_status(|| {
        let reply = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
        u32::from_le_bytes(reply.body[16..20].try_into().unwrap())
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
fn fd_backed_map_is_accepted_and_device_dma_lands_in_the_file() {
    let (_s, mut r) = setup();
    let mem = memfd(0x10000);
    let reply = map(&mut r, req(RW, 0, 0x10_0000, 0x10000), &[mem.as_fd()]);
    assert_eq!(reply.errno(), None);
    assert!(reply.body.is_empty(), "DMA_MAP has no reply payload");
    assert_eq!(device_dma_write(&mut r, 0x10_0000 + 0x40, 32, 3), 0);
    let mut got = [0u8; 32];
    rustix::io::pread(&mem, &mut got, 0x40).unwrap();
    assert_eq!(got.to_vec(), pattern(3, 32));
}

#[test]
fn file_offset_shifts_where_the_mapping_starts_in_the_file() {
    let (_s, mut r) = setup();
    let mem = memfd(0x3000);
    let reply = map(&mut r, req(RW, 0x2000, 0x4000, 0x1000), &[mem.as_fd()]);
    assert_eq!(reply.errno(), None);
    assert_eq!(device_dma_write(&mut r, 0x4000, 8, 9), 0);
    let mut got = [0u8; 8];
    rustix::io::pread(&mem, &mut got, 0x2000).unwrap();
    assert_eq!(got.to_vec(), pattern(9, 8));
}

#[test]
fn unaligned_iova_and_size_are_accepted() {
    let (_s, mut r) = setup();
    let mem = memfd(0x2000);
    let reply = map(&mut r, req(RW, 0, 0x1234, 0x1001), &[mem.as_fd()]);
    assert_eq!(reply.errno(), None);
    assert_eq!(device_dma_write(&mut r, 0x1234, 4, 1), 0);
}

#[test]
fn fd_less_map_is_accepted() {
    let (_s, mut r) = setup();
    assert_eq!(
        map(&mut r, req(RW, 0, 0x2000_0000, 0x1000), &[]).errno(),
        None
    );
    r.assert_usable();
}

#[test]
fn adjacent_maps_are_accepted() {
    let (_s, mut r) = setup();
    assert_eq!(map(&mut r, req(RW, 0, 0x1000, 0x1000), &[]).errno(), None);
    assert_eq!(map(&mut r, req(RW, 0, 0x2000, 0x1000), &[]).errno(), None);
    assert_eq!(map(&mut r, req(RW, 0, 0, 0x1000), &[]).errno(), None);
}

#[test]
fn partly_overlapping_map_is_eexist() {
    let (_s, mut r) = setup();
    assert_eq!(map(&mut r, req(RW, 0, 0x1000, 0x2000), &[]).errno(), None);
    let reply = map(&mut r, req(RW, 0, 0x2000, 0x2000), &[]);
    assert_refused(&mut r, &reply, errno::EEXIST);
}

#[test]
fn identical_map_twice_is_eexist() {
    let (_s, mut r) = setup();
    let mem = memfd(0x1000);
    let m = req(RW, 0, 0x1000, 0x1000);
    assert_eq!(map(&mut r, m, &[mem.as_fd()]).errno(), None);
    let reply = map(&mut r, m, &[mem.as_fd()]);
    assert_refused(&mut r, &reply, errno::EEXIST);
}

#[test]
fn map_inside_an_existing_map_is_eexist() {
    let (_s, mut r) = setup();
    assert_eq!(map(&mut r, req(RW, 0, 0x1000, 0x4000), &[]).errno(), None);
    let reply = map(&mut r, req(RW, 0, 0x2000, 0x1000), &[]);
    assert_refused(&mut r, &reply, errno::EEXIST);
}

#[test]
fn map_covering_an_existing_map_is_eexist() {
    let (_s, mut r) = setup();
    assert_eq!(map(&mut r, req(RW, 0, 0x2000, 0x1000), &[]).errno(), None);
    let reply = map(&mut r, req(RW, 0, 0x1000, 0x4000), &[]);
    assert_refused(&mut r, &reply, errno::EEXIST);
}

#[test]
fn size_zero_is_einval() {
    let (_s, mut r) = setup();
    let reply = map(&mut r, req(RW, 0, 0x1000, 0), &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn address_plus_size_overflow_is_einval() {
    let (_s, mut r) = setup();
    let reply = map(&mut r, req(RW, 0, u64::MAX - 0xfff, 0x2000), &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn unknown_flags_are_einval() {
    let (_s, mut r) = setup();
    let reply = map(&mut r, req(RW | 1 << 2, 0, 0x1000, 0x1000), &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn no_permission_at_all_is_einval() {
    let (_s, mut r) = setup();
    let reply = map(&mut r, req(0, 0, 0x1000, 0x1000), &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn two_fds_are_einval() {
    let (_s, mut r) = setup();
    let (a, b) = (memfd(0x1000), memfd(0x1000));
    let reply = map(&mut r, req(RW, 0, 0x1000, 0x1000), &[a.as_fd(), b.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn argsz_below_32_is_einval() {
    let (_s, mut r) = setup();
    let mut m = req(RW, 0, 0x1000, 0x1000);
    m.argsz = 31;
    let reply = map(&mut r, m, &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let m = req(RW, 0, 0x1000, 0x1000);
    let reply = r.call(MAP, &[&m.as_bytes()[..24]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn unaligned_file_offset_is_einval() {
    let (_s, mut r) = setup();
    let mem = memfd(0x2000);
    let reply = map(&mut r, req(RW, 0x10, 0x1000, 0x1000), &[mem.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn map_reaching_past_the_end_of_the_memfd_is_einval() {
    let (_s, mut r) = setup();
    let mem = memfd(0x1000);
    let reply = map(&mut r, req(RW, 0, 0x1000, 0x2000), &[mem.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn file_offset_beyond_off_t_is_einval() {
    let (_s, mut r) = setup();
    let mem = memfd(0x1000);
    let reply = map(
        &mut r,
        req(RW, 0x7fff_ffff_ffff_f000, 0x1000, 0x2000),
        &[mem.as_fd()],
    );
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_that_cannot_be_mmapped_gets_the_mmap_errno() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = map(&mut r, req(RW, 0, 0x1000, 0x1000), &[e.as_fd()]);
    assert_refused(&mut r, &reply, Errno::NODEV.raw_os_error());
}

#[test]
fn more_than_max_dma_maps_is_enospc() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    let caps = br#"{"capabilities":{"max_dma_maps":4}}"#;
    let mut data = caps.to_vec();
    data.push(0);
    assert_eq!(r.version(0, 0, &data).errno(), None);
    for i in 0..4u64 {
        let reply = map(&mut r, req(RW, 0, 0x1000 * (i + 1), 0x1000), &[]);
        assert_eq!(reply.errno(), None, "map {i}");
    }
    let reply = map(&mut r, req(RW, 0, 0x10_0000, 0x1000), &[]);
    assert_refused(&mut r, &reply, errno::ENOSPC);
}

#[test]
fn an_unmap_frees_a_slot_for_the_next_map() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_eq!(
        r.version(0, 0, b"{\"capabilities\":{\"max_dma_maps\":1}}\0")
            .errno(),
        None
    );
    assert_eq!(map(&mut r, req(RW, 0, 0x1000, 0x1000), &[]).errno(), None);
    assert_eq!(
        map(&mut r, req(RW, 0, 0x2000, 0x1000), &[]).errno(),
        Some(errno::ENOSPC)
    );
    let u = wire::DmaUnmap {
        argsz: 24,
        flags: 0,
        address: 0x1000,
        size: 0x1000,
    };
    let reply = r.call(Command::DmaUnmap as u16, &[u.as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    assert_eq!(map(&mut r, req(RW, 0, 0x2000, 0x1000), &[]).errno(), None);
}

#[test]
fn a_refused_map_leaves_no_mapping_behind() {
    let (_s, mut r) = setup();
    let mem = memfd(0x1000);
    let reply = map(&mut r, req(RW, 0, 0x1000, 0x2000), &[mem.as_fd()]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    assert_eq!(device_dma_write(&mut r, 0x1000, 4, 0), 14);
    assert_eq!(
        map(&mut r, req(RW, 0, 0x1000, 0x1000), &[mem.as_fd()]).errno(),
        None
    );
}

#[test]
fn read_only_mapping_refuses_device_writes_with_eperm() {
    let (_s, mut r) = setup();
    let mem = memfd(0x1000);
    let m = req(wire::DMA_MAP_FLAG_READ, 0, 0x1000, 0x1000);
    assert_eq!(map(&mut r, m, &[mem.as_fd()]).errno(), None);
    assert_eq!(device_dma_write(&mut r, 0x1000, 4, 0), 1);
    let mut got = [0xffu8; 4];
    rustix::io::pread(&mem, &mut got, 0).unwrap();
    assert_eq!(got, [0; 4], "a refused DMA writes nothing");
}
