//! The control API: one request per connection, answered from the core and the definition
//! store with mdevctl's semantics (`define`, `start`, `list`, ...). Connections are served
//! concurrently (`server`), so the handler is shared between threads.

mod server;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value};
use umdev_api::control::{
    DeviceEntry, DriverEntry, DriverOption, GroupEntry, Holder, PlaneInfo, TypeEntry, UpgradeEntry,
};
use umdev_api::{Definition, DefinitionStore, ModifyRequest, Request, Response, Start};
use umdev_core::{Core, CoreError, MdevUuid};

use crate::daemon::Shared;

pub use server::ControlServer;

/// A failed request: an errno and a message (what mdevctl would print).
#[derive(Debug)]
pub struct Failure {
    errno: i32,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn fail(errno: rustix::io::Errno, message: impl Into<String>) -> Failure {
    Failure {
        errno: errno.raw_os_error(),
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    fail(rustix::io::Errno::INVAL, message)
}

impl From<CoreError> for Failure {
    fn from(e: CoreError) -> Failure {
        fail(e.errno(), e.to_string())
    }
}

fn parse_uuid(s: &str) -> Result<MdevUuid, Failure> {
    MdevUuid::parse(s).map_err(|e| invalid(e.to_string()))
}

/// Creates `uuid` from a definition and writes its attributes in order; if one cannot be
/// written the device is removed again (mdevctl's `start`).
pub fn start_device(
    core: &Core,
    parent: &str,
    uuid: MdevUuid,
    def: &Definition,
) -> Result<(), Failure> {
    if let Some(m) = core.mdev(&uuid) {
        let what = if m.parent != parent {
            "Device exists under different parent"
        } else if m.type_id != def.mdev_type {
            "Device exists with different type"
        } else {
            "Device already exists"
        };
        return Err(fail(rustix::io::Errno::EXIST, what));
    }
    if !core.has_parent(parent) {
        return Err(fail(
            rustix::io::Errno::NODEV,
            format!("Unable to find parent device '{parent}'"),
        ));
    }
    core.create(parent, &def.mdev_type, uuid).map_err(|e| {
        let f = Failure::from(e);
        Failure {
            message: format!(
                "Failed to create mdev {uuid}, type {} on {parent}: {}",
                def.mdev_type, f.message
            ),
            ..f
        }
    })?;
    for (k, v) in &def.attrs {
        if let Err(e) = core.write_attr(&uuid, k, v) {
            let _ = core.remove(&uuid);
            let f = Failure::from(e);
            return Err(Failure {
                message: format!("Failed to write {v} to attribute {k}: {}", f.message),
                ..f
            });
        }
    }
    Ok(())
}

/// The definitions of `uuid`, under `parent` if given.
fn defined(store: &DefinitionStore, uuid: &str, parent: Option<&str>) -> Vec<(String, Definition)> {
    store
        .list()
        .into_iter()
        .filter(|(p, u, _)| u == uuid && parent.is_none_or(|x| x == p))
        .filter_map(|(p, _, d)| d.ok().map(|d| (p, d)))
        .collect()
}

/// A response and the fds that go with it (a display plane's memory).
pub struct Answer {
    /// The response line.
    pub response: Response,
    /// Fds sent with it.
    pub fds: Vec<Arc<OwnedFd>>,
}

impl From<Response> for Answer {
    fn from(response: Response) -> Answer {
        Answer {
            response,
            fds: Vec::new(),
        }
    }
}

/// Answers requests; shared by the connection threads. The core takes its own lock (and
/// releases it while `remove` waits for a client), so only the store needs one here.
struct Handler {
    core: Core,
    /// Held across each read-check-write of the definitions (`define` must not overwrite,
    /// `modify` must not lose a concurrent change) and across reads (a file being written
    /// is not whole). Never held while the core waits for a client, so a `stop` waiting on
    /// REQ blocks no other request; taken before the core's lock, never after.
    store: Mutex<DefinitionStore>,
    /// The drivers, the device layout and the daemon's directories.
    shared: Arc<Shared>,
}

impl Handler {
    fn new(core: Core, store: DefinitionStore, shared: Arc<Shared>) -> Handler {
        Handler {
            core,
            store: Mutex::new(store),
            shared,
        }
    }

    /// The definition store, locked. A panic in another request leaves the files as they
    /// were on disk, so a poisoned lock is taken anyway.
    fn store(&self) -> MutexGuard<'_, DefinitionStore> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn handle(&self, req: Request) -> Answer {
        if let Request::DisplayPlane { uuid } = &req {
            return self.display_plane(uuid).unwrap_or_else(|f| {
                Response::Error {
                    errno: f.errno,
                    message: f.message,
                }
                .into()
            });
        }
        let r = match req {
            Request::Types { parent } => Ok(self.types(parent.as_deref())),
            Request::List {
                defined,
                uuid,
                parent,
            } => self.list(defined, uuid.as_deref(), parent.as_deref()),
            Request::Define {
                uuid,
                parent,
                mdev_type,
                auto,
                json,
                force: _,
            } => self.define(uuid.as_deref(), parent, mdev_type, auto, json),
            Request::Undefine { uuid, parent } => self.undefine(&uuid, parent.as_deref()),
            Request::Modify(m) => self.modify(m),
            Request::Start {
                uuid,
                parent,
                mdev_type,
                json,
            } => self.start(uuid.as_deref(), parent, mdev_type, json),
            Request::Stop { uuid } => self.stop(&uuid),
            Request::Socket { uuid } => self.socket(&uuid),
            Request::Groups => Ok(self.groups()),
            Request::AddParent {
                name,
                driver,
                options,
            } => self.add_parent(&name, &driver, &options),
            Request::RemoveParent { name, force } => self
                .core
                .unregister_parent(&name, force)
                .map(|()| Response::Done)
                .map_err(Failure::from),
            Request::Drivers => Ok(self.drivers()),
            Request::Upgrade { group } => self.upgrade(group),
            Request::Stats => Ok(Response::Metrics {
                text: crate::metrics::render(&self.core, &self.shared),
            }),
            Request::Shutdown { remove_devices } => {
                self.shared.request_stop(remove_devices);
                Ok(Response::Done)
            }
            Request::Access { uuid, owner, mode } => {
                self.access(&uuid, owner.as_deref(), mode.as_deref())
            }
            Request::DisplayPlane { .. } => Err(invalid("handled above")),
        };
        r.unwrap_or_else(|f| Response::Error {
            errno: f.errno,
            message: f.message,
        })
        .into()
    }

    fn types(&self, parent: Option<&str>) -> Response {
        let mut types = Vec::new();
        for p in self.core.parents() {
            if parent.is_some_and(|x| x != p) {
                continue;
            }
            let Ok(mut ts) = self.core.types(&p) else {
                continue;
            };
            ts.sort_by(|a, b| a.id.cmp(&b.id));
            types.extend(ts.into_iter().map(|t| TypeEntry {
                parent: p.clone(),
                id: t.id,
                available_instances: t.available_instances,
                device_api: t.device_api,
                name: t.name,
                description: t.description.map(|d| d.trim().replace('\n', ", ")),
            }));
        }
        Response::Types { types }
    }

    fn list(
        &self,
        defined: bool,
        uuid: Option<&str>,
        parent: Option<&str>,
    ) -> Result<Response, Failure> {
        let uuid = uuid.map(parse_uuid).transpose()?.map(|u| u.to_string());
        let mut devices = Vec::new();
        let store = self.store();
        if defined {
            for (p, u, d) in store.list() {
                let Ok(d) = d else { continue };
                if parent.is_some_and(|x| x != p) || uuid.as_ref().is_some_and(|x| *x != u) {
                    continue;
                }
                let active = MdevUuid::parse(&u)
                    .ok()
                    .and_then(|m| self.core.mdev(&m))
                    .filter(|m| m.parent == p && m.type_id == d.mdev_type);
                devices.push(DeviceEntry {
                    uuid: u,
                    parent: p,
                    mdev_type: d.mdev_type,
                    auto: d.start == Start::Auto,
                    active: active.is_some(),
                    defined: true,
                    attrs: d.attrs,
                    socket: active
                        .as_ref()
                        .and_then(|m| m.socket.as_ref().map(|s| s.display().to_string())),
                    state: active.as_ref().map(|m| m.state.as_str().to_owned()),
                    iommu_group: active.map(|m| m.iommu_group),
                });
            }
        } else {
            for m in self.core.mdevs() {
                let u = m.uuid.to_string();
                if parent.is_some_and(|x| x != m.parent) || uuid.as_ref().is_some_and(|x| *x != u) {
                    continue;
                }
                let d = store.load(&m.parent, &u).ok();
                devices.push(DeviceEntry {
                    auto: d.as_ref().is_some_and(|d| d.start == Start::Auto),
                    defined: d.is_some(),
                    uuid: u,
                    parent: m.parent,
                    mdev_type: m.type_id,
                    active: true,
                    // mdevctl shows an active device's attributes only from callouts.
                    attrs: Vec::new(),
                    socket: m.socket.map(|s| s.display().to_string()),
                    iommu_group: Some(m.iommu_group),
                    state: Some(m.state.as_str().to_owned()),
                });
            }
        }
        devices.sort_by(|a, b| (&a.parent, &a.uuid).cmp(&(&b.parent, &b.uuid)));
        Ok(Response::Devices { devices })
    }

    fn define(
        &self,
        uuid: Option<&str>,
        parent: Option<String>,
        mdev_type: Option<String>,
        auto: bool,
        json: Option<serde_json::Value>,
    ) -> Result<Response, Failure> {
        let given = uuid.map(parse_uuid).transpose()?;
        let u = given.unwrap_or_else(MdevUuid::random);
        let store = self.store();
        let (parent, def) = if let Some(json) = json {
            if mdev_type.is_some() {
                return Err(invalid(
                    "Device type cannot be specified separately from the JSON definition",
                ));
            }
            let parent = parent
                .ok_or_else(|| invalid("Parent device required to define device via json"))?;
            if store.load(&parent, &u.to_string()).is_ok() {
                return Err(fail(
                    rustix::io::Errno::EXIST,
                    format!("Cowardly refusing to overwrite existing config for {parent}/{u}"),
                ));
            }
            let def = Definition::from_json(&json).map_err(|e| invalid(e.to_string()))?;
            (parent, def)
        } else {
            let active = given.and_then(|u| self.core.mdev(&u));
            if given.is_some() && parent.is_none() && (active.is_none() || mdev_type.is_some()) {
                return Err(invalid("No parent specified"));
            }
            let parent = parent
                .or_else(|| active.as_ref().map(|m| m.parent.clone()))
                .ok_or_else(|| invalid("No parent specified"))?;
            let mdev_type = mdev_type
                .or_else(|| active.as_ref().map(|m| m.type_id.clone()))
                .ok_or_else(|| invalid("No type specified"))?;
            if store.load(&parent, &u.to_string()).is_ok() {
                return Err(fail(
                    rustix::io::Errno::EXIST,
                    format!("Device {u} on {parent} already defined"),
                ));
            }
            let start = if auto { Start::Auto } else { Start::Manual };
            let def = Definition {
                mdev_type,
                start,
                attrs: Vec::new(),
            };
            (parent, def)
        };
        store
            .save(&parent, &u.to_string(), &def)
            .map_err(|e| fail(rustix::io::Errno::IO, e.to_string()))?;
        Ok(match given {
            Some(_) => Response::Done,
            None => Response::Uuid {
                uuid: u.to_string(),
            },
        })
    }

    fn undefine(&self, uuid: &str, parent: Option<&str>) -> Result<Response, Failure> {
        let u = parse_uuid(uuid)?.to_string();
        let store = self.store();
        let defs = defined(&store, &u, parent);
        if defs.is_empty() {
            return Err(fail(
                rustix::io::Errno::NOENT,
                "No devices match the specified uuid",
            ));
        }
        for (p, _) in defs {
            store
                .remove(&p, &u)
                .map_err(|e| fail(rustix::io::Errno::IO, e.to_string()))?;
        }
        Ok(Response::Done)
    }

    fn one_definition(
        store: &DefinitionStore,
        u: &str,
        parent: Option<&str>,
    ) -> Result<(String, Definition), Failure> {
        let mut defs = defined(store, u, parent);
        match defs.len() {
            0 => Err(fail(
                rustix::io::Errno::NOENT,
                format!("Mediated device {u} is not defined"),
            )),
            1 => Ok(defs.remove(0)),
            _ => Err(invalid(format!(
                "Multiple definitions found for device {u}. Please specify a parent."
            ))),
        }
    }

    fn modify(&self, m: ModifyRequest) -> Result<Response, Failure> {
        let u = parse_uuid(&m.uuid)?.to_string();
        let store = self.store();
        let (parent, mut def) = if let Some(json) = m.json {
            let parent = m
                .parent
                .ok_or_else(|| invalid("Parent device required to modify device via json file"))?;
            let def = Definition::from_json(&json).map_err(|e| invalid(e.to_string()))?;
            (parent, def)
        } else {
            let (parent, mut def) = Handler::one_definition(&store, &u, m.parent.as_deref())?;
            if let Some(t) = m.mdev_type {
                def.mdev_type = t;
            }
            if m.auto && m.manual {
                return Err(invalid("'auto' and 'manual' are mutually exclusive"));
            }
            if m.auto {
                def.start = Start::Auto;
            } else if m.manual {
                def.start = Start::Manual;
            }
            (parent, def)
        };
        let index = m.index.map(|i| i as usize);
        if let Some(name) = m.addattr {
            let value = m
                .value
                .ok_or_else(|| invalid("No attribute value provided"))?;
            match index {
                Some(i) if i > def.attrs.len() => {
                    return Err(invalid(format!("Attribute index {i} is invalid")))
                }
                Some(i) => def.attrs.insert(i, (name, value)),
                None => def.attrs.push((name, value)),
            }
        } else if m.delattr {
            match index {
                Some(i) if i >= def.attrs.len() => {
                    return Err(invalid(format!("Attribute index {i} is invalid")))
                }
                Some(i) => {
                    def.attrs.remove(i);
                }
                None => {
                    def.attrs.pop();
                }
            }
        }
        store
            .save(&parent, &u, &def)
            .map_err(|e| fail(rustix::io::Errno::IO, e.to_string()))?;
        Ok(Response::Done)
    }

    fn start(
        &self,
        uuid: Option<&str>,
        parent: Option<String>,
        mdev_type: Option<String>,
        json: Option<serde_json::Value>,
    ) -> Result<Response, Failure> {
        let given = uuid.map(parse_uuid).transpose()?;
        let u = given.unwrap_or_else(MdevUuid::random);
        let (parent, def) = if let Some(json) = json {
            if mdev_type.is_some() {
                return Err(invalid(
                    "Device type cannot be specified separately from json file",
                ));
            }
            let parent = parent
                .ok_or_else(|| invalid("Parent device required to start device via json file"))?;
            (
                parent,
                Definition::from_json(&json).map_err(|e| invalid(e.to_string()))?,
            )
        } else {
            let mut found = None;
            if given.is_some() {
                let defs = defined(&self.store(), &u.to_string(), parent.as_deref());
                if defs.len() > 1 {
                    return Err(invalid(format!(
                        "Multiple definitions found for device {u}. Please specify a parent."
                    )));
                }
                if let Some((p, d)) = defs.into_iter().next() {
                    if mdev_type.as_ref().is_some_and(|t| *t != d.mdev_type) {
                        return Err(fail(
                            rustix::io::Errno::EXIST,
                            format!(
                                "Device {u} already exists on parent {p} with type {}",
                                d.mdev_type
                            ),
                        ));
                    }
                    found = Some((p, d));
                }
            }
            match found {
                Some(x) => x,
                None => {
                    if mdev_type.is_some() && parent.is_none() {
                        return Err(invalid("can't provide type without parent"));
                    }
                    let (Some(p), Some(t)) = (parent, mdev_type) else {
                        return Err(invalid("Device is insufficiently specified"));
                    };
                    (
                        p,
                        Definition {
                            mdev_type: t,
                            start: Start::Manual,
                            attrs: Vec::new(),
                        },
                    )
                }
            }
        };
        start_device(&self.core, &parent, u, &def)?;
        Ok(match given {
            Some(_) => Response::Done,
            None => Response::Uuid {
                uuid: u.to_string(),
            },
        })
    }

    fn stop(&self, uuid: &str) -> Result<Response, Failure> {
        let u = parse_uuid(uuid)?;
        if self.core.mdev(&u).is_none() {
            return Err(fail(
                rustix::io::Errno::NODEV,
                format!("Device {u} is not an active mdev"),
            ));
        }
        self.core.remove(&u).map_err(|e| {
            let f = Failure::from(e);
            Failure {
                message: format!("Error removing device {u}: {}", f.message),
                ..f
            }
        })?;
        Ok(Response::Done)
    }

    /// Active device `uuid` and its vfio-user socket (ENODEV if there is none).
    fn active_socket(&self, uuid: &str) -> Result<(MdevUuid, PathBuf), Failure> {
        let u = parse_uuid(uuid)?;
        let m = self.core.mdev(&u).ok_or_else(|| {
            fail(
                rustix::io::Errno::NODEV,
                format!("Mediated device {u} is not active"),
            )
        })?;
        let path = m
            .socket
            .ok_or_else(|| fail(rustix::io::Errno::NODEV, format!("{u} has no socket")))?;
        Ok((u, path))
    }

    fn socket(&self, uuid: &str) -> Result<Response, Failure> {
        let (u, path) = self.active_socket(uuid)?;
        Ok(Response::Socket {
            uuid: u.to_string(),
            path: path.display().to_string(),
        })
    }

    fn add_parent(
        &self,
        name: &str,
        driver: &str,
        options: &Map<String, Value>,
    ) -> Result<Response, Failure> {
        let parent = self
            .shared
            .build_parent(name, driver, options)
            .map_err(|e| invalid(format!("{e:#}")))?;
        self.core.register_parent(name, parent)?;
        // What mdevctl's udev rule does when a parent appears.
        crate::daemon::start_auto_definitions(&self.core, &self.store(), name);
        Ok(Response::Done)
    }

    fn drivers(&self) -> Response {
        let drivers = self
            .shared
            .drivers
            .all()
            .iter()
            .map(|d| DriverEntry {
                name: d.name().to_owned(),
                description: d.description().to_owned(),
                options: d
                    .options()
                    .into_iter()
                    .map(|o| DriverOption {
                        name: o.name,
                        kind: o.kind.to_string(),
                        default: o.default.map(|v| v.to_string()),
                        help: o.help,
                    })
                    .collect(),
            })
            .collect();
        Response::Drivers { drivers }
    }

    fn access(
        &self,
        uuid: &str,
        owner: Option<&str>,
        mode: Option<&str>,
    ) -> Result<Response, Failure> {
        let (u, socket) = self.active_socket(uuid)?;
        let dir = socket
            .parent()
            .ok_or_else(|| fail(rustix::io::Errno::NODEV, format!("{u} has no directory")))?;
        let owner = owner
            .map(crate::config::parse_owner)
            .transpose()
            .map_err(|e| invalid(format!("{e:#}")))?;
        let mode = mode
            .map(crate::config::parse_mode)
            .transpose()
            .map_err(|e| invalid(format!("{e:#}")))?;
        crate::serve::set_access(dir, owner, mode).map_err(|e| {
            let errno = e
                .raw_os_error()
                .map_or(rustix::io::Errno::IO, rustix::io::Errno::from_raw_os_error);
            fail(
                errno,
                format!("changing the access of {}: {e}", dir.display()),
            )
        })?;
        Ok(Response::Done)
    }

    fn display_plane(&self, uuid: &str) -> Result<Answer, Failure> {
        let u = parse_uuid(uuid)?;
        let p = self.core.display_plane(&u)?;
        Ok(Answer {
            response: Response::Plane {
                plane: PlaneInfo {
                    fourcc: p.fourcc,
                    width: p.width,
                    height: p.height,
                    stride: p.stride,
                    offset: p.offset,
                },
            },
            fds: vec![p.memory],
        })
    }

    fn upgrade(&self, group: Option<u32>) -> Result<Response, Failure> {
        let Some(workers) = self.shared.workers.get() else {
            return Err(fail(
                rustix::io::Errno::NOTSUP,
                "live upgrade needs isolation = \"worker\" (devices run in the daemon's threads)",
            ));
        };
        let only: Option<Vec<String>> = match group {
            Some(id) => {
                let g = self.core.group(id).ok_or_else(|| {
                    fail(rustix::io::Errno::NOENT, format!("no IOMMU group {id}"))
                })?;
                Some(g.devices.iter().map(ToString::to_string).collect())
            }
            None => None,
        };
        let workers = workers
            .upgrade(only.as_deref())
            .into_iter()
            .map(|u| UpgradeEntry {
                devices: u.devices,
                error: u.result.as_ref().err().map(|e| upgrade_refusal(*e)),
                paused_us: u.result.unwrap_or_default(),
            })
            .collect();
        Ok(Response::Upgraded { workers })
    }

    fn groups(&self) -> Response {
        let groups = self
            .core
            .groups()
            .into_iter()
            .map(|g| GroupEntry {
                id: g.id,
                devices: g.devices.iter().map(ToString::to_string).collect(),
                owner: g.owner.map(|c| Holder {
                    pid: c.peer.map(|p| p.pid),
                    uid: c.peer.map(|p| p.uid),
                    connection: c.connection,
                }),
                peer_to_peer: g.peer_to_peer.map(|p| p.to_string()),
            })
            .collect();
        Response::Groups { groups }
    }
}

/// Why a worker was not upgraded, from the errno its side answered.
fn upgrade_refusal(e: rustix::io::Errno) -> String {
    use rustix::io::Errno;
    let why = match e {
        Errno::NOTSUP => "a device's driver cannot hand its device over (no hand_over hook)",
        Errno::BUSY => "a device is in a migration or logs dirty pages",
        Errno::TIMEDOUT => "a session did not reach a message boundary in time",
        Errno::AGAIN => "the worker is being restarted",
        Errno::NODEV => "the worker is gone",
        _ => "see the worker's log",
    };
    format!("{why} ({e}); the worker serves on as before")
}
