//! The worker process (`umdevd worker --link PATH`): connects to the daemon, builds each
//! device it is given from its description with the same drivers as the daemon, serves it
//! on its socket, and asks the daemon around every open and close (the IOMMU group rules
//! live in the daemon's registry). It ends when the daemon closes the link or goes.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use umdev_core::{
    DeviceEnv, Drivers, Errno, MdevUuid, Parent, ParentContext, Served, VendorAttrs,
    VFIO_USER_SOCKET,
};
use umdev_pci::{ClientId, Interrupts, OpenGuard, PciFunction, PeerCred};
use umdev_transport::{SocketPolicy, Stale};

use super::link::{self, Call, Frame, Link, Reply, StartDevice};
use super::sandbox::Allowed;
use crate::config::SandboxConfig;

/// A device this worker serves.
struct Device {
    served: Box<dyn Served>,
    irqs: Interrupts,
    attrs: Option<Box<dyn VendorAttrs>>,
}

/// The worker's parents (built as the daemon built them) and devices.
struct Worker {
    drivers: Drivers,
    link: Arc<Link>,
    parents: Mutex<HashMap<String, Arc<dyn Parent>>>,
    devices: Mutex<HashMap<String, Device>>,
    sealed: std::sync::atomic::AtomicBool,
}

/// The daemon's group rules, asked over the link around the device's `open` and `close`.
struct RemoteGuard {
    link: Arc<Link>,
    uuid: String,
}

impl OpenGuard for RemoteGuard {
    fn acquire(&self, client: &ClientId) -> Result<(), Errno> {
        self.link
            .call(Call::Acquire {
                uuid: self.uuid.clone(),
                connection: client.connection,
                peer: client.peer.map(|p| [p.pid, p.uid, p.gid]),
            })
            .map(|_| ())
    }

    fn release(&self) {
        if let Err(e) = self.link.call(Call::Release {
            uuid: self.uuid.clone(),
        }) {
            tracing::warn!(uuid = self.uuid, error = %e, "worker: the daemon did not take a release");
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

    fn start(&self, s: &StartDevice) -> Result<Reply, Errno> {
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
            link: self.link.clone(),
            uuid: s.uuid.clone(),
        };
        let function = PciFunction::new(parts.spec, parts.device).with_guard(Arc::new(guard));
        let irqs = function.interrupts();
        let server = s.server.server_config().map_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "worker: bad server tunables");
            Errno::INVAL
        })?;
        let (listener, path) = env.bind(VFIO_USER_SOCKET).map_err(io_errno)?;
        let served =
            crate::serve::serve_on(&uuid, path, listener, function, &server).map_err(io_errno)?;
        lock(&self.devices).insert(
            s.uuid.clone(),
            Device {
                served,
                irqs,
                attrs: parts.attrs,
            },
        );
        tracing::info!(uuid = s.uuid, parent = s.parent, "worker: serving");
        Ok(Reply::Done)
    }

    fn handle(&self, id: u64, call: Call) {
        let answer = match call {
            Call::Start(s) => self.start(&s),
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
                        self.link.reply(id, Ok(reply), Some(p.memory.as_fd()));
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Call::Acquire { .. } | Call::Release { .. } | Call::Seal { .. } => Err(Errno::NOTSUP),
        };
        self.link.reply(id, answer, None);
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

/// The worker's whole life.
pub fn run(drivers: Drivers, link_path: &Path) -> Result<()> {
    let link = Arc::new(
        link::connect(link_path)
            .with_context(|| format!("connecting to the daemon at {}", link_path.display()))?,
    );
    let worker = Arc::new(Worker {
        drivers,
        link: link.clone(),
        parents: Mutex::new(HashMap::new()),
        devices: Mutex::new(HashMap::new()),
        sealed: std::sync::atomic::AtomicBool::new(false),
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
    let w = worker.clone();
    link.serve("worker", move |id, call| w.handle(id, call))?;
    // The daemon closed the link (or went): stop every device.
    let devices: Vec<Device> = lock(&worker.devices).drain().map(|(_, d)| d).collect();
    for d in devices {
        d.served.stop();
    }
    tracing::info!("worker: the daemon closed the link; stopped");
    Ok(())
}
