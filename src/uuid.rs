//! The kernel's `uuid=` option: the overlay's own persistent UUID (`<prefix>uuid` on the upper
//! root, which the kernel turns into the mount's `f_fsid`) and whether origin records carry
//! the lower filesystem's UUID. What each value writes was read off the kernel by experiment:
//! `on` and `auto` on a new upper write the xattr, `null` and `off` never do, `off` writes
//! origins with a null UUID, and no value ever removes a UUID already recorded.

use crate::config::UuidMode;
use crate::layer::{self, XattrTarget};
use crate::stack::Stack;

/// Gives the upper a persistent UUID where `mode` asks for one: always with `on` (once: an
/// existing one is kept), with `auto` only on an upper never mounted before (no UUID and not
/// yet marked impure; an older upper keeps the null UUID, as the kernel decides).
pub fn init_upper_uuid(stack: &Stack, mode: UuidMode) {
    let Some(upper) = stack.upper() else {
        return;
    };
    let root = XattrTarget::Dir(layer::borrow(&upper.root));
    let uuid = stack.names.name("uuid");
    let present = |name: &[u8]| !matches!(root.get_opt(name), Ok(None));
    let wanted = match mode {
        UuidMode::On => !present(&uuid),
        UuidMode::Auto => !present(&uuid) && !present(&stack.names.name("impure")),
        UuidMode::Null | UuidMode::Off => false,
    };
    if !wanted {
        return;
    }
    let bytes = match random_uuid() {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "no randomness for the overlay uuid");
            return;
        }
    };
    if let Err(e) = root.set(&uuid, &bytes, 0) {
        tracing::debug!(error = %e, "cannot record the overlay uuid");
    }
}

/// A version 4 (random) UUID, as the kernel's `uuid_gen` makes.
fn random_uuid() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_uuids_are_version_4() {
        let a = super::random_uuid().unwrap();
        let b = super::random_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4);
        assert_eq!(a[8] >> 6, 0b10);
    }
}
