#!/usr/bin/env bash
# The comparison benchmark: rsfs-overlay against fuse-overlayfs (the Debian package), the kernel's
# overlayfs and a plain directory (the lowers copied into one), on deterministic data it generates
# once under --dir. Prints one Markdown table of median seconds (lower is better) with each FUSE
# system's ratio to kernel overlayfs, and the daemons' peak RSS and open fds.
#
#   benches/run.sh                      full run (about 10 minutes on 2 cores)
#   benches/run.sh --smoke              tiny data, one run each (what CI runs; under a minute)
#   benches/run.sh --systems kernel,rsfs --only find,tar --runs 5
#   benches/run.sh --help               every option and workload
#
# Needs root. Installs fio and fuse-overlayfs with apt-get when missing and builds rsfs-overlay
# with `cargo build --release` (set RSFS_BIN to use another binary). The work lives in
# bench.py; this script sets up, holds a lock on --dir, and always unmounts what was mounted
# under it and removes its run directory on exit. Exits non-zero only when a workload failed
# outright, never because of a time.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "run.sh: $*" >&2; }
die() { say "error: $*"; exit 2; }

for arg in "$@"; do
    case $arg in
        -h | --help) exec python3 "$here/bench.py" --help ;;
    esac
done

# The options this script needs to know; all of them go on to bench.py, which checks them.
dir=/var/tmp/rsfs-bench
systems=native,kernel,fuse-overlayfs,rsfs
only=
args=("$@")
while [ $# -gt 0 ]; do
    case $1 in
        --dir) dir=${2:?--dir needs a value}; shift ;;
        --dir=*) dir=${1#--dir=} ;;
        --systems) systems=${2:?--systems needs a value}; shift ;;
        --systems=*) systems=${1#--systems=} ;;
        --only) only=${2:?--only needs a value}; shift ;;
        --only=*) only=${1#--only=} ;;
    esac
    shift
done
[ "$(id -u)" -eq 0 ] || die "run as root (the benchmark mounts filesystems and drops caches)"

wants() { # wants SYSTEM: is it among --systems (by any of its names)?
    local s
    for s in ${systems//,/ }; do
        case "$1:$s" in
            rsfs:rsfs | rsfs:rsfs-overlay) return 0 ;;
            fuse:fuse-overlayfs | fuse:fuse | fuse:fovl) return 0 ;;
        esac
    done
    return 1
}

# --- tools -------------------------------------------------------------------------------------
need=()
command -v python3 >/dev/null || need+=(python3)
command -v tar >/dev/null || need+=(tar)
command -v find >/dev/null || need+=(findutils)
if [ -z "$only" ] || [[ ",$only," == *,rand,* ]]; then
    command -v fio >/dev/null || need+=(fio)
fi
if wants fuse; then
    command -v fuse-overlayfs >/dev/null || need+=(fuse-overlayfs)
fi
if wants fuse || wants rsfs; then
    command -v fusermount3 >/dev/null || need+=(fuse3)
fi
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    command -v apt-get >/dev/null || die "apt-get not found; install ${need[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -q update </dev/null >&2 || say "apt-get update failed; trying the install anyway"
    apt-get -q install -y --no-install-recommends "${need[@]}" </dev/null >&2 ||
        die "apt-get install ${need[*]} failed"
fi
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
if { wants fuse || wants rsfs; } && [ ! -c /dev/fuse ]; then
    die "/dev/fuse is missing; the FUSE systems cannot be mounted"
fi

rsfs_bin=
if wants rsfs; then
    if [ -n "${RSFS_BIN:-}" ]; then
        rsfs_bin=$RSFS_BIN
    else
        target=${CARGO_TARGET_DIR:-$repo/target}
        case $target in /*) ;; *) target=$repo/$target ;; esac
        if command -v cargo >/dev/null; then
            say "building rsfs-overlay (cargo build --release)"
            (cd "$repo" && cargo build --release --quiet) >&2 || die "cargo build --release failed"
        elif [ -x "$target/release/rsfs-overlay" ]; then
            say "cargo not found; using the existing $target/release/rsfs-overlay"
        fi
        rsfs_bin=$target/release/rsfs-overlay
    fi
    [ -x "$rsfs_bin" ] || die "no rsfs-overlay binary at $rsfs_bin"
fi

# --- lock, cleanup -----------------------------------------------------------------------------
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
run=$dir/run
exec 9>"$dir/.lock"
flock -n 9 || die "another benchmark is using $dir"

# Lazily unmounts every mount under the run directory, deepest first, then removes it without
# crossing into anything still mounted.
unmount_all() {
    local mp
    [ -d "$run" ] || return 0
    awk -v r="$run/" '{
            mp = $5
            while (match(mp, /\\[0-7][0-7][0-7]/)) {
                c = sprintf("%c", (substr(mp, RSTART + 1, 1) * 64) + (substr(mp, RSTART + 2, 1) * 8) + substr(mp, RSTART + 3, 1))
                mp = substr(mp, 1, RSTART - 1) c substr(mp, RSTART + 4)
            }
            if (index(mp, r) == 1) print mp
        }' /proc/self/mountinfo | sort -r | while IFS= read -r mp; do
        say "unmounting $mp"
        umount -l "$mp" || say "umount -l $mp failed"
    done
    rm -rf --one-file-system "$run" || say "could not remove $run"
}

child=
# shellcheck disable=SC2317 # reached through the traps
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    unmount_all
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

unmount_all # leftovers of an earlier run that was killed hard
mkdir -p "$run"

# In the background and waited for, so that a signal reaches the trap at once.
python3 "$here/bench.py" "${args[@]}" --dir "$dir" --rsfs-bin "$rsfs_bin" &
child=$!
set +e
wait "$child"
rc=$?
set -e
child=
exit "$rc"
