#![allow(clippy::unwrap_used)]
//! The migration state machine over a real socket: every (from, to) pair of the eight
//! states plus unknown ones, on the test device (STOP_COPY, P2P, PRE_COPY) and on mtty
//! (STOP_COPY, PRE_COPY); what each state allows (BAR accesses, MIG_DATA_READ/WRITE,
//! pre-copy sizing); ERROR reached by a failing device and left only by DEVICE_RESET.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use umdev_client::Client;
use umdev_mtty::{regs, HostEndpoint, Mtty, MttyConfig};
use umdev_pci::PciFunction;
use umdev_proto::wire;
use umdev_server::ServerConfig;
use umdev_tests::device::reg;
use umdev_tests::{Efd, TestServer};

const EINVAL: i32 = 22;
const EBUSY: i32 = 16;
const EIO: i32 = 5;
const ERROR: u32 = 0;
const STOP: u32 = 1;
const RUNNING: u32 = 2;
const STOP_COPY: u32 = 3;
const RESUMING: u32 = 4;
const RUNNING_P2P: u32 = 5;
const PRE_COPY: u32 = 6;
const PRE_COPY_P2P: u32 = 7;
const NAMES: [&str; 8] = [
    "ERROR",
    "STOP",
    "RUNNING",
    "STOP_COPY",
    "RESUMING",
    "RUNNING_P2P",
    "PRE_COPY",
    "PRE_COPY_P2P",
];

fn set(c: &mut Client, state: u32) -> Result<u32, i32> {
    c.set_mig_state(state).map_err(|e| e.errno().unwrap())
}

/// Resets the device (back to RUNNING) and takes it to `state`.
fn reach(c: &mut Client, state: u32) {
    c.reset().unwrap();
    assert_eq!(c.mig_state().unwrap(), RUNNING, "reset leads to RUNNING");
    if state == ERROR {
        c.region_write(0, reg::MIG_FAIL, &1u32.to_le_bytes())
            .unwrap();
        assert_eq!(set(c, STOP), Err(EIO), "the device's own errno");
    } else {
        assert_eq!(set(c, state), Ok(state));
    }
    assert_eq!(c.mig_state().unwrap(), state);
}

/// Whether a request `from -> to` may succeed: the kernel refuses ERROR on either side,
/// states the device lacks, and STOP_COPY to the PRE_COPY states (no path without a saving
/// interior state).
fn allowed(from: u32, to: u32, p2p: bool) -> bool {
    let has = |s: u32| (1..=7).contains(&s) && (p2p || !matches!(s, RUNNING_P2P | PRE_COPY_P2P));
    from != ERROR
        && has(from)
        && has(to)
        && !(from == STOP_COPY && matches!(to, PRE_COPY | PRE_COPY_P2P))
}

fn every_pair(c: &mut Client, p2p: bool, erroring: bool) -> usize {
    let mut checked = 0;
    for from in 0..8u32 {
        if (from == ERROR && !erroring) || (!p2p && matches!(from, RUNNING_P2P | PRE_COPY_P2P)) {
            continue;
        }
        for to in (0..8u32).chain([8, 0xffff, u32::MAX]) {
            reach(c, from);
            let got = set(c, to);
            let name = |s: u32| NAMES.get(s as usize).copied().unwrap_or("unknown");
            if allowed(from, to, p2p) {
                assert_eq!(got, Ok(to), "{} -> {}", name(from), name(to));
                assert_eq!(c.mig_state().unwrap(), to);
            } else {
                assert_eq!(got, Err(EINVAL), "{} -> {}", name(from), name(to));
                assert_eq!(
                    c.mig_state().unwrap(),
                    from,
                    "a refused request moves nothing"
                );
            }
            checked += 1;
        }
    }
    c.reset().unwrap();
    checked
}

#[test]
fn every_pair_of_states_on_a_device_with_p2p_and_pre_copy() {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    assert_eq!(
        c.migration_flags().unwrap(),
        wire::MIGRATION_STOP_COPY | wire::MIGRATION_P2P | wire::MIGRATION_PRE_COPY
    );
    assert_eq!(every_pair(&mut c, true, true), 8 * 11);
}

fn mtty_server(host: Vec<HostEndpoint>) -> TestServer {
    let m = Mtty::new(MttyConfig::new(1, host)).unwrap();
    let f = PciFunction::new(m.spec(), Box::new(m));
    TestServer::start(f, ServerConfig::default())
}

#[test]
fn every_pair_of_states_on_mtty_without_p2p() {
    let s = mtty_server(vec![]);
    let mut c = s.client();
    assert_eq!(
        c.migration_flags().unwrap(),
        wire::MIGRATION_STOP_COPY | wire::MIGRATION_PRE_COPY
    );
    assert_eq!(every_pair(&mut c, false, false), 5 * 11);
}

#[test]
fn error_is_left_only_by_reset_and_a_failed_save_leads_there() {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    reach(&mut c, ERROR);
    let mut b = [0u8; 4];
    assert_eq!(
        c.region_read(0, 0, &mut b).unwrap_err().errno(),
        Some(EBUSY)
    );
    c.reset().unwrap();
    assert_eq!(c.mig_state().unwrap(), RUNNING);
    c.region_read(0, 0, &mut b).unwrap();
    // A save that fails (on the way to STOP_COPY) leaves the device in ERROR too.
    c.region_write(0, reg::MIG_FAIL, &2u32.to_le_bytes())
        .unwrap();
    assert_eq!(set(&mut c, STOP_COPY), Err(EIO));
    assert_eq!(c.mig_state().unwrap(), ERROR);
    assert_eq!(set(&mut c, PRE_COPY), Err(EINVAL));
    c.reset().unwrap();
    assert_eq!(set(&mut c, PRE_COPY), Ok(PRE_COPY));
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let d = c.mig_data_read(100).unwrap();
        out.extend_from_slice(&d);
        if d.len() < 100 {
            return out;
        }
    }
}

/// Record kinds in a stream (the byte at offset 6 of each record).
fn kinds(mut stream: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while stream.len() >= 20 {
        let ty = usize::from(u16::from_le_bytes([stream[12], stream[13]]));
        let payload = u32::from_le_bytes(stream[16..20].try_into().unwrap()) as usize;
        out.push(u16::from_le_bytes([stream[6], stream[7]]));
        stream = &stream[20 + ty + payload + 4..];
    }
    assert!(stream.is_empty());
    out
}

#[test]
fn combined_transitions_do_not_pass_through_saving_states() {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    // RUNNING -> STOP_COPY goes by RUNNING_P2P and STOP: one final record, no snapshot.
    assert_eq!(set(&mut c, STOP_COPY), Ok(STOP_COPY));
    assert_eq!(kinds(&read_all(&mut c)), [2]);
    // RUNNING -> PRE_COPY -> STOP_COPY: the snapshot, then the final state.
    reach(&mut c, PRE_COPY);
    assert_eq!(set(&mut c, STOP_COPY), Ok(STOP_COPY));
    assert_eq!(kinds(&read_all(&mut c)), [1, 2]);
    // STOP_COPY -> RUNNING ends the stream; a new STOP_COPY starts a fresh one.
    assert_eq!(set(&mut c, RUNNING), Ok(RUNNING));
    assert_eq!(set(&mut c, STOP_COPY), Ok(STOP_COPY));
    assert_eq!(kinds(&read_all(&mut c)), [2]);
}

#[test]
fn what_each_state_allows() {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    for state in 1..8u32 {
        reach(&mut c, state);
        let running = matches!(state, RUNNING | RUNNING_P2P | PRE_COPY | PRE_COPY_P2P);
        let mut b = [0u8; 4];
        let bar = c.region_read(0, 0, &mut b).map_err(|e| e.errno().unwrap());
        assert_eq!(bar, if running { Ok(()) } else { Err(EBUSY) }, "{state}");
        let bar = c.region_write(0, 0, &b).map_err(|e| e.errno().unwrap());
        assert_eq!(bar, if running { Ok(()) } else { Err(EBUSY) }, "{state}");
        // Config space and the MSI-X table stay reachable in every state.
        c.region_read(umdev_pci::CONFIG_REGION, 0, &mut b).unwrap();
        c.region_read(4, 0, &mut b).unwrap();
        let saving = matches!(state, STOP_COPY | PRE_COPY | PRE_COPY_P2P);
        let read = c.mig_data_read(16).map_err(|e| e.errno().unwrap());
        assert_eq!(read.is_ok(), saving, "MIG_DATA_READ in {state}");
        if !saving {
            assert_eq!(read, Err(EINVAL));
        }
        let write = c.mig_data_write(b"UMDV").map_err(|e| e.errno().unwrap());
        assert_eq!(
            write,
            if state == RESUMING {
                Ok(())
            } else {
                Err(EINVAL)
            }
        );
        let info = c.mig_precopy_info().map_err(|e| e.errno().unwrap());
        if matches!(state, PRE_COPY | PRE_COPY_P2P) {
            let (initial, dirty) = info.unwrap();
            assert!(initial > 0 && dirty > 0, "{initial} {dirty}");
        } else {
            assert_eq!(info, Err(EINVAL));
        }
    }
}

#[test]
fn pre_copy_sizing_counts_down_as_the_snapshot_is_read() {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    set(&mut c, PRE_COPY).unwrap();
    let (initial, dirty) = c.mig_precopy_info().unwrap();
    assert_eq!(initial, dirty, "the snapshot is the whole state");
    let d = c.mig_data_read(1000).unwrap();
    assert_eq!(d.len(), 1000);
    assert_eq!(c.mig_precopy_info().unwrap().0, initial - 1000);
    let rest = read_all(&mut c);
    assert_eq!(rest.len() as u64, initial - 1000);
    assert_eq!(c.mig_precopy_info().unwrap().0, 0);
    assert!(
        c.mig_data_read(64).unwrap().is_empty(),
        "nothing more for now"
    );
}

#[test]
fn a_stopped_mtty_takes_no_host_byte_and_raises_no_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("port0");
    let s = mtty_server(vec![HostEndpoint::UnixSocket(path.clone())]);
    let mut c = s.client();
    let efd = Efd::new();
    c.set_irq_eventfds(0, wire::IRQ_SET_ACTION_TRIGGER, 0, &[efd.as_fd()])
        .unwrap();
    c.region_write(0, regs::IER, &[regs::IER_RDI]).unwrap();
    set(&mut c, STOP).unwrap();
    let mut peer = UnixStream::connect(&path).unwrap();
    peer.write_all(b"x").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(efd.read(), None, "no interrupt while stopped");
    set(&mut c, RUNNING).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while efd.read().is_none() {
        assert!(Instant::now() < deadline, "the interrupt never came");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut b = [0u8];
    c.region_read(0, regs::RBR_THR, &mut b).unwrap();
    assert_eq!(&b, b"x");
}

#[test]
fn resuming_with_nothing_written_loads_nothing() {
    let s = TestServer::migratable_test_device();
    let mut c = s.client();
    c.region_write(0, 0, b"keep").unwrap();
    set(&mut c, RESUMING).unwrap();
    set(&mut c, RUNNING).unwrap();
    let mut b = [0u8; 4];
    c.region_read(0, 0, &mut b).unwrap();
    assert_eq!(&b, b"keep");
}
