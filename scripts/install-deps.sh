#!/usr/bin/env bash
# Installs the system packages that building and testing rsfs-overlay need, on Debian or Ubuntu, and
# loads the overlay kernel module. Skips apt when every needed command is already present, so a
# second run costs nothing. Run as root, or as a user with sudo.
#
# Shared by scripts/test.sh (the README's test command) and .ci/run:
#   bash scripts/install-deps.sh              run it
#   source scripts/install-deps.sh            only define install_deps and load_overlay_module

# Each entry is COMMAND:PACKAGE, the command the tests or the build call and the Debian package
# that provides it. Checked command by command, so a machine missing only one still gets it.
RSFS_DEPS=(
    fusermount3:fuse3           # unmounting FUSE mounts, unprivileged mounting
    mount.fuse3:fuse3           # mount -t fuse.rsfs-overlay
    fuse-overlayfs:fuse-overlayfs # compatibility tests and benchmarks
    getfattr:attr               # inspecting overlay xattrs in tests
    setfattr:attr
    modprobe:kmod               # loading the overlay module for differential tests
    mount:mount                 # kernel overlayfs mounts, mount -t fuse.*
    umount:mount
    cc:gcc                      # the linker cargo calls
    podman:podman               # tests/podman.rs: podman as a client (mount_program = ours)
    buildah:buildah             # podman build's companion tools
    runc:runc                   # the OCI runtime tests/podman.rs asks podman for
    busybox:busybox-static      # the static busybox the podman test's image is made of
    newuidmap:uidmap            # podman's user-namespace helpers
    python3:python3             # tests/locks.rs: the second process that asks for locks
    strace:strace               # tests/options_volatile.rs: no sync reaches the upper
    fincore:util-linux          # tests/passthrough.rs: which pages a mount caches
)

# The packages installed when anything is missing: all of them at once (apt skips those present).
RSFS_PACKAGES=(fuse3 fuse-overlayfs attr kmod mount gcc podman buildah runc busybox-static uidmap python3 strace)

# mount.fuse3 and modprobe live in sbin, which a non-root PATH may lack.
rsfs_path_with_sbin() {
    local d
    for d in /usr/local/sbin /usr/sbin /sbin; do
        case ":$PATH:" in
            *":$d:"*) ;;
            *) PATH="$PATH:$d" ;;
        esac
    done
    export PATH
}

# Prints the commands from RSFS_DEPS that are not on PATH, space separated (nothing if none).
rsfs_missing_commands() {
    local dep missing=()
    for dep in "${RSFS_DEPS[@]}"; do
        command -v "${dep%%:*}" >/dev/null 2>&1 || missing+=("${dep%%:*}")
    done
    echo "${missing[*]}"
}

install_deps() {
    rsfs_path_with_sbin
    local missing
    missing=$(rsfs_missing_commands)
    if [ -z "$missing" ]; then
        echo "install-deps: all needed commands present; skipping apt"
        return 0
    fi
    echo "install-deps: missing commands: $missing"
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: error: no apt-get here; install these packages by hand: ${RSFS_PACKAGES[*]}" >&2
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "install-deps: error: not root and no sudo; as root run: apt-get install ${RSFS_PACKAGES[*]}" >&2
            return 1
        fi
    fi
    local try
    for try in 1 2 3; do
        if "${sudo[@]}" apt-get -q update </dev/null; then
            break
        fi
        if [ "$try" -eq 3 ]; then
            echo "install-deps: error: apt-get update failed 3 times" >&2
            return 1
        fi
        echo "install-deps: apt-get update failed; retrying in $((try * 5))s" >&2
        sleep $((try * 5))
    done
    local packages=("${RSFS_PACKAGES[@]}")
    # fincore moved from util-linux to util-linux-extra (Debian 12, Ubuntu 24.04); older
    # releases have it in util-linux, which is always installed.
    if apt-cache show util-linux-extra >/dev/null 2>&1; then
        packages+=(util-linux-extra)
    fi
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -q install -y --no-install-recommends "${packages[@]}" </dev/null
    missing=$(rsfs_missing_commands)
    if [ -n "$missing" ]; then
        echo "install-deps: error: still missing after apt-get install: $missing" >&2
        return 1
    fi
    echo "install-deps: installed ${packages[*]}"
}

# Best effort: in a container modprobe may fail while the host already has the module loaded, so
# the caller decides whether a missing overlayfs is fatal (`.ci/run` does under CI).
load_overlay_module() {
    rsfs_path_with_sbin
    if ! grep -qw overlay /proc/filesystems 2>/dev/null; then
        if [ "$(id -u)" -eq 0 ] && command -v modprobe >/dev/null 2>&1; then
            modprobe overlay || true
        fi
    fi
    if grep -qw overlay /proc/filesystems 2>/dev/null; then
        echo "install-deps: kernel overlayfs available"
    else
        echo "install-deps: warning: kernel overlayfs not available (modprobe overlay failed); differential tests will fail" >&2
    fi
    if [ -c /dev/fuse ]; then
        echo "install-deps: /dev/fuse present"
    else
        echo "install-deps: warning: /dev/fuse missing; mounted tests will fail" >&2
    fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    install_deps
    load_overlay_module
fi
