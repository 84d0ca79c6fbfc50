//! umdev-mbochs: mediated displays, each a Bochs VBE adapter with its own VRAM taken from a
//! shared pool, which a guest's stock `bochs` DRM driver binds; screenshots through the
//! framework's display-plane query (`umdevctl screenshot`).
//!
//! - [`parent`]: the pool, types by VRAM size, [`MbochsDriver`] (what a daemon registers).
//! - [`device`]: the PCI function: BAR0 VRAM (mapped by the client), BAR2 the registers;
//!   the display plane; migration (registers in the state, VRAM in chunks, compared per
//!   pass); a fresh VRAM memory object for each client.
//! - [`regs`]: the register map, mode checking, the EDID block. `vram`: the memfd.
#![warn(missing_docs)]

pub mod device;
pub mod parent;
pub mod regs;
mod vram;

pub use device::Mbochs;
pub use parent::MbochsDriver;
