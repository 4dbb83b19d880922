//! `--seccomp MODE` reaches both children: each reports the mode its filter was installed
//! with, and the broker warns that anything but `kill` is for debugging only.

use std::time::Duration;

use vgpu_tests::Stack;

const WAIT: Duration = Duration::from_secs(10);

fn installed_with(args: &[&str], action: &str) -> Stack {
    let stack = Stack::start(args).unwrap_or_else(|e| panic!("starting {args:?}: {e}"));
    for role in ["device-frontend", "renderer-worker"] {
        let needle = format!("{role}: seccomp filter installed");
        let line = stack
            .wait_for_log(&needle, WAIT)
            .unwrap_or_else(|e| panic!("{role} did not report its filter: {e}"));
        assert!(
            line.contains(&format!("violations: {action}")),
            "{role} installed its filter with another action: {line}"
        );
    }
    stack
}

#[test]
fn default_is_kill() {
    let stack = installed_with(&[], "Kill");
    assert!(!stack.log_text().contains("for debugging a policy only"));
}

#[test]
fn trap_and_log_reach_both_children_with_a_warning() {
    for (mode, action) in [("trap", "Trap"), ("log", "Log")] {
        let stack = installed_with(&["--seccomp", mode], action);
        stack
            .wait_for_log("for debugging a policy only", WAIT)
            .unwrap_or_else(|e| panic!("no warning for --seccomp {mode}: {e}"));
    }
}
