//! mdevctl's persistent definitions: one JSON file per device at
//! `<root>/etc/mdevctl.d/<parent>/<uuid>`, holding
//! `{"mdev_type": T, "start": "auto"|"manual", "attrs": [{"name": "value"}, ...]}`.
//! Attributes are written in order after the device is created.

use std::path::{Path, PathBuf};

use serde::ser::SerializeMap;
use serde::Serialize;
use serde_json::Value;

/// A definition serialised with mdevctl's key order (structs keep field order).
#[derive(Debug, Serialize)]
pub struct OrderedDefinition<'a> {
    mdev_type: &'a str,
    start: &'static str,
    attrs: Vec<OneAttr<'a>>,
}

/// One attribute as a one-entry object.
#[derive(Debug)]
pub struct OneAttr<'a>(&'a str, &'a str);

impl Serialize for OneAttr<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, self.1)?;
        m.end()
    }
}

/// When a defined device is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// When its parent appears.
    Auto,
    /// Only on request.
    Manual,
}

impl Start {
    /// `"auto"` or `"manual"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Start::Auto => "auto",
            Start::Manual => "manual",
        }
    }
}

/// A device's configuration in mdevctl's format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Definition {
    /// The type id (`mtty-2`).
    pub mdev_type: String,
    /// When it starts.
    pub start: Start,
    /// Attributes, written in this order after creation.
    pub attrs: Vec<(String, String)>,
}

/// Why a definition was refused.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    /// Not the format mdevctl reads.
    #[error("invalid device definition: {0}")]
    Format(String),
    /// The file could not be read or written.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Definition {
    /// Reads mdevctl's JSON: `mdev_type` and `start` are required (any `start` other than
    /// `"auto"` means manual, as mdevctl reads it); `attrs` is an optional array of
    /// one-entry objects with string values.
    pub fn from_json(v: &Value) -> Result<Definition, DefinitionError> {
        let bad = |m: &str| DefinitionError::Format(m.to_owned());
        let mdev_type = v
            .get("mdev_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no mdev_type"))?
            .to_owned();
        let start = match v.get("start") {
            None | Some(Value::Null) => return Err(bad("no start")),
            Some(s) if s.as_str() == Some("auto") => Start::Auto,
            Some(_) => Start::Manual,
        };
        let mut attrs = Vec::new();
        match v.get("attrs") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) => {
                for item in a {
                    let o = item
                        .as_object()
                        .ok_or_else(|| bad("an attribute is not an object"))?;
                    if o.len() != 1 {
                        return Err(bad("an attribute object has more than one field"));
                    }
                    for (k, v) in o {
                        let v = v
                            .as_str()
                            .ok_or_else(|| bad("an attribute value is not a string"))?;
                        attrs.push((k.clone(), v.to_owned()));
                    }
                }
            }
            Some(_) => return Err(bad("attrs is not an array")),
        }
        Ok(Definition {
            mdev_type,
            start,
            attrs,
        })
    }

    /// The JSON value (as a map: for the text mdevctl writes, with its key order, use
    /// [`to_text`](Self::to_text)).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.ordered()).unwrap_or(Value::Null)
    }

    /// The fields in mdevctl's order: `mdev_type`, `start`, `attrs`.
    pub fn ordered(&self) -> OrderedDefinition<'_> {
        OrderedDefinition {
            mdev_type: &self.mdev_type,
            start: self.start.as_str(),
            attrs: self.attrs.iter().map(|(k, v)| OneAttr(k, v)).collect(),
        }
    }

    /// Parses a definition file's text.
    pub fn parse(text: &str) -> Result<Definition, DefinitionError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| DefinitionError::Format(e.to_string()))?;
        Definition::from_json(&v)
    }

    /// The file's text, pretty-printed as mdevctl writes it.
    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(&self.ordered()).unwrap_or_default()
    }
}

/// The definitions under `<root>/etc/mdevctl.d`.
#[derive(Clone, Debug)]
pub struct DefinitionStore {
    base: PathBuf,
}

impl DefinitionStore {
    /// The store of an mdevctl root (`<root>/etc/mdevctl.d`).
    pub fn new(root: &Path) -> DefinitionStore {
        DefinitionStore {
            base: root.join("etc/mdevctl.d"),
        }
    }

    /// `<base>/<parent>/<uuid>`.
    pub fn path(&self, parent: &str, uuid: &str) -> PathBuf {
        self.base.join(parent).join(uuid)
    }

    /// Every definition as `(parent, uuid, definition)`, sorted by parent then UUID; files
    /// that do not parse are skipped with their error.
    pub fn list(&self) -> Vec<(String, String, Result<Definition, DefinitionError>)> {
        let mut out = Vec::new();
        let Ok(parents) = std::fs::read_dir(&self.base) else {
            return out;
        };
        for p in parents.flatten() {
            let Ok(name) = p.file_name().into_string() else {
                continue;
            };
            // mdevctl keeps its callout scripts in `scripts.d` here.
            if name == "scripts.d" || !p.path().is_dir() {
                continue;
            }
            out.extend(
                self.list_parent(&name)
                    .into_iter()
                    .map(|(u, d)| (name.clone(), u, d)),
            );
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The definitions of one parent, sorted by UUID.
    pub fn list_parent(&self, parent: &str) -> Vec<(String, Result<Definition, DefinitionError>)> {
        let mut out = Vec::new();
        let Ok(files) = std::fs::read_dir(self.base.join(parent)) else {
            return out;
        };
        for f in files.flatten() {
            let Ok(uuid) = f.file_name().into_string() else {
                continue;
            };
            out.push((uuid.clone(), self.load(parent, &uuid)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Reads one definition.
    pub fn load(&self, parent: &str, uuid: &str) -> Result<Definition, DefinitionError> {
        let path = self.path(parent, uuid);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| DefinitionError::Io { path, source })?;
        Definition::parse(&text)
    }

    /// Writes one definition (creating the parent's directory).
    pub fn save(&self, parent: &str, uuid: &str, d: &Definition) -> Result<(), DefinitionError> {
        let path = self.path(parent, uuid);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DefinitionError::Io { path, source }
        };
        let dir = self.base.join(parent);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        std::fs::write(&path, d.to_text()).map_err(io(&path))
    }

    /// Removes one definition.
    pub fn remove(&self, parent: &str, uuid: &str) -> Result<(), DefinitionError> {
        let path = self.path(parent, uuid);
        std::fs::remove_file(&path).map_err(|source| DefinitionError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdevctl_json_round_trips_in_order() {
        let text = r#"{"mdev_type":"mtty-2","start":"auto","attrs":[{"b":"1"},{"a":"2"}]}"#;
        let d = Definition::parse(text).unwrap();
        assert_eq!(d.start, Start::Auto);
        assert_eq!(
            d.attrs,
            vec![("b".into(), "1".into()), ("a".into(), "2".into())]
        );
        assert_eq!(Definition::parse(&d.to_text()).unwrap(), d);
        assert!(d.to_text().starts_with(
            "{\n  \"mdev_type\": \"mtty-2\",\n  \"start\": \"auto\",\n  \"attrs\": ["
        ));
    }

    #[test]
    fn missing_fields_and_bad_attrs_are_refused() {
        assert!(Definition::parse(r#"{"start":"auto"}"#).is_err());
        assert!(Definition::parse(r#"{"mdev_type":"x"}"#).is_err());
        assert!(
            Definition::parse(r#"{"mdev_type":"x","start":"auto","attrs":[{"a":1}]}"#).is_err()
        );
        assert!(Definition::parse(
            r#"{"mdev_type":"x","start":"auto","attrs":[{"a":"1","b":"2"}]}"#
        )
        .is_err());
        let d = Definition::parse(r#"{"mdev_type":"x","start":"whenever"}"#).unwrap();
        assert_eq!(d.start, Start::Manual);
    }

    #[test]
    fn the_store_lists_saves_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let s = DefinitionStore::new(dir.path());
        let d = Definition {
            mdev_type: "mtty-1".into(),
            start: Start::Manual,
            attrs: vec![],
        };
        s.save("mtty0", "u2", &d).unwrap();
        s.save("mtty0", "u1", &d).unwrap();
        std::fs::create_dir_all(dir.path().join("etc/mdevctl.d/scripts.d/callouts")).unwrap();
        let l = s.list();
        let names: Vec<_> = l.iter().map(|x| (x.0.as_str(), x.1.as_str())).collect();
        assert_eq!(names, [("mtty0", "u1"), ("mtty0", "u2")]);
        s.remove("mtty0", "u1").unwrap();
        assert_eq!(s.list_parent("mtty0").len(), 1);
    }
}
