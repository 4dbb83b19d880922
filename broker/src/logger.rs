//! Logging for all roles (broker, spawner, device-frontend, renderer-worker): one line per
//! event on stderr, `vgpu-sandbox[vm1 renderer-worker 1234]: WARN ...`, so that one
//! terminal or journal shows which VM's which process said what.
//!
//! Why `tracing` (tracing-subscriber with an `EnvFilter`) rather than the hand-written
//! `log::Log` this replaced: `RUST_LOG` then takes the filter syntax operators know
//! (`RUST_LOG=vgpu_device_frontend=debug`), per crate and per module, without our own
//! parser; and the `tracing-log` bridge turns every `log::` line (ours and the vhost,
//! rutabaga and ipc-channel crates') into an event of the same subscriber, so no call site
//! changes. The line itself is still ours ([`Line`]): tracing-subscriber's stock formats
//! carry timestamps, targets and ANSI codes we do not want in a journal.
//!
//! What the jail allows decides the rest: the children install seccomp filters after
//! [`init`], which then forbid ioctl (isatty is ioctl(TCGETS)), opening files and creating
//! threads. So everything that needs such a call happens here, before the jail: reading
//! `RUST_LOG`, the terminal check for colours, the pid. Logging an event afterwards is
//! formatting into memory and one write(2) on fd 2; no timestamps (journald adds its own
//! and a clock read is one more thing to allow), no thread, no file.

use std::io::IsTerminal;
use std::sync::OnceLock;

use log::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Environment variable that carries the log level (`--log-level`) to the children.
pub const LOG_ENV: &str = "VGPU_SANDBOX_LOG";
/// Environment variable that carries the VM's name (`--name`) to the children.
pub const NAME_ENV: &str = "VGPU_SANDBOX_NAME";
/// The standard filter variable; when set it overrides `--log-level` for what it names.
pub const RUST_LOG: &str = "RUST_LOG";
/// Set (to `1`) when fd 2 is a datagram socket to the system log ([`route_lost_stderr`]):
/// every line is then one syslog message with its priority.
pub const SYSLOG_ENV: &str = "VGPU_SANDBOX_SYSLOG";
/// Where the system log listens; the variable of the same name overrides it (tests).
const SYSLOG_SOCKET: &str = "/dev/log";
/// syslog's daemon facility (3), shifted as a priority wants it.
const DAEMON: u8 = 3 << 3;
/// What a child calls its VM when the broker did not say (it always does).
const UNNAMED: &str = "unnamed";

static NAME: OnceLock<String> = OnceLock::new();

/// The VM name this process logs with, once [`init`] ran.
pub fn name() -> Option<&'static str> {
    NAME.get().map(String::as_str)
}

/// The VM name a child was started with ([`NAME_ENV`]).
pub fn name_from_env() -> String {
    std::env::var(NAME_ENV)
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| UNNAMED.into())
}

/// Parses a level name as accepted by `--log-level` and [`LOG_ENV`].
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    s.parse::<LevelFilter>().map_err(|_| {
        format!("invalid log level '{s}' (expected off, error, warn, info, debug or trace)")
    })
}

/// The filter: `level` for everything, then `RUST_LOG`'s directives on top. A bare level
/// in `RUST_LOG` replaces `level` (EnvFilter keeps one directive per target), while
/// `RUST_LOG=vgpu_device_frontend=debug` leaves the other crates at `level` instead of
/// silencing them, so the lifecycle lines stay. An invalid `RUST_LOG` is ignored whole.
fn filter(level: LevelFilter, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let base = level.as_str().to_ascii_lowercase();
    let Some(spec) = rust_log.map(str::trim).filter(|s| !s.is_empty()) else {
        return (EnvFilter::new(&base), None);
    };
    match EnvFilter::builder().parse(format!("{base},{spec}")) {
        Ok(f) => (f, None),
        Err(e) => (
            EnvFilter::new(&base),
            Some(format!(
                "ignoring {RUST_LOG}='{spec}' ({e}); logging at --log-level {base}"
            )),
        ),
    }
}

/// Where the broker's stderr goes nowhere (closed, or /dev/null: libvirt starts a
/// vhost-user backend that way), makes fd 2 a datagram socket to the system log, so that
/// its lines and its children's (they inherit fd 2 and [`SYSLOG_ENV`]) reach the journal.
/// Call it first, while the process has one thread (it sets an environment variable).
/// Returns whether it did.
pub fn route_lost_stderr() -> bool {
    if !stderr_is_lost() {
        return false;
    }
    let path = std::env::var_os(SYSLOG_SOCKET_ENV).unwrap_or_else(|| SYSLOG_SOCKET.into());
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    // Non-blocking: a journal that falls behind costs lines, never a stalled virtqueue
    // thread in the frontend (whose log writes go to this same socket).
    if sock.connect(&path).is_err() || sock.set_nonblocking(true).is_err() {
        return false;
    }
    // dup2 leaves the new fd 2 without close-on-exec: the children get it too.
    if nix::unistd::dup2_stderr(&sock).is_err() {
        return false;
    }
    std::env::set_var(SYSLOG_ENV, "1");
    true
}

/// Overrides [`SYSLOG_SOCKET`].
const SYSLOG_SOCKET_ENV: &str = "VGPU_SANDBOX_SYSLOG_SOCKET";

/// fd 2 closed, or /dev/null (character device 1:3).
fn stderr_is_lost() -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: FFI; `st` is a live local for the kernel to fill. A closed fd 2 makes fstat
    // fail, which is an answer.
    if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
        return true;
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    (st.st_mode & libc::S_IFMT) == libc::S_IFCHR
        && libc::major(st.st_rdev) == 1
        && libc::minor(st.st_rdev) == 3
}

/// Installs the subscriber (and the `log` bridge) for this process; `role` and `name`
/// prefix every line. A second call in the same process changes nothing.
pub fn init(role: &'static str, name: &str, level: LevelFilter) {
    let _ = NAME.set(name.to_owned());
    let rust_log = std::env::var(RUST_LOG).ok();
    let (filter, bad_env) = filter(level, rust_log.as_deref());
    let line = Line {
        // The pid the host sees: a child in its own pid namespace would otherwise log as 1.
        prefix: format!(
            "vgpu-sandbox[{name} {role} {}]: ",
            policy::namespaces::pid_outside()
        ),
        colour: std::io::stderr().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        syslog: std::env::var_os(SYSLOG_ENV).is_some_and(|v| v == "1"),
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(line)
        .finish();
    if subscriber.try_init().is_err() {
        return;
    }
    // The children inherit the same RUST_LOG: one warning, from the broker, is enough.
    if let (Some(why), "broker") = (bad_env, role) {
        log::warn!("{why}");
    }
}

/// Formats one event as one line: the fixed prefix, the level, the message and fields.
struct Line {
    prefix: String,
    colour: bool,
    /// Each line is a syslog message: `<priority>` first.
    syslog: bool,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        let mut text = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut text), event)?;
        if self.syslog {
            let severity = match level {
                Level::ERROR => 3,
                Level::WARN => 4,
                Level::INFO => 6,
                Level::DEBUG | Level::TRACE => 7,
            };
            write!(writer, "<{}>", DAEMON + severity)?;
        }
        writer.write_str(&self.prefix)?;
        if self.colour {
            let code = match level {
                Level::ERROR => "31",
                Level::WARN => "33",
                Level::INFO => "32",
                Level::DEBUG => "34",
                Level::TRACE => "35",
            };
            write!(writer, "\x1b[{code}m{level}\x1b[0m ")?;
        } else {
            write!(writer, "{level} ")?;
        }
        // One event, one line: a message that carries a newline (an error's source chain,
        // or text a guest chose) would otherwise start journal entries without the prefix.
        for c in text.chars() {
            match c {
                '\n' => writer.write_str("\\n")?,
                '\r' => writer.write_str("\\r")?,
                c => writer.write_char(c)?,
            }
        }
        writer.write_char('\n')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `events` log through a [`Line`] with the test prefix.
    fn render(syslog: bool, events: impl FnOnce()) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .event_format(Line {
                prefix: "vgpu-sandbox[vm1 broker 7]: ".into(),
                colour: false,
                syslog,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, events);
        let text = out.0.lock().unwrap().clone();
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn one_event_is_one_prefixed_line() {
        let text = render(false, || {
            tracing::warn!("first\nsecond\r");
            tracing::info!(answer = 42, "with a field");
        });
        assert_eq!(
            text,
            "vgpu-sandbox[vm1 broker 7]: WARN first\\nsecond\\r\n\
             vgpu-sandbox[vm1 broker 7]: INFO with a field answer=42\n"
        );
    }

    #[test]
    fn a_syslog_line_starts_with_its_daemon_priority() {
        let text = render(true, || {
            tracing::error!("e");
            tracing::warn!("w");
            tracing::info!("i");
        });
        assert_eq!(
            text,
            "<27>vgpu-sandbox[vm1 broker 7]: ERROR e\n\
             <28>vgpu-sandbox[vm1 broker 7]: WARN w\n\
             <30>vgpu-sandbox[vm1 broker 7]: INFO i\n"
        );
    }

    #[test]
    fn rust_log_overrides_the_level_for_what_it_names() {
        let (f, bad) = filter(LevelFilter::Info, None);
        assert_eq!((f.to_string(), bad), ("info".to_string(), None));

        // A bare level replaces --log-level.
        let (f, bad) = filter(LevelFilter::Info, Some("debug"));
        assert_eq!(
            f.max_level_hint(),
            Some(tracing::level_filters::LevelFilter::DEBUG)
        );
        assert_eq!(f.to_string(), "debug");
        assert!(bad.is_none());

        // A target directive adds to it: the rest stays at --log-level.
        let (f, _) = filter(LevelFilter::Warn, Some("vgpu_device_frontend=debug"));
        let shown = f.to_string();
        assert!(
            shown.contains("vgpu_device_frontend=debug") && shown.contains("warn"),
            "{shown}"
        );

        let (f, bad) = filter(LevelFilter::Error, Some("vgpu_device_frontend=loud"));
        assert_eq!(f.to_string(), "error");
        let bad = bad.expect("an invalid RUST_LOG is reported");
        assert!(
            bad.contains("vgpu_device_frontend=loud") && !bad.contains('\n'),
            "{bad}"
        );
    }
}
