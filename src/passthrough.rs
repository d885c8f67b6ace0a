//! FUSE passthrough (kernel ≥ 6.9, CAP_SYS_ADMIN): the kernel reads and writes an open file's
//! backing file directly, so data never crosses the daemon, and a lower file read through
//! several mounts is cached once, in the lower filesystem.
//!
//! The kernel ties a FUSE inode with passthrough opens to their backing file: every other open
//! of it must pass through to that same file, and cached opens are refused meanwhile (EIO). A
//! lower file may be copied up while a reader holds it open, and the writer then needs the upper
//! copy. Such an open is a conflict: the caller retires the kernel inode (see `nodeids`) and the
//! open is retried under a new one. The reader keeps reading the lower file, as under
//! fuse-overlayfs and kernels before 4.19 (`passthrough=upper` passes only upper files through,
//! so a reader follows the copy-up as under today's kernel).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::BackingId;
use parking_lot::Mutex;
use tracing::{debug, info};

/// How one open is served.
pub enum OpenMode {
    /// Through the kernel's page cache with reads and writes sent to us (no passthrough).
    Cached,
    /// Straight to this backing file by the kernel.
    Passthrough(Arc<BackingId>),
    /// The kernel inode is tied to another backing file by opens still alive: it must be
    /// retired and the open retried under a new one.
    Conflict,
}

/// Which file backs an open: (st_dev, st_ino) of the file we opened.
pub type FileKey = (u64, u64);

/// The mode a kernel inode's opens share while any lasts.
struct NodeBacking {
    /// `None` while the inode's opens are cached.
    id: Option<(Arc<BackingId>, FileKey)>,
    opens: usize,
}

#[derive(Default)]
pub struct Passthrough {
    enabled: AtomicBool,
    /// By kernel node id: the kernel ties backing files to its inodes, not to our objects.
    nodes: Mutex<HashMap<u64, NodeBacking>>,
    /// Which kernel inode each handle was opened on, for release.
    handles: Mutex<HashMap<u64, u64>>,
}

impl std::fmt::Debug for Passthrough {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passthrough")
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .finish()
    }
}

impl Passthrough {
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Decides how handle `fh`, opened on kernel inode `nodeid`, is served. `want` is the file
    /// it may pass through to (`None`: it must be cached, see `FuseAdapter::open_mode`);
    /// `register` turns the open fd into a backing id when a new one is needed.
    pub fn open_mode(
        &self,
        nodeid: u64,
        fh: u64,
        want: Option<FileKey>,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> OpenMode {
        if !self.is_enabled() {
            return OpenMode::Cached;
        }
        let mut nodes = self.nodes.lock();
        let mode = match nodes.get_mut(&nodeid) {
            // Cached opens stay cached: the kernel would refuse a passthrough one beside them.
            Some(b) if b.id.is_none() => OpenMode::Cached,
            Some(b) => match (&b.id, want) {
                (Some((id, key)), Some(want)) if *key == want => OpenMode::Passthrough(id.clone()),
                _ => return OpenMode::Conflict,
            },
            None => {
                let id = want.and_then(|key| match register() {
                    Ok(id) => Some((Arc::new(id), key)),
                    Err(e) => {
                        // Most likely no CAP_SYS_ADMIN or an older kernel: stop trying.
                        info!(error = %e, "FUSE passthrough unavailable, serving reads and writes");
                        self.enabled.store(false, Ordering::Relaxed);
                        None
                    }
                });
                let mode = match &id {
                    Some((id, _)) => OpenMode::Passthrough(id.clone()),
                    None => OpenMode::Cached,
                };
                nodes.insert(nodeid, NodeBacking { id, opens: 0 });
                mode
            }
        };
        if let Some(b) = nodes.get_mut(&nodeid) {
            b.opens += 1;
        }
        self.handles.lock().insert(fh, nodeid);
        mode
    }

    /// Forgets handle `fh`; the node's backing file is released with its last open.
    pub fn release(&self, fh: u64) {
        let Some(nodeid) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut nodes = self.nodes.lock();
        if let Some(b) = nodes.get_mut(&nodeid) {
            b.opens -= 1;
            if b.opens == 0 {
                nodes.remove(&nodeid);
                debug!(nodeid, "backing file released");
            }
        }
    }
}
