//! The renderer-worker role of vgpu-sandbox: the jailed process that owns the renderer.
//!
//! It receives validated requests from the device-frontend, executes them on a renderer
//! backend ([`Renderer`]; rutabaga 2D and cross-domain today) in strict order on one thread, and answers
//! with replies and fence events. Guest memory and scanout buffers reach it as fds on the
//! descriptor lane and are mapped here; nothing leaves it as a pointer.

#![warn(missing_docs)]

mod backend;
mod cursor;
mod error;
mod events;
mod executor;
mod geometry;
mod guest_memory;
mod mapping;
mod resources;
mod rutabaga_renderer;
mod sandbox;
mod scanout;
#[cfg(test)]
mod test_util;
#[cfg(feature = "virgl")]
mod virgl;

pub use backend::{
    BlobCreate, CapsetInfo, ExportedBlob, Renderer, BYTES_PER_PIXEL, VIRTIO_GPU_FORMATS,
};
pub use cursor::{CURSOR_BYTES, CURSOR_SIZE};
pub use error::RendererError;
pub use events::{EventSink, SinkClosed};
pub use executor::Executor;
pub use guest_memory::{Backing, GuestMemory, HostIovec, MAX_REGIONS};
pub use rutabaga_renderer::{
    check_cross_domain_commands, Rutabaga2d, RutabagaRenderer, CAPSETS,
    MAX_IMAGE_QUERIES_PER_CONTEXT, NUM_CAPSETS,
};
pub use sandbox::enter_jail;
#[cfg(feature = "virgl")]
pub use virgl::{VirglRenderer, VIRGL_CAPSETS};

use protocol::bootstrap::{ChildStatus, RendererBootstrap};
use protocol::lane::Lane;

/// The renderer-worker's main: builds the renderer, jails the process, reports
/// [`ChildStatus::Ready`] to the broker and serves requests until the frontend closes the
/// request channel (then `Ok`).
pub fn run(boot: RendererBootstrap) -> Result<(), RendererError> {
    let RendererBootstrap {
        config,
        requests,
        events,
        to_broker,
        lane_fd,
        doorbell_fd,
    } = boot;
    if lane_fd < 0 {
        return Err(RendererError::Bootstrap(format!("lane fd {lane_fd}")));
    }
    // SAFETY: the broker makes the descriptor lane our inherited fd `lane_fd` and nothing
    // else in this process opens, wraps or closes that number; `Lane` becomes its sole
    // owner here, once.
    let lane = unsafe { Lane::from_raw_fd(lane_fd) };
    if doorbell_fd < 0 {
        return Err(RendererError::Bootstrap(format!(
            "doorbell fd {doorbell_fd}"
        )));
    }
    // SAFETY: as for the lane: the broker placed the doorbell eventfd at this number for
    // this process, and only this `OwnedFd` ever owns it.
    let doorbell =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(doorbell_fd) };
    let events = EventSink::with_doorbell(events, doorbell);
    if config.virgl {
        #[cfg(feature = "virgl")]
        {
            let render_node = match &config.render_node {
                Some(path) => Some(open_render_node(path)?),
                None => None,
            };
            let renderer = VirglRenderer::new(config.limits, render_node, events.fence_callback())
                .map_err(|e| RendererError::Virgl(e.to_string()))?;
            if renderer.num_capsets() != config.num_capsets {
                return Err(RendererError::Virgl(format!(
                    "virglrenderer offers {} of the {} virgl capsets",
                    renderer.num_capsets(),
                    config.num_capsets
                )));
            }
            log::info!(
                "renderer built (virglrenderer, {} capsets)",
                renderer.num_capsets()
            );
            return serve(renderer, lane, events, &config, &requests, &to_broker);
        }
        #[cfg(not(feature = "virgl"))]
        return Err(RendererError::Virgl(
            "this build has no virgl renderer (cargo feature `virgl`)".into(),
        ));
    }
    let renderer = RutabagaRenderer::new(config.limits, events.fence_callback())
        .map_err(RendererError::Init)?;
    log::info!(
        "renderer built (rutabaga 2D + cross-domain, {} capsets)",
        renderer.num_capsets()
    );
    serve(renderer, lane, events, &config, &requests, &to_broker)
}

/// Opens the render node for virglrenderer; before the jail, which allows no open.
#[cfg(feature = "virgl")]
fn open_render_node(path: &str) -> Result<std::os::fd::OwnedFd, RendererError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(std::os::fd::OwnedFd::from)
        .map_err(|e| RendererError::Virgl(format!("render node {path}: {e}")))
}

/// Jails the process, reports ready and serves requests with `renderer`.
fn serve<R: Renderer>(
    renderer: R,
    lane: Lane,
    events: EventSink,
    config: &protocol::config::DeviceConfig,
    requests: &ipc_channel::ipc::IpcReceiver<protocol::ipc::RendererBatch>,
    to_broker: &ipc_channel::ipc::IpcSender<ChildStatus>,
) -> Result<(), RendererError> {
    let executor = Executor::new(renderer, lane, events, config);
    sandbox::enter_jail(config)?;
    to_broker
        .send(ChildStatus::Ready)
        .map_err(RendererError::Broker)?;
    log::info!("renderer ready");
    executor.run(requests)
}
