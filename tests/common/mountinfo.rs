//! Reading /proc/self/mountinfo: which mounts exist, where, and of what type.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct MountEntry {
    pub mount_id: u64,
    /// `major:minor` of the mounted filesystem; for FUSE the minor is the connection number.
    pub dev: String,
    pub mount_point: PathBuf,
    pub mount_opts: String,
    pub fstype: String,
    pub source: String,
    pub super_opts: String,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (pre, post) = line.split_once(" - ")?;
    let pre: Vec<&str> = pre.split(' ').collect();
    let post: Vec<&str> = post.split(' ').collect();
    if pre.len() < 6 || post.len() < 3 {
        return None;
    }
    Some(MountEntry {
        mount_id: pre[0].parse().ok()?,
        dev: pre[2].to_string(),
        mount_point: PathBuf::from(std::ffi::OsString::from_vec(unescape(pre[4]))),
        mount_opts: pre[5].to_string(),
        fstype: post[0].to_string(),
        source: String::from_utf8_lossy(&unescape(post[1])).into_owned(),
        super_opts: post[2].to_string(),
    })
}

pub fn mounts() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines().filter_map(parse_line).collect()
}

/// Every mount whose mount point is exactly `path`, oldest first.
pub fn mounts_at(path: &Path) -> Vec<MountEntry> {
    mounts()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

/// The topmost mount at `path`, if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts_at(path).pop()
}

pub fn is_mounted(path: &Path) -> bool {
    !mounts_at(path).is_empty()
}

/// Every mount at or below `root`.
pub fn mounts_under(root: &Path) -> Vec<MountEntry> {
    mounts()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .collect()
}
