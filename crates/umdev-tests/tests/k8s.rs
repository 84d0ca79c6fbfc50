#![allow(clippy::unwrap_used)]
//! umdev-k8s, the device plugin, against a real umdevd and a stub kubelet
//! (`umdev_tests::kubelet`: Registration checking what the kubelet checks, pod resources,
//! and the calls the kubelet makes); and against an independent kubelet in Python whose
//! stubs `grpcio-tools` generates at test time from the kubelet's own proto file as the
//! `k8s-deviceplugin` crate ships it.
//!
//! - registration, options, ListAndWatch, Allocate of one and of two devices: each mount
//!   is one device's own directory holding a live vfio-user socket, `available_instances`
//!   dropped, the slot count did not change; a failed allocation leaves nothing;
//! - lifecycle: the kubelet restarting (re-registration within 2 s), a parent removed
//!   (its devices unhealthy), the pods no longer holding a device (removed after the grace
//!   period), the plugin restarting (same IDs, no instance lost).

mod mdev;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mdev::Daemon;
use umdev_tests::kubelet::{Kubelet, Plugin};

const CONFIG: &str = r#"
release_timeout_ms = 300

[[parent]]
name = "mtty0"
driver = "mtty"
options = { ports = 4, console = "none" }
"#;
const MTTY1: &str = "umdev.io/mtty-1";
/// A parent whose devices share peer-to-peer resources (they can share a group).
const PAIRS: &str = r#"
release_timeout_ms = 300

[[parent]]
name = "pair0"
driver = "mtty"
options = { ports = 4, console = "none", peer_to_peer = true }
"#;

/// The plugin against daemon `d` and kubelet `k`, with the grace period `grace_secs`.
fn plugin(d: &Daemon, k: &Kubelet, state: &Path, grace_secs: u32) -> Plugin {
    let grace = grace_secs.to_string();
    Plugin::start(
        &d.root(),
        k,
        state,
        &[
            "--owner",
            "0:0",
            "--cdi-kind",
            "umdev.io/mdev",
            "--grace-secs",
            &grace,
        ],
    )
}

fn ids(list: &umdev_k8s::api::v1beta1::ListAndWatchResponse) -> Vec<(String, String)> {
    list.devices
        .iter()
        .map(|d| (d.id.clone(), d.health.clone()))
        .collect()
}

/// Every entry of `dir` (a device's own directory, as mounted into the container).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn live(socket: &Path) {
    let mut c = umdev_client::Client::connect(socket).unwrap();
    assert_eq!(
        c.device_info().unwrap().num_regions,
        9,
        "{}",
        socket.display()
    );
}

#[test]
fn the_kubelet_registers_lists_and_allocates_one_and_two_devices() {
    let d = Daemon::start(CONFIG);
    let tmp = tempfile::tempdir().unwrap();
    let k = Kubelet::start(&tmp.path().join("device-plugins"));
    let _p = plugin(&d, &k, &tmp.path().join("state"), 60);
    for r in [MTTY1, "umdev.io/mtty-2"] {
        assert!(
            k.wait_registered(r, 0, Duration::from_secs(10)).is_some(),
            "{r}: {:?}",
            k.refused()
        );
    }
    assert!(k.refused().is_empty(), "{:?}", k.refused());
    let opts = k.options(MTTY1);
    assert!(!opts.pre_start_required && !opts.get_preferred_allocation_available);
    let mut watch = k.watch(MTTY1);
    let first = k.next(&mut watch, Duration::from_secs(5)).unwrap();
    let healthy = |n: usize| -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("mtty-1-{i}"), "Healthy".to_owned()))
            .collect()
    };
    assert_eq!(ids(&first), healthy(4));
    assert_eq!(d.available("mtty0", "mtty-1"), 4);

    // One device.
    let r = k.allocate(MTTY1, &["mtty-1-0"]).unwrap();
    let c = &r.container_responses[0];
    assert_eq!(c.mounts.len(), 1);
    let m = &c.mounts[0];
    assert_eq!(m.container_path, "/var/run/umdev/0");
    let uuid = &c.envs["UMDEV_DEVICE_0_UUID"];
    assert_eq!(
        c.envs["UMDEV_DEVICE_0_SOCKET"],
        "/var/run/umdev/0/vfio-user.sock"
    );
    assert_eq!(c.envs["UMDEV_DEVICES"], *uuid);
    assert_eq!(c.cdi_devices[0].name, format!("umdev.io/mdev={uuid}"));
    let host = PathBuf::from(&m.host_path);
    assert_eq!(host, d.device_dir(uuid), "the device's own directory");
    assert!(entries(&host).contains(&"vfio-user.sock".to_owned()));
    assert!(
        !entries(&host).iter().any(|e| e.len() == 36 && e != uuid),
        "no other device there"
    );
    live(&host.join("vfio-user.sock"));
    assert_eq!(d.available("mtty0", "mtty-1"), 3);
    // The slots did not change in number: the allocated one is still listed.
    let next = k.next(&mut watch, Duration::from_secs(3));
    if let Some(next) = next {
        assert_eq!(ids(&next), healthy(4));
    }

    // Two devices in one container: two mounts of two directories.
    let r = k.allocate(MTTY1, &["mtty-1-1", "mtty-1-2"]).unwrap();
    let c = &r.container_responses[0];
    assert_eq!(c.mounts.len(), 2);
    assert_eq!(c.mounts[1].container_path, "/var/run/umdev/1");
    assert_ne!(c.mounts[0].host_path, c.mounts[1].host_path);
    for (n, m) in c.mounts.iter().enumerate() {
        live(&Path::new(&m.host_path).join("vfio-user.sock"));
        assert!(
            d.device_dir(&c.envs[&format!("UMDEV_DEVICE_{n}_UUID")]) == Path::new(&m.host_path)
        );
    }
    assert_eq!(d.available("mtty0", "mtty-1"), 1);
    let mut fresh = k.watch(MTTY1);
    assert_eq!(
        ids(&k.next(&mut fresh, Duration::from_secs(5)).unwrap()),
        healthy(4)
    );

    // A slot allocated again gets a fresh instance: the pod never inherits the old one.
    let again = k.allocate(MTTY1, &["mtty-1-0"]).unwrap();
    let new_uuid = &again.container_responses[0].envs["UMDEV_DEVICE_0_UUID"];
    assert_ne!(new_uuid, uuid);
    assert!(!d.mdev_dir(uuid).exists(), "the old instance is gone");
    assert_eq!(d.available("mtty0", "mtty-1"), 1);

    // A failed allocation leaves nothing: two mtty-2 fit in 4 ports, but one is left.
    let two = "umdev.io/mtty-2";
    let before = d.devices("mtty0", "mtty-2");
    let e = k.allocate(two, &["mtty-2-0", "mtty-2-1"]).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
    assert_eq!(
        d.devices("mtty0", "mtty-2"),
        before,
        "what the call made is removed"
    );
    let e = k.allocate(MTTY1, &["gpu-7"]).unwrap_err();
    assert!(e.message().contains("not a device"), "{e}");
}

#[test]
fn lifecycle_kubelet_restart_parent_removal_release_and_plugin_restart() {
    let d = Daemon::start(CONFIG);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut k = Kubelet::start(&tmp.path().join("device-plugins"));
    let p = plugin(&d, &k, &state, 1);
    k.wait_registered(MTTY1, 0, Duration::from_secs(10))
        .unwrap();
    let held = k
        .allocate(MTTY1, &["mtty-1-1"])
        .unwrap()
        .container_responses[0]
        .envs["UMDEV_DEVICE_0_UUID"]
        .clone();
    let dropped = k
        .allocate(MTTY1, &["mtty-1-2"])
        .unwrap()
        .container_responses[0]
        .envs["UMDEV_DEVICE_0_UUID"]
        .clone();
    k.set_held(vec![(MTTY1.into(), vec!["mtty-1-1".into()])]);

    // The pods no longer hold mtty-1-2: removed after the grace period (1 s), not before.
    let t0 = Instant::now();
    while d.mdev_dir(&dropped).exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "an unheld instance was never removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "removed before the grace period"
    );
    assert!(d.mdev_dir(&held).exists(), "a held instance stays");
    assert_eq!(d.available("mtty0", "mtty-1"), 3);

    // The plugin restarts: the same IDs, the held instance kept.
    let mut watch = k.watch(MTTY1);
    let before = ids(&k.next(&mut watch, Duration::from_secs(5)).unwrap());
    drop(p);
    let n = k
        .registered()
        .iter()
        .filter(|r| r.req.resource_name == MTTY1)
        .count();
    let _p2 = plugin(&d, &k, &state, 1);
    k.wait_registered(MTTY1, n, Duration::from_secs(10))
        .unwrap();
    let mut watch = k.watch(MTTY1);
    assert_eq!(
        ids(&k.next(&mut watch, Duration::from_secs(5)).unwrap()),
        before
    );
    assert!(d.mdev_dir(&held).exists(), "no instance lost");

    // The kubelet restarts: the plugin registers every resource again within 2 s.
    let resources = [MTTY1, "umdev.io/mtty-2"];
    let counts: Vec<usize> = resources
        .iter()
        .map(|r| {
            k.registered()
                .iter()
                .filter(|x| x.req.resource_name == *r)
                .count()
        })
        .collect();
    let t = Instant::now();
    k.restart();
    for (r, n) in resources.iter().zip(counts) {
        let at = k
            .wait_registered(r, n, Duration::from_secs(10))
            .expect("re-registered");
        let took = at - t;
        assert!(
            took < Duration::from_secs(2),
            "{r}: re-registration took {took:?}"
        );
        eprintln!("re-registration of {r} after a kubelet restart: {took:?}");
    }

    // The parent goes: its devices are unhealthy.
    let mut watch = k.watch(MTTY1);
    k.next(&mut watch, Duration::from_secs(5)).unwrap();
    let o = d.umdevctl(&["remove-parent", "mtty0", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = k.next(&mut watch, Duration::from_secs(3));
        if let Some(l) = l {
            if !l.devices.is_empty() && l.devices.iter().all(|d| d.health == "Unhealthy") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the devices never went unhealthy"
        );
    }
}

#[test]
fn a_bundle_is_one_slot_of_devices_sharing_an_iommu_group() {
    let d = Daemon::start(PAIRS);
    let tmp = tempfile::tempdir().unwrap();
    let k = Kubelet::start(&tmp.path().join("device-plugins"));
    let _p = Plugin::start(
        &d.root(),
        &k,
        &tmp.path().join("state"),
        &["--bundle", "mtty-1=2"],
    );
    k.wait_registered(MTTY1, 0, Duration::from_secs(10))
        .unwrap();
    let mut watch = k.watch(MTTY1);
    let both = [
        ("mtty-1-0".to_owned(), "Healthy".to_owned()),
        ("mtty-1-1".to_owned(), "Healthy".to_owned()),
    ];
    assert_eq!(
        ids(&k.next(&mut watch, Duration::from_secs(5)).unwrap()),
        both,
        "4 ports make 2 bundles of 2"
    );
    let r = k.allocate(MTTY1, &["mtty-1-0"]).unwrap();
    let c = &r.container_responses[0];
    assert_eq!(c.mounts.len(), 2, "one slot, two devices");
    let uuids: Vec<&String> = (0..2)
        .map(|n| &c.envs[&format!("UMDEV_DEVICE_{n}_UUID")])
        .collect();
    for (n, uuid) in uuids.iter().enumerate() {
        assert_eq!(c.envs[&format!("UMDEV_DEVICE_{n}_SLOT")], "mtty-1-0");
        assert_eq!(
            Path::new(&c.mounts[n].host_path),
            d.device_dir(uuid),
            "each device's own directory"
        );
        live(&d.socket(uuid));
    }
    let group = |u: &str| std::fs::read_link(d.mdev_dir(u).join("iommu_group")).unwrap();
    assert_eq!(
        group(uuids[0]),
        group(uuids[1]),
        "the bundle shares a group"
    );
    assert_eq!(d.available("pair0", "mtty-1"), 2);

    // One of the bundle's devices removed behind the plugin's back: the slot is unhealthy.
    d.remove(uuids[1]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = k.next(&mut watch, Duration::from_secs(3)) {
            if ids(&l)
                == [
                    ("mtty-1-0".to_owned(), "Unhealthy".to_owned()),
                    ("mtty-1-1".to_owned(), "Healthy".to_owned()),
                ]
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the slot never went unhealthy");
    }

    // A parent whose devices cannot share a group cannot make a bundle: a clear error, and
    // nothing is left behind.
    let plain = Daemon::start(CONFIG);
    let k2 = Kubelet::start(&tmp.path().join("device-plugins-2"));
    let _p2 = Plugin::start(
        &plain.root(),
        &k2,
        &tmp.path().join("state-2"),
        &["--bundle", "mtty-1=2"],
    );
    k2.wait_registered(MTTY1, 0, Duration::from_secs(10))
        .unwrap();
    let e = k2.allocate(MTTY1, &["mtty-1-0"]).unwrap_err();
    assert!(e.message().contains("peer-to-peer"), "{e}");
    assert!(plain.devices("mtty0", "mtty-1").is_empty());
}

/// A slot allocated again is a new disk: the next pod cannot read what the last one wrote,
/// whether the pool keeps a removed device's file (mnvme's default, for `mdevctl stop` and
/// `start`) or deletes it (`delete_on_remove`, what a cluster's pool should say).
#[test]
fn a_reallocated_disk_holds_nothing_of_the_last_pod() {
    for delete in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let pool = tmp.path().join("pool");
        let d = Daemon::start(&format!(
            "[[parent]]\nname = \"nvme0\"\ndriver = \"mnvme\"\noptions = {{ pool = {:?}, capacity_gib = 1, delete_on_remove = {delete} }}\n",
            pool.display().to_string()
        ));
        let k = Kubelet::start(&tmp.path().join("device-plugins"));
        let _p = Plugin::start(&d.root(), &k, &tmp.path().join("state"), &[]);
        let r = "umdev.io/mnvme-1g";
        k.wait_registered(r, 0, Duration::from_secs(10)).unwrap();
        let backing = |uuid: &str| {
            PathBuf::from(
                std::fs::read_to_string(d.mdev_dir(uuid).join("vendor/backing_file"))
                    .unwrap()
                    .trim(),
            )
        };
        let first = k.allocate(r, &["mnvme-1g-0"]).unwrap().container_responses[0].envs
            ["UMDEV_DEVICE_0_UUID"]
            .clone();
        let old = backing(&first);
        std::fs::write(&old, b"the last pod's secret").unwrap();
        let second = k.allocate(r, &["mnvme-1g-0"]).unwrap().container_responses[0].envs
            ["UMDEV_DEVICE_0_UUID"]
            .clone();
        let new = backing(&second);
        assert_ne!(new, old);
        let mut head = vec![0u8; 64];
        use std::io::Read;
        std::fs::File::open(&new)
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert!(head.iter().all(|b| *b == 0), "delete_on_remove={delete}");
        assert_eq!(old.exists(), !delete, "delete_on_remove={delete}");
    }
}

/// The same calls from a kubelet written in Python, its stubs generated by grpcio-tools
/// from the kubelet's own v1beta1 proto (as the k8s-deviceplugin crate ships it, found
/// through `cargo metadata`): an independent check of the wire schema.
#[test]
fn an_independent_kubelet_in_python_sees_the_same_answers() {
    let proto = kubelet_proto();
    let python = umdev_tests::prereq::python_grpc();
    let d = Daemon::start(CONFIG);
    let tmp = tempfile::tempdir().unwrap();
    let gen = tmp.path().join("gen");
    std::fs::create_dir_all(&gen).unwrap();
    let o = Command::new(&python)
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", proto.parent().unwrap().display()))
        .arg(format!("--python_out={}", gen.display()))
        .arg(format!("--grpc_python_out={}", gen.display()))
        .arg(&proto)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let dir = tmp.path().join("device-plugins");
    std::fs::create_dir_all(&dir).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/k8s/kubelet.py");
    let mut py = Command::new(&python)
        .arg(&script)
        .arg(&dir)
        .arg(MTTY1)
        .env("PYTHONPATH", &gen)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(py.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "listening");
    // The plugin, pointed at the Python kubelet (no pod resources there: no clean-up).
    let k_dir = dir.clone();
    let mut plugin = Command::new(umdev_tests::prereq::binary("umdev-k8s"))
        .arg("--root")
        .arg(d.root())
        .arg("--kubelet-dir")
        .arg(&k_dir)
        .arg("--pod-resources")
        .arg(tmp.path().join("none.sock"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["--interval-ms", "100"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut report = String::new();
    for l in lines {
        let l = l.unwrap();
        report.push_str(&l);
        report.push('\n');
        if l.starts_with("done") {
            break;
        }
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&plugin),
        rustix::process::Signal::TERM,
    );
    plugin.wait().unwrap();
    assert!(py.wait().unwrap().success(), "{report}");
    let field = |k: &str| {
        report
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no {k} in {report}"))
            .to_owned()
    };
    assert_eq!(
        field("register"),
        "version=v1beta1 resource=umdev.io/mtty-1 endpoint=umdev-mtty-1.sock"
    );
    assert_eq!(
        field("options"),
        "pre_start_required=False get_preferred_allocation_available=False"
    );
    assert_eq!(
        field("devices"),
        "mtty-1-0:Healthy mtty-1-1:Healthy mtty-1-2:Healthy mtty-1-3:Healthy"
    );
    let uuid = field("env.UMDEV_DEVICE_0_UUID");
    assert_eq!(
        field("mount"),
        format!("/var/run/umdev/0 <- {}", d.device_dir(&uuid).display())
    );
    assert_eq!(
        field("env.UMDEV_DEVICE_0_SOCKET"),
        "/var/run/umdev/0/vfio-user.sock"
    );
    live(&d.device_dir(&uuid).join("vfio-user.sock"));
    assert_eq!(d.available("mtty0", "mtty-1"), 3);
}

/// The kubelet's v1beta1 proto in the k8s-deviceplugin crate's sources (a dev-dependency
/// of umdev-k8s that is fetched, never built).
fn kubelet_proto() -> PathBuf {
    let o = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../umdev-k8s/Cargo.toml"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pkg = m["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "k8s-deviceplugin")
        .expect("k8s-deviceplugin in cargo metadata");
    let manifest = PathBuf::from(pkg["manifest_path"].as_str().unwrap());
    let proto = manifest.parent().unwrap().join("proto/v1beta1.proto");
    assert!(proto.exists(), "{}", proto.display());
    proto
}
