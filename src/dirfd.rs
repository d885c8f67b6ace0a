//! Directory fds that may be closed when too many are open, and reopened when needed.
//!
//! Every directory the kernel keeps cached holds one fd per layer that has a copy of it, and
//! the kernel keeps directories cached for as long as memory allows: a `find` over an image
//! with 20,000 directories would otherwise run the daemon out of file descriptors (EMFILE on
//! every later lookup). So each copy remembers where it is (its parent's copy in the same
//! layer and its name there, updated when it is renamed) and its identity (device and inode),
//! and the least recently used fds beyond a budget are closed; the next use reopens the copy
//! from its parent, one component, never following a symlink, and refuses with ESTALE what is
//! no longer the same directory. Layer roots are never closed.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};

use crate::layer;

/// Fewest directory fds kept open, whatever the descriptor limit.
const MIN_BUDGET: usize = 256;

/// How many directory fds stay open before the least recently used are closed.
static BUDGET: AtomicUsize = AtomicUsize::new(4096);
/// Directory fds open now (layer roots excluded).
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// Open, closable copies in the order they were opened, for the second-chance sweep.
static QUEUE: Mutex<VecDeque<Weak<DirFd>>> = Mutex::new(VecDeque::new());

/// Sets the budget from the descriptor limit: a quarter of it, so that open files, FUSE
/// channels and the kernel's own requests always find room. `RSFS_DIRFD_BUDGET=N` sets it
/// directly (a testing aid: a tiny budget makes every directory access exercise reopening).
pub fn set_budget_from_limit(nofile: u64) {
    let forced = std::env::var("RSFS_DIRFD_BUDGET")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let budget = match forced {
        Some(n) => n.max(1),
        None => usize::try_from(nofile / 4)
            .unwrap_or(usize::MAX)
            .max(MIN_BUDGET),
    };
    BUDGET.store(budget, Ordering::Relaxed);
}

/// Directory fds open now, not counting layer roots (for statistics).
pub fn open_count() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// One layer's copy of a directory.
#[derive(Debug)]
pub struct DirFd {
    /// Where it is reopened from: its parent's copy in the same layer and its name there;
    /// `None` for a layer root.
    place: Mutex<Option<(Arc<DirFd>, OsString)>>,
    /// Device and inode when first opened: a reopen must find the same directory.
    id: (u64, u64),
    fd: RwLock<Option<Arc<OwnedFd>>>,
    /// Used since the last sweep passed it.
    used: AtomicBool,
    /// Never closed: a removed directory, whose inode (and so its number, our node id) must
    /// stay alive while the kernel may still ask for it.
    pinned: AtomicBool,
}

impl DirFd {
    /// A layer's root, open for the life of the mount.
    pub fn root(fd: OwnedFd) -> io::Result<Arc<DirFd>> {
        let id = identity(&fd)?;
        Ok(Arc::new(DirFd {
            place: Mutex::new(None),
            id,
            fd: RwLock::new(Some(Arc::new(fd))),
            used: AtomicBool::new(true),
            pinned: AtomicBool::new(false),
        }))
    }

    /// The copy named `name` in `parent`'s copy, just opened as `fd`.
    pub fn child(parent: &Arc<DirFd>, name: &OsStr, fd: OwnedFd) -> io::Result<Arc<DirFd>> {
        let id = identity(&fd)?;
        let dir = Arc::new(DirFd {
            place: Mutex::new(Some((parent.clone(), name.to_os_string()))),
            id,
            fd: RwLock::new(Some(Arc::new(fd))),
            used: AtomicBool::new(true),
            pinned: AtomicBool::new(false),
        });
        opened(&dir);
        Ok(dir)
    }

    /// The open fd, reopened from the parent when it was closed.
    pub fn get(self: &Arc<Self>) -> io::Result<Arc<OwnedFd>> {
        self.used.store(true, Ordering::Relaxed);
        if let Some(fd) = &*self.fd.read() {
            return Ok(fd.clone());
        }
        self.reopen()
    }

    /// True when both name the same directory (device and inode).
    pub fn same_dir(&self, other: &DirFd) -> bool {
        self.id == other.id
    }

    /// Keeps the copy open from now on: called before its directory loses its last name, so
    /// that the filesystem cannot reuse its inode number while the kernel may still know it.
    pub fn pin(self: &Arc<Self>) -> io::Result<()> {
        self.pinned.store(true, Ordering::Relaxed);
        self.get().map(drop)
    }

    /// Records a rename: the copy is now `name` in `parent`.
    pub fn moved_to(&self, parent: &Arc<DirFd>, name: &OsStr) {
        *self.place.lock() = Some((parent.clone(), name.to_os_string()));
    }

    fn reopen(self: &Arc<Self>) -> io::Result<Arc<OwnedFd>> {
        let (parent, name) = self
            .place
            .lock()
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        let parent_fd = parent.get()?;
        let fd = layer::open_dir_at(layer::borrow(&parent_fd), &name)?;
        if identity(&fd)? != self.id {
            tracing::warn!(name = ?name, "a directory was replaced behind the mount's back");
            return Err(io::Error::from_raw_os_error(libc::ESTALE));
        }
        let fd = Arc::new(fd);
        {
            let mut slot = self.fd.write();
            if let Some(theirs) = &*slot {
                // Another thread reopened it meanwhile; ours closes when dropped.
                return Ok(theirs.clone());
            }
            *slot = Some(fd.clone());
        }
        opened(self);
        Ok(fd)
    }

    /// Closes the fd if the copy can be reopened (not a layer root). True when closed.
    fn close(&self) -> bool {
        if self.place.lock().is_none() || self.pinned.load(Ordering::Relaxed) {
            return false;
        }
        self.fd.write().take().is_some()
    }
}

impl Drop for DirFd {
    fn drop(&mut self) {
        if self.place.get_mut().is_some() && self.fd.get_mut().is_some() {
            OPEN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn identity(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    let st = layer::stat_fd(layer::borrow(fd))?;
    Ok((st.st_dev, st.st_ino))
}

/// Counts a newly opened copy and closes the least recently used ones beyond the budget,
/// giving each a second chance if it was used since the sweep last passed it.
fn opened(dir: &Arc<DirFd>) {
    let open = OPEN.fetch_add(1, Ordering::Relaxed) + 1;
    let budget = BUDGET.load(Ordering::Relaxed);
    let mut queue = QUEUE.lock();
    queue.push_back(Arc::downgrade(dir));
    if open <= budget {
        if queue.len() > 2 * budget + 1024 {
            queue.retain(|w| w.strong_count() > 0);
        }
        return;
    }
    let mut passes = queue.len();
    while OPEN.load(Ordering::Relaxed) > budget && passes > 0 {
        passes -= 1;
        let Some(weak) = queue.pop_front() else {
            break;
        };
        let Some(victim) = weak.upgrade() else {
            continue;
        };
        if victim.used.swap(false, Ordering::Relaxed) {
            queue.push_back(weak);
            continue;
        }
        if victim.close() {
            OPEN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
