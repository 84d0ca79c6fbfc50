//! Live upgrade, the receiving side: a hand-over package from arbitrary bytes.
//!
//! Input: one mode byte, then the package's state (`umdev_pci::StateWriter` fields).
//! `mode % 8 % 5` memfds of 64 KiB stand in for the fds that travel with the package (the
//! client's eventfds, its connection, its memory): whatever the state says they are, they
//! are files of the wrong kind more often than not, as they would be in a corrupt package.
//! Mode bit 3 opens the function directly (below) for a client whose DMA refuses
//! everything, as the server's session does for a package with a client.
//!
//! The package goes to `Server::take_over` of a fresh server over a small device that hands
//! over and takes over a couple of fields of its own (the way the parent drivers do). The
//! same bytes, and the function's state inside the package if there is one (field 1), go
//! to `PciFunction::take_over` of a fresh function. Each must return, `Ok` or `Err`, and
//! never panic or hang; a function taken over must then run: resume, serve config space
//! and its BARs, deliver interrupts (to whatever the fds are) and close.
//!
//! `UMDEV_FUZZ_TRACE=1` prints what each take-over answered. The seeds (`seedgen`) are
//! real packages of a real server paused with and without a client. The device here must
//! match seedgen's.
#![no_main]

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
#[path = "common.rs"]
mod common;
#[path = "handover_device.rs"]
mod device;

use common::{trace, Refuse};
use device::function_of;
use umdev_dma::Dma;
use umdev_pci::{ClientId, HandOver, PciFunction, StateReader, CONFIG_REGION};
use umdev_server::handover::tag::T_FUNCTION;
use umdev_server::{Package, Server, ServerConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, state)) = data.split_first() else {
        return;
    };
    let fds = usize::from(mode % 8 % 5);
    let client = mode & 8 != 0;
    server(state, fds);
    function(state, fds, client);
    if let Some(inner) = StateReader::parse(state)
        .ok()
        .and_then(|r| r.get(T_FUNCTION))
    {
        function(inner, fds, client);
    }
});

/// A fresh server takes the package in; what it took must run.
fn server(state: &[u8], fds: usize) {
    let server = Server::new(function_of(), config()).expect("an eventfd for the server");
    let package = Package {
        state: state.to_vec(),
        fds: memfds(fds),
    };
    let paused_at = package.paused_at();
    let threads = threads();
    let taken = server.take_over(package);
    trace(format_args!(
        "Server::take_over: {:?}",
        taken.as_ref().map(|t| t.client())
    ));
    let taken_at = taken.as_ref().ok().map(|t| t.paused_at);
    // Not served here: dropping it ends the session thread a package with a client starts,
    // which waits for the go-ahead, and leaves the function paused, for us to run.
    drop(taken);
    wait_for_threads(threads);
    let Some(taken_at) = taken_at else {
        return;
    };
    assert_eq!(
        taken_at,
        paused_at.unwrap_or(0),
        "the pause time is not the package's"
    );
    let mut f = server.function().lock().unwrap_or_else(|e| e.into_inner());
    run(&mut f);
    f.close();
}

/// The threads of this process.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// Waits (a while at most) until the process has no more than `n` threads: a session
/// thread that is still exiting when the input ends would leave its last allocations to
/// the leak checker, which calls them leaked.
fn wait_for_threads(n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while threads() > n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn function(state: &[u8], fds: usize, client: bool) {
    let mut f = function_of();
    let admitted: Option<umdev_pci::handover::Admitted> = client.then(|| {
        let dma: Arc<dyn Dma> = Arc::new(Refuse);
        (dma, ClientId::default(), None)
    });
    let h = HandOver {
        state: state.to_vec(),
        fds: memfds(fds),
    };
    let r = f.take_over(h, admitted);
    trace(format_args!(
        "PciFunction::take_over of {} bytes (client: {client}): {r:?}",
        state.len()
    ));
    if r.is_ok() {
        run(&mut f);
        f.close();
    }
}

/// A function taken over runs again and answers as any function does.
fn run(f: &mut PciFunction) {
    // The ioeventfds of the state are the device's no longer (it offers none): an error,
    // after which the function runs all the same.
    let _ = f.resume();
    let mut cfg = [0u8; 256];
    f.region_read(CONFIG_REGION, 0, &mut cfg)
        .expect("config space is served after a take-over");
    let mut b = [0u8; 16];
    f.region_read(0, 0, &mut b)
        .expect("BAR0 is served after a take-over");
    f.region_write(0, 0, &[1, 2, 3, 4])
        .expect("BAR0 takes writes after a take-over");
    // The MSI-X table and PBA, whatever the state put there.
    f.region_read(2, 0, &mut b)
        .expect("the MSI-X table is served");
    f.region_read(2, 0x800, &mut b[..8])
        .expect("the PBA is served");
    let irqs = f.interrupts();
    irqs.set_intx(true);
    irqs.trigger_msi(0);
    irqs.trigger_msix(1);
    irqs.set_intx(false);
    assert!(
        f.region_read(CONFIG_REGION, 255, &mut b).is_err(),
        "an access past config space"
    );
}

fn config() -> ServerConfig {
    ServerConfig {
        spin: Duration::ZERO,
        dma_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    }
}

fn memfds(n: usize) -> Vec<OwnedFd> {
    (0..n)
        .map(|_| {
            let fd = rustix::fs::memfd_create("umdev-fuzz", rustix::fs::MemfdFlags::CLOEXEC)
                .expect("memfd_create");
            rustix::fs::ftruncate(&fd, 64 * 1024).expect("ftruncate of a memfd");
            fd
        })
        .collect()
}
