//! The allowlist both roles share: what Rust std, glibc's threads and allocator, ipc-channel
//! and the descriptor lane need once set-up is over.
//!
//! Deliberately absent everywhere: `open`/`openat`/`creat` and every other path-taking call
//! (except the `AT_EMPTY_PATH` stat forms, below), `socket`, `connect`, `bind`, `listen`,
//! `execve`/`execveat`, `fork`/`vfork` and `clone` without `CLONE_THREAD`, `ptrace`,
//! `process_vm_readv`/`process_vm_writev`, `kill`/`tkill`/`rt_sigqueueinfo`, `tgkill` to
//! another process, `rt_sigaction` (so a trap handler cannot be replaced), `setsockopt`,
//! `ioctl` (see the role files), `prlimit64`/`setrlimit`, `unshare`/`setns`, `bpf`,
//! `perf_event_open`, `io_uring_*`, `userfaultfd`, `keyctl`, `mount`, `pkey_*`.

use super::permit::{sys, ArgCheck, Permit, Sys};

/// Whether a role may create executable mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExecMemory {
    /// `mmap`/`mprotect` with `PROT_EXEC` are denied.
    Deny,
    /// `PROT_EXEC` allowed (a JIT, e.g. llvmpipe, needs it).
    Allow,
}

/// Syscalls that fail with an errno instead of being allowed or killed: a libc that tries
/// them first falls back to something the filter can inspect.
///
/// `clone3` passes its flags in a struct in memory, which seccomp cannot read; glibc 2.34+
/// tries it first for `pthread_create` and falls back to `clone` on `ENOSYS`, whose flags
/// are a register (checked for `CLONE_THREAD` below).
pub(crate) const ERRNO_SYSCALLS: &[(Sys, i32)] = &[(sys!(SYS_clone3), libc::ENOSYS)];

/// The `fcntl` commands allowed: descriptor flags, status flags (`O_NONBLOCK`), duplication
/// with close-on-exec (Rust's `try_clone`), and seals (sealed scanout memfds; checking the
/// seals of a received memfd).
const FCNTL_COMMANDS: &[libc::c_int] = &[
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_GETFL,
    libc::F_SETFL,
    libc::F_DUPFD_CLOEXEC,
    libc::F_ADD_SEALS,
    libc::F_GET_SEALS,
];

/// `getsockopt(SOL_SOCKET, …)` options allowed: `SO_SNDBUF` (ipc-channel sizes its fragments
/// with it), `SO_DOMAIN` and `SO_TYPE` (the vhost crate checks that a received backend
/// request fd is an `AF_UNIX` stream socket).
const GETSOCKOPT_OPTIONS: &[libc::c_int] = &[libc::SO_SNDBUF, libc::SO_DOMAIN, libc::SO_TYPE];

/// `memfd_create` flags allowed: close-on-exec, sealing, and the kernel's explicit
/// not-executable seal. `MFD_HUGETLB` (and its size bits) and `MFD_EXEC` are refused.
const MEMFD_FLAGS: libc::c_uint =
    libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_NOEXEC_SEAL;

/// The socket types `socketpair` may create. Both are connection-oriented, so a
/// destination address in `sendmsg`/`sendto` is refused or ignored by the kernel: the
/// process cannot reach a named socket (such as `/dev/log`) with the sockets it owns.
const SOCKETPAIR_TYPES: &[libc::c_int] = &[libc::SOCK_STREAM, libc::SOCK_SEQPACKET];

/// The bits of a socket type argument that hold the type (the rest are `SOCK_CLOEXEC` and
/// `SOCK_NONBLOCK`).
const SOCK_TYPE_MASK: u64 = 0xf;

/// The shared allowlist. `pid` is the id of the process the filter is for (`tgkill` may only
/// target its own threads).
pub(crate) fn permits(exec: ExecMemory, pid: u32) -> Vec<Permit> {
    let mut permits = Vec::new();
    permits.extend(io());
    permits.extend(memory(exec));
    permits.extend(threads_and_time());
    permits.extend(signals_and_exit(pid));
    permits.extend(descriptors());
    permits.extend(sockets());
    permits
}

/// Reading and writing descriptors the process already holds.
fn io() -> Vec<Permit> {
    vec![
        Permit::any(sys!(SYS_read)),
        Permit::any(sys!(SYS_write)),
        Permit::any(sys!(SYS_readv)),
        Permit::any(sys!(SYS_writev)),
        Permit::any(sys!(SYS_pread64)),
        Permit::any(sys!(SYS_lseek)),
        Permit::any(sys!(SYS_close)),
        Permit::any(sys!(SYS_poll)),
        Permit::any(sys!(SYS_ppoll)),
        Permit::any(sys!(SYS_epoll_create1)),
        Permit::any(sys!(SYS_epoll_ctl)),
        Permit::any(sys!(SYS_epoll_wait)),
        Permit::any(sys!(SYS_epoll_pwait)),
        Permit::any(sys!(SYS_eventfd2)),
    ]
}

/// The allocator, thread stacks, guest memory and shared buffers.
fn memory(exec: ExecMemory) -> Vec<Permit> {
    let prot_checked = |sys: Sys| match exec {
        ExecMemory::Allow => Permit::any(sys),
        // prot is the third argument of both mmap and mprotect.
        ExecMemory::Deny => Permit::when(sys, vec![ArgCheck::none_of32(2, libc::PROT_EXEC as u64)]),
    };
    vec![
        prot_checked(sys!(SYS_mmap)),
        prot_checked(sys!(SYS_mprotect)),
        Permit::any(sys!(SYS_munmap)),
        Permit::any(sys!(SYS_mremap)),
        Permit::any(sys!(SYS_madvise)),
        Permit::any(sys!(SYS_brk)),
        Permit::when(
            sys!(SYS_memfd_create),
            vec![ArgCheck::none_of32(1, u64::from(!MEMFD_FLAGS))],
        ),
        Permit::any(sys!(SYS_ftruncate)),
    ]
}

/// Threads, their synchronisation, and clocks.
fn threads_and_time() -> Vec<Permit> {
    vec![
        // Threads only: CLONE_THREAD implies CLONE_VM and CLONE_SIGHAND, and the kernel
        // refuses it together with CLONE_NEWUSER/CLONE_NEWPID. fork() (clone with SIGCHLD)
        // and posix_spawn (CLONE_VM|CLONE_VFORK) are denied.
        Permit::when(
            sys!(SYS_clone),
            vec![ArgCheck::all_of64(0, libc::CLONE_THREAD as u64)],
        ),
        Permit::any(sys!(SYS_futex)),
        Permit::any(sys!(SYS_set_robust_list)),
        Permit::any(sys!(SYS_rseq)),
        Permit::any(sys!(SYS_sched_yield)),
        Permit::any(sys!(SYS_sched_getaffinity)),
        Permit::any(sys!(SYS_getrandom)),
        Permit::any(sys!(SYS_gettid)),
        Permit::any(sys!(SYS_getpid)),
        // Thread names (std::thread::Builder::name, set by the new thread on itself).
        Permit::arg_in(sys!(SYS_prctl), 0, &[libc::PR_SET_NAME as u64]),
        Permit::any(sys!(SYS_clock_gettime)),
        Permit::any(sys!(SYS_clock_nanosleep)),
        Permit::any(sys!(SYS_nanosleep)),
    ]
}

/// Signal masks and returns, aborts, exits.
fn signals_and_exit(pid: u32) -> Vec<Permit> {
    vec![
        Permit::any(sys!(SYS_rt_sigreturn)),
        Permit::any(sys!(SYS_rt_sigprocmask)),
        // Rust's stack-overflow handler gives each thread an alternate signal stack.
        Permit::any(sys!(SYS_sigaltstack)),
        // abort() (a panic with panic=abort, a failed allocation) raises SIGABRT at the
        // calling thread: tgkill(own pid, tid, SIGABRT). Other processes are out of reach.
        Permit::when(sys!(SYS_tgkill), vec![ArgCheck::eq32(0, u64::from(pid))]),
        Permit::any(sys!(SYS_restart_syscall)),
        Permit::any(sys!(SYS_exit)),
        Permit::any(sys!(SYS_exit_group)),
    ]
}

/// Operations on descriptors the process holds (no way to get new ones by path).
fn descriptors() -> Vec<Permit> {
    let fcntl_commands: Vec<u64> = FCNTL_COMMANDS.iter().map(|&c| c as u64).collect();
    let empty_path = ArgCheck::all_of32;
    vec![
        Permit::arg_in(sys!(SYS_fcntl), 1, &fcntl_commands),
        Permit::any(sys!(SYS_dup)),
        Permit::any(sys!(SYS_fstat)),
        // glibc 2.33+ implements fstat() as newfstatat(fd, "", buf, AT_EMPTY_PATH), Rust std's
        // File::metadata uses statx(fd, "", AT_EMPTY_PATH, ...). Both forms are allowed only
        // with AT_EMPTY_PATH. Seccomp cannot read the path, so a non-empty path still
        // resolves; this leaks metadata (existence, size, owner) of paths the process could
        // otherwise not see, but never opens anything or reads contents.
        Permit::when(
            sys!(SYS_newfstatat),
            vec![empty_path(3, libc::AT_EMPTY_PATH as u64)],
        ),
        Permit::when(
            sys!(SYS_statx),
            vec![empty_path(2, libc::AT_EMPTY_PATH as u64)],
        ),
    ]
}

/// Messages on sockets the process already holds (ipc-channel, the descriptor lane).
fn sockets() -> Vec<Permit> {
    let getsockopt = GETSOCKOPT_OPTIONS
        .iter()
        .map(|&option| {
            vec![
                ArgCheck::eq32(1, libc::SOL_SOCKET as u64),
                ArgCheck::eq32(2, option as u64),
            ]
        })
        .collect();
    let socketpair = SOCKETPAIR_TYPES
        .iter()
        .map(|&kind| {
            vec![
                ArgCheck::eq32(0, libc::AF_UNIX as u64),
                ArgCheck::masked32(1, SOCK_TYPE_MASK, kind as u64),
            ]
        })
        .collect();
    vec![
        Permit::any(sys!(SYS_sendmsg)),
        Permit::any(sys!(SYS_recvmsg)),
        // send() is sendto(fd, buf, len, flags, NULL, 0): no destination address.
        Permit::when(sys!(SYS_sendto), vec![ArgCheck::eq64(4, 0)]),
        Permit::any(sys!(SYS_recvfrom)),
        Permit::any(sys!(SYS_shutdown)),
        // ipc-channel makes a socketpair for every new channel and for every fragmented
        // (large) message.
        Permit::when_any(sys!(SYS_socketpair), socketpair),
        Permit::when_any(sys!(SYS_getsockopt), getsockopt),
    ]
}
