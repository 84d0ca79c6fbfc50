//! `umdevctl screenshot`: a display device's scan-out as PNG, through the daemon's
//! display-plane query (format, size, stride, offset and the memory's fd), so nothing here
//! knows which driver made the display.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use umdev_api::control::PlaneInfo;
use umdev_api::{Client, Request, Response};

/// DRM fourcc codes of the formats understood here.
const XR24: u32 = u32::from_le_bytes(*b"XR24");
const AR24: u32 = u32::from_le_bytes(*b"AR24");
const XB24: u32 = u32::from_le_bytes(*b"XB24");
const RG24: u32 = u32::from_le_bytes(*b"RG24");
const BG24: u32 = u32::from_le_bytes(*b"BG24");
const RG16: u32 = u32::from_le_bytes(*b"RG16");
const XR15: u32 = u32::from_le_bytes(*b"XR15");

/// Bytes per pixel of a format, or `None` for one this tool cannot read.
fn bytes_per_pixel(fourcc: u32) -> Option<usize> {
    match fourcc {
        XR24 | AR24 | XB24 => Some(4),
        RG24 | BG24 => Some(3),
        RG16 | XR15 => Some(2),
        _ => None,
    }
}

/// One pixel of `fourcc` (little-endian, as DRM formats are) as RGB.
// The channel arithmetic keeps every value below 256 (5- and 6-bit fields widened to 8).
#[allow(clippy::cast_possible_truncation)]
fn rgb(fourcc: u32, p: &[u8]) -> [u8; 3] {
    let expand5 = |v: u16| (((v & 0x1f) << 3) | ((v & 0x1f) >> 2)) as u8;
    match fourcc {
        // XRGB8888 / ARGB8888: B, G, R, X in memory.
        XR24 | AR24 | RG24 => [p[2], p[1], p[0]],
        // XBGR8888 / BGR888: R, G, B in memory.
        XB24 | BG24 => [p[0], p[1], p[2]],
        RG16 => {
            let v = u16::from_le_bytes([p[0], p[1]]);
            let g = (v >> 5) & 0x3f;
            [
                expand5(v >> 11),
                ((g << 2) | (g >> 4)) as u8,
                expand5(v & 0x1f),
            ]
        }
        // XRGB1555.
        _ => {
            let v = u16::from_le_bytes([p[0], p[1]]);
            [
                expand5((v >> 10) & 0x1f),
                expand5((v >> 5) & 0x1f),
                expand5(v & 0x1f),
            ]
        }
    }
}

/// The visible pixels of `plane` as packed RGB rows.
pub fn to_rgb(plane: &PlaneInfo, memory: &File) -> Result<Vec<u8>> {
    let bpp = bytes_per_pixel(plane.fourcc).with_context(|| {
        let code = plane.fourcc.to_le_bytes();
        format!(
            "the display's pixel format {:?} ({:#x}) is not one umdevctl can read",
            String::from_utf8_lossy(&code),
            plane.fourcc
        )
    })?;
    let (w, h, stride) = (
        plane.width as usize,
        plane.height as usize,
        plane.stride as usize,
    );
    if w == 0 || h == 0 || stride < w * bpp {
        bail!("the display reports an impossible plane: {w}x{h}, stride {stride}");
    }
    let mut raw = vec![0u8; stride * h];
    memory
        .read_exact_at(&mut raw, plane.offset)
        .context("reading the display's memory")?;
    let mut out = Vec::with_capacity(w * h * 3);
    for row in raw.chunks_exact(stride) {
        for px in row[..w * bpp].chunks_exact(bpp) {
            out.extend_from_slice(&rgb(plane.fourcc, px));
        }
    }
    Ok(out)
}

/// Encodes packed RGB rows as a PNG.
pub fn encode(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    let mut enc = png::Encoder::new(&mut png, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fast);
    let mut w = enc.write_header().context("encoding the PNG")?;
    w.write_image_data(rgb).context("encoding the PNG")?;
    w.finish().context("encoding the PNG")?;
    Ok(png)
}

/// Queries the plane and writes one PNG to `out` (through a temporary file, so a reader
/// never sees half a picture).
fn once(client: &Client, uuid: &str, out: &Path) -> Result<()> {
    let req = Request::DisplayPlane {
        uuid: uuid.to_owned(),
    };
    let (resp, mut fds) = client.call_with_fds(&req)?;
    let plane = match resp {
        Response::Plane { plane } => plane,
        // ENODATA: the display is off.
        Response::Error { errno: 61, .. } => {
            bail!("the display of {uuid} is disabled (the guest has not set a mode): no screenshot written")
        }
        Response::Error { errno: 95, .. } => bail!("{uuid} is not a display device"),
        Response::Error { message, .. } => bail!("{message}"),
        _ => bail!("unexpected answer"),
    };
    let fd = fds.pop().context("umdevd sent no memory with the plane")?;
    let rgb = to_rgb(&plane, &File::from(fd))?;
    let png = encode(plane.width, plane.height, &rgb)?;
    let tmp = out.with_extension("png.tmp");
    std::fs::write(&tmp, &png).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// `umdevctl screenshot UUID OUT [--watch SECONDS]`.
pub fn run(client: &Client, uuid: &str, out: &Path, watch: Option<f64>) -> Result<()> {
    let Some(period) = watch else {
        return once(client, uuid, out);
    };
    if !(period.is_finite() && period > 0.0) {
        bail!("--watch takes a positive number of seconds");
    }
    let period = Duration::from_secs_f64(period);
    loop {
        // A display that goes off for a while (a mode change) is waited for, not fatal.
        if let Err(e) = once(client, uuid, out) {
            eprintln!("umdevctl: {e:#}");
        }
        std::thread::sleep(period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_decode_to_rgb() {
        assert_eq!(rgb(XR24, &[1, 2, 3, 0]), [3, 2, 1]);
        assert_eq!(rgb(BG24, &[1, 2, 3]), [1, 2, 3]);
        assert_eq!(rgb(RG16, &0xf800u16.to_le_bytes()), [255, 0, 0]);
        assert_eq!(rgb(RG16, &0x07e0u16.to_le_bytes()), [0, 255, 0]);
        assert_eq!(rgb(XR15, &0x001fu16.to_le_bytes()), [0, 0, 255]);
    }

    #[test]
    fn a_plane_with_padding_and_offset_is_cropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fb");
        // 2x2 XRGB8888 with a 12-byte stride, after 8 bytes of something else.
        let mut mem = vec![0xeeu8; 8];
        mem.extend_from_slice(&[1, 2, 3, 0, 4, 5, 6, 0, 9, 9, 9, 9]);
        mem.extend_from_slice(&[7, 8, 9, 0, 10, 11, 12, 0, 9, 9, 9, 9]);
        std::fs::write(&p, &mem).unwrap();
        let plane = PlaneInfo {
            fourcc: XR24,
            width: 2,
            height: 2,
            stride: 12,
            offset: 8,
        };
        let rgb = to_rgb(&plane, &File::open(&p).unwrap()).unwrap();
        assert_eq!(rgb, [3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]);
        let png = encode(2, 2, &rgb).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
