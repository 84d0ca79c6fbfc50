//! The daemon's life: lock the state directory, clean what a killed predecessor left,
//! register the configured parents, mount the sysfs tree, create the auto-start
//! definitions, serve the control API, and on SIGINT/SIGTERM undo all of it.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umdev_api::{DefinitionStore, Start};
use umdev_core::{Core, CoreConfig, MdevUuid};
use umdev_server::ServerConfig;
use umdev_sysfs::SysfsMount;

use crate::config::Config;
use crate::control::ControlServer;
use crate::serve::SocketServe;

/// The directories mdevctl's self-check wants under its root, besides the sysfs tree.
const MDEVCTL_DIRS: [&str; 3] = [
    "etc/mdevctl.d",
    "usr/lib/mdevctl/scripts.d/callouts",
    "usr/lib/mdevctl/scripts.d/notifiers",
];

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

/// Removes every socket file in `dir`: with the lock held, they are all left over.
fn clear_stale_sockets(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type().is_ok_and(|t| t.is_socket()) {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            n += 1;
        }
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

fn register_parents(core: &Core, config: &Config) -> Result<()> {
    for p in &config.parent {
        core.register_parent(&p.name, p.build(&config.sockets_dir())?)
            .with_context(|| format!("registering parent {}", p.name))?;
    }
    Ok(())
}

pub fn run(config: Config) -> Result<()> {
    config.check()?;
    let root = &config.root;
    for d in MDEVCTL_DIRS {
        let p = root.join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    let (state, sockets, sys) = (config.state_dir(), config.sockets_dir(), config.sys_dir());
    for d in [&state, &sockets] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let _lock = lock_state(&state)?;
    // Recovery from an unclean exit: a stale mount, then stale sockets.
    umdev_sysfs::clear_stale_mount(&sys)?;
    std::fs::create_dir_all(&sys).with_context(|| format!("creating {}", sys.display()))?;
    let n = clear_stale_sockets(&sockets)? + clear_stale_sockets(&state)?;
    if n > 0 {
        tracing::info!(sockets = n, "removed stale sockets from an earlier run");
    }

    let serve = SocketServe {
        dir: sockets.clone(),
        mode: config.mode()?,
        owner: config.owner()?,
        server: ServerConfig::default(),
    };
    let core = Core::new(
        CoreConfig {
            release_timeout: Duration::from_millis(config.release_timeout_ms),
        },
        Arc::new(serve),
    );
    register_parents(&core, &config)?;
    let mount = SysfsMount::mount(core.clone(), &sys)?;
    let store = DefinitionStore::new(root);
    for p in core.parents() {
        start_auto_definitions(&core, &store, &p);
    }
    let control = ControlServer::start(core.clone(), store, &config)?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;

    let mut out = std::io::stdout().lock();
    writeln!(out, "root {}", root.display())?;
    writeln!(out, "control {}", config.control_socket().display())?;
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    tracing::info!(root = %root.display(), parents = ?core.parents(), "umdevd ready");

    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
    control.stop();
    for p in core.parents() {
        if let Err(e) = core.unregister_parent(&p, true) {
            tracing::warn!(parent = p, error = %e, "unregistering");
        }
    }
    if let Err(e) = mount.unmount() {
        tracing::warn!(error = %e, "unmount failed; detaching lazily");
        let _ = rustix::mount::unmount(&sys, rustix::mount::UnmountFlags::DETACH);
    }
    tracing::info!("stopped cleanly");
    Ok(())
}
