//! What a tree holds, for tests that compare trees or count what reached an upper: every
//! entry with its kind and content (symlink target), and the file data in a directory.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Every entry under `root` as `relative path -> (kind, content or target)`; kinds are `d`,
/// `l` and `f`.
pub fn tree(root: &Path) -> BTreeMap<String, (char, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let entry = entry.expect("entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let value = if meta.is_dir() {
                stack.push(path.clone());
                ('d', Vec::new())
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                ('l', target.to_string_lossy().into_owned().into_bytes())
            } else {
                ('f', fs::read(&path).expect("read"))
            };
            out.insert(rel, value);
        }
    }
    out
}

/// The sizes and the data (bytes inside `SEEK_DATA` extents) of the regular files under
/// `dir`, summed: what a copy-up would have written shows in both, a metacopy file (a hole of
/// its data's size) only in the size. Allocated blocks would not do: a filesystem may give a
/// file a block for its xattrs alone.
pub fn file_bytes(dir: &Path) -> (u64, u64) {
    let (mut size, mut data) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("list upper") {
            let entry = entry.expect("entry");
            let meta = fs::symlink_metadata(entry.path()).expect("lstat upper");
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                size += meta.size();
                data += data_in(&entry.path(), meta.size());
            }
        }
    }
    (size, data)
}

/// Bytes of `path` (of `size` bytes) inside data extents.
fn data_in(path: &Path, size: u64) -> u64 {
    use nix::unistd::{Whence, lseek};
    let file = fs::File::open(path).expect("open upper file");
    let mut total = 0;
    let mut offset = 0i64;
    while (offset as u64) < size {
        let start = match lseek(&file, offset, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA {}: {e}", path.display()),
        };
        let end = lseek(&file, start, Whence::SeekHole).expect("SEEK_HOLE");
        total += (end - start) as u64;
        offset = end;
    }
    total
}
