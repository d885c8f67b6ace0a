//! Directory renames with `redirect_dir=on`: `mv` of a lower tree is a rename plus a redirect,
//! not a copy. A 10,000-file lower tree moved across directories reads back identically,
//! through the mount, after a remount, and under the kernel's overlayfs mounting our upper;
//! and the upper holds no file data afterwards.

mod common;

use std::fs;

use common::contents::{file_bytes, tree};
use common::{Layer, Scratch, mount_kernel, mount_ours};

const DIRS: usize = 100;
const FILES_PER_DIR: usize = 100;

#[test]
fn moving_a_deep_lower_tree_copies_nothing() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    for d in 0..DIRS {
        for f in 0..FILES_PER_DIR {
            lower.file(
                &format!("src/tree/d{d:03}/f{f:03}"),
                format!("file {d}/{f}\n").repeat(f % 7 + 1),
            );
        }
        lower.symlink(&format!("src/tree/d{d:03}/link"), "f000");
    }
    lower.dir("dest");
    let before = tree(&lower.path("src/tree"));
    assert_eq!(before.len(), DIRS * (FILES_PER_DIR + 2));
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["redirect_dir=on"]);
        // rename(2) itself, as mv tries first: it must not fail with EXDEV.
        fs::rename(m.path().join("src/tree"), m.path().join("dest/moved"))
            .expect("rename of a lower directory with redirect_dir=on");
        // And one more move inside its new parent (a relative redirect is kept absolute).
        fs::rename(m.path().join("dest/moved"), m.path().join("dest/moved2"))
            .expect("second rename");
        assert!(!m.path().join("src/tree").exists(), "the old name is gone");
        assert_eq!(
            tree(&m.path().join("dest/moved2")),
            before,
            "through the mount"
        );
    }
    assert_eq!(
        file_bytes(&u).0,
        0,
        "no file data may be copied to the upper"
    );
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["redirect_dir=on"]);
        assert_eq!(
            tree(&m.path().join("dest/moved2")),
            before,
            "after a remount"
        );
        assert!(!m.path().join("src/tree").exists());
    }
    let kw = scratch.dir("kw");
    let k = mount_kernel(
        &[lower.root()],
        Some((&u, &kw)),
        &["redirect_dir=on", "index=off", "metacopy=off"],
    );
    assert_eq!(
        tree(&k.path().join("dest/moved2")),
        before,
        "kernel overlayfs on our upper"
    );
    assert!(!k.path().join("src/tree").exists());
}

#[test]
fn without_redirect_dir_on_a_lower_directory_rename_is_exdev() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("src/a", "a").dir("dest");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    let err = fs::rename(m.path().join("src"), m.path().join("dest/src"))
        .expect_err("rename of a lower directory must fail by default");
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
}
