//! Unmap forces unpin, over a real socket: DMA_UNMAP of a range the test device pins runs
//! its `dma_unmap` hook, the reply waits for the pins to go, a device that keeps them is
//! revoked after the timeout, and a client that goes takes every pin and mmap with it.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use umdev_dma::{AddressSpace, Pinner};
use umdev_proto::wire;
use umdev_server::ServerConfig;
use umdev_tests::cmd::{self, map_memfd, PAGE};
use umdev_tests::TestServer;

const EIO: u32 = 5;
const EFAULT: u32 = 14;
const RW: u32 = 3;
const BASE: u64 = 0x10_0000;
const SIZE: u64 = 1 << 20;

fn server(timeout: Duration) -> TestServer {
    TestServer::test_device_with(ServerConfig {
        unpin_timeout: timeout,
        ..ServerConfig::default()
    })
}

fn space(s: &TestServer) -> Arc<AddressSpace> {
    s.observed().space.lock().unwrap().clone().unwrap()
}

fn pinner(s: &TestServer) -> Arc<Pinner> {
    s.observed().pinner.lock().unwrap().upgrade().unwrap()
}

fn hooks(s: &TestServer) -> Vec<(u64, u64)> {
    s.observed().unmap_hooks.lock().unwrap().clone()
}

#[test]
fn unmap_while_pinned_runs_the_hook_and_replies_with_the_pins_gone() {
    let s = server(Duration::from_secs(5));
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    assert_eq!(cmd::pin(&mut c, BASE + PAGE, 4, RW), 0);
    let t = Instant::now();
    c.dma_unmap(BASE, SIZE, 0).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the device released at once"
    );
    assert_eq!(hooks(&s), vec![(BASE, SIZE)]);
    assert_eq!(space(&s).pinned_pages(), 0);
    assert_eq!(space(&s).client().locked_bytes(), 0);
    assert_eq!(space(&s).client().mmap_count(), 0);
    assert!(!pinner(&s).is_revoked());
    assert_eq!(cmd::pinned_write(&mut c, BASE + PAGE, 8, 1), EFAULT);
}

#[test]
fn unmap_of_an_unpinned_range_calls_no_hook() {
    let s = server(Duration::from_secs(5));
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    map_memfd(&mut c, 0x20_0000, SIZE, true);
    assert_eq!(cmd::pin(&mut c, 0x20_0000, 1, RW), 0);
    c.dma_unmap(BASE, SIZE, 0).unwrap();
    assert!(hooks(&s).is_empty());
    assert_eq!(space(&s).pinned_pages(), 1, "the other mapping's pin stays");
}

#[test]
fn the_reply_waits_for_a_device_that_releases_late() {
    let s = server(Duration::from_secs(5));
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    cmd::unmap_mode(&mut c, 2); // unpin from another thread 200 ms after the hook
    assert_eq!(cmd::pin(&mut c, BASE, 2, RW), 0);
    let t = Instant::now();
    c.dma_unmap(BASE, SIZE, 0).unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(190), "replied after {took:?}");
    assert!(took < Duration::from_secs(4), "replied after {took:?}");
    assert_eq!(space(&s).pinned_pages(), 0);
    assert!(!pinner(&s).is_revoked(), "released in time");
}

#[test]
fn a_device_that_keeps_its_pins_is_revoked_after_the_timeout() {
    let s = server(Duration::from_millis(300));
    let mut c = s.client();
    let mem = map_memfd(&mut c, BASE, SIZE, true);
    map_memfd(&mut c, 0x20_0000, SIZE, true);
    cmd::unmap_mode(&mut c, 1); // forgets
    assert_eq!(cmd::pin(&mut c, BASE, 2, RW), 0);
    assert_eq!(cmd::pin(&mut c, 0x20_0000, 1, RW), 0);
    let t = Instant::now();
    c.dma_unmap(BASE, SIZE, 0).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(290));
    assert_eq!(hooks(&s), vec![(BASE, SIZE)]);
    assert!(pinner(&s).is_revoked());
    // Every pin of the device is gone and un-charged, in the unmapped range and elsewhere.
    assert_eq!(space(&s).pinned_pages(), 0);
    assert_eq!(space(&s).client().locked_bytes(), 0);
    // Its handles fail: it cannot touch the memory the client took back.
    assert_eq!(cmd::pinned_write(&mut c, BASE, 8, 7), EIO);
    assert_eq!(cmd::pinned_write(&mut c, 0x20_0000, 8, 7), EIO);
    let mut got = [0xffu8; 8];
    rustix::io::pread(&mem, &mut got, 0).unwrap();
    assert_eq!(got, [0; 8], "nothing was written");
    // Copies still work: only pinning is in the error state.
    assert_eq!(cmd::copy_write(&mut c, 0x20_0000, 8, 7), 0);
}

#[test]
fn unmap_all_while_pinned_tells_the_device_for_each_mapping() {
    let s = server(Duration::from_secs(5));
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    map_memfd(&mut c, 0x20_0000, SIZE, true);
    map_memfd(&mut c, 0x30_0000, SIZE, true);
    assert_eq!(cmd::pin(&mut c, BASE, 1, RW), 0);
    assert_eq!(cmd::pin(&mut c, 0x20_0000, 1, RW), 0);
    c.dma_unmap(0, 0, wire::DMA_UNMAP_FLAG_ALL).unwrap();
    let mut h = hooks(&s);
    h.sort_unstable();
    assert_eq!(h, vec![(BASE, SIZE), (0x20_0000, SIZE)]);
    assert_eq!(space(&s).pinned_pages(), 0);
    assert!(space(&s).is_empty());
}

#[test]
fn client_disconnect_while_pinned_releases_every_pin_mmap_and_fd() {
    let s = server(Duration::from_secs(5));
    let mut c = s.client();
    let mem = map_memfd(&mut c, BASE, SIZE, true);
    assert_eq!(cmd::pin(&mut c, BASE, 8, RW), 0);
    assert_eq!(cmd::pin(&mut c, BASE, 8, RW), 0);
    let sp = space(&s);
    assert_eq!(sp.client().locked_bytes(), 8 * PAGE);
    assert_eq!(sp.client().mmap_count(), 1);
    let ino = rustix::fs::fstat(&mem).unwrap().st_ino;
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s
        .observed()
        .closes
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        assert!(Instant::now() < deadline, "the session did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Teardown runs right after close; give it a moment.
    while sp.client().mmap_count() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(sp.pinned_pages(), 0);
    assert_eq!(sp.client().locked_bytes(), 0);
    assert_eq!(sp.client().mmap_count(), 0);
    assert!(sp.is_empty());
    assert!(
        s.observed().pinner.lock().unwrap().upgrade().is_none(),
        "pinner dropped"
    );
    // No fd of this process still refers to the client's memfd but our own.
    let ours = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            std::fs::metadata(&p)
                .ok()
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        })
        .filter(|i| *i == ino)
        .count();
    assert_eq!(ours, 1, "the server closed its copy of the memfd");
}
