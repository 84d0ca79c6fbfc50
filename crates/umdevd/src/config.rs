//! The daemon's configuration file (TOML): where things go and which parents to host.
//!
//! ```toml
//! root = "/run/umdev"          # sysfs tree at <root>/sys; mdevctl's dirs under it
//! state_dir = "/run/umdev/state"      # lock file and control socket (default <root>/state)
//! sockets_dir = "/run/umdev/sockets"  # one vfio-user socket per mdev (default <root>/sockets)
//! socket_mode = "0600"
//! socket_owner = "qemu:kvm"    # user[:group], names or numbers; default: the daemon's
//! release_timeout_ms = 2000    # how long `remove` waits for a client after REQ
//!
//! [[parent]]
//! name = "mtty0"
//! driver = "mtty"
//! ports = 24                   # the pool (default 24)
//! console = "socket"           # "socket" (<sockets_dir>/<uuid>.port<N>.sock), "pty", "none"
//! peer_to_peer = false
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_root")]
    pub root: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub sockets_dir: Option<PathBuf>,
    #[serde(default = "default_mode")]
    pub socket_mode: String,
    pub socket_owner: Option<String>,
    #[serde(default = "default_release_timeout")]
    pub release_timeout_ms: u64,
    #[serde(default = "default_parents")]
    pub parent: Vec<ParentConfig>,
}

/// One parent to host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentConfig {
    pub name: String,
    pub driver: String,
    pub ports: Option<u32>,
    #[serde(default)]
    pub console: ConsoleConfig,
    #[serde(default)]
    pub peer_to_peer: bool,
}

/// Where mtty ports' host sides go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    #[default]
    Socket,
    Pty,
    None,
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

/// Two sample mtty parents, `mtty0` and `mtty1`.
fn default_parents() -> Vec<ParentConfig> {
    ["mtty0", "mtty1"]
        .iter()
        .map(|n| ParentConfig {
            name: (*n).into(),
            driver: "mtty".into(),
            ports: None,
            console: ConsoleConfig::Socket,
            peer_to_peer: false,
        })
        .collect()
}

impl ParentConfig {
    /// The parent driver this configuration describes (only `mtty` exists).
    pub fn build(&self, sockets_dir: &Path) -> Result<std::sync::Arc<dyn umdev_core::Parent>> {
        if self.driver != "mtty" {
            bail!("unknown driver {:?} (known: mtty)", self.driver);
        }
        let console = match self.console {
            ConsoleConfig::None => umdev_mtty::parent::Console::None,
            ConsoleConfig::Pty => umdev_mtty::parent::Console::Pty,
            ConsoleConfig::Socket => umdev_mtty::parent::Console::Sockets(sockets_dir.to_owned()),
        };
        let parent = umdev_mtty::parent::MttyParent::new(
            self.ports.unwrap_or(umdev_mtty::parent::POOL_PORTS),
            console,
        )
        .with_peer_to_peer(self.peer_to_peer);
        Ok(std::sync::Arc::new(parent))
    }
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
            parent: default_parents(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Config =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<()> {
        if !self.root.is_absolute() {
            bail!("root must be an absolute path, not {}", self.root.display());
        }
        self.mode()?;
        let mut names = std::collections::BTreeSet::new();
        for p in &self.parent {
            if p.driver != "mtty" {
                bail!(
                    "parent {}: unknown driver {:?} (known: mtty)",
                    p.name,
                    p.driver
                );
            }
            if !names.insert(p.name.clone()) {
                bail!("parent {} is configured twice", p.name);
            }
        }
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.root.join("state"))
    }

    pub fn sockets_dir(&self) -> PathBuf {
        self.sockets_dir
            .clone()
            .unwrap_or_else(|| self.root.join("sockets"))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.state_dir().join("control.sock")
    }

    pub fn sys_dir(&self) -> PathBuf {
        self.root.join("sys")
    }

    pub fn mode(&self) -> Result<u32> {
        let m = u32::from_str_radix(&self.socket_mode, 8)
            .with_context(|| format!("socket_mode {:?} is not octal", self.socket_mode))?;
        if m > 0o7777 {
            bail!("socket_mode {:?} is out of range", self.socket_mode);
        }
        Ok(m)
    }

    /// `socket_owner` as numbers.
    pub fn owner(&self) -> Result<Option<(u32, Option<u32>)>> {
        let Some(s) = &self.socket_owner else {
            return Ok(None);
        };
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s.as_str(), None),
        };
        let uid = lookup_id(u, "/etc/passwd")?;
        let gid = g.map(|g| lookup_id(g, "/etc/group")).transpose()?;
        Ok(Some((uid, gid)))
    }
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

    #[test]
    fn an_empty_file_hosts_two_mtty_parents_under_run_umdev() {
        let c: Config = toml::from_str("").unwrap();
        c.check().unwrap();
        assert_eq!(c.root, Path::new("/run/umdev"));
        assert_eq!(c.sockets_dir(), Path::new("/run/umdev/sockets"));
        assert_eq!(c.mode().unwrap(), 0o600);
        let names: Vec<_> = c.parent.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["mtty0", "mtty1"]);
    }

    #[test]
    fn parents_owner_and_mode_are_read() {
        let c: Config = toml::from_str(
            r#"
            root = "/tmp/x"
            socket_mode = "0660"
            socket_owner = "0:root"
            [[parent]]
            name = "p"
            driver = "mtty"
            ports = 4
            console = "none"
            "#,
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(c.mode().unwrap(), 0o660);
        assert_eq!(c.owner().unwrap(), Some((0, Some(0))));
        assert_eq!(c.parent[0].console, ConsoleConfig::None);
    }

    #[test]
    fn unknown_drivers_keys_and_duplicates_are_refused() {
        let bad = [
            "[[parent]]\nname = \"p\"\ndriver = \"nope\"",
            "colour = 1",
            "[[parent]]\nname = \"p\"\ndriver = \"mtty\"\n[[parent]]\nname = \"p\"\ndriver = \"mtty\"",
            "root = \"relative\"",
            "socket_mode = \"9\"",
        ];
        for b in bad {
            let r = toml::from_str::<Config>(b)
                .map_err(anyhow::Error::from)
                .and_then(|c| c.check());
            assert!(r.is_err(), "{b}");
        }
    }
}
