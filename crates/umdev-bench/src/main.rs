//! `umdev-bench`: prints the figures of the foundation's performance goals, each next to a
//! lower bound measured in the same run and the same CPU placement.
//!
//! - REGION_READ of 4 bytes through umdev (client library -> socket -> server -> device and
//!   back) against a raw UNIX-socket ping-pong of the same message sizes (32 bytes out,
//!   36 back): the ratio should be <= 1.25.
//! - Posted (No_reply) REGION_WRITEs per second.
//! - `Dma::write` into a 64 MiB fd-backed mapping against a plain memcpy of the same size:
//!   the ratio should be >= 0.8.
//!
//! Client and server run on the same CPU and on different CPUs (sched_setaffinity), and
//! with the server's adaptive poll off and on, because a wake-up across CPUs costs tens of
//! microseconds on these machines.
//!
//! Run: `cargo run --release -p umdev-bench` (`--quick` for a short run).

// Counters and byte patterns here are small or wrap on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use umdev_client::{Client, ClientOptions};
use umdev_dma::{AddressSpace, Backing, Dma, DmaLimits, IovaRange, Prot};
use umdev_pci::{BarIndex, BarKind, Errno, PciDevice, PciDeviceSpec, PciFunction};
use umdev_server::{Server, ServerConfig};
use umdev_transport::{Transport, UnixTransport};

#[derive(Debug, Parser)]
#[command(about = "Prints umdev's foundation benchmarks")]
struct Args {
    /// Fewer iterations (for CI smoke runs).
    #[arg(long)]
    quick: bool,
    /// Round trips per measurement.
    #[arg(long, default_value_t = 20_000)]
    iters: usize,
}

/// A device whose BAR0 is 4 KiB of RAM: the cheapest possible device work.
struct Ram(Vec<u8>);

impl PciDevice for Ram {
    fn bar_read(&mut self, _: BarIndex, off: u64, data: &mut [u8]) -> Result<(), Errno> {
        let o = usize::try_from(off).map_err(|_| Errno::INVAL)?;
        data.copy_from_slice(&self.0[o..o + data.len()]);
        Ok(())
    }
    fn bar_write(&mut self, _: BarIndex, off: u64, data: &[u8]) -> Result<(), Errno> {
        let o = usize::try_from(off).map_err(|_| Errno::INVAL)?;
        self.0[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("warning: cannot pin to CPU {cpu}: {e}");
    }
}

#[derive(Clone, Copy)]
struct Placement {
    name: &'static str,
    client: usize,
    server: usize,
}

struct Stats {
    mean_us: f64,
    p50_us: f64,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let n = samples.len().max(1);
    let total: Duration = samples.iter().sum();
    Stats {
        mean_us: total.as_secs_f64() * 1e6 / n as f64,
        p50_us: samples.get(n / 2).map_or(0.0, |d| d.as_secs_f64() * 1e6),
    }
}

/// The lower bound: a raw ping-pong with the sizes of a 4-byte REGION_READ (32 bytes
/// request, 36 bytes reply), one read and one write per side per round trip.
fn raw_ping_pong(p: Placement, iters: usize) -> Result<Stats> {
    let (mut a, mut b) = UnixStream::pair()?;
    let server = std::thread::spawn(move || {
        pin(p.server);
        let mut req = [0u8; 32];
        let reply = [0u8; 36];
        while b.read_exact(&mut req).is_ok() {
            if b.write_all(&reply).is_err() {
                break;
            }
        }
    });
    pin(p.client);
    let req = [0u8; 32];
    let mut reply = [0u8; 36];
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        a.write_all(&req)?;
        a.read_exact(&mut reply)?;
        if i >= iters / 10 {
            samples.push(t.elapsed());
        }
    }
    drop(a);
    let _ = server.join();
    Ok(stats(samples))
}

fn start_umdev(p: Placement, spin: Duration) -> Result<(Client, std::thread::JoinHandle<()>)> {
    let spec = PciDeviceSpec::builder(0x5ead, 0x00be)
        .class(0xff, 0, 0)
        .bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            4096,
        )
        .build()?;
    let function = PciFunction::new(spec, Box::new(Ram(vec![0; 4096])));
    let server = Server::new(
        function,
        ServerConfig {
            spin,
            ..ServerConfig::default()
        },
    )?;
    let (a, b) = UnixStream::pair()?;
    let handle = std::thread::spawn(move || {
        pin(p.server);
        let t: Arc<dyn Transport> = Arc::new(UnixTransport::new(b).with_spin(spin));
        let _ = server.serve_transport(t);
    });
    pin(p.client);
    let mut c = Client::unnegotiated(Arc::new(UnixTransport::new(a)));
    c.negotiate(&ClientOptions::default())?;
    Ok((c, handle))
}

fn region_read_rtt(p: Placement, spin: Duration, iters: usize) -> Result<Stats> {
    let (mut c, h) = start_umdev(p, spin)?;
    let mut buf = [0u8; 4];
    let mut samples = Vec::with_capacity(iters);
    for i in 0..iters + iters / 10 {
        let t = Instant::now();
        c.region_read(0, 0x10, &mut buf)?;
        if i >= iters / 10 {
            samples.push(t.elapsed());
        }
    }
    drop(c);
    let _ = h.join();
    Ok(stats(samples))
}

fn posted_write_rate(p: Placement, spin: Duration, iters: usize) -> Result<f64> {
    let (mut c, h) = start_umdev(p, spin)?;
    let mut buf = [0u8; 4];
    let t = Instant::now();
    for i in 0..iters {
        c.region_write_posted(0, 0x20, &(i as u32).to_le_bytes())?;
    }
    // A read after the writes returns only once every write before it was handled.
    c.region_read(0, 0x20, &mut buf)?;
    let elapsed = t.elapsed();
    anyhow::ensure!(
        u32::from_le_bytes(buf) == (iters - 1) as u32,
        "posted writes were lost"
    );
    drop(c);
    let _ = h.join();
    Ok(iters as f64 / elapsed.as_secs_f64())
}

fn dma_throughput(reps: usize) -> Result<(f64, f64)> {
    const SIZE: usize = 64 << 20;
    let fd = rustix::fs::memfd_create("bench-guest", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, SIZE as u64)?;
    let space = AddressSpace::new(DmaLimits::default());
    let dup = fd.as_fd().try_clone_to_owned()?;
    space.map(
        IovaRange::new(0x1_0000_0000, SIZE as u64)?,
        Prot::READ_WRITE,
        Backing::Fd { fd: dup, offset: 0 },
    )?;
    let src: Vec<u8> = (0..SIZE).map(|i| i as u8).collect();
    let mut dst = vec![0u8; SIZE];
    // Touch both once so page faults are not measured.
    dst.copy_from_slice(&src);
    space.write(0x1_0000_0000, &src)?;
    let mut best_memcpy = f64::MAX;
    let mut best_dma = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        best_memcpy = best_memcpy.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        space.write(0x1_0000_0000, std::hint::black_box(&src))?;
        best_dma = best_dma.min(t.elapsed().as_secs_f64());
    }
    let gib = SIZE as f64 / (1u64 << 30) as f64;
    Ok((gib / best_memcpy, gib / best_dma))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let iters = if args.quick { 2_000 } else { args.iters };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut placements = vec![Placement {
        name: "same CPU",
        client: 0,
        server: 0,
    }];
    if cpus > 1 {
        placements.push(Placement {
            name: "different CPUs",
            client: 0,
            server: 1,
        });
    }
    println!("umdev-bench: {iters} round trips per figure, {cpus} CPUs");
    println!();
    println!("REGION_READ 4 bytes, round trip (us):");
    println!(
        "{:<16} {:<10} {:>10} {:>10} {:>12} {:>12} {:>8}",
        "placement", "spin", "raw mean", "raw p50", "umdev mean", "umdev p50", "ratio"
    );
    for p in &placements {
        for spin_us in [0u64, 20, 50] {
            let spin = Duration::from_micros(spin_us);
            let raw = raw_ping_pong(*p, iters).context("raw ping-pong")?;
            let ours = region_read_rtt(*p, spin, iters).context("umdev REGION_READ")?;
            println!(
                "{:<16} {:<10} {:>10.2} {:>10.2} {:>12.2} {:>12.2} {:>8.2}",
                p.name,
                format!("{spin_us} us"),
                raw.mean_us,
                raw.p50_us,
                ours.mean_us,
                ours.p50_us,
                ours.p50_us / raw.p50_us
            );
        }
    }
    println!();
    println!("Posted REGION_WRITE (4 bytes, No_reply), writes per second:");
    for p in &placements {
        for spin_us in [0u64, 50] {
            let rate = posted_write_rate(*p, Duration::from_micros(spin_us), iters * 5)?;
            println!("{:<16} spin {:>3} us   {:>12.0} /s", p.name, spin_us, rate);
        }
    }
    println!();
    let (memcpy, dma) = dma_throughput(if args.quick { 3 } else { 8 })?;
    println!("Dma::write into a 64 MiB fd-backed mapping (best of runs):");
    println!(
        "memcpy {memcpy:.2} GiB/s, Dma::write {dma:.2} GiB/s, ratio {:.2}",
        dma / memcpy
    );
    Ok(())
}
