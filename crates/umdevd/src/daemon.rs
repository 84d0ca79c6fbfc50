//! The daemon's life: lock the state directory, clean what a killed predecessor left,
//! register the configured parents, mount the sysfs tree, create the auto-start
//! definitions, serve the control API, and at the end undo all of it.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use umdev_api::{DefinitionStore, Start};
use umdev_core::{Core, CoreConfig, Drivers, MdevUuid, Parent, ParentContext};
use umdev_sysfs::{SysfsMount, WriteAccess};

use crate::config::{Config, Isolation, ParentConfig};
use crate::control::ControlServer;
use crate::serve::DirServe;
use crate::worker::WorkerServe;

/// The directories mdevctl's self-check wants under its root, besides the sysfs tree.
const MDEVCTL_DIRS: [&str; 3] = [
    "etc/mdevctl.d",
    "usr/lib/mdevctl/scripts.d/callouts",
    "usr/lib/mdevctl/scripts.d/notifiers",
];

/// How a parent was built: its driver and options.
pub type Recipe = (String, Map<String, Value>);

/// What the daemon's parts share: the drivers, the device layout and the configuration.
pub struct Shared {
    /// The parent drivers.
    pub drivers: Drivers,
    /// The configuration the daemon runs with.
    pub config: Config,
    /// How each parent was built (driver, options): a worker builds it again the same way.
    pub recipes: Mutex<std::collections::BTreeMap<String, Recipe>>,
    /// A stop asked through the control API removes every device.
    pub remove_on_stop: std::sync::atomic::AtomicBool,
    /// The workers, with `isolation = "worker"`.
    pub workers: std::sync::OnceLock<Arc<WorkerServe>>,
    /// Set when the daemon starts to stop.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Builds parent `name` of `driver` from `options` (checked by the driver).
    pub fn build_parent(
        &self,
        name: &str,
        driver: &str,
        options: &Map<String, Value>,
    ) -> Result<Arc<dyn Parent>> {
        let ctx = ParentContext {
            name: name.to_owned(),
            state_dir: Some(self.config.state_dir().join("parents").join(name)),
        };
        let parent = self
            .drivers
            .build(driver, &ctx, options)
            .with_context(|| format!("building parent {name}"))?;
        self.recipes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), (driver.to_owned(), options.clone()));
        Ok(parent)
    }

    /// Asks the daemon to stop (as SIGTERM does), removing every device if `remove`.
    pub fn request_stop(&self, remove: bool) {
        self.remove_on_stop
            .fetch_or(remove, std::sync::atomic::Ordering::SeqCst);
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM);
    }

    /// How parent `name` was built: its driver and options.
    pub fn parent_recipe(&self, name: &str) -> Option<Recipe> {
        self.recipes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }
}

/// Takes the state directory's lock: one daemon per state directory. Held until exit.
fn lock_state(dir: &Path) -> Result<OwnedFd> {
    let path = dir.join("umdevd.lock");
    let fd = rustix::fs::open(
        &path,
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    if rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        bail!(
            "another umdevd holds {} (one daemon per state directory)",
            path.display()
        );
    }
    Ok(fd)
}

/// Removes what an earlier daemon left in `dir`: socket files, and device directories
/// (named by UUID). With the lock held, they are all left over.
fn clear_stale(dir: &Path, keep: &[MdevUuid]) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let t = e.file_type()?;
        let uuid = MdevUuid::parse(&e.file_name().to_string_lossy()).ok();
        if uuid.is_some_and(|u| keep.contains(&u)) {
            continue;
        }
        let device_dir = t.is_dir() && uuid.is_some();
        if t.is_socket() {
            std::fs::remove_file(e.path())
        } else if device_dir {
            std::fs::remove_dir_all(e.path())
        } else {
            continue;
        }
        .with_context(|| format!("removing {}", e.path().display()))?;
        n += 1;
    }
    Ok(n)
}

/// Creates the auto-start definitions of `parent`, as mdevctl's udev rule would
/// (`mdevctl start-parent-mdevs`): create, then write the attributes in order; a device
/// whose attribute fails is removed again.
pub fn start_auto_definitions(core: &Core, store: &DefinitionStore, parent: &str) {
    for (uuid, def) in store.list_parent(parent) {
        let def = match def {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(parent, uuid, error = %e, "skipping a definition");
                continue;
            }
        };
        if def.start != Start::Auto {
            continue;
        }
        let Ok(u) = MdevUuid::parse(&uuid) else {
            tracing::warn!(parent, uuid, "skipping a definition: not a UUID");
            continue;
        };
        if let Err(e) = crate::control::start_device(core, parent, u, &def) {
            tracing::warn!(parent, uuid, error = %e, "cannot auto-start a defined device");
        } else {
            tracing::info!(parent, uuid, type_id = def.mdev_type, "auto-started");
        }
    }
}

/// A running daemon (started by [`DaemonBuilder::start`](crate::DaemonBuilder::start)); [`stop`](Running::stop) undoes it.
pub struct Running {
    core: Core,
    mount: SysfsMount,
    control: ControlServer,
    metrics: crate::metrics::MetricsServer,
    sys: std::path::PathBuf,
    shared: Arc<Shared>,
    workers: Option<Arc<WorkerServe>>,
    _lock: OwnedFd,
}

impl Running {
    /// The registry.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Stops the daemon. In thread mode, or when the control API asked for it: removes
    /// every device and parent. With workers: leaves them serving their clients (each waits
    /// for the next daemon to adopt it). Then stops the control API and unmounts the tree.
    pub fn stop(self) {
        self.shared
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let remove = self
            .shared
            .remove_on_stop
            .load(std::sync::atomic::Ordering::SeqCst);
        self.metrics.stop();
        if let (Some(w), false) = (&self.workers, remove) {
            self.control.stop();
            let n = w.detach_all();
            tracing::info!(
                workers = n,
                "stopping; the workers serve on until the next daemon adopts them"
            );
            if let Err(e) = self.mount.unmount() {
                tracing::warn!(error = %e, "unmount failed; detaching lazily");
                let _ = rustix::mount::unmount(&self.sys, rustix::mount::UnmountFlags::DETACH);
            }
            tracing::info!("stopped; devices left to their workers");
            return;
        }
        self.control.stop();
        for p in self.core.parents() {
            if let Err(e) = self.core.unregister_parent(&p, true) {
                tracing::warn!(parent = p, error = %e, "unregistering");
            }
        }
        if let Err(e) = self.mount.unmount() {
            tracing::warn!(error = %e, "unmount failed; detaching lazily");
            let _ = rustix::mount::unmount(&self.sys, rustix::mount::UnmountFlags::DETACH);
        }
        tracing::info!("stopped cleanly");
    }
}

/// Starts the daemon: state lock, recovery, parents (`config.parent`, else `defaults`),
/// the sysfs tree, auto-start definitions, the control API.
pub fn start(mut config: Config, drivers: Drivers, defaults: &[ParentConfig]) -> Result<Running> {
    config.check(&drivers)?;
    if config.parent.is_none() {
        config.parent = Some(defaults.to_vec());
    }
    let root = config.root.clone();
    for d in MDEVCTL_DIRS {
        let p = root.join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    let (state, sockets, sys) = (config.state_dir(), config.sockets_dir(), config.sys_dir());
    for d in [&state, &sockets] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let lock = lock_state(&state)?;
    // Recovery from an unclean exit: a stale mount, then stale sockets and directories.
    umdev_sysfs::clear_stale_mount(&sys)?;
    std::fs::create_dir_all(&sys).with_context(|| format!("creating {}", sys.display()))?;

    let shared = Arc::new(Shared {
        drivers,
        config: config.clone(),
        recipes: Mutex::new(Default::default()),
        remove_on_stop: std::sync::atomic::AtomicBool::new(false),
        workers: std::sync::OnceLock::new(),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    let dirs = Arc::new(DirServe {
        dir: sockets.clone(),
        policy: config.policy()?,
        parent_policies: Mutex::new(Default::default()),
        device_policies: config.device_policies()?,
        server: config.server.server_config()?,
    });
    let mut workers = None;
    let serve: Arc<dyn umdev_core::Serve> = match config.isolation {
        Isolation::Thread => dirs.clone(),
        Isolation::Worker => {
            let links = state.join("workers");
            // The longest socket a worker binds there (its adoption socket) must fit in
            // sun_path.
            let longest = links.join("adopt-xxxxxxxx-xxxx.sock");
            if longest.as_os_str().len() > 107 {
                anyhow::bail!(
                    "the state directory {} is too long for worker sockets ({} bytes of the 107 a UNIX socket's path may have); choose a shorter state_dir",
                    state.display(),
                    longest.as_os_str().len()
                );
            }
            std::fs::create_dir_all(&links)
                .with_context(|| format!("creating {}", links.display()))?;
            let exe = std::env::current_exe().context("the daemon's own binary (for workers)")?;
            tracing::info!(exe = %exe.display(), "devices run in a worker process per IOMMU group");
            let w = WorkerServe::new(
                dirs.clone(),
                shared.clone(),
                config.server.clone(),
                links,
                exe,
                config.sandbox.clone(),
            );
            let w = match &config.cgroup {
                Some(c) => {
                    let cgroups =
                        crate::worker::cgroup::CpuCgroups::open(&c.path).context("[cgroup]")?;
                    tracing::info!(path = %c.path.display(), "workers run in CPU cgroups of their own");
                    w.with_cpu(crate::worker::CpuPolicy {
                        cgroups,
                        default_weight: c.cpu_weight,
                        parents: config
                            .parent
                            .iter()
                            .flatten()
                            .filter_map(|p| Some((p.name.clone(), p.cpu_weight?)))
                            .collect(),
                    })
                }
                None => w,
            };
            let w = Arc::new(w);
            workers = Some(w.clone());
            let _ = shared.workers.set(w.clone());
            if config.upgrade_on_replace {
                watch_binary(w.exe.clone(), shared.clone());
            }
            w
        }
    };
    let core = Core::new(
        CoreConfig {
            release_timeout: Duration::from_millis(config.release_timeout_ms),
        },
        serve,
    );
    for p in config.parent.iter().flatten() {
        dirs.set_parent_policy(&p.name, config.parent_policy(p)?);
        let parent = shared.build_parent(&p.name, &p.driver, &p.options)?;
        core.register_parent(&p.name, parent)
            .with_context(|| format!("registering parent {}", p.name))?;
    }
    // Workers a daemon before this one left serving keep their devices (and their
    // directories); everything else left over is stale.
    let adopted = workers
        .as_ref()
        .map(|w| w.adopt_all(&core))
        .unwrap_or_default();
    let n = clear_stale(&sockets, &adopted)? + clear_stale(&state, &[])?;
    if n > 0 {
        tracing::info!(entries = n, "removed stale sockets and device directories");
    }
    let mount = SysfsMount::mount(core.clone(), &sys, write_access(&config)?)?;
    let store = DefinitionStore::new(&root);
    for p in core.parents() {
        start_auto_definitions(&core, &store, &p);
    }
    let control = ControlServer::start(core.clone(), store, shared.clone())?;
    let metrics = crate::metrics::MetricsServer::start(core.clone(), shared.clone())?;
    tracing::info!(root = %root.display(), parents = ?core.parents(), "umdevd ready");
    Ok(Running {
        core,
        mount,
        control,
        metrics,
        sys,
        shared,
        workers,
        _lock: lock,
    })
}

/// Who may write the sysfs tree: each parent's files as its devices' sockets, and the
/// servers' allow-lists.
fn write_access(config: &Config) -> Result<WriteAccess> {
    let mut parents = std::collections::BTreeMap::new();
    for p in config.parent.iter().flatten() {
        parents.insert(p.name.clone(), config.parent_policy(p)?);
    }
    Ok(WriteAccess {
        default: config.policy()?,
        parents,
        devices: config.device_policies()?,
        allow_uids: config.server.allow_uids.clone(),
        allow_gids: config.server.allow_gids.clone(),
        on_refused: Some(Arc::new(|why: &str| {
            umdev_server::refusals::refused("sysfs write", None, why);
        })),
    })
}

/// What identifies a file's contents cheaply: device, inode, size and modification time.
fn file_identity(path: &Path) -> Option<(u64, u64, u64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime()))
}

/// `upgrade_on_replace`: watches the daemon's binary once a second; when it is replaced (and
/// the new file stays the same for a second, so a copy in progress is not taken), every
/// worker is upgraded to it.
fn watch_binary(exe: std::path::PathBuf, shared: Arc<Shared>) {
    let spawned = std::thread::Builder::new()
        .name("umdevd-exe-watch".into())
        .spawn(move || {
            let mut known = file_identity(&exe);
            let mut seen = known;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                if shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let now = file_identity(&exe);
                if now.is_none() || now == known {
                    seen = now;
                    continue;
                }
                if now != seen {
                    // Changed since the last look: wait until it settles.
                    seen = now;
                    continue;
                }
                known = now;
                tracing::info!(exe = %exe.display(), "the daemon's binary was replaced: upgrading every worker");
                let Some(w) = shared.workers.get() else {
                    return;
                };
                for u in w.upgrade(None) {
                    if let Err(e) = u.result {
                        tracing::warn!(devices = ?u.devices, error = %e, "a worker was not upgraded to the new binary");
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the daemon's binary; upgrade_on_replace is off");
    }
}

/// Runs the daemon until SIGINT or SIGTERM, printing `root`, `control` and `ready` lines.
pub fn run(config: Config, drivers: Drivers, defaults: &[ParentConfig]) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    let control = config.control_socket();
    let root = config.root.clone();
    let running = start(config, drivers, defaults)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "root {}", root.display())?;
    writeln!(out, "control {}", control.display())?;
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
    running.stop();
    Ok(())
}
