//! Write-path differential tests: seeded random sequences of operations applied, in lockstep,
//! to the kernel's overlayfs and to ours, each over its own copy of the same generated stack
//! (2–3 lowers holding whiteouts — char 0/0 and xattr ones —, opaque directories, symlinks,
//! fifos, devices, xattrs; for a third of the seeds an upper already populated too, hard links
//! included, and primed by one kernel mount walking it, as an upper the kernel has used).
//!
//! No lower file has more than one name: there we differ from the kernel on purpose (it breaks
//! a lower file's hard links on copy-up, we keep them together; see the README's "Differences
//! from kernel overlayfs"), and `lower_hard_links_stay_together` asserts our semantics alone.
//!
//! Asserted, in order, stopping at the first difference of a seed:
//! - every operation's result (the value or errno, and the attributes it leaves: type, mode,
//!   owner, size, nlink, rdev, mtime when old) is the kernel's;
//! - every `RSFS_CHECKPOINT` operations and at the end, the merged trees are the same: type,
//!   mode, owner, size, nlink, st_ino (named by the layer object it belongs to, so st_ino must
//!   survive copy-up), rdev, content, data map (`SEEK_DATA`/`SEEK_HOLE` extents), symlink
//!   target, xattrs, private xattrs unreadable, sorted listings with d_ino and d_type, mtime
//!   (exact when older than the test, else only "changed during the test" on both), ctime
//!   ("changed during the test" on both), st_blocks (regular files within one ext4
//!   extent-tree block: each side has its own copy, and ext4 may fragment one differently);
//! - our daemon exits 0 on unmount; neither mount changed its lowers;
//! - the two upper directories are the same: entries, whiteouts (type and device), opaque
//!   markers, types, modes, owners, contents, data maps, xattrs (the overlay's included;
//!   `trusted.overlay.uuid` on the root ignored, `trusted.overlay.origin` compared by
//!   presence: its value names the lower copy's inode), hard-link structure, times as above.
//!
//! Our mount gets `-o dev` (the kernel's overlay allows device files; FUSE mounts refuse them
//! by default). `harness_kernel_matches_itself` runs the same harness with the kernel on both
//! sides: if it fails, the test code is wrong, not ours.
//!
//! Environment: `RSFS_SEED=N` replays one seed; `RSFS_SEEDS` is a count, `A..B` or a list;
//! `RSFS_NOPS` operations per seed; `RSFS_CHECKPOINT` the checkpoint interval;
//! `RSFS_SHRINK=1` looks for a shorter failing sequence (slow: it replays each candidate);
//! `RSFS_VERBOSE=1` prints each operation and the kernel's result. Debugging aids, not for CI:
//! `RSFS_OPS_EXCLUDE=kind,...` leaves operation kinds out, `RSFS_OURS_OPTS=timeout=0` adds
//! mount options for ours, `RSFS_KERNEL_OPTS=...` replaces the kernel's options.

mod common;

use common::ops::{self, DiffCase, Failure, Impl, Op};

const DEFAULT_OPS: usize = 150;
const DEFAULT_CHECKPOINT: usize = 25;

/// Kinds that touch names: creation, removal, rename, links.
const NAMESPACE: &[&str] = &[
    "create", "mkfifo", "mkdir", "symlink", "link", "unlink", "rmdir", "rename", "stat", "readdir",
    "readlink",
];
/// Kinds that touch data, by path and through open files.
const DATA: &[&str] = &[
    "create",
    "write",
    "append",
    "truncate",
    "ftruncate",
    "fallocate",
    "read",
    "copy_file_range",
    "seek",
    "fsync",
    "slot_open",
    "slot_write",
    "slot_read",
    "slot_truncate",
    "slot_stat",
    "slot_fsync",
    "slot_close",
    "unlink",
    "rename",
    "stat",
];
/// Kinds that touch attributes.
const METADATA: &[&str] = &[
    "chmod",
    "chown",
    "utimens",
    "setxattr",
    "removexattr",
    "getxattr",
    "listxattr",
    "stat",
    "mkdir",
    "create",
    "link",
    "rename",
];

/// Every kind not in `only`, plus whatever `RSFS_OPS_EXCLUDE` names.
fn exclude_all_but(only: Option<&[&str]>) -> Vec<String> {
    let mut ex = ops::excluded_kinds();
    if let Some(only) = only {
        ex.extend(
            ops::KINDS
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| !only.contains(k))
                .map(String::from),
        );
    }
    ex
}

fn case_for(seed: u64, exclude: Vec<String>) -> DiffCase {
    DiffCase {
        n_lowers: 2 + (seed % 2) as usize,
        with_upper: seed % 3 == 0,
        n_ops: ops::env_usize("RSFS_NOPS", DEFAULT_OPS),
        checkpoint_every: ops::env_usize("RSFS_CHECKPOINT", DEFAULT_CHECKPOINT),
        exclude,
    }
}

fn describe(seed: u64, case: &DiffCase, ops_run: &[Op], f: &Failure, shrunk: bool) -> String {
    let mut s = format!(
        "\n== seed {seed} (RSFS_SEED={seed}): {} lowers, {} upper; first difference [{}] at step {}\n",
        case.n_lowers,
        if case.with_upper {
            "populated"
        } else {
            "empty"
        },
        f.signature,
        f.step
    );
    for l in f.lines.iter().take(60) {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
    if f.lines.len() > 60 {
        s.push_str(&format!("  ... and {} more\n", f.lines.len() - 60));
    }
    s.push_str(&format!(
        "  {} sequence ({} ops; mtime/ctime (-1, -1) = changed during the test, ctime (0, 0) = older):\n",
        if shrunk { "shrunk" } else { "operation" },
        ops_run.len()
    ));
    let end = (f.step + 1).min(ops_run.len());
    for (i, op) in ops_run[..end].iter().enumerate() {
        s.push_str(&format!("    {i:3} {op}\n"));
    }
    s
}

/// Run every seed; fail once at the end with each failing seed's first difference.
fn run_seeds(name: &str, base: u64, default_count: u64, only: Option<&[&str]>, subject: Impl) {
    if !common::require_root_and_fuse() {
        return;
    }
    let exclude = exclude_all_but(only);
    let mut report = String::new();
    let mut failed = 0;
    let seeds = ops::seeds(base, default_count);
    let mut total_ops = 0;
    for &seed in &seeds {
        let case = case_for(seed, exclude.clone());
        let spec = ops::stack_spec(seed, &case);
        let pool = ops::path_pool(&spec);
        let seq = ops::generate_ops(seed, &pool, case.n_ops, &case.exclude);
        total_ops += seq.len();
        let Some(f) = ops::run_differential(&spec, &seq, case.checkpoint_every, subject) else {
            continue;
        };
        failed += 1;
        eprintln!(
            "{name}: seed {seed} differs [{}] at step {}",
            f.signature, f.step
        );
        if std::env::var("RSFS_SHRINK").is_ok_and(|v| v == "1") {
            let prefix = &seq[..(f.step + 1).min(seq.len())];
            let (small, sf) = ops::shrink(prefix, &f.signature, 80, |cand| {
                ops::run_differential(&spec, cand, case.checkpoint_every, subject)
            });
            let sf = sf.unwrap_or_else(|| f.clone());
            report.push_str(&describe(seed, &case, &small, &sf, true));
        } else {
            report.push_str(&describe(seed, &case, &seq, &f, false));
        }
    }
    eprintln!(
        "{name}: {} seeds, {total_ops} operations, {failed} seed(s) differ",
        seeds.len()
    );
    if failed > 0 {
        panic!(
            "{name}: {failed} of {} seeds differ from the kernel's overlayfs:{report}",
            seeds.len()
        );
    }
}

#[test]
fn namespace_ops_match_kernel() {
    run_seeds(
        "namespace_ops_match_kernel",
        1000,
        8,
        Some(NAMESPACE),
        Impl::Ours,
    );
}

#[test]
fn data_ops_match_kernel() {
    run_seeds("data_ops_match_kernel", 2000, 8, Some(DATA), Impl::Ours);
}

#[test]
fn metadata_ops_match_kernel() {
    run_seeds(
        "metadata_ops_match_kernel",
        3000,
        8,
        Some(METADATA),
        Impl::Ours,
    );
}

#[test]
fn all_ops_match_kernel() {
    run_seeds("all_ops_match_kernel", 4000, 16, None, Impl::Ours);
}

/// The kernel's options for directory renames (`redirect_dir=on`) on both sides: renames of
/// lower and merged directories write redirects instead of failing with EXDEV, new directories
/// in merged ones are opaque; every operation kind, as `all_ops_match_kernel`.
const REDIRECT_KERNEL_OPTS: &[&str] = &["redirect_dir=on", "index=off", "metacopy=off"];

#[test]
fn redirect_dir_on_matches_kernel() {
    ops::with_options(REDIRECT_KERNEL_OPTS, &["redirect_dir=on"], || {
        run_seeds("redirect_dir_on_matches_kernel", 7000, 10, None, Impl::Ours);
    });
}

/// Metadata-only copy-up (`metacopy=on`, which brings `redirect_dir=on`) on both sides: a
/// chmod, chown, utimes, xattr change, link or rename of a lower file copies up its metadata
/// only (an upper `overlay.metacopy` file, renamed ones with a redirect to their data); reads
/// still come from the lower; a write, an append or a truncate copies the data up. The upper
/// directories are compared too, so every metacopy mark and redirect must be the kernel's.
const METACOPY_KERNEL_OPTS: &[&str] = &["redirect_dir=on", "index=off", "metacopy=on"];

#[test]
fn metacopy_on_matches_kernel() {
    ops::with_options(METACOPY_KERNEL_OPTS, &["metacopy=on"], || {
        run_seeds("metacopy_on_matches_kernel", 7800, 10, None, Impl::Ours);
    });
}

/// The kernel's three optional features at once (`redirect_dir=on,index=on,metacopy=on`) on
/// both sides, with multiply-linked lower files in the stacks: a copy-up of one name of a hard
/// link goes to the index (`<workdir>/index`, named by its origin) and every other name reaches
/// it; link counts are kept in `overlay.nlink` as the kernel keeps them. The upper directories
/// are compared too (the index itself lives in the workdir).
///
/// Ours runs with `timeout=0`: a change through a lower name of a copied-up hard link links
/// that name up first (the kernel's rule), but a FUSE request does not say which name it came
/// through, so ours takes the name looked up last; with no entry caching every path walk looks
/// the name up again, which makes that the name used, as in the kernel. (With caching, another
/// name of the same file may be linked up instead: same file, same contents and counts; only
/// which parent directories were copied up differs. See the README.)
const ALL_FEATURES_KERNEL_OPTS: &[&str] = &["redirect_dir=on", "index=on", "metacopy=on"];

#[test]
fn index_redirect_metacopy_on_match_kernel() {
    ops::with_options(
        ALL_FEATURES_KERNEL_OPTS,
        &["redirect_dir=on", "index=on", "metacopy=on", "timeout=0"],
        || {
            run_seeds(
                "index_redirect_metacopy_on_match_kernel",
                8200,
                10,
                None,
                Impl::Ours,
            );
        },
    );
}

/// A capped mount measures every change it makes to the upper (`upper_limit=`): the
/// measuring must not change what any operation does. A cap far above what the runs write.
#[test]
fn capped_mount_matches_kernel() {
    ops::with_options(
        ops::KERNEL_OPTS,
        &["upper_limit=1T", "upper_inodes=1000000"],
        || {
            run_seeds("capped_mount_matches_kernel", 7600, 10, None, Impl::Ours);
        },
    );
}

/// The harness itself: the kernel's overlayfs against itself over two copies of a stack must
/// show no difference at all (timestamps, inode names, block counts and upper-directory
/// comparison included). A failure here is a bug in the test code, not in ours.
#[test]
fn harness_kernel_matches_itself() {
    run_seeds("harness_kernel_matches_itself", 9000, 6, None, Impl::Kernel);
}

/// Our documented semantics for a lower file with several names (README, "Differences from
/// kernel overlayfs"; the kernel with `index=off` breaks the link instead, which is why the
/// random stacks above hold no multiply-linked lower file): a write through one name copies the
/// file up once and every name shows it, as one inode, during the mount (a name looked up only
/// after the write included), in the upper after unmount, and after a remount. The lower file
/// is left alone.
#[test]
fn lower_hard_links_stay_together() {
    use std::os::unix::fs::MetadataExt;
    if !common::require_root_and_fuse() {
        return;
    }
    const NAMES: [&str; 3] = ["a/x", "a/y", "b/z"];
    const OLD: &[u8] = b"old content of the lower file\n";
    const NEW: &[u8] = b"new";
    let scratch = common::Scratch::new();
    let lower = common::Layer::new(scratch.join("l"));
    lower
        .file("a/x", OLD)
        .hardlink("a/x", "a/y")
        .dir("b")
        .hardlink("a/x", "b/z");
    let upper = scratch.dir("u");
    let work = scratch.dir("w");
    let lowers = [lower.root()];
    let meta = |p: &std::path::Path| {
        std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    };
    let lower_ino = meta(&lower.path("a/x")).ino();

    let m = common::mount_ours(&lowers, Some((&upper, &work)), &[]);
    let at = |name: &str| m.path().join(name);
    // Two names looked up before the write; `b/z` is met only after it.
    let before = meta(&at("a/x"));
    assert_eq!(before.nlink(), 3, "/a/x before the write: st_nlink");
    assert_eq!(
        meta(&at("a/y")).ino(),
        before.ino(),
        "/a/y before the write: st_ino of /a/x"
    );
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(at("a/x"))
            .expect("open /a/x O_WRONLY|O_TRUNC");
        f.write_all(NEW).expect("write /a/x");
    }
    for name in ["a/y", "b/z", "a/x"] {
        let st = meta(&at(name));
        assert_eq!(read(&at(name)), NEW, "/{name} after the write: content");
        assert_eq!(st.ino(), before.ino(), "/{name} after the write: st_ino");
        assert_eq!(st.nlink(), 3, "/{name} after the write: st_nlink");
        assert_eq!(
            st.len(),
            NEW.len() as u64,
            "/{name} after the write: st_size"
        );
    }
    let ended = m.unmount();
    assert_eq!(
        ended.daemon,
        common::DaemonExit::Exited(0),
        "our daemon on unmount; stderr: {}",
        ended.stderr
    );

    let up = common::Layer::new(&upper);
    let first = meta(&up.path(NAMES[0]));
    for name in NAMES {
        let st = meta(&up.path(name));
        assert!(st.is_file(), "upper /{name}: not a regular file");
        assert_eq!(
            st.ino(),
            first.ino(),
            "upper /{name}: st_ino of upper /{}",
            NAMES[0]
        );
        assert_eq!(st.nlink(), 3, "upper /{name}: st_nlink");
        assert_eq!(read(&up.path(name)), NEW, "upper /{name}: content");
    }
    for name in NAMES {
        let st = meta(&lower.path(name));
        assert_eq!(st.ino(), lower_ino, "lower /{name}: st_ino");
        assert_eq!(st.nlink(), 3, "lower /{name}: st_nlink");
        assert_eq!(read(&lower.path(name)), OLD, "lower /{name}: content");
    }

    let m = common::mount_ours(&lowers, Some((&upper, &work)), &[]);
    let at = |name: &str| m.path().join(name);
    let first = meta(&at(NAMES[0]));
    for name in NAMES {
        let st = meta(&at(name));
        assert_eq!(read(&at(name)), NEW, "/{name} after remount: content");
        assert_eq!(
            st.ino(),
            first.ino(),
            "/{name} after remount: st_ino of /{}",
            NAMES[0]
        );
        assert_eq!(st.nlink(), 3, "/{name} after remount: st_nlink");
    }
    let ended = m.unmount();
    assert_eq!(
        ended.daemon,
        common::DaemonExit::Exited(0),
        "our daemon on the second unmount; stderr: {}",
        ended.stderr
    );
}

/// With `passthrough=upper`, a file opened read-only in a lower layer and copied up while open
/// reads the copy from then on, as under the kernel (whose overlay moves an open file to its copy
/// at the next use; by default lower files pass through and such a reader keeps the lower file,
/// see tests/passthrough.rs):
/// what is written to the copy by path, a truncation by path, and the truncation of an
/// `O_RDONLY|O_TRUNC` open (which FUSE sends as a setattr after opening the lower file; seed
/// 7508 of `all_ops_match_kernel` read the lower file's data through it, or nothing past it).
#[test]
fn reader_follows_copy_up() {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if !common::require_root_and_fuse() {
        return;
    }
    let content: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let run = |who: Impl| -> Vec<String> {
        let scratch = common::Scratch::new();
        let lower = common::Layer::new(scratch.join("l"));
        lower
            .file("trunc", &content)
            .file("written", &content)
            .file("shrunk", &content);
        let upper = scratch.dir("u");
        let work = scratch.dir("w");
        let lowers = [lower.root()];
        let mut seen = Vec::new();
        let scenario = |root: &std::path::Path, seen: &mut Vec<String>| {
            let at = |name: &str| root.join(name);
            let open = |name: &str, flags: i32| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(flags)
                    .open(at(name))
                    .unwrap_or_else(|e| panic!("{}: open /{name}: {e}", who.name()))
            };
            let write_by_path = |name: &str, offset: u64, data: &[u8]| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(at(name))
                    .and_then(|f| f.write_all_at(data, offset))
                    .unwrap_or_else(|e| panic!("{}: write /{name}: {e}", who.name()))
            };
            let mut pread = |what: &str, f: &std::fs::File, offset: u64, len: usize| {
                let mut buf = vec![0u8; len];
                let n = f
                    .read_at(&mut buf, offset)
                    .unwrap_or_else(|e| panic!("{}: {what}: pread: {e}", who.name()));
                let size = f.metadata().map(|m| m.len()).ok();
                seen.push(format!(
                    "{what}: {n} bytes #{:016x} at {offset}, size {size:?}",
                    common::prng::fnv1a(&buf[..n])
                ));
            };

            let trunc = open("trunc", libc::O_TRUNC);
            write_by_path("trunc", 91_719, b"written past the end by path");
            pread("O_RDONLY|O_TRUNC, written by path", &trunc, 65_536, 10_457);
            pread("O_RDONLY|O_TRUNC, written by path", &trunc, 91_700, 100);

            let reader = open("written", 0);
            pread("reader before the copy-up", &reader, 0, 16);
            write_by_path("written", 0, b"NEW DATA");
            write_by_path("written", 40_000, b"NEW DATA");
            pread("reader after a write by path", &reader, 0, 16);
            pread("reader after a write by path", &reader, 40_000, 16);

            let reader = open("shrunk", 0);
            std::fs::OpenOptions::new()
                .write(true)
                .open(at("shrunk"))
                .and_then(|f| f.set_len(5_000))
                .unwrap_or_else(|e| panic!("{}: truncate /shrunk: {e}", who.name()));
            pread("reader after a truncation by path", &reader, 4_096, 4_096);
        };
        match who {
            Impl::Kernel => {
                let m = common::mount_kernel(&lowers, Some((&upper, &work)), ops::KERNEL_OPTS);
                scenario(m.path(), &mut seen);
                assert!(m.unmount(), "kernel overlay unmount failed");
            }
            Impl::Ours => {
                let m = common::mount_ours(&lowers, Some((&upper, &work)), &["passthrough=upper"]);
                scenario(m.path(), &mut seen);
                let ended = m.unmount();
                assert_eq!(
                    ended.daemon,
                    common::DaemonExit::Exited(0),
                    "our daemon on unmount; stderr: {}",
                    ended.stderr
                );
            }
        }
        seen
    };
    let (kernel, ours) = (run(Impl::Kernel), run(Impl::Ours));
    for (i, (k, o)) in kernel.iter().zip(&ours).enumerate() {
        assert_eq!(o, k, "read {i} differs from the kernel's (left: ours)");
    }
    assert_eq!(ours.len(), kernel.len(), "number of reads");
}

/// Print the generated stack of `RSFS_SEED` (each layer's objects), to read a failure report:
/// `RSFS_SEED=N cargo test --release --test write_differential dump_stack -- --ignored --nocapture`.
#[test]
#[ignore]
fn dump_stack() {
    for seed in ops::seeds(4000, 1) {
        let case = case_for(seed, Vec::new());
        let spec = ops::stack_spec(seed, &case);
        println!(
            "seed {seed}: {} lowers, upper: {}",
            case.n_lowers, case.with_upper
        );
        let names: Vec<String> = spec
            .upper
            .iter()
            .map(|_| "upper".to_string())
            .chain((0..spec.lowers.len()).map(|i| format!("lower {i} (lowerdir #{})", i + 1)))
            .collect();
        for (name, layer) in names.iter().zip(spec.layers_top_first()) {
            println!("  {name}: root {:?}", layer.root);
            for (path, node) in &layer.nodes {
                println!("    /{path}: {}", ops::describe_node(node));
            }
        }
    }
}
