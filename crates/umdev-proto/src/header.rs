//! The 16-byte header that starts every vfio-user message.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::ProtoError;

/// Size of [`Header`] on the wire.
pub const HEADER_SIZE: usize = 16;
const HEADER_SIZE_U32: u32 = 16;

/// Message type bits of [`Header::flags`]: a command.
pub const FLAG_TYPE_COMMAND: u32 = 0x0;
/// Message type bits of [`Header::flags`]: a reply.
pub const FLAG_TYPE_REPLY: u32 = 0x1;
/// Mask of the message type bits.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// The sender of a command wants no reply.
pub const FLAG_NO_REPLY: u32 = 0x10;
/// A reply reports an error; [`Header::error`] holds the errno.
pub const FLAG_ERROR: u32 = 0x20;
/// Every flag bit this version of the protocol defines.
pub const FLAGS_KNOWN: u32 = FLAG_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR;

/// The vfio-user message header, in host byte order as the spec says.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Header {
    /// Chosen by the sender of a command and echoed in its reply.
    pub msg_id: u16,
    /// The command ([`Command`] when known).
    pub command: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// Type, No_reply and Error bits.
    pub flags: u32,
    /// Errno of a failed command, in replies with [`FLAG_ERROR`].
    pub error: u32,
}

impl Header {
    /// Parses a header and checks what can be checked without knowing the command:
    /// the size covers the header itself and the flags name a known message type.
    ///
    /// A failure here means framing is lost: the connection cannot continue.
    pub fn parse(bytes: &[u8; HEADER_SIZE]) -> Result<Header, ProtoError> {
        let header = Header::read_from_bytes(bytes).map_err(|_| ProtoError::Truncated {
            what: "header",
            need: HEADER_SIZE,
            got: bytes.len(),
        })?;
        if (header.msg_size as usize) < HEADER_SIZE {
            return Err(ProtoError::BadMessageSize {
                size: header.msg_size,
            });
        }
        Ok(header)
    }

    /// A command header for a message with `body_len` bytes after the header.
    pub fn command(msg_id: u16, command: Command, body_len: usize) -> Result<Header, ProtoError> {
        Ok(Header {
            msg_id,
            command: command as u16,
            msg_size: message_size(body_len)?,
            flags: FLAG_TYPE_COMMAND,
            error: 0,
        })
    }

    /// The success reply to `self`, carrying `body_len` bytes.
    pub fn reply(&self, body_len: usize) -> Result<Header, ProtoError> {
        Ok(Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: message_size(body_len)?,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        })
    }

    /// The error reply to `self`: a bare header with the Error bit and `errno`.
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            msg_id: self.msg_id,
            command: self.command,
            msg_size: HEADER_SIZE_U32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: u32::try_from(errno).unwrap_or(0),
        }
    }

    /// Bytes after the header, as the header announces them.
    pub fn body_len(&self) -> usize {
        (self.msg_size as usize).saturating_sub(HEADER_SIZE)
    }

    /// True for a reply message.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY
    }

    /// True for a command message.
    pub fn is_command(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_COMMAND
    }

    /// True if the sender of this command wants no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// The errno of an error reply, if this is one.
    pub fn error(&self) -> Option<i32> {
        (self.flags & FLAG_ERROR != 0).then(|| i32::try_from(self.error).unwrap_or(i32::MAX))
    }

    /// The command, if it is one this crate knows.
    pub fn known_command(&self) -> Option<Command> {
        Command::from_u16(self.command)
    }
}

fn message_size(body_len: usize) -> Result<u32, ProtoError> {
    body_len
        .checked_add(HEADER_SIZE)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(ProtoError::TooLarge {
            size: body_len,
            max: u32::MAX as usize - HEADER_SIZE,
        })
}

/// The commands of the vfio-user protocol, numbered as in the spec.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// Version and capability negotiation; the first message of a session.
    Version = 1,
    /// The client makes a range of its memory available for DMA.
    DmaMap = 2,
    /// The client takes a DMA range back.
    DmaUnmap = 3,
    /// Flags and numbers of regions and interrupt types.
    DeviceGetInfo = 4,
    /// Size, flags and capabilities of one region.
    DeviceGetRegionInfo = 5,
    /// ioeventfd/ioregionfd sub-regions of one region.
    DeviceGetRegionIoFds = 6,
    /// Count and flags of one interrupt type.
    DeviceGetIrqInfo = 7,
    /// Eventfds, masks and triggers of an interrupt type.
    DeviceSetIrqs = 8,
    /// Reads from a device region.
    RegionRead = 9,
    /// Writes to a device region.
    RegionWrite = 10,
    /// Server to client: read client memory by message.
    DmaRead = 11,
    /// Server to client: write client memory by message.
    DmaWrite = 12,
    /// Resets the device.
    DeviceReset = 13,
    /// Up to 200 small region writes in one message.
    RegionWriteMulti = 15,
    /// Probes, gets or sets a device feature (migration, DMA logging).
    DeviceFeature = 16,
    /// Reads migration data from a saving device.
    MigDataRead = 17,
    /// Writes migration data to a resuming device.
    MigDataWrite = 18,
}

impl Command {
    /// The command numbered `value`, if the protocol defines it.
    pub fn from_u16(value: u16) -> Option<Command> {
        Some(match value {
            1 => Command::Version,
            2 => Command::DmaMap,
            3 => Command::DmaUnmap,
            4 => Command::DeviceGetInfo,
            5 => Command::DeviceGetRegionInfo,
            6 => Command::DeviceGetRegionIoFds,
            7 => Command::DeviceGetIrqInfo,
            8 => Command::DeviceSetIrqs,
            9 => Command::RegionRead,
            10 => Command::RegionWrite,
            11 => Command::DmaRead,
            12 => Command::DmaWrite,
            13 => Command::DeviceReset,
            15 => Command::RegionWriteMulti,
            16 => Command::DeviceFeature,
            17 => Command::MigDataRead,
            18 => Command::MigDataWrite,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(h: &Header) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b.copy_from_slice(h.as_bytes());
        b
    }

    #[test]
    fn header_round_trips_through_bytes() {
        let h = Header::command(7, Command::RegionRead, 16).unwrap();
        assert_eq!(Header::parse(&bytes(&h)).unwrap(), h);
        assert_eq!(h.msg_size, 32);
        assert!(h.is_command());
    }

    #[test]
    fn size_smaller_than_header_loses_framing() {
        let mut h = Header::command(1, Command::Version, 0).unwrap();
        h.msg_size = 15;
        assert!(matches!(
            Header::parse(&bytes(&h)),
            Err(ProtoError::BadMessageSize { size: 15 })
        ));
    }

    #[test]
    fn error_reply_carries_errno_and_echoes_id() {
        let h = Header::command(42, Command::DmaMap, 32).unwrap();
        let r = h.error_reply(22);
        assert_eq!(r.msg_id, 42);
        assert!(r.is_reply());
        assert_eq!(r.error(), Some(22));
        assert_eq!(r.body_len(), 0);
    }

    #[test]
    fn unknown_command_numbers_are_not_commands() {
        for n in [0u16, 14, 19, u16::MAX] {
            assert_eq!(Command::from_u16(n), None);
        }
        for n in (1u16..=18).filter(|n| *n != 14) {
            assert_eq!(Command::from_u16(n).map(|c| c as u16), Some(n));
        }
    }
}
