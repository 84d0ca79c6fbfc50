//! The guest end-to-end harness the guest tests share: the cached Debian chroot with QEMU
//! 11 and a kernel (`tests/guest/setup.sh`), a daemon on the host whose sockets sit inside
//! the chroot, QEMU booted under TCG against a device, and everything logged and stopped
//! whatever happens.
//!
//! A guest boot costs seconds of CPU; a test makes one boot check many things (the guest's
//! `/init` runs a whole list of checks and prints one line each).

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// From spawning a daemon to its `ready` line.
pub const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a long log a failure report prints.
const TAIL_LINES: usize = 150;
/// The longest UNIX socket path: `sun_path` is 108 bytes with its NUL.
pub const SUN_PATH_MAX: usize = 107;
/// PCI slot the device gets on q35's root bus.
pub const SLOT: &str = "0x5";
/// The guest's name for that slot.
pub const GUEST_BDF: &str = "0000:00:05.0";

/// TCG guests are CPU-heavy: one at a time. The mutex covers `cargo test` (threads); a lock
/// file in the cache covers nextest (a process per test).
static SERIAL: Mutex<()> = Mutex::new(());

/// Guest memory: shared (QEMU sends fds with DMA_MAP) or plain (DMA goes through messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// Guest RAM in a shared memfd: QEMU sends its fd with every `DMA_MAP`.
    Shared,
    /// Plain anonymous guest RAM: `DMA_MAP` arrives without fds.
    Plain,
}

impl Memory {
    /// `shared` or `plain`.
    pub fn name(self) -> &'static str {
        match self {
            Memory::Shared => "shared",
            Memory::Plain => "plain",
        }
    }

    fn qemu_args(self) -> Vec<String> {
        match self {
            Memory::Shared => vec![
                "-object".into(),
                "memory-backend-memfd,id=mem,size=512M,share=on".into(),
                "-machine".into(),
                "q35,memory-backend=mem".into(),
            ],
            Memory::Plain => vec!["-machine".into(), "q35".into()],
        }
    }
}

/// The guest environment, locked for this test.
pub struct Env {
    /// The chroot holding QEMU, the kernel and the initramfs.
    pub root: PathBuf,
    _lock: File,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Env {
    /// Finds the cache (failing, with what to run, if it is not there) and takes the lock
    /// that lets one guest run at a time.
    pub fn get() -> Env {
        let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
        crate::prereq::daemon();
        let cache = crate::prereq::guest_cache();
        let root = cache.join("root");
        for f in [
            "umdev/vmlinuz",
            "umdev/initramfs.cpio.gz",
            "usr/bin/qemu-system-x86_64",
        ] {
            assert!(
                root.join(f).is_file(),
                "prerequisite missing: {} (run: sudo UMDEV_GUEST_FORCE=1 bash tests/guest/setup.sh)",
                root.join(f).display()
            );
        }
        let path = cache.join(".test-lock");
        let lock = File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .unwrap_or_else(|e| panic!("flock {}: {e}", path.display()));
        Env {
            root,
            _lock: lock,
            _serial: serial,
        }
    }

    /// A fresh directory inside the chroot (for sockets QEMU must reach).
    pub fn dir_in_chroot(&self) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("umdev-")
            .tempdir_in(self.root.join("tmp"))
            .unwrap_or_else(|e| panic!("temp dir in the chroot: {e}"))
    }

    /// `path` as QEMU sees it inside the chroot.
    pub fn inside(&self, path: &Path) -> Result<PathBuf, String> {
        let inside = path.strip_prefix(&self.root).map_err(|_| {
            format!(
                "{} is not inside the chroot {}",
                path.display(),
                self.root.display()
            )
        })?;
        Ok(Path::new("/").join(inside))
    }
}

/// The log directory of run `name` under `base` (a test's `CARGO_TARGET_TMPDIR`), emptied.
pub fn log_dir(base: &str, name: &str) -> PathBuf {
    let dir = Path::new(base).join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// A child process that is stopped when dropped: SIGTERM first if `graceful`, SIGKILL after
/// a grace period (or at once otherwise), then reaped.
pub struct Proc {
    child: Child,
    graceful: bool,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Watches `child`.
    pub fn new(child: Child, graceful: bool) -> Self {
        Self {
            child,
            graceful,
            status: None,
        }
    }

    /// The process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Stops the process; returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.exited().is_none() && self.graceful {
            let pid = rustix::process::Pid::from_child(&self.child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.exited().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes a reader thread appends to.
pub type Sink = Arc<Mutex<Vec<u8>>>;

/// The text in `sink` so far.
pub fn sink_text(sink: &Sink) -> String {
    String::from_utf8_lossy(&sink.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

/// Copies `reader` into `sink` until EOF or an error, optionally echoing to stderr.
pub fn drain_into(mut reader: impl Read + Send + 'static, sink: Sink, echo: bool) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let chunk = &buf[..n];
                    if echo {
                        let _ = std::io::stderr().write_all(chunk);
                    }
                    sink.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .extend_from_slice(chunk);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
}

/// A daemon on the host, started and waited for.
pub struct HostDaemon {
    /// The process (SIGTERM, then SIGKILL, when dropped).
    pub proc: Proc,
    /// Its stdout lines up to `ready`.
    pub stdout: Vec<String>,
}

impl Drop for HostDaemon {
    /// A daemon still running when its test ends (a failure) is asked to remove every device
    /// first: with workers, a plain SIGTERM would leave them serving after the test.
    fn drop(&mut self) {
        if self.proc.exited().is_some() {
            return;
        }
        let control = self
            .stdout
            .iter()
            .find_map(|l| l.strip_prefix("control "))
            .map(PathBuf::from);
        if let Some(control) = control {
            let _ = Command::new(crate::prereq::binary("umdevctl"))
                .args(["shutdown", "--remove-devices"])
                .env("UMDEV_CONTROL", control)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl HostDaemon {
    /// Starts `binary` with `args`, its stderr in `<log_dir>/daemon.stderr`, and waits for its
    /// `ready` line.
    pub fn spawn(binary: &Path, args: &[OsString], log_dir: &Path) -> Result<HostDaemon, String> {
        let stderr =
            File::create(log_dir.join("daemon.stderr")).map_err(|e| format!("daemon log: {e}"))?;
        let mut child = Command::new(binary)
            .args(args)
            .env("UMDEV_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", binary.display()))?;
        let stdout = child.stdout.take().ok_or("daemon stdout not piped")?;
        let mut proc = Proc::new(child, true);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "the daemon printed no `ready` within {DAEMON_READY_TIMEOUT:?}"
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.stop();
                    return Err(format!(
                        "the daemon closed stdout before `ready` (exit: {status:?}); see {}",
                        log_dir.join("daemon.stderr").display()
                    ));
                }
            };
            lines.push(line.clone());
            if line == "ready" {
                break;
            }
        }
        // Keep draining the daemon's stdout so it never blocks on a full pipe.
        thread::spawn(move || while rx.recv().is_ok() {});
        Ok(HostDaemon {
            proc,
            stdout: lines,
        })
    }
}

/// How to boot one guest.
pub struct Boot<'a> {
    /// The guest environment.
    pub env: &'a Env,
    /// Guest memory.
    pub memory: Memory,
    /// The devices' vfio-user sockets, as the host sees them (inside the chroot); the first
    /// is at PCI slot [`SLOT`], the next ones after it.
    pub sockets: &'a [&'a Path],
    /// The kernel command line beyond the console settings.
    pub append: &'a str,
    /// Extra properties of the `vfio-user-pci` device (`,"x-msg-timeout":20000`).
    pub device_props: &'a str,
    /// Where the logs go.
    pub log_dir: &'a Path,
}

/// A booted guest: QEMU under TCG in the chroot, its console captured.
pub struct Guest {
    /// QEMU (killed when dropped).
    pub qemu: Proc,
    /// What the guest printed on its serial console.
    pub console: Sink,
}

impl Guest {
    /// Boots QEMU with `-trace vfio_user*` (into `qemu.stderr`) against the device.
    pub fn boot(b: &Boot<'_>) -> Result<Guest, String> {
        let mut devices = Vec::new();
        for (i, socket) in b.sockets.iter().enumerate() {
            let slot = 5 + i;
            devices.push("-device".to_string());
            devices.push(format!(
                r#"{{"driver":"vfio-user-pci","socket":{{"type":"unix","path":"{}"}},"bus":"pcie.0","addr":"{slot:#x}"{}}}"#,
                b.env.inside(socket)?.display(),
                b.device_props
            ));
        }
        let append = format!("console=ttyS0 panic=-1 quiet {}", b.append);
        let stderr =
            File::create(b.log_dir.join("qemu.stderr")).map_err(|e| format!("qemu log: {e}"))?;
        let mut args: Vec<String> = vec!["-accel".into(), "tcg".into(), "-m".into(), "512".into()];
        args.extend(b.memory.qemu_args());
        args.extend(
            [
                "-nographic",
                // No display of QEMU's own: a guest's bochs driver must find ours.
                "-vga",
                "none",
                "-no-reboot",
                "-nic",
                "none",
                "-kernel",
                "/umdev/vmlinuz",
                "-initrd",
                "/umdev/initramfs.cpio.gz",
                "-trace",
                "vfio_user*",
            ]
            .map(String::from),
        );
        args.extend(["-append".to_string(), append]);
        args.extend(devices);
        fs::write(b.log_dir.join("qemu.cmdline"), args.join("\n"))
            .map_err(|e| format!("qemu log: {e}"))?;
        let chroot = if Path::new("/usr/sbin/chroot").exists() {
            "/usr/sbin/chroot"
        } else {
            "chroot"
        };
        let mut child = Command::new(chroot)
            .arg(&b.env.root)
            .arg("qemu-system-x86_64")
            .args(&args)
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {chroot} qemu-system-x86_64: {e}"))?;
        let stdout = child.stdout.take().ok_or("qemu stdout not piped")?;
        let console = Sink::default();
        let echo = std::env::var_os("UMDEV_GUEST_VERBOSE").is_some_and(|v| v == "1");
        drain_into(stdout, Arc::clone(&console), echo);
        // chroot execs QEMU, so this pid is QEMU's: killing it kills the VM.
        Ok(Guest {
            qemu: Proc::new(child, false),
            console,
        })
    }

    /// Waits for QEMU to exit (the guest powers off), at most `timeout`; `alive` is asked
    /// meanwhile whether the daemon is still there (an error ends the wait).
    pub fn wait(
        &mut self,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.qemu.exited() {
                // The console reader may still hold the last bytes.
                thread::sleep(Duration::from_millis(200));
                return Ok(status);
            }
            alive()?;
            if Instant::now() > deadline {
                return Err(format!("the guest did not power off within {timeout:?}"));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A small file's text without surrounding whitespace.
pub fn read_trimmed(path: &Path) -> Result<String, String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether `path` is a socket.
pub fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether `path` is a mount point in this mount namespace (`/proc/self/mounts`; the paths
/// here have no characters that file escapes).
pub fn is_mounted(path: &Path) -> Result<bool, String> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(|e| format!("/proc/self/mounts: {e}"))?;
    let path = path.display().to_string();
    Ok(mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.as_str())))
}

/// The last lines of a file.
pub fn tail(path: &Path) -> String {
    let text = match fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("<{}: {e}>", path.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(TAIL_LINES);
    let mut out = String::new();
    if skip > 0 {
        out += &format!("<{skip} earlier lines in {}>\n", path.display());
    }
    out += &lines[skip..].join("\n");
    out
}
