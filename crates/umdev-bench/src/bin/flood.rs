//! One client floods its device while another device's client measures REGION_READ
//! latency (issue 12's fairness goal: within 2x of its unloaded value), on a real umdevd
//! with two mtty cards, each alone in its group: in thread mode, in worker mode, and in
//! worker mode with a per-client request rate limit (`[server] max_requests_per_sec`), and
//! in worker mode with CPU cgroups (`[cgroup]`, the reader's parent weighted 10x the
//! flooded one's) where the machine has a cpu cgroup controller.
//! The flood is posted REGION_WRITEs (no reply) to the card's scratch register, as fast as
//! one client thread can send them; the measured client reads once a millisecond (a busy
//! guest, not a flood); the lower bound is the same reads with nobody flooding, measured
//! in the same run.
//!
//! `cargo build --release -p umdevd && cargo run --release -p umdev-bench --bin umdev-bench-flood`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use umdev_bench::{sibling, Daemon};
use umdev_client::Client;

/// Latency of one device's reads while another device is flooded.
#[derive(Debug, Parser)]
struct Args {
    /// Reads measured per phase.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// The rate limit of the third setup.
    #[arg(long, default_value_t = 20_000)]
    limit: u32,
    /// Fewer samples (CI).
    #[arg(long)]
    quick: bool,
}

/// LSR of port 0 (a read the card answers from its registers).
const LSR: u64 = 5;
/// The scratch register (a write the card only stores).
const SCR: u64 = 7;

fn uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// Median and 99th percentile of `v`, in microseconds.
fn quantiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// `n` reads, one every millisecond (another guest's device, busy but not flooding).
fn reads(c: &mut Client, n: usize) -> Result<Vec<f64>> {
    let mut b = [0u8];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.region_read(0, LSR, &mut b)?;
        v.push(t.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(v)
}

/// One setup: unloaded and flooded read latency, and how fast the flood went.
fn setup(umdevd: &std::path::Path, name: &str, config: &str, n: usize) -> Result<()> {
    // Short: the devices' socket paths live under it.
    let d = Daemon::start(umdevd, &format!("ub-flood-{}", &name[..1]), config)?;
    // The reader's card on a parent of its own where the setup has one (its weight).
    let reader = if config.contains("name = \"tty1\"") {
        "tty1"
    } else {
        "tty0"
    };
    for (i, parent) in [(0, "tty0"), (1, reader)] {
        let create = d.root().join(format!(
            "sys/devices/umdev/{parent}/mdev_supported_types/mtty-1/create"
        ));
        std::fs::write(&create, uuid(i))?;
    }
    let socket = |i: u32| {
        d.root()
            .join("sockets")
            .join(uuid(i))
            .join("vfio-user.sock")
    };
    let mut quiet = Client::connect(socket(1))?;
    reads(&mut quiet, 100)?;
    let idle = quantiles(reads(&mut quiet, n)?);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut flooder = Client::connect(socket(0))?;
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || -> Result<()> {
            let mut x = 0u8;
            while !stop.load(Ordering::Relaxed) {
                flooder.region_write_posted(0, SCR, &[x])?;
                x = x.wrapping_add(1);
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let before = sent.load(Ordering::Relaxed);
    let loaded = quantiles(reads(&mut quiet, n)?);
    let rate = (sent.load(Ordering::Relaxed) - before) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let ratio = loaded.0 / idle.0;
    let verdict = if ratio <= 2.0 { "ok" } else { "OVER GOAL" };
    println!(
        "{name}: REGION_READ median {:.1} us unloaded, {:.1} us while the other device takes {:.0} posted writes/s: {ratio:.2}x (goal <= 2x: {verdict}); p99 {:.1} -> {:.1} us",
        idle.0, loaded.0, rate, idle.1, loaded.1
    );
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let n = if args.quick { 300 } else { args.samples };
    let umdevd = sibling("umdevd")?;
    let parent = "[[parent]]\nname = \"tty0\"\ndriver = \"mtty\"\noptions = { ports = 2, console = \"none\" }\n";
    println!("two mtty-1 cards, each alone in its group; {n} reads per phase");
    setup(
        &umdevd,
        "thread",
        &format!("isolation = \"thread\"\n{parent}"),
        n,
    )?;
    setup(
        &umdevd,
        "worker",
        &format!("isolation = \"worker\"\n{parent}"),
        n,
    )?;
    setup(
        &umdevd,
        "limited worker",
        &format!(
            "isolation = \"worker\"\n[server]\nmax_requests_per_sec = {}\n{parent}",
            args.limit
        ),
        n,
    )?;
    match cpu_cgroup() {
        Some(base) => {
            let path = base.join("ub-flood");
            let weighted = format!(
                "isolation = \"worker\"\n[cgroup]\npath = \"{}\"\n{parent}cpu_weight = 100\n\
                 [[parent]]\nname = \"tty1\"\ndriver = \"mtty\"\n\
                 options = {{ ports = 2, console = \"none\" }}\ncpu_weight = 1000\n",
                path.display()
            );
            let r = setup(&umdevd, "weighted worker", &weighted, n);
            let _ = std::fs::remove_dir(&path);
            r?;
        }
        None => println!("weighted worker: no cpu cgroup controller here, not measured"),
    }
    Ok(())
}

/// A cgroup directory with the cpu controller to make a test cgroup in: v2's root if it
/// offers cpu, else v1's cpu hierarchy.
fn cpu_cgroup() -> Option<std::path::PathBuf> {
    let v2 = std::path::Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "cpu") {
        return Some(v2.to_owned());
    }
    let v1 = v2.join("cpu");
    v1.join("cpu.shares").exists().then_some(v1)
}
