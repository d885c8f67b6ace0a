//! Random sequences of filesystem operations for the write-path differential tests: a seeded
//! generator (`generate_ops`) that aims every kind of operation at the names a generated layer
//! stack holds (lower files and directories, merged and opaque directories, whited-out names,
//! symlinks, hard links, fifos, devices, upper files) plus fresh names, an executor that applies
//! one operation to a mounted tree and describes its result (`Executor::apply`), and a runner
//! that drives the kernel's overlayfs and ours in lockstep over two identical copies of one
//! stack and lists every difference (`run_differential`).
//!
//! This file: the operations. `generate`: the pool of target names and the generator. `exec`:
//! the executor. `trees`: snapshots of written trees and their comparison. `runner`: mounts,
//! the lockstep runner, seeds, shrinking.
//!
//! Safety of the host: generated layers hold absolute symlinks (`/etc/passwd`, `/`) and
//! relative ones that climb out of the mount, so no operation may follow a symlink out of the
//! tree. Every name is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` below an
//! fd of the mount root (escaping symlinks fail with EXDEV on both sides), and the last
//! component is never followed (`*at` calls with `AT_SYMLINK_NOFOLLOW`, or `/proc/self/fd/N`
//! of an `O_PATH | O_NOFOLLOW` fd, which the kernel does not follow further) — except by opens,
//! which follow it only within the tree.
#![allow(unsafe_code)]

mod exec;
mod generate;
mod runner;
mod trees;

pub use exec::*;
pub use generate::*;
pub use runner::*;
pub use trees::*;

use std::collections::{BTreeMap, BTreeSet};
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
use super::{DaemonExit, DaemonMount, KernelMount, Layer, OurMount, Xflavor, our_bin, xattr};

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

/// An errno by its name (`ENOENT`).
fn ename(e: Errno) -> String {
    format!("{e:?}")
}
