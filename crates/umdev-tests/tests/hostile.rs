#![allow(clippy::unwrap_used)]
//! Hostile clients and faults against a real daemon (issue 12's findings, each named):
//!
//! - a process that connects to a device's socket and never sends VERSION must not hold the
//!   device: a proper client that connects next is served, and the silent one is
//!   disconnected after the VERSION timeout;
//! - `umdevd` stops on SIGTERM even when its control socket's path was removed or replaced
//!   while it ran (its stop must not depend on a path on disk).

mod mdev;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mdev::{new_uuid, Daemon};
use umdev_client::Client;

/// The default VERSION timeout.
const VERSION_TIMEOUT: Duration = Duration::from_secs(2);

const CONFIG: &str = r#"
[[parent]]
name = "test0"
driver = "umdevtest"
options = { pool = 2 }
"#;

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
    assert_eq!(n, 0, "the server sent something to a client that never spoke");
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
