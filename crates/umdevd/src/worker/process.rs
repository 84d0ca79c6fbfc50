//! The worker process (`umdevd worker --link PATH`): connects to the daemon, builds each
//! device it is given from its description with the same drivers as the daemon, serves it
//! on its socket, and asks the daemon around every open and close (the IOMMU group rules
//! live in the daemon's registry). It ends when the daemon closes the link with no device
//! left; when the daemon dies instead, it goes on serving (its one group's rules applied
//! here meanwhile) and waits on its adoption socket for the next daemon to take it over.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use umdev_core::{
    DeviceEnv, Drivers, Errno, MdevUuid, Parent, ParentContext, Served, VendorAttrs,
    VFIO_USER_SOCKET,
};
use umdev_dma::SharedBudget;
use umdev_pci::{ClientId, Interrupts, OpenGuard, PciFunction, PeerCred};
use umdev_server::SharedBudgets;
use umdev_transport::{SocketPolicy, Stale};

use super::link::{self, Adopted, Call, Frame, Link, Reply, StartDevice};
use super::sandbox::Allowed;
use crate::config::SandboxConfig;

/// A device this worker serves.
struct Device {
    start: StartDevice,
    served: Box<dyn Served>,
    irqs: Interrupts,
    attrs: Option<Box<dyn VendorAttrs>>,
}

/// The worker's parents (built as the daemon built them) and devices.
struct Worker {
    drivers: Drivers,
    /// The daemon's link; `None` while no daemon has it (orphaned).
    link: Mutex<Option<Arc<Link>>>,
    parents: Mutex<HashMap<String, Arc<dyn Parent>>>,
    devices: Mutex<HashMap<String, Device>>,
    /// Which client holds which device, as admitted (kept for the next daemon).
    held: Mutex<HashMap<String, ClientId>>,
    sealed: std::sync::atomic::AtomicBool,
    /// The servers' configuration, made at the first device.
    server: Mutex<Option<umdev_server::ServerConfig>>,
}

/// The group rules around the device's `open` and `close`: the daemon's, over the link;
/// while no daemon has the worker, the same rule for its one group, here.
struct RemoteGuard {
    worker: std::sync::Weak<Worker>,
    uuid: String,
}

impl OpenGuard for RemoteGuard {
    fn acquire(&self, client: &ClientId) -> Result<(), Errno> {
        let w = self.worker.upgrade().ok_or(Errno::NODEV)?;
        let link = lock(&w.link).clone();
        let asked = link.map(|l| {
            l.call(Call::Acquire {
                uuid: self.uuid.clone(),
                connection: client.connection,
                peer: client.peer.map(|p| [p.pid, p.uid, p.gid]),
            })
        });
        match asked {
            Some(Ok(_)) => {}
            Some(Err(Errno::NODEV)) | None => {
                // No daemon: one client for the whole group (every device here).
                let held = lock(&w.held);
                if held.values().any(|c| !c.same_client(client)) {
                    return Err(Errno::BUSY);
                }
            }
            Some(Err(e)) => return Err(e),
        }
        lock(&w.held).insert(self.uuid.clone(), *client);
        Ok(())
    }

    fn release(&self) {
        let Some(w) = self.worker.upgrade() else {
            return;
        };
        lock(&w.held).remove(&self.uuid);
        let link = lock(&w.link).clone();
        if let Some(l) = link {
            if let Err(e) = l.call(Call::Release {
                uuid: self.uuid.clone(),
            }) {
                tracing::debug!(uuid = self.uuid, error = %e, "worker: the daemon did not take a release");
            }
        }
    }
}

/// Clients' locked-memory budgets, kept by the daemon for all its workers.
struct LinkBudgets {
    worker: std::sync::Weak<Worker>,
}

impl SharedBudgets for LinkBudgets {
    fn budget(&self, client: &ClientId) -> Option<Arc<dyn SharedBudget>> {
        let pid = client.peer?.pid;
        Some(Arc::new(LinkBudget {
            worker: self.worker.clone(),
            pid,
        }))
    }
}

/// One client's budget, kept by the daemon.
struct LinkBudget {
    worker: std::sync::Weak<Worker>,
    pid: u32,
}

impl LinkBudget {
    fn link(&self) -> Option<Arc<Link>> {
        self.worker.upgrade().and_then(|w| lock(&w.link).clone())
    }
}

impl SharedBudget for LinkBudget {
    fn charge(&self, pages: u64, limit_pages: u64) -> Result<(), u64> {
        // With no daemon (orphaned) the pins are not refused: nobody keeps the budget.
        let Some(link) = self.link() else {
            return Ok(());
        };
        match link.call(Call::Charge {
            pid: self.pid,
            pages,
            limit: limit_pages,
        }) {
            Ok((Reply::OverBudget(all), _)) => Err(all),
            Ok(_) | Err(Errno::NODEV) => Ok(()),
            Err(e) => {
                tracing::warn!(pid = self.pid, error = %e, "worker: the daemon did not answer a charge; refused");
                Err(limit_pages)
            }
        }
    }

    fn credit(&self, pages: u64) {
        // Answered, so that once an unpin is done, the pages are free for the client's
        // other workers too.
        if let Some(link) = self.link() {
            let _ = link.call(Call::Credit {
                pid: self.pid,
                pages,
            });
        }
    }
}

/// A client's identity as the daemon's group rules see it, from a worker's call.
pub fn client_id(connection: u64, peer: Option<[u32; 3]>) -> ClientId {
    ClientId {
        connection,
        peer: peer.map(|[pid, uid, gid]| PeerCred { pid, uid, gid }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Worker {
    fn parent(&self, s: &StartDevice) -> Result<Arc<dyn Parent>, Errno> {
        let mut parents = lock(&self.parents);
        if let Some(p) = parents.get(&s.parent) {
            return Ok(p.clone());
        }
        let ctx = ParentContext {
            name: s.parent.clone(),
            state_dir: s.state_dir.clone(),
        };
        let p = self
            .drivers
            .build(&s.driver, &ctx, &s.options)
            .map_err(|e| {
                tracing::warn!(parent = s.parent, error = %e, "worker: cannot build the parent");
                Errno::INVAL
            })?;
        parents.insert(s.parent.clone(), p.clone());
        Ok(p)
    }

    /// Builds the devices' parents, then confines the process to what they need: their
    /// directories and what their drivers declare.
    fn seal(&self, devices: &[StartDevice], sandbox: &SandboxConfig) -> Result<()> {
        let mut allowed = Vec::new();
        for d in devices {
            let parent = self
                .parent(d)
                .map_err(|e| anyhow::anyhow!("building parent {}: {e}", d.parent))?;
            allowed.push(Allowed {
                path: d.dir.clone(),
                write: true,
            });
            allowed.extend(
                parent
                    .sandbox_paths(&d.description)
                    .into_iter()
                    .map(|p| Allowed {
                        path: p.path,
                        write: p.write,
                    }),
            );
        }
        allowed.extend(sandbox.allow.iter().map(|p| Allowed {
            path: p.clone(),
            write: true,
        }));
        if !sandbox.enabled {
            tracing::warn!("worker: not sandboxed ([sandbox] enabled = false)");
            return Ok(());
        }
        let sealed = super::sandbox::seal(&allowed, sandbox.on_violation)?;
        self.sealed
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!(landlock = ?sealed.landlock, paths = allowed.len(), on_violation = ?sandbox.on_violation,
            "worker: sealed (no new privileges, no capabilities, landlock, seccomp)");
        Ok(())
    }

    fn start(self: &Arc<Self>, s: &StartDevice) -> Result<Reply, Errno> {
        let uuid = MdevUuid::parse(&s.uuid).map_err(|_| Errno::INVAL)?;
        let parent = self.parent(s)?;
        // A sealed worker cannot chown: the daemon gives the sockets their owner.
        let sealed = self.sealed.load(std::sync::atomic::Ordering::Acquire);
        let policy = SocketPolicy {
            stale: Stale::IfDead,
            mode: s.mode,
            owner: if sealed { None } else { s.owner },
        };
        let env = DeviceEnv::new(uuid, Some(s.dir.clone()), policy);
        let parts = parent.build(&uuid, &s.description, &env)?;
        let guard = RemoteGuard {
            worker: Arc::downgrade(self),
            uuid: s.uuid.clone(),
        };
        let function = PciFunction::new(parts.spec, parts.device).with_guard(Arc::new(guard));
        let irqs = function.interrupts();
        // One server configuration for all the worker's devices: its clients' table is
        // shared, so a client's devices here share their mmaps and per-page charges.
        let server = {
            let mut cfg = lock(&self.server);
            if cfg.is_none() {
                let mut c = s.server.server_config().map_err(|e| {
                    tracing::warn!(error = %format!("{e:#}"), "worker: bad server tunables");
                    Errno::INVAL
                })?;
                c.locked_memory.shared = Some(Arc::new(LinkBudgets {
                    worker: Arc::downgrade(self),
                }));
                *cfg = Some(c);
            }
            cfg.clone().ok_or(Errno::INVAL)?
        };
        let (listener, path) = env.bind(VFIO_USER_SOCKET).map_err(io_errno)?;
        let served =
            crate::serve::serve_on(&uuid, path, listener, function, &server).map_err(io_errno)?;
        lock(&self.devices).insert(
            s.uuid.clone(),
            Device {
                start: s.clone_for_restart(),
                served,
                irqs,
                attrs: parts.attrs,
            },
        );
        tracing::info!(uuid = s.uuid, parent = s.parent, "worker: serving");
        Ok(Reply::Done)
    }

    fn handle(self: &Arc<Self>, link: &Link, id: u64, call: Call) {
        let answer = match call {
            Call::Start(s) => self.start(&s),
            Call::Adopt => {
                let held = lock(&self.held).clone();
                let devices = lock(&self.devices)
                    .values()
                    .map(|d| Adopted {
                        held: held
                            .get(&d.start.uuid)
                            .map(|c| (c.connection, c.peer.map(|p| [p.pid, p.uid, p.gid]))),
                        start: d.start.clone_for_restart(),
                    })
                    .collect();
                Ok(Reply::Adopted(devices))
            }
            Call::Stop { uuid } => {
                let d = lock(&self.devices).remove(&uuid);
                match d {
                    Some(d) => {
                        d.served.stop();
                        Ok(Reply::Done)
                    }
                    None => Err(Errno::NODEV),
                }
            }
            Call::Show { uuid, name } => self.with_attrs(&uuid, |a| a.show(&name).map(Reply::Text)),
            Call::Store { uuid, name, value } => {
                self.with_attrs(&uuid, |a| a.store(&name, &value).map(|()| Reply::Done))
            }
            Call::Req { uuid } => match lock(&self.devices).get(&uuid) {
                Some(d) => {
                    d.irqs.signal_req();
                    Ok(Reply::Done)
                }
                None => Err(Errno::NODEV),
            },
            Call::Plane { uuid } => {
                let plane = match lock(&self.devices).get(&uuid) {
                    Some(d) => d.served.display_plane(),
                    None => Err(Errno::NODEV),
                };
                match plane {
                    Ok(p) => {
                        let reply = Reply::Plane {
                            fourcc: p.fourcc,
                            width: p.width,
                            height: p.height,
                            stride: p.stride,
                            offset: p.offset,
                        };
                        link.reply(id, Ok(reply), Some(p.memory.as_fd()));
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Call::Acquire { .. }
            | Call::Release { .. }
            | Call::Seal { .. }
            | Call::Charge { .. }
            | Call::Credit { .. } => Err(Errno::NOTSUP),
        };
        link.reply(id, answer, None);
    }

    fn with_attrs(
        &self,
        uuid: &str,
        f: impl FnOnce(&dyn VendorAttrs) -> Result<Reply, Errno>,
    ) -> Result<Reply, Errno> {
        let devices = lock(&self.devices);
        let d = devices.get(uuid).ok_or(Errno::NODEV)?;
        let a = d.attrs.as_deref().ok_or(Errno::NOENT)?;
        f(a)
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error)
}

/// The worker's whole life: `link_path` is the daemon's link socket, `adopt_path` where
/// the next daemon finds it if this one dies.
pub fn run(drivers: Drivers, link_path: &Path, adopt_path: &Path) -> Result<()> {
    let link = Arc::new(
        link::connect(link_path)
            .with_context(|| format!("connecting to the daemon at {}", link_path.display()))?,
    );
    // Bound before sealing: accepting on it later opens no path.
    let adoption =
        link::listen(adopt_path).with_context(|| format!("binding {}", adopt_path.display()))?;
    let worker = Arc::new(Worker {
        drivers,
        link: Mutex::new(Some(link.clone())),
        parents: Mutex::new(HashMap::new()),
        devices: Mutex::new(HashMap::new()),
        held: Mutex::new(HashMap::new()),
        sealed: std::sync::atomic::AtomicBool::new(false),
        server: Mutex::new(None),
    });
    tracing::info!(pid = std::process::id(), "worker: started");
    // Sealed from the only thread there is yet: every thread started later inherits it.
    match link.first() {
        Some(Frame::Call {
            call: Call::Seal { devices, sandbox },
            ..
        }) => worker.seal(&devices, &sandbox)?,
        Some(other) => anyhow::bail!("the daemon's first message is not a seal: {other:?}"),
        None => anyhow::bail!("the daemon closed the link at once"),
    }
    let mut link = link;
    loop {
        let (w, l) = (worker.clone(), link.clone());
        link.serve("worker", move |id, call| w.handle(&l, id, call))?;
        *lock(&worker.link) = None;
        if lock(&worker.devices).is_empty() {
            break;
        }
        // The daemon went with devices here: serve on, and wait for the next one.
        tracing::warn!(
            devices = lock(&worker.devices).len(),
            "worker: the daemon is gone; serving on until a daemon adopts this worker"
        );
        link = Arc::new(link::accept(&adoption, Duration::MAX)?);
        *lock(&worker.link) = Some(link.clone());
        tracing::info!("worker: adopted by a daemon");
    }
    let _ = std::fs::remove_file(adopt_path);
    tracing::info!("worker: the daemon closed the link with no device left; stopped");
    Ok(())
}
