//! The device-frontend process of vgpu-sandbox: the vhost-user backend that owns the
//! virtqueues, decodes and validates every guest command, keeps the resource table and the
//! scanouts, and talks to the renderer-worker only through typed messages and the
//! descriptor lane. It never touches the GPU and, once set up, no file system either.

pub mod backend;
pub mod backend_channel;
pub mod blob_map;
mod blobs;
pub mod chain_io;
pub mod config_space;
pub mod control;
pub mod decode;
pub mod display;
pub mod edid;
pub mod error;
mod execute;
pub mod guest_log;
pub mod mailbox;
pub mod metrics;
pub mod mirror;
pub mod renderer_link;
pub mod resources;
pub mod restart;
mod sandbox;
pub mod scanout;
mod virgl;
pub mod vmm_requests;

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use protocol::bootstrap::{ChildStatus, FrontendBootstrap};
use protocol::lane::Lane;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::GpuDevice;
use crate::control::Control;
pub use crate::error::FrontendError;
use crate::renderer_link::RendererLink;

/// How long the reset after a VMM disconnect may take (`--keep-listening`): it waits for
/// unmaps in flight, whose acknowledgments fail at once on the closed channel.
const DISCONNECT_RESET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Exit code of the frontend when the renderer-worker disappears under it.
pub const EXIT_RENDERER_GONE: i32 = 3;

/// A vhost-user daemon serving `device`, its vring worker also watching the mailbox, the
/// renderer's doorbell and, with metrics on, the metrics timer.
fn new_daemon(
    device: &GpuDevice,
    metrics_timer: Option<std::os::fd::RawFd>,
) -> Result<VhostUserDaemon<GpuDevice>, FrontendError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::default());
    let daemon = VhostUserDaemon::new("vgpu-vhost-user".into(), device.clone(), mem)
        .map_err(|e| FrontendError::Daemon(e.to_string()))?;
    let doorbell = device
        .renderer_doorbell_fd()
        .ok_or_else(|| FrontendError::Daemon("control actor poisoned".into()))?;
    let metrics = metrics_timer.map(|fd| (fd, mailbox::METRICS_EVENT, "metrics timer"));
    let handlers = daemon.get_epoll_handlers();
    device.set_event_loop(&handlers);
    for handler in handlers {
        for (fd, event, what) in [
            (device.mailbox_fd(), mailbox::MAILBOX_EVENT, "mailbox"),
            (doorbell, mailbox::RENDERER_EVENT, "renderer doorbell"),
        ]
        .into_iter()
        .chain(metrics)
        {
            handler
                .register_listener(fd, vmm_sys_util::epoll::EventSet::IN, u64::from(event))
                .map_err(|e| FrontendError::Daemon(format!("registering the {what}: {e}")))?;
        }
    }
    Ok(daemon)
}

/// The role's main: serve one VMM connection (or, with `keep_listening`, one after the
/// other), then return.
pub fn run(boot: FrontendBootstrap) -> Result<(), FrontendError> {
    // SAFETY: the broker placed the descriptor lane at this fd number for this process
    // alone; nothing else in the process owns it.
    let lane = unsafe { Lane::from_raw_fd(boot.lane_fd) };
    // SAFETY: likewise for the vhost-user listening socket.
    let mut listener = unsafe { Listener::from_raw_fd(boot.listener_fd) };
    let config = boot.config;

    let (mailbox, inbox) =
        mailbox::mailbox().map_err(|e| FrontendError::Daemon(format!("mailbox: {e}")))?;
    let event_idx = Arc::new(AtomicBool::new(false));
    // SAFETY: as for the lane: the doorbell eventfd was placed at this number for us alone.
    let doorbell = unsafe { OwnedFd::from_raw_fd(boot.doorbell_fd) };
    let link = RendererLink::new(boot.to_renderer, boot.from_renderer, doorbell, lane);
    let mut control = Control::new(config.clone(), link, event_idx.clone());
    // SAFETY: as for the lane: the broker's lane was placed at this number for us alone.
    let broker_lane = unsafe { Lane::from_raw_fd(boot.broker_lane_fd) };
    control.set_renewals(restart::Renewals::new(boot.renewals, broker_lane));
    let device = GpuDevice::new(&config, control, (mailbox, inbox), event_idx)
        .map_err(|e| FrontendError::Daemon(format!("creating the exit event: {e}")))?;
    // Armed before the jail, which has no timerfd_create or timerfd_settime.
    let metrics_timer = match boot.metrics_period {
        Some(period) => {
            let reporter = metrics::Reporter::start(period, boot.to_broker.clone())
                .map_err(|e| FrontendError::Daemon(format!("metrics timer: {e}")))?;
            let fd = device
                .set_metrics(reporter)
                .map_err(|e| FrontendError::Daemon(format!("metrics timer: {e}")))?;
            Some(fd)
        }
        None => None,
    };
    let mut daemon = new_daemon(&device, metrics_timer)?;

    sandbox::enter_jail(config.seccomp)?;
    boot.to_broker
        .send(ChildStatus::Ready)
        .map_err(|e| FrontendError::Broker(e.to_string()))?;

    loop {
        daemon
            .start(&mut listener)
            .map_err(|e| FrontendError::Daemon(e.to_string()))?;
        log::info!("VMM connected");
        let _ = boot.to_broker.send(ChildStatus::VmmConnected);
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => log::info!("VMM disconnected"),
            Err(e) => log::info!("VMM connection ended ({e})"),
        }
        if !config.keep_listening {
            break;
        }
        let _ = boot.to_broker.send(ChildStatus::VmmDisconnected);
        // The reset runs on the vring worker, which lives as long as this daemon.
        if !device.reset_after_disconnect(DISCONNECT_RESET_TIMEOUT) {
            return Err(FrontendError::Daemon(format!(
                "the device did not reset within {DISCONNECT_RESET_TIMEOUT:?} after the VMM \
                 disconnected"
            )));
        }
        // vhost-user-backend keeps a connection's state (owner, features, rings, memory
        // table) in the daemon, with no way to clear it: the next VMM gets a new daemon.
        drop(daemon);
        device
            .renew_exit_event()
            .map_err(|e| FrontendError::Daemon(format!("creating the exit event: {e}")))?;
        daemon = new_daemon(&device, metrics_timer)?;
        log::info!("waiting for the next VMM connection (--keep-listening)");
    }
    // Joins the vring worker (the actor's thread) after waking it with the exit event.
    drop(daemon);
    if let Some((commands, errors, updates, bytes)) = device.with_control(|c| {
        let s = c.stats();
        (s.commands, s.errors, s.updates, s.update_bytes)
    }) {
        log::info!(
            "served {commands} command(s) ({errors} refused), {updates} display update(s), \
             {bytes} pixel byte(s)"
        );
    }
    let _ = boot.to_broker.send(ChildStatus::VmmDisconnected);
    Ok(())
}
