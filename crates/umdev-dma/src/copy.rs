//! Copies through the table: the [`Dma`] implementation of [`AddressSpace`].
//!
//! A copy checks every byte under one table lookup, then copies mapping by mapping without
//! the table lock, each fd-backed part inside that mapping's gate (see `space`), and marks
//! what it wrote dirty before leaving the gate.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::DmaError;
use crate::mapping::{Mapping, Memory};
use crate::range::Prot;
use crate::space::{find, AddressSpace, Table};
use crate::{Dma, RemoteDma};

/// Whether a copy reads from or writes to client memory, with its buffer.
enum Transfer<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

impl Transfer<'_> {
    fn len(&self) -> usize {
        match self {
            Transfer::Read(b) => b.len(),
            Transfer::Write(d) => d.len(),
        }
    }

    fn needed(&self) -> Prot {
        match self {
            Transfer::Read(_) => Prot::READ,
            Transfer::Write(_) => Prot::WRITE,
        }
    }
}

impl AddressSpace {
    /// The copy loop shared by `read` and `write`.
    fn transfer(&self, iova: u64, mut xfer: Transfer<'_>) -> Result<(), DmaError> {
        let total = xfer.len();
        if total == 0 {
            return Ok(());
        }
        let len = u64::try_from(total).map_err(|_| DmaError::InvalidRange {
            start: iova,
            len: u64::MAX,
        })?;
        let end = iova
            .checked_add(len)
            .ok_or(DmaError::InvalidRange { start: iova, len })?;
        let needed = xfer.needed();

        let table = self.read_table();
        // Check every byte before copying any, so that a refused access changes nothing.
        let first = find_with(&table, iova, needed)?.clone();
        if first.range.end() >= end {
            // The common case: one mapping, no allocation.
            drop(table);
            return self.copy_segment(&first, iova, iova, end, &mut xfer);
        }
        check_access(&table, first.range.end(), end, needed)?;
        let mut segments = vec![first];
        while let Some(last) = segments.last().filter(|m| m.range.end() < end) {
            let next = find_with(&table, last.range.end(), needed)?.clone();
            segments.push(next);
        }
        drop(table);
        let mut cur = iova;
        for m in &segments {
            let seg_end = end.min(m.range.end());
            self.copy_segment(m, iova, cur, seg_end, &mut xfer)?;
            cur = seg_end;
        }
        Ok(())
    }

    /// Copies `[cur, seg_end)` (inside `m`); `iova` is where the whole access starts.
    fn copy_segment(
        &self,
        m: &Arc<Mapping>,
        iova: u64,
        cur: u64,
        seg_end: u64,
        xfer: &mut Transfer<'_>,
    ) -> Result<(), DmaError> {
        // Both fit in usize: they are at most the access's length.
        let at = to_usize(cur - iova, iova)?;
        let to = to_usize(seg_end - iova, iova)?;
        match &m.memory {
            Memory::Mmap(_) => {
                let _in = m.gate.enter().ok_or(DmaError::Fault { iova: cur })?;
                let n = (to - at) as u64;
                match xfer {
                    Transfer::Read(buf) => {
                        m.read_at(cur, &mut buf[at..to])?;
                        if let Some(t) = self.traffic() {
                            t.mapped_read.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    Transfer::Write(data) => {
                        m.write_at(cur, &data[at..to])?;
                        m.mark_dirty(self.logging(), cur, seg_end);
                        if let Some(t) = self.traffic() {
                            t.mapped_written.fetch_add(n, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                }
            }
            Memory::Remote => {
                let remote = self.remote().ok_or(DmaError::NoRemote { iova: cur })?;
                match xfer {
                    Transfer::Read(buf) => remote_read(&*remote, cur, &mut buf[at..to]),
                    Transfer::Write(data) => {
                        remote_write(&*remote, cur, &data[at..to])?;
                        m.mark_dirty(self.logging(), cur, seg_end);
                        Ok(())
                    }
                }
            }
        }
    }
}

impl Dma for AddressSpace {
    /// Reads `buf.len()` bytes at `iova`; every byte must be mapped with [`Prot::READ`].
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.transfer(iova, Transfer::Read(buf))
    }

    /// Writes `data` at `iova`; every byte must be mapped with [`Prot::WRITE`]. The pages
    /// written are logged dirty while logging is on.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.transfer(iova, Transfer::Write(data))
    }
}

fn find_with(table: &Table, iova: u64, needed: Prot) -> Result<&Arc<Mapping>, DmaError> {
    let m = find(table, iova).ok_or(DmaError::Fault { iova })?;
    if !m.prot.contains(needed) {
        return Err(DmaError::PermissionDenied {
            iova,
            needed,
            has: m.prot,
        });
    }
    Ok(m)
}

/// Checks that `[iova, end)` is covered by adjacent mappings that all allow `needed`.
fn check_access(table: &Table, iova: u64, end: u64, needed: Prot) -> Result<(), DmaError> {
    let mut cur = iova;
    while cur < end {
        cur = find_with(table, cur, needed)?.range.end();
    }
    Ok(())
}

fn to_usize(v: u64, iova: u64) -> Result<usize, DmaError> {
    usize::try_from(v).map_err(|_| DmaError::InvalidRange {
        start: iova,
        len: v,
    })
}

fn chunk_size(remote: &dyn RemoteDma) -> Result<usize, DmaError> {
    match remote.max_transfer() {
        0 => Err(DmaError::ZeroMaxTransfer),
        n => Ok(n),
    }
}

fn remote_read(remote: &dyn RemoteDma, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
    let mut at = iova;
    for chunk in buf.chunks_mut(chunk_size(remote)?) {
        remote.read(at, chunk)?;
        at = advance(at, chunk.len())?;
    }
    Ok(())
}

fn remote_write(remote: &dyn RemoteDma, iova: u64, data: &[u8]) -> Result<(), DmaError> {
    let mut at = iova;
    for chunk in data.chunks(chunk_size(remote)?) {
        remote.write(at, chunk)?;
        at = advance(at, chunk.len())?;
    }
    Ok(())
}

fn advance(iova: u64, by: usize) -> Result<u64, DmaError> {
    u64::try_from(by)
        .ok()
        .and_then(|by| iova.checked_add(by))
        .ok_or(DmaError::InvalidRange {
            start: iova,
            len: u64::MAX,
        })
}
#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that fails should panic.
mod tests {
    use super::*;
    use crate::testutil::{memfd, memfd_pair, range, space};
    use crate::{Backing, PAGE_SIZE};
    use rustix::io::Errno;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};

    /// The initial content of the fake client's memory at offset `i`.
    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 251).unwrap()
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Call {
        Read(u64, usize),
        Write(u64, Vec<u8>),
    }

    /// A client whose memory is a byte vector starting at IOVA `base`; it records calls.
    struct FakeClient {
        base: u64,
        mem: Mutex<Vec<u8>>,
        calls: Mutex<Vec<Call>>,
        max: usize,
    }

    impl FakeClient {
        fn new(base: u64, size: usize, max: usize) -> Arc<Self> {
            Arc::new(Self {
                base,
                mem: Mutex::new((0..size).map(pattern).collect()),
                calls: Mutex::new(Vec::new()),
                max,
            })
        }

        fn at(&self, iova: u64, len: usize) -> std::ops::Range<usize> {
            let off = usize::try_from(iova - self.base).unwrap();
            off..off + len
        }
    }

    impl RemoteDma for FakeClient {
        fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            assert!(buf.len() <= self.max);
            self.calls.lock().unwrap().push(Call::Read(iova, buf.len()));
            buf.copy_from_slice(&self.mem.lock().unwrap()[self.at(iova, buf.len())]);
            Ok(())
        }

        fn write(&self, iova: u64, data: &[u8]) -> Result<(), DmaError> {
            assert!(data.len() <= self.max);
            self.calls
                .lock()
                .unwrap()
                .push(Call::Write(iova, data.to_vec()));
            let r = self.at(iova, data.len());
            self.mem.lock().unwrap()[r].copy_from_slice(data);
            Ok(())
        }

        fn max_transfer(&self) -> usize {
            self.max
        }
    }

    #[test]
    fn write_through_memfd_mapping_is_visible_in_the_file() {
        let s = space();
        let (backing, file) = memfd_pair("umdev-dma-write", 2 * PAGE_SIZE);
        s.map(range(0x10000, 2 * PAGE_SIZE), Prot::READ_WRITE, backing)
            .unwrap();
        assert!(s.mappings()[0].fd_backed);
        let data: Vec<u8> = (0..100u8).collect();
        s.write(0x10ff0, &data).unwrap();
        let mut seen = vec![0u8; 100];
        file.read_exact_at(&mut seen, 0xff0).unwrap();
        assert_eq!(seen, data);
    }

    #[test]
    fn copies_through_mapped_memory_and_dirty_reports_are_counted() {
        let s = space();
        let t = Arc::new(crate::DmaTraffic::default());
        s.count_traffic(t.clone());
        let (backing, _file) = memfd_pair("umdev-dma-count", 4 * PAGE_SIZE);
        s.map(range(0x10000, 4 * PAGE_SIZE), Prot::READ_WRITE, backing)
            .unwrap();
        // Across a page boundary: one copy, 100 bytes, two pages dirty.
        s.start_dirty_logging(&[]).unwrap();
        s.write(0x10ff0, &[7; 100]).unwrap();
        let mut buf = [0u8; 30];
        s.read(0x12000, &mut buf).unwrap();
        // A refused access counts nothing.
        assert!(s.read(0x20000, &mut buf).is_err());
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!((get(&t.mapped_written), get(&t.mapped_read)), (100, 30));
        let mut bitmap = [0u8; 8];
        s.dirty_report(0x10000, 4 * PAGE_SIZE, PAGE_SIZE, &mut bitmap)
            .unwrap();
        assert_eq!(bitmap[0], 0b11);
        assert_eq!(get(&t.dirty_reported), 2);
        // Reported once: the next report is empty.
        s.dirty_report(0x10000, 4 * PAGE_SIZE, PAGE_SIZE, &mut bitmap)
            .unwrap();
        assert_eq!(get(&t.dirty_reported), 2);
    }

    #[test]
    fn read_through_memfd_mapping_sees_the_file() {
        let s = space();
        let (backing, file) = memfd_pair("umdev-dma-read", 2 * PAGE_SIZE);
        s.map(range(0x10000, 2 * PAGE_SIZE), Prot::READ, backing)
            .unwrap();
        file.write_all_at(b"from the client", 0x1234).unwrap();
        let mut buf = [0u8; 15];
        s.read(0x11234, &mut buf).unwrap();
        assert_eq!(&buf, b"from the client");
    }

    #[test]
    fn file_offset_shifts_the_mapping() {
        let s = space();
        let fd = memfd("umdev-dma-offset", 3 * PAGE_SIZE);
        let file = File::from(fd.try_clone().unwrap());
        s.map(
            range(0, PAGE_SIZE),
            Prot::READ,
            Backing::Fd {
                fd,
                offset: 2 * PAGE_SIZE,
            },
        )
        .unwrap();
        file.write_all_at(b"xyz", 2 * PAGE_SIZE + 7).unwrap();
        let mut buf = [0u8; 3];
        s.read(7, &mut buf).unwrap();
        assert_eq!(&buf, b"xyz");
    }

    #[test]
    fn access_spans_two_adjacent_mappings() {
        let s = space();
        let (b1, f1) = memfd_pair("umdev-dma-span-1", PAGE_SIZE);
        let (b2, f2) = memfd_pair("umdev-dma-span-2", PAGE_SIZE);
        s.map(range(0x1000, PAGE_SIZE), Prot::READ_WRITE, b1)
            .unwrap();
        s.map(range(0x2000, PAGE_SIZE), Prot::READ_WRITE, b2)
            .unwrap();
        s.write(0x1ffc, b"abcdefgh").unwrap();
        let mut tail = [0u8; 4];
        let mut head = [0u8; 4];
        f1.read_exact_at(&mut tail, PAGE_SIZE - 4).unwrap();
        f2.read_exact_at(&mut head, 0).unwrap();
        assert_eq!((&tail, &head), (b"abcd", b"efgh"));
        let mut back = [0u8; 8];
        s.read(0x1ffc, &mut back).unwrap();
        assert_eq!(&back, b"abcdefgh");
    }

    #[test]
    fn access_across_a_hole_is_efault_and_writes_nothing() {
        let s = space();
        let (b1, f1) = memfd_pair("umdev-dma-hole", PAGE_SIZE);
        s.map(range(0x1000, PAGE_SIZE), Prot::READ_WRITE, b1)
            .unwrap();
        s.map(range(0x3000, PAGE_SIZE), Prot::READ_WRITE, Backing::Remote)
            .unwrap();
        let err = s.write(0x1ff0, &[0xaa; 0x20]).unwrap_err();
        assert!(matches!(err, DmaError::Fault { iova: 0x2000 }), "{err:?}");
        assert_eq!(err.as_errno(), Errno::FAULT);
        let mut seen = [0u8; 0x10];
        f1.read_exact_at(&mut seen, PAGE_SIZE - 0x10).unwrap();
        assert_eq!(seen, [0; 0x10]);
    }

    #[test]
    fn access_past_the_end_of_iova_space_is_einval() {
        let s = space();
        s.map(
            range(u64::MAX - 0x1000, 0x1000),
            Prot::READ,
            Backing::Remote,
        )
        .unwrap();
        let mut buf = [0u8; 0x1001];
        let err = s.read(u64::MAX - 0x1000, &mut buf).unwrap_err();
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn zero_length_access_succeeds_anywhere() {
        let s = space();
        s.read(0xdead_0000, &mut []).unwrap();
        s.write(u64::MAX, &[]).unwrap();
    }

    #[test]
    fn read_only_mapping_refuses_write_with_eperm() {
        let s = space();
        let (backing, file) = memfd_pair("umdev-dma-ro", PAGE_SIZE);
        s.map(range(0, PAGE_SIZE), Prot::READ, backing).unwrap();
        let err = s.write(0x10, b"no").unwrap_err();
        assert!(
            matches!(err, DmaError::PermissionDenied { iova: 0x10, .. }),
            "{err:?}"
        );
        assert_eq!(err.as_errno(), Errno::PERM);
        let mut seen = [0xffu8; 2];
        file.read_exact_at(&mut seen, 0x10).unwrap();
        assert_eq!(seen, [0, 0]);
        s.read(0x10, &mut seen).unwrap();
    }

    #[test]
    fn write_only_mapping_refuses_read_with_eperm() {
        let s = space();
        s.map(range(0, PAGE_SIZE), Prot::WRITE, Backing::Remote)
            .unwrap();
        let err = s.read(0, &mut [0u8; 4]).unwrap_err();
        assert_eq!(err.as_errno(), Errno::PERM);
    }

    #[test]
    fn span_needs_permission_on_every_mapping() {
        let s = space();
        s.map(range(0, PAGE_SIZE), Prot::READ_WRITE, Backing::Remote)
            .unwrap();
        s.map(range(PAGE_SIZE, PAGE_SIZE), Prot::READ, Backing::Remote)
            .unwrap();
        let err = s.write(PAGE_SIZE - 1, &[1, 2]).unwrap_err();
        assert!(matches!(err, DmaError::PermissionDenied { iova, .. } if iova == PAGE_SIZE));
    }

    #[test]
    fn remote_mapping_goes_through_remote_dma_in_chunks() {
        let s = space();
        let client = FakeClient::new(0x4000, 0x100, 16);
        s.set_remote(Some(client.clone()));
        s.map(range(0x4000, 0x100), Prot::READ_WRITE, Backing::Remote)
            .unwrap();

        let mut buf = [0u8; 40];
        s.read(0x4010, &mut buf).unwrap();
        let expected: Vec<u8> = (0x10..0x10 + 40).map(pattern).collect();
        assert_eq!(buf.to_vec(), expected);
        let data: Vec<u8> = (0..20).collect();
        s.write(0x4020, &data).unwrap();

        let calls = client.calls.lock().unwrap();
        assert_eq!(
            *calls,
            vec![
                Call::Read(0x4010, 16),
                Call::Read(0x4020, 16),
                Call::Read(0x4030, 8),
                Call::Write(0x4020, data[..16].to_vec()),
                Call::Write(0x4030, data[16..].to_vec()),
            ]
        );
        assert_eq!(client.mem.lock().unwrap()[0x20..0x34], data[..]);
    }

    #[test]
    fn remote_mapping_without_remote_is_efault() {
        let s = space();
        s.map(range(0, PAGE_SIZE), Prot::READ_WRITE, Backing::Remote)
            .unwrap();
        let err = s.read(0, &mut [0u8; 4]).unwrap_err();
        assert!(matches!(err, DmaError::NoRemote { iova: 0 }));
        assert_eq!(err.as_errno(), Errno::FAULT);
    }

    #[test]
    fn remote_with_zero_max_transfer_is_einval() {
        let s = space();
        s.set_remote(Some(FakeClient::new(0, 0x100, 0)));
        s.map(range(0, 0x100), Prot::READ, Backing::Remote).unwrap();
        let err = s.read(0, &mut [0u8; 4]).unwrap_err();
        assert_eq!(err.as_errno(), Errno::INVAL);
    }

    #[test]
    fn access_spans_fd_and_remote_mappings() {
        let s = space();
        let (backing, file) = memfd_pair("umdev-dma-mixed", PAGE_SIZE);
        let client = FakeClient::new(PAGE_SIZE, 0x100, 64);
        s.set_remote(Some(client.clone()));
        s.map(range(0, PAGE_SIZE), Prot::READ_WRITE, backing)
            .unwrap();
        s.map(range(PAGE_SIZE, 0x100), Prot::READ_WRITE, Backing::Remote)
            .unwrap();
        s.write(PAGE_SIZE - 2, &[9, 8, 7, 6]).unwrap();
        let mut local = [0u8; 2];
        file.read_exact_at(&mut local, PAGE_SIZE - 2).unwrap();
        assert_eq!(local, [9, 8]);
        assert_eq!(
            *client.calls.lock().unwrap(),
            vec![Call::Write(PAGE_SIZE, vec![7, 6])]
        );
    }
}
