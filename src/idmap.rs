//! fuse-overlayfs's uid/gid mappings and squash options: ids on disk (as the daemon sees them)
//! against ids presented through the mount.
//!
//! `uidmapping=DISK:PRESENTED:LEN[:DISK:PRESENTED:LEN...]` presents the disk ids
//! `DISK..DISK+LEN` as `PRESENTED..PRESENTED+LEN`, and stores presented ids back the other
//! way; an id outside every range becomes the kernel's overflow id (65534), as in a user
//! namespace. `squash_to_uid=`/`squash_to_gid=`/`squash_to_root` only change what is
//! presented: everything shows as owned by that id, while new objects are still stored under
//! their creator's (mapped) id.

use std::fmt;

/// The kernel's overflow id, shown for ids no range covers.
pub const OVERFLOW_ID: u32 = 65534;

/// One `DISK:PRESENTED:LEN` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub disk: u32,
    pub presented: u32,
    pub len: u32,
}

/// The mapping of one kind of id (user or group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMap {
    /// Empty: every id is itself.
    pub ranges: Vec<IdRange>,
    /// Every object is presented as owned by this id.
    pub squash: Option<u32>,
}

/// A bad mapping string, as one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError(pub String);

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl IdMap {
    /// Parses the value of `uidmapping=`/`gidmapping=`. Empty fields are skipped, so the
    /// leading colon containers/storage writes (`:0:100000:65536`) is accepted.
    pub fn parse_ranges(key: &str, value: &str) -> Result<Vec<IdRange>, MappingError> {
        let bad = |why: &str| {
            MappingError(format!(
                "option '{key}={value}': {why}; expected DISK:PRESENTED:LENGTH[:DISK:PRESENTED:LENGTH...]"
            ))
        };
        let fields: Vec<&str> = value.split(':').filter(|f| !f.is_empty()).collect();
        if fields.is_empty() || fields.len() % 3 != 0 {
            return Err(bad("the numbers do not come in groups of three"));
        }
        let mut ranges = Vec::new();
        for triple in fields.chunks(3) {
            let mut n = [0u32; 3];
            for (slot, f) in n.iter_mut().zip(triple) {
                *slot = f.parse().map_err(|_| bad(&format!("'{f}' is not an id")))?;
            }
            let [disk, presented, len] = n;
            if len == 0 {
                return Err(bad("a range has length 0"));
            }
            if disk.checked_add(len - 1).is_none() || presented.checked_add(len - 1).is_none() {
                return Err(bad("a range runs past the largest id"));
            }
            ranges.push(IdRange {
                disk,
                presented,
                len,
            });
        }
        Ok(ranges)
    }

    /// True when nothing is changed either way.
    pub fn is_identity(&self) -> bool {
        self.ranges.is_empty() && self.squash.is_none()
    }

    /// The id shown through the mount as the owner of an object whose owner on disk is `disk`.
    pub fn presented(&self, disk: u32) -> u32 {
        if let Some(id) = self.squash {
            return id;
        }
        self.presented_unsquashed(disk)
    }

    /// The id shown for `disk` where squashing does not apply: the ids named inside ACLs,
    /// which squashing them would merge into duplicates the kernel then enforces.
    pub fn presented_unsquashed(&self, disk: u32) -> u32 {
        self.map(disk, |r| (r.disk, r.presented))
    }

    /// The id stored on disk for an id given through the mount (a creator, a chown, an ACL).
    pub fn disk(&self, presented: u32) -> u32 {
        self.map(presented, |r| (r.presented, r.disk))
    }

    /// The id of `ranges` that `id` falls in, from the side `ends` names first.
    fn map(&self, id: u32, ends: impl Fn(&IdRange) -> (u32, u32)) -> u32 {
        if self.ranges.is_empty() {
            return id;
        }
        for r in &self.ranges {
            let (from, to) = ends(r);
            if id >= from && id - from < r.len {
                return to + (id - from);
            }
        }
        OVERFLOW_ID
    }
}

/// The user and group mappings of a mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdMaps {
    pub uids: IdMap,
    pub gids: IdMap,
}

impl IdMaps {
    pub fn is_identity(&self) -> bool {
        self.uids.is_identity() && self.gids.is_identity()
    }
}

/// `system.posix_acl_access` / `system.posix_acl_default`: a 4-byte version header, then
/// 8-byte entries `tag: u16, perm: u16, id: u32`, all little-endian.
pub fn is_acl_xattr(name: &[u8]) -> bool {
    name == b"system.posix_acl_access" || name == b"system.posix_acl_default"
}

const ACL_HEADER: usize = 4;
const ACL_ENTRY: usize = 8;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

/// Rewrites the named-user and named-group ids of an ACL xattr value with `user` and
/// `group`. A value that is not a well-formed ACL is left as it is: the filesystem below
/// judges it.
pub fn map_acl(value: &mut [u8], user: impl Fn(u32) -> u32, group: impl Fn(u32) -> u32) {
    if value.len() < ACL_HEADER || (value.len() - ACL_HEADER) % ACL_ENTRY != 0 {
        return;
    }
    for entry in value[ACL_HEADER..].chunks_exact_mut(ACL_ENTRY) {
        let tag = u16::from_le_bytes([entry[0], entry[1]]);
        let id = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        let mapped = match tag {
            ACL_USER => user(id),
            ACL_GROUP => group(id),
            _ => continue,
        };
        entry[4..8].copy_from_slice(&mapped.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &str) -> IdMap {
        IdMap {
            ranges: IdMap::parse_ranges("uidmapping", s).expect("valid"),
            squash: None,
        }
    }

    #[test]
    fn ranges_map_both_ways_and_others_overflow() {
        let m = map("0:1000:1:1:100000:65536");
        assert_eq!(m.presented(0), 1000);
        assert_eq!(m.presented(1), 100000);
        assert_eq!(m.presented(65536), 165535);
        assert_eq!(m.presented(65537), OVERFLOW_ID);
        assert_eq!(m.disk(1000), 0);
        assert_eq!(m.disk(100001), 2);
        assert_eq!(m.disk(5), OVERFLOW_ID);
    }

    #[test]
    fn leading_colon_and_empty_fields_are_accepted() {
        assert_eq!(map(":0:100000:65536"), map("0:100000:65536"));
    }

    #[test]
    fn bad_mappings_are_refused() {
        for bad in ["", "0:1", "0:1:0", "a:1:1", "0:1:1:2", "4294967295:0:2"] {
            assert!(IdMap::parse_ranges("uidmapping", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn squash_changes_only_what_is_presented() {
        let m = IdMap {
            ranges: Vec::new(),
            squash: Some(0),
        };
        assert_eq!(m.presented(1234), 0);
        assert_eq!(m.presented_unsquashed(1234), 1234);
        assert_eq!(m.disk(1234), 1234);
    }

    #[test]
    fn acl_named_entries_are_mapped() {
        let mut v = vec![2, 0, 0, 0];
        for (tag, id) in [
            (0x01u16, u32::MAX),
            (ACL_USER, 7),
            (ACL_GROUP, 9),
            (0x20, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&7u16.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        map_acl(&mut v, |u| u + 100, |g| g + 200);
        let ids: Vec<u32> = v[4..]
            .chunks(8)
            .map(|e| u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
            .collect();
        assert_eq!(ids, vec![u32::MAX, 107, 209, u32::MAX]);
    }
}
