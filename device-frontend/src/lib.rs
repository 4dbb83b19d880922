//! The device-frontend process of vgpu-sandbox: the vhost-user backend that owns the
//! virtqueues, decodes and validates every guest command, keeps the resource table and the
//! scanouts, and talks to the renderer-worker only through typed messages and the
//! descriptor lane. It never touches the GPU and, once set up, no file system either.

pub mod backend;
pub mod config_space;
pub mod control;
pub mod decode;
pub mod display;
pub mod edid;
pub mod error;
mod execute;
pub mod guest_log;
pub mod renderer_link;
pub mod resources;
mod sandbox;
pub mod scanout;

use std::os::fd::FromRawFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use protocol::bootstrap::{ChildStatus, FrontendBootstrap};
use protocol::lane::Lane;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::GpuDevice;
use crate::control::{Control, Input};
pub use crate::error::FrontendError;
use crate::renderer_link::{spawn_event_pump, RendererLink};

/// Exit code of the frontend when the renderer-worker disappears under it.
pub const EXIT_RENDERER_GONE: i32 = 3;

/// The role's main: serve one VMM connection, then return.
pub fn run(boot: FrontendBootstrap) -> Result<(), FrontendError> {
    // SAFETY: the broker placed the descriptor lane at this fd number for this process
    // alone; nothing else in the process owns it.
    let lane = unsafe { Lane::from_raw_fd(boot.lane_fd) };
    // SAFETY: likewise for the vhost-user listening socket.
    let mut listener = unsafe { Listener::from_raw_fd(boot.listener_fd) };
    let config = boot.config;

    let (mailbox_tx, mailbox_rx) = crossbeam_channel::unbounded();
    let event_idx = Arc::new(AtomicBool::new(false));
    let device = GpuDevice::new(&config, mailbox_tx.clone(), event_idx.clone())
        .map_err(|e| FrontendError::Daemon(format!("creating the exit event: {e}")))?;
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let mut daemon = VhostUserDaemon::new("vgpu-vhost-user".into(), device, mem)
        .map_err(|e| FrontendError::Daemon(e.to_string()))?;

    spawn_event_pump(boot.from_renderer, mailbox_tx.clone())?;
    let control = Control::new(
        config.clone(),
        RendererLink::new(boot.to_renderer, lane),
        event_idx,
    );
    let actor = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || match control.run(mailbox_rx) {
            Ok(stats) => stats,
            Err(e) => {
                // The device cannot go on without its renderer; the broker reports this
                // exit code and tears the rest down.
                log::error!("control actor stopped: {e}");
                std::process::exit(EXIT_RENDERER_GONE);
            }
        })
        .map_err(|e| FrontendError::Thread("control", e))?;

    if config.seccomp {
        sandbox::enter_jail()?;
    } else {
        log::warn!("seccomp disabled: the device-frontend runs unconfined");
    }
    boot.to_broker
        .send(ChildStatus::Ready)
        .map_err(|e| FrontendError::Broker(e.to_string()))?;

    daemon
        .start(&mut listener)
        .map_err(|e| FrontendError::Daemon(e.to_string()))?;
    log::info!("VMM connected");
    let _ = boot.to_broker.send(ChildStatus::VmmConnected);
    match daemon.wait() {
        Ok(()) => log::info!("VMM disconnected"),
        Err(e) => log::info!("VMM connection ended ({e})"),
    }
    let _ = mailbox_tx.send(Input::Shutdown);
    if let Ok(stats) = actor.join() {
        log::info!(
            "served {} command(s) ({} refused), {} display update(s), {} pixel byte(s)",
            stats.commands,
            stats.errors,
            stats.updates,
            stats.update_bytes
        );
    }
    let _ = boot.to_broker.send(ChildStatus::VmmDisconnected);
    // Joins the vring worker after waking it with the exit event.
    drop(daemon);
    Ok(())
}
