//! Conformance: VFIO_USER_REGION_WRITE, over raw wire.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::device::{TEST_DEVICE, TEST_VENDOR};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::IntoBytes;

const WRITE: u16 = Command::RegionWrite as u16;
const MAX_XFER: u32 = 1 << 20;

use umdev_tests::negotiated_test_device as setup;

fn access(region: u32, offset: u64, count: u32) -> wire::RegionAccess {
    wire::RegionAccess {
        offset,
        region,
        count,
    }
}

fn len32(data: &[u8]) -> u32 {
    u32::try_from(data.len()).unwrap()
}

fn write(r: &mut Raw, region: u32, offset: u64, data: &[u8]) -> RawReply {
    let a = access(region, offset, len32(data));
    r.call(WRITE, &[a.as_bytes(), data], &[])
}

fn read(r: &mut Raw, region: u32, offset: u64, count: u32) -> Vec<u8> {
    let a = access(region, offset, count);
    let reply = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    reply.body[16..].to_vec()
}

/// A write that must be refused with `want` and reach nothing.
fn refused(region: u32, offset: u64, count: u32, data: &[u8], want: i32) {
    let (s, mut r) = setup();
    let a = access(region, offset, count);
    let reply = r.call(WRITE, &[a.as_bytes(), data], &[]);
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    assert!(s.observed().accesses.lock().unwrap().is_empty());
    r.assert_usable();
}

#[test]
fn written_data_reads_back() {
    let (_s, mut r) = setup();
    assert_eq!(write(&mut r, 0, 0x40, b"written").errno(), None);
    assert_eq!(read(&mut r, 0, 0x40, 7), b"written");
}

#[test]
fn reply_echoes_the_request_without_data() {
    let (_s, mut r) = setup();
    let reply = write(&mut r, 0, 0x40, b"abcd");
    assert_eq!(reply.body, access(0, 0x40, 4).as_bytes());
}

#[test]
fn zero_length_write_succeeds() {
    let (_s, mut r) = setup();
    let reply = write(&mut r, 0, 0x40, b"");
    assert_eq!(reply.errno(), None);
    assert_eq!(reply.body, access(0, 0x40, 0).as_bytes());
}

#[test]
fn more_data_than_count_is_einval() {
    refused(0, 0, 4, b"12345678", errno::EINVAL);
}

#[test]
fn less_data_than_count_is_einval() {
    refused(0, 0, 8, b"1234", errno::EINVAL);
}

#[test]
fn region_index_9_is_einval() {
    refused(9, 0, 4, b"1234", errno::EINVAL);
}

#[test]
fn region_index_u32_max_is_einval() {
    refused(u32::MAX, 0, 4, b"1234", errno::EINVAL);
}

#[test]
fn offset_plus_count_past_the_region_is_einval() {
    refused(0, 4094, 4, b"1234", errno::EINVAL);
}

#[test]
fn offset_near_u64_max_is_einval() {
    refused(0, u64::MAX - 2, 4, b"1234", errno::EINVAL);
}

#[test]
fn count_above_max_data_xfer_size_is_e2big() {
    let data = vec![0u8; (MAX_XFER + 1) as usize];
    refused(2, 0, MAX_XFER + 1, &data, errno::E2BIG);
}

#[test]
fn count_above_max_data_xfer_size_is_e2big_before_the_length_check() {
    refused(2, 0, u32::MAX, b"1234", errno::E2BIG);
}

#[test]
fn rom_is_einval() {
    refused(6, 0, 4, b"1234", errno::EINVAL);
}

#[test]
fn vga_is_einval() {
    refused(8, 0, 4, b"1234", errno::EINVAL);
}

#[test]
fn absent_bar3_is_einval() {
    refused(3, 0, 4, b"1234", errno::EINVAL);
}

#[test]
fn absent_bar5_is_einval() {
    refused(5, 0, 4, b"1234", errno::EINVAL);
}

#[test]
fn config_write_past_4096_is_einval() {
    refused(7, 4095, 2, b"12", errno::EINVAL);
}

#[test]
fn config_write_at_the_last_dword_succeeds() {
    let (_s, mut r) = setup();
    assert_eq!(write(&mut r, 7, 4092, &[0; 4]).errno(), None);
}

#[test]
fn a_whole_config_space_write_leaves_the_ids_alone() {
    let (_s, mut r) = setup();
    assert_eq!(write(&mut r, 7, 0, &[0xff; 4096]).errno(), None);
    let ids = read(&mut r, 7, 0, 4);
    assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), TEST_VENDOR);
    assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), TEST_DEVICE);
}

#[test]
fn a_140_byte_write_reaches_the_device_as_one_access() {
    let (s, mut r) = setup();
    let data: Vec<u8> = (0..140u8).collect();
    assert_eq!(write(&mut r, 0, 3, &data).errno(), None);
    let acc = s.observed().accesses.lock().unwrap().clone();
    assert_eq!(acc, vec![(0, 3, 140, true)]);
}

#[test]
fn io_bar1_is_writable() {
    let (_s, mut r) = setup();
    assert_eq!(write(&mut r, 1, 0, &[1; 16]).errno(), None);
    assert_eq!(read(&mut r, 1, 0, 16), vec![1; 16]);
}

#[test]
fn a_write_straddling_the_msix_table_is_einval() {
    refused(4, 0x78, 16, &[0; 16], errno::EINVAL);
}

#[test]
fn msix_table_writes_are_served_without_the_device() {
    let (s, mut r) = setup();
    assert_eq!(
        write(&mut r, 4, 0, &0xfee0_0000u32.to_le_bytes()).errno(),
        None
    );
    assert_eq!(read(&mut r, 4, 0, 4), 0xfee0_0000u32.to_le_bytes());
    assert!(s.observed().accesses.lock().unwrap().is_empty());
}

#[test]
fn pba_writes_are_ignored() {
    let (_s, mut r) = setup();
    assert_eq!(write(&mut r, 4, 0x1000, &[0xff; 8]).errno(), None);
    assert_eq!(read(&mut r, 4, 0x1000, 8), vec![0; 8]);
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(WRITE, &[&access(0, 0, 0).as_bytes()[..12]], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}

#[test]
fn an_fd_is_einval_and_nothing_is_written() {
    let (s, mut r) = setup();
    let e = Efd::new();
    let a = access(0, 0, 4);
    let reply = r.call(WRITE, &[a.as_bytes(), b"fdfd"], &[e.as_fd()]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    assert!(s.observed().accesses.lock().unwrap().is_empty());
    assert_eq!(read(&mut r, 0, 0, 4), vec![0; 4]);
}
