#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test patterns wrap on purpose
//! Live upgrade (`umdevctl upgrade`) through a real daemon with worker isolation and
//! devices created through sysfs `create`: the daemon runs from a copy of its binary, the
//! copy is replaced on disk, and `umdevctl upgrade --all` puts every group in a process of
//! the new binary while clients use the devices:
//!
//! - the test device's client keeps its connection, its DMA mapping (a copy into it and a
//!   write through a page pinned before the upgrade land in its memory), its MSI-X eventfd,
//!   the registers and config space it wrote (BAR address, command register), and BAR2;
//! - an mtty card's console connection (a person's, on the port socket) stays up: bytes the
//!   guest side writes reach it, bytes typed during and after the upgrade reach the guest
//!   side, none lost or doubled;
//! - an mnvme controller keeps doing I/O from another thread throughout (writes and
//!   read-backs checked), through shadow doorbells signalled by ioeventfd;
//! - on the server side (the daemon's and workers' log): no DEVICE_RESET, no new client
//!   connection, every device "taken over"; each pause is reported.
//!
//! And refusals: thread isolation says why; a device in a migration is not upgraded and its
//! worker serves on.

mod mdev;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdev::{new_uuid, workers, Daemon};
use umdev_client::nvme::{op, HostMemory, Nvme, NvmeOptions, Sqe};
use umdev_client::Client;
use umdev_mtty::regs::RBR_THR;
use umdev_proto::wire;
use umdev_tests::device::reg;
use umdev_tests::{cmd, Efd};

const CONFIG: &str = r#"
isolation = "worker"
release_timeout_ms = 300

[[parent]]
name = "test0"
driver = "umdevtest"
options = { pool = 2 }

[[parent]]
name = "mtty0"
driver = "mtty"
options = { ports = 2, console = "socket" }

[[parent]]
name = "nvme0"
driver = "mnvme"
options = { capacity_gib = 1, shadow_doorbells = true }
"#;

/// The test daemon's binary copied into `dir` (so it can be replaced there).
fn copy_binary(dir: &Path) -> PathBuf {
    let to = dir.join("umdevd-test");
    std::fs::copy(env!("CARGO_BIN_EXE_umdevd-test"), &to).unwrap();
    to
}

/// Replaces the binary at `path` by a new file (a new inode), as a package upgrade does.
fn replace_binary(path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_umdevd-test"), &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The inode of the program process `pid` runs.
fn exe_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
}

/// The pid that made the listening socket at `path` (`SO_PEERCRED` names the process that
/// called `listen`, so after an upgrade still the old worker), without taking the device.
fn listener_pid(path: &Path) -> u32 {
    let s = UnixStream::connect(path).unwrap();
    let c = rustix::net::sockopt::socket_peercred(&s).unwrap();
    u32::try_from(c.pid.as_raw_nonzero().get()).unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn upgrade(d: &Daemon, args: &[&str]) -> (bool, String) {
    let mut a = vec!["upgrade"];
    a.extend_from_slice(args);
    let o = d.umdevctl(&a);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Reads what port 0 received, as its guest driver would, until `want` bytes.
fn guest_reads(c: &mut Client, want: usize) -> Vec<u8> {
    let got = umdev_tests::mtty_port0_reads(c, want, Duration::from_secs(30));
    assert_eq!(got.len(), want, "port 0 received only {got:?}");
    got
}

fn console_reads(console: &mut UnixStream, want: usize) -> Vec<u8> {
    console
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = vec![0u8; want];
    console.read_exact(&mut got).unwrap();
    got
}

const QUEUE_IOVA: u64 = 0x1000_0000;
const DATA_IOVA: u64 = 0x4000_0000;

fn block(lba: u64, g: u64) -> Vec<u8> {
    (0..512u64)
        .map(|i| (lba.wrapping_mul(31) ^ (i * 7) ^ g.wrapping_mul(101)) as u8)
        .collect()
}

/// Writes and reads back blocks on the controller until `stop` (`done`: the rounds done);
/// returns the controller (its client stays connected).
fn nvme_io(
    mut n: Nvme,
    data: Arc<HostMemory>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Nvme {
    let mut g = 0u64;
    let buf = data.alloc(4096, 4096);
    while !stop.load(Ordering::Acquire) {
        g += 1;
        let lba = (g % 64) * 8;
        let pattern: Vec<u8> = (lba..lba + 8).flat_map(|l| block(l, g)).collect();
        data.write(buf, &pattern).unwrap();
        let c = n
            .submit_wait(1, Sqe::rw(op::WRITE, 1, lba, 8, buf, 0))
            .unwrap();
        assert!(c.ok(), "write {g}: {:#x}", c.status);
        data.fill(buf, 4096, 0).unwrap();
        let c = n
            .submit_wait(1, Sqe::rw(op::READ, 1, lba, 8, buf, 0))
            .unwrap();
        assert!(c.ok(), "read {g}: {:#x}", c.status);
        let mut back = vec![0u8; 4096];
        data.read(buf, &mut back).unwrap();
        assert!(back == pattern, "round {g}: the data read back differs");
        done.store(g, Ordering::Release);
    }
    n
}

#[test]
fn upgrade_all_hands_every_device_over_with_its_client() {
    mdev::require();
    let bin_dir = tempfile::tempdir().unwrap();
    let binary = copy_binary(bin_dir.path());
    let d = Daemon::start_logged(binary.clone(), CONFIG);
    let (t, m, n) = (new_uuid(), new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &t).unwrap();
    d.create("mtty0", "mtty-1", &m).unwrap();
    d.create("nvme0", "mnvme-1g", &n).unwrap();
    let old: Vec<u32> = [&t, &m, &n]
        .iter()
        .map(|u| listener_pid(&d.socket(u)))
        .collect();
    let old_inode = exe_inode(old[0]);

    // The test device: a mapping with a pinned page, MSI-X, registers, config space, BAR2.
    let mut ct = Client::connect(d.socket(&t)).unwrap();
    const BASE: u64 = 0x10_0000;
    let mem = cmd::map_memfd(&mut ct, BASE, 1 << 20, true);
    assert_eq!(cmd::pin(&mut ct, BASE, 1, 3), 0);
    let efd = Efd::new();
    ct.set_irq_eventfds(
        umdev_pci::IrqIndex::Msix as u32,
        wire::IRQ_SET_ACTION_TRIGGER,
        0,
        &[efd.as_fd()],
    )
    .unwrap();
    ct.region_write(0, 0x40, &0x1234_5678_9abc_def0u64.to_le_bytes())
        .unwrap();
    let config = umdev_pci::CONFIG_REGION;
    ct.region_write(config, 0x10, &0xfebf_0000u32.to_le_bytes())
        .unwrap();
    ct.region_write(config, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    ct.region_write(2, 0x100, b"bar2 before").unwrap();
    let mut config_before = vec![0u8; 256];
    ct.region_read(config, 0, &mut config_before).unwrap();

    // The mtty card with a person at its console.
    let mut cm = Client::connect(d.socket(&m)).unwrap();
    let mut console = UnixStream::connect(d.device_dir(&m).join("port0.sock")).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    console.write_all(b"typed before;").unwrap();
    assert_eq!(guest_reads(&mut cm, 13), b"typed before;");
    for b in b"sent before;" {
        cm.region_write(0, RBR_THR, &[*b]).unwrap();
    }
    assert_eq!(console_reads(&mut console, 12), b"sent before;");

    // The controller, with I/O running through the upgrade.
    let mut cn = Client::connect(d.socket(&n)).unwrap();
    let q = HostMemory::shared(&mut cn, QUEUE_IOVA, 16 << 20).unwrap();
    let data = HostMemory::shared(&mut cn, DATA_IOVA, 16 << 20).unwrap();
    let mut nv = Nvme::enable(
        cn,
        q,
        &NvmeOptions {
            shadow_doorbells: true,
            ..NvmeOptions::default()
        },
    )
    .unwrap();
    assert!(nv.shadow_doorbells());
    assert!(nv.use_ioeventfds().unwrap() > 0);
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let io = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || nvme_io(nv, data, stop, done))
    };
    wait_until("no I/O before the upgrade", || {
        done.load(Ordering::Acquire) > 20
    });
    // Typed while the upgrade runs, a byte at a time.
    let typist = {
        let mut c = console.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in b"typed during the upgrade;" {
                c.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        })
    };

    replace_binary(&binary);
    let log_before = d.log().len();
    let (ok, out) = upgrade(&d, &["--all"]);
    assert!(ok, "{out}");
    println!("{out}");
    for u in [&t, &m, &n] {
        assert!(out.contains(&format!("{u} upgraded, paused")), "{out}");
    }
    typist.join().unwrap();
    let before = done.load(Ordering::Acquire);
    wait_until("no I/O after the upgrade", || {
        done.load(Ordering::Acquire) > before + 20
    });
    stop.store(true, Ordering::Release);
    let _nvme = io.join().unwrap();

    // New processes of the new binary serve every device; the old ones are gone.
    let daemon = d.child.as_ref().unwrap().id();
    for o in &old {
        wait_until("an old worker outlived its upgrade", || !alive(*o));
    }
    let now = workers(daemon);
    assert_eq!(now.len(), 3, "{now:?}");
    for w in &now {
        assert!(!old.contains(w));
        assert_ne!(exe_inode(*w), old_inode, "worker {w} runs the new binary");
    }

    // The test device: the same connection, nothing reset.
    let mut b8 = [0u8; 8];
    ct.region_read(0, 0x40, &mut b8).unwrap();
    assert_eq!(u64::from_le_bytes(b8), 0x1234_5678_9abc_def0);
    let mut config_after = vec![0u8; 256];
    ct.region_read(config, 0, &mut config_after).unwrap();
    assert_eq!(config_after, config_before, "config space unchanged");
    let mut b11 = [0u8; 11];
    ct.region_read(2, 0x100, &mut b11).unwrap();
    assert_eq!(&b11, b"bar2 before");
    assert_eq!(cmd::copy_write(&mut ct, BASE + 0x2000, 64, 7), 0);
    assert_eq!(
        cmd::pinned_write(&mut ct, BASE, 64, 9),
        0,
        "the pin came across"
    );
    let mut seen = vec![0u8; 64];
    rustix::io::pread(&mem, &mut seen, 0x2000).unwrap();
    assert_eq!(seen, cmd::pattern(64, 7));
    rustix::io::pread(&mem, &mut seen, 0).unwrap();
    assert_eq!(seen, cmd::pattern(64, 9));
    let _ = efd.read();
    ct.region_write(0, reg::IRQ_VECTOR, &0u32.to_le_bytes())
        .unwrap();
    ct.region_write(0, reg::IRQ_CMD, &3u32.to_le_bytes())
        .unwrap();
    wait_until("MSI-X vector 0 was not signalled after the upgrade", || {
        efd.read().is_some()
    });

    // The console: still the same connection, both ways, nothing lost.
    let during = b"typed during the upgrade;";
    assert_eq!(guest_reads(&mut cm, during.len()), during);
    console.write_all(b"typed after;").unwrap();
    assert_eq!(guest_reads(&mut cm, 12), b"typed after;");
    for b in b"sent after;" {
        cm.region_write(0, RBR_THR, &[*b]).unwrap();
    }
    assert_eq!(console_reads(&mut console, 11), b"sent after;");
    let shown = std::fs::read_to_string(d.mdev_dir(&m).join("vendor/console")).unwrap();
    assert!(shown.contains("port0.sock"), "{shown}");

    // The server side: every device taken over, no reset, no new client.
    let log = d.log();
    let since = &log[log_before..];
    assert_eq!(since.matches("client taken over").count(), 3, "{since}");
    assert!(!since.contains("device reset by the client"), "{since}");
    assert!(!since.contains("client connected"), "{since}");
    // Their groups are still held by this process.
    let groups = String::from_utf8_lossy(&d.umdevctl(&["groups"]).stdout).into_owned();
    assert_eq!(
        groups
            .matches(&format!("held by pid {} ", std::process::id()))
            .count(),
        3,
        "{groups}"
    );

    // A client that goes after the upgrade releases its group; the device takes the next.
    drop(ct);
    std::thread::sleep(Duration::from_millis(100));
    let mut again = Client::connect(d.socket(&t)).unwrap();
    again.region_read(0, 0x40, &mut b8).unwrap();
    assert_eq!(u64::from_le_bytes(b8), 0x1234_5678_9abc_def0);
}

#[test]
fn upgrade_refuses_with_reasons_and_leaves_the_worker_serving() {
    mdev::require();
    // Thread isolation: nothing to upgrade.
    let d = Daemon::start("[[parent]]\nname = \"mtty0\"\ndriver = \"mtty\"\n");
    let (ok, out) = upgrade(&d, &["--all"]);
    assert!(!ok && out.contains("isolation"), "{out}");
    drop(d);

    let d = Daemon::start_test_daemon(CONFIG);
    let (ok, out) = upgrade(&d, &[]);
    assert!(!ok && out.contains("--group N or --all"), "{out}");
    let (ok, out) = upgrade(&d, &["--group", "999"]);
    assert!(!ok && out.contains("no IOMMU group 999"), "{out}");

    // A device in a migration (STOP) is not handed over: its worker serves on.
    let t = new_uuid();
    d.create("test0", "umdevtest-migratable", &t).unwrap();
    let pid = listener_pid(&d.socket(&t));
    let mut c = Client::connect(d.socket(&t)).unwrap();
    c.region_write(0, 0x40, &[1, 2, 3, 4]).unwrap();
    c.set_mig_state(wire::DEVICE_STATE_STOP).unwrap();
    let daemon = d.child.as_ref().unwrap().id();
    let (ok, out) = upgrade(&d, &["--all"]);
    assert!(!ok && out.contains(&format!("{t} not upgraded")), "{out}");
    assert!(out.contains("in a migration"), "{out}");
    assert_eq!(workers(daemon), vec![pid], "the worker serves on");
    c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4], "the same connection, the same device");
    // Running again, it upgrades.
    let (ok, out) = upgrade(&d, &["--all"]);
    assert!(ok, "{out}");
    wait_until("the old worker outlived its upgrade", || !alive(pid));
    assert_eq!(workers(daemon).len(), 1);
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
}

#[test]
fn replacing_the_binary_upgrades_every_worker_when_configured() {
    mdev::require();
    let bin_dir = tempfile::tempdir().unwrap();
    let binary = copy_binary(bin_dir.path());
    let config = format!("upgrade_on_replace = true\n{CONFIG}");
    let d = Daemon::start_logged(binary.clone(), &config);
    let t = new_uuid();
    d.create("test0", "umdevtest-plain", &t).unwrap();
    let old = listener_pid(&d.socket(&t));
    let old_inode = exe_inode(old);
    let mut c = Client::connect(d.socket(&t)).unwrap();
    c.region_write(0, 0x40, &[9, 8, 7, 6]).unwrap();
    replace_binary(&binary);
    wait_until("the worker was not upgraded to the new binary", || {
        !alive(old)
    });
    let daemon = d.child.as_ref().unwrap().id();
    let now = workers(daemon);
    assert_eq!(now.len(), 1);
    assert_ne!(exe_inode(now[0]), old_inode);
    let mut b = [0u8; 4];
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(b, [9, 8, 7, 6], "the same connection, the same device");
    assert!(d.log().contains("the daemon's binary was replaced"));
}
