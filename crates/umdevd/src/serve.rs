//! Serving each mdev on a vfio-user socket of its own, `<sockets_dir>/<uuid>.sock`, with
//! the configured mode and owner, by a server in a thread of its own.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use umdev_core::{MdevUuid, Serve, Served};
use umdev_pci::PciFunction;
use umdev_server::{Server, ServerConfig, Stopper};

/// The server threads poll and hand over to a session thread; they need little stack.
const SERVER_STACK: usize = 256 << 10;

pub struct SocketServe {
    pub dir: PathBuf,
    pub mode: u32,
    pub owner: Option<(u32, Option<u32>)>,
    pub server: ServerConfig,
}

struct SocketServed {
    path: PathBuf,
    stopper: Stopper,
    thread: Option<JoinHandle<()>>,
}

impl SocketServe {
    fn bind(&self, path: &Path) -> std::io::Result<UnixListener> {
        // A socket left by an earlier run of this daemon (we hold the state lock).
        if std::fs::symlink_metadata(path).is_ok() {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let setup = || -> std::io::Result<()> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode))?;
            if let Some((uid, gid)) = self.owner {
                rustix::fs::chown(
                    path,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    gid.map(rustix::fs::Gid::from_raw),
                )?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(listener)
    }
}

impl Serve for SocketServe {
    fn start(&self, uuid: &MdevUuid, function: PciFunction) -> std::io::Result<Box<dyn Served>> {
        let path = self.dir.join(format!("{uuid}.sock"));
        let listener = self.bind(&path)?;
        let server = Server::new(function, self.server.clone()).map_err(std::io::Error::other)?;
        let stopper = server.stopper();
        let name = format!("umdev-{}", &uuid.to_string()[..8]);
        let thread = std::thread::Builder::new()
            .name(name)
            .stack_size(SERVER_STACK)
            .spawn(move || {
                if let Err(e) = server.serve(listener) {
                    tracing::warn!(error = %e, "vfio-user server stopped with an error");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        Ok(Box::new(SocketServed {
            path,
            stopper,
            thread: Some(thread),
        }))
    }
}

impl Served for SocketServed {
    fn socket(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn stop(mut self: Box<Self>) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!(path = %self.path.display(), "a vfio-user server thread panicked");
            }
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a socket");
        }
    }
}
