//! The size cap on the writable layer (`upper_limit=`, `upper_inodes=`): counters of the bytes
//! and inodes the upper holds, kept exact as the mount changes it, and the check that refuses
//! with ENOSPC what would take it past the cap. The counters start from a walk of the upper at
//! mount (as `du` counts: allocated blocks, each inode once).
//!
//! How they stay exact: every operation that changes the upper runs under one lock and is
//! measured, not predicted. The places it touches (its parent directories' upper copies, the
//! names it creates, removes or renames, the object it changes) are `lstat`ed before and
//! after, and the difference is settled by inode identity: an inode that appears is new, one
//! that disappears with its last name is freed (or, while we hold it open, freed at its last
//! close, as the filesystem does), one present on both sides changed by its blocks. Measures
//! nest (a copy-up inside a rename): the outer one counts only what the inner ones have not.
//! Writes through open files are measured by `fstat` of the file.
//! The lock serializes the changes of a capped mount (not its reads): the price of an exact
//! cap, paid only by mounts that ask for one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::stat::FileStat;
use parking_lot::{Mutex, ReentrantMutex, ReentrantMutexGuard};

use crate::attr::Statfs;
use crate::layer;
use crate::usage::Usage;

/// The caps a mount asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub bytes: Option<u64>,
    pub inodes: Option<u64>,
}

impl Caps {
    pub fn any(&self) -> bool {
        self.bytes.is_some() || self.inodes.is_some()
    }
}

/// An inode of the upper: (device, inode number).
type Key = (u64, u64);

/// One place an operation may change: a directory (its own blocks), or a name in it.
pub struct Place {
    pub dir: Arc<OwnedFd>,
    pub name: Option<OsString>,
    /// A directory at `name` may go away with its entries (whiteouts in an emptied merged
    /// directory): count what is below it too.
    pub subtree: bool,
}

impl Place {
    pub fn dir(dir: Arc<OwnedFd>) -> Place {
        Place {
            dir,
            name: None,
            subtree: false,
        }
    }

    pub fn entry(dir: Arc<OwnedFd>, name: &OsStr) -> Place {
        Place {
            dir,
            name: Some(name.to_os_string()),
            subtree: false,
        }
    }
}

/// What one place held at one instant.
#[derive(Debug, Clone, Copy)]
struct Seen {
    key: Key,
    nlink: u64,
    bytes: u64,
    is_dir: bool,
    /// Bytes and inodes of everything below (the object included), for `subtree` places.
    below: Option<(u64, u64)>,
}

pub struct Snapshot(Vec<Option<Seen>>);

/// A file open through the mount whose blocks are counted from its `fstat`.
struct OpenFile {
    file: File,
    bytes: u64,
    handles: usize,
    /// Its last name is gone: its inode is freed when its last handle closes.
    orphan: bool,
}

#[derive(Default)]
struct Counts {
    bytes: i64,
    inodes: i64,
    open: HashMap<Key, OpenFile>,
}

pub struct Quota {
    caps: Caps,
    changes: ReentrantMutex<()>,
    counts: Mutex<Counts>,
}

thread_local! {
    /// What the measures nested in the operation this thread runs (a copy-up inside a rename,
    /// say) have settled already: an inode's bytes as last counted, or `None` once freed. An
    /// enclosing measure counts only what changed since.
    static SETTLED: RefCell<HashMap<Key, Option<u64>>> = RefCell::new(HashMap::new());
    /// How deep this thread is in nested measures.
    static DEPTH: RefCell<usize> = const { RefCell::new(0) };
}

fn bytes_of(st: &FileStat) -> u64 {
    st.st_blocks as u64 * 512
}

fn key_of(st: &FileStat) -> Key {
    (st.st_dev, st.st_ino)
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl Quota {
    /// Starts the counters from a walk of the upper.
    pub fn start(caps: Caps, upper_root: &OwnedFd) -> io::Result<Quota> {
        let now = crate::usage::count_upper(upper_root)?;
        Ok(Quota {
            caps,
            changes: ReentrantMutex::new(()),
            counts: Mutex::new(Counts {
                bytes: now.bytes as i64,
                inodes: now.inodes as i64,
                open: HashMap::new(),
            }),
        })
    }

    /// Held by every operation that changes the upper, for its whole measure.
    pub fn changing(&self) -> ReentrantMutexGuard<'_, ()> {
        self.changes.lock()
    }

    /// Refuses (ENOSPC) a change that would add `inodes` and `bytes` past a cap.
    pub fn admit(&self, inodes: u64, bytes: u64) -> io::Result<()> {
        let c = self.counts.lock();
        if let Some(cap) = self.caps.inodes
            && inodes > 0
            && c.inodes.max(0) as u64 + inodes > cap
        {
            return Err(enospc());
        }
        if let Some(cap) = self.caps.bytes
            && bytes > 0
            && c.bytes.max(0) as u64 + bytes > cap
        {
            return Err(enospc());
        }
        Ok(())
    }

    pub fn snapshot(&self, places: &[Place]) -> Snapshot {
        Snapshot(places.iter().map(see).collect())
    }

    /// Settles what happened between two snapshots of the same places.
    pub fn settle(&self, before: &Snapshot, after: &Snapshot) {
        let mut was: HashMap<Key, Seen> = HashMap::new();
        let mut names_before: HashMap<Key, u64> = HashMap::new();
        for s in before.0.iter().flatten() {
            was.entry(s.key).or_insert(*s);
            *names_before.entry(s.key).or_default() += 1;
        }
        let mut now: HashMap<Key, Seen> = HashMap::new();
        for s in after.0.iter().flatten() {
            now.entry(s.key).or_insert(*s);
        }
        let mut c = self.counts.lock();
        SETTLED.with(|settled| {
            let mut settled = settled.borrow_mut();
            for (key, s) in &now {
                let baseline = match settled.get(key) {
                    Some(Some(bytes)) => Some(*bytes),
                    Some(None) => None,
                    None => was.get(key).map(|old| old.bytes),
                };
                match baseline {
                    Some(old) => c.bytes += s.bytes as i64 - old as i64,
                    None => {
                        c.inodes += 1;
                        c.bytes += s.bytes as i64;
                    }
                }
                settled.insert(*key, Some(s.bytes));
                if let Some(open) = c.open.get_mut(key) {
                    open.bytes = s.bytes;
                }
            }
            for (key, old) in &was {
                if now.contains_key(key) {
                    continue;
                }
                let counted = match settled.get(key) {
                    Some(None) => continue,
                    Some(Some(bytes)) => *bytes,
                    None => old.bytes,
                };
                // Gone from every place we watched: freed when those were its last names.
                let last_name =
                    old.is_dir || old.nlink <= names_before.get(key).copied().unwrap_or(0);
                if !last_name {
                    continue;
                }
                settled.insert(*key, None);
                if let Some(open) = c.open.get_mut(key) {
                    open.orphan = true;
                    continue;
                }
                let (bytes, inodes) = old.below.unwrap_or((counted, 1));
                c.bytes -= bytes as i64;
                c.inodes -= inodes as i64;
            }
        });
    }

    /// Runs `op`, which changes `places()`, and settles its effect. `places` is asked before
    /// and after, as a copy-up inside `op` may give a place its upper copy.
    pub fn measure<T>(
        &self,
        places: impl Fn() -> Vec<Place>,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        let _changing = self.changing();
        DEPTH.with(|d| *d.borrow_mut() += 1);
        let before = self.snapshot(&places());
        let result = op();
        let after = self.snapshot(&places());
        self.settle(&before, &after);
        let outermost = DEPTH.with(|d| {
            let mut d = d.borrow_mut();
            *d -= 1;
            *d == 0
        });
        if outermost {
            SETTLED.with(|f| f.borrow_mut().clear());
        }
        result
    }

    /// A handle on an upper file opened: its blocks are followed through it from now on.
    pub fn opened(&self, file: &File) {
        let Ok(st) = layer::stat_fd(file.as_fd()) else {
            return;
        };
        let mut c = self.counts.lock();
        if let Some(open) = c.open.get_mut(&key_of(&st)) {
            open.handles += 1;
            return;
        }
        let Ok(file) = file.try_clone() else {
            return;
        };
        c.open.insert(
            key_of(&st),
            OpenFile {
                file,
                bytes: bytes_of(&st),
                handles: 1,
                orphan: false,
            },
        );
    }

    /// Measures an open file's blocks now (after a write, truncate or allocation).
    pub fn refresh(&self, file: &File) {
        let mut c = self.counts.lock();
        // fstat under the lock: two refreshes of one file must not cross.
        let Ok(st) = layer::stat_fd(file.as_fd()) else {
            return;
        };
        Self::refresh_locked(&mut c, &st);
    }

    fn refresh_locked(c: &mut Counts, st: &FileStat) {
        let now = bytes_of(st);
        let Some(open) = c.open.get_mut(&key_of(st)) else {
            return;
        };
        let delta = now as i64 - open.bytes as i64;
        open.bytes = now;
        c.bytes += delta;
    }

    /// A handle closes; the last one of a file without names frees it.
    pub fn closed(&self, file: &File) {
        let mut c = self.counts.lock();
        let Ok(st) = layer::stat_fd(file.as_fd()) else {
            return;
        };
        Self::refresh_locked(&mut c, &st);
        let key = key_of(&st);
        let Some(open) = c.open.get_mut(&key) else {
            return;
        };
        open.handles -= 1;
        if open.handles > 0 {
            return;
        }
        if let Some(open) = c.open.remove(&key)
            && open.orphan
        {
            c.bytes -= open.bytes as i64;
            c.inodes -= 1;
        }
    }

    /// The counts now, open files measured afresh (their writes may have gone around us).
    pub fn usage(&self) -> Usage {
        let mut c = self.counts.lock();
        let stats: Vec<FileStat> = c
            .open
            .values()
            .filter_map(|o| layer::stat_fd(o.file.as_fd()).ok())
            .collect();
        for st in &stats {
            Self::refresh_locked(&mut c, st);
        }
        Usage {
            bytes: c.bytes.max(0) as u64,
            inodes: c.inodes.max(0) as u64,
            limit_bytes: self.caps.bytes,
            limit_inodes: self.caps.inodes,
        }
    }

    /// Bytes a write of `len` at `offset` may add to a file of `st`: the blocks past its
    /// current end (a write inside a sparse file's holes is measured after it).
    pub fn growth(st: &FileStat, offset: u64, len: u64) -> u64 {
        let block = 4096u64;
        let end = offset.saturating_add(len);
        let have = bytes_of(st).max(st.st_size as u64);
        if end <= have {
            return 0;
        }
        (end.div_ceil(block) * block).saturating_sub(have.div_ceil(block) * block)
    }

    /// The filesystem statistics a capped mount reports: the cap as its size.
    pub fn statfs(&self, real: Statfs) -> Statfs {
        let u = self.usage();
        let mut s = real;
        let bsize = u64::from(real.frsize.max(1));
        if let Some(cap) = self.caps.bytes {
            s.blocks = cap / bsize;
            let left = cap.saturating_sub(u.bytes) / bsize;
            s.bfree = left.min(real.bfree);
            s.bavail = left.min(real.bavail);
        }
        if let Some(cap) = self.caps.inodes {
            s.files = cap;
            s.ffree = cap.saturating_sub(u.inodes).min(real.ffree);
        }
        s
    }
}

fn see(place: &Place) -> Option<Seen> {
    let dir = layer::borrow(&place.dir);
    let st = match &place.name {
        Some(name) => layer::stat_at(dir, name).ok()?,
        None => layer::stat_fd(dir).ok()?,
    };
    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
    let below = match (&place.name, place.subtree && is_dir) {
        (Some(name), true) => layer::open_dir_at(dir, name)
            .and_then(|fd| crate::usage::count_upper(&fd))
            .ok()
            .map(|u| (u.bytes, u.inodes)),
        _ => None,
    };
    Some(Seen {
        key: key_of(&st),
        nlink: st.st_nlink,
        bytes: bytes_of(&st),
        is_dir,
        below,
    })
}
