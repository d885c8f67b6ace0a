//! `rsfs-overlay usage`: the bytes and inodes the writable layer holds, asked of the daemon
//! serving a mount or counted by a walk of an unmounted upper (both as `du` counts).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;

pub use crate::usage::{USAGE_XATTR, Usage};

/// Walks an unmounted upper: `du -s -B1` and `du -s --inodes` in one pass.
pub fn walk_upper(upper: &Path) -> anyhow::Result<Usage> {
    let root = super::export::open_upper(upper)?;
    crate::usage::count_upper(&root)
        .with_context(|| format!("cannot walk the upper '{}'", upper.display()))
}

/// Asks the daemon serving `mountpoint` for its counters.
pub fn ask_daemon(mountpoint: &Path) -> anyhow::Result<Usage> {
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .context("the mountpoint path holds a NUL byte")?;
    let name = std::ffi::CString::new(USAGE_XATTR).context("attribute name")?;
    let value = crate::sys::getxattr(crate::sys::XattrAt::Path(&path), &name).map_err(|e| {
        if crate::layer::is_no_xattr(&e) {
            anyhow::anyhow!(
                "'{}' is not the root of an rsfs-overlay mount with an upper layer \
                 (use --upper DIR for an unmounted upper)",
                mountpoint.display()
            )
        } else {
            anyhow::anyhow!("cannot ask the daemon at '{}': {}", mountpoint.display(), e)
        }
    })?;
    let text = String::from_utf8_lossy(&value);
    Usage::parse(&text).with_context(|| format!("unexpected answer from the daemon: '{text}'"))
}
