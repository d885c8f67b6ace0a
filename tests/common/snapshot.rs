//! A snapshot of a mounted tree, taken without following symlinks, and a field-by-field
//! comparison of two snapshots that returns readable differences (`path: field: a=.. vs b=..`).
//!
//! Recorded per path: type, permission bits (with setuid/setgid/sticky), uid, gid, size, blocks,
//! nlink, st_ino, rdev, whether st_dev is the mount root's, mtime, ctime, a hash of the content of
//! regular files, the symlink target, the sorted xattrs with their values, the result of reading
//! some named xattrs (probes: the overlay's private ones must not be readable), and for
//! directories the sorted listing with each entry's d_ino and d_type.
//!
//! Inode numbers can be compared raw, or through an `InoMap` that names each underlying object
//! (`L2:/a/b`, `U:/c`): two mounts over copies of the same upper layer then agree on which
//! object each st_ino belongs to.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::prng::fnv1a;
use super::xattr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
    Unknown,
}

impl Kind {
    pub fn of(ft: std::fs::FileType) -> Kind {
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::CharDev
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else if ft.is_socket() {
            Kind::Socket
        } else {
            Kind::Unknown
        }
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn errname(code: i32) -> String {
    format!("{} ({code})", nix::errno::Errno::from_raw(code))
}

#[derive(Clone, Debug)]
pub struct Stat {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub nlink: u64,
    pub ino: u64,
    /// `ino` as named by an `InoMap` (the raw number until `relabel`).
    pub ino_label: String,
    pub rdev: u64,
    /// st_dev equals the snapshot root's st_dev.
    pub same_dev: bool,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

#[derive(Clone, Debug)]
pub struct DirItem {
    pub name: String,
    pub d_ino: u64,
    pub d_ino_label: String,
    pub d_type: Result<Kind, i32>,
}

pub type XattrValue = Result<Vec<u8>, i32>;

#[derive(Clone, Debug)]
pub struct Entry {
    pub stat: Result<Stat, i32>,
    /// FNV-1a of the whole content, for regular files.
    pub content: Option<Result<u64, i32>>,
    pub target: Option<Result<String, i32>>,
    /// Sorted by name.
    pub xattrs: Result<Vec<(String, XattrValue)>, i32>,
    /// The result of reading each probe xattr by name.
    pub probes: Vec<(String, XattrValue)>,
    /// Sorted by name; directories only.
    pub listing: Option<Result<Vec<DirItem>, i32>>,
}

#[derive(Clone, Debug, Default)]
pub struct SnapshotOpts {
    /// xattr names to try reading on every path (their results are compared too).
    pub probes: Vec<String>,
    /// Skip hashing file contents.
    pub no_content: bool,
}

impl SnapshotOpts {
    /// Probes for the overlay's private xattrs in `prefix` (`trusted.overlay.` or
    /// `user.overlay.`).
    pub fn private_probes(prefix: &str) -> SnapshotOpts {
        let names = [
            "opaque",
            "whiteout",
            "whiteouts",
            "origin",
            "impure",
            "redirect",
            "metacopy",
            "nlink",
            "upper",
            "uuid",
            "protattr",
        ];
        SnapshotOpts {
            probes: names.iter().map(|n| format!("{prefix}{n}")).collect(),
            no_content: false,
        }
    }
}

/// Paths are `/` for the root and `/a/b` below it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub root: PathBuf,
    pub entries: BTreeMap<String, Entry>,
}

fn join_rel(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

fn abs(root: &Path, rel: &str) -> PathBuf {
    if rel == "/" {
        root.to_path_buf()
    } else {
        root.join(unescape_name(&rel[1..]))
    }
}

/// A file name as a key: UTF-8 kept, a backslash doubled, any other byte `\xNN`. Reversible, so
/// names that are not UTF-8 survive the round trip.
pub fn escape_name(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in name.as_bytes().utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// The inverse of `escape_name` (for a whole relative path).
pub fn unescape_name(key: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = key.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'\\' {
            out.push(b'\\');
            i += 2;
        } else if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap_or("");
            match u8::from_str_radix(hex, 16) {
                Ok(v) => {
                    out.push(v);
                    i += 4;
                }
                Err(_) => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
}

fn hash_file(path: &Path) -> Result<u64, i32> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| errno(&e))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| errno(&e))?;
    Ok(fnv1a(&buf))
}

fn read_xattrs(path: &Path) -> Result<Vec<(String, XattrValue)>, i32> {
    let mut names = xattr::list(path).map_err(|e| errno(&e))?;
    names.sort();
    Ok(names
        .into_iter()
        .map(|n| {
            let v = xattr::get_bytes(path, &n).map_err(|e| errno(&e));
            (String::from_utf8_lossy(&n).into_owned(), v)
        })
        .collect())
}

impl Snapshot {
    /// Walk `root` (a mounted tree or a plain directory) without following symlinks.
    pub fn take(root: &Path, opts: &SnapshotOpts) -> Snapshot {
        let root_dev = std::fs::symlink_metadata(root)
            .unwrap_or_else(|e| panic!("lstat {}: {e}", root.display()))
            .dev();
        let mut snap = Snapshot {
            root: root.to_path_buf(),
            entries: BTreeMap::new(),
        };
        let mut stack = vec!["/".to_string()];
        while let Some(rel) = stack.pop() {
            let entry = Self::visit(root, &rel, root_dev, opts);
            if let Some(Ok(items)) = &entry.listing {
                for it in items.iter().rev() {
                    stack.push(join_rel(&rel, &it.name));
                }
            }
            snap.entries.insert(rel, entry);
        }
        snap
    }

    fn visit(root: &Path, rel: &str, root_dev: u64, opts: &SnapshotOpts) -> Entry {
        let path = abs(root, rel);
        let md = std::fs::symlink_metadata(&path).map_err(|e| errno(&e));
        let stat = md.as_ref().map_err(|e| *e).map(|m| Stat {
            kind: Kind::of(m.file_type()),
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: m.size(),
            blocks: m.blocks(),
            nlink: m.nlink(),
            ino: m.ino(),
            ino_label: m.ino().to_string(),
            rdev: m.rdev(),
            same_dev: m.dev() == root_dev,
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        });
        let kind = stat.as_ref().map(|s| s.kind).ok();
        let content = (kind == Some(Kind::File) && !opts.no_content).then(|| hash_file(&path));
        let target = (kind == Some(Kind::Symlink)).then(|| {
            std::fs::read_link(&path)
                .map(|t| t.to_string_lossy().into_owned())
                .map_err(|e| errno(&e))
        });
        let xattrs = read_xattrs(&path);
        let probes = opts
            .probes
            .iter()
            .map(|n| (n.clone(), xattr::get(&path, n).map_err(|e| errno(&e))))
            .collect();
        let listing = (kind == Some(Kind::Dir)).then(|| Self::list(&path));
        Entry {
            stat,
            content,
            target,
            xattrs,
            probes,
            listing,
        }
    }

    fn list(path: &Path) -> Result<Vec<DirItem>, i32> {
        let mut items = Vec::new();
        for de in std::fs::read_dir(path).map_err(|e| errno(&e))? {
            let de = de.map_err(|e| errno(&e))?;
            items.push(DirItem {
                name: escape_name(&de.file_name()),
                d_ino: de.ino(),
                d_ino_label: de.ino().to_string(),
                d_type: de.file_type().map(Kind::of).map_err(|e| errno(&e)),
            });
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(items)
    }

    /// Name every st_ino and d_ino through `map`.
    pub fn relabel(&mut self, map: &InoMap) {
        for e in self.entries.values_mut() {
            if let Ok(s) = e.stat.as_mut() {
                s.ino_label = map.label(s.ino);
            }
            if let Some(Ok(items)) = e.listing.as_mut() {
                for it in items {
                    it.d_ino_label = map.label(it.d_ino);
                }
            }
        }
    }

    /// Internal consistency: each listed entry's d_ino equals its st_ino and its d_type its
    /// type, and every listed name can be looked up.
    pub fn self_check(&self, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (path, e) in &self.entries {
            let Some(Ok(items)) = &e.listing else {
                continue;
            };
            for it in items {
                let child = join_rel(path, &it.name);
                match self.entries.get(&child).map(|c| &c.stat) {
                    Some(Ok(st)) => {
                        if st.ino != it.d_ino {
                            out.push(format!(
                                "{child}: d_ino {} != st_ino {} ({name})",
                                it.d_ino, st.ino
                            ));
                        }
                        if it.d_type != Ok(st.kind) {
                            out.push(format!(
                                "{child}: d_type {:?} != type {:?} ({name})",
                                it.d_type, st.kind
                            ));
                        }
                    }
                    Some(Err(e)) => out.push(format!(
                        "{child}: listed but lstat fails: {} ({name})",
                        errname(*e)
                    )),
                    None => {}
                }
            }
        }
        out
    }

    /// Every listed xattr name, on any path, starting with `prefix`.
    pub fn xattrs_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (path, e) in &self.entries {
            if let Ok(xs) = &e.xattrs {
                for (n, _) in xs {
                    if n.starts_with(prefix) {
                        out.push(format!("{path}: {n}"));
                    }
                }
            }
        }
        out
    }

    /// Every probe that read successfully.
    pub fn readable_probes(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (path, e) in &self.entries {
            for (n, v) in &e.probes {
                if let Ok(v) = v {
                    out.push(format!("{path}: {n} = {}", show_bytes(v)));
                }
            }
        }
        out
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }
}

/// Which underlying object each inode number belongs to.
#[derive(Clone, Debug, Default)]
pub struct InoMap {
    names: HashMap<u64, String>,
}

impl InoMap {
    pub fn new() -> InoMap {
        InoMap::default()
    }

    /// Name every object under `root` `label:/path` (first name in sorted order for hard links).
    pub fn add_tree(&mut self, label: &str, root: &Path) {
        let mut stack = vec![(root.to_path_buf(), "/".to_string())];
        while let Some((p, rel)) = stack.pop() {
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            self.names
                .entry(md.ino())
                .or_insert_with(|| format!("{label}:{rel}"));
            if md.is_dir() {
                let Ok(rd) = std::fs::read_dir(&p) else {
                    continue;
                };
                let mut names: Vec<_> = rd.flatten().map(|d| d.file_name()).collect();
                names.sort();
                for n in names.into_iter().rev() {
                    let r = join_rel(&rel, &escape_name(&n));
                    stack.push((p.join(&n), r));
                }
            }
        }
    }

    /// Label `L0`, `L1`, ... each lower (topmost first) and `U` the upper.
    pub fn for_stack(lowers: &[&Path], upper: Option<&Path>) -> InoMap {
        let mut m = InoMap::new();
        if let Some(u) = upper {
            m.add_tree("U", u);
        }
        for (i, l) in lowers.iter().enumerate() {
            m.add_tree(&format!("L{i}"), l);
        }
        m
    }

    pub fn label(&self, ino: u64) -> String {
        self.names
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| format!("ino {ino} (in no layer)"))
    }
}

/// Which fields to leave out of a comparison, everywhere or at given paths.
#[derive(Clone, Debug, Default)]
pub struct CompareOpts {
    skip: BTreeSet<&'static str>,
    skip_at: BTreeSet<(String, &'static str)>,
}

/// Field names, for `CompareOpts::skip`.
pub const FIELDS: &[&str] = &[
    "lstat", "type", "mode", "uid", "gid", "size", "dir_size", "blocks", "nlink", "ino", "rdev",
    "dev", "mtime", "ctime", "content", "target", "xattrs", "probes", "listing", "d_ino", "d_type",
];

impl CompareOpts {
    pub fn new() -> CompareOpts {
        CompareOpts::default()
    }

    pub fn skip(mut self, field: &'static str) -> Self {
        assert!(FIELDS.contains(&field), "unknown field {field}");
        self.skip.insert(field);
        self
    }

    pub fn skip_at(mut self, path: &str, field: &'static str) -> Self {
        assert!(FIELDS.contains(&field), "unknown field {field}");
        self.skip_at.insert((path.to_string(), field));
        self
    }

    pub fn skips(&self, path: &str, field: &'static str) -> bool {
        // The mount root's inode number is FUSE's root node id (1) for ours, a documented
        // difference (README): the kernel keeps it as the root inode's number.
        (path == "/" && field == "ino")
            || self.skip.contains(field)
            || self.skip_at.contains(&(path.to_string(), field))
    }
}

pub fn show_bytes(v: &[u8]) -> String {
    if v.iter().all(|b| (0x20..0x7f).contains(b)) {
        format!("{:?}", String::from_utf8_lossy(v))
    } else {
        let mut s = String::from("0x");
        for b in v {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

fn show_xv(v: &XattrValue) -> String {
    match v {
        Ok(b) => show_bytes(b),
        Err(e) => format!("error {}", errname(*e)),
    }
}

fn show_err<T: std::fmt::Debug>(v: &Result<T, i32>) -> String {
    match v {
        Ok(t) => format!("{t:?}"),
        Err(e) => format!("error {}", errname(*e)),
    }
}

struct Differ<'a> {
    opts: &'a CompareOpts,
    ln: &'a str,
    rn: &'a str,
    out: Vec<String>,
}

impl Differ<'_> {
    fn field<T: PartialEq + std::fmt::Debug>(
        &mut self,
        path: &str,
        field: &'static str,
        l: T,
        r: T,
    ) {
        if l != r && !self.opts.skips(path, field) {
            self.out.push(format!(
                "{path}: {field}: {}={l:?} vs {}={r:?}",
                self.ln, self.rn
            ));
        }
    }

    fn text(&mut self, path: &str, field: &'static str, l: String, r: String) {
        if l != r && !self.opts.skips(path, field) {
            self.out.push(format!(
                "{path}: {field}: {}={l} vs {}={r}",
                self.ln, self.rn
            ));
        }
    }

    fn stat(&mut self, path: &str, l: &Stat, r: &Stat) {
        self.field(path, "type", l.kind, r.kind);
        self.text(
            path,
            "mode",
            format!("{:04o}", l.mode),
            format!("{:04o}", r.mode),
        );
        self.field(path, "uid", l.uid, r.uid);
        self.field(path, "gid", l.gid, r.gid);
        if l.kind == Kind::Dir && r.kind == Kind::Dir {
            self.field(path, "dir_size", l.size, r.size);
        } else {
            self.field(path, "size", l.size, r.size);
        }
        self.field(path, "blocks", l.blocks, r.blocks);
        self.field(path, "nlink", l.nlink, r.nlink);
        self.text(path, "ino", l.ino_label.clone(), r.ino_label.clone());
        self.field(path, "rdev", l.rdev, r.rdev);
        self.text(
            path,
            "dev",
            format!("same_as_root={}", l.same_dev),
            format!("same_as_root={}", r.same_dev),
        );
        self.field(path, "mtime", l.mtime, r.mtime);
        self.field(path, "ctime", l.ctime, r.ctime);
    }

    fn xattrs(
        &mut self,
        path: &str,
        l: &Result<Vec<(String, XattrValue)>, i32>,
        r: &Result<Vec<(String, XattrValue)>, i32>,
    ) {
        if self.opts.skips(path, "xattrs") {
            return;
        }
        match (l, r) {
            (Ok(l), Ok(r)) => {
                let lm: BTreeMap<_, _> = l.iter().map(|(n, v)| (n, v)).collect();
                let rm: BTreeMap<_, _> = r.iter().map(|(n, v)| (n, v)).collect();
                let names: BTreeSet<_> = lm.keys().chain(rm.keys()).collect();
                for n in names {
                    let lv = lm.get(n).map_or("absent".into(), |v| show_xv(v));
                    let rv = rm.get(n).map_or("absent".into(), |v| show_xv(v));
                    if lv != rv {
                        self.out.push(format!(
                            "{path}: xattrs: {n}: {}={lv} vs {}={rv}",
                            self.ln, self.rn
                        ));
                    }
                }
            }
            _ => self.text(path, "xattrs", show_err(l), show_err(r)),
        }
    }

    fn probes(&mut self, path: &str, l: &[(String, XattrValue)], r: &[(String, XattrValue)]) {
        if self.opts.skips(path, "probes") {
            return;
        }
        for ((n, lv), (_, rv)) in l.iter().zip(r) {
            if lv != rv {
                self.out.push(format!(
                    "{path}: probes: getxattr {n}: {}={} vs {}={}",
                    self.ln,
                    show_xv(lv),
                    self.rn,
                    show_xv(rv)
                ));
            }
        }
    }

    fn listing(
        &mut self,
        path: &str,
        l: &Option<Result<Vec<DirItem>, i32>>,
        r: &Option<Result<Vec<DirItem>, i32>>,
    ) {
        match (l, r) {
            (Some(Ok(l)), Some(Ok(r))) => {
                let lm: BTreeMap<_, _> = l.iter().map(|i| (&i.name, i)).collect();
                let rm: BTreeMap<_, _> = r.iter().map(|i| (&i.name, i)).collect();
                let ln: Vec<_> = lm.keys().filter(|n| !rm.contains_key(*n)).collect();
                let rn: Vec<_> = rm.keys().filter(|n| !lm.contains_key(*n)).collect();
                if (!ln.is_empty() || !rn.is_empty()) && !self.opts.skips(path, "listing") {
                    self.out.push(format!(
                        "{path}: listing: only in {}: {ln:?}; only in {}: {rn:?}",
                        self.ln, self.rn
                    ));
                }
                for (n, li) in &lm {
                    let Some(ri) = rm.get(n) else { continue };
                    let child = join_rel(path, n);
                    if li.d_ino_label != ri.d_ino_label && !self.opts.skips(&child, "d_ino") {
                        self.out.push(format!(
                            "{child}: d_ino: {}={} vs {}={}",
                            self.ln, li.d_ino_label, self.rn, ri.d_ino_label
                        ));
                    }
                    if li.d_type != ri.d_type && !self.opts.skips(&child, "d_type") {
                        self.out.push(format!(
                            "{child}: d_type: {}={} vs {}={}",
                            self.ln,
                            show_err(&li.d_type),
                            self.rn,
                            show_err(&ri.d_type)
                        ));
                    }
                }
            }
            (None, None) => {}
            _ => {
                let f = |x: &Option<Result<Vec<DirItem>, i32>>| match x {
                    None => "not a directory".to_string(),
                    Some(Ok(v)) => format!("{} entries", v.len()),
                    Some(Err(e)) => format!("error {}", errname(*e)),
                };
                self.text(path, "listing", f(l), f(r));
            }
        }
    }
}

/// Every difference between `left` and `right`, one readable line each.
pub fn compare(
    left_name: &str,
    left: &Snapshot,
    right_name: &str,
    right: &Snapshot,
    opts: &CompareOpts,
) -> Vec<String> {
    let mut d = Differ {
        opts,
        ln: left_name,
        rn: right_name,
        out: Vec::new(),
    };
    let paths: BTreeSet<&String> = left.entries.keys().chain(right.entries.keys()).collect();
    for path in paths {
        let (l, r) = match (left.entries.get(path), right.entries.get(path)) {
            (Some(l), Some(r)) => (l, r),
            (Some(_), None) => {
                d.out.push(format!("{path}: only in {left_name}"));
                continue;
            }
            (None, Some(_)) => {
                d.out.push(format!("{path}: only in {right_name}"));
                continue;
            }
            (None, None) => unreachable!(),
        };
        match (&l.stat, &r.stat) {
            (Ok(ls), Ok(rs)) => d.stat(path, ls, rs),
            _ => d.text(path, "lstat", show_err(&l.stat), show_err(&r.stat)),
        }
        if !opts.skips(path, "content") {
            d.text(
                path,
                "content",
                l.content.as_ref().map_or("-".into(), |c| match c {
                    Ok(h) => format!("hash {h:016x}"),
                    Err(e) => format!("read error {}", errname(*e)),
                }),
                r.content.as_ref().map_or("-".into(), |c| match c {
                    Ok(h) => format!("hash {h:016x}"),
                    Err(e) => format!("read error {}", errname(*e)),
                }),
            );
        }
        d.field(path, "target", &l.target, &r.target);
        d.xattrs(path, &l.xattrs, &r.xattrs);
        d.probes(path, &l.probes, &r.probes);
        d.listing(path, &l.listing, &r.listing);
    }
    d.out
}

/// Panic with every difference (capped) and `context` (e.g. the seed) if there are any.
pub fn assert_no_diffs(context: &str, diffs: &[String]) {
    if diffs.is_empty() {
        return;
    }
    let cap = 150;
    let mut msg = format!("{} difference(s) — {context}\n", diffs.len());
    for d in diffs.iter().take(cap) {
        msg.push_str("  ");
        msg.push_str(d);
        msg.push('\n');
    }
    if diffs.len() > cap {
        let _ = writeln!(msg, "  ... and {} more", diffs.len() - cap);
    }
    panic!("{msg}");
}

/// lstat each of `rels` (`/a/b`) under `root`: `file`, `dir`, ... or the errno. Catches names
/// that readdir hides but lookup still finds (and the reverse).
pub fn lookups(root: &Path, rels: &[String]) -> BTreeMap<String, String> {
    rels.iter()
        .map(|rel| {
            let r = match std::fs::symlink_metadata(abs(root, rel)) {
                Ok(m) => format!("{:?}", Kind::of(m.file_type())),
                Err(e) => format!("error {}", errname(errno(&e))),
            };
            (rel.clone(), r)
        })
        .collect()
}

pub fn compare_lookups(
    left_name: &str,
    left: &BTreeMap<String, String>,
    right_name: &str,
    right: &BTreeMap<String, String>,
) -> Vec<String> {
    left.iter()
        .filter_map(|(p, l)| {
            let r = right.get(p)?;
            (l != r).then(|| format!("{p}: lookup: {left_name}={l} vs {right_name}={r}"))
        })
        .collect()
}

/// lstat each path of `like` under `root` before anything lists a directory (so each inode is
/// first met through lookup, not readdir), and compare the st_ino labels with `like`'s.
pub fn cold_lookup_inos(
    like_name: &str,
    like: &Snapshot,
    name: &str,
    root: &Path,
    map: &InoMap,
) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, e) in &like.entries {
        let Ok(st) = &e.stat else { continue };
        let label = match std::fs::symlink_metadata(abs(root, rel)) {
            Ok(m) => map.label(m.ino()),
            Err(e) => format!("error {}", errname(errno(&e))),
        };
        if label != st.ino_label {
            out.push(format!(
                "{rel}: st_ino on first lookup (before any readdir): {like_name}={} vs {name}={label}",
                st.ino_label
            ));
        }
    }
    out
}
