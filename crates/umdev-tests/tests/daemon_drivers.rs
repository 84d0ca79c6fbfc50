//! Parent drivers that umdevd's own crates do not know, served by a daemon built through
//! the public builder (`umdevd-test`, `src/bin/umdevd-test.rs`) and configured from a TOML
//! file with options, as a device author's daemon would be: devices created through the
//! FUSE `create` file, driven by a client; options checked by name and kind; every hook
//! of a device created through sysfs reaching it (the probe); a pinning device's
//! `dma_unmap` hook running before the unmap reply; failed creates leaving nothing; a
//! parent's own attributes; the display-plane query and `umdevctl screenshot`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod mdev;

use std::os::fd::AsFd;

use mdev::{new_uuid, Daemon};
use umdev_client::Client;
use umdev_proto::wire;
use umdev_tests::cmd;
use umdev_tests::device::{reg, DISPLAY_HEIGHT, DISPLAY_OFFSET, DISPLAY_WIDTH};
use umdev_tests::drivers::{ATTR_HOOKS, ATTR_PINS, PROBE_PIN};

const TEST_PARENT: &str = r#"
[[parent]]
name = "test0"
driver = "umdevtest"
options = { pool = 2 }
"#;

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn failed(o: &std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn attr(d: &Daemon, uuid: &str, name: &str) -> String {
    std::fs::read_to_string(d.mdev_dir(uuid).join(name)).unwrap()
}

#[test]
fn a_driver_umdevd_does_not_know_is_configured_created_through_sysfs_and_driven() {
    let d = Daemon::start_test_daemon(TEST_PARENT);
    // The option took effect: a pool of 2.
    assert_eq!(d.available("test0", "umdevtest-plain"), 2);
    // The parent's own attribute, in its sysfs directory.
    let pool = d.sys().join("devices/umdev/test0/vendor/pool");
    assert_eq!(std::fs::read_to_string(pool).unwrap(), "2\n");
    // umdevctl knows the driver and its options without naming it anywhere.
    let drivers = ok(&d.umdevctl(&["drivers"]));
    assert!(drivers.contains("umdevtest\n"), "{drivers}");
    assert!(
        drivers.contains("--opt pool=<integer 1..=64, default 4>"),
        "{drivers}"
    );

    let u = new_uuid();
    d.create("test0", "umdevtest-plain", &u).unwrap();
    assert_eq!(d.available("test0", "umdevtest-plain"), 1);
    let mut c = Client::connect(d.socket(&u)).unwrap();
    // BAR0 scratch, then a DMA copy into fd-backed memory on the device's work context.
    c.region_write(0, 0x10, b"plug-in").unwrap();
    let mut back = [0u8; 7];
    c.region_read(0, 0x10, &mut back).unwrap();
    assert_eq!(&back, b"plug-in");
    let mem = cmd::map_memfd(&mut c, 0x10_0000, 0x4000, true);
    assert_eq!(cmd::copy_write(&mut c, 0x10_0100, 64, 9), 0);
    let mut got = [0u8; 64];
    rustix::io::pread(&mem, &mut got, 0x100).unwrap();
    assert_eq!(got.to_vec(), cmd::pattern(64, 9));
    drop(c);
    std::fs::write(d.mdev_dir(&u).join("remove"), "1\n").unwrap();
    assert!(
        !d.device_dir(&u).exists(),
        "the device's directory goes with it"
    );
    assert_eq!(d.available("test0", "umdevtest-plain"), 2);
}

#[test]
fn bad_driver_options_are_refused_with_the_keys_name() {
    let e = Daemon::test_daemon_refuses(
        "[[parent]]\nname = \"t\"\ndriver = \"umdevtest\"\noptions = { poool = 2 }\n",
    );
    assert!(
        e.contains("driver umdevtest has no option poool (its options: pool, fail, hot_unplug)"),
        "{e}"
    );
    let e = Daemon::test_daemon_refuses(
        "[[parent]]\nname = \"t\"\ndriver = \"umdevtest\"\noptions = { pool = \"many\" }\n",
    );
    assert!(e.contains("option pool: expected an integer"), "{e}");
    let e = Daemon::test_daemon_refuses("[[parent]]\nname = \"t\"\ndriver = \"nvme9\"\n");
    assert!(
        e.contains(
            "no parent driver nvme9 (drivers: mtty, hello, mnvme, mbochs, umdevtest, probe)"
        ),
        "{e}"
    );
    // At run time, through umdevctl, the same checks.
    let d = Daemon::start_test_daemon(TEST_PARENT);
    let e = failed(&d.umdevctl(&["add-parent", "t1", "umdevtest", "--opt", "pool=65"]));
    assert!(e.contains("option pool: 65 is outside 1..=64"), "{e}");
    let e = failed(&d.umdevctl(&["add-parent", "t1", "umdevtest", "--opt", "size=1"]));
    assert!(e.contains("has no option size"), "{e}");
    ok(&d.umdevctl(&["add-parent", "t1", "umdevtest", "--opt", "pool=3"]));
    assert_eq!(d.available("t1", "umdevtest-plain"), 3);
}

/// Seeds digest behaviours 9 and 14 through the tree: a parent's create or build failing
/// leaves no device, no group and no tree entry, and the errno reaches the writer.
#[test]
fn failed_creates_leave_nothing_behind() {
    let d = Daemon::start_test_daemon(
        "[[parent]]\nname = \"c\"\ndriver = \"umdevtest\"\noptions = { fail = \"create\" }\n\
         [[parent]]\nname = \"b\"\ndriver = \"umdevtest\"\noptions = { fail = \"build\" }\n",
    );
    for (parent, errno) in [("c", 12), ("b", 5)] {
        let u = new_uuid();
        let e = d.create(parent, "umdevtest-plain", &u).unwrap_err();
        assert_eq!(mdev::errno(&e), errno, "{parent}");
        assert!(!d.mdev_dir(&u).exists());
        assert!(d.devices(parent, "umdevtest-plain").is_empty());
        assert!(!d.device_dir(&u).exists(), "no directory left");
        assert_eq!(
            std::fs::read_dir(d.sys().join("kernel/iommu_groups"))
                .unwrap()
                .count(),
            0,
            "no IOMMU group left"
        );
        assert_eq!(d.available(parent, "umdevtest-plain"), 4);
    }
}

/// Issue 8: every hook is due to a device created through sysfs, by construction (no
/// forwarder in the core can miss one): open, close, reset, BAR access, INTx unmask, IRQ mode,
/// migration, set_running, save, load and dma_unmap. And the pinning probe's dma_unmap hook
/// runs before the unmap reply, so its pins are released, not revoked.
#[test]
fn a_probe_created_through_sysfs_sees_every_hook() {
    let d = Daemon::start_test_daemon("[[parent]]\nname = \"probe0\"\ndriver = \"probe\"\n");
    let u = new_uuid();
    d.create("probe0", "probe-1", &u).unwrap();
    let mut c = Client::connect(d.socket(&u)).unwrap();
    // BAR accesses.
    c.region_write(0, 0, b"hooks").unwrap();
    let mut b = [0u8; 5];
    c.region_read(0, 0, &mut b).unwrap();
    // INTx unmasked by the client, then the interrupt mode: MSI on.
    c.set_irqs(
        0,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    let efd = umdev_tests::Efd::new();
    c.set_irq_eventfds(1, wire::IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])
        .unwrap();
    c.reset().unwrap();
    // A pin, then the unmap of its memory.
    let mem = umdev_tests::guest_memfd(0x4000);
    c.dma_map(0x20_0000, 0x4000, 3, Some((mem.as_fd(), 0)))
        .unwrap();
    c.region_write(0, PROBE_PIN, &0x20_1000u64.to_le_bytes())
        .unwrap();
    assert_eq!(attr(&d, &u, ATTR_PINS), "pinned 1 revoked false\n");
    c.dma_unmap(0x20_0000, 0x4000, 0).unwrap();
    assert_eq!(
        attr(&d, &u, ATTR_PINS),
        "pinned 0 revoked false\n",
        "the hook released the pin before the reply; nothing was revoked"
    );
    // Migration: save at STOP_COPY, load at RESUMING -> STOP, run again.
    assert_ne!(c.migration_flags().unwrap() & wire::MIGRATION_STOP_COPY, 0);
    c.set_mig_state(wire::DEVICE_STATE_STOP_COPY).unwrap();
    let mut state = Vec::new();
    loop {
        let chunk = c.mig_data_read(4096).unwrap();
        let done = chunk.len() < 4096;
        state.extend(chunk);
        if done {
            break;
        }
    }
    c.set_mig_state(wire::DEVICE_STATE_RESUMING).unwrap();
    c.mig_data_write(&state).unwrap();
    c.set_mig_state(wire::DEVICE_STATE_RUNNING).unwrap();
    drop(c);
    let want = [
        "bar_read",
        "bar_write",
        "close",
        "dma_unmap",
        "intx_unmasking",
        "irq_mode_changed",
        "load",
        "migration",
        "open",
        "reset",
        "save",
        "set_running(false)",
        "set_running(true)",
    ];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut hooks;
    loop {
        hooks = attr(&d, &u, ATTR_HOOKS);
        if hooks.lines().any(|l| l == "close") || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        hooks.lines().collect::<Vec<_>>(),
        want,
        "hooks the probe saw"
    );
}

/// The framework's display-plane query, through the control API (the memory's fd travels
/// with the answer) and `umdevctl screenshot`: the PNG holds exactly the pixels the client
/// wrote into the device's scan-out; a disabled display is a clear message, no file.
#[test]
fn umdevctl_screenshot_writes_the_scan_out_as_png() {
    let d = Daemon::start_test_daemon(TEST_PARENT);
    let u = new_uuid();
    d.create("test0", "umdevtest-plain", &u).unwrap();
    let mut c = Client::connect(d.socket(&u)).unwrap();
    let png = d.dir.path().join("shot.png");
    let e = failed(&d.umdevctl(&["screenshot", &u, png.to_str().unwrap()]));
    assert!(e.contains("is disabled"), "{e}");
    assert!(!png.exists());
    // A gradient, XRGB8888, written through BAR2 (the scan-out is in its first sparse area).
    let (w, h) = (DISPLAY_WIDTH as usize, DISPLAY_HEIGHT as usize);
    let mut pixels = Vec::with_capacity(w * h * 4);
    for y in 0..h {
        for x in 0..w {
            pixels.extend_from_slice(&[(x * 4) as u8, (y * 8) as u8, (x + y) as u8, 0]);
        }
    }
    for (i, chunk) in pixels.chunks(4096).enumerate() {
        c.region_write(2, DISPLAY_OFFSET + (i * 4096) as u64, chunk)
            .unwrap();
    }
    c.region_write(0, reg::DISPLAY, &1u32.to_le_bytes())
        .unwrap();
    ok(&d.umdevctl(&["screenshot", &u, png.to_str().unwrap()]));
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut rgb = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut rgb).unwrap();
    assert_eq!((info.width, info.height), (DISPLAY_WIDTH, DISPLAY_HEIGHT));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    for (i, px) in pixels.chunks(4).enumerate() {
        assert_eq!(&rgb[i * 3..i * 3 + 3], &[px[2], px[1], px[0]], "pixel {i}");
    }
    let e = failed(&d.umdevctl(&["screenshot", &new_uuid(), png.to_str().unwrap()]));
    assert!(e.contains("no mdev"), "{e}");
}
