//! The mount configuration and the parsing of `-o` option strings into it.
//!
//! Parsing is pure (no I/O) so every rule can be tested from a table; whether the paths exist is
//! the business of `preflight`. The option vocabulary is the union of what the kernel's overlayfs,
//! fuse-overlayfs and mount(8)/mount.fuse3 pass, because callers such as containers/storage and
//! fstab entries hand us their strings unchanged.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::idmap::{IdMap, IdMaps, IdRange};

/// The name used for `fsname` and `subtype` when nothing else is given.
pub const DEFAULT_NAME: &str = "rsfs-overlay";

/// Options accepted and ignored without a word, matched by key whatever their value.
///
/// mount(8), fstab and mount.fuse3 pass these through; SELinux `*context=` labels are applied by
/// the kernel to the FUSE mount itself, not by us. `x-*` options (systemd, udisks) are ignored too.
pub const IGNORED_OPTIONS: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "_netdev",
    "nofail",
    "relatime",
    "strictatime",
    "lazytime",
    "sync",
    "async",
    "dirsync",
    "rootcontext",
    "context",
    "fscontext",
    "defcontext",
];

/// fuse-overlayfs and kernel overlayfs options we accept but do not implement yet.
///
/// They are accepted so that existing command lines keep working; each use leaves a line in
/// [`Config::warnings`] unless its value asks for what we already do, such as `index=off`.
pub const NOT_IMPLEMENTED_OPTIONS: &[&str] =
    &["writeback", "xattr_permissions", "ino32_t", "nfs_export"];

/// `key=value` pairs among [`NOT_IMPLEMENTED_OPTIONS`] that describe our current behaviour, so
/// warning about them would be wrong: we serve no NFS export and do no xattr permission
/// mapping.
const ALREADY_SO: &[(&str, &str)] = &[("nfs_export", "off"), ("xattr_permissions", "0")];

/// The kernel's `redirect_dir=`: whether renaming a directory that has lower content writes a
/// redirect (instead of failing with EXDEV), and whether redirects found are followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedirectDir {
    /// Write redirects on directory renames, and follow them.
    On,
    /// Follow redirects, never write them.
    Follow,
    /// Never write them; follow them (the kernel module's `redirect_always_follow=Y`).
    Off,
    /// Neither write nor follow them.
    NoFollow,
}

impl RedirectDir {
    /// The option's value as written.
    pub fn name(self) -> &'static str {
        match self {
            RedirectDir::On => "on",
            RedirectDir::Follow => "follow",
            RedirectDir::Off => "off",
            RedirectDir::NoFollow => "nofollow",
        }
    }

    pub fn creates(self) -> bool {
        self == RedirectDir::On
    }

    pub fn follows(self) -> bool {
        self != RedirectDir::NoFollow
    }
}

/// The kernel's `uuid=`: whether the overlay has a persistent UUID of its own (the `uuid` xattr
/// on the upper root) and whether origin records carry the lower filesystem's UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UuidMode {
    /// Give the upper a UUID if it has none.
    On,
    /// Write none; origin records carry a null UUID, so a copied disk whose filesystem UUID
    /// changed still finds them (the kernel allows it only on a single-filesystem stack).
    Off,
    /// Write none; origin records carry the lower filesystem's UUID.
    Null,
    /// `On` for a new upper, `Null` for one used before without a UUID (the default).
    #[default]
    Auto,
}

/// `passthrough=`: which open files the kernel reads and writes itself (FUSE passthrough, where
/// the kernel and our privileges allow it), instead of sending each read and write to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughMode {
    /// Upper and lower files (the default): lower files are cached once, by their own
    /// filesystem, however many mounts read them. A reader open before a copy-up keeps
    /// reading the lower file.
    All,
    /// Only files in the upper: a lower file open before a copy-up reads the copy from then
    /// on, as under the kernel's overlay.
    Upper,
    /// None.
    Off,
}

/// Everything a mount needs to know, as given on the command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Lower layers, top-most first: `lowerdir=/l2:/l1` gives `[/l2, /l1]`.
    pub lowerdirs: Vec<PathBuf>,
    /// The writable layer; without it the mount is read-only.
    pub upperdir: Option<PathBuf>,
    /// Scratch directory on the upper filesystem, used to make copy-up atomic.
    pub workdir: Option<PathBuf>,
    /// Where the merged view is mounted.
    pub mountpoint: PathBuf,
    /// `fsname=`, else the mount(8) source argument, else [`DEFAULT_NAME`].
    pub fsname: String,
    /// `subtype=`, else [`DEFAULT_NAME`]; the mount shows as `fuse.<subtype>`.
    pub subtype: String,
    /// `-f`: stay in the foreground instead of daemonizing.
    pub foreground: bool,
    /// `-d` or `-o debug`: log every request; like libfuse, both also imply `foreground`.
    pub debug: bool,
    /// `-o ro`, or no upperdir.
    pub read_only: bool,
    /// Let users other than the mounter access the mount.
    pub allow_other: bool,
    /// Let the kernel check permissions from the modes we report.
    pub default_permissions: bool,
    /// Honour set-user-id and set-group-id bits.
    pub suid: bool,
    /// Allow access to device nodes through the mount.
    pub dev: bool,
    /// Allow executing files from the mount.
    pub exec: bool,
    /// Do not update access times.
    pub noatime: bool,
    /// The kernel's `userxattr`: overlay metadata in `user.overlay.*` instead of `trusted.overlay.*`.
    pub userxattr: bool,
    /// The cap on the writable layer (`upper_limit=SIZE`, `upper_inodes=N`).
    pub caps: crate::quota::Caps,
    /// Number of threads serving requests (`threads=N` or fuse-overlayfs's `threaded=N`).
    pub threads: Option<usize>,
    /// Entry and attribute cache timeout in seconds (fuse-overlayfs's `timeout=`).
    pub timeout: Option<f64>,
    /// `passthrough=all|upper|off`.
    pub passthrough: PassthroughMode,
    /// fuse-overlayfs's `uidmapping=`/`gidmapping=` and `squash_to_*`: ids on disk against ids
    /// shown through the mount.
    pub uid_ranges: Vec<IdRange>,
    pub gid_ranges: Vec<IdRange>,
    pub squash_to_root: bool,
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    /// `static_nlink`: directories report one link, as fuse-overlayfs's option.
    pub static_nlink: bool,
    /// POSIX ACLs enforced and settable (`noacl` turns them off).
    pub acl: bool,
    /// Extended attributes readable and settable through the mount (`noxattrs=1` turns them off).
    pub xattrs: bool,
    /// fsync reaches the upper (`fsync=0` makes it a no-op, for throwaway uppers).
    pub fsync: bool,
    /// `redirect_dir=`: the kernel module's default, `off` (redirects followed, not written).
    /// Read it through [`Config::redirect_mode`], which accounts for `metacopy=on`.
    pub redirect_dir: RedirectDir,
    /// Whether `redirect_dir=` was given (`metacopy=on` turns it on only when it was not).
    pub redirect_dir_given: bool,
    /// `metacopy=on`: metadata changes copy up no data, and metacopy files are followed.
    pub metacopy: bool,
    /// `index=on`: the kernel's index directory keeps the names of a copied-up hard link
    /// together (`<workdir>/index`), and the upper is tied to its lower layers.
    pub index: bool,
    /// The kernel's `volatile`: no sync reaches the upper, and the workdir carries the kernel's
    /// marker (`work/incompat/volatile`) so that a later mount is refused until it is removed.
    pub volatile: bool,
    /// `uuid=`: the kernel's default is `auto`.
    pub uuid: UuidMode,
    /// `log_file=PATH`: once detached, log there instead of syslog.
    pub log_file: Option<PathBuf>,
    /// One line per accepted-but-not-implemented option, for main to log.
    pub warnings: Vec<String>,
}

/// A problem with the options, as one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(message: String) -> Result<T, ConfigError> {
    Err(ConfigError(message))
}

impl Config {
    /// A configuration with no layers yet and the defaults of fuse-overlayfs, which always adds
    /// `default_permissions,noatime` and, when run as root, `allow_other,suid` too. `dev` stays
    /// off and `exec` on, as libfuse mounts by default.
    pub fn new(mountpoint: PathBuf, is_root: bool) -> Config {
        Config {
            lowerdirs: Vec::new(),
            upperdir: None,
            workdir: None,
            mountpoint,
            fsname: DEFAULT_NAME.to_owned(),
            subtype: DEFAULT_NAME.to_owned(),
            foreground: false,
            debug: false,
            read_only: false,
            allow_other: is_root,
            default_permissions: true,
            suid: is_root,
            dev: false,
            exec: true,
            noatime: true,
            userxattr: false,
            caps: crate::quota::Caps::default(),
            threads: None,
            timeout: None,
            passthrough: PassthroughMode::All,
            uid_ranges: Vec::new(),
            gid_ranges: Vec::new(),
            squash_to_root: false,
            squash_to_uid: None,
            squash_to_gid: None,
            static_nlink: false,
            acl: true,
            xattrs: true,
            fsync: true,
            log_file: None,
            redirect_dir: RedirectDir::Off,
            redirect_dir_given: false,
            metacopy: false,
            index: false,
            volatile: false,
            uuid: UuidMode::Auto,
            warnings: Vec::new(),
        }
    }

    /// The redirect mode in force: `metacopy=on` without `redirect_dir=` means `on` with an
    /// upper and `follow` without, as in the kernel.
    pub fn redirect_mode(&self) -> RedirectDir {
        match (
            self.metacopy && !self.redirect_dir_given,
            self.upperdir.is_some(),
        ) {
            (true, true) => RedirectDir::On,
            (true, false) => RedirectDir::Follow,
            (false, _) => self.redirect_dir,
        }
    }

    /// The id mappings the options describe; `squash_to_uid`/`squash_to_gid` take precedence
    /// over `squash_to_root`, as in fuse-overlayfs.
    pub fn id_maps(&self) -> IdMaps {
        let root = self.squash_to_root.then_some(0);
        IdMaps {
            uids: IdMap {
                ranges: self.uid_ranges.clone(),
                squash: self.squash_to_uid.or(root),
            },
            gids: IdMap {
                ranges: self.gid_ranges.clone(),
                squash: self.squash_to_gid.or(root),
            },
        }
    }

    /// Checks that the options, taken together, describe a mountable stack: at least one lower
    /// layer, and upperdir and workdir either both given or both absent.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lowerdirs.is_empty() {
            return err(
                "missing 'lowerdir' option: give at least one lower directory with \
                 -o lowerdir=DIR[:DIR...]"
                    .to_owned(),
            );
        }
        if self.metacopy && self.redirect_dir_given {
            // The kernel's rule: metacopy files are found through redirects once renamed.
            let conflicts = match self.redirect_dir {
                RedirectDir::On => false,
                RedirectDir::Follow => self.upperdir.is_some(),
                RedirectDir::Off | RedirectDir::NoFollow => true,
            };
            if conflicts {
                return err(format!(
                    "conflicting options: metacopy=on needs redirect_dir=on{}, not redirect_dir={}",
                    if self.upperdir.is_some() {
                        ""
                    } else {
                        " or follow"
                    },
                    self.redirect_dir.name()
                ));
            }
        }
        if self.caps.any() && self.upperdir.is_none() {
            return err("'upper_limit' and 'upper_inodes' need 'upperdir'".to_owned());
        }
        match (&self.upperdir, &self.workdir) {
            (Some(_), None) => err("'upperdir' needs 'workdir'".to_owned()),
            (None, Some(_)) => err("'workdir' needs 'upperdir'".to_owned()),
            _ => Ok(()),
        }
    }

    /// Makes every relative layer path and the mountpoint absolute against `cwd`, so that they
    /// keep meaning the same directories after the daemon changes directory. Pure: the caller
    /// supplies the current directory.
    pub fn make_absolute(&mut self, cwd: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = cwd.join(&*p);
            }
        };
        self.lowerdirs.iter_mut().for_each(fix);
        self.upperdir.iter_mut().for_each(fix);
        self.workdir.iter_mut().for_each(fix);
        self.log_file.iter_mut().for_each(fix);
        fix(&mut self.mountpoint);
    }
}

/// Applies one `-o` string (comma separated) to `cfg`; later options override earlier ones.
pub fn parse_options(opts: &str, cfg: &mut Config) -> Result<(), ConfigError> {
    for item in split_options(opts) {
        let (key, value) = match item.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (item.as_str(), None),
        };
        apply_option(key, value, cfg)?;
    }
    Ok(())
}

/// Splits an option string on commas. A backslash-escaped comma and commas inside double quotes
/// (SELinux labels such as `context="...:c1,c2"`) do not split; escapes and quotes are kept in the
/// items, to be removed per value by whoever interprets it. Empty items are dropped, because
/// callers such as containers/storage produce `...,workdir=W,,volatile`.
pub fn split_options(opts: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut chars = opts.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ',' if !in_quotes => {
                if !current.is_empty() {
                    items.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        items.push(current);
    }
    items
}

/// Splits a `lowerdir=` value into directories, top-most first.
///
/// `:` separates; a backslash makes the next character literal (`\:`, `\,`, `\\`), as in the
/// kernel. The kernel's data-only layers (`/a::/b`) are refused rather than silently merged.
pub fn split_lowerdir(value: &str) -> Result<Vec<PathBuf>, ConfigError> {
    if value.is_empty() {
        return err("option 'lowerdir' needs a value".to_owned());
    }
    let mut dirs = Vec::new();
    let mut current = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            // A trailing lone backslash has nothing to escape, so it stands for itself.
            '\\' => current.push(chars.next().unwrap_or('\\')),
            ':' => dirs.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    dirs.push(current);

    let last = dirs.len() - 1;
    if let Some(i) = dirs.iter().position(String::is_empty) {
        if i != 0 && i != last {
            return err("data-only lower layers ('::') are not supported".to_owned());
        }
        return err(format!(
            "option 'lowerdir' has an empty directory in '{value}'"
        ));
    }
    Ok(dirs.into_iter().map(PathBuf::from).collect())
}

/// Removes backslash escapes from a single value (a path or a name).
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().unwrap_or('\\')),
            _ => out.push(c),
        }
    }
    out
}

fn apply_option(key: &str, value: Option<&str>, cfg: &mut Config) -> Result<(), ConfigError> {
    match key {
        "lowerdir" => cfg.lowerdirs = split_lowerdir(required(key, value)?)?,
        "upperdir" => cfg.upperdir = Some(PathBuf::from(unescape(required(key, value)?))),
        "workdir" => cfg.workdir = Some(PathBuf::from(unescape(required(key, value)?))),
        "fsname" => cfg.fsname = unescape(required(key, value)?),
        "subtype" => cfg.subtype = unescape(required(key, value)?),
        "threads" => cfg.threads = Some(parse_threads(key, required(key, value)?, false)?),
        // fuse-overlayfs's spelling, where 0 asked for a single thread.
        "threaded" => cfg.threads = Some(parse_threads(key, required(key, value)?, true)?),
        "timeout" => cfg.timeout = Some(parse_timeout(required(key, value)?)?),
        "uidmapping" => cfg.uid_ranges = parse_mapping(key, required(key, value)?)?,
        "gidmapping" => cfg.gid_ranges = parse_mapping(key, required(key, value)?)?,
        "squash_to_uid" => cfg.squash_to_uid = Some(parse_id(key, required(key, value)?)?),
        "squash_to_gid" => cfg.squash_to_gid = Some(parse_id(key, required(key, value)?)?),
        "noxattrs" => cfg.xattrs = !parse_switch(key, required(key, value)?)?,
        "fsync" => cfg.fsync = parse_switch(key, required(key, value)?)?,
        "redirect_dir" => {
            cfg.redirect_dir = parse_redirect_dir(required(key, value)?)?;
            cfg.redirect_dir_given = true;
        }
        "metacopy" => cfg.metacopy = parse_on_off(key, required(key, value)?)?,
        "passthrough" => cfg.passthrough = parse_passthrough(required(key, value)?)?,
        "index" => cfg.index = parse_on_off(key, required(key, value)?)?,
        "xino" => apply_xino(required(key, value)?, cfg)?,
        "uuid" => cfg.uuid = parse_uuid(value.unwrap_or(""))?,
        "log_file" => cfg.log_file = Some(PathBuf::from(unescape(required(key, value)?))),
        "upper_limit" => cfg.caps.bytes = Some(parse_size(key, required(key, value)?)?),
        "upper_inodes" => cfg.caps.inodes = Some(parse_count(key, required(key, value)?)?),
        "plugins" => return err("option 'plugins' is not supported".to_owned()),
        _ => return apply_keyword(key, value, cfg),
    }
    Ok(())
}

/// Every option but the valued ones above: flags we honour (which take no value), options we
/// ignore or warn about (with or without a value), and unknown ones.
fn apply_keyword(key: &str, value: Option<&str>, cfg: &mut Config) -> Result<(), ConfigError> {
    if let Some(set) = flag_setter(key) {
        if value.is_some() {
            return err(format!("option '{key}' does not take a value"));
        }
        set(cfg);
        return Ok(());
    }
    if IGNORED_OPTIONS.contains(&key) || key.starts_with("x-") {
        return Ok(());
    }
    if NOT_IMPLEMENTED_OPTIONS.contains(&key) {
        let already_so = value.is_some_and(|v| ALREADY_SO.contains(&(key, v)));
        if !already_so {
            cfg.warnings.push(format!(
                "option '{key}' is not implemented yet and was ignored"
            ));
        }
        return Ok(());
    }
    err(format!("unknown option '{key}'"))
}

fn flag_setter(key: &str) -> Option<fn(&mut Config)> {
    let set: fn(&mut Config) = match key {
        "ro" => |c| c.read_only = true,
        "rw" => |c| c.read_only = false,
        "allow_other" => |c| c.allow_other = true,
        "default_permissions" => |c| c.default_permissions = true,
        "suid" => |c| c.suid = true,
        "nosuid" => |c| c.suid = false,
        "dev" => |c| c.dev = true,
        "nodev" => |c| c.dev = false,
        "exec" => |c| c.exec = true,
        "noexec" => |c| c.exec = false,
        "atime" => |c| c.noatime = false,
        "noatime" => |c| c.noatime = true,
        "userxattr" => |c| c.userxattr = true,
        "squash_to_root" => |c| c.squash_to_root = true,
        "static_nlink" => |c| c.static_nlink = true,
        "noacl" => |c| c.acl = false,
        "volatile" => |c| c.volatile = true,
        // libfuse treats `-o debug` like `-d`: debugging output is useless once daemonized.
        "debug" => |c| {
            c.debug = true;
            c.foreground = true;
        },
        _ => return None,
    };
    Some(set)
}

fn required<'v>(key: &str, value: Option<&'v str>) -> Result<&'v str, ConfigError> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => err(format!("option '{key}' needs a value")),
    }
}

/// A size with an optional binary suffix: `512`, `64K`, `100M`, `2G`, `1T` (`KiB` style and
/// lower case accepted too). Zero is refused: a layer that can hold nothing is a mistake.
fn parse_size(key: &str, value: &str) -> Result<u64, ConfigError> {
    let bad = || {
        ConfigError(format!(
            "option '{key}' needs a size like 512M or 2G, not '{value}'"
        ))
    };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, suffix) = v.split_at(split);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
    if bytes == 0 {
        return err(format!("option '{key}' must be more than 0"));
    }
    Ok(bytes)
}

fn parse_count(key: &str, value: &str) -> Result<u64, ConfigError> {
    match value.parse::<u64>() {
        Ok(0) => err(format!("option '{key}' must be more than 0")),
        Ok(n) => Ok(n),
        Err(_) => err(format!(
            "option '{key}' needs a whole number, not '{value}'"
        )),
    }
}

fn parse_threads(key: &str, value: &str, zero_means_one: bool) -> Result<usize, ConfigError> {
    match value.parse::<usize>() {
        Ok(0) if zero_means_one => Ok(1),
        Ok(0) => err(format!("option '{key}' must be at least 1")),
        Ok(n) => Ok(n),
        Err(_) => err(format!(
            "option '{key}' needs a whole number of threads, not '{value}'"
        )),
    }
}

fn parse_redirect_dir(value: &str) -> Result<RedirectDir, ConfigError> {
    Ok(match value {
        "on" => RedirectDir::On,
        "follow" => RedirectDir::Follow,
        "off" => RedirectDir::Off,
        "nofollow" => RedirectDir::NoFollow,
        _ => {
            return err(format!(
                "option 'redirect_dir' needs on, follow, off or nofollow, not '{value}'"
            ));
        }
    })
}

fn parse_uuid(value: &str) -> Result<UuidMode, ConfigError> {
    Ok(match value {
        "on" => UuidMode::On,
        "off" => UuidMode::Off,
        "null" => UuidMode::Null,
        "auto" => UuidMode::Auto,
        _ => {
            return err(format!(
                "option 'uuid' needs on, off, null or auto, not '{value}'"
            ));
        }
    })
}

fn parse_mapping(key: &str, value: &str) -> Result<Vec<IdRange>, ConfigError> {
    IdMap::parse_ranges(key, value).map_err(|e| ConfigError(e.0))
}

fn parse_id(key: &str, value: &str) -> Result<u32, ConfigError> {
    match value.parse::<u32>() {
        Ok(id) if id != u32::MAX => Ok(id),
        _ => err(format!("option '{key}' needs a numeric id, not '{value}'")),
    }
}

/// fuse-overlayfs's on/off values: `1` or `0`.
/// The kernel's `xino=`: `auto` and `on` are what we do (on a stack over several filesystems,
/// the filesystem's index goes in the high bits of every inode number). `off` cannot be had
/// through FUSE: the kernel then reports each lower object with its own layer's `st_dev`,
/// while a FUSE mount gives every object the mount's, so numbers must stay unique by
/// themselves; it is kept as `auto`, with a warning.
fn apply_xino(value: &str, cfg: &mut Config) -> Result<(), ConfigError> {
    match value {
        "auto" | "on" => Ok(()),
        "off" => {
            cfg.warnings.push(
                "option 'xino=off' is kept as xino=auto: through FUSE every object has the \
                 mount's st_dev, so inode numbers carry their filesystem's index to stay unique"
                    .to_owned(),
            );
            Ok(())
        }
        _ => err(format!(
            "option 'xino' needs auto, on or off, not '{value}'"
        )),
    }
}

/// A kernel option's `on`/`off`.
fn parse_passthrough(value: &str) -> Result<PassthroughMode, ConfigError> {
    match value {
        "all" => Ok(PassthroughMode::All),
        "upper" => Ok(PassthroughMode::Upper),
        "off" => Ok(PassthroughMode::Off),
        _ => err(format!(
            "option 'passthrough' needs all, upper or off, not '{value}'"
        )),
    }
}

fn parse_on_off(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => err(format!("option '{key}' needs on or off, not '{value}'")),
    }
}

fn parse_switch(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => err(format!("option '{key}' needs 0 or 1, not '{value}'")),
    }
}

fn parse_timeout(value: &str) -> Result<f64, ConfigError> {
    match value.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => err(format!(
            "option 'timeout' needs a number of seconds (0 or more), not '{value}'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(opts: &[&str], is_root: bool) -> Result<Config, ConfigError> {
        let mut cfg = Config::new(PathBuf::from("/m"), is_root);
        for o in opts {
            parse_options(o, &mut cfg)?;
        }
        Ok(cfg)
    }

    fn paths(ps: &[&str]) -> Vec<PathBuf> {
        ps.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn defaults_follow_fuse_overlayfs() {
        let cases = [(true, true, true), (false, false, false)];
        for (is_root, allow_other, suid) in cases {
            let cfg = Config::new(PathBuf::from("/m"), is_root);
            assert_eq!(cfg.allow_other, allow_other, "root={is_root}");
            assert_eq!(cfg.suid, suid, "root={is_root}");
            assert!(cfg.default_permissions && cfg.noatime && cfg.exec && !cfg.dev);
            assert!(!cfg.read_only && !cfg.debug && !cfg.foreground && !cfg.userxattr);
            assert_eq!(
                (cfg.fsname.as_str(), cfg.subtype.as_str()),
                (DEFAULT_NAME, DEFAULT_NAME)
            );
            assert_eq!((cfg.threads, cfg.timeout), (None, None));
            assert!(cfg.lowerdirs.is_empty() && cfg.warnings.is_empty());
        }
    }

    #[test]
    fn split_options_table() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            (",,,", &[]),
            ("a", &["a"]),
            ("a,b", &["a", "b"]),
            ("a,,b,", &["a", "b"]),
            (",a", &["a"]),
            ("workdir=W,,volatile", &["workdir=W", "volatile"]),
            (r"lowerdir=/a\,b:/c,ro", &[r"lowerdir=/a\,b:/c", "ro"]),
            (r"x=a\\,y", &[r"x=a\\", "y"]),
            (
                r#"context="system_u:object_r:c_t:s0:c1,c2",ro"#,
                &[r#"context="system_u:object_r:c_t:s0:c1,c2""#, "ro"],
            ),
            (r"trailing\", &[r"trailing\"]),
        ];
        for (input, want) in cases {
            assert_eq!(split_options(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn split_lowerdir_ok() {
        let cases: &[(&str, &[&str])] = &[
            ("/l", &["/l"]),
            ("/l2:/l1", &["/l2", "/l1"]),
            ("/a:/b:/c", &["/a", "/b", "/c"]),
            (r"/a\:b:/c", &["/a:b", "/c"]),
            (r"/a\,b", &["/a,b"]),
            (r"/a\\:/b", &[r"/a\", "/b"]),
            (r"/a\\\:b", &[r"/a\:b"]),
            (r"/a\", &[r"/a\"]),
            ("rel/dir:/abs", &["rel/dir", "/abs"]),
        ];
        for (input, want) in cases {
            assert_eq!(split_lowerdir(input), Ok(paths(want)), "input {input:?}");
        }
    }

    #[test]
    fn split_lowerdir_errors() {
        let cases = [
            ("", "option 'lowerdir' needs a value"),
            ("/a::/b", "data-only lower layers ('::') are not supported"),
            (
                "/a:/b::/c",
                "data-only lower layers ('::') are not supported",
            ),
            (":/a", "option 'lowerdir' has an empty directory in ':/a'"),
            ("/a:", "option 'lowerdir' has an empty directory in '/a:'"),
            (":", "option 'lowerdir' has an empty directory in ':'"),
        ];
        for (input, want) in cases {
            assert_eq!(
                split_lowerdir(input),
                err(want.to_owned()),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn layer_options() {
        let cfg = parsed(&["lowerdir=/l2:/l1,upperdir=/u,workdir=/w"], false).unwrap();
        assert_eq!(cfg.lowerdirs, paths(&["/l2", "/l1"]));
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/u")));
        assert_eq!(cfg.workdir, Some(PathBuf::from("/w")));

        // A later lowerdir replaces an earlier one; escapes are removed from single paths.
        let cfg = parsed(
            &[
                "lowerdir=/old",
                r"lowerdir=/new,upperdir=/u\,1,workdir=/w\:2",
            ],
            false,
        )
        .unwrap();
        assert_eq!(cfg.lowerdirs, paths(&["/new"]));
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/u,1")));
        assert_eq!(cfg.workdir, Some(PathBuf::from("/w:2")));
    }

    #[test]
    fn flags_table() {
        type Probe = fn(&Config) -> bool;
        let cases: &[(&str, bool, Probe)] = &[
            ("ro", false, |c| c.read_only),
            ("ro,rw", false, |c| !c.read_only),
            ("allow_other", false, |c| c.allow_other),
            ("default_permissions", false, |c| c.default_permissions),
            ("suid", false, |c| c.suid),
            ("nosuid", true, |c| !c.suid),
            ("dev", false, |c| c.dev),
            ("dev,nodev", false, |c| !c.dev),
            ("noexec", false, |c| !c.exec),
            ("noexec,exec", false, |c| c.exec),
            ("atime", false, |c| !c.noatime),
            ("atime,noatime", false, |c| c.noatime),
            ("userxattr", false, |c| c.userxattr),
            ("debug", false, |c| c.debug && c.foreground),
            ("fsname=myfs", false, |c| c.fsname == "myfs"),
            (r"fsname=a\,b", false, |c| c.fsname == "a,b"),
            ("subtype=ovl", false, |c| c.subtype == "ovl"),
            ("threads=4", false, |c| c.threads == Some(4)),
            ("threaded=0", false, |c| c.threads == Some(1)),
            ("threaded=8", false, |c| c.threads == Some(8)),
            ("threads=2,threaded=3", false, |c| c.threads == Some(3)),
            ("upper_limit=8M", false, |c| c.caps.bytes == Some(8 << 20)),
            ("upper_limit=2g", false, |c| c.caps.bytes == Some(2 << 30)),
            ("upper_limit=4096", false, |c| c.caps.bytes == Some(4096)),
            ("upper_inodes=200", false, |c| c.caps.inodes == Some(200)),
            ("timeout=0", false, |c| c.timeout == Some(0.0)),
            ("passthrough=upper", false, |c| {
                c.passthrough == PassthroughMode::Upper
            }),
            ("passthrough=off", false, |c| {
                c.passthrough == PassthroughMode::Off
            }),
            ("passthrough=all", false, |c| {
                c.passthrough == PassthroughMode::All
            }),
            ("timeout=1.5", false, |c| c.timeout == Some(1.5)),
            ("timeout=1000000000", false, |c| c.timeout == Some(1e9)),
        ];
        for (opts, is_root, probe) in cases {
            let cfg = parsed(&[opts], *is_root).unwrap_or_else(|e| panic!("{opts}: {e}"));
            assert!(probe(&cfg), "{opts}: {cfg:?}");
            assert!(cfg.warnings.is_empty(), "{opts}: {:?}", cfg.warnings);
        }
    }

    #[test]
    fn ignored_options_change_nothing() {
        let base = Config::new(PathBuf::from("/m"), false);
        let mut all: Vec<String> = IGNORED_OPTIONS.iter().map(|s| s.to_string()).collect();
        all.extend(
            [
                "x-systemd.automount",
                "x-gvfs-show",
                "context=\"system_u:object_r:container_file_t:s0:c1,c2\"",
                "rootcontext=system_u:object_r:tmp_t:s0",
                ",",
                "",
            ]
            .map(String::from),
        );
        for opt in all {
            assert_eq!(parsed(&[&opt], false), Ok(base.clone()), "{opt}");
        }
    }

    #[test]
    fn not_implemented_options_warn() {
        for key in NOT_IMPLEMENTED_OPTIONS {
            for opt in [key.to_string(), format!("{key}=on")] {
                let cfg = parsed(&[&opt], false).unwrap_or_else(|e| panic!("{opt}: {e}"));
                let want = format!("option '{key}' is not implemented yet and was ignored");
                assert_eq!(cfg.warnings, vec![want], "{opt}");
            }
        }
        let cfg = parsed(
            &["uidmapping=0:1000:1:1:100000:65536,nfs_export=on,writeback=1"],
            false,
        )
        .unwrap();
        assert_eq!(cfg.warnings.len(), 2);
    }

    #[test]
    fn xino_auto_and_on_are_what_we_do() {
        for v in ["auto", "on"] {
            let cfg = parsed(&[&format!("xino={v}")], false).unwrap();
            assert!(cfg.warnings.is_empty(), "xino={v}");
        }
        let cfg = parsed(&["xino=off"], false).unwrap();
        assert!(
            cfg.warnings[0].contains("kept as xino=auto"),
            "{:?}",
            cfg.warnings
        );
        assert!(parsed(&["xino=maybe"], false).is_err());
        assert!(parsed(&["xino"], false).is_err());
    }

    #[test]
    fn volatile_and_uuid() {
        let cfg = parsed(&["volatile"], false).unwrap();
        assert!(cfg.volatile && cfg.warnings.is_empty());
        assert_eq!(cfg.uuid, UuidMode::Auto);
        for (value, mode) in [
            ("on", UuidMode::On),
            ("off", UuidMode::Off),
            ("null", UuidMode::Null),
            ("auto", UuidMode::Auto),
        ] {
            let cfg = parsed(&[&format!("uuid={value}")], false).unwrap();
            assert_eq!(cfg.uuid, mode, "{value}");
        }
        // The kernel refuses both with "Bad value for 'uuid'".
        for bad in ["uuid", "uuid=", "uuid=yes"] {
            let e = parsed(&[bad], false).unwrap_err();
            assert!(
                e.0.starts_with("option 'uuid' needs on, off, null or auto"),
                "{bad}: {e}"
            );
        }
        assert!(parsed(&["volatile=1"], false).is_err());
    }

    #[test]
    fn fuse_overlayfs_mapping_options() {
        let cfg = parsed(
            &["uidmapping=:0:100000:65536,gidmapping=0:1000:1:1:100000:65536,squash_to_root,squash_to_gid=5"],
            false,
        )
        .unwrap();
        assert!(cfg.warnings.is_empty());
        let ids = cfg.id_maps();
        assert_eq!(ids.uids.disk(100001), 1);
        assert_eq!(ids.uids.presented(1), 0, "squash_to_root");
        assert_eq!(
            ids.gids.presented(1),
            5,
            "squash_to_gid wins over squash_to_root"
        );
        assert_eq!(ids.gids.disk(100000), 1);
        let cfg = parsed(&["static_nlink,noacl,noxattrs=1,fsync=0"], false).unwrap();
        assert!(cfg.static_nlink && !cfg.acl && !cfg.xattrs && !cfg.fsync);
        let cfg = parsed(&["noxattrs=0,fsync=1"], false).unwrap();
        assert!(cfg.xattrs && cfg.fsync && cfg.warnings.is_empty());
        for bad in [
            "uidmapping=0:1",
            "squash_to_uid=x",
            "fsync=2",
            "gidmapping=a:b:c",
        ] {
            let e = parsed(&[bad], false).unwrap_err();
            assert!(e.0.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn not_implemented_options_matching_our_behaviour_are_quiet() {
        for (key, value) in ALREADY_SO {
            let opt = format!("{key}={value}");
            let cfg = parsed(&[&opt], false).unwrap();
            assert!(cfg.warnings.is_empty(), "{opt}: {:?}", cfg.warnings);
        }
    }

    #[test]
    fn errors_table() {
        let cases = [
            ("lowerdir", "option 'lowerdir' needs a value"),
            ("lowerdir=", "option 'lowerdir' needs a value"),
            (
                "lowerdir=/a::/b",
                "data-only lower layers ('::') are not supported",
            ),
            ("upperdir", "option 'upperdir' needs a value"),
            ("upperdir=", "option 'upperdir' needs a value"),
            ("workdir", "option 'workdir' needs a value"),
            ("workdir=", "option 'workdir' needs a value"),
            ("fsname=", "option 'fsname' needs a value"),
            ("subtype", "option 'subtype' needs a value"),
            (
                "plugins=/usr/lib/plugin.so",
                "option 'plugins' is not supported",
            ),
            ("foo", "unknown option 'foo'"),
            ("foo=bar", "unknown option 'foo'"),
            ("lowerdir=/l,bogus", "unknown option 'bogus'"),
            ("ro=1", "option 'ro' does not take a value"),
            ("debug=yes", "option 'debug' does not take a value"),
            (
                "upper_limit=8X",
                "option 'upper_limit' needs a size like 512M or 2G, not '8X'",
            ),
            ("upper_limit=0", "option 'upper_limit' must be more than 0"),
            (
                "upper_limit=M",
                "option 'upper_limit' needs a size like 512M or 2G, not 'M'",
            ),
            (
                "upper_inodes=-1",
                "option 'upper_inodes' needs a whole number, not '-1'",
            ),
            ("threads", "option 'threads' needs a value"),
            ("threads=0", "option 'threads' must be at least 1"),
            (
                "threads=x",
                "option 'threads' needs a whole number of threads, not 'x'",
            ),
            (
                "threads=-1",
                "option 'threads' needs a whole number of threads, not '-1'",
            ),
            (
                "threaded=two",
                "option 'threaded' needs a whole number of threads, not 'two'",
            ),
            (
                "timeout=soon",
                "option 'timeout' needs a number of seconds (0 or more), not 'soon'",
            ),
            (
                "passthrough=lower",
                "option 'passthrough' needs all, upper or off, not 'lower'",
            ),
            (
                "timeout=-1",
                "option 'timeout' needs a number of seconds (0 or more), not '-1'",
            ),
            (
                "timeout=NaN",
                "option 'timeout' needs a number of seconds (0 or more), not 'NaN'",
            ),
            (
                "timeout=inf",
                "option 'timeout' needs a number of seconds (0 or more), not 'inf'",
            ),
        ];
        for (opts, want) in cases {
            assert_eq!(parsed(&[opts], false), err(want.to_owned()), "{opts}");
        }
    }

    #[test]
    fn error_display_is_the_message() {
        let e = ConfigError("option 'upperdir' needs a value".to_owned());
        assert_eq!(e.to_string(), "option 'upperdir' needs a value");
    }

    #[test]
    fn validate_table() {
        let missing = "missing 'lowerdir' option: give at least one lower directory with \
                       -o lowerdir=DIR[:DIR...]";
        let cases: &[(&str, Option<&str>)] = &[
            ("lowerdir=/l", None),
            ("lowerdir=/l,upperdir=/u,workdir=/w", None),
            ("upperdir=/u,workdir=/w", Some(missing)),
            ("", Some(missing)),
            (
                "lowerdir=/l,upperdir=/u",
                Some("'upperdir' needs 'workdir'"),
            ),
            ("lowerdir=/l,workdir=/w", Some("'workdir' needs 'upperdir'")),
        ];
        for (opts, want) in cases {
            let got = parsed(&[opts], false).unwrap().validate();
            assert_eq!(got, want.map_or(Ok(()), |w| err(w.to_owned())), "{opts}");
        }
    }

    #[test]
    fn make_absolute_joins_relative_paths_only() {
        let mut cfg = Config::new(PathBuf::from("m"), false);
        parse_options("lowerdir=l2:/l1,upperdir=u,workdir=/w", &mut cfg).unwrap();
        cfg.make_absolute(Path::new("/cwd"));
        assert_eq!(cfg.lowerdirs, paths(&["/cwd/l2", "/l1"]));
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/cwd/u")));
        assert_eq!(cfg.workdir, Some(PathBuf::from("/w")));
        assert_eq!(cfg.mountpoint, PathBuf::from("/cwd/m"));
    }
}
