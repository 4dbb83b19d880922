//! The broker's filter with `--metrics-file` (`Filter::BrokerMetrics`): it may create the
//! temporary file and rename it only relative to the metrics directory's descriptor, with
//! the one set of flags; any other `openat` or `renameat` kills. Each case in a child.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use common::{assert_killed_by_sigsys, assert_success, finish, run_child, SURVIVED};
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::Mode;
use vgpu_policy::{Filter, ViolationAction, METRICS_OPEN_FLAGS};

#[test]
fn child_entry() {
    let Some(scenario) = common::child_scenario() else {
        return;
    };
    let (case, dir) = scenario
        .split_once(':')
        .unwrap_or_else(|| panic!("bad scenario {scenario}"));
    let dir = Path::new(dir);
    let metrics_dir = open_dir(dir);
    // Another directory the process holds, to show the descriptor check is what stops it.
    let other_dir = open_dir(&dir.join("other"));
    let filter = if case == "without_metrics" {
        Filter::Broker
    } else {
        Filter::BrokerMetrics {
            dir_fd: metrics_dir.as_raw_fd(),
        }
    };
    vgpu_policy::harden_process().expect("harden_process");
    vgpu_policy::install_seccomp(filter, ViolationAction::Kill).expect("install_seccomp");
    let flags = OFlag::from_bits_retain(METRICS_OPEN_FLAGS);
    let mode = Mode::from_bits_truncate(0o644);
    match case {
        "write_and_rename" => finish((|| {
            let fd =
                openat(&metrics_dir, ".m.tmp", flags, mode).map_err(|e| format!("openat: {e}"))?;
            nix::unistd::write(&fd, b"vgpu_x 1\n").map_err(|e| format!("write: {e}"))?;
            drop(fd);
            renameat(metrics_dir.as_fd(), ".m.tmp", metrics_dir.as_fd(), "m")
                .map_err(|e| format!("renameat: {e}"))
        })()),
        "other_dirfd" => {
            let _ = openat(&other_dir, ".m.tmp", flags, mode);
        }
        "cwd" => {
            let _ = openat(nix::fcntl::AT_FDCWD, "m", flags, mode);
        }
        "read_only" => {
            let _ = openat(&metrics_dir, "m", OFlag::O_RDONLY | OFlag::O_CLOEXEC, mode);
        }
        "rename_out" => {
            let _ = renameat(metrics_dir.as_fd(), "m", other_dir.as_fd(), "m");
        }
        "without_metrics" => {
            let _ = openat(&metrics_dir, ".m.tmp", flags, mode);
        }
        _ => panic!("unknown case {case}"),
    }
    std::process::exit(SURVIVED)
}

fn open_dir(path: &Path) -> OwnedFd {
    nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

/// A fresh directory with an `other` directory inside; removed by the caller.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("vgpu-policy-metrics-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("other")).expect("scratch directory");
    dir
}

fn run(case: &str) -> (std::process::Output, PathBuf) {
    let dir = scratch(case);
    let output = run_child(&format!("{case}:{}", dir.display()));
    (output, dir)
}

#[test]
fn metrics_file_is_written_and_renamed_in_its_directory() {
    let (output, dir) = run("write_and_rename");
    assert_success(&output);
    let text = std::fs::read_to_string(dir.join("m")).expect("the renamed file");
    assert_eq!(text, "vgpu_x 1\n");
    assert!(!dir.join(".m.tmp").exists(), "the temporary file is left");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn openat_on_another_descriptor_or_with_other_flags_kills() {
    for case in ["other_dirfd", "cwd", "read_only", "rename_out"] {
        let (output, dir) = run(case);
        assert_killed_by_sigsys(&output);
        assert!(
            !dir.join("other/.m.tmp").exists() && !dir.join("m").exists(),
            "{case}: a file was created"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn broker_without_metrics_cannot_open_even_in_that_directory() {
    let (output, dir) = run("without_metrics");
    assert_killed_by_sigsys(&output);
    let _ = std::fs::remove_dir_all(dir);
}
