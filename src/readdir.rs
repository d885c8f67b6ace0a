//! The merged listing of a directory, taken as a snapshot when a handle reads from offset 0:
//! upper first, then the lowers; a name already seen, a whiteout, or an OCI marker is skipped,
//! and the layer list already ends at the first opaque copy. Offsets index the snapshot, so
//! reading on stays stable while the directory changes.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, Type};

use crate::format;
use crate::layer::{self, LayerId};
use crate::lookup;
use crate::node::{DirLayer, Ino, fd_of};
use crate::stack::Stack;

/// One entry of a merged listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The inode number `stat` reports for the entry (so `d_ino == st_ino`).
    pub ino: Ino,
    /// `S_IFMT` bits of the entry.
    pub file_type: u32,
    pub name: OsString,
    /// The top-most layer holding the name: the layers above it (but the upper, which may
    /// change) need not be asked again when the entry is looked up (see `Overlay::lookup`).
    pub layer: LayerId,
}

/// Lists the merged directory made of `layers`; `dot` and `dotdot` are the inode numbers of
/// the directory itself and of its parent.
pub fn merged_listing(
    stack: &Stack,
    layers: &[DirLayer],
    dot: Ino,
    dotdot: Ino,
) -> io::Result<Vec<DirEntry>> {
    listing(stack, layers, dot, dotdot, false)
}

/// True when the merged directory made of `layers` may be removed (or replaced by a rename).
/// As the kernel's emptiness check, an xattr whiteout in a lower layer counts as an entry:
/// only char 0/0 whiteouts leave a directory empty.
pub fn is_empty_for_removal(stack: &Stack, layers: &[DirLayer]) -> io::Result<bool> {
    Ok(listing(stack, layers, 0, 0, true)?.len() <= 2)
}

fn listing(
    stack: &Stack,
    layers: &[DirLayer],
    dot: Ino,
    dotdot: Ino,
    xwhiteouts_are_entries: bool,
) -> io::Result<Vec<DirEntry>> {
    let mut entries = vec![
        DirEntry {
            ino: dot,
            file_type: libc::S_IFDIR,
            name: ".".into(),
            layer: 0,
        },
        DirEntry {
            ino: dotdot,
            file_type: libc::S_IFDIR,
            name: "..".into(),
            layer: 0,
        },
    ];
    let mut seen: HashSet<OsString> = HashSet::new();
    for dl in layers {
        // Names this layer's OCI whiteouts hide in the layers below (not in this one).
        let mut hidden_below: Vec<OsString> = Vec::new();
        let mut dir = Dir::from_fd(layer::reopen_dir(fd_of(&dl.fd()?))?)?;
        for item in dir.iter() {
            let item = item?;
            let bytes = item.file_name().to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let name = OsStr::from_bytes(bytes);
            if seen.contains(name) {
                continue;
            }
            if format::is_oci_marker(bytes) {
                // `.wh.NAME` hides NAME in the layers below; it is never shown itself.
                if let Some(target) = format::oci_whiteout_target(bytes) {
                    hidden_below.push(OsStr::from_bytes(target).to_os_string());
                }
                continue;
            }
            let may_be_whiteout = match item.file_type() {
                Some(Type::CharacterDevice) | None => true,
                Some(Type::File) => dl.marks.xwhiteouts,
                _ => false,
            };
            let (ino, file_type) = if may_be_whiteout || item.file_type().is_none() {
                let st = match layer::stat_at(fd_of(&dl.fd()?), name) {
                    Ok(st) => st,
                    // Removed since the listing was read: as if never listed.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                };
                let counts = xwhiteouts_are_entries
                    && !format::is_char_whiteout(&st)
                    && !stack.is_upper(dl.layer);
                if !counts && lookup::is_whiteout(stack, dl, name, &st) {
                    seen.insert(name.to_os_string());
                    continue;
                }
                (st.st_ino, st.st_mode & libc::S_IFMT)
            } else {
                (item.ino(), type_bits(item.file_type()))
            };
            seen.insert(name.to_os_string());
            entries.push(DirEntry {
                ino: stack.reported_ino(dl.layer, ino),
                file_type,
                name: name.to_os_string(),
                layer: dl.layer,
            });
        }
        seen.extend(hidden_below);
    }
    Ok(entries)
}

fn type_bits(t: Option<Type>) -> u32 {
    match t {
        Some(Type::Directory) => libc::S_IFDIR,
        Some(Type::File) => libc::S_IFREG,
        Some(Type::Symlink) => libc::S_IFLNK,
        Some(Type::Fifo) => libc::S_IFIFO,
        Some(Type::Socket) => libc::S_IFSOCK,
        Some(Type::CharacterDevice) => libc::S_IFCHR,
        Some(Type::BlockDevice) => libc::S_IFBLK,
        None => 0,
    }
}
