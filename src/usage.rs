//! What the writable layer holds, counted as `du` counts: allocated blocks, every inode once
//! however many names it has, the upper's root included. The daemon answers it through the
//! attribute [`USAGE_XATTR`] on the mount's root (the `usage` tool reads it); the count is one
//! walk of the upper below a directory fd, without following symlinks.
//!
//! A mount with a cap (`upper_limit=`, `upper_inodes=`) keeps counters from the start and
//! answers from them (see `quota`); any other mount walks its upper at the first query and
//! keeps counters from then on, so monitors polling it are answered without a walk.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use crate::layer;
use crate::overlay::Overlay;

/// The name of the attribute on the mount's root through which the daemon reports the
/// upper's usage. It has no namespace prefix, so no file on any filesystem can carry it: only a
/// FUSE filesystem sees it, and only ours answers it.
pub const USAGE_XATTR: &str = "rsfs-overlay.usage";

/// Use of the writable layer, and its caps if the mount has them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
    pub limit_bytes: Option<u64>,
    pub limit_inodes: Option<u64>,
}

impl Usage {
    /// One line: `bytes N inodes M[ limit_bytes L][ limit_inodes I]`.
    pub fn line(&self) -> String {
        let mut s = format!("bytes {} inodes {}", self.bytes, self.inodes);
        if let Some(l) = self.limit_bytes {
            s.push_str(&format!(" limit_bytes {l}"));
        }
        if let Some(l) = self.limit_inodes {
            s.push_str(&format!(" limit_inodes {l}"));
        }
        s
    }

    pub fn json(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        format!(
            "{{\"bytes\":{},\"inodes\":{},\"limit_bytes\":{},\"limit_inodes\":{}}}",
            self.bytes,
            self.inodes,
            opt(self.limit_bytes),
            opt(self.limit_inodes)
        )
    }

    /// Reads what [`Usage::line`] wrote.
    pub fn parse(line: &str) -> Option<Usage> {
        let mut u = Usage::default();
        let mut words = line.split_whitespace();
        while let (Some(k), Some(v)) = (words.next(), words.next()) {
            let v: u64 = v.parse().ok()?;
            match k {
                "bytes" => u.bytes = v,
                "inodes" => u.inodes = v,
                "limit_bytes" => u.limit_bytes = Some(v),
                "limit_inodes" => u.limit_inodes = Some(v),
                _ => return None,
            }
        }
        Some(u)
    }
}

/// Counts the upper below `root` (and `root` itself).
pub fn count_upper(root: &OwnedFd) -> io::Result<Usage> {
    let st = layer::stat_fd(layer::borrow(root))?;
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    count(&st, &mut seen, &mut usage);
    walk_dir(root, &mut seen, &mut usage)?;
    Ok(usage)
}

fn count(st: &nix::sys::stat::FileStat, seen: &mut HashSet<(u64, u64)>, usage: &mut Usage) {
    if seen.insert((st.st_dev, st.st_ino)) {
        usage.inodes += 1;
        usage.bytes += st.st_blocks as u64 * 512;
    }
}

fn walk_dir(dir: &OwnedFd, seen: &mut HashSet<(u64, u64)>, usage: &mut Usage) -> io::Result<()> {
    for name in crate::upperwalk::sorted_names(dir)? {
        let name = OsStr::from_bytes(&name);
        let st = match layer::stat_at(layer::borrow(dir), name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        count(&st, seen, usage);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let child = layer::open_dir_at(layer::borrow(dir), name)?;
            walk_dir(&child, seen, usage)?;
        }
    }
    Ok(())
}

impl Overlay {
    /// The upper's usage now; ENODATA without an upper (nothing to report, as for an
    /// attribute that is not there).
    pub fn upper_usage(&self) -> io::Result<Usage> {
        let upper = self
            .stack
            .upper()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODATA))?;
        if let Some(q) = self.quota.get() {
            return Ok(q.usage());
        }
        self.activate_counters(&upper.root)
    }

    /// Starts the counters of an uncapped mount: waits for the changes in flight, walks the
    /// upper, counts the files open now, and from then on measures every change (as a capped
    /// mount does from the start). Returns the usage the walk found.
    fn activate_counters(&self, root: &OwnedFd) -> io::Result<Usage> {
        let _quiet = self.uncounted.write();
        if let Some(q) = self.quota.get() {
            return Ok(q.usage());
        }
        let q = crate::quota::Quota::start(crate::quota::Caps::default(), root)?;
        for file in self.handles.upper_files() {
            q.opened(&file);
        }
        let usage = q.usage();
        let _ = self.quota.set(q);
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_back() {
        let u = Usage {
            bytes: 4096,
            inodes: 3,
            limit_bytes: Some(1 << 30),
            limit_inodes: None,
        };
        assert_eq!(Usage::parse(&u.line()), Some(u));
        assert_eq!(
            u.json(),
            "{\"bytes\":4096,\"inodes\":3,\"limit_bytes\":1073741824,\"limit_inodes\":null}"
        );
        assert_eq!(Usage::parse("bytes x"), None);
    }
}
