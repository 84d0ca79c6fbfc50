//! Parent drivers that umdevd's own crates do not know, registered by the test daemon
//! (`src/bin/umdevd-test.rs`) through the public builder, as a device author's daemon would:
//!
//! - `umdevtest`: the [test device](crate::device) as a parent (types `umdevtest-plain` and
//!   `umdevtest-migratable`) from a pool, with options to make a step of creation fail;
//!   vendor attributes expose what the test device saw (trapped BAR2 accesses, BAR2's
//!   contents) so tests that go through a real daemon and a real VMM can check them.
//! - `probe`: a device that records every hook the framework calls and shows them in its
//!   `probe/hooks` attribute; it pins a page when told to, so `dma_unmap` is due to it.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use umdev_core::{
    AttrSpec, DeviceDescription, DeviceEnv, DriverError, Errno, MdevParts, MdevUuid, OptionSpec,
    Options, Parent, ParentContext, ParentDriver, TypeSpec, VendorAttrs,
};
use umdev_dma::{PinnedPages, Pinner, Prot};
use umdev_pci::{
    BarIndex, BarKind, DeviceContext, IrqMode, MigrationSpec, PciDevice, PciDeviceSpec,
    StateReader, StateWriter,
};

use crate::device::{Observed, TestDevice, BAR2_AREAS};

/// The test device's driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct TestDriver;

impl ParentDriver for TestDriver {
    fn name(&self) -> &str {
        "umdevtest"
    }

    fn description(&self) -> &str {
        "umdev's test device: every region kind, MSI/MSI-X, a DMA engine, a small display"
    }

    fn options(&self) -> Vec<OptionSpec> {
        vec![
            OptionSpec::integer("pool", 1, 64, 4, "devices the parent can hold"),
            OptionSpec::choice(
                "fail",
                &["none", "create", "build"],
                "none",
                "make this step of every creation fail (tests of failed creates)",
            ),
            OptionSpec::bool("hot_unplug", false, "held devices can be taken away"),
        ]
    }

    fn build(&self, _: &ParentContext, o: &Options) -> Result<Arc<dyn Parent>, DriverError> {
        Ok(Arc::new(TestParent {
            pool: o
                .integer("pool")
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(4),
            fail: o.text("fail").unwrap_or("none").to_owned(),
            hot_unplug: o.bool("hot_unplug").unwrap_or(false),
        }))
    }
}

/// A parent of test devices.
#[derive(Debug)]
pub struct TestParent {
    pool: u32,
    fail: String,
    hot_unplug: bool,
}

/// What a test device shows through its vendor attributes.
struct TestAttrs {
    observed: Arc<Observed>,
    bar2: Arc<OwnedFd>,
}

/// BAR2 accesses that reached the device inside its sparse (mmap-able) areas: a VMM that
/// mapped them never traps there.
pub const ATTR_TRAPPED_SPARSE: &str = "vendor/trapped_sparse";
/// BAR2 accesses that reached the device outside its sparse areas.
pub const ATTR_TRAPPED_BAR2: &str = "vendor/trapped_bar2";
/// The first 16 bytes of each sparse area of BAR2, in hex, one line per area.
pub const ATTR_BAR2_HEAD: &str = "vendor/bar2_head";

impl VendorAttrs for TestAttrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        let in_sparse = |off: u64, len: usize| {
            BAR2_AREAS
                .iter()
                .any(|&(o, s)| off < o + s && o < off + len as u64)
        };
        let count = |want_sparse: bool| {
            self.observed
                .accesses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|(bar, off, len, _)| *bar == 2 && in_sparse(*off, *len) == want_sparse)
                .count()
        };
        match name {
            ATTR_TRAPPED_SPARSE => Ok(format!("{}\n", count(true))),
            ATTR_TRAPPED_BAR2 => Ok(format!("{}\n", count(false))),
            ATTR_BAR2_HEAD => {
                let handed = self.observed.bar2.lock().unwrap().clone();
                let bar2 = handed.unwrap_or_else(|| self.bar2.clone());
                let mut s = String::new();
                for &(o, _) in &BAR2_AREAS {
                    let mut b = [0u8; 16];
                    rustix::io::pread(&*bar2, &mut b, o)?;
                    for x in b {
                        let _ = write!(s, "{x:02x}");
                    }
                    s.push('\n');
                }
                Ok(s)
            }
            _ => Err(Errno::NOENT),
        }
    }
}

impl Parent for TestParent {
    fn driver(&self) -> &str {
        "umdevtest"
    }

    fn types(&self) -> Vec<TypeSpec> {
        ["plain", "migratable"]
            .iter()
            .map(|n| TypeSpec {
                description: Some(format!("the test device ({n})")),
                attrs: vec![
                    AttrSpec::read_only(ATTR_TRAPPED_SPARSE),
                    AttrSpec::read_only(ATTR_TRAPPED_BAR2),
                    AttrSpec::read_only(ATTR_BAR2_HEAD),
                ],
                ..TypeSpec::new(n)
            })
            .collect()
    }

    fn available(&self, _: &str, in_use: &[&str]) -> u32 {
        self.pool
            .saturating_sub(u32::try_from(in_use.len()).unwrap_or(u32::MAX))
    }

    fn create(&self, _: &MdevUuid, type_name: &str) -> Result<DeviceDescription, Errno> {
        if self.fail == "create" {
            return Err(Errno::NOMEM);
        }
        Ok(DeviceDescription::new(type_name))
    }

    fn build(
        &self,
        _: &MdevUuid,
        description: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        if self.fail == "build" {
            return Err(Errno::IO);
        }
        let (spec, dev) = TestDevice::new(description.type_name == "migratable");
        let attrs = TestAttrs {
            observed: dev.observed(),
            bar2: dev.bar2(),
        };
        Ok(MdevParts {
            spec,
            device: Box::new(dev),
            attrs: Some(Box::new(attrs)),
        })
    }

    fn hot_unplug(&self) -> bool {
        self.hot_unplug
    }

    fn attrs(&self) -> Vec<AttrSpec> {
        vec![AttrSpec::read_only("vendor/pool")]
    }

    fn show_attr(&self, name: &str) -> Result<String, Errno> {
        match name {
            "vendor/pool" => Ok(format!("{}\n", self.pool)),
            _ => Err(Errno::NOENT),
        }
    }
}

/// The probe's driver.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeDriver;

impl ParentDriver for ProbeDriver {
    fn name(&self) -> &str {
        "probe"
    }

    fn description(&self) -> &str {
        "records every hook the framework calls"
    }

    fn options(&self) -> Vec<OptionSpec> {
        Vec::new()
    }

    fn build(&self, _: &ParentContext, _: &Options) -> Result<Arc<dyn Parent>, DriverError> {
        Ok(Arc::new(ProbeParent))
    }
}

/// A parent of probes.
#[derive(Debug)]
pub struct ProbeParent;

/// The probe's register: writing an IOVA here (8 bytes) pins that page read-write.
pub const PROBE_PIN: u64 = 0x10;
/// The probe's attribute listing the hooks it saw, sorted, one per line.
pub const ATTR_HOOKS: &str = "probe/hooks";
/// The probe's attribute with its pins: `pinned <pages> revoked <bool>` (`none` without a
/// client).
pub const ATTR_PINS: &str = "probe/pins";

type Log = Arc<Mutex<BTreeSet<&'static str>>>;
type SharedPinner = Arc<Mutex<Option<Arc<Pinner>>>>;

struct Probe {
    log: Log,
    pinner: SharedPinner,
    ctx: Option<DeviceContext>,
    pins: Vec<PinnedPages>,
    scratch: [u8; 64],
}

impl Probe {
    fn saw(&self, hook: &'static str) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hook);
    }
}

impl PciDevice for Probe {
    fn bar_read(&mut self, _: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        self.saw("bar_read");
        let o = usize::try_from(offset).map_err(|_| Errno::INVAL)?;
        let src = self.scratch.get(o..o + data.len()).ok_or(Errno::INVAL)?;
        data.copy_from_slice(src);
        Ok(())
    }

    fn bar_write(&mut self, _: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.saw("bar_write");
        let o = usize::try_from(offset).map_err(|_| Errno::INVAL)?;
        self.scratch
            .get_mut(o..o + data.len())
            .ok_or(Errno::INVAL)?
            .copy_from_slice(data);
        if offset == PROBE_PIN && data.len() == 8 {
            let iova = u64::from_le_bytes(data.try_into().map_err(|_| Errno::INVAL)?);
            let pinner = self
                .ctx
                .as_ref()
                .and_then(|c| c.pins.clone())
                .ok_or(Errno::NODEV)?;
            let p = pinner
                .pin(iova, 1, Prot::READ_WRITE)
                .map_err(|e| Errno::from_raw_os_error(e.errno()))?;
            self.pins.push(p);
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), Errno> {
        self.saw("reset");
        Ok(())
    }

    fn open(&mut self, ctx: DeviceContext) -> Result<(), Errno> {
        self.saw("open");
        *self.pinner.lock().unwrap_or_else(|e| e.into_inner()) = ctx.pins.clone();
        self.ctx = Some(ctx);
        Ok(())
    }

    fn close(&mut self) {
        self.saw("close");
        self.pins.clear();
        self.ctx = None;
    }

    fn irq_mode_changed(&mut self, _: IrqMode) {
        self.saw("irq_mode_changed");
    }

    fn intx_unmasking(&mut self) {
        self.saw("intx_unmasking");
    }

    fn dma_unmap(&mut self, iova: u64, len: u64) {
        self.saw("dma_unmap");
        let Some(pinner) = self.ctx.as_ref().and_then(|c| c.pins.clone()) else {
            return;
        };
        let end = iova.saturating_add(len);
        self.pins.retain(|p| {
            let hit = p.iova() < end && iova < p.iova() + p.len_bytes();
            if hit {
                let _ = pinner.unpin(p.iova(), p.page_count());
            }
            !hit
        });
    }

    fn migration(&self) -> Option<MigrationSpec> {
        self.saw("migration");
        Some(MigrationSpec {
            device_type: "umdev-probe".into(),
            version: 1,
            min_version: 1,
            flags: 0,
        })
    }

    fn set_running(&mut self, running: bool) -> Result<(), Errno> {
        self.saw(if running {
            "set_running(true)"
        } else {
            "set_running(false)"
        });
        Ok(())
    }

    fn save(&mut self, state: &mut StateWriter) -> Result<(), Errno> {
        self.saw("save");
        state.bytes(1, &self.scratch);
        Ok(())
    }

    fn load(&mut self, _: u32, state: &StateReader<'_>) -> Result<(), Errno> {
        self.saw("load");
        let b = state.bytes(1)?;
        if b.len() != self.scratch.len() {
            return Err(Errno::INVAL);
        }
        self.scratch.copy_from_slice(b);
        Ok(())
    }
}

struct ProbeAttrs {
    log: Log,
    pinner: SharedPinner,
}

impl VendorAttrs for ProbeAttrs {
    fn show(&self, name: &str) -> Result<String, Errno> {
        match name {
            ATTR_HOOKS => {
                let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                Ok(log.iter().map(|h| format!("{h}\n")).collect())
            }
            ATTR_PINS => Ok(
                match &*self.pinner.lock().unwrap_or_else(|e| e.into_inner()) {
                    Some(p) => format!("pinned {} revoked {}\n", p.pinned_pages(), p.is_revoked()),
                    None => "none\n".to_owned(),
                },
            ),
            _ => Err(Errno::NOENT),
        }
    }
}

impl Parent for ProbeParent {
    fn driver(&self) -> &str {
        "probe"
    }

    fn types(&self) -> Vec<TypeSpec> {
        vec![TypeSpec {
            attrs: vec![
                AttrSpec::read_only(ATTR_HOOKS),
                AttrSpec::read_only(ATTR_PINS),
            ],
            ..TypeSpec::new("1")
        }]
    }

    fn available(&self, _: &str, in_use: &[&str]) -> u32 {
        8u32.saturating_sub(u32::try_from(in_use.len()).unwrap_or(u32::MAX))
    }

    fn build(
        &self,
        _: &MdevUuid,
        _: &DeviceDescription,
        _: &DeviceEnv,
    ) -> Result<MdevParts, Errno> {
        let spec = PciDeviceSpec::builder(0x5ead, 0x0002)
            .class(0xff, 0, 0)
            .interrupt_pin(1)
            .bar(
                0,
                BarKind::Mem32 {
                    prefetchable: false,
                },
                4096,
            )
            .msi(1, false)
            .reset(true)
            .build()
            .map_err(|_| Errno::INVAL)?;
        let log = Log::default();
        let pinner = SharedPinner::default();
        let probe = Probe {
            log: log.clone(),
            pinner: pinner.clone(),
            ctx: None,
            pins: Vec::new(),
            scratch: [0; 64],
        };
        Ok(MdevParts {
            spec,
            device: Box::new(probe),
            attrs: Some(Box::new(ProbeAttrs { log, pinner })),
        })
    }
}
