//! Property test: random map/unmap/pin/unpin sequences against a naive model of the pin
//! table and the budget. Same answer for every call, the same pinned pages and charges after
//! each, revocation when an unmap finds pins, and no leak at the end: every pin released,
//! every mmap unmapped, every fd closed.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use proptest::prelude::*;
use rustix::io::Errno;
use umdev_dma::{AddressSpace, Backing, ClientMemory, DmaLimits, IovaRange, Prot, PAGE_SIZE};

/// Mapping slots: slot `i` covers IOVA pages `4i..4i+4`. Slot 3 aliases slot 0's file pages.
const SLOTS: u64 = 4;
const BUDGET: u64 = 6;

fn host_base(slot: u64) -> u64 {
    if slot == 3 {
        0
    } else {
        slot * 4
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map(u64, bool),
    Unmap(u64),
    Pin(usize, u64, usize, u8),
    Unpin(usize, u64, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SLOTS, any::<bool>()).prop_map(|(s, w)| Op::Map(s, w)),
        1 => (0..SLOTS).prop_map(Op::Unmap),
        5 => (0..2usize, 0..18u64, prop_oneof![8 => 0..5usize, 1 => Just(513)], 1..=3u8)
            .prop_map(|(d, p, n, b)| Op::Pin(d, p, n, b)),
        4 => (0..2usize, 0..18u64, prop_oneof![8 => 0..5usize, 1 => Just(513)])
            .prop_map(|(d, p, n)| Op::Unpin(d, p, n)),
    ]
}

#[derive(Default)]
struct Model {
    /// slot -> writable
    maps: BTreeMap<u64, bool>,
    /// (device, iova page) -> pin count
    pins: BTreeMap<(usize, u64), u32>,
    revoked: [bool; 2],
}

impl Model {
    fn host(&self, page: u64) -> u64 {
        host_base(page / 4) + page % 4
    }

    fn charged(&self) -> u64 {
        let hosts: BTreeSet<u64> = self.pins.keys().map(|&(_, p)| self.host(p)).collect();
        hosts.len() as u64
    }

    fn check(&self, dev: usize, n: usize) -> Result<(), Errno> {
        if self.revoked[dev] {
            return Err(Errno::IO);
        }
        if n == 0 {
            return Err(Errno::INVAL);
        }
        if n > 512 {
            return Err(Errno::TOOBIG);
        }
        Ok(())
    }

    fn pin(&mut self, dev: usize, page: u64, n: usize, prot: Prot) -> Result<(), Errno> {
        self.check(dev, n)?;
        for p in page..page + n as u64 {
            match self.maps.get(&(p / 4)) {
                Some(&w) if w || !prot.contains(Prot::WRITE) => {}
                _ => return Err(Errno::INVAL),
            }
        }
        let mut after = self.pins.clone();
        for p in page..page + n as u64 {
            *after.entry((dev, p)).or_default() += 1;
        }
        let hosts: BTreeSet<u64> = after.keys().map(|&(_, p)| self.host(p)).collect();
        if hosts.len() as u64 > BUDGET {
            return Err(Errno::NOMEM);
        }
        self.pins = after;
        Ok(())
    }

    fn unpin(&mut self, dev: usize, page: u64, n: usize) -> Result<(), Errno> {
        self.check(dev, n)?;
        if (page..page + n as u64).any(|p| !self.pins.contains_key(&(dev, p))) {
            return Err(Errno::INVAL);
        }
        for p in page..page + n as u64 {
            let c = self.pins.get_mut(&(dev, p)).unwrap();
            *c -= 1;
            if *c == 0 {
                self.pins.remove(&(dev, p));
            }
        }
        Ok(())
    }

    fn unmap(&mut self, slot: u64) -> Result<(), Errno> {
        self.maps.remove(&slot).ok_or(Errno::NOENT)?;
        for dev in 0..2 {
            if self.pins.keys().any(|&(d, p)| d == dev && p / 4 == slot) {
                self.revoked[dev] = true;
                self.pins.retain(|&(d, _), _| d != dev);
            }
        }
        Ok(())
    }
}

fn memfd() -> OwnedFd {
    let fd = rustix::fs::memfd_create("umdev-pin-model", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 16 * PAGE_SIZE).unwrap();
    fd
}

/// Open fds of this process on the file with inode `ino`.
fn fds_on(ino: u64) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
        .filter(|m| std::os::unix::fs::MetadataExt::ino(m) == ino)
        .count()
}

fn errno<T>(r: Result<T, umdev_dma::DmaError>) -> Result<(), Errno> {
    r.map(|_| ()).map_err(|e| e.as_errno())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn pin_table_agrees_with_naive_model(ops in proptest::collection::vec(op(), 1..50)) {
        let file = memfd();
        let ino = rustix::fs::fstat(&file).unwrap().st_ino;
        let client = ClientMemory::new(BUDGET * PAGE_SIZE, false);
        let space = Arc::new(AddressSpace::with_client(DmaLimits::default(), client.clone()));
        let devs = [space.pinner(), space.pinner()];
        let mut model = Model::default();
        for op in &ops {
            match *op {
                Op::Map(slot, w) => {
                    let range = IovaRange::new(slot * 4 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
                    let prot = if w { Prot::READ_WRITE } else { Prot::READ };
                    let fd = rustix::io::fcntl_dupfd_cloexec(file.as_fd(), 0).unwrap();
                    let backing = Backing::Fd { fd, offset: host_base(slot) * PAGE_SIZE };
                    let got = errno(space.map(range, prot, backing));
                    let want = match model.maps.entry(slot) {
                        std::collections::btree_map::Entry::Occupied(_) => Err(Errno::EXIST),
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(w);
                            Ok(())
                        }
                    };
                    prop_assert_eq!(got, want, "{:?}", op);
                }
                Op::Unmap(slot) => {
                    let range = IovaRange::new(slot * 4 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
                    prop_assert_eq!(errno(space.unmap(range)), model.unmap(slot), "{:?}", op);
                }
                Op::Pin(dev, page, n, bits) => {
                    let prot = Prot::from_bits(bits).unwrap();
                    let got = errno(devs[dev].pin(page * PAGE_SIZE, n, prot));
                    prop_assert_eq!(got, model.pin(dev, page, n, prot), "{:?}", op);
                }
                Op::Unpin(dev, page, n) => {
                    let got = errno(devs[dev].unpin(page * PAGE_SIZE, n));
                    prop_assert_eq!(got, model.unpin(dev, page, n), "{:?}", op);
                }
            }
            prop_assert_eq!(space.pinned_pages(), model.pins.len() as u64, "after {:?}", op);
            prop_assert_eq!(client.locked_bytes(), model.charged() * PAGE_SIZE, "after {:?}", op);
            for (d, p) in devs.iter().enumerate() {
                prop_assert_eq!(p.is_revoked(), model.revoked[d]);
                let mine = model.pins.keys().filter(|k| k.0 == d).count() as u64;
                prop_assert_eq!(p.pinned_pages(), mine);
            }
        }
        // The client goes: devices first, then every mapping.
        drop(devs);
        prop_assert_eq!(space.pinned_pages(), 0);
        prop_assert_eq!(client.locked_bytes(), 0);
        space.unmap_all();
        prop_assert_eq!(client.mmap_count(), 0);
        prop_assert_eq!(fds_on(ino), 1, "only our own fd is left");
    }
}
