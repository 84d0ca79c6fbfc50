//! Each client's memory as the server sees it: the locked-memory budget its devices' pins
//! are charged to, and its shared mmaps ([`ClientMemory`]), one per client across the
//! sessions (devices) it has open.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use umdev_dma::{memlock_rlimit, ClientMemory, SharedBudget};
use umdev_pci::ClientId;

/// Where clients' budgets are kept beyond this process: a worker serving one IOMMU group
/// charges its clients' pins to budgets its daemon keeps for all the groups.
pub trait SharedBudgets: Send + Sync {
    /// The budget of `client` (`None`: this process's alone).
    fn budget(&self, client: &ClientId) -> Option<Arc<dyn SharedBudget>>;
}

/// The locked-memory policy of a daemon, and the clients' memory it hands out.
///
/// Clone one value into every server of a daemon: the clones share the table of clients, so
/// that the sessions of one client (one VMM process, by `SO_PEERCRED` pid) share one budget
/// and one set of mmaps, and a page pinned by several of its devices is charged once.
#[derive(Clone, Default)]
pub struct LockedMemory {
    /// Budget of each client in bytes; `None`: the daemon's `RLIMIT_MEMLOCK`.
    pub limit: Option<u64>,
    /// Budgets of particular clients, by the uid of the socket peer (overrides `limit`).
    pub per_uid: BTreeMap<u32, u64>,
    /// Also lock pinned pages in memory (`mlock`), not only account for them.
    pub lock_pages: bool,
    clients: Arc<Mutex<HashMap<u32, Weak<ClientMemory>>>>,
    /// Budgets shared with other processes, if any.
    pub shared: Option<Arc<dyn SharedBudgets>>,
}

impl std::fmt::Debug for LockedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedMemory")
            .field("limit", &self.limit)
            .field("per_uid", &self.per_uid)
            .field("lock_pages", &self.lock_pages)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl LockedMemory {
    /// A policy with a budget of `limit` bytes per client (and no per-uid budgets).
    pub fn with_limit(limit: u64) -> LockedMemory {
        LockedMemory {
            limit: Some(limit),
            ..LockedMemory::default()
        }
    }

    /// The budget of `client`, in bytes.
    pub fn limit_for(&self, client: &ClientId) -> u64 {
        client
            .peer
            .and_then(|p| self.per_uid.get(&p.uid).copied())
            .or(self.limit)
            .unwrap_or_else(memlock_rlimit)
    }

    /// The memory of `client`: shared with its other sessions while any is open, new
    /// otherwise (always new when the client's process is unknown).
    pub(crate) fn client_memory(&self, client: &ClientId) -> Arc<ClientMemory> {
        let fresh = || match self.shared.as_ref().and_then(|s| s.budget(client)) {
            Some(b) => ClientMemory::with_shared_budget(self.limit_for(client), self.lock_pages, b),
            None => ClientMemory::new(self.limit_for(client), self.lock_pages),
        };
        let Some(peer) = client.peer else {
            return fresh();
        };
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        clients.retain(|_, w| w.strong_count() > 0);
        if let Some(m) = clients.get(&peer.pid).and_then(Weak::upgrade) {
            return m;
        }
        let m = fresh();
        clients.insert(peer.pid, Arc::downgrade(&m));
        m
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use umdev_pci::PeerCred;

    fn client(pid: u32, uid: u32, connection: u64) -> ClientId {
        ClientId {
            connection,
            peer: Some(PeerCred { pid, uid, gid: 0 }),
        }
    }

    #[test]
    fn sessions_of_one_process_share_their_memory() {
        let lm = LockedMemory {
            limit: Some(1 << 20),
            ..LockedMemory::default()
        };
        let a = lm.client_memory(&client(10, 0, 1));
        let b = lm.clone().client_memory(&client(10, 0, 2));
        let c = lm.client_memory(&client(11, 0, 3));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.limit(), 1 << 20);
    }

    #[test]
    fn per_uid_budget_overrides_the_daemon_default() {
        let mut lm = LockedMemory {
            limit: Some(1 << 20),
            ..LockedMemory::default()
        };
        lm.per_uid.insert(1000, 8192);
        assert_eq!(lm.limit_for(&client(1, 1000, 1)), 8192);
        assert_eq!(lm.limit_for(&client(1, 1001, 1)), 1 << 20);
        assert_eq!(lm.limit_for(&ClientId::default()), 1 << 20);
    }

    #[test]
    fn default_budget_is_rlimit_memlock() {
        assert_eq!(
            LockedMemory::default().limit_for(&ClientId::default()),
            memlock_rlimit()
        );
    }

    #[test]
    fn unknown_clients_never_share() {
        let lm = LockedMemory::default();
        let a = lm.client_memory(&ClientId::default());
        let b = lm.client_memory(&ClientId::default());
        assert!(!Arc::ptr_eq(&a, &b));
    }
}
