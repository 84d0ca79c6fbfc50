//! Who may write the tree: the same policy as who may connect to a device.
//!
//! A parent's writable files (`create`, its writable attributes) and its devices' (`remove`,
//! their writable attributes) take the owner and group of the parent's device sockets (a
//! device's own, where `[[device]]` sets them), and the group and other write bits of their
//! mode: with `socket_owner = "qemu:kvm"` and
//! `socket_mode = "0660"`, group `kvm` may create and remove that parent's devices, as it
//! may connect to them. The kernel checks the bits (the mount has `default_permissions`).
//! Then the peer allow-lists: when either is set, a write by a user other than root (or the
//! daemon's own) whose uid or primary gid is not listed is refused with EACCES, logged and
//! counted. Everything else keeps sysfs's modes and the daemon's ownership.

use std::collections::BTreeMap;
use std::sync::Arc;

use umdev_core::{Core, MdevUuid};
use umdev_transport::{PolicyOverride, SocketPolicy};

use crate::tree::File;

/// Called with the reason of each write refused by the allow-lists (the daemon logs it,
/// rate-limited, and counts it).
pub type OnRefused = Arc<dyn Fn(&str) + Send + Sync>;

/// The write policy of the whole tree: the sockets' policies (the default one's mode is
/// 0600, the daemon's own).
#[derive(Clone, Default)]
pub struct WriteAccess {
    /// Parents without an entry in `parents`.
    pub default: SocketPolicy,
    /// Parents with their own owner or mode.
    pub parents: BTreeMap<String, SocketPolicy>,
    /// Devices with their own owner or mode, over their parent's.
    pub devices: BTreeMap<MdevUuid, PolicyOverride>,
    /// Writers other than root and the daemon's user must have one of these uids (empty: any).
    pub allow_uids: Vec<u32>,
    /// ... and one of these primary gids (empty: any).
    pub allow_gids: Vec<u32>,
    /// Told of each refusal.
    pub on_refused: Option<OnRefused>,
}

impl std::fmt::Debug for WriteAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteAccess")
            .field("default", &self.default)
            .field("parents", &self.parents)
            .field("devices", &self.devices)
            .field("allow_uids", &self.allow_uids)
            .field("allow_gids", &self.allow_gids)
            .finish_non_exhaustive()
    }
}

impl WriteAccess {
    fn parent_policy(&self, parent: &str) -> SocketPolicy {
        self.parents.get(parent).copied().unwrap_or(self.default)
    }

    /// The policy a writable file follows; `None` for read-only files.
    fn policy_of(&self, core: &Core, f: &File) -> Option<SocketPolicy> {
        match f {
            File::Create { parent, .. }
            | File::ParentAttr {
                parent,
                writable: true,
                ..
            } => Some(self.parent_policy(parent)),
            File::Remove(uuid)
            | File::Attr {
                uuid,
                writable: true,
                ..
            } => {
                let parent = self.parent_policy(&core.mdev(uuid)?.parent);
                Some(match self.devices.get(uuid) {
                    Some(o) => o.apply(parent),
                    None => parent,
                })
            }
            _ => None,
        }
    }

    /// Owner, group and mode of `f`, the daemon being `me` (uid, gid).
    pub(crate) fn attr(&self, core: &Core, f: &File, me: (u32, u32)) -> (u32, u32, u16) {
        let base = f.mode();
        let Some(p) = self.policy_of(core, f) else {
            return (me.0, me.1, base);
        };
        // Only write bits are given; the mode is at most 0o777, so it fits.
        let extra = u16::try_from(p.mode & 0o022).unwrap_or(0);
        let (uid, gid) = match p.owner {
            Some((u, g)) => (u, g.unwrap_or(me.1)),
            None => me,
        };
        (uid, gid, base | extra)
    }

    /// Whether a write by `uid`/`gid` passes the allow-lists (the kernel has checked the
    /// mode). Root and the daemon's user always may.
    pub(crate) fn allows(&self, uid: u32, gid: u32, me: u32) -> bool {
        uid == 0
            || uid == me
            || ((self.allow_uids.is_empty() || self.allow_uids.contains(&uid))
                && (self.allow_gids.is_empty() || self.allow_gids.contains(&gid)))
    }

    pub(crate) fn refused(&self, why: &str) {
        match &self.on_refused {
            Some(f) => f(why),
            None => tracing::warn!("sysfs write refused: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_the_daemon_always_pass_the_allow_lists() {
        let a = WriteAccess {
            allow_uids: vec![107],
            allow_gids: vec![36],
            ..WriteAccess::default()
        };
        assert!(a.allows(0, 0, 1000));
        assert!(a.allows(1000, 1000, 1000));
        assert!(a.allows(107, 36, 1000));
        assert!(!a.allows(107, 37, 1000));
        assert!(!a.allows(108, 36, 1000));
        assert!(WriteAccess::default().allows(5, 5, 1000));
    }
}
