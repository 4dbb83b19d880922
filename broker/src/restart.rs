//! A renderer-worker's start and wiring, shared by the device's start and by the restart
//! after a renderer died; and the restart itself, rate-limited (docs/renderer-restart.md).
//!
//! Everything here after start-up runs under the broker's own seccomp filter: it creates
//! socket pairs and sends descriptors, but the new process is created by the spawner.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use protocol::bootstrap::{
    ChildBootstrap, ChildStatus, RendererBootstrap, RendererLinkRenewal, Role, DOORBELL_FD, LANE_FD,
};
use protocol::config::DeviceConfig;
use protocol::ipc::{RendererBatch, RendererEvent};
use protocol::lane::Lane;

use crate::metrics::MetricsFile;
use crate::spawn::{self, ChildProcess};
use crate::spawner::{Spawner, StartedRenderer};

/// How long a child may take from bootstrap to ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The window over which `--max-renderer-restarts` counts.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// A child's status reports.
pub type StatusRx = IpcReceiver<ChildStatus>;

/// The ends of a renderer-worker's channels that are not the renderer's.
pub struct RendererEnds {
    /// Requests to it (the frontend's).
    pub to_renderer: IpcSender<RendererBatch>,
    /// Its replies and events (the frontend's).
    pub from_renderer: IpcReceiver<RendererEvent>,
    /// Its status reports (the broker's).
    pub status: StatusRx,
}

/// Starts a renderer-worker through the spawner with a fresh descriptor lane and the
/// device's doorbell; returns it and the frontend's end of its lane.
pub fn start_renderer(
    spawner: &Spawner,
    doorbell: &OwnedFd,
) -> Result<(StartedRenderer, OwnedFd), String> {
    let (frontend_end, renderer_end) =
        Lane::pair().map_err(|e| format!("creating the descriptor lane: {e}"))?;
    let started = spawner.renderer(&renderer_end, doorbell)?;
    Ok((started, frontend_end))
}

/// Sends a started renderer its bootstrap.
pub fn wire_renderer(
    config: DeviceConfig,
    bootstrap: &IpcSender<ChildBootstrap>,
) -> Result<RendererEnds, String> {
    let e = |e: std::io::Error| format!("creating channels: {e}");
    let (to_renderer, requests) = ipc::channel().map_err(e)?;
    let (events, from_renderer) = ipc::channel().map_err(e)?;
    let (to_broker, status) = ipc::channel().map_err(e)?;
    bootstrap
        .send(ChildBootstrap::Renderer(RendererBootstrap {
            config,
            requests,
            events,
            to_broker,
            lane_fd: LANE_FD,
            doorbell_fd: DOORBELL_FD,
        }))
        .map_err(|e| format!("sending the renderer-worker its bootstrap: {e}"))?;
    Ok(RendererEnds {
        to_renderer,
        from_renderer,
        status,
    })
}

/// Waits (bounded) for a child's `Ready`.
pub fn wait_ready(status: &StatusRx, role: Role) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut next = status.try_recv_timeout(READY_TIMEOUT);
    // The frontend's metrics timer is armed before its jail, so on a slow host a first
    // snapshot may overtake `Ready`; it is only counters, and the next one comes soon.
    while let Ok(ChildStatus::Metrics(_)) = next {
        next = status.try_recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
    match next {
        Ok(ChildStatus::Ready) => Ok(()),
        Ok(other) => Err(format!(
            "the {} reported {other:?} before being ready",
            role.name()
        )),
        Err(ipc_channel::TryRecvError::Empty) => Err(format!(
            "the {} was not ready within {READY_TIMEOUT:?}",
            role.name()
        )),
        Err(ipc_channel::TryRecvError::IpcError(e)) => Err(format!(
            "the {} failed during start-up ({e:?}); see its log above",
            role.name()
        )),
    }
}

/// Logs a child's later status reports (at debug level); with `metrics`, writes the
/// frontend's metrics snapshots to the metrics file. Writing here, on the thread that
/// receives them, keeps the supervisor loop free of file I/O and needs no hand-over.
pub fn spawn_status_logger(rx: StatusRx, role: Role, metrics: Option<Arc<MetricsFile>>) {
    let _ = std::thread::Builder::new()
        .name(format!("status-{}", role.name()))
        .spawn(move || {
            while let Ok(s) = rx.recv() {
                match (s, &metrics) {
                    (ChildStatus::Metrics(snapshot), Some(file)) => file.update(*snapshot),
                    (ChildStatus::Metrics(_), None) => {}
                    (s, _) => log::debug!("{} reports {s:?}", role.name()),
                }
            }
        });
}

/// What the broker keeps to replace a dead renderer-worker.
pub struct Restarter {
    spawner: Spawner,
    /// The device's doorbell: every renderer shares it, so the frontend's event loop
    /// keeps watching the same descriptor; the broker rings it when a new link is ready.
    doorbell: OwnedFd,
    /// The broker's end of its descriptor lane to the frontend.
    to_frontend: Lane,
    renewals: IpcSender<RendererLinkRenewal>,
    config: DeviceConfig,
    /// Restarts allowed within [`RESTART_WINDOW`].
    limit: u32,
    recent: VecDeque<Instant>,
    /// Successful restarts so far, for the metrics.
    restarts: Arc<AtomicU64>,
}

impl Restarter {
    /// Everything a restart needs, taken at start-up.
    pub fn new(
        spawner: Spawner,
        doorbell: OwnedFd,
        to_frontend: Lane,
        renewals: IpcSender<RendererLinkRenewal>,
        config: DeviceConfig,
        limit: u32,
        restarts: Arc<AtomicU64>,
    ) -> Self {
        Restarter {
            spawner,
            doorbell,
            to_frontend,
            renewals,
            config,
            limit,
            recent: VecDeque::new(),
            restarts,
        }
    }

    /// Starts a replacement renderer-worker and hands the frontend its link; returns the
    /// new process and how many restarts the window now holds. An Err says why there is
    /// none (the limit, or a failure).
    pub fn restart(&mut self) -> Result<(ChildProcess, usize), String> {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RESTART_WINDOW)
        {
            self.recent.pop_front();
        }
        if self.limit == 0 {
            return Err("restarts are off (--max-renderer-restarts 0)".into());
        }
        if self.recent.len() >= self.limit as usize {
            return Err(format!(
                "it was restarted {} time(s) within the last {}s already \
                 (--max-renderer-restarts {})",
                self.recent.len(),
                RESTART_WINDOW.as_secs(),
                self.limit
            ));
        }
        self.recent.push_back(now);
        let (started, frontend_end) = start_renderer(&self.spawner, &self.doorbell)?;
        let StartedRenderer {
            mut child,
            hello,
            namespaces,
        } = started;
        match self.link(&hello.bootstrap, &frontend_end) {
            Ok(()) => {
                self.restarts.fetch_add(1, Ordering::Relaxed);
                log::info!("started renderer-worker (pid {}): {namespaces}", child.id());
                Ok((child, self.recent.len()))
            }
            Err(e) => {
                spawn::kill_and_reap(&mut child);
                Err(e)
            }
        }
    }

    /// Wires a new renderer, waits for it to be ready, and gives the frontend its link.
    fn link(
        &self,
        bootstrap: &IpcSender<ChildBootstrap>,
        frontend_end: &OwnedFd,
    ) -> Result<(), String> {
        let ends = wire_renderer(self.config.clone(), bootstrap)?;
        wait_ready(&ends.status, Role::Renderer)?;
        let lane = self
            .to_frontend
            .send(&[frontend_end.as_fd()])
            .map_err(|e| format!("handing the frontend the new lane: {e}"))?;
        self.renewals
            .send(RendererLinkRenewal {
                to_renderer: ends.to_renderer,
                from_renderer: ends.from_renderer,
                lane,
            })
            .map_err(|e| format!("handing the frontend the new link: {e}"))?;
        // The frontend's event loop watches the doorbell; this ring makes it look for
        // the renewal.
        nix::unistd::write(&self.doorbell, &1u64.to_ne_bytes())
            .map_err(|e| format!("ringing the frontend: {e}"))?;
        spawn_status_logger(ends.status, Role::Renderer, None);
        Ok(())
    }
}
