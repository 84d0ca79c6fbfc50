//! The FUSE side: inode numbers for paths, attributes, and the operations sysfs has.
//!
//! Every reply carries a zero TTL, so the kernel asks again each time: `available_instances`,
//! `devices/` and the symlinks are always what the core says now. Files are opened with
//! direct I/O (no page cache), so a read returns exactly what the core shows and a write
//! reaches the core in one piece, synchronously, with its errno.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use umdev_core::Core;

use crate::access::WriteAccess;
use crate::tree::{self, Entry, File};

const TTL: Duration = Duration::ZERO;

/// For the fixed skeleton (`class/mdev_bus`, `bus/mdev/devices`, ...), which never changes:
/// saves a round trip per path component on every walk.
const STATIC_TTL: Duration = Duration::from_secs(3600);

fn ttl(path: &str) -> &'static Duration {
    if tree::is_static(&split(path)) {
        &STATIC_TTL
    } else {
        &TTL
    }
}

/// Path <-> inode, with the kernel's lookup counts so that forgotten inodes go away.
#[derive(Default)]
struct Inodes {
    by_path: HashMap<String, u64>,
    by_ino: HashMap<u64, (String, u64)>,
    next: u64,
}

impl Inodes {
    fn new() -> Inodes {
        let mut i = Inodes {
            next: 2,
            ..Inodes::default()
        };
        i.by_path.insert(String::new(), INodeNo::ROOT.0);
        i.by_ino.insert(INodeNo::ROOT.0, (String::new(), 1));
        i
    }

    /// The inode of `path`, counting one lookup.
    fn lookup(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            if let Some(e) = self.by_ino.get_mut(&ino) {
                e.1 += 1;
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_path.insert(path.to_owned(), ino);
        self.by_ino.insert(ino, (path.to_owned(), 1));
        ino
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if ino == INodeNo::ROOT.0 {
            return;
        }
        let gone = match self.by_ino.get_mut(&ino) {
            Some(e) => {
                e.1 = e.1.saturating_sub(n);
                e.1 == 0
            }
            None => false,
        };
        if gone {
            if let Some((path, _)) = self.by_ino.remove(&ino) {
                self.by_path.remove(&path);
            }
        }
    }

    fn path(&self, ino: u64) -> Option<String> {
        self.by_ino.get(&ino).map(|e| e.0.clone())
    }

    /// For readdir: the inode if the path has one, else a stable stand-in (readdir entries
    /// do not create kernel inodes, so the number only shows in `ls -i`).
    fn peek(&self, path: &str) -> u64 {
        self.by_path.get(path).copied().unwrap_or_else(|| {
            // FNV-1a, in the upper half of the number space to stay clear of real ones.
            let h = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            h | (1 << 63)
        })
    }
}

pub(crate) struct SysFs {
    core: Core,
    inodes: Mutex<Inodes>,
    uid: u32,
    gid: u32,
    access: WriteAccess,
    started: SystemTime,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

fn split(path: &str) -> Vec<&str> {
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    }
}

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

impl SysFs {
    pub(crate) fn new(core: Core, access: WriteAccess) -> SysFs {
        SysFs {
            core,
            inodes: Mutex::new(Inodes::new()),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
            access,
            started: SystemTime::now(),
        }
    }

    fn inodes(&self) -> std::sync::MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resolve(&self, path: &str) -> Option<Entry> {
        tree::resolve(&self.core, &split(path))
    }

    fn attr(&self, ino: u64, entry: &Entry) -> FileAttr {
        let me = (self.uid, self.gid);
        let (kind, (uid, gid, perm), size, nlink) = match entry {
            Entry::Dir => (FileType::Directory, (me.0, me.1, 0o755), 0, 2),
            // sysfs reports every attribute as 4096 bytes; direct I/O makes reads exact.
            Entry::File(f) => (
                FileType::RegularFile,
                self.access.attr(&self.core, f, me),
                4096,
                1,
            ),
            Entry::Link(t) => (FileType::Symlink, (me.0, me.1, 0o777), t.len() as u64, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: 0,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The path and entry of `ino`, or ENOENT if it is gone.
    fn entry(&self, ino: INodeNo) -> Result<(String, Entry), Errno> {
        let path = self.inodes().path(ino.0).ok_or(Errno::ENOENT)?;
        let entry = self.resolve(&path).ok_or(Errno::ENOENT)?;
        Ok((path, entry))
    }

    fn file(&self, ino: INodeNo) -> Result<File, Errno> {
        match self.entry(ino)?.1 {
            Entry::File(f) => Ok(f),
            Entry::Dir => Err(Errno::EISDIR),
            Entry::Link(_) => Err(Errno::EINVAL),
        }
    }
}

impl Filesystem for SysFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let Some(parent_path) = self.inodes().path(parent.0) else {
            return reply.error(Errno::ENOENT);
        };
        let path = join(&parent_path, name);
        match self.resolve(&path) {
            Some(entry) => {
                let ino = self.inodes().lookup(&path);
                reply.entry(ttl(&path), &self.attr(ino, &entry), Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.entry(ino) {
            Ok((path, e)) => reply.attr(ttl(&path), &self.attr(ino.0, &e)),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Truncation (O_TRUNC from `echo >`) and times are accepted and mean nothing, as on
        // sysfs; ownership and modes are fixed here.
        match self.entry(ino) {
            Ok(_) if mode.is_some() || uid.is_some() || gid.is_some() => reply.error(Errno::EPERM),
            Ok((_, e)) => reply.attr(&TTL, &self.attr(ino.0, &e)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.entry(ino) {
            Ok((_, Entry::Link(t))) => reply.data(t.as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (path, f) = match self.entry(ino) {
            Ok((path, Entry::File(f))) => (path, f),
            Ok((_, Entry::Dir)) => return reply.error(Errno::EISDIR),
            Ok((_, Entry::Link(_))) => return reply.error(Errno::EINVAL),
            Err(e) => return reply.error(e),
        };
        // As kernfs does at open: EACCES for a write to a file without write permission
        // or a read of one without read permission, root included.
        let mode = f.mode();
        let (r, w) = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => (true, false),
            OpenAccMode::O_WRONLY => (false, true),
            OpenAccMode::O_RDWR => (true, true),
        };
        if (w && mode & 0o222 == 0) || (r && mode & 0o444 == 0) {
            return reply.error(Errno::EACCES);
        }
        // The kernel has checked the owner and mode; the allow-lists are the tree's.
        if w && !self.access.allows(req.uid(), req.gid(), self.uid) {
            self.access.refused(&format!(
                "uid {} gid {} (pid {}) is not in the allow-lists: a write to {path}",
                req.uid(),
                req.gid(),
                req.pid()
            ));
            return reply.error(Errno::EACCES);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let f = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        match tree::read(&self.core, &f) {
            Ok(text) => {
                let b = text.as_bytes();
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(b.len());
                let end = start.saturating_add(size as usize).min(b.len());
                reply.data(&b[start..end]);
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let f = match self.file(ino) {
            Ok(f) => f,
            Err(e) => return reply.error(e),
        };
        // sysfs takes one page at most.
        if data.len() >= 4096 {
            return reply.error(Errno::EINVAL);
        }
        let len = u32::try_from(data.len()).unwrap_or(0);
        if let File::Remove(_) = f {
            // A removal may wait for a client to release the device: do it off the FUSE
            // thread, which keeps serving everything else meanwhile.
            let core = self.core.clone();
            let data = data.to_vec();
            let spawned = std::thread::Builder::new()
                .name("umdev-remove".into())
                .spawn(move || match tree::write(&core, &f, &data) {
                    Ok(()) => reply.written(len),
                    Err(e) => reply.error(errno(e)),
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a removal thread");
            }
            return;
        }
        match tree::write(&self.core, &f, data) {
            Ok(()) => reply.written(len),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.entry(ino) {
            Ok((_, Entry::Dir)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(path) = self.inodes().path(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let parts = split(&path);
        let Some(names) = tree::children(&self.core, &parts) else {
            return reply.error(Errno::ENOENT);
        };
        let mut entries: Vec<(u64, FileType, String)> = Vec::with_capacity(names.len() + 2);
        entries.push((ino.0, FileType::Directory, ".".into()));
        entries.push((ino.0, FileType::Directory, "..".into()));
        for name in names {
            let child = join(&path, &name);
            let kind = match self.resolve(&child) {
                Some(Entry::Dir) => FileType::Directory,
                Some(Entry::File(_)) => FileType::RegularFile,
                Some(Entry::Link(_)) => FileType::Symlink,
                None => continue,
            };
            entries.push((self.inodes().peek(&child), kind, name));
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.entry(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        // Reached only for a name that does not exist: sysfs directories cannot hold new
        // files, and the VFS answers EACCES there.
        reply.error(Errno::EACCES);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EACCES);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes, as on sysfs. ENOSYS makes the kernel stop asking (it asks
        // for `security.capability` before writes otherwise).
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: fuser::ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_inodes_are_dropped_and_numbers_not_reused() {
        let mut i = Inodes::new();
        let a = i.lookup("bus");
        assert_eq!(i.lookup("bus"), a);
        i.forget(a, 1);
        assert_eq!(i.path(a).as_deref(), Some("bus"));
        i.forget(a, 1);
        assert_eq!(i.path(a), None);
        assert_ne!(i.lookup("bus"), a);
        i.forget(INodeNo::ROOT.0, 10);
        assert_eq!(i.path(INodeNo::ROOT.0).as_deref(), Some(""));
    }

    #[test]
    fn readdir_stand_ins_do_not_collide_with_real_inodes() {
        let i = Inodes::new();
        assert!(i.peek("class/mdev_bus") >= 1 << 63);
    }
}
