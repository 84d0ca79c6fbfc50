//! VERSION negotiation: the JSON capabilities and how two sides agree on them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ProtoError;

/// The protocol major version this crate speaks.
pub const MAJOR: u16 = 0;
/// The highest minor version this crate speaks (QEMU 11 proposes 0, rust-vmm's client 1).
pub const MAX_MINOR: u16 = 1;
/// Default `max_msg_fds` when a side does not say (spec).
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `max_data_xfer_size` when a side does not say (spec).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Default `max_dma_maps` when a side does not say (spec).
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65_535;
/// Default `pgsizes`: 4 KiB pages only (spec).
pub const DEFAULT_PGSIZES: u64 = 4096;
/// Largest `max_msg_fds` accepted from a peer.
pub const MAX_MAX_MSG_FDS: u32 = 1024;

/// Migration parameters of the legacy `migration` capability.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCaps {
    /// Page size of dirty bitmaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsize: Option<u64>,
    /// Largest dirty bitmap one message may carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bitmap_size: Option<u64>,
}

/// The capabilities one side announces, every field optional as in the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message.
    pub max_msg_fds: Option<u32>,
    /// Largest `count` of a data transfer the sender accepts.
    pub max_data_xfer_size: Option<u32>,
    /// Most DMA mappings valid at once.
    pub max_dma_maps: Option<u32>,
    /// Page sizes supported for DMA, or'ed.
    pub pgsizes: Option<u64>,
    /// Legacy migration parameters.
    pub migration: Option<MigrationCaps>,
    /// Support for REGION_WRITE_MULTI.
    pub write_multiple: Option<bool>,
    /// Twin-socket parameters (we never enable twin-socket mode; kept to answer correctly).
    pub twin_socket: Option<Value>,
}

fn opt_u32(map: &Map<String, Value>, key: &'static str) -> Result<Option<u32>, ProtoError> {
    match map.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or(ProtoError::BadCapability { key }),
    }
}

impl Capabilities {
    /// Parses the optional NUL-terminated JSON that follows the VERSION struct.
    ///
    /// An empty tail means "no capabilities". Unknown keys are ignored, as a newer peer may
    /// announce more than we know; known keys of the wrong type are refused.
    pub fn parse(tail: &[u8]) -> Result<Capabilities, ProtoError> {
        if tail.is_empty() {
            return Ok(Capabilities::default());
        }
        let nul = tail
            .iter()
            .position(|b| *b == 0)
            .ok_or(ProtoError::BadVersionData(
                "capabilities are not NUL-terminated",
            ))?;
        let text = core::str::from_utf8(&tail[..nul])
            .map_err(|_| ProtoError::BadVersionData("capabilities are not UTF-8"))?;
        if text.trim().is_empty() {
            return Ok(Capabilities::default());
        }
        let root: Value = serde_json::from_str(text)
            .map_err(|_| ProtoError::BadVersionData("capabilities are not JSON"))?;
        let root = root.as_object().ok_or(ProtoError::BadVersionData(
            "version data is not a JSON object",
        ))?;
        let caps = match root.get("capabilities") {
            None => return Ok(Capabilities::default()),
            Some(Value::Object(m)) => m,
            Some(_) => {
                return Err(ProtoError::BadCapability {
                    key: "capabilities",
                })
            }
        };
        let pgsizes = match caps.get("pgsizes") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .ok_or(ProtoError::BadCapability { key: "pgsizes" })?,
            ),
        };
        let migration = match caps.get("migration") {
            None => None,
            Some(v) => Some(
                serde_json::from_value::<MigrationCaps>(v.clone())
                    .map_err(|_| ProtoError::BadCapability { key: "migration" })?,
            ),
        };
        let write_multiple = match caps.get("write_multiple") {
            None => None,
            Some(v) => Some(v.as_bool().ok_or(ProtoError::BadCapability {
                key: "write_multiple",
            })?),
        };
        let twin_socket = match caps.get("twin_socket") {
            None => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(_) => return Err(ProtoError::BadCapability { key: "twin_socket" }),
        };
        let max_msg_fds = opt_u32(caps, "max_msg_fds")?;
        if max_msg_fds.is_some_and(|n| n > MAX_MAX_MSG_FDS) {
            return Err(ProtoError::BadCapability { key: "max_msg_fds" });
        }
        Ok(Capabilities {
            max_msg_fds,
            max_data_xfer_size: opt_u32(caps, "max_data_xfer_size")?,
            max_dma_maps: opt_u32(caps, "max_dma_maps")?,
            pgsizes,
            migration,
            write_multiple,
            twin_socket,
        })
    }

    /// The JSON text, NUL-terminated, ready to follow the VERSION struct.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut caps = Map::new();
        if let Some(n) = self.max_msg_fds {
            caps.insert("max_msg_fds".into(), n.into());
        }
        if let Some(n) = self.max_data_xfer_size {
            caps.insert("max_data_xfer_size".into(), n.into());
        }
        if let Some(n) = self.max_dma_maps {
            caps.insert("max_dma_maps".into(), n.into());
        }
        if let Some(n) = self.pgsizes {
            caps.insert("pgsizes".into(), n.into());
        }
        if let Some(m) = &self.migration {
            caps.insert(
                "migration".into(),
                serde_json::to_value(m).unwrap_or(Value::Null),
            );
        }
        if let Some(b) = self.write_multiple {
            caps.insert("write_multiple".into(), b.into());
        }
        if let Some(t) = &self.twin_socket {
            caps.insert("twin_socket".into(), t.clone());
        }
        let mut root = Map::new();
        root.insert("capabilities".into(), Value::Object(caps));
        let mut text = Value::Object(root).to_string().into_bytes();
        text.push(0);
        text
    }

    /// `max_msg_fds` with the spec's default applied.
    pub fn max_msg_fds_or_default(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }

    /// `max_data_xfer_size` with the spec's default applied.
    pub fn max_data_xfer_size_or_default(&self) -> u32 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }

    /// `max_dma_maps` with the spec's default applied.
    pub fn max_dma_maps_or_default(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_11: &str = r#"{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true}}"#;

    fn wire(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn parses_what_qemu_11_sends() {
        let c = Capabilities::parse(&wire(QEMU_11)).unwrap();
        assert_eq!(c.max_msg_fds, Some(16));
        assert_eq!(c.max_data_xfer_size, Some(1 << 20));
        assert_eq!(c.max_dma_maps, Some(65535));
        assert_eq!(c.pgsizes, Some(4096));
        assert_eq!(c.write_multiple, Some(true));
        assert_eq!(c.migration.unwrap().max_bitmap_size, Some(256 << 20));
    }

    #[test]
    fn floats_passed_on_round_trip_exactly() {
        // Found by the codec fuzz target: without exact float parsing the last digit moved.
        let c = Capabilities::parse(&wire(
            r#"{"capabilities":{"twin_socket":{"supp2":-3.3333333333333334e48}}}"#,
        ))
        .unwrap();
        assert_eq!(Capabilities::parse(&c.to_wire()).unwrap(), c);
    }

    #[test]
    fn empty_version_data_means_defaults() {
        let c = Capabilities::parse(&[]).unwrap();
        assert_eq!(c, Capabilities::default());
        assert_eq!(c.max_msg_fds_or_default(), 1);
        assert_eq!(c.max_data_xfer_size_or_default(), 1 << 20);
    }

    #[test]
    fn missing_nul_is_refused() {
        assert!(Capabilities::parse(b"{}").is_err());
    }

    #[test]
    fn wrong_types_are_refused() {
        for bad in [
            r#"{"capabilities":{"max_msg_fds":"many"}}"#,
            r#"{"capabilities":{"max_msg_fds":-1}}"#,
            r#"{"capabilities":{"max_msg_fds":100000}}"#,
            r#"{"capabilities":{"write_multiple":1}}"#,
            r#"{"capabilities":7}"#,
            r#"[1,2]"#,
            r#"{"capabilities":{"#,
        ] {
            assert!(Capabilities::parse(&wire(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let c = Capabilities::parse(&wire(r#"{"capabilities":{"shiny":true},"extra":1}"#));
        assert_eq!(c.unwrap(), Capabilities::default());
    }

    #[test]
    fn to_wire_round_trips() {
        let c = Capabilities::parse(&wire(QEMU_11)).unwrap();
        assert_eq!(Capabilities::parse(&c.to_wire()).unwrap(), c);
    }
}
