//! `umdevd`, the umdev daemon.
//!
//! Daemon mode (the default): hosts the configured parent devices (by default two sample
//! mtty parents, `mtty0` and `mtty1`), serves the kernel's mdev sysfs ABI over FUSE at
//! `<root>/sys` for `mdevctl` and scripts, one vfio-user socket per mediated device, and
//! the control API that `umdevctl` speaks. It prints `root <dir>`, `control <socket>` and
//! `ready` on stdout, logs to stderr (`UMDEV_LOG` filters), and on SIGINT or SIGTERM
//! removes its devices and sockets and unmounts the tree. After an unclean exit, the next
//! start detaches the stale mount, removes stale sockets and re-creates the auto-start
//! definitions.
//!
//! One-device mode (`--socket PATH`): serves a single mtty card on one socket, nothing else.

mod config;
mod control;
mod daemon;
mod serve;
mod single;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, ValueEnum};

/// Device types the one-device mode can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceType {
    /// mtty with one 16550A port.
    #[value(name = "mtty-1")]
    Mtty1,
    /// mtty with two 16550A ports.
    #[value(name = "mtty-2")]
    Mtty2,
}

/// The umdev daemon: mediated devices in userspace, served over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "umdevd", version, about)]
struct Args {
    /// Configuration file (TOML); without it, two mtty parents under `--root`.
    #[arg(long, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// Root of the management tree (overrides the file's `root`): the sysfs tree is
    /// mounted at `<ROOT>/sys`; use `MDEVCTL_ENV_ROOT=<ROOT> mdevctl ...`.
    #[arg(long, conflicts_with = "socket")]
    root: Option<PathBuf>,
    /// One-device mode: serve a single mtty card on this vfio-user socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// One-device mode: the card's type (default mtty-2).
    #[arg(long = "type", value_enum, requires = "socket")]
    device_type: Option<DeviceType>,
    /// One-device mode: each port's host side on a UNIX socket `<DIR>/port<N>.sock`.
    #[arg(long, conflicts_with = "pty", requires = "socket")]
    console_dir: Option<PathBuf>,
    /// One-device mode: each port's host side on a PTY (the paths are printed).
    #[arg(long, requires = "socket")]
    pty: bool,
    /// One-device mode: poll the socket this many microseconds before sleeping.
    #[arg(long, default_value_t = 0, requires = "socket")]
    spin_us: u64,
    /// One-device mode: file mode of the vfio-user socket (octal, default 600).
    #[arg(long, value_parser = parse_mode, requires = "socket")]
    socket_mode: Option<u32>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("not an octal mode: {e}"))
}

fn run(args: Args) -> Result<()> {
    if let Some(socket) = args.socket {
        return single::run(single::SingleArgs {
            socket,
            device_type: args.device_type,
            console_dir: args.console_dir,
            pty: args.pty,
            spin_us: args.spin_us,
            socket_mode: args.socket_mode,
        });
    }
    let mut config = match &args.config {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    if let Some(root) = args.root {
        config.root = std::path::absolute(root)?;
    }
    daemon::run(config)
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
