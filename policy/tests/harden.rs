//! harden_process, in a child process (its effects cannot be undone).

mod common;

use nix::sys::prctl;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use common::{assert_success, finish, run_child};
use vgpu_policy::{Role, ViolationAction, MAX_OPEN_FILES};

#[test]
fn child_entry() {
    let Some(scenario) = common::child_scenario() else {
        return;
    };
    match scenario.as_str() {
        "harden" => finish(harden()),
        _ => panic!("unknown scenario {scenario}"),
    }
}

fn harden() -> Result<(), String> {
    vgpu_policy::harden_process().map_err(|e| e.to_string())?;
    // Idempotent: the broker may call it again after a re-exec.
    vgpu_policy::harden_process().map_err(|e| e.to_string())?;

    if !prctl::get_no_new_privs().map_err(|e| e.to_string())? {
        return Err("no_new_privs reads back as 0".into());
    }
    if prctl::get_dumpable().map_err(|e| e.to_string())? {
        return Err("still dumpable".into());
    }
    let core = getrlimit(Resource::RLIMIT_CORE).map_err(|e| e.to_string())?;
    if core != (0, 0) {
        return Err(format!("RLIMIT_CORE is {core:?}"));
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    if soft != hard || hard > MAX_OPEN_FILES {
        return Err(format!("RLIMIT_NOFILE is {soft}/{hard}"));
    }
    // The hard limit cannot be raised again.
    if setrlimit(Resource::RLIMIT_NOFILE, hard + 1, hard + 1).is_ok() {
        return Err("RLIMIT_NOFILE could be raised".into());
    }

    // Later steps still work: threads, memory, and the seccomp filter itself.
    vgpu_policy::install_seccomp(Role::Renderer, ViolationAction::Kill)
        .map_err(|e| e.to_string())?;
    common::allowed_workload(Role::Renderer)
}

#[test]
fn harden_process_sets_no_new_privs_dumpable_and_limits() {
    assert_success(&run_child("harden"));
}
