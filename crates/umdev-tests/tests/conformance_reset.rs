//! Conformance: VFIO_USER_DEVICE_RESET, over raw wire.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use umdev_proto::{wire, Command, FLAG_NO_REPLY};
use umdev_tests::device::reg;
use umdev_tests::wire::{errno, Raw};
use umdev_tests::{Efd, TestServer};
use zerocopy::IntoBytes;

const RESET: u16 = Command::DeviceReset as u16;

use umdev_tests::negotiated_test_device as setup;

fn write(r: &mut Raw, region: u32, offset: u64, data: &[u8]) {
    let a = wire::RegionAccess {
        offset,
        region,
        count: u32::try_from(data.len()).unwrap(),
    };
    let reply = r.call(Command::RegionWrite as u16, &[a.as_bytes(), data], &[]);
    assert_eq!(reply.errno(), None);
}

fn read(r: &mut Raw, region: u32, offset: u64, count: u32) -> Vec<u8> {
    let a = wire::RegionAccess {
        offset,
        region,
        count,
    };
    let reply = r.call(Command::RegionRead as u16, &[a.as_bytes()], &[]);
    assert_eq!(reply.errno(), None);
    reply.body[16..].to_vec()
}

fn reset(r: &mut Raw) {
    let reply = r.call(RESET, &[], &[]);
    assert_eq!(reply.errno(), None);
    assert!(reply.body.is_empty(), "DEVICE_RESET has no reply payload");
}

#[test]
fn reset_runs_the_devices_reset() {
    let (s, mut r) = setup();
    reset(&mut r);
    assert_eq!(s.observed().resets.load(Ordering::SeqCst), 1);
}

#[test]
fn reset_clears_the_devices_registers() {
    let (_s, mut r) = setup();
    write(&mut r, 0, 0, b"before reset");
    reset(&mut r);
    assert_eq!(read(&mut r, 0, 0, 12), vec![0; 12]);
}

#[test]
fn config_command_register_is_0_after_reset() {
    let (_s, mut r) = setup();
    write(&mut r, 7, 4, &0x0406u16.to_le_bytes());
    assert_ne!(read(&mut r, 7, 4, 2), vec![0, 0], "some command bits stick");
    reset(&mut r);
    assert_eq!(read(&mut r, 7, 4, 2), vec![0, 0]);
}

#[test]
fn eventfds_stay_armed_across_reset() {
    let (_s, mut r) = setup();
    let e = Efd::new();
    let set = wire::IrqSet {
        argsz: 20,
        flags: wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER,
        index: 3,
        start: 0,
        count: 1,
    };
    let reply = r.call(
        Command::DeviceSetIrqs as u16,
        &[set.as_bytes()],
        &[e.as_fd()],
    );
    assert_eq!(reply.errno(), None);
    reset(&mut r);
    write(&mut r, 0, reg::IRQ_CMD, &4u32.to_le_bytes());
    assert_eq!(e.read(), Some(1));
}

#[test]
fn dma_mappings_survive_reset() {
    let (_s, mut r) = setup();
    let mem = umdev_tests::guest_memfd(4096);
    let m = wire::DmaMap {
        argsz: 32,
        flags: wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE,
        offset: 0,
        address: 0x1000,
        size: 4096,
    };
    let reply = r.call(Command::DmaMap as u16, &[m.as_bytes()], &[mem.as_fd()]);
    assert_eq!(reply.errno(), None);
    reset(&mut r);
    write(&mut r, 0, reg::DMA_ADDR, &0x1000u64.to_le_bytes());
    write(&mut r, 0, reg::DMA_LEN, &4u32.to_le_bytes());
    write(&mut r, 0, reg::DMA_CMD, &1u32.to_le_bytes());
    let status = umdev_tests::poll_dma_status(|| {
        u32::from_le_bytes(read(&mut r, 0, reg::DMA_STATUS, 4).try_into().unwrap())
    });
    assert_eq!(status, 0);
}

#[test]
fn posted_reset_gets_no_reply_but_takes_effect() {
    let (s, mut r) = setup();
    write(&mut r, 0, 0, b"xy");
    r.send(RESET, FLAG_NO_REPLY, &[], &[]);
    assert_eq!(read(&mut r, 0, 0, 2), vec![0, 0]);
    assert_eq!(s.observed().resets.load(Ordering::SeqCst), 1);
}

#[test]
fn an_fd_with_reset_is_einval_and_nothing_is_reset() {
    let (s, mut r) = setup();
    let e = Efd::new();
    let reply = r.call(RESET, &[], &[e.as_fd()]);
    assert_eq!(reply.errno(), Some(errno::EINVAL));
    assert_eq!(s.observed().resets.load(Ordering::SeqCst), 0);
    r.assert_usable();
}

#[test]
fn reset_before_version_is_einval() {
    let s = TestServer::test_device();
    let mut r = s.raw();
    assert_eq!(r.call(RESET, &[], &[]).errno(), Some(errno::EINVAL));
    assert_eq!(s.observed().resets.load(Ordering::SeqCst), 0);
}

/// Seeds digest behaviour 36: a device that declares no reset has no RESET flag in
/// DEVICE_GET_INFO, and DEVICE_RESET on it is refused with EINVAL, in agreement; the device
/// is never told and the connection stays up.
#[test]
fn reset_of_a_device_without_reset_is_einval_as_get_info_says() {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use umdev_pci::{BarIndex, BarKind, Errno, PciDevice, PciDeviceSpec, PciFunction};

    struct NoReset(Arc<AtomicUsize>);
    impl PciDevice for NoReset {
        fn bar_read(&mut self, _: BarIndex, _: u64, d: &mut [u8]) -> Result<(), Errno> {
            d.fill(0);
            Ok(())
        }
        fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8]) -> Result<(), Errno> {
            Ok(())
        }
        fn reset(&mut self) -> Result<(), Errno> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let resets = Arc::new(AtomicUsize::new(0));
    let spec = PciDeviceSpec::builder(0x5ead, 0x0003)
        .bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            4096,
        )
        .reset(false)
        .build()
        .unwrap();
    let f = PciFunction::new(spec, Box::new(NoReset(resets.clone())));
    let s = TestServer::start(f, umdev_server::ServerConfig::default());
    let mut r = Raw::negotiated(&s.path);
    let info = wire::DeviceInfo {
        argsz: 16,
        ..Default::default()
    };
    let got = r.call(Command::DeviceGetInfo as u16, &[info.as_bytes()], &[]);
    let flags = u32::from_le_bytes(got.body[4..8].try_into().unwrap());
    assert_eq!(
        flags & wire::DEVICE_FLAGS_RESET,
        0,
        "GET_INFO offers no reset"
    );
    assert_eq!(r.call(RESET, &[], &[]).errno(), Some(errno::EINVAL));
    assert_eq!(resets.load(Ordering::SeqCst), 0, "the device was not told");
    r.assert_usable();
}
