//! The layer subcommands, mounted and end to end (issue 10):
//!
//! - `export`: an upper written through our mount becomes an OCI layer tar; `apply` unpacks it
//!   into an empty directory N; the kernel's overlayfs over `N:L1:L2` (kernel format) and ours
//!   over `N:L1:L2` (OCI format) show exactly the tree ours shows over `U:L1:L2`
//!   (`round_trip_*`), also for a directory moved with `redirect_dir=on`;
//! - the tar itself: entry names, whiteouts as `.wh.` files, opaque markers, no private
//!   xattrs, hard links as link entries (`tar_entries_*`); byte-identical output with a digest
//!   line that is the blob's sha256 and size (`export_is_deterministic`);
//! - `diff` and `export` agree with `podman diff` and the layer `podman commit` stores
//!   (`podman_*`), with two documented differences: podman diff never lists the paths the engine
//!   makes in every container (/etc/hosts, /run/.containerenv, ...), and podman's commit writes
//!   a `.wh.NAME` per hidden name where our export marks the directory opaque (both layers,
//!   applied, must then give the same tree);
//! - `apply` refuses hostile archives without writing outside its directory
//!   (`apply_refuses_*`);
//! - `usage` equals `du` of the upper, live and offline (`usage_*`);
//! - `upper_limit=` / `upper_inodes=`: ENOSPC at the cap, nothing partial, `df` shows the cap
//!   (`caps_*`).
//!
//! What the merged-tree comparisons leave out, and why: st_ino and d_ino (different layers hold
//! the objects), ctime (apply makes new inodes), st_blocks (each copy is allocated anew),
//! directory sizes and directory link counts (a merged directory's nlink is 1 on the kernel, a
//! directory exported whole is no longer merged), mtimes of directories and symlinks (the issue
//! asks for regular files) and sub-second mtimes (layer tars carry whole seconds, as those made by
//! containers/storage and docker do). Everything else is compared: type, mode, owner, size,
//! content, symlink target, rdev, xattrs, private xattrs unreadable, listings, link counts of
//! non-directories, hard-link groups.

mod common;
#[path = "common/podman_env.rs"]
mod podman_env;
#[path = "common/tarball.rs"]
mod tarball;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;

use common::mounts::TmpfsMount;
use common::prng::Rng;
use common::snapshot::{self, Kind, assert_no_diffs};
use common::{
    CompareOpts, KernelMount, Layer, OurMount, Scratch, Snapshot, SnapshotOpts, Xflavor,
    mount_kernel, mount_ours, our_bin, poll_until, xattr,
};
use tarball::TarEntry;

// ---------------------------------------------------------------------------------------------
// Running the binary

/// How long one subcommand may take before it counts as hung.
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

/// A finished subcommand, stdout kept as bytes (a tar may go there).
struct Run {
    args: Vec<OsString>,
    /// `None` if it was killed for running past the timeout.
    status: Option<ExitStatus>,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    fn describe(&self) -> String {
        format!(
            "rsfs-overlay {:?}: {}\n--- stdout ({} bytes)\n{}\n--- stderr\n{}",
            self.args,
            self.status
                .map_or("killed after the timeout".to_string(), |s| s.to_string()),
            self.stdout.len(),
            String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(2000)]),
            self.stderr
        )
    }

    fn stdout_text(&self) -> String {
        String::from_utf8(self.stdout.clone())
            .unwrap_or_else(|_| panic!("stdout is not UTF-8: {}", self.describe()))
    }
}

/// Run `program args...` with `stdin` (or /dev/null), output to files, killed after the timeout.
fn run_program(program: &Path, pre: &[&str], args: &[OsString], stdin: Option<&[u8]>) -> Run {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let input = match stdin {
        Some(bytes) => {
            let mut f = tempfile::tempfile().expect("tempfile");
            f.write_all(bytes).expect("write stdin file");
            f.seek(SeekFrom::Start(0)).expect("rewind");
            Stdio::from(f)
        }
        None => Stdio::null(),
    };
    let (bin, all_args): (PathBuf, Vec<OsString>) = match pre.split_first() {
        Some((first, rest)) => {
            let mut v: Vec<OsString> = rest.iter().map(OsString::from).collect();
            v.push(program.into());
            v.extend(args.iter().cloned());
            (PathBuf::from(first), v)
        }
        None => (program.to_path_buf(), args.to_vec()),
    };
    let mut child = Command::new(&bin)
        .args(&all_args)
        .stdin(input)
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut status = None;
    poll_until(CMD_TIMEOUT, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut stdout = Vec::new();
    let _ = out.seek(SeekFrom::Start(0));
    let _ = out.read_to_end(&mut stdout);
    let mut e = Vec::new();
    let _ = err.seek(SeekFrom::Start(0));
    let _ = err.read_to_end(&mut e);
    Run {
        args: args.to_vec(),
        status,
        stdout,
        stderr: String::from_utf8_lossy(&e).into_owned(),
    }
}

fn args<S: AsRef<std::ffi::OsStr>>(a: &[S]) -> Vec<OsString> {
    a.iter().map(|s| s.as_ref().to_os_string()).collect()
}

/// `rsfs-overlay args...`, whatever its outcome.
fn rsfs(a: &[OsString]) -> Run {
    run_program(&our_bin(), &[], a, None)
}

/// `rsfs-overlay args...`, asserting it succeeded.
fn rsfs_ok(a: &[OsString]) -> Run {
    let r = rsfs(a);
    assert!(r.ok(), "expected success: {}", r.describe());
    r
}

/// `L1:L2` for `--lowerdir`.
fn lowerdir_arg(lowers: &[&Path]) -> OsString {
    let parts: Vec<&str> = lowers
        .iter()
        .map(|p| p.to_str().expect("UTF-8 layer path"))
        .collect();
    parts.join(":").into()
}

/// The one line `sha256:<64 hex> <size>` the export prints.
fn parse_digest_line(text: &str, context: &str) -> (String, u64) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{context}: expected one line `sha256:<hex> <size>`, got {text:?}"
    );
    let (digest, size) = lines[0]
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("{context}: no space in the digest line {:?}", lines[0]));
    let hex = digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("{context}: digest line does not start with sha256: {digest:?}"));
    assert!(
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{context}: not 64 lowercase hex digits: {hex:?}"
    );
    let size = size
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{context}: size {size:?} is not a number"));
    (digest.to_string(), size)
}

/// `export --upper U [--lowerdir ..] -o OUT extra...`; the digest line from stdout.
fn export_to(upper: &Path, lowers: &[&Path], out: &Path, extra: &[&str]) -> (String, u64) {
    let mut a = args(&["export", "--upper"]);
    a.push(upper.into());
    if !lowers.is_empty() {
        a.push("--lowerdir".into());
        a.push(lowerdir_arg(lowers));
    }
    a.push("-o".into());
    a.push(out.into());
    a.extend(args(extra));
    let r = rsfs_ok(&a);
    parse_digest_line(&r.stdout_text(), &format!("export -o {}", out.display()))
}

fn apply(layer: &Path, dir: &Path, format: &str) {
    rsfs_ok(&args(&[
        OsString::from("apply"),
        layer.into(),
        dir.into(),
        "--format".into(),
        format.into(),
    ]));
}

fn read_layer(path: &Path) -> Vec<TarEntry> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    tarball::read_tar(&bytes)
        .unwrap_or_else(|e| panic!("{} is not a valid tar: {e}", path.display()))
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    format!("sha256:{}", text.split_whitespace().next().expect("a hash"))
}

/// `du -s <flag> path`, the number.
fn du(path: &Path, flag: &str) -> u64 {
    let out = Command::new("du")
        .args(["-s", flag])
        .arg(path)
        .output()
        .expect("run du");
    assert!(
        out.status.success(),
        "du -s {flag} {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du output {text:?}"))
}

/// (bytes, inodes) as `du` counts them: hard links once, the root included.
fn du_upper(upper: &Path) -> (u64, u64) {
    (du(upper, "-B1"), du(upper, "--inodes"))
}

/// `usage args...` parsed from its `bytes N inodes M` line.
fn usage(a: &[OsString]) -> (u64, u64) {
    let mut all = args(&["usage"]);
    all.extend(a.iter().cloned());
    let r = rsfs_ok(&all);
    let text = r.stdout_text();
    let words: Vec<&str> = text.split_whitespace().collect();
    // `bytes N inodes M`, then possibly more `key value` pairs (the caps of a capped mount).
    match words.as_slice() {
        ["bytes", b, "inodes", i, rest @ ..] if rest.len() % 2 == 0 => (
            b.parse()
                .unwrap_or_else(|_| panic!("usage: bytes {b:?} is not a number")),
            i.parse()
                .unwrap_or_else(|_| panic!("usage: inodes {i:?} is not a number")),
        ),
        _ => panic!("usage {a:?}: expected `bytes N inodes M`, got {text:?}"),
    }
}

/// `usage --json args...`, parsed by python3's json module: (bytes, inodes).
fn usage_json(a: &[OsString]) -> (u64, u64) {
    let mut all = args(&["usage", "--json"]);
    all.extend(a.iter().cloned());
    let r = rsfs_ok(&all);
    let script = "import json,sys\nd=json.load(sys.stdin)\nassert isinstance(d,dict), d\n\
                  print(int(d['bytes']), int(d['inodes']))";
    let py = run_program(
        Path::new("python3"),
        &[],
        &args(&["-c", script]),
        Some(&r.stdout),
    );
    assert!(
        py.ok(),
        "usage --json printed {:?}, which python3's json module does not read as an object with \
         bytes and inodes: {}",
        String::from_utf8_lossy(&r.stdout),
        py.stderr
    );
    let text = py.stdout_text();
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn errno_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("{} ({n})", nix::errno::Errno::from_raw(n)),
        None => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing merged trees

/// The mount guard of whichever implementation shows a view.
enum View {
    Kernel(KernelMount),
    Ours(OurMount),
}

impl View {
    fn path(&self) -> &Path {
        match self {
            View::Kernel(k) => k.path(),
            View::Ours(o) => o.path(),
        }
    }
}

fn view_opts() -> SnapshotOpts {
    let mut o = SnapshotOpts::private_probes(Xflavor::Trusted.prefix());
    o.probes
        .extend(SnapshotOpts::private_probes(Xflavor::User.prefix()).probes);
    o
}

/// Non-directory objects named more than once, each group as its sorted paths.
fn link_groups(s: &Snapshot) -> BTreeSet<Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, e) in &s.entries {
        if let Ok(st) = &e.stat {
            if st.kind != Kind::Dir {
                by_ino.entry(st.ino).or_default().push(p.clone());
            }
        }
    }
    by_ino
        .into_values()
        .filter(|v| v.len() > 1)
        .map(|mut v| {
            v.sort();
            v
        })
        .collect()
}

/// Every difference between the trees at `l` and `r` that an exported layer must not make (see
/// the file's comment for what is left out and why).
fn compare_views(ln: &str, l: &Path, rn: &str, r: &Path) -> Vec<String> {
    let a = Snapshot::take(l, &view_opts());
    let b = Snapshot::take(r, &view_opts());
    let copts = CompareOpts::new()
        .skip("ino")
        .skip("d_ino")
        .skip("ctime")
        .skip("mtime")
        .skip("blocks")
        .skip("dir_size")
        .skip("nlink")
        .skip("dev");
    let mut d = snapshot::compare(ln, &a, rn, &b, &copts);
    for (path, ea) in &a.entries {
        let (Ok(sa), Some(Ok(sb))) = (&ea.stat, b.entries.get(path).map(|e| &e.stat)) else {
            continue;
        };
        if sa.kind != sb.kind || sa.kind == Kind::Dir {
            continue;
        }
        if sa.nlink != sb.nlink {
            d.push(format!(
                "{path}: nlink: {ln}={} vs {rn}={}",
                sa.nlink, sb.nlink
            ));
        }
        if sa.kind == Kind::File && sa.mtime.0 != sb.mtime.0 {
            d.push(format!(
                "{path}: mtime (seconds): {ln}={} vs {rn}={}",
                sa.mtime.0, sb.mtime.0
            ));
        }
    }
    let (ga, gb) = (link_groups(&a), link_groups(&b));
    for g in ga.difference(&gb) {
        d.push(format!("hard-link group {g:?} only in {ln}"));
    }
    for g in gb.difference(&ga) {
        d.push(format!("hard-link group {g:?} only in {rn}"));
    }
    for (name, s) in [(ln, &a), (rn, &b)] {
        for prefix in ["trusted.overlay.", "user.overlay."] {
            for x in s.xattrs_with_prefix(prefix) {
                d.push(format!("{name} lists a private xattr: {x}"));
            }
        }
    }
    d
}

/// Names under `root` (relative), every object, sorted; for checks on an applied directory.
fn walk(root: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        for e in std::fs::read_dir(&p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display())) {
            let e = e.expect("dir entry");
            let r = rel.join(e.file_name());
            let md = std::fs::symlink_metadata(e.path()).expect("lstat");
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.push((r.to_string_lossy().into_owned(), md));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------------
// The write-path scenario

/// Fixed times for lower objects: whole seconds, long ago.
const T_LOWER: (i64, i64) = (1_500_000_000, 0);

struct Stack {
    scratch: Scratch,
    l1: PathBuf,
    l2: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl Stack {
    fn lowers(&self) -> [&Path; 2] {
        [&self.l1, &self.l2]
    }

    /// The reference view: ours, read-only, over `U:L1:L2`.
    fn reference(&self) -> OurMount {
        mount_ours(&[&self.upper, &self.l1, &self.l2], None, &[])
    }
}

/// Two lowers with one of each kind of object, hard links, xattrs, owners, a kernel whiteout
/// and an opaque directory in L1; an upper holding an OCI whiteout as containers-storage leaves
/// them (`pre/.wh.gonefile`).
fn build_stack() -> Stack {
    let scratch = Scratch::new();
    let l2 = Layer::new(scratch.join("l2"));
    l2.file("d/file", "base\n")
        .owner("d/file", 1000, 1000)
        .mode("d/file", 0o640)
        .file("d/a", "aaa\n")
        .file("d/sub/x", "x\n")
        .file("d/sub/deep/y", "y\n")
        .file("gone/f1", "f1\n")
        .file("gone/inner/f2", "f2\n")
        .file("gone2/f", "f\n")
        .file("hl/one", "linked\n")
        .hardlink("hl/one", "hl/two")
        .symlink("lnk", "d/file")
        .fifo("fifo")
        .chardev("dev/null1", 1, 3)
        .file("x/attr", "attr\n")
        .xattr("x/attr", "user.color", "blue")
        .xattr("x/attr", "user.shape", "round")
        .xattr("x", "user.dir", "1")
        .file("keep/k", "k\n")
        .file("mv/src/f", "mvf\n")
        .file("mv/src/sub/g", "mvg\n")
        .file("wh/victim", "victim\n")
        .file("op/hidden", "hidden\n")
        .file("pre/gonefile", "pre\n")
        .file("pre/stay", "stay\n")
        .file("big", Rng::new(0x1a7e_5eed).bytes(300 * 1024))
        .file("setuid", "#!/bin/sh\n")
        .mode("setuid", 0o4755);
    let l1 = Layer::new(scratch.join("l1"));
    l1.file("d/file2", "from l1\n")
        .xattr("d/file2", "user.l1", "yes")
        .file("d/over", "l1 version\n")
        .whiteout("wh/victim")
        .file("wh/other", "other\n")
        .opaque("op", Xflavor::Trusted)
        .file("op/only1", "only1\n")
        .file("op/only2", "only2\n");
    l1.set_all_times(T_LOWER);
    l2.set_all_times(T_LOWER);
    let upper = Layer::new(scratch.join("u"));
    upper.dir("pre").oci_whiteout("pre/gonefile");
    let work = scratch.dir("w");
    Stack {
        l1: l1.root().to_path_buf(),
        l2: l2.root().to_path_buf(),
        upper: upper.root().to_path_buf(),
        work,
        scratch,
    }
}

fn append(path: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

fn sh(cmd: &str, a: &[&std::ffi::OsStr]) {
    let out = Command::new(cmd).args(a).output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd} {a:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const LONG_NAME_LEN: usize = 140;

fn long_name() -> String {
    "n".repeat(LONG_NAME_LEN)
}

fn long_target() -> String {
    format!("../{}", "t/".repeat(80))
}

/// Write-path operations through the mount at `m`, each of a kind an upper layer records.
fn write_path_scenario(m: &Path) {
    let p = |rel: &str| m.join(rel);
    let ctx = |what: &str, r: std::io::Result<()>| {
        r.unwrap_or_else(|e| panic!("through the mount: {what}: {e}"));
    };
    // Modify lower files: append (copy-up) and rewrite one of L1's.
    append(&p("d/file"), b"more\n");
    ctx("rewrite d/over", std::fs::write(p("d/over"), "changed\n"));
    // Delete lower files, a lower symlink, a lower fifo, a directory tree.
    ctx("rm d/sub/x", std::fs::remove_file(p("d/sub/x")));
    ctx("rm lnk", std::fs::remove_file(p("lnk")));
    ctx("rm fifo", std::fs::remove_file(p("fifo")));
    ctx("rm wh/other", std::fs::remove_file(p("wh/other")));
    ctx("rm op/only1", std::fs::remove_file(p("op/only1")));
    ctx("rm -r gone2", std::fs::remove_dir_all(p("gone2")));
    // rm -rf a lower directory and make it again: opaque.
    ctx("rm -r gone", std::fs::remove_dir_all(p("gone")));
    ctx("mkdir gone", std::fs::create_dir(p("gone")));
    ctx("write gone/new", std::fs::write(p("gone/new"), "new\n"));
    // Renames: a lower file into a subdirectory, a new file, a lower directory (EXDEV without
    // redirect_dir, so mv copies the tree and removes the old one).
    ctx("mv d/a d/sub/a2", std::fs::rename(p("d/a"), p("d/sub/a2")));
    ctx("mkdir new", std::fs::create_dir_all(p("new/dir")));
    ctx("write new/r1", std::fs::write(p("new/r1"), "r\n"));
    ctx(
        "mv new/r1 new/r2",
        std::fs::rename(p("new/r1"), p("new/r2")),
    );
    sh("mv", &[p("mv/src").as_os_str(), p("mv/dst").as_os_str()]);
    // New files, hard links of a new and of a lower file, a lower hard-link pair written to
    // (both names looked up first: they stay one file, see the README).
    ctx(
        "write new/dir/file",
        std::fs::write(p("new/dir/file"), "nf\n"),
    );
    ctx(
        "ln new/dir/file new/link2",
        std::fs::hard_link(p("new/dir/file"), p("new/link2")),
    );
    ctx(
        "ln big big.link",
        std::fs::hard_link(p("big"), p("big.link")),
    );
    for n in ["hl/one", "hl/two"] {
        std::fs::symlink_metadata(p(n)).unwrap_or_else(|e| panic!("lstat {n}: {e}"));
    }
    append(&p("hl/one"), b"and more\n");
    ctx("write new/empty", std::fs::write(p("new/empty"), ""));
    ctx(
        "write the long name",
        std::fs::write(p(&format!("new/{}", long_name())), "long\n"),
    );
    ctx(
        "symlink with a long target",
        std::os::unix::fs::symlink(long_target(), p("new/longlink")),
    );
    ctx(
        "write a non-ASCII name",
        std::fs::write(p("new/naïve ünïcode.txt"), "utf8\n"),
    );
    ctx(
        "symlink new/sym",
        std::os::unix::fs::symlink("../d/file", p("new/sym")),
    );
    // xattrs: set on a lower file (copy-up) and a directory, remove one from a lower file.
    ctx(
        "setxattr d/file2",
        xattr::set(&p("d/file2"), "user.new", b"1"),
    );
    ctx("setxattr d", xattr::set(&p("d"), "user.dirattr", b"dv"));
    ctx(
        "removexattr x/attr",
        xattr::remove(&p("x/attr"), "user.color"),
    );
    ctx(
        "setxattr new/dir/file",
        xattr::set(&p("new/dir/file"), "user.bin", b"\x00\x01\xff"),
    );
    // Modes and owners.
    ctx(
        "chmod d/sub/deep/y",
        std::fs::set_permissions(p("d/sub/deep/y"), std::fs::Permissions::from_mode(0o600)),
    );
    ctx(
        "chown d/file2",
        std::os::unix::fs::chown(p("d/file2"), Some(4321), Some(8765)),
    );
    ctx(
        "chmod new/dir",
        std::fs::set_permissions(p("new/dir"), std::fs::Permissions::from_mode(0o700)),
    );
    ctx(
        "chown new/sym",
        std::os::unix::fs::lchown(p("new/sym"), Some(77), Some(88)),
    );
    // Special files.
    nix::unistd::mkfifo(&p("new/fifo"), Mode::from_bits_truncate(0o640))
        .unwrap_or_else(|e| panic!("mkfifo new/fifo: {e}"));
    mknod(
        &p("new/chr"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(1, 5),
    )
    .unwrap_or_else(|e| panic!("mknod new/chr: {e}"));
    // A chosen mtime on a new file and on a copied-up one.
    for rel in ["new/dir/file", "d/file"] {
        utimensat(
            nix::fcntl::AT_FDCWD,
            &p(rel),
            &TimeSpec::new(1_600_000_000, 0),
            &TimeSpec::new(1_600_000_123, 0),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap_or_else(|e| panic!("utimensat {rel}: {e}"));
    }
}

/// What the reference view must show after the scenario: proof the comparison is not between
/// two views that both lost the changes.
fn check_scenario_visible(m: &Path) {
    let read = |rel: &str| {
        std::fs::read_to_string(m.join(rel))
            .unwrap_or_else(|e| panic!("reference view: read {rel}: {e}"))
    };
    let absent = |rel: &str| {
        assert!(
            std::fs::symlink_metadata(m.join(rel)).is_err(),
            "reference view: {rel} should be gone"
        )
    };
    assert_eq!(read("d/file"), "base\nmore\n", "reference view: d/file");
    assert_eq!(read("gone/new"), "new\n", "reference view: gone/new");
    assert_eq!(
        read("mv/dst/sub/g"),
        "mvg\n",
        "reference view: mv/dst/sub/g"
    );
    for rel in [
        "d/sub/x",
        "gone/f1",
        "gone2",
        "lnk",
        "fifo",
        "pre/gonefile",
        "mv/src",
        "wh/victim",
    ] {
        absent(rel);
    }
}

/// Run the scenario through our mount on a fresh stack; the daemon must exit 0.
fn stack_after_scenario(extra: &[&str], scenario: fn(&Path)) -> Stack {
    let st = build_stack();
    let m = mount_ours(&st.lowers(), Some((&st.upper, &st.work)), extra);
    scenario(m.path());
    let ended = m.unmount();
    assert_eq!(
        ended.daemon,
        common::DaemonExit::Exited(0),
        "our daemon did not exit 0 after the scenario; stderr: {}",
        ended.stderr
    );
    st
}

/// What a scenario left in the upper, for checks on the applied directory.
struct Expect {
    /// What the reference view must show (see `check_scenario_visible`).
    visible: fn(&Path),
    /// A deleted lower object: a 0/0 device in the kernel format, `.wh.NAME` in the OCI one.
    whiteout: &'static str,
    /// An opaque directory: `trusted.overlay.opaque=y`, or `.wh..wh..opq` inside.
    opaque: &'static str,
}

const SCENARIO: Expect = Expect {
    visible: check_scenario_visible,
    whiteout: "d/sub/x",
    opaque: "gone",
};

/// Export, apply in `format`, mount `N:L1:L2` with the kernel (`kernel`) or ours (`oci`), and
/// compare with ours over `U:L1:L2`.
fn round_trip(st: &Stack, format: &str, expect: &Expect) -> Vec<TarEntry> {
    let blob = st.scratch.join("layer.tar");
    export_to(&st.upper, &st.lowers(), &blob, &[]);
    let entries = read_layer(&blob);
    let n = st.scratch.dir("n");
    apply(&blob, &n, format);

    // The applied directory holds the format asked for.
    let on_disk = walk(&n);
    let wh_files: Vec<&String> = on_disk
        .iter()
        .map(|(p, _)| p)
        .filter(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(".wh."))
        })
        .collect();
    let devices_00: Vec<&String> = on_disk
        .iter()
        .filter(|(_, md)| md.file_type().is_char_device() && md.rdev() == 0)
        .map(|(p, _)| p)
        .collect();
    match format {
        "kernel" => {
            assert!(
                wh_files.is_empty(),
                "apply --format kernel left .wh. files: {wh_files:?}"
            );
            assert!(
                devices_00.iter().any(|p| *p == expect.whiteout),
                "apply --format kernel made no whiteout device for {}; 0/0 devices: \
                 {devices_00:?}",
                expect.whiteout
            );
            let opaque = xattr::get(&n.join(expect.opaque), "trusted.overlay.opaque");
            assert_eq!(
                opaque.as_deref().ok(),
                Some(&b"y"[..]),
                "apply --format kernel: {}/ is not marked trusted.overlay.opaque=y ({opaque:?})",
                expect.opaque
            );
        }
        _ => {
            assert!(
                devices_00.is_empty(),
                "apply --format oci made whiteout devices: {devices_00:?}"
            );
            let (parent, name) = expect
                .whiteout
                .rsplit_once('/')
                .unwrap_or(("", expect.whiteout));
            let wh = if parent.is_empty() {
                format!(".wh.{name}")
            } else {
                format!("{parent}/.wh.{name}")
            };
            for want in [wh, format!("{}/.wh..wh..opq", expect.opaque)] {
                assert!(
                    wh_files.iter().any(|p| **p == want),
                    "apply --format oci did not keep {want}; .wh. files: {wh_files:?}"
                );
            }
        }
    }

    let reference = st.reference();
    (expect.visible)(reference.path());
    let applied = match format {
        "kernel" => View::Kernel(mount_kernel(&[&n, &st.l1, &st.l2], None, &[])),
        _ => View::Ours(mount_ours(&[&n, &st.l1, &st.l2], None, &[])),
    };
    let (an, rn) = match format {
        "kernel" => ("kernel over N:L1:L2", "ours over U:L1:L2"),
        _ => ("ours over N(oci):L1:L2", "ours over U:L1:L2"),
    };
    let diffs = compare_views(an, applied.path(), rn, reference.path());
    assert_no_diffs(
        &format!(
            "the tree after export + apply --format {format} differs from the upper's (scratch \
             {}; RSFS_TEST_KEEP=1 keeps it)",
            st.scratch.path().display()
        ),
        &diffs,
    );
    entries
}

// ---------------------------------------------------------------------------------------------
// 1. round trip

#[test]
fn round_trip_kernel_format_mounted_by_the_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    let st = stack_after_scenario(&[], write_path_scenario);
    round_trip(&st, "kernel", &SCENARIO);
}

#[test]
fn round_trip_oci_format_mounted_by_ours() {
    if !common::require_root_and_fuse() {
        return;
    }
    let st = stack_after_scenario(&[], write_path_scenario);
    round_trip(&st, "oci", &SCENARIO);
}

// ---------------------------------------------------------------------------------------------
// 2. round trip with redirect_dir=on

/// Moves lower directories with `redirect_dir=on` (to another parent, and within one), then
/// writes inside the moved tree.
fn redirect_scenario(m: &Path) {
    let p = |rel: &str| m.join(rel);
    std::fs::rename(p("d/sub"), p("keep/moved")).unwrap_or_else(|e| {
        panic!("mv d/sub keep/moved with redirect_dir=on: {e} (it must not need a copy)")
    });
    std::fs::rename(p("mv/src"), p("mv/renamed"))
        .unwrap_or_else(|e| panic!("mv mv/src mv/renamed with redirect_dir=on: {e}"));
    append(&p("keep/moved/deep/y"), b"appended\n");
    std::fs::write(p("keep/moved/fresh"), "fresh\n").expect("write keep/moved/fresh");
    std::fs::remove_file(p("keep/moved/x")).expect("rm keep/moved/x");
    std::fs::write(p("d/sub"), "a file where the directory was\n").expect("write d/sub");
}

fn check_redirect_visible(m: &Path) {
    let read = |rel: &str| {
        std::fs::read_to_string(m.join(rel))
            .unwrap_or_else(|e| panic!("reference view: read {rel}: {e}"))
    };
    assert_eq!(read("keep/moved/deep/y"), "y\nappended\n");
    assert_eq!(read("keep/moved/a2"), "moved with the dir\n");
    assert_eq!(read("mv/renamed/sub/g"), "mvg\n");
    assert_eq!(read("d/sub"), "a file where the directory was\n");
    assert!(std::fs::symlink_metadata(m.join("keep/moved/x")).is_err());
    assert!(std::fs::symlink_metadata(m.join("mv/src")).is_err());
}

#[test]
fn round_trip_redirect_dir() {
    if !common::require_root_and_fuse() {
        return;
    }
    let st = build_stack();
    // Merged content in the moved tree: L1 adds to what L2 has.
    Layer::new(&st.l1)
        .file("d/sub/a2", "moved with the dir\n")
        .file("d/sub/deep/l1only", "l1\n")
        .set_all_times(T_LOWER);
    let m = mount_ours(
        &st.lowers(),
        Some((&st.upper, &st.work)),
        &["redirect_dir=on"],
    );
    redirect_scenario(m.path());
    let ended = m.unmount();
    assert_eq!(
        ended.daemon,
        common::DaemonExit::Exited(0),
        "daemon exit; stderr: {}",
        ended.stderr
    );
    // The scenario did what it is about: the upper has redirects, not copies.
    for (rel, want) in [("keep/moved", "/d/sub"), ("mv/renamed", "src")] {
        let got = xattr::get(&st.upper.join(rel), "trusted.overlay.redirect");
        assert_eq!(
            got.as_deref().ok(),
            Some(want.as_bytes()),
            "upper {rel} should carry trusted.overlay.redirect={want} ({got:?})"
        );
    }
    let expect = Expect {
        visible: check_redirect_visible,
        whiteout: "mv/src",
        opaque: "keep/moved",
    };
    let entries = round_trip(&st, "kernel", &expect);
    let names: BTreeSet<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    for want in [
        "keep/moved/.wh..wh..opq",
        "keep/moved/deep/l1only",
        "keep/moved/deep/y",
        "keep/moved/a2",
        "mv/renamed/.wh..wh..opq",
        "mv/renamed/sub/g",
        "mv/.wh.src",
    ] {
        assert!(
            names.contains(want),
            "the export of a redirected directory lacks {want}: it must be opaque with its \
             whole merged content; entries: {names:?}"
        );
    }
    assert!(
        !names.contains("keep/moved/x") && !names.contains("keep/moved/.wh.x"),
        "keep/moved/x was deleted inside an opaque export: neither it nor a whiteout for it \
         belongs in the layer; entries: {names:?}"
    );

    // Through ours too, in the OCI format.
    let n2 = st.scratch.dir("n2");
    apply(&st.scratch.join("layer.tar"), &n2, "oci");
    let applied = mount_ours(&[&n2, &st.l1, &st.l2], None, &[]);
    let reference = st.reference();
    let diffs = compare_views(
        "ours over N(oci):L1:L2",
        applied.path(),
        "ours over U:L1:L2",
        reference.path(),
    );
    assert_no_diffs("redirect_dir=on export applied --format oci", &diffs);
}

// ---------------------------------------------------------------------------------------------
// 3. determinism

#[test]
fn export_is_deterministic() {
    if !common::require_root_and_fuse() {
        return;
    }
    let st = stack_after_scenario(&[], write_path_scenario);
    let s = &st.scratch;
    let lowers = st.lowers();
    for (label, extra) in [
        ("plain", &[][..]),
        ("--gzip", &["--gzip"][..]),
        ("--zstd", &["--zstd"][..]),
    ] {
        let a = s.join(&format!("a{}.blob", label.trim_start_matches('-')));
        let b = s.join(&format!("b{}.blob", label.trim_start_matches('-')));
        let da = export_to(&st.upper, &lowers, &a, extra);
        let db = export_to(&st.upper, &lowers, &b, extra);
        let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!(
            ba == bb,
            "export {label}: two exports of one upper differ ({} vs {} bytes)",
            ba.len(),
            bb.len()
        );
        assert_eq!(da, db, "export {label}: the printed digests differ");
        assert_eq!(
            da.0,
            sha256_file(&a),
            "export {label}: printed digest is not the sha256 of the file"
        );
        assert_eq!(
            da.1,
            ba.len() as u64,
            "export {label}: printed size is not the file's"
        );
        // To stdout: the same bytes, the digest line on stderr.
        let mut a2 = args(&["export", "--upper"]);
        a2.push(st.upper.clone().into());
        a2.extend(args(&["--lowerdir"]));
        a2.push(lowerdir_arg(&lowers));
        a2.extend(args(&["-o", "-"]));
        a2.extend(args(extra));
        let r = rsfs_ok(&a2);
        assert!(
            r.stdout == ba,
            "export {label} -o -: stdout ({} bytes) differs from -o FILE ({} bytes)",
            r.stdout.len(),
            ba.len()
        );
        let de = parse_digest_line(&r.stderr, &format!("export {label} -o - (stderr)"));
        assert_eq!(de, da, "export {label}: digest on stderr with -o -");
        // The default output is stdout too.
        let mut a3 = args(&["export", "--upper"]);
        a3.push(st.upper.clone().into());
        a3.extend(args(&["--lowerdir"]));
        a3.push(lowerdir_arg(&lowers));
        a3.extend(args(extra));
        let r = rsfs_ok(&a3);
        assert!(
            r.stdout == ba,
            "export {label} without -o: stdout differs from -o FILE"
        );
    }
    // Compressed blobs hold the same tar: gzip decompresses to it; each applies to the same tree.
    let plain = std::fs::read(s.join("aplain.blob")).unwrap();
    let gunzip = Command::new("gzip")
        .arg("-dc")
        .arg(s.join("agzip.blob"))
        .output()
        .expect("run gzip");
    assert!(
        gunzip.status.success(),
        "gzip -dc of the --gzip export failed"
    );
    assert!(
        gunzip.stdout == plain,
        "the --gzip export does not decompress to the plain export"
    );
    let trees: Vec<PathBuf> = ["aplain", "agzip", "azstd"]
        .iter()
        .map(|b| {
            let dir = s.dir(&format!("t-{b}"));
            apply(&s.join(&format!("{b}.blob")), &dir, "oci");
            dir
        })
        .collect();
    // And from stdin.
    let stdin_dir = s.dir("t-stdin");
    let r = run_program(
        &our_bin(),
        &[],
        &args(&[
            OsString::from("apply"),
            "-".into(),
            stdin_dir.clone().into(),
            "--format".into(),
            "oci".into(),
        ]),
        Some(&std::fs::read(s.join("azstd.blob")).unwrap()),
    );
    assert!(r.ok(), "apply - (zstd on stdin): {}", r.describe());
    let opts = CompareOpts::new()
        .skip("ino")
        .skip("d_ino")
        .skip("ctime")
        .skip("mtime")
        .skip("blocks")
        .skip("dev");
    let base = Snapshot::take(&trees[0], &SnapshotOpts::default());
    for (name, dir) in [
        ("gzip", &trees[1]),
        ("zstd", &trees[2]),
        ("zstd from stdin", &stdin_dir),
    ] {
        let other = Snapshot::take(dir, &SnapshotOpts::default());
        let mut d = snapshot::compare("plain", &base, name, &other, &opts);
        d.retain(|l| !l.starts_with("/: "));
        assert_no_diffs(&format!("apply of the {name} export vs the plain one"), &d);
    }

    // A copy of the upper (other inode numbers, other directory order on disk) is the same
    // upper: it exports to the same bytes.
    let copy = s.join("ucopy");
    sh(
        "cp",
        &["-a".as_ref(), st.upper.as_os_str(), copy.as_os_str()],
    );
    let c = s.join("copy.blob");
    let dc = export_to(&copy, &lowers, &c, &[]);
    assert!(
        std::fs::read(&c).unwrap() == plain,
        "an exact copy of the upper (cp -a) exports to other bytes: the output depends on \
         something besides the content (inode numbers? readdir order?)"
    );
    assert_eq!(dc.0, sha256_file(&s.join("aplain.blob")));
}

// ---------------------------------------------------------------------------------------------
// 4. the tar's entries

/// An upper made by hand with every whiteout and opaque form, private xattrs, hard links and one
/// object of each type.
fn handmade_upper(s: &Scratch) -> PathBuf {
    let u = Layer::new(s.join("u"));
    u.file("f", "f\n")
        .xattr("f", "user.keep", "1")
        .xattr("f", "trusted.overlay.origin", b"\x00\xfb\x21")
        .xattr("f", "user.overlay.origin", "x")
        .xattr("f", "user.fuseoverlayfs.origin", "y")
        .owner("f", 1234, 5678)
        .mode("f", 0o640)
        .dir("d")
        .xattr("d", "trusted.overlay.impure", "y")
        .whiteout("d/wh_chr")
        .file("d/a_file", "a\n")
        .file("d/z_file", "z\n")
        .file("xw/a", "a\n")
        .file("op/-dash", "a name that sorts before .wh..wh..opq\n")
        .xattr_whiteout("xw/gone", Xflavor::Trusted)
        .xattr_whiteout("uw/gone", Xflavor::User)
        .oci_whiteout("oci/old")
        .opaque("op", Xflavor::Trusted)
        .file("op/inside", "inside\n")
        .opaque("uop", Xflavor::User)
        .oci_opaque("ociop")
        .file("ociop/in", "in\n")
        .fuseoverlayfs_opaque("fop")
        .file("h1", "hard\n")
        .hardlink("h1", "h2")
        .hardlink("h1", "sub/h3")
        .symlink("s", "target/of/s")
        .fifo("p")
        .chardev("c", 1, 7)
        .dir("perm")
        .mode("perm", 0o750)
        .owner("perm", 1000, 1001)
        .mode("perm", 0o2750)
        .file("suid", "#!/bin/sh\n")
        .mode("suid", 0o4755)
        .set_all_times((1_234_567_890, 0));
    u.times("f", (1_111_111_111, 5), (1_222_222_222, 999_999_999));
    u.root().to_path_buf()
}

/// `tar -tvf` of `blob` with GNU tar: (names, the verbose listing).
fn gnu_tar_list(blob: &Path) -> (Vec<String>, String) {
    let names = Command::new("tar")
        .arg("-tf")
        .arg(blob)
        .output()
        .expect("tar");
    assert!(
        names.status.success(),
        "GNU tar cannot list the export: {}",
        String::from_utf8_lossy(&names.stderr)
    );
    let verbose = Command::new("tar")
        .arg("-tvf")
        .arg(blob)
        .output()
        .expect("tar");
    (
        String::from_utf8_lossy(&names.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
        String::from_utf8_lossy(&verbose.stdout).into_owned(),
    )
}

#[test]
fn tar_entries_of_a_handmade_upper() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let u = handmade_upper(&s);
    let blob = s.join("layer.tar");
    export_to(&u, &[], &blob, &[]);
    let entries = read_layer(&blob);
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let by_name: BTreeMap<&str, &TarEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    assert_eq!(
        by_name.len(),
        entries.len(),
        "an entry name appears twice: {names:?}"
    );

    // GNU tar reads the same names.
    let (gnu_names, verbose) = gnu_tar_list(&blob);
    assert_eq!(
        gnu_names, names,
        "GNU tar lists other names than our reading of the archive"
    );

    // Names: relative, directories with a trailing slash, in sorted order, parents first.
    for e in &entries {
        assert!(
            !e.name.starts_with('/') && !e.name.starts_with("./") && !e.name.is_empty(),
            "entry name {:?} is not relative without ./",
            e.name
        );
        assert_eq!(
            e.typeflag == tarball::DIRECTORY,
            e.name.ends_with('/'),
            "{:?} ({}): directories and only directories end with /",
            e.name,
            e.kind_name()
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    let mut by_components = names.clone();
    by_components.sort_by(|a, b| {
        a.trim_end_matches('/')
            .split('/')
            .cmp(b.trim_end_matches('/').split('/'))
    });
    let first_unsorted = names
        .windows(2)
        .find(|w| w[0] > w[1])
        .map(|w| format!("{:?} before {:?}", w[0], w[1]));
    assert!(
        names == sorted || names == by_components,
        "entries are not sorted (by name, or by path components): {} in {names:?}",
        first_unsorted.unwrap_or_default()
    );
    for e in &entries {
        let trimmed = e.name.trim_end_matches('/');
        if let Some((parent, _)) = trimmed.rsplit_once('/') {
            let pi = names.iter().position(|n| *n == format!("{parent}/"));
            let ei = names.iter().position(|n| *n == e.name).unwrap();
            assert!(
                pi.is_some_and(|pi| pi < ei),
                "{:?} comes before (or without) its parent directory entry {parent}/",
                e.name
            );
        }
    }

    // Every whiteout form became an empty regular `.wh.NAME`; the objects themselves are gone.
    for wh in ["d/.wh.wh_chr", "xw/.wh.gone", "uw/.wh.gone", "oci/.wh.old"] {
        let e = by_name
            .get(wh)
            .unwrap_or_else(|| panic!("no {wh} in the export; entries: {names:?}"));
        assert!(
            e.typeflag == tarball::REGULAR && e.size == 0,
            "{wh} should be an empty regular file, is a {} of {} bytes",
            e.kind_name(),
            e.size
        );
    }
    for gone in ["d/wh_chr", "xw/gone", "uw/gone"] {
        assert!(
            !by_name.contains_key(gone),
            "the whiteout object {gone} itself was exported"
        );
    }
    // Opaque directories, in each format, get exactly one marker; a directory that merely
    // holds xattr whiteouts (opaque=x) is not opaque.
    for dir in ["op", "uop", "ociop"] {
        let m = format!("{dir}/.wh..wh..opq");
        let e = by_name
            .get(m.as_str())
            .unwrap_or_else(|| panic!("opaque {dir}/ has no {m}; entries: {names:?}"));
        assert!(
            e.typeflag == tarball::REGULAR && e.size == 0,
            "{m} should be an empty regular file"
        );
    }
    for dir in ["xw", "uw", "d"] {
        let m = format!("{dir}/.wh..wh..opq");
        assert!(
            !by_name.contains_key(m.as_str()),
            "{dir}/ is not opaque but the export has {m}"
        );
    }
    // No private xattr anywhere; ordinary ones kept with their values.
    for e in &entries {
        for k in e.xattrs.keys() {
            assert!(
                !(k.starts_with("trusted.overlay.")
                    || k.starts_with("user.overlay.")
                    || k.starts_with("user.fuseoverlayfs.")),
                "{}: the overlay's private xattr {k} was exported",
                e.name
            );
        }
    }
    assert_eq!(
        by_name["f"].xattrs.get("user.keep").map(Vec::as_slice),
        Some(&b"1"[..]),
        "f: user.keep lost; its PAX records: {:?}",
        by_name["f"].pax.keys().collect::<Vec<_>>()
    );
    // Hard links: the first name in archive order is the file, the others link to it.
    let h1 = by_name["h1"];
    assert_eq!(h1.typeflag, tarball::REGULAR, "h1 ({})", h1.kind_name());
    for other in ["h2", "sub/h3"] {
        let e = by_name[other];
        assert!(
            e.typeflag == tarball::HARDLINK && e.linkname == "h1",
            "{other} should be a hard link entry to h1, is a {} -> {:?}",
            e.kind_name(),
            e.linkname
        );
        assert!(
            verbose.contains(&format!("{other} link to h1")),
            "GNU tar does not list {other} as a link to h1:\n{verbose}"
        );
    }
    // Each type with its metadata.
    let s_e = by_name["s"];
    assert!(
        s_e.typeflag == tarball::SYMLINK && s_e.linkname == "target/of/s",
        "s: {} -> {:?}",
        s_e.kind_name(),
        s_e.linkname
    );
    assert_eq!(by_name["p"].typeflag, tarball::FIFO, "p");
    let c = by_name["c"];
    assert!(
        c.typeflag == tarball::CHARDEV && (c.devmajor, c.devminor) == (1, 7),
        "c: {} {}:{}",
        c.kind_name(),
        c.devmajor,
        c.devminor
    );
    for e in &entries {
        let rel = e.name.trim_end_matches('/');
        if rel.contains(".wh.") {
            continue;
        }
        let md = std::fs::symlink_metadata(u.join(rel))
            .unwrap_or_else(|err| panic!("{rel} is in the export but not in the upper: {err}"));
        if e.typeflag != tarball::SYMLINK {
            assert_eq!(
                e.mode & 0o7777,
                md.mode() & 0o7777,
                "{rel}: mode {:o} in the tar, {:o} in the upper",
                e.mode,
                md.mode()
            );
        }
        assert_eq!(
            (e.uid, e.gid),
            (md.uid() as u64, md.gid() as u64),
            "{rel}: owner"
        );
        assert_eq!(e.mtime, md.mtime(), "{rel}: mtime (seconds)");
        if e.typeflag == tarball::REGULAR {
            let data = std::fs::read(u.join(rel)).unwrap();
            assert!(e.data == data, "{rel}: content differs from the upper's");
        }
    }
    // And nothing of the upper is missing: every non-whiteout object has an entry.
    for (rel, md) in walk(&u) {
        let is_wh = (md.file_type().is_char_device() && md.rdev() == 0)
            || rel.contains(".wh.")
            || rel.ends_with("/gone");
        if is_wh {
            continue;
        }
        let name = if md.is_dir() { format!("{rel}/") } else { rel };
        assert!(
            by_name.contains_key(name.as_str()),
            "{name} is in the upper but not in the export"
        );
    }
}

/// Entries the export of the write-path scenario's upper must hold.
#[test]
fn tar_entries_of_a_mounted_upper() {
    if !common::require_root_and_fuse() {
        return;
    }
    let st = stack_after_scenario(&[], write_path_scenario);
    let blob = st.scratch.join("layer.tar");
    export_to(&st.upper, &st.lowers(), &blob, &[]);
    let entries = read_layer(&blob);
    let by_name: BTreeMap<&str, &TarEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    for (want, kind) in [
        ("d/sub/.wh.x", tarball::REGULAR),
        ("d/.wh.a", tarball::REGULAR),
        (".wh.lnk", tarball::REGULAR),
        (".wh.fifo", tarball::REGULAR),
        (".wh.gone2", tarball::REGULAR),
        ("pre/.wh.gonefile", tarball::REGULAR),
        ("mv/.wh.src", tarball::REGULAR),
        ("gone/.wh..wh..opq", tarball::REGULAR),
        ("gone/", tarball::DIRECTORY),
        ("gone/new", tarball::REGULAR),
        ("d/file", tarball::REGULAR),
        ("d/sub/a2", tarball::REGULAR),
        ("mv/dst/sub/g", tarball::REGULAR),
        ("new/chr", tarball::CHARDEV),
        ("new/fifo", tarball::FIFO),
        ("new/sym", tarball::SYMLINK),
        ("new/longlink", tarball::SYMLINK),
    ] {
        let e = by_name
            .get(want)
            .unwrap_or_else(|| panic!("the export lacks {want}; it has {names:?}"));
        assert_eq!(
            e.typeflag,
            kind,
            "{want}: a {} in the export",
            e.kind_name()
        );
    }
    let long = format!("new/{}", long_name());
    assert!(
        by_name.contains_key(long.as_str()),
        "the {LONG_NAME_LEN}-character name is missing or cut: {names:?}"
    );
    assert_eq!(
        by_name["new/longlink"].linkname,
        long_target(),
        "a symlink target over 100 bytes is cut"
    );
    // The lower hard link written to, the new link pair and the link of a lower file.
    for (a, b) in [
        ("hl/one", "hl/two"),
        ("new/dir/file", "new/link2"),
        ("big", "big.link"),
    ] {
        let (ea, eb) = (by_name.get(a), by_name.get(b));
        let linked = matches!((ea, eb), (Some(x), Some(y))
            if (y.typeflag == tarball::HARDLINK && y.linkname == a && x.typeflag == tarball::REGULAR)
            || (x.typeflag == tarball::HARDLINK && x.linkname == b && y.typeflag == tarball::REGULAR));
        assert!(
            linked,
            "{a} and {b} are one file in the upper but not a file plus a hard-link entry in the \
             export: {:?} / {:?}",
            ea.map(|e| (e.kind_name(), &e.linkname)),
            eb.map(|e| (e.kind_name(), &e.linkname))
        );
    }
    // Unchanged lower objects are not in the layer.
    // (x/ is there: the parent of x/attr, copied up to lose an xattr.)
    for unchanged in ["keep/k", "keep/", "op/only2", "dev/null1", "setuid", "dev/"] {
        assert!(
            !by_name.contains_key(unchanged),
            "{unchanged} was not changed but is in the export"
        );
    }
    // The xattr changes: set, and removed (x/attr copied up without user.color).
    let x = by_name
        .get("x/attr")
        .unwrap_or_else(|| panic!("x/attr (an xattr removed) is not in the export"));
    assert!(
        !x.xattrs.contains_key("user.color")
            && x.xattrs.get("user.shape").map(Vec::as_slice) == Some(b"round"),
        "x/attr xattrs in the export: {:?}",
        x.xattrs
    );
    assert_eq!(
        by_name["new/dir/file"]
            .xattrs
            .get("user.bin")
            .map(Vec::as_slice),
        Some(&b"\x00\x01\xff"[..]),
        "a binary xattr value is not kept byte for byte"
    );
    for e in &entries {
        for k in e.xattrs.keys() {
            assert!(
                !k.starts_with("trusted.overlay.") && !k.starts_with("user.overlay."),
                "{}: private xattr {k} exported",
                e.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. podman

/// Files of the podman test's image besides busybox.
fn podman_image_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("data/a.txt", b"alpha\n".to_vec()),
        ("data/keep.txt", b"keep\n".to_vec()),
        ("data/gone.txt", b"gone\n".to_vec()),
        ("data/big.bin", Rng::new(0x0bad_cafe).bytes(200 * 1024)),
        ("data/sub/s.txt", b"sub\n".to_vec()),
        ("data/sub/deep/d.txt", b"deep\n".to_vec()),
        ("data/again/old.txt", b"old\n".to_vec()),
        ("data/again/inner/o.txt", b"o\n".to_vec()),
    ]
}

/// The paths `podman diff` never lists for a container (libpod/diff.go, `initInodes`).
const PODMAN_INIT_INODES: &[&str] = &[
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/proc",
    "/run",
    "/run/notify",
    "/run/.containerenv",
    "/run/secrets",
    "/sys",
    "/etc/mtab",
];

/// Entry names of a layer with `./` and trailing `/` taken off, whiteouts kept.
fn normalized_names(entries: &[TarEntry]) -> BTreeSet<String> {
    entries
        .iter()
        .map(|e| {
            e.name
                .trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/')
                .to_string()
        })
        .filter(|n| !n.is_empty() && n != ".")
        .collect()
}

fn set_diff(what: &str, ln: &str, l: &BTreeSet<String>, rn: &str, r: &BTreeSet<String>) {
    let only_l: Vec<&String> = l.difference(r).collect();
    let only_r: Vec<&String> = r.difference(l).collect();
    assert!(
        only_l.is_empty() && only_r.is_empty(),
        "{what}: only in {ln}: {only_l:#?}\nonly in {rn}: {only_r:#?}"
    );
}

#[test]
fn podman_diff_and_commit_agree_with_diff_and_export() {
    let Some(tools) = podman_env::tools() else {
        return;
    };
    let pm = podman_env::Podman::new(&tools, &our_bin(), &podman_image_files());
    pm.sh(
        &["--name", "c1"],
        podman_env::IMAGE,
        "set -e; echo more >> /data/a.txt; chmod 600 /data/keep.txt; rm /data/gone.txt; \
         rm -r /data/sub/deep; mv /data/big.bin /data/moved.bin; echo new > /data/new.txt; \
         mkdir -p /newdir/inner; echo x > /newdir/inner/f; ln -s a.txt /data/link; \
         ln /data/new.txt /data/new.hard; rm -rf /data/again; mkdir /data/again; \
         echo fresh > /data/again/fresh.txt",
    );
    let inspect = |field: &str| {
        pm.ok(&[
            "inspect",
            "--format",
            &format!("{{{{.GraphDriver.Data.{field}}}}}"),
            "c1",
        ])
        .trim()
        .to_string()
    };
    let upper = PathBuf::from(inspect("UpperDir"));
    let lowerdir = inspect("LowerDir");
    assert!(
        upper.is_dir() && !lowerdir.is_empty(),
        "podman inspect gave upper {upper:?} and lowers {lowerdir:?}"
    );

    // `rsfs-overlay diff` prints what `podman diff` prints.
    let podman_diff: BTreeSet<String> = pm
        .ok(&["diff", "c1"])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    for want in [
        "A /data/new.txt",
        "C /data/a.txt",
        "D /data/gone.txt",
        "D /data/sub/deep",
    ] {
        assert!(
            podman_diff.contains(want),
            "podman diff itself lacks {want} (scenario broken?): {podman_diff:#?}"
        );
    }
    let ours = rsfs_ok(&[
        "diff".into(),
        "--upper".into(),
        upper.clone().into(),
        "--lowerdir".into(),
        lowerdir.clone().into(),
    ]);
    let ours_text = ours.stdout_text();
    let ours_lines: Vec<&str> = ours_text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut sorted = ours_lines.clone();
    sorted.sort_by_key(|l| l.get(2..).unwrap_or(""));
    assert_eq!(
        ours_lines, sorted,
        "rsfs-overlay diff is not sorted by path"
    );
    // podman diff leaves out the paths the engine itself makes in every container (libpod's
    // `initInodes`: mount points for /etc/hosts and the like); a diff of an upper cannot tell
    // them from the container's own changes, so they are taken out of ours here.
    let ours_set: BTreeSet<String> = ours_lines
        .iter()
        .filter(|l| !PODMAN_INIT_INODES.contains(&l.get(2..).unwrap_or("")))
        .map(|l| l.to_string())
        .collect();
    set_diff(
        "diff lines",
        "rsfs-overlay diff",
        &ours_set,
        "podman diff",
        &podman_diff,
    );

    // The layer podman commit stores has the entries our export has. Compared: names
    // (whiteouts and opaque markers included). Not compared: order, PAX records podman's Go tar
    // writer adds (atime, ctime), uname/gname.
    pm.ok(&["commit", "-q", "c1", "localhost/rsfs-layers-committed:1"]);
    let archive = pm.scratch.join("saved.tar");
    pm.ok(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        archive.to_str().unwrap(),
        "localhost/rsfs-layers-committed:1",
    ]);
    let manifest = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("manifest.json")
        .output()
        .expect("tar");
    assert!(manifest.status.success(), "no manifest.json in podman save");
    let py = run_program(
        Path::new("python3"),
        &[],
        &args(&[
            "-c",
            "import json,sys; print(json.load(sys.stdin)[0]['Layers'][-1])",
        ]),
        Some(&manifest.stdout),
    );
    assert!(py.ok(), "manifest.json: {}", py.stderr);
    let layer_name = py.stdout_text().trim().to_string();
    let layer = Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg(&layer_name)
        .output()
        .expect("tar");
    assert!(layer.status.success(), "cannot extract {layer_name}");
    let podman_entries =
        tarball::read_tar(&layer.stdout).unwrap_or_else(|e| panic!("podman's layer: {e}"));
    let blob = pm.scratch.join("ours.tar");
    let lowers: Vec<PathBuf> = lowerdir.split(':').map(PathBuf::from).collect();
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
    export_to(&upper, &lower_refs, &blob, &[]);
    let ours_entries = read_layer(&blob);
    // One difference of form: a directory removed and made again is opaque in ours (one
    // `.wh..wh..opq`), while podman, which computes a commit by comparing two mounted trees
    // (containers-storage's naive diff when a mount_program is set), writes a `.wh.NAME` for
    // each name the directory had below. Both hide the same names; the mounts below check that.
    let mut ours_names = normalized_names(&ours_entries);
    let opaque_dirs: Vec<String> = ours_names
        .iter()
        .filter_map(|n| n.strip_suffix("/.wh..wh..opq").map(str::to_string))
        .collect();
    ours_names.retain(|n| !n.ends_with("/.wh..wh..opq"));
    let mut podman_names = normalized_names(&podman_entries);
    podman_names.retain(|n| {
        let (parent, name) = n.rsplit_once('/').unwrap_or(("", n));
        !(name.starts_with(".wh.") && opaque_dirs.iter().any(|d| d == parent))
    });
    set_diff(
        "layer entries (opaque directories aside)",
        "rsfs-overlay export",
        &ours_names,
        "podman commit",
        &podman_names,
    );
    assert!(
        opaque_dirs.iter().any(|d| d == "data/again"),
        "the re-made /data/again is not opaque in our export: {opaque_dirs:?}"
    );

    // Each layer, applied over the image's layers, gives the same tree under the kernel.
    let podman_blob = pm.scratch.file("podman-layer.tar", &layer.stdout);
    let mut views = Vec::new();
    for (label, blob) in [("ours", &blob), ("podman's", &podman_blob)] {
        let n = pm.scratch.dir(&format!("applied-{label}"));
        apply(blob, &n, "kernel");
        let mut stack: Vec<&Path> = vec![&n];
        stack.extend(lower_refs.iter().copied());
        views.push(mount_kernel(&stack, None, &[]));
    }
    let diffs = compare_views(
        "kernel over our export",
        views[0].path(),
        "kernel over podman's layer",
        views[1].path(),
    );
    assert_no_diffs("our export vs podman commit's layer, each applied", &diffs);
    // Hard links are links in both.
    let link_pairs = |entries: &[TarEntry]| -> BTreeSet<(String, String)> {
        entries
            .iter()
            .filter(|e| e.typeflag == tarball::HARDLINK)
            .map(|e| {
                let mut v = [
                    e.name.trim_start_matches("./").to_string(),
                    e.linkname.trim_start_matches("./").to_string(),
                ];
                v.sort();
                (v[0].clone(), v[1].clone())
            })
            .collect()
    };
    assert_eq!(
        link_pairs(&ours_entries),
        link_pairs(&podman_entries),
        "hard-link entries (ours, podman's)"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. apply refuses hostile archives

/// One hostile case: where it is unpacked, what must stay untouched.
struct HostileCase {
    label: &'static str,
    tar: Vec<u8>,
    /// The error line must contain one of these (the offending entry's name, or the path at
    /// fault).
    names: Vec<String>,
    /// Paths that must not exist afterwards.
    must_not_exist: Vec<PathBuf>,
}

/// `apply LAYER DIR` must fail with one line `rsfs-overlay: ...` naming the entry.
fn expect_refusal(run: &Run, label: &str, names: &[&str]) {
    assert!(
        run.status.is_some_and(|s| !s.success()),
        "{label}: apply succeeded: {}",
        run.describe()
    );
    let err = run.stderr.trim_end();
    assert!(
        !err.contains('\n'),
        "{label}: the error is not one line: {err:?}"
    );
    assert!(
        err.starts_with("rsfs-overlay: "),
        "{label}: the error does not start with `rsfs-overlay: `: {err:?}"
    );
    assert!(
        names.iter().any(|n| err.contains(n)),
        "{label}: the error names none of {names:?}: {err:?}"
    );
}

#[test]
fn apply_refuses_entries_escaping_the_directory() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let mut cases = Vec::new();
    // Each case unpacks into <case>/p/q/dir, so `..` lands inside the case's directory.
    let case_dir = |i: usize| s.dir(&format!("c{i}/p/q/dir"));
    {
        let base = s.join("c0");
        cases.push(HostileCase {
            label: "../escape",
            tar: tarball::TarBuilder::new()
                .file("../escape", b"pwned")
                .finish(),
            names: vec!["../escape".into()],
            must_not_exist: vec![base.join("p/q/escape")],
        });
    }
    {
        let target = s.join("c1/abs-target");
        let name = target.to_str().unwrap().to_string();
        cases.push(HostileCase {
            label: "absolute path",
            tar: tarball::TarBuilder::new().file(&name, b"pwned").finish(),
            names: vec![name],
            must_not_exist: vec![target],
        });
    }
    {
        cases.push(HostileCase {
            label: "a/../../x",
            tar: tarball::TarBuilder::new()
                .dir("a/")
                .file("a/../../x", b"pwned")
                .finish(),
            names: vec!["a/../../x".into()],
            must_not_exist: vec![s.join("c2/p/q/x")],
        });
    }
    {
        let outside = s.dir("c3/outside-dir");
        cases.push(HostileCase {
            label: "write through an absolute symlink",
            tar: tarball::TarBuilder::new()
                .symlink("s", outside.to_str().unwrap())
                .file("s/file", b"pwned")
                .finish(),
            names: vec!["s/file".into()],
            must_not_exist: vec![outside.join("file")],
        });
    }
    {
        let outside = s.dir("c4/p/outside-dir");
        cases.push(HostileCase {
            label: "write through a relative symlink",
            tar: tarball::TarBuilder::new()
                .symlink("s", "../../outside-dir")
                .dir("s/sub/")
                .file("s/sub/file", b"pwned")
                .finish(),
            names: vec!["s/sub".into()],
            must_not_exist: vec![outside.join("sub")],
        });
    }
    for (i, c) in cases.iter().enumerate() {
        let dir = case_dir(i);
        let layer = s.file(&format!("c{i}/layer.tar"), &c.tar);
        let run = rsfs(&args(&[OsString::from("apply"), layer.into(), dir.into()]));
        let names: Vec<&str> = c.names.iter().map(String::as_str).collect();
        expect_refusal(&run, c.label, &names);
        for p in &c.must_not_exist {
            assert!(
                std::fs::symlink_metadata(p).is_err(),
                "{}: apply wrote {} outside its directory",
                c.label,
                p.display()
            );
        }
    }
    let entries_in = |p: &Path| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        entries_in(&s.join("c3/outside-dir")),
        0,
        "c3/outside-dir was written to"
    );

    // A hard link to a file outside, then a regular entry of the same name (writing through the
    // link if it had been made): the outside file keeps its one name and its content.
    let dir = case_dir(9);
    let sentinel = s.file("c9/p/etc/passwd", b"sentinel\n");
    let layer = s.file(
        "c9/layer.tar",
        &tarball::TarBuilder::new()
            .hardlink("h", "../../etc/passwd")
            .file("h", b"pwned\n")
            .finish(),
    );
    let run = rsfs(&args(&[
        OsString::from("apply"),
        layer.into(),
        dir.clone().into(),
    ]));
    expect_refusal(
        &run,
        "hard link to ../../etc/passwd",
        &["'h'", "\"h\"", "../../etc/passwd"],
    );
    let md = std::fs::metadata(&sentinel).unwrap();
    assert_eq!(
        md.nlink(),
        1,
        "apply made a hard link to a file outside its directory"
    );
    assert_eq!(
        std::fs::read(&sentinel).unwrap(),
        b"sentinel\n",
        "apply wrote through a hard link to a file outside its directory"
    );

    // What is allowed: absolute and relative symlinks that are never written through, hard links
    // to earlier entries, and (as root) device nodes.
    let dir = s.dir("ok/dir");
    let layer = s.file(
        "ok/layer.tar",
        &tarball::TarBuilder::new()
            .dir("d/")
            .file("d/f", b"ok\n")
            .symlink("abs", s.join("c3/outside-dir").to_str().unwrap())
            .symlink("rel", "../../escape")
            .hardlink("h", "d/f")
            .chardev("null", 1, 3)
            .finish(),
    );
    rsfs_ok(&args(&[
        OsString::from("apply"),
        layer.into(),
        dir.clone().into(),
    ]));
    assert_eq!(
        std::fs::read_link(dir.join("abs")).ok(),
        Some(s.join("c3/outside-dir")),
        "the absolute symlink was not kept as it is"
    );
    assert_eq!(
        std::fs::read_link(dir.join("rel")).ok(),
        Some(PathBuf::from("../../escape"))
    );
    assert_eq!(
        std::fs::metadata(dir.join("h")).unwrap().ino(),
        std::fs::metadata(dir.join("d/f")).unwrap().ino(),
        "h is not a hard link of d/f"
    );
    let null = std::fs::symlink_metadata(dir.join("null")).unwrap();
    assert!(
        null.file_type().is_char_device() && null.rdev() == makedev(1, 3),
        "as root, the char device 1:3 was not made"
    );
}

#[test]
fn apply_refuses_device_nodes_when_not_root() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    // 65534 must reach the directory and the binary.
    std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = s.dir("dir");
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let tar = tarball::TarBuilder::new()
        .file("f", b"fine\n")
        .chardev("dev/null2", 1, 3)
        .finish();
    let run = run_program(
        &our_bin(),
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ],
        &args(&[OsString::from("apply"), "-".into(), dir.clone().into()]),
        Some(&tar),
    );
    assert!(
        !run.stderr.contains("Permission denied") || run.stderr.starts_with("rsfs-overlay: "),
        "could not run the binary as 65534: {}",
        run.describe()
    );
    expect_refusal(&run, "char device as non-root", &["dev/null2"]);
    let devices: Vec<String> = walk(&dir)
        .into_iter()
        .filter(|(_, md)| md.file_type().is_char_device() || md.file_type().is_block_device())
        .map(|(p, _)| p)
        .collect();
    assert!(devices.is_empty(), "device nodes were made: {devices:?}");

    // Without the device, the archive applies as 65534 in the default (kernel) format: the
    // whiteout is a 0/0 device (which needs no privilege), the opaque marker user.overlay.opaque
    // (trusted.* is out of reach).
    let dir2 = s.dir("dir2");
    std::os::unix::fs::chown(&dir2, Some(65534), Some(65534)).unwrap();
    let ok = run_program(
        &our_bin(),
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ],
        &args(&[OsString::from("apply"), "-".into(), dir2.clone().into()]),
        Some(
            &tarball::TarBuilder::new()
                .file("f", b"fine\n")
                .dir("d/")
                .file("d/.wh..wh..opq", b"")
                .file("d/kept", b"kept\n")
                .file(".wh.gone", b"")
                .finish(),
        ),
    );
    assert!(ok.ok(), "apply as 65534: {}", ok.describe());
    assert_eq!(std::fs::read(dir2.join("f")).unwrap(), b"fine\n");
    let wh = std::fs::symlink_metadata(dir2.join("gone"));
    assert!(
        wh.as_ref()
            .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0),
        "apply as 65534: .wh.gone did not become a 0/0 whiteout device: {wh:?}"
    );
    let opaque = xattr::get(&dir2.join("d"), "user.overlay.opaque");
    assert_eq!(
        opaque.as_deref().ok(),
        Some(&b"y"[..]),
        "apply as 65534: d/ is not marked user.overlay.opaque=y ({opaque:?})"
    );
    let left: Vec<String> = walk(&dir2)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.contains(".wh."))
        .collect();
    assert!(left.is_empty(), "apply as 65534 left OCI markers: {left:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. usage

#[test]
fn usage_equals_du_live_and_offline() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let l = Layer::new(s.join("l"));
    l.file("a", Rng::new(7).bytes(100 * 1024))
        .file("dir/b", "b\n")
        .file("dir/c", "c\n");
    let (u, w) = (s.dir("u"), s.dir("w"));
    let m = mount_ours(&[l.root()], Some((&u, &w)), &[]);
    let mp = m.path().to_path_buf();
    std::fs::write(mp.join("new1"), Rng::new(8).bytes(1 << 20)).unwrap();
    std::fs::write(mp.join("new0"), "").unwrap();
    std::fs::create_dir(mp.join("d")).unwrap();
    std::fs::write(mp.join("d/x"), vec![b'x'; 5000]).unwrap();
    std::fs::hard_link(mp.join("new1"), mp.join("new1.link")).unwrap();
    std::fs::hard_link(mp.join("d/x"), mp.join("x.link")).unwrap();
    append(&mp.join("a"), b"copied up\n");
    std::fs::remove_file(mp.join("dir/b")).unwrap();
    std::os::unix::fs::symlink("new1", mp.join("sym")).unwrap();
    nix::unistd::sync();

    let live = [mp.as_os_str().to_os_string()];
    let want = du_upper(&u);
    assert_eq!(
        usage(&live),
        want,
        "usage {} (bytes, inodes) vs du -s -B1 / --inodes of the upper",
        mp.display()
    );
    assert_eq!(usage_json(&live), want, "usage --json vs du");

    // A file unlinked while open: du cannot see it, yet it takes space on the upper's
    // filesystem until closed. What usage says meanwhile: the upper as du sees it, or that plus
    // the held file (the daemon counting it until close, which `usage_counts_*` asserts). After
    // the close: du again.
    let held_path = mp.join("held");
    let mut held = std::fs::File::create(&held_path).unwrap();
    held.write_all(&Rng::new(9).bytes(256 * 1024)).unwrap();
    held.sync_all().unwrap();
    std::fs::remove_file(&held_path).unwrap();
    nix::unistd::sync();
    let held_blocks = held.metadata().unwrap().blocks() * 512;
    assert!(
        held_blocks >= 256 * 1024,
        "the held file has {held_blocks} bytes of blocks"
    );
    let du_now = du_upper(&u);
    let with_held = (du_now.0 + held_blocks, du_now.1 + 1);
    let while_open = usage(&live);
    assert!(
        while_open == du_now || while_open == with_held,
        "usage while an unlinked file is held open: {while_open:?}; du of the upper {du_now:?}, \
         with the held file {with_held:?}"
    );
    drop(held);
    // The kernel sends release and forget for the closed file asynchronously: wait for the
    // count to drop, with a deadline.
    let mut last = (0, 0);
    let dropped = poll_until(Duration::from_secs(10), || {
        last = usage(&live);
        last == du_upper(&u)
    });
    assert!(
        dropped,
        "usage after the held file was closed: {last:?}, du of the upper: {:?}",
        du_upper(&u)
    );
    let ended = m.unmount();
    assert_eq!(
        ended.daemon,
        common::DaemonExit::Exited(0),
        "{}",
        ended.stderr
    );

    let offline = args(&[OsString::from("--upper"), u.clone().into()]);
    assert_eq!(usage(&offline), du_upper(&u), "usage --upper vs du");
    assert_eq!(
        usage_json(&offline),
        du_upper(&u),
        "usage --json --upper vs du"
    );
}

/// On a capped mount (the daemon keeps counters), space held by a file unlinked while open
/// counts until the file is closed: it is used on the upper's filesystem, and writing to
/// unlinked files must not pass the cap.
#[test]
fn usage_counts_an_unlinked_open_file_until_close() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let l = Layer::new(s.join("l"));
    l.file("a", "a\n");
    let (u, w) = (s.dir("u"), s.dir("w"));
    let m = mount_ours(&[l.root()], Some((&u, &w)), &["upper_limit=1G"]);
    let live = [m.path().as_os_str().to_os_string()];
    let mut held = std::fs::File::create(m.path().join("held")).unwrap();
    held.write_all(&Rng::new(9).bytes(256 * 1024)).unwrap();
    held.sync_all().unwrap();
    std::fs::remove_file(m.path().join("held")).unwrap();
    nix::unistd::sync();
    let held_blocks = held.metadata().unwrap().blocks() * 512;
    let du_now = du_upper(&u);
    assert_eq!(
        usage(&live),
        (du_now.0 + held_blocks, du_now.1 + 1),
        "usage while an unlinked file is held open: du of the upper {du_now:?} plus the held \
         file ({held_blocks} bytes, one inode)"
    );
    drop(held);
    let mut last = (0, 0);
    let dropped = poll_until(Duration::from_secs(10), || {
        last = usage(&live);
        last == du_upper(&u)
    });
    assert!(
        dropped,
        "usage after the held file was closed: {last:?}, du of the upper: {:?}",
        du_upper(&u)
    );
}

// ---------------------------------------------------------------------------------------------
// 8. caps

const MIB: u64 = 1 << 20;

fn io_errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// Write `total` bytes to `path` in `chunk`-sized writes, each synced; stops at the first error.
fn write_synced(path: &Path, total: u64, chunk: usize) -> (u64, Option<std::io::Error>) {
    let mut f = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return (0, Some(e)),
    };
    let buf = vec![0x5a; chunk];
    let mut done = 0;
    while done < total {
        let n = chunk.min((total - done) as usize);
        if let Err(e) = f.write_all(&buf[..n]).and_then(|_| f.sync_data()) {
            return (done, Some(e));
        }
        done += n as u64;
    }
    (done, None)
}

#[test]
fn caps_fail_with_enospc_and_recover() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let l = Layer::new(s.join("l"));
    let big = Rng::new(0x6d1b).bytes(6 * MIB as usize);
    l.file("big6", &big).file("small", "small\n");
    let tmpfs = TmpfsMount::new(&s.join("t"));
    let (u, w) = (tmpfs.path().join("u"), tmpfs.path().join("w"));
    std::fs::create_dir(&u).unwrap();
    std::fs::create_dir(&w).unwrap();
    let opts = ["upper_limit=8M", "upper_inodes=200"];
    let m = mount_ours(&[l.root()], Some((&u, &w)), &opts);
    let mp = m.path().to_path_buf();

    // df shows the cap as the size.
    let vfs = nix::sys::statvfs::statvfs(&mp).expect("statvfs on the mount");
    let total = vfs.blocks() as u64 * vfs.fragment_size() as u64;
    assert!(
        total.abs_diff(8 * MIB) <= vfs.fragment_size() as u64,
        "statvfs total {total} bytes with upper_limit=8M (f_blocks {} x f_frsize {})",
        vfs.blocks(),
        vfs.fragment_size()
    );
    assert!(
        vfs.blocks_available() <= vfs.blocks() && vfs.blocks_free() <= vfs.blocks(),
        "statvfs free {} / available {} exceed the total {}",
        vfs.blocks_free(),
        vfs.blocks_available(),
        vfs.blocks()
    );

    // 4 MiB in: 4 MiB remain, a 6 MiB copy-up cannot fit.
    let (n, e) = write_synced(&mp.join("fill1"), 4 * MIB, MIB as usize);
    assert!(
        e.is_none(),
        "writing 4 MiB under an 8 MiB cap failed after {n}: {e:?}"
    );
    let before = du_upper(&u);
    let r = std::fs::OpenOptions::new()
        .append(true)
        .open(mp.join("big6"))
        .and_then(|mut f| f.write_all(b"more").and_then(|_| f.sync_data()));
    let err = r.expect_err("appending to the 6 MiB lower file (copy-up) succeeded past the cap");
    assert_eq!(
        io_errno(&err),
        Some(libc::ENOSPC),
        "a copy-up that does not fit: {}",
        errno_of(&err)
    );
    let seen = std::fs::read(mp.join("big6")).expect("read big6 after the failed copy-up");
    assert!(
        seen == big,
        "after the failed copy-up big6 reads {} bytes, not the lower's content",
        seen.len()
    );
    assert!(
        std::fs::symlink_metadata(u.join("big6")).is_err(),
        "a failed copy-up left big6 in the upper"
    );
    let work_left: Vec<_> = std::fs::read_dir(w.join("work"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        work_left.is_empty(),
        "workdir/work keeps {work_left:?} after the failed copy-up"
    );
    assert_eq!(
        du_upper(&u),
        before,
        "the failed copy-up changed the upper's usage"
    );

    // Fill up: the write past the cap fails ENOSPC and the upper stays within it.
    let (n, e) = write_synced(&mp.join("fill2"), 16 * MIB, 256 * 1024);
    let e = e.unwrap_or_else(|| panic!("wrote {n} bytes past an 8 MiB cap"));
    assert_eq!(
        io_errno(&e),
        Some(libc::ENOSPC),
        "filling up: {}",
        errno_of(&e)
    );
    let (bytes, _) = du_upper(&u);
    assert!(
        bytes <= 8 * MIB,
        "the upper holds {bytes} bytes under an 8 MiB cap"
    );
    assert!(
        bytes + MIB >= 8 * MIB,
        "ENOSPC came early: the upper holds only {bytes} bytes of 8 MiB"
    );
    assert_eq!(
        usage(&[mp.clone().into()]).0,
        bytes,
        "usage at the cap vs du"
    );

    // Freed space is usable again.
    std::fs::remove_file(mp.join("fill2")).unwrap();
    let (n, e) = write_synced(&mp.join("fill3"), 2 * MIB, MIB as usize);
    assert!(
        e.is_none(),
        "writing after deleting a file failed after {n} bytes: {e:?}"
    );

    // Inodes: creates past 200 fail ENOSPC; the count stops at the cap.
    std::fs::create_dir(mp.join("i")).unwrap();
    let mut made = 0;
    let mut first_err = None;
    for k in 0..400 {
        match std::fs::File::create(mp.join(format!("i/{k}"))) {
            Ok(_) => made += 1,
            Err(e) => {
                first_err = Some(e);
                break;
            }
        }
    }
    let e = first_err.unwrap_or_else(|| panic!("created {made} files under upper_inodes=200"));
    assert_eq!(
        io_errno(&e),
        Some(libc::ENOSPC),
        "creating past the inode cap: {}",
        errno_of(&e)
    );
    let (_, inodes) = du_upper(&u);
    assert_eq!(
        inodes, 200,
        "the upper holds {inodes} inodes when creates start failing under upper_inodes=200 \
         ({made} files made)"
    );
    // mkdir, symlink and mknod count too.
    for (what, r) in [
        ("mkdir", std::fs::create_dir(mp.join("i/dir"))),
        ("symlink", std::os::unix::fs::symlink("x", mp.join("i/sym"))),
    ] {
        let e = r.expect_err(&format!("{what} past the inode cap succeeded"));
        assert_eq!(
            io_errno(&e),
            Some(libc::ENOSPC),
            "{what} past the inode cap"
        );
    }
    std::fs::remove_file(mp.join("i/0")).unwrap();
    std::fs::File::create(mp.join("i/again")).expect("create after freeing an inode");

    // After a remount, usage is a walk of the upper.
    let ended = m.unmount();
    assert_eq!(
        ended.daemon,
        common::DaemonExit::Exited(0),
        "{}",
        ended.stderr
    );
    let m = mount_ours(&[l.root()], Some((&u, &w)), &opts);
    assert_eq!(
        usage(&[m.path().into()]),
        du_upper(&u),
        "usage after remount vs du of the upper"
    );
    drop(m);
    assert_eq!(
        usage(&[OsString::from("--upper"), u.clone().into()]),
        du_upper(&u)
    );
}

/// On a capped mount the daemon's counters follow every kind of change exactly: after each
/// step of a mixed workload (copy-ups of data and metadata, hard links, renames over files and
/// directories, truncates, xattrs, whiteouts, removal of a merged directory holding whiteouts,
/// a file unlinked and then closed) `usage` equals `du` of the upper.
#[test]
fn capped_counters_follow_every_change() {
    counters_follow_every_change(&["upper_limit=1G"]);
}

/// The same on a mount without a cap, whose counters start at its first `usage` query.
#[test]
fn counters_started_by_a_query_follow_every_change() {
    counters_follow_every_change(&[]);
}

fn counters_follow_every_change(opts: &[&str]) {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let l = Layer::new(s.join("l"));
    l.file("big", Rng::new(3).bytes(3 * MIB as usize));
    l.file("d/a", "a\n")
        .file("d/b", "b\n")
        .file("d/sub/c", "c\n");
    l.file("linked", "one inode, two names\n")
        .hardlink("linked", "linked2");
    l.dir("gone/deep").file("gone/deep/x", "x\n");
    let (u, w) = (s.dir("u"), s.dir("w"));
    let m = mount_ours(&[l.root()], Some((&u, &w)), opts);
    let mp = m.path().to_path_buf();
    let live = [mp.as_os_str().to_os_string()];
    let check = |step: &str| {
        nix::unistd::sync();
        assert_eq!(
            usage(&live),
            du_upper(&u),
            "usage vs du of the upper after: {step}"
        );
    };
    check("mount");
    let append = |p: &str, data: &[u8]| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(mp.join(p))
            .unwrap_or_else(|e| panic!("open {p}: {e}"));
        f.write_all(data)
            .unwrap_or_else(|e| panic!("append {p}: {e}"));
    };
    append("big", b"tail");
    check("copy-up of a 3 MiB file by an append");
    std::fs::set_permissions(mp.join("d/a"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod d/a");
    check("metadata copy-up (chmod)");
    std::fs::write(mp.join("d/new"), Rng::new(4).bytes(100_000)).expect("write d/new");
    check("a new 100 kB file");
    std::fs::hard_link(mp.join("d/new"), mp.join("d/new2")).expect("link d/new");
    check("a hard link");
    append("linked", b"more\n");
    check("copy-up of a hard-linked lower file");
    std::fs::rename(mp.join("d/new"), mp.join("d/b")).expect("rename over d/b");
    check("rename over a lower file");
    std::fs::remove_file(mp.join("d/new2")).expect("unlink d/new2");
    check("unlink of the last upper name");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mp.join("big"))
        .expect("open big");
    f.set_len(1000).expect("truncate big");
    check("truncate through an open file");
    drop(f);
    std::fs::File::create(mp.join("d/empty")).expect("create");
    nix::unistd::truncate(&mp.join("d/empty"), 5 * MIB as i64).expect("truncate up (sparse)");
    check("a sparse truncate up by path");
    xattr_set(&mp.join("d/a"), "user.big", &vec![b'v'; 3000]);
    check("a 3000-byte xattr");
    std::fs::remove_dir_all(mp.join("gone")).expect("rm -rf gone");
    check("rm -rf of a lower tree (whiteouts)");
    std::fs::create_dir(mp.join("gone")).expect("mkdir gone again");
    std::fs::write(mp.join("gone/y"), "y\n").expect("write gone/y");
    check("a directory made over a whiteout");
    std::fs::create_dir(mp.join("d/sub2")).expect("mkdir d/sub2");
    std::fs::rename(mp.join("d/sub2"), mp.join("gone/sub2")).expect("rename a directory");
    check("a directory renamed across parents");
    std::fs::remove_file(mp.join("d/sub/c")).expect("unlink d/sub/c");
    std::fs::remove_dir(mp.join("d/sub")).expect("rmdir d/sub (holds a whiteout)");
    check("rmdir of a merged directory holding a whiteout");
    let mut held = std::fs::File::create(mp.join("held")).expect("create held");
    held.write_all(&Rng::new(5).bytes(200_000))
        .expect("write held");
    std::fs::remove_file(mp.join("held")).expect("unlink held");
    held.write_all(b"still writing")
        .expect("write to the unlinked file");
    drop(held);
    let mut last = (0, 0);
    let settled = poll_until(Duration::from_secs(10), || {
        nix::unistd::sync();
        last = usage(&live);
        last == du_upper(&u)
    });
    assert!(
        settled,
        "usage after an unlinked file was closed: {last:?}, du: {:?}",
        du_upper(&u)
    );
    let ended = m.unmount();
    assert!(!ended.left_mounted, "{}", ended.stderr);
    assert_eq!(
        usage(&[OsString::from("--upper"), u.clone().into()]),
        du_upper(&u),
        "usage --upper after unmount"
    );
}

fn xattr_set(p: &Path, name: &str, value: &[u8]) {
    let out = Command::new("setfattr")
        .arg("-n")
        .arg(name)
        .arg("-v")
        .arg(format!(
            "0x{}",
            value.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ))
        .arg(p)
        .output()
        .expect("run setfattr");
    assert!(
        out.status.success(),
        "setfattr {name} on {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An upper written by kernel overlayfs with `metacopy=on` holds a chmod'ed lower file as
/// metadata only (`trusted.overlay.metacopy`): export writes it with its data from the lower
/// (and its new mode), and says it needs `--lowerdir` when not given one.
#[test]
fn metacopy_files_are_exported_with_their_data() {
    if !common::require_root_and_fuse() {
        return;
    }
    let s = Scratch::new();
    let l = Layer::new(s.join("l"));
    let data = Rng::new(11).bytes(300_000);
    l.file("dir/blob", &data).mode("dir/blob", 0o644);
    let (u, w) = (s.dir("u"), s.dir("w"));
    let k = mount_kernel(
        &[l.root()],
        Some((&u, &w)),
        &["redirect_dir=on", "index=on", "metacopy=on"],
    );
    std::fs::set_permissions(
        k.path().join("dir/blob"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod through the kernel's overlay");
    assert!(k.unmount(), "unmounting the kernel's overlay");
    let copy = u.join("dir/blob");
    assert!(
        xattr::get(&copy, "trusted.overlay.metacopy").is_ok(),
        "the kernel did not write a metacopy file at {} (the test needs metacopy=on)",
        copy.display()
    );
    let out = s.join("layer.tar");
    export_to(&u, &[l.root()], &out, &[]);
    let entries = read_layer(&out);
    let blob = entries
        .iter()
        .find(|e| e.name == "dir/blob")
        .unwrap_or_else(|| panic!("no dir/blob in {:?}", normalized_names(&entries)));
    assert_eq!(blob.typeflag, b'0', "dir/blob is a regular file entry");
    assert_eq!(blob.mode & 0o7777, 0o600, "the metacopy's own (new) mode");
    assert_eq!(blob.data, data, "the data comes from the lower");
    let mut a = args(&["export", "--upper"]);
    a.push(u.clone().into());
    a.push("-o".into());
    a.push(s.join("no-lowers.tar").into());
    let r = rsfs(&a);
    assert!(
        !r.ok() && r.stderr.contains("--lowerdir"),
        "export of a metacopy upper without --lowerdir: {}",
        r.describe()
    );
}
