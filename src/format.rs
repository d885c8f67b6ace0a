//! The on-disk overlay format: which entries are whiteouts, which directories are opaque, which
//! extended attributes are the overlay's own. We read every format found in the wild and write
//! the kernel's (char 0/0 whiteouts, `trusted.overlay.opaque=y`, or `user.overlay.*` under
//! `userxattr`), so an upper made by us mounts under the kernel's overlayfs and the reverse.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::FileStat;

use crate::layer::XattrTarget;

/// OCI/AUFS whiteout prefix: `.wh.NAME` in a lower layer hides NAME.
pub const OCI_WHITEOUT_PREFIX: &[u8] = b".wh.";
/// OCI/AUFS opaque marker: `.wh..wh..opq` inside a lower directory makes it opaque.
pub const OCI_OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// fuse-overlayfs's own opaque marker (rootless layers written by it).
const FUSE_OVERLAYFS_OPAQUE: &[u8] = b"user.fuseoverlayfs.opaque";
const FUSE_OVERLAYFS_PREFIX: &[u8] = b"user.fuseoverlayfs.";

/// The namespace of the overlay's private xattrs: `trusted.overlay.` by default, `user.overlay.`
/// with `userxattr` (what the kernel lets an unprivileged mounter write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XattrNames {
    pub userxattr: bool,
}

impl XattrNames {
    fn prefix(&self) -> &'static [u8] {
        if self.userxattr {
            b"user.overlay."
        } else {
            b"trusted.overlay."
        }
    }

    /// The full name of one private attribute, e.g. `opaque` → `trusted.overlay.opaque`.
    pub fn name(&self, suffix: &str) -> Vec<u8> {
        let mut v = self.prefix().to_vec();
        v.extend_from_slice(suffix.as_bytes());
        v
    }

    /// True for stored attributes that belong to the overlay and are never shown or copied as
    /// they are: the kernel's (in either namespace: a `trusted.overlay.*` left in a layer is
    /// metadata of some other overlay) and fuse-overlayfs's. Escaped names
    /// (`<prefix>overlay.*`, see [`XattrNames::escape`]) are user data, not private.
    pub fn is_private(&self, name: &[u8]) -> bool {
        if self.unescape(name).is_some() {
            return false;
        }
        name.starts_with(b"trusted.overlay.")
            || (self.userxattr && name.starts_with(b"user.overlay."))
            || name.starts_with(FUSE_OVERLAYFS_PREFIX)
    }

    /// Where an attribute named through the mount is stored. Names in the overlay's own
    /// namespace are escaped with one more `overlay.` (as the kernel does since 6.7), so a
    /// caller can set `trusted.overlay.opaque` on a file without forging an opaque marker, and
    /// nested overlays keep working. `None` for names no caller may touch.
    pub fn escape(&self, name: &[u8]) -> Option<Vec<u8>> {
        if let Some(rest) = name.strip_prefix(self.prefix()) {
            let mut v = self.prefix().to_vec();
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(rest);
            return Some(v);
        }
        if self.is_private(name) {
            return None;
        }
        Some(name.to_vec())
    }

    /// The name through the mount of an escaped stored name, `None` if it is not escaped.
    pub fn unescape(&self, stored: &[u8]) -> Option<Vec<u8>> {
        let rest = stored
            .strip_prefix(self.prefix())?
            .strip_prefix(b"overlay.")?;
        let mut v = self.prefix().to_vec();
        v.extend_from_slice(rest);
        Some(v)
    }

    /// The name shown through the mount for a stored name, `None` if it is hidden.
    pub fn visible(&self, stored: &[u8]) -> Option<Vec<u8>> {
        match self.unescape(stored) {
            Some(v) => Some(v),
            None if self.is_private(stored) => None,
            None => Some(stored.to_vec()),
        }
    }
}

/// What the opaque attribute of a directory says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirMarks {
    /// Nothing below this directory shows through it.
    pub opaque: bool,
    /// It may contain xattr whiteouts (`opaque=x`, or the older `whiteouts` attribute), so
    /// its empty regular files must be checked for the whiteout attribute.
    pub xwhiteouts: bool,
}

/// Reads the opaque and xattr-whiteout marks of a directory in one layer.
pub fn dir_marks(names: XattrNames, dir: XattrTarget<'_>) -> DirMarks {
    let mut marks = DirMarks::default();
    match dir.get_opt(&names.name("opaque")) {
        Ok(Some(v)) if v.as_slice() == b"y" => marks.opaque = true,
        Ok(Some(v)) if v.as_slice() == b"x" => marks.xwhiteouts = true,
        _ => {}
    }
    if !marks.xwhiteouts {
        marks.xwhiteouts = matches!(dir.get_opt(&names.name("whiteouts")), Ok(Some(_)));
    }
    if !marks.opaque {
        marks.opaque =
            matches!(dir.get_opt(FUSE_OVERLAYFS_OPAQUE), Ok(Some(v)) if v.as_slice() == b"y");
    }
    marks
}

/// A kernel whiteout: a character device with device number 0/0.
pub fn is_char_whiteout(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// An xattr whiteout (kernel ≥ 6.7): an empty regular file carrying the `whiteout` attribute,
/// valid only inside a directory marked as holding such whiteouts.
pub fn is_xattr_whiteout(
    names: XattrNames,
    st: &FileStat,
    parent_marks: DirMarks,
    entry: XattrTarget<'_>,
) -> bool {
    parent_marks.xwhiteouts
        && st.st_mode & libc::S_IFMT == libc::S_IFREG
        && st.st_size == 0
        && matches!(entry.get_opt(&names.name("whiteout")), Ok(Some(_)))
}

/// The name an OCI whiteout for `name` carries.
pub fn oci_whiteout_name(name: &OsStr) -> Vec<u8> {
    let mut v = OCI_WHITEOUT_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// If `name` is an OCI whiteout, the name it hides (`None` for the opaque marker).
pub fn oci_whiteout_target(name: &[u8]) -> Option<&[u8]> {
    if name == OCI_OPAQUE_MARKER {
        return None;
    }
    name.strip_prefix(OCI_WHITEOUT_PREFIX)
        .filter(|rest| !rest.is_empty())
}

/// True for every OCI marker name (`.wh.*`), which lower layers never show as entries.
pub fn is_oci_marker(name: &[u8]) -> bool {
    name.starts_with(OCI_WHITEOUT_PREFIX)
}

/// The kernel's `origin` record (`struct ovl_fb`): which lower object an upper object was
/// copied up from, as a file handle of the lower filesystem plus that filesystem's UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub handle_type: u8,
    pub uuid: [u8; 16],
    pub fid: Vec<u8>,
}

const FH_VERSION: u8 = 0;
const FH_MAGIC: u8 = 0xfb;
/// version, magic, len, flags, type, uuid.
const FB_HEADER_LEN: usize = 5 + 16;
/// The handle's words are in the CPU's byte order; set only on big-endian machines.
const FH_FLAG_BIG_ENDIAN: u8 = 1 << 0;
const FH_FLAG_ANY_ENDIAN: u8 = 1 << 1;
/// The handle names an upper object (the index directory's `upper` record).
const FH_FLAG_PATH_UPPER: u8 = 1 << 2;

impl Origin {
    /// The xattr value, byte for byte what the kernel writes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(FB_HEADER_LEN + self.fid.len());
        let flags = if cfg!(target_endian = "big") {
            FH_FLAG_BIG_ENDIAN
        } else {
            0
        };
        v.extend_from_slice(&[
            FH_VERSION,
            FH_MAGIC,
            (FB_HEADER_LEN + self.fid.len()) as u8,
            flags,
            self.handle_type,
        ]);
        v.extend_from_slice(&self.uuid);
        v.extend_from_slice(&self.fid);
        v
    }

    /// The record of an upper object (the index directory's `upper`): flagged as such.
    pub fn encode_upper(&self) -> Vec<u8> {
        let mut v = self.encode();
        v[3] |= FH_FLAG_PATH_UPPER;
        v
    }

    /// The name of the index entry for a copy of the object this record names: the record
    /// in lowercase hex, as the kernel names them.
    pub fn index_name(&self) -> std::ffi::OsString {
        let hex: String = self.encode().iter().map(|b| format!("{b:02x}")).collect();
        hex.into()
    }

    /// Parses an xattr value; `None` for anything malformed or from a machine of the other
    /// byte order (the kernel ignores those too).
    pub fn decode(v: &[u8]) -> Option<Origin> {
        if v.len() < FB_HEADER_LEN || v[0] != FH_VERSION || v[1] != FH_MAGIC {
            return None;
        }
        let len = usize::from(v[2]);
        if len < FB_HEADER_LEN || len > v.len() {
            return None;
        }
        let flags = v[3];
        let ours = if cfg!(target_endian = "big") {
            FH_FLAG_BIG_ENDIAN
        } else {
            0
        };
        if flags & FH_FLAG_ANY_ENDIAN == 0 && flags & FH_FLAG_BIG_ENDIAN != ours {
            return None;
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&v[5..21]);
        Some(Origin {
            handle_type: v[4],
            uuid,
            fid: v[FB_HEADER_LEN..len].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn origin_round_trip() {
        let o = Origin {
            handle_type: 1,
            uuid: [7; 16],
            fid: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        let v = o.encode();
        assert_eq!(v.len(), 29);
        assert_eq!(&v[..5], &[0, 0xfb, 29, 0, 1]);
        assert_eq!(Origin::decode(&v), Some(o));
        assert_eq!(Origin::decode(&v[..10]), None);
        assert_eq!(Origin::decode(b"y"), None);
    }

    use super::*;

    #[test]
    fn private_names_follow_the_namespace() {
        let trusted = XattrNames { userxattr: false };
        let user = XattrNames { userxattr: true };
        assert!(trusted.is_private(b"trusted.overlay.opaque"));
        assert!(!trusted.is_private(b"trusted.overlay.overlay.opaque"));
        assert_eq!(
            trusted.escape(b"trusted.overlay.opaque").as_deref(),
            Some(&b"trusted.overlay.overlay.opaque"[..])
        );
        assert_eq!(trusted.escape(b"user.x").as_deref(), Some(&b"user.x"[..]));
        assert_eq!(trusted.escape(b"user.fuseoverlayfs.opaque"), None);
        assert_eq!(
            trusted.visible(b"trusted.overlay.overlay.x").as_deref(),
            Some(&b"trusted.overlay.x"[..])
        );
        assert_eq!(trusted.visible(b"trusted.overlay.origin"), None);
        assert_eq!(trusted.visible(b"user.a").as_deref(), Some(&b"user.a"[..]));
        assert!(!trusted.is_private(b"user.overlay.opaque"));
        assert!(user.is_private(b"user.overlay.opaque"));
        assert!(user.is_private(b"trusted.overlay.origin"));
        assert!(trusted.is_private(b"user.fuseoverlayfs.opaque"));
        assert!(!trusted.is_private(b"user.mime_type"));
        assert!(!trusted.is_private(b"security.capability"));
        assert_eq!(trusted.name("opaque"), b"trusted.overlay.opaque");
        assert_eq!(user.name("redirect"), b"user.overlay.redirect");
    }

    #[test]
    fn oci_names() {
        assert_eq!(oci_whiteout_target(b".wh.foo"), Some(&b"foo"[..]));
        assert_eq!(oci_whiteout_target(b".wh..wh..opq"), None);
        assert_eq!(oci_whiteout_target(b".wh."), None);
        assert_eq!(oci_whiteout_target(b"foo"), None);
        assert!(is_oci_marker(b".wh..wh..opq"));
        assert_eq!(oci_whiteout_name(OsStr::new("a")), b".wh.a");
    }
}
