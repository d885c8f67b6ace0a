//! Shared helpers for the mounted integration tests: mount guards for our daemon, the kernel's
//! overlayfs and fuse-overlayfs (each unmounts in `Drop`), scratch directories short enough for
//! 128 layers, layer builders for every on-disk overlay format, a seeded stack generator, and a
//! tree snapshot with a field-by-field comparison.
//!
//! Every test binary compiles this module and uses a different part of it.
#![allow(dead_code, unused_imports)]

pub mod contents;
pub mod layers;
pub mod mountinfo;
pub mod mounts;
pub mod ops;
pub mod prng;
pub mod snapshot;
pub mod stackgen;
pub mod xattr;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use layers::{Layer, Xflavor};
pub use mounts::{
    DaemonExit, DaemonMount, Ended, FuseOverlayfsMount, KernelMount, OurMount, TmpfsMount, Unmount,
    lowerdir_option, mount_fuse_overlayfs, mount_kernel, mount_ours,
};
pub use scratch::Scratch;
pub use snapshot::{CompareOpts, InoMap, Snapshot, SnapshotOpts};

pub mod scratch;

/// The binary under test: `RSFS_TEST_BIN` when set (e.g. `/usr/bin/fuse-overlayfs`, which has
/// the same command line), else the one cargo built.
pub fn our_bin() -> PathBuf {
    match std::env::var_os("RSFS_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_rsfs-overlay")),
    }
}

/// Whether `RSFS_TEST_BIN` replaced our binary (tests of our own text, like `-V`, relax then).
pub fn bin_is_overridden() -> bool {
    std::env::var_os("RSFS_TEST_BIN").is_some_and(|p| !p.is_empty())
}

/// The fstype a FUSE mount of `bin` shows in mountinfo: `fuse.<program name>`.
pub fn fstype_of(bin: &Path) -> String {
    let name = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("fuse.{name}")
}

pub fn our_fstype() -> String {
    fstype_of(&our_bin())
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Mounted tests need /dev/fuse. Without it they skip, except under CI (`CI=true`), where a
/// missing /dev/fuse is a failure.
pub fn require_fuse() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    if under_ci() {
        panic!("/dev/fuse is missing: the mounted tests cannot run (CI=true makes this a failure)");
    }
    eprintln!("SKIP: /dev/fuse is missing, mounted test skipped");
    false
}

/// Differential tests mount the kernel's overlayfs and build layers with trusted.* xattrs and
/// whiteout devices: they need root (and /dev/fuse for our side). Same skip/fail policy.
pub fn require_root_and_fuse() -> bool {
    if !require_fuse() {
        return false;
    }
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if under_ci() {
        panic!("mounted differential tests need root (CI=true makes this a failure)");
    }
    eprintln!("SKIP: not root, mounted differential test skipped");
    false
}

/// How long any single wait in the harness (a mount to appear, a daemon to exit) may take.
pub fn wait_deadline() -> Duration {
    Duration::from_secs(30)
}

/// Poll `cond` every few milliseconds until it holds or `timeout` passes. Returns whether it held.
/// This is the only way tests wait: never a fixed sleep standing in for synchronisation.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Run a command to completion, capturing its output. Panics only if it cannot be started.
pub fn run(program: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// `OsString` from anything path-like, for building argument lists.
pub fn os(s: impl AsRef<std::ffi::OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// What a finished (or killed) command did.
#[derive(Debug)]
pub struct Outcome {
    /// `None` if it was killed for running past the timeout.
    pub status: Option<std::process::ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

/// Run `bin args...` with output to files (a daemon that keeps them open cannot hang us) and a
/// timeout after which it is killed.
pub fn run_with_timeout(bin: &Path, args: &[OsString], timeout: Duration) -> Outcome {
    run_with_timeout_env(bin, args, &[], timeout)
}

/// [`run_with_timeout`] with extra environment variables.
pub fn run_with_timeout_env<A: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[A],
    env: &[(&str, &std::ffi::OsStr)],
    timeout: Duration,
) -> Outcome {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
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
        let mut s = String::new();
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    Outcome {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// Run our binary on a setup it must refuse: non-zero exit, exactly one non-empty line on
/// stderr mentioning at least one of `needles`, nothing mounted at `target` or under `scratch`.
pub fn expect_refused(scratch: &Scratch, args: &[OsString], target: &Path, needles: &[&str]) {
    let out = run_with_timeout(&our_bin(), args, wait_deadline());
    let mounted = mountinfo::mount_at(target).is_some()
        || !mountinfo::mounts_under(scratch.path()).is_empty();
    if mounted {
        for m in mountinfo::mounts_under(scratch.path()) {
            mounts::force_unmount(&m.mount_point);
        }
        mounts::force_unmount(target);
    }
    let mut problems = Vec::new();
    match out.status {
        None => problems.push("did not exit within the timeout (killed)".to_string()),
        Some(s) if s.success() => problems.push("exited 0".to_string()),
        Some(_) => {}
    }
    if mounted {
        problems.push("left a mount behind".to_string());
    }
    let err = out.stderr.trim_end_matches('\n');
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 || lines[0].trim().is_empty() {
        problems.push(format!("stderr has {} lines, want exactly 1", lines.len()));
    }
    if !needles.iter().any(|n| err.contains(n)) {
        problems.push(format!("stderr mentions none of {needles:?}"));
    }
    assert!(
        problems.is_empty(),
        "{} {:?}: {}\n  exit: {:?}\n  stderr: {:?}",
        our_bin().display(),
        args,
        problems.join("; "),
        out.status,
        out.stderr
    );
}
