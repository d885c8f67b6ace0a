//! The core: one method per filesystem operation, in terms of inode numbers, names and plain
//! Rust types, with no FUSE types. Errors are `io::Error`s carrying the errno the caller gets.
//! Read operations live here; operations that change the merged view are in `write.rs`.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;

use crate::attr::{Attr, Caller, Statfs};
use crate::handles::{Handle, Handles};
use crate::layer::{self, LayerId, XattrTarget};
use crate::lookup::{self, Resolved};
use crate::node::{Backing, DirLayer, Ino, Node, NodeState, NodeTable, ROOT_INO, fd_of};
use crate::readdir::{self, DirEntry};
use crate::stack::Stack;

pub(crate) fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Options of the core that are not about the layers themselves.
#[derive(Debug, Clone, Default)]
pub struct OverlayOptions {
    /// No upper, or mounted `ro`: every change is refused with EROFS.
    pub read_only: bool,
    /// fsync reaches the upper, and copy-ups are synced before they become visible
    /// (`fsync=0` turns both off: a crash may then leave partial copies, as the user chose).
    pub sync: bool,
    /// `redirect_dir=on`: renaming a directory with lower content records where that content
    /// lives (a redirect) instead of failing with EXDEV.
    pub create_redirects: bool,
    /// `upper_limit=` / `upper_inodes=`: keep counters of the upper and refuse what exceeds.
    pub caps: crate::quota::Caps,
    /// `uuid=`: whether a new upper gets a persistent UUID.
    pub uuid: crate::config::UuidMode,
}

/// Where a node is reached in its top-most layer.
pub(crate) enum Location {
    /// A directory: its open fd.
    Dir(Arc<OwnedFd>),
    /// Anything else: its parent directory's fd in the same layer, and its name there.
    Entry(Arc<OwnedFd>, OsString),
    /// A regular file of the upper that lost its last name while the kernel still holds it:
    /// the file itself, opened read-only from the fd kept when its name went (its old name
    /// may hold something else by now).
    Kept(Arc<OwnedFd>),
}

impl Location {
    pub(crate) fn xattr_target(&self) -> XattrTarget<'_> {
        match self {
            Location::Dir(fd) | Location::Kept(fd) => XattrTarget::Dir(fd_of(fd)),
            Location::Entry(dir, name) => XattrTarget::Entry(fd_of(dir), name),
        }
    }

    pub(crate) fn stat(&self) -> io::Result<FileStat> {
        match self {
            Location::Dir(fd) | Location::Kept(fd) => layer::stat_fd(fd_of(fd)),
            Location::Entry(dir, name) => layer::stat_at(fd_of(dir), name),
        }
    }

    /// Opens the non-directory here with `flags` (never following a symlink).
    pub(crate) fn open(&self, flags: OFlag) -> io::Result<OwnedFd> {
        match self {
            Location::Entry(dir, name) => layer::open_at(fd_of(dir), name, flags, 0),
            Location::Kept(fd) => layer::reopen(fd_of(fd), flags),
            Location::Dir(_) => Err(errno(libc::EISDIR)),
        }
    }
}

pub struct Overlay {
    pub(crate) stack: Stack,
    pub(crate) nodes: NodeTable,
    pub(crate) handles: Handles,
    pub(crate) opts: OverlayOptions,
    /// Tells the kernel that a node's cached attributes are stale: set by the adapter once
    /// the session runs. Copy-up changes objects (and their parents) behind the kernel's back.
    invalidator: OnceLock<AttrInvalidator>,
    /// The upper's counters: kept from the start on a capped mount, else from the first
    /// `usage` query on (see `activate_counters`).
    pub(crate) quota: OnceLock<crate::quota::Quota>,
    /// Held (shared) by every change made while there are no counters, so that starting them
    /// waits for those in flight and misses none.
    pub(crate) uncounted: parking_lot::RwLock<()>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("layers", &self.stack.layers.len())
            .field("nodes", &self.nodes.len())
            .field("handles", &self.handles.len())
            .finish()
    }
}

/// A callback that makes the kernel drop a node's cached attributes.
pub type AttrInvalidator = Box<dyn Fn(Ino) + Send + Sync>;

impl Overlay {
    pub fn new(stack: Stack, opts: OverlayOptions) -> io::Result<Overlay> {
        let mut roots = Vec::with_capacity(stack.layers.len());
        for l in &stack.layers {
            let marks = lookup::read_dir_marks(&stack, &l.root);
            roots.push(DirLayer::root(l.id, l.root_dir.clone(), marks));
        }
        if !opts.read_only {
            crate::uuid::init_upper_uuid(&stack, opts.uuid);
        }
        let quota = OnceLock::new();
        if let Some(upper) = stack.upper()
            && opts.caps.any()
            && !opts.read_only
        {
            let _ = quota.set(crate::quota::Quota::start(opts.caps, &upper.root)?);
        }
        let nodes = NodeTable::default();
        nodes.insert_root(Node::new(
            ROOT_INO,
            NodeState::new(Backing::Dir(roots), libc::S_IFDIR),
        ));
        Ok(Overlay {
            stack,
            nodes,
            handles: Handles::default(),
            opts,
            invalidator: OnceLock::new(),
            quota,
            uncounted: parking_lot::RwLock::new(()),
        })
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    pub fn opts(&self) -> &OverlayOptions {
        &self.opts
    }

    /// Installs the callback that invalidates the kernel's cached attributes of a node.
    pub fn set_attr_invalidator(&self, f: AttrInvalidator) {
        let _ = self.invalidator.set(f);
    }

    /// The kernel's cached attributes of `ino` are stale (we changed the object ourselves).
    pub(crate) fn attrs_changed(&self, ino: Ino) {
        if let Some(f) = self.invalidator.get() {
            f(ino);
        }
    }

    pub(crate) fn node(&self, ino: Ino) -> io::Result<Arc<Node>> {
        // A node the kernel still refers to but we no longer know is stale, as after a forget.
        self.nodes.get(ino).ok_or_else(|| errno(libc::ESTALE))
    }

    /// Whether the kernel still holds object `ino` (it has not forgotten every lookup of it).
    pub fn knows(&self, ino: Ino) -> bool {
        self.nodes.get(ino).is_some()
    }

    pub(crate) fn dir_layers(node: &Node) -> io::Result<Vec<DirLayer>> {
        match &node.state().backing {
            Backing::Dir(layers) => Ok(layers.clone()),
            Backing::NonDir { .. } => Err(errno(libc::ENOTDIR)),
        }
    }

    /// Where `node` is reached in its top-most layer.
    pub(crate) fn locate(&self, node: &Node) -> io::Result<(Location, LayerId)> {
        self.locate_checked(node)
            .map(|(loc, layer, _)| (loc, layer))
    }

    /// Where `node` is reached in its top-most layer, with the `lstat` of what is there.
    pub(crate) fn locate_stat(&self, node: &Node) -> io::Result<(Location, LayerId, FileStat)> {
        let (loc, layer, checked) = self.locate_checked(node)?;
        let st = match checked {
            Some(st) => st,
            None => loc.stat()?,
        };
        Ok((loc, layer, st))
    }

    /// `locate`, with the `lstat` taken to check an upper name still holds the object.
    fn locate_checked(&self, node: &Node) -> io::Result<(Location, LayerId, Option<FileStat>)> {
        let st = node.state();
        match &st.backing {
            Backing::Dir(layers) => {
                let top = layers.first().ok_or_else(|| errno(libc::ESTALE))?;
                Ok((Location::Dir(top.fd()?), top.layer, None))
            }
            Backing::NonDir { layer, indexed, .. } => {
                let upper = self.stack.is_upper(*layer);
                if st.aliases.is_empty() && upper {
                    // Its old name in the upper may hold something else by now (a whiteout,
                    // a new file): only the fd kept when the name went reaches it.
                    return Self::kept_location(&st).map(|loc| (loc, *layer, None));
                }
                if !upper {
                    // A lower object keeps its lower name: the lowers never change.
                    let alias = st
                        .primary_alias()
                        .or(st.last_removed())
                        .ok_or_else(|| errno(libc::ESTALE))?;
                    let dir = alias
                        .parent
                        .dir_fd(*layer)?
                        .ok_or_else(|| errno(libc::ESTALE))?;
                    return Ok((Location::Entry(dir, alias.name.clone()), *layer, None));
                }
                // Under `index=on` some names of a copied-up hard link are only lower names
                // (not linked up): the copy is reached by a name of it the upper holds, or
                // through its index entry.
                let names = if indexed.is_some() {
                    st.aliases.len()
                } else {
                    1
                };
                for alias in st.aliases.iter().take(names) {
                    let Some(dir) = alias.parent.dir_fd(*layer)? else {
                        continue;
                    };
                    // A request racing with a rename or unlink of this name may find the name
                    // already holding something else (a whiteout above all): never act on that.
                    let found = layer::stat_at(fd_of(&dir), &alias.name);
                    if let Ok(f) = found
                        && f.st_mode & libc::S_IFMT == st.file_type
                    {
                        return Ok((Location::Entry(dir, alias.name.clone()), *layer, Some(f)));
                    }
                }
                if let Some(entry) = indexed {
                    return Ok((self.index_location(entry)?, *layer, None));
                }
                Self::kept_location(&st).map(|loc| (loc, *layer, None))
            }
        }
    }

    /// Where an upper object whose name no longer leads to it is reached: a regular file
    /// through the fd kept when its name went; anything else is gone for us (ENOENT).
    fn kept_location(st: &NodeState) -> io::Result<Location> {
        match (&st.kept, st.file_type) {
            (Some(kept), libc::S_IFREG) => Ok(Location::Kept(Arc::new(layer::reopen(
                fd_of(kept),
                OFlag::O_RDONLY,
            )?))),
            _ => Err(errno(libc::ENOENT)),
        }
    }

    /// Opens the non-directory `node`, found at `loc`, with `flags`. A name being removed
    /// or replaced right now (by a request racing with this one) may already hold something
    /// else, a whiteout above all: then the object is reached through the fd kept before its
    /// name went, as the kernel's overlay reaches the real inode its dentry holds.
    pub(crate) fn open_object(
        &self,
        node: &Node,
        loc: &Location,
        flags: OFlag,
    ) -> io::Result<OwnedFd> {
        let mut flags = flags;
        if !self.opts.sync {
            // The kernel's volatile mount drops O_SYNC/O_DSYNC on writes to the upper too.
            flags.remove(OFlag::O_SYNC | OFlag::O_DSYNC);
        }
        let is = |r: &io::Result<OwnedFd>, code: i32| matches!(r, Err(e) if e.raw_os_error() == Some(code));
        let mut opened = self.open_checked(node, loc, flags);
        if is(&opened, libc::EXDEV) {
            // `openat2(RESOLVE_BENEATH)` found the object, but a rename racing with this
            // request moved it out of its directory before the open completed: try once
            // more from where the node is known now, else it is gone from its old name.
            opened = self
                .locate(node)
                .and_then(|(fresh, _)| self.open_checked(node, &fresh, flags));
            if is(&opened, libc::EXDEV) {
                opened = Err(errno(libc::ENOENT));
            }
        }
        match opened {
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    || e.raw_os_error() == Some(libc::ENOENT) =>
            {
                let kept = node.state().kept.clone();
                match kept {
                    Some(kept) => layer::reopen(fd_of(&kept), flags),
                    None => Err(errno(libc::ENOENT)),
                }
            }
            other => other,
        }
    }

    /// Opens the non-directory at `loc` with `flags`; ENXIO when it is not `node`'s type.
    fn open_checked(&self, node: &Node, loc: &Location, flags: OFlag) -> io::Result<OwnedFd> {
        let want = node.state().file_type;
        let fd = loc.open(flags)?;
        let st = layer::stat_fd(layer::borrow(&fd))?;
        if st.st_mode & libc::S_IFMT == want {
            Ok(fd)
        } else {
            Err(errno(libc::ENXIO))
        }
    }

    /// The attributes reported for `node` given the `lstat` of its top-most copy.
    pub(crate) fn attr_of(&self, node: &Node, st: &FileStat) -> Attr {
        let mut st = *st;
        self.with_data_blocks(node, &mut st);
        if let Some(nlink) = self.indexed_nlink(node, &st) {
            st.st_nlink = nlink as _;
        }
        let state = node.state();
        let mut attr = Attr::from_stat(&st, node.ino, state.is_merged_dir());
        attr.nlink += state.pending_links;
        attr
    }

    /// The inode number reported for a resolved object: a copied-up object keeps its lower
    /// origin's number (as the kernel: unless the origin is a hard link, whose names may have
    /// been copied up to different files), so `st_ino` survives copy-up and remount.
    /// Live nodes other than `ino_of(r)`'s that still hold the name `parent/name` for the
    /// object `r`: a copied-up hard link's number changes with what the mount knows (see
    /// `ino_of`), so a node made under the other number may hold the name too. A removal or
    /// rename must update them all, or one keeps a name that now holds something else.
    pub(crate) fn other_nodes_named(
        &self,
        parent: Ino,
        name: &OsStr,
        r: &Resolved,
    ) -> Vec<Arc<Node>> {
        let primary = self.ino_of(r);
        let mut candidates = vec![self.stack.reported_ino(r.top, r.stat.st_ino)];
        if let Some((layer, st)) = r.origin_target(&self.stack) {
            candidates.push(self.stack.reported_ino(layer, st.st_ino));
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates
            .into_iter()
            .filter(|&ino| ino != primary)
            .filter_map(|ino| self.nodes.get(ino))
            .filter(|n| {
                n.state()
                    .aliases
                    .iter()
                    .any(|a| a.parent.ino == parent && a.name == name)
            })
            .collect()
    }

    pub(crate) fn ino_of(&self, r: &Resolved) -> Ino {
        if let Some((layer, st)) = r.origin_target(&self.stack)
            && st.st_mode & libc::S_IFMT == r.stat.st_mode & libc::S_IFMT
        {
            let lower_ino = self.stack.reported_ino(layer, st.st_ino);
            let known_copy = || self.nodes.get(lower_ino).is_some_and(|n| self.in_upper(&n));
            // A hard-linked origin's number is kept only while this mount knows the object by
            // it (its names then share the one upper copy).
            // Under `index=on` every name of one always reaches one copy (through the index).
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR
                || st.st_nlink == 1
                || self.stack.index.is_some()
                || known_copy()
            {
                return lower_ino;
            }
        }
        if let Some((layer, ino)) = r.merge_origin {
            return self.stack.reported_ino(layer, ino);
        }
        self.stack.reported_ino(r.top, r.stat.st_ino)
    }

    /// Registers what `name` in `parent` resolved to, counting one kernel reference; `since`
    /// is `node::backing_changes()` taken before the resolution began (see
    /// `NodeTable::remember`).
    pub(crate) fn remember(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        r: Resolved,
        since: u64,
    ) -> Attr {
        let ino = self.ino_of(&r);
        let stat = r.stat;
        let node = Node::new(
            ino,
            NodeState::new(r.backing, r.stat.st_mode & libc::S_IFMT),
        );
        let (node, kept_own) = self.nodes.remember(node, parent, name, since);
        if kept_own {
            // The resolution raced with a copy-up of the object: its attributes are the
            // copy's now.
            if let Ok(fresh) = self.getattr(node.ino, None) {
                return fresh;
            }
        }
        self.attr_of(&node, &stat)
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> io::Result<Attr> {
        self.lookup_below(parent, name, 0)
    }

    /// Looks up an entry of a listing of `parent`: `listed_in` is the top-most layer the
    /// listing found it in. The lowers above it do not hold the name (they never change), so
    /// only the upper and the layers from there down are asked: in a deep stack, one `lstat`
    /// instead of one per layer above.
    pub fn lookup_listed(&self, parent: Ino, name: &OsStr, listed_in: LayerId) -> io::Result<Attr> {
        self.lookup_below(parent, name, listed_in)
    }

    fn lookup_below(&self, parent: Ino, name: &OsStr, first: LayerId) -> io::Result<Attr> {
        let parent = self.node(parent)?;
        let since = crate::node::backing_changes();
        let mut layers = Self::dir_layers(&parent)?;
        if first > 0 {
            layers.retain(|d| self.stack.is_upper(d.layer) || d.layer >= first);
        }
        let mut resolved =
            lookup::resolve(&self.stack, &layers, name)?.ok_or_else(|| errno(libc::ENOENT))?;
        if resolved.origin.is_none() && resolved.merge_origin.is_some() {
            self.record_merge_origin(&layers, name, &resolved);
            // Recording changed the directory's ctime (and maybe its blocks) and its parent's.
            if let Backing::Dir(l) = &resolved.backing
                && let Some(top) = l.first()
                && let Ok(st) = layer::stat_fd(fd_of(&top.fd()?))
            {
                resolved.stat = st;
            }
            self.attrs_changed(parent.ino);
        }
        if self.stack.index.is_some()
            && let Some(copy) = layers.iter().find(|d| d.layer == resolved.top)
        {
            self.find_in_index(&mut resolved, copy, name);
        }
        if let Some(relinked) = self.join_copied_hard_link(&parent, name, &resolved) {
            return Ok(self.remember(&parent, name, relinked, since));
        }
        Ok(self.remember(&parent, name, resolved, since))
    }

    /// A lower name of a hard-linked file this mount already copied up (through another name)
    /// becomes a name of that upper copy too, so all names keep showing one file.
    fn join_copied_hard_link(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        r: &Resolved,
    ) -> Option<Resolved> {
        let Backing::NonDir { layer, .. } = r.backing else {
            return None;
        };
        if self.stack.is_upper(layer) || r.stat.st_nlink < 2 || self.stack.index.is_some() {
            return None;
        }
        let node = self.nodes.get(self.ino_of(r))?;
        if !self.in_upper(&node) {
            return None;
        }
        let (Location::Entry(dir, copy_name), _) = self.locate(&node).ok()? else {
            return None;
        };
        if let Err(e) = self.link_up(&dir, &copy_name, parent, name) {
            tracing::debug!(name = ?name, error = %e, "cannot join a copied-up hard link");
            return None;
        }
        {
            let mut state = node.state_mut();
            state.pending_links = state.pending_links.saturating_sub(1);
        }
        let layers = Self::dir_layers(parent).ok()?;
        lookup::resolve(&self.stack, &layers, name).ok().flatten()
    }

    /// Records the first lower copy of a merged directory as the upper copy's origin, and
    /// marks the parent impure, as the kernel does on lookup: the upper then reads the same
    /// under either implementation. Best effort; nothing is recorded on a read-only mount.
    fn record_merge_origin(&self, parent: &[DirLayer], name: &OsStr, r: &Resolved) {
        let (Backing::Dir(layers), Some(upper_parent)) = (&r.backing, parent.first()) else {
            return;
        };
        if self.opts.read_only || !self.stack.is_upper(upper_parent.layer) || layers.len() < 2 {
            return;
        }
        let (upper, lower) = (&layers[0], &layers[1]);
        let (Ok(upper_fd), Ok(lower_fd), Ok(parent_fd)) =
            (upper.fd(), lower.fd(), upper_parent.fd())
        else {
            return;
        };
        let Some(origin) = self.stack.origin_of(lower.layer, fd_of(&lower_fd), None) else {
            return;
        };
        let record = || {
            let target = XattrTarget::Dir(fd_of(&upper_fd));
            if let Err(e) = target.set(&self.stack.names.name("origin"), &origin.encode(), 0) {
                tracing::debug!(name = ?name, error = %e, "cannot record origin of merged directory");
                return Ok(());
            }
            self.mark_impure(fd_of(&parent_fd));
            Ok(())
        };
        // An attribute may take a block of its own: counted.
        let _ = self.counted(
            || {
                vec![
                    crate::quota::Place::dir(upper_fd.clone()),
                    crate::quota::Place::dir(parent_fd.clone()),
                ]
            },
            record,
        );
    }

    pub fn forget(&self, ino: Ino, count: u64) {
        if self.nodes.forget(ino, count) {
            // The nodes just freed sit in the allocator's free lists; give those pages back,
            // so that the daemon's memory follows what the kernel still caches.
            crate::sys::release_free_memory();
        }
    }

    pub fn getattr(&self, ino: Ino, fh: Option<u64>) -> io::Result<Attr> {
        let node = self.node(ino)?;
        if let Some(fh) = fh
            && let Ok(handle) = self.handles.get(ino, fh)
            && let Handle::File { .. } = &*handle
        {
            let (st, on_upper) = handle
                .with_current(|file, in_upper| Ok((nix::sys::stat::fstat(file)?, in_upper)))?;
            // A metacopy file's handle reads the lower data; its metadata is the upper's.
            if on_upper || !self.in_upper(&node) {
                return Ok(self.attr_of(&node, &st));
            }
        }
        let removed = node.state().aliases.is_empty() && node.ino != ROOT_INO;
        if removed && let Some(file) = self.handles.any_file_of(ino, false) {
            // Removed while open (fstat sends no handle): its open files still reach it.
            let st = nix::sys::stat::fstat(&file)?;
            return Ok(self.attr_of(&node, &st));
        }
        let kept = node.state().kept.clone();
        if removed && let Some(fd) = kept {
            let st = nix::sys::stat::fstat(&fd)?;
            return Ok(self.attr_of(&node, &st));
        }
        let (_, _, st) = self.locate_stat(&node)?;
        if st.st_mode & libc::S_IFMT != node.state().file_type {
            // Its last name now holds something else (a whiteout): the object is gone.
            return Err(errno(libc::ENOENT));
        }
        Ok(self.attr_of(&node, &st))
    }

    pub fn readlink(&self, ino: Ino) -> io::Result<Vec<u8>> {
        let node = self.node(ino)?;
        // The fd kept of a symlink that is losing or lost a name (renamed, removed) is the
        // object itself: its name may hold something else by now, a whiteout above all.
        let kept = || {
            let st = node.state();
            match (&st.kept, st.file_type) {
                (Some(fd), libc::S_IFLNK) => Some(fd.clone()),
                _ => None,
            }
        };
        if let Some(fd) = kept() {
            return layer::readlink_fd(fd_of(&fd));
        }
        let res = match self.locate(&node)? {
            (Location::Entry(dir, name), _) => layer::readlink_at(fd_of(&dir), &name),
            (Location::Dir(_) | Location::Kept(_), _) => Err(errno(libc::EINVAL)),
        };
        match res {
            // A rename or removal racing with this request replaced the name after we found
            // it: such a change keeps the symlink's fd before the name goes.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                match kept() {
                    Some(fd) => layer::readlink_fd(fd_of(&fd)),
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// Opens `ino`; a read-only open never copies up. Returns the handle id and whether the
    /// file lives in a lower layer (its cache may then be kept across opens).
    pub fn open(&self, ino: Ino, flags: i32, caller: &Caller) -> io::Result<(u64, bool)> {
        let node = self.node(ino)?;
        if node.is_dir() {
            return Err(errno(libc::EISDIR));
        }
        if wants_write(flags) {
            return self.open_for_write_counted(&node, flags, caller);
        }
        let (loc, layer) = self.locate_data(&node)?;
        let fd = self.open_object(&node, &loc, open_passthrough_flags(flags))?;
        let in_upper = self.stack.is_upper(layer);
        let fh = self.insert_file(ino, File::from(fd), in_upper);
        if !in_upper && self.has_upper_data(&node) {
            // Copied up since we found the lower file: a copy-up that ended before the handle
            // was listed could not move it.
            self.follow_copy_up(&node);
        }
        Ok((fh, !in_upper))
    }

    pub fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let handle = self.handles.get(ino, fh)?;
        handle.with_current(|file, _| {
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(done);
            Ok(buf)
        })
    }

    pub fn release(&self, ino: Ino, fh: u64) -> io::Result<()> {
        let _uncounted = self.uncounted.read_recursive();
        let handle = self.handles.remove(ino, fh)?;
        if let Handle::File {
            file,
            in_upper,
            copy,
            ..
        } = &*handle
        {
            // Taken after the handle left the table, so no copy-up gives it another.
            let copy = copy.write().take();
            if let Some(q) = self.quota.get() {
                if *in_upper {
                    q.closed(file);
                }
                if let Some(copy) = &copy {
                    q.closed(copy);
                }
            }
        }
        Ok(())
    }

    /// Moves the handles open on `node`'s lower file to its upper copy, as the kernel's
    /// overlay moves an open file to the copy at its next use: reads through them must see
    /// what is written to the copy, and its truncation by an `O_TRUNC` open (which FUSE sends
    /// as a setattr after opening the file read-only, in the lower layer).
    pub(crate) fn follow_copy_up(&self, node: &Node) {
        let handles = self.handles.lower_files_of(node.ino);
        if handles.is_empty() || !self.has_upper_data(node) {
            return;
        }
        let loc = match self.locate(node) {
            Ok((loc, layer)) if self.stack.is_upper(layer) => loc,
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(ino = node.ino, error = %e, "open files stay on the lower file");
                return;
            }
        };
        for (fh, handle) in handles {
            let Handle::File { file, copy, .. } = &*handle else {
                continue;
            };
            let mut copy = copy.write();
            if copy.is_some() || !self.handles.contains(fh) {
                continue;
            }
            let flags = match nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL) {
                Ok(flags) => open_passthrough_flags(flags),
                Err(_) => OFlag::O_RDONLY,
            };
            let mut opened = self.open_object(node, &loc, flags);
            if matches!(&opened, Err(e) if e.raw_os_error() == Some(libc::EPERM))
                && flags.contains(OFlag::O_NOATIME)
            {
                // O_NOATIME needs the owner or CAP_FOWNER: the kernel drops it too rather
                // than fail.
                opened = self.open_object(node, &loc, flags - OFlag::O_NOATIME);
            }
            match opened {
                Ok(fd) => {
                    let opened = File::from(fd);
                    if let Some(q) = self.quota.get() {
                        q.opened(&opened);
                    }
                    *copy = Some(opened);
                }
                Err(e) => {
                    tracing::debug!(ino = node.ino, error = %e, "an open file stays on the lower file")
                }
            }
        }
    }

    /// Opens a directory. Its listing is taken when it is read (see `readdir_at`), not here.
    pub fn opendir(&self, ino: Ino) -> io::Result<u64> {
        let node = self.node(ino)?;
        Self::dir_layers(&node)?;
        Ok(self.handles.insert(Handle::Dir {
            ino,
            entries: parking_lot::Mutex::new(None),
        }))
    }

    /// The merged listing of `ino` as the read at `offset` through `fh` sees it: offsets index
    /// a snapshot, so reading on stays stable while the directory changes; it is taken by the
    /// first read and taken again by every read from offset 0 (a rewind). Never at opendir:
    /// the kernel reads from offset 0 under the directory's lock and caches what we answer
    /// (`FOPEN_CACHE_DIR`) as the directory's content at that moment, so a snapshot from
    /// before an entry was created there would stay cached without the entry until the next
    /// change; the kernel's overlay too lists afresh on every rewind.
    pub fn readdir_at(&self, ino: Ino, fh: u64, offset: u64) -> io::Result<Arc<Vec<DirEntry>>> {
        let handle = self.handles.get(ino, fh)?;
        let Handle::Dir { entries, .. } = &*handle else {
            return Err(errno(libc::ENOTDIR));
        };
        let mut snapshot = entries.lock();
        if offset != 0
            && let Some(taken) = &*snapshot
        {
            return Ok(taken.clone());
        }
        let taken = Arc::new(self.merged_listing(ino)?);
        *snapshot = Some(taken.clone());
        Ok(taken)
    }

    /// The listing read through `fh` from its start (see `readdir_at`).
    pub fn readdir(&self, ino: Ino, fh: u64) -> io::Result<Arc<Vec<DirEntry>>> {
        self.readdir_at(ino, fh, 0)
    }

    /// The merged listing of the directory `ino` now.
    fn merged_listing(&self, ino: Ino) -> io::Result<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let layers = Self::dir_layers(&node)?;
        let dotdot = node
            .state()
            .primary_alias()
            .map_or(ROOT_INO, |a| a.parent.ino);
        let entries = readdir::merged_listing(&self.stack, &layers, ino, dotdot)?;
        if let [only] = layers.as_slice() {
            self.drop_unneeded_impure(ino, only, &entries);
        }
        Ok(entries)
    }

    /// An upper-only directory marked impure that no longer holds any entry with an origin
    /// record loses the mark when listed, as the kernel drops it (best effort).
    fn drop_unneeded_impure(&self, ino: Ino, dir: &DirLayer, entries: &[DirEntry]) {
        if self.opts.read_only || !self.stack.is_upper(dir.layer) {
            return;
        }
        let Ok(dir_fd) = dir.fd() else {
            return;
        };
        let target = XattrTarget::Dir(fd_of(&dir_fd));
        let impure = self.stack.names.name("impure");
        if !matches!(target.get_opt(&impure), Ok(Some(_))) {
            return;
        }
        let origin = self.stack.names.name("origin");
        let holds_origin = entries.iter().skip(2).any(|e| {
            !matches!(
                XattrTarget::Entry(fd_of(&dir_fd), &e.name).get_opt(&origin),
                Ok(None)
            )
        });
        if holds_origin {
            return;
        }
        let remove = || target.remove(&impure);
        let removed = self.counted(|| vec![crate::quota::Place::dir(dir_fd.clone())], remove);
        if removed.is_ok() {
            self.attrs_changed(ino);
        }
    }

    pub fn releasedir(&self, ino: Ino, fh: u64) -> io::Result<()> {
        self.handles.remove(ino, fh).map(drop)
    }

    /// The upper's filesystem statistics (the top lower's on a read-only stack), as the kernel.
    pub fn statfs(&self) -> io::Result<Statfs> {
        let top = &self.stack.layers[0];
        let st = nix::sys::statvfs::fstatvfs(&top.root)?;
        let real = Statfs::from_statvfs(&st);
        Ok(match self.quota.get() {
            Some(q) => q.statfs(real),
            None => real,
        })
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> io::Result<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let stored = self
            .stack
            .names
            .escape(name.as_bytes())
            .ok_or_else(|| errno(libc::ENODATA))?;
        let node = self.node(ino)?;
        let (loc, _) = self.locate(&node)?;
        loc.xattr_target().get(&stored)
    }

    /// Attribute names, NUL-terminated each, as `listxattr(2)` returns them; the overlay's
    /// private ones are never listed, nor `trusted.*` to a caller who could not read them.
    pub fn listxattr(&self, ino: Ino, caller: &Caller) -> io::Result<Vec<u8>> {
        let node = self.node(ino)?;
        let (loc, _) = self.locate(&node)?;
        let names = match loc.xattr_target().list() {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for stored in names {
            let Some(n) = self.stack.names.visible(&stored) else {
                continue;
            };
            if caller.uid != 0 && n.starts_with(b"trusted.") {
                continue;
            }
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// `access(2)` for callers when the kernel does not check permissions itself.
    pub fn access(&self, ino: Ino, mask: i32, caller: &Caller) -> io::Result<()> {
        let attr = self.getattr(ino, None)?;
        if mask & libc::W_OK != 0 && self.opts.read_only {
            return Err(errno(libc::EROFS));
        }
        if caller.may_access(&attr, mask) {
            Ok(())
        } else {
            Err(errno(libc::EACCES))
        }
    }
}

/// True when an open with `flags` may change the file, which needs it in the upper.
pub(crate) fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// The caller's open flags that we pass on to our own open of the real file.
pub(crate) fn open_passthrough_flags(flags: i32) -> OFlag {
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_DIRECT
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NOATIME
        | libc::O_TRUNC;
    OFlag::from_bits_truncate(flags & keep)
}
