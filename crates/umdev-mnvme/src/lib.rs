//! umdev-mnvme: mediated NVMe controllers carved from a storage pool, driven by a guest's
//! stock `nvme` driver, with all DMA through umdev's IOMMU layer.
//!
//! - [`parent`]: the pool, its types by size, backing files, identities; [`MnvmeDriver`] is
//!   what a daemon registers.
//! - `ctrl`: the controller's registers, queues, poller, completions and interrupts;
//!   `admin` and `io`: the commands; `mem`: guest memory (pinned rings, per-command data
//!   pins, DMA copies); `namespace`: the backing file; `state`: migration.
//! - [`device`]: the PCI function (class 01/08/02, BAR0, MSI-X per queue, INTx).
//! - [`regs`], [`identify`]: NVMe's numbers and the Identify data.
#![warn(missing_docs)]

mod admin;
mod ctrl;
pub mod device;
pub mod identify;
mod io;
mod mem;
mod namespace;
pub mod parent;
pub mod regs;
mod state;

pub use device::Mnvme;
pub use parent::MnvmeDriver;
