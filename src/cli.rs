//! The command line: the fuse-overlayfs form (`-o OPTS MOUNTPOINT`), the mount.fuse3 form
//! (`SOURCE MOUNTPOINT -o OPTS`) and the subcommands, turned into a [`Command`].
//!
//! The clap definition lives in [`command`] so that `--help` and the man page (clap_mangen) are
//! generated from the same text and never disagree. No I/O here beyond what clap does for
//! `-h`/`-V`; checks against the filesystem are in `preflight`.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Arg, ArgAction, value_parser};

use crate::config::{self, Config, ConfigError, IGNORED_OPTIONS, NOT_IMPLEMENTED_OPTIONS};
use crate::tools::layertar::Compression;
use crate::tools::{ToolCommand, UsageTarget, apply, export};

/// What the user asked for.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "built once at start-up; boxing would only make callers unwrap it"
)]
pub enum Command {
    /// Mount an overlay with this configuration.
    Mount(Config),
    /// Run the demonstration.
    Demo,
    /// One of the layer tools (export, diff, apply, usage).
    Tool(ToolCommand),
}

/// Why the command line was not accepted.
#[derive(Debug)]
pub enum CliError {
    /// Usage errors, and also `-h`/`-V`: `main` calls `.exit()` on it so clap prints the help,
    /// version or usage with the right exit code.
    Clap(clap::Error),
    /// The options were understood by clap but make no valid mount.
    Config(ConfigError),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Clap(e) => e.fmt(f),
            CliError::Config(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CliError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CliError::Clap(e) => Some(e),
            CliError::Config(e) => Some(e),
        }
    }
}

impl From<clap::Error> for CliError {
    fn from(e: clap::Error) -> Self {
        CliError::Clap(e)
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        CliError::Config(e)
    }
}

/// The `-o` options we honour, as `(syntax, meaning)`, for the help text. Options accepted but
/// ignored or not implemented are listed from `config`'s own tables, so the help cannot drift.
#[rustfmt::skip]
const OPTION_TABLE: &[(&str, &str)] = &[
    ("lowerdir=DIR[:DIR...]", "read-only layers, top-most first; '\\' escapes ':' ',' '\\'"),
    ("upperdir=DIR",          "writable layer receiving all changes (needs workdir)"),
    ("workdir=DIR",           "empty directory on upperdir's filesystem, for atomic copy-up"),
    ("userxattr",             "keep overlay metadata in user.overlay.* instead of trusted.overlay.*;\nautomatic when trusted.* is out of reach (rootless)"),
    ("ro",                    "mount read-only (always so without upperdir)"),
    ("rw",                    "mount read-write (the default with upperdir)"),
    ("allow_other",           "let other users access the mount (default as root)"),
    ("default_permissions",   "kernel checks access from file modes (always on)"),
    ("suid, nosuid",          "honour or ignore set-user/group-id bits (suid default as root)"),
    ("dev, nodev",            "allow or refuse device files (default nodev)"),
    ("exec, noexec",          "allow or refuse running programs (default exec)"),
    ("atime, noatime",        "update or not access times (default noatime)"),
    ("fsname=NAME",           "source shown in /proc/mounts (default SOURCE or rsfs-overlay)"),
    ("subtype=NAME",          "type shown as fuse.NAME (default rsfs-overlay)"),
    ("debug",                 "log every request and stay in the foreground, like -d"),
    ("threads=N",             "serve requests with N threads (N >= 1)"),
    ("threaded=N",            "fuse-overlayfs's spelling of threads=N; 0 means 1"),
    ("timeout=SECONDS",       "how long the kernel may cache entries and attributes"),
    ("passthrough=all|upper|off", "which open files the kernel reads and writes itself (FUSE\n\
                               passthrough, kernel >= 6.9 as root): all (default) also lower files\n\
                               of 256 KiB or more, whose page cache mounts then share; a reader\n\
                               of one open before a copy-up keeps reading the lower file;\n\
                               upper: only upper files, readers follow copy-ups as under the kernel"),
    ("uidmapping=D:P:L[:...]", "show disk uids D..D+L as P..P+L, store callers' uids back;\nothers show as 65534 (fuse-overlayfs's option)"),
    ("gidmapping=D:P:L[:...]", "the same for gids"),
    ("squash_to_root",        "show every object as owned by 0:0 (storage unchanged)"),
    ("squash_to_uid=N",       "show every object as owned by uid N (wins over squash_to_root)"),
    ("squash_to_gid=N",       "show every object as owned by gid N (wins over squash_to_root)"),
    ("static_nlink",          "directories report one link"),
    ("upper_limit=SIZE",      "cap the upper's size (K, M, G, T suffixes): past it, writes,\n\
                               creates and copy-ups fail with ENOSPC; df shows the cap"),
    ("upper_inodes=N",        "cap the number of inodes in the upper, as upper_limit="),
    ("noacl",                 "no POSIX ACLs: not enforced, their xattrs refused"),
    ("noxattrs=0|1",          "1 refuses every xattr call with EOPNOTSUPP"),
    ("fsync=0|1",             "0 skips fsync and copy-up syncs (for throwaway uppers)"),
    ("volatile",              "as the kernel's: no sync reaches the upper, and\nWORKDIR/work/incompat/volatile is left behind; later mounts are\nrefused until it is removed (safe only if the system did not crash)"),
    ("uuid=on|off|null|auto", "as the kernel's: on gives the upper a UUID (trusted.overlay.uuid);\noff: origins record a null filesystem UUID (single-filesystem stacks);\nnull: no UUID; auto (default): on for a new upper, else null"),
    ("redirect_dir=on|follow|off|nofollow", "on: renaming a lower or merged directory writes a redirect\n(as the kernel) instead of failing with EXDEV; follow, off (default):\nredirects are followed, not written; nofollow: not followed"),
    ("metacopy=on|off",       "on: chmod, chown, utimes, xattr changes, link and rename of a\n\
                               lower file copy up its metadata only (the kernel's metacopy\n\
                               format); its data follows on the first write. Implies\n\
                               redirect_dir=on. off (default): metacopy files are refused (EPERM)"),
    ("index=on|off",          "on: the kernel's inode index in <workdir>/index: the names of a\n\
                               lower hard link stay one file after a copy-up, also after a\n\
                               remount and under the kernel; the upper is tied to its lowers"),
    ("xino=auto|on|off",      "inode numbers carry the filesystem index in their high bits on\n\
                               a stack over several filesystems (off is kept as auto)"),
    ("log_file=PATH",         "once detached, append the log to PATH instead of syslog"),
];

const ABOUT: &str =
    "An overlay (union) filesystem served through FUSE, a drop-in for fuse-overlayfs";

const LONG_ABOUT: &str = "\
An overlay (union) filesystem served through FUSE, a drop-in replacement for fuse-overlayfs with \
the semantics and on-disk format of the kernel's overlayfs.

The lower directories are merged, top-most first; changes go to the upper directory, with \
whiteouts recording deletions, so the lower directories are never modified. Without an upper \
directory the mount is read-only.

It can be run directly (rsfs-overlay -o lowerdir=...,upperdir=...,workdir=... MOUNTPOINT), or \
by mount(8) as 'mount -t fuse.rsfs-overlay SOURCE MOUNTPOINT -o ...', which runs it as \
'rsfs-overlay SOURCE MOUNTPOINT -o ...'. Unmount with 'fusermount3 -u MOUNTPOINT' or umount(8).";

/// Indentation of the meaning column in the options table.
const TABLE_INDENT: usize = 26;

/// The options table shown after the help and in the man page.
fn options_help() -> String {
    let mut text = String::from("Mount options (-o OPTION[,OPTION...]):\n");
    for (syntax, meaning) in OPTION_TABLE {
        // A syntax too long for its column pushes the meaning to the next line.
        let width = TABLE_INDENT - 2;
        if syntax.len() >= width {
            text.push_str(&format!("  {syntax}\n{:TABLE_INDENT$}", ""));
        } else {
            text.push_str(&format!("  {syntax:<width$}"));
        }
        let indent = format!("\n{:TABLE_INDENT$}", "");
        text.push_str(&meaning.replace('\n', &indent));
        text.push('\n');
    }
    text.push_str("\nAccepted and ignored, as passed by mount(8), fstab and SELinux:\n");
    let ignored: Vec<String> = IGNORED_OPTIONS
        .iter()
        .map(|o| o.to_string())
        .chain(["x-*".to_owned()])
        .collect();
    text.push_str(&wrap_list(&ignored));
    text.push_str(
        "\nAccepted with a warning, not implemented yet \
         (fuse-overlayfs and kernel overlayfs options):\n",
    );
    let pending: Vec<String> = NOT_IMPLEMENTED_OPTIONS
        .iter()
        .map(|o| o.to_string())
        .collect();
    text.push_str(&wrap_list(&pending));
    text.push_str("\nRefused: plugins= (fuse-overlayfs plugins are not supported).");
    text
}

/// Joins option names into indented lines that fit an 80-column terminal.
fn wrap_list(names: &[String]) -> String {
    const WIDTH: usize = 78;
    let mut out = String::new();
    let mut line = String::from(" ");
    for (i, name) in names.iter().enumerate() {
        let item = if i + 1 < names.len() {
            format!(" {name},")
        } else {
            format!(" {name}")
        };
        if line.len() + item.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from(" ");
        }
        line.push_str(&item);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// The complete clap definition of the command line.
pub fn command() -> clap::Command {
    clap::Command::new(env!("CARGO_PKG_NAME"))
        // Fixed, because mount(8) may start us under a path or another argv[0].
        .bin_name(env!("CARGO_PKG_NAME"))
        .version(env!("CARGO_PKG_VERSION"))
        .about(ABOUT)
        .long_about(LONG_ABOUT)
        .override_usage(
            "rsfs-overlay [-f] [-d] -o OPTION[,OPTION...] [SOURCE] MOUNTPOINT\n       \
             rsfs-overlay export --upper DIR [--lowerdir L1:L2...] [-o FILE|-] [--gzip|--zstd]\n       \
             rsfs-overlay diff --upper DIR [--lowerdir L1:L2...]\n       \
             rsfs-overlay apply LAYER DIR [--format kernel|oci]\n       \
             rsfs-overlay usage MOUNTPOINT | --upper DIR [--json]\n       \
             rsfs-overlay demo",
        )
        .after_help(options_help())
        .disable_help_subcommand(true)
        // Without these, `rsfs-overlay overlay /merged` (mount.fuse3's form) and a subcommand
        // name would compete for the first positional; a known subcommand name wins only when no
        // mount arguments are given.
        .args_conflicts_with_subcommands(true)
        .subcommand_negates_reqs(true)
        .arg(
            Arg::new("options")
                .short('o')
                .value_name("OPTION[,OPTION...]")
                .action(ArgAction::Append)
                .value_parser(value_parser!(String))
                .help("Mount options, comma separated; may be repeated (see the table below)"),
        )
        .arg(
            Arg::new("foreground")
                .short('f')
                .long("foreground")
                .action(ArgAction::SetTrue)
                .help("Stay in the foreground instead of running as a daemon"),
        )
        .arg(
            Arg::new("debug")
                .short('d')
                .long("debug")
                .action(ArgAction::SetTrue)
                .help("Log every request; implies -f"),
        )
        // `[SOURCE] <MOUNTPOINT>`: a single positional is the mountpoint.
        .allow_missing_positional(true)
        .arg(
            Arg::new("source")
                .value_name("SOURCE")
                .index(1)
                .value_parser(value_parser!(String))
                .help(
                    "Source name as mount(8) passes it; shown in /proc/mounts unless fsname= \
                     is given",
                ),
        )
        .arg(
            Arg::new("mountpoint")
                .value_name("MOUNTPOINT")
                .index(2)
                .required(true)
                .value_parser(value_parser!(PathBuf))
                .help("The directory to mount the merged view on"),
        )
        .subcommand(
            clap::Command::new("demo")
                .about("Run a short demonstration on sample layers in a temporary directory"),
        )
        .subcommands(tool_commands())
}

fn upper_arg(required: bool) -> Arg {
    Arg::new("upper")
        .long("upper")
        .value_name("DIR")
        .required(required)
        .value_parser(value_parser!(PathBuf))
        .help("The upper (writable) layer directory, mounted or not")
}

fn lowerdir_arg() -> Arg {
    Arg::new("lowerdir")
        .long("lowerdir")
        .value_name("L1:L2...")
        .value_parser(value_parser!(String))
        .help("The lower layers under the upper, top-most first, as in lowerdir=")
}

/// The layer tools' subcommands.
fn tool_commands() -> Vec<clap::Command> {
    vec![
        clap::Command::new("export")
            .about("Write the upper's changes as an OCI image layer (tar) and print its digest")
            .long_about(
                "Write the upper's changes as an OCI image layer: new and changed files with \
                 their metadata and xattrs, whiteouts as .wh.NAME, opaque directories with \
                 .wh..wh..opq, hard links as links, renamed (redirected) directories whole. \
                 The output is deterministic. Prints 'sha256:HEX SIZE' of the written blob on \
                 stdout, or on stderr when the layer itself goes to stdout.",
            )
            .arg(upper_arg(true))
            .arg(lowerdir_arg().help(
                "The lowers: needed for directories renamed with redirect_dir=on and for \
                 metacopy files",
            ))
            .arg(
                Arg::new("output")
                    .short('o')
                    .long("output")
                    .value_name("FILE")
                    .default_value("-")
                    .value_parser(value_parser!(PathBuf))
                    .help("Where to write the layer; '-' for stdout"),
            )
            .arg(
                Arg::new("gzip")
                    .long("gzip")
                    .action(ArgAction::SetTrue)
                    .conflicts_with("zstd")
                    .help("Compress with gzip (tar+gzip media type)"),
            )
            .arg(
                Arg::new("zstd")
                    .long("zstd")
                    .action(ArgAction::SetTrue)
                    .help("Compress with zstd (tar+zstd media type)"),
            ),
        clap::Command::new("diff")
            .about("List the upper's changes as podman diff does: A, C or D and a path")
            .arg(upper_arg(true))
            .arg(lowerdir_arg().help(
                "The lowers under the upper, top-most first; without them the upper's own \
                 records decide (whiteouts: D, copied up: C, else A)",
            )),
        clap::Command::new("apply")
            .about("Unpack an OCI image layer (tar, tar.gz or tar.zst) into a directory to use as a lower")
            .arg(
                Arg::new("layer")
                    .value_name("LAYER")
                    .required(true)
                    .value_parser(value_parser!(PathBuf))
                    .help("The layer file; '-' for stdin"),
            )
            .arg(
                Arg::new("dir")
                    .value_name("DIR")
                    .required(true)
                    .value_parser(value_parser!(PathBuf))
                    .help("The directory to unpack into (created if missing)"),
            )
            .arg(
                Arg::new("format")
                    .long("format")
                    .value_name("FORMAT")
                    .value_parser(["kernel", "oci"])
                    .default_value("kernel")
                    .help(
                        "kernel: whiteouts as char 0/0 devices and opaque xattrs (readable by \
                         kernel overlayfs); oci: .wh. entries kept as files",
                    ),
            ),
        clap::Command::new("usage")
            .about("Print the bytes and inodes the writable layer holds")
            .arg(
                Arg::new("mountpoint")
                    .value_name("MOUNTPOINT")
                    .required_unless_present("upper")
                    .conflicts_with("upper")
                    .value_parser(value_parser!(PathBuf))
                    .help("A live rsfs-overlay mount: answered from the daemon's counters"),
            )
            .arg(upper_arg(false).help("An unmounted upper directory: answered by a walk"))
            .arg(
                Arg::new("json")
                    .long("json")
                    .action(ArgAction::SetTrue)
                    .help("Print one JSON object"),
            ),
    ]
}

fn tool_command(name: &str, m: &clap::ArgMatches) -> Result<Option<ToolCommand>, CliError> {
    let path = |id: &str| m.get_one::<PathBuf>(id).cloned();
    let lowers = || -> Result<Vec<PathBuf>, CliError> {
        match m.get_one::<String>("lowerdir") {
            Some(v) => Ok(config::split_lowerdir(v)?),
            None => Ok(Vec::new()),
        }
    };
    let required = |id: &str| {
        path(id).ok_or_else(|| {
            CliError::from(
                command().error(ErrorKind::MissingRequiredArgument, format!("missing {id}")),
            )
        })
    };
    Ok(Some(match name {
        "export" => {
            let output = match path("output") {
                Some(p) if p.as_os_str() != "-" => export::Output::File(p),
                _ => export::Output::Stdout,
            };
            let compression = if m.get_flag("gzip") {
                Compression::Gzip
            } else if m.get_flag("zstd") {
                Compression::Zstd
            } else {
                Compression::None
            };
            ToolCommand::Export(export::ExportRequest {
                upper: required("upper")?,
                lowers: lowers()?,
                output,
                compression,
            })
        }
        "diff" => ToolCommand::Diff {
            upper: required("upper")?,
            lowers: lowers()?,
        },
        "apply" => {
            let layer = required("layer")?;
            let format = match m.get_one::<String>("format").map(String::as_str) {
                Some("oci") => apply::Format::Oci,
                _ => apply::Format::Kernel,
            };
            ToolCommand::Apply(apply::ApplyRequest {
                layer: (layer.as_os_str() != "-").then_some(layer),
                dir: required("dir")?,
                format,
            })
        }
        "usage" => {
            let target = match (path("mountpoint"), path("upper")) {
                (_, Some(u)) => UsageTarget::Upper(u),
                (Some(mp), None) => UsageTarget::Mount(mp),
                (None, None) => return Ok(None),
            };
            ToolCommand::Usage {
                target,
                json: m.get_flag("json"),
            }
        }
        _ => return Ok(None),
    }))
}

/// Parses a whole command line (`args[0]` is the program name). `is_root` selects the default
/// options, as fuse-overlayfs does for root.
pub fn parse_cli<I, T>(args: I, is_root: bool) -> Result<Command, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = command().try_get_matches_from(args)?;
    match matches.subcommand() {
        Some(("demo", _)) => return Ok(Command::Demo),
        Some((name, sub)) if let Some(tool) = tool_command(name, sub)? => {
            return Ok(Command::Tool(tool));
        }
        Some((name, _)) => {
            let message = format!("subcommand '{name}' is not handled");
            return Err(command()
                .error(ErrorKind::InvalidSubcommand, message)
                .into());
        }
        None => {}
    }

    let Some(mountpoint) = matches.get_one::<PathBuf>("mountpoint") else {
        let message = "give the mountpoint: rsfs-overlay -o OPTIONS MOUNTPOINT";
        return Err(command()
            .error(ErrorKind::MissingRequiredArgument, message)
            .into());
    };
    let source = matches.get_one::<String>("source");

    let mut cfg = Config::new(mountpoint.clone(), is_root);
    // Set before the options so that an explicit fsname= still wins.
    if let Some(source) = source.filter(|s| !s.is_empty()) {
        cfg.fsname = source.clone();
    }
    for opts in matches.get_many::<String>("options").into_iter().flatten() {
        config::parse_options(opts, &mut cfg)?;
    }
    if matches.get_flag("foreground") {
        cfg.foreground = true;
    }
    if matches.get_flag("debug") {
        cfg.debug = true;
        cfg.foreground = true;
    }
    cfg.validate()?;
    // The kernel mounts a stack without an upper layer read-only; say so to FUSE as well, so
    // writes fail with EROFS in the kernel before they reach us.
    if cfg.upperdir.is_none() {
        cfg.read_only = true;
    }
    Ok(Command::Mount(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const LAYERS: &str = "lowerdir=/l2:/l1,upperdir=/u,workdir=/w";

    fn mount(args: &[&str]) -> Config {
        let mut argv = vec!["rsfs-overlay"];
        argv.extend_from_slice(args);
        match parse_cli(&argv, false) {
            Ok(Command::Mount(cfg)) => cfg,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn failure(args: &[&str]) -> CliError {
        let mut argv = vec!["rsfs-overlay"];
        argv.extend_from_slice(args);
        match parse_cli(&argv, false) {
            Err(e) => e,
            Ok(c) => panic!("{args:?} parsed as {c:?}"),
        }
    }

    fn clap_kind(args: &[&str]) -> ErrorKind {
        match failure(args) {
            CliError::Clap(e) => e.kind(),
            CliError::Config(e) => panic!("{args:?}: config error {e}"),
        }
    }

    fn config_error(args: &[&str]) -> String {
        match failure(args) {
            CliError::Config(e) => e.0,
            CliError::Clap(e) => panic!("{args:?}: clap error {e}"),
        }
    }

    #[test]
    fn definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn forms_that_parse() {
        type Probe = fn(&Config) -> bool;
        fn layers(c: &Config) -> bool {
            c.lowerdirs == [PathBuf::from("/l2"), PathBuf::from("/l1")]
                && c.upperdir == Some(PathBuf::from("/u"))
                && c.workdir == Some(PathBuf::from("/w"))
                && c.mountpoint == Path::new("/merged")
        }
        let cases: &[(&[&str], Probe)] = &[
            (&["-o", LAYERS, "/merged"], |c| {
                layers(c) && c.fsname == "rsfs-overlay" && !c.foreground && !c.read_only
            }),
            (
                &[
                    "overlay",
                    "/merged",
                    "-o",
                    "rw,lowerdir=/l2:/l1,upperdir=/u,workdir=/w",
                ],
                |c| layers(c) && c.fsname == "overlay",
            ),
            (
                &[
                    "overlay",
                    "/merged",
                    "-o",
                    "fsname=mine,lowerdir=/l2:/l1,upperdir=/u,workdir=/w",
                ],
                |c| layers(c) && c.fsname == "mine",
            ),
            (
                &["-o", "fsname=mine", "src", "/merged", "-o", LAYERS],
                |c| layers(c) && c.fsname == "mine",
            ),
            (&["-f", "-o", LAYERS, "/merged"], |c| {
                layers(c) && c.foreground && !c.debug
            }),
            (&["-d", "-o", LAYERS, "/merged"], |c| {
                layers(c) && c.foreground && c.debug
            }),
            (&["--debug", "-o", LAYERS, "/merged"], |c| {
                c.foreground && c.debug
            }),
            (&["-f", "-d", "-o", LAYERS, "/merged"], |c| {
                c.foreground && c.debug
            }),
            (&[&format!("-o{LAYERS}"), "/merged"], |c| layers(c)),
            (
                &[
                    "-o",
                    "lowerdir=/l2:/l1",
                    "-o",
                    "upperdir=/u",
                    "-oworkdir=/w",
                    "/merged",
                ],
                |c| layers(c),
            ),
            (&["-o", "lowerdir=/x", "-o", LAYERS, "/merged"], |c| {
                layers(c)
            }),
            (&["/merged", "-o", LAYERS], |c| layers(c)),
            (&["-o", &format!("{LAYERS},,volatile"), "/merged"], |c| {
                layers(c) && c.volatile && c.warnings.is_empty()
            }),
            (&["-o", "lowerdir=/l", "/merged"], |c| {
                c.read_only && c.upperdir.is_none() && c.lowerdirs == [PathBuf::from("/l")]
            }),
            (&["-o", &format!("{LAYERS},ro"), "/merged"], |c| c.read_only),
            (&["-o", &format!("{LAYERS},debug"), "/merged"], |c| {
                c.debug && c.foreground
            }),
            (&["-o", LAYERS, "demo"], |c| {
                c.mountpoint == Path::new("demo")
            }),
        ];
        for (args, probe) in cases {
            let cfg = mount(args);
            assert!(probe(&cfg), "{args:?}: {cfg:?}");
        }
    }

    #[test]
    fn root_gets_root_defaults() {
        let argv = ["rsfs-overlay", "-o", LAYERS, "/merged"];
        for is_root in [false, true] {
            let Ok(Command::Mount(cfg)) = parse_cli(argv, is_root) else {
                panic!("root={is_root}");
            };
            assert_eq!((cfg.allow_other, cfg.suid), (is_root, is_root));
        }
    }

    #[test]
    fn tool_subcommands() {
        let tool = |args: &[&str]| {
            let argv = std::iter::once("rsfs-overlay").chain(args.iter().copied());
            match parse_cli(argv, true) {
                Ok(Command::Tool(t)) => t,
                other => panic!("{args:?}: {other:?}"),
            }
        };
        let ToolCommand::Export(req) =
            tool(&["export", "--upper", "/u", "--lowerdir", "/a:/b", "--zstd"])
        else {
            panic!("export");
        };
        assert_eq!(req.upper, PathBuf::from("/u"));
        assert_eq!(req.lowers, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(req.output, export::Output::Stdout);
        assert_eq!(req.compression, Compression::Zstd);
        let ToolCommand::Export(req) = tool(&["export", "--upper", "/u", "-o", "l.tar"]) else {
            panic!("export -o");
        };
        assert_eq!(req.output, export::Output::File(PathBuf::from("l.tar")));
        assert_eq!(
            tool(&["diff", "--upper", "/u"]),
            ToolCommand::Diff {
                upper: PathBuf::from("/u"),
                lowers: Vec::new()
            }
        );
        let ToolCommand::Apply(req) = tool(&["apply", "-", "/d", "--format", "oci"]) else {
            panic!("apply");
        };
        assert_eq!((req.layer, req.format), (None, apply::Format::Oci));
        assert_eq!(
            tool(&["usage", "/merged", "--json"]),
            ToolCommand::Usage {
                target: UsageTarget::Mount(PathBuf::from("/merged")),
                json: true
            }
        );
        for bad in [
            &["export"][..],
            &["usage"],
            &["usage", "/m", "--upper", "/u"],
            &["export", "--upper", "/u", "--gzip", "--zstd"],
            &["apply", "l.tar"],
            &["apply", "l.tar", "/d", "--format", "aufs"],
        ] {
            let argv = std::iter::once("rsfs-overlay").chain(bad.iter().copied());
            assert!(parse_cli(argv, true).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn demo_subcommand() {
        assert!(matches!(
            parse_cli(["rsfs-overlay", "demo"], false),
            Ok(Command::Demo)
        ));
    }

    #[test]
    fn usage_errors() {
        let cases: &[(&[&str], ErrorKind)] = &[
            (&[], ErrorKind::MissingRequiredArgument),
            (&["-o", LAYERS], ErrorKind::MissingRequiredArgument),
            (&["-o"], ErrorKind::InvalidValue),
            (&["a", "b", "c", "-o", LAYERS], ErrorKind::ArgumentConflict),
            (&["--bogus", "/merged"], ErrorKind::UnknownArgument),
            (&["-h"], ErrorKind::DisplayHelp),
            (&["--help"], ErrorKind::DisplayHelp),
            (&["-V"], ErrorKind::DisplayVersion),
            (&["--version"], ErrorKind::DisplayVersion),
        ];
        for (args, want) in cases {
            assert_eq!(clap_kind(args), *want, "{args:?}");
        }
    }

    #[test]
    fn config_errors() {
        let missing = "missing 'lowerdir' option: give at least one lower directory with \
                       -o lowerdir=DIR[:DIR...]";
        let cases: &[(&[&str], &str)] = &[
            (&["/merged"], missing),
            (&["-o", "upperdir=/u,workdir=/w", "/merged"], missing),
            (
                &["-o", "lowerdir=/l,upperdir=/u", "/merged"],
                "'upperdir' needs 'workdir'",
            ),
            (
                &["-o", "lowerdir=/l,workdir=/w", "/merged"],
                "'workdir' needs 'upperdir'",
            ),
            (
                &["-o", "lowerdir=/l,frob", "/merged"],
                "unknown option 'frob'",
            ),
            (
                &["-o", "lowerdir=/l,plugins=x", "/merged"],
                "option 'plugins' is not supported",
            ),
        ];
        for (args, want) in cases {
            assert_eq!(config_error(args), *want, "{args:?}");
        }
    }

    #[test]
    fn version_names_the_program() {
        let CliError::Clap(e) = failure(&["-V"]) else {
            panic!("not a clap error")
        };
        assert_eq!(
            e.to_string().trim(),
            format!("rsfs-overlay {}", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn help_lists_every_option() {
        let help = command().render_long_help().to_string();
        let names = OPTION_TABLE
            .iter()
            .flat_map(|(syntax, _)| syntax.split(", "))
            .chain(IGNORED_OPTIONS.iter().copied())
            .chain(NOT_IMPLEMENTED_OPTIONS.iter().copied())
            .chain(["x-*", "plugins=", "demo", "-f", "-d", "-o"]);
        for name in names {
            assert!(help.contains(name), "help does not mention {name}:\n{help}");
        }
        assert!(help.lines().all(|l| l.len() <= 100), "{help}");
    }

    #[test]
    fn every_documented_option_is_accepted() {
        // Each honoured option in the table, with a value where its syntax asks for one.
        for (syntax, _) in OPTION_TABLE {
            for spelling in syntax.split(", ") {
                let opt = match spelling.split_once('=') {
                    // A mapping takes DISK:PRESENTED:LENGTH triples, a choice its first
                    // alternative, everything else a number or a path.
                    Some((key, _)) if key.ends_with("mapping") => format!("{key}=0:1000:1"),
                    Some((key, choices)) if choices.contains('|') => {
                        format!("{key}={}", choices.split('|').next().unwrap_or_default())
                    }
                    Some((key, _)) => format!("{key}=1"),
                    None => spelling.to_owned(),
                };
                let mut cfg = Config::new(PathBuf::from("/m"), false);
                let got = config::parse_options(&opt, &mut cfg);
                assert_eq!(got, Ok(()), "{opt}");
                assert!(cfg.warnings.is_empty(), "{opt}: {:?}", cfg.warnings);
            }
        }
    }
}
