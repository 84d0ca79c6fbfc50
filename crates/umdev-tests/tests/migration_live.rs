#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
//! Live migration between two servers: mtty while bytes stream both ways through its port
//! (every byte arrives once, in order), the test device with its memory compared page by
//! page (dirty pages copied during pre-copy, pins restored), and streams that must be
//! refused (corrupted, truncated, wrong version, wrong device) leaving the destination
//! usable.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use umdev_client::migration::{FileCopier, MigrateOptions, Migration};
use umdev_client::Client;
use umdev_mtty::{regs, HostEndpoint, Mtty, MttyConfig};
use umdev_pci::PciFunction;
use umdev_proto::wire;
use umdev_server::ServerConfig;
use umdev_tests::cmd::{self, map_memfd, PAGE};
use umdev_tests::TestServer;

const EINVAL: i32 = 22;
/// How far the host writer may run ahead of the guest reader.
const WINDOW: u64 = 8192;
const EBUSY: i32 = 16;

/// Byte `i` of the host-to-guest stream and of the guest-to-host stream.
fn h2g(i: u64) -> u8 {
    (i % 251) as u8
}
fn g2h(i: u64) -> u8 {
    (i.wrapping_mul(7) % 253) as u8
}

fn mtty_server(dir: &Path, name: &str) -> (TestServer, PathBuf) {
    let sock = dir.join(name);
    let m = Mtty::new(MttyConfig::new(
        1,
        vec![HostEndpoint::UnixSocket(sock.clone())],
    ))
    .unwrap();
    let f = PciFunction::new(m.spec(), Box::new(m));
    (TestServer::start(f, ServerConfig::default()), sock)
}

#[derive(Default)]
struct Shared {
    migrated: AtomicBool,
    stop_writing: AtomicBool,
    done: AtomicBool,
    host_sent: AtomicU64,
    host_received: AtomicU64,
    guest_sent: AtomicU64,
    guest_received: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn wait_migrated(&self) {
        while !self.migrated.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The host side: writes the host-to-guest stream as fast as the port takes it and checks
/// the guest-to-host stream; when the source hands the connection over (end of file,
/// EPIPE) it goes on with the destination's socket.
fn host_side(shared: Arc<Shared>, src: PathBuf, dst: PathBuf) {
    let mut conn = UnixStream::connect(&src).unwrap();
    conn.set_nonblocking(true).unwrap();
    let mut moved = false;
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    // EPIPE on a write comes before the end of file on reads: what the source sent is
    // still to be read, so the connection is given up only at the end of file.
    let mut write_dead = false;
    loop {
        let mut progress = false;
        let mut dead = false;
        match conn.read(&mut buf) {
            Ok(0) => dead = true,
            Ok(n) => {
                for &b in &buf[..n] {
                    if b != g2h(received) {
                        shared
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("host: byte {received} is {b}"));
                    }
                    received += 1;
                }
                shared.host_received.store(received, Ordering::Release);
                progress = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => dead = true,
        }
        // At most WINDOW bytes ahead of the guest: the port, not the socket buffers, sets
        // the pace, and the drain at the end stays short.
        let ahead = sent - shared.guest_received.load(Ordering::Acquire);
        if !write_dead && !shared.stop_writing.load(Ordering::Acquire) && ahead < WINDOW {
            out.clear();
            out.extend((sent..sent + (WINDOW - ahead).min(4096)).map(h2g));
            match conn.write(&out) {
                Ok(n) => {
                    sent += n as u64;
                    shared.host_sent.store(sent, Ordering::Release);
                    progress = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => write_dead = true,
            }
        }
        if dead {
            assert!(!moved, "the destination dropped the connection");
            // Whatever the source sent before its end of file has been read above.
            shared.wait_migrated();
            conn = UnixStream::connect(&dst).unwrap();
            conn.set_nonblocking(true).unwrap();
            moved = true;
            write_dead = false;
            continue;
        }
        if shared.done.load(Ordering::Acquire) {
            return;
        }
        if !progress {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The guest side: polls LSR, reads RBR and writes THR through the source's device, then,
/// once that is stopped (EBUSY), through the destination's.
fn guest_side(shared: Arc<Shared>, src: Arc<Mutex<Client>>, dst: Arc<Mutex<Client>>) {
    let mut cur = src;
    let mut on_dst = false;
    let (mut sent, mut received) = (0u64, 0u64);
    while !shared.done.load(Ordering::Acquire) {
        let result = (|| -> Result<(), umdev_client::ClientError> {
            let mut c = cur.lock().unwrap();
            let mut lsr = [0u8];
            c.region_read(0, regs::LSR, &mut lsr)?;
            if lsr[0] & regs::LSR_DR != 0 {
                let mut b = [0u8];
                c.region_read(0, regs::RBR_THR, &mut b)?;
                if b[0] != h2g(received) {
                    shared
                        .errors
                        .lock()
                        .unwrap()
                        .push(format!("guest: byte {received} is {}", b[0]));
                }
                received += 1;
                shared.guest_received.store(received, Ordering::Release);
            }
            if lsr[0] & regs::LSR_THRE != 0 && !shared.stop_writing.load(Ordering::Acquire) {
                c.region_write(0, regs::RBR_THR, &[g2h(sent)])?;
                sent += 1;
                shared.guest_sent.store(sent, Ordering::Release);
            }
            Ok(())
        })();
        match result {
            Ok(()) => {}
            Err(e) if e.errno() == Some(EBUSY) && !on_dst => {
                shared.wait_migrated();
                cur = dst.clone();
                on_dst = true;
            }
            Err(e) => panic!("guest access failed: {e}"),
        }
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        if Instant::now() > deadline {
            panic!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn mtty_migrates_while_bytes_stream_both_ways_and_none_is_lost_or_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let (src, src_sock) = mtty_server(dir.path(), "src0");
    let (dst, dst_sock) = mtty_server(dir.path(), "dst0");
    let sc = Arc::new(Mutex::new(src.client()));
    let dc = Arc::new(Mutex::new(dst.client()));
    sc.lock()
        .unwrap()
        .region_write(0, regs::IIR_FCR, &[regs::FCR_ENABLE_FIFO])
        .unwrap();
    let shared = Arc::new(Shared::default());
    let host = {
        let (s, a, b) = (shared.clone(), src_sock.clone(), dst_sock.clone());
        std::thread::spawn(move || host_side(s, a, b))
    };
    let guest = {
        let (s, a, b) = (shared.clone(), sc.clone(), dc.clone());
        std::thread::spawn(move || guest_side(s, a, b))
    };
    wait_until("traffic before the migration", || {
        shared.guest_received.load(Ordering::Acquire) > 2000
            && shared.host_received.load(Ordering::Acquire) > 2000
    });

    let opts = MigrateOptions::default();
    let mut m =
        Migration::begin(&mut sc.lock().unwrap(), &mut dc.lock().unwrap(), None, opts).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    while m
        .precopy_round(&mut sc.lock().unwrap(), &mut dc.lock().unwrap())
        .unwrap()
    {}
    let before = (
        shared.guest_received.load(Ordering::Acquire),
        shared.host_received.load(Ordering::Acquire),
    );
    let report = m
        .switchover(&mut sc.lock().unwrap(), &mut dc.lock().unwrap())
        .unwrap();
    shared.migrated.store(true, Ordering::Release);
    eprintln!("mtty: {report}");

    wait_until("traffic after the migration", || {
        shared.guest_received.load(Ordering::Acquire) > before.0 + 2000
            && shared.host_received.load(Ordering::Acquire) > before.1 + 2000
    });
    shared.stop_writing.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(20));
    let counts = || {
        [
            &shared.host_sent,
            &shared.guest_received,
            &shared.guest_sent,
            &shared.host_received,
        ]
        .map(|a| a.load(Ordering::Acquire))
    };
    eprintln!(
        "before the drain: {:?} {:?}",
        counts(),
        shared.errors.lock().unwrap()
    );
    wait_until("every byte delivered", || {
        shared.guest_received.load(Ordering::Acquire) == shared.host_sent.load(Ordering::Acquire)
            && shared.host_received.load(Ordering::Acquire)
                == shared.guest_sent.load(Ordering::Acquire)
    });
    shared.done.store(true, Ordering::Release);
    host.join().unwrap();
    guest.join().unwrap();
    assert_eq!(*shared.errors.lock().unwrap(), Vec::<String>::new());
    let mut lsr = [0u8];
    let err = sc.lock().unwrap().region_read(0, regs::LSR, &mut lsr);
    assert_eq!(
        err.unwrap_err().errno(),
        Some(EBUSY),
        "the source stays stopped"
    );
}

const IOVA: u64 = 0x1000_0000;
const SIZE: u64 = 16 << 20;

fn dup(fd: &OwnedFd) -> OwnedFd {
    rustix::io::fcntl_dupfd_cloexec(fd, 0).unwrap()
}

fn contents(fd: &OwnedFd) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    let mut off = 0;
    while off < v.len() {
        off += rustix::io::pread(fd, &mut v[off..], off as u64).unwrap();
    }
    v
}

#[test]
fn test_device_migrates_with_its_dirty_pages_and_pins() {
    let src = TestServer::migratable_test_device();
    let dst = TestServer::migratable_test_device();
    let mut sc = src.client();
    let mut dc = dst.client();
    let src_mem = map_memfd(&mut sc, IOVA, SIZE, true);
    let dst_mem = map_memfd(&mut dc, IOVA, SIZE, true);
    // Before the migration: device writes, a pin with a write through it, scratch RAM.
    for i in 0..32u64 {
        assert_eq!(
            cmd::copy_write(&mut sc, IOVA + i * 3 * PAGE, 2048, i as u8),
            0
        );
    }
    let pinned = IOVA + 100 * PAGE;
    assert_eq!(cmd::pin(&mut sc, pinned, 2, 3), 0);
    assert_eq!(cmd::pinned_write(&mut sc, pinned + 10, 100, 0x40), 0);
    sc.region_write(0, 0x10, b"scratch state").unwrap();

    let mut copier = FileCopier::new(dup(&src_mem), dup(&dst_mem), IOVA, SIZE);
    let opts = MigrateOptions {
        target_dirty_bytes: 0,
        ..MigrateOptions::default()
    };
    let mut m = Migration::begin(&mut sc, &mut dc, Some(&mut copier), opts).unwrap();
    // Pre-copy rounds while the device keeps writing, less each round.
    let mut seed = 0u8;
    for writes in [200u64, 50, 10, 2] {
        for i in 0..writes {
            seed = seed.wrapping_add(1);
            let page = (i * 37 + u64::from(seed)) % (SIZE / PAGE);
            assert_eq!(
                cmd::copy_write(&mut sc, IOVA + page * PAGE + 8, 1000, seed),
                0
            );
        }
        if !m.precopy_round(&mut sc, &mut dc).unwrap() {
            break;
        }
    }
    let report = m.switchover(&mut sc, &mut dc).unwrap();
    eprintln!("test device: {report}");
    assert!(report.rounds.len() >= 3, "{report:?}");

    let (a, b) = (contents(&src_mem), contents(&dst_mem));
    for (page, (x, y)) in a
        .chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .enumerate()
    {
        assert!(x == y, "page {page} differs");
    }
    let mut scratch = [0u8; 13];
    dc.region_read(0, 0x10, &mut scratch).unwrap();
    assert_eq!(&scratch, b"scratch state");
    // The pin came along: the destination device writes through it.
    assert_eq!(cmd::pinned_write(&mut dc, pinned, 64, 0x77), 0);
    assert_eq!(
        cmd::copy_write(&mut dc, IOVA, 64, 1),
        0,
        "the destination runs"
    );
    assert_eq!(
        sc.region_read(0, 0x10, &mut scratch).unwrap_err().errno(),
        Some(EBUSY)
    );
}

/// A valid final stream of a test device whose scratch RAM starts with `tag`.
fn saved_stream(tag: &[u8]) -> Vec<u8> {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    c.region_write(0, 0, tag).unwrap();
    c.set_mig_state(wire::DEVICE_STATE_STOP_COPY).unwrap();
    let mut out = Vec::new();
    loop {
        let d = c.mig_data_read(64 * 1024).unwrap();
        out.extend_from_slice(&d);
        if d.len() < 64 * 1024 {
            return out;
        }
    }
}

/// Feeds `stream` to the destination; returns the errno of the write or of the load.
fn feed(c: &mut Client, stream: &[u8]) -> Result<(), i32> {
    c.set_mig_state(wire::DEVICE_STATE_RESUMING).unwrap();
    for chunk in stream.chunks(50_000) {
        c.mig_data_write(chunk).map_err(|e| e.errno().unwrap())?;
    }
    c.set_mig_state(wire::DEVICE_STATE_STOP)
        .map(|_| ())
        .map_err(|e| e.errno().unwrap())
}

fn with_version(stream: &[u8], version: u32) -> Vec<u8> {
    let mut s = stream.to_vec();
    s[8..12].copy_from_slice(&version.to_le_bytes());
    let end = s.len() - 4;
    let crc = umdev_pci::state_format::crc32(&s[..end]);
    s[end..].copy_from_slice(&crc.to_le_bytes());
    s
}

#[test]
fn bad_streams_are_refused_and_the_destination_stays_as_it_was() {
    let good = saved_stream(b"from the source");
    let dst = TestServer::migratable_test_device();
    let mut c = dst.client();
    c.region_write(0, 0, b"destination's own").unwrap();
    let mut corrupted = good.clone();
    corrupted[good.len() / 2] ^= 1;
    let mut other_device = {
        let m = Mtty::new(MttyConfig::new(1, vec![])).unwrap();
        let f = PciFunction::new(m.spec(), Box::new(m));
        let s = TestServer::start(f, ServerConfig::default());
        let mut mc = s.client();
        mc.set_mig_state(wire::DEVICE_STATE_STOP_COPY).unwrap();
        mc.mig_data_read(1 << 20).unwrap()
    };
    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"XXXX");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("corrupted", corrupted),
        ("truncated", good[..good.len() - 100].to_vec()),
        ("cut inside the header", good[..10].to_vec()),
        ("a newer version", with_version(&good, 3)),
        ("an older version than supported", with_version(&good, 0)),
        ("another device", std::mem::take(&mut other_device)),
        ("not a state", bad_magic),
    ];
    for (what, stream) in cases {
        assert_eq!(feed(&mut c, &stream), Err(EINVAL), "{what}");
        // Still RESUMING, with nothing kept: leaving it loads nothing.
        assert_eq!(
            c.mig_state().unwrap(),
            wire::DEVICE_STATE_RESUMING,
            "{what}"
        );
        c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
        let mut b = [0u8; 17];
        c.region_read(0, 0, &mut b).unwrap();
        assert_eq!(&b, b"destination's own", "{what}: the device is unchanged");
    }
    // Version 1 (before pins were saved) still loads.
    assert_eq!(feed(&mut c, &with_version(&good, 1)), Ok(()));
    c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
    let mut b = [0u8; 15];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"from the source");
    c.region_write(0, 0, b"again").unwrap();
    assert_eq!(feed(&mut c, &good), Ok(()));
    c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"from the source");
}
