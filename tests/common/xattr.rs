//! Extended attributes on paths without following symlinks (llistxattr, lgetxattr, lsetxattr,
//! lremovexattr). The crate denies `unsafe_code`; these four thin wrappers are the tests' only
//! exception.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cname(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The names listed for `path`, in the order the filesystem gave them.
pub fn list(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let p = cpath(path)?;
    loop {
        // SAFETY: a null buffer of size 0 asks only for the needed size.
        let need = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize + 1];
        // SAFETY: buf is valid for buf.len() bytes.
        let got = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(<[u8]>::to_vec)
            .collect());
    }
}

pub fn get(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    get_bytes(path, name.as_bytes())
}

pub fn get_bytes(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let p = cpath(path)?;
    let n = cname(name)?;
    loop {
        // SAFETY: a null buffer of size 0 asks only for the needed size.
        let need = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; need as usize + 1];
        // SAFETY: buf is valid for buf.len() bytes.
        let got =
            unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(got as usize);
        return Ok(buf);
    }
}

pub fn set(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cpath(path)?;
    let n = cname(name.as_bytes())?;
    // SAFETY: value is valid for value.len() bytes; the strings are NUL-terminated.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn remove(path: &Path, name: &str) -> io::Result<()> {
    let p = cpath(path)?;
    let n = cname(name.as_bytes())?;
    // SAFETY: both strings are NUL-terminated.
    let r = unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
