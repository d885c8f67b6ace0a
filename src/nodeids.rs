//! Kernel node ids, kept apart from our inode numbers only where FUSE passthrough needs it.
//!
//! Normally the node id the kernel knows an object by is its inode number. But the kernel ties
//! a FUSE inode that a file is open on through passthrough to that file's backing file: every
//! other open of that kernel inode must pass through to the same file. A lower file read through
//! passthrough and then copied up leaves its kernel inode tied to the lower file, and opens that
//! need the upper copy cannot use it. Such a kernel inode is retired: the object gets an alias,
//! a new node id (high bit set) under which the kernel makes a new inode, while its `st_ino`
//! stays the same. The open that met the retired inode fails with ESTALE, on which the kernel's
//! path walk looks the name up again, gets the alias and opens the new inode.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;
use tracing::debug;

use crate::node::Ino;

/// Marks an alias: our inode numbers never have it (see `Stack::reported_ino`: the xino bits
/// leave the top bit clear, as the kernel's).
const ALIAS_BIT: u64 = 1 << 63;

#[derive(Debug, Default)]
struct Aliases {
    /// Alias node id → the object and the kernel's lookups on the alias.
    by_id: HashMap<u64, (Ino, u64)>,
    /// The alias under which each object is introduced to the kernel from now on.
    current: HashMap<Ino, u64>,
    next: u64,
}

#[derive(Debug, Default)]
pub struct NodeIds {
    /// False until the first alias: until then node ids are inode numbers, with no lock taken.
    used: AtomicBool,
    aliases: RwLock<Aliases>,
}

impl NodeIds {
    /// The object the kernel means by `nodeid`. An alias the kernel has forgotten yields an
    /// inode number no object has (the alias itself), which the overlay answers as stale.
    pub fn ino(&self, nodeid: u64) -> Ino {
        if nodeid & ALIAS_BIT == 0 {
            return nodeid;
        }
        self.aliases
            .read()
            .by_id
            .get(&nodeid)
            .map_or(nodeid, |&(ino, _)| ino)
    }

    /// The node id under which `ino` is introduced to the kernel by a reply that counts as a
    /// lookup (lookup, create, readdirplus...), counting that lookup on an alias.
    pub fn introduce(&self, ino: Ino) -> u64 {
        if !self.used.load(Ordering::Acquire) || !self.aliases.read().current.contains_key(&ino) {
            return ino;
        }
        // Rechecked under the write lock: the alias may have gone in between.
        let mut aliases = self.aliases.write();
        let Some(&alias) = aliases.current.get(&ino) else {
            return ino;
        };
        if let Some((_, lookups)) = aliases.by_id.get_mut(&alias) {
            *lookups += 1;
        }
        alias
    }

    /// The kernel forgot `n` lookups of `nodeid`. An alias forgotten entirely is dropped unless
    /// it is the object's current one: the kernel may forget an alias it has just been given
    /// (a revalidation that found the node id changed) before it looks the name up again and
    /// must then get the same alias, not the retired node id.
    pub fn forget(&self, nodeid: u64, n: u64) {
        if nodeid & ALIAS_BIT == 0 {
            return;
        }
        let mut aliases = self.aliases.write();
        let Some((ino, lookups)) = aliases.by_id.get_mut(&nodeid) else {
            return;
        };
        *lookups = lookups.saturating_sub(n);
        if *lookups == 0 {
            let ino = *ino;
            if aliases.current.get(&ino) != Some(&nodeid) {
                aliases.by_id.remove(&nodeid);
            }
        }
    }

    /// Whether any alias was ever made (until then there is nothing to clean up).
    pub fn in_use(&self) -> bool {
        self.used.load(Ordering::Acquire)
    }

    /// The kernel forgot object `ino` under every node id: its current alias goes, unless a
    /// lookup introduced it again meanwhile. The next introduction uses the inode number.
    pub fn drop_object(&self, ino: Ino) {
        let mut aliases = self.aliases.write();
        let Some(&alias) = aliases.current.get(&ino) else {
            return;
        };
        if aliases
            .by_id
            .get(&alias)
            .is_none_or(|&(_, lookups)| lookups == 0)
        {
            aliases.by_id.remove(&alias);
            aliases.current.remove(&ino);
        }
    }

    /// Retires the kernel inode `nodeid` of object `ino`: from now on the object is introduced
    /// under a new alias. Nothing changes if `nodeid` is already not the current one (another
    /// open retired it first).
    pub fn retire(&self, nodeid: u64, ino: Ino) {
        let mut aliases = self.aliases.write();
        let current = aliases.current.get(&ino).copied().unwrap_or(ino);
        if current != nodeid {
            return;
        }
        // An alias never yet introduced would stay unused forever: drop it with its retirement.
        if let Some(&(_, 0)) = aliases.by_id.get(&nodeid) {
            aliases.by_id.remove(&nodeid);
        }
        let alias = loop {
            aliases.next = aliases.next.wrapping_add(1);
            let candidate = ALIAS_BIT | (aliases.next & !ALIAS_BIT);
            if !aliases.by_id.contains_key(&candidate) {
                break candidate;
            }
        };
        aliases.by_id.insert(alias, (ino, 0));
        aliases.current.insert(ino, alias);
        self.used.store(true, Ordering::Release);
        debug!(
            ino,
            nodeid, alias, "kernel inode retired: tied to another backing file"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_inode_numbers_until_a_retirement() {
        let ids = NodeIds::default();
        assert_eq!((ids.introduce(42), ids.ino(42)), (42, 42));
        ids.retire(42, 42);
        let alias = ids.introduce(42);
        assert_ne!(alias, 42);
        assert_eq!(ids.ino(alias), 42, "the alias reaches the same object");
        assert_eq!(ids.ino(42), 42, "the retired node id still does");
        assert_eq!(ids.introduce(7), 7, "other objects keep their numbers");
    }

    #[test]
    fn the_current_alias_outlives_its_lookups_until_the_object_goes() {
        let ids = NodeIds::default();
        ids.retire(42, 42);
        let alias = ids.introduce(42);
        assert_eq!(
            ids.introduce(42),
            alias,
            "the same alias while the kernel holds it"
        );
        ids.forget(alias, 2);
        assert_eq!(
            ids.introduce(42),
            alias,
            "forgotten but current: the kernel's next lookup gets it again"
        );
        ids.drop_object(42);
        assert_eq!(
            ids.ino(alias),
            42,
            "still held: not dropped with the object"
        );
        ids.forget(alias, 1);
        ids.drop_object(42);
        assert_eq!(ids.introduce(42), 42, "gone with the object");
        assert_eq!(ids.ino(alias), alias, "a forgotten alias names no object");
    }

    #[test]
    fn an_old_alias_goes_with_its_last_lookup() {
        let ids = NodeIds::default();
        ids.retire(42, 42);
        let first = ids.introduce(42);
        ids.retire(first, 42);
        ids.forget(first, 1);
        assert_eq!(ids.ino(first), first, "not current: dropped at once");
        assert_ne!(ids.introduce(42), first);
    }

    #[test]
    fn retiring_an_alias_makes_another_and_a_stale_retirement_does_nothing() {
        let ids = NodeIds::default();
        ids.retire(42, 42);
        let first = ids.introduce(42);
        ids.retire(42, 42); // raced: 42 is no longer the current node id
        assert_eq!(ids.introduce(42), first);
        ids.retire(first, 42);
        let second = ids.introduce(42);
        assert!(second != first && second != 42);
        assert_eq!((ids.ino(first), ids.ino(second)), (42, 42));
    }
}
