#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
//! QEMU attaches umdev's test device, created through a daemon built with the public
//! builder (`umdevd-test`: umdevd's library plus the test device's driver) by writing a UUID
//! into its sysfs `create` file, and a real Linux guest drives it with a static program
//! (`tests/guest/devcheck.c`, from the initramfs): every region kind the framework offers
//! (RAM BARs, an I/O BAR, an mmap-able BAR with sparse areas, MSI and MSI-X capabilities),
//! DMA into guest memory and back, INTx through `uio_pci_generic`; beside it the `hello`
//! sample (the worked example of `docs/writing-a-parent.md`) hashes guest memory by DMA
//! from its work context. Once with guest memory
//! shared (the device reaches it through the fds of DMA_MAP) and once plain (every DMA is a
//! DMA_READ/DMA_WRITE message that QEMU answers).
//!
//! On the host side the device's own counters (vendor attributes) must show that no access
//! reached the server inside BAR2's sparse areas: QEMU mapped them (it falls back to
//! trapping silently when an mmap fails), while the guest's write outside them was trapped.
//!
//! Beside them an `mnvme-1g` controller (crates/umdev-mnvme), created the same way, is
//! bound by the guest's stock `nvme` driver and used as `/dev/nvme0n1` by a static program
//! (`tests/guest/nvmecheck.c`): its size, a 16 MiB pattern through the page cache with the
//! caches dropped, 16 threads of O_DIRECT I/O with PRP lists and offset buffers, 64 reads in
//! flight through Linux AIO, discard and write-zeroes, data the host wrote into the backing
//! file; the host then finds the guest's bytes at their offsets in the backing file and
//! the identity it shows in the guest's sysfs, and the MSI-X vectors of its queues counting.
//! A third run boots with `pci=nomsi`: the controller alone, on INTx, and allocated the way
//! a Kubernetes pod's VMM gets it: the device plugin (umdev-k8s) answers a stub kubelet's
//! Allocate, the mount it returns is bound at its container path inside the chroot, and QEMU
//! opens the socket the environment variable names, a path only the "container" has.
//!
//! The plain-memory boot runs the daemon with `isolation = "worker"` (each group in a worker
//! process): QEMU meets every region kind, DMA path and interrupt through workers, and a
//! device of another group, its client attached, has its worker killed (SIGKILL) while the
//! guest runs: the guest never notices, the daemon logs it and serves the device again. Then,
//! while the guest does its NVMe I/O, the daemon is stopped (SIGTERM) and started again: the
//! workers serve on, the new daemon adopts them, and the guest's checks, the host's reads of
//! the devices' attributes and the final removal all go through the new daemon.
//!
//! Needs root, `/dev/fuse` and the guest cache (`tests/guest/setup.sh`); logs of each run
//! stay in `$CARGO_TARGET_TMPDIR/guest-devices-<memory>/`.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use umdev_tests::guest::{
    is_socket, read_trimmed, sink_text, tail, Boot, Env, Guest, HostDaemon, Memory,
};
use umdev_tests::kubelet::{Kubelet, Plugin};

/// A whole guest run; about 10 s under TCG here, CI machines may be slower.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// What nvmecheck checks.
const NVME_CHECKS: [&str; 8] = [
    "nvme-size",
    "nvme-identity",
    "nvme-buffered",
    "nvme-direct",
    "nvme-aio",
    "nvme-host-data",
    "nvme-discard",
    "nvme-irqs",
];
/// What fbcheck checks in the guest.
const DISPLAY_CHECKS: [&str; 4] = [
    "display-bound",
    "display-fbcon",
    "display-drm32",
    "display-raw16",
];
/// Seconds the guest shows each picture for the host's screenshot.
const SCREEN_HOLD: u32 = 8;

/// The test picture's RGB at (x, y) of a framebuffer for generation `g` (fbcheck.c's).
fn picture(x: u32, y: u32, g: u32) -> [u8; 3] {
    [
        (x * 3 + g) as u8,
        (y * 5 + g * 7) as u8,
        (x ^ y).wrapping_add(g * 13) as u8,
    ]
}

/// The host's side of fbcheck: a screenshot through `umdevctl` whenever the guest shows a
/// picture, compared with what it drew (kept as PNGs in the log directory).
struct Screens {
    uuid: String,
    control: PathBuf,
    dir: PathBuf,
    /// Screens judged: name, and what was seen or why it is wrong.
    done: Vec<(String, Result<String, String>)>,
}

impl Screens {
    fn poll(&mut self, console: &str) {
        for line in console.lines() {
            let Some(rest) = line.trim_end().strip_prefix("GUEST-SCREEN ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or("").to_owned();
            if self.done.iter().any(|d| d.0 == name) {
                continue;
            }
            let params: std::collections::HashMap<&str, u32> = words
                .filter_map(|w| w.split_once('='))
                .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                .collect();
            let verdict = self.judge(&name, &params);
            self.done.push((name, verdict));
        }
    }

    fn shot(&self, name: &str) -> Result<(u32, u32, Vec<u8>), String> {
        let out = self.dir.join(format!("screen-{name}.png"));
        let o = std::process::Command::new(umdev_tests::prereq::binary("umdevctl"))
            .args(["screenshot", &self.uuid, out.to_str().unwrap_or("")])
            .env("UMDEV_CONTROL", &self.control)
            .output()
            .map_err(|e| e.to_string())?;
        if !o.status.success() {
            return Err(String::from_utf8_lossy(&o.stderr).trim().to_owned());
        }
        let file = fs::File::open(&out).map_err(|e| e.to_string())?;
        let mut r = png::Decoder::new(file)
            .read_info()
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).map_err(|e| e.to_string())?;
        buf.truncate(info.buffer_size());
        Ok((info.width, info.height, buf))
    }

    /// Screenshots until the picture is right or the guest's hold is nearly over.
    fn judge(
        &self,
        name: &str,
        p: &std::collections::HashMap<&str, u32>,
    ) -> Result<String, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(u64::from(SCREEN_HOLD) - 2);
        let mut last = String::from("no screenshot");
        while std::time::Instant::now() < deadline {
            match self.shot(name).and_then(|img| self.compare(name, p, &img)) {
                Ok(what) => {
                    return Ok(format!(
                        "{what}; {}",
                        self.dir.join(format!("screen-{name}.png")).display()
                    ))
                }
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last)
    }

    fn compare(
        &self,
        name: &str,
        p: &std::collections::HashMap<&str, u32>,
        (w, h, img): &(u32, u32, Vec<u8>),
    ) -> Result<String, String> {
        if name == "fbcon" {
            // Text on the console: a background and glyphs in another colour.
            let bg = &img[..3];
            let ink = img.chunks_exact(3).filter(|px| *px != bg).count();
            return if ink >= 500 {
                Ok(format!("{w}x{h}, {ink} pixels of text"))
            } else {
                Err(format!(
                    "{w}x{h} with {ink} pixels off the background: no text yet"
                ))
            };
        }
        let get = |k: &str| p.get(k).copied().ok_or(format!("no {k} in the marker"));
        let (ew, eh, yoff, g) = (get("width")?, get("height")?, get("yoffset")?, get("g")?);
        if (*w, *h) != (ew, eh) {
            return Err(format!("{w}x{h}, expected {ew}x{eh}"));
        }
        let mut wrong = 0u64;
        let mut first = None;
        for y in 0..eh {
            for x in 0..ew {
                let [r, gr, b] = picture(x, y + yoff, g);
                let want = if name == "raw16" {
                    let (r5, g6, b5) = (r >> 3, gr >> 2, b >> 3);
                    [
                        (r5 << 3) | (r5 >> 2),
                        (g6 << 2) | (g6 >> 4),
                        (b5 << 3) | (b5 >> 2),
                    ]
                } else {
                    [r, gr, b]
                };
                let at = ((y * ew + x) * 3) as usize;
                if img[at..at + 3] != want {
                    wrong += 1;
                    first.get_or_insert((x, y));
                }
            }
        }
        match first {
            None => Ok(format!("{ew}x{eh} from line {yoff}, every pixel as drawn")),
            Some((x, y)) => Err(format!("{wrong} pixels differ, the first at ({x}, {y})")),
        }
    }
}

/// The controller's type and size.
const NVME_TYPE: &str = "mnvme-1g";
const NVME_SIZE: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// The little-endian word at byte `offset` of nvmecheck's pattern with `seed`.
fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    (0..len as u64 / 8)
        .flat_map(|i| {
            (offset + i * 8)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(seed)
                .to_le_bytes()
        })
        .collect()
}

/// What devcheck checks, each on one line of the console.
const CHECKS: [&str; 11] = [
    "device",
    "enable",
    "bar0-mmap",
    "dma-from-guest",
    "dma-to-guest",
    "bar2-sparse",
    "bar2-trapped",
    "io-bar",
    "capabilities",
    "intx",
    "hello",
];

#[test]
fn guest_drives_the_test_device_and_mnvme_with_shared_memory() {
    run(Memory::Shared, Run::AllWithMsix);
}

#[test]
fn guest_drives_the_test_device_and_mnvme_with_plain_memory() {
    run(Memory::Plain, Run::AllWithMsix);
}

#[test]
fn guest_drives_mnvme_on_intx_without_msi() {
    run(Memory::Shared, Run::NvmeOnIntx);
}

/// Which devices a boot has, and how their interrupts go.
#[derive(Clone, Copy, PartialEq)]
enum Run {
    /// The test device, hello and mnvme; MSI-X.
    AllWithMsix,
    /// mnvme alone, the guest booted with `pci=nomsi`.
    NvmeOnIntx,
}

fn run(memory: Memory, which: Run) {
    let env = Env::get();
    let name = match which {
        Run::AllWithMsix => format!("guest-devices-{}", memory.name()),
        Run::NvmeOnIntx => format!("guest-mnvme-intx-{}", memory.name()),
    };
    let log_dir = umdev_tests::guest::log_dir(env!("CARGO_TARGET_TMPDIR"), &name);
    let sockets = env.dir_in_chroot();
    let host = tempfile::tempdir().unwrap();
    let root = host.path().join("root");
    let config = host.path().join("umdevd.toml");
    let pool = host.path().join("pool");
    // The plain-memory boot runs the daemon with a worker process per IOMMU group.
    let isolation = if memory == Memory::Plain && which == Run::AllWithMsix {
        "worker"
    } else {
        "thread"
    };
    let text = format!(
        "root = {:?}\nsockets_dir = {:?}\nisolation = \"{isolation}\"\n\n[server]\nunsealed_memory = \"refuse\"\n\n[[parent]]\nname = \"spare0\"\ndriver = \"mtty\"\noptions = {{ ports = 1, console = \"none\" }}\n\n[[parent]]\nname = \"test0\"\ndriver = \"umdevtest\"\n\n[[parent]]\nname = \"hello0\"\ndriver = \"hello\"\noptions = {{ devices = 1 }}\n\n[[parent]]\nname = \"nvme0\"\ndriver = \"mnvme\"\noptions = {{ pool = {:?}, capacity_gib = 1 }}\n\n[[parent]]\nname = \"vga0\"\ndriver = \"mbochs\"\n",
        root.display().to_string(),
        sockets.path().display().to_string(),
        pool.display().to_string(),
    );
    fs::write(&config, &text).unwrap();
    fs::write(log_dir.join("umdevd.toml"), &text).unwrap();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_umdevd-test"));
    let args: Vec<OsString> = vec!["--config".into(), config.into()];
    let mut daemon = HostDaemon::spawn(&binary, &args, &log_dir).unwrap_or_else(|e| panic!("{e}"));

    // `echo $UUID > .../mdev_supported_types/umdevtest-plain/create`
    let uuid = read_trimmed(std::path::Path::new("/proc/sys/kernel/random/uuid")).unwrap();
    let types = root.join("sys/class/mdev_bus/test0/mdev_supported_types/umdevtest-plain");
    fs::write(types.join("create"), format!("{uuid}\n")).unwrap();
    let dev = root.join("sys/bus/mdev/devices").join(&uuid);
    let socket = PathBuf::from(read_trimmed(&dev.join("vfio_user_socket")).unwrap());
    assert_eq!(
        socket,
        sockets.path().join(&uuid).join("vfio-user.sock"),
        "the device's socket is in its own directory"
    );
    assert!(is_socket(&socket));
    // The hello sample, created by mdevctl's way too (a UUID into `create`).
    let hello_uuid = read_trimmed(std::path::Path::new("/proc/sys/kernel/random/uuid")).unwrap();
    let hello_type = root.join("sys/class/mdev_bus/hello0/mdev_supported_types/hello-1");
    fs::write(hello_type.join("create"), format!("{hello_uuid}\n")).unwrap();
    let hello_dev = root.join("sys/bus/mdev/devices").join(&hello_uuid);
    let hello_socket = PathBuf::from(read_trimmed(&hello_dev.join("vfio_user_socket")).unwrap());

    // The controller, by `create` too; or, in the INTx boot, from the device plugin
    // (umdev-k8s) as a pod's VMM gets it: QEMU sees only the container's path. The host puts
    // 64 KiB of its own at 900 MiB.
    let pod = (which == Run::NvmeOnIntx).then(|| Pod::allocate(&env, &root, host.path()));
    let nvme_uuid = match &pod {
        Some(p) => p.uuid.clone(),
        None => {
            let uuid = read_trimmed(Path::new("/proc/sys/kernel/random/uuid")).unwrap();
            let nvme_type = root
                .join("sys/class/mdev_bus/nvme0/mdev_supported_types")
                .join(NVME_TYPE);
            fs::write(nvme_type.join("create"), format!("{uuid}\n")).unwrap();
            uuid
        }
    };
    let nvme_dev = root.join("sys/bus/mdev/devices").join(&nvme_uuid);
    let nvme_socket = match &pod {
        Some(p) => p.socket.clone(),
        None => PathBuf::from(read_trimmed(&nvme_dev.join("vfio_user_socket")).unwrap()),
    };
    let backing = PathBuf::from(read_trimmed(&nvme_dev.join("vendor/backing_file")).unwrap());
    assert!(backing.starts_with(&pool), "{}", backing.display());
    fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .write_all_at(&pattern(900 * MIB, 65536, 3), 900 * MIB)
        .unwrap();

    // A display, in the shared-memory boot (its VRAM is the device's memory either way).
    let vga_uuid = read_trimmed(Path::new("/proc/sys/kernel/random/uuid")).unwrap();
    fs::write(
        root.join("sys/class/mdev_bus/vga0/mdev_supported_types/mbochs-16m/create"),
        format!("{vga_uuid}\n"),
    )
    .unwrap();
    let vga_socket = PathBuf::from(
        read_trimmed(
            &root
                .join("sys/bus/mdev/devices")
                .join(&vga_uuid)
                .join("vfio_user_socket"),
        )
        .unwrap(),
    );
    let display = which == Run::AllWithMsix && memory == Memory::Shared;
    let all: [&Path; 4] = [&socket, &hello_socket, &nvme_socket, &vga_socket];
    let (sockets_booted, append): (&[&Path], String) = match which {
        Run::AllWithMsix if display => (
            &all,
            format!(
                "umdev.test=devices,nvme,display umdev.nvme_size={NVME_SIZE} umdev.screen_hold={SCREEN_HOLD}"
            ),
        ),
        Run::AllWithMsix => (
            &all[..3],
            format!("umdev.test=devices,nvme umdev.nvme_size={NVME_SIZE}"),
        ),
        Run::NvmeOnIntx => (
            &all[2..],
            format!("pci=nomsi umdev.test=nvme umdev.nvme_size={NVME_SIZE}"),
        ),
    };
    let boot = Boot {
        env: &env,
        memory,
        sockets: sockets_booted,
        append: &append,
        // Under TCG a slow guest must not hit QEMU's 5 s reply timeout.
        device_props: r#","x-msg-timeout":30000"#,
        log_dir: &log_dir,
    };
    // A device of another group, its client attached; in worker mode its worker is killed
    // while the guest runs, which the guest's devices must never notice.
    let spare_uuid = read_trimmed(Path::new("/proc/sys/kernel/random/uuid")).unwrap();
    fs::write(
        root.join("sys/class/mdev_bus/spare0/mdev_supported_types/mtty-1/create"),
        format!("{spare_uuid}\n"),
    )
    .unwrap();
    let spare_dev = root.join("sys/bus/mdev/devices").join(&spare_uuid);
    let spare_socket = PathBuf::from(read_trimmed(&spare_dev.join("vfio_user_socket")).unwrap());
    let (mut spare, spare_pid) = umdev_tests::connect_served(&spare_socket).unwrap();
    let kill_spare = isolation == "worker";
    if kill_spare {
        assert_ne!(spare_pid, daemon.proc.pid(), "a worker serves it");
    }
    let mut killed = false;
    // And in worker mode the daemon itself is stopped (SIGTERM) and started again while
    // the guest does NVMe I/O: its workers serve on, the new daemon adopts them.
    let restart_log = log_dir.join("restarted");
    fs::create_dir_all(&restart_log).unwrap();
    let mut restarted = false;
    // Then, while the guest does O_DIRECT I/O on the controller, every worker is upgraded
    // (`umdevctl upgrade --all`): QEMU keeps its connections and sees a pause.
    let mut upgraded: Option<String> = None;
    // What the first daemon's workers had logged when the daemon was restarted.
    let mut marks = (0, 0);
    let control = root.join("state/control.sock");
    let mut guest = Guest::boot(&boot).unwrap_or_else(|e| panic!("{e}"));
    let mut screens = Screens {
        uuid: vga_uuid.clone(),
        control: root.join("state/control.sock"),
        dir: log_dir.clone(),
        done: Vec::new(),
    };
    let console_sink = guest.console.clone();
    let status = guest.wait(GUEST_TIMEOUT, || {
        if let Some(s) = daemon.proc.exited() {
            return Err(format!("the daemon exited during the guest run: {s}"));
        }
        let text = sink_text(&console_sink);
        if display {
            screens.poll(&text);
        }
        if kill_spare && !killed && text.contains("GUEST-CHECK") {
            let pid = rustix::process::Pid::from_raw(i32::try_from(spare_pid).unwrap()).unwrap();
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                .map_err(|e| format!("killing the spare device's worker: {e}"))?;
            killed = true;
        }
        if kill_spare && !restarted && text.contains("GUEST-CHECK nvme-size") {
            marks = server_marks(
                &fs::read_to_string(log_dir.join("daemon.stderr")).unwrap_or_default(),
            );
            let s = daemon.proc.stop();
            if !s.is_some_and(|s| s.success()) {
                return Err(format!("the daemon's SIGTERM stop: {s:?}"));
            }
            daemon = HostDaemon::spawn(&binary, &args, &restart_log)
                .map_err(|e| format!("the daemon did not start again: {e}"))?;
            restarted = true;
        }
        if kill_spare
            && restarted
            && upgraded.is_none()
            && text.contains("GUEST-CHECK nvme-buffered")
        {
            let o = std::process::Command::new(umdev_tests::prereq::binary("umdevctl"))
                .args(["upgrade", "--all"])
                .env("UMDEV_CONTROL", &control)
                .output()
                .map_err(|e| format!("umdevctl upgrade: {e}"))?;
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() {
                return Err(format!(
                    "umdevctl upgrade --all failed: {out}{}",
                    String::from_utf8_lossy(&o.stderr)
                ));
            }
            upgraded = Some(out);
        }
        Ok(())
    });
    let console = sink_text(&guest.console);
    fs::write(log_dir.join("console.log"), &console).unwrap();
    let report = |why: &str| {
        format!(
            "guest devices test ({} memory) failed: {why}\nlogs in {}\n--- console ---\n{console}\n--- daemon stderr ---\n{}\n--- QEMU stderr ---\n{}",
            memory.name(),
            log_dir.display(),
            tail(&log_dir.join("daemon.stderr")),
            tail(&log_dir.join("qemu.stderr")),
        )
    };
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{}", report(&format!("QEMU exited with {s}"))),
        Err(e) => panic!("{}", report(&e)),
    }

    let mut problems = Vec::new();
    let checks: Vec<&str> = match which {
        Run::AllWithMsix if display => CHECKS
            .iter()
            .chain(NVME_CHECKS.iter())
            .chain(DISPLAY_CHECKS.iter())
            .copied()
            .collect(),
        Run::AllWithMsix => CHECKS.iter().chain(NVME_CHECKS.iter()).copied().collect(),
        Run::NvmeOnIntx => NVME_CHECKS.to_vec(),
    };
    for check in checks {
        let line = console
            .lines()
            .find(|l| l.starts_with(&format!("GUEST-CHECK {check} ")));
        match line {
            Some(l) if l.starts_with(&format!("GUEST-CHECK {check} PASS")) => {}
            Some(l) => problems.push(l.trim().to_owned()),
            None => problems.push(format!("no result for {check}")),
        }
    }
    if !console.contains("GUEST-VERDICT: PASS") {
        problems.push("the guest's verdict is not PASS".into());
    }
    nvme_host_checks(&console, &nvme_dev, &backing, which, &mut problems);
    if which == Run::NvmeOnIntx {
        let qemu_args = fs::read_to_string(log_dir.join("qemu.cmdline")).unwrap_or_default();
        if !qemu_args.contains(r#""path":"/run/umdev/0/vfio-user.sock""#) {
            problems.push("QEMU was not given the container's socket path".into());
        }
        if !problems.is_empty() {
            panic!("{}", report(&problems.join("; ")));
        }
        drop(pod);
        finish(&console, &name, daemon, &root.join("state/control.sock"));
        return;
    }
    // The device's view, through its vendor attributes in the tree.
    let attr = |name: &str| read_trimmed(&dev.join(name)).unwrap_or_else(|e| e);
    let in_sparse = attr("vendor/trapped_sparse");
    if in_sparse != "0" {
        problems.push(format!(
            "{in_sparse} accesses reached the server inside BAR2's sparse areas: QEMU did not map them"
        ));
    }
    let outside = attr("vendor/trapped_bar2");
    if outside.parse::<u64>().unwrap_or(0) == 0 {
        problems.push(format!(
            "no access outside the sparse areas reached the server ({outside})"
        ));
    }
    let head = attr("vendor/bar2_head");
    let want_a: String = (0..16).map(|i| format!("{:02x}", 0xa0 + i)).collect();
    let want_b: String = (0..16).map(|i| format!("{:02x}", 0xb0 + i)).collect();
    if head != format!("{want_a}\n{want_b}") {
        problems.push(format!(
            "BAR2's sparse areas hold {head:?}, not what the guest wrote through its mapping"
        ));
    }
    // Which DMA path the device took: QEMU's trace shows every DMA_READ (command 0xb) and
    // DMA_WRITE (0xc) it was asked for. Shared memory needs none; plain memory needs both.
    let trace = fs::read_to_string(log_dir.join("qemu.stderr")).unwrap_or_default();
    let asked = |cmd: &str| {
        trace
            .lines()
            .filter(|l| l.contains("vfio_user_recv_hdr") && l.contains(&format!(" cmd {cmd} ")))
            .count()
    };
    let (reads, writes) = (asked("0xb"), asked("0xc"));
    match memory {
        Memory::Shared if reads + writes > 0 => problems.push(format!(
            "with shared memory QEMU was asked for {reads} DMA_READs and {writes} DMA_WRITEs"
        )),
        Memory::Plain if reads == 0 || writes == 0 => problems.push(format!(
            "with plain memory QEMU saw {reads} DMA_READs and {writes} DMA_WRITEs, expected both"
        )),
        _ => {}
    }
    if kill_spare {
        if !killed {
            problems.push("the spare device's worker was never killed".into());
        }
        if !restarted {
            problems.push("the daemon was never restarted".into());
        }
        let adopted = fs::read_to_string(restart_log.join("daemon.stderr")).unwrap_or_default();
        if adopted.matches("adopted a worker").count() < 5 {
            problems.push(format!(
                "the restarted daemon did not adopt the five workers:\n{}",
                tail(&restart_log.join("daemon.stderr"))
            ));
        }
        if spare.device_info().is_ok() {
            problems.push("a killed worker's client was still answered".into());
        }
        // The restart, judged on the server side: the first daemon's workers (logging to its
        // stderr until they were upgraded) took no new client and reset nothing.
        let first =
            server_marks(&fs::read_to_string(log_dir.join("daemon.stderr")).unwrap_or_default());
        if first != marks {
            problems.push(format!(
                "across the daemon's restart the workers logged (connections, resets) {marks:?} -> {first:?}"
            ));
        }
        // The upgrade, judged on the server side: the new workers (the restarted daemon's
        // children, logging to its stderr) took QEMU's three connections over, and QEMU
        // neither reset a device nor connected again.
        match &upgraded {
            None => problems.push("the workers were never upgraded".into()),
            Some(out) => {
                let n = out.matches("upgraded, paused").count();
                if n != 5 {
                    problems.push(format!("umdevctl upgrade reported {n} devices: {out}"));
                }
                let after =
                    fs::read_to_string(restart_log.join("daemon.stderr")).unwrap_or_default();
                let taken = after.matches("client taken over").count();
                if taken != 3 {
                    problems.push(format!("{taken} clients taken over, not QEMU's 3"));
                }
                for bad in ["device reset by the client", "client connected"] {
                    if after.contains(bad) {
                        problems.push(format!("after the upgrade the server logged {bad:?}"));
                    }
                }
                println!("host: upgrade while the guest did NVMe I/O:\n{out}");
            }
        }
        // The daemon started it again: the device takes a new client, in a new process.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match umdev_tests::connect_served(&spare_socket) {
                Ok((_, pid)) if pid != spare_pid => break,
                _ if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => {
                    problems.push(format!(
                        "the spare device never took a new client: {:?}",
                        r.map(|(_, pid)| pid)
                    ));
                    break;
                }
            }
        }
        let log = fs::read_to_string(log_dir.join("daemon.stderr")).unwrap_or_default();
        if !log.contains("a worker died") {
            problems.push("the daemon did not log the worker's death".into());
        }
    }
    let requests = read_trimmed(&hello_dev.join("vendor/requests")).unwrap_or_default();
    if requests != "1" {
        problems.push(format!(
            "the hello device counted {requests:?} requests, expected 1"
        ));
    }
    if !problems.is_empty() {
        panic!("{}", report(&problems.join("; ")));
    }

    // Remove through sysfs, then a clean stop.
    fs::write(dev.join("remove"), "1\n").unwrap();
    assert!(!socket.exists(), "the socket goes with the device");
    assert!(
        !sockets.path().join(&uuid).exists(),
        "the device's directory goes with it"
    );
    println!(
        "host: trapped in sparse areas {in_sparse}, outside {outside}; QEMU served {reads} DMA_READ and {writes} DMA_WRITE messages"
    );
    finish(&console, &name, daemon, &root.join("state/control.sock"));
}

/// How many client connections and client resets a server log shows.
fn server_marks(log: &str) -> (usize, usize) {
    (
        log.matches("client connected").count(),
        log.matches("device reset by the client").count(),
    )
}

/// A device as a pod's VMM gets it from the device plugin: umdev-k8s (beside the daemon)
/// allocates it to a stub kubelet, the mount it answers is bound at its container path
/// inside the chroot (QEMU's container here), and QEMU is given the socket the environment
/// variable names, a path that exists only inside the container.
struct Pod {
    uuid: String,
    /// The socket as the host sees the container's path (inside the chroot).
    socket: PathBuf,
    mountpoint: PathBuf,
    _plugin: Plugin,
    _kubelet: Kubelet,
}

impl Pod {
    fn allocate(env: &Env, root: &Path, scratch: &Path) -> Pod {
        let kubelet = Kubelet::start(&scratch.join("device-plugins"));
        let plugin = Plugin::start(
            root,
            &kubelet,
            &scratch.join("umdev-k8s"),
            &["--owner", "0:0", "--container-dir", "/run/umdev"],
        );
        let resource = format!("umdev.io/{NVME_TYPE}");
        let slot = format!("{NVME_TYPE}-0");
        kubelet
            .wait_registered(&resource, 0, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{resource} never registered: {:?}", kubelet.refused()));
        let r = kubelet
            .allocate(&resource, &[&slot])
            .unwrap_or_else(|e| panic!("Allocate {slot}: {e}"));
        // The pod holds it for the whole boot: no clean-up may take it.
        kubelet.set_held(vec![(resource, vec![slot])]);
        let c = &r.container_responses[0];
        let m = &c.mounts[0];
        let socket = &c.envs["UMDEV_DEVICE_0_SOCKET"];
        assert!(
            Path::new(socket).starts_with(&m.container_path),
            "{socket} is not under {}",
            m.container_path
        );
        let mountpoint = env.root.join(m.container_path.trim_start_matches('/'));
        fs::create_dir_all(&mountpoint).unwrap();
        rustix::mount::mount_bind(Path::new(&m.host_path), &mountpoint)
            .unwrap_or_else(|e| panic!("bind {} at {}: {e}", m.host_path, mountpoint.display()));
        Pod {
            uuid: c.envs["UMDEV_DEVICE_0_UUID"].clone(),
            socket: env.root.join(socket.trim_start_matches('/')),
            mountpoint,
            _plugin: plugin,
            _kubelet: kubelet,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        let _ = fs::remove_dir(&self.mountpoint);
    }
}

/// A clean stop of the daemon (every device removed: with workers a plain SIGTERM would
/// leave them serving), and the guest's results on the test's output.
fn finish(console: &str, name: &str, mut daemon: HostDaemon, control: &Path) {
    let asked = std::process::Command::new(umdev_tests::prereq::binary("umdevctl"))
        .args(["shutdown", "--remove-devices"])
        .env("UMDEV_CONTROL", control)
        .status()
        .is_ok_and(|s| s.success());
    assert!(asked, "umdevctl shutdown --remove-devices failed");
    let s = daemon.proc.stop();
    assert!(
        s.is_some_and(|s| s.success()),
        "the daemon did not exit cleanly on SIGTERM: {s:?}"
    );
    let results: Vec<&str> = console
        .lines()
        .filter(|l| {
            l.starts_with("GUEST-CHECK")
                || l.starts_with("GUEST-VERDICT")
                || l.starts_with("GUEST-NVME-IRQ")
        })
        .collect();
    println!("{name}: {}", results.join("\n"));
}

/// The controller seen from the host after the guest's run: the guest's bytes at their
/// offsets in the backing file, the identity the guest's sysfs showed, its interrupts.
fn nvme_host_checks(
    console: &str,
    dev: &Path,
    backing: &Path,
    which: Run,
    problems: &mut Vec<String>,
) {
    // The guest's kernel must not have complained about the controller: an interrupt line
    // that stays asserted (disabled after 100000 unhandled interrupts), commands that timed
    // out, resets.
    for bad in [
        "nobody cared",
        "Disabling IRQ",
        "timeout",
        "resetting controller",
        "Abort",
        "I/O error",
    ] {
        if let Some(l) = console.lines().find(|l| l.contains(bad)) {
            problems.push(format!("the guest's kernel said {:?}", l.trim()));
        }
    }
    let f = fs::File::open(backing).unwrap();
    let at = |offset: u64, len: usize| {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, offset).map(|()| b)
    };
    // Buffered (seed 1, 64..80 MiB), the first O_DIRECT worker's 2 MiB (seed 2, 8 KiB
    // I/Os), the discarded range (zeroes).
    for (what, offset, len, want) in [
        ("buffered", 64 * MIB, 16 * MIB as usize, Some(1)),
        ("direct", 128 * MIB, 2 * MIB as usize, Some(2)),
        ("discarded", 200 * MIB + 256 * 1024, 256 * 1024, None),
    ] {
        let expected = match want {
            Some(seed) => pattern(offset, len, seed),
            None => vec![0u8; len],
        };
        match at(offset, len) {
            Ok(b) if b == expected => {}
            Ok(_) => problems.push(format!(
                "the backing file does not hold the guest's {what} data at {offset:#x}"
            )),
            Err(e) => problems.push(format!("reading the backing file: {e}")),
        }
    }
    let attr = |name: &str| read_trimmed(&dev.join(name)).unwrap_or_else(|e| e);
    for (key, name) in [("serial", "vendor/serial"), ("subnqn", "vendor/subnqn")] {
        let want = format!("GUEST-NVME-ID {key}={}", attr(name));
        if !console.lines().any(|l| l.trim_end() == want) {
            problems.push(format!("the guest did not show {want:?}"));
        }
    }
    // Interrupt lines: "N: counts... type ... nvme0qK[, nvme0qM]".
    let irq_lines: Vec<(u64, &str)> = console
        .lines()
        .filter_map(|l| l.strip_prefix("GUEST-NVME-IRQ "))
        .map(|l| {
            let count = l
                .split_once(':')
                .map(|(_, rest)| {
                    rest.split_whitespace()
                        .map_while(|w| w.parse::<u64>().ok())
                        .sum()
                })
                .unwrap_or(0);
            (count, l)
        })
        .collect();
    match which {
        Run::AllWithMsix => {
            let msix: Vec<&(u64, &str)> = irq_lines
                .iter()
                .filter(|(n, l)| *n > 0 && l.contains("MSI"))
                .collect();
            let io_queue = msix
                .iter()
                .any(|(_, l)| l.contains("nvme0q") && !l.trim_end().ends_with("nvme0q0"));
            if msix.len() < 2 || !io_queue {
                problems.push(format!(
                    "expected the admin queue's and an I/O queue's MSI-X vectors to count: {irq_lines:?}"
                ));
            }
        }
        Run::NvmeOnIntx => {
            let intx = irq_lines.iter().any(|(n, l)| *n > 0 && !l.contains("MSI"));
            if !intx || irq_lines.iter().any(|(_, l)| l.contains("MSI")) {
                problems.push(format!(
                    "expected the controller's interrupts on INTx only: {irq_lines:?}"
                ));
            }
        }
    }
}
