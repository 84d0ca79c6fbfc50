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
//! `umdevd` in its one-device mode (`--socket PATH --type mtty-2`: the same core with one
//! parent and one device; the ports' host sockets `port0.sock`, `port1.sock` beside `PATH`).
//!
//! A third run goes through the management side as an administrator would: `umdevd` in daemon
//! mode (temporary root, its sysfs tree mounted over FUSE at `<root>/sys`, its sockets
//! directory inside the chroot), `echo $UUID > .../mdev_supported_types/mtty-2/create`, the
//! vfio-user socket from the device's `vfio_user_socket` and the ports' host sides from its
//! `vendor/console`; the daemon runs a worker per IOMMU group, and while the guest waits for
//! the host's answers it is stopped (SIGTERM) and started again, then killed (SIGKILL) and
//! started again: each new daemon adopts the card's worker; then every worker is upgraded
//! (`umdevctl upgrade --all`: a new process takes the card over with QEMU's connection and
//! the console connections), and the answers go through the console connections opened
//! before all of it (no byte lost, the same connections). After the
//! guest run, `echo 1 > .../remove`, then SIGTERM must stop the daemon cleanly with its
//! sockets gone and its tree unmounted.
//!
//! Prerequisites: root, `/dev/fuse`, the built binaries (`cargo build --workspace --bins`) and
//! the guest cache that `tests/guest/setup.sh` builds in
//! `${UMDEV_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/umdev-guest}`; a missing one fails
//! the test, naming it (`umdev_tests::prereq`). Logs of every run (console, QEMU's `vfio_user*` trace,
//! the daemon's stderr and configuration) are kept in `$CARGO_TARGET_TMPDIR/guest-mtty-<run>/`
//! (`shared`, `plain`, `managed-shared`); a failure prints
//! them. `UMDEV_GUEST_VERBOSE=1` echoes the guest console live to stderr.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use umdev_tests::guest::{
    drain_into, is_mounted, is_socket, read_trimmed, sink_text, tail, Boot, Env, Guest, HostDaemon,
    Memory, Sink, GUEST_BDF, SUN_PATH_MAX,
};

/// Ports of the `mtty-2` device type.
const PORTS: usize = 2;
/// A whole guest run; one takes about 5 s under TCG here, CI machines may be much slower.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
/// The guest's per-port read timeout (seconds), passed on its kernel command line.
const GUEST_READ_TIMEOUT_S: u32 = 90;
/// The parent the daemon-mode run configures (a pool of exactly one `mtty-2`).
const PARENT: &str = "mtty0";
/// How `umdevd` serves the card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serving {
    /// One-device mode: `umdevd --socket PATH --type mtty-2`.
    Single,
    /// Daemon mode: the card is created through the daemon's FUSE sysfs tree and removed
    /// through it after the guest run.
    Managed,
}

#[test]
fn guest_drives_mtty_with_shared_memory() {
    run_test(Serving::Single, Memory::Shared);
}

#[test]
fn guest_drives_mtty_with_plain_memory() {
    run_test(Serving::Single, Memory::Plain);
}

#[test]
fn guest_drives_mtty_created_through_the_daemons_sysfs() {
    run_test(Serving::Managed, Memory::Shared);
}

/// The run's name: its log directory is `guest-mtty-<name>`.
fn run_name(serving: Serving, memory: Memory) -> String {
    match serving {
        Serving::Single => memory.name().to_owned(),
        Serving::Managed => format!("managed-{}", memory.name()),
    }
}

fn run_test(serving: Serving, memory: Memory) {
    let env = Env::get();
    let mut run =
        Run::new(&env, serving, memory).unwrap_or_else(|e| panic!("cannot prepare the run: {e}"));
    match run.execute() {
        Ok(summary) => println!("{summary}"),
        Err(reason) => panic!("{}", run.failure_report(&reason)),
    }
}

/// One guest boot against one daemon.
struct Run<'a> {
    env: &'a Env,
    serving: Serving,
    memory: Memory,
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
    daemon: Option<HostDaemon>,
    guest: Option<Guest>,
    ports: Vec<Sink>,
    /// How often the first daemon's log said each of a few things before the restarts.
    log_marks: Vec<(String, usize)>,
}

impl<'a> Run<'a> {
    fn new(env: &'a Env, serving: Serving, memory: Memory) -> Result<Self, String> {
        let guest_dir = env.dir_in_chroot();
        let host_dir = tempfile::Builder::new()
            .prefix("umdev-host-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let log_dir = umdev_tests::guest::log_dir(
            env!("CARGO_TARGET_TMPDIR"),
            &format!("guest-mtty-{}", run_name(serving, memory)),
        );
        let uuid = read_trimmed(Path::new("/proc/sys/kernel/random/uuid"))?;
        Ok(Self {
            env,
            serving,
            memory,
            guest_dir,
            host_dir,
            log_dir,
            uuid,
            socket: PathBuf::new(),
            port_paths: Vec::new(),
            daemon: None,
            guest: None,
            ports: Vec::new(),
            log_marks: Vec::new(),
        })
    }

    fn console(&self) -> String {
        self.guest
            .as_ref()
            .map(|g| sink_text(&g.console))
            .unwrap_or_default()
    }

    fn daemon_stdout(&self) -> &[String] {
        self.daemon.as_ref().map_or(&[], |d| &d.stdout[..])
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
        let mut restarted = self.serving != Serving::Managed;
        let deadline = Instant::now() + GUEST_TIMEOUT;
        let status = loop {
            // The guest has written and waits for the answer: the daemon is stopped and
            // started again, then killed and started again, and the answers go through the
            // console connections opened before either.
            if !restarted
                && self
                    .ports
                    .iter()
                    .any(|s| sink_text(s).contains("guest-to-host port"))
            {
                self.restart_daemon(false)?;
                self.restart_daemon(true)?;
                self.upgrade_workers()?;
                restarted = true;
            }
            for (i, sink) in self.ports.iter().enumerate() {
                if !answered[i] && sink_text(sink).contains(&format!("guest-to-host port{i}")) {
                    writers[i]
                        .write_all(format!("host-to-guest port{i}\n").as_bytes())
                        .map_err(|e| format!("write to port {i}: {e}"))?;
                    answered[i] = true;
                }
            }
            if let Some(status) = self.guest.as_mut().and_then(|g| g.qemu.exited()) {
                break status;
            }
            if let Some(status) = self.daemon.as_mut().and_then(|d| d.proc.exited()) {
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
        let daemon_status = self.daemon.as_mut().and_then(|d| d.proc.stop());
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

    /// The daemon (worker mode) goes, by SIGTERM or SIGKILL, and a new one starts on the
    /// same root: it must adopt the card's worker, which served on meanwhile.
    fn restart_daemon(&mut self, kill: bool) -> Result<(), String> {
        let before = self.management_view()?;
        if self.log_marks.is_empty() {
            let log = fs::read_to_string(self.log_dir.join("daemon.stderr")).unwrap_or_default();
            self.log_marks = ["device reset by the client", "client connected"]
                .iter()
                .map(|w| (w.to_string(), log.matches(w).count()))
                .collect();
        }
        let mut old = self.daemon.take().ok_or("no daemon to restart")?;
        let how = if kill { "kill" } else { "term" };
        if kill {
            let pid = rustix::process::Pid::from_raw(i32::try_from(old.proc.pid()).unwrap_or(0))
                .ok_or("no pid")?;
            rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                .map_err(|e| format!("SIGKILL the daemon: {e}"))?;
            let _ = old.proc.stop();
        } else {
            let s = old.proc.stop();
            if !s.is_some_and(|s| s.success()) {
                return Err(format!("the daemon's SIGTERM stop: {s:?}"));
            }
        }
        let log = self.log_dir.join(format!("after-{how}"));
        fs::create_dir_all(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let config = self.host_dir.path().join("umdevd.toml");
        let binary = umdev_tests::prereq::binary("umdevd");
        self.daemon = Some(HostDaemon::spawn(
            &binary,
            &["--config".into(), config.into()],
            &log,
        )?);
        let state = read_trimmed(&self.mdev_dir().join("state"))?;
        if state != "running" {
            return Err(format!(
                "after the {how} restart the card's state is {state}"
            ));
        }
        let adopted = fs::read_to_string(log.join("daemon.stderr")).unwrap_or_default();
        if !adopted.contains("adopted a worker") {
            return Err(format!(
                "the daemon started after the {how} did not adopt the card's worker"
            ));
        }
        let after = self.management_view()?;
        if after != before {
            return Err(format!(
                "after the {how} restart the management view changed:\n--- before ---\n{before}\n--- after ---\n{after}"
            ));
        }
        // The card's worker (a child of the first daemon, logging to its stderr) kept
        // QEMU's connection: it neither reset the card nor took a new client.
        let worker_log = fs::read_to_string(self.log_dir.join("daemon.stderr")).unwrap_or_default();
        for bad in ["device reset by the client", "client connected"] {
            if worker_log.matches(bad).count() > self.connected_before_restarts(bad) {
                return Err(format!(
                    "across the {how} restart the server logged {bad:?}"
                ));
            }
        }
        Ok(())
    }

    /// How often the first daemon's log said `what` when the guest first wrote (before any
    /// restart): QEMU connects once and resets the card at boot.
    fn connected_before_restarts(&self, what: &str) -> usize {
        self.log_marks
            .iter()
            .find(|(w, _)| w == what)
            .map_or(0, |(_, n)| *n)
    }

    /// What management shows of the card: `umdevctl list` and `groups`, the real mdevctl's
    /// `list` (when it is installed) and the card's directory in the tree.
    fn management_view(&self) -> Result<String, String> {
        let root = self.daemon_root();
        let control = root.join("state/control.sock");
        let mut view = String::new();
        for args in [&["list"][..], &["groups"][..]] {
            let o = Command::new(umdev_tests::prereq::binary("umdevctl"))
                .args(args)
                .env("UMDEV_CONTROL", &control)
                .output()
                .map_err(|e| format!("umdevctl {args:?}: {e}"))?;
            view += &format!("umdevctl {args:?}:\n{}", String::from_utf8_lossy(&o.stdout));
        }
        let o = Command::new(umdev_tests::prereq::mdevctl())
            .arg("list")
            .env("MDEVCTL_ENV_ROOT", &root)
            .output()
            .map_err(|e| format!("mdevctl list: {e}"))?;
        view += &format!("mdevctl list:\n{}", String::from_utf8_lossy(&o.stdout));
        let mut entries: Vec<String> = fs::read_dir(self.mdev_dir())
            .map_err(|e| format!("{}: {e}", self.mdev_dir().display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        entries.sort();
        view += &format!("tree: {}\n", entries.join(" "));
        Ok(view)
    }

    /// Every worker is replaced by a new process (`umdevd upgrade --all`) while the guest
    /// waits for the host's answers, which then go through the console connections opened
    /// before it. Judged on the server side: the new worker (a child of the daemon started
    /// after the kill, logging to its stderr) took QEMU's connection over, and QEMU neither
    /// reset the card nor connected again.
    fn upgrade_workers(&mut self) -> Result<(), String> {
        let control = self.daemon_root().join("state/control.sock");
        let o = Command::new(umdev_tests::prereq::binary("umdevctl"))
            .args(["upgrade", "--all"])
            .env("UMDEV_CONTROL", &control)
            .output()
            .map_err(|e| format!("umdevctl upgrade: {e}"))?;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() || !out.contains("upgraded, paused") {
            return Err(format!(
                "umdevctl upgrade --all: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let state = read_trimmed(&self.mdev_dir().join("state"))?;
        if state != "running" {
            return Err(format!("after the upgrade the card's state is {state}"));
        }
        // The new worker logs as it takes the card.
        let log = self.log_dir.join("after-kill").join("daemon.stderr");
        let deadline = Instant::now() + Duration::from_secs(5);
        let text = loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if text.contains("client taken over") || Instant::now() > deadline {
                break text;
            }
            thread::sleep(Duration::from_millis(20));
        };
        if text.matches("client taken over").count() != 1 {
            return Err(format!(
                "the new worker did not take QEMU's connection over:\n{}",
                tail(&log)
            ));
        }
        for bad in ["device reset by the client", "client connected"] {
            if text.contains(bad) {
                return Err(format!("after the upgrade the server logged {bad:?}"));
            }
        }
        println!("host: {}", out.trim());
        Ok(())
    }

    /// Starts umdevd with `args` and waits for its `ready` line.
    fn spawn_daemon(&mut self, args: &[OsString]) -> Result<(), String> {
        let binary = umdev_tests::prereq::binary("umdevd");
        self.daemon = Some(HostDaemon::spawn(&binary, args, &self.log_dir)?);
        Ok(())
    }

    /// Starts umdevd in one-device mode; returns the host-side socket path of each port
    /// (beside the vfio-user socket, in the device's directory).
    fn start_single(&mut self) -> Result<Vec<PathBuf>, String> {
        let socket = self.guest_dir.path().join("mtty.sock");
        let args: Vec<OsString> = vec![
            "--socket".into(),
            socket.clone().into(),
            "--type".into(),
            "mtty-2".into(),
        ];
        self.spawn_daemon(&args)?;
        let mut socket_seen = None;
        let mut dir_seen = None;
        for line in self.daemon_stdout() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["socket", path] => socket_seen = Some(PathBuf::from(path)),
                ["dir", path] => dir_seen = Some(PathBuf::from(path)),
                _ => {}
            }
        }
        if socket_seen.as_deref() != Some(socket.as_path()) {
            return Err(format!(
                "the daemon announced socket {socket_seen:?}, expected {}",
                socket.display()
            ));
        }
        let dir = dir_seen.ok_or("the daemon announced no `dir` before `ready`")?;
        self.socket = socket;
        Ok((0..PORTS)
            .map(|i| dir.join(format!("port{i}.sock")))
            .collect())
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
            .join(&self.uuid)
            .join(umdev_core::VFIO_USER_SOCKET);
        if longest.as_os_str().len() > SUN_PATH_MAX {
            return Err(format!(
                "{} is longer than a UNIX socket path may be ({SUN_PATH_MAX} bytes); use a \
                 shorter UMDEV_GUEST_CACHE",
                longest.display()
            ));
        }
        let config = self.host_dir.path().join("umdevd.toml");
        let text = format!(
            "root = {:?}\nsockets_dir = {:?}\nisolation = \"worker\"\n\n[[parent]]\nname = \"{PARENT}\"\ndriver = \"mtty\"\noptions = {{ ports = {PORTS}, console = \"socket\" }}\n",
            self.daemon_root().display().to_string(),
            self.guest_dir.path().display().to_string(),
        );
        fs::write(&config, &text).map_err(|e| format!("{}: {e}", config.display()))?;
        fs::write(self.log_dir.join("umdevd.toml"), &text)
            .map_err(|e| format!("daemon config log: {e}"))?;
        self.spawn_daemon(&["--config".into(), config.into()])?;
        let root_line = format!("root {}", self.daemon_root().display());
        if !self.daemon_stdout().contains(&root_line) {
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
        let device_dir = self.guest_dir.path().join(&self.uuid);
        if socket != device_dir.join(umdev_core::VFIO_USER_SOCKET) {
            return Err(format!(
                "vfio_user_socket is {}, expected it in the device's directory {}",
                socket.display(),
                device_dir.display()
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
            .collect();
        if !left.is_empty() {
            return Err(format!(
                "sockets or device directories left after the daemon exited: {left:?}"
            ));
        }
        Ok(format!(
            "\ndaemon exited cleanly on SIGTERM, {} unmounted",
            self.sys().display()
        ))
    }

    fn start_qemu(&mut self) -> Result<(), String> {
        let append =
            format!("8250.nr_uarts=8 umdev.ports={PORTS} umdev.timeout={GUEST_READ_TIMEOUT_S}");
        let boot = Boot {
            env: self.env,
            memory: self.memory,
            sockets: &[&self.socket],
            append: &append,
            device_props: "",
            log_dir: &self.log_dir,
        };
        self.guest = Some(Guest::boot(&boot)?);
        Ok(())
    }

    /// Checks the console and the host-side text; returns the relevant guest lines.
    fn check(&self) -> Result<String, String> {
        let console = self.console();
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
        let _ = fs::write(self.log_dir.join("console.log"), self.console());
        for (i, sink) in self.ports.iter().enumerate() {
            let _ = fs::write(
                self.log_dir.join(format!("port{i}.host.log")),
                sink_text(sink),
            );
        }
    }

    /// Stops everything and describes the failure with all the logs.
    fn failure_report(&mut self, reason: &str) -> String {
        if let Some(g) = self.guest.as_mut() {
            g.qemu.stop();
        }
        let daemon_status = self.daemon.as_mut().and_then(|d| d.proc.stop());
        thread::sleep(Duration::from_millis(100));
        self.save_logs();
        let mut report = format!(
            "guest mtty test ({}) failed: {reason}\nlogs kept in {}\ndaemon exit: {daemon_status:?}\n",
            self.describe(),
            self.log_dir.display()
        );
        report += &format!(
            "--- daemon stdout ---\n{}\n",
            self.daemon_stdout().join("\n")
        );
        report += &format!(
            "--- daemon stderr (tail) ---\n{}\n",
            tail(&self.log_dir.join("daemon.stderr"))
        );
        for (i, sink) in self.ports.iter().enumerate() {
            report += &format!("--- host side of port {i} ---\n{:?}\n", sink_text(sink));
        }
        report += &format!("--- guest console ---\n{}\n", self.console());
        report += &format!(
            "--- QEMU stderr with vfio_user* trace (tail) ---\n{}\n",
            tail(&self.log_dir.join("qemu.stderr"))
        );
        report
    }
}

impl Drop for Run<'_> {
    /// Whatever happened, no VM or daemon outlives the run, and no stale FUSE mount is left
    /// in the way of removing the temporary root.
    fn drop(&mut self) {
        if let Some(g) = self.guest.as_mut() {
            g.qemu.stop();
        }
        if let Some(d) = self.daemon.as_mut() {
            d.proc.stop();
        }
        if self.serving == Serving::Managed && is_mounted(&self.sys()).unwrap_or(false) {
            let _ = Command::new("umount").arg("-l").arg(self.sys()).status();
        }
    }
}
