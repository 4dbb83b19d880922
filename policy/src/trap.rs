//! The SIGSYS handler of [`crate::ViolationAction::Trap`]: one line on stderr naming the
//! syscall, then `_exit(TRAP_EXIT_CODE)`.
//!
//! Everything the handler does is async-signal-safe: no allocation, no locks, no std I/O;
//! the line is formatted into a buffer on the stack and written with one `write(2)`.

use std::sync::atomic::{AtomicU8, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::seccomp::permit::{sys, Sys};
use crate::{PolicyError, Role};

/// The exit status of a process that made a forbidden syscall under
/// [`crate::ViolationAction::Trap`] (128 + `SIGSYS`, as a shell reports a death by SIGSYS).
pub const TRAP_EXIT_CODE: i32 = 159;

/// The role whose name the handler prints: 0 unknown, 1 frontend, 2 renderer.
static ROLE: AtomicU8 = AtomicU8::new(0);

/// `si_code` of a SIGSYS raised by seccomp (`SYS_SECCOMP`, asm-generic/siginfo.h).
const SYS_SECCOMP: libc::c_int = 1;
/// Offset of `_sigsys._syscall` in `siginfo_t` on 64-bit Linux: `si_signo`, `si_errno`,
/// `si_code`, 4 bytes of padding, then the union, whose `_sigsys` starts with the 8-byte
/// `_call_addr`.
const SIGSYS_SYSCALL_OFFSET: usize = 24;

/// Installs the SIGSYS handler for `role`. It stays for the life of the process: the
/// filter does not allow `rt_sigaction`.
pub(crate) fn install_sigsys_handler(role: Role) -> Result<(), PolicyError> {
    let code = match role {
        Role::Frontend => 1,
        Role::Renderer => 2,
        Role::Broker => 3,
    };
    ROLE.store(code, Ordering::SeqCst);
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO | SaFlags::SA_ONSTACK,
        SigSet::all(),
    );
    // SAFETY: FFI. The handler only performs async-signal-safe work (stack buffer, write,
    // _exit) and never returns, so it cannot break invariants of the interrupted code.
    unsafe { sigaction(Signal::SIGSYS, &action) }.map_err(PolicyError::SigsysHandler)?;
    Ok(())
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let role = match ROLE.load(Ordering::Relaxed) {
        1 => Role::Frontend.name(),
        2 => Role::Renderer.name(),
        3 => Role::Broker.name(),
        _ => "vgpu-sandbox",
    };
    let nr = if info.is_null() {
        None
    } else {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; for si_code
        // SYS_SECCOMP its _sigsys member is the active one, and _syscall is an int at
        // SIGSYS_SYSCALL_OFFSET (read unaligned to make no assumption on the pointer).
        unsafe {
            if (*info).si_code == SYS_SECCOMP {
                Some(
                    info.cast::<u8>()
                        .add(SIGSYS_SYSCALL_OFFSET)
                        .cast::<libc::c_int>()
                        .read_unaligned(),
                )
            } else {
                None
            }
        }
    };
    let mut line = Line::new();
    format_violation(&mut line, role, nr.map(i64::from));
    let bytes = line.as_bytes();
    // SAFETY: FFI; write(2) and _exit(2) are async-signal-safe and allowed by every
    // filter; `bytes` is a valid buffer of its length.
    unsafe {
        libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(TRAP_EXIT_CODE);
    }
}

/// Writes `<role>: seccomp violation: syscall <nr> (<name>)\n` into `line` (the name only
/// when known; `nr` `None` for a SIGSYS that seccomp did not raise).
fn format_violation(line: &mut Line, role: &str, nr: Option<i64>) {
    line.push(role.as_bytes());
    line.push(b": seccomp violation: syscall ");
    match nr {
        Some(nr) => {
            line.push_number(nr);
            if let Some(name) = syscall_name(nr) {
                line.push(b" (");
                line.push(name.as_bytes());
                line.push(b")");
            }
        }
        None => line.push(b"unknown (SIGSYS not raised by seccomp)"),
    }
    line.push(b"\n");
}

/// The name of syscall `nr`, if it is in [`SYSCALL_NAMES`].
pub(crate) fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|sys| sys.nr == nr)
        .map(|sys| sys.name)
}

/// A fixed-size line buffer; what does not fit is dropped.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, value: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut rest = value.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        if value < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The syscalls the handler names: every one an allowlist has (they can still be refused
/// for their arguments) and the forbidden ones a compromised or buggy process is most
/// likely to try.
static SYSCALL_NAMES: &[Sys] = &[
    // Allowed, at least with some arguments.
    sys!(SYS_read),
    sys!(SYS_write),
    sys!(SYS_readv),
    sys!(SYS_writev),
    sys!(SYS_pread64),
    sys!(SYS_lseek),
    sys!(SYS_close),
    sys!(SYS_poll),
    sys!(SYS_ppoll),
    sys!(SYS_epoll_create1),
    sys!(SYS_epoll_ctl),
    sys!(SYS_epoll_wait),
    sys!(SYS_epoll_pwait),
    sys!(SYS_eventfd2),
    sys!(SYS_mmap),
    sys!(SYS_mprotect),
    sys!(SYS_munmap),
    sys!(SYS_mremap),
    sys!(SYS_madvise),
    sys!(SYS_brk),
    sys!(SYS_memfd_create),
    sys!(SYS_ftruncate),
    sys!(SYS_clone),
    sys!(SYS_clone3),
    sys!(SYS_futex),
    sys!(SYS_set_robust_list),
    sys!(SYS_rseq),
    sys!(SYS_sched_yield),
    sys!(SYS_sched_getaffinity),
    sys!(SYS_getrandom),
    sys!(SYS_gettid),
    sys!(SYS_getpid),
    sys!(SYS_prctl),
    sys!(SYS_clock_gettime),
    sys!(SYS_clock_nanosleep),
    sys!(SYS_nanosleep),
    sys!(SYS_rt_sigreturn),
    sys!(SYS_rt_sigprocmask),
    sys!(SYS_sigaltstack),
    sys!(SYS_tgkill),
    sys!(SYS_restart_syscall),
    sys!(SYS_exit),
    sys!(SYS_exit_group),
    sys!(SYS_fcntl),
    sys!(SYS_dup),
    sys!(SYS_fstat),
    sys!(SYS_newfstatat),
    sys!(SYS_statx),
    sys!(SYS_sendmsg),
    sys!(SYS_recvmsg),
    sys!(SYS_sendto),
    sys!(SYS_recvfrom),
    sys!(SYS_shutdown),
    sys!(SYS_socketpair),
    sys!(SYS_getsockopt),
    sys!(SYS_accept4),
    sys!(SYS_ioctl),
    // Forbidden.
    sys!(SYS_open),
    sys!(SYS_openat),
    sys!(SYS_openat2),
    sys!(SYS_creat),
    sys!(SYS_stat),
    sys!(SYS_lstat),
    sys!(SYS_access),
    sys!(SYS_faccessat),
    sys!(SYS_faccessat2),
    sys!(SYS_readlink),
    sys!(SYS_readlinkat),
    sys!(SYS_getdents64),
    sys!(SYS_mkdir),
    sys!(SYS_mkdirat),
    sys!(SYS_unlink),
    sys!(SYS_unlinkat),
    sys!(SYS_rename),
    sys!(SYS_renameat2),
    sys!(SYS_chdir),
    sys!(SYS_getcwd),
    sys!(SYS_socket),
    sys!(SYS_connect),
    sys!(SYS_bind),
    sys!(SYS_listen),
    sys!(SYS_accept),
    sys!(SYS_setsockopt),
    sys!(SYS_getsockname),
    sys!(SYS_getpeername),
    sys!(SYS_pipe),
    sys!(SYS_pipe2),
    sys!(SYS_dup2),
    sys!(SYS_dup3),
    sys!(SYS_execve),
    sys!(SYS_execveat),
    sys!(SYS_fork),
    sys!(SYS_vfork),
    sys!(SYS_wait4),
    sys!(SYS_waitid),
    sys!(SYS_kill),
    sys!(SYS_tkill),
    sys!(SYS_rt_sigaction),
    sys!(SYS_rt_sigqueueinfo),
    sys!(SYS_rt_tgsigqueueinfo),
    sys!(SYS_rt_sigtimedwait),
    sys!(SYS_ptrace),
    sys!(SYS_process_vm_readv),
    sys!(SYS_process_vm_writev),
    sys!(SYS_pidfd_open),
    sys!(SYS_pidfd_getfd),
    sys!(SYS_pidfd_send_signal),
    sys!(SYS_prlimit64),
    sys!(SYS_setrlimit),
    sys!(SYS_getrlimit),
    sys!(SYS_unshare),
    sys!(SYS_setns),
    sys!(SYS_mount),
    sys!(SYS_seccomp),
    sys!(SYS_bpf),
    sys!(SYS_perf_event_open),
    sys!(SYS_userfaultfd),
    sys!(SYS_io_uring_setup),
    sys!(SYS_io_uring_enter),
    sys!(SYS_keyctl),
    sys!(SYS_pkey_mprotect),
    sys!(SYS_mlock),
    sys!(SYS_uname),
    sys!(SYS_sysinfo),
    sys!(SYS_getuid),
    sys!(SYS_geteuid),
    sys!(SYS_getppid),
    sys!(SYS_sched_setaffinity),
    sys!(SYS_setpriority),
    sys!(SYS_timerfd_create),
    sys!(SYS_signalfd4),
    sys!(SYS_inotify_init1),
    sys!(SYS_sendfile),
    sys!(SYS_splice),
    sys!(SYS_fallocate),
    sys!(SYS_fsync),
    sys!(SYS_membarrier),
    sys!(SYS_epoll_pwait2),
    sys!(SYS_close_range),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allowed_syscalls;

    fn line(role: &str, nr: Option<i64>) -> String {
        let mut line = Line::new();
        format_violation(&mut line, role, nr);
        String::from_utf8(line.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn formats_known_and_unknown_syscalls() {
        assert_eq!(
            line("renderer-worker", Some(257)),
            "renderer-worker: seccomp violation: syscall 257 (openat)\n"
        );
        assert_eq!(
            line("device-frontend", Some(0)),
            "device-frontend: seccomp violation: syscall 0 (read)\n"
        );
        assert_eq!(
            line("device-frontend", Some(9999)),
            "device-frontend: seccomp violation: syscall 9999\n"
        );
        assert_eq!(line("x", Some(-1)), "x: seccomp violation: syscall -1\n");
        assert!(line("x", None).contains("unknown"));
    }

    #[test]
    fn long_lines_are_truncated_not_overflowed() {
        let role = "r".repeat(400);
        assert_eq!(line(&role, Some(1)).len(), 160);
    }

    #[test]
    fn every_allowed_syscall_has_a_name() {
        for role in [Role::Frontend, Role::Renderer] {
            for name in allowed_syscalls(role) {
                assert!(
                    SYSCALL_NAMES.iter().any(|sys| sys.name == name),
                    "{name} missing from SYSCALL_NAMES"
                );
            }
        }
    }

    #[test]
    fn names_are_unique_and_stripped() {
        for (i, a) in SYSCALL_NAMES.iter().enumerate() {
            assert!(!a.name.starts_with("SYS_"), "{}", a.name);
            for b in &SYSCALL_NAMES[i + 1..] {
                assert_ne!(a.nr, b.nr, "{} and {}", a.name, b.name);
            }
        }
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
    }
}
