//! Seeds of `fuzz_targets/control.rs`: every request, a few responses, option lines and
//! definition files, written with `umdev-api` itself so that they follow the API.

use serde_json::json;
use umdev_api::control::{DeviceEntry, GroupEntry, Holder, ModifyRequest, TypeEntry};
use umdev_api::{Definition, Request, Response, Start};

const UUID: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let some = |s: &str| Some(s.to_owned());
    let definition = json!({"mdev_type": "mtty-2", "start": "auto", "attrs": [{"label": "a"}]});
    let requests = [
        Request::Types {
            parent: some("mtty0"),
        },
        Request::List {
            defined: true,
            uuid: some(UUID),
            parent: None,
        },
        Request::Define {
            uuid: some(UUID),
            parent: some("mtty0"),
            mdev_type: some("mtty-2"),
            auto: true,
            json: Some(definition.clone()),
            force: false,
        },
        Request::Undefine {
            uuid: UUID.into(),
            parent: None,
        },
        Request::Modify(ModifyRequest {
            uuid: UUID.into(),
            parent: some("mtty0"),
            mdev_type: None,
            addattr: some("label"),
            delattr: false,
            index: Some(0),
            value: some("x"),
            auto: false,
            manual: true,
            json: None,
        }),
        Request::Start {
            uuid: None,
            parent: some("mtty0"),
            mdev_type: some("mtty-1"),
            json: Some(json!({"n": [1, -2, 3.5e-7, 1e300, 18446744073709551615u64], "t": null})),
        },
        Request::Stop { uuid: UUID.into() },
        Request::Socket { uuid: UUID.into() },
        Request::Groups,
        Request::AddParent {
            name: "mnvme1".into(),
            driver: "mnvme".into(),
            options: json!({"size": "64M", "queues": 4})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        },
        Request::Drivers,
        Request::Access {
            uuid: UUID.into(),
            owner: some("qemu:kvm"),
            mode: some("0660"),
        },
        Request::DisplayPlane { uuid: UUID.into() },
        Request::Stats,
        Request::Upgrade { group: Some(3) },
        Request::Shutdown {
            remove_devices: true,
        },
        Request::RemoveParent {
            name: "mtty0".into(),
            force: true,
        },
    ];
    for (i, r) in requests.iter().enumerate() {
        let mut line = serde_json::to_vec(r).expect("a request serialises");
        line.push(b'\n');
        seeds.push((format!("request-{i:02}"), line));
    }
    // A request line followed by more: `read_request` must stop at the newline.
    seeds.push((
        "request-two-lines".into(),
        b"{\"op\":\"groups\"}\n{\"op\":\"stats\"}\n".to_vec(),
    ));

    let responses = [
        Response::Types {
            types: vec![TypeEntry {
                parent: "mtty0".into(),
                id: "mtty-1".into(),
                available_instances: 3,
                device_api: "vfio-pci".into(),
                name: some("Single port"),
                description: None,
            }],
        },
        Response::Devices {
            devices: vec![DeviceEntry {
                uuid: UUID.into(),
                parent: "mtty0".into(),
                mdev_type: "mtty-2".into(),
                auto: true,
                active: true,
                defined: false,
                attrs: vec![("label".into(), "a".into())],
                socket: some("/run/umdev/state/x/vfio-user.sock"),
                iommu_group: Some(0),
                state: some("running"),
            }],
        },
        Response::Groups {
            groups: vec![GroupEntry {
                id: 0,
                devices: vec![UUID.into()],
                owner: Some(Holder {
                    pid: Some(1),
                    uid: None,
                    connection: 2,
                }),
                peer_to_peer: None,
            }],
        },
        Response::Done,
        Response::Error {
            errno: 16,
            message: "busy \"now\"\n".into(),
        },
    ];
    for (i, r) in responses.iter().enumerate() {
        let line = serde_json::to_vec(r).expect("a response serialises");
        seeds.push((format!("response-{i}"), line));
    }

    seeds.push((
        "options".into(),
        b"size=64M\nbacking=/var/lib/disk.img\nqueues=4\nsize=128M\n=x\nflag".to_vec(),
    ));
    let d = Definition {
        mdev_type: "mtty-2".into(),
        start: Start::Auto,
        attrs: vec![("b".into(), "1".into()), ("a".into(), "\u{e9}\"\n".into())],
    };
    seeds.push(("definition".into(), d.to_text().into_bytes()));
    seeds.push((
        "definition-mdevctl".into(),
        br#"{"mdev_type":"i915-GVTg_V5_4","start":"manual","attrs":[]}"#.to_vec(),
    ));
    seeds
}
