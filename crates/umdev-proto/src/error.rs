//! Protocol errors and the errno each one is answered with.

use rustix::io::Errno;

/// What is wrong with a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// A body or struct is shorter than its layout needs.
    #[error("{what} is truncated: {got} bytes, need {need}")]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Bytes the layout needs.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// The header's size field is smaller than the header: framing is lost.
    #[error("message size {size} is smaller than the header")]
    BadMessageSize {
        /// The size the header announced.
        size: u32,
    },
    /// A message larger than the negotiated limit.
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced size.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// A command number the protocol does not define.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// A command that only the other side may send.
    #[error("command {0:?} is not accepted in this direction")]
    WrongDirection(crate::Command),
    /// Flag bits this version does not define.
    #[error("unknown flag bits {0:#x}")]
    UnknownFlags(u32),
    /// More fds than the negotiated `max_msg_fds`, or fds where none belong.
    #[error("message carries {got} fds, at most {max} allowed")]
    TooManyFds {
        /// Fds received.
        got: usize,
        /// Fds allowed for this message.
        max: usize,
    },
    /// VERSION data that is not valid NUL-terminated JSON.
    #[error("bad version data: {0}")]
    BadVersionData(&'static str),
    /// A capability with the wrong type or an impossible value.
    #[error("capability {key} has a bad value")]
    BadCapability {
        /// The capability's name.
        key: &'static str,
    },
    /// A major version we do not speak.
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedVersion {
        /// Proposed major.
        major: u16,
        /// Proposed minor.
        minor: u16,
    },
    /// A field with a value the command does not allow.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// More items than a message may carry (logging ranges, sparse areas).
    #[error("too many {what}: at most {max}")]
    TooMany {
        /// What there are too many of.
        what: &'static str,
        /// The most allowed.
        max: usize,
    },
    /// A data transfer larger than the negotiated `max_data_xfer_size`.
    #[error("transfer of {count} bytes exceeds max_data_xfer_size {max}")]
    TransferTooLarge {
        /// Requested count.
        count: u64,
        /// The limit in force.
        max: u32,
    },
}

impl ProtoError {
    /// The errno an error reply carries for this error.
    pub fn errno(&self) -> i32 {
        let e = match self {
            ProtoError::Truncated { .. }
            | ProtoError::BadMessageSize { .. }
            | ProtoError::WrongDirection(_)
            | ProtoError::UnknownFlags(_)
            | ProtoError::TooManyFds { .. }
            | ProtoError::BadVersionData(_)
            | ProtoError::BadCapability { .. }
            | ProtoError::Invalid(_) => Errno::INVAL,
            ProtoError::TooLarge { .. }
            | ProtoError::TransferTooLarge { .. }
            | ProtoError::TooMany { .. } => Errno::TOOBIG,
            ProtoError::UnknownCommand(_) => Errno::NOSYS,
            ProtoError::UnsupportedVersion { .. } => Errno::NOTSUP,
        };
        e.raw_os_error()
    }

    /// True if the connection cannot go on after this error (framing is lost).
    pub fn is_fatal(&self) -> bool {
        matches!(self, ProtoError::BadMessageSize { .. })
    }
}
