//! The namespace: a backing file in the parent's pool, reached with positional reads and
//! writes (so commands on several threads never share a file offset).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::identify::LBA_SHIFT;

/// Granularity of the migration's copy and of its record of what changed.
pub(crate) const CHUNK: u64 = 1 << 20;

/// While a migration copies the namespace: which chunks changed since they were sent, and
/// where the current pass is.
struct Tracker {
    dirty: Vec<u64>,
    cursor: u64,
}

/// A namespace backed by a file.
pub(crate) struct Namespace {
    file: RwLock<(Arc<File>, PathBuf)>,
    /// Size in bytes (a whole number of logical blocks).
    size: u64,
    tracking: AtomicBool,
    tracker: Mutex<Option<Tracker>>,
}

impl Namespace {
    /// Opens (creating it sparse if missing) the backing file `path` of `size` bytes; an
    /// existing file smaller than `size` is refused, a larger one is used up to `size`.
    pub fn open(path: &Path, size: u64) -> std::io::Result<Namespace> {
        let file = Self::open_file(path, size)?;
        Ok(Namespace {
            file: RwLock::new((Arc::new(file), path.to_owned())),
            size,
            tracking: AtomicBool::new(false),
            tracker: Mutex::new(None),
        })
    }

    fn open_file(path: &Path, size: u64) -> std::io::Result<File> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size)?;
        } else if len < size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} holds {len} bytes; the namespace needs {size}",
                    path.display()
                ),
            ));
        }
        Ok(file)
    }

    /// Uses `path` as the backing file from now on (same rules as `open`).
    pub fn adopt(&self, path: &Path) -> std::io::Result<()> {
        let file = Self::open_file(path, self.size)?;
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(file), path.to_owned());
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        self.file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    fn file(&self) -> Arc<File> {
        self.file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Logical blocks.
    pub fn blocks(&self) -> u64 {
        self.size >> LBA_SHIFT
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file().read_exact_at(buf, offset)
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file().write_all_at(data, offset)?;
        self.changed(offset, data.len() as u64);
        Ok(())
    }

    // ---- the migration's copy ----

    fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK)
    }

    /// Records that `[offset, offset + len)` changed (after the change landed, so a chunk
    /// read after its bit was cleared either has the change or is sent again).
    fn changed(&self, offset: u64, len: u64) {
        if len == 0 || !self.tracking.load(Ordering::Acquire) {
            return;
        }
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = t.as_mut() {
            for c in offset / CHUNK..=(offset + len - 1) / CHUNK {
                if let Some(w) = t
                    .dirty
                    .get_mut(usize::try_from(c / 64).unwrap_or(usize::MAX))
                {
                    *w |= 1 << (c % 64);
                }
            }
        }
    }

    /// Starts (again) a copy: every chunk is to be sent, changes are recorded from now on.
    pub fn track_start(&self) {
        let n = self.chunks();
        let mut dirty = vec![u64::MAX; usize::try_from(n.div_ceil(64)).unwrap_or(0)];
        if n % 64 != 0 {
            if let Some(last) = dirty.last_mut() {
                *last = (1 << (n % 64)) - 1;
            }
        }
        *self.tracker.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Tracker { dirty, cursor: 0 });
        self.tracking.store(true, Ordering::Release);
    }

    /// Stops recording changes.
    pub fn track_stop(&self) {
        self.tracking.store(false, Ordering::Release);
        *self.tracker.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The next changed chunk of this pass (its bit cleared): its offset and length. `None`
    /// at the end of a pass (the next call starts the next pass) or when not copying.
    pub fn next_changed(&self) -> Option<(u64, u64)> {
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let t = t.as_mut()?;
        let n = self.chunks();
        while t.cursor < n {
            let c = t.cursor;
            t.cursor += 1;
            let w = usize::try_from(c / 64).unwrap_or(usize::MAX);
            if t.dirty[w] & (1 << (c % 64)) != 0 {
                t.dirty[w] &= !(1 << (c % 64));
                let off = c * CHUNK;
                return Some((off, CHUNK.min(self.size - off)));
            }
        }
        t.cursor = 0;
        None
    }

    /// Whether `[offset, offset + len)` is a hole of the backing file (no data to read).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        let f = self.file();
        match rustix::fs::seek(&*f, rustix::fs::SeekFrom::Data(offset)) {
            Ok(data) => data >= offset + len,
            // No data after `offset` at all.
            Err(rustix::io::Errno::NXIO) => true,
            Err(_) => false,
        }
    }

    /// Bytes still to send in the current copy.
    pub fn changed_bytes(&self) -> u64 {
        let t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        t.as_ref().map_or(0, |t| {
            t.dirty
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>()
                * CHUNK
        })
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.file().sync_data()
    }

    /// Deallocates `[offset, offset + len)`: a hole that reads as zeroes.
    pub fn deallocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.punch(offset, len)?;
        self.changed(offset, len);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let f = self.file();
        match rustix::fs::fallocate(
            &*f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            // A filesystem without holes: write the zeroes.
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; 64 << 10];
                let mut at = 0;
                while at < len {
                    let n = usize::try_from(len - at).map_or(zeros.len(), |r| r.min(zeros.len()));
                    f.write_all_at(&zeros[..n], offset + at)?;
                    at += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_pass_visits_every_chunk_then_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::open(&dir.path().join("n.img"), 3 * CHUNK + 4096).unwrap();
        assert_eq!(ns.next_changed(), None, "not copying");
        ns.track_start();
        assert_eq!(ns.changed_bytes(), 4 * CHUNK);
        let pass: Vec<_> = std::iter::from_fn(|| ns.next_changed()).collect();
        assert_eq!(
            pass,
            vec![
                (0, CHUNK),
                (CHUNK, CHUNK),
                (2 * CHUNK, CHUNK),
                (3 * CHUNK, 4096)
            ]
        );
        assert_eq!(ns.next_changed(), None, "the pass is over, nothing changed");
        ns.write(CHUNK + 10, &[1; 8]).unwrap();
        ns.deallocate(3 * CHUNK, 4096).unwrap();
        let pass: Vec<_> = std::iter::from_fn(|| ns.next_changed()).collect();
        assert_eq!(pass, vec![(CHUNK, CHUNK), (3 * CHUNK, 4096)]);
        ns.track_stop();
        ns.write(0, &[1; 8]).unwrap();
        assert_eq!(ns.next_changed(), None);
    }
}
