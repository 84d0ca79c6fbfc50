//! `umdev-bench-nvme`: 4 KiB random reads from a mediated NVMe controller (mnvme, served by
//! the real `umdevd` in one-device mode) by a VMM-side driver in this process, against the
//! same command loop without the framework, measured in the same run.
//!
//! The driver (`umdev_client::nvme`) maps a memfd as guest memory (DMA-mapped with its fd,
//! so the controller pins it and reaches it in place), enables MSI-X (the admin queue's
//! vector), creates one I/O queue pair of 256 entries without interrupts (a polled queue)
//! and keeps QD reads of 8 blocks at random 4 KiB-aligned LBAs in flight: it spins on the
//! completion queue in memory (`Nvme::reap`: no system call), and after N completions
//! pushes N new reads and rings once. Every command's latency runs from its submission
//! (just before its SQE is written) to the moment its completion was seen. Every
//! completion's data is checked: each 4 KiB block of the namespace carries a stamp at both
//! ends, written through the controller before the first timed run.
//!
//! Doorbell modes: `trapped` (each doorbell a REGION_WRITE that waits for its reply),
//! `trapped-posted` (REGION_WRITE with No_reply, QEMU's default), `shadow` (Doorbell Buffer
//! Config: the driver writes shadow doorbells in memory and rings only when EventIdx asks).
//! `shadow-posted` is shadow doorbells whose real doorbell writes (when EventIdx asks) are
//! posted, as a VMM that posts its MMIO writes would send them. `ioeventfd` is shadow
//! doorbells with the controller's SQ tail ioeventfds (DEVICE_GET_REGION_IO_FDS): a tail
//! doorbell EventIdx asks for is an eventfd write, no message; CQ head doorbells stay
//! posted region writes (mnvme offers no eventfd for them). `mmap` is named but not
//! measured: the controller does not offer it yet.
//!
//! The floor: one thread of this process, no locks and no system calls: the same SQE and
//! CQE layout in plain memory, the "controller" reads each SQE, copies 4 KiB from a
//! pre-touched namespace in memory into the data buffer and writes the CQE; the driver
//! reaps by phase. A second reference does the copy with `pread` from a tmpfs file, as the
//! controller's namespace does (one system call per command).
//!
//! Device CPU is the `umdevd` process's utime + stime (`/proc/PID/stat`, clock ticks) over
//! the timed window, with a breakdown by thread name; "IOPS per device core" divides by
//! it. The driver runs on CPU 0 and every `umdevd` thread on CPU 1. What else ran on those
//! CPUs (`/proc/stat` busy time not ours) and the time the hypervisor stole are printed
//! per row; a row with more than 0.05 of either is marked DISTURBED.
//!
//! Goals (shadow doorbells): >= 0.7x the floor's IOPS, >= 1M IOPS per device core, QD 1
//! p50 latency within 1.5x of the floor's.
//!
//! Run: `cargo build --release -p umdev-bench -p umdevd --bins &&
//! target/release/umdev-bench-nvme` (`--secs`, `--qd`, `--modes`, `--poll-us`, ...).

// Counters, queue indices and byte patterns here are small or wrap on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use umdev_client::nvme::{op, reg, HostMemory, Nvme, NvmeOptions, Sqe};
use umdev_client::Client;

/// Bytes per read.
const BLOCK: u64 = 4096;
/// 512-byte logical blocks per read.
const LBAS: u32 = 8;
/// Entries of the I/O queues (device and floor).
const DEPTH: u32 = 256;
/// Guest memory given to the controller.
const HOST_MEM: u64 = 64 << 20;
/// Where that memory sits in the device's IOVA space.
const HOST_IOVA: u64 = 0x1_0000_0000;
/// Bytes per write command while the namespace is filled (the controller's MDTS).
const FILL_CHUNK: u64 = 128 << 10;
/// VFIO's MSI-X interrupt index.
const MSIX_IRQ_INDEX: u32 = 2;
/// No completion for this long: the controller is reported as hung.
const HANG: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(about = "Prints umdev's mediated NVMe figures: 4 KiB random reads against a floor")]
struct Args {
    /// Timed seconds per configuration.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Warm-up seconds before each timed window.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Queue depths (at most 255).
    #[arg(long, value_delimiter = ',', default_values = ["1", "32", "128"])]
    qd: Vec<u32>,
    /// Doorbell modes.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values = ["trapped", "trapped-posted", "shadow", "shadow-posted", "ioeventfd", "mmap"]
    )]
    modes: Vec<Mode>,
    /// MiB of the namespace the reads cover (written before the first timed run).
    #[arg(long, default_value_t = 256)]
    span_mib: u64,
    /// The controller's `poll_us` option (default: the driver's default).
    #[arg(long)]
    poll_us: Option<u64>,
    /// umdevd's `--spin-us` (the session thread polls its socket before sleeping).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Skip the floor and its pread reference.
    #[arg(long)]
    no_floor: bool,
    /// Do not check the data of each completion (nor in the floor).
    #[arg(long)]
    no_verify: bool,
    /// CPU of the driver (and the floor).
    #[arg(long, default_value_t = 0)]
    driver_cpu: usize,
    /// CPU of every umdevd thread.
    #[arg(long, default_value_t = 1)]
    device_cpu: usize,
    /// The daemon (default: next to this binary).
    #[arg(long)]
    umdevd: Option<PathBuf>,
}

/// How the driver tells the controller about new commands and consumed completions.
/// Another doorbell mechanism is one more variant and one more arm in [`Mode::setup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Each doorbell a REGION_WRITE that waits for its reply (the driver's default).
    Trapped,
    /// Each doorbell a posted REGION_WRITE (No_reply), as QEMU sends them by default.
    TrappedPosted,
    /// Shadow doorbells and EventIdx (Doorbell Buffer Config).
    Shadow,
    /// Shadow doorbells; the real doorbell writes EventIdx asks for are posted.
    ShadowPosted,
    /// Shadow doorbells; SQ tail doorbells through the controller's ioeventfds, CQ head
    /// doorbells posted.
    Ioeventfd,
    /// Doorbells in an mmap'd sparse area polled by the controller (not offered yet).
    Mmap,
}

/// What a mode needs from the daemon and the driver.
struct Setup {
    /// Parent options (`--opt`).
    daemon_opts: &'static [&'static str],
    /// Ask for Doorbell Buffer Config.
    shadow: bool,
    /// Post doorbell writes.
    posted: bool,
    /// Ring through the controller's doorbell ioeventfds where it offers them.
    ioeventfds: bool,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Trapped => "trapped",
            Mode::TrappedPosted => "trapped-posted",
            Mode::Shadow => "shadow",
            Mode::ShadowPosted => "shadow-posted",
            Mode::Ioeventfd => "ioeventfd",
            Mode::Mmap => "mmap",
        }
    }

    /// The mode's setup, or why it cannot be measured.
    fn setup(self) -> Result<Setup, &'static str> {
        match self {
            Mode::Trapped => Ok(Setup {
                daemon_opts: &["shadow_doorbells=false"],
                shadow: false,
                posted: false,
                ioeventfds: false,
            }),
            Mode::TrappedPosted => Ok(Setup {
                daemon_opts: &["shadow_doorbells=false"],
                shadow: false,
                posted: true,
                ioeventfds: false,
            }),
            Mode::Shadow => Ok(Setup {
                daemon_opts: &[],
                shadow: true,
                posted: false,
                ioeventfds: false,
            }),
            Mode::ShadowPosted => Ok(Setup {
                daemon_opts: &[],
                shadow: true,
                posted: true,
                ioeventfds: false,
            }),
            Mode::Ioeventfd => Ok(Setup {
                daemon_opts: &[],
                shadow: true,
                posted: true,
                ioeventfds: true,
            }),
            Mode::Mmap => Err("mnvme's doorbells are not in an mmap'able sparse area yet"),
        }
    }
}

/// A tiny xorshift generator: random LBAs, no statistics needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The stamps at the start and the end of 4 KiB block `block` of the namespace.
fn stamps(seed: u64, block: u64) -> (u64, u64) {
    let a = seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (a, !a.rotate_left(17))
}

/// Fills `buf` (whole 4 KiB blocks, the first being `first`) with the namespace's pattern.
fn pattern(buf: &mut [u8], seed: u64, first: u64) {
    let bs = BLOCK as usize;
    for (i, b) in buf.chunks_exact_mut(bs).enumerate() {
        let block = first + i as u64;
        b.fill(block as u8 | 1);
        let (head, tail) = stamps(seed, block);
        b[..8].copy_from_slice(&head.to_le_bytes());
        b[bs - 8..].copy_from_slice(&tail.to_le_bytes());
    }
}

fn word(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))
}

/// Latencies in a fixed histogram (no allocation while recording): 5 ns buckets below
/// 100 us, 1 us buckets below 10 ms, one bucket above.
struct Hist {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

const FINE_NS: u64 = 5;
const FINE_END: u64 = 100_000;
const COARSE_NS: u64 = 1_000;
const COARSE_END: u64 = 10_000_000;
const FINE_BUCKETS: usize = (FINE_END / FINE_NS) as usize;
const BUCKETS: usize = FINE_BUCKETS + ((COARSE_END - FINE_END) / COARSE_NS) as usize + 1;

impl Hist {
    fn new() -> Hist {
        Hist {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }

    fn reset(&mut self) {
        self.buckets.fill(0);
        self.count = 0;
        self.sum_ns = 0;
        self.max_ns = 0;
    }

    #[inline]
    fn add(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = if ns < FINE_END {
            (ns / FINE_NS) as usize
        } else if ns < COARSE_END {
            FINE_BUCKETS + ((ns - FINE_END) / COARSE_NS) as usize
        } else {
            BUCKETS - 1
        };
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// The `p`-th percentile (0..1), in microseconds (the middle of its bucket).
    fn pct(&self, p: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let rank = ((self.count as f64 * p).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let ns = if i < FINE_BUCKETS {
                    i as f64 * FINE_NS as f64 + FINE_NS as f64 / 2.0
                } else if i < BUCKETS - 1 {
                    FINE_END as f64
                        + (i - FINE_BUCKETS) as f64 * COARSE_NS as f64
                        + COARSE_NS as f64 / 2.0
                } else {
                    self.max_ns as f64
                };
                return ns / 1e3;
            }
        }
        self.max_ns as f64 / 1e3
    }

    fn mean_us(&self) -> f64 {
        self.sum_ns as f64 / self.count.max(1) as f64 / 1e3
    }
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

fn pin_thread(tid: Option<rustix::process::Pid>, cpu: usize) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(tid, &set)
        .with_context(|| format!("pinning thread {tid:?} to CPU {cpu}"))
}

/// utime + stime (clock ticks) and the name in a `/proc/.../stat` file.
fn stat_ticks(path: &Path) -> Result<(String, u64)> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let open = s.find('(').context("stat: no name")?;
    let close = s.rfind(')').context("stat: no name")?;
    let name = s[open + 1..close].to_owned();
    // Fields after the name start at field 3 (state); utime and stime are fields 14, 15.
    let f: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        f.get(n - 3)
            .context("stat: too few fields")?
            .parse::<u64>()
            .context("stat: not a number")
    };
    Ok((name, field(14)? + field(15)?))
}

/// A process's CPU time: the whole process, and per live thread (by tid).
struct CpuSnap {
    total: u64,
    threads: Vec<(u32, String, u64)>,
}

fn cpu_snap(pid: u32) -> Result<CpuSnap> {
    let (_, total) = stat_ticks(Path::new(&format!("/proc/{pid}/stat")))?;
    let mut threads = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        // A thread may end between the listing and the read.
        if let Ok((name, ticks)) = stat_ticks(&e.path().join("stat")) {
            threads.push((tid, name, ticks));
        }
    }
    Ok(CpuSnap { total, threads })
}

/// CPU seconds between two snapshots: the process's, and by thread name.
fn cpu_delta(a: &CpuSnap, b: &CpuSnap, tick: f64) -> (f64, Vec<(String, f64)>) {
    let mut by_name: Vec<(String, f64)> = Vec::new();
    for (tid, name, ticks) in &b.threads {
        let before = a.threads.iter().find(|t| t.0 == *tid).map_or(0, |t| t.2);
        let secs = ticks.saturating_sub(before) as f64 * tick;
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 += secs,
            None => by_name.push((name.clone(), secs)),
        }
    }
    by_name.sort_by(|x, y| y.1.total_cmp(&x.1));
    (b.total.saturating_sub(a.total) as f64 * tick, by_name)
}

/// Busy (user, nice, system, irq, softirq) and stolen clock ticks of two CPUs, from
/// `/proc/stat`: what else ran on the driver's and the device's CPUs.
fn cpu_ticks(cpus: [usize; 2]) -> Result<[(u64, u64); 2]> {
    let s = std::fs::read_to_string("/proc/stat")?;
    let mut out = [(0, 0); 2];
    for (o, cpu) in out.iter_mut().zip(cpus) {
        let tag = format!("cpu{cpu} ");
        let line = s
            .lines()
            .find(|l| l.starts_with(&tag))
            .with_context(|| format!("no CPU {cpu} in /proc/stat"))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        *o = (at(0) + at(1) + at(2) + at(5) + at(6), at(7));
    }
    Ok(out)
}

/// Other load and steal on the two CPUs over `wall` seconds, given the CPU seconds the
/// benchmark's own threads used on each.
fn others(
    a: [(u64, u64); 2],
    b: [(u64, u64); 2],
    ours: [f64; 2],
    tick: f64,
    wall: f64,
) -> [(f64, f64); 2] {
    let mut out = [(0.0, 0.0); 2];
    for i in 0..2 {
        let busy = b[i].0.saturating_sub(a[i].0) as f64 * tick;
        let steal = b[i].1.saturating_sub(a[i].1) as f64 * tick;
        out[i] = (((busy - ours[i]) / wall).max(0.0), steal / wall);
    }
    out
}

/// The daemon in one-device mode.
struct Daemon {
    child: Child,
    pid: u32,
}

impl Daemon {
    fn start(
        umdevd: &Path,
        socket: &Path,
        uuid: &str,
        opts: &[String],
        spin_us: Option<u64>,
    ) -> Result<Daemon> {
        let mut cmd = Command::new(umdevd);
        cmd.arg("--socket")
            .arg(socket)
            .arg("--type")
            .arg("mnvme-1g")
            .arg("--uuid")
            .arg(uuid);
        for o in opts {
            cmd.arg("--opt").arg(o);
        }
        if let Some(s) = spin_us {
            cmd.arg("--spin-us").arg(s.to_string());
        }
        let mut child = cmd
            .env("UMDEV_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", umdevd.display()))?;
        let pid = child.id();
        let out = child.stdout.take().context("no stdout")?;
        let d = Daemon { child, pid };
        let mut lines = BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(line) if line.as_deref().ok() == Some("ready") => break,
                Some(line) => {
                    line?;
                }
                None => bail!("umdevd exited before it was ready"),
            }
        }
        // Whatever it prints later is read (and dropped) so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(d)
    }

    /// Pins every thread to `cpu` (threads started later inherit it from their creator);
    /// returns how many there are.
    fn pin(&self, cpu: usize) -> Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(format!("/proc/{}/task", self.pid))? {
            let tid = e?
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
                .and_then(rustix::process::Pid::from_raw);
            if let Some(tid) = tid {
                pin_thread(Some(tid), cpu)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// SIGTERM, then waits up to 10 s for the exit.
    fn stop(mut self) -> Result<()> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("umdevd exited with {status} after SIGTERM");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("umdevd did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one configuration measured.
#[derive(Default)]
struct Figures {
    iops: f64,
    p50: f64,
    p99: f64,
    mean: f64,
    /// Device CPU seconds per second (None: no separate device).
    dev_cores: Option<f64>,
    /// Device CPU by thread name, in cores.
    dev_threads: Vec<(String, f64)>,
    drv_cores: f64,
    /// Other load and steal (cores) on the driver's and the device's CPUs.
    others: Option<[(f64, f64); 2]>,
    /// Doorbells per command: region writes and ioeventfd signals.
    doorbells_per_cmd: Option<f64>,
    /// Of which ioeventfd signals.
    iofd_per_cmd: Option<f64>,
    commands: u64,
    errors: u64,
    first_error: Option<u16>,
    mismatches: u64,
}

/// The timed window of a run: warm-up, then `secs` of measurement.
struct Window {
    warm_end: Instant,
    secs: Duration,
    start: Option<Instant>,
}

impl Window {
    fn new(warmup: f64, secs: f64) -> Window {
        Window {
            warm_end: Instant::now() + Duration::from_secs_f64(warmup),
            secs: Duration::from_secs_f64(secs),
            start: None,
        }
    }

    /// Whether the window starts at `now`.
    fn starts(&self, now: Instant) -> bool {
        self.start.is_none() && now >= self.warm_end
    }

    /// Whether the window is over at `now`.
    fn over(&self, now: Instant) -> bool {
        self.start
            .is_some_and(|s| now.duration_since(s) >= self.secs)
    }
}

/// The driver's bookkeeping: per command id its submission time, data slot and block.
struct Driver {
    at: Vec<Instant>,
    slot: Vec<u16>,
    block: Vec<u64>,
    free: Vec<u16>,
    bufs: Vec<u64>,
    rng: Rng,
    blocks: u64,
    seed: u64,
    verify: bool,
}

impl Driver {
    fn new(bufs: &[u64], qd: u32, blocks: u64, seed: u64, verify: bool) -> Driver {
        let now = Instant::now();
        Driver {
            at: vec![now; 1 << 16],
            slot: vec![0; 1 << 16],
            block: vec![0; 1 << 16],
            free: (0..qd as u16).rev().collect(),
            bufs: bufs.to_vec(),
            rng: Rng(seed | 1),
            blocks,
            seed,
            verify,
        }
    }

    /// Pushes one read at a random 4 KiB block into a free slot.
    fn submit(&mut self, n: &mut Nvme, now: Instant) -> Result<()> {
        let slot = self.free.pop().context("no free slot")?;
        let buf = self.bufs[usize::from(slot)];
        let block = self.rng.next() % self.blocks;
        if self.verify {
            // Clear the stamps: a read that copies nothing cannot pass the check.
            n.mem.write(buf, &[0; 8])?;
            n.mem.write(buf + BLOCK - 8, &[0; 8])?;
        }
        let cid = n.push(
            1,
            Sqe::rw(op::READ, 1, block * u64::from(LBAS), LBAS, buf, 0),
        )?;
        let i = usize::from(cid);
        self.at[i] = now;
        self.slot[i] = slot;
        self.block[i] = block;
        Ok(())
    }

    /// Whether the data of command `cid` is the block it asked for.
    fn check(&self, n: &Nvme, cid: u16) -> Result<bool> {
        let i = usize::from(cid);
        let buf = self.bufs[usize::from(self.slot[i])];
        let (head, tail) = stamps(self.seed, self.block[i]);
        let mut b = [0u8; 8];
        n.mem.read(buf, &mut b)?;
        let h = word(&b);
        n.mem.read(buf + BLOCK - 8, &mut b)?;
        Ok(h == head && word(&b) == tail)
    }
}

/// QD reads in flight against the controller for the window; then the rest drained.
fn run_device(
    n: &mut Nvme,
    d: &Daemon,
    bufs: &[u64],
    qd: u32,
    args: &Args,
    cx: &Ctx,
) -> Result<Figures> {
    const Q: u16 = 1;
    let mut drv = Driver::new(bufs, qd, cx.blocks, cx.seed, !args.no_verify);
    let mut hist = Hist::new();
    let mut f = Figures::default();
    let mut win = Window::new(args.warmup, args.secs);
    let (mut cpu0, mut drv0, mut db0, mut iofd0) = (None, Duration::ZERO, 0, 0);
    let cpus = [args.driver_cpu, args.device_cpu];
    let mut sys0 = [(0, 0); 2];
    let end;
    let now = Instant::now();
    for _ in 0..qd {
        drv.submit(n, now)?;
    }
    n.ring(Q)?;
    let mut last = Instant::now();
    let mut spins = 0u32;
    loop {
        let done = n.reap(Q)?;
        if done.is_empty() {
            spins = spins.wrapping_add(1);
            if spins % 4096 == 0 && last.elapsed() > HANG {
                return Err(hung(n, qd - drv.free.len() as u32));
            }
            std::hint::spin_loop();
            continue;
        }
        let now = Instant::now();
        last = now;
        let measuring = win.start.is_some();
        for c in &done {
            let i = usize::from(c.cid);
            if measuring {
                hist.add(now.duration_since(drv.at[i]));
                f.commands += 1;
            }
            if !c.ok() {
                f.errors += 1;
                f.first_error.get_or_insert(c.status);
            } else if drv.verify && !drv.check(n, c.cid)? {
                f.mismatches += 1;
            }
            drv.free.push(drv.slot[i]);
        }
        if win.starts(now) {
            cpu0 = Some(cpu_snap(d.pid)?);
            sys0 = cpu_ticks(cpus)?;
            drv0 = thread_cpu();
            db0 = n.doorbells;
            iofd0 = n.iofd_signals;
            hist.reset();
            f.commands = 0;
            win.start = Some(Instant::now());
        } else if win.over(now) {
            end = Some(now);
            break;
        }
        for _ in 0..done.len() {
            drv.submit(n, now)?;
        }
        n.ring(Q)?;
    }
    let (Some(start), Some(end), Some(cpu0)) = (win.start, end, cpu0) else {
        bail!("the window never started");
    };
    let drv_cpu = thread_cpu() - drv0;
    let doorbells = n.doorbells - db0;
    let signals = n.iofd_signals - iofd0;
    let cpu1 = cpu_snap(d.pid)?;
    let sys1 = cpu_ticks(cpus)?;
    let wall = end.duration_since(start).as_secs_f64();
    // Drain what is still in flight (not counted).
    let mut last = Instant::now();
    while drv.free.len() < qd as usize {
        let done = n.reap(Q)?;
        if done.is_empty() {
            if last.elapsed() > HANG {
                return Err(hung(n, qd - drv.free.len() as u32));
            }
            std::hint::spin_loop();
            continue;
        }
        last = Instant::now();
        for c in &done {
            drv.free.push(drv.slot[usize::from(c.cid)]);
        }
    }
    let (dev, threads) = cpu_delta(&cpu0, &cpu1, cx.tick);
    f.iops = f.commands as f64 / wall;
    f.p50 = hist.pct(0.50);
    f.p99 = hist.pct(0.99);
    f.mean = hist.mean_us();
    f.dev_cores = Some(dev / wall);
    f.dev_threads = threads.into_iter().map(|(n, s)| (n, s / wall)).collect();
    f.drv_cores = drv_cpu.as_secs_f64() / wall;
    f.others = Some(others(
        sys0,
        sys1,
        [drv_cpu.as_secs_f64(), dev],
        cx.tick,
        wall,
    ));
    let per = |k: u64| k as f64 / f.commands.max(1) as f64;
    f.doorbells_per_cmd = Some(per(doorbells + signals));
    f.iofd_per_cmd = (signals > 0).then(|| per(signals));
    Ok(f)
}

/// The error for a controller that stopped completing: what is known, printed at once
/// (CSTS is read after, a round trip that may itself hang).
fn hung(n: &mut Nvme, in_flight: u32) -> anyhow::Error {
    eprintln!(
        "no completion for {} s with {in_flight} reads in flight; reading CSTS",
        HANG.as_secs()
    );
    match n.read_reg32(reg::CSTS) {
        Ok(csts) => anyhow::anyhow!(
            "controller hung: no completion for {} s, {in_flight} in flight, CSTS {csts:#x}",
            HANG.as_secs()
        ),
        Err(e) => anyhow::anyhow!("controller hung and CSTS unreadable: {e}"),
    }
}

/// Where the floor's "controller" copies from.
enum Source<'a> {
    /// The namespace in memory (the floor).
    Memory(&'a [u8]),
    /// A file on tmpfs, read with pread (the reference with a system call per command).
    File(File),
}

/// The floor's controller: rings and data in plain memory, one thread with its driver.
struct FloorCtrl<'a> {
    src: Source<'a>,
    sq: Vec<u8>,
    cq: Vec<u8>,
    data: Vec<u8>,
    head: u32,
    tail: u32,
    phase: bool,
}

impl FloorCtrl<'_> {
    /// Runs every command from the SQ head to `sq_tail`: fetch, copy, complete.
    #[inline(never)]
    fn run(&mut self, sq_tail: u32) -> Result<()> {
        while self.head != sq_tail {
            let at = self.head as usize * 64;
            let e = &self.sq[at..at + 64];
            let opcode = e[0];
            let cid = u16::from_le_bytes([e[2], e[3]]);
            let nsid = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            let prp1 = word(&e[24..32]);
            let slba = word(&e[40..48]);
            let nlb = u64::from(u16::from_le_bytes([e[48], e[49]])) + 1;
            self.head = (self.head + 1) % DEPTH;
            let mut status = 0u16;
            let (off, len) = (slba * 512, nlb * 512);
            let to = usize::try_from(prp1)?;
            let n = usize::try_from(len)?;
            if opcode != op::READ || nsid != 1 || to + n > self.data.len() {
                status = 0x002;
            } else {
                let dst = &mut self.data[to..to + n];
                match &self.src {
                    Source::Memory(ns) => {
                        let o = usize::try_from(off)?;
                        match ns.get(o..o + n) {
                            Some(s) => dst.copy_from_slice(s),
                            None => status = 0x080,
                        }
                    }
                    Source::File(file) => {
                        if file.read_exact_at(dst, off).is_err() {
                            status = 0x080;
                        }
                    }
                }
            }
            let mut cqe = [0u8; 16];
            cqe[8..10].copy_from_slice(&(self.head as u16).to_le_bytes());
            cqe[10..12].copy_from_slice(&1u16.to_le_bytes());
            let dw3 = u32::from(cid) | (u32::from(self.phase) << 16) | (u32::from(status) << 17);
            cqe[12..16].copy_from_slice(&dw3.to_le_bytes());
            let at = self.tail as usize * 16;
            self.cq[at..at + 16].copy_from_slice(&cqe);
            self.tail = (self.tail + 1) % DEPTH;
            if self.tail == 0 {
                self.phase = !self.phase;
            }
        }
        Ok(())
    }
}

/// The floor: the same command loop in one thread, no framework.
fn run_floor(
    src: Source<'_>,
    qd: u32,
    args: &Args,
    blocks: u64,
    seed: u64,
    tick: f64,
) -> Result<Figures> {
    let mut ctrl = FloorCtrl {
        src,
        sq: vec![0; DEPTH as usize * 64],
        cq: vec![0; DEPTH as usize * 16],
        data: vec![0; qd as usize * BLOCK as usize],
        head: 0,
        tail: 0,
        phase: true,
    };
    let verify = !args.no_verify;
    let bufs: Vec<u64> = (0..u64::from(qd)).map(|i| i * BLOCK).collect();
    let mut drv = Driver::new(&bufs, qd, blocks, seed, verify);
    let (mut sq_tail, mut cq_head, mut phase) = (0u32, 0u32, true);
    let mut next_cid = 0u16;
    let mut hist = Hist::new();
    let mut f = Figures::default();
    let mut win = Window::new(args.warmup, args.secs);
    let end;
    let cpus = [args.driver_cpu, args.device_cpu];
    let (mut sys0, mut cpu0) = ([(0, 0); 2], Duration::ZERO);

    // Writes one read's SQE at the tail (the driver's half of the loop).
    let submit = |drv: &mut Driver,
                  ctrl: &mut FloorCtrl<'_>,
                  sq_tail: &mut u32,
                  next_cid: &mut u16,
                  now: Instant|
     -> Result<()> {
        let slot = drv.free.pop().context("no free slot")?;
        let buf = drv.bufs[usize::from(slot)];
        let block = drv.rng.next() % drv.blocks;
        let b = usize::try_from(buf)?;
        if drv.verify {
            ctrl.data[b..b + 8].fill(0);
            ctrl.data[b + BLOCK as usize - 8..b + BLOCK as usize].fill(0);
        }
        let cid = *next_cid;
        *next_cid = next_cid.wrapping_add(1);
        let mut dw = Sqe::rw(op::READ, 1, block * u64::from(LBAS), LBAS, buf, 0).0;
        dw[0] |= u32::from(cid) << 16;
        let at = *sq_tail as usize * 64;
        for (i, w) in dw.iter().enumerate() {
            ctrl.sq[at + i * 4..at + i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        *sq_tail = (*sq_tail + 1) % DEPTH;
        let i = usize::from(cid);
        drv.at[i] = now;
        drv.slot[i] = slot;
        drv.block[i] = block;
        Ok(())
    };

    let now = Instant::now();
    for _ in 0..qd {
        submit(&mut drv, &mut ctrl, &mut sq_tail, &mut next_cid, now)?;
    }
    loop {
        ctrl.run(sq_tail)?;
        let now = Instant::now();
        let measuring = win.start.is_some();
        let mut reaped = 0;
        loop {
            let at = cq_head as usize * 16;
            let dw3 = u32::from_le_bytes(ctrl.cq[at + 12..at + 16].try_into()?);
            if (dw3 >> 16) & 1 != u32::from(phase) {
                break;
            }
            let cid = dw3 as u16;
            let status = (dw3 >> 17) as u16 & 0x7ff;
            let i = usize::from(cid);
            if measuring {
                hist.add(now.duration_since(drv.at[i]));
                f.commands += 1;
            }
            let b = usize::try_from(drv.bufs[usize::from(drv.slot[i])])?;
            if status != 0 {
                f.errors += 1;
                f.first_error.get_or_insert(status);
            } else if drv.verify {
                let (head, tail) = stamps(drv.seed, drv.block[i]);
                let e = b + BLOCK as usize;
                if word(&ctrl.data[b..b + 8]) != head || word(&ctrl.data[e - 8..e]) != tail {
                    f.mismatches += 1;
                }
            }
            drv.free.push(drv.slot[i]);
            reaped += 1;
            cq_head = (cq_head + 1) % DEPTH;
            if cq_head == 0 {
                phase = !phase;
            }
        }
        if win.starts(now) {
            sys0 = cpu_ticks(cpus)?;
            cpu0 = thread_cpu();
            hist.reset();
            f.commands = 0;
            win.start = Some(Instant::now());
        } else if win.over(now) {
            end = Some(now);
            break;
        }
        for _ in 0..reaped {
            submit(&mut drv, &mut ctrl, &mut sq_tail, &mut next_cid, now)?;
        }
    }
    let (Some(start), Some(end)) = (win.start, end) else {
        bail!("the window never started");
    };
    let cpu = (thread_cpu() - cpu0).as_secs_f64();
    let sys1 = cpu_ticks(cpus)?;
    let wall = end.duration_since(start).as_secs_f64();
    f.iops = f.commands as f64 / wall;
    f.p50 = hist.pct(0.50);
    f.p99 = hist.pct(0.99);
    f.mean = hist.mean_us();
    f.drv_cores = cpu / wall;
    f.others = Some(others(sys0, sys1, [cpu, 0.0], tick, wall));
    Ok(f)
}

fn fmt_iops(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else {
        format!("{:.0}k", v / 1e3)
    }
}

fn header() {
    println!(
        "{:<16} {:>4} {:>8} {:>9} {:>13} {:>9} {:>8} {:>8} {:>8} {:>10} {:>10} {:>7}",
        "mode",
        "QD",
        "IOPS",
        "dev cores",
        "IOPS/dev core",
        "drv cores",
        "p50 us",
        "p99 us",
        "mean us",
        "IOPS/floor",
        "p50/floor",
        "DB/cmd"
    );
}

fn row(name: &str, qd: u32, f: &Figures, floor: Option<&Figures>) {
    let opt = |v: Option<f64>, w: usize, p: usize| match v {
        Some(v) => format!("{v:>w$.p$}"),
        None => format!("{:>w$}", "-"),
    };
    let per_core = f.dev_cores.map(|c| fmt_iops(f.iops / c.max(1e-9)));
    println!(
        "{:<16} {:>4} {:>8} {} {:>13} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {} {} {}",
        name,
        qd,
        fmt_iops(f.iops),
        opt(f.dev_cores, 9, 2),
        per_core.unwrap_or_else(|| "-".into()),
        f.drv_cores,
        f.p50,
        f.p99,
        f.mean,
        opt(floor.map(|fl| f.iops / fl.iops), 10, 2),
        opt(floor.map(|fl| f.p50 / fl.p50), 10, 2),
        opt(f.doorbells_per_cmd, 7, 3),
    );
    let mut notes = Vec::new();
    if !f.dev_threads.is_empty() {
        let t: Vec<String> = f
            .dev_threads
            .iter()
            .filter(|(_, c)| *c >= 0.005)
            .map(|(n, c)| format!("{n} {c:.2}"))
            .collect();
        notes.push(format!("device threads (cores): {}", t.join(", ")));
    }
    if let Some(s) = f.iofd_per_cmd {
        notes.push(format!("eventfd signals/cmd {s:.3}"));
    }
    if let Some([(o0, s0), (o1, s1)]) = f.others {
        // The floor uses the driver's CPU only.
        let device = f.dev_cores.is_some();
        let disturbed = if o0 > 0.05 || s0 > 0.05 || (device && (o1 > 0.05 || s1 > 0.05)) {
            " DISTURBED"
        } else {
            ""
        };
        notes.push(format!(
            "other load: {o0:.2} + {o1:.2}, steal {s0:.2} + {s1:.2} (driver CPU + device CPU){disturbed}"
        ));
    }
    if !notes.is_empty() {
        println!("{:<22}{}", "", notes.join("; "));
    }
    if f.errors > 0 || f.mismatches > 0 {
        println!(
            "{:<22}PROBLEM: {} commands failed (first status {:#x}), {} reads returned wrong data",
            "",
            f.errors,
            f.first_error.unwrap_or(0),
            f.mismatches
        );
    }
}

fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned());
    let clock =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .map_or_else(|_| "?".into(), |s| s.trim().to_owned());
    format!("{cpus} CPUs, {model}, Linux {kernel}, clocksource {clock}")
}

/// Writes the pattern over the first `blocks` 4 KiB blocks through the controller.
fn fill(n: &mut Nvme, stage: u64, blocks: u64, seed: u64) -> Result<()> {
    let per = FILL_CHUNK / BLOCK;
    let (p1, p2) = n.prps(stage, FILL_CHUNK)?;
    let mut chunk = vec![0u8; FILL_CHUNK as usize];
    let mut b = 0;
    while b < blocks {
        let k = per.min(blocks - b);
        let bytes = (k * BLOCK) as usize;
        pattern(&mut chunk[..bytes], seed, b);
        n.mem.write(stage, &chunk[..bytes])?;
        let nlb = (k * u64::from(LBAS)) as u32;
        let c = n.submit_wait(1, Sqe::rw(op::WRITE, 1, b * u64::from(LBAS), nlb, p1, p2))?;
        if !c.ok() {
            bail!("a write of the fill failed with status {:#x}", c.status);
        }
        b += k;
    }
    Ok(())
}

struct Ctx {
    umdevd: PathBuf,
    dir: PathBuf,
    uuid: String,
    blocks: u64,
    seed: u64,
    tick: f64,
}

/// One doorbell mode: a daemon with its options, a driver, every QD.
fn run_mode(
    mode: Mode,
    setup: &Setup,
    args: &Args,
    cx: &Ctx,
    filled: &mut bool,
) -> Result<Vec<(u32, Figures)>> {
    let mut opts = vec![
        format!("pool={}", cx.dir.join("pool").display()),
        "capacity_gib=1".to_owned(),
    ];
    opts.extend(setup.daemon_opts.iter().map(|s| (*s).to_owned()));
    if let Some(p) = args.poll_us {
        opts.push(format!("poll_us={p}"));
    }
    let socket = cx.dir.join(format!("{}.sock", mode.name()));
    let d = Daemon::start(&cx.umdevd, &socket, &cx.uuid, &opts, args.spin_us)?;
    d.pin(args.device_cpu)?;
    let mut c = Client::connect(&socket).context("connecting")?;
    // MSI-X on, as a guest driver enables it first (mnvme refuses shadow doorbells on
    // INTx), with an eventfd for vector 0 (the admin queue); the I/O queue is created
    // without interrupts: polled, as a guest's poll queues are.
    let irq = rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )?;
    c.set_irq_eventfds(
        MSIX_IRQ_INDEX,
        umdev_proto::wire::IRQ_SET_ACTION_TRIGGER,
        0,
        &[irq.as_fd()],
    )
    .context("enabling MSI-X")?;
    let mem = HostMemory::shared(&mut c, HOST_IOVA, HOST_MEM)?;
    let o = NvmeOptions {
        io_queues: 1,
        depth: DEPTH,
        shadow_doorbells: setup.shadow,
        interrupts: false,
    };
    let mut n = Nvme::enable(c, mem.clone(), &o).context("enabling the controller")?;
    // The admin queue's interrupts are not waited for: the eventfd lives with the driver.
    let _irq = irq;
    if n.shadow_doorbells() != setup.shadow {
        bail!(
            "{}: shadow doorbells {} (asked {})",
            mode.name(),
            n.shadow_doorbells(),
            setup.shadow
        );
    }
    n.set_posted_doorbells(setup.posted);
    if setup.ioeventfds && n.use_ioeventfds()? == 0 {
        bail!(
            "{}: the controller offered no doorbell ioeventfds",
            mode.name()
        );
    }
    if n.blocks < cx.blocks * u64::from(LBAS) {
        bail!("the namespace has {} blocks, too few", n.blocks);
    }
    let max_qd = args.qd.iter().copied().max().unwrap_or(1);
    let bufs: Vec<u64> = (0..max_qd).map(|_| mem.alloc(BLOCK, BLOCK)).collect();
    if !*filled {
        let stage = mem.alloc(FILL_CHUNK, BLOCK);
        let t = Instant::now();
        fill(&mut n, stage, cx.blocks, cx.seed).context("filling the namespace")?;
        println!(
            "(namespace: first {} MiB written through the controller in {:.2} s; later daemons reuse the file)",
            (cx.blocks * BLOCK) >> 20,
            t.elapsed().as_secs_f64()
        );
        *filled = true;
    }
    let threads = d.pin(args.device_cpu)?;
    let mut out = Vec::new();
    for &qd in &args.qd {
        d.pin(args.device_cpu)?;
        let f = run_device(&mut n, &d, &bufs, qd, args, cx)
            .with_context(|| format!("{} QD {qd}", mode.name()))?;
        out.push((qd, f));
    }
    let (total, signals) = (n.doorbells, n.iofd_signals);
    drop(n);
    d.stop()?;
    eprintln!(
        "({}: umdevd had {threads} threads once enabled; {total} doorbell region writes and {signals} eventfd signals in all)",
        mode.name()
    );
    Ok(out)
}

/// A different number each run (the clock and the pid).
fn entropy() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut r = Rng((t ^ (u64::from(std::process::id()) << 32)) | 1);
    r.next()
}

fn random_uuid() -> String {
    let mut r = Rng(entropy() | 1);
    let (a, b) = (r.next(), r.next());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.qd.is_empty() || args.qd.iter().any(|&q| q == 0 || q >= DEPTH) {
        bail!("queue depths must be 1..={}", DEPTH - 1);
    }
    if args.span_mib == 0 || args.span_mib > 1024 {
        bail!("--span-mib must be 1..=1024 (the namespace is 1 GiB)");
    }
    let umdevd = match &args.umdevd {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("umdevd"),
    };
    let tick = 1.0 / rustix::param::clock_ticks_per_second() as f64;
    let blocks = (args.span_mib << 20) / BLOCK;
    let seed = entropy() | 1;
    let dir = tempfile::Builder::new()
        .prefix("umdev-bench-nvme-")
        .tempdir_in("/dev/shm")
        .context("a directory under /dev/shm")?;

    // Before pinning: the CPU count is this thread's affinity.
    let machine = machine();
    pin_thread(None, args.driver_cpu)?;
    let cmdline: Vec<String> = std::env::args().collect();
    println!("umdev-bench-nvme: 4 KiB random reads (8 LBAs of 512 B, 4 KiB aligned) over the first {} MiB of a 1 GiB mnvme namespace", args.span_mib);
    println!("command: {}", cmdline.join(" "));
    println!("machine: {machine}");
    println!(
        "placement: driver thread on CPU {}, every umdevd thread on CPU {} (sched_setaffinity); the floor on CPU {}",
        args.driver_cpu, args.device_cpu, args.driver_cpu
    );
    println!(
        "device: {} --type mnvme-1g, pool {} (tmpfs), poll_us {}, spin_us {}; 1 I/O queue of {DEPTH} entries, no interrupts (polled), guest memory a 64 MiB memfd",
        umdevd.display(),
        dir.path().join("pool").display(),
        args.poll_us.map_or("default (50)".into(), |p| p.to_string()),
        args.spin_us.map_or("default (0)".into(), |p| p.to_string()),
    );
    println!(
        "per configuration: {} s warm-up, {} s timed; latency = submission to completion seen, every command; device CPU = umdevd utime+stime ({} ticks/s) / wall; {}",
        args.warmup,
        args.secs,
        rustix::param::clock_ticks_per_second(),
        if args.no_verify {
            "data not checked"
        } else {
            "every read's data checked (stamps at both ends of the 4 KiB block)"
        }
    );
    println!();

    let mut floors: Vec<(u32, Figures)> = Vec::new();
    let mut problems = 0u64;
    header();
    if !args.no_floor {
        let mut ns = vec![0u8; (blocks * BLOCK) as usize];
        pattern(&mut ns, seed, 0);
        let path = dir.path().join("floor.img");
        {
            let file = File::create(&path)?;
            file.write_all_at(&ns, 0)?;
        }
        for &qd in &args.qd {
            let f = run_floor(Source::Memory(&ns), qd, &args, blocks, seed, tick)?;
            row("floor", qd, &f, Some(&f));
            problems += f.errors + f.mismatches;
            floors.push((qd, f));
        }
        drop(ns);
        for &qd in &args.qd {
            let f = run_floor(
                Source::File(File::open(&path)?),
                qd,
                &args,
                blocks,
                seed,
                tick,
            )?;
            let fl = floors.iter().find(|x| x.0 == qd).map(|x| &x.1);
            row("floor+pread", qd, &f, fl);
            problems += f.errors + f.mismatches;
        }
        std::fs::remove_file(&path)?;
    }
    if !umdevd.exists() {
        bail!(
            "{} is not built (cargo build --release -p umdevd --bins)",
            umdevd.display()
        );
    }
    let cx = Ctx {
        umdevd,
        dir: dir.path().to_owned(),
        uuid: random_uuid(),
        blocks,
        seed,
        tick,
    };
    let mut filled = false;
    let mut results: Vec<(Mode, Vec<(u32, Figures)>)> = Vec::new();
    let mut skipped = Vec::new();
    for &mode in &args.modes {
        let setup = match mode.setup() {
            Ok(s) => s,
            Err(why) => {
                skipped.push((mode, why));
                continue;
            }
        };
        let figs = run_mode(mode, &setup, &args, &cx, &mut filled)?;
        for (qd, f) in &figs {
            let fl = floors.iter().find(|x| x.0 == *qd).map(|x| &x.1);
            row(mode.name(), *qd, f, fl);
            problems += f.errors + f.mismatches;
        }
        results.push((mode, figs));
    }
    for (mode, why) in &skipped {
        println!("{:<16} not measured: {why}", mode.name());
    }

    println!();
    println!("goals (per measured mode; the goals are set for shadow doorbells):");
    for (mode, figs) in &results {
        let best_ratio = figs
            .iter()
            .filter_map(|(qd, f)| {
                let fl = floors.iter().find(|x| x.0 == *qd)?;
                Some((f.iops / fl.1.iops, *qd))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let best_per_core = figs
            .iter()
            .filter_map(|(qd, f)| Some((f.iops / f.dev_cores?.max(1e-9), *qd)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let qd1 = figs.iter().find(|(qd, _)| *qd == 1).and_then(|(_, f)| {
            let fl = floors.iter().find(|x| x.0 == 1)?;
            Some(f.p50 / fl.1.p50)
        });
        let mut parts = Vec::new();
        if let Some((r, qd)) = best_ratio {
            parts.push(format!(
                ">= 0.7x floor IOPS: best {r:.2}x at QD {qd} ({})",
                verdict(r >= 0.7)
            ));
        }
        if let Some((v, qd)) = best_per_core {
            parts.push(format!(
                ">= 1M IOPS/device core: best {} at QD {qd} ({})",
                fmt_iops(v),
                verdict(v >= 1e6)
            ));
        }
        if let Some(r) = qd1 {
            parts.push(format!(
                "QD 1 p50 <= 1.5x floor: {r:.2}x ({})",
                verdict(r <= 1.5)
            ));
        }
        println!("  {:<16} {}", mode.name(), parts.join("; "));
    }
    if problems > 0 {
        bail!("{problems} commands failed or returned wrong data (see PROBLEM lines)");
    }
    Ok(())
}
