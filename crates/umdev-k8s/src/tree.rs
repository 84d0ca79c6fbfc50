//! umdev's sysfs ABI as umdev-k8s uses it (the FUSE tree under `<root>/sys`, the same paths
//! the kernel's mdev has): parents and their types, `available_instances`, `create`,
//! `remove`, and a device's `vfio_user_socket` and `peer_to_peer_resource_uuid`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One type of one parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeEntry {
    /// The parent's name (`mnvme0`).
    pub parent: String,
    /// The type id (`mnvme-1g`).
    pub type_id: String,
}

/// The tree rooted at `root` (`MDEVCTL_ENV_ROOT`'s meaning: sysfs is `<root>/sys`).
#[derive(Clone, Debug)]
pub struct Tree {
    root: PathBuf,
}

impl Tree {
    /// The tree of the umdevd whose root is `root`.
    pub fn new(root: &Path) -> Tree {
        Tree {
            root: root.to_owned(),
        }
    }

    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    fn type_dir(&self, t: &TypeEntry) -> PathBuf {
        self.sys()
            .join("class/mdev_bus")
            .join(&t.parent)
            .join("mdev_supported_types")
            .join(&t.type_id)
    }

    fn device_dir(&self, uuid: &str) -> PathBuf {
        self.sys().join("bus/mdev/devices").join(uuid)
    }

    /// Every type of every parent, sorted.
    pub fn types(&self) -> Vec<TypeEntry> {
        let mut out = Vec::new();
        let Ok(parents) = std::fs::read_dir(self.sys().join("class/mdev_bus")) else {
            return out;
        };
        for p in parents.flatten() {
            let parent = p.file_name().to_string_lossy().into_owned();
            let Ok(types) = std::fs::read_dir(p.path().join("mdev_supported_types")) else {
                continue;
            };
            for t in types.flatten() {
                out.push(TypeEntry {
                    parent: parent.clone(),
                    type_id: t.file_name().to_string_lossy().into_owned(),
                });
            }
        }
        out.sort_by(|a, b| (&a.type_id, &a.parent).cmp(&(&b.type_id, &b.parent)));
        out
    }

    /// Whether parent `name` is registered.
    pub fn parent_exists(&self, name: &str) -> bool {
        self.sys().join("class/mdev_bus").join(name).exists()
    }

    /// `available_instances` of a type (0 when it cannot be read).
    pub fn available(&self, t: &TypeEntry) -> u32 {
        std::fs::read_to_string(self.type_dir(t).join("available_instances"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Creates device `uuid` of type `t` (a write of its UUID into `create`).
    pub fn create(&self, t: &TypeEntry, uuid: &str) -> Result<()> {
        let f = self.type_dir(t).join("create");
        std::fs::write(&f, format!("{uuid}\n")).with_context(|| format!("writing {}", f.display()))
    }

    /// Writes `value` into device `uuid`'s attribute `name`.
    pub fn set_attr(&self, uuid: &str, name: &str, value: &str) -> Result<()> {
        let f = self.device_dir(uuid).join(name);
        std::fs::write(&f, format!("{value}\n")).with_context(|| format!("writing {}", f.display()))
    }

    /// Whether device `uuid` exists.
    pub fn exists(&self, uuid: &str) -> bool {
        self.device_dir(uuid).exists()
    }

    /// Removes device `uuid` (a write into its `remove`); gone already is fine.
    pub fn remove(&self, uuid: &str) -> Result<()> {
        if !self.exists(uuid) {
            return Ok(());
        }
        let f = self.device_dir(uuid).join("remove");
        match std::fs::write(&f, "1\n") {
            Ok(()) => Ok(()),
            Err(_) if !self.exists(uuid) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("writing {}", f.display())),
        }
    }

    /// Device `uuid`'s vfio-user socket once it is served, waiting up to `timeout`.
    pub fn wait_socket(&self, uuid: &str, timeout: Duration) -> Result<PathBuf> {
        let deadline = Instant::now() + timeout;
        let attr = self.device_dir(uuid).join("vfio_user_socket");
        loop {
            if let Ok(text) = std::fs::read_to_string(&attr) {
                let p = PathBuf::from(text.trim());
                if is_socket(&p) {
                    return Ok(p);
                }
            }
            if Instant::now() > deadline {
                bail!("device {uuid} has no live socket after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether `p` is a UNIX socket.
pub fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}
