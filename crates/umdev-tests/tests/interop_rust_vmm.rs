//! Interop: the rust-vmm `vfio_user` crate's `Client` (0.1.7, which speaks version 0.1)
//! drives umdev's server and test device over a real socket.
//!
//! That client does not look at error replies (it reads the success layout regardless), so
//! only requests that must succeed are sent; error paths are in the conformance tests.
//! Every test runs under a watchdog, since a desynchronised client would block forever.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use umdev_proto::wire;
use umdev_tests::device::{reg, BAR2_AREAS, BAR2_SIZE, TEST_DEVICE, TEST_VENDOR};
use umdev_tests::{Efd, TestServer};
use vfio_user::Client;

const RW: u32 = wire::REGION_INFO_FLAG_READ | wire::REGION_INFO_FLAG_WRITE;

/// Runs `f` on its own thread and fails the test if it takes longer than 20 s.
fn with_watchdog(f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = t.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("the rust-vmm client hung"),
    }
}

fn connect(s: &TestServer) -> Client {
    Client::new(&s.path).unwrap()
}

fn write32(c: &mut Client, offset: u64, v: u32) {
    c.region_write(0, offset, &v.to_le_bytes()).unwrap();
}

fn read32(c: &mut Client, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Runs the test device's DMA engine; returns its status register.
fn device_dma(c: &mut Client, iova: u64, len: u32, seed: u8, cmd: u32) -> u32 {
    c.region_write(0, reg::DMA_ADDR, &iova.to_le_bytes())
        .unwrap();
    write32(c, reg::DMA_LEN, len);
    c.region_write(0, reg::DMA_SEED, &[seed]).unwrap();
    write32(c, reg::DMA_CMD, cmd);
    umdev_tests::poll_dma_status(|| read32(c, reg::DMA_STATUS))
}

fn memfd(size: u64) -> std::fs::File {
    std::fs::File::from(umdev_tests::guest_memfd(size))
}

/// Our own client, attaching once the rust-vmm one is gone.
fn our_client(s: &TestServer) -> umdev_client::Client {
    umdev_client::Client::connect(&s.path).unwrap()
}

#[test]
fn connects_with_version_0_1_and_sees_nine_regions() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let c = connect(&s);
        for index in 0..9 {
            assert_eq!(c.region(index).unwrap().index, index);
        }
        assert!(c.region(9).is_none());
    });
}

#[test]
fn irq_info_covers_the_five_irq_types() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let counts: Vec<u32> = (0..5).map(|i| c.get_irq_info(i).unwrap().count).collect();
        assert_eq!(counts, vec![1, 4, 8, 1, 1]);
        let msix = c.get_irq_info(2).unwrap();
        assert_eq!(msix.index, 2);
        assert_ne!(msix.flags & wire::IRQ_INFO_EVENTFD, 0);
    });
}

#[test]
fn bar0_region_info_is_4k_read_write_without_fd() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let c = connect(&s);
        let bar0 = c.region(0).unwrap();
        assert_eq!((bar0.size, bar0.flags), (4096, RW));
        assert!(bar0.file_offset.is_none());
        assert!(bar0.sparse_areas.is_empty());
    });
}

#[test]
fn bar2_region_info_has_the_fd_and_the_sparse_areas() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let c = connect(&s);
        let bar2 = c.region(2).unwrap();
        assert_eq!(bar2.size, BAR2_SIZE);
        assert_eq!(
            bar2.flags,
            RW | wire::REGION_INFO_FLAG_MMAP | wire::REGION_INFO_FLAG_CAPS
        );
        assert_eq!(bar2.file_offset.as_ref().unwrap().start(), 0);
        let areas: Vec<(u64, u64)> = bar2
            .sparse_areas
            .iter()
            .map(|a| (a.offset, a.size))
            .collect();
        assert_eq!(areas, BAR2_AREAS.to_vec());
    });
}

#[test]
fn bar2_fd_shares_memory_with_the_region() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let file = c.region(2).unwrap().file_offset.as_ref().unwrap().file();
        file.write_all_at(b"via the fd", 0x8000).unwrap();
        let mut back = [0u8; 10];
        c.region_read(2, 0x8000, &mut back).unwrap();
        assert_eq!(&back, b"via the fd");
    });
}

#[test]
fn config_space_shows_the_vendor_and_device_ids() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let mut ids = [0u8; 4];
        c.region_read(7, 0, &mut ids).unwrap();
        assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), TEST_VENDOR);
        assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), TEST_DEVICE);
    });
}

#[test]
fn bar0_scratch_reads_back_what_was_written() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        c.region_write(0, 0x20, b"rust-vmm wrote this").unwrap();
        let mut back = [0u8; 19];
        c.region_read(0, 0x20, &mut back).unwrap();
        assert_eq!(&back, b"rust-vmm wrote this");
    });
}

#[test]
fn dma_map_of_a_memfd_lets_the_device_write_into_it() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let mem = memfd(1 << 20);
        c.dma_map(0, 0x10_0000, 1 << 20, mem.as_raw_fd()).unwrap();
        assert_eq!(device_dma(&mut c, 0x10_0000 + 0x300, 64, 11, 1), 0);
        let mut got = [0u8; 64];
        mem.read_exact_at(&mut got, 0x300).unwrap();
        let want: Vec<u8> = (0..64u8).map(|i| 11u8.wrapping_add(i)).collect();
        assert_eq!(got.to_vec(), want);
    });
}

#[test]
fn dma_map_of_a_memfd_lets_the_device_read_from_it() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let mem = memfd(0x4000);
        c.dma_map(0x1000, 0x8000_0000, 0x2000, mem.as_raw_fd())
            .unwrap();
        mem.write_all_at(b"guest bytes", 0x1800).unwrap();
        assert_eq!(device_dma(&mut c, 0x8000_0800, 11, 0, 2), 0);
        let mut buf = [0u8; 11];
        c.region_read(0, reg::DMA_BUF, &mut buf).unwrap();
        assert_eq!(&buf, b"guest bytes");
    });
}

#[test]
fn dma_unmap_takes_the_memory_away_from_the_device() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let mem = memfd(0x1000);
        c.dma_map(0, 0x4000, 0x1000, mem.as_raw_fd()).unwrap();
        assert_eq!(device_dma(&mut c, 0x4000, 8, 0, 1), 0);
        c.dma_unmap(0x4000, 0x1000).unwrap();
        assert_eq!(device_dma(&mut c, 0x4000, 8, 0, 1), 14);
    });
}

#[test]
fn msix_eventfds_set_through_set_irqs_deliver_device_interrupts() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let efds: Vec<Efd> = (0..8).map(|_| Efd::new()).collect();
        let raw: Vec<_> = efds.iter().map(|e| e.as_fd().as_raw_fd()).collect();
        let flags = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER;
        c.set_irqs(2, flags, 0, 8, &raw).unwrap();
        write32(&mut c, reg::IRQ_VECTOR, 6);
        write32(&mut c, reg::IRQ_CMD, 3);
        let fired: Vec<bool> = efds.iter().map(|e| e.read().is_some()).collect();
        assert_eq!(
            fired,
            vec![false, false, false, false, false, false, true, false]
        );
    });
}

#[test]
fn intx_eventfd_set_through_set_irqs_delivers_the_line() {
    let s = TestServer::test_device();
    with_watchdog(move || {
        let mut c = connect(&s);
        let e = Efd::new();
        let flags = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER;
        c.set_irqs(0, flags, 0, 1, &[e.as_fd().as_raw_fd()])
            .unwrap();
        write32(&mut c, reg::IRQ_CMD, 1);
        assert_eq!(e.read(), Some(1));
    });
}

#[test]
fn reset_runs_the_devices_reset() {
    let s = std::sync::Arc::new(TestServer::test_device());
    let s2 = s.clone();
    with_watchdog(move || {
        let mut c = connect(&s2);
        c.region_write(0, 0, b"dirty").unwrap();
        c.reset().unwrap();
        let mut back = [0xffu8; 5];
        c.region_read(0, 0, &mut back).unwrap();
        assert_eq!(back, [0; 5]);
    });
    assert_eq!(s.observed().resets.load(Ordering::SeqCst), 1);
}

#[test]
fn after_it_disconnects_our_own_client_is_served_and_sees_its_state() {
    let s = std::sync::Arc::new(TestServer::test_device());
    let s2 = s.clone();
    with_watchdog(move || {
        let mut c = connect(&s2);
        c.region_write(0, 0x40, b"left behind").unwrap();
        c.shutdown().unwrap();
    });
    let mut ours = our_client(&s);
    let mut back = [0u8; 11];
    ours.region_read(0, 0x40, &mut back).unwrap();
    assert_eq!(&back, b"left behind", "device state survives the client");
    assert_eq!(s.observed().closes.load(Ordering::SeqCst), 1);
}

#[test]
fn a_whole_session_of_a_vmm_works_end_to_end() {
    let s = std::sync::Arc::new(TestServer::test_device());
    let s2 = s.clone();
    with_watchdog(move || {
        let mut c = connect(&s2);
        assert_eq!(c.region(7).unwrap().size, 4096);
        let mem = memfd(0x10000);
        c.dma_map(0, 0x100_0000, 0x10000, mem.as_raw_fd()).unwrap();
        let e = Efd::new();
        let flags = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER;
        c.set_irqs(1, flags, 0, 1, &[e.as_fd().as_raw_fd()])
            .unwrap();
        assert_eq!(device_dma(&mut c, 0x100_0000, 16, 1, 1), 0);
        write32(&mut c, reg::IRQ_VECTOR, 0);
        write32(&mut c, reg::IRQ_CMD, 2);
        assert_eq!(e.read(), Some(1), "MSI vector 0 fired");
        let mut got = [0u8; 16];
        mem.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got[15], 16);
        c.reset().unwrap();
        c.dma_unmap(0x100_0000, 0x10000).unwrap();
        c.shutdown().unwrap();
    });
    our_client(&s).region_write(0, 0, b"next").unwrap();
}
