//! Entering the jail, once the renderer is built and before the first request is read.

use protocol::config::DeviceConfig;

use crate::error::RendererError;

/// Switches to an empty root (when the broker gave this process a mount namespace), then
/// hardens the process and installs the renderer's seccomp filter on every thread, unless
/// `config.seccomp` is off (debugging only). The order matters: the switch of root needs
/// a capability that hardening drops, and system calls that the filter forbids; and it
/// comes after the renderer is built, which still reads `/proc/self/auxv`.
pub fn enter_jail(config: &DeviceConfig) -> Result<(), RendererError> {
    // A root that cannot be emptied (the host refused the mount namespace, or a mount
    // step failed) is not fatal: seccomp still forbids opening anything. Say so clearly.
    match policy::enter_empty_root() {
        Ok(root @ policy::RootSwitch::Emptied) => log::info!("{root}"),
        Ok(root @ policy::RootSwitch::NotSpawned) => log::debug!("{root}"),
        Ok(root) => log::warn!("{root}"),
        Err(e) => log::warn!("the host's file system stays visible: {e}"),
    }
    if !config.seccomp {
        log::warn!("seccomp disabled by configuration: the renderer runs unjailed");
        return Ok(());
    }
    policy::harden_process()?;
    // The backend decides: llvmpipe needs executable memory, rutabaga does not.
    let filter = if config.virgl {
        policy::Filter::RendererVirgl
    } else {
        policy::Filter::Renderer2d
    };
    // install_seccomp logged it (role, size, action): one line per lifecycle event.
    policy::install_seccomp(filter, policy::violation_action_from_env()?)?;
    Ok(())
}
