//! The tree's shape: which paths exist, what they are, what reading and writing them does.
//! Pure functions of the core's state, so the FUSE layer keeps no copy of it.
//!
//! Paths are relative to the mount point (`<root>/sys`). Symlinks are relative, as the
//! kernel's are, so the tree resolves wherever it is mounted.

use rustix::io::Errno;
use umdev_core::{Core, MdevUuid};

/// What a path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    Dir,
    File(File),
    /// A symlink and its (relative) target.
    Link(String),
}

/// The files of the tree, with what they need to be read or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum File {
    Create {
        parent: String,
        type_id: String,
    },
    Name {
        parent: String,
        type_id: String,
    },
    Description {
        parent: String,
        type_id: String,
    },
    Available {
        parent: String,
        type_id: String,
    },
    DeviceApi {
        parent: String,
        type_id: String,
    },
    Remove(MdevUuid),
    Socket(MdevUuid),
    /// Whether the device is served now (`running`, `worker-died`): umdev's own.
    State(MdevUuid),
    Attr {
        uuid: MdevUuid,
        name: String,
        writable: bool,
    },
    /// An attribute of the parent itself.
    ParentAttr {
        parent: String,
        name: String,
        writable: bool,
    },
}

impl File {
    /// Permission bits, as sysfs shows them.
    pub(crate) fn mode(&self) -> u16 {
        match self {
            File::Create { .. } | File::Remove(_) => 0o200,
            File::Attr { writable: true, .. } | File::ParentAttr { writable: true, .. } => 0o644,
            _ => 0o444,
        }
    }
}

const TYPES: &str = "mdev_supported_types";

fn mdev_in(core: &Core, parent: &str, uuid: &str) -> Option<umdev_core::MdevInfo> {
    let u = MdevUuid::parse(uuid).ok()?;
    // Only the canonical (lowercase) name exists, as in sysfs.
    if u.to_string() != uuid {
        return None;
    }
    core.mdev(&u).filter(|m| m.parent == parent)
}

fn type_exists(core: &Core, parent: &str, type_id: &str) -> bool {
    core.type_spec(parent, type_id).is_some()
}

/// Whether `path` is part of the fixed skeleton, which never changes while mounted (the
/// kernel may cache it).
pub(crate) fn is_static(path: &[&str]) -> bool {
    matches!(
        path,
        [] | ["class"]
            | ["class", "mdev_bus"]
            | ["devices"]
            | ["devices", "umdev"]
            | ["bus"]
            | ["bus", "mdev"]
            | ["bus", "mdev", "devices"]
            | ["kernel"]
            | ["kernel", "iommu_groups"]
    )
}

/// What `path` is, if it exists.
pub(crate) fn resolve(core: &Core, path: &[&str]) -> Option<Entry> {
    use Entry::{Dir, Link};
    let s = |x: &str| x.to_owned();
    Some(match path {
        [] | ["class"] | ["class", "mdev_bus"] | ["devices"] | ["devices", "umdev"] => Dir,
        ["bus"] | ["bus", "mdev"] | ["bus", "mdev", "devices"] => Dir,
        ["kernel"] | ["kernel", "iommu_groups"] => Dir,
        ["class", "mdev_bus", p] => {
            core.has_parent(p).then_some(())?;
            Link(format!("../../devices/umdev/{p}"))
        }
        ["devices", "umdev", p] => {
            core.has_parent(p).then_some(())?;
            Dir
        }
        ["devices", "umdev", p, TYPES] => {
            core.has_parent(p).then_some(())?;
            Dir
        }
        ["devices", "umdev", p, TYPES, t] => {
            type_exists(core, p, t).then_some(())?;
            Dir
        }
        ["devices", "umdev", p, TYPES, t, "devices"] => {
            type_exists(core, p, t).then_some(())?;
            Dir
        }
        ["devices", "umdev", p, TYPES, t, "devices", u] => {
            let m = mdev_in(core, p, u)?;
            (m.type_id == *t).then_some(())?;
            Link(format!("../../../{u}"))
        }
        ["devices", "umdev", p, TYPES, t, f] => {
            let info = core.type_spec(p, t)?;
            let (parent, type_id) = (s(p), s(t));
            Entry::File(match *f {
                "create" => File::Create { parent, type_id },
                "name" if info.pretty_name.is_some() => File::Name { parent, type_id },
                "description" if info.description.is_some() => {
                    File::Description { parent, type_id }
                }
                "available_instances" => File::Available { parent, type_id },
                "device_api" => File::DeviceApi { parent, type_id },
                _ => return None,
            })
        }
        ["devices", "umdev", p, u] => {
            if mdev_in(core, p, u).is_some() {
                Dir
            } else {
                return parent_attr(core, p, u);
            }
        }
        ["devices", "umdev", p, u, f] => {
            let Some(m) = mdev_in(core, p, u) else {
                return parent_attr(core, p, &format!("{u}/{f}"));
            };
            match *f {
                "remove" => Entry::File(File::Remove(m.uuid)),
                "vfio_user_socket" => Entry::File(File::Socket(m.uuid)),
                "state" => Entry::File(File::State(m.uuid)),
                "mdev_type" => Link(format!("../{TYPES}/{}", m.type_id)),
                "iommu_group" => Link(format!("../../../../kernel/iommu_groups/{}", m.iommu_group)),
                _ => {
                    if let Some(a) = m.attrs.iter().find(|a| a.name == *f) {
                        Entry::File(File::Attr {
                            uuid: m.uuid,
                            name: a.name.clone(),
                            writable: a.writable,
                        })
                    } else if m.attrs.iter().any(|a| a.name.starts_with(&format!("{f}/"))) {
                        Dir
                    } else {
                        return None;
                    }
                }
            }
        }
        ["devices", "umdev", p, u, g, f] => {
            let m = mdev_in(core, p, u)?;
            let name = format!("{g}/{f}");
            let a = m.attrs.iter().find(|a| a.name == name)?;
            Entry::File(File::Attr {
                uuid: m.uuid,
                name,
                writable: a.writable,
            })
        }
        ["bus", "mdev", "devices", u] => {
            let m = core.mdev(&MdevUuid::parse(u).ok()?)?;
            (m.uuid.to_string() == *u).then_some(())?;
            Link(format!("../../../devices/umdev/{}/{u}", m.parent))
        }
        ["kernel", "iommu_groups", n] | ["kernel", "iommu_groups", n, "devices"] => {
            core.group(group_number(n)?)?;
            Dir
        }
        ["kernel", "iommu_groups", n, "devices", u] => {
            let g = core.group(group_number(n)?)?;
            let uuid = MdevUuid::parse(u).ok()?;
            g.devices.contains(&uuid).then_some(())?;
            let m = core.mdev(&uuid)?;
            Link(format!("../../../../devices/umdev/{}/{u}", m.parent))
        }
        _ => return None,
    })
}

/// Parent `p`'s attribute `name`, or the directory of its attribute group `name`.
fn parent_attr(core: &Core, p: &str, name: &str) -> Option<Entry> {
    core.has_parent(p).then_some(())?;
    let attrs = core.parent_attrs(p);
    if let Some(a) = attrs.iter().find(|a| a.name == name) {
        return Some(Entry::File(File::ParentAttr {
            parent: p.to_owned(),
            name: name.to_owned(),
            writable: a.writable,
        }));
    }
    let group = format!("{name}/");
    attrs
        .iter()
        .any(|a| !name.contains('/') && a.name.starts_with(&group))
        .then_some(Entry::Dir)
}

/// Group directory names are plain decimal numbers.
fn group_number(n: &str) -> Option<u32> {
    if n.is_empty() || (n.len() > 1 && n.starts_with('0')) {
        return None;
    }
    n.parse().ok()
}

/// The names in directory `path` (not `.` and `..`), if it is one.
pub(crate) fn children(core: &Core, path: &[&str]) -> Option<Vec<String>> {
    let names = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
    Some(match path {
        [] => names(&["bus", "class", "devices", "kernel"]),
        ["class"] => names(&["mdev_bus"]),
        ["devices"] => names(&["umdev"]),
        ["bus"] => names(&["mdev"]),
        ["bus", "mdev"] => names(&["devices"]),
        ["kernel"] => names(&["iommu_groups"]),
        ["class", "mdev_bus"] | ["devices", "umdev"] => core.parents(),
        ["bus", "mdev", "devices"] => core.mdevs().iter().map(|m| m.uuid.to_string()).collect(),
        ["kernel", "iommu_groups"] => core.groups().iter().map(|g| g.id.to_string()).collect(),
        ["kernel", "iommu_groups", n, "devices"] => core
            .group(group_number(n)?)?
            .devices
            .iter()
            .map(ToString::to_string)
            .collect(),
        ["kernel", "iommu_groups", n] => {
            core.group(group_number(n)?)?;
            names(&["devices"])
        }
        ["devices", "umdev", p] => {
            core.has_parent(p).then_some(())?;
            let mut v = names(&[TYPES]);
            for a in core.parent_attrs(p) {
                let top = a.name.split('/').next().unwrap_or(&a.name).to_owned();
                if !v.contains(&top) {
                    v.push(top);
                }
            }
            v.extend(core.parent_devices(p).iter().map(ToString::to_string));
            v
        }
        ["devices", "umdev", p, TYPES] => core.types(p).ok()?.into_iter().map(|t| t.id).collect(),
        ["devices", "umdev", p, TYPES, t] => {
            let info = core.type_spec(p, t)?;
            let mut v = names(&["available_instances", "create", "device_api", "devices"]);
            if info.description.is_some() {
                v.push("description".into());
            }
            if info.pretty_name.is_some() {
                v.push("name".into());
            }
            v
        }
        ["devices", "umdev", p, TYPES, t, "devices"] => core
            .type_info(p, t)
            .ok()?
            .devices
            .iter()
            .map(ToString::to_string)
            .collect(),
        ["devices", "umdev", p, u] if mdev_in(core, p, u).is_some() => {
            let m = mdev_in(core, p, u)?;
            let mut v = names(&[
                "iommu_group",
                "mdev_type",
                "remove",
                "state",
                "vfio_user_socket",
            ]);
            for a in &m.attrs {
                let top = a.name.split('/').next().unwrap_or(&a.name).to_owned();
                if !v.contains(&top) {
                    v.push(top);
                }
            }
            v
        }
        ["devices", "umdev", p, u] => {
            // A parent attribute group.
            core.has_parent(p).then_some(())?;
            let prefix = format!("{u}/");
            let v: Vec<String> = core
                .parent_attrs(p)
                .iter()
                .filter_map(|a| a.name.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            if v.is_empty() {
                return None;
            }
            v
        }
        ["devices", "umdev", p, u, g] => {
            let m = mdev_in(core, p, u)?;
            let prefix = format!("{g}/");
            let v: Vec<String> = m
                .attrs
                .iter()
                .filter_map(|a| a.name.strip_prefix(&prefix).map(str::to_owned))
                .collect();
            if v.is_empty() {
                return None;
            }
            v
        }
        _ => return None,
    })
}

fn errno_of(e: &umdev_core::CoreError) -> Errno {
    e.errno()
}

/// The text of a readable file.
pub(crate) fn read(core: &Core, f: &File) -> Result<String, Errno> {
    let ty = |p: &str, t: &str| core.type_info(p, t).map_err(|e| errno_of(&e));
    Ok(match f {
        File::Name { parent, type_id } => {
            format!("{}\n", ty(parent, type_id)?.name.unwrap_or_default())
        }
        File::Description { parent, type_id } => {
            format!("{}\n", ty(parent, type_id)?.description.unwrap_or_default())
        }
        File::Available { parent, type_id } => {
            format!("{}\n", ty(parent, type_id)?.available_instances)
        }
        File::DeviceApi { parent, type_id } => format!("{}\n", ty(parent, type_id)?.device_api),
        File::Socket(u) => {
            let m = core.mdev(u).ok_or(Errno::NODEV)?;
            format!(
                "{}\n",
                m.socket
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )
        }
        File::State(u) => format!("{}\n", core.mdev(u).ok_or(Errno::NODEV)?.state.as_str()),
        File::Attr { uuid, name, .. } => core.read_attr(uuid, name).map_err(|e| errno_of(&e))?,
        File::ParentAttr { parent, name, .. } => core
            .read_parent_attr(parent, name)
            .map_err(|e| errno_of(&e))?,
        File::Create { .. } | File::Remove(_) => return Err(Errno::ACCESS),
    })
}

/// What a write to `remove` means: the kernel's `kstrtoul(buf, 0)` (decimal, `0x` hex or
/// `0` octal, one trailing newline allowed); non-zero removes.
fn parse_remove(data: &[u8]) -> Result<bool, Errno> {
    let s = std::str::from_utf8(data).map_err(|_| Errno::INVAL)?;
    let s = s.strip_suffix('\n').unwrap_or(s);
    let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        u64::from_str_radix(&s[1..], 8)
    } else {
        s.parse::<u64>()
    };
    v.map(|v| v != 0).map_err(|_| Errno::INVAL)
}

/// What a write does; `Ok` means the whole write was taken.
pub(crate) fn write(core: &Core, f: &File, data: &[u8]) -> Result<(), Errno> {
    match f {
        File::Create { parent, type_id } => {
            let uuid = MdevUuid::parse_written(data).map_err(|_| Errno::INVAL)?;
            core.create(parent, type_id, uuid).map_err(|e| {
                tracing::info!(%uuid, parent, type_id, error = %e, "create refused");
                errno_of(&e)
            })
        }
        File::Remove(uuid) => {
            if parse_remove(data)? {
                core.remove(uuid).map_err(|e| {
                    tracing::info!(%uuid, error = %e, "remove refused");
                    errno_of(&e)
                })?;
            }
            Ok(())
        }
        File::Attr { uuid, name, .. } => {
            let v = std::str::from_utf8(data).map_err(|_| Errno::INVAL)?;
            core.write_attr(uuid, name, v).map_err(|e| errno_of(&e))
        }
        File::ParentAttr { parent, name, .. } => {
            let v = std::str::from_utf8(data).map_err(|_| Errno::INVAL)?;
            core.write_parent_attr(parent, name, v)
                .map_err(|e| errno_of(&e))
        }
        _ => Err(Errno::ACCESS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_takes_what_kstrtoul_takes() {
        assert_eq!(parse_remove(b"1\n"), Ok(true));
        assert_eq!(parse_remove(b"1"), Ok(true));
        assert_eq!(parse_remove(b"0"), Ok(false));
        assert_eq!(parse_remove(b"0x10"), Ok(true));
        assert_eq!(parse_remove(b"010"), Ok(true));
        assert_eq!(parse_remove(b"yes"), Err(Errno::INVAL));
        assert_eq!(parse_remove(b""), Err(Errno::INVAL));
        assert_eq!(parse_remove(b"-1"), Err(Errno::INVAL));
    }

    #[test]
    fn group_numbers_are_canonical_decimals() {
        assert_eq!(group_number("0"), Some(0));
        assert_eq!(group_number("12"), Some(12));
        assert_eq!(group_number("012"), None);
        assert_eq!(group_number("x"), None);
    }
}
