//! Checks of a [`Config`] against the filesystem, run before anything is mounted.
//!
//! A mistake in the layer paths found here is one clear line naming the path; found later it
//! would be an obscure mount failure or, worse, a mount that half works. The rules are the
//! kernel overlayfs's: layers must be directories, upperdir and workdir share a filesystem (copy-up
//! renames from one into the other) and are disjoint trees, and no lower layer is the upper one.

use std::fmt;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::config::Config;

/// The FUSE device the mount needs.
pub const FUSE_DEVICE: &str = "/dev/fuse";

/// A problem found on disk, as one line naming the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreflightError(pub String);

impl fmt::Display for PreflightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PreflightError {}

fn fail<T>(message: String) -> Result<T, PreflightError> {
    Err(PreflightError(message))
}

/// Checks that every layer and the mountpoint are usable directories and that the FUSE device
/// exists. Reads metadata only; changes nothing.
pub fn check(cfg: &Config) -> Result<(), PreflightError> {
    check_with_fuse_device(cfg, Path::new(FUSE_DEVICE))
}

/// [`check`] with the FUSE device path as a parameter, so tests can point it elsewhere.
fn check_with_fuse_device(cfg: &Config, fuse_device: &Path) -> Result<(), PreflightError> {
    let mut lowers = Vec::with_capacity(cfg.lowerdirs.len());
    for lower in &cfg.lowerdirs {
        lowers.push((lower.as_path(), directory("lower directory", lower)?));
    }
    let upper = match &cfg.upperdir {
        Some(path) => Some((path.as_path(), directory("upperdir", path)?)),
        None => None,
    };
    let work = match &cfg.workdir {
        Some(path) => Some((path.as_path(), directory("workdir", path)?)),
        None => None,
    };
    if let (Some(upper), Some(work)) = (&upper, &work) {
        upper_and_work_apart(upper, work)?;
    }
    if let Some((_, upper_meta)) = &upper {
        // Compared by identity, not by name: a symlink or bind mount can alias the upperdir.
        if let Some((lower, _)) = lowers.iter().find(|(_, m)| same_object(m, upper_meta)) {
            return fail(format!(
                "lower directory '{}' is also the upperdir",
                lower.display()
            ));
        }
    }
    directory("mountpoint", &cfg.mountpoint)?;
    fuse_device_present(fuse_device)
}

/// The metadata of `path`, which must be a directory (symlinks followed, as the kernel does).
fn directory(what: &str, path: &Path) -> Result<Metadata, PreflightError> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(meta),
        Ok(_) => fail(format!("{what} '{}' is not a directory", path.display())),
        Err(e) if is_missing(&e) => fail(format!("{what} '{}' does not exist", path.display())),
        Err(e) => fail(format!("cannot access {what} '{}': {e}", path.display())),
    }
}

/// ENOTDIR counts as missing: a path through a regular file names nothing.
fn is_missing(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn same_object(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Copy-up renames from workdir into upperdir, which only works within one filesystem; and if
/// either tree contained the other, copy-up temporaries would show in the merged view or the
/// upper layer would be cleaned as scratch space.
fn upper_and_work_apart(
    (upper, upper_meta): &(&Path, Metadata),
    (work, work_meta): &(&Path, Metadata),
) -> Result<(), PreflightError> {
    let (u, w) = (upper.display(), work.display());
    if upper_meta.dev() != work_meta.dev() {
        return fail(format!(
            "upperdir '{u}' and workdir '{w}' must be on the same filesystem"
        ));
    }
    if same_object(upper_meta, work_meta) {
        return fail(format!(
            "upperdir '{u}' and workdir '{w}' must be different directories"
        ));
    }
    let upper_real = canonical("upperdir", upper)?;
    let work_real = canonical("workdir", work)?;
    if work_real.starts_with(&upper_real) {
        return fail(format!("workdir '{w}' must not be inside upperdir '{u}'"));
    }
    if upper_real.starts_with(&work_real) {
        return fail(format!("upperdir '{u}' must not be inside workdir '{w}'"));
    }
    Ok(())
}

fn canonical(what: &str, path: &Path) -> Result<std::path::PathBuf, PreflightError> {
    fs::canonicalize(path)
        .or_else(|e| fail(format!("cannot resolve {what} '{}': {e}", path.display())))
}

fn fuse_device_present(device: &Path) -> Result<(), PreflightError> {
    let dev = device.display();
    match fs::metadata(device) {
        Ok(_) => Ok(()),
        Err(e) if is_missing(&e) => fail(format!(
            "{dev} is missing: load the fuse module or give the container the device"
        )),
        Err(e) => fail(format!("cannot access {dev}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;
    use tempfile::TempDir;

    /// A tree with two lowers, an upper, a work and a mount directory, a regular file and a fake
    /// FUSE device (a regular file is enough: only its existence is checked).
    struct Fixture {
        dir: TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().expect("tempdir");
            for d in ["l1", "l2", "u", "w", "m"] {
                fs::create_dir(dir.path().join(d)).expect("mkdir");
            }
            for f in ["file", "fuse"] {
                fs::write(dir.path().join(f), b"").expect("write");
            }
            Fixture { dir }
        }

        fn p(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        fn config(&self) -> Config {
            let mut cfg = Config::new(self.p("m"), false);
            cfg.lowerdirs = vec![self.p("l2"), self.p("l1")];
            cfg.upperdir = Some(self.p("u"));
            cfg.workdir = Some(self.p("w"));
            cfg
        }

        fn mkdir(&self, name: &str) -> PathBuf {
            let path = self.p(name);
            fs::create_dir(&path).expect("mkdir");
            path
        }

        fn symlink(&self, name: &str, target: &str) -> PathBuf {
            let path = self.p(name);
            symlink(self.p(target), &path).expect("symlink");
            path
        }

        fn run(&self, cfg: &Config, fuse: &Path) -> Result<(), String> {
            check_with_fuse_device(cfg, fuse).map_err(|e| e.to_string())
        }
    }

    /// A case changes the good configuration (and may build more on disk); it returns the
    /// expected message, given the fixture's paths.
    type Case = (
        &'static str,
        fn(&Fixture, &mut Config, &mut PathBuf) -> String,
    );

    /// A change to the good configuration that keeps it good.
    type GoodCase = (&'static str, fn(&Fixture, &mut Config));

    fn d(p: &Path) -> String {
        p.display().to_string()
    }

    #[test]
    fn good_stacks_pass() {
        let cases: &[GoodCase] = &[
            ("upper and work", |_, _| {}),
            ("no upper (read-only)", |_, c| {
                c.upperdir = None;
                c.workdir = None;
            }),
            ("single lower", |f, c| c.lowerdirs = vec![f.p("l1")]),
            ("lower through a symlink", |f, c| {
                c.lowerdirs = vec![f.symlink("ln", "l1")]
            }),
            ("siblings with a shared prefix", |f, c| {
                c.workdir = Some(f.mkdir("u2"))
            }),
            ("mount over a lower", |f, c| c.mountpoint = f.p("l1")),
        ];
        for (name, change) in cases {
            let f = Fixture::new();
            let mut cfg = f.config();
            change(&f, &mut cfg);
            assert_eq!(f.run(&cfg, &f.p("fuse")), Ok(()), "{name}");
        }
    }

    #[test]
    fn each_problem_is_named() {
        let cases: &[Case] = &[
            ("lower missing", |f, c, _| {
                c.lowerdirs.push(f.p("nope"));
                format!("lower directory '{}' does not exist", d(&f.p("nope")))
            }),
            ("lower is a file", |f, c, _| {
                c.lowerdirs.insert(0, f.p("file"));
                format!("lower directory '{}' is not a directory", d(&f.p("file")))
            }),
            ("lower below a file", |f, c, _| {
                c.lowerdirs = vec![f.p("file/x")];
                format!("lower directory '{}' does not exist", d(&f.p("file/x")))
            }),
            ("dangling symlink lower", |f, c, _| {
                c.lowerdirs = vec![f.symlink("dangle", "nope")];
                format!("lower directory '{}' does not exist", d(&f.p("dangle")))
            }),
            ("upper missing", |f, c, _| {
                c.upperdir = Some(f.p("nope"));
                format!("upperdir '{}' does not exist", d(&f.p("nope")))
            }),
            ("upper is a file", |f, c, _| {
                c.upperdir = Some(f.p("file"));
                format!("upperdir '{}' is not a directory", d(&f.p("file")))
            }),
            ("work missing", |f, c, _| {
                c.workdir = Some(f.p("nope"));
                format!("workdir '{}' does not exist", d(&f.p("nope")))
            }),
            ("work is a file", |f, c, _| {
                c.workdir = Some(f.p("file"));
                format!("workdir '{}' is not a directory", d(&f.p("file")))
            }),
            ("work inside upper", |f, c, _| {
                let w = f.mkdir("u/w");
                c.workdir = Some(w.clone());
                format!(
                    "workdir '{}' must not be inside upperdir '{}'",
                    d(&w),
                    d(&f.p("u"))
                )
            }),
            ("upper inside work", |f, c, _| {
                let u = f.mkdir("w/u");
                c.upperdir = Some(u.clone());
                format!(
                    "upperdir '{}' must not be inside workdir '{}'",
                    d(&u),
                    d(&f.p("w"))
                )
            }),
            ("work inside upper through a symlink", |f, c, _| {
                f.mkdir("u/w");
                c.workdir = Some(f.symlink("wl", "u/w"));
                format!(
                    "workdir '{}' must not be inside upperdir '{}'",
                    d(&f.p("wl")),
                    d(&f.p("u"))
                )
            }),
            ("upper is work", |f, c, _| {
                c.workdir = Some(f.p("u"));
                let u = d(&f.p("u"));
                format!("upperdir '{u}' and workdir '{u}' must be different directories")
            }),
            ("upper is work through a symlink", |f, c, _| {
                c.workdir = Some(f.symlink("ul", "u"));
                format!(
                    "upperdir '{}' and workdir '{}' must be different directories",
                    d(&f.p("u")),
                    d(&f.p("ul"))
                )
            }),
            ("lower is upper", |f, c, _| {
                c.lowerdirs.push(f.p("u"));
                format!("lower directory '{}' is also the upperdir", d(&f.p("u")))
            }),
            ("lower is upper through a symlink", |f, c, _| {
                c.lowerdirs.insert(0, f.symlink("ul", "u"));
                format!("lower directory '{}' is also the upperdir", d(&f.p("ul")))
            }),
            ("mountpoint missing", |f, c, _| {
                c.mountpoint = f.p("nope");
                format!("mountpoint '{}' does not exist", d(&f.p("nope")))
            }),
            ("mountpoint is a file", |f, c, _| {
                c.mountpoint = f.p("file");
                format!("mountpoint '{}' is not a directory", d(&f.p("file")))
            }),
            ("no fuse device", |f, _, fuse| {
                *fuse = f.p("nope");
                format!(
                    "{} is missing: load the fuse module or give the container the device",
                    d(&f.p("nope"))
                )
            }),
        ];
        for (name, change) in cases {
            let f = Fixture::new();
            let mut cfg = f.config();
            let mut fuse = f.p("fuse");
            let want = change(&f, &mut cfg, &mut fuse);
            assert_eq!(f.run(&cfg, &fuse), Err(want), "{name}");
        }
    }

    #[test]
    fn upper_and_work_on_different_filesystems() {
        let f = Fixture::new();
        // /proc is always its own filesystem; skip where it is not mounted.
        let proc = Path::new("/proc");
        let Ok(proc_meta) = fs::metadata(proc) else {
            return;
        };
        let Ok(upper_meta) = fs::metadata(f.p("u")) else {
            panic!("fixture")
        };
        if proc_meta.dev() == upper_meta.dev() {
            return;
        }
        let mut cfg = f.config();
        cfg.workdir = Some(proc.to_path_buf());
        let want = format!(
            "upperdir '{}' and workdir '/proc' must be on the same filesystem",
            d(&f.p("u"))
        );
        assert_eq!(f.run(&cfg, &f.p("fuse")), Err(want));
    }

    #[test]
    fn error_display_is_the_message() {
        let e = PreflightError("mountpoint '/m' does not exist".to_owned());
        assert_eq!(e.to_string(), "mountpoint '/m' does not exist");
    }
}
