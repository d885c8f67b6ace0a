//! `rsfs-overlay usage`: the space and inodes the writable layer holds. From a live mount the
//! daemon answers from the counters it keeps (no walk); for an unmounted upper, one walk.
//! Both count as `du` does: allocated blocks, every inode once however many names it has,
//! the upper's root included.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;

use crate::layer;

/// The name of the attribute on the mount's root through which the daemon reports its
/// counters. It has no namespace prefix, so no file on any filesystem can carry it: only a
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

/// Walks an upper: `du -s -B1` and `du -s --inodes` in one pass.
pub fn walk_upper(upper: &Path) -> anyhow::Result<Usage> {
    let root = super::export::open_upper(upper)?;
    let st = layer::stat_fd(layer::borrow(&root))?;
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    count(&st, &mut seen, &mut usage);
    walk_dir(&root, &mut seen, &mut usage)
        .with_context(|| format!("cannot walk the upper '{}'", upper.display()))?;
    Ok(usage)
}

fn count(st: &nix::sys::stat::FileStat, seen: &mut HashSet<(u64, u64)>, usage: &mut Usage) {
    if seen.insert((st.st_dev, st.st_ino)) {
        usage.inodes += 1;
        usage.bytes += st.st_blocks as u64 * 512;
    }
}

fn walk_dir(
    dir: &OwnedFd,
    seen: &mut HashSet<(u64, u64)>,
    usage: &mut Usage,
) -> std::io::Result<()> {
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

/// Asks the daemon serving `mountpoint` for its counters.
pub fn ask_daemon(mountpoint: &Path) -> anyhow::Result<Usage> {
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .context("the mountpoint path holds a NUL byte")?;
    let name = std::ffi::CString::new(USAGE_XATTR).context("attribute name")?;
    let value = crate::sys::getxattr(crate::sys::XattrAt::Path(&path), &name).map_err(|e| {
        if crate::layer::is_no_xattr(&e) {
            anyhow::anyhow!(
                "'{}' is not the root of an rsfs-overlay mount with an upper layer \
                 (use --upper DIR for an unmounted upper)",
                mountpoint.display()
            )
        } else {
            anyhow::anyhow!("cannot ask the daemon at '{}': {}", mountpoint.display(), e)
        }
    })?;
    let text = String::from_utf8_lossy(&value);
    Usage::parse(&text).with_context(|| format!("unexpected answer from the daemon: '{text}'"))
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
