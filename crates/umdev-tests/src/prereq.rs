//! What the tests that use real parts need, checked up front. A missing prerequisite fails
//! the test with a message naming it and the command that provides it: the test command
//! never reports green for work it did not do. To leave such tests out on purpose, filter
//! them (`cargo nextest run --workspace -E 'not binary(/^(mdev_|guest_|migration_cli)/)'`),
//! which nextest counts and reports as skipped.

use std::path::{Path, PathBuf};

/// A built workspace binary: `$CARGO_BIN_EXE_<name>` if set, else in the target directory
/// next to the running test (`target/debug/<name>`).
pub fn binary(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    // The test binary is target/debug/deps/<test>-<hash>.
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

const FILTER: &str = "or leave these tests out on purpose (nextest reports them as skipped): \
     cargo nextest run --workspace -E 'not binary(/^(mdev_|guest_|migration_cli)/)'";

fn missing(what: &str, how: &str) -> ! {
    panic!("prerequisite missing: {what}. Provide it with: {how}; {FILTER}");
}

/// Root, `/dev/fuse` and the built daemon binaries: what every test of a real `umdevd` with
/// its FUSE tree needs.
pub fn daemon() {
    if !Path::new("/dev/fuse").exists() {
        missing(
            "/dev/fuse",
            "modprobe fuse (or a machine or container with FUSE)",
        );
    }
    if !rustix::process::geteuid().is_root() {
        missing(
            "root (the daemon mounts its FUSE tree and binds sockets under its root)",
            "sudo -E cargo nextest run ...",
        );
    }
    for b in ["umdevd", "umdevctl"] {
        if !binary(b).exists() {
            missing(
                &format!("{} (a workspace binary)", binary(b).display()),
                "cargo build --workspace --bins",
            );
        }
    }
}

/// The real `mdevctl` 1.4.0 (Debian's 1.2.0 predates `MDEVCTL_ENV_ROOT`).
pub fn mdevctl() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("mdevctl"))
            .find(|p| p.exists())
    });
    let Some(path) = found.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home).join(".cargo/bin/mdevctl");
        p.exists().then_some(p)
    }) else {
        missing(
            "mdevctl 1.4.0",
            "RST2MAN=true cargo install --locked mdevctl --version 1.4.0",
        );
    };
    path
}

/// A Python 3 with `grpcio-tools` (from PyPI: Debian's is too old for the kubelet's
/// proto), for the independent kubelet of the device plugin's tests.
pub fn python_grpc() -> PathBuf {
    python_with("import grpc, grpc_tools.protoc", "grpcio-tools")
}

/// A Python 3 with PyYAML (the Kubernetes manifests' check parses them with it).
pub fn python_yaml() -> PathBuf {
    python_with("import yaml", "pyyaml")
}

/// A Python 3 for which `import` succeeds, else a failure naming the PyPI package.
fn python_with(import: &str, package: &str) -> PathBuf {
    for py in ["python3", "python"] {
        let ok = std::process::Command::new(py)
            .args(["-c", import])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return PathBuf::from(py);
        }
    }
    missing(
        &format!("Python 3 with {package}"),
        &format!("python3 -m pip install {package}"),
    );
}

/// The cached guest environment (a Debian chroot with QEMU 11 and a kernel) that
/// `tests/guest/setup.sh` builds; returns the cache directory.
pub fn guest_cache() -> PathBuf {
    let cache = std::env::var_os("UMDEV_GUEST_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| PathBuf::from(d).join("umdev-guest"))
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/umdev-guest"))
                })
        })
        .unwrap_or_else(|| {
            missing(
                "HOME or UMDEV_GUEST_CACHE",
                "export UMDEV_GUEST_CACHE=<dir>",
            )
        });
    if !cache.join("ready").exists() {
        missing(
            &format!("the guest environment in {}", cache.display()),
            "sudo bash tests/guest/setup.sh",
        );
    }
    cache
}
