//! Refusals of what a client asked or did, logged with who and why, and counted: at most
//! [`BURST`] lines per kind in each [`WINDOW`], then one line saying how many more there
//! were, so that a client cannot flood the log by being refused. The counts are kept per
//! kind for the life of the process ([`counts`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use umdev_pci::ClientId;

/// Lines per kind and window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

struct Kind {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
    total: u64,
}

static KINDS: Mutex<BTreeMap<&'static str, Kind>> = Mutex::new(BTreeMap::new());

/// Logs (rate-limited) and counts a refusal of `kind` to `client` (if known), with `why`.
pub fn refused(kind: &'static str, client: Option<&ClientId>, why: &str) {
    let now = Instant::now();
    let (log, earlier) = {
        let mut kinds = KINDS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let k = kinds.entry(kind).or_insert(Kind {
            window_start: now,
            logged: 0,
            suppressed: 0,
            total: 0,
        });
        k.total += 1;
        let mut earlier = 0;
        if now.duration_since(k.window_start) >= WINDOW {
            earlier = std::mem::take(&mut k.suppressed);
            k.window_start = now;
            k.logged = 0;
        }
        let log = k.logged < BURST;
        if log {
            k.logged += 1;
        } else {
            k.suppressed += 1;
        }
        (log, earlier)
    };
    if earlier > 0 {
        tracing::warn!(
            kind,
            count = earlier,
            "more refusals of this kind were not logged in the last window"
        );
    }
    if log {
        match client {
            Some(c) => tracing::warn!(kind, client = %c, "refused: {why}"),
            None => tracing::warn!(kind, "refused: {why}"),
        }
    }
}

/// Every kind refused so far in this process, with its count.
pub fn counts() -> Vec<(&'static str, u64)> {
    KINDS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (*k, v.total))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_counted_but_only_a_burst_is_logged() {
        for _ in 0..100 {
            refused("test-flood", None, "flooding");
        }
        let n = counts()
            .into_iter()
            .find(|(k, _)| *k == "test-flood")
            .map(|(_, n)| n);
        assert_eq!(n, Some(100));
        let kinds = KINDS.lock().unwrap();
        let k = &kinds["test-flood"];
        assert_eq!((k.logged, k.suppressed), (BURST, 100 - u64::from(BURST)));
    }
}
