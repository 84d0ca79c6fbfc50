//! The hello device served on a real socket, driven by a client as a guest driver would:
//! the hash of guest memory through its fd (shared memory) and through DMA_READ messages
//! (memory the client did not share), an interrupt when done, and a bad address answered
//! with an errno in STATUS.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use umdev_client::{Client, VecMemory};
use umdev_core::{Drivers, MdevUuid, ParentContext};
use umdev_hello::{
    HelloDriver, REG_ADDR_HI, REG_ADDR_LO, REG_CMD, REG_LEN, REG_RESULT, REG_STATUS,
};
use umdev_pci::PciFunction;
use umdev_server::{Server, ServerConfig};

fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A hello device built the way the core builds it (driver, options, create, build),
/// served on a socket in `dir`.
fn serve(dir: &std::path::Path) -> (std::path::PathBuf, umdev_server::Stopper) {
    let mut drivers = Drivers::default();
    drivers.add(HelloDriver);
    let ctx = ParentContext {
        name: "hello0".into(),
        state_dir: None,
    };
    let opts = serde_json::json!({"devices": 2});
    let parent = drivers
        .build("hello", &ctx, opts.as_object().unwrap())
        .unwrap();
    let uuid = MdevUuid::random();
    let desc = parent.create(&uuid, "1").unwrap();
    let parts = parent
        .build(&uuid, &desc, &umdev_core::DeviceEnv::detached(uuid))
        .unwrap();
    let function = PciFunction::new(parts.spec, parts.device);
    let path = dir.join("hello.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = Server::new(function, ServerConfig::default()).unwrap();
    let stopper = server.stopper();
    std::thread::spawn(move || server.serve(listener));
    (path, stopper)
}

fn write32(c: &mut Client, off: u64, v: u32) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn read32(c: &mut Client, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Starts a hash of `len` bytes at `addr` and polls STATUS until it is no longer busy.
fn hash(c: &mut Client, addr: u64, len: u32) -> (u32, u32) {
    write32(c, REG_ADDR_LO, addr as u32);
    write32(c, REG_ADDR_HI, (addr >> 32) as u32);
    write32(c, REG_LEN, len);
    write32(c, REG_CMD, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = read32(c, REG_STATUS);
        if status != 1 {
            return (status, read32(c, REG_RESULT));
        }
        assert!(Instant::now() < deadline, "the hash never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn hashes_shared_memory_through_its_fd() {
    let dir = tempfile::tempdir().unwrap();
    let (path, stop) = serve(dir.path());
    let mut c = Client::connect(&path).unwrap();
    let mem = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&mem, 1 << 20).unwrap();
    let data: Vec<u8> = (0..40_000u32).map(|i| (i * 31 % 251) as u8).collect();
    rustix::io::pwrite(&mem, &data, 0x1000).unwrap();
    c.dma_map(0x1_0000_0000, 1 << 20, 3, Some((mem.as_fd(), 0)))
        .unwrap();
    assert_eq!(hash(&mut c, 0x1_0000_1000, 40_000), (0, fnv1a(&data)));
    // An address nobody mapped: the DMA fails and STATUS says why (EFAULT).
    assert_eq!(hash(&mut c, 0x9_0000_0000, 16).0, 14);
    stop.stop();
}

#[test]
fn hashes_memory_the_client_did_not_share_through_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (path, stop) = serve(dir.path());
    let mut c = Client::connect(&path).unwrap();
    let mem = Arc::new(VecMemory::new());
    mem.add(0x2000, 0x10000);
    let data = b"hello from memory the server reaches only through DMA_READ".to_vec();
    mem.with(0x2100, data.len(), |m| m.copy_from_slice(&data));
    c.set_dma_handler(mem.clone());
    c.dma_map(0x2000, 0x10000, 3, None).unwrap();
    assert_eq!(hash(&mut c, 0x2100, data.len() as u32), (0, fnv1a(&data)));
    stop.stop();
}
