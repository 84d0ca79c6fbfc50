#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
//! mbochs through the product: `umdevd` with an `mbochs` parent, displays created through
//! sysfs, a client that maps VRAM from the region fd and programs the Bochs registers over
//! its socket, screenshots through `umdevctl screenshot` decoded and compared pixel by
//! pixel.
//!
//! - the pool: every type's `available_instances` under mixed creates and removes, ENOSPC;
//!   options checked by name;
//! - modes: what a client asks is fixed up to fit VRAM (the registers read back what is
//!   shown), never past it;
//! - screenshots at 32 and 16 bits with a y offset, exact; a display that is off is a
//!   clear message and no file;
//! - a client that has gone, still mapping VRAM, reaches nothing of the next client's;
//! - migration between two daemons while the client keeps drawing during pre-copy: VRAM
//!   compared page by page, the mode the same.

mod mdev;

use std::fs::File;
use std::path::Path;

use mdev::{errno, new_uuid, Daemon};
use umdev_client::migration::{MigrateOptions, Migration};
use umdev_client::Client;
use umdev_mbochs::regs::index;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

const MIB: u64 = 1 << 20;
const CONFIG: &str = "[[parent]]\nname = \"vga0\"\ndriver = \"mbochs\"\n";
const BAR2: u32 = 2;

fn create(d: &Daemon, t: &str) -> String {
    let uuid = new_uuid();
    d.create("vga0", t, &uuid).unwrap();
    uuid
}

/// A client of a display: its connection and its mapping of VRAM.
struct Screen {
    c: Client,
    vram: MmapRegion,
}

impl Screen {
    fn connect(socket: &Path) -> Screen {
        let mut c = Client::connect(socket).unwrap();
        let info = c.region_info(0).unwrap();
        let fd = info.fd.expect("BAR0 comes with its memory");
        let vram = MmapRegion::from_file(
            FileOffset::new(File::from(fd), info.info.offset),
            info.info.size as usize,
        )
        .unwrap();
        Screen { c, vram }
    }

    fn dispi(&mut self, i: usize, v: u16) {
        self.c
            .region_write(BAR2, 0x500 + 2 * i as u64, &v.to_le_bytes())
            .unwrap();
    }

    fn dispi_read(&mut self, i: usize) -> u16 {
        let mut b = [0u8; 2];
        self.c
            .region_read(BAR2, 0x500 + 2 * i as u64, &mut b)
            .unwrap();
        u16::from_le_bytes(b)
    }

    /// Sets a mode the way Linux's bochs driver does.
    fn set_mode(&mut self, bpp: u16, x: u16, y: u16, virt_width: u16, virt_height: u16, yoff: u16) {
        self.dispi(index::ENABLE, 0);
        self.dispi(index::BPP, bpp);
        self.dispi(index::XRES, x);
        self.dispi(index::YRES, y);
        self.dispi(index::BANK, 0);
        self.dispi(index::VIRT_WIDTH, virt_width);
        self.dispi(index::VIRT_HEIGHT, virt_height);
        self.dispi(index::X_OFFSET, 0);
        self.dispi(index::Y_OFFSET, yoff);
        self.dispi(index::ENABLE, 0x41);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.vram
            .get_slice(offset as usize, data.len())
            .unwrap()
            .copy_from(data);
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.vram
            .get_slice(offset as usize, len)
            .unwrap()
            .copy_to(&mut b);
        b
    }
}

/// The test picture's RGB at (x, y) of the framebuffer, for generation `g`.
fn rgb(x: u32, y: u32, g: u32) -> [u8; 3] {
    [
        (x * 3 + g) as u8,
        (y * 5 + g * 7) as u8,
        (x ^ y).wrapping_add(g * 13) as u8,
    ]
}

/// Draws the picture into `lines` lines of a `width`-pixel framebuffer at `bpp` (32:
/// XRGB8888, 16: RGB565).
fn draw(s: &Screen, bpp: u16, width: u32, lines: u32, g: u32) {
    let bytes = u32::from(bpp / 8);
    let mut row = vec![0u8; (width * bytes) as usize];
    for y in 0..lines {
        for x in 0..width {
            let [r, gr, b] = rgb(x, y, g);
            let at = (x * bytes) as usize;
            if bpp == 32 {
                row[at..at + 4].copy_from_slice(&[b, gr, r, 0]);
            } else {
                let v = (u16::from(r >> 3) << 11) | (u16::from(gr >> 2) << 5) | u16::from(b >> 3);
                row[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        s.write(u64::from(y * width * bytes), &row);
    }
}

/// What the screenshot of the picture shows at (x, y): RGB565 widened back to 8 bits.
fn shown(bpp: u16, x: u32, y: u32, g: u32) -> [u8; 3] {
    let [r, gr, b] = rgb(x, y, g);
    if bpp == 32 {
        return [r, gr, b];
    }
    let (r5, g6, b5) = (r >> 3, gr >> 2, b >> 3);
    [
        (r5 << 3) | (r5 >> 2),
        (g6 << 2) | (g6 >> 4),
        (b5 << 3) | (b5 >> 2),
    ]
}

/// `umdevctl screenshot` into `out`; the decoded RGB image.
fn screenshot(d: &Daemon, uuid: &str, out: &Path) -> Result<(u32, u32, Vec<u8>), String> {
    let o = d.umdevctl(&["screenshot", uuid, out.to_str().unwrap()]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    let dec = png::Decoder::new(File::open(out).unwrap());
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0u8; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, buf))
}

#[test]
fn the_pool_is_shared_by_every_size_and_refuses_when_full() {
    let d = Daemon::start(CONFIG);
    let avail = |t: &str| d.available("vga0", t);
    assert_eq!(
        (avail("mbochs-4m"), avail("mbochs-16m"), avail("mbochs-64m")),
        (64, 16, 4)
    );
    let big: Vec<String> = (0..3).map(|_| create(&d, "mbochs-64m")).collect();
    assert_eq!(
        (avail("mbochs-4m"), avail("mbochs-16m"), avail("mbochs-64m")),
        (16, 4, 1)
    );
    let mid: Vec<String> = (0..3).map(|_| create(&d, "mbochs-16m")).collect();
    let small: Vec<String> = (0..4).map(|_| create(&d, "mbochs-4m")).collect();
    assert_eq!(
        (avail("mbochs-4m"), avail("mbochs-16m"), avail("mbochs-64m")),
        (0, 0, 0)
    );
    for t in ["mbochs-4m", "mbochs-64m"] {
        let e = d.create("vga0", t, &new_uuid()).unwrap_err();
        assert_eq!(errno(&e), 28, "ENOSPC for {t}");
    }
    d.remove(&big[0]).unwrap();
    assert_eq!(
        (avail("mbochs-4m"), avail("mbochs-16m"), avail("mbochs-64m")),
        (16, 4, 1)
    );
    for u in big[1..].iter().chain(&mid).chain(&small) {
        d.remove(u).unwrap();
    }
    assert_eq!(avail("mbochs-64m"), 4);
    let attr = |u: &str, n: &str| std::fs::read_to_string(d.mdev_dir(u).join(n)).unwrap();
    let u = create(&d, "mbochs-16m");
    assert_eq!(attr(&u, "vendor/vram"), format!("{}\n", 16 * MIB));
    assert_eq!(attr(&u, "vendor/mode"), "off\n");
    // A parent with its own sizes, and sizes it refuses by name.
    let o = d.umdevctl(&[
        "add-parent",
        "vga1",
        "mbochs",
        "--opt",
        "pool_mib=24",
        "--opt",
        "sizes_mib=8,16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        (
            d.available("vga1", "mbochs-8m"),
            d.available("vga1", "mbochs-16m")
        ),
        (3, 1)
    );
    let o = d.umdevctl(&["add-parent", "vga2", "mbochs", "--opt", "sizes_mib=16,4"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("sizes_mib"));
}

#[test]
fn modes_are_fixed_up_to_fit_vram_and_screenshots_are_exact() {
    let d = Daemon::start(CONFIG);
    let uuid = create(&d, "mbochs-4m");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("shot.png");
    let mut s = Screen::connect(&d.socket(&uuid));
    assert_eq!(s.dispi_read(index::ID), 0xb0c5);
    assert_eq!(s.dispi_read(index::VIDEO_MEMORY_64K), 64);
    // Off: a clear message and no file.
    let e = screenshot(&d, &uuid, &out).unwrap_err();
    assert!(e.contains("disabled"), "{e}");
    assert!(!out.exists());

    // 32 bits, 640x480 shown 100 lines into a 640x960 framebuffer.
    s.set_mode(32, 640, 480, 640, 960, 100);
    draw(&s, 32, 640, 960, 1);
    let attr = std::fs::read_to_string(d.mdev_dir(&uuid).join("vendor/mode")).unwrap();
    assert_eq!(attr, "640x480x32+0+100\n");
    let (w, h, img) = screenshot(&d, &uuid, &out).unwrap();
    assert_eq!((w, h), (640, 480));
    for y in 0..h {
        for x in 0..w {
            let at = ((y * w + x) * 3) as usize;
            assert_eq!(
                img[at..at + 3],
                shown(32, x, y + 100, 1),
                "32 bits at ({x}, {y})"
            );
        }
    }
    // 16 bits, 800x600 shown 37 lines down.
    s.set_mode(16, 800, 600, 800, 1200, 37);
    draw(&s, 16, 800, 1200, 2);
    let (w, h, img) = screenshot(&d, &uuid, &out).unwrap();
    assert_eq!((w, h), (800, 600));
    for y in 0..h {
        for x in 0..w {
            let at = ((y * w + x) * 3) as usize;
            assert_eq!(
                img[at..at + 3],
                shown(16, x, y + 37, 2),
                "16 bits at ({x}, {y})"
            );
        }
    }

    // --watch rewrites the picture at its rate, and follows the guest's changes.
    let watched = dir.path().join("watched.png");
    let mut watch = std::process::Command::new(umdev_tests::prereq::binary("umdevctl"))
        .args([
            "screenshot",
            &uuid,
            watched.to_str().unwrap(),
            "--watch",
            "0.2",
        ])
        .env("UMDEV_CONTROL", d.control())
        .spawn()
        .unwrap();
    let decode = |p: &Path| {
        let mut r = png::Decoder::new(File::open(p).ok()?).read_info().ok()?;
        let mut buf = vec![0u8; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).ok()?;
        buf.truncate(info.buffer_size());
        Some(buf)
    };
    let until = |want: [u8; 3]| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if decode(&watched).is_some_and(|b| b[..3] == want) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    };
    assert!(until(shown(16, 0, 37, 2)), "the first picture");
    draw(&s, 16, 800, 1200, 3);
    assert!(
        until(shown(16, 0, 37, 3)),
        "the watch follows the new picture"
    );
    watch.kill().unwrap();
    watch.wait().unwrap();

    // A mode past 4 MiB: the registers read back what is shown, all inside VRAM.
    s.set_mode(32, 20000, 20000, 65535, 65535, 65535);
    let mode: Vec<u16> = [
        index::BPP,
        index::XRES,
        index::YRES,
        index::VIRT_WIDTH,
        index::VIRT_HEIGHT,
        index::Y_OFFSET,
    ]
    .iter()
    .map(|&i| s.dispi_read(i))
    .collect();
    let (xres, yres, vw, vh, yo) = (mode[1], mode[2], mode[3], mode[4], mode[5]);
    assert_eq!(mode[0], 32);
    assert!(xres % 8 == 0 && xres <= vw);
    let end = (u64::from(yo) + u64::from(yres)) * u64::from(vw) * 4;
    assert!(end <= 4 * MIB, "{mode:?} shows past VRAM");
    assert!(u64::from(vh) * u64::from(vw) * 4 <= 4 * MIB);
    let (w, h, _) = screenshot(&d, &uuid, &out).unwrap();
    assert_eq!((w, h), (u32::from(xres), u32::from(yres)));
    // An unknown depth becomes 8 bits, which has no plane to show: a message, no file.
    s.set_mode(7, 640, 480, 640, 480, 0);
    assert_eq!(s.dispi_read(index::BPP), 8);
    std::fs::remove_file(&out).unwrap();
    assert!(screenshot(&d, &uuid, &out).is_err());
    assert!(!out.exists());
}

#[test]
fn a_client_that_has_gone_cannot_reach_the_next_ones_screen() {
    let d = Daemon::start(CONFIG);
    let uuid = create(&d, "mbochs-4m");
    let mut a = Screen::connect(&d.socket(&uuid));
    a.set_mode(32, 640, 480, 640, 480, 0);
    draw(&a, 32, 640, 480, 3);
    let a_vram = std::mem::replace(&mut a.vram, MmapRegion::new(4096).unwrap());
    drop(a);
    // The next client finds the picture, in memory of its own.
    let b = Screen::connect(&d.socket(&uuid));
    let first_row = b.read(0, 640 * 4);
    let mut a_row = vec![0u8; 640 * 4];
    a_vram
        .get_slice(0, a_row.len())
        .unwrap()
        .copy_to(&mut a_row);
    assert_eq!(first_row, a_row, "contents carried over");
    // The one that left writes through its old mapping: nothing reaches the new screen.
    a_vram.get_slice(0, 4096).unwrap().copy_from(&[0xaa; 4096]);
    assert_eq!(b.read(0, 640 * 4), first_row);
    // And reads nothing the new client draws.
    b.write(8192, &[0x55; 4096]);
    let mut seen = vec![0u8; 4096];
    a_vram.get_slice(8192, 4096).unwrap().copy_to(&mut seen);
    assert_ne!(seen, vec![0x55; 4096]);
    let dir = tempfile::tempdir().unwrap();
    let (_, _, img) = screenshot(&d, &uuid, &dir.path().join("s.png")).unwrap();
    assert_eq!(
        img[..3],
        shown(32, 0, 0, 3),
        "the screenshot shows the live memory"
    );
}

#[test]
fn a_display_migrates_between_two_daemons_while_the_client_draws() {
    let a = Daemon::start(CONFIG);
    let b = Daemon::start(CONFIG);
    let src = create(&a, "mbochs-16m");
    let dst = create(&b, "mbochs-16m");
    let mut s = Screen::connect(&a.socket(&src));
    s.set_mode(32, 1024, 768, 1024, 1536, 200);
    draw(&s, 32, 1024, 1536, 4);
    let d = Screen::connect(&b.socket(&dst));
    let (mut sc, mut dc) = (s.c, d.c);
    let mut m = Migration::begin(&mut sc, &mut dc, None, MigrateOptions::default()).unwrap();
    // The client keeps drawing through its mapping during pre-copy: whole blocks and single
    // pixels, some in blocks already sent.
    let sv = &s.vram;
    let poke = |off: u64, data: &[u8]| {
        sv.get_slice(off as usize, data.len())
            .unwrap()
            .copy_from(data)
    };
    poke(0, &[1, 2, 3, 4]);
    poke(5 * MIB + 12, &[9; 100]);
    m.precopy_round(&mut sc, &mut dc).unwrap();
    poke(64 * 1024 - 2, &[7, 7, 7, 7]);
    poke(15 * MIB, &[0; 65536]);
    poke(16 * MIB - 4, &[5; 4]);
    let report = m.switchover(&mut sc, &mut dc).unwrap();
    eprintln!("mbochs migration: {report}");
    // Page by page, the destination's VRAM is the source's.
    let mut differ = Vec::new();
    for page in 0..(16 * MIB / 4096) {
        let off = page * 4096;
        let mut want = vec![0u8; 4096];
        sv.get_slice(off as usize, 4096).unwrap().copy_to(&mut want);
        if read(&d.vram, off, 4096) != want {
            differ.push(page);
        }
    }
    assert!(differ.is_empty(), "pages that differ: {differ:?}");
    let mode =
        |dm: &Daemon, u: &str| std::fs::read_to_string(dm.mdev_dir(u).join("vendor/mode")).unwrap();
    assert_eq!(mode(&b, &dst), "1024x768x32+0+200\n");
    assert_eq!(mode(&a, &src), mode(&b, &dst));
    let dir = tempfile::tempdir().unwrap();
    let (w, h, img) = screenshot(&b, &dst, &dir.path().join("m.png")).unwrap();
    assert_eq!((w, h), (1024, 768));
    assert_eq!(img[3 * 500..3 * 501], shown(32, 500, 200, 4));
}

fn read(m: &MmapRegion, off: u64, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    m.get_slice(off as usize, len).unwrap().copy_to(&mut got);
    got
}
