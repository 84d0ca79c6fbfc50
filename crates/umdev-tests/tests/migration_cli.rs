//! `umdevctl migrate` between two `umdevd` processes, each serving one mtty card: what was
//! typed on the host before the migration reaches the destination's guest side, once and in
//! order, and the source's host side is told (end of file).
#![allow(clippy::unwrap_used)]

mod mdev;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mdev::binary;
use umdev_client::Client;
use umdev_mtty::regs::{LSR, LSR_DR, RBR_THR};

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `umdevd` serving an mtty-1 card; returns once it printed `ready`.
fn daemon(dir: &Path, name: &str) -> Daemon {
    let mut child = Command::new(binary("umdevd"))
        .args(["--type", "mtty-1", "--socket"])
        .arg(dir.join(format!("{name}.sock")))
        .arg("--console-dir")
        .arg(dir.join(name))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let ready = out.lines().any(|l| l.is_ok_and(|l| l == "ready"));
    let d = Daemon(child);
    assert!(ready, "umdevd {name} exited before it was ready");
    d
}

#[test]
fn umdevctl_migrate_moves_bytes_typed_before_the_migration() {
    if !binary("umdevd").exists() || !binary("umdevctl").exists() {
        assert!(
            std::env::var_os("UMDEV_MDEV_REQUIRED").is_none(),
            "umdevd and umdevctl must be built"
        );
        eprintln!("skipped: build umdevd and umdevctl first");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _src = daemon(dir.path(), "src");
    let _dst = daemon(dir.path(), "dst");
    let mut host = UnixStream::connect(dir.path().join("src/port0.sock")).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let typed = b"typed on the host before the migration\n";
    host.write_all(typed).unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let out = Command::new(binary("umdevctl"))
        .arg("migrate")
        .arg(dir.path().join("src.sock"))
        .arg(dir.path().join("dst.sock"))
        .env("UMDEV_CONTROL", dir.path().join("no-daemon-needed"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "umdevctl migrate failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("downtime"), "{stdout}");

    // The source handed its host side over: its peer sees end of file.
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();

    // The destination's guest side reads what was typed, once, in order.
    let mut c = Client::connect(dir.path().join("dst.sock")).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < typed.len() && Instant::now() < deadline {
        let mut lsr = [0u8];
        c.region_read(0, LSR, &mut lsr).unwrap();
        if lsr[0] & LSR_DR != 0 {
            let mut b = [0u8];
            c.region_read(0, RBR_THR, &mut b).unwrap();
            got.push(b[0]);
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(typed)
    );
    let mut lsr = [0u8];
    c.region_read(0, LSR, &mut lsr).unwrap();
    assert_eq!(lsr[0] & LSR_DR, 0, "nothing more than what was typed");
}

#[test]
fn umdevctl_migrate_names_what_it_cannot_find() {
    if !binary("umdevctl").exists() {
        eprintln!("skipped: build umdevctl first");
        return;
    }
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
