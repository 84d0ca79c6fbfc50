//! DEVICE_FEATURE: one table says which features exist, which operations each takes and
//! who answers it; the checks common to all (as the kernel's `vfio_check_feature`) are made
//! once, here.

use rustix::io::Errno;
use umdev_dma::{dirty_bitmap_size, IovaRange};
use umdev_proto::request::{self, FeatureRequest};
use umdev_proto::{wire, ProtoError};
use zerocopy::IntoBytes;

use super::{Reply, Session};
use crate::error::{refuse, RequestError};

const GET: u32 = wire::DEVICE_FEATURE_GET;
const SET: u32 = wire::DEVICE_FEATURE_SET;

/// Who answers a feature.
type Handler = fn(&Session<'_>, &FeatureRequest<'_>) -> Result<Reply, RequestError>;

/// One feature the server offers.
struct Feature {
    index: u32,
    /// The operations it takes (GET, SET or both).
    ops: u32,
    /// Offered only by a device that declared migration support.
    migration: bool,
    handler: Handler,
}

/// Every feature, once.
const FEATURES: &[Feature] = &[
    Feature {
        index: wire::DEVICE_FEATURE_MIGRATION,
        ops: GET,
        migration: true,
        handler: |s, r| s.migration_feature(r),
    },
    Feature {
        index: wire::DEVICE_FEATURE_MIG_DEVICE_STATE,
        ops: GET | SET,
        migration: true,
        handler: |s, r| s.mig_device_state(r),
    },
    Feature {
        index: wire::DEVICE_FEATURE_UMDEV_PRECOPY_INFO,
        ops: GET,
        migration: true,
        handler: |s, r| s.precopy_info(r),
    },
    Feature {
        index: wire::DEVICE_FEATURE_DMA_LOGGING_START,
        ops: SET,
        migration: false,
        handler: |s, r| s.dma_logging_start(r),
    },
    Feature {
        index: wire::DEVICE_FEATURE_DMA_LOGGING_STOP,
        ops: SET,
        migration: false,
        handler: |s, r| s.dma_logging_stop(r),
    },
    Feature {
        index: wire::DEVICE_FEATURE_DMA_LOGGING_REPORT,
        ops: GET,
        migration: false,
        handler: |s, r| s.dma_logging_report(r),
    },
];

impl Session<'_> {
    pub(super) fn device_feature(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let req = request::device_feature(body, fds)?;
        let migratable = self.function().migration_spec().is_some();
        let feature = FEATURES
            .iter()
            .find(|f| f.index == req.feature && (migratable || !f.migration))
            .ok_or_else(|| refuse(Errno::NOTSUP, "the device has no such feature"))?;
        // As the kernel's vfio_check_feature: an operation the feature lacks is EINVAL, a
        // probe of what it has succeeds with the request echoed, and otherwise one of GET
        // or SET is needed.
        if req.ops & !feature.ops != 0 {
            return Err(ProtoError::Invalid("operation not supported by this feature").into());
        }
        if req.probe {
            return Ok(Reply::bytes(body.to_vec()));
        }
        if req.ops == 0 {
            return Err(ProtoError::Invalid("DEVICE_FEATURE without GET, SET or PROBE").into());
        }
        (feature.handler)(self, &req)
    }

    /// A GET reply: the request's header with `argsz` covering `data`, then `data` (the
    /// spec: GET replies carry the data after the header; `argsz` must leave room for it,
    /// as the kernel's `vfio_check_feature` requires).
    pub(super) fn feature_reply(
        req: &FeatureRequest<'_>,
        data: &[u8],
    ) -> Result<Reply, RequestError> {
        let argsz = wire::size_of::<wire::DeviceFeature>() + data.len();
        if (req.request.argsz as usize) < argsz {
            return Err(ProtoError::Invalid("argsz too small for the feature data").into());
        }
        let mut body = wire::DeviceFeature {
            argsz: u32::try_from(argsz).unwrap_or(u32::MAX),
            flags: req.request.flags,
        }
        .as_bytes()
        .to_vec();
        body.extend_from_slice(data);
        Ok(Reply::bytes(body))
    }

    fn dma_logging_start(&self, req: &FeatureRequest<'_>) -> Result<Reply, RequestError> {
        let (mut ctl, ranges) = request::dma_logging_start(req.data)?;
        let ranges = ranges
            .iter()
            .map(|r| IovaRange::new(r.iova, r.length))
            .collect::<Result<Vec<_>, _>>()?;
        ctl.page_size = self.space()?.start_dirty_logging(&ranges)?;
        let mut out = req.request.as_bytes().to_vec();
        out.extend_from_slice(ctl.as_bytes());
        let after_ctl = wire::size_of::<wire::DmaLoggingControl>();
        let ranges_len = wire::size_of::<wire::DmaLoggingRange>() * ranges.len();
        out.extend_from_slice(&req.data[after_ctl..after_ctl + ranges_len]);
        Ok(Reply::bytes(out))
    }

    fn dma_logging_stop(&self, req: &FeatureRequest<'_>) -> Result<Reply, RequestError> {
        self.space()?.stop_dirty_logging();
        let mut out = req.request.as_bytes().to_vec();
        out.extend_from_slice(req.data);
        Ok(Reply::bytes(out))
    }

    fn dma_logging_report(&self, req: &FeatureRequest<'_>) -> Result<Reply, RequestError> {
        let (rep, _) = wire::split::<wire::DmaLoggingReport>(req.data, "DMA_LOGGING_REPORT")?;
        let space = self.space()?;
        let size = dirty_bitmap_size(rep.length, rep.page_size)?;
        request::check_count(size as u64, self.config.max_data_xfer_size)?;
        let head =
            wire::size_of::<wire::DeviceFeature>() + wire::size_of::<wire::DmaLoggingReport>();
        if (req.request.argsz as usize) < head + size {
            return Err(ProtoError::Invalid("argsz too small for the bitmap").into());
        }
        let mut out = vec![0u8; head + size];
        space.dirty_report(rep.iova, rep.length, rep.page_size, &mut out[head..])?;
        let answer = wire::DeviceFeature {
            argsz: u32::try_from(head + size).unwrap_or(u32::MAX),
            flags: req.request.flags,
        };
        out[..8].copy_from_slice(answer.as_bytes());
        out[8..head].copy_from_slice(rep.as_bytes());
        Ok(Reply::bytes(out))
    }
}
