//! Interrupt delivery through the client's eventfds, with vfio semantics: SET_IRQS
//! validation, the interrupt mode, the automasked INTx line and MSI-X masking.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::DeviceError;
use crate::msix::MsixTable;
use crate::IrqIndex;

// The VFIO flag values are the codec's; the device model re-exports them so that a parent
// driver needs one crate only.
pub use umdev_proto::wire::{
    IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};
use umdev_proto::wire::{IRQ_SET_ACTION_MASK_ALL as ACTION_MASK, IRQ_SET_DATA_MASK as DATA_MASK};

/// The data of a SET_IRQS request.
#[derive(Debug)]
pub enum IrqData {
    /// `IRQ_SET_DATA_NONE`.
    None,
    /// `IRQ_SET_DATA_BOOL`: one byte per vector, non-zero meaning true.
    Bool(Vec<u8>),
    /// `IRQ_SET_DATA_EVENTFD`: one eventfd per vector, or none to de-assign the vectors.
    Eventfds(Vec<OwnedFd>),
}

/// How the function currently interrupts, as decided by the client through SET_IRQS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// The level-triggered INTx line (also the mode when nothing is armed).
    Intx,
    /// MSI vectors.
    Msi,
    /// MSI-X vectors.
    Msix,
}

#[derive(Debug)]
pub(crate) struct IrqState {
    pub(crate) mode: IrqMode,
    /// Eventfd slots per [`IrqIndex`], sized by the spec.
    pub(crate) fds: [Vec<Option<OwnedFd>>; 5],
    pub(crate) intx_level: bool,
    pub(crate) intx_masked: bool,
    /// Command register bit 10.
    pub(crate) intx_disabled: bool,
    pub(crate) msix: MsixTable,
    /// Migration gate: while the device is stopped nothing is signalled; INTx keeps its
    /// level, MSI vectors are held here and MSI-X ones in the PBA, all delivered on resume.
    gated: bool,
    pub(crate) held_msi: Vec<bool>,
}

/// Cheap clonable handle to the function's interrupts (an `Arc` inside).
///
/// It is `Send + Sync`: a device keeps it from [`DeviceContext`](crate::DeviceContext) and
/// may raise interrupts from its own threads. Nothing here calls back into the device.
#[derive(Clone)]
pub struct Interrupts {
    inner: Arc<Mutex<IrqState>>,
}

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts")
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

fn signal(fd: &OwnedFd) {
    if let Err(e) = rustix::io::write(fd, &1u64.to_ne_bytes()) {
        tracing::warn!(error = %e, "eventfd signal failed");
    }
}

fn slots(n: u32) -> Vec<Option<OwnedFd>> {
    (0..n).map(|_| None).collect()
}

impl Interrupts {
    /// Interrupts with `counts[i]` vectors for IRQ index `i` and an MSI-X table of
    /// `counts[Msix]` vectors.
    pub(crate) fn new(counts: [u32; 5]) -> Self {
        let state = IrqState {
            mode: IrqMode::Intx,
            fds: counts.map(slots),
            intx_level: false,
            intx_masked: false,
            intx_disabled: false,
            msix: MsixTable::new(counts[IrqIndex::Msix as usize]),
            gated: false,
            held_msi: vec![false; counts[IrqIndex::Msi as usize] as usize],
        };
        Self {
            inner: Arc::new(Mutex::new(state)),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, IrqState> {
        // A panic elsewhere while holding the lock leaves consistent plain data behind.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current interrupt mode.
    pub fn mode(&self) -> IrqMode {
        self.lock().mode
    }

    /// Drives the INTx line: `true` asserts it, `false` lowers it.
    ///
    /// Asserting while the line is unmasked, the mode is INTx and the command register's
    /// INTx-disable bit is clear signals the INTx eventfd once and masks the line (vfio
    /// automask); the client unmasks it after its guest has serviced the interrupt.
    pub fn set_intx(&self, asserted: bool) {
        let mut s = self.lock();
        s.intx_level = asserted;
        s.intx_update();
    }

    /// Triggers MSI `vector` (ignored unless the mode is MSI).
    pub fn trigger_msi(&self, vector: u32) {
        let mut s = self.lock();
        if vector as usize >= s.fds[IrqIndex::Msi as usize].len() {
            tracing::warn!(vector, "MSI vector out of range");
            return;
        }
        if s.mode == IrqMode::Msi {
            if s.gated {
                if let Some(h) = s.held_msi.get_mut(vector as usize) {
                    *h = true;
                }
            } else {
                s.signal(IrqIndex::Msi, vector as usize);
            }
        }
    }

    /// Triggers MSI-X `vector`; a masked vector gets its pending bit set instead and is
    /// delivered when unmasked. Ignored unless the mode is MSI-X.
    pub fn trigger_msix(&self, vector: u32) {
        let mut s = self.lock();
        let v = vector as usize;
        if v >= s.fds[IrqIndex::Msix as usize].len() {
            tracing::warn!(vector, "MSI-X vector out of range");
            return;
        }
        if s.mode != IrqMode::Msix {
            return;
        }
        if s.msix.is_masked(v) || s.gated {
            s.msix.set_pending(v);
        } else if let Some(fd) = &s.fds[IrqIndex::Msix as usize][v] {
            signal(fd);
        }
    }

    /// Closes (`true`) or opens the migration gate: while closed, INTx, MSI and MSI-X are
    /// held instead of signalled; opening it delivers what was held.
    pub(crate) fn set_gated(&self, gated: bool) {
        let mut s = self.lock();
        s.gated = gated;
        if gated {
            return;
        }
        let held: Vec<usize> = s
            .held_msi
            .iter_mut()
            .enumerate()
            .filter_map(|(v, h)| std::mem::take(h).then_some(v))
            .collect();
        if s.mode == IrqMode::Msi {
            for v in held {
                s.signal(IrqIndex::Msi, v);
            }
        }
        s.intx_update();
        s.msix_deliver_pending();
    }

    /// Signals the error (ERR) eventfd, if set.
    pub fn signal_err(&self) {
        self.lock().signal(IrqIndex::Err, 0);
    }

    /// Signals the device-request (REQ) eventfd, if set: asks the client to release the device.
    pub fn signal_req(&self) {
        self.lock().signal(IrqIndex::Req, 0);
    }
}

impl IrqState {
    pub(crate) fn count(&self, index: IrqIndex) -> u32 {
        u32::try_from(self.fds[index as usize].len()).unwrap_or(u32::MAX)
    }

    fn signal(&self, index: IrqIndex, vector: usize) {
        if let Some(Some(fd)) = self.fds[index as usize].get(vector) {
            signal(fd);
        }
    }

    /// Signals INTx and automasks if the line is asserted and may be delivered.
    fn intx_update(&mut self) {
        if self.intx_level
            && !self.intx_masked
            && !self.intx_disabled
            && !self.gated
            && self.mode == IrqMode::Intx
        {
            if let Some(Some(fd)) = self.fds[IrqIndex::Intx as usize].first() {
                signal(fd);
                self.intx_masked = true;
            }
        }
    }

    pub(crate) fn intx_level(&self) -> bool {
        self.intx_level
    }

    /// Command register INTx-disable bit changed.
    pub(crate) fn set_intx_disabled(&mut self, disabled: bool) {
        self.intx_disabled = disabled;
        self.intx_update();
    }

    /// Delivers the MSI-X vectors that are pending and no longer masked.
    pub(crate) fn msix_deliver_pending(&mut self) {
        if self.mode != IrqMode::Msix || self.gated {
            return;
        }
        for v in self.msix.deliverable() {
            self.msix.take_pending(v);
            self.signal(IrqIndex::Msix, v);
        }
    }

    /// Power-on state of the emulated parts; the client's eventfds and the mode stay.
    pub(crate) fn reset(&mut self) {
        self.intx_masked = false;
        self.intx_disabled = false;
        self.msix.reset();
    }

    /// Client gone: every eventfd dropped, mode back to INTx. Returns the old mode.
    pub(crate) fn close(&mut self) -> IrqMode {
        for index in &mut self.fds {
            index.iter_mut().for_each(|slot| *slot = None);
        }
        self.intx_masked = false;
        self.held_msi.iter_mut().for_each(|h| *h = false);
        std::mem::replace(&mut self.mode, IrqMode::Intx)
    }

    /// Validates and applies a SET_IRQS request. Returns the new mode if it changed.
    pub(crate) fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: IrqData,
    ) -> Result<Option<IrqMode>, DeviceError> {
        let invalid = |why| Err(DeviceError::InvalidSetIrqs(why));
        let idx = IrqIndex::try_from(index).map_err(|_| DeviceError::InvalidIrqIndex(index))?;
        if flags & !(DATA_MASK | ACTION_MASK) != 0 {
            return invalid("unknown flag bits");
        }
        let (data_flag, action) = (flags & DATA_MASK, flags & ACTION_MASK);
        if !data_flag.is_power_of_two() || !action.is_power_of_two() {
            return invalid("need exactly one data and one action flag");
        }
        let data_matches = matches!(
            (&data, data_flag),
            (IrqData::None, IRQ_SET_DATA_NONE)
                | (IrqData::Bool(_), IRQ_SET_DATA_BOOL)
                | (IrqData::Eventfds(_), IRQ_SET_DATA_EVENTFD)
        );
        if !data_matches {
            return invalid("data does not match the data flag");
        }
        if count == 0 && flags == IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER {
            // Disabling the whole index names it with start 0 (or any start inside it).
            if start != 0 && start >= self.count(idx) {
                return invalid("start beyond the index");
            }
            return Ok(self.disable(idx));
        }
        let end = start
            .checked_add(count)
            .filter(|&end| end <= self.count(idx))
            .ok_or(DeviceError::InvalidSetIrqs(
                "start + count beyond the index",
            ))?;
        if start >= self.count(idx) {
            return invalid("start beyond the index");
        }
        match &data {
            IrqData::Bool(b) if b.len() < count as usize => return invalid("bool data too short"),
            IrqData::Eventfds(f) if !f.is_empty() && f.len() != count as usize => {
                return invalid("eventfd count differs from count")
            }
            _ => {}
        }
        let range = start as usize..end as usize;
        match action {
            IRQ_SET_ACTION_TRIGGER => Ok(self.trigger(idx, range, data)),
            _ => {
                if idx != IrqIndex::Intx || start != 0 || count != 1 {
                    return invalid("mask and unmask apply to INTx vector 0 only");
                }
                let set = match &data {
                    IrqData::None => true,
                    IrqData::Bool(b) => b.first().is_some_and(|&b| b != 0),
                    IrqData::Eventfds(_) => return invalid("eventfd mask/unmask unsupported"),
                };
                if set && action == IRQ_SET_ACTION_MASK {
                    self.intx_masked = true;
                } else if set {
                    self.intx_masked = false;
                    self.intx_update();
                }
                Ok(None)
            }
        }
    }

    fn disable(&mut self, idx: IrqIndex) -> Option<IrqMode> {
        self.fds[idx as usize].iter_mut().for_each(|s| *s = None);
        match idx {
            IrqIndex::Intx => {
                self.intx_masked = false;
                None
            }
            IrqIndex::Msi | IrqIndex::Msix if self.mode == mode_of(idx) => {
                self.mode = IrqMode::Intx;
                self.intx_update();
                Some(IrqMode::Intx)
            }
            _ => None,
        }
    }

    fn trigger(
        &mut self,
        idx: IrqIndex,
        range: std::ops::Range<usize>,
        data: IrqData,
    ) -> Option<IrqMode> {
        match data {
            IrqData::None => range.for_each(|v| self.signal(idx, v)),
            IrqData::Bool(b) => {
                for (v, &on) in range.zip(&b) {
                    if on != 0 {
                        self.signal(idx, v);
                    }
                }
            }
            IrqData::Eventfds(fds) => {
                let arming = !fds.is_empty();
                let slots = &mut self.fds[idx as usize][range.clone()];
                if arming {
                    slots.iter_mut().zip(fds).for_each(|(s, fd)| *s = Some(fd));
                } else {
                    slots.iter_mut().for_each(|s| *s = None);
                }
                if idx == IrqIndex::Intx {
                    self.intx_update();
                }
                let new = mode_of(idx);
                if arming && matches!(idx, IrqIndex::Msi | IrqIndex::Msix) && self.mode != new {
                    // Switching between MSI and MSI-X directly implicitly disables the old
                    // index, as if the client had disabled it first.
                    let old = match self.mode {
                        IrqMode::Msi => Some(IrqIndex::Msi),
                        IrqMode::Msix => Some(IrqIndex::Msix),
                        IrqMode::Intx => None,
                    };
                    if let Some(old) = old {
                        self.fds[old as usize].iter_mut().for_each(|s| *s = None);
                    }
                    self.mode = new;
                    return Some(new);
                }
            }
        }
        None
    }
}

fn mode_of(idx: IrqIndex) -> IrqMode {
    match idx {
        IrqIndex::Msi => IrqMode::Msi,
        IrqIndex::Msix => IrqMode::Msix,
        _ => IrqMode::Intx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};

    const TRIGGER_FD: u32 = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;

    fn efd() -> OwnedFd {
        eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).unwrap()
    }

    /// Reads and resets the eventfd counter; 0 if it was not signalled.
    fn take(fd: &OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        match rustix::io::read(fd, &mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        rustix::io::fcntl_dupfd_cloexec(fd, 0).unwrap()
    }

    fn irqs() -> Interrupts {
        Interrupts::new([1, 4, 8, 1, 1])
    }

    fn set(i: &Interrupts, idx: IrqIndex, flags: u32, start: u32, count: u32, d: IrqData) {
        i.lock()
            .set_irqs(idx as u32, flags, start, count, d)
            .unwrap();
    }

    #[test]
    fn intx_automasks_until_unmask() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Intx,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        i.set_intx(true);
        assert_eq!(take(&fd), 1);
        i.set_intx(true);
        assert_eq!(take(&fd), 0, "masked after the first signal");
    }

    #[test]
    fn intx_unmask_resignals_while_asserted() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Intx,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        i.set_intx(true);
        take(&fd);
        let unmask = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK;
        set(&i, IrqIndex::Intx, unmask, 0, 1, IrqData::None);
        assert_eq!(take(&fd), 1);
        i.set_intx(false);
        set(&i, IrqIndex::Intx, unmask, 0, 1, IrqData::None);
        assert_eq!(take(&fd), 0, "line low: unmask signals nothing");
        i.set_intx(true);
        assert_eq!(take(&fd), 1);
    }

    #[test]
    fn intx_mask_blocks_signal() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Intx,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        let mask = IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK;
        set(&i, IrqIndex::Intx, mask, 0, 1, IrqData::Bool(vec![1]));
        i.set_intx(true);
        assert_eq!(take(&fd), 0);
    }

    #[test]
    fn intx_disable_bit_blocks_until_cleared() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Intx,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        i.lock().set_intx_disabled(true);
        i.set_intx(true);
        assert_eq!(take(&fd), 0);
        i.lock().set_intx_disabled(false);
        assert_eq!(take(&fd), 1);
    }

    #[test]
    fn arming_msi_switches_mode_and_disable_switches_back() {
        let i = irqs();
        let fds = [efd(), efd()];
        let d = IrqData::Eventfds(fds.iter().map(dup).collect());
        let changed = i.lock().set_irqs(1, TRIGGER_FD, 0, 2, d).unwrap();
        assert_eq!(changed, Some(IrqMode::Msi));
        assert_eq!(i.mode(), IrqMode::Msi);
        i.trigger_msi(1);
        assert_eq!((take(&fds[0]), take(&fds[1])), (0, 1));
        let off = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
        let changed = i.lock().set_irqs(1, off, 0, 0, IrqData::None).unwrap();
        assert_eq!(changed, Some(IrqMode::Intx));
        i.trigger_msi(1);
        assert_eq!(take(&fds[1]), 0);
    }

    #[test]
    fn msi_trigger_in_intx_mode_is_ignored() {
        let i = irqs();
        i.trigger_msi(0);
        i.trigger_msi(99);
        assert_eq!(i.mode(), IrqMode::Intx);
    }

    #[test]
    fn msix_masked_vector_goes_pending_then_delivers() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Msix,
            TRIGGER_FD,
            3,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        assert_eq!(i.mode(), IrqMode::Msix);
        i.lock().msix.write_table(3 * 16 + 12, &[1]);
        i.trigger_msix(3);
        assert_eq!(take(&fd), 0);
        let unmasked = i.lock().msix.write_table(3 * 16 + 12, &[0]);
        assert_eq!(unmasked, vec![3]);
        i.lock().msix_deliver_pending();
        assert_eq!(take(&fd), 1);
        let mut pba = [0u8; 8];
        i.lock().msix.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8]);
    }

    #[test]
    fn loopback_trigger_signals() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Err,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        let lb = IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER;
        set(&i, IrqIndex::Err, lb, 0, 1, IrqData::Bool(vec![1]));
        assert_eq!(take(&fd), 1);
        i.signal_err();
        assert_eq!(take(&fd), 1);
    }

    #[test]
    fn eventfd_deassign_with_no_fds() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Req,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        set(
            &i,
            IrqIndex::Req,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![]),
        );
        i.signal_req();
        assert_eq!(take(&fd), 0);
    }

    fn errno_of(i: &Interrupts, index: u32, flags: u32, start: u32, count: u32, d: IrqData) -> i32 {
        i.lock()
            .set_irqs(index, flags, start, count, d)
            .unwrap_err()
            .errno()
    }

    #[test]
    fn set_irqs_negative_cases_are_einval() {
        let i = irqs();
        let none_trig = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
        let cases: Vec<(u32, u32, u32, u32, IrqData)> = vec![
            (5, none_trig, 0, 1, IrqData::None),
            (0, none_trig | 1 << 6, 0, 1, IrqData::None),
            (0, IRQ_SET_ACTION_TRIGGER, 0, 1, IrqData::None),
            (
                0,
                IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                0,
                1,
                IrqData::None,
            ),
            (
                0,
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK,
                0,
                1,
                IrqData::None,
            ),
            (1, none_trig, 2, 3, IrqData::None),
            (2, none_trig, u32::MAX, 2, IrqData::None),
            (
                1,
                IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
                0,
                2,
                IrqData::Bool(vec![1]),
            ),
            (1, TRIGGER_FD, 0, 2, IrqData::Eventfds(vec![efd()])),
            (
                1,
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK,
                0,
                1,
                IrqData::None,
            ),
            (
                0,
                IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
                0,
                0,
                IrqData::None,
            ),
            (
                0,
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK,
                0,
                1,
                IrqData::Eventfds(vec![efd()]),
            ),
            (0, none_trig, 0, 1, IrqData::Bool(vec![1])),
        ];
        for (n, (index, flags, start, count, d)) in cases.into_iter().enumerate() {
            assert_eq!(errno_of(&i, index, flags, start, count, d), 22, "case {n}");
        }
    }

    #[test]
    fn disable_with_count_zero_is_accepted_on_any_index() {
        let i = Interrupts::new([0, 0, 0, 1, 1]);
        let off = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
        for index in 0..5 {
            assert!(i.lock().set_irqs(index, off, 0, 0, IrqData::None).is_ok());
        }
    }

    #[test]
    fn disable_with_a_start_past_the_count_is_refused() {
        let i = Interrupts::new([1, 1, 8, 1, 1]);
        let off = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER;
        assert_eq!(
            i.lock()
                .set_irqs(2, off, 8, 0, IrqData::None)
                .unwrap_err()
                .errno(),
            22
        );
        assert!(i.lock().set_irqs(2, off, 7, 0, IrqData::None).is_ok());
    }

    #[test]
    fn close_drops_fds_and_returns_to_intx() {
        let i = irqs();
        let fd = efd();
        set(
            &i,
            IrqIndex::Msix,
            TRIGGER_FD,
            0,
            1,
            IrqData::Eventfds(vec![dup(&fd)]),
        );
        assert_eq!(i.lock().close(), IrqMode::Msix);
        assert_eq!(i.mode(), IrqMode::Intx);
        assert!(i.lock().fds.iter().flatten().all(Option::is_none));
    }
}
