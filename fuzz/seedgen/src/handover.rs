//! Seeds of `fuzz_targets/handover.rs`: real hand-over packages, made by pausing a real
//! server (the way `umdevd` upgrades a worker) with and without a client attached, and one
//! written by hand with every field of a package with a client.
//!
//! A seed is the target's mode byte (how many memfds stand in for the package's fds; bit 3:
//! open the function directly for a client too), then the package's state. The device
//! must match the target's: a package fits only the device it came from.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use umdev_client::Client;
use umdev_pci::{StateReader, StateWriter};
use umdev_proto::wire;
use umdev_server::{Package, Server, ServerConfig};

#[path = "../../fuzz_targets/handover_device.rs"]
mod device;

use device::function_of as function;

use umdev_server::handover::tag::*;

/// Most fds the target attaches.
const MAX_FDS: usize = 4;

type Error = Box<dyn std::error::Error>;

pub fn seeds(tmp: &Path) -> Result<Vec<(&'static str, Vec<u8>)>, Error> {
    let mut seeds = Vec::new();
    let idle = paused(tmp, false)?;
    seeds.push(("idle", seed(&idle, false)));
    let held = paused(tmp, true)?;
    seeds.push(("client", seed(&held, false)));
    seeds.push(("client-open", seed(&held, true)));
    let function = StateReader::parse(&idle.state)?.bytes(T_FUNCTION)?.to_vec();
    seeds.push(("by-hand", by_hand(&function)));
    Ok(seeds)
}

fn seed(p: &Package, open: bool) -> Vec<u8> {
    let fds = u8::try_from(p.fds.len().min(MAX_FDS)).unwrap_or(0);
    let mut v = vec![fds | if open { 8 } else { 0 }];
    v.extend_from_slice(&p.state);
    v
}

/// Serves the device on a socket under `tmp`, optionally with a client that has set up
/// interrupts and memory, and pauses it for a hand-over; the server then runs on.
fn paused(tmp: &Path, with_client: bool) -> Result<Package, Error> {
    let path = tmp.join(format!("handover-{with_client}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let server = Server::new(function(), ServerConfig::default())?;
    let ctl = server.hand_over_ctl();
    let stopper = server.stopper();
    std::thread::scope(|scope| {
        let serving = scope.spawn(|| server.serve(listener));
        let package = (|| -> Result<Package, Error> {
            let client = if with_client {
                Some(client(&path)?)
            } else {
                None
            };
            let package = ctl.pause(Duration::from_secs(5))?;
            ctl.abort();
            drop(client);
            Ok(package)
        })();
        stopper.stop();
        let served = serving.join();
        let package = package?;
        served
            .map_err(|_| "the server panicked")?
            .map_err(|e| format!("the server failed: {e}"))?;
        Ok(package)
    })
}

/// A client with something of everything a package carries: registers written, an MSI-X
/// eventfd, memory mapped from a file and memory reached through messages.
fn client(path: &Path) -> Result<(Client, OwnedFd), Error> {
    let mut c = Client::connect(path)?;
    c.region_write(0, 0x10, &[1, 2, 3, 4])?;
    let efd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
    c.set_irq_eventfds(2, wire::IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])?;
    let mem = rustix::fs::memfd_create("umdev-seed", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&mem, 64 * 1024)?;
    let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
    c.dma_map(0x10000, 0x10000, rw, Some((mem.as_fd(), 0)))?;
    c.dma_map(0x100000, 0x1000, wire::DMA_MAP_FLAG_READ, None)?;
    Ok((c, efd))
}

/// A package with a client, every field written by hand: its connection (fd 0) with half a
/// message pending and an fd marked in it (fd 1), and one mapping from a file (fd 2) and
/// one through messages; `function` is a real function's state.
fn by_hand(function: &[u8]) -> Vec<u8> {
    let mut w = StateWriter::new();
    w.u64(T_PAUSED_AT, 1_000_000)
        .bytes(T_FUNCTION, function)
        .u32(T_FUNCTION_FDS, 0)
        .bool(T_SESSION, true)
        .u32(T_STREAM, 0)
        .bytes(T_PENDING, &[0, 0, 1, 0, 0x20, 0, 0, 0]);
    let mut mark = Vec::new();
    mark.extend_from_slice(&0u64.to_le_bytes());
    mark.extend_from_slice(&8u64.to_le_bytes());
    mark.extend_from_slice(&1u32.to_le_bytes());
    w.bytes(T_MARK, &mark).u64(T_CONNECTION, 7);
    let peer: Vec<u8> = [4242u32, 0, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    w.bytes(T_PEER, &peer)
        .bool(T_WRITE_MULTIPLE, true)
        .u32(T_CLIENT_MAX_FDS, 16)
        .u32(T_CLIENT_MAX_XFER, 1 << 20)
        .u32(T_MAX_DMA_MAPS, 64);
    for (start, len, prot, fd) in [
        (0x10000u64, 0x10000u64, 3u8, 2u32),
        (0x100000, 0x1000, 1, u32::MAX),
    ] {
        let mut b = Vec::new();
        b.extend_from_slice(&start.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.push(prot);
        b.extend_from_slice(&fd.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        w.bytes(T_MAPPING, &b);
    }
    let mut v = vec![3];
    v.extend_from_slice(&w.into_payload());
    v
}
