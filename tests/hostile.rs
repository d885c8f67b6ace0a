//! Hostile input in the layers, each case compared with the kernel's overlayfs on identical
//! copies (the kernel's answer is the reference):
//!
//! - symlinks in every layer that point out of it (absolute, `../` chains that escape the layer
//!   but not the caller's view, loops, through /proc) and layer directories that are symlinks
//!   to outside directories: the daemon never follows them (lookup, copy-up, rename, xattrs,
//!   readdir); a caller who follows one gets what the kernel's path walk gives; metadata
//!   changes on the names copy up symlinks with the same target and leave the outside alone;
//! - hard links, fifos, sockets and device nodes in the lowers (stat);
//! - names of 255 bytes (fine) and 256 (ENAMETOOLONG), names with arbitrary bytes;
//! - a tree deeper than PATH_MAX, walked and written with fd-relative calls;
//! - a directory of 200,000 entries merged from two layers;
//! - a file with 100 xattrs and a 60 KiB value, through copy-up.

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
