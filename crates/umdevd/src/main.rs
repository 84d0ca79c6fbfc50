//! `umdevd`, the umdev daemon.
//!
//! For now it serves one sample device (an `mtty` serial card) on one vfio-user socket, with
//! each serial port's host side on a UNIX socket or a PTY. It prints what a user needs on
//! stdout (`socket <path>`, `port <n> <path>`, then `ready`), logs to stderr, and stops
//! cleanly on SIGINT or SIGTERM, removing the sockets it created.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use umdev_mtty::{HostEndpoint, Mtty, MttyConfig};
use umdev_pci::PciFunction;
use umdev_server::{Server, ServerConfig};

/// Device types this daemon can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceType {
    /// mtty with one 16550A port.
    #[value(name = "mtty-1")]
    Mtty1,
    /// mtty with two 16550A ports.
    #[value(name = "mtty-2")]
    Mtty2,
}

/// Serves a mediated device over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "umdevd", version, about)]
struct Args {
    /// Path of the vfio-user socket to listen on.
    #[arg(long, default_value = "/tmp/umdev/mtty0.sock")]
    socket: PathBuf,
    /// The device type to serve.
    #[arg(long = "type", value_enum, default_value = "mtty-2")]
    device_type: DeviceType,
    /// Put each serial port's host side on a UNIX socket `<DIR>/port<N>.sock`.
    #[arg(long, conflicts_with = "pty")]
    console_dir: Option<PathBuf>,
    /// Put each serial port's host side on a PTY (the paths are printed).
    #[arg(long)]
    pty: bool,
    /// Poll the socket this many microseconds before sleeping (0: never).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// File mode of the vfio-user socket (octal).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("not an octal mode: {e}"))
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

fn run(args: Args) -> Result<()> {
    let ports: u8 = match args.device_type {
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
        std::fs::Permissions::from_mode(args.socket_mode),
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

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UMDEV_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("umdevd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
