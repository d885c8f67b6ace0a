//! Names that look like overlay metadata, created by a caller through the mount, stay ordinary
//! names: `.wh.x` never hides `x` and `.wh..wh..opq` never makes a directory opaque, not while
//! mounted, not after a remount, and not under the kernel's overlayfs mounting the same upper.
//! (README, "Metadata-looking names": OCI markers are honoured in lower layers only.)

mod common;

use std::fs;
use std::path::Path;

use common::{Layer, Scratch, mount_kernel, mount_ours};

fn assert_view(root: &Path, who: &str) {
    let read = |rel: &str| {
        fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{who}: read {rel}: {e}"))
    };
    assert_eq!(read("x"), "lower x", "{who}: x must not be whited out");
    assert_eq!(
        read(".wh.x"),
        "made through the mount",
        "{who}: .wh.x is an ordinary file"
    );
    assert_eq!(
        read("d/kept"),
        "lower kept",
        "{who}: d must not become opaque"
    );
    assert_eq!(
        read("d/.wh..wh..opq"),
        "",
        "{who}: the marker name is an ordinary file"
    );
    let meta = fs::symlink_metadata(root.join("d/.wh..wh..opq")).expect("stat marker name");
    assert!(meta.is_file(), "{who}: .wh..wh..opq is a regular file");
}

#[test]
fn metadata_looking_names_stay_ordinary() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("x", "lower x").file("d/kept", "lower kept");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
        fs::write(m.path().join(".wh.x"), "made through the mount").expect("create .wh.x");
        fs::write(m.path().join("d/.wh..wh..opq"), "").expect("create .wh..wh..opq");
        assert_view(m.path(), "ours, mounted");
    }
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
        assert_view(m.path(), "ours, after a remount");
    }
    let kw = scratch.dir("kw");
    let k = mount_kernel(&[lower.root()], Some((&u, &kw)), &[]);
    assert_view(k.path(), "kernel overlayfs on our upper");
}
