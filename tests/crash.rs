//! Crash safety. Each round mounts our daemon in the foreground over a lower stack holding large
//! files (some sparse) and many small ones, runs a seeded workload through the mount (copy-ups by
//! appending to, patching and truncating lower files, renames, unlinks, mkdirs and fsync'd
//! creates), SIGKILLs the daemon at a seeded moment (chosen by counting the workload's
//! operations, biased towards the copy-up of a large file), lazily unmounts the dead mount,
//! mounts the same upper/workdir again and checks:
//!
//! - the merged tree is one the workload could have left: the state after some prefix of its
//!   operations that includes every operation completed (fsync included) before the kill,
//!   optionally with the operation in flight half done in one of its legitimate intermediate
//!   states (a truncated but not yet rewritten file, a created but not yet written one);
//!   never a partial copy-up, never a file that is neither its old nor its new version;
//! - `<workdir>/work` is empty after the remount (the mount removes the crashed run's temporaries);
//! - the upper layer holds nothing the merged view does not explain: no stray temporaries.
//!
//! `RSFS_CRASH_ROUNDS` sets the number of rounds (default 100, as issue 7 asks), `RSFS_CRASH_SEED` the base seed.
//! A second test compares how many blocks a copy-up of a sparse file takes, ours vs the kernel.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

use common::mounts::{DaemonExit, DaemonMount};
use common::prng::{Rng, fnv1a};
use common::{Layer, Scratch, our_bin, require_root_and_fuse};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const PAGE: usize = 4096;

// ---------------------------------------------------------------------------------------------
// The model: what the merged tree holds, path by path.

#[derive(Clone, Debug, PartialEq, Eq)]
enum Obj {
    File(Arc<Vec<u8>>),
    Dir,
}

/// `/a/b` → object; the root itself is not recorded.
type State = BTreeMap<String, Obj>;

#[derive(Clone, Debug)]
enum Op {
    /// open(O_APPEND) (a copy-up for a lower file), one write inside one page, fsync.
    Append {
        path: String,
        data: Vec<u8>,
    },
    /// open(O_WRONLY) (a copy-up for a lower file), pwrite inside one page, fsync.
    WriteAt {
        path: String,
        off: u64,
        data: Vec<u8>,
    },
    /// open(O_WRONLY|O_TRUNC), one write of at most a page at 0, fsync.
    TruncWrite {
        path: String,
        data: Vec<u8>,
    },
    /// open(O_CREAT|O_EXCL), one write of at most a page, fsync.
    Create {
        path: String,
        data: Vec<u8>,
    },
    Mkdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Append { path, data } => format!("append {} bytes to {path}", data.len()),
            Op::WriteAt { path, off, data } => {
                format!("pwrite {} bytes at {off} into {path}", data.len())
            }
            Op::TruncWrite { path, data } => {
                format!("truncate {path} and write {} bytes", data.len())
            }
            Op::Create { path, data } => format!("create {path} with {} bytes", data.len()),
            Op::Mkdir { path } => format!("mkdir {path}"),
            Op::Rename { from, to } => format!("rename {from} -> {to}"),
            Op::Unlink { path } => format!("unlink {path}"),
        }
    }

    /// The state after the operation, and the states it may leave if interrupted halfway
    /// (besides the state before it).
    fn apply(&self, s: &State) -> (State, Vec<State>) {
        let mut after = s.clone();
        let mut mid = Vec::new();
        let content = |p: &str| match s.get(p) {
            Some(Obj::File(c)) => c.clone(),
            other => panic!("plan bug: {p} is {other:?}"),
        };
        match self {
            Op::Append { path, data } => {
                let mut c = content(path).as_ref().clone();
                c.extend_from_slice(data);
                after.insert(path.clone(), Obj::File(Arc::new(c)));
            }
            Op::WriteAt { path, off, data } => {
                let mut c = content(path).as_ref().clone();
                let off = *off as usize;
                c[off..off + data.len()].copy_from_slice(data);
                after.insert(path.clone(), Obj::File(Arc::new(c)));
            }
            Op::TruncWrite { path, data } => {
                let mut m = s.clone();
                m.insert(path.clone(), Obj::File(Arc::new(Vec::new())));
                mid.push(m);
                after.insert(path.clone(), Obj::File(Arc::new(data.clone())));
            }
            Op::Create { path, data } => {
                assert!(!s.contains_key(path), "plan bug: {path} exists");
                let mut m = s.clone();
                m.insert(path.clone(), Obj::File(Arc::new(Vec::new())));
                mid.push(m);
                after.insert(path.clone(), Obj::File(Arc::new(data.clone())));
            }
            Op::Mkdir { path } => {
                after.insert(path.clone(), Obj::Dir);
            }
            Op::Rename { from, to } => {
                let c = content(from);
                after.remove(from);
                after.insert(to.clone(), Obj::File(c));
            }
            Op::Unlink { path } => {
                content(path);
                after.remove(path);
            }
        }
        (after, mid)
    }

    fn run(&self, root: &Path) -> std::io::Result<()> {
        let p = |rel: &str| root.join(&rel[1..]);
        match self {
            Op::Append { path, data } => {
                let mut f = OpenOptions::new().append(true).open(p(path))?;
                f.write_all(data)?;
                f.sync_all()
            }
            Op::WriteAt { path, off, data } => {
                let f = OpenOptions::new().write(true).open(p(path))?;
                f.write_all_at(data, *off)?;
                f.sync_all()
            }
            Op::TruncWrite { path, data } => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(p(path))?;
                f.write_all(data)?;
                f.sync_all()
            }
            Op::Create { path, data } => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p(path))?;
                f.write_all(data)?;
                f.sync_all()
            }
            Op::Mkdir { path } => std::fs::create_dir(p(path)),
            Op::Rename { from, to } => std::fs::rename(p(from), p(to)),
            Op::Unlink { path } => std::fs::remove_file(p(path)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lower stack, built once and shared by every round (only uppers are written).

struct Fixture {
    _scratch: Scratch,
    scratch_path: PathBuf,
    lowers: Vec<PathBuf>,
    initial: State,
    big: Vec<String>,
}

fn unique_bytes(rng: &mut Rng, tag: &str, len: usize) -> Vec<u8> {
    let mut v = rng.bytes(len);
    let t = tag.as_bytes();
    let n = t.len().min(len);
    v[..n].copy_from_slice(&t[..n]);
    v
}

/// A file of `size` bytes holding `extents` (offset, length) of data and holes elsewhere.
fn sparse_file(
    layer: &Layer,
    rel: &str,
    size: usize,
    extents: &[(usize, usize)],
    rng: &mut Rng,
) -> Vec<u8> {
    let mut content = vec![0u8; size];
    let p = layer.path(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    for (i, &(off, len)) in extents.iter().enumerate() {
        let d = unique_bytes(rng, &format!("{rel}#{i}"), len);
        f.write_all_at(&d, off as u64).unwrap();
        content[off..off + len].copy_from_slice(&d);
    }
    f.set_len(size as u64).unwrap();
    content
}

impl Fixture {
    fn build(seed: u64) -> Fixture {
        let scratch = Scratch::new();
        let l0 = Layer::new(scratch.dir("l0"));
        let l1 = Layer::new(scratch.dir("l1"));
        let mut rng = Rng::new(seed ^ 0x10e7);
        let mut initial = State::new();
        let mut big = Vec::new();

        // Large files, distinct content, in both layers; b4 and b5 are sparse.
        let dense: [(&str, &Layer, usize); 4] = [
            ("/big/b0", &l0, 4 * MIB),
            ("/big/b1", &l1, 3 * MIB + 123),
            ("/big/b2", &l0, 2 * MIB + 4000),
            ("/big/b3", &l1, MIB + 1),
        ];
        for (rel, layer, size) in dense {
            let c = unique_bytes(&mut rng, rel, size);
            layer.file(rel, &c);
            initial.insert(rel.to_string(), Obj::File(Arc::new(c)));
            big.push(rel.to_string());
        }
        let c = sparse_file(
            &l0,
            "/big/b4",
            4 * MIB,
            &[
                (0, 64 * KIB),
                (MIB, 100 * KIB + 7),
                (3 * MIB + 512 * KIB, 10),
            ],
            &mut rng,
        );
        initial.insert("/big/b4".into(), Obj::File(Arc::new(c)));
        big.push("/big/b4".into());
        let c = sparse_file(
            &l1,
            "/big/b5",
            3 * MIB + 5,
            &[(2 * MIB, 4 * KIB), (3 * MIB, 5)],
            &mut rng,
        );
        initial.insert("/big/b5".into(), Obj::File(Arc::new(c)));
        big.push("/big/b5".into());
        initial.insert("/big".into(), Obj::Dir);

        // Small files spread over five directories and both layers; some in l1 are shadowed
        // by a different file of the same name in l0.
        for d in 0..5 {
            initial.insert(format!("/s/d{d}"), Obj::Dir);
        }
        initial.insert("/s".into(), Obj::Dir);
        for i in 0..200 {
            let rel = format!("/s/d{}/f{i:03}", i % 5);
            let size = rng.range(16, 3000) as usize;
            let c = unique_bytes(&mut rng, &rel, size);
            if i % 2 == 0 {
                l0.file(&rel, &c);
            } else {
                l1.file(&rel, &c);
            }
            if i % 20 == 1 {
                let shadowed = unique_bytes(&mut rng, &format!("{rel} (shadow)"), size / 2 + 1);
                l0.file(&rel, &shadowed);
                initial.insert(rel, Obj::File(Arc::new(shadowed)));
            } else {
                initial.insert(rel, Obj::File(Arc::new(c)));
            }
        }
        l1.dir("/s/d0").dir("/s/d3");
        let scratch_path = scratch.path().to_path_buf();
        Fixture {
            lowers: vec![l0.root().to_path_buf(), l1.root().to_path_buf()],
            _scratch: scratch,
            scratch_path,
            initial,
            big,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A round's plan: operations, the state after each prefix, and each operation's midpoints.

struct Plan {
    ops: Vec<Op>,
    /// `states[i]` is the state after ops `0..i`.
    states: Vec<State>,
    mids: Vec<Vec<State>>,
    /// Operations that copy up a large lower file.
    big_copy_ups: BTreeSet<usize>,
}

fn files_of(s: &State) -> Vec<(String, usize)> {
    s.iter()
        .filter_map(|(p, o)| match o {
            Obj::File(c) => Some((p.clone(), c.len())),
            Obj::Dir => None,
        })
        .collect()
}

fn dirs_of(s: &State) -> Vec<String> {
    let mut v: Vec<String> = s
        .iter()
        .filter(|(_, o)| **o == Obj::Dir)
        .map(|(p, _)| p.clone())
        .collect();
    v.push(String::new());
    v
}

fn gen_plan(fx: &Fixture, rng: &mut Rng, round: usize) -> Plan {
    let n = rng.range(24, 40) as usize;
    let mut states = vec![fx.initial.clone()];
    let mut ops = Vec::new();
    let mut mids = Vec::new();
    let mut big_copy_ups = BTreeSet::new();
    // Paths still holding their untouched lower object.
    let mut pristine: BTreeSet<String> = fx.initial.keys().cloned().collect();
    let mut fresh = 0usize;
    let mut fresh_name = |dir: &str| {
        fresh += 1;
        format!("{dir}/n{round}_{fresh}")
    };
    while ops.len() < n {
        let s = states.last().unwrap();
        let files = files_of(s);
        let bigs: Vec<&(String, usize)> = files.iter().filter(|(_, l)| *l >= 64 * KIB).collect();
        let dirs = dirs_of(s);
        let roll = rng.below(100);
        let op = if roll < 22 && !bigs.is_empty() {
            // Prefer the large files still in the lower: their copy-up is what we want to hit.
            let lower_bigs: Vec<_> = bigs.iter().filter(|(p, _)| pristine.contains(p)).collect();
            let (path, len) = if !lower_bigs.is_empty() && rng.chance(70) {
                (**rng.pick(&lower_bigs)).clone()
            } else {
                (*rng.pick(&bigs)).clone()
            };
            if rng.chance(50) {
                let room = PAGE - len % PAGE;
                let l = rng.range(1, room.min(2000) as u64 + 1) as usize;
                Op::Append {
                    data: unique_bytes(rng, &format!("{path}+{}", ops.len()), l),
                    path,
                }
            } else {
                let off = rng.below((len - PAGE) as u64) as usize;
                let in_page = PAGE - off % PAGE;
                let l = rng.range(1, in_page.min(1500) as u64 + 1) as usize;
                Op::WriteAt {
                    data: unique_bytes(rng, &format!("{path}@{off}"), l),
                    off: off as u64,
                    path,
                }
            }
        } else if roll < 34 && !files.is_empty() {
            let (path, len) = rng.pick(&files).clone();
            let room = PAGE - len % PAGE;
            let l = rng.range(1, room.min(300) as u64 + 1) as usize;
            Op::Append {
                data: unique_bytes(rng, &format!("{path}+{}", ops.len()), l),
                path,
            }
        } else if roll < 44 && !files.is_empty() {
            let (path, _) = rng.pick(&files).clone();
            let l = rng.range(0, PAGE as u64 + 1) as usize;
            Op::TruncWrite {
                data: unique_bytes(rng, &format!("{path}!{}", ops.len()), l),
                path,
            }
        } else if roll < 62 {
            let dir = rng.pick(&dirs).clone();
            let l = rng.range(0, PAGE as u64 + 1) as usize;
            let path = fresh_name(&dir);
            Op::Create {
                data: unique_bytes(rng, &path, l),
                path,
            }
        } else if roll < 67 {
            let dir = rng.pick(&dirs).clone();
            Op::Mkdir {
                path: fresh_name(&dir),
            }
        } else if roll < 87 && !files.is_empty() {
            let (from, _) = rng.pick(&files).clone();
            let to = if rng.chance(50) {
                rng.pick(&files).0.clone()
            } else {
                let dir = rng.pick(&dirs).clone();
                fresh_name(&dir)
            };
            if to == from {
                continue;
            }
            Op::Rename { from, to }
        } else if !files.is_empty() {
            Op::Unlink {
                path: rng.pick(&files).0.clone(),
            }
        } else {
            continue;
        };
        let touched: Vec<&String> = match &op {
            Op::Append { path, .. }
            | Op::WriteAt { path, .. }
            | Op::TruncWrite { path, .. }
            | Op::Unlink { path } => vec![path],
            Op::Rename { from, to } => vec![from, to],
            Op::Create { .. } | Op::Mkdir { .. } => vec![],
        };
        let copies_big_up = match &op {
            Op::Append { path, .. } | Op::WriteAt { path, .. } | Op::Rename { from: path, .. } => {
                pristine.contains(path) && fx.big.contains(path)
            }
            _ => false,
        };
        if copies_big_up {
            big_copy_ups.insert(ops.len());
        }
        for t in touched {
            pristine.remove(t);
        }
        let (after, mid) = op.apply(s);
        states.push(after);
        mids.push(mid);
        ops.push(op);
    }
    Plan {
        ops,
        states,
        mids,
        big_copy_ups,
    }
}

// ---------------------------------------------------------------------------------------------
// Observing the trees.

fn walk_merged(root: &Path) -> Result<State, String> {
    let mut out = State::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| format!("readdir {rel}/: {e}"))?;
        for de in rd {
            let de = de.map_err(|e| format!("readdir {rel}/: {e}"))?;
            let name = de.file_name().to_string_lossy().into_owned();
            let r = format!("{rel}/{name}");
            let p = de.path();
            let md = std::fs::symlink_metadata(&p).map_err(|e| format!("lstat {r}: {e}"))?;
            if md.is_dir() {
                out.insert(r.clone(), Obj::Dir);
                stack.push((p, r));
            } else if md.is_file() {
                let c = std::fs::read(&p).map_err(|e| format!("read {r}: {e}"))?;
                if c.len() as u64 != md.len() {
                    return Err(format!(
                        "{r}: read {} bytes but st_size is {}",
                        c.len(),
                        md.len()
                    ));
                }
                out.insert(r, Obj::File(Arc::new(c)));
            } else {
                return Err(format!(
                    "{r}: unexpected file type {:?} in the merged view",
                    md.file_type()
                ));
            }
        }
    }
    Ok(out)
}

/// Entries of a directory (names), or an error string.
fn names_in(dir: &Path) -> Result<Vec<String>, String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("readdir {}: {e}", dir.display()))?
        .map(|d| d.map(|d| d.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("readdir {}: {e}", dir.display()))?;
    v.sort();
    Ok(v)
}

/// Every upper entry must be explained by the merged view: a directory or regular file shown
/// there with the same content, or a whiteout (char 0/0) of a path the workload or the lower
/// ever had. Anything else (a `#...` temporary, a half-made copy) is stray.
fn upper_strays(upper: &Path, observed: &State, universe: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(upper.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => {
                out.push(format!("upper {rel}/: readdir: {e}"));
                continue;
            }
        };
        for de in rd.flatten() {
            let name = de.file_name().to_string_lossy().into_owned();
            let r = format!("{rel}/{name}");
            let Ok(md) = std::fs::symlink_metadata(de.path()) else {
                out.push(format!("upper {r}: lstat failed"));
                continue;
            };
            let ft = md.file_type();
            if name.starts_with('#') {
                out.push(format!("upper {r}: stray temporary ({:?})", ft));
                continue;
            }
            if ft.is_dir() {
                if observed.get(&r) != Some(&Obj::Dir) {
                    out.push(format!("upper {r}: directory not in the merged view"));
                }
                stack.push((de.path(), r));
            } else if ft.is_file() {
                match observed.get(&r) {
                    // A metacopy file holds metadata only; its data is read from a lower.
                    Some(Obj::File(_)) if is_metacopy(&de.path()) => {}
                    Some(Obj::File(c)) => {
                        let on_disk = std::fs::read(de.path()).unwrap_or_default();
                        if on_disk != **c {
                            out.push(format!(
                                "upper {r}: content ({} bytes) differs from the merged view's",
                                on_disk.len()
                            ));
                        }
                    }
                    other => out.push(format!(
                        "upper {r}: regular file the merged view shows as {other:?}"
                    )),
                }
            } else if ft.is_char_device() && md.rdev() == 0 {
                if !universe.contains(&r) {
                    out.push(format!("upper {r}: whiteout of a name that never existed"));
                }
                if observed.contains_key(&r) {
                    out.push(format!("upper {r}: whiteout but the merged view shows it"));
                }
            } else {
                out.push(format!("upper {r}: unexpected type {ft:?}"));
            }
        }
    }
    out
}

fn is_metacopy(path: &Path) -> bool {
    common::xattr::get(path, "trusted.overlay.metacopy").is_ok()
}

fn show_obj(o: Option<&Obj>) -> String {
    match o {
        None => "absent".into(),
        Some(Obj::Dir) => "directory".into(),
        Some(Obj::File(c)) => format!("{} bytes (fnv {:016x})", c.len(), fnv1a(c)),
    }
}

/// How `obs` relates to `want`: where they first differ, whether one is a prefix of the other.
fn relation(obs: &[u8], want: &[u8]) -> String {
    let common = obs.iter().zip(want).take_while(|(a, b)| a == b).count();
    if common == obs.len() && obs.len() < want.len() {
        format!("a {}-byte prefix of it", obs.len())
    } else if common == want.len() && want.len() < obs.len() {
        format!("it plus {} more bytes", obs.len() - want.len())
    } else {
        let zeros = obs[common..].iter().all(|b| *b == 0);
        format!(
            "first difference at byte {common}{}",
            if zeros { ", zeros from there on" } else { "" }
        )
    }
}

/// Why `observed` matches none of `candidates`, against the closest one.
fn explain(observed: &State, candidates: &[(String, &State)], initial: &State) -> String {
    let diff_paths = |c: &State| -> Vec<String> {
        let keys: BTreeSet<&String> = observed.keys().chain(c.keys()).collect();
        keys.into_iter()
            .filter(|k| observed.get(*k) != c.get(*k))
            .cloned()
            .collect()
    };
    let (best_name, best) = candidates
        .iter()
        .min_by_key(|(_, c)| diff_paths(c).len())
        .expect("at least one candidate");
    let mut msg = format!(
        "the merged tree matches none of the {} allowed states; closest is {best_name}:\n",
        candidates.len()
    );
    for p in diff_paths(best) {
        let o = observed.get(&p);
        let _ = write!(
            msg,
            "    {p}: observed {}, expected {}",
            show_obj(o),
            show_obj(best.get(&p))
        );
        if let (Some(Obj::File(oc)), Some(Obj::File(wc))) = (o, best.get(&p)) {
            let _ = write!(msg, " (observed is {})", relation(oc, wc));
        }
        if let (Some(Obj::File(oc)), Some(Obj::File(lc))) = (o, initial.get(&p)) {
            if oc != lc {
                let _ = write!(msg, "; vs the lower version: {}", relation(oc, lc));
            }
        }
        let allowed: BTreeSet<String> = candidates
            .iter()
            .map(|(_, c)| show_obj(c.get(&p)))
            .collect();
        let _ = writeln!(msg, "; allowed here: {allowed:?}");
    }
    msg
}

// ---------------------------------------------------------------------------------------------
// One round.

#[derive(Default)]
struct Stats {
    rounds: usize,
    ops_planned: usize,
    ops_started: usize,
    ops_completed_before_kill: usize,
    kills_in_big_copy_up: usize,
    kills_after_workload: usize,
    rounds_with_work_leftovers: usize,
    matched_midpoint: usize,
}

struct Progress {
    started: AtomicUsize,
    completed: AtomicUsize,
    killed: AtomicBool,
    finished: AtomicBool,
}

fn run_workload(root: PathBuf, ops: Arc<Vec<Op>>, prog: Arc<Progress>) -> Result<(), String> {
    let res = (|| {
        for (i, op) in ops.iter().enumerate() {
            prog.started.store(i + 1, Ordering::SeqCst);
            match op.run(&root) {
                Ok(()) => prog.completed.store(i + 1, Ordering::SeqCst),
                Err(e) if prog.killed.load(Ordering::SeqCst) => {
                    // ENOTCONN/ECONNABORTED once the daemon is gone: the workload ends here.
                    let _ = e;
                    return Ok(());
                }
                Err(e) => {
                    return Err(format!(
                        "op {i} ({}) failed before the kill: {e}",
                        op.describe()
                    ));
                }
            }
        }
        Ok(())
    })();
    prog.finished.store(true, Ordering::SeqCst);
    res
}

fn lazy_unmount(p: &Path) -> Result<(), String> {
    let o = common::run("umount", &[OsStr::new("-l"), p.as_os_str()]);
    if o.status.success() {
        return Ok(());
    }
    let o2 = common::run("fusermount3", &[OsStr::new("-uz"), p.as_os_str()]);
    if o2.status.success() {
        return Ok(());
    }
    Err(format!(
        "lazy unmount of {} failed: umount -l: {}; fusermount3 -uz: {}",
        p.display(),
        String::from_utf8_lossy(&o.stderr).trim(),
        String::from_utf8_lossy(&o2.stderr).trim()
    ))
}

fn round(
    fx: &Fixture,
    r: usize,
    seed: u64,
    opts: &[&str],
    stats: &mut Stats,
) -> Result<(), String> {
    let mut rng = Rng::new(seed);
    let plan = gen_plan(fx, &mut rng, r);
    let n = plan.ops.len();
    stats.rounds += 1;
    stats.ops_planned += n;

    // Where to kill: half the rounds inside (or right after the start of) the copy-up of a large
    // lower file, the others at any operation; then a seeded delay after that operation starts.
    let (k, delay_us) = if !plan.big_copy_ups.is_empty() && rng.chance(50) {
        let v: Vec<usize> = plan.big_copy_ups.iter().copied().collect();
        (*rng.pick(&v), rng.below(12_000))
    } else if rng.chance(10) {
        (n - 1, rng.below(40_000))
    } else {
        (rng.below(n as u64) as usize, rng.below(3_000))
    };

    let upper = fx.scratch_path.join(format!("u{r}"));
    let workdir = fx.scratch_path.join(format!("w{r}"));
    std::fs::create_dir_all(&upper).unwrap();
    std::fs::create_dir_all(&workdir).unwrap();
    let lowers: Vec<&Path> = fx.lowers.iter().map(PathBuf::as_path).collect();
    let uw = Some((upper.as_path(), workdir.as_path()));

    let m1 = DaemonMount::start_overlay(&our_bin(), None, &lowers, uw, opts, true)
        .map_err(|e| format!("first mount: {e}"))?;
    let pid = m1
        .daemon_pid()
        .ok_or("first mount: no daemon pid (foreground child expected)")?;

    let prog = Arc::new(Progress {
        started: AtomicUsize::new(0),
        completed: AtomicUsize::new(0),
        killed: AtomicBool::new(false),
        finished: AtomicBool::new(false),
    });
    let ops = Arc::new(plan.ops.clone());
    let (tx, rx) = mpsc::channel();
    {
        let (root, ops, prog) = (m1.path().to_path_buf(), ops.clone(), prog.clone());
        std::thread::spawn(move || {
            let _ = tx.send(run_workload(root, ops, prog));
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while prog.started.load(Ordering::SeqCst) <= k && !prog.finished.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    std::thread::sleep(Duration::from_micros(delay_us));
    let completed = prog.completed.load(Ordering::SeqCst);
    let in_flight = prog.started.load(Ordering::SeqCst);
    prog.killed.store(true, Ordering::SeqCst);
    kill(pid, Signal::SIGKILL).map_err(|e| format!("kill {pid}: {e}"))?;
    if in_flight > completed && plan.big_copy_ups.contains(&(in_flight - 1)) {
        stats.kills_in_big_copy_up += 1;
    }
    if completed == n {
        stats.kills_after_workload += 1;
    }
    let workload = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the workload did not end within 60 s of the kill".to_string())?;
    let started = prog.started.load(Ordering::SeqCst);
    stats.ops_started += started;
    stats.ops_completed_before_kill += completed;
    let ctx = format!(
        "round {r} (seed {seed:#x}): {n} ops planned, {completed} completed before the kill, \
         {started} started; kill aimed at op {k} + {delay_us} us"
    );
    workload.map_err(|e| format!("{ctx}: {e}"))?;

    lazy_unmount(m1.path()).map_err(|e| format!("{ctx}: {e}"))?;
    let _ = m1.unmount();
    let leftovers = names_in(&workdir.join("work")).map_err(|e| format!("{ctx}: {e}"))?;
    if !leftovers.is_empty() {
        stats.rounds_with_work_leftovers += 1;
    }

    let mut m2 = DaemonMount::start_overlay(&our_bin(), None, &lowers, uw, opts, true)
        .map_err(|e| format!("{ctx}: remount after the crash: {e}"))?;
    let mut problems = Vec::new();
    match names_in(&workdir.join("work")) {
        Ok(v) if v.is_empty() => {}
        Ok(v) => problems.push(format!(
            "<workdir>/work not empty after the remount: {v:?} (before the remount: {leftovers:?})"
        )),
        Err(e) => problems.push(e),
    }
    let observed = walk_merged(m2.path());
    let stderr2 = m2.stderr();
    let ended = m2.unmount();
    if ended.daemon != DaemonExit::Exited(0) {
        problems.push(format!(
            "the remounted daemon ended with {:?} on umount; stderr: {}",
            ended.daemon, stderr2
        ));
    }
    match observed {
        Err(e) => problems.push(format!("reading the remounted tree: {e}")),
        Ok(observed) => {
            let mut candidates: Vec<(String, &State)> = Vec::new();
            for m in completed..=started.min(n) {
                candidates.push((format!("after ops 0..{m}"), &plan.states[m]));
                if m < started.min(n) {
                    for (j, s) in plan.mids[m].iter().enumerate() {
                        candidates
                            .push((format!("after ops 0..{m} with op {m} half done (#{j})"), s));
                    }
                }
            }
            match candidates.iter().find(|(_, c)| **c == observed) {
                Some((name, _)) => {
                    if name.contains("half done") {
                        stats.matched_midpoint += 1;
                    }
                }
                None => {
                    let mut msg = explain(&observed, &candidates, &fx.initial);
                    for (i, op) in plan.ops.iter().enumerate().take(started) {
                        let _ = writeln!(msg, "    op {i}: {}", op.describe());
                    }
                    problems.push(msg);
                }
            }
            let universe: BTreeSet<String> =
                plan.states.iter().flat_map(|s| s.keys().cloned()).collect();
            problems.extend(upper_strays(&upper, &observed, &universe));
        }
    }
    if !problems.is_empty() {
        return Err(format!("{ctx}:\n  {}", problems.join("\n  ")));
    }
    let _ = std::fs::remove_dir_all(&upper);
    let _ = std::fs::remove_dir_all(&workdir);
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

#[test]
fn sigkill_during_workload_leaves_old_or_new_versions() {
    crash_rounds(100, 0x5eed_c4a5, &[]);
}

/// The same with the kernel's optional features: a rename of a lower file is a metacopy copy-up
/// plus a redirect, and the first write to it copies its data into the upper file in place,
/// its metacopy mark removed last; a kill in between must leave the old or the new version.
#[test]
fn sigkill_with_metacopy_index_and_redirects_leaves_old_or_new_versions() {
    crash_rounds(
        30,
        0x5eed_3e7a,
        &["redirect_dir=on", "index=on", "metacopy=on"],
    );
}

fn crash_rounds(default_rounds: u64, default_seed: u64, opts: &[&str]) {
    if !require_root_and_fuse() {
        return;
    }
    let rounds = env_u64("RSFS_CRASH_ROUNDS").unwrap_or(default_rounds) as usize;
    let base = env_u64("RSFS_CRASH_SEED").unwrap_or(default_seed);
    let t0 = Instant::now();
    let fx = Fixture::build(base);
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    for r in 0..rounds {
        let seed = base.wrapping_add((r as u64).wrapping_mul(0x9E37_79B9));
        if let Err(e) = round(&fx, r, seed, opts, &mut stats) {
            failures.push(e);
        }
    }
    // The lowers are never written: each file still reads as built (top layer first).
    for (rel, obj) in &fx.initial {
        if let Obj::File(want) = obj {
            let got = fx
                .lowers
                .iter()
                .find_map(|l| std::fs::read(l.join(&rel[1..])).ok());
            if got.as_deref() != Some(want.as_slice()) {
                failures.push(format!("lower file {rel} changed during the test"));
            }
        }
    }
    eprintln!(
        "crash {opts:?}: {} rounds in {:.1?}: {} ops planned, {} started, {} completed before the kill; \
         {} kills inside a large copy-up op, {} after the workload ended, {} rounds left \
         temporaries in work/ (all removed at remount), {} rounds matched a half-done op",
        stats.rounds,
        t0.elapsed(),
        stats.ops_planned,
        stats.ops_started,
        stats.ops_completed_before_kill,
        stats.kills_in_big_copy_up,
        stats.kills_after_workload,
        stats.rounds_with_work_leftovers,
        stats.matched_midpoint
    );
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds failed (base seed {base:#x}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Holes survive a copy-up (as they do under the kernel's overlayfs).

fn copy_up_blocks(upper: &Path, mounted: &Path) -> u64 {
    let mut f = OpenOptions::new()
        .append(true)
        .open(mounted.join("sparse"))
        .expect("open the sparse file for append");
    f.write_all(b"!").expect("append");
    f.sync_all().expect("fsync");
    drop(f);
    std::fs::symlink_metadata(upper.join("sparse"))
        .expect("the copy in the upper")
        .blocks()
}

#[test]
fn copy_up_of_a_sparse_file_keeps_its_holes() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    let mut rng = Rng::new(7);
    let content = sparse_file(
        &lower,
        "/sparse",
        64 * MIB,
        &[(0, 4 * KIB), (32 * MIB, 64 * KIB), (64 * MIB - 8, 8)],
        &mut rng,
    );
    let lower_blocks = std::fs::metadata(lower.path("/sparse")).unwrap().blocks();

    let (ku, kw) = (scratch.dir("ku"), scratch.dir("kw"));
    let km = common::mount_kernel(&[lower.root()], Some((&ku, &kw)), &[]);
    let kernel_blocks = copy_up_blocks(&ku, km.path());
    drop(km);

    let (ou, ow) = (scratch.dir("ou"), scratch.dir("ow"));
    let om = common::mount_ours(&[lower.root()], Some((&ou, &ow)), &[]);
    let ours_blocks = copy_up_blocks(&ou, om.path());
    let read_back = std::fs::read(om.path().join("sparse")).expect("read back");
    drop(om);

    let mut want = content;
    want.push(b'!');
    assert!(
        read_back == want,
        "content after copy-up differs: {}",
        relation(&read_back, &want)
    );
    // Allow a little slack for the filesystem's allocation granularity.
    let slack = 256;
    assert!(
        ours_blocks <= kernel_blocks.max(lower_blocks) + slack,
        "copy-up filled the holes of a 64 MiB file with 76 KiB of data: ours takes {ours_blocks} \
         blocks of 512 bytes in the upper, the kernel's copy {kernel_blocks}, the lower {lower_blocks}"
    );
}
