//! Entering the jail, once the renderer is built and before the first request is read.

use protocol::bootstrap::Role;
use protocol::config::DeviceConfig;

use crate::error::RendererError;

/// Hardens the process and installs the renderer's seccomp filter on every thread, unless
/// `config.seccomp` is off (debugging only).
pub fn enter_jail(config: &DeviceConfig) -> Result<(), RendererError> {
    if !config.seccomp {
        log::warn!("seccomp disabled by configuration: the renderer runs unjailed");
        return Ok(());
    }
    policy::harden_process()?;
    policy::install_seccomp(Role::Renderer, policy::violation_action_from_env()?)?;
    log::info!("renderer jailed (seccomp filter installed)");
    Ok(())
}
