//! The operations that change the merged view. Every change lands in the upper layer: lower
//! objects are copied up first, deleted lower names leave a whiteout, a directory created over
//! a whiteout is opaque. Replacements that must be atomic (a whiteout over an upper object, a
//! new object over a whiteout) are prepared in the work directory and swapped in with
//! `RENAME_EXCHANGE`.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::SystemTime;

use nix::fcntl::{OFlag, RenameFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{FchownatFlags, Gid, Uid, UnlinkatFlags};

use crate::attr::{Attr, Caller};
use crate::copyup::{CopyData, UPPER};
use crate::format;
use crate::handles::Handle;
use crate::layer::{self, XattrTarget};
use crate::lookup::{self, Resolved};
use crate::node::{Backing, DirLayer, Ino, Node, ROOT_INO, fd_of};
use crate::overlay::{Location, Overlay, errno, open_passthrough_flags};
use crate::readdir;
use crate::workdir::make_whiteout;

/// How setattr changes one timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    Omit,
    Now,
    At(SystemTime),
}

impl TimeSet {
    fn timespec(self) -> TimeSpec {
        match self {
            TimeSet::Omit => TimeSpec::UTIME_OMIT,
            TimeSet::Now => TimeSpec::UTIME_NOW,
            TimeSet::At(t) => match t.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => TimeSpec::from_duration(d),
                Err(e) => {
                    let d = e.duration();
                    TimeSpec::new(-(d.as_secs() as i64), 0)
                        + TimeSpec::new(0, i64::from(d.subsec_nanos()))
                }
            },
        }
    }
}

/// The attribute changes of one setattr request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: TimeSet,
    pub mtime: TimeSet,
    /// Only the change time is to be set (a `chown(-1, -1)`, which still counts as a change).
    pub ctime_only: bool,
}

const RENAME_NOREPLACE: u32 = libc::RENAME_NOREPLACE;
const RENAME_EXCHANGE: u32 = libc::RENAME_EXCHANGE;

impl Overlay {
    fn resolve_child(&self, parent: &Node, name: &OsStr) -> io::Result<Option<Resolved>> {
        let layers = Self::dir_layers(parent)?;
        lookup::resolve(&self.stack, &layers, name)
    }

    /// True when some lower layer under `parent` shows `name`: removing or moving it away from
    /// the upper must then leave a whiteout.
    fn lowers_have(&self, parent: &Node, name: &OsStr) -> io::Result<bool> {
        let layers: Vec<_> = Self::dir_layers(parent)?
            .into_iter()
            .filter(|d| !self.stack.is_upper(d.layer))
            .collect();
        Ok(lookup::resolve(&self.stack, &layers, name)?.is_some())
    }

    /// True when the upper copy of `dir` holds a whiteout (or anything hidden) at `name`.
    /// A name too long to exist is not there (an OCI marker for a 252-255 byte name).
    fn upper_has_entry(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
        match layer::stat_at(dir, name) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENAMETOOLONG)) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces the upper entry `dir/name` with a whiteout in one step, then removes what was
    /// there (a directory with everything in it, which can only be whiteouts).
    fn whiteout_over(&self, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        let work = self.work()?;
        let tmp = work.temp_name();
        self.new_whiteout(work, work.fd(), &tmp)?;
        if let Err(e) = nix::fcntl::renameat2(
            work.fd(),
            tmp.as_os_str(),
            dir,
            name,
            RenameFlags::RENAME_EXCHANGE,
        ) {
            work.discard(&tmp);
            return Err(e.into());
        }
        work.discard(&tmp);
        Ok(())
    }

    /// Puts a whiteout at the free name `dir/name`: made in the work directory (so it belongs
    /// to the mounter, not to a setgid parent's group, as the kernel's) and renamed in.
    fn place_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        let work = self.work()?;
        if self.quota.get().is_none() {
            // Made in place: linking (or making) a name is atomic, and fails if the name
            // exists rather than replacing what a racing request put there.
            return work.link_whiteout(dir, name);
        }
        let tmp = work.temp_name();
        make_whiteout(work.fd(), &tmp)?;
        if let Err(e) = nix::fcntl::renameat(work.fd(), tmp.as_os_str(), dir, name) {
            work.discard(&tmp);
            return Err(e.into());
        }
        Ok(())
    }

    /// A new whiteout `dir/name`: a link of the shared one, except on a mount keeping
    /// counters, which count each whiteout as the inode it is elsewhere (`du` counts a hard
    /// link once).
    fn new_whiteout(
        &self,
        work: &crate::workdir::WorkDir,
        dir: BorrowedFd<'_>,
        name: &OsStr,
    ) -> io::Result<()> {
        if self.quota.get().is_none() {
            work.link_whiteout(dir, name)
        } else {
            make_whiteout(dir, name)
        }
    }

    /// True when the upper object at `loc` carries an origin record (copied up or merged).
    fn has_origin(&self, target: XattrTarget<'_>) -> bool {
        matches!(
            target.get_opt(&self.stack.names.name("origin")),
            Ok(Some(_))
        )
    }

    /// Creates a new object `name` in `parent` with `make`, owned by the caller. Over a
    /// whiteout it is built in the work directory (a directory marked opaque) and swapped in.
    /// `make` may return the new object opened (a regular file), which comes back with it.
    fn create_object<F>(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        caller: &Caller,
        is_dir: bool,
        make: F,
    ) -> io::Result<(Attr, Option<OwnedFd>)>
    where
        F: Fn(BorrowedFd<'_>, &OsStr) -> io::Result<Option<OwnedFd>>,
    {
        refuse_marker_name(name)?;
        self.work()?;
        let layers = Self::dir_layers(parent)?;
        let upper_only = matches!(layers.as_slice(), [only] if self.stack.is_upper(only.layer));
        if !upper_only && lookup::resolve(&self.stack, &layers, name)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        let upper = self.upper_dir(parent)?;
        let dir = fd_of(&upper);
        let over = if upper_only {
            // The upper copy alone makes this directory: what its entry is decides.
            self.hidden_in_upper_only(&layers[0], name)?
        } else {
            if Self::upper_has_entry(dir, name)? {
                Some(Hidden::ByWhiteout)
            } else if Self::upper_has_entry(
                dir,
                OsStr::from_bytes(&format::oci_whiteout_name(name)),
            )? {
                Some(Hidden::ByOciMarker)
            } else {
                None
            }
        };
        let parent_st = layer::stat_fd(dir)?;
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            parent_st.st_gid
        } else {
            caller.gid
        };
        let mut opaque = false;
        let opened = if let Some(over) = over {
            let work = self.work()?;
            let tmp = work.temp_name();
            // Built outside its parent, a directory does not inherit a setgid parent's bit by
            // itself: give it as the parent's filesystem would have.
            let inherit_sgid = is_dir && parent_st.st_mode & libc::S_ISGID != 0;
            let built = make(work.fd(), &tmp).and_then(|opened| {
                give_to(work.fd(), &tmp, caller.uid, gid)?;
                if inherit_sgid {
                    add_mode_bits(work.fd(), &tmp, libc::S_ISGID)?;
                }
                if is_dir {
                    XattrTarget::Entry(work.fd(), &tmp).set(
                        &self.stack.names.name("opaque"),
                        b"y",
                        0,
                    )?;
                }
                let flags = match over {
                    Hidden::ByWhiteout => RenameFlags::RENAME_EXCHANGE,
                    Hidden::ByOciMarker => RenameFlags::RENAME_NOREPLACE,
                };
                nix::fcntl::renameat2(work.fd(), tmp.as_os_str(), dir, name, flags)?;
                Ok(opened)
            });
            // After an exchange the temporary is the old whiteout; on failure, our new object.
            if over == Hidden::ByWhiteout || built.is_err() {
                work.discard(&tmp);
            }
            let opened = built?;
            opaque = is_dir;
            if over == Hidden::ByOciMarker {
                // The new object shadows the marker already; removing it keeps the upper as
                // plain as the kernel's (a crash before this leaves a harmless marker).
                let marker = format::oci_whiteout_name(name);
                if let Err(e) = nix::unistd::unlinkat(
                    dir,
                    OsStr::from_bytes(&marker),
                    UnlinkatFlags::NoRemoveDir,
                ) {
                    tracing::warn!(name = ?name, error = %e, "cannot remove the OCI whiteout under a new object");
                }
            }
            opened
        } else {
            let opened = make(dir, name)?;
            if let Err(e) = give_to(dir, name, caller.uid, gid) {
                let _ = crate::workdir::remove_entry(dir, name);
                return Err(e);
            }
            if is_dir && self.opts.create_redirects && parent.state().is_merged_dir() {
                // As the kernel once redirects may be written (no more offline changes to
                // the lowers): a new directory in a merged one is opaque. Only a shortcut for
                // lookups, so a failure is not an error.
                let opaque_name = self.stack.names.name("opaque");
                match XattrTarget::Entry(dir, name).set(&opaque_name, b"y", 0) {
                    Ok(()) => opaque = true,
                    Err(e) => tracing::debug!(error = %e, "cannot mark a new directory opaque"),
                }
            }
            opened
        };
        let since = crate::node::backing_changes();
        let r = self.resolve_new(parent, &upper, name, opaque, opened.as_ref())?;
        Ok((self.remember(parent, name, r, since), opened))
    }

    /// What `name`, just made in the upper copy `upper_dir` of `parent`, resolves to: the
    /// new object alone (no origin, no metacopy). Nothing below it shows: the name was free
    /// in the merged view, so every lower either lacks it or hides it behind a whiteout,
    /// and a new directory over a whiteout is opaque. Read without asking the layers again,
    /// as the kernel's overlay takes the new upper dentry as it is.
    fn resolve_new(
        &self,
        parent: &Arc<Node>,
        upper_dir: &Arc<OwnedFd>,
        name: &OsStr,
        opaque: bool,
        opened: Option<&OwnedFd>,
    ) -> io::Result<Resolved> {
        let dir = fd_of(upper_dir);
        let st = match opened {
            Some(fd) => layer::stat_fd(fd.as_fd())?,
            None => layer::stat_at(dir, name)?,
        };
        let backing = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let parent_copy = parent.dir_layer(UPPER).ok_or_else(|| errno(libc::EIO))?;
            let fd = layer::open_dir_at(dir, name)?;
            let marks = format::DirMarks {
                opaque,
                xwhiteouts: false,
            };
            Backing::Dir(vec![DirLayer::child(&parent_copy, name, fd, marks)?])
        } else {
            Backing::non_dir(UPPER)
        };
        Ok(Resolved::new(backing, st, UPPER, None, None))
    }

    /// For a directory made of its upper copy `dl` alone: EEXIST when `name` exists in the
    /// merged view, else what hides a former object there, as `lookup::resolve` judges it.
    fn hidden_in_upper_only(&self, dl: &DirLayer, name: &OsStr) -> io::Result<Option<Hidden>> {
        match layer::stat_at(fd_of(&dl.fd()?), name) {
            Ok(st) if lookup::is_whiteout(&self.stack, dl, name, &st) => {
                Ok(Some(Hidden::ByWhiteout))
            }
            Ok(_) => Err(errno(libc::EEXIST)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if lookup::has_oci_whiteout(dl, name)? {
                    Ok(Some(Hidden::ByOciMarker))
                } else {
                    Ok(None)
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The permission bits of a new object: the caller's umask applies unless the parent has a
    /// default ACL, which the upper filesystem applies instead (POSIX ACL semantics).
    fn new_mode(&self, parent: &Arc<Node>, mode: u32, umask: u32) -> io::Result<u32> {
        let upper = self.upper_dir(parent)?;
        let has_default_acl = matches!(
            XattrTarget::Dir(fd_of(&upper)).get_opt(b"system.posix_acl_default"),
            Ok(Some(_))
        );
        Ok(if has_default_acl {
            mode & 0o7777
        } else {
            mode & 0o7777 & !umask
        })
    }

    pub(crate) fn mknod_uncounted(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFCHR && rdev == 0 {
            // A character device 0/0 is a whiteout in the upper: a caller making one would
            // hide or forge content. The kernel's overlay refuses it the same way.
            return Err(errno(libc::EPERM));
        }
        let parent = self.node(parent)?;
        let perm = self.new_mode(&parent, mode, umask)?;
        self.create_object(&parent, name, caller, false, |dir, n| {
            if kind == libc::S_IFREG || kind == 0 {
                layer::open_at(
                    dir,
                    n,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    perm,
                )
                .map(Some)
            } else {
                nix::sys::stat::mknodat(
                    dir,
                    n,
                    SFlag::from_bits_truncate(kind),
                    Mode::from_bits_truncate(perm),
                    rdev,
                )?;
                Ok(None)
            }
        })
        .map(|(attr, _)| attr)
    }

    pub(crate) fn mkdir_uncounted(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let parent = self.node(parent)?;
        let perm = self.new_mode(&parent, mode, umask)?;
        self.create_object(&parent, name, caller, true, |dir, n| {
            nix::sys::stat::mkdirat(dir, n, Mode::from_bits_truncate(perm))?;
            Ok(None)
        })
        .map(|(attr, _)| attr)
    }

    pub(crate) fn symlink_uncounted(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let parent = self.node(parent)?;
        self.create_object(&parent, name, caller, false, |dir, n| {
            nix::unistd::symlinkat(target, dir, n)?;
            Ok(None)
        })
        .map(|(attr, _)| attr)
    }

    /// Creates and opens a regular file; an existing one is opened (and truncated if asked),
    /// unless `O_EXCL`.
    pub(crate) fn create_uncounted(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: &Caller,
    ) -> io::Result<(Attr, u64)> {
        let parent_node = self.node(parent)?;
        let perm = self.new_mode(&parent_node, mode, umask)?;
        let flags = flags & !libc::O_CREAT;
        // Made open as the caller asked (no truncation: it is new), so that the handle is
        // the file just made, with no second open.
        let mut open_flags = open_passthrough_flags(flags) - OFlag::O_TRUNC;
        if !self.opts.sync {
            open_flags.remove(OFlag::O_SYNC | OFlag::O_DSYNC);
        }
        // O_DIRECT may be refused by the upper's filesystem: then the file is made all the
        // same and the open fails after, as in the kernel's overlay.
        let direct = open_flags.contains(OFlag::O_DIRECT);
        let made = self.create_object(&parent_node, name, caller, false, |dir, n| {
            let new = OFlag::O_CREAT | OFlag::O_EXCL;
            if direct {
                layer::open_at(dir, n, OFlag::O_WRONLY | new, perm).map(|_| None)
            } else {
                layer::open_at(dir, n, open_flags | new, perm).map(Some)
            }
        });
        let attr = match made {
            Ok((attr, Some(fd))) => {
                let fh = self.insert_file(attr.ino, File::from(fd), true);
                return Ok((attr, fh));
            }
            Ok((attr, None)) => attr,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                self.lookup(parent, name)?
            }
            Err(e) => return Err(e),
        };
        let node = self.node(attr.ino)?;
        let flags = flags & !libc::O_EXCL;
        let (fh, _) = if crate::overlay::wants_write(flags) {
            self.open_for_write(&node, flags, caller)?
        } else {
            self.open(attr.ino, flags, caller)?
        };
        Ok((attr, fh))
    }

    pub(crate) fn link_uncounted(
        &self,
        ino: Ino,
        newparent: Ino,
        newname: &OsStr,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let _ = caller;
        refuse_marker_name(newname)?;
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(errno(libc::EPERM));
        }
        let np = self.node(newparent)?;
        if self.resolve_child(&np, newname)?.is_some() {
            return Err(errno(libc::EEXIST));
        }
        self.copy_up(&node, CopyData::Metacopy)?;
        let index_links = self.index_links(&node);
        let new_upper = self.upper_dir(&np)?;
        let (old_dir, old_name) = match self.locate(&node)? {
            (Location::Entry(dir, name), _) => (dir, name),
            // A file without a name cannot get one back (as linkat(2) of an unlinked file).
            (Location::Kept(_), _) => return Err(errno(libc::ENOENT)),
            (Location::Dir(_), _) => return Err(errno(libc::EPERM)),
        };
        if node.state().backing.lower_data().is_some() {
            // The new name has no lower data under it: both names find it by absolute path.
            let parent = node.state().primary_alias().map(|a| a.parent.clone());
            let parent = parent.ok_or_else(|| errno(libc::ENOENT))?;
            let target = XattrTarget::Entry(fd_of(&old_dir), &old_name);
            self.set_redirect(&node, target, &parent, &old_name, false)?;
        }
        let link = |dir: BorrowedFd<'_>, name: &OsStr| -> io::Result<()> {
            Ok(nix::unistd::linkat(
                fd_of(&old_dir),
                old_name.as_os_str(),
                dir,
                name,
                nix::fcntl::AtFlags::empty(),
            )?)
        };
        let dir = fd_of(&new_upper);
        if Self::upper_has_entry(dir, newname)? {
            let work = self.work()?;
            let tmp = work.temp_name();
            let res = link(work.fd(), &tmp).and_then(|()| {
                nix::fcntl::renameat2(
                    work.fd(),
                    tmp.as_os_str(),
                    dir,
                    newname,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .map_err(io::Error::from)
            });
            work.discard(&tmp);
            res?;
        } else {
            link(dir, newname)?;
        }
        if let Some(links) = index_links {
            self.index_names_changed(links, 1);
        }
        let st = layer::stat_at(dir, newname)?;
        if self.has_origin(XattrTarget::Entry(dir, newname)) {
            self.mark_impure(dir);
        }
        node.state_mut().add_alias(&np, newname);
        self.nodes.count_reference(&node);
        Ok(self.attr_of(&node, &st))
    }

    pub(crate) fn unlink_uncounted(
        &self,
        parent: Ino,
        name: &OsStr,
        _caller: &Caller,
    ) -> io::Result<()> {
        self.work()?;
        let parent = self.node(parent)?;
        let mut r = self
            .resolve_child(&parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        if matches!(r.backing, Backing::Dir(_)) {
            return Err(errno(libc::EISDIR));
        }
        if let Some(node) = self.nodes.get(self.ino_of(&r))
            && self.copy_up_before_name_goes(&node, &parent, name)?
        {
            r = self
                .resolve_child(&parent, name)?
                .ok_or_else(|| errno(libc::ENOENT))?;
        }
        self.remove_entry(&parent, name, &r)
    }

    pub(crate) fn rmdir_uncounted(
        &self,
        parent: Ino,
        name: &OsStr,
        _caller: &Caller,
    ) -> io::Result<()> {
        self.work()?;
        let parent = self.node(parent)?;
        let r = self
            .resolve_child(&parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let Backing::Dir(layers) = &r.backing else {
            return Err(errno(libc::ENOTDIR));
        };
        if !readdir::is_empty_for_removal(&self.stack, layers)? {
            return Err(errno(libc::ENOTEMPTY));
        }
        self.remove_entry(&parent, name, &r)
    }

    /// Removes `name` (resolved as `r`) from the merged view.
    fn remove_entry(&self, parent: &Arc<Node>, name: &OsStr, r: &Resolved) -> io::Result<()> {
        let node = self.nodes.get(self.ino_of(r));
        let others = self.other_nodes_named(parent.ino, name, r);
        // An object found in a lower is there: only an upper one needs the lowers asked.
        let needs_whiteout = !self.stack.is_upper(r.top) || self.lowers_have(parent, name)?;
        if needs_whiteout && !self.stack.is_upper(r.top) {
            // The whiteout is a new inode in the upper.
            self.admit(1, 0)?;
        }
        let upper = self.upper_dir(parent)?;
        let dir = fd_of(&upper);
        let gone: Vec<&Arc<Node>> = node.iter().chain(&others).collect();
        self.keep_before_name_goes(&gone, dir, name, r);
        let index_links = node.as_ref().and_then(|n| self.index_links(n));
        if self.stack.is_upper(r.top) {
            if needs_whiteout {
                self.whiteout_over(dir, name)?;
            } else if let Backing::Dir(layers) = &r.backing {
                // Only whiteouts can be left in an empty merged directory's upper copy.
                if let Some(top) = layers.first() {
                    crate::workdir::clear_dir(fd_of(&top.fd()?))?;
                }
                nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)?;
            } else {
                nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?;
            }
        } else {
            self.place_whiteout(dir, name)?;
        }
        if let Some(links) = index_links {
            self.index_names_changed(links, -1);
        }
        if let Some(node) = node {
            if !self.stack.is_upper(r.top) {
                // A lower name of a copied-up hard link that never joined the copy is gone.
                let mut state = node.state_mut();
                state.pending_links = state.pending_links.saturating_sub(1);
            }
            node.state_mut().remove_alias(parent.ino, name);
        }
        for n in others {
            n.state_mut().remove_alias(parent.ino, name);
        }
        Ok(())
    }

    /// Keeps the upper object `r`, found as `name` in the upper directory `dir`, alive while
    /// `nodes` (the live nodes that stand for it) live, before that name is removed or
    /// replaced: a directory's copy stays open, anything else gets an `O_PATH` fd (see
    /// `NodeState::kept`). Else the upper filesystem could free the inode and give its number,
    /// which is also the node id the kernel still holds, to a new object. The fd is taken from
    /// the name being removed, not from the node's own name, which may be stale. A lower
    /// object needs none: it stays where it is in its lower layer.
    fn keep_before_name_goes(
        &self,
        nodes: &[&Arc<Node>],
        dir: BorrowedFd<'_>,
        name: &OsStr,
        r: &Resolved,
    ) {
        if nodes.is_empty() {
            return;
        }
        if let Backing::Dir(_) = &r.backing {
            for n in nodes {
                if let Some(upper) = n.dir_layer(UPPER) {
                    // A directory's open copy keeps its inode alive: no more closing it.
                    if let Err(e) = upper.dir.pin() {
                        tracing::debug!(error = %e, "cannot keep a removed directory open");
                    }
                }
            }
            return;
        }
        if !self.stack.is_upper(r.top) {
            return;
        }
        let kind = r.stat.st_mode & libc::S_IFMT;
        // Any name may be the last one (hard links): keep the object whenever one goes.
        let fd = match layer::open_at(dir, name, OFlag::O_PATH, 0) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(name = ?name, error = %e, "cannot keep an object losing a name");
                return;
            }
        };
        match layer::stat_fd(layer::borrow(&fd)) {
            Ok(st) if st.st_ino == r.stat.st_ino && st.st_dev == r.stat.st_dev => {}
            _ => {
                tracing::debug!(name = ?name, "the name being removed holds another object");
                return;
            }
        }
        let fd = Arc::new(fd);
        for n in nodes {
            let mut st = n.state_mut();
            if st.file_type == kind {
                st.kept = Some(fd.clone());
            }
        }
    }

    /// Keeps an `O_PATH` fd of the upper symlink `node`, found as `name` in the upper
    /// directory `dir`, before a rename moves it: until the node learns its new name, its old
    /// one holds something else (a whiteout above all), and a readlink racing with the rename
    /// reaches the symlink through this fd (see `NodeState::kept`).
    fn keep_moving_symlink(&self, node: &Arc<Node>, dir: BorrowedFd<'_>, name: &OsStr) {
        if node.state().file_type != libc::S_IFLNK {
            return;
        }
        let fd = match layer::open_at(dir, name, OFlag::O_PATH, 0) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(name = ?name, error = %e, "cannot keep a symlink being moved");
                return;
            }
        };
        if layer::stat_fd(layer::borrow(&fd))
            .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
        {
            let mut st = node.state_mut();
            if st.file_type == libc::S_IFLNK {
                st.kept = Some(Arc::new(fd));
            }
        }
    }

    /// A directory the upper alone holds and that never had lower content (no origin
    /// record), so it cannot hold whiteouts that matter.
    fn is_pure_upper_dir(&self, layers: &[DirLayer]) -> bool {
        matches!(layers, [only] if self.stack.is_upper(only.layer)
            && only.fd().is_ok_and(|fd| !self.has_origin(XattrTarget::Dir(fd_of(&fd)))))
    }

    /// A directory may move if it is the upper's alone, or with lower content only where
    /// redirects are written (`redirect_dir=on`).
    fn can_move(&self, r: &Resolved) -> bool {
        self.opts.create_redirects || !self.has_lower_content(r)
    }

    /// True for a directory with a copy in a lower layer (the kernel's "merge or lower").
    fn has_lower_content(&self, r: &Resolved) -> bool {
        matches!(&r.backing, Backing::Dir(layers)
            if layers.iter().any(|d| !self.stack.is_upper(d.layer)))
    }

    /// Before an object moves from `from/name` (its upper entry `dir/name`) into `into`, as
    /// the kernel: a directory with lower content, or a metacopy file, records where that
    /// content lives (a redirect); a directory without, moving into a merged directory,
    /// becomes opaque unless it is already. Anything else is left alone.
    #[allow(clippy::too_many_arguments)]
    fn prepare_moving(
        &self,
        r: &Resolved,
        node: Option<&Arc<Node>>,
        from: &Arc<Node>,
        name: &OsStr,
        dir: BorrowedFd<'_>,
        into: &Node,
        samedir: bool,
    ) -> io::Result<()> {
        let target = XattrTarget::Entry(dir, name);
        if !matches!(r.backing, Backing::Dir(_)) {
            if let Some(node) = node
                && node.state().backing.lower_data().is_some()
            {
                return self.set_redirect(node, target, from, name, samedir);
            }
            return Ok(());
        }
        if self.has_lower_content(r) {
            let node = node.ok_or_else(|| errno(libc::ESTALE))?;
            return self.set_redirect(node, target, from, name, samedir);
        }
        if !is_opaque_dir(r) && into.state().is_merged_dir() {
            XattrTarget::Entry(dir, name).set(&self.stack.names.name("opaque"), b"y", 0)?;
            // The mark stays if the rename fails, and the kernel keeps no cached attributes
            // fresh after a failed rename.
            self.attrs_changed(self.ino_of(r));
        }
        Ok(())
    }

    /// Records on the copied-up `node` (a directory, or a metacopy file), whose upper entry
    /// is `upper`, about to move away from `parent/name`, where its lower content lives, as
    /// the kernel's `ovl_set_redirect`: its old name when it stays in the same directory, else
    /// its absolute path. A redirect it has already is kept when it still holds (same
    /// directory, or absolute). Fails with EXDEV, so that `mv` copies instead, when the
    /// redirect cannot be written.
    fn set_redirect(
        &self,
        node: &Arc<Node>,
        upper: XattrTarget<'_>,
        parent: &Arc<Node>,
        name: &OsStr,
        samedir: bool,
    ) -> io::Result<()> {
        let key = self.stack.names.name("redirect");
        let own = upper.get_opt(&key).ok().flatten();
        // A file with several names may have them in several directories: its redirect is
        // always absolute (the kernel's rule, which looks at the overlay's link count).
        let relative = samedir
            && (node.is_dir()
                || self
                    .locate(node)
                    .and_then(|(loc, _)| loc.stat())
                    .is_ok_and(|st| self.attr_of(node, &st).nlink <= 1));
        if let Some(r) = &own
            && (relative || r.starts_with(b"/"))
        {
            return Ok(());
        }
        let value = if relative {
            name.as_bytes().to_vec()
        } else {
            self.absolute_redirect(own, parent, name)?
        };
        if value.len() > REDIRECT_MAX {
            return Err(errno(libc::EXDEV));
        }
        if let Err(e) = upper.set(&key, &value, 0) {
            tracing::warn!(error = %e, "cannot write a redirect; the rename falls back to EXDEV");
            return Err(errno(libc::EXDEV));
        }
        self.attrs_changed(node.ino);
        Ok(())
    }

    /// The redirect recorded on `dir`'s upper copy, if it has both.
    fn upper_redirect(&self, dir: &Node) -> Option<Vec<u8>> {
        let upper = dir.dir_fd(UPPER).ok()??;
        XattrTarget::Dir(fd_of(&upper))
            .get_opt(&self.stack.names.name("redirect"))
            .ok()
            .flatten()
    }

    /// The absolute redirect of the directory at `parent/name` whose own redirect is `own`:
    /// its path from the root where each directory's own redirect stands for its name, up to
    /// the first absolute one (the kernel's `ovl_get_redirect`).
    fn absolute_redirect(
        &self,
        own: Option<Vec<u8>>,
        parent: &Arc<Node>,
        name: &OsStr,
    ) -> io::Result<Vec<u8>> {
        let mut parts = vec![own.unwrap_or_else(|| name.as_bytes().to_vec())];
        let mut dir = parent.clone();
        while !parts.last().is_some_and(|p| p.starts_with(b"/")) && dir.ino != ROOT_INO {
            let (up, dir_name) = {
                let st = dir.state();
                let alias = st.primary_alias().ok_or_else(|| errno(libc::EXDEV))?;
                (alias.parent.clone(), alias.name.as_bytes().to_vec())
            };
            parts.push(self.upper_redirect(&dir).unwrap_or(dir_name));
            dir = up;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev() {
            if !part.starts_with(b"/") {
                path.push(b'/');
            }
            path.extend_from_slice(part);
        }
        Ok(path)
    }

    pub(crate) fn rename_uncounted(
        &self,
        olddir: Ino,
        oldname: &OsStr,
        newdir: Ino,
        newname: &OsStr,
        flags: u32,
        _caller: &Caller,
    ) -> io::Result<()> {
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        {
            return Err(errno(libc::EINVAL));
        }
        refuse_marker_name(newname)?;
        self.work()?;
        let exchange = flags & RENAME_EXCHANGE != 0;
        let op = self.node(olddir)?;
        let np = self.node(newdir)?;
        let src = self
            .resolve_child(&op, oldname)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let dst = self.resolve_child(&np, newname)?;
        let src_is_dir = matches!(src.backing, Backing::Dir(_));
        match &dst {
            None if exchange => return Err(errno(libc::ENOENT)),
            Some(_) if flags & RENAME_NOREPLACE != 0 => return Err(errno(libc::EEXIST)),
            _ => {}
        }
        if src_is_dir && !self.can_move(&src) {
            return Err(errno(libc::EXDEV));
        }
        let src_ino = self.ino_of(&src);
        if let Some(d) = &dst {
            let dst_is_dir = matches!(d.backing, Backing::Dir(_));
            if exchange {
                if dst_is_dir && !self.can_move(d) {
                    return Err(errno(libc::EXDEV));
                }
            } else if dst_is_dir && !src_is_dir {
                return Err(errno(libc::EISDIR));
            } else if !dst_is_dir && src_is_dir {
                return Err(errno(libc::ENOTDIR));
            } else if let Backing::Dir(layers) = &d.backing
                && !self.is_pure_upper_dir(layers)
                && !readdir::is_empty_for_removal(&self.stack, layers)?
            {
                // A target with lower content is checked before anything changes; the
                // upper's rename(2) checks a pure upper one, after the opaque mark below
                // (the kernel's order, which leaves that mark when the rename fails).
                return Err(errno(libc::ENOTEMPTY));
            }
            if self.ino_of(d) == src_ino {
                // Two names of one file: rename(2) does nothing.
                return Ok(());
            }
        }
        let src_node = self.nodes.get(src_ino).ok_or_else(|| errno(libc::ESTALE))?;
        let mut dst = dst;
        if !exchange
            && let Some(d) = &dst
            && !matches!(d.backing, Backing::Dir(_))
            && let Some(replaced) = self.nodes.get(self.ino_of(d))
            && self.copy_up_before_name_goes(&replaced, &np, newname)?
        {
            dst = self.resolve_child(&np, newname)?;
        }
        self.copy_up(&src_node, CopyData::Metacopy)?;
        // The name moved must be the copy's own (not only a lower name reaching it).
        self.link_up_name(&src_node, &op, oldname)?;
        let dst_node = match &dst {
            Some(d) => self.nodes.get(self.ino_of(d)),
            None => None,
        };
        let dst_others = match &dst {
            Some(d) => self.other_nodes_named(np.ino, newname, d),
            None => Vec::new(),
        };
        let src_others = self.other_nodes_named(op.ino, oldname, &src);
        if exchange && let Some(d) = &dst_node {
            self.copy_up(d, CopyData::Metacopy)?;
            self.link_up_name(d, &np, newname)?;
        }
        // A file replaced loses a name.
        let replaced_links = match &dst_node {
            Some(d) if !exchange && !d.is_dir() => self.index_links(d),
            _ => None,
        };
        let old_upper = self.upper_dir(&op)?;
        let new_upper = self.upper_dir(&np)?;
        let (od, nd) = (fd_of(&old_upper), fd_of(&new_upper));
        let old_needs_whiteout = !exchange && self.lowers_have(&op, oldname)?;
        let samedir = op.ino == np.ino;
        self.prepare_moving(&src, Some(&src_node), &op, oldname, od, &np, samedir)?;
        if exchange && let Some(d) = &dst {
            self.prepare_moving(d, dst_node.as_ref(), &np, newname, nd, &op, samedir)?;
        }
        if !exchange && let Some(d) = &dst {
            let gone: Vec<&Arc<Node>> = dst_node.iter().chain(&dst_others).collect();
            self.keep_before_name_goes(&gone, nd, newname, d);
        }
        if !exchange
            && let Some(Resolved {
                backing: Backing::Dir(layers),
                top,
                ..
            }) = &dst
            && self.stack.is_upper(*top)
            && !self.is_pure_upper_dir(layers)
            && let Some(l) = layers.first()
        {
            crate::workdir::clear_dir(fd_of(&l.fd()?))?;
        }
        // As the kernel, before the rename (so also when it fails): a directory that is to
        // hold an object with an origin record from another directory is impure.
        if !samedir {
            if self.has_origin(XattrTarget::Entry(od, oldname)) {
                self.mark_impure(nd);
            }
            if exchange && self.has_origin(XattrTarget::Entry(nd, newname)) {
                self.mark_impure(od);
            }
        }
        self.keep_moving_symlink(&src_node, od, oldname);
        let renamed = self.rename_in_upper(
            od,
            oldname,
            nd,
            newname,
            exchange,
            old_needs_whiteout,
            src_is_dir,
        );
        if renamed.is_err() {
            // A failed RENAME_WHITEOUT may still have restamped the source directory (ext4
            // does), and the kernel refreshes nothing after a failed rename.
            self.attrs_changed(op.ino);
        }
        renamed?;
        if let Some(links) = replaced_links {
            self.index_names_changed(links, -1);
        }
        {
            let mut st = src_node.state_mut();
            st.remove_alias(op.ino, oldname);
            st.add_alias(&np, newname);
        }
        for n in src_others {
            n.state_mut().remove_alias(op.ino, oldname);
        }
        if !exchange {
            for n in dst_others {
                n.state_mut().remove_alias(np.ino, newname);
            }
        }
        // A moved directory's upper copy is reopened from its new place from now on.
        let upper_of = |n: &Node| n.dir_layer(UPPER);
        if let (Some(moved), Some(to)) = (upper_of(&src_node), upper_of(&np)) {
            moved.dir.moved_to(&to.dir, newname);
        }
        if let Some(d) = dst_node {
            let mut st = d.state_mut();
            st.remove_alias(np.ino, newname);
            if exchange {
                st.add_alias(&op, oldname);
            }
            drop(st);
            if exchange && let (Some(moved), Some(to)) = (upper_of(&d), upper_of(&op)) {
                moved.dir.moved_to(&to.dir, oldname);
            }
        }
        Ok(())
    }

    /// The rename itself, in the upper: atomic with the whiteout it must leave behind.
    #[allow(clippy::too_many_arguments)]
    fn rename_in_upper(
        &self,
        od: BorrowedFd<'_>,
        oldname: &OsStr,
        nd: BorrowedFd<'_>,
        newname: &OsStr,
        exchange: bool,
        whiteout: bool,
        src_is_dir: bool,
    ) -> io::Result<()> {
        if exchange {
            return Ok(nix::fcntl::renameat2(
                od,
                oldname,
                nd,
                newname,
                RenameFlags::RENAME_EXCHANGE,
            )?);
        }
        let target_is_whiteout =
            matches!(layer::stat_at(nd, newname), Ok(st) if crate::format::is_char_whiteout(&st));
        if src_is_dir && target_is_whiteout {
            // A directory cannot replace a device node: swap them, then the whiteout that
            // lands at the old name is either wanted there or removed.
            nix::fcntl::renameat2(od, oldname, nd, newname, RenameFlags::RENAME_EXCHANGE)?;
            if !whiteout {
                nix::unistd::unlinkat(od, oldname, UnlinkatFlags::NoRemoveDir)?;
            }
            return Ok(());
        }
        if whiteout {
            match nix::fcntl::renameat2(od, oldname, nd, newname, RenameFlags::RENAME_WHITEOUT) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => return Err(e.into()),
            }
            nix::fcntl::renameat(od, oldname, nd, newname)?;
            return self.place_whiteout(od, oldname);
        }
        Ok(nix::fcntl::renameat(od, oldname, nd, newname)?)
    }

    pub(crate) fn setattr_uncounted(
        &self,
        ino: Ino,
        fh: Option<u64>,
        set: &SetAttr,
        caller: &Caller,
    ) -> io::Result<Attr> {
        let _ = caller;
        self.work()?;
        let node = self.node(ino)?;
        if self.in_upper(&node)
            && node.state().aliases.is_empty()
            && let Some(file) = self.handles.any_file_of(ino, true)
        {
            // Unlinked while open: only its open files reach it.
            return self.setattr_open_file(&node, &file, set);
        }
        let data = match set.size {
            Some(0) => CopyData::MetadataOnly,
            Some(_) => CopyData::All,
            None => CopyData::Metacopy,
        };
        self.copy_up(&node, data)?;
        let (loc, _, st) = self.locate_stat(&node)?;
        if let Location::Kept(_) = &loc {
            // Unlinked, not open through us, still held by the kernel (a path through
            // /proc/PID/fd): change the file itself, never what its old name holds now.
            let access = if set.size.is_some() {
                OFlag::O_WRONLY
            } else {
                OFlag::O_RDONLY
            };
            let file = File::from(loc.open(access)?);
            return self.setattr_open_file(&node, &file, set);
        }
        let (dir, name): (BorrowedFd<'_>, Option<&OsStr>) = match &loc {
            Location::Dir(fd) => (fd_of(fd), None),
            Location::Entry(d, n) => (fd_of(d), Some(n.as_os_str())),
            Location::Kept(_) => return Err(errno(libc::ENOENT)),
        };
        if set.uid.is_some() || set.gid.is_some() || set.ctime_only {
            let uid = set.uid.map(Uid::from_raw);
            let gid = set.gid.map(Gid::from_raw);
            match name {
                Some(n) => {
                    nix::unistd::fchownat(dir, n, uid, gid, FchownatFlags::AT_SYMLINK_NOFOLLOW)?
                }
                None => nix::unistd::fchown(dir, uid, gid)?,
            }
        }
        if let Some(mode) = set.mode {
            if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                return Err(errno(libc::EOPNOTSUPP));
            }
            let mode = Mode::from_bits_truncate(mode & 0o7777);
            match name {
                Some(n) => nix::sys::stat::fchmodat(
                    dir,
                    n,
                    mode,
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?,
                None => nix::sys::stat::fchmod(dir, mode)?,
            }
        }
        if let Some(size) = set.size {
            self.truncate(&node, fh, &loc, size)?;
        }
        if set.atime != TimeSet::Omit || set.mtime != TimeSet::Omit {
            let (a, m) = (set.atime.timespec(), set.mtime.timespec());
            match name {
                Some(n) => {
                    nix::sys::stat::utimensat(dir, n, &a, &m, UtimensatFlags::NoFollowSymlink)?
                }
                None => nix::sys::stat::futimens(dir, &a, &m)?,
            }
        }
        let st = loc.stat()?;
        Ok(self.attr_of(&node, &st))
    }

    fn setattr_open_file(&self, node: &Node, file: &File, set: &SetAttr) -> io::Result<Attr> {
        if set.uid.is_some() || set.gid.is_some() {
            nix::unistd::fchown(file, set.uid.map(Uid::from_raw), set.gid.map(Gid::from_raw))?;
        }
        if let Some(mode) = set.mode {
            nix::sys::stat::fchmod(file, Mode::from_bits_truncate(mode & 0o7777))?;
        }
        if let Some(size) = set.size {
            // The open file found may be read-only (another opener's): truncate through a
            // writable opening of the same file.
            let writable = File::from(layer::reopen(file.as_fd(), OFlag::O_WRONLY)?);
            writable.set_len(size)?;
        }
        if set.atime != TimeSet::Omit || set.mtime != TimeSet::Omit {
            nix::sys::stat::futimens(file, &set.atime.timespec(), &set.mtime.timespec())?;
        }
        let st = nix::sys::stat::fstat(file)?;
        Ok(self.attr_of(node, &st))
    }

    fn truncate(&self, node: &Node, fh: Option<u64>, loc: &Location, size: u64) -> io::Result<()> {
        if let Some(fh) = fh
            && let Ok(h) = self.handles.get(node.ino, fh)
            && let Handle::File {
                file,
                in_upper: true,
                ..
            } = &*h
            && file.set_len(size).is_ok()
        {
            return Ok(());
        }
        match loc {
            Location::Entry(..) | Location::Kept(_) => {
                File::from(self.open_object(node, loc, OFlag::O_WRONLY)?).set_len(size)
            }
            Location::Dir(_) => Err(errno(libc::EISDIR)),
        }
    }

    /// Opens for writing: copies the file up first (without data when it is truncated anyway).
    pub(crate) fn open_for_write(
        &self,
        node: &Arc<Node>,
        flags: i32,
        _caller: &Caller,
    ) -> io::Result<(u64, bool)> {
        self.work()?;
        let data = if flags & libc::O_TRUNC != 0 {
            CopyData::MetadataOnly
        } else {
            CopyData::All
        };
        self.copy_up(node, data)?;
        let (loc, _) = self.locate(node)?;
        let fd = self.open_object(node, &loc, open_passthrough_flags(flags))?;
        let fh = self.insert_file(node.ino, File::from(fd), true);
        Ok((fh, false))
    }

    pub fn with_file<T>(
        &self,
        ino: Ino,
        fh: u64,
        f: impl FnOnce(&File, bool) -> io::Result<T>,
    ) -> io::Result<T> {
        self.handles.get(ino, fh)?.with_current(f)
    }

    pub fn write(&self, ino: Ino, fh: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.with_file(ino, fh, |file, in_upper| {
            if !in_upper {
                return Err(errno(libc::EBADF));
            }
            let _measured = self.admit_growth(file, offset, data.len() as u64)?;
            let mut done = 0;
            while done < data.len() {
                match file.write_at(&data[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if done > 0 => {
                        tracing::debug!(error = %e, "short write");
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(done)
        })
    }

    pub fn fsync(&self, ino: Ino, fh: u64, datasync: bool) -> io::Result<()> {
        if !self.opts.sync {
            return Ok(());
        }
        self.with_file(ino, fh, |file, _| {
            if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            }
        })
    }

    pub fn fsyncdir(&self, ino: Ino, _datasync: bool) -> io::Result<()> {
        if !self.opts.sync {
            return Ok(());
        }
        let node = self.node(ino)?;
        match node.dir_fd(UPPER)? {
            Some(fd) if self.stack.has_upper => Ok(nix::unistd::fsync(fd.as_fd())?),
            _ => Ok(()),
        }
    }

    pub fn fallocate(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> io::Result<()> {
        self.with_file(ino, fh, |file, in_upper| {
            if !in_upper {
                return Err(errno(libc::EBADF));
            }
            let _measured = self.admit_growth(file, offset, length)?;
            let flags = nix::fcntl::FallocateFlags::from_bits_truncate(mode);
            Ok(nix::fcntl::fallocate(
                file,
                flags,
                offset as i64,
                length as i64,
            )?)
        })
    }

    pub fn lseek(&self, ino: Ino, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        let whence = match whence {
            libc::SEEK_SET => nix::unistd::Whence::SeekSet,
            libc::SEEK_CUR => nix::unistd::Whence::SeekCur,
            libc::SEEK_END => nix::unistd::Whence::SeekEnd,
            libc::SEEK_DATA => nix::unistd::Whence::SeekData,
            libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
            _ => return Err(errno(libc::EINVAL)),
        };
        self.with_file(ino, fh, |file, _| {
            Ok(nix::unistd::lseek(file, offset, whence)?)
        })
    }

    pub fn copy_file_range(
        &self,
        from: (Ino, u64, u64),
        to: (Ino, u64, u64),
        len: u64,
    ) -> io::Result<usize> {
        let src = self.handles.get(from.0, from.1)?;
        let dst = self.handles.get(to.0, to.1)?;
        if matches!(&*src, Handle::Dir { .. }) || matches!(&*dst, Handle::Dir { .. }) {
            return Err(errno(libc::EBADF));
        }
        src.with_current(|sf, _| {
            dst.with_current(|df, in_upper| {
                if !in_upper {
                    return Err(errno(libc::EBADF));
                }
                let _measured = self.admit_growth(df, to.2, len)?;
                let mut off_in = from.2 as i64;
                let mut off_out = to.2 as i64;
                Ok(nix::fcntl::copy_file_range(
                    sf,
                    Some(&mut off_in),
                    df,
                    Some(&mut off_out),
                    len as usize,
                )?)
            })
        })
    }

    pub(crate) fn setxattr_uncounted(
        &self,
        ino: Ino,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _caller: &Caller,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let stored = self
            .stack
            .names
            .escape(name.as_bytes())
            .ok_or_else(|| errno(libc::EPERM))?;
        self.work()?;
        let node = self.node(ino)?;
        self.copy_up_object(&node)?;
        let (loc, _) = self.locate(&node)?;
        loc.xattr_target().set(&stored, value, flags)
    }

    pub(crate) fn removexattr_uncounted(
        &self,
        ino: Ino,
        name: &OsStr,
        _caller: &Caller,
    ) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let stored = self
            .stack
            .names
            .escape(name.as_bytes())
            .ok_or_else(|| errno(libc::EPERM))?;
        self.work()?;
        let node = self.node(ino)?;
        if !self.in_upper(&node) {
            // Removing what is not there changes nothing, and copies nothing up.
            let (loc, _) = self.locate(&node)?;
            loc.xattr_target().get(&stored)?;
        }
        self.copy_up_object(&node)?;
        let (loc, _) = self.locate(&node)?;
        loc.xattr_target().remove(&stored)
    }
}

/// Adds permission bits to an entry's mode.
fn add_mode_bits(dir: BorrowedFd<'_>, name: &OsStr, bits: u32) -> io::Result<()> {
    let st = layer::stat_at(dir, name)?;
    Ok(nix::sys::stat::fchmodat(
        dir,
        name,
        Mode::from_bits_truncate((st.st_mode | bits) & 0o7777),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )?)
}

/// The longest redirect written, as the kernel module's default `redirect_max`.
const REDIRECT_MAX: usize = 256;

/// What hides the lower objects of a name that a new upper object takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hidden {
    /// A whiteout at the name itself, which the new object replaces in one exchange.
    ByWhiteout,
    /// An OCI `.wh.NAME` marker beside it, removed once the new object is in place.
    ByOciMarker,
}

/// Refuses names that are OCI whiteout or opaque markers (`.wh.*`): they are metadata in every
/// layer, so a caller who made one could hide or forge content (README, "Metadata-looking
/// names").
fn refuse_marker_name(name: &OsStr) -> io::Result<()> {
    if format::is_oci_marker(name.as_bytes()) {
        return Err(errno(libc::EPERM));
    }
    Ok(())
}

/// True for a directory whose top copy is opaque.
fn is_opaque_dir(r: &Resolved) -> bool {
    matches!(&r.backing, Backing::Dir(l) if l.first().is_some_and(|d| d.marks.opaque))
}

/// Gives a new object to its creator. Changing the owner clears setuid/setgid on files, so the
/// mode is put back afterwards.
fn give_to(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
    let before = layer::stat_at(dir, name)?;
    nix::unistd::fchownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        FchownatFlags::AT_SYMLINK_NOFOLLOW,
    )?;
    let kind = before.st_mode & libc::S_IFMT;
    if before.st_mode & 0o6000 != 0 && kind != libc::S_IFLNK && kind != libc::S_IFDIR {
        nix::sys::stat::fchmodat(
            dir,
            name,
            Mode::from_bits_truncate(before.st_mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
    }
    Ok(())
}
