//! What the controller says about itself: its identity (serial, subsystem NQN, namespace
//! GUID and EUI-64, unique per instance: Linux refuses a second controller of a subsystem
//! it already knows) and the Identify and log page data built from it.

use serde::{Deserialize, Serialize};

/// The PCI vendor id the controller reports (also in Identify: VID/SSVID).
pub const VENDOR_ID: u16 = 0x5ead;
/// The PCI device id.
pub const DEVICE_ID: u16 = 0x4e56;
/// The one namespace's id.
pub const NSID: u32 = 1;
/// Logical block size (512 bytes: LBADS 9).
pub const LBA_SHIFT: u32 = 9;
/// Maximum Data Transfer Size as a power of two of 4 KiB pages (5: 128 KiB).
pub const MDTS: u8 = 5;
/// I/O queue pairs the controller offers (plus the admin pair).
pub const MAX_IO_QUEUES: u16 = 16;
/// Asynchronous Event Requests it holds at once (AERL + 1).
pub const AER_LIMIT: usize = 4;
/// Aborts it accepts at once (ACL + 1).
pub const ABORT_LIMIT: u8 = 4;

/// A controller's identity, which travels with it when it migrates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Serial number (ASCII, at most 20 characters).
    pub serial: String,
    /// NVM Subsystem NVMe Qualified Name.
    pub subnqn: String,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier of the namespace.
    pub eui64: [u8; 8],
}

impl Identity {
    /// The identity of the device with UUID bytes `uuid` (its canonical text `text`).
    pub fn of_uuid(uuid: [u8; 16], text: &str) -> Identity {
        let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&uuid[8..]);
        Identity {
            serial: format!("UMD{}", &hex[..17]),
            subnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{text}"),
            nguid: uuid,
            eui64,
        }
    }
}

/// Copies `s` into a space-padded ASCII field.
fn ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    for (d, c) in dst.iter_mut().zip(s.bytes().filter(u8::is_ascii)) {
        *d = c;
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Identify Controller (CNS 01h), 4 KiB.
pub fn controller(id: &Identity, cntlid: u16) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    put16(&mut b, 0x00, VENDOR_ID);
    put16(&mut b, 0x02, VENDOR_ID);
    ascii(&mut b[0x04..0x18], &id.serial);
    ascii(&mut b[0x18..0x40], "umdev mediated NVMe controller");
    ascii(&mut b[0x40..0x48], "1.0");
    b[0x48] = 6; // RAB: arbitration burst of 64
    b[0x4d] = MDTS;
    put16(&mut b, 0x4e, cntlid);
    put32(&mut b, 0x50, crate::regs::VERSION);
    put16(&mut b, 0x100, 1 << 8); // OACS: Doorbell Buffer Config
    b[0x102] = ABORT_LIMIT - 1; // ACL
    b[0x103] = u8::try_from(AER_LIMIT - 1).unwrap_or(0); // AERL
    b[0x104] = 0x02; // FRMW: one slot
    b[0x106] = 0; // ELPE: one error log entry
    b[0x200] = 0x66; // SQES: 64 bytes
    b[0x201] = 0x44; // CQES: 16 bytes
    put16(&mut b, 0x202, 0); // MAXCMD: not reported
    put32(&mut b, 0x204, NSID); // NN: one namespace
    put16(&mut b, 0x208, (1 << 2) | (1 << 3)); // ONCS: Dataset Management, Write Zeroes
    b[0x20d] = 1; // VWC: a volatile write cache (Flush reaches the backing file)
    let nqn = id.subnqn.as_bytes();
    let n = nqn.len().min(255);
    b[0x300..0x300 + n].copy_from_slice(&nqn[..n]);
    // Power state 0: 25 W, entry and exit latencies unreported.
    put16(&mut b, 0x800, 2500);
    b
}

/// Identify Namespace (CNS 00h) of a namespace of `blocks` logical blocks.
pub fn namespace(id: &Identity, blocks: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    put64(&mut b, 0x00, blocks); // NSZE
    put64(&mut b, 0x08, blocks); // NCAP
    put64(&mut b, 0x10, blocks); // NUSE
    b[0x18] = 1 << 3; // NSFEAT: NGUID and EUI64 are never reused
    b[0x19] = 0; // NLBAF: one format
    b[0x1a] = 0; // FLBAS: format 0
    b[0x21] = 0x09; // DLFEAT: deallocated blocks read as zeroes; Write Zeroes deallocates
    b[0x68..0x78].copy_from_slice(&id.nguid);
    b[0x78..0x80].copy_from_slice(&id.eui64);
    put32(&mut b, 0x80, LBA_SHIFT << 16); // LBAF0: LBADS
    b
}

/// Active Namespace ID list (CNS 02h) starting after `after`.
pub fn active_namespaces(after: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if after < NSID {
        put32(&mut b, 0, NSID);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h).
pub fn ns_descriptors(id: &Identity) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    // EUI-64 (type 1, 8 bytes), then NGUID (type 2, 16 bytes).
    b[0] = 1;
    b[1] = 8;
    b[4..12].copy_from_slice(&id.eui64);
    b[12] = 2;
    b[13] = 16;
    b[16..32].copy_from_slice(&id.nguid);
    b
}

/// SMART / Health Information log page (02h): temperature and the I/O counters.
pub fn smart_log(reads_512k: u64, writes_512k: u64, read_cmds: u64, write_cmds: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    put16(&mut b, 1, 300); // composite temperature: 300 K
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
    put64(&mut b, 32, reads_512k); // data units read (thousands of 512-byte units)
    put64(&mut b, 48, writes_512k);
    put64(&mut b, 64, read_cmds);
    put64(&mut b, 80, write_cmds);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        let mut u = [0u8; 16];
        for (b, v) in u.iter_mut().zip((0u8..=255).step_by(17)) {
            *b = v;
        }
        Identity::of_uuid(u, "00112233-4455-6677-8899-aabbccddeeff")
    }

    #[test]
    fn identities_differ_with_the_uuid_and_fit_their_fields() {
        let a = id();
        let b = Identity::of_uuid([9; 16], "09090909-0909-0909-0909-090909090909");
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.subnqn, b.subnqn);
        assert!(a.serial.len() <= 20);
        let c = controller(&a, 1);
        assert_eq!(&c[0x04..0x18], a.serial.as_bytes());
        assert!(c[0x300..].starts_with(a.subnqn.as_bytes()));
        assert_eq!(u16::from_le_bytes([c[0x100], c[0x101]]) & (1 << 8), 1 << 8);
    }

    #[test]
    fn the_namespace_reports_its_size_and_format() {
        let n = namespace(&id(), 2 << 20);
        assert_eq!(u64::from_le_bytes(n[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(
            (u32::from_le_bytes(n[0x80..0x84].try_into().unwrap()) >> 16) & 0xff,
            9
        );
        assert_eq!(&n[0x68..0x78], &id().nguid);
    }

    #[test]
    fn the_active_list_has_the_one_namespace() {
        assert_eq!(&active_namespaces(0)[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(active_namespaces(1).iter().all(|&b| b == 0));
    }
}
