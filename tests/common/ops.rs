//! Random sequences of filesystem operations for the write-path differential tests: a seeded
//! generator (`generate_ops`) that aims every kind of operation at the names a generated layer
//! stack holds (lower files and directories, merged and opaque directories, whited-out names,
//! symlinks, hard links, fifos, devices, upper files) plus fresh names, an executor that applies
//! one operation to a mounted tree and describes its result (`Executor::apply`), and a runner
//! that drives the kernel's overlayfs and ours in lockstep over two identical copies of one
//! stack and lists every difference (`run_differential`).
//!
//! Safety of the host: generated layers hold absolute symlinks (`/etc/passwd`, `/`) and
//! relative ones that climb out of the mount, so no operation may follow a symlink out of the
//! tree. Every name is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` below an
//! fd of the mount root (escaping symlinks fail with EXDEV on both sides), and the last
//! component is never followed (`*at` calls with `AT_SYMLINK_NOFOLLOW`, or `/proc/self/fd/N`
//! of an `O_PATH | O_NOFOLLOW` fd, which the kernel does not follow further) — except by opens,
//! which follow it only within the tree.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{FallocateFlags, OFlag, OpenHow, RenameFlags, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, Whence};

use super::prng::{Rng, fnv1a};
use super::scratch::Scratch;
use super::snapshot::{self, CompareOpts, InoMap, Snapshot, SnapshotOpts};
use super::stackgen::{self, GenParams, Node, StackSpec, Style};
use super::{Layer, Xflavor, mount_kernel, mount_ours};

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// The flags of an `open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenSpec {
    pub access: Access,
    pub creat: bool,
    pub excl: bool,
    pub trunc: bool,
    pub append: bool,
    pub nofollow: bool,
}

impl OpenSpec {
    pub fn oflag(&self) -> OFlag {
        let mut f = match self.access {
            Access::Read => OFlag::O_RDONLY,
            Access::Write => OFlag::O_WRONLY,
            Access::ReadWrite => OFlag::O_RDWR,
        };
        for (on, bit) in [
            (self.creat, OFlag::O_CREAT),
            (self.excl, OFlag::O_EXCL),
            (self.trunc, OFlag::O_TRUNC),
            (self.append, OFlag::O_APPEND),
            (self.nofollow, OFlag::O_NOFOLLOW),
        ] {
            if on {
                f |= bit;
            }
        }
        f
    }
}

impl fmt::Display for OpenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = vec![match self.access {
            Access::Read => "RDONLY",
            Access::Write => "WRONLY",
            Access::ReadWrite => "RDWR",
        }];
        for (on, name) in [
            (self.creat, "CREAT"),
            (self.excl, "EXCL"),
            (self.trunc, "TRUNC"),
            (self.append, "APPEND"),
            (self.nofollow, "NOFOLLOW"),
        ] {
            if on {
                parts.push(name);
            }
        }
        write!(f, "{}", parts.join("|"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeArg {
    Now,
    Omit,
    At(i64, i64),
}

impl TimeArg {
    fn spec(self) -> TimeSpec {
        match self {
            TimeArg::Now => TimeSpec::UTIME_NOW,
            TimeArg::Omit => TimeSpec::UTIME_OMIT,
            TimeArg::At(s, ns) => TimeSpec::new(s, ns),
        }
    }
}

impl fmt::Display for TimeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeArg::Now => write!(f, "UTIME_NOW"),
            TimeArg::Omit => write!(f, "UTIME_OMIT"),
            TimeArg::At(s, ns) => write!(f, "{s}.{ns:09}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Falloc {
    Allocate,
    KeepSize,
    PunchHole,
    ZeroRange,
    ZeroRangeKeepSize,
}

impl Falloc {
    fn flags(self) -> FallocateFlags {
        match self {
            Falloc::Allocate => FallocateFlags::empty(),
            Falloc::KeepSize => FallocateFlags::FALLOC_FL_KEEP_SIZE,
            Falloc::PunchHole => {
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            }
            Falloc::ZeroRange => FallocateFlags::FALLOC_FL_ZERO_RANGE,
            Falloc::ZeroRangeKeepSize => {
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    Plain,
    NoReplace,
    Exchange,
    /// Not allowed from user space on an overlay: EINVAL.
    Whiteout,
}

impl RenameMode {
    fn flags(self) -> RenameFlags {
        match self {
            RenameMode::Plain => RenameFlags::empty(),
            RenameMode::NoReplace => RenameFlags::RENAME_NOREPLACE,
            RenameMode::Exchange => RenameFlags::RENAME_EXCHANGE,
            RenameMode::Whiteout => RenameFlags::RENAME_WHITEOUT,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrFlag {
    Any,
    Create,
    Replace,
}

/// One operation. Paths are relative to the mount root (`a/b`; `""` is the root itself).
/// Slots are file descriptors kept open across operations.
#[derive(Clone, Debug)]
pub enum Op {
    /// open(O_CREAT|...), then write `data` at `offset` (with O_APPEND: at the end), fstat.
    Create {
        path: String,
        open: OpenSpec,
        mode: u32,
        offset: u64,
        data: Vec<u8>,
    },
    /// open(O_WRONLY), pwrite.
    Write {
        path: String,
        nofollow: bool,
        offset: u64,
        data: Vec<u8>,
    },
    /// open(O_WRONLY|O_APPEND), write.
    Append {
        path: String,
        data: Vec<u8>,
    },
    /// truncate(2) on the object itself (never through a final symlink).
    Truncate {
        path: String,
        len: u64,
    },
    /// open(O_WRONLY), ftruncate.
    Ftruncate {
        path: String,
        len: u64,
    },
    Fallocate {
        path: String,
        mode: Falloc,
        offset: u64,
        len: u64,
    },
    Mkfifo {
        path: String,
        mode: u32,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        mode: RenameMode,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: Option<u32>,
        gid: Option<u32>,
    },
    Utimens {
        path: String,
        atime: TimeArg,
        mtime: TimeArg,
    },
    SetXattr {
        path: String,
        name: String,
        value: Vec<u8>,
        flag: XattrFlag,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    GetXattr {
        path: String,
        name: String,
    },
    ListXattr {
        path: String,
    },
    /// open(O_RDONLY), pread.
    Read {
        path: String,
        nofollow: bool,
        offset: u64,
        len: usize,
    },
    ReadDir {
        path: String,
    },
    Stat {
        path: String,
    },
    Readlink {
        path: String,
    },
    CopyFileRange {
        from: String,
        to: String,
        off_in: u64,
        off_out: u64,
        len: usize,
    },
    /// lseek(SEEK_DATA) or lseek(SEEK_HOLE).
    Seek {
        path: String,
        hole: bool,
        offset: u64,
    },
    Fsync {
        path: String,
        data_only: bool,
    },
    SlotOpen {
        slot: usize,
        path: String,
        open: OpenSpec,
        mode: u32,
    },
    /// pwrite at `offset`, or write at the file position when `None`.
    SlotWrite {
        slot: usize,
        offset: Option<u64>,
        data: Vec<u8>,
    },
    SlotRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    SlotTruncate {
        slot: usize,
        len: u64,
    },
    SlotStat {
        slot: usize,
    },
    SlotFsync {
        slot: usize,
    },
    SlotClose {
        slot: usize,
    },
}

fn p(s: &str) -> String {
    format!("/{s}")
}

fn data(d: &[u8]) -> String {
    format!("{} bytes #{:08x}", d.len(), fnv1a(d) as u32)
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create {
                path,
                open,
                mode,
                offset,
                data: d,
            } => write!(
                f,
                "create {} {open} mode {mode:04o}, write {} at {offset}",
                p(path),
                data(d)
            ),
            Op::Write {
                path,
                nofollow,
                offset,
                data: d,
            } => write!(
                f,
                "write {}{} {} at {offset}",
                p(path),
                if *nofollow { " (NOFOLLOW)" } else { "" },
                data(d)
            ),
            Op::Append { path, data: d } => write!(f, "append {} {}", p(path), data(d)),
            Op::Truncate { path, len } => write!(f, "truncate {} {len}", p(path)),
            Op::Ftruncate { path, len } => write!(f, "ftruncate {} {len}", p(path)),
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => write!(f, "fallocate {} {mode:?} {offset}+{len}", p(path)),
            Op::Mkfifo { path, mode } => write!(f, "mkfifo {} {mode:04o}", p(path)),
            Op::Mkdir { path, mode } => write!(f, "mkdir {} {mode:04o}", p(path)),
            Op::Symlink { target, path } => write!(f, "symlink {} -> {target:?}", p(path)),
            Op::Link { from, to } => write!(f, "link {} {}", p(from), p(to)),
            Op::Unlink { path } => write!(f, "unlink {}", p(path)),
            Op::Rmdir { path } => write!(f, "rmdir {}", p(path)),
            Op::Rename { from, to, mode } => {
                write!(f, "rename {} {} {mode:?}", p(from), p(to))
            }
            Op::Chmod { path, mode } => write!(f, "chmod {} {mode:04o}", p(path)),
            Op::Chown { path, uid, gid } => {
                let s = |v: &Option<u32>| v.map_or("-1".to_string(), |v| v.to_string());
                write!(f, "lchown {} {}:{}", p(path), s(uid), s(gid))
            }
            Op::Utimens { path, atime, mtime } => {
                write!(
                    f,
                    "utimensat {} atime {atime} mtime {mtime} NOFOLLOW",
                    p(path)
                )
            }
            Op::SetXattr {
                path,
                name,
                value,
                flag,
            } => write!(
                f,
                "lsetxattr {} {name} {} {flag:?}",
                p(path),
                snapshot::show_bytes(value)
            ),
            Op::RemoveXattr { path, name } => write!(f, "lremovexattr {} {name}", p(path)),
            Op::GetXattr { path, name } => write!(f, "lgetxattr {} {name}", p(path)),
            Op::ListXattr { path } => write!(f, "llistxattr {}", p(path)),
            Op::Read {
                path,
                nofollow,
                offset,
                len,
            } => write!(
                f,
                "read {}{} {len} at {offset}",
                p(path),
                if *nofollow { " (NOFOLLOW)" } else { "" }
            ),
            Op::ReadDir { path } => write!(f, "readdir {}", p(path)),
            Op::Stat { path } => write!(f, "lstat {}", p(path)),
            Op::Readlink { path } => write!(f, "readlink {}", p(path)),
            Op::CopyFileRange {
                from,
                to,
                off_in,
                off_out,
                len,
            } => write!(
                f,
                "copy_file_range {}@{off_in} -> {}@{off_out} len {len}",
                p(from),
                p(to)
            ),
            Op::Seek { path, hole, offset } => write!(
                f,
                "lseek {} {offset} {}",
                p(path),
                if *hole { "SEEK_HOLE" } else { "SEEK_DATA" }
            ),
            Op::Fsync { path, data_only } => write!(
                f,
                "{} {}",
                if *data_only { "fdatasync" } else { "fsync" },
                p(path)
            ),
            Op::SlotOpen {
                slot,
                path,
                open,
                mode,
            } => write!(f, "slot{slot} = open {} {open} mode {mode:04o}", p(path)),
            Op::SlotWrite {
                slot,
                offset,
                data: d,
            } => match offset {
                Some(o) => write!(f, "slot{slot}: pwrite {} at {o}", data(d)),
                None => write!(f, "slot{slot}: write {}", data(d)),
            },
            Op::SlotRead { slot, offset, len } => {
                write!(f, "slot{slot}: pread {len} at {offset}")
            }
            Op::SlotTruncate { slot, len } => write!(f, "slot{slot}: ftruncate {len}"),
            Op::SlotStat { slot } => write!(f, "slot{slot}: fstat"),
            Op::SlotFsync { slot } => write!(f, "slot{slot}: fsync"),
            Op::SlotClose { slot } => write!(f, "slot{slot}: close"),
        }
    }
}

impl Op {
    /// The generator's name for this kind of operation (`RSFS_OPS_EXCLUDE` takes these).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Write { .. } => "write",
            Op::Append { .. } => "append",
            Op::Truncate { .. } => "truncate",
            Op::Ftruncate { .. } => "ftruncate",
            Op::Fallocate { .. } => "fallocate",
            Op::Mkfifo { .. } => "mkfifo",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Chmod { .. } => "chmod",
            Op::Chown { .. } => "chown",
            Op::Utimens { .. } => "utimens",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::Read { .. } => "read",
            Op::ReadDir { .. } => "readdir",
            Op::Stat { .. } => "stat",
            Op::Readlink { .. } => "readlink",
            Op::CopyFileRange { .. } => "copy_file_range",
            Op::Seek { .. } => "seek",
            Op::Fsync { .. } => "fsync",
            Op::SlotOpen { .. } => "slot_open",
            Op::SlotWrite { .. } => "slot_write",
            Op::SlotRead { .. } => "slot_read",
            Op::SlotTruncate { .. } => "slot_truncate",
            Op::SlotStat { .. } => "slot_stat",
            Op::SlotFsync { .. } => "slot_fsync",
            Op::SlotClose { .. } => "slot_close",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The generator

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
    /// What the merged tree shows before the first operation, and fresh names in its
    /// directories.
    pub visible: Vec<String>,
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
                if !matches!(first, Some(Node::Whiteout { .. })) {
                    visible.insert(path.clone());
                }
            }
        }
    }
    let mut other: BTreeSet<String> = all.difference(&visible).cloned().collect();
    for d in &dirs {
        for f in FRESH {
            if stacks.contains_key(d) {
                visible.insert(join(d, f));
            } else {
                other.insert(join(d, f));
            }
        }
    }
    other.extend(FRESH_DEEP.iter().map(|s| s.to_string()));
    Pool {
        visible: visible.into_iter().collect(),
        other: other.into_iter().collect(),
    }
}

struct Gen<'a> {
    rng: Rng,
    pool: &'a Pool,
}

impl Gen<'_> {
    /// A name to operate on: mostly a visible one, sometimes a child of one (ENOTDIR under
    /// non-directories), never the root.
    fn name(&mut self) -> String {
        let from_visible = self.pool.other.is_empty() || self.rng.chance(70);
        let base = if from_visible && !self.pool.visible.is_empty() {
            self.rng.pick(&self.pool.visible).clone()
        } else {
            self.rng.pick(&self.pool.other).clone()
        };
        if self.rng.chance(8) {
            format!("{base}/n3")
        } else {
            base
        }
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
                path: self.name(),
                open: self.open_spec(true),
                mode: self.mode(false),
                offset: self.offset(),
                data: self.data(),
            },
            "write" => Op::Write {
                path: self.name(),
                nofollow: self.rng.chance(60),
                offset: self.offset(),
                data: self.data(),
            },
            "append" => Op::Append {
                path: self.name(),
                data: self.data(),
            },
            "truncate" => Op::Truncate {
                path: self.name(),
                len: self.len(),
            },
            "ftruncate" => Op::Ftruncate {
                path: self.name(),
                len: self.len(),
            },
            "fallocate" => Op::Fallocate {
                path: self.name(),
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
                path: self.name(),
                mode: self.mode(false),
            },
            "mkdir" => Op::Mkdir {
                path: self.name(),
                mode: self.mode(true),
            },
            "symlink" => Op::Symlink {
                target: if self.rng.chance(5) {
                    "t".repeat(300)
                } else {
                    self.rng.pick(SYMLINK_TARGETS).to_string()
                },
                path: self.name(),
            },
            "link" => Op::Link {
                from: self.name(),
                to: self.name(),
            },
            "unlink" => Op::Unlink { path: self.name() },
            "rmdir" => Op::Rmdir { path: self.name() },
            "rename" => Op::Rename {
                from: self.name(),
                to: self.name(),
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
                path: self.name(),
                nofollow: self.rng.chance(60),
                offset: self.offset(),
                len: self.rng.range(1, 300_000) as usize,
            },
            "readdir" => Op::ReadDir {
                path: self.object(),
            },
            "stat" => Op::Stat {
                path: self.object(),
            },
            "readlink" => Op::Readlink { path: self.name() },
            "copy_file_range" => Op::CopyFileRange {
                from: self.name(),
                to: self.name(),
                off_in: self.offset(),
                off_out: self.offset(),
                len: self.rng.range(1, 300_000) as usize,
            },
            "seek" => Op::Seek {
                path: self.name(),
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
                    path: self.name(),
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

// ---------------------------------------------------------------------------------------------
// The executor

/// What an operation returned: a description of its result, or `step: ERRNO`.
pub type OpResult = Result<String, String>;

/// The moment after which a timestamp counts as "set during the test": times at or after it
/// are shown as `now` (they cannot match between two mounts), earlier ones exactly.
#[derive(Clone, Copy, Debug)]
pub struct Since(pub (i64, i64));

impl Since {
    /// Now, after a pause longer than a clock tick, so that no timestamp written before this
    /// call (file systems use the coarse clock) can count as recent, and none after it as old.
    pub fn now() -> Since {
        std::thread::sleep(Duration::from_millis(30));
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970");
        let s = Since((t.as_secs() as i64, i64::from(t.subsec_nanos())));
        std::thread::sleep(Duration::from_millis(30));
        s
    }

    pub fn is_recent(&self, t: (i64, i64)) -> bool {
        t >= self.0
    }

    fn show(&self, t: (i64, i64)) -> String {
        if self.is_recent(t) {
            "now".into()
        } else {
            format!("{}.{:09}", t.0, t.1)
        }
    }
}

fn ename(e: Errno) -> String {
    format!("{e:?}")
}

/// Map an errno to `step: ERRNO`.
fn err(step: &'static str) -> impl Fn(Errno) -> String {
    move |e| format!("{step}: {}", ename(e))
}

fn io_ename(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map_or_else(|| e.to_string(), |c| ename(Errno::from_raw(c)))
}

fn kind_of(mode: u32) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFREG => "reg",
        libc::S_IFDIR => "dir",
        libc::S_IFLNK => "lnk",
        libc::S_IFIFO => "fifo",
        libc::S_IFCHR => "chr",
        libc::S_IFBLK => "blk",
        libc::S_IFSOCK => "sock",
        _ => "?",
    }
}

/// The attributes both mounts must agree on (inode numbers are compared at checkpoints,
/// through the layers' names for them).
pub fn stat_line(st: &FileStat, since: Since) -> String {
    format!(
        "{} {:04o} {}:{} size={} nlink={} rdev={:x} mtime={}",
        kind_of(st.st_mode),
        st.st_mode & 0o7777,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_nlink,
        st.st_rdev,
        since.show((st.st_mtime, st.st_mtime_nsec))
    )
}

fn split(path: &str) -> (&str, &str) {
    if path.is_empty() {
        return (".", ".");
    }
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (".", path),
    }
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// `/proc/self/fd/<fd>/<name>`: the name looked up in the directory `fd` (the directory itself
/// is never re-resolved).
fn in_dir(fd: &OwnedFd, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", fd.as_raw_fd()))
}

fn magic(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// lsetxattr with flags (the shared helper has none).
fn lsetxattr(path: &Path, name: &str, value: &[u8], flag: XattrFlag) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("no NUL in paths");
    let n = CString::new(name).expect("no NUL in xattr names");
    let flags = match flag {
        XattrFlag::Any => 0,
        XattrFlag::Create => libc::XATTR_CREATE,
        XattrFlag::Replace => libc::XATTR_REPLACE,
    };
    // SAFETY: both strings are NUL-terminated; value is valid for value.len() bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn hash_line(buf: &[u8]) -> String {
    format!("{} bytes #{:016x}", buf.len(), fnv1a(buf))
}

/// Applies operations to one mounted tree.
pub struct Executor {
    root_fd: OwnedFd,
    slots: Vec<Option<OwnedFd>>,
    since: Since,
}

impl Executor {
    pub fn new(root: &Path, since: Since) -> Executor {
        let root_fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap_or_else(|e| panic!("open {}: {e}", root.display()));
        Executor {
            root_fd,
            slots: (0..SLOTS).map(|_| None).collect(),
            since,
        }
    }

    /// Close every slot (a mount with open files cannot be unmounted).
    pub fn close_all(&mut self) {
        for s in &mut self.slots {
            s.take();
        }
    }

    /// An `O_PATH` fd of the directory holding `path`, and the last component.
    fn parent<'p>(&self, path: &'p str) -> Result<(OwnedFd, &'p str), String> {
        let (dir, name) = split(path);
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(beneath());
        let fd = openat2(&self.root_fd, dir, how).map_err(|e| format!("parent: {}", ename(e)))?;
        Ok((fd, name))
    }

    /// An `O_PATH | O_NOFOLLOW` fd of `path` itself.
    fn object(&self, path: &str) -> Result<OwnedFd, String> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(beneath());
        let p = if path.is_empty() { "." } else { path };
        openat2(&self.root_fd, p, how).map_err(|e| format!("lookup: {}", ename(e)))
    }

    fn open(&self, path: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, String> {
        let mut how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .resolve(beneath());
        if flags.contains(OFlag::O_CREAT) {
            how = how.mode(Mode::from_bits_truncate(mode));
        }
        let p = if path.is_empty() { "." } else { path };
        openat2(&self.root_fd, p, how).map_err(|e| format!("open: {}", ename(e)))
    }

    fn lstat(&self, path: &str) -> Result<FileStat, String> {
        let (dir, name) = self.parent(path)?;
        nix::sys::stat::fstatat(&dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| format!("lstat: {}", ename(e)))
    }

    fn lstat_line(&self, path: &str) -> String {
        match self.lstat(path) {
            Ok(st) => stat_line(&st, self.since),
            Err(e) => e,
        }
    }

    fn fstat_line(&self, fd: impl AsFd) -> String {
        match nix::sys::stat::fstat(fd) {
            Ok(st) => stat_line(&st, self.since),
            Err(e) => format!("fstat: {}", ename(e)),
        }
    }

    fn pread(fd: impl AsFd, offset: u64, len: usize) -> OpResult {
        let mut buf = vec![0u8; len];
        let n = nix::sys::uio::pread(fd, &mut buf, offset as i64)
            .map_err(|e| format!("pread: {}", ename(e)))?;
        Ok(hash_line(&buf[..n]))
    }

    fn slot(&self, slot: usize) -> Option<&OwnedFd> {
        self.slots[slot].as_ref()
    }

    /// Apply `op`; describe what happened.
    pub fn apply(&mut self, op: &Op) -> OpResult {
        match op {
            Op::Create {
                path,
                open,
                mode,
                offset,
                data,
            } => {
                let fd = self.open(path, open.oflag(), *mode)?;
                let n = if data.is_empty() {
                    0
                } else if open.append {
                    nix::unistd::write(&fd, data).map_err(err("write"))?
                } else {
                    nix::sys::uio::pwrite(&fd, data, *offset as i64).map_err(err("pwrite"))?
                };
                Ok(format!("wrote {n}; {}", self.fstat_line(&fd)))
            }
            Op::Write {
                path,
                nofollow,
                offset,
                data,
            } => {
                let mut fl = OFlag::O_WRONLY;
                if *nofollow {
                    fl |= OFlag::O_NOFOLLOW;
                }
                let fd = self.open(path, fl, 0)?;
                let n = nix::sys::uio::pwrite(&fd, data, *offset as i64).map_err(err("pwrite"))?;
                Ok(format!("wrote {n}; {}", self.fstat_line(&fd)))
            }
            Op::Append { path, data } => {
                let fd = self.open(path, OFlag::O_WRONLY | OFlag::O_APPEND, 0)?;
                let n = nix::unistd::write(&fd, data).map_err(err("write"))?;
                Ok(format!("wrote {n}; {}", self.fstat_line(&fd)))
            }
            Op::Truncate { path, len } => {
                let fd = self.object(path)?;
                nix::unistd::truncate(&magic(&fd), *len as i64).map_err(err("truncate"))?;
                Ok(self.lstat_line(path))
            }
            Op::Ftruncate { path, len } => {
                let fd = self.open(path, OFlag::O_WRONLY, 0)?;
                nix::unistd::ftruncate(&fd, *len as i64).map_err(err("ftruncate"))?;
                Ok(self.fstat_line(&fd))
            }
            Op::Fallocate {
                path,
                mode,
                offset,
                len,
            } => {
                let fd = self.open(path, OFlag::O_RDWR, 0)?;
                nix::fcntl::fallocate(&fd, mode.flags(), *offset as i64, *len as i64)
                    .map_err(err("fallocate"))?;
                Ok(self.fstat_line(&fd))
            }
            Op::Mkfifo { path, mode } => {
                let (dir, name) = self.parent(path)?;
                nix::sys::stat::mknodat(
                    &dir,
                    name,
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(*mode),
                    0,
                )
                .map_err(err("mknod"))?;
                Ok(self.lstat_line(path))
            }
            Op::Mkdir { path, mode } => {
                let (dir, name) = self.parent(path)?;
                nix::sys::stat::mkdirat(&dir, name, Mode::from_bits_truncate(*mode))
                    .map_err(err("mkdir"))?;
                Ok(self.lstat_line(path))
            }
            Op::Symlink { target, path } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::symlinkat(target.as_str(), &dir, name).map_err(err("symlink"))?;
                Ok(self.lstat_line(path))
            }
            Op::Link { from, to } => {
                let (d1, n1) = self.parent(from)?;
                let (d2, n2) = self.parent(to)?;
                nix::unistd::linkat(&d1, n1, &d2, n2, AtFlags::empty()).map_err(err("link"))?;
                Ok(format!(
                    "{} / {}",
                    self.lstat_line(from),
                    self.lstat_line(to)
                ))
            }
            Op::Unlink { path } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir)
                    .map_err(err("unlink"))?;
                Ok(self.lstat_line(path))
            }
            Op::Rmdir { path } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::unlinkat(&dir, name, UnlinkatFlags::RemoveDir)
                    .map_err(err("rmdir"))?;
                Ok(self.lstat_line(path))
            }
            Op::Rename { from, to, mode } => {
                let (d1, n1) = self.parent(from)?;
                let (d2, n2) = self.parent(to)?;
                nix::fcntl::renameat2(&d1, n1, &d2, n2, mode.flags()).map_err(err("rename"))?;
                Ok(format!(
                    "{} / {}",
                    self.lstat_line(from),
                    self.lstat_line(to)
                ))
            }
            Op::Chmod { path, mode } => {
                let fd = self.object(path)?;
                nix::sys::stat::fchmodat(
                    nix::fcntl::AT_FDCWD,
                    &magic(&fd),
                    Mode::from_bits_truncate(*mode),
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )
                .map_err(err("chmod"))?;
                Ok(self.lstat_line(path))
            }
            Op::Chown { path, uid, gid } => {
                let (dir, name) = self.parent(path)?;
                nix::unistd::fchownat(
                    &dir,
                    name,
                    uid.map(Uid::from_raw),
                    gid.map(Gid::from_raw),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(err("lchown"))?;
                Ok(self.lstat_line(path))
            }
            Op::Utimens { path, atime, mtime } => {
                let (dir, name) = self.parent(path)?;
                nix::sys::stat::utimensat(
                    &dir,
                    name,
                    &atime.spec(),
                    &mtime.spec(),
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(err("utimensat"))?;
                Ok(self.lstat_line(path))
            }
            Op::SetXattr {
                path,
                name,
                value,
                flag,
            } => {
                let (dir, n) = self.parent(path)?;
                lsetxattr(&in_dir(&dir, n), name, value, *flag)
                    .map_err(|e| format!("lsetxattr: {}", io_ename(&e)))?;
                Ok("ok".into())
            }
            Op::RemoveXattr { path, name } => {
                let (dir, n) = self.parent(path)?;
                super::xattr::remove(&in_dir(&dir, n), name)
                    .map_err(|e| format!("lremovexattr: {}", io_ename(&e)))?;
                Ok("ok".into())
            }
            Op::GetXattr { path, name } => {
                let (dir, n) = self.parent(path)?;
                let v = super::xattr::get(&in_dir(&dir, n), name)
                    .map_err(|e| format!("lgetxattr: {}", io_ename(&e)))?;
                Ok(snapshot::show_bytes(&v))
            }
            Op::ListXattr { path } => {
                let (dir, n) = self.parent(path)?;
                let mut v = super::xattr::list(&in_dir(&dir, n))
                    .map_err(|e| format!("llistxattr: {}", io_ename(&e)))?;
                v.sort();
                Ok(v.iter()
                    .map(|n| String::from_utf8_lossy(n).into_owned())
                    .collect::<Vec<_>>()
                    .join(","))
            }
            Op::Read {
                path,
                nofollow,
                offset,
                len,
            } => {
                let mut fl = OFlag::O_RDONLY;
                if *nofollow {
                    fl |= OFlag::O_NOFOLLOW;
                }
                let fd = self.open(path, fl, 0)?;
                Self::pread(&fd, *offset, *len)
            }
            Op::ReadDir { path } => {
                let fd = self.open(
                    path,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                    0,
                )?;
                let mut dir = nix::dir::Dir::from_fd(fd).map_err(err("fdopendir"))?;
                let mut names = Vec::new();
                for e in dir.iter() {
                    let e = e.map_err(err("readdir"))?;
                    let n = String::from_utf8_lossy(e.file_name().to_bytes()).into_owned();
                    if n == "." || n == ".." {
                        continue;
                    }
                    let t = e.file_type().map_or("?".to_string(), |t| format!("{t:?}"));
                    names.push(format!("{n}:{t}"));
                }
                names.sort();
                Ok(names.join(" "))
            }
            Op::Stat { path } => self.lstat(path).map(|st| stat_line(&st, self.since)),
            Op::Readlink { path } => {
                let (dir, name) = self.parent(path)?;
                let t = nix::fcntl::readlinkat(&dir, name).map_err(err("readlink"))?;
                Ok(format!("{:?}", t.to_string_lossy()))
            }
            Op::CopyFileRange {
                from,
                to,
                off_in,
                off_out,
                len,
            } => {
                let src = self.open(from, OFlag::O_RDONLY, 0)?;
                let dst = self.open(to, OFlag::O_WRONLY, 0)?;
                let (mut i, mut o) = (*off_in as i64, *off_out as i64);
                let n = nix::fcntl::copy_file_range(&src, Some(&mut i), &dst, Some(&mut o), *len)
                    .map_err(err("copy_file_range"))?;
                Ok(format!("copied {n}; {}", self.fstat_line(&dst)))
            }
            Op::Seek { path, hole, offset } => {
                let fd = self.open(path, OFlag::O_RDONLY, 0)?;
                // On a directory the offset is a readdir cookie: FUSE answers SEEK_DATA/HOLE
                // in the kernel (generic_file_llseek) without asking the filesystem, the
                // kernel's overlay with ext4's htree or its own merged-dir rules. Not overlay
                // semantics either way: files only.
                if nix::sys::stat::fstat(&fd).is_ok_and(|st| kind_of(st.st_mode) == "dir") {
                    return Ok("directory (not sought)".into());
                }
                let whence = if *hole {
                    Whence::SeekHole
                } else {
                    Whence::SeekData
                };
                let at = nix::unistd::lseek(&fd, *offset as i64, whence).map_err(err("lseek"))?;
                Ok(format!("at {at}"))
            }
            Op::Fsync { path, data_only } => {
                let fd = self.open(path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW, 0)?;
                if *data_only {
                    nix::unistd::fdatasync(&fd).map_err(err("fdatasync"))?;
                } else {
                    nix::unistd::fsync(&fd).map_err(err("fsync"))?;
                }
                Ok("ok".into())
            }
            Op::SlotOpen {
                slot,
                path,
                open,
                mode,
            } => {
                self.slots[*slot] = None;
                let fd = self.open(path, open.oflag(), *mode)?;
                let line = self.fstat_line(&fd);
                self.slots[*slot] = Some(fd);
                Ok(line)
            }
            Op::SlotWrite { slot, offset, data } => {
                let Some(fd) = self.slot(*slot) else {
                    return Ok("no file".into());
                };
                let n = match offset {
                    Some(o) => nix::sys::uio::pwrite(fd, data, *o as i64).map_err(err("pwrite"))?,
                    None => nix::unistd::write(fd, data).map_err(err("write"))?,
                };
                Ok(format!("wrote {n}; {}", self.fstat_line(fd)))
            }
            Op::SlotRead { slot, offset, len } => match self.slot(*slot) {
                None => Ok("no file".into()),
                Some(fd) => Self::pread(fd, *offset, *len),
            },
            Op::SlotTruncate { slot, len } => {
                let Some(fd) = self.slot(*slot) else {
                    return Ok("no file".into());
                };
                nix::unistd::ftruncate(fd, *len as i64).map_err(err("ftruncate"))?;
                Ok(self.fstat_line(fd))
            }
            Op::SlotStat { slot } => match self.slot(*slot) {
                None => Ok("no file".into()),
                Some(fd) => Ok(self.fstat_line(fd)),
            },
            Op::SlotFsync { slot } => {
                let Some(fd) = self.slot(*slot) else {
                    return Ok("no file".into());
                };
                nix::unistd::fsync(fd).map_err(err("fsync"))?;
                Ok("ok".into())
            }
            Op::SlotClose { slot } => Ok(match self.slots[*slot].take() {
                Some(_) => "closed".into(),
                None => "no file".into(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots of written trees

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

/// In an upper directory, whiteouts are character devices 0/0. The kernel links all of its
/// whiteouts to one inode kept in the workdir; another writer may make one per name. Both are
/// the kernel's format, so a whiteout's inode number and link count are not compared (its type,
/// device number, mode and owner are).
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

// ---------------------------------------------------------------------------------------------
// The differential runner

/// The kernel options that match what we implement: no redirects, no index, no metacopy
/// (given explicitly: distributions change the module defaults).
pub const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];

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
pub fn stack_spec(seed: u64, case: &DiffCase) -> StackSpec {
    let params = GenParams {
        ops_per_layer: 30,
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
        StackCopy {
            lowers,
            upper,
            work,
        }
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

/// Snapshot a merged tree: private-xattr probes, inode numbers named through `map`, times
/// masked from `since`.
pub fn merged_snapshot(root: &Path, map: &InoMap, since: Option<Since>) -> Snapshot {
    let mut s = Snapshot::take(root, &SnapshotOpts::private_probes("trusted.overlay."));
    s.relabel(map);
    if let Some(since) = since {
        mask_times(&mut s, since);
    }
    s
}

/// Kernel vs ours on two merged trees, plus ours' own d_ino/d_type consistency.
pub fn compare_merged(k: &Snapshot, o: &Snapshot, opts: &CompareOpts) -> Vec<String> {
    let mut d = snapshot::compare("kernel", k, "ours", o, opts);
    d.extend(o.self_check("ours"));
    d
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

/// Drive the kernel's overlayfs and ours over two copies of `spec` with `ops`, in lockstep.
/// Returns the first difference found (an operation's result, then the merged trees at each
/// checkpoint and at the end, the lowers, the daemon's exit, the two upper directories).
pub fn run_differential(spec: &StackSpec, ops: &[Op], checkpoint_every: usize) -> Option<Failure> {
    let scratch = Scratch::new();
    let kc = StackCopy::build(spec, &scratch, "k");
    let oc = StackCopy::build(spec, &scratch, "o");
    let kmount = mount_kernel(&kc.lower_refs(), Some(kc.upper_work()), KERNEL_OPTS);
    let omount = mount_ours(&oc.lower_refs(), Some(oc.upper_work()), &[]);
    let since = Since::now();
    let mut kx = Executor::new(kmount.path(), since);
    let mut ox = Executor::new(omount.path(), since);
    let tree_opts = CompareOpts::new();
    let checkpoint = |step: usize| -> Option<Failure> {
        let ks = merged_snapshot(kmount.path(), &kc.ino_map(), Some(since));
        let os = merged_snapshot(omount.path(), &oc.ino_map(), Some(since));
        let diffs = compare_merged(&ks, &os, &tree_opts);
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
    let mut lines = Vec::new();
    let ended = omount.unmount();
    if ended.daemon != super::DaemonExit::Exited(0) || !ended.command_ok || ended.left_mounted {
        lines.push(format!(
            "unmounting ours: daemon {:?}, umount ok={} ({}), left mounted={}; stderr: {}",
            ended.daemon,
            ended.command_ok,
            ended.command_stderr.trim(),
            ended.left_mounted,
            ended.stderr.trim()
        ));
    }
    if !kmount.unmount() {
        lines.push("unmounting the kernel's overlay failed".into());
    }
    if !lines.is_empty() {
        return Some(Failure {
            signature: "unmount".into(),
            step: ops.len(),
            lines,
        });
    }
    for (i, (kl, ol)) in kc.lowers.iter().zip(&oc.lowers).enumerate() {
        let mut ks = Snapshot::take(kl, &SnapshotOpts::default());
        let mut os = Snapshot::take(ol, &SnapshotOpts::default());
        ks.relabel(&InoMap::for_stack(&[kl], None));
        os.relabel(&InoMap::for_stack(&[ol], None));
        let diffs = snapshot::compare(
            "kernel's",
            &ks,
            "ours",
            &os,
            &CompareOpts::new().skip("ctime"),
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
    if diffs.is_empty() {
        return None;
    }
    Some(Failure {
        signature: format!("upper:{}", field_of(&diffs[0])),
        step: ops.len(),
        lines: diffs
            .iter()
            .map(|d| format!("upper dir after unmount: {d}"))
            .collect(),
    })
}

/// The kernel's upper directory vs ours, after unmounting: the same entries, types, whiteouts,
/// opaque markers, modes, owners, contents, sizes, symlink targets, xattrs (the overlay's
/// included, normalized by `normalize_upper`), link structure, old mtimes.
pub fn compare_uppers(kernel_upper: &Path, our_upper: &Path, since: Since) -> Vec<String> {
    let snap = |root: &Path| {
        let mut s = Snapshot::take(root, &SnapshotOpts::default());
        s.relabel(&InoMap::for_stack(&[], Some(root)));
        mask_times(&mut s, since);
        normalize_upper(&mut s);
        s
    };
    let ks = snap(kernel_upper);
    let os = snap(our_upper);
    let mut opts = CompareOpts::new();
    let mut whiteouts: BTreeSet<String> = whiteout_paths(&ks).into_iter().collect();
    whiteouts.extend(whiteout_paths(&os));
    for w in &whiteouts {
        opts = opts
            .skip_at(w, "ino")
            .skip_at(w, "nlink")
            .skip_at(w, "d_ino");
    }
    snapshot::compare("kernel", &ks, "ours", &os, &opts)
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
