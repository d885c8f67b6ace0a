//! Metadata-only copy-up (`metacopy=on`), in the kernel's format: `chown -R` of a lower tree
//! writes no file data to the upper; the files read back the same through our mount, after a
//! remount and under the kernel's overlayfs mounting our upper; a kernel-written metacopy upper
//! reads the same under ours; a write copies the data up (and readers already open follow);
//! without `metacopy=on` a metacopy file is refused as the kernel refuses it.
//! `write_differential::metacopy_on_matches_kernel` compares random operations with the kernel.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::contents::{file_bytes, tree};
use common::{Layer, Scratch, mount_kernel, mount_ours};

const KERNEL_METACOPY: &[&str] = &["redirect_dir=on", "index=off", "metacopy=on"];

/// A lower of `dirs` × `files` files of 16 KiB each, distinct contents.
fn image_tree(scratch: &Scratch, dirs: usize, files: usize) -> Layer {
    let lower = Layer::new(scratch.join("l"));
    for d in 0..dirs {
        for f in 0..files {
            let line = format!("dir {d} file {f}\n");
            let content: Vec<u8> = line.bytes().cycle().take(16 * 1024).collect();
            lower.file(&format!("usr/d{d:02}/f{f:02}"), content);
        }
    }
    lower
}

/// `chown -R uid:gid` and `chmod -R` of `root`, as the tools do it (never following symlinks).
fn chown_and_chmod_tree(root: &Path, uid: u32, gid: u32) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        std::os::unix::fs::lchown(&dir, Some(uid), Some(gid)).expect("chown dir");
        for entry in fs::read_dir(&dir).expect("list") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            if meta.is_dir() {
                stack.push(path);
            } else {
                std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).expect("chown file");
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
            }
        }
    }
}

/// Owner and mode of every regular file under `root`.
fn owners(root: &Path) -> Vec<(String, u32, u32, u32)> {
    let mut out: Vec<_> = tree(root)
        .into_iter()
        .filter(|(_, (kind, _))| *kind == 'f')
        .map(|(rel, _)| {
            let m = fs::symlink_metadata(root.join(&rel)).expect("lstat");
            (rel, m.uid(), m.gid(), m.mode() & 0o7777)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn chown_of_a_lower_tree_copies_no_data() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = image_tree(&scratch, 20, 25);
    let before = tree(&lower.path("usr"));
    let lower_blocks: Vec<u64> = ["usr/d00/f00", "usr/d19/f24"]
        .iter()
        .map(|p| fs::symlink_metadata(lower.path(p)).expect("lstat").blocks())
        .collect();
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["metacopy=on"]);
        chown_and_chmod_tree(&m.path().join("usr"), 1234, 4321);
        assert_eq!(
            tree(&m.path().join("usr")),
            before,
            "contents through the mount"
        );
        for (p, blocks) in ["usr/d00/f00", "usr/d19/f24"].iter().zip(&lower_blocks) {
            let meta = fs::symlink_metadata(m.path().join(p)).expect("lstat");
            assert_eq!(
                meta.blocks(),
                *blocks,
                "{p}: st_blocks are the data's, as the kernel's"
            );
            assert_eq!((meta.uid(), meta.gid()), (1234, 4321), "{p}: the new owner");
        }
    }
    let (size, allocated) = file_bytes(&u);
    assert_eq!(
        size,
        500 * 16 * 1024,
        "every file is in the upper with its size"
    );
    assert_eq!(allocated, 0, "no file data may be written to the upper");
    let changed = owners(&lower.path("usr"))
        .into_iter()
        .map(|(rel, ..)| (rel, 1234, 4321, 0o640))
        .collect::<Vec<_>>();
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["metacopy=on"]);
        assert_eq!(tree(&m.path().join("usr")), before, "after a remount");
        assert_eq!(owners(&m.path().join("usr")), changed);
    }
    let kw = scratch.dir("kw");
    let k = mount_kernel(&[lower.root()], Some((&u, &kw)), KERNEL_METACOPY);
    assert_eq!(
        tree(&k.path().join("usr")),
        before,
        "the kernel on our upper"
    );
    assert_eq!(owners(&k.path().join("usr")), changed);
}

/// The same metadata changes and renames made by the kernel and by us leave uppers that
/// each reads as the other does, and a write copies the data up through either.
#[test]
fn metacopy_uppers_interchange_with_the_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower
        .file("a/one", "one\n".repeat(3000))
        .file("a/two", "two\n")
        .file("a/three", "three\n")
        .dir("b");
    let change = |m: &Path| {
        std::os::unix::fs::lchown(m.join("a/one"), Some(7), None).expect("chown");
        fs::rename(m.join("a/one"), m.join("a/one-renamed")).expect("rename in place");
        std::os::unix::fs::lchown(m.join("a/two"), Some(8), None).expect("chown");
        fs::rename(m.join("a/two"), m.join("b/two")).expect("rename across");
        fs::hard_link(m.join("a/three"), m.join("b/three-link")).expect("link");
    };
    let expected = {
        let (u, w) = (scratch.dir("ku"), scratch.dir("kw"));
        let k = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_METACOPY);
        change(k.path());
        tree(k.path())
    };
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["metacopy=on"]);
        change(m.path());
        assert_eq!(tree(m.path()), expected, "ours, as the kernel");
    }
    assert_eq!(file_bytes(&u).1, 0, "only metadata reached the upper");
    {
        let kw = scratch.dir("kw2");
        let k = mount_kernel(&[lower.root()], Some((&u, &kw)), KERNEL_METACOPY);
        assert_eq!(tree(k.path()), expected, "the kernel on our upper");
    }
    // And the other way: the kernel's upper under ours.
    let m = mount_ours(
        &[lower.root()],
        Some((&scratch.join("ku"), &scratch.dir("w2"))),
        &["metacopy=on"],
    );
    assert_eq!(tree(m.path()), expected, "ours on the kernel's upper");
    let mut f = OpenOptions::new()
        .append(true)
        .open(m.path().join("b/two"))
        .expect("open for append");
    f.write_all(b"more\n").expect("append");
    drop(f);
    assert_eq!(
        fs::read(m.path().join("b/two")).expect("read"),
        b"two\nmore\n"
    );
    let upper_copy = scratch.join("ku/b/two");
    assert_eq!(
        fs::read(&upper_copy).expect("upper file"),
        b"two\nmore\n",
        "the data is in the upper now"
    );
    assert!(
        xattr_names(&upper_copy)
            .iter()
            .all(|n| n != "trusted.overlay.metacopy"),
        "the metacopy mark is gone once the data is up"
    );
}

fn xattr_names(path: &Path) -> Vec<String> {
    common::xattr::list(path)
        .expect("list xattrs")
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// A file open for reading before its data is copied up reads what is written after, on
/// both (the kernel's overlay reopens its real file at the next read; ours with
/// `passthrough=upper`, see tests/passthrough.rs for the default).
#[test]
fn a_reader_follows_the_data_copy_up() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("f", "lower data\n");
    let check = |m: &Path, what: &str| {
        std::os::unix::fs::lchown(m.join("f"), Some(5), None).expect("chown");
        let mut reader = File::open(m.join("f")).expect("open for reading");
        let mut first = String::new();
        reader.read_to_string(&mut first).expect("read");
        assert_eq!(
            first, "lower data\n",
            "{what}: a metacopy file reads its lower data"
        );
        let mut writer = OpenOptions::new()
            .write(true)
            .open(m.join("f"))
            .expect("open for write");
        writer.write_all(b"UPPER").expect("write");
        drop(writer);
        reader.seek(SeekFrom::Start(0)).expect("seek");
        let mut again = String::new();
        reader.read_to_string(&mut again).expect("read again");
        assert_eq!(
            again, "UPPER data\n",
            "{what}: the open reader sees the write"
        );
    };
    {
        let k = mount_kernel(
            &[lower.root()],
            Some((&scratch.dir("ku"), &scratch.dir("kw"))),
            KERNEL_METACOPY,
        );
        check(k.path(), "kernel");
    }
    let m = mount_ours(
        &[lower.root()],
        Some((&scratch.dir("u"), &scratch.dir("w"))),
        &["metacopy=on", "passthrough=upper"],
    );
    check(m.path(), "ours");
}

/// Without `metacopy=on` a metacopy file is not followed: the kernel answers EPERM (an upper
/// made elsewhere must not reach lower files by redirect), and so do we.
#[test]
fn without_metacopy_a_metacopy_file_is_refused() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("f", "data\n").file("g", "other\n");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["metacopy=on"]);
        std::os::unix::fs::lchown(m.path().join("f"), Some(5), None).expect("chown");
    }
    let errno_of = |root: &Path| {
        fs::read(root.join("f"))
            .expect_err("refused")
            .raw_os_error()
    };
    let kernel = {
        let k = mount_kernel(
            &[lower.root()],
            Some((&u, &scratch.dir("kw"))),
            &["redirect_dir=off", "index=off", "metacopy=off"],
        );
        assert_eq!(fs::read(k.path().join("g")).expect("g"), b"other\n");
        errno_of(k.path())
    };
    assert_eq!(kernel, Some(libc::EPERM));
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    assert_eq!(fs::read(m.path().join("g")).expect("g"), b"other\n");
    assert_eq!(errno_of(m.path()), kernel, "ours as the kernel");
}

/// `metacopy=on` needs redirects (the kernel's rule): an explicit conflicting
/// `redirect_dir=` is refused with one line and nothing mounted.
#[test]
fn metacopy_with_redirects_off_is_refused() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = scratch.dir("l");
    let (u, w, mnt) = (scratch.dir("u"), scratch.dir("w"), scratch.dir("m"));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},metacopy=on,redirect_dir=off",
        lower.display(),
        u.display(),
        w.display()
    );
    // One line naming both options, non-zero exit, nothing mounted.
    common::expect_refused(
        &scratch,
        &[common::os("-o"), common::os(&opts), common::os(&mnt)],
        &mnt,
        &["conflicting options: metacopy=on needs redirect_dir=on, not redirect_dir=off"],
    );
}
