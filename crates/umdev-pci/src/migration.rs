//! The VFIO migration v2 state machine, as the kernel defines it (`enum
//! vfio_device_mig_state` and the arcs in `<linux/vfio.h>`), and what a served function does
//! on each arc: stop and restart the device, gate its interrupts and DMA writes, save its
//! state into a data stream and load one.
//!
//! Arcs (the kernel's; P2P and PRE_COPY ones only when the device supports them):
//!
//! ```text
//! without P2P: RUNNING <-> STOP, RUNNING <-> PRE_COPY, PRE_COPY -> STOP_COPY
//! with P2P:    RUNNING <-> RUNNING_P2P <-> STOP, RUNNING <-> PRE_COPY <-> PRE_COPY_P2P,
//!              RUNNING_P2P <-> PRE_COPY_P2P, PRE_COPY_P2P -> STOP_COPY
//! always:      STOP <-> STOP_COPY, STOP <-> RESUMING
//! ```
//!
//! A request for any other pair goes by the shortest path over these arcs that does not pass
//! through the saving group (PRE_COPY, PRE_COPY_P2P, STOP_COPY: see [`path`]), as the
//! kernel's `vfio_mig_get_next_state` does; a pair with no such path (STOP_COPY to
//! PRE_COPY), an unsupported or unknown state, and ERROR as a target are EINVAL. ERROR is left only by a
//! device reset, which returns to RUNNING.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::io::Errno;
use umdev_dma::{Dma, DmaError, Prot};
use umdev_proto::wire;

use crate::error::DeviceError;
use crate::function::PciFunction;
use crate::state_format::{
    decode_stream, encode_record, next_record, RecordKind, StateReader, StateWriter, StreamError,
};

/// A migration state, numbered as the kernel's `enum vfio_device_mig_state`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigState {
    /// The device has failed and must be reset.
    Error = wire::DEVICE_STATE_ERROR,
    /// Stopped: no state change, no DMA, no interrupt.
    Stop = wire::DEVICE_STATE_STOP,
    /// Running normally.
    Running = wire::DEVICE_STATE_RUNNING,
    /// Stopped, its state being read out.
    StopCopy = wire::DEVICE_STATE_STOP_COPY,
    /// Stopped, a new state being written in.
    Resuming = wire::DEVICE_STATE_RESUMING,
    /// Running without peer-to-peer (the same as RUNNING here: no peer exists).
    RunningP2p = wire::DEVICE_STATE_RUNNING_P2P,
    /// Running, its state being read out while it changes.
    PreCopy = wire::DEVICE_STATE_PRE_COPY,
    /// PRE_COPY without peer-to-peer.
    PreCopyP2p = wire::DEVICE_STATE_PRE_COPY_P2P,
}

pub use umdev_proto::wire::{
    MIGRATION_P2P as P2P, MIGRATION_PRE_COPY as PRE_COPY, MIGRATION_STOP_COPY as STOP_COPY,
};

/// Every state, in numeric order.
pub const ALL_STATES: [MigState; 8] = [
    MigState::Error,
    MigState::Stop,
    MigState::Running,
    MigState::StopCopy,
    MigState::Resuming,
    MigState::RunningP2p,
    MigState::PreCopy,
    MigState::PreCopyP2p,
];

impl MigState {
    /// The state numbered `v`, if any.
    pub fn from_u32(v: u32) -> Option<MigState> {
        ALL_STATES.get(usize::try_from(v).ok()?).copied()
    }

    /// PRE_COPY, PRE_COPY_P2P and STOP_COPY: the device's state can be read out.
    pub fn is_saving(self) -> bool {
        matches!(self, Self::PreCopy | Self::PreCopyP2p | Self::StopCopy)
    }

    /// Whether the device runs (may change guest memory, raise interrupts, take BAR accesses).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Self::Running | Self::RunningP2p | Self::PreCopy | Self::PreCopyP2p
        )
    }

    /// Whether the device supporting `flags` (`MIGRATION_*`) has this state.
    pub fn supported(self, flags: u64) -> bool {
        let need = match self {
            Self::Error | Self::Stop | Self::Running | Self::StopCopy | Self::Resuming => 0,
            Self::RunningP2p => wire::MIGRATION_P2P,
            Self::PreCopy => wire::MIGRATION_PRE_COPY,
            Self::PreCopyP2p => wire::MIGRATION_P2P | wire::MIGRATION_PRE_COPY,
        };
        flags & need == need
    }
}

/// Whether `from -> to` is one of the kernel's direct arcs for a device supporting `flags`.
pub fn is_arc(from: MigState, to: MigState, flags: u64) -> bool {
    use MigState::*;
    if !from.supported(flags) || !to.supported(flags) {
        return false;
    }
    let p2p = flags & wire::MIGRATION_P2P != 0;
    match (from, to) {
        (Stop, StopCopy) | (StopCopy, Stop) | (Stop, Resuming) | (Resuming, Stop) => true,
        (Running, PreCopy) | (PreCopy, Running) => true,
        // With P2P the kernel stops and starts through RUNNING_P2P and PRE_COPY_P2P.
        (Running, Stop) | (Stop, Running) | (PreCopy, StopCopy) => !p2p,
        (Running, RunningP2p) | (RunningP2p, Running) | (RunningP2p, Stop) | (Stop, RunningP2p) => {
            true
        }
        (PreCopy, PreCopyP2p)
        | (PreCopyP2p, PreCopy)
        | (PreCopyP2p, RunningP2p)
        | (RunningP2p, PreCopyP2p)
        | (PreCopyP2p, StopCopy) => true,
        _ => false,
    }
}

/// Times a path crosses between the saving group and the other states (from `from` on).
fn crossings(from: MigState, path: &[MigState]) -> usize {
    let mut prev = from.is_saving();
    let mut n = 0;
    for s in path {
        if s.is_saving() != prev {
            n += 1;
            prev = s.is_saving();
        }
    }
    n
}

/// Saving states inside a path (its end excluded).
fn interior_saving(path: &[MigState]) -> usize {
    path.split_last().map_or(0, |(_, inner)| {
        inner.iter().filter(|s| s.is_saving()).count()
    })
}

/// The arcs a request for `from -> to` takes (the end included; empty for `from == to`).
///
/// The kernel's rule: the shortest path over [`is_arc`] that does not pass through the
/// saving group, i.e. never leaves it to come back (which would end one data stream and
/// start another) nor enters it to leave again; moving within it is fine (PRE_COPY ->
/// PRE_COPY_P2P -> STOP_COPY keeps the stream). Among equally short paths the one with the
/// fewest interior saving states wins, then the lowest state numbers: this gives the table
/// of the kernel's `vfio_mig_get_next_state` (RUNNING -> PRE_COPY_P2P by RUNNING_P2P,
/// PRE_COPY -> STOP_COPY by PRE_COPY_P2P when P2P is supported). The graph has 8 states,
/// so every simple path is tried.
pub fn path(from: MigState, to: MigState, flags: u64) -> Result<Vec<MigState>, MigrationError> {
    if to == MigState::Error || !to.supported(flags) {
        return Err(MigrationError::BadTarget(to as u32));
    }
    if from == MigState::Error {
        return Err(MigrationError::InError);
    }
    if from == to {
        return Ok(Vec::new());
    }
    fn walk(
        cur: MigState,
        to: MigState,
        flags: u64,
        from: MigState,
        seen: &mut Vec<MigState>,
        best: &mut Option<Vec<MigState>>,
    ) {
        if cur == to {
            let p = &seen[1..];
            let key = |p: &[MigState]| {
                let nums: Vec<u32> = p.iter().map(|s| *s as u32).collect();
                (p.len(), interior_saving(p), nums)
            };
            if crossings(from, p) <= 1 && best.as_deref().is_none_or(|b| key(p) < key(b)) {
                *best = Some(p.to_vec());
            }
            return;
        }
        for next in ALL_STATES {
            if is_arc(cur, next, flags) && !seen.contains(&next) {
                seen.push(next);
                walk(next, to, flags, from, seen, best);
                seen.pop();
            }
        }
    }
    let mut best = None;
    walk(from, to, flags, from, &mut vec![from], &mut best);
    best.ok_or(MigrationError::NoPath { from, to })
}

/// What a device declares to be migratable ([`PciDevice::migration`](crate::PciDevice::migration)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationSpec {
    /// Identifies the state format: a stream saved by one device type is refused by another
    /// (e.g. `"umdev-mtty-2"`).
    pub device_type: String,
    /// Version of the device's state written by `save`.
    pub version: u32,
    /// Oldest version `load` still accepts (newer daemons load older states down to this).
    pub min_version: u32,
    /// `MIGRATION_P2P` and/or `MIGRATION_PRE_COPY`; STOP_COPY is always supported.
    pub flags: u64,
}

/// Why a migration request failed; [`errno`](Self::errno) is what the client gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    /// The device is not migratable.
    #[error("the device does not support migration")]
    NotSupported,
    /// The requested state is unknown, unsupported by the device, or ERROR.
    #[error("migration state {0} is unknown, unsupported or not a valid target")]
    BadTarget(u32),
    /// The device is in ERROR: only a reset leaves it.
    #[error("the device is in the ERROR state; only a reset leaves it")]
    InError,
    /// No path without saving interior states (STOP_COPY to PRE_COPY).
    #[error("no migration arc leads from {from:?} to {to:?}")]
    NoPath {
        /// The current state.
        from: MigState,
        /// The requested one.
        to: MigState,
    },
    /// A device BAR access while the device is stopped.
    #[error("the device is stopped ({0:?}): device registers are not accessible")]
    Stopped(MigState),
    /// MIG_DATA_READ outside a saving state, MIG_DATA_WRITE outside RESUMING, pre-copy
    /// sizing outside PRE_COPY.
    #[error("{what} is not valid in the {state:?} state")]
    WrongState {
        /// The operation.
        what: &'static str,
        /// The current state.
        state: MigState,
    },
    /// The incoming stream passed the most a device state may take.
    #[error("the migration stream is larger than {0} bytes")]
    TooLarge(usize),
    /// The incoming stream was refused.
    #[error("the migration stream was refused")]
    Stream(#[source] StreamError),
    /// The device failed an arc; the function is now in ERROR.
    #[error("the device failed the {from:?} -> {to:?} arc (errno {errno})")]
    DeviceFailed {
        /// The state before the arc.
        from: MigState,
        /// The state the arc led to.
        to: MigState,
        /// The device's errno.
        errno: i32,
    },
}

impl MigrationError {
    /// The positive errno to report to the client.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotSupported => Errno::NOTSUP.raw_os_error(),
            Self::Stopped(_) => Errno::BUSY.raw_os_error(),
            Self::TooLarge(_) => Errno::FBIG.raw_os_error(),
            Self::DeviceFailed { errno, .. } => *errno,
            Self::BadTarget(_)
            | Self::InError
            | Self::NoPath { .. }
            | Self::WrongState { .. }
            | Self::Stream(_) => Errno::INVAL.raw_os_error(),
        }
    }
}

/// Most bytes a destination buffers for one incoming stream (EFBIG past it).
pub const MAX_STREAM: usize = 2 * crate::state_format::MAX_PAYLOAD;

/// A function's migration state and data session.
#[derive(Debug)]
pub(crate) struct Migration {
    spec: Option<MigrationSpec>,
    state: MigState,
    /// Saving: the stream handed out by MIG_DATA_READ, and how far it has been read.
    out: Vec<u8>,
    out_pos: usize,
    /// Size of the last state saved: the pre-copy estimate of what is still to come.
    last_save: usize,
    /// Saving: the final record, handed out once the device has no chunk left.
    final_record: Option<Vec<u8>>,
    /// Saving: the next chunk asked of the device is the session's first.
    first_chunk: bool,
    /// Resuming: the records kept for the load (every kind but chunks, which the device
    /// took as they came).
    input: Vec<u8>,
    /// Resuming: the start of a record still arriving.
    partial: Vec<u8>,
    /// Resuming: chunks the device took.
    chunks_loaded: u64,
    /// Set while the device is stopped: its DMA writes are refused.
    stopped: Arc<AtomicBool>,
}

impl Migration {
    pub(crate) fn new(spec: Option<MigrationSpec>) -> Self {
        Self {
            spec: spec.map(|mut s| {
                s.flags = (s.flags & (wire::MIGRATION_P2P | wire::MIGRATION_PRE_COPY))
                    | wire::MIGRATION_STOP_COPY;
                s
            }),
            state: MigState::Running,
            out: Vec::new(),
            out_pos: 0,
            last_save: 0,
            final_record: None,
            first_chunk: true,
            input: Vec::new(),
            partial: Vec::new(),
            chunks_loaded: 0,
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn spec(&self) -> Option<&MigrationSpec> {
        self.spec.as_ref()
    }

    /// The state now.
    pub(crate) fn current(&self) -> MigState {
        self.state
    }

    pub(crate) fn stopped_flag(&self) -> Arc<AtomicBool> {
        self.stopped.clone()
    }

    /// Device BAR accesses are refused while the device is stopped (config space and the
    /// MSI-X table stay reachable, as the kernel requires in STOP).
    pub(crate) fn check_access(&self) -> Result<(), MigrationError> {
        if self.state.is_running() {
            Ok(())
        } else {
            Err(MigrationError::Stopped(self.state))
        }
    }

    fn end_sessions(&mut self) {
        self.out = Vec::new();
        self.out_pos = 0;
        self.final_record = None;
        self.first_chunk = true;
        self.input = Vec::new();
        self.partial = Vec::new();
        self.chunks_loaded = 0;
    }
}

/// The device's DMA while migration may stop it: reads always pass, writes are refused
/// (EPERM, as a write to read-only memory) while the device is stopped, so a stopped device
/// cannot change guest memory behind the dirty log's back.
pub(crate) struct GatedDma {
    inner: Arc<dyn Dma>,
    stopped: Arc<AtomicBool>,
}

impl GatedDma {
    pub(crate) fn new(inner: Arc<dyn Dma>, stopped: Arc<AtomicBool>) -> Self {
        Self { inner, stopped }
    }
}

impl Dma for GatedDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.inner.read(iova, buf)
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(DmaError::PermissionDenied {
                iova,
                needed: Prot::WRITE,
                has: Prot::READ,
            });
        }
        self.inner.write(iova, data)
    }
}

impl PciFunction {
    /// What the device declared, if it migrates (with `MIGRATION_STOP_COPY` in its flags).
    pub fn migration_spec(&self) -> Option<&MigrationSpec> {
        self.mig.spec()
    }

    fn mig_spec(&self) -> Result<&MigrationSpec, MigrationError> {
        self.mig.spec().ok_or(MigrationError::NotSupported)
    }

    /// The migration state (DEVICE_FEATURE GET MIG_DEVICE_STATE).
    pub fn mig_state(&self) -> Result<MigState, DeviceError> {
        self.mig_spec()?;
        Ok(self.mig.state)
    }

    /// DEVICE_FEATURE SET MIG_DEVICE_STATE: goes to `target` by the kernel's path, arc by
    /// arc, and returns the state reached. On a failed arc the state is where the last good
    /// arc left it: ERROR if the device failed, RESUMING if the incoming state was refused
    /// (the device then is as it was, and what was written is discarded).
    pub fn set_mig_state(&mut self, target: u32) -> Result<MigState, DeviceError> {
        let flags = self.mig_spec()?.flags;
        let to = MigState::from_u32(target).ok_or(MigrationError::BadTarget(target))?;
        for next in path(self.mig.state, to, flags)? {
            self.mig_arc(next)?;
        }
        Ok(self.mig.state)
    }

    fn mig_arc(&mut self, to: MigState) -> Result<(), DeviceError> {
        let from = self.mig.state;
        let fail = |f: &mut PciFunction, e: DeviceError| {
            f.mig.state = MigState::Error;
            f.mig.end_sessions();
            f.mig.stopped.store(true, Ordering::Release);
            f.irqs.set_gated(true);
            tracing::warn!(?from, ?to, error = %e, "migration arc failed: device in ERROR");
            DeviceError::Migration(MigrationError::DeviceFailed {
                from,
                to,
                errno: e.errno(),
            })
        };
        if from.is_running() && !to.is_running() {
            // The device's work finishes first, with the gates open, so work in flight
            // completes as it would have; later work waits until the device runs again.
            self.work.hold();
            // Close the gates: nothing the device does from here reaches the client.
            self.mig.stopped.store(true, Ordering::Release);
            self.irqs.set_gated(true);
            if let Err(e) = self.device.set_running(false) {
                return Err(fail(self, e.into()));
            }
        }
        match (from, to) {
            (MigState::Resuming, MigState::Stop) => self.mig_load()?,
            (_, MigState::Resuming) => self.mig.end_sessions(),
            (
                MigState::Running | MigState::RunningP2p,
                MigState::PreCopy | MigState::PreCopyP2p,
            ) => match self.mig_save(RecordKind::PreCopy) {
                Ok(record) => {
                    self.mig.end_sessions();
                    self.mig.out = record;
                }
                Err(e) => return Err(fail(self, e)),
            },
            (MigState::Stop | MigState::PreCopy | MigState::PreCopyP2p, MigState::StopCopy) => {
                if from == MigState::Stop {
                    self.mig.end_sessions();
                }
                // The state is final now (the device is stopped); it goes out after the
                // device's last chunks.
                match self.mig_save(RecordKind::Final) {
                    Ok(record) => self.mig.final_record = Some(record),
                    Err(e) => return Err(fail(self, e)),
                }
            }
            (_, MigState::PreCopy | MigState::PreCopyP2p) => {}
            _ => {
                self.mig.out = Vec::new();
                self.mig.out_pos = 0;
            }
        }
        if !from.is_running() && to.is_running() {
            if let Err(e) = self.device.set_running(true) {
                return Err(fail(self, e.into()));
            }
            self.mig.stopped.store(false, Ordering::Release);
            self.irqs.set_gated(false);
            self.work.release();
        }
        tracing::debug!(?from, ?to, "migration arc");
        self.mig.state = to;
        Ok(())
    }

    fn mig_save(&mut self, kind: RecordKind) -> Result<Vec<u8>, DeviceError> {
        let mut w = StateWriter::new();
        self.device.save(&mut w)?;
        let payload = w.into_payload();
        if payload.len() > crate::state_format::MAX_PAYLOAD {
            return Err(MigrationError::TooLarge(crate::state_format::MAX_PAYLOAD).into());
        }
        let spec = self.mig_spec()?;
        let record = encode_record(spec, kind, &payload);
        self.mig.last_save = record.len();
        Ok(record)
    }

    /// Appends the device's next chunk to the outgoing stream, or at STOP_COPY the final
    /// record once the device has no chunk left; `false` when there is nothing more now.
    fn mig_produce(&mut self, budget: usize) -> Result<bool, DeviceError> {
        let first = std::mem::replace(&mut self.mig.first_chunk, false);
        let mut w = StateWriter::new();
        if self.device.save_chunk(first, budget, &mut w)? {
            let payload = w.into_payload();
            if payload.len() > crate::state_format::MAX_PAYLOAD {
                return Err(MigrationError::TooLarge(crate::state_format::MAX_PAYLOAD).into());
            }
            let record = encode_record(self.mig_spec()?, RecordKind::Chunk, &payload);
            self.mig.out.extend_from_slice(&record);
            return Ok(true);
        }
        match self.mig.final_record.take() {
            Some(record) => {
                self.mig.out.extend_from_slice(&record);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// RESUMING -> STOP: checks the whole stream, then hands the final state to the device.
    /// Nothing written means nothing to load: the device keeps its state (so a destination
    /// whose stream was refused can leave RESUMING and run on as it was).
    fn mig_load(&mut self) -> Result<(), DeviceError> {
        let input = std::mem::take(&mut self.mig.input);
        let partial = std::mem::take(&mut self.mig.partial);
        let chunks = std::mem::take(&mut self.mig.chunks_loaded);
        if !partial.is_empty() {
            tracing::warn!("incoming device state ends inside a record; the device is unchanged");
            return Err(DeviceError::from(StreamError::Truncated));
        }
        if input.is_empty() && chunks == 0 {
            return Ok(());
        }
        let spec = self.mig_spec()?.clone();
        let result = decode_stream(&input, &spec)
            .and_then(|(version, payload)| Ok((version, StateReader::parse(payload)?)))
            .map_err(DeviceError::from)
            .and_then(|(version, reader)| Ok(self.device.load(version, &reader)?));
        if let Err(e) = &result {
            tracing::warn!(
                device_type = spec.device_type,
                error = e as &(dyn std::error::Error + 'static),
                "incoming device state refused; the device is unchanged"
            );
        }
        result
    }

    /// MIG_DATA_READ: up to `max` bytes of the outgoing stream; fewer means that, for now
    /// (PRE_COPY) or for good (STOP_COPY), there is no more.
    pub fn mig_data_read(&mut self, max: usize) -> Result<Vec<u8>, DeviceError> {
        self.mig_spec()?;
        if !self.mig.state.is_saving() {
            return Err(MigrationError::WrongState {
                what: "MIG_DATA_READ",
                state: self.mig.state,
            }
            .into());
        }
        if self.mig.out_pos > 0 && self.mig.out_pos == self.mig.out.len() {
            self.mig.out.clear();
            self.mig.out_pos = 0;
        }
        while self.mig.out.len() - self.mig.out_pos < max {
            let more = match self.mig_produce(max) {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "the device failed to save its data: migration ends in ERROR");
                    self.mig.state = MigState::Error;
                    self.mig.end_sessions();
                    return Err(e);
                }
            };
            if !more {
                break;
            }
        }
        let start = self.mig.out_pos;
        let end = start.saturating_add(max).min(self.mig.out.len());
        self.mig.out_pos = end;
        Ok(self.mig.out[start..end].to_vec())
    }

    /// MIG_DATA_WRITE: takes the next bytes of the incoming stream. Each record is checked
    /// as soon as it is whole (a stream for another device or an unloadable version is
    /// refused at its first header, and discarded); chunk records go to the device at once,
    /// the others are kept for the load at RESUMING -> STOP.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        let spec = self.mig_spec()?.clone();
        if self.mig.state != MigState::Resuming {
            return Err(MigrationError::WrongState {
                what: "MIG_DATA_WRITE",
                state: self.mig.state,
            }
            .into());
        }
        let kept = self.mig.input.len() + self.mig.partial.len();
        if kept.saturating_add(data.len()) > MAX_STREAM {
            self.mig.end_sessions();
            return Err(MigrationError::TooLarge(MAX_STREAM).into());
        }
        let mut buf = std::mem::take(&mut self.mig.partial);
        buf.extend_from_slice(data);
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            let record = match next_record(rest, &spec) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "incoming device state refused");
                    self.mig.end_sessions();
                    return Err(e.into());
                }
            };
            let Some((kind, version, payload, len)) = record else {
                // A record still arriving: its header is checked once it is in.
                if rest.len() >= crate::state_format::HEADER_LEN {
                    if let Err(e) = crate::state_format::check_prefix(rest, &spec) {
                        tracing::warn!(error = %e, "incoming device state refused");
                        self.mig.end_sessions();
                        return Err(e.into());
                    }
                }
                break;
            };
            if kind == RecordKind::Chunk {
                let loaded = StateReader::parse(payload)
                    .map_err(DeviceError::from)
                    .and_then(|r| Ok(self.device.load_chunk(version, &r)?));
                if let Err(e) = loaded {
                    tracing::warn!(error = %e, "the device refused a chunk of incoming data");
                    self.mig.end_sessions();
                    return Err(e);
                }
                self.mig.chunks_loaded += 1;
            } else {
                self.mig.input.extend_from_slice(&rest[..len]);
            }
            at += len;
        }
        self.mig.partial = buf.split_off(at);
        Ok(())
    }

    /// Pre-copy sizing, as the kernel's `VFIO_MIG_GET_PRECOPY_INFO`: bytes of the initial
    /// snapshot not read yet, and an estimate of what STOP_COPY will still add (the whole
    /// state is saved again there; device states are small).
    pub fn mig_precopy_info(&self) -> Result<(u64, u64), DeviceError> {
        self.mig_spec()?;
        if !matches!(self.mig.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(MigrationError::WrongState {
                what: "pre-copy sizing",
                state: self.mig.state,
            }
            .into());
        }
        let initial = self.mig.out.len().saturating_sub(self.mig.out_pos);
        let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Ok((
            as_u64(initial).saturating_add(self.device.data_pending()),
            as_u64(self.mig.last_save),
        ))
    }

    /// After a device reset: RUNNING, sessions ended, gates open.
    pub(crate) fn migration_reset(&mut self) -> Result<(), DeviceError> {
        if self.mig.spec.is_none() {
            return Ok(());
        }
        let was = self.mig.state;
        self.mig.end_sessions();
        self.mig.state = MigState::Running;
        if !was.is_running() {
            self.device.set_running(true)?;
            self.mig.stopped.store(false, Ordering::Release);
            self.irqs.set_gated(false);
            self.work.release();
        }
        Ok(())
    }

    /// The client went: data sessions end and the state falls back to the nearest state
    /// without one (STOP_COPY and RESUMING to STOP, with nothing loaded; PRE_COPY to RUNNING,
    /// PRE_COPY_P2P to RUNNING_P2P). STOP stays STOP: a migrated-away source stays stopped.
    pub(crate) fn migration_client_gone(&mut self) {
        if self.mig.spec.is_none() {
            return;
        }
        self.mig.end_sessions();
        self.mig.state = match self.mig.state {
            MigState::StopCopy | MigState::Resuming => MigState::Stop,
            MigState::PreCopy => MigState::Running,
            MigState::PreCopyP2p => MigState::RunningP2p,
            s => s,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::{MIGRATION_P2P as P2P, MIGRATION_PRE_COPY as PRE};
    use MigState::*;

    const FLAG_SETS: [u64; 4] = [0, P2P, PRE, P2P | PRE];

    /// Every simple path from `from` to `to` over the arcs, by brute force.
    fn all_paths(from: MigState, to: MigState, flags: u64) -> Vec<Vec<MigState>> {
        fn walk(
            cur: MigState,
            to: MigState,
            flags: u64,
            seen: &mut Vec<MigState>,
            out: &mut Vec<Vec<MigState>>,
        ) {
            if cur == to {
                out.push(seen[1..].to_vec());
                return;
            }
            for n in ALL_STATES {
                if is_arc(cur, n, flags) && !seen.contains(&n) {
                    seen.push(n);
                    walk(n, to, flags, seen, out);
                    seen.pop();
                }
            }
        }
        let mut out = Vec::new();
        walk(from, to, flags, &mut vec![from], &mut out);
        out
    }

    #[test]
    fn paths_are_shortest_without_passing_through_the_saving_group_for_every_pair() {
        for flags in FLAG_SETS {
            for from in ALL_STATES {
                for to in ALL_STATES {
                    let legal: Vec<Vec<MigState>> = all_paths(from, to, flags)
                        .into_iter()
                        .filter(|p| crossings(from, p) <= 1)
                        .collect();
                    let got = path(from, to, flags);
                    let valid = from != Error
                        && to != Error
                        && from.supported(flags)
                        && to.supported(flags);
                    if !valid || (from != to && legal.is_empty()) {
                        assert!(got.is_err(), "{from:?}->{to:?} flags {flags}: {got:?}");
                        continue;
                    }
                    let got = got.unwrap();
                    let best = legal.iter().map(Vec::len).min().unwrap_or(0);
                    assert_eq!(got.len(), best, "{from:?}->{to:?} flags {flags}");
                    assert!(from == to || legal.contains(&got));
                }
            }
        }
    }

    #[test]
    fn kernel_table_samples() {
        let all = P2P | PRE;
        assert_eq!(path(Running, Stop, 0).unwrap(), [Stop]);
        assert_eq!(path(Running, Stop, P2P).unwrap(), [RunningP2p, Stop]);
        assert_eq!(
            path(Running, StopCopy, all).unwrap(),
            [RunningP2p, Stop, StopCopy]
        );
        assert_eq!(path(PreCopy, StopCopy, PRE).unwrap(), [StopCopy]);
        assert_eq!(
            path(PreCopy, StopCopy, all).unwrap(),
            [PreCopyP2p, StopCopy]
        );
        assert_eq!(path(PreCopyP2p, Stop, all).unwrap(), [RunningP2p, Stop]);
        assert_eq!(path(PreCopy, Stop, PRE).unwrap(), [Running, Stop]);
        assert_eq!(
            path(Resuming, PreCopy, PRE).unwrap(),
            [Stop, Running, PreCopy]
        );
        assert_eq!(path(StopCopy, Running, 0).unwrap(), [Stop, Running]);
    }

    #[test]
    fn forbidden_requests() {
        let all = P2P | PRE;
        assert!(matches!(
            path(StopCopy, PreCopy, all),
            Err(MigrationError::NoPath { .. })
        ));
        assert!(path(StopCopy, PreCopyP2p, all).is_err());
        assert_eq!(path(Running, Error, all), Err(MigrationError::BadTarget(0)));
        assert_eq!(path(Error, Running, all), Err(MigrationError::InError));
        assert_eq!(path(Running, PreCopy, 0), Err(MigrationError::BadTarget(6)));
        assert_eq!(
            path(Running, RunningP2p, PRE),
            Err(MigrationError::BadTarget(5))
        );
        assert!(MigState::from_u32(8).is_none());
    }
}
