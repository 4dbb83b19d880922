//! A forbidden system call made inside the real renderer-worker kills it (SIGSYS), and the
//! broker says exactly that: the renderer cannot open a file, create a socket or start a
//! program. With restarts off (`--max-renderer-restarts 0`) the broker then exits non-zero
//! and leaves no process behind; by default it replaces the renderer mid-command and the
//! device serves on.
//!
//! The request that makes the renderer do it (`RendererOp::TestForbiddenSyscall`) exists
//! only with the cargo feature `test-hooks`, so these tests build their own `vgpu-sandbox`
//! with it, once per run, into `target/test-hooks` (never touching `target/debug`, which
//! the other tests use). `VGPU_SANDBOX_TEST_FORBIDDEN=open|socket|exec` makes that binary's
//! device-frontend send the request when the first guest command arrives.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vgpu_tests::gpu::{format, resp};
use vgpu_tests::stack::Role;
use vgpu_tests::Stack;

/// Bound on the broker's exit and on its processes disappearing.
const EXIT: Duration = Duration::from_secs(10);
/// The renderer's death ends the device, as these tests expect.
const NO_RESTARTS: &[&str] = &["--max-renderer-restarts", "0"];
/// What the test-hooks build's frontend reads.
const TEST_FORBIDDEN_ENV: &str = "VGPU_SANDBOX_TEST_FORBIDDEN";

/// The `vgpu-sandbox` built with `--features test-hooks`, built on first use; every test of
/// this binary waits for the same build.
fn test_hooks_binary() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(build_test_hooks_binary) {
        Ok(bin) => bin,
        Err(e) => panic!("{e}"),
    }
}

fn build_test_hooks_binary() -> Result<PathBuf, String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the tests crate has no parent directory")?
        .to_path_buf();
    let target_dir = workspace.join("target").join("test-hooks");
    // The cargo running these tests; the one that built them otherwise.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let started = Instant::now();
    // Its own target directory: cargo's lock on it keeps concurrent runs apart, and the
    // default binary in target/debug stays what every other test runs.
    let out = Command::new(&cargo)
        .current_dir(&workspace)
        .args(["build", "-p", "vgpu-sandbox", "--bin", "vgpu-sandbox"])
        .args(["--features", "test-hooks", "--target-dir"])
        .arg(&target_dir)
        .output()
        .map_err(|e| format!("cannot run {cargo:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo build -p vgpu-sandbox --features test-hooks --target-dir {}` failed \
             ({}):\n{}",
            target_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "built the test-hooks vgpu-sandbox in {:.1?}",
        started.elapsed()
    );
    let bin = target_dir.join("debug").join("vgpu-sandbox");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("cargo built no {}", bin.display()))
    }
}

/// Starts `bin` with `args` and `VGPU_SANDBOX_TEST_FORBIDDEN=which`, connects the test VMM
/// and submits one guest command (GET_DISPLAY_INFO). Returns the stack once the broker has
/// exited, and the renderer-worker as it was before.
fn run_with_hook(bin: &Path, which: &str, args: &[&str]) -> (Stack, vgpu_tests::ProcessInfo) {
    let (stack, renderer, _) = run_with_hook_in(bin, which, args, &Role::RendererWorker);
    (stack, renderer)
}

/// Starts `bin` with `args` and `VGPU_SANDBOX_TEST_FORBIDDEN=which`.
fn start_with_hook(bin: &Path, which: &str, args: &[&str]) -> Stack {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-sandbox-test")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = dir.path().join("vgpu.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--socket-path")
        .arg(&socket)
        .args(args)
        .env(TEST_FORBIDDEN_ENV, which);
    Stack::start_command(cmd, dir, socket, true)
        .unwrap_or_else(|e| panic!("starting {} {args:?}: {e}", bin.display()))
}

/// [`run_with_hook`] for the hook of `role` (its log line must show it reached the call);
/// also returns the device-frontend as it was before.
fn run_with_hook_in(
    bin: &Path,
    which: &str,
    args: &[&str],
    role: &Role,
) -> (Stack, vgpu_tests::ProcessInfo, vgpu_tests::ProcessInfo) {
    let mut stack = start_with_hook(bin, which, args);
    let renderer = stack.expect_child(&Role::RendererWorker);
    let frontend = stack.expect_child(&Role::DeviceFrontend);
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("test VMM set-up failed: {e}\n{}", stack.log_text()));
    // Submitted, not waited for: the renderer's death may come before the answer, and
    // then the stack goes down without answering it.
    vmm.gpu()
        .submit(&vgpu_tests::Command::GetDisplayInfo, None)
        .unwrap_or_else(|e| panic!("submitting GET_DISPLAY_INFO: {e}"));
    // The VMM stays connected until the broker has exited, so the frontend does not end
    // on a disconnect first.
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    drop(vmm);
    assert_eq!(
        status.code(),
        Some(1),
        "broker exit status after the renderer's forbidden call: {status}\n{}",
        stack.log_text()
    );
    let left = stack.wait_all_gone(EXIT);
    assert!(
        left.is_empty(),
        "processes still alive after the broker exited: {left:?}\n{}",
        stack.log_text()
    );
    let (name, marker) = match role {
        Role::DeviceFrontend => ("device-frontend", "test hook: device-frontend opening"),
        _ => ("renderer-worker", "test hook: making"),
    };
    // Waited for, not just looked up: the dying child's last line may still be on its way
    // through the output reader when the broker has already exited.
    let line = stack
        .wait_for_log(marker, EXIT)
        .unwrap_or_else(|e| panic!("the {name} never reached the forbidden call: {e}"));
    assert!(
        line.contains(name),
        "the hook line is not the {name}'s: {line}"
    );
    (stack, renderer, frontend)
}

/// The device-frontend cannot open the render node (nor any file): trying kills it with
/// SIGSYS, and the broker names it.
#[test]
fn frontend_opening_the_render_node_is_killed_with_sigsys() {
    let (stack, _, frontend) = run_with_hook_in(
        test_hooks_binary(),
        "frontend-open-render-node",
        &[],
        &Role::DeviceFrontend,
    );
    let named = format!("device-frontend (pid {})", frontend.pid);
    let report = format!(
        "{named} was killed by SIGSYS (seccomp violation: it made a forbidden system call)"
    );
    stack
        .wait_for_log(&report, EXIT)
        .unwrap_or_else(|e| panic!("no line reports {named} killed by SIGSYS: {e}"));
}

/// Default mode (kill): the broker's report names the renderer (its pid) and SIGSYS.
fn killed_with_sigsys(which: &str) {
    let (stack, renderer) = run_with_hook(test_hooks_binary(), which, NO_RESTARTS);
    let named = format!("renderer-worker (pid {})", renderer.pid);
    let report = format!(
        "{named} was killed by SIGSYS (seccomp violation: it made a forbidden system call)"
    );
    stack
        .wait_for_log(&report, EXIT)
        .unwrap_or_else(|e| panic!("no line reports {named} killed by SIGSYS: {e}"));
}

/// `--seccomp trap`: the renderer's own line names the system call, and the broker reports
/// the trap's exit status.
fn trapped_naming(which: &str, syscall: &str) {
    let args = [NO_RESTARTS, &["--seccomp", "trap"]].concat();
    let (stack, renderer) = run_with_hook(test_hooks_binary(), which, &args);
    let trap_line = stack
        .wait_for_log("renderer-worker: seccomp violation: syscall", EXIT)
        .unwrap_or_else(|e| panic!("no trap line from the renderer: {e}"));
    assert!(
        trap_line.ends_with(&format!("({syscall})")),
        "trap line does not name {syscall}: {trap_line}"
    );
    let named = format!("renderer-worker (pid {})", renderer.pid);
    stack
        .wait_for_log(
            &format!("{named} exited with status 159 (seccomp violation"),
            EXIT,
        )
        .unwrap_or_else(|e| {
            panic!("no line reports {named} exiting after a seccomp violation: {e}")
        });
}

#[test]
fn renderer_opening_a_file_is_killed_with_sigsys() {
    killed_with_sigsys("open");
}

#[test]
fn renderer_creating_a_socket_is_killed_with_sigsys() {
    killed_with_sigsys("socket");
}

#[test]
fn renderer_exec_is_killed_with_sigsys() {
    killed_with_sigsys("exec");
}

#[test]
fn trap_mode_names_openat() {
    trapped_naming("open", "openat");
}

#[test]
fn trap_mode_names_socket() {
    trapped_naming("socket", "socket");
}

#[test]
fn trap_mode_names_execve() {
    trapped_naming("exec", "execve");
}

/// By default a renderer killed by its filter in the middle of a guest command is replaced:
/// the command is answered, and the device serves on through the new renderer.
#[test]
fn renderer_killed_by_sigsys_mid_command_is_replaced_and_the_device_serves_on() {
    let mut stack = start_with_hook(test_hooks_binary(), "open", &[]);
    let renderer = stack.expect_child(&Role::RendererWorker);
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("test VMM set-up failed: {e}\n{}", stack.log_text()));
    // The hook's request goes out with this command; the renderer dies on it.
    let r = vmm
        .gpu()
        .resource_create_2d(1, format::B8G8R8X8_UNORM, 8, 8)
        .unwrap_or_else(|e| {
            panic!(
                "RESOURCE_CREATE_2D got no answer: {e}\n{}",
                stack.log_text()
            )
        });
    assert!(
        r.kind == resp::OK_NODATA || r.kind == resp::ERR_UNSPEC,
        "RESOURCE_CREATE_2D in flight at the renderer's death: {}",
        r.kind_name()
    );
    let report = format!(
        "renderer-worker (pid {}) was killed by SIGSYS (seccomp violation: it made a \
         forbidden system call); restarted it as pid",
        renderer.pid
    );
    stack
        .wait_for_log(&report, EXIT)
        .unwrap_or_else(|e| panic!("no restart after the SIGSYS: {e}"));
    let r = vmm
        .gpu()
        .resource_create_2d(2, format::B8G8R8X8_UNORM, 8, 8)
        .unwrap_or_else(|e| panic!("RESOURCE_CREATE_2D after the restart: {e}"));
    assert_eq!(r.kind, resp::OK_NODATA, "{}", r.kind_name());
    let r = vmm
        .gpu()
        .get_display_info()
        .unwrap_or_else(|e| panic!("GET_DISPLAY_INFO after the restart: {e}"));
    assert_eq!(r.kind, resp::OK_DISPLAY_INFO, "{}", r.kind_name());
    let status = stack.terminate(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "{}", stack.log_text());
    let left = stack.wait_all_gone(EXIT);
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(vmm);
}

/// The default binary (target/debug, no `test-hooks`) has no such request: the variable is
/// ignored and the device serves on.
#[test]
fn default_build_ignores_the_test_hook() {
    let bin = vgpu_tests::stack::default_binary().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::Builder::new()
        .prefix("vgpu-sandbox-test")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = dir.path().join("vgpu.sock");
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path")
        .arg(&socket)
        .env(TEST_FORBIDDEN_ENV, "open");
    let mut stack = Stack::start_command(cmd, dir, socket, true)
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("test VMM set-up failed: {e}\n{}", stack.log_text()));
    // The first command is when a test-hooks build sends the request; the second needs
    // the renderer's answer.
    let r = vmm
        .gpu()
        .get_display_info()
        .unwrap_or_else(|e| panic!("GET_DISPLAY_INFO: {e}\n{}", stack.log_text()));
    assert_eq!(r.kind, resp::OK_DISPLAY_INFO, "{}", r.kind_name());
    let r = vmm
        .gpu()
        .resource_create_2d(1, format::B8G8R8X8_UNORM, 8, 8)
        .unwrap_or_else(|e| panic!("RESOURCE_CREATE_2D: {e}\n{}", stack.log_text()));
    assert_eq!(r.kind, resp::OK_NODATA, "{}", r.kind_name());
    assert!(
        stack.child_with_role(&Role::RendererWorker).is_some(),
        "the renderer is gone:\n{}",
        stack.log_text()
    );
    let status = stack.terminate(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "{}", stack.log_text());
    assert!(
        !stack.log_text().contains("test hook"),
        "the default build acted on {TEST_FORBIDDEN_ENV}:\n{}",
        stack.log_text()
    );
    drop(vmm);
}
