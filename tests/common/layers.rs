//! Layer builders: every kind of object a layer can hold, and every whiteout and opaque format
//! found in the wild. All paths are relative to the layer root; parents are created as needed.
//! Each method panics with the path on failure (these are test fixtures).
//!
//! Formats (see the kernel's Documentation/filesystems/overlayfs.rst):
//! - kernel whiteout: a character device 0/0;
//! - xattr whiteout: an empty regular file with `<prefix>whiteout` (any value), its parent
//!   directory marked `<prefix>opaque=x` (only lower layers; the kernel ignores it in the upper);
//! - opaque directory: `<prefix>opaque=y`;
//! - `<prefix>` is `trusted.overlay.`, or `user.overlay.` under the `userxattr` mount option;
//! - OCI image layers: `.wh.NAME` files and a `.wh..wh..opq` file in an opaque directory;
//! - fuse-overlayfs: `user.fuseoverlayfs.opaque=y` marks an opaque directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;

use super::xattr;

/// Which namespace holds the overlay's own xattrs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xflavor {
    /// `trusted.overlay.*`, the kernel's default.
    Trusted,
    /// `user.overlay.*`, with the `userxattr` mount option.
    User,
}

impl Xflavor {
    pub fn prefix(self) -> &'static str {
        match self {
            Xflavor::Trusted => "trusted.overlay.",
            Xflavor::User => "user.overlay.",
        }
    }

    pub fn name(self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix())
    }

    /// The mount options that select this flavor.
    pub fn mount_opts(self) -> &'static [&'static str] {
        match self {
            Xflavor::Trusted => &[],
            Xflavor::User => &["userxattr"],
        }
    }
}

pub const OCI_WHITEOUT_PREFIX: &str = ".wh.";
pub const OCI_OPAQUE_MARKER: &str = ".wh..wh..opq";
pub const FUSE_OVERLAYFS_OPAQUE: &str = "user.fuseoverlayfs.opaque";

/// One layer directory.
#[derive(Clone, Debug)]
pub struct Layer {
    root: PathBuf,
}

impl Layer {
    /// A layer at `root`, created if missing.
    pub fn new(root: impl AsRef<Path>) -> Layer {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
        Layer { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of `rel` in this layer (`""` or `"/"` is the root).
    pub fn path(&self, rel: &str) -> PathBuf {
        let rel = rel.trim_start_matches('/');
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn parent_of(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        let parent = p
            .parent()
            .expect("a path below the layer root")
            .to_path_buf();
        std::fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        parent
    }

    /// A directory (and its parents).
    pub fn dir(&self, rel: &str) -> &Self {
        let p = self.path(rel);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        self
    }

    pub fn file(&self, rel: &str, content: impl AsRef<[u8]>) -> &Self {
        self.parent_of(rel);
        let p = self.path(rel);
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        self.parent_of(rel);
        let p = self.path(rel);
        std::os::unix::fs::symlink(target, &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self
    }

    /// A second name `new` for the existing `existing` (same layer).
    pub fn hardlink(&self, existing: &str, new: &str) -> &Self {
        self.parent_of(new);
        let (a, b) = (self.path(existing), self.path(new));
        std::fs::hard_link(&a, &b)
            .unwrap_or_else(|e| panic!("link {} {}: {e}", a.display(), b.display()));
        self
    }

    pub fn fifo(&self, rel: &str) -> &Self {
        self.parent_of(rel);
        let p = self.path(rel);
        nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o644))
            .unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
        self
    }

    pub fn chardev(&self, rel: &str, major: u64, minor: u64) -> &Self {
        self.parent_of(rel);
        let p = self.path(rel);
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o644),
            makedev(major, minor),
        )
        .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
        self
    }

    /// chmod (not for symlinks).
    pub fn mode(&self, rel: &str, mode: u32) -> &Self {
        let p = self.path(rel);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
        self
    }

    /// lchown (symlinks included). Clears setuid/setgid bits: set the mode afterwards.
    pub fn owner(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let p = self.path(rel);
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("lchown {}: {e}", p.display()));
        self
    }

    pub fn xattr(&self, rel: &str, name: &str, value: impl AsRef<[u8]>) -> &Self {
        let p = self.path(rel);
        xattr::set(&p, name, value.as_ref())
            .unwrap_or_else(|e| panic!("setxattr {name} on {}: {e}", p.display()));
        self
    }

    /// atime and mtime, not following symlinks.
    pub fn times(&self, rel: &str, atime: (i64, i64), mtime: (i64, i64)) -> &Self {
        let p = self.path(rel);
        utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &TimeSpec::new(atime.0, atime.1),
            &TimeSpec::new(mtime.0, mtime.1),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
        self
    }

    /// The kernel's whiteout: a character device 0/0.
    pub fn whiteout(&self, rel: &str) -> &Self {
        self.parent_of(rel);
        let p = self.path(rel);
        mknod(&p, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .unwrap_or_else(|e| panic!("mknod whiteout {}: {e}", p.display()));
        self
    }

    /// An xattr whiteout: empty regular file with `<prefix>whiteout`, parent `<prefix>opaque=x`.
    pub fn xattr_whiteout(&self, rel: &str, flavor: Xflavor) -> &Self {
        let parent = self.parent_of(rel);
        let p = self.path(rel);
        std::fs::write(&p, b"").unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        xattr::set(&p, &flavor.name("whiteout"), b"")
            .unwrap_or_else(|e| panic!("setxattr whiteout {}: {e}", p.display()));
        xattr::set(&parent, &flavor.name("opaque"), b"x")
            .unwrap_or_else(|e| panic!("setxattr opaque=x {}: {e}", parent.display()));
        self
    }

    /// Mark the directory `rel` (created if missing) `<prefix>opaque=y`.
    pub fn opaque(&self, rel: &str, flavor: Xflavor) -> &Self {
        self.dir(rel);
        self.xattr(rel, &flavor.name("opaque"), b"y")
    }

    /// An OCI whiteout: an empty `.wh.NAME` beside where NAME would be.
    pub fn oci_whiteout(&self, rel: &str) -> &Self {
        let parent = self.parent_of(rel);
        let name = Path::new(rel)
            .file_name()
            .expect("whiteout of a named entry")
            .to_str()
            .expect("UTF-8 name");
        let p = parent.join(format!("{OCI_WHITEOUT_PREFIX}{name}"));
        std::fs::write(&p, b"").unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    /// An OCI opaque directory: `rel/.wh..wh..opq`.
    pub fn oci_opaque(&self, rel: &str) -> &Self {
        self.dir(rel);
        let p = self.path(rel).join(OCI_OPAQUE_MARKER);
        std::fs::write(&p, b"").unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    /// fuse-overlayfs's opaque marker: `user.fuseoverlayfs.opaque=y`.
    pub fn fuseoverlayfs_opaque(&self, rel: &str) -> &Self {
        self.dir(rel);
        self.xattr(rel, FUSE_OVERLAYFS_OPAQUE, b"y")
    }

    /// Set atime and mtime of everything in the layer (root included) to `t`, children first,
    /// so that two layers built by the same code at different moments compare equal.
    pub fn set_all_times(&self, t: (i64, i64)) -> &Self {
        fn walk(p: &Path, t: (i64, i64)) {
            let md = std::fs::symlink_metadata(p)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            if md.is_dir() {
                for e in
                    std::fs::read_dir(p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
                {
                    walk(&e.expect("dir entry").path(), t);
                }
            }
            utimensat(
                nix::fcntl::AT_FDCWD,
                p,
                &TimeSpec::new(t.0, t.1),
                &TimeSpec::new(t.0, t.1),
                UtimensatFlags::NoFollowSymlink,
            )
            .unwrap_or_else(|e| panic!("utimensat {}: {e}", p.display()));
        }
        walk(&self.root, t);
        self
    }
}
