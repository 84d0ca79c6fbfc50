//! umdev-core: the mediated-device core, in userspace.
//!
//! Parent drivers implement [`Parent`]: their types (`<driver>-<name>` ids), how many of
//! each can still be created given what exists, `create`, which takes the resources and
//! describes the device, `build`, which turns the description into a PCI device for the
//! framework to serve, and `remove`. A [`ParentDriver`] builds parents from typed options.
//! The [`Core`] keeps the registry:
//!
//! - parents register and unregister at run time; unregistering removes their devices
//!   (refused while a client holds one, unless forced);
//! - devices are created by UUID, unique across every parent, and removed; a device a
//!   client holds is first asked back through the REQ interrupt;
//! - each device sits in an IOMMU group of its own, unless its type shares peer-to-peer
//!   resources ([`TypeSpec::peer_to_peer`]): then devices with equal
//!   `peer_to_peer_resource_uuid` share a group;
//! - a group belongs to one client at a time: the device's `open` is refused for any other
//!   client while one holds any device of the group.
//!
//! The core hands each new device to a [`Serve`] (the daemon puts it on a vfio-user socket
//! in a directory of its own, [`DeviceEnv`]), with an open guard that the framework runs
//! around the device's `open` and `close` to enforce the group rules: the device's hooks
//! all reach it directly. The management ABI (the sysfs tree over FUSE) and the control API
//! sit on top of this crate.
//!
//! ```
//! use std::sync::Arc;
//! use umdev_core::{
//!     Core, CoreConfig, DeviceDescription, DeviceEnv, Errno, MdevParts, MdevUuid, Parent,
//!     Serve, Served, TypeSpec,
//! };
//! use umdev_pci::{BarIndex, BarKind, PciDevice, PciDeviceSpec, PciFunction};
//!
//! struct Nothing;
//! impl PciDevice for Nothing {
//!     fn bar_read(&mut self, _: BarIndex, _: u64, _: &mut [u8]) -> Result<(), Errno> { Ok(()) }
//!     fn bar_write(&mut self, _: BarIndex, _: u64, _: &[u8]) -> Result<(), Errno> { Ok(()) }
//! }
//!
//! /// Four devices per parent, whatever the type.
//! struct Four;
//! impl Parent for Four {
//!     fn driver(&self) -> &str { "four" }
//!     fn types(&self) -> Vec<TypeSpec> { vec![TypeSpec::new("a")] }
//!     fn available(&self, _: &str, in_use: &[&str]) -> u32 { 4 - in_use.len() as u32 }
//!     fn build(&self, _: &MdevUuid, _: &DeviceDescription, _: &DeviceEnv) -> Result<MdevParts, Errno> {
//!         let spec = PciDeviceSpec::builder(0x1b36, 0x0005)
//!             .bar(0, BarKind::Mem32 { prefetchable: false }, 16)
//!             .build()
//!             .map_err(|_| Errno::INVAL)?;
//!         Ok(MdevParts { spec, device: Box::new(Nothing), attrs: None })
//!     }
//! }
//!
//! /// Keeps devices unserved (the daemon's Serve puts them on sockets).
//! struct Keep;
//! struct Kept(#[allow(dead_code)] std::sync::Mutex<PciFunction>);
//! impl Served for Kept { fn stop(&self) {} }
//! impl Serve for Keep {
//!     fn start(&self, _: &DeviceEnv, f: PciFunction) -> std::io::Result<Box<dyn Served>> {
//!         Ok(Box::new(Kept(std::sync::Mutex::new(f))))
//!     }
//! }
//!
//! let core = Core::new(CoreConfig::default(), Arc::new(Keep));
//! core.register_parent("four0", Arc::new(Four))?;
//! let uuid = MdevUuid::parse("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")?;
//! core.create("four0", "four-a", uuid)?;
//! assert_eq!(core.type_info("four0", "four-a")?.available_instances, 3);
//! assert_eq!(core.create("four0", "four-a", uuid).unwrap_err().errno(), Errno::EXIST);
//! core.remove(&uuid)?;
//! assert_eq!(core.type_info("four0", "four-a")?.available_instances, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod driver;
mod env;
mod error;
mod parent;
mod registry;
mod uuid;

pub use driver::{
    DriverError, Drivers, OptionKind, OptionSpec, OptionValue, Options, ParentContext, ParentDriver,
};
pub use env::{DeviceEnv, VFIO_USER_SOCKET};
pub use error::CoreError;
pub use parent::{
    AttrSpec, DeviceDescription, MdevParts, Parent, SandboxPath, TypeSpec, VendorAttrs,
    DEVICE_API_VFIO_PCI,
};
pub use registry::{
    Adoptee, Core, CoreConfig, Described, GroupInfo, MdevInfo, Remote, Serve, Served, ServedState,
    TypeInfo, P2P_ATTR,
};
/// The errno every author-facing hook returns (re-exported from `umdev_pci`).
pub use umdev_pci::Errno;
pub use uuid::{MdevUuid, UuidParseError, UUID_STRING_LEN};

#[cfg(test)]
mod tests;
