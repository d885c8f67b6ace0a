//! Resource limits, each compared with the kernel's overlayfs where that is cheap:
//!
//! - the upper filesystem runs full (an 8 MiB tmpfs holds upper and workdir): writes and
//!   copy-ups that do not fit fail with ENOSPC, leave the lower version visible and intact and
//!   nothing in `<workdir>/work`, and after space is freed the same copy-up succeeds;
//! - the daemon runs out of file descriptors (started under `prlimit --nofile=64:64`, so it
//!   cannot raise the limit): callers get a sensible errno (never EIO), the daemon survives, and
//!   once the callers close their files the mount works again; started with a soft limit
//!   below the hard one, it raises the soft limit to the hard one;
//! - lazy unmount (`umount -l`, `fusermount3 -uz`) with files open and requests in flight: the
//!   open files keep working, and once they are closed the daemon exits 0 and nothing stays
//!   mounted.

mod common;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use common::mountinfo::is_mounted;
use common::mounts::{DaemonExit, DaemonMount, force_unmount, overlay_options};
use common::prng::{Rng, fnv1a};
use common::{
    Layer, Scratch, mount_kernel, mount_ours, our_bin, poll_until, require_root_and_fuse, run,
    wait_deadline,
};

const MIB: usize = 1024 * 1024;
const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];

fn ename(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(c) => format!("{:?}", Errno::from_raw(c)),
        None => format!("{e}"),
    }
}

fn show<T>(r: &std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => ename(e),
    }
}

fn sum_of(p: &Path) -> String {
    match std::fs::read(p) {
        Ok(c) => format!("{} bytes #{:016x}", c.len(), fnv1a(&c)),
        Err(e) => ename(&e),
    }
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A tmpfs of a given size, unmounted on drop.
struct SmallTmpfs {
    path: PathBuf,
}

impl SmallTmpfs {
    fn new(path: PathBuf, size: &str) -> SmallTmpfs {
        std::fs::create_dir_all(&path).expect("mkdir tmpfs target");
        let out = run(
            "mount",
            &[
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                format!("size={size}").as_ref(),
                "tmpfs".as_ref(),
                path.as_os_str(),
            ],
        );
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallTmpfs { path }
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        force_unmount(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// (a) The upper runs full.

struct Full {
    steps: Vec<String>,
    /// Facts that are ours alone to check (not compared with the kernel).
    problems: Vec<String>,
    filled: usize,
}

/// Copies a lower file up by opening it for appending; `tail` is then appended.
fn append(p: &Path, tail: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().append(true).open(p)?;
    f.write_all(tail)?;
    f.sync_all()
}

fn fill_upper(root: &Path, lower: &Layer, workdir: &Path) -> Full {
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    let lower_sum = |rel: &str| sum_of(&lower.path(rel));
    let check_intact = |what: &str, rel: &str, problems: &mut Vec<String>| {
        let seen = sum_of(&root.join(rel));
        if seen != lower_sum(rel) {
            problems.push(format!(
                "{what}: {rel} through the mount is {seen}, the lower holds {}",
                lower_sum(rel)
            ));
        }
        let left = entries(&workdir.join("work"));
        if !left.is_empty() {
            problems.push(format!("{what}: <workdir>/work holds {left:?}"));
        }
    };

    // Fill the upper: a write that does not fit gets ENOSPC.
    let mut filled = 0;
    let filler = root.join("filler");
    let r = (|| {
        let mut f = File::create(&filler)?;
        let chunk = vec![0x5au8; MIB];
        for _ in 0..32 {
            let mut done = 0;
            while done < chunk.len() {
                let n = f.write(&chunk[done..])?;
                done += n;
                filled += n;
            }
        }
        f.sync_all()
    })();
    steps.push(format!("fill the upper: {}", show(&r)));
    let r = std::fs::write(root.join("small"), vec![1u8; 8192]);
    steps.push(format!("write 8 KiB to a new file: {}", show(&r)));

    // Copy-ups that do not fit.
    let r = append(&root.join("big16"), b"tail");
    steps.push(format!("copy up the 16 MiB file (O_APPEND): {}", show(&r)));
    check_intact("after the failed 16 MiB copy-up", "big16", &mut problems);
    let r = append(&root.join("f4"), b"tail");
    steps.push(format!("copy up the 4 MiB file (O_APPEND): {}", show(&r)));
    check_intact("after the failed 4 MiB copy-up", "f4", &mut problems);
    let r = OpenOptions::new()
        .write(true)
        .open(root.join("s0"))
        .and_then(|f| f.set_len(20 * MIB as u64));
    steps.push(format!(
        "truncate a small lower file to 20 MiB: {}",
        show(&r)
    ));
    steps.push(format!(
        "the 4 MiB file through the mount: {}",
        sum_of(&root.join("f4"))
    ));

    // Free space through the mount, and the same copy-up fits.
    steps.push(format!(
        "unlink the filler: {}",
        show(&std::fs::remove_file(&filler))
    ));
    let _ = std::fs::remove_file(root.join("small"));
    let r = append(&root.join("f4"), b"tail");
    steps.push(format!("copy up the 4 MiB file again: {}", show(&r)));
    let mut want = std::fs::read(lower.path("f4")).expect("read lower f4");
    want.extend_from_slice(b"tail");
    if std::fs::read(root.join("f4")).ok() != Some(want) {
        problems.push("the 4 MiB file is not its lower content plus the tail".into());
    }
    let r = append(&root.join("big16"), b"tail");
    steps.push(format!("copy up the 16 MiB file again: {}", show(&r)));
    check_intact("after the second 16 MiB copy-up", "big16", &mut problems);

    // The mount keeps working.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let r = (|| {
        std::fs::create_dir(root.join("d"))?;
        std::fs::write(root.join("d/x"), &data)?;
        std::fs::rename(root.join("d/x"), root.join("d/y"))?;
        if std::fs::read(root.join("d/y"))? != data {
            return Err(std::io::Error::other("read back differs"));
        }
        std::fs::remove_file(root.join("d/y"))?;
        std::fs::remove_dir(root.join("d"))?;
        std::fs::metadata(root.join("s1")).map(|_| ())
    })();
    steps.push(format!(
        "mkdir, write, rename, read, unlink, rmdir: {}",
        show(&r)
    ));
    for rel in ["s1", "s2"] {
        steps.push(format!("{rel}: {}", sum_of(&root.join(rel))));
    }
    Full {
        steps,
        problems,
        filled,
    }
}

#[test]
fn the_upper_runs_full() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    let mut rng = Rng::new(0xf011);
    lower.file("big16", rng.bytes(16 * MIB));
    lower.file("f4", rng.bytes(4 * MIB));
    for i in 0..3 {
        lower.file(&format!("s{i}"), rng.bytes(1000 + i * 100));
    }
    let lower_sums: Vec<String> = ["big16", "f4", "s0"]
        .iter()
        .map(|r| sum_of(&lower.path(r)))
        .collect();

    let side = |kernel: bool| {
        let t = SmallTmpfs::new(scratch.join(if kernel { "tk" } else { "to" }), "8m");
        let (u, w) = (t.path.join("u"), t.path.join("w"));
        std::fs::create_dir_all(&u).unwrap();
        std::fs::create_dir_all(&w).unwrap();
        let full = if kernel {
            let m = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_OPTS);
            let full = fill_upper(m.path(), &lower, &w);
            assert!(m.unmount(), "kernel overlay unmount failed");
            full
        } else {
            let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
            let mut full = fill_upper(m.path(), &lower, &w);
            let ended = m.unmount();
            if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted {
                full.problems.push(format!("unmount: {ended:?}"));
            }
            full
        };
        drop(t);
        full
    };
    let kernel = side(true);
    let ours = side(false);
    eprintln!(
        "upper full: filler reached {} bytes (ours) / {} bytes (kernel) on an 8 MiB tmpfs",
        ours.filled, kernel.filled
    );
    for (k, o) in kernel.steps.iter().zip(&ours.steps) {
        eprintln!("  kernel: {k}\n  ours:   {o}");
    }
    let after: Vec<String> = ["big16", "f4", "s0"]
        .iter()
        .map(|r| sum_of(&lower.path(r)))
        .collect();
    let mut problems = ours.problems.clone();
    if after != lower_sums {
        problems.push(format!("the lower changed: {lower_sums:?} -> {after:?}"));
    }
    if !ours
        .steps
        .iter()
        .any(|s| s.starts_with("fill the upper: ENOSPC"))
    {
        problems.push("filling the upper did not end in ENOSPC".into());
    }
    for (k, o) in kernel.steps.iter().zip(&ours.steps) {
        if k != o {
            problems.push(format!(
                "differs from the kernel:\n    kernel: {k}\n    ours:   {o}"
            ));
        }
    }
    assert!(
        kernel.problems.is_empty(),
        "the kernel's own run broke the test's assumptions: {:?}",
        kernel.problems
    );
    assert!(
        problems.is_empty(),
        "upper full:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// (b) The daemon runs out of file descriptors.

/// The soft and hard `RLIMIT_NOFILE` of a process, from /proc (unlimited as u64::MAX).
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default();
    let num = |s: Option<&str>| s.and_then(|v| v.parse().ok()).unwrap_or(u64::MAX);
    let mut f = line.split_whitespace().skip(3);
    (num(f.next()), num(f.next()))
}

fn daemon_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

fn daemon_alive(pid: Option<nix::unistd::Pid>) -> bool {
    pid.is_some_and(|p| daemon_state(p.as_raw()).is_some_and(|s| s != 'Z' && s != 'X'))
}

const DEEP: &str = "deep/a/b/c/d/e/f/g/h";

/// What the mount must do again once the callers closed their files.
fn works_again(root: &Path, lower: &Layer) -> Result<(), String> {
    let c = std::fs::read(root.join("many/f000")).map_err(|e| format!("read: {}", ename(&e)))?;
    if c != std::fs::read(lower.path("many/f000")).unwrap() {
        return Err("read: wrong content".into());
    }
    let p = root.join("new/after");
    std::fs::write(&p, b"after").map_err(|e| format!("create: {}", ename(&e)))?;
    if std::fs::read(&p).map_err(|e| format!("read back: {}", ename(&e)))? != b"after" {
        return Err("read back: wrong content".into());
    }
    std::fs::metadata(root.join(DEEP).join("file"))
        .map_err(|e| format!("stat the deep path: {}", ename(&e)))?;
    let n = std::fs::read_dir(root.join("many"))
        .map_err(|e| format!("readdir: {}", ename(&e)))?
        .count();
    if n != 300 {
        return Err(format!("readdir: {n} entries, want 300"));
    }
    Ok(())
}

#[test]
fn the_daemon_runs_out_of_file_descriptors() {
    if !require_root_and_fuse() {
        return;
    }
    // Our own limit must not be what runs out (raised with prlimit(1): nix's resource
    // module is not enabled in this crate).
    let (soft, hard) = nofile_limits(std::process::id());
    if soft < 4096 {
        let me = std::process::id().to_string();
        let out = run(
            "prlimit",
            &[
                "--pid".as_ref(),
                me.as_ref(),
                format!("--nofile={}:{hard}", hard.min(4096)).as_ref(),
            ],
        );
        assert!(out.status.success(), "cannot raise the test's own fd limit");
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    for i in 0..300 {
        lower.file(&format!("many/f{i:03}"), format!("lower file {i}\n"));
    }
    lower.file(&format!("{DEEP}/file"), b"deep");
    lower.dir("new");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let target = scratch.dir("m");
    let mut args: Vec<OsString> = vec!["--nofile=64:64".into(), our_bin().into(), "-o".into()];
    args.push(overlay_options(&[lower.root()], Some((&u, &w)), &[]).into());
    args.push(target.clone().into());
    let m = DaemonMount::start(Path::new("prlimit"), &args, &target, false)
        .unwrap_or_else(|e| panic!("mounting ours under prlimit failed: {e}"));
    let pid = m.daemon_pid();
    let limits = pid.map(|p| nofile_limits(p.as_raw() as u32));
    assert_eq!(
        limits,
        Some((64, 64)),
        "the daemon's open file limit (soft, hard) is not 64:64"
    );
    let root = m.path().to_path_buf();

    // Open files until an open fails: reads of lower files, opens for writing (copy-ups) and
    // creations, in turn.
    let mut held: Vec<File> = Vec::new();
    let mut first_failure = None;
    let kinds = [
        "open a lower file to read",
        "open a lower file to write",
        "create",
    ];
    for i in 0..300 {
        let kind = i % 3;
        let r = match kind {
            0 => File::open(root.join(format!("many/f{i:03}"))),
            1 => OpenOptions::new()
                .append(true)
                .open(root.join(format!("many/f{i:03}"))),
            _ => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(root.join(format!("new/n{i:03}"))),
        };
        match r {
            Ok(f) => held.push(f),
            Err(e) => {
                first_failure = Some((i, kinds[kind], e));
                break;
            }
        }
    }
    let mut problems = Vec::new();
    let sensible = [libc::EMFILE, libc::ENFILE, libc::ENOMEM];
    match &first_failure {
        Some((i, kind, e)) => {
            eprintln!(
                "nofile 64: {} files held open, then \"{kind}\" (#{i}) failed with {}",
                held.len(),
                ename(e)
            );
            if !e.raw_os_error().is_some_and(|c| sensible.contains(&c)) {
                problems.push(format!(
                    "{kind} with the daemon out of fds: {} (want EMFILE, ENFILE or ENOMEM)",
                    ename(e)
                ));
            }
        }
        None => eprintln!(
            "nofile 64: all {} opens succeeded: the daemon never ran out",
            held.len()
        ),
    }
    // While exhausted, every kind of request fails cleanly or works.
    if first_failure.is_some() {
        let tries: Vec<(&str, std::io::Result<()>)> = vec![
            ("open to read", File::open(root.join("many/f299")).map(drop)),
            (
                "open to write",
                OpenOptions::new()
                    .append(true)
                    .open(root.join("many/f298"))
                    .map(drop),
            ),
            ("create", File::create(root.join("new/exhausted")).map(drop)),
            (
                "stat a deep path",
                std::fs::metadata(root.join(DEEP).join("file")).map(drop),
            ),
            (
                "readdir",
                std::fs::read_dir(root.join("many")).map(|rd| {
                    let _ = rd.count();
                }),
            ),
            ("mkdir", std::fs::create_dir(root.join("new/dir"))),
        ];
        for (what, r) in tries {
            eprintln!("  while exhausted: {what}: {}", show(&r));
            if let Err(e) = &r
                && !e
                    .raw_os_error()
                    .is_some_and(|c| sensible.contains(&c) || c == libc::EEXIST)
            {
                problems.push(format!("while exhausted: {what}: {}", ename(e)));
            }
        }
    }
    if !daemon_alive(pid) || !is_mounted(&root) {
        problems.push("the daemon died or the mount went away when it ran out of fds".into());
    }
    drop(held);

    // Recovery: the kernel releases the closed files asynchronously, so poll.
    let started = Instant::now();
    let mut last = Err(String::new());
    let recovered = poll_until(wait_deadline(), || {
        last = works_again(&root, &lower);
        last.is_ok()
    });
    eprintln!(
        "nofile 64: after closing, the mount works again: {recovered} ({:?}; last: {last:?})",
        started.elapsed()
    );
    if !recovered {
        problems.push(format!("the mount did not recover: {last:?}"));
    }
    // Opens for writing that failed copied nothing partial.
    for i in 0..300 {
        let rel = format!("many/f{i:03}");
        if std::fs::read(root.join(&rel)).ok() != std::fs::read(lower.path(&rel)).ok() {
            problems.push(format!("{rel} differs from its lower original"));
        }
    }
    if !daemon_alive(pid) {
        problems.push("the daemon is not alive after recovery".into());
    }
    let ended = m.unmount();
    if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted {
        problems.push(format!("unmount: {ended:?}"));
    }
    let left = entries(&w.join("work"));
    if !left.is_empty() {
        problems.push(format!("<workdir>/work holds {left:?}"));
    }
    assert!(
        problems.is_empty(),
        "nofile 64:\n  {}",
        problems.join("\n  ")
    );
}

/// A soft limit below the hard one is raised to the hard one at start-up: the daemon then
/// serves more open files than the soft limit it was started with would allow.
#[test]
fn the_open_file_limit_is_raised_at_start_up() {
    if !require_root_and_fuse() {
        return;
    }
    const HELD: usize = 300;
    let (soft, hard) = nofile_limits(std::process::id());
    if soft < 2 * HELD as u64 {
        let me = std::process::id().to_string();
        let out = run(
            "prlimit",
            &[
                "--pid".as_ref(),
                me.as_ref(),
                format!("--nofile={}:{hard}", hard.min(4096)).as_ref(),
            ],
        );
        assert!(out.status.success(), "cannot raise the test's own fd limit");
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    for i in 0..HELD {
        lower.file(&format!("many/f{i:03}"), format!("lower file {i}\n"));
    }
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let target = scratch.dir("m");
    let mut args: Vec<OsString> = vec!["--nofile=64:2048".into(), our_bin().into(), "-o".into()];
    args.push(overlay_options(&[lower.root()], Some((&u, &w)), &[]).into());
    args.push(target.clone().into());
    let m = DaemonMount::start(Path::new("prlimit"), &args, &target, false)
        .unwrap_or_else(|e| panic!("mounting ours under prlimit failed: {e}"));
    let pid = m.daemon_pid().expect("daemon pid");
    assert_eq!(
        nofile_limits(pid.as_raw() as u32),
        (2048, 2048),
        "started with 64:2048, the daemon's open file limit (soft, hard) is not raised to 2048"
    );
    // More files open at once than 64 descriptors could serve: reads, and writes (copy-ups).
    let mut held = Vec::new();
    for i in 0..HELD {
        let p = m.path().join(format!("many/f{i:03}"));
        let r = if i % 2 == 0 {
            File::open(&p)
        } else {
            OpenOptions::new().read(true).append(true).open(&p)
        };
        match r {
            Ok(f) => held.push(f),
            Err(e) => panic!("open #{i} of {HELD} held files failed: {}", ename(&e)),
        }
    }
    for (i, f) in held.iter().enumerate() {
        let mut b = vec![0u8; 64];
        let n = f.read_at(&mut b, 0).expect("read a held file");
        assert_eq!(&b[..n], format!("lower file {i}\n").as_bytes());
    }
    drop(held);
    let ended = m.unmount();
    assert!(
        ended.daemon == DaemonExit::Exited(0) && !ended.left_mounted,
        "unmount: {ended:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// (c) Lazy unmount.

fn lazy_unmount(path: &Path) -> String {
    let out = run("umount", &["-l".as_ref(), path.as_os_str()]);
    if out.status.success() {
        "ok".into()
    } else {
        format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// Opens files, detaches the mount, keeps using the open files, closes them. Returns what
/// each step gave.
fn use_across_lazy_unmount(root: &Path) -> Vec<String> {
    let mut steps = Vec::new();
    let fr = File::open(root.join("r")).expect("open r");
    let mut fw = File::create(root.join("w")).expect("create w");
    fw.write_all(b"before;").expect("write w");
    let frw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("rw"))
        .expect("open rw");
    let dir: OwnedFd = nix::fcntl::open(root, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
        .expect("open the mount root");

    steps.push(format!("umount -l: {}", lazy_unmount(root)));
    steps.push(format!("still mounted: {}", is_mounted(root)));
    let mut buf = vec![0u8; 10];
    steps.push(format!(
        "read the lower file at 1000: {}",
        match fr.read_at(&mut buf, 1000) {
            Ok(n) => format!("{n} bytes {:?}", &buf[..n]),
            Err(e) => ename(&e),
        }
    ));
    steps.push(format!(
        "append to the new file and fsync: {}",
        show(&fw.write_all(b"after").and_then(|()| fw.sync_all()))
    ));
    steps.push(format!(
        "pwrite the copied-up file: {}",
        show(&frw.write_all_at(b"XYZ", 2))
    ));
    let mut b3 = [0u8; 8];
    steps.push(format!(
        "pread it back: {}",
        match frw.read_at(&mut b3, 0) {
            Ok(n) => format!("{:?}", String::from_utf8_lossy(&b3[..n])),
            Err(e) => ename(&e),
        }
    ));
    let through_dir = openat(dir.as_fd(), "r", OFlag::O_RDONLY, Mode::empty())
        .map(File::from)
        .and_then(|mut f| {
            let mut s = Vec::new();
            f.read_to_end(&mut s)
                .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
            Ok(s.len())
        });
    steps.push(format!(
        "open r relative to a dir fd of the detached root: {}",
        match through_dir {
            Ok(n) => format!("{n} bytes"),
            Err(e) => format!("{:?}", e),
        }
    ));
    steps.push(format!(
        "open r by path: {}",
        show(&File::open(root.join("r")))
    ));
    steps.push(format!("fstat w: {}", show(&fw.metadata())));
    steps
}

#[test]
fn lazy_unmount_with_files_open() {
    if !require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    lower.file("r", Rng::new(7).bytes(65536));
    lower.file("rw", b"0123456789");
    let side = |kernel: bool| -> (Vec<String>, Vec<String>, String) {
        let tag = if kernel { "k" } else { "o" };
        let (u, w) = (
            scratch.dir(&format!("u{tag}")),
            scratch.dir(&format!("w{tag}")),
        );
        let mut problems = Vec::new();
        let steps = if kernel {
            let m = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_OPTS);
            let steps = use_across_lazy_unmount(m.path());
            if is_mounted(m.path()) {
                problems.push("kernel: still mounted after the files were closed".into());
            }
            drop(m);
            steps
        } else {
            let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
            let pid = m.daemon_pid();
            let path = m.path().to_path_buf();
            let steps = use_across_lazy_unmount(&path);
            // The files are closed: the daemon must end on its own, cleanly.
            let gone = poll_until(wait_deadline(), || !daemon_alive(pid));
            if !gone {
                problems.push("the daemon still runs after the last file was closed".into());
            }
            let ended = m.unmount();
            if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted || is_mounted(&path) {
                problems.push(format!("daemon exit / mount after lazy unmount: {ended:?}"));
            }
            steps
        };
        let upper = format!(
            "upper w: {:?}, upper rw: {:?}",
            std::fs::read_to_string(u.join("w")).unwrap_or_default(),
            std::fs::read_to_string(u.join("rw")).unwrap_or_default()
        );
        (steps, problems, upper)
    };
    let (k_steps, k_problems, k_upper) = side(true);
    let (o_steps, mut problems, o_upper) = side(false);
    for (k, o) in k_steps.iter().zip(&o_steps) {
        eprintln!("  kernel: {k}\n  ours:   {o}");
        if k != o {
            problems.push(format!(
                "differs from the kernel:\n    kernel: {k}\n    ours:   {o}"
            ));
        }
    }
    eprintln!("  kernel: {k_upper}\n  ours:   {o_upper}");
    if k_upper != o_upper {
        problems.push(format!(
            "upper differs:\n    kernel: {k_upper}\n    ours:   {o_upper}"
        ));
    }
    assert!(k_problems.is_empty(), "kernel side: {k_problems:?}");
    assert!(
        problems.is_empty(),
        "lazy unmount:\n  {}",
        problems.join("\n  ")
    );
}

/// Four threads doing I/O through open files and a dir fd of the root when the mount is
/// lazily detached with `how`.
fn unmount_while_busy(how: &str) {
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.dir("l"));
    for t in 0..4 {
        lower.file(&format!("t{t}/data"), Rng::new(t).bytes(256 * 1024));
    }
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &[]);
    let pid = m.daemon_pid();
    let root = m.path().to_path_buf();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..4).map(|_| AtomicU64::new(0)).collect());
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let dir: OwnedFd = nix::fcntl::open(
                &root.join(format!("t{t}")),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .expect("open the thread's directory");
            let data = OpenOptions::new()
                .read(true)
                .write(true)
                .open(root.join(format!("t{t}/data")))
                .expect("open data");
            let (stop, counts) = (stop.clone(), counts.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(100 + t as u64);
                let mut errors = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let r: std::io::Result<()> = match i % 4 {
                        0 => {
                            let off = rng.below(256 * 1024 - 4096);
                            data.write_all_at(&rng.bytes(4096), off)
                        }
                        1 => {
                            let mut b = vec![0u8; 8192];
                            data.read_at(&mut b, rng.below(200 * 1024)).map(drop)
                        }
                        2 => {
                            let name = format!("f{}", i % 16);
                            openat(
                                dir.as_fd(),
                                name.as_str(),
                                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_TRUNC,
                                Mode::from_bits_truncate(0o644),
                            )
                            .map(File::from)
                            .map_err(std::io::Error::from)
                            .and_then(|mut f| f.write_all(b"some bytes"))
                        }
                        _ => nix::sys::stat::fstatat(
                            dir.as_fd(),
                            "data",
                            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                        )
                        .map(drop)
                        .map_err(std::io::Error::from),
                    };
                    if let Err(e) = r
                        && errors.len() < 10
                    {
                        errors.push(format!("thread {t} op {}: {}", i % 4, ename(&e)));
                    }
                    i += 1;
                    counts[t].fetch_add(1, Ordering::Relaxed);
                }
                errors
            })
        })
        .collect();
    let all_past = |n: &[u64]| {
        counts
            .iter()
            .zip(n)
            .all(|(c, n)| c.load(Ordering::Relaxed) >= *n)
    };
    assert!(
        poll_until(wait_deadline(), || all_past(&[50; 4])),
        "the workers did not get going"
    );
    let at_unmount: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let out = match how {
        "umount -l" => run("umount", &["-l".as_ref(), root.as_os_str()]),
        _ => run("fusermount3", &["-uz".as_ref(), root.as_os_str()]),
    };
    let mut problems = Vec::new();
    if !out.status.success() {
        problems.push(format!(
            "{how} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if is_mounted(&root) {
        problems.push(format!("still in mountinfo after {how}"));
    }
    // Requests keep flowing through the open files after the detach.
    let want: Vec<u64> = at_unmount.iter().map(|n| n + 200).collect();
    let kept_going = poll_until(wait_deadline(), || all_past(&want));
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for wk in workers {
        errors.extend(wk.join().expect("worker panicked"));
    }
    let total: u64 = counts.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    eprintln!(
        "{how} while busy: {total} operations, {} before the detach; errors: {errors:?}",
        at_unmount.iter().sum::<u64>()
    );
    if !kept_going {
        problems.push("the open files stopped working after the detach".into());
    }
    if !errors.is_empty() {
        problems.push(format!("I/O errors: {errors:?}"));
    }
    // Every file is closed now (the threads owned them): the daemon ends by itself.
    if !poll_until(wait_deadline(), || !daemon_alive(pid)) {
        problems.push("the daemon still runs after the last file was closed".into());
    }
    let ended = m.unmount();
    if ended.daemon != DaemonExit::Exited(0) || ended.left_mounted || is_mounted(&root) {
        problems.push(format!("daemon exit / mount: {ended:?}"));
    }
    assert!(
        problems.is_empty(),
        "{how} while busy:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn umount_lazy_while_busy() {
    if !require_root_and_fuse() {
        return;
    }
    unmount_while_busy("umount -l");
}

#[test]
fn fusermount_lazy_while_busy() {
    if !require_root_and_fuse() {
        return;
    }
    unmount_while_busy("fusermount3 -uz");
}
