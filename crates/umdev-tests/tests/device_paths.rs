//! The test device through a real socket with our client: every data path once.
#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::sync::Arc;

use umdev_client::VecMemory;
use umdev_proto::wire;
use umdev_tests::device::{reg, BAR2_AREAS, BAR2_SIZE, TEST_DEVICE, TEST_VENDOR};
use umdev_tests::Efd;
use umdev_tests::TestServer;

fn write32(c: &mut umdev_client::Client, off: u64, v: u32) {
    c.region_write(0, off, &v.to_le_bytes()).unwrap();
}

fn read32(c: &mut umdev_client::Client, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn start_dma(c: &mut umdev_client::Client, iova: u64, len: u32, seed: u8, cmd: u32) -> u32 {
    c.region_write(0, reg::DMA_ADDR, &iova.to_le_bytes())
        .unwrap();
    write32(c, reg::DMA_LEN, len);
    c.region_write(0, reg::DMA_SEED, &[seed]).unwrap();
    write32(c, reg::DMA_CMD, cmd);
    umdev_tests::poll_dma_status(|| read32(c, reg::DMA_STATUS))
}

#[test]
fn config_space_shows_the_declared_ids() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let mut id = [0u8; 4];
    c.region_read(umdev_pci::CONFIG_REGION, 0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), TEST_VENDOR);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), TEST_DEVICE);
}

#[test]
fn a_140_byte_access_reaches_the_device_in_one_piece() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let data: Vec<u8> = (0..140u8).collect();
    c.region_write(0, 3, &data).unwrap();
    let mut back = vec![0u8; 140];
    c.region_read(0, 3, &mut back).unwrap();
    assert_eq!(back, data);
    let acc = s.observed().accesses.lock().unwrap().clone();
    assert!(acc.contains(&(0, 3, 140, true)), "{acc:?}");
    assert!(acc.contains(&(0, 3, 140, false)), "{acc:?}");
}

#[test]
fn fd_backed_dma_writes_into_the_clients_memory() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let mem = umdev_tests::guest_memfd(1 << 20);
    c.dma_map(
        0x10_0000,
        1 << 20,
        wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE,
        Some((mem.as_fd(), 0)),
    )
    .unwrap();
    assert_eq!(start_dma(&mut c, 0x10_0000 + 100, 64, 7, 1), 0);
    let mut got = [0u8; 64];
    rustix::io::pread(&mem, &mut got, 100).unwrap();
    let want: Vec<u8> = (0..64u8).map(|i| 7u8.wrapping_add(i)).collect();
    assert_eq!(&got[..], &want[..]);
    // And back: the device reads guest memory into its buffer.
    rustix::io::pwrite(&mem, b"hello from guest memory", 4096).unwrap();
    assert_eq!(start_dma(&mut c, 0x10_0000 + 4096, 23, 0, 2), 0);
    let mut buf = [0u8; 23];
    c.region_read(0, reg::DMA_BUF, &mut buf).unwrap();
    assert_eq!(&buf, b"hello from guest memory");
}

#[test]
fn fd_less_dma_goes_through_dma_read_and_write_messages() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let mem = Arc::new(VecMemory::new());
    mem.add(0x2000_0000, 8192);
    c.set_dma_handler(mem.clone());
    c.dma_map(
        0x2000_0000,
        8192,
        wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE,
        None,
    )
    .unwrap();
    assert_eq!(start_dma(&mut c, 0x2000_0010, 100, 1, 1), 0);
    let got = mem.with(0x2000_0010, 100, |m| m.to_vec()).unwrap();
    assert_eq!(
        got,
        (0..100u8).map(|i| 1u8.wrapping_add(i)).collect::<Vec<_>>()
    );
    mem.with(0x2000_1000, 5, |m| m.copy_from_slice(b"abcde"))
        .unwrap();
    assert_eq!(start_dma(&mut c, 0x2000_1000, 5, 0, 2), 0);
    let mut buf = [0u8; 5];
    c.region_read(0, reg::DMA_BUF, &mut buf).unwrap();
    assert_eq!(&buf, b"abcde");
}

#[test]
fn dma_outside_any_mapping_faults_and_after_unmap_too() {
    let s = TestServer::test_device();
    let mut c = s.client();
    assert_eq!(start_dma(&mut c, 0x5000, 8, 0, 1), 14);
    let mem = umdev_tests::guest_memfd(4096);
    c.dma_map(
        0x5000,
        4096,
        wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE,
        Some((mem.as_fd(), 0)),
    )
    .unwrap();
    assert_eq!(start_dma(&mut c, 0x5000, 8, 0, 1), 0);
    c.dma_unmap(0x5000, 4096, 0).unwrap();
    assert_eq!(start_dma(&mut c, 0x5000, 8, 0, 1), 14);
}

#[test]
fn mmap_able_region_comes_with_its_fd_and_sparse_areas() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let r = c.region_info(2).unwrap();
    assert_eq!(r.info.size, BAR2_SIZE);
    assert_ne!(r.info.flags & wire::REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(r.info.flags & wire::REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(r.sparse, BAR2_AREAS.to_vec());
    let fd = r.fd.expect("region fd");
    // What the client writes through the fd, the device sees through the region.
    rustix::io::pwrite(&fd, b"shared", 0x1000).unwrap();
    let mut b = [0u8; 6];
    c.region_read(2, 0x1000, &mut b).unwrap();
    assert_eq!(&b, b"shared");
}

#[test]
fn intx_is_level_triggered_with_automask_and_resignals_on_unmask() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let efd = Efd::new();
    c.set_irq_eventfds(0, wire::IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])
        .unwrap();
    write32(&mut c, reg::IRQ_CMD, 1); // raise
    assert_eq!(efd.read(), Some(1));
    write32(&mut c, reg::IRQ_CMD, 1); // still high, but masked: no new signal
    assert_eq!(efd.read(), None);
    c.set_irqs(
        0,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(
        efd.read(),
        Some(1),
        "unmask with the line high signals again"
    );
    write32(&mut c, reg::IRQ_CMD, 0); // lower
    c.set_irqs(
        0,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(efd.read(), None, "unmask with the line low is silent");
}

#[test]
fn arming_msix_switches_the_device_to_msix() {
    let s = TestServer::test_device();
    let mut c = s.client();
    let fds: Vec<Efd> = (0..8).map(|_| Efd::new()).collect();
    let b: Vec<_> = fds.iter().map(|e| e.as_fd()).collect();
    c.set_irq_eventfds(2, wire::IRQ_SET_ACTION_TRIGGER, 0, &b)
        .unwrap();
    assert_eq!(
        s.observed().modes.lock().unwrap().last(),
        Some(&umdev_pci::IrqMode::Msix)
    );
    write32(&mut c, reg::IRQ_VECTOR, 5);
    write32(&mut c, reg::IRQ_CMD, 3);
    assert_eq!(fds[5].read(), Some(1));
    assert_eq!(fds[4].read(), None);
}

#[test]
fn client_loss_closes_the_device_and_a_new_client_attaches() {
    let s = TestServer::test_device();
    {
        let mut c = s.client();
        c.region_write(0, 0, b"kept").unwrap();
    }
    let mut c = s.client();
    let mut b = [0u8; 4];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"kept", "device state survives the client");
    assert_eq!(
        s.observed().opens.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    assert_eq!(
        s.observed()
            .closes
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}
