//! FUSE passthrough (kernel ≥ 6.9, CAP_SYS_ADMIN): the kernel reads and writes an open file's
//! backing file directly, so data never crosses the daemon.
//!
//! The kernel requires every open of an inode that has a backing file to pass through to that
//! same file, and refuses to mix passthrough with cached opens (the open fails with EIO). A
//! lower file may be copied up while a reader holds it open, and the writer then needs the upper
//! copy: two backing files for one inode. So only files already in the upper pass through (an
//! upper file never goes back to a lower one); lower files are served through the page cache,
//! and a node keeps the mode of its first open for as long as any of its opens lasts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuser::BackingId;
use parking_lot::Mutex;
use tracing::{debug, info};

use crate::node::Ino;

/// How one open is served.
pub enum OpenMode {
    /// Through the kernel's page cache with reads and writes sent to us (no passthrough).
    Cached,
    /// Straight to this backing file by the kernel.
    Passthrough(Arc<BackingId>),
}

/// The mode a node's opens share while any lasts.
struct NodeBacking {
    /// `None` while the node's opens are cached.
    id: Option<Arc<BackingId>>,
    opens: usize,
}

#[derive(Default)]
pub struct Passthrough {
    enabled: AtomicBool,
    nodes: Mutex<HashMap<Ino, NodeBacking>>,
    /// Which node each passthrough or direct-I/O handle belongs to, for release.
    handles: Mutex<HashMap<u64, Ino>>,
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

    /// Decides how handle `fh` of node `ino` is served: passthrough only if the node's first
    /// open may pass (`may_pass`: a file in the upper, opened without sync writes we must
    /// drop); `register` turns the open fd into a backing id when a new one is needed.
    pub fn open_mode(
        &self,
        ino: Ino,
        fh: u64,
        may_pass: bool,
        register: impl FnOnce() -> std::io::Result<BackingId>,
    ) -> OpenMode {
        if !self.is_enabled() {
            return OpenMode::Cached;
        }
        let mut nodes = self.nodes.lock();
        let id = match nodes.get_mut(&ino) {
            Some(b) => {
                b.opens += 1;
                b.id.clone()
            }
            None => {
                let id = if may_pass {
                    match register() {
                        Ok(id) => Some(Arc::new(id)),
                        Err(e) => {
                            // Most likely no CAP_SYS_ADMIN or an older kernel: stop trying.
                            info!(error = %e, "FUSE passthrough unavailable, serving reads and writes");
                            self.enabled.store(false, Ordering::Relaxed);
                            None
                        }
                    }
                } else {
                    None
                };
                nodes.insert(
                    ino,
                    NodeBacking {
                        id: id.clone(),
                        opens: 1,
                    },
                );
                id
            }
        };
        self.handles.lock().insert(fh, ino);
        match id {
            Some(id) => OpenMode::Passthrough(id),
            None => OpenMode::Cached,
        }
    }

    /// Forgets handle `fh`; the node's backing file is released with its last open.
    pub fn release(&self, fh: u64) {
        let Some(ino) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut nodes = self.nodes.lock();
        if let Some(b) = nodes.get_mut(&ino) {
            b.opens -= 1;
            if b.opens == 0 {
                nodes.remove(&ino);
                debug!(ino, "backing file released");
            }
        }
    }
}
