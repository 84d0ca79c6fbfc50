//! umdev-hello: the smallest complete parent driver, and the worked example of
//! `docs/writing-a-parent.md`. A device author copies this crate and changes the device.
//!
//! The device, "hello" (PCI 5ead:4e11), has one 4 KiB memory BAR of 32-bit registers:
//!
//! | offset | meaning |
//! |---|---|
//! | 0x00 | ADDR_LO: guest address (low half) |
//! | 0x04 | ADDR_HI: guest address (high half) |
//! | 0x08 | LEN: bytes to sum, at most [`MAX_LEN`] |
//! | 0x0c | CMD: write 1 to start |
//! | 0x10 | STATUS: 0 idle or done, 1 busy, else the errno of a failed DMA |
//! | 0x14 | RESULT: the FNV-1a hash of the bytes |
//!
//! Starting a command submits the DMA to the device's work context (never inside the BAR
//! write: the client may be QEMU, which answers DMA messages from the loop that waits for
//! this write's reply), and the device raises its interrupt (MSI if enabled, else INTx)
//! when the result is in.
//!
//! The parent, [`HelloDriver`], takes one option, `devices` (how many a parent holds),
//! offers one type, `hello-1`, and gives each device a vendor attribute `vendor/requests`
//! (commands done so far). The device migrates: its registers are its state.
#![warn(missing_docs)]

mod device;

use std::sync::Arc;

use umdev_core::{
    AttrSpec, DeviceDescription, DeviceEnv, DriverError, Errno, MdevParts, MdevUuid, OptionSpec,
    Options, Parent, ParentContext, ParentDriver, TypeSpec, VendorAttrs,
};

pub use device::{
    Hello, MAX_LEN, REG_ADDR_HI, REG_ADDR_LO, REG_CMD, REG_LEN, REG_RESULT, REG_STATUS,
};

/// The driver entry a daemon registers: `Daemon::builder().driver(HelloDriver)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HelloDriver;

impl ParentDriver for HelloDriver {
    fn name(&self) -> &str {
        "hello"
    }

    fn description(&self) -> &str {
        "a sample device that hashes guest memory with DMA (the template for new drivers)"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![OptionSpec::integer(
            "devices",
            1,
            1024,
            8,
            "how many devices the parent holds",
        )]
    }

    fn build(&self, _: &ParentContext, o: &Options) -> Result<Arc<dyn Parent>, DriverError> {
        let devices = o
            .integer("devices")
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| DriverError::Failed("devices is required".into()))?;
        Ok(Arc::new(HelloParent { devices }))
    }
}

/// A parent: a pool of `devices` devices of type `hello-1`.
#[derive(Debug)]
pub struct HelloParent {
    devices: u32,
}

/// The vendor attribute each device has.
pub const ATTR_REQUESTS: &str = "vendor/requests";

struct Attrs(device::Shared);

impl VendorAttrs for Attrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            ATTR_REQUESTS => Ok(format!("{}\n", self.0.requests())),
            _ => Err(Errno::NOENT),
        }
    }
}

impl Parent for HelloParent {
    fn driver(&self) -> &str {
        "hello"
    }

    fn types(&self) -> Vec<TypeSpec> {
        vec![TypeSpec {
            pretty_name: Some("Hello".into()),
            description: Some("hashes guest memory".into()),
            attrs: vec![AttrSpec::read_only(ATTR_REQUESTS)],
            ..TypeSpec::new("1")
        }]
    }

    fn available(&self, _: &str, in_use: &[&str]) -> u32 {
        let used = u32::try_from(in_use.len()).unwrap_or(u32::MAX);
        self.devices.saturating_sub(used)
    }

    fn build(
        &self,
        _: &MdevUuid,
        _: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        let hello = Hello::new();
        let attrs = Attrs(hello.shared());
        Ok(MdevParts {
            spec: Hello::spec().map_err(|_| Errno::INVAL)?,
            device: Box::new(hello),
            attrs: Some(Box::new(attrs)),
        })
    }
}
