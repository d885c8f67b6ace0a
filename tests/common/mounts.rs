//! Mount guards. Each guard unmounts in `Drop` (`umount`, then `fusermount3 -u`, then `umount -l`
//! as the last resort), waits for its daemon, and only then lets its own mountpoint directory go;
//! a mountpoint that is somehow still mounted is leaked, never removed.
//!
//! Daemonized FUSE mounts: the test process makes itself a child subreaper, so the daemon that
//! the binary forks off is re-parented to us and its exit status can be collected like a child's.
//! A watchdog kills a daemon that is still mounted after `RSFS_TEST_MOUNT_TIMEOUT` seconds
//! (default 300), so a hung request fails the test (ENOTCONN) instead of hanging the suite.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::mountinfo::{is_mounted, mount_at};
use super::{our_bin, poll_until, wait_deadline};

/// How a mount is ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmount {
    /// `umount PATH`
    Umount,
    /// `fusermount3 -u PATH`
    Fusermount,
    /// A signal to the daemon (SIGTERM, SIGINT), which must unmount and exit 0.
    Signal(Signal),
}

/// How the daemon process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonExit {
    Exited(i32),
    Signaled(i32),
    /// It did not exit within the deadline and was killed with SIGKILL.
    Hung,
    /// The daemon's pid could not be found (it was not re-parented to us).
    Unknown,
}

/// What ending a mount looked like.
#[derive(Debug)]
pub struct Ended {
    pub daemon: DaemonExit,
    /// The unmount command (if one was used) exited 0.
    pub command_ok: bool,
    pub command_stderr: String,
    /// The mount was still present once the daemon had ended (it was then removed by force).
    pub left_mounted: bool,
    /// Everything the daemon and its launcher wrote to stderr.
    pub stderr: String,
}

fn unmount_cmd(program: &str, args: &[&OsStr]) -> (bool, String) {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, format!("cannot run {program}: {e}")),
    }
}

/// Remove every mount at `path`, whatever it takes. Never panics.
pub fn force_unmount(path: &Path) {
    for _ in 0..8 {
        if !is_mounted(path) {
            return;
        }
        let p = path.as_os_str();
        if unmount_cmd("umount", &[p]).0 {
            continue;
        }
        if unmount_cmd("fusermount3", &[OsStr::new("-u"), p]).0 {
            continue;
        }
        let _ = unmount_cmd("umount", &[OsStr::new("-l"), p]);
    }
    if is_mounted(path) {
        eprintln!("warning: could not unmount {}", path.display());
    }
}

/// Escape one layer path for an overlay option string: `:` and `,` are separators there.
pub fn escape_layer(p: &Path) -> String {
    let s = p.to_str().expect("layer paths in tests are UTF-8");
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == ':' || c == ',' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `lowerdir=L0:L1:...`, topmost first.
pub fn lowerdir_option(lowers: &[&Path]) -> String {
    let parts: Vec<String> = lowers.iter().map(|p| escape_layer(p)).collect();
    format!("lowerdir={}", parts.join(":"))
}

/// The full `-o` value: lowerdir, then upperdir/workdir if given, then `extra` as given.
pub fn overlay_options(
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra: &[&str],
) -> String {
    let mut opts = vec![lowerdir_option(lowers)];
    if let Some((u, w)) = upper_work {
        opts.push(format!("upperdir={}", escape_layer(u)));
        opts.push(format!("workdir={}", escape_layer(w)));
    }
    opts.extend(extra.iter().map(|s| s.to_string()));
    opts.join(",")
}

fn own_mountpoint() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rsm")
        .rand_bytes(6)
        .tempdir_in("/tmp")
        .expect("create mountpoint dir")
}

fn ensure_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("warning: cannot become a child subreaper ({e}); daemon exit codes unknown");
        }
    });
}

fn read_all(f: &mut Option<File>) -> String {
    let Some(f) = f.as_mut() else {
        return String::new();
    };
    let mut s = String::new();
    let _ = f.seek(SeekFrom::Start(0));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    s.push_str(&String::from_utf8_lossy(&buf));
    s
}

fn proc_ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(1)?.parse().ok()
}

fn proc_args(pid: i32) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Our children (including re-parented orphans) whose command line names `target`.
fn find_daemon(target: &Path) -> Option<Pid> {
    let me = std::process::id() as i32;
    let want = target.as_os_str().as_bytes();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if proc_ppid(pid) != Some(me) {
            continue;
        }
        if proc_args(pid).iter().any(|a| a == want) {
            found.push(pid);
        }
    }
    found.sort();
    found.last().map(|p| Pid::from_raw(*p))
}

fn status_to_exit(s: ExitStatus) -> DaemonExit {
    match (s.code(), s.signal()) {
        (Some(c), _) => DaemonExit::Exited(c),
        (None, Some(sig)) => DaemonExit::Signaled(sig),
        _ => DaemonExit::Unknown,
    }
}

fn mount_timeout() -> Duration {
    let secs = std::env::var("RSFS_TEST_MOUNT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

fn start_watchdog(target: PathBuf, pid: Pid) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let timeout = mount_timeout();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
            let still_ours = proc_args(pid.as_raw())
                .iter()
                .any(|a| a == target.as_os_str().as_bytes());
            if still_ours {
                eprintln!(
                    "watchdog: {} still mounted after {timeout:?}: killing daemon {pid}",
                    target.display()
                );
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    });
    tx
}

/// A FUSE overlay daemon (ours or fuse-overlayfs) mounted at `path()`.
pub struct DaemonMount {
    bin: PathBuf,
    path: PathBuf,
    /// The foreground process (`-f`); `None` for a daemonized mount.
    child: Option<Child>,
    /// The serving process: the foreground child, or the daemon found after daemonizing.
    pid: Option<Pid>,
    stderr: Option<File>,
    ended: bool,
    watchdog: Option<mpsc::Sender<()>>,
    own_mountpoint: Option<tempfile::TempDir>,
    /// Daemonized: the mount was already in mountinfo when the launcher exited.
    mounted_at_exit: bool,
}

/// Our binary's mount guard.
pub type OurMount = DaemonMount;
/// fuse-overlayfs's mount guard, for compatibility tests and benchmarks.
pub type FuseOverlayfsMount = DaemonMount;

impl DaemonMount {
    /// Run `bin args...` and wait until `target` is a FUSE mount. With `foreground` the process
    /// is expected to keep running (`-f` must be among `args`); otherwise it must exit 0 once the
    /// mount is ready, leaving a daemon behind. On failure nothing stays mounted.
    pub fn start(
        bin: &Path,
        args: &[OsString],
        target: &Path,
        foreground: bool,
    ) -> Result<DaemonMount, String> {
        ensure_subreaper();
        let stdout = tempfile::tempfile().map_err(|e| e.to_string())?;
        let stderr = tempfile::tempfile().map_err(|e| e.to_string())?;
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(stderr.try_clone().map_err(|e| e.to_string())?))
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let mut m = DaemonMount {
            bin: bin.to_path_buf(),
            path: target.to_path_buf(),
            child: None,
            pid: None,
            stderr: Some(stderr),
            ended: false,
            watchdog: None,
            own_mountpoint: None,
            mounted_at_exit: false,
        };
        let deadline = wait_deadline();
        let fuse_mounted = |p: &Path| mount_at(p).is_some_and(|e| e.fstype.starts_with("fuse"));
        if foreground {
            let mut exited = None;
            let ok = poll_until(deadline, || {
                if let Ok(Some(s)) = child.try_wait() {
                    exited = Some(s);
                    return true;
                }
                fuse_mounted(target)
            });
            if let Some(s) = exited {
                m.ended = true;
                force_unmount(target);
                return Err(format!(
                    "{} {:?} exited with {s} before mounting; stderr: {}",
                    bin.display(),
                    args,
                    read_all(&mut m.stderr)
                ));
            }
            m.pid = Some(Pid::from_raw(child.id() as i32));
            m.child = Some(child);
            if !ok {
                let err = format!(
                    "{} {:?}: {} not mounted after {deadline:?}; stderr: {}",
                    bin.display(),
                    args,
                    target.display(),
                    read_all(&mut m.stderr)
                );
                m.finish(Unmount::Umount);
                return Err(err);
            }
        } else {
            let mut status = None;
            poll_until(deadline, || {
                status = child.try_wait().ok().flatten();
                status.is_some()
            });
            let Some(status) = status else {
                let _ = child.kill();
                let _ = child.wait();
                m.ended = true;
                force_unmount(target);
                return Err(format!(
                    "{} {:?} did not return within {deadline:?}; stderr: {}",
                    bin.display(),
                    args,
                    read_all(&mut m.stderr)
                ));
            };
            m.pid = find_daemon(target);
            if !status.success() {
                m.ended = true;
                let err = format!(
                    "{} {:?} exited with {status}; stderr: {}",
                    bin.display(),
                    args,
                    read_all(&mut m.stderr)
                );
                force_unmount(target);
                m.reap(Duration::from_secs(5));
                return Err(err);
            }
            m.mounted_at_exit = fuse_mounted(target);
            if !poll_until(deadline, || fuse_mounted(target)) {
                let err = format!(
                    "{} {:?} exited 0 but {} is not a FUSE mount after {deadline:?}; stderr: {}",
                    bin.display(),
                    args,
                    target.display(),
                    read_all(&mut m.stderr)
                );
                m.finish(Unmount::Umount);
                return Err(err);
            }
        }
        if let Some(pid) = m.pid {
            m.watchdog = Some(start_watchdog(target.to_path_buf(), pid));
        }
        Ok(m)
    }

    /// Mount an overlay of `lowers` (topmost first) with `bin`'s usual command line:
    /// `bin [-f] -o lowerdir=...[,upperdir=..,workdir=..][,extra...] TARGET`.
    pub fn start_overlay(
        bin: &Path,
        target: Option<&Path>,
        lowers: &[&Path],
        upper_work: Option<(&Path, &Path)>,
        extra: &[&str],
        foreground: bool,
    ) -> Result<DaemonMount, String> {
        let (own, target) = match target {
            Some(t) => (None, t.to_path_buf()),
            None => {
                let d = own_mountpoint();
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
        };
        let mut args: Vec<OsString> = Vec::new();
        if foreground {
            args.push("-f".into());
        }
        args.push("-o".into());
        args.push(overlay_options(lowers, upper_work, extra).into());
        args.push(target.clone().into());
        let mut m = DaemonMount::start(bin, &args, &target, foreground)?;
        m.own_mountpoint = own;
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// For a daemonized mount: whether the mount was ready when the launching process exited
    /// (the contract: exit 0 only once the mount is ready).
    pub fn mounted_at_exit(&self) -> bool {
        self.mounted_at_exit
    }

    /// The process serving the mount, if known.
    pub fn daemon_pid(&self) -> Option<Pid> {
        self.pid
    }

    /// Unmount with `umount` and report how the daemon ended.
    pub fn unmount(mut self) -> Ended {
        self.finish(Unmount::Umount)
    }

    pub fn unmount_with(mut self, how: Unmount) -> Ended {
        self.finish(how)
    }

    /// Wait for the serving process to exit; SIGKILL it after `timeout`.
    fn reap(&mut self, timeout: Duration) -> DaemonExit {
        if let Some(child) = self.child.as_mut() {
            let mut status = None;
            poll_until(timeout, || {
                status = child.try_wait().ok().flatten();
                status.is_some()
            });
            return match status {
                Some(s) => status_to_exit(s),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    DaemonExit::Hung
                }
            };
        }
        let Some(pid) = self.pid else {
            return DaemonExit::Unknown;
        };
        let mut result = None;
        poll_until(timeout, || {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => result = Some(DaemonExit::Exited(code)),
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    result = Some(DaemonExit::Signaled(sig as i32))
                }
                Ok(_) => {}
                // Not our child after all: we can only see that it is gone.
                Err(_) => {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        result = Some(DaemonExit::Unknown)
                    }
                }
            }
            result.is_some()
        });
        match result {
            Some(r) => r,
            None => {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
                DaemonExit::Hung
            }
        }
    }

    fn finish(&mut self, how: Unmount) -> Ended {
        self.ended = true;
        self.watchdog.take();
        let p = self.path.clone();
        let (mut command_ok, mut command_stderr) = (true, String::new());
        let mut left_mounted = false;
        let daemon;
        match how {
            Unmount::Umount | Unmount::Fusermount => {
                (command_ok, command_stderr) = match how {
                    Unmount::Umount => unmount_cmd("umount", &[p.as_os_str()]),
                    _ => unmount_cmd("fusermount3", &[OsStr::new("-u"), p.as_os_str()]),
                };
                if is_mounted(&p) {
                    left_mounted = true;
                    force_unmount(&p);
                }
                daemon = self.reap(wait_deadline());
            }
            Unmount::Signal(sig) => {
                match self.pid {
                    Some(pid) => {
                        if let Err(e) = kill(pid, sig) {
                            command_ok = false;
                            command_stderr = format!("kill({pid}, {sig}): {e}");
                        }
                    }
                    None => {
                        command_ok = false;
                        command_stderr = "daemon pid unknown: cannot signal it".into();
                    }
                }
                daemon = self.reap(wait_deadline());
                if is_mounted(&p) {
                    left_mounted = true;
                    force_unmount(&p);
                }
            }
        }
        Ended {
            daemon,
            command_ok,
            command_stderr,
            left_mounted,
            stderr: read_all(&mut self.stderr),
        }
    }

    /// What the daemon (and its launcher) wrote to stderr so far.
    pub fn stderr(&mut self) -> String {
        read_all(&mut self.stderr)
    }
}

impl Drop for DaemonMount {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.finish(Unmount::Umount);
        }
        if is_mounted(&self.path) {
            force_unmount(&self.path);
        }
        if is_mounted(&self.path) {
            if let Some(d) = self.own_mountpoint.take() {
                let _ = d.keep();
            }
        }
    }
}

/// Our binary, daemonized, mounting an overlay on its own fresh mountpoint. Panics (with the
/// daemon's stderr) if the mount fails.
pub fn mount_ours(
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[&str],
) -> OurMount {
    DaemonMount::start_overlay(&our_bin(), None, lowers, upper_work, extra_opts, false)
        .unwrap_or_else(|e| panic!("mounting ours failed: {e}"))
}

/// Like `mount_ours` but at a given mountpoint.
pub fn mount_ours_at(
    target: &Path,
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[&str],
) -> OurMount {
    DaemonMount::start_overlay(
        &our_bin(),
        Some(target),
        lowers,
        upper_work,
        extra_opts,
        false,
    )
    .unwrap_or_else(|e| panic!("mounting ours failed: {e}"))
}

/// Our binary with `-f`: the guard keeps the process as a child.
pub fn mount_ours_foreground(
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[&str],
) -> OurMount {
    DaemonMount::start_overlay(&our_bin(), None, lowers, upper_work, extra_opts, true)
        .unwrap_or_else(|e| panic!("mounting ours (foreground) failed: {e}"))
}

pub fn fuse_overlayfs_bin() -> PathBuf {
    std::env::var_os("FUSE_OVERLAYFS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/fuse-overlayfs"))
}

/// fuse-overlayfs, daemonized, on its own fresh mountpoint.
pub fn mount_fuse_overlayfs(
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[&str],
) -> FuseOverlayfsMount {
    DaemonMount::start_overlay(
        &fuse_overlayfs_bin(),
        None,
        lowers,
        upper_work,
        extra_opts,
        false,
    )
    .unwrap_or_else(|e| panic!("mounting fuse-overlayfs failed: {e}"))
}

/// The kernel's overlayfs (`mount -t overlay`).
pub struct KernelMount {
    path: PathBuf,
    ended: bool,
    own_mountpoint: Option<tempfile::TempDir>,
}

impl KernelMount {
    pub fn try_mount(
        target: Option<&Path>,
        lowers: &[&Path],
        upper_work: Option<(&Path, &Path)>,
        extra: &[&str],
    ) -> Result<KernelMount, String> {
        let (own, target) = match target {
            Some(t) => (None, t.to_path_buf()),
            None => {
                let d = own_mountpoint();
                let p = d.path().to_path_buf();
                (Some(d), p)
            }
        };
        let opts = overlay_options(lowers, upper_work, extra);
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(&opts)
            .arg(&target)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            force_unmount(&target);
            return Err(format!(
                "mount -t overlay -o {opts} {}: {}; {}",
                target.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(KernelMount {
            path: target,
            ended: false,
            own_mountpoint: own,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmount; true if `umount` succeeded. EBUSY is retried for a few seconds: a test thread
    /// that forks a process (our daemon, a tool) while another holds a file open in this mount
    /// gives the child a copy of that descriptor until it execs, which keeps the mount busy
    /// for that instant even though the descriptor is close-on-exec.
    pub fn unmount(mut self) -> bool {
        self.ended = true;
        let ok = super::poll_until(Duration::from_secs(5), || {
            unmount_cmd("umount", &[self.path.as_os_str()]).0 || !is_mounted(&self.path)
        });
        force_unmount(&self.path);
        ok
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if !self.ended {
            force_unmount(&self.path);
        }
        if is_mounted(&self.path) {
            if let Some(d) = self.own_mountpoint.take() {
                let _ = d.keep();
            }
        }
    }
}

/// The kernel's overlayfs on a fresh mountpoint. Panics if the kernel refuses.
pub fn mount_kernel(
    lowers: &[&Path],
    upper_work: Option<(&Path, &Path)>,
    extra_opts: &[&str],
) -> KernelMount {
    KernelMount::try_mount(None, lowers, upper_work, extra_opts)
        .unwrap_or_else(|e| panic!("kernel overlay mount failed: {e}"))
}

/// A small tmpfs, for setups that need a second filesystem.
pub struct TmpfsMount {
    path: PathBuf,
}

impl TmpfsMount {
    pub fn new(target: &Path) -> TmpfsMount {
        Self::with_options(target, "size=16m")
    }

    /// A tmpfs with the given mount options (`size=`, `nr_inodes=`).
    pub fn with_options(target: &Path, opts: &str) -> TmpfsMount {
        std::fs::create_dir_all(target).expect("mkdir tmpfs target");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(target)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            target.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        TmpfsMount {
            path: target.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        force_unmount(&self.path);
    }
}
