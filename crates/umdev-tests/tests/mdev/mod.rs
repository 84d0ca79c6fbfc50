//! Shared by the mdev tests: a real `umdevd` in daemon mode on a temporary root, with its
//! sysfs tree mounted over FUSE.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use umdev_tests::prereq::binary;

/// Fails the test, naming what is missing and how to get it, unless root, `/dev/fuse` and
/// the daemon binaries are there.
pub fn require() {
    umdev_tests::prereq::daemon();
}

/// The configuration the tests use: three parents without consoles.
pub const CONFIG: &str = r#"
release_timeout_ms = 300

[[parent]]
name = "mtty0"
driver = "mtty"
options = { console = "none" }

[[parent]]
name = "mtty1"
driver = "mtty"
options = { ports = 2, console = "none" }

[[parent]]
name = "p2p0"
driver = "mtty"
options = { console = "none", peer_to_peer = true }
"#;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    config: PathBuf,
    binary: PathBuf,
    /// Where the daemon's (and its workers') log goes, at info level, if kept.
    log: Option<PathBuf>,
}

impl Daemon {
    /// Starts umdevd on a fresh root with `config` (its `root` is set here).
    pub fn start(config: &str) -> Daemon {
        Daemon::start_binary(binary("umdevd"), config)
    }

    /// Starts the test daemon (umdevd's library with the test device's and the probe's
    /// drivers added through the public builder) on a fresh root with `config`.
    pub fn start_test_daemon(config: &str) -> Daemon {
        Daemon::start_binary(PathBuf::from(env!("CARGO_BIN_EXE_umdevd-test")), config)
    }

    /// Runs the test daemon with `config`, which must make it fail before `ready`; returns
    /// what it printed on stderr.
    pub fn test_daemon_refuses(config: &str) -> String {
        require();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("umdevd.toml");
        let text = format!("root = \"{}\"\n{config}", dir.path().join("root").display());
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_umdevd-test"))
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "the daemon took {config}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Runs `umdevctl args` against this daemon.
    pub fn umdevctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("umdevctl"))
            .args(args)
            .env("UMDEV_CONTROL", self.control())
            .output()
            .unwrap()
    }

    /// Starts `binary` (a daemon built with the public builder) with `config`, its log (and
    /// its workers') at info level kept in a file ([`log`](Self::log)).
    pub fn start_logged(binary: PathBuf, config: &str) -> Daemon {
        let mut d = Daemon::prepare(binary, config);
        d.log = Some(d.dir.path().join("umdevd.log"));
        d.spawn();
        d
    }

    /// The log so far ([`start_logged`](Self::start_logged)).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The temporary directory the daemon's root is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn start_binary(binary: PathBuf, config: &str) -> Daemon {
        let mut d = Daemon::prepare(binary, config);
        d.spawn();
        d
    }

    fn prepare(binary: PathBuf, config: &str) -> Daemon {
        require();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("umdevd.toml");
        let mut text = format!("root = \"{}\"\n", dir.path().join("root").display());
        // UMDEV_TEST_ISOLATION=worker runs a suite's daemons with a sandboxed worker per
        // group; the tests' own files (disks they adopt) are in the temporary directory.
        if let Ok(isolation) = std::env::var("UMDEV_TEST_ISOLATION") {
            if !config.contains("isolation") {
                text.push_str(&format!(
                    "isolation = \"{isolation}\"\nsandbox = {{ allow = [{:?}] }}\n",
                    std::env::temp_dir().display().to_string()
                ));
            }
        }
        text.push_str(config);
        std::fs::write(&path, text).unwrap();
        Daemon {
            dir,
            child: None,
            config: path,
            binary,
            log: None,
        }
    }

    /// Starts the daemon process (again) and waits for `ready`.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config").arg(&self.config).stdout(Stdio::piped());
        match &self.log {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap();
                cmd.env("UMDEV_LOG", "info").stderr(f);
            }
            None => {
                cmd.env("UMDEV_LOG", "warn").stderr(Stdio::inherit());
            }
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(Instant::now() < deadline, "umdevd did not get ready");
            match lines.next() {
                Some(Ok(l)) if l == "ready" => break,
                Some(Ok(_)) => {}
                _ => panic!(
                    "umdevd exited before ready: {:?}\n{}",
                    child.wait(),
                    self.log()
                ),
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

    /// Device `uuid`'s directory (its vfio-user socket and host-side sockets).
    pub fn device_dir(&self, uuid: &str) -> PathBuf {
        self.root().join("sockets").join(uuid)
    }

    /// Device `uuid`'s vfio-user socket.
    pub fn socket(&self, uuid: &str) -> PathBuf {
        self.device_dir(uuid).join("vfio-user.sock")
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
            self.shut_down(&c);
            let status = c.wait().unwrap();
            assert!(status.success(), "umdevd exited with {status}");
        }
    }

    /// Asks the daemon to stop and remove every device (with workers a plain SIGTERM would
    /// leave them serving); SIGTERM if it does not answer.
    fn shut_down(&self, c: &Child) {
        let asked = Command::new(binary("umdevctl"))
            .args(["shutdown", "--remove-devices"])
            .env("UMDEV_CONTROL", self.control())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !asked {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(c),
                rustix::process::Signal::TERM,
            );
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
            self.shut_down(&c);
            let _ = c.wait();
        }
        // If the daemon died, its mount is stale: detach it so the tempdir can go.
        if std::fs::symlink_metadata(self.sys()).is_err() {
            let _ = Command::new("umount").arg("-l").arg(self.sys()).status();
        }
    }
}

/// Stops process `pid` (SIGSTOP) and returns once it is stopped: the signal takes effect
/// asynchronously, and until then the process still runs.
#[allow(dead_code)] // not every suite stops processes
pub fn stop_process(pid: u32) {
    let p = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(p, rustix::process::Signal::STOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if proc_stat(pid).is_some_and(|(state, _)| state == "T") {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The state letter and parent pid of process `pid`, if it exists.
fn proc_stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.to_owned();
    Some((state, f.next()?.parse().ok()?))
}

/// The parent pid of process `pid`, if it is alive.
pub fn ppid(pid: u32) -> Option<u32> {
    proc_stat(pid)
        .filter(|(state, _)| state != "Z")
        .map(|(_, ppid)| ppid)
}

/// Every live process whose parent is `parent` and whose command line has `worker`.
pub fn workers(parent: u32) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| ppid(*p) == Some(parent))
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"worker"))
        })
        .collect();
    v.sort_unstable();
    v
}

/// The test device's parent (`umdevtest`, two devices) as a configuration's `[[parent]]`.
pub const TEST_PARENT: &str =
    "[[parent]]\nname = \"test0\"\ndriver = \"umdevtest\"\noptions = { pool = 2 }\n";

/// An mnvme parent of 1 GiB (`mnvme-1g` devices) as a configuration's `[[parent]]`.
pub const NVME_PARENT: &str =
    "[[parent]]\nname = \"nvme0\"\ndriver = \"mnvme\"\noptions = { capacity_gib = 1 }\n";

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
