//! The layer stack of one mount: the upper (if any) and the lowers, top-down, with what every
//! other module needs to know about them: the private xattr namespace and how a real inode
//! number becomes the one we report.

use std::io;
use std::path::PathBuf;

use crate::format::Origin;
use crate::format::XattrNames;
use crate::layer::{Layer, LayerId};
use crate::sys;
use crate::workdir::WorkDir;
use nix::sys::stat::FileStat;
use std::os::fd::AsFd;

#[derive(Debug)]
pub struct Stack {
    /// Index 0 is the upper when `has_upper`, then the lowers top-down.
    pub layers: Vec<Layer>,
    pub has_upper: bool,
    pub names: XattrNames,
    /// Where the filesystem index goes in a reported inode number; `None` when every layer
    /// shares one filesystem, where (as in the kernel) real inode numbers are reported as is.
    xino_shift: Option<u32>,
    /// The work directory, present with an upper.
    pub work: Option<WorkDir>,
    /// Each layer's filesystem UUID, where the kernel reports one (for origin records).
    uuids: Vec<Option<[u8; 16]>>,
    /// Directory redirects are followed on lookup (all but `redirect_dir=nofollow`).
    pub follow_redirects: bool,
    /// `metacopy=on`: metacopy files are followed to their lower data (else refused with
    /// EPERM, as the kernel), and metadata changes to lower files copy up no data.
    pub metacopy: bool,
    /// `index=on`: `<workdir>/index`, where a copied-up hard link is also linked under the
    /// hex of its origin record, so every lower name of it finds the copy.
    pub index: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Origin records carry the lower filesystem's UUID: all but `uuid=off` (see
    /// `use_null_origin_uuids`).
    origin_uuids: bool,
}

impl Stack {
    /// Opens every layer directory now, so the mount keeps working if a runtime detaches a
    /// layer's own mount right after we start.
    pub fn open(
        upper: Option<&std::path::Path>,
        lowers: &[PathBuf],
        work: Option<WorkDir>,
        names: XattrNames,
    ) -> io::Result<Stack> {
        let mut layers = Vec::with_capacity(lowers.len() + 1);
        if let Some(upper) = upper {
            layers.push(Layer::open(0, upper, true)?);
        }
        for lower in lowers {
            let id = layers.len();
            layers.push(Layer::open(id, lower, false)?);
        }
        // Filesystem indexes in order of first appearance, the upper's first (as the kernel).
        let mut devs: Vec<u64> = Vec::new();
        for layer in &mut layers {
            let idx = match devs.iter().position(|&d| d == layer.dev) {
                Some(i) => i,
                None => {
                    devs.push(layer.dev);
                    devs.len() - 1
                }
            };
            layer.fs_index = idx as u32;
        }
        let xino_shift = if devs.len() > 1 {
            // Enough high bits for the filesystem index plus one, as the kernel's xino.
            let bits = (usize::BITS - (devs.len() - 1).leading_zeros()) + 1;
            Some(64 - bits)
        } else {
            None
        };
        let uuids = layers
            .iter()
            .map(|l| sys::fs_uuid(l.root.as_fd()))
            .collect();
        Ok(Stack {
            uuids,
            layers,
            has_upper: upper.is_some(),
            names,
            xino_shift,
            work,
            follow_redirects: true,
            metacopy: false,
            index: None,
            origin_uuids: true,
        })
    }

    pub fn layer(&self, id: LayerId) -> &Layer {
        &self.layers[id]
    }

    pub fn is_upper(&self, id: LayerId) -> bool {
        self.has_upper && id == 0
    }

    pub fn upper(&self) -> Option<&Layer> {
        if self.has_upper {
            self.layers.first()
        } else {
            None
        }
    }

    /// The inode number reported for the object with real inode `ino` in layer `id`: unique
    /// within the mount, and equal to the kernel overlayfs's on a single-filesystem stack.
    pub fn reported_ino(&self, id: LayerId, ino: u64) -> u64 {
        match self.xino_shift {
            None => ino,
            Some(shift) => {
                let fs = u64::from(self.layers[id].fs_index);
                if fs == 0 { ino } else { ino | (fs << shift) }
            }
        }
    }

    /// `uuid=off`: origin records are written with a null UUID, and only such records are
    /// followed, so a copy of the disk with a new filesystem UUID keeps its origins. As in the
    /// kernel, only where every layer shares one filesystem (a null UUID then cannot name the
    /// wrong one); returns false, changing nothing, on a stack spread over several.
    pub fn use_null_origin_uuids(&mut self) -> bool {
        if self.xino_shift.is_some() {
            return false;
        }
        self.origin_uuids = false;
        true
    }

    /// The UUID an origin record of an object in layer `id` carries: its filesystem's, or null.
    fn origin_uuid(&self, id: LayerId) -> [u8; 16] {
        match self.uuids[id] {
            Some(uuid) if self.origin_uuids => uuid,
            _ => [0; 16],
        }
    }

    /// The origin record for a lower object (its file handle and filesystem UUID), or `None`
    /// where the filesystem cannot make file handles.
    pub fn origin_of(
        &self,
        id: LayerId,
        dir: std::os::fd::BorrowedFd<'_>,
        name: Option<&std::ffi::OsStr>,
    ) -> Option<Origin> {
        let (kind, fid) = sys::name_to_handle_at(dir, name).ok()?;
        Some(Origin {
            handle_type: u8::try_from(kind).ok()?,
            uuid: self.origin_uuid(id),
            fid,
        })
    }

    /// Finds the lower object an origin record names: `(layer, lstat)`. A record whose
    /// filesystem is not among our lowers, or whose object is gone, finds nothing.
    pub fn find_origin(&self, origin: &Origin) -> Option<(LayerId, FileStat)> {
        let mut tried: Vec<u64> = Vec::new();
        for l in self.layers.iter().filter(|l| !l.is_upper) {
            if tried.contains(&l.dev) {
                continue;
            }
            // As the kernel: a record names this filesystem only by its exact UUID (a null
            // one under `uuid=off`), so a record from another disk or mode is not followed.
            if origin.uuid != self.origin_uuid(l.id) {
                continue;
            }
            tried.push(l.dev);
            if let Ok(fd) =
                sys::open_by_handle_at(l.root.as_fd(), i32::from(origin.handle_type), &origin.fid)
                && let Ok(st) = nix::sys::stat::fstat(&fd)
            {
                let layer = self
                    .layers
                    .iter()
                    .find(|x| !x.is_upper && x.dev == st.st_dev)
                    .map_or(l.id, |x| x.id);
                return Some((layer, st));
            }
        }
        None
    }

    /// True when a layer lives on a stacking filesystem (overlayfs, ecryptfs): FUSE passthrough
    /// must then allow one more level of stacking.
    pub fn layers_on_stacked_fs(&self) -> bool {
        const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
        const ECRYPTFS_SUPER_MAGIC: i64 = 0xf15f;
        self.layers.iter().any(|l| {
            nix::sys::statfs::fstatfs(&l.root).is_ok_and(|s| {
                let t = s.filesystem_type().0;
                t == OVERLAYFS_SUPER_MAGIC || t == ECRYPTFS_SUPER_MAGIC
            })
        })
    }
}
