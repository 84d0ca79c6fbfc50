//! The registry: parents, their devices, IOMMU groups and who holds them, behind one lock.
//!
//! Lock order: the registry lock is never held while calling into a served device's
//! function (whose session thread takes the function lock, then runs the open guard, which
//! takes the registry lock). Stopping a served device joins its session thread, so it is
//! done with the registry lock released, and so are queries that may wait on a device (its
//! display plane, its metrics: a worker's answer), on a clone of its [`Served`]. The parent's `create`, `build` and `remove` and
//! the [`Serve`]'s `env`, `start` and `release` run with the registry lock held.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use umdev_pci::{ClientId, DisplayPlane, Interrupts, OpenGuard, PciFunction};

use crate::parent::{AttrSpec, DeviceDescription, Parent, TypeSpec, VendorAttrs};
use crate::{CoreError, DeviceEnv, MdevUuid};

/// The attribute of peer-to-peer types that names a device's group of peers (seed 000).
pub const P2P_ATTR: &str = "peer_to_peer_resource_uuid";

/// Where served devices go: the daemon puts each on a vfio-user socket in a directory of
/// its own; tests keep them in-process.
pub trait Serve: Send + Sync {
    /// The environment of new device `uuid` of parent `parent` (its directory, created
    /// here, if the front-end gives devices one). The default has none.
    fn env(&self, _parent: &str, uuid: &MdevUuid) -> std::io::Result<DeviceEnv> {
        Ok(DeviceEnv::detached(*uuid))
    }
    /// Starts serving `function`, the new device of `env`.
    fn start(&self, env: &DeviceEnv, function: PciFunction) -> std::io::Result<Box<dyn Served>>;
    /// Builds and serves the new device itself, from its description (in another process:
    /// a worker), instead of the core building it here with the parent's `build` and
    /// handing it to [`Serve::start`]. `None` (the default): the core builds it.
    fn start_described(&self, _device: Described<'_>) -> Option<std::io::Result<Remote>> {
        None
    }
    /// Removes what `env` made, once the device is stopped (or was never served).
    fn release(&self, _env: &DeviceEnv) {}
    /// Device `uuid` has moved to another IOMMU group, whose other devices are `peers`
    /// (none: it is alone there). A front-end that serves each group in a process of its
    /// own moves it to the process of its new group. Called with the registry lock held,
    /// while no client holds either group.
    fn regroup(&self, _uuid: &MdevUuid, _peers: &[MdevUuid]) -> std::io::Result<()> {
        Ok(())
    }
}

/// A device to adopt ([`Core::adopt`]).
pub struct Adoptee {
    /// Its UUID.
    pub uuid: MdevUuid,
    /// Its parent's name.
    pub parent: String,
    /// What its parent's `create` made of it then.
    pub description: DeviceDescription,
    /// Its environment (its directory and socket policy).
    pub env: DeviceEnv,
    /// The client holding it, if any.
    pub held: Option<ClientId>,
}

fn t_is_p2p(attrs: &[AttrSpec]) -> bool {
    attrs.iter().any(|a| a.name == P2P_ATTR)
}

/// A new device for a front-end that builds devices itself ([`Serve::start_described`]).
pub struct Described<'a> {
    /// Its parent's name.
    pub parent: &'a str,
    /// Its UUID.
    pub uuid: MdevUuid,
    /// What the parent's `create` made of it.
    pub description: &'a DeviceDescription,
    /// Its environment ([`Serve::env`]).
    pub env: &'a DeviceEnv,
    /// The core's checks around every open and close (one client per IOMMU group): the
    /// front-end runs them around the device's own hooks, wherever it serves it.
    pub guard: Arc<dyn OpenGuard>,
}

/// A device a front-end built and serves itself.
pub struct Remote {
    /// The serving, which also carries the REQ interrupt ([`Served::signal_req`]).
    pub served: Box<dyn Served>,
    /// Its vendor attributes, if it has any.
    pub attrs: Option<Arc<dyn VendorAttrs>>,
}

/// A device being served. Shared: queries run on a clone without the registry lock, so
/// `stop` takes `&self` and may run while a query is under way.
pub trait Served: Send + Sync {
    /// The vfio-user socket, if it has one.
    fn socket(&self) -> Option<&Path> {
        None
    }
    /// Stops serving: disconnects any client (its session ends with the usual cleanup, so
    /// the device's `close` runs) and removes the socket. Returns once that is done.
    fn stop(&self);
    /// The device's current display plane ([`umdev_pci::PciDevice::display_plane`]).
    fn display_plane(&self) -> Result<DisplayPlane, Errno> {
        Err(Errno::NOTSUP)
    }
    /// Asks the client to release the device (the REQ interrupt), for a device the core
    /// did not build (whose interrupts it does not hold).
    fn signal_req(&self) {}
    /// Whether it is being served now (the `state` attribute).
    fn state(&self) -> ServedState {
        ServedState::Running
    }
    /// The device's counters in the Prometheus text format, each sample with `labels`
    /// (none by default).
    fn metrics(&self, _labels: &str) -> String {
        String::new()
    }
}

/// Whether a device is being served (its `state` attribute in the tree).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServedState {
    /// Served: a client may attach.
    Running,
    /// Its worker process died; the daemon is starting it again (its clients are gone).
    WorkerDied,
}

impl ServedState {
    /// The attribute's text.
    pub fn as_str(self) -> &'static str {
        match self {
            ServedState::Running => "running",
            ServedState::WorkerDied => "worker-died",
        }
    }
}

/// Tunables of the core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// How long `remove` waits for a client to release a device after the REQ interrupt.
    pub release_timeout: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            release_timeout: Duration::from_secs(2),
        }
    }
}

/// A type as the ABI shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeInfo {
    /// `<driver>-<name>`.
    pub id: String,
    /// The `name` file, if any.
    pub name: Option<String>,
    /// The `description` file, if any.
    pub description: Option<String>,
    /// The `device_api` file.
    pub device_api: String,
    /// How many more can be created now.
    pub available_instances: u32,
    /// The devices of this type, sorted.
    pub devices: Vec<MdevUuid>,
}

/// A device as the ABI shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdevInfo {
    /// Its name.
    pub uuid: MdevUuid,
    /// Its parent's name.
    pub parent: String,
    /// Its type id.
    pub type_id: String,
    /// Its IOMMU group.
    pub iommu_group: u32,
    /// Its vfio-user socket.
    pub socket: Option<PathBuf>,
    /// The client holding it, if any.
    pub held_by: Option<ClientId>,
    /// Its attribute files (vendor attributes and `peer_to_peer_resource_uuid`).
    pub attrs: Vec<AttrSpec>,
    /// Whether it is served now.
    pub state: ServedState,
}

/// An IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// Its number.
    pub id: u32,
    /// Its devices, sorted.
    pub devices: Vec<MdevUuid>,
    /// The client that holds it (holds any of its devices), if any.
    pub owner: Option<ClientId>,
    /// The peer-to-peer resource UUID its devices share, for peer-to-peer types.
    pub peer_to_peer: Option<MdevUuid>,
}

struct ParentEntry {
    driver: Arc<dyn Parent>,
    types: Vec<TypeSpec>,
    /// The parent's own attributes.
    attrs: Vec<AttrSpec>,
    unregistering: bool,
    devices: BTreeSet<MdevUuid>,
}

impl ParentEntry {
    fn type_id(&self, t: &TypeSpec) -> String {
        format!("{}-{}", self.driver.driver(), t.name)
    }

    fn find_type(&self, type_id: &str) -> Option<&TypeSpec> {
        let name = type_id
            .strip_prefix(self.driver.driver())?
            .strip_prefix('-')?;
        self.types.iter().find(|t| t.name == name)
    }
}

struct MdevEntry {
    parent: String,
    /// Type name within the parent (`2`), and id (`mtty-2`).
    type_name: String,
    type_id: String,
    group: u32,
    p2p: Option<MdevUuid>,
    removing: bool,
    held_by: Option<ClientId>,
    /// The device's interrupts, when the core built it (else its `Served` raises REQ).
    irqs: Option<Interrupts>,
    served: Option<Arc<dyn Served>>,
    socket: Option<PathBuf>,
    attr_specs: Vec<AttrSpec>,
    attrs: Option<Arc<dyn VendorAttrs>>,
    description: DeviceDescription,
    env: DeviceEnv,
}

#[derive(Default)]
struct Group {
    devices: BTreeSet<MdevUuid>,
    owner: Option<ClientId>,
    opens: u32,
    p2p: Option<MdevUuid>,
}

#[derive(Default)]
struct State {
    parents: BTreeMap<String, ParentEntry>,
    mdevs: BTreeMap<MdevUuid, MdevEntry>,
    groups: BTreeMap<u32, Group>,
    /// Peer-to-peer resource UUID -> its group.
    p2p: BTreeMap<MdevUuid, u32>,
}

impl State {
    fn in_use<'a>(&'a self, parent: &ParentEntry) -> Vec<&'a str> {
        parent
            .devices
            .iter()
            .filter_map(|u| self.mdevs.get(u).map(|m| m.type_name.as_str()))
            .collect()
    }

    /// The lowest free group number, as the kernel's IDA hands them out.
    fn new_group(&mut self, p2p: Option<MdevUuid>) -> u32 {
        let mut id = 0;
        for &k in self.groups.keys() {
            if k != id {
                break;
            }
            id += 1;
        }
        self.groups.insert(
            id,
            Group {
                p2p,
                ..Group::default()
            },
        );
        if let Some(p) = p2p {
            self.p2p.insert(p, id);
        }
        id
    }

    fn leave_group(&mut self, uuid: &MdevUuid, id: u32) {
        let empty = match self.groups.get_mut(&id) {
            Some(g) => {
                g.devices.remove(uuid);
                g.devices.is_empty()
            }
            None => false,
        };
        if empty {
            if let Some(g) = self.groups.remove(&id) {
                if let Some(p) = g.p2p {
                    self.p2p.remove(&p);
                }
            }
        }
    }

    fn group_is_open(&self, id: u32) -> bool {
        self.groups.get(&id).is_some_and(|g| g.opens > 0)
    }
}

struct Inner {
    state: Mutex<State>,
    /// Signalled whenever a device is closed or removed.
    changed: Condvar,
    serve: Arc<dyn Serve>,
    config: CoreConfig,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client opens `uuid`: refused while the device goes away, or while another client
    /// holds any device of its group.
    fn acquire(&self, uuid: &MdevUuid, client: ClientId) -> Result<(), Errno> {
        let mut st = self.lock();
        let st = &mut *st;
        let m = st.mdevs.get_mut(uuid).ok_or(Errno::NODEV)?;
        let unregistering = st.parents.get(&m.parent).is_none_or(|p| p.unregistering);
        if m.removing || unregistering {
            return Err(Errno::NODEV);
        }
        if m.held_by.is_some() {
            return Err(Errno::BUSY);
        }
        let g = st.groups.get_mut(&m.group).ok_or(Errno::NODEV)?;
        if let Some(owner) = &g.owner {
            if !owner.same_client(&client) {
                tracing::warn!(%uuid, group = m.group, %client, %owner,
                    "refusing a client: another client holds the IOMMU group");
                return Err(Errno::BUSY);
            }
        } else {
            g.owner = Some(client);
        }
        g.opens += 1;
        m.held_by = Some(client);
        tracing::info!(%uuid, group = m.group, %client, "mdev opened");
        Ok(())
    }

    fn release(&self, uuid: &MdevUuid) {
        let mut st = self.lock();
        let st = &mut *st;
        if let Some(m) = st.mdevs.get_mut(uuid) {
            if m.held_by.take().is_some() {
                if let Some(g) = st.groups.get_mut(&m.group) {
                    g.opens = g.opens.saturating_sub(1);
                    if g.opens == 0 {
                        g.owner = None;
                    }
                }
                tracing::info!(%uuid, "mdev closed");
            }
        }
        self.changed.notify_all();
    }
}

/// The core's part in every `open` and `close` of a device it created: one client per
/// IOMMU group, no open while the device goes away. The framework calls it around the
/// device's own hooks ([`OpenGuard`]), so no hook of the device passes through the core.
struct GroupGuard {
    core: Weak<Inner>,
    uuid: MdevUuid,
}

impl OpenGuard for GroupGuard {
    fn acquire(&self, client: &ClientId) -> Result<(), Errno> {
        let core = self.core.upgrade().ok_or(Errno::NODEV)?;
        core.acquire(&self.uuid, *client)
    }

    fn release(&self) {
        if let Some(core) = self.core.upgrade() {
            core.release(&self.uuid);
        }
    }
}

/// The mdev core. Cheap to clone; every clone is the same registry.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Parent names are directory names: no `/`, not `.` or `..`, not empty.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

impl Core {
    /// An empty registry whose devices are served by `serve`.
    pub fn new(config: CoreConfig, serve: Arc<dyn Serve>) -> Core {
        Core {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                serve,
                config,
            }),
        }
    }

    /// Registers parent `name` (EEXIST if taken, EINVAL for a bad name or a type list with
    /// a bad or repeated name).
    pub fn register_parent(&self, name: &str, parent: Arc<dyn Parent>) -> Result<(), CoreError> {
        if !valid_name(name) {
            return Err(CoreError::Invalid(format!("parent name {name:?}")));
        }
        let types = parent.types();
        let mut seen = BTreeSet::new();
        for t in &types {
            if !valid_name(&t.name) || !seen.insert(t.name.clone()) {
                return Err(CoreError::Invalid(format!("type name {:?}", t.name)));
            }
        }
        if !valid_name(parent.driver()) {
            return Err(CoreError::Invalid(format!(
                "driver name {:?}",
                parent.driver()
            )));
        }
        let attrs = parent.attrs();
        for a in &attrs {
            let top = a.name.split('/').next().unwrap_or_default();
            let parts_ok = a.name.split('/').count() <= 2 && a.name.split('/').all(valid_name);
            if !parts_ok || top == "mdev_supported_types" || MdevUuid::parse(top).is_ok() {
                return Err(CoreError::Invalid(format!("parent attribute {:?}", a.name)));
            }
        }
        let mut st = self.inner.lock();
        if st.parents.contains_key(name) {
            return Err(CoreError::ParentExists(name.to_owned()));
        }
        st.parents.insert(
            name.to_owned(),
            ParentEntry {
                driver: parent,
                types,
                attrs,
                unregistering: false,
                devices: BTreeSet::new(),
            },
        );
        tracing::info!(parent = name, "parent registered");
        Ok(())
    }

    /// Unregisters parent `name` and removes its devices. While a client holds one of them
    /// it is refused (EBUSY) unless `force`, which takes the devices away from their
    /// clients. Creation on the parent fails with ENODEV from the moment this starts.
    pub fn unregister_parent(&self, name: &str, force: bool) -> Result<(), CoreError> {
        let devices = {
            let mut st = self.inner.lock();
            let st = &mut *st;
            let p = st
                .parents
                .get(name)
                .filter(|p| !p.unregistering)
                .ok_or_else(|| CoreError::NoParent(name.to_owned()))?;
            let held = p
                .devices
                .iter()
                .find(|u| st.mdevs.get(u).is_some_and(|m| m.held_by.is_some()));
            if let (Some(u), false) = (held, force) {
                return Err(CoreError::Busy(format!("mdev {u} of parent {name}")));
            }
            let devices: Vec<MdevUuid> = p.devices.iter().copied().collect();
            if let Some(p) = st.parents.get_mut(name) {
                p.unregistering = true;
            }
            devices
        };
        for uuid in devices {
            match self.remove_inner(&uuid, true) {
                Ok(()) | Err(CoreError::NoDevice(_)) | Err(CoreError::Removing(_)) => {}
                Err(e) => {
                    tracing::warn!(%uuid, error = %e, "removing an mdev of an unregistering parent")
                }
            }
        }
        let mut st = self.inner.lock();
        // Removals that were already running when we started finish on their own, or fail
        // (a client that kept its device): then the device is removed here, by force.
        loop {
            let left: Vec<(MdevUuid, bool)> = st
                .parents
                .get(name)
                .map(|p| {
                    p.devices
                        .iter()
                        .map(|u| (*u, st.mdevs.get(u).is_some_and(|m| m.removing)))
                        .collect()
                })
                .unwrap_or_default();
            if left.is_empty() {
                break;
            }
            if let Some((uuid, _)) = left.iter().find(|(_, removing)| !removing) {
                let uuid = *uuid;
                drop(st);
                if let Err(e) = self.remove_inner(&uuid, true) {
                    tracing::debug!(%uuid, error = %e, "forced removal raced another");
                }
                st = self.inner.lock();
                continue;
            }
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        st.parents.remove(name);
        tracing::info!(parent = name, "parent unregistered");
        Ok(())
    }

    /// The registered parents (not those unregistering), sorted.
    pub fn parents(&self) -> Vec<String> {
        let st = self.inner.lock();
        st.parents
            .iter()
            .filter(|(_, p)| !p.unregistering)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether `name` is a registered parent (not unregistering).
    pub fn has_parent(&self, name: &str) -> bool {
        self.inner
            .lock()
            .parents
            .get(name)
            .is_some_and(|p| !p.unregistering)
    }

    /// The declaration of type `type_id` of `parent`, if it has one; cheap (no counting),
    /// for callers that only need to know that the type exists or what it is called.
    pub fn type_spec(&self, parent: &str, type_id: &str) -> Option<TypeSpec> {
        let st = self.inner.lock();
        st.parents.get(parent)?.find_type(type_id).cloned()
    }

    /// The types of `parent`, in the parent's order.
    pub fn types(&self, parent: &str) -> Result<Vec<TypeInfo>, CoreError> {
        let st = self.inner.lock();
        let p = st
            .parents
            .get(parent)
            .ok_or_else(|| CoreError::NoParent(parent.to_owned()))?;
        let in_use = st.in_use(p);
        Ok(p.types
            .iter()
            .map(|t| type_info(&st, p, t, &in_use))
            .collect())
    }

    /// One type of `parent`.
    pub fn type_info(&self, parent: &str, type_id: &str) -> Result<TypeInfo, CoreError> {
        let st = self.inner.lock();
        let p = st
            .parents
            .get(parent)
            .ok_or_else(|| CoreError::NoParent(parent.to_owned()))?;
        let t = p.find_type(type_id).ok_or_else(|| CoreError::NoType {
            parent: parent.to_owned(),
            type_id: type_id.to_owned(),
        })?;
        let in_use = st.in_use(p);
        Ok(type_info(&st, p, t, &in_use))
    }

    /// Creates device `uuid` of `type_id` under `parent` and starts serving it: the
    /// parent's `create` (a description), the front-end's environment for it, the parent's
    /// `build`, then the server. A failure at any step undoes the steps before it (the
    /// parent's `remove`, the environment's release), so nothing remains: no device, no
    /// group, no tree entry, no socket.
    ///
    /// EEXIST if the UUID exists under any parent, ENODEV if the parent is unknown or
    /// unregistering, ENOENT for an unknown type, ENOSPC when none is available, else the
    /// driver's or the server's error.
    pub fn create(&self, parent: &str, type_id: &str, uuid: MdevUuid) -> Result<(), CoreError> {
        let mut st = self.inner.lock();
        let st = &mut *st;
        if st.mdevs.contains_key(&uuid) {
            return Err(CoreError::Exists(uuid));
        }
        let p = st
            .parents
            .get(parent)
            .filter(|p| !p.unregistering)
            .ok_or_else(|| CoreError::NoParent(parent.to_owned()))?;
        let t = p.find_type(type_id).ok_or_else(|| CoreError::NoType {
            parent: parent.to_owned(),
            type_id: type_id.to_owned(),
        })?;
        if p.driver.available(&t.name, &st.in_use(p)) == 0 {
            return Err(CoreError::NoSpace {
                parent: parent.to_owned(),
                type_id: type_id.to_owned(),
            });
        }
        let driver = p.driver.clone();
        let driver_error = |errno, what: &str| CoreError::Driver {
            errno,
            message: format!("{what} {type_id} {uuid} on {parent}"),
        };
        let description = driver
            .create(&uuid, &t.name)
            .map_err(|e| driver_error(e, "creating"))?;
        let undo_create = |why: &dyn std::fmt::Display| {
            tracing::warn!(%uuid, parent, type_id, error = %why, "creating an mdev failed; undone");
            driver.remove(&uuid, &description);
        };
        let env = match self.inner.serve.env(parent, &uuid) {
            Ok(env) => env,
            Err(source) => {
                undo_create(&source);
                return Err(CoreError::Serve { uuid, source });
            }
        };
        let type_name = t.name.clone();
        let peer_to_peer = t.peer_to_peer;
        let mut attr_specs = t.attrs.clone();
        if peer_to_peer {
            attr_specs.push(AttrSpec::writable(P2P_ATTR));
        }
        let guard = Arc::new(GroupGuard {
            core: Arc::downgrade(&self.inner),
            uuid,
        });
        let described = Described {
            parent,
            uuid,
            description: &description,
            env: &env,
            guard: guard.clone(),
        };
        let (served, irqs, attrs) = match self.inner.serve.start_described(described) {
            Some(Ok(remote)) => (remote.served, None, remote.attrs),
            Some(Err(source)) => {
                self.inner.serve.release(&env);
                undo_create(&source);
                return Err(CoreError::Serve { uuid, source });
            }
            None => {
                let parts = match driver.build(&uuid, &description, &env) {
                    Ok(parts) => parts,
                    Err(e) => {
                        self.inner.serve.release(&env);
                        undo_create(&e);
                        return Err(driver_error(e, "building"));
                    }
                };
                let function = PciFunction::new(parts.spec, parts.device).with_guard(guard);
                let irqs = function.interrupts();
                match self.inner.serve.start(&env, function) {
                    Ok(s) => (s, Some(irqs), parts.attrs.map(Arc::from)),
                    Err(source) => {
                        self.inner.serve.release(&env);
                        undo_create(&source);
                        return Err(CoreError::Serve { uuid, source });
                    }
                }
            }
        };
        // Peer-to-peer devices start with a fresh resource UUID: alone, until moved.
        let p2p = peer_to_peer.then(MdevUuid::random);
        let group = st.new_group(p2p);
        if let Some(g) = st.groups.get_mut(&group) {
            g.devices.insert(uuid);
        }
        if let Some(p) = st.parents.get_mut(parent) {
            p.devices.insert(uuid);
        }
        st.mdevs.insert(
            uuid,
            MdevEntry {
                parent: parent.to_owned(),
                type_name,
                type_id: type_id.to_owned(),
                group,
                p2p,
                removing: false,
                held_by: None,
                irqs,
                socket: served.socket().map(Path::to_path_buf),
                served: Some(Arc::from(served)),
                attr_specs,
                attrs,
                description,
                env,
            },
        );
        tracing::info!(%uuid, parent, type_id, group, "mdev created");
        Ok(())
    }

    /// Takes over devices a front-end already serves (a worker that outlived its daemon):
    /// enters each in the registry, without the parent's `create` or `build`, as one IOMMU
    /// group (a worker serves one group), with the client that holds it, if any. `serve` is
    /// given each device's group rules and returns its serving. EEXIST for a UUID in use,
    /// ENODEV for an unknown parent, ENOENT for a type it does not have.
    pub fn adopt(
        &self,
        devices: Vec<Adoptee>,
        mut serve: impl FnMut(&Adoptee, Arc<dyn OpenGuard>) -> Remote,
    ) -> Result<(), CoreError> {
        let mut st = self.inner.lock();
        let st = &mut *st;
        for d in &devices {
            if st.mdevs.contains_key(&d.uuid) {
                return Err(CoreError::Exists(d.uuid));
            }
            let p = st
                .parents
                .get(&d.parent)
                .ok_or_else(|| CoreError::NoParent(d.parent.clone()))?;
            if p.types.iter().all(|t| t.name != d.description.type_name) {
                return Err(CoreError::NoType {
                    parent: d.parent.clone(),
                    type_id: d.description.type_name.clone(),
                });
            }
        }
        let p2p = devices.iter().any(|d| {
            st.parents.get(&d.parent).is_some_and(|p| {
                p.types
                    .iter()
                    .any(|t| t.name == d.description.type_name && t.peer_to_peer)
            })
        });
        let group = st.new_group(p2p.then(MdevUuid::random));
        for d in &devices {
            let Some(p) = st.parents.get_mut(&d.parent) else {
                continue;
            };
            let Some(t) = p.types.iter().find(|t| t.name == d.description.type_name) else {
                continue;
            };
            let type_id = p.type_id(t);
            let mut attr_specs = t.attrs.clone();
            if t.peer_to_peer {
                attr_specs.push(AttrSpec::writable(P2P_ATTR));
            }
            p.devices.insert(d.uuid);
            let guard: Arc<dyn OpenGuard> = Arc::new(GroupGuard {
                core: Arc::downgrade(&self.inner),
                uuid: d.uuid,
            });
            let remote = serve(d, guard);
            let g = st
                .groups
                .get_mut(&group)
                .ok_or(CoreError::NoDevice(d.uuid))?;
            g.devices.insert(d.uuid);
            if let Some(client) = d.held {
                g.owner = Some(client);
                g.opens += 1;
            }
            let p2p = g.p2p;
            st.mdevs.insert(
                d.uuid,
                MdevEntry {
                    parent: d.parent.clone(),
                    type_name: d.description.type_name.clone(),
                    type_id: type_id.clone(),
                    group,
                    p2p: if t_is_p2p(&attr_specs) { p2p } else { None },
                    removing: false,
                    held_by: d.held,
                    irqs: None,
                    socket: remote.served.socket().map(Path::to_path_buf),
                    served: Some(Arc::from(remote.served)),
                    attr_specs,
                    attrs: remote.attrs,
                    description: d.description.clone(),
                    env: d.env.clone(),
                },
            );
            tracing::info!(uuid = %d.uuid, parent = d.parent, type_id, group, held = d.held.is_some(), "mdev adopted");
        }
        Ok(())
    }

    /// Removes device `uuid`: ENODEV if there is none, EAGAIN while it is being removed.
    /// A device a client holds is first asked back through the REQ interrupt; if the client
    /// has not released it within the configured time and the parent cannot hot-unplug,
    /// the removal fails with EBUSY and the device stays.
    pub fn remove(&self, uuid: &MdevUuid) -> Result<(), CoreError> {
        self.remove_inner(uuid, false)
    }

    fn remove_inner(&self, uuid: &MdevUuid, force: bool) -> Result<(), CoreError> {
        let mut st = self.inner.lock();
        let m = st.mdevs.get_mut(uuid).ok_or(CoreError::NoDevice(*uuid))?;
        if m.removing {
            return Err(CoreError::Removing(*uuid));
        }
        m.removing = true;
        if m.held_by.is_some() && !force {
            tracing::info!(%uuid, "asking the client to release the device (REQ)");
            match (&m.irqs, &m.served) {
                (Some(irqs), _) => irqs.signal_req(),
                (None, Some(served)) => served.signal_req(),
                (None, None) => {}
            }
            let deadline = Instant::now() + self.inner.config.release_timeout;
            loop {
                let held = st.mdevs.get(uuid).is_some_and(|m| m.held_by.is_some());
                let now = Instant::now();
                if !held || now >= deadline {
                    break;
                }
                st = self
                    .inner
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let hot_unplug = {
                let parent = st.mdevs.get(uuid).map(|m| m.parent.clone());
                parent
                    .and_then(|p| st.parents.get(&p))
                    .is_some_and(|p| p.driver.hot_unplug())
            };
            if let Some(m) = st.mdevs.get_mut(uuid) {
                if m.held_by.is_some() && !hot_unplug {
                    m.removing = false;
                    // An unregistering parent may be waiting for this removal.
                    self.inner.changed.notify_all();
                    return Err(CoreError::Busy(format!(
                        "mdev {uuid} (its client did not release it)"
                    )));
                }
            }
        }
        let served = st.mdevs.get_mut(uuid).and_then(|m| m.served.take());
        drop(st);
        // With the lock released: stopping joins the session, whose close (the device's
        // teardown, then the open guard's release) needs the lock. So the device has closed
        // before it leaves its group below.
        if let Some(s) = served {
            s.stop();
        }
        let mut st = self.inner.lock();
        if let Some(m) = st.mdevs.remove(uuid) {
            st.leave_group(uuid, m.group);
            self.inner.serve.release(&m.env);
            if let Some(p) = st.parents.get_mut(&m.parent) {
                p.devices.remove(uuid);
                // Under the lock: a new device of the same UUID cannot meet what is left.
                p.driver.remove(uuid, &m.description);
            }
        }
        drop(st);
        self.inner.changed.notify_all();
        tracing::info!(%uuid, "mdev removed");
        Ok(())
    }

    /// Device `uuid`, if it exists.
    pub fn mdev(&self, uuid: &MdevUuid) -> Option<MdevInfo> {
        let st = self.inner.lock();
        st.mdevs.get(uuid).map(|m| mdev_info(uuid, m))
    }

    /// Every device, sorted by UUID.
    pub fn mdevs(&self) -> Vec<MdevInfo> {
        let st = self.inner.lock();
        st.mdevs.iter().map(|(u, m)| mdev_info(u, m)).collect()
    }

    /// The devices of `parent`, sorted.
    pub fn parent_devices(&self, parent: &str) -> Vec<MdevUuid> {
        let st = self.inner.lock();
        st.parents
            .get(parent)
            .map(|p| p.devices.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every IOMMU group, by number.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let st = self.inner.lock();
        st.groups.iter().map(|(&id, g)| group_info(id, g)).collect()
    }

    /// IOMMU group `id`.
    pub fn group(&self, id: u32) -> Option<GroupInfo> {
        let st = self.inner.lock();
        st.groups.get(&id).map(|g| group_info(id, g))
    }

    /// Reads attribute `name` of device `uuid` (ENOENT if it has no such attribute).
    pub fn read_attr(&self, uuid: &MdevUuid, name: &str) -> Result<String, CoreError> {
        let attrs = {
            let st = self.inner.lock();
            let m = st.mdevs.get(uuid).ok_or(CoreError::NoDevice(*uuid))?;
            if !m.attr_specs.iter().any(|a| a.name == name) {
                return Err(CoreError::NoAttribute(name.to_owned()));
            }
            if name == P2P_ATTR {
                return Ok(m.p2p.map(|p| format!("{p}\n")).unwrap_or_default());
            }
            m.attrs.clone()
        };
        // The driver's attribute code runs without the registry lock.
        let attrs = attrs.ok_or_else(|| CoreError::NoAttribute(name.to_owned()))?;
        let mut s = attrs.show(name).map_err(|errno| CoreError::Driver {
            errno,
            message: format!("reading {name} of {uuid}"),
        })?;
        if !s.ends_with('\n') {
            s.push('\n');
        }
        Ok(s)
    }

    /// Writes `value` (as written, newline included) to attribute `name` of `uuid`:
    /// ENOENT for an unknown attribute, EACCES for a read-only one. Writing
    /// `peer_to_peer_resource_uuid` moves the device to the group of devices with that
    /// value (a new group if none has it); EBUSY while any device involved is open.
    pub fn write_attr(&self, uuid: &MdevUuid, name: &str, value: &str) -> Result<(), CoreError> {
        let attrs = {
            let mut st = self.inner.lock();
            let m = st.mdevs.get(uuid).ok_or(CoreError::NoDevice(*uuid))?;
            let spec = m
                .attr_specs
                .iter()
                .find(|a| a.name == name)
                .ok_or_else(|| CoreError::NoAttribute(name.to_owned()))?;
            if !spec.writable {
                return Err(CoreError::ReadOnly(name.to_owned()));
            }
            if name == P2P_ATTR {
                let v = value.strip_suffix('\n').unwrap_or(value);
                let target = MdevUuid::parse(v).map_err(|e| CoreError::Invalid(e.to_string()))?;
                let moved = move_p2p(&mut st, uuid, target)?;
                if !moved {
                    return Ok(());
                }
                let peers: Vec<MdevUuid> = st
                    .mdevs
                    .get(uuid)
                    .and_then(|m| st.groups.get(&m.group))
                    .map(|g| g.devices.iter().filter(|d| *d != uuid).copied().collect())
                    .unwrap_or_default();
                return self
                    .inner
                    .serve
                    .regroup(uuid, &peers)
                    .map_err(|source| CoreError::Serve {
                        uuid: *uuid,
                        source,
                    });
            }
            m.attrs.clone()
        };
        let attrs = attrs.ok_or_else(|| CoreError::NoAttribute(name.to_owned()))?;
        attrs.store(name, value).map_err(|errno| CoreError::Driver {
            errno,
            message: format!("writing {name} of {uuid}"),
        })
    }

    /// The attributes of parent `parent` (files in its directory).
    pub fn parent_attrs(&self, parent: &str) -> Vec<AttrSpec> {
        let st = self.inner.lock();
        st.parents
            .get(parent)
            .map(|p| p.attrs.clone())
            .unwrap_or_default()
    }

    fn parent_attr(
        &self,
        parent: &str,
        name: &str,
        write: bool,
    ) -> Result<Arc<dyn Parent>, CoreError> {
        let st = self.inner.lock();
        let p = st
            .parents
            .get(parent)
            .filter(|p| !p.unregistering)
            .ok_or_else(|| CoreError::NoParent(parent.to_owned()))?;
        let a = p
            .attrs
            .iter()
            .find(|a| a.name == name)
            .ok_or_else(|| CoreError::NoAttribute(name.to_owned()))?;
        if write && !a.writable {
            return Err(CoreError::ReadOnly(name.to_owned()));
        }
        Ok(p.driver.clone())
    }

    /// Reads attribute `name` of parent `parent`.
    pub fn read_parent_attr(&self, parent: &str, name: &str) -> Result<String, CoreError> {
        let driver = self.parent_attr(parent, name, false)?;
        // The driver's attribute code runs without the registry lock.
        let mut s = driver.show_attr(name).map_err(|errno| CoreError::Driver {
            errno,
            message: format!("reading {name} of {parent}"),
        })?;
        if !s.ends_with('\n') {
            s.push('\n');
        }
        Ok(s)
    }

    /// Writes `value` to attribute `name` of parent `parent` (EACCES if read-only).
    pub fn write_parent_attr(
        &self,
        parent: &str,
        name: &str,
        value: &str,
    ) -> Result<(), CoreError> {
        let driver = self.parent_attr(parent, name, true)?;
        driver
            .store_attr(name, value)
            .map_err(|errno| CoreError::Driver {
                errno,
                message: format!("writing {name} of {parent}"),
            })
    }

    /// The description device `uuid` was created from.
    pub fn description(&self, uuid: &MdevUuid) -> Option<DeviceDescription> {
        let st = self.inner.lock();
        st.mdevs.get(uuid).map(|m| m.description.clone())
    }

    /// Device `uuid`'s current display plane: ENOTSUP for a device that is not a display,
    /// ENODATA while its display is off.
    pub fn display_plane(&self, uuid: &MdevUuid) -> Result<DisplayPlane, CoreError> {
        let served = {
            let st = self.inner.lock();
            let m = st.mdevs.get(uuid).ok_or(CoreError::NoDevice(*uuid))?;
            m.served.clone().ok_or(CoreError::Removing(*uuid))?
        };
        served.display_plane().map_err(|errno| CoreError::Driver {
            errno,
            message: format!("querying the display plane of {uuid}"),
        })
    }

    /// Every device's counters ([`Served::metrics`]) in the Prometheus text format, labelled
    /// with its UUID, parent and type.
    pub fn metrics(&self) -> String {
        // Asked without the lock: a worker that is slow to answer delays the scrape only.
        let devices: Vec<(String, Arc<dyn Served>)> = {
            let st = self.inner.lock();
            st.mdevs
                .iter()
                .filter_map(|(uuid, m)| {
                    let labels = format!(
                        "uuid=\"{uuid}\",parent=\"{}\",type=\"{}\"",
                        m.parent, m.type_id
                    );
                    Some((labels, m.served.clone()?))
                })
                .collect()
        };
        let mut out = String::new();
        for (labels, served) in devices {
            out.push_str(&served.metrics(&labels));
        }
        out
    }

    /// The configuration the core was built with.
    pub fn config(&self) -> &CoreConfig {
        &self.inner.config
    }
}

/// Moves `uuid` to the group of resource `target`; whether it moved (false: it was there).
fn move_p2p(st: &mut State, uuid: &MdevUuid, target: MdevUuid) -> Result<bool, CoreError> {
    let Some(m) = st.mdevs.get(uuid) else {
        return Err(CoreError::NoDevice(*uuid));
    };
    if m.p2p == Some(target) {
        return Ok(false);
    }
    let old = m.group;
    let new = st.p2p.get(&target).copied();
    if st.group_is_open(old) || new.is_some_and(|g| st.group_is_open(g)) {
        return Err(CoreError::Busy(format!(
            "IOMMU group of mdev {uuid} or of resource {target}"
        )));
    }
    st.leave_group(uuid, old);
    let id = match new {
        Some(id) => id,
        None => st.new_group(Some(target)),
    };
    if let Some(g) = st.groups.get_mut(&id) {
        g.devices.insert(*uuid);
    }
    if let Some(m) = st.mdevs.get_mut(uuid) {
        m.group = id;
        m.p2p = Some(target);
    }
    tracing::info!(%uuid, from = old, to = id, "mdev moved to another IOMMU group");
    Ok(true)
}

fn type_info(st: &State, p: &ParentEntry, t: &TypeSpec, in_use: &[&str]) -> TypeInfo {
    TypeInfo {
        id: p.type_id(t),
        name: t.pretty_name.clone(),
        description: t.description.clone(),
        device_api: t.device_api.clone(),
        available_instances: p.driver.available(&t.name, in_use),
        devices: p
            .devices
            .iter()
            .filter(|u| st.mdevs.get(u).is_some_and(|m| m.type_name == t.name))
            .copied()
            .collect(),
    }
}

fn mdev_info(uuid: &MdevUuid, m: &MdevEntry) -> MdevInfo {
    MdevInfo {
        uuid: *uuid,
        parent: m.parent.clone(),
        type_id: m.type_id.clone(),
        iommu_group: m.group,
        socket: m.socket.clone(),
        held_by: m.held_by,
        attrs: m.attr_specs.clone(),
        state: m
            .served
            .as_ref()
            .map_or(ServedState::Running, |s| s.state()),
    }
}

fn group_info(id: u32, g: &Group) -> GroupInfo {
    GroupInfo {
        id,
        devices: g.devices.iter().copied().collect(),
        owner: g.owner,
        peer_to_peer: g.p2p,
    }
}
