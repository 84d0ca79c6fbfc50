//! What the plugin has handed out, kept in a file so that a restarted plugin offers the same
//! device IDs and loses no instance: for each allocated slot (a device ID), the mdevs it
//! created for it, and since when no pod has held it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One allocated slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The mdevs created for it: one, or a bundle's devices sharing an IOMMU group.
    pub uuids: Vec<String>,
    /// The type (`mnvme-1g`) and its parent.
    pub type_id: String,
    /// The parent.
    pub parent: String,
    /// Unix time in milliseconds since which no pod holds it (`None`: held, or not
    /// checked yet).
    #[serde(default)]
    pub unheld_since_ms: Option<u64>,
}

/// The file and its contents.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    /// Allocations by device ID.
    pub slots: BTreeMap<String, Allocation>,
}

impl Checkpoint {
    /// Loads `path` (empty if it does not exist yet).
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let slots = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not a checkpoint", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Checkpoint {
            path: path.to_owned(),
            slots,
        })
    }

    /// Writes the file (whole, then renamed over the old one).
    pub fn save(&self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.slots)?)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}
