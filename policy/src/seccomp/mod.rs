//! Seccomp filters per role: building ([`filter_for`]) and installing ([`install_seccomp`]).
//!
//! A filter is one BPF program: a short prefix that makes the syscalls of
//! [`common::ERRNO_SYSCALLS`] fail with an errno (clone3 → `ENOSYS`), followed by
//! seccompiler's allowlist program whose default action is the [`ViolationAction`].

mod broker;
pub use broker::METRICS_OPEN_FLAGS;
mod common;
mod frontend;
pub(crate) mod permit;
mod renderer;

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::{trap, warm_up, PolicyError, Role, ViolationAction};
use permit::Permit;

/// Which allowlist: one per role, and the renderer's depends on its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// The device-frontend.
    Frontend,
    /// The renderer-worker with rutabaga's 2D and cross-domain components: no executable
    /// memory.
    Renderer2d,
    /// The renderer-worker with virglrenderer: llvmpipe compiles shaders to machine code.
    RendererVirgl,
    /// The broker after set-up.
    Broker,
    /// The broker after set-up with `--metrics-file`: it may also create and rename files
    /// in the directory open at `dir_fd` (see `src/seccomp/broker.rs`). The descriptor
    /// number is part of the filter, so it must stay open, at that number, for good.
    BrokerMetrics {
        /// The metrics file's directory.
        dir_fd: i32,
    },
}

impl Filter {
    /// The process role it is for.
    pub fn role(self) -> Role {
        match self {
            Filter::Frontend => Role::Frontend,
            Filter::Renderer2d | Filter::RendererVirgl => Role::Renderer,
            Filter::Broker | Filter::BrokerMetrics { .. } => Role::Broker,
        }
    }

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Filter::RendererVirgl => "renderer-worker (virgl)",
            other => other.role().name(),
        }
    }
}

/// A role's default filter (the renderer's is the 2D one).
impl From<Role> for Filter {
    fn from(role: Role) -> Self {
        match role {
            Role::Frontend => Filter::Frontend,
            Role::Renderer => Filter::Renderer2d,
            Role::Broker => Filter::Broker,
        }
    }
}

/// The permits of `filter` for the process `pid`.
pub(crate) fn permits(filter: Filter, pid: u32) -> Vec<Permit> {
    match filter {
        Filter::Frontend => frontend::permits(pid),
        Filter::Renderer2d => renderer::permits_2d(pid),
        Filter::RendererVirgl => renderer::permits_virgl(pid),
        Filter::Broker => broker::permits(pid),
        Filter::BrokerMetrics { dir_fd } => broker::permits_with_metrics(pid, dir_fd),
    }
}

/// The names of the syscalls `filter` allows, in allowlist order. Some are allowed only
/// with certain arguments (see `src/seccomp/common.rs`); `clone3` is not listed, it fails
/// with `ENOSYS`.
pub fn allowed_syscalls(filter: impl Into<Filter>) -> Vec<&'static str> {
    permits(filter.into(), std::process::id())
        .into_iter()
        .map(|permit| permit.name)
        .collect()
}

/// Builds the BPF program of `role` for the calling process, with `action` for every
/// syscall outside the allowlist.
///
/// The program is only meant for the process that builds it: `tgkill` is allowed for the
/// caller's own pid only.
pub fn filter_for(
    filter: impl Into<Filter>,
    action: ViolationAction,
) -> Result<BpfProgram, PolicyError> {
    build(filter.into(), action, std::process::id())
}

/// Installs `role`'s filter on every thread of the calling process (`SECCOMP_FILTER_FLAG_TSYNC`),
/// with `action` for violations. With [`ViolationAction::Trap`] the SIGSYS handler is
/// installed first. Also sets `PR_SET_NO_NEW_PRIVS` (required for an unprivileged filter).
///
/// Call it after set-up and before the first untrusted byte is read. Afterwards no file can
/// be opened, no process started and no signal handler changed.
///
/// Before the filter it makes glibc do lazy work that would otherwise open a file later
/// (see `src/warm_up.rs`: the first shrink of a thread's malloc heap reads
/// `/proc/sys/vm/overcommit_memory`); this costs a short-lived thread and a few ms. As
/// init of its own pid namespace, the process also gets a SIGABRT handler first (see
/// `namespaces::exit_on_abort_as_init`), so an abort does not read as a violation.
pub fn install_seccomp(
    filter: impl Into<Filter>,
    action: ViolationAction,
) -> Result<(), PolicyError> {
    let filter = filter.into();
    let role = filter.role();
    let program = filter_for(filter, action)?;
    warm_up::warm_up_malloc();
    crate::namespaces::exit_on_abort_as_init().map_err(PolicyError::SigabrtHandler)?;
    if action == ViolationAction::Trap {
        trap::install_sigsys_handler(role)?;
    }
    seccompiler::apply_filter_all_threads(&program).map_err(|source| {
        PolicyError::InstallFilter {
            role: filter.name(),
            source,
        }
    })?;
    log::info!(
        "{}: seccomp filter installed ({} instructions, violations: {:?})",
        filter.name(),
        program.len(),
        action
    );
    Ok(())
}

fn build(filter: Filter, action: ViolationAction, pid: u32) -> Result<BpfProgram, PolicyError> {
    let err = |source| PolicyError::BuildFilter {
        role: filter.name(),
        source,
    };
    let mut rules = BTreeMap::new();
    for permit in permits(filter, pid) {
        let previous = rules.insert(permit.nr, permit.rules().map_err(err)?);
        debug_assert!(previous.is_none(), "{} is listed twice", permit.name);
    }
    let mismatch = match action {
        ViolationAction::Kill => SeccompAction::KillProcess,
        ViolationAction::Trap => SeccompAction::Trap,
        ViolationAction::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    let allowlist: BpfProgram = filter.try_into().map_err(err)?;
    let mut program = errno_prefix(common::ERRNO_SYSCALLS);
    program.extend(allowlist);
    Ok(program)
}

// Classic BPF opcodes (linux/filter.h) and seccomp_data offsets (linux/seccomp.h).
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K` (0x05 | 0x10 | 0x00).
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_RET | BPF_K` (0x06 | 0x00).
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
/// `AUDIT_ARCH_X86_64`: `EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The instructions that answer each of `errnos`' syscalls with its errno. Any other call
/// (and any call from another architecture, which the allowlist that follows rejects) falls
/// through to the next instruction after the prefix.
fn errno_prefix(errnos: &[(permit::Sys, i32)]) -> BpfProgram {
    let mut prefix = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        // Wrong arch: skip the number load and the pairs below.
        jump(
            BPF_JMP_JEQ_K,
            AUDIT_ARCH_X86_64,
            0,
            u8::try_from(1 + 2 * errnos.len()).expect("errno prefix too long"),
        ),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
    ];
    for (sys, errno) in errnos {
        let nr = u32::try_from(sys.nr).expect("syscall numbers are small");
        prefix.push(jump(BPF_JMP_JEQ_K, nr, 0, 1));
        let errno = u32::try_from(*errno).expect("errnos are small");
        prefix.push(stmt(BPF_RET_K, u32::from(SeccompAction::Errno(errno))));
    }
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [Filter; 3] = [Filter::Frontend, Filter::Renderer2d, Filter::RendererVirgl];

    #[test]
    fn filters_build_for_every_role_and_action() {
        for role in ROLES {
            for action in [ViolationAction::Kill, ViolationAction::Trap] {
                let program = filter_for(role, action).unwrap();
                assert!(program.len() < 4096, "{role:?}: {}", program.len());
            }
        }
    }

    #[test]
    fn no_syscall_is_listed_twice() {
        for role in ROLES {
            let mut names = allowed_syscalls(role);
            let count = names.len();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), count, "{role:?}");
        }
    }

    #[test]
    fn dangerous_syscalls_are_absent() {
        let forbidden = [
            "open",
            "openat",
            "openat2",
            "creat",
            "socket",
            "connect",
            "bind",
            "listen",
            "execve",
            "execveat",
            "fork",
            "vfork",
            "clone3",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "kill",
            "tkill",
            "rt_sigaction",
            "rt_sigqueueinfo",
            "rt_tgsigqueueinfo",
            "setsockopt",
            "prlimit64",
            "unshare",
            "setns",
            "bpf",
            "perf_event_open",
            "io_uring_setup",
            "userfaultfd",
            "mount",
            "seccomp",
            "pidfd_open",
            "pidfd_getfd",
        ];
        for role in ROLES {
            let allowed = allowed_syscalls(role);
            for name in forbidden {
                assert!(!allowed.contains(&name), "{role:?} allows {name}");
            }
        }
        for renderer in [Filter::Renderer2d, Filter::RendererVirgl] {
            assert!(!allowed_syscalls(renderer).contains(&"ioctl"));
            assert!(!allowed_syscalls(renderer).contains(&"accept4"));
        }
    }

    #[test]
    fn role_specific_entries() {
        let frontend = allowed_syscalls(Role::Frontend);
        assert!(frontend.contains(&"accept4"));
        assert!(frontend.contains(&"memfd_create"));
        let renderer = allowed_syscalls(Role::Renderer);
        assert!(renderer.contains(&"mmap"));
    }

    #[test]
    fn broker_may_open_only_with_metrics() {
        assert!(!allowed_syscalls(Filter::Broker).contains(&"openat"));
        let with = allowed_syscalls(Filter::BrokerMetrics { dir_fd: 7 });
        for name in ["openat", "renameat", "renameat2"] {
            assert!(with.contains(&name), "{name}");
        }
        for name in ["open", "openat2", "creat", "rename"] {
            assert!(!with.contains(&name), "{name}");
        }
        filter_for(Filter::BrokerMetrics { dir_fd: 7 }, ViolationAction::Kill).unwrap();
    }

    #[test]
    fn prefix_answers_clone3_with_enosys() {
        let program = filter_for(Role::Renderer, ViolationAction::Kill).unwrap();
        let enosys = u32::from(SeccompAction::Errno(libc::ENOSYS as u32));
        assert_eq!(program[0], stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH));
        assert_eq!(program[1], jump(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 0, 3));
        assert_eq!(program[2], stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR));
        assert_eq!(
            program[3],
            jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1)
        );
        assert_eq!(program[4], stmt(BPF_RET_K, enosys));
        // Another arch jumps (1 + 3) to index 5: the allowlist's own arch check, which
        // kills.
        assert_eq!(program[5], stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH));
    }
}
