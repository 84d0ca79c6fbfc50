//! Worker isolation (`isolation = "worker"`): each IOMMU group's devices are served by a
//! process of their own, the daemon's binary run as `umdevd worker --link PATH`.
//!
//! The daemon keeps the registry, the tree, the control API and the group rules; a worker
//! builds its devices from the descriptions their parents' `create` returned (with the same
//! drivers and options), serves their sockets, and asks the daemon over its link around
//! every open and close. A supervisor thread per worker watches it: when it dies, the daemon
//! logs how, releases the group it held, starts a new process and gives it the same
//! devices again (their clients must reconnect; other groups never notice).
//!
//! A new device is alone in its group, so it gets a worker of its own; a device that moves
//! to another group (`peer_to_peer_resource_uuid`, only while neither group is open) is
//! stopped in its worker and built again in its new group's (the last device of a worker
//! ends it).

pub mod cgroup;
mod handover;
mod link;
pub mod process;
mod sandbox;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use umdev_core::{
    Described, DeviceEnv, Errno, MdevUuid, Remote, Serve, Served, ServedState, VendorAttrs,
};
use umdev_pci::{DisplayPlane, OpenGuard, PciFunction};

use crate::config::{SandboxConfig, ServerSection};
use crate::daemon::Shared;
use crate::serve::DirServe;
use link::{Call, Link, Reply, StartDevice};

/// How long each step of a live upgrade (hand-over, take-over) may take.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new worker has to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before a worker that died is started again.
const RESTART_DELAY: Duration = Duration::from_millis(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn io_err(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

/// The daemon's layout ([`DirServe`]) with each device in a worker process.
pub struct WorkerServe {
    /// Directories and socket policies, as in thread mode.
    pub dirs: Arc<DirServe>,
    /// How each parent was built.
    pub shared: Arc<Shared>,
    /// The servers' tunables.
    pub server: ServerSection,
    /// Where link sockets go while a worker connects.
    pub links_dir: PathBuf,
    /// The worker binary (the daemon's own).
    pub exe: PathBuf,
    /// How workers seal themselves.
    pub sandbox: SandboxConfig,
    next: AtomicU64,
    /// Clients' locked-memory budgets over every worker.
    ledger: Arc<Ledger>,
    /// Which worker serves each device (by UUID): a device moves with its group.
    placements: Placements,
    /// CPU cgroups and weights, if configured.
    cpu: Option<Arc<CpuPolicy>>,
}

/// Each worker's CPU cgroup and weight: its parents' highest (or the default).
#[derive(Debug)]
pub struct CpuPolicy {
    /// Where workers' cgroups go.
    pub cgroups: cgroup::CpuCgroups,
    /// A worker's weight when none of its parents sets one.
    pub default_weight: u32,
    /// Parents with a weight of their own.
    pub parents: BTreeMap<String, u32>,
}

impl CpuPolicy {
    fn weight<'a>(&self, parents: impl Iterator<Item = &'a str>) -> u32 {
        parents
            .filter_map(|p| self.parents.get(p).copied())
            .max()
            .unwrap_or(self.default_weight)
    }
}

/// Where each device is served.
type Placements = Arc<Mutex<BTreeMap<String, Arc<Placement>>>>;

/// The worker serving one device; changed when the device moves to another group.
struct Placement {
    worker: Mutex<Arc<Worker>>,
}

impl Placement {
    fn get(&self) -> Arc<Worker> {
        lock(&self.worker).clone()
    }
}

impl WorkerServe {
    /// Workers of `exe`, link sockets under `links_dir`.
    pub fn new(
        dirs: Arc<DirServe>,
        shared: Arc<Shared>,
        server: ServerSection,
        links_dir: PathBuf,
        exe: PathBuf,
        sandbox: SandboxConfig,
    ) -> WorkerServe {
        WorkerServe {
            dirs,
            shared,
            server,
            links_dir,
            exe,
            sandbox,
            next: AtomicU64::new(0),
            ledger: Arc::default(),
            placements: Arc::default(),
            cpu: None,
        }
    }

    /// Puts each worker in a CPU cgroup of its own with a weight.
    pub fn with_cpu(mut self, cpu: CpuPolicy) -> WorkerServe {
        self.cpu = Some(Arc::new(cpu));
        self
    }

    /// The daemon's record of a worker with `devices`, its link if it has one already.
    fn worker(&self, devices: BTreeMap<String, Entry>, link: Option<Arc<Link>>) -> Arc<Worker> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Arc::new(Worker {
            name: format!("worker-{n}"),
            exe: self.exe.clone(),
            link_path: self.links_dir.join(format!("worker-{n}.sock")),
            sandbox: self.sandbox.clone(),
            devices: Mutex::new(devices),
            link: Mutex::new(link),
            child: Mutex::new(None),
            stopping: AtomicBool::new(false),
            down: AtomicBool::new(false),
            adopt: Mutex::new(None),
            detached: AtomicBool::new(false),
            ledger: self.ledger.clone(),
            charged: Mutex::new(BTreeMap::new()),
            supervisor: Mutex::new(None),
            restarts: AtomicU64::new(0),
            cpu: self.cpu.clone(),
        })
    }

    /// A new worker process for `entries` (the devices of one group), sealed for them,
    /// supervised, serving them.
    fn new_worker(&self, entries: Vec<Entry>) -> std::io::Result<Arc<Worker>> {
        let uuids: Vec<String> = entries.iter().map(|e| e.start.uuid.clone()).collect();
        let worker = self.worker(
            entries
                .into_iter()
                .map(|e| (e.start.uuid.clone(), e))
                .collect(),
            None,
        );
        let link = worker.spawn()?;
        // The link's reader runs before the first call: every reply needs it.
        if let Err(e) = Worker::supervise(&worker, link.clone()) {
            worker.stopping.store(true, Ordering::Release);
            link.shut();
            worker.reap(true);
            return Err(e);
        }
        for uuid in &uuids {
            if let Err(e) = worker.start_device(&link, uuid) {
                for u in &uuids {
                    worker.stop_device(u);
                }
                return Err(io_err(e));
            }
        }
        Ok(worker)
    }

    fn start_worker(&self, d: &Described<'_>) -> std::io::Result<Remote> {
        let (driver, options) = self.shared.parent_recipe(d.parent).ok_or_else(|| {
            std::io::Error::other(format!("parent {} was not built by this daemon", d.parent))
        })?;
        let dir = d
            .env
            .dir()
            .ok_or_else(|| std::io::Error::other("a worker's device needs a directory"))?;
        let policy = d.env.policy();
        let start = StartDevice {
            uuid: d.uuid.to_string(),
            parent: d.parent.to_owned(),
            driver,
            options,
            state_dir: Some(
                self.shared
                    .config
                    .state_dir()
                    .join("parents")
                    .join(d.parent),
            ),
            description: d.description.clone(),
            dir: dir.to_owned(),
            mode: policy.mode,
            owner: policy.owner,
            server: self.server.clone(),
        };
        let uuid = start.uuid.clone();
        self.record(&start);
        let worker = self
            .new_worker(vec![Entry {
                start,
                guard: d.guard.clone(),
                held: false,
            }])
            .inspect_err(|_| self.forget(&uuid))?;
        Ok(self.remote(worker, uuid, dir))
    }

    /// Device `uuid` (its directory `dir`) as served by `worker`, for the registry: its
    /// placement recorded, its serving and attributes asked of whichever worker has it.
    fn remote(&self, worker: Arc<Worker>, uuid: String, dir: &Path) -> Remote {
        let placement = Arc::new(Placement {
            worker: Mutex::new(worker),
        });
        lock(&self.placements).insert(uuid.clone(), placement.clone());
        Remote {
            served: Box::new(WorkerServed {
                placement: placement.clone(),
                placements: self.placements.clone(),
                record: self.records().join(format!("{uuid}.json")),
                uuid: uuid.clone(),
                socket: dir.join(umdev_core::VFIO_USER_SOCKET),
            }),
            attrs: Some(Arc::new(WorkerAttrs { placement, uuid })),
        }
    }

    /// Moves device `uuid` to the worker of `peers` (a new worker if it has none).
    fn move_device(&self, uuid: &MdevUuid, peers: &[MdevUuid]) -> std::io::Result<()> {
        let uuid = uuid.to_string();
        let (me, target) = {
            let placements = lock(&self.placements);
            let Some(me) = placements.get(&uuid).cloned() else {
                return Ok(());
            };
            let target = peers
                .iter()
                .find_map(|p| placements.get(&p.to_string()))
                .map(|p| p.get());
            (me, target)
        };
        let old = me.get();
        match &target {
            Some(t) if Arc::ptr_eq(t, &old) => return Ok(()),
            None if lock(&old.devices).len() == 1 => return Ok(()),
            _ => {}
        }
        // A sealed worker cannot open a new device's files: the group's devices, the moved
        // one with them, go to a new worker sealed for all of them (no client holds either
        // group, so nothing is lost but what a closed device keeps).
        let entry = old
            .remove_device(&uuid)
            .ok_or_else(|| std::io::Error::other(format!("{uuid} has no worker")))?;
        let mut entries = vec![entry];
        if let Some(t) = &target {
            let peers: Vec<String> = lock(&t.devices).keys().cloned().collect();
            entries.extend(peers.iter().filter_map(|p| t.remove_device(p)));
        }
        let moved: Vec<String> = entries.iter().map(|e| e.start.uuid.clone()).collect();
        let new = self.new_worker(entries).inspect_err(|e| {
            tracing::error!(uuid, group = ?moved, error = %e, "a group that changed has no worker now");
        })?;
        tracing::info!(uuid, from = old.name, to = new.name, group = ?moved, "device moved: its new group has a new worker");
        let placements = lock(&self.placements);
        for u in &moved {
            if let Some(p) = placements.get(u) {
                *lock(&p.worker) = new.clone();
            }
        }
        Ok(())
    }
}

impl WorkerServe {
    /// Takes over the workers a daemon before this one left serving (their adoption
    /// sockets in the links directory): enters their devices in `core` and supervises them
    /// again. Returns the adopted devices' UUIDs. A socket nobody answers on is removed.
    pub fn adopt_all(&self, core: &umdev_core::Core) -> Vec<MdevUuid> {
        let mut adopted = Vec::new();
        let Ok(dir) = std::fs::read_dir(&self.links_dir) else {
            return adopted;
        };
        for e in dir.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("adopt-") {
                continue;
            }
            match self.adopt_one(core, &path) {
                Ok(uuids) => adopted.extend(uuids),
                Err(e) => {
                    tracing::info!(socket = %path.display(), error = %e, "no worker to adopt there; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let restarted = self.restart_orphans(core, &adopted);
        adopted.extend(restarted);
        adopted
    }

    /// Where the devices served by workers are recorded (`<uuid>.json`, how to start each):
    /// a device whose worker and daemon both died is started again from its record by the
    /// next daemon.
    fn records(&self) -> PathBuf {
        self.links_dir.join("devices")
    }

    fn forget(&self, uuid: &str) {
        let _ = std::fs::remove_file(self.records().join(format!("{uuid}.json")));
    }

    fn record(&self, start: &StartDevice) {
        let dir = self.records();
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!(".{}.json", start.uuid));
            std::fs::write(&tmp, serde_json::to_vec(start)?)?;
            std::fs::rename(&tmp, dir.join(format!("{}.json", start.uuid)))
        };
        if let Err(e) = write() {
            tracing::warn!(uuid = start.uuid, error = %e, "cannot record a worker's device; it will not outlive its worker and daemon both");
        }
    }

    /// Starts again, each in a new worker, the recorded devices no live worker serves
    /// (their worker died while no daemon was there to start it again). Their clients were
    /// gone with the worker; a peer-to-peer group comes back as one group per device.
    fn restart_orphans(&self, core: &umdev_core::Core, adopted: &[MdevUuid]) -> Vec<MdevUuid> {
        let Ok(dir) = std::fs::read_dir(self.records()) else {
            return Vec::new();
        };
        let mut starts = BTreeMap::new();
        for e in dir.flatten() {
            let path = e.path();
            let Some(uuid) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| MdevUuid::parse(s).ok())
            else {
                continue;
            };
            if adopted.contains(&uuid) {
                continue;
            }
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<StartDevice>(&b).ok())
            {
                Some(s) => {
                    starts.insert(uuid, s);
                }
                None => {
                    tracing::warn!(record = %path.display(), "an unreadable device record; removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if starts.is_empty() {
            return Vec::new();
        }
        let list = starts
            .iter()
            .map(|(uuid, s)| umdev_core::Adoptee {
                uuid: *uuid,
                parent: s.parent.clone(),
                description: s.description.clone(),
                env: DeviceEnv::new(
                    *uuid,
                    Some(s.dir.clone()),
                    umdev_transport::SocketPolicy {
                        stale: umdev_transport::Stale::IfDead,
                        mode: s.mode,
                        owner: s.owner,
                    },
                ),
                held: None,
            })
            .collect();
        let mut restarted = Vec::new();
        let r = core.adopt(list, |a, guard| {
            let uuid = a.uuid.to_string();
            let dir = a.env.dir().unwrap_or(Path::new("")).to_path_buf();
            let Some(start) = starts.remove(&a.uuid) else {
                return self.remote(self.worker(BTreeMap::new(), None), uuid, &dir);
            };
            match self.new_worker(vec![Entry {
                start,
                guard,
                held: false,
            }]) {
                Ok(w) => {
                    tracing::warn!(uuid, "a device whose worker died with no daemon to start it again: started again (its clients were gone)");
                    restarted.push(a.uuid);
                    self.remote(w, uuid, &dir)
                }
                Err(e) => {
                    tracing::error!(uuid, error = %e, "cannot start a recorded device again");
                    self.remote(self.worker(BTreeMap::new(), None), uuid, &dir)
                }
            }
        });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot start recorded devices again");
        }
        restarted
    }

    /// Every worker, once (of the devices in `only`, if given).
    fn workers(&self, only: Option<&[String]>) -> Vec<Arc<Worker>> {
        let placements = lock(&self.placements);
        let mut v: Vec<Arc<Worker>> = Vec::new();
        for (uuid, p) in placements.iter() {
            if only.is_some_and(|o| !o.contains(uuid)) {
                continue;
            }
            let w = p.get();
            if !v.iter().any(|x| Arc::ptr_eq(x, &w)) {
                v.push(w);
            }
        }
        v
    }

    /// Live upgrade: each worker (of the devices in `only`, or every one) is replaced by a
    /// new process of the daemon's binary as it is on disk now, which takes its devices
    /// over with their clients (see `process.rs`). One result per worker.
    pub fn upgrade(&self, only: Option<&[String]>) -> Vec<Upgraded> {
        self.workers(only)
            .into_iter()
            .map(|w| {
                let devices: Vec<String> = lock(&w.devices).keys().cloned().collect();
                let result = self.upgrade_worker(&w);
                match &result {
                    Ok(p) => tracing::info!(worker = w.name, pauses_us = ?p, "worker upgraded"),
                    Err(e) => tracing::warn!(worker = w.name, error = %e, "worker not upgraded; it serves on"),
                }
                Upgraded { devices, result }
            })
            .collect()
    }

    fn upgrade_worker(&self, old: &Arc<Worker>) -> Result<Vec<(String, u64)>, Errno> {
        if old.down.load(Ordering::Acquire) {
            return Err(Errno::AGAIN);
        }
        let old_link = old.link()?;
        let entries: BTreeMap<String, Entry> = lock(&old.devices)
            .iter()
            .map(|(u, e)| {
                (
                    u.clone(),
                    Entry {
                        start: e.start.clone_for_restart(),
                        guard: e.guard.clone(),
                        held: e.held,
                    },
                )
            })
            .collect();
        let new = self.worker(entries, None);
        // Until it has the devices, a new worker that dies is not started again (the old
        // one serves them).
        new.stopping.store(true, Ordering::Release);
        let link = new.spawn().map_err(|e| {
            tracing::warn!(worker = new.name, error = %e, "cannot start the new worker");
            Errno::from_io_error(&e).unwrap_or(Errno::IO)
        })?;
        let give_up = |new: &Arc<Worker>, e: Errno| {
            if let Ok(l) = new.link() {
                l.shut();
            }
            new.reap(true);
            e
        };
        if let Err(e) = Worker::supervise(&new, link.clone()) {
            return Err(give_up(&new, Errno::from_io_error(&e).unwrap_or(Errno::IO)));
        }
        let (a, b) = link::pair().map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        let taker = std::thread::Builder::new()
            .name(format!("{}-take", new.name))
            .spawn(move || link.call_with(Call::TakeOver, Some(b.as_fd()), UPGRADE_TIMEOUT))
            .map_err(|_| Errno::AGAIN)?;
        let handed = old_link.call_with(Call::HandOver, Some(a.as_fd()), UPGRADE_TIMEOUT);
        drop(a);
        let taken = taker.join().unwrap_or(Err(Errno::IO));
        match taken {
            // The new worker serves the devices: the old one must let go. It does once its
            // link closes; if its side failed after the new one took them (a lost verdict),
            // it is killed rather than left serving too.
            Ok((Reply::TakenOver(pauses), _)) => {
                old.stopping.store(true, Ordering::Release);
                if let Err(e) = handed {
                    tracing::warn!(worker = old.name, error = %e, "the old worker did not confirm the hand-over; killing it");
                    if let Some(c) = lock(&old.child).as_mut() {
                        let _ = c.kill();
                    }
                }
                lock(&old.devices).clear();
                old_link.shut();
                new.stopping.store(false, Ordering::Release);
                let placements = lock(&self.placements);
                for p in placements.values() {
                    let mut w = lock(&p.worker);
                    if Arc::ptr_eq(&w, old) {
                        *w = new.clone();
                    }
                }
                Ok(pauses)
            }
            // The old worker runs on (or, if it died, its supervisor starts it again).
            taken => {
                let e = handed.err().or(taken.err()).unwrap_or(Errno::PROTO);
                Err(give_up(&new, e))
            }
        }
    }

    /// Every worker process's own counters (its refusals), as Prometheus text.
    pub fn process_metrics(&self) -> String {
        self.workers(None)
            .iter()
            .filter_map(|w| match w.link().ok()?.call(Call::ProcessMetrics) {
                Ok((Reply::Text(t), _)) => Some(t),
                _ => None,
            })
            .collect()
    }

    /// Lets every worker go without stopping its devices (a daemon stop with workers):
    /// each serves on and waits for the next daemon. Returns how many there were.
    pub fn detach_all(&self) -> usize {
        let workers = self.workers(None);
        for w in &workers {
            w.detached.store(true, Ordering::Release);
            w.stopping.store(true, Ordering::Release);
            if let Ok(link) = w.link() {
                link.shut();
            }
            let t = lock(&w.supervisor).take();
            if let Some(t) = t {
                let _ = t.join();
            }
        }
        workers.len()
    }

    fn adopt_one(&self, core: &umdev_core::Core, path: &Path) -> std::io::Result<Vec<MdevUuid>> {
        let link = Arc::new(link::connect(path)?);
        let worker = self.worker(BTreeMap::new(), Some(link.clone()));
        Worker::supervise(&worker, link.clone())?;
        let devices = match link.call(Call::Adopt) {
            Ok((Reply::Adopted(d), _)) => d,
            Ok(_) => return Err(io_err(Errno::PROTO)),
            Err(e) => return Err(io_err(e)),
        };
        let adoptees: Vec<(umdev_core::Adoptee, StartDevice)> = devices
            .into_iter()
            .filter_map(|a| {
                let uuid = MdevUuid::parse(&a.start.uuid).ok()?;
                let policy = umdev_transport::SocketPolicy {
                    stale: umdev_transport::Stale::IfDead,
                    mode: a.start.mode,
                    owner: a.start.owner,
                };
                Some((
                    umdev_core::Adoptee {
                        uuid,
                        parent: a.start.parent.clone(),
                        description: a.start.description.clone(),
                        env: DeviceEnv::new(uuid, Some(a.start.dir.clone()), policy),
                        held: a
                            .held
                            .map(|(connection, peer)| process::client_id(connection, peer)),
                    },
                    a.start,
                ))
            })
            .collect();
        let uuids: Vec<MdevUuid> = adoptees.iter().map(|(a, _)| a.uuid).collect();
        let mut starts: BTreeMap<MdevUuid, StartDevice> = adoptees
            .iter()
            .map(|(a, s)| (a.uuid, s.clone_for_restart()))
            .collect();
        let list = adoptees.into_iter().map(|(a, _)| a).collect();
        let r = core.adopt(list, |a, guard| {
            let uuid = a.uuid.to_string();
            if let Some(start) = starts.remove(&a.uuid) {
                self.record(&start);
                lock(&worker.devices).insert(
                    uuid.clone(),
                    Entry {
                        start,
                        guard,
                        held: a.held.is_some(),
                    },
                );
            }
            self.remote(worker.clone(), uuid, a.env.dir().unwrap_or(Path::new("")))
        });
        if let Err(e) = r {
            tracing::warn!(socket = %path.display(), error = %e, "cannot adopt a worker's devices");
            worker.stopping.store(true, Ordering::Release);
            link.shut();
            return Err(std::io::Error::other(e.to_string()));
        }
        *lock(&worker.adopt) = Some(path.to_owned());
        tracing::info!(worker = worker.name, devices = ?uuids.iter().map(ToString::to_string).collect::<Vec<_>>(), "adopted a worker a previous daemon left serving");
        Ok(uuids)
    }
}

impl Serve for WorkerServe {
    fn env(&self, parent: &str, uuid: &MdevUuid) -> std::io::Result<DeviceEnv> {
        self.dirs.env_for_worker(parent, uuid)
    }

    fn start(&self, env: &DeviceEnv, function: PciFunction) -> std::io::Result<Box<dyn Served>> {
        self.dirs.start(env, function)
    }

    fn start_described(&self, d: Described<'_>) -> Option<std::io::Result<Remote>> {
        Some(self.start_worker(&d))
    }

    fn regroup(&self, uuid: &MdevUuid, peers: &[MdevUuid]) -> std::io::Result<()> {
        self.move_device(uuid, peers)
    }

    fn release(&self, env: &DeviceEnv) {
        self.dirs.release(env);
    }
}

impl StartDevice {
    fn clone_for_restart(&self) -> StartDevice {
        StartDevice {
            uuid: self.uuid.clone(),
            parent: self.parent.clone(),
            driver: self.driver.clone(),
            options: self.options.clone(),
            state_dir: self.state_dir.clone(),
            description: self.description.clone(),
            dir: self.dir.clone(),
            mode: self.mode,
            owner: self.owner,
            server: self.server.clone(),
        }
    }
}

/// Each client's pinned pages over every worker (one budget per client, by pid, however
/// many groups it uses), and what each worker charged, credited back if it dies.
#[derive(Default)]
pub struct Ledger {
    total: Mutex<BTreeMap<u32, u64>>,
}

impl Ledger {
    fn charge(&self, w: &Worker, pid: u32, pages: u64, limit: u64) -> Reply {
        let mut total = lock(&self.total);
        let t = total.entry(pid).or_default();
        if t.saturating_add(pages) > limit {
            return Reply::OverBudget(*t);
        }
        *t += pages;
        *lock(&w.charged).entry(pid).or_default() += pages;
        Reply::Done
    }

    fn credit(&self, w: &Worker, pid: u32, pages: u64) {
        let mut total = lock(&self.total);
        let mut mine = lock(&w.charged);
        // Never more than this worker charged (an adopted worker's earlier pins are not
        // known here).
        let pages = pages.min(mine.get(&pid).copied().unwrap_or(0));
        if let Some(m) = mine.get_mut(&pid) {
            *m -= pages;
            if *m == 0 {
                mine.remove(&pid);
            }
        }
        if let Some(t) = total.get_mut(&pid) {
            *t = t.saturating_sub(pages);
            if *t == 0 {
                total.remove(&pid);
            }
        }
    }

    /// Worker `w` is gone: what it charged is free.
    fn forget(&self, w: &Worker) {
        let mut total = lock(&self.total);
        for (pid, pages) in std::mem::take(&mut *lock(&w.charged)) {
            if let Some(t) = total.get_mut(&pid) {
                *t = t.saturating_sub(pages);
                if *t == 0 {
                    total.remove(&pid);
                }
            }
        }
    }
}

/// What a live upgrade did to one worker.
#[derive(Debug)]
pub struct Upgraded {
    /// Its devices.
    pub devices: Vec<String>,
    /// Each device's pause in microseconds (old worker's pause to new worker's resume), or
    /// why the worker was not upgraded (it serves on).
    pub result: Result<Vec<(String, u64)>, Errno>,
}

/// A device of a worker, as the daemon keeps it.
struct Entry {
    /// How to build it again.
    start: StartDevice,
    /// The core's group rules for it.
    guard: Arc<dyn OpenGuard>,
    /// Whether a client of it was admitted (released if the worker dies).
    held: bool,
}

/// One worker process and what it serves.
struct Worker {
    name: String,
    exe: PathBuf,
    link_path: PathBuf,
    sandbox: SandboxConfig,
    devices: Mutex<BTreeMap<String, Entry>>,
    link: Mutex<Option<Arc<Link>>>,
    child: Mutex<Option<Child>>,
    stopping: AtomicBool,
    /// Between its death and its devices served again.
    down: AtomicBool,
    /// Where it waits for the next daemon if this one dies (removed when it dies).
    adopt: Mutex<Option<PathBuf>>,
    /// Let go by a stopping daemon: it serves on.
    detached: AtomicBool,
    /// The clients' budgets over every worker.
    ledger: Arc<Ledger>,
    /// What this worker charged to them.
    charged: Mutex<BTreeMap<u32, u64>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// Times it died and was started again.
    restarts: AtomicU64,
    cpu: Option<Arc<CpuPolicy>>,
}

impl Worker {
    /// Starts the process and waits for it to connect.
    fn spawn(&self) -> std::io::Result<Arc<Link>> {
        let listener: OwnedFd = link::listen(&self.link_path)?;
        // A process group of its own: a signal meant for the daemon's (a terminal's ^C, a
        // `timeout`) is not the worker's; the daemon decides when it stops.
        // Short: a socket's path must fit in sun_path (108 bytes) under the state directory.
        let adopt = self.link_path.with_file_name(format!(
            "adopt-{}.sock",
            &MdevUuid::random().to_string()[..13]
        ));
        *lock(&self.adopt) = Some(adopt.clone());
        let child = Command::new(&self.exe)
            .process_group(0)
            .arg("worker")
            .arg("--link")
            .arg(&self.link_path)
            .arg("--adopt")
            .arg(&adopt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_file(&self.link_path);
                return Err(e);
            }
        };
        let pid = child.id();
        *lock(&self.child) = Some(child);
        if let Some(cpu) = &self.cpu {
            let weight = cpu.weight(
                lock(&self.devices)
                    .values()
                    .map(|e| e.start.parent.as_str()),
            );
            match cpu.cgroups.place(pid, weight) {
                Ok(()) => {
                    tracing::info!(worker = self.name, pid, weight, "worker in its CPU cgroup")
                }
                Err(e) => {
                    tracing::error!(worker = self.name, error = %e, "cannot put a worker in its CPU cgroup");
                }
            }
        }
        let link = link::accept(&listener, CONNECT_TIMEOUT);
        let _ = std::fs::remove_file(&self.link_path);
        let link = match link {
            Ok(l) => Arc::new(l),
            Err(e) => {
                self.reap(true);
                return Err(e);
            }
        };
        // Pins lock memory, and a sealed worker cannot raise its own limit: it gets the
        // daemon's (as much as the daemon may give).
        if let Some(p) = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0)) {
            let own = rustix::process::getrlimit(rustix::process::Resource::Memlock);
            if let Err(e) =
                rustix::process::prlimit(Some(p), rustix::process::Resource::Memlock, own)
            {
                tracing::debug!(worker = self.name, error = %e, "a worker keeps its own locked-memory limit");
            }
        }
        let devices: Vec<StartDevice> = lock(&self.devices)
            .values()
            .map(|e| e.start.clone_for_restart())
            .collect();
        if let Err(e) = link.cast(Call::Seal {
            devices,
            sandbox: self.sandbox.clone(),
        }) {
            self.reap(true);
            return Err(io_err(e));
        }
        tracing::info!(worker = self.name, pid, "worker started");
        *lock(&self.link) = Some(link.clone());
        Ok(link)
    }

    /// Waits for the process (killing it first if `kill`); returns how it ended.
    fn reap(&self, kill: bool) -> Option<std::process::ExitStatus> {
        let mut child = lock(&self.child).take()?;
        if kill {
            let _ = child.kill();
        }
        let status = child.wait().ok();
        if let Some(cpu) = &self.cpu {
            cpu.cgroups.remove(child.id());
        }
        status
    }

    fn link(&self) -> Result<Arc<Link>, Errno> {
        lock(&self.link).clone().ok_or(Errno::NODEV)
    }

    /// Serves the worker's calls on `link` in a supervisor thread, which starts the worker
    /// again whenever it dies, until the worker is stopped.
    fn supervise(this: &Arc<Worker>, link: Arc<Link>) -> std::io::Result<()> {
        let w = this.clone();
        let t = std::thread::Builder::new()
            .name(this.name.clone())
            .spawn(move || w.watch(link, false))?;
        *lock(&this.supervisor) = Some(t);
        Ok(())
    }

    fn watch(self: Arc<Self>, mut link: Arc<Link>, mut replay: bool) {
        loop {
            if replay {
                // Its devices again, from another thread: their replies need this one.
                let (w, l) = (self.clone(), link.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("{}-replay", self.name))
                    .spawn(move || w.replay(&l));
                if let Err(e) = spawned {
                    tracing::error!(worker = self.name, error = %e, "cannot give a restarted worker its devices");
                }
            }
            let w = self.clone();
            let l = link.clone();
            if let Err(e) = link.serve(&self.name, move |id, call, _fd| w.handle(&l, id, call)) {
                tracing::warn!(worker = self.name, error = %e, "cannot read a worker's link");
            }
            *lock(&self.link) = None;
            // Its pins are gone with it (or with its devices).
            self.ledger.forget(&self);
            if self.stopping.load(Ordering::Acquire) {
                // A worker let go with devices serves on: nothing to wait for.
                if !self.detached.load(Ordering::Acquire) {
                    self.reap(false);
                }
                return;
            }
            self.down.store(true, Ordering::Release);
            if let Some(a) = lock(&self.adopt).take() {
                let _ = std::fs::remove_file(a);
            }
            let status = self.reap(true);
            let uuids: Vec<String> = lock(&self.devices).keys().cloned().collect();
            tracing::error!(worker = self.name, status = ?status, devices = ?uuids,
                "a worker died: its group's clients are gone; starting it again");
            self.restarts.fetch_add(1, Ordering::Relaxed);
            // The clients it served are gone: their group is free again.
            for e in lock(&self.devices).values_mut() {
                if std::mem::take(&mut e.held) {
                    e.guard.release();
                }
            }
            loop {
                std::thread::sleep(RESTART_DELAY);
                if self.stopping.load(Ordering::Acquire) {
                    return;
                }
                match self.spawn() {
                    Ok(l) => {
                        link = l;
                        replay = true;
                        break;
                    }
                    Err(e) => {
                        tracing::error!(worker = self.name, error = %e, "cannot start a worker again; retrying");
                    }
                }
            }
        }
    }

    /// Gives a restarted worker (on `link`) the same devices.
    fn replay(&self, link: &Link) {
        let uuids: Vec<String> = lock(&self.devices).keys().cloned().collect();
        for uuid in uuids {
            if let Err(e) = self.start_device(link, &uuid) {
                tracing::error!(worker = self.name, uuid, error = %e, "a restarted worker could not serve a device");
                return;
            }
        }
        self.down.store(false, Ordering::Release);
        tracing::info!(worker = self.name, "worker serving again");
    }

    /// A call from the worker: the group rules.
    fn handle(&self, link: &Link, id: u64, call: Call) {
        let answer = match call {
            Call::Acquire {
                uuid,
                connection,
                peer,
            } => {
                let guard = lock(&self.devices).get(&uuid).map(|e| e.guard.clone());
                match guard {
                    Some(g) => {
                        let r = g.acquire(&process::client_id(connection, peer));
                        if r.is_ok() {
                            if let Some(e) = lock(&self.devices).get_mut(&uuid) {
                                e.held = true;
                            }
                        }
                        r.map(|()| Reply::Done)
                    }
                    None => Err(Errno::NODEV),
                }
            }
            Call::Release { uuid } => {
                let guard = lock(&self.devices)
                    .get_mut(&uuid)
                    .and_then(|e| std::mem::take(&mut e.held).then(|| e.guard.clone()));
                if let Some(g) = guard {
                    g.release();
                }
                Ok(Reply::Done)
            }
            Call::Charge { pid, pages, limit } => Ok(self.ledger.charge(self, pid, pages, limit)),
            Call::Credit { pid, pages } => {
                self.ledger.credit(self, pid, pages);
                Ok(Reply::Done)
            }
            _ => Err(Errno::NOTSUP),
        };
        link.reply(id, answer, None);
    }

    /// Has the worker build and serve device `uuid` (one of its entries), then gives its
    /// directory and sockets their owner (a sealed worker cannot).
    fn start_device(&self, link: &Link, uuid: &str) -> Result<(), Errno> {
        let (start, owner, dir) = {
            let devices = lock(&self.devices);
            let e = devices.get(uuid).ok_or(Errno::NODEV)?;
            (
                e.start.clone_for_restart(),
                e.start.owner,
                e.start.dir.clone(),
            )
        };
        link.call(Call::Start(Box::new(start)))?;
        if owner.is_some() {
            crate::serve::set_access(&dir, owner, None).map_err(|e| {
                tracing::warn!(worker = self.name, uuid, error = %e, "cannot give a device's sockets their owner");
                Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
            })?;
        }
        Ok(())
    }

    /// Stops serving device `uuid` and gives back what the daemon kept of it; the last
    /// device stops the worker.
    fn remove_device(&self, uuid: &str) -> Option<Entry> {
        if let Ok(link) = self.link() {
            if let Err(e) = link.call(Call::Stop {
                uuid: uuid.to_owned(),
            }) {
                tracing::warn!(worker = self.name, uuid, error = %e, "a worker did not stop a device");
            }
        }
        let (entry, last) = {
            let mut devices = lock(&self.devices);
            let e = devices.remove(uuid);
            (e, devices.is_empty())
        };
        if last {
            self.stopping.store(true, Ordering::Release);
            if let Ok(link) = self.link() {
                link.shut();
            }
            let t = lock(&self.supervisor).take();
            if let Some(t) = t {
                let _ = t.join();
            }
            tracing::info!(worker = self.name, "worker stopped");
        }
        entry
    }

    /// Stops device `uuid` for good.
    fn stop_device(&self, uuid: &str) {
        if let Some(e) = self.remove_device(uuid) {
            if e.held {
                e.guard.release();
            }
        }
    }
}

/// A device served by a worker.
struct WorkerServed {
    placement: Arc<Placement>,
    placements: Placements,
    uuid: String,
    socket: PathBuf,
    /// The device's record (removed with the device).
    record: PathBuf,
}

impl Served for WorkerServed {
    fn socket(&self) -> Option<&Path> {
        Some(&self.socket)
    }

    fn stop(&self) {
        self.placement.get().stop_device(&self.uuid);
        lock(&self.placements).remove(&self.uuid);
        let _ = std::fs::remove_file(&self.record);
    }

    fn metrics(&self, labels: &str) -> String {
        let worker = self.placement.get();
        let mut out = match worker.link().and_then(|l| {
            l.call(Call::Metrics {
                uuid: self.uuid.clone(),
                labels: labels.to_owned(),
            })
        }) {
            Ok((Reply::Text(t), _)) => t,
            _ => String::new(),
        };
        out.push_str(&format!(
            "umdev_worker_restarts_total{{{labels}}} {}\n",
            worker.restarts.load(Ordering::Relaxed)
        ));
        out
    }

    fn display_plane(&self) -> Result<DisplayPlane, Errno> {
        let (reply, fd) = self.placement.get().link()?.call(Call::Plane {
            uuid: self.uuid.clone(),
        })?;
        match (reply, fd) {
            (
                Reply::Plane {
                    fourcc,
                    width,
                    height,
                    stride,
                    offset,
                },
                Some(fd),
            ) => Ok(DisplayPlane {
                fourcc,
                width,
                height,
                stride,
                offset,
                memory: Arc::new(fd),
            }),
            _ => Err(Errno::PROTO),
        }
    }

    fn state(&self) -> ServedState {
        if self.placement.get().down.load(Ordering::Acquire) {
            ServedState::WorkerDied
        } else {
            ServedState::Running
        }
    }

    fn signal_req(&self) {
        if let Ok(link) = self.placement.get().link() {
            let _ = link.cast(Call::Req {
                uuid: self.uuid.clone(),
            });
        }
    }
}

/// A worker's device's vendor attributes, asked over the link.
struct WorkerAttrs {
    placement: Arc<Placement>,
    uuid: String,
}

impl VendorAttrs for WorkerAttrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match self.placement.get().link()?.call(Call::Show {
            uuid: self.uuid.clone(),
            name: name.to_owned(),
        })? {
            (Reply::Text(t), _) => Ok(t),
            _ => Err(Errno::PROTO),
        }
    }

    fn store(&self, name: &str, value: &str) -> Result<(), Errno> {
        self.placement
            .get()
            .link()?
            .call(Call::Store {
                uuid: self.uuid.clone(),
                name: name.to_owned(),
                value: value.to_owned(),
            })
            .map(|_| ())
    }
}
