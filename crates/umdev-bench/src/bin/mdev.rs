//! The mdev management path, measured: creates and removes N mtty devices through the
//! FUSE `create` and `remove` files of a real umdevd, and reports per-operation latency,
//! the daemon's resident memory per idle device, and how long `mdevctl list` (and
//! `umdevctl list`) take over N devices.
//!
//! `cargo build --release -p umdevd -p umdevctl && cargo run --release -p umdev-bench --bin umdev-bench-mdev`
//! (root, /dev/fuse; mdevctl from `~/.cargo/bin` or `PATH` if installed).
//! Goals: create and remove under 2 ms each, under 256 KiB RSS per idle device.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use umdev_bench::{sibling, Daemon};

/// Create/remove latency through FUSE, RSS per idle device, `mdevctl list` over N devices.
#[derive(Debug, Parser)]
struct Args {
    /// Number of devices.
    #[arg(long, default_value_t = 1000)]
    count: u32,
    /// 100 devices instead (for CI).
    #[arg(long)]
    quick: bool,
    /// The daemon (default: next to this binary).
    #[arg(long)]
    umdevd: Option<PathBuf>,
}

fn find_mdevctl() -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("mdevctl"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("HOME") {
        c.push(PathBuf::from(h).join(".cargo/bin/mdevctl"));
    }
    c.into_iter().find(|p| p.is_file())
}

fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("VmRSS:") {
            return Ok(v.trim().trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no VmRSS for {pid}")
}

struct Stats {
    mean: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    // Nearest-rank percentile, in integers: index = round((len - 1) * permille / 1000).
    let at = |permille: usize| us(v[((v.len() - 1) * permille + 500) / 1000]);
    Stats {
        mean: v.iter().map(|d| us(*d)).sum::<f64>() / v.len() as f64,
        p50: at(500),
        p99: at(990),
        max: us(v[v.len() - 1]),
    }
}

fn report(what: &str, s: &Stats) {
    let verdict = if s.mean < 2000.0 { "ok" } else { "OVER GOAL" };
    println!(
        "{what:<8} mean {:8.1} us  p50 {:8.1} us  p99 {:8.1} us  max {:8.1} us   (goal < 2000 us: {verdict})",
        s.mean, s.p50, s.p99, s.max
    );
}

fn start(umdevd: &Path, count: u32) -> Result<Daemon> {
    Daemon::start(
        umdevd,
        "umdev-bench-mdev",
        &format!(
            "[[parent]]\nname = \"bench0\"\ndriver = \"mtty\"\noptions = {{ ports = {count}, console = \"none\" }}\n"
        ),
    )
}

fn timed_run(cmd: &mut Command) -> Result<(Duration, String)> {
    let t = Instant::now();
    let out = cmd.output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, String::from_utf8_lossy(&out.stderr));
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let n = if args.quick { 100 } else { args.count };
    let umdevd = match args.umdevd {
        Some(p) => p,
        None => sibling("umdevd")?,
    };
    if !umdevd.exists() {
        bail!(
            "{} is not built (cargo build --release -p umdevd)",
            umdevd.display()
        );
    }
    let d = start(&umdevd, n)?;
    let pid = d.child.id();
    let root = d.dir.join("root");
    let ty = root.join("sys/devices/umdev/bench0/mdev_supported_types/mtty-1");
    let uuid = |i: u32| format!("00000000-0000-4000-8000-{i:012x}");
    println!("{n} mtty-1 devices through {}", root.join("sys").display());

    // Let the daemon settle, then take the idle baseline.
    std::thread::sleep(Duration::from_millis(200));
    let base = rss_kib(pid)?;
    let mut create = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        std::fs::write(ty.join("create"), uuid(i)).context("create")?;
        create.push(t.elapsed());
    }
    let avail: u32 = std::fs::read_to_string(ty.join("available_instances"))?
        .trim()
        .parse()?;
    if avail != 0 {
        bail!("{avail} instances left after creating {n} of {n}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let full = rss_kib(pid)?;
    let per = (full.saturating_sub(base)) as f64 / f64::from(n);

    // Each listing runs three times: the fastest and the slowest show how much of it is the
    // machine's other load.
    let mut list_times: Vec<(&str, Vec<Duration>)> = Vec::new();
    if let Some(mdevctl) = find_mdevctl() {
        let mut times = Vec::new();
        for _ in 0..3 {
            let (t, out) = timed_run(
                Command::new(&mdevctl)
                    .arg("list")
                    .env("MDEVCTL_ENV_ROOT", &root),
            )?;
            if out.lines().count() != n as usize {
                bail!(
                    "mdevctl list printed {} lines for {n} devices",
                    out.lines().count()
                );
            }
            times.push(t);
        }
        list_times.push(("mdevctl list", times));
    } else {
        println!("(mdevctl not installed: no `mdevctl list` figure)");
    }
    let umdevctl = sibling("umdevctl")?;
    if umdevctl.exists() {
        let mut times = Vec::new();
        for _ in 0..3 {
            let (t, out) = timed_run(
                Command::new(&umdevctl)
                    .arg("list")
                    .env("UMDEV_CONTROL", root.join("state/control.sock")),
            )?;
            if out.lines().count() != n as usize {
                bail!("umdevctl list printed {} lines", out.lines().count());
            }
            times.push(t);
        }
        list_times.push(("umdevctl list", times));
    }

    let dev = root.join("sys/devices/umdev/bench0");
    let mut remove = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        std::fs::write(dev.join(uuid(i)).join("remove"), "1").context("remove")?;
        remove.push(t.elapsed());
    }

    report("create", &stats(create));
    report("remove", &stats(remove));
    let verdict = if per < 256.0 { "ok" } else { "OVER GOAL" };
    println!(
        "RSS      {base} KiB idle with no device, {full} KiB with {n}: {per:.1} KiB per idle device (goal < 256 KiB: {verdict})"
    );
    for (what, mut t) in list_times {
        t.sort();
        println!(
            "{what:<14} over {n} devices: {:.3} s fastest, {:.3} s slowest of 3",
            t[0].as_secs_f64(),
            t[t.len() - 1].as_secs_f64()
        );
    }
    Ok(())
}
