//! umdev-api: what `umdevd` and its clients share.
//!
//! - [`definition`]: mdevctl's persistent definition format and store, which the daemon
//!   reads at start (auto-start) and the control API edits.
//! - [`control`]: the control API: typed requests and replies, one JSON object per line
//!   over a UNIX socket; `umdevctl` speaks it, never the core's internals.
#![warn(missing_docs)]

pub mod control;
pub mod definition;

pub use control::{Client, ClientError, ModifyRequest, Request, Response};
pub use definition::{Definition, DefinitionError, DefinitionStore, Start};
