//! Guest end-to-end test: a real Linux guest drives umdevd's `mtty-2` device.
//!
//! QEMU (`vfio-user-pci`, from a Debian trixie chroot, TCG) boots Debian's kernel with the busybox
//! initramfs of `tests/guest/`. The guest's stock `8250_pci` driver binds the card (PCI
//! 4348:3253, class 07/00/02), the guest writes `guest-to-host port<i>` to each port and reads a
//! line back; this test reads the guest's text from the daemon's host-side console socket of each
//! port and answers `host-to-guest port<i>`. It checks the guest's dmesg (`ttyS<n> at I/O ... is
//! a 16550A` per port), both directions of text, that the card's INTx fired in the guest, and the
//! guest's verdict; once with guest RAM in
//! a shared memfd (QEMU passes fds with `DMA_MAP`) and once with plain RAM (no fds).
//!
//! Prerequisites, all needing root:
//! - `tests/guest/setup.sh` has built the cache (chroot with QEMU, kernel, initramfs) in
//!   `${UMDEV_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umdev-guest}`;
//! - the daemon is built: `cargo build -p umdevd` (this crate does not depend on the binary
//!   crate, so `cargo test` does not build it). The binary is taken from `$UMDEVD` or
//!   `$CARGO_BIN_EXE_umdevd` if set, else `$CARGO_TARGET_DIR/debug/umdevd`, else
//!   `<workspace>/target/debug/umdevd`.
//!
//! Without them the tests print why and pass, unless `UMDEV_GUEST_REQUIRED=1` (CI), which turns
//! a missing prerequisite into a failure. Logs of every run (console, QEMU's `vfio_user*` trace,
//! the daemon's stderr) are kept in `$CARGO_TARGET_TMPDIR/guest-mtty-<mode>/`; a failure prints
//! them. `UMDEV_GUEST_VERBOSE=1` echoes the guest console live to stderr.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
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

#[test]
fn guest_drives_mtty_with_shared_memory() {
    run_or_skip(Memory::Shared);
}

#[test]
fn guest_drives_mtty_with_plain_memory() {
    run_or_skip(Memory::Plain);
}

fn run_or_skip(memory: Memory) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let env = match Prerequisites::find() {
        Ok(env) => env,
        Err(reason) => {
            if std::env::var_os("UMDEV_GUEST_REQUIRED").is_some_and(|v| v == "1") {
                panic!("guest test prerequisites missing (UMDEV_GUEST_REQUIRED=1): {reason}");
            }
            eprintln!("skipping the guest mtty test ({}): {reason}", memory.name());
            return;
        }
    };
    let _lock = env
        .lock()
        .unwrap_or_else(|e| panic!("cannot lock the guest cache: {e}"));
    let mut run = Run::new(&env, memory).unwrap_or_else(|e| panic!("cannot prepare the run: {e}"));
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
    fn find() -> Result<Self, String> {
        if !rustix::process::geteuid().is_root() {
            return Err("needs root (chroot)".into());
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
    memory: Memory,
    root: PathBuf,
    daemon_bin: PathBuf,
    /// Holds the vfio-user socket, inside the chroot so QEMU can reach it.
    socket_dir: tempfile::TempDir,
    /// The daemon's host-side console sockets.
    console_dir: tempfile::TempDir,
    /// Kept after the run for inspection.
    log_dir: PathBuf,
    daemon: Option<Guarded>,
    qemu: Option<Guarded>,
    daemon_stdout: Vec<String>,
    console: Sink,
    ports: Vec<Sink>,
}

impl Run {
    fn new(env: &Prerequisites, memory: Memory) -> Result<Self, String> {
        let socket_dir = tempfile::Builder::new()
            .prefix("umdev-")
            .tempdir_in(env.root.join("tmp"))
            .map_err(|e| format!("temp dir in the chroot: {e}"))?;
        let console_dir = tempfile::Builder::new()
            .prefix("umdev-console-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let log_dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("guest-mtty-{}", memory.name()));
        let _ = fs::remove_dir_all(&log_dir);
        fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
        Ok(Self {
            memory,
            root: env.root.clone(),
            daemon_bin: env.daemon.clone(),
            socket_dir,
            console_dir,
            log_dir,
            daemon: None,
            qemu: None,
            daemon_stdout: Vec::new(),
            console: Sink::default(),
            ports: Vec::new(),
        })
    }

    /// Boots the guest and exchanges text; returns a summary or why the run failed.
    fn execute(&mut self) -> Result<String, String> {
        let t0 = Instant::now();
        let port_paths = self.start_daemon()?;
        let t_daemon = t0.elapsed();

        // Connect before the guest boots so none of its output can be missed.
        let mut writers = Vec::new();
        for (i, path) in port_paths.iter().enumerate() {
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

        let daemon_status = self.daemon.as_mut().and_then(Guarded::stop);
        if !daemon_status.is_some_and(|s| s.success()) {
            return Err(format!(
                "the daemon did not exit cleanly on SIGTERM: {daemon_status:?}"
            ));
        }
        Ok(format!(
            "guest mtty test ({} memory): daemon ready in {t_daemon:.2?}, guest run {t_guest:.2?}\n{summary}",
            self.memory.name()
        ))
    }

    /// Starts umdevd; returns the host-side socket path of each port.
    fn start_daemon(&mut self) -> Result<Vec<PathBuf>, String> {
        let socket = self.socket_dir.path().join("mtty.sock");
        let stderr = File::create(self.log_dir.join("daemon.stderr"))
            .map_err(|e| format!("daemon log: {e}"))?;
        let mut child = Command::new(&self.daemon_bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--type", "mtty-2", "--console-dir"])
            .arg(self.console_dir.path())
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
        let mut ports: Vec<Option<PathBuf>> = vec![None; PORTS];
        let mut socket_seen = None;
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
                ["ready"] => break,
                _ => {}
            }
        }
        // Keep draining the daemon's stdout so it never blocks on a full pipe.
        thread::spawn(move || while rx.recv().is_ok() {});
        if socket_seen.as_deref() != Some(socket.as_path()) {
            return Err(format!(
                "the daemon announced socket {socket_seen:?}, expected {}",
                socket.display()
            ));
        }
        ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| p.ok_or(format!("the daemon announced no `port {i}` before `ready`")))
            .collect()
    }

    fn start_qemu(&mut self) -> Result<(), String> {
        let name = self
            .socket_dir
            .path()
            .file_name()
            .ok_or("socket dir has no name")?;
        let guest_socket = Path::new("/tmp").join(name).join("mtty.sock");
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
            "guest mtty test ({} memory) failed: {reason}\nlogs kept in {}\ndaemon exit: {daemon_status:?}\n",
            self.memory.name(),
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
