//! The inode table: one `Node` per merged object the kernel knows, keyed by the inode number we
//! report (fuser uses it as the FUSE node id too), kept alive by the kernel's lookup count and
//! dropped only by forget. Directories hold an fd per layer in which they exist; other objects
//! hold no fd and are reached as (parent directory fd in their layer, name), so the fd count
//! follows cached directories, not files.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::dirfd::DirFd;
use crate::format::DirMarks;
use crate::layer::LayerId;

/// The inode number we report for an object, which is also its FUSE node id.
pub type Ino = u64;

/// Counts the changes our own operations make to a node's backing behind the kernel's back
/// (copy-up: the kernel locks only the directory where a change is made, so a lookup of the
/// object copied up, in its parent, runs beside it). Each change stamps its node with the count
/// reached; see `backing_changes`.
static BACKING_CHANGES: AtomicU64 = AtomicU64::new(0);

/// The count of backing changes so far. A lookup takes it before it resolves a name: a node
/// stamped later was changed while the resolution ran, which may then predate the change.
pub fn backing_changes() -> u64 {
    BACKING_CHANGES.load(Ordering::SeqCst)
}
/// FUSE's fixed node id of the mount's root.
pub const ROOT_INO: Ino = 1;

/// One layer's copy of a merged directory.
#[derive(Debug, Clone)]
pub struct DirLayer {
    pub layer: LayerId,
    /// Its fd, which may be closed while unused and is reopened on demand (see `dirfd`).
    pub dir: Arc<DirFd>,
    pub marks: DirMarks,
    /// Whether this copy holds any OCI `.wh.` marker, found by listing it once when first
    /// needed: a lower without any spares every missing name a second lookup.
    pub oci_markers: Arc<OnceLock<bool>>,
    /// A lower copy's names, listed once it has answered enough lookups of missing names.
    pub names: Arc<LowerNames>,
}

/// How many lookups of missing names a lower directory copy answers by `lstat` before its
/// names are listed once and held: a directory asked once or twice is not worth listing.
const MISSES_BEFORE_LISTING: u32 = 8;

/// The most names held for one lower directory copy; a larger one is always asked.
const MAX_LISTED_NAMES: usize = 1 << 16;

/// The names of a lower directory copy, held once it has missed enough lookups: a lower
/// never changes under the mount (what the overlay shows when one does is undefined, for the
/// kernel's too), so a name it does not list is absent without asking the filesystem.
#[derive(Debug, Default)]
pub struct LowerNames {
    misses: AtomicU32,
    /// `None` once listed when the copy holds too many names to keep.
    names: OnceLock<Option<HashSet<Box<[u8]>>>>,
}

impl LowerNames {
    /// Whether the copy is known to hold `name`: `None` until its names are listed.
    pub fn holds(&self, name: &[u8]) -> Option<bool> {
        match self.names.get() {
            Some(Some(names)) => Some(names.contains(name)),
            _ => None,
        }
    }

    /// Counts one lookup of a missing name; lists the copy `dir` once enough have missed.
    pub fn missed(&self, dir: BorrowedFd<'_>) {
        // Listed by the lookup that reaches the count, once; the others keep asking the
        // filesystem meanwhile. A copy that cannot be listed is asked every time, as one too
        // large, rather than listed again on every miss.
        if self.names.get().is_some()
            || self.misses.fetch_add(1, Ordering::Relaxed) + 1 != MISSES_BEFORE_LISTING
        {
            return;
        }
        let _ = self.names.set(list_names(dir).unwrap_or(None));
    }
}

/// The names in the directory `dir`, or `None` past `MAX_LISTED_NAMES`.
fn list_names(dir: BorrowedFd<'_>) -> std::io::Result<Option<HashSet<Box<[u8]>>>> {
    let mut listing = nix::dir::Dir::from_fd(crate::layer::reopen_dir(dir)?)?;
    let mut names = HashSet::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if names.len() == MAX_LISTED_NAMES {
            return Ok(None);
        }
        names.insert(Box::from(name));
    }
    Ok(Some(names))
}

impl DirLayer {
    /// A layer's root directory.
    pub fn root(layer: LayerId, dir: Arc<DirFd>, marks: DirMarks) -> DirLayer {
        DirLayer {
            layer,
            dir,
            marks,
            oci_markers: Arc::new(OnceLock::new()),
            names: Arc::default(),
        }
    }

    /// The copy named `name` in `parent` (same layer), just opened as `fd`.
    pub fn child(
        parent: &DirLayer,
        name: &OsStr,
        fd: OwnedFd,
        marks: DirMarks,
    ) -> std::io::Result<DirLayer> {
        Ok(DirLayer {
            layer: parent.layer,
            dir: DirFd::child(&parent.dir, name, fd)?,
            marks,
            oci_markers: Arc::new(OnceLock::new()),
            names: Arc::default(),
        })
    }

    /// The open fd of this copy.
    pub fn fd(&self) -> std::io::Result<Arc<OwnedFd>> {
        self.dir.get()
    }
}

/// Where an object's content lives.
#[derive(Debug, Clone)]
pub enum Backing {
    /// A directory: its copy in each layer that contributes to the merge, top-down (the upper
    /// first when it has one). The list ends at the first opaque copy.
    Dir(Vec<DirLayer>),
    /// Anything else: the top-most layer that holds it, and for a metacopy file (metadata
    /// copied up, data not yet) the lower file whose data it shows.
    NonDir {
        layer: LayerId,
        data: Option<Arc<LowerData>>,
        /// `index=on`: the copy's entry in the index directory (a copied-up hard link). The
        /// names of it that only a lower holds (not linked up) reach the copy through it.
        indexed: Option<Arc<OsString>>,
    },
}

impl Backing {
    /// A non-directory whose data lives where it does.
    pub fn non_dir(layer: LayerId) -> Backing {
        Backing::NonDir {
            layer,
            data: None,
            indexed: None,
        }
    }

    /// The lower file a metacopy file's data comes from.
    pub fn lower_data(&self) -> Option<&Arc<LowerData>> {
        match self {
            Backing::NonDir { data, .. } => data.as_ref(),
            Backing::Dir(_) => None,
        }
    }

    /// The index entry a name of a copied-up hard link is reached through (`index=on`).
    pub fn indexed(&self) -> Option<&Arc<OsString>> {
        match self {
            Backing::NonDir { indexed, .. } => indexed.as_ref(),
            Backing::Dir(_) => None,
        }
    }
}

/// Where a metacopy file's data lives: the regular file `name` in a lower layer's copy of a
/// directory (its own parent's, or the one its redirect names).
#[derive(Debug)]
pub struct LowerData {
    pub dir: DirLayer,
    pub name: OsString,
}

/// One name under which the kernel looked the object up.
#[derive(Debug, Clone)]
pub struct Alias {
    pub parent: Arc<Node>,
    pub name: OsString,
}

#[derive(Debug)]
pub struct NodeState {
    pub backing: Backing,
    /// Names the object is known by (several for hard links); the first one is used to reach
    /// a non-directory. Empty for the root.
    pub aliases: Vec<Alias>,
    /// `S_IFMT` bits of the object.
    pub file_type: u32,
    /// The last name removed (unlinked or renamed away), for objects that lost every name.
    pub last_removed: Option<Alias>,
    /// Names of a copied-up hard-linked lower file that still live only in the lower (not yet
    /// linked to the upper copy): they count in the link count the object reports.
    pub pending_links: u64,
    /// An `O_PATH` fd of a special file (fifo, socket, device, symlink) taken as it lost its
    /// last name: callers open those without asking us, so nothing else of ours keeps the
    /// object for their `fstat` (the kernel's overlay holds the real inode the same way).
    pub kept: Option<Arc<OwnedFd>>,
}

#[derive(Debug)]
pub struct Node {
    pub ino: Ino,
    lookups: AtomicU64,
    /// The value of `BACKING_CHANGES` set by the last change to the backing made by us.
    backing_stamp: AtomicU64,
    state: RwLock<NodeState>,
    /// Serializes copy-up of this object; copy-ups of other objects proceed in parallel.
    pub copy_up_lock: Mutex<()>,
}

impl Node {
    pub fn new(ino: Ino, state: NodeState) -> Node {
        Node {
            ino,
            lookups: AtomicU64::new(0),
            backing_stamp: AtomicU64::new(0),
            state: RwLock::new(state),
            copy_up_lock: Mutex::new(()),
        }
    }

    pub fn state(&self) -> RwLockReadGuard<'_, NodeState> {
        self.state.read()
    }

    pub fn state_mut(&self) -> RwLockWriteGuard<'_, NodeState> {
        self.state.write()
    }

    /// Records that the backing just changed (by a copy-up): called with `state` held for
    /// writing, so that `remember` sees the stamp together with the change.
    pub fn backing_changed(&self, _state: &mut NodeState) {
        let stamp = BACKING_CHANGES.fetch_add(1, Ordering::SeqCst) + 1;
        self.backing_stamp.store(stamp, Ordering::SeqCst);
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.state().backing, Backing::Dir(_))
    }

    /// This directory's fd in `layer`, if it exists there.
    /// The fd of this directory's copy in `layer`, if it has one.
    pub fn dir_fd(&self, layer: LayerId) -> std::io::Result<Option<Arc<OwnedFd>>> {
        self.dir_layer(layer).map(|d| d.fd()).transpose()
    }

    /// This directory's copy in `layer`, if it has one.
    pub fn dir_layer(&self, layer: LayerId) -> Option<DirLayer> {
        match &self.state().backing {
            Backing::Dir(layers) => layers.iter().find(|d| d.layer == layer).cloned(),
            Backing::NonDir { .. } => None,
        }
    }
}

impl NodeState {
    /// The state of an object just resolved: no name yet (the table adds it), nothing removed.
    pub fn new(backing: Backing, file_type: u32) -> NodeState {
        NodeState {
            backing,
            aliases: Vec::new(),
            file_type,
            last_removed: None,
            pending_links: 0,
            kept: None,
        }
    }

    /// A directory made of more than one layer's copy.
    pub fn is_merged_dir(&self) -> bool {
        matches!(&self.backing, Backing::Dir(l) if l.len() > 1)
    }

    /// The top-most layer that holds the object.
    pub fn top_layer(&self) -> Option<LayerId> {
        match &self.backing {
            Backing::Dir(layers) => layers.first().map(|d| d.layer),
            Backing::NonDir { layer, .. } => Some(*layer),
        }
    }

    pub fn primary_alias(&self) -> Option<&Alias> {
        self.aliases.first()
    }

    pub fn add_alias(&mut self, parent: &Arc<Node>, name: &OsStr) {
        let known = self
            .aliases
            .iter()
            .any(|a| a.parent.ino == parent.ino && a.name == name);
        if !known {
            self.aliases.push(Alias {
                parent: parent.clone(),
                name: name.to_os_string(),
            });
        }
    }

    /// Makes `parent/name` the name the object is reached by (the first alias).
    pub fn promote_alias(&mut self, parent: &Arc<Node>, name: &OsStr) {
        let pos = self
            .aliases
            .iter()
            .position(|a| a.parent.ino == parent.ino && a.name == name);
        let alias = match pos {
            Some(pos) => self.aliases.remove(pos),
            None => Alias {
                parent: parent.clone(),
                name: name.to_os_string(),
            },
        };
        self.aliases.insert(0, alias);
    }

    pub fn remove_alias(&mut self, parent: Ino, name: &OsStr) {
        if let Some(pos) = self
            .aliases
            .iter()
            .position(|a| a.parent.ino == parent && a.name == name)
        {
            self.last_removed = Some(self.aliases.remove(pos));
        }
    }

    /// Where a removed object was last known: still open files of it are served through
    /// their own fds, and a lower object is still there under its lower name.
    pub fn last_removed(&self) -> Option<&Alias> {
        self.last_removed.as_ref()
    }
}

/// Keeps the directory copies a node already has where a fresh lookup found the same
/// directories: its children are reopened through those (see `dirfd`), and a rename updates
/// those, so one directory copy must stay one `DirFd`.
fn keep_dir_identities(old: &Backing, fresh: &mut Backing) {
    let (Backing::Dir(old), Backing::Dir(fresh)) = (old, fresh) else {
        return;
    };
    for copy in fresh.iter_mut() {
        if let Some(known) = old
            .iter()
            .find(|o| o.layer == copy.layer && o.dir.same_dir(&copy.dir))
        {
            copy.dir = known.dir.clone();
            copy.oci_markers = known.oci_markers.clone();
            copy.names = known.names.clone();
        }
    }
}

/// Borrow an fd held in an `Arc` for the duration of a call.
pub fn fd_of(fd: &Arc<OwnedFd>) -> BorrowedFd<'_> {
    fd.as_fd()
}

/// Below this many slots the node table is never shrunk (a few hundred KiB at most).
const SHRINK_ABOVE: usize = 16 * 1024;

/// The live nodes. A lookup inserts or reuses a node and counts one reference; forget drops
/// references and removes the node at zero. The lock is never held across a syscall.
#[derive(Debug, Default)]
pub struct NodeTable {
    nodes: RwLock<HashMap<Ino, Arc<Node>>>,
    /// The table's size when memory was last given back (or its peak since), changed only
    /// under the table's write lock.
    high_mark: std::sync::atomic::AtomicUsize,
}

impl NodeTable {
    pub fn get(&self, ino: Ino) -> Option<Arc<Node>> {
        self.nodes.read().get(&ino).cloned()
    }

    /// Inserts a root that is never forgotten.
    pub fn insert_root(&self, node: Node) -> Arc<Node> {
        let node = Arc::new(node);
        node.lookups.store(1, Ordering::Relaxed);
        self.nodes.write().insert(node.ino, node.clone());
        node
    }

    /// Returns the live node for `ino`, refreshed with `fresh`'s backing and alias, or inserts
    /// `fresh`; either way counts one kernel reference. `fresh` was resolved from what the
    /// layers held once `backing_changes` had reached `resolved_since`: a node whose backing we
    /// changed after that keeps its own (the resolution may not have seen the change: a lookup
    /// that missed a copy-up must not take the copy away from the node, whose next write would
    /// copy up again over it). True with the node when it kept its backing so.
    pub fn remember(
        &self,
        fresh: Node,
        parent: &Arc<Node>,
        name: &OsStr,
        resolved_since: u64,
    ) -> (Arc<Node>, bool) {
        let mut nodes = self.nodes.write();
        let mut kept_own = false;
        let node = match nodes.get(&fresh.ino) {
            Some(existing) => {
                let mut fresh_state = fresh.state.into_inner();
                let mut st = existing.state.write();
                if st.file_type != fresh_state.file_type {
                    // The number of an object the kernel still holds went to a new object:
                    // what keeps a removed object alive (see `NodeState::kept`) was missing.
                    tracing::warn!(
                        ino = fresh.ino,
                        old = st.file_type,
                        new = fresh_state.file_type,
                        "an inode number was reused while its node lived"
                    );
                }
                if existing.backing_stamp.load(Ordering::SeqCst) > resolved_since {
                    kept_own = true;
                    st.add_alias(parent, name);
                } else {
                    keep_dir_identities(&st.backing, &mut fresh_state.backing);
                    st.backing = fresh_state.backing;
                    st.file_type = fresh_state.file_type;
                    // This name was just seen to lead to the object: reach it by this one.
                    // An older name may have been removed behind our back (the upper changed
                    // under the mount, its inode number now this new object's).
                    st.promote_alias(parent, name);
                }
                existing.clone()
            }
            None => {
                fresh.state.write().add_alias(parent, name);
                let node = Arc::new(fresh);
                nodes.insert(node.ino, node.clone());
                crate::stats::nodes_changed(1);
                node
            }
        };
        node.lookups.fetch_add(1, Ordering::Relaxed);
        (node, kept_own)
    }

    /// Drops `count` kernel references; the node leaves the table at zero (the root never).
    /// Counts one kernel reference to `node` handed out by a reply other than a lookup (a
    /// new hard link's entry): the kernel forgets it like any other, so it must be counted,
    /// or the node would go, and with it what keeps its inode number from being reused,
    /// while the kernel still uses it.
    pub fn count_reference(&self, node: &Arc<Node>) {
        let mut nodes = self.nodes.write();
        match nodes.get(&node.ino) {
            Some(live) if Arc::ptr_eq(live, node) => {}
            Some(_) => {}
            None => {
                nodes.insert(node.ino, node.clone());
                crate::stats::nodes_changed(1);
            }
        }
        if let Some(live) = nodes.get(&node.ino) {
            live.lookups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops `count` lookups of `ino`. True when the table just shrank well below its peak
    /// (the kernel forgot most of what it knew): the caller may then give freed memory back.
    pub fn forget(&self, ino: Ino, count: u64) -> bool {
        if ino == ROOT_INO {
            return false;
        }
        let mut nodes = self.nodes.write();
        if let Some(node) = nodes.get(&ino) {
            // The table's write lock orders this against `remember`, so load-then-store is exact.
            let prev = node.lookups.load(Ordering::Relaxed);
            node.lookups
                .store(prev.saturating_sub(count), Ordering::Relaxed);
            if prev <= count {
                let before = nodes.len();
                nodes.remove(&ino);
                crate::stats::nodes_changed(-1);
                // A map never shrinks by itself: after a walk of a million files it would keep
                // its peak size for the life of the mount. Shrinking at each quarter keeps the
                // cost amortized (geometric), and leaves room to grow again.
                if nodes.capacity() > SHRINK_ABOVE && nodes.len() < nodes.capacity() / 4 {
                    let keep = nodes.len() * 2;
                    nodes.shrink_to(keep);
                }
                // Memory goes back each time the table halves from its last high mark, down
                // to the last node: a few dozen times for a million forgets, never in churn
                // around a steady size.
                let high = self.high_mark.load(Ordering::Relaxed).max(before);
                if nodes.len() <= high / 2 {
                    self.high_mark.store(nodes.len(), Ordering::Relaxed);
                    return true;
                }
                self.high_mark.store(high, Ordering::Relaxed);
            }
        }
        false
    }

    pub fn len(&self) -> usize {
        self.nodes.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lower_copy_is_listed_once_at_the_eighth_miss() {
        let dir = std::env::temp_dir().join(format!("rsfs-node-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        std::fs::write(dir.join("present"), b"").expect("create a file");
        let fd = std::fs::File::open(&dir).expect("open the directory");
        let names = LowerNames::default();
        for _ in 1..MISSES_BEFORE_LISTING {
            names.missed(fd.as_fd());
        }
        assert_eq!(names.holds(b"present"), None, "not listed before the count");
        names.missed(fd.as_fd());
        assert_eq!(names.holds(b"present"), Some(true));
        assert_eq!(names.holds(b"absent"), Some(false));
        std::fs::write(dir.join("later"), b"").expect("create another file");
        names.missed(fd.as_fd());
        assert_eq!(
            names.holds(b"later"),
            Some(false),
            "listed once, not on every miss"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn file_in(layer: LayerId) -> NodeState {
        NodeState::new(Backing::non_dir(layer), libc::S_IFREG)
    }

    #[test]
    fn a_resolution_older_than_a_copy_up_keeps_the_copy() {
        let table = NodeTable::default();
        let root = table.insert_root(Node::new(ROOT_INO, file_in(0)));
        let name = OsStr::new("f");
        // Resolved in the lower, then copied up before the resolution is remembered.
        let since = backing_changes();
        let (node, kept) = table.remember(Node::new(7, file_in(1)), &root, name, since);
        assert!(!kept);
        let stale_since = backing_changes();
        {
            let mut st = node.state_mut();
            st.backing = Backing::non_dir(0);
            node.backing_changed(&mut st);
        }
        let (again, kept) = table.remember(Node::new(7, file_in(1)), &root, name, stale_since);
        assert!(kept && Arc::ptr_eq(&node, &again));
        assert_eq!(node.state().top_layer(), Some(0));
        // A resolution that began after the copy-up refreshes the node as usual.
        let (_, kept) = table.remember(Node::new(7, file_in(0)), &root, name, backing_changes());
        assert!(!kept);
        assert_eq!(node.state().top_layer(), Some(0));
    }
}
