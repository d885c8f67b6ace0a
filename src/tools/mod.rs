//! The layer tools, subcommands of the same binary: `export` (the upper as an OCI layer),
//! `diff` (what `podman diff` lists), `apply` (an OCI layer unpacked into a lower) and
//! `usage` (what the writable layer holds). Like `main.rs` they are command front-ends: their
//! errors carry context for one line on stderr (anyhow); the format knowledge they share with
//! the daemon lives in `format`, `upperwalk` and the core.

pub mod apply;
pub mod changes;
pub mod export;
pub mod layertar;
pub mod merged;
pub mod usage;

use std::io::Write;
use std::path::PathBuf;

/// A parsed tool command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCommand {
    Export(export::ExportRequest),
    Diff {
        upper: PathBuf,
        lowers: Vec<PathBuf>,
    },
    Apply(apply::ApplyRequest),
    Usage {
        target: UsageTarget,
        json: bool,
    },
}

/// Whose usage to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageTarget {
    /// A live mount: the daemon's counters.
    Mount(PathBuf),
    /// An unmounted upper: a walk.
    Upper(PathBuf),
}

pub fn run(cmd: &ToolCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ToolCommand::Export(req) => {
            let id = export::run(req)?;
            let line = format!("{} {}", id.digest, id.size);
            // The digest goes wherever the layer does not.
            if req.output == export::Output::Stdout {
                eprintln!("{line}");
            } else {
                writeln!(out, "{line}")?;
            }
        }
        ToolCommand::Diff { upper, lowers } => {
            for change in changes::run(upper, lowers)? {
                writeln!(out, "{change}")?;
            }
        }
        ToolCommand::Apply(req) => {
            let done = apply::run(req)?;
            eprintln!(
                "applied {} entries ({} bytes of data, {} whiteouts) to '{}'",
                done.entries,
                done.bytes,
                done.whiteouts,
                req.dir.display()
            );
        }
        ToolCommand::Usage { target, json } => {
            let u = match target {
                UsageTarget::Mount(p) => usage::ask_daemon(p)?,
                UsageTarget::Upper(p) => usage::walk_upper(p)?,
            };
            let text = if *json { u.json() } else { u.line() };
            writeln!(out, "{text}")?;
        }
    }
    out.flush()?;
    Ok(())
}
