//! The core's errors, each with the errno the kernel's mdev ABI gives for it.

use rustix::io::Errno;

use crate::MdevUuid;

/// Why a core operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// Malformed UUID or value (EINVAL).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The UUID is already an mdev, under any parent (EEXIST).
    #[error("mdev {0} already exists")]
    Exists(MdevUuid),
    /// A parent of that name is already registered (EEXIST).
    #[error("parent {0} is already registered")]
    ParentExists(String),
    /// Nothing of that type can be created now (ENOSPC, as the kernel samples return).
    #[error("no instance of {type_id} is available on {parent}")]
    NoSpace {
        /// The parent.
        parent: String,
        /// The type id.
        type_id: String,
    },
    /// No such parent, or it is unregistering (ENODEV).
    #[error("parent {0} is not registered")]
    NoParent(String),
    /// No such type under the parent (ENOENT).
    #[error("parent {parent} has no type {type_id}")]
    NoType {
        /// The parent.
        parent: String,
        /// The type id.
        type_id: String,
    },
    /// No such mdev (ENODEV).
    #[error("no mdev {0}")]
    NoDevice(MdevUuid),
    /// The mdev is being removed already (EAGAIN).
    #[error("mdev {0} is being removed")]
    Removing(MdevUuid),
    /// A client holds the device (or a device involved) and it cannot be unplugged (EBUSY).
    #[error("{0} is in use")]
    Busy(String),
    /// No such attribute (ENOENT).
    #[error("no attribute {0}")]
    NoAttribute(String),
    /// The attribute is read-only (EACCES).
    #[error("attribute {0} is read-only")]
    ReadOnly(String),
    /// The parent driver failed, with this errno.
    #[error("the parent driver failed: {message}")]
    Driver {
        /// The errno to report.
        errno: Errno,
        /// What failed.
        message: String,
    },
    /// The device could not be served (its socket could not be set up).
    #[error("cannot serve mdev {uuid}")]
    Serve {
        /// The mdev.
        uuid: MdevUuid,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl CoreError {
    /// The errno a sysfs write gets for this error.
    pub fn errno(&self) -> Errno {
        match self {
            CoreError::Invalid(_) => Errno::INVAL,
            CoreError::Exists(_) | CoreError::ParentExists(_) => Errno::EXIST,
            CoreError::NoSpace { .. } => Errno::NOSPC,
            CoreError::NoParent(_) | CoreError::NoDevice(_) => Errno::NODEV,
            CoreError::NoType { .. } | CoreError::NoAttribute(_) => Errno::NOENT,
            CoreError::Removing(_) => Errno::AGAIN,
            CoreError::Busy(_) => Errno::BUSY,
            CoreError::ReadOnly(_) => Errno::ACCESS,
            CoreError::Driver { errno, .. } => *errno,
            CoreError::Serve { source, .. } => source
                .raw_os_error()
                .map(Errno::from_raw_os_error)
                .unwrap_or(Errno::IO),
        }
    }
}
