//! A device's work context: threads owned by the framework (one by default, as many as the
//! device's spec declares), on which the device does its DMA and anything slow. With one
//! thread jobs run in submission order; with more they run concurrently (a device that
//! keeps many transfers in flight: each message-based DMA waits a round trip).
//!
//! Why the framework owns it: a device hook runs on the session thread, in the middle of a
//! client request. Message-based DMA (guest memory the client did not share) is answered by
//! the client's main loop, which QEMU holds while a vCPU waits for the reply to that very
//! request: DMA from a hook deadlocks the client. Work submitted here runs on the device's
//! own thread instead, and the framework keeps it in step with the client:
//!
//! - before a migration stop (`set_running(false)`), the queue is drained, then held: work
//!   submitted while the device is stopped runs when it runs again;
//! - before a DMA_UNMAP is answered, the queue is drained, so no work of the device is still
//!   touching the range when the client reuses it;
//! - when the client goes, the queue is drained before the device's `close`, and work
//!   submitted after that is refused (ESHUTDOWN) until the next client attaches.
//!
//! While the session thread waits for the queue, it keeps answering the replies to the
//! device's DMA messages (the server installs a [`Pump`]), so work that does message-based
//! DMA finishes instead of waiting for a thread that waits for it.
//!
//! Threads are started as submissions need them and end when the client goes, so a device
//! that never submits work costs no thread.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::io::Errno;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// What the session thread does while it waits for the device's work: reads and dispatches
/// what the client sent for at most the given time (replies to the device's DMA requests go
/// to the work that waits for them; commands are kept for later, in order).
pub type Pump = Arc<dyn Fn(Duration) + Send + Sync>;

/// How long one wait for the queue lasts before the session thread pumps again.
const PUMP_SLICE: Duration = Duration::from_millis(1);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Jobs running on the threads.
    busy: usize,
    /// Threads waiting for the queue to drain ([`Work::draining`]).
    draining: usize,
    /// Jobs are queued but not started (the device is stopped).
    held: bool,
    /// No client: submissions are refused.
    closed: bool,
    /// The threads should end once the queue is empty.
    exit: bool,
    threads: Vec<JoinHandle<()>>,
}

impl State {
    fn idle(&self) -> bool {
        self.busy == 0 && (self.queue.is_empty() || self.held)
    }
}

struct Inner {
    state: Mutex<State>,
    /// What a thread waiting for the queue runs between short waits (the session thread
    /// reading the client's replies); set by the server.
    pump: Mutex<Option<Pump>>,
    /// Signalled when a job is queued, when the queue is released, and when it goes idle.
    changed: Condvar,
    name: String,
    /// Most threads.
    max_threads: usize,
}

/// A handle on a device's work context, given to the device in its
/// [`DeviceContext`](crate::DeviceContext). Cheap to clone.
#[derive(Clone)]
pub struct Work {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Work")
            .field("name", &self.inner.name)
            .field("queued", &st.queue.len())
            .field("busy", &st.busy)
            .field("held", &st.held)
            .field("closed", &st.closed)
            .finish()
    }
}

impl Work {
    /// A work context of up to `threads` threads called `name`; closed until
    /// [`open`](Self::open).
    pub(crate) fn new(name: &str, threads: usize) -> Work {
        Work {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    closed: true,
                    ..State::default()
                }),
                changed: Condvar::new(),
                pump: Mutex::new(None),
                name: name.to_owned(),
                max_threads: threads.max(1),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`. With one thread it runs after every job submitted before it; with
    /// more it starts in submission order and may run beside other jobs.
    ///
    /// ESHUTDOWN when no client is attached (the device is being closed, or was never
    /// opened); EAGAIN if no thread can be started.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> Result<(), Errno> {
        let mut st = self.lock();
        if st.closed {
            return Err(Errno::SHUTDOWN);
        }
        // A thread more when every thread is busy (or there is none yet), up to the limit.
        let waiting = st.queue.len() + st.busy;
        if st.threads.len() < self.inner.max_threads && waiting >= st.threads.len() {
            let me = self.clone();
            match std::thread::Builder::new()
                .name(self.inner.name.clone())
                .spawn(move || me.run())
            {
                Ok(t) => st.threads.push(t),
                Err(e) if st.threads.is_empty() => {
                    tracing::warn!(error = %e, "cannot start a device's work thread");
                    return Err(Errno::AGAIN);
                }
                Err(e) => tracing::debug!(error = %e, "no further work thread for now"),
            }
        }
        st.queue.push_back(Box::new(job));
        self.inner.changed.notify_one();
        Ok(())
    }

    /// Whether the framework is waiting for this context to drain (before an unmap reply,
    /// a migration stop, a close). A job that loops (a poller) checks it and returns soon,
    /// leaving the device so that it is woken again when there is new work.
    pub fn draining(&self) -> bool {
        self.lock().draining > 0
    }

    /// Whether the calling thread is one of this context's own threads (a job that asks to
    /// wait for the queue would wait for itself).
    fn on_own_thread(&self) -> bool {
        let me = std::thread::current().id();
        self.lock().threads.iter().any(|t| t.thread().id() == me)
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            if !st.held {
                if let Some(job) = st.queue.pop_front() {
                    st.busy += 1;
                    drop(st);
                    // A panicking job must not take the device's queue down with it.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                        tracing::error!(thread = self.inner.name, "a device's work job panicked");
                    }
                    st = self.lock();
                    st.busy -= 1;
                    self.inner.changed.notify_all();
                    continue;
                }
            }
            if st.exit && (st.queue.is_empty() || st.held) {
                return;
            }
            st = self
                .inner
                .changed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sets what a thread waiting for the queue runs between short waits.
    pub(crate) fn set_pump(&self, pump: Option<Pump>) {
        *self.inner.pump.lock().unwrap_or_else(|e| e.into_inner()) = pump;
    }

    /// Waits until no job runs and none is waiting to (held jobs excepted), reading the
    /// client's replies meanwhile when called on the session thread. A device calls it from
    /// a hook that must not go on while its work runs (a controller reset); the framework
    /// calls it before an unmap reply, a migration stop and a close. Not from a job: it
    /// would wait for itself (refused, with an error log).
    pub fn wait_idle(&self) {
        let pump = self
            .inner
            .pump
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.drain(pump.as_ref());
    }

    /// Waits until no job runs and none is waiting to (held jobs excepted), calling `pump`
    /// between short waits if given.
    pub(crate) fn drain(&self, pump: Option<&Pump>) {
        if self.on_own_thread() {
            tracing::error!("a device's work waited for its own queue; not waiting");
            return;
        }
        let mut st = self.lock();
        st.draining += 1;
        while !st.idle() {
            match pump {
                Some(pump) => {
                    drop(st);
                    pump(PUMP_SLICE);
                    st = self.lock();
                }
                None => {
                    st = self
                        .inner
                        .changed
                        .wait(st)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        st.draining -= 1;
    }

    /// Drains, then holds what is submitted later until [`release`](Self::release).
    pub(crate) fn hold(&self) {
        self.wait_idle();
        self.lock().held = true;
    }

    /// Runs held jobs again.
    pub(crate) fn release(&self) {
        self.lock().held = false;
        self.inner.changed.notify_all();
    }

    /// A client attached: submissions are taken.
    pub(crate) fn open(&self) {
        let mut st = self.lock();
        st.closed = false;
        st.exit = false;
    }

    /// The client has gone: runs what is queued (unless held), refuses new work, and ends
    /// the thread. Held jobs are dropped: they were for the client that left. Whether the
    /// queue is held stays as it is (a stopped device stays stopped for the next client).
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wait_idle();
        let threads = {
            let mut st = self.lock();
            st.exit = true;
            st.queue.clear();
            self.inner.changed.notify_all();
            std::mem::take(&mut st.threads)
        };
        for t in threads {
            if t.thread().id() != std::thread::current().id() && t.join().is_err() {
                tracing::error!("a device's work thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn opened() -> Work {
        let w = Work::new("test-work", 1);
        w.open();
        w
    }

    #[test]
    fn jobs_run_in_submission_order_on_one_thread() {
        let w = opened();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..50 {
            let seen = seen.clone();
            w.submit(move || {
                let name = std::thread::current().name().map(str::to_owned);
                seen.lock().unwrap().push((i, name));
            })
            .unwrap();
        }
        w.drain(None);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 50);
        for (n, (i, name)) in seen.iter().enumerate() {
            assert_eq!(*i, n);
            assert_eq!(name.as_deref(), Some("test-work"));
        }
    }

    #[test]
    fn a_closed_context_refuses_work() {
        let w = Work::new("test-work", 1);
        assert_eq!(w.submit(|| {}), Err(Errno::SHUTDOWN));
        w.open();
        w.submit(|| {}).unwrap();
        w.close();
        assert_eq!(w.submit(|| {}), Err(Errno::SHUTDOWN));
        w.open();
        w.submit(|| {}).unwrap();
        w.close();
    }

    #[test]
    fn close_runs_what_was_queued_first() {
        let w = opened();
        let n = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let n = n.clone();
            w.submit(move || {
                std::thread::sleep(Duration::from_millis(2));
                n.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        w.close();
        assert_eq!(n.load(Ordering::SeqCst), 10);
    }

    #[test]
    fn held_jobs_wait_for_release() {
        let w = opened();
        w.hold();
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        w.submit(move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        // Held work does not count as pending: a drain returns at once.
        w.drain(None);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(n.load(Ordering::SeqCst), 0);
        w.release();
        w.drain(None);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        w.close();
    }

    #[test]
    fn drain_calls_the_pump_while_work_runs() {
        let w = opened();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        w.submit(move || {
            // Waits for something only the draining thread's pump delivers.
            let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
        })
        .unwrap();
        let pumped = Arc::new(AtomicUsize::new(0));
        let p = pumped.clone();
        let tx = Mutex::new(tx);
        let pump: Pump = Arc::new(move |_| {
            p.fetch_add(1, Ordering::SeqCst);
            let _ = tx.lock().unwrap().send(());
        });
        let t0 = std::time::Instant::now();
        w.drain(Some(&pump));
        assert!(pumped.load(Ordering::SeqCst) >= 1);
        assert!(t0.elapsed() < Duration::from_secs(4));
        w.close();
    }

    #[test]
    fn several_threads_run_jobs_side_by_side_and_drain_waits_for_all() {
        let w = Work::new("test-work", 4);
        w.open();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let done = Arc::new(AtomicUsize::new(0));
        // Four jobs that each wait for a token: only side by side can all four start.
        for _ in 0..4 {
            let (rx, done) = (rx.clone(), done.clone());
            w.submit(move || {
                let _ = rx.lock().unwrap().recv_timeout(Duration::from_secs(5));
                done.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(w.lock().busy >= 1);
        for _ in 0..4 {
            tx.send(()).unwrap();
        }
        w.drain(None);
        assert_eq!(done.load(Ordering::SeqCst), 4);
        assert!(w.lock().threads.len() <= 4);
        w.close();
    }

    #[test]
    fn a_panicking_job_does_not_stop_the_queue() {
        let w = opened();
        w.submit(|| panic!("job failed")).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        w.submit(move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        w.close();
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
