//! umdev-proto.
