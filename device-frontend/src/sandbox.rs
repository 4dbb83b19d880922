//! Entering the device-frontend's jail: after set-up (threads started, fds inherited),
//! before the first untrusted byte is read.

use protocol::bootstrap::Role;

use crate::error::FrontendError;

pub(crate) fn enter_jail() -> Result<(), FrontendError> {
    policy::harden_process().map_err(|e| FrontendError::Sandbox(e.to_string()))?;
    let action =
        policy::violation_action_from_env().map_err(|e| FrontendError::Sandbox(e.to_string()))?;
    policy::install_seccomp(Role::Frontend, action)
        .map_err(|e| FrontendError::Sandbox(e.to_string()))?;
    log::info!("seccomp filter installed ({action:?} on violation)");
    Ok(())
}
