//! VRAM: a memfd the client maps as BAR0 and the device reads (screenshots, migration).
//!
//! Each client gets a memory object of its own: when a client goes, the contents move to a
//! fresh memfd and the next client is handed that one, so a client that has gone but kept
//! its mapping can neither read nor write the next one's screen.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use rustix::fs::{memfd_create, MemfdFlags};
use rustix::io::Errno;

/// Copies go in pieces of this size (and all-zero pieces are skipped, keeping it sparse).
const PIECE: usize = 1 << 20;

/// The VRAM of one device.
pub struct Vram {
    size: u64,
    fd: Mutex<Arc<OwnedFd>>,
}

fn new_memfd(size: u64) -> Result<OwnedFd, Errno> {
    let fd = memfd_create("umdev-mbochs-vram", MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(fd)
}

impl Vram {
    /// `size` bytes of zeroes.
    pub fn new(size: u64) -> Result<Vram, Errno> {
        Ok(Vram {
            size,
            fd: Mutex::new(Arc::new(new_memfd(size)?)),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memory object clients map now.
    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        read_all(&self.fd(), offset, buf)
    }

    /// Writes `data` at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let fd = self.fd();
        let mut done = 0;
        while done < data.len() {
            let n = rustix::io::pwrite(&*fd, &data[done..], offset + done as u64)?;
            if n == 0 {
                return Err(Errno::IO);
            }
            done += n;
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset` (a hole: the pages go back).
    pub fn zero(&self, offset: u64, len: u64) -> Result<(), Errno> {
        rustix::fs::fallocate(
            &*self.fd(),
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Takes `fd` (of this VRAM's size) as the memory object, in place of the current one:
    /// the one a live upgrade's previous process handed over, which the client has mapped.
    pub fn adopt(&self, fd: OwnedFd) -> Result<(), Errno> {
        let size = rustix::fs::fstat(&fd)?.st_size;
        if u64::try_from(size).ok() != Some(self.size) {
            tracing::warn!(
                size,
                want = self.size,
                "mbochs: handed-over VRAM of another size"
            );
            return Err(Errno::INVAL);
        }
        *self.fd.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(fd);
        Ok(())
    }

    /// Moves the contents to a fresh memory object, which clients map from now on; the
    /// old one keeps whatever a client still mapping it writes, and goes when they do.
    pub fn renew(&self) -> Result<(), Errno> {
        let old = self.fd();
        let new = new_memfd(self.size)?;
        let mut buf = vec![0u8; PIECE];
        let mut at = 0u64;
        while at < self.size {
            let n = usize::try_from(self.size - at).map_or(PIECE, |r| r.min(PIECE));
            read_all(&old, at, &mut buf[..n])?;
            if buf[..n].iter().any(|&b| b != 0) {
                let mut done = 0;
                while done < n {
                    done += rustix::io::pwrite(&new, &buf[done..n], at + done as u64)?;
                }
            }
            at += n as u64;
        }
        *self.fd.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        Ok(())
    }
}

fn read_all(fd: &OwnedFd, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let n = rustix::io::pread(fd, &mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(Errno::IO);
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn renewing_keeps_the_contents_in_a_new_object_the_old_cannot_reach() {
        let v = Vram::new(4 << 20).unwrap();
        v.write(3 << 20, b"pixels").unwrap();
        let old = v.fd();
        v.renew().unwrap();
        let mut b = [0u8; 6];
        v.read(3 << 20, &mut b).unwrap();
        assert_eq!(&b, b"pixels");
        // A writer of the old object does not reach the new one.
        rustix::io::pwrite(&*old, b"XXXXXX", 3 << 20).unwrap();
        v.read(3 << 20, &mut b).unwrap();
        assert_eq!(&b, b"pixels");
        assert!(!Arc::ptr_eq(&old, &v.fd()));
    }
}
