//! Read-path differential tests: the same layers mounted by the kernel's overlayfs and by us must
//! show the same tree — type, mode, owner, size, content, symlink targets, xattrs, nlink, st_ino
//! (all layers share /tmp's filesystem, so the kernel reports the underlying inode numbers),
//! d_ino == st_ino, sorted listings — and the overlay's private xattrs must be neither listed nor
//! readable.
//!
//! Stacks are generated from seeds; a failure names its seed. Rerun one case with
//! `RSFS_TEST_SEED=<seed> cargo test --test read_differential <name>`. Point the tests at
//! another implementation with `RSFS_TEST_BIN=/usr/bin/fuse-overlayfs`.

mod common;

use std::os::unix::fs::FileExt;

use nix::unistd::{Whence, lseek};
use std::path::{Path, PathBuf};

use common::snapshot::{self, CompareOpts, InoMap, Snapshot, SnapshotOpts, compare};
use common::stackgen::{self, GenParams, StackSpec, Style};
use common::{Layer, Scratch, Xflavor, mount_kernel, mount_ours};

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("RSFS_TEST_SEED") {
        Ok(s) if !s.trim().is_empty() => s
            .split(',')
            .map(|x| {
                let x = x.trim();
                match x.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16),
                    None => x.parse(),
                }
                .unwrap_or_else(|_| panic!("bad RSFS_TEST_SEED {x:?}"))
            })
            .collect(),
        _ => default.to_vec(),
    }
}

/// Run `case` for every seed; fail once at the end with every failing seed's differences.
fn for_seeds(name: &str, default: &[u64], case: impl Fn(u64) -> Vec<String>) {
    if !common::require_root_and_fuse() {
        return;
    }
    let mut failures = Vec::new();
    for seed in seeds(default) {
        let diffs = case(seed);
        if !diffs.is_empty() {
            failures.push((seed, diffs));
        }
    }
    if failures.is_empty() {
        return;
    }
    let mut msg = String::new();
    for (seed, diffs) in &failures {
        msg.push_str(&format!(
            "\n== {name}, seed {seed} (RSFS_TEST_SEED={seed}): {} difference(s)\n",
            diffs.len()
        ));
        for d in diffs.iter().take(80) {
            msg.push_str("  ");
            msg.push_str(d);
            msg.push('\n');
        }
        if diffs.len() > 80 {
            msg.push_str(&format!("  ... and {} more\n", diffs.len() - 80));
        }
    }
    panic!("{} of the seeds differ:{msg}", failures.len());
}

#[derive(Clone, Copy)]
struct Case {
    n_lowers: usize,
    with_upper: bool,
    flavor: Xflavor,
    tiny: bool,
    /// Prime the upper as a kernel-made one would be (see `prime_upper`).
    prime: bool,
}

impl Case {
    fn params(&self) -> GenParams {
        if self.tiny {
            GenParams::tiny()
        } else {
            GenParams::small()
        }
    }
}

/// Snapshot both mounts, name inodes by the layer object they come from, and list every
/// difference: kernel vs ours, ours' own d_ino/d_type consistency, lookups of hidden names,
/// and private xattrs visible through ours.
#[allow(clippy::too_many_arguments)]
fn diff_mounts(
    kernel: &Path,
    kernel_map: &InoMap,
    ours: &Path,
    ours_map: &InoMap,
    flavor: Xflavor,
    probe_paths: &[String],
    opts: &CompareOpts,
) -> Vec<String> {
    let sopts = SnapshotOpts::private_probes(flavor.prefix());
    let mut ks = Snapshot::take(kernel, &sopts);
    ks.relabel(kernel_map);
    // Ours is still cold: meet every inode through lookup first, then walk it with readdir.
    let mut diffs = if opts.skips("/", "ino") {
        Vec::new()
    } else {
        snapshot::cold_lookup_inos("kernel", &ks, "ours", ours, ours_map)
    };
    let mut os = Snapshot::take(ours, &sopts);
    os.relabel(ours_map);
    diffs.extend(compare("kernel", &ks, "ours", &os, opts));
    diffs.extend(os.self_check("ours"));
    let kl = snapshot::lookups(kernel, probe_paths);
    let ol = snapshot::lookups(ours, probe_paths);
    diffs.extend(snapshot::compare_lookups("kernel", &kl, "ours", &ol));
    for x in os.xattrs_with_prefix(flavor.prefix()) {
        if !ks.xattrs_with_prefix(flavor.prefix()).contains(&x) {
            diffs.push(format!("private xattr listed by ours: {x}"));
        }
    }
    for x in os.readable_probes() {
        diffs.push(format!("private xattr readable through ours: {x}"));
    }
    diffs
}

/// Kernel-format layers (xattr whiteouts among them), kernel vs ours: differences in the
/// merged view.
fn kernel_case(seed: u64, c: Case) -> Vec<String> {
    let (mut view, disk) = kernel_case_full(seed, c);
    // A primed upper must come out of a read-only walk as it went in, through either mount.
    view.extend(disk);
    view
}

/// Differences in the merged view, and in the upper layers as left on disk afterwards.
fn kernel_case_full(seed: u64, c: Case) -> (Vec<String>, Vec<String>) {
    let scratch = Scratch::new();
    let spec = stackgen::generate(seed, c.n_lowers, c.with_upper, &c.params());
    let lower_style = Style::Kernel {
        flavor: c.flavor,
        xattr_whiteouts: true,
    };
    let upper_style = Style::Kernel {
        flavor: c.flavor,
        xattr_whiteouts: false,
    };
    let lowers = stackgen::build_lowers(&spec, &scratch, "l", lower_style);
    let uk = stackgen::build_upper(&spec, &scratch, "uk", "wk", upper_style);
    let uo = stackgen::build_upper(&spec, &scratch, "uo", "wo", upper_style);
    let lower_refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();

    // The kernel wants two lowers for a read-only mount: give it an empty second one. Its root
    // is then a merged directory (nlink 1), where our single-layer root is not.
    let mut kernel_lowers = lower_refs.clone();
    let empty;
    let mut opts = CompareOpts::new();
    if c.n_lowers == 1 && !c.with_upper {
        empty = scratch.dir("le");
        kernel_lowers.push(&empty);
        opts = opts.skip_at("/", "nlink");
    }
    if c.with_upper {
        // Each mount has its own copy of the upper, written at a different moment.
        opts = opts.skip("ctime");
    }
    let uk_ref = uk.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
    let uo_ref = uo.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
    if let (Some((uk, _)), Some((uo, _)), true) = (uk_ref, uo_ref, c.prime) {
        prime_upper(&lower_refs, uk, c.flavor, &scratch, &[uo]);
    }
    let km = mount_kernel(&kernel_lowers, uk_ref, c.flavor.mount_opts());
    let om = mount_ours(&lower_refs, uo_ref, c.flavor.mount_opts());
    let kmap = InoMap::for_stack(&lower_refs, uk_ref.map(|p| p.0));
    let omap = InoMap::for_stack(&lower_refs, uo_ref.map(|p| p.0));
    let diffs = diff_mounts(
        km.path(),
        &kmap,
        om.path(),
        &omap,
        c.flavor,
        &spec.probe_paths(),
        &opts,
    );
    drop(om);
    drop(km);
    let disk = match (&uk, &uo) {
        (Some((uk, _)), Some((uo, _))) => upper_after_walk(uk, uo),
        _ => Vec::new(),
    };
    (diffs, disk)
}

/// Give a hand-made upper what a kernel-made one has: the kernel records
/// `<prefix>origin` on a merged upper directory (and `impure` on its parent, its `uuid` on the
/// upper root) the first time it looks one up, and until then its d_ino for that directory is
/// the upper's inode while st_ino is already the lower's. Mount the kernel on `upper` once, look
/// everything up, unmount, and copy the overlay xattrs it wrote onto `copies` (the same upper
/// built again for other mounts; the origins name the same, shared lower objects).
fn prime_upper(
    lowers: &[&Path],
    upper: &Path,
    flavor: Xflavor,
    scratch: &Scratch,
    copies: &[&Path],
) {
    let name = upper.file_name().and_then(|n| n.to_str()).unwrap_or("u");
    let work = scratch.dir(&format!("{name}.primework"));
    let km = mount_kernel(lowers, Some((upper, &work)), flavor.mount_opts());
    Snapshot::take(
        km.path(),
        &SnapshotOpts {
            no_content: true,
            ..SnapshotOpts::default()
        },
    );
    drop(km);
    for copy in copies {
        copy_overlay_xattrs(upper, copy, flavor.prefix());
    }
}

/// Set on each path under `to` the xattrs starting with `prefix` found at the same path under
/// `from`.
fn copy_overlay_xattrs(from: &Path, to: &Path, prefix: &str) {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let src = from.join(&rel);
        let Ok(md) = std::fs::symlink_metadata(&src) else {
            continue;
        };
        for n in common::xattr::list(&src).unwrap_or_default() {
            let n = String::from_utf8_lossy(&n).into_owned();
            if n.starts_with(prefix) {
                let v = common::xattr::get(&src, &n).expect("read overlay xattr");
                common::xattr::set(&to.join(&rel), &n, &v)
                    .unwrap_or_else(|e| panic!("copy {n} to {}: {e}", to.join(&rel).display()));
            }
        }
        if md.is_dir() {
            for e in std::fs::read_dir(&src).expect("readdir").flatten() {
                stack.push(rel.join(e.file_name()));
            }
        }
    }
}

/// The two copies of the upper, after each mount was walked read-only and unmounted, must
/// still be alike: what the kernel records in its upper on lookup (e.g. origin xattrs on merged
/// directories) we must record too, and we must write nothing it does not.
fn upper_after_walk(kernel_upper: &Path, our_upper: &Path) -> Vec<String> {
    let sopts = SnapshotOpts::default();
    // A uuid xattr (random per filesystem) can only be compared for presence.
    let take = |p: &Path| {
        let mut s = Snapshot::take(p, &sopts);
        for e in s.entries.values_mut() {
            if let Ok(xs) = e.xattrs.as_mut() {
                for (n, v) in xs.iter_mut() {
                    if n.ends_with(".overlay.uuid") {
                        *v = Ok(b"<some uuid>".to_vec());
                    }
                }
            }
        }
        s
    };
    let k = take(kernel_upper);
    let o = take(our_upper);
    let opts = CompareOpts::new().skip("ino").skip("d_ino").skip("ctime");
    compare("kernel's upper", &k, "our upper", &o, &opts)
        .into_iter()
        .map(|d| format!("upper on disk after a read-only walk: {d}"))
        .collect()
}

fn kcase(n_lowers: usize, with_upper: bool) -> Case {
    Case {
        n_lowers,
        with_upper,
        flavor: Xflavor::Trusted,
        tiny: n_lowers > 20,
        prime: true,
    }
}

#[test]
fn lower_only_1_layer() {
    for_seeds("lower_only_1_layer", &[101, 102, 103], |s| {
        kernel_case(s, kcase(1, false))
    });
}

#[test]
fn lower_only_2_layers() {
    for_seeds(
        "lower_only_2_layers",
        &[201, 202, 203, 204, 205, 206],
        |s| kernel_case(s, kcase(2, false)),
    );
}

#[test]
fn lower_only_5_layers() {
    for_seeds("lower_only_5_layers", &[501, 502, 503, 504], |s| {
        kernel_case(s, kcase(5, false))
    });
}

#[test]
fn lower_only_128_layers() {
    for_seeds("lower_only_128_layers", &[12801, 12802], |s| {
        kernel_case(s, kcase(128, false))
    });
}

#[test]
fn upper_and_1_lower() {
    for_seeds("upper_and_1_lower", &[1101, 1102, 1103], |s| {
        kernel_case(s, kcase(1, true))
    });
}

#[test]
fn upper_and_2_lowers() {
    for_seeds("upper_and_2_lowers", &[1201, 1202, 1203, 1204, 1205], |s| {
        kernel_case(s, kcase(2, true))
    });
}

#[test]
fn upper_and_5_lowers() {
    for_seeds("upper_and_5_lowers", &[1501, 1502, 1503], |s| {
        kernel_case(s, kcase(5, true))
    });
}

#[test]
fn upper_and_128_lowers() {
    for_seeds("upper_and_128_lowers", &[11281, 11282], |s| {
        kernel_case(s, kcase(128, true))
    });
}

/// Hand-made uppers, not primed: after both mounts were walked read-only, the two (identical)
/// uppers must still be identical. The kernel records metadata on lookup (origin on merged
/// directories, impure, the uuid on the upper root) that gives merged directories their
/// persistent st_ino and d_ino, and that a later kernel mount of our upper relies on.
#[test]
fn upper_on_disk_after_read_only_walk() {
    for_seeds("upper_on_disk_after_read_only_walk", &[1201, 1501], |s| {
        let c = Case {
            prime: false,
            ..kcase(if s > 1500 { 5 } else { 2 }, true)
        };
        kernel_case_full(s, c).1
    });
}

#[test]
fn userxattr_lower_only_5_layers() {
    for_seeds("userxattr_lower_only_5_layers", &[2501, 2502], |s| {
        kernel_case(
            s,
            Case {
                flavor: Xflavor::User,
                ..kcase(5, false)
            },
        )
    });
}

#[test]
fn userxattr_upper_and_2_lowers() {
    for_seeds("userxattr_upper_and_2_lowers", &[2201, 2202], |s| {
        kernel_case(
            s,
            Case {
                flavor: Xflavor::User,
                ..kcase(2, true)
            },
        )
    });
}

/// Lowers written in a format the kernel does not read (OCI `.wh.` files, or a mix of every
/// format) for us; the same stack in the kernel's format for the kernel, whose view is the
/// expected one.
fn format_case(seed: u64, n_lowers: usize, with_upper: bool, ours_style: Style) -> Vec<String> {
    let scratch = Scratch::new();
    let spec: StackSpec = stackgen::generate(seed, n_lowers, with_upper, &GenParams::small());
    let kstyle = Style::Kernel {
        flavor: Xflavor::Trusted,
        xattr_whiteouts: false,
    };
    let olowers = stackgen::build_lowers(&spec, &scratch, "o", ours_style);
    let klowers = stackgen::build_lowers(&spec, &scratch, "k", kstyle);
    let uk = stackgen::build_upper(&spec, &scratch, "uk", "wk", kstyle);
    let uo = stackgen::build_upper(&spec, &scratch, "uo", "wo", kstyle);
    let orefs: Vec<&Path> = olowers.iter().map(PathBuf::as_path).collect();
    let krefs: Vec<&Path> = klowers.iter().map(PathBuf::as_path).collect();
    let uk_ref = uk.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
    let uo_ref = uo.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
    let km = mount_kernel(&krefs, uk_ref, &[]);
    let om = mount_ours(&orefs, uo_ref, &[]);
    let kmap = InoMap::for_stack(&krefs, uk_ref.map(|p| p.0));
    let omap = InoMap::for_stack(&orefs, uo_ref.map(|p| p.0));
    // Separate copies of every layer: ctimes differ by construction, and so can st_blocks where
    // the copies' overlay xattrs differ (ext4 may need an xattr block for one and not the other).
    let mut opts = CompareOpts::new().skip("ctime").skip("blocks");
    if with_upper {
        // The uppers cannot be primed (see `prime_upper`) for our OCI lowers, so the kernel's
        // d_ino of merged directories is the upper's inode on this first walk. Our d_ino is
        // still checked against our st_ino, and st_ino against the kernel's.
        opts = opts.skip("d_ino");
    }
    let diffs = diff_mounts(
        km.path(),
        &kmap,
        om.path(),
        &omap,
        Xflavor::Trusted,
        &spec.probe_paths(),
        &opts,
    );
    drop(om);
    drop(km);
    diffs
}

#[test]
fn oci_whiteouts_lower_only() {
    for_seeds("oci_whiteouts_lower_only", &[3201, 3202, 3203, 3501], |s| {
        format_case(s, if s > 3500 { 5 } else { 2 }, false, Style::Oci)
    });
}

#[test]
fn oci_whiteouts_with_upper() {
    for_seeds("oci_whiteouts_with_upper", &[3301, 3302, 3303], |s| {
        format_case(s, 3, true, Style::Oci)
    });
}

#[test]
fn mixed_whiteout_formats() {
    let style = Style::Mixed {
        flavor: Xflavor::Trusted,
    };
    for_seeds("mixed_whiteout_formats", &[3401, 3402, 3403, 3404], |s| {
        format_case(s, 4, s >= 3403, style)
    });
}

/// A hand-built stack with one of every edge: whiteouts of files and directories, opaque
/// directories (including an opaque marker on a layer root, which the kernel ignores), files
/// over directories and the reverse, hard links with one name whited out, dangling, absolute and
/// very long symlinks, fifos and devices, xattr whiteouts, escaped private xattrs.
fn build_edge_stack(l2: &Layer, l1: &Layer, u: &Layer, flavor: Xflavor) {
    let p = |s: &str| flavor.name(s);
    let not_private = match flavor {
        Xflavor::Trusted => "trusted.overlayx",
        Xflavor::User => "user.overlayx",
    };
    l2.file("f", "bottom f")
        .file("dir1/a", "a")
        .file("dir1/b", "b")
        .xattr("dir1", "user.lower", "from l2")
        .file("opq/x", "x")
        .file("opq/sub/y", "y")
        .file("file_then_dir", "was a file")
        .file("dir_then_file/z", "z")
        .file("links/h", "hard")
        .hardlink("links/h", "links/h2")
        .hardlink("links/h", "links/h3")
        .symlink("s_dangling", "nowhere")
        .symlink("s_abs", "/etc/hostname")
        .symlink("s_dir", "dir1")
        .symlink("s_long", &"y/".repeat(1900))
        .fifo("pipe")
        .chardev("null", 1, 3)
        .file("dir_whiteout/k/deep", "deep")
        .file("xw/gone", "gone")
        .file("xw/kept", "kept")
        .whiteout("wo_bottom")
        .file("root_opq_hidden_if_honoured", "visible")
        .file("empty", "")
        .file("modes/suid", "s")
        .mode("modes/suid", 0o4755)
        .file("modes/none", "n")
        .mode("modes/none", 0o000)
        .file("owners/f", "o")
        .owner("owners/f", 1234, 5678)
        .dir("owners/d")
        .owner("owners/d", 4321, 8765);
    l1.whiteout("f")
        .file("dir1/c", "c")
        .xattr("dir1", "user.upper", "from l1")
        .opaque("opq", flavor)
        .file("opq/w", "w")
        .file("file_then_dir/q", "q")
        .file("dir_then_file", "now a file")
        .whiteout("links/h2")
        .whiteout("dir_whiteout")
        .xattr_whiteout("xw/gone", flavor)
        .dir("opaque_over_nothing")
        .xattr("opaque_over_nothing", &p("opaque"), "y")
        .file("escaped", "e")
        .xattr("escaped", &p("overlay.foo"), "bar")
        .xattr("escaped", &p("origin"), "junk")
        .xattr("escaped", not_private, "not private")
        .xattr("", &p("opaque"), "y");
    u.whiteout("dir1/a")
        .file("new", "new in upper")
        .whiteout("links/h3")
        .file("opq/upper_only", "u")
        .opaque("upper_opq", flavor)
        .file("upper_opq/only", "o")
        .whiteout("never_existed");
    for l in [l2, l1, u] {
        l.set_all_times(FIXED_TIME);
    }
}

const FIXED_TIME: (i64, i64) = (1_600_000_000, 123_456_789);

fn edge_case(flavor: Xflavor) -> Vec<String> {
    let scratch = Scratch::new();
    let l1 = scratch.dir("l1");
    let l2 = scratch.dir("l2");
    let (uk, wk, uo, wo) = (
        scratch.dir("uk"),
        scratch.dir("wk"),
        scratch.dir("uo"),
        scratch.dir("wo"),
    );
    build_edge_stack(&Layer::new(&l2), &Layer::new(&l1), &Layer::new(&uk), flavor);
    // The same upper again for our mount (lowers are shared; build_edge_stack rebuilds them
    // into a throwaway place so the upper is written by the same code).
    let throwaway = scratch.dir("t");
    build_edge_stack(
        &Layer::new(throwaway.join("2")),
        &Layer::new(throwaway.join("1")),
        &Layer::new(&uo),
        flavor,
    );
    prime_upper(&[&l1, &l2], &uk, flavor, &scratch, &[&uo]);
    let mut probe: Vec<String> = [
        "/f",
        "/dir1/a",
        "/links/h2",
        "/links/h3",
        "/dir_whiteout",
        "/dir_whiteout/k",
        "/xw/gone",
        "/wo_bottom",
        "/never_existed",
        "/opq/x",
        "/opq/sub",
        "/f/zz",
        "/dir_then_file/z",
        "/.wh..wh..opq",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    probe.sort();
    let mut results = Vec::new();
    for with_upper in [false, true] {
        let lowers = [l1.as_path(), l2.as_path()];
        let uw_k = with_upper.then_some((uk.as_path(), wk.as_path()));
        let uw_o = with_upper.then_some((uo.as_path(), wo.as_path()));
        let km = mount_kernel(&lowers, uw_k, flavor.mount_opts());
        let om = mount_ours(&lowers, uw_o, flavor.mount_opts());
        let kmap = InoMap::for_stack(&lowers, uw_k.map(|p| p.0));
        let omap = InoMap::for_stack(&lowers, uw_o.map(|p| p.0));
        let opts = CompareOpts::new().skip("ctime");
        for d in diff_mounts(km.path(), &kmap, om.path(), &omap, flavor, &probe, &opts) {
            results.push(format!("[upper={with_upper}] {d}"));
        }
    }
    results
}

#[test]
fn edge_cases_match_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    let diffs = edge_case(Xflavor::Trusted);
    snapshot::assert_no_diffs("hand-built edge-case stack, trusted.overlay.*", &diffs);
}

#[test]
fn edge_cases_match_kernel_userxattr() {
    if !common::require_root_and_fuse() {
        return;
    }
    let diffs = edge_case(Xflavor::User);
    snapshot::assert_no_diffs("hand-built edge-case stack, userxattr", &diffs);
}

/// Whiteouts in places the kernel does not expect them (a directory present in one layer only,
/// the last layer of a merge, an xattr whiteout in the upper): the kernel lists them but returns
/// ENOENT on lookup. We deliberately never list a name that lookup refuses (README, "Differences
/// from kernel overlayfs"), so these are hidden from listings and ENOENT on lookup. An xattr
/// whiteout in a directory not marked `opaque=x` is, as the documented format says, an ordinary
/// empty file to us (the kernel's lookup treats it as a whiteout while its readdir lists it).
/// Everything else in the stack must still match the kernel.
#[test]
fn whiteout_quirks_follow_our_documented_rule() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let t = Xflavor::Trusted;
    let build = |l1: &Layer, l2: &Layer, u: &Layer| {
        l1.file("solo/f", "f").whiteout("solo/w");
        l2.file("bottom_x/f", "f").xattr_whiteout("bottom_x/xw", t);
        l1.file("bottom_x/g", "g");
        l2.file("nox/gone", "g");
        l1.dir("nox")
            .file("nox/gone", "")
            .xattr("nox/gone", &t.name("whiteout"), "");
        u.file("pure_upper/f", "f").whiteout("pure_upper/w");
        l1.file("up_x/victim", "v");
        u.xattr_whiteout("up_x/victim", t);
        for l in [l1, l2, u] {
            l.set_all_times(FIXED_TIME);
        }
    };
    let (l1, l2) = (
        Layer::new(scratch.join("l1")),
        Layer::new(scratch.join("l2")),
    );
    build(&l1, &l2, &Layer::new(scratch.join("uo")));
    let uo = scratch.join("uo");
    let wo = scratch.dir("wo");
    let lowers = [l1.root(), l2.root()];
    let om = mount_ours(&lowers, Some((&uo, &wo)), &[]);
    let m = om.path();
    let listing = |dir: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(m.join(dir))
            .unwrap_or_else(|e| panic!("listing {dir}: {e}"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    for (dir, hidden, shown) in [
        ("solo", "w", vec!["f"]),
        ("pure_upper", "w", vec!["f"]),
        ("bottom_x", "xw", vec!["f", "g"]),
        ("up_x", "victim", vec![]),
    ] {
        assert_eq!(listing(dir), shown, "listing of /{dir}");
        let err = std::fs::symlink_metadata(m.join(dir).join(hidden))
            .expect_err("a whiteout must not be found by lookup");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "/{dir}/{hidden}");
    }
    assert_eq!(listing("nox"), vec!["gone"]);
    let gone = std::fs::read(m.join("nox/gone")).expect("/nox/gone is an ordinary empty file");
    assert!(gone.is_empty(), "/nox/gone hides the lower file's content");
}

/// fuse-overlayfs marks opaque directories `user.fuseoverlayfs.opaque=y` (its source, both the C
/// 1.x and the Rust 2.x). We read that marker as opaque, and hide it like the overlay's own
/// xattrs (fuse-overlayfs hides its `user.fuseoverlayfs.*` names): the expected view is the
/// kernel's over the same stack marked `trusted.overlay.opaque=y`.
#[test]
fn fuse_overlayfs_opaque_marker() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let build = |top: &Layer, bottom: &Layer, fuse_marker: bool| {
        bottom
            .file("d/old", "old")
            .file("d/sub/x", "x")
            .file("e/kept", "k");
        top.file("d/new", "new").file("e/added", "a");
        if fuse_marker {
            top.fuseoverlayfs_opaque("d");
        } else {
            top.opaque("d", Xflavor::Trusted);
        }
        top.set_all_times(FIXED_TIME);
        bottom.set_all_times(FIXED_TIME);
    };
    let (ot, ob) = (
        Layer::new(scratch.join("ot")),
        Layer::new(scratch.join("ob")),
    );
    let (kt, kb) = (
        Layer::new(scratch.join("kt")),
        Layer::new(scratch.join("kb")),
    );
    build(&ot, &ob, true);
    build(&kt, &kb, false);
    let orefs = [ot.root(), ob.root()];
    let krefs = [kt.root(), kb.root()];
    let km = mount_kernel(&krefs, None, &[]);
    let om = mount_ours(&orefs, None, &[]);
    let mut diffs = diff_mounts(
        km.path(),
        &InoMap::for_stack(&krefs, None),
        om.path(),
        &InoMap::for_stack(&orefs, None),
        Xflavor::Trusted,
        &["/d/old".into(), "/d/sub".into(), "/e/kept".into()],
        &CompareOpts::new().skip("ctime"),
    );
    let listed = common::xattr::list(&om.path().join("d")).unwrap_or_default();
    if listed.iter().any(|n| n.starts_with(b"user.fuseoverlayfs.")) {
        diffs.push("/d: user.fuseoverlayfs.* listed through ours".into());
    }
    snapshot::assert_no_diffs("user.fuseoverlayfs.opaque marker", &diffs);
}

/// The private xattrs (`trusted.overlay.*`, or `user.overlay.*` under userxattr) set in layers
/// are neither listed nor readable through either mount, on files, directories and symlinks.
#[test]
fn private_xattrs_hidden() {
    if !common::require_root_and_fuse() {
        return;
    }
    for flavor in [Xflavor::Trusted, Xflavor::User] {
        let scratch = Scratch::new();
        let top = Layer::new(scratch.join("l1"));
        let bottom = Layer::new(scratch.join("l2"));
        bottom.file("d/f", "f").file("g", "g");
        top.file("f", "f")
            .dir("d")
            .symlink("s", "f")
            .file("g", "g2");
        for rel in ["f", "d", "g", ""] {
            // Not redirect or metacopy: those change what the kernel shows, not just hide.
            for n in ["origin", "impure", "nlink", "upper", "uuid", "foo"] {
                top.xattr(rel, &flavor.name(n), "v");
            }
            top.xattr(rel, "user.visible", "yes");
        }
        if flavor == Xflavor::Trusted {
            // user.* xattrs cannot be set on symlinks.
            top.xattr("s", &flavor.name("origin"), "v");
        }
        let lowers = [top.root(), bottom.root()];
        let km = mount_kernel(&lowers, None, flavor.mount_opts());
        let om = mount_ours(&lowers, None, flavor.mount_opts());
        let sopts = SnapshotOpts::private_probes(flavor.prefix());
        let mut probes = sopts.clone();
        probes.probes.push(flavor.name("foo"));
        for (name, root) in [("kernel", km.path()), ("ours", om.path())] {
            let s = Snapshot::take(root, &probes);
            let listed = s.xattrs_with_prefix(flavor.prefix());
            assert!(
                listed.is_empty(),
                "{name} ({flavor:?}) lists private xattrs: {listed:?}"
            );
            let readable = s.readable_probes();
            assert!(
                readable.is_empty(),
                "{name} ({flavor:?}) lets private xattrs be read: {readable:?}"
            );
            let visible = common::xattr::get(&root.join("f"), "user.visible");
            assert_eq!(
                visible.ok(),
                Some(b"yes".to_vec()),
                "{name} ({flavor:?}): ordinary xattr lost"
            );
        }
        let ks = Snapshot::take(km.path(), &probes);
        let os = Snapshot::take(om.path(), &probes);
        let diffs = compare("kernel", &ks, "ours", &os, &CompareOpts::new());
        snapshot::assert_no_diffs(&format!("private xattrs, {flavor:?}"), &diffs);
    }
}

const FOUR_GIB: u64 = 4 << 30;

/// pread at offsets around page and FUSE request boundaries, across EOF and past it, on a lower
/// file, an upper file and an empty file: same bytes as the kernel.
#[test]
fn read_at_offsets() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let mut rng = common::prng::Rng::new(77);
    let big = rng.bytes(1_100_003);
    let mid = rng.bytes(70_001);
    let lower = Layer::new(scratch.join("l1"));
    let lower2 = Layer::new(scratch.join("l2"));
    lower.file("big", &big).file("empty", "");
    // Sparse, past 4 GiB: data at 1 MiB and just beyond 4 GiB, holes elsewhere.
    let sparse = std::fs::File::create(lower.path("sparse")).expect("create sparse");
    sparse.set_len(FOUR_GIB + 1_000_000).expect("set_len");
    sparse
        .write_all_at(b"one mebibyte", 1 << 20)
        .expect("write");
    sparse
        .write_all_at(b"past four gibibytes", FOUR_GIB + 123)
        .expect("write");
    drop(sparse);
    lower2.file("mid", b"hidden by upper");
    let (uk, wk) = (scratch.dir("uk"), scratch.dir("wk"));
    let (uo, wo) = (scratch.dir("uo"), scratch.dir("wo"));
    Layer::new(&uk).file("mid", &mid);
    Layer::new(&uo).file("mid", &mid);
    let lowers = [lower.root(), lower2.root()];
    let km = mount_kernel(&lowers, Some((&uk, &wk)), &[]);
    let om = mount_ours(&lowers, Some((&uo, &wo)), &[]);
    let offsets = [
        0u64,
        1,
        4095,
        4096,
        4097,
        65535,
        65536,
        131_071,
        131_072,
        1_048_575,
        1_048_576,
        1_099_999,
        1_100_002,
        1_100_003,
        1_100_004,
        2_000_000,
        FOUR_GIB - 1,
        FOUR_GIB + 100,
        FOUR_GIB + 999_999,
        FOUR_GIB + 1_000_000,
    ];
    let lens = [1usize, 7, 4096, 65536, 131_072 + 13, 1_200_000];
    let mut diffs = Vec::new();
    for name in ["big", "mid", "empty", "sparse"] {
        let kf = std::fs::File::open(km.path().join(name)).expect("open through kernel");
        let of = std::fs::File::open(om.path().join(name)).expect("open through ours");
        for &off in &offsets {
            for &len in &lens {
                let mut kb = vec![0u8; len];
                let mut ob = vec![0u8; len];
                let kr = kf.read_at(&mut kb, off).map(|n| kb[..n].to_vec());
                let or = of.read_at(&mut ob, off).map(|n| ob[..n].to_vec());
                match (&kr, &or) {
                    (Ok(k), Ok(o)) if k == o => {}
                    (Ok(k), Ok(o)) => diffs.push(format!(
                        "/{name}: pread({off}, {len}): kernel {} bytes (hash {:x}) vs ours {} bytes (hash {:x})",
                        k.len(),
                        common::prng::fnv1a(k),
                        o.len(),
                        common::prng::fnv1a(o)
                    )),
                    _ => diffs.push(format!(
                        "/{name}: pread({off}, {len}): kernel {:?} vs ours {:?}",
                        kr.as_ref().map(Vec::len),
                        or.as_ref().map(Vec::len)
                    )),
                }
            }
        }
        // Where the data and the holes are (lseek SEEK_DATA / SEEK_HOLE).
        for &off in &offsets {
            for whence in [Whence::SeekData, Whence::SeekHole] {
                let k = lseek(&kf, off as i64, whence);
                let o = lseek(&of, off as i64, whence);
                if k != o {
                    diffs.push(format!(
                        "/{name}: lseek({off}, {whence:?}): kernel={k:?} vs ours={o:?}"
                    ));
                }
            }
        }
        if name == "sparse" {
            continue;
        }
        // A whole sequential read too.
        let k = std::fs::read(km.path().join(name)).expect("read through kernel");
        let o = std::fs::read(om.path().join(name)).expect("read through ours");
        if k != o {
            diffs.push(format!(
                "/{name}: sequential read: kernel {} bytes vs ours {} bytes",
                k.len(),
                o.len()
            ));
        }
    }
    snapshot::assert_no_diffs("reads at offsets", &diffs);
}

/// readlink of every kind of target, and readlink of a non-symlink (EINVAL), as the kernel.
#[test]
fn readlink_matches_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let l1 = Layer::new(scratch.join("l1"));
    let l2 = Layer::new(scratch.join("l2"));
    let long = format!("/{}", "z".repeat(4000));
    l2.symlink("rel", "a/b/c")
        .symlink("over", "lower target")
        .file("a/b/c", "c");
    l1.symlink("abs", "/etc/passwd")
        .symlink("dangling", "../../nowhere")
        .symlink("long", &long)
        .symlink("over", "upper target")
        .symlink("dot", ".")
        .symlink("spaces", "with space\tand tab")
        .file("plain", "p")
        .dir("dir");
    let lowers = [l1.root(), l2.root()];
    let km = mount_kernel(&lowers, None, &[]);
    let om = mount_ours(&lowers, None, &[]);
    let mut diffs = Vec::new();
    for name in [
        "rel", "over", "abs", "dangling", "long", "dot", "spaces", "plain", "dir", "missing",
    ] {
        let k = std::fs::read_link(km.path().join(name)).map_err(|e| e.raw_os_error());
        let o = std::fs::read_link(om.path().join(name)).map_err(|e| e.raw_os_error());
        if k != o {
            diffs.push(format!("/{name}: readlink: kernel={k:?} vs ours={o:?}"));
        }
    }
    snapshot::assert_no_diffs("readlink", &diffs);
}

/// statfs works (df too) and describes the same filesystem as the kernel's overlay does: the
/// upper's, or the top lower's without an upper.
#[test]
fn statfs_sanity() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let l1 = Layer::new(scratch.join("l1"));
    let l2 = Layer::new(scratch.join("l2"));
    l1.file("a", "a");
    l2.file("b", "b");
    let lowers = [l1.root(), l2.root()];
    let mut diffs = Vec::new();
    for (round, with_upper) in [false, true].into_iter().enumerate() {
        let (ku, kw) = (
            scratch.dir(&format!("ku{round}")),
            scratch.dir(&format!("kw{round}")),
        );
        let (ou, ow) = (
            scratch.dir(&format!("ou{round}")),
            scratch.dir(&format!("ow{round}")),
        );
        let km = mount_kernel(&lowers, with_upper.then_some((&ku, &kw)), &[]);
        let om = mount_ours(&lowers, with_upper.then_some((&ou, &ow)), &[]);
        let k = nix::sys::statvfs::statvfs(km.path()).expect("statvfs kernel overlay");
        let o = match nix::sys::statvfs::statvfs(om.path()) {
            Ok(o) => o,
            Err(e) => {
                diffs.push(format!("statvfs through ours fails: {e}"));
                continue;
            }
        };
        let tag = if with_upper { "upper" } else { "lower-only" };
        let total = |s: &nix::sys::statvfs::Statvfs| s.blocks() as u128 * s.fragment_size() as u128;
        if total(&k) != total(&o) {
            diffs.push(format!(
                "[{tag}] statfs total bytes: kernel={} vs ours={}",
                total(&k),
                total(&o)
            ));
        }
        if k.name_max() != o.name_max() {
            diffs.push(format!(
                "[{tag}] statfs name_max: kernel={} vs ours={}",
                k.name_max(),
                o.name_max()
            ));
        }
        if k.files() != o.files() {
            diffs.push(format!(
                "[{tag}] statfs files: kernel={} vs ours={}",
                k.files(),
                o.files()
            ));
        }
        if o.block_size() == 0 || o.blocks() == 0 {
            diffs.push(format!(
                "[{tag}] statfs through ours: bsize {} blocks {}",
                o.block_size(),
                o.blocks()
            ));
        }
        let df = common::run("df", &[om.path().as_os_str()]);
        let out = String::from_utf8_lossy(&df.stdout);
        if !df.status.success() || !out.contains(om.path().to_str().unwrap_or("?")) {
            diffs.push(format!(
                "[{tag}] df on ours: {} stdout={out:?} stderr={:?}",
                df.status,
                String::from_utf8_lossy(&df.stderr)
            ));
        }
        drop(om);
        drop(km);
    }
    snapshot::assert_no_diffs("statfs", &diffs);
}

/// A lowerdir-only mount is read-only: every write fails with EROFS, as on the kernel's.
#[test]
fn lower_only_mount_is_read_only() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let l1 = Layer::new(scratch.join("l1"));
    let l2 = Layer::new(scratch.join("l2"));
    l1.file("f", "f").dir("d");
    l2.file("g", "g").file("d/h", "h");
    let lowers = [l1.root(), l2.root()];
    let km = mount_kernel(&lowers, None, &[]);
    let om = mount_ours(&lowers, None, &[]);
    type Op = fn(&Path) -> std::io::Result<()>;
    let ops: Vec<(&str, Op)> = vec![
        ("create", |m| std::fs::write(m.join("new"), "x")),
        ("mkdir", |m| std::fs::create_dir(m.join("newdir"))),
        ("unlink", |m| std::fs::remove_file(m.join("f"))),
        ("rmdir", |m| std::fs::remove_dir(m.join("d"))),
        ("rename", |m| std::fs::rename(m.join("f"), m.join("f2"))),
        ("symlink", |m| std::os::unix::fs::symlink("f", m.join("sl"))),
        ("link", |m| std::fs::hard_link(m.join("f"), m.join("f3"))),
        ("open-write", |m| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(m.join("g"))
                .map(drop)
        }),
        ("truncate", |m| {
            std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(m.join("d/h"))
                .map(drop)
        }),
        ("chmod", |m| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(m.join("f"), std::fs::Permissions::from_mode(0o600))
        }),
        ("setxattr", |m| {
            common::xattr::set(&m.join("f"), "user.x", b"1")
        }),
    ];
    let mut diffs = Vec::new();
    for (name, op) in ops {
        let k = op(km.path()).map_err(|e| e.raw_os_error());
        let o = op(om.path()).map_err(|e| e.raw_os_error());
        if k != o || o != Err(Some(libc::EROFS)) {
            diffs.push(format!(
                "{name}: kernel={k:?} vs ours={o:?} (EROFS={})",
                libc::EROFS
            ));
        }
    }
    snapshot::assert_no_diffs("read-only mount", &diffs);
}

/// Big merged directories (readdir continues over many requests), names of every shape (255
/// bytes, spaces, newline, backslash, non-UTF-8 bytes, leading dash), sockets and block devices,
/// many and large xattrs: as the kernel shows them.
#[test]
fn names_sizes_and_special_files_match_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let scratch = Scratch::new();
    let (l1, l2) = (
        Layer::new(scratch.join("l1")),
        Layer::new(scratch.join("l2")),
    );
    let odd_names: Vec<std::ffi::OsString> = vec![
        "n".repeat(255).into(),
        "with space".into(),
        "new\nline".into(),
        "back\\slash".into(),
        "-dash".into(),
        ".hidden".into(),
        "é漢字🙂".into(),
        std::ffi::OsStr::from_bytes(b"bad\xff\xfebytes").to_os_string(),
    ];
    for (i, n) in odd_names.iter().enumerate() {
        let p = l2.path("names").join(n);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, format!("odd {i}")).expect("write odd name");
        let q = l1.path("names_top").join(n);
        std::fs::create_dir_all(q.parent().expect("parent")).expect("mkdir");
        std::os::unix::fs::symlink(n, &q).expect("symlink odd name");
    }
    l2.dir("big");
    l1.dir("big");
    for i in 0..1200 {
        l2.file(&format!("big/f{i:04}"), "");
    }
    for i in (0..600).step_by(2) {
        l1.file(&format!("big/f{i:04}"), "top");
    }
    for i in 0..300 {
        l1.file(&format!("big/t{i:04}_{}", "x".repeat(i % 200)), "");
    }
    for i in 600..700 {
        l1.whiteout(&format!("big/f{i:04}"));
    }
    let sock = l2.path("sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind socket"));
    nix::sys::stat::mknod(
        &l2.path("blk"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o640),
        nix::sys::stat::makedev(7, 0),
    )
    .expect("mknod block device");
    l1.file("xmany", "m");
    for i in 0..30 {
        l1.xattr("xmany", &format!("user.attr{i:02}"), format!("value {i}"));
    }
    l1.file("xbig", "b")
        .xattr("xbig", "user.big", vec![0xa5u8; 2000]);
    l1.dir("big").xattr("big", "trusted.dir", "on a merged dir");
    let build_upper = |u: &Layer| {
        u.dir("big");
        for i in 700..750 {
            u.whiteout(&format!("big/f{i:04}"));
        }
        for i in 0..300 {
            u.file(&format!("big/u{i:04}"), "");
        }
        u.set_all_times(FIXED_TIME);
    };
    for l in [&l1, &l2] {
        l.set_all_times(FIXED_TIME);
    }
    let (uk, uo) = (
        Layer::new(scratch.join("uk")),
        Layer::new(scratch.join("uo")),
    );
    build_upper(&uk);
    build_upper(&uo);
    let (wk, wo) = (scratch.dir("wk"), scratch.dir("wo"));
    let lowers = [l1.root(), l2.root()];
    prime_upper(&lowers, uk.root(), Xflavor::Trusted, &scratch, &[uo.root()]);
    let mut diffs = Vec::new();
    for with_upper in [false, true] {
        let km = mount_kernel(&lowers, with_upper.then_some((uk.root(), &*wk)), &[]);
        let om = mount_ours(&lowers, with_upper.then_some((uo.root(), &*wo)), &[]);
        let kmap = InoMap::for_stack(&lowers, with_upper.then_some(uk.root()));
        let omap = InoMap::for_stack(&lowers, with_upper.then_some(uo.root()));
        let probe = vec!["/big/f0650".to_string(), "/big/f0720".to_string()];
        let opts = CompareOpts::new().skip("ctime");
        for d in diff_mounts(
            km.path(),
            &kmap,
            om.path(),
            &omap,
            Xflavor::Trusted,
            &probe,
            &opts,
        ) {
            diffs.push(format!("[upper={with_upper}] {d}"));
        }
    }
    snapshot::assert_no_diffs("names, big directories, special files", &diffs);
}

/// The module default redirect_always_follow=Y makes the kernel follow `trusted.overlay.redirect`
/// on directories even with redirect_dir off (absolute "/old" from the root, relative "name" in
/// the same parent), as a kernel with redirect_dir=on leaves after renaming a lower directory.
#[test]
fn redirects_followed_like_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    let follow = std::fs::read_to_string("/sys/module/overlay/parameters/redirect_always_follow")
        .unwrap_or_default();
    let scratch = Scratch::new();
    let (l1, l2) = (
        Layer::new(scratch.join("l1")),
        Layer::new(scratch.join("l2")),
    );
    l2.file("old/f", "from old").file("old/sub/g", "g");
    l2.file("d/rel_old/h", "from rel_old");
    l1.file("d/other", "o");
    let build_upper = |u: &Layer| {
        u.dir("new")
            .xattr("new", "trusted.overlay.redirect", "/old")
            .file("new/added", "a");
        u.dir("d/renamed")
            .xattr("d/renamed", "trusted.overlay.redirect", "rel_old");
        u.whiteout("old");
        u.whiteout("d/rel_old");
        u.set_all_times(FIXED_TIME);
    };
    for l in [&l1, &l2] {
        l.set_all_times(FIXED_TIME);
    }
    let (uk, uo) = (
        Layer::new(scratch.join("uk")),
        Layer::new(scratch.join("uo")),
    );
    build_upper(&uk);
    build_upper(&uo);
    let (wk, wo) = (scratch.dir("wk"), scratch.dir("wo"));
    let lowers = [l1.root(), l2.root()];
    prime_upper(&lowers, uk.root(), Xflavor::Trusted, &scratch, &[uo.root()]);
    let km = mount_kernel(&lowers, Some((uk.root(), &*wk)), &[]);
    let om = mount_ours(&lowers, Some((uo.root(), &*wo)), &[]);
    let diffs = diff_mounts(
        km.path(),
        &InoMap::for_stack(&lowers, Some(uk.root())),
        om.path(),
        &InoMap::for_stack(&lowers, Some(uo.root())),
        Xflavor::Trusted,
        &["/new/f".into(), "/d/renamed/h".into(), "/old".into()],
        &CompareOpts::new().skip("ctime"),
    );
    snapshot::assert_no_diffs(
        &format!("redirects (redirect_always_follow={})", follow.trim()),
        &diffs,
    );
}

/// What other users may read, write and search, as seen by access(2) (`test -r/-w/-x`) and by
/// listing and reading, is what the kernel's overlay allows.
#[test]
fn permissions_for_other_users_match_kernel() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let (l1, l2) = (
        Layer::new(scratch.join("l1")),
        Layer::new(scratch.join("l2")),
    );
    let entries: &[(&str, u32, u32, u32, bool)] = &[
        ("pub", 0o755, 0, 0, true),
        ("pub/f644", 0o644, 0, 0, false),
        ("pub/f600_1000", 0o600, 1000, 1000, false),
        ("pub/f640_g1000", 0o640, 0, 1000, false),
        ("pub/f000", 0o000, 1000, 1000, false),
        ("pub/f444", 0o444, 0, 0, false),
        ("pub/f755", 0o755, 0, 0, false),
        ("pub/f4755", 0o4755, 1000, 0, false),
        ("priv_1000", 0o700, 1000, 1000, true),
        ("priv_1000/f", 0o644, 1000, 1000, false),
        ("search_only", 0o711, 0, 0, true),
        ("search_only/f", 0o644, 0, 0, false),
        ("group_1000", 0o750, 0, 1000, true),
        ("group_1000/f", 0o664, 0, 1000, false),
        ("sticky", 0o1777, 0, 0, true),
        ("sticky/f_4242", 0o666, 4242, 4242, false),
    ];
    for (i, (rel, mode, uid, gid, dir)) in entries.iter().enumerate() {
        // Alternate layers so merged and plain directories both occur.
        let l = if i % 2 == 0 { &l1 } else { &l2 };
        if *dir {
            l1.dir(rel);
            l2.dir(rel);
        } else {
            l.file(rel, "content");
        }
        for l in [&l1, &l2] {
            if l.path(rel).exists() {
                l.owner(rel, *uid, *gid).mode(rel, *mode);
            }
        }
    }
    let (uk, wk, uo, wo) = (
        scratch.dir("uk"),
        scratch.dir("wk"),
        scratch.dir("uo"),
        scratch.dir("wo"),
    );
    let lowers = [l1.root(), l2.root()];
    let km = mount_kernel(&lowers, Some((&uk, &wk)), &[]);
    let om = mount_ours(&lowers, Some((&uo, &wo)), &[]);
    let script = r#"for p in "$@"; do
  r=-; w=-; x=-; l=-; c=-
  test -r "$p" && r=r; test -w "$p" && w=w; test -x "$p" && x=x
  if test -d "$p"; then ls "$p" >/dev/null 2>&1 && l=l; else cat "$p" >/dev/null 2>&1 && c=c; fi
  echo "${p#$ROOT} $r$w$x$l$c"
done"#;
    let mut diffs = Vec::new();
    for (uid, gid) in [(1000, 1000), (4242, 4242), (65534, 65534)] {
        let run_as = |root: &Path| {
            let mut cmd = std::process::Command::new("setpriv");
            cmd.args([
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "sh".into(),
                "-c".into(),
                script.into(),
                "sh".into(),
            ]);
            cmd.env("ROOT", root);
            cmd.arg(root);
            for (rel, ..) in entries {
                cmd.arg(root.join(rel));
            }
            let out = cmd.output().expect("run setpriv");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let k = run_as(km.path());
        let o = run_as(om.path());
        for (kl, ol) in k.lines().zip(o.lines()) {
            if kl != ol {
                diffs.push(format!("uid {uid}: kernel `{kl}` vs ours `{ol}`"));
            }
        }
        if k.lines().count() != o.lines().count() {
            diffs.push(format!("uid {uid}: kernel output {k:?} vs ours {o:?}"));
        }
    }
    snapshot::assert_no_diffs("access as other users (r w x list cat)", &diffs);
}
