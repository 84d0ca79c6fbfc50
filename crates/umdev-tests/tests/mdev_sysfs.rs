#![allow(clippy::unwrap_used)]
//! The sysfs tree over FUSE, against a real umdevd: create and remove through `create` and
//! `remove` as the kernel documentation shows, the links, and every errno of the ABI.

mod mdev;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use mdev::{errno, new_uuid, require, Daemon, CONFIG};

const EINVAL: i32 = 22;
const EEXIST: i32 = 17;
const ENOSPC: i32 = 28;
const EACCES: i32 = 13;
const ENOENT: i32 = 2;
const EBUSY: i32 = 16;

fn link(p: &Path) -> String {
    std::fs::read_link(p).unwrap().display().to_string()
}

#[test]
fn echo_uuid_to_create_and_1_to_remove_through_a_shell() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    let types = d
        .sys()
        .join("class/mdev_bus/mtty0/mdev_supported_types/mtty-2");
    let script = format!(
        "set -e; cd {t}; cat available_instances; echo {u} > create; cat available_instances; \
         ls devices; cat ../../{u}/vfio_user_socket; echo 1 > ../../{u}/remove; \
         cat available_instances",
        t = types.display()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let sock = d.socket(&u);
    assert_eq!(
        text,
        format!("12\n11\n{u}\n{}\n12\n", sock.display()),
        "shell transcript"
    );
    assert!(!sock.exists());
}

#[test]
fn the_tree_has_the_kernels_paths_and_links() {
    require();
    let d = Daemon::start(CONFIG);
    let sys = d.sys();
    assert_eq!(
        link(&sys.join("class/mdev_bus/mtty0")),
        "../../devices/umdev/mtty0"
    );
    let t = d.type_dir("mtty0", "mtty-1");
    let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap();
    assert_eq!(read("device_api"), "vfio-pci\n");
    assert_eq!(read("name"), "Single port serial\n");
    assert!(!read("description").is_empty());
    assert_eq!(read("available_instances"), "24\n");
    let u = new_uuid();
    d.create("mtty0", "mtty-1", &u).unwrap();
    let dev = sys.join("devices/umdev/mtty0").join(&u);
    assert!(dev.is_dir());
    assert_eq!(link(&t.join("devices").join(&u)), format!("../../../{u}"));
    assert_eq!(
        link(&dev.join("mdev_type")),
        "../mdev_supported_types/mtty-1"
    );
    let group = link(&dev.join("iommu_group"));
    let n = group.rsplit('/').next().unwrap().to_owned();
    assert_eq!(group, format!("../../../../kernel/iommu_groups/{n}"));
    assert_eq!(
        link(&sys.join("bus/mdev/devices").join(&u)),
        format!("../../../devices/umdev/mtty0/{u}")
    );
    assert_eq!(
        link(&sys.join(format!("kernel/iommu_groups/{n}/devices/{u}"))),
        format!("../../../../devices/umdev/mtty0/{u}")
    );
    // Canonical paths resolve to the device directory, as mdevctl needs.
    let canon = std::fs::canonicalize(sys.join("bus/mdev/devices").join(&u)).unwrap();
    assert_eq!(canon, std::fs::canonicalize(&dev).unwrap());
    assert_eq!(
        std::fs::canonicalize(dev.join("mdev_type")).unwrap(),
        std::fs::canonicalize(&t).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(dev.join("vendor/sample_mdev_dev")).unwrap(),
        format!("This is MDEV {u}\n")
    );
    d.remove(&u).unwrap();
    assert!(!dev.exists());
    assert!(!sys.join(format!("kernel/iommu_groups/{n}")).exists());
}

#[test]
fn malformed_uuids_are_einval_and_nothing_is_created() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    for bad in [
        "nonsense".to_owned(),
        u.replace('-', ""),
        format!("{u}xx"),
        u[..35].to_owned(),
        u.replacen('-', "_", 1),
    ] {
        let e = std::fs::write(d.type_dir("mtty0", "mtty-1").join("create"), &bad).unwrap_err();
        assert_eq!(errno(&e), EINVAL, "{bad}");
    }
    // Upper case is accepted; the device is named in lower case.
    d.create("mtty0", "mtty-1", &u.to_uppercase()).unwrap();
    assert_eq!(d.devices("mtty0", "mtty-1"), vec![u]);
}

#[test]
fn a_uuid_in_use_under_another_parent_is_eexist() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    d.create("mtty0", "mtty-1", &u).unwrap();
    let e = d.create("mtty1", "mtty-1", &u).unwrap_err();
    assert_eq!(errno(&e), EEXIST);
    let e = d.create("mtty0", "mtty-2", &u).unwrap_err();
    assert_eq!(errno(&e), EEXIST);
    assert!(d.devices("mtty1", "mtty-1").is_empty());
}

#[test]
fn create_with_no_available_instances_is_enospc() {
    require();
    let d = Daemon::start(CONFIG);
    // mtty1 has a pool of two ports.
    d.create("mtty1", "mtty-1", &new_uuid()).unwrap();
    assert_eq!(d.available("mtty1", "mtty-2"), 0);
    assert_eq!(d.available("mtty1", "mtty-1"), 1);
    let e = d.create("mtty1", "mtty-2", &new_uuid()).unwrap_err();
    assert_eq!(errno(&e), ENOSPC);
    d.create("mtty1", "mtty-1", &new_uuid()).unwrap();
    let e = d.create("mtty1", "mtty-1", &new_uuid()).unwrap_err();
    assert_eq!(errno(&e), ENOSPC);
    assert_eq!(d.devices("mtty1", "mtty-1").len(), 2);
}

#[test]
fn read_only_and_write_only_files_refuse_the_other_direction() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    d.create("mtty0", "mtty-1", &u).unwrap();
    let t = d.type_dir("mtty0", "mtty-1");
    let dev = d.mdev_dir(&u);
    for ro in [
        t.join("available_instances"),
        t.join("name"),
        t.join("device_api"),
        t.join("description"),
        dev.join("vfio_user_socket"),
        dev.join("vendor/sample_mdev_dev"),
    ] {
        let e = std::fs::OpenOptions::new()
            .write(true)
            .open(&ro)
            .unwrap_err();
        assert_eq!(errno(&e), EACCES, "{}", ro.display());
    }
    for wo in [t.join("create"), dev.join("remove")] {
        let e = std::fs::read(&wo).unwrap_err();
        assert_eq!(errno(&e), EACCES, "{}", wo.display());
    }
}

#[test]
fn unknown_attributes_are_enoent_and_cannot_be_created() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    d.create("mtty0", "mtty-1", &u).unwrap();
    let dev = d.mdev_dir(&u);
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(dev.join("no_such_attr"))
        .unwrap_err();
    assert_eq!(errno(&e), ENOENT);
    let e = std::fs::read(dev.join("no_such_attr")).unwrap_err();
    assert_eq!(errno(&e), ENOENT);
    // With O_CREAT (a shell's `>`), as on sysfs: EACCES.
    let e = std::fs::write(dev.join("no_such_attr"), "1").unwrap_err();
    assert_eq!(errno(&e), EACCES);
    let e = std::fs::write(t_create_of_missing_type(&d), "x").unwrap_err();
    assert_eq!(errno(&e), ENOENT);
    let e = std::fs::write(d.mdev_dir(&new_uuid()).join("remove"), "1").unwrap_err();
    assert_eq!(errno(&e), ENOENT);
}

fn t_create_of_missing_type(d: &Daemon) -> std::path::PathBuf {
    d.sys()
        .join("class/mdev_bus/mtty0/mdev_supported_types/mtty-9/create")
}

#[test]
fn remove_writes_follow_kstrtoul() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    d.create("mtty0", "mtty-1", &u).unwrap();
    let remove = d.mdev_dir(&u).join("remove");
    let e = std::fs::write(&remove, "yes").unwrap_err();
    assert_eq!(errno(&e), EINVAL);
    std::fs::write(&remove, "0").unwrap();
    assert!(d.mdev_dir(&u).exists());
    // One open file, two writes: the second finds the device gone (ENODEV).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&remove)
        .unwrap();
    f.write_all(b"1").unwrap();
    let e = f.write_all(b"1").unwrap_err();
    assert_eq!(errno(&e), ENOENT);
    assert!(!d.mdev_dir(&u).exists());
}

#[test]
fn removing_a_device_a_client_holds_is_ebusy() {
    require();
    let d = Daemon::start(CONFIG);
    let u = new_uuid();
    d.create("mtty0", "mtty-2", &u).unwrap();
    let sock = std::fs::read_to_string(d.mdev_dir(&u).join("vfio_user_socket")).unwrap();
    let client = umdev_client::Client::connect(sock.trim()).unwrap();
    let e = d.remove(&u).unwrap_err();
    assert_eq!(errno(&e), EBUSY);
    assert!(d.mdev_dir(&u).exists());
    drop(client);
    // Once the client has gone the device can be removed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match d.remove(&u) {
            Ok(()) => break,
            Err(e) if errno(&e) == EBUSY && std::time::Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!d.mdev_dir(&u).exists());
}

#[test]
fn available_instances_stay_consistent_under_concurrent_creates_and_removes() {
    require();
    let d = std::sync::Arc::new(Daemon::start(CONFIG));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || {
                let (mut ok, mut full) = (0, 0);
                for _ in 0..15 {
                    let mut mine = Vec::new();
                    for _ in 0..4 {
                        let u = new_uuid();
                        match d.create("mtty0", "mtty-2", &u) {
                            Ok(()) => mine.push(u),
                            Err(e) => {
                                assert_eq!(errno(&e), ENOSPC);
                                full += 1;
                            }
                        }
                        let n = d.devices("mtty0", "mtty-2").len();
                        assert!(n <= 12, "over-commit: {n} devices of 12");
                    }
                    ok += mine.len();
                    for u in mine {
                        d.remove(&u).unwrap();
                    }
                }
                (ok, full)
            })
        })
        .collect();
    let mut created = 0;
    for t in threads {
        created += t.join().unwrap().0;
    }
    assert!(created >= 12);
    assert_eq!(d.available("mtty0", "mtty-2"), 12);
    assert_eq!(d.available("mtty0", "mtty-1"), 24);
    assert!(d.devices("mtty0", "mtty-2").is_empty());
    let socks = std::fs::read_dir(d.root().join("sockets")).unwrap().count();
    assert_eq!(socks, 0);
}

/// Run as a child process by the group test: holds the device at
/// `$UMDEV_HOLD_SOCKET` until stdin closes (a second process is a second client).
#[test]
fn hold_helper() {
    let Some(sock) = std::env::var_os("UMDEV_HOLD_SOCKET") else {
        return;
    };
    let _client = umdev_client::Client::connect(&sock).unwrap();
    println!("held");
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}

#[test]
fn a_second_client_is_refused_on_every_device_of_a_held_group() {
    require();
    use std::io::BufRead;
    let d = Daemon::start(CONFIG);
    let (a, b) = (new_uuid(), new_uuid());
    d.create("p2p0", "mtty-1", &a).unwrap();
    d.create("p2p0", "mtty-1", &b).unwrap();
    let p2p = std::fs::read_to_string(d.mdev_dir(&a).join("peer_to_peer_resource_uuid")).unwrap();
    std::fs::write(d.mdev_dir(&b).join("peer_to_peer_resource_uuid"), &p2p).unwrap();
    let ga = std::fs::read_link(d.mdev_dir(&a).join("iommu_group")).unwrap();
    assert_eq!(
        ga,
        std::fs::read_link(d.mdev_dir(&b).join("iommu_group")).unwrap()
    );
    let sock = |u: &str| {
        std::fs::read_to_string(d.mdev_dir(u).join("vfio_user_socket"))
            .unwrap()
            .trim()
            .to_owned()
    };
    // Another process holds device a.
    let mut holder = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "hold_helper", "--nocapture"])
        .env("UMDEV_HOLD_SOCKET", sock(&a))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(holder.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("held")));
    // This process is another client: refused on b, the other device of the group.
    match umdev_client::Client::connect(sock(&b)) {
        Err(umdev_client::ClientError::Remote { errno, .. }) => assert_eq!(errno, EBUSY),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a second client got a device of a held group"),
    }
    // Moving b out of the group is refused while the group is held.
    let e = std::fs::write(
        d.mdev_dir(&b).join("peer_to_peer_resource_uuid"),
        format!("{}\n", new_uuid()),
    )
    .unwrap_err();
    assert_eq!(errno(&e), EBUSY);
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());
    // Released: now this process gets b.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match umdev_client::Client::connect(sock(&b)) {
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn sockets_have_the_configured_mode_and_owner() {
    require();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let u = new_uuid();
    let d = Daemon::start(CONFIG);
    d.create("mtty0", "mtty-1", &u).unwrap();
    let m = std::fs::metadata(d.socket(&u)).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600, "default mode");
    let dir = std::fs::metadata(d.device_dir(&u)).unwrap();
    assert_eq!(
        dir.permissions().mode() & 0o7777,
        0o700,
        "the device's directory"
    );
    drop(d);
    let d = Daemon::start(&format!(
        "socket_mode = \"0660\"\nsocket_owner = \"65534:65534\"\n{CONFIG}"
    ));
    d.create("mtty0", "mtty-1", &u).unwrap();
    let m = std::fs::metadata(d.socket(&u)).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o660);
    assert_eq!((m.uid(), m.gid()), (65534, 65534));
    let dir = std::fs::metadata(d.device_dir(&u)).unwrap();
    assert_eq!(dir.permissions().mode() & 0o7777, 0o770);
    assert_eq!((dir.uid(), dir.gid()), (65534, 65534));
}
