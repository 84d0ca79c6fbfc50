//! mbochs as a parent driver: a VRAM pool (`pool_mib`, the kernel sample's 256 MiB by
//! default) carved into displays of the sizes in `sizes_mib` (4, 16 and 64 MiB by default),
//! one type per size (`mbochs-4m`, ...). `available_instances` of each type is what the pool
//! has left divided by its size. A display's VRAM is allocated when it is built (a memfd)
//! and goes back to the pool when it is removed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use umdev_core::{
    AttrSpec, DeviceDescription, DeviceEnv, DriverError, Errno, MdevParts, MdevUuid, OptionSpec,
    Options, Parent, ParentContext, ParentDriver, TypeSpec, VendorAttrs,
};

use crate::device::{Mbochs, Shared};
use crate::vram::Vram;

const MIB: u64 = 1 << 20;

/// The driver entry: `driver = "mbochs"`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MbochsDriver;

/// The sizes list: MiB, each a power of two from 1 to 1024, ascending, no repeats.
fn parse_sizes(text: &str) -> Result<Vec<u64>, String> {
    let mut sizes = Vec::new();
    for part in text.split(',').map(str::trim) {
        let n: u64 = part
            .parse()
            .map_err(|_| format!("sizes_mib: {part:?} is not a number of MiB"))?;
        if !n.is_power_of_two() || n > 1024 {
            return Err(format!(
                "sizes_mib: {n} MiB is not a power of two from 1 to 1024"
            ));
        }
        if sizes.last().is_some_and(|&l| l >= n) {
            return Err("sizes_mib: sizes must ascend".into());
        }
        sizes.push(n);
    }
    Ok(sizes)
}

impl ParentDriver for MbochsDriver {
    fn name(&self) -> &str {
        "mbochs"
    }

    fn description(&self) -> &str {
        "mediated Bochs displays for the guest's bochs DRM driver, VRAM from a shared pool"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![
            OptionSpec::integer("pool_mib", 1, 1 << 20, 256, "the VRAM pool in MiB"),
            OptionSpec::text(
                "sizes_mib",
                Some("4,16,64"),
                "the displays' VRAM sizes in MiB, one type each (powers of two, ascending)",
            ),
        ]
    }

    fn build(&self, _: &ParentContext, o: &Options) -> Result<Arc<dyn Parent>, DriverError> {
        let pool = o
            .integer("pool_mib")
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(256)
            * MIB;
        let sizes =
            parse_sizes(o.text("sizes_mib").unwrap_or("4,16,64")).map_err(DriverError::Failed)?;
        Ok(Arc::new(MbochsParent { pool, sizes }))
    }
}

/// A VRAM pool.
#[derive(Debug)]
pub struct MbochsParent {
    pool: u64,
    /// Display sizes in MiB.
    sizes: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
struct Described {
    vram: u64,
}

impl MbochsParent {
    /// The VRAM of type `name` (`16m`).
    fn size_of(&self, name: &str) -> Option<u64> {
        let n: u64 = name.strip_suffix('m')?.parse().ok()?;
        self.sizes.contains(&n).then_some(n * MIB)
    }
}

/// The vendor attribute with the VRAM size in bytes.
pub const ATTR_VRAM: &str = "vendor/vram";
/// The vendor attribute with the current mode (`1024x768x32+0+100`, or `off`).
pub const ATTR_MODE: &str = "vendor/mode";

struct Attrs(Arc<Shared>);

impl VendorAttrs for Attrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            ATTR_VRAM => Ok(format!("{}\n", self.0.vram.size())),
            ATTR_MODE => Ok(match self.0.state().mode {
                Some(m) => format!(
                    "{}x{}x{}+{}+{}\n",
                    m.xres, m.yres, m.bpp, m.x_offset, m.y_offset
                ),
                None => "off\n".into(),
            }),
            _ => Err(Errno::NOENT),
        }
    }

    fn store(&self, _: &str, _: &str) -> Result<(), Errno> {
        Err(Errno::ACCESS)
    }
}

impl Parent for MbochsParent {
    fn driver(&self) -> &str {
        "mbochs"
    }

    fn types(&self) -> Vec<TypeSpec> {
        self.sizes
            .iter()
            .map(|n| TypeSpec {
                pretty_name: Some(format!("Bochs display, {n} MiB VRAM")),
                description: Some(format!(
                    "a Bochs VBE display (PCI 1234:1111) with {n} MiB of VRAM"
                )),
                attrs: vec![
                    AttrSpec::read_only(ATTR_VRAM),
                    AttrSpec::read_only(ATTR_MODE),
                ],
                ..TypeSpec::new(&format!("{n}m"))
            })
            .collect()
    }

    fn available(&self, name: &str, in_use: &[&str]) -> u32 {
        let used: u64 = in_use
            .iter()
            .map(|t| self.size_of(t).unwrap_or(0))
            .fold(0, u64::saturating_add);
        let Some(size) = self.size_of(name) else {
            return 0;
        };
        u32::try_from(self.pool.saturating_sub(used) / size).unwrap_or(u32::MAX)
    }

    fn create(&self, _: &MdevUuid, name: &str) -> Result<DeviceDescription, Errno> {
        let vram = self.size_of(name).ok_or(Errno::INVAL)?;
        DeviceDescription::with(name, &Described { vram })
    }

    fn build(
        &self,
        uuid: &MdevUuid,
        d: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        let desc: Described = d.data()?;
        let vram = Vram::new(desc.vram)
            .inspect_err(|e| tracing::warn!(error = %e, "mbochs: cannot allocate VRAM"))?;
        let spec = crate::device::spec(&vram).map_err(|e| {
            tracing::error!(error = %e, "mbochs: bad PCI layout");
            Errno::INVAL
        })?;
        let b = uuid.as_bytes();
        let serial = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let device = Mbochs::new(vram, serial);
        let shared = device.shared.clone();
        Ok(MdevParts {
            spec,
            device: Box::new(device),
            attrs: Some(Box::new(Attrs(shared))),
        })
    }

    fn attrs(&self) -> Vec<AttrSpec> {
        vec![AttrSpec::read_only("vendor/pool")]
    }

    fn show_attr(&self, name: &str) -> Result<String, Errno> {
        match name {
            "vendor/pool" => Ok(format!("{}\n", self.pool)),
            _ => Err(Errno::NOENT),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        assert_eq!(parse_sizes("4, 16,64"), Ok(vec![4, 16, 64]));
        assert!(parse_sizes("3").is_err());
        assert!(parse_sizes("16,4").is_err());
        assert!(parse_sizes("4,x").is_err());
        assert!(parse_sizes("2048").is_err());
    }

    #[test]
    fn the_pool_is_shared_by_every_type() {
        let p = MbochsParent {
            pool: 256 * MIB,
            sizes: vec![4, 16, 64],
        };
        assert_eq!(p.available("64m", &[]), 4);
        assert_eq!(p.available("4m", &["64m", "64m", "64m"]), 16);
        assert_eq!(p.available("64m", &["64m", "64m", "64m", "16m"]), 0);
        assert_eq!(p.available("8m", &[]), 0);
    }
}
