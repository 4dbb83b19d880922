//! A small stderr logger shared by all three roles, so one terminal (or journal) shows
//! which process said what: `vgpu-sandbox[renderer-worker 1234]: WARN ...`.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

/// Environment variable that carries the log level to the children.
pub const LOG_ENV: &str = "VGPU_SANDBOX_LOG";

struct StderrLogger {
    role: &'static str,
    pid: u32,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line so lines of concurrent threads and processes do not interleave.
        let line = format!(
            "vgpu-sandbox[{} {}]: {} {}\n",
            self.role,
            self.pid,
            record.level(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Parses a level name as accepted by `--log-level` and [`LOG_ENV`].
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse::<LevelFilter>().map_err(|_| {
        format!("invalid log level '{s}' (expected off, error, warn, info, debug or trace)")
    })
}

/// Installs the logger for this process.
pub fn init(role: &'static str, level: LevelFilter) {
    let logger = StderrLogger {
        role,
        // The pid the host sees: a child in its own pid namespace would otherwise log as 1.
        pid: policy::namespaces::pid_outside(),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
