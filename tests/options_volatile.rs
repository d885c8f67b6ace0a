//! The kernel's `volatile` and `uuid=` mount options, ours against the kernel's overlayfs on the
//! same operations.
//!
//! `volatile`:
//! - the marker: both write `<workdir>/work/incompat/volatile/dirty` (same types and modes) at
//!   mount and leave it after a clean unmount;
//! - refusal: after a volatile mount (cleanly unmounted, or our daemon SIGKILLed) the next mount
//!   is refused by both, volatile or not, and by each on the other's marker; ours says so in one
//!   line naming the marker and leaves nothing mounted; any other `incompat/NAME` is refused too;
//!   once the user removes the marker both mount again (and so does a podman-style loop that
//!   removes it before each mount, as containers/storage does);
//! - no sync reaches the upper: `strace` on our daemon sees no fsync, fdatasync, syncfs or sync
//!   while a client fsyncs files and directories, copies up and writes with O_SYNC (and, as the
//!   control, sees them without `volatile`);
//! - data written and never fsync'd is in the upper after a clean unmount (and after a SIGKILL);
//! - without an upper the option is ignored, as by the kernel.
//!
//! `uuid=on|off|null|auto` on an upper that is new, used before (marked impure) or already has a
//! UUID: both leave the same `trusted.overlay.uuid` (absent, the one already there, or a new
//! one) and write origins with the same filesystem UUID (null with `off`), on tmpfs layers,
//! whose filesystem has a UUID. With layers on two filesystems `off` falls back to `null` in
//! both. Uppers interchange: one written by either under `off` or `null` is read by both under
//! `auto` and `off`, and both agree on whether a copied-up file keeps its lower inode number
//! (the origin is followed only when its UUID matches what the reading mode writes).
//!
//! Needs root, /dev/fuse, the kernel's overlayfs, and strace for the sync test.

mod common;

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::mountinfo::is_mounted;
use common::{
    KernelMount, OurMount, Scratch, TmpfsMount, mount_kernel, mount_ours, os, our_bin, poll_until,
    run_with_timeout, wait_deadline, xattr,
};
use nix::sys::signal::{Signal, kill};

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Root and /dev/fuse (and `tool`, if given): skip without them, fail under CI.
fn require(tool: Option<&str>) -> bool {
    if !common::require_root_and_fuse() {
        return false;
    }
    let Some(tool) = tool else {
        return true;
    };
    if Command::new(tool).arg("-V").output().is_ok() {
        return true;
    }
    if under_ci() {
        panic!("{tool} is missing (CI=true makes this a failure)");
    }
    eprintln!("SKIP: {tool} is missing");
    false
}

/// One small stack: `l` (a file `f`, a directory `d` holding `g`), an empty upper `u`, `w`.
struct Stack {
    l: PathBuf,
    u: PathBuf,
    w: PathBuf,
}

impl Stack {
    fn new(base: &Path) -> Stack {
        let s = Stack {
            l: base.join("l"),
            u: base.join("u"),
            w: base.join("w"),
        };
        for d in [&s.l.join("d"), &s.u, &s.w] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(s.l.join("f"), b"lower f\n").unwrap();
        fs::write(s.l.join("d/g"), b"lower g\n").unwrap();
        s
    }

    fn upper_work(&self) -> Option<(&Path, &Path)> {
        Some((&self.u, &self.w))
    }

    fn kernel(&self, extra: &[&str]) -> KernelMount {
        mount_kernel(&[&self.l], self.upper_work(), extra)
    }

    fn try_kernel(&self, extra: &[&str]) -> Result<KernelMount, String> {
        KernelMount::try_mount(None, &[&self.l], self.upper_work(), extra)
    }

    fn ours(&self, extra: &[&str]) -> OurMount {
        mount_ours(&[&self.l], self.upper_work(), extra)
    }

    /// Runs our binary expecting a refusal; returns its stderr. Asserts that it exited non-zero
    /// and left nothing mounted.
    fn ours_refused(&self, extra: &[&str]) -> String {
        let target = tempfile::tempdir_in("/tmp").unwrap();
        let opts = common::mounts::overlay_options(&[&self.l], self.upper_work(), extra);
        let args: Vec<OsString> = vec![os("-o"), os(&opts), os(target.path())];
        let out = run_with_timeout(&our_bin(), &args, wait_deadline());
        let mounted = is_mounted(target.path());
        if mounted {
            common::mounts::force_unmount(target.path());
        }
        assert!(!mounted, "-o {opts}: mounted, expected a refusal");
        assert!(
            out.status.is_some_and(|s| !s.success()),
            "-o {opts}: expected a failure, got {:?}; stderr: {}",
            out.status,
            out.stderr
        );
        out.stderr
    }

    fn marker(&self) -> PathBuf {
        self.w.join("work/incompat/volatile")
    }
}

/// `work/incompat` below `workdir` as (relative path, type, permission bits), sorted.
fn incompat_tree(workdir: &Path) -> Vec<(String, char, u32)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, char, u32)>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let kind = if md.is_dir() { 'd' } else { 'f' };
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.push((rel, kind, md.permissions().mode() & 0o7777));
            if md.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let root = workdir.join("work");
    let mut out = Vec::new();
    let incompat = root.join("incompat");
    if let Ok(md) = fs::symlink_metadata(&incompat) {
        out.push(("incompat".into(), 'd', md.permissions().mode() & 0o7777));
        walk(&root, &incompat, &mut out);
    }
    out.sort();
    out
}

fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
}

/// The one line ours prints when a marker refuses the mount.
fn assert_refusal_names(stderr: &str, marker: &Path) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    let m = marker.display().to_string();
    assert!(
        lines[0].contains(&m) && lines[0].contains("remove"),
        "the refusal should name {m} and how to clear it: {stderr}"
    );
}

#[test]
fn volatile_marker_is_the_kernels_and_outlives_a_clean_unmount() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let mut trees = Vec::new();
    for who in ["kernel", "ours"] {
        let s = Stack::new(&scratch.dir(who));
        let mounted = if who == "kernel" {
            let m = s.kernel(&["volatile"]);
            let t = incompat_tree(&s.w);
            assert!(m.unmount());
            t
        } else {
            let m = s.ours(&["volatile"]);
            let t = incompat_tree(&s.w);
            m.unmount();
            t
        };
        let after = incompat_tree(&s.w);
        assert_eq!(mounted, after, "{who}: the marker changed at unmount");
        trees.push(after);
    }
    let want: Vec<(String, char, u32)> = vec![
        ("incompat".into(), 'd', 0),
        ("incompat/volatile".into(), 'd', 0),
        ("incompat/volatile/dirty".into(), 'f', 0),
    ];
    assert_eq!(
        trees[0], want,
        "the kernel's marker is not what was measured"
    );
    assert_eq!(trees[1], trees[0], "ours differs from the kernel's");
}

#[test]
fn a_volatile_workdir_is_refused_by_both_until_the_marker_is_removed() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    for writer in ["kernel", "ours"] {
        let s = Stack::new(&scratch.dir(writer));
        if writer == "kernel" {
            let m = s.kernel(&["volatile"]);
            append(&m.path().join("f"), b"1\n");
            assert!(m.unmount());
        } else {
            let m = s.ours(&["volatile"]);
            append(&m.path().join("f"), b"1\n");
            m.unmount();
        }
        for extra in [&[][..], &["volatile"], &["ro"]] {
            assert!(
                s.try_kernel(extra).is_err(),
                "{writer}'s marker: the kernel mounted with {extra:?}"
            );
            let stderr = s.ours_refused(extra);
            assert_refusal_names(&stderr, &s.marker());
        }
        fs::remove_dir_all(s.marker()).unwrap();
        let k = s.kernel(&[]);
        assert_eq!(fs::read(k.path().join("f")).unwrap(), b"lower f\n1\n");
        assert!(k.unmount());
        let m = s.ours(&[]);
        assert_eq!(fs::read(m.path().join("f")).unwrap(), b"lower f\n1\n");
        m.unmount();
    }
}

#[test]
fn any_incompat_marker_is_refused_by_both() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let s = Stack::new(&scratch.dir("s"));
    let marker = s.w.join("work/incompat/future");
    fs::create_dir_all(&marker).unwrap();
    assert!(s.try_kernel(&[]).is_err(), "the kernel mounted");
    assert_refusal_names(&s.ours_refused(&[]), &marker);
    // An empty incompat/ is no marker: both mount (and clean it away as a leftover).
    fs::remove_dir(&marker).unwrap();
    assert!(s.kernel(&[]).unmount());
    fs::create_dir_all(s.w.join("work/incompat")).unwrap();
    s.ours(&[]).unmount();
    assert!(!s.w.join("work/incompat").exists());
}

#[test]
fn sigkill_of_a_volatile_daemon_keeps_its_data_and_refuses_the_next_mount() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let s = Stack::new(&scratch.dir("s"));
    let m = s.ours(&["volatile"]);
    fs::write(m.path().join("new"), b"never synced\n").unwrap();
    append(&m.path().join("f"), b"appended\n");
    let pid = m.daemon_pid().expect("the daemon's pid");
    kill(pid, Signal::SIGKILL).unwrap();
    drop(m);
    // The upper's page cache holds what the daemon wrote: a killed daemon loses nothing there.
    assert_eq!(fs::read(s.u.join("new")).unwrap(), b"never synced\n");
    assert_eq!(fs::read(s.u.join("f")).unwrap(), b"lower f\nappended\n");
    assert_refusal_names(&s.ours_refused(&["volatile"]), &s.marker());
    assert!(s.try_kernel(&[]).is_err(), "the kernel mounted");
    fs::remove_dir_all(s.marker()).unwrap();
    let m = s.ours(&[]);
    assert_eq!(fs::read(m.path().join("new")).unwrap(), b"never synced\n");
    m.unmount();
}

#[test]
fn podman_style_remounts_work() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let s = Stack::new(&scratch.dir("s"));
    for round in 0..3 {
        // containers/storage, before every mount: os.RemoveAll(workdir/work/incompat/volatile).
        match fs::remove_dir_all(s.marker()) {
            Ok(()) => assert!(round > 0),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "round {round}"),
        }
        let m = s.ours(&["", "volatile"]);
        append(&m.path().join("f"), format!("{round}\n").as_bytes());
        m.unmount();
    }
    assert_eq!(fs::read(s.u.join("f")).unwrap(), b"lower f\n0\n1\n2\n");
}

#[test]
fn writes_never_synced_are_in_the_upper_after_a_clean_unmount() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let s = Stack::new(&scratch.dir("s"));
    let m = s.ours(&["volatile"]);
    fs::create_dir(m.path().join("newdir")).unwrap();
    fs::write(m.path().join("newdir/a"), b"a\n").unwrap();
    append(&m.path().join("d/g"), b"more g\n");
    fs::remove_file(m.path().join("f")).unwrap();
    m.unmount();
    fs::remove_dir_all(s.marker()).unwrap();
    let k = s.kernel(&[]);
    assert_eq!(fs::read(k.path().join("newdir/a")).unwrap(), b"a\n");
    assert_eq!(
        fs::read(k.path().join("d/g")).unwrap(),
        b"lower g\nmore g\n"
    );
    assert!(!k.path().join("f").exists());
    assert!(k.unmount());
}

#[test]
fn volatile_without_an_upper_is_ignored() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let s = Stack::new(&scratch.dir("s"));
    let second = scratch.dir("l2");
    let k = mount_kernel(&[&s.l, &second], None, &["volatile"]);
    assert!(k.unmount());
    let m = mount_ours(&[&s.l], None, &["volatile"]);
    assert_eq!(fs::read(m.path().join("f")).unwrap(), b"lower f\n");
    m.unmount();
}

/// The sync syscalls our daemon makes while `work` runs on its mount, and its opens with
/// O_SYNC or O_DSYNC, seen by strace.
fn syncs_during(m: &OurMount, work: impl FnOnce(&Path)) -> Vec<String> {
    let pid = m.daemon_pid().expect("the daemon's pid");
    let dir = tempfile::tempdir().unwrap();
    let (log, err) = (dir.path().join("trace"), dir.path().join("stderr"));
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=fsync,fdatasync,syncfs,sync,sync_file_range,openat,openat2",
            "-o",
        ])
        .arg(&log)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("run strace");
    // strace reports the attach once it holds every thread ("Process N attached with T
    // threads"), or thread by thread in older versions; the workload starts after that.
    let threads = fs::read_dir(format!("/proc/{pid}/task")).unwrap().count();
    let attached = poll_until(wait_deadline(), || {
        let mut s = String::new();
        let _ = fs::File::open(&err).and_then(|mut f| f.read_to_string(&mut s));
        s.contains(" attached with ") || s.matches(" attached").count() >= threads
    });
    assert!(
        attached,
        "strace did not attach: {}",
        fs::read_to_string(&err).unwrap()
    );
    work(m.path());
    kill(
        nix::unistd::Pid::from_raw(strace.id() as i32),
        Signal::SIGINT,
    )
    .unwrap();
    // strace detaches, flushes its log and then dies of the signal it was sent.
    strace.wait().unwrap();
    fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| {
            [
                "fsync(",
                "fdatasync(",
                "syncfs(",
                "sync(",
                "sync_file_range(",
                "O_SYNC",
                "O_DSYNC",
            ]
            .iter()
            .any(|c| l.contains(c))
        })
        .map(str::to_owned)
        .collect()
}

/// A client that asks for every kind of sync.
fn syncing_client(root: &Path) {
    let mut f = fs::File::create(root.join("created")).unwrap();
    f.write_all(b"x").unwrap();
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    let mut copied = OpenOptions::new()
        .append(true)
        .open(root.join("f"))
        .unwrap();
    copied.write_all(b"y").unwrap();
    copied.sync_all().unwrap();
    drop((f, copied));
    // Alone on its file, so that it is served by the daemon (not FUSE passthrough).
    let mut osync = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_SYNC)
        .open(root.join("sync-writes"))
        .unwrap();
    osync.write_all(b"z").unwrap();
    fs::File::open(root.join("d")).unwrap().sync_all().unwrap();
    fs::File::open(root).unwrap().sync_all().unwrap();
}

#[test]
fn volatile_skips_every_sync_to_the_upper() {
    if !require(Some("strace")) {
        return;
    }
    let scratch = Scratch::new();
    let control = Stack::new(&scratch.dir("control"));
    let m = control.ours(&[]);
    let synced = syncs_during(&m, syncing_client);
    m.unmount();
    for what in ["fsync(", "fdatasync(", "O_SYNC"] {
        assert!(
            synced.iter().any(|l| l.contains(what)),
            "without volatile the daemon should {what}: {synced:?}"
        );
    }
    let s = Stack::new(&scratch.dir("volatile"));
    let m = s.ours(&["volatile"]);
    let synced = syncs_during(&m, syncing_client);
    m.unmount();
    assert!(
        synced.is_empty(),
        "volatile, yet the daemon synced: {synced:?}"
    );
}

/// What a mount with `uuid=MODE` left in an upper.
#[derive(Debug, PartialEq)]
struct UuidOutcome {
    /// `trusted.overlay.uuid` on the upper root: absent, the one set before, or a new one.
    root_uuid: &'static str,
    /// The filesystem UUID in the origin of a copied-up file and of a merged directory.
    file_origin_uuid: Vec<u8>,
    dir_origin_uuid: Vec<u8>,
}

const PRESET_UUID: [u8; 16] = [0x11; 16];

/// The state an upper is in before the mount.
#[derive(Clone, Copy, Debug)]
enum Upper {
    New,
    /// Used before without a UUID: its root is marked impure.
    Used,
    HasUuid,
}

fn origin_uuid(path: &Path) -> Vec<u8> {
    let v = xattr::get(path, "trusted.overlay.origin")
        .unwrap_or_else(|e| panic!("origin of {}: {e}", path.display()));
    assert!(v.len() > 21 && v[1] == 0xfb, "{}: {v:x?}", path.display());
    v[5..21].to_vec()
}

fn uuid_case(base: &Path, kernel: bool, mode: &str, upper: Upper) -> UuidOutcome {
    let s = Stack::new(base);
    match upper {
        Upper::New => {}
        Upper::Used => xattr::set(&s.u, "trusted.overlay.impure", b"y").unwrap(),
        Upper::HasUuid => xattr::set(&s.u, "trusted.overlay.uuid", &PRESET_UUID).unwrap(),
    }
    let opt = format!("uuid={mode}");
    let work = |root: &Path| {
        append(&root.join("f"), b"1\n");
        append(&root.join("d/g"), b"1\n");
    };
    if kernel {
        let m = s.kernel(&[&opt]);
        work(m.path());
        assert!(m.unmount());
    } else {
        let m = s.ours(&[&opt]);
        work(m.path());
        m.unmount();
    }
    let root_uuid = match xattr::get(&s.u, "trusted.overlay.uuid") {
        Err(_) => "absent",
        Ok(v) if v == PRESET_UUID => "kept",
        Ok(v) if v.len() == 16 => "new",
        Ok(v) => panic!("uuid xattr of {} bytes", v.len()),
    };
    UuidOutcome {
        root_uuid,
        file_origin_uuid: origin_uuid(&s.u.join("f")),
        dir_origin_uuid: origin_uuid(&s.u.join("d")),
    }
}

#[test]
fn each_uuid_mode_writes_what_the_kernel_writes() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let fs = TmpfsMount::new(&scratch.join("t"));
    let null = vec![0u8; 16];
    let mut n = 0;
    for mode in ["on", "off", "null", "auto"] {
        for upper in [Upper::New, Upper::Used, Upper::HasUuid] {
            let k = uuid_case(&fs.path().join(format!("k{n}")), true, mode, upper);
            let o = uuid_case(&fs.path().join(format!("o{n}")), false, mode, upper);
            n += 1;
            assert_eq!(o, k, "uuid={mode} on an upper {upper:?}: ours differs");
            // What the kernel was measured to do, so that a change in it is noticed.
            assert_eq!(k.file_origin_uuid == null, mode == "off", "uuid={mode}");
            let root = match (mode, upper) {
                (_, Upper::HasUuid) => "kept",
                ("on", _) | ("auto", Upper::New) => "new",
                _ => "absent",
            };
            assert_eq!(k.root_uuid, root, "uuid={mode} on an upper {upper:?}");
        }
    }
}

#[test]
fn uuid_off_over_two_filesystems_falls_back_to_null_in_both() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let lower_fs = TmpfsMount::new(&scratch.join("a"));
    let upper_fs = TmpfsMount::new(&scratch.join("b"));
    let mut seen = Vec::new();
    for who in ["kernel", "ours"] {
        let s = Stack::new(&lower_fs.path().join(who));
        let (u, w) = (
            upper_fs.path().join(who).join("u"),
            upper_fs.path().join(who).join("w"),
        );
        fs::create_dir_all(&u).unwrap();
        fs::create_dir_all(&w).unwrap();
        if who == "kernel" {
            let m = mount_kernel(&[&s.l], Some((&u, &w)), &["uuid=off"]);
            append(&m.path().join("f"), b"1\n");
            assert!(m.unmount());
        } else {
            let m = mount_ours(&[&s.l], Some((&u, &w)), &["uuid=off"]);
            append(&m.path().join("f"), b"1\n");
            m.unmount();
        }
        seen.push(origin_uuid(&u.join("f")));
    }
    assert_ne!(seen[0], vec![0u8; 16], "the kernel recorded a null uuid");
    assert_eq!(seen[1], seen[0]);
}

/// Whether a mount by `kernel`/ours with `uuid=mode` of `s` shows `f` with its lower inode
/// number (its origin followed) rather than its upper one.
fn keeps_lower_ino(s: &Stack, kernel: bool, mode: &str) -> bool {
    let opt = format!("uuid={mode}");
    let lower = fs::metadata(s.l.join("f")).unwrap().ino();
    let upper = fs::metadata(s.u.join("f")).unwrap().ino();
    let shown = if kernel {
        let m = s.kernel(&[&opt]);
        let ino = fs::metadata(m.path().join("f")).unwrap().ino();
        assert!(m.unmount());
        ino
    } else {
        let m = s.ours(&[&opt]);
        let ino = fs::metadata(m.path().join("f")).unwrap().ino();
        m.unmount();
        ino
    };
    assert!(
        shown == lower || shown == upper,
        "st_ino {shown}: neither {lower} nor {upper}"
    );
    shown == lower
}

#[test]
fn uppers_written_under_each_uuid_mode_interchange() {
    if !require(None) {
        return;
    }
    let scratch = Scratch::new();
    let tmp = TmpfsMount::new(&scratch.join("t"));
    for writer_kernel in [true, false] {
        for written in ["off", "null", "on"] {
            let name = format!("{}-{written}", if writer_kernel { "k" } else { "o" });
            let s = Stack::new(&tmp.path().join(name));
            let opt = format!("uuid={written}");
            if writer_kernel {
                let m = s.kernel(&[&opt]);
                append(&m.path().join("f"), b"1\n");
                assert!(m.unmount());
            } else {
                let m = s.ours(&[&opt]);
                append(&m.path().join("f"), b"1\n");
                m.unmount();
            }
            for read in ["auto", "off", "null"] {
                let k = keeps_lower_ino(&s, true, read);
                let o = keeps_lower_ino(&s, false, read);
                let ctx = format!(
                    "written by {} with uuid={written}, read with uuid={read}",
                    if writer_kernel { "the kernel" } else { "ours" }
                );
                assert_eq!(o, k, "{ctx}: ours differs from the kernel");
                assert_eq!(
                    k,
                    (written == "off") == (read == "off"),
                    "{ctx}: the kernel changed"
                );
            }
        }
    }
}
