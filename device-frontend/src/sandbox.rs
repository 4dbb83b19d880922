//! Entering the device-frontend's jail: after set-up (threads started, fds inherited),
//! before the first untrusted byte is read.

use protocol::bootstrap::Role;

use crate::error::FrontendError;

/// Empty root, then (unless `seccomp` is off, for debugging) hardening and the filter.
/// The order matters: the switch of root needs a capability that hardening drops, and
/// system calls that the filter forbids.
pub(crate) fn enter_jail(seccomp: bool) -> Result<(), FrontendError> {
    // A root that cannot be emptied (the host refused the mount namespace, or a mount
    // step failed) is not fatal: seccomp still forbids opening anything. Say so clearly.
    match policy::enter_empty_root() {
        Ok(root @ policy::RootSwitch::Emptied) => log::info!("{root}"),
        Ok(root) => log::warn!("{root}"),
        Err(e) => log::warn!("the host's file system stays visible: {e}"),
    }
    if !seccomp {
        log::warn!("seccomp disabled: the device-frontend runs unconfined");
        return Ok(());
    }
    policy::harden_process().map_err(|e| FrontendError::Sandbox(e.to_string()))?;
    let action =
        policy::violation_action_from_env().map_err(|e| FrontendError::Sandbox(e.to_string()))?;
    policy::install_seccomp(Role::Frontend, action)
        .map_err(|e| FrontendError::Sandbox(e.to_string()))?;
    // install_seccomp logged it (role, size, action): one line per lifecycle event.
    Ok(())
}
