//! The executor actor: the single owner of the renderer, handling the frontend's requests
//! strictly in order.
//!
//! For each request it executes the operation, sends the `Reply`, and only then creates
//! the request's fence, so the frontend always sees a request's reply before its
//! `FenceSignaled` (for 2D the fence completes inside `create_fence`).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use ipc_channel::ipc::IpcReceiver;
use ipc_channel::IpcError;
use protocol::config::{DeviceConfig, Limits};
use protocol::ipc::{
    FenceInfo, RenderError, RendererEvent, RendererOp, RendererRequest, ReplyBody,
};
use protocol::lane::{FdTicket, Lane};

use crate::backend::Renderer;
use crate::cursor::read_cursor;
use crate::error::RendererError;
use crate::events::{EventSink, SinkClosed};
use crate::geometry::check_rect_inside;
use crate::guest_memory::GuestMemory;
use crate::resources::ResourceLedger;
use crate::scanout::Scanouts;

/// Slack allowed on top of twice a resource's size when attaching backing: guests may
/// round their allocations up, but nothing legitimate needs more.
const BACKING_SLACK: u64 = 1 << 20;

/// The renderer's request executor.
pub struct Executor<R: Renderer> {
    renderer: R,
    lane: Lane,
    events: EventSink,
    limits: Limits,
    ledger: ResourceLedger,
    memory: Option<Arc<GuestMemory>>,
    scanouts: Scanouts,
}

impl<R: Renderer> std::fmt::Debug for Executor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("ledger", &self.ledger)
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

fn describe(op: &RendererOp) -> &'static str {
    match op {
        RendererOp::SetGuestMemory { .. } => "SetGuestMemory",
        RendererOp::CreateResource2d { .. } => "CreateResource2d",
        RendererOp::Unref { .. } => "Unref",
        RendererOp::AttachBacking { .. } => "AttachBacking",
        RendererOp::DetachBacking { .. } => "DetachBacking",
        RendererOp::TransferToHost2d { .. } => "TransferToHost2d",
        RendererOp::SetScanoutBuffer { .. } => "SetScanoutBuffer",
        RendererOp::DisableScanout { .. } => "DisableScanout",
        RendererOp::FlushToScanout { .. } => "FlushToScanout",
        RendererOp::ReadCursor { .. } => "ReadCursor",
        RendererOp::Reset => "Reset",
    }
}

impl<R: Renderer> Executor<R> {
    /// An executor for `renderer`, whose fence callback must already report to `events`
    /// (see [`EventSink::fence_callback`]). Fds named by requests are taken from `lane`.
    pub fn new(renderer: R, lane: Lane, events: EventSink, config: &DeviceConfig) -> Self {
        Executor {
            renderer,
            lane,
            events,
            limits: config.limits,
            ledger: ResourceLedger::new(config.limits),
            memory: None,
            scanouts: Scanouts::new(config.outputs.len()),
        }
    }

    /// Handles requests until the frontend closes the channel (`Ok`), or the channel
    /// breaks (`Err`). A frontend that stops taking events also ends the loop with `Ok`:
    /// it is gone, and the broker decides what happens next.
    pub fn run(mut self, requests: &IpcReceiver<RendererRequest>) -> Result<(), RendererError> {
        loop {
            match requests.recv() {
                Ok(request) => {
                    if let Err(e) = self.handle(request) {
                        log::info!("frontend stopped listening ({e}); renderer stops");
                        return Ok(());
                    }
                }
                Err(IpcError::Disconnected) => {
                    log::info!("frontend closed the request channel; renderer stops");
                    return Ok(());
                }
                Err(e) => return Err(RendererError::Requests(e)),
            }
        }
    }

    /// Executes one request, sends its reply, then creates its fence.
    pub fn handle(&mut self, request: RendererRequest) -> Result<(), SinkClosed> {
        let RendererRequest { seq, op, fence } = request;
        let name = describe(&op);
        log::debug!("request {seq}: {name}, fence {fence:?}");
        let result = self.execute(op);
        if let Err(e) = &result {
            log::warn!("request {seq} ({name}) rejected: {e}");
        }
        self.events.send(RendererEvent::Reply { seq, result })?;
        if let Some(fence) = fence {
            self.fence(fence)?;
        }
        Ok(())
    }

    fn fence(&mut self, fence: FenceInfo) -> Result<(), SinkClosed> {
        if let Err(e) = self.renderer.create_fence(fence) {
            // The request's work has been executed (or refused) synchronously already;
            // signalling here keeps the guest from waiting forever on a fence that the
            // renderer could not track.
            log::error!(
                "fence {} could not be created ({e}); signalling it now",
                fence.fence_id
            );
            self.events.send(RendererEvent::FenceSignaled(fence))?;
        }
        Ok(())
    }

    fn take_fds(&self, ticket: FdTicket) -> Result<Vec<OwnedFd>, RenderError> {
        self.lane
            .recv(ticket)
            .map_err(|e| RenderError::Unspec(format!("descriptor lane: {e}")))
    }

    /// Executes one operation.
    pub fn execute(&mut self, op: RendererOp) -> Result<ReplyBody, RenderError> {
        match op {
            RendererOp::SetGuestMemory { regions, fds } => {
                let fds = self.take_fds(fds)?;
                // Whatever happens, the previous table is stale now; resources attached
                // with it keep their own generation alive.
                self.memory = None;
                let memory = GuestMemory::new(&regions, fds)?;
                log::info!("guest memory table with {} regions", memory.region_count());
                self.memory = Some(Arc::new(memory));
            }
            RendererOp::CreateResource2d {
                resource_id,
                format,
                width,
                height,
            } => {
                let info = self.ledger.admit(resource_id, width, height)?;
                self.renderer
                    .create_resource_2d(resource_id, format, width, height)?;
                self.ledger.insert(resource_id, info);
            }
            RendererOp::Unref { resource_id } => {
                self.ledger.get(resource_id)?;
                let result = self.renderer.unref(resource_id);
                // The renderer has forgotten the resource even if it complained.
                self.ledger.remove(resource_id);
                result?;
            }
            RendererOp::AttachBacking {
                resource_id,
                entries,
            } => {
                let info = self.ledger.get(resource_id)?;
                let memory = self
                    .memory
                    .as_ref()
                    .ok_or_else(|| RenderError::InvalidParameter("no guest memory table".into()))?;
                let max_len = info.bytes.saturating_mul(2).saturating_add(BACKING_SLACK);
                let backing = memory.translate(
                    &entries,
                    self.limits.max_backing_entries as usize,
                    max_len,
                )?;
                self.renderer.attach_backing(resource_id, backing)?;
            }
            RendererOp::DetachBacking { resource_id } => {
                self.ledger.get(resource_id)?;
                self.renderer.detach_backing(resource_id)?;
            }
            RendererOp::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } => {
                let info = self.ledger.get(resource_id)?;
                check_rect_inside(&rect, info.width, info.height)?;
                self.renderer
                    .transfer_to_host_2d(resource_id, rect, offset)?;
            }
            RendererOp::SetScanoutBuffer {
                scanout_id,
                resource_id,
                size,
                stride,
                fds,
            } => {
                // Take the fd first, whatever else is wrong, so the lane stays in step.
                let mut fds = self.take_fds(fds)?;
                if fds.len() != 1 {
                    return Err(RenderError::InvalidParameter(format!(
                        "{} fds for a scanout buffer",
                        fds.len()
                    )));
                }
                let fd = fds.remove(0);
                self.scanouts
                    .bind(&self.ledger, scanout_id, resource_id, size, stride, fd)?;
                log::info!("scanout {scanout_id} shows resource {resource_id}");
            }
            RendererOp::DisableScanout { scanout_id } => {
                self.scanouts.disable(scanout_id)?;
                log::info!("scanout {scanout_id} disabled");
            }
            RendererOp::FlushToScanout { scanout_id, rect } => {
                self.scanouts
                    .flush(&mut self.renderer, &self.ledger, scanout_id, rect)?;
            }
            RendererOp::ReadCursor { resource_id } => {
                let info = self.ledger.get(resource_id)?;
                let image = read_cursor(&mut self.renderer, resource_id, info)?;
                return Ok(ReplyBody::CursorImage(image));
            }
            RendererOp::Reset => {
                // Scanouts first: nothing may read a resource while it goes away.
                self.scanouts.clear();
                let result = self.renderer.reset();
                self.ledger.clear();
                self.memory = None;
                log::info!("device reset");
                result?;
            }
        }
        Ok(ReplyBody::Done)
    }
}
