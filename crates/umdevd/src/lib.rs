//! `umdevd`, the umdev daemon, as a library: a thin `main` registers the parent drivers it
//! ships, and a custom daemon binary can add drivers of its own, without touching this
//! crate, the control API or the CLI.
//!
//! ```no_run
//! // The whole `main` of a daemon serving mtty and a driver of one's own:
//! # struct MyDriver;
//! # impl umdev_core::ParentDriver for MyDriver {
//! #     fn name(&self) -> &str { "mine" }
//! #     fn description(&self) -> &str { "" }
//! #     fn options(&self) -> Vec<umdev_core::OptionSpec> { vec![] }
//! #     fn build(&self, _: &umdev_core::ParentContext, _: &umdev_core::Options)
//! #         -> Result<std::sync::Arc<dyn umdev_core::Parent>, umdev_core::DriverError> { unimplemented!() }
//! # }
//! fn main() -> std::process::ExitCode {
//!     umdevd::Daemon::builder()
//!         .driver(umdev_mtty::MttyDriver)
//!         .driver(MyDriver)
//!         .main()
//! }
//! ```
//!
//! Daemon mode (the default): hosts the configured parents (without a configuration file,
//! the builder's default parents, else one `<driver>0` per driver), serves the kernel's
//! mdev sysfs ABI over FUSE at `<root>/sys` for `mdevctl` and scripts, one vfio-user socket
//! per mediated device in a directory of its own (`<sockets_dir>/<uuid>/vfio-user.sock`),
//! and the control API that `umdevctl` speaks. It prints `root <dir>`, `control <socket>`
//! and `ready` on stdout, logs to stderr (`UMDEV_LOG` filters), and on SIGINT or SIGTERM
//! removes its devices and sockets and unmounts the tree. After an unclean exit, the next
//! start detaches the stale mount, removes stale sockets and re-creates the auto-start
//! definitions.
//!
//! One-device mode (`--socket PATH --type TYPE`): the same core with one parent and one
//! device, served on `PATH`; no tree, no control API.
#![warn(missing_docs)]

pub mod config;
mod control;
mod daemon;
pub mod metrics;
mod serve;
mod single;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{Map, Value};
use umdev_core::{Drivers, MdevUuid, ParentDriver};

pub use config::{Config, ParentConfig};
pub use daemon::Running;

/// The umdev daemon: mediated devices in userspace, served over vfio-user.
#[derive(Debug, Parser)]
#[command(name = "umdevd", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML); without it, the daemon's default parents under `--root`.
    #[arg(long, conflicts_with = "socket")]
    config: Option<PathBuf>,
    /// Root of the management tree (overrides the file's `root`): the sysfs tree is
    /// mounted at `<ROOT>/sys`; use `MDEVCTL_ENV_ROOT=<ROOT> mdevctl ...`.
    #[arg(long, conflicts_with = "socket")]
    root: Option<PathBuf>,
    /// One-device mode: serve a single device on this vfio-user socket (its host-side
    /// sockets go in the same directory).
    #[arg(long, requires = "device_type")]
    socket: Option<PathBuf>,
    /// One-device mode: the device's type id (`mtty-2`); its prefix names the driver.
    #[arg(long = "type", requires = "socket")]
    device_type: Option<String>,
    /// One-device mode: the device's UUID (default: a random one).
    #[arg(long, requires = "socket")]
    uuid: Option<String>,
    /// One-device mode: an option of the parent's driver (repeatable); `umdevctl drivers`
    /// lists them.
    #[arg(long = "opt", value_name = "KEY=VALUE", requires = "socket")]
    opts: Vec<String>,
    /// One-device mode: poll the socket this many microseconds before sleeping (daemon
    /// mode: `[server] spin_us` in the configuration).
    #[arg(long, requires = "socket")]
    spin_us: Option<u64>,
    /// One-device mode: file mode of the sockets (octal, default 600).
    #[arg(long, value_parser = parse_mode, requires = "socket")]
    socket_mode: Option<u32>,
}

/// What else the binary can be.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// A worker process serving one IOMMU group's devices (`isolation = "worker"`): started
    /// by the daemon, never by hand.
    #[command(hide = true)]
    Worker {
        /// The daemon's link socket to connect to.
        #[arg(long)]
        link: PathBuf,
        /// Where the worker listens for the next daemon if this one dies.
        #[arg(long)]
        adopt: PathBuf,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    config::parse_mode(s).map_err(|e| format!("{e:#}"))
}

/// The daemon, assembled from its drivers.
#[derive(Debug)]
pub struct Daemon;

impl Daemon {
    /// A daemon with no driver yet.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }
}

/// Builds a daemon: its drivers and its default parents.
#[derive(Debug, Default)]
pub struct DaemonBuilder {
    drivers: Drivers,
    defaults: Vec<ParentConfig>,
}

impl DaemonBuilder {
    /// Registers a parent driver.
    pub fn driver(mut self, driver: impl ParentDriver + 'static) -> Self {
        self.drivers.add(driver);
        self
    }

    /// A parent hosted when the configuration names none (`options` is the driver's table).
    pub fn default_parent(mut self, name: &str, driver: &str, options: Value) -> Self {
        let options = match options {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        self.defaults.push(ParentConfig::new(name, driver, options));
        self
    }

    /// The registered drivers.
    pub fn drivers(&self) -> &Drivers {
        &self.drivers
    }

    fn defaults(&self) -> Vec<ParentConfig> {
        if !self.defaults.is_empty() {
            return self.defaults.clone();
        }
        self.drivers
            .names()
            .iter()
            .map(|d| ParentConfig::new(&format!("{d}0"), d, Map::new()))
            .collect()
    }

    /// Starts the daemon in this process with `config` (no signal handling, no output);
    /// [`Running::stop`] ends it.
    pub fn start(self, config: Config) -> Result<Running> {
        let defaults = self.defaults();
        daemon::start(config, self.drivers, &defaults)
    }

    /// Runs the daemon with `config` until SIGINT or SIGTERM.
    pub fn run(self, config: Config) -> Result<()> {
        let defaults = self.defaults();
        daemon::run(config, self.drivers, &defaults)
    }

    fn run_args(self, args: Args) -> Result<()> {
        if let Some(Command::Worker { link, adopt }) = &args.command {
            return worker::process::run(self.drivers, link, adopt);
        }
        if let (Some(socket), Some(type_id)) = (args.socket, args.device_type) {
            let uuid = args
                .uuid
                .as_deref()
                .map(MdevUuid::parse)
                .transpose()
                .context("--uuid")?;
            let mut server = Config::default().server;
            if let Some(s) = args.spin_us {
                server.spin_us = s;
            }
            return single::run(
                single::SingleArgs {
                    socket,
                    type_id,
                    uuid,
                    options: umdev_api::control::options_from_pairs(&args.opts)
                        .map_err(anyhow::Error::msg)?,
                    server: server.server_config()?,
                    socket_mode: args.socket_mode.unwrap_or(0o600),
                },
                &self.drivers,
            );
        }
        let mut config = match &args.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(root) = args.root {
            config.root = std::path::absolute(root)?;
        }
        self.run(config)
    }

    /// The whole program: logging to stderr (`UMDEV_LOG` filters), the command line, the
    /// daemon or the one-device mode, the exit status.
    pub fn main(self) -> ExitCode {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("UMDEV_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .init();
        match self.run_args(Args::parse()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("umdevd: {e:#}");
                ExitCode::FAILURE
            }
        }
    }
}
