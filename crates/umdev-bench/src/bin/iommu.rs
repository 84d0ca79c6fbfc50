//! `umdev-bench-iommu`: the IOMMU layer's figures, each against a reference measured in the
//! same run.
//!
//! - translate (`AddressSpace::translate` + drop) at 65,535 mappings, random addresses,
//!   against a plain `BTreeMap` range lookup over the same keys; also while another thread
//!   maps and unmaps without pause. Goal: under 100 ns.
//! - pin + unpin per page over 1M pages (512 pages per call, one 4 GiB memfd mapping).
//!   Goal: under 200 ns per page.
//! - DMA_LOGGING_REPORT of a 64 GiB address space with 1% of its pages dirty at 4 KiB,
//!   against merely reading the report's 2 MiB of bitmap. Goal: within 3x. Dirty pages are
//!   scattered at random (the hard case) and, for comparison, in runs of 64.
//!
//! Run: `cargo run --release -p umdev-bench --bin umdev-bench-iommu` (`--quick` for CI).

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use umdev_dma::{
    dirty_bitmap_size, AddressSpace, Backing, ClientMemory, Dma, DmaError, DmaLimits, IovaRange,
    Prot, RemoteDma, PAGE_SIZE,
};

#[derive(Debug, Parser)]
#[command(about = "Prints umdev's IOMMU layer benchmarks")]
struct Args {
    /// Fewer iterations (for CI smoke runs).
    #[arg(long)]
    quick: bool,
    /// Only this part: `translate`, `pin` or `report`.
    #[arg(long)]
    only: Option<String>,
}

/// A tiny xorshift generator: the benchmark needs no statistics, only scattered addresses.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn memfd(size: u64) -> Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("umdev-bench-iommu", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(fd)
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?)
}

fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

/// Times `f` over `n` items, best of `rounds`, in ns per item.
fn best(rounds: usize, n: u64, mut f: impl FnMut()) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            ns_per(t.elapsed(), n)
        })
        .fold(f64::INFINITY, f64::min)
}

const MAPPINGS: u64 = 65_535;

fn translate(args: &Args) -> Result<()> {
    let file = memfd(256 * PAGE_SIZE)?;
    let space = Arc::new(AddressSpace::with_client(
        DmaLimits::default(),
        ClientMemory::new(u64::MAX, false),
    ));
    let mut reference = std::collections::BTreeMap::new();
    // Every other page, so lookups also land in holes' neighbourhoods.
    for i in 0..MAPPINGS - 1 {
        let iova = i * 2 * PAGE_SIZE;
        let backing = Backing::Fd {
            fd: dup(&file)?,
            offset: (i % 256) * PAGE_SIZE,
        };
        space
            .map(IovaRange::new(iova, PAGE_SIZE)?, Prot::READ_WRITE, backing)
            .with_context(|| format!("map {i}"))?;
        reference.insert(iova, PAGE_SIZE);
    }
    println!(
        "translate: {} mappings sharing {} mmap(s)",
        space.len() + 1,
        space.client().mmap_count()
    );
    let n: u64 = if args.quick { 200_000 } else { 2_000_000 };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let addrs: Vec<u64> = (0..n)
        .map(|_| (rng.next() % (MAPPINGS - 1)) * 2 * PAGE_SIZE + rng.next() % PAGE_SIZE)
        .collect();
    let rounds = if args.quick { 2 } else { 5 };
    let plain = best(rounds, n, || {
        for &a in &addrs {
            let hit = reference
                .range(..=a)
                .next_back()
                .filter(|(s, l)| a < **s + **l);
            black_box(hit);
        }
    });
    let ours = best(rounds, n, || {
        for &a in &addrs {
            black_box(space.translate(a, 8, Prot::READ).ok());
        }
    });
    // Cache-hot: the same addresses folded onto 64 mappings, as a device working on a few
    // buffers sees them; this is the layer's own cost without the tree's cache misses.
    let hot_addrs: Vec<u64> = addrs.iter().map(|a| a % (128 * PAGE_SIZE)).collect();
    let hot_plain = best(rounds, n, || {
        for &a in &hot_addrs {
            let hit = reference
                .range(..=a)
                .next_back()
                .filter(|(s, l)| a < **s + **l);
            black_box(hit);
        }
    });
    let hot = best(rounds, n, || {
        for &a in &hot_addrs {
            black_box(space.translate(a, 8, Prot::READ).ok());
        }
    });
    let mut buf = [0u8; 8];
    let copy = best(rounds, n, || {
        for &a in &addrs {
            let a = a & !7;
            black_box(Dma::read(&*space, a, &mut buf).ok());
        }
    });
    // The same while another thread maps and unmaps as fast as it can.
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (space, stop, file) = (space.clone(), stop.clone(), dup(&file)?);
        std::thread::spawn(move || -> Result<u64> {
            let range = IovaRange::new((MAPPINGS - 1) * 2 * PAGE_SIZE, PAGE_SIZE)?;
            let mut cycles = 0;
            while !stop.load(Ordering::Relaxed) {
                space.map(
                    range,
                    Prot::READ,
                    Backing::Fd {
                        fd: dup(&file)?,
                        offset: 0,
                    },
                )?;
                space.unmap(range)?;
                cycles += 1;
            }
            Ok(cycles)
        })
    };
    let t = Instant::now();
    let busy = best(rounds, n, || {
        for &a in &addrs {
            black_box(space.translate(a, 8, Prot::READ).ok());
        }
    });
    stop.store(true, Ordering::Relaxed);
    let cycles = churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    let rate = cycles as f64 / t.elapsed().as_secs_f64();
    println!("  plain BTreeMap range lookup (reference)   {plain:8.1} ns");
    println!(
        "  AddressSpace::translate + drop            {ours:8.1} ns  ({:.2}x the reference; goal < 100 ns: {})",
        ours / plain,
        if ours < 100.0 { "met" } else { "MISSED" }
    );
    println!("  cache-hot (64 mappings): BTreeMap {hot_plain:6.1} ns, translate {hot:6.1} ns");
    println!("  Dma::read of 8 bytes (lookup + copy)      {copy:8.1} ns");
    println!(
        "  translate while another thread maps/unmaps {busy:7.1} ns  ({rate:.0} map+unmap/s meanwhile)"
    );
    Ok(())
}

fn pin_unpin(args: &Args) -> Result<()> {
    const PAGES: u64 = 1 << 20;
    const BATCH: usize = 512;
    let space = Arc::new(AddressSpace::with_client(
        DmaLimits::default(),
        ClientMemory::new(u64::MAX, false),
    ));
    let range = IovaRange::new(1 << 40, PAGES * PAGE_SIZE)?;
    let backing = Backing::Fd {
        fd: memfd(PAGES * PAGE_SIZE)?,
        offset: 0,
    };
    space.map(range, Prot::READ_WRITE, backing)?;
    let pinner = space.pinner();
    let rounds = if args.quick { 1 } else { 3 };
    let per_page = |prot: Prot| -> Result<f64> {
        let mut best_ns = f64::INFINITY;
        for _ in 0..rounds {
            let t = Instant::now();
            let mut iova = range.start();
            while iova < range.end() {
                let pinned = pinner.pin(iova, BATCH, prot)?;
                black_box(&pinned);
                pinner.unpin(iova, BATCH)?;
                iova += BATCH as u64 * PAGE_SIZE;
            }
            best_ns = best_ns.min(ns_per(t.elapsed(), PAGES));
        }
        Ok(best_ns)
    };
    let r = per_page(Prot::READ)?;
    let rw = per_page(Prot::READ_WRITE)?;
    println!("pin + unpin, {PAGES} pages, {BATCH} per call:");
    println!(
        "  read pins                                 {r:8.1} ns/page (goal < 200 ns: {})",
        if r < 200.0 { "met" } else { "MISSED" }
    );
    println!("  read-write pins                           {rw:8.1} ns/page");
    if space.client().locked_bytes() != 0 {
        anyhow::bail!("pages left charged");
    }
    Ok(())
}

/// A client whose memory swallows every write: the report benchmark needs writes that mark
/// pages dirty, not memory behind them.
struct Sink;

impl RemoteDma for Sink {
    fn read(&self, _iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _iova: u64, _data: &[u8]) -> Result<(), DmaError> {
        Ok(())
    }
    fn max_transfer(&self) -> usize {
        1 << 20
    }
}

fn report(args: &Args) -> Result<()> {
    const SPACE: u64 = 64 << 30;
    let pages = SPACE / PAGE_SIZE;
    let dirty = pages / 100;
    let space = AddressSpace::with_client(DmaLimits::default(), ClientMemory::new(0, false));
    space.set_remote(Some(Arc::new(Sink)));
    space.map(IovaRange::new(0, SPACE)?, Prot::READ_WRITE, Backing::Remote)?;
    space.start_dirty_logging(&[])?;
    let size = dirty_bitmap_size(SPACE, PAGE_SIZE)?;
    let mut out = vec![0u8; size];
    let rounds = if args.quick { 2 } else { 6 };
    println!(
        "DMA_LOGGING_REPORT of {} GiB at 4 KiB ({} KiB bitmap), {dirty} pages (1%) dirty:",
        SPACE >> 30,
        size >> 10
    );
    // The lower bound: read every byte of a bitmap that size.
    let bitmap: Vec<u64> = (0..size / 8).map(|i| i as u64 * 0x9e37).collect();
    let read_ns = best(rounds * 4, 1, || {
        black_box(bitmap.iter().fold(0u64, |a, w| a ^ black_box(*w)));
    });
    for (name, run) in [("scattered", 1u64), ("runs of 64", 64)] {
        let mut rng = Rng(42);
        let mut worst_bits = 0;
        let mut best_ns = f64::INFINITY;
        for _ in 0..rounds {
            for _ in 0..dirty / run {
                let first = rng.next() % (pages - run);
                for p in first..first + run {
                    space.write(p * PAGE_SIZE, &[1])?;
                }
            }
            let t = Instant::now();
            space.dirty_report(0, SPACE, PAGE_SIZE, &mut out)?;
            best_ns = best_ns.min(t.elapsed().as_nanos() as f64);
            let bits: u32 = out.iter().map(|b| b.count_ones()).sum();
            worst_bits = worst_bits.max(bits);
        }
        println!(
            "  {name:<10} report {:8.1} us, read of the bitmap {:8.1} us: {:.2}x (goal within 3x: {}; {} bits set)",
            best_ns / 1e3,
            read_ns / 1e3,
            best_ns / read_ns,
            if best_ns <= 3.0 * read_ns { "met" } else { "MISSED" },
            worst_bits
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let run = |part: &str| args.only.as_deref().is_none_or(|o| o == part);
    if run("translate") {
        translate(&args)?;
    }
    if run("pin") {
        pin_unpin(&args)?;
    }
    if run("report") {
        report(&args)?;
    }
    Ok(())
}
