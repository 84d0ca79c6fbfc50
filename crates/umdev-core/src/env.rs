//! Where a device lives on the host: its own directory, holding its vfio-user socket and
//! its host-side sockets, with one owner and mode for all of them.
//!
//! The daemon's layout is `<sockets_dir>/<uuid>/`: the vfio-user socket is
//! [`VFIO_USER_SOCKET`] in it, and a parent puts its device's host-side sockets beside it
//! with [`DeviceEnv::bind`] (mtty: `port0.sock`, `port1.sock`). The directory can be handed
//! to one VM (a container mount) without exposing another device.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use umdev_transport::SocketPolicy;

use crate::MdevUuid;

/// The name of a device's vfio-user socket in its directory.
pub const VFIO_USER_SOCKET: &str = "vfio-user.sock";

/// A device's place on the host, given to [`Parent::build`](crate::Parent::build).
#[derive(Clone, Debug)]
pub struct DeviceEnv {
    uuid: MdevUuid,
    dir: Option<PathBuf>,
    policy: SocketPolicy,
}

impl DeviceEnv {
    /// The environment of device `uuid`: its directory (if it has one) and the policy its
    /// sockets are bound with.
    pub fn new(uuid: MdevUuid, dir: Option<PathBuf>, policy: SocketPolicy) -> DeviceEnv {
        DeviceEnv { uuid, dir, policy }
    }

    /// An environment without a directory (devices kept in-process, tests).
    pub fn detached(uuid: MdevUuid) -> DeviceEnv {
        DeviceEnv::new(uuid, None, SocketPolicy::default())
    }

    /// The device.
    pub fn uuid(&self) -> &MdevUuid {
        &self.uuid
    }

    /// The device's directory, if it has one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// How the device's sockets are bound (mode, owner).
    pub fn policy(&self) -> &SocketPolicy {
        &self.policy
    }

    /// The path of `name` in the device's directory.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(name))
    }

    /// Binds a listening socket `name` in the device's directory with the device's policy.
    /// ENOTDIR when the device has no directory.
    pub fn bind(&self, name: &str) -> std::io::Result<(UnixListener, PathBuf)> {
        let path = self.path(name).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!(
                    "device {} has no directory for host-side sockets",
                    self.uuid
                ),
            )
        })?;
        let listener = umdev_transport::listen::bind(&path, &self.policy)?;
        Ok((listener, path))
    }
}
