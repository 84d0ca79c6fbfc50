//! Client errors.

use umdev_proto::ProtoError;
use umdev_transport::TransportError;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error reply.
    #[error("Server refused {command} with errno {errno}")]
    Remote {
        /// The command number that failed.
        command: u16,
        /// The errno in the error reply.
        errno: i32,
    },
    /// The connection failed.
    #[error("Connection failed")]
    Transport(#[from] TransportError),
    /// The server sent something malformed.
    #[error("Malformed reply")]
    Proto(#[from] ProtoError),
    /// A reply that does not fit the request (wrong command, short body).
    #[error("Unexpected reply: {0}")]
    Unexpected(&'static str),
    /// Connecting failed.
    #[error("Cannot connect")]
    Connect(#[source] std::io::Error),
}

impl ClientError {
    /// The server's errno, if this is an error reply.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Remote { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
