//! umdev-server.
