//! Conformance: VFIO_USER_DEVICE_SET_IRQS, over raw wire.
#![allow(clippy::unwrap_used)]

use std::os::fd::BorrowedFd;

use umdev_pci::IrqMode;
use umdev_proto::{wire, Command};
use umdev_tests::device::reg;
use umdev_tests::wire::{errno, Raw, RawReply};
use umdev_tests::Efd;
use zerocopy::IntoBytes;

const SET_IRQS: u16 = Command::DeviceSetIrqs as u16;
const NONE: u32 = wire::IRQ_SET_DATA_NONE;
const BOOL: u32 = wire::IRQ_SET_DATA_BOOL;
const EVENTFD: u32 = wire::IRQ_SET_DATA_EVENTFD;
const MASK: u32 = wire::IRQ_SET_ACTION_MASK;
const UNMASK: u32 = wire::IRQ_SET_ACTION_UNMASK;
const TRIGGER: u32 = wire::IRQ_SET_ACTION_TRIGGER;
const INTX: u32 = 0;
const MSI: u32 = 1;
const MSIX: u32 = 2;
const ERR: u32 = 3;
const REQ: u32 = 4;

use umdev_tests::negotiated_test_device as setup;

fn set(
    r: &mut Raw,
    (index, flags, start, count): (u32, u32, u32, u32),
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> RawReply {
    let req = wire::IrqSet {
        argsz: 20 + u32::try_from(data.len()).unwrap(),
        flags,
        index,
        start,
        count,
    };
    r.call(SET_IRQS, &[req.as_bytes(), data], fds)
}

fn ok(r: &mut Raw, what: (u32, u32, u32, u32), data: &[u8], fds: &[BorrowedFd<'_>]) {
    let reply = set(r, what, data, fds);
    assert_eq!(reply.errno(), None, "{what:?}");
    assert!(reply.body.is_empty(), "SET_IRQS has no reply payload");
}

fn refused(what: (u32, u32, u32, u32), data: &[u8], nfds: usize) {
    let (_s, mut r) = setup();
    let efds: Vec<Efd> = (0..nfds).map(|_| Efd::new()).collect();
    let fds: Vec<_> = efds.iter().map(Efd::as_fd).collect();
    let reply = set(&mut r, what, data, &fds);
    assert_eq!(reply.errno(), Some(errno::EINVAL), "{what:?}");
    r.assert_usable();
}

/// Arms `n` fresh eventfds on `index` from vector 0.
fn arm(r: &mut Raw, index: u32, n: u32) -> Vec<Efd> {
    let efds: Vec<Efd> = (0..n).map(|_| Efd::new()).collect();
    let fds: Vec<_> = efds.iter().map(Efd::as_fd).collect();
    ok(r, (index, EVENTFD | TRIGGER, 0, n), &[], &fds);
    efds
}

fn bar0_write32(r: &mut Raw, offset: u64, v: u32) {
    let a = wire::RegionAccess {
        offset,
        region: 0,
        count: 4,
    };
    let reply = r.call(
        Command::RegionWrite as u16,
        &[a.as_bytes(), &v.to_le_bytes()],
        &[],
    );
    assert_eq!(reply.errno(), None);
}

/// Has the test device raise an interrupt (see the IRQ command register in device.rs).
fn device_irq(r: &mut Raw, cmd: u32, vector: u32) {
    bar0_write32(r, reg::IRQ_VECTOR, vector);
    bar0_write32(r, reg::IRQ_CMD, cmd);
}

fn fired(efds: &[Efd]) -> Vec<bool> {
    efds.iter().map(|e| e.read().is_some()).collect()
}

#[test]
fn bad_index_is_einval() {
    refused((5, NONE | TRIGGER, 0, 1), &[], 0);
}

#[test]
fn start_plus_count_past_the_count_is_einval() {
    refused((MSIX, NONE | TRIGGER, 4, 5), &[], 0);
}

#[test]
fn start_at_the_count_is_einval() {
    refused((MSI, NONE | TRIGGER, 4, 1), &[], 0);
}

#[test]
fn start_plus_count_overflowing_is_einval() {
    refused((MSIX, NONE | TRIGGER, 1, u32::MAX), &[], 0);
}

#[test]
fn unknown_flag_bits_are_einval() {
    refused((MSIX, NONE | TRIGGER | 1 << 6, 0, 1), &[], 0);
}

#[test]
fn no_data_flag_is_einval() {
    refused((MSIX, TRIGGER, 0, 1), &[], 0);
}

#[test]
fn two_data_flags_are_einval() {
    refused((MSIX, NONE | BOOL | TRIGGER, 0, 1), &[1], 0);
}

#[test]
fn no_action_flag_is_einval() {
    refused((MSIX, NONE, 0, 1), &[], 0);
}

#[test]
fn two_action_flags_are_einval() {
    refused((INTX, NONE | MASK | UNMASK, 0, 1), &[], 0);
}

#[test]
fn data_bool_shorter_than_count_is_einval() {
    refused((MSIX, BOOL | TRIGGER, 0, 4), &[1, 1, 1], 0);
}

#[test]
fn eventfd_count_differing_from_count_is_einval() {
    refused((MSIX, EVENTFD | TRIGGER, 0, 4), &[], 2);
}

#[test]
fn fds_with_data_none_are_einval() {
    refused((MSIX, NONE | TRIGGER, 0, 1), &[], 1);
}

#[test]
fn fds_with_data_bool_are_einval() {
    refused((MSIX, BOOL | TRIGGER, 0, 1), &[1], 1);
}

#[test]
fn mask_on_msi_is_einval() {
    refused((MSI, NONE | MASK, 0, 1), &[], 0);
}

#[test]
fn unmask_on_msix_is_einval() {
    refused((MSIX, NONE | UNMASK, 0, 1), &[], 0);
}

#[test]
fn mask_on_err_is_einval() {
    refused((ERR, NONE | MASK, 0, 1), &[], 0);
}

#[test]
fn eventfd_mask_on_intx_is_einval() {
    refused((INTX, EVENTFD | MASK, 0, 1), &[], 1);
}

#[test]
fn argsz_below_20_is_einval() {
    let (_s, mut r) = setup();
    let req = wire::IrqSet {
        argsz: 19,
        flags: NONE | TRIGGER,
        index: MSIX,
        start: 0,
        count: 0,
    };
    let reply = r.call(SET_IRQS, &[req.as_bytes()], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}

#[test]
fn truncated_body_is_einval() {
    let (_s, mut r) = setup();
    let req = wire::IrqSet {
        argsz: 20,
        flags: NONE | TRIGGER,
        index: MSIX,
        start: 0,
        count: 0,
    };
    let reply = r.call(SET_IRQS, &[&req.as_bytes()[..16]], &[]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    r.assert_usable();
}

/// Regression (fixed in b6138df): count 0 with DATA_NONE|TRIGGER disabled the index
/// whatever the start.
#[test]
fn disable_with_a_start_past_the_count_is_einval() {
    refused((MSIX, NONE | TRIGGER, 100, 0), &[], 0);
}

#[test]
fn a_refused_request_changes_nothing() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, MSIX, 8);
    let reply = set(
        &mut r,
        (MSIX, EVENTFD | TRIGGER, 0, 8),
        &[],
        &[efds[0].as_fd()],
    );
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    device_irq(&mut r, 3, 6);
    assert_eq!(efds[6].read(), Some(1), "vector 6 still armed");
}

#[test]
fn arming_msix_eventfds_delivers_device_interrupts() {
    let (s, mut r) = setup();
    let efds = arm(&mut r, MSIX, 8);
    assert_eq!(
        s.observed().modes.lock().unwrap().last(),
        Some(&IrqMode::Msix)
    );
    device_irq(&mut r, 3, 2);
    let mut want = vec![false; 8];
    want[2] = true;
    assert_eq!(fired(&efds), want);
}

#[test]
fn arming_msi_eventfds_delivers_device_interrupts() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, MSI, 4);
    device_irq(&mut r, 2, 3);
    assert_eq!(fired(&efds), vec![false, false, false, true]);
}

#[test]
fn disable_with_count_0_data_none_trigger_silences_the_index() {
    let (s, mut r) = setup();
    let efds = arm(&mut r, MSIX, 8);
    ok(&mut r, (MSIX, NONE | TRIGGER, 0, 0), &[], &[]);
    assert_eq!(
        s.observed().modes.lock().unwrap().last(),
        Some(&IrqMode::Intx)
    );
    device_irq(&mut r, 3, 2);
    assert_eq!(fired(&efds), vec![false; 8]);
}

#[test]
fn eventfd_with_no_fds_deassigns_the_vectors() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, MSIX, 8);
    ok(&mut r, (MSIX, EVENTFD | TRIGGER, 2, 2), &[], &[]);
    device_irq(&mut r, 3, 2);
    device_irq(&mut r, 3, 4);
    assert_eq!(
        fired(&efds),
        vec![false, false, false, false, true, false, false, false]
    );
}

#[test]
fn loopback_trigger_via_data_bool_fires_the_chosen_vectors() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, MSIX, 8);
    ok(
        &mut r,
        (MSIX, BOOL | TRIGGER, 0, 8),
        &[0, 1, 0, 0, 0, 7, 0, 0],
        &[],
    );
    assert_eq!(
        fired(&efds),
        vec![false, true, false, false, false, true, false, false]
    );
}

#[test]
fn loopback_trigger_via_data_none_fires_every_vector_in_range() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, MSIX, 8);
    ok(&mut r, (MSIX, NONE | TRIGGER, 6, 2), &[], &[]);
    assert_eq!(
        fired(&efds),
        vec![false, false, false, false, false, false, true, true]
    );
}

#[test]
fn intx_eventfd_fires_when_the_device_raises_the_line() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, INTX, 1);
    device_irq(&mut r, 1, 0);
    assert_eq!(efds[0].read(), Some(1));
}

#[test]
fn intx_mask_holds_the_interrupt_back_until_unmask() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, INTX, 1);
    ok(&mut r, (INTX, BOOL | MASK, 0, 1), &[1], &[]);
    device_irq(&mut r, 1, 0);
    assert_eq!(efds[0].read(), None, "masked");
    ok(&mut r, (INTX, NONE | UNMASK, 0, 1), &[], &[]);
    assert_eq!(efds[0].read(), Some(1), "delivered on unmask");
}

#[test]
fn intx_mask_with_a_false_bool_does_not_mask() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, INTX, 1);
    ok(&mut r, (INTX, BOOL | MASK, 0, 1), &[0], &[]);
    device_irq(&mut r, 1, 0);
    assert_eq!(efds[0].read(), Some(1));
}

#[test]
fn err_eventfd_fires_on_a_device_error() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, ERR, 1);
    device_irq(&mut r, 4, 0);
    assert_eq!(efds[0].read(), Some(1));
}

#[test]
fn req_eventfd_fires_on_a_device_request() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, REQ, 1);
    device_irq(&mut r, 5, 0);
    assert_eq!(efds[0].read(), Some(1));
}

#[test]
fn err_loopback_trigger_fires_its_eventfd() {
    let (_s, mut r) = setup();
    let efds = arm(&mut r, ERR, 1);
    ok(&mut r, (ERR, NONE | TRIGGER, 0, 1), &[], &[]);
    assert_eq!(efds[0].read(), Some(1));
}
