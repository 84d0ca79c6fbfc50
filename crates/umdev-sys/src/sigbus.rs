//! Memory a client can take away: a SIGBUS-safe access path for mappings of clients' files.
//!
//! A client may shrink a file it mapped for DMA (an unsealed memfd), a hugetlbfs pool may
//! run out, a page may be poisoned: the next access through the server's mapping raises
//! SIGBUS, which would kill the whole process. A [`Guard`] registers such a mapping; the
//! process-wide SIGBUS handler, when the faulting address lies in a guarded range, maps a
//! private zero page over the faulting page (`mmap(MAP_FIXED)`, which is async-signal-safe)
//! and marks the guard poisoned, and the access is retried and completes (a read sees
//! zeroes, a write goes nowhere). The code that made the access then checks
//! [`Guard::poisoned`] and fails the access instead of using the result. A fault outside
//! every guarded range is not ours: the default action is restored and the fault repeats,
//! killing the process as it would have.
//!
//! The table of ranges is a fixed array of atomics, read by the handler without locks or
//! allocation. Guarded ranges are never reused while an access may run in them (the
//! callers' access gates drain before a mapping goes).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use rustix::io::Errno;
use vm_memory::MmapRegion;

/// Most ranges guarded at once in a process.
pub const MAX_GUARDS: usize = 4096;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // Only to build the array below.
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    poisoned: AtomicBool::new(false),
};

static SLOTS: [Slot; MAX_GUARDS] = [EMPTY; MAX_GUARDS];
/// Slots in use, for registration (the handler reads `SLOTS` only).
static USED: Mutex<Vec<bool>> = Mutex::new(Vec::new());
/// Faults this process recovered from.
static RECOVERED: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The page the handler replaces (the mappings' page size: a 4 KiB page; a fault in a
/// hugetlbfs mapping cannot be replaced this way and keeps its default action).
const PAGE: usize = 4096;

fn page_size() -> usize {
    PAGE
}

/// The handler. Only async-signal-safe work: atomics and `mmap`.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a handler installed with SA_SIGINFO;
    // `si_addr` is the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS {
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= start.wrapping_add(len) {
            continue;
        }
        let page = addr & !(page_size() - 1);
        // SAFETY: `page` lies inside a guarded range, a live mapping of this process that
        // Rust code reaches only through volatile accesses (never references) and that
        // stays mapped while an access runs in it. Mapping a private anonymous page over it
        // changes only what that page holds; MAP_FIXED replaces exactly one page of it.
        let r = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                page_size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        slot.poisoned.store(true, Ordering::Release);
        if r != libc::MAP_FAILED {
            RECOVERED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        break;
    }
    // Not ours (or not recoverable): the default action, on the access's retry.
    // SAFETY: restoring the default disposition of SIGBUS is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Installs the SIGBUS handler (once per process). Call it before a sandbox forbids
/// `rt_sigaction`; [`Guard::new`] calls it too.
pub fn install() -> Result<(), Errno> {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value (no flags, an empty mask); the
        // handler is an `extern "C"` function with the SA_SIGINFO signature, async-signal-
        // safe (see `on_sigbus`).
        let ok = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) == 0
        };
        INSTALLED.store(ok, Ordering::Release);
    });
    if INSTALLED.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(Errno::INVAL)
    }
}

/// How many SIGBUS faults in guarded ranges this process has recovered from.
pub fn recovered() -> usize {
    RECOVERED.load(Ordering::Relaxed)
}

/// A guarded mapping: SIGBUS inside it poisons the guard instead of killing the process.
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Guards the whole of `region`. ENOSPC past [`MAX_GUARDS`] ranges.
    pub fn new(region: &MmapRegion) -> Result<Guard, Errno> {
        install()?;
        let mut used = USED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if used.is_empty() {
            used.resize(MAX_GUARDS, false);
        }
        let slot = used.iter().position(|u| !u).ok_or(Errno::NOSPC)?;
        used[slot] = true;
        let s = &SLOTS[slot];
        s.poisoned.store(false, Ordering::Release);
        s.len.store(region.size(), Ordering::Release);
        s.start.store(region.as_ptr() as usize, Ordering::Release);
        Ok(Guard { slot })
    }

    /// Whether an access in the range faulted (what it read or wrote is not the file's).
    pub fn poisoned(&self) -> bool {
        SLOTS[self.slot].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.start.store(0, Ordering::Release);
        s.len.store(0, Ordering::Release);
        USED.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[self.slot] = false;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use vm_memory::{FileOffset, VolatileMemory};

    #[test]
    fn a_shrunk_file_poisons_the_guard_instead_of_killing_the_process() {
        let fd = rustix::fs::memfd_create("sigbus-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 8192).unwrap();
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(
                std::fs::File::from(fd.try_clone().unwrap()),
                0,
            )),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap();
        let guard = Guard::new(&region).unwrap();
        let slice = region.as_volatile_slice();
        slice.get_slice(4096, 1).unwrap().copy_from(&[0x5au8]);
        assert!(!guard.poisoned());
        rustix::fs::ftruncate(&fd, 0).unwrap();
        let before = recovered();
        let mut buf = [0u8; 16];
        slice.get_slice(4096, 16).unwrap().copy_to(&mut buf[..]);
        assert!(guard.poisoned(), "the fault was not seen");
        assert_eq!(buf, [0u8; 16], "a read of gone memory sees zeroes");
        assert!(recovered() > before);
        drop(guard);
    }
}
