//! Hostile input in the layers, each case compared with the kernel's overlayfs on identical
//! copies (the kernel's answer is the reference):
//!
//! - symlinks in every layer that point out of it (absolute, `../` chains that escape the layer
//!   but not the caller's view, loops, through /proc) and layer directories that are symlinks
//!   to outside directories: the daemon never follows them (lookup, copy-up, rename, xattrs,
//!   readdir); a caller who follows one gets what the kernel's path walk gives; metadata
//!   changes on the names copy up symlinks with the same target and leave the outside alone;
//! - hard links, fifos, sockets and device nodes in the lowers: stat, and in use (a written
//!   hard link, a fifo carrying data, a device node read and written, each copied up);
//! - names of 255 bytes (fine) and 256 (ENAMETOOLONG), names with arbitrary bytes;
//! - a tree deeper than PATH_MAX, walked and written with fd-relative calls;
//! - a directory of 200,000 entries merged from two layers;
//! - a file with 100 xattrs and a 60 KiB value, through copy-up;
//! - a lower modified and upper entries removed behind a live mount's back: every request is
//!   answered (ours only; the kernel's results are printed), the daemon survives, the rest of
//!   the mount works, the unmount is clean and a remount shows a consistent tree; a create
//!   whose new upper inode reuses the number of an object removed behind our back succeeds.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, fstatat, mkdirat, mknodat, utimensat};
use nix::sys::time::TimeSpec;

use common::mounts::{DaemonExit, KernelMount, mount_ours_at};
use common::prng::fnv1a;
use common::{Layer, Scratch, TmpfsMount, mount_kernel, mount_ours, require_root_and_fuse, xattr};

const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];
const OLD: i64 = 1_000_000_000;

fn ename(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(c) => format!("{:?}", Errno::from_raw(c)),
        None => format!("{e}"),
    }
}

fn show<T: std::fmt::Display>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => v.to_string(),
        Err(e) => ename(&e),
    }
}

fn nix_io<T>(r: nix::Result<T>) -> std::io::Result<T> {
    r.map_err(std::io::Error::from)
}

fn kind(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "file",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "symlink",
        libc::S_IFIFO => "fifo",
        libc::S_IFSOCK => "socket",
        libc::S_IFCHR => "chardev",
        libc::S_IFBLK => "blockdev",
        _ => "?",
    }
}

fn bytes_of(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned()
}

/// Mounts ours or the kernel's overlay (kernel: the options that match ours) and runs `f` on
/// the mount root; both are unmounted before returning, ours checked for a clean exit.
fn with_mount<T>(
    kernel: bool,
    target: Option<&Path>,
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    f: impl FnOnce(&Path) -> T,
) -> T {
    if kernel {
        let m = match target {
            Some(t) => KernelMount::try_mount(Some(t), lowers, upper_work, KERNEL_OPTS)
                .unwrap_or_else(|e| panic!("{e}")),
            None => mount_kernel(lowers, upper_work, KERNEL_OPTS),
        };
        let out = f(m.path());
        assert!(m.unmount(), "kernel overlay unmount failed");
        out
    } else {
        let m = match target {
            Some(t) => mount_ours_at(t, lowers, upper_work, &[]),
            None => mount_ours(lowers, upper_work, &[]),
        };
        let out = f(m.path());
        let ended = m.unmount();
        assert_eq!(
            ended.daemon,
            DaemonExit::Exited(0),
            "our daemon did not exit 0: {ended:?}"
        );
        out
    }
}

/// Line-by-line comparison of the kernel's results with ours.
fn assert_same(what: &str, kernel: &[String], ours: &[String]) {
    let mut diffs = Vec::new();
    for i in 0..kernel.len().max(ours.len()) {
        let (k, o) = (kernel.get(i), ours.get(i));
        if k != o {
            diffs.push(format!("  kernel: {k:?}\n  ours:   {o:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences from the kernel:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Symlinks out of the layers.

/// One side of the differential: its own outside objects, layers and mountpoint.
struct Side {
    base: PathBuf,
    l0: Layer,
    l1: Layer,
    upper: PathBuf,
    work: PathBuf,
    target: PathBuf,
}

/// Symlink names of the merged root and where they point (`{B}` is the side's base).
const LINKS_L1: &[(&str, &str)] = &[
    ("abs_secret", "{B}/out/secret"),
    ("abs_dir", "{B}/out/dir"),
    // From the layer, `../..` is the scratch root (and its global secret); from the caller's
    // mountpoint `{B}/mp/m` it is `{B}`, where no secret lives.
    ("rel_escape", "../../secret"),
    // From the layer: the global decoy directory; from the caller: the side's outside dir.
    ("rel_dir", "../../out/dir"),
    (
        "chain",
        "../../../../../../../../../../../../../../etc/hostname",
    ),
    ("loop_a", "loop_b"),
    ("loop_b", "loop_a"),
    ("self", "self"),
    ("proc_root", "/proc/self/root{B}/out/secret"),
    ("proc_dir", "/proc/self/root{B}/out/dir"),
    ("dangling", "/nonexistent/x"),
    ("sub/deep_escape", "../../../secret"),
    ("d", "{B}/out/dir"),
    ("m1", "{B}/out/dir"),
    ("m3", "{B}/out/dir"),
    ("lnk_meta", "{B}/out/secret"),
    ("lnk_rename", "{B}/out/secret"),
    ("lnk_unlink", "{B}/out/secret"),
    ("lnk_follow", "{B}/out/secret"),
];
const LINKS_L0: &[(&str, &str)] = &[
    ("m2", "{B}/out/dir"),
    ("l0_abs", "{B}/out/secret"),
    ("l0_rel", "../../secret"),
];
const LINKS_UPPER: &[(&str, &str)] = &[("up_abs", "{B}/out/secret"), ("up_rel", "../../secret")];

fn target_of(t: &str, base: &Path) -> String {
    t.replace("{B}", &bytes_of(base))
}

fn build_side(scratch: &Scratch, tag: &str) -> Side {
    let base = scratch.dir(tag);
    let out = Layer::new(base.join("out"));
    out.file("secret", b"SIDE SECRET\n")
        .mode("secret", 0o640)
        .xattr("secret", "user.mark", b"orig")
        .file("dir/inner", b"SIDE INNER\n")
        .set_all_times((OLD, 0));
    let l0 = Layer::new(base.join("l0"));
    let l1 = Layer::new(base.join("l1"));
    let upper = base.join("u");
    let up = Layer::new(&upper);
    for (name, t) in LINKS_L1 {
        l1.symlink(name, &target_of(t, &base));
    }
    l1.file("m2/x", b"l1 m2/x\n")
        .file("plain", b"plain\n")
        .file("sub2/f", b"sub2\n");
    for (name, t) in LINKS_L0 {
        l0.symlink(name, &target_of(t, &base));
    }
    l0.file("m1/top_l0", b"l0 m1/top_l0\n");
    for (name, t) in LINKS_UPPER {
        up.symlink(name, &target_of(t, &base));
    }
    up.file("m3/up", b"upper m3/up\n");
    let work = base.join("w");
    std::fs::create_dir_all(&work).unwrap();
    let target = base.join("mp/m");
    std::fs::create_dir_all(&target).unwrap();
    Side {
        base,
        l0,
        l1,
        upper,
        work,
        target,
    }
}

fn lstat_line(p: &Path) -> String {
    match std::fs::symlink_metadata(p) {
        Ok(m) => {
            let mut s = format!(
                "{} uid {} gid {} mtime {}",
                kind(m.mode()),
                m.uid(),
                m.gid(),
                if m.mtime() < OLD + 10 { m.mtime() } else { -1 }
            );
            if m.file_type().is_symlink() {
                s.push_str(&format!(" size {}", m.len()));
            }
            s
        }
        Err(e) => ename(&e),
    }
}

fn first_line(c: &[u8]) -> String {
    String::from_utf8_lossy(c.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned()
}

fn list(p: &Path) -> std::io::Result<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    v.sort();
    Ok(v.join(","))
}

fn list_typed(p: &Path) -> std::io::Result<String> {
    let mut v: Vec<String> = Vec::new();
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let ft = e.file_type()?;
        let t = if ft.is_symlink() {
            "symlink"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "chardev"
        } else if ft.is_block_device() {
            "blockdev"
        } else {
            "?"
        };
        v.push(format!("{}:{t}", e.file_name().to_string_lossy()));
    }
    v.sort();
    Ok(v.join(","))
}

fn xattr_names(p: &Path) -> std::io::Result<String> {
    let mut v: Vec<String> = xattr::list(p)?
        .into_iter()
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .collect();
    v.sort();
    Ok(v.join(","))
}

/// What a caller sees of one name: the link itself, and what following it gives.
fn probe(r: &Path, n: &str) -> Vec<String> {
    let p = r.join(n);
    vec![
        format!("{n}: lstat {}", lstat_line(&p)),
        format!(
            "{n}: readlink {}",
            show(std::fs::read_link(&p).map(|t| bytes_of(&t)))
        ),
        format!(
            "{n}: stat {}",
            show(std::fs::metadata(&p).map(|m| kind(m.mode())))
        ),
        format!(
            "{n}: read {}",
            show(std::fs::read(&p).map(|c| first_line(&c)))
        ),
        format!("{n}: list {}", show(list(&p))),
        format!("{n}: llistxattr {}", show(xattr_names(&p))),
    ]
}

const PROBED: &[&str] = &[
    "abs_secret",
    "abs_dir",
    "rel_escape",
    "rel_dir",
    "chain",
    "loop_a",
    "self",
    "proc_root",
    "proc_dir",
    "dangling",
    "sub/deep_escape",
    "d",
    "m1",
    "m2",
    "m3",
    "l0_abs",
    "l0_rel",
    "up_abs",
    "up_rel",
];

fn symlink_steps(r: &Path) -> Vec<String> {
    let mut out = vec![format!("root: {}", show(list_typed(r)))];
    for n in PROBED {
        out.extend(probe(r, n));
    }
    // Writes through symlinked directories: the caller's walk follows them.
    for (via, name) in [
        ("abs_dir", "via_abs"),
        ("rel_dir", "via_rel"),
        ("d", "via_d"),
        ("m2", "via_m2"),
        ("m1", "via_m1"),
    ] {
        let p = r.join(via).join(name);
        out.push(format!(
            "write {via}/{name}: {}",
            show(std::fs::write(&p, format!("written via {via}\n")).map(|()| "ok"))
        ));
    }
    // Metadata changes on the names themselves copy the symlinks up.
    let p = r.join("lnk_meta");
    out.push(format!(
        "lchown lnk_meta: {}",
        show(std::os::unix::fs::lchown(&p, Some(1234), Some(1234)).map(|()| "ok"))
    ));
    out.push(format!(
        "lutimes lnk_meta: {}",
        show(
            nix_io(utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &TimeSpec::new(OLD + 5, 0),
                &TimeSpec::new(OLD + 5, 0),
                UtimensatFlags::NoFollowSymlink,
            ))
            .map(|()| "ok")
        )
    ));
    out.push(format!(
        "lsetxattr trusted.test lnk_meta: {}",
        show(xattr::set(&p, "trusted.test", b"1").map(|()| "ok"))
    ));
    out.push(format!(
        "lsetxattr user.test lnk_meta: {}",
        show(xattr::set(&p, "user.test", b"1").map(|()| "ok"))
    ));
    out.push(format!(
        "lchmod lnk_meta: {}",
        show(
            nix_io(nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                &p,
                Mode::from_bits_truncate(0o600),
                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
            ))
            .map(|()| "ok")
        )
    ));
    out.push(format!(
        "lgetxattr trusted.test lnk_meta: {}",
        show(xattr::get(&p, "trusted.test").map(|v| String::from_utf8_lossy(&v).into_owned()))
    ));
    for n in ["rel_escape", "rel_dir", "l0_rel", "proc_dir"] {
        out.push(format!(
            "lchown {n}: {}",
            show(std::os::unix::fs::lchown(r.join(n), Some(99), Some(99)).map(|()| "ok"))
        ));
    }
    for n in ["up_abs", "l0_abs", "d"] {
        out.push(format!(
            "lsetxattr trusted.test {n}: {}",
            show(xattr::set(&r.join(n), "trusted.test", b"2").map(|()| "ok"))
        ));
    }
    // Renames and unlinks of the names.
    for (from, to) in [
        ("lnk_rename", "lnk_renamed"),
        ("d", "d_renamed"),
        ("sub/deep_escape", "sub2/moved_escape"),
        ("up_rel", "sub/up_rel_moved"),
    ] {
        out.push(format!(
            "rename {from} {to}: {}",
            show(std::fs::rename(r.join(from), r.join(to)).map(|()| "ok"))
        ));
    }
    for n in ["lnk_unlink", "m2", "loop_b"] {
        out.push(format!(
            "unlink {n}: {}",
            show(std::fs::remove_file(r.join(n)).map(|()| "ok"))
        ));
    }
    // chmod(2) follows: it changes the outside file, for the kernel too.
    out.push(format!(
        "chmod (following) lnk_follow: {}",
        show(
            std::fs::set_permissions(r.join("lnk_follow"), std::fs::Permissions::from_mode(0o600))
                .map(|()| "ok")
        )
    ));
    out.push(format!("root after: {}", show(list_typed(r))));
    for n in [
        "lnk_meta",
        "lnk_renamed",
        "d_renamed",
        "sub2/moved_escape",
        "sub/up_rel_moved",
        "rel_escape",
        "rel_dir",
        "l0_rel",
        "up_abs",
        "lnk_follow",
    ] {
        out.extend(probe(r, n));
    }
    out
}

/// Every object under `root` with the fields a change would show; times after `since` are
/// shown as "recent".
fn snapshot(root: &Path, since: i64) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((p, rel)) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let content = if m.is_file() {
            format!("#{:016x}", fnv1a(&std::fs::read(&p).unwrap_or_default()))
        } else if m.file_type().is_symlink() {
            format!("-> {}", bytes_of(&std::fs::read_link(&p).unwrap()))
        } else {
            String::new()
        };
        let mtime = if m.mtime() >= since {
            "recent".to_string()
        } else {
            m.mtime().to_string()
        };
        let xa: Vec<String> = xattr::list(&p)
            .unwrap_or_default()
            .iter()
            .map(|n| {
                let n = String::from_utf8_lossy(n).into_owned();
                let v = xattr::get(&p, &n).unwrap_or_default();
                format!("{n}={}", String::from_utf8_lossy(&v))
            })
            .collect();
        out.insert(
            rel.clone(),
            format!(
                "{} mode {:o} uid {} gid {} mtime {mtime} {content} xattrs {xa:?}",
                kind(m.mode()),
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ),
        );
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                stack.push((e.path(), format!("{rel}/{name}")));
            }
        }
    }
    out
}

fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let keys: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| format!("{k}: {:?} -> {:?}", before.get(k), after.get(k)))
        .collect()
}

/// The upper as names, types and symlink targets (not the overlay's private xattrs, whose
/// values differ between the kernel's run and ours).
fn upper_listing(upper: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(upper.to_path_buf(), String::new())];
    while let Some((p, rel)) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let r = format!("{rel}/{}", e.file_name().to_string_lossy());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let what = if m.file_type().is_symlink() {
                format!(
                    "symlink -> {} uid {}",
                    bytes_of(&std::fs::read_link(e.path()).unwrap()),
                    m.uid()
                )
            } else if m.file_type().is_char_device() && m.rdev() == 0 {
                "whiteout".to_string()
            } else {
                kind(m.mode()).to_string()
            };
            out.push(format!("{r}: {what}"));
            if m.is_dir() {
                stack.push((e.path(), r));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn symlinks_pointing_out_of_the_layers() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    // Global decoys: what a daemon that followed a layer-relative `../..` would reach.
    scratch.file("secret", b"GLOBAL SECRET\n");
    scratch.file("out/dir/inner", b"GLOBAL DECOY\n");
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - 1;
    let global_before = snapshot(scratch.path(), since);

    let run = |kernel: bool| {
        let s = build_side(&scratch, if kernel { "k" } else { "o" });
        let out_before = snapshot(&s.base.join("out"), since);
        let steps = with_mount(
            kernel,
            Some(&s.target),
            &[s.l0.root(), s.l1.root()],
            Some((&s.upper, &s.work)),
            symlink_steps,
        );
        let out_changes = diff(&out_before, &snapshot(&s.base.join("out"), since));
        let base = bytes_of(&s.base);
        let norm = |v: Vec<String>| -> Vec<String> {
            v.into_iter().map(|l| l.replace(&base, "<B>")).collect()
        };
        (norm(steps), out_changes, norm(upper_listing(&s.upper)), s)
    };
    let (k_steps, k_out, k_upper, _ks) = run(true);
    let (o_steps, o_out, o_upper, _os) = run(false);

    eprintln!(
        "symlinks: {} results compared with the kernel; changes outside (ours): {o_out:#?}",
        o_steps.len()
    );
    if std::env::var_os("RSFS_HOSTILE_VERBOSE").is_some() {
        eprintln!("{}", o_steps.join("\n"));
    }
    // Nothing of the global decoys was seen or touched by anyone.
    let leaks: Vec<&String> = o_steps.iter().filter(|l| l.contains("GLOBAL")).collect();
    assert!(
        leaks.is_empty(),
        "our daemon followed a layer symlink: {leaks:?}"
    );
    let global_after = snapshot(scratch.path(), since);
    for key in ["/secret", "/out", "/out/dir", "/out/dir/inner"] {
        assert_eq!(
            global_before.get(key),
            global_after.get(key),
            "{key} outside every layer changed"
        );
    }
    // Directories that are symlinks in a layer list as symlinks, and a merge stops at them.
    for want in [
        "d:symlink",
        "m1:dir",
        "m2:symlink",
        "m3:dir",
        "abs_dir:symlink",
        "rel_dir:symlink",
    ] {
        let root_line = &o_steps[0];
        assert!(
            root_line
                .split(',')
                .any(|e| e.ends_with(want) && e.contains(want)),
            "the merged root lists no {want}: {root_line}"
        );
    }
    assert!(
        o_steps.contains(&"m1: list top_l0".to_string())
            && o_steps.contains(&"m3: list up".to_string()),
        "a directory over a lower symlink merged the outside directory in"
    );
    assert_same("symlinks out of the layers: results", &k_steps, &o_steps);
    assert_same(
        "symlinks out of the layers: changes outside",
        &k_out,
        &o_out,
    );
    // What changed outside is only what callers asked for through followed links.
    for c in &o_out {
        assert!(
            c.starts_with("/dir") || c.starts_with("/secret:"),
            "unexpected change outside: {c}"
        );
        if c.starts_with("/secret:") {
            let strip = |s: &str| s.replace("mode 600", "mode 640");
            let (a, b) = c.split_once(" -> ").unwrap();
            assert_eq!(
                strip(a).split_once(": ").unwrap().1,
                strip(b),
                "the outside secret changed beyond the followed chmod: {c}"
            );
        }
    }
    // Copied-up links are symlinks with their original targets.
    for (name, target) in [
        ("/lnk_meta", "<B>/out/secret"),
        ("/lnk_renamed", "<B>/out/secret"),
        ("/d_renamed", "<B>/out/dir"),
        ("/sub2/moved_escape", "../../../secret"),
        ("/rel_escape", "../../secret"),
        ("/rel_dir", "../../out/dir"),
        ("/l0_rel", "../../secret"),
    ] {
        assert!(
            o_upper
                .iter()
                .any(|l| l.starts_with(&format!("{name}: symlink -> {target} "))),
            "upper {name} is not a symlink to {target}: {o_upper:?}"
        );
    }
    assert_same("symlinks out of the layers: uppers", &k_upper, &o_upper);
}

// ---------------------------------------------------------------------------------------------
// Hard links, fifos, sockets, devices.

fn special_steps(r: &Path) -> Vec<String> {
    let mut out = vec![format!("root: {}", show(list_typed(r)))];
    let mut inos = BTreeMap::new();
    for n in [
        "h1", "h2", "sub/h3", "fifo", "sock", "null", "loop0", "plain",
    ] {
        match std::fs::symlink_metadata(r.join(n)) {
            Ok(m) => {
                inos.insert(n, m.ino());
                out.push(format!(
                    "{n}: {} mode {:o} nlink {} rdev {}:{} size {}",
                    kind(m.mode()),
                    m.mode() & 0o7777,
                    m.nlink(),
                    nix::sys::stat::major(m.rdev()),
                    nix::sys::stat::minor(m.rdev()),
                    m.len()
                ));
            }
            Err(e) => out.push(format!("{n}: {}", ename(&e))),
        }
    }
    out.push(format!(
        "hard links share st_ino: {}",
        inos.get("h1") == inos.get("h2") && inos.get("h1") == inos.get("sub/h3")
    ));
    out.push(format!(
        "distinct objects have distinct st_ino: {}",
        inos.values().collect::<BTreeSet<_>>().len() == inos.len() - 2
    ));
    out
}

#[test]
fn special_files_in_the_lowers() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let run = |kernel: bool| {
        let base = scratch.dir(if kernel { "k" } else { "o" });
        let l = Layer::new(base.join("l"));
        l.file("h1", b"linked\n")
            .hardlink("h1", "h2")
            .hardlink("h1", "sub/h3")
            .fifo("fifo")
            .chardev("null", 1, 3)
            .file("plain", b"p");
        mknodat(
            nix::fcntl::AT_FDCWD,
            &l.path("loop0"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            nix::sys::stat::makedev(7, 0),
        )
        .expect("mknod block device");
        let sock = std::os::unix::net::UnixListener::bind(l.path("sock")).expect("bind socket");
        drop(sock);
        let (u, w) = (base.join("u"), base.join("w"));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        with_mount(kernel, None, &[l.root()], Some((&u, &w)), special_steps)
    };
    let k = run(true);
    let o = run(false);
    eprintln!("special files (ours): {o:#?}");
    assert_same("special files", &k, &o);
}

// ---------------------------------------------------------------------------------------------
// Long and odd names.

fn odd_names() -> Vec<Vec<u8>> {
    vec![
        vec![b'a'; 255],
        b"new\nline".to_vec(),
        b"back\\slash".to_vec(),
        b"\xff\xfe\x80 not utf-8".to_vec(),
        b"tab\there".to_vec(),
        b" lead and trail ".to_vec(),
        b"colon:comma,equals=".to_vec(),
        b"-dash".to_vec(),
        b"\x01\x1f control".to_vec(),
        "é ü 日本".as_bytes().to_vec(),
    ]
}

fn name_steps(r: &Path) -> Vec<String> {
    let p = |n: &[u8]| r.join(OsStr::from_bytes(n));
    let mut out = Vec::new();
    let mut listed: Vec<Vec<u8>> = std::fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_vec())
        .collect();
    listed.sort();
    out.push(format!("listing: {listed:?}"));
    for n in odd_names() {
        out.push(format!(
            "{:?}: lstat {} read {}",
            String::from_utf8_lossy(&n),
            lstat_line(&p(&n)),
            show(std::fs::read(p(&n)).map(|c| first_line(&c)))
        ));
    }
    let n255 = vec![b'b'; 255];
    let n256 = vec![b'c'; 256];
    let mut steps: Vec<(String, std::io::Result<()>)> = vec![
        ("create 255".into(), std::fs::write(p(&n255), b"x")),
        ("create 256".into(), std::fs::write(p(&n256), b"x")),
        ("create 252".into(), std::fs::write(p(&[b'e'; 252]), b"x")),
        ("create 251".into(), std::fs::write(p(&[b'f'; 251]), b"x")),
        ("mkdir 255".into(), std::fs::create_dir(p(&[b'd'; 255]))),
        (
            "symlink 255".into(),
            std::os::unix::fs::symlink("t", p(&[b's'; 255])),
        ),
        (
            "link 255".into(),
            std::fs::hard_link(p(b"-dash"), p(&[b'h'; 255])),
        ),
        ("mkdir 256".into(), std::fs::create_dir(p(&n256))),
        ("stat 256".into(), std::fs::metadata(p(&n256)).map(drop)),
        (
            "symlink 256".into(),
            std::os::unix::fs::symlink("t", p(&n256)),
        ),
        (
            "rename 255 -> 256".into(),
            std::fs::rename(p(&n255), p(&n256)),
        ),
        (
            "rename lower 255 -> other 255".into(),
            std::fs::rename(p(&[b'a'; 255]), p(&[b'z'; 255])),
        ),
        (
            "create non-utf-8".into(),
            std::fs::write(p(b"\xc3\x28 new"), b"n"),
        ),
        ("create newline".into(), std::fs::write(p(b"nl\nnew"), b"n")),
        (
            "mkdir backslash".into(),
            std::fs::create_dir(p(b"dir\\with\\backslashes")),
        ),
        (
            "unlink lower non-utf-8".into(),
            std::fs::remove_file(p(b"\xff\xfe\x80 not utf-8")),
        ),
        (
            "unlink lower newline".into(),
            std::fs::remove_file(p(b"new\nline")),
        ),
        (
            "chmod lower control".into(),
            std::fs::set_permissions(
                p(b"\x01\x1f control"),
                std::fs::Permissions::from_mode(0o600),
            ),
        ),
    ];
    for (what, r) in steps.drain(..) {
        out.push(format!("{what}: {}", show(r.map(|()| "ok"))));
    }
    let mut listed: Vec<Vec<u8>> = std::fs::read_dir(r)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_vec())
        .collect();
    listed.sort();
    out.push(format!("listing after: {listed:?}"));
    out
}

fn upper_names(upper: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(upper)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let t = if m.file_type().is_char_device() && m.rdev() == 0 {
                "whiteout"
            } else {
                kind(m.mode())
            };
            format!("{:?}: {t}", e.file_name())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn long_and_odd_names() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let run = |kernel: bool| {
        let base = scratch.dir(if kernel { "k" } else { "o" });
        let l = Layer::new(base.join("l"));
        for n in odd_names() {
            std::fs::write(l.root().join(OsStr::from_bytes(&n)), &n).unwrap();
        }
        let (u, w) = (base.join("u"), base.join("w"));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        let steps = with_mount(kernel, None, &[l.root()], Some((&u, &w)), name_steps);
        (steps, upper_names(&u))
    };
    let (k, ku) = run(true);
    let (o, ou) = run(false);
    assert_same("odd names", &k, &o);
    let enametoolong = o
        .iter()
        .filter(|l| l.contains(" 256") && l.ends_with("ENAMETOOLONG"))
        .count();
    assert_eq!(
        enametoolong, 5,
        "256-byte names must fail ENAMETOOLONG: {o:#?}"
    );
    assert!(o.contains(&"create 255: ok".to_string()), "{o:#?}");
    assert_same("odd names: uppers", &ku, &ou);
}

// ---------------------------------------------------------------------------------------------
// A tree deeper than PATH_MAX.

const DEPTH: usize = 220;

fn level_name(i: usize) -> String {
    format!("level_{i:03}_xxxxxxxxxx")
}

fn open_dir_at(dir: &OwnedFd, name: &str) -> std::io::Result<OwnedFd> {
    nix_io(openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ))
}

fn open_root(p: &Path) -> OwnedFd {
    nix::fcntl::open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Walks down `DEPTH` levels from `root` one component at a time.
fn descend(root: &Path) -> std::io::Result<OwnedFd> {
    let mut fd = open_root(root);
    for i in 0..DEPTH {
        fd = open_dir_at(&fd, &level_name(i))?;
    }
    Ok(fd)
}

fn deep_steps(r: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut long = r.to_path_buf();
    for i in 0..DEPTH {
        long.push(level_name(i));
    }
    out.push(format!(
        "stat by a {}-byte path: {}",
        long.as_os_str().len(),
        show(std::fs::metadata(long.join("leaf")).map(|_| "ok"))
    ));
    let bottom = match descend(r) {
        Ok(fd) => fd,
        Err(e) => {
            out.push(format!("walk down: {}", ename(&e)));
            return out;
        }
    };
    out.push("walk down: ok".into());
    let leaf = nix_io(openat(
        bottom.as_fd(),
        "leaf",
        OFlag::O_RDONLY,
        Mode::empty(),
    ))
    .map(std::fs::File::from)
    .and_then(|mut f| {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s)?;
        Ok(s)
    });
    out.push(format!("read the leaf: {}", show(leaf)));
    let created = nix_io(openat(
        bottom.as_fd(),
        "new",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_EXCL,
        Mode::from_bits_truncate(0o644),
    ))
    .map(std::fs::File::from)
    .and_then(|mut f| std::io::Write::write_all(&mut f, b"at the bottom"));
    out.push(format!(
        "create at the bottom: {}",
        show(created.map(|()| "ok"))
    ));
    out.push(format!(
        "stat it: {}",
        show(
            nix_io(fstatat(bottom.as_fd(), "new", AtFlags::AT_SYMLINK_NOFOLLOW)).map(|s| s.st_size)
        )
    ));
    out
}

#[test]
fn a_tree_deeper_than_path_max() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let run = |kernel: bool| {
        let base = scratch.dir(if kernel { "k" } else { "o" });
        let l = Layer::new(base.join("l"));
        let mut fd = open_root(l.root());
        for i in 0..DEPTH {
            mkdirat(
                fd.as_fd(),
                level_name(i).as_str(),
                Mode::from_bits_truncate(0o755),
            )
            .expect("mkdirat");
            fd = open_dir_at(&fd, &level_name(i)).expect("openat");
        }
        let leaf = openat(
            fd.as_fd(),
            "leaf",
            OFlag::O_CREAT | OFlag::O_WRONLY,
            Mode::from_bits_truncate(0o644),
        )
        .expect("create leaf");
        std::io::Write::write_all(&mut std::fs::File::from(leaf), b"the deep leaf").unwrap();
        let (u, w) = (base.join("u"), base.join("w"));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        let steps = with_mount(kernel, None, &[l.root()], Some((&u, &w)), deep_steps);
        // The new file landed at the bottom of the upper.
        let in_upper = descend(&u).and_then(|fd| {
            let f = nix_io(openat(fd.as_fd(), "new", OFlag::O_RDONLY, Mode::empty()))?;
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(f), &mut s)?;
            Ok(s)
        });
        (steps, show(in_upper))
    };
    let (k, ku) = run(true);
    let (o, ou) = run(false);
    eprintln!("deep tree ({DEPTH} levels): {o:#?}; upper: {ou}");
    assert_eq!(
        ou, "at the bottom",
        "the file made at the bottom is not in our upper"
    );
    assert_same("deep tree", &k, &o);
    assert_eq!(ku, ou);
}

// ---------------------------------------------------------------------------------------------
// 200,000 entries in one merged directory.

const L1_ENTRIES: std::ops::Range<usize> = 0..120_000;
const L0_ENTRIES: std::ops::Range<usize> = 100_000..200_000;

fn entry_name(i: usize) -> String {
    format!("e{i:06}")
}

fn fill(dir: &Path, range: std::ops::Range<usize>) {
    std::fs::create_dir_all(dir).unwrap();
    let fd = open_root(dir);
    for i in range {
        mknodat(
            fd.as_fd(),
            entry_name(i).as_str(),
            SFlag::S_IFREG,
            Mode::from_bits_truncate(0o644),
            0,
        )
        .expect("mknodat");
    }
}

/// Lists `dir`: the number of entries, and the names that were listed twice or are not
/// `e000000..e199999`.
fn count_listing(dir: &Path) -> (usize, Vec<String>) {
    let mut seen = vec![false; 200_000];
    let mut n = 0;
    let mut odd = Vec::new();
    for e in std::fs::read_dir(dir).expect("readdir") {
        let name = e.expect("readdir entry").file_name();
        n += 1;
        let s = name.to_string_lossy();
        match s.strip_prefix('e').and_then(|d| d.parse::<usize>().ok()) {
            Some(i) if i < seen.len() && !seen[i] => seen[i] = true,
            _ => {
                if odd.len() < 10 {
                    odd.push(s.into_owned());
                }
            }
        }
    }
    (n, odd)
}

#[test]
fn a_directory_of_200000_entries() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    // On a tmpfs: creating 220,000 files on the shared disk takes minutes on a busy machine.
    let t = TmpfsMount::new(&scratch.join("t"));
    let t0 = Instant::now();
    let l0 = Layer::new(t.path().join("l0"));
    let l1 = Layer::new(t.path().join("l1"));
    fill(&l1.path("big"), L1_ENTRIES);
    fill(&l0.path("big"), L0_ENTRIES);
    eprintln!("200k: layers built in {:?}", t0.elapsed());
    let lowers = [l0.root(), l1.root()];
    let t = Instant::now();
    let (k, k_odd) = with_mount(true, None, &lowers, None, |r| count_listing(&r.join("big")));
    let kt = t.elapsed();
    let t = Instant::now();
    let (o, o_odd) = with_mount(false, None, &lowers, None, |r| {
        let listing = count_listing(&r.join("big"));
        let spot: Vec<String> = [0, 99_999, 100_000, 119_999, 120_000, 199_999]
            .iter()
            .map(|i| show(std::fs::metadata(r.join("big").join(entry_name(*i))).map(|_| "ok")))
            .collect();
        assert!(spot.iter().all(|s| s == "ok"), "stat of entries: {spot:?}");
        listing
    });
    let ot = t.elapsed();
    eprintln!("200k: kernel lists {k} in {kt:?}, ours {o} in {ot:?}");
    assert!(
        k_odd.is_empty() && o_odd.is_empty(),
        "duplicates or strangers: kernel {k_odd:?}, ours {o_odd:?}"
    );
    assert_eq!(k, 200_000, "the kernel's count");
    assert_eq!(o, 200_000, "our listing of 200,000 merged entries");
    assert!(
        ot < Duration::from_secs(60),
        "listing 200,000 entries took {ot:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Many and large xattrs.

fn xattr_dump(p: &Path) -> Vec<String> {
    let mut names = match xattr::list(p) {
        Ok(n) => n,
        Err(e) => return vec![format!("listxattr: {}", ename(&e))],
    };
    names.retain(|n| n.starts_with(b"user."));
    names.sort();
    names
        .iter()
        .map(|n| match xattr::get_bytes(p, n) {
            Ok(v) => format!(
                "{} = {} bytes #{:016x}",
                String::from_utf8_lossy(n),
                v.len(),
                fnv1a(&v)
            ),
            Err(e) => format!("{}: {}", String::from_utf8_lossy(n), ename(&e)),
        })
        .collect()
}

#[test]
fn many_and_large_xattrs_survive_copy_up() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    // ext4 without ea_inode holds no 60 KiB value: the layers live on a tmpfs.
    let t = TmpfsMount::new(&scratch.join("t"));
    let big: Vec<u8> = (0..60 * 1024).map(|i| (i % 253) as u8).collect();
    let run = |kernel: bool| {
        let base = t.path().join(if kernel { "k" } else { "o" });
        let l = Layer::new(base.join("l"));
        l.file("xf", b"file with xattrs\n").dir("xd");
        for i in 0..100 {
            l.xattr("xf", &format!("user.a{i:03}"), format!("value {i}"));
        }
        l.xattr("xf", "user.big", &big);
        l.xattr("xd", "user.big", &big);
        let (u, w) = (base.join("u"), base.join("w"));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        let want = xattr_dump(&l.path("xf"));
        assert_eq!(want.len(), 101, "the lower file holds {want:?}");
        let steps = with_mount(kernel, None, &[l.root()], Some((&u, &w)), |r| {
            let mut out = Vec::new();
            out.push(format!(
                "before copy-up equals the lower's: {}",
                xattr_dump(&r.join("xf")) == want
            ));
            out.extend(xattr_dump(&r.join("xf")));
            out.extend(xattr_dump(&r.join("xd")));
            let size = xattr::get(&r.join("xf"), "user.big").map(|v| v.len());
            out.push(format!("getxattr user.big: {}", show(size)));
            out.push(format!(
                "copy up xf (chmod): {}",
                show(
                    std::fs::set_permissions(r.join("xf"), std::fs::Permissions::from_mode(0o600))
                        .map(|()| "ok")
                )
            ));
            out.push(format!(
                "copy up xd (touch a file in it): {}",
                show(std::fs::write(r.join("xd/f"), b"f").map(|()| "ok"))
            ));
            out.push(format!(
                "after copy-up equals the lower's: {}",
                xattr_dump(&r.join("xf")) == want
            ));
            out.extend(xattr_dump(&r.join("xf")));
            out.extend(xattr_dump(&r.join("xd")));
            out
        });
        let in_upper = xattr_dump(&u.join("xf")) == want;
        let dir_upper = xattr_dump(&u.join("xd"));
        (steps, in_upper, dir_upper)
    };
    let (k, k_up, k_dir) = run(true);
    let (o, o_up, o_dir) = run(false);
    assert!(k_up, "the kernel's copy-up lost xattrs (test assumption)");
    assert!(
        o_up,
        "our upper copy of xf does not carry the lower's 101 user xattrs"
    );
    assert!(
        o.contains(&"before copy-up equals the lower's: true".to_string())
            && o.contains(&"after copy-up equals the lower's: true".to_string()),
        "{o:#?}"
    );
    assert_same("xattrs", &k, &o);
    assert_eq!(k_dir, o_dir, "the copied-up directory's xattrs");
}

// ---------------------------------------------------------------------------------------------
// Layers changed behind the mount's back: a lower modified underneath a live mount, upper
// files and directories removed by someone else. What the overlay shows then is undefined (for
// the kernel too), but every request must get an answer (data or an errno), the daemon must
// survive, the rest of the mount keep working, the unmount be clean and a remount consistent.

/// Errnos that say the daemon is gone or the request was dropped.
const DEAD: &[&str] = &["ENOTCONN", "ECONNABORTED", "ECONNREFUSED"];

/// Runs one step through the mount, logging it before it starts (so a hang names the step).
fn logged(
    log: &std::sync::Mutex<Vec<String>>,
    what: &str,
    f: impl FnOnce() -> std::io::Result<String>,
) {
    log.lock()
        .unwrap()
        .push(format!("{what}: (did not return)"));
    let line = format!("{what}: {}", show(f()));
    *log.lock().unwrap().last_mut().unwrap() = line;
}

fn count_entries(p: &Path) -> std::io::Result<String> {
    let mut n = 0;
    for e in std::fs::read_dir(p)? {
        e?;
        n += 1;
    }
    Ok(format!("{n} entries"))
}

fn read_line(p: &Path) -> std::io::Result<String> {
    std::fs::read(p).map(|c| first_line(&c))
}

fn pread(f: &std::fs::File, len: usize, at: u64) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    let n = f.read_at(&mut b, at)?;
    Ok(format!("{n} bytes {:?}", first_line(&b[..n])))
}

const BEHIND_D2: usize = 2000;

fn behind_layers(base: &Path) -> (Layer, Layer) {
    let l = Layer::new(base.join("l"));
    l.file("a", b"lower a v1\n")
        .file("b", b"lower b\n")
        .file("c", b"lower c\n")
        .file("e", b"lower e\n")
        .file("keep", b"keep\n")
        .file("d/x", b"x\n")
        .file("d/y", b"y\n")
        .file("gone/f", b"gone f\n")
        .file("gone/sub/g", b"gone g\n")
        .file("big", vec![b'B'; 1 << 20]);
    fill(&l.path("d2"), 0..BEHIND_D2);
    let u = Layer::new(base.join("u"));
    u.file("up", b"upper up\n")
        .file("uopen", b"upper open\n")
        .file("ud/f", b"ud f\n")
        .file("ud/g", b"ud g\n");
    (l, u)
}

/// Files and listings held open across the changes.
struct Held {
    fa: std::fs::File,
    fbig: std::fs::File,
    fu: std::fs::File,
    d2: std::fs::ReadDir,
    d2_seen: usize,
}

fn warm_up(r: &Path) -> Held {
    for n in [
        "a",
        "b",
        "c",
        "e",
        "keep",
        "big",
        "up",
        "uopen",
        "ud/f",
        "gone/f",
        "gone/sub/g",
        "d/x",
    ] {
        std::fs::read(r.join(n)).unwrap_or_else(|e| panic!("warm-up read {n}: {e}"));
    }
    for d in ["", "d", "ud", "gone", "gone/sub", "d2"] {
        count_entries(&r.join(d)).unwrap_or_else(|e| panic!("warm-up list /{d}: {e}"));
    }
    let mut d2 = std::fs::read_dir(r.join("d2")).expect("opendir d2");
    let mut d2_seen = 0;
    for e in d2.by_ref().take(10) {
        e.expect("d2 entry");
        d2_seen += 1;
    }
    Held {
        fa: std::fs::File::open(r.join("a")).expect("open a"),
        fbig: std::fs::File::open(r.join("big")).expect("open big"),
        fu: std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(r.join("uopen"))
            .expect("open uopen"),
        d2,
        d2_seen,
    }
}

/// The changes made directly in the layers while the mount is live.
fn change_behind(l: &Layer, upper: &Path) {
    std::fs::write(l.path("a"), b"lower a v2, longer\n").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(l.path("big"))
        .unwrap()
        .set_len(10)
        .unwrap();
    std::fs::remove_file(l.path("b")).unwrap();
    std::fs::rename(l.path("c"), l.path("c2")).unwrap();
    std::fs::remove_file(l.path("e")).unwrap();
    l.file("e/inner", b"e is a directory now\n");
    std::fs::remove_dir_all(l.path("gone")).unwrap();
    l.file("d/z", b"z\n");
    for i in BEHIND_D2 / 2..BEHIND_D2 {
        std::fs::remove_file(l.path("d2").join(entry_name(i))).unwrap();
    }
    std::fs::remove_file(upper.join("up")).unwrap();
    std::fs::remove_file(upper.join("uopen")).unwrap();
    std::fs::remove_dir_all(upper.join("ud")).unwrap();
}

fn after_changes(r: &Path, mut h: Held, log: &std::sync::Mutex<Vec<String>>) {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let p = |n: &str| r.join(n);
    logged(log, "read a", || read_line(&p("a")));
    logged(log, "pread the open a", || pread(&h.fa, 32, 0));
    logged(log, "pread the open big at 512 KiB", || {
        pread(&h.fbig, 16, 512 * 1024)
    });
    logged(log, "stat big", || {
        std::fs::metadata(p("big")).map(|m| m.len().to_string())
    });
    logged(log, "read b", || read_line(&p("b")));
    logged(log, "chmod b", || {
        std::fs::set_permissions(p("b"), std::fs::Permissions::from_mode(0o600))
            .map(|()| "ok".into())
    });
    logged(log, "append to b", || {
        let mut f = std::fs::OpenOptions::new().append(true).open(p("b"))?;
        f.write_all(b"more\n").map(|()| "ok".into())
    });
    logged(log, "read c", || read_line(&p("c")));
    logged(log, "read c2", || read_line(&p("c2")));
    logged(log, "rename c c3", || {
        std::fs::rename(p("c"), p("c3")).map(|()| "ok".into())
    });
    logged(log, "stat e", || {
        std::fs::symlink_metadata(p("e")).map(|m| kind(m.mode()).into())
    });
    logged(log, "read e", || read_line(&p("e")));
    logged(log, "list e", || list(&p("e")));
    logged(log, "unlink e", || {
        std::fs::remove_file(p("e")).map(|()| "ok".into())
    });
    logged(log, "read gone/f", || read_line(&p("gone/f")));
    logged(log, "list gone", || list(&p("gone")));
    logged(log, "list gone/sub", || list(&p("gone/sub")));
    logged(log, "create gone/new", || {
        std::fs::write(p("gone/new"), b"n").map(|()| "ok".into())
    });
    logged(log, "rmdir gone/sub", || {
        std::fs::remove_dir(p("gone/sub")).map(|()| "ok".into())
    });
    logged(log, "list d", || list(&p("d")));
    logged(log, "read d/z", || read_line(&p("d/z")));
    logged(log, "go on listing the open d2", || {
        let mut n = h.d2_seen;
        for e in h.d2.by_ref() {
            e?;
            n += 1;
        }
        Ok(format!("{n} entries in all"))
    });
    logged(log, "list d2 again", || count_entries(&p("d2")));
    logged(log, "read up", || read_line(&p("up")));
    logged(log, "write up", || {
        std::fs::write(p("up"), b"rewritten\n").map(|()| "ok".into())
    });
    logged(log, "unlink up", || {
        std::fs::remove_file(p("up")).map(|()| "ok".into())
    });
    logged(log, "pwrite the open uopen and fsync", || {
        h.fu.write_all_at(b"UPPER", 0)?;
        h.fu.sync_all().map(|()| "ok".into())
    });
    logged(log, "pread the open uopen", || pread(&h.fu, 32, 0));
    logged(log, "read uopen", || read_line(&p("uopen")));
    logged(log, "read ud/f", || read_line(&p("ud/f")));
    logged(log, "list ud", || list(&p("ud")));
    logged(log, "create ud/new", || {
        std::fs::write(p("ud/new"), b"n").map(|()| "ok".into())
    });
    logged(log, "rmdir ud", || {
        std::fs::remove_dir(p("ud")).map(|()| "ok".into())
    });
    logged(log, "mkdir ud", || {
        std::fs::create_dir(p("ud")).map(|()| "ok".into())
    });
    logged(log, "append to a", || {
        let mut f = std::fs::OpenOptions::new().append(true).open(p("a"))?;
        f.write_all(b"appended\n").map(|()| "ok".into())
    });
    logged(log, "list the root", || list(r));
    // Untouched parts of the mount work as before.
    logged(log, "read keep", || read_line(&p("keep")));
    logged(log, "read d/x", || read_line(&p("d/x")));
    logged(log, "create fresh", || {
        std::fs::write(p("fresh"), b"fresh\n").map(|()| "ok".into())
    });
    logged(log, "mkdir fresh_dir", || {
        std::fs::create_dir(p("fresh_dir")).map(|()| "ok".into())
    });
    logged(log, "rename fresh into fresh_dir", || {
        std::fs::rename(p("fresh"), p("fresh_dir/fresh")).map(|()| "ok".into())
    });
    logged(log, "read fresh_dir/fresh", || {
        read_line(&p("fresh_dir/fresh"))
    });
}

/// Every name a walk of `root` lists can be looked up, and every file read.
fn walk_problems(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match std::fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) => {
                problems.push(format!("list {}: {}", d.display(), ename(&e)));
                continue;
            }
        };
        for e in rd {
            let p = match e {
                Ok(e) => e.path(),
                Err(e) => {
                    problems.push(format!("list {}: {}", d.display(), ename(&e)));
                    continue;
                }
            };
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() => {
                    if let Err(e) = std::fs::read(&p) {
                        problems.push(format!("read {}: {}", p.display(), ename(&e)));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    problems.push(format!("listed {} fails lstat: {}", p.display(), ename(&e)))
                }
            }
        }
    }
    problems
}

#[test]
fn layers_changed_behind_the_mounts_back() {
    if !require_root_and_fuse() {
        return;
    }
    use std::sync::{Arc, Mutex, mpsc};
    let scratch = Scratch::new();
    let deadline = Duration::from_secs(120);

    // The kernel's answers, for the record only (its behaviour here is undefined too).
    let kernel_log = {
        let base = scratch.dir("k");
        let (l, u) = behind_layers(&base);
        let w = scratch.dir("k/w");
        let m = KernelMount::try_mount(None, &[l.root()], Some((u.root(), &w)), KERNEL_OPTS)
            .unwrap_or_else(|e| panic!("{e}"));
        let held = warm_up(m.path());
        change_behind(&l, u.root());
        let log = Mutex::new(Vec::new());
        after_changes(m.path(), held, &log);
        assert!(m.unmount(), "kernel overlay unmount failed");
        log.into_inner().unwrap()
    };

    let base = scratch.dir("o");
    let (l, u) = behind_layers(&base);
    let w = scratch.dir("o/w");
    let lowers = [l.root()];
    let m = mount_ours(&lowers, Some((u.root(), &w)), &[]);
    let pid = m.daemon_pid().expect("daemon pid");
    let held = warm_up(m.path());
    change_behind(&l, u.root());
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    {
        let (root, log) = (m.path().to_path_buf(), log.clone());
        std::thread::spawn(move || {
            after_changes(&root, held, &log);
            let _ = tx.send(());
        });
    }
    let finished = rx.recv_timeout(deadline).is_ok();
    if !finished {
        // Unblock the stuck caller before failing.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let ours = log.lock().unwrap().clone();
    for (i, o) in ours.iter().enumerate() {
        eprintln!(
            "  ours:   {o}\n  kernel: {}",
            kernel_log.get(i).map_or("-", |s| s.as_str())
        );
    }
    assert!(
        finished,
        "a request hung for {deadline:?} after the layers changed: {:?}",
        ours.last()
    );
    let mut problems: Vec<String> = ours
        .iter()
        .filter(|l| DEAD.iter().any(|d| l.ends_with(d)))
        .map(|l| format!("the daemon dropped a request: {l}"))
        .collect();
    // (Creating new names may fail here: `a_create_after_the_upper_lost_an_object_succeeds`.)
    for want in ["read keep: keep", "read d/x: x"] {
        if !ours.iter().any(|l| l == want) {
            problems.push(format!(
                "the rest of the mount stopped working: no {want:?}"
            ));
        }
    }
    if nix::sys::signal::kill(pid, None).is_err() {
        problems.push("the daemon died".into());
    }
    let ended = m.unmount();
    if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted {
        problems.push(format!("unmount not clean: {ended:?}"));
    }
    match std::fs::read_dir(w.join("work")) {
        Ok(rd) => {
            let left: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
            if !left.is_empty() {
                problems.push(format!("<workdir>/work holds {left:?}"));
            }
        }
        Err(e) => problems.push(format!("<workdir>/work: {e}")),
    }
    // A fresh mount over the changed layers is whole: every listed name stats, every file
    // reads, and it shows the lower as it now is where nothing was copied up.
    let m = mount_ours(&lowers, Some((u.root(), &w)), &[]);
    problems.extend(walk_problems(m.path()));
    for (n, want) in [
        ("keep", "keep"),
        ("d/z", "z"),
        ("e/inner", "e is a directory now"),
    ] {
        let got = show(read_line(&m.path().join(n)));
        if got != want {
            problems.push(format!(
                "after the remount {n} reads {got:?}, want {want:?}"
            ));
        }
    }
    let d2 = show(count_entries(&m.path().join("d2")));
    if d2 != format!("{} entries", BEHIND_D2 / 2) {
        problems.push(format!("after the remount d2 has {d2}"));
    }
    let ended = m.unmount();
    if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted {
        problems.push(format!("second unmount not clean: {ended:?}"));
    }
    assert!(
        problems.is_empty(),
        "layers changed behind the mount:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// Special files in the lowers, used: hard links written (they stay links, index=on), fifos
// opened and copied up, device nodes read and written and copied up, sockets copied up and
// removed; then the merged view and the upper against the kernel's.

fn special_line(r: &Path, n: &str) -> String {
    match std::fs::symlink_metadata(r.join(n)) {
        Ok(m) => format!(
            "{n}: {} mode {:o} uid {} gid {} nlink {} rdev {}:{} size {}",
            kind(m.mode()),
            m.mode() & 0o7777,
            m.uid(),
            m.gid(),
            m.nlink(),
            nix::sys::stat::major(m.rdev()),
            nix::sys::stat::minor(m.rdev()),
            m.len()
        ),
        Err(e) => format!("{n}: {}", ename(&e)),
    }
}

fn special_use_steps(r: &Path) -> Vec<String> {
    use std::io::{Read, Write};
    let p = |n: &str| r.join(n);
    let ok = |r: std::io::Result<()>| show(r.map(|()| "ok"));
    let mut out = Vec::new();
    // Hard links: writing one name copies it up alone.
    out.push(format!(
        "append to h1: {}",
        ok(std::fs::OpenOptions::new()
            .append(true)
            .open(p("h1"))
            .and_then(|mut f| f.write_all(b"more\n")))
    ));
    for n in ["h1", "h2", "sub/h3"] {
        out.push(format!(
            "read {n}: {}",
            show(std::fs::read(p(n)).map(|c| format!("{c:?}")))
        ));
    }
    out.push(format!(
        "chown h2: {}",
        ok(std::os::unix::fs::lchown(p("h2"), Some(1234), Some(1234)))
    ));
    // A fifo: a reader and a writer meet through the merged name, before and after copy-up.
    let fifo_round = |n: &str| -> std::io::Result<String> {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p(n))?;
        f.write_all(b"ping")?;
        let mut b = [0u8; 4];
        f.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    };
    out.push(format!("fifo round trip: {}", show(fifo_round("fifo"))));
    out.push(format!(
        "chown fifo: {}",
        ok(std::os::unix::fs::lchown(p("fifo"), Some(1234), Some(1234)))
    ));
    out.push(format!(
        "fifo round trip after copy-up: {}",
        show(fifo_round("fifo"))
    ));
    out.push(format!(
        "rename fifo fifo2: {}",
        ok(std::fs::rename(p("fifo"), p("fifo2")))
    ));
    // A character device (1:3, null): opened through the mount it is the device.
    out.push(format!(
        "write null: {}",
        ok(std::fs::OpenOptions::new()
            .write(true)
            .open(p("null"))
            .and_then(|mut f| f.write_all(b"into the void")))
    ));
    out.push(format!(
        "read null: {}",
        show(std::fs::read(p("null")).map(|c| format!("{} bytes", c.len())))
    ));
    out.push(format!(
        "chmod null: {}",
        ok(std::fs::set_permissions(
            p("null"),
            std::fs::Permissions::from_mode(0o600)
        ))
    ));
    out.push(format!(
        "read null after copy-up: {}",
        show(std::fs::read(p("null")).map(|c| format!("{} bytes", c.len())))
    ));
    out.push(format!(
        "utimes loop0: {}",
        show(
            nix_io(utimensat(
                nix::fcntl::AT_FDCWD,
                &p("loop0"),
                &TimeSpec::new(OLD + 7, 0),
                &TimeSpec::new(OLD + 7, 0),
                UtimensatFlags::NoFollowSymlink,
            ))
            .map(|()| "ok")
        )
    ));
    out.push(format!(
        "setxattr trusted.t sock: {}",
        ok(xattr::set(&p("sock"), "trusted.t", b"1"))
    ));
    out.push(format!(
        "getxattr trusted.t sock: {}",
        show(xattr::get(&p("sock"), "trusted.t").map(|v| String::from_utf8_lossy(&v).into_owned()))
    ));
    out.push(format!(
        "link sock sock2: {}",
        ok(std::fs::hard_link(p("sock"), p("sock2")))
    ));
    out.push(format!(
        "unlink sock: {}",
        ok(std::fs::remove_file(p("sock")))
    ));
    out.push(format!("root after: {}", show(list_typed(r))));
    for n in [
        "h1", "h2", "sub/h3", "fifo", "fifo2", "null", "loop0", "sock", "sock2",
    ] {
        out.push(special_line(r, n));
    }
    out
}

#[test]
fn special_files_in_the_lowers_in_use() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let run = |kernel: bool| {
        let base = scratch.dir(if kernel { "k" } else { "o" });
        let l = Layer::new(base.join("l"));
        l.file("h1", b"linked\n")
            .hardlink("h1", "h2")
            .hardlink("h1", "sub/h3")
            .fifo("fifo")
            .chardev("null", 1, 3)
            .mode("null", 0o666);
        mknodat(
            nix::fcntl::AT_FDCWD,
            &l.path("loop0"),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o660),
            nix::sys::stat::makedev(7, 0),
        )
        .expect("mknod block device");
        drop(std::os::unix::net::UnixListener::bind(l.path("sock")).expect("bind socket"));
        let (u, w) = (base.join("u"), base.join("w"));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        // The README's deliberate differences: hard links stay links after copy-up (the
        // kernel's `index=on`), and device nodes open only with `dev` (default `nodev`, as
        // fuse-overlayfs).
        let steps = if kernel {
            let m = KernelMount::try_mount(
                None,
                &[l.root()],
                Some((&u, &w)),
                &["redirect_dir=off", "index=on", "metacopy=off"],
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let out = special_use_steps(m.path());
            assert!(m.unmount(), "kernel overlay unmount failed");
            out
        } else {
            let m = mount_ours(&[l.root()], Some((&u, &w)), &["dev"]);
            let out = special_use_steps(m.path());
            let ended = m.unmount();
            assert_eq!(ended.daemon, DaemonExit::Exited(0), "{ended:?}");
            out
        };
        // The upper, but for two known differences: the kernel links its whiteouts to one
        // shared inode (nlink), and we link every name of a copied-up file that the mount
        // looked up (sub/h3), where the kernel's index=on finds them through its index.
        let mut upper: Vec<String> = [
            "h1", "h2", "fifo", "fifo2", "null", "loop0", "sock", "sock2",
        ]
        .iter()
        .map(|n| {
            let line = special_line(&u, n);
            match line.split_once(" nlink ") {
                Some((a, b))
                    if a.ends_with("chardev mode 0 uid 0 gid 0") && b.contains("rdev 0:0") =>
                {
                    format!("{a} (whiteout){}", &b[b.find(' ').unwrap_or(b.len())..])
                }
                _ => line,
            }
        })
        .collect();
        upper.extend(
            upper_listing(&u)
                .into_iter()
                .filter(|l| !l.starts_with("/sub")),
        );
        // The lower is as built.
        let lower: Vec<String> = ["h1", "fifo", "null", "loop0", "sock"]
            .iter()
            .map(|n| special_line(l.root(), n))
            .collect();
        (steps, upper, lower)
    };
    let (k, ku, kl) = run(true);
    let (o, ou, ol) = run(false);
    eprintln!("special files in use (ours): {o:#?}\nupper: {ou:#?}");
    assert!(
        o.contains(&"fifo round trip: ping".to_string())
            && o.contains(&"fifo round trip after copy-up: ping".to_string()),
        "a fifo in a lower does not carry data: {o:#?}"
    );
    assert_same("special files in use", &k, &o);
    assert_same("special files in use: uppers", &ku, &ou);
    assert_same("special files in use: lowers afterwards", &kl, &ol);
}

// ---------------------------------------------------------------------------------------------
// A create after the upper lost an object behind the mount's back. The upper lives on a
// journal-less ext4 image, which hands a freed inode number to the next new inode at once
// (ext4 with a journal does so only some of the time), so the number of the removed object,
// still known to the daemon, goes to the new file.

/// A loop-mounted image, unmounted on drop.
struct LoopMount {
    path: PathBuf,
}

impl LoopMount {
    fn ext4_without_journal(image: &Path, target: &Path) -> LoopMount {
        let f = std::fs::File::create(image).expect("create the image");
        f.set_len(32 << 20).expect("size the image");
        drop(f);
        let out = common::run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-O".as_ref(),
                "^has_journal".as_ref(),
                image.as_os_str(),
            ],
        );
        assert!(
            out.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir_all(target).unwrap();
        let out = common::run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                target.as_os_str(),
            ],
        );
        assert!(
            out.status.success(),
            "mount -o loop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopMount {
            path: target.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        common::mounts::force_unmount(&self.path);
    }
}

#[test]
fn a_create_after_the_upper_lost_an_object_succeeds() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let img = LoopMount::ext4_without_journal(&scratch.join("upper.img"), &scratch.join("img"));
    let l = Layer::new(scratch.join("l"));
    l.file("keep", b"keep\n");
    let up = Layer::new(img.path.join("u"));
    up.file("ud/f", b"ud f\n");
    let w = img.path.join("w");
    std::fs::create_dir_all(&w).unwrap();
    let m = mount_ours(&[l.root()], Some((up.root(), &w)), &[]);
    assert_eq!(
        std::fs::read(m.path().join("ud/f")).expect("read ud/f"),
        b"ud f\n"
    );
    std::fs::remove_dir_all(up.path("ud")).expect("remove ud from the upper");
    let mut got = Vec::new();
    for i in 0..4 {
        let name = format!("n{i}");
        got.push(format!(
            "create {name}: {}",
            show(std::fs::write(m.path().join(&name), b"new\n").map(|()| "ok"))
        ));
    }
    let ended = m.unmount();
    assert_eq!(ended.daemon, DaemonExit::Exited(0), "{ended:?}");
    let in_upper: Vec<String> = (0..4)
        .map(|i| format!("n{i}"))
        .filter(|n| up.path(n).exists())
        .collect();
    assert!(
        got.iter().all(|g| g.ends_with(": ok")),
        "creates after ud vanished from the upper: {got:?}; in the upper: {in_upper:?}"
    );
}
