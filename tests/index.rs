//! `index=on`: the names of a lower hard link stay one file after a change through any of
//! them, in the kernel's on-disk format (`<workdir>/index`, `overlay.nlink`), so that the
//! upper reads the same after a remount and under the kernel's overlayfs, both ways; an upper
//! is tied to its lowers; and a stack rotated ten times (each upper becoming a lower under a
//! new one) keeps its renamed directories and hard links, as the kernel's does.
//! `write_differential::index_redirect_metacopy_on_match_kernel` compares random operations.

mod common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::contents::tree;
use common::{Layer, Scratch, mount_kernel, mount_ours};

const NAMES: [&str; 3] = ["d/h", "e/h2", "h3"];
const KERNEL_INDEX: &[&str] = &["redirect_dir=off", "index=on", "metacopy=off"];

/// (content, st_ino, st_nlink) of each name, asserting they are one file with `nlink` names.
fn one_file(root: &Path, names: &[&str], nlink: u64, what: &str) -> Vec<u8> {
    let seen: Vec<(Vec<u8>, u64, u64)> = names
        .iter()
        .map(|n| {
            let p = root.join(n);
            let m = fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{what}: {n}: {e}"));
            (fs::read(&p).expect("read"), m.ino(), m.nlink())
        })
        .collect();
    for (n, s) in names.iter().zip(&seen) {
        assert_eq!(s, &seen[0], "{what}: {n} differs from {}", names[0]);
        assert_eq!(s.2, nlink, "{what}: {n}: st_nlink");
    }
    seen[0].0.clone()
}

fn hard_linked_lower(scratch: &Scratch) -> Layer {
    let lower = Layer::new(scratch.join("l"));
    lower
        .file("d/h", "linked\n")
        .hardlink("d/h", "e/h2")
        .hardlink("d/h", "h3")
        .file("solo", "solo\n");
    lower
}

fn append(path: &Path, data: &[u8]) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", path.display()))
        .write_all(data)
        .expect("append");
}

#[test]
fn a_write_through_one_name_shows_through_all() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = hard_linked_lower(&scratch);
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]);
        // Written through the second name, before the others were ever looked up.
        append(&m.path().join("e/h2"), b"more\n");
        let content = one_file(m.path(), &NAMES, 3, "through the mount");
        assert_eq!(content, b"linked\nmore\n");
    }
    let index: Vec<_> = fs::read_dir(w.join("index"))
        .expect("<workdir>/index exists")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        index.len(),
        1,
        "one index entry for the one copy: {index:?}"
    );
    for order in [["h3", "d/h", "e/h2"], ["d/h", "h3", "e/h2"]] {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]);
        one_file(m.path(), &order, 3, "after a remount");
        assert_eq!(
            fs::read(m.path().join("h3")).expect("h3"),
            b"linked\nmore\n"
        );
    }
    {
        // The index lives in the workdir: the kernel mounts the same upper and workdir.
        let k = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_INDEX);
        assert_eq!(
            one_file(k.path(), &NAMES, 3, "the kernel on our upper"),
            b"linked\nmore\n"
        );
    }
    // Unlinking one name: two left, everywhere.
    {
        let m = mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]);
        fs::remove_file(m.path().join("d/h")).expect("unlink d/h");
        one_file(m.path(), &["e/h2", "h3"], 2, "after an unlink");
    }
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]);
    one_file(
        m.path(),
        &["e/h2", "h3"],
        2,
        "after an unlink and a remount",
    );
    drop(m);
    let k = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_INDEX);
    one_file(k.path(), &["e/h2", "h3"], 2, "the kernel after an unlink");
    assert!(!k.path().join("d/h").exists());
}

#[test]
fn our_mount_reads_the_kernels_index() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = hard_linked_lower(&scratch);
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    {
        let k = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_INDEX);
        append(&k.path().join("h3"), b"kernel\n");
        std::os::unix::fs::lchown(k.path().join("e/h2"), Some(7), None).expect("chown");
    }

    let m = mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]);
    assert_eq!(
        one_file(m.path(), &NAMES, 3, "ours on the kernel's upper"),
        b"linked\nkernel\n"
    );
    assert_eq!(
        fs::symlink_metadata(m.path().join("d/h"))
            .expect("d/h")
            .uid(),
        7
    );
    let k_ino = {
        drop(m);
        let k = mount_kernel(&[lower.root()], Some((&u, &w)), KERNEL_INDEX);
        fs::symlink_metadata(k.path().join("d/h"))
            .expect("d/h")
            .ino()
    };
    let m = mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]);
    assert_eq!(
        fs::symlink_metadata(m.path().join("e/h2"))
            .expect("e/h2")
            .ino(),
        k_ino,
        "st_ino is the kernel's"
    );
}

#[test]
fn an_upper_is_refused_over_other_lowers() {
    if !common::require_root_and_fuse() {
        return;
    }
    let scratch = Scratch::new();
    let lower = hard_linked_lower(&scratch);
    let other = Layer::new(scratch.join("other"));
    other.file("x", "x");
    let (u, w) = (scratch.dir("u"), scratch.dir("w"));
    drop(mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]));
    let kernel = common::KernelMount::try_mount(
        None,
        &[other.root()],
        Some((&u, &scratch.dir("kw"))),
        KERNEL_INDEX,
    );
    assert!(
        kernel.is_err(),
        "the kernel refuses our upper over other lowers"
    );
    let mnt = scratch.dir("m");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},index=on",
        other.root().display(),
        u.display(),
        w.display()
    );
    common::expect_refused(
        &scratch,
        &[common::os("-o"), common::os(&opts), common::os(&mnt)],
        &mnt,
        &["upperdir was used over other lower layers"],
    );
    // Over its own lowers it still mounts.
    drop(mount_ours(&[lower.root()], Some((&u, &w)), &["index=on"]));
}

/// The same ten rounds on the kernel and on ours: each round's upper becomes the top lower of
/// the next round, under a fresh upper and workdir; every round renames a directory that has
/// lower content (a redirect), writes through a name of a hard link, chowns a file (metacopy)
/// and makes a new hard link. After every round the merged tree, and for each name of the hard
/// links its content, link count and which other names share its inode, must be the kernel's.
/// (An index belongs to its workdir: once rotated, a lower's copy and the older lower's other
/// names of the file are separate files to the kernel, and so to us.)
#[test]
fn a_stack_rotated_ten_times_keeps_renames_and_hard_links() {
    if !common::require_root_and_fuse() {
        return;
    }
    const ROUNDS: usize = 10;
    const OPTS: &[&str] = &["redirect_dir=on", "index=on", "metacopy=on"];
    let scratch = Scratch::new();
    let base = hard_linked_lower(&scratch);
    base.file("tree/a/f", "f\n").file("tree/a/g", "g\n");
    let round = |root: &Path, r: usize| {
        let from = if r == 0 {
            "tree".to_owned()
        } else {
            format!("moved{}", r - 1)
        };
        fs::rename(root.join(&from), root.join(format!("moved{r}"))).expect("rename a directory");
        append(&root.join(NAMES[r % 3]), format!("round {r}\n").as_bytes());
        std::os::unix::fs::lchown(root.join(format!("moved{r}/a/f")), Some(r as u32), None)
            .expect("chown");
        fs::hard_link(root.join("solo"), root.join(format!("solo{r}"))).expect("link");
    };
    let run = |side: &str, mount: &MountFn| {
        let mut lowers: Vec<PathBuf> = vec![base.root().to_path_buf()];
        let mut trees = Vec::new();
        for r in 0..ROUNDS {
            let (u, w) = (
                scratch.dir(&format!("{side}u{r}")),
                scratch.dir(&format!("{side}w{r}")),
            );
            let refs: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
            let m = mount(&refs, &u, &w);
            let root = (*m).as_ref().to_path_buf();
            round(&root, r);
            let mut names: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
            names.push("solo".to_owned());
            names.extend((0..=r).map(|i| format!("solo{i}")));
            trees.push((tree(&root), link_structure(&root, &names)));
            drop(m);
            lowers.insert(0, u);
        }
        trees
    };
    let kernel = run("k", &|lowers, u, w| {
        Box::new(KernelPath(mount_kernel(lowers, Some((u, w)), OPTS)))
    });
    let ours = run("o", &|lowers, u, w| {
        Box::new(OurPath(mount_ours(lowers, Some((u, w)), OPTS)))
    });
    for (r, (k, o)) in kernel.iter().zip(&ours).enumerate() {
        assert_eq!(o, k, "round {r}: ours as the kernel");
    }
}

/// For each name: its content, its link count, and the names sharing its inode.
fn link_structure(root: &Path, names: &[String]) -> Vec<(String, Vec<u8>, u64, Vec<String>)> {
    let stat = |n: &String| fs::symlink_metadata(root.join(n)).expect("lstat");
    names
        .iter()
        .map(|n| {
            let m = stat(n);
            let same: Vec<String> = names
                .iter()
                .filter(|o| stat(o).ino() == m.ino())
                .cloned()
                .collect();
            (
                n.clone(),
                fs::read(root.join(n)).expect("read"),
                m.nlink(),
                same,
            )
        })
        .collect()
}

/// Mounts a stack (lowers, upper, workdir) and gives its mount point until dropped.
type MountFn = dyn Fn(&[&Path], &Path, &Path) -> Box<dyn AsRef<Path>>;

struct KernelPath(common::KernelMount);
impl AsRef<Path> for KernelPath {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}
struct OurPath(common::OurMount);
impl AsRef<Path> for OurPath {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}
