//! Blob resources, contexts and the host-visible window, on the control actor: the
//! commands of VIRTIO_GPU_F_RESOURCE_BLOB / F_CONTEXT_INIT checked and carried out, and
//! the actions of each blob's mapping state machine (`blob_map::step`) executed.
//!
//! A command that waits on a blob's state machine (MAP_BLOB for its answer; UNMAP_BLOB,
//! UNREF of a mapped blob for the unmap) stays in the control queue's FIFO, suspended,
//! and the control queue takes nothing new until it is released: a command queued behind
//! a suspended unmap runs only after the unmap completed, as in QEMU.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use protocol::ipc::{BackingEntry, BlobScanout, RendererOp, ReplyBody};
use protocol::virtio_gpu::{
    BlobMem, Command, CtrlHeader, ErrorCode, Format, Rect, Response,
    VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, VIRTIO_GPU_CAPSET_VIRGL, VIRTIO_GPU_CAPSET_VIRGL2,
    VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK, VIRTIO_GPU_FLAG_INFO_RING_IDX,
};

use crate::blob_map::{self, Action, Event, Export, MapError, MapState};
use crate::control::{After, Control, CONTROL_QUEUE};
use crate::error::FrontendError;
use crate::execute::Outcome;
use crate::vmm_requests::{VmmAck, VmmRequest, VmmRequests};

/// Window offsets and lengths are in whole pages.
const PAGE: u64 = 4096;

/// What a suspended command waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The answer to its MAP_BLOB of this blob.
    Map(u32),
    /// The completion of this blob's unmap.
    Unmap(u32),
}

/// Plane 0 of a SET_SCANOUT_BLOB framebuffer, as the guest described it.
#[derive(Clone, Copy, Debug)]
struct BlobFb {
    width: u32,
    height: u32,
    format: Format,
    stride: u32,
    offset: u32,
}

/// Per-blob bookkeeping.
#[derive(Debug)]
struct Slot {
    blob_mem: BlobMem,
    flags: u32,
    /// The guest's blob id (what a restarted renderer is asked to create again).
    blob_id: u64,
    size: u64,
    state: MapState,
    /// The renderer's export, held until the VMM has been asked to map it.
    export: Option<OwnedFd>,
    /// UNREF commands (queue, entry) waiting for the unmap before they unref.
    unref_after_unmap: Vec<(usize, u64)>,
    /// It lived in a renderer-worker that died and was not made again in the new one:
    /// its unref concerns the frontend alone.
    lost: bool,
}

/// What the frontend knows of a context's command stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContextKind {
    /// A virgl (VIRGL or VIRGL2 capset) context: SUBMIT_3D streams are virgl commands
    /// whose framing is checked here ([`protocol::virgl`]).
    Virgl,
    /// Any other protocol (cross-domain, ...): the stream is the renderer's to parse.
    Opaque,
}

/// Blob, context and window state of the device.
#[derive(Debug, Default)]
pub(crate) struct Blobs {
    slots: HashMap<u32, Slot>,
    contexts: HashMap<u32, ContextKind>,
    vmm: Option<VmmRequests>,
    /// A device reset waits for in-flight unmaps; the control queue waits for the reset.
    reset_pending: bool,
}

impl Control {
    /// The VMM's backend request channel is up: blob maps can be requested.
    pub(crate) fn set_vmm_channel(&mut self, vmm: VmmRequests) -> Result<(), FrontendError> {
        // A second channel on one connection replaces the first, which owes nothing more.
        self.drop_vmm_channel()?;
        log::info!("backend request channel ready: blobs can be mapped");
        self.blobs.vmm = Some(vmm);
        Ok(())
    }

    /// Lets go of the VMM's backend request channel (the VMM has gone): what it still
    /// owed is answered as failed.
    pub(crate) fn drop_vmm_channel(&mut self) -> Result<(), FrontendError> {
        if let Some(vmm) = self.blobs.vmm.as_mut() {
            vmm.close();
        }
        self.take_vmm_answers()?;
        self.blobs.vmm = None;
        Ok(())
    }

    /// The VMM's channel is readable (or hung up): takes its replies in. Returns how many
    /// acknowledgments reached the state machine.
    pub fn vmm_readable(&mut self) -> Result<usize, FrontendError> {
        match self.blobs.vmm.as_mut() {
            Some(vmm) => vmm.read_replies(),
            None => return Ok(0),
        }
        self.take_vmm_answers()
    }

    /// Hands every acknowledgment read from the VMM to the state machine; those may send
    /// new requests, whose sending reads any reply already back, hence the loop.
    pub(crate) fn take_vmm_answers(&mut self) -> Result<usize, FrontendError> {
        let mut taken = 0;
        loop {
            let answered = match self.blobs.vmm.as_mut() {
                Some(vmm) => vmm.take_answered(),
                None => return Ok(taken),
            };
            if answered.is_empty() {
                return Ok(taken);
            }
            taken += answered.len();
            for (resource_id, ack) in answered {
                self.on_vmm_ack(resource_id, ack)?;
            }
        }
    }

    /// Live blobs, and those holding a range of the host-visible window (for the
    /// metrics).
    pub(crate) fn blob_counts(&self) -> (usize, usize) {
        let slots = &self.blobs.slots;
        let mapped = slots.values().filter(|s| s.state.range().is_some()).count();
        (slots.len(), mapped)
    }

    /// Whether the control queue must take nothing new (a command is suspended on a blob,
    /// or a reset waits for unmaps).
    pub(crate) fn control_blocked(&self) -> bool {
        self.blobs.reset_pending
            || self.fifos[CONTROL_QUEUE as usize]
                .iter()
                .any(|e| e.waiting_on.is_some())
    }

    /// The blob, context and capset commands.
    pub(crate) fn blob_command(&mut self, hdr: &CtrlHeader, cmd: Command) -> Outcome {
        let ctx_id = hdr.ctx_id;
        match cmd {
            Command::CtxCreate { context_init, name } => {
                if !self.contexts_enabled() {
                    return Ok(Err(ErrorCode::Unspec));
                }
                if context_init != 0 && !self.blobs_enabled() {
                    // VIRTIO_GPU_F_CONTEXT_INIT comes with the hostmem window; without it
                    // the field must be 0 (QEMU answers the same).
                    crate::guest_warn!(
                        "CTX_CREATE {ctx_id}: context_init {context_init:#x} without \
                         VIRTIO_GPU_F_CONTEXT_INIT"
                    );
                    return Ok(Err(ErrorCode::InvalidParameter));
                }
                let capset = context_init & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK;
                // Capset 0 is the default context, which a virgl renderer makes a VIRGL
                // one (as QEMU does).
                let kind = if self.config.virgl
                    && matches!(
                        capset,
                        0 | VIRTIO_GPU_CAPSET_VIRGL | VIRTIO_GPU_CAPSET_VIRGL2
                    ) {
                    ContextKind::Virgl
                } else {
                    ContextKind::Opaque
                };
                if self.blobs.contexts.contains_key(&ctx_id) {
                    return Ok(Err(ErrorCode::InvalidContextId));
                }
                let max = self.config.limits.max_contexts;
                if u32::try_from(self.blobs.contexts.len()).map_or(true, |n| n >= max) {
                    crate::guest_warn!("CTX_CREATE {ctx_id}: {max} contexts exist already");
                    return Ok(Err(ErrorCode::OutOfMemory));
                }
                self.blobs.contexts.insert(ctx_id, kind);
                let op = RendererOp::CreateContext {
                    ctx_id,
                    context_init,
                    name,
                };
                self.request(op, None, After::ContextCreated { ctx_id })?;
                Ok(Ok(None))
            }
            Command::CtxDestroy => {
                if self.blobs.contexts.remove(&ctx_id).is_none() {
                    return Ok(Err(ErrorCode::InvalidContextId));
                }
                self.request(RendererOp::DestroyContext { ctx_id }, None, After::Nothing)?;
                Ok(Ok(None))
            }
            Command::CtxAttachResource { resource_id }
            | Command::CtxDetachResource { resource_id }
                if !self.has_context(ctx_id) =>
            {
                let _ = resource_id;
                Ok(Err(ErrorCode::InvalidContextId))
            }
            Command::CtxAttachResource { resource_id } => {
                if let Err(code) = self.resources.get(resource_id) {
                    return Ok(Err(code));
                }
                let op = RendererOp::AttachResource {
                    ctx_id,
                    resource_id,
                };
                self.request(op, None, After::Nothing)?;
                Ok(Ok(None))
            }
            Command::CtxDetachResource { resource_id } => {
                if let Err(code) = self.resources.get(resource_id) {
                    return Ok(Err(code));
                }
                let op = RendererOp::DetachResource {
                    ctx_id,
                    resource_id,
                };
                self.request(op, None, After::Nothing)?;
                Ok(Ok(None))
            }
            Command::Submit3d { commands } => {
                let Some(&kind) = self.blobs.contexts.get(&ctx_id) else {
                    return Ok(Err(ErrorCode::InvalidContextId));
                };
                if kind == ContextKind::Virgl {
                    if let Err(e) = protocol::virgl::check(&commands) {
                        crate::guest_warn!("SUBMIT_3D to virgl context {ctx_id}: {e}");
                        return Ok(Err(ErrorCode::InvalidParameter));
                    }
                }
                let ring_idx = ring_of(hdr);
                let fence = self.fence_of(hdr);
                let op = RendererOp::Submit3d {
                    ctx_id,
                    ring_idx,
                    commands,
                };
                self.request(op, fence, After::Nothing)?;
                Ok(Ok(None))
            }
            Command::GetCapsetInfo { capset_index } => {
                if capset_index >= self.num_capsets() {
                    return Ok(Err(ErrorCode::InvalidParameter));
                }
                let op = RendererOp::GetCapsetInfo {
                    index: capset_index,
                };
                self.request(op, None, After::Respond)?;
                Ok(Ok(None))
            }
            Command::GetCapset {
                capset_id,
                capset_version,
            } => {
                if self.num_capsets() == 0 {
                    return Ok(Err(ErrorCode::InvalidParameter));
                }
                let op = RendererOp::GetCapset {
                    capset_id,
                    version: capset_version,
                };
                self.request(op, None, After::Respond)?;
                Ok(Ok(None))
            }
            Command::ResourceAssignUuid { resource_id } => {
                if let Err(code) = self.resources.get(resource_id) {
                    return Ok(Err(code));
                }
                Ok(Ok(Some(Response::OkResourceUuid(resource_uuid(
                    resource_id,
                )))))
            }
            Command::ResourceCreateBlob {
                resource_id,
                blob_mem,
                blob_flags,
                blob_id,
                size,
                entries,
            } => self.create_blob(
                ctx_id,
                resource_id,
                blob_mem,
                blob_flags,
                blob_id,
                size,
                entries,
            ),
            Command::ResourceMapBlob {
                resource_id,
                offset,
            } => self.map_blob(resource_id, offset),
            Command::ResourceUnmapBlob { resource_id } => {
                let Some(slot) = self.blobs.slots.get(&resource_id) else {
                    return Ok(Err(ErrorCode::InvalidResourceId));
                };
                if slot.state == MapState::Unmapped {
                    // As QEMU (no memory region: nothing to do, success). This is also
                    // what a second UNMAP_BLOB queued behind the first one meets: the
                    // queue held it until the first unmap completed.
                    return Ok(Ok(Some(Response::OkNodata)));
                }
                self.drive(resource_id, Event::UnmapRequested)?;
                Ok(Ok(None))
            }
            Command::SetScanoutBlob {
                scanout_id,
                resource_id,
                rect,
                width,
                height,
                format,
                strides,
                offsets,
            } => {
                let fence = self.fence_of(hdr);
                let fb = BlobFb {
                    width,
                    height,
                    format,
                    stride: strides[0],
                    offset: offsets[0],
                };
                self.set_scanout_blob(scanout_id, resource_id, rect, fb, fence)
            }
            other => {
                log::error!("blob_command called with {:?}", other.cmd_type());
                Ok(Err(ErrorCode::Unspec))
            }
        }
    }

    fn blobs_enabled(&self) -> bool {
        self.config.hostmem.is_some()
    }

    /// Contexts exist with blobs (VIRTIO_GPU_F_CONTEXT_INIT) and with virgl (its 3D
    /// contexts need no hostmem window).
    fn contexts_enabled(&self) -> bool {
        self.blobs_enabled() || self.config.virgl
    }

    /// The capability sets the device announces in its config space (and serves): the
    /// renderer's, when contexts are on; none otherwise.
    pub(crate) fn num_capsets(&self) -> u32 {
        num_capsets(&self.config)
    }

    /// Whether context `ctx_id` exists.
    pub(crate) fn has_context(&self, ctx_id: u32) -> bool {
        self.blobs.contexts.contains_key(&ctx_id)
    }

    /// The renderer-worker is gone: its contexts with it, and every blob's state machine
    /// learns that nothing the renderer owed will come.
    pub(crate) fn blobs_renderer_gone(&mut self) -> Result<(), FrontendError> {
        self.blobs.contexts.clear();
        let mut ids: Vec<u32> = self.blobs.slots.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            self.drive(id, Event::RendererGone)?;
        }
        Ok(())
    }

    /// After a new renderer was linked: the blobs it was not asked to make again.
    pub(crate) fn mark_lost_blobs(&mut self, kept: impl Fn(u32) -> bool) {
        for (id, slot) in self.blobs.slots.iter_mut() {
            slot.lost = !kept(*id);
        }
    }

    /// What makes blob `resource_id` again in a new renderer-worker: only a guest blob,
    /// whose entries were kept (a host blob lived in a context of the dead renderer).
    pub(crate) fn blob_rebuild_op(&self, resource_id: u32) -> Option<RendererOp> {
        let slot = self.blobs.slots.get(&resource_id)?;
        let entries = self.resources.get(resource_id).ok()?.entries.clone()?;
        (slot.blob_mem == BlobMem::Guest).then(|| RendererOp::CreateBlob {
            ctx_id: 0,
            resource_id,
            blob_mem: slot.blob_mem.as_u32(),
            blob_flags: slot.flags,
            blob_id: slot.blob_id,
            size: slot.size,
            entries: entries.to_vec(),
        })
    }

    /// Forgets a context whose creation the renderer refused.
    pub(crate) fn forget_context(&mut self, ctx_id: u32) {
        self.blobs.contexts.remove(&ctx_id);
    }

    /// The fence a command asks for, if any (the one place a header becomes a fence).
    pub(crate) fn fence_of(&self, hdr: &CtrlHeader) -> Option<protocol::ipc::FenceInfo> {
        hdr.is_fenced().then_some(protocol::ipc::FenceInfo {
            fence_id: hdr.fence_id,
            ctx_id: hdr.ctx_id,
            ring_idx: ring_of(hdr),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn create_blob(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
        blob_mem: BlobMem,
        blob_flags: u32,
        blob_id: u64,
        size: u64,
        entries: Vec<BackingEntry>,
    ) -> Outcome {
        if !self.blobs_enabled() {
            return Ok(Err(ErrorCode::Unspec));
        }
        if blob_mem != BlobMem::Guest && !self.has_context(ctx_id) {
            return Ok(Err(ErrorCode::InvalidContextId));
        }
        if !entries.is_empty() {
            let backed: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
            if backed < size || !self.backing_in_guest_memory(&entries) {
                return Ok(Err(ErrorCode::InvalidParameter));
            }
        }
        if let Err(code) = self.resources.create_blob(resource_id, size) {
            return Ok(Err(code));
        }
        if blob_mem == BlobMem::Guest {
            // Only guest memory backs it: a restarted renderer can make it again.
            self.resources.keep_entries(resource_id, &entries);
        }
        self.blobs.slots.insert(
            resource_id,
            Slot {
                blob_mem,
                flags: blob_flags,
                blob_id,
                size,
                state: MapState::Unmapped,
                export: None,
                unref_after_unmap: Vec::new(),
                lost: false,
            },
        );
        let op = RendererOp::CreateBlob {
            ctx_id,
            resource_id,
            blob_mem: blob_mem.as_u32(),
            blob_flags,
            blob_id,
            size,
            entries,
        };
        self.request(op, None, After::BlobCreated { resource_id })?;
        Ok(Ok(None))
    }

    /// SET_SCANOUT_BLOB: shows plane 0 of a framebuffer laid out in a blob (the Linux
    /// driver's dumb buffers with RESOURCE_BLOB). Resource 0 disables the scanout.
    fn set_scanout_blob(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        rect: Rect,
        fb: BlobFb,
        fence: Option<protocol::ipc::FenceInfo>,
    ) -> Outcome {
        if scanout_id as usize >= self.scanouts.len() {
            return Ok(Err(ErrorCode::InvalidScanoutId));
        }
        if resource_id == 0 {
            self.disable_scanout(scanout_id)?;
            return Ok(Ok(Some(Response::OkNodata)));
        }
        let Some(slot) = self.blobs.slots.get(&resource_id) else {
            if self.resources.get(resource_id).is_ok() {
                crate::guest_warn!("SET_SCANOUT_BLOB of resource {resource_id}: not a blob");
                return Ok(Err(ErrorCode::InvalidParameter));
            }
            return Ok(Err(ErrorCode::InvalidResourceId));
        };
        let Some(layout) = blob_fb_layout(&fb, &rect, slot.size, self.config.limits.max_dimension)
        else {
            crate::guest_warn!(
                "SET_SCANOUT_BLOB of resource {resource_id} ({} bytes): framebuffer {}x{} \
                 stride {} offset {} rect {rect:?} does not fit",
                slot.size,
                fb.width,
                fb.height,
                fb.stride,
                fb.offset
            );
            return Ok(Err(ErrorCode::InvalidParameter));
        };
        let s = &self.scanouts[scanout_id as usize];
        let reuse = s.resource_id == resource_id && s.blob == Some(layout) && s.buffer.is_some();
        if !reuse {
            // width <= max_dimension (checked by blob_fb_layout).
            let source = crate::execute::ScanoutSource::Blob(layout);
            if let Err(code) = self.bind_scanout_buffer(scanout_id, resource_id, source)? {
                return Ok(Err(code));
            }
        }
        let s = &mut self.scanouts[scanout_id as usize];
        s.resource_id = resource_id;
        s.rect = rect;
        s.format = fb.format;
        s.blob = Some(layout);
        s.sync.lose();
        self.request_scanout_write(scanout_id, rect, fence, After::ScanoutShown { scanout_id })?;
        Ok(Ok(None))
    }

    fn map_blob(&mut self, resource_id: u32, offset: u64) -> Outcome {
        let Some(window) = self.config.hostmem else {
            return Ok(Err(ErrorCode::Unspec));
        };
        let Some(slot) = self.blobs.slots.get(&resource_id) else {
            return Ok(Err(ErrorCode::InvalidResourceId));
        };
        if slot.flags & VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE == 0 || slot.blob_mem == BlobMem::Guest {
            return Ok(Err(ErrorCode::InvalidParameter));
        }
        if slot.state != MapState::Unmapped {
            return Ok(Err(ErrorCode::Unspec));
        }
        // A blob larger than the window cannot fit at any offset (its size is also within
        // the byte budget, so the rounding cannot overflow; checked all the same).
        let len = page_len(slot.size).unwrap_or(u64::MAX);
        let fits =
            offset.is_multiple_of(PAGE) && offset.checked_add(len).is_some_and(|end| end <= window);
        if !fits || self.window_overlaps(offset, len) {
            crate::guest_warn!(
                "MAP_BLOB of resource {resource_id} at {offset:#x}+{len:#x}: outside the \
                 {window:#x}-byte window, unaligned, or over a live mapping"
            );
            return Ok(Err(ErrorCode::InvalidParameter));
        }
        // Every blob from its MAP_BLOB until its unmap completed holds a mapping (the VMM's
        // mmap and fd); the per-VM limit bounds them.
        let max = self.config.limits.max_mappings;
        let live = self
            .blobs
            .slots
            .values()
            .filter(|s| s.state != MapState::Unmapped)
            .count();
        if u32::try_from(live).map_or(true, |n| n >= max) {
            crate::guest_warn!(
                "MAP_BLOB of resource {resource_id}: {max} blobs are mapped already"
            );
            return Ok(Err(ErrorCode::OutOfMemory));
        }
        if self.blobs.vmm.is_none() {
            log::warn!("MAP_BLOB before the VMM set up its backend request channel");
            return Ok(Err(ErrorCode::Unspec));
        }
        self.suspend_current(Wait::Map(resource_id));
        self.drive(resource_id, Event::MapRequested { offset })?;
        Ok(Ok(None))
    }

    /// Whether `[offset, offset+len)` touches a range some blob holds in the window.
    fn window_overlaps(&self, offset: u64, len: u64) -> bool {
        self.blobs.slots.values().any(|s| {
            let blob_len = page_len(s.size).unwrap_or(u64::MAX);
            let reserved = match s.state {
                MapState::Unmapped => None,
                // A pending map holds its whole page-rounded blob size.
                MapState::MapPending { offset, .. } => Some((offset, blob_len)),
                other => other.range(),
            };
            reserved.is_some_and(|(o, l)| {
                let l = l.max(blob_len);
                offset < o.saturating_add(l) && o < offset.saturating_add(len)
            })
        })
    }

    /// RESOURCE_UNREF of a blob: unmapped blobs go at once; mapped ones after their unmap.
    pub(crate) fn unref_blob(
        &mut self,
        resource_id: u32,
        fence: Option<protocol::ipc::FenceInfo>,
    ) -> Outcome {
        if !self.blobs.slots.contains_key(&resource_id) {
            return Ok(Err(ErrorCode::InvalidResourceId));
        }
        // Nothing may show the blob once the guest has let it go (as for 2D resources).
        for scanout_id in self.scanouts_showing(resource_id) {
            self.disable_scanout(scanout_id)?;
        }
        let Some(slot) = self.blobs.slots.get_mut(&resource_id) else {
            return Ok(Err(ErrorCode::InvalidResourceId));
        };
        if slot.state == MapState::Unmapped {
            self.finish_unref(resource_id, fence)?;
            return Ok(Ok(None));
        }
        if let Some(current) = self.current {
            slot.unref_after_unmap.push(current);
        }
        self.drive(resource_id, Event::UnmapRequested)?;
        Ok(Ok(None))
    }

    fn finish_unref(
        &mut self,
        resource_id: u32,
        fence: Option<protocol::ipc::FenceInfo>,
    ) -> Result<(), FrontendError> {
        let slot = self.blobs.slots.remove(&resource_id);
        let _ = self.resources.remove(resource_id);
        if slot.is_some_and(|s| s.lost) {
            // The renderer that held it is gone: nothing to release there, and a fence
            // needs no renderer when the command is answered at once (in queue order).
            return Ok(());
        }
        self.request(RendererOp::Unref { resource_id }, fence, After::Nothing)
    }

    /// Whether `resource_id` is a blob.
    pub(crate) fn is_blob(&self, resource_id: u32) -> bool {
        self.blobs.slots.contains_key(&resource_id)
    }

    /// Device reset: every blob in the window comes out first; the rest of the reset
    /// (and the control queue) waits until the last unmap completed.
    pub(crate) fn reset_blobs(&mut self) -> Result<bool, FrontendError> {
        let busy: Vec<u32> = self
            .blobs
            .slots
            .iter()
            .filter(|(_, s)| s.state != MapState::Unmapped)
            .map(|(id, _)| *id)
            .collect();
        for id in &busy {
            if let Some(slot) = self.blobs.slots.get_mut(id) {
                slot.unref_after_unmap.clear();
            }
            self.drive(*id, Event::UnmapRequested)?;
        }
        self.blobs.reset_pending = self
            .blobs
            .slots
            .values()
            .any(|s| s.state != MapState::Unmapped);
        if self.blobs.reset_pending {
            log::info!("device reset waits for {} blob unmap(s)", busy.len());
        } else {
            self.blobs.slots.clear();
            self.blobs.contexts.clear();
        }
        Ok(self.blobs.reset_pending)
    }

    /// An acknowledgment from the VMM.
    fn on_vmm_ack(&mut self, resource_id: u32, ack: VmmAck) -> Result<(), FrontendError> {
        let event = match ack {
            VmmAck::Map(Ok(())) => Event::VmmMapAck,
            VmmAck::Map(Err(())) => Event::VmmMapFailed,
            VmmAck::Unmap(result) => {
                if result.is_err() {
                    // The VMM kept the pages mapped; they stay valid (it holds the fd), so
                    // the blob can still be released here.
                    log::warn!("the VMM refused to unmap resource {resource_id}; released anyway");
                }
                Event::VmmUnmapAck
            }
        };
        self.drive(resource_id, event)
    }

    /// A renderer reply to Map / Unmap / Finalize.
    pub(crate) fn on_blob_reply(
        &mut self,
        after: After,
        body: Result<ReplyBody, ()>,
    ) -> Result<(), FrontendError> {
        match after {
            After::BlobMap { resource_id } => {
                let event = match body {
                    Ok(ReplyBody::MapReady {
                        resource_id: echoed,
                        size,
                        map_info,
                        fds,
                    }) => {
                        // The fd comes first, whatever else is wrong, to keep the lane in step.
                        let fd = self
                            .link
                            .recv_fds(fds)
                            .ok()
                            .and_then(|mut v| (v.len() == 1).then(|| v.remove(0)));
                        let blob_size = self.blobs.slots.get(&resource_id).map_or(0, |s| s.size);
                        // size <= blob_size, which map_blob fitted in the window, so the
                        // rounding cannot overflow; a None is refused all the same.
                        let len = page_len(size);
                        match (fd, len) {
                            (Some(fd), Some(len))
                                if echoed == resource_id
                                    && size > 0
                                    && size <= blob_size
                                    && export_covers(&fd, size) =>
                            {
                                if let Some(slot) = self.blobs.slots.get_mut(&resource_id) {
                                    slot.export = Some(fd);
                                }
                                Event::RendererMapReady(Export { len, map_info })
                            }
                            _ => {
                                log::warn!(
                                    "renderer's MapReady for resource {resource_id} is malformed \
                                     (echo {echoed}, size {size}, blob size {blob_size})"
                                );
                                Event::RendererMapFailed
                            }
                        }
                    }
                    _ => Event::RendererMapFailed,
                };
                self.drive(resource_id, event)
            }
            After::BlobUnmap { resource_id } => {
                if !matches!(body, Ok(ReplyBody::UnmapAck { resource_id: r }) if r == resource_id) {
                    log::warn!(
                        "renderer's UnmapAck for resource {resource_id} is not one; taken as done"
                    );
                }
                self.drive(resource_id, Event::RendererUnmapAck)
            }
            After::BlobFinalize { resource_id } => {
                if !matches!(body, Ok(ReplyBody::FinalizeAck { resource_id: r }) if r == resource_id)
                {
                    log::warn!("renderer's FinalizeAck for resource {resource_id} is not one; taken as done");
                }
                self.drive(resource_id, Event::FinalizeAck)
            }
            _ => Ok(()),
        }
    }

    /// Forgets a blob whose creation the renderer refused.
    pub(crate) fn forget_blob(&mut self, resource_id: u32) {
        self.blobs.slots.remove(&resource_id);
        let _ = self.resources.remove(resource_id);
    }

    /// Feeds one event to a blob's state machine and carries out what it says.
    fn drive(&mut self, resource_id: u32, event: Event) -> Result<(), FrontendError> {
        let Some(slot) = self.blobs.slots.get(&resource_id) else {
            log::warn!("{event:?} for unknown resource {resource_id}; ignored");
            return Ok(());
        };
        let before = slot.state;
        let (state, actions) = blob_map::step(before, event);
        log::debug!("resource {resource_id}: {before:?} --{event:?}--> {state:?} {actions:?}");
        if let Some(slot) = self.blobs.slots.get_mut(&resource_id) {
            slot.state = state;
        }
        for action in actions {
            self.act(resource_id, action)?;
        }
        Ok(())
    }

    fn act(&mut self, resource_id: u32, action: Action) -> Result<(), FrontendError> {
        match action {
            Action::RendererMap => self.request(
                RendererOp::Map { resource_id },
                None,
                After::BlobMap { resource_id },
            ),
            Action::VmmMap { offset, len } => {
                let fd = self
                    .blobs
                    .slots
                    .get_mut(&resource_id)
                    .and_then(|s| s.export.take());
                let sent = match (fd, self.blobs.vmm.as_mut()) {
                    (Some(fd), Some(vmm)) => vmm.send(VmmRequest::Map {
                        resource_id,
                        offset,
                        len,
                        fd,
                    }),
                    _ => false,
                };
                if sent {
                    Ok(())
                } else {
                    self.drive(resource_id, Event::VmmMapFailed)
                }
            }
            Action::AnswerMap(result) => {
                let response = match result {
                    Ok(map_info) => Response::OkMapInfo { map_info },
                    Err(MapError::Busy) => Response::Err(ErrorCode::Unspec),
                    Err(e) => {
                        crate::guest_warn!("MAP_BLOB of resource {resource_id} failed: {e:?}");
                        Response::Err(ErrorCode::Unspec)
                    }
                };
                // A Busy answer is for the command being executed right now.
                if let (Err(MapError::Busy), Some((q, id))) = (result, self.current) {
                    self.set_response(q, id, response);
                    return Ok(());
                }
                self.release(Wait::Map(resource_id), Some(response));
                Ok(())
            }
            Action::VmmUnmap { offset, len } => {
                let sent = self.blobs.vmm.as_mut().is_some_and(|vmm| {
                    vmm.send(VmmRequest::Unmap {
                        resource_id,
                        offset,
                        len,
                    })
                });
                if sent {
                    Ok(())
                } else {
                    self.drive(resource_id, Event::VmmUnmapAck)
                }
            }
            Action::RendererUnmap => self.request(
                RendererOp::Unmap { resource_id },
                None,
                After::BlobUnmap { resource_id },
            ),
            Action::RendererFinalize => self.request(
                RendererOp::Finalize { resource_id },
                None,
                After::BlobFinalize { resource_id },
            ),
            Action::Suspend => {
                self.suspend_current(Wait::Unmap(resource_id));
                Ok(())
            }
            Action::UnmapDone => self.unmap_done(resource_id),
            Action::NothingToUnmap => Ok(()),
            Action::Ignored(why) => {
                crate::guest_warn!("resource {resource_id}: {why}; ignored");
                Ok(())
            }
        }
    }

    fn suspend_current(&mut self, wait: Wait) {
        if let Some((q, id)) = self.current {
            if let Some(e) = self.entry_mut(q, id) {
                e.waiting_on = Some(wait);
            }
        }
    }

    /// Releases every command waiting for `wait`, optionally setting its response.
    fn release(&mut self, wait: Wait, response: Option<Response>) {
        for fifo in &mut self.fifos {
            for e in fifo.iter_mut().filter(|e| e.waiting_on == Some(wait)) {
                e.waiting_on = None;
                if let Some(r) = &response {
                    e.set_response(r.clone());
                }
            }
        }
    }

    fn unmap_done(&mut self, resource_id: u32) -> Result<(), FrontendError> {
        let unrefs = self
            .blobs
            .slots
            .get_mut(&resource_id)
            .map(|s| std::mem::take(&mut s.unref_after_unmap))
            .unwrap_or_default();
        self.release(Wait::Unmap(resource_id), None);
        if !unrefs.is_empty() {
            // The unref goes to the renderer on behalf of (the first of) the UNREFs.
            let saved = self.current.take();
            self.current = unrefs.first().copied();
            let r = self.finish_unref(resource_id, None);
            self.current = saved;
            r?;
        }
        if self.blobs.reset_pending
            && self
                .blobs
                .slots
                .values()
                .all(|s| s.state == MapState::Unmapped)
        {
            log::info!("every blob unmapped: the device reset goes on");
            self.blobs.reset_pending = false;
            self.blobs.slots.clear();
            self.blobs.contexts.clear();
            self.finish_reset()?;
        }
        Ok(())
    }
}

/// The device's num_capsets for `config`: the renderer's capsets when blobs or virgl
/// bring contexts, else 0. The config space and GET_CAPSET_INFO both use this.
pub fn num_capsets(config: &protocol::config::DeviceConfig) -> u32 {
    if config.hostmem.is_some() || config.virgl {
        config.num_capsets
    } else {
        0
    }
}

/// `size` rounded up to whole pages; None where that overflows.
fn page_len(size: u64) -> Option<u64> {
    size.div_ceil(PAGE).checked_mul(PAGE)
}

/// The header's ring index, which only counts with VIRTIO_GPU_FLAG_INFO_RING_IDX.
fn ring_of(hdr: &CtrlHeader) -> u8 {
    if hdr.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX != 0 {
        hdr.ring_idx
    } else {
        0
    }
}

/// Whether a renderer's export is a plain file (memfd/shm) holding at least `size` bytes:
/// the VMM maps it into the guest, and a shorter file would fault the guest (or the VMM)
/// with SIGBUS; anything else (a socket, a device) has no business in the window.
fn export_covers(fd: &OwnedFd, size: u64) -> bool {
    match nix::sys::stat::fstat(fd) {
        Ok(st) => {
            let is_file = (st.st_mode & libc::S_IFMT) == libc::S_IFREG;
            is_file && u64::try_from(st.st_size).is_ok_and(|len| len >= size)
        }
        Err(_) => false,
    }
}

/// The renderer's layout of a SET_SCANOUT_BLOB framebuffer, or None when it is malformed:
/// sides zero or above `max_dimension`, `rect` empty or outside the framebuffer, a stride
/// shorter than a packed row, or plane 0 (`offset + stride * (height - 1) + width * 4`,
/// overflow-checked) reaching past the blob's `blob_size` bytes.
fn blob_fb_layout(
    fb: &BlobFb,
    rect: &Rect,
    blob_size: u64,
    max_dimension: u32,
) -> Option<BlobScanout> {
    let sides_ok = |v: u32| v != 0 && v <= max_dimension;
    if !sides_ok(fb.width) || !sides_ok(fb.height) {
        return None;
    }
    if rect.is_empty() || !rect.is_inside(fb.width, fb.height) {
        return None;
    }
    let row = u64::from(fb.width) * 4;
    if u64::from(fb.stride) < row {
        return None;
    }
    let end = u64::from(fb.stride)
        .checked_mul(u64::from(fb.height - 1))?
        .checked_add(u64::from(fb.offset))?
        .checked_add(row)?;
    (end <= blob_size).then_some(BlobScanout {
        offset: u64::from(fb.offset),
        stride: fb.stride,
        width: fb.width,
        height: fb.height,
    })
}

/// A stable, per-resource UUID: RESOURCE_ASSIGN_UUID only needs ids unique per device.
fn resource_uuid(resource_id: u32) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    uuid[..4].copy_from_slice(b"vgpu");
    uuid[12..].copy_from_slice(&resource_id.to_be_bytes());
    // RFC 4122 version 8 (custom) and variant bits.
    uuid[6] = (uuid[6] & 0x0f) | 0x80;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    uuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fb(width: u32, height: u32, stride: u32, offset: u32) -> BlobFb {
        BlobFb {
            width,
            height,
            format: Format::B8G8R8X8Unorm,
            stride,
            offset,
        }
    }

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn blob_framebuffers_must_fit_their_blob() {
        let full = rect(0, 0, 16, 8);
        // 16x8, stride 80, offset 256: the last row ends at 256 + 80 * 7 + 64 = 880.
        let layout = blob_fb_layout(&fb(16, 8, 80, 256), &full, 880, 4096).unwrap();
        assert_eq!(
            layout,
            BlobScanout {
                offset: 256,
                stride: 80,
                width: 16,
                height: 8
            }
        );
        assert!(blob_fb_layout(&fb(16, 8, 80, 256), &full, 879, 4096).is_none());
        // Stride shorter than a packed row.
        assert!(blob_fb_layout(&fb(16, 8, 63, 0), &full, 1 << 20, 4096).is_none());
        // Sides: zero, or above the maximum dimension.
        assert!(blob_fb_layout(&fb(0, 8, 64, 0), &rect(0, 0, 0, 8), 1 << 20, 4096).is_none());
        assert!(blob_fb_layout(&fb(16, 0, 64, 0), &rect(0, 0, 16, 0), 1 << 20, 4096).is_none());
        assert!(blob_fb_layout(&fb(16, 8, 64, 0), &full, 1 << 20, 15).is_none());
        // Rect empty, outside, or overflowing.
        for r in [
            rect(0, 0, 0, 8),
            rect(1, 0, 16, 8),
            rect(0, 1, 16, 8),
            rect(u32::MAX, 0, 2, 1),
        ] {
            assert!(
                blob_fb_layout(&fb(16, 8, 64, 0), &r, 1 << 20, 4096).is_none(),
                "{r:?}"
            );
        }
        // Overflow of the extent is refused, never wrapped.
        assert!(blob_fb_layout(
            &fb(1, 4096, u32::MAX, u32::MAX),
            &rect(0, 0, 1, 1),
            u64::MAX,
            4096
        )
        .is_some());
        assert!(blob_fb_layout(
            &fb(1, 4096, u32::MAX, u32::MAX),
            &rect(0, 0, 1, 1),
            u64::from(u32::MAX) * 4096,
            4096
        )
        .is_none());
    }
}
