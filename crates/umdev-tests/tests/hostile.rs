#![allow(clippy::unwrap_used)]
//! Hostile clients and faults against a real daemon (issue 12's findings, each named):
//!
//! - a process that connects to a device's socket and never sends VERSION must not hold the
//!   device: a proper client that connects next is served, and the silent one is
//!   disconnected after the VERSION timeout;
//! - `umdevd` stops on SIGTERM even when its control socket's path was removed or replaced
//!   while it ran (its stop must not depend on a path on disk);
//! - a client that shrinks a memfd it mapped must not crash the server (SIGBUS): the
//!   device's DMA into the gone pages, by copy and through a pin, answers an error, and the
//!   server, the client's connection and another device go on.

mod mdev;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mdev::{new_uuid, Daemon};
use umdev_client::Client;

/// The default VERSION timeout.
const VERSION_TIMEOUT: Duration = Duration::from_secs(2);

const CONFIG: &str = mdev::TEST_PARENT;

#[test]
fn finding_a_silent_connection_does_not_hold_the_device() {
    let d = Daemon::start_test_daemon(CONFIG);
    let t = new_uuid();
    d.create("test0", "umdevtest-plain", &t).unwrap();
    // Connects and says nothing.
    let mut silent = UnixStream::connect(d.socket(&t)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // A proper client is served at once (it was reset with ECONNRESET while the silent one
    // waited).
    let mut c = Client::connect(d.socket(&t)).unwrap();
    c.region_write(0, 0x40, &[1, 2, 3, 4]).unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 0x40, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    drop(c);
    // Alone, a silent connection is closed after the VERSION timeout.
    let mut silent2 = UnixStream::connect(d.socket(&t)).unwrap();
    let t0 = Instant::now();
    silent2
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = silent2.read(&mut buf).unwrap_or(0);
    assert_eq!(
        n, 0,
        "the server sent something to a client that never spoke"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= VERSION_TIMEOUT - Duration::from_millis(100)
            && waited < VERSION_TIMEOUT + Duration::from_secs(3),
        "closed after {waited:?}"
    );
    // The first silent one was let go when the proper client came.
    silent
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0);
}

#[test]
fn finding_sigterm_stops_the_daemon_whose_control_socket_path_is_gone() {
    for replace in [false, true] {
        let mut d = Daemon::start_test_daemon(CONFIG);
        let control = d.control();
        std::fs::remove_file(&control).unwrap();
        if replace {
            // Something else at the path now: a listener nobody accepts on.
            let _other = std::os::unix::net::UnixListener::bind(&control).unwrap();
            std::mem::forget(_other);
        }
        let mut child = d.child.take().unwrap();
        let t0 = Instant::now();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                child.kill().unwrap();
                panic!("umdevd hung on SIGTERM with its control socket's path removed (replaced: {replace})");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{status}");
    }
}

#[test]
fn finding_a_client_shrinking_its_mapped_memfd_does_not_crash_the_server() {
    use umdev_tests::cmd;
    let d = Daemon::start_test_daemon(CONFIG);
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("test0", "umdevtest-plain", &b).unwrap();
    let mut ca = Client::connect(d.socket(&a)).unwrap();
    let mut cb = Client::connect(d.socket(&b)).unwrap();
    const BASE: u64 = 0x10_0000;
    const PINNED: u64 = 0x40_0000;
    let mem = cmd::map_memfd(&mut ca, BASE, 1 << 20, true);
    let pinned = cmd::map_memfd(&mut ca, PINNED, 1 << 20, true);
    assert_eq!(cmd::copy_write(&mut ca, BASE, 64, 1), 0, "DMA works first");
    assert_eq!(cmd::pin(&mut ca, PINNED, 1, 3), 0);
    assert_eq!(cmd::pinned_write(&mut ca, PINNED, 64, 1), 0);
    // The client takes its memory away under the device.
    rustix::fs::ftruncate(&mem, 0).unwrap();
    rustix::fs::ftruncate(&pinned, 0).unwrap();
    let copy = cmd::copy_write(&mut ca, BASE + 0x2000, 64, 2);
    assert_ne!(copy, 0, "a copy into memory the client took away succeeded");
    let through_pin = cmd::pinned_write(&mut ca, PINNED, 64, 3);
    assert_ne!(
        through_pin, 0,
        "a write through a pin of gone memory succeeded"
    );
    // The server, the client's connection and the other device go on.
    ca.region_write(0, 0x40, &[5, 6, 7, 8]).unwrap();
    let mut back = [0u8; 4];
    ca.region_read(0, 0x40, &mut back).unwrap();
    assert_eq!(back, [5, 6, 7, 8]);
    cb.region_write(0, 0x40, &[1, 1, 2, 2]).unwrap();
    cb.region_read(0, 0x40, &mut back).unwrap();
    assert_eq!(back, [1, 1, 2, 2]);
    let _mb = cmd::map_memfd(&mut cb, BASE, 1 << 20, true);
    assert_eq!(cmd::copy_write(&mut cb, BASE, 64, 4), 0);
}

#[test]
fn the_refuse_policy_maps_only_memory_sealed_against_shrinking() {
    use std::os::fd::AsFd;
    use umdev_tests::cmd;
    let config = format!("[server]\nunsealed_memory = \"refuse\"\n{CONFIG}");
    let d = Daemon::start_test_daemon(&config);
    let a = new_uuid();
    d.create("test0", "umdevtest-plain", &a).unwrap();
    let mut c = Client::connect(d.socket(&a)).unwrap();
    let flags = umdev_proto::wire::DMA_MAP_FLAG_READ | umdev_proto::wire::DMA_MAP_FLAG_WRITE;
    let unsealed = umdev_tests::guest_memfd(1 << 20);
    let e = c
        .dma_map(0x10_0000, 1 << 20, flags, Some((unsealed.as_fd(), 0)))
        .unwrap_err();
    assert_eq!(e.errno(), Some(1), "EPERM for an unsealed memfd: {e:?}");
    let sealed = rustix::fs::memfd_create(
        "sealed",
        rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
    )
    .unwrap();
    rustix::fs::ftruncate(&sealed, 1 << 20).unwrap();
    rustix::fs::fcntl_add_seals(&sealed, rustix::fs::SealFlags::SHRINK).unwrap();
    c.dma_map(0x10_0000, 1 << 20, flags, Some((sealed.as_fd(), 0)))
        .unwrap();
    assert_eq!(cmd::copy_write(&mut c, 0x10_0000, 64, 3), 0);
    let mut seen = [0u8; 64];
    rustix::io::pread(&sealed, &mut seen, 0).unwrap();
    assert_eq!(seen.to_vec(), cmd::pattern(64, 3));
}

/// A client that sends requests and never reads the replies: the server's sends wait for
/// room at most `send_timeout_ms`, then the client is disconnected; another device's client
/// never notices, and the device takes a new client.
#[test]
fn a_client_that_stops_reading_is_disconnected_and_nobody_else_notices() {
    use umdev_proto::{wire, Command};
    use zerocopy::IntoBytes;
    let config = format!("[server]\nsend_timeout_ms = 500\n{CONFIG}");
    let d = Daemon::start_test_daemon(&config);
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("test0", "umdevtest-plain", &b).unwrap();
    let mut other = Client::connect(d.socket(&b)).unwrap();
    let flood = umdev_tests::wire::Raw::negotiated(&d.socket(&a));
    let req = wire::RegionAccess {
        offset: 0,
        region: 0,
        count: 4096,
    };
    // Far more replies than a socket holds (4 KiB each), none read; until the server
    // closes the connection.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut n = 0u32;
        for id in 0..2000u16 {
            let h = umdev_proto::Header::command(id, Command::RegionRead, 16).unwrap();
            if umdev_transport::Transport::send(&flood.t, &h, &[req.as_bytes()], &[]).is_err() {
                break;
            }
            n += 1;
        }
        let _ = tx.send((n, flood));
    });
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    let mut back = [0u8; 4];
    while t0.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        other.region_read(0, 0x40, &mut back).unwrap();
        worst = worst.max(t.elapsed());
    }
    assert!(
        worst < Duration::from_millis(500),
        "the other device stalled {worst:?}"
    );
    let (n, mut flood) = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the server never gave up on a client that stopped reading");
    assert!(n > 0);
    // Its connection was closed: what the socket held, then the end.
    let mut got = 0;
    while flood.try_recv().is_ok() {
        got += 1;
    }
    assert!(got < 2000, "every reply was sent: the server never gave up");
    // The device takes a new client.
    let mut c = Client::connect(d.socket(&a)).unwrap();
    c.region_read(0, 0x40, &mut back).unwrap();
}

/// `allow_uids`: a peer whose uid is not listed is refused before VERSION.
#[test]
fn peers_outside_the_allow_lists_are_refused() {
    let me = rustix::process::getuid().as_raw();
    let config = format!("[server]\nallow_uids = [{}]\n{CONFIG}", me + 1);
    let d = Daemon::start_test_daemon(&config);
    let a = new_uuid();
    d.create("test0", "umdevtest-plain", &a).unwrap();
    assert!(
        Client::connect(d.socket(&a)).is_err(),
        "a peer outside the allow-list was served"
    );
    drop(d);
    let config = format!("[server]\nallow_uids = [{me}]\n{CONFIG}");
    let d = Daemon::start_test_daemon(&config);
    d.create("test0", "umdevtest-plain", &a).unwrap();
    let mut c = Client::connect(d.socket(&a)).unwrap();
    c.device_info().unwrap();
}

/// Writes `text` to `file` as `uid`:`gid` (no supplementary groups); `Ok` or the error
/// `sh` printed.
fn write_as(uid: u32, gid: u32, file: &std::path::Path, text: &str) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf '%s\\n' \"$1\" > \"$2\"")
        .arg("sh")
        .arg(text)
        .arg(file)
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The sysfs tree's writable files follow the sockets' policy: a parent whose sockets are
/// group 4242's with mode 0660 lets that group create and remove its devices (as it may
/// connect to them); another parent's files stay the daemon's alone; and with allow-lists
/// set, a writer they do not list is refused (EACCES, logged as a refusal) even where the
/// mode lets it write. Root may always write.
#[test]
fn sysfs_writes_follow_the_socket_owner_mode_and_allow_lists() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const GROUP: u32 = 4242;
    const LISTED: u32 = 5001;
    const UNLISTED: u32 = 5000;
    let config = format!(
        "[server]\nallow_uids = [{LISTED}]\n\n{CONFIG}socket_owner = \"0:{GROUP}\"\n\
         socket_mode = \"0660\"\n\n[[parent]]\nname = \"test1\"\ndriver = \"umdevtest\"\n\
         options = {{ pool = 2 }}\n"
    );
    let d = Daemon::start_logged(
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_umdevd-test")),
        &config,
    );
    // Other users must reach the mount point (the test's directory is root's, 0700).
    for p in [d.dir(), d.root().as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let create0 = d.type_dir("test0", "umdevtest-plain").join("create");
    let create1 = d.type_dir("test1", "umdevtest-plain").join("create");
    let m = std::fs::metadata(&create0).unwrap();
    assert_eq!((m.mode() & 0o777, m.uid(), m.gid()), (0o220, 0, GROUP));
    let m = std::fs::metadata(&create1).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o200, 0));

    // The group may create on test0, not on test1 (the kernel checks the mode).
    let a = new_uuid();
    write_as(LISTED, GROUP, &create0, &a).unwrap();
    assert!(d.mdev_dir(&a).exists());
    let e = write_as(LISTED, GROUP, &create1, &new_uuid()).unwrap_err();
    assert!(e.contains("Permission denied"), "{e}");
    // Not in the group: refused by the mode.
    let e = write_as(LISTED, GROUP + 1, &create0, &new_uuid()).unwrap_err();
    assert!(e.contains("Permission denied"), "{e}");
    // In the group but not in allow_uids: refused by the tree, and logged.
    let b = new_uuid();
    let e = write_as(UNLISTED, GROUP, &create0, &b).unwrap_err();
    assert!(e.contains("Permission denied"), "{e}");
    assert!(!d.mdev_dir(&b).exists());
    let log = d.log();
    assert!(
        log.contains("sysfs write") && log.contains(&format!("uid {UNLISTED} gid {GROUP}")),
        "the refusal was not logged:\n{log}"
    );
    // The device's own writable file follows its parent; root may write anything.
    let remove = d.mdev_dir(&a).join("remove");
    let m = std::fs::metadata(&remove).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o220, GROUP));
    assert!(write_as(UNLISTED, GROUP, &remove, "1").is_err());
    write_as(LISTED, GROUP, &remove, "1").unwrap();
    assert!(!d.mdev_dir(&a).exists());
    d.create("test1", "umdevtest-plain", &b).unwrap();
}

/// `listen_backlog`: connections waiting to be accepted on a device's socket are bounded.
/// With the worker stopped (SIGSTOP: nothing accepts), connections past the backlog are
/// refused with EAGAIN instead of piling up; once it runs again the device serves.
#[test]
fn connections_waiting_on_a_device_are_bounded_by_the_backlog() {
    let config = format!("isolation = \"worker\"\n[server]\nlisten_backlog = 4\n\n{CONFIG}");
    let d = Daemon::start_test_daemon(&config);
    let a = new_uuid();
    d.create("test0", "umdevtest-plain", &a).unwrap();
    let (c, pid) = umdev_tests::connect_served(&d.socket(&a)).unwrap();
    drop(c);
    let worker = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    // Until it is stopped it may still accept.
    mdev::stop_process(pid);
    let mut waiting = Vec::new();
    let refused = loop {
        match umdev_transport::listen::connect_nonblocking(&d.socket(&a)) {
            Ok(s) => waiting.push(s),
            Err(e) => break e,
        }
        if waiting.len() > 64 {
            break rustix::io::Errno::MFILE;
        }
    };
    rustix::process::kill_process(worker, rustix::process::Signal::CONT).unwrap();
    assert_eq!(
        refused,
        rustix::io::Errno::AGAIN,
        "{} waited",
        waiting.len()
    );
    // The backlog, and Linux's one more.
    assert!((4..=5).contains(&waiting.len()), "{} waited", waiting.len());
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = Client::connect(d.socket(&a)) {
            c.device_info().unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "the device does not serve again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `[[device]]`: one device's own socket owner and mode over its parent's, for its socket,
/// its directory and its writable files in the tree; the parent's other devices keep the
/// parent's.
#[test]
fn a_device_can_have_a_socket_policy_of_its_own() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const GROUP: u32 = 4343;
    let own = new_uuid();
    let config = format!(
        "[[device]]\nuuid = \"{own}\"\nsocket_owner = \"0:{GROUP}\"\nsocket_mode = \"0660\"\n\n{CONFIG}"
    );
    let d = Daemon::start_test_daemon(&config);
    for p in [d.dir(), d.root().as_path(), &d.root().join("sockets")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let other = new_uuid();
    d.create("test0", "umdevtest-plain", &own).unwrap();
    d.create("test0", "umdevtest-plain", &other).unwrap();
    let m = std::fs::metadata(d.socket(&own)).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, GROUP));
    let m = std::fs::metadata(d.device_dir(&own)).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o770, GROUP));
    let m = std::fs::metadata(d.socket(&other)).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o600, 0));
    let m = std::fs::metadata(d.mdev_dir(&own).join("remove")).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o220, GROUP));
    let m = std::fs::metadata(d.mdev_dir(&other).join("remove")).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o200, 0));
    // The group may remove its own device, not the other.
    assert!(write_as(5001, GROUP, &d.mdev_dir(&other).join("remove"), "1").is_err());
    write_as(5001, GROUP, &d.mdev_dir(&own).join("remove"), "1").unwrap();
    assert!(!d.mdev_dir(&own).exists());
    assert!(d.mdev_dir(&other).exists());
}
