//! The command-line contract of the `vgpu-sandbox` binary: `--print-capabilities`,
//! `--virgl` where virglrenderer cannot initialise, one-line errors for bad input (and no
//! process left behind), adopting an inherited listening socket with `--fd N`, and what
//! happens to the `--socket-path` file.
//!
//! Every run gets its own process group (`process_group(0)`), so processes it started are
//! found by process group even after they were re-parented; a process in state Z (exited,
//! not yet reaped by whoever inherited it) counts as gone.

mod common;

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{image, ok, resource_with, WAIT};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use vgpu_tests::gpu::{format, Rect};
use vgpu_tests::stack::{default_binary, is_alive, wait_gone, ProcessInfo, READY_LINE};
use vgpu_tests::{DisplayEvent, Stack, TestVmm};

/// Bound on a run that must end by itself (bad input, --print-capabilities, --virgl
/// without a usable Mesa).
const RUN_BOUND: Duration = Duration::from_secs(10);
/// Bound on processes of a run disappearing after it ended.
const GONE_BOUND: Duration = Duration::from_secs(5);
/// The fd number an inherited socket is given in the child.
const INHERITED_FD: RawFd = 7;

/// What one bounded run of the binary produced.
struct Outcome {
    cmdline: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// Processes of its process group still alive after the bound.
    left: Vec<ProcessInfo>,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "`{}` -> {}\nstdout: {:?}\nstderr: {:?}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// Reads /proc/<pid>/stat: (state, ppid, pgrp, starttime).
fn stat_of(pid: i32) -> Option<(char, i32, i32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(2)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

/// Every process (zombies included) whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<ProcessInfo> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some((state, ppid, pgrp, starttime)) = stat_of(pid) {
            if pgrp == pgid {
                out.push(ProcessInfo {
                    pid,
                    ppid,
                    role: vgpu_tests::Role::Other(
                        fs::read(format!("/proc/{pid}/cmdline"))
                            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                            .unwrap_or_default(),
                    ),
                    starttime,
                    state,
                });
            }
        }
    }
    out
}

/// Waits (bounded) for every live process of group `pgid` to exit; returns the survivors.
fn wait_group_gone(pgid: i32, bound: Duration) -> Vec<ProcessInfo> {
    group_members(pgid)
        .into_iter()
        .filter(|p| !wait_gone(p, bound))
        .filter(is_alive)
        .collect()
}

/// Runs `cmd` in a new process group, waits (bounded) for it to exit and collects its
/// output and any process of its group still alive. Kills the group if the bound passes.
fn run_bounded(mut cmd: Command, bound: Duration) -> Outcome {
    let cmdline = format!("{cmd:?}");
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmdline}: {e}"));
    let pid = child.id() as i32;
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let _ = out.read_to_string(&mut o);
            });
            let _ = err.read_to_string(&mut e);
            child.wait()
        });
        let _ = tx.send((r, o, e));
    });
    let (status, stdout, stderr) = match rx.recv_timeout(bound) {
        Ok((Ok(st), o, e)) => (st, o, e),
        Ok((Err(e), _, _)) => panic!("waiting for {cmdline}: {e}"),
        Err(_) => {
            let left = group_members(pid);
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            panic!("{cmdline} did not exit (or its output did not close) within {bound:?}; its processes: {left:#?}");
        }
    };
    let left = wait_group_gone(pid, GONE_BOUND);
    if !left.is_empty() {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    Outcome {
        cmdline,
        status,
        stdout,
        stderr,
        left,
    }
}

fn bin() -> Command {
    Command::new(default_binary().unwrap_or_else(|e| panic!("{e}")))
}

/// Makes `fd` (of this process) appear as [`INHERITED_FD`] in the child `cmd` starts.
fn inherit_as_fixed_fd(cmd: &mut Command, fd: RawFd) {
    vgpu_tests::stack::inherit_fd(cmd, fd, INHERITED_FD);
}

/// A failure run: non-zero exit (not a signal), exactly one non-empty line on stderr and no
/// clap usage block, nothing on stdout, and no process left.
#[track_caller]
fn assert_one_line_failure(o: &Outcome, mentions: &[&str]) {
    let d = o.describe();
    assert!(o.status.code().is_some(), "killed by a signal: {d}");
    assert_ne!(o.status.code(), Some(0), "exit status 0 on bad input: {d}");
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be exactly one line: {d}");
    assert!(
        !lines[0].trim().is_empty(),
        "the one stderr line is empty: {d}"
    );
    assert!(
        o.stderr.ends_with('\n'),
        "the stderr line is not terminated: {d}"
    );
    for usage in ["Usage:", "USAGE", "For more information"] {
        assert!(!o.stderr.contains(usage), "clap usage text on stderr: {d}");
    }
    let lower = lines[0].to_lowercase();
    for m in mentions {
        assert!(
            lower.contains(&m.to_lowercase()),
            "the error line does not mention {m:?}: {d}"
        );
    }
    assert!(o.stdout.is_empty(), "output on stdout: {d}");
    assert!(
        o.left.is_empty(),
        "processes left behind: {:#?}\n{d}",
        o.left
    );
}

// ---------------------------------------------------------------- --print-capabilities

#[test]
fn print_capabilities_is_one_json_line_and_starts_nothing() {
    let mut cmd = bin();
    cmd.arg("--print-capabilities");
    let o = run_bounded(cmd, RUN_BOUND);
    let d = o.describe();
    assert_eq!(o.status.code(), Some(0), "{d}");
    assert!(o.left.is_empty(), "processes left: {:#?}\n{d}", o.left);
    // Nothing but the broker itself ever ran: it exited and nothing of its group is left.
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be exactly one line: {d}");
    assert!(o.stdout.ends_with('\n'), "{d}");
    let v: serde_json::Value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {d}"));
    let fields = v
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {d}"));
    assert_eq!(fields.get("type"), Some(&serde_json::json!("gpu")), "{d}");
    let features = fields
        .get("features")
        .and_then(|f| f.as_array())
        .unwrap_or_else(|| panic!("\"features\" is not an array: {d}"));
    for f in features {
        assert!(f.is_string(), "feature {f} is not a string: {d}");
    }
    assert!(o.stderr.is_empty(), "stderr: {d}");
}

// ---------------------------------------------------------------- --virgl

/// Makes Mesa find no driver, so virglrenderer cannot initialise (as on a host without
/// Mesa's DRI drivers).
#[cfg(feature = "virgl")]
const NO_MESA_DRIVERS: (&str, &str) = ("LIBGL_DRIVERS_PATH", "/nonexistent");

#[cfg(feature = "virgl")]
fn capability_features(cmd: std::process::Command) -> Vec<String> {
    let o = run_bounded(cmd, RUN_BOUND);
    assert_eq!(o.status.code(), Some(0), "{}", o.describe());
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim()).expect("JSON");
    v["features"]
        .as_array()
        .expect("features")
        .iter()
        .map(|f| f.as_str().expect("string").to_string())
        .collect()
}

#[cfg(feature = "virgl")]
#[test]
fn print_capabilities_lists_virgl_only_where_virglrenderer_initialises() {
    let mut cmd = bin();
    cmd.arg("--print-capabilities");
    let features = capability_features(cmd);
    assert!(
        features.iter().any(|f| f == "virgl"),
        "virgl works on this machine (llvmpipe): {features:?}"
    );
    let mut cmd = bin();
    cmd.arg("--print-capabilities")
        .env(NO_MESA_DRIVERS.0, NO_MESA_DRIVERS.1);
    let features = capability_features(cmd);
    assert!(
        !features.iter().any(|f| f == "virgl"),
        "virgl listed although Mesa has no driver: {features:?}"
    );
}

#[cfg(feature = "virgl")]
#[test]
fn virgl_that_cannot_initialise_fails_with_one_line_and_no_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.sock");
    let mut cmd = bin();
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--virgl")
        .env(NO_MESA_DRIVERS.0, NO_MESA_DRIVERS.1);
    let o = run_bounded(cmd, RUN_BOUND);
    assert_one_line_failure(&o, &["--virgl", "virgl_renderer_init"]);
    assert!(
        fs::symlink_metadata(&socket).is_err(),
        "a socket file was left at {}: {}",
        socket.display(),
        o.describe()
    );
}

// ---------------------------------------------------------------- bad input

/// Runs with `args` (plus `--socket-path` in a fresh directory when `with_socket`), and
/// checks the one-line failure and that no socket file was created.
#[track_caller]
fn refused(args: &[&str], with_socket: bool, mentions: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.sock");
    let mut cmd = bin();
    if with_socket {
        cmd.arg("--socket-path").arg(&socket);
    }
    cmd.args(args);
    let o = run_bounded(cmd, RUN_BOUND);
    assert_one_line_failure(&o, mentions);
    assert!(
        fs::symlink_metadata(&socket).is_err(),
        "a socket file was left behind: {}",
        o.describe()
    );
}

#[test]
fn unknown_option_is_one_line() {
    refused(&["--frobnicate"], true, &["--frobnicate"]);
}

#[test]
fn output_without_height_is_one_line() {
    refused(&["--output", "10x"], true, &["10x"]);
}

#[test]
fn output_of_zero_size_is_one_line() {
    refused(&["--output", "0x0"], true, &["0x0"]);
}

#[test]
fn socket_path_with_fd_is_one_line() {
    refused(&["--fd", "3"], true, &[]);
}

#[test]
fn no_socket_option_is_one_line() {
    refused(&[], false, &[]);
}

#[test]
fn fd_that_is_not_open_is_one_line() {
    refused(&["--fd", "999"], false, &["999"]);
}

#[test]
fn log_level_unknown_is_one_line() {
    refused(&["--log-level", "loud"], true, &["loud"]);
}

#[test]
fn render_node_that_does_not_exist_is_one_line() {
    refused(&["--render-node", "/nonexistent"], true, &["/nonexistent"]);
}

#[test]
fn seventeen_outputs_are_one_line() {
    let mut args = Vec::new();
    for _ in 0..17 {
        args.extend(["--output", "64x64"]);
    }
    refused(&args, true, &[]);
}

#[test]
fn max_resource_memory_zero_is_one_line() {
    refused(&["--max-resource-memory", "0"], true, &[]);
}

#[test]
fn name_that_would_break_a_log_line_is_one_line() {
    for bad in ["vm 1", "vm]1", "", "vm/1"] {
        refused(&["--name", bad], true, &["--name", "1..=64"]);
    }
    refused(&["--name", &"v".repeat(65)], true, &["--name", "1..=64"]);
}

/// `--fd 7` where the inherited fd 7 is `fd` of this process.
fn refused_inherited(fd: RawFd, what: &str) {
    let mut cmd = bin();
    cmd.arg("--fd").arg(INHERITED_FD.to_string());
    inherit_as_fixed_fd(&mut cmd, fd);
    let o = run_bounded(cmd, RUN_BOUND);
    assert_one_line_failure(&o, &[&INHERITED_FD.to_string()]);
    eprintln!("{what}: {}", o.stderr.trim_end());
}

#[test]
fn fd_of_a_regular_file_is_one_line() {
    let file = tempfile::tempfile().unwrap();
    refused_inherited(file.as_raw_fd(), "regular file");
}

#[test]
fn fd_of_a_socket_neither_listening_nor_connected_is_one_line() {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let s = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    refused_inherited(s.as_raw_fd(), "socket neither listening nor connected");
}

// ---------------------------------------------------------------- serving

/// Draws one 320x200 frame on scanout 0 with resource `id` and checks its exact pixels.
fn draw_one_frame(vmm: &mut TestVmm, id: u32, seed: u32) {
    let (w, h) = (320, 200);
    let pixels = image(w, h, seed);
    resource_with(vmm, id, format::B8G8R8X8_UNORM, w, h, &pixels);
    let full = Rect::new(0, 0, w, h);
    vmm.display().skip_to_end();
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, id, full));
    ok("RESOURCE_FLUSH", vmm.gpu().resource_flush(id, full));
    vmm.display()
        .wait_for("VHOST_USER_GPU_UPDATE of the whole frame", WAIT, |e| {
            matches!(e, DisplayEvent::Update { scanout_id: 0, x: 0, y: 0, width, height, .. }
                if (*width, *height) == (w, h))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (fw, fh, fb) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_eq!((fw, fh), (w, h), "framebuffer size");
    if let Some(d) = vgpu_tests::scenario::first_difference(&fb, &pixels, w) {
        panic!("guest bytes vs UPDATE bytes: {d}");
    }
    common::no_violations(vmm);
}

#[test]
fn inherited_listening_fd_is_served() {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-sandbox-test")
        .tempdir()
        .unwrap();
    let socket = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut cmd = bin();
    cmd.arg("--fd")
        .arg(INHERITED_FD.to_string())
        .args(["--output", "320x200"]);
    inherit_as_fixed_fd(&mut cmd, listener.as_raw_fd());
    let stack = Stack::start_command(cmd, dir, socket.clone(), true)
        .unwrap_or_else(|e| panic!("starting with --fd {INHERITED_FD}: {e}"));
    // The child has its own copy now.
    drop(listener);
    let line = stack
        .wait_for_log(&format!("{READY_LINE} fd {INHERITED_FD}"), WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        line.trim_end().ends_with(&format!("fd {INHERITED_FD}")),
        "ready line: {line}"
    );
    // Without --name and without a socket path, the name is the descriptor's.
    assert!(
        line.starts_with(&format!("vgpu-sandbox[fd-{INHERITED_FD} broker ")),
        "ready line: {line}"
    );
    let mut vmm = stack.connect().unwrap_or_else(|e| {
        panic!(
            "connecting to the adopted socket {}: {e}\n{}",
            socket.display(),
            stack.log_text()
        )
    });
    draw_one_frame(&mut vmm, 1, 11);
}

#[test]
fn stale_socket_file_is_replaced_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vgpu.sock");
    // A socket file nobody listens on any more, as a crashed earlier run leaves it.
    drop(UnixListener::bind(&socket).unwrap());
    assert!(fs::symlink_metadata(&socket)
        .unwrap()
        .file_type()
        .is_socket());
    assert!(
        UnixStream::connect(&socket).is_err(),
        "the stale socket must refuse connections before the test"
    );
    let mut cmd = bin();
    cmd.arg("--socket-path")
        .arg(&socket)
        .args(["--output", "320x200"]);
    let stack = Stack::start_command(cmd, dir, socket.clone(), true)
        .unwrap_or_else(|e| panic!("starting over a stale socket: {e}"));
    let mut vmm = stack.connect().unwrap_or_else(|e| {
        panic!(
            "connecting to the replaced socket: {e}\n{}",
            stack.log_text()
        )
    });
    draw_one_frame(&mut vmm, 1, 12);
}

#[test]
fn regular_file_at_socket_path_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vgpu.sock");
    let content = b"not a socket: precious data\n";
    fs::write(&path, content).unwrap();
    let mut cmd = bin();
    cmd.arg("--socket-path").arg(&path);
    let o = run_bounded(cmd, RUN_BOUND);
    assert_one_line_failure(&o, &[&path.display().to_string()]);
    let m = fs::symlink_metadata(&path).unwrap();
    assert!(
        m.file_type().is_file(),
        "{} is no longer a regular file",
        path.display()
    );
    assert_eq!(
        fs::read(&path).unwrap(),
        content,
        "the regular file was modified: {}",
        o.describe()
    );
}

#[test]
fn sigterm_removes_the_socket_file() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let socket = stack.socket_path().to_path_buf();
    assert!(
        fs::symlink_metadata(&socket)
            .map(|m| m.file_type().is_socket())
            .unwrap_or(false),
        "no socket at {} while serving",
        socket.display()
    );
    let status = stack
        .terminate(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGTERM: {status}\n{}",
        stack.log_text()
    );
    assert!(status.signal().is_none());
    assert!(
        !Path::new(&socket).exists() && fs::symlink_metadata(&socket).is_err(),
        "{} still exists after SIGTERM\n{}",
        socket.display(),
        stack.log_text()
    );
    let left = stack.wait_all_gone(GONE_BOUND);
    assert!(left.is_empty(), "processes left: {left:?}");
}

#[test]
fn check_host_reports_one_line_per_probe_and_exits_zero_here() {
    let mut cmd = bin();
    cmd.arg("check-host");
    let o = run_bounded(cmd, RUN_BOUND);
    let d = o.describe();
    assert_eq!(o.status.code(), Some(0), "{d}");
    assert!(o.left.is_empty(), "processes left: {:#?}\n{d}", o.left);
    assert!(o.stderr.is_empty(), "stderr: {d}");
    let state_of = |name: &str| -> &str {
        let prefix = format!("{name}: ");
        let line = o
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {name} line: {d}"));
        line[prefix.len()..].split(':').next().unwrap_or("")
    };
    // What vgpu-sandbox cannot run without, and which this machine has (the other tests
    // run the jailed children here).
    assert_eq!(state_of("seccomp-filter"), "ok", "{d}");
    assert_eq!(state_of("memfd-sealing"), "ok", "{d}");
    for name in [
        "seccomp-kill-process",
        "seccomp-log",
        "no-new-privs",
        "net-ipc-namespaces",
        "user-namespaces",
        "mount-namespaces",
        "pid-namespaces",
        "virgl",
        "close-range",
        "pidfd-open",
        "qemu",
        "render-nodes",
    ] {
        assert!(
            ["ok", "missing", "unknown"].contains(&state_of(name)),
            "{name}: {d}"
        );
    }
    assert_eq!(o.stdout.lines().count(), 14, "one line per probe: {d}");
}

// ---------------------------------------------------------------- per-VM limits

#[test]
fn limit_options_out_of_range_are_one_line() {
    for (option, value) in [
        ("--max-resources", "0"),
        ("--max-resources", "1048577"),
        ("--max-resource-memory", "65537"),
        ("--max-contexts", "0"),
        ("--max-contexts", "1025"),
        ("--max-contexts", "many"),
        ("--max-submit-size", "0"),
        ("--max-submit-size", "1K"),
        ("--max-submit-size", "65M"),
        ("--max-submit-size", "99999999999999G"),
        ("--max-mappings", "0"),
        ("--max-mappings", "32769"),
    ] {
        refused(&[option, value], true, &[option, value]);
    }
}

#[test]
fn limit_options_in_range_are_served() {
    let stack = Stack::start(&[
        "--max-resources",
        "2",
        "--max-resource-memory",
        "1",
        "--max-contexts",
        "1",
        "--max-submit-size",
        "4K",
        "--max-mappings",
        "1",
        "--output",
        "320x200",
    ])
    .unwrap_or_else(|e| panic!("starting with every limit option: {e}"));
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_text()));
    // 320x200 is 250 KiB, twice with its scanout buffer: within 1 MiB and 2 resources.
    draw_one_frame(&mut vmm, 1, 4);
}

/// `--fd` with a socket already connected to the VMM (one end of a socketpair, as libvirt
/// starts a vhost-user backend): the device serves that one connection through the
/// broker's relay, frames arrive exact, and the VMM hanging up ends the device with 0.
#[test]
fn inherited_connected_fd_is_served_and_its_hang_up_ends_the_device() {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-sandbox-test")
        .tempdir()
        .unwrap();
    // Never connected to: the VMM talks on the socketpair.
    let unused = dir.path().join("unused.sock");
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = bin();
    cmd.arg("--fd")
        .arg(INHERITED_FD.to_string())
        .args(["--output", "320x200"]);
    inherit_as_fixed_fd(&mut cmd, theirs.as_raw_fd());
    let mut stack = Stack::start_command(cmd, dir, unused, true)
        .unwrap_or_else(|e| panic!("starting with a connected --fd {INHERITED_FD}: {e}"));
    drop(theirs);
    stack
        .wait_for_log(&format!("fd {INHERITED_FD} (connected)"), WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut vmm =
        TestVmm::from_stream(ours, &vgpu_tests::VmmOptions::default()).unwrap_or_else(|e| {
            panic!(
                "vhost-user set-up through the relay: {e}\n{}",
                stack.log_text()
            )
        });
    draw_one_frame(&mut vmm, 1, 13);
    drop(vmm);
    let status = stack.wait_exit(WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "{}", stack.log_text());
}

#[test]
fn connected_fd_with_keep_listening_is_one_line_error() {
    let (_ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = bin();
    cmd.arg("--fd")
        .arg(INHERITED_FD.to_string())
        .arg("--keep-listening");
    inherit_as_fixed_fd(&mut cmd, theirs.as_raw_fd());
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--keep-listening needs a listening socket"),
        "{err}"
    );
}

/// What the options given with `check-host` ask for is required: a `--render-node` that is
/// not there makes it fail, in one line on stderr naming the check.
#[test]
fn check_host_fails_when_the_asked_render_node_is_missing() {
    let mut cmd = bin();
    cmd.args(["--render-node", "/nonexistent/renderD128", "check-host"]);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("render-node: missing: /nonexistent/renderD128")),
        "{stdout}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("render-node"), "{stderr}");
}
