//! `rsfs-overlay export`: the upper's changes as an OCI image layer. Whiteouts in any of the
//! formats we read become `.wh.NAME` entries, opaque directories get `.wh..wh..opq`, a
//! directory renamed with a redirect is written whole (it is new at its new place; its old
//! place holds a whiteout already), metacopy files carry their data, hard links within the
//! upper stay hard links. The overlay's private attributes never leave the upper.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;

use super::layertar::{BlobId, Body, Compression, LayerTar, Meta};
use super::merged::MergedView;
use crate::attr::Attr;
use crate::format::XattrNames;
use crate::layer::{self, XattrTarget};
use crate::upperwalk::{self, Descend, Entry, Item};

/// Where the layer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub upper: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub output: Output,
    pub compression: Compression,
}

/// Writes the layer and returns its digest and size.
pub fn run(req: &ExportRequest) -> anyhow::Result<BlobId> {
    let root = open_upper(&req.upper)?;
    // A live mount's upper: make what the daemon wrote so far durable and consistent on disk
    // before reading it (the same sync point `sync` would give).
    nix::unistd::syncfs(&root)
        .with_context(|| format!("cannot sync the upper '{}'", req.upper.display()))?;
    match &req.output {
        Output::Stdout => {
            if nix::unistd::isatty(std::io::stdout()).unwrap_or(false) {
                bail!("refusing to write a tar archive to a terminal; give -o FILE");
            }
            let out = io::BufWriter::new(io::stdout().lock());
            let (id, mut out) = write_layer(req, &root, out)?;
            out.flush().context("cannot write the layer to stdout")?;
            Ok(id)
        }
        Output::File(path) => {
            let file = File::create(path)
                .with_context(|| format!("cannot create '{}'", path.display()))?;
            let result = write_layer(req, &root, io::BufWriter::new(file)).and_then(|(id, out)| {
                let file = out
                    .into_inner()
                    .map_err(|e| anyhow::anyhow!("cannot write '{}': {}", path.display(), e))?;
                file.sync_all()
                    .with_context(|| format!("cannot write '{}'", path.display()))?;
                Ok(id)
            });
            if result.is_err() {
                let _ = std::fs::remove_file(path);
            }
            result
        }
    }
}

pub fn open_upper(path: &Path) -> anyhow::Result<std::os::fd::OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .with_context(|| format!("cannot open the upper directory '{}'", path.display()))?;
    Ok(fd)
}

fn write_layer<W: Write>(
    req: &ExportRequest,
    root: &std::os::fd::OwnedFd,
    out: W,
) -> anyhow::Result<(BlobId, W)> {
    let mut ex = Exporter {
        req,
        tar: LayerTar::new(out, req.compression).context("cannot start the layer")?,
        upper_links: HashMap::new(),
        merged_links: HashMap::new(),
        merged: None,
        lowers_only: None,
    };
    // The walker speaks io::Result; the exporter's own error, with its context, is kept aside.
    let mut failure: Option<anyhow::Error> = None;
    let walked = upperwalk::walk(root, &mut |e| {
        ex.upper_entry(e).map_err(|err| {
            failure = Some(err);
            io::Error::other("export stopped")
        })
    });
    let context = || format!("cannot export the upper '{}'", req.upper.display());
    if let Some(err) = failure {
        return Err(err.context(context()));
    }
    walked.with_context(context)?;
    let (id, out) = ex.tar.finish().context("cannot finish the layer")?;
    Ok((id, out))
}

struct Exporter<'r, W: Write> {
    req: &'r ExportRequest,
    tar: LayerTar<W>,
    /// First path of each multiply-linked upper file, by (device, inode).
    upper_links: HashMap<(u64, u64), Vec<u8>>,
    /// The same for files exported from the merged view, by reported inode number.
    merged_links: HashMap<u64, Vec<u8>>,
    /// Opened on the first redirected directory.
    merged: Option<MergedView>,
    /// Opened on the first metacopy file.
    lowers_only: Option<MergedView>,
}

impl<W: Write> Exporter<'_, W> {
    fn upper_entry(&mut self, e: &Entry<'_>) -> anyhow::Result<Descend> {
        let shown = String::from_utf8_lossy(e.path).into_owned();
        match &e.item {
            Item::Whiteout => {
                self.whiteout(e.path, &e.stat)?;
                Ok(Descend::No)
            }
            Item::OpaqueMarker => {
                // The walk's path for the marker ends in the marker's own name.
                let (dir, _) = split_parent(e.path);
                self.opaque_marker(dir, e.stat.st_mtime)?;
                Ok(Descend::No)
            }
            Item::Dir { redirect, .. } => {
                let meta = meta_of(&e.stat, upper_xattrs(e.target())?);
                self.tar.append(e.path, &meta, Body::Dir)?;
                if let Some(redirect) = redirect {
                    // Its content is all new here: an opaque directory with the merged
                    // content (the walk does not descend; the marker comes from the merge).
                    self.redirected_dir(e.path, redirect, meta.mtime)
                        .with_context(|| format!("directory '{shown}' (renamed)"))?;
                    return Ok(Descend::No);
                }
                // An opaque directory's marker comes as one of its entries.
                Ok(Descend::Yes)
            }
            Item::Object => {
                self.upper_object(e).with_context(|| format!("'{shown}'"))?;
                Ok(Descend::No)
            }
        }
    }

    fn whiteout(&mut self, path: &[u8], st: &FileStat) -> io::Result<()> {
        let (dir, name) = split_parent(path);
        let mut wh = dir.to_vec();
        if !wh.is_empty() {
            wh.push(b'/');
        }
        wh.extend_from_slice(b".wh.");
        wh.extend_from_slice(name);
        let meta = Meta {
            mode: 0o644,
            mtime: st.st_mtime,
            ..Meta::default()
        };
        self.tar.append(
            &wh,
            &meta,
            Body::File {
                size: 0,
                data: &mut io::empty(),
            },
        )
    }

    fn opaque_marker(&mut self, dir: &[u8], mtime: i64) -> io::Result<()> {
        let mut p = dir.to_vec();
        if !p.is_empty() {
            p.push(b'/');
        }
        p.extend_from_slice(crate::format::OCI_OPAQUE_MARKER);
        let meta = Meta {
            mode: 0o644,
            mtime,
            ..Meta::default()
        };
        self.tar.append(
            &p,
            &meta,
            Body::File {
                size: 0,
                data: &mut io::empty(),
            },
        )
    }

    fn upper_object(&mut self, e: &Entry<'_>) -> anyhow::Result<()> {
        let st = &e.stat;
        let target = e.target();
        let meta = meta_of(st, upper_xattrs(target)?);
        let dir = layer::borrow(e.parent);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.upper_links.get(&key) {
                        let first = first.clone();
                        return Ok(self.tar.append(e.path, &meta, Body::HardLink(&first))?);
                    }
                    self.upper_links.insert(key, e.path.to_vec());
                }
                if upperwalk::has_private(target, "metacopy")? {
                    return self.metacopy_file(e, &meta);
                }
                let file = layer::open_at(dir, e.stored_name, OFlag::O_RDONLY, 0)?;
                let mut data = Exact::new(File::from(file), st.st_size as u64);
                let size = st.st_size as u64;
                self.tar.append(
                    e.path,
                    &meta,
                    Body::File {
                        size,
                        data: &mut data,
                    },
                )?;
            }
            libc::S_IFLNK => {
                let to = layer::readlink_at(dir, e.stored_name)?;
                self.tar.append(e.path, &meta, Body::Symlink(&to))?;
            }
            libc::S_IFCHR | libc::S_IFBLK => {
                let (major, minor) = device_numbers(st.st_rdev);
                let body = if st.st_mode & libc::S_IFMT == libc::S_IFCHR {
                    Body::Char { major, minor }
                } else {
                    Body::Block { major, minor }
                };
                self.tar.append(e.path, &meta, body)?;
            }
            libc::S_IFIFO => self.tar.append(e.path, &meta, Body::Fifo)?,
            // A tar layer cannot hold sockets (neither Go's archive/tar nor OCI does); a
            // socket is recreated by whoever listens on it.
            _ => tracing::warn!("skipping socket '{}'", String::from_utf8_lossy(e.path)),
        }
        Ok(())
    }

    /// A metacopy upper file holds metadata only; its data lives in a lower, at the path its
    /// redirect names or else at its own path.
    fn metacopy_file(&mut self, e: &Entry<'_>, meta: &Meta) -> anyhow::Result<()> {
        if self.req.lowers.is_empty() {
            bail!("a metacopy file needs --lowerdir to find its data");
        }
        let view = match self.lowers_only.take() {
            Some(view) => view,
            None => MergedView::open(None, &self.req.lowers, XattrNames { userxattr: false })
                .context("cannot open the lower layers")?,
        };
        let view = &*self.lowers_only.insert(view);
        let source = upperwalk::redirect_of(e.target())?.unwrap_or_else(|| e.path.to_vec());
        let attr = view
            .lookup_path(&source)
            .with_context(|| format!("its data '{}' is in no lower", show(&source)))?;
        let mut data = Exact::new(view.reader(attr.ino)?, attr.size);
        let size = attr.size;
        Ok(self.tar.append(
            e.path,
            meta,
            Body::File {
                size,
                data: &mut data,
            },
        )?)
    }

    /// Writes the whole merged content below a redirected directory.
    fn redirected_dir(&mut self, path: &[u8], redirect: &[u8], mtime: i64) -> anyhow::Result<()> {
        if self.req.lowers.is_empty() {
            bail!(
                "it is redirected to '{}', which needs --lowerdir",
                show(redirect)
            );
        }
        // Taken out while its content is written (that needs `self` mutably), put back after.
        let view = match self.merged.take() {
            Some(view) => view,
            None => {
                let names = XattrNames {
                    userxattr: self.redirect_namespace_is_user(path),
                };
                MergedView::open(Some(&self.req.upper), &self.req.lowers, names)
                    .context("cannot open the layers")?
            }
        };
        let result = view
            .lookup_path(path)
            .map_err(anyhow::Error::from)
            .and_then(|dir| self.merged_children(&view, path, dir.ino, Some(mtime)));
        self.merged = Some(view);
        result
    }

    /// Whether the upper stores its redirects as `user.overlay.*` (a rootless upper).
    fn redirect_namespace_is_user(&self, path: &[u8]) -> bool {
        let Ok(root) = open_upper(&self.req.upper) else {
            return false;
        };
        let (dir, name) = split_parent(path);
        let mut fd = root;
        for comp in dir.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match layer::open_dir_at(layer::borrow(&fd), OsStr::from_bytes(comp)) {
                Ok(next) => fd = next,
                Err(_) => return false,
            }
        }
        let target = XattrTarget::Entry(layer::borrow(&fd), OsStr::from_bytes(name));
        let user = XattrNames { userxattr: true }.name("redirect");
        matches!(target.get_opt(&user), Ok(Some(_)))
    }

    /// The entries of a merged directory, sorted by name; `opaque` (the directory's mtime)
    /// adds its opaque marker at the place the marker's name sorts.
    fn merged_children(
        &mut self,
        view: &MergedView,
        path: &[u8],
        dir: u64,
        opaque: Option<i64>,
    ) -> anyhow::Result<()> {
        let mut marker = opaque;
        for (name, attr) in view.children(dir)? {
            if let Some(mtime) = marker
                && name.as_bytes() > crate::format::OCI_OPAQUE_MARKER
            {
                self.opaque_marker(path, mtime)?;
                marker = None;
            }
            let mut child = path.to_vec();
            child.push(b'/');
            child.extend_from_slice(name.as_bytes());
            self.merged_object(view, &child, &attr)
                .with_context(|| format!("'{}'", show(&child)))?;
        }
        if let Some(mtime) = marker {
            self.opaque_marker(path, mtime)?;
        }
        Ok(())
    }

    fn merged_object(&mut self, view: &MergedView, path: &[u8], attr: &Attr) -> anyhow::Result<()> {
        let meta = Meta {
            mode: attr.mode & 0o7777,
            uid: attr.uid,
            gid: attr.gid,
            mtime: attr.mtime.0,
            xattrs: view.xattrs(attr.ino)?,
        };
        match attr.file_type() {
            libc::S_IFDIR => {
                self.tar.append(path, &meta, Body::Dir)?;
                self.merged_children(view, path, attr.ino, None)?;
            }
            libc::S_IFREG => {
                if attr.nlink > 1 {
                    if let Some(first) = self.merged_links.get(&attr.ino) {
                        let first = first.clone();
                        return Ok(self.tar.append(path, &meta, Body::HardLink(&first))?);
                    }
                    self.merged_links.insert(attr.ino, path.to_vec());
                }
                let mut data = Exact::new(view.reader(attr.ino)?, attr.size);
                let size = attr.size;
                self.tar.append(
                    path,
                    &meta,
                    Body::File {
                        size,
                        data: &mut data,
                    },
                )?;
            }
            libc::S_IFLNK => {
                let to = view.readlink(attr.ino)?;
                self.tar.append(path, &meta, Body::Symlink(&to))?;
            }
            libc::S_IFCHR | libc::S_IFBLK => {
                let (major, minor) = device_numbers(attr.rdev);
                let body = if attr.file_type() == libc::S_IFCHR {
                    Body::Char { major, minor }
                } else {
                    Body::Block { major, minor }
                };
                self.tar.append(path, &meta, body)?;
            }
            libc::S_IFIFO => self.tar.append(path, &meta, Body::Fifo)?,
            _ => tracing::warn!("skipping socket '{}'", show(path)),
        }
        Ok(())
    }
}

/// The caller's attributes of an upper object, sorted by name.
fn upper_xattrs(target: XattrTarget<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match target.list() {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for stored in names {
        let Some(shown) = upperwalk::user_xattr_name(&stored) else {
            continue;
        };
        if let Some(v) = target.get_opt(&stored)? {
            out.push((shown, v));
        }
    }
    out.sort();
    Ok(out)
}

fn meta_of(st: &FileStat, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        xattrs,
    }
}

fn device_numbers(rdev: u64) -> (u32, u32) {
    (
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    )
}

fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn show(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Reads exactly the size the header announced: a file that shrank or grew while being
/// exported (a live upper) fails the export instead of writing a corrupt archive.
struct Exact<R: Read> {
    inner: R,
    left: u64,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, size: u64) -> Exact<R> {
        Exact { inner, left: size }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::other("the file shrank while it was exported"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
