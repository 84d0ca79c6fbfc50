//! What a parent driver implements: its types, how many of each are available given what
//! exists, and how to create a device.

use rustix::io::Errno;
use umdev_pci::{PciDevice, PciDeviceSpec};

use crate::MdevUuid;

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

/// A vendor attribute: a file in each device's directory. A name may hold one `/`
/// (`vendor/sample_mdev_dev`): the part before it is a subdirectory, as sysfs attribute
/// groups are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttrSpec {
    /// The file name, relative to the device's directory.
    pub name: String,
    /// Whether it can be written (mode 0644, else 0444).
    pub writable: bool,
}

/// A device's vendor attributes, read and written by name.
pub trait VendorAttrs: Send + Sync {
    /// The text of attribute `name` (a trailing newline is added if missing).
    fn show(&self, name: &str) -> Result<String, Errno>;
    /// Stores `value` (as written, newline included) into attribute `name`.
    fn store(&self, _name: &str, _value: &str) -> Result<(), Errno> {
        Err(Errno::ACCESS)
    }
}

/// What a parent hands the core for a new device: its PCI layout and implementation, and
/// its vendor attributes.
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
/// resources. The core serialises `available` and `create` calls for one parent, and tells
/// `available` what exists, so a parent keeps no count of its own and cannot over-commit.
pub trait Parent: Send + Sync {
    /// The driver's name, the prefix of every type id (`mtty`).
    fn driver(&self) -> &str;
    /// The types offered; asked once, at registration (type directories never change).
    fn types(&self) -> Vec<TypeSpec>;
    /// How many more devices of type `name` can be created when the parent's existing
    /// devices are of the types named in `in_use` (one entry per device).
    fn available(&self, name: &str, in_use: &[&str]) -> u32;
    /// Creates a device of type `name` (the core has checked `available` first).
    fn create(&self, uuid: &MdevUuid, name: &str) -> Result<MdevParts, Errno>;
    /// Whether a device that a client holds can be taken away from it (surprise removal).
    /// When false, removing a held device fails with EBUSY once the client has been asked
    /// to release it and has not.
    fn hot_unplug(&self) -> bool {
        false
    }
}
