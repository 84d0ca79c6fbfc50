//! The one-device mode: `umdevd --socket PATH [--type mtty-2] [--console-dir DIR | --pty]`
//! serves a single mtty card on one vfio-user socket, without the mdev core, the sysfs tree
//! or the control API. It prints `socket <path>`, `port <n> <path>` and `ready` on stdout.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umdev_mtty::{HostEndpoint, Mtty, MttyConfig};
use umdev_pci::PciFunction;
use umdev_server::{Server, ServerConfig};

use crate::DeviceType;

/// What the one-device mode needs from the command line.
pub struct SingleArgs {
    pub socket: PathBuf,
    pub device_type: Option<DeviceType>,
    pub console_dir: Option<PathBuf>,
    pub pty: bool,
    pub spin_us: u64,
    pub socket_mode: Option<u32>,
}

/// Removes a socket file left by an earlier run that nobody listens on any more; refuses
/// to touch anything else.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!("{} exists and is not a socket", path.display());
    }
    if UnixStream::connect(path).is_ok() {
        bail!("{} is in use by another server", path.display());
    }
    tracing::info!(path = %path.display(), "removing a stale socket from an earlier run");
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

/// Serves one mtty card on `socket` (the mode the guest test and simple setups use).
pub fn run(args: SingleArgs) -> Result<()> {
    let ports: u8 = match args.device_type.unwrap_or(DeviceType::Mtty2) {
        DeviceType::Mtty1 => 1,
        DeviceType::Mtty2 => 2,
    };
    let host = (0..ports)
        .map(|i| match (&args.console_dir, args.pty) {
            (Some(dir), _) => HostEndpoint::UnixSocket(dir.join(format!("port{i}.sock"))),
            (None, true) => HostEndpoint::Pty,
            (None, false) => HostEndpoint::None,
        })
        .collect::<Vec<_>>();
    if let Some(dir) = &args.console_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for i in 0..ports {
            clear_stale_socket(&dir.join(format!("port{i}.sock")))?;
        }
    }
    if let Some(parent) = args.socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    clear_stale_socket(&args.socket)?;

    let mtty = Mtty::new(MttyConfig { ports, host }).context("creating the mtty device")?;
    let spec = mtty.spec();
    let host_paths = mtty.host_paths();
    let function = PciFunction::new(spec, Box::new(mtty));
    let config = ServerConfig {
        spin: Duration::from_micros(args.spin_us),
        ..ServerConfig::default()
    };
    let server = Server::new(function, config).context("creating the server")?;

    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("listening on {}", args.socket.display()))?;
    std::fs::set_permissions(
        &args.socket,
        std::fs::Permissions::from_mode(args.socket_mode.unwrap_or(0o600)),
    )
    .with_context(|| format!("setting the mode of {}", args.socket.display()))?;

    let stopper = server.stopper();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping");
            stopper.stop();
        }
    });

    let mut out = std::io::stdout().lock();
    writeln!(out, "socket {}", args.socket.display())?;
    for (i, p) in host_paths.iter().enumerate() {
        writeln!(out, "port {i} {p}")?;
    }
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    tracing::info!(
        socket = %args.socket.display(),
        device = ?args.device_type,
        "serving; connect a VMM with -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{}\"}}}}'",
        args.socket.display()
    );

    let result = server.serve(listener);
    let _ = std::fs::remove_file(&args.socket);
    drop(server);
    result.context("serving the device")?;
    tracing::info!("stopped cleanly");
    Ok(())
}
