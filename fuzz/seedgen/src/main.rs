//! Writes the seed corpora of the fuzz targets: `umdev-fuzz-seedgen OUT_DIR` fills
//! `OUT_DIR/<target>/` with one `seed-*` file per seed, for every target.
//!
//! The seeds are built with the codec and the crates themselves rather than kept as binary
//! files, so they follow the protocol and the APIs as they change. Each target's seeds match
//! its device and input format: `session` here (mode byte, raw stream, `FD!\n` markers),
//! the others in a module of their own. The `handover` seeds are packages of a real server,
//! paused on a socket in a temporary directory.

mod config_space;
mod control;
mod handover;
mod nvme;
mod sysfs;

use std::path::Path;

use umdev_proto::{wire, Capabilities, Command, Header};
use zerocopy::IntoBytes;

/// Must match `fuzz_targets/session.rs` and the `ToyDevice` of `fuzz_targets/common.rs`.
const FD_MARK: &[u8] = b"FD!\n";
const REG_DMA_READ: u64 = 0x100;
const REG_DMA_WRITE: u64 = 0x108;
const REG_IRQ: u64 = 0x110;
const DMA_LEN: usize = 64;
/// Region indexes, as in `umdev-pci`.
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const BAR4: u32 = 4;
const CONFIG: u32 = 7;
/// IRQ indexes.
const INTX: u32 = 0;
const MSI: u32 = 1;
const MSIX: u32 = 2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args_os()
        .nth(1)
        .ok_or("usage: umdev-fuzz-seedgen OUT_DIR")?;
    let out = Path::new(&out);
    let tmp = std::env::temp_dir().join(format!("umdev-seedgen-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let handover = handover::seeds(&tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    let counts = [
        write_all(out, "codec", &codec_seeds())?,
        write_all(out, "session", &session_seeds())?,
        write_all(out, "config_space", &config_space::seeds())?,
        write_all(out, "handover", &handover?)?,
        write_all(out, "control", &control::seeds())?,
        write_all(out, "sysfs", &sysfs::seeds())?,
        write_all(out, "nvme", &nvme::seeds())?,
    ];
    println!("wrote {} under {}", counts.join(", "), out.display());
    Ok(())
}

/// Writes `out/<target>/seed-<name>` for each seed; says how many.
fn write_all(
    out: &Path,
    target: &str,
    seeds: &[(impl AsRef<str>, Vec<u8>)],
) -> std::io::Result<String> {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{}", name.as_ref())), bytes)?;
    }
    Ok(format!("{} {target}", seeds.len()))
}

/// A message stream under construction, with message ids counting up.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    next_id: u16,
}

impl Stream {
    fn msg(&mut self, command: Command, parts: &[&[u8]]) -> &mut Self {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.raw_msg(id, command as u16, 0, parts)
    }

    fn raw_msg(&mut self, id: u16, command: u16, flags: u32, parts: &[&[u8]]) -> &mut Self {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let mut header = Header::command(id, Command::Version, body).expect("a small message");
        header.command = command;
        header.flags = flags;
        self.bytes
            .extend_from_slice(&umdev_proto::encode(&header, parts));
        self
    }

    /// The next message carries a memfd.
    fn fd(&mut self) -> &mut Self {
        self.bytes.extend_from_slice(FD_MARK);
        self
    }

    fn read(&mut self, region: u32, offset: u64, count: u32) -> &mut Self {
        let a = wire::RegionAccess {
            offset,
            region,
            count,
        };
        self.msg(Command::RegionRead, &[a.as_bytes()])
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> &mut Self {
        let a = wire::RegionAccess {
            offset,
            region,
            count: u32::try_from(data.len()).expect("a small write"),
        };
        self.msg(Command::RegionWrite, &[a.as_bytes(), data])
    }

    fn dma_map(&mut self, address: u64, size: u64, flags: u32) -> &mut Self {
        let m = wire::DmaMap {
            argsz: wire::argsz::<wire::DmaMap>(),
            flags,
            offset: 0,
            address,
            size,
        };
        self.msg(Command::DmaMap, &[m.as_bytes()])
    }

    fn dma_unmap(&mut self, address: u64, size: u64, flags: u32) -> &mut Self {
        let m = wire::DmaUnmap {
            argsz: wire::argsz::<wire::DmaUnmap>(),
            flags,
            address,
            size,
        };
        self.msg(Command::DmaUnmap, &[m.as_bytes()])
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        data: &[u8],
    ) -> &mut Self {
        let s = wire::IrqSet {
            argsz: wire::argsz::<wire::IrqSet>()
                + u32::try_from(data.len()).expect("a small bool array"),
            flags,
            index,
            start,
            count,
        };
        self.msg(Command::DeviceSetIrqs, &[s.as_bytes(), data])
    }

    /// The client's reply to the server's DMA request `id`.
    fn dma_reply(&mut self, id: u16, command: Command, address: u64, data: &[u8]) -> &mut Self {
        let a = wire::DmaAccess {
            address,
            count: DMA_LEN as u64,
        };
        self.raw_msg(
            id,
            command as u16,
            umdev_proto::FLAG_TYPE_REPLY,
            &[a.as_bytes(), data],
        )
    }

    /// A session seed: mode byte, then the stream.
    fn seed(&self, mode: u8) -> Vec<u8> {
        let mut v = vec![mode];
        v.extend_from_slice(&self.bytes);
        v
    }
}

fn version_body(caps: &Capabilities) -> Vec<u8> {
    let mut body = wire::Version { major: 0, minor: 1 }.as_bytes().to_vec();
    body.extend_from_slice(&caps.to_wire());
    body
}

fn qemu_caps() -> Capabilities {
    Capabilities {
        max_msg_fds: Some(16),
        max_data_xfer_size: Some(1 << 20),
        max_dma_maps: Some(65535),
        pgsizes: Some(4096),
        migration: Some(umdev_proto::MigrationCaps {
            pgsize: Some(4096),
            max_bitmap_size: Some(256 << 20),
        }),
        write_multiple: Some(true),
        twin_socket: None,
    }
}

fn codec_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let one = |f: &dyn Fn(&mut Stream)| {
        let mut s = Stream::default();
        f(&mut s);
        s.bytes
    };
    vec![
        (
            "version-qemu",
            one(&|s| {
                s.msg(Command::Version, &[&version_body(&qemu_caps())]);
            }),
        ),
        (
            "version-empty",
            one(&|s| {
                s.msg(
                    Command::Version,
                    &[wire::Version { major: 0, minor: 0 }.as_bytes()],
                );
            }),
        ),
        (
            "version-twin",
            one(&|s| {
                let text = b"{\"capabilities\":{\"twin_socket\":{\"supported\":true},\"max_msg_fds\":1,\"migration\":{\"pgsize\":4096}}}\0";
                s.msg(
                    Command::Version,
                    &[wire::Version { major: 0, minor: 1 }.as_bytes(), text],
                );
            }),
        ),
        (
            "dma-map",
            one(&|s| {
                s.dma_map(
                    0x10000,
                    0x10000,
                    wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE,
                );
            }),
        ),
        (
            "dma-unmap-all",
            one(&|s| {
                s.dma_unmap(0, 0, wire::DMA_UNMAP_FLAG_ALL);
            }),
        ),
        (
            "region-read",
            one(&|s| {
                s.read(CONFIG, 0, 64);
            }),
        ),
        (
            "region-write",
            one(&|s| {
                s.write(BAR0, 8, &[1, 2, 3, 4]);
            }),
        ),
        (
            "set-irqs-bool",
            one(&|s| {
                s.set_irqs(
                    MSIX,
                    wire::IRQ_SET_DATA_BOOL | wire::IRQ_SET_ACTION_TRIGGER,
                    0,
                    2,
                    &[1, 0],
                );
            }),
        ),
        (
            "region-info-reply",
            one(&|s| {
                let r = wire::RegionInfo {
                    argsz: 80,
                    flags: wire::REGION_INFO_FLAG_READ | wire::REGION_INFO_FLAG_CAPS,
                    index: BAR2,
                    cap_offset: 32,
                    size: 4096,
                    offset: 0,
                };
                let cap = wire::SparseMmap {
                    header: wire::CapHeader {
                        id: wire::REGION_INFO_CAP_SPARSE_MMAP,
                        version: 1,
                        next: 0,
                    },
                    nr_areas: 2,
                    reserved: 0,
                };
                let a = wire::SparseMmapArea {
                    offset: 0,
                    size: 0x800,
                };
                s.raw_msg(
                    3,
                    Command::DeviceGetRegionInfo as u16,
                    umdev_proto::FLAG_TYPE_REPLY,
                    &[r.as_bytes(), cap.as_bytes(), a.as_bytes(), a.as_bytes()],
                );
            }),
        ),
        (
            "write-multi",
            one(&|s| {
                write_multi(s);
            }),
        ),
        (
            "error-reply",
            one(&|s| {
                s.raw_msg(
                    9,
                    Command::DmaRead as u16,
                    umdev_proto::FLAG_TYPE_REPLY | umdev_proto::FLAG_ERROR,
                    &[],
                );
            }),
        ),
    ]
}

fn write_multi(s: &mut Stream) -> &mut Stream {
    let entries = [(BAR0, 0u64, 4u32), (BAR0, 0x10, 8), (CONFIG, 4, 2)];
    let mut body = wire::WriteMulti {
        wr_cnt: entries.len() as u64,
    }
    .as_bytes()
    .to_vec();
    for (region, offset, count) in entries {
        let e = wire::WriteMultiEntry {
            offset,
            region,
            count,
            data: [0x5a; wire::WRITE_MULTI_DATA],
        };
        body.extend_from_slice(e.as_bytes());
    }
    s.msg(Command::RegionWriteMulti, &[&body])
}

fn session_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();

    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    let info = wire::DeviceInfo {
        argsz: wire::argsz::<wire::DeviceInfo>(),
        ..Default::default()
    };
    s.msg(Command::DeviceGetInfo, &[info.as_bytes()]);
    for index in 0..9 {
        let r = wire::RegionInfo {
            argsz: 128,
            index,
            ..Default::default()
        };
        s.msg(Command::DeviceGetRegionInfo, &[r.as_bytes()]);
    }
    for index in 0..5 {
        let i = wire::IrqInfo {
            argsz: wire::argsz::<wire::IrqInfo>(),
            index,
            ..Default::default()
        };
        s.msg(Command::DeviceGetIrqInfo, &[i.as_bytes()]);
    }
    let io = wire::RegionIoFds {
        argsz: 64,
        index: BAR0,
        ..Default::default()
    };
    s.msg(Command::DeviceGetRegionIoFds, &[io.as_bytes()]);
    seeds.push(("enumerate", s.seed(0)));

    // Config space: read it all, size the BARs, enable memory and bus mastering.
    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    s.read(CONFIG, 0, 256);
    for bar in 0..6u64 {
        s.write(CONFIG, 0x10 + 4 * bar, &[0xff; 4])
            .read(CONFIG, 0x10 + 4 * bar, 4);
    }
    s.write(CONFIG, 4, &[0x07, 0x00])
        .read(CONFIG, 0x34, 1)
        .read(CONFIG, 0x40, 64);
    seeds.push(("config", s.seed(0)));

    // BAR accesses of every size, in every BAR, and one past the end.
    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    s.write(BAR0, 0, &[0xaa; 16])
        .read(BAR0, 0, 16)
        .write(BAR2, 0x900, &[1, 2, 3])
        .read(BAR2, 0x900, 3)
        .write(BAR4, 0x10, &[9; 4])
        .read(BAR4, 0xfc, 8)
        .read(BAR0, 4095, 2);
    seeds.push(("bars", s.seed(0)));

    // fd-backed DMA, the device copying both ways through its doorbells.
    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    let rw = wire::DMA_MAP_FLAG_READ | wire::DMA_MAP_FLAG_WRITE;
    s.fd()
        .dma_map(0x10000, 0x10000, rw)
        .write(BAR0, REG_DMA_WRITE, &0x10040u64.to_le_bytes())
        .write(BAR0, REG_DMA_READ, &0x10080u64.to_le_bytes())
        .read(BAR0, 0x200, DMA_LEN as u32)
        .dma_unmap(0x10000, 0x10000, 0)
        .write(BAR0, REG_DMA_READ, &0x10080u64.to_le_bytes());
    seeds.push(("dma-fd", s.seed(0)));

    // DMA without an fd: the server asks the client by message, and the client answers.
    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    s.dma_map(0x40000, 0x1000, rw)
        .write(BAR0, REG_DMA_READ, &0x40000u64.to_le_bytes())
        .dma_reply(0, Command::DmaRead, 0x40000, &[0x11; DMA_LEN])
        .write(BAR0, REG_DMA_WRITE, &0x40100u64.to_le_bytes())
        .dma_reply(1, Command::DmaWrite, 0x40100, &[])
        .dma_unmap(0, 0, wire::DMA_UNMAP_FLAG_ALL);
    seeds.push(("dma-remote", s.seed(0)));

    // Interrupts: MSI-X with an eventfd, the table, masking, triggers; then MSI and INTx.
    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    let efd = wire::IRQ_SET_DATA_EVENTFD | wire::IRQ_SET_ACTION_TRIGGER;
    s.write(CONFIG, 4, &[0x06, 0x00])
        .fd()
        .set_irqs(MSIX, efd, 0, 1, &[])
        .write(
            BAR2,
            0,
            &[0, 0, 0xe0, 0xfe, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0],
        )
        .write(BAR0, REG_IRQ, &[3])
        .set_irqs(
            MSIX,
            wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_MASK,
            0,
            1,
            &[],
        )
        .write(BAR0, REG_IRQ, &[3])
        .read(BAR2, 0x800, 8)
        .set_irqs(
            MSIX,
            wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
            0,
            1,
            &[],
        )
        .set_irqs(
            MSIX,
            wire::IRQ_SET_DATA_BOOL | wire::IRQ_SET_ACTION_TRIGGER,
            0,
            2,
            &[1, 1],
        )
        .set_irqs(
            MSIX,
            wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
        )
        .fd()
        .set_irqs(MSI, efd, 0, 1, &[])
        .write(BAR0, REG_IRQ, &[2])
        .set_irqs(
            MSI,
            wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_TRIGGER,
            0,
            0,
            &[],
        )
        .fd()
        .set_irqs(INTX, efd, 0, 1, &[])
        .write(BAR0, REG_IRQ, &[0])
        .set_irqs(
            INTX,
            wire::IRQ_SET_DATA_NONE | wire::IRQ_SET_ACTION_UNMASK,
            0,
            1,
            &[],
        )
        .write(BAR0, REG_IRQ, &[1]);
    seeds.push(("irqs", s.seed(0)));

    // Batched writes (write_multiple negotiated), reset, and what the device refuses.
    let mut s = Stream {
        next_id: 1,
        ..Stream::default()
    };
    write_multi(&mut s);
    s.msg(Command::DeviceReset, &[]);
    let feature = wire::DeviceFeature {
        argsz: 8,
        flags: wire::DEVICE_FEATURE_PROBE | 1,
    };
    s.msg(Command::DeviceFeature, &[feature.as_bytes()]);
    s.msg(
        Command::MigDataRead,
        &[wire::MigData { argsz: 8, size: 64 }.as_bytes()],
    );
    s.raw_msg(40, 14, 0, &[]);
    s.raw_msg(41, Command::DeviceReset as u16, 0x400, &[]);
    s.raw_msg(
        42,
        Command::DeviceReset as u16,
        umdev_proto::FLAG_NO_REPLY,
        &[],
    );
    s.msg(Command::Version, &[&version_body(&qemu_caps())]);
    seeds.push(("misc", s.seed(2)));

    // The fuzzer's own VERSION (mode bit 0 set), as QEMU sends it, then one command.
    let mut s = Stream::default();
    s.msg(Command::Version, &[&version_body(&qemu_caps())])
        .read(CONFIG, 0, 4);
    seeds.push(("own-version", s.seed(1)));

    seeds
}
