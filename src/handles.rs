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
    },
    Dir {
        ino: Ino,
        /// The merged listing read through this handle: taken by the first read and again by
        /// every read from offset 0 (see `Overlay::readdir_at`), `None` before that.
        entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
    },
}

impl Handle {
    fn ino(&self) -> Ino {
        match self {
            Handle::File { ino, .. } | Handle::Dir { ino, .. } => *ino,
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

    /// Some open file of node `ino` (to reach an object that lost its last name).
    pub fn any_file_of(&self, ino: Ino) -> Option<File> {
        self.map.read().values().find_map(|h| match &**h {
            Handle::File { ino: i, file, .. } if *i == ino => file.try_clone().ok(),
            _ => None,
        })
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
