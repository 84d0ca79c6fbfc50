//! The namespace: a backing file in the parent's pool, reached with positional reads and
//! writes (so commands on several threads never share a file offset).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::identify::LBA_SHIFT;

/// A namespace backed by a file.
pub(crate) struct Namespace {
    file: RwLock<(Arc<File>, PathBuf)>,
    /// Size in bytes (a whole number of logical blocks).
    size: u64,
}

impl Namespace {
    /// Opens (creating it sparse if missing) the backing file `path` of `size` bytes; an
    /// existing file smaller than `size` is refused, a larger one is used up to `size`.
    pub fn open(path: &Path, size: u64) -> std::io::Result<Namespace> {
        let file = Self::open_file(path, size)?;
        Ok(Namespace {
            file: RwLock::new((Arc::new(file), path.to_owned())),
            size,
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
        self.file().write_all_at(data, offset)
    }

    pub fn flush(&self) -> std::io::Result<()> {
        self.file().sync_data()
    }

    /// Deallocates `[offset, offset + len)`: a hole that reads as zeroes.
    pub fn deallocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
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
