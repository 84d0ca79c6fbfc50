//! One client session: negotiation, then commands handled in order until the client goes.
//!
//! Every command is parsed and checked by `umdev_proto::request` first (what its bytes and
//! fd count alone decide), then handled by the module of its concern:
//! [`dma`] (DMA_MAP, DMA_UNMAP), [`regions`] (device and region info, region access, reset),
//! [`irqs`] (IRQ info, SET_IRQS), [`features`] (DEVICE_FEATURE, through one table) and
//! [`migration`] (the migration features and MIG_DATA_READ/WRITE).

mod dma;
mod features;
mod irqs;
mod migration;
mod regions;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use rustix::io::Errno;
use umdev_dma::{AddressSpace, DmaLimits, Pinner};
use umdev_pci::{ClientId, PciFunction, Pump};
use umdev_proto::{request, wire, Capabilities, Command, Header, ProtoError};
use umdev_transport::{Incoming, Message, RecvLimits, Transport, TransportError};
use zerocopy::{Immutable, IntoBytes};

use crate::error::{refuse, RequestError, ServerError};
use crate::handover::{HandOverState, Package, SessionParts};
use crate::remote::RemoteChannel;
use crate::ServerConfig;

/// A successful reply: body bytes after the header, and fds to attach.
pub(crate) struct Reply {
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Reply {
    fn empty() -> Reply {
        Reply::bytes(Vec::new())
    }

    fn bytes(body: Vec<u8>) -> Reply {
        Reply {
            body,
            fds: Vec::new(),
        }
    }

    fn of<T: IntoBytes + Immutable>(v: &T) -> Reply {
        Reply::bytes(v.as_bytes().to_vec())
    }
}

/// What the client and we agreed on in VERSION.
struct Negotiated {
    write_multiple: bool,
    /// Most fds the client takes in one message.
    client_max_fds: u32,
    /// Most bytes the client takes in one DMA message.
    client_max_xfer: u32,
    /// Most DMA mappings the client may hold.
    max_dma_maps: u32,
}

/// A session handed over from another process, before it runs.
pub(crate) struct Resumed {
    transport: Arc<dyn Transport>,
    parts: SessionParts,
    function: umdev_pci::HandOver,
}

impl Resumed {
    pub(crate) fn new(
        transport: Arc<dyn Transport>,
        parts: SessionParts,
        function: umdev_pci::HandOver,
    ) -> Resumed {
        Resumed {
            transport,
            parts,
            function,
        }
    }

    pub(crate) fn client(&self) -> ClientId {
        self.parts.client
    }
}

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The client went (or was disconnected): torn down.
    Gone,
    /// Handed over to another process: nothing torn down.
    HandedOver,
}

pub(crate) struct Session<'a> {
    function: &'a Mutex<PciFunction>,
    config: &'a ServerConfig,
    transport: Arc<dyn Transport>,
    limits: RecvLimits,
    remote: Arc<RemoteChannel>,
    space: Option<Arc<AddressSpace>>,
    pinner: Option<Arc<Pinner>>,
    negotiated: Option<Negotiated>,
    /// Who the client is, given to the device's `open`.
    client: ClientId,
    /// Where a live upgrade asks this session to pause.
    handover: Option<Arc<HandOverState>>,
    /// Set when VERSION is complete (the accept loop's timeout and yield rule read it).
    negotiated_flag: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// The device's counters.
    stats: Arc<crate::stats::Stats>,
    /// The request budget (`max_requests_per_sec`): tokens and when they were counted.
    budget: (f64, std::time::Instant),
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        function: &'a Mutex<PciFunction>,
        config: &'a ServerConfig,
        transport: Arc<dyn Transport>,
        client: ClientId,
    ) -> Session<'a> {
        let limits = RecvLimits {
            max_body: umdev_proto::max_body_len(config.max_data_xfer_size),
        };
        let remote = Arc::new(RemoteChannel::new(
            transport.clone(),
            limits,
            config.dma_timeout,
        ));
        Session {
            function,
            config,
            transport,
            limits,
            remote,
            space: None,
            pinner: None,
            negotiated: None,
            client,
            handover: None,
            negotiated_flag: None,
            stats: crate::stats::Stats::new(),
            budget: (
                f64::from(config.max_requests_per_sec),
                std::time::Instant::now(),
            ),
        }
    }

    /// Waits, if the client is over its request rate, until it may send the next request:
    /// a token bucket holding one second's worth of requests (so bursts pass), refilled at
    /// the rate.
    fn pace(&mut self) {
        let rate = f64::from(self.config.max_requests_per_sec);
        if rate == 0.0 {
            return;
        }
        loop {
            let now = std::time::Instant::now();
            let (tokens, at) = self.budget;
            let tokens = (tokens + now.duration_since(at).as_secs_f64() * rate).min(rate);
            if tokens >= 1.0 {
                self.budget = (tokens - 1.0, now);
                return;
            }
            self.budget = (tokens, now);
            std::thread::sleep(std::time::Duration::from_secs_f64((1.0 - tokens) / rate));
        }
    }

    /// Counts into `stats` (the server's, for its device).
    pub(crate) fn with_stats(mut self, stats: Arc<crate::stats::Stats>) -> Self {
        let _ = self.remote.stats.set(stats.clone());
        self.stats = stats;
        self
    }

    /// Sets `flag` when the client completes VERSION.
    pub(crate) fn with_negotiated_flag(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.negotiated_flag = Some(flag);
        self
    }

    /// Lets a live upgrade pause this session between messages (`state`'s wake fd must be
    /// the transport's).
    pub(crate) fn with_handover(mut self, state: Arc<HandOverState>) -> Self {
        self.handover = Some(state);
        self
    }

    /// Takes in a session handed over from another process: its mappings mapped again,
    /// the device opened for the same client (admitted already) and its function's state
    /// restored, paused until [`run_resumed`](Self::run_resumed).
    pub(crate) fn resumed(
        function: &'a Mutex<PciFunction>,
        config: &'a ServerConfig,
        r: Resumed,
    ) -> Result<Session<'a>, Errno> {
        let Resumed {
            transport,
            mut parts,
            function: handed,
        } = r;
        let mut s = Session::new(function, config, transport, parts.client);
        let memory = config.locked_memory.client_memory(&parts.client);
        let space = crate::handover::rebuild_space(&mut parts, memory)?;
        let pinner = Arc::new(space.pinner());
        s.remote.set_client_max_xfer(parts.client_max_xfer);
        space.set_remote(Some(s.remote.clone()));
        s.function()
            .take_over(
                handed,
                Some((space.clone(), parts.client, Some(pinner.clone()))),
            )
            .map_err(|e| Errno::from_raw_os_error(e.errno()))?;
        s.space = Some(space);
        s.pinner = Some(pinner);
        s.negotiated = Some(Negotiated {
            write_multiple: parts.write_multiple,
            client_max_fds: parts.client_max_fds,
            client_max_xfer: parts.client_max_xfer,
            max_dma_maps: parts.max_dma_maps,
        });
        Ok(s)
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    fn function(&self) -> std::sync::MutexGuard<'a, PciFunction> {
        self.function.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves the client until it disconnects. Returns `Ok` for a clean disconnect.
    pub(crate) fn run(mut self) -> Result<Ended, ServerError> {
        // While the function waits for the device's work, this thread keeps reading the
        // client's replies to the device's DMA requests.
        let remote = self.remote.clone();
        let pump: Pump = Arc::new(move |timeout| remote.pump(timeout));
        self.function().set_pump(Some(pump));
        let result = self.serve();
        if matches!(result, Ok(Ended::HandedOver)) {
            // Another process has the connection, the device and the mappings now.
            return result;
        }
        self.teardown();
        self.function().set_pump(None);
        result
    }

    /// Runs a session taken in by [`resumed`](Self::resumed): the function goes on from
    /// where the old process paused it.
    pub(crate) fn run_resumed(self) -> Result<Ended, ServerError> {
        self.stats.taken_over();
        self.stats.set_space(self.space.as_ref());
        if let Err(e) = self.function().resume() {
            tracing::warn!(error = %e, "a handed-over device did not run again");
        }
        self.run()
    }

    /// Pauses between messages for a live upgrade, and hands over unless the asker gives up.
    /// `Ok(true)`: handed over, stop.
    fn hand_over_point(&mut self) -> Result<bool, ServerError> {
        let Some(state) = self.handover.clone() else {
            return Ok(false);
        };
        if !state.asked() {
            return Ok(false);
        }
        let function = self.function;
        let handed = state.pause_and_deliver(function, || {
            // Draining the device's work read the client's socket: what came goes with the
            // connection, ahead of what is unread (or, if that cannot be, is handled first
            // and the pause tried again: the request is still set).
            let deferred = if self.remote.has_deferred() {
                Some(self.remote.deferred_bytes()?)
            } else {
                None
            };
            Some(self.package(deferred))
        });
        if handed {
            self.stats.handed_over();
            tracing::info!(client = %self.client, "session handed over to another process");
        }
        Ok(handed)
    }

    fn package(&mut self, deferred: Option<crate::remote::Unread>) -> Result<Package, Errno> {
        let errno = |e: umdev_pci::DeviceError| Errno::from_raw_os_error(e.errno());
        let function = self.function().hand_over().map_err(errno)?;
        let n = self.negotiated.as_ref().ok_or(Errno::INVAL)?;
        let mappings = self
            .space()
            .map_err(|_| Errno::INVAL)?
            .export()
            .map_err(|e| e.as_errno())?;
        let mut detached = self
            .transport
            .detach()
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::NOTSUP))?;
        if let Some(crate::remote::Unread {
            mut bytes,
            mut marks,
        }) = deferred
        {
            let shift = bytes.len() as u64;
            bytes.append(&mut detached.pending);
            detached.pending = bytes;
            marks.extend(
                detached
                    .fds
                    .drain(..)
                    .map(|(s, e, f)| (s + shift, e + shift, f)),
            );
            detached.fds = marks;
        }
        Ok(Package::make(
            function,
            Some(SessionParts {
                detached: Some(detached),
                client: self.client,
                write_multiple: n.write_multiple,
                client_max_fds: n.client_max_fds,
                client_max_xfer: n.client_max_xfer,
                max_dma_maps: n.max_dma_maps,
                mappings,
            }),
        ))
    }

    fn serve(&mut self) -> Result<Ended, ServerError> {
        loop {
            if self.handover.as_ref().is_some_and(|h| h.maybe_asked()) && self.hand_over_point()? {
                return Ok(Ended::HandedOver);
            }
            let incoming = match self.remote.take_deferred() {
                Some(Ok(i)) => i,
                Some(Err(TransportError::Closed)) => return Ok(Ended::Gone),
                Some(Err(e)) => return Err(e.into()),
                None => match self.transport.recv(self.limits) {
                    Ok(i) => i,
                    Err(TransportError::Closed) => return Ok(Ended::Gone),
                    Err(TransportError::Interrupted) => {
                        if self.hand_over_point()? {
                            return Ok(Ended::HandedOver);
                        }
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            match incoming {
                Incoming::Oversized { header } => {
                    let err = RequestError::Proto(ProtoError::TooLarge {
                        size: header.body_len(),
                        max: self.limits.max_body,
                    });
                    self.answer(&header, Err(err))?;
                }
                Incoming::Message(m) if m.header.is_reply() => self.remote.dispatch_reply(m),
                Incoming::Message(m) => {
                    let header = m.header;
                    self.pace();
                    let t = std::time::Instant::now();
                    let result = self.dispatch(m);
                    self.stats
                        .request(header.command, result.is_ok(), t.elapsed());
                    let fatal = matches!(
                        (&result, header.known_command()),
                        (Err(_), Some(Command::Version))
                    ) && self.negotiated.is_none();
                    self.answer(&header, result)?;
                    if fatal {
                        return Err(ServerError::Negotiation(refuse(
                            Errno::PROTO,
                            "version negotiation failed",
                        )));
                    }
                }
            }
        }
    }

    fn answer(
        &self,
        header: &Header,
        result: Result<Reply, RequestError>,
    ) -> Result<(), ServerError> {
        match result {
            Ok(reply) => {
                if header.no_reply() {
                    return Ok(());
                }
                let rh = header
                    .reply(reply.body.len())
                    .map_err(|e| ServerError::Negotiation(e.into()))?;
                let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|f| f.as_fd()).collect();
                self.transport.send(&rh, &[&reply.body], &fds)?;
            }
            Err(e) => {
                let errno = e.errno();
                tracing::debug!(
                    msg_id = header.msg_id,
                    command = header.command,
                    errno,
                    error = &e as &(dyn std::error::Error + 'static),
                    "request failed"
                );
                if header.no_reply() {
                    crate::refusals::refused(
                        "posted-request-failed",
                        Some(&self.client),
                        &format!(
                            "a posted request (command {}) failed with errno {errno}; the client asked for no reply",
                            header.command
                        ),
                    );
                    return Ok(());
                }
                self.transport.send(&header.error_reply(errno), &[], &[])?;
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, m: Message) -> Result<Reply, RequestError> {
        let Message { header, body, fds } = m;
        let bad_flags = !umdev_proto::FLAGS_KNOWN | umdev_proto::FLAG_ERROR;
        if !header.is_command() || header.flags & bad_flags != 0 {
            return Err(ProtoError::UnknownFlags(header.flags).into());
        }
        if fds.len() > self.config.max_msg_fds as usize {
            return Err(ProtoError::TooManyFds {
                got: fds.len(),
                max: self.config.max_msg_fds as usize,
            }
            .into());
        }
        let Some(command) = header.known_command() else {
            return Err(ProtoError::UnknownCommand(header.command).into());
        };
        let n = fds.len();
        match command {
            Command::Version => self.version(&body, n),
            _ if self.negotiated.is_none() => {
                Err(refuse(Errno::INVAL, "command before VERSION negotiation"))
            }
            Command::DmaMap => self.dma_map(&body, fds),
            Command::DmaUnmap => self.dma_unmap(&body, n),
            Command::DeviceGetInfo => self.device_info(&body, n),
            Command::DeviceGetRegionInfo => self.region_info(&body, n),
            Command::DeviceGetRegionIoFds => self.region_io_fds(&body, n),
            Command::DeviceGetIrqInfo => self.irq_info(&body, n),
            Command::DeviceSetIrqs => self.set_irqs(&body, fds),
            Command::RegionRead => self.region_read(&body, n),
            Command::RegionWrite => self.region_write(&body, n),
            Command::DeviceReset => self.reset(n),
            Command::RegionWriteMulti => self.write_multi(&body, n),
            Command::DmaRead | Command::DmaWrite => Err(ProtoError::WrongDirection(command).into()),
            Command::DeviceFeature => self.device_feature(&body, n),
            Command::MigDataRead => self.mig_data_read(&body, n),
            Command::MigDataWrite => self.mig_data_write(&body, n),
        }
    }

    fn version(&mut self, body: &[u8], fds: usize) -> Result<Reply, RequestError> {
        request::no_fds(fds)?;
        if self.negotiated.is_some() {
            return Err(refuse(Errno::INVAL, "VERSION was already negotiated"));
        }
        let (v, tail) = wire::split::<wire::Version>(body, "VERSION")?;
        if v.major != umdev_proto::MAJOR {
            return Err(ProtoError::UnsupportedVersion {
                major: v.major,
                minor: v.minor,
            }
            .into());
        }
        let client = Capabilities::parse(tail)?;
        let max_dma_maps = self
            .config
            .max_dma_maps
            .min(client.max_dma_maps_or_default());
        let memory = self.config.locked_memory.client_memory(&self.client);
        let space = Arc::new(AddressSpace::with_client(
            DmaLimits {
                max_mappings: max_dma_maps as usize,
            },
            memory,
        ));
        let pinner = Arc::new(space.pinner());
        self.remote
            .set_client_max_xfer(client.max_data_xfer_size_or_default());
        space.set_remote(Some(self.remote.clone()));
        // The framework's open guard and the parent driver may refuse this client: then
        // negotiation fails and the connection closes, as a refused open of a VFIO device
        // fd would.
        self.function()
            .open_with_pins(space.clone(), self.client, Some(pinner.clone()))
            .map_err(RequestError::Device)?;
        self.space = Some(space);
        self.pinner = Some(pinner);
        let write_multiple = client.write_multiple == Some(true);
        self.negotiated = Some(Negotiated {
            write_multiple,
            client_max_fds: client.max_msg_fds_or_default(),
            client_max_xfer: client.max_data_xfer_size_or_default(),
            max_dma_maps,
        });
        let ours = Capabilities {
            max_msg_fds: Some(self.config.max_msg_fds),
            max_data_xfer_size: Some(self.config.max_data_xfer_size),
            max_dma_maps: Some(max_dma_maps),
            pgsizes: Some(umdev_proto::DEFAULT_PGSIZES),
            write_multiple: write_multiple.then_some(true),
            ..Capabilities::default()
        };
        if let Some(f) = &self.negotiated_flag {
            f.store(true, std::sync::atomic::Ordering::Release);
        }
        self.stats.set_space(self.space.as_ref());
        let minor = v.minor.min(umdev_proto::MAX_MINOR);
        tracing::info!(
            client_minor = v.minor,
            minor,
            client_max_msg_fds = client.max_msg_fds_or_default(),
            client_max_data_xfer_size = client.max_data_xfer_size_or_default(),
            max_dma_maps,
            write_multiple,
            "client negotiated vfio-user 0.{minor}"
        );
        let mut reply = wire::Version {
            major: umdev_proto::MAJOR,
            minor,
        }
        .as_bytes()
        .to_vec();
        reply.extend_from_slice(&ours.to_wire());
        Ok(Reply::bytes(reply))
    }

    fn space(&self) -> Result<&Arc<AddressSpace>, RequestError> {
        self.space
            .as_ref()
            .ok_or_else(|| refuse(Errno::INVAL, "no address space before VERSION"))
    }

    fn teardown(&mut self) {
        // Waiters for DMA replies fail now, so the device's work drains quickly.
        self.remote.close();
        if self.negotiated.is_some() {
            self.function().close();
        }
        // The device has dropped its context on close; ours goes too, releasing whatever it
        // still pinned. A device that kept a handle is revoked by the unmap below.
        self.pinner = None;
        if let Some(space) = self.space.take() {
            space.stop_dirty_logging();
            let n = space.unmap_all();
            space.set_remote(None);
            tracing::info!(
                mappings = n,
                "client gone: DMA unmapped, interrupts released"
            );
        }
    }
}
