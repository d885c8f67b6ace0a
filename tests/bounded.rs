//! The daemon's open descriptors and memory follow its budget, not the size of the tree or the
//! number of requests: a walk of more directories than it may open descriptors works (the least
//! recently used directory fds are closed and reopened on demand, also after renames),
//! 100,000 open/close cycles leave its fd count and memory where they were, and a walk of
//! 1,000,000 files keeps its fds within the directory fd budget and its memory within the
//! issue's per-file target, and every node goes once the kernel forgets the inodes.

mod common;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::mounts::{DaemonExit, DaemonMount, TmpfsMount, overlay_options};
use common::{
    Layer, Scratch, bin_is_overridden, our_bin, poll_until, require_root_and_fuse, wait_deadline,
};

const DIRS: usize = 1500;
/// The daemon's descriptor limit: its directory fd budget is a quarter of it.
const NOFILE: usize = 1024;

fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

fn rss_kib(pid: i32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Our daemon under `prlimit --nofile=NOFILE:NOFILE`, so it cannot raise the limit.
fn mount_limited(lowers: &[&Path], upper_work: (&Path, &Path), target: &Path) -> DaemonMount {
    mount_limited_with(lowers, upper_work, target, &[])
}

/// `mount_limited` with `extra` mount options.
fn mount_limited_with(
    lowers: &[&Path],
    upper_work: (&Path, &Path),
    target: &Path,
    extra: &[&str],
) -> DaemonMount {
    let mut args: Vec<OsString> = vec![
        format!("--nofile={NOFILE}:{NOFILE}").into(),
        our_bin().into(),
        "-o".into(),
    ];
    args.push(overlay_options(lowers, Some(upper_work), extra).into());
    args.push(target.into());
    DaemonMount::start(Path::new("prlimit"), &args, target, false)
        .unwrap_or_else(|e| panic!("mounting ours under prlimit failed: {e}"))
}

/// Lists, stats and reads everything under `root`; returns (directories, files) seen.
fn walk(root: &Path) -> (usize, usize) {
    let (mut dirs, mut files) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        dirs += 1;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            if meta.is_dir() {
                stack.push(path);
            } else {
                let mut content = String::new();
                fs::File::open(&path)
                    .and_then(|mut f| f.read_to_string(&mut content))
                    .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                assert!(
                    content.starts_with("file "),
                    "{}: {content:?}",
                    path.display()
                );
                files += 1;
            }
        }
    }
    (dirs, files)
}

#[test]
fn a_walk_of_more_directories_than_descriptors() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let (l1, l2) = (Layer::new(scratch.dir("l1")), Layer::new(scratch.dir("l2")));
    for d in 0..DIRS {
        l1.file(&format!("t/d{d:04}/a"), format!("file {d} a\n"));
        // Every other directory is merged from both lowers: two fds when open.
        if d % 2 == 0 {
            l2.file(&format!("t/d{d:04}/b"), format!("file {d} b\n"));
        }
    }
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let target = scratch.dir("m");
    let m = mount_limited(&[l1.root(), l2.root()], (&u, &w), &target);
    let pid = m.daemon_pid().expect("daemon pid").as_raw();
    let root = m.path().to_path_buf();

    let (dirs, files) = walk(&root);
    assert_eq!((dirs, files), (DIRS + 2, DIRS + DIRS / 2));
    let open = fd_count(pid);
    assert!(
        open < NOFILE / 2,
        "{open} fds open after walking {} directory copies (limit {NOFILE})",
        DIRS + DIRS / 2
    );

    // Directories whose fds were closed meanwhile are reopened from their new place after a
    // rename (of an upper directory, and of its parent).
    fs::create_dir_all(root.join("new/inner/deep")).expect("mkdir in the upper");
    fs::rename(root.join("new"), root.join("moved")).expect("rename an upper directory");
    assert_eq!(
        walk(&root.join("t")),
        (DIRS + 1, DIRS + DIRS / 2),
        "walk again"
    );
    fs::write(root.join("moved/inner/deep/f"), "file after rename\n").expect("write after rename");
    fs::write(root.join("t/d0001/c"), "file new\n").expect("write into a lower directory");
    assert_eq!(
        fs::read_to_string(u.join("moved/inner/deep/f")).expect("in the upper"),
        "file after rename\n"
    );
    assert_eq!(walk(&root), (DIRS + 5, DIRS + DIRS / 2 + 2));
    assert!(fd_count(pid) < NOFILE / 2);
    let ended = m.unmount();
    assert!(
        ended.daemon == DaemonExit::Exited(0) && !ended.left_mounted,
        "daemon did not end cleanly: {ended:?}"
    );
}

#[test]
fn open_close_cycles_leave_nothing_behind() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    for i in 0..10 {
        lower.file(&format!("f{i}"), format!("file {i}\n"));
    }
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    fs::write(u.join("upper"), "file upper\n").expect("upper file");
    let target = scratch.dir("m");
    let m = mount_limited(&[lower.root()], (&u, &w), &target);
    let pid = m.daemon_pid().expect("daemon pid").as_raw();
    let root = m.path().to_path_buf();
    let names: Vec<_> = (0..10)
        .map(|i| format!("f{i}"))
        .chain(["upper".to_owned()])
        .collect();
    // Warm up, then measure from there.
    for n in &names {
        fs::read(root.join(n)).expect("warm-up read");
    }
    let (fds_before, rss_before) = (fd_count(pid), rss_kib(pid));
    let mut buf = [0u8; 64];
    for i in 0..100_000 {
        let mut f = fs::File::open(root.join(&names[i % names.len()])).expect("open");
        let n = f.read(&mut buf).expect("read");
        assert!(buf[..n].starts_with(b"file "));
    }
    let (fds_after, rss_after) = (fd_count(pid), rss_kib(pid));
    assert!(
        fds_after <= fds_before + 2,
        "fds grew from {fds_before} to {fds_after} over 100,000 open/close cycles"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over 100,000 open/close cycles"
    );
    let ended = m.unmount();
    assert!(
        ended.daemon == DaemonExit::Exited(0) && !ended.left_mounted,
        "daemon did not end cleanly: {ended:?}"
    );
}

/// The generated tree of the big walk: `BIG_DIRS` directories of `BIG_FILES` empty files each.
const BIG_DIRS: usize = 1000;
const BIG_FILES: usize = 1000;
/// The daemon's directory fd budget under `mount_limited`: a quarter of `NOFILE` (also the
/// daemon's minimum budget, 256).
const DIRFD_BUDGET: usize = NOFILE / 4;
/// The target: after walking 100,000 files the daemon's RSS is at most 64 MiB.
const RSS_AFTER_100K_KIB: u64 = 64 * 1024;
/// The same budget per file for the whole walk (the kernel, with memory to spare, keeps every
/// inode cached, so the daemon must keep a node for each): 640 MiB for 1,000,000 files.
const RSS_PEAK_KIB: u64 = RSS_AFTER_100K_KIB * (BIG_DIRS * BIG_FILES / 100_000) as u64;
/// The target once the kernel has forgotten the inodes (drop_caches): under 16 MiB.
/// The daemon shrinks its node table and gives freed memory back as the forgets arrive.
const RSS_FORGOTTEN_KIB: u64 = 16 * 1024;

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`).
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Options of the tmpfs for the generated lower: a million files are created there in seconds
/// (a minute on ext4) and gone with the unmount (another half minute of `rm` on ext4).
const BIG_TMPFS_OPTS: &str = "size=64m,nr_inodes=2m";

/// `BIG_DIRS` x `BIG_FILES` empty files under `root/t`, made by two threads.
fn generate_big_tree(root: &Path) {
    let per_thread = BIG_DIRS / 2;
    std::thread::scope(|s| {
        for t in 0..2 {
            s.spawn(move || {
                for d in t * per_thread..(t + 1) * per_thread {
                    let dir = root.join(format!("t/d{d:04}"));
                    fs::create_dir_all(&dir)
                        .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                    for f in 0..BIG_FILES {
                        let p = dir.join(format!("f{f:04}"));
                        fs::File::create(&p)
                            .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
                    }
                }
            });
        }
    });
}

/// The daemon's statistics line (`kill -USR1`, written to `log`), once it appears.
fn daemon_stats(pid: i32, log: &Path) -> String {
    let seen = fs::read_to_string(log).unwrap_or_default().len();
    kill(Pid::from_raw(pid), Signal::SIGUSR1).expect("kill -USR1 the daemon");
    let mut line = None;
    poll_until(wait_deadline(), || {
        let text = fs::read_to_string(log).unwrap_or_default();
        line = text
            .get(seen..)
            .and_then(|new| new.lines().find(|l| l.contains("live nodes: ")))
            .map(str::to_owned);
        line.is_some()
    });
    line.unwrap_or_else(|| panic!("no statistics in {} after SIGUSR1", log.display()))
}

/// The number after `name` in a statistics line (`live nodes: `, `open directory fds: `).
fn stat(line: &str, name: &str) -> u64 {
    line.split_once(name)
        .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name:?} in {line:?}"))
}

/// What one walk of the big tree saw.
struct BigWalk {
    dirs: usize,
    files: usize,
    fds_peak: usize,
    /// The daemon's RSS once 100,000 files were walked, and how many exactly.
    rss_at_100k: (usize, u64),
    took: Duration,
}

/// readdir + lstat of every entry under `root`, sampling the daemon's fds (and its RSS once
/// 100,000 files are behind) after each directory.
fn big_walk(root: &Path, pid: i32) -> BigWalk {
    let start = Instant::now();
    let (mut dirs, mut files, mut fds_peak) = (0usize, 0usize, fd_count(pid));
    let mut rss_at_100k = None;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        dirs += 1;
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            if meta.is_dir() {
                stack.push(path);
            } else {
                assert!(meta.is_file() && meta.len() == 0, "{}", path.display());
                files += 1;
            }
        }
        fds_peak = fds_peak.max(fd_count(pid));
        if rss_at_100k.is_none() && files >= 100_000 {
            rss_at_100k = Some((files, rss_kib(pid)));
        }
    }
    BigWalk {
        dirs,
        files,
        fds_peak,
        rss_at_100k: rss_at_100k.expect("walked 100,000 files"),
        took: start.elapsed(),
    }
}

/// `echo 2 > /proc/sys/vm/drop_caches` until the daemon has no node left but the root (the
/// kernel sends its FORGETs as it evicts the inodes), or the deadline passes; returns the
/// nodes left (`None` for another binary, which has no statistics: there it waits for the RSS
/// target instead, briefly).
fn forget_everything(pid: i32, log: &Path) -> Option<u64> {
    let deadline = Instant::now() + wait_deadline() * 2;
    let mut left = None;
    while Instant::now() < deadline {
        fs::write("/proc/sys/vm/drop_caches", "2").expect("echo 2 > /proc/sys/vm/drop_caches");
        if bin_is_overridden() {
            poll_until(Duration::from_secs(5), || rss_kib(pid) <= RSS_FORGOTTEN_KIB);
            return None;
        }
        // The forgets arrive for a while after drop_caches returns.
        let done = poll_until(Duration::from_secs(5), || {
            left = Some(stat(&daemon_stats(pid, log), "live nodes: "));
            left == Some(0)
        });
        if done {
            break;
        }
    }
    left
}

#[test]
fn a_walk_of_a_million_files_keeps_fds_and_memory_bounded() {
    if !require_root_and_fuse() {
        return;
    }
    let start = Instant::now();
    let scratch = Scratch::new();
    let tmpfs = TmpfsMount::with_options(&scratch.dir("l"), BIG_TMPFS_OPTS);
    generate_big_tree(tmpfs.path());
    let generated = start.elapsed();
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let target = scratch.dir("m");
    // fuse-overlayfs (RSFS_TEST_BIN) has no statistics to ask for.
    let log = scratch.join("log");
    let log_opt = format!("log_file={}", log.display());
    let extra: &[&str] = if bin_is_overridden() {
        &[]
    } else {
        &[&log_opt]
    };
    let m = mount_limited_with(&[tmpfs.path()], (&u, &w), &target, extra);
    let pid = m.daemon_pid().expect("daemon pid").as_raw();
    let root = m.path().to_path_buf();
    let (fds_idle, rss_idle) = (fd_count(pid), rss_kib(pid));

    let first = big_walk(&root, pid);
    let (rss_walked, rss_peak) = (rss_kib(pid), status_kib(pid, "VmHWM"));
    let (files_100k, rss_100k) = first.rss_at_100k;
    eprintln!(
        "big walk: {} files generated in {generated:.1?}; {} dirs and {} files walked \
         (readdir + lstat) in {:.1?}; daemon fds: {fds_idle} at rest, peak {} (dirfd budget \
         {DIRFD_BUDGET}); daemon RSS: {rss_idle} KiB at rest, {rss_100k} KiB after {files_100k} \
         files, {rss_walked} KiB after the walk, peak (VmHWM) {rss_peak} KiB",
        BIG_DIRS * BIG_FILES,
        first.dirs,
        first.files,
        first.took,
        first.fds_peak
    );

    // The kernel forgets its inodes: we must free ours.
    let drop_start = Instant::now();
    let nodes_left = forget_everything(pid, &log);
    // The daemon gives memory back (malloc_trim) as the last forgets are handled; its live
    // node count reaches 0 first, and on a loaded machine the trim of a heap of a few hundred
    // MiB can still be running when the count is read.
    poll_until(Duration::from_secs(10), || {
        rss_kib(pid) <= RSS_FORGOTTEN_KIB
    });
    let rss_dropped = rss_kib(pid);
    eprintln!(
        "big walk: after drop_caches ({:.1?}): {} live nodes, {} fds, RSS {rss_dropped} KiB \
         (target {RSS_FORGOTTEN_KIB} KiB: {})",
        drop_start.elapsed(),
        nodes_left.map_or("?".to_owned(), |n| n.to_string()),
        fd_count(pid),
        if rss_dropped <= RSS_FORGOTTEN_KIB {
            "met"
        } else {
            "NOT MET"
        },
    );

    // What was freed is used again: a second walk (all new nodes) needs no more memory.
    let second = big_walk(&root, pid);
    let rss_peak_again = status_kib(pid, "VmHWM");
    eprintln!(
        "big walk: again in {:.1?}: fds peak {}, RSS peak (VmHWM) {rss_peak_again} KiB",
        second.took, second.fds_peak
    );
    let ended = m.unmount();
    drop(tmpfs);
    eprintln!("big walk: whole test {:.1?}", start.elapsed());

    for walk in [&first, &second] {
        assert_eq!(
            (walk.dirs, walk.files),
            (BIG_DIRS + 2, BIG_DIRS * BIG_FILES)
        );
        assert!(
            walk.fds_peak <= fds_idle + DIRFD_BUDGET + 8,
            "{} daemon fds during a walk: more than the {fds_idle} at rest plus the directory \
             fd budget {DIRFD_BUDGET}",
            walk.fds_peak
        );
    }
    assert!(
        rss_100k <= RSS_AFTER_100K_KIB,
        "daemon RSS {rss_100k} KiB after walking {files_100k} files (target 64 MiB)"
    );
    assert!(
        rss_peak <= RSS_PEAK_KIB,
        "daemon peak RSS {rss_peak} KiB walking {} files (bound {RSS_PEAK_KIB} KiB)",
        first.files
    );
    assert!(
        bin_is_overridden() || nodes_left == Some(0),
        "{nodes_left:?} nodes still live after drop_caches: the kernel's forgets were lost"
    );
    // The forgets are all in (asserted above); what is left to free goes back with the
    // shrinking of the node table that the last of them triggered.
    assert!(
        bin_is_overridden() || rss_dropped <= RSS_FORGOTTEN_KIB,
        "daemon RSS {rss_dropped} KiB after drop_caches made the kernel forget every node \
         (target {RSS_FORGOTTEN_KIB} KiB): freed memory is not given back"
    );
    assert!(
        rss_peak_again <= rss_peak + rss_peak / 16,
        "daemon peak RSS grew from {rss_peak} KiB to {rss_peak_again} KiB on a second walk \
         after drop_caches: nodes forgotten are not freed"
    );
    assert!(
        ended.daemon == DaemonExit::Exited(0) && !ended.left_mounted,
        "daemon did not end cleanly: {ended:?}"
    );
}
