//! Worker isolation, measured on a real umdevd: the private memory (USS: private clean +
//! private dirty pages, from `/proc/<pid>/smaps_rollup`) of each idle worker, beside what an
//! idle device costs the daemon in thread mode; the time `create` takes with a worker to
//! start and seal against the same in thread mode (the lower bound); and how long a device
//! whose worker was SIGKILLed takes to accept a client again; and how long a daemon
//! stopped and started again takes to a full tree, adopting every worker, against the same
//! restart with nothing to adopt.
//!
//! `cargo build --release -p umdevd && cargo run --release -p umdev-bench --bin umdev-bench-workers`
//! (root, /dev/fuse). Goal: under 1 MiB of private memory per idle worker.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use umdev_bench::{sibling, Daemon};

/// USS per idle worker, create latency with and without workers, restart after SIGKILL.
#[derive(Debug, Parser)]
struct Args {
    /// Devices (each alone in its group: a worker each).
    #[arg(long, default_value_t = 32)]
    count: u32,
    /// Kills to time.
    #[arg(long, default_value_t = 10)]
    kills: u32,
    /// 8 devices and 3 kills (for CI).
    #[arg(long)]
    quick: bool,
    /// The daemon (default: next to this binary).
    #[arg(long)]
    umdevd: Option<PathBuf>,
}

/// Private memory of `pid` in KiB.
fn uss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(field("Private_Clean:") + field("Private_Dirty:"))
}

/// The pid listening on `socket`.
fn server_pid(socket: &Path) -> Result<u32> {
    let s = UnixStream::connect(socket)?;
    let c = rustix::net::sockopt::socket_peercred(&s)?;
    Ok(u32::try_from(c.pid.as_raw_nonzero().get())?)
}

fn config(isolation: &str, n: u32) -> String {
    format!(
        "isolation = \"{isolation}\"\n[[parent]]\nname = \"bench0\"\ndriver = \"mtty\"\noptions = {{ ports = {n}, console = \"none\" }}\n"
    )
}

fn uuid(i: u32) -> String {
    format!("00000000-0000-4000-8000-{i:012x}")
}

/// Median, minimum and maximum.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Creates `n` devices; the time each `create` took, in microseconds.
fn create_all(d: &Daemon, n: u32) -> Result<Vec<f64>> {
    let ty = d
        .root()
        .join("sys/devices/umdev/bench0/mdev_supported_types/mtty-1/create");
    (0..n)
        .map(|i| {
            let t = Instant::now();
            std::fs::write(&ty, uuid(i)).context("create")?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (n, kills) = if args.quick {
        (8, 3)
    } else {
        (args.count, args.kills)
    };
    let umdevd = match args.umdevd {
        Some(p) => p,
        None => sibling("umdevd")?,
    };

    // Thread mode: the lower bound for create, and the daemon's growth per idle device.
    let threads = Daemon::start(&umdevd, "umdev-bench-workers-t", &config("thread", n))?;
    std::thread::sleep(Duration::from_millis(200));
    let base = uss_kib(threads.child.id())?;
    let t_create = create_all(&threads, n)?;
    std::thread::sleep(Duration::from_millis(200));
    let grown = uss_kib(threads.child.id())?.saturating_sub(base);
    drop(threads);

    let workers = Daemon::start(&umdevd, "umdev-bench-workers-w", &config("worker", n))?;
    let daemon = workers.child.id();
    std::thread::sleep(Duration::from_millis(200));
    let wbase = uss_kib(daemon)?;
    let w_create = create_all(&workers, n)?;
    std::thread::sleep(Duration::from_millis(300));
    let socket = |i: u32| {
        workers
            .root()
            .join("sockets")
            .join(uuid(i))
            .join("vfio-user.sock")
    };
    let mut uss = Vec::new();
    for i in 0..n {
        uss.push(uss_kib(server_pid(&socket(i))?)? as f64);
    }
    let daemon_grown = uss_kib(daemon)?.saturating_sub(wbase);

    let mut restart = Vec::new();
    for k in 0..kills {
        let s = socket(k % n);
        let pid = server_pid(&s)?;
        let t = Instant::now();
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid")?,
            rustix::process::Signal::KILL,
        )?;
        loop {
            match server_pid(&s) {
                Ok(p) if p != pid => break,
                _ if t.elapsed() > Duration::from_secs(10) => bail!("no restart after 10 s"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        restart.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The daemon stopped and started again with every device in a worker it adopts,
    // against a start with nothing to adopt (the same daemon after its devices went).
    let mut workers = workers;
    let mut adopt = Vec::new();
    for _ in 0..kills {
        adopt.push(workers.restart(&umdevd)?.as_secs_f64() * 1e3);
        let listed = std::fs::read_dir(workers.root().join("sys/bus/mdev/devices"))?.count();
        if listed != n as usize {
            bail!("the restarted daemon lists {listed} devices, not {n}");
        }
    }
    for i in 0..n {
        std::fs::write(
            workers
                .root()
                .join("sys/bus/mdev/devices")
                .join(uuid(i))
                .join("remove"),
            "1\n",
        )?;
    }
    let mut empty = Vec::new();
    for _ in 0..kills {
        empty.push(workers.restart(&umdevd)?.as_secs_f64() * 1e3);
    }
    drop(workers);

    println!("{n} mtty-1 devices, each alone in its IOMMU group");
    let (m, lo, hi) = spread(uss.clone());
    let verdict = if m < 1024.0 { "ok" } else { "OVER GOAL" };
    println!(
        "private memory per idle worker: median {m:.0} KiB (min {lo:.0}, max {hi:.0}) (goal < 1024 KiB: {verdict})"
    );
    println!(
        "thread mode: the daemon grew {:.0} KiB per idle device; worker mode: the daemon grew {:.0} KiB per device besides its worker",
        grown as f64 / f64::from(n),
        daemon_grown as f64 / f64::from(n)
    );
    let (tm, tlo, thi) = spread(t_create);
    let (wm, wlo, whi) = spread(w_create);
    println!(
        "create: thread mode median {tm:.0} us ({tlo:.0}..{thi:.0}); worker mode median {wm:.0} us ({wlo:.0}..{whi:.0}): {:.1}x",
        wm / tm
    );
    let (rm, rlo, rhi) = spread(restart);
    println!(
        "SIGKILL of a worker to its device accepting a client again: median {rm:.1} ms ({rlo:.1}..{rhi:.1}; {} kills, 100 ms of it the restart delay)",
        kills
    );
    let (am, alo, ahi) = spread(adopt);
    let (em, elo, ehi) = spread(empty);
    println!(
        "daemon restart to a full tree: {am:.1} ms median ({alo:.1}..{ahi:.1}) adopting {n} workers, {em:.1} ms ({elo:.1}..{ehi:.1}) with nothing to adopt"
    );
    Ok(())
}
