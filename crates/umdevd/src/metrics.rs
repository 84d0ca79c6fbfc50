//! The metrics endpoint: a UNIX socket (`<state_dir>/metrics.sock`, mode 0600) that answers
//! every connection with the counters of every device and process in the Prometheus text
//! format, then closes. A client that starts with an HTTP request (`curl --unix-socket`)
//! gets an HTTP/1.0 answer; one that sends nothing gets the text alone.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use umdev_core::Core;

use crate::daemon::Shared;

/// How long a connection has to say whether it speaks HTTP.
const FIRST_BYTES: Duration = Duration::from_millis(200);

/// Everything the daemon counts, as Prometheus text.
pub fn render(core: &Core, shared: &Shared) -> String {
    let mut out = String::from(umdev_server::stats::HELP);
    out.push_str(&core.metrics());
    umdev_server::stats::render_refusals("daemon", &mut out);
    if let Some(w) = shared.workers.get() {
        out.push_str(&w.process_metrics());
    }
    out
}

/// The endpoint's server.
pub struct MetricsServer {
    path: PathBuf,
    stopped: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens at `<state_dir>/metrics.sock`.
    pub fn start(core: Core, shared: Arc<Shared>) -> Result<MetricsServer> {
        let path = shared.config.state_dir().join("metrics.sock");
        let listener = umdev_transport::listen::bind(&path, &crate::serve::private_policy())
            .with_context(|| format!("listening on {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let wake = Arc::new(rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC,
        )?);
        let stopped = Arc::new(AtomicBool::new(false));
        let (w, s) = (wake.clone(), stopped.clone());
        let thread = std::thread::Builder::new()
            .name("umdev-metrics".into())
            .spawn(move || accept_loop(&listener, &w, &s, &core, &shared))
            .context("starting the metrics thread")?;
        Ok(MetricsServer {
            path,
            stopped,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops and removes the socket.
    pub fn stop(mut self) {
        self.stopped.store(true, Ordering::Release);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(
    listener: &UnixListener,
    wake: &OwnedFd,
    stopped: &AtomicBool,
    core: &Core,
    shared: &Shared,
) {
    use rustix::event::{poll, PollFd, PollFlags};
    while !stopped.load(Ordering::Acquire) {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        if let Err(e) = poll(&mut fds, None) {
            if e != rustix::io::Errno::INTR {
                tracing::error!(error = %e, "metrics socket poll failed; the endpoint stops");
                return;
            }
        }
        if stopped.load(Ordering::Acquire) {
            return;
        }
        match listener.accept() {
            Ok((s, _)) => {
                if let Err(e) = answer(s, core, shared) {
                    tracing::debug!(error = %e, "a metrics reader went early");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(error = %e, "metrics socket accept"),
        }
    }
}

fn answer(mut s: UnixStream, core: &Core, shared: &Shared) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(FIRST_BYTES))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut first = [0u8; 1024];
    let n = s.read(&mut first).unwrap_or(0);
    let text = render(core, shared);
    if first[..n].starts_with(b"GET ") {
        write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n",
            text.len()
        )?;
    }
    s.write_all(text.as_bytes())
}
