//! Podman as a real client: containers-storage's overlay driver with `mount_program` set to our
//! binary mounts every container's root filesystem through rsfs-overlay. Containers from a small
//! busybox image read its files (checksums match), write, delete and rename them, and see their
//! own changes and not other containers'; `podman commit` keeps deletions as whiteouts; `podman
//! build` with several RUN steps that delete and re-create files gives the right tree; four
//! containers run at once; `podman diff` lists the same changes as with fuse-overlayfs.
//!
//! Everything lives in a private temporary directory: graph root, run root, podman's tmp dir,
//! `storage.conf` (`CONTAINERS_STORAGE_CONF`) and `containers.conf` (`CONTAINERS_CONF`), the
//! image's root filesystem. No network: the image is made locally from `busybox-static` and
//! containers run with `--network none`. The runtime is runc with the cgroupfs cgroup manager.
//!
//! Needs root, /dev/fuse, podman, runc and a static busybox (`apt-get install podman buildah runc
//! busybox-static uidmap`; `scripts/install-deps.sh` installs them). Without them the tests skip,
//! except under CI (`CI=true`), where that is a failure.

mod common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mountinfo::mounts_under;
use common::mounts::{force_unmount, fuse_overlayfs_bin};
use common::prng::Rng;
use common::{Outcome, Scratch, fstype_of, our_bin, poll_until};

/// The image every test starts from.
const IMAGE: &str = "localhost/rsfs-bb:1";

/// The busybox applets the image links (`/bin/<applet>` -> `busybox`).
const APPLETS: &str = "sh cat ls sha256sum rm mv echo mkdir touch find sort test [ true false wc head \
                       printf ln cp readlink cut chmod sleep stat";

/// Prints one line per object under the given roots: `D path`, `L path target` or
/// `F path sha256`, in the form [`Tree::lines`] renders the expected tree.
const TREE_SCRIPT: &str = r#"find "$@" | sort | while read -r p; do
  if [ -L "$p" ]; then echo "L $p $(readlink "$p")";
  elif [ -d "$p" ]; then echo "D $p";
  else echo "F $p $(sha256sum < "$p" | cut -d' ' -f1)"; fi
done"#;

/// A timeout for one podman command: generous, a hung podman must not hang the suite.
fn command_timeout() -> Duration {
    Duration::from_secs(120)
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Skip (or, under CI, fail) with `why`.
fn missing(why: &str) -> bool {
    if under_ci() {
        panic!("{why} (CI=true makes this a failure; scripts/install-deps.sh installs it)");
    }
    eprintln!("SKIP: {why}; podman test skipped");
    false
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether `path` is an ELF executable without a program interpreter (statically linked), so it
/// runs in an image that has no libc.
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false; // not a 64-bit little-endian ELF: we do not try to read it
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        // PT_INTERP (3) names the dynamic loader.
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

/// This process's hard limit from the `label` row of /proc/self/limits (`unlimited` and an
/// unreadable row count as no limit).
fn hard_limit(label: &str) -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let row = text.lines().find(|l| l.starts_with(label))?;
            row[label.len()..].split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(u64::MAX)
}

/// What the tests need from the machine.
struct Tools {
    podman: PathBuf,
    busybox: PathBuf,
}

/// Root, /dev/fuse, podman, runc and a static busybox, or `None` (skip) outside CI.
fn tools() -> Option<Tools> {
    if !common::require_root_and_fuse() {
        return None;
    }
    let Some(podman) = find_in_path("podman") else {
        missing("podman is not installed");
        return None;
    };
    if find_in_path("runc").is_none() {
        missing("runc is not installed");
        return None;
    }
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| is_static_elf(p))
    else {
        missing("no statically linked busybox (package busybox-static)");
        return None;
    };
    Some(Tools { podman, busybox })
}

/// Run `bin args...` with extra environment, output to files, killed after `timeout`.
fn run_env(bin: &Path, args: &[&OsStr], env: &[(&str, &OsStr)], timeout: Duration) -> Outcome {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mut status = None;
    poll_until(timeout, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read = |f: &mut std::fs::File| {
        let mut s = String::new();
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    Outcome {
        status,
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// SHA-256 of `bytes` in hex, by the host's coreutils `sha256sum` (an implementation independent
/// of the busybox one the containers use).
fn sha256(bytes: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    text.split_whitespace().next().expect("a hash").to_string()
}

/// A tree as [`TREE_SCRIPT`] prints it: path -> `D`, `F <sha256>` or `L <target>`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Tree(BTreeMap<String, String>);

impl Tree {
    fn dir(&mut self, p: &str) {
        self.0.insert(p.to_string(), "D".to_string());
    }
    fn file(&mut self, p: &str, content: &[u8]) {
        self.0
            .insert(p.to_string(), format!("F {}", sha256(content)));
    }
    fn link(&mut self, p: &str, target: &str) {
        self.0.insert(p.to_string(), format!("L {target}"));
    }
    /// Remove `p` and everything below it.
    fn remove(&mut self, p: &str) {
        let below = format!("{p}/");
        self.0.retain(|k, _| k != p && !k.starts_with(&below));
    }
    /// Rename `from` (and everything below it) to `to`.
    fn rename(&mut self, from: &str, to: &str) {
        let below = format!("{from}/");
        let moved: Vec<(String, String)> = self
            .0
            .iter()
            .filter(|(k, _)| *k == from || k.starts_with(&below))
            .map(|(k, v)| (format!("{to}{}", &k[from.len()..]), v.clone()))
            .collect();
        self.remove(from);
        self.0.extend(moved);
    }
    /// Only the objects at or below one of `roots`.
    fn under(&self, roots: &[&str]) -> Tree {
        Tree(
            self.0
                .iter()
                .filter(|(k, _)| {
                    roots
                        .iter()
                        .any(|r| *k == r || k.starts_with(&format!("{r}/")))
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }
    fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .iter()
            .map(|(k, v)| match v.split_once(' ') {
                Some((kind, rest)) => format!("{kind} {k} {rest}"),
                None => format!("{v} {k}"),
            })
            .collect();
        v.sort();
        v
    }
}

/// The sorted non-empty lines of `text`.
fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Shell words for `sh -c` that print the tree under `roots` (see [`TREE_SCRIPT`]).
fn tree_cmd(roots: &[&str]) -> String {
    let script = TREE_SCRIPT.replace("\"$@\"", &roots.join(" "));
    format!("set -e; {script}")
}

fn assert_tree(what: &str, got: &str, want: &Tree) {
    let got = sorted_lines(got);
    let want = want.lines();
    if got != want {
        let extra: Vec<&String> = got.iter().filter(|l| !want.contains(l)).collect();
        let lacking: Vec<&String> = want.iter().filter(|l| !got.contains(l)).collect();
        panic!(
            "{what}: the container sees the wrong tree\n  unexpected: {extra:#?}\n  missing: {lacking:#?}"
        );
    }
}

/// The image's contents below /data, as the tests check them.
fn image_data() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("data/a.txt", b"alpha\n".to_vec()),
        ("data/keep.txt", b"keep\n".to_vec()),
        ("data/big.bin", Rng::new(0x09d0_ca11).bytes(1 << 20)),
        ("data/sub/s.txt", b"sub\n".to_vec()),
        ("data/sub/deep/d.txt", b"deep\n".to_vec()),
        ("data/sub/deep/e.txt", b"".to_vec()),
    ]
}

/// The expected tree under /data of a container from the unchanged image.
fn image_tree() -> Tree {
    let mut t = Tree::default();
    for d in ["/data", "/data/sub", "/data/sub/deep"] {
        t.dir(d);
    }
    for (p, content) in image_data() {
        t.file(&format!("/{p}"), &content);
    }
    t.link("/data/link", "a.txt");
    t
}

/// A private podman set-up: configuration, graph root and run root in one temporary directory,
/// `mount_program` = the given binary. Dropping it removes every container, unmounts whatever is
/// still mounted under the directory and stops any overlay daemon serving a mount in it.
struct Podman {
    podman: PathBuf,
    mount_program: PathBuf,
    storage_conf: PathBuf,
    containers_conf: PathBuf,
    tmp: PathBuf,
    scratch: Scratch,
}

impl Podman {
    fn new(tools: &Tools, mount_program: &Path) -> Podman {
        let scratch = Scratch::new();
        let (graph, run, tmp, net) = (
            scratch.dir("graph"),
            scratch.dir("run"),
            scratch.dir("tmp"),
            scratch.dir("net"),
        );
        let storage_conf = scratch.file(
            "storage.conf",
            format!(
                "[storage]\n\
                 driver = \"overlay\"\n\
                 graphroot = \"{}\"\n\
                 runroot = \"{}\"\n\
                 [storage.options.overlay]\n\
                 mount_program = \"{}\"\n",
                graph.display(),
                run.display(),
                mount_program.display()
            )
            .as_bytes(),
        );
        // Podman gives containers RLIMIT_NOFILE and RLIMIT_NPROC of 1048576 unless told
        // otherwise. Without CAP_SYS_RESOURCE (as in some sandboxes) runc cannot raise a hard
        // limit: "error setting rlimits for ready process: error setting rlimit type 7 [NOFILE]:
        // operation not permitted" (then type 6, NPROC). Limits no higher than podman's own
        // always work: podman raises its NOFILE to its hard limit, which is at least ours, and
        // runs with an NPROC of 32768 or more. Root is exempt from NPROC anyway.
        let nofile = hard_limit("Max open files").min(1 << 20);
        let nproc = hard_limit("Max processes").min(4096);
        let containers_conf = scratch.file(
            "containers.conf",
            format!(
                "[containers]\n\
                 netns = \"none\"\n\
                 default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
                 [network]\n\
                 network_config_dir = \"{net}\"\n\
                 [engine]\n\
                 runtime = \"runc\"\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n\
                 tmp_dir = \"{tmp}\"\n\
                 image_copy_tmp_dir = \"{tmp}\"\n",
                net = net.display(),
                tmp = tmp.display(),
            )
            .as_bytes(),
        );
        let p = Podman {
            podman: tools.podman.clone(),
            mount_program: mount_program.to_path_buf(),
            storage_conf,
            containers_conf,
            tmp,
            scratch,
        };
        p.import_image(tools);
        p
    }

    fn cmd(&self, args: &[&str]) -> Outcome {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let env = [
            ("CONTAINERS_STORAGE_CONF", self.storage_conf.as_os_str()),
            ("CONTAINERS_CONF", self.containers_conf.as_os_str()),
            ("TMPDIR", self.tmp.as_os_str()),
        ];
        run_env(&self.podman, &args, &env, command_timeout())
    }

    /// Run podman, assert it succeeded, return its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.is_some_and(|s| s.success()),
            "podman {} failed ({}) with mount_program {}\n--- stdout\n{}\n--- stderr\n{}",
            args.join(" "),
            out.status
                .map_or("killed after the timeout".to_string(), |s| s.to_string()),
            self.mount_program.display(),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// `podman run [opts] image sh -c script`, asserting success; its stdout.
    fn sh(&self, opts: &[&str], image: &str, script: &str) -> String {
        let mut args = vec!["run", "--network", "none", "--pull=never"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[image, "sh", "-c", script]);
        self.ok(&args)
    }

    /// A temporary directory of this set-up's own.
    fn dir(&self, name: &str) -> PathBuf {
        self.scratch.dir(name)
    }

    /// Build the image's root filesystem (busybox, its applets, the files of [`image_data`])
    /// and `podman import` it as [`IMAGE`].
    fn import_image(&self, tools: &Tools) {
        let rootfs = self.scratch.dir("rootfs");
        for d in ["bin", "data", "etc", "tmp", "proc", "sys", "dev", "root"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("mkdir in rootfs");
        }
        std::fs::copy(&tools.busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in APPLETS.split_whitespace() {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet symlink");
        }
        for (p, content) in image_data() {
            let path = rootfs.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).expect("mkdir data");
            std::fs::write(&path, content).expect("write data");
        }
        std::os::unix::fs::symlink("a.txt", rootfs.join("data/link")).expect("symlink");
        let tar = self.scratch.join("rootfs.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("run tar");
        assert!(st.success(), "tar of the image rootfs failed");
        self.ok(&["import", "-q", tar.to_str().expect("UTF-8"), IMAGE]);
    }

    /// The sorted lines of `podman diff <what>`.
    fn diff(&self, what: &str) -> Vec<String> {
        sorted_lines(&self.ok(&["diff", what]))
    }
}

/// Processes of `bin_names` with an argument inside `root` (an overlay daemon serving a mount
/// under our temporary directory).
fn daemons_under(root: &Path, bin_names: &[String]) -> Vec<nix::unistd::Pid> {
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let Some(argv0) = args.first() else { continue };
        let name = Path::new(OsStr::from_bytes(argv0))
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !bin_names.contains(&name) {
            continue;
        }
        let inside = args[1..].iter().any(|a| {
            std::str::from_utf8(a).is_ok_and(|a| {
                a.split([',', '=', ':'])
                    .any(|part| Path::new(part).starts_with(root))
            })
        });
        if inside {
            pids.push(nix::unistd::Pid::from_raw(pid));
        }
    }
    pids
}

impl Drop for Podman {
    fn drop(&mut self) {
        let root = self.scratch.path().to_path_buf();
        // Containers first: podman stops them and unmounts their root filesystems.
        let rm = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
        if !rm.status.is_some_and(|s| s.success()) {
            eprintln!("warning: podman rm -af failed: {}", rm.stderr.trim());
        }
        // Then whatever podman left: layer mounts, and the graph root's overlay directory that
        // containers-storage bind-mounts on itself. Deepest first.
        let mut left: Vec<PathBuf> = mounts_under(&root)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        left.dedup();
        for p in &left {
            force_unmount(p);
        }
        // Overlay daemons still serving something in here (one whose mount went away with a
        // lazy unmount, say): SIGTERM, then SIGKILL.
        let names: Vec<String> = [self.mount_program.clone(), fuse_overlayfs_bin(), our_bin()]
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        use nix::sys::signal::{Signal, kill};
        for pid in daemons_under(&root, &names) {
            let _ = kill(pid, Signal::SIGTERM);
            let gone = poll_until(Duration::from_secs(5), || kill(pid, None).is_err());
            if !gone {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        // The scratch directory is removed when `scratch` drops, unless something is still
        // mounted in it (then it is leaked with a warning, never deleted under a live mount).
    }
}

/// The root filesystem's type as the container sees it, from its /proc/self/mountinfo.
fn root_fstype(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (pre.split(' ').nth(4)? == "/").then(|| post.split(' ').next().unwrap_or("").to_string())
    })
}

#[test]
fn containers_read_the_image_and_see_only_their_own_changes() {
    let Some(tools) = tools() else { return };
    let bin = our_bin();
    let pm = Podman::new(&tools, &bin);

    // The root filesystem really is ours, and every image file reads back intact.
    let out = pm.sh(
        &["--rm"],
        IMAGE,
        &format!(
            "cat /proc/self/mountinfo; echo ==TREE==; {}",
            tree_cmd(&["/data"])
        ),
    );
    let (mountinfo, tree) = out.split_once("==TREE==").expect("marker");
    assert_eq!(
        root_fstype(mountinfo).as_deref(),
        Some(fstype_of(&bin).as_str()),
        "the container's / is not mounted by {}:\n{mountinfo}",
        bin.display()
    );
    assert_tree("a fresh container", tree, &image_tree());

    // c1 appends to, deletes, renames (a file and a file into another directory) and creates
    // files, and removes a directory tree from the image. The script changes things only on its
    // first run, so `podman start` of the same container shows what persisted in its upper
    // layer across an unmount and a new mount.
    let change = "if [ ! -e /data/new.txt ]; then \
         echo more >> /data/a.txt && rm /data/sub/s.txt && mv /data/big.bin /data/moved.bin && \
         mv /data/keep.txt /data/sub/keep2.txt && echo fresh > /data/new.txt && \
         rm -r /data/sub/deep && mkdir -p /data/n1/n2 && echo nested > /data/n1/n2/f; fi; ";
    let script = format!("{change}{}", tree_cmd(&["/data"]));
    let mut changed = image_tree();
    changed.file("/data/a.txt", b"alpha\nmore\n");
    changed.remove("/data/sub/s.txt");
    changed.rename("/data/big.bin", "/data/moved.bin");
    changed.rename("/data/keep.txt", "/data/sub/keep2.txt");
    changed.file("/data/new.txt", b"fresh\n");
    changed.remove("/data/sub/deep");
    changed.dir("/data/n1");
    changed.dir("/data/n1/n2");
    changed.file("/data/n1/n2/f", b"nested\n");

    let first = pm.sh(&["--name", "c1"], IMAGE, &script);
    assert_tree("c1 after its changes", &first, &changed);
    let again = pm.ok(&["start", "--attach", "c1"]);
    assert_tree(
        "c1 started again (its upper layer remounted)",
        &again,
        &changed,
    );

    // c2 from the same image sees none of c1's changes, while c1's upper layer exists; and its
    // own change is invisible to c1.
    let c2 = pm.sh(
        &["--name", "c2"],
        IMAGE,
        &format!("echo c2 > /data/keep.txt; {}", tree_cmd(&["/data"])),
    );
    let mut c2_tree = image_tree();
    c2_tree.file("/data/keep.txt", b"c2\n");
    assert_tree("c2 (same image as c1)", &c2, &c2_tree);
    let again = pm.ok(&["start", "--attach", "c1"]);
    assert_tree("c1 after c2 ran", &again, &changed);
}

#[test]
fn commit_keeps_deletions_as_whiteouts() {
    let Some(tools) = tools() else { return };
    let pm = Podman::new(&tools, &our_bin());

    pm.sh(
        &["--name", "c3"],
        IMAGE,
        "set -e; rm /data/a.txt; rm -r /data/sub/deep; rm /data/link; echo kept > /data/kept.txt",
    );
    pm.ok(&["commit", "-q", "c3", "localhost/rsfs-committed:1"]);

    // The new layer's diff directory holds a whiteout for each deleted name. With a
    // mount_program, containers-storage stores layers with AUFS whiteouts (`.wh.NAME`, as it
    // cannot count on mknod); a char 0/0 device is the kernel's form. Either will do.
    let diff_dir = PathBuf::from(
        pm.ok(&[
            "image",
            "inspect",
            "--format",
            "{{.GraphDriver.Data.UpperDir}}",
            "localhost/rsfs-committed:1",
        ])
        .trim(),
    );
    for deleted in ["data/a.txt", "data/link", "data/sub/deep"] {
        let p = diff_dir.join(deleted);
        let aufs = p.with_file_name(format!(".wh.{}", p.file_name().unwrap().to_string_lossy()));
        let kernel = std::fs::symlink_metadata(&p).is_ok_and(|m| {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            m.file_type().is_char_device() && m.rdev() == 0
        });
        assert!(
            aufs.exists() || kernel,
            "the committed layer {} has no whiteout for /{deleted}",
            diff_dir.display()
        );
    }

    // `podman image diff` mounts the new layer with its diff directory as the upper layer (and
    // the image below as lower) and compares that with the image below: the deleted names must
    // show as deleted, and the whiteout markers themselves must not show at all, as with
    // fuse-overlayfs.
    let layer = sorted_lines(&pm.ok(&["image", "diff", "localhost/rsfs-committed:1"]));
    for want in [
        "A /data/kept.txt",
        "D /data/a.txt",
        "D /data/link",
        "D /data/sub/deep",
    ] {
        assert!(
            layer.iter().any(|l| l == want),
            "podman image diff of the committed image lacks {want:?} (whiteouts in an upper \
             layer not honoured?); it says:\n{}",
            layer.join("\n")
        );
    }
    let markers: Vec<&String> = layer.iter().filter(|l| l.contains("/.wh.")).collect();
    assert!(
        markers.is_empty(),
        "podman image diff of the committed image shows whiteout markers as files: {markers:?}"
    );

    // A container from the committed image does not see the deleted files, and sees the rest.
    let mut want = image_tree();
    want.remove("/data/a.txt");
    want.remove("/data/sub/deep");
    want.remove("/data/link");
    want.file("/data/kept.txt", b"kept\n");
    let out = pm.sh(
        &["--rm"],
        "localhost/rsfs-committed:1",
        &tree_cmd(&["/data"]),
    );
    assert_tree("a container from the committed image", &out, &want);

    // Re-creating a deleted name in a container of the new image works and shadows the whiteout.
    let out = pm.sh(
        &["--rm"],
        "localhost/rsfs-committed:1",
        &format!(
            "set -e; echo back > /data/a.txt; mkdir /data/sub/deep; {}",
            tree_cmd(&["/data"])
        ),
    );
    want.file("/data/a.txt", b"back\n");
    want.dir("/data/sub/deep");
    assert_tree("re-created names over the committed whiteouts", &out, &want);
}

#[test]
fn build_with_run_steps_that_delete_and_recreate() {
    let Some(tools) = tools() else { return };
    let pm = Podman::new(&tools, &our_bin());

    let ctx = pm.dir("ctx");
    std::fs::write(
        ctx.join("Containerfile"),
        format!(
            "FROM {IMAGE}\n\
             RUN mkdir -p /b/d && echo one > /b/f1 && echo two > /b/d/f2 && rm /data/a.txt && \
                 echo changed > /data/keep.txt\n\
             RUN rm -r /b/d && echo three > /b/f3 && rm /b/f1 && rm -r /data/sub && \
                 mv /data/big.bin /data/big2.bin\n\
             RUN mkdir /b/d && echo again > /b/d/f2b && echo reborn > /data/a.txt && \
                 echo one-again > /b/f1 && mkdir /data/sub && echo new > /data/sub/n.txt\n\
             RUN rm /b/f3 && ln -s f1 /b/l && chmod 600 /data/keep.txt\n"
        ),
    )
    .expect("write Containerfile");
    pm.ok(&[
        "build",
        "-q",
        "--network",
        "none",
        "--runtime",
        "runc",
        "--pull=never",
        "-t",
        "localhost/rsfs-built:1",
        ctx.to_str().expect("UTF-8"),
    ]);

    let mut want = image_tree();
    want.dir("/b");
    want.dir("/b/d");
    want.file("/b/d/f2b", b"again\n");
    want.file("/b/f1", b"one-again\n");
    want.link("/b/l", "f1");
    want.file("/data/a.txt", b"reborn\n");
    want.file("/data/keep.txt", b"changed\n");
    want.rename("/data/big.bin", "/data/big2.bin");
    want.remove("/data/sub");
    want.dir("/data/sub");
    want.file("/data/sub/n.txt", b"new\n");
    let out = pm.sh(
        &["--rm"],
        "localhost/rsfs-built:1",
        &format!(
            "{}; stat -c 'mode %a' /data/keep.txt",
            tree_cmd(&["/b", "/data"])
        ),
    );
    let (tree, mode) = out.rsplit_once("mode ").expect("stat output");
    assert_tree("the built image", tree, &want.under(&["/b", "/data"]));
    assert_eq!(mode.trim(), "600", "chmod in the last RUN step was lost");
}

#[test]
fn four_containers_at_once() {
    let Some(tools) = tools() else { return };
    let pm = Podman::new(&tools, &our_bin());

    // A shared directory is the rendezvous: each container announces itself, then waits (a
    // bounded poll inside the container) until all four are running, so all four root
    // filesystems are mounted and in use at the same time; then each works on its own copy.
    let rendezvous = pm.dir("rendezvous");
    let volume = format!("{}:/r", rendezvous.display());
    let names = ["w1", "w2", "w3", "w4"];
    for name in names {
        let script = format!(
            "set -e; touch /r/{name}; n=0; \
             while [ \"$(ls /r | wc -l)\" -lt 4 ]; do \
               n=$((n+1)); if [ $n -gt 1200 ]; then echo barrier timeout; exit 3; fi; sleep 0.05; \
             done; \
             echo {name} > /data/a.txt; mkdir /data/{name}; \
             head -c 300000 /data/big.bin > /data/{name}/part; \
             rm /data/sub/s.txt; mv /data/keep.txt /data/{name}/keep.txt; \
             {}",
            tree_cmd(&["/data"])
        );
        pm.sh(&["-d", "--name", name, "-v", &volume], IMAGE, &script);
    }
    let mut args = vec!["wait"];
    args.extend_from_slice(&names);
    let codes = pm.ok(&args);
    assert_eq!(
        codes.lines().map(str::trim).collect::<Vec<_>>(),
        vec!["0"; 4],
        "exit codes of the four containers"
    );
    let big = image_data()
        .into_iter()
        .find(|(p, _)| *p == "data/big.bin")
        .map(|(_, c)| c)
        .unwrap();
    for name in names {
        let mut want = image_tree();
        want.file("/data/a.txt", format!("{name}\n").as_bytes());
        want.dir(&format!("/data/{name}"));
        want.file(&format!("/data/{name}/part"), &big[..300000]);
        want.remove("/data/sub/s.txt");
        want.rename("/data/keep.txt", &format!("/data/{name}/keep.txt"));
        let logs = pm.ok(&["logs", name]);
        assert_tree(&format!("container {name}"), &logs, &want);
    }
}

/// Run the `podman diff` scenario under `mount_program`; the sorted lines of the diff.
fn diff_scenario(tools: &Tools, mount_program: &Path) -> Vec<String> {
    let pm = Podman::new(tools, mount_program);
    pm.sh(
        &["--name", "d1"],
        IMAGE,
        "set -e; echo more >> /data/a.txt; chmod 600 /data/keep.txt; rm /data/sub/s.txt; \
         rm -r /data/sub/deep; mv /data/big.bin /data/moved.bin; echo new > /data/new.txt; \
         mkdir -p /newdir/inner; echo x > /newdir/inner/f; ln -s a.txt /data/link2; \
         rm /data/link; touch /data/sub/t.txt",
    );
    pm.diff("d1")
}

#[test]
fn diff_lists_the_same_changes_as_with_fuse_overlayfs() {
    let Some(tools) = tools() else { return };
    let peer = fuse_overlayfs_bin();
    if !peer.is_file() {
        missing(&format!("{} is not installed", peer.display()));
        return;
    }
    let ours = diff_scenario(&tools, &our_bin());
    let theirs = diff_scenario(&tools, &peer);
    for want in [
        "A /data/new.txt",
        "A /data/moved.bin",
        "A /newdir/inner/f",
        "C /data/a.txt",
        "C /data/keep.txt",
        "D /data/big.bin",
        "D /data/sub/deep",
        "D /data/sub/s.txt",
    ] {
        assert!(
            ours.iter().any(|l| l == want),
            "podman diff with {} lacks {want:?}:\n{}",
            our_bin().display(),
            ours.join("\n")
        );
    }
    assert_eq!(
        ours,
        theirs,
        "podman diff differs: left with {}, right with {}",
        our_bin().display(),
        peer.display()
    );
}
