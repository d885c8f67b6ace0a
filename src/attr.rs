//! Plain types the core hands to the adapter: attributes as the merged view reports them, the
//! caller's credentials, filesystem statistics.

use nix::sys::stat::FileStat;
use nix::sys::statvfs::Statvfs;

/// Attributes of a merged object, as `stat(2)` through the mount reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    /// Full `st_mode`: type and permission bits.
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub blksize: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Attr {
    /// `merged_dir`: a directory made of several layers' copies, whose link count the kernel
    /// cannot know cheaply and reports as 1 (as `find` and others expect of such directories).
    pub fn from_stat(st: &FileStat, ino: u64, merged_dir: bool) -> Attr {
        Attr {
            ino,
            mode: st.st_mode,
            nlink: if merged_dir { 1 } else { st.st_nlink },
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            blksize: st.st_blksize as u64,
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    pub fn file_type(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    pub fn is_dir(&self) -> bool {
        self.file_type() == libc::S_IFDIR
    }
}

/// Who made a request: the new objects they create belong to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Supplementary groups, read from `/proc/<pid>/status` when permission checks need them.
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn root() -> Caller {
        Caller {
            uid: 0,
            gid: 0,
            pid: 0,
            groups: Vec::new(),
        }
    }

    /// The caller with supplementary groups, as far as /proc still knows the process.
    pub fn with_groups(uid: u32, gid: u32, pid: u32) -> Caller {
        let groups = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                    g.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
            .unwrap_or_default();
        Caller {
            uid,
            gid,
            pid,
            groups,
        }
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// The classic permission check of `mask` (R_OK/W_OK/X_OK bits) against `attr`.
    pub fn may_access(&self, attr: &Attr, mask: i32) -> bool {
        let mask = (mask & 7) as u32;
        if mask == 0 {
            return true;
        }
        if self.uid == 0 {
            // Root passes except for execute, which needs some execute bit on non-directories.
            return mask & 1 == 0 || attr.is_dir() || attr.mode & 0o111 != 0;
        }
        let bits = if self.uid == attr.uid {
            (attr.mode >> 6) & 7
        } else if self.in_group(attr.gid) {
            (attr.mode >> 3) & 7
        } else {
            attr.mode & 7
        };
        bits & mask == mask
    }
}

/// Filesystem statistics of the merged view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl Statfs {
    pub fn from_statvfs(st: &Statvfs) -> Statfs {
        Statfs {
            blocks: st.blocks(),
            bfree: st.blocks_free(),
            bavail: st.blocks_available(),
            files: st.files(),
            ffree: st.files_free(),
            bsize: st.block_size() as u32,
            namelen: st.name_max() as u32,
            frsize: st.fragment_size() as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(mode: u32, uid: u32, gid: u32) -> Attr {
        Attr {
            ino: 2,
            mode,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            size: 0,
            blocks: 0,
            blksize: 4096,
            atime: (0, 0),
            mtime: (0, 0),
            ctime: (0, 0),
        }
    }

    #[test]
    fn permission_classes() {
        let user = Caller {
            uid: 1000,
            gid: 1000,
            pid: 1,
            groups: vec![50],
        };
        let f = attr(libc::S_IFREG | 0o640, 1000, 50);
        assert!(user.may_access(&f, libc::R_OK | libc::W_OK));
        assert!(!user.may_access(&f, libc::X_OK));
        let g = attr(libc::S_IFREG | 0o640, 0, 50);
        assert!(user.may_access(&g, libc::R_OK));
        assert!(!user.may_access(&g, libc::W_OK));
        let o = attr(libc::S_IFREG | 0o604, 0, 0);
        assert!(user.may_access(&o, libc::R_OK));
        let root = Caller::root();
        assert!(root.may_access(&attr(libc::S_IFREG, 5, 5), libc::R_OK | libc::W_OK));
        assert!(!root.may_access(&attr(libc::S_IFREG | 0o600, 5, 5), libc::X_OK));
        assert!(root.may_access(&attr(libc::S_IFDIR, 5, 5), libc::X_OK));
    }
}
