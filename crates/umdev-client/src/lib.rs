//! umdev-client.
