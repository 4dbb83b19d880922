//! Sandbox policies of vgpu-sandbox.
//!
//! The broker starts each child in its own namespaces ([`namespaces::spawn`]). Every
//! child process (device-frontend, renderer-worker) then jails itself in three steps,
//! after its set-up and before it reads its first untrusted byte:
//!
//! 1. [`enter_empty_root`]: an empty read-only tmpfs becomes its root (when the broker
//!    could give it a mount namespace; see `src/namespaces.rs` for the whole order and the
//!    fallback when the host refuses namespaces).
//! 2. [`harden_process`]: no new privileges, not dumpable, no core files, a cap on open
//!    descriptors.
//! 3. [`install_seccomp`]: the role's syscall allowlist, applied to every thread of the
//!    process (TSYNC). A syscall outside the list kills the whole process
//!    ([`ViolationAction::Kill`], production) or, for debugging, prints one line naming the
//!    syscall and exits with [`TRAP_EXIT_CODE`] ([`ViolationAction::Trap`]).
//!
//! The allowlists ([`allowed_syscalls`]) are x86_64-only for now; see `src/seccomp/` for
//! the reasons behind every entry.
//!
//! [`limits`] is the other half of the policy: how much of the host one guest may use
//! (resources, their bytes, contexts, command size, hostmem mappings), the defaults and
//! why, and the validation of values a user gives.

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("vgpu-policy: the seccomp allowlists are written for x86_64 Linux only");

mod error;
mod harden;
pub mod limits;
pub mod namespaces;
mod seccomp;
mod trap;
mod warm_up;

pub use error::PolicyError;
pub use harden::{drop_capabilities, harden_process, MAX_OPEN_FILES};
pub use namespaces::{enter_empty_root, Namespace, NamespaceError, NamespaceSet, RootSwitch};
pub use protocol::bootstrap::Role;
pub use seccomp::{allowed_syscalls, filter_for, install_seccomp, Filter, METRICS_OPEN_FLAGS};
pub use trap::TRAP_EXIT_CODE;

/// The environment variable that selects the [`ViolationAction`] (`kill`, `trap` or `log`).
pub const SECCOMP_ENV: &str = "VGPU_SANDBOX_SECCOMP";

/// What the kernel does when a jailed process makes a syscall outside its allowlist.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ViolationAction {
    /// `SECCOMP_RET_KILL_PROCESS`: the whole process dies of `SIGSYS` at once. Production.
    #[default]
    Kill,
    /// `SECCOMP_RET_TRAP`: the kernel raises `SIGSYS`; a handler installed by
    /// [`install_seccomp`] writes one line such as
    /// `renderer-worker: seccomp violation: syscall 257 (openat)` to stderr and exits with
    /// [`TRAP_EXIT_CODE`]. For debugging a policy; the handler cannot be replaced afterwards
    /// because `rt_sigaction` is not allowed.
    Trap,
    /// `SECCOMP_RET_LOG`: the call is allowed and the kernel logs it (audit / kernel log).
    /// Development only, to derive an allowlist from a real workload; the process is not
    /// confined in this mode.
    Log,
}

impl ViolationAction {
    /// Parses the value of [`SECCOMP_ENV`]: `None` (unset) is [`ViolationAction::Kill`],
    /// `"kill"` and `"trap"` name the actions, anything else is an error.
    pub fn parse(value: Option<&str>) -> Result<ViolationAction, PolicyError> {
        match value {
            None | Some("kill") => Ok(ViolationAction::Kill),
            Some("trap") => Ok(ViolationAction::Trap),
            Some("log") => Ok(ViolationAction::Log),
            Some(other) => Err(PolicyError::BadViolationAction(other.to_string())),
        }
    }
}

/// Reads [`ViolationAction`] from the `VGPU_SANDBOX_SECCOMP` environment variable
/// (`kill`, `trap` or `log`; unset means `kill`). Any other value, including one that is not
/// valid UTF-8, is an error that names it.
pub fn violation_action_from_env() -> Result<ViolationAction, PolicyError> {
    match std::env::var_os(SECCOMP_ENV) {
        None => ViolationAction::parse(None),
        Some(value) => match value.to_str() {
            Some(text) => ViolationAction::parse(Some(text)),
            None => Err(PolicyError::BadViolationAction(
                value.to_string_lossy().into_owned(),
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_violation_actions() {
        assert_eq!(ViolationAction::parse(None).unwrap(), ViolationAction::Kill);
        assert_eq!(
            ViolationAction::parse(Some("kill")).unwrap(),
            ViolationAction::Kill
        );
        assert_eq!(
            ViolationAction::parse(Some("trap")).unwrap(),
            ViolationAction::Trap
        );
        assert_eq!(
            ViolationAction::parse(Some("log")).unwrap(),
            ViolationAction::Log
        );
        let err = ViolationAction::parse(Some("warn")).unwrap_err();
        assert!(err.to_string().contains("\"warn\""), "{err}");
        assert!(ViolationAction::parse(Some("KILL")).is_err());
        assert!(ViolationAction::parse(Some("")).is_err());
    }
}
