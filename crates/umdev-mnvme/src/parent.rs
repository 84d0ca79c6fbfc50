//! mnvme as a parent driver: a storage pool (a directory with a capacity) carved into
//! namespaces of fixed sizes, one controller per namespace.
//!
//! Types by size: `mnvme-1g`, `mnvme-4g`, `mnvme-16g`; `available_instances` is what the
//! pool has left divided by the type's size. Creating a device makes its backing file
//! `<pool>/<uuid>.img` (sparse), or finds the one an earlier device of the same UUID left:
//! by default removing a device keeps its file, so `mdevctl stop` and `start` of a defined
//! device never lose the disk (option `delete_on_remove` deletes it instead). A device can
//! adopt another existing file through its `vendor/backing_file` attribute while no client
//! holds it. Each device has its own identity (serial, subsystem NQN, NGUID, EUI-64),
//! derived from its UUID, and keeps the one it migrates with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use umdev_core::{
    AttrSpec, DeviceDescription, DeviceEnv, DriverError, Errno, MdevParts, MdevUuid, OptionSpec,
    Options, Parent, ParentContext, ParentDriver, SandboxPath, TypeSpec, VendorAttrs,
};

use crate::ctrl::{Ctrl, Tuning};
use crate::device::Mnvme;
use crate::identify::Identity;
use crate::namespace::Namespace;

const GIB: u64 = 1 << 30;
/// The types: name and size.
pub const TYPES: [(&str, u64); 3] = [("1g", GIB), ("4g", 4 * GIB), ("16g", 16 * GIB)];

/// The driver entry: `driver = "mnvme"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MnvmeDriver;

impl ParentDriver for MnvmeDriver {
    fn name(&self) -> &str {
        "mnvme"
    }

    fn description(&self) -> &str {
        "mediated NVMe controllers, each a namespace carved from a storage pool"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![
            OptionSpec::path(
                "pool",
                None,
                "the pool's directory (default: the parent's state directory)",
            ),
            OptionSpec::integer("capacity_gib", 1, 1 << 20, 4, "the pool's capacity in GiB"),
            OptionSpec::bool(
                "delete_on_remove",
                false,
                "remove a device's backing file with the device (default: keep it)",
            ),
            OptionSpec::integer(
                "poll_us",
                0,
                100_000,
                200,
                "how long the controller keeps polling its queues once idle before it sleeps",
            ),
            OptionSpec::bool(
                "shadow_doorbells",
                true,
                "offer Doorbell Buffer Config (shadow doorbells and EventIdx)",
            ),
            OptionSpec::bool(
                "copy_on_migrate",
                false,
                "migration copies the namespace during pre-copy (default: the destination shares the backing file)",
            ),
        ]
    }

    fn build(&self, ctx: &ParentContext, o: &Options) -> Result<Arc<dyn Parent>, DriverError> {
        let pool = o
            .path("pool")
            .or_else(|| ctx.state_dir.clone())
            .ok_or_else(|| {
                DriverError::Failed("mnvme needs a pool directory (option pool)".into())
            })?;
        std::fs::create_dir_all(&pool).map_err(|e| {
            DriverError::Failed(format!("cannot create the pool {}: {e}", pool.display()))
        })?;
        let capacity = o
            .integer("capacity_gib")
            .and_then(|c| u64::try_from(c).ok())
            .unwrap_or(4)
            * GIB;
        Ok(Arc::new(MnvmeParent {
            pool,
            capacity,
            delete_on_remove: o.bool("delete_on_remove").unwrap_or(false),
            tuning: Tuning {
                poll: std::time::Duration::from_micros(
                    o.integer("poll_us")
                        .and_then(|v| u64::try_from(v).ok())
                        .unwrap_or(200),
                ),
                shadow_doorbells: o.bool("shadow_doorbells").unwrap_or(true),
                copy_on_migrate: o.bool("copy_on_migrate").unwrap_or(false),
            },
        }))
    }
}

/// A pool of namespaces.
#[derive(Debug)]
pub struct MnvmeParent {
    pool: PathBuf,
    capacity: u64,
    delete_on_remove: bool,
    tuning: Tuning,
}

/// What `create` decided: the backing file and the size.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Described {
    file: PathBuf,
    size: u64,
}

fn type_size(name: &str) -> Option<u64> {
    TYPES.iter().find(|(n, _)| *n == name).map(|t| t.1)
}

/// The vendor attributes.
pub const ATTR_BACKING_FILE: &str = "vendor/backing_file";
/// The namespace's size in bytes.
pub const ATTR_SIZE: &str = "vendor/size";
/// The controller's serial number.
pub const ATTR_SERIAL: &str = "vendor/serial";
/// The controller's subsystem NQN.
pub const ATTR_SUBNQN: &str = "vendor/subnqn";

struct Attrs(Arc<Ctrl>);

impl VendorAttrs for Attrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        let c = &self.0;
        let id = || c.identity.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(match name {
            ATTR_BACKING_FILE => format!("{}\n", c.ns.path().display()),
            ATTR_SIZE => format!("{}\n", c.ns.size()),
            ATTR_SERIAL => format!("{}\n", id().serial),
            ATTR_SUBNQN => format!("{}\n", id().subnqn),
            _ => return Err(Errno::NOENT),
        })
    }

    fn store(&self, name: &str, value: &str) -> Result<(), Errno> {
        if name != ATTR_BACKING_FILE {
            return Err(Errno::ACCESS);
        }
        if self.0.attached().is_some() {
            tracing::info!("mnvme: backing file change refused: a client holds the device");
            return Err(Errno::BUSY);
        }
        let path = Path::new(value.trim_end_matches('\n'));
        if !path.is_absolute() {
            return Err(Errno::INVAL);
        }
        self.0.ns.adopt(path).map_err(|e| {
            tracing::info!(path = %path.display(), error = %e, "mnvme: cannot adopt a backing file");
            e.raw_os_error().map_or(Errno::INVAL, Errno::from_raw_os_error)
        })
    }
}

impl Parent for MnvmeParent {
    fn driver(&self) -> &str {
        "mnvme"
    }

    fn types(&self) -> Vec<TypeSpec> {
        TYPES
            .iter()
            .map(|(name, size)| TypeSpec {
                pretty_name: Some(format!("NVMe {} GiB", size / GIB)),
                description: Some(format!(
                    "an NVMe controller with one {} GiB namespace",
                    size / GIB
                )),
                attrs: vec![
                    AttrSpec::writable(ATTR_BACKING_FILE),
                    AttrSpec::read_only(ATTR_SIZE),
                    AttrSpec::read_only(ATTR_SERIAL),
                    AttrSpec::read_only(ATTR_SUBNQN),
                ],
                ..TypeSpec::new(name)
            })
            .collect()
    }

    fn available(&self, name: &str, in_use: &[&str]) -> u32 {
        let used: u64 = in_use
            .iter()
            .map(|t| type_size(t).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        let Some(size) = type_size(name) else {
            return 0;
        };
        u32::try_from(self.capacity.saturating_sub(used) / size).unwrap_or(u32::MAX)
    }

    fn create(&self, uuid: &MdevUuid, name: &str) -> Result<DeviceDescription, Errno> {
        let size = type_size(name).ok_or(Errno::INVAL)?;
        let file = self.pool.join(format!("{uuid}.img"));
        // A file an earlier device of this UUID left is the same disk: keep it.
        Namespace::open(&file, size).map_err(|e| {
            tracing::warn!(file = %file.display(), error = %e, "mnvme: cannot make the backing file");
            e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error)
        })?;
        DeviceDescription::with(name, &Described { file, size })
    }

    fn build(
        &self,
        uuid: &MdevUuid,
        d: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        let desc: Described = d.data()?;
        let ns = Namespace::open(&desc.file, desc.size)
            .map_err(|e| e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error))?;
        let identity = Identity::of_uuid(*uuid.as_bytes(), &uuid.to_string());
        let ctrl = Arc::new(Ctrl::new(ns, identity, self.tuning));
        Ok(MdevParts {
            spec: crate::device::spec().map_err(|_| Errno::INVAL)?,
            device: Box::new(Mnvme { ctrl: ctrl.clone() }),
            attrs: Some(Box::new(Attrs(ctrl))),
        })
    }

    fn sandbox_paths(&self, d: &DeviceDescription) -> Vec<SandboxPath> {
        d.data::<Described>()
            .map(|desc| vec![SandboxPath::read_write(desc.file)])
            .unwrap_or_default()
    }

    fn remove(&self, uuid: &MdevUuid, d: &DeviceDescription) {
        if !self.delete_on_remove {
            return;
        }
        let Ok(desc) = d.data::<Described>() else {
            return;
        };
        // Only the pool's own file of this device; an adopted file is never deleted.
        if desc.file == self.pool.join(format!("{uuid}.img")) {
            if let Err(e) = std::fs::remove_file(&desc.file) {
                tracing::warn!(file = %desc.file.display(), error = %e, "mnvme: cannot delete a backing file");
            }
        }
    }

    fn attrs(&self) -> Vec<AttrSpec> {
        vec![
            AttrSpec::read_only("vendor/pool"),
            AttrSpec::read_only("vendor/capacity"),
        ]
    }

    fn show_attr(&self, name: &str) -> Result<String, Errno> {
        match name {
            "vendor/pool" => Ok(format!("{}\n", self.pool.display())),
            "vendor/capacity" => Ok(format!("{}\n", self.capacity)),
            _ => Err(Errno::NOENT),
        }
    }
}
