//! Metacopy files (`metacopy=on`, the kernel's format): a metadata change to a lower regular
//! file copies up its metadata and size only, marked `overlay.metacopy`; its data stays in the
//! lower and is read from there (at the same path, or where the file's `overlay.redirect`
//! points) until something opens it for writing or truncates it. Then the data is copied into
//! the upper file in place and the mark removed, last, so that a crash leaves either the
//! metacopy file or the complete one.

use std::fs::File;
use std::io;
use std::sync::Arc;

use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;

use crate::copyup::{CopyData, copy_data};
use crate::layer::LayerId;
use crate::node::{LowerData, Node};
use crate::overlay::{Location, Overlay, errno};
use crate::quota::Place;

impl Overlay {
    /// Where a metacopy file's data is read: its lower data file. `None` for any other object.
    pub(crate) fn lower_data_location(
        &self,
        node: &Node,
    ) -> io::Result<Option<(Location, LayerId)>> {
        let data = node.state().backing.lower_data().cloned();
        data.map(|d| Ok((Location::Entry(d.dir.fd()?, d.name.clone()), d.dir.layer)))
            .transpose()
    }

    /// Where `node`'s data is read: the lower data of a metacopy file, else where it is.
    pub(crate) fn locate_data(&self, node: &Node) -> io::Result<(Location, LayerId)> {
        match self.lower_data_location(node)? {
            Some(found) => Ok(found),
            None => self.locate(node),
        }
    }

    /// True when `node`'s data (not only its metadata) lives in the upper.
    pub(crate) fn has_upper_data(&self, node: &Node) -> bool {
        self.in_upper(node) && node.state().backing.lower_data().is_none()
    }

    /// Reports a metacopy file's blocks as its data's, as the kernel: its own are a hole.
    pub(crate) fn with_data_blocks(&self, node: &Node, st: &mut FileStat) {
        if let Ok(Some((loc, _))) = self.lower_data_location(node)
            && let Ok(data) = loc.stat()
        {
            st.st_blocks = data.st_blocks;
        }
    }

    /// The data a metacopy copy of the lower `node` (reached as `name` in `parent`'s copy in
    /// `lower`) will read: the lower file itself, or the data a lower metacopy file leads to.
    pub(crate) fn lower_data_of(
        &self,
        node: &Node,
        parent: &Node,
        name: &std::ffi::OsStr,
        lower: LayerId,
    ) -> io::Result<Arc<LowerData>> {
        if let Some(d) = node.state().backing.lower_data() {
            return Ok(d.clone());
        }
        let dir = parent.dir_layer(lower).ok_or_else(|| errno(libc::EIO))?;
        Ok(Arc::new(LowerData {
            dir,
            name: name.to_os_string(),
        }))
    }

    /// Completes the metacopy file `node` before its data changes: copies the lower data into
    /// it (or, for `MetadataOnly`, empties it: the caller truncates it anyway), then removes
    /// the mark. Its open files follow it to the upper. The caller holds the copy-up lock.
    pub(crate) fn copy_up_data(&self, node: &Arc<Node>, data: CopyData) -> io::Result<()> {
        let (loc, _) = self.locate(node)?;
        let Some((source, _)) = self.lower_data_location(node)? else {
            return Ok(());
        };
        let size = loc.stat()?.st_size as u64;
        let _changing = self.quota.get().map(|q| q.changing());
        if data == CopyData::All {
            self.admit(0, source.stat()?.st_blocks as u64 * 512)?;
        }
        let places = || match &loc {
            Location::Entry(dir, name) => vec![Place::entry(dir.clone(), name)],
            _ => Vec::new(),
        };
        self.counted(places, || {
            let dst = File::from(self.open_object(node, &loc, OFlag::O_WRONLY)?);
            match data {
                CopyData::All => {
                    let src = File::from(source.open(OFlag::O_RDONLY)?);
                    copy_data(&src, &dst, size)?;
                }
                CopyData::MetadataOnly => dst.set_len(0)?,
                CopyData::Metacopy => return Ok(()),
            }
            // The data must be on disk before the mark that says "read the lower" goes.
            if self.opts.sync {
                dst.sync_all()?;
            }
            loc.xattr_target()
                .remove(&self.stack.names.name("metacopy"))
        })?;
        crate::stats::copied_up(if data == CopyData::All { size } else { 0 });
        {
            let mut state = node.state_mut();
            if let crate::node::Backing::NonDir { data, .. } = &mut state.backing {
                *data = None;
            }
            node.backing_changed(&mut state);
        }
        tracing::debug!(ino = node.ino, "copied up a metacopy file's data");
        self.attrs_changed(node.ino);
        self.follow_copy_up(node);
        Ok(())
    }
}
