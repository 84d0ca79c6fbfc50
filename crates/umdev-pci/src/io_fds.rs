//! ioeventfds (DEVICE_GET_REGION_IO_FDS): spans of a BAR whose writes a client may turn
//! into eventfd signals (with KVM, `KVM_IOEVENTFD`: the guest's write never leaves the
//! kernel) instead of REGION_WRITE messages.
//!
//! A device names the spans ([`PciDevice::io_fds`](crate::PciDevice::io_fds)) with what to
//! do when one is signalled; the function makes an eventfd per span, hands the client a
//! duplicate of each, and watches them on a thread of its own, calling the span's
//! [`IoFdSpec::notify`] there (never on the session thread, never under the device's
//! lock). The written value does not travel: a device uses ioeventfds where it learns the
//! value another way (NVMe's shadow doorbells) or where the write itself is the message.
//! The watcher stops, and the eventfds go, when the client asks again for the region, when
//! the client goes and with the function.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;

/// What is called when a span's eventfd is signalled: the number of writes since the last
/// call (the eventfd's counter). It runs on the watcher thread and must not block for
/// long: wake the device's work (submit a job), do not do it.
pub type IoNotify = Arc<dyn Fn(u64) + Send + Sync>;

/// A span of a BAR a client may write through an ioeventfd.
#[derive(Clone)]
pub struct IoFdSpec {
    /// Offset of the span in the BAR.
    pub offset: u64,
    /// Its size: the width of the writes that signal (1, 2, 4 or 8; 0: any width).
    pub size: u64,
    /// Signal only for writes of this value (`KVM_IOEVENTFD_FLAG_DATAMATCH`).
    pub datamatch: Option<u64>,
    /// What to do when it is signalled.
    pub notify: IoNotify,
}

impl std::fmt::Debug for IoFdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoFdSpec")
            .field("offset", &self.offset)
            .field("size", &self.size)
            .field("datamatch", &self.datamatch)
            .finish_non_exhaustive()
    }
}

/// A span as the client gets it: the spec's numbers and the eventfd to signal.
#[derive(Debug)]
pub struct IoFdArea {
    /// Offset in the region.
    pub offset: u64,
    /// Size.
    pub size: u64,
    /// Datamatch value, if any.
    pub datamatch: Option<u64>,
    /// A duplicate of the eventfd the function watches.
    pub fd: OwnedFd,
}

/// The eventfds of one region and the thread that watches them.
pub(crate) struct Watcher {
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    /// The spans with a duplicate of each eventfd (for a hand-over).
    areas: Vec<IoFdArea>,
}

impl Watcher {
    /// Makes an eventfd per span and starts watching them; returns the client's
    /// duplicates in the same order.
    pub(crate) fn start(
        name: &str,
        specs: Vec<IoFdSpec>,
    ) -> Result<(Watcher, Vec<IoFdArea>), Errno> {
        let flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
        let mut watched = Vec::with_capacity(specs.len());
        for s in specs {
            watched.push((s, eventfd(0, flags)?));
        }
        let watcher = Watcher::resume(name, watched)?;
        let areas = watcher
            .areas
            .iter()
            .map(|a| {
                Ok(IoFdArea {
                    offset: a.offset,
                    size: a.size,
                    datamatch: a.datamatch,
                    fd: rustix::io::fcntl_dupfd_cloexec(&a.fd, 0)?,
                })
            })
            .collect::<Result<Vec<_>, Errno>>()?;
        Ok((watcher, areas))
    }

    /// Watches eventfds a client already has (handed over from another process).
    pub(crate) fn resume(name: &str, watched: Vec<(IoFdSpec, OwnedFd)>) -> Result<Watcher, Errno> {
        let flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
        let stop = Arc::new(eventfd(0, flags)?);
        let mut areas = Vec::with_capacity(watched.len());
        let mut fds = Vec::with_capacity(watched.len());
        for (s, fd) in watched {
            areas.push(IoFdArea {
                offset: s.offset,
                size: s.size,
                datamatch: s.datamatch,
                fd: rustix::io::fcntl_dupfd_cloexec(&fd, 0)?,
            });
            fds.push((fd, s.notify));
        }
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-iofd"))
            .spawn(move || watch(&stop2, &fds))
            .map_err(|_| Errno::AGAIN)?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
            areas,
        })
    }

    /// Stops watching; returns the spans, each with a duplicate of its eventfd.
    pub(crate) fn into_areas(mut self) -> Vec<IoFdArea> {
        std::mem::take(&mut self.areas)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = rustix::io::write(self.stop.as_fd(), &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads an eventfd's counter (0 when it was not signalled).
fn take(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => 0,
    }
}

fn watch(stop: &OwnedFd, watched: &[(OwnedFd, IoNotify)]) {
    loop {
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(watched.len() + 1);
        fds.push(PollFd::new(stop, PollFlags::IN));
        fds.extend(watched.iter().map(|(fd, _)| PollFd::new(fd, PollFlags::IN)));
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "ioeventfd watcher: poll failed; stopping");
                return;
            }
        }
        let ready: Vec<bool> = fds.iter().map(|p| !p.revents().is_empty()).collect();
        drop(fds);
        if ready[0] {
            return;
        }
        for ((fd, notify), r) in watched.iter().zip(&ready[1..]) {
            if *r {
                let n = take(fd);
                if n > 0 {
                    notify(n);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn a_signal_calls_its_spans_notify_with_the_count_and_drop_stops_the_thread() {
        let hits: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let specs = hits
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let h = Arc::clone(h);
                IoFdSpec {
                    offset: 0x1000 + 8 * i as u64,
                    size: 4,
                    datamatch: None,
                    notify: Arc::new(move |n| {
                        h.fetch_add(n, Ordering::SeqCst);
                    }),
                }
            })
            .collect();
        let (w, areas) = Watcher::start("t", specs).unwrap();
        assert_eq!(areas.len(), 3);
        assert_eq!(areas[2].offset, 0x1010);
        rustix::io::write(&areas[1].fd, &3u64.to_ne_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while hits[1].load(Ordering::SeqCst) < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(hits[1].load(Ordering::SeqCst), 3);
        assert_eq!(hits[0].load(Ordering::SeqCst), 0);
        drop(w);
        // The watcher is gone: a signal now reaches nobody.
        rustix::io::write(&areas[0].fd, &1u64.to_ne_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(hits[0].load(Ordering::SeqCst), 0);
    }
}
