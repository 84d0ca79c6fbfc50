//! The Bochs display's registers as QEMU's stdvga lays them out in its MMIO BAR (BAR2), which
//! is where Linux's `bochs` DRM driver looks for them:
//!
//! | BAR2 offset | what |
//! |---|---|
//! | 0x000..0x400 | EDID (read-only; one 128-byte block here) |
//! | 0x400..0x420 | the VGA I/O ports 0x3c0..0x3df, one byte each |
//! | 0x500..0x516 | the Bochs "dispi" registers, 16 bits each, index `i` at `0x500 + 2i` |
//! | 0x600..0x608 | QEMU's extension: its size (8) and the framebuffer byte order |
//!
//! A mode is checked the way QEMU's model fixes it up when the display is enabled: a depth
//! it knows, widths multiple of 8, and a visible window (resolution at the x/y offset in the
//! virtual width) that fits in VRAM; the registers then read back what is used, and nothing
//! outside VRAM is ever shown or cleared.

/// Start of the EDID block.
pub const EDID: u64 = 0x000;
/// End of the EDID window.
pub const EDID_END: u64 = 0x400;
/// VGA port 0x3c0 in BAR2.
pub const VGA: u64 = 0x400;
/// End of the VGA window.
pub const VGA_END: u64 = 0x420;
/// Dispi register 0 in BAR2.
pub const DISPI: u64 = 0x500;
/// QEMU extension registers.
pub const QEXT: u64 = 0x600;
/// End of the extension registers.
pub const QEXT_END: u64 = 0x608;
/// Size of BAR2.
pub const MMIO_SIZE: u64 = 4096;

/// Dispi register indexes.
pub mod index {
    /// Interface id (0xB0C0..=0xB0C5).
    pub const ID: usize = 0;
    /// Horizontal resolution.
    pub const XRES: usize = 1;
    /// Vertical resolution.
    pub const YRES: usize = 2;
    /// Bits per pixel.
    pub const BPP: usize = 3;
    /// Enable bits.
    pub const ENABLE: usize = 4;
    /// Bank (banked VGA window; unused with the linear framebuffer).
    pub const BANK: usize = 5;
    /// Virtual width in pixels (the line length).
    pub const VIRT_WIDTH: usize = 6;
    /// Virtual height in lines.
    pub const VIRT_HEIGHT: usize = 7;
    /// First visible column.
    pub const X_OFFSET: usize = 8;
    /// First visible line.
    pub const Y_OFFSET: usize = 9;
    /// VRAM size in 64 KiB units (read-only).
    pub const VIDEO_MEMORY_64K: usize = 10;
    /// Number of registers.
    pub const COUNT: usize = 11;
}

/// The interface version reported (the newest Bochs one).
pub const ID5: u16 = 0xb0c5;
/// ENABLE: the display is on.
pub const ENABLED: u16 = 0x01;
/// ENABLE: report capabilities instead of the current mode on reads of XRES/YRES/BPP.
pub const GETCAPS: u16 = 0x02;
/// ENABLE: the linear framebuffer is used.
pub const LFB_ENABLED: u16 = 0x40;
/// ENABLE: do not clear the visible memory when enabling.
pub const NOCLEARMEM: u16 = 0x80;
/// Largest resolution the model takes.
pub const MAX_XRES: u16 = 16000;
/// Largest vertical resolution.
pub const MAX_YRES: u16 = 12000;
/// Framebuffer byte order value for little endian (QEXT + 4).
pub const LITTLE_ENDIAN: u32 = 0x1e1e_1e1e;

/// Bytes per pixel of a depth, `None` for one the model refuses.
pub fn bytes_per_pixel(bpp: u16) -> Option<u64> {
    match bpp {
        8 => Some(1),
        15 | 16 => Some(2),
        24 => Some(3),
        32 => Some(4),
        _ => None,
    }
}

/// The mode in use once the display is enabled: every register fixed up to fit `vram`
/// bytes. What is shown is `yres` lines of `xres` pixels starting `y_offset` lines and
/// `x_offset` pixels into a framebuffer `virt_width` pixels wide at the start of VRAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    /// Depth.
    pub bpp: u16,
    /// Visible width.
    pub xres: u16,
    /// Visible height.
    pub yres: u16,
    /// Line length in pixels.
    pub virt_width: u16,
    /// Lines that fit.
    pub virt_height: u16,
    /// First visible column.
    pub x_offset: u16,
    /// First visible line.
    pub y_offset: u16,
}

impl Mode {
    /// Bytes per line.
    pub fn stride(&self) -> u64 {
        u64::from(self.virt_width) * bytes_per_pixel(self.bpp).unwrap_or(1)
    }

    /// Offset in VRAM of the first visible pixel.
    pub fn offset(&self) -> u64 {
        u64::from(self.y_offset) * self.stride()
            + u64::from(self.x_offset) * bytes_per_pixel(self.bpp).unwrap_or(1)
    }

    /// The first byte after the visible window.
    pub fn end(&self) -> u64 {
        self.offset()
            + (u64::from(self.yres).saturating_sub(1)) * self.stride()
            + u64::from(self.xres) * bytes_per_pixel(self.bpp).unwrap_or(1)
    }

    /// Fixes the registers up as the model does when the display is enabled: an unknown
    /// depth becomes 8, widths are multiples of 8 (at least 8), the resolution is capped and
    /// shrunk to what `vram` holds at that line length, and the offsets are clamped so the
    /// visible window stays inside the virtual framebuffer.
    pub fn fixup(r: &[u16; index::COUNT], vram: u64) -> Mode {
        let bpp = if bytes_per_pixel(r[index::BPP]).is_some() {
            r[index::BPP]
        } else {
            8
        };
        let bytes = bytes_per_pixel(bpp).unwrap_or(1);
        let align = |v: u16| (v & !7).max(8);
        let mut xres = align(r[index::XRES].min(MAX_XRES));
        // The longest line that still leaves one whole line in VRAM.
        let max_width = u16::try_from((vram / bytes).min(u64::from(MAX_XRES))).unwrap_or(MAX_XRES);
        let max_width = align(max_width);
        xres = xres.min(max_width);
        let virt_width = align(r[index::VIRT_WIDTH].max(xres)).min(max_width);
        let line = u64::from(virt_width) * bytes;
        let max_lines = u16::try_from((vram / line).min(u64::from(u16::MAX))).unwrap_or(u16::MAX);
        let yres = r[index::YRES].clamp(1, MAX_YRES).min(max_lines);
        let virt_height = r[index::VIRT_HEIGHT].clamp(yres, max_lines);
        let x_offset = r[index::X_OFFSET].min(virt_width - xres);
        let y_offset = r[index::Y_OFFSET].min(virt_height - yres);
        Mode {
            bpp,
            xres,
            yres,
            virt_width,
            virt_height,
            x_offset,
            y_offset,
        }
    }

    /// Writes the mode back into the registers (what a driver reads back).
    pub fn store(&self, r: &mut [u16; index::COUNT]) {
        r[index::BPP] = self.bpp;
        r[index::XRES] = self.xres;
        r[index::YRES] = self.yres;
        r[index::VIRT_WIDTH] = self.virt_width;
        r[index::VIRT_HEIGHT] = self.virt_height;
        r[index::X_OFFSET] = self.x_offset;
        r[index::Y_OFFSET] = self.y_offset;
    }
}

/// A 128-byte EDID 1.4 block naming the display `name` (at most 13 characters), with
/// 1024x768 at 60 Hz (the VESA DMT timing, 65 MHz) as its preferred mode and 640x480,
/// 800x600 and 1024x768 among its established modes.
pub fn edid(name: &str, serial: u32) -> [u8; 128] {
    let mut e = [0u8; 128];
    e[0..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "UMD" as three 5-bit letters, product 0x0001, serial, week 1 of 2026.
    let letter = |c: u8| u16::from(c - b'A' + 1);
    let mfg = (letter(b'U') << 10) | (letter(b'M') << 5) | letter(b'D');
    e[8..10].copy_from_slice(&mfg.to_be_bytes());
    e[10..12].copy_from_slice(&1u16.to_le_bytes());
    e[12..16].copy_from_slice(&serial.to_le_bytes());
    e[16] = 1;
    e[17] = 36; // 2026 - 1990
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital input, 8 bits per colour, DisplayPort
    e[21] = 32; // 32 x 24 cm
    e[22] = 24;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // RGB colour, preferred timing is native
                  // Chromaticity: the sRGB primaries, rounded.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // Established timings: 640x480@60, 800x600@60, 1024x768@60.
    e[35] = 0x21;
    e[36] = 0x08;
    // No standard timings.
    for i in 0..8 {
        e[38 + 2 * i] = 0x01;
        e[39 + 2 * i] = 0x01;
    }
    // Detailed timing 1: 1024x768, 65 MHz; h blank 320 (front 24, sync 136), v blank 38
    // (front 3, sync 6); 320 x 240 mm; negative syncs.
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&6500u16.to_le_bytes());
    d[2] = 0x00; // h active 1024 (low 8 bits)
    d[3] = 0x40; // h blank 320 (low 8 bits)
    d[4] = 0x41; // high nibbles: active 4, blank 1
    d[5] = 0x00; // v active 768 (low 8)
    d[6] = 0x26; // v blank 38
    d[7] = 0x30; // high nibbles: active 3, blank 0
    d[8] = 24; // h front porch
    d[9] = 136; // h sync
    d[10] = 0x36; // v front 3, v sync 6
    d[11] = 0x00;
    d[12] = 0x40; // 320 mm (low 8)
    d[13] = 0xf0; // 240 mm (low 8)
    d[14] = 0x10; // high nibbles: 1, 0
    d[15] = 0;
    d[16] = 0;
    d[17] = 0x18; // digital separate sync, both negative
                  // Descriptor 2: the monitor's name.
    let n = &mut e[72..90];
    n[3] = 0xfc;
    let mut text = [b' '; 13];
    let bytes = name.as_bytes();
    let len = bytes.len().min(12);
    text[..len].copy_from_slice(&bytes[..len]);
    text[len] = b'\n';
    n[5..18].copy_from_slice(&text);
    // Descriptor 3: range limits 50-75 Hz vertical, 30-70 kHz horizontal, 80 MHz.
    let r = &mut e[90..108];
    r[3] = 0xfd;
    r[5..10].copy_from_slice(&[50, 75, 30, 70, 8]);
    r[10] = 0x00;
    r[11] = 0x0a;
    r[12..18].fill(0x20);
    // Descriptor 4: a dummy.
    e[108 + 3] = 0x10;
    e[126] = 0; // no extension blocks
    let sum = e[..127].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(bpp: u16, x: u16, y: u16, vw: u16, vh: u16, xo: u16, yo: u16) -> [u16; index::COUNT] {
        let mut r = [0u16; index::COUNT];
        r[index::BPP] = bpp;
        r[index::XRES] = x;
        r[index::YRES] = y;
        r[index::VIRT_WIDTH] = vw;
        r[index::VIRT_HEIGHT] = vh;
        r[index::X_OFFSET] = xo;
        r[index::Y_OFFSET] = yo;
        r
    }

    #[test]
    fn a_mode_that_fits_is_kept() {
        let m = Mode::fixup(&regs(32, 1024, 768, 1024, 1536, 0, 100), 16 << 20);
        assert_eq!(
            m,
            Mode {
                bpp: 32,
                xres: 1024,
                yres: 768,
                virt_width: 1024,
                virt_height: 1536,
                x_offset: 0,
                y_offset: 100
            }
        );
        assert_eq!(m.stride(), 4096);
        assert_eq!(m.offset(), 100 * 4096);
        assert!(m.end() <= 16 << 20);
    }

    #[test]
    fn every_mode_stays_inside_vram() {
        let vram = 4u64 << 20;
        for bpp in [0, 4, 8, 15, 16, 24, 32, 33] {
            for x in [0, 7, 640, 1920, 16001, 65535] {
                for y in [0, 480, 1080, 12001, 65535] {
                    for o in [0, 1, 5000, 65535] {
                        let m = Mode::fixup(&regs(bpp, x, y, x.wrapping_add(o), o, o, o), vram);
                        assert!(m.end() <= vram, "{m:?}");
                        assert!(m.xres % 8 == 0 && m.virt_width >= m.xres && m.yres >= 1);
                        assert!(m.y_offset + m.yres <= m.virt_height);
                    }
                }
            }
        }
        assert_eq!(Mode::fixup(&regs(4, 640, 480, 0, 0, 0, 0), vram).bpp, 8);
        // 1920x1080x32 does not fit in 4 MiB: the lines that fit are shown.
        let m = Mode::fixup(&regs(32, 1920, 1080, 1920, 1080, 0, 0), vram);
        assert_eq!((m.xres, m.yres), (1920, 546));
    }

    #[test]
    fn the_edid_block_checks_out() {
        let e = edid("umdev mbochs", 7);
        assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(&e[77..90], b"umdev mbochs\n");
        assert_eq!(u16::from_le_bytes([e[54], e[55]]), 6500);
    }
}
