//! Top-down resolution of one name in a merged directory, with the kernel's rules: a whiteout
//! ends the search, a non-directory found first wins, directories merge until one is opaque or
//! a deeper layer holds a non-directory under that name.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::{Arc, OnceLock};

use nix::sys::stat::FileStat;

use crate::format::{self, DirMarks, Origin};
use crate::layer::{self, LayerId, XattrTarget};
use crate::node::{Backing, DirLayer, LowerData, fd_of};
use crate::stack::Stack;

/// What a name resolves to.
#[derive(Debug)]
pub struct Resolved {
    pub backing: Backing,
    /// `lstat` of the top-most copy.
    pub stat: FileStat,
    /// The layer of the top-most copy.
    pub top: LayerId,
    /// The origin record of an upper copy: the lower object it was copied up from.
    pub origin: Option<Origin>,
    /// For a directory with an upper copy merged with lower ones: the first lower copy's
    /// layer and inode number, which the kernel reports (and records as origin) for it.
    pub merge_origin: Option<(LayerId, u64)>,
    /// The lower object `origin` names, once looked for: one operation asks several times
    /// (inode number, other nodes of the name) and each search opens it by handle.
    origin_target: OnceLock<Option<(LayerId, FileStat)>>,
}

impl Resolved {
    pub fn new(
        backing: Backing,
        stat: FileStat,
        top: LayerId,
        origin: Option<Origin>,
        merge_origin: Option<(LayerId, u64)>,
    ) -> Resolved {
        Resolved {
            backing,
            stat,
            top,
            origin,
            merge_origin,
            origin_target: OnceLock::new(),
        }
    }

    /// The lower object the origin record names, if any is found (see `Stack::find_origin`).
    pub fn origin_target(&self, stack: &Stack) -> Option<(LayerId, FileStat)> {
        *self
            .origin_target
            .get_or_init(|| self.origin.as_ref().and_then(|o| stack.find_origin(o)))
    }

    /// True for a directory made of more than one layer's copy (the kernel reports nlink 1).
    pub fn is_merged_dir(&self) -> bool {
        matches!(&self.backing, Backing::Dir(layers) if layers.len() > 1)
    }
}

/// Resolves `name` in the directory whose layer copies are `parent` (top-down). `Ok(None)`
/// when the name does not exist in the merged view (absent everywhere or whited out).
///
/// A directory carrying a redirect (written by a directory rename under `redirect_dir=on`)
/// continues the merge below it at the redirect's target: a relative one names a sibling, an
/// absolute one a path from the layers' roots, as the kernel follows them by default.
pub fn resolve(stack: &Stack, parent: &[DirLayer], name: &OsStr) -> io::Result<Option<Resolved>> {
    let mut dirs: Vec<DirLayer> = Vec::new();
    let mut top: Option<(FileStat, LayerId)> = None;
    let mut origin = None;
    let mut merge_origin = None;
    let mut seek = Seek::Sibling(name.to_os_string());
    let mut next_parent = 0;
    let mut last_layer: Option<LayerId> = None;
    // An absolute redirect's path went through an opaque directory: nothing below this layer.
    let mut last_layer_to_search = false;
    // A metacopy file found, whose data the lowers below it hold.
    let mut metacopy: Option<Resolved> = None;
    loop {
        if last_layer_to_search {
            break;
        }
        let (dl, name) = match &seek {
            Seek::Sibling(n) => {
                let Some(dl) = parent.get(next_parent) else {
                    break;
                };
                next_parent += 1;
                (dl.clone(), n.clone())
            }
            Seek::FromRoot(path) => {
                let layer = last_layer.map_or(0, |l| l + 1);
                if layer >= stack.layers.len() {
                    break;
                }
                last_layer = Some(layer);
                match walk_to_parent(stack, layer, path)? {
                    Walk::Found {
                        dir,
                        opaque_on_the_way,
                    } => {
                        last_layer_to_search = opaque_on_the_way;
                        (dir, path.last().cloned().unwrap_or_default())
                    }
                    Walk::Absent => continue,
                    Walk::Blocked => break,
                }
            }
        };
        last_layer = Some(dl.layer);
        let name = name.as_os_str();
        let is_lower = !stack.is_upper(dl.layer);
        // OCI markers are metadata of their layer (the upper too: containers/storage writes
        // them there when it uses a mount program), never entries of the merged view.
        if format::is_oci_marker(name.as_bytes()) {
            continue;
        }
        if is_lower && dl.names.holds(name.as_bytes()) == Some(false) {
            // Absent from a lower copy whose names are held: no need to ask.
            let marker = format::oci_whiteout_name(name);
            if dl.names.holds(&marker) == Some(true) && has_oci_whiteout(&dl, name)? {
                break;
            }
            continue;
        }
        let st = match layer::stat_at(fd_of(&dl.fd()?), name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if has_oci_whiteout(&dl, name)? {
                    break;
                }
                if is_lower {
                    dl.names.missed(fd_of(&dl.fd()?));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if is_whiteout(stack, &dl, name, &st) {
            break;
        }
        if let Some(meta) = metacopy.as_mut() {
            // Below a metacopy file: the first regular file that is not one holds its data.
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                break;
            }
            let dir_fd = dl.fd()?;
            if is_metacopy(stack, dl.layer, XattrTarget::Entry(fd_of(&dir_fd), name))? {
                if let Some(r) = read_redirect(stack, XattrTarget::Entry(fd_of(&dir_fd), name)) {
                    seek = seek.redirected(r);
                }
                continue;
            }
            // The kernel reports the data's blocks: the metacopy file's own are a hole.
            meta.stat.st_blocks = st.st_blocks;
            meta.backing = Backing::NonDir {
                layer: meta.top,
                data: Some(Arc::new(LowerData {
                    dir: dl.clone(),
                    name: name.to_os_string(),
                })),
                indexed: None,
            };
            return Ok(metacopy);
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            if top.is_some() {
                // A non-directory below a directory is hidden by it and ends the merge.
                break;
            }
            let dir_fd = dl.fd()?;
            let entry = XattrTarget::Entry(fd_of(&dir_fd), name);
            let origin = if is_lower {
                None
            } else {
                read_origin(stack, entry)
            };
            let found = Resolved {
                backing: Backing::non_dir(dl.layer),
                stat: st,
                top: dl.layer,
                origin,
                merge_origin: None,
                origin_target: OnceLock::new(),
            };
            let last_layer = dl.layer + 1 == stack.layers.len();
            if st.st_mode & libc::S_IFMT != libc::S_IFREG
                || last_layer
                || !is_metacopy(stack, dl.layer, entry)?
            {
                return Ok(Some(found));
            }
            if let Some(r) = read_redirect(stack, entry) {
                seek = seek.redirected(r);
            }
            metacopy = Some(found);
            continue;
        }
        let fd = layer::open_dir_at(fd_of(&dl.fd()?), name)?;
        let marks = read_dir_marks(stack, &fd);
        if top.is_none() && !is_lower {
            origin = read_origin(stack, XattrTarget::Dir(layer::borrow(&fd)));
        }
        let redirect = if marks.opaque {
            None
        } else {
            read_redirect(stack, XattrTarget::Dir(layer::borrow(&fd)))
        };
        dirs.push(DirLayer::child(&dl, name, fd, marks)?);
        match &top {
            None => top = Some((st, dl.layer)),
            Some((_, t)) if merge_origin.is_none() && is_lower && stack.is_upper(*t) => {
                merge_origin = Some((dl.layer, st.st_ino));
            }
            Some(_) => {}
        }
        if marks.opaque {
            break;
        }
        if let Some(r) = redirect {
            seek = seek.redirected(r);
        }
    }
    if metacopy.is_some() {
        tracing::warn!(name = ?name, "metacopy file with no lower data found; lookup fails with EIO");
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(top.map(|(stat, top)| Resolved {
        backing: Backing::Dir(dirs),
        stat,
        top,
        origin,
        merge_origin,
        origin_target: OnceLock::new(),
    }))
}

/// Whether the regular file `entry` in `layer` is a metacopy file: metadata only, its data in
/// a lower layer. Refused (EPERM) where metacopy is off, as the kernel refuses to follow one
/// then: an upper crafted by someone else must not reach lower files its owner could not.
fn is_metacopy(stack: &Stack, layer: LayerId, entry: XattrTarget<'_>) -> io::Result<bool> {
    match entry.get_opt(&stack.names.name("metacopy")) {
        Ok(Some(_)) if stack.metacopy => Ok(true),
        Ok(Some(_)) => {
            tracing::warn!(
                layer,
                "refusing to follow a metacopy file: mount with metacopy=on"
            );
            Err(io::Error::from_raw_os_error(libc::EPERM))
        }
        _ => Ok(false),
    }
}

/// Where the lower layers are searched next.
enum Seek {
    /// This name in the parent directory's next layer copies.
    Sibling(OsString),
    /// This path from the root of each further layer.
    FromRoot(Vec<OsString>),
}

impl Seek {
    fn redirected(self, redirect: Redirect) -> Seek {
        match (self, redirect) {
            (_, Redirect::Absolute(path)) => Seek::FromRoot(path),
            (Seek::Sibling(_), Redirect::Relative(n)) => Seek::Sibling(n),
            (Seek::FromRoot(mut path), Redirect::Relative(n)) => {
                path.pop();
                path.push(n);
                Seek::FromRoot(path)
            }
        }
    }
}

/// A directory's redirect: where its lower content lives.
enum Redirect {
    /// A name in the same parent directory.
    Relative(OsString),
    /// A path from the root of the layers.
    Absolute(Vec<OsString>),
}

fn read_redirect(stack: &Stack, dir: XattrTarget<'_>) -> Option<Redirect> {
    if !stack.follow_redirects {
        return None;
    }
    let v = dir.get_opt(&stack.names.name("redirect")).ok()??;
    if let Some(path) = v.strip_prefix(b"/") {
        let parts: Vec<OsString> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(|c| OsStr::from_bytes(c).to_os_string())
            .collect();
        if parts.is_empty() || parts.iter().any(|p| p == ".." || p == ".") {
            return None;
        }
        Some(Redirect::Absolute(parts))
    } else if v.is_empty() || v.contains(&b'/') || v == b"." || v == b".." {
        None
    } else {
        Some(Redirect::Relative(OsStr::from_bytes(&v).to_os_string()))
    }
}

/// What a walk down an absolute redirect's path met in one layer.
enum Walk {
    /// The parent directory of the path's last component; past an opaque directory on the
    /// way, no further layer is searched.
    Found {
        dir: DirLayer,
        opaque_on_the_way: bool,
    },
    /// Some directory on the way is missing: search the next layer.
    Absent,
    /// A whiteout or a non-directory on the way: the search ends here, as in the kernel.
    Blocked,
}

/// The copy in `layer` of the parent directory of `path`, walked from the layer's root one
/// component at a time with the kernel's rules for the components before the last.
fn walk_to_parent(stack: &Stack, layer: LayerId, path: &[OsString]) -> io::Result<Walk> {
    let l = stack.layer(layer);
    let mut dir = DirLayer::root(layer, l.root_dir.clone(), DirMarks::default());
    let mut opaque_on_the_way = false;
    for comp in path.iter().take(path.len().saturating_sub(1)) {
        let st = match layer::stat_at(fd_of(&dir.fd()?), comp) {
            Ok(st) => st,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(Walk::Absent);
            }
            Err(e) => return Err(e),
        };
        if is_whiteout(stack, &dir, comp, &st) || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Ok(Walk::Blocked);
        }
        let fd = layer::open_dir_at(fd_of(&dir.fd()?), comp)?;
        let marks = read_dir_marks(stack, &fd);
        opaque_on_the_way |= marks.opaque;
        dir = DirLayer::child(&dir, comp, fd, marks)?;
    }
    Ok(Walk::Found {
        dir,
        opaque_on_the_way,
    })
}

/// The opaque and xattr-whiteout marks of one layer's copy of a directory, including the OCI
/// opaque marker.
pub fn read_dir_marks(stack: &Stack, fd: &std::os::fd::OwnedFd) -> DirMarks {
    let mut marks = format::dir_marks(stack.names, XattrTarget::Dir(layer::borrow(fd)));
    if !marks.opaque
        && layer::stat_at(
            layer::borrow(fd),
            OsStr::from_bytes(format::OCI_OPAQUE_MARKER),
        )
        .is_ok()
    {
        marks.opaque = true;
    }
    marks
}

/// Whether an OCI `.wh.NAME` marker in this layer's copy hides `name` in the layers below.
pub fn has_oci_whiteout(dl: &DirLayer, name: &OsStr) -> io::Result<bool> {
    if !holds_oci_markers(dl)? {
        return Ok(false);
    }
    let wh = format::oci_whiteout_name(name);
    match layer::stat_at(fd_of(&dl.fd()?), OsStr::from_bytes(&wh)) {
        Ok(_) => Ok(true),
        // A name too long to carry the prefix cannot have been whited out this way.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ENAMETOOLONG)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// True when the entry `name` (with `lstat` result `st`) in one layer's copy of a directory
/// is a whiteout in any of the kernel's formats.
pub fn is_whiteout(stack: &Stack, dl: &DirLayer, name: &OsStr, st: &FileStat) -> bool {
    if format::is_char_whiteout(st) {
        return true;
    }
    if !dl.marks.xwhiteouts {
        return false;
    }
    // The copy was just listed or looked up, so its fd is open but for a race with the
    // fd budget; a copy that cannot be reopened shows nothing anyway.
    dl.fd().is_ok_and(|fd| {
        format::is_xattr_whiteout(
            stack.names,
            st,
            dl.marks,
            XattrTarget::Entry(fd_of(&fd), name),
        )
    })
}

fn read_origin(stack: &Stack, target: XattrTarget<'_>) -> Option<Origin> {
    match target.get_opt(&stack.names.name("origin")) {
        Ok(Some(v)) => Origin::decode(&v),
        _ => None,
    }
}

/// Whether a lower directory copy holds any OCI marker, listing it once per copy.
fn holds_oci_markers(dl: &DirLayer) -> io::Result<bool> {
    if let Some(known) = dl.oci_markers.get() {
        return Ok(*known);
    }
    let mut dir = nix::dir::Dir::from_fd(layer::reopen_dir(fd_of(&dl.fd()?))?)?;
    let mut found = false;
    for entry in dir.iter() {
        if format::is_oci_marker(entry?.file_name().to_bytes()) {
            found = true;
            break;
        }
    }
    Ok(*dl.oci_markers.get_or_init(|| found))
}
