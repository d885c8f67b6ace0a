#!/usr/bin/env python3
"""The comparison benchmark's driver: rsfs-overlay against fuse-overlayfs, kernel overlayfs and a
plain directory, on data it generates itself. `benches/run.sh` is the entry point (it installs the
tools, builds rsfs-overlay, holds the lock and unmounts on exit); this file generates the data,
mounts each system, times the workloads and prints one Markdown table. Standard library only.

Every number is the median wall time of its runs, in seconds, lower is better. A row that mutates
the tree, or wants cold caches, gets a fresh mount (and an empty upper directory) for every run;
a warm row mounts once, runs the workload once untimed, then times its runs on that mount.
Timings are never checked: the exit status is non-zero only when a command failed outright.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
import zlib

# Bump when the generated data changes, so that an old data directory is rebuilt, not reused.
GEN_VERSION = 3

SCALES = {
    "full": dict(
        files=50_000, include_files=4_000, shadow_files=200, big=1 << 30, copyup_big=512 << 20,
        untar_files=5_000, rm_files=5_000, copyup_files=2_000, fsync_files=2_000, lookups=10_000,
        stack_layers=128, fio_runtime=3, runs=3, timeout=600,
    ),
    "smoke": dict(
        files=500, include_files=100, shadow_files=20, big=16 << 20, copyup_big=8 << 20,
        untar_files=200, rm_files=200, copyup_files=100, fsync_files=100, lookups=1_000,
        stack_layers=4, fio_runtime=1, runs=1, timeout=120,
    ),
}

# Keys that define the generated data (a change in any of them rebuilds it).
DATA_KEYS = ("files", "include_files", "shadow_files", "big", "copyup_big", "untar_files",
             "rm_files", "copyup_files", "lookups", "stack_layers")

SYSTEMS = ("native", "kernel", "fuse-overlayfs", "rsfs")
SYSTEM_ALIASES = {"native": "native", "kernel": "kernel", "overlay": "kernel",
                  "overlayfs": "kernel", "fuse-overlayfs": "fuse-overlayfs",
                  "fuse": "fuse-overlayfs", "fovl": "fuse-overlayfs", "rsfs": "rsfs",
                  "rsfs-overlay": "rsfs"}
FUSE_SYSTEMS = ("fuse-overlayfs", "rsfs")
DAEMON_NAMES = {"fuse-overlayfs": "fuse-overlayfs", "rsfs": "rsfs-overlay"}

RANDOM_IOS = 100_000  # the random-read row reports seconds per this many 4 KiB reads
SEED = 20240611


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A workload or a mount failed outright (not a slow result)."""


def human_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.0f} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Data generation: deterministic from SEED and the scale; built once, reused while the stamp
# matches.
# ---------------------------------------------------------------------------------------------

SYLLABLES = ("lib", "gtk", "core", "net", "ssl", "font", "py", "perl", "zlib", "data", "util",
             "kde", "gnome", "glib", "sys", "io", "ui", "cairo", "pango", "dbus", "udev", "mesa",
             "vim", "tex", "boost", "qt", "sdl", "ogg", "xml", "json", "yaml", "http", "mail",
             "cups", "alsa", "pulse", "wayland", "x11", "gl", "ssh", "git", "rust", "llvm", "gcc",
             "krb", "ldap", "sql", "png", "jpeg", "tiff", "icu", "nss", "gpg", "apt", "dpkg")
LANGS = ("af", "ar", "ast", "be", "bg", "bn", "bs", "ca", "cs", "cy", "da", "de", "el", "en_GB",
         "eo", "es", "et", "eu", "fa", "fi", "fr", "ga", "gl", "gu", "he", "hi", "hr", "hu", "id",
         "is", "it", "ja", "ka", "kk", "km", "kn", "ko", "lt", "lv", "mk", "ml", "mr", "ms", "nb",
         "ne", "nl", "nn", "oc", "pa", "pl", "pt", "pt_BR", "ro", "ru", "si", "sk", "sl", "sq",
         "sr", "sv", "ta", "te", "th", "tr", "uk", "vi", "zh_CN", "zh_HK", "zh_TW")

# Top-level directories of the /usr/share-like tree: (name, weight, extensions, levels). A level
# says how a directory at that depth splits its files: `k` children (or one per `per` files),
# `here` the share kept in the directory itself, `names` what to call the children; past the
# last level everything stays in the directory. doc, locale, man and icons get equal weight
# because the parallel-readers row reads one each.
SHARE_SHAPE = (
    ("doc", 16, ("", ".gz", ".txt", ".html", ".md"),
     ({"per": 7, "here": 0.0}, {"per": 8, "here": 0.75}, {"per": 5, "here": 0.6},
      {"per": 4, "here": 0.5})),
    ("locale", 16, (".mo",),
     ({"per": 60, "here": 0.0, "names": LANGS}, {"k": 1, "here": 0.0, "names": ("LC_MESSAGES",)})),
    ("man", 16, (".1.gz", ".3.gz", ".5.gz", ".8.gz"),
     ({"k": 14, "here": 0.0, "names": ("man1", "man2", "man3", "man4", "man5", "man6", "man7",
                                       "man8", "de", "fr", "ja", "pl", "ru", "es")},)),
    ("icons", 16, (".png", ".svg"),
     ({"k": 4, "here": 0.0, "names": ("hicolor", "Adwaita", "HighContrast", "gnome")},
      {"k": 9, "here": 0.0, "names": ("16x16", "22x22", "24x24", "32x32", "48x48", "64x64",
                                      "128x128", "256x256", "scalable")},
      {"k": 8, "here": 0.0, "names": ("apps", "actions", "devices", "places", "status",
                                      "mimetypes", "categories", "emblems")})),
    ("zoneinfo", 3, ("",), ({"per": 20, "here": 0.1}, {"per": 10, "here": 0.5})),
    ("perl5", 8, (".pm", ".pod", ".pl"),
     ({"per": 30, "here": 0.1}, {"per": 8, "here": 0.4}, {"per": 5, "here": 0.5},
      {"per": 4, "here": 0.5}, {"per": 3, "here": 0.6})),
    ("python3", 8, (".py", ".pyi", ".txt"),
     ({"per": 25, "here": 0.05}, {"per": 10, "here": 0.5}, {"per": 5, "here": 0.5},
      {"per": 4, "here": 0.6})),
    ("fonts", 4, (".ttf", ".otf", ".pcf.gz"),
     ({"k": 3, "here": 0.0, "names": ("truetype", "opentype", "X11")}, {"per": 10, "here": 0.0})),
    ("mime", 3, (".xml",), ({"per": 60, "here": 0.1},)),
    ("gtk-doc", 4, (".html", ".png", ".devhelp2"),
     ({"per": 40, "here": 0.0}, {"per": 10, "here": 0.8})),
    ("X11", 3, ("", ".conf"),
     ({"per": 30, "here": 0.2}, {"per": 10, "here": 0.5}, {"per": 5, "here": 0.5})),
    ("misc", 3, ("", ".txt", ".dat"), ()),
)
INCLUDE_SHAPE = ("include", 1, (".h",),
                 ({"per": 60, "here": 0.15,
                   "names": ("linux", "sys", "bits", "asm-generic", "x86_64-linux-gnu", "c++",
                             "python3.11", "glib-2.0", "gtk-3.0", "boost", "openssl", "X11",
                             "GL", "netinet", "rpc")},
                  {"per": 12, "here": 0.5}, {"per": 6, "here": 0.6}, {"per": 4, "here": 0.7}))
RMTREE_SHAPE = ("rmtree", 1, ("", ".txt", ".conf"),
                ({"per": 25, "here": 0.1}, {"per": 8, "here": 0.4}, {"per": 5, "here": 0.6}))
SRCTREE_SHAPE = ("srctree", 1, (".c", ".h", ".rs", ".py", ".txt", ".md"),
                 ({"per": 40, "here": 0.1}, {"per": 10, "here": 0.4}, {"per": 6, "here": 0.6},
                  {"per": 4, "here": 0.7}))


def make_name(rng, exts, taken):
    while True:
        name = rng.choice(SYLLABLES)
        if rng.random() < 0.7:
            name += rng.choice(("-", "_", "")) + rng.choice(SYLLABLES)
        if rng.random() < 0.4:
            name += str(rng.randrange(100))
        name += rng.choice(exts) if exts else ""
        if name not in taken:
            taken.add(name)
            return name


def split_count(rng, n, k):
    """Splits n files among k children, at least one each, heavy-tailed."""
    weights = [rng.paretovariate(1.5) for _ in range(k)]
    total = sum(weights)
    counts = [1] * k
    rest = n - k
    shares = [rest * w / total for w in weights]
    for i, s in enumerate(shares):
        counts[i] += int(s)
    for _ in range(n - sum(counts)):
        counts[rng.randrange(k)] += 1
    return counts


def plan_tree(rng, rel, n, levels, exts, out, depth=0):
    """Appends (directory, [file names]) pairs for a tree of n files under rel."""
    taken = set()
    kids = []
    here = n
    if depth < len(levels):
        lv = levels[depth]
        keep = round(n * lv["here"])
        rest = n - keep
        if "k" in lv:
            k = lv["k"]
        else:
            k = round(rest / lv["per"] * rng.uniform(0.7, 1.3))
        k = min(k, rest)
        if k > 0:
            here = keep
            names = list(lv.get("names", ()))
            for i, count in enumerate(split_count(rng, rest, k)):
                if i < len(names):
                    name = names[i]
                    taken.add(name)
                else:
                    name = make_name(rng, ("",), taken)
                kids.append((name, count))
    files = [make_name(rng, exts, taken) for _ in range(here)]
    out.append((rel, files))
    for name, count in kids:
        plan_tree(rng, os.path.join(rel, name), count, levels, exts, out, depth + 1)


def plan_shape(rng, shapes, n, prefix):
    total_w = sum(s[1] for s in shapes)
    out = []
    counts = [int(n * s[1] / total_w) for s in shapes]
    counts[0] += n - sum(counts)
    for (name, _w, exts, levels), count in zip(shapes, counts):
        plan_tree(rng, os.path.join(prefix, name), count, levels, exts, out)
    return out


def file_size(rng, median):
    if rng.random() < 0.03:
        return 0
    return min(65536, int(rng.lognormvariate(math.log(median), 1.3)))


class Writer:
    """Writes files with deterministic content cut from one seeded random buffer."""

    def __init__(self, rng):
        self.rng = rng
        self.buf = rng.randbytes(1 << 20)
        self.files = 0
        self.bytes = 0

    def content(self, size):
        off = self.rng.randrange(len(self.buf) - size)
        return self.buf[off:off + size]

    def tree(self, root, plan, median, symlinks=0.01, entries=None):
        """Creates the planned tree under root; appends (relpath, size) of regular files."""
        rng = self.rng
        for rel, files in plan:
            d = os.path.join(root, rel)
            os.makedirs(d, exist_ok=True)
            made = []
            for name in files:
                size = file_size(rng, median)
                path = os.path.join(d, name)
                with open(path, "wb") as f:
                    f.write(self.content(size))
                os.chmod(path, 0o755 if rng.random() < 0.05 else 0o644)
                stamp = (1_600_000_000 + rng.randrange(100_000_000)) * 10**9
                os.utime(path, ns=(stamp, stamp))
                made.append(name)
                self.files += 1
                self.bytes += size
                if entries is not None:
                    entries.append((os.path.join(rel, name), size))
            for name in made:
                if rng.random() < symlinks:
                    link = name + ".link"
                    if link not in files:
                        os.symlink(name, os.path.join(d, link))

    def big(self, path, size):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            left = size
            i = 0
            while left > 0:
                k = (i * 4099) % len(self.buf)
                block = self.buf[k:] + self.buf[:k]
                f.write(block[:left])
                left -= len(block[:left])
                i += 1
        self.bytes += size


def generate(data, scale):
    """Builds every input under data (which must not exist yet)."""
    t0 = time.monotonic()
    os.makedirs(data)
    rng = random.Random(SEED)
    w = Writer(rng)
    lower1 = os.path.join(data, "lower-share")
    lower2 = os.path.join(data, "lower-include")

    log(f"generating {scale['files']:,} small files (/usr/share-like) ...")
    share_plan = plan_shape(rng, SHARE_SHAPE, scale["files"], "share")
    share_files = []
    w.tree(lower1, share_plan, 2500, entries=share_files)
    share_bytes = w.bytes

    log(f"generating {scale['rm_files']:,}-file tree for rm -rf ...")
    w.tree(lower1, plan_shape(rng, (RMTREE_SHAPE,), scale["rm_files"], ""), 1024)

    log(f"generating big files ({human_bytes(scale['big'])}, "
        f"{human_bytes(scale['copyup_big'])}) ...")
    w.big(os.path.join(lower1, "big", "big.bin"), scale["big"])
    w.big(os.path.join(lower1, "big", "copyup.bin"), scale["copyup_big"])

    log(f"generating {scale['include_files']:,} headers (/usr/include-like) ...")
    include_plan = plan_shape(rng, (INCLUDE_SHAPE,), scale["include_files"], "")
    w.tree(lower2, include_plan, 3000)
    # The include lower also shadows some share files and adds others next to them, so that
    # directories merge and a name can be hidden by an upper layer, as in a real stack.
    shadowed = set()
    picks = rng.sample(range(len(share_files)), scale["shadow_files"])
    for i, idx in enumerate(picks):
        rel, _ = share_files[idx]
        if i % 2 == 0:
            shadowed.add(rel)
            target = os.path.join(lower2, rel)
        else:
            target = os.path.join(lower2, os.path.dirname(rel), f"added-{i}.txt")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(w.content(file_size(rng, 2500)))

    log("copying the lowers into one directory (the native baseline) ...")
    native = os.path.join(data, "native")
    build_native(data)

    log(f"splitting the small-file tree over {scale['stack_layers']} lowers ...")
    stack = os.path.join(data, "stack")
    layers = scale["stack_layers"]
    names = [f"l{i:03d}" for i in range(layers)]
    for name in names:
        os.makedirs(os.path.join(stack, name))
    share_root = os.path.join(lower1, "share")
    for dirpath, dirnames, filenames in os.walk(share_root):
        rel = os.path.relpath(dirpath, lower1)
        layer = names[zlib.crc32(rel.encode()) % layers]
        target = os.path.join(stack, layer, rel)
        os.makedirs(target, exist_ok=True)
        # Metadata only (the row is find + stat): sparse files of the same size, mode and times.
        for name in filenames:
            src = os.path.join(dirpath, name)
            dst = os.path.join(target, name)
            st = os.lstat(src)
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            with open(dst, "wb") as f:
                f.truncate(st.st_size)
            os.chmod(dst, st.st_mode & 0o7777)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))

    log(f"writing the {scale['untar_files']:,}-file tarball ...")
    src_entries = []
    tmp_src = os.path.join(data, "srctree.tmp")
    w.tree(tmp_src, plan_shape(rng, (SRCTREE_SHAPE,), scale["untar_files"], ""), 4000,
           symlinks=0, entries=src_entries)
    with tarfile.open(os.path.join(data, "untar.tar"), "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(os.path.join(tmp_src, "srctree"), arcname="srctree", recursive=True)
    shutil.rmtree(tmp_src)

    # Copy-up victims: evenly spaced regular files of the share tree that no upper lower shadows.
    candidates = sorted((rel, size) for rel, size in share_files if rel not in shadowed)
    step = max(1, len(candidates) // scale["copyup_files"])
    victims = candidates[::step][:scale["copyup_files"]]
    write_list(os.path.join(data, "copyup-small.list"), victims)
    write_list(os.path.join(data, "copyup-big.list"), [("big/copyup.bin", scale["copyup_big"])])

    # Directories for the missing-name lookups: ten, of every depth, from both lowers.
    dirs = sorted({os.path.dirname(rel) for rel, _ in share_files} |
                  {rel for rel, _ in include_plan})
    step = max(1, len(dirs) // 10)
    with open(os.path.join(data, "lookup-dirs.list"), "w") as f:
        for d in dirs[::step][:10]:
            f.write(d + "\n")

    n_dirs = sum(1 for _ in os.walk(lower1)) + sum(1 for _ in os.walk(lower2))
    meta = {
        "share_files": len(share_files), "share_bytes": share_bytes, "files": w.files,
        "bytes": w.bytes, "dirs": n_dirs, "seconds": round(time.monotonic() - t0, 1),
    }
    with open(os.path.join(data, "meta.json"), "w") as f:
        json.dump(meta, f)
    log(f"generated {w.files:,} files, {human_bytes(w.bytes)}, {n_dirs:,} dirs "
        f"in {meta['seconds']} s")
    assert os.path.isdir(native)


def write_list(path, entries):
    with open(path, "w") as f:
        for rel, size in entries:
            f.write(f"{size}\t{rel}\n")


def read_list(path):
    out = []
    with open(path) as f:
        for line in f:
            size, rel = line.rstrip("\n").split("\t", 1)
            out.append((rel, int(size)))
    return out


def build_native(data):
    native = os.path.join(data, "native")
    if os.path.exists(native):
        run_checked(["rm", "-rf", "--one-file-system", native])
    os.makedirs(native)
    for lower in ("lower-share", "lower-include"):  # bottom first, so the top one wins
        run_checked(["cp", "-a", os.path.join(data, lower) + "/.", native + "/"])


def run_checked(argv):
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")


def stamp_text(scale):
    return json.dumps({"gen": GEN_VERSION, **{k: scale[k] for k in DATA_KEYS}}, sort_keys=True)


def ensure_data(data, scale):
    stamp = os.path.join(data, ".stamp")
    want = stamp_text(scale)
    try:
        with open(stamp) as f:
            have = f.read()
    except OSError:
        have = None
    if have == want:
        log(f"reusing generated data in {data}")
        if os.path.exists(os.path.join(data, "native.dirty")):
            log("the native copy was left modified by an interrupted run; rebuilding it")
            build_native(data)
            os.unlink(os.path.join(data, "native.dirty"))
        return
    if os.path.exists(data):
        log(f"{data} is from another generator version or scale; rebuilding it")
        run_checked(["rm", "-rf", "--one-file-system", data])
    generate(data, scale)
    with open(stamp, "w") as f:
        f.write(want)


# ---------------------------------------------------------------------------------------------
# Mounts
# ---------------------------------------------------------------------------------------------

def unescape_mountinfo(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_entry(mountpoint):
    """The (device, fstype) of the mount at mountpoint, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if unescape_mountinfo(fields[4]) == mountpoint:
                sep = fields.index("-")
                return fields[2], fields[sep + 1]
    return None


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def find_daemon(name, mountpoint):
    """The pid of the live process named name that has mountpoint as an argument."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == name and mountpoint in argv[1:]:
            if pid_alive(int(entry)):
                return int(entry)
    return None


def daemon_stats(pid):
    """(VmHWM in KiB, open fd count) of a daemon, or None if it is gone."""
    try:
        hwm = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        return hwm, len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Mount:
    """One mounted system (or the native directory). root is where workloads run."""

    def __init__(self, bench, system, stack):
        self.bench = bench
        self.system = system
        self.stack = stack
        self.pid = None
        self.device = None
        self.mounted = False
        self.hung = False  # a command timed out on this mount: end the daemon before umount
        data, run = bench.data, bench.run
        if system == "native":
            self.root = os.path.join(data, "native") if stack == "two" else os.path.join(
                data, "lower-share")
            return
        self.mountpoint = os.path.join(run, f"mnt-{system}")
        self.upper = os.path.join(run, system, "upper")
        self.work = os.path.join(run, system, "work")
        self.root = self.mountpoint
        for d in (self.upper, self.work):
            if os.path.exists(d):
                run_checked(["rm", "-rf", "--one-file-system", d])
            os.makedirs(d)
        os.makedirs(self.mountpoint, exist_ok=True)
        if stack == "two":
            cwd = data
            lowers = [os.path.join(data, "lower-include"), os.path.join(data, "lower-share")]
        else:
            # Relative names keep 128 lowers inside the kernel's one-page limit on mount options.
            cwd = os.path.join(data, "stack")
            lowers = sorted(os.listdir(cwd))
        opts = f"lowerdir={':'.join(lowers)},upperdir={self.upper},workdir={self.work}"
        if system == "kernel":
            argv = ["mount", "-t", "overlay", "overlay", "-o", opts, self.mountpoint]
        elif system == "fuse-overlayfs":
            argv = ["fuse-overlayfs", "-o", opts, self.mountpoint]
        else:
            argv = [bench.rsfs_bin, "-o", opts, self.mountpoint]
        bench.mounts.add(self.mountpoint)
        try:
            r = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            self.close()
            raise BenchError(f"mount of {system} timed out after 60 s") from None
        if r.returncode != 0:
            self.close()
            raise BenchError(f"mount of {system} failed (exit {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
        deadline = time.monotonic() + 10
        while True:
            entry = mount_entry(self.mountpoint)
            if entry:
                self.device = entry[0]
                break
            if time.monotonic() > deadline:
                self.close()
                raise BenchError(f"{system}: the mount did not appear in mountinfo within 10 s")
            time.sleep(0.02)
        self.mounted = True
        if system in FUSE_SYSTEMS:
            self.pid = find_daemon(DAEMON_NAMES[system], self.mountpoint)
            if self.pid is None:
                bench.note(f"{system}: could not find the daemon's pid (no RSS/fd figures)")

    def stats(self):
        return daemon_stats(self.pid) if self.pid else None

    def close(self):
        """Unmounts, waits for the daemon to exit, removes upper and work."""
        if self.system == "native":
            return
        bench = self.bench
        if self.hung and self.pid:
            # Requests already read by a hung daemon block their callers, and umount(8) too,
            # until the connection ends.
            bench.note(f"{self.system}: a command hung; killed daemon {self.pid} to unmount")
            self.abort()
        if mount_entry(self.mountpoint):
            error = None
            for _ in range(10):
                p = subprocess.Popen(["umount", self.mountpoint], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
                try:
                    _, err = p.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    bench.note(f"{self.system}: umount hung for 30 s; killed daemon {self.pid}")
                    self.abort()  # ends the connection, which releases the blocked umount
                    kill_group(p)
                    break
                if p.returncode == 0:
                    break
                error = err.strip()
                time.sleep(0.3)
            else:
                bench.note(f"{self.system}: umount kept failing ({error}); lazily unmounted")
            self.lazy_umount()
        if self.pid:
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if pid_alive(self.pid):
                bench.note(f"{self.system}: daemon {self.pid} still running 10 s after umount; "
                           "killed it")
                self.abort()
        self.pid = None
        self.mounted = False
        for d in (self.upper, self.work):
            if os.path.exists(d):
                subprocess.run(["rm", "-rf", "--one-file-system", d], stderr=subprocess.DEVNULL)

    def abort(self):
        """Ends a hung FUSE connection: through fusectl where it is mounted, and by killing the
        daemon this benchmark started (its /dev/fuse closing ends the connection too)."""
        if self.device:
            minor = self.device.split(":")[1]
            try:
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass
        if self.pid and pid_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
            deadline = time.monotonic() + 10
            while pid_alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        self.lazy_umount()

    def lazy_umount(self):
        if mount_entry(self.mountpoint):
            try:
                subprocess.run(["umount", "-l", self.mountpoint], stderr=subprocess.DEVNULL,
                               timeout=30)
            except subprocess.TimeoutExpired:
                self.bench.note(f"umount -l {self.mountpoint} hung")


# ---------------------------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------------------------

def run_timed(argv, timeout, cwd=None):
    """Runs argv in its own process group; returns (seconds, stdout). Raises BenchError on a
    non-zero exit or a timeout (the whole group is killed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(p)
        raise BenchError(f"TIMEOUT after {timeout} s: {short(argv)}") from None
    elapsed = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"exit {p.returncode}: {short(argv)}: {err.strip()[-600:]}")
    return elapsed, out


def kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def short(argv):
    s = " ".join(argv)
    return s if len(s) < 200 else s[:200] + "..."


def sh(script, timeout):
    return run_timed(["bash", "-c", "set -euo pipefail; " + script], timeout)[0]


def q(path):
    return "'" + path.replace("'", "'\\''") + "'"


def pyop(timeout, *args):
    """Runs one of this file's timed micro-workloads in a child; returns its own timing (the
    interpreter's start-up is left out)."""
    _, out = run_timed([sys.executable, os.path.abspath(__file__), "op", *map(str, args)], timeout)
    for line in out.splitlines():
        if line.startswith("elapsed="):
            return float(line.split("=", 1)[1])
    raise BenchError(f"op {args[0]} printed no timing")


# The micro-workloads, run as `bench.py op NAME ...` in a child process.
def op_main(args):
    name, rest = args[0], args[1:]
    if name == "append":  # root listfile: append one byte to each listed file (copy-up)
        root, entries = rest[0], read_list(rest[1])
        t0 = time.perf_counter()
        for rel, _ in entries:
            fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"\n")
            os.close(fd)
    elif name == "truncate":  # root listfile: undo append (native baseline)
        root, entries = rest[0], read_list(rest[1])
        t0 = time.perf_counter()
        for rel, size in entries:
            os.truncate(os.path.join(root, rel), size)
    elif name == "create-fsync":  # dir count: create, write 4 KiB, fsync, close
        d, count = rest[0], int(rest[1])
        block = random.Random(1).randbytes(4096)
        t0 = time.perf_counter()
        os.mkdir(d)
        for i in range(count):
            fd = os.open(os.path.join(d, f"f{i:05d}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, block)
            os.fsync(fd)
            os.close(fd)
    elif name == "missing":  # root dirsfile count: stat names that do not exist
        root, count = rest[0], int(rest[2])
        with open(rest[1]) as f:
            dirs = [os.path.join(root, line.strip()) for line in f if line.strip()]
        t0 = time.perf_counter()
        for i in range(count):
            path = os.path.join(dirs[i % len(dirs)], f"missing-{i}.h")
            try:
                os.stat(path)
            except FileNotFoundError:
                continue
            raise SystemExit(f"{path} exists")
    else:
        raise SystemExit(f"unknown op {name}")
    print(f"elapsed={time.perf_counter() - t0:.6f}")


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------

class Workload:
    """mode: 'cold' (fresh mount, caches dropped, each run), 'fresh' (fresh mount each run:
    the workload mutates), 'warm' (one mount, one untimed run, then the timed runs).
    run(bench, root) -> seconds. meta: the row counts toward the daemons' RSS/fd figures."""

    def __init__(self, key, label, mode, run, stack="two", warmup=None, prepare=None,
                 restore=None, meta=False):
        self.key, self.label, self.mode, self.stack = key, label, mode, stack
        self.run, self.warmup, self.prepare, self.restore, self.meta = (
            run, warmup, prepare, restore, meta)


def w_find(b, root):
    return sh(f"find {q(root)} -ls > /dev/null", b.timeout)


def w_find_share(b, root):
    return sh(f"find {q(os.path.join(root, 'share'))} -ls > /dev/null", b.timeout)


def w_lsr(b, root):
    return sh(f"ls -lR {q(root)} > /dev/null", b.timeout)


def w_missing(b, root):
    return pyop(b.timeout, "missing", root, os.path.join(b.data, "lookup-dirs.list"),
                b.scale["lookups"])


def w_tar(b, root):
    return sh(f"tar -cf - -C {q(root)} share include rmtree | cat > /dev/null", b.timeout)


PARALLEL_SUBTREES = ("doc", "locale", "man", "icons")


def w_parallel(b, root):
    t0 = time.perf_counter()
    procs = []
    for sub in PARALLEL_SUBTREES:
        script = (f"set -euo pipefail; tar -cf - -C {q(os.path.join(root, 'share'))} {sub} "
                  "| cat > /dev/null")
        procs.append(subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True, text=True))
    errors = []
    deadline = time.monotonic() + b.timeout
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in procs:
                kill_group(other)
            raise BenchError(f"TIMEOUT after {b.timeout} s: parallel tar readers") from None
        if p.returncode != 0:
            errors.append(f"exit {p.returncode}: {err.strip()[-300:]}")
    elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError("parallel tar: " + "; ".join(errors))
    return elapsed


def w_seq(b, root):
    return sh(f"dd if={q(os.path.join(root, 'big', 'big.bin'))} of=/dev/null bs=1M status=none",
              b.timeout)


def w_rand(b, root):
    argv = ["fio", "--name=rand4k", f"--filename={os.path.join(root, 'big', 'big.bin')}",
            "--readonly", "--rw=randread", "--bs=4k", "--ioengine=psync", "--invalidate=0",
            "--time_based", f"--runtime={b.scale['fio_runtime']}", "--randseed=42",
            "--output-format=json"]
    _, out = run_timed(argv, b.timeout)
    try:
        result = json.loads(out[out.index("{"):])
        iops = result["jobs"][0]["read"]["iops"]
    except (ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio: cannot read its JSON output ({e})") from None
    if iops <= 0:
        raise BenchError("fio reported 0 IOPS")
    return RANDOM_IOS / iops


def w_untar(b, root):
    return sh(f"tar -xf {q(os.path.join(b.data, 'untar.tar'))} -C {q(root)}", b.timeout)


def r_untar(b, root):
    run_checked(["rm", "-rf", os.path.join(root, "srctree")])


def w_write(b, root):
    mib = b.scale["big"] >> 20
    return sh(f"dd if=/dev/zero of={q(os.path.join(root, 'written.bin'))} bs=1M count={mib} "
              "conv=fsync status=none", b.timeout)


def r_write(b, root):
    os.unlink(os.path.join(root, "written.bin"))


def w_copyup_small(b, root):
    return pyop(b.timeout, "append", root, os.path.join(b.data, "copyup-small.list"))


def r_copyup_small(b, root):
    pyop(b.timeout, "truncate", root, os.path.join(b.data, "copyup-small.list"))


def p_copyup_big(b, system):
    # The lower file's pages are cached before every run: the row measures the copy, not the disk.
    src = os.path.join(b.data, "native" if system == "native" else "lower-share", "big",
                       "copyup.bin")
    sh(f"cat {q(src)} > /dev/null", b.timeout)


def w_copyup_big(b, root):
    return pyop(b.timeout, "append", root, os.path.join(b.data, "copyup-big.list"))


def r_copyup_big(b, root):
    pyop(b.timeout, "truncate", root, os.path.join(b.data, "copyup-big.list"))


def w_fsync(b, root):
    return pyop(b.timeout, "create-fsync", os.path.join(root, "fsync-test"),
                b.scale["fsync_files"])


def r_fsync(b, root):
    run_checked(["rm", "-rf", os.path.join(root, "fsync-test")])


def w_rm(b, root):
    return sh(f"rm -rf {q(os.path.join(root, 'rmtree'))}", b.timeout)


def r_rm(b, root):
    run_checked(["cp", "-a", os.path.join(b.data, "lower-share", "rmtree"), root + "/"])


def workloads(scale):
    big = human_bytes(scale["big"])
    n = scale["files"]
    layers = scale["stack_layers"]
    return [
        Workload("find", f"find + stat, whole tree ({n:,} files), cold", "cold", w_find, meta=True),
        Workload("lsr", "ls -lR, whole tree, warm", "warm", w_lsr, meta=True),
        Workload("lookup", f"{scale['lookups']:,} lookups of missing names", "fresh", w_missing,
                 meta=True),
        Workload("find128", f"find + stat, {layers} lowers, cold", "cold", w_find_share,
                 stack="many", meta=True),
        Workload("tar", "read every small file (tar), warm", "warm", w_tar),
        Workload("parallel", "4 parallel tar readers of different subtrees, warm", "warm",
                 w_parallel),
        Workload("seqcold", f"sequential read {big} (dd bs=1M), cold", "cold", w_seq),
        Workload("seqwarm", f"sequential read {big} (dd bs=1M), warm", "warm", w_seq),
        Workload("rand", f"random 4 KiB reads of {big} (fio), s per {RANDOM_IOS // 1000}k reads",
                 "warm", w_rand, warmup=w_seq),
        Workload("untar", f"untar {scale['untar_files']:,} files", "fresh", w_untar,
                 restore=r_untar),
        Workload("write", f"write {big} + fsync (dd conv=fsync)", "fresh", w_write,
                 restore=r_write),
        Workload("copyup", f"copy-up {scale['copyup_files']:,} small files (append 1 byte)",
                 "fresh", w_copyup_small, restore=r_copyup_small),
        Workload("copyupbig", f"copy-up {human_bytes(scale['copyup_big'])} file (append 1 byte)",
                 "fresh", w_copyup_big, prepare=p_copyup_big, restore=r_copyup_big),
        Workload("fsync", f"{scale['fsync_files']:,} × create + write 4 KiB + fsync", "fresh",
                 w_fsync, restore=r_fsync),
        Workload("rm", f"rm -rf a {scale['rm_files']:,}-file lower tree", "fresh", w_rm,
                 restore=r_rm),
    ]


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.mode = "smoke" if args.smoke else "full"
        self.scale = dict(SCALES[self.mode])
        if args.runs:
            self.scale["runs"] = args.runs
        self.runs = self.scale["runs"]
        self.timeout = args.timeout or self.scale["timeout"]
        self.dir = os.path.abspath(args.dir)
        self.data = os.path.join(self.dir, f"data-{self.mode}")
        self.run = os.path.join(self.dir, "run")
        self.rsfs_bin = args.rsfs_bin
        self.systems = args.systems
        self.workloads = args.workloads
        self.mounts = set()
        self.notes = []
        self.results = {}  # (workload key, system) -> list of seconds, or an error string
        self.daemon = {}  # (stack, system) -> [max VmHWM KiB, max fds]
        self.rsfs_version = self.describe_rsfs() if "rsfs" in self.systems else None

    def describe_rsfs(self):
        """The binary's version and, taken now (run.sh has just built it), the source's commit."""
        r = subprocess.run([self.rsfs_bin, "--version"], capture_output=True, text=True)
        version = r.stdout.strip() or "rsfs-overlay ?"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        g = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"],
                           capture_output=True, text=True)
        if g.returncode == 0 and g.stdout.strip():
            version += f" (git {g.stdout.strip()})"
        return version

    def note(self, msg):
        log("NOTE: " + msg)
        self.notes.append(msg)

    def native_dirty(self, dirty):
        marker = os.path.join(self.data, "native.dirty")
        if dirty:
            open(marker, "w").close()
        elif os.path.exists(marker):
            os.unlink(marker)

    def record_daemon(self, wl, mount):
        if not wl.meta or mount.system not in FUSE_SYSTEMS:
            return
        st = mount.stats()
        if not st:
            return
        cur = self.daemon.setdefault((wl.stack, mount.system), [0, 0])
        cur[0] = max(cur[0], st[0] or 0)
        cur[1] = max(cur[1], st[1])

    def timed(self, wl, mount):
        try:
            return wl.run(self, mount.root)
        except BenchError as e:
            if str(e).startswith("TIMEOUT"):
                mount.hung = True
            raise

    def measure(self, wl, system):
        """Runs one workload on one system; returns the list of timed runs."""
        times = []
        mutates_native = system == "native" and wl.restore is not None
        if wl.mode == "warm":
            m = Mount(self, system, wl.stack)
            try:
                try:
                    (wl.warmup or wl.run)(self, m.root)
                except BenchError as e:
                    m.hung = str(e).startswith("TIMEOUT")
                    raise
                for _ in range(self.runs):
                    os.sync()
                    times.append(self.timed(wl, m))
                self.record_daemon(wl, m)
            finally:
                m.close()
            return times
        for _ in range(self.runs):
            m = Mount(self, system, wl.stack)
            try:
                if wl.prepare:
                    wl.prepare(self, system)
                if wl.mode == "cold":
                    drop_caches()
                else:
                    os.sync()
                if mutates_native:
                    self.native_dirty(True)
                times.append(self.timed(wl, m))
                self.record_daemon(wl, m)
            finally:
                try:
                    if mutates_native:
                        wl.restore(self, m.root)
                        self.native_dirty(False)
                finally:
                    m.close()
        return times

    def execute(self):
        os.makedirs(self.run, exist_ok=True)
        selected = [w for w in workloads(self.scale)
                    if not self.workloads or w.key in self.workloads]
        for wl in selected:
            for system in self.systems:
                t0 = time.monotonic()
                try:
                    times = self.measure(wl, system)
                    self.results[(wl.key, system)] = times
                    log(f"{wl.key:<10} {system:<15} " + " ".join(f"{t:.3f}" for t in times) +
                        f"  (median {statistics.median(times):.3f}; "
                        f"{time.monotonic() - t0:.1f} s with set-up)")
                except (BenchError, OSError) as e:
                    self.results[(wl.key, system)] = str(e)
                    log(f"{wl.key:<10} {system:<15} FAILED: {e}")
        return selected

    def table(self, selected):
        cols = [s for s in SYSTEMS if s in self.systems]
        head = {"native": "native s", "kernel": "kernel s",
                "fuse-overlayfs": "fuse-overlayfs s (×kernel)",
                "rsfs": "rsfs-overlay s (×kernel)"}
        lines = ["| workload | " + " | ".join(head[c] for c in cols) + " |",
                 "|---|" + "---:|" * len(cols)]

        def cell(key, system):
            r = self.results.get((key, system))
            if r is None:
                return "–"
            if isinstance(r, str):
                return "TIMEOUT" if r.startswith("TIMEOUT") else "FAIL"
            v = statistics.median(r)
            text = f"{v:.3f}" if v >= 0.01 else f"{v:.5f}"
            k = self.results.get((key, "kernel"))
            if system in FUSE_SYSTEMS and isinstance(k, list) and statistics.median(k) > 0:
                text += f" ({v / statistics.median(k):.2f}×)"
            return text

        def daemon_rows(stack, layers_label):
            if not any((stack, s) in self.daemon for s in FUSE_SYSTEMS):
                return
            for idx, what, fmt in ((0, "peak RSS, MiB (VmHWM)", lambda v: f"{v / 1024:.1f}"),
                                   (1, "open fds", str)):
                row = [f"daemon {what}, after the metadata rows, {layers_label}"]
                for c in cols:
                    d = self.daemon.get((stack, c))
                    row.append(fmt(d[idx]) if d else "–")
                lines.append("| " + " | ".join(row) + " |")

        meta_done = False
        for wl in selected:
            if not wl.meta and not meta_done:
                daemon_rows("two", "2 lowers")
                daemon_rows("many", f"{self.scale['stack_layers']} lowers")
                meta_done = True
            lines.append(f"| {wl.label} | " + " | ".join(cell(wl.key, c) for c in cols) + " |")
        if not meta_done:
            daemon_rows("two", "2 lowers")
            daemon_rows("many", f"{self.scale['stack_layers']} lowers")
        return "\n".join(lines)

    def preamble(self):
        with open(os.path.join(self.data, "meta.json")) as f:
            meta = json.load(f)
        versions = []
        if "fuse-overlayfs" in self.systems:
            r = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, text=True)
            found = [line.strip() for line in (r.stdout + r.stderr).splitlines()
                     if line.startswith("fuse-overlayfs")]
            versions.append(found[0] if found else "fuse-overlayfs ?")
        if self.rsfs_version:
            versions.append(self.rsfs_version)
        s = self.scale
        return "\n".join([
            f"## rsfs-overlay comparison benchmark ({self.mode})",
            "",
            f"- machine: Linux {os.uname().release}, {os.cpu_count()} cores; data in {self.data}",
            f"- data: {meta['share_files']:,} small files ({human_bytes(meta['share_bytes'])}, "
            f"0–64 KiB) in a /usr/share-like tree + a {s['include_files']:,}-file "
            f"/usr/include-like lower; {human_bytes(s['big'])} and {human_bytes(s['copyup_big'])} files; "
            f"{meta['files']:,} files, {meta['dirs']:,} dirs, {human_bytes(meta['bytes'])} in all",
            f"- median of {self.runs} run(s), wall seconds, lower is better; a fresh mount for "
            "every run of the cold and mutating rows; (×kernel) = time / kernel overlayfs's time",
            "- " + "; ".join(versions) if versions else "-",
            "",
        ])

    def cleanup(self):
        for mp in sorted(self.mounts, reverse=True):
            if mount_entry(mp):
                try:
                    subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL, timeout=30)
                except subprocess.TimeoutExpired:
                    log(f"umount -l {mp} hung")


def parse_args(argv):
    keys = [w.key for w in workloads(SCALES["full"])]
    p = argparse.ArgumentParser(
        prog="benches/run.sh",
        description="Times rsfs-overlay against fuse-overlayfs, kernel overlayfs and a plain "
                    "directory on generated data and prints a Markdown table (median seconds, "
                    "lower is better).",
        epilog="workloads: " + ", ".join(keys))
    p.add_argument("--dir", default="/var/tmp/rsfs-bench",
                   help="where data and mounts live (default /var/tmp/rsfs-bench); the data is "
                        "generated once and reused")
    p.add_argument("--smoke", action="store_true",
                   help="tiny data, one run each: checks that every workload works (CI)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated subset of native,kernel,fuse-overlayfs,rsfs")
    p.add_argument("--only", default="", metavar="WORKLOAD[,...]",
                   help="run only these rows (see the list below)")
    p.add_argument("--runs", type=int, default=0, help="runs per measurement (default 3, smoke 1)")
    p.add_argument("--timeout", type=float, default=0,
                   help="seconds one command may take before it counts as hung (default 600, "
                        "smoke 120)")
    p.add_argument("--rsfs-bin", default=os.environ.get("RSFS_BIN", ""),
                   help="the rsfs-overlay binary (run.sh passes the one it built)")
    args = p.parse_args(argv)
    systems = []
    for name in filter(None, args.systems.split(",")):
        if name not in SYSTEM_ALIASES:
            p.error(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
        if SYSTEM_ALIASES[name] not in systems:
            systems.append(SYSTEM_ALIASES[name])
    if not systems:
        p.error("--systems is empty")
    args.systems = [s for s in SYSTEMS if s in systems]
    args.workloads = [k for k in args.only.split(",") if k]
    unknown = [k for k in args.workloads if k not in keys]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(keys)}")
    if "rsfs" in args.systems and not args.rsfs_bin:
        p.error("--rsfs-bin (or RSFS_BIN) is needed to benchmark rsfs-overlay")
    if args.runs < 0 or args.timeout < 0:
        p.error("--runs and --timeout must be positive")
    return args


def main(argv):
    if argv and argv[0] == "op":
        op_main(argv[1:])
        return 0
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("must run as root (mounts, drop_caches)")
        return 2
    bench = Bench(args)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    t0 = time.monotonic()
    try:
        ensure_data(bench.data, bench.scale)
        selected = bench.execute()
    finally:
        bench.cleanup()
    print(bench.preamble())
    print(bench.table(selected))
    failures = [(k, s, r) for (k, s), r in bench.results.items() if isinstance(r, str)]
    if failures or bench.notes:
        print()
    for k, s, r in failures:
        print(f"- FAILED {k} on {s}: {r}")
    for n in bench.notes:
        print(f"- note: {n}")
    log(f"done in {time.monotonic() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
