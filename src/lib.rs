//! rsfs-overlay: an overlay (union) filesystem with the kernel overlayfs's semantics, served
//! through FUSE. The core (`overlay`, with `write` and `copyup`) knows nothing of FUSE;
//! `fuse` adapts it to the protocol; `cli`, `config` and `preflight` turn a command line into
//! a checked configuration; `daemon` mounts and serves it.

pub mod attr;
pub mod cli;
pub mod config;
pub mod copyup;
pub mod counted;
pub mod daemon;
pub mod demo;
pub mod dirfd;
pub mod format;
pub mod fuse;
pub mod handles;
pub mod idmap;
pub mod incompat;
pub mod index;
pub mod layer;
pub mod logging;
pub mod lookup;
pub mod metacopy;
pub mod node;
pub mod nodeids;
pub mod overlay;
pub mod passthrough;
pub mod preflight;
pub mod privilege;
pub mod quota;
pub mod readdir;
pub mod stack;
pub mod stats;
pub mod sys;
pub mod tools;
pub mod upperwalk;
pub mod usage;
pub mod uuid;
pub mod workdir;
pub mod write;
