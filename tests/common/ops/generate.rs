//! The generator: the names operations aim at (`Pool`) and seeded sequences of operations over
//! them (`generate_ops`).

use super::*;

/// Kinds and their relative weights.
pub const KINDS: &[(&str, u64)] = &[
    ("create", 8),
    ("write", 6),
    ("append", 3),
    ("truncate", 3),
    ("ftruncate", 2),
    ("fallocate", 3),
    ("mkfifo", 2),
    ("mkdir", 6),
    ("symlink", 3),
    ("link", 4),
    ("unlink", 7),
    ("rmdir", 5),
    ("rename", 11),
    ("chmod", 3),
    ("chown", 3),
    ("utimens", 3),
    ("setxattr", 5),
    ("removexattr", 3),
    ("getxattr", 2),
    ("listxattr", 2),
    ("read", 3),
    ("readdir", 4),
    ("stat", 5),
    ("readlink", 1),
    ("copy_file_range", 2),
    ("seek", 2),
    ("fsync", 1),
    ("slot_open", 3),
    ("slot_write", 2),
    ("slot_read", 2),
    ("slot_truncate", 1),
    ("slot_stat", 2),
    ("slot_fsync", 1),
    ("slot_close", 2),
];

pub const SLOTS: usize = 3;

const FRESH: &[&str] = &["n0", "n1"];
const FRESH_DEEP: &[&str] = &["n0/n1", "n0/n1/n2", "n1/n0", "n2"];
const FILE_MODES: &[u32] = &[0o644, 0o600, 0o755, 0o4755, 0o2755, 0o444, 0o000, 0o1777];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o2775, 0o1777, 0o555];
const UIDS: &[Option<u32>] = &[Some(0), Some(1), Some(1000), Some(65534), None];
const XATTR_NAMES: &[&str] = &[
    "user.u1",
    "user.u2",
    "user.new",
    "trusted.t1",
    "trusted.new",
    "trusted.overlay.opaque",
    "trusted.overlay.origin",
    "trusted.overlay.x",
    "trusted.overlay.overlay.x",
    "user.overlay.opaque",
];
const SYMLINK_TARGETS: &[&str] = &[
    "a",
    "b/c",
    "../a",
    "n0",
    "n0/n1",
    "/etc/passwd",
    "/nonexistent",
    ".",
    "..",
];
const OFFSETS: &[u64] = &[0, 0, 1, 4095, 4096, 65536, 131_072, 131_073, 200_000];

/// The names operations aim at.
#[derive(Clone, Debug, Default)]
pub struct Pool {
    /// What the merged tree shows before the first operation.
    pub visible: Vec<String>,
    /// The non-directories among `visible`.
    pub visible_files: Vec<String>,
    /// The directories among `visible`.
    pub visible_dirs: Vec<String>,
    /// Fresh names in the directories the merged tree shows.
    pub fresh: Vec<String>,
    /// Every other name any layer holds (whited out, under an opaque directory, shadowed by a
    /// non-directory), whiteouts included, fresh names in hidden directories, nested fresh
    /// names at the root.
    pub other: Vec<String>,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The names of `spec` as the pool of targets: see `Pool`.
pub fn path_pool(spec: &StackSpec) -> Pool {
    let layers = spec.layers_top_first();
    let mut all = BTreeSet::new();
    let mut dirs = BTreeSet::from([String::new()]);
    for layer in &layers {
        for (path, node) in &layer.nodes {
            all.insert(path.clone());
            if matches!(node, Node::Dir { .. }) {
                dirs.insert(path.clone());
            }
        }
    }
    // The merged view: in each visible directory, the first layer of its stack that holds a
    // name decides (a whiteout hides it).
    let mut visible = BTreeSet::new();
    let mut visible_files = BTreeSet::new();
    let stacks = spec.dir_stacks();
    for (dir, stack) in &stacks {
        for &k in stack {
            for path in layers[k].nodes.keys() {
                let Some(name) = (if dir.is_empty() {
                    Some(path.as_str())
                } else {
                    path.strip_prefix(&format!("{dir}/"))
                }) else {
                    continue;
                };
                if name.contains('/') || visible.contains(path) {
                    continue;
                }
                let first = stack.iter().find_map(|&j| layers[j].nodes.get(path));
                match first {
                    Some(Node::Whiteout { .. }) | None => {}
                    Some(Node::Dir { .. }) => {
                        visible.insert(path.clone());
                    }
                    Some(_) => {
                        visible.insert(path.clone());
                        visible_files.insert(path.clone());
                    }
                }
            }
        }
    }
    let mut other: BTreeSet<String> = all.difference(&visible).cloned().collect();
    let mut fresh = BTreeSet::new();
    for d in &dirs {
        for f in FRESH {
            if stacks.contains_key(d) {
                fresh.insert(join(d, f));
            } else {
                other.insert(join(d, f));
            }
        }
    }
    other.extend(FRESH_DEEP.iter().map(|s| s.to_string()));
    Pool {
        visible_dirs: visible.difference(&visible_files).cloned().collect(),
        visible_files: visible_files.into_iter().collect(),
        visible: visible.into_iter().collect(),
        fresh: fresh.into_iter().collect(),
        other: other.into_iter().collect(),
    }
}

struct Gen<'a> {
    rng: Rng,
    pool: &'a Pool,
}

impl Gen<'_> {
    /// A name from the pool: `visible`, `fresh` and `other` percent of the time from each
    /// part; sometimes a child of it (ENOTDIR under non-directories). Never the root.
    fn pool_name(&mut self, visible: u64, fresh: u64) -> String {
        let roll = self.rng.below(100);
        let pick = |rng: &mut Rng, v: &[String]| (!v.is_empty()).then(|| rng.pick(v).clone());
        let base = if roll < visible {
            pick(&mut self.rng, &self.pool.visible)
        } else if roll < visible + fresh {
            pick(&mut self.rng, &self.pool.fresh)
        } else {
            pick(&mut self.rng, &self.pool.other)
        }
        .unwrap_or_else(|| "n0".to_string());
        if self.rng.chance(6) {
            format!("{base}/n3")
        } else {
            base
        }
    }

    /// A name that should exist: mostly one the merged tree shows.
    fn name(&mut self) -> String {
        self.pool_name(70, 10)
    }

    /// A name that should be a non-directory.
    fn file(&mut self) -> String {
        if self.rng.chance(65) && !self.pool.visible_files.is_empty() {
            self.rng.pick(&self.pool.visible_files).clone()
        } else {
            self.name()
        }
    }

    /// A name that should be a directory.
    fn dir(&mut self) -> String {
        if self.rng.chance(65) && !self.pool.visible_dirs.is_empty() {
            self.rng.pick(&self.pool.visible_dirs).clone()
        } else {
            self.name()
        }
    }

    /// A name to create: often a fresh one.
    fn target(&mut self) -> String {
        self.pool_name(35, 45)
    }

    /// Like `name`, or the root for operations that accept it.
    fn object(&mut self) -> String {
        if self.rng.chance(4) {
            String::new()
        } else {
            self.name()
        }
    }

    fn data(&mut self) -> Vec<u8> {
        let len = match self.rng.below(100) {
            0..=9 => 0,
            10..=59 => self.rng.range(1, 100),
            60..=89 => self.rng.range(100, 9000),
            _ => self.rng.range(9000, 270_000),
        } as usize;
        self.rng.bytes(len)
    }

    fn offset(&mut self) -> u64 {
        if self.rng.chance(30) {
            self.rng.below(300_000)
        } else {
            *self.rng.pick(OFFSETS)
        }
    }

    fn len(&mut self) -> u64 {
        match self.rng.below(6) {
            0 => 0,
            1 => 1,
            2 => 4096,
            3 => 70_000,
            4 => 300_000,
            _ => self.rng.below(200_000),
        }
    }

    fn mode(&mut self, dir: bool) -> u32 {
        *self.rng.pick(if dir { DIR_MODES } else { FILE_MODES })
    }

    fn open_spec(&mut self, creat: bool) -> OpenSpec {
        let access = *self
            .rng
            .pick(&[Access::Read, Access::Write, Access::ReadWrite]);
        OpenSpec {
            access: if creat && access == Access::Read {
                Access::Write
            } else {
                access
            },
            creat,
            excl: creat && self.rng.chance(40),
            trunc: self.rng.chance(25),
            append: self.rng.chance(20),
            nofollow: self.rng.chance(60),
        }
    }

    fn time(&mut self) -> TimeArg {
        match self.rng.below(5) {
            0 => TimeArg::Now,
            1 => TimeArg::Omit,
            _ => TimeArg::At(
                self.rng.range(1_000_000_000, 1_500_000_000) as i64,
                self.rng.below(1_000_000_000) as i64,
            ),
        }
    }

    fn slot(&mut self) -> usize {
        self.rng.below(SLOTS as u64) as usize
    }

    fn op(&mut self, kind: &str) -> Op {
        match kind {
            "create" => Op::Create {
                path: self.target(),
                open: self.open_spec(true),
                mode: self.mode(false),
                offset: self.offset(),
                data: self.data(),
            },
            "write" => Op::Write {
                path: self.file(),
                nofollow: self.rng.chance(60),
                offset: self.offset(),
                data: self.data(),
            },
            "append" => Op::Append {
                path: self.file(),
                data: self.data(),
            },
            "truncate" => Op::Truncate {
                path: self.file(),
                len: self.len(),
            },
            "ftruncate" => Op::Ftruncate {
                path: self.file(),
                len: self.len(),
            },
            "fallocate" => Op::Fallocate {
                path: self.file(),
                mode: *self.rng.pick(&[
                    Falloc::Allocate,
                    Falloc::KeepSize,
                    Falloc::PunchHole,
                    Falloc::PunchHole,
                    Falloc::ZeroRange,
                    Falloc::ZeroRangeKeepSize,
                ]),
                offset: self.offset(),
                len: self.rng.range(1, 200_000),
            },
            "mkfifo" => Op::Mkfifo {
                path: self.target(),
                mode: self.mode(false),
            },
            "mkdir" => Op::Mkdir {
                path: self.target(),
                mode: self.mode(true),
            },
            "symlink" => Op::Symlink {
                target: if self.rng.chance(5) {
                    "t".repeat(300)
                } else {
                    self.rng.pick(SYMLINK_TARGETS).to_string()
                },
                path: self.target(),
            },
            "link" => Op::Link {
                from: self.file(),
                to: self.target(),
            },
            "unlink" => Op::Unlink { path: self.file() },
            "rmdir" => Op::Rmdir { path: self.dir() },
            "rename" => Op::Rename {
                from: self.name(),
                to: self.target(),
                mode: match self.rng.below(20) {
                    0..=10 => RenameMode::Plain,
                    11..=14 => RenameMode::NoReplace,
                    15..=18 => RenameMode::Exchange,
                    _ => RenameMode::Whiteout,
                },
            },
            "chmod" => {
                let dir = self.rng.chance(40);
                Op::Chmod {
                    path: self.object(),
                    mode: self.mode(dir),
                }
            }
            "chown" => Op::Chown {
                path: self.object(),
                uid: *self.rng.pick(UIDS),
                gid: *self.rng.pick(UIDS),
            },
            "utimens" => Op::Utimens {
                path: self.object(),
                atime: self.time(),
                mtime: self.time(),
            },
            "setxattr" => Op::SetXattr {
                path: self.object(),
                name: self.rng.pick(XATTR_NAMES).to_string(),
                value: {
                    let n = if self.rng.chance(10) {
                        300
                    } else {
                        self.rng.below(20) as usize
                    };
                    self.rng.bytes(n)
                },
                flag: *self.rng.pick(&[
                    XattrFlag::Any,
                    XattrFlag::Any,
                    XattrFlag::Create,
                    XattrFlag::Replace,
                ]),
            },
            "removexattr" => Op::RemoveXattr {
                path: self.object(),
                name: self.rng.pick(XATTR_NAMES).to_string(),
            },
            "getxattr" => Op::GetXattr {
                path: self.object(),
                name: self.rng.pick(XATTR_NAMES).to_string(),
            },
            "listxattr" => Op::ListXattr {
                path: self.object(),
            },
            "read" => Op::Read {
                path: self.file(),
                nofollow: self.rng.chance(60),
                offset: self.offset(),
                len: self.rng.range(1, 300_000) as usize,
            },
            "readdir" => Op::ReadDir {
                path: if self.rng.chance(10) {
                    String::new()
                } else {
                    self.dir()
                },
            },
            "stat" => Op::Stat {
                path: self.object(),
            },
            "readlink" => Op::Readlink { path: self.file() },
            "copy_file_range" => Op::CopyFileRange {
                from: self.file(),
                to: self.file(),
                off_in: self.offset(),
                off_out: self.offset(),
                len: self.rng.range(1, 300_000) as usize,
            },
            "seek" => Op::Seek {
                path: self.file(),
                hole: self.rng.chance(50),
                offset: self.offset(),
            },
            "fsync" => Op::Fsync {
                path: self.object(),
                data_only: self.rng.chance(50),
            },
            "slot_open" => {
                let creat = self.rng.chance(30);
                Op::SlotOpen {
                    slot: self.slot(),
                    path: if creat { self.target() } else { self.file() },
                    open: self.open_spec(creat),
                    mode: self.mode(false),
                }
            }
            "slot_write" => Op::SlotWrite {
                slot: self.slot(),
                offset: if self.rng.chance(30) {
                    None
                } else {
                    Some(self.offset())
                },
                data: self.data(),
            },
            "slot_read" => Op::SlotRead {
                slot: self.slot(),
                offset: self.offset(),
                len: self.rng.range(1, 300_000) as usize,
            },
            "slot_truncate" => Op::SlotTruncate {
                slot: self.slot(),
                len: self.len(),
            },
            "slot_stat" => Op::SlotStat { slot: self.slot() },
            "slot_fsync" => Op::SlotFsync { slot: self.slot() },
            "slot_close" => Op::SlotClose { slot: self.slot() },
            other => panic!("unknown op kind {other}"),
        }
    }
}

/// `n` operations drawn from `seed` over `pool`, leaving out the kinds in `exclude`. The
/// sequence depends on nothing else: both mounts receive exactly the same operations.
pub fn generate_ops(seed: u64, pool: &Pool, n: usize, exclude: &[String]) -> Vec<Op> {
    for e in exclude {
        assert!(
            KINDS.iter().any(|(k, _)| k == e),
            "unknown op kind {e:?} (kinds: {:?})",
            KINDS.iter().map(|(k, _)| *k).collect::<Vec<_>>()
        );
    }
    let kinds: Vec<(&str, u64)> = KINDS
        .iter()
        .filter(|(k, _)| !exclude.iter().any(|e| e == k))
        .copied()
        .collect();
    assert!(!kinds.is_empty(), "every op kind excluded");
    let total: u64 = kinds.iter().map(|(_, w)| w).sum();
    let mut g = Gen {
        rng: Rng::new(seed).fork(0x0505),
        pool,
    };
    (0..n)
        .map(|_| {
            let mut x = g.rng.below(total);
            let kind = kinds
                .iter()
                .find(|(_, w)| {
                    if x < *w {
                        true
                    } else {
                        x -= w;
                        false
                    }
                })
                .expect("weights cover the range")
                .0;
            g.op(kind)
        })
        .collect()
}

/// Op kinds to leave out, from `RSFS_OPS_EXCLUDE=kind,kind` (a debugging aid for looking past
/// one known difference; the default excludes nothing).
pub fn excluded_kinds() -> Vec<String> {
    std::env::var("RSFS_OPS_EXCLUDE")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}
