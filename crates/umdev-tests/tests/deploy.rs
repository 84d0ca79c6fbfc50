//! What an administrator installs from `deploy/`: the systemd unit passes
//! `systemd-analyze verify` (with its ExecStart pointed at the built daemon: these machines
//! run no systemd, but the analyzer checks the unit's syntax, directives and command), and
//! the example configuration is one the daemon takes, with the shipped drivers; the
//! Kubernetes manifests parse, run the workspace's binaries with options they have and a
//! configuration the daemon takes; the KubeVirt hook script turns a sample VMI and domain
//! into a domain with the plugin's devices and shared guest memory.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"))
}

#[test]
fn the_systemd_units_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "prerequisite missing: systemd-analyze. Provide it with: apt-get install systemd"
    );
    // Both in one directory: the plugin's unit requires the daemon's.
    let dir = tempfile::tempdir().unwrap();
    let units = [
        unit_to_verify(
            dir.path(),
            "umdevd.service",
            "umdevd",
            "--config /etc/umdev/umdevd.toml",
        ),
        unit_to_verify(
            dir.path(),
            "umdev-k8s.service",
            "umdev-k8s",
            "--root /run/umdev --owner 107:107 --grace-secs 60",
        ),
    ];
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.trim().is_empty(), "{text}");
}

/// `deploy/<unit_name>` copied into `dir` with its `ExecStart` pointed at the built `binary`,
/// after checking that it runs it with `args` and that the binary takes them (`--help`
/// after them shows they parse).
fn unit_to_verify(dir: &Path, unit_name: &str, binary: &str, args: &str) -> std::path::PathBuf {
    let built = umdev_tests::prereq::binary(binary);
    assert!(
        built.exists(),
        "prerequisite missing: {} (cargo build --workspace --bins)",
        built.display()
    );
    let installed = format!("/usr/local/bin/{binary}");
    let unit = std::fs::read_to_string(deploy().join(unit_name)).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={installed} {args}\n")),
        "{unit_name}"
    );
    let parsed = Command::new(&built)
        .args(args.split(' '))
        .arg("--help")
        .output()
        .unwrap();
    assert!(parsed.status.success(), "{binary} {args}: {parsed:?}");
    let path = dir.join(unit_name);
    std::fs::write(
        &path,
        unit.replace(&installed, &built.display().to_string()),
    )
    .unwrap();
    path
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

/// Every document of a YAML file, as JSON (PyYAML reads it: no YAML crate is well kept).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let python = umdev_tests::prereq::python_yaml();
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_kubernetes_manifests_run_our_binaries_with_options_they_have() {
    let docs = yaml_docs(&deploy().join("k8s/umdev-node.yaml"));
    let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap();
    // The daemon's configuration is one it takes.
    let toml = kind("ConfigMap")["data"]["umdevd.toml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("umdevd.toml"), toml).unwrap();
    let config = umdevd::Config::load(&dir.path().join("umdevd.toml")).unwrap();
    let mut drivers = umdev_core::Drivers::default();
    drivers.add(umdev_mtty::MttyDriver);
    drivers.add(umdev_mnvme::MnvmeDriver);
    config.check(&drivers).unwrap();
    assert_eq!(config.root, Path::new("/run/umdev"));

    let spec = &kind("DaemonSet")["spec"]["template"]["spec"];
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    for c in containers {
        let cmd: Vec<&str> = c["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let name = cmd[0].strip_prefix("/usr/local/bin/").unwrap();
        let binary = umdev_tests::prereq::binary(name);
        let help = Command::new(&binary).arg("--help").output().unwrap();
        assert!(help.status.success(), "{}", binary.display());
        let help = String::from_utf8_lossy(&help.stdout);
        for flag in cmd.iter().filter(|a| a.starts_with("--")) {
            assert!(
                help.contains(&format!("{flag} ")),
                "{name} has no option {flag}"
            );
        }
        // The tree and the sockets are at the same path on the host and in the container.
        let mounts = c["volumeMounts"].as_array().unwrap();
        let run = mounts.iter().find(|m| m["name"] == "run").unwrap();
        assert_eq!(run["mountPath"], "/run/umdev");
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "run")
            .unwrap();
        assert_eq!(volume["hostPath"]["path"], "/run/umdev");
    }
    // The umdevd container's mounts reach the plugin's.
    assert_eq!(
        containers[0]["volumeMounts"][0]["mountPropagation"],
        "Bidirectional"
    );
    assert_eq!(
        containers[1]["volumeMounts"][0]["mountPropagation"],
        "HostToContainer"
    );

    // The VMI example's hook annotation names the script by its hook's name.
    let vmi = &yaml_docs(&deploy().join("k8s/kubevirt/vmi-example.yaml"))[0];
    let hooks: Value = serde_json::from_str(
        vmi["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(hooks[0]["configMap"]["hookPath"], "/usr/bin/onDefineDomain");
    assert_eq!(
        vmi["spec"]["domain"]["resources"]["limits"]["umdev.io/mnvme-1g"],
        "1"
    );
}

/// Runs the hook script as KubeVirt's sidecar-shim does.
fn hook(vmi: &Value, domain: &str) -> String {
    let out = Command::new("python3")
        .arg(deploy().join("k8s/kubevirt/onDefineDomain"))
        .arg("--vmi")
        .arg(vmi.to_string())
        .arg("--domain")
        .arg(domain)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_kubevirt_hook_adds_the_pods_devices_and_shared_memory() {
    let domain = r#"<domain type="kvm"><name>vm</name><memoryBacking><source type="anonymous"/></memoryBacking><devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"#;
    let vmi = serde_json::json!({
        "metadata": {"name": "vm"},
        "spec": {"domain": {"resources": {"limits": {
            "umdev.io/mnvme-1g": "1", "umdev.io/mtty-1": "1", "memory": "2Gi"}}}}
    });
    let out = hook(&vmi, domain);
    assert!(
        out.contains(r#"xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0""#),
        "{out}"
    );
    for n in 0..2 {
        let dev = format!(
            r#"<qemu:arg value="{{&quot;driver&quot;:&quot;vfio-user-pci&quot;,&quot;socket&quot;:{{&quot;type&quot;:&quot;unix&quot;,&quot;path&quot;:&quot;/var/run/umdev/{n}/vfio-user.sock&quot;}}}}" />"#
        );
        assert!(out.contains(&dev), "no device {n} in {out}");
    }
    assert_eq!(out.matches(r#"<qemu:arg value="-device" />"#).count(), 2);
    assert!(!out.contains("/var/run/umdev/2/"), "{out}");
    assert!(
        out.contains(
            r#"<memoryBacking><source type="memfd" /><access mode="shared" /></memoryBacking>"#
        ),
        "{out}"
    );
    assert!(out.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"));
    // The annotation overrides the count (a bundle is several devices per unit).
    let bundled = serde_json::json!({
        "metadata": {"annotations": {"umdev.io/devices": "3"}},
        "spec": {"domain": {"resources": {"limits": {"umdev.io/mtty-1": "1"}}}}
    });
    assert!(hook(&bundled, domain).contains("/var/run/umdev/2/vfio-user.sock"));
    // A VMI without umdev devices is left as it was.
    let none = serde_json::json!({"spec": {"domain": {}}});
    assert_eq!(hook(&none, domain).trim(), domain);
}
