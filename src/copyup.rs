//! Copy-up: an object of a lower layer gets its upper copy before anything changes it. The copy
//! is built in the work directory (data, xattrs, origin, owner, mode, times last) and put in
//! place with one `rename`, so a crash leaves either the lower version visible or the complete
//! copy. Parents are copied up first; the parent's times are restored afterwards, as the
//! kernel does, so a copy-up is invisible in the merged view.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{FchownatFlags, Gid, Uid};
use tracing::debug;

use crate::format::Origin;
use crate::layer::{self, LayerId, XattrTarget};
use crate::lookup;
use crate::node::{Backing, DirLayer, LowerData, Node, fd_of};
use crate::overlay::{Location, Overlay, errno};
use crate::sys;
use crate::workdir::WorkDir;

/// The upper layer's id: the upper is always layer 0 when there is one.
pub const UPPER: LayerId = 0;

/// What a copy-up must bring along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyData {
    /// The whole object.
    All,
    /// Everything but a regular file's data (the caller truncates it to 0 anyway).
    MetadataOnly,
    /// A metadata change: under `metacopy=on` a regular file's copy gets its metadata and
    /// size but no data (a metacopy file, read from the lower until its data is copied up);
    /// anything else, or without `metacopy=on`, is copied whole.
    Metacopy,
}

impl Overlay {
    pub(crate) fn work(&self) -> io::Result<&WorkDir> {
        if self.opts.read_only {
            return Err(errno(libc::EROFS));
        }
        self.stack.work.as_ref().ok_or_else(|| errno(libc::EROFS))
    }

    /// True when the object already lives in the upper layer.
    pub(crate) fn in_upper(&self, node: &Node) -> bool {
        self.stack.has_upper && node.state().top_layer() == Some(UPPER)
    }

    /// The upper copy of the directory `dir`, copying it (and its parents) up if needed.
    pub(crate) fn upper_dir(&self, dir: &Arc<Node>) -> io::Result<Arc<OwnedFd>> {
        self.work()?;
        if let Some(fd) = dir.dir_fd(UPPER)? {
            return Ok(fd);
        }
        self.copy_up(dir, CopyData::All)?;
        dir.dir_fd(UPPER)?.ok_or_else(|| errno(libc::EIO))
    }

    /// Gives `node` an upper copy (its metadata, under `metacopy=on`) unless the object has
    /// one, reached by any of its names: an xattr change acts on the object, and the kernel
    /// links up no name for it.
    pub(crate) fn copy_up_object(&self, node: &Arc<Node>) -> io::Result<()> {
        if self.in_upper(node) {
            return Ok(());
        }
        self.copy_up(node, CopyData::Metacopy)
    }

    /// Gives `node` an upper copy, unless it has one already.
    pub(crate) fn copy_up(&self, node: &Arc<Node>, data: CopyData) -> io::Result<()> {
        let work = self.work()?;
        let _serialized = node.copy_up_lock.lock();
        if node.state().backing.indexed().is_some() {
            // A change to a copied-up hard link goes through one of its names, which the
            // kernel links up (makes a name of the copy) first. A FUSE request does not say
            // which name: the one looked up last stands for it.
            let alias = node.state().primary_alias().cloned();
            if let Some(alias) = alias {
                self.link_up_name(node, &alias.parent, &alias.name)?;
            }
        }
        if self.in_upper(node) {
            if data != CopyData::Metacopy && node.state().backing.lower_data().is_some() {
                return self.copy_up_data(node, data);
            }
            return Ok(());
        }
        let (parent, name) = {
            let st = node.state();
            let alias = st.primary_alias().ok_or_else(|| errno(libc::ESTALE))?;
            (alias.parent.clone(), alias.name.clone())
        };
        let parent_upper = self.upper_dir(&parent)?;
        let (loc, lower) = self.locate(node)?;
        let st = loc.stat()?;
        let data = match data {
            CopyData::Metacopy
                if self.stack.metacopy && st.st_mode & libc::S_IFMT == libc::S_IFREG =>
            {
                CopyData::Metacopy
            }
            CopyData::Metacopy => CopyData::All,
            other => other,
        };
        // A metacopy file keeps reading the data its lower copy shows (itself, or the data a
        // lower metacopy file leads to).
        let lower_data = match data {
            CopyData::Metacopy => Some(self.lower_data_of(node, &parent, &name, lower)?),
            _ => None,
        };
        // Checked before anything is written: a copy that would not fit leaves no trace.
        let _changing = self.quota.get().map(|q| q.changing());
        let data_bytes = match data {
            CopyData::All => st.st_blocks as u64 * 512,
            CopyData::MetadataOnly | CopyData::Metacopy => 0,
        };
        let dir_bytes = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            4096
        } else {
            0
        };
        self.admit(1, data_bytes.max(dir_bytes))?;
        let places = || {
            vec![
                crate::quota::Place::dir(parent_upper.clone()),
                crate::quota::Place::entry(parent_upper.clone(), &name),
            ]
        };
        let copied = self.counted(places, || {
            self.copy_into(
                node,
                work,
                &parent,
                &parent_upper,
                &name,
                &loc,
                lower,
                &st,
                data,
                lower_data,
            )
        });
        if copied.is_ok() && st.st_mode & libc::S_IFMT == libc::S_IFREG {
            self.follow_copy_up(node);
        }
        copied
    }

    /// The copy itself: built in the work directory (a regular file unnamed, anything else
    /// under a temporary name), then put into `parent_upper` as `name`.
    #[allow(clippy::too_many_arguments)]
    fn copy_into(
        &self,
        node: &Arc<Node>,
        work: &crate::workdir::WorkDir,
        parent: &Arc<Node>,
        parent_upper: &Arc<OwnedFd>,
        name: &OsStr,
        loc: &Location,
        lower: LayerId,
        st: &FileStat,
        data: CopyData,
        lower_data: Option<Arc<LowerData>>,
    ) -> io::Result<()> {
        // A lower metacopy file copied up whole: its data is not where its metadata is.
        let source = match &lower_data {
            Some(_) => None,
            None => self.lower_data_location(node)?.map(|(loc, _)| loc),
        };
        // A regular file is built unnamed (O_TMPFILE) and linked into place, as the kernel
        // does: its fsync then writes the file alone (ext4 without a journal also syncs
        // the directory a new name went into), and a crash leaves no name to clean up.
        // `index=on` links the copy into the index under a name first: that one is named.
        let unnamed = match (st.st_mode & libc::S_IFMT, loc, &self.stack.index) {
            (libc::S_IFREG, Location::Entry(..), None) => unnamed_file(work.fd()),
            _ => None,
        };
        if let Some(file) = unnamed {
            // Its xattrs are set through the open file (the `Dir` target is any open fd).
            let built = self
                .build_regular(
                    &file,
                    XattrTarget::Dir(file.as_fd()),
                    loc,
                    source.as_ref(),
                    st,
                    data,
                )
                .and_then(|()| self.finish_copy(XattrTarget::Dir(file.as_fd()), loc, lower, data))
                .and_then(|origin| {
                    set_owner_mode_times_fd(&file, st)?;
                    Ok(origin)
                });
            let origin = built?;
            let parent_times = layer::stat_fd(fd_of(parent_upper))?;
            link_unnamed(&file, fd_of(parent_upper), name)?;
            return self.copied(
                node,
                parent,
                parent_upper,
                name,
                st,
                data,
                lower_data,
                origin.is_some(),
                &parent_times,
                (None, st.st_nlink > 1),
            );
        }
        let tmp = work.temp_name();
        let origin = match self.build_copy(work, &tmp, loc, source.as_ref(), lower, st, data) {
            Ok(origin) => origin,
            Err(e) => {
                work.discard(&tmp);
                return Err(e);
            }
        };
        let has_origin = origin.is_some();
        // `index=on`: a hard link's copy goes into the index first, so that every other name
        // of it finds the copy from now on (and after a crash between the two steps).
        let indexed = st.st_nlink > 1 && st.st_mode & libc::S_IFMT != libc::S_IFDIR;
        // The copy's index entry (`index=on`, a hard link), and whether this name is already a
        // link of an existing copy instead of the one just built.
        let (index_links, linked_to_existing) = match (&origin, &self.stack.index) {
            (Some(origin), Some(index)) if indexed => {
                let entry = origin.index_name();
                match self.index_new_copy(work.fd(), &tmp, origin) {
                    Ok(false) => (Some(entry), false),
                    Ok(true) => {
                        // Another name's copy is there already (made before a crash): this
                        // name becomes one of its names instead.
                        work.discard(&tmp);
                        self.link_up(index, &entry, parent, name)?;
                        tracing::debug!(entry = ?entry, "linked to the copy in the index");
                        (Some(entry), true)
                    }
                    Err(e) => {
                        work.discard(&tmp);
                        return Err(e);
                    }
                }
            }
            _ => (None, false),
        };
        let parent_times = layer::stat_fd(fd_of(parent_upper))?;
        let placed = if linked_to_existing {
            Ok(())
        } else {
            nix::fcntl::renameat(work.fd(), tmp.as_os_str(), fd_of(parent_upper), name)
                .map_err(io::Error::from)
        };
        if let Err(e) = placed {
            work.discard(&tmp);
            return Err(e);
        }
        self.copied(
            node,
            parent,
            parent_upper,
            name,
            st,
            data,
            lower_data,
            has_origin,
            &parent_times,
            (index_links, indexed),
        )
    }

    /// What follows a copy put in place as `parent_upper/name`: the parent marked impure and
    /// its times restored, the node moved to its copy, the kernel told, hard links joined.
    #[allow(clippy::too_many_arguments)]
    fn copied(
        &self,
        node: &Arc<Node>,
        parent: &Arc<Node>,
        parent_upper: &Arc<OwnedFd>,
        name: &OsStr,
        st: &FileStat,
        data: CopyData,
        lower_data: Option<Arc<LowerData>>,
        has_origin: bool,
        parent_times: &FileStat,
        (index_links, indexed): (Option<std::ffi::OsString>, bool),
    ) -> io::Result<()> {
        if has_origin {
            self.mark_impure(fd_of(parent_upper));
        }
        restore_times(fd_of(parent_upper), None, parent_times);
        debug!(ino = node.ino, name = ?name, "copied up");
        crate::stats::copied_up(if data == CopyData::All {
            st.st_size as u64
        } else {
            0
        });
        let mut state = node.state_mut();
        match &mut state.backing {
            Backing::NonDir {
                layer,
                data,
                indexed,
            } => {
                *layer = UPPER;
                *data = lower_data;
                *indexed = index_links.clone().map(Arc::new);
            }
            // A lookup racing with this copy-up may have refreshed the node with the new
            // upper copy already: one directory must not appear twice in its own merge.
            Backing::Dir(layers) if !layers.iter().any(|d| d.layer == UPPER) => {
                let fd = layer::open_dir_at(fd_of(parent_upper), name)?;
                let marks = lookup::read_dir_marks(&self.stack, &fd);
                let parent_copy = parent.dir_layer(UPPER).ok_or_else(|| errno(libc::EIO))?;
                layers.insert(0, DirLayer::child(&parent_copy, name, fd, marks)?);
            }
            Backing::Dir(_) => {}
        }
        node.backing_changed(&mut state);
        let others: Vec<_> = state.aliases.iter().skip(1).cloned().collect();
        drop(state);
        // The copy has a new ctime (a merged directory also a new link count) and its parent
        // a new entry: neither change went through the kernel.
        self.attrs_changed(node.ino);
        self.attrs_changed(parent.ino);
        if let Some(entry) = index_links {
            // The overlay's count stays the lower's; the upper's now includes the index.
            let links = crate::index::IndexedLinks::new(entry, st.st_nlink);
            self.index_names_changed(links, 0);
        } else if indexed {
            // Every name of a hard-linked file this mount knows stays a name of the one copy.
            let mut linked = 1;
            for alias in others {
                match self.link_up(parent_upper, name, &alias.parent, &alias.name) {
                    Ok(()) => linked += 1,
                    Err(e) => {
                        debug!(name = ?alias.name, error = %e, "cannot link a hard link's other name")
                    }
                }
            }
            // The names not met yet keep counting until they join the copy on lookup.
            node.state_mut().pending_links = st.st_nlink.saturating_sub(linked);
        }
        Ok(())
    }

    /// Makes `name` in `parent` (a lower name of a hard-linked file already copied up as
    /// `copy_dir/copy_name`) another name of the upper copy.
    pub(crate) fn link_up(
        &self,
        copy_dir: &Arc<OwnedFd>,
        copy_name: &OsStr,
        parent: &Arc<Node>,
        name: &OsStr,
    ) -> io::Result<()> {
        let dir = self.upper_dir(parent)?;
        let before = layer::stat_fd(fd_of(&dir))?;
        nix::unistd::linkat(
            fd_of(copy_dir),
            copy_name,
            fd_of(&dir),
            name,
            nix::fcntl::AtFlags::empty(),
        )?;
        self.mark_impure(fd_of(&dir));
        restore_times(fd_of(&dir), None, &before);
        Ok(())
    }

    /// Builds the complete copy of the object at `loc` as `tmp` in the work directory, its
    /// data read from `data_source` when that is elsewhere (a lower metacopy file's data);
    /// true when it carries an origin record.
    #[allow(clippy::too_many_arguments)]
    fn build_copy(
        &self,
        work: &WorkDir,
        tmp: &OsStr,
        loc: &Location,
        data_source: Option<&Location>,
        lower: LayerId,
        st: &FileStat,
        data: CopyData,
    ) -> io::Result<Option<Origin>> {
        let wd = work.fd();
        let kind = st.st_mode & libc::S_IFMT;
        let dst = XattrTarget::Entry(wd, tmp);
        match (kind, loc) {
            (libc::S_IFDIR, _) => {
                nix::sys::stat::mkdirat(wd, tmp, Mode::from_bits_truncate(0o700))?;
            }
            (libc::S_IFREG, Location::Entry(..)) => {
                let file = File::from(layer::open_at(
                    wd,
                    tmp,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    0o600,
                )?);
                self.build_regular(&file, dst, loc, data_source, st, data)?;
            }
            (libc::S_IFLNK, Location::Entry(dir, name)) => {
                let target = layer::readlink_at(fd_of(dir), name)?;
                nix::unistd::symlinkat(target.as_slice(), wd, tmp)?;
            }
            (_, Location::Entry(..)) => {
                let sflag = SFlag::from_bits_truncate(kind);
                nix::sys::stat::mknodat(
                    wd,
                    tmp,
                    sflag,
                    Mode::from_bits_truncate(0o600),
                    st.st_rdev,
                )?;
            }
            // Copy-up reads lower objects, which never need a kept fd.
            (_, Location::Dir(_) | Location::Kept(_)) => return Err(errno(libc::EIO)),
        }
        if kind != libc::S_IFREG {
            copy_xattrs(&self.stack.names, loc.xattr_target(), dst)?;
        }
        let origin = self.finish_copy(dst, loc, lower, data)?;
        set_owner_mode_times(wd, tmp, st)?;
        Ok(origin)
    }

    /// The data of a regular file's copy `file` (all of it, none, or a metacopy file's size
    /// as a hole), synced when syncs are on, then its xattrs (`dst` is the same file).
    fn build_regular(
        &self,
        file: &File,
        dst: XattrTarget<'_>,
        loc: &Location,
        data_source: Option<&Location>,
        st: &FileStat,
        data: CopyData,
    ) -> io::Result<()> {
        match data {
            CopyData::All => {
                let src = File::from(data_source.unwrap_or(loc).open(OFlag::O_RDONLY)?);
                copy_data(&src, file, st.st_size as u64)?;
            }
            // The size the data will have, as a hole (the kernel's metacopy file).
            CopyData::Metacopy => file.set_len(st.st_size as u64)?,
            CopyData::MetadataOnly => {}
        }
        // The copy must be complete on disk before the rename makes it visible.
        if self.opts.sync {
            file.sync_all()?;
        }
        copy_xattrs(&self.stack.names, loc.xattr_target(), dst)
    }

    /// The overlay's own records on a copy `dst` of the object at `loc`: its origin (the
    /// lower object's file handle), and the metacopy mark of a copy without data.
    fn finish_copy(
        &self,
        dst: XattrTarget<'_>,
        loc: &Location,
        lower: LayerId,
        data: CopyData,
    ) -> io::Result<Option<Origin>> {
        let origin_fd = match loc {
            Location::Dir(fd) => self.stack.origin_of(lower, fd_of(fd), None),
            Location::Entry(dir, name) => self.stack.origin_of(lower, fd_of(dir), Some(name)),
            Location::Kept(_) => None,
        };
        if let Some(origin) = &origin_fd {
            dst.set(&self.stack.names.name("origin"), &origin.encode(), 0)?;
        }
        if data == CopyData::Metacopy {
            dst.set(&self.stack.names.name("metacopy"), b"", 0)?;
        }
        Ok(origin_fd)
    }

    /// Marks an upper directory as holding copied-up objects (the kernel's `impure`), so that
    /// readers of the upper know some entries carry an origin.
    pub(crate) fn mark_impure(&self, dir: BorrowedFd<'_>) {
        let target = XattrTarget::Dir(dir);
        let name = self.stack.names.name("impure");
        if let Ok(None) = target.get_opt(&name)
            && let Err(e) = target.set(&name, b"y", 0)
        {
            debug!(error = %e, "cannot mark directory impure");
        }
    }
}

/// Owner first (it clears setuid/setgid), then mode, then times last (everything before
/// changes ctime/mtime).
pub(crate) fn set_owner_mode_times(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    st: &FileStat,
) -> io::Result<()> {
    nix::unistd::fchownat(
        dir,
        name,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
        FchownatFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
        nix::sys::stat::fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(st.st_mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
    }
    restore_times(dir, Some(name), st);
    Ok(())
}

/// `set_owner_mode_times` for a regular file held open.
fn set_owner_mode_times_fd(file: &File, st: &FileStat) -> io::Result<()> {
    nix::unistd::fchown(
        file,
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )?;
    nix::sys::stat::fchmod(file, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    let atime = TimeSpec::new(st.st_atime, st.st_atime_nsec);
    let mtime = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    if let Err(e) = nix::sys::stat::futimens(file, &atime, &mtime) {
        debug!(error = %e, "cannot restore times");
    }
    Ok(())
}

/// Set once the work directory's filesystem refused an unnamed file (no O_TMPFILE).
static NO_TMPFILE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A new unnamed regular file on the work directory's filesystem, writable, mode 0600;
/// `None` where the filesystem cannot make one (then the copy is built under a name).
fn unnamed_file(work: BorrowedFd<'_>) -> Option<File> {
    use std::sync::atomic::Ordering;
    if NO_TMPFILE.load(Ordering::Relaxed) {
        return None;
    }
    match nix::fcntl::openat(
        work,
        c".",
        OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => Some(File::from(fd)),
        Err(e) => {
            if matches!(
                e,
                nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::EISDIR
                    | nix::errno::Errno::EINVAL
            ) {
                NO_TMPFILE.store(true, Ordering::Relaxed);
            }
            debug!(error = %e, "no unnamed file in the work directory; building under a name");
            None
        }
    }
}

/// Gives the unnamed `file` its name `dir/name` (which must be free). Linking an fd needs
/// CAP_DAC_READ_SEARCH or the opener's credentials; through `/proc/self/fd` it needs neither.
fn link_unnamed(file: &File, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match nix::unistd::linkat(file, c"", dir, name, nix::fcntl::AtFlags::AT_EMPTY_PATH) {
        Err(nix::errno::Errno::EPERM | nix::errno::Errno::ENOENT) => {}
        other => return Ok(other?),
    }
    let path = sys::proc_path(file.as_fd(), None)?;
    Ok(nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        path.as_c_str(),
        dir,
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    )?)
}

/// Sets atime and mtime from `st` (best effort: a failure only leaves a newer time).
pub(crate) fn restore_times(dir: BorrowedFd<'_>, name: Option<&OsStr>, st: &FileStat) {
    let atime = TimeSpec::new(st.st_atime, st.st_atime_nsec);
    let mtime = TimeSpec::new(st.st_mtime, st.st_mtime_nsec);
    let res = match name {
        Some(name) => {
            nix::sys::stat::utimensat(dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        }
        None => nix::sys::stat::futimens(dir, &atime, &mtime),
    };
    if let Err(e) = res {
        debug!(error = %e, "cannot restore times");
    }
}

/// Copies every extended attribute except the overlay's private ones. Attributes the upper
/// filesystem cannot store (ENOTSUP) are skipped, as the kernel does for LSM labels.
pub(crate) fn copy_xattrs(
    names: &crate::format::XattrNames,
    src: XattrTarget<'_>,
    dst: XattrTarget<'_>,
) -> io::Result<()> {
    let list = match src.list() {
        Ok(l) => l,
        Err(e) if layer::is_no_xattr(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in list.iter().filter(|n| !names.is_private(n)) {
        let value = match src.get(name) {
            Ok(v) => v,
            Err(e) if layer::is_no_xattr(&e) => continue,
            Err(e) => return Err(e),
        };
        match dst.set(name, &value, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                debug!(name = %String::from_utf8_lossy(name), "xattr not supported by the upper");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `size` bytes of data: shares the blocks (FICLONE) where the filesystem can, else
/// copies only the data segments so holes stay holes.
pub(crate) fn copy_data(src: &File, dst: &File, size: u64) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    if sys::ficlone(dst.as_fd(), src.as_fd()).is_ok() {
        return Ok(());
    }
    let mut offset: u64 = 0;
    while offset < size {
        let data = match nix::unistd::lseek(src, offset as i64, nix::unistd::Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => offset,
        };
        let hole = match nix::unistd::lseek(src, data as i64, nix::unistd::Whence::SeekHole) {
            Ok(h) => (h as u64).min(size),
            Err(_) => size,
        };
        copy_range(src, dst, data, hole.saturating_sub(data))?;
        offset = hole.max(data + 1);
    }
    dst.set_len(size)
}

fn copy_range(src: &File, dst: &File, start: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (start + done) as i64;
        let mut off_out = off_in;
        let chunk = (len - done).min(1 << 30) as usize;
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(
                nix::errno::Errno::EXDEV
                | nix::errno::Errno::ENOSYS
                | nix::errno::Errno::EINVAL
                | nix::errno::Errno::EOPNOTSUPP,
            ) => {
                return copy_range_by_hand(src, dst, start + done, len - done);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn copy_range_by_hand(src: &File, dst: &File, start: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], start + done)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], start + done)?;
        done += n as u64;
    }
    Ok(())
}
