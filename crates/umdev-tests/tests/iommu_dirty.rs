//! Dirty page logging over a real socket: DMA_LOGGING_START/REPORT/STOP and DMA_UNMAP with
//! GET_DIRTY_BITMAP, each bitmap checked bit by bit against what the test device wrote,
//! computed again by a naive model, at several page sizes.
#![allow(clippy::unwrap_used)]

use umdev_client::Client;
use umdev_proto::{wire, Command};
use umdev_tests::cmd::{
    self, logging_feature as feature, logging_report as report, logging_start as start,
    logging_stop as stop, map_memfd, words, PAGE,
};
use umdev_tests::TestServer;
use zerocopy::{FromBytes, IntoBytes};

const EINVAL: i32 = 22;
const BASE: u64 = 0x4000_0000;
const SIZE: u64 = 8 << 20;

/// The naive model: bit k is set iff a dirty 4 KiB page overlaps [iova + k ps, + ps).
fn model(dirty: &[u64], iova: u64, len: u64, ps: u64) -> Vec<u64> {
    let bits = len.div_ceil(ps);
    let mut out = vec![0u64; usize::try_from(bits.div_ceil(64)).unwrap()];
    for k in 0..bits {
        let lo = iova + k * ps;
        let hi = (lo + ps).min(iova + len);
        if dirty.iter().any(|&p| p < hi && lo < p + PAGE) {
            out[usize::try_from(k / 64).unwrap()] |= 1 << (k % 64);
        }
    }
    out
}

/// Dirty pages the device makes: copies at `writes` (iova, len), writable pins at `pins`.
fn dirty_some(c: &mut Client, writes: &[(u64, u32)], pins: &[u64]) {
    for &(iova, len) in writes {
        assert_eq!(cmd::copy_write(c, iova, len, 3), 0);
    }
    for &p in pins {
        assert_eq!(cmd::pin(c, p, 1, 3), 0);
    }
}

/// Writes: page 0, a write across pages 3-4, page 100, the last page; pinned: page 700.
fn scenario(c: &mut Client) -> Vec<u64> {
    let writes = [
        (BASE, 1),
        (BASE + 4 * PAGE - 6, 12),
        (BASE + 100 * PAGE + 17, 100),
        (BASE + SIZE - 8, 8),
    ];
    dirty_some(c, &writes, &[BASE + 700 * PAGE]);
    // A read-only pin is not dirty.
    assert_eq!(cmd::pin(c, BASE + 800 * PAGE, 1, 1), 0);
    let mut pages = [0, 3, 4, 100, SIZE / PAGE - 1, 700];
    pages.sort_unstable();
    pages.iter().map(|p| BASE + p * PAGE).collect()
}

#[test]
fn report_at_4k_matches_the_device_bit_by_bit() {
    let s = TestServer::test_device();
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    cmd::copy_write(&mut c, BASE + 50 * PAGE, 8, 1); // before logging: not reported
    assert_eq!(start(&mut c, &[]), 4096, "the device logs 4 KiB pages");
    let dirty = scenario(&mut c);
    let got = report(&mut c, BASE, SIZE, PAGE).unwrap();
    assert_eq!(got, model(&dirty, BASE, SIZE, PAGE));
    assert_eq!(got.iter().map(|w| w.count_ones()).sum::<u32>(), 6);
    // Read and cleared; the page still pinned writable stays dirty.
    let pinned = [BASE + 700 * PAGE];
    assert_eq!(
        report(&mut c, BASE, SIZE, PAGE).unwrap(),
        model(&pinned, BASE, SIZE, PAGE)
    );
    assert_eq!(cmd::unpin(&mut c, BASE + 700 * PAGE, 1), 0);
    assert_eq!(
        report(&mut c, BASE, SIZE, PAGE).unwrap(),
        model(&pinned, BASE, SIZE, PAGE),
        "written while pinned, reported once more after the unpin"
    );
    assert!(report(&mut c, BASE, SIZE, PAGE)
        .unwrap()
        .iter()
        .all(|&w| w == 0));
    stop(&mut c);
    assert_eq!(report(&mut c, BASE, SIZE, PAGE), Err(EINVAL), "stopped");
}

#[test]
fn report_at_2m_and_other_page_sizes_matches_the_model() {
    for ps in [1u64 << 21, 1 << 13, 1 << 10, 1 << 30] {
        let s = TestServer::test_device();
        let mut c = s.client();
        map_memfd(&mut c, BASE, SIZE, true);
        start(&mut c, &[]);
        let dirty = scenario(&mut c);
        let got = report(&mut c, BASE, SIZE, ps).unwrap();
        assert_eq!(got, model(&dirty, BASE, SIZE, ps), "page size {ps:#x}");
        if ps == 1 << 21 {
            // Pages 0-511 are the first 2 MiB, the pinned page 700 the second, the last
            // page the fourth.
            assert_eq!(got, vec![0b1011]);
        }
    }
}

#[test]
fn report_of_a_window_has_only_its_bits_and_clears_only_them() {
    let s = TestServer::test_device();
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    start(&mut c, &[]);
    let dirty = scenario(&mut c);
    // A window that starts on page 3 and ends inside page 100, at 4 KiB and 2 MiB.
    let (iova, len) = (BASE + 3 * PAGE, 97 * PAGE + 100);
    assert_eq!(
        report(&mut c, iova, len, PAGE).unwrap(),
        model(&dirty, iova, len, PAGE)
    );
    // The rest is still there.
    let rest: Vec<u64> = dirty
        .iter()
        .copied()
        .filter(|&p| !(iova..iova + len).contains(&p))
        .chain([BASE + 700 * PAGE])
        .collect();
    assert_eq!(
        report(&mut c, BASE, SIZE, PAGE).unwrap(),
        model(&rest, BASE, SIZE, PAGE)
    );
}

#[test]
fn logging_of_ranges_refuses_reports_outside_them() {
    let s = TestServer::test_device();
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    start(&mut c, &[(BASE, SIZE / 2)]);
    assert!(report(&mut c, BASE, SIZE / 2, PAGE).is_ok());
    assert_eq!(report(&mut c, BASE, SIZE, PAGE), Err(EINVAL));
}

#[test]
fn report_with_a_short_argsz_or_bad_page_size_is_einval() {
    let s = TestServer::test_device();
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    start(&mut c, &[]);
    let rep = wire::DmaLoggingReport {
        iova: BASE,
        length: SIZE,
        page_size: PAGE,
    };
    let flags = wire::DEVICE_FEATURE_GET | 8;
    assert_eq!(feature(&mut c, flags, 8, rep.as_bytes()), Err(EINVAL));
    let bad = wire::DmaLoggingReport {
        page_size: 3 * PAGE,
        ..rep
    };
    assert_eq!(feature(&mut c, flags, 1 << 16, bad.as_bytes()), Err(EINVAL));
}

fn unmap_with_bitmap(
    c: &mut Client,
    iova: u64,
    size: u64,
    pgsize: u64,
    bm_size: u64,
) -> Result<Vec<u64>, i32> {
    let u = wire::DmaUnmap {
        argsz: 24 + 16 + u32::try_from(bm_size).unwrap(),
        flags: wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
        address: iova,
        size,
    };
    let bm = wire::DmaUnmapBitmap {
        pgsize,
        size: bm_size,
    };
    let r = c
        .request_raw(
            Command::DmaUnmap as u16,
            0,
            &[u.as_bytes(), bm.as_bytes()],
            &[],
        )
        .unwrap();
    if let Some(e) = r.header.error() {
        return Err(e);
    }
    let (got, rest) = wire::DmaUnmap::read_from_prefix(&r.body).unwrap();
    assert_eq!(got, u, "the request echoed, argsz covering the bitmap");
    let (gbm, data) = wire::DmaUnmapBitmap::read_from_prefix(rest).unwrap();
    assert_eq!(gbm, bm);
    assert_eq!(data.len() as u64, bm_size);
    Ok(words(data))
}

#[test]
fn unmap_with_dirty_bitmap_reports_the_range_then_unmaps_it() {
    let s = TestServer::test_device();
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    start(&mut c, &[]);
    let dirty = scenario(&mut c);
    let size = umdev_dma::dirty_bitmap_size(SIZE, PAGE).unwrap() as u64;
    assert_eq!(
        unmap_with_bitmap(&mut c, BASE, SIZE, PAGE, size - 8),
        Err(EINVAL),
        "wrong size"
    );
    assert_eq!(
        unmap_with_bitmap(&mut c, BASE, SIZE, 3000, size),
        Err(EINVAL),
        "bad pgsize"
    );
    let got = unmap_with_bitmap(&mut c, BASE, SIZE, PAGE, size).unwrap();
    assert_eq!(got, model(&dirty, BASE, SIZE, PAGE));
    assert_eq!(cmd::copy_write(&mut c, BASE, 8, 1), 14, "unmapped");
}

#[test]
fn unmap_with_dirty_bitmap_at_2m() {
    let s = TestServer::test_device();
    let mut c = s.client();
    map_memfd(&mut c, BASE, SIZE, true);
    start(&mut c, &[]);
    let dirty = scenario(&mut c);
    let size = umdev_dma::dirty_bitmap_size(SIZE, 1 << 21).unwrap() as u64;
    let got = unmap_with_bitmap(&mut c, BASE, SIZE, 1 << 21, size).unwrap();
    assert_eq!(got, model(&dirty, BASE, SIZE, 1 << 21));
    assert_eq!(got, vec![0b1011]);
}
