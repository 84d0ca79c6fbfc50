//! umdev-pci.
