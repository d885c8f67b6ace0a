//! FUSE passthrough of lower files (`passthrough=all`, the default): mounts over one lower share
//! its page cache; a lower file open for reading does not stand in the way of a writer, whose
//! open copies it up (the kernel inode the reader holds is retired and the writer's open is
//! retried under a new one, with the same `st_ino`); the reader keeps reading the lower file, as
//! under fuse-overlayfs; every open after the copy-up reads the copy. `passthrough=upper` keeps
//! the kernel's behaviour for such readers (see `write_differential::reader_follows_copy_up`).

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;

use common::{DaemonExit, Layer, Scratch, mount_kernel, mount_ours};

/// The page cache test drops the lower file's cache: nothing else in this binary may read it.
static QUIET: Mutex<()> = Mutex::new(());

/// Whether this kernel has FUSE passthrough (6.9 and later). Under CI the machine must have it.
fn kernel_has_passthrough() -> bool {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let has = (major, minor) >= (6, 9);
    if !has {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "kernel {release} has no FUSE passthrough; CI machines must have 6.9 or later"
        );
        eprintln!("SKIPPED: kernel {release} has no FUSE passthrough (needs 6.9)");
    }
    has
}

/// MiB of `path` in the page cache that a reader of `path` sees (`fincore`, which maps the file
/// and asks the kernel which pages are resident). Through a mount, that is the FUSE inode's own
/// cache, or with passthrough the backing file's.
fn resident_mib(path: &Path) -> u64 {
    let args = ["--bytes", "--noheadings", "--output", "RES"].map(std::ffi::OsStr::new);
    let out = common::run("fincore", &[&args[..], &[path.as_os_str()]].concat());
    assert!(
        out.status.success(),
        "fincore {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("fincore output {:?}: {e}", out.stdout));
    bytes >> 20
}

/// Drops the lower file's pages from the page cache (they are clean).
fn evict(path: &Path) {
    let f = File::open(path).expect("open the lower file");
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .expect("fadvise DONTNEED");
}

/// Four mounts over `lower` read `name` whole; then the lower file's cached pages are dropped.
/// Returns the MiB of it each mount still holds, and what the lower held before the drop.
fn copies_held_by_four_mounts(
    scratch: &Scratch,
    lower: &Layer,
    name: &str,
    opts: &[&str],
) -> (Vec<u64>, u64) {
    let mounts: Vec<_> = (0..4)
        .map(|i| {
            let upper = scratch.dir(&format!("{}-u{i}", opts.join("-")));
            let work = scratch.dir(&format!("{}-w{i}", opts.join("-")));
            mount_ours(&[lower.root()], Some((&upper, &work)), opts)
        })
        .collect();
    evict(&lower.path(name));
    for m in &mounts {
        let data = std::fs::read(m.path().join(name)).expect("read through the mount");
        assert_eq!(data.len() as u64, 128 << 20, "the whole file is read");
    }
    let in_lower = resident_mib(&lower.path(name));
    evict(&lower.path(name));
    let held = mounts
        .iter()
        .map(|m| resident_mib(&m.path().join(name)))
        .collect();
    for m in mounts {
        assert_eq!(
            m.unmount().daemon,
            DaemonExit::Exited(0),
            "daemon ended badly"
        );
    }
    (held, in_lower)
}

/// Four mounts reading the same 128 MiB lower file hold no copy of their own: it is cached once,
/// by the lower filesystem. With `passthrough=upper` each mount caches its own copy besides.
#[test]
fn four_mounts_share_one_copy_of_a_lower_file() {
    if !common::require_root_and_fuse() || !kernel_has_passthrough() {
        return;
    }
    let _quiet = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    let content: Vec<u8> = (0..128u32 << 20).map(|i| (i % 253) as u8).collect();
    lower.file("big.bin", &content);
    drop(content);

    let (shared, in_lower) = copies_held_by_four_mounts(&scratch, &lower, "big.bin", &[]);
    let (separate, _) =
        copies_held_by_four_mounts(&scratch, &lower, "big.bin", &["passthrough=upper"]);
    eprintln!(
        "MiB of a 128 MiB lower file cached by each of 4 mounts after reading it: {shared:?} by \
         default (the lower held {in_lower}), {separate:?} with passthrough=upper"
    );
    assert!(
        in_lower >= 120,
        "the lower file is cached once after the reads: {in_lower} MiB"
    );
    assert_eq!(
        shared, [0; 4],
        "passthrough=all: the mounts hold no copy of their own (MiB each)"
    );
    assert!(
        separate.iter().all(|&mib| mib >= 120),
        "passthrough=upper: each mount caches its own copy, or the measurement cannot tell the \
         modes apart: {separate:?} MiB"
    );
}

/// Lower files pass through from this size on (smaller ones are cheaper through the page cache).
const PASSTHROUGH_MIN: u64 = 256 << 10;

/// Grows the lower file `rel` to `PASSTHROUGH_MIN` with a hole, so that it passes through.
fn big_enough(lower: &Layer, rel: &str) {
    OpenOptions::new()
        .write(true)
        .open(lower.path(rel))
        .and_then(|f| f.set_len(PASSTHROUGH_MIN))
        .unwrap_or_else(|e| panic!("grow {rel}: {e}"));
}

/// The first line's worth of a file (the tests' lines are 11 bytes).
fn pread_all(f: &File) -> Vec<u8> {
    let mut buf = vec![0u8; 11];
    let n = f.read_at(&mut buf, 0).expect("pread");
    buf.truncate(n);
    buf
}

/// What a reader opened before a copy-up and a writer see, on our default mount and on one
/// with `opts`: the reader's content before and after the write, every later open's, and the
/// `st_ino` of the three.
fn reader_and_writer(mount: &Path, name: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>, [u64; 3]) {
    let path = mount.join(name);
    let reader = File::open(&path).expect("open for reading");
    let before = pread_all(&reader);
    let writer = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("a writer opens a lower file a reader holds");
    writer.write_all_at(b"UPPER", 0).expect("write");
    let writer_ino = writer.metadata().expect("fstat writer").ino();
    drop(writer);
    let after = pread_all(&reader);
    let later = File::open(&path).expect("open after the copy-up");
    let inos = [
        reader.metadata().expect("fstat reader").ino(),
        writer_ino,
        later.metadata().expect("fstat later").ino(),
    ];
    (before, after, pread_all(&later), inos)
}

/// A writer opens a lower file (large enough to pass through) that a reader holds through
/// passthrough: the open succeeds and
/// copies the file up, every later open reads the copy, the reader keeps the lower file's data,
/// and all three report one `st_ino` (the kernel's, compared on the same stack). Also for a
/// metacopy file, whose data copy-up the writer makes.
#[test]
fn a_writer_opens_a_lower_file_that_a_reader_holds() {
    if !common::require_root_and_fuse() || !kernel_has_passthrough() {
        return;
    }
    let _quiet = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    for opts in [&[][..], &["metacopy=on"][..]] {
        let scratch = Scratch::new();
        let lower = Layer::new(scratch.join("l"));
        lower.file("f", "lower data\n");
        big_enough(&lower, "f");
        let kernel_ino = {
            let mut kopts = vec!["index=off"];
            if !opts.is_empty() {
                kopts.extend(["redirect_dir=on", "metacopy=on"]);
            }
            let k = mount_kernel(
                &[lower.root()],
                Some((&scratch.dir("ku"), &scratch.dir("kw"))),
                &kopts,
            );
            std::fs::metadata(k.path().join("f")).expect("stat").ino()
        };
        let (upper, work) = (scratch.dir("u"), scratch.dir("w"));
        let m = mount_ours(&[lower.root()], Some((&upper, &work)), opts);
        if !opts.is_empty() {
            std::os::unix::fs::lchown(m.path().join("f"), Some(7), None).expect("chown");
        }
        let (before, after, later, inos) = reader_and_writer(m.path(), "f");
        assert_eq!(
            before, b"lower data\n",
            "{opts:?}: the reader reads the lower file"
        );
        assert_eq!(
            after, b"lower data\n",
            "{opts:?}: the reader keeps the lower file (passthrough=all)"
        );
        assert_eq!(
            later, b"UPPER data\n",
            "{opts:?}: a later open reads the copy"
        );
        assert_eq!(
            inos, [kernel_ino; 3],
            "{opts:?}: reader, writer and later open show the kernel's st_ino"
        );
        // A second round on the same file: the retired kernel inode is gone, all is upper.
        let (_, after, later, _) = reader_and_writer(m.path(), "f");
        assert_eq!(
            (after.as_slice(), later.as_slice()),
            (&b"UPPER data\n"[..], &b"UPPER data\n"[..])
        );
        assert_eq!(
            m.unmount().daemon,
            DaemonExit::Exited(0),
            "{opts:?}: daemon ended badly"
        );
        let copy = std::fs::read(upper.join("f")).expect("read the upper copy");
        assert_eq!(
            (&copy[..11], copy.len() as u64),
            (&b"UPPER data\n"[..], PASSTHROUGH_MIN),
            "{opts:?}: the upper holds the write"
        );
    }
}

/// Readers and writers race on 200 lower files (large enough to pass through): readers open and read them, each keeping its
/// last 16 open (through passthrough to the lower file until it is copied up, so writers keep
/// meeting kernel inodes tied to lower files), writers append a line each. No error
/// reaches either (a retired kernel inode's ESTALE is retried by the kernel), and every line
/// appended is in the upper copy, once.
#[test]
fn readers_and_writers_race_on_lower_files() {
    use std::io::Write;
    if !common::require_root_and_fuse() || !kernel_has_passthrough() {
        return;
    }
    let _quiet = QUIET.lock().unwrap_or_else(|e| e.into_inner());
    const FILES: usize = 200;
    let scratch = Scratch::new();
    let lower = Layer::new(scratch.join("l"));
    for i in 0..FILES {
        lower.file(&format!("f{i}"), format!("lower {i}\n"));
        big_enough(&lower, &format!("f{i}"));
    }
    let (upper, work) = (scratch.dir("u"), scratch.dir("w"));
    let m = mount_ours(&[lower.root()], Some((&upper, &work)), &[]);
    let root = m.path().to_path_buf();
    let errors = std::thread::scope(|s| {
        let mut workers = Vec::new();
        for seed in 0..6u64 {
            let root = &root;
            workers.push(s.spawn(move || {
                let mut rng = common::prng::Rng::new(seed + 1);
                let mut errors = Vec::new();
                let mut held = std::collections::VecDeque::new();
                for _ in 0..if seed < 4 { 1000 } else { 500 } {
                    let i = rng.below(FILES as u64);
                    let path = root.join(format!("f{i}"));
                    let res = if seed < 4 {
                        File::open(&path).and_then(|f| {
                            pread_all_checked(&f)?;
                            held.push_back(f);
                            if held.len() > 16 {
                                held.pop_front();
                            }
                            Ok(())
                        })
                    } else {
                        OpenOptions::new()
                            .append(true)
                            .open(&path)
                            .and_then(|mut f| f.write_all(format!("{seed}\n").as_bytes()))
                    };
                    if let Err(e) = res {
                        errors.push(format!("{}: {e}", path.display()));
                    }
                }
                errors
            }));
        }
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker panicked"))
            .collect::<Vec<_>>()
    });
    assert!(errors.is_empty(), "errors reached callers: {errors:?}");
    let mut appended = 0;
    for i in 0..FILES {
        let merged = std::fs::read_to_string(root.join(format!("f{i}"))).expect("read merged");
        assert!(
            merged.starts_with(&format!("lower {i}\n")),
            "f{i}: {merged:?}"
        );
        // Each append is one newline-ended line; the hole that follows the first line has none.
        appended += merged.matches('\n').count() - 1;
    }
    assert_eq!(appended, 2 * 500, "every appended line is there, once");
    assert_eq!(
        m.unmount().daemon,
        DaemonExit::Exited(0),
        "daemon ended badly"
    );
}

fn pread_all_checked(f: &File) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    f.read_at(&mut buf, 0).map(|_| ())
}
