//! Live upgrade of a card: its registers and queues, and each port's host side as it is,
//! the same connection, so a person typing at the console never notices.
//!
//! `hand_over` parks every host thread (each returns its listener, connection and PTY
//! slave) and writes the ports' state with duplicates of the connections' fds; the
//! listening sockets travel with the device's environment (`DeviceEnv::bind`). If the
//! upgrade is abandoned, `set_running(true)` starts the parked threads again. `take_over`
//! parks the new card's threads, gives each port the connection (and, for a PTY, the
//! master and slave, dropping the PTY the build opened), loads the registers and starts
//! the threads again; they do no I/O until the card runs.
//!
//! Fields beside the migration state's (port base `0x100 * (p + 1)`): +0x22 the
//! connection's fd, +0x23 whether it is a socket, +0x24 a PTY slave's fd, +0x25 the PTY's
//! path, +0x26 the peer stopped reading.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use umdev_pci::{push_fd, Errno, HandedFds, StateReader, StateWriter};

use crate::device::lock;
use crate::host::{self, Conn};
use crate::state::base;
use crate::Mtty;

const PORT_CONN: u16 = 0x22;
const PORT_CONN_SOCKET: u16 = 0x23;
const PORT_SLAVE: u16 = 0x24;
const PORT_PTY_PATH: u16 = 0x25;
const PORT_WRITE_CLOSED: u16 = 0x26;

fn dup(fd: &OwnedFd) -> Result<OwnedFd, Errno> {
    fd.try_clone()
        .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))
}

impl Mtty {
    /// Stops every host thread, keeping what it holds.
    fn park_hosts(&mut self) -> Result<(), Errno> {
        if self.threads.iter().all(Option::is_none) {
            return Ok(());
        }
        self.stop.store(true, Ordering::Release);
        for port in 0..self.wakers.len() {
            self.wake(port);
        }
        let mut result = Ok(());
        for (port, t) in self.threads.iter_mut().enumerate() {
            if let Some(t) = t.take() {
                match t.join() {
                    Ok(p) => self.parked[port] = Some(p),
                    Err(_) => {
                        tracing::error!(port, "mtty host thread panicked");
                        result = Err(Errno::IO);
                    }
                }
            }
        }
        self.stop.store(false, Ordering::Release);
        result
    }

    /// Starts the parked host threads again.
    pub(crate) fn unpark_hosts(&mut self) -> Result<(), Errno> {
        for port in 0..self.parked.len() {
            let Some(p) = self.parked[port].take() else {
                continue;
            };
            let Some(Some(wake)) = self.wakers.get(port).cloned() else {
                continue;
            };
            let t = host::resume(
                Arc::clone(&self.card),
                port,
                p,
                wake,
                Arc::clone(&self.stop),
            )
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::AGAIN))?;
            self.threads[port] = Some(t);
        }
        Ok(())
    }

    pub(crate) fn hand_over_state(
        &mut self,
        w: &mut StateWriter,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<(), Errno> {
        self.park_hosts()?;
        self.write_ports(w);
        for (port, parked) in self.parked.iter().enumerate() {
            let b = base(port);
            let Some(p) = parked else {
                continue;
            };
            if let Some(c) = &p.conn {
                w.u32(b + PORT_CONN, push_fd(fds, dup(&c.fd)?));
                w.bool(b + PORT_CONN_SOCKET, c.socket);
                w.bool(b + PORT_WRITE_CLOSED, c.write_closed);
            }
            if let Some(s) = &p.slave {
                w.u32(b + PORT_SLAVE, push_fd(fds, dup(s)?));
                let path = self.host_paths.get(port).cloned().unwrap_or_default();
                let shown = lock_paths(self).get(port).cloned().unwrap_or(path);
                w.bytes(b + PORT_PTY_PATH, shown.as_bytes());
            }
        }
        Ok(())
    }

    pub(crate) fn take_over_state(
        &mut self,
        r: &StateReader<'_>,
        fds: &mut HandedFds,
    ) -> Result<(), Errno> {
        self.park_hosts()?;
        for port in 0..usize::from(self.ports) {
            let b = base(port);
            let Some(Some(parked)) = self.parked.get_mut(port) else {
                continue;
            };
            if let Ok(n) = r.u32(b + PORT_CONN) {
                let socket = r.bool(b + PORT_CONN_SOCKET)?;
                parked.conn = Some(Conn {
                    fd: fds.take(n)?,
                    socket,
                    write_closed: r.bool(b + PORT_WRITE_CLOSED).unwrap_or(false),
                });
                if socket {
                    lock(&self.card).host_connected(port, true);
                }
            }
            if let Ok(n) = r.u32(b + PORT_SLAVE) {
                parked.slave = Some(fds.take(n)?);
                let path = String::from_utf8_lossy(r.bytes(b + PORT_PTY_PATH)?).into_owned();
                if let Some(p) = lock_paths(self).get_mut(port) {
                    *p = path;
                }
            }
        }
        self.load_state(r)?;
        self.unpark_hosts()
    }
}

fn lock_paths(m: &Mtty) -> std::sync::MutexGuard<'_, Vec<String>> {
    m.shown_paths
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
