//! The errors of this crate.

/// What went wrong while jailing a process. Each variant names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `VGPU_SANDBOX_SECCOMP` held something other than `kill` or `trap`.
    #[error("VGPU_SANDBOX_SECCOMP: expected \"kill\" or \"trap\", got {0:?}")]
    BadViolationAction(String),
    /// A `prctl` of [`crate::harden_process`] failed.
    #[error("prctl({what}) failed: {source}")]
    Prctl {
        /// The option that was being set.
        what: &'static str,
        /// The errno.
        source: nix::Error,
    },
    /// Reading or lowering a resource limit failed.
    #[error("setting {what} failed: {source}")]
    Rlimit {
        /// The limit.
        what: &'static str,
        /// The errno.
        source: nix::Error,
    },
    /// The allowlist could not be turned into a BPF program.
    #[error("building the {role} seccomp filter failed: {source}")]
    BuildFilter {
        /// The role whose filter was being built.
        role: &'static str,
        /// seccompiler's complaint.
        source: seccompiler::BackendError,
    },
    /// The SIGSYS handler of [`crate::ViolationAction::Trap`] could not be installed.
    #[error("installing the SIGSYS handler failed: {0}")]
    SigsysHandler(nix::Error),
    /// The SIGABRT handler of a process that is init of its own pid namespace could not be
    /// installed (see `namespaces.rs`).
    #[error("installing the SIGABRT handler failed: {0}")]
    SigabrtHandler(nix::Error),
    /// The kernel refused the filter (`seccomp(SECCOMP_SET_MODE_FILTER, TSYNC)`), e.g.
    /// because another thread runs under a different filter.
    #[error("installing the {role} seccomp filter failed: {source}")]
    InstallFilter {
        /// The role whose filter was being installed.
        role: &'static str,
        /// seccompiler's complaint.
        source: seccompiler::Error,
    },
}
