//! Parent drivers as plug-ins: a [`ParentDriver`] names itself, declares its options with
//! their kinds and defaults, and builds a [`Parent`] from validated [`Options`]. The daemon
//! keeps them in [`Drivers`]; its config file, its control API and `umdevctl` carry a
//! parent's options as an opaque table that is checked here against the driver's
//! declaration, so none of them names a driver.
//!
//! ```
//! use std::sync::Arc;
//! use umdev_core::{Drivers, OptionKind, OptionSpec, Options, Parent, ParentContext, ParentDriver, DriverError};
//!
//! struct Pool;
//! impl ParentDriver for Pool {
//!     fn name(&self) -> &str { "pool" }
//!     fn description(&self) -> &str { "a pool of nothing" }
//!     fn options(&self) -> Vec<OptionSpec> {
//!         vec![OptionSpec::integer("size", 1, 64, 8, "devices in the pool")]
//!     }
//!     fn build(&self, _: &ParentContext, o: &Options) -> Result<Arc<dyn Parent>, DriverError> {
//!         let _size = o.integer("size");
//!         Err(DriverError::Failed("just a doctest".into()))
//!     }
//! }
//!
//! let mut drivers = Drivers::default();
//! drivers.add(Pool);
//! let bad = serde_json::json!({"sise": 4});
//! let e = drivers.options("pool", bad.as_object().unwrap()).unwrap_err();
//! assert_eq!(e.to_string(), "driver pool has no option sise (its options: size)");
//! let good = serde_json::json!({"size": "16"});
//! assert_eq!(drivers.options("pool", good.as_object().unwrap())?.integer("size"), Some(16));
//! # Ok::<(), DriverError>(())
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::Parent;

/// The kind of value an option takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionKind {
    /// `true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0` as text).
    Bool,
    /// A whole number within `min..=max`.
    Integer {
        /// Smallest value allowed.
        min: i64,
        /// Largest value allowed.
        max: i64,
    },
    /// Free text.
    Text,
    /// A filesystem path (text; relative paths are taken as given).
    Path,
    /// One of a fixed set of words.
    Choice(Vec<String>),
}

impl std::fmt::Display for OptionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionKind::Bool => f.write_str("bool"),
            OptionKind::Integer { min, max } => write!(f, "integer {min}..={max}"),
            OptionKind::Text => f.write_str("text"),
            OptionKind::Path => f.write_str("path"),
            OptionKind::Choice(c) => write!(f, "one of {}", c.join("|")),
        }
    }
}

/// A validated option value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionValue {
    /// A [`OptionKind::Bool`].
    Bool(bool),
    /// A [`OptionKind::Integer`].
    Integer(i64),
    /// A [`OptionKind::Text`], [`OptionKind::Path`] or [`OptionKind::Choice`].
    Text(String),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Bool(b) => write!(f, "{b}"),
            OptionValue::Integer(i) => write!(f, "{i}"),
            OptionValue::Text(t) => f.write_str(t),
        }
    }
}

/// One option a driver takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// Its key (`ports`).
    pub name: String,
    /// What values it takes.
    pub kind: OptionKind,
    /// Its value when not given; `None` means it is optional without a default.
    pub default: Option<OptionValue>,
    /// One line on what it does.
    pub help: String,
}

impl OptionSpec {
    /// A bool option.
    pub fn bool(name: &str, default: bool, help: &str) -> OptionSpec {
        OptionSpec {
            name: name.to_owned(),
            kind: OptionKind::Bool,
            default: Some(OptionValue::Bool(default)),
            help: help.to_owned(),
        }
    }

    /// An integer option within `min..=max`.
    pub fn integer(name: &str, min: i64, max: i64, default: i64, help: &str) -> OptionSpec {
        OptionSpec {
            name: name.to_owned(),
            kind: OptionKind::Integer { min, max },
            default: Some(OptionValue::Integer(default)),
            help: help.to_owned(),
        }
    }

    /// A text option, optional unless `default` is given.
    pub fn text(name: &str, default: Option<&str>, help: &str) -> OptionSpec {
        OptionSpec {
            name: name.to_owned(),
            kind: OptionKind::Text,
            default: default.map(|d| OptionValue::Text(d.to_owned())),
            help: help.to_owned(),
        }
    }

    /// A path option, optional unless `default` is given.
    pub fn path(name: &str, default: Option<&str>, help: &str) -> OptionSpec {
        OptionSpec {
            kind: OptionKind::Path,
            ..OptionSpec::text(name, default, help)
        }
    }

    /// A choice among `choices`, `default` first if not given.
    pub fn choice(name: &str, choices: &[&str], default: &str, help: &str) -> OptionSpec {
        OptionSpec {
            name: name.to_owned(),
            kind: OptionKind::Choice(choices.iter().map(|c| (*c).to_owned()).collect()),
            default: Some(OptionValue::Text(default.to_owned())),
            help: help.to_owned(),
        }
    }

    /// Checks one given value against the kind. Text is taken for any kind and parsed (a
    /// command line gives text); a JSON/TOML value of the wrong type is refused.
    fn check(&self, v: &Value) -> Result<OptionValue, String> {
        let text = v.as_str();
        match &self.kind {
            OptionKind::Bool => match (v, text) {
                (Value::Bool(b), _) => Ok(OptionValue::Bool(*b)),
                (_, Some("true" | "yes" | "on" | "1")) => Ok(OptionValue::Bool(true)),
                (_, Some("false" | "no" | "off" | "0")) => Ok(OptionValue::Bool(false)),
                _ => Err(format!("expected a bool, got {v}")),
            },
            OptionKind::Integer { min, max } => {
                let n = match (v, text) {
                    (Value::Number(n), _) => n.as_i64(),
                    (_, Some(t)) => t.trim().parse::<i64>().ok(),
                    _ => None,
                }
                .ok_or_else(|| format!("expected an integer, got {v}"))?;
                if n < *min || n > *max {
                    return Err(format!("{n} is outside {min}..={max}"));
                }
                Ok(OptionValue::Integer(n))
            }
            OptionKind::Text | OptionKind::Path => text
                .map(|t| OptionValue::Text(t.to_owned()))
                .ok_or_else(|| format!("expected text, got {v}")),
            OptionKind::Choice(choices) => match text {
                Some(t) if choices.iter().any(|c| c == t) => Ok(OptionValue::Text(t.to_owned())),
                _ => Err(format!("expected one of {}, got {v}", choices.join("|"))),
            },
        }
    }
}

/// A driver's options, checked against its declaration, defaults filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    values: BTreeMap<String, OptionValue>,
}

impl Options {
    /// Checks `given` against `specs`: every key must be declared and of its kind.
    pub fn parse(
        driver: &str,
        specs: &[OptionSpec],
        given: &Map<String, Value>,
    ) -> Result<Options, DriverError> {
        let mut values = BTreeMap::new();
        for (k, v) in given {
            let spec =
                specs
                    .iter()
                    .find(|s| s.name == *k)
                    .ok_or_else(|| DriverError::UnknownOption {
                        driver: driver.to_owned(),
                        key: k.clone(),
                        known: specs.iter().map(|s| s.name.clone()).collect(),
                    })?;
            let value = spec.check(v).map_err(|why| DriverError::BadOption {
                driver: driver.to_owned(),
                key: k.clone(),
                why,
            })?;
            values.insert(k.clone(), value);
        }
        for s in specs {
            if let (false, Some(d)) = (values.contains_key(&s.name), &s.default) {
                values.insert(s.name.clone(), d.clone());
            }
        }
        Ok(Options { values })
    }

    /// The value of `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&OptionValue> {
        self.values.get(name)
    }

    /// A bool option's value.
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.get(name) {
            Some(OptionValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    /// An integer option's value.
    pub fn integer(&self, name: &str) -> Option<i64> {
        match self.get(name) {
            Some(OptionValue::Integer(i)) => Some(*i),
            _ => None,
        }
    }

    /// A text, path or choice option's value.
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(OptionValue::Text(t)) => Some(t),
            _ => None,
        }
    }

    /// A path option's value.
    pub fn path(&self, name: &str) -> Option<PathBuf> {
        self.text(name).map(PathBuf::from)
    }

    /// Every value, by key (for logs and listings).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OptionValue)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// What a driver knows of the parent it builds, beyond its options.
#[derive(Clone, Debug)]
pub struct ParentContext {
    /// The parent's name (`mtty0`).
    pub name: String,
    /// A directory the daemon keeps across restarts where the parent may keep state of its
    /// own (`<state_dir>/parents/<name>`), if the daemon has one. Not created in advance.
    pub state_dir: Option<PathBuf>,
}

/// Why a parent could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// No driver of that name is registered.
    #[error("no parent driver {name} (drivers: {})", known.join(", "))]
    NoDriver {
        /// The name asked for.
        name: String,
        /// The registered drivers.
        known: Vec<String>,
    },
    /// An option the driver does not declare.
    #[error("driver {driver} has no option {key} (its options: {})", if known.is_empty() { "none".to_owned() } else { known.join(", ") })]
    UnknownOption {
        /// The driver.
        driver: String,
        /// The key given.
        key: String,
        /// The keys it declares.
        known: Vec<String>,
    },
    /// An option with a value of the wrong kind or out of range.
    #[error("driver {driver}, option {key}: {why}")]
    BadOption {
        /// The driver.
        driver: String,
        /// The key.
        key: String,
        /// What is wrong with the value.
        why: String,
    },
    /// The driver could not build the parent (a pool directory it cannot create, ...).
    #[error("{0}")]
    Failed(String),
}

/// A parent driver: how to make parents of one kind.
pub trait ParentDriver: Send + Sync {
    /// The driver's name: what configs name (`driver = "mtty"`) and the prefix of its type
    /// ids (`mtty-2`).
    fn name(&self) -> &str;
    /// One line on what its devices are.
    fn description(&self) -> &str;
    /// The options a parent takes, with their kinds and defaults.
    fn options(&self) -> Vec<OptionSpec>;
    /// Builds a parent from options already checked against [`options`](Self::options).
    fn build(&self, ctx: &ParentContext, options: &Options)
        -> Result<Arc<dyn Parent>, DriverError>;
}

/// The drivers a daemon knows, by name.
#[derive(Clone, Default)]
pub struct Drivers {
    list: Vec<Arc<dyn ParentDriver>>,
}

impl std::fmt::Debug for Drivers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Drivers {
    /// Registers `driver`; a later driver of the same name replaces the earlier one.
    pub fn add(&mut self, driver: impl ParentDriver + 'static) -> &mut Drivers {
        self.add_arc(Arc::new(driver))
    }

    /// Registers a shared driver.
    pub fn add_arc(&mut self, driver: Arc<dyn ParentDriver>) -> &mut Drivers {
        self.list.retain(|d| d.name() != driver.name());
        self.list.push(driver);
        self
    }

    /// The driver called `name`.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn ParentDriver>, DriverError> {
        self.list
            .iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| DriverError::NoDriver {
                name: name.to_owned(),
                known: self.names(),
            })
    }

    /// Every driver, in registration order.
    pub fn all(&self) -> &[Arc<dyn ParentDriver>] {
        &self.list
    }

    /// The drivers' names, in registration order.
    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|d| d.name().to_owned()).collect()
    }

    /// Checks `given` against driver `driver`'s options.
    pub fn options(
        &self,
        driver: &str,
        given: &Map<String, Value>,
    ) -> Result<Options, DriverError> {
        let d = self.get(driver)?;
        Options::parse(driver, &d.options(), given)
    }

    /// Checks the options and builds a parent of driver `driver`.
    pub fn build(
        &self,
        driver: &str,
        ctx: &ParentContext,
        given: &Map<String, Value>,
    ) -> Result<Arc<dyn Parent>, DriverError> {
        let options = self.options(driver, given)?;
        let parent = self.get(driver)?.build(ctx, &options)?;
        if parent.driver() != driver {
            return Err(DriverError::Failed(format!(
                "driver {driver} built a parent of driver {}",
                parent.driver()
            )));
        }
        Ok(parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs() -> Vec<OptionSpec> {
        vec![
            OptionSpec::integer("ports", 1, 64, 24, "ports"),
            OptionSpec::bool("p2p", false, "shared"),
            OptionSpec::choice("console", &["socket", "pty", "none"], "socket", "host side"),
            OptionSpec::path("pool", None, "pool dir"),
        ]
    }

    fn parse(v: Value) -> Result<Options, DriverError> {
        Options::parse("d", &specs(), v.as_object().unwrap())
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let o = parse(json!({})).unwrap();
        assert_eq!(o.integer("ports"), Some(24));
        assert_eq!(o.bool("p2p"), Some(false));
        assert_eq!(o.text("console"), Some("socket"));
        assert_eq!(o.path("pool"), None);
    }

    #[test]
    fn typed_and_textual_values_are_taken() {
        let o = parse(json!({"ports": 4, "p2p": "yes", "console": "pty", "pool": "/x"})).unwrap();
        assert_eq!(o.integer("ports"), Some(4));
        assert_eq!(o.bool("p2p"), Some(true));
        assert_eq!(o.text("console"), Some("pty"));
        assert_eq!(o.path("pool"), Some(PathBuf::from("/x")));
        assert_eq!(
            parse(json!({"ports": "7"})).unwrap().integer("ports"),
            Some(7)
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_the_known_ones() {
        let e = parse(json!({"colour": 1})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "driver d has no option colour (its options: ports, p2p, console, pool)"
        );
    }

    #[test]
    fn ill_typed_and_out_of_range_values_name_their_key() {
        for (v, key) in [
            (json!({"ports": "many"}), "ports"),
            (json!({"ports": 65}), "ports"),
            (json!({"ports": true}), "ports"),
            (json!({"p2p": 3}), "p2p"),
            (json!({"console": "tty"}), "console"),
            (json!({"pool": 5}), "pool"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert!(
                matches!(&e, DriverError::BadOption { key: k, .. } if k == key),
                "{v}: {e}"
            );
            assert!(e.to_string().contains(&format!("option {key}:")), "{e}");
        }
    }
}
