//! POSIX record locks and flock(2) through the mount behave as on kernel overlayfs: a lock
//! held by one process makes a conflicting non-blocking request from another fail, a shared
//! lock admits other shared ones, and closing the holder's file releases it. We implement no
//! lock requests, so the kernel's FUSE client keeps the locks itself, one host-wide table per
//! mount, exactly as it does for the kernel's overlay inode.

mod common;

use std::fs::{self, File, OpenOptions};
use std::path::Path;
use std::process::Command;

use nix::fcntl::{FcntlArg, Flock, FlockArg, fcntl};

use common::{Layer, Scratch, mount_kernel, mount_ours};

/// What another process gets when it asks, without waiting, for a lock on `path`:
/// `"ok"` or `"busy"`. `kind` is `flock-sh`, `flock-ex`, `posix-rd` or `posix-wr`.
fn other_process_tries(path: &Path, kind: &str) -> String {
    let script = r#"
import fcntl, sys
kind, path = sys.argv[1], sys.argv[2]
mode = 'r+' if kind == 'posix-wr' else 'r'
with open(path, mode) as f:
    op = {'flock-sh': fcntl.LOCK_SH, 'flock-ex': fcntl.LOCK_EX,
          'posix-rd': fcntl.LOCK_SH, 'posix-wr': fcntl.LOCK_EX}[kind] | fcntl.LOCK_NB
    try:
        if kind.startswith('flock'):
            fcntl.flock(f, op)
        else:
            fcntl.lockf(f, op, 10, 0)
        print('ok')
    except BlockingIOError:
        print('busy')
    except PermissionError:
        print('busy')
"#;
    let out = Command::new("python3")
        .args(["-c", script, kind])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 lock probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Takes a flock on a new open of `path`; dropping the result releases it.
fn flock(path: &Path, arg: FlockArg) -> Flock<File> {
    let f = File::open(path).expect("open for flock");
    Flock::lock(f, arg).map_err(|(_, e)| e).expect("flock")
}

fn posix_lock(f: &File, kind: libc::c_short) {
    let lock = libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 10,
        l_pid: 0,
    };
    fcntl(f, FcntlArg::F_SETLK(&lock)).expect("fcntl(F_SETLK)");
}

/// Every probe's answer on the mount at `root`, in order, for comparison across mounts.
fn lock_outcomes(root: &Path) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut probe = |what: &str, path: &Path, kind: &str| {
        seen.push((format!("{what} / {kind}"), other_process_tries(path, kind)));
    };
    // A lower file (locking never copies it up) and an upper file.
    for name in ["lower-file", "upper-file"] {
        let path = root.join(name);
        {
            let _held = flock(&path, FlockArg::LockExclusiveNonblock);
            probe(&format!("{name}: flock ex held"), &path, "flock-sh");
            probe(&format!("{name}: flock ex held"), &path, "flock-ex");
        }
        probe(&format!("{name}: flock released"), &path, "flock-ex");
        {
            let _held = flock(&path, FlockArg::LockSharedNonblock);
            probe(&format!("{name}: flock sh held"), &path, "flock-sh");
            probe(&format!("{name}: flock sh held"), &path, "flock-ex");
        }
        {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open for posix lock");
            posix_lock(&f, libc::F_WRLCK as libc::c_short);
            probe(&format!("{name}: posix write lock held"), &path, "posix-rd");
            probe(&format!("{name}: posix write lock held"), &path, "posix-wr");
        }
        probe(&format!("{name}: posix lock released"), &path, "posix-wr");
        {
            let f = File::open(&path).expect("open for read lock");
            posix_lock(&f, libc::F_RDLCK as libc::c_short);
            probe(&format!("{name}: posix read lock held"), &path, "posix-rd");
            probe(&format!("{name}: posix read lock held"), &path, "posix-wr");
        }
    }
    seen
}

#[test]
fn locks_behave_as_on_kernel_overlayfs() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    lower.file("lower-file", "0123456789 lower");
    let stack = |tag: &str| {
        let (u, w) = (
            scratch.dir(&format!("u-{tag}")),
            scratch.dir(&format!("w-{tag}")),
        );
        fs::write(u.join("upper-file"), "0123456789 upper").expect("upper file");
        (u, w)
    };
    let (ku, kw) = stack("kernel");
    let (ou, ow) = stack("ours");
    let kernel = {
        let k = mount_kernel(&[lower.root()], Some((&ku, &kw)), &[]);
        lock_outcomes(k.path())
    };
    let ours = {
        let m = mount_ours(&[lower.root()], Some((&ou, &ow)), &[]);
        lock_outcomes(m.path())
    };
    // The expected pattern, so a mount that ignored locks altogether cannot pass.
    let busy = kernel.iter().filter(|(_, r)| r == "busy").count();
    assert_eq!(busy, 12, "kernel overlayfs: {kernel:#?}");
    assert_eq!(ours, kernel, "lock outcomes differ from kernel overlayfs");
    // Only the open for writing (the write lock) copies the lower file up, on both.
    assert_eq!(
        ou.join("lower-file").exists(),
        ku.join("lower-file").exists(),
        "copy-up by locking differs from kernel overlayfs"
    );
}
