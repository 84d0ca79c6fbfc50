//! Who is on the other end of a session, so that a device (or the mdev core around it) can
//! tell one client from another: an IOMMU group is owned by one client at a time.

/// The credentials of a client's socket peer (`SO_PEERCRED`), taken when it connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerCred {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A client's identity: a connection number unique within this process, and the peer's
/// credentials when the transport has them (a UNIX socket does, an in-memory one does not).
///
/// Two connections belong to the same client when they come from the same process (a VMM
/// opens one connection per device), or, without credentials, when they are the same
/// connection. [`ClientId::default`] is "unknown": connection 0, no credentials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientId {
    /// A per-process connection counter (0: unknown).
    pub connection: u64,
    /// The peer's credentials, if known.
    pub peer: Option<PeerCred>,
}

impl ClientId {
    /// Whether `self` and `other` are the same client (see the type's documentation).
    pub fn same_client(&self, other: &ClientId) -> bool {
        match (self.peer, other.peer) {
            (Some(a), Some(b)) => a.pid == b.pid,
            _ => self.connection == other.connection,
        }
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.peer {
            Some(p) => write!(
                f,
                "pid {} uid {} (connection {})",
                p.pid, p.uid, self.connection
            ),
            None => write!(f, "connection {}", self.connection),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(pid: u32) -> Option<PeerCred> {
        Some(PeerCred {
            pid,
            uid: 0,
            gid: 0,
        })
    }

    #[test]
    fn connections_of_one_process_are_one_client() {
        let a = ClientId {
            connection: 1,
            peer: cred(7),
        };
        let b = ClientId {
            connection: 2,
            peer: cred(7),
        };
        assert!(a.same_client(&b));
        let c = ClientId {
            connection: 3,
            peer: cred(8),
        };
        assert!(!a.same_client(&c));
    }

    #[test]
    fn without_credentials_only_the_connection_counts() {
        let a = ClientId {
            connection: 1,
            peer: None,
        };
        let b = ClientId {
            connection: 2,
            peer: cred(7),
        };
        assert!(!a.same_client(&b));
        assert!(a.same_client(&a));
    }
}
