//! Logging set-up, in one place: `tracing` events go to stderr while the daemon has a terminal
//! (foreground, or before it detaches), then to syslog (`/dev/log`), so nothing is lost
//! silently once stderr is /dev/null. fuser's `log` records are bridged into `tracing`.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

static TO_SYSLOG: AtomicBool = AtomicBool::new(false);

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

/// From now on, log to syslog: called when the daemon gives up its terminal.
pub fn detach_to_syslog() {
    TO_SYSLOG.store(true, Ordering::Relaxed);
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
        if TO_SYSLOG.load(Ordering::Relaxed) {
            send_syslog(self.level, &self.buf);
        } else {
            let _ = io::stderr().write_all(&self.buf);
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
        let _ = sock.send_to(msg.as_bytes(), "/dev/log");
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
