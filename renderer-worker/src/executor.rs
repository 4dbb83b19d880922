//! The executor actor: the single owner of the renderer, handling the frontend's requests
//! strictly in order.
//!
//! For each request it executes the operation, sends the `Reply`, and only then creates
//! the request's fence, so the frontend always sees a request's reply before its
//! `FenceSignaled` (for 2D the fence completes inside `create_fence`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ipc_channel::ipc::IpcReceiver;
use ipc_channel::IpcError;
use protocol::config::{DeviceConfig, Limits};
use protocol::ipc::{
    FenceInfo, RenderError, RendererBatch, RendererEvent, RendererOp, RendererRequest, ReplyBody,
};
use protocol::lane::{FdTicket, Lane};
use protocol::virtio_gpu::{
    VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_BLOB_MEM_HOST3D, VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST,
};

use crate::backend::{BlobCreate, Renderer};
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

/// How often pending fences of asynchronous work (virgl) are polled while no request
/// arrives.
const FENCE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(1);
/// Most batches that arrive while one is handled and join its wake-up of the frontend.
const MAX_COALESCED_BATCHES: usize = 16;

/// Where a blob is in the renderer's half of the mapping state machine (the frontend owns
/// the whole machine; this only makes sure each step comes once and in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlobMapState {
    /// Not exported (never mapped, or its last unmap was finalized).
    Idle,
    /// `Map` answered: the VMM holds (or is about to hold) an fd of it.
    Exported,
    /// `Unmap` answered; waiting for `Finalize`.
    Unmapped,
}

/// The renderer's request executor.
pub struct Executor<R: Renderer> {
    renderer: R,
    lane: Lane,
    events: EventSink,
    limits: Limits,
    ledger: ResourceLedger,
    memory: Option<Arc<GuestMemory>>,
    scanouts: Scanouts,
    /// Every live blob's mapping state.
    blobs: BTreeMap<u32, BlobMapState>,
    /// Live contexts, counted against `limits.max_contexts` whatever the frontend checked.
    contexts: BTreeSet<u32>,
}

impl<R: Renderer> std::fmt::Debug for Executor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("ledger", &self.ledger)
            .field("memory", &self.memory)
            .field("blobs", &self.blobs)
            .field("contexts", &self.contexts)
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
        RendererOp::SetScanoutBlobBuffer { .. } => "SetScanoutBlobBuffer",
        RendererOp::DisableScanout { .. } => "DisableScanout",
        RendererOp::FlushToScanout { .. } => "FlushToScanout",
        RendererOp::ReadCursor { .. } => "ReadCursor",
        RendererOp::Reset => "Reset",
        RendererOp::CreateContext { .. } => "CreateContext",
        RendererOp::DestroyContext { .. } => "DestroyContext",
        RendererOp::AttachResource { .. } => "AttachResource",
        RendererOp::DetachResource { .. } => "DetachResource",
        RendererOp::Submit3d { .. } => "Submit3d",
        RendererOp::CreateResource3d { .. } => "CreateResource3d",
        RendererOp::TransferToHost3d { .. } => "TransferToHost3d",
        RendererOp::TransferFromHost3d { .. } => "TransferFromHost3d",
        RendererOp::CreateBlob { .. } => "CreateBlob",
        RendererOp::Map { .. } => "Map",
        RendererOp::Unmap { .. } => "Unmap",
        RendererOp::Finalize { .. } => "Finalize",
        RendererOp::GetCapsetInfo { .. } => "GetCapsetInfo",
        RendererOp::GetCapset { .. } => "GetCapset",
        #[cfg(feature = "test-hooks")]
        RendererOp::TestForbiddenSyscall { .. } => "TestForbiddenSyscall",
    }
}

/// Test only (feature `test-hooks`): really makes `which`, a call that no renderer filter
/// allows. Under the filter it does not come back (kill: the kernel kills the process with
/// SIGSYS; trap: the handler names the call and exits 159). If it does come back the
/// filter let it through (`--seccomp log`, or no filter): that is the error returned.
/// An allowed `execve` replaces the renderer with `/bin/true`.
#[cfg(feature = "test-hooks")]
fn forbidden_syscall(which: protocol::ipc::ForbiddenSyscall) -> RenderError {
    use protocol::ipc::ForbiddenSyscall;
    use std::os::fd::FromRawFd;

    log::warn!("test hook: making the forbidden system call {which:?}");
    let (what, ret) = match which {
        ForbiddenSyscall::OpenFile => (
            "open(\"/etc/hostname\")",
            // SAFETY: a NUL-terminated path literal and plain flags; a descriptor it returns
            // is owned (and closed) below.
            unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) },
        ),
        ForbiddenSyscall::CreateSocket => (
            "socket(AF_INET, SOCK_STREAM)",
            // SAFETY: integer arguments only; a descriptor it returns is owned below.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) },
        ),
        ForbiddenSyscall::Exec => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            (
                "execve(\"/bin/true\")",
                // SAFETY: a NUL-terminated path and NULL-terminated argv and envp arrays that
                // outlive the call; if it succeeds this process image is gone, so no Rust
                // state is left to be misused.
                unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) },
            )
        }
    };
    let os_error = std::io::Error::last_os_error();
    if ret >= 0 && !matches!(which, ForbiddenSyscall::Exec) {
        // SAFETY: `ret` is the descriptor the call above just created; nothing else owns it.
        drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(ret) });
    }
    let outcome = if ret >= 0 {
        "succeeded".to_string()
    } else {
        format!("failed ({os_error})")
    };
    RenderError::Unspec(format!(
        "test hook: {what} came back ({outcome}): the seccomp filter let it through"
    ))
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
            blobs: BTreeMap::new(),
            contexts: BTreeSet::new(),
        }
    }

    /// The backend (for tests and diagnostics).
    pub fn renderer(&mut self) -> &mut R {
        &mut self.renderer
    }

    /// Handles requests until the frontend closes the channel (`Ok`), or the channel
    /// breaks (`Err`). A frontend that stops taking events also ends the loop with `Ok`:
    /// it is gone, and the broker decides what happens next.
    pub fn run(mut self, requests: &IpcReceiver<RendererBatch>) -> Result<(), RendererError> {
        loop {
            // While a fence is pending on asynchronous work, wait for the next request only
            // briefly and then look at the fences again.
            let next = if self.renderer.poll_fences() {
                match requests.try_recv_timeout(FENCE_POLL_INTERVAL) {
                    Ok(request) => Ok(request),
                    Err(ipc_channel::TryRecvError::Empty) => continue,
                    Err(ipc_channel::TryRecvError::IpcError(e)) => Err(e),
                }
            } else {
                requests.recv()
            };
            match next {
                Ok(batch) => {
                    if let Err(e) = self.handle_batches(batch, requests) {
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

    /// Executes a batch in order, waking the frontend once for all its replies.
    pub fn handle_batch(&mut self, batch: RendererBatch) -> Result<(), SinkClosed> {
        self.events.hold();
        let handled = self.handle_all(batch);
        let released = self.events.release();
        handled.and(released)
    }

    /// [`Executor::handle_batch`], then every batch that arrived meanwhile, under the same
    /// wake-up of the frontend: a guest's TRANSFER and FLUSH often come in two kicks a few
    /// microseconds apart, and their replies then cost the frontend one wake-up, not two.
    fn handle_batches(
        &mut self,
        first: RendererBatch,
        requests: &IpcReceiver<RendererBatch>,
    ) -> Result<(), SinkClosed> {
        self.events.hold();
        let mut handled = self.handle_all(first);
        // Bounded, so that a frontend that never pauses still hears the bell.
        for _ in 0..MAX_COALESCED_BATCHES {
            if handled.is_err() {
                break;
            }
            // An error here (the channel closed) is the next blocking receive's to report.
            let Ok(more) = requests.try_recv() else { break };
            handled = self.handle_all(more);
        }
        let released = self.events.release();
        handled.and(released)
    }

    fn handle_all(&mut self, batch: RendererBatch) -> Result<(), SinkClosed> {
        batch
            .into_iter()
            .try_for_each(|request| self.handle(request))
    }

    /// Executes one request, sends its reply, then creates its fence.
    pub fn handle(&mut self, request: RendererRequest) -> Result<(), SinkClosed> {
        let RendererRequest {
            seq,
            op,
            fence,
            quiet,
        } = request;
        let name = describe(&op);
        log::debug!("request {seq}: {name}, fence {fence:?}");
        let result = self.execute(op);
        if let Err(e) = &result {
            // A guest can cause any number of these; the frontend logs each refusal under
            // its rate limit for guest-caused lines (guest_warn!), so not at warn here.
            log::debug!("request {seq} ({name}) rejected: {e}");
        } else if quiet && fence.is_none() {
            return Ok(());
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

    /// The one descriptor (a sealed scanout buffer) under `ticket`.
    fn take_scanout_fd(&self, ticket: FdTicket) -> Result<OwnedFd, RenderError> {
        let mut fds = self.take_fds(ticket)?;
        match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => Ok(fd),
            (fd, _) => Err(RenderError::InvalidParameter(format!(
                "{} fds for a scanout buffer",
                fds.len() + usize::from(fd.is_some())
            ))),
        }
    }

    /// Checks that blob `resource_id` is in state `expected` for `op`.
    fn expect_blob(
        &self,
        resource_id: u32,
        op: &str,
        expected: BlobMapState,
    ) -> Result<(), RenderError> {
        let state = match self.blobs.get(&resource_id) {
            Some(state) => *state,
            None => {
                if self.ledger.get(resource_id).is_ok() {
                    return Err(RenderError::InvalidParameter(format!(
                        "{op}: resource {resource_id} is not a blob"
                    )));
                }
                return Err(RenderError::InvalidResource(resource_id));
            }
        };
        if state != expected {
            log::warn!("{op} of blob {resource_id} in state {state:?} (needs {expected:?})");
            return Err(RenderError::InvalidResource(resource_id));
        }
        Ok(())
    }

    fn create_blob(
        &mut self,
        resource_id: u32,
        create: BlobCreate,
        entries: Vec<protocol::ipc::BackingEntry>,
    ) -> Result<(), RenderError> {
        let host_bytes = match create.blob_mem {
            // Guest memory: no host allocation, only the count limit applies.
            VIRTIO_GPU_BLOB_MEM_GUEST => 0,
            VIRTIO_GPU_BLOB_MEM_HOST3D | VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST => create.size,
            other => {
                return Err(RenderError::InvalidParameter(format!("blob_mem {other}")));
            }
        };
        let info = self.ledger.admit_blob(resource_id, host_bytes)?;
        let backing = if entries.is_empty() && create.blob_mem != VIRTIO_GPU_BLOB_MEM_GUEST {
            None
        } else {
            let memory = self
                .memory
                .as_ref()
                .ok_or_else(|| RenderError::InvalidParameter("no guest memory table".into()))?;
            Some(memory.translate(
                &entries,
                self.limits.max_backing_entries as usize,
                create.size,
            )?)
        };
        self.renderer.create_blob(resource_id, create, backing)?;
        self.ledger.insert(resource_id, info);
        self.blobs.insert(resource_id, BlobMapState::Idle);
        Ok(())
    }

    fn map_blob(&mut self, resource_id: u32) -> Result<ReplyBody, RenderError> {
        self.expect_blob(resource_id, "Map", BlobMapState::Idle)?;
        // An export is a mapping until its Finalize: bounded here too, not only in the
        // frontend (which counts from MAP_BLOB to FinalizeAck, so it always counts more).
        let live = self
            .blobs
            .values()
            .filter(|s| **s != BlobMapState::Idle)
            .count();
        let max = self.limits.max_mappings;
        if u32::try_from(live).map_or(true, |n| n >= max) {
            return Err(RenderError::OutOfMemory(format!(
                "{live} blobs exported for mapping, at most {max}"
            )));
        }
        let exported = self.renderer.export_blob(resource_id)?;
        let fds = self
            .lane
            .send(&[exported.fd.as_fd()])
            .map_err(|e| RenderError::Unspec(format!("descriptor lane: {e}")))?;
        // Our copy of the fd closes here; the frontend's is in flight on the lane.
        drop(exported.fd);
        self.blobs.insert(resource_id, BlobMapState::Exported);
        log::debug!(
            "blob {resource_id} exported: {} bytes, map_info {:#x}",
            exported.size,
            exported.map_info
        );
        Ok(ReplyBody::MapReady {
            resource_id,
            size: exported.size,
            map_info: exported.map_info,
            fds,
        })
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
                // The renderer has forgotten the resource even if it complained. A mapped
                // blob may go too: the VMM's fd keeps its memory alive until it unmaps.
                self.ledger.remove(resource_id);
                self.blobs.remove(&resource_id);
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
                let fd = self.take_scanout_fd(fds)?;
                if self.ledger.get(resource_id)?.blob {
                    return Err(RenderError::InvalidParameter(format!(
                        "resource {resource_id} is a blob: no 2D scanout of it"
                    )));
                }
                self.scanouts
                    .bind(&self.ledger, scanout_id, resource_id, size, stride, fd)?;
                log::info!("scanout {scanout_id} shows resource {resource_id}");
            }
            RendererOp::SetScanoutBlobBuffer {
                scanout_id,
                resource_id,
                layout,
                size,
                fds,
            } => {
                // Take the fd first, whatever else is wrong, so the lane stays in step.
                let fd = self.take_scanout_fd(fds)?;
                let max = self.limits.max_dimension;
                if layout.width > max || layout.height > max {
                    return Err(RenderError::InvalidParameter(format!(
                        "blob framebuffer {}x{} (at most {max} per side)",
                        layout.width, layout.height
                    )));
                }
                self.scanouts
                    .bind_blob(&self.ledger, scanout_id, resource_id, layout, size, fd)?;
                log::info!(
                    "scanout {scanout_id} shows blob {resource_id} ({}x{}, stride {}, offset {})",
                    layout.width,
                    layout.height,
                    layout.stride,
                    layout.offset
                );
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
            RendererOp::CreateContext {
                ctx_id,
                context_init,
                name,
            } => {
                let max = self.limits.max_contexts;
                let full = u32::try_from(self.contexts.len()).map_or(true, |n| n >= max);
                if full && !self.contexts.contains(&ctx_id) {
                    return Err(RenderError::OutOfMemory(format!(
                        "{} contexts already, at most {max}",
                        self.contexts.len()
                    )));
                }
                let name = String::from_utf8_lossy(&name);
                self.renderer.create_context(ctx_id, context_init, &name)?;
                self.contexts.insert(ctx_id);
            }
            RendererOp::DestroyContext { ctx_id } => {
                // The backend has let the context go even if it complained.
                self.contexts.remove(&ctx_id);
                self.renderer.destroy_context(ctx_id)?;
            }
            RendererOp::AttachResource {
                ctx_id,
                resource_id,
            } => {
                self.ledger.get(resource_id)?;
                self.renderer.context_attach_resource(ctx_id, resource_id)?;
            }
            RendererOp::DetachResource {
                ctx_id,
                resource_id,
            } => {
                self.ledger.get(resource_id)?;
                self.renderer.context_detach_resource(ctx_id, resource_id)?;
            }
            RendererOp::Submit3d {
                ctx_id,
                ring_idx,
                mut commands,
            } => {
                let max = self.limits.max_submit_bytes;
                if u32::try_from(commands.len()).map_or(true, |n| n > max) {
                    return Err(RenderError::OutOfMemory(format!(
                        "SUBMIT_3D of {} bytes, at most {max}",
                        commands.len()
                    )));
                }
                self.renderer.submit_3d(ctx_id, ring_idx, &mut commands)?;
            }
            RendererOp::CreateResource3d { resource_id, args } => {
                let info = self.ledger.admit_3d(resource_id, &args)?;
                self.renderer.create_resource_3d(resource_id, args)?;
                self.ledger.insert(resource_id, info);
            }
            RendererOp::TransferToHost3d {
                resource_id,
                transfer,
            } => {
                self.ledger.get(resource_id)?;
                self.renderer.transfer_to_host_3d(resource_id, transfer)?;
            }
            RendererOp::TransferFromHost3d {
                resource_id,
                transfer,
            } => {
                self.ledger.get(resource_id)?;
                self.renderer.transfer_from_host_3d(resource_id, transfer)?;
            }
            RendererOp::CreateBlob {
                ctx_id,
                resource_id,
                blob_mem,
                blob_flags,
                blob_id,
                size,
                entries,
            } => {
                let create = BlobCreate {
                    ctx_id,
                    blob_mem,
                    blob_flags,
                    blob_id,
                    size,
                };
                self.create_blob(resource_id, create, entries)?;
            }
            RendererOp::Map { resource_id } => return self.map_blob(resource_id),
            RendererOp::Unmap { resource_id } => {
                self.expect_blob(resource_id, "Unmap", BlobMapState::Exported)?;
                self.renderer.unmap_blob(resource_id)?;
                self.blobs.insert(resource_id, BlobMapState::Unmapped);
                return Ok(ReplyBody::UnmapAck { resource_id });
            }
            RendererOp::Finalize { resource_id } => {
                self.expect_blob(resource_id, "Finalize", BlobMapState::Unmapped)?;
                self.renderer.finalize_blob(resource_id)?;
                self.blobs.insert(resource_id, BlobMapState::Idle);
                return Ok(ReplyBody::FinalizeAck { resource_id });
            }
            RendererOp::GetCapsetInfo { index } => {
                let info = self.renderer.capset_info(index)?;
                return Ok(ReplyBody::CapsetInfo {
                    capset_id: info.capset_id,
                    max_version: info.max_version,
                    max_size: info.max_size,
                });
            }
            RendererOp::GetCapset { capset_id, version } => {
                return Ok(ReplyBody::Capset(self.renderer.capset(capset_id, version)?));
            }
            #[cfg(feature = "test-hooks")]
            RendererOp::TestForbiddenSyscall { which } => return Err(forbidden_syscall(which)),
            RendererOp::Reset => {
                // Scanouts first: nothing may read a resource while it goes away.
                self.scanouts.clear();
                let result = self.renderer.reset();
                self.ledger.clear();
                self.blobs.clear();
                self.contexts.clear();
                self.memory = None;
                log::info!("device reset");
                result?;
            }
        }
        Ok(ReplyBody::Done)
    }
}
