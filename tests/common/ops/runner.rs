//! The lockstep runner: the kernel's overlayfs and ours over two copies of one generated stack,
//! the same operations applied to both, the first difference reported; seeds from the
//! environment; shrinking a failing sequence.

use super::*;

/// The kernel options that match what we implement: no redirects, no index, no metacopy
/// (given explicitly: distributions change the module defaults).
pub const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];

/// Options a test asks for on both sides instead of the defaults (see `with_options`).
struct OptionProfile {
    kernel: Vec<String>,
    ours: Vec<String>,
}

thread_local! {
    static PROFILE: std::cell::RefCell<Option<OptionProfile>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the kernel mounted with `kernel` (instead of `KERNEL_OPTS`) and ours with
/// `ours` added, on this thread: how a test compares an optional feature, such as
/// `redirect_dir=on`, on both sides.
pub fn with_options<T>(kernel: &[&str], ours: &[&str], f: impl FnOnce() -> T) -> T {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    PROFILE.with(|p| {
        *p.borrow_mut() = Some(OptionProfile {
            kernel: strings(kernel),
            ours: strings(ours),
        })
    });
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            PROFILE.with(|p| *p.borrow_mut() = None);
        }
    }
    let _reset = Reset;
    f()
}

/// `KERNEL_OPTS` (or those of `with_options`), or `RSFS_KERNEL_OPTS` (comma-separated) to
/// compare against another kernel configuration while debugging (e.g.
/// `redirect_dir=off,index=on,metacopy=off`).
pub fn kernel_opts() -> Vec<String> {
    match std::env::var("RSFS_KERNEL_OPTS") {
        Ok(s) if !s.trim().is_empty() => s.split(',').map(|x| x.trim().to_string()).collect(),
        _ => PROFILE.with(|p| match &*p.borrow() {
            Some(profile) => profile.kernel.clone(),
            None => KERNEL_OPTS.iter().map(|s| s.to_string()).collect(),
        }),
    }
}

pub const LOWER_STYLE: Style = Style::Kernel {
    flavor: Xflavor::Trusted,
    xattr_whiteouts: true,
};
pub const UPPER_STYLE: Style = Style::Kernel {
    flavor: Xflavor::Trusted,
    xattr_whiteouts: false,
};

/// When the upper (and the lowers' roots) were last touched before the test.
pub const FIXED_TIME: (i64, i64) = (1_400_000_000, 5);

/// One differential case.
#[derive(Clone, Debug)]
pub struct DiffCase {
    pub n_lowers: usize,
    pub with_upper: bool,
    pub n_ops: usize,
    /// Compare the merged trees after every this many operations.
    pub checkpoint_every: usize,
    pub exclude: Vec<String>,
}

/// The stack of a seed: its layers are written once per mount, byte for byte the same.
///
/// No lower file has more than one name unless the kernel runs with `index=on`: on copy-up
/// the kernel with `index=off` breaks the hard links of a lower file while ours keeps them
/// together (a documented difference, asserted by `lower_hard_links_stay_together`); with
/// `index=on` both keep them, in the same on-disk format. Hard links in a populated upper
/// stay, and `link` operations through the mount stay in the mix.
pub fn stack_spec(seed: u64, case: &DiffCase) -> StackSpec {
    let params = GenParams {
        ops_per_layer: 30,
        lower_hard_links: kernel_opts().iter().any(|o| o == "index=on"),
        ..GenParams::small()
    };
    stackgen::generate(seed, case.n_lowers, case.with_upper, &params)
}

/// One copy of a stack: lowers, upper, workdir.
pub struct StackCopy {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl StackCopy {
    /// Write the layers of `spec` under `scratch` (names starting with `tag`). A populated upper
    /// is then primed (see `prime_upper`).
    pub fn build(spec: &StackSpec, scratch: &Scratch, tag: &str) -> StackCopy {
        let lowers = stackgen::build_lowers(spec, scratch, &format!("{tag}l"), LOWER_STYLE);
        let (upper, work) = match stackgen::build_upper(
            spec,
            scratch,
            &format!("{tag}u"),
            &format!("{tag}w"),
            UPPER_STYLE,
        ) {
            Some(uw) => uw,
            None => {
                let u = scratch.dir(&format!("{tag}u"));
                Layer::new(&u).times("", FIXED_TIME, FIXED_TIME);
                (u, scratch.dir(&format!("{tag}w")))
            }
        };
        let copy = StackCopy {
            lowers,
            upper,
            work,
        };
        if spec.upper.is_some() {
            copy.prime_upper(scratch, &format!("{tag}pw"));
        }
        copy
    }

    /// Make a hand-written upper look like one the kernel has used: mount the kernel's overlay
    /// (`kernel_opts`, its own workdir `<scratch>/<work>`, so `work` stays untouched) and walk
    /// the merged tree once without opening files; the lookups record what the kernel records
    /// there (`trusted.overlay.origin` on the upper copies of merged directories, the root's
    /// `trusted.overlay.uuid`).
    ///
    /// Without it, the kernel's first readdir of a merged directory whose upper copy has no
    /// origin yet reports the upper inode as d_ino (the lower one once a lookup has written
    /// origin), while ours always reports the lower one (d_ino == st_ino), a documented
    /// difference. Every copy is primed the same way, by a kernel mount over its own lowers (an
    /// origin names a lower inode of that copy, so it cannot be copied from another one).
    pub fn prime_upper(&self, scratch: &Scratch, work: &str) {
        let prime_work = scratch.dir(work);
        let opts = kernel_opts();
        let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
        let m = KernelMount::try_mount(
            None,
            &self.lower_refs(),
            Some((&self.upper, &prime_work)),
            &opts,
        )
        .unwrap_or_else(|e| panic!("priming the upper: {e}"));
        Snapshot::take(
            m.path(),
            &SnapshotOpts {
                no_content: true,
                ..SnapshotOpts::default()
            },
        );
        assert!(
            m.unmount(),
            "priming the upper: unmounting the kernel's overlay failed"
        );
    }

    pub fn lower_refs(&self) -> Vec<&Path> {
        self.lowers.iter().map(PathBuf::as_path).collect()
    }

    pub fn upper_work(&self) -> (&Path, &Path) {
        (&self.upper, &self.work)
    }

    /// Names for every inode of the stack as it is now (`L0:/a`, `U:/b`).
    pub fn ino_map(&self) -> InoMap {
        InoMap::for_stack(&self.lower_refs(), Some(&self.upper))
    }
}

/// What a failed case found.
#[derive(Clone, Debug)]
pub struct Failure {
    /// What kind of difference came first (`op:rename`, `tree:mtime`, `upper:xattrs`, ...):
    /// shrinking keeps a smaller sequence only if it fails the same way.
    pub signature: String,
    /// The index of the operation after which it was seen (`ops.len()` for the upper
    /// comparison).
    pub step: usize,
    pub lines: Vec<String>,
}

fn field_of(diff: &str) -> String {
    // "PATH: FIELD: ..." or "PATH: only in X"
    let mut parts = diff.splitn(3, ": ");
    let _path = parts.next();
    let field = parts.next().unwrap_or("?");
    field.split_whitespace().next().unwrap_or("?").to_string()
}

/// Which overlay implementation serves a mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// Our binary (or `RSFS_TEST_BIN`).
    Ours,
    /// The kernel's overlayfs with `KERNEL_OPTS`.
    Kernel,
}

impl Impl {
    pub fn name(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::Kernel => "kernel",
        }
    }
}

/// Our mount options: `dev`, because the kernel's overlay (mounted by mount(8)) allows device
/// files and FUSE mounts refuse them by default; then `RSFS_OURS_OPTS` (comma-separated, e.g.
/// `timeout=0` to tell attribute-cache problems from others while debugging).
pub fn our_opts() -> Vec<String> {
    let mut v = vec!["dev".to_string()];
    PROFILE.with(|p| {
        if let Some(profile) = &*p.borrow() {
            v.extend(profile.ours.iter().cloned());
        }
    });
    if let Ok(extra) = std::env::var("RSFS_OURS_OPTS") {
        v.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    v
}

/// A mount of either implementation over a `StackCopy`, unmounted on drop.
pub enum AnyMount {
    Ours(OurMount),
    Kernel(KernelMount),
}

impl AnyMount {
    pub fn mount(who: Impl, copy: &StackCopy) -> Result<AnyMount, String> {
        let lowers = copy.lower_refs();
        match who {
            Impl::Ours => {
                let extra = our_opts();
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                DaemonMount::start_overlay(
                    &our_bin(),
                    None,
                    &lowers,
                    Some(copy.upper_work()),
                    &extra,
                    false,
                )
                .map(AnyMount::Ours)
            }
            Impl::Kernel => {
                let opts = kernel_opts();
                let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
                KernelMount::try_mount(None, &lowers, Some(copy.upper_work()), &opts)
                    .map(AnyMount::Kernel)
            }
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            AnyMount::Ours(m) => m.path(),
            AnyMount::Kernel(m) => m.path(),
        }
    }

    /// Unmount; what went wrong, if anything (our daemon must exit 0 and leave nothing
    /// mounted).
    pub fn unmount(self) -> Option<String> {
        match self {
            AnyMount::Ours(m) => {
                let e = m.unmount();
                let clean = e.daemon == DaemonExit::Exited(0) && e.command_ok && !e.left_mounted;
                (!clean).then(|| {
                    format!(
                        "unmounting ours: daemon {:?}, umount ok={} ({}), left mounted={}; stderr: {}",
                        e.daemon,
                        e.command_ok,
                        e.command_stderr.trim(),
                        e.left_mounted,
                        e.stderr.trim()
                    )
                })
            }
            AnyMount::Kernel(m) => {
                (!m.unmount()).then(|| "unmounting the kernel's overlay failed".to_string())
            }
        }
    }
}

/// Drive the kernel's overlayfs and `subject` (ours; the kernel again to check the harness
/// itself) over two copies of `spec` with `ops`, in lockstep. Returns the first difference
/// found: an operation's result, then the merged trees at each checkpoint and at the end, the
/// unmount, the lowers, the two upper directories.
pub fn run_differential(
    spec: &StackSpec,
    ops: &[Op],
    checkpoint_every: usize,
    subject: Impl,
) -> Option<Failure> {
    let scratch = Scratch::new();
    let kc = StackCopy::build(spec, &scratch, "k");
    let oc = StackCopy::build(spec, &scratch, "o");
    let kmount = AnyMount::mount(Impl::Kernel, &kc).unwrap_or_else(|e| panic!("{e}"));
    let omount = AnyMount::mount(subject, &oc)
        .unwrap_or_else(|e| panic!("mounting {} failed: {e}", subject.name()));
    let since = Since::now();
    let mut kx = Executor::new(kmount.path(), since);
    let mut ox = Executor::new(omount.path(), since);
    let checkpoint = |step: usize| -> Option<Failure> {
        let ks = Tree::take(kmount.path(), &kc.ino_map(), Some(since), true);
        let os = Tree::take(omount.path(), &oc.ino_map(), Some(since), true);
        // Not `self_check` (d_ino == st_ino): the kernel itself breaks it in places; the
        // comparison of d_ino with the kernel's covers ours.
        let diffs = compare_trees(
            "kernel",
            &ks,
            "ours",
            &os,
            CompareOpts::new(),
            FileBlocks::OneTreeBlock,
        );
        (!diffs.is_empty()).then(|| Failure {
            signature: format!("tree:{}", field_of(&diffs[0])),
            step,
            lines: diffs
                .iter()
                .map(|d| format!("merged tree after step {step}: {d}"))
                .collect(),
        })
    };
    let verbose = std::env::var("RSFS_VERBOSE").is_ok_and(|v| v == "1");
    for (i, op) in ops.iter().enumerate() {
        let k = kx.apply(op);
        let o = ox.apply(op);
        if verbose {
            eprintln!("{i:4} {op}\n       -> {k:?}");
        }
        if k != o {
            let show = |r: &OpResult| match r {
                Ok(s) => format!("ok: {s}"),
                Err(e) => format!("error: {e}"),
            };
            return Some(Failure {
                signature: format!("op:{}", op.kind()),
                step: i,
                lines: vec![format!(
                    "step {i}: {op}\n      kernel: {}\n      ours:   {}",
                    show(&k),
                    show(&o)
                )],
            });
        }
        if checkpoint_every > 0 && (i + 1) % checkpoint_every == 0 {
            if let Some(f) = checkpoint(i) {
                return Some(f);
            }
        }
    }
    let last = ops.len().saturating_sub(1);
    if let Some(f) = checkpoint(last) {
        return Some(f);
    }
    kx.close_all();
    ox.close_all();
    drop(kx);
    drop(ox);
    let lines: Vec<String> = [omount.unmount(), kmount.unmount()]
        .into_iter()
        .flatten()
        .collect();
    if !lines.is_empty() {
        return Some(Failure {
            signature: "unmount".into(),
            step: ops.len(),
            lines,
        });
    }
    for (i, (kl, ol)) in kc.lowers.iter().zip(&oc.lowers).enumerate() {
        let ks = Tree::take(kl, &InoMap::for_stack(&[kl], None), None, false);
        let os = Tree::take(ol, &InoMap::for_stack(&[ol], None), None, false);
        let diffs = compare_trees(
            "kernel's",
            &ks,
            "ours",
            &os,
            CompareOpts::new().skip("ctime"),
            FileBlocks::OneTreeBlock,
        );
        if !diffs.is_empty() {
            return Some(Failure {
                signature: "lower".into(),
                step: ops.len(),
                lines: diffs
                    .iter()
                    .map(|d| format!("lower {i} changed: {d}"))
                    .collect(),
            });
        }
    }
    let diffs = compare_uppers(&kc.upper, &oc.upper, since);
    if !diffs.is_empty() {
        return Some(Failure {
            signature: format!("upper:{}", field_of(&diffs[0])),
            step: ops.len(),
            lines: diffs
                .iter()
                .map(|d| format!("upper dir after unmount: {d}"))
                .collect(),
        });
    }
    interchange(&kc, &oc, subject, since, ops.len())
}

/// Each side's stack (upper, workdir with its index, lowers) mounted by the other: the kernel
/// over ours, ours over the kernel's, and the two merged trees compared. An upper one of them
/// wrote that the other reads differently shows here.
fn interchange(
    kc: &StackCopy,
    oc: &StackCopy,
    subject: Impl,
    since: Since,
    step: usize,
) -> Option<Failure> {
    // Each over its own lowers: an upper's origin records name its own copy of them.
    let (kernel_on_ours, ours_on_kernels) = (oc, kc);
    let kmount = AnyMount::mount(Impl::Kernel, kernel_on_ours)
        .unwrap_or_else(|e| panic!("the kernel refuses our upper: {e}"));
    let omount = AnyMount::mount(subject, ours_on_kernels)
        .unwrap_or_else(|e| panic!("{} refuses the kernel's upper: {e}", subject.name()));
    let ks = Tree::take(kmount.path(), &kernel_on_ours.ino_map(), Some(since), true);
    let os = Tree::take(omount.path(), &ours_on_kernels.ino_map(), Some(since), true);
    let diffs = compare_trees(
        "the kernel on our upper",
        &ks,
        "ours on the kernel's",
        &os,
        CompareOpts::new(),
        FileBlocks::OneTreeBlock,
    );
    let mut lines: Vec<String> = [omount.unmount(), kmount.unmount()]
        .into_iter()
        .flatten()
        .collect();
    lines.extend(diffs.iter().map(|d| format!("remounted crosswise: {d}")));
    (!lines.is_empty()).then(|| Failure {
        signature: format!(
            "interchange:{}",
            diffs.first().map_or("unmount".to_owned(), |d| field_of(d))
        ),
        step,
        lines,
    })
}

/// Seeds from the environment: `RSFS_SEED=N` replays one; `RSFS_SEEDS` is a count (seeds
/// `base..base+count`), a range `A..B`, or a comma-separated list; else `default_count`
/// seeds from `base`.
pub fn seeds(base: u64, default_count: u64) -> Vec<u64> {
    let parse = |x: &str| -> u64 {
        let x = x.trim();
        match x.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16),
            None => x.parse(),
        }
        .unwrap_or_else(|_| panic!("bad seed {x:?}"))
    };
    if let Ok(s) = std::env::var("RSFS_SEED") {
        if !s.trim().is_empty() {
            return vec![parse(&s)];
        }
    }
    match std::env::var("RSFS_SEEDS") {
        Ok(s) if s.contains("..") => {
            let (a, b) = s.split_once("..").expect("a range");
            (parse(a)..parse(b)).collect()
        }
        Ok(s) if s.contains(',') => s.split(',').map(parse).collect(),
        Ok(s) if !s.trim().is_empty() => (base..base + parse(&s)).collect(),
        _ => (base..base + default_count).collect(),
    }
}

/// A number from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Look for a shorter operation sequence that still fails with the same signature, by deleting
/// chunks (halving their size) and then single operations. `fails` runs one sequence. At most
/// `budget` runs.
pub fn shrink(
    ops: &[Op],
    signature: &str,
    budget: usize,
    mut fails: impl FnMut(&[Op]) -> Option<Failure>,
) -> (Vec<Op>, Option<Failure>) {
    let mut best: Vec<Op> = ops.to_vec();
    let mut best_failure = None;
    let mut runs = 0;
    let mut chunk = best.len().div_ceil(2).max(1);
    loop {
        let mut start = 0;
        let mut progressed = false;
        while start < best.len() && runs < budget {
            let end = (start + chunk).min(best.len());
            let candidate: Vec<Op> = best[..start].iter().chain(&best[end..]).cloned().collect();
            runs += 1;
            match fails(&candidate) {
                Some(f) if f.signature == signature => {
                    // Keep only up to the failing step: what follows cannot matter.
                    let keep = (f.step + 1).min(candidate.len());
                    best = candidate[..keep].to_vec();
                    best_failure = Some(f);
                    progressed = true;
                }
                _ => start = end,
            }
        }
        if runs >= budget || (chunk == 1 && !progressed) {
            break;
        }
        if !progressed {
            chunk = (chunk / 2).max(1);
        }
    }
    (best, best_failure)
}

/// One line for a generated layer object (for reports).
pub fn describe_node(node: &Node) -> String {
    let m = |m: &stackgen::Meta| format!("{:04o} {}:{} mtime {}", m.mode, m.uid, m.gid, m.mtime.0);
    let xs = |x: &stackgen::Xattrs| {
        if x.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = x.iter().map(|(n, _)| n.as_str()).collect();
            format!(" xattrs {names:?}")
        }
    };
    match node {
        Node::Dir {
            meta,
            opaque,
            xattrs,
        } => format!(
            "dir {}{}{}",
            m(meta),
            if *opaque { " OPAQUE" } else { "" },
            xs(xattrs)
        ),
        Node::File {
            meta,
            content,
            xattrs,
        } => format!("file {} {} bytes{}", m(meta), content.len(), xs(xattrs)),
        Node::Symlink { target, xattrs, .. } => format!("symlink -> {target:?}{}", xs(xattrs)),
        Node::Hardlink { to } => format!("hard link to /{to}"),
        Node::Fifo { meta, xattrs } => format!("fifo {}{}", m(meta), xs(xattrs)),
        Node::CharDev { meta, major, minor } => format!("chardev {major}:{minor} {}", m(meta)),
        Node::Whiteout { xattr_ok } => {
            format!(
                "WHITEOUT{}",
                if *xattr_ok {
                    " (xattr format possible)"
                } else {
                    ""
                }
            )
        }
    }
}
