//! The access gate of one mapping: counts accesses in flight and, once closed, admits none.
//!
//! Every access to a mapping's memory (a copy, a write through a [`Translation`] or a pinned
//! page) enters the gate for the duration of that one access and leaves it after. Unmap
//! closes the gate and waits until no access is in flight: from then on no access can
//! start, so the memory may go back to the client. Count and closed bit share one atomic,
//! so an access either enters before the close (and is waited for) or sees it (and fails).
//!
//! [`Translation`]: crate::Translation

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const CLOSED: u64 = 1 << 63;

#[derive(Debug, Default)]
pub(crate) struct Gate(AtomicU64);

/// One access in flight; leaves the gate when dropped.
pub(crate) struct Entered<'a>(&'a Gate);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Release);
    }
}

impl Gate {
    /// Enters, unless the gate is closed.
    pub(crate) fn enter(&self) -> Option<Entered<'_>> {
        let before = self.0.fetch_add(1, Ordering::SeqCst);
        let entered = Entered(self);
        if before & CLOSED != 0 {
            return None; // `entered` leaves again
        }
        Some(entered)
    }

    /// Closes the gate and returns once no access is in flight.
    pub(crate) fn close_and_drain(&self) {
        self.0.fetch_or(CLOSED, Ordering::SeqCst);
        // An access is one bounded copy: spin briefly, then back off.
        backoff_until(|| self.0.load(Ordering::Acquire) & !CLOSED == 0);
    }

    /// Whether the gate is closed.
    #[cfg(test)]
    pub(crate) fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire) & CLOSED != 0
    }
}

/// Accesses in flight (tests only).
#[cfg(test)]
impl Gate {
    pub(crate) fn in_flight(&self) -> u64 {
        self.0.load(Ordering::Acquire) & !CLOSED
    }
}

/// Waits until `done()`: a few spins, then yields, then sleeps growing to 1 ms.
pub(crate) fn backoff_until(mut done: impl FnMut() -> bool) {
    let mut round = 0u32;
    while !done() {
        match round {
            0..=63 => std::hint::spin_loop(),
            64..=127 => std::thread::yield_now(),
            _ => {
                let us = 10u64 << (round - 128).min(7);
                std::thread::sleep(Duration::from_micros(us));
            }
        }
        round = round.saturating_add(1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn closed_gate_admits_nothing() {
        let g = Gate::default();
        assert!(g.enter().is_some());
        g.close_and_drain();
        assert!(g.is_closed());
        assert!(g.enter().is_none());
    }

    #[test]
    fn close_waits_for_the_access_in_flight() {
        let g = Arc::new(Gate::default());
        let done = Arc::new(AtomicBool::new(false));
        let (g2, done2) = (g.clone(), done.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let _in = g2.enter().unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            done2.store(true, Ordering::SeqCst);
        });
        rx.recv().unwrap();
        g.close_and_drain();
        assert!(
            done.load(Ordering::SeqCst),
            "close returned during the access"
        );
        t.join().unwrap();
    }
}
