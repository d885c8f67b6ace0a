//! Names that look like overlay metadata. The rule (README, "Metadata-looking names"): OCI/AUFS
//! markers (`.wh.NAME`, `.wh..wh..opq`) are metadata in every layer, the upper included, because
//! containers/storage writes them there when it runs a mount program; so no caller may make such
//! a name through the mount (EPERM), and none ever shows in the merged view. A marker found in
//! the upper hides what it names; a new object made over it takes its place.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::path::Path;

use common::{Layer, Scratch, mount_ours};

/// The names a directory of the mount lists, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_refused(what: &str, res: std::io::Result<()>) {
    match res {
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {}
        other => panic!("{what}: want EPERM, got {other:?}"),
    }
}

#[test]
fn callers_cannot_make_marker_names() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("x", "lower x").file("d/kept", "lower kept");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
        let p = m.path();
        assert_refused("create .wh.x", fs::write(p.join(".wh.x"), "forged"));
        assert_refused(
            "create .wh..wh..opq",
            fs::write(p.join("d/.wh..wh..opq"), ""),
        );
        assert_refused("mkdir .wh.d", fs::create_dir(p.join(".wh.d")));
        assert_refused("symlink .wh.s", symlink("x", p.join(".wh.s")));
        assert_refused("link to .wh.x", fs::hard_link(p.join("x"), p.join(".wh.x")));
        fs::write(p.join("mine"), "mine").expect("create an ordinary file");
        assert_refused(
            "rename to .wh.x",
            fs::rename(p.join("mine"), p.join(".wh.x")),
        );
        assert_eq!(names(p), ["d", "mine", "x"]);
        assert_eq!(names(&p.join("d")), ["kept"]);
    }
    let upper_names: Vec<String> = names(&u);
    assert!(
        upper_names.iter().all(|n| !n.starts_with(".wh.")),
        "no marker may reach the upper: {upper_names:?}"
    );
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    assert_eq!(
        fs::read_to_string(m.path().join("x")).expect("x"),
        "lower x"
    );
    assert_eq!(
        fs::read_to_string(m.path().join("d/kept")).expect("d/kept"),
        "lower kept",
        "d must not have become opaque"
    );
}

#[test]
fn markers_in_the_upper_are_honoured() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower
        .file("gone", "lower gone")
        .file("file_again", "lower file")
        .file("dir_again/old", "lower old")
        .file("opq/hidden", "lower hidden")
        .file("kept", "lower kept");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    // An upper as containers/storage leaves it after applying a layer in the AUFS format.
    for marker in [
        ".wh.gone",
        ".wh.file_again",
        ".wh.dir_again",
        "opq/.wh..wh..opq",
    ] {
        let path = u.join(marker);
        fs::create_dir_all(path.parent().expect("parent")).expect("upper dir");
        fs::write(&path, "").expect("marker");
    }
    fs::write(u.join("opq/new"), "upper new").expect("upper file");
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    let p = m.path();
    assert_eq!(names(p), ["kept", "opq"]);
    assert_eq!(
        names(&p.join("opq")),
        ["new"],
        "the opaque marker hides the lower"
    );
    for hidden in ["gone", ".wh.gone", "opq/hidden", "opq/.wh..wh..opq"] {
        assert!(
            fs::symlink_metadata(p.join(hidden)).is_err(),
            "{hidden} must not be visible"
        );
    }
    // New objects over a marker: a file, and a directory that must hide the lower's content.
    fs::write(p.join("file_again"), "upper file").expect("create over a marker");
    fs::create_dir(p.join("dir_again")).expect("mkdir over a marker");
    assert_eq!(
        fs::read_to_string(p.join("file_again")).expect("read"),
        "upper file"
    );
    assert!(names(&p.join("dir_again")).is_empty(), "new dir is opaque");
    assert_eq!(names(p), ["dir_again", "file_again", "kept", "opq"]);
    drop(m);
    let upper_names = names(&u);
    assert!(
        !upper_names.contains(&".wh.file_again".to_owned())
            && !upper_names.contains(&".wh.dir_again".to_owned()),
        "markers under new objects are removed: {upper_names:?}"
    );
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    assert_eq!(names(m.path()), ["dir_again", "file_again", "kept", "opq"]);
    assert!(names(&m.path().join("dir_again")).is_empty());
}
