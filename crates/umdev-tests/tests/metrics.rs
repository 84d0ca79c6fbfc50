#![allow(clippy::unwrap_used)]
//! Per-device metrics (issue 12) through a real daemon: the metrics socket answers a plain
//! read and an HTTP GET with Prometheus text whose counters move as a client works (messages
//! by command, request latency, DMA message bytes, pinned pages, refusals), and `umdevctl
//! stats [<uuid>]` prints the same. In worker mode (`UMDEV_TEST_ISOLATION=worker`, and the
//! second test) the counters come from the workers, and a worker's restart is counted.

mod mdev;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use mdev::{new_uuid, Daemon};
use umdev_client::Client;
use umdev_tests::cmd;

const CONFIG: &str = mdev::TEST_PARENT;

fn scrape(d: &Daemon) -> String {
    let mut s = UnixStream::connect(d.root().join("state/metrics.sock")).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of the sample whose line starts with `name{` and has every label in `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn counters_move_as_a_client_works_and_refusals_are_counted() {
    let d = Daemon::start_test_daemon(CONFIG);
    let u = new_uuid();
    d.create("test0", "umdevtest-plain", &u).unwrap();
    let dev = format!("uuid=\"{u}\"");
    let mut c = Client::connect(d.socket(&u)).unwrap();
    let mut b = [0u8; 8];
    for _ in 0..10 {
        c.region_read(0, 0x40, &mut b).unwrap();
    }
    let first = scrape(&d);
    assert!(
        first.contains("# TYPE umdev_request_seconds histogram"),
        "{first}"
    );
    let reads = |t: &str| sample(t, "umdev_messages_total", &[&dev, "command=\"RegionRead\""]);
    let n1 = reads(&first).expect("no RegionRead counter");
    assert!(n1 >= 10.0, "{first}");
    assert_eq!(
        sample(&first, "umdev_connections_total", &[&dev]),
        Some(1.0)
    );
    for _ in 0..5 {
        c.region_read(0, 0x40, &mut b).unwrap();
    }
    // Pins show as a gauge; a refused second client is counted.
    let _m = cmd::map_memfd(&mut c, 0x10_0000, 1 << 20, true);
    assert_eq!(cmd::pin(&mut c, 0x10_0000, 3, 3), 0);
    // A device copy through the mapped memfd counts on the mapped path; with dirty logging
    // on, its page and the three pinned writable are reported dirty (the copy's page is
    // one of those).
    cmd::logging_start(&mut c, &[]);
    assert_eq!(cmd::copy_write(&mut c, 0x10_0000, 2048, 1), 0);
    let bitmap = cmd::logging_report(&mut c, 0x10_0000, 1 << 20, cmd::PAGE).unwrap();
    assert_eq!(
        bitmap.iter().map(|w| w.count_ones()).sum::<u32>(),
        3,
        "{bitmap:?}"
    );
    cmd::logging_stop(&mut c);
    assert!(Client::connect(d.socket(&u)).is_err());
    // Over HTTP too.
    let mut s = UnixStream::connect(d.root().join("state/metrics.sock")).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut http = String::new();
    s.read_to_string(&mut http).unwrap();
    assert!(http.starts_with("HTTP/1.0 200 OK\r\n"), "{http}");
    let second = http.split("\r\n\r\n").nth(1).unwrap().to_owned();
    assert!(
        reads(&second).unwrap() >= n1 + 5.0,
        "the counter did not move"
    );
    assert_eq!(sample(&second, "umdev_pinned_pages", &[&dev]), Some(3.0));
    let bytes = |path: &str, dir: &str| {
        let (p, d) = (format!("path=\"{path}\""), format!("direction=\"{dir}\""));
        sample(&second, "umdev_dma_bytes_total", &[&dev, &p, &d])
    };
    assert_eq!(bytes("mapped", "write"), Some(2048.0), "{second}");
    assert_eq!(bytes("message", "write"), Some(0.0), "{second}");
    assert_eq!(
        sample(&second, "umdev_dirty_pages_reported_total", &[&dev]),
        Some(3.0),
        "{second}"
    );
    assert!(
        sample(&second, "umdev_refusals_total", &["kind=\"second-client\""]).unwrap_or(0.0) >= 1.0,
        "{second}"
    );
    let count = sample(&second, "umdev_request_seconds_count", &[&dev]).unwrap();
    let inf = sample(
        &second,
        "umdev_request_seconds_bucket",
        &[&dev, "le=\"+Inf\""],
    )
    .unwrap();
    assert_eq!(count, inf);
    // curl, as a scraper would (CI installs it).
    let o = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(d.root().join("state/metrics.sock"))
        .arg("http://localhost/metrics")
        .output()
        .expect("curl (apt-get install curl)");
    let curled = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && reads(&curled).unwrap() >= n1 + 5.0,
        "{curled}"
    );
    // umdevctl stats <uuid>: that device's lines.
    let o = d.umdevctl(&["stats", &u]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("umdev_messages_total"),
        "{text}"
    );
    assert!(text.lines().all(|l| l.contains(&dev)), "{text}");
}

#[test]
fn a_workers_restart_is_counted() {
    let d = Daemon::start_test_daemon(&format!("isolation = \"worker\"\n{CONFIG}"));
    let u = new_uuid();
    d.create("test0", "umdevtest-plain", &u).unwrap();
    let dev = format!("uuid=\"{u}\"");
    let (mut c, pid) = umdev_tests::connect_served(&d.socket(&u)).unwrap();
    c.device_info().unwrap();
    assert_eq!(
        sample(&scrape(&d), "umdev_worker_restarts_total", &[&dev]),
        Some(0.0)
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let t = scrape(&d);
        if sample(&t, "umdev_worker_restarts_total", &[&dev]) == Some(1.0)
            && sample(&t, "umdev_connections_total", &[&dev]).is_some()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{t}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A scrape asks each worker for its devices' counters; one worker that does not answer
/// (stopped with SIGSTOP) delays that scrape only: the registry is not held meanwhile, so
/// `umdevctl list` and the sysfs tree answer at once; once the worker runs again the scrape
/// completes with both devices.
#[test]
fn a_stuck_worker_delays_only_the_scrape() {
    use std::time::{Duration, Instant};
    let d = Daemon::start_test_daemon(&format!("isolation = \"worker\"\n{CONFIG}"));
    let (a, b) = (new_uuid(), new_uuid());
    d.create("test0", "umdevtest-plain", &a).unwrap();
    d.create("test0", "umdevtest-plain", &b).unwrap();
    let (c, pid) = umdev_tests::connect_served(&d.socket(&a)).unwrap();
    drop(c);
    let worker = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    mdev::stop_process(pid);
    let root = d.root();
    let scraper = std::thread::spawn(move || {
        let mut s = UnixStream::connect(root.join("state/metrics.sock")).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    });
    // Let the scrape reach the stopped worker.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let list = String::from_utf8_lossy(&d.umdevctl(&["list"]).stdout).into_owned();
    let type_dir = d.type_dir("test0", "umdevtest-plain");
    let available = std::fs::read_to_string(type_dir.join("available_instances")).unwrap();
    let took = t.elapsed();
    // The scrape was indeed waiting for the worker all along.
    let waiting = !scraper.is_finished();
    rustix::process::kill_process(worker, rustix::process::Signal::CONT).unwrap();
    assert!(waiting, "the scrape did not wait for the stopped worker");
    assert!(
        took < Duration::from_secs(5),
        "list and a sysfs read took {took:?} behind a scrape of a stopped worker"
    );
    assert!(list.contains(&a) && list.contains(&b), "{list}");
    assert_eq!(available.trim(), "0");
    let text = scraper.join().unwrap();
    for u in [&a, &b] {
        assert!(
            sample(
                &text,
                "umdev_connections_total",
                &[&format!("uuid=\"{u}\"")]
            )
            .is_some(),
            "{u} missing from the scrape:\n{text}"
        );
    }
}
