//! The kernel's index directory (`index=on`, `<workdir>/index`): a copied-up hard link is
//! also linked there under the hex of its origin record, so that every lower name of the file,
//! met in this mount or after a remount (by us or the kernel), finds the one upper copy instead
//! of the stale lower file; and its `overlay.nlink` records the link count the overlay shows
//! (`U+N`/`L+N`: relative to the upper's or the lower's count), since the upper's own count
//! includes the index entry and lacks the lower names not linked up yet. The upper is tied to
//! its layers: its root's `origin` names the first lower's root and the index directory's
//! `upper` names the upper's root; a mount over other layers is refused, as by the kernel.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::sys::stat::FileStat;

use crate::format::Origin;
use crate::layer::{self, XattrTarget};
use crate::lookup::Resolved;
use crate::node::{Backing, DirLayer, LowerData, Node, fd_of};
use crate::overlay::{Location, Overlay, errno};
use crate::stack::Stack;

/// Sets, or checks, what ties the upper to its layers. `Err` is the one line for the user.
pub fn verify_roots(stack: &Stack) -> Result<(), String> {
    let (Some(upper), Some(index)) = (stack.upper(), stack.index.as_ref()) else {
        return Ok(());
    };
    let Some(lower) = stack.layers.iter().find(|l| !l.is_upper) else {
        return Ok(());
    };
    let origin_key = stack.names.name("origin");
    let lower_root = stack
        .origin_of(lower.id, lower.root.as_fd(), None)
        .ok_or("index=on needs a lower filesystem that can make file handles")?
        .encode();
    check_or_set(
        XattrTarget::Dir(upper.root.as_fd()),
        &origin_key,
        &lower_root,
        "upperdir was used over other lower layers (its overlay.origin names another \
         lowerdir root); index=on refuses it, as the kernel does",
    )?;
    let upper_root = stack
        .origin_of(upper.id, upper.root.as_fd(), None)
        .ok_or("index=on needs an upper filesystem that can make file handles")?
        .encode_upper();
    check_or_set(
        XattrTarget::Dir(fd_of(index)),
        &stack.names.name("upper"),
        &upper_root,
        "workdir's index belongs to another upperdir (its overlay.upper names another \
         directory); index=on refuses it, as the kernel does",
    )
}

fn check_or_set(
    target: XattrTarget<'_>,
    key: &[u8],
    want: &[u8],
    refusal: &str,
) -> Result<(), String> {
    match target.get_opt(key) {
        Ok(Some(have)) if have == want => Ok(()),
        Ok(Some(_)) => Err(refusal.to_owned()),
        Ok(None) => target.set(key, want, 0).map_err(|e| {
            format!(
                "index=on: cannot record {}: {e}",
                String::from_utf8_lossy(key)
            )
        }),
        Err(e) => Err(format!(
            "index=on: cannot read {}: {e}",
            String::from_utf8_lossy(key)
        )),
    }
}

/// An indexed copy's overlay link count, taken before a change to its names.
pub(crate) struct IndexedLinks {
    entry: OsString,
    overlay_nlink: u64,
}

impl IndexedLinks {
    pub(crate) fn new(entry: OsString, overlay_nlink: u64) -> IndexedLinks {
        IndexedLinks {
            entry,
            overlay_nlink,
        }
    }
}

/// The link count the overlay shows for an upper object with `overlay.nlink` value `v`,
/// whose upper count is `upper_nlink`; `lower_nlink` for the `L` form.
fn parse_nlink(
    v: &[u8],
    upper_nlink: u64,
    lower_nlink: impl FnOnce() -> Option<u64>,
) -> Option<u64> {
    let (base, diff) = match v.split_first()? {
        (b'U', rest) => (upper_nlink, rest),
        (b'L', rest) => (lower_nlink()?, rest),
        _ => return None,
    };
    let diff: i64 = std::str::from_utf8(diff)
        .ok()?
        .trim_start_matches('+')
        .parse()
        .ok()?;
    let n = base as i64 + diff;
    (n > 0).then_some(n as u64)
}

impl Overlay {
    fn index_dir(&self) -> Option<&Arc<std::os::fd::OwnedFd>> {
        self.stack.index.as_ref()
    }

    /// Under `index=on`, a lower name of a hard link that already has a copy (found in the
    /// index) resolves to the copy, reached through its index entry until the name is linked
    /// up; `parent_copy` is the name's directory in the lower that holds it.
    pub(crate) fn find_in_index(&self, r: &mut Resolved, parent_copy: &DirLayer, name: &OsStr) {
        let Some(index) = self.index_dir() else {
            return;
        };
        let Backing::NonDir { layer, .. } = r.backing else {
            return;
        };
        if r.stat.st_nlink < 2 {
            return;
        }
        if self.stack.is_upper(layer) {
            // An upper name of an indexed copy learns its entry (its other names may be
            // lower ones).
            if let Some(origin) = &r.origin {
                let entry = origin.index_name();
                if layer::stat_at(fd_of(index), &entry).is_ok_and(|st| st.st_ino == r.stat.st_ino)
                    && let Backing::NonDir { indexed, .. } = &mut r.backing
                {
                    *indexed = Some(Arc::new(entry));
                }
            }
            return;
        }
        let Ok(parent_fd) = parent_copy.fd() else {
            return;
        };
        let Some(origin) = self.stack.origin_of(layer, fd_of(&parent_fd), Some(name)) else {
            return;
        };
        let entry = origin.index_name();
        let Ok(st) = layer::stat_at(fd_of(index), &entry) else {
            return;
        };
        if st.st_mode & libc::S_IFMT != r.stat.st_mode & libc::S_IFMT {
            return;
        }
        // A metacopy copy reads its data from this very lower file (the same inode).
        let metacopy = XattrTarget::Entry(fd_of(index), &entry)
            .get_opt(&self.stack.names.name("metacopy"))
            .is_ok_and(|v| v.is_some());
        // The data is this lower file's, or, for a lower metacopy file, the data it leads to.
        let lower_data = r.backing.lower_data().cloned();
        let data = metacopy.then(|| {
            lower_data.unwrap_or_else(|| {
                Arc::new(LowerData {
                    dir: parent_copy.clone(),
                    name: name.to_os_string(),
                })
            })
        });
        r.backing = Backing::NonDir {
            layer: crate::copyup::UPPER,
            data,
            indexed: Some(Arc::new(entry)),
        };
        r.stat = st;
        r.top = crate::copyup::UPPER;
        r.origin = Some(origin);
    }

    /// Where a node reached through its index entry is.
    pub(crate) fn index_location(&self, entry: &OsStr) -> io::Result<Location> {
        let index = self.index_dir().ok_or_else(|| errno(libc::EIO))?;
        Ok(Location::Entry(index.clone(), entry.to_os_string()))
    }

    /// Links a new copy of a hard-linked lower file, built as `tmp` in the work directory
    /// with origin `origin`, into the index (first: every lower name then finds it) with its
    /// overlay link count relative to the lower's (`L+0`: nothing changed it yet). If the
    /// index already has a copy, that one is used: true then, and `tmp` is left for the
    /// caller to discard.
    pub(crate) fn index_new_copy(
        &self,
        work: BorrowedFd<'_>,
        tmp: &OsStr,
        origin: &Origin,
    ) -> io::Result<bool> {
        let Some(index) = self.index_dir() else {
            return Ok(false);
        };
        let target = XattrTarget::Entry(work, tmp);
        target.set(&self.stack.names.name("nlink"), b"L+0", 0)?;
        match nix::unistd::linkat(
            work,
            tmp,
            fd_of(index),
            origin.index_name().as_os_str(),
            nix::fcntl::AtFlags::empty(),
        ) {
            Ok(()) => Ok(false),
            Err(nix::errno::Errno::EEXIST) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// The index entry of `node` and the link count the overlay shows for it, when it is an
    /// indexed copy: to be given to `index_names_changed` after a change to its names.
    pub(crate) fn index_links(&self, node: &Node) -> Option<IndexedLinks> {
        let index = self.index_dir()?;
        if node.is_dir() || !self.in_upper(node) {
            return None;
        }
        let entry = match node.state().backing.indexed() {
            Some(e) => e.as_ref().clone(),
            None => {
                let (loc, _) = self.locate(node).ok()?;
                let v = loc
                    .xattr_target()
                    .get_opt(&self.stack.names.name("origin"))
                    .ok()??;
                Origin::decode(&v)?.index_name()
            }
        };
        let st = layer::stat_at(fd_of(index), &entry).ok()?;
        let overlay_nlink = self.nlink_at(&st, XattrTarget::Entry(fd_of(index), &entry))?;
        Some(IndexedLinks {
            entry,
            overlay_nlink,
        })
    }

    /// Records that a change to an indexed copy's names changed the overlay's link count by
    /// `delta` (the upper's own count is read afresh). At zero the index entry goes: no name
    /// is left.
    pub(crate) fn index_names_changed(&self, links: IndexedLinks, delta: i64) {
        let Some(index) = self.index_dir() else {
            return;
        };
        let now = links.overlay_nlink as i64 + delta;
        let dir = fd_of(index);
        let res = if now <= 0 {
            nix::unistd::unlinkat(
                dir,
                links.entry.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            )
            .map_err(io::Error::from)
        } else {
            layer::stat_at(dir, &links.entry).and_then(|st| {
                let v = format!("U{:+}", now - st.st_nlink as i64);
                XattrTarget::Entry(dir, &links.entry).set(
                    &self.stack.names.name("nlink"),
                    v.as_bytes(),
                    0,
                )
            })
        };
        if let Err(e) = res {
            tracing::warn!(entry = ?links.entry, error = %e, "cannot update an index entry");
        }
    }

    /// The overlay's link count of the upper object `st` whose xattrs are at `target`, from
    /// its `overlay.nlink`; `None` where it has none.
    pub(crate) fn nlink_at(&self, st: &FileStat, target: XattrTarget<'_>) -> Option<u64> {
        let v = target.get_opt(&self.stack.names.name("nlink")).ok()??;
        parse_nlink(&v, st.st_nlink, || {
            let origin = Origin::decode(&target.get_opt(&self.stack.names.name("origin")).ok()??)?;
            self.stack
                .find_origin(&origin)
                .map(|(_, lower)| lower.st_nlink)
        })
    }

    /// The link count to report for `node` (`st` its upper copy's `lstat`) under `index=on`.
    pub(crate) fn indexed_nlink(&self, node: &Node, st: &FileStat) -> Option<u64> {
        self.index_dir()?;
        // A copy in the index may be left with the index's link alone (its other names are
        // lower ones); any other upper file with one link is no indexed copy.
        let indexed = node.state().backing.indexed().is_some();
        if (st.st_nlink < 2 && !indexed)
            || st.st_mode & libc::S_IFMT == libc::S_IFDIR
            || !self.in_upper(node)
        {
            return None;
        }
        let (loc, _) = self.locate(node).ok()?;
        self.nlink_at(st, loc.xattr_target())
    }

    /// Before `parent/name`, a name of the lower hard link `node`, is whited out or replaced
    /// under `index=on`: the kernel copies it up first (at this name), since the overlay's
    /// link count then lives on the copy; true when it did so here too.
    pub(crate) fn copy_up_before_name_goes(
        &self,
        node: &Arc<Node>,
        parent: &Arc<Node>,
        name: &OsStr,
    ) -> io::Result<bool> {
        if self.index_dir().is_none() || node.is_dir() {
            return Ok(false);
        }
        if self.in_upper(node) {
            // Copied up through another name: this one is linked up, then goes.
            let only_lower_name = node.state().backing.indexed().is_some()
                && parent
                    .dir_fd(crate::copyup::UPPER)?
                    .is_none_or(|dir| layer::stat_at(fd_of(&dir), name).is_err());
            if only_lower_name {
                self.link_up_name(node, parent, name)?;
            }
            return Ok(only_lower_name);
        }
        if self.locate(node)?.0.stat()?.st_nlink < 2 {
            return Ok(false);
        }
        node.state_mut().promote_alias(parent, name);
        self.copy_up(node, crate::copyup::CopyData::Metacopy)?;
        Ok(true)
    }

    /// Makes `parent/name` (a name of the copied-up `node` that only a lower holds, its copy
    /// reached through the index) a name of the upper copy, as the kernel links one up before
    /// a rename or another change through that name.
    pub(crate) fn link_up_name(
        &self,
        node: &Arc<Node>,
        parent: &Arc<Node>,
        name: &OsStr,
    ) -> io::Result<()> {
        if self.index_dir().is_none() || node.is_dir() || !self.in_upper(node) {
            return Ok(());
        }
        let dir = self.upper_dir(parent)?;
        if layer::stat_at(fd_of(&dir), name).is_ok() {
            return Ok(());
        }
        let links = self.index_links(node);
        let (Location::Entry(from_dir, from_name), _) = self.locate(node)? else {
            return Ok(());
        };
        self.link_up(&from_dir, &from_name, parent, name)?;
        if let Some(links) = links {
            self.index_names_changed(links, 0);
        }
        self.attrs_changed(node.ino);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_nlink;

    #[test]
    fn nlink_records() {
        assert_eq!(parse_nlink(b"U+1", 2, || None), Some(3));
        assert_eq!(parse_nlink(b"U-1", 3, || None), Some(2));
        assert_eq!(parse_nlink(b"U+0", 3, || None), Some(3));
        assert_eq!(parse_nlink(b"L+0", 2, || Some(3)), Some(3));
        assert_eq!(parse_nlink(b"L-2", 2, || Some(3)), Some(1));
        assert_eq!(parse_nlink(b"X+1", 2, || None), None);
        assert_eq!(parse_nlink(b"U-5", 2, || None), None);
    }
}
