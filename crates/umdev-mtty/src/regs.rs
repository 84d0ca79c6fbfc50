//! 16550A registers and the UART state machine of one port.
//!
//! The transmitter is modelled as infinitely fast: a byte written to THR leaves at once
//! (to the host side, or to the port's own receiver in loopback), unless the host side
//! applies backpressure, in which case THR stays full until the host drains.

use std::collections::VecDeque;

/// Receiver buffer (read) / transmitter holding register (write); DLL with DLAB.
pub const RBR_THR: u64 = 0;
/// Interrupt enable register; DLM with DLAB.
pub const IER: u64 = 1;
/// Interrupt identification (read) / FIFO control (write).
pub const IIR_FCR: u64 = 2;
/// Line control register.
pub const LCR: u64 = 3;
/// Modem control register.
pub const MCR: u64 = 4;
/// Line status register.
pub const LSR: u64 = 5;
/// Modem status register.
pub const MSR: u64 = 6;
/// Scratch register.
pub const SCR: u64 = 7;

/// IER: received data available.
pub const IER_RDI: u8 = 0x01;
/// IER: transmitter holding register empty.
pub const IER_THRI: u8 = 0x02;
/// IER: receiver line status.
pub const IER_RLSI: u8 = 0x04;
/// IER: modem status.
pub const IER_MSI: u8 = 0x08;

/// IIR: no interrupt pending.
pub const IIR_NO_INT: u8 = 0x01;
/// IIR: modem status.
pub const IIR_MSI: u8 = 0x00;
/// IIR: THR empty.
pub const IIR_THRI: u8 = 0x02;
/// IIR: received data available (trigger level reached).
pub const IIR_RDI: u8 = 0x04;
/// IIR: receiver line status.
pub const IIR_RLSI: u8 = 0x06;
/// IIR: character timeout (data below the trigger level).
pub const IIR_RX_TIMEOUT: u8 = 0x0c;
/// IIR: FIFOs enabled (bits 7:6).
pub const IIR_FIFO_ENABLED: u8 = 0xc0;

/// FCR: enable FIFOs.
pub const FCR_ENABLE_FIFO: u8 = 0x01;
/// FCR: clear the receive FIFO.
pub const FCR_CLEAR_RCVR: u8 = 0x02;
/// FCR: clear the transmit FIFO.
pub const FCR_CLEAR_XMIT: u8 = 0x04;

/// LCR: divisor latch access.
pub const LCR_DLAB: u8 = 0x80;

/// MCR: data terminal ready.
pub const MCR_DTR: u8 = 0x01;
/// MCR: request to send.
pub const MCR_RTS: u8 = 0x02;
/// MCR: OUT1.
pub const MCR_OUT1: u8 = 0x04;
/// MCR: OUT2.
pub const MCR_OUT2: u8 = 0x08;
/// MCR: loopback.
pub const MCR_LOOP: u8 = 0x10;

/// LSR: data ready.
pub const LSR_DR: u8 = 0x01;
/// LSR: overrun error.
pub const LSR_OE: u8 = 0x02;
/// LSR: THR empty.
pub const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty.
pub const LSR_TEMT: u8 = 0x40;

/// MSR: delta CTS.
pub const MSR_DCTS: u8 = 0x01;
/// MSR: delta DSR.
pub const MSR_DDSR: u8 = 0x02;
/// MSR: trailing edge of RI.
pub const MSR_TERI: u8 = 0x04;
/// MSR: delta DCD.
pub const MSR_DDCD: u8 = 0x08;
/// MSR: clear to send.
pub const MSR_CTS: u8 = 0x10;
/// MSR: data set ready.
pub const MSR_DSR: u8 = 0x20;
/// MSR: ring indicator.
pub const MSR_RI: u8 = 0x40;
/// MSR: data carrier detect.
pub const MSR_DCD: u8 = 0x80;

/// Depth of the receive FIFO of a 16550A.
pub const FIFO_SIZE: usize = 16;

/// One 16550A port.
#[derive(Debug, Clone)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    rx_trigger: usize,
    rx: VecDeque<u8>,
    overrun: bool,
    thr_pending: bool,
    msr_delta: u8,
    host_connected: bool,
    tx_blocked: bool,
}

impl Default for Uart {
    fn default() -> Self {
        Self::new()
    }
}

impl Uart {
    /// A port at power-on, with no host side connected.
    pub fn new() -> Self {
        Self {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            dll: 0,
            dlm: 0,
            fifo_enabled: false,
            rx_trigger: 1,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            overrun: false,
            thr_pending: false,
            msr_delta: 0,
            host_connected: false,
            tx_blocked: false,
        }
    }

    /// Power-on register values; the host-side state (connection, backpressure) stays.
    pub fn reset(&mut self) {
        *self = Self {
            host_connected: self.host_connected,
            tx_blocked: self.tx_blocked,
            ..Self::new()
        };
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled {
            FIFO_SIZE
        } else {
            1
        }
    }

    /// How many bytes the receiver can take now.
    pub fn rx_room(&self) -> usize {
        self.rx_capacity().saturating_sub(self.rx.len())
    }

    /// Bytes waiting in the receiver.
    pub fn rx_len(&self) -> usize {
        self.rx.len()
    }

    /// Queues received bytes up to the room left; returns how many were taken.
    pub fn push_rx(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.rx_room());
        self.rx.extend(&bytes[..n]);
        n
    }

    /// Whether MCR loopback is on (the receiver hears only this port's transmitter).
    pub fn is_loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// Modem status lines (upper MSR nibble).
    fn msr_lines(&self) -> u8 {
        if self.is_loopback() {
            let m = self.mcr;
            let bit = |set: bool, b: u8| if set { b } else { 0 };
            bit(m & MCR_RTS != 0, MSR_CTS)
                | bit(m & MCR_DTR != 0, MSR_DSR)
                | bit(m & MCR_OUT1 != 0, MSR_RI)
                | bit(m & MCR_OUT2 != 0, MSR_DCD)
        } else if self.host_connected {
            MSR_CTS | MSR_DSR | MSR_DCD
        } else {
            0
        }
    }

    /// Records the deltas between the old and the current modem lines.
    fn note_msr_change(&mut self, old: u8) {
        let new = self.msr_lines();
        let changed = old ^ new;
        if changed & MSR_CTS != 0 {
            self.msr_delta |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            self.msr_delta |= MSR_DDSR;
        }
        if old & MSR_RI != 0 && new & MSR_RI == 0 {
            self.msr_delta |= MSR_TERI;
        }
        if changed & MSR_DCD != 0 {
            self.msr_delta |= MSR_DDCD;
        }
    }

    /// The host side came or went (drives CTS/DSR/DCD outside loopback).
    pub fn set_host_connected(&mut self, connected: bool) {
        let old = self.msr_lines();
        self.host_connected = connected;
        self.note_msr_change(old);
    }

    /// Host backpressure: while blocked THR reads as full. Unblocking empties THR, which
    /// raises the THR-empty interrupt.
    pub fn set_tx_blocked(&mut self, blocked: bool) {
        if !blocked {
            self.thr_pending = true;
        }
        self.tx_blocked = blocked;
    }

    /// Whether host backpressure holds THR full.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// Line status register value (reading it through [`read`](Self::read) clears OE).
    pub fn lsr(&self) -> u8 {
        let mut lsr = 0;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        if !self.tx_blocked {
            lsr |= LSR_THRE | LSR_TEMT;
        }
        lsr
    }

    /// The highest-priority enabled pending interrupt, as IIR bits 3:0.
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_RLSI != 0 && self.overrun {
            IIR_RLSI
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            // A character timeout is approximated as "data below the trigger level".
            if self.fifo_enabled && self.rx.len() < self.rx_trigger {
                IIR_RX_TIMEOUT
            } else {
                IIR_RDI
            }
        } else if self.ier & IER_THRI != 0 && self.thr_pending && !self.tx_blocked {
            IIR_THRI
        } else if self.ier & IER_MSI != 0 && self.msr_delta != 0 {
            IIR_MSI
        } else {
            IIR_NO_INT
        }
    }

    /// Whether the port requests an interrupt.
    pub fn interrupt_pending(&self) -> bool {
        self.interrupt_id() != IIR_NO_INT
    }

    /// A guest read of register `reg` (0..=7), with its side effects.
    pub fn read(&mut self, reg: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            RBR_THR if dlab => self.dll,
            RBR_THR => self.rx.pop_front().unwrap_or(0),
            IER if dlab => self.dlm,
            IER => self.ier,
            IIR_FCR => {
                let id = self.interrupt_id();
                if id == IIR_THRI {
                    self.thr_pending = false;
                }
                let fifo = if self.fifo_enabled {
                    IIR_FIFO_ENABLED
                } else {
                    0
                };
                id | fifo
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let lsr = self.lsr();
                self.overrun = false;
                lsr
            }
            MSR => {
                let msr = self.msr_lines() | self.msr_delta;
                self.msr_delta = 0;
                msr
            }
            SCR => self.scr,
            _ => 0,
        }
    }

    /// A guest write of register `reg` (0..=7). Returns a byte to transmit to the host
    /// side; the caller then reports backpressure with [`set_tx_blocked`](Self::set_tx_blocked).
    pub fn write(&mut self, reg: u64, val: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match reg {
            RBR_THR if dlab => self.dll = val,
            RBR_THR => {
                self.thr_pending = false;
                if !self.is_loopback() {
                    return Some(val);
                }
                if self.push_rx(&[val]) == 0 {
                    self.overrun = true;
                }
                self.thr_pending = true;
            }
            IER if dlab => self.dlm = val,
            IER => {
                let enabling_thri = val & IER_THRI != 0 && self.ier & IER_THRI == 0;
                self.ier = val & 0x0f;
                // A 16550 raises THRE when the interrupt is enabled while THR is empty;
                // Linux's 8250 startup tests exactly this.
                if enabling_thri && !self.tx_blocked {
                    self.thr_pending = true;
                }
            }
            IIR_FCR => self.write_fcr(val),
            LCR => self.lcr = val,
            MCR => {
                let old = self.msr_lines();
                self.mcr = val & 0x1f;
                self.note_msr_change(old);
            }
            LSR | MSR => {}
            SCR => self.scr = val,
            _ => {}
        }
        None
    }

    fn write_fcr(&mut self, val: u8) {
        let enable = val & FCR_ENABLE_FIFO != 0;
        if enable != self.fifo_enabled {
            self.rx.clear();
            self.fifo_enabled = enable;
        }
        if val & FCR_CLEAR_RCVR != 0 {
            self.rx.clear();
        }
        // FCR_CLEAR_XMIT has nothing to clear: transmitted bytes have already left.
        self.rx_trigger = match val >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        };
    }
}

/// Field tags of one port's registers, after the port's base tag (see `state.rs`).
mod tag {
    pub const IER: u16 = 0;
    pub const LCR: u16 = 1;
    pub const MCR: u16 = 2;
    pub const SCR: u16 = 3;
    pub const DLL: u16 = 4;
    pub const DLM: u16 = 5;
    pub const FIFO_ENABLED: u16 = 6;
    pub const RX_TRIGGER: u16 = 7;
    pub const RX: u16 = 8;
    pub const OVERRUN: u16 = 9;
    pub const THR_PENDING: u16 = 10;
    pub const MSR_DELTA: u16 = 11;
}

impl Uart {
    /// Writes the guest-visible registers and the receive FIFO (not the host-side
    /// connection, which belongs to each daemon's own endpoint).
    pub(crate) fn save_state(&self, w: &mut umdev_pci::StateWriter, base: u16) {
        let rx: Vec<u8> = self.rx.iter().copied().collect();
        w.u8(base + tag::IER, self.ier)
            .u8(base + tag::LCR, self.lcr)
            .u8(base + tag::MCR, self.mcr)
            .u8(base + tag::SCR, self.scr)
            .u8(base + tag::DLL, self.dll)
            .u8(base + tag::DLM, self.dlm)
            .bool(base + tag::FIFO_ENABLED, self.fifo_enabled)
            .u8(
                base + tag::RX_TRIGGER,
                u8::try_from(self.rx_trigger).unwrap_or(1),
            )
            .bytes(base + tag::RX, &rx)
            .bool(base + tag::OVERRUN, self.overrun)
            .bool(base + tag::THR_PENDING, self.thr_pending)
            .u8(base + tag::MSR_DELTA, self.msr_delta);
    }

    /// A port with the registers of `r` and this port's host-side state; checks every value
    /// a 16550A can hold.
    pub(crate) fn load_state(
        &self,
        r: &umdev_pci::StateReader<'_>,
        base: u16,
    ) -> Result<Uart, umdev_pci::StreamError> {
        let bad = |t: u16, why| umdev_pci::StreamError::BadField { tag: base + t, why };
        let fifo_enabled = r.bool(base + tag::FIFO_ENABLED)?;
        let rx_trigger = usize::from(r.u8(base + tag::RX_TRIGGER)?);
        if ![1, 4, 8, 14].contains(&rx_trigger) {
            return Err(bad(tag::RX_TRIGGER, "not a 16550A trigger level"));
        }
        let rx = r.bytes(base + tag::RX)?;
        if rx.len() > if fifo_enabled { FIFO_SIZE } else { 1 } {
            return Err(bad(tag::RX, "more bytes than the receiver holds"));
        }
        Ok(Uart {
            ier: r.u8(base + tag::IER)? & 0x0f,
            lcr: r.u8(base + tag::LCR)?,
            mcr: r.u8(base + tag::MCR)? & 0x1f,
            scr: r.u8(base + tag::SCR)?,
            dll: r.u8(base + tag::DLL)?,
            dlm: r.u8(base + tag::DLM)?,
            fifo_enabled,
            rx_trigger,
            rx: rx.iter().copied().collect(),
            overrun: r.bool(base + tag::OVERRUN)?,
            thr_pending: r.bool(base + tag::THR_PENDING)?,
            msr_delta: r.u8(base + tag::MSR_DELTA)? & 0x0f,
            host_connected: self.host_connected,
            tx_blocked: self.tx_blocked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iir(u: &mut Uart) -> u8 {
        u.read(IIR_FCR)
    }

    #[test]
    fn power_on_lsr_is_idle_transmitter() {
        let mut u = Uart::new();
        assert_eq!(u.read(LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(iir(&mut u), IIR_NO_INT);
    }

    #[test]
    fn lsr_never_reads_ff() {
        let mut u = Uart::new();
        u.write(IIR_FCR, FCR_ENABLE_FIFO);
        u.write(MCR, MCR_LOOP);
        for b in 0..20 {
            u.write(RBR_THR, b);
        }
        assert_ne!(u.read(LSR), 0xff);
    }

    #[test]
    fn divisor_latch_behind_dlab() {
        let mut u = Uart::new();
        u.write(LCR, LCR_DLAB | 0x03);
        u.write(RBR_THR, 0x0c);
        u.write(IER, 0x01);
        assert_eq!((u.read(RBR_THR), u.read(IER)), (0x0c, 0x01));
        u.write(LCR, 0x03);
        assert_eq!(u.read(IER), 0, "IER untouched by the DLM write");
    }

    #[test]
    fn enabling_thri_raises_thre_interrupt_and_iir_read_clears_it() {
        let mut u = Uart::new();
        u.write(IER, IER_THRI);
        assert_eq!(iir(&mut u), IIR_THRI);
        assert_eq!(iir(&mut u), IIR_NO_INT);
        // Linux's THRE re-assert test: disable, re-enable.
        u.write(IER, 0);
        u.write(IER, IER_THRI);
        assert_eq!(iir(&mut u), IIR_THRI);
    }

    #[test]
    fn thr_write_clears_then_reraises_thre_when_sent() {
        let mut u = Uart::new();
        u.write(IER, IER_THRI);
        assert_eq!(u.write(RBR_THR, b'x'), Some(b'x'));
        assert!(!u.interrupt_pending());
        u.set_tx_blocked(false);
        assert_eq!(iir(&mut u), IIR_THRI);
    }

    #[test]
    fn blocked_transmitter_reads_busy() {
        let mut u = Uart::new();
        u.write(IER, IER_THRI);
        u.set_tx_blocked(true);
        assert_eq!(u.read(LSR) & (LSR_THRE | LSR_TEMT), 0);
        assert!(!u.interrupt_pending());
        u.set_tx_blocked(false);
        assert_eq!(u.read(LSR) & LSR_THRE, LSR_THRE);
        assert!(u.interrupt_pending());
    }

    #[test]
    fn loopback_sends_tx_to_own_rx() {
        let mut u = Uart::new();
        u.write(MCR, MCR_LOOP);
        assert_eq!(u.write(RBR_THR, b'a'), None);
        assert_eq!(u.read(LSR) & LSR_DR, LSR_DR);
        assert_eq!(u.read(RBR_THR), b'a');
        assert_eq!(u.read(LSR) & LSR_DR, 0);
    }

    #[test]
    fn loopback_overrun_sets_oe_until_lsr_read() {
        let mut u = Uart::new();
        u.write(MCR, MCR_LOOP);
        u.write(IER, IER_RLSI);
        u.write(RBR_THR, 1);
        u.write(RBR_THR, 2);
        assert_eq!(iir(&mut u), IIR_RLSI);
        assert_eq!(u.read(LSR) & LSR_OE, LSR_OE);
        assert_eq!(u.read(LSR) & LSR_OE, 0);
        assert_eq!(u.read(RBR_THR), 1);
    }

    #[test]
    fn fifo_mode_shows_in_iir_and_holds_16() {
        let mut u = Uart::new();
        u.write(IIR_FCR, FCR_ENABLE_FIFO);
        assert_eq!(iir(&mut u), IIR_FIFO_ENABLED | IIR_NO_INT);
        assert_eq!(u.push_rx(&[0; 20]), FIFO_SIZE);
        assert_eq!(u.rx_room(), 0);
    }

    #[test]
    fn without_fifo_receiver_holds_one_byte() {
        let mut u = Uart::new();
        assert_eq!(u.push_rx(b"ab"), 1);
    }

    #[test]
    fn fcr_clear_rcvr_empties_rx() {
        let mut u = Uart::new();
        u.write(IIR_FCR, FCR_ENABLE_FIFO);
        u.push_rx(b"abc");
        u.write(IIR_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR | FCR_CLEAR_XMIT);
        assert_eq!(u.rx_len(), 0);
    }

    #[test]
    fn rx_trigger_level_selects_rdi_or_timeout() {
        let mut u = Uart::new();
        u.write(IIR_FCR, FCR_ENABLE_FIFO | 0x40); // trigger at 4
        u.write(IER, IER_RDI);
        u.push_rx(b"ab");
        assert_eq!(iir(&mut u) & 0x0f, IIR_RX_TIMEOUT);
        u.push_rx(b"cd");
        assert_eq!(iir(&mut u) & 0x0f, IIR_RDI);
    }

    #[test]
    fn interrupt_priorities() {
        let mut u = Uart::new();
        u.write(MCR, MCR_LOOP);
        u.write(IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI);
        u.write(RBR_THR, 1);
        u.write(RBR_THR, 2); // overrun
        assert_eq!(iir(&mut u), IIR_RLSI);
        u.read(LSR);
        assert_eq!(iir(&mut u), IIR_RDI);
        u.read(RBR_THR);
        assert_eq!(iir(&mut u), IIR_THRI);
        u.write(MCR, MCR_LOOP | MCR_RTS);
        assert_eq!(iir(&mut u), IIR_MSI);
        assert_eq!(u.read(MSR), MSR_CTS | MSR_DCTS);
        assert_eq!(iir(&mut u), IIR_NO_INT);
    }

    #[test]
    fn msr_reports_host_connection() {
        let mut u = Uart::new();
        assert_eq!(u.read(MSR), 0);
        u.set_host_connected(true);
        assert_eq!(
            u.read(MSR),
            MSR_CTS | MSR_DSR | MSR_DCD | MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        assert_eq!(u.read(MSR), MSR_CTS | MSR_DSR | MSR_DCD);
    }

    #[test]
    fn scratch_register_round_trips() {
        let mut u = Uart::new();
        u.write(SCR, 0x5a);
        assert_eq!(u.read(SCR), 0x5a);
    }

    #[test]
    fn reset_keeps_host_state() {
        let mut u = Uart::new();
        u.set_host_connected(true);
        u.write(IER, 0x0f);
        u.reset();
        assert_eq!(u.read(IER), 0);
        assert_eq!(u.read(MSR) & MSR_DCD, MSR_DCD);
    }
}
