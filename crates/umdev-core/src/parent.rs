//! What a parent driver implements: its types, how many of each are available given what
//! exists, how to create a device (a description), how to build it (the device itself),
//! and how to let it go.
//!
//! Creating is split in two so that the resources and the object live apart: `create`
//! takes what the device needs from the parent's pool and returns a [`DeviceDescription`],
//! plain data that can be stored or sent to another process; `build` turns a description
//! into the [`PciDevice`] the framework serves, wherever that runs. `remove` gives the
//! resources back.

use rustix::io::Errno;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use umdev_pci::{PciDevice, PciDeviceSpec};

use crate::{DeviceEnv, MdevUuid};

/// The one device API umdev serves.
pub const DEVICE_API_VFIO_PCI: &str = "vfio-pci";

/// A type a parent offers. Its id at the ABI is `<driver>-<name>` (`mtty-2`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeSpec {
    /// The type's own name (`2`); the id adds the driver's name in front.
    pub name: String,
    /// Human name (the `name` file), if any.
    pub pretty_name: Option<String>,
    /// Free text (the `description` file), if any.
    pub description: Option<String>,
    /// The `device_api` file (`vfio-pci`).
    pub device_api: String,
    /// Devices of this type share peer-to-peer resources: each gets a
    /// `peer_to_peer_resource_uuid` attribute, and equal values share an IOMMU group.
    pub peer_to_peer: bool,
    /// Vendor attributes each device of this type has (beyond the core's own).
    pub attrs: Vec<AttrSpec>,
}

impl TypeSpec {
    /// A `vfio-pci` type with no vendor attributes and no peer-to-peer resources.
    pub fn new(name: &str) -> TypeSpec {
        TypeSpec {
            name: name.to_owned(),
            pretty_name: None,
            description: None,
            device_api: DEVICE_API_VFIO_PCI.to_owned(),
            peer_to_peer: false,
            attrs: Vec::new(),
        }
    }
}

/// A vendor attribute: a file in a device's (or a parent's) directory. A name may hold one
/// `/` (`vendor/sample_mdev_dev`): the part before it is a subdirectory, as sysfs attribute
/// groups are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttrSpec {
    /// The file name, relative to the directory.
    pub name: String,
    /// Whether it can be written (mode 0644, else 0444).
    pub writable: bool,
}

impl AttrSpec {
    /// A read-only attribute.
    pub fn read_only(name: &str) -> AttrSpec {
        AttrSpec {
            name: name.to_owned(),
            writable: false,
        }
    }

    /// A writable attribute.
    pub fn writable(name: &str) -> AttrSpec {
        AttrSpec {
            name: name.to_owned(),
            writable: true,
        }
    }
}

/// A device's vendor attributes, read and written by name. Called from the management
/// side's threads (a FUSE request, a control request), never with the registry lock held
/// and never on the device's session thread: share state with the device through a lock.
pub trait VendorAttrs: Send + Sync {
    /// The text of attribute `name` (a trailing newline is added if missing).
    fn show(&self, name: &str) -> Result<String, Errno>;
    /// Stores `value` (as written, newline included) into attribute `name`.
    fn store(&self, _name: &str, _value: &str) -> Result<(), Errno> {
        Err(Errno::ACCESS)
    }
}

/// A path a device's code opens outside its own directory ([`Parent::sandbox_paths`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPath {
    /// The file or directory (a directory's whole tree).
    pub path: std::path::PathBuf,
    /// Whether it may be written (else only read).
    pub write: bool,
}

impl SandboxPath {
    /// `path`, readable and writable.
    pub fn read_write(path: impl Into<std::path::PathBuf>) -> SandboxPath {
        SandboxPath {
            path: path.into(),
            write: true,
        }
    }
}

/// What a device is made of, as `create` decided it: its type and the driver's own data
/// (a port count, a backing file, a size), serialisable so the device can be built later
/// or in another process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceDescription {
    /// The type's name within its parent (`2` of `mtty-2`).
    pub type_name: String,
    /// The driver's data, in the driver's format.
    pub data: serde_json::Value,
}

impl DeviceDescription {
    /// A description of type `type_name` with no data of the driver's.
    pub fn new(type_name: &str) -> DeviceDescription {
        DeviceDescription {
            type_name: type_name.to_owned(),
            data: serde_json::Value::Null,
        }
    }

    /// A description of type `type_name` carrying `data`.
    pub fn with<T: Serialize>(type_name: &str, data: &T) -> Result<DeviceDescription, Errno> {
        let data = serde_json::to_value(data).map_err(|e| {
            tracing::error!(error = %e, "a device description cannot be serialised");
            Errno::INVAL
        })?;
        Ok(DeviceDescription {
            type_name: type_name.to_owned(),
            data,
        })
    }

    /// The driver's data, read back (EINVAL, logged, if it is not what `T` expects).
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, Errno> {
        T::deserialize(&self.data).map_err(|e| {
            tracing::error!(error = %e, type_name = self.type_name, "a device description does not match its driver");
            Errno::INVAL
        })
    }
}

/// What `build` hands the core: the device's PCI layout and implementation, and its
/// vendor attributes.
pub struct MdevParts {
    /// The device's PCI layout.
    pub spec: PciDeviceSpec,
    /// The device.
    pub device: Box<dyn PciDevice>,
    /// Its vendor attributes, if the type declares any.
    pub attrs: Option<Box<dyn VendorAttrs>>,
}

impl std::fmt::Debug for MdevParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MdevParts")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// A parent device: one instance of a driver (`mtty0` of driver `mtty`) with its own pool of
/// resources.
///
/// # Threads and locks
///
/// `available`, `create`, `build` and `remove` are called by the core with its registry
/// lock held: creates and removes of every parent are serialised with each other and with
/// `available`, which is told what exists, so a parent keeps no count of its own and cannot
/// over-commit. Keep them short, and never call back into the core from them (the lock is
/// not reentrant). `show_attr`/`store_attr` run without the lock, on a management thread.
pub trait Parent: Send + Sync {
    /// The driver's name, the prefix of every type id (`mtty`).
    fn driver(&self) -> &str;
    /// The types offered; asked once, at registration (type directories never change).
    fn types(&self) -> Vec<TypeSpec>;
    /// How many more devices of type `type_name` can be created when the parent's existing
    /// devices are of the types named in `in_use` (one entry per device).
    fn available(&self, type_name: &str, in_use: &[&str]) -> u32;
    /// Takes what a new device of type `type_name` needs from the pool (the core has
    /// checked `available` first) and describes it. Whatever it allocates, `remove` gives
    /// back: the core calls `remove` if a later step of the creation fails. The default,
    /// for a parent with nothing to allocate, describes the device by its type alone.
    fn create(&self, _uuid: &MdevUuid, type_name: &str) -> Result<DeviceDescription, Errno> {
        Ok(DeviceDescription::new(type_name))
    }
    /// Builds the device `create` described, with its host side in `env` (the device's
    /// own directory for sockets, if it has one).
    fn build(
        &self,
        uuid: &MdevUuid,
        description: &DeviceDescription,
        env: &DeviceEnv,
    ) -> Result<MdevParts, Errno>;
    /// The device is gone (removed, after its client closed and its server stopped, or its
    /// creation failed after `create`): give back what `create` took.
    fn remove(&self, _uuid: &MdevUuid, _description: &DeviceDescription) {}
    /// What the device `description` names opens outside its own directory (a backing
    /// file, `/dev/ptmx`). With worker isolation its worker's sandbox lets it open these and
    /// nothing else; the default: nothing.
    fn sandbox_paths(&self, _description: &DeviceDescription) -> Vec<SandboxPath> {
        Vec::new()
    }
    /// Whether a device that a client holds can be taken away from it (surprise removal).
    /// When false, removing a held device fails with EBUSY once the client has been asked
    /// to release it and has not.
    fn hot_unplug(&self) -> bool {
        false
    }
    /// The parent's own attributes: files in its directory, beside `mdev_supported_types`.
    fn attrs(&self) -> Vec<AttrSpec> {
        Vec::new()
    }
    /// The text of parent attribute `name`.
    fn show_attr(&self, _name: &str) -> Result<String, Errno> {
        Err(Errno::NOENT)
    }
    /// Stores `value` into parent attribute `name`.
    fn store_attr(&self, _name: &str, _value: &str) -> Result<(), Errno> {
        Err(Errno::ACCESS)
    }
}
