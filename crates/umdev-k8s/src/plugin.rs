//! One device plugin per mdev type: the slots it offers, and what `Allocate` does.
//!
//! A type's slots are what its parents' `available_instances` allow plus the instances the
//! plugin holds; their IDs (`<type-id>-<n>`) are stable, but every allocation creates a new
//! mdev (a fresh UUID, recorded in the checkpoint), so a pod never inherits another pod's
//! device or its data. `Allocate` creates the mdev through sysfs, gives its socket to the
//! pod's VMM user (the control API's `access`), waits for the socket, and answers with a
//! mount of that device's own directory, environment variables naming the UUIDs and
//! sockets, and CDI names when asked; a failure removes what the call created.
//!
//! A type can be offered in bundles (`--bundle <type>=<n>`): each slot is then `n` devices
//! of one parent sharing an IOMMU group (a fresh `peer_to_peer_resource_uuid` written into
//! each), so the kubelet, whose preferred allocation is only advisory, can never split a
//! group between pods.

// tonic's `Status` is the error of every gRPC call, large or not.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::api::v1beta1::{
    device_plugin_server::DevicePlugin, AllocateRequest, AllocateResponse, CdiDevice,
    ContainerAllocateResponse, Device, DevicePluginOptions, Empty, ListAndWatchResponse, Mount,
    PreStartContainerRequest, PreStartContainerResponse, PreferredAllocationRequest,
    PreferredAllocationResponse,
};
use crate::api::{HEALTHY, UNHEALTHY};
use crate::checkpoint::{Allocation, Checkpoint};
use crate::tree::{Tree, TypeEntry};

/// How the plugin hands devices out.
#[derive(Clone, Debug)]
pub struct Options {
    /// Resource name prefix (`umdev.io`).
    pub prefix: String,
    /// Where a device's directory appears in the container: `<dir>/<n>` for its n-th device.
    pub container_dir: PathBuf,
    /// `user[:group]` the device's socket is given to (the pod's VMM), if any.
    pub owner: Option<String>,
    /// umdevd's control socket (for `owner`).
    pub control: PathBuf,
    /// CDI kind (`umdev.io/mdev`): answer with CDI names `<kind>=<uuid>` too.
    pub cdi_kind: Option<String>,
    /// How long `Allocate` waits for a device's socket.
    pub socket_timeout: Duration,
    /// Types offered in bundles: the number of devices, sharing one IOMMU group, per slot.
    pub bundles: BTreeMap<String, u32>,
}

impl Options {
    /// Devices per slot of `type_id` (1 unless it is bundled).
    pub fn bundle(&self, type_id: &str) -> u32 {
        self.bundles.get(type_id).copied().unwrap_or(1).max(1)
    }
}

/// An instance made for a slot.
struct Made {
    uuid: String,
    socket: PathBuf,
}

/// What every resource's plugin shares.
pub struct Shared {
    /// The umdev tree.
    pub tree: Tree,
    /// The allocations.
    checkpoint: Mutex<Checkpoint>,
    /// How devices are handed out.
    pub options: Options,
    /// Bumped whenever slots may have changed: ListAndWatch streams look again.
    pub changed: watch::Sender<u64>,
}

impl Shared {
    /// The plugin state over `tree`, with the allocations of `checkpoint`.
    pub fn new(tree: Tree, checkpoint: Checkpoint, options: Options) -> Arc<Shared> {
        Arc::new(Shared {
            tree,
            checkpoint: Mutex::new(checkpoint),
            options,
            changed: watch::channel(0).0,
        })
    }

    /// The allocations (locked).
    pub fn checkpoint(&self) -> MutexGuard<'_, Checkpoint> {
        self.checkpoint
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the ListAndWatch streams to look again.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// The resource name of a type.
    pub fn resource(&self, type_id: &str) -> String {
        format!("{}/{type_id}", self.options.prefix)
    }

    /// The slots of `type_id` and their health: the allocated ones (healthy while their
    /// parent and every instance made for them are there) and as many free ones as the
    /// parents offering it have room for (healthy while one of them is there).
    pub fn slots(&self, type_id: &str) -> Vec<Device> {
        let parents: Vec<TypeEntry> = self
            .tree
            .types()
            .into_iter()
            .filter(|t| t.type_id == type_id)
            .collect();
        let per_slot = self.options.bundle(type_id);
        let free: u32 = parents
            .iter()
            .map(|t| self.tree.available(t) / per_slot)
            .sum();
        let owned: BTreeMap<usize, Allocation> = self
            .checkpoint()
            .slots
            .iter()
            .filter(|(_, a)| a.type_id == type_id)
            .filter_map(|(id, a)| Some((slot_index(type_id, id)?, a.clone())))
            .collect();
        let mut out: Vec<Device> = owned
            .iter()
            .map(|(i, a)| {
                let healthy = self.tree.parent_exists(&a.parent)
                    && a.uuids.iter().all(|u| self.tree.exists(u));
                device(type_id, *i, healthy)
            })
            .collect();
        let healthy = !parents.is_empty();
        let mut i = 0;
        let mut added = 0;
        while added < free {
            if !owned.contains_key(&i) {
                out.push(device(type_id, i, healthy));
                added += 1;
            }
            i += 1;
        }
        out.sort_by_key(|d| slot_index(type_id, &d.id).unwrap_or(usize::MAX));
        out
    }

    /// Creates fresh mdevs of `type_id` for slot `id` (one, or a bundle sharing an IOMMU
    /// group; replacing the instances an earlier allocation of the slot left), gives their
    /// sockets to the configured owner and waits for them; records them.
    fn allocate_slot(&self, type_id: &str, id: &str) -> anyhow::Result<Vec<Made>> {
        if slot_index(type_id, id).is_none() {
            anyhow::bail!("{id} is not a device of {}", self.resource(type_id));
        }
        if self.checkpoint().slots.contains_key(id) {
            tracing::info!(
                slot = id,
                "umdev-k8s: slot allocated again: its old instances go"
            );
            self.release_slot(id)?;
        }
        let n = self.options.bundle(type_id);
        let parent = self
            .tree
            .types()
            .into_iter()
            .find(|t| t.type_id == type_id && self.tree.available(t) >= n)
            .ok_or_else(|| {
                anyhow::anyhow!("no parent has room for {n} device(s) of type {type_id}")
            })?;
        let mut made: Vec<Made> = Vec::new();
        let done = (|| {
            let group = if n > 1 { Some(new_uuid()?) } else { None };
            for _ in 0..n {
                let uuid = new_uuid()?;
                self.tree.create(&parent, &uuid)?;
                made.push(Made {
                    uuid: uuid.clone(),
                    socket: PathBuf::new(),
                });
                if let Some(group) = &group {
                    self.tree
                        .set_attr(&uuid, "peer_to_peer_resource_uuid", group)
                        .with_context(|| {
                            format!(
                                "bundling {type_id} of parent {}: does it share peer-to-peer resources?",
                                parent.parent
                            )
                        })?;
                }
            }
            for m in &mut made {
                m.socket = self
                    .tree
                    .wait_socket(&m.uuid, self.options.socket_timeout)?;
                self.give(&m.uuid)?;
            }
            let mut c = self.checkpoint();
            c.slots.insert(
                id.to_owned(),
                Allocation {
                    uuids: made.iter().map(|m| m.uuid.clone()).collect(),
                    type_id: type_id.to_owned(),
                    parent: parent.parent.clone(),
                    unheld_since_ms: None,
                },
            );
            c.save()
        })();
        match done {
            Ok(()) => Ok(made),
            Err(e) => {
                for m in &made {
                    let _ = self.tree.remove(&m.uuid);
                }
                Err(e)
            }
        }
    }

    /// Gives device `uuid`'s socket to the configured owner (the control API's `access`).
    fn give(&self, uuid: &str) -> anyhow::Result<()> {
        let Some(owner) = &self.options.owner else {
            return Ok(());
        };
        let client = umdev_api::Client::new(&self.options.control);
        let resp = client.call(&umdev_api::Request::Access {
            uuid: uuid.to_owned(),
            owner: Some(owner.clone()),
            mode: Some("0660".into()),
        })?;
        if let umdev_api::Response::Error { message, .. } = resp {
            anyhow::bail!("giving {uuid} to {owner}: {message}");
        }
        Ok(())
    }

    /// Frees slot `id`: removes its instances and forgets it.
    pub fn release_slot(&self, id: &str) -> anyhow::Result<()> {
        let a = self.checkpoint().slots.get(id).cloned();
        if let Some(a) = a {
            for uuid in &a.uuids {
                self.tree.remove(uuid)?;
            }
            let mut c = self.checkpoint();
            c.slots.remove(id);
            c.save()?;
        }
        Ok(())
    }
}

fn device(type_id: &str, i: usize, healthy: bool) -> Device {
    Device {
        id: format!("{type_id}-{i}"),
        health: if healthy { HEALTHY } else { UNHEALTHY }.into(),
        topology: None,
    }
}

/// The index of slot `id` of `type_id`.
fn slot_index(type_id: &str, id: &str) -> Option<usize> {
    id.strip_prefix(type_id)?.strip_prefix('-')?.parse().ok()
}

fn new_uuid() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/uuid")?
        .trim()
        .to_owned())
}

/// The device plugin of one type.
pub struct TypePlugin {
    /// The type id.
    pub type_id: String,
    /// The shared state.
    pub shared: Arc<Shared>,
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for TypePlugin {
    async fn get_device_plugin_options(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<DevicePluginOptions>, Status> {
        Ok(Response::new(DevicePluginOptions {
            pre_start_required: false,
            get_preferred_allocation_available: false,
        }))
    }

    type ListAndWatchStream = DeviceStream;

    /// The slots now, then again whenever they change (checked on every notification and
    /// every second, for changes made outside the plugin).
    async fn list_and_watch(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let shared = self.shared.clone();
        let type_id = self.type_id.clone();
        let mut changed = shared.changed.subscribe();
        tokio::spawn(async move {
            let mut last: Option<Vec<Device>> = None;
            loop {
                let (s, t) = (shared.clone(), type_id.clone());
                let now = tokio::task::spawn_blocking(move || s.slots(&t))
                    .await
                    .unwrap_or_default();
                if last.as_ref() != Some(&now) {
                    let msg = ListAndWatchResponse {
                        devices: now.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(now);
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_preferred_allocation(
        &self,
        _: Request<PreferredAllocationRequest>,
    ) -> Result<Response<PreferredAllocationResponse>, Status> {
        Err(Status::unimplemented("no preferred allocation"))
    }

    async fn allocate(
        &self,
        req: Request<AllocateRequest>,
    ) -> Result<Response<AllocateResponse>, Status> {
        let shared = self.shared.clone();
        let type_id = self.type_id.clone();
        let req = req.into_inner();
        let out = tokio::task::spawn_blocking(move || allocate(&shared, &type_id, &req))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        self.shared.notify();
        out.map(Response::new)
    }

    async fn pre_start_container(
        &self,
        _: Request<PreStartContainerRequest>,
    ) -> Result<Response<PreStartContainerResponse>, Status> {
        Ok(Response::new(PreStartContainerResponse {}))
    }
}

/// Allocate: every container's devices, or nothing (what this call created is removed).
fn allocate(
    shared: &Shared,
    type_id: &str,
    req: &AllocateRequest,
) -> Result<AllocateResponse, Status> {
    let mut made: Vec<String> = Vec::new();
    let mut responses = Vec::new();
    let ids: BTreeSet<&String> = req
        .container_requests
        .iter()
        .flat_map(|c| &c.devices_i_ds)
        .collect();
    let total: usize = req
        .container_requests
        .iter()
        .map(|c| c.devices_i_ds.len())
        .sum();
    if ids.len() != total {
        return Err(Status::invalid_argument("a device ID is asked for twice"));
    }
    for c in &req.container_requests {
        let mut envs = HashMap::new();
        let mut mounts = Vec::new();
        let mut cdi = Vec::new();
        let mut uuids = Vec::new();
        for id in &c.devices_i_ds {
            let devices = match shared.allocate_slot(type_id, id) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(slot = id.as_str(), error = %format!("{e:#}"), "umdev-k8s: allocation failed; undoing it");
                    for slot in &made {
                        let _ = shared.release_slot(slot);
                    }
                    return Err(Status::unavailable(format!("allocating {id}: {e:#}")));
                }
            };
            made.push(id.clone());
            for d in devices {
                // The n-th device of the container, counted over all its slots.
                let n = uuids.len();
                let host_dir = d.socket.parent().unwrap_or(Path::new("/")).to_owned();
                let in_container = shared.options.container_dir.join(n.to_string());
                let sock_name = d.socket.file_name().map_or_else(
                    || "vfio-user.sock".into(),
                    |f| f.to_string_lossy().into_owned(),
                );
                envs.insert(format!("UMDEV_DEVICE_{n}_UUID"), d.uuid.clone());
                envs.insert(
                    format!("UMDEV_DEVICE_{n}_SOCKET"),
                    in_container.join(&sock_name).display().to_string(),
                );
                envs.insert(format!("UMDEV_DEVICE_{n}_TYPE"), type_id.to_owned());
                envs.insert(format!("UMDEV_DEVICE_{n}_SLOT"), id.clone());
                mounts.push(Mount {
                    container_path: in_container.display().to_string(),
                    host_path: host_dir.display().to_string(),
                    read_only: false,
                });
                if let Some(kind) = &shared.options.cdi_kind {
                    cdi.push(CdiDevice {
                        name: format!("{kind}={}", d.uuid),
                    });
                }
                tracing::info!(slot = id.as_str(), uuid = d.uuid, "umdev-k8s: allocated");
                uuids.push(d.uuid);
            }
        }
        envs.insert("UMDEV_DEVICES".into(), uuids.join(","));
        responses.push(ContainerAllocateResponse {
            envs,
            mounts,
            devices: Vec::new(),
            annotations: HashMap::new(),
            cdi_devices: cdi,
        });
    }
    Ok(AllocateResponse {
        container_responses: responses,
    })
}
