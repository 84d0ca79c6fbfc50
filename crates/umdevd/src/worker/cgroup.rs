//! CPU weights per worker (`[cgroup]`): each worker process in a CPU cgroup of its own
//! under one directory, with a weight, so that a group whose devices flood their worker
//! gets its share of the CPU and no more, and a parent can be given more than others.
//!
//! Both hierarchies are served. Under cgroup v2 the directory is in a subtree delegated to
//! the daemon (systemd's `Delegate=cpu`); the `cpu` controller is enabled for its children
//! and each worker's `cpu.weight` is written (1 to 10000, 100 the kernel's default). Under
//! v1 the directory is in the `cpu` hierarchy and the weight becomes `cpu.shares`
//! (`weight * 1024 / 100`, 1024 the default).
//!
//! A worker's cgroup is named by its pid (`w<pid>`) and removed once the process is gone;
//! empty ones a daemon before this one left are removed at start.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The cgroup directory workers go under.
#[derive(Debug)]
pub struct CpuCgroups {
    root: PathBuf,
    v2: bool,
}

fn err(path: &Path, what: &str, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

impl CpuCgroups {
    /// Makes `root` (if missing) and checks it is a cgroup with the cpu controller.
    pub fn open(root: &Path) -> std::io::Result<CpuCgroups> {
        let not_cgroup = || {
            std::io::Error::other(format!(
                "{} is not a cgroup with the cpu controller (cgroup v2 with cpu delegated, or \
                 under v1's cpu hierarchy)",
                root.display()
            ))
        };
        // Made only inside a cgroup file system (its parent is a cgroup).
        if !root.exists()
            && !root
                .parent()
                .is_some_and(|p| p.join("cgroup.procs").exists())
        {
            return Err(not_cgroup());
        }
        match std::fs::create_dir(root) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(root, "cannot make the cgroup", e)),
        }
        let cg = if root.join("cgroup.controllers").exists() {
            // v2: the controller must be available here, and enabled for the children.
            let available = std::fs::read_to_string(root.join("cgroup.controllers"))
                .map_err(|e| err(root, "cannot read the controllers of", e))?;
            if !available.split_whitespace().any(|c| c == "cpu") {
                return Err(std::io::Error::other(format!(
                    "the cpu controller is not delegated to {} (enable it in its parent's \
                     cgroup.subtree_control, or Delegate=cpu)",
                    root.display()
                )));
            }
            let control = root.join("cgroup.subtree_control");
            std::fs::write(&control, "+cpu").map_err(|e| err(&control, "cannot write", e))?;
            CpuCgroups {
                root: root.to_owned(),
                v2: true,
            }
        } else if root.join("cpu.shares").exists() {
            CpuCgroups {
                root: root.to_owned(),
                v2: false,
            }
        } else {
            return Err(not_cgroup());
        };
        cg.sweep();
        Ok(cg)
    }

    fn dir(&self, pid: u32) -> PathBuf {
        self.root.join(format!("w{pid}"))
    }

    /// Puts process `pid` (all its threads) in a cgroup of its own with `weight`.
    pub fn place(&self, pid: u32, weight: u32) -> std::io::Result<()> {
        let dir = self.dir(pid);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(&dir, "cannot make the cgroup", e)),
        }
        let (file, value) = if self.v2 {
            ("cpu.weight", weight.clamp(1, 10_000))
        } else {
            // v1's shares are at least 2.
            ("cpu.shares", (weight.saturating_mul(1024) / 100).max(2))
        };
        let f = dir.join(file);
        std::fs::write(&f, value.to_string()).map_err(|e| err(&f, "cannot write", e))?;
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|e| err(&procs, "cannot write", e))
    }

    /// Removes the cgroup of `pid`, whose process has ended.
    pub fn remove(&self, pid: u32) {
        let dir = self.dir(pid);
        // The kernel may still be taking the process out: a few tries.
        for _ in 0..50 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        tracing::debug!(dir = %dir.display(), "a worker's cgroup is still busy; left");
    }

    /// Removes the empty cgroups of workers that are gone (a cgroup with a process in it
    /// cannot be removed: adopted workers keep theirs).
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let is_worker = name
                .to_str()
                .and_then(|n| n.strip_prefix('w'))
                .is_some_and(|n| n.parse::<u32>().is_ok());
            if is_worker && e.path().is_dir() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}
