//! The vfio-user wire codec: message layouts, validation and errno mapping.
//!
//! This crate is pure: bytes in, typed values out, and the reverse. It knows nothing of
//! sockets (see `umdev-transport`) or devices (see `umdev-server`).
//!
//! A message is a 16-byte [`Header`] followed by a command-specific body whose fixed part
//! is one of the structs in [`wire`]. Parsing goes header first, then body:
//!
//! ```
//! use umdev_proto::{wire, Command, Header, HEADER_SIZE};
//! use zerocopy::IntoBytes;
//!
//! // A REGION_READ of 4 bytes at offset 0x10 of region 0, as a client would send it.
//! let access = wire::RegionAccess { offset: 0x10, region: 0, count: 4 };
//! let header = Header::command(1, Command::RegionRead, access.as_bytes().len()).unwrap();
//! let msg = umdev_proto::encode(&header, &[access.as_bytes()]);
//!
//! // The server side: header first, then the body.
//! let parsed = Header::parse(msg[..HEADER_SIZE].try_into().unwrap()).unwrap();
//! assert_eq!(parsed.known_command(), Some(Command::RegionRead));
//! let (req, data) = wire::split::<wire::RegionAccess>(&msg[HEADER_SIZE..], "region access").unwrap();
//! assert_eq!((req.offset, req.count), (0x10, 4));
//! assert!(data.is_empty());
//! ```
#![warn(missing_docs)]

mod error;
mod header;
pub mod request;
mod version;
pub mod wire;

pub use error::ProtoError;
pub use header::{
    Command, Header, FLAGS_KNOWN, FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_MASK,
    FLAG_TYPE_REPLY, HEADER_SIZE,
};
pub use version::{
    Capabilities, MigrationCaps, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS, DEFAULT_PGSIZES, MAJOR, MAX_MAX_MSG_FDS, MAX_MINOR,
};

/// Bytes a message may carry beyond `max_data_xfer_size`: the largest fixed part of any
/// command plus REGION_WRITE_MULTI's 200 entries, rounded up.
pub const MESSAGE_OVERHEAD: usize = 8192;

/// The largest body this side accepts when it announced `max_data_xfer_size`.
pub fn max_body_len(max_data_xfer_size: u32) -> usize {
    (max_data_xfer_size as usize).saturating_add(MESSAGE_OVERHEAD)
}

/// Concatenates a header and body parts into one message buffer.
pub fn encode(header: &Header, parts: &[&[u8]]) -> Vec<u8> {
    use zerocopy::IntoBytes;
    let len = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(header.as_bytes());
    for p in parts {
        buf.extend_from_slice(p);
    }
    buf
}
