//! The command line: mdevctl's commands and options, and umdevctl's own.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Manage umdev's mediated devices, as mdevctl manages the kernel's, through umdevd's
/// control API.
#[derive(Debug, Parser)]
#[command(name = "umdevctl", version, about)]
pub struct Cli {
    /// umdevd's control socket.
    #[arg(long, global = true, env = "UMDEV_CONTROL", default_value = umdev_api::control::DEFAULT_CONTROL_SOCKET)]
    pub control: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Define a persistent mediated device (of an active device, or of parent and type).
    Define {
        /// UUID of the device (generated and printed if not given).
        #[arg(short, long)]
        uuid: Option<String>,
        /// Start the device automatically with its parent.
        #[arg(short, long, conflicts_with = "jsonfile")]
        auto: bool,
        /// Parent device.
        #[arg(short, long)]
        parent: Option<String>,
        /// Type of the device.
        #[arg(short = 't', long = "type", conflicts_with = "jsonfile")]
        mdev_type: Option<String>,
        /// A definition in mdevctl's JSON format.
        #[arg(long)]
        jsonfile: Option<PathBuf>,
        /// Go on despite errors.
        #[arg(short, long)]
        force: bool,
    },
    /// Remove a persistent definition.
    Undefine {
        /// UUID of the device.
        #[arg(short, long)]
        uuid: String,
        /// Parent device.
        #[arg(short, long)]
        parent: Option<String>,
        /// Go on despite errors.
        #[arg(short, long)]
        force: bool,
    },
    /// Modify a persistent definition.
    Modify {
        /// UUID of the device.
        #[arg(short, long)]
        uuid: String,
        /// Parent device.
        #[arg(short, long)]
        parent: Option<String>,
        /// New type.
        #[arg(short = 't', long = "type")]
        mdev_type: Option<String>,
        /// Add an attribute (with --value, at --index).
        #[arg(long, requires = "value")]
        addattr: Option<String>,
        /// Delete the attribute at --index (else the last).
        #[arg(long, conflicts_with = "addattr")]
        delattr: bool,
        /// Attribute position.
        #[arg(short, long)]
        index: Option<u32>,
        /// Value of the added attribute.
        #[arg(long)]
        value: Option<String>,
        /// Start with the parent.
        #[arg(short, long, conflicts_with = "manual")]
        auto: bool,
        /// Start only on request.
        #[arg(short, long)]
        manual: bool,
        /// Change the active device (not supported by umdev: no callouts).
        #[arg(short, long)]
        live: bool,
        /// With --live, change the definition too.
        #[arg(short, long)]
        defined: bool,
        /// A new definition in mdevctl's JSON format.
        #[arg(long)]
        jsonfile: Option<PathBuf>,
        /// Go on despite errors.
        #[arg(short, long)]
        force: bool,
    },
    /// Start a mediated device: a defined one, or a new one of parent and type.
    Start {
        /// UUID of the device (generated and printed if not given).
        #[arg(short, long)]
        uuid: Option<String>,
        /// Parent device.
        #[arg(short, long)]
        parent: Option<String>,
        /// Type of the device.
        #[arg(short = 't', long = "type")]
        mdev_type: Option<String>,
        /// A definition in mdevctl's JSON format.
        #[arg(long, conflicts_with = "mdev_type")]
        jsonfile: Option<PathBuf>,
        /// Go on despite errors.
        #[arg(short, long)]
        force: bool,
    },
    /// Stop (remove) an active mediated device.
    Stop {
        /// UUID of the device.
        #[arg(short, long)]
        uuid: String,
        /// Go on despite errors.
        #[arg(short, long)]
        force: bool,
    },
    /// List active (or defined) mediated devices.
    List {
        /// Defined devices instead of active ones.
        #[arg(short, long)]
        defined: bool,
        /// JSON output.
        #[arg(long)]
        dumpjson: bool,
        /// Show attributes.
        #[arg(short, long)]
        verbose: bool,
        /// Only this device.
        #[arg(short, long)]
        uuid: Option<String>,
        /// Only this parent.
        #[arg(short, long)]
        parent: Option<String>,
    },
    /// List the parents' types.
    Types {
        /// Only this parent.
        #[arg(short, long)]
        parent: Option<String>,
        /// JSON output.
        #[arg(long)]
        dumpjson: bool,
    },
    /// Print an active device's vfio-user socket and a QEMU -device argument for it.
    Socket {
        /// UUID of the device.
        uuid: String,
    },
    /// List the IOMMU groups, their devices and which client holds each.
    Groups,
    /// Live-migrate a device from one vfio-user socket to another (for setups whose VMM
    /// cannot migrate vfio-user devices): pre-copy rounds while the dirty data shrinks, then
    /// STOP_COPY, RESUMING and RUNNING on the destination. Each end is a socket path, or the
    /// UUID of an active device of the daemon at --control.
    Migrate {
        /// The source device.
        from: String,
        /// The destination device (same type, not in use).
        to: String,
        /// Most pre-copy rounds.
        #[arg(long, default_value_t = 16)]
        max_rounds: usize,
    },
    /// Counters of every device (or of one), in the Prometheus text format (as the
    /// daemon's metrics socket serves them).
    Stats {
        /// Only this device's.
        uuid: Option<String>,
    },
    /// Live upgrade (isolation = "worker"): replace the worker of one IOMMU group, or every
    /// worker, by the daemon's binary as it is on disk now; clients keep their devices and
    /// connections and see a pause.
    Upgrade {
        /// Only the worker of this IOMMU group (`umdevctl groups` lists them).
        #[arg(long, conflicts_with = "all")]
        group: Option<u32>,
        /// Every worker.
        #[arg(long)]
        all: bool,
    },
    /// Stop the daemon. With worker isolation its workers serve on (the next daemon adopts
    /// them) unless --remove-devices.
    Shutdown {
        /// Remove every device first (their clients lose them).
        #[arg(long)]
        remove_devices: bool,
    },
    /// Register a parent device at run time (its auto-start definitions start).
    AddParent {
        /// The parent's name.
        name: String,
        /// Its driver (`umdevctl drivers` lists them).
        driver: String,
        /// An option of the driver (repeatable); the driver checks it.
        #[arg(long = "opt", value_name = "KEY=VALUE")]
        opts: Vec<String>,
    },
    /// List the parent drivers the daemon knows and their options.
    Drivers {
        /// JSON output.
        #[arg(long)]
        dumpjson: bool,
    },
    /// Change who may use an active device: the owner and mode of its directory and
    /// sockets.
    Access {
        /// UUID of the device.
        uuid: String,
        /// New owner, `user[:group]` (names or numbers).
        #[arg(long)]
        owner: Option<String>,
        /// New socket mode, octal (the directory gets search permission to match).
        #[arg(long)]
        mode: Option<String>,
    },
    /// Write a display device's current scan-out as a PNG file.
    Screenshot {
        /// UUID of the device.
        uuid: String,
        /// The PNG file to write.
        out: std::path::PathBuf,
        /// Rewrite the file every SECONDS until interrupted (for following a console).
        #[arg(long, value_name = "SECONDS")]
        watch: Option<f64>,
    },
    /// Unregister a parent device, removing its devices.
    RemoveParent {
        /// The parent's name.
        name: String,
        /// Remove devices even while clients hold them.
        #[arg(short, long)]
        force: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Manpage,
}
