//! The command line contract: bad setups are refused before mounting with one line on stderr
//! naming the problem; the mount(8) form and escaped layer names work; the daemon returns once
//! the mount is ready and exits 0 after `umount`, `fusermount3 -u`, SIGTERM or SIGINT, leaving
//! nothing mounted; `-V` and `-h` answer.
//!
//! Run against another implementation with `RSFS_TEST_BIN=/usr/bin/fuse-overlayfs`.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::mountinfo::mount_at;
use common::mounts::{self, DaemonMount, force_unmount, mount_ours_at, mount_ours_foreground};
use common::{
    DaemonExit, Layer, Scratch, TmpfsMount, Unmount, expect_refused, mount_ours, os, our_bin,
    our_fstype, run_with_timeout,
};
use nix::sys::signal::Signal;

fn timeout() -> Duration {
    Duration::from_secs(30)
}

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 test path").to_string()
}

/// A scratch dir with a lower `l` holding a file, an empty mountpoint `m`, and `u`/`w`.
fn setup() -> (Scratch, PathBuf, PathBuf, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let l = scratch.dir("l");
    Layer::new(&l).file("hello", "world");
    let (m, u, w) = (scratch.dir("m"), scratch.dir("u"), scratch.dir("w"));
    (scratch, l, m, u, w)
}

fn args(opts: String, target: &Path) -> Vec<OsString> {
    vec![os("-o"), os(opts), os(target)]
}

#[test]
fn refuses_missing_lowerdir_option() {
    if !common::require_fuse() {
        return;
    }
    let (sc, _l, m, u, w) = setup();
    let a = args(format!("upperdir={},workdir={}", s(&u), s(&w)), &m);
    expect_refused(&sc, &a, &m, &["lowerdir"]);
}

#[test]
fn refuses_empty_lowerdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, _l, m, _u, _w) = setup();
    expect_refused(&sc, &args("lowerdir=".into(), &m), &m, &["lowerdir"]);
}

#[test]
fn refuses_missing_lower_layer() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, _w) = setup();
    let nope = sc.join("no_such_layer");
    let a = args(format!("lowerdir={}:{}", s(&l), s(&nope)), &m);
    expect_refused(&sc, &a, &m, &[&s(&nope)]);
}

#[test]
fn refuses_lower_that_is_not_a_directory() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, _w) = setup();
    let f = sc.file("plainfile", b"x");
    let a = args(format!("lowerdir={}:{}", s(&f), s(&l)), &m);
    expect_refused(&sc, &a, &m, &[&s(&f)]);
}

#[test]
fn refuses_upperdir_without_workdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, u, _w) = setup();
    let a = args(format!("lowerdir={},upperdir={}", s(&l), s(&u)), &m);
    expect_refused(&sc, &a, &m, &["workdir"]);
}

#[test]
fn refuses_workdir_without_upperdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, w) = setup();
    let a = args(format!("lowerdir={},workdir={}", s(&l), s(&w)), &m);
    expect_refused(&sc, &a, &m, &["upperdir"]);
}

#[test]
fn refuses_missing_upperdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, w) = setup();
    let nope = sc.join("no_such_upper");
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&nope), s(&w)),
        &m,
    );
    expect_refused(&sc, &a, &m, &[&s(&nope)]);
}

#[test]
fn refuses_missing_workdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, u, _w) = setup();
    let nope = sc.join("no_such_work");
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&u), s(&nope)),
        &m,
    );
    expect_refused(&sc, &a, &m, &[&s(&nope)]);
}

#[test]
fn refuses_upper_and_work_on_different_filesystems() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, u, _w) = setup();
    let tmpfs = TmpfsMount::new(&sc.join("tmpfs"));
    let w = tmpfs.path().join("w");
    std::fs::create_dir(&w).expect("mkdir workdir on tmpfs");
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&u), s(&w)),
        &m,
    );
    // The tmpfs is ours, not the binary's: look for mounts at the target only.
    let out = run_with_timeout(&our_bin(), &a, timeout());
    let mounted = mount_at(&m).is_some();
    force_unmount(&m);
    let err = out.stderr.trim_end_matches('\n');
    assert!(
        out.status.is_some_and(|st| !st.success())
            && !mounted
            && err.lines().count() == 1
            && ["workdir", "upperdir", &s(&w), &s(&u)]
                .iter()
                .any(|n| err.contains(n)),
        "upper and work on different filesystems: exit {:?}, mounted {mounted}, stderr {:?}",
        out.status,
        out.stderr
    );
    drop(tmpfs);
}

#[test]
fn refuses_workdir_inside_upperdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, u, _w) = setup();
    let w = u.join("work");
    std::fs::create_dir(&w).expect("mkdir");
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&u), s(&w)),
        &m,
    );
    expect_refused(&sc, &a, &m, &["workdir", &s(&w)]);
}

#[test]
fn refuses_upperdir_inside_workdir() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, w) = setup();
    let u = w.join("upper");
    std::fs::create_dir(&u).expect("mkdir");
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&u), s(&w)),
        &m,
    );
    expect_refused(&sc, &a, &m, &["workdir", "upperdir", &s(&u)]);
}

#[test]
fn refuses_lower_that_is_the_upper() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, w) = setup();
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&l), s(&w)),
        &m,
    );
    expect_refused(&sc, &a, &m, &[&s(&l), "lowerdir", "upperdir"]);
}

#[test]
fn refuses_missing_mountpoint() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, _m, _u, _w) = setup();
    let nope = sc.join("no_such_mountpoint");
    let a = args(format!("lowerdir={}", s(&l)), &nope);
    expect_refused(&sc, &a, &nope, &[&s(&nope)]);
}

#[test]
fn refuses_mountpoint_that_is_not_a_directory() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, _m, _u, _w) = setup();
    let f = sc.file("target_file", b"");
    let a = args(format!("lowerdir={}", s(&l)), &f);
    expect_refused(&sc, &a, &f, &[&s(&f)]);
}

#[test]
fn refuses_unknown_option() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, _u, _w) = setup();
    let a = args(format!("lowerdir={},bogus_opt_xyz=1", s(&l)), &m);
    expect_refused(&sc, &a, &m, &["bogus_opt_xyz"]);
}

/// `rsfs-overlay overlay /merged -o rw,lowerdir=...,upperdir=...,workdir=...`, as mount(8) and
/// fstab helpers call it.
#[test]
fn mount8_form_works() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, m, u, w) = setup();
    let l2 = sc.dir("l2");
    Layer::new(&l2).file("below", "b");
    let a = vec![
        os("overlay"),
        os(&m),
        os("-o"),
        os(format!(
            "rw,lowerdir={}:{},upperdir={},workdir={}",
            s(&l),
            s(&l2),
            s(&u),
            s(&w)
        )),
    ];
    let mnt = DaemonMount::start(&our_bin(), &a, &m, false)
        .unwrap_or_else(|e| panic!("mount(8) form failed: {e}"));
    assert_eq!(
        std::fs::read_to_string(m.join("hello")).ok().as_deref(),
        Some("world")
    );
    assert_eq!(
        std::fs::read_to_string(m.join("below")).ok().as_deref(),
        Some("b")
    );
    std::fs::write(m.join("written"), "w").expect("write through a rw mount");
    let info = mount_at(&m).expect("mounted");
    assert_eq!(info.fstype, our_fstype());
    let ended = mnt.unmount();
    assert_eq!(ended.daemon, DaemonExit::Exited(0), "{ended:?}");
    assert_eq!(
        std::fs::read_to_string(u.join("written")).ok().as_deref(),
        Some("w"),
        "the write reached the upper layer"
    );
}

/// Layer names with ':' and ',' are given escaped (`\:`, `\,`) in lowerdir (and upperdir).
#[test]
fn escaped_colon_and_comma_in_layer_names() {
    if !common::require_fuse() {
        return;
    }
    let sc = Scratch::new();
    let a = sc.dir("a:colon");
    let b = sc.dir("b,comma");
    let c = sc.dir("c:both,here");
    Layer::new(&a).file("from_a", "A");
    Layer::new(&b).file("from_b", "B");
    Layer::new(&c).file("from_c", "C");
    let (u, w) = (sc.dir("up,per:x"), sc.dir("work"));
    let opts = mounts::overlay_options(&[&a, &b, &c], Some((&u, &w)), &[]);
    assert!(opts.contains("\\:") && opts.contains("\\,"), "{opts}");
    let m = mount_ours(&[&a, &b, &c], Some((&u, &w)), &[]);
    for (name, want) in [("from_a", "A"), ("from_b", "B"), ("from_c", "C")] {
        assert_eq!(
            std::fs::read_to_string(m.path().join(name)).ok().as_deref(),
            Some(want),
            "{name} through lowerdir={opts}"
        );
    }
    std::fs::write(m.path().join("new"), "n").expect("write");
    drop(m);
    assert!(u.join("new").exists(), "write went to the escaped upperdir");
}

fn ended_cleanly(how: &str, ended: &common::Ended) {
    assert!(
        ended.daemon == DaemonExit::Exited(0) && !ended.left_mounted && ended.command_ok,
        "{how}: daemon {:?}, left mounted {}, command ok {} ({}); daemon stderr: {}",
        ended.daemon,
        ended.left_mounted,
        ended.command_ok,
        ended.command_stderr.trim(),
        ended.stderr.trim()
    );
}

fn foreground_mount() -> (Scratch, common::OurMount) {
    let (sc, l, _m, u, w) = setup();
    let m = mount_ours_foreground(&[&l], Some((&u, &w)), &[]);
    assert_eq!(
        std::fs::read_to_string(m.path().join("hello"))
            .ok()
            .as_deref(),
        Some("world")
    );
    (sc, m)
}

#[test]
fn foreground_sigterm_unmounts_and_exits_0() {
    if !common::require_fuse() {
        return;
    }
    let (_sc, m) = foreground_mount();
    let ended = m.unmount_with(Unmount::Signal(Signal::SIGTERM));
    ended_cleanly("SIGTERM", &ended);
}

#[test]
fn foreground_sigint_unmounts_and_exits_0() {
    if !common::require_fuse() {
        return;
    }
    let (_sc, m) = foreground_mount();
    let ended = m.unmount_with(Unmount::Signal(Signal::SIGINT));
    ended_cleanly("SIGINT", &ended);
}

#[test]
fn foreground_fusermount_u_exits_0() {
    if !common::require_fuse() {
        return;
    }
    let (_sc, m) = foreground_mount();
    let ended = m.unmount_with(Unmount::Fusermount);
    ended_cleanly("fusermount3 -u", &ended);
}

#[test]
fn foreground_umount_exits_0() {
    if !common::require_fuse() {
        return;
    }
    let (_sc, m) = foreground_mount();
    let ended = m.unmount_with(Unmount::Umount);
    ended_cleanly("umount", &ended);
}

/// Daemonized: the launcher exits 0 only once the mount is ready (no polling needed), with the
/// fstype `fuse.rsfs-overlay`; the daemon then exits 0 on `umount` and on SIGTERM.
#[test]
fn daemon_returns_when_ready_and_exits_0() {
    if !common::require_fuse() {
        return;
    }
    for how in [
        Unmount::Umount,
        Unmount::Fusermount,
        Unmount::Signal(Signal::SIGTERM),
    ] {
        let (_sc, l, m, _u, _w) = setup();
        let mnt = mount_ours_at(&m, &[&l], None, &[]);
        assert!(
            mnt.mounted_at_exit(),
            "the launcher exited before the mount was ready"
        );
        let fstype = mount_at(&m).map(|e| e.fstype);
        let want = if common::bin_is_overridden() {
            our_fstype()
        } else {
            "fuse.rsfs-overlay".to_string()
        };
        assert_eq!(fstype.as_deref(), Some(want.as_str()));
        assert!(
            mnt.daemon_pid().is_some(),
            "could not find the daemon process (not re-parented to the test?)"
        );
        let ended = mnt.unmount_with(how);
        ended_cleanly(&format!("daemonized, {how:?}"), &ended);
    }
}

#[test]
fn version_flag() {
    for flag in ["-V", "--version"] {
        let out = run_with_timeout(&our_bin(), &[os(flag)], timeout());
        assert!(
            out.status.is_some_and(|s| s.success()),
            "{flag}: {:?} {:?}",
            out.status,
            out.stderr
        );
        let text = format!("{}{}", out.stdout, out.stderr);
        let want = if common::bin_is_overridden() {
            "."
        } else {
            env!("CARGO_PKG_VERSION")
        };
        assert!(text.contains(want), "{flag} printed {text:?}");
    }
}

#[test]
fn help_flag_lists_layer_options() {
    for flag in ["-h", "--help"] {
        let out = run_with_timeout(&our_bin(), &[os(flag)], timeout());
        assert!(
            out.status.is_some_and(|s| s.success()),
            "{flag}: {:?} {:?}",
            out.status,
            out.stderr
        );
        let text = format!("{}{}", out.stdout, out.stderr);
        for opt in ["lowerdir", "upperdir", "workdir"] {
            assert!(text.contains(opt), "{flag} does not mention {opt}: {text}");
        }
    }
}

#[test]
fn refuses_a_second_mount_of_a_live_upper() {
    if !common::require_fuse() {
        return;
    }
    let (sc, l, _m, u, w) = setup();
    let first = common::mount_ours(&[&l], Some((&u, &w)), &[]);
    let m2 = sc.dir("m2");
    let a = args(
        format!("lowerdir={},upperdir={},workdir={}", s(&l), s(&u), s(&w)),
        &m2,
    );
    let out = run_with_timeout(&our_bin(), &a, timeout());
    let second_mounted = mount_at(&m2).is_some();
    if second_mounted {
        force_unmount(&m2);
    }
    assert!(!second_mounted, "a second mount of the same upper was made");
    assert!(
        matches!(out.status, Some(st) if !st.success()),
        "exit: {:?}",
        out.status
    );
    let err = out.stderr.trim_end();
    assert_eq!(err.lines().count(), 1, "stderr: {err:?}");
    assert!(err.contains("already in use"), "stderr: {err:?}");
    // The first mount is untouched and still serves its files.
    let hello =
        std::fs::read_to_string(first.path().join("hello")).expect("read through the first mount");
    assert_eq!(hello, "world");
}
