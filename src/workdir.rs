//! The work directory: where copy-ups and whiteouts are prepared before one `rename` puts them
//! in place (`<workdir>/work`, the kernel's name), cleaned of a crashed run's leftovers at
//! mount, and locked so that a second mount of the same upper/workdir is refused. A mount is
//! refused too while `work/incompat/` holds a marker (see `incompat`), as by the kernel.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::{incompat, layer};

const WORK_NAME: &str = "work";
/// The kernel's index directory (`index=on`), beside `work`.
const INDEX_NAME: &str = "index";
/// The whiteout in `work` that new whiteouts are hard links of (removed at unmount, and with
/// the other leftovers at the next mount if the daemon died).
const SHARED_WHITEOUT: &str = "#whiteout";

#[derive(Debug)]
pub struct WorkDir {
    work: OwnedFd,
    /// Held for the life of the mount; dropping them releases the locks.
    _locks: Vec<Flock<OwnedFd>>,
    counter: AtomicU64,
    /// Serializes making and renewing the shared whiteout.
    whiteout: std::sync::Mutex<()>,
}

/// Why the work directory could not be prepared.
#[derive(Debug)]
pub enum WorkDirError {
    InUse(String),
    Io(String, io::Error),
    /// `work/incompat/<name>` is there: the workdir and `name`, the feature it marks.
    Incompat(PathBuf, OsString),
}

impl std::fmt::Display for WorkDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkDirError::InUse(what) => write!(
                f,
                "{what} is already in use by another mount (unmount it first)"
            ),
            WorkDirError::Io(what, e) => write!(f, "{what}: {e}"),
            WorkDirError::Incompat(workdir, name) => {
                let marker = workdir.join(WORK_NAME).join(incompat::INCOMPAT).join(name);
                let (w, m) = (workdir.display(), marker.display());
                if name == incompat::VOLATILE {
                    write!(
                        f,
                        "workdir '{w}' was used by a 'volatile' mount, so its upper may be \
                         incomplete if the system crashed since; if it did not, remove '{m}' \
                         and mount again"
                    )
                } else {
                    write!(
                        f,
                        "workdir '{w}' holds '{m}', the mark of an overlay feature this mount \
                         does not know; remove it only if the upper is known to be intact"
                    )
                }
            }
        }
    }
}

impl std::error::Error for WorkDirError {}

fn lock(path: &Path, what: &str) -> Result<Flock<OwnedFd>, WorkDirError> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| WorkDirError::Io(format!("cannot open {what} '{}'", path.display()), e.into()))?;
    Flock::lock(fd, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            WorkDirError::InUse(format!("{what} '{}'", path.display()))
        } else {
            WorkDirError::Io(format!("cannot lock {what} '{}'", path.display()), e.into())
        }
    })
}

impl WorkDir {
    /// Locks `upperdir` and `workdir`, then makes `<workdir>/work` exist and empty.
    pub fn prepare(upperdir: &Path, workdir: &Path) -> Result<WorkDir, WorkDirError> {
        let locks = vec![lock(upperdir, "upperdir")?, lock(workdir, "workdir")?];
        let io_err = |what: &str, e: io::Error| {
            WorkDirError::Io(format!("{what} in workdir '{}'", workdir.display()), e)
        };
        let wd = locks[1].as_fd();
        match nix::sys::stat::mkdirat(wd, WORK_NAME, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(io_err("cannot create 'work'", e.into())),
        }
        let work = layer::open_dir_at(wd, OsStr::new(WORK_NAME))
            .map_err(|e| io_err("cannot open 'work'", e))?;
        // Checked before the leftovers are cleaned: a marker is not a leftover.
        if let Some(name) =
            incompat::find_marker(work.as_fd()).map_err(|e| io_err("cannot read 'work'", e))?
        {
            return Err(WorkDirError::Incompat(workdir.to_path_buf(), name));
        }
        clear_dir(work.as_fd()).map_err(|e| io_err("cannot clean leftovers of 'work'", e))?;
        Ok(WorkDir {
            work,
            _locks: locks,
            counter: AtomicU64::new(0),
            whiteout: std::sync::Mutex::new(()),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.work.as_fd()
    }

    /// `<workdir>/index` (`index=on`), made if missing.
    pub fn open_index(&self) -> io::Result<OwnedFd> {
        let wd = self._locks[1].as_fd();
        match nix::sys::stat::mkdirat(wd, INDEX_NAME, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        layer::open_dir_at(wd, OsStr::new(INDEX_NAME))
    }

    /// Makes `dir/name` a whiteout (a character device 0/0) as the kernel does: a hard link of
    /// one whiteout kept in the work directory, so a whiteout costs a link, not a new inode
    /// (which, on ext4, is most of the cost of `rm -rf` of a lower tree). Where links are not
    /// possible a whiteout of its own is made. Fails with EEXIST when `name` exists.
    pub fn link_whiteout(&self, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
        let shared = OsStr::new(SHARED_WHITEOUT);
        for _ in 0..2 {
            match nix::unistd::linkat(self.fd(), shared, dir, name, AtFlags::empty()) {
                Ok(()) => return Ok(()),
                Err(Errno::ENOENT) | Err(Errno::EMLINK) => {
                    // Missing, or at the filesystem's link limit: a fresh one takes its name.
                    let _one_maker = self.whiteout.lock();
                    let tmp = self.temp_name();
                    make_whiteout(self.fd(), &tmp)?;
                    if let Err(e) =
                        nix::fcntl::renameat(self.fd(), tmp.as_os_str(), self.fd(), shared)
                    {
                        self.discard(&tmp);
                        return Err(e.into());
                    }
                }
                Err(Errno::EEXIST) => return Err(Errno::EEXIST.into()),
                Err(_) => break,
            }
        }
        make_whiteout(dir, name)
    }

    /// A fresh name for a temporary in the work directory.
    pub fn temp_name(&self) -> OsString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!("#{:x}.{n:x}", std::process::id()))
    }

    /// Removes a temporary (file or tree) after a failed or finished operation.
    pub fn discard(&self, name: &OsStr) {
        if let Err(e) = remove_entry(self.fd(), name) {
            tracing::warn!(name = ?name, error = %e, "cannot remove temporary from work directory");
        }
    }
}

impl Drop for WorkDir {
    /// A clean unmount leaves `work` empty.
    fn drop(&mut self) {
        let _ = nix::unistd::unlinkat(
            self.work.as_fd(),
            SHARED_WHITEOUT,
            UnlinkatFlags::NoRemoveDir,
        );
    }
}

/// A whiteout of its own: a character device 0/0.
pub fn make_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(nix::sys::stat::mknodat(
        dir,
        name,
        nix::sys::stat::SFlag::S_IFCHR,
        Mode::empty(),
        0,
    )?)
}

/// Removes everything inside `dir`, never following a symlink.
pub fn clear_dir(dir: BorrowedFd<'_>) -> io::Result<()> {
    let mut listing = Dir::from_fd(layer::reopen_dir(dir)?)?;
    let mut names = Vec::new();
    for e in listing.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    for name in names {
        remove_entry(dir, &name)?;
    }
    Ok(())
}

/// Removes the entry `name` of `dir`, recursively for a directory.
pub fn remove_entry(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = layer::stat_at(dir, name)?;
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        let sub = layer::open_dir_at(dir, name)?;
        clear_dir(sub.as_fd())?;
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::RemoveDir)?;
    } else {
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}
