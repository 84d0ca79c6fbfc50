//! The wire codec on arbitrary bytes: the first 16 bytes are a header, the rest a body.
//!
//! Nothing here may panic on any input; the checks below are the codec's own promises:
//! a parsed header keeps its fields, every wire struct splits off exactly its size and
//! reads back as the same bytes, capabilities that parse survive `to_wire` unchanged, and
//! the server's per-message checks (`umdev_proto::request`) hold what they accept to the
//! rules they state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use umdev_proto::{request, wire, Capabilities, Command, Header, HEADER_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<HEADER_SIZE>() else {
        return;
    };
    header(head);
    // The header's fd-count byte stands in for the fds that came with the message.
    requests(body, usize::from(head[4] % 4));
    // Every wire struct the codec defines. A struct added to `wire` belongs here too.
    split::<wire::Version>(body);
    split::<wire::DmaMap>(body);
    split::<wire::DmaUnmap>(body);
    split::<wire::DmaUnmapBitmap>(body);
    split::<wire::DeviceInfo>(body);
    split::<wire::RegionInfo>(body);
    split::<wire::CapHeader>(body);
    split::<wire::SparseMmap>(body);
    split::<wire::SparseMmapArea>(body);
    split::<wire::RegionIoFds>(body);
    split::<wire::IrqInfo>(body);
    split::<wire::IrqSet>(body);
    split::<wire::RegionAccess>(body);
    split::<wire::DmaAccess>(body);
    split::<wire::WriteMulti>(body);
    split::<wire::WriteMultiEntry>(body);
    split::<wire::DeviceFeature>(body);
    split::<wire::MigData>(body);
    // The capabilities JSON follows the VERSION struct, as the server reads it.
    if let Ok((_, tail)) = wire::split::<wire::Version>(body, "VERSION") {
        capabilities(tail);
    }
});

fn header(bytes: &[u8; HEADER_SIZE]) {
    let Ok(h) = Header::parse(bytes) else {
        return;
    };
    assert!(
        h.msg_size as usize >= HEADER_SIZE,
        "parse accepted a short msg_size"
    );
    assert_eq!(h.as_bytes(), bytes, "a parsed header changed its bytes");
    assert_eq!(h.body_len(), h.msg_size as usize - HEADER_SIZE);
    if let Some(c) = h.known_command() {
        assert_eq!(c as u16, h.command);
        assert_eq!(Command::from_u16(h.command), Some(c));
    }
    // Replies built from any header are well-formed themselves.
    let e = h.error_reply(22);
    assert_eq!((e.msg_id, e.body_len(), e.error()), (h.msg_id, 0, Some(22)));
    assert!(e.is_reply());
    if let Ok(r) = h.reply(h.body_len()) {
        assert_eq!(
            (r.msg_id, r.msg_size, r.error()),
            (h.msg_id, h.msg_size, None)
        );
        assert!(Header::parse(&to_array(r.as_bytes())).is_ok());
    }
}

/// Every request check on `body`; what a check accepts must obey the rule it enforces.
fn requests(body: &[u8], fds: usize) {
    const MAX_XFER: u32 = 4096;
    if let Ok(m) = request::dma_map(body, fds) {
        assert!(fds <= 1 && m.map.argsz >= 32 && m.map.flags & !3 == 0);
        assert_eq!(m.has_fd, fds == 1);
    }
    if let Ok(u) = request::dma_unmap(body, fds) {
        assert_eq!(fds, 0);
        assert!(!u.all || (u.unmap.address == 0 && u.unmap.size == 0 && u.bitmap.is_none()));
        let dirty = u.unmap.flags & wire::DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0;
        assert_eq!(u.bitmap.is_some(), dirty);
    }
    if let Ok(a) = request::region_read(body, fds, MAX_XFER) {
        assert!(fds == 0 && a.count <= MAX_XFER);
    }
    if let Ok((a, data)) = request::region_write(body, fds, MAX_XFER) {
        assert!(fds == 0 && a.count <= MAX_XFER && data.len() == a.count as usize);
    }
    if let Ok((m, writes)) = request::write_multi(body, fds) {
        assert_eq!(writes.len() as u64, m.wr_cnt);
        assert!(writes.len() <= wire::WRITE_MULTI_MAX);
        assert!(writes
            .iter()
            .all(|w| w.count as usize <= wire::WRITE_MULTI_DATA));
    }
    if let Ok(f) = request::device_feature(body, fds) {
        let both = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_SET;
        assert!(f.probe || f.ops != both);
        assert_eq!(f.feature, f.request.flags & wire::DEVICE_FEATURE_MASK);
        if let Ok((ctl, ranges)) = request::dma_logging_start(f.data) {
            assert!(ctl.page_size.is_power_of_two());
            assert_eq!(ranges.len(), ctl.num_ranges as usize);
            assert!(ctl.num_ranges <= request::MAX_LOGGING_RANGES);
        }
    }
    if let Ok(m) = request::mig_data_read(body, fds, MAX_XFER) {
        assert!(m.size <= MAX_XFER && m.argsz as usize >= 8 + m.size as usize);
    }
    if let Ok((m, data)) = request::mig_data_write(body, fds, MAX_XFER) {
        assert!(m.size <= MAX_XFER && data.len() == m.size as usize);
    }
}

fn to_array(b: &[u8]) -> [u8; HEADER_SIZE] {
    let mut a = [0u8; HEADER_SIZE];
    a.copy_from_slice(b);
    a
}

fn split<T: FromBytes + IntoBytes + KnownLayout + Immutable>(body: &[u8]) {
    let size = wire::size_of::<T>();
    match wire::split::<T>(body, "fuzz") {
        Ok((v, tail)) => {
            assert!(body.len() >= size, "split accepted a short body");
            assert_eq!(
                v.as_bytes(),
                &body[..size],
                "split changed the struct's bytes"
            );
            assert_eq!(tail, &body[size..], "split lost or kept the wrong tail");
        }
        Err(_) => assert!(body.len() < size, "split refused a long enough body"),
    }
}

fn capabilities(tail: &[u8]) {
    let Ok(caps) = Capabilities::parse(tail) else {
        return;
    };
    let text = caps.to_wire();
    assert_eq!(text.last(), Some(&0), "to_wire must NUL-terminate");
    match Capabilities::parse(&text) {
        Ok(back) => assert_eq!(back, caps, "capabilities changed through to_wire"),
        Err(e) => panic!("to_wire output does not parse: {e}"),
    }
}
