//! Seeds of `fuzz_targets/config_space.rs`: operation sequences in its input format, over
//! its device (constants below must match the target's).

use umdev_proto::wire::{
    IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};

const BAR0: u8 = 0;
const BAR2: u8 = 2;
const BAR4: u8 = 4;
const ROM: u8 = 6;
const CONFIG: u8 = 7;
const MSIX_TABLE: u16 = 0x800;
const MSIX_PBA: u16 = 0xc00;
const REG_DMA_READ: u16 = 0x100;
const REG_DMA_WRITE: u16 = 0x108;
const REG_IRQ: u16 = 0x110;
/// Where the framework puts the capabilities of that device, in its order: PM (8 bytes),
/// MSI with per-vector masking (0x18), PCI Express (0x3c), MSI-X.
const PM: u16 = 0x40;
const MSI: u16 = 0x48;
const PCIE: u16 = 0x60;
const MSIX: u16 = 0x9c;
/// IRQ indexes.
const INTX: u8 = 0;
const IRQ_MSI: u8 = 1;
const IRQ_MSIX: u8 = 2;
/// Data kinds of a SET_IRQS operation.
const NONE: u8 = 0;
const BOOL: u8 = 1;
/// Eventfds, as many as `count`.
const EVENTFDS: u8 = 0x80;

/// An operation sequence under construction.
#[derive(Default)]
struct Ops(Vec<u8>);

/// The target's length code of `len`.
fn code(len: usize) -> u8 {
    match len {
        0..=8 => len as u8,
        16 => 9,
        64 => 10,
        256 => 11,
        4095 => 12,
        4096 => 13,
        4097 => 14,
        65536 => 15,
        _ => panic!("the target has no length code for {len}"),
    }
}

/// The target reads SET_IRQS flags as one byte.
fn flags(f: u32) -> u8 {
    u8::try_from(f).expect("SET_IRQS flags fit a byte")
}

impl Ops {
    fn read(&mut self, region: u8, offset: u16, len: usize) -> &mut Self {
        self.0.push(0);
        self.0.push(region);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.push(code(len));
        self
    }

    fn write(&mut self, region: u8, offset: u16, data: &[u8]) -> &mut Self {
        self.0.push(1);
        self.0.push(region);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.push(code(data.len()));
        self.0.extend_from_slice(data);
        self
    }

    fn read_at(&mut self, region: u8, offset: u64, len: usize) -> &mut Self {
        self.0.push(2);
        self.0.push(region);
        self.0.extend_from_slice(&offset.to_le_bytes());
        self.0.push(code(len));
        self
    }

    fn set_irqs(&mut self, index: u8, f: u32, start: u8, count: u8, kind: u8) -> &mut Self {
        self.0
            .extend_from_slice(&[4, index, flags(f), start, count, kind]);
        self
    }

    fn reset(&mut self) -> &mut Self {
        self.0.push(5);
        self
    }

    fn interrupt(&mut self, v: u8) -> &mut Self {
        self.0.extend_from_slice(&[6, v]);
        self
    }

    fn reopen(&mut self) -> &mut Self {
        self.0.push(7);
        self
    }
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    let trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;

    let mut s = Ops::default();
    s.read(CONFIG, 0, 64)
        .read(CONFIG, PM, 64)
        .read(CONFIG, 0, 4096)
        .read(CONFIG, 0x100, 16)
        .read(CONFIG, 4095, 2)
        .read(CONFIG, 4094, 2)
        .read_at(CONFIG, u64::MAX - 1, 4)
        .read(ROM, 0, 4)
        .read(8, 0, 1)
        .read(9, 0, 1);
    seeds.push(("header", s.0));

    // A driver sizes each BAR, places it, and turns decoding on.
    let mut s = Ops::default();
    for bar in 0..6u16 {
        s.write(CONFIG, 0x10 + 4 * bar, &[0xff; 4])
            .read(CONFIG, 0x10 + 4 * bar, 4);
    }
    s.write(CONFIG, 0x10, &0xfebf_0000u32.to_le_bytes())
        .write(CONFIG, 0x14, &[0; 4])
        .write(CONFIG, 0x18, &0xfebe_0000u32.to_le_bytes())
        .write(CONFIG, 0x20, &0xc001u32.to_le_bytes())
        .write(CONFIG, 0x30, &[0xff; 4])
        .write(CONFIG, 0x04, &[0x07, 0x05])
        .write(CONFIG, 0x06, &[0xff, 0xff])
        .write(CONFIG, 0x00, &[0xff; 8])
        .write(CONFIG, 0x3c, &[0x0b, 0x02])
        .read(CONFIG, 0, 64);
    seeds.push(("bars", s.0));

    // MSI: program the capability, mask and unmask vectors, power state changes.
    let mut s = Ops::default();
    s.set_irqs(IRQ_MSI, trigger, 0, 2, EVENTFDS)
        .write(CONFIG, MSI + 4, &0xfee0_0000u32.to_le_bytes())
        .write(CONFIG, MSI + 8, &[0; 4])
        .write(CONFIG, MSI + 0xc, &[0x41, 0])
        .write(CONFIG, MSI + 2, &[0x11, 0])
        .interrupt(2)
        .interrupt(2 | 1 << 2)
        .write(CONFIG, MSI + 0x10, &[0x01, 0, 0, 0])
        .interrupt(2)
        .read(CONFIG, MSI + 0x14, 4)
        .write(CONFIG, MSI + 0x10, &[0; 4])
        .write(CONFIG, PM + 4, &[0x03, 0])
        .write(CONFIG, PM + 4, &[0x01, 0])
        .write(CONFIG, PM + 4, &[0x00, 0])
        .set_irqs(
            IRQ_MSI,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            NONE,
        );
    seeds.push(("msi", s.0));

    // MSI-X: eventfds, the table in BAR2, enable and function mask, the PBA.
    let mut s = Ops::default();
    let mut entry = [0u8; 16];
    entry[..4].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
    entry[8] = 0x30;
    s.set_irqs(IRQ_MSIX, trigger, 0, 4, EVENTFDS)
        .write(BAR2, MSIX_TABLE, &entry)
        .write(BAR2, MSIX_TABLE + 16, &entry)
        .write(CONFIG, MSIX + 2, &[0, 0x80])
        .interrupt(3)
        .interrupt(3 | 1 << 2)
        .interrupt(3 | 2 << 2)
        .write(CONFIG, MSIX + 2, &[0, 0xc0])
        .interrupt(3)
        .read(BAR2, MSIX_PBA, 8)
        .write(BAR2, MSIX_PBA, &[0xff; 8])
        .write(CONFIG, MSIX + 2, &[0, 0x80])
        .read(BAR2, MSIX_TABLE, 256)
        .read(BAR2, MSIX_TABLE - 4, 8)
        .read(BAR2, MSIX_TABLE + 0xfc, 8)
        .read(BAR2, MSIX_PBA + 4, 8)
        .write(BAR2, MSIX_TABLE + 12, &[0, 0, 0, 0])
        .set_irqs(IRQ_MSIX, trigger, 1, 1, 0x02)
        .set_irqs(
            IRQ_MSIX,
            IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
            0,
            2,
            BOOL,
        )
        .0
        .extend_from_slice(&[1, 1]);
    s.set_irqs(IRQ_MSI, trigger, 0, 1, EVENTFDS)
        .set_irqs(IRQ_MSIX, trigger, 0xff, 2, EVENTFDS)
        .set_irqs(IRQ_MSIX, trigger, 15, 0xf0, EVENTFDS);
    seeds.push(("msix", s.0));

    // INTx: an eventfd, the line, masking, the command register's disable bit.
    let mut s = Ops::default();
    s.set_irqs(INTX, trigger, 0, 1, EVENTFDS)
        .interrupt(0)
        .read(CONFIG, 0x06, 2)
        .set_irqs(INTX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 1, NONE)
        .interrupt(1)
        .interrupt(0)
        .set_irqs(INTX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK, 0, 1, NONE)
        .write(CONFIG, 0x04, &[0, 0x04])
        .interrupt(0)
        .write(CONFIG, 0x04, &[0, 0])
        .set_irqs(INTX, IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_UNMASK, 0, 1, BOOL)
        .0
        .push(1);
    s.set_irqs(INTX, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, 0, 0, NONE)
        .set_irqs(3, trigger, 0, 1, EVENTFDS)
        .set_irqs(4, trigger, 0, 1, EVENTFDS)
        .set_irqs(5, trigger, 0, 1, EVENTFDS)
        .set_irqs(INTX, 0x40 | trigger, 0, 1, EVENTFDS);
    seeds.push(("intx", s.0));

    // The device: its memory, its doorbells (DMA refused: EIO), port I/O, reset, reopen.
    let mut s = Ops::default();
    s.write(BAR0, 0, &[0xaa; 16])
        .read(BAR0, 0, 16)
        .write(BAR0, REG_DMA_READ, &0x1000u64.to_le_bytes())
        .write(BAR0, REG_DMA_WRITE, &0x2000u64.to_le_bytes())
        .write(BAR0, REG_IRQ, &[0])
        .write(BAR0, 8191, &[1])
        .write(BAR0, 8191, &[1, 2])
        .read(BAR0, 0, 4096)
        .read(BAR0, 4096, 4097)
        .write(BAR4, 0xfc, &[1, 2, 3, 4])
        .read(BAR4, 0xfc, 8)
        .read(1, 0, 4)
        .read_at(BAR0, u64::MAX, 1)
        .reset()
        .read(BAR0, 0, 16)
        .reopen()
        .read(CONFIG, 0x10, 8);
    seeds.push(("device", s.0));

    // PCI Express: its registers and extended config space.
    let mut s = Ops::default();
    s.read(CONFIG, PCIE, 64)
        .write(CONFIG, PCIE + 8, &[0xff, 0xff])
        .write(CONFIG, PCIE + 0xa, &[0x0f, 0])
        .write(CONFIG, PCIE + 0x10, &[0xff, 0xff])
        .write(CONFIG, 0x100, &[0xff; 8])
        .read(CONFIG, 0x100, 8)
        .write(CONFIG, PCIE + 0x3c, &[0xff; 4])
        .read(CONFIG, 0, 256);
    seeds.push(("pcie", s.0));

    seeds
}
