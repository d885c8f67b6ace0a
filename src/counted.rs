//! The changing operations of the core as the adapter calls them: each one measured by the
//! upper's counters when the mount keeps them (see `quota`), and refused with ENOSPC when what
//! it adds would not fit a cap. Until counters start they are the plain operations of
//! `write.rs`, run under a shared lock that starting the counters waits for.

use std::ffi::OsStr;
use std::io;
use std::sync::Arc;

use crate::attr::{Attr, Caller};
use crate::copyup::UPPER;
use crate::node::{Ino, Node};
use crate::overlay::{Location, Overlay};
use crate::quota::{Place, Quota};
use crate::write::SetAttr;

impl Overlay {
    /// Runs `op` measured by the counters if the mount keeps any; else holds off their start
    /// until `op` is done (so starting them misses nothing).
    pub(crate) fn counted<T>(
        &self,
        places: impl Fn() -> Vec<Place>,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        if let Some(q) = self.quota.get() {
            return q.measure(places, op);
        }
        let uncounted = self.uncounted.read_recursive();
        if let Some(q) = self.quota.get() {
            drop(uncounted);
            return q.measure(places, op);
        }
        op()
    }

    /// Refuses a change adding `inodes` and `bytes` past the cap.
    pub(crate) fn admit(&self, inodes: u64, bytes: u64) -> io::Result<()> {
        match self.quota.get() {
            Some(q) => q.admit(inodes, bytes),
            None => Ok(()),
        }
    }

    /// Files a new handle; an upper file's blocks are followed through it when counting.
    pub(crate) fn insert_file(&self, ino: Ino, file: std::fs::File, in_upper: bool) -> u64 {
        let _uncounted = self.uncounted.read_recursive();
        if in_upper && let Some(q) = self.quota.get() {
            q.opened(&file);
        }
        self.handles
            .insert(crate::handles::Handle::file(ino, file, in_upper))
    }

    /// A directory's upper copy and the name `name` in it, as they are now.
    fn entry_places(&self, parent: &Arc<Node>, name: &OsStr, subtree: bool) -> Vec<Place> {
        match parent.dir_fd(UPPER) {
            Ok(Some(dir)) => {
                let mut entry = Place::entry(dir.clone(), name);
                entry.subtree = subtree;
                vec![Place::dir(dir), entry]
            }
            _ => Vec::new(),
        }
    }

    /// The upper copy of an object, if it has one now.
    fn object_places(&self, node: &Node) -> Vec<Place> {
        match self.locate(node) {
            Ok((loc, layer)) if self.stack.is_upper(layer) => match loc {
                Location::Dir(fd) | Location::Kept(fd) => vec![Place::dir(fd)],
                Location::Entry(dir, name) => vec![Place::entry(dir, &name)],
            },
            _ => Vec::new(),
        }
    }

    fn with_parent<T>(
        &self,
        parent: Ino,
        name: &OsStr,
        new_inode_bytes: u64,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let node = self.node(parent)?;
        self.counted(
            || self.entry_places(&node, name, false),
            || {
                self.admit(1, new_inode_bytes)?;
                op()
            },
        )
    }

    pub fn mknod(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        caller: &Caller,
    ) -> io::Result<Attr> {
        self.with_parent(parent, name, 0, || {
            self.mknod_uncounted(parent, name, mode, umask, rdev, caller)
        })
    }

    pub fn mkdir(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: &Caller,
    ) -> io::Result<Attr> {
        // A new directory takes a block for its entries on most filesystems.
        self.with_parent(parent, name, 4096, || {
            self.mkdir_uncounted(parent, name, mode, umask, caller)
        })
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
        caller: &Caller,
    ) -> io::Result<Attr> {
        self.with_parent(parent, name, 0, || {
            self.symlink_uncounted(parent, name, target, caller)
        })
    }

    pub fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: &Caller,
    ) -> io::Result<(Attr, u64)> {
        self.with_parent(parent, name, 0, || {
            self.create_uncounted(parent, name, mode, umask, flags, caller)
        })
    }

    pub fn link(
        &self,
        ino: Ino,
        newparent: Ino,
        newname: &OsStr,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let node = self.node(ino)?;
        let np = self.node(newparent)?;
        self.counted(
            || {
                let mut p = self.object_places(&node);
                p.extend(self.entry_places(&np, newname, false));
                p
            },
            || self.link_uncounted(ino, newparent, newname, caller),
        )
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr, caller: &Caller) -> io::Result<()> {
        let node = self.node(parent)?;
        self.counted(
            || self.entry_places(&node, name, false),
            || self.unlink_uncounted(parent, name, caller),
        )
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr, caller: &Caller) -> io::Result<()> {
        let node = self.node(parent)?;
        self.counted(
            || self.entry_places(&node, name, true),
            || self.rmdir_uncounted(parent, name, caller),
        )
    }

    pub fn rename(
        &self,
        olddir: Ino,
        oldname: &OsStr,
        newdir: Ino,
        newname: &OsStr,
        flags: u32,
        caller: &Caller,
    ) -> io::Result<()> {
        let op = self.node(olddir)?;
        let np = self.node(newdir)?;
        self.counted(
            || {
                let mut p = self.entry_places(&op, oldname, false);
                // A directory renamed over goes away with the whiteouts it may hold.
                p.extend(self.entry_places(&np, newname, true));
                p
            },
            || self.rename_uncounted(olddir, oldname, newdir, newname, flags, caller),
        )
    }

    pub fn setattr(
        &self,
        ino: Ino,
        fh: Option<u64>,
        set: &SetAttr,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let node = self.node(ino)?;
        let result = self.counted(
            || self.object_places(&node),
            || self.setattr_uncounted(ino, fh, set, caller),
        );
        self.refresh_open(ino, fh);
        result
    }

    pub fn setxattr(
        &self,
        ino: Ino,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        caller: &Caller,
    ) -> io::Result<()> {
        let node = self.node(ino)?;
        self.counted(
            || self.object_places(&node),
            || self.setxattr_uncounted(ino, name, value, flags, caller),
        )
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr, caller: &Caller) -> io::Result<()> {
        let node = self.node(ino)?;
        self.counted(
            || self.object_places(&node),
            || self.removexattr_uncounted(ino, name, caller),
        )
    }

    /// Opens for writing, measured: the copy-up and an `O_TRUNC` change the upper.
    pub(crate) fn open_for_write_counted(
        &self,
        node: &Arc<Node>,
        flags: i32,
        caller: &Caller,
    ) -> io::Result<(u64, bool)> {
        self.counted(
            || self.object_places(node),
            || self.open_for_write(node, flags, caller),
        )
    }

    /// Before a write of `len` bytes at `offset` into `file`: refuses it when the blocks it
    /// adds would not fit a cap. The returned guard, dropped after the write, measures the
    /// file again (or, without counters, holds off their start until the write is done).
    pub(crate) fn admit_growth<'a>(
        &'a self,
        file: &'a std::fs::File,
        offset: u64,
        len: u64,
    ) -> io::Result<Measured<'a>> {
        let q = match self.quota.get() {
            Some(q) => q,
            None => {
                let uncounted = self.uncounted.read_recursive();
                match self.quota.get() {
                    Some(q) => {
                        drop(uncounted);
                        q
                    }
                    None => return Ok(Measured::Uncounted(uncounted)),
                }
            }
        };
        let changing = q.changing();
        let st = crate::layer::stat_fd(std::os::fd::AsFd::as_fd(file))?;
        q.admit(0, Quota::growth(&st, offset, len))?;
        Ok(Measured::Counted {
            quota: q,
            file,
            _changing: changing,
        })
    }

    /// Measures the file open as `fh` again (its size may have changed through it).
    pub(crate) fn refresh_open(&self, ino: Ino, fh: Option<u64>) {
        if let (Some(q), Some(fh)) = (self.quota.get(), fh) {
            let _ = self.with_file(ino, fh, |file, in_upper| {
                if in_upper {
                    q.refresh(file);
                }
                Ok(())
            });
        }
    }
}

/// Measures a file again when dropped (after the write it was admitted for).
pub(crate) enum Measured<'a> {
    Counted {
        quota: &'a Quota,
        file: &'a std::fs::File,
        _changing: parking_lot::ReentrantMutexGuard<'a, ()>,
    },
    /// Held only for its drop: counters cannot start during the write.
    Uncounted(#[allow(dead_code)] parking_lot::RwLockReadGuard<'a, ()>),
}

impl Drop for Measured<'_> {
    fn drop(&mut self) {
        if let Measured::Counted { quota, file, .. } = self {
            quota.refresh(file);
        }
    }
}
