//! How the broker wires up its children.
//!
//! The broker re-executes itself once per role with the name of an ipc-channel one-shot
//! server; the child connects, sends a [`ChildHello`] with a sender for its bootstrap, and
//! the broker answers with the role's [`ChildBootstrap`]: its config, its channel ends and
//! the numbers of the fds it inherited (descriptor lane, vhost-user listener).

use ipc_channel::ipc::{IpcReceiver, IpcSender};
use serde::{Deserialize, Serialize};

use crate::config::DeviceConfig;
use crate::ipc::{RendererBatch, RendererEvent};

/// Command-line flag that selects a child role (hidden from users).
pub const ROLE_FLAG: &str = "--internal-role";
/// Command-line flag that names the bootstrap one-shot server.
pub const BOOTSTRAP_FLAG: &str = "--internal-bootstrap";
/// The fd number at which a child inherits its descriptor lane.
pub const LANE_FD: i32 = 3;
/// The fd number at which the frontend inherits the vhost-user listening socket.
pub const LISTENER_FD: i32 = 4;
/// The fd number at which both children inherit the renderer's doorbell: an eventfd the
/// renderer increments after each event it sends, so the frontend's event loop (which
/// cannot poll an ipc-channel receiver) knows when to read the events channel.
pub const DOORBELL_FD: i32 = 5;
/// The fd number at which the frontend inherits its end of the broker's descriptor lane,
/// on which a restarted renderer-worker's lane end arrives (see [`RendererLinkRenewal`]).
pub const BROKER_LANE_FD: i32 = 6;

/// The process roles below the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The vhost-user backend: virtqueues, decoding, resource table, display socket.
    Frontend,
    /// The renderer owner.
    Renderer,
    /// The broker itself (it jails itself too, once its children run). Never a child role.
    Broker,
}

impl Role {
    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Frontend => "device-frontend",
            Role::Renderer => "renderer-worker",
            Role::Broker => "broker",
        }
    }

    /// Parses the name of a child role (never [`Role::Broker`]: it is not started by role).
    pub fn from_name(name: &str) -> Option<Role> {
        match name {
            "device-frontend" => Some(Role::Frontend),
            "renderer-worker" => Some(Role::Renderer),
            _ => None,
        }
    }
}

/// First message of a child to the broker.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildHello {
    /// The role the child was started with.
    pub role: Role,
    /// Its pid, as the child sees it.
    pub pid: u32,
    /// Where the broker sends the bootstrap.
    pub bootstrap: IpcSender<ChildBootstrap>,
}

/// Status reports of a child to the broker.
#[derive(Debug, Serialize, Deserialize)]
pub enum ChildStatus {
    /// Set-up is done and the seccomp filter is installed.
    Ready,
    /// The VMM connected (frontend only).
    VmmConnected,
    /// The VMM disconnected; the frontend is about to exit 0.
    VmmDisconnected,
    /// The frontend's counters (frontend only, every
    /// [`FrontendBootstrap::metrics_period`] when that is set).
    Metrics(Box<crate::metrics::MetricsSnapshot>),
}

/// The bootstrap of the device-frontend.
#[derive(Debug, Serialize, Deserialize)]
pub struct FrontendBootstrap {
    /// Device configuration.
    pub config: DeviceConfig,
    /// Requests to the renderer.
    pub to_renderer: IpcSender<RendererBatch>,
    /// Replies and events from the renderer.
    pub from_renderer: IpcReceiver<RendererEvent>,
    /// Status reports to the broker.
    pub to_broker: IpcSender<ChildStatus>,
    /// Inherited fd number of the descriptor lane to the renderer.
    pub lane_fd: i32,
    /// Inherited fd number of the vhost-user listening socket.
    pub listener_fd: i32,
    /// Inherited fd number of the renderer's doorbell (read side).
    pub doorbell_fd: i32,
    /// Links to the renderer-workers the broker starts after one dies.
    pub renewals: IpcReceiver<RendererLinkRenewal>,
    /// Inherited fd number of the broker's descriptor lane ([`BROKER_LANE_FD`]).
    pub broker_lane_fd: i32,
    /// How often to send [`ChildStatus::Metrics`]; None (no `--metrics-file`): never.
    pub metrics_period: Option<std::time::Duration>,
}

/// The frontend's link to a restarted renderer-worker, sent by the broker on
/// [`FrontendBootstrap::renewals`] once the new renderer is ready; the broker then rings
/// the doorbell, which the new renderer shares with the old one.
#[derive(Debug, Serialize, Deserialize)]
pub struct RendererLinkRenewal {
    /// Requests to the new renderer.
    pub to_renderer: IpcSender<RendererBatch>,
    /// Replies and events from it.
    pub from_renderer: IpcReceiver<RendererEvent>,
    /// The frontend's end of the new descriptor lane, on the broker's lane under this
    /// ticket (one fd).
    pub lane: crate::lane::FdTicket,
}

/// The bootstrap of the renderer-worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct RendererBootstrap {
    /// Device configuration.
    pub config: DeviceConfig,
    /// Requests from the frontend.
    pub requests: IpcReceiver<RendererBatch>,
    /// Replies and events to the frontend.
    pub events: IpcSender<RendererEvent>,
    /// Status reports to the broker.
    pub to_broker: IpcSender<ChildStatus>,
    /// Inherited fd number of the descriptor lane to the frontend.
    pub lane_fd: i32,
    /// Inherited fd number of the doorbell (write side).
    pub doorbell_fd: i32,
}

/// What the broker answers a [`ChildHello`] with.
#[derive(Debug, Serialize, Deserialize)]
pub enum ChildBootstrap {
    /// For [`Role::Frontend`].
    Frontend(FrontendBootstrap),
    /// For [`Role::Renderer`].
    Renderer(RendererBootstrap),
}
