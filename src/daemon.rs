//! Mounting and serving: the FUSE mount itself (mount(2) as root, fusermount3 otherwise),
//! daemonizing so that the command returns only once the mount is ready, and the signals that
//! end the daemon cleanly.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use tracing::{info, warn};

use crate::config::Config;
use crate::fuse::FuseAdapter;

/// How long the kernel caches names and attributes by default: we are the only writer of the
/// merged view, so a long time is safe (fuse-overlayfs's default is longer still).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Mounts a FUSE filesystem at the configured mountpoint with mount(2) and returns the
/// /dev/fuse fd that serves it. The mount shows as `fuse.<subtype>` with source `fsname`.
pub fn mount_fuse(cfg: &Config) -> io::Result<OwnedFd> {
    let dev = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())?;
    let root_mode = nix::sys::stat::stat(&cfg.mountpoint)?.st_mode;
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        dev.as_raw_fd(),
        root_mode & libc::S_IFMT,
        nix::unistd::getuid(),
        nix::unistd::getgid()
    );
    if cfg.default_permissions {
        data.push_str(",default_permissions");
    }
    if cfg.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::empty();
    flags.set(MsFlags::MS_NOSUID, !cfg.suid);
    flags.set(MsFlags::MS_NODEV, !cfg.dev);
    flags.set(MsFlags::MS_NOEXEC, !cfg.exec);
    flags.set(MsFlags::MS_NOATIME, cfg.noatime);
    flags.set(MsFlags::MS_RDONLY, cfg.read_only);
    let fstype = format!("fuse.{}", cfg.subtype);
    nix::mount::mount(
        Some(cfg.fsname.as_str()),
        &cfg.mountpoint,
        Some(fstype.as_str()),
        flags,
        Some(data.as_str()),
    )?;
    Ok(dev)
}

/// Detaches the mount at `path`; requests already in flight finish, new ones fail.
pub fn unmount(path: &Path) -> io::Result<()> {
    Ok(nix::mount::umount2(path, MntFlags::MNT_DETACH)?)
}

/// Serves the mounted filesystem until it is unmounted. `ready` is called once the kernel's
/// INIT handshake is done, i.e. when the mount answers requests.
pub fn serve(
    adapter: FuseAdapter,
    dev: OwnedFd,
    cfg: &Config,
    ready: impl FnOnce(),
) -> io::Result<()> {
    let acl = if cfg.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    let mut fuse_cfg = fuser::Config::default();
    fuse_cfg.n_threads = Some(cfg.threads.unwrap_or_else(default_threads));
    fuse_cfg.clone_fd = true;
    let notifier_slot: Arc<OnceLock<fuser::Notifier>> = Arc::new(OnceLock::new());
    let slot = notifier_slot.clone();
    adapter.overlay().set_attr_invalidator(Box::new(move |ino| {
        if let Some(n) = slot.get() {
            // Attributes only (offset -1): the kernel takes no lock that a request holds.
            let _ = n.inval_inode(fuser::INodeNo(ino), -1, 0);
        }
    }));
    let session = fuser::Session::from_fd(adapter, dev, acl, fuse_cfg)?;
    let _ = notifier_slot.set(session.notifier());
    install_signal_handlers(cfg.mountpoint.clone())?;
    info!(mountpoint = %cfg.mountpoint.display(), "mounted");
    ready();
    if let Err(e) = session.run() {
        // A lazy unmount while requests are in flight can end the channel with an error
        // other than ENODEV; once our mount is gone that is an ordinary end, not a failure.
        if is_still_mounted(&cfg.mountpoint) {
            return Err(e);
        }
        info!(error = %e, "the FUSE channel ended with an error after the unmount");
    }
    info!(mountpoint = %cfg.mountpoint.display(), "unmounted");
    Ok(())
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// SIGTERM, SIGINT and SIGHUP unmount and end the daemon with exit status 0; SIGUSR1 logs
/// the statistics.
fn install_signal_handlers(mountpoint: PathBuf) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGUSR1 {
                    // Statistics at warn level, so the default filter lets them through.
                    warn!("statistics: {}", crate::stats::summary());
                    continue;
                }
                info!(signal = sig, "unmounting on signal");
                if let Err(e) = unmount(&mountpoint) {
                    warn!(error = %e, "unmount on signal failed");
                }
                std::process::exit(0);
            }
        })?;
    Ok(())
}

/// The parent's end of the start-up handshake: the daemon reports "ok" or an error line.
pub struct StartupPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl StartupPipe {
    pub fn new() -> io::Result<StartupPipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        Ok(StartupPipe { read, write })
    }

    /// In the parent: waits for the daemon's verdict. `Ok` once the mount is ready, `Err`
    /// with the daemon's message otherwise (also when it died without a word).
    pub fn wait(self) -> Result<(), String> {
        drop(self.write);
        let mut msg = String::new();
        let mut file = std::fs::File::from(self.read);
        if file.read_to_string(&mut msg).is_err() {
            return Err("the daemon failed to start".into());
        }
        match msg.strip_prefix("ok") {
            Some(_) => Ok(()),
            None if msg.is_empty() => Err("the daemon exited before the mount was ready".into()),
            None => Err(msg.trim_end().to_string()),
        }
    }

    /// In the daemon: the writing end.
    pub fn into_writer(self) -> std::fs::File {
        drop(self.read);
        std::fs::File::from(self.write)
    }
}

/// Reports the daemon's start-up verdict to the waiting parent.
pub fn report(pipe: &mut Option<std::fs::File>, verdict: Result<(), String>) {
    if let Some(mut f) = pipe.take() {
        let msg = match verdict {
            Ok(()) => "ok".to_string(),
            Err(e) => e,
        };
        let _ = f.write_all(msg.as_bytes());
    }
}

/// Detaches from the terminal: a new session, `/` as working directory, stdio on /dev/null.
pub fn detach_stdio() -> io::Result<()> {
    let _ = nix::unistd::setsid();
    std::env::set_current_dir("/")?;
    let null = nix::fcntl::open("/dev/null", OFlag::O_RDWR, Mode::empty())?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(&null)?;
    nix::unistd::dup2_stderr(&null)?;
    Ok(())
}

/// True while `/proc/self/mountinfo` lists a FUSE mount at `mountpoint`.
fn is_still_mounted(mountpoint: &std::path::Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    let target = mountpoint.to_string_lossy();
    info.lines().any(|line| {
        let mut fields = line.split(' ');
        fields.nth(4) == Some(target.as_ref()) && line.contains(" - fuse")
    })
}
