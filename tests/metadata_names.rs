//! Names that look like overlay metadata. The rule (README, "Metadata-looking names"): OCI/AUFS
//! markers (`.wh.NAME`, `.wh..wh..opq`) are metadata in every layer, the upper included, because
//! containers/storage writes them there when it runs a mount program; so no caller may make such
//! a name through the mount (EPERM), and none ever shows in the merged view. A marker found in
//! the upper hides what it names; a new object made over it takes its place. The overlay's own
//! xattrs set by a caller, whiteout devices and directories renamed to marker names forge
//! nothing either.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{PermissionsExt, symlink};
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

fn errno_name(r: &std::io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(c) => format!("{:?}", nix::errno::Errno::from_raw(c)),
            None => e.to_string(),
        },
    }
}

/// What a caller sees of the merged tree: `d` merged with its lower entries, `d/e` and `x` there.
fn assert_nothing_forged(view: &str, root: &Path) {
    assert_eq!(
        names(&root.join("d")),
        ["e", "kept", "mine"],
        "{view}: d became opaque or d/e a whiteout"
    );
    for n in ["d/e", "x", "d/kept"] {
        assert!(
            fs::symlink_metadata(root.join(n)).is_ok(),
            "{view}: {n} became a whiteout"
        );
    }
}

/// Markers forged another way: the overlay's own xattrs set through the mount (stored escaped,
/// as the kernel does, so they read back as set and never mark anything), fuse-overlayfs's
/// opaque xattr (which we honour in layers, so a caller may not set it), a fifo and a directory
/// renamed to marker names. Checked through the mount, after a remount, and with the kernel's
/// overlayfs reading the upper we wrote.
#[test]
fn callers_cannot_forge_markers_with_xattrs() {
    if !common::require_root_and_fuse() {
        return;
    }
    use common::xattr;
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower
        .file("d/kept", "lower kept")
        .file("d/e", "")
        .file("x", "lower x");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
        let p = m.path();
        fs::write(p.join("d/mine"), "mine").expect("create d/mine");
        for (path, name, value) in [
            ("d", "trusted.overlay.opaque", "y"),
            ("d", "trusted.overlay.whiteouts", "y"),
            ("d/e", "trusted.overlay.whiteout", "y"),
            ("x", "trusted.overlay.whiteout", "y"),
        ] {
            xattr::set(&p.join(path), name, value.as_bytes())
                .unwrap_or_else(|e| panic!("setxattr {name} on {path}: {e}"));
            assert_eq!(
                xattr::get(&p.join(path), name).ok().as_deref(),
                Some(value.as_bytes()),
                "{name} on {path} does not read back as set"
            );
        }
        // Honoured in layers, so refused (or at least never a marker, checked below).
        let fo = xattr::set(&p.join("d"), "user.fuseoverlayfs.opaque", b"y");
        eprintln!("setxattr user.fuseoverlayfs.opaque: {}", errno_name(&fo));
        for (what, r) in [
            (
                "mknod fifo .wh.x",
                nix::unistd::mkfifo(
                    &p.join(".wh.x"),
                    nix::sys::stat::Mode::from_bits_truncate(0o644),
                )
                .map_err(std::io::Error::from),
            ),
            (
                "rename a directory to d/.wh..wh..opq",
                fs::create_dir(p.join("dd"))
                    .and_then(|()| fs::rename(p.join("dd"), p.join("d/.wh..wh..opq"))),
            ),
        ] {
            assert_eq!(errno_name(&r), "EPERM", "{what}");
        }
        fs::remove_dir(p.join("dd")).expect("rmdir dd");
        assert_nothing_forged("live mount", p);
    }
    // Raw upper: the caller's names are escaped, no marker of ours or fuse-overlayfs's.
    for (path, name) in [
        ("d", "trusted.overlay.opaque"),
        ("d", "trusted.overlay.whiteouts"),
        ("d", "user.fuseoverlayfs.opaque"),
        ("d/e", "trusted.overlay.whiteout"),
        ("x", "trusted.overlay.whiteout"),
    ] {
        assert!(
            xattr::get(&u.join(path), name).is_err(),
            "the upper's {path} carries a raw {name}"
        );
    }
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    assert_nothing_forged("after a remount", m.path());
    assert_eq!(
        xattr::get(&m.path().join("d"), "trusted.overlay.opaque")
            .ok()
            .as_deref(),
        Some(&b"y"[..]),
        "after a remount the caller's trusted.overlay.opaque on d is lost"
    );
    drop(m);
    let k = common::mount_kernel(
        &[lower.root()],
        Some((&u, &w)),
        &["redirect_dir=off", "index=off", "metacopy=off"],
    );
    assert_nothing_forged("the kernel's overlayfs on our upper", k.path());
}

fn mknod_whiteout(p: &Path) -> std::io::Result<()> {
    nix::sys::stat::mknod(
        p,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        0,
    )
    .map_err(std::io::Error::from)
}

/// A character device 0/0 is a whiteout to every overlay, and Linux lets any caller make one
/// (`vfs_mknod` exempts it from CAP_MKNOD). The kernel's overlayfs refuses it (EPERM) and
/// creates nothing; through our mount it must not land in the upper either, where it would
/// be a whiteout of a name no lower holds (and a deletion in a layer diff).
#[test]
fn callers_cannot_make_whiteout_devices() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("x", "lower x").dir("pub").mode("pub", 0o1777);
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod scratch");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    let p = m.path();
    let mut got = Vec::new();
    got.push(format!(
        "root: mknod w0 c 0 0: {}",
        errno_name(&mknod_whiteout(&p.join("w0")))
    ));
    fs::remove_file(p.join("x")).expect("unlink x");
    got.push(format!(
        "root: mknod x c 0 0 over a removed lower file: {}",
        errno_name(&mknod_whiteout(&p.join("x")))
    ));
    // As uid 65534, in a sticky world-writable directory.
    let out = common::run(
        "setpriv",
        &[
            "--reuid=65534".as_ref(),
            "--regid=65534".as_ref(),
            "--clear-groups".as_ref(),
            "mknod".as_ref(),
            p.join("pub/nob").as_os_str(),
            "c".as_ref(),
            "0".as_ref(),
            "0".as_ref(),
        ],
    );
    got.push(format!(
        "uid 65534: mknod pub/nob c 0 0: {}",
        if out.status.success() {
            "ok".to_string()
        } else {
            String::from_utf8_lossy(&out.stderr).trim().to_string()
        }
    ));
    drop(m);
    let devices: Vec<String> = ["w0", "pub/nob"]
        .iter()
        .filter(|n| fs::symlink_metadata(u.join(n)).is_ok())
        .map(|n| format!("{n} is in the upper"))
        .collect();
    assert!(
        got[0].ends_with("EPERM")
            && got[1].ends_with("EPERM")
            && got[2].ends_with("Operation not permitted")
            && devices.is_empty(),
        "want EPERM and nothing made, as the kernel's overlayfs: {got:#?} {devices:?}"
    );
}
