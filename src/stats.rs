//! Counters of the daemon's work, written to the log on SIGUSR1 (as fuse-overlayfs does):
//! requests by operation, failures, copy-ups and the bytes they copied, data read and written
//! through the daemon, and the live nodes and open handles. One mount per process, so the
//! counters are process-wide atomics, cheap enough for every request.

use std::sync::atomic::{AtomicU64, Ordering};

/// Operations counted one by one; anything else counts as "other".
const OPS: &[&str] = &[
    "lookup",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "symlink",
    "rename",
    "link",
    "open",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "opendir",
    "readdir",
    "readdirplus",
    "releasedir",
    "fsyncdir",
    "statfs",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "access",
    "create",
    "fallocate",
    "lseek",
    "copy_file_range",
    "other",
];

static REQUESTS: [AtomicU64; 33] = [const { AtomicU64::new(0) }; 33];
static FAILURES: AtomicU64 = AtomicU64::new(0);
static COPY_UPS: AtomicU64 = AtomicU64::new(0);
static COPY_UP_BYTES: AtomicU64 = AtomicU64::new(0);
static BYTES_READ: AtomicU64 = AtomicU64::new(0);
static BYTES_WRITTEN: AtomicU64 = AtomicU64::new(0);
static NODES: AtomicU64 = AtomicU64::new(0);
static HANDLES: AtomicU64 = AtomicU64::new(0);

fn index(op: &str) -> usize {
    OPS.iter().position(|o| *o == op).unwrap_or(OPS.len() - 1)
}

/// One request of operation `op`, failed or not.
pub fn request(op: &str, failed: bool) {
    REQUESTS[index(op)].fetch_add(1, Ordering::Relaxed);
    if failed {
        FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn copied_up(bytes: u64) {
    COPY_UPS.fetch_add(1, Ordering::Relaxed);
    COPY_UP_BYTES.fetch_add(bytes, Ordering::Relaxed);
}

pub fn read(bytes: u64) {
    BYTES_READ.fetch_add(bytes, Ordering::Relaxed);
}

pub fn written(bytes: u64) {
    BYTES_WRITTEN.fetch_add(bytes, Ordering::Relaxed);
}

pub fn nodes_changed(delta: i64) {
    gauge(&NODES, delta);
}

pub fn handles_changed(delta: i64) {
    gauge(&HANDLES, delta);
}

fn gauge(g: &AtomicU64, delta: i64) {
    if delta >= 0 {
        g.fetch_add(delta as u64, Ordering::Relaxed);
    } else {
        g.fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
    }
}

/// The counters as one log line.
pub fn summary() -> String {
    let mut by_op: Vec<String> = OPS
        .iter()
        .zip(REQUESTS.iter())
        .filter_map(|(op, n)| {
            let n = n.load(Ordering::Relaxed);
            (n > 0).then(|| format!("{op}={n}"))
        })
        .collect();
    if by_op.is_empty() {
        by_op.push("none".into());
    }
    format!(
        "requests: {}; failed: {}; copy-ups: {} ({} bytes); read: {} bytes; written: {} bytes; live nodes: {}; open handles: {}; open directory fds: {}",
        by_op.join(" "),
        FAILURES.load(Ordering::Relaxed),
        COPY_UPS.load(Ordering::Relaxed),
        COPY_UP_BYTES.load(Ordering::Relaxed),
        BYTES_READ.load(Ordering::Relaxed),
        BYTES_WRITTEN.load(Ordering::Relaxed),
        NODES.load(Ordering::Relaxed),
        HANDLES.load(Ordering::Relaxed),
        crate::dirfd::open_count(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counted_operation_has_a_slot() {
        assert_eq!(OPS.len(), REQUESTS.len());
        assert_eq!(index("lookup"), 0);
        assert_eq!(index("no-such-op"), OPS.len() - 1);
        request("mkdir", true);
        copied_up(10);
        let s = summary();
        assert!(s.contains("mkdir=1"), "{s}");
        assert!(s.contains("copy-ups: 1 (10 bytes)"), "{s}");
    }
}
