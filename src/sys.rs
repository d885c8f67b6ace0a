//! The only unsafe code of the crate: thin wrappers around the syscalls that `nix` and the
//! standard library leave raw (extended attributes relative to a directory fd, `fork`,
//! `FICLONE`). Every other module is safe Rust, enforced by the `unsafe_code` lint.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

/// Where the xattr calls of a non-directory go: `/proc/self/fd/<dirfd>/<name>`, used with the
/// `l*xattr` family so that a symlink's own attributes are read and it is never followed.
/// The magic link resolves to the directory we hold open, so no path outside the layer is walked.
pub fn proc_path(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<CString> {
    let mut bytes = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if let Some(name) = name {
        if name.as_bytes().contains(&b'/') {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        bytes.push(b'/');
        bytes.extend_from_slice(name.as_bytes());
    }
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check_len(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn check_unit(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The object an xattr call is about: an open fd (a directory we hold), a path used with the
/// `l*` calls so a final symlink is never followed, or a name (one component) inside a directory
/// fd, never followed either.
#[derive(Clone, Copy)]
pub enum XattrAt<'a> {
    Fd(BorrowedFd<'a>),
    Path(&'a CStr),
    Entry(BorrowedFd<'a>, &'a CStr),
}

/// `getxattrat`, `listxattrat`, `setxattrat`, `removexattrat` (Linux 6.13), whose numbers are
/// the same in every architecture's unified table. They reach a name inside a directory fd
/// without the walk through `/proc/self/fd/<dir>/<name>` (a third of the cost of a lookup's
/// xattr read); older kernels, and sandboxes that refuse them, get that walk instead. Used only
/// once `xattrat_works`, which probes on x86_64 and aarch64 alone.
mod xattrat {
    pub const SET: libc::c_long = 463;
    pub const GET: libc::c_long = 464;
    pub const LIST: libc::c_long = 465;
    pub const REMOVE: libc::c_long = 466;
}

/// The kernel's `struct xattr_args`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// `getxattrat` or `setxattrat` (`nr`) of attribute `name` of `path` inside `dir`, never
/// following a final symlink, with the value buffer `value` of `size` bytes and `flags`.
///
/// # Safety
/// `value` is null with `size` 0, or valid for `size` bytes: written by `getxattrat`, read by
/// `setxattrat`.
unsafe fn xattrat_value_call(
    nr: libc::c_long,
    dir: libc::c_int,
    path: &CStr,
    name: &CStr,
    value: *mut libc::c_void,
    size: usize,
    flags: libc::c_int,
) -> libc::c_long {
    let mut args = XattrArgs {
        value: value as u64,
        size: size.min(u32::MAX as usize) as u32,
        flags: flags as u32,
    };
    // SAFETY: NUL-terminated path and name; `args` is a valid `xattr_args` of the size given,
    // naming a buffer as the caller promises.
    unsafe {
        libc::syscall(
            nr,
            dir,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            name.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    }
}

/// Whether the `*xattrat` calls work here, found once by reading an attribute of `/`: a
/// missing attribute is an answer, ENOSYS (old kernel) or EPERM (a seccomp filter) is not.
fn xattrat_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            // SAFETY: a null buffer of size 0 asks for the value's size only.
            let ret = unsafe {
                xattrat_value_call(
                    xattrat::GET,
                    libc::AT_FDCWD,
                    c"/",
                    c"user.rsfs-overlay.probe",
                    std::ptr::null_mut(),
                    0,
                    0,
                )
            };
            let errno = io::Error::last_os_error().raw_os_error();
            ret >= 0 || !matches!(errno, Some(libc::ENOSYS | libc::EPERM))
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        false
    })
}

/// Runs `f` on where an xattr call goes: an entry goes through `/proc/self/fd` where the
/// `*xattrat` calls are not available.
fn resolved<T>(at: XattrAt<'_>, f: impl FnOnce(XattrAt<'_>) -> T) -> io::Result<T> {
    match at {
        XattrAt::Entry(dir, name) if !xattrat_works() => {
            let path = proc_path(dir, Some(OsStr::from_bytes(name.to_bytes())))?;
            Ok(f(XattrAt::Path(&path)))
        }
        other => Ok(f(other)),
    }
}

fn xattr_get_raw(at: XattrAt<'_>, name: &CStr, buf: &mut [u8]) -> libc::ssize_t {
    let (ptr, len) = if buf.is_empty() {
        (std::ptr::null_mut(), 0)
    } else {
        (buf.as_mut_ptr().cast(), buf.len())
    };
    match at {
        // SAFETY: NUL-terminated name; `ptr` is null with len 0 or valid for `len` bytes.
        XattrAt::Fd(fd) => unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), ptr, len) },
        // SAFETY: as above, and `path` is NUL-terminated.
        XattrAt::Path(path) => unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), ptr, len) },
        // SAFETY: `ptr` is null with len 0 or valid for `len` bytes.
        XattrAt::Entry(dir, entry) => unsafe {
            xattrat_value_call(xattrat::GET, dir.as_raw_fd(), entry, name, ptr, len, 0)
                as libc::ssize_t
        },
    }
}

fn xattr_list_raw(at: XattrAt<'_>, buf: &mut [u8]) -> libc::ssize_t {
    let (ptr, len) = if buf.is_empty() {
        (std::ptr::null_mut(), 0)
    } else {
        (buf.as_mut_ptr().cast(), buf.len())
    };
    match at {
        // SAFETY: `ptr` is null with len 0 or valid for `len` bytes.
        XattrAt::Fd(fd) => unsafe { libc::flistxattr(fd.as_raw_fd(), ptr, len) },
        // SAFETY: as above, and `path` is NUL-terminated.
        XattrAt::Path(path) => unsafe { libc::llistxattr(path.as_ptr(), ptr, len) },
        // SAFETY: as above, and `entry` is NUL-terminated.
        XattrAt::Entry(dir, entry) => unsafe {
            libc::syscall(
                xattrat::LIST,
                dir.as_raw_fd(),
                entry.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                ptr,
                len,
            ) as libc::ssize_t
        },
    }
}

/// Asks for the size, then reads; retries when the value grew in between (ERANGE).
fn read_sized(mut call: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<u8>> {
    loop {
        let size = check_len(call(&mut []))?;
        let mut buf = vec![0u8; size];
        if size == 0 {
            return Ok(buf);
        }
        match check_len(call(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one extended attribute.
pub fn getxattr(at: XattrAt<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    resolved(at, |at| read_sized(|buf| xattr_get_raw(at, name, buf)))?
}

/// Lists the extended attribute names (NUL-separated, as the syscall returns them).
pub fn listxattr(at: XattrAt<'_>) -> io::Result<Vec<u8>> {
    resolved(at, |at| read_sized(|buf| xattr_list_raw(at, buf)))?
}

/// Sets one extended attribute.
pub fn setxattr(at: XattrAt<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let (v, n) = (value.as_ptr().cast(), value.len());
    resolved(at, |at| {
        check_unit(match at {
            // SAFETY: NUL-terminated name; `value` is valid for `n` bytes.
            XattrAt::Fd(fd) => unsafe {
                libc::fsetxattr(fd.as_raw_fd(), name.as_ptr(), v, n, flags)
            },
            // SAFETY: as above, and `path` is NUL-terminated.
            XattrAt::Path(p) => unsafe { libc::lsetxattr(p.as_ptr(), name.as_ptr(), v, n, flags) },
            // SAFETY: `value` is valid for `n` bytes, which setxattrat only reads.
            XattrAt::Entry(dir, entry) => unsafe {
                xattrat_value_call(
                    xattrat::SET,
                    dir.as_raw_fd(),
                    entry,
                    name,
                    v as *mut libc::c_void,
                    n,
                    flags,
                ) as libc::c_int
            },
        })
    })?
}

/// Removes one extended attribute.
pub fn removexattr(at: XattrAt<'_>, name: &CStr) -> io::Result<()> {
    resolved(at, |at| {
        check_unit(match at {
            // SAFETY: NUL-terminated name.
            XattrAt::Fd(fd) => unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) },
            // SAFETY: NUL-terminated path and name.
            XattrAt::Path(p) => unsafe { libc::lremovexattr(p.as_ptr(), name.as_ptr()) },
            // SAFETY: NUL-terminated entry and name.
            XattrAt::Entry(dir, entry) => unsafe {
                libc::syscall(
                    xattrat::REMOVE,
                    dir.as_raw_fd(),
                    entry.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                    name.as_ptr(),
                ) as libc::c_int
            },
        })
    })?
}

/// Forks the process. Only called at start-up, before any thread exists, so the child may run
/// arbitrary code.
pub fn fork() -> io::Result<Option<libc::pid_t>> {
    // SAFETY: called while the process is single-threaded (start-up, before the session and
    // the signal thread start), so the child inherits no locks held by other threads.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(None),
        pid => Ok(Some(pid)),
    }
}

/// Shares the data blocks of `src` with `dst` (reflink), where the filesystem supports it.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open.
    check_unit(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) })
}

/// Raises the soft limit of open files to the hard limit, as fuse-overlayfs does: every
/// cached directory holds an fd per layer.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill.
    check_unit(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit.
    check_unit(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    Ok(lim.rlim_cur)
}

/// The largest file handle the kernel hands out (MAX_HANDLE_SZ).
const MAX_HANDLE_SZ: usize = 128;

/// A file handle buffer laid out as `struct file_handle`: two 32-bit header words, then the
/// opaque bytes; held in u32s so the header is aligned.
fn handle_buffer() -> Vec<u32> {
    vec![0u32; 2 + MAX_HANDLE_SZ / 4]
}

/// The file handle of `name` inside `dir` (or of `dir` itself when `name` is `None`), as
/// `(handle_type, bytes)`; never follows a final symlink.
pub fn name_to_handle_at(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> io::Result<(i32, Vec<u8>)> {
    let (path, flags) = match name {
        Some(n) => (
            CString::new(n.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
            0,
        ),
        None => (CString::default(), libc::AT_EMPTY_PATH),
    };
    let mut buf = handle_buffer();
    buf[0] = MAX_HANDLE_SZ as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` starts with a file_handle header whose handle_bytes says how many bytes
    // follow, and is large enough for MAX_HANDLE_SZ bytes after it.
    check_unit(unsafe {
        libc::name_to_handle_at(
            dir.as_raw_fd(),
            path.as_ptr(),
            buf.as_mut_ptr().cast(),
            &mut mount_id,
            flags,
        )
    })?;
    let len = (buf[0] as usize).min(MAX_HANDLE_SZ);
    let kind = buf[1] as i32;
    let bytes: Vec<u8> = buf[2..]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(len)
        .collect();
    Ok((kind, bytes))
}

/// Opens the object a file handle names, on the filesystem of `mount_fd`, as an `O_PATH` fd.
/// Needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle_at(
    mount_fd: BorrowedFd<'_>,
    kind: i32,
    bytes: &[u8],
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    if bytes.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = handle_buffer();
    buf[0] = bytes.len() as u32;
    buf[1] = kind as u32;
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        buf[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `buf` is a complete file_handle with `bytes.len()` bytes of handle data.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The UUID of the filesystem holding `fd` (`FS_IOC_GETFSUUID`), `None` where the kernel or
/// the filesystem does not report one.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> Option<[u8; 16]> {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    // _IOR(0x15, 0, struct fsuuid2)
    const FS_IOC_GETFSUUID: libc::c_ulong = 0x8011_1500;
    let mut out = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: the ioctl writes at most sizeof(struct fsuuid2) bytes into `out`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETFSUUID, &mut out) };
    (ret == 0 && out.len == 16).then_some(out.uuid)
}

/// Makes glibc's allocator give large blocks back as soon as they are freed: allocations of
/// 4 MiB and more get their own mapping, and free memory over 4 MiB at the top of the heap is
/// trimmed. glibc's default raises both thresholds each time a large block is freed (up to
/// 32 MiB), so after the node table has grown by rehashing during a walk of a million files,
/// its next (tens of MiB) copies land inside the heap, where pages kept by small live
/// allocations around them can hold them after the kernel forgets every node. 4 MiB keeps
/// per-request buffers (a read's, at most 1 MiB) in the heap, off mmap/munmap.
pub fn configure_allocator() {
    const FOUR_MIB: libc::c_int = 4 << 20;
    // SAFETY: mallopt only sets glibc's tunables; the values are valid for both parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, FOUR_MIB);
        libc::mallopt(libc::M_TRIM_THRESHOLD, FOUR_MIB);
    }
}

/// Returns the allocator's free memory to the system (glibc's `malloc_trim`): freed memory
/// otherwise stays in its arenas, and the daemon's RSS would keep its peak forever.
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own heap structures, which
    // it locks itself; any padding value is valid.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// An entry's xattrs read the same by name inside its directory (the `*xattrat` calls where
    /// the kernel has them) and through `/proc/self/fd` (the fallback); neither follows a
    /// symlink.
    #[test]
    fn entry_xattrs_match_the_proc_path() {
        let dir = std::env::temp_dir().join(format!("rsfs-sys-xattr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        std::fs::write(dir.join("f"), b"x").expect("create a file");
        let _ = std::fs::remove_file(dir.join("link"));
        std::os::unix::fs::symlink("f", dir.join("link")).expect("create a symlink");
        let d = std::fs::File::open(&dir).expect("open the directory");
        let (entry, link) = (c"f", c"link");
        let by_path = proc_path(d.as_fd(), Some(OsStr::new("f"))).expect("proc path");
        let by_name = XattrAt::Entry(d.as_fd(), entry);
        match setxattr(by_name, c"user.rsfs-test", b"value", 0) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                eprintln!("SKIPPED: no user xattrs in {}", dir.display());
                return;
            }
            other => other.expect("setxattr by name"),
        }
        let read = |at| getxattr(at, c"user.rsfs-test").ok();
        assert_eq!(read(by_name).as_deref(), Some(&b"value"[..]));
        assert_eq!(read(XattrAt::Path(&by_path)), read(by_name));
        assert_eq!(
            listxattr(by_name).ok(),
            listxattr(XattrAt::Path(&by_path)).ok()
        );
        let on_link = getxattr(XattrAt::Entry(d.as_fd(), link), c"user.rsfs-test");
        assert!(
            on_link.is_err(),
            "a symlink's own attributes are read, not its target's"
        );
        removexattr(by_name, c"user.rsfs-test").expect("removexattr by name");
        assert_eq!(read(XattrAt::Path(&by_path)), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
