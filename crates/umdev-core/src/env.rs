//! Where a device lives on the host: its own directory, holding its vfio-user socket and
//! its host-side sockets, with one owner and mode for all of them.
//!
//! The daemon's layout is `<sockets_dir>/<uuid>/`: the vfio-user socket is
//! [`VFIO_USER_SOCKET`] in it, and a parent puts its device's host-side sockets beside it
//! with [`DeviceEnv::bind`] (mtty: `port0.sock`, `port1.sock`). The directory can be handed
//! to one VM (a container mount) without exposing another device.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use umdev_transport::SocketPolicy;

use crate::MdevUuid;

/// The name of a device's vfio-user socket in its directory.
pub const VFIO_USER_SOCKET: &str = "vfio-user.sock";

/// A device's place on the host, given to [`Parent::build`](crate::Parent::build).
///
/// It keeps (a duplicate of) every socket bound through it, by name, so that a live upgrade
/// can hand the same listening sockets to the device's next process, whose `bind` of the
/// name then returns the socket it inherited instead of binding a new one: clients and
/// people connecting during the upgrade wait in its backlog, nothing is refused.
#[derive(Clone, Debug)]
pub struct DeviceEnv {
    uuid: MdevUuid,
    dir: Option<PathBuf>,
    policy: SocketPolicy,
    /// The sockets bound (or inherited) through this environment, by name.
    sockets: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
    /// Sockets handed over by the device's previous process, not yet asked for.
    inherited: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DeviceEnv {
    /// The environment of device `uuid`: its directory (if it has one) and the policy its
    /// sockets are bound with.
    pub fn new(uuid: MdevUuid, dir: Option<PathBuf>, policy: SocketPolicy) -> DeviceEnv {
        DeviceEnv {
            uuid,
            dir,
            policy,
            sockets: Arc::default(),
            inherited: Arc::default(),
        }
    }

    /// This environment, with the listening sockets a previous process of the device bound
    /// (by name, as [`sockets`](Self::sockets) gave them): [`bind`](Self::bind) returns them.
    pub fn inherit(self, sockets: Vec<(String, OwnedFd)>) -> DeviceEnv {
        lock(&self.inherited).extend(sockets);
        self
    }

    /// Duplicates of the listening sockets bound (or inherited) through this environment,
    /// by name.
    pub fn sockets(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        lock(&self.sockets)
            .iter()
            .map(|(n, fd)| Ok((n.clone(), fd.try_clone()?)))
            .collect()
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

    /// Binds a listening socket `name` in the device's directory with the device's policy
    /// (or returns the one inherited under `name`). ENOTDIR when the device has no
    /// directory.
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
        let inherited = lock(&self.inherited).remove(name);
        let listener = match inherited {
            Some(fd) => UnixListener::from(fd),
            None => umdev_transport::listen::bind(&path, &self.policy)?,
        };
        lock(&self.sockets).insert(name.to_owned(), OwnedFd::from(listener.try_clone()?));
        Ok((listener, path))
    }
}
