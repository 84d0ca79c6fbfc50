#![allow(clippy::unwrap_used)]
//! umdevd killed with SIGKILL and started again: the mount comes back, auto-start
//! definitions are re-created, nothing stale is left (with worker isolation, a device whose
//! worker outlived the daemon is adopted, not stale); and a clean stop leaves nothing.

mod mdev;

use mdev::{new_uuid, require, Daemon, CONFIG};

fn sockets(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.root().join("sockets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn after_sigkill_a_restart_recovers_mount_sockets_and_auto_definitions() {
    require();
    let mut d = Daemon::start(CONFIG);
    let (auto, manual, transient) = (new_uuid(), new_uuid(), new_uuid());
    let defs = d.root().join("etc/mdevctl.d/mtty0");
    std::fs::create_dir_all(&defs).unwrap();
    let def = |t: &str, start: &str| {
        format!("{{\"mdev_type\":\"{t}\",\"start\":\"{start}\",\"attrs\":[]}}")
    };
    std::fs::write(defs.join(&auto), def("mtty-2", "auto")).unwrap();
    std::fs::write(defs.join(&manual), def("mtty-1", "manual")).unwrap();
    d.create("mtty0", "mtty-1", &transient).unwrap();
    assert_eq!(sockets(&d), vec![transient.clone()]);
    assert!(d.socket(&transient).exists());

    d.kill();
    // What a killed daemon leaves: a dead mount and its sockets.
    let e = std::fs::symlink_metadata(d.sys()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(107), "ENOTCONN");
    assert_eq!(sockets(&d).len(), 1);

    d.spawn();
    assert!(d.sys().join("class/mdev_bus/mtty0").exists());
    assert_eq!(d.devices("mtty0", "mtty-2"), vec![auto.clone()]);
    if std::env::var("UMDEV_TEST_ISOLATION").is_ok_and(|v| v == "worker") {
        // Its worker outlived the daemon and the new one adopted it: still there.
        assert_eq!(d.devices("mtty0", "mtty-1"), vec![transient.clone()]);
        let mut both = vec![auto.clone(), transient.clone()];
        both.sort();
        assert_eq!(sockets(&d), both);
        assert_eq!(d.available("mtty0", "mtty-2"), 10);
    } else {
        assert!(d.devices("mtty0", "mtty-1").is_empty());
        assert_eq!(sockets(&d), vec![auto.clone()]);
        assert_eq!(d.available("mtty0", "mtty-2"), 11);
    }

    d.stop();
    assert!(sockets(&d).is_empty());
    assert!(!d.root().join("state/control.sock").exists());
    // Unmounted: the mount point is an empty directory again.
    assert_eq!(std::fs::read_dir(d.sys()).unwrap().count(), 0);
}

#[test]
fn a_second_daemon_on_the_same_state_directory_is_refused() {
    require();
    let d = Daemon::start(CONFIG);
    let out = std::process::Command::new(mdev::binary("umdevd"))
        .arg("--root")
        .arg(d.root())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another umdevd"));
    assert!(d.sys().join("class/mdev_bus/mtty0").exists());
}
