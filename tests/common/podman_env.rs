//! A private podman set-up for tests that need containers-storage to write layers through our
//! binary (`mount_program`): graph root, run root, tmp dir, `storage.conf` and `containers.conf`
//! in one scratch directory, and a small local image made from a static busybox (no network).
//! The same set-up as `tests/podman.rs`, kept separate so that file stays as it is.
//!
//! Loaded with `#[path]` by the test files that use it, not from `mod.rs`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::mountinfo::mounts_under;
use crate::common::mounts::force_unmount;
use crate::common::{Outcome, Scratch, our_bin, poll_until};

pub const IMAGE: &str = "localhost/rsfs-layers:1";

const APPLETS: &str = "sh cat ls rm mv echo mkdir touch find sort test [ true false wc head \
                       printf ln cp readlink chmod sleep stat";

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

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

/// A 64-bit little-endian ELF without a program interpreter (statically linked).
fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

fn hard_limit(label: &str) -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            let row = text.lines().find(|l| l.starts_with(label))?;
            row[label.len()..].split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(u64::MAX)
}

pub struct Tools {
    pub podman: PathBuf,
    pub busybox: PathBuf,
}

/// Root, /dev/fuse, podman, runc and a static busybox, or `None` (skip) outside CI.
pub fn tools() -> Option<Tools> {
    if !crate::common::require_root_and_fuse() {
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

fn run_env(bin: &Path, args: &[&OsStr], env: &[(&str, &OsStr)], timeout: Duration) -> Outcome {
    crate::common::run_with_timeout_env(bin, args, env, timeout)
}

/// One private podman configuration. Dropping it removes every container, unmounts whatever is
/// still mounted under its directory and stops overlay daemons serving mounts in it.
pub struct Podman {
    podman: PathBuf,
    mount_program: PathBuf,
    storage_conf: PathBuf,
    containers_conf: PathBuf,
    tmp: PathBuf,
    pub scratch: Scratch,
}

impl Podman {
    /// `files`: (path relative to the image root, content) put in the image besides busybox.
    pub fn new(tools: &Tools, mount_program: &Path, files: &[(&str, Vec<u8>)]) -> Podman {
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
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n\
                 [storage.options.overlay]\nmount_program = \"{}\"\n",
                graph.display(),
                run.display(),
                mount_program.display()
            )
            .as_bytes(),
        );
        // As in tests/podman.rs: limits no higher than ours, so runc can set them anywhere.
        let nofile = hard_limit("Max open files").min(1 << 20);
        let nproc = hard_limit("Max processes").min(4096);
        let containers_conf = scratch.file(
            "containers.conf",
            format!(
                "[containers]\nnetns = \"none\"\n\
                 default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
                 [network]\nnetwork_config_dir = \"{net}\"\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\ntmp_dir = \"{tmp}\"\nimage_copy_tmp_dir = \"{tmp}\"\n",
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
        p.import_image(tools, files);
        p
    }

    pub fn cmd(&self, args: &[&str]) -> Outcome {
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let env = [
            ("CONTAINERS_STORAGE_CONF", self.storage_conf.as_os_str()),
            ("CONTAINERS_CONF", self.containers_conf.as_os_str()),
            ("TMPDIR", self.tmp.as_os_str()),
        ];
        run_env(&self.podman, &args, &env, Duration::from_secs(120))
    }

    /// Run podman, assert it succeeded, return its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
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
    pub fn sh(&self, opts: &[&str], image: &str, script: &str) -> String {
        let mut args = vec!["run", "--network", "none", "--pull=never"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[image, "sh", "-c", script]);
        self.ok(&args)
    }

    fn import_image(&self, tools: &Tools, files: &[(&str, Vec<u8>)]) {
        let rootfs = self.scratch.dir("rootfs");
        for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("mkdir in rootfs");
        }
        std::fs::copy(&tools.busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in APPLETS.split_whitespace() {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet symlink");
        }
        for (p, content) in files {
            let path = rootfs.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).expect("mkdir in rootfs");
            std::fs::write(&path, content).expect("write image file");
        }
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
}

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
        let rm = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
        if !rm.status.is_some_and(|s| s.success()) {
            eprintln!("warning: podman rm -af failed: {}", rm.stderr.trim());
        }
        let mut left: Vec<PathBuf> = mounts_under(&root)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        left.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        left.dedup();
        for p in &left {
            force_unmount(p);
        }
        let names: Vec<String> = [self.mount_program.clone(), our_bin()]
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
    }
}
