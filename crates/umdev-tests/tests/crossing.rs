#![allow(clippy::unwrap_used)]
//! Nothing crosses from one client to the next (issue 12): a client that has gone keeps no
//! access to memory the next client of the same device uses, on every sample that gives a
//! client memory of its own or reaches into the client's, through a real daemon:
//!
//! - the test device's BAR2 (mmap-able): the fd a gone client kept reaches nothing the next
//!   client's device holds, either way;
//! - the test device's DMA and pins: what a gone client pinned is released, and the device's
//!   DMA for the next client (same IOVAs) never lands in the gone client's memory;
//! - mnvme: a controller left enabled by a client that went (rings in its memory, I/O done)
//!   never touches that memory again while the next client does I/O at the same IOVAs;
//! - mbochs' VRAM: `tests/mbochs.rs` (a gone client's mapping reaches nothing of the next
//!   client's screen).
//!
//! mtty and hello give a client no memory and keep none of its own.

mod mdev;

use std::sync::Arc;

use mdev::{new_uuid, Daemon};
use umdev_client::nvme::{op, HostMemory, Nvme, NvmeOptions, Sqe};
use umdev_client::Client;
use umdev_tests::cmd;

fn config() -> String {
    format!(
        "release_timeout_ms = 300\n{}{}",
        mdev::TEST_PARENT,
        mdev::NVME_PARENT
    )
}

fn pread(fd: &std::os::fd::OwnedFd, at: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    rustix::io::pread(fd, &mut b, at).unwrap();
    b
}

#[test]
fn a_gone_clients_bar2_fd_reaches_nothing_of_the_next_clients() {
    let d = Daemon::start_test_daemon(&config());
    let t = new_uuid();
    d.create("test0", "umdevtest-plain", &t).unwrap();
    let kept = {
        let mut a = Client::connect(d.socket(&t)).unwrap();
        let info = a.region_info(2).unwrap();
        let fd = info.fd.expect("BAR2 is mmap-able");
        a.region_write(2, 0x1000, b"from client a").unwrap();
        assert_eq!(pread(&fd, 0x1000, 13), b"from client a");
        fd
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut b = Client::connect(d.socket(&t)).unwrap();
    b.region_write(2, 0x2000, b"secret of b").unwrap();
    assert_eq!(
        pread(&kept, 0x2000, 11),
        vec![0u8; 11],
        "the gone client read the next client's BAR2"
    );
    rustix::io::pwrite(&kept, b"planted by a", 0x3000).unwrap();
    let mut seen = [0u8; 12];
    b.region_read(2, 0x3000, &mut seen).unwrap();
    assert_eq!(
        seen, [0u8; 12],
        "the gone client wrote into the next client's BAR2"
    );
    // What the device holds goes on for the next client (its contents are the device's).
    let mut first = [0u8; 13];
    b.region_read(2, 0x1000, &mut first).unwrap();
    assert_eq!(&first, b"from client a");
}

#[test]
fn a_gone_clients_memory_is_never_reached_by_dma_for_the_next() {
    let d = Daemon::start_test_daemon(&config());
    let t = new_uuid();
    d.create("test0", "umdevtest-plain", &t).unwrap();
    const BASE: u64 = 0x10_0000;
    let mem_a = {
        let mut a = Client::connect(d.socket(&t)).unwrap();
        let mem = cmd::map_memfd(&mut a, BASE, 1 << 20, true);
        assert_eq!(cmd::pin(&mut a, BASE, 4, 3), 0);
        assert_eq!(cmd::pinned_write(&mut a, BASE, 64, 1), 0);
        mem
    };
    let before = pread(&mem_a, 0, 1 << 20);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut b = Client::connect(d.socket(&t)).unwrap();
    let mem_b = cmd::map_memfd(&mut b, BASE, 1 << 20, true);
    assert_eq!(cmd::copy_write(&mut b, BASE, 2048, 7), 0);
    assert_eq!(cmd::pin(&mut b, BASE, 4, 3), 0);
    assert_eq!(cmd::pinned_write(&mut b, BASE + 4096, 64, 9), 0);
    assert!(pread(&mem_b, 0, 2048) == cmd::pattern(2048, 7));
    assert!(pread(&mem_b, 4096, 64) == cmd::pattern(64, 9));
    assert!(
        pread(&mem_a, 0, 1 << 20) == before,
        "DMA for the next client reached the gone client's memory"
    );
}

const QUEUE_IOVA: u64 = 0x1000_0000;
const DATA_IOVA: u64 = 0x4000_0000;

fn nvme(c: Client, q: Arc<HostMemory>) -> Nvme {
    Nvme::enable(c, q, &NvmeOptions::default()).unwrap()
}

fn write_blocks(n: &mut Nvme, data: &HostMemory, lba: u64, seed: u8) {
    let buf = data.alloc(4096, 4096);
    data.write(buf, &cmd::pattern(4096, seed)).unwrap();
    let c = n
        .submit_wait(1, Sqe::rw(op::WRITE, 1, lba, 8, buf, 0))
        .unwrap();
    assert!(c.ok());
}

#[test]
fn an_mnvme_controller_left_by_a_gone_client_never_touches_its_memory_again() {
    let d = Daemon::start_test_daemon(&config());
    let u = new_uuid();
    d.create("nvme0", "mnvme-1g", &u).unwrap();
    let (qa, da) = {
        let mut c = Client::connect(d.socket(&u)).unwrap();
        let q = HostMemory::shared(&mut c, QUEUE_IOVA, 16 << 20).unwrap();
        let data = HostMemory::shared(&mut c, DATA_IOVA, 16 << 20).unwrap();
        let mut n = nvme(c, q.clone());
        for i in 0..16 {
            write_blocks(&mut n, &data, i * 8, 1);
        }
        // Gone without disabling the controller: its rings were in this memory.
        (q, data)
    };
    let snapshot = |m: &HostMemory| {
        let (base, len) = m.range();
        let mut v = vec![0u8; usize::try_from(len).unwrap()];
        m.read(base, &mut v).unwrap();
        v
    };
    let (q_before, d_before) = (snapshot(&qa), snapshot(&da));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut c = Client::connect(d.socket(&u)).unwrap();
    let q = HostMemory::shared(&mut c, QUEUE_IOVA, 16 << 20).unwrap();
    let data = HostMemory::shared(&mut c, DATA_IOVA, 16 << 20).unwrap();
    let mut n = nvme(c, q);
    for i in 0..64 {
        write_blocks(&mut n, &data, i * 8, 2);
    }
    assert!(
        snapshot(&qa) == q_before,
        "the controller wrote into the gone client's queue memory"
    );
    assert!(
        snapshot(&da) == d_before,
        "the controller wrote into the gone client's data memory"
    );
}
