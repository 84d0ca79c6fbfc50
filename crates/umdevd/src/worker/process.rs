//! The worker process (`umdevd worker --link PATH`): connects to the daemon, builds each
//! device it is given from its description with the same drivers as the daemon, serves it
//! on its socket, and asks the daemon around every open and close (the IOMMU group rules
//! live in the daemon's registry). It ends when the daemon closes the link with no device
//! left; when the daemon dies instead, it goes on serving (its one group's rules applied
//! here meanwhile) and waits on its adoption socket for the next daemon to take it over.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
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
use umdev_server::{HandOverCtl, Server, ServerConfig, SharedBudgets, TakenOver};
use umdev_transport::{SocketPolicy, Stale};

use super::handover::{self, DevicePackage};
use super::link::{self, Adopted, Call, Frame, Link, Reply, StartDevice};
use super::sandbox::Allowed;
use crate::config::SandboxConfig;
use crate::serve::SocketServed;

/// A device this worker serves.
struct Device {
    start: StartDevice,
    served: SocketServed,
    /// Its environment: the listening sockets a live upgrade hands over.
    env: DeviceEnv,
    irqs: Interrupts,
    attrs: Option<Box<dyn VendorAttrs>>,
}

/// A device taken over from the worker before this one, ready to serve.
struct Ready {
    start: StartDevice,
    server: Server,
    taken: TakenOver,
    listener: std::os::unix::net::UnixListener,
    path: std::path::PathBuf,
    env: DeviceEnv,
    irqs: Interrupts,
    attrs: Option<Box<dyn VendorAttrs>>,
}

/// How long a live upgrade waits for a session to reach a message boundary.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each side of a live upgrade waits for the other.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(20);

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
    /// The devices it was sealed for, by UUID (a new worker of a live upgrade builds them
    /// from these).
    sealed_for: Mutex<HashMap<String, StartDevice>>,
    /// Where the next daemon would find this worker (removed when it hands over).
    adopt_path: std::path::PathBuf,
    /// Its devices were handed over: it exits when its link closes, cleaning up nothing.
    handed_over: std::sync::atomic::AtomicBool,
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
        lock(&self.sealed_for).extend(
            devices
                .iter()
                .map(|d| (d.uuid.clone(), d.clone_for_restart())),
        );
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

    /// The environment of device `s` (`uuid` parsed), its sockets as they should be bound.
    fn env(&self, uuid: MdevUuid, s: &StartDevice) -> DeviceEnv {
        // A sealed worker cannot chown: the daemon gives the sockets their owner.
        let sealed = self.sealed.load(std::sync::atomic::Ordering::Acquire);
        let policy = SocketPolicy {
            stale: Stale::IfDead,
            mode: s.mode,
            owner: if sealed { None } else { s.owner },
        };
        DeviceEnv::new(uuid, Some(s.dir.clone()), policy)
    }

    /// Builds device `s` in `env`: its function (with the group rules over the link), its
    /// interrupts and attributes.
    fn build(
        self: &Arc<Self>,
        uuid: &MdevUuid,
        s: &StartDevice,
        env: &DeviceEnv,
    ) -> Result<(PciFunction, Option<Box<dyn VendorAttrs>>), Errno> {
        let parent = self.parent(s)?;
        let parts = parent.build(uuid, &s.description, env)?;
        let guard = RemoteGuard {
            worker: Arc::downgrade(self),
            uuid: s.uuid.clone(),
        };
        let function = PciFunction::new(parts.spec, parts.device).with_guard(Arc::new(guard));
        Ok((function, parts.attrs))
    }

    /// One server configuration for all the worker's devices: its clients' table is
    /// shared, so a client's devices here share their mmaps and per-page charges.
    fn server_config(self: &Arc<Self>, s: &StartDevice) -> Result<ServerConfig, Errno> {
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
        cfg.clone().ok_or(Errno::INVAL)
    }

    fn start(self: &Arc<Self>, s: &StartDevice) -> Result<Reply, Errno> {
        let uuid = MdevUuid::parse(&s.uuid).map_err(|_| Errno::INVAL)?;
        let env = self.env(uuid, s);
        let (function, attrs) = self.build(&uuid, s, &env)?;
        let irqs = function.interrupts();
        let server = self.server_config(s)?;
        let (listener, path) = env.bind(VFIO_USER_SOCKET).map_err(|e| {
            tracing::warn!(uuid = s.uuid, path = %s.dir.display(), error = %e, "worker: cannot bind the device's socket");
            io_errno(e)
        })?;
        let served =
            crate::serve::serve_on(&uuid, path, listener, function, &server).map_err(io_errno)?;
        lock(&self.devices).insert(
            s.uuid.clone(),
            Device {
                start: s.clone_for_restart(),
                served,
                env,
                irqs,
                attrs,
            },
        );
        tracing::info!(uuid = s.uuid, parent = s.parent, "worker: serving");
        Ok(Reply::Done)
    }

    /// A live upgrade, this worker's side: every device paused between two messages and
    /// sent on `chan`; once the new worker has them all, this process exits without
    /// cleaning up (what it would close, the new worker uses). If anything fails, every
    /// device runs on here.
    fn hand_over(&self, link: &Link, id: u64, chan: Option<OwnedFd>) {
        let Some(chan) = chan else {
            link.reply(id, Err(Errno::INVAL), None);
            return;
        };
        let mut paused: Vec<HandOverCtl> = Vec::new();
        let mut packages = Vec::new();
        let abort = |paused: &[HandOverCtl]| paused.iter().for_each(HandOverCtl::abort);
        {
            let devices = lock(&self.devices);
            let mut uuids: Vec<&String> = devices.keys().collect();
            uuids.sort();
            for uuid in uuids {
                let d = &devices[uuid];
                let ctl = d.served.hand_over_ctl().clone();
                let sockets = match d.env.sockets() {
                    Ok(s) => s,
                    Err(e) => {
                        abort(&paused);
                        tracing::warn!(uuid, error = %e, "worker: cannot hand a device's sockets over");
                        link.reply(id, Err(io_errno(e)), None);
                        return;
                    }
                };
                match ctl.pause(PAUSE_TIMEOUT) {
                    Ok(package) => {
                        paused.push(ctl);
                        packages.push(DevicePackage {
                            uuid: uuid.clone(),
                            sockets,
                            package,
                        });
                    }
                    Err(e) => {
                        abort(&paused);
                        tracing::warn!(uuid, error = %e,
                            "worker: a device cannot be handed over now (ENOTSUP: its driver cannot; EBUSY: a migration is in progress; ETIMEDOUT: its session did not pause); every device runs on");
                        link.reply(id, Err(e), None);
                        return;
                    }
                }
            }
        }
        let verdict = handover::send_all(chan.as_fd(), &packages)
            .and_then(|()| handover::recv_verdict(chan.as_fd(), HANDOVER_TIMEOUT));
        drop(packages);
        match verdict {
            Ok(()) => {
                for c in &paused {
                    c.commit();
                }
                let _ = std::fs::remove_file(&self.adopt_path);
                self.handed_over
                    .store(true, std::sync::atomic::Ordering::Release);
                tracing::info!(
                    devices = paused.len(),
                    "worker: devices handed over; exiting when the daemon lets go"
                );
                link.reply(id, Ok(Reply::Done), None);
            }
            Err(e) => {
                abort(&paused);
                tracing::warn!(error = %e, "worker: the new worker did not take the devices; they run on here");
                link.reply(id, Err(e), None);
            }
        }
    }

    /// A live upgrade, the new worker's side: takes every device sent on `chan` (built from
    /// the description it was sealed for, with the sockets and state of the old worker),
    /// tells the old worker, and serves them.
    fn take_over(self: &Arc<Self>, chan: Option<OwnedFd>) -> Result<Reply, Errno> {
        let chan = chan.ok_or(Errno::INVAL)?;
        let packages = handover::recv_all(chan.as_fd(), HANDOVER_TIMEOUT)?;
        let mut ready = Vec::with_capacity(packages.len());
        for p in packages {
            let uuid = p.uuid.clone();
            match self.take_one(p) {
                Ok(r) => ready.push(r),
                Err(e) => {
                    tracing::warn!(uuid, error = %e, "worker: cannot take a device over");
                    let _ = handover::send_verdict(chan.as_fd(), Err(e));
                    return Err(e);
                }
            }
        }
        handover::send_verdict(chan.as_fd(), Ok(()))?;
        let mut pauses = Vec::with_capacity(ready.len());
        for r in ready {
            let uuid = MdevUuid::parse(&r.start.uuid).map_err(|_| Errno::INVAL)?;
            let paused_at = r.taken.paused_at;
            if let Some(c) = r.taken.client() {
                lock(&self.held).insert(r.start.uuid.clone(), c);
            }
            let served =
                crate::serve::serve_taken_over(&uuid, r.path, r.listener, r.server, r.taken)
                    .map_err(io_errno)?;
            let pause_us = umdev_server::handover::monotonic_ns().saturating_sub(paused_at) / 1000;
            tracing::info!(uuid = r.start.uuid, pause_us, "worker: device taken over");
            pauses.push((r.start.uuid.clone(), pause_us));
            lock(&self.devices).insert(
                r.start.uuid.clone(),
                Device {
                    start: r.start,
                    served,
                    env: r.env,
                    irqs: r.irqs,
                    attrs: r.attrs,
                },
            );
        }
        Ok(Reply::TakenOver(pauses))
    }

    fn take_one(self: &Arc<Self>, p: DevicePackage) -> Result<Ready, Errno> {
        let s = lock(&self.sealed_for)
            .get(&p.uuid)
            .map(StartDevice::clone_for_restart)
            .ok_or(Errno::NODEV)?;
        let uuid = MdevUuid::parse(&s.uuid).map_err(|_| Errno::INVAL)?;
        let env = self.env(uuid, &s).inherit(p.sockets);
        let (function, attrs) = self.build(&uuid, &s, &env)?;
        let irqs = function.interrupts();
        let server = Server::new(function, self.server_config(&s)?).map_err(|e| {
            tracing::warn!(error = %e, "worker: cannot make a server");
            Errno::IO
        })?;
        let taken = server.take_over(p.package)?;
        let (listener, path) = env.bind(VFIO_USER_SOCKET).map_err(io_errno)?;
        Ok(Ready {
            start: s,
            server,
            taken,
            listener,
            path,
            env,
            irqs,
            attrs,
        })
    }

    fn handle(self: &Arc<Self>, link: &Link, id: u64, call: Call, fd: Option<OwnedFd>) {
        let answer = match call {
            Call::Start(s) => self.start(&s),
            Call::HandOver => {
                self.hand_over(link, id, fd);
                return;
            }
            Call::TakeOver => self.take_over(fd),
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
            Call::Metrics { uuid, labels } => match lock(&self.devices).get(&uuid) {
                Some(d) => Ok(Reply::Text(d.served.metrics(&labels))),
                None => Err(Errno::NODEV),
            },
            Call::ProcessMetrics => {
                let mut out = String::new();
                umdev_server::stats::render_refusals(
                    &format!("worker-{}", std::process::id()),
                    &mut out,
                );
                Ok(Reply::Text(out))
            }
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
        sealed_for: Mutex::new(HashMap::new()),
        adopt_path: adopt_path.to_path_buf(),
        handed_over: std::sync::atomic::AtomicBool::new(false),
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
        link.serve("worker", move |id, call, fd| w.handle(&l, id, call, fd))?;
        *lock(&worker.link) = None;
        if worker
            .handed_over
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // Sockets, mappings and the devices' host sides are the new worker's now:
            // nothing here may close or remove them.
            tracing::info!("worker: handed over; exiting");
            std::process::exit(0);
        }
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
