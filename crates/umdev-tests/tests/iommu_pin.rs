//! The IOMMU layer over a real socket: the test device pins, writes through its pins and
//! unpins guest memory, and every refusal comes back as the errno of its DMA status.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::sync::Arc;

use umdev_dma::AddressSpace;
use umdev_proto::wire;
use umdev_server::{LockedMemory, ServerConfig};
use umdev_tests::cmd::{self, map_memfd, pattern, PAGE};
use umdev_tests::TestServer;

const EIO: u32 = 5;
const E2BIG: u32 = 7;
const ENOMEM: u32 = 12;
const EINVAL: u32 = 22;
const R: u32 = 1;
const W: u32 = 2;
const RW: u32 = 3;
const BASE: u64 = 0x10_0000;

/// A server whose clients may lock `pages` pages.
fn server(pages: u64) -> TestServer {
    TestServer::test_device_with(ServerConfig {
        locked_memory: LockedMemory::with_limit(pages * PAGE),
        ..ServerConfig::default()
    })
}

fn space(s: &TestServer) -> Arc<AddressSpace> {
    s.observed().space.lock().unwrap().clone().unwrap()
}

#[test]
fn a_write_through_a_pin_reaches_the_clients_memory() {
    let s = server(1024);
    let mut c = s.client();
    let mem = map_memfd(&mut c, BASE, 1 << 20, true);
    assert_eq!(cmd::pin(&mut c, BASE + PAGE, 2, RW), 0);
    assert_eq!(space(&s).client().locked_bytes(), 2 * PAGE);
    // 32 bytes across the boundary of the two pinned pages.
    assert_eq!(cmd::pinned_write(&mut c, BASE + 2 * PAGE - 16, 32, 9), 0);
    let mut got = [0u8; 32];
    rustix::io::pread(&mem, &mut got, 2 * PAGE - 16).unwrap();
    assert_eq!(&got[..], &pattern(32, 9)[..]);
    assert_eq!(cmd::unpin(&mut c, BASE + PAGE, 2), 0);
    assert_eq!(space(&s).client().locked_bytes(), 0);
    assert_eq!(space(&s).pinned_pages(), 0);
}

#[test]
fn pin_of_an_unmapped_range_is_einval() {
    let s = server(1024);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 2 * PAGE, true);
    assert_eq!(cmd::pin(&mut c, 0x5000, 1, R), EINVAL);
    assert_eq!(
        cmd::pin(&mut c, BASE, 3, R),
        EINVAL,
        "past the mapping's end"
    );
    assert_eq!(space(&s).pinned_pages(), 0, "all or nothing");
}

#[test]
fn pin_for_write_of_a_read_only_range_is_einval() {
    let s = server(1024);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 4 * PAGE, false);
    assert_eq!(cmd::pin(&mut c, BASE, 1, W), EINVAL);
    assert_eq!(cmd::pin(&mut c, BASE, 1, RW), EINVAL);
    assert_eq!(cmd::pin(&mut c, BASE, 1, R), 0);
    assert_eq!(
        cmd::pinned_write(&mut c, BASE, 8, 1),
        14,
        "no writable pin to write through"
    );
}

#[test]
fn pin_of_a_message_backed_range_is_einval() {
    let s = server(1024);
    let mut c = s.client();
    let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
    c.dma_map(BASE, 4 * PAGE, rw, None).unwrap();
    assert_eq!(cmd::pin(&mut c, BASE, 1, R), EINVAL);
}

#[test]
fn unaligned_or_empty_pin_is_einval() {
    let s = server(1024);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 4 * PAGE, true);
    assert_eq!(cmd::pin(&mut c, BASE + 8, 1, R), EINVAL);
    assert_eq!(cmd::pin(&mut c, BASE, 0, R), EINVAL);
    assert_eq!(cmd::pin(&mut c, BASE, 1, 0), EINVAL, "no access asked for");
}

#[test]
fn more_than_512_pages_in_one_call_is_e2big() {
    let s = server(4096);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 4 << 20, true);
    assert_eq!(cmd::pin(&mut c, BASE, 513, R), E2BIG);
    assert_eq!(cmd::unpin(&mut c, BASE, 513), E2BIG);
    assert_eq!(cmd::pin(&mut c, BASE, 512, R), 0);
    assert_eq!(space(&s).pinned_pages(), 512);
    assert_eq!(cmd::unpin(&mut c, BASE, 512), 0);
}

#[test]
fn pin_past_the_budget_is_enomem_and_charges_nothing() {
    let s = server(4);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 1 << 20, true);
    assert_eq!(cmd::pin(&mut c, BASE, 3, R), 0);
    // Two more pages, one already pinned: one new page is charged... and two are asked.
    assert_eq!(cmd::pin(&mut c, BASE + 2 * PAGE, 3, R), ENOMEM);
    assert_eq!(
        space(&s).client().locked_bytes(),
        3 * PAGE,
        "the refused call undid itself"
    );
    // Pinning what is pinned already costs nothing.
    assert_eq!(cmd::pin(&mut c, BASE, 3, R), 0);
    assert_eq!(
        cmd::pin(&mut c, BASE + 3 * PAGE, 1, R),
        0,
        "exactly at the budget"
    );
    assert_eq!(cmd::pin(&mut c, BASE + 4 * PAGE, 1, R), ENOMEM);
    assert_eq!(cmd::unpin(&mut c, BASE + 3 * PAGE, 1), 0);
    assert_eq!(cmd::pin(&mut c, BASE + 4 * PAGE, 1, R), 0, "room again");
}

#[test]
fn unpin_of_what_was_never_pinned_is_einval_and_changes_nothing() {
    let s = server(1024);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 1 << 20, true);
    assert_eq!(cmd::pin(&mut c, BASE, 1, R), 0);
    assert_eq!(cmd::unpin(&mut c, BASE + PAGE, 1), EINVAL);
    assert_eq!(
        cmd::unpin(&mut c, BASE, 2),
        EINVAL,
        "the second page is not pinned"
    );
    assert_eq!(cmd::unpin(&mut c, 0x5000, 1), EINVAL, "not even mapped");
    assert_eq!(space(&s).pinned_pages(), 1);
    assert_eq!(cmd::unpin(&mut c, BASE, 1), 0);
}

#[test]
fn a_page_pinned_twice_needs_two_unpins_and_is_charged_once() {
    let s = server(1024);
    let mut c = s.client();
    map_memfd(&mut c, BASE, 1 << 20, true);
    assert_eq!(cmd::pin(&mut c, BASE, 1, R), 0);
    assert_eq!(cmd::pin(&mut c, BASE, 1, RW), 0);
    assert_eq!(space(&s).client().locked_bytes(), PAGE);
    assert_eq!(cmd::unpin(&mut c, BASE, 1), 0);
    assert_eq!(space(&s).pinned_pages(), 1, "one pin left");
    assert_eq!(cmd::unpin(&mut c, BASE, 1), 0);
    assert_eq!(space(&s).pinned_pages(), 0);
    assert_eq!(space(&s).client().locked_bytes(), 0);
    assert_eq!(cmd::unpin(&mut c, BASE, 1), EINVAL);
}

#[test]
fn one_file_mapped_twice_is_mmapped_once_and_its_page_charged_once() {
    let s = server(1024);
    let mut c = s.client();
    let mem = map_memfd(&mut c, BASE, 1 << 20, true);
    // The same file again at another IOVA (as a vIOMMU alias would).
    let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
    c.dma_map(0x4000_0000, 1 << 20, rw, Some((mem.as_fd(), 0)))
        .unwrap();
    c.dma_map(0x5000_0000, PAGE, rw, Some((mem.as_fd(), 8 * PAGE)))
        .unwrap();
    assert_eq!(space(&s).client().mmap_count(), 1);
    assert_eq!(cmd::pin(&mut c, BASE + 8 * PAGE, 1, R), 0);
    assert_eq!(cmd::pin(&mut c, 0x4000_0000 + 8 * PAGE, 1, R), 0);
    assert_eq!(cmd::pin(&mut c, 0x5000_0000, 1, R), 0);
    assert_eq!(space(&s).client().locked_bytes(), PAGE, "one host page");
    for iova in [BASE + 8 * PAGE, 0x4000_0000 + 8 * PAGE, 0x5000_0000] {
        assert_eq!(cmd::unpin(&mut c, iova, 1), 0);
    }
    assert_eq!(space(&s).client().locked_bytes(), 0);
    c.dma_unmap(0, 0, wire::DMA_UNMAP_FLAG_ALL).unwrap();
    assert_eq!(
        space(&s).client().mmap_count(),
        0,
        "munmapped with the last mapping"
    );
}

#[test]
fn a_revoked_device_cannot_pin() {
    let s = TestServer::test_device_with(ServerConfig {
        unpin_timeout: std::time::Duration::from_millis(50),
        ..ServerConfig::default()
    });
    let mut c = s.client();
    map_memfd(&mut c, BASE, 1 << 20, true);
    map_memfd(&mut c, 0x20_0000, 1 << 20, true);
    cmd::unmap_mode(&mut c, 1);
    assert_eq!(cmd::pin(&mut c, BASE, 1, R), 0);
    c.dma_unmap(BASE, 1 << 20, 0).unwrap();
    assert_eq!(cmd::pin(&mut c, 0x20_0000, 1, R), EIO);
}
