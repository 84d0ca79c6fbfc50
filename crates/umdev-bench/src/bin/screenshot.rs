//! Screenshot latency of an mbochs display at 1920x1080x32, through the product: a real
//! umdevd with an `mbochs` parent, the display created with `umdevctl start`, a client that
//! maps its VRAM and sets the mode over vfio-user, then `umdevctl screenshot` timed end to
//! end (process start, control request with the VRAM fd, conversion, PNG encoding, file).
//!
//! The floor, in the same run: the same bytes copied out of the same VRAM mapping,
//! converted to RGB and PNG-encoded with the same encoder settings, in this process (no
//! daemon, no socket, no process start). Also printed: the start-up cost of `umdevctl`
//! itself (`umdevctl --version`), which every CLI call pays.
//!
//! Then the cost of migrating the display's VRAM the way mbochs does (every block during
//! pre-copy, then each pass the blocks that differ from a copy of what was sent): a 64 MiB
//! display migrated to a second daemon, timing the first pass, a pass after the client
//! changed 1% of VRAM through its mapping, and the switch-over (downtime), against a plain
//! read of the same 64 MiB (what one comparison pass must at least do).
//!
//! `cargo build --release -p umdevd -p umdevctl && cargo run --release -p umdev-bench --bin umdev-bench-screenshot`
//! (root, /dev/fuse). Goal: within 1.5x of the floor.

// Picture arithmetic takes the low bits on purpose; the sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use umdev_bench::Daemon;
use umdev_client::migration::{MigrateOptions, Migration};
use umdev_client::Client;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// Screenshot latency at 1920x1080x32 against copy + PNG encoding of the same bytes.
#[derive(Debug, Parser)]
struct Args {
    /// Screenshots taken (each way).
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// 8 runs (for CI).
    #[arg(long)]
    quick: bool,
}

const W: usize = 1920;
const H: usize = 1080;

fn start(umdevd: &Path, name: &str) -> Result<Daemon> {
    Daemon::start(
        umdevd,
        &format!("umdev-bench-shot-{name}"),
        "[[parent]]\nname = \"vga0\"\ndriver = \"mbochs\"\n",
    )
}

fn median_and_p90(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[(v.len() * 9) / 10]), ms(v[0]))
}

/// What a screenshot has to do at least: copy the visible bytes, make RGB of them, encode.
fn floor(vram: &MmapRegion) -> Result<Vec<u8>> {
    let mut raw = vec![0u8; W * H * 4];
    vram.get_slice(0, raw.len())?.copy_to(&mut raw);
    let mut rgb = Vec::with_capacity(W * H * 3);
    for px in raw.chunks_exact(4) {
        rgb.extend_from_slice(&[px[2], px[1], px[0]]);
    }
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header()?;
    w.write_image_data(&rgb)?;
    w.finish()?;
    Ok(png)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runs = if args.quick { 8 } else { args.runs.max(2) };
    let exe = std::env::current_exe()?;
    let umdevd = exe.with_file_name("umdevd");
    let umdevctl = exe.with_file_name("umdevctl");
    for b in [&umdevd, &umdevctl] {
        if !b.exists() {
            bail!(
                "{} is not built (cargo build --release -p umdevd -p umdevctl)",
                b.display()
            );
        }
    }
    let d = start(&umdevd, "a")?;
    let root = d.dir.join("root");
    let control = root.join("state/control.sock");
    let ctl_at = |control: &Path, args: &[&str]| -> Result<String> {
        let o = Command::new(&umdevctl)
            .args(args)
            .env("UMDEV_CONTROL", control)
            .output()?;
        if !o.status.success() {
            bail!("umdevctl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let ctl = |args: &[&str]| ctl_at(&control, args);
    let uuid = ctl(&["start", "-p", "vga0", "-t", "mbochs-64m"])?;
    let socket = root.join("sockets").join(&uuid).join("vfio-user.sock");

    // The client: VRAM mapped, 1920x1080x32, a picture that is neither flat nor noise.
    let mut c = Client::connect(&socket)?;
    let info = c.region_info(0)?;
    let fd = info.fd.context("no VRAM fd")?;
    let vram = MmapRegion::from_file(
        FileOffset::new(File::from(fd), info.info.offset),
        usize::try_from(info.info.size)?,
    )?;
    let dispi = |c: &mut Client, i: u64, v: u16| c.region_write(2, 0x500 + 2 * i, &v.to_le_bytes());
    for (i, v) in [
        (4, 0),
        (3, 32),
        (1, W as u16),
        (2, H as u16),
        (6, W as u16),
        (7, H as u16),
        (8, 0),
        (9, 0),
        (4, 0x41),
    ] {
        dispi(&mut c, i, v)?;
    }
    let mut row = vec![0u8; W * 4];
    for y in 0..H {
        for x in 0..W {
            let v = ((x / 64 + y / 64) % 2) as u8 * 96;
            row[x * 4..x * 4 + 4].copy_from_slice(&[
                (x % 256) as u8 ^ v,
                (y % 256) as u8,
                ((x + y) / 16) as u8,
                0,
            ]);
        }
        vram.get_slice(y * W * 4, W * 4)?.copy_from(&row);
    }

    let out = d.dir.join("shot.png");
    let out_s = out.to_str().context("path")?;
    ctl(&["screenshot", &uuid, out_s])?; // warm
    let mut shot = Vec::new();
    let mut spawn = Vec::new();
    let mut fl = Vec::new();
    let mut png_len = 0;
    for _ in 0..runs {
        let t = Instant::now();
        ctl(&["screenshot", &uuid, out_s])?;
        shot.push(t.elapsed());
        let t = Instant::now();
        ctl(&["--version"])?;
        spawn.push(t.elapsed());
        let t = Instant::now();
        png_len = floor(&vram)?.len();
        fl.push(t.elapsed());
    }
    let written = std::fs::metadata(&out)?.len();
    let (s50, s90, smin) = median_and_p90(shot);
    let (p50, _, _) = median_and_p90(spawn);
    let (f50, f90, fmin) = median_and_p90(fl);
    println!("screenshot of {W}x{H} XRGB8888 ({runs} runs each, interleaved)");
    println!("  umdevctl screenshot  median {s50:7.2} ms  p90 {s90:7.2} ms  min {smin:7.2} ms  (PNG {written} bytes)");
    println!("  floor: copy+RGB+PNG  median {f50:7.2} ms  p90 {f90:7.2} ms  min {fmin:7.2} ms  (PNG {png_len} bytes)");
    println!("  umdevctl --version   median {p50:7.2} ms  (process start, paid by every CLI call)");
    let ratio = s50 / f50;
    println!(
        "  ratio {ratio:.2}x the floor (goal 1.5x: {}); without the process start {:.2}x",
        if ratio <= 1.5 { "met" } else { "MISSED" },
        (s50 - p50) / f50
    );

    // Migrating the 64 MiB display to a second daemon.
    let b = start(&umdevd, "b")?;
    let b_control = b.dir.join("root/state/control.sock");
    let dst_uuid = ctl_at(&b_control, &["start", "-p", "vga0", "-t", "mbochs-64m"])?;
    let mut dc = Client::connect(
        b.dir
            .join("root/sockets")
            .join(&dst_uuid)
            .join("vfio-user.sock"),
    )?;
    let size = vram.size();
    // Fill all of VRAM (not only the visible part) so every block carries data.
    for off in (W * H * 4..size).step_by(W * 4) {
        let n = (W * 4).min(size - off);
        vram.get_slice(off, n)?.copy_from(&row[..n]);
    }
    let t = Instant::now();
    let mut m = Migration::begin(&mut c, &mut dc, None, MigrateOptions::default())?;
    let first = t.elapsed();
    // 1% of the 64 KiB blocks changed through the mapping.
    let blocks = size / 65536;
    for i in (0..blocks).step_by(100) {
        vram.get_slice(i * 65536 + 100, 4)?.copy_from(&[1, 2, 3, 4]);
    }
    let t = Instant::now();
    m.precopy_round(&mut c, &mut dc)?;
    let round = t.elapsed();
    let report = m.switchover(&mut c, &mut dc)?;
    let mut plain = vec![0u8; size];
    // Faulted in first: the floor is the read, not the buffer's page faults.
    plain.fill(1);
    let t = Instant::now();
    vram.get_slice(0, size)?.copy_to(&mut plain);
    let read = t.elapsed();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("migrating a 64 MiB display's VRAM to a second daemon");
    println!(
        "  first pass (every block): {:7.2} ms, {} bytes of device data",
        ms(first),
        report.rounds[0].device_bytes
    );
    println!(
        "  pass after 1% of blocks changed: {:7.2} ms, {} bytes",
        ms(round),
        report.rounds.get(1).map_or(0, |r| r.device_bytes)
    );
    println!(
        "  switch-over (downtime, a last comparison pass): {:7.2} ms, {} bytes",
        ms(report.downtime),
        report.stop_copy.device_bytes
    );
    println!(
        "  floor: one read of the 64 MiB into a warm buffer {:7.2} ms; a pass costs {:.1}x it",
        ms(read),
        round.as_secs_f64() / read.as_secs_f64()
    );
    Ok(())
}
