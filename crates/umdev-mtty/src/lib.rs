//! umdev-mtty.
