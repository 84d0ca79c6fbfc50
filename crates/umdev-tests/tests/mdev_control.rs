#![allow(clippy::unwrap_used)]
//! The control socket serves connections side by side: a `stop` waiting for a client to
//! release its device holds up no other request, the number of connections is bounded,
//! and SIGTERM still stops the daemon cleanly with requests in flight.

mod mdev;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mdev::{binary, new_uuid, require, Daemon, CONFIG};
use umdev_proto::wire;
use umdev_tests::Efd;

/// The REQ interrupt's index (`VFIO_PCI_REQ_IRQ_INDEX`).
const REQ: u32 = 4;

/// How long the daemon waits for a client after REQ: long enough that "promptly" below
/// cannot be a stop that already gave up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(4);

/// Under this, an answer was not held up by the waiting stop.
const PROMPT: Duration = Duration::from_secs(1);

fn daemon() -> Option<Daemon> {
    require();
    assert!(binary("umdevctl").exists(), "umdevctl is not built");
    let config = CONFIG.replace(
        "release_timeout_ms = 300",
        &format!("release_timeout_ms = {}", RELEASE_TIMEOUT.as_millis()),
    );
    assert_ne!(config, CONFIG);
    Some(Daemon::start(&config))
}

fn umdevctl(d: &Daemon, args: &[&str]) -> Output {
    Command::new(binary("umdevctl"))
        .args(args)
        .env("UMDEV_CONTROL", d.control())
        .output()
        .unwrap()
}

/// A device held by a real vfio-user client that armed REQ and will not release it.
struct Held {
    uuid: String,
    _client: umdev_client::Client,
    req: Efd,
}

fn hold(d: &Daemon) -> Held {
    let uuid = new_uuid();
    d.create("mtty0", "mtty-2", &uuid).unwrap();
    let sock = std::fs::read_to_string(d.mdev_dir(&uuid).join("vfio_user_socket")).unwrap();
    let mut client = umdev_client::Client::connect(sock.trim()).unwrap();
    let req = Efd::new();
    client
        .set_irq_eventfds(REQ, wire::IRQ_SET_ACTION_TRIGGER, 0, &[req.as_fd()])
        .unwrap();
    Held {
        uuid,
        _client: client,
        req,
    }
}

/// Runs `umdevctl stop` on the held device in a thread and returns once the daemon has
/// asked the client back (REQ fired): from then on the stop is waiting in the daemon.
fn stop_waiting(d: &Daemon, held: &Held) -> JoinHandle<(Output, Duration)> {
    let (control, uuid) = (d.control(), held.uuid.clone());
    let stop = std::thread::spawn(move || {
        let t = Instant::now();
        let o = Command::new(binary("umdevctl"))
            .args(["stop", "-u", &uuid])
            .env("UMDEV_CONTROL", control)
            .output()
            .unwrap();
        (o, t.elapsed())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.req.read().is_none() {
        assert!(Instant::now() < deadline, "the stop never sent REQ");
        std::thread::sleep(Duration::from_millis(10));
    }
    stop
}

#[test]
fn list_answers_promptly_while_a_stop_waits_for_a_held_device() {
    let Some(mut d) = daemon() else { return };
    let held = hold(&d);
    let free = new_uuid();
    d.create("mtty1", "mtty-1", &free).unwrap();
    let stop = stop_waiting(&d, &held);

    let t = Instant::now();
    let list = umdevctl(&d, &["list"]);
    let took = t.elapsed();
    assert!(list.status.success(), "{list:?}");
    let text = String::from_utf8(list.stdout).unwrap();
    assert!(text.contains(&held.uuid) && text.contains(&free), "{text}");
    assert!(took < PROMPT, "list took {took:?} behind a waiting stop");
    // A change goes through too: stopping another, unheld device.
    let t = Instant::now();
    let o = umdevctl(&d, &["stop", "-u", &free]);
    assert!(o.status.success(), "{o:?}");
    assert!(t.elapsed() < PROMPT, "stop took {:?}", t.elapsed());
    assert!(!d.mdev_dir(&free).exists());
    assert!(!stop.is_finished(), "the held device's stop ended early");

    // The waiting stop itself still ends as before: the client kept the device.
    let (o, took) = stop.join().unwrap();
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not release"), "{err}");
    assert!(
        took >= RELEASE_TIMEOUT - PROMPT,
        "stop gave up after {took:?}"
    );
    assert!(d.mdev_dir(&held.uuid).exists());
    drop(held);
    d.stop();
}

#[test]
fn connections_over_the_limit_are_refused_with_eagain_and_slots_come_back() {
    let Some(mut d) = daemon() else { return };
    // 64 connections that never send their request hold every slot.
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(d.control()).unwrap())
        .collect();
    let mut s = UnixStream::connect(d.control()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"{\"op\":\"groups\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(reply["reply"], "error", "{line}");
    assert_eq!(reply["errno"], 11, "{line}");
    drop(idle);
    // The slots are given back as the idle connections close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let o = umdevctl(&d, &["list"]);
        if o.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{o:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.stop();
}

#[test]
fn sigterm_with_a_stop_waiting_and_an_idle_connection_exits_cleanly() {
    let Some(mut d) = daemon() else { return };
    let held = hold(&d);
    let stop = stop_waiting(&d, &held);
    // Connected, never sends: cut at shutdown rather than waited for.
    let idle = UnixStream::connect(d.control()).unwrap();
    let t = Instant::now();
    d.stop(); // SIGTERM, and asserts a successful exit
    let took = t.elapsed();
    assert!(
        took < RELEASE_TIMEOUT + Duration::from_secs(3),
        "shutdown took {took:?}"
    );
    // The stop in flight was answered (the client kept the device), not left hanging.
    let (o, _) = stop.join().unwrap();
    assert!(!o.status.success(), "{o:?}");
    assert!(!String::from_utf8_lossy(&o.stderr).is_empty());
    // The idle connection was closed, with no reply.
    let mut line = String::new();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(BufReader::new(&idle).read_line(&mut line).unwrap(), 0);
    assert!(!d.control().exists());
    let sock = d.socket(&held.uuid.to_string());
    assert!(!sock.exists());
    drop(held);
}
