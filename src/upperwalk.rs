//! A walk over one upper layer as the overlay format defines it, for the layer tools (`export`,
//! `diff`, `usage`): every entry in a fixed order (pre-order, names sorted bytewise, so two
//! walks of the same upper agree), classified as whiteout, directory (opaque, redirected) or
//! object. Like the daemon, the walk opens one name at a time below a directory fd and never
//! follows a symlink, so a hostile upper cannot lead it out of the layer.
//!
//! An offline upper does not say which namespace its private attributes use, so both the
//! kernel's (`trusted.overlay.*`) and the unprivileged one (`user.overlay.*`) are read, as are
//! the OCI/AUFS markers containers/storage writes into uppers.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::FileStat;

use crate::format::{self, DirMarks, XattrNames};
use crate::layer::{self, XattrTarget};

/// Both namespaces of the overlay's private attributes, the kernel's first.
pub const FLAVORS: [XattrNames; 2] = [
    XattrNames { userxattr: false },
    XattrNames { userxattr: true },
];

/// What one entry of an upper means for the merged view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Hides the name in every layer below (char 0/0, xattr whiteout, or an OCI `.wh.` file,
    /// in which case the entry's path is the hidden name's).
    Whiteout,
    /// A directory; `opaque` hides the lowers' copies, `redirect` names where its lower
    /// content lives (a directory renamed with `redirect_dir=on`).
    Dir {
        opaque: bool,
        redirect: Option<Vec<u8>>,
    },
    /// A regular file, symlink, device, fifo or socket.
    Object,
    /// The directory being listed is opaque (by attribute or OCI marker): reported once among
    /// its entries, at the place its OCI marker `.wh..wh..opq` sorts.
    OpaqueMarker,
}

/// One entry met by the walk.
#[derive(Debug)]
pub struct Entry<'a> {
    /// Path relative to the upper root, components joined with '/', no leading '/'.
    pub path: &'a [u8],
    /// The name inside its parent as stored (for an OCI whiteout, the `.wh.` file's name).
    pub stored_name: &'a OsStr,
    pub stat: FileStat,
    pub item: Item,
    /// The parent directory, for opening the entry or reading its attributes.
    pub parent: &'a OwnedFd,
}

impl Entry<'_> {
    /// The entry's attributes and data, reached without following symlinks.
    pub fn target(&self) -> XattrTarget<'_> {
        XattrTarget::Entry(layer::borrow(self.parent), self.stored_name)
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.item, Item::Dir { .. })
    }
}

/// Whether to descend into a directory just visited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Descend {
    Yes,
    No,
}

/// The opaque and xattr-whiteout marks of a directory, in either namespace or as OCI marker.
pub fn marks_of(dir: &OwnedFd) -> DirMarks {
    let mut marks = DirMarks::default();
    for names in FLAVORS {
        let m = format::dir_marks(names, XattrTarget::Dir(layer::borrow(dir)));
        marks.opaque |= m.opaque;
        marks.xwhiteouts |= m.xwhiteouts;
    }
    if !marks.opaque {
        let marker = OsStr::from_bytes(format::OCI_OPAQUE_MARKER);
        marks.opaque = layer::stat_at(layer::borrow(dir), marker).is_ok();
    }
    marks
}

/// The redirect recorded on a directory, in either namespace.
pub fn redirect_of(target: XattrTarget<'_>) -> io::Result<Option<Vec<u8>>> {
    for names in FLAVORS {
        if let Some(v) = target.get_opt(&names.name("redirect"))? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// True when an object carries a private attribute `suffix` in either namespace.
pub fn has_private(target: XattrTarget<'_>, suffix: &str) -> io::Result<bool> {
    for names in FLAVORS {
        if target.get_opt(&names.name(suffix))?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The name an attribute is exported or compared under, `None` for the overlay's own (both
/// namespaces and fuse-overlayfs's). Escaped names (`trusted.overlay.overlay.X`, a caller's
/// `trusted.overlay.X`) are the caller's data and come back unescaped.
pub fn user_xattr_name(stored: &[u8]) -> Option<Vec<u8>> {
    let names = if stored.starts_with(b"user.overlay.") {
        FLAVORS[1]
    } else {
        FLAVORS[0]
    };
    names.visible(stored)
}

/// The sorted names of a directory, without "." and "..".
pub fn sorted_names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut listing = nix::dir::Dir::from_fd(layer::reopen_dir(layer::borrow(dir))?)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The name an entry has in an OCI layer, which orders the walk: a whiteout sorts as
/// `.wh.NAME`, an opaque directory's marker as `.wh..wh..opq`.
pub fn layer_name(shown: &[u8], item: &Item) -> Vec<u8> {
    match item {
        Item::Whiteout => format::oci_whiteout_name(OsStr::from_bytes(shown)),
        Item::OpaqueMarker => format::OCI_OPAQUE_MARKER.to_vec(),
        _ => shown.to_vec(),
    }
}

/// Walks the upper below `root` (the root itself is not visited), calling `visit` for every
/// entry in pre-order, the entries of each directory in the bytewise order of their
/// [`layer_name`], so the walk lists an upper in the order its layer tar is sorted.
pub fn walk(
    root: &OwnedFd,
    visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<Descend>,
) -> io::Result<()> {
    let marks = marks_of(root);
    let mut path = Vec::new();
    walk_dir(root, marks, &mut path, visit)
}

/// One child of a directory, classified before the directory's entries are ordered.
struct Child {
    stored: Vec<u8>,
    /// The path component it stands for (the hidden name for an OCI whiteout).
    shown: Vec<u8>,
    stat: Option<FileStat>,
    item: Item,
}

fn walk_dir(
    dir: &OwnedFd,
    marks: DirMarks,
    path: &mut Vec<u8>,
    visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<Descend>,
) -> io::Result<()> {
    let mut children = Vec::new();
    if marks.opaque {
        children.push(Child {
            stored: format::OCI_OPAQUE_MARKER.to_vec(),
            shown: format::OCI_OPAQUE_MARKER.to_vec(),
            stat: None,
            item: Item::OpaqueMarker,
        });
    }
    for name in sorted_names(dir)? {
        if name == format::OCI_OPAQUE_MARKER {
            continue;
        }
        let stored = OsStr::from_bytes(&name);
        let st = match layer::stat_at(layer::borrow(dir), stored) {
            Ok(st) => st,
            // Removed since the listing (a live upper): nothing to report.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let item = classify(dir, marks, stored, &name, &st)?;
        let shown = format::oci_whiteout_target(&name).unwrap_or(&name).to_vec();
        children.push(Child {
            stored: name,
            shown,
            stat: Some(st),
            item,
        });
    }
    children.sort_by_cached_key(|c| layer_name(&c.shown, &c.item));
    let base_len = path.len();
    for child in children {
        if base_len > 0 {
            path.push(b'/');
        }
        path.extend_from_slice(&child.shown);
        let result = visit_one(dir, child, path, visit);
        path.truncate(base_len);
        result?;
    }
    Ok(())
}

fn classify(
    dir: &OwnedFd,
    parent_marks: DirMarks,
    stored: &OsStr,
    name: &[u8],
    st: &FileStat,
) -> io::Result<Item> {
    let target = XattrTarget::Entry(layer::borrow(dir), stored);
    if format::is_char_whiteout(st)
        || format::oci_whiteout_target(name).is_some()
        || FLAVORS
            .iter()
            .any(|&n| format::is_xattr_whiteout(n, st, parent_marks, target))
    {
        return Ok(Item::Whiteout);
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        return Ok(Item::Dir {
            opaque: false,
            redirect: redirect_of(target)?,
        });
    }
    Ok(Item::Object)
}

fn visit_one(
    dir: &OwnedFd,
    child: Child,
    path: &mut Vec<u8>,
    visit: &mut dyn FnMut(&Entry<'_>) -> io::Result<Descend>,
) -> io::Result<()> {
    let stored = OsStr::from_bytes(&child.stored);
    let stat = match child.stat {
        Some(st) => st,
        // The marker stands for its directory: report the directory's own attributes.
        None => layer::stat_fd(layer::borrow(dir))?,
    };
    let Item::Dir { redirect, .. } = child.item else {
        let entry = Entry {
            path,
            stored_name: stored,
            stat,
            item: child.item,
            parent: dir,
        };
        visit(&entry)?;
        return Ok(());
    };
    let sub = layer::open_dir_at(layer::borrow(dir), stored)?;
    let marks = marks_of(&sub);
    let entry = Entry {
        path,
        stored_name: stored,
        stat,
        item: Item::Dir {
            opaque: marks.opaque,
            redirect,
        },
        parent: dir,
    };
    if visit(&entry)? == Descend::Yes {
        walk_dir(&sub, marks, path, visit)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_names_are_never_user_data() {
        for private in [
            &b"trusted.overlay.opaque"[..],
            b"trusted.overlay.origin",
            b"user.overlay.redirect",
            b"user.fuseoverlayfs.opaque",
        ] {
            assert_eq!(user_xattr_name(private), None, "{private:?}");
        }
        assert_eq!(
            user_xattr_name(b"trusted.overlay.overlay.opaque").as_deref(),
            Some(&b"trusted.overlay.opaque"[..])
        );
        assert_eq!(
            user_xattr_name(b"user.overlay.overlay.x").as_deref(),
            Some(&b"user.overlay.x"[..])
        );
        assert_eq!(
            user_xattr_name(b"user.mime").as_deref(),
            Some(&b"user.mime"[..])
        );
        assert_eq!(
            user_xattr_name(b"security.capability").as_deref(),
            Some(&b"security.capability"[..])
        );
    }
}
