//! mtty served over a real vfio-user socket and driven by our client the way a guest driver
//! would: registers, text both ways through the host-side socket, INTx, and MSI (which the
//! stock Linux driver never uses for this card, so only a client of ours can show it).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use umdev_client::Client;
use umdev_mtty::regs::{IER, IER_RDI, LSR, LSR_DR, MCR, MCR_OUT2, RBR_THR};
use umdev_mtty::{HostEndpoint, Mtty, MttyConfig};
use umdev_pci::{PciFunction, CONFIG_REGION};
use umdev_proto::wire;
use umdev_server::ServerConfig;
use umdev_tests::{Efd, TestServer};

struct Card {
    server: TestServer,
    host: Vec<UnixStream>,
    _dir: tempfile::TempDir,
}

fn card(ports: u8) -> Card {
    let dir = tempfile::tempdir().unwrap();
    let host = (0..ports)
        .map(|i| HostEndpoint::UnixSocket(dir.path().join(format!("port{i}.sock"))))
        .collect();
    let mtty = Mtty::new(MttyConfig::new(ports, host)).unwrap();
    let paths = mtty.host_paths();
    let server = TestServer::start(
        PciFunction::new(mtty.spec(), Box::new(mtty)),
        ServerConfig::default(),
    );
    let host = paths
        .iter()
        .map(|p| {
            let s = UnixStream::connect(p).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    Card {
        server,
        host,
        _dir: dir,
    }
}

fn reg(c: &mut Client, port: u32, off: u64) -> u8 {
    let mut b = [0u8];
    c.region_read(port, off, &mut b).unwrap();
    b[0]
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn config_space_is_the_kernel_samples() {
    let card = card(2);
    let mut c = card.server.client();
    let mut cfg = [0u8; 64];
    c.region_read(CONFIG_REGION, 0, &mut cfg).unwrap();
    assert_eq!(&cfg[0..4], &[0x48, 0x43, 0x53, 0x32], "4348:3253");
    assert_eq!(cfg[8], 0x10, "revision");
    assert_eq!(
        &cfg[9..12],
        &[0x02, 0x00, 0x07],
        "prog-if 02, subclass 00, class 07"
    );
    assert_eq!(&cfg[0x2c..0x30], &[0x48, 0x43, 0x53, 0x32], "subsystem");
    assert_eq!(cfg[0x3d], 1, "INTA");
    assert_eq!(cfg[0x10] & 1, 1, "BAR0 is I/O");
    assert_eq!(cfg[0x14] & 1, 1, "BAR1 is I/O");
    assert_eq!(c.region_info(0).unwrap().info.size, 8);
    assert_eq!(c.region_info(1).unwrap().info.size, 8);
}

#[test]
fn text_flows_both_ways_on_both_ports() {
    let mut card = card(2);
    let mut c = card.server.client();
    for port in 0..2u32 {
        let msg = format!("guest says hi on {port}\n");
        for b in msg.bytes() {
            c.region_write(port, RBR_THR, &[b]).unwrap();
        }
        let mut got = vec![0u8; msg.len()];
        card.host[port as usize].read_exact(&mut got).unwrap();
        assert_eq!(got, msg.as_bytes());

        let reply = format!("host answers {port}");
        card.host[port as usize]
            .write_all(reply.as_bytes())
            .unwrap();
        let mut read = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while read.len() < reply.len() && Instant::now() < deadline {
            if reg(&mut c, port, LSR) & LSR_DR != 0 {
                read.push(reg(&mut c, port, RBR_THR));
            }
        }
        assert_eq!(String::from_utf8(read).unwrap(), reply);
    }
}

#[test]
fn received_data_raises_intx_and_unmask_resignals_while_pending() {
    let mut card = card(1);
    let mut c = card.server.client();
    let intx = Efd::new();
    c.set_irq_eventfds(0, wire::IRQ_SET_ACTION_TRIGGER, 0, &[intx.as_fd()])
        .unwrap();
    c.region_write(0, MCR, &[MCR_OUT2]).unwrap();
    c.region_write(0, IER, &[IER_RDI]).unwrap();
    card.host[0].write_all(b"x").unwrap();
    wait_for(|| intx.read().is_some());
    // Still pending (nobody read RBR): unmask signals again.
    c.set_irqs(
        0,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(intx.read(), Some(1));
    assert_eq!(reg(&mut c, 0, RBR_THR), b'x');
    c.set_irqs(
        0,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(intx.read(), None, "nothing pending after RBR was read");
}

#[test]
fn msi_is_used_once_armed_and_intx_stays_quiet() {
    let mut card = card(1);
    let mut c = card.server.client();
    let info = c.irq_info(1).unwrap();
    assert_eq!(info.count, 1, "one MSI vector, as in the sample");
    let intx = Efd::new();
    let msi = Efd::new();
    c.set_irq_eventfds(0, wire::IRQ_SET_ACTION_TRIGGER, 0, &[intx.as_fd()])
        .unwrap();
    c.set_irq_eventfds(1, wire::IRQ_SET_ACTION_TRIGGER, 0, &[msi.as_fd()])
        .unwrap();
    c.region_write(0, MCR, &[MCR_OUT2]).unwrap();
    c.region_write(0, IER, &[IER_RDI]).unwrap();
    card.host[0].write_all(b"m").unwrap();
    wait_for(|| msi.read().is_some());
    assert_eq!(intx.read(), None);
    assert_eq!(reg(&mut c, 0, RBR_THR), b'm');
    // Disabling MSI returns the card to INTx.
    c.set_irqs(
        1,
        wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
        &[],
    )
    .unwrap();
    card.host[0].write_all(b"i").unwrap();
    wait_for(|| intx.read().is_some());
    assert_eq!(msi.read(), None);
}

#[test]
fn lsr_never_reads_all_ones() {
    let card = card(2);
    let mut c = card.server.client();
    for port in 0..2 {
        assert_ne!(reg(&mut c, port, LSR), 0xff);
    }
}
