#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // small indices from the generator
//! Chaos (issue 12): clients that go at random points, over many iterations, against a real
//! daemon with devices created through sysfs; then a count of what the serving process
//! holds. Each iteration picks (from a fixed seed, so a failure repeats) one of: a
//! connection dropped before VERSION, or in the middle of a message; a client gone right
//! after a DMA_MAP, after pinning, or with a DMA command and a pin in flight; a client gone
//! in the middle of a migration (STOP, then STOP_COPY with data half read); an NVMe host gone
//! with commands submitted and not completed. Afterwards the daemon's open fds, threads and
//! memory mappings are what they were before the first iteration (zero leaks), a client can
//! pin the whole locked-memory budget (no pin leaked), the devices serve the next client,
//! and the definitions are as they were. `UMDEV_TEST_ISOLATION=worker` runs it again with
//! a worker per group, where the counts are the workers'.

mod mdev;

use std::time::{Duration, Instant};

use mdev::{new_uuid, workers, Daemon};
use umdev_client::nvme::{op, HostMemory, Nvme, NvmeOptions, Sqe};
use umdev_client::Client;
use umdev_proto::{wire, Command, Header};
use umdev_tests::cmd;
use zerocopy::IntoBytes;

fn config() -> String {
    format!(
        "release_timeout_ms = 300\n{}{}",
        mdev::TEST_PARENT,
        mdev::NVME_PARENT
    )
}

/// Iterations (bounded for CI).
const ITERATIONS: u64 = 60;
/// The daemon's locked-memory budget for the run, in pages.
const BUDGET_PAGES: u64 = 32;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a process holds: open fds, threads, and mappings of files (clients' memory is
/// mapped from their memfds; anonymous mappings come and go with the allocator's arenas).
#[derive(Debug, PartialEq, Eq, Clone)]
struct Held {
    fds: usize,
    threads: usize,
    file_maps: Vec<String>,
}

fn held(pid: u32) -> Held {
    let count = |p: String| std::fs::read_dir(p).map_or(0, Iterator::count);
    let mut file_maps: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            // address perms offset dev inode path
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[4] != "0").then(|| format!("{} {}", f[1], f[5..].join(" ")))
        })
        .filter(|m| !m.contains(".so") && !m.contains("umdevd"))
        .collect();
    file_maps.sort();
    Held {
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        file_maps,
    }
}

/// The processes that serve devices: the daemon's workers, or the daemon itself.
fn servers(d: &Daemon) -> Vec<u32> {
    let daemon = d.child.as_ref().unwrap().id();
    let w = workers(daemon);
    if w.is_empty() {
        vec![daemon]
    } else {
        w
    }
}

fn total(d: &Daemon) -> Vec<(u32, Held)> {
    servers(d).into_iter().map(|p| (p, held(p))).collect()
}

/// Until `f` holds or 10 s.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A client that connects, negotiates, and does something to the test device before going.
fn test_device_step(d: &Daemon, uuid: &str, step: u64, rng: &mut Rng) {
    let socket = d.socket(uuid);
    match step {
        // Dropped before VERSION.
        0 => drop(std::os::unix::net::UnixStream::connect(&socket).unwrap()),
        // Dropped in the middle of a message (half a header, or a header and half a body).
        1 => {
            let raw = umdev_tests::wire::Raw::negotiated(&socket);
            let h = Header::command(7, Command::RegionWrite, 64).unwrap();
            let bytes = h.as_bytes();
            let cut = 1 + rng.below(bytes.len() as u64 + 40) as usize;
            let mut msg = bytes.to_vec();
            msg.extend_from_slice(&[0u8; 64]);
            raw.send_raw(&msg[..cut.min(msg.len() - 1)]);
        }
        // Gone right after a DMA_MAP, after a pin, or with DMA and a pin in flight.
        2..=4 => {
            let mut c = Client::connect(&socket).unwrap();
            let _m = cmd::map_memfd(&mut c, 0x10_0000, 1 << 20, true);
            if step >= 3 {
                assert_eq!(cmd::pin(&mut c, 0x10_0000, 4, 3), 0);
            }
            if step == 4 {
                c.region_write(0, reg_dma_len(), &2048u32.to_le_bytes())
                    .unwrap();
                c.region_write(
                    0,
                    umdev_tests::device::reg::DMA_ADDR,
                    &0x10_2000u64.to_le_bytes(),
                )
                .unwrap();
                // The command goes; the client does not wait for it.
                c.region_write_posted(0, umdev_tests::device::reg::DMA_CMD, &1u32.to_le_bytes())
                    .unwrap();
            }
        }
        _ => unreachable!(),
    }
}

fn reg_dma_len() -> u64 {
    umdev_tests::device::reg::DMA_LEN
}

/// A client gone in the middle of a migration of the migratable test device.
fn migration_step(d: &Daemon, uuid: &str, rng: &mut Rng) {
    let mut c = Client::connect(d.socket(uuid)).unwrap();
    // A device left stopped by the last client runs again first.
    c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
    c.region_write(0, 0x40, &[1, 2, 3, 4]).unwrap();
    c.set_mig_state(wire::DEVICE_STATE_STOP).unwrap();
    if rng.below(2) == 1 {
        c.set_mig_state(wire::DEVICE_STATE_STOP_COPY).unwrap();
        let _ = c.mig_data_read(64);
    }
}

/// An NVMe host gone with commands submitted and not completed.
fn nvme_step(d: &Daemon, uuid: &str, rng: &mut Rng) {
    let mut c = Client::connect(d.socket(uuid)).unwrap();
    let q = HostMemory::shared(&mut c, 0x1000_0000, 4 << 20).unwrap();
    let data = HostMemory::shared(&mut c, 0x4000_0000, 4 << 20).unwrap();
    let mut n = Nvme::enable(c, q, &NvmeOptions::default()).unwrap();
    for _ in 0..1 + rng.below(8) {
        let buf = data.alloc(4096, 4096);
        let lba = rng.below(1024) * 8;
        n.push(1, Sqe::rw(op::WRITE, 1, lba, 8, buf, 0)).unwrap();
    }
    n.ring(1).unwrap();
}

#[test]
fn clients_gone_at_random_points_leak_nothing() {
    let d = Daemon::start_test_daemon(&config());
    let daemon = rustix::process::Pid::from_child(d.child.as_ref().unwrap());
    let budget = rustix::process::Rlimit {
        current: Some(BUDGET_PAGES * 4096),
        maximum: Some(BUDGET_PAGES * 4096),
    };
    rustix::process::prlimit(Some(daemon), rustix::process::Resource::Memlock, budget).unwrap();
    let (t, m, n) = (new_uuid(), new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &t).unwrap();
    d.create("test0", "umdevtest-migratable", &m).unwrap();
    d.create("nvme0", "mnvme-1g", &n).unwrap();
    // One whole cycle of each first: what stays after it (threads started once, the
    // allocator's arenas) is the baseline.
    test_device_step(&d, &t, 4, &mut Rng(1));
    migration_step(&d, &m, &mut Rng(1));
    nvme_step(&d, &n, &mut Rng(1));
    std::thread::sleep(Duration::from_millis(500));
    let listed = d.umdevctl(&["list"]).stdout;
    let before = total(&d);

    let mut rng = Rng(0x5eed_cafe_f00d);
    let mut seen = [0u32; 7];
    for _ in 0..ITERATIONS {
        let step = rng.below(7);
        seen[step as usize] += 1;
        match step {
            0..=4 => test_device_step(&d, &t, step, &mut rng),
            5 => migration_step(&d, &m, &mut rng),
            _ => nvme_step(&d, &n, &mut rng),
        }
    }
    assert!(
        seen.iter().all(|&s| s > 0),
        "every kind of step ran: {seen:?}"
    );

    // Zero leaks, once the sessions have wound down.
    let settled = eventually(|| total(&d) == before);
    assert!(
        settled,
        "what the serving processes hold changed: before {before:?}, after {:?}",
        total(&d)
    );
    // No pin leaked: the whole budget can be pinned.
    let mut c = Client::connect(d.socket(&t)).unwrap();
    let _mem = cmd::map_memfd(&mut c, 0x10_0000, 1 << 20, true);
    let mut pinned = 0;
    while pinned < BUDGET_PAGES {
        assert_eq!(
            cmd::pin(&mut c, 0x10_0000 + pinned * 4096, 8, 3),
            0,
            "pinning at page {pinned} of a {BUDGET_PAGES}-page budget: pins leaked"
        );
        pinned += 8;
    }
    drop(c);
    // The devices serve the next client; the definitions are as they were.
    let mut c = Client::connect(d.socket(&m)).unwrap();
    c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
    c.region_write(0, 0x40, &[4, 3, 2, 1]).unwrap();
    drop(c);
    let q = {
        let mut c = Client::connect(d.socket(&n)).unwrap();
        let q = HostMemory::shared(&mut c, 0x1000_0000, 4 << 20).unwrap();
        let data = HostMemory::shared(&mut c, 0x4000_0000, 4 << 20).unwrap();
        let mut nv = Nvme::enable(c, q, &NvmeOptions::default()).unwrap();
        let buf = data.alloc(4096, 4096);
        nv.submit_wait(1, Sqe::rw(op::READ, 1, 0, 8, buf, 0))
            .unwrap()
            .ok()
    };
    assert!(q, "the controller serves the next host");
    assert_eq!(d.umdevctl(&["list"]).stdout, listed);
}

/// Every `umdevd worker` process of this daemon's root, wherever it is parented (a worker of
/// a killed daemon is re-parented, then adopted by the next).
fn root_workers(d: &Daemon) -> Vec<u32> {
    let root = d.dir().display().to_string();
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.contains(&&b"worker"[..])
                && String::from_utf8_lossy(&cmd).contains(&root)
                && std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
        })
        .collect();
    v.sort_unstable();
    v
}

/// Workers killed, the daemon killed or stopped and started again, at random, with clients
/// attached: afterwards exactly one worker per group is left (none stray, none doubled),
/// every device is running and serves a client.
#[test]
fn workers_and_daemons_killed_at_random_leave_one_worker_per_group() {
    let mut d = Daemon::start_test_daemon(&format!("isolation = \"worker\"\n{}", config()));
    let (t, n) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &t).unwrap();
    d.create("nvme0", "mnvme-1g", &n).unwrap();
    let mut rng = Rng(0xdead_beef_1234);
    let state = |d: &Daemon, u: &str| {
        std::fs::read_to_string(d.mdev_dir(u).join("state"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    let mut kinds = [0u32; 3];
    for _ in 0..12 {
        // A client holds the test device meanwhile.
        let mut c = Client::connect(d.socket(&t)).ok();
        let k = rng.below(3);
        kinds[k as usize] += 1;
        match k {
            0 => {
                let w = root_workers(&d);
                let victim = w[rng.below(w.len() as u64) as usize];
                rustix::process::kill_process(
                    rustix::process::Pid::from_raw(i32::try_from(victim).unwrap()).unwrap(),
                    rustix::process::Signal::KILL,
                )
                .unwrap();
            }
            1 => {
                d.kill();
                d.spawn();
            }
            _ => {
                let mut child = d.child.take().unwrap();
                rustix::process::kill_process(
                    rustix::process::Pid::from_child(&child),
                    rustix::process::Signal::TERM,
                )
                .unwrap();
                child.wait().unwrap();
                d.spawn();
            }
        }
        if let Some(c) = c.as_mut() {
            // Answered by a live worker, or refused by a dead one: never a hang.
            let _ = c.device_info();
        }
        drop(c);
        assert!(
            eventually(|| [&t, &n].iter().all(|u| state(&d, u) == "running")),
            "a device is not running again after step {k} ({kinds:?}): {:?}, workers {:?}\n{}",
            [&t, &n].map(|u| state(&d, u)),
            root_workers(&d),
            String::from_utf8_lossy(&d.umdevctl(&["list"]).stdout)
        );
    }
    assert!(kinds.iter().all(|&k| k > 0), "{kinds:?}");
    assert!(
        eventually(|| root_workers(&d).len() == 2),
        "workers left: {:?}",
        root_workers(&d)
    );
    for u in [&t, &n] {
        assert!(
            eventually(|| Client::connect(d.socket(u)).is_ok()),
            "{u} serves no client"
        );
    }
}
