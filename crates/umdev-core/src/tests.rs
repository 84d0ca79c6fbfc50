//! Unit tests of the registry with test parents and an in-process `Serve`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::io::Errno;
use umdev_dma::{AddressSpace, DmaLimits};
use umdev_pci::{BarIndex, BarKind, ClientId, PciDevice, PciDeviceSpec, PciFunction, PeerCred};

use crate::*;

struct Nothing;
impl PciDevice for Nothing {
    fn bar_read(&mut self, _: BarIndex, _: u64, _: &mut [u8]) -> Result<(), Errno> {
        Ok(())
    }
    fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8]) -> Result<(), Errno> {
        Ok(())
    }
}

fn spec() -> PciDeviceSpec {
    PciDeviceSpec::builder(0x1b36, 0x0005)
        .bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            16,
        )
        .build()
        .unwrap()
}

/// The seeds' example: 1 GiB of VRAM carved into 128M, 256M or 512M devices.
struct Vram {
    hot_unplug: bool,
    peer_to_peer: bool,
}

impl Vram {
    fn size(name: &str) -> u32 {
        name.parse().unwrap()
    }
}

struct Label(Mutex<String>);
impl VendorAttrs for Label {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            "label" => Ok(self.0.lock().unwrap().clone()),
            "vendor/size" => Ok("fixed".into()),
            _ => Err(Errno::NOENT),
        }
    }
    fn store(&self, name: &str, value: &str) -> Result<(), Errno> {
        if name != "label" || value.len() > 16 {
            return Err(Errno::INVAL);
        }
        *self.0.lock().unwrap() = value.trim_end().to_owned();
        Ok(())
    }
}

impl Parent for Vram {
    fn driver(&self) -> &str {
        "vram"
    }
    fn types(&self) -> Vec<TypeSpec> {
        ["128", "256", "512"]
            .iter()
            .map(|n| TypeSpec {
                pretty_name: Some(format!("{n}M")),
                peer_to_peer: self.peer_to_peer,
                attrs: vec![
                    AttrSpec {
                        name: "label".into(),
                        writable: true,
                    },
                    AttrSpec {
                        name: "vendor/size".into(),
                        writable: false,
                    },
                ],
                ..TypeSpec::new(n)
            })
            .collect()
    }
    fn available(&self, name: &str, in_use: &[&str]) -> u32 {
        let used: u32 = in_use.iter().map(|t| Vram::size(t)).sum();
        (1024 - used) / Vram::size(name)
    }
    fn build(
        &self,
        _: &MdevUuid,
        _: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        Ok(MdevParts {
            spec: spec(),
            device: Box::new(Nothing),
            attrs: Some(Box::new(Label(Mutex::new(String::new())))),
        })
    }
    fn hot_unplug(&self) -> bool {
        self.hot_unplug
    }
}

type Functions = Arc<Mutex<BTreeMap<MdevUuid, Arc<Mutex<PciFunction>>>>>;

/// Keeps each function where the test can open and close it as a client would.
#[derive(Default)]
struct Keep {
    functions: Functions,
}

struct Kept {
    uuid: MdevUuid,
    functions: Functions,
}

impl Served for Kept {
    fn stop(&self) {
        // A surprise removal closes the device, as a session's teardown does.
        let f = self.functions.lock().unwrap().remove(&self.uuid);
        if let Some(f) = f {
            let mut f = f.lock().unwrap();
            f.close();
        }
    }
}

impl Serve for Keep {
    fn start(&self, env: &DeviceEnv, f: PciFunction) -> std::io::Result<Box<dyn Served>> {
        let uuid = *env.uuid();
        self.functions
            .lock()
            .unwrap()
            .insert(uuid, Arc::new(Mutex::new(f)));
        Ok(Box::new(Kept {
            uuid,
            functions: self.functions.clone(),
        }))
    }
}

struct Fixture {
    core: Core,
    functions: Functions,
}

impl Fixture {
    fn new(timeout_ms: u64) -> Fixture {
        let keep = Keep::default();
        let functions = keep.functions.clone();
        let core = Core::new(
            CoreConfig {
                release_timeout: Duration::from_millis(timeout_ms),
            },
            Arc::new(keep),
        );
        Fixture { core, functions }
    }

    fn with_vram(self, name: &str, hot_unplug: bool, peer_to_peer: bool) -> Fixture {
        self.core
            .register_parent(
                name,
                Arc::new(Vram {
                    hot_unplug,
                    peer_to_peer,
                }),
            )
            .unwrap();
        self
    }

    fn function(&self, uuid: &MdevUuid) -> Arc<Mutex<PciFunction>> {
        self.functions.lock().unwrap()[uuid].clone()
    }

    /// Opens the device; ENODEV (19) once it has gone (its server stopped).
    fn open(&self, uuid: &MdevUuid, client: ClientId) -> Result<(), i32> {
        let f = self.functions.lock().unwrap().get(uuid).cloned();
        match f {
            Some(f) => self.open_function(&f, client),
            None => Err(19),
        }
    }

    fn open_function(&self, f: &Mutex<PciFunction>, client: ClientId) -> Result<(), i32> {
        let dma = Arc::new(AddressSpace::new(DmaLimits::default()));
        f.lock()
            .unwrap()
            .open_as(dma, client)
            .map_err(|e| e.errno())
    }

    fn close(&self, uuid: &MdevUuid) {
        self.function(uuid).lock().unwrap().close();
    }

    fn available(&self, parent: &str) -> Vec<u32> {
        self.core
            .types(parent)
            .unwrap()
            .iter()
            .map(|t| t.available_instances)
            .collect()
    }
}

fn client(pid: u32, connection: u64) -> ClientId {
    ClientId {
        connection,
        peer: Some(PeerCred {
            pid,
            uid: 0,
            gid: 0,
        }),
    }
}

fn uuid(n: u8) -> MdevUuid {
    MdevUuid::parse(&format!("00000000-0000-4000-8000-0000000000{n:02x}")).unwrap()
}

#[test]
fn available_instances_follow_what_other_types_use() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    assert_eq!(f.available("gpu0"), vec![8, 4, 2]);
    f.core.create("gpu0", "vram-512", uuid(1)).unwrap();
    assert_eq!(f.available("gpu0"), vec![4, 2, 1]);
    f.core.create("gpu0", "vram-128", uuid(2)).unwrap();
    assert_eq!(f.available("gpu0"), vec![3, 1, 0]);
    f.core.remove(&uuid(1)).unwrap();
    assert_eq!(f.available("gpu0"), vec![7, 3, 1]);
}

#[test]
fn type_ids_names_and_devices_are_listed() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-256", uuid(1)).unwrap();
    let t = f.core.type_info("gpu0", "vram-256").unwrap();
    assert_eq!(t.id, "vram-256");
    assert_eq!(t.name.as_deref(), Some("256M"));
    assert_eq!(t.device_api, "vfio-pci");
    assert_eq!(t.devices, vec![uuid(1)]);
    assert!(f
        .core
        .type_info("gpu0", "vram-128")
        .unwrap()
        .devices
        .is_empty());
    let m = f.core.mdev(&uuid(1)).unwrap();
    assert_eq!(
        (m.parent.as_str(), m.type_id.as_str()),
        ("gpu0", "vram-256")
    );
}

#[test]
fn uuid_is_unique_across_parents() {
    let f = Fixture::new(10)
        .with_vram("gpu0", false, false)
        .with_vram("gpu1", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    let e = f.core.create("gpu1", "vram-128", uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::EXIST);
    assert!(f.core.parent_devices("gpu1").is_empty());
}

#[test]
fn create_without_available_instances_is_enospc() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-512", uuid(1)).unwrap();
    f.core.create("gpu0", "vram-512", uuid(2)).unwrap();
    let e = f.core.create("gpu0", "vram-512", uuid(3)).unwrap_err();
    assert_eq!(e.errno(), Errno::NOSPC);
    assert!(f.core.mdev(&uuid(3)).is_none());
}

#[test]
fn unknown_parent_is_enodev_and_unknown_type_enoent() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    let e = f.core.create("gpu9", "vram-128", uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::NODEV);
    let e = f.core.create("gpu0", "vram-64", uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT);
    let e = f.core.create("gpu0", "other-128", uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT);
}

#[test]
fn registering_a_parent_twice_is_eexist() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    let e = f
        .core
        .register_parent(
            "gpu0",
            Arc::new(Vram {
                hot_unplug: false,
                peer_to_peer: false,
            }),
        )
        .unwrap_err();
    assert_eq!(e.errno(), Errno::EXIST);
    let e = f
        .core
        .register_parent(
            "a/b",
            Arc::new(Vram {
                hot_unplug: false,
                peer_to_peer: false,
            }),
        )
        .unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL);
}

#[test]
fn remove_of_a_missing_device_is_enodev() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    assert_eq!(f.core.remove(&uuid(1)).unwrap_err().errno(), Errno::NODEV);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.remove(&uuid(1)).unwrap();
    assert_eq!(f.core.remove(&uuid(1)).unwrap_err().errno(), Errno::NODEV);
}

#[test]
fn each_device_is_alone_in_its_group_and_numbers_are_reused() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    for i in 1..=3 {
        f.core.create("gpu0", "vram-128", uuid(i)).unwrap();
    }
    let groups: Vec<u32> = (1..=3)
        .map(|i| f.core.mdev(&uuid(i)).unwrap().iommu_group)
        .collect();
    assert_eq!(groups, vec![0, 1, 2]);
    for g in f.core.groups() {
        assert_eq!(g.devices.len(), 1);
    }
    f.core.remove(&uuid(2)).unwrap();
    f.core.create("gpu0", "vram-128", uuid(4)).unwrap();
    assert_eq!(f.core.mdev(&uuid(4)).unwrap().iommu_group, 1);
}

#[test]
fn removing_a_held_device_asks_then_fails_with_ebusy() {
    let f = Fixture::new(30).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    let e = f.core.remove(&uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::BUSY);
    // The device is still there and still held; once released it can go.
    assert!(f.core.mdev(&uuid(1)).unwrap().held_by.is_some());
    f.close(&uuid(1));
    f.core.remove(&uuid(1)).unwrap();
}

#[test]
fn a_client_that_releases_in_time_lets_the_removal_succeed() {
    let f = Fixture::new(5_000).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    let function = f.function(&uuid(1));
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        function.lock().unwrap().close();
    });
    f.core.remove(&uuid(1)).unwrap();
    t.join().unwrap();
    assert!(f.core.mdev(&uuid(1)).is_none());
}

#[test]
fn a_parent_that_can_hot_unplug_takes_the_device_away() {
    let f = Fixture::new(20).with_vram("gpu0", true, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    f.core.remove(&uuid(1)).unwrap();
    assert!(f.core.mdev(&uuid(1)).is_none());
    assert!(f.core.groups().is_empty());
}

#[test]
fn a_second_remove_while_one_is_pending_is_eagain_and_open_is_refused() {
    let f = Fixture::new(400).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    let core = f.core.clone();
    let t = std::thread::spawn(move || core.remove(&uuid(1)));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(f.core.remove(&uuid(1)).unwrap_err().errno(), Errno::AGAIN);
    f.close(&uuid(1));
    // Between the release and the removal, nobody may open it again.
    let again = f.open(&uuid(1), client(10, 2));
    t.join().unwrap().unwrap();
    if let Err(e) = again {
        assert_eq!(e, 19);
    }
    assert!(f.core.mdev(&uuid(1)).is_none());
}

#[test]
fn one_client_per_device() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    assert_eq!(f.open(&uuid(1), client(11, 2)), Err(16));
    f.close(&uuid(1));
    f.open(&uuid(1), client(11, 2)).unwrap();
}

#[test]
fn peer_to_peer_devices_share_a_group_when_their_uuids_match() {
    let f = Fixture::new(10).with_vram("gpu0", false, true);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.create("gpu0", "vram-128", uuid(2)).unwrap();
    let g1 = f.core.mdev(&uuid(1)).unwrap().iommu_group;
    let g2 = f.core.mdev(&uuid(2)).unwrap().iommu_group;
    assert_ne!(g1, g2);
    let p1 = f.core.read_attr(&uuid(1), P2P_ATTR).unwrap();
    assert_eq!(p1.len(), 37);
    f.core.write_attr(&uuid(2), P2P_ATTR, &p1).unwrap();
    assert_eq!(f.core.mdev(&uuid(2)).unwrap().iommu_group, g1);
    assert_eq!(f.core.group(g1).unwrap().devices, vec![uuid(1), uuid(2)]);
    assert!(f.core.group(g2).is_none());
    // A fresh UUID splits it back out.
    let fresh = format!("{}\n", MdevUuid::random());
    f.core.write_attr(&uuid(2), P2P_ATTR, &fresh).unwrap();
    assert_ne!(f.core.mdev(&uuid(2)).unwrap().iommu_group, g1);
    assert_eq!(f.core.read_attr(&uuid(2), P2P_ATTR).unwrap(), fresh);
}

#[test]
fn moving_a_device_is_ebusy_while_any_device_involved_is_open() {
    let f = Fixture::new(10).with_vram("gpu0", false, true);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.create("gpu0", "vram-128", uuid(2)).unwrap();
    let p1 = f.core.read_attr(&uuid(1), P2P_ATTR).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    let e = f.core.write_attr(&uuid(2), P2P_ATTR, &p1).unwrap_err();
    assert_eq!(e.errno(), Errno::BUSY);
    f.close(&uuid(1));
    f.open(&uuid(2), client(10, 1)).unwrap();
    let e = f.core.write_attr(&uuid(2), P2P_ATTR, &p1).unwrap_err();
    assert_eq!(e.errno(), Errno::BUSY);
    f.close(&uuid(2));
    f.core.write_attr(&uuid(2), P2P_ATTR, &p1).unwrap();
    let e = f
        .core
        .write_attr(&uuid(2), P2P_ATTR, "not-a-uuid")
        .unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL);
}

#[test]
fn a_held_group_refuses_every_other_client_on_all_its_devices() {
    let f = Fixture::new(10).with_vram("gpu0", false, true);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.create("gpu0", "vram-128", uuid(2)).unwrap();
    let p1 = f.core.read_attr(&uuid(1), P2P_ATTR).unwrap();
    f.core.write_attr(&uuid(2), P2P_ATTR, &p1).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    // Another process is refused on the other device of the group...
    assert_eq!(f.open(&uuid(2), client(11, 2)), Err(16));
    // ...while the same process (a second connection) may open it.
    f.open(&uuid(2), client(10, 3)).unwrap();
    let g = f
        .core
        .group(f.core.mdev(&uuid(1)).unwrap().iommu_group)
        .unwrap();
    assert_eq!(g.owner.unwrap().peer.unwrap().pid, 10);
    f.close(&uuid(1));
    assert_eq!(f.open(&uuid(1), client(11, 4)), Err(16));
    f.close(&uuid(2));
    f.open(&uuid(1), client(11, 4)).unwrap();
}

#[test]
fn attributes_have_their_modes_and_errnos() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.write_attr(&uuid(1), "label", "hello\n").unwrap();
    assert_eq!(f.core.read_attr(&uuid(1), "label").unwrap(), "hello\n");
    assert_eq!(
        f.core.read_attr(&uuid(1), "vendor/size").unwrap(),
        "fixed\n"
    );
    let e = f.core.write_attr(&uuid(1), "vendor/size", "x").unwrap_err();
    assert_eq!(e.errno(), Errno::ACCESS);
    let e = f.core.write_attr(&uuid(1), "nope", "x").unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT);
    let e = f.core.read_attr(&uuid(1), P2P_ATTR).unwrap_err();
    assert_eq!(e.errno(), Errno::NOENT);
    let e = f
        .core
        .write_attr(&uuid(1), "label", &"x".repeat(20))
        .unwrap_err();
    assert_eq!(e.errno(), Errno::INVAL);
}

#[test]
fn unregistering_a_parent_in_use_is_refused_unless_forced() {
    let f = Fixture::new(10)
        .with_vram("gpu0", false, false)
        .with_vram("gpu1", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.create("gpu0", "vram-128", uuid(2)).unwrap();
    f.core.create("gpu1", "vram-128", uuid(3)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    let e = f.core.unregister_parent("gpu0", false).unwrap_err();
    assert_eq!(e.errno(), Errno::BUSY);
    assert_eq!(f.core.parent_devices("gpu0").len(), 2);
    f.core.unregister_parent("gpu0", true).unwrap();
    assert_eq!(f.core.parents(), vec!["gpu1".to_owned()]);
    assert!(f.core.mdev(&uuid(1)).is_none() && f.core.mdev(&uuid(2)).is_none());
    assert!(f.core.mdev(&uuid(3)).is_some());
    let e = f.core.create("gpu0", "vram-128", uuid(4)).unwrap_err();
    assert_eq!(e.errno(), Errno::NODEV);
    assert_eq!(
        f.core.unregister_parent("gpu0", false).unwrap_err().errno(),
        Errno::NODEV
    );
}

#[test]
fn a_forced_unregister_completes_while_a_removal_waits_for_a_client() {
    let f = Fixture::new(300).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.open(&uuid(1), client(10, 1)).unwrap();
    let core = f.core.clone();
    // This removal waits for the client, which never lets go: it fails with EBUSY.
    let pending = std::thread::spawn(move || core.remove(&uuid(1)));
    std::thread::sleep(Duration::from_millis(50));
    f.core.unregister_parent("gpu0", true).unwrap();
    assert!(f.core.mdevs().is_empty());
    assert!(f.core.parents().is_empty());
    let r = pending.join().unwrap();
    assert!(
        matches!(
            r.as_ref().map_err(CoreError::errno),
            Ok(()) | Err(Errno::BUSY)
        ),
        "{r:?}"
    );
}

#[test]
fn unregistering_an_idle_parent_removes_its_devices() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
    f.core.unregister_parent("gpu0", false).unwrap();
    assert!(f.core.mdevs().is_empty());
    assert!(f.functions.lock().unwrap().is_empty());
    // The name can be registered again.
    let f = f.with_vram("gpu0", false, false);
    f.core.create("gpu0", "vram-128", uuid(1)).unwrap();
}

#[test]
fn a_refusing_driver_open_leaves_the_group_free() {
    struct Refuses;
    impl PciDevice for Refuses {
        fn bar_read(&mut self, _: BarIndex, _: u64, _: &mut [u8]) -> Result<(), Errno> {
            Ok(())
        }
        fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8]) -> Result<(), Errno> {
            Ok(())
        }
        fn open(&mut self, _: umdev_pci::DeviceContext) -> Result<(), Errno> {
            Err(Errno::NOMEM)
        }
    }
    struct P;
    impl Parent for P {
        fn driver(&self) -> &str {
            "p"
        }
        fn types(&self) -> Vec<TypeSpec> {
            vec![TypeSpec::new("x")]
        }
        fn available(&self, _: &str, _: &[&str]) -> u32 {
            1
        }
        fn build(
            &self,
            _: &MdevUuid,
            _: &DeviceDescription,
            _: &DeviceEnv,
        ) -> Result<MdevParts, Errno> {
            Ok(MdevParts {
                spec: spec(),
                device: Box::new(Refuses),
                attrs: None,
            })
        }
    }
    let f = Fixture::new(10);
    f.core.register_parent("p0", Arc::new(P)).unwrap();
    f.core.create("p0", "p-x", uuid(1)).unwrap();
    assert_eq!(f.open(&uuid(1), client(10, 1)), Err(12));
    let m = f.core.mdev(&uuid(1)).unwrap();
    assert!(m.held_by.is_none());
    assert!(f.core.group(m.iommu_group).unwrap().owner.is_none());
}

#[test]
fn concurrent_creates_and_removes_never_over_commit() {
    let f = Fixture::new(10).with_vram("gpu0", false, false);
    let core = f.core.clone();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let core = core.clone();
            std::thread::spawn(move || {
                let mut created = 0u32;
                for round in 0..50u8 {
                    let ids: Vec<MdevUuid> = (0..3u8)
                        .map(|i| {
                            MdevUuid::parse(&format!(
                                "00000000-0000-4000-8000-0000{t:02x}{round:02x}{i:02x}00"
                            ))
                            .unwrap()
                        })
                        .collect();
                    let mut mine = Vec::new();
                    for id in ids {
                        match core.create("gpu0", "vram-128", id) {
                            Ok(()) => mine.push(id),
                            Err(e) => assert_eq!(e.errno(), Errno::NOSPC),
                        }
                        let t = core.type_info("gpu0", "vram-128").unwrap();
                        assert_eq!(t.devices.len() + t.available_instances as usize, 8);
                    }
                    created += u32::try_from(mine.len()).unwrap();
                    for id in mine {
                        core.remove(&id).unwrap();
                    }
                }
                created
            })
        })
        .collect();
    let total: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(total > 0);
    assert_eq!(f.available("gpu0"), vec![8, 4, 2]);
    assert!(f.core.mdevs().is_empty() && f.core.groups().is_empty());
}

/// A parent whose steps can be made to fail, and which records what it was asked.
#[derive(Default)]
struct Steps {
    fail_create: bool,
    fail_build: bool,
    removed: Mutex<Vec<MdevUuid>>,
    /// Per device: whether its group still held it when the device's `close` ran.
    core: std::sync::OnceLock<Core>,
    closed_in_group: Arc<Mutex<Vec<bool>>>,
}

struct Watches {
    uuid: MdevUuid,
    core: Option<Core>,
    closed_in_group: Arc<Mutex<Vec<bool>>>,
}

impl PciDevice for Watches {
    fn bar_read(&mut self, _: BarIndex, _: u64, _: &mut [u8]) -> Result<(), Errno> {
        Ok(())
    }
    fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8]) -> Result<(), Errno> {
        Ok(())
    }
    fn close(&mut self) {
        let in_group = self.core.as_ref().is_some_and(|c| {
            c.mdev(&self.uuid)
                .and_then(|m| c.group(m.iommu_group))
                .is_some_and(|g| g.devices.contains(&self.uuid))
        });
        self.closed_in_group.lock().unwrap().push(in_group);
    }
}

impl Parent for Steps {
    fn driver(&self) -> &str {
        "steps"
    }
    fn types(&self) -> Vec<TypeSpec> {
        vec![TypeSpec::new("x")]
    }
    fn available(&self, _: &str, in_use: &[&str]) -> u32 {
        4 - u32::try_from(in_use.len()).unwrap()
    }
    fn create(&self, _: &MdevUuid, type_name: &str) -> Result<DeviceDescription, Errno> {
        if self.fail_create {
            return Err(Errno::NOMEM);
        }
        DeviceDescription::with(type_name, &serde_json::json!({"size": 1}))
    }
    fn build(
        &self,
        uuid: &MdevUuid,
        d: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        assert_eq!(d.data::<serde_json::Value>().unwrap()["size"], 1);
        if self.fail_build {
            return Err(Errno::IO);
        }
        Ok(MdevParts {
            spec: spec(),
            device: Box::new(Watches {
                uuid: *uuid,
                core: self.core.get().cloned(),
                closed_in_group: self.closed_in_group.clone(),
            }),
            attrs: None,
        })
    }
    fn remove(&self, uuid: &MdevUuid, _: &DeviceDescription) {
        self.removed.lock().unwrap().push(*uuid);
    }
    fn attrs(&self) -> Vec<AttrSpec> {
        vec![
            AttrSpec::read_only("pool_free"),
            AttrSpec::writable("vendor/mode"),
        ]
    }
    fn show_attr(&self, name: &str) -> Result<String, Errno> {
        match name {
            "pool_free" => Ok("4".into()),
            "vendor/mode" => Ok("fast\n".into()),
            _ => Err(Errno::NOENT),
        }
    }
    fn store_attr(&self, name: &str, value: &str) -> Result<(), Errno> {
        match (name, value.trim()) {
            ("vendor/mode", "fast" | "slow") => Ok(()),
            _ => Err(Errno::INVAL),
        }
    }
}

/// Refuses to serve anything.
struct Unservable;
impl Serve for Unservable {
    fn start(&self, _: &DeviceEnv, _: PciFunction) -> std::io::Result<Box<dyn Served>> {
        Err(std::io::Error::from_raw_os_error(
            Errno::ADDRINUSE.raw_os_error(),
        ))
    }
}

fn nothing_left(core: &Core) {
    assert!(core.mdevs().is_empty(), "no device");
    assert!(core.groups().is_empty(), "no group");
    assert!(core.parent_devices("s0").is_empty(), "no tree entry");
    assert_eq!(
        core.type_info("s0", "steps-x").unwrap().available_instances,
        4
    );
}

/// Seeds digest behaviours 9 and 14: a parent's create failing leaves nothing.
#[test]
fn a_failed_create_leaves_no_device_no_group() {
    let f = Fixture::new(10);
    let p = Arc::new(Steps {
        fail_create: true,
        ..Steps::default()
    });
    f.core.register_parent("s0", p.clone()).unwrap();
    let e = f.core.create("s0", "steps-x", uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::NOMEM);
    nothing_left(&f.core);
    assert!(p.removed.lock().unwrap().is_empty(), "nothing to give back");
}

/// A failed build gives back what create took.
#[test]
fn a_failed_build_gives_back_what_create_took() {
    let f = Fixture::new(10);
    let p = Arc::new(Steps {
        fail_build: true,
        ..Steps::default()
    });
    f.core.register_parent("s0", p.clone()).unwrap();
    assert_eq!(
        f.core.create("s0", "steps-x", uuid(1)).unwrap_err().errno(),
        Errno::IO
    );
    nothing_left(&f.core);
    assert_eq!(*p.removed.lock().unwrap(), vec![uuid(1)]);
}

/// Seeds digest behaviour 15: the server failing to start leaves nothing either.
#[test]
fn a_server_that_cannot_start_leaves_nothing() {
    let core = Core::new(CoreConfig::default(), Arc::new(Unservable));
    let p = Arc::new(Steps::default());
    core.register_parent("s0", p.clone()).unwrap();
    let e = core.create("s0", "steps-x", uuid(1)).unwrap_err();
    assert_eq!(e.errno(), Errno::ADDRINUSE);
    nothing_left(&core);
    assert_eq!(*p.removed.lock().unwrap(), vec![uuid(1)]);
}

/// Seeds digest behaviour 10: removal runs the device's teardown before it leaves its group.
#[test]
fn removal_closes_the_device_before_it_leaves_its_group() {
    let f = Fixture::new(10);
    let p = Arc::new(Steps::default());
    p.core.set(f.core.clone()).ok();
    f.core.register_parent("s0", p.clone()).unwrap();
    f.core.create("s0", "steps-x", uuid(1)).unwrap();
    f.open(&uuid(1), client(5, 1)).unwrap();
    // Surprise removal is refused without hot-unplug; unregistering forces it.
    f.core.unregister_parent("s0", true).unwrap();
    assert_eq!(*p.closed_in_group.lock().unwrap(), vec![true]);
    assert_eq!(*p.removed.lock().unwrap(), vec![uuid(1)]);
}

/// Seeds digest behaviour 18: creating and removing next to an open sibling of the same
/// parent leaves the sibling open and its group held.
#[test]
fn create_and_remove_beside_an_open_sibling() {
    let f = Fixture::new(10);
    f.core
        .register_parent("s0", Arc::new(Steps::default()))
        .unwrap();
    f.core.create("s0", "steps-x", uuid(1)).unwrap();
    let a = f.function(&uuid(1));
    f.open_function(&a, client(5, 1)).unwrap();
    for round in 0..3u8 {
        let b = uuid(10 + round);
        f.core.create("s0", "steps-x", b).unwrap();
        assert_eq!(
            f.core
                .type_info("s0", "steps-x")
                .unwrap()
                .available_instances,
            2
        );
        f.core.remove(&b).unwrap();
    }
    let m = f.core.mdev(&uuid(1)).unwrap();
    assert_eq!(m.held_by.map(|c| c.connection), Some(1));
    assert!(f.core.group(m.iommu_group).unwrap().owner.is_some());
    f.close(&uuid(1));
    f.core.remove(&uuid(1)).unwrap();
}

/// Seeds digest behaviour 3: parent-level vendor attributes.
#[test]
fn parent_attributes_are_read_and_written() {
    let f = Fixture::new(10);
    f.core
        .register_parent("s0", Arc::new(Steps::default()))
        .unwrap();
    let names: Vec<String> = f
        .core
        .parent_attrs("s0")
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["pool_free", "vendor/mode"]);
    assert_eq!(f.core.read_parent_attr("s0", "pool_free").unwrap(), "4\n");
    f.core
        .write_parent_attr("s0", "vendor/mode", "slow\n")
        .unwrap();
    assert_eq!(
        f.core
            .write_parent_attr("s0", "vendor/mode", "warp")
            .unwrap_err()
            .errno(),
        Errno::INVAL
    );
    assert_eq!(
        f.core
            .write_parent_attr("s0", "pool_free", "1")
            .unwrap_err()
            .errno(),
        Errno::ACCESS
    );
    assert_eq!(
        f.core.read_parent_attr("s0", "nope").unwrap_err().errno(),
        Errno::NOENT
    );
}
