//! A PCI function driven directly, without a server: config space, BARs, the MSI-X table
//! and PBA, SET_IRQS, interrupts and reset, as a client reaches them through a session.
//!
//! The function has every capability the spec builder offers: power management, MSI with
//! per-vector masking, PCI Express, MSI-X with its table and PBA in BAR2; a 64-bit memory
//! BAR0, a 32-bit memory BAR2, an I/O BAR4 and INTA. The device is scratch memory with
//! doorbells in BAR0 that do DMA (refused: the function is opened with a DMA that refuses
//! everything) and raise interrupts.
//!
//! Input: a sequence of operations, each an opcode byte and its operands (operands the
//! input runs out of read as zero):
//!
//! | opcode % 8 | operation                   | operands                                         |
//! | ---------- | --------------------------- | ------------------------------------------------ |
//! | 0          | `region_read`               | region, offset u16 LE, length code               |
//! | 1          | `region_write`              | region, offset u16 LE, length code, the data     |
//! | 2, 3       | read, write at a u64 offset | region, offset u64 LE, length code (, the data)  |
//! | 4          | `set_irqs`                  | index, flags, start, count, data kind, data      |
//! | 5          | `reset`                     |                                                  |
//! | 6          | the device interrupts       | kind (low 2 bits) and vector                     |
//! | 7          | the client goes and another comes (`close`, `open`) |                          |
//!
//! See [`region`], [`length`] and [`set_irqs`] for how the operand bytes map to values.
//! Every access's outcome is checked against what the framework promises (out of bounds or
//! straddling the MSI-X structures: EINVAL; config space in bounds: always served; the
//! device sees only in-bounds accesses outside the MSI-X structures), and after every
//! operation config space's read-only registers, BAR type bits and capability chain are
//! checked against their power-on values. `UMDEV_FUZZ_TRACE=1` prints each operation.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use rustix::event::{eventfd, EventfdFlags};
#[path = "common.rs"]
mod common;

use common::{interrupt, trace, Input, Refuse, ToyDevice, REG_DMA_READ, REG_DMA_WRITE};
use umdev_pci::{BarKind, IrqData, PciDeviceSpec, PciFunction, CONFIG_REGION};

const VENDOR_ID: u16 = 0x1b36;
const DEVICE_ID: u16 = 0x0011;

const BAR0_SIZE: u64 = 8192;
const BAR2_SIZE: u64 = 4096;
const BAR4_SIZE: u64 = 256;
/// PCI Express config space.
const CONFIG_SIZE: u64 = 4096;

const MSI_VECTORS: u32 = 8;
const MSIX_VECTORS: u32 = 16;
/// Both MSI-X structures are in BAR2.
const MSIX_TABLE: u64 = 0x800;
const MSIX_PBA: u64 = 0xc00;
const MSIX_TABLE_SIZE: u64 = MSIX_VECTORS as u64 * 16;
const MSIX_PBA_SIZE: u64 = 8;

// BAR0's doorbells are the `ToyDevice`'s (common.rs): its DMA is refused here, so an
// 8-byte write to REG_DMA_READ or REG_DMA_WRITE fails with EIO; REG_IRQ raises an
// interrupt, as operation 6 does.

/// Capability ids in the order the framework chains them.
const CAP_IDS: [u8; 4] = [0x01, 0x05, 0x10, 0x11];

const EINVAL: i32 = 22;
const EIO: i32 = 5;

fuzz_target!(|data: &[u8]| {
    run(data);
});

fn run(data: &[u8]) {
    let mut f = function();
    f.open(Arc::new(Refuse))
        .expect("a fresh function opens for its first client");
    let fixed = Fixed::read(&mut f);
    let mut input = Input(data);
    while let Some(op) = input.byte() {
        match op % 8 {
            0 | 1 => {
                let (region, offset, len) = (region(input.byte()), input.u16(), input.byte());
                access(&mut f, &mut input, op % 2 == 1, region, offset.into(), len);
            }
            2 | 3 => {
                let (region, offset, len) = (region(input.byte()), input.u64(), input.byte());
                access(&mut f, &mut input, op % 2 == 1, region, offset, len);
            }
            4 => set_irqs(&mut f, &mut input),
            5 => {
                trace(format_args!("reset"));
                f.reset().expect("a function that offers reset resets");
            }
            6 => {
                let v = input.byte().unwrap_or(0);
                trace(format_args!("interrupt {v:#x}"));
                interrupt(&f.interrupts(), v);
            }
            _ => {
                trace(format_args!("close, open"));
                f.close();
                f.open(Arc::new(Refuse))
                    .expect("a closed function opens for the next client");
            }
        }
        fixed.check(&mut f);
    }
    f.close();
    fixed.check(&mut f);
}

fn function() -> PciFunction {
    let spec = PciDeviceSpec::builder(VENDOR_ID, DEVICE_ID)
        .class(0xff, 0x00, 0x00)
        .revision(3)
        .subsystem(0x1af4, 0x1100)
        .interrupt_pin(1)
        .bar(0, BarKind::Mem64 { prefetchable: true }, BAR0_SIZE)
        .bar(
            2,
            BarKind::Mem32 {
                prefetchable: false,
            },
            BAR2_SIZE,
        )
        .bar(4, BarKind::Io, BAR4_SIZE)
        .power_management()
        .msi(MSI_VECTORS, true)
        .pcie()
        .msix(MSIX_VECTORS, 2, MSIX_TABLE as u32, 2, MSIX_PBA as u32)
        .build()
        .expect("the fuzz device's spec is valid");
    PciFunction::new(
        spec,
        Box::new(ToyDevice::new(
            [BAR0_SIZE as usize, BAR2_SIZE as usize, BAR4_SIZE as usize],
            &[(MSIX_TABLE, MSIX_TABLE_SIZE), (MSIX_PBA, MSIX_PBA_SIZE)],
        )),
    )
}

/// Region indexes 0..=11 (9 and up do not exist), and `u32::MAX` for 0xff.
fn region(b: Option<u8>) -> u32 {
    match b.unwrap_or(0) {
        0xff => u32::MAX,
        b => u32::from(b % 12),
    }
}

/// Lengths: 0..=8 as themselves, then the sizes where bounds and splitting matter.
fn length(code: Option<u8>) -> usize {
    const LONG: [usize; 7] = [16, 64, 256, 4095, 4096, 4097, 1 << 16];
    let c = usize::from(code.unwrap_or(0) % 16);
    if c <= 8 {
        c
    } else {
        LONG[c - 9]
    }
}

/// The size of each region index, as the spec declares it; `None`: no such index.
fn region_size(region: u32) -> Option<u64> {
    Some(match region {
        0 => BAR0_SIZE,
        2 => BAR2_SIZE,
        4 => BAR4_SIZE,
        CONFIG_REGION => CONFIG_SIZE,
        // BAR1 and BAR3 (BAR0's upper half; not declared), BAR5, ROM and VGA are empty.
        1 | 3 | 5 | 6 | 8 => 0,
        _ => return None,
    })
}

fn overlaps(offset: u64, len: u64, start: u64, size: u64) -> bool {
    offset < start + size && start < offset.saturating_add(len)
}

fn inside(offset: u64, len: u64, start: u64, size: u64) -> bool {
    offset >= start
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= start + size)
}

/// What an access must get, as the framework documents it: EINVAL out of bounds or across
/// the edge of an MSI-X structure; EIO from a doorbell whose DMA the client refuses.
fn expected(region: u32, offset: u64, len: usize, write: bool) -> Result<(), i32> {
    let size = region_size(region).ok_or(EINVAL)?;
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => {}
        _ => return Err(EINVAL),
    }
    if len == 0 || region == CONFIG_REGION {
        return Ok(());
    }
    if region == 2 {
        for (start, size) in [(MSIX_TABLE, MSIX_TABLE_SIZE), (MSIX_PBA, MSIX_PBA_SIZE)] {
            if overlaps(offset, len, start, size) && !inside(offset, len, start, size) {
                return Err(EINVAL);
            }
        }
    }
    if write && region == 0 && len == 8 && matches!(offset, REG_DMA_READ | REG_DMA_WRITE) {
        return Err(EIO);
    }
    Ok(())
}

fn access(
    f: &mut PciFunction,
    input: &mut Input<'_>,
    write: bool,
    region: u32,
    offset: u64,
    code: Option<u8>,
) {
    let len = length(code);
    let want = expected(region, offset, len, write);
    // A write inside the PBA must leave it as it was: it is read-only.
    let pba_before =
        (write && region == 2 && len > 0 && inside(offset, len as u64, MSIX_PBA, MSIX_PBA_SIZE))
            .then(|| pba(f));
    let got = if write {
        let data = input.data(len);
        f.region_write(region, offset, &data)
    } else {
        let mut buf = vec![0u8; len];
        f.region_read(region, offset, &mut buf)
    };
    let got = got.map_err(|e| e.errno());
    trace(format_args!(
        "{} region {region} at {offset:#x}+{len:#x}: {got:?}",
        if write { "write" } else { "read" }
    ));
    assert_eq!(
        got, want,
        "region {region}, offset {offset:#x}, length {len:#x}, write {write}"
    );
    if let Some(before) = pba_before {
        assert_eq!(pba(f), before, "a write changed the read-only PBA");
    }
}

fn pba(f: &mut PciFunction) -> [u8; MSIX_PBA_SIZE as usize] {
    let mut b = [0u8; MSIX_PBA_SIZE as usize];
    f.region_read(2, MSIX_PBA, &mut b)
        .expect("the PBA can be read");
    b
}

/// SET_IRQS: index (0..=7; 5 and up do not exist), flags (the byte as it is: unknown bits
/// included), start and count (0xf0 and up count down from `u32::MAX`, for overflow), then
/// a data kind that need not match the flags: 0 none, 1 one bool byte per vector
/// (`count`, at most 64, taken from the input), 2 eventfds (high bit set: `count` of them,
/// at most 16; else 0..=4).
fn set_irqs(f: &mut PciFunction, input: &mut Input<'_>) {
    let index = u32::from(input.byte().unwrap_or(0) % 8);
    let flags = u32::from(input.byte().unwrap_or(0));
    let wide = |b: u8| {
        if b >= 0xf0 {
            u32::MAX - u32::from(0xff - b)
        } else {
            u32::from(b)
        }
    };
    let start = wide(input.byte().unwrap_or(0));
    let count = wide(input.byte().unwrap_or(0));
    let kind = input.byte().unwrap_or(0);
    let data = match kind % 3 {
        0 => IrqData::None,
        1 => IrqData::Bool(input.data(count.min(64) as usize)),
        _ => {
            let n = if kind & 0x80 != 0 {
                count.min(16) as usize
            } else {
                usize::from(kind >> 2) % 5
            };
            IrqData::Eventfds((0..n).map(|_| efd()).collect())
        }
    };
    let what = match &data {
        IrqData::None => "none".to_owned(),
        IrqData::Bool(b) => format!("{} bools", b.len()),
        IrqData::Eventfds(e) => format!("{} eventfds", e.len()),
    };
    let got = f.set_irqs(index, flags, start, count, data);
    trace(format_args!(
        "set_irqs index {index} flags {flags:#x} start {start} count {count} {what}: {:?}",
        got.as_ref().map_err(|e| e.errno())
    ));
    if let Err(e) = got {
        assert_eq!(e.errno(), EINVAL, "SET_IRQS refused with {e}");
    }
}

fn efd() -> std::os::fd::OwnedFd {
    eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC).expect("eventfd")
}

/// What no client access may change: the header's read-only registers, the BARs' type
/// bits and the capability chain.
struct Fixed {
    header: [u8; 0x40],
    chain: Vec<(u8, u8)>,
}

/// Header bytes that are read-only: ids, revision and class, header type, subsystem ids,
/// capabilities pointer, interrupt pin.
const READ_ONLY: [std::ops::Range<usize>; 6] = [
    0..4,
    8..0x0c,
    0x0e..0x0f,
    0x2c..0x30,
    0x34..0x35,
    0x3d..0x3e,
];

impl Fixed {
    fn read(f: &mut PciFunction) -> Fixed {
        let fixed = Fixed {
            header: header(f),
            chain: chain(f),
        };
        let ids = [VENDOR_ID.to_le_bytes(), DEVICE_ID.to_le_bytes()].concat();
        assert_eq!(&fixed.header[..4], &ids[..], "the ids as declared");
        let got: Vec<u8> = fixed.chain.iter().map(|&(_, id)| id).collect();
        assert_eq!(got, CAP_IDS, "every capability, in the framework's order");
        fixed
    }

    fn check(&self, f: &mut PciFunction) {
        let h = header(f);
        for r in READ_ONLY {
            assert_eq!(
                h[r.clone()],
                self.header[r.clone()],
                "read-only config bytes {r:#x?} changed"
            );
        }
        let bar = |i: usize| u32::from_le_bytes([0, 1, 2, 3].map(|b| h[0x10 + 4 * i + b]));
        // Type bits, and no address bit below the BAR's size.
        assert_eq!(bar(0) & 0xf, 0xc, "BAR0: 64-bit prefetchable memory");
        assert_eq!(
            u64::from(bar(0)) & (BAR0_SIZE - 1) & !0xf,
            0,
            "BAR0 aligned"
        );
        assert_eq!(bar(2) & 0xf, 0, "BAR2: 32-bit memory");
        assert_eq!(u64::from(bar(2)) & (BAR2_SIZE - 1), 0, "BAR2 aligned");
        assert_eq!(bar(4) & 0x3, 1, "BAR4: I/O");
        assert_eq!(
            u64::from(bar(4)) & (BAR4_SIZE - 1) & !0x3,
            0,
            "BAR4 aligned"
        );
        assert_eq!((bar(3), bar(5)), (0, 0), "undeclared BARs read 0");
        assert_eq!(chain(f), self.chain, "the capability chain changed");
    }
}

fn header(f: &mut PciFunction) -> [u8; 0x40] {
    let mut h = [0u8; 0x40];
    f.region_read(CONFIG_REGION, 0, &mut h)
        .expect("the header can always be read");
    h
}

/// The capability chain as (offset, id) pairs; at most 48 links, so that a loop cannot hang.
fn chain(f: &mut PciFunction) -> Vec<(u8, u8)> {
    let mut cfg = [0u8; 256];
    f.region_read(CONFIG_REGION, 0, &mut cfg)
        .expect("legacy config space can always be read");
    let mut out = Vec::new();
    let mut at = cfg[0x34];
    while at != 0 && out.len() < 48 {
        out.push((at, cfg[usize::from(at)]));
        at = cfg[usize::from(at) + 1];
    }
    out
}
