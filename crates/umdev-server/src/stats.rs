//! Per-device counters of a server, rendered in the Prometheus text format: connections,
//! messages and failures by command, the time each request took to answer (a histogram),
//! DMA bytes by path (messages, the client's mapped memory), dirty pages reported, the
//! client's pinned pages, resets, migration state changes and hand-overs. Everything is an atomic the session bumps as it goes; rendering reads
//! them without stopping anyone.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use umdev_dma::{AddressSpace, DmaTraffic};

/// Command numbers counted one by one (the spec's are below this).
const COMMANDS: usize = 32;
/// Latency buckets: upper bounds 1, 2, 4, ... 2^(BUCKETS-2) microseconds, then +Inf.
const BUCKETS: usize = 18;

/// The counters of one served device.
#[derive(Default)]
pub struct Stats {
    connections: AtomicU64,
    handed_over: AtomicU64,
    taken_over: AtomicU64,
    messages: [AtomicU64; COMMANDS],
    failures: [AtomicU64; COMMANDS],
    latency: [AtomicU64; BUCKETS],
    latency_sum_ns: AtomicU64,
    dma_read_bytes: AtomicU64,
    dma_write_bytes: AtomicU64,
    resets: AtomicU64,
    mig_changes: AtomicU64,
    /// Given to each client's address space: the totals outlive the clients.
    traffic: Arc<DmaTraffic>,
    space: Mutex<Option<Weak<AddressSpace>>>,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Stats {
    /// A new set of counters.
    pub fn new() -> Arc<Stats> {
        Arc::new(Stats::default())
    }

    pub(crate) fn connected(&self) {
        bump(&self.connections, 1);
    }

    pub(crate) fn handed_over(&self) {
        bump(&self.handed_over, 1);
    }

    pub(crate) fn taken_over(&self) {
        bump(&self.taken_over, 1);
    }

    /// A request of `command` answered (`ok`) after `took`.
    pub(crate) fn request(&self, command: u16, ok: bool, took: Duration) {
        let i = usize::from(command).min(COMMANDS - 1);
        bump(&self.messages[i], 1);
        if !ok {
            bump(&self.failures[i], 1);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = (0..BUCKETS - 1)
            .find(|&b| us <= 1 << b)
            .unwrap_or(BUCKETS - 1);
        bump(&self.latency[bucket], 1);
        bump(
            &self.latency_sum_ns,
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        );
        match command {
            c if c == umdev_proto::Command::DeviceReset as u16 && ok => bump(&self.resets, 1),
            _ => {}
        }
    }

    /// A migration state change the client asked for.
    pub(crate) fn mig_change(&self) {
        bump(&self.mig_changes, 1);
    }

    /// Bytes moved by DMA_READ (`read`) or DMA_WRITE messages to the client.
    pub(crate) fn dma_message(&self, write: bool, bytes: u64) {
        bump(
            if write {
                &self.dma_write_bytes
            } else {
                &self.dma_read_bytes
            },
            bytes,
        );
    }

    /// The client's address space, for its pinned pages.
    pub(crate) fn set_space(&self, space: Option<&Arc<AddressSpace>>) {
        if let Some(s) = space {
            s.count_traffic(self.traffic.clone());
        }
        *self.space.lock().unwrap_or_else(|e| e.into_inner()) = space.map(Arc::downgrade);
    }

    /// The counters as Prometheus text, each sample with `labels` (`uuid="..."` ...).
    pub fn render(&self, labels: &str, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut line = |name: &str, extra: &str, v: u64| {
            let sep = if labels.is_empty() || extra.is_empty() {
                ""
            } else {
                ","
            };
            let _ = writeln!(out, "{name}{{{labels}{sep}{extra}}} {v}");
        };
        line("umdev_connections_total", "", get(&self.connections));
        line("umdev_handed_over_total", "", get(&self.handed_over));
        line("umdev_taken_over_total", "", get(&self.taken_over));
        for (i, (m, f)) in self.messages.iter().zip(&self.failures).enumerate() {
            let (m, f) = (get(m), get(f));
            if m == 0 {
                continue;
            }
            let cmd = command_name(i);
            line("umdev_messages_total", &format!("command=\"{cmd}\""), m);
            line(
                "umdev_failed_messages_total",
                &format!("command=\"{cmd}\""),
                f,
            );
        }
        let mut cumulative = 0;
        for (b, n) in self.latency.iter().enumerate() {
            cumulative += get(n);
            let le = if b == BUCKETS - 1 {
                "+Inf".to_owned()
            } else {
                format!("{}", (1u64 << b) as f64 / 1e6)
            };
            line(
                "umdev_request_seconds_bucket",
                &format!("le=\"{le}\""),
                cumulative,
            );
        }
        line("umdev_request_seconds_count", "", cumulative);
        let t = &self.traffic;
        for (path, direction, n) in [
            ("message", "read", &self.dma_read_bytes),
            ("message", "write", &self.dma_write_bytes),
            ("mapped", "read", &t.mapped_read),
            ("mapped", "write", &t.mapped_written),
        ] {
            line(
                "umdev_dma_bytes_total",
                &format!("path=\"{path}\",direction=\"{direction}\""),
                get(n),
            );
        }
        line(
            "umdev_dirty_pages_reported_total",
            "",
            get(&t.dirty_reported),
        );
        line("umdev_resets_total", "", get(&self.resets));
        line(
            "umdev_migration_state_changes_total",
            "",
            get(&self.mig_changes),
        );
        let pinned = self
            .space
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
            .map_or(0, |s| s.pinned_pages());
        line("umdev_pinned_pages", "", pinned);
        let _ = writeln!(
            out,
            "umdev_request_seconds_sum{{{labels}}} {}",
            get(&self.latency_sum_ns) as f64 / 1e9
        );
    }
}

/// The spec's name of command `i` (its number if unknown).
fn command_name(i: usize) -> String {
    u16::try_from(i)
        .ok()
        .and_then(umdev_proto::Command::from_u16)
        .map_or_else(|| i.to_string(), |c| format!("{c:?}"))
}

/// Help and type lines for every metric, once per exposition.
pub const HELP: &str = "\
# HELP umdev_connections_total Clients that connected to the device.
# TYPE umdev_connections_total counter
# HELP umdev_handed_over_total Times the device was handed to another process (live upgrade).
# TYPE umdev_handed_over_total counter
# HELP umdev_taken_over_total Times the device was taken from another process (live upgrade).
# TYPE umdev_taken_over_total counter
# HELP umdev_messages_total Requests answered, by command.
# TYPE umdev_messages_total counter
# HELP umdev_failed_messages_total Requests answered with an error, by command.
# TYPE umdev_failed_messages_total counter
# HELP umdev_request_seconds Time from a request's arrival to its answer.
# TYPE umdev_request_seconds histogram
# HELP umdev_dma_bytes_total Bytes the device read or wrote in its client's memory, by path: DMA_READ and DMA_WRITE messages, or copies through the client's mapped memory (pinned pages are touched directly and not counted).
# TYPE umdev_dma_bytes_total counter
# HELP umdev_dirty_pages_reported_total Pages reported dirty to the client (DMA_UNMAP and dirty-page bitmaps).
# TYPE umdev_dirty_pages_reported_total counter
# HELP umdev_resets_total DEVICE_RESETs the clients asked for.
# TYPE umdev_resets_total counter
# HELP umdev_migration_state_changes_total Migration state changes the clients asked for.
# TYPE umdev_migration_state_changes_total counter
# HELP umdev_pinned_pages Pages the device pins in its client's memory now.
# TYPE umdev_pinned_pages gauge
# HELP umdev_refusals_total Refusals of what a client asked or did, by kind, per process.
# TYPE umdev_refusals_total counter
# HELP umdev_worker_restarts_total Times a device's worker died and was started again.
# TYPE umdev_worker_restarts_total counter
";

/// This process's refusal counts (see [`crate::refusals`]) as Prometheus text.
pub fn render_refusals(process: &str, out: &mut String) {
    for (kind, n) in crate::refusals::counts() {
        let _ = writeln!(
            out,
            "umdev_refusals_total{{process=\"{process}\",kind=\"{kind}\"}} {n}"
        );
    }
}
