//! Conformance: VFIO_USER_DMA_UNMAP, over raw wire.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;

use umdev_proto::{wire, Command};
use umdev_tests::device::reg;
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::{FromBytes, IntoBytes};

const UNMAP: u16 = Command::DmaUnmap as u16;
const RW: u32 = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;

use umdev_tests::negotiated_test_device as setup;

use umdev_tests::guest_memfd as memfd;

/// Maps `[address, address + size)` backed by a fresh memfd (kept by the server).
fn map(r: &mut Raw, address: u64, size: u64) {
    let mem = memfd(size);
    let m = wire::DmaMap {
        argsz: 32,
        flags: RW,
        offset: 0,
        address,
        size,
    };
    let reply = r.call(Command::DmaMap as u16, &[m.as_bytes()], &[mem.as_fd()]);
    assert_eq!(reply.errno(), None);
}

fn req(flags: u32, address: u64, size: u64) -> wire::DmaUnmap {
    wire::DmaUnmap {
        argsz: 24,
        flags,
        address,
        size,
    }
}

fn unmap(r: &mut Raw, u: wire::DmaUnmap) -> RawReply {
    r.call(UNMAP, &[u.as_bytes()], &[])
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

/// Has the test device write 8 bytes of guest memory at `iova`; returns its DMA status.
fn device_dma_write(r: &mut Raw, iova: u64) -> u32 {
    bar0_write(r, reg::DMA_ADDR, &iova.to_le_bytes());
    bar0_write(r, reg::DMA_LEN, &8u32.to_le_bytes());
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

#[test]
fn unmap_of_an_exact_mapping_succeeds() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x2000);
    assert_eq!(unmap(&mut r, req(0, 0x1000, 0x2000)).errno(), None);
}

#[test]
fn reply_echoes_the_request() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x2000);
    let reply = unmap(&mut r, req(0, 0x1000, 0x2000));
    let (got, rest) = wire::DmaUnmap::read_from_prefix(&reply.body).unwrap();
    assert!(rest.is_empty());
    assert_eq!(got, req(0, 0x1000, 0x2000));
}

#[test]
fn unmapping_what_was_never_mapped_is_enoent() {
    let (_s, mut r) = setup();
    let reply = unmap(&mut r, req(0, 0x1000, 0x1000));
    assert_refused(&mut r, &reply, errno::ENOENT);
}

#[test]
fn unmapping_part_of_a_mapping_is_enoent() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x3000);
    let reply = unmap(&mut r, req(0, 0x2000, 0x1000));
    assert_refused(&mut r, &reply, errno::ENOENT);
    assert_eq!(device_dma_write(&mut r, 0x2000), 0, "the mapping is intact");
}

#[test]
fn unmapping_a_prefix_of_a_mapping_is_enoent() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x3000);
    let reply = unmap(&mut r, req(0, 0x1000, 0x1000));
    assert_refused(&mut r, &reply, errno::ENOENT);
}

#[test]
fn unmapping_a_range_covering_two_mappings_is_enoent() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    map(&mut r, 0x2000, 0x1000);
    let reply = unmap(&mut r, req(0, 0x1000, 0x2000));
    assert_refused(&mut r, &reply, errno::ENOENT);
}

#[test]
fn unmapping_twice_is_enoent_the_second_time() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    assert_eq!(unmap(&mut r, req(0, 0x1000, 0x1000)).errno(), None);
    let reply = unmap(&mut r, req(0, 0x1000, 0x1000));
    assert_refused(&mut r, &reply, errno::ENOENT);
}

#[test]
fn size_zero_is_einval() {
    let (_s, mut r) = setup();
    let reply = unmap(&mut r, req(0, 0x1000, 0));
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn unmap_all_with_an_address_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let reply = unmap(&mut r, req(wire::DMA_UNMAP_FLAG_ALL, 0x1000, 0));
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn unmap_all_with_a_size_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let reply = unmap(&mut r, req(wire::DMA_UNMAP_FLAG_ALL, 0, 0x1000));
    assert_refused(&mut r, &reply, errno::EINVAL);
    assert_eq!(device_dma_write(&mut r, 0x1000), 0, "nothing was unmapped");
}

#[test]
fn unmap_all_removes_every_mapping() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    map(&mut r, 0x10_0000, 0x2000);
    let reply = unmap(&mut r, req(wire::DMA_UNMAP_FLAG_ALL, 0, 0));
    assert_eq!(reply.errno(), None);
    assert_eq!(device_dma_write(&mut r, 0x1000), 14);
    assert_eq!(device_dma_write(&mut r, 0x10_0000), 14);
    let again = unmap(&mut r, req(0, 0x1000, 0x1000));
    assert_eq!(again.errno(), Some(errno::ENOENT));
}

#[test]
fn unmap_all_with_nothing_mapped_succeeds() {
    let (_s, mut r) = setup();
    let reply = unmap(&mut r, req(wire::DMA_UNMAP_FLAG_ALL, 0, 0));
    assert_eq!(reply.errno(), None);
}

/// Changed by the IOMMU layer (issue 4): was ENOTSUP; without DMA_LOGGING_START the kernel's
/// type1 answers a dirty-bitmap unmap with EINVAL, and so do we.
#[test]
fn get_dirty_bitmap_without_logging_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let bitmap = wire::DmaUnmapBitmap {
        pgsize: 4096,
        size: 8,
    };
    let u = wire::DmaUnmap {
        argsz: 24 + 16 + 8,
        ..req(wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0x1000, 0x1000)
    };
    let reply = r.call(UNMAP, &[u.as_bytes(), bitmap.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
    assert_eq!(device_dma_write(&mut r, 0x1000), 0, "nothing was unmapped");
}

#[test]
fn unmap_all_with_get_dirty_bitmap_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let flags = wire::DMA_UNMAP_FLAG_ALL | wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
    let bitmap = wire::DmaUnmapBitmap {
        pgsize: 4096,
        size: 8,
    };
    let u = wire::DmaUnmap {
        argsz: 24 + 16 + 8,
        ..req(flags, 0, 0)
    };
    let reply = r.call(UNMAP, &[u.as_bytes(), bitmap.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
    assert_eq!(device_dma_write(&mut r, 0x1000), 0, "nothing was unmapped");
}

#[test]
fn unknown_flags_are_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let reply = unmap(&mut r, req(1 << 2, 0x1000, 0x1000));
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn high_unknown_flag_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let reply = unmap(&mut r, req(1 << 31, 0x1000, 0x1000));
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn argsz_below_24_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let u = wire::DmaUnmap {
        argsz: 23,
        ..req(0, 0x1000, 0x1000)
    };
    let reply = unmap(&mut r, u);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let u = req(0, 0x1000, 0x1000);
    let reply = r.call(UNMAP, &[&u.as_bytes()[..16]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_with_unmap_is_einval() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    let e = Efd::new();
    let reply = r.call(UNMAP, &[req(0, 0x1000, 0x1000).as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn after_unmap_device_dma_to_the_range_faults() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    assert_eq!(device_dma_write(&mut r, 0x1000), 0);
    assert_eq!(unmap(&mut r, req(0, 0x1000, 0x1000)).errno(), None);
    assert_eq!(device_dma_write(&mut r, 0x1000), 14);
}

#[test]
fn an_unmapped_range_can_be_mapped_again() {
    let (_s, mut r) = setup();
    map(&mut r, 0x1000, 0x1000);
    assert_eq!(unmap(&mut r, req(0, 0x1000, 0x1000)).errno(), None);
    map(&mut r, 0x1000, 0x1000);
    assert_eq!(device_dma_write(&mut r, 0x1000), 0);
}
