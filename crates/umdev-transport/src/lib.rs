//! umdev-transport.
