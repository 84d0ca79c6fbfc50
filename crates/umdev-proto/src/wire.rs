//! Fixed-layout message bodies, named as in the vfio-user spec.
//!
//! Every struct is `#[repr(C)]` with no padding, so its bytes are exactly the wire bytes.
//! Variable parts (data, capabilities, bitmaps) follow the struct in the message.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

macro_rules! wire_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        // Fields carry the spec's names and meanings; the spec documents them.
        #[allow(missing_docs)]
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $($(#[$fm])* pub $field: $ty),* }
    };
}

/// `DmaMap::flags`: the server may read the range.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `DmaMap::flags`: the server may write the range.
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `DmaUnmap::flags`: return the dirty bitmap of the range.
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// `DmaUnmap::flags`: unmap every range (address and size must be 0).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// `DeviceInfo::flags`: the device supports DEVICE_RESET.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `DeviceInfo::flags`: the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `RegionInfo::flags`: the client may read the region.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `RegionInfo::flags`: the client may write the region.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `RegionInfo::flags`: the region (or its sparse areas) may be mmapped from the fd sent.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `RegionInfo::flags`: a capability chain follows the struct.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// Capability id of the sparse mmap capability.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// `IrqInfo::flags`: the interrupt can be signalled through an eventfd.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `IrqInfo::flags`: MASK and UNMASK actions are supported.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `IrqInfo::flags`: the interrupt masks itself when triggered.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `IrqInfo::flags`: vectors are set up as a set, not one by one.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `IrqSet::flags`: no data; act unconditionally.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `IrqSet::flags`: one byte per vector, act where it is non-zero.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `IrqSet::flags`: eventfds travel as ancillary data.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `IrqSet::flags`: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `IrqSet::flags`: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `IrqSet::flags`: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// Every data-type bit of `IrqSet::flags`.
pub const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
/// Every action bit of `IrqSet::flags`.
pub const IRQ_SET_ACTION_MASK_ALL: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// Most writes one REGION_WRITE_MULTI message may carry.
pub const WRITE_MULTI_MAX: usize = 200;
/// Most data bytes one REGION_WRITE_MULTI entry may carry.
pub const WRITE_MULTI_DATA: usize = 8;

/// `DeviceFeature::flags`: mask of the feature index.
pub const DEVICE_FEATURE_MASK: u32 = 0xffff;
/// `DeviceFeature::flags`: get the feature's data.
pub const DEVICE_FEATURE_GET: u32 = 1 << 16;
/// `DeviceFeature::flags`: set the feature's data.
pub const DEVICE_FEATURE_SET: u32 = 1 << 17;
/// `DeviceFeature::flags`: probe for support.
pub const DEVICE_FEATURE_PROBE: u32 = 1 << 18;
/// Feature index: start DMA logging (SET; [`DmaLoggingControl`] and ranges follow).
pub const DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
/// Feature index: stop DMA logging (SET; no data).
pub const DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Feature index: report the dirty bitmap of a range (GET; [`DmaLoggingReport`], then the
/// bitmap in the reply).
pub const DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// Feature index: migration support (GET; [`MigFeature`] in the reply).
pub const DEVICE_FEATURE_MIGRATION: u32 = 1;
/// Feature index: the migration state (GET/SET; [`MigDeviceState`]).
pub const DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Feature index private to umdev (not in the kernel or the vfio-user spec): pre-copy sizing
/// (GET; [`MigPrecopyInfo`] in the reply), the answer the kernel gives to the
/// `VFIO_MIG_GET_PRECOPY_INFO` ioctl on the migration data fd, which vfio-user lacks. It is
/// valid in PRE_COPY and PRE_COPY_P2P only (EINVAL elsewhere), as the ioctl is.
pub const DEVICE_FEATURE_UMDEV_PRECOPY_INFO: u32 = 0xf001;
/// [`MigFeature::flags`]: STOP_COPY is supported (mandatory).
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
/// [`MigFeature::flags`]: the P2P states are supported.
pub const MIGRATION_P2P: u64 = 1 << 1;
/// [`MigFeature::flags`]: the PRE_COPY states are supported.
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;
/// Migration state: the device has failed and must be reset.
pub const DEVICE_STATE_ERROR: u32 = 0;
/// Migration state: the device does not change its internal or external state.
pub const DEVICE_STATE_STOP: u32 = 1;
/// Migration state: the device runs normally.
pub const DEVICE_STATE_RUNNING: u32 = 2;
/// Migration state: stopped, its state can be read out.
pub const DEVICE_STATE_STOP_COPY: u32 = 3;
/// Migration state: stopped, loading a new state.
pub const DEVICE_STATE_RESUMING: u32 = 4;
/// Migration state: running, without peer-to-peer.
pub const DEVICE_STATE_RUNNING_P2P: u32 = 5;
/// Migration state: running, its state can be read out while it changes.
pub const DEVICE_STATE_PRE_COPY: u32 = 6;
/// Migration state: PRE_COPY without peer-to-peer.
pub const DEVICE_STATE_PRE_COPY_P2P: u32 = 7;

wire_struct!(
    /// Fixed part of VERSION (request and reply); NUL-terminated JSON follows.
    Version { major: u16, minor: u16 }
);
wire_struct!(
    /// DMA_MAP request.
    DmaMap { argsz: u32, flags: u32, offset: u64, address: u64, size: u64 }
);
wire_struct!(
    /// DMA_UNMAP request and reply.
    DmaUnmap { argsz: u32, flags: u32, address: u64, size: u64 }
);
wire_struct!(
    /// The dirty bitmap descriptor that follows DmaUnmap with GET_DIRTY_BITMAP.
    DmaUnmapBitmap { pgsize: u64, size: u64 }
);
wire_struct!(
    /// DEVICE_GET_INFO request and reply.
    DeviceInfo { argsz: u32, flags: u32, num_regions: u32, num_irqs: u32 }
);
wire_struct!(
    /// DEVICE_GET_REGION_INFO request and reply (capabilities follow in the reply).
    RegionInfo { argsz: u32, flags: u32, index: u32, cap_offset: u32, size: u64, offset: u64 }
);
wire_struct!(
    /// Header of one region capability.
    CapHeader { id: u16, version: u16, next: u32 }
);
wire_struct!(
    /// Fixed part of the sparse mmap capability; `nr_areas` [`SparseMmapArea`]s follow.
    SparseMmap { header: CapHeader, nr_areas: u32, reserved: u32 }
);
wire_struct!(
    /// One mmap-able area of a region.
    SparseMmapArea { offset: u64, size: u64 }
);
wire_struct!(
    /// DEVICE_GET_REGION_IO_FDS request and reply (sub-regions follow in the reply).
    RegionIoFds { argsz: u32, flags: u32, index: u32, count: u32 }
);
wire_struct!(
    /// One sub-region of a DEVICE_GET_REGION_IO_FDS reply (the ioeventfd form; the
    /// ioregionfd form has `user_data` where this has `datamatch`).
    IoFdSubRegion {
        offset: u64,
        size: u64,
        fd_index: u32,
        kind: u32,
        flags: u32,
        padding: u32,
        datamatch: u64
    }
);
/// `IoFdSubRegion::kind` of an ioeventfd.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// `IoFdSubRegion::flags`: signal only for writes of `datamatch` (KVM's value).
pub const IOEVENTFD_FLAG_DATAMATCH: u32 = 1;
wire_struct!(
    /// DEVICE_GET_IRQ_INFO request and reply.
    IrqInfo { argsz: u32, flags: u32, index: u32, count: u32 }
);
wire_struct!(
    /// DEVICE_SET_IRQS request; bools follow for DATA_BOOL.
    IrqSet { argsz: u32, flags: u32, index: u32, start: u32, count: u32 }
);
wire_struct!(
    /// REGION_READ/REGION_WRITE request and reply; data follows where there is data.
    RegionAccess { offset: u64, region: u32, count: u32 }
);
wire_struct!(
    /// DMA_READ/DMA_WRITE (server to client); data follows where there is data.
    DmaAccess { address: u64, count: u64 }
);
wire_struct!(
    /// Fixed part of REGION_WRITE_MULTI (request and reply).
    WriteMulti { wr_cnt: u64 }
);
wire_struct!(
    /// One write of REGION_WRITE_MULTI.
    WriteMultiEntry { offset: u64, region: u32, count: u32, data: [u8; WRITE_MULTI_DATA] }
);
wire_struct!(
    /// Fixed part of DEVICE_FEATURE; feature data follows.
    DeviceFeature { argsz: u32, flags: u32 }
);
wire_struct!(
    /// Data of DMA_LOGGING_START; `num_ranges` [`DmaLoggingRange`]s follow.
    DmaLoggingControl { page_size: u64, num_ranges: u32, reserved: u32 }
);
wire_struct!(
    /// One IOVA range to log.
    DmaLoggingRange { iova: u64, length: u64 }
);
wire_struct!(
    /// Data of DMA_LOGGING_REPORT; in the reply the bitmap (u64 words) follows.
    DmaLoggingReport { iova: u64, length: u64, page_size: u64 }
);
wire_struct!(
    /// Fixed part of MIG_DATA_READ/MIG_DATA_WRITE; data follows where there is data.
    MigData { argsz: u32, size: u32 }
);
wire_struct!(
    /// Data of DEVICE_FEATURE MIGRATION.
    MigFeature { flags: u64 }
);
wire_struct!(
    /// Data of DEVICE_FEATURE MIG_DEVICE_STATE; `data_fd` is unused in vfio-user (-1).
    MigDeviceState { device_state: u32, data_fd: i32 }
);
wire_struct!(
    /// Data of [`DEVICE_FEATURE_UMDEV_PRECOPY_INFO`], as the kernel's
    /// `struct vfio_precopy_info` without its argsz and flags.
    MigPrecopyInfo { initial_bytes: u64, dirty_bytes: u64 }
);

/// Size on the wire of a wire struct.
pub const fn size_of<T>() -> usize {
    core::mem::size_of::<T>()
}

/// Size of a wire struct as the `u32` that `argsz` fields carry.
// Wire structs are a few dozen bytes: the cast cannot truncate.
#[allow(clippy::cast_possible_truncation)]
pub const fn argsz<T>() -> u32 {
    core::mem::size_of::<T>() as u32
}

/// Splits a message body into its fixed struct and the bytes after it.
///
/// Bodies shorter than the struct are refused; longer ones are fine (the spec lets a sender
/// append data, and later protocol versions may grow a struct).
pub fn split<'a, T: FromBytes + KnownLayout + Immutable>(
    body: &'a [u8],
    what: &'static str,
) -> Result<(T, &'a [u8]), crate::ProtoError> {
    T::read_from_prefix(body).map_err(|_| crate::ProtoError::Truncated {
        what,
        need: core::mem::size_of::<T>(),
        got: body.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(size_of::<Version>(), 4);
        assert_eq!(size_of::<DmaMap>(), 32);
        assert_eq!(size_of::<DmaUnmap>(), 24);
        assert_eq!(size_of::<DeviceInfo>(), 16);
        assert_eq!(size_of::<RegionInfo>(), 32);
        assert_eq!(size_of::<SparseMmap>(), 16);
        assert_eq!(size_of::<SparseMmapArea>(), 16);
        assert_eq!(size_of::<IoFdSubRegion>(), 40);
        assert_eq!(size_of::<RegionIoFds>(), 16);
        assert_eq!(size_of::<IrqInfo>(), 16);
        assert_eq!(size_of::<IrqSet>(), 20);
        assert_eq!(size_of::<RegionAccess>(), 16);
        assert_eq!(size_of::<DmaAccess>(), 16);
        assert_eq!(size_of::<WriteMultiEntry>(), 24);
        assert_eq!(size_of::<DeviceFeature>(), 8);
        assert_eq!(size_of::<DmaLoggingControl>(), 16);
        assert_eq!(size_of::<DmaLoggingRange>(), 16);
        assert_eq!(size_of::<DmaLoggingReport>(), 24);
        assert_eq!(size_of::<MigData>(), 8);
        assert_eq!(size_of::<MigFeature>(), 8);
        assert_eq!(size_of::<MigDeviceState>(), 8);
        assert_eq!(size_of::<MigPrecopyInfo>(), 16);
    }

    #[test]
    fn split_refuses_short_bodies_and_keeps_the_tail() {
        let body = [1u8, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 9, 9];
        let (info, tail) = split::<DeviceInfo>(&body, "info").unwrap();
        assert_eq!(
            (info.argsz, info.flags, info.num_regions, info.num_irqs),
            (1, 2, 3, 4)
        );
        assert_eq!(tail, &[9, 9]);
        assert!(split::<DeviceInfo>(&body[..15], "info").is_err());
    }
}
