//! Snapshots of written trees (merged views and upper directories) and their comparison: times
//! reduced to "old, exact" or "changed during the test", the kernel's per-mount markers left out,
//! data maps of regular files.

use super::*;

/// The marker for a timestamp set during the test.
pub const RECENT: (i64, i64) = (-1, -1);

/// Timestamps set during the test (at or after `since`) become `RECENT`: they cannot match
/// between two mounts, but whether an object was changed at all must. Older mtimes stay exact
/// (copy-up and utimensat preserve them); older ctimes become `(0, 0)` (each mount has its own
/// copy of the layers, made at a different moment).
pub fn mask_times(snap: &mut Snapshot, since: Since) {
    for e in snap.entries.values_mut() {
        if let Ok(st) = e.stat.as_mut() {
            if since.is_recent(st.mtime) {
                st.mtime = RECENT;
            }
            st.ctime = if since.is_recent(st.ctime) {
                RECENT
            } else {
                (0, 0)
            };
        }
    }
}

pub const OVL_UUID: &str = "trusted.overlay.uuid";
pub const OVL_ORIGIN: &str = "trusted.overlay.origin";

/// For comparing two upper directories written over different copies of the same lowers: the
/// root's `trusted.overlay.uuid` (the kernel's, written at mount) is dropped, and the value of
/// `trusted.overlay.origin` (a file handle of the lower object: its inode numbers differ between
/// the copies) is reduced to its presence.
pub fn normalize_upper(snap: &mut Snapshot) {
    for (path, e) in snap.entries.iter_mut() {
        if let Ok(xs) = e.xattrs.as_mut() {
            if path == "/" {
                xs.retain(|(n, _)| n != OVL_UUID);
            }
            for (n, v) in xs.iter_mut() {
                if n == OVL_ORIGIN && v.is_ok() {
                    *v = Ok(b"<present>".to_vec());
                }
            }
        }
    }
}

/// In an upper directory a whiteout is a character device 0/0, and that is all the format
/// says. The kernel links all of its whiteouts to one inode it keeps in the workdir (made with
/// the mounter's credentials, mode 0, at its first use); another writer may make one inode per
/// name (`RENAME_WHITEOUT`, which takes the group of a setgid directory). So of a whiteout only
/// the type and device number are compared, not these fields.
pub const WHITEOUT_FREE_FIELDS: &[&str] = &[
    "ino", "nlink", "d_ino", "mode", "uid", "gid", "mtime", "ctime",
];

/// The whiteouts (character devices 0/0) of a snapshot of an upper directory.
pub fn whiteout_paths(snap: &Snapshot) -> Vec<String> {
    snap.entries
        .iter()
        .filter(|(_, e)| {
            e.stat
                .as_ref()
                .is_ok_and(|s| s.kind == snapshot::Kind::CharDev && s.rdev == 0)
        })
        .map(|(p, _)| p.clone())
        .collect()
}

/// A snapshot, and for each regular file its data map: the `start-end` extents that
/// `SEEK_DATA`/`SEEK_HOLE` report (holes must survive copy-up, punch-hole must punch), taken
/// after a `sync()`.
pub struct Tree {
    pub snap: Snapshot,
    pub maps: BTreeMap<String, String>,
}

fn data_map(path: &Path) -> String {
    let fd = match nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => return format!("open: {}", ename(e)),
    };
    let size = match nix::sys::stat::fstat(&fd) {
        Ok(st) => st.st_size,
        Err(e) => return format!("fstat: {}", ename(e)),
    };
    let mut out = Vec::new();
    let mut at = 0i64;
    while at < size {
        let data = match nix::unistd::lseek(&fd, at, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break,
            Err(e) => return format!("SEEK_DATA {at}: {}", ename(e)),
        };
        let hole = match nix::unistd::lseek(&fd, data, Whence::SeekHole) {
            Ok(h) => h,
            Err(e) => return format!("SEEK_HOLE {data}: {}", ename(e)),
        };
        out.push(format!("{data}-{hole}"));
        if hole <= at {
            out.push("(no progress)".into());
            break;
        }
        at = hole;
    }
    out.join(",")
}

impl Tree {
    /// Walk `root`: inode numbers named through `map`, times masked from `since` (when
    /// given), reads of the overlay's private xattrs probed when `probes`.
    pub fn take(root: &Path, map: &InoMap, since: Option<Since>, probes: bool) -> Tree {
        // Write everything back first: until ext4 has converted them, written ranges of a
        // fallocated (unwritten) extent are data or hole for SEEK_DATA/SEEK_HOLE depending on
        // what the page cache holds, and delayed-allocation blocks are estimates.
        nix::unistd::sync();
        let opts = if probes {
            SnapshotOpts::private_probes("trusted.overlay.")
        } else {
            SnapshotOpts::default()
        };
        let mut snap = Snapshot::take(root, &opts);
        snap.relabel(map);
        if let Some(since) = since {
            mask_times(&mut snap, since);
        }
        let maps = snap
            .entries
            .iter()
            .filter(|(_, e)| {
                e.stat
                    .as_ref()
                    .is_ok_and(|s| s.kind == snapshot::Kind::File)
            })
            .map(|(p, _)| {
                let abs = if p == "/" {
                    root.to_path_buf()
                } else {
                    root.join(&p[1..])
                };
                (p.clone(), data_map(&abs))
            })
            .collect();
        Tree { snap, maps }
    }
}

/// How `compare_trees` treats `st_blocks` of regular files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileBlocks {
    /// The same objects seen twice: equal.
    Exact,
    /// Two copies written by the same operations: ext4 may split one copy's data into more
    /// extents than the other's (it depends on where free space was), and more than four
    /// extents need an extent-tree block, so one block (8 sectors) of slack; the data maps
    /// are compared exactly.
    OneTreeBlock,
}

/// Every difference between two trees: the snapshot comparison (see `snapshot::compare`) and
/// the data maps.
pub fn compare_trees(
    ln: &str,
    l: &Tree,
    rn: &str,
    r: &Tree,
    opts: CompareOpts,
    blocks: FileBlocks,
) -> Vec<String> {
    let mut opts = opts;
    let mut extra = Vec::new();
    if blocks == FileBlocks::OneTreeBlock {
        for (path, le) in &l.snap.entries {
            let (Ok(ls), Some(Ok(rs))) = (&le.stat, r.snap.entries.get(path).map(|e| &e.stat))
            else {
                continue;
            };
            if ls.kind == snapshot::Kind::File && rs.kind == snapshot::Kind::File {
                opts = opts.skip_at(path, "blocks");
                if ls.blocks.abs_diff(rs.blocks) > 8 {
                    extra.push(format!(
                        "{path}: blocks (more than one extent-tree block apart): {ln}={} vs {rn}={}",
                        ls.blocks, rs.blocks
                    ));
                }
            }
        }
    }
    let mut diffs = snapshot::compare(ln, &l.snap, rn, &r.snap, &opts);
    diffs.extend(extra);
    for (path, lm) in &l.maps {
        if let Some(rm) = r.maps.get(path) {
            if lm != rm {
                diffs.push(format!("{path}: data map: {ln}=[{lm}] vs {rn}=[{rm}]"));
            }
        }
    }
    diffs
}

/// The kernel's upper directory vs ours, after unmounting: the same entries, types, whiteouts,
/// opaque markers, modes, owners, contents, sizes, symlink targets, xattrs (the overlay's
/// included, normalized by `normalize_upper`), link structure, old mtimes.
pub fn compare_uppers(kernel_upper: &Path, our_upper: &Path, since: Since) -> Vec<String> {
    let tree = |root: &Path| {
        let mut t = Tree::take(
            root,
            &InoMap::for_stack(&[], Some(root)),
            Some(since),
            false,
        );
        normalize_upper(&mut t.snap);
        t
    };
    let kt = tree(kernel_upper);
    let ot = tree(our_upper);
    let mut opts = CompareOpts::new();
    let mut whiteouts: BTreeSet<String> = whiteout_paths(&kt.snap).into_iter().collect();
    whiteouts.extend(whiteout_paths(&ot.snap));
    for w in &whiteouts {
        for field in WHITEOUT_FREE_FIELDS {
            opts = opts.skip_at(w, field);
        }
    }
    compare_trees("kernel", &kt, "ours", &ot, opts, FileBlocks::OneTreeBlock)
}
