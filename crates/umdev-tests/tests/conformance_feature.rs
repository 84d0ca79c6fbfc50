//! Conformance: VFIO_USER_DEVICE_FEATURE and VFIO_USER_MIG_DATA_READ/WRITE, over raw wire.
//!
//! The test device supports no migration: every well-formed migration request is answered
//! ENOTSUP, every malformed one EINVAL. DMA logging (features 6-8) is the IOMMU layer's and
//! is supported; its full behaviour is in `iommu_dirty.rs`, its probes and refusals here.
#![allow(clippy::unwrap_used)]

use umdev_proto::{wire, Command};
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::IntoBytes;

const FEATURE: u16 = Command::DeviceFeature as u16;
const MIG_READ: u16 = Command::MigDataRead as u16;
const MIG_WRITE: u16 = Command::MigDataWrite as u16;
const MIGRATION: u32 = 1;
const MIG_DEVICE_STATE: u32 = 2;
const DMA_LOGGING_START: u32 = 6;

use umdev_tests::negotiated_test_device as setup;

fn feature(r: &mut Raw, flags: u32, data: &[u8]) -> RawReply {
    let f = wire::DeviceFeature {
        argsz: 8 + u32::try_from(data.len()).unwrap(),
        flags,
    };
    r.call(FEATURE, &[f.as_bytes(), data], &[])
}

fn assert_refused(r: &mut Raw, reply: &RawReply, want: i32) {
    assert_eq!(reply.errno(), Some(want), "{:?}", reply.header);
    r.assert_usable();
}

#[test]
fn probing_migration_is_enotsup() {
    let (_s, mut r) = setup();
    let reply = feature(&mut r, wire::DEVICE_FEATURE_PROBE | MIGRATION, &[]);
    assert_refused(&mut r, &reply, errno::ENOTSUP);
}

#[test]
fn getting_migration_is_enotsup() {
    let (_s, mut r) = setup();
    let reply = feature(&mut r, wire::DEVICE_FEATURE_GET | MIGRATION, &[0; 8]);
    assert_refused(&mut r, &reply, errno::ENOTSUP);
}

#[test]
fn setting_the_device_state_is_enotsup() {
    let (_s, mut r) = setup();
    let state = [1u8, 0, 0, 0, 0, 0, 0, 0];
    let reply = feature(&mut r, wire::DEVICE_FEATURE_SET | MIG_DEVICE_STATE, &state);
    assert_refused(&mut r, &reply, errno::ENOTSUP);
}

const DMA_LOGGING_STOP: u32 = 7;
const DMA_LOGGING_REPORT: u32 = 8;

/// Changed by the IOMMU layer (issue 4): was ENOTSUP.
#[test]
fn probing_dma_logging_set_succeeds_with_the_request_echoed() {
    let (_s, mut r) = setup();
    for f in [DMA_LOGGING_START, DMA_LOGGING_STOP] {
        let flags = wire::DEVICE_FEATURE_PROBE | wire::DEVICE_FEATURE_SET | f;
        let reply = feature(&mut r, flags, &[]);
        assert_eq!(reply.errno(), None);
        let echo = wire::DeviceFeature { argsz: 8, flags };
        assert_eq!(reply.body, echo.as_bytes());
    }
    let flags = wire::DEVICE_FEATURE_PROBE | wire::DEVICE_FEATURE_GET | DMA_LOGGING_REPORT;
    assert_eq!(feature(&mut r, flags, &[]).errno(), None);
}

#[test]
fn probing_dma_logging_with_an_unsupported_operation_is_einval() {
    let (_s, mut r) = setup();
    let get_start = wire::DEVICE_FEATURE_PROBE | wire::DEVICE_FEATURE_GET | DMA_LOGGING_START;
    let reply = feature(&mut r, get_start, &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
    let set_report = wire::DEVICE_FEATURE_PROBE | wire::DEVICE_FEATURE_SET | DMA_LOGGING_REPORT;
    let reply = feature(&mut r, set_report, &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn dma_logging_without_get_set_or_probe_is_einval() {
    let (_s, mut r) = setup();
    let reply = feature(&mut r, DMA_LOGGING_STOP, &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn dma_logging_report_before_start_is_einval() {
    let (_s, mut r) = setup();
    let rep = wire::DmaLoggingReport {
        iova: 0,
        length: 0x10000,
        page_size: 4096,
    };
    let f = wire::DeviceFeature {
        argsz: 8 + 24 + 8,
        flags: wire::DEVICE_FEATURE_GET | DMA_LOGGING_REPORT,
    };
    let reply = r.call(FEATURE, &[f.as_bytes(), rep.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn dma_logging_start_twice_is_ebusy() {
    let (_s, mut r) = setup();
    let ctl = wire::DmaLoggingControl {
        page_size: 4096,
        num_ranges: 0,
        reserved: 0,
    };
    let flags = wire::DEVICE_FEATURE_SET | DMA_LOGGING_START;
    assert_eq!(feature(&mut r, flags, ctl.as_bytes()).errno(), None);
    let reply = feature(&mut r, flags, ctl.as_bytes());
    assert_refused(&mut r, &reply, errno::EBUSY);
    // Stop, then start again works.
    let stop = wire::DEVICE_FEATURE_SET | DMA_LOGGING_STOP;
    assert_eq!(feature(&mut r, stop, &[]).errno(), None);
    assert_eq!(feature(&mut r, flags, ctl.as_bytes()).errno(), None);
}

#[test]
fn dma_logging_start_with_a_bad_page_size_or_missing_ranges_is_einval() {
    let (_s, mut r) = setup();
    let flags = wire::DEVICE_FEATURE_SET | DMA_LOGGING_START;
    let bad = wire::DmaLoggingControl {
        page_size: 3000,
        num_ranges: 0,
        reserved: 0,
    };
    let reply = feature(&mut r, flags, bad.as_bytes());
    assert_refused(&mut r, &reply, errno::EINVAL);
    let short = wire::DmaLoggingControl {
        page_size: 4096,
        num_ranges: 2,
        reserved: 0,
    };
    let one = wire::DmaLoggingRange {
        iova: 0,
        length: 4096,
    };
    let mut data = short.as_bytes().to_vec();
    data.extend_from_slice(one.as_bytes());
    let reply = feature(&mut r, flags, &data);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn dma_logging_start_with_overlapping_ranges_is_einval() {
    let (_s, mut r) = setup();
    let ctl = wire::DmaLoggingControl {
        page_size: 4096,
        num_ranges: 2,
        reserved: 0,
    };
    let mut data = ctl.as_bytes().to_vec();
    for iova in [0u64, 0x1000] {
        let rg = wire::DmaLoggingRange {
            iova,
            length: 0x2000,
        };
        data.extend_from_slice(rg.as_bytes());
    }
    let reply = feature(&mut r, wire::DEVICE_FEATURE_SET | DMA_LOGGING_START, &data);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn dma_logging_start_with_too_many_ranges_is_e2big() {
    let (_s, mut r) = setup();
    let ctl = wire::DmaLoggingControl {
        page_size: 4096,
        num_ranges: 257,
        reserved: 0,
    };
    let reply = feature(
        &mut r,
        wire::DEVICE_FEATURE_SET | DMA_LOGGING_START,
        ctl.as_bytes(),
    );
    assert_refused(&mut r, &reply, errno::E2BIG);
}

#[test]
fn truncated_feature_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(FEATURE, &[&[8, 0, 0, 0]], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn empty_feature_is_einval() {
    let (_s, mut r) = setup();
    let reply = r.call(FEATURE, &[], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn an_fd_with_feature_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let f = wire::DeviceFeature {
        argsz: 8,
        flags: wire::DEVICE_FEATURE_PROBE | MIGRATION,
    };
    let reply = r.call(FEATURE, &[f.as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

/// Regression (fixed in b6138df): answered ENOTSUP; VFIO_DEVICE_FEATURE says EINVAL.
#[test]
fn feature_argsz_below_8_is_einval() {
    let (_s, mut r) = setup();
    let f = wire::DeviceFeature {
        argsz: 4,
        flags: wire::DEVICE_FEATURE_PROBE | MIGRATION,
    };
    let reply = r.call(FEATURE, &[f.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

/// Regression (fixed in b6138df): answered ENOTSUP; the spec makes GET and SET exclusive
/// without PROBE.
#[test]
fn feature_get_and_set_together_is_einval() {
    let (_s, mut r) = setup();
    let flags = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET | MIGRATION;
    let reply = feature(&mut r, flags, &[0; 8]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}

/// Regression (fixed in b6138df): answered ENOTSUP.
#[test]
fn feature_with_undefined_flag_bits_is_einval() {
    let (_s, mut r) = setup();
    let reply = feature(
        &mut r,
        wire::DEVICE_FEATURE_PROBE | 1 << 20 | MIGRATION,
        &[],
    );
    assert_refused(&mut r, &reply, errno::EINVAL);
}

#[test]
fn mig_data_read_is_enotsup() {
    let (_s, mut r) = setup();
    let m = wire::MigData {
        argsz: 8 + 64,
        size: 64,
    };
    let reply = r.call(MIG_READ, &[m.as_bytes()], &[]);
    assert_refused(&mut r, &reply, errno::ENOTSUP);
}

#[test]
fn mig_data_write_is_enotsup() {
    let (_s, mut r) = setup();
    let m = wire::MigData { argsz: 8, size: 4 };
    let reply = r.call(MIG_WRITE, &[m.as_bytes(), b"data"], &[]);
    assert_refused(&mut r, &reply, errno::ENOTSUP);
}

#[test]
fn an_fd_with_mig_data_is_einval() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let m = wire::MigData { argsz: 8, size: 0 };
    let reply = r.call(MIG_READ, &[m.as_bytes()], &[e.as_fd()]);
    assert_refused(&mut r, &reply, errno::EINVAL);
}
