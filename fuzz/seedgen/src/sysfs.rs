//! Seeds of `fuzz_targets/sysfs.rs`: what mdevctl and scripts do in the tree, in the
//! target's line format (`PATH` or `PATH DATA`, `\n` a newline and `\xHH` a byte in DATA,
//! `@` commands).
//! Parent, driver, type and attribute names must match the target's test parent.

const P0: &str = "devices/umdev/gpu0";
const P1: &str = "devices/umdev/gpu1";
const TYPES: &str = "mdev_supported_types";
const U1: &str = "00000000-0000-4000-8000-000000000001";
const U2: &str = "00000000-0000-4000-8000-000000000002";
const U3: &str = "00000000-0000-4000-8000-000000000003";
const GROUP: &str = "11111111-2222-4333-8444-555555555555";

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let lines = |v: Vec<String>| {
        let mut s = v.join("\n");
        s.push('\n');
        s.into_bytes()
    };
    let mut seeds = Vec::new();

    seeds.push((
        "walk",
        lines(
            [
                "",
                "class",
                "class/mdev_bus",
                "class/mdev_bus/gpu0",
                "bus/mdev/devices",
                "kernel/iommu_groups",
                "devices/umdev",
                P0,
                "devices/umdev/gpu9",
                "devices/umdev/gpu0/tuning",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(["small", "p2p", "big", "huge"].iter().flat_map(|t| {
                [
                    "",
                    "/name",
                    "/description",
                    "/available_instances",
                    "/device_api",
                    "/devices",
                    "/create",
                ]
                .iter()
                .map(move |f| format!("{P0}/{TYPES}/toy-{t}{f}"))
            }))
            .collect(),
        ),
    ));

    let dev = |p: &str, u: &str, f: &str| format!("{p}/{u}/{f}");
    seeds.push((
        "create-remove",
        lines(vec![
            format!("{P0}/{TYPES}/toy-small/create {U1}\\n"),
            format!("{P0}/{U1}"),
            dev(P0, U1, "mdev_type"),
            dev(P0, U1, "iommu_group"),
            dev(P0, U1, "state"),
            dev(P0, U1, "vfio_user_socket"),
            dev(P0, U1, "label hello\\n"),
            dev(P0, U1, "label"),
            dev(P0, U1, "vendor/size x"),
            dev(P0, U1, "vendor"),
            format!("{P0}/{TYPES}/toy-small/devices/{U1}"),
            format!("bus/mdev/devices/{U1}"),
            "kernel/iommu_groups/0/devices".into(),
            format!("kernel/iommu_groups/0/devices/{U1}"),
            format!("{P0}/{TYPES}/toy-small/available_instances"),
            dev(P0, U1, "remove 1\\n"),
            format!("bus/mdev/devices/{U1}"),
        ]),
    ));

    seeds.push((
        "p2p",
        lines(vec![
            format!("{P0}/{TYPES}/toy-p2p/create {U1}"),
            format!("{P0}/{TYPES}/toy-p2p/create {U2}\\n"),
            dev(P0, U1, "peer_to_peer_resource_uuid"),
            dev(P0, U1, &format!("peer_to_peer_resource_uuid {GROUP}\\n")),
            dev(P0, U2, &format!("peer_to_peer_resource_uuid {GROUP}")),
            "kernel/iommu_groups".into(),
            "kernel/iommu_groups/0/devices".into(),
            format!("@open {U1}"),
            dev(P0, U2, &format!("peer_to_peer_resource_uuid {U3}")),
            format!("@close {U1}"),
            dev(P0, U2, &format!("peer_to_peer_resource_uuid {U3}")),
        ]),
    ));

    seeds.push((
        "held",
        lines(vec![
            format!("{P0}/{TYPES}/toy-big/create {U1}"),
            format!("{P0}/{TYPES}/toy-small/create {U2}"),
            format!("{P1}/{TYPES}/toy-small/create {U2}"),
            format!("@open {U1}"),
            dev(P0, U1, "remove 1"),
            format!("@close {U1}"),
            dev(P0, U1, "remove 0x1"),
            format!("{P1}/{TYPES}/toy-small/create {U3}"),
            format!("@open {U3}"),
            dev(P1, U3, "remove 01"),
            "@unplug gpu1".into(),
            "@unplug gpu0".into(),
            P1.into(),
            "@plug gpu1".into(),
            format!("{P1}/{TYPES}/toy-small/devices"),
        ]),
    ));

    seeds.push((
        "attrs",
        lines(vec![
            format!("{P0}/serial"),
            format!("{P0}/serial x"),
            format!("{P0}/mode fast\\n"),
            format!("{P0}/mode"),
            format!("{P0}/mode medium"),
            format!("{P0}/tuning/rate 250"),
            format!("{P0}/tuning/rate 5000"),
            format!("{P0}/tuning/rate"),
            format!("{P0}/tuning/info"),
            format!("{P0}/tuning/info 1"),
        ]),
    ));

    let dev = |p: &str, u: &str, f: &str| format!("{p}/{u}/{f}");
    seeds.push((
        "refused",
        lines(vec![
            format!("{P0}/{TYPES}/toy-small/create not-a-uuid"),
            format!("{P0}/{TYPES}/toy-small/create {}", U1.to_uppercase()),
            format!("{P0}/{TYPES}/toy-small/create {}", U1.to_uppercase()),
            format!("{P0}/{}", U1.to_uppercase()),
            format!("{P0}/{U1}/remove yes"),
            format!("{P0}/{TYPES}/toy-small/create {}\\xff", &U1[..35]),
            format!("{P0}/{TYPES}/toy-small/create {U3}\\xff"),
            dev(P0, U3, "label \\xc3\\x28"),
            dev(P0, U3, "remove 1\\x00"),
            format!("{P0}/mode \\xff"),
            format!("{P0}/{TYPES}/toy-big/create {U2}"),
            format!("{P0}/{TYPES}/toy-small/name Small"),
            format!("{P1}/{U1}"),
            "kernel/iommu_groups/00".into(),
            "kernel/iommu_groups/4294967296".into(),
        ]),
    ));
    seeds
}
