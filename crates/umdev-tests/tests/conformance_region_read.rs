//! Conformance: VFIO_USER_REGION_READ, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::device::{TEST_DEVICE, TEST_VENDOR};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::{FromBytes, IntoBytes};

const READ: u16 = Command::RegionRead as u16;
const MAX_XFER: u32 = 1 << 20;

use umdev_tests::negotiated_test_device as setup;

fn access(region: u32, offset: u64, count: u32) -> wire::RegionAccess {
    wire::RegionAccess {
        offset,
        region,
        count,
    }
}

fn read(r: &mut Raw, region: u32, offset: u64, count: u32) -> RawReply {
    r.call(READ, &[access(region, offset, count).as_bytes()], &[])
}

/// The data of a successful read.
fn data(r: &mut Raw, region: u32, offset: u64, count: u32) -> Vec<u8> {
    let reply = read(r, region, offset, count);
    assert_eq!(reply.errno(), None, "{:?}", reply.header);
    reply.body[16..].to_vec()
}

fn write(r: &mut Raw, region: u32, offset: u64, bytes: &[u8]) {
    let a = access(region, offset, u32::try_from(bytes.len()).unwrap());
    let reply = r.call(Command::RegionWrite as u16, &[a.as_bytes(), bytes], &[]);
    assert_eq!(reply.errno(), None);
}

fn refused(region: u32, offset: u64, count: u32, want: i32) {
    let (s, mut r) = setup();
    let before = s.observed().accesses.lock().unwrap().len();
    let reply = read(&mut r, region, offset, count);
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    assert_eq!(s.observed().accesses.lock().unwrap().len(), before);
    r.assert_usable();
}

#[test]
fn reads_back_what_was_written() {
    let (_s, mut r) = setup();
    write(&mut r, 0, 0x20, b"scratch!");
    assert_eq!(data(&mut r, 0, 0x20, 8), b"scratch!");
}

#[test]
fn reply_echoes_the_request_then_count_bytes() {
    let (_s, mut r) = setup();
    let reply = read(&mut r, 0, 0x30, 12);
    let (head, rest) = wire::RegionAccess::read_from_prefix(&reply.body).unwrap();
    assert_eq!(head, access(0, 0x30, 12));
    assert_eq!(rest.len(), 12);
}

#[test]
fn zero_length_read_succeeds_with_no_data() {
    let (_s, mut r) = setup();
    let reply = read(&mut r, 0, 0x10, 0);
    assert_eq!(reply.errno(), None);
    assert_eq!(reply.body, access(0, 0x10, 0).as_bytes());
}

#[test]
fn region_index_9_is_einval() {
    refused(9, 0, 4, errno::EINVAL);
}

#[test]
fn region_index_u32_max_is_einval() {
    refused(u32::MAX, 0, 4, errno::EINVAL);
}

#[test]
fn offset_plus_count_past_the_region_is_einval() {
    refused(0, 4093, 4, errno::EINVAL);
}

#[test]
fn offset_at_the_end_of_the_region_is_einval() {
    refused(0, 4096, 1, errno::EINVAL);
}

#[test]
fn offset_near_u64_max_is_einval() {
    refused(0, u64::MAX - 1, 4, errno::EINVAL);
}

#[test]
fn count_above_max_data_xfer_size_is_e2big() {
    refused(2, 0, MAX_XFER + 1, errno::E2BIG);
}

#[test]
fn count_of_max_data_xfer_size_past_a_small_region_is_einval() {
    refused(0, 0, MAX_XFER, errno::EINVAL);
}

#[test]
fn rom_is_einval() {
    refused(6, 0, 4, errno::EINVAL);
}

#[test]
fn vga_is_einval() {
    refused(8, 0, 4, errno::EINVAL);
}

#[test]
fn absent_bar3_is_einval() {
    refused(3, 0, 4, errno::EINVAL);
}

#[test]
fn absent_bar5_is_einval() {
    refused(5, 0, 4, errno::EINVAL);
}

#[test]
fn config_space_starts_with_the_vendor_and_device_ids() {
    let (_s, mut r) = setup();
    let ids = data(&mut r, 7, 0, 4);
    assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), TEST_VENDOR);
    assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), TEST_DEVICE);
}

#[test]
fn config_space_is_4096_bytes() {
    let (_s, mut r) = setup();
    assert_eq!(data(&mut r, 7, 0, 4096).len(), 4096);
    assert_eq!(data(&mut r, 7, 4092, 4).len(), 4);
}

#[test]
fn config_read_past_4096_is_einval() {
    refused(7, 4095, 2, errno::EINVAL);
}

#[test]
fn a_140_byte_read_reaches_the_device_as_one_access() {
    let (s, mut r) = setup();
    data(&mut r, 0, 3, 140);
    let acc = s.observed().accesses.lock().unwrap().clone();
    assert_eq!(acc, vec![(0, 3, 140, false)]);
}

#[test]
fn whole_bar2_reads_in_one_message() {
    let (_s, mut r) = setup();
    write(&mut r, 2, 0xfff0, b"end of bar2");
    let all = data(&mut r, 2, 0, 65536);
    assert_eq!(&all[0xfff0..0xfffb], b"end of bar2");
}

#[test]
fn io_bar1_is_readable() {
    let (_s, mut r) = setup();
    write(&mut r, 1, 12, b"io!!");
    assert_eq!(data(&mut r, 1, 12, 4), b"io!!");
}

#[test]
fn msix_table_reads_are_served_without_the_device() {
    let (s, mut r) = setup();
    assert_eq!(data(&mut r, 4, 0, 128).len(), 128);
    assert!(s.observed().accesses.lock().unwrap().is_empty());
}

#[test]
fn a_read_straddling_the_msix_table_is_einval() {
    refused(4, 0x7c, 8, errno::EINVAL);
}

#[test]
fn a_read_straddling_the_pba_is_einval() {
    refused(4, 0x1000, 16, errno::EINVAL);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(READ, &[&access(0, 0, 4).as_bytes()[..12]], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}

#[test]
fn an_fd_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(READ, &[access(0, 0, 4).as_bytes()], &[e.as_fd()]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}
