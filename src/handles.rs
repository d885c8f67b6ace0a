//! Open files and directories. Handle ids come from an atomic counter and are never reused, and
//! every use checks the handle against the node it was opened on (EBADF otherwise).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::node::Ino;
use crate::readdir::DirEntry;

#[derive(Debug)]
pub enum Handle {
    File {
        ino: Ino,
        file: File,
        /// The layer the file was opened in: an upper file is never a lower one.
        in_upper: bool,
        /// Opened in a lower layer and copied up since: the upper copy, which the handle
        /// uses from then on (see `Overlay::follow_copy_up`).
        copy: RwLock<Option<File>>,
    },
    Dir {
        ino: Ino,
        /// The merged listing read through this handle: taken by the first read and again by
        /// every read from offset 0 (see `Overlay::readdir_at`), `None` before that.
        entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
    },
}

impl Handle {
    /// A handle on `file`, opened in the upper layer or (`in_upper` false) in a lower one.
    pub fn file(ino: Ino, file: File, in_upper: bool) -> Handle {
        Handle::File {
            ino,
            file,
            in_upper,
            copy: RwLock::new(None),
        }
    }

    fn ino(&self) -> Ino {
        match self {
            Handle::File { ino, .. } | Handle::Dir { ino, .. } => *ino,
        }
    }

    /// Runs `f` on the file this open file handle reaches now (its upper copy once it has
    /// one) and whether that file is in the upper layer; EISDIR for a directory handle.
    pub fn with_current<T>(&self, f: impl FnOnce(&File, bool) -> io::Result<T>) -> io::Result<T> {
        match self {
            Handle::File {
                file,
                in_upper,
                copy,
                ..
            // Recursive: copy_file_range holds two handles' locks, possibly one twice, and
            // `Overlay::follow_copy_up` may be waiting to write in between.
            } => match &*copy.read_recursive() {
                Some(copy) => f(copy, true),
                None => f(file, *in_upper),
            },
            Handle::Dir { .. } => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        }
    }
}

#[derive(Debug)]
pub struct Handles {
    next: AtomicU64,
    map: RwLock<HashMap<u64, Arc<Handle>>>,
}

impl Default for Handles {
    fn default() -> Self {
        Handles {
            next: AtomicU64::new(1),
            map: RwLock::new(HashMap::new()),
        }
    }
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

impl Handles {
    pub fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.map.write().insert(fh, Arc::new(handle));
        crate::stats::handles_changed(1);
        fh
    }

    /// The handle `fh`, which must have been opened on `ino`.
    pub fn get(&self, ino: Ino, fh: u64) -> io::Result<Arc<Handle>> {
        let handle = self.map.read().get(&fh).cloned().ok_or_else(ebadf)?;
        if handle.ino() != ino {
            return Err(ebadf());
        }
        Ok(handle)
    }

    pub fn remove(&self, ino: Ino, fh: u64) -> io::Result<Arc<Handle>> {
        let mut map = self.map.write();
        match map.get(&fh) {
            Some(h) if h.ino() == ino => {
                crate::stats::handles_changed(-1);
                map.remove(&fh).ok_or_else(ebadf)
            }
            _ => Err(ebadf()),
        }
    }

    /// The open file handles of node `ino`, with their ids. Taken out of the table before
    /// anyone looks into them: `Overlay::follow_copy_up` consults the table while it holds a
    /// handle's `copy` lock.
    fn files_of(&self, ino: Ino) -> Vec<(u64, Arc<Handle>)> {
        self.map
            .read()
            .iter()
            .filter(|(_, h)| matches!(&***h, Handle::File { ino: i, .. } if *i == ino))
            .map(|(fh, h)| (*fh, h.clone()))
            .collect()
    }

    /// Some open file of node `ino` (to reach an object that lost its last name): one in
    /// the upper layer when there is one; with `upper_only`, only such a one.
    pub fn any_file_of(&self, ino: Ino, upper_only: bool) -> Option<File> {
        let mut lower = None;
        for (_, h) in self.files_of(ino) {
            match h.with_current(|file, in_upper| Ok((file.try_clone()?, in_upper))) {
                Ok((file, true)) => return Some(file),
                Ok((file, false)) if !upper_only && lower.is_none() => lower = Some(file),
                _ => {}
            }
        }
        lower
    }

    /// The open file handles of node `ino` still on a file in a lower layer, with their ids.
    pub fn lower_files_of(&self, ino: Ino) -> Vec<(u64, Arc<Handle>)> {
        let mut files = self.files_of(ino);
        files.retain(|(_, h)| {
            matches!(&**h, Handle::File { in_upper: false, copy, .. } if copy.read().is_none())
        });
        files
    }

    /// True while handle `fh` is open.
    pub fn contains(&self, fh: u64) -> bool {
        self.map.read().contains_key(&fh)
    }

    /// The files open in the upper now.
    pub fn upper_files(&self) -> Vec<File> {
        self.map
            .read()
            .values()
            .filter_map(|h| match &**h {
                Handle::File {
                    file,
                    in_upper: true,
                    ..
                } => file.try_clone().ok(),
                // A lower file's handle follows its upper copy once it has one.
                Handle::File { copy, .. } => copy.read().as_ref().and_then(|c| c.try_clone().ok()),
                _ => None,
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
