#!/usr/bin/env bash
# How fast `rsfs-overlay usage` answers on a large writable layer: builds an upper of N files
# (default 100,000, in 100 directories), then for a mount without a cap and one with
# upper_limit= prints a Markdown table: the mount's start, the first query and the median of
# the next ten, next to `du -s` of the same upper. A benchmark, not a test: it never fails on a
# time. Needs root (FUSE mounts for other users' use are not needed, but /dev/fuse is).
#
#   benches/usage.sh [--files N] [--dir DIR]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
files=100000
dir=/var/tmp/rsfs-usage-bench
while [ $# -gt 0 ]; do
    case $1 in
        --files) files=${2:?--files needs a number}; shift ;;
        --dir) dir=${2:?--dir needs a value}; shift ;;
        -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "usage.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done
bin=${RSFS_BIN:-$repo/target/release/rsfs-overlay}
if [ -z "${RSFS_BIN:-}" ]; then
    (cd "$repo" && cargo build --release --quiet)
fi
mkdir -p "$dir"
run=$(mktemp -d "$dir/run.XXXXXX")
cleanup() {
    fusermount3 -u "$run/m" 2>/dev/null || umount -l "$run/m" 2>/dev/null || true
    rm -rf "$run"
}
trap cleanup EXIT
mkdir -p "$run"/{l,u,w,m}
python3 - "$run/u" "$files" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
per = max(1, n // 100)
for i in range(n):
    d = os.path.join(root, f"d{i // per}")
    if i % per == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i}"), "w") as f:
        f.write("x" * (i % 5000))
PY

# Timestamps from bash itself ($EPOCHREALTIME), so no helper's start-up is timed.
secs() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) * 1000 }'; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

t0=$(secs); du -s -B1 "$run/u" >/dev/null; t1=$(secs)
du_ms=$(elapsed "$t0" "$t1")
echo "| mount | start ms | first usage ms | next usage ms (median of 10) | du -s ms |"
echo "|---|---:|---:|---:|---:|"
for opts in "" ",upper_limit=1T"; do
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t0=$(secs)
    "$bin" -o "lowerdir=$run/l,upperdir=$run/u,workdir=$run/w$opts" "$run/m" 2>/dev/null
    t1=$(secs)
    "$bin" usage "$run/m" >/dev/null
    t2=$(secs)
    next=$(for _ in $(seq 10); do
        a=$(secs); "$bin" usage "$run/m" >/dev/null; b=$(secs); elapsed "$a" "$b"
    done | median)
    label=${opts#,}
    echo "| ${label:-no cap} | $(elapsed "$t0" "$t1") | $(elapsed "$t1" "$t2") | $next | $du_ms |"
    fusermount3 -u "$run/m"
done
echo
echo "$files files in the upper; $(nproc) cores; $(uname -r)"
