//! Interchange with the kernel's overlayfs, both ways, over one copy of a generated stack:
//!
//! - ours → kernel: a random operation sequence through our mount; what our mount shows is
//!   recorded; unmount; the kernel's overlayfs mounts the same lowers, upper and workdir and
//!   must show the same tree. Then ours mounts it again and must show the same tree too.
//! - kernel → ours: the same the other way round.
//!
//! Compared: every field of the snapshot (type, mode, owner, size, blocks, nlink, st_ino, rdev,
//! mtime, ctime, content, data map, symlink target, xattrs, private xattrs unreadable, sorted
//! listings with d_ino and d_type). Both views are of the same objects on one filesystem, so
//! st_ino must be equal (it survives copy-up and remount) and timestamps exactly equal.
//!
//! The stacks are those of `write_differential`: no multiply-linked lower file (a documented
//! difference: the kernel breaks such links on copy-up, we keep them), and a populated upper is
//! primed by a kernel mount first (origin recorded on its merged directories, as in an upper the
//! kernel has used).
//!
//! Environment: `RSFS_SEED=N` replays one seed; `RSFS_SEEDS` is a count, `A..B` or a list;
//! `RSFS_NOPS` operations per seed; `RSFS_VERBOSE=1` prints the operations of a failing seed;
//! `RSFS_OPS_EXCLUDE=kind,...` leaves operation kinds out (debugging aid).

mod common;

use common::Scratch;
use common::ops::{self, AnyMount, DiffCase, Executor, FileBlocks, Impl, Since, StackCopy, Tree};
use common::snapshot::CompareOpts;

const DEFAULT_OPS: usize = 120;

fn case_for(seed: u64) -> DiffCase {
    DiffCase {
        n_lowers: 2 + (seed % 2) as usize,
        with_upper: seed % 3 == 0,
        n_ops: ops::env_usize("RSFS_NOPS", DEFAULT_OPS),
        checkpoint_every: 0,
        exclude: ops::excluded_kinds(),
    }
}

/// Mount with `who`, snapshot, unmount.
fn view(who: Impl, copy: &StackCopy) -> Result<Tree, String> {
    let m = AnyMount::mount(who, copy).map_err(|e| format!("{} cannot mount: {e}", who.name()))?;
    let s = Tree::take(m.path(), &copy.ino_map(), None, true);
    match m.unmount() {
        Some(e) => Err(e),
        None => Ok(s),
    }
}

/// Write through `writer`, then read through `reader` (and through `writer` once more).
fn interchange(seed: u64, writer: Impl, reader: Impl) -> Vec<String> {
    let case = case_for(seed);
    let spec = ops::stack_spec(seed, &case);
    let pool = ops::path_pool(&spec);
    let seq = ops::generate_ops(seed, &pool, case.n_ops, &case.exclude);
    let scratch = Scratch::new();
    let copy = StackCopy::build(&spec, &scratch, "s");
    let mut diffs = Vec::new();

    let m = match AnyMount::mount(writer, &copy) {
        Ok(m) => m,
        Err(e) => return vec![format!("{} cannot mount: {e}", writer.name())],
    };
    let mut x = Executor::new(m.path(), Since::now());
    let mut failed_ops = 0;
    for op in &seq {
        if x.apply(op).is_err() {
            failed_ops += 1;
        }
    }
    x.close_all();
    drop(x);
    let written = Tree::take(m.path(), &copy.ino_map(), None, true);
    if let Some(e) = m.unmount() {
        diffs.push(e);
        return diffs;
    }
    eprintln!(
        "seed {seed}: {} ops through {} ({failed_ops} failed, as they may)",
        seq.len(),
        writer.name()
    );

    let wname = format!("{} before unmount", writer.name());
    for (who, label) in [
        (reader, format!("{} after remount", reader.name())),
        (writer, format!("{} after remount", writer.name())),
    ] {
        match view(who, &copy) {
            Err(e) => diffs.push(e),
            Ok(s) => {
                let opts = CompareOpts::new();
                diffs.extend(
                    ops::compare_trees(&wname, &written, &label, &s, opts, FileBlocks::Exact)
                        .into_iter()
                        .map(|d| format!("[{label}] {d}")),
                );
            }
        }
    }
    diffs
}

fn run_seeds(test: &str, base: u64, default_count: u64, writer: Impl, reader: Impl) {
    if !common::require_root_and_fuse() {
        return;
    }
    let seeds = ops::seeds(base, default_count);
    let mut report = String::new();
    let mut failed = 0;
    for &seed in &seeds {
        let diffs = interchange(seed, writer, reader);
        if diffs.is_empty() {
            continue;
        }
        failed += 1;
        let case = case_for(seed);
        report.push_str(&format!(
            "\n== seed {seed} (RSFS_SEED={seed}): {} lowers, {} upper, {} ops through {}: {} difference(s)\n",
            case.n_lowers,
            if case.with_upper { "populated" } else { "empty" },
            case.n_ops,
            writer.name(),
            diffs.len()
        ));
        for d in diffs.iter().take(60) {
            report.push_str("  ");
            report.push_str(d);
            report.push('\n');
        }
        if diffs.len() > 60 {
            report.push_str(&format!("  ... and {} more\n", diffs.len() - 60));
        }
        if std::env::var("RSFS_VERBOSE").is_ok_and(|v| v == "1") {
            let spec = ops::stack_spec(seed, &case);
            let seq = ops::generate_ops(seed, &ops::path_pool(&spec), case.n_ops, &case.exclude);
            for (i, op) in seq.iter().enumerate() {
                report.push_str(&format!("    {i:3} {op}\n"));
            }
        }
    }
    eprintln!("{test}: {} seeds, {failed} differ", seeds.len());
    if failed > 0 {
        panic!("{test}: {failed} of {} seeds differ:{report}", seeds.len());
    }
}

#[test]
fn ours_then_kernel() {
    run_seeds("ours_then_kernel", 5000, 10, Impl::Ours, Impl::Kernel);
}

#[test]
fn kernel_then_ours() {
    run_seeds("kernel_then_ours", 6000, 10, Impl::Kernel, Impl::Ours);
}

/// Uppers written with directory renames (`redirect_dir=on` on both sides) read back the same
/// under the other implementation.
const REDIRECT_KERNEL_OPTS: &[&str] = &["redirect_dir=on", "index=off", "metacopy=off"];

#[test]
fn redirects_ours_then_kernel() {
    ops::with_options(REDIRECT_KERNEL_OPTS, &["redirect_dir=on"], || {
        run_seeds(
            "redirects_ours_then_kernel",
            7500,
            6,
            Impl::Ours,
            Impl::Kernel,
        );
    });
}

#[test]
fn redirects_kernel_then_ours() {
    ops::with_options(REDIRECT_KERNEL_OPTS, &["redirect_dir=on"], || {
        run_seeds(
            "redirects_kernel_then_ours",
            7600,
            6,
            Impl::Kernel,
            Impl::Ours,
        );
    });
}
