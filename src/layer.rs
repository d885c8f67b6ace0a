//! One layer root, and every syscall the daemon makes inside a layer: each relative to an open
//! directory fd, one name at a time, never following a symlink. A name with a '/' in it, or
//! "." / "..", never reaches these functions from the merged view (the kernel rejects them), and
//! is refused here too, so no walk can leave the layer.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, fstatat};

use crate::sys;

/// Index of a layer in the stack: 0 is the upper if there is one, then the lowers top-down.
pub type LayerId = usize;

/// One layer of the stack, opened once at start-up and kept for the life of the mount, so a
/// runtime may detach the layer's own mount right after we return.
#[derive(Debug)]
pub struct Layer {
    pub id: LayerId,
    pub path: PathBuf,
    pub root: OwnedFd,
    /// The root as a directory copy of the merge (never closed).
    pub root_dir: std::sync::Arc<crate::dirfd::DirFd>,
    pub is_upper: bool,
    /// Index of the layer's filesystem among the distinct filesystems of the stack; objects of
    /// filesystem 0 keep their inode number, the others get the index in the high bits.
    pub fs_index: u32,
    pub dev: u64,
}

impl Layer {
    pub fn open(id: LayerId, path: &Path, is_upper: bool) -> io::Result<Layer> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&root)?;
        let root_dir = crate::dirfd::DirFd::root(root.try_clone()?)?;
        Ok(Layer {
            id,
            path: path.to_path_buf(),
            root,
            root_dir,
            is_upper,
            fs_index: 0,
            dev: st.st_dev,
        })
    }
}

fn cname(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `lstat` of `name` inside `dir`.
pub fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<FileStat> {
    let name = cname(name)?;
    Ok(fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?)
}

/// `fstat` of an open fd.
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<FileStat> {
    Ok(nix::sys::stat::fstat(fd)?)
}

/// Opens `name` inside `dir` without ever following a symlink or leaving `dir`:
/// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel has it, `O_NOFOLLOW`
/// otherwise (the name is a single component, so only its final symlink could be followed).
pub fn open_at(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
    let name = cname(name)?;
    let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let how = OpenHow::new()
        .flags(flags)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    loop {
        match nix::fcntl::openat2(dir, name.as_c_str(), how) {
            Ok(fd) => return Ok(fd),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ENOSYS) => {
                return Ok(nix::fcntl::openat(
                    dir,
                    name.as_c_str(),
                    flags,
                    Mode::from_bits_truncate(mode),
                )?);
            }
            // openat2 reports a symlink met with RESOLVE_NO_SYMLINKS as ELOOP, as O_NOFOLLOW does.
            Err(e) => return Err(e.into()),
        }
    }
}

/// Opens the object `fd` refers to (an `O_PATH` fd, or any other) anew with `flags`, through
/// `/proc/self/fd`: for objects that no longer have a name to open them by.
pub fn reopen(fd: BorrowedFd<'_>, flags: OFlag) -> io::Result<OwnedFd> {
    let path = sys::proc_path(fd, None)?;
    Ok(nix::fcntl::open(
        path.as_c_str(),
        flags | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the directory `name` inside `dir` for reading (listing, fstat, xattrs, and as the
/// base of further `*at` calls).
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    open_at(dir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)
}

/// A second, independent fd on an open directory (own offset), for listing it.
pub fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(nix::fcntl::openat(
        dir,
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// The target of the symlink `name` inside `dir`, as stored.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Vec<u8>> {
    let name = cname(name)?;
    Ok(nix::fcntl::readlinkat(dir, name.as_c_str())?
        .as_bytes()
        .to_vec())
}

/// The target of the symlink `fd` itself (an `O_PATH` fd taken without following it).
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    Ok(nix::fcntl::readlinkat(fd, c"")?.as_bytes().to_vec())
}

/// Where the xattr of an object lives: an open directory, or a name inside one.
#[derive(Clone, Copy)]
pub enum XattrTarget<'a> {
    Dir(BorrowedFd<'a>),
    Entry(BorrowedFd<'a>, &'a OsStr),
}

impl XattrTarget<'_> {
    /// Runs `f` on the object: a directory through its fd, an entry by its name (one
    /// component, never followed) inside its directory's fd.
    fn with<T>(&self, f: impl FnOnce(sys::XattrAt<'_>) -> io::Result<T>) -> io::Result<T> {
        match *self {
            XattrTarget::Dir(fd) => f(sys::XattrAt::Fd(fd)),
            XattrTarget::Entry(dir, name) => {
                let name = cname(name)?;
                f(sys::XattrAt::Entry(dir, &name))
            }
        }
    }

    pub fn get(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        let attr = xattr_name(name)?;
        self.with(|at| sys::getxattr(at, &attr))
    }

    /// The value of an attribute, or `None` when it is absent or the filesystem has no xattrs.
    pub fn get_opt(&self, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self.get(name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_no_xattr(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every attribute name, in the order the filesystem lists them.
    pub fn list(&self) -> io::Result<Vec<Vec<u8>>> {
        let raw = self.with(sys::listxattr)?;
        Ok(raw
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect())
    }

    pub fn set(&self, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
        let attr = xattr_name(name)?;
        self.with(|at| sys::setxattr(at, &attr, value, flags))
    }

    pub fn remove(&self, name: &[u8]) -> io::Result<()> {
        let attr = xattr_name(name)?;
        self.with(|at| sys::removexattr(at, &attr))
    }
}

fn xattr_name(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// ENODATA (absent attribute) and ENOTSUP (no xattrs on this filesystem) both mean "not set".
pub fn is_no_xattr(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP))
}

/// Lets code hold either an owned or a borrowed fd where only borrowing is needed.
pub fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    fd.as_fd()
}
