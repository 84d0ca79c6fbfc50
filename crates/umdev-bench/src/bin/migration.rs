//! `umdev-bench-migration`: live migration between two servers over real sockets, driven by
//! `umdev_client::migration` as a VMM would drive it.
//!
//! - mtty (one port, 16 bytes in its receive FIFO): migrated back and forth; downtime (the
//!   source's STOP_COPY request to the destination's RUNNING reply) and total time, median
//!   and worst. Goal: downtime under 5 ms.
//! - a DMA device with 1 GiB of guest memory mapped (a memfd on each side): all memory
//!   copied, then 5% of its pages dirtied by the device's DMA during pre-copy, the dirty
//!   pages copied in pre-copy rounds, then the switch-over; downtime and total time.
//!
//! Run: `cargo run --release -p umdev-bench --bin umdev-bench-migration` (`--quick` for CI).

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use umdev_client::migration::{migrate, FileCopier, MigrateOptions, Migration};
use umdev_client::Client;
use umdev_dma::Dma;
use umdev_pci::{
    BarIndex, BarKind, DeviceContext, Errno, MigrationSpec, PciDevice, PciDeviceSpec, PciFunction,
    StateReader, StateWriter,
};
use umdev_proto::wire;
use umdev_server::{Server, ServerConfig, Stopper};

#[derive(Debug, Parser)]
#[command(about = "Prints umdev's live migration figures")]
struct Args {
    /// Fewer iterations (for CI smoke runs).
    #[arg(long)]
    quick: bool,
    /// Guest memory of the DMA device, in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Share of the pages the device dirties during pre-copy, in percent.
    #[arg(long, default_value_t = 5)]
    dirty_percent: u64,
}

/// A server in a thread on a socket in a temporary directory.
struct Served {
    path: PathBuf,
    stopper: Stopper,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(function: PciFunction) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("dev.sock");
        let listener = UnixListener::bind(&path)?;
        let server = Server::new(function, ServerConfig::default())?;
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || {
            if let Err(e) = server.serve(listener) {
                eprintln!("server failed: {e}");
            }
        });
        Ok(Self {
            path,
            stopper,
            thread: Some(thread),
            _dir: dir,
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal DMA device: BAR0 holds an address (0x0), a length (0x8) and a command (0x10:
/// 1 = write `len` bytes of the seed at 0x14 to guest memory); its state is BAR0.
struct DmaDevice {
    bar0: Vec<u8>,
    dma: Option<Arc<dyn Dma>>,
}

impl DmaDevice {
    fn function() -> Result<PciFunction> {
        let spec = PciDeviceSpec::builder(0x5ead, 0x0002)
            .bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                4096,
            )
            .build()?;
        Ok(PciFunction::new(
            spec,
            Box::new(DmaDevice {
                bar0: vec![0; 4096],
                dma: None,
            }),
        ))
    }

    fn u64_at(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bar0[off..off + 8].try_into().unwrap_or([0; 8]))
    }
}

fn span(len: usize, off: u64, n: usize) -> Result<std::ops::Range<usize>, Errno> {
    let start = usize::try_from(off).map_err(|_| Errno::INVAL)?;
    let end = start
        .checked_add(n)
        .filter(|e| *e <= len)
        .ok_or(Errno::INVAL)?;
    Ok(start..end)
}

impl PciDevice for DmaDevice {
    fn bar_read(&mut self, _: BarIndex, off: u64, data: &mut [u8]) -> Result<(), Errno> {
        data.copy_from_slice(&self.bar0[span(self.bar0.len(), off, data.len())?]);
        Ok(())
    }

    fn bar_write(&mut self, _: BarIndex, off: u64, data: &[u8]) -> Result<(), Errno> {
        let r = span(self.bar0.len(), off, data.len())?;
        self.bar0[r].copy_from_slice(data);
        if off == 0x10 {
            let (addr, len) = (self.u64_at(0), self.u64_at(8).min(4096));
            let seed = self.bar0[0x14];
            let buf = vec![seed; usize::try_from(len).unwrap_or(0)];
            if let Some(dma) = &self.dma {
                dma.write(addr, &buf)
                    .map_err(|e| Errno::from_raw_os_error(e.errno()))?;
            }
        }
        Ok(())
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), Errno> {
        self.dma = Some(ctx.dma);
        Ok(())
    }

    fn close(&mut self) {
        self.dma = None;
    }

    fn migration(&self) -> Option<MigrationSpec> {
        Some(MigrationSpec {
            device_type: "umdev-bench-dma".into(),
            version: 1,
            min_version: 1,
            flags: umdev_pci::migration::PRE_COPY,
        })
    }

    fn save(&mut self, w: &mut StateWriter) -> Result<(), Errno> {
        w.bytes(1, &self.bar0);
        Ok(())
    }

    fn load(&mut self, _: u32, r: &StateReader<'_>) -> Result<(), Errno> {
        let b = r.bytes(1)?;
        if b.len() != self.bar0.len() {
            return Err(Errno::INVAL);
        }
        self.bar0.copy_from_slice(b);
        Ok(())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, mut downtimes: Vec<Duration>, mut totals: Vec<Duration>) {
    downtimes.sort();
    totals.sort();
    let med = |v: &[Duration]| v[v.len() / 2];
    let max = |v: &[Duration]| v[v.len() - 1];
    println!(
        "{name:<34} downtime median {:>8.3} ms  max {:>8.3} ms | total median {:>9.3} ms  max {:>9.3} ms  ({} runs)",
        ms(med(&downtimes)),
        ms(max(&downtimes)),
        ms(med(&totals)),
        ms(max(&totals)),
        downtimes.len()
    );
}

fn bench_mtty(runs: usize) -> Result<()> {
    let mk = || -> Result<Served> {
        let m = umdev_mtty::Mtty::new(umdev_mtty::MttyConfig::new(1, vec![]))?;
        Served::start(PciFunction::new(m.spec(), Box::new(m)))
    };
    let (a, b) = (mk()?, mk()?);
    let mut ca = Client::connect(&a.path)?;
    let mut cb = Client::connect(&b.path)?;
    // Loopback fills the receive FIFO: 16 bytes of state besides the registers.
    ca.region_write(
        0,
        umdev_mtty::regs::IIR_FCR,
        &[umdev_mtty::regs::FCR_ENABLE_FIFO],
    )?;
    ca.region_write(0, umdev_mtty::regs::MCR, &[umdev_mtty::regs::MCR_LOOP])?;
    for i in 0..16u8 {
        ca.region_write(0, umdev_mtty::regs::RBR_THR, &[i])?;
    }
    let (mut downtimes, mut totals) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let (src, dst) = if i % 2 == 0 {
            (&mut ca, &mut cb)
        } else {
            (&mut cb, &mut ca)
        };
        let r = migrate(src, dst, None, MigrateOptions::default())?;
        downtimes.push(r.downtime);
        totals.push(r.total);
    }
    summary("mtty (1 port, FIFO full)", downtimes, totals);
    Ok(())
}

fn memfd(size: u64) -> Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("umdev-bench-migration", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(fd)
}

fn bench_dma(runs: usize, memory: u64, dirty_percent: u64) -> Result<()> {
    const IOVA: u64 = 1 << 32;
    const PAGE: u64 = 4096;
    let (mut downtimes, mut totals) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 0..runs {
        let (a, b) = (
            Served::start(DmaDevice::function()?)?,
            Served::start(DmaDevice::function()?)?,
        );
        let mut src = Client::connect(&a.path)?;
        let mut dst = Client::connect(&b.path)?;
        let (ma, mb) = (memfd(memory)?, memfd(memory)?);
        let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
        src.dma_map(IOVA, memory, rw, Some((ma.as_fd(), 0)))?;
        dst.dma_map(IOVA, memory, rw, Some((mb.as_fd(), 0)))?;
        let mut copier = FileCopier::new(
            rustix::io::fcntl_dupfd_cloexec(&ma, 0)?,
            rustix::io::fcntl_dupfd_cloexec(&mb, 0)?,
            IOVA,
            memory,
        );
        let mut m = Migration::begin(
            &mut src,
            &mut dst,
            Some(&mut copier),
            MigrateOptions::default(),
        )?;
        // The device dirties `dirty_percent` of the pages, scattered (a stride coprime with
        // the page count), one DMA write of a page each.
        let pages = memory / PAGE;
        let dirty = pages * dirty_percent / 100;
        src.region_write(0, 8, &PAGE.to_le_bytes())?;
        for i in 0..dirty {
            let page = (i * 7919 + u64::try_from(run).unwrap_or(0)) % pages;
            src.region_write(0, 0, &(IOVA + page * PAGE).to_le_bytes())?;
            src.region_write(0, 0x14, &[u8::try_from(i % 255).unwrap_or(0) + 1])?;
            src.region_write(0, 0x10, &[1])?;
        }
        while m.precopy_round(&mut src, &mut dst)? {}
        let r = m.switchover(&mut src, &mut dst)?;
        downtimes.push(r.downtime);
        totals.push(r.total);
        last = Some(r);
    }
    summary(
        &format!("DMA device, {} MiB, {dirty_percent}% dirtied", memory >> 20),
        downtimes,
        totals,
    );
    if let Some(r) = last {
        println!("  last run: {r}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (mtty_runs, dma_runs) = if args.quick { (40, 1) } else { (400, 5) };
    println!("umdev-bench-migration (two servers in this process, real UNIX sockets)");
    bench_mtty(mtty_runs).context("mtty")?;
    bench_dma(dma_runs, args.memory_mib << 20, args.dirty_percent).context("DMA device")?;
    Ok(())
}
