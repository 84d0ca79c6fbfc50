//! umdev-tests.
