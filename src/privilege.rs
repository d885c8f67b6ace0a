//! What the daemon may do where it runs: whether `trusted.*` xattrs are within its reach.
//!
//! Rootless runtimes start us as root of a user namespace. There the kernel hides and refuses
//! `trusted.*` xattrs (they need CAP_SYS_ADMIN in the initial namespace), so the overlay's
//! metadata must live in `user.overlay.*`, the format the kernel's own overlayfs uses there
//! (`userxattr`). fuse-overlayfs makes the same switch on its own; so do we.

use std::fs;

/// The uid map of the initial user namespace: every id maps to itself.
const IDENTITY_MAP: (u64, u64, u64) = (0, 0, 4_294_967_295);

/// True when `trusted.*` xattrs are out of reach: not root, or root of a user namespace.
pub fn lacks_trusted_xattrs() -> bool {
    !nix::unistd::geteuid().is_root() || in_user_namespace()
}

/// True unless our uid map is the initial namespace's identity map.
fn in_user_namespace() -> bool {
    match fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => !is_identity_map(&map),
        // Without /proc we cannot tell; the initial namespace is the common case.
        Err(_) => false,
    }
}

fn is_identity_map(map: &str) -> bool {
    let mut lines = map.lines().filter(|l| !l.trim().is_empty());
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return false;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.as_slice() == [IDENTITY_MAP.0, IDENTITY_MAP.1, IDENTITY_MAP.2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_map_is_the_initial_namespace() {
        assert!(is_identity_map("         0          0 4294967295\n"));
        assert!(!is_identity_map("         0      65534          1\n"));
        assert!(!is_identity_map("0 1000 1\n1 100000 65536\n"));
        assert!(!is_identity_map(""));
    }
}
