#!/usr/bin/env bash
# Builds rsfs-overlay in release mode and installs it system-wide:
#   $PREFIX/bin/rsfs-overlay                 (PREFIX defaults to /usr/local)
#   $PREFIX/share/man/man1/rsfs-overlay.1
# DESTDIR is honoured for packaging. Run as root (or with sudo) for the default PREFIX.
#
# No /sbin/mount.fuse.rsfs-overlay helper is needed: `mount -t fuse.rsfs-overlay ...` and fstab
# entries go through fuse3's mount.fuse3 (/sbin/mount.fuse), which runs `rsfs-overlay` from PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
bindir="$DESTDIR$PREFIX/bin"
man1dir="$DESTDIR$PREFIX/share/man/man1"

echo "==== Building (cargo build --release) ===="
cargo build --release --bin rsfs-overlay

echo "==== Installing into $DESTDIR$PREFIX ===="
install -d "$bindir" "$man1dir"
install -m755 target/release/rsfs-overlay "$bindir/rsfs-overlay"
install -m644 doc/rsfs-overlay.1 "$man1dir/rsfs-overlay.1"
echo "installed $bindir/rsfs-overlay"
echo "installed $man1dir/rsfs-overlay.1"

if [ -z "$DESTDIR" ] && command -v mandb >/dev/null 2>&1; then
    mandb -q "$PREFIX/share/man" 2>/dev/null || true
fi

PATH="$PATH:/usr/sbin:/sbin"
if ! command -v fusermount3 >/dev/null 2>&1 || ! command -v mount.fuse3 >/dev/null 2>&1; then
    echo "note: fuse3 is not installed; rsfs-overlay needs it at run time (apt-get install fuse3)" >&2
fi
