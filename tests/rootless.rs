//! Rootless use: the daemon run unprivileged, as root of a user namespace, the way rootless
//! podman runs its mount program.
//!
//! As root the test builds two identical two-layer stacks in a directory owned by an
//! unprivileged uid, as rootless containers/storage unpacks layers: files, directories,
//! symlinks, hard links, a user xattr, a lower whiteout, an opaque directory and a directory
//! with fuse-overlayfs's opaque mark. Ours gets them in the forms found in rootless storage
//! (OCI `.wh.NAME` whiteout, `.wh..wh..opq` marker, `user.fuseoverlayfs.opaque=y`); the
//! kernel's overlayfs, which reads none of those, gets the same stack in its own `userxattr`
//! format (char 0/0 whiteout, `user.overlay.opaque=y`).
//!
//! Then, as that uid (`setpriv --reuid --regid --clear-groups`) inside `unshare -Urm`, this test
//! binary re-executed as a helper mounts each stack (the kernel with `-o userxattr`, ours with
//! nothing but the layer options: it must find out by itself that `trusted.*` is out of reach)
//! and runs the same operations on each: reads, a write to a lower file (copy-up), deletes of
//! lower files (whiteouts), `rm -r` of a merged directory and `mkdir` of it again (opaque),
//! renames of lower and upper files, create/rename/delete of upper files, mkdir/rmdir,
//! symlink, hard link, chmod, setting times (`touch -d`). It asserts:
//! - every operation has the same result on both;
//! - the merged trees are the same (names, types, modes, owners, sizes, nlink, contents,
//!   symlink targets, visible xattrs, listings; the overlay's private xattrs and
//!   fuse-overlayfs's stay unreadable), and the set times are the ones given;
//! - after unmounting, as root: the two upper layers are the same (entries, types including the
//!   char 0/0 whiteouts, modes, owners, contents, targets, xattrs with their values, except
//!   `user.overlay.origin` and `user.overlay.uuid`, compared by presence), and ours holds no
//!   `trusted.*` xattr;
//! - interchange: the kernel's overlayfs, mounted in a new user namespace on the upper ours
//!   wrote (over the kernel-format copy of the lowers), shows the tree ours showed.
//!
//! The mounts live in the helper's mount namespace and go with it; a guard kills any daemon
//! whose command line names the test's directory, so none outlives the test.
//!
//! Needs root (to prepare layers and to inspect them), /dev/fuse, `setpriv` and `unshare`
//! (util-linux) and unprivileged user namespaces; without them the test is skipped, except
//! under CI (`CI=true`), where that is a failure.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use common::mounts::DaemonMount;
use common::snapshot::{self, CompareOpts, Kind, Snapshot, SnapshotOpts, compare};
use common::{DaemonExit, KernelMount, Layer, Scratch, Xflavor, our_bin, poll_until};

/// The unprivileged owner of the layers and user of the namespace.
const UID: u32 = 4242;
const HELPER_ENV: &str = "RSFS_ROOTLESS_HELPER";
const BIN_ENV: &str = "RSFS_ROOTLESS_BIN";
const HELPER_TEST: &str = "helper_in_the_user_namespace";
const MARK: &str = "RSFS-ROOTLESS\t";
/// The times `touch -d` sets: 2001-02-03 04:05:06.5 and 2002-03-04 05:06:07.25.
const ATIME: (i64, i64) = (981_173_106, 500_000_000);
const MTIME: (i64, i64) = (1_015_218_367, 250_000_000);

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skip (or, under CI, fail) with `why`.
fn unavailable(why: &str) -> bool {
    if under_ci() {
        panic!("{why} (CI=true makes this a failure)");
    }
    eprintln!("SKIP: {why}");
    false
}

// ---------------------------------------------------------------------------------------------
// The layers.

/// The lower layers of one stack, topmost first, in ours' (rootless storage) or the kernel's
/// format.
fn build_lowers(root: &Path, kernel_format: bool) -> Vec<PathBuf> {
    let (l0, l1) = (root.join("l0"), root.join("l1"));
    Layer::new(&l1)
        .file("a.txt", "alpha from l1")
        .file("b.txt", "bravo")
        .file("gone.txt", "hidden by l0's whiteout")
        .file("dir/x", "x1")
        .file("dir/y", "y1")
        .file("dir/sub/z", "z")
        .file("opq/old", "old, under an opaque dir")
        .file("fopq/old", "old, under fuse-overlayfs's opaque dir")
        .file("ren.txt", "rename me")
        .file("link.txt", "link me")
        .symlink("sl", "a.txt")
        .file("mode.txt", "chmod me")
        .mode("mode.txt", 0o644)
        .file("time.txt", "touch me")
        .file("data/f", "f")
        .mode("data", 0o750)
        .file("exec.sh", "#!/bin/sh\n")
        .mode("exec.sh", 0o755);
    let top = Layer::new(&l0);
    top.file("a.txt", "alpha from l0")
        .xattr("a.txt", "user.note", b"kept on copy-up")
        .file("dir/extra", "e")
        .file("opq/new", "new in l0")
        .file("fopq/new", "new in l0")
        .symlink("sl2", "dir/x")
        .file("hl1", "hard-linked in l0")
        .hardlink("hl1", "hl2")
        .xattr("dir", "user.dirnote", b"on a merged dir");
    if kernel_format {
        top.whiteout("gone.txt")
            .opaque("opq", Xflavor::User)
            .opaque("fopq", Xflavor::User);
    } else {
        top.oci_whiteout("gone.txt")
            .oci_opaque("opq")
            .fuseoverlayfs_opaque("fopq");
    }
    vec![l0, l1]
}

/// lchown everything under `root` (root included).
fn chown_tree(root: &Path, uid: u32) {
    let md = std::fs::symlink_metadata(root).unwrap_or_else(|e| panic!("lstat {root:?}: {e}"));
    if md.is_dir() {
        for e in std::fs::read_dir(root).expect("readdir") {
            chown_tree(&e.expect("entry").path(), uid);
        }
    }
    std::os::unix::fs::lchown(root, Some(uid), Some(uid))
        .unwrap_or_else(|e| panic!("lchown {root:?}: {e}"));
}

/// The paths of one stack under the test directory: `<dir>/<tag>/{l0,l1,u,w,m}`.
struct Side {
    root: PathBuf,
}

impl Side {
    fn new(dir: &Path, tag: &str) -> Side {
        Side {
            root: dir.join(tag),
        }
    }
    fn lowers(&self) -> Vec<PathBuf> {
        vec![self.root.join("l0"), self.root.join("l1")]
    }
    fn upper(&self) -> PathBuf {
        self.root.join("u")
    }
    fn work(&self) -> PathBuf {
        self.root.join("w")
    }
    fn mnt(&self) -> PathBuf {
        self.root.join("m")
    }
}

// ---------------------------------------------------------------------------------------------
// The helper side: runs as root of a user namespace.

fn errno_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(c) => format!("{:?}", nix::errno::Errno::from_raw(c)),
        None => e.to_string(),
    }
}

/// The operations, in order: `(name, "ok" or the errno)`.
fn run_ops(m: &Path) -> Vec<(&'static str, String)> {
    let p = |rel: &str| m.join(rel);
    let mut out = Vec::new();
    let mut rec = |name: &'static str, r: std::io::Result<()>| {
        out.push((name, r.map_or_else(|e| errno_of(&e), |()| "ok".into())));
    };
    let append = |rel: &str, data: &[u8]| -> std::io::Result<()> {
        OpenOptions::new()
            .append(true)
            .open(p(rel))?
            .write_all(data)
    };
    let read_all = || -> std::io::Result<()> {
        for rel in [
            "a.txt",
            "b.txt",
            "dir/x",
            "dir/extra",
            "opq/new",
            "hl2",
            "sl",
        ] {
            std::fs::read(p(rel))?;
        }
        Ok(())
    };
    rec("read", read_all());
    rec("write lower file (copy-up)", append("a.txt", b" +appended"));
    rec(
        "write lower file in merged dir",
        append("data/f", b" +more"),
    );
    rec("unlink lower file", std::fs::remove_file(p("b.txt")));
    rec("rm -r merged dir", std::fs::remove_dir_all(p("dir")));
    rec("mkdir it again", std::fs::create_dir(p("dir")));
    rec("create in it", std::fs::write(p("dir/new"), "n"));
    rec(
        "rename lower file",
        std::fs::rename(p("ren.txt"), p("renamed.txt")),
    );
    rec(
        "rename lower file into a dir",
        std::fs::rename(p("renamed.txt"), p("dir/renamed.txt")),
    );
    rec("create upper file", std::fs::write(p("up1.txt"), "up"));
    rec(
        "rename upper file",
        std::fs::rename(p("up1.txt"), p("up2.txt")),
    );
    rec("create another", std::fs::write(p("up3.txt"), "gone soon"));
    rec("delete it", std::fs::remove_file(p("up3.txt")));
    rec("mkdir", std::fs::create_dir(p("newdir")));
    rec("mkdir inside", std::fs::create_dir(p("newdir/sub")));
    rec("rmdir", std::fs::remove_dir(p("newdir/sub")));
    rec("mkdir in lower dir", std::fs::create_dir(p("data/sub")));
    rec("symlink", std::os::unix::fs::symlink("a.txt", p("newlink")));
    rec(
        "hard link lower file",
        std::fs::hard_link(p("link.txt"), p("link2.txt")),
    );
    rec(
        "hard link upper file",
        std::fs::hard_link(p("up2.txt"), p("up2.link")),
    );
    rec(
        "chmod lower file",
        std::fs::set_permissions(p("mode.txt"), std::fs::Permissions::from_mode(0o600)),
    );
    rec(
        "chmod lower dir",
        std::fs::set_permissions(p("data"), std::fs::Permissions::from_mode(0o711)),
    );
    rec(
        "touch -d lower file",
        utimensat(
            nix::fcntl::AT_FDCWD,
            &p("time.txt"),
            &TimeSpec::new(ATIME.0, ATIME.1),
            &TimeSpec::new(MTIME.0, MTIME.1),
            UtimensatFlags::FollowSymlink,
        )
        .map_err(std::io::Error::from),
    );
    rec("unlink in opaque dir", std::fs::remove_file(p("opq/new")));
    rec(
        "unlink in fuse-overlayfs opaque dir",
        std::fs::remove_file(p("fopq/new")),
    );
    rec("create in it", std::fs::write(p("fopq/created"), "c"));
    rec("unlink lower hard link", std::fs::remove_file(p("hl1")));
    rec(
        "set user xattr",
        common::xattr::set(&p("up2.txt"), "user.mine", b"1"),
    );
    rec(
        "rmdir lower-only dir",
        std::fs::remove_dir_all(p("data/sub")),
    );
    out
}

fn probes() -> SnapshotOpts {
    let mut s = SnapshotOpts::private_probes("user.overlay.");
    s.probes.push("user.fuseoverlayfs.opaque".into());
    s.probes.push("trusted.overlay.opaque".into());
    s
}

/// One line per entry: what "the same tree" means across mounts of different layers.
fn render(s: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (path, e) in &s.entries {
        let st = match &e.stat {
            Ok(st) => st,
            Err(err) => {
                out.push(format!("{path} lstat error {err}"));
                continue;
            }
        };
        let mut line = format!(
            "{path} {:?} {:04o} {}:{} nlink={}",
            st.kind, st.mode, st.uid, st.gid, st.nlink
        );
        if st.kind != Kind::Dir {
            line.push_str(&format!(" size={}", st.size));
        }
        if let Some(c) = &e.content {
            line.push_str(&format!(" content={c:x?}"));
        }
        if let Some(t) = &e.target {
            line.push_str(&format!(" target={t:?}"));
        }
        match &e.xattrs {
            Ok(xs) => {
                for (n, v) in xs {
                    let v = v.as_ref().map(|b| snapshot::show_bytes(b));
                    line.push_str(&format!(" {n}={v:?}"));
                }
            }
            Err(err) => line.push_str(&format!(" listxattr error {err}")),
        }
        out.push(line);
    }
    out
}

/// Paths (`/a/b`) whose `user.overlay.origin` differs in size between the two uppers. In a
/// user namespace the kernel stores an empty origin (it cannot decode file handles without
/// CAP_DAC_READ_SEARCH in the initial namespace) where ours stores the lower's file handle;
/// the longer value can push an inode's xattrs out into a block of their own, so st_blocks
/// is not comparable there.
fn origin_sizes_differ(k_upper: &Path, o_upper: &Path) -> Vec<String> {
    let snap = |p: &Path| {
        Snapshot::take(
            p,
            &SnapshotOpts {
                no_content: true,
                ..Default::default()
            },
        )
    };
    let (k, o) = (snap(k_upper), snap(o_upper));
    let origin_len = |s: &Snapshot, path: &str| -> Option<usize> {
        let xs = s.get(path)?.xattrs.as_ref().ok()?;
        xs.iter()
            .find(|(n, _)| n == "user.overlay.origin")
            .and_then(|(_, v)| v.as_ref().ok().map(Vec::len))
    };
    k.entries
        .keys()
        .filter(|p| origin_len(&k, p) != origin_len(&o, p))
        .cloned()
        .collect()
}

/// Problems that a merged tree shows by itself: inconsistent listings, readable private
/// xattrs.
fn tree_problems(name: &str, s: &Snapshot) -> Vec<String> {
    let mut out = s.self_check(name);
    for p in s.readable_probes() {
        out.push(format!(
            "{name}: private xattr readable through the mount: {p}"
        ));
    }
    out
}

/// Prints one marked line for the parent.
fn say(key: &str, text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{MARK}{key}\t{}", text.replace(['\n', '\t'], " "));
}

fn helper_identity() -> String {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    format!(
        "euid {} uid_map {}",
        nix::unistd::geteuid(),
        map.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

/// Phase A: the kernel's overlayfs and ours, each on its own stack, the same operations.
fn phase_mount_both(dir: &Path, bin: &Path) {
    let (k, o) = (Side::new(dir, "k"), Side::new(dir, "o"));
    let opts = probes();
    let kl = k.lowers();
    let klow: Vec<&Path> = kl.iter().map(PathBuf::as_path).collect();
    let km = match KernelMount::try_mount(
        Some(&k.mnt()),
        &klow,
        Some((&k.upper(), &k.work())),
        &["userxattr"],
    ) {
        Ok(m) => m,
        Err(e) => {
            return say(
                "problem",
                &format!("kernel overlayfs in the namespace: {e}"),
            );
        }
    };
    let kres = run_ops(km.path());
    let ks = Snapshot::take(km.path(), &opts);
    if !km.unmount() {
        say("problem", "umount of the kernel overlay failed");
    }

    let ol = o.lowers();
    let olow: Vec<&Path> = ol.iter().map(PathBuf::as_path).collect();
    let mut om = match DaemonMount::start_overlay(
        bin,
        Some(&o.mnt()),
        &olow,
        Some((&o.upper(), &o.work())),
        &[],
        false,
    ) {
        Ok(m) => m,
        Err(e) => return say("problem", &format!("ours in the namespace: {e}")),
    };
    let ores = run_ops(om.path());
    let os = Snapshot::take(om.path(), &opts);
    let stderr = om.stderr();
    let ended = om.unmount();
    if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted {
        say(
            "problem",
            &format!(
                "our daemon ended {:?} (left mounted: {}); stderr: {stderr}",
                ended.daemon, ended.left_mounted
            ),
        );
    }
    if stderr.contains("trusted") {
        say("note", &format!("our daemon said: {stderr}"));
    }

    for ((name, kr), (_, or)) in kres.iter().zip(&ores) {
        say("op", &format!("{name}: kernel={kr} ours={or}"));
        if kr != or {
            say("problem", &format!("op {name}: kernel={kr} vs ours={or}"));
        }
    }
    let mut copts = CompareOpts::new()
        .skip("ino")
        .skip("d_ino")
        .skip("mtime")
        .skip("ctime");
    for path in origin_sizes_differ(&k.upper(), &o.upper()) {
        copts = copts.skip_at(&path, "blocks");
    }
    for d in compare("kernel", &ks, "ours", &os, &copts) {
        say("problem", &format!("merged tree: {d}"));
    }
    for d in tree_problems("kernel", &ks)
        .into_iter()
        .chain(tree_problems("ours", &os))
    {
        say("problem", &d);
    }
    for (name, s) in [("kernel", &ks), ("ours", &os)] {
        let got = s
            .get("/time.txt")
            .and_then(|e| e.stat.as_ref().ok())
            .map(|st| st.mtime);
        if got != Some(MTIME) {
            say(
                "problem",
                &format!("{name}: mtime of /time.txt after touch -d: {got:?}, want {MTIME:?}"),
            );
        }
    }
    for line in render(&os) {
        say("ours", &line);
    }
}

/// Phase B: the kernel's overlayfs on the upper ours wrote.
fn phase_interchange(dir: &Path) {
    let (k, o, i) = (
        Side::new(dir, "k"),
        Side::new(dir, "o"),
        Side::new(dir, "i"),
    );
    let kl = k.lowers();
    let klow: Vec<&Path> = kl.iter().map(PathBuf::as_path).collect();
    let im = match KernelMount::try_mount(
        Some(&i.mnt()),
        &klow,
        Some((&o.upper(), &i.work())),
        &["userxattr"],
    ) {
        Ok(m) => m,
        Err(e) => {
            return say("problem", &format!("kernel overlayfs on our upper: {e}"));
        }
    };
    let s = Snapshot::take(im.path(), &probes());
    for d in tree_problems("kernel on our upper", &s) {
        say("problem", &d);
    }
    for line in render(&s) {
        say("interchange", &line);
    }
    if !im.unmount() {
        say(
            "problem",
            "umount of the kernel overlay on our upper failed",
        );
    }
}

/// Not a test on its own: the helper the test runs inside the user namespace.
#[test]
fn helper_in_the_user_namespace() {
    let Some(arg) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let arg = arg.to_string_lossy().into_owned();
    let (phase, dir) = arg.split_once(':').expect("PHASE:DIR");
    say("id", &helper_identity());
    let bin = std::env::var_os(BIN_ENV).map_or_else(our_bin, PathBuf::from);
    match phase {
        "both" => phase_mount_both(Path::new(dir), &bin),
        "interchange" => phase_interchange(Path::new(dir)),
        other => panic!("unknown phase {other}"),
    }
    say("done", phase);
}

// ---------------------------------------------------------------------------------------------
// The test side: root.

/// Kills, when dropped, every daemon whose command line names `dir` (mounts in the helper's
/// namespace are gone with it, but a daemon would keep that namespace alive).
struct Reaper {
    dir: PathBuf,
    bin_name: OsString,
}

impl Reaper {
    fn daemons(&self) -> Vec<Pid> {
        let want = self.dir.as_os_str().as_bytes();
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_daemon = args.first().is_some_and(|a0| {
                Path::new(std::ffi::OsStr::from_bytes(a0)).file_name() == Some(&self.bin_name)
            });
            let names_dir = args
                .iter()
                .any(|a| a.windows(want.len()).any(|w| w == want));
            if is_daemon && names_dir {
                out.push(Pid::from_raw(pid));
            }
        }
        out
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let left = self.daemons();
        for pid in &left {
            eprintln!("rootless: killing leftover daemon {pid}");
            let _ = kill(*pid, Signal::SIGKILL);
        }
        poll_until(Duration::from_secs(10), || {
            for pid in &left {
                // Reap it if it was re-parented to us.
                let _ = waitpid(*pid, Some(WaitPidFlag::WNOHANG));
            }
            self.daemons().is_empty()
        });
    }
}

/// Whether every directory on the way to `p` is searchable and `p` executable by others.
fn reachable_by_others(p: &Path) -> bool {
    let exec = std::fs::metadata(p).is_ok_and(|m| m.mode() & 0o001 != 0);
    exec && p
        .ancestors()
        .skip(1)
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.mode() & 0o001 != 0))
}

/// `p`, or a copy of it in `dir` (same file name) if the unprivileged uid cannot run it.
fn runnable(p: &Path, dir: &Path) -> PathBuf {
    if reachable_by_others(p) {
        return p.to_path_buf();
    }
    let copy = dir.join(p.file_name().expect("a file name"));
    std::fs::copy(p, &copy).unwrap_or_else(|e| panic!("copy {p:?}: {e}"));
    std::os::unix::fs::chown(&copy, Some(UID), Some(UID)).expect("chown copy");
    copy
}

/// The command that runs `argv` as `UID` inside a new user and mount namespace.
fn in_userns(argv: &[&std::ffi::OsStr]) -> Command {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={UID}"))
        .arg(format!("--regid={UID}"))
        .args(["--clear-groups", "--", "unshare", "-Urm", "--"])
        .args(argv)
        .current_dir("/")
        .stdin(Stdio::null());
    c
}

struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `c` with output to files and a timeout after which it is killed.
fn run(mut c: Command, timeout: Duration) -> Ran {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    c.stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            return Ran {
                ok: false,
                stdout: String::new(),
                stderr: format!("cannot start {:?}: {e}", c.get_program()),
            };
        }
    };
    let mut status = None;
    poll_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read = |f: &mut std::fs::File| {
        let mut b = Vec::new();
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    };
    let mut stderr = read(&mut err);
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {timeout:?})"));
    }
    Ran {
        ok: status.is_some_and(|s| s.success()),
        stdout: read(&mut out),
        stderr,
    }
}

/// Runs one phase of the helper; its marked lines as `(key, text)`.
fn run_phase(phase: &str, dir: &Path, exe: &Path, bin: &Path) -> Vec<(String, String)> {
    let mut c = in_userns(&[
        exe.as_os_str(),
        HELPER_TEST.as_ref(),
        "--exact".as_ref(),
        "--nocapture".as_ref(),
        "--test-threads=1".as_ref(),
    ]);
    c.env(HELPER_ENV, format!("{phase}:{}", dir.display()))
        .env(BIN_ENV, bin)
        .env_remove("RUST_BACKTRACE");
    let r = run(c, Duration::from_secs(180));
    let lines: Vec<(String, String)> = r
        .stdout
        .lines()
        .filter_map(|l| l.split_once(MARK).map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('\t'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let done = lines.iter().any(|(k, v)| k == "done" && v == phase);
    assert!(
        r.ok && done,
        "helper phase {phase} failed (ok {}, done {done}); stdout:\n{}\nstderr:\n{}",
        r.ok,
        r.stdout,
        r.stderr
    );
    lines
}

fn of<'a>(lines: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Checks that can run before anything is built; false to skip.
fn preconditions() -> bool {
    if !common::require_root_and_fuse() {
        return false;
    }
    for tool in ["setpriv", "unshare"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return unavailable(&format!("{tool} is missing (package util-linux)"));
        }
    }
    // Rootless mounts open /dev/fuse as an ordinary user: distributions make it 0666 (the
    // fuse3 package's udev rule does). Some containers and minimal machines leave it 0600.
    let fuse_mode = std::fs::metadata("/dev/fuse").map(|m| m.mode() & 0o777);
    if fuse_mode.is_ok_and(|m| m & 0o006 != 0o006) {
        std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(0o666))
            .expect("chmod 0666 /dev/fuse");
    }
    let probe = run(in_userns(&["true".as_ref()]), Duration::from_secs(30));
    if !probe.ok {
        return unavailable(&format!(
            "cannot enter a user namespace as uid {UID}: {}",
            probe.stderr.trim()
        ));
    }
    true
}

fn upper_xattr_diffs(k: &Snapshot, o: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    let paths: BTreeSet<&String> = k.entries.keys().chain(o.entries.keys()).collect();
    for path in paths {
        let norm = |s: &Snapshot| -> Vec<String> {
            match s.entries.get(path).map(|e| &e.xattrs) {
                Some(Ok(v)) => v
                    .iter()
                    .map(|(n, val)| match (n.as_str(), val) {
                        ("user.overlay.origin" | "user.overlay.uuid", _) => n.clone(),
                        (_, Ok(b)) => format!("{n}={}", snapshot::show_bytes(b)),
                        (_, Err(e)) => format!("{n}=error {e}"),
                    })
                    .collect(),
                Some(Err(e)) => vec![format!("listxattr error {e}")],
                None => Vec::new(),
            }
        };
        let (kx, ox) = (norm(k), norm(o));
        if kx != ox {
            out.push(format!(
                "upper {path}: xattrs: kernel={kx:?} vs ours={ox:?}"
            ));
        }
    }
    out
}

/// What the operations must have left, whatever the kernel did: the hidden, deleted and
/// renamed names gone, the new ones there, no OCI marker shown.
fn expected_view(rendered: &BTreeSet<&str>) -> Vec<String> {
    let paths: BTreeSet<&str> = rendered
        .iter()
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut out = Vec::new();
    for p in [
        "/b.txt",
        "/gone.txt",
        "/opq/old",
        "/opq/new",
        "/fopq/old",
        "/fopq/new",
        "/dir/x",
        "/dir/extra",
        "/dir/sub",
        "/ren.txt",
        "/renamed.txt",
        "/up1.txt",
        "/up3.txt",
        "/newdir/sub",
        "/data/sub",
        "/hl1",
    ] {
        if paths.contains(p) {
            out.push(format!("ours shows {p}, which must be gone"));
        }
    }
    for p in [
        "/a.txt",
        "/dir",
        "/dir/new",
        "/dir/renamed.txt",
        "/up2.txt",
        "/up2.link",
        "/newdir",
        "/newlink",
        "/link.txt",
        "/link2.txt",
        "/fopq/created",
        "/hl2",
        "/time.txt",
        "/sl",
        "/sl2",
        "/exec.sh",
        "/data/f",
    ] {
        if !paths.contains(p) {
            out.push(format!("ours does not show {p}"));
        }
    }
    for p in paths.iter().filter(|p| p.contains("/.wh.")) {
        out.push(format!("ours shows an OCI marker: {p}"));
    }
    out
}

#[test]
fn rootless_in_a_user_namespace_matches_the_kernel() {
    if !preconditions() {
        return;
    }
    let scratch = Scratch::new();
    let dir = scratch.path().to_path_buf();
    let _reaper = Reaper {
        dir: dir.clone(),
        bin_name: our_bin().file_name().expect("binary name").to_os_string(),
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    build_lowers(&dir.join("k"), true);
    build_lowers(&dir.join("o"), false);
    for tag in ["k", "o", "i"] {
        for sub in ["u", "w", "m"] {
            scratch.dir(&format!("{tag}/{sub}"));
        }
    }
    chown_tree(&dir, UID);
    let exe = std::env::current_exe().expect("current_exe");
    let exe = runnable(&exe, &dir);
    let bin = runnable(&our_bin(), &dir);

    let a = run_phase("both", &dir, &exe, &bin);
    let mut problems: Vec<String> = of(&a, "problem").iter().map(|s| s.to_string()).collect();
    let id = of(&a, "id").join(" ");
    assert!(
        id.starts_with("euid 0 uid_map 0 4242 1"),
        "the helper did not run as root of a user namespace mapping {UID}: {id}"
    );

    // The uppers, as the real root sees them (trusted.* included).
    let (k, o) = (Side::new(&dir, "k"), Side::new(&dir, "o"));
    let ku = Snapshot::take(&k.upper(), &SnapshotOpts::default());
    let ou = Snapshot::take(&o.upper(), &SnapshotOpts::default());
    let mut opts = CompareOpts::new()
        .skip("ino")
        .skip("d_ino")
        .skip("mtime")
        .skip("ctime")
        .skip("xattrs");
    for path in origin_sizes_differ(&k.upper(), &o.upper()) {
        opts = opts.skip_at(&path, "blocks");
    }
    for (path, e) in &ku.entries {
        // The kernel links its whiteouts to one shared inode: their nlink is not format.
        if let Ok(st) = &e.stat {
            if st.kind == Kind::CharDev && st.rdev == 0 {
                opts = opts.skip_at(path, "nlink");
            }
        }
    }
    problems.extend(compare("kernel's upper", &ku, "our upper", &ou, &opts));
    problems.extend(upper_xattr_diffs(&ku, &ou));
    for x in ou.xattrs_with_prefix("trusted.") {
        problems.push(format!("our upper holds a trusted.* xattr: {x}"));
    }
    for p in ou
        .entries
        .keys()
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.starts_with(".wh.")))
    {
        problems.push(format!("our upper holds an OCI marker: {p}"));
    }
    if ou.xattrs_with_prefix("user.overlay.").is_empty() {
        problems.push("our upper holds no user.overlay.* xattr at all".into());
    }

    // Interchange: the kernel on our upper shows what ours showed.
    let b = run_phase("interchange", &dir, &exe, &bin);
    problems.extend(of(&b, "problem").iter().map(|s| s.to_string()));
    let ours: BTreeSet<&str> = of(&a, "ours").into_iter().collect();
    let kern: BTreeSet<&str> = of(&b, "interchange").into_iter().collect();
    for l in ours.difference(&kern) {
        problems.push(format!(
            "interchange: ours showed, the kernel on our upper does not: {l}"
        ));
    }
    for l in kern.difference(&ours) {
        problems.push(format!(
            "interchange: the kernel on our upper shows, ours did not: {l}"
        ));
    }
    problems.extend(expected_view(&ours));

    assert!(
        problems.is_empty(),
        "{} problem(s) running rootless:\n  {}\noperations:\n  {}",
        problems.len(),
        problems.join("\n  "),
        of(&a, "op").join("\n  ")
    );
}
