//! The `rsfs-overlay` command: parse the command line, check the set-up, open the layers,
//! mount, daemonize and serve. Every start-up failure is one line on stderr and a non-zero
//! exit, before anything is mounted.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{error, info, warn};

use rsfs_overlay::cli::{self, CliError, Command};
use rsfs_overlay::config::{Config, UuidMode};
use rsfs_overlay::daemon::{self, StartupPipe};
use rsfs_overlay::format::XattrNames;
use rsfs_overlay::fuse::{FuseAdapter, Presentation};
use rsfs_overlay::overlay::{Overlay, OverlayOptions};
use rsfs_overlay::stack::Stack;
use rsfs_overlay::workdir::WorkDir;
use rsfs_overlay::{demo, dirfd, incompat, logging, preflight, privilege, sys, tools};

fn main() -> ExitCode {
    let is_root = nix::unistd::geteuid().is_root();
    let command = match cli::parse_cli(std::env::args_os(), is_root) {
        Ok(c) => c,
        Err(CliError::Clap(e)) => e.exit(),
        Err(CliError::Config(e)) => return fail(&anyhow::anyhow!(e)),
    };
    let result = match command {
        Command::Demo => demo::run().context("demo failed"),
        Command::Mount(cfg) => mount_and_serve(cfg),
        Command::Tool(tool) => {
            logging::init(false);
            tools::run(&tool)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("rsfs-overlay: {e:#}");
    ExitCode::FAILURE
}

/// Everything that can fail for a reason the user must fix happens here, before the fork.
fn open_overlay(cfg: &Config) -> anyhow::Result<Overlay> {
    let work = match (&cfg.upperdir, &cfg.workdir) {
        (Some(upper), Some(workdir)) => Some(WorkDir::prepare(upper, workdir)?),
        _ => None,
    };
    let index = match &work {
        Some(work) if cfg.index && !cfg.read_only => Some(std::sync::Arc::new(
            work.open_index()
                .context("index=on: cannot open the index directory in workdir")?,
        )),
        _ => None,
    };
    let names = XattrNames {
        userxattr: cfg.userxattr,
    };
    let mut stack = Stack::open(cfg.upperdir.as_deref(), &cfg.lowerdirs, work, names)
        .context("cannot open the layers")?;
    stack.follow_redirects = cfg.redirect_mode().follows();
    stack.metacopy = cfg.metacopy;
    if cfg.uuid == UuidMode::Off && !stack.use_null_origin_uuids() {
        warn!("uuid=off needs every layer on one filesystem: using uuid=null, as the kernel does");
    }
    stack.index = index;
    rsfs_overlay::index::verify_roots(&stack).map_err(anyhow::Error::msg)?;
    let opts = OverlayOptions {
        read_only: cfg.read_only || cfg.upperdir.is_none(),
        sync: cfg.fsync && !cfg.volatile,
        create_redirects: cfg.redirect_mode().creates(),
        caps: cfg.caps,
        uuid: cfg.uuid,
    };
    Overlay::new(stack, opts).context("cannot open the layers")
}

fn mount_and_serve(mut cfg: Config) -> anyhow::Result<()> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    cfg.make_absolute(&cwd);
    if cfg.upperdir.is_none() {
        cfg.read_only = true;
    }
    preflight::check(&cfg)?;
    if let Some(path) = &cfg.log_file {
        logging::open_log_file(path)
            .with_context(|| format!("cannot open the log file '{}'", path.display()))?;
    }
    logging::init(cfg.debug);
    for w in &cfg.warnings {
        warn!("{w}");
    }
    if cfg.volatile && cfg.upperdir.is_none() {
        cfg.volatile = false;
        info!("option 'volatile' means nothing without an upper layer: ignored, as by the kernel");
    }
    if !cfg.userxattr && privilege::lacks_trusted_xattrs() {
        cfg.userxattr = true;
        info!(
            "trusted.* xattrs are out of reach (user namespace or not root): \
             overlay metadata goes to user.overlay.*, as with -o userxattr"
        );
    }
    // Modes of new objects are exactly what callers ask for; the kernel applied their umask.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    sys::configure_allocator();
    match sys::raise_nofile_limit() {
        Ok(limit) => dirfd::set_budget_from_limit(limit),
        Err(e) => warn!(error = %e, "cannot raise the open file limit"),
    }
    let overlay = open_overlay(&cfg)?;
    let ttl = cfg
        .timeout
        .map_or(daemon::DEFAULT_TIMEOUT, Duration::from_secs_f64);
    let show = Presentation {
        ids: cfg.id_maps(),
        static_nlink: cfg.static_nlink,
        acl: cfg.acl,
        xattrs: cfg.xattrs,
        passthrough: cfg.passthrough,
        ..Presentation::new(ttl)
    };
    let adapter = FuseAdapter::new(overlay, show);

    let mut report_to = None;
    if !cfg.foreground {
        let pipe = StartupPipe::new().context("cannot create a pipe")?;
        match sys::fork().context("cannot fork the daemon")? {
            Some(_child) => {
                // Exit without running destructors: the daemon shares our open files, and
                // dropping them here would release its locks on the upper and workdir.
                let code = match pipe.wait() {
                    Ok(()) => 0,
                    Err(msg) => {
                        eprintln!("rsfs-overlay: {msg}");
                        1
                    }
                };
                std::process::exit(code);
            }
            None => report_to = Some(pipe.into_writer()),
        }
    }
    // The marker goes down just before the mount and comes off if the mount fails: nothing was
    // written through it then, and a marker left behind would refuse the next try.
    let work = adapter.overlay().stack().work.as_ref().map(|w| w.fd());
    let volatile_work = work.filter(|_| cfg.volatile);
    if let Some(work) = volatile_work
        && let Err(e) = incompat::mark_volatile(work)
    {
        let workdir = cfg
            .workdir
            .as_ref()
            .map_or(String::new(), |w| w.display().to_string());
        let msg = format!("cannot write the 'volatile' marker in workdir '{workdir}': {e}");
        return fail_startup(report_to, msg);
    }
    let dev = match daemon::mount_fuse(&cfg) {
        Ok(dev) => dev,
        Err(e) => {
            if let Some(work) = volatile_work
                && let Err(e) = incompat::unmark_volatile(work)
            {
                warn!(error = %e, "cannot remove the 'volatile' marker of the failed mount");
            }
            let msg = format!("cannot mount on '{}': {e}", cfg.mountpoint.display());
            return fail_startup(report_to, msg);
        }
    };
    let detach = !cfg.foreground;
    let served = daemon::serve(adapter, dev, &cfg, || {
        daemon::report(&mut report_to, Ok(()));
        if detach {
            logging::detach();
            if let Err(e) = daemon::detach_stdio() {
                warn!(error = %e, "cannot detach from the terminal");
            }
        }
    });
    if let Err(e) = served {
        let msg = format!("serving '{}' failed: {e}", cfg.mountpoint.display());
        let _ = daemon::unmount(&cfg.mountpoint);
        if detach {
            // Its terminal is gone: the log is the only place the message can go.
            error!("{msg}");
        }
        return fail_startup(report_to, msg);
    }
    Ok(())
}

/// Ends a start-up that failed. A forked daemon hands the message to the launcher, which
/// prints it, and exits quietly; a foreground one returns it to be printed once.
fn fail_startup(report_to: Option<std::fs::File>, msg: String) -> anyhow::Result<()> {
    match report_to {
        Some(pipe) => {
            daemon::report(&mut Some(pipe), Err(msg));
            std::process::exit(1);
        }
        None => bail!(msg),
    }
}
