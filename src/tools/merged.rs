//! A read-only merged view of layers on disk, for the tools that need content the upper alone
//! does not hold: the full content of a directory renamed with a redirect, the data of a
//! metacopy file. It is the daemon's own core (`Overlay`) opened read-only, so it resolves
//! whiteouts, opaque directories and redirects exactly as a mount would.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::attr::{Attr, Caller};
use crate::format::XattrNames;
use crate::node::{Ino, ROOT_INO};
use crate::overlay::{Overlay, OverlayOptions};
use crate::stack::Stack;

pub struct MergedView {
    overlay: Overlay,
}

impl MergedView {
    /// The merged view of `upper` (if any) over `lowers`, top-down.
    pub fn open(upper: Option<&Path>, lowers: &[PathBuf], names: XattrNames) -> io::Result<Self> {
        let mut stack = Stack::open(upper, lowers, None, names)?;
        // The tools read whatever an upper holds, metacopy files included.
        stack.metacopy = true;
        let opts = OverlayOptions {
            read_only: true,
            ..OverlayOptions::default()
        };
        Ok(MergedView {
            overlay: Overlay::new(stack, opts)?,
        })
    }

    pub fn root(&self) -> io::Result<Attr> {
        self.overlay.getattr(ROOT_INO, None)
    }

    /// Resolves a '/'-separated path from the root (leading and doubled '/' ignored).
    pub fn lookup_path(&self, path: &[u8]) -> io::Result<Attr> {
        let mut attr = self.root()?;
        for comp in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            if !attr.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            attr = self.overlay.lookup(attr.ino, OsStr::from_bytes(comp))?;
        }
        Ok(attr)
    }

    /// Looks up one name in a merged directory.
    pub fn lookup_in(&self, dir: Ino, name: &OsStr) -> io::Result<Attr> {
        self.overlay.lookup(dir, name)
    }

    /// The entries of a merged directory, sorted by name, with their attributes.
    pub fn children(&self, dir: Ino) -> io::Result<Vec<(OsString, Attr)>> {
        let fh = self.overlay.opendir(dir)?;
        let listed = self.overlay.readdir(dir, fh);
        self.overlay.releasedir(dir, fh)?;
        let mut out = Vec::new();
        for e in listed?.iter() {
            if e.name == "." || e.name == ".." {
                continue;
            }
            out.push((e.name.clone(), self.overlay.lookup(dir, &e.name)?));
        }
        out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(out)
    }

    /// The attributes a caller sees on the object, sorted by name.
    pub fn xattrs(&self, ino: Ino) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let list = match self.overlay.listxattr(ino, &Caller::root()) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            match self.overlay.getxattr(ino, OsStr::from_bytes(name)) {
                Ok(v) => out.push((name.to_vec(), v)),
                Err(e) if crate::layer::is_no_xattr(&e) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn readlink(&self, ino: Ino) -> io::Result<Vec<u8>> {
        self.overlay.readlink(ino)
    }

    /// The file's data from its top-most layer, as a reader.
    pub fn reader(&self, ino: Ino) -> io::Result<MergedFile<'_>> {
        let (fh, _) = self.overlay.open(ino, libc::O_RDONLY, &Caller::root())?;
        Ok(MergedFile {
            view: self,
            ino,
            fh,
            offset: 0,
        })
    }
}

/// An open file of a [`MergedView`]; closed on drop.
pub struct MergedFile<'a> {
    view: &'a MergedView,
    ino: Ino,
    fh: u64,
    offset: u64,
}

impl io::Read for MergedFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(1 << 20) as u32;
        let data = self
            .view
            .overlay
            .read(self.ino, self.fh, self.offset, want)?;
        buf[..data.len()].copy_from_slice(&data);
        self.offset += data.len() as u64;
        Ok(data.len())
    }
}

impl Drop for MergedFile<'_> {
    fn drop(&mut self) {
        let _ = self.view.overlay.release(self.ino, self.fh);
    }
}
