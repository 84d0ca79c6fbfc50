//! What an administrator installs from `deploy/`: the systemd unit passes
//! `systemd-analyze verify` (with its ExecStart pointed at the built daemon: these machines
//! run no systemd, but the analyzer checks the unit's syntax, directives and command), and
//! the example configuration is one the daemon takes, with the shipped drivers.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"))
}

#[test]
fn the_systemd_unit_verifies() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "prerequisite missing: systemd-analyze. Provide it with: apt-get install systemd"
    );
    let umdevd = umdev_tests::prereq::binary("umdevd");
    assert!(
        umdevd.exists(),
        "prerequisite missing: {} (cargo build --workspace --bins)",
        umdevd.display()
    );
    let unit = std::fs::read_to_string(deploy().join("umdevd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/umdevd --config /etc/umdev/umdevd.toml"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("umdevd.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/umdevd", &umdevd.display().to_string()),
    )
    .unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

#[test]
fn the_example_configuration_is_valid() {
    let config = umdevd::Config::load(&deploy().join("umdevd.toml")).unwrap();
    let mut drivers = umdev_core::Drivers::default();
    drivers.add(umdev_mtty::MttyDriver);
    drivers.add(umdev_mnvme::MnvmeDriver);
    config.check(&drivers).unwrap();
    // The pool sits in the unit's state directory, which the unit lets it write.
    let unit = std::fs::read_to_string(deploy().join("umdevd.service")).unwrap();
    let pool = config
        .parent
        .iter()
        .flatten()
        .find(|p| p.driver == "mnvme")
        .and_then(|p| p.options.get("pool"))
        .and_then(|v| v.as_str())
        .map(str::to_owned);
    assert_eq!(pool.as_deref(), Some("/var/lib/umdev/nvme0"));
    assert!(
        unit.contains("StateDirectory=umdev")
            && unit.contains("ReadWritePaths=/run/umdev /var/lib/umdev")
    );
    assert_eq!(config.root, Path::new("/run/umdev"));
    assert_eq!(
        config.control_socket(),
        Path::new("/run/umdev/state/control.sock")
    );
}
