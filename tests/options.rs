//! fuse-overlayfs's mount options, each checked for what it means.
//!
//! Ids (`uidmapping=`, `gidmapping=`, `squash_to_root`, `squash_to_uid=`, `squash_to_gid=`): a
//! differential against fuse-overlayfs 1.x mounted with the same options on an identical copy
//! of a small stack (files, directories, symlinks and a merged directory owned by disk ids 0, 1,
//! 1000, 65536, 65537, 100000, 200000; a lower file with a POSIX ACL). For each option set:
//! - `lstat` of every entry through both mounts agrees (type, mode, uid, gid), and ours shows
//!   each object's disk ids through the mapping (or the squash id);
//! - the same operations, as root and then as a uid/gid inside the presented range (creates,
//!   mkdir, symlink, chown to presented / unmapped ids, lchown, chgrp, chmod, access and default
//!   ACLs set with `setfattr`, a read that only a named ACL entry allows), give the same results;
//! - afterwards the two upper layers hold the same entries (fuse-overlayfs's own `.wh.` opaque
//!   markers aside) with the same numeric owners and modes, and ours stores every caller id
//!   (creator, chown target, ACL entry) mapped back to its disk id (65534 when no range holds
//!   it).
//!
//! POSIX ACLs are checked entry by entry: their shape (tags, permissions) must agree between the
//! two; the ids named in them must be, for ours, the disk ids on disk and the presented ids
//! through the mount, mapped by the ranges only (squashing is about owners: an ACL whose named
//! entries were all squashed to one id is malformed, `setfacl -m` refuses to edit it, and the
//! kernel would enforce it against the wrong users). fuse-overlayfs 1.x translates no ACL (it
//! stores and shows the ids it is given, so with a mapping it enforces them against the wrong
//! users); where it does exactly that, the test prints the divergence and goes on, and fails on
//! anything else. Objects created under a default ACL are checked on ours only
//! (`default_acl_inheritance_through_a_mapping`): fuse-overlayfs 1.x drops the default ACL when
//! it creates in its workdir and applies the umask where POSIX says the default ACL replaces it.
//!
//! The other options are asserted directly on our mount: `static_nlink`, `noacl`, `noxattrs=`,
//! `fsync=`, `threaded=`/`threads=`/`timeout=` (accepted, and `timeout=0` shows a change made
//! directly in the upper), `context=` (accepted silently) and `plugins=` (refused).
//!
//! Needs root, /dev/fuse, fuse-overlayfs and `setfattr` (package attr); the ACL parts need a
//! filesystem with ACLs under /tmp.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mountinfo::{mount_at, mounts_under};
use common::mounts::{force_unmount, fuse_overlayfs_bin};
use common::{
    DaemonExit, DaemonMount, Layer, Scratch, mount_fuse_overlayfs, mount_ours, os, our_bin,
    run_with_timeout, xattr,
};

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Root, /dev/fuse, and for the differential fuse-overlayfs and setfattr: skip without them,
/// fail under CI.
fn require(peer: bool) -> bool {
    if !common::require_root_and_fuse() {
        return false;
    }
    let mut missing = Vec::new();
    if peer && !fuse_overlayfs_bin().exists() {
        missing.push(fuse_overlayfs_bin().display().to_string());
    }
    if peer && Command::new("setfattr").arg("--version").output().is_err() {
        missing.push("setfattr (package attr)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    if under_ci() {
        panic!("missing {missing:?} (CI=true makes this a failure)");
    }
    eprintln!("SKIP: missing {missing:?}");
    false
}

// ---------------------------------------------------------------------------------------------
// POSIX ACLs in the kernel's xattr encoding.

const ACL_ACCESS: &str = "system.posix_acl_access";
const ACL_DEFAULT: &str = "system.posix_acl_default";
const A_USER_OBJ: u16 = 0x01;
const A_USER: u16 = 0x02;
const A_GROUP_OBJ: u16 = 0x04;
const A_GROUP: u16 = 0x08;
const A_MASK: u16 = 0x10;
const A_OTHER: u16 = 0x20;
const UNDEF: u32 = u32::MAX;

type AclEntry = (u16, u16, u32);

/// Version 2, then `tag: u16, perm: u16, id: u32` per entry, little-endian.
fn acl(entries: &[AclEntry]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

fn parse_acl(v: &[u8]) -> Option<Vec<AclEntry>> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || v[..4] != 2u32.to_le_bytes() {
        return None;
    }
    Some(
        v[4..]
            .chunks_exact(8)
            .map(|e| {
                (
                    u16::from_le_bytes([e[0], e[1]]),
                    u16::from_le_bytes([e[2], e[3]]),
                    u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect(),
    )
}

fn show_acl(v: &[u8]) -> String {
    let Some(es) = parse_acl(v) else {
        return format!("unparsable {v:02x?}");
    };
    let mut out = Vec::new();
    for (tag, perm, id) in es {
        let p = format!(
            "{}{}{}",
            if perm & 4 != 0 { 'r' } else { '-' },
            if perm & 2 != 0 { 'w' } else { '-' },
            if perm & 1 != 0 { 'x' } else { '-' }
        );
        out.push(match tag {
            A_USER_OBJ => format!("user::{p}"),
            A_USER => format!("user:{id}:{p}"),
            A_GROUP_OBJ => format!("group::{p}"),
            A_GROUP => format!("group:{id}:{p}"),
            A_MASK => format!("mask::{p}"),
            A_OTHER => format!("other::{p}"),
            t => format!("tag{t:#x}:{id}:{p}"),
        });
    }
    out.join(",")
}

/// The value's named entries (`user:ID`, `group:ID`) in order.
fn named_ids(v: &[u8]) -> Vec<(u16, u32)> {
    parse_acl(v)
        .unwrap_or_default()
        .into_iter()
        .filter(|(t, _, _)| *t == A_USER || *t == A_GROUP)
        .map(|(t, _, id)| (t, id))
        .collect()
}

/// Everything but the named ids: tags, permissions, and the ids of the other entries.
fn acl_shape(v: &[u8]) -> Option<Vec<AclEntry>> {
    parse_acl(v).map(|es| {
        es.into_iter()
            .map(|(t, p, id)| match t {
                A_USER | A_GROUP => (t, p, 0),
                _ => (t, p, id),
            })
            .collect()
    })
}

fn hex(v: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in v {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Set on /root0 by root: named ids in the presented range, one no range holds, groups.
fn acl_root0() -> Vec<u8> {
    acl(&[
        (A_USER_OBJ, 6, UNDEF),
        (A_USER, 4, 100_005),
        (A_USER, 4, 7),
        (A_GROUP_OBJ, 4, UNDEF),
        (A_GROUP, 6, 300_002),
        (A_GROUP, 4, 200_000),
        (A_MASK, 6, UNDEF),
        (A_OTHER, 4, UNDEF),
    ])
}

/// A default ACL: new objects grant presented user 101000 rwx.
fn acl_default_101000() -> Vec<u8> {
    acl(&[
        (A_USER_OBJ, 7, UNDEF),
        (A_USER, 7, 101_000),
        (A_GROUP_OBJ, 7, UNDEF),
        (A_MASK, 7, UNDEF),
        (A_OTHER, 7, UNDEF),
    ])
}

/// Set by the unprivileged caller on the file it created.
fn acl_user_set() -> Vec<u8> {
    acl(&[
        (A_USER_OBJ, 6, UNDEF),
        (A_USER, 4, 100_005),
        (A_GROUP_OBJ, 4, UNDEF),
        (A_MASK, 6, UNDEF),
        (A_OTHER, 4, UNDEF),
    ])
}

/// On /acl_low in the lower layer (disk ids): only the named entry for disk user 1000 can
/// read; the owner is disk 0, the owning group disk 0, others nothing.
fn acl_lower() -> Vec<u8> {
    acl(&[
        (A_USER_OBJ, 6, UNDEF),
        (A_USER, 4, 1000),
        (A_GROUP_OBJ, 0, UNDEF),
        (A_GROUP, 4, 65_536),
        (A_MASK, 4, UNDEF),
        (A_OTHER, 0, UNDEF),
    ])
}

// ---------------------------------------------------------------------------------------------
// The stack.

#[derive(Clone, Copy)]
enum Kind {
    File,
    Dir,
    Symlink(&'static str),
}

struct Obj {
    /// 0 is the topmost lower.
    layer: usize,
    path: &'static str,
    kind: Kind,
    uid: u32,
    gid: u32,
    mode: u32,
}

const fn o(layer: usize, path: &'static str, kind: Kind, uid: u32, gid: u32, mode: u32) -> Obj {
    Obj {
        layer,
        path,
        kind,
        uid,
        gid,
        mode,
    }
}

use Kind::{Dir, File, Symlink};

const STACK: &[Obj] = &[
    o(1, "root0", File, 0, 0, 0o644),
    o(1, "one", File, 1, 1, 0o644),
    o(1, "k1000", File, 1000, 1000, 0o644),
    o(1, "big", File, 65_536, 65_536, 0o644),
    o(1, "h100000", File, 100_000, 100_000, 0o644),
    o(1, "h200000", File, 200_000, 200_000, 0o644),
    o(1, "acl_low", File, 0, 0, 0o640),
    o(1, "dir1000", Dir, 1000, 1000, 0o755),
    o(1, "dir1000/own", File, 1000, 0, 0o644),
    o(1, "dir1000/inner", File, 1, 65_537, 0o644),
    o(1, "merged", Dir, 65_536, 65_536, 0o755),
    o(1, "merged/low", File, 100_000, 1, 0o644),
    o(1, "sl_one", Symlink("one"), 1, 1, 0),
    o(1, "sl_far", Symlink("h200000"), 200_000, 100_000, 0),
    o(1, "pub", Dir, 0, 0, 0o777),
    o(0, "merged", Dir, 0, 0, 0o755),
    o(0, "merged/top", File, 1000, 65_536, 0o644),
    o(0, "d0", Dir, 100_000, 100_000, 0o755),
    o(0, "d0/f", File, 0, 1000, 0o644),
    o(0, "sl_top", Symlink("d0/f"), 65_536, 1000, 0),
];

struct Stack {
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
}

impl Stack {
    fn build(scratch: &Scratch, tag: &str) -> Stack {
        let lowers: Vec<PathBuf> = (0..2)
            .map(|i| scratch.dir(&format!("{tag}/l{i}")))
            .collect();
        for ob in STACK {
            let l = Layer::new(&lowers[ob.layer]);
            match ob.kind {
                File => l.file(ob.path, ob.path),
                Dir => l.dir(ob.path),
                Symlink(t) => l.symlink(ob.path, t),
            };
            l.owner(ob.path, ob.uid, ob.gid);
            if !matches!(ob.kind, Symlink(_)) {
                l.mode(ob.path, ob.mode);
            }
        }
        Layer::new(&lowers[1]).xattr("acl_low", ACL_ACCESS, acl_lower());
        Stack {
            lowers,
            upper: scratch.dir(&format!("{tag}/u")),
            work: scratch.dir(&format!("{tag}/w")),
        }
    }

    fn lower_refs(&self) -> Vec<&Path> {
        self.lowers.iter().map(PathBuf::as_path).collect()
    }

    fn upper_work(&self) -> Option<(&Path, &Path)> {
        Some((&self.upper, &self.work))
    }

    /// The object a merged path stands for, on disk: the upper's, else the topmost lower's
    /// (this stack has no whiteouts or opaque directories).
    fn on_disk(&self, rel: &str) -> Option<std::fs::Metadata> {
        std::iter::once(&self.upper)
            .chain(&self.lowers)
            .find_map(|root| std::fs::symlink_metadata(at(root, rel)).ok())
    }
}

fn at(root: &Path, rel: &str) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

// ---------------------------------------------------------------------------------------------
// What the options mean, computed independently of the daemon.

#[derive(Clone, Debug)]
struct Ids {
    /// `(disk, presented, len)`; empty: every id is itself.
    ranges: Vec<(u32, u32, u32)>,
    squash: Option<u32>,
}

impl Ids {
    fn new(ranges: &[(u32, u32, u32)], squash: Option<u32>) -> Ids {
        Ids {
            ranges: ranges.to_vec(),
            squash,
        }
    }

    /// Through the ranges only (what ACL entries get).
    fn ranged(&self, disk: u32) -> u32 {
        if self.ranges.is_empty() {
            return disk;
        }
        self.ranges
            .iter()
            .find(|(d, _, n)| disk >= *d && disk - d < *n)
            .map_or(65_534, |(d, p, _)| p + (disk - d))
    }

    /// The owner shown for a disk id.
    fn shown(&self, disk: u32) -> u32 {
        self.squash.unwrap_or_else(|| self.ranged(disk))
    }

    /// The disk id stored for a presented id.
    fn stored(&self, presented: u32) -> u32 {
        if self.ranges.is_empty() {
            return presented;
        }
        self.ranges
            .iter()
            .find(|(_, p, n)| presented >= *p && presented - p < *n)
            .map_or(65_534, |(d, p, _)| d + (presented - p))
    }
}

struct Case {
    name: &'static str,
    opts: &'static [&'static str],
    uids: Ids,
    gids: Ids,
    /// The unprivileged caller: presented uid and gid.
    user: (u32, u32),
}

const UIDMAP: &str = "uidmapping=0:100000:65536:100000:0:1";
const GIDMAP: &str = "gidmapping=:0:200000:1000:1000:1000:1:65536:300000:10";
const UID_RANGES: &[(u32, u32, u32)] = &[(0, 100_000, 65_536), (100_000, 0, 1)];
const GID_RANGES: &[(u32, u32, u32)] =
    &[(0, 200_000, 1000), (1000, 1000, 1), (65_536, 300_000, 10)];

fn case_mapping() -> Case {
    Case {
        name: "uidmapping+gidmapping",
        opts: &[UIDMAP, GIDMAP],
        uids: Ids::new(UID_RANGES, None),
        gids: Ids::new(GID_RANGES, None),
        user: (101_000, 1000),
    }
}

fn case_squash_ids() -> Case {
    Case {
        name: "squash_to_uid+squash_to_gid+squash_to_root",
        opts: &["squash_to_uid=4242", "squash_to_gid=4343", "squash_to_root"],
        uids: Ids::new(&[], Some(4242)),
        gids: Ids::new(&[], Some(4343)),
        user: (1000, 1000),
    }
}

fn case_mapping_squash_root() -> Case {
    Case {
        name: "uidmapping+gidmapping+squash_to_root+squash_to_gid",
        opts: &[UIDMAP, GIDMAP, "squash_to_root", "squash_to_gid=5"],
        uids: Ids::new(UID_RANGES, Some(0)),
        gids: Ids::new(GID_RANGES, Some(5)),
        user: (101_000, 1000),
    }
}

// ---------------------------------------------------------------------------------------------
// Observations.

fn kind_name(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    }
}

/// Every path under `root` (`""` is the root), sorted, without following symlinks.
fn walk(root: &Path) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut i = 0;
    while i < out.len() {
        let rel = out[i].clone();
        i += 1;
        let p = at(root, &rel);
        let is_dir = std::fs::symlink_metadata(&p)
            .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
            .is_dir();
        if !is_dir {
            continue;
        }
        let mut names: Vec<String> = std::fs::read_dir(&p)
            .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .into_string()
                    .expect("UTF-8")
            })
            .collect();
        names.sort();
        for n in names {
            out.push(if rel.is_empty() {
                n
            } else {
                format!("{rel}/{n}")
            });
        }
    }
    out.sort();
    out
}

/// `path -> "kind mode uid:gid"` for every entry.
fn owners(root: &Path) -> BTreeMap<String, String> {
    walk(root)
        .into_iter()
        .map(|rel| {
            let m = std::fs::symlink_metadata(at(root, &rel)).expect("lstat");
            let mode = if m.file_type().is_symlink() {
                0
            } else {
                m.mode() & 0o7777
            };
            let v = format!(
                "{} {mode:04o} {}:{}",
                kind_name(m.file_type()),
                m.uid(),
                m.gid()
            );
            (format!("/{rel}"), v)
        })
        .collect()
}

/// `(path, ACL xattr name) -> value` for every entry that has one.
fn acls(root: &Path) -> BTreeMap<(String, &'static str), Vec<u8>> {
    let mut out = BTreeMap::new();
    for rel in walk(root) {
        let p = at(root, &rel);
        if std::fs::symlink_metadata(&p).expect("lstat").is_symlink() {
            continue;
        }
        for name in [ACL_ACCESS, ACL_DEFAULT] {
            match xattr::get(&p, name) {
                Ok(v) => {
                    out.insert((format!("/{rel}"), name), v);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => panic!("getxattr {name} on {}: {e}", p.display()),
            }
        }
    }
    out
}

/// The last component of `path` is an OCI whiteout or opaque marker (`.wh.*`).
fn is_oci_marker(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|n| n.starts_with(".wh."))
}

fn diff_maps(
    what: &str,
    l: &str,
    lm: &BTreeMap<String, String>,
    r: &str,
    rm: &BTreeMap<String, String>,
) -> Vec<String> {
    let keys: BTreeSet<&String> = lm.keys().chain(rm.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (a, b) = (lm.get(k), rm.get(k));
            (a != b).then(|| {
                format!(
                    "{what}: {k}: {l}={} vs {r}={}",
                    a.map_or("absent", String::as_str),
                    b.map_or("absent", String::as_str)
                )
            })
        })
        .collect()
}

/// Ours shows each object's disk ids through the mapping (or the squash ids).
fn check_shown_ids(case: &Case, copy: &Stack, mnt: &Path, when: &str) -> Vec<String> {
    let mut out = Vec::new();
    for rel in walk(mnt) {
        let shown = std::fs::symlink_metadata(at(mnt, &rel)).expect("lstat through the mount");
        let Some(disk) = copy.on_disk(&rel) else {
            out.push(format!(
                "{when}: /{rel}: shown through ours but on no layer"
            ));
            continue;
        };
        let want = (case.uids.shown(disk.uid()), case.gids.shown(disk.gid()));
        if (shown.uid(), shown.gid()) != want {
            out.push(format!(
                "{when}: /{rel}: ours shows {}:{} for disk {}:{}, want {}:{}",
                shown.uid(),
                shown.gid(),
                disk.uid(),
                disk.gid(),
                want.0,
                want.1
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The operations, run with sh as root and as the unprivileged caller.

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `(name, argv)` run in the mount root; the names of ops whose outcome depends on ACL
/// enforcement start with `acl_read`.
type Ops = Vec<(&'static str, Vec<String>)>;

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn root_ops() -> Ops {
    vec![
        ("create", v(&["touch", "newf_root"])),
        ("mkdir", v(&["mkdir", "newd_root"])),
        ("mkdir_in_merged", v(&["mkdir", "merged/newsub"])),
        ("symlink", v(&["ln", "-s", "one", "sl_new"])),
        ("chown_in_range", v(&["chown", "100001:200002", "one"])),
        ("chown_to_root", v(&["chown", "0:300001", "h200000"])),
        ("chown_unmapped", v(&["chown", "5:5", "big"])),
        (
            "lchown_symlink",
            v(&["chown", "-h", "101000:1000", "sl_one"]),
        ),
        ("chown_dir", v(&["chown", "101000:1000", "d0"])),
        (
            "acl_set_access",
            v(&[
                "setfattr",
                "-n",
                ACL_ACCESS,
                "-v",
                &hex(&acl_root0()),
                "root0",
            ]),
        ),
        (
            "acl_set_default",
            v(&[
                "setfattr",
                "-n",
                ACL_DEFAULT,
                "-v",
                &hex(&acl_default_101000()),
                "d0",
            ]),
        ),
    ]
}

fn user_ops(case: &Case) -> Ops {
    let g = case.user.1.to_string();
    vec![
        ("u_create", v(&["touch", "pub/newf_user"])),
        ("u_mkdir", v(&["mkdir", "pub/newd_user"])),
        ("u_chgrp_own", v(&["chgrp", &g, "dir1000/own"])),
        ("u_chown_other", v(&["chown", "100001", "k1000"])),
        (
            "u_acl_set",
            v(&[
                "setfattr",
                "-n",
                ACL_ACCESS,
                "-v",
                &hex(&acl_user_set()),
                "pub/newf_user",
            ]),
        ),
        ("acl_read_named_entry", v(&["cat", "acl_low"])),
        ("u_create_in_own_dir", v(&["touch", "dir1000/newf2"])),
        ("u_symlink", v(&["ln", "-s", "x", "dir1000/sl_user"])),
        ("u_chmod", v(&["chmod", "0600", "k1000"])),
    ]
}

/// Runs `ops` in `root` as `who` (None: root), umask 022: `name -> "rc stderr"`.
fn run_ops(root: &Path, ops: &Ops, who: Option<(u32, u32)>) -> BTreeMap<String, String> {
    let mut script = String::from(
        "cd \"$1\" || exit 99\numask 022\n\
         op() { n=$1; shift; e=$(\"$@\" 2>&1 >/dev/null); rc=$?; \
         printf '%s\\t%s\\t%s\\n' \"$n\" \"$rc\" \"$(printf %s \"$e\" | tr '\\n\\t' '  ')\"; }\n",
    );
    for (name, argv) in ops {
        let args: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        let _ = writeln!(script, "op {name} {}", args.join(" "));
    }
    let mut cmd = Command::new("sh");
    cmd.args([os("-c"), os(&script), os("sh"), os(root)])
        .current_dir("/")
        .stdin(Stdio::null());
    if let Some((u, g)) = who {
        // As root, std's Command also drops the supplementary groups.
        cmd.uid(u).gid(g);
    }
    let out = cmd.output().expect("run sh");
    assert!(
        out.status.success(),
        "ops script in {}: {}; stderr {}",
        root.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut res = BTreeMap::new();
    for line in stdout.lines() {
        let mut it = line.splitn(3, '\t');
        let (n, rc, err) = (it.next(), it.next(), it.next());
        if let (Some(n), Some(rc)) = (n, rc) {
            res.insert(
                n.to_string(),
                format!("rc={rc} {}", err.unwrap_or("").trim()),
            );
        }
    }
    assert_eq!(res.len(), ops.len(), "ops output: {stdout}");
    res
}

fn succeeded(results: &BTreeMap<String, String>, name: &str) -> bool {
    results.get(name).is_some_and(|r| r.starts_with("rc=0"))
}

// ---------------------------------------------------------------------------------------------
// ACL expectations.

/// Where the named ids of an ACL come from.
#[derive(Clone)]
enum Origin {
    /// Written through the mount with these presented ids.
    Written(Vec<(u16, u32)>),
    /// Stored in a lower layer with these disk ids.
    Lower(Vec<(u16, u32)>),
}

/// Every ACL the stack holds after the operations, with where its named ids come from.
fn expected_acls(
    ours_results: &BTreeMap<String, String>,
) -> BTreeMap<(String, &'static str), Origin> {
    let w = |v: &[u8]| Origin::Written(named_ids(v));
    let mut m = BTreeMap::new();
    m.insert(
        ("/acl_low".into(), ACL_ACCESS),
        Origin::Lower(named_ids(&acl_lower())),
    );
    if succeeded(ours_results, "acl_set_access") {
        m.insert(("/root0".into(), ACL_ACCESS), w(&acl_root0()));
    }
    if succeeded(ours_results, "acl_set_default") {
        m.insert(("/d0".into(), ACL_DEFAULT), w(&acl_default_101000()));
    }
    if succeeded(ours_results, "u_acl_set") {
        m.insert(("/pub/newf_user".into(), ACL_ACCESS), w(&acl_user_set()));
    }
    m
}

fn map_named(
    ids: &[(u16, u32)],
    u: impl Fn(u32) -> u32,
    g: impl Fn(u32) -> u32,
) -> Vec<(u16, u32)> {
    ids.iter()
        .map(|&(t, id)| (t, if t == A_USER { u(id) } else { g(id) }))
        .collect()
}

impl Origin {
    /// The named ids ours must store on disk.
    fn on_disk(&self, c: &Case) -> Vec<(u16, u32)> {
        match self {
            Origin::Written(p) => map_named(p, |i| c.uids.stored(i), |i| c.gids.stored(i)),
            Origin::Lower(d) => d.clone(),
        }
    }

    /// The named ids ours must show through the mount: the ranges only, no squashing.
    fn shown(&self, c: &Case) -> Vec<(u16, u32)> {
        map_named(&self.on_disk(c), |i| c.uids.ranged(i), |i| c.gids.ranged(i))
    }

    /// fuse-overlayfs 1.x translates no ACL: what it was given is what it stores and shows.
    fn untranslated(&self) -> Vec<(u16, u32)> {
        match self {
            Origin::Written(v) | Origin::Lower(v) => v.clone(),
        }
    }
}

/// Compares ACLs of one view (through the mounts, or the uppers on disk). Failures go to the
/// returned list; fuse-overlayfs's untranslated ids are printed as a known divergence.
fn check_acls(
    case: &Case,
    view: &str,
    on_disk: bool,
    expected: &BTreeMap<(String, &'static str), Origin>,
    fo: &BTreeMap<(String, &'static str), Vec<u8>>,
    ours: &BTreeMap<(String, &'static str), Vec<u8>>,
    notes: &mut Vec<String>,
) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<_> = fo.keys().chain(ours.keys()).collect();
    for key in keys {
        let (path, name) = key;
        let (f, o) = (fo.get(key), ours.get(key));
        let show = |x: Option<&Vec<u8>>| x.map_or("absent".into(), |v| show_acl(v));
        let (Some(f), Some(o)) = (f, o) else {
            out.push(format!(
                "{view}: {path} {name}: fuse-overlayfs={} vs ours={}",
                show(f),
                show(o)
            ));
            continue;
        };
        if acl_shape(f) != acl_shape(o) || acl_shape(o).is_none() {
            out.push(format!(
                "{view}: {path} {name}: entries differ: fuse-overlayfs={} vs ours={}",
                show_acl(f),
                show_acl(o)
            ));
        }
        // Lower ACLs that were not copied up are not in the upper.
        let Some(origin) = expected.get(key) else {
            out.push(format!(
                "{view}: {path} {name}: unexpected ACL {}",
                show_acl(o)
            ));
            continue;
        };
        let want = if on_disk {
            origin.on_disk(case)
        } else {
            origin.shown(case)
        };
        if named_ids(o) != want {
            out.push(format!(
                "{view}: {path} {name}: ours has named ids {:?}, want {want:?} ({})",
                named_ids(o),
                show_acl(o)
            ));
        }
        if named_ids(f) != named_ids(o) {
            if named_ids(f) == origin.untranslated() {
                notes.push(format!(
                    "{view}: {path} {name}: fuse-overlayfs 1.x leaves ACL ids untranslated: {} \
                     (ours: {})",
                    show_acl(f),
                    show_acl(o)
                ));
            } else {
                out.push(format!(
                    "{view}: {path} {name}: fuse-overlayfs={} vs ours={}",
                    show_acl(f),
                    show_acl(o)
                ));
            }
        }
    }
    for key in expected.keys() {
        let in_view = ours.contains_key(key) || fo.contains_key(key);
        // On disk, only what was written or copied up is in the upper.
        let required = !on_disk || matches!(expected[key], Origin::Written(_));
        if required && !in_view {
            out.push(format!("{view}: {} {}: ACL missing on both", key.0, key.1));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The differential.

fn id_differential(case: &Case) {
    let scratch = Scratch::new();
    let fo_copy = Stack::build(&scratch, "f");
    let our_copy = Stack::build(&scratch, "o");
    let fm = mount_fuse_overlayfs(&fo_copy.lower_refs(), fo_copy.upper_work(), case.opts);
    let om = mount_ours(&our_copy.lower_refs(), our_copy.upper_work(), case.opts);
    let (fp, op) = (fm.path().to_path_buf(), om.path().to_path_buf());
    let mut fails = Vec::new();
    let mut notes = Vec::new();

    // Before any change.
    fails.extend(diff_maps(
        "lstat before",
        "fuse-overlayfs",
        &owners(&fp),
        "ours",
        &owners(&op),
    ));
    fails.extend(check_shown_ids(case, &our_copy, &op, "before"));

    // The operations, as root, then as the unprivileged caller.
    let mut fr = run_ops(&fp, &root_ops(), None);
    let mut or = run_ops(&op, &root_ops(), None);
    fr.extend(run_ops(&fp, &user_ops(case), Some(case.user)));
    or.extend(run_ops(&op, &user_ops(case), Some(case.user)));
    let acl_dependent = |n: &String| n.starts_with("acl_read");
    let strip = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
        m.iter()
            .filter(|(k, _)| !acl_dependent(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    fails.extend(diff_maps(
        "op",
        "fuse-overlayfs",
        &strip(&fr),
        "ours",
        &strip(&or),
    ));
    // The named entry for disk user 1000 is the caller's in every case (presented 101000 by
    // the ranges, or 1000 itself without them): ours must let it read.
    for n in or.keys().filter(|n| acl_dependent(n)) {
        if !succeeded(&or, n) {
            fails.push(format!(
                "op {n}: ours: {} (want success: the ACL grants it)",
                or[n]
            ));
        }
        if fr[n] != or[n] {
            notes.push(format!(
                "op {n}: fuse-overlayfs {} vs ours {}: it enforces the untranslated ACL",
                fr[n], or[n]
            ));
        }
    }

    // Through the mounts afterwards.
    fails.extend(diff_maps(
        "lstat after",
        "fuse-overlayfs",
        &owners(&fp),
        "ours",
        &owners(&op),
    ));
    fails.extend(check_shown_ids(case, &our_copy, &op, "after"));
    let expected = expected_acls(&or);
    fails.extend(check_acls(
        case,
        "through the mounts",
        false,
        &expected,
        &acls(&fp),
        &acls(&op),
        &mut notes,
    ));

    let ended = om.unmount();
    if ended.daemon != DaemonExit::Exited(0) {
        fails.push(format!(
            "our daemon ended {:?}: {}",
            ended.daemon, ended.stderr
        ));
    }
    fm.unmount();

    // The uppers on disk. fuse-overlayfs marks each directory it creates opaque with its own
    // `.wh..wh..opq` entries; ours writes the kernel's format, with no `.wh.` names.
    let our_upper = owners(&our_copy.upper);
    for p in our_upper.keys().filter(|p| is_oci_marker(p)) {
        fails.push(format!("upper: ours has an OCI marker {p}"));
    }
    let mut fo_upper = owners(&fo_copy.upper);
    fo_upper.retain(|p, _| !is_oci_marker(p));
    fails.extend(diff_maps(
        "upper",
        "fuse-overlayfs",
        &fo_upper,
        "ours",
        &our_upper,
    ));
    let mut fo_acls = acls(&fo_copy.upper);
    fo_acls.retain(|(p, _), _| !is_oci_marker(p));
    fails.extend(check_acls(
        case,
        "upper on disk",
        true,
        &expected,
        &fo_acls,
        &acls(&our_copy.upper),
        &mut notes,
    ));
    fails.extend(check_stored_ids(case, &our_copy.upper, &or));

    for n in &notes {
        eprintln!("[{}] known fuse-overlayfs 1.x divergence: {n}", case.name);
    }
    assert!(
        fails.is_empty(),
        "[{}] {} problem(s):\n  {}\nops (ours): {or:#?}\nops (fuse-overlayfs): {fr:#?}",
        case.name,
        fails.len(),
        fails.join("\n  ")
    );
}

/// The ids ours stored for what the operations created or chowned.
fn check_stored_ids(case: &Case, upper: &Path, ours: &BTreeMap<String, String>) -> Vec<String> {
    let (u, g) = (&case.uids, &case.gids);
    let root = (u.stored(0), g.stored(0));
    let user = (u.stored(case.user.0), g.stored(case.user.1));
    let mut want: Vec<(&str, &str, (u32, u32))> = vec![
        ("create", "newf_root", root),
        ("mkdir", "newd_root", root),
        ("mkdir_in_merged", "merged/newsub", root),
        ("symlink", "sl_new", root),
        (
            "chown_in_range",
            "one",
            (u.stored(100_001), g.stored(200_002)),
        ),
        ("chown_to_root", "h200000", (u.stored(0), g.stored(300_001))),
        ("chown_unmapped", "big", (u.stored(5), g.stored(5))),
        (
            "lchown_symlink",
            "sl_one",
            (u.stored(101_000), g.stored(1000)),
        ),
        ("chown_dir", "d0", (u.stored(101_000), g.stored(1000))),
        ("u_create", "pub/newf_user", user),
        ("u_mkdir", "pub/newd_user", user),
        ("u_chgrp_own", "dir1000/own", (1000, g.stored(case.user.1))),
        ("u_create_in_own_dir", "dir1000/newf2", user),
        ("u_symlink", "dir1000/sl_user", user),
    ];
    want.retain(|(op, _, _)| succeeded(ours, op));
    let mut out = Vec::new();
    for (op, rel, ids) in want {
        match std::fs::symlink_metadata(upper.join(rel)) {
            Ok(m) if (m.uid(), m.gid()) == ids => {}
            Ok(m) => out.push(format!(
                "upper /{rel} (after {op}): ours stored {}:{}, want {}:{}",
                m.uid(),
                m.gid(),
                ids.0,
                ids.1
            )),
            Err(e) => out.push(format!("upper /{rel} (after {op}): {e}")),
        }
    }
    out
}

#[test]
fn uid_and_gid_mapping_matches_fuse_overlayfs() {
    if !require(true) {
        return;
    }
    id_differential(&case_mapping());
}

#[test]
fn squash_to_uid_gid_root_matches_fuse_overlayfs() {
    if !require(true) {
        return;
    }
    id_differential(&case_squash_ids());
}

#[test]
fn mapping_with_squash_to_root_matches_fuse_overlayfs() {
    if !require(true) {
        return;
    }
    id_differential(&case_mapping_squash_root());
}

/// A default ACL set through a mapped mount is stored with disk ids, and what the upper's
/// filesystem derives from it for a new object (its access ACL, its mode, without the umask, as
/// POSIX and the kernel's overlayfs do) is shown with presented ids. Ours only: fuse-overlayfs
/// 1.x drops the default ACL when it creates in its workdir (a creator other than itself) and
/// applies the umask otherwise.
#[test]
fn default_acl_inheritance_through_a_mapping() {
    if !require(true) {
        return;
    }
    let case = case_mapping();
    let scratch = Scratch::new();
    let copy = Stack::build(&scratch, "o");
    let m = mount_ours(&copy.lower_refs(), copy.upper_work(), case.opts);
    let default = acl(&[
        (A_USER_OBJ, 7, UNDEF),
        (A_USER, 7, 101_000),
        (A_GROUP_OBJ, 5, UNDEF),
        (A_GROUP, 5, 300_001),
        (A_MASK, 7, UNDEF),
        (A_OTHER, 5, UNDEF),
    ]);
    xattr::set(&m.path().join("pub"), ACL_DEFAULT, &default).expect("set the default ACL");
    let ops: Ops = vec![
        ("create", v(&["touch", "pub/f"])),
        ("mkdir", v(&["mkdir", "pub/d"])),
    ];
    let res = run_ops(m.path(), &ops, Some(case.user));
    assert!(res.values().all(|r| r.starts_with("rc=0")), "{res:?}");
    let shown_mode =
        |rel: &str| std::fs::metadata(m.path().join(rel)).expect("stat").mode() & 0o7777;
    // The default ACL's masks, not the umask (022), bound the modes.
    assert_eq!(
        shown_mode("pub/f"),
        0o664,
        "mode of a file created under a default ACL"
    );
    assert_eq!(
        shown_mode("pub/d"),
        0o775,
        "mode of a dir created under a default ACL"
    );
    let presented = [(A_USER, 101_000), (A_GROUP, 300_001)];
    let disk = [(A_USER, 1000), (A_GROUP, 65_537)];
    let mut through = Vec::new();
    for (rel, name) in [
        ("pub", ACL_DEFAULT),
        ("pub/f", ACL_ACCESS),
        ("pub/d", ACL_ACCESS),
        ("pub/d", ACL_DEFAULT),
    ] {
        let v =
            xattr::get(&m.path().join(rel), name).unwrap_or_else(|e| panic!("{rel} {name}: {e}"));
        through.push((rel, name, v));
    }
    drop(m);
    for (rel, name, v) in through {
        assert_eq!(
            named_ids(&v),
            presented,
            "/{rel} {name} through the mount: {}",
            show_acl(&v)
        );
        let d = xattr::get(&copy.upper.join(rel), name).expect("ACL in the upper");
        assert_eq!(
            named_ids(&d),
            disk,
            "/{rel} {name} on disk: {}",
            show_acl(&d)
        );
        assert_eq!(acl_shape(&d), acl_shape(&v), "/{rel} {name}: entries");
    }
    for rel in ["pub/f", "pub/d"] {
        let md = std::fs::symlink_metadata(copy.upper.join(rel)).expect("in the upper");
        assert_eq!((md.uid(), md.gid()), (1000, 1000), "/{rel} owner on disk");
    }
}

// ---------------------------------------------------------------------------------------------
// The other options, on ours.

/// A one-lower stack with a file, a hard-linked file, a directory with two subdirectories, a
/// file with a user xattr and a file whose ACL keeps 65534 out.
fn small_stack(scratch: &Scratch) -> (PathBuf, PathBuf, PathBuf) {
    let l = scratch.dir("l");
    Layer::new(&l)
        .file("f", "content")
        .file("a", "linked")
        .hardlink("a", "b")
        .dir("d/s1")
        .dir("d/s2")
        .file("d/inner", "x")
        .file("x", "has xattrs")
        .xattr("x", "user.k", b"v")
        .file("denied", "secret")
        .mode("denied", 0o644)
        .xattr(
            "denied",
            ACL_ACCESS,
            acl(&[
                (A_USER_OBJ, 6, UNDEF),
                (A_USER, 0, 65_534),
                (A_GROUP_OBJ, 4, UNDEF),
                (A_MASK, 4, UNDEF),
                (A_OTHER, 4, UNDEF),
            ]),
        );
    (l, scratch.dir("u"), scratch.dir("w"))
}

/// stderr must carry no warning (nor mention `key`).
/// (Other warnings, such as a missing syslog socket on a machine without one, are not about
/// the options.)
fn assert_silent(stderr: &str, key: &str, opts: &[&str]) {
    let bad = stderr
        .lines()
        .any(|l| l.contains(key) || l.contains("option '") || l.contains("not implemented"));
    assert!(!bad, "options {opts:?} gave a warning: {stderr:?}");
}

fn errno_of<T>(r: std::io::Result<T>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// `cat FILE` as 65534:65534: whether it could read.
fn nobody_reads(p: &Path) -> bool {
    Command::new("cat")
        .arg(p)
        .uid(65_534)
        .gid(65_534)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run cat")
        .success()
}

#[test]
fn static_nlink_reports_one_link_for_directories() {
    if !require(false) {
        return;
    }
    // Without the option: a directory only in the lower, and one made through the mount (only
    // in the upper), count their subdirectories. (Merged directories, the root here, show 1
    // either way, as under the kernel's overlayfs.)
    for (opts, lower_only, upper_only) in [(&["static_nlink"][..], 1, 1), (&[][..], 4, 3)] {
        let sc = Scratch::new();
        let (l, u, w) = small_stack(&sc);
        let mut m = mount_ours(&[&l], Some((&u, &w)), opts);
        let nlink = |rel: &str| {
            std::fs::symlink_metadata(at(m.path(), rel))
                .expect("stat")
                .nlink()
        };
        assert_eq!(nlink(""), 1, "{opts:?}: nlink of the (merged) root");
        assert_eq!(
            nlink("d"),
            lower_only,
            "{opts:?}: nlink of /d (2 subdirectories)"
        );
        assert_eq!(
            nlink("d/s1"),
            if lower_only == 1 { 1 } else { 2 },
            "{opts:?}: /d/s1"
        );
        std::fs::create_dir_all(m.path().join("new/sub")).expect("mkdir");
        assert_eq!(
            nlink("new"),
            upper_only,
            "{opts:?}: nlink of /new (1 subdirectory)"
        );
        // Files keep their real link count.
        assert_eq!(nlink("a"), 2, "{opts:?}: nlink of a hard-linked file");
        assert_silent(&m.stderr(), "static_nlink", opts);
    }
}

#[test]
fn noacl_refuses_acls_and_does_not_enforce_them() {
    if !require(false) {
        return;
    }
    let sc = Scratch::new();
    let (l, u, w) = small_stack(&sc);
    let plain = acl(&[
        (A_USER_OBJ, 6, UNDEF),
        (A_USER, 4, 1000),
        (A_GROUP_OBJ, 4, UNDEF),
        (A_MASK, 4, UNDEF),
        (A_OTHER, 4, UNDEF),
    ]);
    {
        let mut m = mount_ours(&[&l], Some((&u, &w)), &["noacl"]);
        let f = m.path().join("f");
        let e = errno_of(xattr::set(&f, ACL_ACCESS, &plain));
        assert_eq!(e, Some(libc::EOPNOTSUPP), "noacl: setxattr {ACL_ACCESS}");
        let e = errno_of(xattr::set(&m.path().join("d"), ACL_DEFAULT, &plain));
        assert_eq!(e, Some(libc::EOPNOTSUPP), "noacl: setxattr {ACL_DEFAULT}");
        assert!(
            nobody_reads(&m.path().join("denied")),
            "noacl: the lower ACL that names 65534 with no rights is still enforced"
        );
        // Other xattrs still work.
        assert_eq!(
            xattr::get(&m.path().join("x"), "user.k").expect("getxattr"),
            b"v"
        );
        assert_silent(&m.stderr(), "noacl", &["noacl"]);
    }
    // Without the option, the same ACL keeps 65534 out and ACLs can be set.
    let m = mount_ours(&[&l], Some((&u, &w)), &[]);
    assert!(
        !nobody_reads(&m.path().join("denied")),
        "ACLs not enforced by default"
    );
    xattr::set(&m.path().join("f"), ACL_ACCESS, &plain).expect("setxattr ACL without noacl");
}

#[test]
fn noxattrs_turns_every_xattr_call_off() {
    if !require(false) {
        return;
    }
    let sc = Scratch::new();
    let (l, u, w) = small_stack(&sc);
    {
        let mut m = mount_ours(&[&l], Some((&u, &w)), &["noxattrs=1"]);
        let x = m.path().join("x");
        let eop = Some(libc::EOPNOTSUPP);
        assert_eq!(
            errno_of(xattr::get(&x, "user.k")),
            eop,
            "noxattrs=1: getxattr"
        );
        assert_eq!(
            errno_of(xattr::set(&x, "user.n", b"1")),
            eop,
            "noxattrs=1: setxattr"
        );
        assert_eq!(errno_of(xattr::list(&x)), eop, "noxattrs=1: listxattr");
        assert_eq!(
            errno_of(xattr::remove(&x, "user.k")),
            eop,
            "noxattrs=1: removexattr"
        );
        assert_silent(&m.stderr(), "noxattrs", &["noxattrs=1"]);
    }
    // Nothing reached the upper.
    assert!(
        !u.join("x").exists(),
        "noxattrs=1: a refused xattr call copied /x up"
    );
    let mut m = mount_ours(&[&l], Some((&u, &w)), &["noxattrs=0"]);
    let x = m.path().join("x");
    assert_eq!(
        xattr::get(&x, "user.k").expect("noxattrs=0: getxattr"),
        b"v"
    );
    xattr::set(&x, "user.n", b"1").expect("noxattrs=0: setxattr");
    let names = xattr::list(&x).expect("noxattrs=0: listxattr");
    assert!(names.contains(&b"user.n".to_vec()) && names.contains(&b"user.k".to_vec()));
    xattr::remove(&x, "user.k").expect("noxattrs=0: removexattr");
    assert_silent(&m.stderr(), "noxattrs", &["noxattrs=0"]);
}

#[test]
fn fsync_0_and_1_accept_fsync() {
    if !require(false) {
        return;
    }
    for opt in ["fsync=0", "fsync=1"] {
        let sc = Scratch::new();
        let (l, u, w) = small_stack(&sc);
        let mut m = mount_ours(&[&l], Some((&u, &w)), &[opt]);
        let p = m.path().join("written");
        let mut f = std::fs::File::create(&p).expect("create");
        f.write_all(b"data").expect("write");
        f.sync_all().unwrap_or_else(|e| panic!("{opt}: fsync: {e}"));
        f.sync_data()
            .unwrap_or_else(|e| panic!("{opt}: fdatasync: {e}"));
        drop(f);
        // A lower file opened for writing (copied up), and a directory.
        let g = std::fs::OpenOptions::new()
            .append(true)
            .open(m.path().join("f"))
            .expect("open lower file for append");
        g.sync_all()
            .unwrap_or_else(|e| panic!("{opt}: fsync of a copied-up file: {e}"));
        let d = std::fs::File::open(m.path().join("d")).expect("open dir");
        d.sync_all()
            .unwrap_or_else(|e| panic!("{opt}: fsync of a directory: {e}"));
        drop((g, d));
        assert_silent(&m.stderr(), "fsync", &[opt]);
        let ended = m.unmount();
        assert_eq!(
            ended.daemon,
            DaemonExit::Exited(0),
            "{opt}: {}",
            ended.stderr
        );
        assert_eq!(
            std::fs::read(u.join("written")).expect("in the upper"),
            b"data"
        );
    }
}

#[test]
fn thread_and_timeout_options_are_accepted() {
    if !require(false) {
        return;
    }
    let sc = Scratch::new();
    let (l, u, w) = small_stack(&sc);
    for opts in [
        &["threaded=0"][..],
        &["threaded=1"],
        &["threads=1"],
        &["threads=4"],
        &["timeout=5"],
        &["timeout=0"],
        &["threaded=1", "threads=3", "timeout=1"],
    ] {
        let mut m = mount_ours(&[&l], Some((&u, &w)), opts);
        assert_eq!(std::fs::read(m.path().join("f")).expect("read"), b"content");
        let p = m.path().join("t");
        std::fs::write(&p, opts.join(",")).expect("write");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read back"),
            opts.join(",")
        );
        std::fs::remove_file(&p).expect("unlink");
        let mut stderr = m.stderr();
        let ended = m.unmount();
        stderr.push_str(&ended.stderr);
        assert_eq!(ended.daemon, DaemonExit::Exited(0), "{opts:?}: {stderr}");
        for o in opts {
            let key = o.split('=').next().unwrap_or(o);
            assert_silent(&stderr, key, opts);
        }
    }
}

/// `timeout=0`: nothing is cached, so a change made behind the mount's back, in the upper,
/// shows on the next stat of an already looked-up file.
#[test]
fn timeout_0_shows_changes_made_in_the_upper() {
    if !require(false) {
        return;
    }
    let sc = Scratch::new();
    let (l, u, w) = small_stack(&sc);
    Layer::new(&u).file("up", "in the upper").mode("up", 0o644);
    let m = mount_ours(&[&l], Some((&u, &w)), &["timeout=0"]);
    let p = m.path().join("up");
    let mode = |p: &Path| std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777;
    assert_eq!(mode(&p), 0o644);
    std::fs::set_permissions(u.join("up"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod in the upper");
    assert_eq!(
        mode(&p),
        0o600,
        "timeout=0: a mode changed in the upper does not show"
    );
    std::fs::set_permissions(u.join("up"), std::fs::Permissions::from_mode(0o751))
        .expect("chmod in the upper");
    assert_eq!(mode(&p), 0o751, "timeout=0: a second change does not show");
}

#[test]
fn context_is_accepted_silently() {
    if !require(false) {
        return;
    }
    let sc = Scratch::new();
    let (l, u, w) = small_stack(&sc);
    let opts = [r#"context="system_u:object_r:container_file_t:s0:c1,c2""#];
    let mut m = mount_ours(&[&l], Some((&u, &w)), &opts);
    assert_eq!(std::fs::read(m.path().join("f")).expect("read"), b"content");
    assert_silent(&m.stderr(), "context", &opts);
}

#[test]
fn plugins_is_refused_before_mounting() {
    if !require(false) {
        return;
    }
    let sc = Scratch::new();
    let (l, u, w) = small_stack(&sc);
    let target = sc.dir("m");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},plugins=/usr/lib/x.so",
        l.display(),
        u.display(),
        w.display()
    );
    let out = run_with_timeout(
        &our_bin(),
        &[os("-o"), os(opts), os(&target)],
        Duration::from_secs(30),
    );
    let mounted = mount_at(&target).is_some() || !mounts_under(sc.path()).is_empty();
    if mounted {
        force_unmount(&target);
    }
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        out.status.is_some_and(|s| !s.success())
            && !mounted
            && lines.len() == 1
            && lines[0].contains("plugins"),
        "plugins=: exit {:?}, mounted {mounted}, stderr {:?}",
        out.status,
        out.stderr
    );
    // The refusal did not leave a daemon holding the layers: a normal mount works.
    let m =
        DaemonMount::start_overlay(&our_bin(), Some(&target), &[&l], Some((&u, &w)), &[], false)
            .expect("mount after the refusal");
    drop(m);
}
