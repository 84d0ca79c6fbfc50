//! Why a request failed (answered with an errno) and why a session ended.

use rustix::io::Errno;
use umdev_dma::DmaError;
use umdev_pci::DeviceError;
use umdev_proto::ProtoError;
use umdev_transport::TransportError;

/// A request that gets an error reply. None of these ends the session.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The message is malformed or breaks a negotiated limit.
    #[error("Malformed request")]
    Proto(#[from] ProtoError),
    /// The device model refused it.
    #[error("Device refused the request")]
    Device(#[from] DeviceError),
    /// The address space refused it.
    #[error("DMA request failed")]
    Dma(#[from] DmaError),
    /// The request is valid but not possible now.
    #[error("{what}")]
    Refused {
        /// The errno to answer with.
        errno: Errno,
        /// Why, for the log.
        what: &'static str,
    },
}

impl RequestError {
    /// The errno the error reply carries.
    pub fn errno(&self) -> i32 {
        match self {
            RequestError::Proto(e) => e.errno(),
            RequestError::Device(e) => e.errno(),
            RequestError::Dma(e) => e.errno(),
            RequestError::Refused { errno, .. } => errno.raw_os_error(),
        }
    }
}

/// Shorthand for a [`RequestError::Refused`].
pub(crate) fn refuse(errno: Errno, what: &'static str) -> RequestError {
    RequestError::Refused { errno, what }
}

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The connection failed or lost framing.
    #[error("Connection failed")]
    Transport(#[from] TransportError),
    /// The client's VERSION could not be accepted; the connection was closed.
    #[error("Version negotiation failed")]
    Negotiation(#[source] RequestError),
    /// The device's `open` refused this client.
    #[error("Device refused to open")]
    OpenRefused(#[source] DeviceError),
    /// Accepting a connection or setting up the listener failed.
    #[error("Listener failed")]
    Listener(#[source] std::io::Error),
}
