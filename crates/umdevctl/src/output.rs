//! mdevctl's output, byte for byte: its text layouts, and its JSON (pretty-printed with
//! keys in its order, and no trailing newline).

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use umdev_api::control::{DeviceEntry, TypeEntry};
use umdev_api::{Definition, Start};

/// A map that keeps its order.
struct Ordered<T>(Vec<(String, T)>);

impl<T: Serialize> Serialize for Ordered<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

#[derive(Serialize)]
struct TypeJson<'a> {
    available_instances: u32,
    device_api: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

/// Groups entries by parent, keeping order (they come sorted by parent).
fn by_parent<'a, T, U>(
    items: &'a [T],
    parent: impl Fn(&T) -> &str,
    f: impl Fn(&'a T) -> U,
) -> Vec<(String, Vec<U>)> {
    let mut out: Vec<(String, Vec<U>)> = Vec::new();
    for i in items {
        let p = parent(i);
        match out.last_mut() {
            Some((last, v)) if last == p => v.push(f(i)),
            _ => out.push((p.to_owned(), vec![f(i)])),
        }
    }
    out
}

fn pretty<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `types` as text.
pub fn types_text(types: &[TypeEntry]) -> String {
    let mut s = String::new();
    for (parent, ts) in by_parent(types, |t| &t.parent, |t| t) {
        s.push_str(&format!("{parent}\n"));
        for t in ts {
            s.push_str(&format!("  {}\n", t.id));
            s.push_str(&format!(
                "    Available instances: {}\n",
                t.available_instances
            ));
            s.push_str(&format!("    Device API: {}\n", t.device_api));
            if let Some(n) = nonempty(&t.name) {
                s.push_str(&format!("    Name: {n}\n"));
            }
            if let Some(d) = nonempty(&t.description) {
                s.push_str(&format!("    Description: {d}\n"));
            }
        }
    }
    s
}

/// `types --dumpjson`.
pub fn types_json(types: &[TypeEntry]) -> String {
    let parents = by_parent(
        types,
        |t| &t.parent,
        |t| {
            Ordered(vec![(
                t.id.clone(),
                TypeJson {
                    available_instances: t.available_instances,
                    device_api: &t.device_api,
                    name: nonempty(&t.name),
                    description: nonempty(&t.description),
                },
            )])
        },
    );
    if parents.is_empty() {
        return pretty(&Vec::<()>::new());
    }
    pretty(&vec![Ordered(parents)])
}

fn definition(d: &DeviceEntry) -> Definition {
    Definition {
        mdev_type: d.mdev_type.clone(),
        start: if d.auto { Start::Auto } else { Start::Manual },
        attrs: d.attrs.clone(),
    }
}

/// `list` as text.
pub fn list_text(devices: &[DeviceEntry], defined: bool, verbose: bool) -> String {
    let mut s = String::new();
    for d in devices {
        let start = if d.auto { "auto" } else { "manual" };
        s.push_str(&format!("{} {} {} {start}", d.uuid, d.parent, d.mdev_type));
        if defined && d.active {
            s.push_str(" (active)");
        } else if !defined && d.defined {
            s.push_str(" (defined)");
        }
        // mdevctl's layout, unless a device is not served (umdev's own: its worker died).
        if let Some(state) = d.state.as_deref().filter(|s| *s != "running") {
            s.push_str(&format!(" [{state}]"));
        }
        s.push('\n');
        if verbose && !d.attrs.is_empty() {
            s.push_str("  Attrs:\n");
            for (i, (k, v)) in d.attrs.iter().enumerate() {
                s.push_str(&format!("    @{{{i}}}: {{\"{k}\":\"{v}\"}}\n"));
            }
        }
    }
    s
}

/// `list --dumpjson`: the hierarchy, or for one device asked by UUID its definition alone.
pub fn list_json(devices: &[DeviceEntry], one_uuid: bool) -> String {
    if one_uuid && devices.len() <= 1 {
        return match devices.first() {
            Some(d) => pretty(&definition(d).ordered()),
            None => pretty(&Vec::<()>::new()),
        };
    }
    let defs: Vec<Definition> = devices.iter().map(definition).collect();
    let parents = by_parent(
        &devices.iter().zip(defs.iter()).collect::<Vec<_>>(),
        |(d, _)| &d.parent,
        |(d, def)| Ordered(vec![(d.uuid.clone(), def.ordered())]),
    );
    if parents.is_empty() {
        return pretty(&Vec::<()>::new());
    }
    pretty(&vec![Ordered(parents)])
}

/// `umdevctl drivers`: each driver, what it makes, and its options with kinds and defaults.
pub fn drivers_text(drivers: &[umdev_api::control::DriverEntry]) -> String {
    let mut s = String::new();
    for d in drivers {
        s.push_str(&format!("{}\n  {}\n", d.name, d.description));
        if d.options.is_empty() {
            s.push_str("  (no options)\n");
        }
        for o in &d.options {
            let default = o
                .default
                .as_deref()
                .map(|v| format!(", default {v}"))
                .unwrap_or_default();
            s.push_str(&format!(
                "  --opt {}=<{}{}>\n      {}\n",
                o.name, o.kind, default, o.help
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(parent: &str, id: &str) -> TypeEntry {
        TypeEntry {
            parent: parent.into(),
            id: id.into(),
            available_instances: 3,
            device_api: "vfio-pci".into(),
            name: Some("N".into()),
            description: None,
        }
    }

    #[test]
    fn types_are_grouped_by_parent() {
        let v = [t("a", "x-1"), t("a", "x-2"), t("b", "x-1")];
        let text = types_text(&v);
        assert!(text.starts_with(
            "a\n  x-1\n    Available instances: 3\n    Device API: vfio-pci\n    Name: N\n  x-2\n"
        ));
        let j = types_json(&v);
        assert!(j.starts_with("[\n  {\n    \"a\": [\n      {\n        \"x-1\": {\n          \"available_instances\": 3,\n          \"device_api\": \"vfio-pci\",\n          \"name\": \"N\"\n"));
        assert!(!j.ends_with('\n'));
        assert_eq!(types_json(&[]), "[]");
    }

    #[test]
    fn list_shows_defined_and_active_marks_and_attrs() {
        let d = DeviceEntry {
            uuid: "u".into(),
            parent: "p".into(),
            mdev_type: "t".into(),
            auto: true,
            active: true,
            defined: true,
            attrs: vec![("k".into(), "v".into())],
            socket: None,
            iommu_group: None,
            state: Some("running".into()),
        };
        assert_eq!(
            list_text(std::slice::from_ref(&d), false, false),
            "u p t auto (defined)\n"
        );
        let died = DeviceEntry {
            state: Some("worker-died".into()),
            ..d.clone()
        };
        assert_eq!(
            list_text(std::slice::from_ref(&died), false, false),
            "u p t auto (defined) [worker-died]\n"
        );
        assert_eq!(
            list_text(std::slice::from_ref(&d), true, true),
            "u p t auto (active)\n  Attrs:\n    @{0}: {\"k\":\"v\"}\n"
        );
        let one = list_json(std::slice::from_ref(&d), true);
        assert!(
            one.starts_with("{\n  \"mdev_type\": \"t\",\n  \"start\": \"auto\",\n  \"attrs\": [")
        );
    }
}
