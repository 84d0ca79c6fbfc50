//! Guest end-to-end test: a real Linux guest drives umdevd's `mtty-2` device.
//!
//! QEMU (`vfio-user-pci`, from a Debian trixie chroot, TCG) boots Debian's kernel with the busybox
//! initramfs of `tests/guest/`. The guest's stock `8250_pci` driver binds the card (PCI
//! 4348:3253, class 07/00/02), the guest writes `guest-to-host port<i>` to each port and reads a
//! line back; this test reads the guest's text from the daemon's host-side console socket of each
//! port and answers `host-to-guest port<i>`. It checks the guest's dmesg (`ttyS<n> at I/O ... is
//! a 16550A` per port), both directions of text, that the card's INTx fired in the guest, and the
//! guest's verdict; once with guest RAM in
//! a shared memfd (QEMU passes fds with `DMA_MAP`) and once with plain RAM (no fds), both with
//! `umdevd` in its one-device mode (`--socket --type mtty-2 --console-dir`).
//!
//! A third run goes through the management side as an administrator would: `umdevd` in daemon
//! mode (temporary root, its sysfs tree mounted over FUSE at `<root>/sys`, its sockets
//! directory inside the chroot), `echo $UUID > .../mdev_supported_types/mtty-2/create`, the
//! vfio-user socket from the device's `vfio_user_socket` and the ports' host sides from its
//! `vendor/console`; after the guest run, `echo 1 > .../remove`, then SIGTERM must stop the
//! daemon cleanly with its sockets gone and its tree unmounted.
//!
//! Prerequisites, all needing root (and `/dev/fuse` for the daemon-mode run):
//! - `tests/guest/setup.sh` has built the cache (chroot with QEMU, kernel, initramfs) in
//!   `${UMDEV_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umdev-guest}`;
//! - the daemon is built: `cargo build -p umdevd` (this crate does not depend on the binary
//!   crate, so `cargo test` does not build it). The binary is taken from `$UMDEVD` or
//!   `$CARGO_BIN_EXE_umdevd` if set, else `$CARGO_TARGET_DIR/debug/umdevd`, else
//!   `<workspace>/target/debug/umdevd`.
//!
//! Without them the tests print why and pass, unless `UMDEV_GUEST_REQUIRED=1` (CI), which turns
//! a missing prerequisite into a failure. Logs of every run (console, QEMU's `vfio_user*` trace,
//! the daemon's stderr and configuration) are kept in `$CARGO_TARGET_TMPDIR/guest-mtty-<run>/`
//! (`shared`, `plain`, `managed-shared`); a failure prints
//! them. `UMDEV_GUEST_VERBOSE=1` echoes the guest console live to stderr.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Ports of the `mtty-2` device type.
const PORTS: usize = 2;
/// PCI slot the device gets on q35's root bus; the guest firmware assigns its I/O BARs there.
const SLOT: &str = "0x5";
/// The guest's name for that slot, as its dmesg prints it.
const GUEST_BDF: &str = "0000:00:05.0";
/// From spawning the daemon to its `ready` line.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole guest run; one takes about 5 s under TCG here, CI machines may be much slower.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
/// The guest's per-port read timeout (seconds), passed on its kernel command line.
const GUEST_READ_TIMEOUT_S: u32 = 90;
/// How much of a long log a failure report prints.
const TAIL_LINES: usize = 150;
/// The parent the daemon-mode run configures (a pool of exactly one `mtty-2`).
const PARENT: &str = "mtty0";
/// The longest UNIX socket path: `sun_path` is 108 bytes with its NUL.
const SUN_PATH_MAX: usize = 107;

/// TCG guests are CPU-heavy; run the two modes one after the other. The mutex covers
/// `cargo test` (threads); a lock file in the cache covers nextest (a process per test).
static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Clone, Copy, Debug)]
enum Memory {
    /// Guest RAM in a shared memfd: QEMU sends its fd with every `DMA_MAP`.
    Shared,
    /// Plain anonymous guest RAM: `DMA_MAP` arrives without fds.
    Plain,
}

impl Memory {
    fn name(self) -> &'static str {
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

/// How `umdevd` serves the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serving {
    /// One-device mode: `umdevd --socket PATH --type mtty-2 --console-dir DIR`.
    Single,
    /// Daemon mode: the card is created through the daemon's FUSE sysfs tree and removed
    /// through it after the guest run.
    Managed,
}

#[test]
fn guest_drives_mtty_with_shared_memory() {
    run_or_skip(Serving::Single, Memory::Shared);
}

#[test]
fn guest_drives_mtty_with_plain_memory() {
    run_or_skip(Serving::Single, Memory::Plain);
}

#[test]
fn guest_drives_mtty_created_through_the_daemons_sysfs() {
    run_or_skip(Serving::Managed, Memory::Shared);
}

/// The run's name: its log directory is `guest-mtty-<name>`.
fn run_name(serving: Serving, memory: Memory) -> String {
    match serving {
        Serving::Single => memory.name().to_owned(),
        Serving::Managed => format!("managed-{}", memory.name()),
    }
}

fn run_or_skip(serving: Serving, memory: Memory) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let env = match Prerequisites::find(serving) {
        Ok(env) => env,
        Err(reason) => {
            if std::env::var_os("UMDEV_GUEST_REQUIRED").is_some_and(|v| v == "1") {
                panic!("guest test prerequisites missing (UMDEV_GUEST_REQUIRED=1): {reason}");
            }
            eprintln!(
                "skipping the guest mtty test ({}): {reason}",
                run_name(serving, memory)
            );
            return;
        }
    };
    let _lock = env
        .lock()
        .unwrap_or_else(|e| panic!("cannot lock the guest cache: {e}"));
    let mut run =
        Run::new(&env, serving, memory).unwrap_or_else(|e| panic!("cannot prepare the run: {e}"));
    match run.execute() {
        Ok(summary) => println!("{summary}"),
        Err(reason) => panic!("{}", run.failure_report(&reason)),
    }
}

/// What a run needs from the machine.
struct Prerequisites {
    /// The cache `tests/guest/setup.sh` fills.
    cache: PathBuf,
    /// The chroot holding QEMU, the kernel and the initramfs.
    root: PathBuf,
    /// The daemon binary on the host.
    daemon: PathBuf,
}

impl Prerequisites {
    /// Returns why the test cannot run if something is missing.
    fn find(serving: Serving) -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("needs root (chroot)".into());
        }
        if serving == Serving::Managed && !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing (the daemon mounts its sysfs tree over FUSE)".into());
        }
        let cache = cache_dir().ok_or("neither UMDEV_GUEST_CACHE, XDG_CACHE_HOME nor HOME set")?;
        if !cache.join("ready").is_file() {
            return Err(format!(
                "{} is not complete; run tests/guest/setup.sh",
                cache.display()
            ));
        }
        let root = cache.join("root");
        for f in [
            "umdev/vmlinuz",
            "umdev/initramfs.cpio.gz",
            "usr/bin/qemu-system-x86_64",
        ] {
            if !root.join(f).is_file() {
                return Err(format!(
                    "{} is missing; run tests/guest/setup.sh",
                    root.join(f).display()
                ));
            }
        }
        let daemon = daemon_path();
        if !daemon.is_file() {
            return Err(format!(
                "{} not found; run `cargo build -p umdevd`",
                daemon.display()
            ));
        }
        Ok(Self {
            cache,
            root,
            daemon,
        })
    }
}

impl Prerequisites {
    /// Holds an exclusive lock on the cache until the returned file is dropped.
    fn lock(&self) -> Result<File, String> {
        let path = self.cache.join(".test-lock");
        let file = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("flock {}: {e}", path.display()))?;
        Ok(file)
    }
}

/// The cache directory `tests/guest/setup.sh` fills.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("UMDEV_GUEST_CACHE") {
        return Some(dir.into());
    }
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("umdev-guest"))
}

/// The daemon binary: `$UMDEVD`, `CARGO_BIN_EXE_umdevd` (at run or build time; cargo sets it
/// only for a package's own binaries, so today it comes from the caller if at all),
/// `$CARGO_TARGET_DIR/debug/umdevd`, or `<workspace>/target/debug/umdevd`.
fn daemon_path() -> PathBuf {
    if let Some(path) = std::env::var_os("UMDEVD") {
        return path.into();
    }
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_umdevd") {
        return path.into();
    }
    if let Some(path) = option_env!("CARGO_BIN_EXE_umdevd") {
        return path.into();
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("debug/umdevd");
    }
    // crates/umdev-tests -> workspace root
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/umdevd")
}

/// A child process that is stopped when dropped: SIGTERM first if `graceful`, SIGKILL after
/// a grace period (or at once otherwise), then reaped.
struct Guarded {
    child: Child,
    graceful: bool,
    status: Option<ExitStatus>,
}

impl Guarded {
    fn new(child: Child, graceful: bool) -> Self {
        Self {
            child,
            graceful,
            status: None,
        }
    }

    /// The exit status if the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Stops the process; returns its exit status.
    fn stop(&mut self) -> Option<ExitStatus> {
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

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Bytes a reader thread appends to.
type Sink = Arc<Mutex<Vec<u8>>>;

fn sink_text(sink: &Sink) -> String {
    String::from_utf8_lossy(&sink.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
}

/// Copies `reader` into `sink` until EOF or an error, optionally echoing to stderr.
fn drain_into(mut reader: impl Read + Send + 'static, sink: Sink, echo: bool) {
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

/// One guest boot against one daemon.
struct Run {
    serving: Serving,
    memory: Memory,
    root: PathBuf,
    daemon_bin: PathBuf,
    /// Inside the chroot so QEMU can reach it: holds the vfio-user socket (one-device mode) or
    /// is the daemon's `sockets_dir` (daemon mode: the device's socket and its ports' sockets).
    guest_dir: tempfile::TempDir,
    /// Outside the chroot: the host-side console sockets (one-device mode) or the daemon's
    /// configuration and root (daemon mode).
    host_dir: tempfile::TempDir,
    /// Kept after the run for inspection.
    log_dir: PathBuf,
    /// The device's UUID (daemon mode).
    uuid: String,
    /// The device's vfio-user socket, as the host sees it (inside `guest_dir`).
    socket: PathBuf,
    /// Each port's host side.
    port_paths: Vec<PathBuf>,
    daemon: Option<Guarded>,
    qemu: Option<Guarded>,
    daemon_stdout: Vec<String>,
    console: Sink,
    ports: Vec<Sink>,
}

impl Run {
    fn new(env: &Prerequisites, serving: Serving, memory: Memory) -> Result<Self, String> {
        let guest_dir = tempfile::Builder::new()
            .prefix("umdev-")
            .tempdir_in(env.root.join("tmp"))
            .map_err(|e| format!("temp dir in the chroot: {e}"))?;
        let host_dir = tempfile::Builder::new()
            .prefix("umdev-host-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let log_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("guest-mtty-{}", run_name(serving, memory)));
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
        let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map_err(|e| format!("a new UUID: {e}"))?
            .trim()
            .to_owned();
        Ok(Self {
            serving,
            memory,
            root: env.root.clone(),
            daemon_bin: env.daemon.clone(),
            guest_dir,
            host_dir,
            log_dir,
            uuid,
            socket: PathBuf::new(),
            port_paths: Vec::new(),
            daemon: None,
            qemu: None,
            daemon_stdout: Vec::new(),
            console: Sink::default(),
            ports: Vec::new(),
        })
    }

    /// What this run is, for its messages.
    fn describe(&self) -> String {
        match self.serving {
            Serving::Single => format!("{} memory", self.memory.name()),
            Serving::Managed => format!(
                "daemon mode, mdev {} on {PARENT}, {} memory",
                self.uuid,
                self.memory.name()
            ),
        }
    }

    /// Boots the guest and exchanges text; returns a summary or why the run failed.
    fn execute(&mut self) -> Result<String, String> {
        let t0 = Instant::now();
        self.port_paths = match self.serving {
            Serving::Single => self.start_single()?,
            Serving::Managed => self.start_managed()?,
        };
        let t_daemon = t0.elapsed();

        // Connect before the guest boots so none of its output can be missed.
        let mut writers = Vec::new();
        for (i, path) in self.port_paths.iter().enumerate() {
            let stream = UnixStream::connect(path)
                .map_err(|e| format!("connect to port {i} at {}: {e}", path.display()))?;
            let reader = stream.try_clone().map_err(|e| format!("port {i}: {e}"))?;
            let sink = Sink::default();
            drain_into(reader, Arc::clone(&sink), false);
            self.ports.push(sink);
            writers.push(stream);
        }

        let t1 = Instant::now();
        self.start_qemu()?;
        let mut answered = [false; PORTS];
        let deadline = Instant::now() + GUEST_TIMEOUT;
        let status = loop {
            for (i, sink) in self.ports.iter().enumerate() {
                if !answered[i] && sink_text(sink).contains(&format!("guest-to-host port{i}")) {
                    writers[i]
                        .write_all(format!("host-to-guest port{i}\n").as_bytes())
                        .map_err(|e| format!("write to port {i}: {e}"))?;
                    answered[i] = true;
                }
            }
            if let Some(status) = self.qemu.as_mut().and_then(Guarded::exited) {
                break status;
            }
            if let Some(status) = self.daemon.as_mut().and_then(Guarded::exited) {
                return Err(format!("the daemon exited during the guest run: {status}"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the guest did not power off within {GUEST_TIMEOUT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        };
        let t_guest = t1.elapsed();
        // The console reader may still hold the last bytes.
        thread::sleep(Duration::from_millis(200));
        self.save_logs();
        if !status.success() {
            return Err(format!("QEMU exited with {status}"));
        }
        let summary = self.check()?;

        let mut teardown = String::new();
        if self.serving == Serving::Managed {
            drop(writers);
            teardown = self.remove_device()?;
        }
        let daemon_status = self.daemon.as_mut().and_then(Guarded::stop);
        if !daemon_status.is_some_and(|s| s.success()) {
            return Err(format!(
                "the daemon did not exit cleanly on SIGTERM: {daemon_status:?}"
            ));
        }
        if self.serving == Serving::Managed {
            teardown += &self.check_daemon_cleaned_up()?;
        }
        Ok(format!(
            "guest mtty test ({}): device ready in {t_daemon:.2?}, guest run {t_guest:.2?}\n{summary}{teardown}",
            self.describe()
        ))
    }

    /// Starts umdevd with `args` and waits for its `ready` line; its stdout lines up to
    /// there are in `daemon_stdout`.
    fn spawn_daemon(&mut self, args: &[OsString]) -> Result<(), String> {
        let stderr = File::create(self.log_dir.join("daemon.stderr"))
            .map_err(|e| format!("daemon log: {e}"))?;
        let mut child = Command::new(&self.daemon_bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.daemon_bin.display()))?;
        let stdout = child.stdout.take().ok_or("daemon stdout not piped")?;
        self.daemon = Some(Guarded::new(child, true));

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
                    let status = self.daemon.as_mut().and_then(Guarded::stop);
                    return Err(format!(
                        "the daemon closed stdout before `ready` (exit: {status:?})"
                    ));
                }
            };
            self.daemon_stdout.push(line.clone());
            if line == "ready" {
                break;
            }
        }
        // Keep draining the daemon's stdout so it never blocks on a full pipe.
        thread::spawn(move || while rx.recv().is_ok() {});
        Ok(())
    }

    /// Starts umdevd in one-device mode; returns the host-side socket path of each port.
    fn start_single(&mut self) -> Result<Vec<PathBuf>, String> {
        let socket = self.guest_dir.path().join("mtty.sock");
        let args: Vec<OsString> = vec![
            "--socket".into(),
            socket.clone().into(),
            "--type".into(),
            "mtty-2".into(),
            "--console-dir".into(),
            self.host_dir.path().into(),
        ];
        self.spawn_daemon(&args)?;
        let mut ports: Vec<Option<PathBuf>> = vec![None; PORTS];
        let mut socket_seen = None;
        for line in &self.daemon_stdout {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["socket", path] => socket_seen = Some(PathBuf::from(path)),
                ["port", n, path] => {
                    let n: usize = n.parse().map_err(|_| format!("bad daemon line {line:?}"))?;
                    let slot = ports
                        .get_mut(n)
                        .ok_or(format!("daemon announced port {n}; mtty-2 has {PORTS}"))?;
                    *slot = Some(PathBuf::from(path));
                }
                _ => {}
            }
        }
        if socket_seen.as_deref() != Some(socket.as_path()) {
            return Err(format!(
                "the daemon announced socket {socket_seen:?}, expected {}",
                socket.display()
            ));
        }
        self.socket = socket;
        ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.ok_or(format!("the daemon announced no `port {i}` before `ready`")))
            .collect()
    }

    /// The daemon's root (daemon mode).
    fn daemon_root(&self) -> PathBuf {
        self.host_dir.path().join("root")
    }

    /// The daemon's sysfs tree, mounted over FUSE (daemon mode).
    fn sys(&self) -> PathBuf {
        self.daemon_root().join("sys")
    }

    fn type_dir(&self) -> PathBuf {
        self.sys()
            .join("class/mdev_bus")
            .join(PARENT)
            .join("mdev_supported_types/mtty-2")
    }

    fn mdev_dir(&self) -> PathBuf {
        self.sys().join("bus/mdev/devices").join(&self.uuid)
    }

    /// `available_instances` of `mtty-2` on the parent.
    fn available(&self) -> Result<String, String> {
        read_trimmed(&self.type_dir().join("available_instances"))
    }

    /// Starts umdevd in daemon mode with its sockets inside the chroot, creates the card
    /// through the sysfs tree, and returns the host-side socket path of each port (from the
    /// device's `vendor/console`).
    fn start_managed(&mut self) -> Result<Vec<PathBuf>, String> {
        let longest = self
            .guest_dir
            .path()
            .join(format!("{}.port{}.sock", self.uuid, PORTS - 1));
        if longest.as_os_str().len() > SUN_PATH_MAX {
            return Err(format!(
                "{} is longer than a UNIX socket path may be ({SUN_PATH_MAX} bytes); use a \
                 shorter UMDEV_GUEST_CACHE",
                longest.display()
            ));
        }
        let config = self.host_dir.path().join("umdevd.toml");
        let text = format!(
            "root = {:?}\nsockets_dir = {:?}\n\n[[parent]]\nname = \"{PARENT}\"\ndriver = \"mtty\"\nports = {PORTS}\nconsole = \"socket\"\n",
            self.daemon_root().display().to_string(),
            self.guest_dir.path().display().to_string(),
        );
        fs::write(&config, &text).map_err(|e| format!("{}: {e}", config.display()))?;
        fs::write(self.log_dir.join("umdevd.toml"), &text)
            .map_err(|e| format!("daemon config log: {e}"))?;
        self.spawn_daemon(&["--config".into(), config.into()])?;
        let root_line = format!("root {}", self.daemon_root().display());
        if !self.daemon_stdout.contains(&root_line) {
            return Err(format!("the daemon did not announce `{root_line}`"));
        }
        if !is_mounted(&self.sys())? {
            return Err(format!(
                "{} is not a mount point after `ready`",
                self.sys().display()
            ));
        }

        let available = self.available()?;
        if available != "1" {
            return Err(format!(
                "available_instances of mtty-2 is {available:?} before the create, expected 1"
            ));
        }
        // `echo $UUID > .../mdev_supported_types/mtty-2/create`
        let create = self.type_dir().join("create");
        fs::write(&create, format!("{}\n", self.uuid))
            .map_err(|e| format!("write {} to {}: {e}", self.uuid, create.display()))?;
        let dev = self.mdev_dir();
        let socket = PathBuf::from(read_trimmed(&dev.join("vfio_user_socket"))?);
        if socket.parent() != Some(self.guest_dir.path()) {
            return Err(format!(
                "vfio_user_socket is {}, expected it in the sockets_dir {}",
                socket.display(),
                self.guest_dir.path().display()
            ));
        }
        if !is_socket(&socket) {
            return Err(format!("{} is not a socket", socket.display()));
        }
        let console = dev.join("vendor/console");
        let ports: Vec<PathBuf> = fs::read_to_string(&console)
            .map_err(|e| format!("{}: {e}", console.display()))?
            .lines()
            .map(PathBuf::from)
            .collect();
        if ports.len() != PORTS {
            return Err(format!(
                "vendor/console lists {ports:?}, expected {PORTS} port sockets"
            ));
        }
        let available = self.available()?;
        if available != "0" {
            return Err(format!(
                "available_instances of mtty-2 is {available:?} after the create, expected 0"
            ));
        }
        self.socket = socket;
        Ok(ports)
    }

    /// `echo 1 > .../<uuid>/remove` after QEMU has gone: the device and its sockets go, the
    /// parent's port pool is free again. Returns lines for the summary.
    fn remove_device(&self) -> Result<String, String> {
        let dev = self.mdev_dir();
        fs::write(dev.join("remove"), "1\n")
            .map_err(|e| format!("write 1 to {}/remove: {e}", dev.display()))?;
        let mut problems = Vec::new();
        if fs::symlink_metadata(&dev).is_ok() {
            problems.push(format!("{} still exists after remove", dev.display()));
        }
        for path in std::iter::once(&self.socket).chain(&self.port_paths) {
            if fs::symlink_metadata(path).is_ok() {
                problems.push(format!("{} still exists after remove", path.display()));
            }
        }
        let available = self.available()?;
        if available != "1" {
            problems.push(format!(
                "available_instances of mtty-2 is {available:?} after the remove, expected 1"
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(format!(
            "\nremoved {} through sysfs: device and its {} sockets gone, available_instances back to 1",
            self.uuid,
            1 + self.port_paths.len()
        ))
    }

    /// After SIGTERM: the tree is unmounted and no socket is left.
    fn check_daemon_cleaned_up(&self) -> Result<String, String> {
        if is_mounted(&self.sys())? {
            return Err(format!(
                "{} is still mounted after the daemon exited",
                self.sys().display()
            ));
        }
        let left: Vec<PathBuf> = fs::read_dir(self.guest_dir.path())
            .map_err(|e| format!("{}: {e}", self.guest_dir.path().display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_socket(p))
            .collect();
        if !left.is_empty() {
            return Err(format!("sockets left after the daemon exited: {left:?}"));
        }
        Ok(format!(
            "\ndaemon exited cleanly on SIGTERM, {} unmounted",
            self.sys().display()
        ))
    }

    /// The vfio-user socket's path as QEMU sees it inside the chroot.
    fn guest_socket(&self) -> Result<PathBuf, String> {
        let inside = self.socket.strip_prefix(&self.root).map_err(|_| {
            format!(
                "the vfio-user socket {} is not inside the chroot {}",
                self.socket.display(),
                self.root.display()
            )
        })?;
        Ok(Path::new("/").join(inside))
    }

    fn start_qemu(&mut self) -> Result<(), String> {
        let guest_socket = self.guest_socket()?;
        let device = format!(
            r#"{{"driver":"vfio-user-pci","socket":{{"type":"unix","path":"{}"}},"bus":"pcie.0","addr":"{SLOT}"}}"#,
            guest_socket.display()
        );
        let append = format!(
            "console=ttyS0 panic=-1 quiet 8250.nr_uarts=8 umdev.ports={PORTS} umdev.timeout={GUEST_READ_TIMEOUT_S}"
        );
        let stderr =
            File::create(self.log_dir.join("qemu.stderr")).map_err(|e| format!("qemu log: {e}"))?;
        let mut args: Vec<String> = vec!["-accel".into(), "tcg".into(), "-m".into(), "512".into()];
        args.extend(self.memory.qemu_args());
        args.extend(
            [
                "-nographic",
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
        args.extend(["-append".to_string(), append, "-device".to_string(), device]);
        fs::write(self.log_dir.join("qemu.cmdline"), args.join("\n"))
            .map_err(|e| format!("qemu log: {e}"))?;
        let chroot = if Path::new("/usr/sbin/chroot").exists() {
            "/usr/sbin/chroot"
        } else {
            "chroot"
        };
        let mut child = Command::new(chroot)
            .arg(&self.root)
            .arg("qemu-system-x86_64")
            .args(&args)
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                format!(
                    "spawn {chroot} {} qemu-system-x86_64: {e}",
                    self.root.display()
                )
            })?;
        let stdout = child.stdout.take().ok_or("qemu stdout not piped")?;
        let echo = std::env::var_os("UMDEV_GUEST_VERBOSE").is_some_and(|v| v == "1");
        drain_into(stdout, Arc::clone(&self.console), echo);
        // chroot execs QEMU, so this pid is QEMU's: killing it kills the VM.
        self.qemu = Some(Guarded::new(child, false));
        Ok(())
    }

    /// Checks the console and the host-side text; returns the relevant guest lines.
    fn check(&self) -> Result<String, String> {
        let console = sink_text(&self.console);
        let mut problems = Vec::new();
        let uarts: Vec<&str> = console
            .lines()
            .filter(|l| l.contains(&format!("{GUEST_BDF}: ttyS")) && l.contains("is a 16550A"))
            .collect();
        if uarts.len() != PORTS {
            problems.push(format!(
                "dmesg shows {} 16550A ports on {GUEST_BDF}, expected {PORTS}",
                uarts.len()
            ));
        }
        for (i, sink) in self.ports.iter().enumerate() {
            if !sink_text(sink).contains(&format!("guest-to-host port{i}")) {
                problems.push(format!(
                    "host side of port {i} never got `guest-to-host port{i}`"
                ));
            }
            if !console
                .lines()
                .any(|l| l.trim_end() == format!("GUEST-READ port{i}: host-to-guest port{i}"))
            {
                problems.push(format!("the guest did not read `host-to-guest port{i}`"));
            }
            // "GUEST-IRQ port<i>:  21:   7   IO-APIC  21-fasteoi   ttyS4", taken while the port
            // was open: the text must have moved on interrupts, not on the driver's polling.
            let irqs = console
                .lines()
                .find_map(|l| l.strip_prefix(&format!("GUEST-IRQ port{i}:")))
                .and_then(|rest| rest.split_whitespace().nth(1))
                .and_then(|count| count.parse::<u64>().ok());
            if irqs.is_none_or(|n| n == 0) {
                problems.push(format!(
                    "the guest counted no interrupts on port {i}'s IRQ ({irqs:?})"
                ));
            }
        }
        if !console.contains("GUEST-VERDICT: PASS") {
            problems.push("the guest's verdict is not PASS".into());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let relevant: Vec<&str> = console
            .lines()
            .filter(|l| {
                l.contains("16550A")
                    || l.starts_with("GUEST-READ")
                    || l.starts_with("GUEST-IRQ")
                    || l.starts_with("GUEST-VERDICT")
            })
            .collect();
        Ok(relevant.join("\n"))
    }

    fn save_logs(&self) {
        let _ = fs::write(self.log_dir.join("console.log"), sink_text(&self.console));
        for (i, sink) in self.ports.iter().enumerate() {
            let _ = fs::write(
                self.log_dir.join(format!("port{i}.host.log")),
                sink_text(sink),
            );
        }
    }

    /// Stops everything and describes the failure with all the logs.
    fn failure_report(&mut self, reason: &str) -> String {
        if let Some(q) = self.qemu.as_mut() {
            q.stop();
        }
        let daemon_status = self.daemon.as_mut().and_then(Guarded::stop);
        thread::sleep(Duration::from_millis(100));
        self.save_logs();
        let mut report = format!(
            "guest mtty test ({}) failed: {reason}\nlogs kept in {}\ndaemon exit: {daemon_status:?}\n",
            self.describe(),
            self.log_dir.display()
        );
        report += &format!("--- daemon stdout ---\n{}\n", self.daemon_stdout.join("\n"));
        report += &format!(
            "--- daemon stderr (tail) ---\n{}\n",
            tail(&self.log_dir.join("daemon.stderr"))
        );
        for (i, sink) in self.ports.iter().enumerate() {
            report += &format!("--- host side of port {i} ---\n{:?}\n", sink_text(sink));
        }
        report += &format!("--- guest console ---\n{}\n", sink_text(&self.console));
        report += &format!(
            "--- QEMU stderr with vfio_user* trace (tail) ---\n{}\n",
            tail(&self.log_dir.join("qemu.stderr"))
        );
        report
    }
}

impl Drop for Run {
    /// Whatever happened, no VM or daemon outlives the run, and no stale FUSE mount is left
    /// in the way of removing the temporary root.
    fn drop(&mut self) {
        if let Some(q) = self.qemu.as_mut() {
            q.stop();
        }
        if let Some(d) = self.daemon.as_mut() {
            d.stop();
        }
        if self.serving == Serving::Managed && is_mounted(&self.sys()).unwrap_or(false) {
            let _ = Command::new("umount").arg("-l").arg(self.sys()).status();
        }
    }
}

/// A small file's text without surrounding whitespace.
fn read_trimmed(path: &Path) -> Result<String, String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Whether `path` is a mount point in this mount namespace (`/proc/self/mounts`; the paths
/// here have no characters that file escapes).
fn is_mounted(path: &Path) -> Result<bool, String> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").map_err(|e| format!("/proc/self/mounts: {e}"))?;
    let path = path.display().to_string();
    Ok(mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.as_str())))
}

/// The last `TAIL_LINES` lines of a file.
fn tail(path: &Path) -> String {
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
