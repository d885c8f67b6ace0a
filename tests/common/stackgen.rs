//! Seeded random layer stacks. `generate` draws a logical stack (which objects each layer
//! holds, which names it whites out, which directories it makes opaque); `materialize` writes one
//! layer to disk in a chosen on-disk format, deterministically, so the same spec can be written
//! twice (one upper per mount) or in two formats (OCI for us, the kernel's for the kernel).
//!
//! Names come from a small pool so layers collide: files over directories, directories over
//! files, whiteouts of things that exist below, opaque directories over merged ones.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::layers::{Layer, Xflavor};
use super::prng::{Rng, fnv1a};
use super::scratch::Scratch;

#[derive(Clone, Debug)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
}

pub type Xattrs = Vec<(String, Vec<u8>)>;

#[derive(Clone, Debug)]
pub enum Node {
    Dir {
        meta: Meta,
        opaque: bool,
        xattrs: Xattrs,
    },
    File {
        meta: Meta,
        content: Vec<u8>,
        xattrs: Xattrs,
    },
    Symlink {
        target: String,
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
        xattrs: Xattrs,
    },
    /// Another name for the `File` at `to` in the same layer.
    Hardlink {
        to: String,
    },
    Fifo {
        meta: Meta,
        xattrs: Xattrs,
    },
    CharDev {
        meta: Meta,
        major: u64,
        minor: u64,
    },
    /// `xattr_ok`: the kernel hides an xattr whiteout here in readdir too (set by `generate`:
    /// a lower layer that is not the last one merged into the parent directory).
    Whiteout {
        xattr_ok: bool,
    },
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self, Node::Dir { .. })
    }
}

/// One layer: paths relative to its root (`a/b`), parents always present as `Dir` nodes.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub root: Meta,
    pub nodes: BTreeMap<String, Node>,
}

/// A stack: `lowers[0]` is the topmost lower (first in `lowerdir=`).
#[derive(Clone, Debug)]
pub struct StackSpec {
    pub seed: u64,
    pub lowers: Vec<LayerSpec>,
    pub upper: Option<LayerSpec>,
}

#[derive(Clone, Debug)]
pub struct GenParams {
    pub names: &'static [&'static str],
    pub max_depth: usize,
    pub ops_per_layer: usize,
    /// Largest file content in bytes.
    pub max_file: usize,
    /// Whether lower layers may hold multiply-linked files (`Node::Hardlink`). An upper layer
    /// may hold them either way. The write-path tests turn this off: after a copy-up the kernel
    /// (`index=off`) breaks a lower file's hard links and we keep them together, a documented
    /// difference tested on its own.
    pub lower_hard_links: bool,
}

impl GenParams {
    pub fn small() -> GenParams {
        GenParams {
            names: &["a", "b", "c", "d", "e", "f"],
            max_depth: 3,
            ops_per_layer: 60,
            max_file: 140_000,
            lower_hard_links: true,
        }
    }

    /// For deep stacks: few objects per layer, small files.
    pub fn tiny() -> GenParams {
        GenParams {
            names: &["a", "b", "c", "d"],
            max_depth: 3,
            ops_per_layer: 5,
            max_file: 5000,
            lower_hard_links: true,
        }
    }
}

const FILE_MODES: &[u32] = &[
    0o644, 0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6711, 0o444, 0o000, 0o1644, 0o640,
];
const DIR_MODES: &[u32] = &[0o755, 0o755, 0o700, 0o1777, 0o2775, 0o555, 0o711];
const UIDS: &[u32] = &[0, 0, 1, 1000, 4242, 65534];
const GIDS: &[u32] = &[0, 0, 5, 1000, 4242, 65534];

fn meta(rng: &mut Rng, modes: &[u32]) -> Meta {
    Meta {
        mode: *rng.pick(modes),
        uid: *rng.pick(UIDS),
        gid: *rng.pick(GIDS),
        mtime: (
            rng.range(1_000_000_000, 1_700_000_000) as i64,
            rng.below(1_000_000_000) as i64,
        ),
    }
}

fn xattrs(rng: &mut Rng, special_file: bool) -> Xattrs {
    let mut out = Vec::new();
    if !rng.chance(35) {
        return out;
    }
    // user.* xattrs are only allowed on regular files and directories.
    let names: &[&str] = if special_file {
        &["trusted.t1", "trusted.t2"]
    } else {
        &["user.u1", "user.u2", "trusted.t1"]
    };
    for n in names {
        if rng.chance(50) {
            let len = rng.below(24) as usize;
            let v = if rng.chance(50) {
                rng.bytes(len)
            } else {
                (0..len).map(|i| b'a' + (i % 26) as u8).collect()
            };
            out.push((n.to_string(), v));
        }
    }
    out
}

fn content(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = match rng.below(100) {
        0..=19 => 0,
        20..=59 => rng.range(1, 64) as usize,
        60..=84 => rng.range(64, 4097) as usize,
        85..=97 => rng.range(4097, 40_000) as usize,
        _ => rng.range(100_000, 140_000) as usize,
    };
    rng.bytes(len.min(max))
}

const SYMLINK_TARGETS: &[&str] = &[
    "a",
    "b/c",
    "../a",
    "../../d/e",
    "nowhere/at/all",
    "/etc/passwd",
    "/nonexistent/dangling",
    ".",
    "/",
];

fn random_path(rng: &mut Rng, p: &GenParams) -> String {
    let depth = rng.range(1, p.max_depth as u64 + 1) as usize;
    (0..depth)
        .map(|_| *rng.pick(p.names))
        .collect::<Vec<_>>()
        .join("/")
}

fn ancestors(path: &str) -> Vec<String> {
    let parts: Vec<&str> = path.split('/').collect();
    (1..parts.len()).map(|i| parts[..i].join("/")).collect()
}

fn can_place(nodes: &BTreeMap<String, Node>, path: &str) -> bool {
    !nodes.contains_key(path)
        && ancestors(path)
            .iter()
            .all(|a| nodes.get(a).is_none_or(Node::is_dir))
}

/// One layer's objects; `hard_links`: whether it may hold `Node::Hardlink`s.
fn gen_layer(rng: &mut Rng, p: &GenParams, below: &[String], hard_links: bool) -> LayerSpec {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for _ in 0..p.ops_per_layer {
        let op = rng.below(100);
        let reuse = if op >= 78 { 80 } else { 40 };
        let path = if !below.is_empty() && rng.chance(reuse) {
            rng.pick(below).clone()
        } else {
            random_path(rng, p)
        };
        if !can_place(&nodes, &path) {
            continue;
        }
        let node = match op {
            0..=17 => Node::Dir {
                meta: meta(rng, DIR_MODES),
                opaque: false,
                xattrs: xattrs(rng, false),
            },
            18..=24 => Node::Dir {
                meta: meta(rng, DIR_MODES),
                opaque: true,
                xattrs: xattrs(rng, false),
            },
            25..=52 => Node::File {
                meta: meta(rng, FILE_MODES),
                content: content(rng, p.max_file),
                xattrs: xattrs(rng, false),
            },
            53..=62 => Node::Symlink {
                target: if rng.chance(10) {
                    "x".repeat(rng.range(100, 300) as usize)
                } else {
                    rng.pick(SYMLINK_TARGETS).to_string()
                },
                uid: *rng.pick(UIDS),
                gid: *rng.pick(GIDS),
                mtime: meta(rng, FILE_MODES).mtime,
                xattrs: xattrs(rng, true),
            },
            63..=70 => {
                if !hard_links {
                    continue;
                }
                let files: Vec<&String> = nodes
                    .iter()
                    .filter(|(_, n)| matches!(n, Node::File { .. }))
                    .map(|(k, _)| k)
                    .collect();
                if files.is_empty() {
                    continue;
                }
                Node::Hardlink {
                    to: (*rng.pick(&files)).clone(),
                }
            }
            71..=74 => Node::Fifo {
                meta: meta(rng, FILE_MODES),
                xattrs: xattrs(rng, true),
            },
            75..=77 => Node::CharDev {
                meta: meta(rng, FILE_MODES),
                major: 1,
                minor: *rng.pick(&[3u64, 5, 7]),
            },
            _ => Node::Whiteout { xattr_ok: false },
        };
        for a in ancestors(&path) {
            nodes.entry(a).or_insert_with(|| Node::Dir {
                meta: meta(rng, DIR_MODES),
                opaque: false,
                xattrs: Vec::new(),
            });
        }
        nodes.insert(path, node);
    }
    LayerSpec {
        root: meta(rng, DIR_MODES),
        nodes,
    }
}

/// A random stack of `n_lowers` lowers and maybe an upper, reproducible from `seed`.
pub fn generate(seed: u64, n_lowers: usize, with_upper: bool, p: &GenParams) -> StackSpec {
    let base = Rng::new(seed);
    let mut below: BTreeSet<String> = BTreeSet::new();
    let mut lowers = Vec::new();
    // Bottom-up, so each layer can aim at names that exist beneath it.
    for k in 0..n_lowers {
        let mut rng = base.fork(k as u64 + 1);
        let v: Vec<String> = below.iter().cloned().collect();
        let layer = gen_layer(&mut rng, p, &v, p.lower_hard_links);
        below.extend(
            layer
                .nodes
                .iter()
                .filter(|(_, n)| !matches!(n, Node::Whiteout { .. }))
                .map(|(k, _)| k.clone()),
        );
        lowers.push(layer);
    }
    lowers.reverse();
    let upper = with_upper.then(|| {
        let mut rng = base.fork(0xFFFF);
        let v: Vec<String> = below.iter().cloned().collect();
        gen_layer(&mut rng, p, &v, true)
    });
    let mut spec = StackSpec {
        seed,
        lowers,
        upper,
    };
    spec.settle_whiteouts();
    spec
}

/// How whiteouts and opaque directories are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// The kernel's formats with `flavor`'s xattrs: char 0/0 whiteouts, and (in lower layers,
    /// when `xattr_whiteouts`) some xattr whiteouts; opaque=y.
    Kernel {
        flavor: Xflavor,
        xattr_whiteouts: bool,
    },
    /// OCI image layers: `.wh.NAME` and `.wh..wh..opq`.
    Oci,
    /// Per object, at random: any format a lower layer may carry (kernel char 0/0, xattr
    /// whiteouts, OCI `.wh.` files; opaque=y or `.wh..wh..opq`).
    Mixed { flavor: Xflavor },
}

/// Write `spec` into `root` (which must be empty or missing) in `style`. `is_upper` restricts
/// the formats to those valid in an upper layer. Same inputs, same bytes, same metadata.
pub fn materialize(spec: &LayerSpec, root: &Path, style: Style, is_upper: bool) {
    let layer = Layer::new(root);
    let pick = |path: &str, salt: u64| fnv1a(path.as_bytes()).wrapping_add(salt) % 3;
    let parent_of = |p: &str| match p.rfind('/') {
        Some(i) => p[..i].to_string(),
        None => String::new(),
    };
    let parent_opaque = |p: &str| {
        matches!(
            spec.nodes.get(&parent_of(p)),
            Some(Node::Dir { opaque: true, .. })
        )
    };
    // Whiteouts as created (a `.wh.` file sits beside the name it hides).
    let mut whiteout_files: Vec<String> = Vec::new();
    for (path, node) in &spec.nodes {
        match node {
            Node::Dir { .. } => {
                layer.dir(path);
            }
            Node::File { content, .. } => {
                layer.file(path, content);
            }
            Node::Symlink { target, .. } => {
                layer.symlink(path, target);
            }
            Node::Hardlink { .. } => {}
            Node::Fifo { .. } => {
                layer.fifo(path);
            }
            Node::CharDev { major, minor, .. } => {
                layer.chardev(path, *major, *minor);
            }
            Node::Whiteout { xattr_ok } => {
                let xattr_ok = *xattr_ok && !is_upper && !parent_opaque(path);
                let format = match style {
                    Style::Kernel {
                        xattr_whiteouts, ..
                    } => {
                        if xattr_whiteouts && xattr_ok && pick(path, 7) != 0 {
                            1
                        } else {
                            0
                        }
                    }
                    Style::Oci => 2,
                    Style::Mixed { .. } => match pick(path, 11) {
                        _ if is_upper => 0,
                        1 if !xattr_ok => 0,
                        f => f,
                    },
                };
                let flavor = match style {
                    Style::Kernel { flavor, .. } | Style::Mixed { flavor } => flavor,
                    Style::Oci => Xflavor::Trusted,
                };
                let marker = match format {
                    0 => {
                        layer.whiteout(path);
                        path.clone()
                    }
                    1 => {
                        layer.xattr_whiteout(path, flavor);
                        path.clone()
                    }
                    _ => {
                        layer.oci_whiteout(path);
                        let (dir, name) = match path.rfind('/') {
                            Some(i) => (format!("{}/", &path[..i]), &path[i + 1..]),
                            None => (String::new(), path.as_str()),
                        };
                        format!("{dir}{}{name}", super::layers::OCI_WHITEOUT_PREFIX)
                    }
                };
                whiteout_files.push(marker);
            }
        }
    }
    for (path, node) in &spec.nodes {
        if let Node::Hardlink { to } = node {
            layer.hardlink(to, path);
        }
    }
    for (path, node) in &spec.nodes {
        let xs = match node {
            Node::Dir { opaque, xattrs, .. } => {
                if *opaque {
                    match style {
                        Style::Kernel { flavor, .. } => {
                            layer.opaque(path, flavor);
                        }
                        Style::Oci => {
                            layer.oci_opaque(path);
                        }
                        Style::Mixed { flavor } => {
                            if !is_upper && pick(path, 13) == 0 {
                                layer.oci_opaque(path);
                            } else {
                                layer.opaque(path, flavor);
                            }
                        }
                    }
                }
                xattrs
            }
            Node::File { xattrs, .. }
            | Node::Symlink { xattrs, .. }
            | Node::Fifo { xattrs, .. } => xattrs,
            _ => continue,
        };
        for (n, v) in xs {
            layer.xattr(path, n, v);
        }
    }
    let apply_meta = |path: &str, m: &Meta| {
        layer.owner(path, m.uid, m.gid);
        layer.mode(path, m.mode);
    };
    for (path, node) in &spec.nodes {
        match node {
            Node::Dir { meta, .. }
            | Node::File { meta, .. }
            | Node::Fifo { meta, .. }
            | Node::CharDev { meta, .. } => apply_meta(path, meta),
            Node::Symlink { uid, gid, .. } => {
                layer.owner(path, *uid, *gid);
            }
            _ => {}
        }
    }
    apply_meta("", &spec.root);
    for (path, node) in &spec.nodes {
        if let Node::Dir { opaque: true, .. } = node {
            let marker = format!("{path}/{}", super::layers::OCI_OPAQUE_MARKER);
            if layer.path(&marker).exists() {
                whiteout_files.push(marker);
            }
        }
    }
    for w in &whiteout_files {
        layer.times(w, spec.root.mtime, spec.root.mtime);
    }
    // Children before parents: creating entries changes a directory's mtime.
    for (path, node) in spec.nodes.iter().rev() {
        let t = match node {
            Node::Dir { meta, .. }
            | Node::File { meta, .. }
            | Node::Fifo { meta, .. }
            | Node::CharDev { meta, .. } => meta.mtime,
            Node::Symlink { mtime, .. } => *mtime,
            _ => continue,
        };
        layer.times(path, t, t);
    }
    layer.times("", spec.root.mtime, spec.root.mtime);
}

/// The physical directories of one built stack.
#[derive(Clone, Debug)]
pub struct Built {
    pub lowers: Vec<PathBuf>,
    pub upper: Option<(PathBuf, PathBuf)>,
}

impl Built {
    pub fn lower_refs(&self) -> Vec<&Path> {
        self.lowers.iter().map(PathBuf::as_path).collect()
    }

    pub fn upper_work(&self) -> Option<(&Path, &Path)> {
        self.upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path()))
    }
}

/// Write the lowers of `spec` to `<scratch>/<prefix>0..` in `style`.
pub fn build_lowers(
    spec: &StackSpec,
    scratch: &Scratch,
    prefix: &str,
    style: Style,
) -> Vec<PathBuf> {
    spec.lowers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let p = scratch.join(&format!("{prefix}{i}"));
            materialize(l, &p, style, false);
            p
        })
        .collect()
}

/// Write the upper of `spec` (if any) to `<scratch>/<upper>` with an empty `<scratch>/<work>`.
pub fn build_upper(
    spec: &StackSpec,
    scratch: &Scratch,
    upper: &str,
    work: &str,
    style: Style,
) -> Option<(PathBuf, PathBuf)> {
    let u = spec.upper.as_ref()?;
    let up = scratch.join(upper);
    materialize(u, &up, style, true);
    Some((up, scratch.dir(work)))
}

impl StackSpec {
    /// Every path any layer mentions (`/a/b`), the names an OCI layer would use for its
    /// whiteouts and opaque markers, and a child of each (ENOTDIR under non-directories):
    /// what lookups should be tried through a mount.
    pub fn probe_paths(&self) -> Vec<String> {
        let mut set = BTreeSet::new();
        for l in self.lowers.iter().chain(self.upper.iter()) {
            for (p, n) in &l.nodes {
                set.insert(format!("/{p}"));
                set.insert(format!("/{p}/zz"));
                let (dir, name) = match p.rfind('/') {
                    Some(i) => (format!("/{}/", &p[..i]), &p[i + 1..]),
                    None => ("/".to_string(), p.as_str()),
                };
                set.insert(format!("{dir}{}{name}", super::layers::OCI_WHITEOUT_PREFIX));
                if n.is_dir() {
                    set.insert(format!("/{p}/{}", super::layers::OCI_OPAQUE_MARKER));
                }
            }
        }
        set.insert(format!("/{}", super::layers::OCI_OPAQUE_MARKER));
        set.into_iter().collect()
    }
}

impl StackSpec {
    /// All layers, topmost first: the upper (if any), then the lowers.
    pub fn layers_top_first(&self) -> Vec<&LayerSpec> {
        self.upper.iter().chain(self.lowers.iter()).collect()
    }

    /// Resolve the merged tree as overlayfs lookups do: for every visible directory, the layers
    /// (indices into `layers_top_first`) whose directory of that path it merges. A whiteout
    /// ends the search for its name, a non-directory wins if found first and otherwise ends the
    /// search, an opaque directory is the last layer merged. (Opaque markers on a layer root are
    /// ignored, as the kernel does.)
    pub fn dir_stacks(&self) -> BTreeMap<String, Vec<usize>> {
        let layers = self.layers_top_first();
        let mut out = BTreeMap::new();
        let mut todo = vec![(String::new(), (0..layers.len()).collect::<Vec<_>>())];
        while let Some((dir, stack)) = todo.pop() {
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let mut names = BTreeSet::new();
            for &k in &stack {
                for p in layers[k].nodes.keys() {
                    if let Some(rest) = p.strip_prefix(&prefix) {
                        if !rest.is_empty() && !rest.contains('/') {
                            names.insert(rest.to_string());
                        }
                    }
                }
            }
            for name in names {
                let path = format!("{prefix}{name}");
                let mut dirs = Vec::new();
                for &k in &stack {
                    match layers[k].nodes.get(&path) {
                        None => continue,
                        Some(Node::Dir { opaque, .. }) => {
                            dirs.push(k);
                            if *opaque {
                                break;
                            }
                        }
                        Some(_) => break,
                    }
                }
                if !dirs.is_empty() {
                    todo.push((path, dirs));
                }
            }
            out.insert(dir, stack);
        }
        out
    }

    /// Layer `k` of `layers_top_first`.
    pub fn layer_mut(&mut self, k: usize) -> &mut LayerSpec {
        match (&mut self.upper, k) {
            (Some(u), 0) => u,
            (Some(_), k) => &mut self.lowers[k - 1],
            (None, k) => &mut self.lowers[k],
        }
    }

    /// Make every whiteout well-defined. One in a directory the overlay does not merge (it
    /// exists in one layer only) has nothing to hide, and the kernel then reads that directory
    /// as a plain one: readdir lists the whiteout while lookup says ENOENT. Those are removed
    /// (the quirk has its own test). An xattr whiteout is hidden from readdir only in a lower
    /// layer that is not the last one merged into its directory: `xattr_ok` marks where.
    pub fn settle_whiteouts(&mut self) {
        let stacks = self.dir_stacks();
        let n_upper = usize::from(self.upper.is_some());
        let mut doomed: Vec<(usize, String)> = Vec::new();
        let mut xattr_ok: Vec<(usize, String)> = Vec::new();
        for (k, layer) in self.layers_top_first().into_iter().enumerate() {
            for (path, node) in &layer.nodes {
                if !matches!(node, Node::Whiteout { .. }) {
                    continue;
                }
                let parent = match path.rfind('/') {
                    Some(i) => path[..i].to_string(),
                    None => String::new(),
                };
                let Some(st) = stacks.get(&parent) else {
                    continue;
                };
                if st.len() == 1 && st[0] == k {
                    doomed.push((k, path.clone()));
                } else if k >= n_upper && st.contains(&k) && st.last() != Some(&k) {
                    xattr_ok.push((k, path.clone()));
                }
            }
        }
        for (k, path) in doomed {
            self.layer_mut(k).nodes.remove(&path);
        }
        for (k, path) in xattr_ok {
            self.layer_mut(k)
                .nodes
                .insert(path, Node::Whiteout { xattr_ok: true });
        }
    }
}
