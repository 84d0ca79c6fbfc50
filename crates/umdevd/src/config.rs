//! The daemon's configuration file (TOML): where things go, the servers' tunables, and which
//! parents to host. A parent's `options` belong to its driver, which checks them: an
//! unknown or ill-typed key is refused with its name and the driver's keys.
//!
//! ```toml
//! root = "/run/umdev"                 # sysfs tree at <root>/sys; mdevctl's dirs under it
//! state_dir = "/run/umdev/state"      # lock file and control socket (default <root>/state)
//! sockets_dir = "/run/umdev/sockets"  # a directory per mdev (default <root>/sockets)
//! socket_mode = "0600"                # each device's sockets (its directory gets x bits)
//! socket_owner = "qemu:kvm"           # user[:group], names or numbers; default: the daemon's
//!                                     # (the sysfs tree's writable files follow both)
//! release_timeout_ms = 2000           # how long `remove` waits for a client after REQ
//! isolation = "thread"                # "worker": each IOMMU group in a process of its own
//! upgrade_on_replace = false          # workers only: when this binary is replaced on disk,
//!                                     # upgrade every worker to it (`umdevctl upgrade --all`)
//!
//! [sandbox]                           # workers only: Landlock, seccomp, no capabilities
//! enabled = true
//! on_violation = "kill"               # a system call outside the filter: "eperm", "log"
//! allow = ["/srv/disks"]              # also openable by every worker (shared storage)
//!
//! [server]                            # every device's vfio-user server
//! spin_us = 0                         # poll the socket this long before sleeping
//! dma_timeout_ms = 5000               # a client's answer to a DMA_READ/WRITE
//! unpin_timeout_ms = 1000             # a device's release of its pins at DMA_UNMAP
//! max_data_xfer_size = 1048576        # announced in VERSION
//! max_dma_maps = 65535                # announced in VERSION
//! version_timeout_ms = 2000           # a client's time to complete VERSION after connecting
//! unsealed_memory = "accept"          # or "refuse": DMA_MAP only of files sealed F_SEAL_SHRINK
//! send_timeout_ms = 10000             # a client that leaves replies unread is disconnected
//! allow_uids = [107]                  # only these peers (SO_PEERCRED) may connect (empty: any),
//!                                     # and write the sysfs tree (root always may)
//! allow_gids = []
//! max_requests_per_sec = 0            # per client session (0: no limit)
//! listen_backlog = 32                 # connections waiting to be accepted, per device socket
//!
//! [cgroup]                            # workers only: a CPU cgroup per worker
//! path = "/sys/fs/cgroup/umdev"       # v2 (cpu delegated) or under v1's cpu hierarchy
//! cpu_weight = 100                    # each worker's (1..10000), unless a parent sets more
//!
//! [[parent]]
//! name = "mtty0"
//! driver = "mtty"
//! socket_mode = "0660"                # this parent's devices (default: the daemon's)
//! socket_owner = "qemu"
//! cpu_weight = 400                    # its workers' CPU weight ([cgroup])
//!
//! [[device]]                          # one device's own sockets (and tree files), any parent
//! uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
//! socket_owner = "alice:kvm"
//! socket_mode = "0660"
//! [parent.options]                    # the driver's own (`umdevctl drivers` lists them)
//! ports = 24
//! console = "socket"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use umdev_core::Drivers;
use umdev_core::MdevUuid;
use umdev_server::ServerConfig;
use umdev_transport::{PolicyOverride, SocketPolicy, Stale};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Root of the management tree.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// Lock file and control socket (default `<root>/state`).
    pub state_dir: Option<PathBuf>,
    /// A directory per device (default `<root>/sockets`).
    pub sockets_dir: Option<PathBuf>,
    /// Mode of every device's sockets (octal text).
    #[serde(default = "default_mode")]
    pub socket_mode: String,
    /// Owner of every device's sockets (`user[:group]`).
    pub socket_owner: Option<String>,
    /// How long `remove` waits for a client after REQ.
    #[serde(default = "default_release_timeout")]
    pub release_timeout_ms: u64,
    /// The vfio-user servers' tunables.
    #[serde(default)]
    pub server: ServerSection,
    /// Where devices run: threads of the daemon, or a worker process per IOMMU group.
    #[serde(default)]
    pub isolation: Isolation,
    /// How workers confine themselves.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// With workers: when the daemon's binary is replaced on disk, upgrade every worker to
    /// it (a live upgrade, as `umdevctl upgrade --all`).
    #[serde(default)]
    pub upgrade_on_replace: bool,
    /// With workers: a CPU cgroup per worker, with a weight.
    pub cgroup: Option<CgroupConfig>,
    /// The parents to host (absent: the daemon's defaults).
    pub parent: Option<Vec<ParentConfig>>,
    /// Devices with a socket policy of their own.
    pub device: Option<Vec<DeviceConfig>>,
}

/// `[[device]]`: one device's sockets (and writable files in the tree), by UUID, over its
/// parent's policy: for a device given to one VM's user.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device (whichever parent it is created on).
    pub uuid: String,
    /// Mode of its sockets.
    pub socket_mode: Option<String>,
    /// Owner of its sockets (`user[:group]`).
    pub socket_owner: Option<String>,
}

/// `[cgroup]`: each worker in a CPU cgroup of its own (workers only).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CgroupConfig {
    /// The directory the workers' cgroups go under: in a cgroup v2 subtree delegated to
    /// the daemon with the cpu controller, or in cgroup v1's cpu hierarchy.
    pub path: PathBuf,
    /// Each worker's CPU weight (1 to 10000; 100 is the kernel's default), unless one of
    /// its devices' parents sets its own.
    #[serde(default = "default_cpu_weight")]
    pub cpu_weight: u32,
}

fn default_cpu_weight() -> u32 {
    100
}

/// What happens to a system call outside the filter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Violation {
    /// The worker is killed (SIGSYS); the daemon starts it again.
    #[default]
    Kill,
    /// The call fails with EPERM.
    Eperm,
    /// The call goes through; the kernel logs it (for finding what a driver needs).
    Log,
}

/// The sandbox settings (`[sandbox]` in the configuration; workers only).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Whether workers sandbox themselves.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// What a system call outside the filter does.
    #[serde(default)]
    pub on_violation: Violation,
    /// Directories or files every worker may open besides its devices' own and what their
    /// drivers declare (shared storage holding disks adopted at run time).
    #[serde(default)]
    pub allow: Vec<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            enabled: true,
            on_violation: Violation::Kill,
            allow: Vec::new(),
        }
    }
}

/// Where devices run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A server thread (and a session thread) per device in the daemon: for tests and small
    /// setups; a device's fault is the daemon's.
    #[default]
    Thread,
    /// A worker process per IOMMU group (the daemon's own binary, `umdevd worker`), started
    /// and supervised by the daemon: a worker that dies takes down only its group's
    /// devices, and is started again.
    Worker,
}

/// `[server]`: every device's vfio-user server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Poll the socket this long before sleeping (0: never poll).
    #[serde(default)]
    pub spin_us: u64,
    /// How long a device's DMA message waits for the client's answer.
    #[serde(default = "default_dma_timeout")]
    pub dma_timeout_ms: u64,
    /// How long DMA_UNMAP waits for a device to release its pins before revoking them.
    #[serde(default = "default_unpin_timeout")]
    pub unpin_timeout_ms: u64,
    /// Largest transfer a client may ask for in one message.
    #[serde(default = "default_max_xfer")]
    pub max_data_xfer_size: u32,
    /// Most DMA mappings a client may hold.
    #[serde(default = "default_max_maps")]
    pub max_dma_maps: u32,
    /// How long a client that connected has to complete VERSION (until then, a new
    /// connection takes its place).
    #[serde(default = "default_version_timeout")]
    pub version_timeout_ms: u64,
    /// Memory files not sealed against shrinking: accepted (an access to memory the client
    /// took away fails), or refused at DMA_MAP.
    #[serde(default)]
    pub unsealed_memory: UnsealedMemory,
    /// How long a reply may wait for room in a client's socket before the client (which
    /// stopped reading) is disconnected.
    #[serde(default = "default_send_timeout")]
    pub send_timeout_ms: u64,
    /// Only these peer uids may connect to devices (empty: anyone the sockets' owner and
    /// mode let in).
    #[serde(default)]
    pub allow_uids: Vec<u32>,
    /// Only these peer gids may connect to devices (empty: any).
    #[serde(default)]
    pub allow_gids: Vec<u32>,
    /// Most requests per second a client's session handles (0: no limit).
    #[serde(default)]
    pub max_requests_per_sec: u32,
    /// Connections that may wait to be accepted on each device's socket.
    #[serde(default = "default_backlog")]
    pub listen_backlog: u32,
}

fn default_backlog() -> u32 {
    32
}

fn default_send_timeout() -> u64 {
    10_000
}

/// What a server does with a DMA_MAP of a file not sealed against shrinking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnsealedMemory {
    /// Accepted; SIGBUS on memory that went is caught and the access fails (EFAULT).
    #[default]
    Accept,
    /// Refused (EPERM): only memfds sealed with `F_SEAL_SHRINK`, as QEMU's memfd backend.
    Refuse,
}

fn default_version_timeout() -> u64 {
    2000
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            spin_us: 0,
            dma_timeout_ms: default_dma_timeout(),
            unpin_timeout_ms: default_unpin_timeout(),
            max_data_xfer_size: default_max_xfer(),
            max_dma_maps: default_max_maps(),
            version_timeout_ms: default_version_timeout(),
            unsealed_memory: UnsealedMemory::Accept,
            send_timeout_ms: default_send_timeout(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            max_requests_per_sec: 0,
            listen_backlog: default_backlog(),
        }
    }
}

impl ServerSection {
    /// The server configuration these tunables make.
    pub fn server_config(&self) -> Result<ServerConfig> {
        if self.max_data_xfer_size < 4096 {
            bail!("[server] max_data_xfer_size must be at least 4096");
        }
        if self.max_dma_maps == 0 {
            bail!("[server] max_dma_maps must be at least 1");
        }
        if !(1..=4096).contains(&self.listen_backlog) {
            bail!("[server] listen_backlog must be between 1 and 4096");
        }
        Ok(ServerConfig {
            spin: Duration::from_micros(self.spin_us),
            dma_timeout: Duration::from_millis(self.dma_timeout_ms),
            unpin_timeout: Duration::from_millis(self.unpin_timeout_ms),
            max_data_xfer_size: self.max_data_xfer_size,
            max_dma_maps: self.max_dma_maps,
            version_timeout: Duration::from_millis(self.version_timeout_ms.max(1)),
            refuse_unsealed: self.unsealed_memory == UnsealedMemory::Refuse,
            send_timeout: Duration::from_millis(self.send_timeout_ms.max(1)),
            allow_uids: self.allow_uids.clone(),
            allow_gids: self.allow_gids.clone(),
            max_requests_per_sec: self.max_requests_per_sec,
            listen_backlog: self.listen_backlog,
            ..ServerConfig::default()
        })
    }
}

/// One parent to host.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    /// Its name (`mtty0`).
    pub name: String,
    /// Its driver (`mtty`).
    pub driver: String,
    /// The driver's options, checked by the driver.
    #[serde(default)]
    pub options: Map<String, Value>,
    /// Mode of this parent's devices' sockets, instead of the daemon's.
    pub socket_mode: Option<String>,
    /// Owner of this parent's devices' sockets, instead of the daemon's.
    pub socket_owner: Option<String>,
    /// The CPU weight of the workers serving this parent's devices (`[cgroup]`).
    pub cpu_weight: Option<u32>,
}

impl ParentConfig {
    /// A parent of `driver` with these options and the daemon's socket policy.
    pub fn new(name: &str, driver: &str, options: Map<String, Value>) -> ParentConfig {
        ParentConfig {
            name: name.to_owned(),
            driver: driver.to_owned(),
            options,
            socket_mode: None,
            socket_owner: None,
            cpu_weight: None,
        }
    }
}

fn default_root() -> PathBuf {
    PathBuf::from("/run/umdev")
}

fn default_mode() -> String {
    "0600".into()
}

fn default_release_timeout() -> u64 {
    2000
}

fn default_dma_timeout() -> u64 {
    5000
}

fn default_unpin_timeout() -> u64 {
    1000
}

fn default_max_xfer() -> u32 {
    umdev_proto::DEFAULT_MAX_DATA_XFER_SIZE
}

fn default_max_maps() -> u32 {
    umdev_proto::DEFAULT_MAX_DMA_MAPS
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: default_root(),
            state_dir: None,
            sockets_dir: None,
            socket_mode: default_mode(),
            socket_owner: None,
            release_timeout_ms: default_release_timeout(),
            server: ServerSection::default(),
            isolation: Isolation::default(),
            sandbox: SandboxConfig::default(),
            upgrade_on_replace: false,
            cgroup: None,
            parent: None,
            device: None,
        }
    }
}

impl Config {
    /// Reads and parses `path` (not yet checked against the drivers: see [`check`]).
    ///
    /// [`check`]: Config::check
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(c)
    }

    /// Checks everything that can be checked before starting: paths, modes, owners, the
    /// server's tunables, every parent's driver and options.
    pub fn check(&self, drivers: &Drivers) -> Result<()> {
        if !self.root.is_absolute() {
            bail!("root must be an absolute path, not {}", self.root.display());
        }
        self.policy()?;
        self.server.server_config()?;
        let weight_ok = |w: u32| (1..=10_000).contains(&w);
        if let Some(c) = &self.cgroup {
            if self.isolation != Isolation::Worker {
                bail!("[cgroup] needs isolation = \"worker\" (it places worker processes)");
            }
            if !weight_ok(c.cpu_weight) {
                bail!("[cgroup] cpu_weight must be between 1 and 10000");
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for p in self.parent.iter().flatten() {
            drivers
                .options(&p.driver, &p.options)
                .with_context(|| format!("parent {}", p.name))?;
            self.parent_policy(p)
                .with_context(|| format!("parent {}", p.name))?;
            if let Some(w) = p.cpu_weight {
                if self.cgroup.is_none() {
                    bail!("parent {}: cpu_weight needs a [cgroup] section", p.name);
                }
                if !weight_ok(w) {
                    bail!("parent {}: cpu_weight must be between 1 and 10000", p.name);
                }
            }
            if !names.insert(p.name.clone()) {
                bail!("parent {} is configured twice", p.name);
            }
        }
        self.device_policies()?;
        Ok(())
    }

    /// The lock file and control socket's directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.root.join("state"))
    }

    /// Where device directories go.
    pub fn sockets_dir(&self) -> PathBuf {
        self.sockets_dir
            .clone()
            .unwrap_or_else(|| self.root.join("sockets"))
    }

    /// The control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir().join("control.sock")
    }

    /// The sysfs tree's mount point.
    pub fn sys_dir(&self) -> PathBuf {
        self.root.join("sys")
    }

    /// The daemon-wide socket policy for devices.
    pub fn policy(&self) -> Result<SocketPolicy> {
        Ok(SocketPolicy {
            stale: Stale::Replace,
            mode: parse_mode(&self.socket_mode)?,
            owner: self.socket_owner.as_deref().map(parse_owner).transpose()?,
        })
    }

    /// What each `[[device]]` sets over its parent's policy.
    pub fn device_policies(&self) -> Result<BTreeMap<MdevUuid, PolicyOverride>> {
        let mut out = BTreeMap::new();
        for d in self.device.iter().flatten() {
            let uuid = MdevUuid::parse(&d.uuid)
                .with_context(|| format!("[[device]] uuid {:?}", d.uuid))?;
            let o = PolicyOverride {
                mode: d.socket_mode.as_deref().map(parse_mode).transpose()?,
                owner: d.socket_owner.as_deref().map(parse_owner).transpose()?,
            };
            if out.insert(uuid, o).is_some() {
                bail!("device {uuid} is configured twice");
            }
        }
        Ok(out)
    }

    /// The socket policy of `p`'s devices: its own mode and owner where it sets them.
    pub fn parent_policy(&self, p: &ParentConfig) -> Result<SocketPolicy> {
        let mut policy = self.policy()?;
        if let Some(m) = &p.socket_mode {
            policy.mode = parse_mode(m)?;
        }
        if let Some(o) = &p.socket_owner {
            policy.owner = Some(parse_owner(o)?);
        }
        Ok(policy)
    }
}

/// An octal file mode (`"0660"`).
pub fn parse_mode(s: &str) -> Result<u32> {
    let m = u32::from_str_radix(s, 8).with_context(|| format!("socket mode {s:?} is not octal"))?;
    if m > 0o777 {
        bail!("socket mode {s:?} is out of range");
    }
    Ok(m)
}

/// `user[:group]`, each a number or a name from `/etc/passwd` and `/etc/group`.
pub fn parse_owner(s: &str) -> Result<(u32, Option<u32>)> {
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = lookup_id(u, "/etc/passwd")?;
    let gid = g.map(|g| lookup_id(g, "/etc/group")).transpose()?;
    Ok((uid, gid))
}

/// A number, or a name looked up in a passwd/group style file (third field).
fn lookup_id(name: &str, file: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 2 && f[0] == name {
            return f[2]
                .parse()
                .with_context(|| format!("bad id for {name} in {file}"));
        }
    }
    bail!("no {name} in {file}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drivers() -> Drivers {
        let mut d = Drivers::default();
        d.add(umdev_mtty::MttyDriver);
        d
    }

    fn checked(text: &str) -> Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.check(&drivers())?;
        Ok(c)
    }

    #[test]
    fn an_empty_file_uses_run_umdev_and_the_daemons_default_parents() {
        let c = checked("").unwrap();
        assert_eq!(c.root, Path::new("/run/umdev"));
        assert_eq!(c.sockets_dir(), Path::new("/run/umdev/sockets"));
        assert_eq!(c.policy().unwrap().mode, 0o600);
        assert!(c.parent.is_none());
        assert_eq!(c.server.server_config().unwrap().spin, Duration::ZERO);
    }

    #[test]
    fn parents_options_owner_mode_and_server_are_read() {
        let c = checked(
            r#"
            root = "/tmp/x"
            socket_mode = "0660"
            socket_owner = "0:root"
            [server]
            spin_us = 30
            unpin_timeout_ms = 200
            [[parent]]
            name = "p"
            driver = "mtty"
            socket_mode = "0600"
            [parent.options]
            ports = 4
            console = "none"
            "#,
        )
        .unwrap();
        assert_eq!(c.policy().unwrap().mode, 0o660);
        assert_eq!(c.policy().unwrap().owner, Some((0, Some(0))));
        let p = &c.parent.as_ref().unwrap()[0];
        assert_eq!(c.parent_policy(p).unwrap().mode, 0o600);
        assert_eq!(p.options["ports"], 4);
        let s = c.server.server_config().unwrap();
        assert_eq!(s.spin, Duration::from_micros(30));
        assert_eq!(s.unpin_timeout, Duration::from_millis(200));
    }

    #[test]
    fn unknown_drivers_options_keys_and_duplicates_are_refused_by_name() {
        let bad = [
            ("[[parent]]\nname = \"p\"\ndriver = \"nope\"", "no parent driver nope"),
            ("colour = 1", "colour"),
            ("[server]\nspin = 1", "spin"),
            (
                "[[parent]]\nname = \"p\"\ndriver = \"mtty\"\n[parent.options]\nport = 4",
                "has no option port (its options: ports, console, peer_to_peer)",
            ),
            (
                "[[parent]]\nname = \"p\"\ndriver = \"mtty\"\n[parent.options]\nports = \"many\"",
                "option ports: expected an integer",
            ),
            (
                "[[parent]]\nname = \"p\"\ndriver = \"mtty\"\n[[parent]]\nname = \"p\"\ndriver = \"mtty\"",
                "configured twice",
            ),
            ("root = \"relative\"", "absolute"),
            ("socket_mode = \"9\"", "not octal"),
            ("[[device]]\nuuid = \"nope\"", "[[device]] uuid"),
            (
                "[[device]]\nuuid = \"83b8f4f2-509f-382f-3c1e-e6bfe0fa1001\"\nsocket_mode = \"8\"",
                "not octal",
            ),
            ("[server]\nlisten_backlog = 0", "listen_backlog"),
            ("[cgroup]\npath = \"/sys/fs/cgroup/umdev\"", "needs isolation"),
            (
                "isolation = \"worker\"\n[cgroup]\npath = \"/x\"\ncpu_weight = 0",
                "between 1 and 10000",
            ),
            (
                "[[parent]]\nname = \"p\"\ndriver = \"mtty\"\ncpu_weight = 200",
                "needs a [cgroup] section",
            ),
        ];
        for (b, why) in bad {
            let e = checked(b).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{b}: {e:#}");
        }
    }
}
