//! What the benchmark binaries share: a real `umdevd` started on a fresh root with a
//! configuration, waited for, and stopped with SIGTERM when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// `name` next to the running benchmark binary (`target/release/<name>`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.with_file_name(name))
}

/// A running daemon and its directory.
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its temporary directory (root under `root/`).
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts `umdevd` with `config` (its `root` line is added) in a fresh directory named
    /// after `name`, and waits for its `ready` line.
    pub fn start(umdevd: &Path, name: &str, config: &str) -> Result<Daemon> {
        if !umdevd.exists() {
            bail!(
                "{} is not built (cargo build --release -p umdevd)",
                umdevd.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("umdevd.toml");
        std::fs::write(
            &path,
            format!("root = \"{}\"\n{config}", dir.join("root").display()),
        )?;
        let child = spawn_ready(umdevd, &path)?;
        Ok(Daemon { child, dir })
    }

    /// Stops the daemon with SIGTERM (with workers: they serve on) and starts it again on
    /// the same root; returns how long the new one took to be ready (its tree full).
    pub fn restart(&mut self, umdevd: &Path) -> Result<std::time::Duration> {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )?;
        self.child.wait()?;
        let t = std::time::Instant::now();
        self.child = spawn_ready(umdevd, &self.dir.join("umdevd.toml"))?;
        Ok(t.elapsed())
    }

    /// The sysfs tree's root.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
}

/// Runs `umdevd --config <config>` and waits for its `ready` line.
fn spawn_ready(umdevd: &Path, config: &Path) -> Result<Child> {
    let mut child = Command::new(umdevd)
        .arg("--config")
        .arg(config)
        .env(
            "UMDEV_LOG",
            std::env::var("UMDEV_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", umdevd.display()))?;
    let out = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(out).lines() {
        if line? == "ready" {
            return Ok(child);
        }
    }
    bail!("umdevd exited before it was ready")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Every device removed (with workers a plain SIGTERM leaves them serving).
        let asked = sibling("umdevctl").is_ok_and(|umdevctl| {
            Command::new(umdevctl)
                .args(["shutdown", "--remove-devices"])
                .env("UMDEV_CONTROL", self.root().join("state/control.sock"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if !asked {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&self.child),
                rustix::process::Signal::TERM,
            );
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
