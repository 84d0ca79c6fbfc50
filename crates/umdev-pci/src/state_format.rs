//! The device-state stream that MIG_DATA_READ hands out and MIG_DATA_WRITE takes in: a
//! sequence of self-describing, checksummed records, so that a daemon can load an older
//! device's state, or refuse a stream with a clear reason, before touching the device.
//!
//! One record (little-endian):
//!
//! ```text
//!  0  magic           "UMDV"
//!  4  format          u16   FORMAT_VERSION (the layout of this header and of the fields)
//!  6  kind            u16   1 = pre-copy snapshot, 2 = final state, 3 = data chunk
//!  8  device version  u32   the parent driver's own state version
//! 12  type length     u16   at most 255
//! 14  reserved        u16   0
//! 16  payload length  u32   at most MAX_PAYLOAD
//! 20  device type     UTF-8, "type length" bytes
//!     payload         fields: tag u16, length u32, bytes; in any order, repeatable
//!     crc32           u32   CRC-32 (IEEE) of everything above
//! ```
//!
//! A saving device writes one snapshot record when PRE_COPY begins and one final record at
//! STOP_COPY; the loader checks every record and loads the last, which must be final. A
//! device with bulk data (a disk's blocks) also streams chunk records, during PRE_COPY and
//! at STOP_COPY before the final record; the loader hands each to the device as it arrives
//! (nothing of it is buffered) and they do not count as the last record. A device reads its
//! fields by tag, so fields it does not know (written by a newer version) are skipped and
//! fields an older version did not write can take defaults.

use crate::migration::MigrationSpec;

/// The record magic.
pub const MAGIC: [u8; 4] = *b"UMDV";
/// The record layout written by this code.
pub const FORMAT_VERSION: u16 = 1;
/// The most payload one record may carry.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Size of the fixed record header.
pub const HEADER_LEN: usize = 20;
const KIND_PRECOPY: u16 = 1;
const KIND_FINAL: u16 = 2;
const KIND_CHUNK: u16 = 3;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordKind {
    /// The state when PRE_COPY began (not loaded).
    PreCopy,
    /// The state at STOP_COPY: what the destination loads.
    Final,
    /// A piece of the device's bulk data, loaded as it arrives.
    Chunk,
}

/// Why a stream (or a device's fields) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The data does not start with a record.
    #[error("not a umdev device state (bad magic)")]
    BadMagic,
    /// A record layout this daemon does not know.
    #[error("state record format {0} is not supported (this daemon reads format 1)")]
    UnsupportedFormat(u16),
    /// A record kind this daemon does not know.
    #[error("unknown state record kind {0}")]
    UnknownKind(u16),
    /// The state was saved by another kind of device.
    #[error("the state is of device type {found:?}, this device is {expected:?}")]
    WrongDevice {
        /// This device's type.
        expected: String,
        /// The stream's.
        found: String,
    },
    /// The state was saved by a newer parent driver.
    #[error("device state version {found} is newer than this daemon's {newest}")]
    VersionTooNew {
        /// The stream's version.
        found: u32,
        /// The newest this daemon loads.
        newest: u32,
    },
    /// The state was saved by a parent driver older than this daemon still loads.
    #[error("device state version {found} is older than the oldest this daemon loads ({oldest})")]
    VersionTooOld {
        /// The stream's version.
        found: u32,
        /// The oldest this daemon loads.
        oldest: u32,
    },
    /// The stream ends inside a record.
    #[error("the state stream is truncated")]
    Truncated,
    /// A record's checksum does not match its bytes.
    #[error("state record checksum mismatch")]
    Checksum,
    /// A header field is out of range.
    #[error("state record header is malformed: {0}")]
    Malformed(&'static str),
    /// The stream has no final record (it was cut after a pre-copy snapshot).
    #[error("the state stream has no final record")]
    NoFinal,
    /// A field the device needs is missing.
    #[error("device state field {0} is missing")]
    MissingField(u16),
    /// A field has the wrong size or an impossible value.
    #[error("device state field {tag} is invalid: {why}")]
    BadField {
        /// The field's tag.
        tag: u16,
        /// What is wrong.
        why: &'static str,
    },
}

/// CRC-32 (IEEE 802.3, reflected), the checksum of every record.
// The casts take the low byte on purpose (table index, table built from 0..256).
#[allow(clippy::cast_possible_truncation)]
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[usize::from((c as u8) ^ b)] ^ (c >> 8);
    }
    !c
}

/// Where a device writes its state: tagged fields.
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// A field of raw bytes (fields longer than 4 GiB cannot exist: the payload is smaller).
    pub fn bytes(&mut self, tag: u16, data: &[u8]) -> &mut Self {
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.buf.extend_from_slice(&tag.to_le_bytes());
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(data);
        self
    }

    /// A one-byte field.
    pub fn u8(&mut self, tag: u16, v: u8) -> &mut Self {
        self.bytes(tag, &[v])
    }

    /// A boolean field (one byte, 0 or 1).
    pub fn bool(&mut self, tag: u16, v: bool) -> &mut Self {
        self.bytes(tag, &[u8::from(v)])
    }

    /// A 32-bit field.
    pub fn u32(&mut self, tag: u16, v: u32) -> &mut Self {
        self.bytes(tag, &v.to_le_bytes())
    }

    /// A 64-bit field.
    pub fn u64(&mut self, tag: u16, v: u64) -> &mut Self {
        self.bytes(tag, &v.to_le_bytes())
    }

    /// The payload so far.
    pub fn into_payload(self) -> Vec<u8> {
        self.buf
    }
}

/// A device's fields, parsed and bounds-checked before the device sees them.
#[derive(Debug)]
pub struct StateReader<'a> {
    fields: Vec<(u16, &'a [u8])>,
}

impl<'a> StateReader<'a> {
    /// Parses a payload; every field must lie within it.
    pub fn parse(mut payload: &'a [u8]) -> Result<Self, StreamError> {
        let mut fields = Vec::new();
        while !payload.is_empty() {
            if payload.len() < 6 {
                return Err(StreamError::Truncated);
            }
            let tag = u16::from_le_bytes([payload[0], payload[1]]);
            let len = u32::from_le_bytes([payload[2], payload[3], payload[4], payload[5]]);
            let len = usize::try_from(len).map_err(|_| StreamError::Truncated)?;
            let rest = &payload[6..];
            if rest.len() < len {
                return Err(StreamError::Truncated);
            }
            fields.push((tag, &rest[..len]));
            payload = &rest[len..];
        }
        Ok(Self { fields })
    }

    /// The last field with `tag`, if any.
    pub fn get(&self, tag: u16) -> Option<&'a [u8]> {
        self.fields
            .iter()
            .rev()
            .find(|(t, _)| *t == tag)
            .map(|(_, d)| *d)
    }

    /// Every field with `tag`, in order.
    pub fn all(&self, tag: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.fields
            .iter()
            .filter(move |(t, _)| *t == tag)
            .map(|(_, d)| *d)
    }

    /// A field that must be present.
    pub fn bytes(&self, tag: u16) -> Result<&'a [u8], StreamError> {
        self.get(tag).ok_or(StreamError::MissingField(tag))
    }

    fn fixed<const N: usize>(&self, tag: u16) -> Result<[u8; N], StreamError> {
        self.bytes(tag)?
            .try_into()
            .map_err(|_| StreamError::BadField {
                tag,
                why: "wrong size",
            })
    }

    /// A one-byte field.
    pub fn u8(&self, tag: u16) -> Result<u8, StreamError> {
        Ok(self.fixed::<1>(tag)?[0])
    }

    /// A boolean field.
    pub fn bool(&self, tag: u16) -> Result<bool, StreamError> {
        match self.u8(tag)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StreamError::BadField {
                tag,
                why: "not a boolean",
            }),
        }
    }

    /// A 32-bit field.
    pub fn u32(&self, tag: u16) -> Result<u32, StreamError> {
        self.fixed::<4>(tag).map(u32::from_le_bytes)
    }

    /// A 64-bit field.
    pub fn u64(&self, tag: u16) -> Result<u64, StreamError> {
        self.fixed::<8>(tag).map(u64::from_le_bytes)
    }
}

/// Builds a record of `payload` for the device described by `spec`.
pub(crate) fn encode_record(spec: &MigrationSpec, kind: RecordKind, payload: &[u8]) -> Vec<u8> {
    let ty = spec.device_type.as_bytes();
    let ty = &ty[..ty.len().min(255)];
    let mut out = Vec::with_capacity(HEADER_LEN + ty.len() + payload.len() + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let kind = match kind {
        RecordKind::PreCopy => KIND_PRECOPY,
        RecordKind::Final => KIND_FINAL,
        RecordKind::Chunk => KIND_CHUNK,
    };
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&spec.version.to_le_bytes());
    out.extend_from_slice(&u16::try_from(ty.len()).unwrap_or(255).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(ty);
    out.extend_from_slice(payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A record header, checked against the loading device.
struct Header {
    kind: RecordKind,
    version: u32,
    type_len: usize,
    payload_len: usize,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks the header at the start of `data` (at least [`HEADER_LEN`] bytes) and, once
/// present, its device type.
fn check_header(data: &[u8], spec: &MigrationSpec) -> Result<Header, StreamError> {
    if data[..4] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let format = le16(data, 4);
    if format != FORMAT_VERSION {
        return Err(StreamError::UnsupportedFormat(format));
    }
    let kind = match le16(data, 6) {
        KIND_PRECOPY => RecordKind::PreCopy,
        KIND_FINAL => RecordKind::Final,
        KIND_CHUNK => RecordKind::Chunk,
        k => return Err(StreamError::UnknownKind(k)),
    };
    let version = le32(data, 8);
    let type_len = usize::from(le16(data, 12));
    if type_len > 255 || le16(data, 14) != 0 {
        return Err(StreamError::Malformed("type length or reserved field"));
    }
    let payload_len = usize::try_from(le32(data, 16)).unwrap_or(usize::MAX);
    if payload_len > MAX_PAYLOAD {
        return Err(StreamError::Malformed("payload larger than 64 MiB"));
    }
    if let Some(ty) = data.get(HEADER_LEN..HEADER_LEN + type_len) {
        if ty != spec.device_type.as_bytes() {
            return Err(StreamError::WrongDevice {
                expected: spec.device_type.clone(),
                found: String::from_utf8_lossy(ty).into_owned(),
            });
        }
    }
    if version > spec.version {
        return Err(StreamError::VersionTooNew {
            found: version,
            newest: spec.version,
        });
    }
    if version < spec.min_version {
        return Err(StreamError::VersionTooOld {
            found: version,
            oldest: spec.min_version,
        });
    }
    Ok(Header {
        kind,
        version,
        type_len,
        payload_len,
    })
}

/// Checks as much of the first record as has arrived: a stream for another device or an
/// unloadable version is refused as soon as its header is in.
pub(crate) fn check_prefix(data: &[u8], spec: &MigrationSpec) -> Result<(), StreamError> {
    if data.len() < HEADER_LEN {
        return if MAGIC.starts_with(&data[..data.len().min(4)]) {
            Ok(())
        } else {
            Err(StreamError::BadMagic)
        };
    }
    check_header(data, spec).map(|_| ())
}

/// A record as found in a stream: its kind, the device state version, its payload and its
/// length in the stream.
pub(crate) type Record<'a> = (RecordKind, u32, &'a [u8], usize);

/// A whole record at the start of `data`, checked (header and CRC). `None` while it is not
/// all there.
pub(crate) fn next_record<'a>(
    data: &'a [u8],
    spec: &MigrationSpec,
) -> Result<Option<Record<'a>>, StreamError> {
    if data.len() < HEADER_LEN {
        return if MAGIC.starts_with(&data[..data.len().min(4)]) {
            Ok(None)
        } else {
            Err(StreamError::BadMagic)
        };
    }
    let h = check_header(data, spec)?;
    let body_end = HEADER_LEN + h.type_len + h.payload_len;
    let Some(crc) = data.get(body_end..body_end + 4) else {
        return Ok(None);
    };
    if crc32(&data[..body_end]) != le32(crc, 0) {
        return Err(StreamError::Checksum);
    }
    Ok(Some((
        h.kind,
        h.version,
        &data[HEADER_LEN + h.type_len..body_end],
        body_end + 4,
    )))
}

/// Checks every record of a whole stream (chunks excepted: they are loaded as they arrive)
/// and returns the final state: its version and payload.
pub(crate) fn decode_stream<'a>(
    mut data: &'a [u8],
    spec: &MigrationSpec,
) -> Result<(u32, &'a [u8]), StreamError> {
    let mut last = None;
    while !data.is_empty() {
        let Some((kind, version, payload, len)) = next_record(data, spec)? else {
            return Err(StreamError::Truncated);
        };
        if kind != RecordKind::Chunk {
            last = Some((kind, version, payload));
        }
        data = &data[len..];
    }
    match last {
        Some((RecordKind::Final, version, payload)) => Ok((version, payload)),
        _ => Err(StreamError::NoFinal),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(version: u32) -> MigrationSpec {
        MigrationSpec {
            device_type: "umdev-test".into(),
            version,
            min_version: 1,
            flags: 0,
        }
    }

    #[test]
    fn records_arrive_in_pieces_and_chunks_are_not_the_last_record() {
        let s = spec(1);
        let mut stream = encode_record(&s, RecordKind::Chunk, b"chunk-1");
        stream.extend(encode_record(&s, RecordKind::Final, &payload()));
        stream.extend(encode_record(&s, RecordKind::Chunk, b"chunk-2"));
        let first = encode_record(&s, RecordKind::Chunk, b"chunk-1").len();
        for cut in 0..first {
            assert_eq!(next_record(&stream[..cut], &s), Ok(None), "cut at {cut}");
        }
        let (kind, version, data, len) = next_record(&stream, &s).unwrap().unwrap();
        assert_eq!((kind, version, len), (RecordKind::Chunk, 1, first));
        assert_eq!(data, b"chunk-1");
        // The final record stays the state loaded even with a chunk after it.
        assert_eq!(decode_stream(&stream, &s).unwrap().1, &payload()[..]);
        let only_chunks = encode_record(&s, RecordKind::Chunk, b"x");
        assert_eq!(decode_stream(&only_chunks, &s), Err(StreamError::NoFinal));
        let mut bad = stream.clone();
        bad[HEADER_LEN + 12] ^= 1;
        assert_eq!(next_record(&bad, &s), Err(StreamError::Checksum));
    }

    fn payload() -> Vec<u8> {
        let mut w = StateWriter::new();
        w.u8(1, 7)
            .u32(2, 0xdead_beef)
            .bytes(3, b"fifo")
            .bool(4, true);
        w.into_payload()
    }

    #[test]
    fn crc32_matches_the_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn round_trip_loads_the_last_final_record() {
        let s = spec(2);
        let mut stream = encode_record(&s, RecordKind::PreCopy, b"");
        stream.extend(encode_record(&s, RecordKind::Final, &payload()));
        let (v, p) = decode_stream(&stream, &s).unwrap();
        assert_eq!(v, 2);
        let r = StateReader::parse(p).unwrap();
        assert_eq!(r.u8(1).unwrap(), 7);
        assert_eq!(r.u32(2).unwrap(), 0xdead_beef);
        assert_eq!(r.bytes(3).unwrap(), b"fifo");
        assert!(r.bool(4).unwrap());
        assert_eq!(r.u64(9), Err(StreamError::MissingField(9)));
        assert!(matches!(r.u64(1), Err(StreamError::BadField { .. })));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let s = spec(1);
        let stream = encode_record(&s, RecordKind::Final, &payload());
        for cut in 0..stream.len() {
            assert!(decode_stream(&stream[..cut], &s).is_err(), "cut at {cut}");
        }
        for i in 0..stream.len() {
            let mut bad = stream.clone();
            bad[i] ^= 0x10;
            assert!(decode_stream(&bad, &s).is_err(), "byte {i}");
        }
    }

    #[test]
    fn older_versions_load_newer_and_other_devices_are_refused() {
        let old = encode_record(&spec(1), RecordKind::Final, &payload());
        assert_eq!(decode_stream(&old, &spec(3)).unwrap().0, 1);
        let new = encode_record(&spec(4), RecordKind::Final, &payload());
        assert_eq!(
            decode_stream(&new, &spec(3)),
            Err(StreamError::VersionTooNew {
                found: 4,
                newest: 3
            })
        );
        let mut other = spec(1);
        other.device_type = "umdev-mtty-1".into();
        let err =
            check_prefix(&encode_record(&other, RecordKind::Final, b""), &spec(1)).unwrap_err();
        assert!(matches!(err, StreamError::WrongDevice { .. }));
        assert_eq!(
            decode_stream(&encode_record(&spec(1), RecordKind::PreCopy, b""), &spec(1)),
            Err(StreamError::NoFinal)
        );
    }
}
