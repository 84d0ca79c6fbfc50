//! The one-device mode: `umdevd --socket PATH --type TYPE [--opt KEY=VALUE]...` serves one
//! device of type `TYPE` on `PATH`, without the sysfs tree or the control API. It is a daemon
//! with one parent and one device: the same core (group rules, open guard, every hook), the
//! same driver registry and options, the same server, the same logging. The device's
//! host-side sockets go beside `PATH` (mtty: `port0.sock`, ...).
//!
//! It prints `socket <path>`, `device <uuid>`, `dir <directory>` and `ready` on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use umdev_core::{Core, CoreConfig, Drivers, MdevUuid, ParentContext};
use umdev_server::ServerConfig;
use umdev_transport::{SocketPolicy, Stale};

use crate::serve::PathServe;

/// What the one-device mode needs from the command line.
pub struct SingleArgs {
    /// The vfio-user socket.
    pub socket: PathBuf,
    /// The device's type id (`mtty-2`); its prefix names the driver.
    pub type_id: String,
    /// The device's UUID (default: a random one).
    pub uuid: Option<MdevUuid>,
    /// The parent's options.
    pub options: Map<String, Value>,
    /// The server's tunables.
    pub server: ServerConfig,
    /// Mode of the device's sockets.
    pub socket_mode: u32,
}

/// The driver whose name prefixes `type_id` (`mtty` of `mtty-2`).
fn driver_of<'a>(drivers: &'a Drivers, type_id: &str) -> Result<&'a str> {
    drivers
        .all()
        .iter()
        .map(|d| d.name())
        .find(|n| type_id.strip_prefix(n).is_some_and(|t| t.starts_with('-')))
        .with_context(|| {
            format!(
                "no driver makes type {type_id} (drivers: {})",
                drivers.names().join(", ")
            )
        })
}

/// Serves one device until SIGINT or SIGTERM.
pub fn run(args: SingleArgs, drivers: &Drivers) -> Result<()> {
    let driver = driver_of(drivers, &args.type_id)?.to_owned();
    let parent_name = format!("{driver}0");
    let dir = match args.socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let policy = SocketPolicy {
        // Nobody holds a lock on this path: replace a socket only if it is dead.
        stale: Stale::IfDead,
        mode: args.socket_mode,
        owner: None,
    };
    let serve = PathServe {
        socket: args.socket.clone(),
        policy,
        server: args.server,
    };
    let core = Core::new(CoreConfig::default(), Arc::new(serve));
    let ctx = ParentContext {
        name: parent_name.clone(),
        state_dir: None,
    };
    let parent = drivers
        .build(&driver, &ctx, &args.options)
        .with_context(|| format!("building a {driver} parent"))?;
    core.register_parent(&parent_name, parent)?;
    if core.type_spec(&parent_name, &args.type_id).is_none() {
        let types: Vec<String> = core
            .types(&parent_name)?
            .into_iter()
            .map(|t| t.id)
            .collect();
        bail!(
            "driver {driver} has no type {} (its types: {})",
            args.type_id,
            types.join(", ")
        );
    }
    let uuid = args.uuid.unwrap_or_else(MdevUuid::random);
    core.create(&parent_name, &args.type_id, uuid)
        .with_context(|| format!("creating the {} device", args.type_id))?;

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "socket {}", args.socket.display())?;
    writeln!(out, "device {uuid}")?;
    writeln!(out, "dir {}", dir.display())?;
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    tracing::info!(
        socket = %args.socket.display(),
        %uuid,
        type_id = args.type_id,
        "serving; connect a VMM with -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}'",
        args.socket.display()
    );
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "stopping");
    }
    core.unregister_parent(&parent_name, true)?;
    tracing::info!("stopped cleanly");
    Ok(())
}
