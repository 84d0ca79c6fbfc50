//! Helpers shared by the unit tests of several modules.
#![allow(clippy::unwrap_used)] // A test that fails should panic.

use std::fs::File;
use std::os::fd::OwnedFd;

use rustix::fs::{memfd_create, MemfdFlags};

use crate::{AddressSpace, Backing, DmaLimits, IovaRange};

pub(crate) fn range(start: u64, len: u64) -> IovaRange {
    IovaRange::new(start, len).unwrap()
}

/// A memfd of `size` bytes; `name` shows in /proc/self/fd and /proc/self/maps.
pub(crate) fn memfd(name: &str, size: u64) -> OwnedFd {
    let fd = memfd_create(name, MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// A memfd to map (from offset 0), and a second handle to the same file.
pub(crate) fn memfd_pair(name: &str, size: u64) -> (Backing, File) {
    let fd = memfd(name, size);
    let other = File::from(fd.try_clone().unwrap());
    (Backing::Fd { fd, offset: 0 }, other)
}

pub(crate) fn space() -> AddressSpace {
    AddressSpace::new(DmaLimits::default())
}
