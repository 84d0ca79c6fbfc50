//! A worker's sandbox, applied by its main thread before any other thread exists (every
//! thread it starts later inherits it): no new privileges, no capabilities, Landlock rules
//! that let it open only its devices' directories and the paths their parent drivers
//! declare ([`umdev_core::Parent::sandbox_paths`]), and a seccomp filter of the system
//! calls a worker makes. A call outside the filter kills the worker (or, by configuration,
//! fails with EPERM, or is only logged by the kernel); the daemon notices its death, logs
//! it and starts it again.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::config::Violation;

/// A path the worker may open after sealing.
#[derive(Clone, Debug)]
pub struct Allowed {
    /// File or directory (its whole tree).
    pub path: PathBuf,
    /// Writable too.
    pub write: bool,
}

/// The system calls a worker makes once sealed: threads and memory, its sockets (UNIX only),
/// files it may open (Landlock decides which), time, and what the Rust runtime needs to
/// exit, abort or report a panic. Not in it: exec, fork, ptrace, mounts, namespaces,
/// network sockets, kernel modules, anything that changes credentials.
const SYSCALLS: &[i64] = &[
    // Memory and threads.
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_munlock,
    libc::SYS_memfd_create,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_prctl,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Signals (the runtime's own, and abort).
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    // Time.
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    // File descriptors and files (opened only where Landlock allows).
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_ioctl,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_poll,
    // Sockets (UNIX only: `socket` is checked below).
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
];

fn filter(on_violation: Violation) -> Result<seccompiler::BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        SYSCALLS.iter().map(|s| (*s, Vec::new())).collect();
    // socket(AF_UNIX, ...) only.
    let unix = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        u64::try_from(libc::AF_UNIX).context("AF_UNIX")?,
    )?;
    rules.insert(libc::SYS_socket, vec![SeccompRule::new(vec![unix])?]);
    let mismatch = match on_violation {
        Violation::Kill => SeccompAction::KillProcess,
        Violation::Eperm => SeccompAction::Errno(u32::try_from(libc::EPERM).context("EPERM")?),
        Violation::Log => SeccompAction::Log,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| anyhow::anyhow!("seccomp on {}: {e:?}", std::env::consts::ARCH))?;
    let f = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)?;
    Ok(f.try_into()?)
}

/// What sealing achieved, for the log.
#[derive(Debug)]
pub struct Sealed {
    /// Landlock's status.
    pub landlock: RulesetStatus,
}

/// Seals this process: call it from its only thread. Refuses to go on (an error) if a part
/// cannot be applied, except Landlock on a kernel without it (reported in [`Sealed`]).
pub fn seal(allowed: &[Allowed], on_violation: Violation) -> Result<Sealed> {
    rustix::thread::set_no_new_privs(true).context("no_new_privs")?;
    // Landlock: every file access is handled; the rules grant some back.
    let abi = ABI::V5;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .context("landlock")?
        .create()
        .context("landlock")?;
    for a in allowed {
        let fd = match PathFd::new(&a.path) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(path = %a.path.display(), error = %e, "sandbox: a declared path cannot be opened; left out");
                continue;
            }
        };
        let is_dir = std::fs::metadata(&a.path).is_ok_and(|m| m.is_dir());
        let access = match (is_dir, a.write) {
            (true, true) => AccessFs::from_all(abi),
            (true, false) => AccessFs::from_read(abi),
            (false, true) => AccessFs::from_file(abi),
            (false, false) => AccessFs::from_read(abi) & AccessFs::from_file(abi),
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .with_context(|| format!("landlock rule for {}", a.path.display()))?;
    }
    let status = ruleset.restrict_self().context("landlock")?;
    // No capabilities, now or after an exec (which the filter forbids anyway).
    rustix::thread::clear_ambient_capability_set().context("ambient capabilities")?;
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: rustix::thread::CapabilitySet::empty(),
            permitted: rustix::thread::CapabilitySet::empty(),
            inheritable: rustix::thread::CapabilitySet::empty(),
        },
    )
    .context("dropping capabilities")?;
    let bpf = filter(on_violation)?;
    seccompiler::apply_filter_all_threads(&bpf).context("seccomp")?;
    Ok(Sealed {
        landlock: status.ruleset,
    })
}
