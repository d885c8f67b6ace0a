//! Scratch directories under /tmp with short names (`/tmp/rsXXXXXX/l0`), so that 128 lower
//! layers fit in the kernel's mount option limit. A scratch dir that still has something mounted
//! under it when dropped is leaked, never removed: removing a live mount's tree is how test
//! suites destroy layers. `RSFS_TEST_KEEP=1` keeps every scratch dir (for debugging).

use std::path::{Path, PathBuf};

use super::mountinfo;

pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("rs")
            .rand_bytes(6)
            .tempdir_in("/tmp")
            .expect("create scratch dir in /tmp");
        let path = dir.path().to_path_buf();
        Scratch {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `<scratch>/<name>`, created (with parents) as an empty directory.
    pub fn dir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// `<scratch>/<name>` as a regular file holding `content`.
    pub fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        let p = self.path.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir parent");
        }
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// `<scratch>/<name>` without creating anything.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("RSFS_TEST_KEEP").is_some() {
            eprintln!("RSFS_TEST_KEEP: keeping {}", self.path.display());
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
            return;
        }
        let live = mountinfo::mounts_under(&self.path);
        if !live.is_empty() {
            eprintln!(
                "warning: leaking {} because these are still mounted under it: {:?}",
                self.path.display(),
                live.iter().map(|m| &m.mount_point).collect::<Vec<_>>()
            );
            if let Some(d) = self.dir.take() {
                let _ = d.keep();
            }
        }
    }
}
