//! Worker isolation, measured on a real umdevd: the private memory (USS: private clean +
//! private dirty pages, from `/proc/<pid>/smaps_rollup`) of each idle worker, beside what an
//! idle device costs the daemon in thread mode; the time `create` takes with a worker to
//! start and seal against the same in thread mode (the lower bound); and how long a device
//! whose worker was SIGKILLed takes to accept a client again; and how long a daemon
//! stopped and started again takes to a full tree, adopting every worker, against the same
//! restart with nothing to adopt; and the pause of each device during a live upgrade
//! (`umdevctl upgrade --all`) with clients attached and busy: an mtty card whose console
//! has a person's connection and whose guest side echoes it, and an mnvme controller doing
//! 4 KiB writes and reads, each checked. The pause is measured at the server (the old
//! worker's pause to the new worker's resume, as `umdevctl upgrade` reports it); beside it,
//! the longest NVMe request and console echo the clients saw meanwhile.
//!
//! `cargo build --release -p umdevd && cargo run --release -p umdev-bench --bin umdev-bench-workers`
//! (root, /dev/fuse). Goals: under 1 MiB of private memory per idle worker; a pause under
//! 50 ms per device during an upgrade.

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
    /// Live upgrades to time.
    #[arg(long, default_value_t = 10)]
    upgrades: u32,
    /// 8 devices, 3 kills and 3 upgrades (for CI).
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
    let (n, kills, upgrades) = if args.quick {
        (8, 3, 3)
    } else {
        (args.count, args.kills, args.upgrades)
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

    let up = upgrade_pauses(&umdevd, upgrades)?;

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
    for (what, pauses) in [("mtty", up.mtty), ("mnvme", up.nvme)] {
        let (m, lo, hi) = spread(pauses);
        let verdict = if hi < 50_000.0 { "ok" } else { "OVER GOAL" };
        println!(
            "live upgrade, {what} with a busy client: pause at the server median {:.2} ms ({:.2}..{:.2}; {upgrades} upgrades) (goal < 50 ms: {verdict})",
            m / 1e3,
            lo / 1e3,
            hi / 1e3
        );
    }
    let (m, lo, hi) = spread(up.whole);
    println!(
        "  the whole umdevctl upgrade --all (a new worker per group started and sealed first): median {m:.1} ms ({lo:.1}..{hi:.1})"
    );
    println!(
        "  the clients meanwhile: longest NVMe write+read {:.1} ms, longest console echo {:.1} ms (unloaded median {:.2} ms); {} NVMe rounds, every block checked",
        up.nvme_worst * 1e3,
        up.echo_worst * 1e3,
        up.echo_idle * 1e3,
        up.nvme_rounds
    );
    Ok(())
}

/// What the upgrades measured (pauses in microseconds, the rest in seconds).
struct Upgrades {
    mtty: Vec<f64>,
    nvme: Vec<f64>,
    whole: Vec<f64>,
    nvme_worst: f64,
    nvme_rounds: u64,
    echo_worst: f64,
    echo_idle: f64,
}

/// An mtty card (its guest side echoing the console) and an mnvme controller doing I/O,
/// each in its own worker, upgraded `rounds` times.
fn upgrade_pauses(umdevd: &Path, rounds: u32) -> Result<Upgrades> {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use umdev_client::nvme::{op, HostMemory, Nvme, NvmeOptions, Sqe};
    use umdev_client::Client;
    use umdev_mtty::regs::{LSR, LSR_DR, RBR_THR};

    let d = Daemon::start(
        umdevd,
        "umdev-bench-upgrade",
        "isolation = \"worker\"\n[[parent]]\nname = \"tty0\"\ndriver = \"mtty\"\noptions = { ports = 1, console = \"socket\" }\n[[parent]]\nname = \"nvme0\"\ndriver = \"mnvme\"\noptions = { capacity_gib = 1 }\n",
    )?;
    let (tty, nvme) = (uuid(1), uuid(2));
    let types = d.root().join("sys/devices/umdev");
    std::fs::write(types.join("tty0/mdev_supported_types/mtty-1/create"), &tty)?;
    std::fs::write(
        types.join("nvme0/mdev_supported_types/mnvme-1g/create"),
        &nvme,
    )?;
    let dir = |u: &str| d.root().join("sockets").join(u);
    let stop = Arc::new(AtomicBool::new(false));

    // The card's guest side echoes every byte back.
    let mut card = Client::connect(dir(&tty).join("vfio-user.sock"))?;
    let echo = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let mut lsr = [0u8];
                card.region_read(0, LSR, &mut lsr)?;
                if lsr[0] & LSR_DR != 0 {
                    let mut b = [0u8];
                    card.region_read(0, RBR_THR, &mut b)?;
                    card.region_write(0, RBR_THR, &b)?;
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            Ok(())
        })
    };
    let mut console = UnixStream::connect(dir(&tty).join("port0.sock"))?;
    console.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut echo_once = |b: u8| -> Result<f64> {
        let t = Instant::now();
        console.write_all(&[b])?;
        let mut back = [0u8];
        console.read_exact(&mut back)?;
        if back[0] != b {
            bail!("the console echoed {} for {b}", back[0]);
        }
        Ok(t.elapsed().as_secs_f64())
    };
    let mut idle = Vec::new();
    for i in 0..50u8 {
        idle.push(echo_once(i)?);
    }
    let echo_idle = spread(idle).0;

    // The controller: 4 KiB writes and read-backs, checked.
    let mut c = Client::connect(dir(&nvme).join("vfio-user.sock"))?;
    let q = HostMemory::shared(&mut c, 0x1000_0000, 16 << 20)?;
    let data = HostMemory::shared(&mut c, 0x4000_0000, 16 << 20)?;
    let mut n = Nvme::enable(c, q, &NvmeOptions::default())?;
    let (rounds_done, worst_ns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let io = {
        let (stop, rounds_done, worst_ns) = (stop.clone(), rounds_done.clone(), worst_ns.clone());
        std::thread::spawn(move || -> Result<()> {
            let buf = data.alloc(4096, 4096);
            let mut g = 0u64;
            while !stop.load(Ordering::Relaxed) {
                g += 1;
                let lba = (g % 256) * 8;
                let want: Vec<u8> = (0..4096u64)
                    .map(|i| (i ^ g.wrapping_mul(131)).to_le_bytes()[0])
                    .collect();
                let t = Instant::now();
                data.write(buf, &want)?;
                let w = n.submit_wait(1, Sqe::rw(op::WRITE, 1, lba, 8, buf, 0))?;
                data.fill(buf, 4096, 0)?;
                let r = n.submit_wait(1, Sqe::rw(op::READ, 1, lba, 8, buf, 0))?;
                let mut got = vec![0u8; 4096];
                data.read(buf, &mut got)?;
                if !w.ok() || !r.ok() || got != want {
                    bail!("NVMe round {g} failed or read back other data");
                }
                worst_ns.fetch_max(
                    u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                rounds_done.store(g, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    let ctl = sibling("umdevctl")?;
    let control = d.root().join("state/control.sock");
    let (mut mtty, mut nvme_p, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let mut echo_worst: f64 = 0.0;
    for round in 0..rounds {
        // The console keeps typing while the upgrade runs.
        let t = Instant::now();
        let run = {
            let (ctl, control) = (ctl.clone(), control.clone());
            std::thread::spawn(move || {
                std::process::Command::new(ctl)
                    .args(["upgrade", "--all"])
                    .env("UMDEV_CONTROL", control)
                    .output()
            })
        };
        let mut k = 0u8;
        while !run.is_finished() {
            echo_worst = echo_worst.max(echo_once(k)?);
            k = k.wrapping_add(1);
        }
        let o = run
            .join()
            .map_err(|_| anyhow::anyhow!("umdevctl's thread panicked"))??;
        whole.push(t.elapsed().as_secs_f64() * 1e3);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() {
            bail!(
                "upgrade {round} failed: {text}{}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        for line in text.lines() {
            let us = line
                .rsplit_once("paused ")
                .and_then(|(_, v)| v.trim_end_matches(" us").parse::<f64>().ok())
                .with_context(|| format!("upgrade output: {line}"))?;
            if line.starts_with(&tty) {
                mtty.push(us);
            } else if line.starts_with(&nvme) {
                nvme_p.push(us);
            }
        }
    }
    let before = rounds_done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    if rounds_done.load(Ordering::Relaxed) == before {
        bail!("NVMe I/O stopped after the upgrades");
    }
    stop.store(true, Ordering::Relaxed);
    io.join()
        .map_err(|_| anyhow::anyhow!("the I/O thread panicked"))??;
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    if mtty.len() != rounds as usize || nvme_p.len() != rounds as usize {
        bail!(
            "upgrade reported {} mtty and {} mnvme pauses",
            mtty.len(),
            nvme_p.len()
        );
    }
    Ok(Upgrades {
        mtty,
        nvme: nvme_p,
        whole,
        nvme_worst: worst_ns.load(Ordering::Relaxed) as f64 / 1e9,
        nvme_rounds: rounds_done.load(Ordering::Relaxed),
        echo_worst,
        echo_idle,
    })
}
