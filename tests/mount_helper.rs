//! mount(8) and /etc/fstab: `mount -t fuse.rsfs-overlay overlay /merged -o lowerdir=...` and an
//! fstab line of that type mount through fuse3's `mount.fuse3`, which runs
//! `rsfs-overlay overlay /merged -o ...` through /bin/sh; `umount` and `fusermount3 -u` unmount
//! and the daemon exits 0; `-o ro` (and a mount without upperdir) is read-only; a bad option makes
//! `mount` fail with our one-line error and leaves nothing mounted.
//!
//! mount.fuse3 finds the daemon on the shell's PATH (for root, with PATH reset, that starts with
//! /usr/local/sbin), so each test links `/usr/local/sbin/rsfs-overlay` to the binary under test
//! for its duration (`HelperLink`). The tests hold an exclusive lock on a file in /tmp while the
//! link exists, so they run one at a time even across processes (cargo test threads, nextest).
//! A file that is not a symlink at that path is never touched (the test panics instead); a
//! symlink left by a crashed run (pointing into a cargo target dir) is replaced and removed, any
//! other symlink is put back afterwards.
//!
//! Needs root, /dev/fuse, mount.fuse3 and fusermount3: missing ones skip the tests, except under
//! CI (`CI=true`), where they are failures.

mod common;

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Once, mpsc};
use std::time::Duration;

use common::mountinfo::{is_mounted, mount_at, mounts_under};
use common::mounts::force_unmount;
use common::{Layer, Outcome, Scratch, os, our_bin, poll_until, run_with_timeout, wait_deadline};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// Where mount.fuse3's shell finds `rsfs-overlay` first.
const HELPER_LINK: &str = "/usr/local/sbin/rsfs-overlay";
/// Serializes every test that needs `HELPER_LINK`, across threads and processes.
const LOCK_FILE: &str = "/tmp/.rsfs-overlay-mount-helper-tests.lock";
/// The filesystem type mount(8) is given, and mountinfo must show.
const FSTYPE: &str = "fuse.rsfs-overlay";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Root, /dev/fuse, mount.fuse3 and fusermount3, with the usual skip/fail policy.
fn require_helper_env() -> bool {
    if !common::require_root_and_fuse() {
        return false;
    }
    let dirs = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ];
    for cmd in ["mount.fuse3", "fusermount3", "mount", "umount"] {
        if dirs.iter().any(|d| Path::new(d).join(cmd).exists()) {
            continue;
        }
        if under_ci() {
            panic!("{cmd} is missing (install fuse3 / mount): CI=true makes this a failure");
        }
        eprintln!("SKIP: {cmd} is missing (install fuse3), mount helper test skipped");
        return false;
    }
    true
}

/// The binary under test, as the kernel reports it in /proc/PID/exe.
fn our_exe() -> PathBuf {
    std::fs::canonicalize(our_bin())
        .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", our_bin().display()))
}

/// Whether a symlink target looks like a cargo build output (`.../release/rsfs-overlay`), i.e.
/// a link left behind by a crashed run of these tests.
fn is_cargo_output(target: &Path) -> bool {
    let dir = target.parent().and_then(Path::file_name);
    dir.is_some_and(|d| d == "release" || d == "debug")
}

/// `/usr/local/sbin/rsfs-overlay` -> the binary under test while this guard lives, under an
/// exclusive lock. Drop removes the link (putting back a foreign symlink it replaced).
struct HelperLink {
    link: PathBuf,
    target: PathBuf,
    restore: Option<PathBuf>,
    _lock: Flock<File>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|e| panic!("open {LOCK_FILE}: {e}"));
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("flock {LOCK_FILE}: {e}"));
        let link = PathBuf::from(HELPER_LINK);
        let target = our_exe();
        let mut restore = None;
        match std::fs::symlink_metadata(&link) {
            Ok(md) if md.file_type().is_symlink() => {
                let old = std::fs::read_link(&link).unwrap_or_default();
                if old != target && !is_cargo_output(&old) {
                    restore = Some(old.clone());
                }
                eprintln!("note: replacing symlink {HELPER_LINK} -> {}", old.display());
                std::fs::remove_file(&link)
                    .unwrap_or_else(|e| panic!("remove old symlink {HELPER_LINK}: {e}"));
            }
            Ok(_) => panic!(
                "{HELPER_LINK} exists and is not a symlink (a real installation?); the mount \
                 helper tests put a symlink to the built binary there and will not replace it: \
                 move it away to run them"
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("stat {HELPER_LINK}: {e}"),
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        std::os::unix::fs::symlink(&target, &link)
            .unwrap_or_else(|e| panic!("symlink {HELPER_LINK} -> {}: {e}", target.display()));
        HelperLink {
            link,
            target,
            restore,
            _lock: lock,
        }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.link);
        }
        if let Some(old) = self.restore.take() {
            if let Err(e) = std::os::unix::fs::symlink(&old, &self.link) {
                eprintln!(
                    "warning: cannot restore {HELPER_LINK} -> {}: {e}",
                    old.display()
                );
            }
        }
    }
}

/// Everything a test needs before mounting through the helper; `None` means skip.
fn helper_env() -> Option<HelperLink> {
    if !require_helper_env() {
        return None;
    }
    static SUBREAPER: Once = Once::new();
    // The daemon forks off its launcher, which mount.fuse3's shell started; as a subreaper we
    // inherit the orphan and can collect its exit status.
    SUBREAPER.call_once(|| {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            eprintln!("warning: cannot become a child subreaper ({e}); daemon exit codes unknown");
        }
    });
    Some(HelperLink::install())
}

fn proc_args(pid: i32) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(<[u8]>::to_vec)
        .collect()
}

/// Live processes of the binary under test (by /proc/PID/exe, or by argv[0] named
/// rsfs-overlay) whose command line names `mountpoint`.
fn daemons_for(mountpoint: &Path) -> Vec<i32> {
    let exe = our_exe();
    let want = mountpoint.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let args = proc_args(pid);
        if !args.iter().any(|a| a == want) {
            continue;
        }
        let by_exe = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe);
        let by_name = args
            .first()
            .is_some_and(|a0| Path::new(std::ffi::OsStr::from_bytes(a0)).ends_with("rsfs-overlay"));
        if by_exe || by_name {
            found.push(pid);
        }
    }
    found.sort();
    found
}

/// How the daemon ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DaemonEnd {
    Exited(i32),
    Signaled(i32),
    /// Gone, but not our child: its status is unknown.
    GoneUnknown,
    /// Still running at the deadline (then killed).
    Hung,
}

/// Wait (poll with a deadline) for `pid` to end; SIGKILL it at the deadline.
fn wait_exit(pid: i32, timeout: Duration) -> DaemonEnd {
    let p = Pid::from_raw(pid);
    let mut result = None;
    poll_until(timeout, || {
        match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => result = Some(DaemonEnd::Exited(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => result = Some(DaemonEnd::Signaled(sig as i32)),
            Ok(_) => {}
            Err(_) => {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    result = Some(DaemonEnd::GoneUnknown);
                }
            }
        }
        result.is_some()
    });
    result.unwrap_or_else(|| {
        let _ = kill(p, Signal::SIGKILL);
        let _ = waitpid(p, None);
        DaemonEnd::Hung
    })
}

fn mount_timeout() -> Duration {
    let secs = std::env::var("RSFS_TEST_MOUNT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

/// Kills the daemon if the mount outlives `RSFS_TEST_MOUNT_TIMEOUT` (default 300 s), so a hung
/// request fails the test instead of hanging the suite. Stopped by dropping the sender.
fn start_watchdog(mountpoint: PathBuf, pid: i32) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let timeout = mount_timeout();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
            if proc_args(pid)
                .iter()
                .any(|a| a == mountpoint.as_os_str().as_bytes())
            {
                eprintln!(
                    "watchdog: {} still mounted after {timeout:?}: killing daemon {pid}",
                    mountpoint.display()
                );
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    });
    tx
}

/// Run a system command (mount, umount, fusermount3) with a deadline.
fn sys(program: &str, args: &[OsString]) -> Outcome {
    run_with_timeout(Path::new(program), args, wait_deadline())
}

fn describe(what: &str, out: &Outcome) -> String {
    format!(
        "{what}: exit {:?}; stdout {:?}; stderr {:?}",
        out.status, out.stdout, out.stderr
    )
}

/// A mount made through mount(8). Drop undoes it whatever happened (`umount`, `fusermount3 -u`,
/// `umount -l`) and reaps the daemon.
struct HelperMount {
    path: PathBuf,
    pid: Option<i32>,
    ended: bool,
    watchdog: Option<mpsc::Sender<()>>,
}

/// What unmounting looked like.
#[derive(Debug)]
struct Ended {
    how: &'static str,
    command: Outcome,
    left_mounted: bool,
    daemon: Option<DaemonEnd>,
    leftover: Vec<i32>,
}

impl Ended {
    fn assert_clean(&self) {
        assert!(
            self.command.status.is_some_and(|s| s.success())
                && !self.left_mounted
                && matches!(self.daemon, Some(DaemonEnd::Exited(0)))
                && self.leftover.is_empty(),
            "{}: left mounted {}, daemon {:?}, processes left {:?}; {}",
            self.how,
            self.left_mounted,
            self.daemon,
            self.leftover,
            describe(self.how, &self.command)
        );
    }
}

impl HelperMount {
    /// Run `mount args...`, which must mount `mountpoint` with our daemon. Panics (after undoing
    /// whatever was mounted) if it does not.
    fn mount(args: &[OsString], mountpoint: &Path) -> HelperMount {
        let mut m = HelperMount {
            path: mountpoint.to_path_buf(),
            pid: None,
            ended: false,
            watchdog: None,
        };
        let out = sys("mount", args);
        let what = format!("mount {args:?}");
        assert!(
            out.status.is_some_and(|s| s.success()),
            "{}",
            describe(&what, &out)
        );
        // mount(8) returns once the helper did, and our launcher returns only once the mount is
        // ready: it must be in mountinfo now, without waiting.
        let entry = mount_at(mountpoint)
            .unwrap_or_else(|| panic!("{what} exited 0 but nothing is mounted there"));
        assert_eq!(entry.fstype, FSTYPE, "{what}: {entry:?}");
        if !common::bin_is_overridden() {
            // fuse-overlayfs names the mount after itself; we take mount(8)'s source.
            assert_eq!(entry.source, "overlay", "{what}: {entry:?}");
        }
        let pids = daemons_for(mountpoint);
        assert_eq!(
            pids.len(),
            1,
            "{what}: want exactly one daemon process for the mountpoint, found {pids:?}"
        );
        m.pid = Some(pids[0]);
        m.watchdog = Some(start_watchdog(mountpoint.to_path_buf(), pids[0]));
        let exe = std::fs::read_link(format!("/proc/{}/exe", pids[0])).ok();
        assert_eq!(
            exe.as_deref(),
            Some(our_exe().as_path()),
            "{what}: the mount is served by another binary than the one under test (is another \
             rsfs-overlay earlier on mount.fuse3's PATH?)"
        );
        m
    }

    /// `mount -t fuse.rsfs-overlay overlay MOUNTPOINT -o OPTS`.
    fn mount_t(mountpoint: &Path, opts: &str) -> HelperMount {
        let args = [
            os("-t"),
            os(FSTYPE),
            os("overlay"),
            os(mountpoint),
            os("-o"),
            os(opts),
        ];
        HelperMount::mount(&args, mountpoint)
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn mount_opts(&self) -> Vec<String> {
        mount_at(&self.path)
            .map(|e| e.mount_opts.split(',').map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Unmount with `umount PATH` or `fusermount3 -u PATH`, then wait for the daemon to exit.
    fn unmount(mut self, how: &'static str) -> Ended {
        self.ended = true;
        self.watchdog.take();
        let p = os(&self.path);
        let command = match how {
            "umount" => sys("umount", &[p]),
            "fusermount3 -u" => sys("fusermount3", &[os("-u"), p]),
            _ => panic!("unknown unmount method {how}"),
        };
        // Both return once the kernel has detached the mount.
        let left_mounted = is_mounted(&self.path);
        if left_mounted {
            force_unmount(&self.path);
        }
        let daemon = self.pid.map(|pid| wait_exit(pid, wait_deadline()));
        let mut leftover = Vec::new();
        if !poll_until(wait_deadline(), || {
            leftover = daemons_for(&self.path);
            leftover.is_empty()
        }) {
            for pid in &leftover {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
        Ended {
            how,
            command,
            left_mounted,
            daemon,
            leftover,
        }
    }
}

impl Drop for HelperMount {
    fn drop(&mut self) {
        self.watchdog.take();
        if self.ended {
            return;
        }
        force_unmount(&self.path);
        if let Some(pid) = self.pid {
            let _ = wait_exit(pid, Duration::from_secs(5));
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test path")
}

/// Two lowers and an upper with files from each, plus a workdir and a mountpoint.
struct Stack {
    sc: Scratch,
    l1: PathBuf,
    l2: PathBuf,
    u: PathBuf,
    w: PathBuf,
    m: PathBuf,
}

impl Stack {
    fn new() -> Stack {
        let sc = Scratch::new();
        let (l1, l2, u, w, m) = (
            sc.dir("l1"),
            sc.dir("l2"),
            sc.dir("u"),
            sc.dir("w"),
            sc.dir("m"),
        );
        Layer::new(&l1)
            .file("from_l1", "one")
            .file("both", "top")
            .file("d/in_l1", "d1");
        Layer::new(&l2)
            .file("from_l2", "two")
            .file("both", "bottom")
            .file("d/in_l2", "d2");
        Layer::new(&u).file("from_u", "up");
        Stack {
            sc,
            l1,
            l2,
            u,
            w,
            m,
        }
    }

    /// `lowerdir=L1:L2,upperdir=U,workdir=W` (L1 top-most).
    fn rw_opts(&self) -> String {
        format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            s(&self.l1),
            s(&self.l2),
            s(&self.u),
            s(&self.w)
        )
    }

    fn lower_opts(&self) -> String {
        format!("lowerdir={}:{}", s(&self.l1), s(&self.l2))
    }
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// The merged view holds every layer's files, the top-most lower winning.
fn check_merged_view(st: &Stack, m: &Path) {
    for (name, want) in [
        ("from_l1", "one"),
        ("from_l2", "two"),
        ("from_u", "up"),
        ("both", "top"),
        ("d/in_l1", "d1"),
        ("d/in_l2", "d2"),
    ] {
        assert_eq!(
            read(&m.join(name)).as_deref(),
            Some(want),
            "{name} through {}",
            m.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(m)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", m.display()))
        .map(|e| {
            e.expect("dirent")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["both", "d", "from_l1", "from_l2", "from_u"],
        "{}",
        st.sc.path().display()
    );
}

/// Writes through a read-write mount land in the upper layer; the lowers stay untouched.
fn check_writes(st: &Stack, m: &Path) {
    std::fs::write(m.join("new"), "n").expect("create a file through the mount");
    std::fs::write(m.join("from_l2"), "changed").expect("overwrite a lower file (copy-up)");
    assert_eq!(read(&st.u.join("new")).as_deref(), Some("n"));
    assert_eq!(read(&st.u.join("from_l2")).as_deref(), Some("changed"));
    assert_eq!(read(&st.l2.join("from_l2")).as_deref(), Some("two"));
    assert!(!st.l1.join("new").exists() && !st.l2.join("new").exists());
}

fn expect_erofs(what: &str, r: std::io::Result<()>) {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => panic!("{what} on a read-only mount: want EROFS, got {other:?}"),
    }
}

/// A read-only mount: reads work, every kind of write fails with EROFS, no layer changes.
fn check_read_only(st: &Stack, mnt: &HelperMount, with_upper: bool) {
    let m = mnt.path();
    let opts = mnt.mount_opts();
    assert!(
        opts.first().is_some_and(|o| o == "ro"),
        "mountinfo options of a read-only mount: {opts:?}"
    );
    assert_eq!(read(&m.join("from_l1")).as_deref(), Some("one"));
    assert_eq!(read(&m.join("from_l2")).as_deref(), Some("two"));
    assert_eq!(read(&m.join("both")).as_deref(), Some("top"));
    assert_eq!(
        read(&m.join("from_u")).as_deref(),
        with_upper.then_some("up"),
        "from_u is visible exactly when upperdir is given"
    );
    let upper_before = listing(&st.u);
    expect_erofs("create", std::fs::write(m.join("new"), "n"));
    expect_erofs(
        "open for writing",
        OpenOptions::new()
            .write(true)
            .open(m.join("from_l1"))
            .map(drop),
    );
    expect_erofs("mkdir", std::fs::create_dir(m.join("newdir")));
    expect_erofs("unlink", std::fs::remove_file(m.join("from_l2")));
    expect_erofs("rename", std::fs::rename(m.join("both"), m.join("both2")));
    assert_eq!(listing(&st.u), upper_before, "the upper layer changed");
    assert_eq!(read(&st.l2.join("from_l2")).as_deref(), Some("two"));
}

/// Every path under `dir`, sorted.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p.strip_prefix(dir).expect("under dir").to_path_buf());
        }
    }
    out.sort();
    out
}

/// `mount -t fuse.rsfs-overlay overlay M -o lowerdir=L1:L2,upperdir=U,workdir=W` mounts a merged
/// view of all three layers, writes land in U, and `umount M` unmounts and ends the daemon.
#[test]
fn mount_t_then_umount() {
    let Some(_link) = helper_env() else {
        return;
    };
    let st = Stack::new();
    let mnt = HelperMount::mount_t(&st.m, &st.rw_opts());
    assert!(
        mnt.mount_opts().first().is_some_and(|o| o == "rw"),
        "{:?}",
        mnt.mount_opts()
    );
    check_merged_view(&st, mnt.path());
    check_writes(&st, mnt.path());
    mnt.unmount("umount").assert_clean();
    assert!(mounts_under(st.sc.path()).is_empty());
    assert_eq!(read(&st.u.join("new")).as_deref(), Some("n"));
}

/// The same mount, ended with `fusermount3 -u`.
#[test]
fn mount_t_then_fusermount3_u() {
    let Some(_link) = helper_env() else {
        return;
    };
    let st = Stack::new();
    let mnt = HelperMount::mount_t(&st.m, &st.rw_opts());
    check_merged_view(&st, mnt.path());
    check_writes(&st, mnt.path());
    mnt.unmount("fusermount3 -u").assert_clean();
    assert!(mounts_under(st.sc.path()).is_empty());
}

/// `-o ro,lowerdir=..,upperdir=..,workdir=..`: read-only, the upper's files visible.
#[test]
fn mount_t_ro_with_upper() {
    let Some(_link) = helper_env() else {
        return;
    };
    let st = Stack::new();
    let mnt = HelperMount::mount_t(&st.m, &format!("ro,{}", st.rw_opts()));
    check_read_only(&st, &mnt, true);
    mnt.unmount("umount").assert_clean();
}

/// `-o ro,lowerdir=L1:L2`, and `lowerdir=L1:L2` alone (no upper): read-only.
#[test]
fn mount_t_ro_without_upper() {
    let Some(_link) = helper_env() else {
        return;
    };
    for opts_prefix in ["ro,", ""] {
        let st = Stack::new();
        let mnt = HelperMount::mount_t(&st.m, &format!("{opts_prefix}{}", st.lower_opts()));
        check_read_only(&st, &mnt, false);
        mnt.unmount("fusermount3 -u").assert_clean();
    }
}

/// An fstab line `overlay M fuse.rsfs-overlay lowerdir=..,upperdir=..,workdir=.. 0 0` mounts
/// with `mount -T FSTAB M`, and `mount -T FSTAB -a` mounts every line (here a read-write and a
/// read-only one).
#[test]
fn fstab_entry_mounts() {
    let Some(_link) = helper_env() else {
        return;
    };
    let st = Stack::new();
    let m_ro = st.sc.dir("m_ro");
    let fstab = st.sc.join("fstab");
    let text = format!(
        "# rsfs-overlay mount helper test\n\
         overlay {} {FSTYPE} {} 0 0\n\
         overlay\t{}\t{FSTYPE}\tro,{}\t0\t0\n",
        s(&st.m),
        st.rw_opts(),
        s(&m_ro),
        st.lower_opts()
    );
    std::fs::write(&fstab, &text).expect("write fstab");

    // The mountpoint form mounts that line only.
    let mnt = HelperMount::mount(&[os("-T"), os(&fstab), os(&st.m)], &st.m);
    assert!(
        !is_mounted(&m_ro),
        "mount -T FSTAB M mounted another line too"
    );
    check_merged_view(&st, mnt.path());
    check_writes(&st, mnt.path());
    mnt.unmount("umount").assert_clean();

    // -a mounts both; guards for both exist before the command runs, so a failure undoes both.
    let mut guards: Vec<HelperMount> = [&st.m, &m_ro]
        .into_iter()
        .map(|p| HelperMount {
            path: p.clone(),
            pid: None,
            ended: false,
            watchdog: None,
        })
        .collect();
    let args = [os("-T"), os(&fstab), os("-a")];
    let out = sys("mount", &args);
    assert!(
        out.status.is_some_and(|s| s.success()),
        "{}\nfstab:\n{text}",
        describe(&format!("mount {args:?}"), &out)
    );
    for g in &mut guards {
        let entry = mount_at(&g.path)
            .unwrap_or_else(|| panic!("mount -T FSTAB -a did not mount {}", g.path.display()));
        assert_eq!(entry.fstype, FSTYPE, "{entry:?}");
        let pids = daemons_for(&g.path);
        assert_eq!(pids.len(), 1, "daemons for {}: {pids:?}", g.path.display());
        g.pid = Some(pids[0]);
        g.watchdog = Some(start_watchdog(g.path.clone(), pids[0]));
    }
    let ro = guards.pop().expect("two guards");
    let rw = guards.pop().expect("two guards");
    assert_eq!(read(&rw.path().join("new")).as_deref(), Some("n"));
    assert!(rw.mount_opts().first().is_some_and(|o| o == "rw"));
    check_read_only(&st, &ro, false);
    rw.unmount("umount").assert_clean();
    ro.unmount("fusermount3 -u").assert_clean();
    assert!(mounts_under(st.sc.path()).is_empty());
}

/// Bad options through the helper: `mount` exits non-zero with our one-line error in its
/// stderr, and nothing is mounted or left running.
#[test]
fn bad_options_fail_with_our_error() {
    let Some(_link) = helper_env() else {
        return;
    };
    let st = Stack::new();
    let missing = st.sc.join("no_such_lower");
    let cases = [
        (
            format!("lowerdir={}:{}", s(&st.l1), s(&missing)),
            s(&missing).to_string(),
        ),
        (
            format!("lowerdir={},bogus_opt_xyz=1", s(&st.l1)),
            "bogus_opt_xyz".to_string(),
        ),
        (
            format!("lowerdir={},upperdir={}", s(&st.l1), s(&st.u)),
            "workdir".to_string(),
        ),
    ];
    for (opts, needle) in cases {
        let args = [
            os("-t"),
            os(FSTYPE),
            os("overlay"),
            os(&st.m),
            os("-o"),
            os(&opts),
        ];
        let out = sys("mount", &args);
        let mounted = is_mounted(&st.m);
        force_unmount(&st.m);
        let mut leftover = Vec::new();
        let gone = poll_until(wait_deadline(), || {
            leftover = daemons_for(&st.m);
            leftover.is_empty()
        });
        for pid in &leftover {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        let what = describe(&format!("mount {args:?}"), &out);
        assert!(out.status.is_some(), "{what}: did not return in time");
        assert!(!out.status.is_some_and(|s| s.success()), "{what}: exited 0");
        assert!(!mounted, "{what}: left a mount behind");
        assert!(gone, "{what}: processes left: {leftover:?}");
        let ours: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains(needle.as_str()))
            .collect();
        if common::bin_is_overridden() {
            assert!(!out.stderr.trim().is_empty(), "{what}: no error message");
        } else {
            assert_eq!(
                ours.len(),
                1,
                "{what}: want one stderr line naming {needle:?}"
            );
            assert!(
                ours[0].starts_with("rsfs-overlay"),
                "{what}: the error line is not ours"
            );
        }
        assert!(
            !out.stderr.contains("not found"),
            "{what}: mount.fuse3 did not find the daemon"
        );
    }
}
