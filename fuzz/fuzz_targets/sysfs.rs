//! The mdev sysfs tree, through the functions its FUSE layer calls: what each path is, a
//! directory's names, reads and writes of its files, against a core with two parents.
//!
//! Those functions are private to umdev-sysfs (`src/tree.rs`), and reaching them through a
//! FUSE mount needs `/dev/fuse` and root; so the file itself is compiled into this target
//! as a module. It must keep needing nothing of its crate but `umdev_core`, `rustix` and
//! `tracing`.
//!
//! Input: lines, each `PATH` or `PATH DATA` (split at the first space). The path is relative
//! to the mount point, components split at `/` as the kernel hands them over one by one;
//! in DATA, `\n` (a backslash and `n`) is a newline, so that `echo`'s writes can be written,
//! and `\xHH` the byte of those two hex digits, so that bytes that are not UTF-8 can.
//! A file is read, and written if the line has data; a directory is listed; a link is
//! followed. Lines starting with `@` act as the daemon or a client would: `@open UUID` and
//! `@close UUID` (a client takes or leaves the device), `@unplug PARENT` and `@plug PARENT`
//! (the parent goes, its devices with it, and comes back).
//!
//! Nothing may panic, and every error is one of the errnos sysfs gives. The tree must be
//! consistent with itself: a path `is_static` calls a directory is one, a directory's names
//! all resolve and are unique, links resolve inside the tree, write-only files refuse reads
//! and read-only ones writes with EACCES, a created device appears and a removed one goes.
//! At the end the whole tree is walked and checked so.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use rustix::io::Errno;
use umdev_core::{
    AttrSpec, Core, CoreConfig, DeviceDescription, DeviceEnv, MdevParts, MdevUuid, Parent, Serve,
    Served, TypeSpec, VendorAttrs,
};
#[path = "common.rs"]
mod common;

use common::Refuse;
use umdev_pci::{BarIndex, BarKind, ClientId, PciDevice, PciDeviceSpec, PciFunction};

#[path = "../../crates/umdev-sysfs/src/tree.rs"]
mod tree;

use tree::{Entry, File};

/// The parents, each with hot unplug or not. Must match seedgen.
const PARENTS: [(&str, bool); 2] = [("gpu0", false), ("gpu1", true)];

/// The errnos the tree answers with (the core's and the test parent's).
const ERRNOS: [Errno; 8] = [
    Errno::INVAL,
    Errno::ACCESS,
    Errno::NOENT,
    Errno::NODEV,
    Errno::EXIST,
    Errno::NOSPC,
    Errno::BUSY,
    Errno::AGAIN,
];

fuzz_target!(|data: &[u8]| {
    // Paths are text; data bytes that are not UTF-8 come from `\x` escapes.
    let text = String::from_utf8_lossy(data);
    let world = World::new();
    for (n, line) in text.split('\n').enumerate() {
        world.line(n, line);
    }
    world.walk(&mut Vec::new());
});

/// A core with the test parents, and the functions it serves (as a daemon would).
struct World {
    core: Core,
    functions: Functions,
}

type Functions = Arc<Mutex<BTreeMap<MdevUuid, Arc<Mutex<PciFunction>>>>>;

impl World {
    fn new() -> World {
        let keep = Keep::default();
        let functions = keep.functions.clone();
        // A held device's removal waits for the client this long: short, so that the fuzzer
        // can afford it.
        let config = CoreConfig {
            release_timeout: Duration::from_millis(1),
        };
        let core = Core::new(config, Arc::new(keep));
        for (name, hot_unplug) in PARENTS {
            core.register_parent(name, Arc::new(Toy::new(hot_unplug)))
                .expect("a new parent registers");
        }
        World { core, functions }
    }

    fn line(&self, n: usize, line: &str) {
        if let Some(cmd) = line.strip_prefix('@') {
            self.command(n, cmd);
            return;
        }
        let (path, data) = match line.split_once(' ') {
            Some((p, d)) => (p, Some(unescape(d))),
            None => (line, None),
        };
        let path: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        self.visit(&path, data.as_deref());
    }

    fn command(&self, n: usize, cmd: &str) {
        let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        match verb {
            "open" | "close" => {
                let Ok(uuid) = MdevUuid::parse(arg.trim_end()) else {
                    return;
                };
                let f = self
                    .functions
                    .lock()
                    .expect("functions")
                    .get(&uuid)
                    .cloned();
                let Some(f) = f else {
                    return;
                };
                let mut f = f.lock().unwrap_or_else(|e| e.into_inner());
                if verb == "close" {
                    f.close();
                    return;
                }
                // Each line's client is another: the group rules apply between them.
                let client = ClientId {
                    connection: n as u64 + 1,
                    peer: None,
                };
                if let Err(e) = f.open_as(Arc::new(Refuse), client) {
                    let errno = Errno::from_raw_os_error(e.errno());
                    assert!(
                        errno == Errno::BUSY || errno == Errno::NODEV,
                        "open refused with {errno:?}"
                    );
                }
            }
            "unplug" => {
                if let Err(e) = self.core.unregister_parent(arg, false) {
                    check_errno(e.errno(), "unregister_parent");
                }
            }
            "plug" => {
                if let Some(&(name, hot_unplug)) = PARENTS.iter().find(|(p, _)| *p == arg) {
                    if let Err(e) = self
                        .core
                        .register_parent(name, Arc::new(Toy::new(hot_unplug)))
                    {
                        assert_eq!(e.errno(), Errno::EXIST, "register_parent: {e}");
                    }
                }
            }
            _ => {}
        }
    }

    /// What the FUSE layer does with a path: look it up, then list, follow, read or write it.
    fn visit(&self, path: &[&str], data: Option<&[u8]>) {
        let entry = tree::resolve(&self.core, path);
        if tree::is_static(path) {
            assert_eq!(
                entry,
                Some(Entry::Dir),
                "static {path:?} is not a directory"
            );
        }
        match entry {
            Some(Entry::Dir) => self.list(path),
            Some(Entry::Link(target)) => self.follow(path, &target),
            Some(Entry::File(f)) => {
                self.read(path, &f);
                if let Some(data) = data {
                    self.write(path, &f, data);
                }
            }
            None => assert!(
                tree::children(&self.core, path).is_none(),
                "{path:?} does not exist but has names"
            ),
        }
    }

    /// The names of a directory, each of which resolves.
    fn list(&self, path: &[&str]) {
        for (name, entry) in self.names(path) {
            assert!(
                entry.is_some(),
                "{path:?} lists {name:?}, which does not resolve"
            );
        }
    }

    /// The names of a directory (unique, each a plain file name) with what each resolves to.
    fn names(&self, path: &[&str]) -> Vec<(String, Option<Entry>)> {
        let names = tree::children(&self.core, path)
            .unwrap_or_else(|| panic!("directory {path:?} has no names"));
        let mut seen = std::collections::BTreeSet::new();
        let mut child = path.to_vec();
        let mut out = Vec::with_capacity(names.len());
        for name in &names {
            assert!(seen.insert(name), "{path:?} lists {name:?} twice");
            assert!(
                !name.is_empty() && !name.contains('/') && name != "." && name != "..",
                "{path:?} lists the name {name:?}"
            );
            child.push(name);
            out.push((name.clone(), tree::resolve(&self.core, &child)));
            child.pop();
        }
        out
    }

    /// A link's target, relative to the link's directory, stays in the tree and resolves.
    fn follow(&self, path: &[&str], target: &str) {
        let mut to: Vec<&str> = path[..path.len() - 1].to_vec();
        for part in target.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    assert!(to.pop().is_some(), "{path:?} -> {target} leaves the tree");
                }
                p => to.push(p),
            }
        }
        assert!(
            tree::resolve(&self.core, &to).is_some(),
            "{path:?} -> {target} dangles"
        );
    }

    fn read(&self, path: &[&str], f: &File) {
        let r = tree::read(&self.core, f);
        if f.mode() & 0o444 == 0 {
            assert_eq!(r, Err(Errno::ACCESS), "write-only {path:?} was read");
        }
        match r {
            Ok(text) => assert!(text.ends_with('\n'), "{path:?} reads {text:?}, not a line"),
            Err(e) => check_errno(e, "read"),
        }
    }

    fn write(&self, path: &[&str], f: &File, data: &[u8]) {
        let r = tree::write(&self.core, f, data);
        if f.mode() & 0o222 == 0 {
            assert_eq!(r, Err(Errno::ACCESS), "read-only {path:?} was written");
        }
        if let Err(e) = r {
            check_errno(e, "write");
            return;
        }
        match f {
            File::Create { parent, .. } => {
                let uuid = MdevUuid::parse_written(data).expect("create took a UUID");
                let name = uuid.to_string();
                let m = self.core.mdev(&uuid).expect("a created device exists");
                assert_eq!(&m.parent, parent);
                for p in [
                    vec!["bus", "mdev", "devices", &name],
                    vec!["devices", "umdev", parent, &name],
                ] {
                    assert!(
                        tree::resolve(&self.core, &p).is_some(),
                        "created {name}, but {p:?} is missing"
                    );
                }
            }
            File::Remove(uuid) if self.core.mdev(uuid).is_none() => {
                let name = uuid.to_string();
                let p = ["bus", "mdev", "devices", &name];
                assert!(
                    tree::resolve(&self.core, &p).is_none(),
                    "removed {name}, but {p:?} remains"
                );
            }
            _ => {}
        }
    }

    /// Visits the whole tree (depth-bounded, in case a directory ever contained itself).
    fn walk(&self, path: &mut Vec<String>) {
        for (name, entry) in self.names(&strs(path)) {
            path.push(name);
            match entry {
                Some(Entry::Dir) if path.len() < 10 => self.walk(path),
                Some(Entry::Dir) => {}
                Some(Entry::Link(target)) => self.follow(&strs(path), &target),
                Some(Entry::File(f)) => self.read(&strs(path), &f),
                None => panic!("{path:?} is listed but does not resolve"),
            }
            path.pop();
        }
    }
}

fn strs(path: &[String]) -> Vec<&str> {
    path.iter().map(String::as_str).collect()
}

/// DATA with `\n` and `\xHH` replaced by the bytes they stand for.
fn unescape(d: &str) -> Vec<u8> {
    let b = d.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 2..i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], b.get(i + 1), hex) {
            (b'\\', Some(b'n'), _) => {
                out.push(b'\n');
                i += 2;
            }
            (b'\\', Some(b'x'), Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn check_errno(e: Errno, what: &str) {
    assert!(ERRNOS.contains(&e), "{what} failed with {e:?}");
}

/// A parent with 4 units of room: `small` and `p2p` devices take one, `big` takes all four.
/// Must match seedgen.
struct Toy {
    hot_unplug: bool,
    mode: Mutex<String>,
    rate: Mutex<u32>,
}

impl Toy {
    fn new(hot_unplug: bool) -> Toy {
        Toy {
            hot_unplug,
            mode: Mutex::new("slow".into()),
            rate: Mutex::new(100),
        }
    }

    fn units(type_name: &str) -> u32 {
        if type_name == "big" {
            4
        } else {
            1
        }
    }
}

impl Parent for Toy {
    fn driver(&self) -> &str {
        "toy"
    }

    fn types(&self) -> Vec<TypeSpec> {
        vec![
            TypeSpec {
                pretty_name: Some("Small".into()),
                description: Some("a quarter of the parent".into()),
                attrs: vec![
                    AttrSpec::writable("label"),
                    AttrSpec::read_only("vendor/size"),
                ],
                ..TypeSpec::new("small")
            },
            TypeSpec {
                peer_to_peer: true,
                ..TypeSpec::new("p2p")
            },
            TypeSpec {
                pretty_name: Some("Big".into()),
                ..TypeSpec::new("big")
            },
        ]
    }

    fn available(&self, type_name: &str, in_use: &[&str]) -> u32 {
        let used: u32 = in_use.iter().map(|t| Toy::units(t)).sum();
        4u32.saturating_sub(used) / Toy::units(type_name)
    }

    fn build(
        &self,
        _: &MdevUuid,
        description: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        let spec = PciDeviceSpec::builder(0x1b36, 0x0012)
            .bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                16,
            )
            .build()
            .map_err(|_| Errno::INVAL)?;
        let attrs: Option<Box<dyn VendorAttrs>> = (description.type_name == "small")
            .then(|| Box::new(Label(Mutex::new(String::new()))) as Box<dyn VendorAttrs>);
        Ok(MdevParts {
            spec,
            device: Box::new(Nothing),
            attrs,
        })
    }

    fn hot_unplug(&self) -> bool {
        self.hot_unplug
    }

    fn attrs(&self) -> Vec<AttrSpec> {
        vec![
            AttrSpec::read_only("serial"),
            AttrSpec::writable("mode"),
            AttrSpec::writable("tuning/rate"),
            AttrSpec::read_only("tuning/info"),
        ]
    }

    fn show_attr(&self, name: &str) -> Result<String, Errno> {
        Ok(match name {
            "serial" => "TOY-0001".into(),
            "mode" => self.mode.lock().expect("mode").clone(),
            "tuning/rate" => self.rate.lock().expect("rate").to_string(),
            "tuning/info" => "fixed\n".into(),
            _ => return Err(Errno::NOENT),
        })
    }

    fn store_attr(&self, name: &str, value: &str) -> Result<(), Errno> {
        let v = value.trim_end();
        match name {
            "mode" if v == "fast" || v == "slow" => *self.mode.lock().expect("mode") = v.into(),
            "tuning/rate" => {
                let r: u32 = v.parse().map_err(|_| Errno::INVAL)?;
                if r > 1000 {
                    return Err(Errno::INVAL);
                }
                *self.rate.lock().expect("rate") = r;
            }
            "mode" => return Err(Errno::INVAL),
            _ => return Err(Errno::ACCESS),
        }
        Ok(())
    }
}

/// A device's `label` (at most 16 bytes) and its fixed `vendor/size`.
struct Label(Mutex<String>);

impl VendorAttrs for Label {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            "label" => Ok(self.0.lock().expect("label").clone()),
            "vendor/size" => Ok("quarter".into()),
            _ => Err(Errno::NOENT),
        }
    }

    fn store(&self, name: &str, value: &str) -> Result<(), Errno> {
        if name != "label" || value.len() > 16 {
            return Err(Errno::INVAL);
        }
        *self.0.lock().expect("label") = value.trim_end().to_owned();
        Ok(())
    }
}

struct Nothing;

impl PciDevice for Nothing {
    fn bar_read(&mut self, _: BarIndex, _: u64, data: &mut [u8]) -> Result<(), Errno> {
        data.fill(0);
        Ok(())
    }

    fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8]) -> Result<(), Errno> {
        Ok(())
    }
}

/// Keeps each function where a `@open` line can reach it, as the daemon's servers do.
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
        // Stopping disconnects the client: its session's teardown closes the device.
        let f = self.functions.lock().expect("functions").remove(&self.uuid);
        if let Some(f) = f {
            f.lock().unwrap_or_else(|e| e.into_inner()).close();
        }
    }
}

impl Serve for Keep {
    fn start(&self, env: &DeviceEnv, f: PciFunction) -> std::io::Result<Box<dyn Served>> {
        let uuid = *env.uuid();
        self.functions
            .lock()
            .expect("functions")
            .insert(uuid, Arc::new(Mutex::new(f)));
        Ok(Box::new(Kept {
            uuid,
            functions: self.functions.clone(),
        }))
    }
}
