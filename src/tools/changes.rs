//! `rsfs-overlay diff`: the list of changes `podman diff` prints for a container (`A`, `C`, `D`
//! and a path), computed from the upper instead of by comparing two mounted trees. Only the
//! places the upper touches can differ, so the walk follows the upper's directories and asks
//! the lowers (the "before" view) and the merged layers (the "after" view) about those names
//! alone.
//!
//! The rules are those of containers/storage's tree comparison, which podman uses whenever a
//! mount program serves the overlay: a path in only one view is added or deleted; a path in
//! both is changed when its type, mode, owner or device differ, for non-directories also its
//! size or mtime, its symlink target, its `user.*` attributes or its file capability; a
//! directory holding a change is listed as changed itself, before its entries. Without lowers,
//! what the upper records is all there is: whiteouts are deletions, objects with an `origin`
//! (copied up) are changes, everything else is added.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::Context;

use super::merged::MergedView;
use crate::attr::Attr;
use crate::format::{self, XattrNames};
use crate::layer::{self, XattrTarget};
use crate::node::Ino;
use crate::upperwalk;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Added,
    Changed,
    Deleted,
}

impl Kind {
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

/// One line of the list: the kind and the absolute path in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub kind: Kind,
    pub path: Vec<u8>,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.kind.letter(),
            String::from_utf8_lossy(&self.path)
        )
    }
}

pub fn run(upper: &std::path::Path, lowers: &[PathBuf]) -> anyhow::Result<Vec<Change>> {
    let root = super::export::open_upper(upper)?;
    let names = XattrNames {
        userxattr: crate::privilege::lacks_trusted_xattrs(),
    };
    let after = MergedView::open(Some(upper), lowers, names)
        .with_context(|| format!("cannot open the layers of '{}'", upper.display()))?;
    let before = if lowers.is_empty() {
        None
    } else {
        Some(MergedView::open(None, lowers, names).context("cannot open the lower layers")?)
    };
    let mut d = Differ {
        before: before.as_ref(),
        after: &after,
        out: Vec::new(),
    };
    let old_root = match &before {
        Some(v) => Some(v.root()?),
        None => None,
    };
    d.dir(b"", Some(&root), false, old_root, after.root()?)
        .with_context(|| format!("cannot compare the upper '{}'", upper.display()))?;
    Ok(d.out)
}

struct Differ<'v> {
    before: Option<&'v MergedView>,
    after: &'v MergedView,
    out: Vec<Change>,
}

impl Differ<'_> {
    /// Compares the children of one directory. `upper` is its copy in the upper, if any;
    /// `whole` says every child may differ (opaque or redirected: the upper's names are not
    /// the only candidates).
    fn dir(
        &mut self,
        path: &[u8],
        upper: Option<&OwnedFd>,
        whole: bool,
        old: Option<Attr>,
        new: Attr,
    ) -> io::Result<()> {
        let mut names: BTreeSet<Vec<u8>> = BTreeSet::new();
        if let Some(fd) = upper {
            for n in upperwalk::sorted_names(fd)? {
                if n == format::OCI_OPAQUE_MARKER {
                    continue;
                }
                names.insert(format::oci_whiteout_target(&n).unwrap_or(&n).to_vec());
            }
        }
        if whole {
            if let (Some(view), Some(old)) = (self.before, old.filter(Attr::is_dir)) {
                names.extend(
                    view.children(old.ino)?
                        .into_iter()
                        .map(|(n, _)| n.into_encoded_bytes()),
                );
            }
            names.extend(
                self.after
                    .children(new.ino)?
                    .into_iter()
                    .map(|(n, _)| n.into_encoded_bytes()),
            );
        }
        for name in names {
            let mut child = path.to_vec();
            child.push(b'/');
            child.extend_from_slice(&name);
            let parent = Parent {
                upper,
                whole,
                old,
                new,
            };
            self.entry(&child, &name, &parent)?;
        }
        Ok(())
    }

    fn entry(&mut self, path: &[u8], name: &[u8], parent: &Parent<'_>) -> io::Result<()> {
        let name_os = OsStr::from_bytes(name);
        let new = found(self.after.lookup_in(parent.new.ino, name_os))?;
        let old = match (self.before, parent.old.filter(Attr::is_dir)) {
            (Some(view), Some(p)) => found(view.lookup_in(p.ino, name_os))?,
            (Some(_), None) => None,
            (None, _) => old_from_upper_alone(parent.upper, name)?,
        };
        match (old, new) {
            (None, None) => {}
            (Some(_), None) => self.push(Kind::Deleted, path),
            (None, Some(n)) => {
                self.push(Kind::Added, path);
                if n.is_dir() {
                    self.all_added(path, n.ino)?;
                }
            }
            (Some(o), Some(n)) => {
                if self.differs(&o, &n)? {
                    self.push(Kind::Changed, path);
                }
                if n.is_dir() {
                    self.below(path, name, parent, o, n)?;
                }
            }
        }
        Ok(())
    }

    /// Descends into a directory present before and after; a directory holding a change is
    /// listed as changed itself, before its entries.
    fn below(
        &mut self,
        path: &[u8],
        name: &[u8],
        parent: &Parent<'_>,
        old: Attr,
        new: Attr,
    ) -> io::Result<()> {
        let upper = match parent.upper {
            Some(p) => layer::open_dir_at(layer::borrow(p), OsStr::from_bytes(name)).ok(),
            None => None,
        };
        let whole = match &upper {
            Some(fd) => {
                let redirected =
                    upperwalk::redirect_of(XattrTarget::Dir(layer::borrow(fd)))?.is_some();
                if redirected && self.before.is_none() {
                    // Its content lives in the lowers: without them any answer is a guess.
                    return Err(io::Error::other(format!(
                        "'{}' is a renamed (redirected) directory; give --lowerdir",
                        String::from_utf8_lossy(path)
                    )));
                }
                upperwalk::marks_of(fd).opaque || redirected
            }
            // Not in the upper: unchanged, unless its parent's content came from elsewhere
            // (a redirected directory), which makes all of it a candidate.
            None => parent.whole,
        };
        if upper.is_none() && !whole {
            return Ok(());
        }
        let start = self.out.len();
        self.dir(
            path,
            upper.as_ref(),
            whole,
            Some(old).filter(Attr::is_dir),
            new,
        )?;
        let listed = self.out[..start]
            .last()
            .is_some_and(|c| c.path == path && c.kind != Kind::Deleted);
        if self.out.len() > start && !listed {
            let change = Change {
                kind: Kind::Changed,
                path: path.to_vec(),
            };
            self.out.insert(start, change);
        }
        Ok(())
    }

    fn all_added(&mut self, path: &[u8], dir: Ino) -> io::Result<()> {
        for (name, attr) in self.after.children(dir)? {
            let mut child = path.to_vec();
            child.push(b'/');
            child.extend_from_slice(name.as_bytes());
            self.push(Kind::Added, &child);
            if attr.is_dir() {
                self.all_added(&child, attr.ino)?;
            }
        }
        Ok(())
    }

    fn differs(&self, old: &Attr, new: &Attr) -> io::Result<bool> {
        if self.before.is_none() {
            // Copied up: a change by definition (the kernel copies up only to change).
            return Ok(!new.is_dir());
        }
        if old.mode != new.mode || old.uid != new.uid || old.gid != new.gid || old.rdev != new.rdev
        {
            return Ok(true);
        }
        if new.is_dir() {
            return Ok(false);
        }
        if old.size != new.size || old.mtime != new.mtime {
            return Ok(true);
        }
        let (Some(before), after) = (self.before, self.after) else {
            return Ok(false);
        };
        if new.file_type() == libc::S_IFLNK
            && before.readlink(old.ino)? != after.readlink(new.ino)?
        {
            return Ok(true);
        }
        Ok(compared_xattrs(before.xattrs(old.ino)?) != compared_xattrs(after.xattrs(new.ino)?))
    }

    fn push(&mut self, kind: Kind, path: &[u8]) {
        self.out.push(Change {
            kind,
            path: path.to_vec(),
        });
    }
}

/// The attributes a tree comparison looks at: `user.*` and the file capability.
fn compared_xattrs(all: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
    all.into_iter()
        .filter(|(n, _)| n.starts_with(b"user.") || n.as_slice() == b"security.capability")
        .collect()
}

fn found(r: io::Result<Attr>) -> io::Result<Option<Attr>> {
    match r {
        Ok(a) => Ok(Some(a)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory whose children are compared.
struct Parent<'a> {
    upper: Option<&'a OwnedFd>,
    whole: bool,
    old: Option<Attr>,
    new: Attr,
}

/// With no lowers given, the upper's own records stand for the "before" view: a whiteout
/// hides something, an object with an `origin` was copied up from something. Either stands
/// for an object of the same type and mode, so only the origin decides a change.
fn old_from_upper_alone(upper_parent: Option<&OwnedFd>, name: &[u8]) -> io::Result<Option<Attr>> {
    let Some(parent) = upper_parent else {
        return Ok(None);
    };
    let dir = layer::borrow(parent);
    let name_os = OsStr::from_bytes(name);
    let target = XattrTarget::Entry(dir, name_os);
    match layer::stat_at(dir, name_os) {
        Ok(st) => {
            let whiteout =
                format::is_char_whiteout(&st) || upperwalk::has_private(target, "whiteout")?;
            if whiteout || upperwalk::has_private(target, "origin")? {
                return Ok(Some(Attr::from_stat(&st, 0, false)));
            }
            Ok(None)
        }
        Err(_) => {
            let wh = format::oci_whiteout_name(name_os);
            match layer::stat_at(dir, OsStr::from_bytes(&wh)) {
                Ok(st) => Ok(Some(Attr::from_stat(&st, 0, false))),
                Err(_) => Ok(None),
            }
        }
    }
}
