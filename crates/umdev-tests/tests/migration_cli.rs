//! `umdevctl migrate` on devices created the way a user creates them (the sysfs `create`
//! file of a real `umdevd`): between two mtty cards of one daemon (named by UUID), and
//! between cards of two daemons (named by their sockets). A host program types numbered
//! lines into the source card's port socket before and during the migration; when the
//! source hands its host side over (end of file, then EPIPE), it goes on with the
//! destination's socket. The destination's guest side must read every line once, in order.
#![allow(clippy::unwrap_used)]

mod mdev;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mdev::{binary, new_uuid, require, Daemon};
use umdev_client::Client;
use umdev_mtty::regs::{LSR, LSR_DR};

/// One parent with host sockets for its ports.
const CONFIG: &str = r#"
[[parent]]
name = "mtty0"
driver = "mtty"
"#;

/// Lines the host types: `LINES_BEFORE` before the migration starts, the rest during and
/// after it.
const LINES: usize = 120;
const LINES_BEFORE: usize = 20;

fn line(i: usize) -> Vec<u8> {
    format!("line {i:04} typed on the host\n").into_bytes()
}

/// What the host typist did.
struct Typed {
    /// Lines written whole to the source before it handed its host side over.
    on_source: usize,
    /// Whether the source's connection ended with end of file (the hand-over).
    saw_eof: bool,
}

/// Types every line into `src`'s port 0; on the hand-over (the write fails) it goes on with
/// `dst`'s. Lines after `LINES_BEFORE` wait for `go`.
fn typist(src: PathBuf, dst: PathBuf, go: Arc<AtomicBool>) -> JoinHandle<Typed> {
    std::thread::spawn(move || {
        let mut conn = UnixStream::connect(&src).unwrap();
        let mut on_source = true;
        let mut typed = Typed {
            on_source: 0,
            saw_eof: false,
        };
        for i in 0..LINES {
            if i == LINES_BEFORE {
                while !go.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let l = line(i);
            let mut sent = 0;
            while sent < l.len() {
                match conn.write(&l[sent..]) {
                    Ok(n) => sent += n,
                    Err(e)
                        if on_source
                            && matches!(
                                e.kind(),
                                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
                            ) =>
                    {
                        // The source took everything before this and closed: read its end.
                        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut rest = Vec::new();
                        typed.saw_eof = conn.read_to_end(&mut rest).is_ok();
                        on_source = false;
                        conn = connect_retrying(&dst);
                    }
                    Err(e) => panic!("typing line {i}: {e}"),
                }
            }
            if on_source {
                typed.on_source = i + 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(!on_source, "the source never handed its host side over");
        typed
    })
}

fn connect_retrying(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "connecting to {}: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Reads what the card's port 0 received, as its guest driver would, until `want` bytes.
fn guest_reads(socket: &Path, want: usize) -> Vec<u8> {
    let mut c = Client::connect(socket).unwrap();
    let got = umdev_tests::mtty_port0_reads(&mut c, want, Duration::from_secs(30));
    // Nothing more than what was typed.
    std::thread::sleep(Duration::from_millis(50));
    let mut lsr = [0u8];
    c.region_read(0, LSR, &mut lsr).unwrap();
    assert_eq!(lsr[0] & LSR_DR, 0, "more bytes than were typed");
    got
}

/// Creates an mtty-1 card through `d`'s sysfs `create` file; returns its UUID and socket.
fn create(d: &Daemon) -> (String, PathBuf) {
    let u = new_uuid();
    d.create("mtty0", "mtty-1", &u).unwrap();
    let sock = std::fs::read_to_string(d.mdev_dir(&u).join("vfio_user_socket")).unwrap();
    (u, PathBuf::from(sock.trim()))
}

fn umdevctl_migrate(control: &Path, from: &str, to: &str) -> String {
    let out = Command::new(binary("umdevctl"))
        .args(["migrate", from, to])
        .env("UMDEV_CONTROL", control)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "umdevctl migrate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("downtime"), "{stdout}");
    stdout
}

/// The whole check: type, migrate with `migrate`, read on the destination.
fn typed_lines_arrive_once_in_order(
    src: &Daemon,
    dst: &Daemon,
    migrate: impl FnOnce(&str, &Path, &str, &Path),
) {
    let (a, a_sock) = create(src);
    let (b, b_sock) = create(dst);
    let go = Arc::new(AtomicBool::new(false));
    let t = typist(
        src.device_dir(&a).join("port0.sock"),
        dst.device_dir(&b).join("port0.sock"),
        go.clone(),
    );
    // Let the first lines reach the source card before the migration starts; the rest are
    // typed while it runs.
    std::thread::sleep(Duration::from_millis(100));
    go.store(true, Ordering::Release);
    migrate(&a, &a_sock, &b, &b_sock);
    let typed = t.join().unwrap();
    assert!(typed.saw_eof, "the source's host side must see end of file");
    assert!(
        typed.on_source >= LINES_BEFORE,
        "lines typed before the migration went to the source"
    );
    let want: Vec<u8> = (0..LINES).flat_map(line).collect();
    let got = guest_reads(&b_sock, want.len());
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}

#[test]
fn migrate_between_two_cards_of_one_daemon_by_uuid() {
    require();
    let d = Daemon::start(CONFIG);
    let control = d.control();
    typed_lines_arrive_once_in_order(&d, &d, |a, _, b, _| {
        umdevctl_migrate(&control, a, b);
    });
}

#[test]
fn migrate_between_cards_of_two_daemons_by_socket() {
    require();
    let src = Daemon::start(CONFIG);
    let dst = Daemon::start(CONFIG);
    let control = src.control();
    typed_lines_arrive_once_in_order(&src, &dst, |_, a, _, b| {
        umdevctl_migrate(&control, &a.display().to_string(), &b.display().to_string());
    });
}

#[test]
fn umdevctl_migrate_names_what_it_cannot_find() {
    require();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary("umdevctl"))
        .args(["migrate", "no-such-device", "other"])
        .env("UMDEV_CONTROL", dir.path().join("control.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-device"), "{err}");
}
