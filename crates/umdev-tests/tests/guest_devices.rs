#![allow(clippy::unwrap_used)]
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
//! Needs root, `/dev/fuse` and the guest cache (`tests/guest/setup.sh`); logs of each run
//! stay in `$CARGO_TARGET_TMPDIR/guest-devices-<memory>/`.

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use umdev_tests::guest::{
    is_socket, read_trimmed, sink_text, tail, Boot, Env, Guest, HostDaemon, Memory,
};

/// A whole guest run; about 10 s under TCG here, CI machines may be slower.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
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
fn guest_drives_the_test_device_with_shared_memory() {
    run(Memory::Shared);
}

#[test]
fn guest_drives_the_test_device_with_plain_memory() {
    run(Memory::Plain);
}

fn run(memory: Memory) {
    let env = Env::get();
    let log_dir = umdev_tests::guest::log_dir(
        env!("CARGO_TARGET_TMPDIR"),
        &format!("guest-devices-{}", memory.name()),
    );
    let sockets = env.dir_in_chroot();
    let host = tempfile::tempdir().unwrap();
    let root = host.path().join("root");
    let config = host.path().join("umdevd.toml");
    let text = format!(
        "root = {:?}\nsockets_dir = {:?}\n\n[[parent]]\nname = \"test0\"\ndriver = \"umdevtest\"\n\n[[parent]]\nname = \"hello0\"\ndriver = \"hello\"\noptions = {{ devices = 1 }}\n",
        root.display().to_string(),
        sockets.path().display().to_string(),
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

    let boot = Boot {
        env: &env,
        memory,
        sockets: &[&socket, &hello_socket],
        append: "umdev.test=devices",
        // Under TCG a slow guest must not hit QEMU's 5 s reply timeout.
        device_props: r#","x-msg-timeout":30000"#,
        log_dir: &log_dir,
    };
    let mut guest = Guest::boot(&boot).unwrap_or_else(|e| panic!("{e}"));
    let status = guest.wait(GUEST_TIMEOUT, || match daemon.proc.exited() {
        Some(s) => Err(format!("the daemon exited during the guest run: {s}")),
        None => Ok(()),
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
    for check in CHECKS {
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
    let s = daemon.proc.stop();
    assert!(
        s.is_some_and(|s| s.success()),
        "the daemon did not exit cleanly on SIGTERM: {s:?}"
    );
    let results: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with("GUEST-CHECK") || l.starts_with("GUEST-VERDICT"))
        .collect();
    println!(
        "guest devices test ({} memory): {}\nhost: trapped in sparse areas {in_sparse}, outside {outside}; QEMU served {reads} DMA_READ and {writes} DMA_WRITE messages",
        memory.name(),
        results.join("\n")
    );
}
