//! Ownership and permissions as an unprivileged caller, against the kernel's overlayfs.
//!
//! Two identical stacks (files with modes 0600/0644/0755/0000/0666, setuid and setgid files,
//! directories 0700/0755/0777/0500/0744/0711, sticky 1777 ones, setgid directories owned by a
//! group the caller is not in, objects owned by root and by 65534, POSIX ACLs granting and
//! denying 65534 and a default ACL, xattrs in `user.` and `trusted.`, objects in the upper, in
//! either lower, and merged directories) are mounted, one with the kernel's overlayfs and one
//! with ours (default options: `allow_other,default_permissions`). A helper process (this test
//! binary re-executed with uid/gid 65534 and no supplementary groups) runs the same list of
//! operations on each: stat, access, read, readdir, get/list/set/remove xattrs (`user.*`,
//! `trusted.*`, ACLs), write, truncate, utimes (now and explicit), chmod (including setgid on
//! a file of a foreign group), chown to itself, to root and to a foreign group, creates, mkdir,
//! symlink, mkfifo and link in every directory under three umasks, renames (sticky
//! directories, across directories, directories), unlinks and rmdirs.
//!
//! `unprivileged_caller_gets_the_kernels_results` asserts:
//! - each operation's result (success with the attributes it leaves, or the errno) is the
//!   kernel's;
//! - each object the helper creates belongs to 65534:65534 (the group of a setgid parent inside
//!   one) and has the requested mode minus the umask (bounded by the default ACL instead, where
//!   there is one; plus setgid for directories made in a setgid directory), on both mounts;
//! - afterwards the merged trees are the same (type, mode, owner, size, blocks, nlink, content,
//!   symlink targets, xattrs, private xattrs unreadable, listings; times and inode numbers are
//!   left to the other differential tests); our daemon exits 0 on unmount.
//!
//! `unprivileged_callers_changes_leave_the_kernels_upper_layer` runs the same scenario and
//! asserts the two upper layers are the same: entries, whiteouts, types, modes, owners,
//! contents, xattrs (the overlay's included; `trusted.overlay.origin` and `.uuid` by presence
//! only); not the nlink of whiteouts, which the kernel links to one shared inode.
//!
//! `RSFS_PERM_DUMP=1` prints every operation with both results.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write as _};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::AccessFlags;

use common::snapshot::{self, CompareOpts, Snapshot, SnapshotOpts};
use common::{Layer, Scratch, xattr};

const NOBODY: u32 = 65534;
/// A group the caller is not a member of.
const GRP: u32 = 1234;
const HELPER_ENV: &str = "RSFS_PERM_HELPER_ROOT";
const HELPER_TEST: &str = "helper_runs_operations_as_nobody";
const MARK: &str = "RSFS-PERM";

// ---------------------------------------------------------------------------------------------
// The stack.

struct Obj {
    rel: &'static str,
    uid: u32,
    gid: u32,
    mode: u32,
}

const fn o(rel: &'static str, uid: u32, gid: u32, mode: u32) -> Obj {
    Obj {
        rel,
        uid,
        gid,
        mode,
    }
}

/// Directories are the entries ending in `/`.
const BOTTOM: &[Obj] = &[
    o("/b644", 0, 0, 0o644),
    o("/bn600", NOBODY, NOBODY, 0o600),
    o("/shadow", 0, 0, 0o644),
    o("/m/", 0, 0, 0o777),
    o("/m/a644", 0, 0, 0o644),
    o("/m/an644", NOBODY, NOBODY, 0o644),
];

const TOP: &[Obj] = &[
    o("/r600", 0, 0, 0o600),
    o("/r644", 0, 0, 0o644),
    o("/r755", 0, 0, 0o755),
    o("/r000", 0, 0, 0o000),
    o("/r666", 0, 0, 0o666),
    o("/n600", NOBODY, NOBODY, 0o600),
    o("/n644", NOBODY, NOBODY, 0o644),
    o("/n000", NOBODY, NOBODY, 0o000),
    o("/ng2755", NOBODY, GRP, 0o2755),
    o("/ngc644", NOBODY, GRP, 0o644),
    o("/nsuid", NOBODY, NOBODY, 0o4755),
    o("/nsuidw", NOBODY, NOBODY, 0o4755),
    o("/ngidw", NOBODY, NOBODY, 0o2775),
    o("/r4777w", 0, 0, 0o4777),
    o("/shadow", NOBODY, NOBODY, 0o600),
    o("/m/", 0, 0, 0o755),
    o("/m/b644", 0, 0, 0o644),
    o("/d700/", 0, 0, 0o700),
    o("/d700/f644", 0, 0, 0o644),
    o("/d755/", 0, 0, 0o755),
    o("/d755/f644", 0, 0, 0o644),
    o("/d755/fn644", NOBODY, NOBODY, 0o644),
    o("/d755/sub/", 0, 0, 0o755),
    o("/d755/nsub/", NOBODY, NOBODY, 0o755),
    o("/d777/", 0, 0, 0o777),
    o("/d777/f644", 0, 0, 0o644),
    o("/d777/fn644", NOBODY, NOBODY, 0o644),
    o("/d777/sub/", 0, 0, 0o755),
    o("/t1777/", 0, 0, 0o1777),
    o("/t1777/rf644", 0, 0, 0o644),
    o("/t1777/nf644", NOBODY, NOBODY, 0o644),
    o("/t1777/rsub/", 0, 0, 0o755),
    o("/t1777/nsub/", NOBODY, NOBODY, 0o755),
    o("/nd755/", NOBODY, NOBODY, 0o755),
    o("/nd755/rf644", 0, 0, 0o644),
    o("/nd755/f000", NOBODY, NOBODY, 0o000),
    o("/nd500/", NOBODY, NOBODY, 0o500),
    o("/nd500/f644", NOBODY, NOBODY, 0o644),
    o("/d744/", 0, 0, 0o744),
    o("/d744/f644", 0, 0, 0o644),
    o("/d711/", 0, 0, 0o711),
    o("/d711/f644", 0, 0, 0o644),
    o("/racl", 0, 0, 0o640),
    o("/dacl/", 0, 0, 0o777),
    o("/dacl/f644", 0, 0, 0o644),
    o("/denyacl/", 0, 0, 0o755),
    o("/denyacl/f644", 0, 0, 0o644),
    o("/sg/", 0, GRP, 0o2777),
    o("/sg/f644", 0, GRP, 0o644),
    o("/nsg/", NOBODY, GRP, 0o2775),
    o("/nsg/f644", NOBODY, GRP, 0o644),
];

const UPPER: &[Obj] = &[
    o("/nu600", NOBODY, NOBODY, 0o600),
    o("/m/", 0, 0, 0o755),
    o("/m/c644", NOBODY, NOBODY, 0o644),
    o("/u/", 0, 0, 0o755),
    o("/u/nf644", NOBODY, NOBODY, 0o644),
    o("/u/rf644", 0, 0, 0o644),
    o("/uw777/", 0, 0, 0o777),
    o("/uw777/rf644", 0, 0, 0o644),
    o("/ut1777/", 0, 0, 0o1777),
    o("/ut1777/rf644", 0, 0, 0o644),
    o("/ut1777/nf644", NOBODY, NOBODY, 0o644),
];

/// Objects that carry `user.lower` and `trusted.lowtest` xattrs (in the layer that holds them).
const WITH_XATTRS: &[&str] = &[
    "/r644", "/n644", "/r666", "/d755/", "/t1777/", "/nd755/", "/b644", "/u/nf644",
];

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED: u32 = u32::MAX;

/// A POSIX ACL in the kernel's xattr encoding (version 2; entries sorted by tag, then id).
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// rw- for the owner, rw- for 65534 by name, r-- for the group, nothing for others.
fn acl_grant_nobody() -> Vec<u8> {
    acl(&[
        (ACL_USER_OBJ, 6, ACL_UNDEFINED),
        (ACL_USER, 6, NOBODY),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED),
        (ACL_MASK, 6, ACL_UNDEFINED),
        (ACL_OTHER, 0, ACL_UNDEFINED),
    ])
}

/// rwx for the owner, nothing for 65534 by name, r-x for the group and for others.
fn acl_deny_nobody() -> Vec<u8> {
    acl(&[
        (ACL_USER_OBJ, 7, ACL_UNDEFINED),
        (ACL_USER, 0, NOBODY),
        (ACL_GROUP_OBJ, 5, ACL_UNDEFINED),
        (ACL_MASK, 5, ACL_UNDEFINED),
        (ACL_OTHER, 5, ACL_UNDEFINED),
    ])
}

/// A default ACL: new objects get rwx/r-x/--- at most, whatever the umask.
fn acl_default_750() -> Vec<u8> {
    acl(&[
        (ACL_USER_OBJ, 7, ACL_UNDEFINED),
        (ACL_GROUP_OBJ, 5, ACL_UNDEFINED),
        (ACL_OTHER, 0, ACL_UNDEFINED),
    ])
}

/// An access ACL the helper sets on files: r-- for root by name, so it is not a plain mode.
fn acl_owner_rw_root_r() -> Vec<u8> {
    acl(&[
        (ACL_USER_OBJ, 6, ACL_UNDEFINED),
        (ACL_USER, 4, 0),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED),
        (ACL_MASK, 4, ACL_UNDEFINED),
        (ACL_OTHER, 0, ACL_UNDEFINED),
    ])
}

const ACL_ACCESS: &str = "system.posix_acl_access";
const ACL_DEFAULT: &str = "system.posix_acl_default";

fn populate(layer: &Layer, objs: &[Obj], tag: &str) {
    for ob in objs {
        let rel = ob.rel.trim_end_matches('/');
        if ob.rel.ends_with('/') {
            layer.dir(rel);
        } else {
            layer.file(rel, format!("{tag}:{rel}\n"));
        }
    }
    // Owners and modes children first, so that a 0500 or 0000 parent does not matter; the
    // owner first since chown clears setuid/setgid.
    for ob in objs.iter().rev() {
        let rel = ob.rel.trim_end_matches('/');
        layer.owner(rel, ob.uid, ob.gid).mode(rel, ob.mode);
        if WITH_XATTRS.contains(&ob.rel) {
            layer.xattr(rel, "user.lower", format!("{tag}{rel}")).xattr(
                rel,
                "trusted.lowtest",
                "T",
            );
        }
    }
    for ob in objs {
        let rel = ob.rel.trim_end_matches('/');
        match rel {
            "/racl" => {
                layer.xattr(rel, ACL_ACCESS, acl_grant_nobody());
            }
            "/denyacl" => {
                layer.xattr(rel, ACL_ACCESS, acl_deny_nobody());
            }
            "/dacl" => {
                layer.xattr(rel, ACL_DEFAULT, acl_default_750());
            }
            _ => {}
        }
    }
    layer.owner("", 0, 0).mode("", 0o755);
}

struct Stack {
    lowers: [PathBuf; 2],
    upper: PathBuf,
    work: PathBuf,
}

fn build_stack(s: &Scratch, prefix: &str) -> Stack {
    let top = Layer::new(s.dir(&format!("{prefix}l0")));
    let bottom = Layer::new(s.dir(&format!("{prefix}l1")));
    let upper = Layer::new(s.dir(&format!("{prefix}u")));
    populate(&bottom, BOTTOM, "L1");
    populate(&top, TOP, "L0");
    populate(&upper, UPPER, "U");
    Stack {
        lowers: [top.root().to_path_buf(), bottom.root().to_path_buf()],
        upper: upper.root().to_path_buf(),
        work: s.dir(&format!("{prefix}w")),
    }
}

// ---------------------------------------------------------------------------------------------
// The operations.

#[derive(Clone, Debug)]
enum P {
    Umask(u32),
    Stat(String),
    Access(String, &'static str),
    Read(String),
    List(String),
    GetX(String, &'static str),
    ListX(String),
    SetX(String, &'static str),
    /// setxattr with a given value (ACLs).
    SetXv(String, &'static str, Vec<u8>),
    RemoveX(String, &'static str),
    Write(String),
    Truncate(String, u64),
    UtimeNow(String),
    UtimeSet(String),
    Chmod(String, u32),
    /// `None` leaves that id unchanged (-1).
    Chown(String, Option<u32>, Option<u32>),
    Create(String, u32),
    Mkdir(String, u32),
    Symlink(String, &'static str),
    Mkfifo(String, u32),
    Link(String, String),
    Rename(String, String),
    Unlink(String),
    Rmdir(String),
}

fn files() -> Vec<String> {
    BOTTOM
        .iter()
        .chain(TOP)
        .chain(UPPER)
        .filter(|o| !o.rel.ends_with('/'))
        .map(|o| o.rel.to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .chain(["/missing".to_string(), "/d700/missing".to_string()])
        .collect()
}

fn dirs() -> Vec<String> {
    let mut v: Vec<String> = BOTTOM
        .iter()
        .chain(TOP)
        .chain(UPPER)
        .filter(|o| o.rel.ends_with('/'))
        .map(|o| o.rel.trim_end_matches('/').to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    v.insert(0, "/".to_string());
    v
}

/// Directories the helper creates in; `/nodir` does not exist.
fn create_dirs() -> Vec<String> {
    let mut v = dirs();
    v.push("/nodir".into());
    v
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn inspect(v: &mut Vec<P>, p: &str, is_dir: bool) {
    v.push(P::Stat(p.into()));
    for a in ["r", "w", "x"] {
        v.push(P::Access(p.into(), a));
    }
    v.push(if is_dir {
        P::List(p.into())
    } else {
        P::Read(p.into())
    });
    for x in [
        "user.lower",
        "trusted.lowtest",
        "trusted.overlay.origin",
        ACL_ACCESS,
        ACL_DEFAULT,
    ] {
        v.push(P::GetX(p.into(), x));
    }
    v.push(P::ListX(p.into()));
}

/// The whole sequence, the same for both mounts. Each entry is (phase, op).
fn operations() -> Vec<(&'static str, P)> {
    let mut out: Vec<(&'static str, P)> = Vec::new();
    let mut push =
        |phase: &'static str, ops: Vec<P>| out.extend(ops.into_iter().map(|o| (phase, o)));

    push("umask", vec![P::Umask(0o022)]);

    // A: look at everything.
    let mut a = Vec::new();
    for f in files() {
        inspect(&mut a, &f, false);
    }
    for d in dirs() {
        inspect(&mut a, &d, true);
    }
    push("inspect", a);

    // B: change existing files. Files whose name ends in `w` are written first (a write by
    // a non-owner or non-root clears setuid/setgid); the others chmod/chown first.
    let mut b = Vec::new();
    for f in files() {
        let write = vec![P::Write(f.clone())];
        let attrs = vec![
            P::Chmod(f.clone(), 0o2755),
            P::Chown(f.clone(), Some(NOBODY), Some(NOBODY)),
            P::Chown(f.clone(), Some(0), Some(0)),
            P::Chown(f.clone(), None, Some(GRP)),
        ];
        if f.ends_with('w') {
            b.extend(write);
            b.extend(attrs);
        } else {
            b.extend(attrs);
            b.extend(write);
        }
        b.extend([
            P::SetX(f.clone(), "user.test"),
            P::SetX(f.clone(), "trusted.test"),
            P::RemoveX(f.clone(), "user.lower"),
            P::SetXv(f.clone(), ACL_ACCESS, acl_owner_rw_root_r()),
            P::Stat(f.clone()),
            P::UtimeNow(f.clone()),
            P::UtimeSet(f.clone()),
            P::Truncate(f.clone(), 10),
        ]);
    }
    push("modify files", b);

    // C: create in every directory, under two umasks.
    let mut c = Vec::new();
    for d in create_dirs() {
        c.extend([
            P::Umask(0o022),
            P::Create(join(&d, "c1"), 0o666),
            P::Mkdir(join(&d, "k1"), 0o777),
            P::Symlink(join(&d, "s1"), "c1"),
            P::Mkfifo(join(&d, "p1"), 0o666),
            P::Umask(0o077),
            P::Create(join(&d, "c2"), 0o777),
            P::Mkdir(join(&d, "k2"), 0o777),
            P::Umask(0o027),
            P::Create(join(&d, "c3"), 0o664),
            P::Umask(0o022),
            P::Link("/n644".into(), join(&d, "h1")),
            P::Link("/r600".into(), join(&d, "h2")),
            P::Rename(join(&d, "c1"), join(&d, "c1r")),
            P::Rename(join(&d, "k1"), join(&d, "k1r")),
            P::SetX(join(&d, "k1r"), "user.test"),
            P::Stat(join(&d, "c1r")),
            P::Stat(join(&d, "h1")),
        ]);
    }
    push("create", c);

    // D: renames across directories and of directories, then unlink and rmdir.
    let mut d = vec![
        P::Rename("/t1777/nf644".into(), "/d777/moved1".into()),
        P::Rename("/t1777/rf644".into(), "/d777/moved2".into()),
        P::Rename("/d777/f644".into(), "/uw777/moved3".into()),
        P::Rename("/u/nf644".into(), "/uw777/moved4".into()),
        P::Rename("/uw777/rf644".into(), "/ut1777/rf644".into()),
        P::Rename("/ut1777/nf644".into(), "/ut1777/rf644".into()),
        P::Rename("/d777/c2".into(), "/d777/fn644".into()),
        P::Rename("/m/an644".into(), "/m/moved5".into()),
        P::Rename("/d777/sub".into(), "/d777/subr".into()),
        P::Rename("/t1777/nsub".into(), "/t1777/nsubr".into()),
        P::Rename("/t1777/k2".into(), "/t1777/k2r".into()),
        P::Rename("/d777/k2".into(), "/uw777/k2moved".into()),
        P::Rename("/nsg/k1r".into(), "/uw777/k1moved".into()),
    ];
    for f in files() {
        d.push(P::Unlink(f));
    }
    for dir in create_dirs() {
        d.push(P::Unlink(join(&dir, "c3")));
        d.push(P::Unlink(join(&dir, "s1")));
        d.push(P::Rmdir(join(&dir, "k2")));
    }
    for r in [
        "/d755/sub",
        "/d755/nsub",
        "/d777/sub",
        "/t1777/rsub",
        "/t1777/nsub",
        "/nd755",
        "/m",
    ] {
        d.push(P::Rmdir(r.into()));
    }
    push("rename and delete", d);

    // E: directory attributes (last: chmod may drop a setgid bit that C relies on).
    let mut e = Vec::new();
    for dir in dirs() {
        e.extend([
            P::SetX(dir.clone(), "user.test"),
            P::SetX(dir.clone(), "trusted.test"),
            P::UtimeNow(dir.clone()),
            P::UtimeSet(dir.clone()),
            P::Chmod(dir.clone(), 0o2775),
            P::Chown(dir.clone(), Some(NOBODY), Some(NOBODY)),
            P::Chown(dir.clone(), None, Some(GRP)),
        ]);
    }
    push("modify dirs", e);

    // F: look again (copied-up objects now carry the overlay's private xattrs in the upper).
    let mut f = Vec::new();
    for d in dirs() {
        inspect(&mut f, &d, true);
    }
    for dir in create_dirs() {
        for n in ["c1r", "c2", "h1", "k1r", "p1"] {
            inspect(&mut f, &join(&dir, n), n.starts_with('k'));
        }
    }
    push("inspect again", f);
    out
}

fn describe(op: &P) -> String {
    match op {
        P::Umask(m) => format!("umask {m:03o}"),
        P::Stat(p) => format!("lstat {p}"),
        P::Access(p, a) => format!("access({p}, {a})"),
        P::Read(p) => format!("read {p}"),
        P::List(p) => format!("readdir {p}"),
        P::GetX(p, n) => format!("getxattr {p} {n}"),
        P::ListX(p) => format!("listxattr {p}"),
        P::SetX(p, n) => format!("setxattr {p} {n}"),
        P::SetXv(p, n, v) => format!("setxattr {p} {n}={}", snapshot::show_bytes(v)),
        P::RemoveX(p, n) => format!("removexattr {p} {n}"),
        P::Write(p) => format!("open(O_WRONLY|O_APPEND)+write {p}"),
        P::Truncate(p, l) => format!("truncate {p} {l}"),
        P::UtimeNow(p) => format!("utimensat {p} NOW"),
        P::UtimeSet(p) => format!("utimensat {p} explicit"),
        P::Chmod(p, m) => format!("chmod {p} {m:04o}"),
        P::Chown(p, u, g) => format!("chown {p} {u:?}:{g:?}"),
        P::Create(p, m) => format!("open(O_CREAT|O_EXCL) {p} {m:04o}"),
        P::Mkdir(p, m) => format!("mkdir {p} {m:04o}"),
        P::Symlink(p, t) => format!("symlink {p} -> {t}"),
        P::Mkfifo(p, m) => format!("mkfifo {p} {m:04o}"),
        P::Link(a, b) => format!("link {a} {b}"),
        P::Rename(a, b) => format!("rename {a} {b}"),
        P::Unlink(p) => format!("unlink {p}"),
        P::Rmdir(p) => format!("rmdir {p}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The helper side: runs as 65534:65534 inside a re-executed test binary.

fn errno_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(c) => format!("{:?}", nix::errno::Errno::from_raw(c)),
        None => format!("{e}"),
    }
}

fn nix_err(e: nix::errno::Errno) -> String {
    format!("{e:?}")
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chardev"
    } else {
        "other"
    }
}

fn stat_detail(p: &Path) -> Result<String, String> {
    let m = std::fs::symlink_metadata(p).map_err(|e| errno_of(&e))?;
    let mut s = format!(
        "{} {:04o} {}:{}",
        kind_of(m.file_type()),
        m.mode() & 0o7777,
        m.uid(),
        m.gid()
    );
    if m.is_file() {
        let _ = write!(s, " size={} nlink={}", m.len(), m.nlink());
    }
    Ok(s)
}

/// After a successful change: the object's attributes as it is now.
fn after(p: &Path) -> Result<String, String> {
    Ok(match stat_detail(p) {
        Ok(s) => format!("-> {s}"),
        Err(e) => format!("-> lstat {e}"),
    })
}

fn run_op(root: &Path, op: &P) -> Result<String, String> {
    let at = |rel: &str| -> PathBuf {
        if rel == "/" {
            root.to_path_buf()
        } else {
            root.join(&rel[1..])
        }
    };
    let io = |e: std::io::Error| errno_of(&e);
    match op {
        P::Umask(m) => {
            nix::sys::stat::umask(Mode::from_bits_truncate(*m));
            Ok(String::new())
        }
        P::Stat(p) => stat_detail(&at(p)),
        P::Access(p, a) => {
            let f = match *a {
                "r" => AccessFlags::R_OK,
                "w" => AccessFlags::W_OK,
                _ => AccessFlags::X_OK,
            };
            nix::unistd::access(&at(p), f).map_err(nix_err)?;
            Ok(String::new())
        }
        P::Read(p) => {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(at(p))
                .map_err(io)?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf).map_err(io)?;
            Ok(format!(
                "{} bytes {}",
                buf.len(),
                snapshot::show_bytes(&buf[..buf.len().min(40)])
            ))
        }
        P::List(p) => {
            let mut names: Vec<String> = std::fs::read_dir(at(p))
                .map_err(io)?
                .map(|d| d.map(|d| d.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()
                .map_err(io)?;
            names.sort();
            Ok(names.join(","))
        }
        P::GetX(p, n) => {
            let v = xattr::get(&at(p), n).map_err(io)?;
            Ok(snapshot::show_bytes(&v))
        }
        P::ListX(p) => {
            let mut names: Vec<String> = xattr::list(&at(p))
                .map_err(io)?
                .into_iter()
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .collect();
            names.sort();
            Ok(names.join(","))
        }
        P::SetX(p, n) => {
            xattr::set(&at(p), n, b"by-nobody").map_err(io)?;
            Ok(String::new())
        }
        P::SetXv(p, n, v) => {
            xattr::set(&at(p), n, v).map_err(io)?;
            Ok(String::new())
        }
        P::RemoveX(p, n) => {
            xattr::remove(&at(p), n).map_err(io)?;
            Ok(String::new())
        }
        P::Write(p) => {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(at(p))
                .map_err(io)?;
            f.write_all(b"+nobody\n").map_err(io)?;
            drop(f);
            after(&at(p))
        }
        P::Truncate(p, l) => {
            nix::unistd::truncate(&at(p), *l as libc::off_t).map_err(nix_err)?;
            after(&at(p))
        }
        P::UtimeNow(p) => {
            utimensat(
                nix::fcntl::AT_FDCWD,
                &at(p),
                &TimeSpec::UTIME_NOW,
                &TimeSpec::UTIME_NOW,
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(nix_err)?;
            after(&at(p))
        }
        P::UtimeSet(p) => {
            utimensat(
                nix::fcntl::AT_FDCWD,
                &at(p),
                &TimeSpec::new(1_000_000, 5),
                &TimeSpec::new(2_000_000, 7),
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(nix_err)?;
            let m = std::fs::symlink_metadata(at(p)).map_err(io)?;
            Ok(format!(
                "mtime {}.{} atime {}.{}",
                m.mtime(),
                m.mtime_nsec(),
                m.atime(),
                m.atime_nsec()
            ))
        }
        P::Chmod(p, m) => {
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                &at(p),
                Mode::from_bits_truncate(*m),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(nix_err)?;
            after(&at(p))
        }
        P::Chown(p, u, g) => {
            std::os::unix::fs::lchown(at(p), *u, *g).map_err(io)?;
            after(&at(p))
        }
        P::Create(p, m) => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(*m)
                .open(at(p))
                .map_err(io)?;
            after(&at(p))
        }
        P::Mkdir(p, m) => {
            std::fs::DirBuilder::new()
                .mode(*m)
                .create(at(p))
                .map_err(io)?;
            after(&at(p))
        }
        P::Symlink(p, t) => {
            std::os::unix::fs::symlink(t, at(p)).map_err(io)?;
            after(&at(p))
        }
        P::Mkfifo(p, m) => {
            nix::unistd::mkfifo(&at(p), Mode::from_bits_truncate(*m)).map_err(nix_err)?;
            after(&at(p))
        }
        P::Link(a, b) => {
            std::fs::hard_link(at(a), at(b)).map_err(io)?;
            after(&at(b))
        }
        P::Rename(a, b) => {
            std::fs::rename(at(a), at(b)).map_err(io)?;
            after(&at(b))
        }
        P::Unlink(p) => std::fs::remove_file(at(p))
            .map(|_| String::new())
            .map_err(io),
        P::Rmdir(p) => std::fs::remove_dir(at(p))
            .map(|_| String::new())
            .map_err(io),
    }
}

/// Not a test of its own: the entry point of the helper process. Without `RSFS_PERM_HELPER_ROOT`
/// it does nothing.
#[test]
fn helper_runs_operations_as_nobody() {
    let Some(root) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let root = PathBuf::from(root);
    let groups = nix::unistd::getgroups().unwrap_or_default();
    println!(
        "{MARK}-ID\t{} {} {} {} [{}]",
        nix::unistd::getuid(),
        nix::unistd::geteuid(),
        nix::unistd::getgid(),
        nix::unistd::getegid(),
        groups
            .iter()
            .map(|g| g.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut out = std::io::stdout().lock();
    for (i, (_, op)) in operations().iter().enumerate() {
        let r = match run_op(&root, op) {
            Ok(s) => format!("ok {s}"),
            Err(e) => format!("err {e}"),
        };
        let _ = writeln!(out, "{MARK}\t{i}\t{}", r.replace(['\n', '\t'], " "));
    }
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------------
// The test.

/// Runs every operation as 65534:65534 on the tree at `root`; the result of each, by index.
fn run_as_nobody(root: &Path, n: usize) -> Result<Vec<String>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let out = Command::new(&exe)
        .args([HELPER_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, root)
        .env_remove("RUST_BACKTRACE")
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the helper {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut results = vec![None; n];
    let mut id = None;
    for line in stdout.lines() {
        // libtest may print its own text before the first line on the same line.
        if let Some((_, rest)) = line.split_once(&format!("{MARK}-ID\t")) {
            id = Some(rest.to_string());
        } else if let Some(rest) = line.strip_prefix(&format!("{MARK}\t")) {
            let (i, r) = rest.split_once('\t').ok_or("malformed helper line")?;
            let i: usize = i.parse().map_err(|_| "malformed helper index")?;
            results[i] = Some(r.to_string());
        }
    }
    let want_id = format!("{NOBODY} {NOBODY} {NOBODY} {NOBODY} []");
    if id.as_deref() != Some(want_id.as_str()) {
        return Err(format!(
            "helper credentials: {id:?}, want uid euid gid egid [groups] = {want_id:?}; \
             status {}; stderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let missing = results.iter().filter(|r| r.is_none()).count();
    if missing > 0 || !out.status.success() {
        return Err(format!(
            "helper on {}: {missing} of {n} results missing; status {}; stderr: {}",
            root.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(results.into_iter().map(Option::unwrap).collect())
}

/// What a successful create-type operation must leave: owner 65534, the group of a setgid
/// parent or 65534, the mode minus the umask (and setgid for a directory in a setgid one).
fn expected_creations(ops: &[(&'static str, P)]) -> BTreeMap<usize, String> {
    let setgid_dirs = ["/sg", "/nsg"];
    let mut umask = 0o022;
    let mut out = BTreeMap::new();
    for (i, (_, op)) in ops.iter().enumerate() {
        let (p, kind, mode) = match op {
            P::Umask(m) => {
                umask = *m;
                continue;
            }
            P::Create(p, m) => (p, "file", m & !umask),
            P::Mkdir(p, m) => (p, "dir", m & !umask),
            P::Mkfifo(p, m) => (p, "fifo", m & !umask),
            P::Symlink(p, _) => (p, "symlink", 0o777),
            _ => continue,
        };
        let parent = Path::new(p).parent().unwrap().to_str().unwrap();
        let in_setgid = setgid_dirs.contains(&parent);
        let gid = if in_setgid { GRP } else { NOBODY };
        // Under a default ACL the umask does not apply; the ACL's entries bound the mode.
        let mode = match (op, parent) {
            (P::Create(_, m) | P::Mkdir(_, m) | P::Mkfifo(_, m), "/dacl") => m & 0o750,
            _ => mode,
        };
        let mode = if in_setgid && kind == "dir" {
            mode | 0o2000
        } else {
            mode
        };
        let mut s = format!("ok -> {kind} {mode:04o} {NOBODY}:{gid}");
        if kind == "file" {
            s.push_str(" size=0 nlink=1");
        }
        out.insert(i, s);
    }
    out
}

/// xattrs of two upper snapshots: names and values; `trusted.overlay.origin` (a file handle
/// naming different inodes in the two copies) and `trusted.overlay.uuid` (random per upper)
/// by presence only.
fn compare_upper_xattrs(k: &Snapshot, o: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, ke) in &k.entries {
        let Some(oe) = o.entries.get(path) else {
            continue;
        };
        let norm = |x: &Result<Vec<(String, snapshot::XattrValue)>, i32>| -> Vec<String> {
            match x {
                Ok(v) => v
                    .iter()
                    .map(|(n, val)| match (n.as_str(), val) {
                        ("trusted.overlay.origin" | "trusted.overlay.uuid", _) => n.clone(),
                        (_, Ok(b)) => format!("{n}={}", snapshot::show_bytes(b)),
                        (_, Err(e)) => format!("{n}=error {e}"),
                    })
                    .collect(),
                Err(e) => vec![format!("listxattr error {e}")],
            }
        };
        let (kx, ox) = (norm(&ke.xattrs), norm(&oe.xattrs));
        if kx != ox {
            out.push(format!("{path}: xattrs: kernel={kx:?} vs ours={ox:?}"));
        }
    }
    out
}

/// Everything one run of the operations on both mounts produced.
struct Outcome {
    ops: Vec<(&'static str, P)>,
    kernel: Vec<String>,
    ours: Vec<String>,
    /// The merged trees afterwards, as root.
    kernel_tree: Snapshot,
    ours_tree: Snapshot,
    /// The upper layers afterwards.
    kernel_upper: Snapshot,
    ours_upper: Snapshot,
    ours_ended: common::Ended,
    _scratch: Scratch,
}

fn scenario() -> Outcome {
    let ops = operations();
    let n = ops.len();
    let scratch = Scratch::new();
    let ks = build_stack(&scratch, "k");
    let os = build_stack(&scratch, "o");
    let probes = SnapshotOpts::private_probes("trusted.overlay.");

    let km = common::mount_kernel(
        &[&ks.lowers[0], &ks.lowers[1]],
        Some((&ks.upper, &ks.work)),
        &[],
    );
    let kernel = run_as_nobody(km.path(), n).unwrap_or_else(|e| panic!("kernel side: {e}"));
    let kernel_tree = Snapshot::take(km.path(), &probes);
    assert!(km.unmount(), "umount of the kernel overlay failed");

    let mut om = common::mount_ours(
        &[&os.lowers[0], &os.lowers[1]],
        Some((&os.upper, &os.work)),
        &[],
    );
    let ours = run_as_nobody(om.path(), n);
    let ours_tree = ours
        .as_ref()
        .ok()
        .map(|_| Snapshot::take(om.path(), &probes));
    let stderr = om.stderr();
    let ours_ended = om.unmount();
    let ours = ours.unwrap_or_else(|e| panic!("our side: {e}; daemon stderr: {stderr}"));

    if std::env::var_os("RSFS_PERM_DUMP").is_some() {
        for (i, (phase, op)) in ops.iter().enumerate() {
            eprintln!(
                "#{i} [{phase}] {}: kernel={} ours={}",
                describe(op),
                kernel[i],
                ours[i]
            );
        }
    }
    Outcome {
        kernel_upper: Snapshot::take(&ks.upper, &SnapshotOpts::default()),
        ours_upper: Snapshot::take(&os.upper, &SnapshotOpts::default()),
        ops,
        kernel,
        ours,
        kernel_tree,
        ours_tree: ours_tree.expect("snapshot taken when the helper ran"),
        ours_ended,
        _scratch: scratch,
    }
}

fn fail_with(sections: &[(&str, &Vec<String>)]) {
    let mut msg = String::new();
    for (title, items) in sections {
        if !items.is_empty() {
            let _ = writeln!(msg, "{} difference(s) in {title}:", items.len());
            for it in items.iter() {
                let _ = writeln!(msg, "  {it}");
            }
        }
    }
    assert!(msg.is_empty(), "{msg}");
}

/// Times and inode numbers are the other differential tests' business.
fn skip_times_and_inos() -> CompareOpts {
    CompareOpts::new()
        .skip("ino")
        .skip("d_ino")
        .skip("mtime")
        .skip("ctime")
}

#[test]
fn unprivileged_caller_gets_the_kernels_results() {
    if !common::require_root_and_fuse() {
        return;
    }
    let out = scenario();
    let (ops, kernel, ours) = (&out.ops, &out.kernel, &out.ours);
    let mut report = Vec::new();
    let mut per_phase: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for (i, (phase, op)) in ops.iter().enumerate() {
        let e = per_phase.entry(phase).or_default();
        e.0 += 1;
        if kernel[i] != ours[i] {
            e.1 += 1;
            report.push(format!(
                "op #{i} [{phase}] {}: kernel={} ours={}",
                describe(op),
                kernel[i],
                ours[i]
            ));
        }
    }
    let mut creation = Vec::new();
    for (i, want) in expected_creations(ops) {
        for (side, res) in [("kernel", &kernel[i]), ("ours", &ours[i])] {
            if res.starts_with("ok") && *res != want {
                creation.push(format!(
                    "op #{i} {} on {side}: {res}, want {want}",
                    describe(&ops[i].1)
                ));
            }
        }
    }
    let tree = snapshot::compare(
        "kernel",
        &out.kernel_tree,
        "ours",
        &out.ours_tree,
        &skip_times_and_inos(),
    );
    let mut daemon = Vec::new();
    if out.ours_ended.daemon != common::DaemonExit::Exited(0) {
        daemon.push(format!(
            "our daemon ended with {:?}; stderr: {}",
            out.ours_ended.daemon, out.ours_ended.stderr
        ));
    }
    let ok_ops = kernel.iter().filter(|r| r.starts_with("ok")).count();
    eprintln!(
        "permissions: {} operations as {NOBODY}:{NOBODY} ({ok_ops} succeed under the kernel); \
         {} differ; per phase (ops, differing): {per_phase:?}; {} creation expectations \
         failed; {} merged-tree differences",
        ops.len(),
        report.len(),
        creation.len(),
        tree.len(),
    );
    fail_with(&[
        ("operation results (kernel vs ours)", &report),
        ("owner/mode of created objects", &creation),
        ("merged trees afterwards", &tree),
        ("daemon exit", &daemon),
    ]);
}

#[test]
fn unprivileged_callers_changes_leave_the_kernels_upper_layer() {
    if !common::require_root_and_fuse() {
        return;
    }
    let out = scenario();
    // The kernel links all its whiteouts to one shared inode: their nlink is not format.
    let mut opts = skip_times_and_inos().skip("xattrs");
    for (path, e) in &out.kernel_upper.entries {
        if let Ok(st) = &e.stat {
            if st.kind == snapshot::Kind::CharDev && st.rdev == 0 {
                opts = opts.skip_at(path, "nlink");
            }
        }
    }
    let mut upper = snapshot::compare("kernel", &out.kernel_upper, "ours", &out.ours_upper, &opts);
    upper.extend(compare_upper_xattrs(&out.kernel_upper, &out.ours_upper));
    eprintln!(
        "permissions: {} upper-layer differences after {} operations",
        upper.len(),
        out.ops.len()
    );
    fail_with(&[("upper layers afterwards (kernel vs ours)", &upper)]);
}
