//! Logging set-up, in one place: `tracing` events go to stderr while the daemon has a terminal
//! (foreground, or before it detaches), then to the file given with `log_file=` or else to
//! syslog (`/dev/log`), so nothing is lost silently once stderr is /dev/null. Where neither
//! is possible the daemon says so on stderr before it lets go of it. fuser's `log` records are
//! bridged into `tracing`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// Where events go: one of the `TO_*` values.
static TARGET: AtomicU8 = AtomicU8::new(TO_STDERR);
const TO_STDERR: u8 = 0;
const TO_SYSLOG: u8 = 1;
const TO_FILE: u8 = 2;

/// The `log_file=` file, opened before the daemon detaches.
static LOG_FILE: OnceLock<File> = OnceLock::new();

/// The syslog socket.
const SYSLOG_SOCKET: &str = "/dev/log";

/// Installs the subscriber: `debug` logs every request, otherwise warnings and errors only;
/// `RUST_LOG` overrides both.
pub fn init(debug: bool) {
    let default = if debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(LogTarget)
        .with_target(false)
        .try_init();
}

/// Opens the `log_file=` file (appending, created 0640), before anything is mounted so that
/// a bad path is a start-up error.
pub fn open_log_file(path: &Path) -> io::Result<()> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    let _ = LOG_FILE.set(file);
    Ok(())
}

/// From now on, log to the log file or syslog: called when the daemon gives up its terminal.
/// Says on stderr, while it still can, when there is nowhere to log to.
pub fn detach() {
    if LOG_FILE.get().is_some() {
        TARGET.store(TO_FILE, Ordering::Relaxed);
        return;
    }
    if !Path::new(SYSLOG_SOCKET).exists() {
        tracing::warn!(
            "no syslog socket at {SYSLOG_SOCKET}: messages after start-up are dropped; \
             give -o log_file=PATH or run with -f to keep them"
        );
    }
    TARGET.store(TO_SYSLOG, Ordering::Relaxed);
}

struct LogTarget;

impl<'a> MakeWriter<'a> for LogTarget {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine::new(Level::INFO)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LogLine {
        LogLine::new(*meta.level())
    }
}

/// One formatted event, sent as a whole when dropped.
pub struct LogLine {
    level: Level,
    buf: Vec<u8>,
}

impl LogLine {
    fn new(level: Level) -> LogLine {
        LogLine {
            level,
            buf: Vec::new(),
        }
    }
}

impl Write for LogLine {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match (TARGET.load(Ordering::Relaxed), LOG_FILE.get()) {
            (TO_FILE, Some(mut file)) => {
                let _ = file.write_all(&self.buf);
            }
            (TO_SYSLOG, _) => send_syslog(self.level, &self.buf),
            _ => {
                let _ = io::stderr().write_all(&self.buf);
            }
        }
    }
}

/// RFC 3164 severity for a tracing level, in the daemon facility.
fn priority(level: Level) -> u8 {
    const LOG_DAEMON: u8 = 3 << 3;
    let severity = match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    };
    LOG_DAEMON | severity
}

fn send_syslog(level: Level, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let msg = format!(
        "<{}>rsfs-overlay[{}]: {}",
        priority(level),
        std::process::id(),
        text.trim_end()
    );
    if let Ok(sock) = UnixDatagram::unbound() {
        let _ = sock.send_to(msg.as_bytes(), SYSLOG_SOCKET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_in_the_daemon_facility() {
        assert_eq!(priority(Level::ERROR), 27);
        assert_eq!(priority(Level::WARN), 28);
        assert_eq!(priority(Level::DEBUG), 31);
    }
}
