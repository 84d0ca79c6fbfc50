//! Shared by the mdev tests: a real `umdevd` in daemon mode on a temporary root, with its
//! sysfs tree mounted over FUSE.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A built workspace binary: `$CARGO_BIN_EXE_<name>` if set, else next to this test's
/// target directory (`target/debug/<name>`; CI builds umdevd and umdevctl first).
pub fn binary(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    // The test binary is target/debug/deps/<test>-<hash>.
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}

/// Why these tests may not run here: FUSE needs /dev/fuse, and mounting needs root or
/// fusermount3. CI runs as root with fuse3 installed, and sets UMDEV_MDEV_REQUIRED=1 so
/// that a missing prerequisite fails instead of skipping.
pub fn unavailable() -> Option<String> {
    let why = if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse is missing".to_owned())
    } else if !rustix::process::geteuid().is_root() {
        Some("the mdev tests mount FUSE as root".to_owned())
    } else if !binary("umdevd").exists() {
        Some(format!("{} is not built", binary("umdevd").display()))
    } else {
        None
    };
    if let Some(w) = &why {
        assert!(
            std::env::var_os("UMDEV_MDEV_REQUIRED").is_none(),
            "mdev test cannot run: {w}"
        );
        eprintln!("skipping: {w}");
    }
    why
}

/// The configuration the tests use: three parents without consoles.
pub const CONFIG: &str = r#"
release_timeout_ms = 300

[[parent]]
name = "mtty0"
driver = "mtty"
console = "none"

[[parent]]
name = "mtty1"
driver = "mtty"
ports = 2
console = "none"

[[parent]]
name = "p2p0"
driver = "mtty"
console = "none"
peer_to_peer = true
"#;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    config: PathBuf,
}

impl Daemon {
    /// Starts umdevd on a fresh root with `config` (its `root` is set here).
    pub fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("umdevd.toml");
        let text = format!("root = \"{}\"\n{config}", dir.path().join("root").display());
        std::fs::write(&path, text).unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            config: path,
        };
        d.spawn();
        d
    }

    /// Starts the daemon process (again) and waits for `ready`.
    pub fn spawn(&mut self) {
        let mut child = Command::new(binary("umdevd"))
            .arg("--config")
            .arg(&self.config)
            .env("UMDEV_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "umdevd did not get ready");
            match lines.next() {
                Some(Ok(l)) if l == "ready" => break,
                Some(Ok(_)) => {}
                _ => panic!("umdevd exited before ready: {:?}", child.wait()),
            }
        }
        self.child = Some(child);
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn sys(&self) -> PathBuf {
        self.root().join("sys")
    }

    pub fn control(&self) -> PathBuf {
        self.root().join("state/control.sock")
    }

    pub fn type_dir(&self, parent: &str, t: &str) -> PathBuf {
        self.sys()
            .join("class/mdev_bus")
            .join(parent)
            .join("mdev_supported_types")
            .join(t)
    }

    pub fn available(&self, parent: &str, t: &str) -> u32 {
        let s =
            std::fs::read_to_string(self.type_dir(parent, t).join("available_instances")).unwrap();
        s.trim().parse().unwrap()
    }

    pub fn create(&self, parent: &str, t: &str, uuid: &str) -> std::io::Result<()> {
        std::fs::write(self.type_dir(parent, t).join("create"), format!("{uuid}\n"))
    }

    pub fn mdev_dir(&self, uuid: &str) -> PathBuf {
        self.sys().join("bus/mdev/devices").join(uuid)
    }

    pub fn remove(&self, uuid: &str) -> std::io::Result<()> {
        std::fs::write(self.mdev_dir(uuid).join("remove"), "1\n")
    }

    pub fn devices(&self, parent: &str, t: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.type_dir(parent, t).join("devices"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    /// SIGTERM and wait: the daemon cleans up.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&c),
                rustix::process::Signal::TERM,
            );
            let status = c.wait().unwrap();
            assert!(status.success(), "umdevd exited with {status}");
        }
    }

    /// SIGKILL: nothing is cleaned.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&c),
                rustix::process::Signal::TERM,
            );
            let _ = c.wait();
        }
        // If the daemon died, its mount is stale: detach it so the tempdir can go.
        if std::fs::symlink_metadata(self.sys()).is_err() {
            let _ = Command::new("umount").arg("-l").arg(self.sys()).status();
        }
    }
}

/// A fresh random UUID, lowercase.
pub fn new_uuid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .unwrap()
        .trim()
        .to_owned()
}

/// The errno of an I/O error.
pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}
