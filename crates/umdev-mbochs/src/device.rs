//! The display as a PCI function: PCI 1234:1111 (what Linux's `bochs` binds), class 03/00/00,
//! BAR0 the VRAM (prefetchable, mapped by the client whole: framebuffer writes never trap),
//! BAR2 the registers (see [`crate::regs`]). No interrupt.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use umdev_pci::{
    fourcc, BarIndex, BarKind, BarMmap, DisplayPlane, Errno, MigrationSpec, PciDevice,
    PciDeviceSpec, SpecError, StateReader, StateWriter,
};

use crate::regs::{self, index, Mode};
use crate::vram::Vram;

/// Bochs VBE's PCI vendor id (QEMU's stdvga).
pub const VENDOR_ID: u16 = 0x1234;
/// Its device id.
pub const DEVICE_ID: u16 = 0x1111;

/// Migration copies VRAM in blocks of this size.
const BLOCK: u64 = 64 << 10;

/// What the device's hooks and its attributes share.
pub(crate) struct State {
    pub dispi: [u16; index::COUNT],
    pub vga: [u8; 0x20],
    pub endian: u32,
    /// The mode in use while the display is enabled.
    pub mode: Option<Mode>,
    /// A migration's copy of VRAM: what was sent, and where the pass is.
    copy: Option<Copy>,
}

struct Copy {
    sent: Vec<u8>,
    unsent: Vec<bool>,
    cursor: u64,
}

/// The shared part of a device (its attributes read it).
pub(crate) struct Shared {
    pub vram: Vram,
    pub edid: [u8; 128],
    state: Mutex<State>,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn power_on(vram: u64) -> State {
        let mut dispi = [0u16; index::COUNT];
        dispi[index::ID] = regs::ID5;
        dispi[index::VIDEO_MEMORY_64K] = u16::try_from(vram >> 16).unwrap_or(u16::MAX);
        State {
            dispi,
            vga: [0; 0x20],
            endian: regs::LITTLE_ENDIAN,
            mode: None,
            copy: None,
        }
    }
}

/// The device the framework serves.
pub struct Mbochs {
    pub(crate) shared: Arc<Shared>,
}

/// The PCI layout of a display with `vram` bytes (a power of two).
pub fn spec(vram: &Vram) -> Result<PciDeviceSpec, SpecError> {
    PciDeviceSpec::builder(VENDOR_ID, DEVICE_ID)
        .class(0x03, 0x00, 0x00)
        .revision(2)
        .subsystem(0x1af4, 0x1100)
        .bar(0, BarKind::Mem32 { prefetchable: true }, vram.size())
        .bar_mmap(
            0,
            // One sparse area over the whole BAR: the client maps all of VRAM.
            BarMmap {
                fd: vram.fd(),
                offset: 0,
                areas: vec![(0, vram.size())],
            },
        )
        .bar(
            2,
            BarKind::Mem32 {
                prefetchable: false,
            },
            regs::MMIO_SIZE,
        )
        .pcie()
        .reset(true)
        .build()
}

impl Mbochs {
    /// A display with `vram` bytes of VRAM; `serial` goes into its EDID.
    pub fn new(vram: Vram, serial: u32) -> Mbochs {
        let size = vram.size();
        Mbochs {
            shared: Arc::new(Shared {
                vram,
                edid: regs::edid("umdev mbochs", serial),
                state: Mutex::new(Shared::power_on(size)),
            }),
        }
    }

    fn dispi_read(&self, i: usize) -> u16 {
        let st = self.shared.state();
        let caps = st.dispi[index::ENABLE] & regs::GETCAPS != 0;
        match i {
            index::XRES if caps => regs::MAX_XRES,
            index::YRES if caps => regs::MAX_YRES,
            index::BPP if caps => 32,
            _ => st.dispi.get(i).copied().unwrap_or(0),
        }
    }

    fn dispi_write(&self, i: usize, v: u16) {
        let vram = self.shared.vram.size();
        let mut st = self.shared.state();
        match i {
            index::ID if (0xb0c0..=regs::ID5).contains(&v) => st.dispi[index::ID] = v,
            index::ID => {}
            index::VIDEO_MEMORY_64K => {}
            index::ENABLE => {
                let was = st.dispi[index::ENABLE] & regs::ENABLED != 0;
                st.dispi[index::ENABLE] = v;
                if v & regs::ENABLED == 0 {
                    st.mode = None;
                    return;
                }
                let m = Mode::fixup(&st.dispi, vram);
                m.store(&mut st.dispi);
                st.mode = Some(m);
                if !was && v & regs::NOCLEARMEM == 0 {
                    // The visible lines are cleared, as the hardware model does.
                    let len = (u64::from(m.y_offset) + u64::from(m.yres)) * m.stride();
                    drop(st);
                    if let Err(e) = self.shared.vram.zero(0, len.min(vram)) {
                        tracing::warn!(error = %e, "mbochs: cannot clear VRAM");
                    }
                }
                tracing::debug!(?m, "mbochs: display enabled");
            }
            i if i < index::COUNT => {
                st.dispi[i] = v;
                // A new start or line length while enabled takes effect at once (a
                // driver pans this way); the rest is checked again.
                if st.mode.is_some() {
                    let m = Mode::fixup(&st.dispi, vram);
                    m.store(&mut st.dispi);
                    st.mode = Some(m);
                }
            }
            _ => {}
        }
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = match at {
                a if a < regs::EDID_END => self
                    .shared
                    .edid
                    .get(usize::try_from(a).unwrap_or(usize::MAX))
                    .copied()
                    .unwrap_or(0),
                // Input status 1 (0x3da): no retrace to wait for.
                a if a == regs::VGA + 0x1a => 0,
                a if (regs::VGA..regs::VGA_END).contains(&a) => {
                    self.shared.state().vga[usize::try_from(a - regs::VGA).unwrap_or(0)]
                }
                a if (regs::DISPI..regs::DISPI + 2 * index::COUNT as u64).contains(&a) => {
                    let r = usize::try_from((a - regs::DISPI) / 2).unwrap_or(usize::MAX);
                    self.dispi_read(r).to_le_bytes()[usize::from((a - regs::DISPI) % 2 == 1)]
                }
                a if (regs::QEXT..regs::QEXT + 4).contains(&a) => {
                    8u32.to_le_bytes()[usize::try_from(a - regs::QEXT).unwrap_or(0)]
                }
                a if (regs::QEXT + 4..regs::QEXT_END).contains(&a) => {
                    self.shared.state().endian.to_le_bytes()
                        [usize::try_from(a - regs::QEXT - 4).unwrap_or(0)]
                }
                _ => 0,
            };
        }
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        if (regs::VGA..regs::VGA_END).contains(&offset) {
            let mut st = self.shared.state();
            for (i, b) in data.iter().enumerate() {
                if let Some(p) = usize::try_from(offset - regs::VGA)
                    .ok()
                    .and_then(|o| st.vga.get_mut(o + i))
                {
                    *p = *b;
                }
            }
        } else if (regs::DISPI..regs::DISPI + 2 * index::COUNT as u64).contains(&offset)
            && offset % 2 == 0
            && data.len() == 2
        {
            let r = usize::try_from((offset - regs::DISPI) / 2).unwrap_or(usize::MAX);
            self.dispi_write(r, u16::from_le_bytes([data[0], data[1]]));
        } else if offset == regs::QEXT + 4 && data.len() == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            if v != regs::LITTLE_ENDIAN {
                tracing::info!(
                    value = v,
                    "mbochs: only a little-endian framebuffer is offered"
                );
            }
            self.shared.state().endian = regs::LITTLE_ENDIAN;
        } else {
            tracing::debug!(offset, len = data.len(), "mbochs: register write ignored");
        }
    }
}

/// Fields of the migration state and of VRAM chunks.
mod tag {
    pub const DISPI: u16 = 1;
    pub const VGA: u16 = 2;
    pub const ENDIAN: u16 = 3;
    pub const VRAM_SIZE: u16 = 4;
    /// A live upgrade's VRAM memory object (its fd's index).
    pub const VRAM_FD: u16 = 5;
    pub const OFFSET: u16 = 10;
    pub const DATA: u16 = 11;
    pub const ZEROES: u16 = 12;
}

impl PciDevice for Mbochs {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        match bar.get() {
            // A client that did not map VRAM reaches it this way.
            0 => self.shared.vram.read(offset, data),
            _ => {
                self.mmio_read(offset, data);
                Ok(())
            }
        }
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), Errno> {
        match bar.get() {
            0 => self.shared.vram.write(offset, data),
            _ => {
                self.mmio_write(offset, data);
                Ok(())
            }
        }
    }

    fn reset(&mut self) -> Result<(), Errno> {
        let size = self.shared.vram.size();
        *self.shared.state() = Shared::power_on(size);
        Ok(())
    }

    fn close(&mut self) {
        // The next client gets VRAM in a memory object this one never mapped.
        self.shared.state().copy = None;
        if let Err(e) = self.shared.vram.renew() {
            tracing::error!(error = %e, "mbochs: cannot move VRAM to a fresh memory object");
        }
    }

    fn bar_memory(&self, bar: BarIndex) -> Option<Arc<OwnedFd>> {
        (bar.get() == 0).then(|| self.shared.vram.fd())
    }

    fn display_plane(&mut self) -> Result<DisplayPlane, Errno> {
        let Some(m) = self.shared.state().mode else {
            return Err(Errno::NODATA);
        };
        let code = match m.bpp {
            32 => *b"XR24",
            24 => *b"RG24",
            16 => *b"RG16",
            15 => *b"XR15",
            _ => {
                tracing::info!(bpp = m.bpp, "mbochs: a palette mode has no plane to show");
                return Err(Errno::NOTSUP);
            }
        };
        Ok(DisplayPlane {
            fourcc: fourcc(code),
            width: u32::from(m.xres),
            height: u32::from(m.yres),
            stride: u32::try_from(m.stride()).map_err(|_| Errno::INVAL)?,
            offset: m.offset(),
            memory: self.shared.vram.fd(),
        })
    }

    fn migration(&self) -> Option<MigrationSpec> {
        Some(MigrationSpec {
            device_type: "mbochs".into(),
            version: 1,
            min_version: 1,
            flags: umdev_pci::migration::PRE_COPY,
        })
    }

    fn set_running(&mut self, running: bool) -> Result<(), Errno> {
        if running {
            // Running again here: a copy in progress was abandoned.
            self.shared.state().copy = None;
        }
        Ok(())
    }

    fn save(&mut self, w: &mut StateWriter) -> Result<(), Errno> {
        let st = self.shared.state();
        let dispi: Vec<u8> = st.dispi.iter().flat_map(|r| r.to_le_bytes()).collect();
        w.bytes(tag::DISPI, &dispi)
            .bytes(tag::VGA, &st.vga)
            .u32(tag::ENDIAN, st.endian)
            .u64(tag::VRAM_SIZE, self.shared.vram.size());
        Ok(())
    }

    /// A live upgrade: the registers as a migration saves them, and the VRAM memory
    /// object itself (the client has it mapped as BAR0).
    fn hand_over(&mut self, w: &mut StateWriter, fds: &mut Vec<OwnedFd>) -> Result<(), Errno> {
        self.save(w)?;
        let fd = self
            .shared
            .vram
            .fd()
            .try_clone()
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
        w.u32(tag::VRAM_FD, umdev_pci::push_fd(fds, fd));
        Ok(())
    }

    fn take_over(
        &mut self,
        r: &StateReader<'_>,
        fds: &mut umdev_pci::HandedFds,
    ) -> Result<(), Errno> {
        let fd = fds.take(r.u32(tag::VRAM_FD)?)?;
        self.shared.vram.adopt(fd)?;
        self.load(1, r)
    }

    fn load(&mut self, _version: u32, r: &StateReader<'_>) -> Result<(), Errno> {
        let bad = |_| Errno::INVAL;
        let size = r.u64(tag::VRAM_SIZE).map_err(bad)?;
        if size != self.shared.vram.size() {
            tracing::warn!(
                theirs = size,
                ours = self.shared.vram.size(),
                "mbochs: incoming state of a display with another VRAM size"
            );
            return Err(Errno::INVAL);
        }
        let raw = r.bytes(tag::DISPI).map_err(bad)?;
        let vga = r.bytes(tag::VGA).map_err(bad)?;
        if raw.len() != 2 * index::COUNT || vga.len() != 0x20 {
            return Err(Errno::INVAL);
        }
        let endian = r.u32(tag::ENDIAN).map_err(bad)?;
        let mut dispi = [0u16; index::COUNT];
        for (d, b) in dispi.iter_mut().zip(raw.chunks_exact(2)) {
            *d = u16::from_le_bytes([b[0], b[1]]);
        }
        dispi[index::VIDEO_MEMORY_64K] = u16::try_from(size >> 16).unwrap_or(u16::MAX);
        let mut st = self.shared.state();
        st.mode = (dispi[index::ENABLE] & regs::ENABLED != 0).then(|| {
            let m = Mode::fixup(&dispi, size);
            m.store(&mut dispi);
            m
        });
        st.dispi = dispi;
        st.vga.copy_from_slice(vga);
        st.endian = endian;
        Ok(())
    }

    /// VRAM in 64 KiB blocks: every block in the first pass, then the blocks that differ
    /// from what was sent (each pass compares VRAM with a copy of what went: a client
    /// writes VRAM through its own mapping, which nothing here can watch).
    fn save_chunk(
        &mut self,
        first: bool,
        _budget: usize,
        chunk: &mut StateWriter,
    ) -> Result<bool, Errno> {
        let size = self.shared.vram.size();
        let blocks = size.div_ceil(BLOCK);
        let mut st = self.shared.state();
        if first || st.copy.is_none() {
            st.copy = Some(Copy {
                sent: vec![0; usize::try_from(size).map_err(|_| Errno::NOMEM)?],
                unsent: vec![true; usize::try_from(blocks).unwrap_or(0)],
                cursor: 0,
            });
        }
        let Some(copy) = st.copy.as_mut() else {
            return Ok(false);
        };
        let mut buf = vec![0u8; usize::try_from(BLOCK).unwrap_or(0)];
        while copy.cursor < blocks {
            let b = usize::try_from(copy.cursor).unwrap_or(usize::MAX);
            let off = copy.cursor * BLOCK;
            copy.cursor += 1;
            let len = usize::try_from(BLOCK.min(size - off)).unwrap_or(0);
            self.shared.vram.read(off, &mut buf[..len])?;
            let start = usize::try_from(off).unwrap_or(usize::MAX);
            let was = &mut copy.sent[start..start + len];
            if !copy.unsent[b] && was == &buf[..len] {
                continue;
            }
            copy.unsent[b] = false;
            was.copy_from_slice(&buf[..len]);
            chunk.u64(tag::OFFSET, off);
            if buf[..len].iter().all(|&x| x == 0) {
                chunk.u64(tag::ZEROES, len as u64);
            } else {
                chunk.bytes(tag::DATA, &buf[..len]);
            }
            return Ok(true);
        }
        copy.cursor = 0;
        Ok(false)
    }

    fn load_chunk(&mut self, _version: u32, chunk: &StateReader<'_>) -> Result<(), Errno> {
        let vram = &self.shared.vram;
        let offset = chunk.u64(tag::OFFSET).map_err(|_| Errno::INVAL)?;
        let data = chunk.get(tag::DATA);
        let len = match data {
            Some(d) => d.len() as u64,
            None => chunk.u64(tag::ZEROES).map_err(|_| Errno::INVAL)?,
        };
        if offset.checked_add(len).is_none_or(|end| end > vram.size()) {
            tracing::warn!(offset, len, "mbochs: an incoming VRAM block past the end");
            return Err(Errno::INVAL);
        }
        match data {
            Some(d) => vram.write(offset, d),
            None => vram.zero(offset, len),
        }
    }

    fn data_pending(&self) -> u64 {
        let st = self.shared.state();
        st.copy.as_ref().map_or(self.shared.vram.size(), |c| {
            c.unsent.iter().filter(|u| **u).count() as u64 * BLOCK
        })
    }
}
