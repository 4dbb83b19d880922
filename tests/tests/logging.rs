//! The logs: every line of every process (broker, spawner, device-frontend,
//! renderer-worker) is `vgpu-sandbox[NAME ROLE PID]: LEVEL message`, NAME from `--name` or
//! the socket path; `RUST_LOG` overrides `--log-level` in all of them; and a guest that
//! sends thousands of malformed commands gets a bounded number of lines plus a count.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{image, resource_with, WAIT};
use vgpu_tests::gpu::{encode_hdr, format, resp, Queue};
use vgpu_tests::stack::default_binary;
use vgpu_tests::Stack;

const ROLES: [&str; 4] = ["broker", "spawner", "device-frontend", "renderer-worker"];
const LEVELS: [&str; 5] = ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"];
/// Bound on the stack ending after the VMM went away.
const EXIT: Duration = Duration::from_secs(10);

/// One parsed log line.
#[derive(Debug)]
struct Line<'a> {
    name: &'a str,
    role: &'a str,
    level: &'a str,
    message: &'a str,
}

/// Parses `vgpu-sandbox[NAME ROLE PID]: LEVEL message`; `None` for anything else.
fn parse(line: &str) -> Option<Line<'_>> {
    let rest = line.strip_prefix("vgpu-sandbox[")?;
    let (tag, rest) = rest.split_once("]: ")?;
    let mut tag = tag.split(' ');
    let (name, role, pid) = (tag.next()?, tag.next()?, tag.next()?);
    if tag.next().is_some() || pid.parse::<u32>().ok()? == 0 {
        return None;
    }
    let (level, message) = rest.split_once(' ')?;
    Some(Line {
        name,
        role,
        level,
        message,
    })
}

/// Starts the binary on `<tmp>/vgpu.sock` with `args`, and `env` set (`None`: removed, so
/// that a RUST_LOG of whoever runs the tests does not change what they check).
fn start_env(args: &[&str], env: &[(&str, Option<&str>)]) -> Stack {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-sandbox-test")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("vgpu.sock");
    let mut command = Command::new(default_binary().unwrap_or_else(|e| panic!("{e}")));
    command.arg("--socket-path").arg(&socket).args(args);
    for (key, value) in env {
        match value {
            Some(v) => command.env(key, v),
            None => command.env_remove(key),
        };
    }
    Stack::start_command(command, dir, socket, true).unwrap_or_else(|e| panic!("{e}"))
}

/// Draws nothing visible but makes every role work: a resource created and transferred
/// (frontend and renderer), with `restart` the renderer killed and replaced (the spawner
/// starts the new one), then the VMM goes away and the stack ends (broker); returns every
/// line it wrote.
fn run_until_disconnect(mut stack: Stack, restart: bool) -> Vec<String> {
    let mut vmm = stack.connect().unwrap_or_else(|e| panic!("{e}"));
    resource_with(
        &mut vmm,
        1,
        format::B8G8R8X8_UNORM,
        32,
        32,
        &image(32, 32, 5),
    );
    if restart {
        common::kill_renderer_until_linked(&mut stack, 1, WAIT);
        resource_with(
            &mut vmm,
            2,
            format::B8G8R8X8_UNORM,
            32,
            32,
            &image(32, 32, 6),
        );
    }
    drop(vmm);
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "{status}\n{}", stack.log_text());
    // Every process wrote to the same pipe: it is closed once all of them are gone, and
    // only then are all lines read. A needle that never occurs waits for exactly that.
    let closed = stack.wait_for_log("\u{0}never\u{0}", EXIT);
    assert!(
        matches!(&closed, Err(e) if e.to_string().contains("output was closed")),
        "the output of the stack's processes stayed open: {closed:?}"
    );
    stack.log_lines()
}

/// Every stderr line (stdout lines are `[stdout] ...`) is a log line of `name`.
#[track_caller]
fn assert_all_tagged<'a>(lines: &'a [String], name: &str) -> Vec<Line<'a>> {
    let parsed: Vec<Line<'_>> = lines
        .iter()
        .filter(|l| !l.starts_with("[stdout] "))
        .map(|l| parse(l).unwrap_or_else(|| panic!("not a log line: {l:?}")))
        .collect();
    for l in &parsed {
        assert_eq!(l.name, name, "{l:?}");
        assert!(ROLES.contains(&l.role), "unknown role: {l:?}");
        assert!(LEVELS.contains(&l.level), "unknown level: {l:?}");
    }
    parsed
}

#[test]
fn every_line_of_every_process_carries_the_name_and_role() {
    // debug, so that the bridged lines of the other crates (vhost, ipc-channel) count too.
    let stack = start_env(
        &["--name", "vm-log.1", "--log-level", "debug"],
        &[("RUST_LOG", None)],
    );
    let lines = run_until_disconnect(stack, true);
    let parsed = assert_all_tagged(&lines, "vm-log.1");
    let roles: BTreeSet<&str> = parsed.iter().map(|l| l.role).collect();
    assert_eq!(
        roles,
        BTreeSet::from(ROLES),
        "roles that logged:\n{}",
        lines.join("\n")
    );
    // The lifecycle, one info line each (the broker's start and the children it started,
    // the VMM's connection and its end), and the restart's warning.
    let info = |role: &str, needle: &str| {
        parsed
            .iter()
            .filter(|l| l.level == "INFO" && l.role == role && l.message.contains(needle))
            .count()
    };
    for (role, needle) in [
        ("broker", "ready: serving on"),
        ("broker", "started device-frontend (pid"),
        ("device-frontend", "VMM connected"),
    ] {
        assert_eq!(
            info(role, needle),
            1,
            "{role}: {needle}\n{}",
            lines.join("\n")
        );
    }
    // Its end: a hang-up is "VMM disconnected" (vhost-user-backend reports it as an
    // error, which the frontend recognises).
    assert_eq!(
        info("device-frontend", "VMM disconnected"),
        1,
        "the end of the VMM's connection\n{}",
        lines.join("\n")
    );
    // The first renderer, and the one that replaced it.
    assert_eq!(
        info("broker", "started renderer-worker (pid"),
        2,
        "{}",
        lines.join("\n")
    );
    let restarts: Vec<&Line<'_>> = parsed
        .iter()
        .filter(|l| {
            l.message
                .contains("was killed by SIGKILL; restarted it as pid")
        })
        .collect();
    assert!(
        matches!(restarts[..], [l] if l.role == "broker" && l.level == "WARN"),
        "{restarts:?}"
    );
    for role in ROLES.iter().filter(|r| **r != "spawner") {
        // The restarted renderer has its own: one per process.
        let processes = if *role == "renderer-worker" { 2 } else { 1 };
        assert_eq!(
            info(role, "seccomp filter installed"),
            processes,
            "{role}: seccomp lines\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn the_name_defaults_to_the_socket_directory() {
    // <tmp>/vgpu-sandbox-testXXXXXX/vgpu.sock: the generic file name, so the directory.
    let stack = start_env(&[], &[("RUST_LOG", None)]);
    let dir = stack
        .socket_path()
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|d| d.to_str())
        .unwrap()
        .to_owned();
    assert!(dir.starts_with("vgpu-sandbox-test"), "{dir}");
    let lines = run_until_disconnect(stack, false);
    let parsed = assert_all_tagged(&lines, &dir);
    assert!(
        parsed.iter().all(|l| l.level != "DEBUG"),
        "debug lines at the default level:\n{}",
        lines.join("\n")
    );
    let roles: BTreeSet<&str> = parsed.iter().map(|l| l.role).collect();
    for role in ["broker", "device-frontend", "renderer-worker"] {
        assert!(
            roles.contains(role),
            "{role} did not log\n{}",
            lines.join("\n")
        );
    }
}

#[test]
fn rust_log_overrides_the_log_level_in_every_process() {
    let stack = start_env(
        &["--name", "dbg", "--log-level", "warn"],
        &[("RUST_LOG", Some("debug"))],
    );
    let lines = run_until_disconnect(stack, false);
    let parsed = assert_all_tagged(&lines, "dbg");
    for role in ["broker", "renderer-worker"] {
        assert!(
            parsed.iter().any(|l| l.role == role && l.level == "DEBUG"),
            "RUST_LOG=debug: no debug line from the {role}\n{}",
            lines.join("\n")
        );
    }
    assert!(
        parsed
            .iter()
            .any(|l| l.role == "device-frontend" && l.level == "INFO"),
        "RUST_LOG=debug did not reach the frontend over --log-level warn\n{}",
        lines.join("\n")
    );
}

#[test]
fn rust_log_for_one_crate_keeps_the_others_at_the_log_level() {
    let stack = start_env(
        &["--name", "one-crate"],
        &[("RUST_LOG", Some("vgpu_renderer_worker=debug"))],
    );
    let lines = run_until_disconnect(stack, false);
    let parsed = assert_all_tagged(&lines, "one-crate");
    let debug: Vec<&Line<'_>> = parsed.iter().filter(|l| l.level == "DEBUG").collect();
    assert!(
        debug.iter().any(|l| l.message.starts_with("request ")),
        "no renderer request at debug\n{}",
        lines.join("\n")
    );
    assert!(
        debug.iter().all(|l| l.role == "renderer-worker"),
        "debug lines of crates RUST_LOG did not name: {debug:?}"
    );
    assert!(
        parsed
            .iter()
            .any(|l| l.role == "broker" && l.message.starts_with("ready: serving on")),
        "the broker's info lines are gone\n{}",
        lines.join("\n")
    );
}

/// Warnings of one window the frontend lets through (device-frontend/src/guest_log.rs).
const BURST: usize = 50;
/// Its window.
const WINDOW: Duration = Duration::from_secs(10);

#[test]
fn a_hostile_guest_gets_a_bounded_number_of_lines_and_a_count() {
    let stack = start_env(&["--name", "hostile"], &[("RUST_LOG", None)]);
    let mut vmm = stack.connect().unwrap_or_else(|e| panic!("{e}"));
    let mut unknown = encode_hdr(0x0999, None);
    unknown.extend_from_slice(&[0u8; 32]);
    let mut send = || {
        let (used, bytes) = vmm
            .gpu()
            .raw(Queue::Control, &unknown, 24)
            .unwrap_or_else(|e| panic!("{e}"));
        let kind = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        assert_eq!((used, kind), (24, resp::ERR_UNSPEC));
    };
    const REJECTED: &str = "rejected command";
    const SUMMARY: &str = "guest-triggered warning(s) in the last";
    const NOTICE: &str = "suppressing the rest of this window";
    let count = |needle: &str| {
        stack
            .log_lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    let started = Instant::now();
    let mut sent = 0usize;
    for _ in 0..3000 {
        send();
        sent += 1;
    }
    let after_burst = count(REJECTED);
    // The window started with the first of them: 10 s of which most is left.
    let windows_so_far = started.elapsed().as_secs() / WINDOW.as_secs() + 1;
    assert!(
        (1..=BURST * windows_so_far as usize).contains(&after_burst),
        "{after_burst} warnings for {sent} malformed commands"
    );
    stack
        .wait_for_log(NOTICE, WAIT)
        .unwrap_or_else(|e| panic!("no notice that lines are being dropped: {e}"));

    // The count comes with the first guest-triggered line after the window: keep
    // misbehaving, at a slow pace, until it does.
    let summaries = count(SUMMARY);
    let deadline = Instant::now() + WINDOW + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no count of the dropped lines");
        send();
        sent += 1;
        if stack
            .wait_for_log_count(SUMMARY, summaries + 1, Duration::from_millis(100))
            .is_ok()
        {
            break;
        }
    }
    // Every malformed command is accounted for: logged, or counted in a summary. The
    // window now open has only the last commands, all logged; wait for their lines.
    let lines = stack.log_lines();
    let counted: usize = lines
        .iter()
        .filter_map(|l| {
            let (_, after) = l.split_once("suppressed ")?;
            after.split(' ').next()?.parse::<usize>().ok()
        })
        .sum();
    assert!(counted >= 3000 - BURST, "counted only {counted}");
    stack
        .wait_for_log_count(REJECTED, sent - counted, WAIT)
        .unwrap_or_else(|e| panic!("{sent} sent, {counted} counted: {e}"));
    let lines = stack.log_lines();
    let logged = lines.iter().filter(|l| l.contains(REJECTED)).count();
    assert_eq!(logged + counted, sent, "logged {logged}, counted {counted}");
    let elapsed_windows = started.elapsed().as_secs() / WINDOW.as_secs() + 1;
    assert!(
        logged <= BURST * elapsed_windows as usize,
        "{logged} warnings in {elapsed_windows} window(s)"
    );
    assert_eq!(
        count(NOTICE),
        count(SUMMARY),
        "one notice per window with dropped lines"
    );
    for l in lines
        .iter()
        .filter(|l| l.contains(REJECTED) || l.contains(SUMMARY) || l.contains(NOTICE))
    {
        assert!(
            l.starts_with("vgpu-sandbox[hostile device-frontend "),
            "{l}"
        );
    }
    // And the device still serves.
    let r = vmm
        .gpu()
        .get_display_info()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.kind, resp::OK_DISPLAY_INFO, "{}", r.kind_name());
}

/// Started with stderr going nowhere (/dev/null, as libvirt starts a vhost-user backend),
/// the broker sends every process's lines to the system log instead: one datagram each,
/// with a daemon-facility priority, from the broker and its children alike.
#[test]
fn with_stderr_on_dev_null_the_lines_go_to_the_system_log() {
    use std::os::unix::net::UnixDatagram;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let journal = UnixDatagram::bind(&log).unwrap();
    journal.set_read_timeout(Some(WAIT)).unwrap();
    let socket = dir.path().join("vm7").join("vgpu.sock");
    std::fs::create_dir(socket.parent().unwrap()).unwrap();
    let mut child = Command::new(default_binary().unwrap())
        .arg("--socket-path")
        .arg(&socket)
        .env("VGPU_SANDBOX_SYSLOG_SOCKET", &log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        let Ok(n) = journal.recv(&mut buf) else { break };
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = line.contains("broker: seccomp filter installed");
        got.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = got.join("");
    for needle in [
        // daemon (3 << 3) + info (6) = 30
        "<30>vgpu-sandbox[vm7 broker ",
        "]: INFO stderr goes nowhere: logging to the system log",
        "]: INFO ready: serving on",
        "<30>vgpu-sandbox[vm7 device-frontend ",
        "<30>vgpu-sandbox[vm7 renderer-worker ",
        "<30>vgpu-sandbox[vm7 broker ",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    assert!(
        got.iter()
            .all(|l| l.starts_with('<') && l.matches("vgpu-sandbox[").count() == 1),
        "one message per datagram:\n{text}"
    );
}
