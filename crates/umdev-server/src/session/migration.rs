//! Migration: the DEVICE_FEATUREs MIGRATION, MIG_DEVICE_STATE and umdev's pre-copy sizing,
//! and the device state stream (MIG_DATA_READ, MIG_DATA_WRITE).

use umdev_proto::request::{self, FeatureRequest};
use umdev_proto::wire;
use zerocopy::IntoBytes;

use super::{Reply, Session};
use crate::error::RequestError;

impl Session<'_> {
    /// GET MIGRATION: the device's migration flags.
    pub(super) fn migration_feature(
        &self,
        req: &FeatureRequest<'_>,
    ) -> Result<Reply, RequestError> {
        let flags = self.function().migration_spec().map_or(0, |m| m.flags);
        Self::feature_reply(req, wire::MigFeature { flags }.as_bytes())
    }

    /// GET or SET MIG_DEVICE_STATE: a SET walks the kernel's path to the state asked for
    /// (the device's work context drains before it stops).
    pub(super) fn mig_device_state(&self, req: &FeatureRequest<'_>) -> Result<Reply, RequestError> {
        let mut f = self.function();
        let state = if req.ops & wire::DEVICE_FEATURE_SET != 0 {
            let (set, _) = wire::split::<wire::MigDeviceState>(req.data, "MIG_DEVICE_STATE")?;
            self.stats.mig_change();
            f.set_mig_state(set.device_state)?
        } else {
            f.mig_state()?
        };
        drop(f);
        let data = wire::MigDeviceState {
            device_state: state as u32,
            data_fd: -1,
        };
        Self::feature_reply(req, data.as_bytes())
    }

    /// GET of umdev's pre-copy sizing (vfio-user has no `VFIO_MIG_GET_PRECOPY_INFO`).
    pub(super) fn precopy_info(&self, req: &FeatureRequest<'_>) -> Result<Reply, RequestError> {
        let (initial_bytes, dirty_bytes) = self.function().mig_precopy_info()?;
        let data = wire::MigPrecopyInfo {
            initial_bytes,
            dirty_bytes,
        };
        Self::feature_reply(req, data.as_bytes())
    }

    /// MIG_DATA_READ: up to `size` bytes of the device's outgoing state; a shorter reply
    /// means no more data (for now in PRE_COPY, for good in STOP_COPY).
    pub(super) fn mig_data_read(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let req = request::mig_data_read(body, fds, self.config.max_data_xfer_size)?;
        let data = self.function().mig_data_read(req.size as usize)?;
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let mut out = wire::MigData {
            argsz: wire::argsz::<wire::MigData>().saturating_add(n),
            size: n,
        }
        .as_bytes()
        .to_vec();
        out.extend_from_slice(&data);
        Ok(Reply::bytes(out))
    }

    /// MIG_DATA_WRITE: appends to the device's incoming state (RESUMING only).
    pub(super) fn mig_data_write(&self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        let (_, data) = request::mig_data_write(body, fds, self.config.max_data_xfer_size)?;
        self.function().mig_data_write(data)?;
        Ok(Reply::empty())
    }
}
