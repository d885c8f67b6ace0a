//! The kernel's incompat markers: entries of `<workdir>/work/incompat/`, each naming a feature a
//! past mount used that leaves the upper in a state other mounts must not trust blindly. The
//! kernel refuses to mount while any is there, and so do we. The one feature that writes one is
//! `volatile`: its marker (`incompat/volatile/dirty`) is made at mount and, as the kernel does,
//! never removed by us, because only the user can know whether the system crashed since, which
//! may have left the upper incomplete (its syncs were skipped).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::layer;
use crate::workdir;

/// The directory inside `work` holding the markers.
pub const INCOMPAT: &str = "incompat";
/// The marker of the `volatile` option: a directory holding the file `dirty`.
pub const VOLATILE: &str = "volatile";
const DIRTY: &str = "dirty";

/// The first marker (by name) in `incompat/` below `work`, the workdir's `work` directory.
/// An `incompat` that is not a directory is an ordinary leftover, as for the kernel.
pub fn find_marker(work: BorrowedFd<'_>) -> io::Result<Option<OsString>> {
    let incompat = match layer::open_dir_at(work, OsStr::new(INCOMPAT)) {
        Ok(fd) => fd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let mut listing = Dir::from_fd(incompat)?;
    let mut names = Vec::new();
    for e in listing.iter() {
        let n = e?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(&n).to_os_string());
        }
    }
    names.sort();
    Ok(names.into_iter().next())
}

/// Writes `incompat/volatile/dirty` below `work`, as the kernel does for a `volatile` mount.
///
/// The kernel makes them with no permission bits; we do the same as root, and give the owner
/// access otherwise, so that a user without CAP_DAC_OVERRIDE can still remove them. Unlike the
/// kernel we sync the marker: its whole point is to be there after a crash, and it is one sync
/// per mount, not per write.
pub fn mark_volatile(work: BorrowedFd<'_>) -> io::Result<()> {
    let root = nix::unistd::geteuid().is_root();
    let (dir_mode, file_mode) = if root { (0, 0) } else { (0o700, 0o600) };
    let incompat = make_dir(work, INCOMPAT, dir_mode)?;
    let volatile = make_dir(incompat.as_fd(), VOLATILE, dir_mode)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT;
    let dirty = layer::open_at(volatile.as_fd(), OsStr::new(DIRTY), flags, file_mode)?;
    for fd in [dirty.as_fd(), volatile.as_fd(), incompat.as_fd(), work] {
        nix::unistd::fsync(fd)?;
    }
    Ok(())
}

/// Removes the `volatile` marker (and `incompat/` if that leaves it empty), for a mount that
/// failed before anything could be written through it.
pub fn unmark_volatile(work: BorrowedFd<'_>) -> io::Result<()> {
    let incompat = layer::open_dir_at(work, OsStr::new(INCOMPAT))?;
    workdir::remove_entry(incompat.as_fd(), OsStr::new(VOLATILE))?;
    match nix::unistd::unlinkat(work, INCOMPAT, nix::unistd::UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOTEMPTY) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `name` in `dir`, making it with `mode` if it is missing.
fn make_dir(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<OwnedFd> {
    match nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    layer::open_dir_at(dir, OsStr::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volatile_marker_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let work = nix::fcntl::open(
            tmp.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        assert_eq!(find_marker(work.as_fd()).unwrap(), None);
        mark_volatile(work.as_fd()).unwrap();
        assert!(tmp.path().join("incompat/volatile/dirty").is_file());
        assert_eq!(
            find_marker(work.as_fd()).unwrap().as_deref(),
            Some(OsStr::new(VOLATILE))
        );
        unmark_volatile(work.as_fd()).unwrap();
        assert!(!tmp.path().join(INCOMPAT).exists());
        assert_eq!(find_marker(work.as_fd()).unwrap(), None);
    }
}
