//! The daemon's open descriptors and memory follow its budget, not the size of the tree or the
//! number of requests: a walk of more directories than it may open descriptors works (the least
//! recently used directory fds are closed and reopened on demand, also after renames), and
//! 100,000 open/close cycles leave its fd count and memory where they were.

mod common;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::path::Path;

use common::mounts::{DaemonExit, DaemonMount, overlay_options};
use common::{Layer, Scratch, our_bin, require_root_and_fuse};

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
    let mut args: Vec<OsString> = vec![
        format!("--nofile={NOFILE}:{NOFILE}").into(),
        our_bin().into(),
        "-o".into(),
    ];
    args.push(overlay_options(lowers, Some(upper_work), &[]).into());
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
