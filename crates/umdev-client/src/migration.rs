//! Migration from the client side: the DEVICE_FEATURE and MIG_DATA calls, and a driver that
//! moves a device from a source server to a destination server the way a VMM would.
//!
//! [`migrate`] does it in one call; [`Migration`] does it step by step, so that a caller can
//! interleave its own work (a test's guest, a VMM's vCPUs) between the steps:
//!
//! 1. [`Migration::begin`]: both devices must support migration; the destination goes to
//!    RESUMING; the source's dirty logging starts over the memory ranges (if a
//!    [`MemoryCopier`] is given) and all memory is copied once; the source goes to PRE_COPY
//!    if it supports it.
//! 2. [`Migration::precopy_round`], repeated while it returns `true`: the device data
//!    available now is moved, and the pages the device dirtied since the last round are
//!    copied; it returns `false` once the dirty data stops shrinking, falls under
//!    [`MigrateOptions::target_dirty_bytes`], or after [`MigrateOptions::max_rounds`].
//! 3. [`Migration::switchover`]: the source goes to STOP_COPY (the device stops), the last
//!    dirty pages and the rest of the device data move, the destination loads (RESUMING ->
//!    STOP) and runs (RUNNING); the source is left in STOP. Downtime is measured from the
//!    STOP_COPY request to the destination's RUNNING reply.
//!
//! Over vfio-user the kernel's `VFIO_MIG_GET_PRECOPY_INFO` ioctl has no message: umdev
//! answers it as DEVICE_FEATURE GET of its private feature index
//! [`wire::DEVICE_FEATURE_UMDEV_PRECOPY_INFO`] ([`Client::mig_precopy_info`]).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use umdev_proto::{wire, Command};
use zerocopy::{FromBytes, IntoBytes};

use crate::{Client, ClientError};

/// Page size of the dirty log the driver asks for.
pub const DIRTY_PAGE: u64 = 4096;

impl Client {
    /// DEVICE_FEATURE with `flags`, `data`, and room for `reply_data` bytes of answer;
    /// returns the data after the 8-byte feature header.
    pub fn device_feature(
        &mut self,
        flags: u32,
        data: &[u8],
        reply_data: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let argsz = 8 + data.len().max(reply_data);
        let f = wire::DeviceFeature {
            argsz: u32::try_from(argsz).map_err(|_| ClientError::Unexpected("feature too big"))?,
            flags,
        };
        let r = self.request(Command::DeviceFeature, &[f.as_bytes(), data], &[])?;
        r.body
            .get(8..)
            .map(<[u8]>::to_vec)
            .ok_or(ClientError::Unexpected("short DEVICE_FEATURE reply"))
    }

    /// DEVICE_FEATURE GET MIGRATION: the `MIGRATION_*` flags (ENOTSUP: not migratable).
    pub fn migration_flags(&mut self) -> Result<u64, ClientError> {
        let flags = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_MIGRATION;
        let d = self.device_feature(flags, &[], 8)?;
        Ok(wire::MigFeature::read_from_prefix(&d)
            .map_err(|_| ClientError::Unexpected("short MIGRATION reply"))?
            .0
            .flags)
    }

    /// DEVICE_FEATURE GET MIG_DEVICE_STATE.
    pub fn mig_state(&mut self) -> Result<u32, ClientError> {
        let flags = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_MIG_DEVICE_STATE;
        let d = self.device_feature(flags, &[], 8)?;
        Ok(wire::MigDeviceState::read_from_prefix(&d)
            .map_err(|_| ClientError::Unexpected("short MIG_DEVICE_STATE reply"))?
            .0
            .device_state)
    }

    /// DEVICE_FEATURE SET MIG_DEVICE_STATE; returns the state reached.
    pub fn set_mig_state(&mut self, state: u32) -> Result<u32, ClientError> {
        let flags = wire::DEVICE_FEATURE_SET | wire::DEVICE_FEATURE_MIG_DEVICE_STATE;
        let req = wire::MigDeviceState {
            device_state: state,
            data_fd: -1,
        };
        let d = self.device_feature(flags, req.as_bytes(), 8)?;
        Ok(wire::MigDeviceState::read_from_prefix(&d)
            .map_err(|_| ClientError::Unexpected("short MIG_DEVICE_STATE reply"))?
            .0
            .device_state)
    }

    /// Pre-copy sizing (`initial_bytes`, `dirty_bytes`), umdev's DEVICE_FEATURE GET of
    /// [`wire::DEVICE_FEATURE_UMDEV_PRECOPY_INFO`]; PRE_COPY states only.
    pub fn mig_precopy_info(&mut self) -> Result<(u64, u64), ClientError> {
        let flags = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_UMDEV_PRECOPY_INFO;
        let d = self.device_feature(flags, &[], 16)?;
        let (i, _) = wire::MigPrecopyInfo::read_from_prefix(&d)
            .map_err(|_| ClientError::Unexpected("short pre-copy info reply"))?;
        Ok((i.initial_bytes, i.dirty_bytes))
    }

    /// MIG_DATA_READ of at most `max` bytes; fewer means no more data (for now).
    pub fn mig_data_read(&mut self, max: u32) -> Result<Vec<u8>, ClientError> {
        let req = wire::MigData {
            argsz: 8u32.saturating_add(max),
            size: max,
        };
        let r = self.request(Command::MigDataRead, &[req.as_bytes()], &[])?;
        let (head, data) = crate::parse::<wire::MigData>(&r.body, "MIG_DATA_READ reply")?;
        if head.size as usize != data.len() || head.size > max {
            return Err(ClientError::Unexpected(
                "MIG_DATA_READ size and data differ",
            ));
        }
        Ok(data.to_vec())
    }

    /// MIG_DATA_WRITE of `data` (at most the server's `max_data_xfer_size`).
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let size =
            u32::try_from(data.len()).map_err(|_| ClientError::Unexpected("data too big"))?;
        let req = wire::MigData {
            argsz: 8u32.saturating_add(size),
            size,
        };
        self.request(Command::MigDataWrite, &[req.as_bytes(), data], &[])?;
        Ok(())
    }

    /// DMA_LOGGING_START over `ranges` (IOVA, length); returns the page size chosen.
    pub fn dma_logging_start(
        &mut self,
        ranges: &[(u64, u64)],
        page_size: u64,
    ) -> Result<u64, ClientError> {
        let ctl = wire::DmaLoggingControl {
            page_size,
            num_ranges: u32::try_from(ranges.len())
                .map_err(|_| ClientError::Unexpected("too many ranges"))?,
            reserved: 0,
        };
        let mut data = ctl.as_bytes().to_vec();
        for &(iova, length) in ranges {
            data.extend_from_slice(wire::DmaLoggingRange { iova, length }.as_bytes());
        }
        let flags = wire::DEVICE_FEATURE_SET | wire::DEVICE_FEATURE_DMA_LOGGING_START;
        let d = self.device_feature(flags, &data, 0)?;
        Ok(wire::DmaLoggingControl::read_from_prefix(&d)
            .map_err(|_| ClientError::Unexpected("short DMA_LOGGING_START reply"))?
            .0
            .page_size)
    }

    /// DMA_LOGGING_STOP.
    pub fn dma_logging_stop(&mut self) -> Result<(), ClientError> {
        let flags = wire::DEVICE_FEATURE_SET | wire::DEVICE_FEATURE_DMA_LOGGING_STOP;
        self.device_feature(flags, &[], 0)?;
        Ok(())
    }

    /// DMA_LOGGING_REPORT of `[iova, iova + length)` at `page_size` (read and clear): the
    /// bitmap as u64 words, bit k for page k.
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let rep = wire::DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let pages = length.div_ceil(page_size.max(1));
        let words = usize::try_from(pages.div_ceil(64))
            .map_err(|_| ClientError::Unexpected("bitmap too big"))?;
        let flags = wire::DEVICE_FEATURE_GET | wire::DEVICE_FEATURE_DMA_LOGGING_REPORT;
        let d = self.device_feature(flags, rep.as_bytes(), 24 + words * 8)?;
        let bitmap = d
            .get(24..24 + words * 8)
            .ok_or(ClientError::Unexpected("short DMA_LOGGING_REPORT reply"))?;
        Ok(bitmap
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
            .collect())
    }
}

/// The guest memory behind a migrating device, as the VMM sees both ends of it.
pub trait MemoryCopier {
    /// The ranges (IOVA, length) the device may write: logged and copied.
    fn ranges(&self) -> Vec<(u64, u64)>;
    /// Copies `[iova, iova + len)` from the source's memory to the destination's.
    fn copy(&mut self, iova: u64, len: u64) -> std::io::Result<()>;
}

/// Several copiers, each for its ranges (a VMM's guest memory in several mappings).
impl<C: MemoryCopier> MemoryCopier for Vec<C> {
    fn ranges(&self) -> Vec<(u64, u64)> {
        self.iter().flat_map(MemoryCopier::ranges).collect()
    }

    fn copy(&mut self, iova: u64, len: u64) -> std::io::Result<()> {
        let owner = self.iter_mut().find(|c| {
            c.ranges()
                .iter()
                .any(|&(at, n)| at <= iova && iova.saturating_add(len) <= at + n)
        });
        match owner {
            Some(c) => c.copy(iova, len),
            None => Err(std::io::Error::from(std::io::ErrorKind::InvalidInput)),
        }
    }
}

/// A [`MemoryCopier`] between two files (memfds) mapped at the same IOVA on each side.
#[derive(Debug)]
pub struct FileCopier {
    src: OwnedFd,
    dst: OwnedFd,
    iova: u64,
    len: u64,
    buf: Vec<u8>,
}

impl FileCopier {
    /// Source and destination files, both mapped at `iova` for `len` bytes from offset 0.
    pub fn new(src: OwnedFd, dst: OwnedFd, iova: u64, len: u64) -> Self {
        Self {
            src,
            dst,
            iova,
            len,
            buf: vec![0; 1 << 20],
        }
    }
}

impl MemoryCopier for FileCopier {
    fn ranges(&self) -> Vec<(u64, u64)> {
        vec![(self.iova, self.len)]
    }

    fn copy(&mut self, iova: u64, len: u64) -> std::io::Result<()> {
        let mut off = iova
            .checked_sub(self.iova)
            .filter(|o| o.saturating_add(len) <= self.len)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let end = off + len;
        while off < end {
            let n = usize::try_from(end - off)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let got = rustix::io::pread(self.src.as_fd(), &mut self.buf[..n], off)?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let mut done = 0;
            while done < got {
                done +=
                    rustix::io::pwrite(self.dst.as_fd(), &self.buf[done..got], off + done as u64)?;
            }
            off += got as u64;
        }
        Ok(())
    }
}

/// How [`Migration`] iterates.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    /// Most pre-copy rounds.
    pub max_rounds: usize,
    /// Pre-copy ends once a round's dirty memory is at most this many bytes.
    pub target_dirty_bytes: u64,
    /// Bytes asked for per MIG_DATA_READ (capped by both servers' `max_data_xfer_size`).
    pub chunk: u32,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_rounds: 16,
            target_dirty_bytes: 256 * 1024,
            chunk: 1 << 20,
        }
    }
}

/// What a pre-copy round moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Device state bytes.
    pub device_bytes: u64,
    /// Guest memory bytes (dirty pages, or all of it in the first round).
    pub memory_bytes: u64,
}

/// What a migration did and how long it took.
#[derive(Clone, Debug, Default)]
pub struct MigrationReport {
    /// Pre-copy rounds, the first being the full memory copy.
    pub rounds: Vec<Round>,
    /// What moved while the device was stopped.
    pub stop_copy: Round,
    /// From the source's STOP_COPY request to the destination's RUNNING reply.
    pub downtime: Duration,
    /// From [`Migration::begin`] to the end.
    pub total: Duration,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dev: u64 = self.rounds.iter().map(|r| r.device_bytes).sum();
        let mem: u64 = self.rounds.iter().map(|r| r.memory_bytes).sum();
        write!(
            f,
            "{} pre-copy rounds ({} device bytes, {} memory bytes), stop-copy {} device bytes \
             and {} memory bytes; downtime {:.3} ms, total {:.3} ms",
            self.rounds.len(),
            dev,
            mem,
            self.stop_copy.device_bytes,
            self.stop_copy.memory_bytes,
            self.downtime.as_secs_f64() * 1e3,
            self.total.as_secs_f64() * 1e3
        )
    }
}

/// A migration in progress (see the module docs for the steps).
pub struct Migration<'m> {
    opts: MigrateOptions,
    memory: Option<&'m mut dyn MemoryCopier>,
    chunk: u32,
    precopy: bool,
    last_dirty: u64,
    started: Instant,
    report: MigrationReport,
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("precopy", &self.precopy)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

fn io_error(e: std::io::Error) -> ClientError {
    ClientError::Transport(umdev_transport::TransportError::Io(e))
}

impl<'m> Migration<'m> {
    /// Checks both ends, puts the destination in RESUMING, starts dirty logging and copies
    /// all memory, and puts the source in PRE_COPY if it has it.
    pub fn begin(
        src: &mut Client,
        dst: &mut Client,
        memory: Option<&'m mut dyn MemoryCopier>,
        opts: MigrateOptions,
    ) -> Result<Self, ClientError> {
        let started = Instant::now();
        let src_flags = src.migration_flags()?;
        let dst_flags = dst.migration_flags()?;
        if src_flags & dst_flags & wire::MIGRATION_STOP_COPY == 0 {
            return Err(ClientError::Unexpected("a device without STOP_COPY"));
        }
        let max_xfer = |c: &Client| {
            c.server_caps()
                .max_data_xfer_size_or_default()
                .saturating_sub(64)
        };
        let chunk = opts.chunk.min(max_xfer(src)).min(max_xfer(dst)).max(1);
        dst.set_mig_state(wire::DEVICE_STATE_RESUMING)?;
        let mut m = Self {
            precopy: src_flags & wire::MIGRATION_PRE_COPY != 0,
            opts,
            memory,
            chunk,
            last_dirty: u64::MAX,
            started,
            report: MigrationReport::default(),
        };
        let mut first = Round::default();
        if let Some(mem) = m.memory.as_deref_mut() {
            let ranges = mem.ranges();
            src.dma_logging_start(&ranges, DIRTY_PAGE)?;
            for (iova, len) in ranges {
                mem.copy(iova, len).map_err(io_error)?;
                first.memory_bytes += len;
            }
        }
        if m.precopy {
            src.set_mig_state(wire::DEVICE_STATE_PRE_COPY)?;
            first.device_bytes = m.pump(src, dst)?;
        }
        m.report.rounds.push(first);
        Ok(m)
    }

    /// Moves device data until the source has no more for now; returns the bytes moved.
    fn pump(&mut self, src: &mut Client, dst: &mut Client) -> Result<u64, ClientError> {
        let mut moved = 0;
        loop {
            let data = src.mig_data_read(self.chunk)?;
            if !data.is_empty() {
                dst.mig_data_write(&data)?;
            }
            moved += data.len() as u64;
            if data.len() < self.chunk as usize {
                return Ok(moved);
            }
        }
    }

    /// Copies the pages dirtied since the last report; returns the bytes copied.
    fn copy_dirty(&mut self, src: &mut Client) -> Result<u64, ClientError> {
        let Some(mem) = self.memory.as_deref_mut() else {
            return Ok(0);
        };
        let mut copied = 0;
        for (iova, len) in mem.ranges() {
            let bitmap = src.dma_logging_report(iova, len, DIRTY_PAGE)?;
            let pages = len.div_ceil(DIRTY_PAGE);
            let mut run: Option<u64> = None;
            for page in 0..=pages {
                let dirty = page < pages
                    && bitmap
                        .get(usize::try_from(page / 64).unwrap_or(usize::MAX))
                        .is_some_and(|w| w & (1 << (page % 64)) != 0);
                match (dirty, run) {
                    (true, None) => run = Some(page),
                    (false, Some(start)) => {
                        let at = iova + start * DIRTY_PAGE;
                        let n = ((page - start) * DIRTY_PAGE).min(iova + len - at);
                        mem.copy(at, n).map_err(io_error)?;
                        copied += n;
                        run = None;
                    }
                    _ => {}
                }
            }
        }
        Ok(copied)
    }

    /// One pre-copy round; `true` if another is worth doing.
    pub fn precopy_round(
        &mut self,
        src: &mut Client,
        dst: &mut Client,
    ) -> Result<bool, ClientError> {
        let mut round = Round::default();
        if self.precopy {
            round.device_bytes = self.pump(src, dst)?;
        }
        round.memory_bytes = self.copy_dirty(src)?;
        self.report.rounds.push(round);
        let shrinking = round.memory_bytes < self.last_dirty;
        self.last_dirty = round.memory_bytes;
        Ok(self.memory.is_some()
            && shrinking
            && round.memory_bytes > self.opts.target_dirty_bytes
            && self.report.rounds.len() <= self.opts.max_rounds)
    }

    /// Stops the source, moves the rest, loads and starts the destination.
    pub fn switchover(
        mut self,
        src: &mut Client,
        dst: &mut Client,
    ) -> Result<MigrationReport, ClientError> {
        let t0 = Instant::now();
        src.set_mig_state(wire::DEVICE_STATE_STOP_COPY)?;
        self.report.stop_copy.memory_bytes = self.copy_dirty(src)?;
        self.report.stop_copy.device_bytes = self.pump(src, dst)?;
        dst.set_mig_state(wire::DEVICE_STATE_STOP)?;
        dst.set_mig_state(wire::DEVICE_STATE_RUNNING)?;
        self.report.downtime = t0.elapsed();
        if self.memory.is_some() {
            src.dma_logging_stop()?;
        }
        src.set_mig_state(wire::DEVICE_STATE_STOP)?;
        self.report.total = self.started.elapsed();
        Ok(self.report)
    }
}

/// Migrates the device behind `src` to the one behind `dst` (pre-copy rounds while they
/// help, then the switch-over); `memory`, when given, is copied with the dirty log.
pub fn migrate(
    src: &mut Client,
    dst: &mut Client,
    memory: Option<&mut dyn MemoryCopier>,
    opts: MigrateOptions,
) -> Result<MigrationReport, ClientError> {
    let mut m = Migration::begin(src, dst, memory, opts)?;
    while m.precopy_round(src, dst)? {}
    m.switchover(src, dst)
}

/// Migrates the device served on socket `src` to the one served on `dst`, with no guest
/// memory (the case of `umdevctl migrate`: no VMM holds the device). The source is left
/// stopped, the destination running.
pub fn migrate_sockets(
    src: impl AsRef<Path>,
    dst: impl AsRef<Path>,
    opts: MigrateOptions,
) -> Result<MigrationReport, ClientError> {
    let mut s = Client::connect(src)?;
    let mut d = Client::connect(dst)?;
    migrate(&mut s, &mut d, None, opts)
}
