//! Stress: eight threads run seeded random operations on one shared pool of paths through our
//! mount (a two-lower stack holding files, directories, hard links and symlinks) for a bounded
//! time, `RSFS_STRESS_SECS` (default 20), with `RSFS_STRESS_SEED` to choose the seed (printed).
//!
//! - No deadlock: a watchdog fails the test, dumping what every thread was doing, when no
//!   operation completes for 30 s (it SIGKILLs the daemon so that blocked callers return).
//! - No unexpected error: each operation may fail only with the errnos that concurrent changes
//!   explain (ENOENT, EEXIST, ENOTEMPTY, ENOTDIR, EISDIR, ELOOP, EBUSY; EXDEV and EINVAL for
//!   renames; EPERM for a link whose source is a directory). EIO, ESTALE, ENOTCONN... fail.
//! - Afterwards the merged tree is walked and every file read, the daemon unmounts and exits 0,
//!   and the upper is checked: nothing left in `<workdir>/work`, no `#` temporaries, every
//!   whiteout shadows an entry of some lower at its path, opaque marks only on directories,
//!   every upper entry is what the merged view showed, and every upper regular file that no
//!   operation wrote (tracked by path and by inode) equals its lower original: no partial copy.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};

use common::mounts::DaemonExit;
use common::prng::{Rng, fnv1a};
use common::{Layer, Scratch, mount_ours, poll_until, require_root_and_fuse, xattr};

const THREADS: usize = 8;
const STALL: Duration = Duration::from_secs(30);
const DIRS: [&str; 6] = ["d0", "d1", "d2", "d0/s", "d1/s", "d2/s"];
const NAMES: [&str; 7] = ["x0", "x1", "x2", "x3", "x4", "x5", "x6"];
const OPAQUE: &str = "trusted.overlay.opaque";
/// Lower files that are never written, removed, renamed or linked: only read, stat'ed,
/// chmod'ed and given xattrs, so their copy-ups (concurrent with everything else)
/// must leave exactly the lower content. `d0/r0` is large, so copy-ups take a while.
const RO_FILES: [&str; 5] = ["d0/r0", "d0/r1", "d1/r2", "d1/s/r3", "d2/r4"];

fn ename(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(c) => format!("{:?}", Errno::from_raw(c)),
        None => format!("{e}"),
    }
}

/// setxattr(2), following symlinks as a caller's `setfattr` does (the shared helper uses the
/// `l*` calls, which refuse `user.*` on symlinks).
#[allow(unsafe_code)]
fn setxattr_follow(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("no NUL in paths");
    let n = CString::new(name).expect("no NUL in names");
    // SAFETY: both strings are NUL-terminated and value is valid for value.len() bytes.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The lower stack.

fn build_lowers(scratch: &Scratch, rng: &mut Rng) -> (Layer, Layer) {
    let l0 = Layer::new(scratch.dir("l0"));
    let l1 = Layer::new(scratch.dir("l1"));
    let mut data = |tag: &str, n: usize| {
        let mut v = rng.bytes(n);
        v[..tag.len().min(n)].copy_from_slice(&tag.as_bytes()[..tag.len().min(n)]);
        v
    };
    // Bottom layer.
    l1.file("d0/x0", data("l1:d0/x0", 3000))
        .hardlink("d0/x0", "d1/x0")
        .file("d0/x1", data("l1:d0/x1", 256 * 1024))
        .xattr("d0/x1", "user.k", b"v")
        .file("d0/x2/a", data("l1:d0/x2/a", 100))
        .file("d0/x2/b", data("l1:d0/x2/b", 5000))
        .file("d0/x3", data("l1:d0/x3", 700))
        .file("d0/s/x0", data("l1:d0/s/x0", 1))
        .file("d0/s/x1", data("l1:d0/s/x1", 40_000))
        .dir("d0/s/x5")
        .file("d1/x4", data("l1:d1/x4", 10))
        .file("d1/s/x2", data("l1:d1/s/x2", 9000))
        .file("d1/x2/c", data("l1:d1/x2/c", 33))
        .symlink("d1/x6", "x4")
        .file("d2/x4", data("l1:d2/x4", 2000));
    // Top layer: shadows, merged directories, its own hard links and symlinks.
    l0.file("d0/x3", data("l0:d0/x3", 1234))
        .file("d0/x4", data("l0:d0/x4", 64 * 1024))
        .file("d0/s/x2", data("l0:d0/s/x2", 4096))
        .hardlink("d0/s/x2", "d2/x0")
        .file("d1/x1", data("l0:d1/x1", 77))
        .file("d1/x5", data("l0:d1/x5", 128 * 1024))
        .file("d1/x2/d", data("l0:d1/x2/d", 5))
        .file("d2/x1/f", data("l0:d2/x1/f", 300))
        .file("d2/x3", data("l0:d2/x3", 8000))
        .symlink("d2/x6", "x0")
        .file("d2/x2", b"");
    l1.file("d0/r0", data("l1:d0/r0", 2 * 1024 * 1024))
        .file("d1/r2", data("l1:d1/r2", 20_000))
        .hardlink("d1/r2", "d1/s/r3");
    l0.file("d0/r1", data("l0:d0/r1", 300))
        .file("d2/r4", data("l0:d2/r4", 70_000));
    (l0, l1)
}

// ---------------------------------------------------------------------------------------------
// The workload.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Create,
    Write,
    Append,
    Truncate,
    Read,
    Unlink,
    Mkdir,
    Rmdir,
    Rename,
    Link,
    Symlink,
    Chmod,
    Setxattr,
    Readdir,
    Stat,
}

const WEIGHTS: [(Kind, u64); 15] = [
    (Kind::Create, 8),
    (Kind::Write, 8),
    (Kind::Append, 8),
    (Kind::Truncate, 5),
    (Kind::Read, 12),
    (Kind::Unlink, 8),
    (Kind::Mkdir, 7),
    (Kind::Rmdir, 6),
    (Kind::Rename, 12),
    (Kind::Link, 5),
    (Kind::Symlink, 5),
    (Kind::Chmod, 5),
    (Kind::Setxattr, 5),
    (Kind::Readdir, 8),
    (Kind::Stat, 10),
];

struct Shared {
    root: PathBuf,
    stop: AtomicBool,
    /// Operations completed by all threads.
    progress: AtomicU64,
    /// What each thread is doing now, and since when.
    current: Vec<Mutex<(String, Instant)>>,
    failures: Mutex<Vec<String>>,
    /// Unexpected errors counted by operation and errno.
    unexpected: Mutex<BTreeMap<String, u64>>,
    /// Paths (and, for directories, everything below) whose content an operation replaced.
    tainted: Mutex<HashSet<String>>,
    /// Inode numbers (`st_ino` through the mount) of every file opened for writing.
    written: Mutex<HashSet<u64>>,
    /// Set by the watchdog: the dump of a stall.
    hang: Mutex<Option<String>>,
}

impl Shared {
    fn taint(&self, p: &str) {
        self.tainted.lock().unwrap().insert(p.to_string());
    }
}

fn pick_kind(rng: &mut Rng) -> Kind {
    let total: u64 = WEIGHTS.iter().map(|w| w.1).sum();
    let mut r = rng.below(total);
    for (k, w) in WEIGHTS {
        if r < w {
            return k;
        }
        r -= w;
    }
    unreachable!()
}

/// A pool path (`d1/s/x3`), or now and then one of the directories themselves.
fn pick_path(rng: &mut Rng) -> String {
    if rng.chance(12) {
        rng.pick(&DIRS).to_string()
    } else {
        format!("{}/{}", rng.pick(&DIRS), rng.pick(&NAMES))
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn is_dir_now(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Opens for writing, recording the inode first (the write may go through a symlink) and,
/// for an open that may create, the path.
fn open_w(
    sh: &Shared,
    p: &Path,
    creates: Option<&str>,
    opts: &OpenOptions,
) -> std::io::Result<std::fs::File> {
    let f = opts.open(p)?;
    if let Some(rel) = creates {
        sh.taint(rel);
    }
    let md = f.metadata()?;
    if md.is_file() {
        sh.written.lock().unwrap().insert(md.ino());
    }
    Ok(f)
}

/// Runs one operation; returns its description and result. Taints what it changed.
fn run_op(sh: &Shared, rng: &mut Rng, me: usize, kind: Kind) -> (String, std::io::Result<()>) {
    let copy_up_only = matches!(kind, Kind::Read | Kind::Stat | Kind::Chmod | Kind::Setxattr);
    let rel = if copy_up_only && rng.chance(25) {
        rng.pick(&RO_FILES).to_string()
    } else {
        pick_path(rng)
    };
    let p = sh.root.join(&rel);
    let announce = |d: &str| *sh.current[me].lock().unwrap() = (d.to_string(), Instant::now());
    match kind {
        Kind::Create => {
            let n = rng.range(0, 5000) as usize;
            let data = rng.bytes(n);
            let d = format!("create {rel} ({} bytes)", data.len());
            announce(&d);
            let r = open_w(
                sh,
                &p,
                Some(&rel),
                OpenOptions::new().write(true).create_new(true).mode(0o644),
            )
            .and_then(|mut f| f.write_all(&data));
            (d, r)
        }
        Kind::Write => {
            let n = rng.range(1, 16 * 1024) as usize;
            let data = rng.bytes(n);
            let off = rng.below(300 * 1024);
            let d = format!("write {rel} ({} bytes at {off}, O_CREAT)", data.len());
            announce(&d);
            let r = open_w(
                sh,
                &p,
                Some(&rel),
                OpenOptions::new().write(true).create(true).mode(0o644),
            )
            .and_then(|f| f.write_all_at(&data, off));
            (d, r)
        }
        Kind::Append => {
            let n = rng.range(1, 4096) as usize;
            let data = rng.bytes(n);
            let d = format!("append {rel} ({} bytes)", data.len());
            announce(&d);
            let r = open_w(sh, &p, None, OpenOptions::new().append(true)).and_then(|mut f| {
                if f.metadata()?.len() > 1024 * 1024 {
                    f.set_len(0)?;
                }
                f.write_all(&data)
            });
            (d, r)
        }
        Kind::Truncate => {
            let len = rng.below(300 * 1024);
            let d = format!("truncate {rel} to {len}");
            announce(&d);
            let r =
                open_w(sh, &p, None, OpenOptions::new().write(true)).and_then(|f| f.set_len(len));
            (d, r)
        }
        Kind::Read => {
            let d = format!("read {rel}");
            announce(&d);
            let r = std::fs::File::open(&p).and_then(|mut f| {
                let mut v = Vec::new();
                f.read_to_end(&mut v).map(|_| ())
            });
            (d, r)
        }
        Kind::Unlink => {
            let d = format!("unlink {rel}");
            announce(&d);
            (d, std::fs::remove_file(&p))
        }
        Kind::Mkdir => {
            let rel = if rng.chance(15) {
                "d2/s".to_string()
            } else {
                rel
            };
            let d = format!("mkdir {rel}");
            announce(&d);
            let r = std::fs::create_dir(sh.root.join(&rel));
            if r.is_ok() {
                sh.taint(&rel);
            }
            (d, r)
        }
        Kind::Rmdir => {
            let d = format!("rmdir {rel}");
            announce(&d);
            (d, std::fs::remove_dir(&p))
        }
        Kind::Rename => {
            let to = pick_path(rng);
            let d = format!("rename {rel} -> {to}");
            announce(&d);
            let r = std::fs::rename(&p, sh.root.join(&to));
            // rename(x, x) succeeds and does nothing.
            if r.is_ok() && rel != to {
                sh.taint(&rel);
                sh.taint(&to);
            }
            (d, r)
        }
        Kind::Link => {
            let to = pick_path(rng);
            let d = format!("link {rel} -> {to}");
            announce(&d);
            let was_dir = is_dir_now(&p);
            let r = std::fs::hard_link(&p, sh.root.join(&to));
            if r.is_ok() {
                sh.taint(&to);
            }
            // link(2) of a directory is EPERM: explained if the source was (or became) one.
            let dir_src = matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EPERM))
                && (was_dir || is_dir_now(&p));
            (
                if dir_src {
                    format!("{d} [a directory]")
                } else {
                    d
                },
                r,
            )
        }
        Kind::Symlink => {
            let own = basename(&rel).to_string();
            let target = rng.pick(&["x5", "x6", "s", own.as_str()]).to_string();
            let d = format!("symlink {rel} -> {target}");
            announce(&d);
            let r = std::os::unix::fs::symlink(&target, &p);
            if r.is_ok() {
                sh.taint(&rel);
            }
            (d, r)
        }
        Kind::Chmod => {
            let mode = *rng.pick(&[0o644, 0o600, 0o755, 0o700, 0o640]);
            let d = format!("chmod {rel} {mode:o}");
            announce(&d);
            (
                d,
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)),
            )
        }
        Kind::Setxattr => {
            let n = rng.range(1, 64) as usize;
            let v = rng.bytes(n);
            let name = format!("user.s{}", rng.below(4));
            let d = format!("setxattr {rel} {name} ({} bytes)", v.len());
            announce(&d);
            (d, setxattr_follow(&p, &name, &v))
        }
        Kind::Readdir => {
            let d = format!("readdir {rel}");
            announce(&d);
            let r = std::fs::read_dir(&p).and_then(|rd| {
                for e in rd {
                    let e = e?;
                    let _ = e.file_type()?;
                }
                Ok(())
            });
            (d, r)
        }
        Kind::Stat => {
            let follow = rng.chance(50);
            let d = format!("{} {rel}", if follow { "stat" } else { "lstat" });
            announce(&d);
            let r = if follow {
                std::fs::metadata(&p)
            } else {
                std::fs::symlink_metadata(&p)
            };
            (d, r.map(|_| ()))
        }
    }
}

fn allowed(kind: Kind, desc: &str, e: &std::io::Error) -> bool {
    let Some(c) = e.raw_os_error() else {
        return false;
    };
    let common = [
        libc::ENOENT,
        libc::EEXIST,
        libc::ENOTEMPTY,
        libc::ENOTDIR,
        libc::EISDIR,
        libc::ELOOP,
        libc::EBUSY,
    ];
    common.contains(&c)
        || (kind == Kind::Rename && (c == libc::EXDEV || c == libc::EINVAL))
        || (kind == Kind::Link && c == libc::EPERM && desc.ends_with("[a directory]"))
}

#[derive(Default)]
struct Tally {
    ops: BTreeMap<Kind, (u64, u64)>,
    errnos: BTreeMap<String, u64>,
}

fn worker(sh: Arc<Shared>, me: usize, seed: u64) -> Tally {
    let mut rng = Rng::new(seed).fork(me as u64 + 1);
    let mut tally = Tally::default();
    while !sh.stop.load(Ordering::Relaxed) {
        let kind = pick_kind(&mut rng);
        let (d, r) = run_op(&sh, &mut rng, me, kind);
        let e = tally.ops.entry(kind).or_default();
        match r {
            Ok(()) => e.0 += 1,
            Err(err) => {
                e.1 += 1;
                *tally.errnos.entry(ename(&err)).or_default() += 1;
                if !allowed(kind, &d, &err) {
                    *sh.unexpected
                        .lock()
                        .unwrap()
                        .entry(format!("{kind:?} {}", ename(&err)))
                        .or_default() += 1;
                    let mut f = sh.failures.lock().unwrap();
                    if f.len() < 200 {
                        f.push(format!("thread {me}: {d}: {} ({err})", ename(&err)));
                    }
                }
            }
        }
        *sh.current[me].lock().unwrap() = ("idle".into(), Instant::now());
        sh.progress.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

/// Fails the run when no operation completes for `STALL`: records what every thread was
/// doing and SIGKILLs the daemon so that callers blocked in the mount return.
fn watchdog(sh: Arc<Shared>, daemon: Option<nix::unistd::Pid>, done: mpsc::Receiver<()>) {
    let mut last = sh.progress.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_millis(250)) {
        let now = sh.progress.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
            continue;
        }
        if since.elapsed() < STALL {
            continue;
        }
        let mut dump = format!("no operation completed for {STALL:?} (after {now} ops):\n");
        for (i, c) in sh.current.iter().enumerate() {
            let (what, t) = c.lock().unwrap().clone();
            dump.push_str(&format!("  thread {i}: {what} (for {:?})\n", t.elapsed()));
        }
        if let Some(pid) = daemon {
            dump.push_str(&format!("  daemon {pid}: {}\n", proc_wchan(pid.as_raw())));
            let _ = kill(pid, Signal::SIGKILL);
        }
        eprintln!("watchdog: {dump}");
        *sh.hang.lock().unwrap() = Some(dump);
        sh.stop.store(true, Ordering::Relaxed);
        return;
    }
}

/// Where each thread of a process waits (`/proc/PID/task/*/wchan`), for the stall dump.
fn proc_wchan(pid: i32) -> String {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let w = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let c = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            out.push(format!("{}:{}", c.trim(), w.trim()));
        }
    }
    out.join(" ")
}

// ---------------------------------------------------------------------------------------------
// Checks after the run.

#[derive(Debug)]
struct Seen {
    kind: &'static str,
    ino: u64,
    hash: u64,
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else {
        "other"
    }
}

type Merged = HashMap<String, Seen>;

/// Walks the merged tree without following symlinks, reading every regular file; on errors,
/// what it could see and the errors.
fn walk_merged(root: &Path) -> Result<Merged, (Merged, Vec<String>)> {
    let mut out = HashMap::new();
    let mut errs = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                errs.push(format!("readdir /{rel}: {}", ename(&e)));
                continue;
            }
        };
        for de in rd {
            let de = match de {
                Ok(d) => d,
                Err(e) => {
                    errs.push(format!("readdir /{rel}: {}", ename(&e)));
                    continue;
                }
            };
            let name = de.file_name().to_string_lossy().into_owned();
            let r = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let md = match std::fs::symlink_metadata(de.path()) {
                Ok(m) => m,
                Err(e) => {
                    errs.push(format!("lstat /{r}: {}", ename(&e)));
                    continue;
                }
            };
            let mut hash = 0;
            if md.is_dir() {
                stack.push((de.path(), r.clone()));
            } else if md.is_file() {
                match std::fs::read(de.path()) {
                    Ok(c) if c.len() as u64 == md.len() => hash = fnv1a(&c),
                    Ok(c) => errs.push(format!(
                        "read /{r}: {} bytes, st_size {}",
                        c.len(),
                        md.len()
                    )),
                    Err(e) => errs.push(format!("read /{r}: {}", ename(&e))),
                }
            }
            out.insert(
                r,
                Seen {
                    kind: kind_of(md.file_type()),
                    ino: md.ino(),
                    hash,
                },
            );
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err((out, errs))
    }
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// The topmost lower object at `rel` (a whiteout or a non-directory parent ends the search).
fn lower_object(lowers: &[&Path], rel: &str) -> Option<PathBuf> {
    for l in lowers {
        let p = l.join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(md) if is_whiteout(&md) => return None,
            Ok(_) => return Some(p),
            Err(_) => continue,
        }
    }
    None
}

fn is_tainted(tainted: &HashSet<String>, rel: &str) -> bool {
    let mut p = rel;
    loop {
        if tainted.contains(p) {
            return true;
        }
        match p.rfind('/') {
            Some(i) => p = &p[..i],
            None => return false,
        }
    }
}

struct UpperCheck<'a> {
    lowers: &'a [&'a Path],
    merged: &'a HashMap<String, Seen>,
    tainted: &'a HashSet<String>,
    written: &'a HashSet<u64>,
    problems: Vec<String>,
    counts: BTreeMap<&'static str, usize>,
}

impl UpperCheck<'_> {
    fn walk(&mut self, upper: &Path) {
        let mut stack = vec![(upper.to_path_buf(), String::new())];
        while let Some((dir, rel)) = stack.pop() {
            let rd = match std::fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) => {
                    self.problems.push(format!("upper /{rel}: readdir {e}"));
                    continue;
                }
            };
            for de in rd.flatten() {
                let name = de.file_name().to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                let Ok(md) = std::fs::symlink_metadata(de.path()) else {
                    self.problems.push(format!("upper /{r}: lstat failed"));
                    continue;
                };
                if name.starts_with('#') {
                    self.problems.push(format!("upper /{r}: stray temporary"));
                }
                if !md.is_dir() && xattr::get(&de.path(), OPAQUE).is_ok() {
                    self.problems
                        .push(format!("upper /{r}: {OPAQUE} on a non-directory"));
                }
                if is_whiteout(&md) {
                    *self.counts.entry("whiteouts").or_default() += 1;
                    if lower_object(self.lowers, &r).is_none() {
                        self.problems
                            .push(format!("upper /{r}: whiteout of a name no lower holds"));
                    }
                    if self.merged.contains_key(&r) {
                        self.problems.push(format!(
                            "upper /{r}: whiteout, yet the merged view shows it"
                        ));
                    }
                    continue;
                }
                let kind = kind_of(md.file_type());
                let Some(seen) = self.merged.get(&r) else {
                    self.problems
                        .push(format!("upper /{r}: {kind} not in the merged view"));
                    continue;
                };
                if seen.kind != kind {
                    self.problems.push(format!(
                        "upper /{r}: {kind}, the merged view showed a {}",
                        seen.kind
                    ));
                    continue;
                }
                *self.counts.entry(kind).or_default() += 1;
                if md.is_dir() {
                    stack.push((de.path(), r));
                } else if md.is_file() {
                    self.check_file(&de.path(), &r, seen);
                }
            }
        }
    }

    fn check_file(&mut self, path: &Path, r: &str, seen: &Seen) {
        let c = std::fs::read(path).unwrap_or_default();
        if fnv1a(&c) != seen.hash {
            self.problems.push(format!(
                "upper /{r}: content ({} bytes) differs from what the merged view read",
                c.len()
            ));
        }
        if is_tainted(self.tainted, r) || self.written.contains(&seen.ino) {
            return;
        }
        *self.counts.entry("untouched copies").or_default() += 1;
        match lower_object(self.lowers, r) {
            Some(lp) => {
                let lc = std::fs::read(&lp).unwrap_or_default();
                if lc != c {
                    self.problems.push(format!(
                        "upper /{r}: never written through the mount, yet its {} bytes are \
                         not the lower's {} (a partial copy-up?)",
                        c.len(),
                        lc.len()
                    ));
                }
            }
            None => self.problems.push(format!(
                "upper /{r}: regular file no operation made and no lower holds"
            )),
        }
    }
}

// Unexpected EINVALs on writes, appends, reads and stats came from the symlink being followed:
// a readlink racing with a rename of the symlink read its old name, which already held a
// whiteout (see `Overlay::readlink`). The EXDEV on opens came from `openat2(RESOLVE_BENEATH)`
// when a rename moved the file out of its directory while the open ran (see
// `Overlay::open_object`). (Upper entries the final walk did not list came from listings
// snapshotted at opendir rather than at the first read:
// `a_listing_shows_entries_made_after_opendir` below.)
#[test]
fn eight_threads_on_overlapping_paths() {
    if !require_root_and_fuse() {
        return;
    }
    let secs: u64 = std::env::var("RSFS_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("RSFS_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "stress: seed {seed} (RSFS_STRESS_SEED={seed} to replay the choices), {secs} s, \
         {THREADS} threads"
    );
    let scratch = Scratch::new();
    let mut rng = Rng::new(seed);
    let (l0, l1) = build_lowers(&scratch, &mut rng);
    let upper = scratch.dir("u");
    let work = scratch.dir("w");
    let lowers = [l0.root(), l1.root()];
    let m = mount_ours(&lowers, Some((&upper, &work)), &[]);
    let pid = m.daemon_pid();

    let sh = Arc::new(Shared {
        root: m.path().to_path_buf(),
        stop: AtomicBool::new(false),
        progress: AtomicU64::new(0),
        current: (0..THREADS)
            .map(|_| Mutex::new(("starting".into(), Instant::now())))
            .collect(),
        failures: Mutex::new(Vec::new()),
        unexpected: Mutex::new(BTreeMap::new()),
        tainted: Mutex::new(HashSet::new()),
        written: Mutex::new(HashSet::new()),
        hang: Mutex::new(None),
    });
    let (done_tx, done_rx) = mpsc::channel();
    let dog = {
        let sh = sh.clone();
        std::thread::spawn(move || watchdog(sh, pid, done_rx))
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|i| {
            let sh = sh.clone();
            std::thread::spawn(move || worker(sh, i, seed))
        })
        .collect();
    // The run's length, cut short only by a stall.
    poll_until(Duration::from_secs(secs), || {
        sh.hang.lock().unwrap().is_some()
    });
    sh.stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for w in workers {
        let t = w.join().expect("worker thread panicked");
        for (k, (ok, err)) in t.ops {
            let e = tally.ops.entry(k).or_default();
            e.0 += ok;
            e.1 += err;
        }
        for (k, n) in t.errnos {
            *tally.errnos.entry(k).or_default() += n;
        }
    }
    let _ = done_tx.send(());
    dog.join().unwrap();
    let total: u64 = tally.ops.values().map(|(a, b)| a + b).sum();
    eprintln!(
        "stress: {total} operations in {secs} s (seed {seed}); per kind (ok/failed): {:?}; \
         errnos: {:?}",
        tally.ops, tally.errnos
    );
    if let Some(dump) = sh.hang.lock().unwrap().clone() {
        panic!("stress (seed {seed}): deadlock or hang\n{dump}");
    }
    assert!(total > 0, "no operation ran");
    // Everything below is gathered, so that one run reports every kind of problem.
    let mut report: Vec<String> = Vec::new();
    let failures = sh.failures.lock().unwrap().clone();
    if !failures.is_empty() {
        let by_kind = sh.unexpected.lock().unwrap().clone();
        report.push(format!(
            "{} unexpected errors ({by_kind:?}), first ones:\n  {}",
            by_kind.values().sum::<u64>(),
            failures
                .iter()
                .take(30)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }

    // The merged tree is still whole: every directory lists, every file reads fully.
    let merged = match walk_merged(m.path()) {
        Ok(t) => t,
        Err((t, errs)) => {
            report.push(format!(
                "the merged tree is not fully readable:\n  {}",
                errs.join("\n  ")
            ));
            t
        }
    };
    if pid.is_some_and(|p| kill(p, None).is_err()) {
        report.push("the daemon died during the run".into());
    }
    let ended = m.unmount();
    if ended.daemon != DaemonExit::Exited(0) || !ended.command_ok || ended.left_mounted {
        report.push(format!("unmount or daemon exit not clean: {ended:?}"));
    }

    // The files only ever copied up still hold their lower content (unless a hard link made
    // through the mount was written).
    let written_now = sh.written.lock().unwrap().clone();
    for rel in RO_FILES {
        let want = fnv1a(&std::fs::read(lower_object(&lowers, rel).unwrap()).unwrap());
        match merged.get(rel) {
            Some(s) if s.hash == want || written_now.contains(&s.ino) => {}
            other => report.push(format!(
                "{rel}, never written, is {other:?} in the merged view, not its lower content"
            )),
        }
    }

    // The upper is consistent.
    let leftovers: Vec<String> = std::fs::read_dir(work.join("work"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !leftovers.is_empty() {
        report.push(format!("<workdir>/work holds leftovers: {leftovers:?}"));
    }
    let tainted = sh.tainted.lock().unwrap().clone();
    let written = sh.written.lock().unwrap().clone();
    let mut check = UpperCheck {
        lowers: &lowers,
        merged: &merged,
        tainted: &tainted,
        written: &written,
        problems: Vec::new(),
        counts: BTreeMap::new(),
    };
    check.walk(&upper);
    eprintln!(
        "stress: merged tree {} entries; upper holds {:?}",
        merged.len(),
        check.counts
    );
    if !check.problems.is_empty() {
        report.push(format!(
            "the upper is inconsistent:\n  {}",
            check.problems.join("\n  ")
        ));
    }
    assert!(
        report.is_empty(),
        "stress (seed {seed}):\n{}",
        report.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// The race the stress test meets, made deterministic: an object reached after its name went
// away (a caller between path walk and open, or reopening an O_PATH fd through /proc) must
// still be that object, never the whiteout or the new file now at its name.

const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];

fn show<T: std::fmt::Debug>(r: std::io::Result<T>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => ename(&e),
    }
}

/// Through `/proc/self/fd/N` of an `O_PATH` fd: the unlinked object itself.
fn identity_steps(root: &Path, upper: &Path) -> Vec<String> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let proc_path =
        |fd: &std::os::fd::OwnedFd| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    let stat_line = |p: &Path| {
        show(std::fs::metadata(p).map(|m| {
            format!(
                "mode {:o} size {} uid {} mtime {}",
                m.mode(),
                m.len(),
                m.uid(),
                if m.mtime() < 100 { m.mtime() } else { -1 }
            )
        }))
    };

    // A copied-up lower file, unlinked: a whiteout now holds its name.
    let f = root.join("f");
    let appended = OpenOptions::new()
        .append(true)
        .open(&f)
        .and_then(|mut h| h.write_all(b"appended\n"));
    out.push(format!("append to f: {}", show(appended)));
    // CLOEXEC: a test running beside this one spawns processes (daemons, umount), which must
    // not inherit a descriptor that keeps this mount busy.
    let fd = open(&f, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).expect("O_PATH open of f");
    out.push(format!("unlink f: {}", show(std::fs::remove_file(&f))));
    let p = proc_path(&fd);
    out.push(format!("f: stat: {}", stat_line(&p)));
    out.push(format!("f: read: {}", show(std::fs::read_to_string(&p))));
    out.push(format!(
        "f: chmod 600: {}",
        show(std::fs::set_permissions(
            &p,
            std::fs::Permissions::from_mode(0o600)
        ))
    ));
    out.push(format!(
        "f: setxattr user.x: {}",
        show(setxattr_follow(&p, "user.x", b"1"))
    ));
    out.push(format!("f: stat again: {}", stat_line(&p)));
    let wh = std::fs::symlink_metadata(upper.join("f"));
    out.push(format!(
        "upper f: {}",
        show(wh.map(|m| format!("whiteout {} mode {:o}", is_whiteout(&m), m.mode() & 0o7777)))
    ));
    drop(fd);

    // An upper file, unlinked and replaced by a new file of the same name.
    let h = root.join("h");
    std::fs::write(&h, b"old h\n").expect("create h");
    let fd = open(&h, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()).expect("O_PATH open of h");
    out.push(format!("unlink h: {}", show(std::fs::remove_file(&h))));
    std::fs::write(&h, b"new h content\n").expect("create the new h");
    let p = proc_path(&fd);
    out.push(format!("old h: stat: {}", stat_line(&p)));
    out.push(format!(
        "old h: read: {}",
        show(std::fs::read_to_string(&p))
    ));
    out.push(format!(
        "old h: truncate 0: {}",
        show(nix::unistd::truncate(&p, 0).map_err(std::io::Error::from))
    ));
    out.push(format!(
        "old h: chown 123: {}",
        show(std::os::unix::fs::chown(&p, Some(123), Some(123)))
    ));
    out.push(format!(
        "old h: utime 1: {}",
        show(
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &nix::sys::time::TimeSpec::new(1, 0),
                &nix::sys::time::TimeSpec::new(1, 0),
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .map_err(std::io::Error::from)
        )
    ));
    out.push(format!("new h: {}", stat_line(&h)));
    out.push(format!(
        "new h: read: {}",
        show(std::fs::read_to_string(&h))
    ));
    out
}

#[test]
fn a_removed_object_keeps_its_identity() {
    if !require_root_and_fuse() {
        return;
    }
    let run = |kernel: bool| {
        let scratch = Scratch::new();
        let l = Layer::new(scratch.dir("l"));
        l.file("f", b"lower f\n");
        let (u, w) = (scratch.dir("u"), scratch.dir("w"));
        if kernel {
            let m = common::mount_kernel(&[l.root()], Some((&u, &w)), KERNEL_OPTS);
            let steps = identity_steps(m.path(), &u);
            assert!(m.unmount(), "kernel overlay unmount failed");
            steps
        } else {
            let m = mount_ours(&[l.root()], Some((&u, &w)), &[]);
            let steps = identity_steps(m.path(), &u);
            let ended = m.unmount();
            assert_eq!(ended.daemon, DaemonExit::Exited(0), "{ended:?}");
            steps
        }
    };
    let kernel = run(true);
    let ours = run(false);
    let diffs: Vec<String> = kernel
        .iter()
        .zip(&ours)
        .filter(|(k, o)| k != o)
        .map(|(k, o)| format!("  kernel: {k}\n  ours:   {o}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "an unlinked object reached through /proc/self/fd differs from the kernel's:\n{}",
        diffs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// What the stress test's final walk once met (an upper entry the merged view did not list),
// made deterministic: a listing read after an entry was created must show it, however early
// the directory was opened. The kernel caches what a read from offset 0 answers as the
// directory's content at that moment, until its next change.

fn sorted_names(dir: &mut nix::dir::Dir) -> String {
    let mut names: Vec<String> = dir
        .iter()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .collect();
    names.sort();
    format!("{names:?}")
}

fn listing_steps(root: &Path) -> Vec<String> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    let mut out = Vec::new();
    let list = |p: &Path| {
        show(std::fs::read_dir(p).map(|rd| {
            let mut v: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }))
    };
    let open_dir = |p: &Path| {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        nix::dir::Dir::open(p, flags, Mode::empty()).expect("opendir")
    };
    for d in ["merged", "new"] {
        let dir = root.join(d);
        if d == "new" {
            std::fs::create_dir(&dir).expect("mkdir");
        }
        out.push(format!("{d}: {}", list(&dir)));
        // Opened, then an entry made, then read for the first time.
        let mut early = open_dir(&dir);
        std::fs::write(dir.join("a"), b"a").expect("create a");
        out.push(format!(
            "{d}: opened before a, read after: {}",
            sorted_names(&mut early)
        ));
        out.push(format!("{d}: afresh: {}", list(&dir)));
        // Read, an entry made, read again from the start (nix's iterator rewinds).
        out.push(format!("{d}: read: {}", sorted_names(&mut early)));
        std::fs::write(dir.join("b"), b"b").expect("create b");
        out.push(format!(
            "{d}: rewound after b: {}",
            sorted_names(&mut early)
        ));
        drop(early);
        out.push(format!("{d}: afresh: {}", list(&dir)));
    }
    out
}

#[test]
fn a_listing_shows_entries_made_after_opendir() {
    if !require_root_and_fuse() {
        return;
    }
    let run = |kernel: bool| {
        let scratch = Scratch::new();
        let l = Layer::new(scratch.dir("l"));
        l.file("merged/low", b"low\n");
        let (u, w) = (scratch.dir("u"), scratch.dir("w"));
        if kernel {
            let m = common::mount_kernel(&[l.root()], Some((&u, &w)), KERNEL_OPTS);
            let steps = listing_steps(m.path());
            assert!(m.unmount(), "kernel overlay unmount failed");
            steps
        } else {
            let m = mount_ours(&[l.root()], Some((&u, &w)), &[]);
            let steps = listing_steps(m.path());
            let ended = m.unmount();
            assert_eq!(ended.daemon, DaemonExit::Exited(0), "{ended:?}");
            steps
        }
    };
    let kernel = run(true);
    let ours = run(false);
    assert_eq!(
        ours, kernel,
        "listings differ from the kernel's (left: ours)"
    );
}
