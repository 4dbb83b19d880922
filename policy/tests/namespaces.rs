//! `namespaces::spawn`, `probe` and `enter_empty_root` in real child processes (this test
//! binary re-executed). Needs a host that allows the namespaces (root, or unprivileged
//! user namespaces), as the end-to-end tests in tests/tests/isolation.rs do.

mod common;

use std::ffi::CString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{finish, CHILD_ENV, FAILED};
use vgpu_policy::namespaces::{self, ExecPlan, FIXED_FD_LIMIT, NAMESPACES_ENV};
use vgpu_policy::{NamespaceError, NamespaceSet, RootSwitch, ViolationAction};

/// The descriptor number the spawned child finds its end of the test's pipe at.
const PIPE_FD: i32 = 3;
/// Bound on a spawned child's life.
const WAIT_MS: u16 = 20_000;

#[test]
fn child_entry() {
    let Some(scenario) = common::child_scenario() else {
        return;
    };
    match scenario.as_str() {
        "empty-root" => finish(empty_root()),
        "guards" => finish(guards()),
        "abort-as-init" => {
            vgpu_policy::install_seccomp(vgpu_policy::Role::Renderer, ViolationAction::Kill)
                .expect("install_seccomp");
            std::process::abort()
        }
        _ => panic!("unknown scenario {scenario}"),
    }
}

fn mnt_ns_id() -> u64 {
    std::fs::metadata("/proc/self/ns/mnt")
        .expect("/proc/self/ns/mnt")
        .ino()
}

/// In every namespace, spawned by `namespaces::spawn`: pid 1, the inherited pipe at its
/// fixed number, then an empty root where nothing of the host resolves.
fn empty_root() -> Result<(), String> {
    if std::process::id() != 1 {
        return Err(format!("getpid() is {}, not 1", std::process::id()));
    }
    if namespaces::pid_outside() == 1 {
        return Err("pid_outside() reads 1: /proc is not the parent's".into());
    }
    // SAFETY: FFI; fcntl(F_GETFD) only asks whether the number is open.
    if unsafe { libc::fcntl(PIPE_FD, libc::F_GETFD) } < 0 {
        return Err(format!("fd {PIPE_FD} was not placed"));
    }
    match vgpu_policy::enter_empty_root() {
        Ok(RootSwitch::Emptied) => {}
        other => return Err(format!("enter_empty_root: {other:?}")),
    }
    let root: Vec<_> = std::fs::read_dir("/")
        .map_err(|e| format!("reading /: {e}"))?
        .collect();
    if !root.is_empty() {
        return Err(format!("/ holds {root:?}"));
    }
    for path in ["/proc/self", "/etc/passwd", "/tmp", "/dev/null"] {
        if std::fs::metadata(path).is_ok() {
            return Err(format!("{path} still resolves"));
        }
    }
    if std::fs::create_dir("/x").is_ok() {
        return Err("the empty root is writable".into());
    }
    // The child's verdict goes through the placed descriptor too.
    // SAFETY: FFI; a live buffer of its length.
    let n = unsafe { libc::write(PIPE_FD, b"ok".as_ptr().cast(), 2) };
    if n != 2 {
        return Err(format!("write to fd {PIPE_FD}: {n}"));
    }
    Ok(())
}

/// In a private mount namespace of its own (so that a broken guard could not touch the
/// test's): `enter_empty_root` leaves the root alone unless the grant names a mount
/// namespace that is not this process's.
fn guards() -> Result<(), String> {
    let set = |value: &str| std::env::set_var(NAMESPACES_ENV, value);
    std::env::remove_var(NAMESPACES_ENV);
    match vgpu_policy::enter_empty_root() {
        Ok(RootSwitch::NotSpawned) => {}
        other => return Err(format!("without {NAMESPACES_ENV}: {other:?}")),
    }
    set("user,pid,net,ipc;broker-mnt=1");
    match vgpu_policy::enter_empty_root() {
        Ok(RootSwitch::NoMountNamespace) => {}
        other => return Err(format!("without a mount namespace: {other:?}")),
    }
    for broker in [mnt_ns_id(), 0] {
        set(&format!("user,mount,pid,net,ipc;broker-mnt={broker}"));
        match vgpu_policy::enter_empty_root() {
            Err(NamespaceError::SameMountNamespace { .. }) => {}
            other => return Err(format!("broker-mnt={broker}: {other:?}")),
        }
    }
    set("user,mount,bogus;broker-mnt=1");
    match vgpu_policy::enter_empty_root() {
        Err(NamespaceError::BadGrant(_)) => {}
        other => return Err(format!("a bad grant: {other:?}")),
    }
    if std::fs::read_dir("/")
        .map_err(|e| e.to_string())?
        .next()
        .is_none()
    {
        return Err("the root was emptied".into());
    }
    Ok(())
}

fn child_args() -> (CString, Vec<CString>) {
    let exe = std::env::current_exe().expect("current_exe");
    let exe = CString::new(exe.into_os_string().into_vec()).expect("exe path");
    let args = ["child_entry", "--exact", "--nocapture", "--test-threads=1"]
        .into_iter()
        .map(|a| CString::new(a).expect("arg"));
    (exe.clone(), [exe].into_iter().chain(args).collect())
}

fn child_env(scenario: &str) -> Vec<CString> {
    std::env::vars_os()
        .filter(|(k, _)| k != CHILD_ENV && k != "VGPU_SANDBOX_SECCOMP")
        .map(|(mut k, v)| {
            k.push("=");
            k.push(v);
            CString::new(k.into_vec()).expect("env")
        })
        .chain([CString::new(format!("{CHILD_ENV}={scenario}")).expect("env")])
        .collect()
}

/// Waits at most `WAIT` for `pid` to exit (a pidfd, no polling loop); SIGKILLs it and
/// panics past that. Returns the wait status.
fn wait(pid: libc::pid_t) -> libc::c_int {
    // SAFETY: FFI; pidfd_open takes a pid and flags; `pid` is our unreaped child.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nothing else owns.
    let pidfd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(pidfd as i32) };
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(WAIT_MS)).expect("poll");
    if ready == 0 {
        // SAFETY: FFI; our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: FFI; `status` is a live local and `pid` our unreaped child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid");
    assert!(ready > 0, "the child did not exit within {WAIT_MS} ms");
    status
}

#[test]
fn probe_finds_every_namespace_here() {
    let (got, refused) = namespaces::probe(NamespaceSet::ALL).expect("probe");
    assert_eq!(got, NamespaceSet::ALL, "refused: {refused:?}");
    assert!(refused.is_empty(), "{refused:?}");
}

#[test]
fn spawned_child_is_pid_one_with_its_fd_and_an_empty_root() {
    let (r, low) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let raw = nix::fcntl::fcntl(&low, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIXED_FD_LIMIT))
        .expect("dup");
    // Only the child may hold a write end once it runs, or reading to the end would wait
    // for this process.
    drop(low);
    // SAFETY: a fresh descriptor nothing else owns.
    let w: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    let (program, args) = child_args();
    let env = child_env("empty-root");
    let started = namespaces::spawn(
        NamespaceSet::ALL,
        &ExecPlan {
            program: &program,
            args: &args,
            env: &env,
            fds: &[(w.as_fd(), PIPE_FD)],
            sibling: false,
        },
    )
    .expect("spawn");
    drop(w);
    assert_eq!(started.namespaces, NamespaceSet::ALL, "{started:?}");
    assert_eq!(
        namespaces::own_namespaces_of(started.pid as u32),
        NamespaceSet::ALL
    );
    let status = wait(started.pid);
    let mut said = String::new();
    std::io::Read::read_to_string(&mut std::fs::File::from(r), &mut said).expect("read");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child's wait status {status:#x} (exit {FAILED} means its check failed: see its \
         stderr above)"
    );
    assert_eq!(said, "ok");
}

/// As pid 1 of its pid namespace, under its filter, a child that aborts exits with 134:
/// the kernel drops a SIGABRT that init sends itself, and glibc's fallback
/// (`rt_sigaction`) would otherwise be killed as a seccomp violation.
#[test]
fn abort_as_pid_one_under_the_filter_exits_134_not_sigsys() {
    let (program, args) = child_args();
    let env = child_env("abort-as-init");
    let started = namespaces::spawn(
        NamespaceSet::ALL,
        &ExecPlan {
            program: &program,
            args: &args,
            env: &env,
            fds: &[],
            sibling: false,
        },
    )
    .expect("spawn");
    let status = wait(started.pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == namespaces::ABORT_EXIT_CODE,
        "wait status {status:#x} (signal {})",
        libc::WTERMSIG(status)
    );
}

#[test]
fn a_bad_fd_layout_is_refused_before_any_process_starts() {
    let (program, args) = child_args();
    let env = child_env("empty-root");
    let stderr = std::io::stderr();
    let err = namespaces::spawn(
        NamespaceSet::ALL,
        &ExecPlan {
            program: &program,
            args: &args,
            env: &env,
            fds: &[(stderr.as_fd(), PIPE_FD)],
            sibling: false,
        },
    )
    .expect_err("a source below FIXED_FD_LIMIT");
    assert!(
        matches!(
            err,
            NamespaceError::FdLayout {
                src: 2,
                dst: PIPE_FD
            }
        ),
        "{err}"
    );
}

#[test]
fn the_empty_root_is_left_alone_without_a_mount_namespace_of_its_own() {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "guards")
        .env_remove(NAMESPACES_ENV);
    // SAFETY: between fork and exec: unshare and mount only, no allocation.
    unsafe {
        cmd.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("spawning the child");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
