//! umdev-sysfs: the kernel's mdev management ABI, served as a real filesystem (FUSE) from
//! the [`umdev_core::Core`], so that `mdevctl` and scripts written for `/sys` work against
//! umdev with `MDEVCTL_ENV_ROOT=<root>` and the tree mounted at `<root>/sys`:
//!
//! ```text
//! class/mdev_bus/<parent>                       -> ../../devices/umdev/<parent>
//! devices/umdev/<parent>/mdev_supported_types/<type>/
//!         create (WO) name description available_instances device_api (RO)
//!         devices/<uuid>                        -> ../../../<uuid>
//! devices/umdev/<parent>/<uuid>/
//!         remove (WO) vfio_user_socket state (RO) <vendor attributes>
//!         mdev_type                             -> ../mdev_supported_types/<type>
//!         iommu_group                           -> ../../../../kernel/iommu_groups/<n>
//! bus/mdev/devices/<uuid>                       -> ../../../devices/umdev/<parent>/<uuid>
//! kernel/iommu_groups/<n>/devices/<uuid>        -> ../../../../devices/umdev/<parent>/<uuid>
//! ```
//!
//! Writes act on the core synchronously and fail with the kernel's errnos; nothing is
//! cached, so `available_instances` and `devices/` always agree with the core. As on
//! sysfs, opening a read-only file for writing (or a write-only one for reading) fails with
//! EACCES even for root, an unknown name is ENOENT, and a new file cannot be created
//! (EACCES). Who may write follows the devices' socket policy ([`WriteAccess`]).
#![warn(missing_docs)]

mod access;
mod fs;
mod tree;

pub use access::{OnRefused, WriteAccess};

use std::path::{Path, PathBuf};

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use umdev_core::Core;

/// Why the tree could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// Mounting failed.
    #[error("cannot mount the sysfs tree at {path}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Unmounting failed.
    #[error("cannot unmount {path}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The mounted tree; dropping it unmounts.
pub struct SysfsMount {
    session: Option<BackgroundSession>,
    path: PathBuf,
}

impl std::fmt::Debug for SysfsMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SysfsMount")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SysfsMount {
    /// Mounts the tree of `core` at `path` (an existing directory) and serves it from a
    /// thread of its own. As root the mount is open to every user (`allow_other`), with
    /// the kernel checking the files' modes (`default_permissions`); `access` sets who may
    /// write (see [`WriteAccess`]).
    pub fn mount(core: Core, path: &Path, access: WriteAccess) -> Result<SysfsMount, SysfsError> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("umdev".into()),
            MountOption::Subtype("umdev-sysfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        if rustix::process::geteuid().is_root() {
            config.acl = SessionACL::All;
        }
        let session =
            fuser::spawn_mount(fs::SysFs::new(core, access), path, &config).map_err(|source| {
                SysfsError::Mount {
                    path: path.to_owned(),
                    source,
                }
            })?;
        tracing::info!(path = %path.display(), "sysfs tree mounted");
        Ok(SysfsMount {
            session: Some(session),
            path: path.to_owned(),
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts and waits for the FUSE thread to end.
    pub fn unmount(mut self) -> Result<(), SysfsError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), SysfsError> {
        if let Some(s) = self.session.take() {
            s.umount_and_join().map_err(|source| SysfsError::Unmount {
                path: self.path.clone(),
                source,
            })?;
            tracing::info!(path = %self.path.display(), "sysfs tree unmounted");
        }
        Ok(())
    }
}

impl Drop for SysfsMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(error = %e, "unmounting the sysfs tree");
        }
    }
}

/// Whether `path` is a FUSE mount whose server is gone (what a killed daemon leaves):
/// such a mount answers every access with ENOTCONN.
pub fn is_stale_mount(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NOTCONN.raw_os_error()))
}

/// Whether our tree (a mount of source `umdev`) is mounted at `path`, per
/// `/proc/self/mounts` (spaces in paths are escaped as `\040` there).
fn tree_mounted_at(path: &Path) -> bool {
    let want = path.display().to_string().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            f.next() == Some("umdev") && f.next() == Some(want.as_str())
        })
    })
}

/// Detaches a stale mount at `path` (a lazy unmount: as root with umount2(MNT_DETACH),
/// else with `fusermount3 -u -z`). Returns whether there was one. The caller holds the
/// state directory's lock, so a tree mounted there is an earlier daemon's: a connection
/// that just died may still have its root's attributes cached (no ENOTCONN yet), so the
/// mount table is asked too.
pub fn clear_stale_mount(path: &Path) -> Result<bool, SysfsError> {
    if !is_stale_mount(path) && !tree_mounted_at(path) {
        return Ok(false);
    }
    tracing::info!(path = %path.display(), "detaching a stale mount from an earlier run");
    let err = |source| SysfsError::Unmount {
        path: path.to_owned(),
        source,
    };
    if rustix::process::geteuid().is_root() {
        rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH)
            .map_err(|e| err(e.into()))?;
    } else {
        let out = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(path)
            .output()
            .map_err(err)?;
        if !out.status.success() {
            return Err(err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            )));
        }
    }
    Ok(true)
}
