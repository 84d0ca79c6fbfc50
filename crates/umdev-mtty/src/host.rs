//! The host side of a port: a UNIX socket listener or a PTY, served by one thread per port.
//!
//! The thread polls the listener, the connection and a wake eventfd. It reads from the
//! host only while the port's receiver has room (backpressure: bytes wait in the kernel's
//! socket or PTY buffer, none is dropped) and writes while the transmit queue holds bytes.
//! The guest side writes the wake eventfd when the receiver frees room or the queue gets
//! its first byte, and [`Mtty`](crate::Mtty)'s drop writes it to stop the thread.
//!
//! Socket policy: one peer at a time; a new connection replaces the current one, so a
//! person whose terminal died can simply reconnect.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;

use crate::device::{lock, Card};

/// What the thread serves.
pub(crate) enum Endpoint {
    /// A listening socket (non-blocking).
    Listener(UnixListener),
    /// A PTY master (non-blocking); the slave stays open so the master never hangs up.
    Pty { master: OwnedFd, slave: OwnedFd },
}

/// Opens a PTY in raw mode; returns master, slave and the slave's path.
pub(crate) fn open_pty() -> Result<(OwnedFd, OwnedFd, String), Errno> {
    use rustix::fs::{open, Mode, OFlags};
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};

    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname(&master, Vec::new())?;
    let slave = open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut termios = tcgetattr(&slave)?;
    termios.make_raw();
    tcsetattr(&slave, OptionalActions::Now, &termios)?;
    rustix::fs::fcntl_setfl(&master, OFlags::NONBLOCK)?;
    Ok((master, slave, name.to_string_lossy().into_owned()))
}

/// Creates the eventfd a port's thread waits on.
pub(crate) fn wake_fd() -> Result<OwnedFd, Errno> {
    use rustix::event::{eventfd, EventfdFlags};
    eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)
}

/// Wakes a port's thread.
pub(crate) fn wake(fd: &OwnedFd) {
    if let Err(e) = rustix::io::write(fd, &1u64.to_ne_bytes()) {
        tracing::warn!(error = %e, "mtty wake failed");
    }
}

/// Starts the thread serving `port`.
pub(crate) fn spawn(
    card: Arc<Mutex<Card>>,
    port: usize,
    endpoint: Endpoint,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<Parked>> {
    let parked = match endpoint {
        Endpoint::Listener(l) => Parked {
            listener: Some(l),
            conn: None,
            slave: None,
        },
        Endpoint::Pty { master, slave } => Parked {
            listener: None,
            conn: Some(Conn {
                fd: master,
                socket: false,
                write_closed: false,
            }),
            slave: Some(slave),
        },
    };
    resume(card, port, parked, wake, stop)
}

/// Starts the thread serving `port` again with what it had when it stopped.
pub(crate) fn resume(
    card: Arc<Mutex<Card>>,
    port: usize,
    parked: Parked,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<Parked>> {
    let host = HostPort {
        card,
        port,
        wake,
        stop,
        listener: parked.listener,
        conn: parked.conn,
        slave: parked.slave,
    };
    std::thread::Builder::new()
        .name(format!("mtty-port{port}"))
        .spawn(move || host.run())
}

/// A port's host side while no thread serves it (a live upgrade): the thread returns it
/// when it stops.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) listener: Option<UnixListener>,
    pub(crate) conn: Option<Conn>,
    /// A PTY's slave side, held open so the master never hangs up.
    pub(crate) slave: Option<OwnedFd>,
}

/// The host's connection to a port: a socket peer or a PTY master.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) fd: OwnedFd,
    pub(crate) socket: bool,
    pub(crate) write_closed: bool,
}

struct HostPort {
    card: Arc<Mutex<Card>>,
    port: usize,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    listener: Option<UnixListener>,
    conn: Option<Conn>,
    slave: Option<OwnedFd>,
}

impl HostPort {
    fn run(mut self) -> Parked {
        while !self.stop.load(Ordering::Acquire) {
            if let Err(e) = self.step() {
                tracing::warn!(port = self.port, error = %e, "mtty host I/O failed");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        Parked {
            listener: self.listener,
            conn: self.conn,
            slave: self.slave,
        }
    }

    fn step(&mut self) -> Result<(), Errno> {
        let detach = lock(&self.card).ports[self.port].detach;
        if detach {
            self.detach();
            // Cleared only now: the saving side waits for it.
            lock(&self.card).ports[self.port].detach = false;
        }
        lock(&self.card).host_flush(self.port);
        let (room, tx_pending) = lock(&self.card).host_wants(self.port);
        let want_in = room > 0;
        let want_out = tx_pending && self.conn.as_ref().is_some_and(|c| !c.write_closed);

        let wake = Arc::clone(&self.wake);
        let mut fds = vec![PollFd::new(&*wake, PollFlags::IN)];
        let listener_at = self.listener.as_ref().map(|l| {
            fds.push(PollFd::new(l, PollFlags::IN));
            fds.len() - 1
        });
        let mut conn_at = None;
        if let Some(c) = &self.conn {
            let mut flags = PollFlags::empty();
            if want_in {
                flags |= PollFlags::IN;
            }
            if want_out {
                flags |= PollFlags::OUT;
            }
            // Without interest the connection stays out of the set: a hung-up peer would
            // otherwise wake poll forever while the receiver is full.
            if !flags.is_empty() {
                fds.push(PollFd::new(&c.fd, flags));
                conn_at = Some(fds.len() - 1);
            }
        }
        match poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
        let revents: Vec<PollFlags> = fds.iter().map(PollFd::revents).collect();
        drop(fds);

        if !revents[0].is_empty() {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&*self.wake, &mut b);
        }
        if listener_at.is_some_and(|i| !revents[i].is_empty()) {
            self.accept();
        }
        if let Some(i) = conn_at {
            let ev = revents[i];
            let hup = PollFlags::HUP | PollFlags::ERR;
            if want_in && ev.intersects(PollFlags::IN | hup) {
                self.read_host(room);
            }
            if want_out && ev.intersects(PollFlags::OUT | hup) {
                self.write_host();
            }
        }
        Ok(())
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(error = %e, "mtty: cannot make the connection non-blocking");
                        continue;
                    }
                    if self.conn.is_some() {
                        tracing::info!(
                            port = self.port,
                            "mtty: new connection replaces the old one"
                        );
                    }
                    self.conn = Some(Conn {
                        fd: OwnedFd::from(stream),
                        socket: true,
                        write_closed: false,
                    });
                    lock(&self.card).host_connected(self.port, true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "mtty: accept failed");
                    return;
                }
            }
        }
    }

    fn disconnect(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if conn.socket {
            lock(&self.card).host_connected(self.port, false);
        } else {
            tracing::warn!(
                port = self.port,
                "mtty: PTY failed; the port has no host side now"
            );
        }
    }

    /// Migration is saving the stopped card: the connection is shut down both ways, what
    /// the peer had sent is read to its end into the card's `host_in` (so it migrates), and
    /// the connection is dropped. The peer sees end of file after every byte the card sent,
    /// and EPIPE on its next write: it knows exactly what was taken and reconnects to the
    /// destination. A PTY has no such protocol and is left alone.
    fn detach(&mut self) {
        if !self.conn.as_ref().is_some_and(|c| c.socket) {
            return;
        }
        let Some(conn) = self.conn.take() else {
            return;
        };
        let _ = rustix::net::shutdown(&conn.fd, rustix::net::Shutdown::Both);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rustix::io::read(&conn.fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => lock(&self.card).ports[self.port].host_in.extend(&buf[..n]),
                Err(Errno::INTR) => {}
                Err(_) => break,
            }
        }
        lock(&self.card).host_connected(self.port, false);
        tracing::info!(
            port = self.port,
            "mtty: connection handed over for migration"
        );
    }

    fn read_host(&mut self, room: usize) {
        let Some(conn) = &self.conn else {
            return;
        };
        let mut buf = vec![0u8; room.min(4096)];
        match rustix::io::read(&conn.fd, &mut buf) {
            Ok(0) => self.disconnect(),
            Ok(n) => lock(&self.card).host_push(self.port, &buf[..n]),
            Err(Errno::AGAIN | Errno::INTR) => {}
            Err(e) => {
                tracing::debug!(port = self.port, error = %e, "mtty: host read failed");
                self.disconnect();
            }
        }
    }

    fn write_host(&mut self) {
        let mut buf = [0u8; 4096];
        let n = lock(&self.card).host_tx_peek(self.port, &mut buf);
        let Some(conn) = &mut self.conn else {
            return;
        };
        let written = if conn.socket {
            rustix::net::send(&conn.fd, &buf[..n], rustix::net::SendFlags::NOSIGNAL)
        } else {
            rustix::io::write(&conn.fd, &buf[..n])
        };
        match written {
            Ok(w) => lock(&self.card).host_tx_consumed(self.port, w),
            Err(Errno::AGAIN | Errno::INTR) => {}
            Err(e) => {
                // The peer stopped reading; keep reading what it sent until it hangs up.
                tracing::debug!(port = self.port, error = %e, "mtty: host write failed");
                conn.write_closed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use umdev_pci::{BarIndex, PciDevice};

    use crate::regs::*;
    use crate::{HostEndpoint, Mtty, MttyConfig};

    fn bar0() -> BarIndex {
        BarIndex::new(0).unwrap()
    }

    fn reg(m: &mut Mtty, r: u64) -> u8 {
        let mut b = [0u8];
        m.bar_read(bar0(), r, &mut b).unwrap();
        b[0]
    }

    /// Reads `n` bytes from the guest side, waiting up to 5 s for each.
    fn guest_receive(m: &mut Mtty, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < n && Instant::now() < deadline {
            if reg(m, LSR) & LSR_DR != 0 {
                out.push(reg(m, RBR_THR));
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        out
    }

    fn socket_card(dir: &tempfile::TempDir) -> (Mtty, std::path::PathBuf) {
        let path = dir.path().join("ttyS");
        let m = Mtty::new(MttyConfig::new(
            1,
            vec![HostEndpoint::UnixSocket(path.clone())],
        ))
        .unwrap();
        (m, path)
    }

    fn wait_for_dcd(m: &mut Mtty) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while reg(m, MSR) & MSR_DCD == 0 {
            assert!(Instant::now() < deadline, "peer never showed up");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn socket_text_arrives_in_rbr() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = socket_card(&dir);
        let mut peer = UnixStream::connect(path).unwrap();
        peer.write_all(b"hello, guest").unwrap();
        assert_eq!(guest_receive(&mut m, 12), b"hello, guest");
    }

    #[test]
    fn thr_bytes_arrive_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = socket_card(&dir);
        let mut peer = UnixStream::connect(path).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        wait_for_dcd(&mut m);
        m.bar_write(bar0(), RBR_THR, b"h").unwrap();
        m.bar_write(bar0(), RBR_THR, b"i").unwrap();
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[test]
    fn bytes_sent_before_connect_are_delivered_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = socket_card(&dir);
        for &b in b"early" {
            m.bar_write(bar0(), RBR_THR, &[b]).unwrap();
        }
        let mut peer = UnixStream::connect(path).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early");
    }

    #[test]
    fn full_fifo_backpressures_the_socket_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = socket_card(&dir);
        m.bar_write(bar0(), IIR_FCR, &[FCR_ENABLE_FIFO]).unwrap();
        let mut peer = UnixStream::connect(path).unwrap();
        let data: Vec<u8> = (0..2000u32).map(|i| i.to_le_bytes()[0]).collect();
        peer.write_all(&data).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(reg(&mut m, LSR) & LSR_OE, 0, "never an overrun");
        assert_eq!(guest_receive(&mut m, data.len()), data);
    }

    #[test]
    fn new_connection_replaces_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, path) = socket_card(&dir);
        let _first = UnixStream::connect(&path).unwrap();
        wait_for_dcd(&mut m);
        let mut second = UnixStream::connect(&path).unwrap();
        second.write_all(b"2").unwrap();
        assert_eq!(guest_receive(&mut m, 1), b"2");
    }

    #[test]
    fn pty_round_trip() {
        let mut m = Mtty::new(MttyConfig::new(1, vec![HostEndpoint::Pty])).unwrap();
        let path = m.host_paths()[0].clone();
        let mut tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        tty.write_all(b"abc").unwrap();
        assert_eq!(guest_receive(&mut m, 3), b"abc");
        m.bar_write(bar0(), RBR_THR, b"z").unwrap();
        let mut got = [0u8; 1];
        tty.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"z");
    }
}
