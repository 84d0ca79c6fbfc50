//! umdev-sys: the only crate of the workspace with `unsafe` code. It wraps the few system
//! calls whose Rust bindings are `unsafe` in functions that are safe to call, checking the
//! invariants themselves.
//!
//! - [`mlock`] / [`munlock`]: lock pages of a live [`MmapRegion`] in memory, for pinning
//!   with real locking.
//! - [`sigbus`]: a SIGBUS-safe access path for mappings of clients' files (a fault poisons
//!   the mapping's guard instead of killing the process).
//!
//! ```
//! use vm_memory::MmapRegion;
//! let region = MmapRegion::<()>::new(8192).unwrap();
//! // May fail without CAP_IPC_LOCK and a small RLIMIT_MEMLOCK; never unsound.
//! if umdev_sys::mlock(&region, 4096, 4096).is_ok() {
//!     umdev_sys::munlock(&region, 4096, 4096).unwrap();
//! }
//! assert!(umdev_sys::mlock(&region, 4096, 8192).is_err(), "past the end");
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod sigbus;

use rustix::io::Errno;
use vm_memory::MmapRegion;

/// The address of `[offset, offset + len)` of `region`, checked to lie inside it.
fn range_ptr(region: &MmapRegion, offset: usize, len: usize) -> Result<*mut u8, Errno> {
    match offset.checked_add(len) {
        Some(end) if end <= region.size() && len > 0 => Ok(region.as_ptr().wrapping_add(offset)),
        _ => Err(Errno::INVAL),
    }
}

/// Locks `[offset, offset + len)` of `region` in memory (`mlock(2)`).
///
/// EINVAL if the range is empty or not inside the region; otherwise `mlock`'s errno (ENOMEM
/// or EPERM past `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`).
pub fn mlock(region: &MmapRegion, offset: usize, len: usize) -> Result<(), Errno> {
    let ptr = range_ptr(region, offset, len)?;
    // SAFETY: `ptr..ptr + len` lies inside `region`, a mapping that stays mapped for the
    // whole call since we borrow it. mlock neither reads nor writes the memory nor changes
    // its mapping; it only makes the kernel keep its pages resident (and faults them in,
    // which for a shared file mapping cannot raise a signal: the region was checked against
    // the file size when it was built). No Rust reference to the memory is created.
    unsafe { rustix::mm::mlock(ptr.cast(), len) }
}

/// Unlocks `[offset, offset + len)` of `region` (`munlock(2)`). Errors as [`mlock`].
pub fn munlock(region: &MmapRegion, offset: usize, len: usize) -> Result<(), Errno> {
    let ptr = range_ptr(region, offset, len)?;
    // SAFETY: as in `mlock`: the range lies inside the borrowed live mapping, and munlock
    // only lets the kernel page it out again; it touches no memory Rust can see.
    unsafe { rustix::mm::munlock(ptr.cast(), len) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;

    #[test]
    fn ranges_outside_the_region_are_einval() {
        let r = MmapRegion::<()>::new(4096).unwrap();
        assert_eq!(mlock(&r, 0, 0), Err(Errno::INVAL));
        assert_eq!(mlock(&r, 4096, 1), Err(Errno::INVAL));
        assert_eq!(munlock(&r, usize::MAX, 2), Err(Errno::INVAL));
    }

    #[test]
    fn lock_then_unlock_a_page() {
        let r = MmapRegion::<()>::new(4096).unwrap();
        // Without privilege and with a tiny RLIMIT_MEMLOCK this may be refused; as root it
        // must work.
        if rustix::process::geteuid().is_root() {
            mlock(&r, 0, 4096).unwrap();
            munlock(&r, 0, 4096).unwrap();
        }
    }
}
