//! Process lifecycle: the three processes and their roles, clean exits on SIGTERM and on
//! VMM disconnect, and a loud failure when the renderer dies.

mod common;

use std::time::Duration;

use common::{start, WAIT};
use nix::sys::signal::Signal;
use vgpu_tests::stack::Role;
use vgpu_tests::Stack;

const EXIT: Duration = Duration::from_secs(10);

#[track_caller]
fn assert_nothing_left(stack: &mut Stack) {
    let left = stack.wait_all_gone(EXIT);
    assert!(
        left.is_empty(),
        "processes still alive after the broker exited: {left:?}\noutput:\n{}",
        stack.log_text()
    );
}

#[test]
fn three_processes_each_role_once_children_of_the_broker() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let procs = stack.processes();
    let broker = stack.pid();
    let count = |r: &Role| procs.iter().filter(|p| &p.role == r).count();
    assert_eq!(
        procs.len(),
        3,
        "expected broker + 2 children, got {procs:#?}"
    );
    assert_eq!(count(&Role::Broker), 1, "{procs:#?}");
    assert_eq!(count(&Role::DeviceFrontend), 1, "{procs:#?}");
    assert_eq!(count(&Role::RendererWorker), 1, "{procs:#?}");
    for p in procs.iter().filter(|p| p.role != Role::Broker) {
        assert_eq!(
            p.ppid, broker,
            "{} (pid {}) is not a child of the broker",
            p.role, p.pid
        );
    }
}

#[test]
fn sigterm_exits_zero_and_leaves_no_process() {
    let (mut stack, vmm) = start(&[]);
    let status = stack.terminate(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
    drop(vmm);
}

#[test]
fn sigterm_without_a_vmm_exits_zero() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let status = stack.terminate(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
}

#[test]
fn vmm_disconnect_exits_zero_and_leaves_no_process() {
    let (mut stack, mut vmm) = start(&[]);
    common::ok(
        "a command before disconnecting",
        vmm.gpu()
            .resource_create_2d(1, vgpu_tests::gpu::format::B8G8R8X8_UNORM, 8, 8),
    );
    let display = vmm.disconnect();
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after VMM disconnect: {status}\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
    display
        .wait_for("display socket closed by the backend", WAIT, |e| {
            matches!(e, vgpu_tests::DisplayEvent::Closed)
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn killed_renderer_makes_the_broker_fail_naming_it() {
    let (mut stack, _vmm) = start(&[]);
    let renderer = stack
        .child_with_role(&Role::RendererWorker)
        .unwrap_or_else(|| panic!("no single renderer-worker among {:#?}", stack.processes()));
    stack
        .signal_process(&renderer, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !status.success(),
        "broker exited successfully although its renderer was killed\n{}",
        stack.log_text()
    );
    let log = stack.log_lines();
    assert!(
        log.iter().any(|l| l.contains("renderer")),
        "no output line names the renderer:\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
}

#[test]
fn killed_device_frontend_makes_the_broker_fail() {
    let (mut stack, _vmm) = start(&[]);
    let frontend = stack
        .child_with_role(&Role::DeviceFrontend)
        .unwrap_or_else(|| panic!("no single device-frontend among {:#?}", stack.processes()));
    stack
        .signal_process(&frontend, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !status.success(),
        "broker exited 0 although its device-frontend was killed\n{}",
        stack.log_text()
    );
    assert!(
        stack.log_lines().iter().any(|l| l.contains("frontend")),
        "no output line names the device-frontend:\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
}
