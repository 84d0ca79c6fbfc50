//! The card: its ports' UARTs and transmit queues, the interrupt line they share, and the
//! [`PciDevice`] implementation the framework drives.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use umdev_pci::{BarIndex, DeviceContext, Errno, Interrupts, IrqMode, PciDevice};

use crate::regs::Uart;
use crate::Mtty;

/// Transmit bytes kept for the host side: past this the guest sees THR busy while a peer
/// is connected (backpressure), or the oldest bytes are dropped while none is.
pub const TX_LIMIT: usize = 64 * 1024;

/// What is behind a port on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostKind {
    /// Nothing: transmitted bytes are discarded, nothing is ever received.
    None,
    /// A UNIX socket listener; a peer may or may not be connected.
    Socket,
    /// A PTY, always connected (the device holds the slave side open itself).
    Pty,
}

/// One port: its UART and the bytes on their way to the host side.
#[derive(Debug)]
pub(crate) struct Port {
    pub(crate) uart: Uart,
    pub(crate) tx: VecDeque<u8>,
    /// Bytes read from the host that the receiver has not taken yet (its room can shrink
    /// between the check and the push, and a stopped card takes none): migrated with the
    /// card, so nothing typed is lost.
    pub(crate) host_in: VecDeque<u8>,
    /// Migration asks the host thread to let go of its connection (see `state.rs`).
    pub(crate) detach: bool,
    pub(crate) kind: HostKind,
    pub(crate) connected: bool,
}

/// State shared by the guest-facing device and the host I/O threads.
#[derive(Debug)]
pub(crate) struct Card {
    pub(crate) ports: Vec<Port>,
    pub(crate) irqs: Option<Interrupts>,
    pub(crate) mode: IrqMode,
    pub(crate) level: bool,
    /// False while migration has the card stopped: no host byte enters a receiver and no
    /// transmitted byte leaves.
    pub(crate) running: bool,
}

/// Locks the card; a poisoned lock still holds consistent plain data.
pub(crate) fn lock(card: &Mutex<Card>) -> MutexGuard<'_, Card> {
    card.lock().unwrap_or_else(|e| e.into_inner())
}

impl Card {
    /// A card with one port per host kind.
    pub(crate) fn new(kinds: &[HostKind]) -> Self {
        let ports = kinds
            .iter()
            .map(|&kind| {
                let mut uart = Uart::new();
                if kind == HostKind::Pty {
                    uart.set_host_connected(true);
                    uart.reset(); // power on with the lines up and no deltas
                }
                Port {
                    uart,
                    tx: VecDeque::new(),
                    host_in: VecDeque::new(),
                    detach: false,
                    kind,
                    connected: kind == HostKind::Pty,
                }
            })
            .collect();
        Self {
            ports,
            irqs: None,
            mode: IrqMode::Intx,
            level: false,
            running: true,
        }
    }

    fn port(&mut self, port: usize) -> Result<&mut Port, Errno> {
        self.ports.get_mut(port).ok_or(Errno::INVAL)
    }

    /// A guest register read; returns the value and whether the host thread must wake.
    pub(crate) fn guest_read(&mut self, port: usize, reg: u64) -> Result<(u8, bool), Errno> {
        let p = self.port(port)?;
        let before = p.host_rx_room();
        let value = p.uart.read(reg);
        let wake = before == 0 && p.host_rx_room() > 0;
        self.update_irq();
        Ok((value, wake))
    }

    /// A guest register write; returns whether the host thread must wake.
    pub(crate) fn guest_write(&mut self, port: usize, reg: u64, val: u8) -> Result<bool, Errno> {
        let p = self.port(port)?;
        let before = p.host_rx_room();
        let mut wake = false;
        if let Some(byte) = p.uart.write(reg, val) {
            wake = p.transmit(byte);
        }
        wake |= before == 0 && p.host_rx_room() > 0;
        self.update_irq();
        Ok(wake)
    }

    /// Recomputes the card's interrupt level and drives INTx or MSI accordingly.
    pub(crate) fn update_irq(&mut self) {
        let level = self.ports.iter().any(|p| p.uart.interrupt_pending());
        if let Some(irqs) = &self.irqs {
            match self.mode {
                IrqMode::Intx if level != self.level => irqs.set_intx(level),
                IrqMode::Msi if level && !self.level => irqs.trigger_msi(0),
                _ => {}
            }
        }
        self.level = level;
    }

    /// Whether the card requests an interrupt.
    #[cfg(test)]
    pub(crate) fn level(&self) -> bool {
        self.level
    }

    fn attach(&mut self, irqs: Interrupts) {
        self.mode = irqs.mode();
        irqs.set_intx(self.level && self.mode == IrqMode::Intx);
        self.irqs = Some(irqs);
    }

    fn set_mode(&mut self, mode: IrqMode) {
        self.mode = mode;
        if let Some(irqs) = &self.irqs {
            match mode {
                IrqMode::Intx => irqs.set_intx(self.level),
                IrqMode::Msi => {
                    irqs.set_intx(false);
                    if self.level {
                        irqs.trigger_msi(0);
                    }
                }
                IrqMode::Msix => irqs.set_intx(false),
            }
        }
    }

    fn reset(&mut self) {
        for p in &mut self.ports {
            p.uart.reset();
        }
        self.update_irq();
    }

    /// The host thread's view of a port: room in RX for host bytes, and whether bytes wait
    /// to be sent.
    pub(crate) fn host_wants(&self, port: usize) -> (usize, bool) {
        if !self.running {
            return (0, false);
        }
        self.ports.get(port).map_or((0, false), |p| {
            let room = if p.host_in.is_empty() {
                p.host_rx_room()
            } else {
                0
            };
            (room, !p.tx.is_empty())
        })
    }

    /// Bytes read from the host: queued, then as many as the receiver takes moved into it.
    pub(crate) fn host_push(&mut self, port: usize, bytes: &[u8]) {
        if let Some(p) = self.ports.get_mut(port) {
            p.host_in.extend(bytes);
        }
        self.host_flush(port);
    }

    /// Moves queued host bytes into the receiver while it has room (never while stopped).
    pub(crate) fn host_flush(&mut self, port: usize) {
        if !self.running {
            return;
        }
        let Some(p) = self.ports.get_mut(port) else {
            return;
        };
        if p.host_in.is_empty() {
            return;
        }
        let (a, _) = p.host_in.as_slices();
        let n = if p.host_rx_room() > 0 {
            p.uart.push_rx(a)
        } else {
            0
        };
        p.host_in.drain(..n);
        self.update_irq();
    }

    /// A peer connected to (or left) the port's socket.
    pub(crate) fn host_connected(&mut self, port: usize, connected: bool) {
        if let Some(p) = self.ports.get_mut(port) {
            p.connected = connected;
            p.uart.set_host_connected(connected);
            if !connected {
                // Without a peer the queue drops its oldest bytes instead of blocking.
                p.uart.set_tx_blocked(false);
            }
        }
        self.update_irq();
    }

    /// Bytes from the host; returns how many the receiver took.
    #[cfg(test)]
    pub(crate) fn host_rx(&mut self, port: usize, bytes: &[u8]) -> usize {
        let n = match self.ports.get_mut(port) {
            Some(p) if p.host_rx_room() > 0 => p.uart.push_rx(bytes),
            _ => 0,
        };
        self.update_irq();
        n
    }

    /// Copies queued transmit bytes (oldest first) into `buf`; returns how many.
    pub(crate) fn host_tx_peek(&self, port: usize, buf: &mut [u8]) -> usize {
        let Some(p) = self.ports.get(port) else {
            return 0;
        };
        let mut n = 0;
        for (dst, &src) in buf.iter_mut().zip(p.tx.iter()) {
            *dst = src;
            n += 1;
        }
        n
    }

    /// The host side took `n` transmit bytes.
    pub(crate) fn host_tx_consumed(&mut self, port: usize, n: usize) {
        if let Some(p) = self.ports.get_mut(port) {
            p.tx.drain(..n.min(p.tx.len()));
            if p.tx.len() < TX_LIMIT && p.uart.tx_blocked() {
                p.uart.set_tx_blocked(false);
            }
        }
        self.update_irq();
    }
}

impl Port {
    /// Room for host bytes: none while in loopback, where the receiver hears only the
    /// port's own transmitter.
    fn host_rx_room(&self) -> usize {
        if self.uart.is_loopback() {
            0
        } else {
            self.uart.rx_room()
        }
    }

    /// Queues a transmitted byte; returns whether the host thread must wake.
    fn transmit(&mut self, byte: u8) -> bool {
        let was_empty = self.tx.is_empty();
        match (self.kind, self.connected) {
            (HostKind::None, _) => {
                self.uart.set_tx_blocked(false);
                return false;
            }
            (_, false) => {
                if self.tx.len() >= TX_LIMIT {
                    self.tx.pop_front();
                }
                self.tx.push_back(byte);
                self.uart.set_tx_blocked(false);
            }
            (_, true) => {
                // A guest ignoring THRE still gets its byte queued; the limit only bounds
                // how far past TX_LIMIT such a guest can push the queue.
                if self.tx.len() < 2 * TX_LIMIT {
                    self.tx.push_back(byte);
                } else {
                    tracing::warn!("mtty transmit queue overflow, byte dropped");
                }
                self.uart.set_tx_blocked(self.tx.len() >= TX_LIMIT);
            }
        }
        was_empty && self.connected
    }
}

impl PciDevice for Mtty {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        let port = usize::from(bar.get());
        let mut wake = false;
        {
            let mut card = lock(&self.card);
            for (reg, out) in (offset..).zip(data.iter_mut()) {
                let (value, w) = card.guest_read(port, reg)?;
                *out = value;
                wake |= w;
            }
        }
        if wake {
            self.wake(port);
        }
        Ok(())
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let port = usize::from(bar.get());
        let mut wake = false;
        {
            let mut card = lock(&self.card);
            for (reg, &value) in (offset..).zip(data) {
                wake |= card.guest_write(port, reg, value)?;
            }
        }
        if wake {
            self.wake(port);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        lock(&self.card).reset();
        for port in 0..usize::from(self.ports) {
            self.wake(port);
        }
        Ok(())
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), Errno> {
        lock(&self.card).attach(ctx.irqs);
        Ok(())
    }

    fn close(&mut self) {
        lock(&self.card).irqs = None;
    }

    fn irq_mode_changed(&mut self, mode: IrqMode) {
        lock(&self.card).set_mode(mode);
    }

    fn migration(&self) -> Option<umdev_pci::MigrationSpec> {
        Some(self.migration_spec())
    }

    fn set_running(&mut self, running: bool) -> Result<(), Errno> {
        if running {
            // Host threads parked by a hand-over that was abandoned serve again.
            self.unpark_hosts()?;
        }
        self.set_running_state(running);
        Ok(())
    }

    fn hand_over(
        &mut self,
        state: &mut umdev_pci::StateWriter,
        fds: &mut Vec<std::os::fd::OwnedFd>,
    ) -> Result<(), Errno> {
        self.hand_over_state(state, fds)
    }

    fn take_over(
        &mut self,
        state: &umdev_pci::StateReader<'_>,
        fds: &mut umdev_pci::HandedFds,
    ) -> Result<(), Errno> {
        self.take_over_state(state, fds)
    }

    fn save(&mut self, state: &mut umdev_pci::StateWriter) -> Result<(), Errno> {
        self.save_state(state)
    }

    fn load(&mut self, _version: u32, state: &umdev_pci::StateReader<'_>) -> Result<(), Errno> {
        self.load_state(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::*;
    use umdev_pci::{IrqData, PciFunction, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD};

    fn card() -> Card {
        Card::new(&[HostKind::Socket, HostKind::None])
    }

    #[test]
    fn unconnected_socket_queues_and_drops_oldest_past_limit() {
        let mut c = card();
        for i in 0..TX_LIMIT + 3 {
            c.guest_write(0, RBR_THR, u8::try_from(i % 251).unwrap())
                .unwrap();
        }
        assert_eq!(c.ports[0].tx.len(), TX_LIMIT);
        assert_eq!(c.ports[0].tx.front(), Some(&3));
        assert_ne!(
            c.ports[0].uart.lsr() & LSR_THRE,
            0,
            "never blocks without a peer"
        );
    }

    #[test]
    fn connected_peer_applies_backpressure_to_thr() {
        let mut c = card();
        c.host_connected(0, true);
        for _ in 0..TX_LIMIT {
            c.guest_write(0, RBR_THR, b'x').unwrap();
        }
        assert_eq!(c.ports[0].uart.lsr() & LSR_THRE, 0);
        c.host_tx_consumed(0, 100);
        assert_ne!(c.ports[0].uart.lsr() & LSR_THRE, 0);
    }

    #[test]
    fn no_host_discards_tx() {
        let mut c = card();
        c.guest_write(1, RBR_THR, b'x').unwrap();
        assert!(c.ports[1].tx.is_empty());
    }

    #[test]
    fn host_rx_stops_at_fifo_full_and_resumes_after_drain() {
        let mut c = card();
        c.guest_write(0, IIR_FCR, FCR_ENABLE_FIFO).unwrap();
        assert_eq!(c.host_rx(0, &[7; 20]), FIFO_SIZE);
        assert_eq!(c.host_wants(0).0, 0);
        let (_, wake) = c.guest_read(0, RBR_THR).unwrap();
        assert!(wake, "room appeared: the host thread must read again");
        assert_eq!(c.host_wants(0).0, 1);
    }

    #[test]
    fn loopback_refuses_host_bytes() {
        let mut c = card();
        c.guest_write(0, MCR, MCR_LOOP).unwrap();
        assert_eq!(c.host_rx(0, b"a"), 0);
        assert!(
            c.guest_write(0, MCR, 0).unwrap(),
            "leaving loopback wakes the host thread"
        );
    }

    #[test]
    fn level_follows_enabled_pending_interrupts() {
        let mut c = card();
        c.host_rx(0, b"a");
        assert!(!c.level(), "RDI not enabled");
        c.guest_write(0, IER, IER_RDI).unwrap();
        assert!(c.level());
        c.guest_read(0, RBR_THR).unwrap();
        assert!(!c.level());
    }

    #[test]
    fn second_port_interrupt_raises_the_shared_level() {
        let mut c = card();
        c.guest_write(1, IER, IER_THRI).unwrap();
        assert!(c.level());
        c.guest_read(1, IIR_FCR).unwrap();
        assert!(!c.level());
    }

    fn efd() -> std::os::fd::OwnedFd {
        use rustix::event::{eventfd, EventfdFlags};
        eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).unwrap()
    }

    fn take(fd: &std::os::fd::OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        rustix::io::read(fd, &mut b).map_or(0, |_| u64::from_ne_bytes(b))
    }

    struct NoDma;
    impl umdev_dma::Dma for NoDma {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), umdev_dma::DmaError> {
            Ok(())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), umdev_dma::DmaError> {
            Ok(())
        }
    }

    fn served() -> PciFunction {
        let m = Mtty::new(crate::MttyConfig::new(2, vec![])).unwrap();
        let mut f = PciFunction::new(m.spec(), Box::new(m));
        f.open(std::sync::Arc::new(NoDma)).unwrap();
        f
    }

    fn dup(fd: &std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
        rustix::io::fcntl_dupfd_cloexec(fd, 0).unwrap()
    }

    #[test]
    fn intx_signals_on_rising_level() {
        let mut f = served();
        let fd = efd();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(0, flags, 0, 1, IrqData::Eventfds(vec![dup(&fd)]))
            .unwrap();
        f.region_write(1, IER, &[IER_THRI]).unwrap();
        assert_eq!(take(&fd), 1);
        let mut iir = [0u8];
        f.region_read(1, IIR_FCR, &mut iir).unwrap();
        assert_eq!(iir[0], IIR_THRI);
        let mut status = [0u8];
        f.region_read(umdev_pci::CONFIG_REGION, 6, &mut status)
            .unwrap();
        assert_eq!(status[0] & 0x08, 0, "line lowered after IIR read");
    }

    #[test]
    fn msi_fires_once_per_rising_edge() {
        let mut f = served();
        let fd = efd();
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        f.set_irqs(1, flags, 0, 1, IrqData::Eventfds(vec![dup(&fd)]))
            .unwrap();
        f.region_write(0, IER, &[IER_THRI | IER_RDI]).unwrap();
        assert_eq!(take(&fd), 1);
        f.region_write(0, MCR, &[MCR_LOOP]).unwrap();
        f.region_write(0, RBR_THR, b"a").unwrap();
        assert_eq!(take(&fd), 0, "level was already high");
        let mut b = [0u8];
        f.region_read(0, RBR_THR, &mut b).unwrap();
        f.region_read(0, IIR_FCR, &mut b).unwrap();
        f.region_write(0, RBR_THR, b"b").unwrap();
        assert_eq!(take(&fd), 1);
    }
}
