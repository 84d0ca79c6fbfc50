//! Listening sockets: the one place umdev binds a UNIX socket, so every socket it offers (a
//! device's vfio-user socket, a device's host-side sockets, the daemon's control socket)
//! gets the same treatment of a path that is already there, the same mode and the same owner.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// What to do when the path to bind already exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stale {
    /// Remove a socket file found there; the caller knows nobody else serves it (it holds
    /// the state directory's lock). Anything that is not a socket is refused.
    Replace,
    /// Remove a socket file only if nobody accepts connections on it (left by a process
    /// that died); refuse one that is served, and anything that is not a socket.
    IfDead,
}

/// How a socket is bound: what happens to an existing path, its mode and its owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPolicy {
    /// Treatment of an existing path.
    pub stale: Stale,
    /// File mode of the socket (`0o600` by default: whoever may connect controls a device).
    pub mode: u32,
    /// Owner (uid) and group (gid), if not the binding process's.
    pub owner: Option<(u32, Option<u32>)>,
}

impl Default for SocketPolicy {
    fn default() -> Self {
        SocketPolicy {
            stale: Stale::IfDead,
            mode: 0o600,
            owner: None,
        }
    }
}

impl SocketPolicy {
    /// The mode a directory holding such sockets gets: the socket's mode with search
    /// permission added wherever it grants read or write, so exactly the users who may
    /// connect to the sockets may reach them.
    pub fn dir_mode(&self) -> u32 {
        let rw = self.mode & 0o666;
        let x = ((rw & 0o444) >> 2) | ((rw & 0o222) >> 1);
        rw | x
    }

    /// Applies this policy's owner to `path` (a socket or a directory).
    pub fn chown(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.owner {
            rustix::fs::chown(
                path,
                Some(rustix::fs::Uid::from_raw(uid)),
                gid.map(rustix::fs::Gid::from_raw),
            )?;
        }
        Ok(())
    }
}

/// What one device sets of its own over its parent's [`SocketPolicy`] (`[[device]]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyOverride {
    /// The sockets' mode, if the device's own.
    pub mode: Option<u32>,
    /// Owner and group, if the device's own.
    pub owner: Option<(u32, Option<u32>)>,
}

impl PolicyOverride {
    /// `base` with what this sets.
    pub fn apply(&self, base: SocketPolicy) -> SocketPolicy {
        SocketPolicy {
            mode: self.mode.unwrap_or(base.mode),
            owner: self.owner.or(base.owner),
            ..base
        }
    }
}

/// Clears whatever `policy.stale` allows at `path`; errors name what is in the way.
fn clear(path: &Path, stale: Stale) -> std::io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if stale == Stale::IfDead && UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by another process", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

/// Binds a listening UNIX socket at `path` with `policy`: an existing path is cleared as
/// the policy says, then the socket gets its mode and owner; if that fails the new socket
/// is removed again, so a socket either exists with its policy or not at all.
pub fn bind(path: &Path, policy: &SocketPolicy) -> std::io::Result<UnixListener> {
    // A UNIX socket's path has at most 107 bytes (sun_path): ENAMETOOLONG, not a truncated
    // path or an error without an errno.
    if path.as_os_str().len() > 107 {
        return Err(std::io::Error::from_raw_os_error(
            rustix::io::Errno::NAMETOOLONG.raw_os_error(),
        ));
    }
    clear(path, policy.stale)?;
    let listener = UnixListener::bind(path)?;
    let setup = || -> std::io::Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(policy.mode))?;
        policy.chown(path)
    };
    if let Err(e) = setup() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Sets how many connections may wait for `accept` on `listener` (`listen(2)` again: Linux
/// takes a new backlog on a listening socket). Past it a blocking `connect` waits and a
/// non-blocking one fails with EAGAIN, so connections nobody accepts cannot pile up.
pub fn set_backlog(listener: &UnixListener, backlog: u32) -> std::io::Result<()> {
    rustix::net::listen(listener, i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(())
}

/// Connects to the socket at `path` without waiting: where a blocking connect would wait
/// for room in a full backlog, this fails with EAGAIN.
pub fn connect_nonblocking(path: &Path) -> Result<OwnedFd, rustix::io::Errno> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let s = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&s, &SocketAddrUnix::new(path)?)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn connections_past_the_backlog_are_refused_with_eagain() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let l = bind(&p, &SocketPolicy::default()).unwrap();
        set_backlog(&l, 2).unwrap();
        let mut waiting = Vec::new();
        let refused = loop {
            match connect_nonblocking(&p) {
                Ok(s) => waiting.push(s),
                Err(e) => break e,
            }
            assert!(
                waiting.len() <= 8,
                "the backlog of 2 took {} connections",
                waiting.len()
            );
        };
        assert_eq!(refused, rustix::io::Errno::AGAIN);
        // Linux lets backlog + 1 wait.
        assert!((2..=3).contains(&waiting.len()), "{}", waiting.len());
    }

    #[test]
    fn a_socket_gets_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let policy = SocketPolicy {
            mode: 0o660,
            ..SocketPolicy::default()
        };
        let _l = bind(&p, &policy).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o660);
    }

    #[test]
    fn a_dead_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let live = bind(&p, &SocketPolicy::default()).unwrap();
        let e = bind(&p, &SocketPolicy::default()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
        drop(live);
        // The file is still there but nobody listens: it is stale.
        assert!(p.exists());
        let _again = bind(&p, &SocketPolicy::default()).unwrap();
    }

    #[test]
    fn replace_takes_a_live_socket_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let _live = bind(&p, &SocketPolicy::default()).unwrap();
        let policy = SocketPolicy {
            stale: Stale::Replace,
            ..SocketPolicy::default()
        };
        let _new = bind(&p, &policy).unwrap();
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("data");
        std::fs::write(&p, b"keep").unwrap();
        for stale in [Stale::Replace, Stale::IfDead] {
            let policy = SocketPolicy {
                stale,
                ..SocketPolicy::default()
            };
            assert_eq!(
                bind(&p, &policy).unwrap_err().kind(),
                std::io::ErrorKind::AlreadyExists
            );
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"keep");
    }

    #[test]
    fn directories_get_search_permission_where_sockets_are_usable() {
        let m = |mode| SocketPolicy {
            mode,
            ..SocketPolicy::default()
        };
        assert_eq!(m(0o600).dir_mode(), 0o700);
        assert_eq!(m(0o660).dir_mode(), 0o770);
        assert_eq!(m(0o666).dir_mode(), 0o777);
        assert_eq!(m(0o640).dir_mode(), 0o750);
    }
}
