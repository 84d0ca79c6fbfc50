//! Driving the test device's DMA engine from a client, as a guest driver would: each call
//! writes the registers and the command, polls the status until the command is done, and
//! returns it (0 or an errno).

use std::os::fd::{AsFd, OwnedFd};

use umdev_client::Client;
use umdev_proto::wire;
use zerocopy::{FromBytes, IntoBytes};

use crate::device::reg;

/// Page size of pins and of the dirty log.
pub const PAGE: u64 = 4096;

fn write32(c: &mut Client, off: u64, v: u32) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn status(c: &mut Client) -> u32 {
    crate::poll_dma_status(|| {
        let mut b = [0u8; 4];
        c.region_read(0, reg::DMA_STATUS, &mut b).unwrap();
        u32::from_le_bytes(b)
    })
}

fn command(c: &mut Client, iova: u64, cmd: u32) -> u32 {
    c.region_write(0, reg::DMA_ADDR, &iova.to_le_bytes())
        .unwrap();
    write32(c, reg::DMA_CMD, cmd);
    status(c)
}

/// Command 1: the device writes `len` bytes `seed, seed+1, ...` at `iova` (a copy).
pub fn copy_write(c: &mut Client, iova: u64, len: u32, seed: u8) -> u32 {
    write32(c, reg::DMA_LEN, len);
    c.region_write(0, reg::DMA_SEED, &[seed]).unwrap();
    command(c, iova, 1)
}

/// Command 3: the device pins `pages` pages at `iova` with access `prot` (1 r, 2 w, 3 rw).
pub fn pin(c: &mut Client, iova: u64, pages: u32, prot: u32) -> u32 {
    write32(c, reg::PIN_PAGES, pages);
    write32(c, reg::PIN_PROT, prot);
    command(c, iova, 3)
}

/// Command 4: the device writes `len` bytes `seed+i` at `iova` through a pin it holds.
pub fn pinned_write(c: &mut Client, iova: u64, len: u32, seed: u8) -> u32 {
    write32(c, reg::DMA_LEN, len);
    c.region_write(0, reg::DMA_SEED, &[seed]).unwrap();
    command(c, iova, 4)
}

/// Command 5: the device unpins `pages` pages at `iova`.
pub fn unpin(c: &mut Client, iova: u64, pages: u32) -> u32 {
    write32(c, reg::PIN_PAGES, pages);
    command(c, iova, 5)
}

/// What the device's `dma_unmap` hook does: 0 unpin, 1 forget, 2 unpin 200 ms later.
pub fn unmap_mode(c: &mut Client, mode: u32) {
    write32(c, reg::UNMAP_MODE, mode);
}

/// A memfd of `size` bytes, mapped read-write (or read-only) at `iova`; returns the memfd.
pub fn map_memfd(c: &mut Client, iova: u64, size: u64, writable: bool) -> OwnedFd {
    let mem = crate::guest_memfd(size);
    let mut flags = wire::DMA_MAP_FLAG_READ;
    if writable {
        flags |= wire::DMA_MAP_FLAG_WRITE;
    }
    c.dma_map(iova, size, flags, Some((mem.as_fd(), 0)))
        .unwrap();
    mem
}

/// The pattern `seed, seed+1, ...` of `len` bytes.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

// ---- dirty page logging (DEVICE_FEATURE 6, 7, 8) ----

/// DEVICE_FEATURE with `flags` and `data` (and `argsz_extra` more bytes announced for the
/// answer): the answer's body, or the errno.
pub fn logging_feature(
    c: &mut Client,
    flags: u32,
    argsz_extra: u32,
    data: &[u8],
) -> Result<Vec<u8>, i32> {
    let f = wire::DeviceFeature {
        argsz: 8 + u32::try_from(data.len()).unwrap() + argsz_extra,
        flags,
    };
    let r = c
        .request_raw(
            umdev_proto::Command::DeviceFeature as u16,
            0,
            &[f.as_bytes(), data],
            &[],
        )
        .unwrap();
    match r.header.error() {
        Some(e) => Err(e),
        None => Ok(r.body),
    }
}

/// DMA_LOGGING_START of `ranges` (none: all memory) at 2 MiB pages; the page size the
/// device took.
pub fn logging_start(c: &mut Client, ranges: &[(u64, u64)]) -> u64 {
    let ctl = wire::DmaLoggingControl {
        page_size: 1 << 21,
        num_ranges: u32::try_from(ranges.len()).unwrap(),
        reserved: 0,
    };
    let mut data = ctl.as_bytes().to_vec();
    for &(iova, length) in ranges {
        data.extend_from_slice(wire::DmaLoggingRange { iova, length }.as_bytes());
    }
    let body = logging_feature(c, wire::DEVICE_FEATURE_SET | 6, 0, &data).unwrap();
    let (got, _) = wire::DmaLoggingControl::read_from_prefix(&body[8..]).unwrap();
    assert_eq!(&body[8 + 16..], &data[16..], "ranges echoed");
    got.page_size
}

/// DMA_LOGGING_STOP.
pub fn logging_stop(c: &mut Client) {
    logging_feature(c, wire::DEVICE_FEATURE_SET | 7, 0, &[]).unwrap();
}

/// DMA_LOGGING_REPORT; the bitmap as u64 words.
pub fn logging_report(
    c: &mut Client,
    iova: u64,
    length: u64,
    page_size: u64,
) -> Result<Vec<u64>, i32> {
    let rep = wire::DmaLoggingReport {
        iova,
        length,
        page_size,
    };
    let size = umdev_dma::dirty_bitmap_size(length, page_size).unwrap();
    let extra = u32::try_from(size).unwrap();
    let body = logging_feature(c, wire::DEVICE_FEATURE_GET | 8, extra, rep.as_bytes())?;
    let (head, _) = wire::DeviceFeature::read_from_prefix(&body).unwrap();
    assert_eq!(head.argsz as usize, 8 + 24 + size);
    assert_eq!(&body[8..32], rep.as_bytes());
    Ok(words(&body[32..]))
}

/// A bitmap's bytes as u64 words.
pub fn words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect()
}
