//! The role filters under real seccomp, each in a child process.

mod common;

use std::ffi::CString;
use std::sync::mpsc;

use common::{
    action, allowed_workload, assert_killed_by_sigsys, assert_success, assert_trapped, finish,
    jail, role, run_child, SURVIVED,
};
use vgpu_policy::{Role, ViolationAction};

const ROLES: [&str; 2] = ["device-frontend", "renderer-worker"];

/// The child side: does nothing unless this process was started as a child.
#[test]
fn child_entry() {
    let Some(scenario) = common::child_scenario() else {
        return;
    };
    let parts: Vec<&str> = scenario.split(':').collect();
    match parts.as_slice() {
        ["workload", r, a] => {
            jail(role(r), action(a));
            finish(allowed_workload(role(r)))
        }
        ["forbidden", r, a, what] => {
            jail(role(r), action(a));
            attempt(what);
            std::process::exit(SURVIVED)
        }
        ["allowed", r, what] => {
            jail(common::filter(r), ViolationAction::Kill);
            attempt(what);
            std::process::exit(0)
        }
        ["panic", r] => {
            jail(role(r), ViolationAction::Trap);
            let joined = std::thread::spawn(|| panic!("expected panic")).join();
            std::process::exit(if joined.is_err() { 0 } else { common::FAILED })
        }
        ["abort", r] => {
            jail(role(r), ViolationAction::Trap);
            std::process::abort()
        }
        ["arena_shrink", r] => {
            jail(role(r), ViolationAction::Trap);
            finish(common::shrink_thread_arena(2 << 20))
        }
        ["arena_shrink_raised", r] => {
            common::raise_malloc_thresholds();
            jail(role(r), ViolationAction::Trap);
            finish(common::shrink_thread_arena(60 << 20))
        }
        ["tsync", r] => tsync(role(r)),
        ["clone3", r] => clone3(role(r)),
        _ => panic!("unknown scenario {scenario}"),
    }
}

/// Makes the syscall `what` names. Returns only if the filter let it through.
fn attempt(what: &str) {
    match what {
        "openat" => {
            let _ = std::fs::File::open("/etc/hostname");
        }
        "socket" => {
            let _ = std::net::UdpSocket::bind("127.0.0.1:0");
        }
        "execve" => {
            let path = CString::new("/bin/true").unwrap();
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: FFI; NUL-terminated path, NULL-terminated argv and envp that outlive
            // the call.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        "fork" => {
            // SAFETY: FFI; if the filter let fork through, the child only calls _exit.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: FFI; async-signal-safe exit of the forked child.
                unsafe { libc::_exit(0) };
            }
        }
        "rt_sigaction" => {
            // SAFETY: FFI; resets SIGSYS to its default action (what an attacker who wanted
            // to hide violations would try).
            unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
        }
        "kill" => {
            // SAFETY: FFI; signal 0 only probes for existence.
            unsafe { libc::kill(1, 0) };
        }
        "tgkill_other" => {
            // SAFETY: FFI; signal 0 to a thread of another process, only a probe.
            unsafe { libc::syscall(libc::SYS_tgkill, 1, 1, 0) };
        }
        "stat_path" => {
            let _ = std::fs::metadata("/etc/hostname");
        }
        "mmap_exec" => {
            // SAFETY: FFI; an anonymous mapping that is unmapped at once if it is made.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                libc::munmap(p, 4096);
            }
        }
        "ioctl_tcgets" => {
            let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: FFI; TCGETS writes at most one termios into the buffer.
            unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TCGETS, termios.as_mut_ptr()) };
        }
        "socketpair_dgram" => {
            let _ = std::os::unix::net::UnixDatagram::pair();
        }
        "memfd_hugetlb" => {
            // SAFETY: FFI; a NUL-terminated name; the fd, if any, is leaked until exit.
            unsafe { libc::memfd_create(c"huge".as_ptr(), libc::MFD_HUGETLB) };
        }
        other => panic!("unknown attempt {other}"),
    }
}

/// A thread started before the filter is installed is bound by it (TSYNC).
fn tsync(role: Role) -> ! {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let early = std::thread::spawn(move || {
        go_rx.recv().unwrap();
        let _ = std::fs::File::open("/etc/hostname");
    });
    jail(role, ViolationAction::Kill);
    go_tx.send(()).unwrap();
    let _ = early.join();
    std::process::exit(SURVIVED)
}

/// clone3 fails with ENOSYS and std::thread::spawn still works (glibc falls back to clone).
fn clone3(role: Role) -> ! {
    jail(role, ViolationAction::Kill);
    // NULL args with size 0: without the filter the kernel answers EINVAL, never a new task.
    // SAFETY: FFI; the kernel reads nothing from a NULL pointer of size 0.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    if rc != -1 || errno != Some(libc::ENOSYS) {
        eprintln!("clone3 returned {rc}, errno {errno:?}");
        std::process::exit(common::FAILED);
    }
    let answer = std::thread::spawn(|| 6 * 7).join().unwrap();
    std::process::exit(if answer == 42 { 0 } else { common::FAILED })
}

fn forbidden(role: &str, action: &str, what: &str) -> std::process::Output {
    run_child(&format!("forbidden:{role}:{action}:{what}"))
}

#[test]
fn allowed_workload_runs_under_each_role() {
    for role in ROLES {
        assert_success(&run_child(&format!("workload:{role}:kill")));
        assert_success(&run_child(&format!("workload:{role}:trap")));
    }
}

#[test]
fn openat_kills_with_sigsys() {
    for role in ROLES {
        assert_killed_by_sigsys(&forbidden(role, "kill", "openat"));
    }
}

#[test]
fn inet_socket_kills_with_sigsys() {
    for role in ROLES {
        assert_killed_by_sigsys(&forbidden(role, "kill", "socket"));
    }
}

#[test]
fn execve_kills_with_sigsys() {
    for role in ROLES {
        assert_killed_by_sigsys(&forbidden(role, "kill", "execve"));
    }
}

#[test]
fn trap_names_the_syscall_and_exits_159() {
    for role in ROLES {
        let expected =
            |nr: i64, name: &str| format!("{role}: seccomp violation: syscall {nr} ({name})\n");
        assert_trapped(
            &forbidden(role, "trap", "openat"),
            &expected(libc::SYS_openat, "openat"),
        );
        assert_trapped(
            &forbidden(role, "trap", "socket"),
            &expected(libc::SYS_socket, "socket"),
        );
        assert_trapped(
            &forbidden(role, "trap", "execve"),
            &expected(libc::SYS_execve, "execve"),
        );
    }
}

#[test]
fn signal_handlers_cannot_be_changed_after_the_filter() {
    for role in ROLES {
        assert_killed_by_sigsys(&forbidden(role, "kill", "rt_sigaction"));
        // In trap mode the handler that reports it is the one that was installed.
        assert_trapped(
            &forbidden(role, "trap", "rt_sigaction"),
            &format!("{role}: seccomp violation: syscall 13 (rt_sigaction)"),
        );
    }
}

#[test]
fn processes_cannot_be_created_or_signalled() {
    for role in ROLES {
        // fork() is clone(SIGCHLD) without CLONE_THREAD.
        assert_trapped(&forbidden(role, "trap", "fork"), "(clone)");
        assert_killed_by_sigsys(&forbidden(role, "kill", "fork"));
        assert_trapped(&forbidden(role, "trap", "kill"), "(kill)");
        assert_trapped(&forbidden(role, "trap", "tgkill_other"), "(tgkill)");
    }
}

#[test]
fn argument_checks_refuse_the_dangerous_forms() {
    for role in ROLES {
        // statx by path (no AT_EMPTY_PATH).
        assert_trapped(&forbidden(role, "trap", "stat_path"), "(statx)");
        // Datagram socketpairs (could address named sockets).
        assert_trapped(&forbidden(role, "trap", "socketpair_dgram"), "(socketpair)");
        assert_trapped(&forbidden(role, "trap", "memfd_hugetlb"), "(memfd_create)");
    }
}

#[test]
fn only_the_virgl_renderer_can_map_executable_memory() {
    assert_trapped(
        &forbidden("device-frontend", "trap", "mmap_exec"),
        "device-frontend: seccomp violation: syscall 9 (mmap)",
    );
    assert_trapped(
        &forbidden("renderer-worker", "trap", "mmap_exec"),
        "renderer-worker: seccomp violation: syscall 9 (mmap)",
    );
    assert_success(&run_child("allowed:renderer-worker-virgl:mmap_exec"));
}

#[test]
fn ioctl_is_refused_except_fionbio_on_the_frontend() {
    assert_trapped(
        &forbidden("renderer-worker", "trap", "ioctl_tcgets"),
        "(ioctl)",
    );
    assert_trapped(
        &forbidden("device-frontend", "trap", "ioctl_tcgets"),
        "(ioctl)",
    );
}

#[test]
fn panics_and_aborts_are_not_violations() {
    for role in ROLES {
        let output = run_child(&format!("panic:{role}"));
        assert_success(&output);
        assert!(String::from_utf8_lossy(&output.stderr).contains("expected panic"));
        // abort() raises SIGABRT with tgkill on its own pid.
        let output = run_child(&format!("abort:{role}"));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&output.status),
            Some(libc::SIGABRT),
            "{output:?}"
        );
    }
}

#[test]
fn glibc_thread_arena_shrink_is_not_a_violation() {
    // glibc reads /proc/sys/vm/overcommit_memory at the first shrink of a thread's heap;
    // install_seccomp makes that happen before the filter.
    for role in ROLES {
        assert_success(&run_child(&format!("arena_shrink:{role}")));
        assert_success(&run_child(&format!("arena_shrink_raised:{role}")));
    }
}

#[test]
fn filter_binds_threads_started_before_it() {
    for role in ROLES {
        assert_killed_by_sigsys(&run_child(&format!("tsync:{role}")));
    }
}

#[test]
fn clone3_fails_with_enosys_and_threads_still_start() {
    for role in ROLES {
        assert_success(&run_child(&format!("clone3:{role}")));
    }
}

/// `log` (development mode) lets a forbidden call through instead of killing: the child
/// survives its openat, which `kill` would have ended with SIGSYS.
#[test]
fn log_mode_lets_forbidden_calls_through() {
    for role in ROLES {
        let out = forbidden(role, "log", "openat");
        assert_eq!(
            out.status.code(),
            Some(SURVIVED),
            "{role} under the log filter: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
