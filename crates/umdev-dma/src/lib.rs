//! umdev-dma.
