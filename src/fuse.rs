//! The thin adapter between fuser's requests and the core: decode the request, call one
//! `Overlay` method, turn its `io::Error` into the reply's errno. Each request is logged at
//! debug level with its operation, node and outcome; nothing here knows overlay semantics.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tracing::{debug, warn};

use crate::attr::{Attr, Caller};
use crate::config::PassthroughMode;
use crate::idmap::{IdMaps, is_acl_xattr, map_acl};
use crate::nodeids::NodeIds;
use crate::overlay::Overlay;
use crate::passthrough::{OpenMode, Passthrough};
use crate::write::{SetAttr, TimeSet};

/// How the merged view is presented: the options that act at the FUSE boundary.
#[derive(Debug, Clone)]
pub struct Presentation {
    /// How long the kernel may cache names and attributes: we are the only writer of the
    /// merged view, so long timeouts are safe.
    pub ttl: Duration,
    /// Ids on disk against ids shown (`uidmapping=`, `gidmapping=`, `squash_*`).
    pub ids: IdMaps,
    /// Directories report one link (`static_nlink`).
    pub static_nlink: bool,
    /// POSIX ACLs (`noacl` turns them off).
    pub acl: bool,
    /// Extended attributes at all (`noxattrs=1` turns them off).
    pub xattrs: bool,
    /// Which open files the kernel reads and writes itself (`passthrough=`).
    pub passthrough: PassthroughMode,
}

impl Presentation {
    /// The defaults: everything on, ids unchanged.
    pub fn new(ttl: Duration) -> Presentation {
        Presentation {
            ttl,
            ids: IdMaps::default(),
            static_nlink: false,
            acl: true,
            xattrs: true,
            passthrough: PassthroughMode::All,
        }
    }
}

/// The smallest lower file that passes through. Each passthrough open costs the kernel a backing
/// file of its own, and each read through it makes the next `stat` ask us again (the kernel
/// drops the cached atime): for small files, read whole and often, that is dearer than a page
/// cache copy of their own (tar of 50,000 files of 0-64 KiB, warm: 1.6 s more), while the
/// memory shared is what large files hold.
const LOWER_PASSTHROUGH_MIN: u64 = 256 << 10;

/// Serves one `Overlay` to the kernel.
#[derive(Debug)]
pub struct FuseAdapter {
    overlay: Overlay,
    passthrough: Passthrough,
    ids: NodeIds,
    ttl: Duration,
    show: Presentation,
}

impl FuseAdapter {
    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    pub fn new(overlay: Overlay, show: Presentation) -> FuseAdapter {
        FuseAdapter {
            overlay,
            passthrough: Passthrough::default(),
            ids: NodeIds::default(),
            ttl: show.ttl,
            show,
        }
    }

    /// The object the kernel means by node id `id` (see `nodeids`).
    fn node(&self, id: INodeNo) -> INodeNo {
        INodeNo(self.ids.ino(id.0))
    }

    /// The caller, with its ids as stored on disk.
    fn caller(&self, req: &Request) -> Caller {
        Caller {
            uid: self.show.ids.uids.disk(req.uid()),
            gid: self.show.ids.gids.disk(req.gid()),
            pid: req.pid(),
            groups: Vec::new(),
        }
    }

    /// The attributes as shown through the mount.
    fn file_attr(&self, a: &Attr) -> FileAttr {
        let mut fa = file_attr(a);
        fa.uid = self.show.ids.uids.presented(a.uid);
        fa.gid = self.show.ids.gids.presented(a.gid);
        if self.show.static_nlink && a.is_dir() {
            fa.nlink = 1;
        }
        fa
    }

    /// Refuses xattr calls the options turn off: all of them with `noxattrs=1`, ACLs with
    /// `noacl` (as a filesystem without ACL support: EOPNOTSUPP).
    fn xattr_allowed(&self, name: &OsStr) -> io::Result<()> {
        if !self.show.xattrs || (!self.show.acl && is_acl_xattr(name.as_bytes())) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    /// An ACL value with its named ids moved from one side of the mapping to the other.
    fn map_acl_value(&self, name: &OsStr, value: &mut [u8], to_disk: bool) {
        if self.show.ids.is_identity() || !is_acl_xattr(name.as_bytes()) {
            return;
        }
        let (u, g) = (&self.show.ids.uids, &self.show.ids.gids);
        if to_disk {
            map_acl(value, |id| u.disk(id), |id| g.disk(id));
        } else {
            map_acl(
                value,
                |id| u.presented_unsquashed(id),
                |id| g.presented_unsquashed(id),
            );
        }
    }
}

/// The errno the caller gets; anything without one (a bug on our side) becomes EIO, logged.
fn to_errno(op: &str, e: &io::Error) -> Errno {
    match e.raw_os_error() {
        Some(code) => Errno::from_i32(code),
        None => {
            warn!(op, error = %e, "error without errno, returning EIO");
            Errno::EIO
        }
    }
}

fn log_result<T>(op: &'static str, ino: u64, res: &io::Result<T>) {
    crate::stats::request(op, res.is_err());
    if let Err(e) = res {
        debug!(op, ino, err = %e, "failed");
    } else {
        debug!(op, ino, "ok");
    }
}

fn system_time((secs, nsecs): (i64, i64)) -> SystemTime {
    let nsecs = nsecs.clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs)
    } else {
        UNIX_EPOCH - Duration::new(secs.unsigned_abs(), 0) + Duration::new(0, nsecs)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: UNIX_EPOCH,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink.min(u64::from(u32::MAX)) as u32,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize as u32,
        flags: 0,
    }
}

/// The attributes sent with a negative entry; the kernel reads only the node id (0).
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn time_set(t: Option<TimeOrNow>) -> TimeSet {
    match t {
        None => TimeSet::Omit,
        Some(TimeOrNow::Now) => TimeSet::Now,
        Some(TimeOrNow::SpecificTime(t)) => TimeSet::At(t),
    }
}

impl FuseAdapter {
    /// How the handle `fh` just opened on object `ino`, kernel inode `nodeid`, is served.
    fn open_mode(
        &self,
        nodeid: u64,
        ino: u64,
        fh: u64,
        flags: i32,
        register: impl FnOnce(&std::fs::File) -> io::Result<fuser::BackingId>,
    ) -> OpenMode {
        if !self.passthrough.is_enabled() {
            return OpenMode::Cached;
        }
        // Passthrough writes carry the caller's O_SYNC/O_DSYNC to the upper; where syncs are
        // skipped (volatile, fsync=0) such an open is served by us, who drop those flags. Under
        // a size cap writes must reach us to be counted. Lower files are only ever read.
        let opts = self.overlay.opts();
        let syncing_writes = flags & libc::O_DSYNC != 0 && !opts.sync;
        let upper_may_pass = !syncing_writes && opts.caps.bytes.is_none();
        let lower_may_pass = self.show.passthrough == PassthroughMode::All;
        self.overlay
            .with_file(ino, fh, |file, in_upper| {
                let st = file.metadata()?;
                let may_pass = if in_upper {
                    upper_may_pass
                } else {
                    lower_may_pass && st.len() >= LOWER_PASSTHROUGH_MIN
                };
                let want = may_pass.then(|| (st.dev(), st.ino()));
                Ok(self
                    .passthrough
                    .open_mode(nodeid, fh, want, || register(file)))
            })
            .unwrap_or(OpenMode::Cached)
    }

    /// An open on kernel inode `nodeid` met a conflicting backing file: the handle goes, the
    /// kernel inode is retired, and the caller's path walk retries on ESTALE under a new one.
    fn retire(&self, nodeid: u64, ino: u64, fh: u64) -> Errno {
        if let Err(e) = self.overlay.release(ino, fh) {
            debug!(ino, err = %e, "release of a conflicting open failed");
        }
        self.ids.retire(nodeid, ino);
        Errno::ESTALE
    }

    fn reply_entry(&self, op: &'static str, ino: u64, res: io::Result<Attr>, reply: ReplyEntry) {
        log_result(op, ino, &res);
        match res {
            Ok(attr) => reply.entry_as(
                INodeNo(self.ids.introduce(attr.ino)),
                &self.ttl,
                &self.file_attr(&attr),
                Generation(0),
            ),
            Err(e) => reply.error(to_errno(op, &e)),
        }
    }

    fn reply_empty(op: &'static str, ino: u64, res: io::Result<()>, reply: ReplyEmpty) {
        log_result(op, ino, &res);
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(to_errno(op, &e)),
        }
    }
}

fn reply_xattr(op: &'static str, ino: u64, res: io::Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
    log_result(op, ino, &res);
    match res {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(to_errno(op, &e)),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Bigger writes mean fewer round trips; the kernel caps the value to what it supports.
        let _ = config.set_max_write(1 << 20);
        // The kernel then enforces ACLs itself and, when an ACL that only restates the mode
        // is set, changes the mode through setattr, so its cached attributes stay right.
        // READDIRPLUS answers `ls -l` in one round trip per buffer; parallel dirops let
        // lookups in one directory run side by side; symlink targets never change once made.
        // DONT_MASK: we get the caller's mode and umask apart, and apply the umask only where
        // no default ACL takes its place.
        let acl = if self.show.acl && self.show.xattrs {
            InitFlags::FUSE_POSIX_ACL
        } else {
            InitFlags::empty()
        };
        let wanted = acl
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS;
        for flag in wanted.iter() {
            if let Err(missing) = config.add_capabilities(flag) {
                debug!(?missing, "capability not offered by the kernel");
            }
        }
        // Passthrough stacks us one level above the layers' filesystems.
        let depth = if self.overlay.stack().layers_on_stacked_fs() {
            2
        } else {
            1
        };
        // Writes through passthrough never reach us, so a capped mount passes lower files only.
        let wanted = match self.show.passthrough {
            PassthroughMode::Off => false,
            PassthroughMode::Upper => self.overlay.opts().caps.bytes.is_none(),
            PassthroughMode::All => true,
        };
        if wanted
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(depth).is_ok()
        {
            self.passthrough.enable();
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = self.overlay.lookup(parent.0, name);
        if let Err(e) = &res
            && e.raw_os_error() == Some(libc::ENOENT)
        {
            // A negative entry (node id 0) lets the kernel cache the miss: every change of the
            // merged view passes through the kernel, which drops the entry when it makes one.
            debug!(op = "lookup", ino = parent.0, "negative");
            reply.entry(&self.ttl, &negative_attr(), Generation(0));
            return;
        }
        self.reply_entry("lookup", parent.0, res, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let object = self.ids.ino(ino.0);
        self.ids.forget(ino.0, nlookup);
        self.overlay.forget(object, nlookup);
        if self.ids.in_use() && !self.overlay.knows(object) {
            self.ids.drop_object(object);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = self.node(ino);
        let res = self.overlay.getattr(ino.0, fh.map(|f| f.0));
        log_result("getattr", ino.0, &res);
        match res {
            Ok(attr) => reply.attr(&self.ttl, &self.file_attr(&attr)),
            Err(e) => reply.error(to_errno("getattr", &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ino = self.node(ino);
        let set = SetAttr {
            mode,
            uid: uid.map(|u| self.show.ids.uids.disk(u)),
            gid: gid.map(|g| self.show.ids.gids.disk(g)),
            size,
            atime: time_set(atime),
            mtime: time_set(mtime),
            // The kernel sends chown(-1, -1) as a setattr with nothing in it (and no ctime).
            ctime_only: mode.is_none()
                && uid.is_none()
                && gid.is_none()
                && size.is_none()
                && atime.is_none()
                && mtime.is_none(),
        };
        let res = self
            .overlay
            .setattr(ino.0, fh.map(|f| f.0), &set, &self.caller(req));
        log_result("setattr", ino.0, &res);
        match res {
            Ok(attr) => reply.attr(&self.ttl, &self.file_attr(&attr)),
            Err(e) => reply.error(to_errno("setattr", &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = self.node(ino);
        let res = self.overlay.readlink(ino.0);
        log_result("readlink", ino.0, &res);
        match res {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(to_errno("readlink", &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let res = self.overlay.mknod(
            parent.0,
            name,
            mode,
            umask,
            u64::from(rdev),
            &self.caller(req),
        );
        self.reply_entry("mknod", parent.0, res, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self
            .overlay
            .mkdir(parent.0, name, mode, umask, &self.caller(req));
        self.reply_entry("mkdir", parent.0, res, reply);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.overlay.unlink(parent.0, name, &self.caller(req));
        Self::reply_empty("unlink", parent.0, res, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.overlay.rmdir(parent.0, name, &self.caller(req));
        Self::reply_empty("rmdir", parent.0, res, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let res = self
            .overlay
            .symlink(parent.0, link_name, target.as_os_str(), &self.caller(req));
        self.reply_entry("symlink", parent.0, res, reply);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self.overlay.rename(
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
            &self.caller(req),
        );
        Self::reply_empty("rename", parent.0, res, reply);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let ino = self.node(ino);
        let res = self
            .overlay
            .link(ino.0, newparent.0, newname, &self.caller(req));
        self.reply_entry("link", ino.0, res, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let nodeid = ino.0;
        let ino = self.node(ino);
        let res = self.overlay.open(ino.0, flags.0, &self.caller(req));
        log_result("open", ino.0, &res);
        let (fh, lower) = match res {
            Ok(opened) => opened,
            Err(e) => return reply.error(to_errno("open", &e)),
        };
        match self.open_mode(nodeid, ino.0, fh, flags.0, |file| reply.open_backing(file)) {
            OpenMode::Passthrough(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
            }
            // A lower file cannot change under us: its page cache stays valid across opens.
            OpenMode::Cached if lower => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            OpenMode::Cached => reply.opened(FileHandle(fh), FopenFlags::empty()),
            OpenMode::Conflict => reply.error(self.retire(nodeid, ino.0, fh)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.read(ino.0, fh.0, offset, size);
        crate::stats::request("read", res.is_err());
        match res {
            Ok(data) => {
                crate::stats::read(data.len() as u64);
                reply.data(&data)
            }
            Err(e) => {
                debug!(op = "read", ino = ino.0, err = %e, "failed");
                reply.error(to_errno("read", &e))
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.write(ino.0, fh.0, offset, data);
        crate::stats::request("write", res.is_err());
        match res {
            Ok(n) => {
                crate::stats::written(n as u64);
                reply.written(n as u32)
            }
            Err(e) => {
                debug!(op = "write", ino = ino.0, err = %e, "failed");
                reply.error(to_errno("write", &e))
            }
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
        // Nothing to flush: no write-back cache, and locks are the kernel's. ENOSYS makes the
        // kernel stop sending FLUSH at all, which saves a round trip on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.node(ino);
        self.passthrough.release(fh.0);
        let res = self.overlay.release(ino.0, fh.0);
        Self::reply_empty("release", ino.0, res, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.fsync(ino.0, fh.0, datasync);
        Self::reply_empty("fsync", ino.0, res, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.node(ino);
        let res = self.overlay.opendir(ino.0);
        log_result("opendir", ino.0, &res);
        match res {
            // The kernel may keep listings in its cache: it invalidates them on every change
            // it makes to the directory, and all changes go through it.
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(to_errno("opendir", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.readdir_at(ino.0, fh.0, offset);
        log_result("readdir", ino.0, &res);
        match res {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    // The offset of an entry is where the next read resumes.
                    if reply.add(
                        INodeNo(e.ino),
                        (i + 1) as u64,
                        file_type(e.file_type),
                        &e.name,
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(to_errno("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.readdir_at(ino.0, fh.0, offset);
        log_result("readdirplus", ino.0, &res);
        let entries = match res {
            Ok(entries) => entries,
            Err(e) => return reply.error(to_errno("readdirplus", &e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            let is_dot = e.name == "." || e.name == "..";
            // The kernel takes a reference on every entry but "." and "..", whose attributes
            // it ignores: only the others count as a lookup.
            let fattr = if is_dot {
                let mut a = negative_attr();
                a.ino = INodeNo(e.ino);
                a.kind = FileType::Directory;
                a
            } else {
                match self.overlay.lookup_listed(ino.0, &e.name, e.layer) {
                    Ok(attr) => self.file_attr(&attr),
                    // Gone since the snapshot: skip it, as a later readdir would not show it.
                    Err(_) => continue,
                }
            };
            let nodeid = if is_dot {
                fattr.ino.0
            } else {
                self.ids.introduce(fattr.ino.0)
            };
            let full = reply.add(
                INodeNo(nodeid),
                (i + 1) as u64,
                &e.name,
                &self.ttl,
                &fattr,
                Generation(0),
            );
            if full {
                if !is_dot {
                    self.ids.forget(nodeid, 1);
                    self.overlay.forget(fattr.ino.0, 1);
                }
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.releasedir(ino.0, fh.0);
        Self::reply_empty("releasedir", ino.0, res, reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.fsyncdir(ino.0, datasync);
        Self::reply_empty("fsyncdir", ino.0, res, reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let ino = self.node(ino);
        let res = self.overlay.statfs();
        log_result("statfs", ino.0, &res);
        match res {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(to_errno("statfs", &e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let ino = self.node(ino);
        let res = self.xattr_allowed(name).and_then(|()| {
            let mut value = value.to_vec();
            self.map_acl_value(name, &mut value, true);
            self.overlay
                .setxattr(ino.0, name, &value, flags, &self.caller(req))
        });
        Self::reply_empty("setxattr", ino.0, res, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let ino = self.node(ino);
        if ino.0 == crate::node::ROOT_INO && name == crate::usage::USAGE_XATTR {
            let res = self.overlay.upper_usage().map(|u| u.line().into_bytes());
            return reply_xattr("getxattr", ino.0, res, size, reply);
        }
        let res = self.xattr_allowed(name).and_then(|()| {
            let mut value = self.overlay.getxattr(ino.0, name)?;
            self.map_acl_value(name, &mut value, false);
            Ok(value)
        });
        reply_xattr("getxattr", ino.0, res, size, reply);
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let ino = self.node(ino);
        let res = self
            .xattr_allowed(OsStr::new(""))
            .and_then(|()| self.overlay.listxattr(ino.0, &self.caller(req)));
        reply_xattr("listxattr", ino.0, res, size, reply);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let ino = self.node(ino);
        let res = self
            .xattr_allowed(name)
            .and_then(|()| self.overlay.removexattr(ino.0, name, &self.caller(req)));
        Self::reply_empty("removexattr", ino.0, res, reply);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let ino = self.node(ino);
        let mut who = Caller::with_groups(req.uid(), req.gid(), req.pid());
        let ids = &self.show.ids;
        who.uid = ids.uids.disk(who.uid);
        who.gid = ids.gids.disk(who.gid);
        for g in &mut who.groups {
            *g = ids.gids.disk(*g);
        }
        let res = self.overlay.access(ino.0, mask.bits(), &who);
        Self::reply_empty("access", ino.0, res, reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let res = self
            .overlay
            .create(parent.0, name, mode, umask, flags, &self.caller(req));
        log_result("create", parent.0, &res);
        let (attr, fh) = match res {
            Ok(created) => created,
            Err(e) => return reply.error(to_errno("create", &e)),
        };
        let fattr = self.file_attr(&attr);
        let nodeid = self.ids.introduce(attr.ino);
        let (fh, generation) = (FileHandle(fh), Generation(0));
        match self.open_mode(nodeid, attr.ino, fh.0, flags, |file| {
            reply.open_backing(file)
        }) {
            OpenMode::Passthrough(id) => reply.created_passthrough_as(
                INodeNo(nodeid),
                &self.ttl,
                &fattr,
                generation,
                fh,
                FopenFlags::empty(),
                &id,
            ),
            OpenMode::Cached => reply.created_as(
                INodeNo(nodeid),
                &self.ttl,
                &fattr,
                generation,
                fh,
                FopenFlags::empty(),
            ),
            OpenMode::Conflict => {
                // The entry is not introduced after all: undo its lookup.
                self.ids.forget(nodeid, 1);
                self.overlay.forget(attr.ino, 1);
                reply.error(self.retire(nodeid, attr.ino, fh.0))
            }
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.fallocate(ino.0, fh.0, offset, length, mode);
        Self::reply_empty("fallocate", ino.0, res, reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let ino = self.node(ino);
        let res = self.overlay.lseek(ino.0, fh.0, offset, whence);
        log_result("lseek", ino.0, &res);
        match res {
            Ok(off) => reply.offset(off),
            Err(e) => reply.error(to_errno("lseek", &e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (ino_in, ino_out) = (self.node(ino_in), self.node(ino_out));
        let res = self.overlay.copy_file_range(
            (ino_in.0, fh_in.0, offset_in),
            (ino_out.0, fh_out.0, offset_out),
            len,
        );
        log_result("copy_file_range", ino_in.0, &res);
        match res {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(to_errno("copy_file_range", &e)),
        }
    }
}
