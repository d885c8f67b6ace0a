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
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use crate::{incompat, layer};

const WORK_NAME: &str = "work";
/// The kernel's index directory (`index=on`), beside `work`.
const INDEX_NAME: &str = "index";

#[derive(Debug)]
pub struct WorkDir {
    work: OwnedFd,
    /// Held for the life of the mount; dropping them releases the locks.
    _locks: Vec<Flock<OwnedFd>>,
    counter: AtomicU64,
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
