//! `rsfs-overlay apply`: unpacks an OCI image layer into a directory that then serves as a
//! lower layer. In the `kernel` format its whiteouts become char 0/0 devices and its opaque
//! markers the `opaque` attribute, so kernel overlayfs reads the result as well as we do; in
//! the `oci` format the `.wh.` entries stay files (we read those too).
//!
//! A layer is untrusted input. Every entry is created one component at a time below the
//! target directory's fd, never following a symlink: an entry named through a symlink the
//! layer made earlier, a `..` component, an absolute path or a hard link to outside is refused,
//! and nothing is ever written outside the directory.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{Context, bail};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use crate::format::{self, XattrNames};
use crate::layer::{self, XattrTarget};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Whiteouts and opaque markers as the kernel writes them.
    Kernel,
    /// `.wh.` entries kept as files.
    Oci,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyRequest {
    /// The layer file, or `None` for stdin.
    pub layer: Option<PathBuf>,
    pub dir: PathBuf,
    pub format: Format,
}

/// What was unpacked, for the closing line.
#[derive(Debug, Default)]
pub struct Applied {
    pub entries: u64,
    pub whiteouts: u64,
    pub bytes: u64,
}

pub fn run(req: &ApplyRequest) -> anyhow::Result<Applied> {
    let input: Box<dyn Read> = match &req.layer {
        Some(p) => Box::new(
            File::open(p).with_context(|| format!("cannot open the layer '{}'", p.display()))?,
        ),
        None => Box::new(io::stdin().lock()),
    };
    let reader = decompressed(BufReader::new(input)).context("cannot read the layer")?;
    match std::fs::create_dir(&req.dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot create '{}'", req.dir.display()));
        }
    }
    let root = nix::fcntl::open(
        &req.dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open '{}'", req.dir.display()))?;
    // Modes come from the layer exactly, not filtered by our umask.
    nix::sys::stat::umask(Mode::empty());
    let mut unpacker = Unpacker {
        root,
        format: req.format,
        is_root: nix::unistd::geteuid().is_root(),
        names: XattrNames {
            userxattr: crate::privilege::lacks_trusted_xattrs(),
        },
        dir_times: Vec::new(),
        done: Applied::default(),
    };
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().context("cannot read the layer")? {
        let mut entry = entry.context("cannot read the layer")?;
        let path = entry.path_bytes().into_owned();
        unpacker
            .entry(&path, &mut entry)
            .with_context(|| format!("layer entry '{}'", String::from_utf8_lossy(&path)))?;
    }
    unpacker.finish()?;
    Ok(unpacker.done)
}

/// Plain, gzip or zstd, told apart by the first bytes.
fn decompressed<R: BufRead + 'static>(mut r: R) -> io::Result<Box<dyn Read>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)));
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r)?));
    }
    Ok(Box::new(r))
}

struct Unpacker {
    root: OwnedFd,
    format: Format,
    is_root: bool,
    names: XattrNames,
    /// Directories' times, set last: creating their entries changes them.
    dir_times: Vec<(Vec<Vec<u8>>, i64)>,
    done: Applied,
}

/// The parts of an entry's path: every component a plain name.
fn components(path: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    if path.starts_with(b"/") {
        bail!("absolute paths are refused (the entry would leave the directory)");
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!("'..' in a path is refused (the entry would leave the directory)"),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

impl Unpacker {
    fn entry<R: Read>(&mut self, path: &[u8], entry: &mut tar::Entry<'_, R>) -> anyhow::Result<()> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName
        ) {
            return Ok(());
        }
        let mut parts = components(path)?;
        let Some(name) = parts.pop() else {
            // The layer's root itself ("./"): its metadata is the lower root's.
            return Ok(());
        };
        let parent = self.open_parent(&parts)?;
        if name.starts_with(format::OCI_WHITEOUT_PREFIX) && self.format == Format::Kernel {
            return self.whiteout(&parent, &name);
        }
        let meta = EntryMeta::read(entry)?;
        let dir = layer::borrow(&parent);
        let name_os = OsStr::from_bytes(&name);
        match kind {
            EntryType::Directory => {
                match layer::stat_at(dir, name_os) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
                    Ok(_) => {
                        remove_any(dir, name_os)?;
                        nix::sys::stat::mkdirat(dir, name_os, Mode::from_bits_truncate(0o700))?;
                    }
                    Err(_) => {
                        nix::sys::stat::mkdirat(dir, name_os, Mode::from_bits_truncate(0o700))?
                    }
                }
                let fd = layer::open_dir_at(dir, name_os)?;
                self.set_owner_mode(fd.as_fd(), &meta)?;
                set_xattrs(XattrTarget::Dir(layer::borrow(&fd)), &meta, self.names)?;
                parts.push(name);
                self.dir_times.push((parts, meta.mtime));
                self.done.entries += 1;
                return Ok(());
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_any(dir, name_os)?;
                let fd = layer::open_at(
                    dir,
                    name_os,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    0o600,
                )?;
                let mut file = File::from(fd);
                self.done.bytes += io::copy(entry, &mut file)?;
                self.set_owner_mode(file.as_fd(), &meta)?;
                set_xattrs(XattrTarget::Dir(file.as_fd()), &meta, self.names)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow::anyhow!("symlink without a target"))?
                    .into_owned();
                remove_any(dir, name_os)?;
                nix::unistd::symlinkat(OsStr::from_bytes(&target), dir, name_os)?;
                self.chown_at(dir, name_os, &meta)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| anyhow::anyhow!("hard link without a target"))?
                    .into_owned();
                self.hard_link(dir, name_os, &target)?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (sflag, dev) = match kind {
                    EntryType::Char => (SFlag::S_IFCHR, meta.rdev),
                    EntryType::Block => (SFlag::S_IFBLK, meta.rdev),
                    _ => (SFlag::S_IFIFO, 0),
                };
                if sflag != SFlag::S_IFIFO && !self.is_root {
                    bail!("device nodes can only be created by root");
                }
                remove_any(dir, name_os)?;
                let perm = Mode::from_bits_truncate(meta.mode & 0o777);
                nix::sys::stat::mknodat(dir, name_os, sflag, perm, dev)?;
                self.chown_at(dir, name_os, &meta)?;
                let path = crate::sys::proc_path(dir, Some(name_os))?;
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    path.as_c_str(),
                    Mode::from_bits_truncate(meta.mode & 0o7777),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?;
            }
            other => {
                tracing::warn!("skipping an entry of type {other:?}");
                return Ok(());
            }
        }
        set_time(dir, name_os, meta.mtime)?;
        self.done.entries += 1;
        Ok(())
    }

    /// Opens the parent directory of an entry, creating missing directories on the way
    /// (as tar does), and refusing to go through anything but a real directory.
    fn open_parent(&self, parts: &[Vec<u8>]) -> anyhow::Result<OwnedFd> {
        let mut fd = self.root.try_clone()?;
        for (i, comp) in parts.iter().enumerate() {
            let name = OsStr::from_bytes(comp);
            let next = match layer::open_dir_at(layer::borrow(&fd), name) {
                Ok(next) => next,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    nix::sys::stat::mkdirat(&fd, name, Mode::from_bits_truncate(0o755))?;
                    layer::open_dir_at(layer::borrow(&fd), name)?
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                    let through = String::from_utf8_lossy(&parts[..=i].join(&b'/')).into_owned();
                    bail!(
                        "'{through}' is not a directory (a symlink or file); refusing to write through it"
                    );
                }
                Err(e) => return Err(e.into()),
            };
            fd = next;
        }
        Ok(fd)
    }

    fn whiteout(&mut self, parent: &OwnedFd, name: &[u8]) -> anyhow::Result<()> {
        let dir = layer::borrow(parent);
        if name == format::OCI_OPAQUE_MARKER {
            XattrTarget::Dir(dir).set(&self.names.name("opaque"), b"y", 0)?;
            return Ok(());
        }
        let Some(hidden) = format::oci_whiteout_target(name) else {
            return Ok(());
        };
        if hidden.starts_with(format::OCI_WHITEOUT_PREFIX) {
            // `.wh..wh.*` names are AUFS's own bookkeeping, not whiteouts.
            tracing::warn!("skipping '{}'", String::from_utf8_lossy(name));
            return Ok(());
        }
        let hidden = OsStr::from_bytes(hidden);
        remove_any(dir, hidden)?;
        nix::sys::stat::mknodat(dir, hidden, SFlag::S_IFCHR, Mode::empty(), 0)
            .context("cannot create a whiteout (char 0/0 device)")?;
        self.done.whiteouts += 1;
        Ok(())
    }

    fn hard_link(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        target: &[u8],
    ) -> anyhow::Result<()> {
        let mut parts = components(target).context("hard link target")?;
        let Some(target_name) = parts.pop() else {
            bail!("hard link to the layer's root");
        };
        let target_dir = self.open_parent_existing(&parts)?;
        let target_name = OsStr::from_bytes(&target_name);
        let st = layer::stat_at(layer::borrow(&target_dir), target_name)
            .context("hard link target not found in the layer")?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            bail!("hard link to a directory");
        }
        remove_any(dir, name)?;
        nix::unistd::linkat(&target_dir, target_name, dir, name, AtFlags::empty())?;
        Ok(())
    }

    /// Like `open_parent`, without creating anything.
    fn open_parent_existing(&self, parts: &[Vec<u8>]) -> anyhow::Result<OwnedFd> {
        let mut fd = self.root.try_clone()?;
        for comp in parts {
            fd = layer::open_dir_at(layer::borrow(&fd), OsStr::from_bytes(comp)).context(
                "hard link target not found in the layer (or reached through a symlink)",
            )?;
        }
        Ok(fd)
    }

    /// Owner first (changing it clears setuid bits), then the mode.
    fn set_owner_mode(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        meta: &EntryMeta,
    ) -> anyhow::Result<()> {
        if self.is_root {
            nix::unistd::fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )?;
        }
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(meta.mode & 0o7777))?;
        Ok(())
    }

    fn chown_at(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &OsStr,
        meta: &EntryMeta,
    ) -> anyhow::Result<()> {
        if self.is_root {
            nix::unistd::fchownat(
                dir,
                name,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        // Deepest first, so setting a child's time does not disturb its parent's again.
        self.dir_times
            .sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        for (parts, mtime) in std::mem::take(&mut self.dir_times) {
            let mut parts = parts;
            let Some(name) = parts.pop() else { continue };
            let parent = self.open_parent_existing(&parts)?;
            set_time(layer::borrow(&parent), OsStr::from_bytes(&name), mtime)?;
        }
        Ok(())
    }
}

/// What an entry's header and PAX records say about it.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    rdev: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> anyhow::Result<EntryMeta> {
        let h = entry.header();
        let id = |r: io::Result<u64>| -> anyhow::Result<u32> {
            u32::try_from(r?).map_err(|_| anyhow::anyhow!("owner id out of range"))
        };
        // Only devices need their numbers; other writers leave the fields blank.
        let (major, minor) = match h.entry_type() {
            EntryType::Char | EntryType::Block => (
                h.device_major()?.unwrap_or(0),
                h.device_minor()?.unwrap_or(0),
            ),
            _ => (0, 0),
        };
        let mut meta = EntryMeta {
            mode: h.mode()?,
            uid: id(h.uid())?,
            gid: id(h.gid())?,
            mtime: i64::try_from(h.mtime()?).unwrap_or(0),
            rdev: nix::sys::stat::makedev(u64::from(major), u64::from(minor)),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs
                        .push((name.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        Ok(meta)
    }
}

/// Sets an entry's extended attributes, except the overlay's own: a layer must not be able to
/// forge an opaque mark, a redirect or an origin in the lower it becomes.
fn set_xattrs(target: XattrTarget<'_>, meta: &EntryMeta, names: XattrNames) -> anyhow::Result<()> {
    for (name, value) in &meta.xattrs {
        if crate::upperwalk::user_xattr_name(name).as_deref() != Some(name.as_slice())
            || names.is_private(name)
        {
            tracing::warn!(
                "skipping the overlay attribute '{}'",
                String::from_utf8_lossy(name)
            );
            continue;
        }
        target.set(name, value, 0).with_context(|| {
            format!(
                "cannot set the attribute '{}'",
                String::from_utf8_lossy(name)
            )
        })?;
    }
    Ok(())
}

fn set_time(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, mtime: i64) -> io::Result<()> {
    let t = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink)?;
    Ok(())
}

/// Removes whatever `name` is (a directory with everything below it), if anything.
fn remove_any(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    match crate::workdir::remove_entry(dir, name) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_directory_are_refused() {
        for bad in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/.."] {
            assert!(components(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert_eq!(
            components(b"./a//b/").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
    }
}
