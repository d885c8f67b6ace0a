//! The executor: applies one operation to a mounted tree, never following a symlink out of it,
//! and describes the result so that two mounts can be compared.

use super::*;

/// What an operation returned: a description of its result, or `step: ERRNO`.
pub type OpResult = Result<String, String>;

/// The moment after which a timestamp counts as "set during the test": times at or after it
/// are shown as `now` (they cannot match between two mounts), earlier ones exactly.
#[derive(Clone, Copy, Debug)]
pub struct Since(pub (i64, i64));

impl Since {
    /// Now, after a pause longer than a clock tick, so that no timestamp written before this
    /// call (file systems use the coarse clock) can count as recent, and none after it as old.
    pub fn now() -> Since {
        std::thread::sleep(Duration::from_millis(30));
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970");
        let s = Since((t.as_secs() as i64, i64::from(t.subsec_nanos())));
        std::thread::sleep(Duration::from_millis(30));
        s
    }

    pub fn is_recent(&self, t: (i64, i64)) -> bool {
        t >= self.0
    }

    fn show(&self, t: (i64, i64)) -> String {
        if self.is_recent(t) {
            "now".into()
        } else {
            format!("{}.{:09}", t.0, t.1)
        }
    }
}

/// Map an errno to `step: ERRNO`.
fn err(step: &'static str) -> impl Fn(Errno) -> String {
    move |e| format!("{step}: {}", ename(e))
}

fn io_ename(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| e.to_string(), |c| ename(Errno::from_raw(c)))
}

fn kind_of(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "reg",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "lnk",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "chr",
        libc::S_IFBLK => "blk",
        libc::S_IFSOCK => "sock",
        _ => "?",
    }
}

/// The attributes both mounts must agree on (inode numbers are compared at checkpoints,
/// through the layers' names for them).
pub fn stat_line(st: &FileStat, since: Since) -> String {
    format!(
        "{} {:04o} {}:{} size={} nlink={} rdev={:x} mtime={}",
        kind_of(st.st_mode),
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_nlink,
        st.st_rdev,
        since.show((st.st_mtime, st.st_mtime_nsec))
    )
}

fn split(path: &str) -> (&str, &str) {
    if path.is_empty() {
        return (".", ".");
    }
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (".", path),
    }
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// `openat2`, tried again when a scoped lookup fails only because something somewhere renamed
/// or mounted during the walk: the kernel then answers EAGAIN (or EXDEV from its final
/// "still beneath the root" check) and openat2(2) tells the caller to retry. Under CI's load
/// (other tests mounting and renaming) this happens on either side of the comparison, so
/// without the retry a differential test would report a difference neither overlay made. A
/// real escape (an absolute symlink) answers EXDEV every time and is returned as such.
fn openat2_scoped(root: &OwnedFd, path: &str, how: OpenHow) -> nix::Result<OwnedFd> {
    let mut tries = 0;
    loop {
        match openat2(root, path, how) {
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EXDEV) if tries < 64 => tries += 1,
            other => return other,
        }
    }
}

/// `/proc/self/fd/<fd>/<name>`: the name looked up in the directory `fd` (the directory itself
/// is never re-resolved).
fn in_dir(fd: &OwnedFd, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", fd.as_raw_fd()))
}

fn magic(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// lsetxattr with flags (the shared helper has none).
fn lsetxattr(path: &Path, name: &str, value: &[u8], flag: XattrFlag) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("no NUL in paths");
    let n = CString::new(name).expect("no NUL in xattr names");
    let flags = match flag {
        XattrFlag::Any => 0,
        XattrFlag::Create => libc::XATTR_CREATE,
        XattrFlag::Replace => libc::XATTR_REPLACE,
    };
    // SAFETY: both strings are NUL-terminated; value is valid for value.len() bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn hash_line(buf: &[u8]) -> String {
    format!("{} bytes #{:016x}", buf.len(), fnv1a(buf))
}

/// Applies operations to one mounted tree.
pub struct Executor {
    root_fd: OwnedFd,
    slots: Vec<Option<OwnedFd>>,
    since: Since,
}

impl Executor {
    pub fn new(root: &Path, since: Since) -> Executor {
        let root_fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", root.display()));
        Executor {
            root_fd,
            slots: (0..SLOTS).map(|_| None).collect(),
            since,
        }
    }

    /// Close every slot (a mount with open files cannot be unmounted).
    pub fn close_all(&mut self) {
        for s in &mut self.slots {
            s.take();
        }
    }

    /// An `O_PATH` fd of the directory holding `path`, and the last component.
    fn parent<'p>(&self, path: &'p str) -> Result<(OwnedFd, &'p str), String> {
        let (dir, name) = split(path);
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(beneath());
        let fd =
            openat2_scoped(&self.root_fd, dir, how).map_err(|e| format!("parent: {}", ename(e)))?;
        Ok((fd, name))
    }

    /// An `O_PATH | O_NOFOLLOW` fd of `path` itself.
    fn object(&self, path: &str) -> Result<OwnedFd, String> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(beneath());
        let p = if path.is_empty() { "." } else { path };
        openat2_scoped(&self.root_fd, p, how).map_err(|e| format!("lookup: {}", ename(e)))
    }

    fn open(&self, path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, String> {
        let mut how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .resolve(beneath());
        if flags.contains(OFlag::O_CREAT) {
            how = how.mode(Mode::from_bits_truncate(mode));
        }
        let p = if path.is_empty() { "." } else { path };
        openat2_scoped(&self.root_fd, p, how).map_err(|e| format!("open: {}", ename(e)))
    }

    fn lstat(&self, path: &str) -> Result<FileStat, String> {
        let (dir, name) = self.parent(path)?;
        nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| format!("lstat: {}", ename(e)))
    }

    fn lstat_line(&self, path: &str) -> String {
        match self.lstat(path) {
            Ok(st) => stat_line(&st, self.since),
            Err(e) => e,
        }
    }

    fn fstat_line(&self, fd: impl AsFd) -> String {
        match nix::sys::stat::fstat(fd) {
            Ok(st) => stat_line(&st, self.since),
            Err(e) => format!("fstat: {}", ename(e)),
        }
    }

    fn pread(fd: impl AsFd, offset: u64, len: usize) -> OpResult {
        let mut buf = vec![0u8; len];
        let n = nix::sys::uio::pread(fd, &mut buf, offset as i64)
            .map_err(|e| format!("pread: {}", ename(e)))?;
        Ok(hash_line(&buf[..n]))
    }

    fn slot(&self, slot: usize) -> Option<&OwnedFd> {
        self.slots[slot].as_ref()
    }

    /// Apply `op`; describe what happened.
    pub fn apply(&mut self, op: &Op) -> OpResult {
        match op {
            Op::Create {
                path,
                open,
                mode,
                offset,
                data,
            } => {
                let fd = self.open(path, open.oflag(), *mode)?;
                let n = if data.is_empty() {
                    0
                } else if open.append {
                    nix::unistd::write(&fd, data).map_err(err("write"))?
                } else {
                    nix::sys::uio::pwrite(&fd, data, *offset as i64).map_err(err("pwrite"))?
                };
                Ok(format!("wrote {n}; {}", self.fstat_line(&fd)))
            }
            Op::Write {
                path,
                nofollow,
                offset,
                data,
            } => {
                let mut fl = OFlag::O_WRONLY;
                if *nofollow {
                    fl |= OFlag::O_NOFOLLOW;
                }
                let fd = self.open(path, fl, 0)?;
                let n = nix::sys::uio::pwrite(&fd, data, *offset as i64).map_err(err("pwrite"))?;
                Ok(format!("wrote {n}; {}", self.fstat_line(&fd)))
            }
            Op::Append { path, data } => {
                let fd = self.open(path, OFlag::O_WRONLY | OFlag::O_APPEND, 0)?;
                let n = nix::unistd::write(&fd, data).map_err(err("write"))?;
                Ok(format!("wrote {n}; {}", self.fstat_line(&fd)))
            }
            Op::Truncate { path, len } => {
                let fd = self.object(path)?;
                nix::unistd::truncate(&magic(&fd), *len as i64).map_err(err("truncate"))?;
                Ok(self.lstat_line(path))
            }
            Op::Ftruncate { path, len } => {
                let fd = self.open(path, OFlag::O_WRONLY, 0)?;
                nix::unistd::ftruncate(&fd, *len as i64).map_err(err("ftruncate"))?;
                Ok(self.fstat_line(&fd))
            }
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let fd = self.open(path, OFlag::O_RDWR, 0)?;
                nix::fcntl::fallocate(&fd, mode.flags(), *offset as i64, *len as i64)
                    .map_err(err("fallocate"))?;
                Ok(self.fstat_line(&fd))
            }
            Op::Mkfifo { path, mode } => {
                let (dir, name) = self.parent(path)?;
                nix::sys::stat::mknodat(
                    &dir,
                    name,
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(*mode),
                    0,
                )
                .map_err(err("mknod"))?;
                Ok(self.lstat_line(path))
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent(path)?;
                nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(*mode))
                    .map_err(err("mkdir"))?;
                Ok(self.lstat_line(path))
            }
            Op::Symlink { target, path } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::symlinkat(target.as_str(), &dir, name).map_err(err("symlink"))?;
                Ok(self.lstat_line(path))
            }
            Op::Link { from, to } => {
                let (d1, n1) = self.parent(from)?;
                let (d2, n2) = self.parent(to)?;
                nix::unistd::linkat(&d1, n1, &d2, n2, AtFlags::empty()).map_err(err("link"))?;
                Ok(format!(
                    "{} / {}",
                    self.lstat_line(from),
                    self.lstat_line(to)
                ))
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir)
                    .map_err(err("unlink"))?;
                Ok(self.lstat_line(path))
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::unlinkat(&dir, name, UnlinkatFlags::RemoveDir)
                    .map_err(err("rmdir"))?;
                Ok(self.lstat_line(path))
            }
            Op::Rename { from, to, mode } => {
                let (d1, n1) = self.parent(from)?;
                let (d2, n2) = self.parent(to)?;
                nix::fcntl::renameat2(&d1, n1, &d2, n2, mode.flags()).map_err(err("rename"))?;
                Ok(format!(
                    "{} / {}",
                    self.lstat_line(from),
                    self.lstat_line(to)
                ))
            }
            Op::Chmod { path, mode } => {
                let fd = self.object(path)?;
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    &magic(&fd),
                    Mode::from_bits_truncate(*mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(err("chmod"))?;
                Ok(self.lstat_line(path))
            }
            Op::Chown { path, uid, gid } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::fchownat(
                    &dir,
                    name,
                    uid.map(Uid::from_raw),
                    gid.map(Gid::from_raw),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(err("lchown"))?;
                Ok(self.lstat_line(path))
            }
            Op::Utimens { path, atime, mtime } => {
                let (dir, name) = self.parent(path)?;
                nix::sys::stat::utimensat(
                    &dir,
                    name,
                    &atime.spec(),
                    &mtime.spec(),
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(err("utimensat"))?;
                Ok(self.lstat_line(path))
            }
            Op::SetXattr {
                path,
                name,
                value,
                flag,
            } => {
                let (dir, n) = self.parent(path)?;
                lsetxattr(&in_dir(&dir, n), name, value, *flag)
                    .map_err(|e| format!("lsetxattr: {}", io_ename(&e)))?;
                Ok("ok".into())
            }
            Op::RemoveXattr { path, name } => {
                let (dir, n) = self.parent(path)?;
                xattr::remove(&in_dir(&dir, n), name)
                    .map_err(|e| format!("lremovexattr: {}", io_ename(&e)))?;
                Ok("ok".into())
            }
            Op::GetXattr { path, name } => {
                let (dir, n) = self.parent(path)?;
                let v = xattr::get(&in_dir(&dir, n), name)
                    .map_err(|e| format!("lgetxattr: {}", io_ename(&e)))?;
                Ok(snapshot::show_bytes(&v))
            }
            Op::ListXattr { path } => {
                let (dir, n) = self.parent(path)?;
                let mut v = xattr::list(&in_dir(&dir, n))
                    .map_err(|e| format!("llistxattr: {}", io_ename(&e)))?;
                v.sort();
                Ok(v.iter()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .collect::<Vec<_>>()
                    .join(","))
            }
            Op::Read {
                path,
                nofollow,
                offset,
                len,
            } => {
                let mut fl = OFlag::O_RDONLY;
                if *nofollow {
                    fl |= OFlag::O_NOFOLLOW;
                }
                let fd = self.open(path, fl, 0)?;
                Self::pread(&fd, *offset, *len)
            }
            Op::ReadDir { path } => {
                let fd = self.open(
                    path,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    0,
                )?;
                let mut dir = nix::dir::Dir::from_fd(fd).map_err(err("fdopendir"))?;
                let mut names = Vec::new();
                for e in dir.iter() {
                    let e = e.map_err(err("readdir"))?;
                    let n = String::from_utf8_lossy(e.file_name().to_bytes()).into_owned();
                    if n == "." || n == ".." {
                        continue;
                    }
                    let t = e.file_type().map_or("?".to_string(), |t| format!("{t:?}"));
                    names.push(format!("{n}:{t}"));
                }
                names.sort();
                Ok(names.join(" "))
            }
            Op::Stat { path } => self.lstat(path).map(|st| stat_line(&st, self.since)),
            Op::Readlink { path } => {
                let (dir, name) = self.parent(path)?;
                let t = nix::fcntl::readlinkat(&dir, name).map_err(err("readlink"))?;
                Ok(format!("{:?}", t.to_string_lossy()))
            }
            Op::CopyFileRange {
                from,
                to,
                off_in,
                off_out,
                len,
            } => {
                let src = self.open(from, OFlag::O_RDONLY, 0)?;
                let dst = self.open(to, OFlag::O_WRONLY, 0)?;
                let (mut i, mut o) = (*off_in as i64, *off_out as i64);
                let n = nix::fcntl::copy_file_range(&src, Some(&mut i), &dst, Some(&mut o), *len)
                    .map_err(err("copy_file_range"))?;
                Ok(format!("copied {n}; {}", self.fstat_line(&dst)))
            }
            Op::Seek { path, hole, offset } => {
                let fd = self.open(path, OFlag::O_RDONLY, 0)?;
                // On a directory the offset is a readdir cookie: FUSE answers SEEK_DATA/HOLE
                // in the kernel (generic_file_llseek) without asking the filesystem, the
                // kernel's overlay with ext4's htree or its own merged-dir rules. Not overlay
                // semantics either way: files only.
                if nix::sys::stat::fstat(&fd).is_ok_and(|st| kind_of(st.st_mode) == "dir") {
                    return Ok("directory (not sought)".into());
                }
                let whence = if *hole {
                    Whence::SeekHole
                } else {
                    Whence::SeekData
                };
                let at = nix::unistd::lseek(&fd, *offset as i64, whence).map_err(err("lseek"))?;
                Ok(format!("at {at}"))
            }
            Op::Fsync { path, data_only } => {
                let fd = self.open(path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)?;
                if *data_only {
                    nix::unistd::fdatasync(&fd).map_err(err("fdatasync"))?;
                } else {
                    nix::unistd::fsync(&fd).map_err(err("fsync"))?;
                }
                Ok("ok".into())
            }
            Op::SlotOpen {
                slot,
                path,
                open,
                mode,
            } => {
                self.slots[*slot] = None;
                let fd = self.open(path, open.oflag(), *mode)?;
                let line = self.fstat_line(&fd);
                self.slots[*slot] = Some(fd);
                Ok(line)
            }
            Op::SlotWrite { slot, offset, data } => {
                let Some(fd) = self.slot(*slot) else {
                    return Ok("no file".into());
                };
                let n = match offset {
                    Some(o) => nix::sys::uio::pwrite(fd, data, *o as i64).map_err(err("pwrite"))?,
                    None => nix::unistd::write(fd, data).map_err(err("write"))?,
                };
                Ok(format!("wrote {n}; {}", self.fstat_line(fd)))
            }
            Op::SlotRead { slot, offset, len } => match self.slot(*slot) {
                None => Ok("no file".into()),
                Some(fd) => Self::pread(fd, *offset, *len),
            },
            Op::SlotTruncate { slot, len } => {
                let Some(fd) = self.slot(*slot) else {
                    return Ok("no file".into());
                };
                nix::unistd::ftruncate(fd, *len as i64).map_err(err("ftruncate"))?;
                Ok(self.fstat_line(fd))
            }
            Op::SlotStat { slot } => match self.slot(*slot) {
                None => Ok("no file".into()),
                Some(fd) => Ok(self.fstat_line(fd)),
            },
            Op::SlotFsync { slot } => {
                let Some(fd) = self.slot(*slot) else {
                    return Ok("no file".into());
                };
                nix::unistd::fsync(fd).map_err(err("fsync"))?;
                Ok("ok".into())
            }
            Op::SlotClose { slot } => Ok(match self.slots[*slot].take() {
                Some(_) => "closed".into(),
                None => "no file".into(),
            }),
        }
    }
}
