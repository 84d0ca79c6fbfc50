#![allow(clippy::unwrap_used)]
//! The real mdevctl 1.4.0, unmodified, against umdevd's tree (`MDEVCTL_ENV_ROOT`), and
//! umdevctl against the control API: every command works and the two print the same.
//!
//! mdevctl is found as `$MDEVCTL`, on `PATH`, or in `~/.cargo/bin`; CI installs it
//! (`cargo install mdevctl --version 1.4.0`). Without it these tests fail, naming it.

mod mdev;

use std::path::PathBuf;
use std::process::{Command, Output};

use mdev::{binary, new_uuid, require, Daemon, CONFIG};

fn mdevctl_path() -> PathBuf {
    match std::env::var_os("MDEVCTL") {
        Some(p) => p.into(),
        None => umdev_tests::prereq::mdevctl(),
    }
}

struct Tools {
    d: Daemon,
    mdevctl: PathBuf,
}

impl Tools {
    fn start() -> Option<Tools> {
        require();
        let mdevctl = mdevctl_path();
        Some(Tools {
            d: Daemon::start(CONFIG),
            mdevctl,
        })
    }

    fn mdevctl(&self, args: &[&str]) -> Output {
        Command::new(&self.mdevctl)
            .args(args)
            .env("MDEVCTL_ENV_ROOT", self.d.root())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    }

    fn umdevctl(&self, args: &[&str]) -> Output {
        Command::new(binary("umdevctl"))
            .args(args)
            .env("UMDEV_CONTROL", self.d.control())
            .output()
            .unwrap()
    }

    /// Runs `args` with mdevctl, requires success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.mdevctl(args);
        assert!(
            o.status.success(),
            "mdevctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    fn uok(&self, args: &[&str]) -> String {
        let o = self.umdevctl(args);
        assert!(
            o.status.success(),
            "umdevctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Both tools print the same for `args`.
    fn same(&self, args: &[&str]) -> String {
        let a = self.ok(args);
        assert_eq!(a, self.uok(args), "mdevctl and umdevctl differ on {args:?}");
        a
    }
}

#[test]
fn mdevctl_types_match_umdevctl() {
    let Some(t) = Tools::start() else { return };
    let text = t.same(&["types"]);
    assert!(text
        .starts_with("mtty0\n  mtty-1\n    Available instances: 24\n    Device API: vfio-pci\n"));
    assert!(text.contains("mtty1\n  mtty-1\n    Available instances: 2\n"));
    t.same(&["types", "--dumpjson"]);
    t.same(&["types", "-p", "mtty1"]);
}

#[test]
fn mdevctl_start_list_define_stop_undefine() {
    let Some(t) = Tools::start() else { return };
    // start -p -t prints a new UUID and creates the device.
    let u = t.ok(&["start", "-p", "mtty0", "-t", "mtty-2"]);
    let u = u.trim();
    assert_eq!(u.len(), 36);
    assert_eq!(t.d.devices("mtty0", "mtty-2"), vec![u.to_owned()]);
    assert_eq!(t.same(&["list"]), format!("{u} mtty0 mtty-2 manual\n"));
    t.same(&["list", "--dumpjson"]);
    t.same(&["list", "-u", u, "--dumpjson"]);
    assert_eq!(t.d.available("mtty0", "mtty-2"), 11);

    // define --auto of the active device.
    t.ok(&["define", "--auto", "-u", u]);
    assert_eq!(
        t.same(&["list"]),
        format!("{u} mtty0 mtty-2 auto (defined)\n")
    );
    assert_eq!(
        t.same(&["list", "-d"]),
        format!("{u} mtty0 mtty-2 auto (active)\n")
    );
    t.same(&["list", "-d", "--dumpjson"]);
    let def = t.d.root().join("etc/mdevctl.d/mtty0").join(u);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&def).unwrap()).unwrap();
    assert_eq!(json["start"], "auto");

    // A device umdevctl started shows in mdevctl's list, and the other way round.
    let u2 = t.uok(&["start", "-p", "mtty1", "-t", "mtty-1"]);
    let u2 = u2.trim();
    let list = t.same(&["list"]);
    assert!(list.contains(&format!("{u2} mtty1 mtty-1 manual\n")));

    // stop removes the device; the definition stays.
    t.ok(&["stop", "-u", u]);
    t.uok(&["stop", "-u", u2]);
    assert_eq!(t.same(&["list"]), "");
    assert_eq!(t.same(&["list", "-d"]), format!("{u} mtty0 mtty-2 auto\n"));
    assert_eq!(t.d.available("mtty0", "mtty-2"), 12);

    // start -u of the defined device creates it again; undefine drops the definition.
    t.ok(&["start", "-u", u]);
    assert_eq!(
        t.same(&["list"]),
        format!("{u} mtty0 mtty-2 auto (defined)\n")
    );
    t.ok(&["stop", "-u", u]);
    t.ok(&["undefine", "-u", u]);
    assert_eq!(t.same(&["list", "-d"]), "");
    assert!(!def.exists());
    assert!(!t.mdevctl(&["stop", "-u", u]).status.success());
    assert!(!t.umdevctl(&["stop", "-u", u]).status.success());
}

#[test]
fn definitions_made_by_either_tool_read_the_same() {
    let Some(t) = Tools::start() else { return };
    let (a, b) = (new_uuid(), new_uuid());
    t.ok(&["define", "-u", &a, "-p", "mtty0", "-t", "mtty-1"]);
    t.uok(&["define", "-u", &b, "-p", "mtty0", "-t", "mtty-1", "--auto"]);
    t.ok(&["modify", "-u", &a, "--addattr", "x", "--value", "1"]);
    t.uok(&["modify", "-u", &b, "--addattr", "y", "--value", "2"]);
    t.uok(&[
        "modify",
        "-u",
        &b,
        "--addattr",
        "z",
        "--value",
        "3",
        "-i",
        "0",
    ]);
    t.same(&["list", "-d", "-v"]);
    t.same(&["list", "-d", "--dumpjson"]);
    // Both wrote the same file format.
    let root = t.d.root().join("etc/mdevctl.d/mtty0");
    let fa = std::fs::read_to_string(root.join(&a)).unwrap();
    let fb = std::fs::read_to_string(root.join(&b)).unwrap();
    assert!(fa.starts_with("{\n  \"mdev_type\": \"mtty-1\",\n  \"start\": \"manual\",\n"));
    assert!(fb.starts_with("{\n  \"mdev_type\": \"mtty-1\",\n  \"start\": \"auto\",\n"));
    t.uok(&["modify", "-u", &b, "--delattr", "-i", "0"]);
    t.uok(&["modify", "-u", &b, "--manual"]);
    t.same(&["list", "-d", "-v"]);
    t.uok(&["undefine", "-u", &a]);
    t.ok(&["undefine", "-u", &b]);
    assert_eq!(t.same(&["list", "-d"]), "");
}

#[test]
fn mdevctl_writes_attributes_after_start_and_undoes_a_failed_start() {
    let Some(t) = Tools::start() else { return };
    let (a, b) = (new_uuid(), new_uuid());
    let ua = t.ok(&["start", "-p", "p2p0", "-t", "mtty-1", "-u", &a]);
    assert_eq!(ua, "");
    let p2p = std::fs::read_to_string(t.d.mdev_dir(&a).join("peer_to_peer_resource_uuid")).unwrap();
    // b joins a's group through an attribute in its definition.
    let json = t.d.dir.path().join("b.json");
    std::fs::write(
        &json,
        format!(
            "{{\"mdev_type\":\"mtty-1\",\"start\":\"manual\",\"attrs\":[{{\"peer_to_peer_resource_uuid\":\"{}\"}}]}}",
            p2p.trim()
        ),
    )
    .unwrap();
    t.ok(&[
        "start",
        "-p",
        "p2p0",
        "-u",
        &b,
        "--jsonfile",
        json.to_str().unwrap(),
    ]);
    let g = |u: &str| std::fs::read_link(t.d.mdev_dir(u).join("iommu_group")).unwrap();
    assert_eq!(g(&a), g(&b));
    let groups = t.uok(&["groups"]);
    assert!(
        groups.contains(&format!("  {a}\n  {b}\n")) || groups.contains(&format!("  {b}\n  {a}\n"))
    );
    // An attribute the device does not have: mdevctl fails and removes the device.
    let c = new_uuid();
    t.ok(&["define", "-u", &c, "-p", "mtty0", "-t", "mtty-1"]);
    t.ok(&[
        "modify",
        "-u",
        &c,
        "--addattr",
        "no_such_attr",
        "--value",
        "1",
    ]);
    assert!(!t.mdevctl(&["start", "-u", &c]).status.success());
    assert!(!t.d.mdev_dir(&c).exists());
    assert!(!t.umdevctl(&["start", "-u", &c]).status.success());
    assert!(!t.d.mdev_dir(&c).exists());
}

#[test]
fn umdevctl_prints_the_socket_and_a_qemu_argument() {
    let Some(t) = Tools::start() else { return };
    let u = t.uok(&["start", "-p", "mtty0", "-t", "mtty-2"]);
    let u = u.trim();
    let out = t.uok(&["socket", u]);
    let sock = t.d.socket(u);
    assert_eq!(
        out,
        format!(
            "{p}\n-device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"type\":\"unix\",\"path\":\"{p}\"}}}}'\n",
            p = sock.display()
        )
    );
    // A client that holds the device shows in `groups`.
    let _client = umdev_client::Client::connect(&sock).unwrap();
    let groups = t.uok(&["groups"]);
    assert!(
        groups.contains(&format!("held by pid {} uid", std::process::id())),
        "{groups}"
    );
    let e = t.umdevctl(&["socket", &new_uuid()]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).starts_with("Error: "));
}

#[test]
fn umdevctl_generates_completions_and_a_man_page() {
    require();
    let run = |args: &[&str]| {
        let o = Command::new(binary("umdevctl"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8(o.stdout).unwrap()
    };
    assert!(run(&["completions", "bash"]).contains("umdevctl"));
    assert!(run(&["completions", "zsh"]).contains("#compdef umdevctl"));
    let man = run(&["manpage"]);
    assert!(man.contains(".TH umdevctl"));
    assert!(man.contains("groups"));
}

#[test]
fn a_parent_added_at_run_time_starts_its_auto_definitions_and_goes_with_its_devices() {
    let Some(t) = Tools::start() else { return };
    let (a, m) = (new_uuid(), new_uuid());
    t.ok(&["define", "--auto", "-u", &a, "-p", "mtty9", "-t", "mtty-1"]);
    t.ok(&["define", "-u", &m, "-p", "mtty9", "-t", "mtty-1"]);
    assert!(!t.d.sys().join("class/mdev_bus/mtty9").exists());
    t.uok(&[
        "add-parent",
        "mtty9",
        "mtty",
        "--opt",
        "console=none",
        "--opt",
        "ports=4",
    ]);
    // What mdevctl's udev rule would do: the auto definition is started, the manual one not.
    assert_eq!(
        t.same(&["list"]),
        format!("{a} mtty9 mtty-1 auto (defined)\n")
    );
    assert_eq!(t.d.available("mtty9", "mtty-1"), 3);
    assert!(!t
        .umdevctl(&["add-parent", "mtty9", "mtty"])
        .status
        .success());
    // Refused while a client holds one of its devices, unless forced.
    let sock = t.d.socket(&a);
    let _client = umdev_client::Client::connect(&sock).unwrap();
    let e = t.umdevctl(&["remove-parent", "mtty9"]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("in use"));
    assert!(t.d.mdev_dir(&a).exists());
    t.uok(&["remove-parent", "mtty9", "--force"]);
    assert!(!t.d.sys().join("class/mdev_bus/mtty9").exists());
    assert!(!t.d.mdev_dir(&a).exists());
    assert!(!sock.exists());
    assert_eq!(t.same(&["list"]), "");
    // The definitions stay, as they do when a kernel parent goes.
    assert_eq!(t.same(&["list", "-d"]).lines().count(), 2);
    assert!(!t.umdevctl(&["remove-parent", "mtty9"]).status.success());
}
