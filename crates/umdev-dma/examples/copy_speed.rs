//! How fast `Dma::write`/`Dma::read` copy into a memfd mapping, next to a plain memcpy.
//!
//! `cargo run -p umdev-dma --release --example copy_speed`

use std::time::{Duration, Instant};

use umdev_dma::{AddressSpace, Backing, Dma, DmaLimits, IovaRange, Prot};

const SIZE: usize = 64 << 20;
const REPS: usize = 8;
const IOVA: u64 = 0x1_0000_0000;

/// Best of `REPS` runs: the least disturbed by the rest of the machine.
fn best(mut f: impl FnMut()) -> Duration {
    (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn gib_per_s(d: Duration) -> f64 {
    // SIZE is far below 2^52: exact in f64.
    SIZE as f64 / d.as_secs_f64() / f64::from(1u32 << 30)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let size = u64::try_from(SIZE)?;
    let memfd = rustix::fs::memfd_create("copy-speed", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&memfd, size)?;
    let space = AddressSpace::new(DmaLimits::default());
    space.map(
        IovaRange::new(IOVA, size)?,
        Prot::READ_WRITE,
        Backing::Fd {
            fd: memfd,
            offset: 0,
        },
    )?;

    let src: Vec<u8> = (0..SIZE).map(|i| (i % 251).to_le_bytes()[0]).collect();
    let mut dst = vec![0u8; SIZE];
    // Fault every page in on both sides before timing.
    space.write(IOVA, &src)?;
    dst.copy_from_slice(&src);

    let memcpy = best(|| {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    });
    let mut result = Ok(());
    let write = best(|| {
        if let Err(e) = space.write(IOVA, std::hint::black_box(&src)) {
            result = Err(e);
        }
    });
    let read = best(|| {
        if let Err(e) = space.read(IOVA, std::hint::black_box(&mut dst)) {
            result = Err(e);
        }
    });
    result?;
    if dst != src {
        return Err("read back differs from what was written".into());
    }

    println!("64 MiB, best of {REPS}:");
    println!(
        "  memcpy (Vec to Vec) : {:>8.2?}  {:6.2} GiB/s",
        memcpy,
        gib_per_s(memcpy)
    );
    println!(
        "  Dma::write (memfd)  : {:>8.2?}  {:6.2} GiB/s  {:.2}x memcpy",
        write,
        gib_per_s(write),
        memcpy.as_secs_f64() / write.as_secs_f64()
    );
    println!(
        "  Dma::read (memfd)   : {:>8.2?}  {:6.2} GiB/s  {:.2}x memcpy",
        read,
        gib_per_s(read),
        memcpy.as_secs_f64() / read.as_secs_f64()
    );
    Ok(())
}
