//! Client requests, parsed and checked: everything about a message that can be decided
//! from its bytes and its fd count alone, before anything acts on it.
//!
//! The server parses every command through these functions and only then asks the device
//! or the address space; the codec fuzz target runs them on arbitrary bytes. What needs
//! state (is the range mapped, is logging on, does the region exist) is the server's.

use crate::wire::{self, split};
use crate::ProtoError;
use zerocopy::{FromBytes, Immutable, KnownLayout};

/// Most ranges one DMA_LOGGING_START may name (the kernel's `LOG_MAX_RANGES`); E2BIG past it.
pub const MAX_LOGGING_RANGES: u32 = 256;

/// Refuses fds where the command takes none.
pub fn no_fds(fds: usize) -> Result<(), ProtoError> {
    if fds == 0 {
        Ok(())
    } else {
        Err(ProtoError::TooManyFds { got: fds, max: 0 })
    }
}

/// Parses a body's fixed struct and checks that its `argsz` covers the struct.
pub fn fixed<'b, T: FromBytes + KnownLayout + Immutable>(
    body: &'b [u8],
    what: &'static str,
    argsz: impl Fn(&T) -> u32,
) -> Result<(T, &'b [u8]), ProtoError> {
    let (v, tail) = split::<T>(body, what)?;
    if (argsz(&v) as usize) < core::mem::size_of::<T>() {
        return Err(ProtoError::Invalid("argsz smaller than the struct"));
    }
    Ok((v, tail))
}

/// Refuses a data transfer larger than the negotiated `max_data_xfer_size`.
pub fn check_count(count: u64, max_xfer: u32) -> Result<(), ProtoError> {
    if count > u64::from(max_xfer) {
        return Err(ProtoError::TransferTooLarge {
            count,
            max: max_xfer,
        });
    }
    Ok(())
}

/// A checked DMA_MAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapRequest {
    /// The request.
    pub map: wire::DmaMap,
    /// Whether an fd came with it (a mapping without one is reached through messages).
    pub has_fd: bool,
}

/// DMA_MAP: known flags only, at most one fd.
pub fn dma_map(body: &[u8], fds: usize) -> Result<DmaMapRequest, ProtoError> {
    let (map, _) = fixed::<wire::DmaMap>(body, "DMA_MAP", |r| r.argsz)?;
    let known = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
    if map.flags & !known != 0 {
        return Err(ProtoError::UnknownFlags(map.flags));
    }
    if fds > 1 {
        return Err(ProtoError::TooManyFds { got: fds, max: 1 });
    }
    Ok(DmaMapRequest {
        map,
        has_fd: fds == 1,
    })
}

/// A checked DMA_UNMAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmapRequest {
    /// The request.
    pub unmap: wire::DmaUnmap,
    /// UNMAP_ALL.
    pub all: bool,
    /// The bitmap descriptor, with GET_DIRTY_BITMAP.
    pub bitmap: Option<wire::DmaUnmapBitmap>,
}

/// DMA_UNMAP: known flags, no address or size with UNMAP_ALL, no bitmap of everything, a
/// bitmap descriptor when one is asked for, no fds.
pub fn dma_unmap(body: &[u8], fds: usize) -> Result<DmaUnmapRequest, ProtoError> {
    no_fds(fds)?;
    let (unmap, tail) = fixed::<wire::DmaUnmap>(body, "DMA_UNMAP", |r| r.argsz)?;
    let known = wire::DMA_UNMAP_FLAG_ALL | wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
    if unmap.flags & !known != 0 {
        return Err(ProtoError::UnknownFlags(unmap.flags));
    }
    let all = unmap.flags & wire::DMA_UNMAP_FLAG_ALL != 0;
    let dirty = unmap.flags & wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
    if all && (unmap.address != 0 || unmap.size != 0) {
        return Err(ProtoError::Invalid("UNMAP_ALL with an address or size"));
    }
    if all && dirty {
        // As the kernel's type1: a bitmap of everything is not offered.
        return Err(ProtoError::Invalid("UNMAP_ALL with GET_DIRTY_BITMAP"));
    }
    let bitmap = if dirty {
        Some(split::<wire::DmaUnmapBitmap>(tail, "DMA_UNMAP bitmap")?.0)
    } else {
        None
    };
    Ok(DmaUnmapRequest { unmap, all, bitmap })
}

/// REGION_READ: the access, its count within `max_xfer`, no fds.
pub fn region_read(
    body: &[u8],
    fds: usize,
    max_xfer: u32,
) -> Result<wire::RegionAccess, ProtoError> {
    no_fds(fds)?;
    let (req, _) = split::<wire::RegionAccess>(body, "REGION_READ")?;
    check_count(u64::from(req.count), max_xfer)?;
    Ok(req)
}

/// REGION_WRITE: the access and exactly `count` bytes of data, no fds.
pub fn region_write(
    body: &[u8],
    fds: usize,
    max_xfer: u32,
) -> Result<(wire::RegionAccess, &[u8]), ProtoError> {
    no_fds(fds)?;
    let (req, data) = split::<wire::RegionAccess>(body, "REGION_WRITE")?;
    check_count(u64::from(req.count), max_xfer)?;
    if data.len() != req.count as usize {
        return Err(ProtoError::Invalid(
            "REGION_WRITE count does not match its data",
        ));
    }
    Ok((req, data))
}

/// REGION_WRITE_MULTI: at most 200 entries of at most 8 bytes each, all present, no fds.
/// The whole message is checked before any write takes effect.
pub fn write_multi(
    body: &[u8],
    fds: usize,
) -> Result<(wire::WriteMulti, Vec<wire::WriteMultiEntry>), ProtoError> {
    no_fds(fds)?;
    let (req, mut tail) = split::<wire::WriteMulti>(body, "REGION_WRITE_MULTI")?;
    if req.wr_cnt > wire::WRITE_MULTI_MAX as u64 {
        return Err(ProtoError::Invalid("REGION_WRITE_MULTI wr_cnt above 200"));
    }
    let mut writes = Vec::with_capacity(wire::WRITE_MULTI_MAX);
    for _ in 0..req.wr_cnt {
        let (w, rest) = split::<wire::WriteMultiEntry>(tail, "REGION_WRITE_MULTI entry")?;
        tail = rest;
        if w.count as usize > wire::WRITE_MULTI_DATA {
            return Err(ProtoError::Invalid(
                "REGION_WRITE_MULTI entry above 8 bytes",
            ));
        }
        writes.push(w);
    }
    Ok((req, writes))
}

/// A checked DEVICE_FEATURE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureRequest<'b> {
    /// The request's fixed part.
    pub request: wire::DeviceFeature,
    /// The feature index (`flags & DEVICE_FEATURE_MASK`).
    pub feature: u32,
    /// The GET and SET bits asked for (`DEVICE_FEATURE_GET | DEVICE_FEATURE_SET`).
    pub ops: u32,
    /// PROBE.
    pub probe: bool,
    /// The feature data after the fixed part.
    pub data: &'b [u8],
}

/// DEVICE_FEATURE: known flag bits, not GET and SET together without PROBE, no fds.
pub fn device_feature(body: &[u8], fds: usize) -> Result<FeatureRequest<'_>, ProtoError> {
    no_fds(fds)?;
    let (request, data) = fixed::<wire::DeviceFeature>(body, "DEVICE_FEATURE", |r| r.argsz)?;
    let known = wire::DEVICE_FEATURE_MASK
        | wire::DEVICE_FEATURE_GET
        | wire::DEVICE_FEATURE_SET
        | wire::DEVICE_FEATURE_PROBE;
    if request.flags & !known != 0 {
        return Err(ProtoError::UnknownFlags(request.flags));
    }
    let ops = request.flags & (wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET);
    let probe = request.flags & wire::DEVICE_FEATURE_PROBE != 0;
    if ops == wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET && !probe {
        return Err(ProtoError::Invalid(
            "DEVICE_FEATURE GET and SET without PROBE",
        ));
    }
    Ok(FeatureRequest {
        request,
        feature: request.flags & wire::DEVICE_FEATURE_MASK,
        ops,
        probe,
        data,
    })
}

/// The data of DMA_LOGGING_START: a power-of-two page size and at most
/// [`MAX_LOGGING_RANGES`] ranges, all present.
pub fn dma_logging_start(
    data: &[u8],
) -> Result<(wire::DmaLoggingControl, Vec<wire::DmaLoggingRange>), ProtoError> {
    let (ctl, mut rest) = split::<wire::DmaLoggingControl>(data, "DMA_LOGGING_START")?;
    if !ctl.page_size.is_power_of_two() {
        return Err(ProtoError::Invalid("logging page size not a power of two"));
    }
    if ctl.num_ranges > MAX_LOGGING_RANGES {
        return Err(ProtoError::TooMany {
            what: "logging ranges",
            max: MAX_LOGGING_RANGES as usize,
        });
    }
    let mut ranges = Vec::with_capacity(ctl.num_ranges as usize);
    for _ in 0..ctl.num_ranges {
        let (r, more) = split::<wire::DmaLoggingRange>(rest, "logging range")?;
        ranges.push(r);
        rest = more;
    }
    Ok((ctl, ranges))
}

/// MIG_DATA_READ: a size within `max_xfer` that `argsz` leaves room for, no fds.
pub fn mig_data_read(body: &[u8], fds: usize, max_xfer: u32) -> Result<wire::MigData, ProtoError> {
    no_fds(fds)?;
    let (req, _) = fixed::<wire::MigData>(body, "MIG_DATA_READ", |r| r.argsz)?;
    check_count(u64::from(req.size), max_xfer)?;
    let head = wire::size_of::<wire::MigData>();
    if (req.argsz as usize) < head.saturating_add(req.size as usize) {
        return Err(ProtoError::Invalid("argsz smaller than the data asked for"));
    }
    Ok(req)
}

/// MIG_DATA_WRITE: exactly `size` bytes of data within `max_xfer`, no fds.
pub fn mig_data_write(
    body: &[u8],
    fds: usize,
    max_xfer: u32,
) -> Result<(wire::MigData, &[u8]), ProtoError> {
    no_fds(fds)?;
    let (req, data) = fixed::<wire::MigData>(body, "MIG_DATA_WRITE", |r| r.argsz)?;
    check_count(u64::from(req.size), max_xfer)?;
    if data.len() != req.size as usize {
        return Err(ProtoError::Invalid(
            "MIG_DATA_WRITE size does not match its data",
        ));
    }
    Ok((req, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn dma_map_takes_one_fd_and_known_flags() {
        let m = wire::DmaMap {
            argsz: 32,
            flags: 3,
            ..Default::default()
        };
        assert!(dma_map(m.as_bytes(), 1).unwrap().has_fd);
        assert!(!dma_map(m.as_bytes(), 0).unwrap().has_fd);
        assert!(matches!(
            dma_map(m.as_bytes(), 2),
            Err(ProtoError::TooManyFds { .. })
        ));
        let bad = wire::DmaMap { flags: 4, ..m };
        assert!(matches!(
            dma_map(bad.as_bytes(), 0),
            Err(ProtoError::UnknownFlags(4))
        ));
        let short = wire::DmaMap { argsz: 31, ..m };
        assert!(dma_map(short.as_bytes(), 0).is_err());
    }

    #[test]
    fn dma_unmap_all_takes_no_range_and_no_bitmap() {
        let u = wire::DmaUnmap {
            argsz: 24,
            flags: wire::DMA_UNMAP_FLAG_ALL,
            address: 0,
            size: 0,
        };
        assert!(dma_unmap(u.as_bytes(), 0).unwrap().all);
        let ranged = wire::DmaUnmap { size: 4096, ..u };
        assert!(dma_unmap(ranged.as_bytes(), 0).is_err());
        let both = wire::DmaUnmap {
            flags: wire::DMA_UNMAP_FLAG_ALL | wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            ..u
        };
        assert!(dma_unmap(both.as_bytes(), 0).is_err());
        let dirty = wire::DmaUnmap {
            flags: wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP,
            size: 4096,
            ..u
        };
        // The bitmap descriptor must follow.
        assert!(dma_unmap(dirty.as_bytes(), 0).is_err());
        let mut body = dirty.as_bytes().to_vec();
        body.extend_from_slice(
            wire::DmaUnmapBitmap {
                pgsize: 4096,
                size: 8,
            }
            .as_bytes(),
        );
        assert_eq!(dma_unmap(&body, 0).unwrap().bitmap.unwrap().size, 8);
    }

    #[test]
    fn region_write_needs_exactly_its_data() {
        let a = wire::RegionAccess {
            offset: 0,
            region: 0,
            count: 4,
        };
        let mut body = a.as_bytes().to_vec();
        body.extend_from_slice(&[1, 2, 3]);
        assert!(region_write(&body, 0, 4096).is_err());
        body.push(4);
        assert_eq!(region_write(&body, 0, 4096).unwrap().1, &[1, 2, 3, 4]);
        assert!(matches!(
            region_write(&body, 0, 2),
            Err(ProtoError::TransferTooLarge { .. })
        ));
        assert!(region_write(&body, 1, 4096).is_err());
    }

    #[test]
    fn write_multi_is_checked_whole() {
        let mut body = wire::WriteMulti { wr_cnt: 2 }.as_bytes().to_vec();
        let e = wire::WriteMultiEntry {
            count: 8,
            ..Default::default()
        };
        body.extend_from_slice(e.as_bytes());
        assert!(write_multi(&body, 0).is_err(), "second entry missing");
        let big = wire::WriteMultiEntry { count: 9, ..e };
        body.extend_from_slice(big.as_bytes());
        assert!(write_multi(&body, 0).is_err(), "second entry too large");
        let over = wire::WriteMulti { wr_cnt: 201 }.as_bytes().to_vec();
        assert!(write_multi(&over, 0).is_err());
    }

    #[test]
    fn features_refuse_get_and_set_without_probe() {
        let f = |flags| wire::DeviceFeature { argsz: 8, flags };
        let gs = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET | 1;
        assert!(device_feature(f(gs).as_bytes(), 0).is_err());
        let probed = f(gs | wire::DEVICE_FEATURE_PROBE);
        let probe = device_feature(probed.as_bytes(), 0).unwrap();
        assert!(probe.probe);
        assert_eq!(probe.feature, 1);
        assert!(device_feature(f(1 << 20).as_bytes(), 0).is_err());
    }

    #[test]
    fn logging_start_checks_page_size_and_range_count() {
        let c = |page_size, num_ranges| wire::DmaLoggingControl {
            page_size,
            num_ranges,
            reserved: 0,
        };
        assert!(dma_logging_start(c(4096, 0).as_bytes()).is_ok());
        assert!(dma_logging_start(c(4095, 0).as_bytes()).is_err());
        let e = dma_logging_start(c(4096, 257).as_bytes()).unwrap_err();
        assert_eq!(e.errno(), 7, "E2BIG");
        assert!(
            dma_logging_start(c(4096, 1).as_bytes()).is_err(),
            "range missing"
        );
    }

    #[test]
    fn mig_data_sizes_match() {
        let r = wire::MigData { argsz: 8, size: 16 };
        assert!(
            mig_data_read(r.as_bytes(), 0, 4096).is_err(),
            "argsz leaves no room"
        );
        let r = wire::MigData {
            argsz: 24,
            size: 16,
        };
        assert!(mig_data_read(r.as_bytes(), 0, 4096).is_ok());
        let mut w = wire::MigData { argsz: 8, size: 2 }.as_bytes().to_vec();
        w.push(1);
        assert!(mig_data_write(&w, 0, 4096).is_err());
        w.push(2);
        assert_eq!(mig_data_write(&w, 0, 4096).unwrap().1, &[1, 2]);
    }
}
