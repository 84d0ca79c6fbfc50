//! The card's migration state: each port's registers and receive FIFO, the bytes queued
//! for the host, and the bytes read from the host that the receiver has not taken.
//!
//! Host bytes are never lost or duplicated across a migration: while the card is stopped
//! the host threads neither read nor write; the final save first has each port's thread
//! hand its socket connection over (`host.rs`, `detach`): shut down both ways, read to its
//! end into the port's `host_in`. The peer sees end of file after the last byte the card
//! sent and EPIPE on its next write, so it knows what was taken and can go on with the
//! destination's socket. A PTY's unread bytes stay in the source's PTY.
//!
//! Fields (tags): 1 = number of ports; port `p` at base `0x100 * (p + 1)`: its registers
//! (`regs.rs`, +0..+11), +0x20 the transmit queue, +0x21 the host bytes not yet received.
//! Version 1 is the only one so far.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use umdev_pci::{Errno, IrqMode, MigrationSpec, StateReader, StateWriter, StreamError};

use crate::device::{lock, HostKind, TX_LIMIT};
use crate::Mtty;

/// The state version this daemon writes (and the newest it loads).
pub const STATE_VERSION: u32 = 1;
const TAG_PORTS: u16 = 1;
const PORT_TX: u16 = 0x20;
const PORT_HOST_IN: u16 = 0x21;
/// How long the final save waits for the host threads to hand their connections over.
const DETACH_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn base(port: usize) -> u16 {
    0x100 * (u16::try_from(port).unwrap_or(0) + 1)
}

impl Mtty {
    pub(crate) fn migration_spec(&self) -> MigrationSpec {
        MigrationSpec {
            device_type: format!("mtty-{}", self.ports),
            version: STATE_VERSION,
            min_version: 1,
            flags: umdev_pci::migration::PRE_COPY,
        }
    }

    pub(crate) fn set_running_state(&mut self, running: bool) {
        lock(&self.card).running = running;
        if running {
            for port in 0..usize::from(self.ports) {
                self.wake(port);
            }
        }
    }

    /// Has every socket port's thread let go of its connection (see the module docs).
    fn detach_hosts(&self) -> Result<(), Errno> {
        let mut waiting = Vec::new();
        {
            let mut card = lock(&self.card);
            for (i, p) in card.ports.iter_mut().enumerate() {
                if p.kind == HostKind::Socket && p.connected {
                    p.detach = true;
                    waiting.push(i);
                }
            }
        }
        for &port in &waiting {
            self.wake(port);
        }
        let deadline = Instant::now() + DETACH_TIMEOUT;
        while waiting.iter().any(|&i| lock(&self.card).ports[i].detach) {
            if Instant::now() > deadline {
                tracing::warn!("mtty: host threads did not hand their connections over");
                return Err(Errno::TIMEDOUT);
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    pub(crate) fn save_state(&mut self, w: &mut StateWriter) -> Result<(), Errno> {
        if !lock(&self.card).running {
            self.detach_hosts()?;
        }
        self.write_ports(w);
        Ok(())
    }

    /// Every port's registers and queues.
    pub(crate) fn write_ports(&self, w: &mut StateWriter) {
        let card = lock(&self.card);
        w.u8(TAG_PORTS, self.ports);
        for (i, p) in card.ports.iter().enumerate() {
            let b = base(i);
            p.uart.save_state(w, b);
            let (a, c) = p.tx.as_slices();
            w.bytes(b + PORT_TX, &[a, c].concat());
            let (a, c) = p.host_in.as_slices();
            w.bytes(b + PORT_HOST_IN, &[a, c].concat());
        }
    }

    pub(crate) fn load_state(&mut self, r: &StateReader<'_>) -> Result<(), Errno> {
        if r.u8(TAG_PORTS)? != self.ports {
            return Err(StreamError::BadField {
                tag: TAG_PORTS,
                why: "port count differs",
            }
            .into());
        }
        let mut card = lock(&self.card);
        // Everything is checked before anything changes.
        let mut loaded = Vec::new();
        for (i, p) in card.ports.iter().enumerate() {
            let b = base(i);
            let uart = p.uart.load_state(r, b)?;
            let tx = r.bytes(b + PORT_TX)?;
            if tx.len() > 2 * TX_LIMIT {
                return Err(StreamError::BadField {
                    tag: b + PORT_TX,
                    why: "transmit queue too long",
                }
                .into());
            }
            let host_in = r.bytes(b + PORT_HOST_IN)?;
            loaded.push((uart, tx, host_in));
        }
        for (p, (uart, tx, host_in)) in card.ports.iter_mut().zip(loaded) {
            p.uart = uart;
            p.tx = tx.iter().copied().collect();
            p.host_in = host_in.iter().copied().collect::<VecDeque<u8>>();
            let blocked = p.connected && p.kind != HostKind::None && p.tx.len() >= TX_LIMIT;
            p.uart.set_tx_blocked(blocked);
        }
        // The interrupt line follows the loaded registers (held by the framework until the
        // card runs).
        let level = card.ports.iter().any(|p| p.uart.interrupt_pending());
        if let Some(irqs) = &card.irqs {
            match card.mode {
                IrqMode::Intx => irqs.set_intx(level),
                IrqMode::Msi if level => irqs.trigger_msi(0),
                _ => {}
            }
        }
        card.level = level;
        drop(card);
        for port in 0..usize::from(self.ports) {
            self.wake(port);
        }
        Ok(())
    }
}
