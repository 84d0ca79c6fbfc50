//! Serving each mdev on a vfio-user socket, by a server in a thread of its own.
//!
//! The daemon's layout ([`DirServe`]): a directory per device, `<sockets_dir>/<uuid>/`,
//! made with the device's socket policy (owner, and the mode with search permission where
//! it grants access), holding its vfio-user socket `vfio-user.sock` and whatever host-side
//! sockets its parent binds there. The one-device mode ([`PathServe`]) serves its single
//! device on a path given on the command line, its host-side sockets beside it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use umdev_core::{DeviceEnv, MdevUuid, Serve, Served, VFIO_USER_SOCKET};
use umdev_pci::{DisplayPlane, Errno, PciFunction};
use umdev_server::{HandOverCtl, Server, ServerConfig, Stopper, TakenOver};
use umdev_transport::{PolicyOverride, SocketPolicy, Stale};

/// The server threads poll and hand over to a session thread; they need little stack.
const SERVER_STACK: usize = 256 << 10;

/// A device served on a socket by a thread of its own.
pub(crate) struct SocketServed {
    path: PathBuf,
    stopper: Stopper,
    ctl: HandOverCtl,
    function: Arc<Mutex<PciFunction>>,
    stats: Arc<umdev_server::stats::Stats>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl SocketServed {
    /// Asks the server to hand its device over to another process (a live upgrade).
    pub(crate) fn hand_over_ctl(&self) -> &HandOverCtl {
        &self.ctl
    }
}

/// Starts a server for `function` on `listener` (bound at `path`) in a thread of its own.
pub(crate) fn serve_on(
    uuid: &MdevUuid,
    path: PathBuf,
    listener: UnixListener,
    function: PciFunction,
    config: &ServerConfig,
) -> std::io::Result<SocketServed> {
    let server = Server::new(function, config.clone()).map_err(std::io::Error::other)?;
    spawn_server(uuid, path, server, move |s| s.serve(listener))
}

/// Serves a device another process handed over (`taken`, by `server`) on its listening
/// socket, the handed-over client first.
pub(crate) fn serve_taken_over(
    uuid: &MdevUuid,
    path: PathBuf,
    listener: UnixListener,
    server: Server,
    taken: TakenOver,
) -> std::io::Result<SocketServed> {
    spawn_server(uuid, path, server, move |s| {
        s.serve_taken_over(listener, taken)
    })
}

fn spawn_server(
    uuid: &MdevUuid,
    path: PathBuf,
    server: Server,
    run: impl FnOnce(&Server) -> Result<(), umdev_server::ServerError> + Send + 'static,
) -> std::io::Result<SocketServed> {
    let stopper = server.stopper();
    let ctl = server.hand_over_ctl();
    let function = server.function().clone();
    let stats = server.stats().clone();
    let name = format!("umdev-{}", &uuid.to_string()[..8]);
    let thread = std::thread::Builder::new()
        .name(name)
        .stack_size(SERVER_STACK)
        .spawn(move || {
            if let Err(e) = run(&server) {
                tracing::warn!(
                    error = &e as &(dyn std::error::Error + 'static),
                    "vfio-user server stopped with an error"
                );
            }
        })?;
    Ok(SocketServed {
        path,
        stopper,
        ctl,
        function,
        stats,
        thread: Mutex::new(Some(thread)),
    })
}

impl Served for SocketServed {
    fn socket(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn stop(&self) {
        self.stopper.stop();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::warn!(path = %self.path.display(), "a vfio-user server thread panicked");
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a socket");
        }
    }

    fn metrics(&self, labels: &str) -> String {
        let mut out = String::new();
        self.stats.render(labels, &mut out);
        out
    }

    fn display_plane(&self) -> Result<DisplayPlane, Errno> {
        self.function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .display_plane()
            .map_err(|e| Errno::from_raw_os_error(e.errno()))
    }
}

/// The daemon's layout: a directory per device under `dir`.
pub struct DirServe {
    /// The sockets directory.
    pub dir: PathBuf,
    /// The policy of devices whose parent sets none of its own.
    pub policy: SocketPolicy,
    /// Parents with a policy of their own.
    pub parent_policies: Mutex<BTreeMap<String, SocketPolicy>>,
    /// Devices with something of their own over their parent's.
    pub device_policies: BTreeMap<MdevUuid, PolicyOverride>,
    /// The servers' tunables.
    pub server: ServerConfig,
}

impl DirServe {
    /// Gives parent `parent`'s devices `policy` from now on.
    pub fn set_parent_policy(&self, parent: &str, policy: SocketPolicy) {
        self.parent_policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(parent.to_owned(), policy);
    }

    fn policy_of(&self, parent: &str, uuid: &MdevUuid) -> SocketPolicy {
        let p = self
            .parent_policies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(parent)
            .copied()
            .unwrap_or(self.policy);
        match self.device_policies.get(uuid) {
            Some(o) => o.apply(p),
            None => p,
        }
    }
}

/// Makes `dir` with `policy`'s directory mode and owner; a directory left by an earlier run
/// (the caller holds the state lock) is removed first.
fn make_device_dir(dir: &Path, policy: &SocketPolicy) -> std::io::Result<()> {
    if std::fs::symlink_metadata(dir).is_ok() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir(dir)?;
    let setup = || -> std::io::Result<()> {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(policy.dir_mode()))?;
        policy.chown(dir)
    };
    setup().inspect_err(|_| {
        let _ = std::fs::remove_dir(dir);
    })
}

impl DirServe {
    /// A device's environment whose directory the daemon owns for now (a sealed worker,
    /// without capabilities, must be able to bind in it): the owner is given afterwards.
    pub fn env_for_worker(&self, parent: &str, uuid: &MdevUuid) -> std::io::Result<DeviceEnv> {
        let policy = self.policy_of(parent, uuid);
        let dir = self.dir.join(uuid.to_string());
        make_device_dir(
            &dir,
            &SocketPolicy {
                owner: None,
                ..policy
            },
        )?;
        Ok(DeviceEnv::new(*uuid, Some(dir), policy))
    }
}

impl Serve for DirServe {
    fn env(&self, parent: &str, uuid: &MdevUuid) -> std::io::Result<DeviceEnv> {
        let policy = self.policy_of(parent, uuid);
        let dir = self.dir.join(uuid.to_string());
        make_device_dir(&dir, &policy)?;
        Ok(DeviceEnv::new(*uuid, Some(dir), policy))
    }

    fn start(&self, env: &DeviceEnv, function: PciFunction) -> std::io::Result<Box<dyn Served>> {
        let (listener, path) = env.bind(VFIO_USER_SOCKET)?;
        Ok(Box::new(serve_on(
            env.uuid(),
            path,
            listener,
            function,
            &self.server,
        )?))
    }

    fn release(&self, env: &DeviceEnv) {
        if let Some(dir) = env.dir() {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a device's directory");
            }
        }
    }
}

/// The one-device mode: the device's socket is `socket`, its host-side sockets beside it.
pub struct PathServe {
    /// The vfio-user socket's path.
    pub socket: PathBuf,
    /// Mode and owner of the sockets.
    pub policy: SocketPolicy,
    /// The server's tunables.
    pub server: ServerConfig,
}

impl Serve for PathServe {
    fn env(&self, _parent: &str, uuid: &MdevUuid) -> std::io::Result<DeviceEnv> {
        let dir = self.socket.parent().map(Path::to_path_buf);
        Ok(DeviceEnv::new(*uuid, dir, self.policy))
    }

    fn start(&self, env: &DeviceEnv, function: PciFunction) -> std::io::Result<Box<dyn Served>> {
        let listener = umdev_transport::listen::bind(&self.socket, &self.policy)?;
        Ok(Box::new(serve_on(
            env.uuid(),
            self.socket.clone(),
            listener,
            function,
            &self.server,
        )?))
    }
}

/// The policy of a socket only the daemon's administrator uses (the control socket): 0600,
/// the daemon's owner; with the state lock held, a socket left at its path is stale.
pub fn private_policy() -> SocketPolicy {
    SocketPolicy {
        stale: Stale::Replace,
        mode: 0o600,
        owner: None,
    }
}

/// Gives device directory `dir` and the sockets in it a new owner and/or mode (the
/// directory's mode follows the sockets', as [`SocketPolicy::dir_mode`] makes it).
pub fn set_access(
    dir: &Path,
    owner: Option<(u32, Option<u32>)>,
    mode: Option<u32>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let policy = SocketPolicy {
        stale: Stale::Replace,
        mode: mode.unwrap_or(0),
        owner,
    };
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_socket() {
            continue;
        }
        if mode.is_some() {
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(policy.mode))?;
        }
        policy.chown(&e.path())?;
    }
    if mode.is_some() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(policy.dir_mode()))?;
    }
    policy.chown(dir)
}
