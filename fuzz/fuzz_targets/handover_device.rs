//! The device of the `handover` target, which its seeds (`seedgen`) are made with too: a
//! package fits only the device it came from. Included with `#[path]` by both.

use std::os::fd::OwnedFd;

use umdev_pci::{
    BarIndex, BarKind, Errno, HandedFds, PciDevice, PciDeviceSpec, PciFunction, StateReader,
    StateWriter,
};

/// The device's own fields in its state.
pub const T_REGS: u16 = 1;
pub const T_WRITES: u16 = 2;

/// BAR0's size: the registers.
pub const REGS: usize = 256;
const BAR2_SIZE: usize = 4096;

/// A fresh function of the device.
pub fn function_of() -> PciFunction {
    let spec = PciDeviceSpec::builder(0x1b36, 0x0010)
        .class(0xff, 0, 0)
        .interrupt_pin(1)
        .bar(
            0,
            BarKind::Mem32 {
                prefetchable: false,
            },
            REGS as u64,
        )
        .bar(2, BarKind::Mem64 { prefetchable: true }, BAR2_SIZE as u64)
        .msi(4, true)
        .msix(8, 2, 0, 2, 0x800)
        .power_management()
        .build()
        .expect("the fuzz device's spec is valid");
    PciFunction::new(spec, Box::new(Keeper::default()))
}

/// A device with state to hand over: BAR0's registers and a count of the writes to them.
/// BAR2 (around the MSI-X structures) is scratch that does not travel.
struct Keeper {
    regs: Vec<u8>,
    writes: u64,
    bar2: Vec<u8>,
}

impl Default for Keeper {
    fn default() -> Keeper {
        Keeper {
            regs: vec![0; REGS],
            writes: 0,
            bar2: vec![0; BAR2_SIZE],
        }
    }
}

impl Keeper {
    fn span(&mut self, bar: BarIndex, offset: u64, len: usize) -> &mut [u8] {
        let mem = match bar.get() {
            0 => &mut self.regs,
            2 => &mut self.bar2,
            n => panic!("access to BAR {n}, which the device did not declare"),
        };
        let size = mem.len();
        usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(len)?))
            .and_then(|r| mem.get_mut(r))
            .unwrap_or_else(|| panic!("access {offset:#x}+{len:#x} past a {size:#x}-byte BAR"))
    }
}

impl PciDevice for Keeper {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        data.copy_from_slice(self.span(bar, offset, data.len()));
        Ok(())
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.span(bar, offset, data.len()).copy_from_slice(data);
        if bar.get() == 0 {
            self.writes = self.writes.wrapping_add(1);
        }
        Ok(())
    }

    fn hand_over(&mut self, state: &mut StateWriter, _fds: &mut Vec<OwnedFd>) -> Result<(), Errno> {
        state.bytes(T_REGS, &self.regs).u64(T_WRITES, self.writes);
        Ok(())
    }

    /// All or nothing: the registers must be whole; the count is optional (a field an older
    /// version would not have written).
    fn take_over(&mut self, state: &StateReader<'_>, _fds: &mut HandedFds) -> Result<(), Errno> {
        let regs = state.bytes(T_REGS).map_err(|_| Errno::INVAL)?;
        if regs.len() != REGS {
            return Err(Errno::INVAL);
        }
        let writes = match state.get(T_WRITES) {
            None => 0,
            Some(_) => state.u64(T_WRITES).map_err(|_| Errno::INVAL)?,
        };
        self.regs.copy_from_slice(regs);
        self.writes = writes;
        Ok(())
    }
}
