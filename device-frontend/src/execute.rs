//! The executor: one decoded, statically valid command checked against the device state and
//! carried out (answered here, or turned into renderer requests). Decoding lives in
//! `decode.rs`; nothing here looks at raw guest bytes.

use protocol::ipc::{FenceInfo, RendererOp, ReplyBody};
use protocol::virtio_gpu::{Command, CursorPos, DisplayOne, ErrorCode, Rect, Request, Response};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

use crate::control::{After, Control};
use crate::display::CURSOR_BYTES;
use crate::error::FrontendError;
use crate::scanout::ScanoutBuffer;

/// Largest capset the frontend passes on (virgl's is 1376 bytes; Venus' a few KiB).
const MAX_CAPSET_BYTES: usize = 64 << 10;

/// What a scanout shows, for its buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ScanoutSource {
    /// A resource's pixels, `stride` bytes per row.
    Resource {
        /// Bytes per row (width * 4).
        stride: u32,
        /// Rows.
        height: u32,
    },
    /// A framebuffer laid out in a blob.
    Blob(protocol::ipc::BlobScanout),
}

/// What executing a command decided: answer now (`Some`), wait for the renderer (`None`),
/// or refuse with a guest-visible error.
pub(crate) type Outcome = Result<Result<Option<Response>, ErrorCode>, FrontendError>;

/// The capacity of the update buffer kept between updates: a 1280x800 frame converted
/// from a non-BGRX format, or any sub-rectangle up to that size.
const KEPT_UPDATE_BUFFER: usize = 4 << 20;

impl Control {
    pub(crate) fn execute(&mut self, req: Request) -> Outcome {
        let fence = self.fence_of(&req.hdr);
        match req.cmd {
            Command::GetDisplayInfo => Ok(Ok(Some(self.display_info()))),
            Command::GetEdid { scanout_id } => Ok(self.edid(scanout_id).map(Some)),
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => {
                if let Err(code) = self.resources.create_2d(resource_id, format, width, height) {
                    return Ok(Err(code));
                }
                let op = RendererOp::CreateResource2d {
                    resource_id,
                    format: format.as_u32(),
                    width,
                    height,
                };
                self.request(op, fence, After::Created { resource_id })?;
                Ok(Ok(None))
            }
            Command::ResourceUnref { resource_id } if self.is_blob(resource_id) => {
                self.unref_blob(resource_id, fence)
            }
            Command::ResourceUnref { resource_id } => {
                if let Err(code) = self.resources.remove(resource_id) {
                    return Ok(Err(code));
                }
                for scanout_id in self.scanouts_showing(resource_id) {
                    self.disable_scanout(scanout_id)?;
                }
                self.request(RendererOp::Unref { resource_id }, fence, After::Nothing)?;
                Ok(Ok(None))
            }
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            } => {
                if let Err(code) = self.resources.get(resource_id) {
                    return Ok(Err(code));
                }
                if !self.backing_in_guest_memory(&entries) {
                    crate::guest_warn!(
                        "ATTACH_BACKING for resource {resource_id}: entry outside guest memory"
                    );
                    return Ok(Err(ErrorCode::InvalidParameter));
                }
                if let Err(code) = self.resources.attach_backing(resource_id, &entries) {
                    return Ok(Err(code));
                }
                let op = RendererOp::AttachBacking {
                    resource_id,
                    entries,
                };
                self.request(op, fence, After::Attached { resource_id })?;
                Ok(Ok(None))
            }
            Command::ResourceDetachBacking { resource_id } => {
                if let Err(code) = self.resources.detach_backing(resource_id) {
                    return Ok(Err(code));
                }
                self.request_or_answer(
                    RendererOp::DetachBacking { resource_id },
                    fence,
                    After::Nothing,
                )
            }
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } if self.resources.get(resource_id).is_ok_and(|r| r.is_3d()) => {
                // The Linux driver updates its dumb buffers (RESOURCE_CREATE_3D ones in
                // virgl mode) with the 2D command; it is the 3D transfer of that box.
                let transfer = crate::virgl::transfer_of_rect(&rect, offset);
                self.transfer_3d(
                    &req.hdr,
                    resource_id,
                    transfer,
                    crate::virgl::Direction::ToHost,
                )
            }
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } => {
                if let Err(code) = self.resources.check_transfer(resource_id, &rect, offset) {
                    return Ok(Err(code));
                }
                self.mirror_transfer(resource_id, &rect, offset);
                let op = RendererOp::TransferToHost2d {
                    resource_id,
                    rect,
                    offset,
                };
                self.request_or_answer(op, fence, After::Transferred { resource_id })
            }
            Command::SetScanout {
                scanout_id,
                resource_id,
                rect,
            } => self.set_scanout(scanout_id, resource_id, rect, fence),
            Command::ResourceFlush { resource_id, rect } => self.flush(resource_id, rect, fence),
            cmd @ (Command::ResourceCreate3d { .. }
            | Command::TransferToHost3d { .. }
            | Command::TransferFromHost3d { .. }) => self.virgl_command(&req.hdr, cmd),
            Command::UpdateCursor {
                pos,
                resource_id,
                hot_x,
                hot_y,
            } => self.update_cursor(pos, resource_id, (hot_x, hot_y), fence),
            Command::MoveCursor { pos } => {
                if let Some(d) = self.display.as_mut() {
                    d.cursor_pos(pos.scanout_id, pos.x, pos.y, true);
                }
                Ok(Ok(Some(Response::OkNodata)))
            }
            cmd @ (Command::CtxCreate { .. }
            | Command::CtxDestroy
            | Command::CtxAttachResource { .. }
            | Command::CtxDetachResource { .. }
            | Command::Submit3d { .. }
            | Command::GetCapsetInfo { .. }
            | Command::GetCapset { .. }
            | Command::ResourceAssignUuid { .. }
            | Command::ResourceCreateBlob { .. }
            | Command::ResourceMapBlob { .. }
            | Command::ResourceUnmapBlob { .. }
            | Command::SetScanoutBlob { .. }) => self.blob_command(&req.hdr, cmd),
        }
    }

    /// A command the checks above decided: answered now when unfenced (pipelined with
    /// the renderer, which executes it in order), after the renderer when fenced (a
    /// fence promises the work is done).
    fn request_or_answer(
        &mut self,
        op: RendererOp,
        fence: Option<FenceInfo>,
        after: After,
    ) -> Outcome {
        if fence.is_some() {
            self.request(op, fence, after)?;
            return Ok(Ok(None));
        }
        self.request_decided(op, after)?;
        Ok(Ok(Some(Response::OkNodata)))
    }

    fn display_info(&mut self) -> Response {
        if self.config.display_from_vmm {
            let count = self.scanouts.len();
            let max = self.config.limits.max_dimension;
            if let Some(modes) = self
                .display
                .as_mut()
                .and_then(|d| d.display_info(count, max))
            {
                return Response::OkDisplayInfo(modes);
            }
        }
        Response::OkDisplayInfo(
            self.config
                .outputs
                .iter()
                .map(|o| DisplayOne {
                    rect: Rect {
                        x: 0,
                        y: 0,
                        width: o.width,
                        height: o.height,
                    },
                    enabled: true,
                    flags: 0,
                })
                .collect(),
        )
    }

    fn edid(&mut self, scanout_id: u32) -> Result<Response, ErrorCode> {
        if !self.config.edid {
            return Err(ErrorCode::Unspec);
        }
        let output = *self
            .config
            .outputs
            .get(scanout_id as usize)
            .ok_or(ErrorCode::InvalidParameter)?;
        if self.config.display_from_vmm {
            if let Some(edid) = self.display.as_mut().and_then(|d| d.edid(scanout_id)) {
                return Ok(Response::OkEdid(edid));
            }
        }
        Ok(Response::OkEdid(
            crate::edid::edid_for(output.width, output.height, scanout_id).to_vec(),
        ))
    }

    pub(crate) fn backing_in_guest_memory(&self, entries: &[protocol::ipc::BackingEntry]) -> bool {
        let Some(mem) = self.mem.as_ref() else {
            return false;
        };
        let mem = mem.memory();
        entries
            .iter()
            .all(|e| mem.check_range(GuestAddress(e.addr), e.length as usize, Permissions::Read))
    }

    pub(crate) fn scanouts_showing(&self, resource_id: u32) -> crate::scanout::ScanoutIds {
        let mut ids = crate::scanout::ScanoutIds::default();
        for (i, s) in self.scanouts.iter().enumerate() {
            if s.resource_id == resource_id && s.is_enabled() {
                ids.insert(i as u32);
            }
        }
        ids
    }

    pub(crate) fn disable_scanout(&mut self, scanout_id: u32) -> Result<(), FrontendError> {
        let Some(s) = self.scanouts.get_mut(scanout_id as usize) else {
            return Ok(());
        };
        let was_enabled = s.is_enabled();
        s.clear();
        // Its buffer is gone: give its bytes back to the budget.
        let total = self.scanout_bytes_except(None);
        self.resources.set_scanout_bytes(total);
        if was_enabled {
            self.request(
                RendererOp::DisableScanout { scanout_id },
                None,
                After::Nothing,
            )?;
            if let Some(d) = self.display.as_mut() {
                d.scanout(scanout_id, 0, 0);
            }
        }
        Ok(())
    }

    fn set_scanout(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        rect: Rect,
        fence: Option<FenceInfo>,
    ) -> Outcome {
        if scanout_id as usize >= self.scanouts.len() {
            return Ok(Err(ErrorCode::InvalidScanoutId));
        }
        if resource_id == 0 {
            self.disable_scanout(scanout_id)?;
            return Ok(Ok(Some(Response::OkNodata)));
        }
        let resource = match self.resources.check_rect(resource_id, &rect) {
            Ok(r) => r.clone(),
            Err(code) => return Ok(Err(code)),
        };
        if rect.is_empty() {
            return Ok(Err(ErrorCode::InvalidParameter));
        }
        let Some(format) = resource.pixel_format() else {
            crate::guest_warn!(
                "SET_SCANOUT of resource {resource_id}: not a 2D texture in a 4-byte format"
            );
            return Ok(Err(ErrorCode::InvalidParameter));
        };
        // width <= max_dimension (policy::limits bounds it far below u32::MAX / 4).
        let Some(stride) = resource.width.checked_mul(4) else {
            return Ok(Err(ErrorCode::InvalidParameter));
        };
        let s = &self.scanouts[scanout_id as usize];
        let reuse = s.resource_id == resource_id
            && s.blob.is_none()
            && s.buffer.as_ref().is_some_and(|b| b.stride() == stride);
        if !reuse {
            let source = ScanoutSource::Resource {
                stride,
                height: resource.height,
            };
            if let Err(code) = self.bind_scanout_buffer(scanout_id, resource_id, source)? {
                return Ok(Err(code));
            }
        }
        let s = &mut self.scanouts[scanout_id as usize];
        s.resource_id = resource_id;
        s.rect = rect;
        s.format = format;
        s.blob = None;
        s.sync.lose();
        self.request_scanout_write(scanout_id, rect, fence, After::ScanoutShown { scanout_id })?;
        Ok(Ok(None))
    }

    /// Asks the renderer to copy `rect` of the scanout's resource into its buffer.
    pub(crate) fn request_scanout_write(
        &mut self,
        scanout_id: u32,
        rect: Rect,
        fence: Option<FenceInfo>,
        after: After,
    ) -> Result<(), FrontendError> {
        if let Some(s) = self.scanouts.get_mut(scanout_id as usize) {
            let whole = rect == s.rect;
            s.sync.write_requested(whole);
        }
        self.request(
            RendererOp::FlushToScanout { scanout_id, rect },
            fence,
            after,
        )
    }

    /// For a scanout whose buffer the frontend holds in step with its resource: the
    /// resource, the scanout rectangle, the buffer's stride and its bytes in the rectangle
    /// (row after row). What the fuzz harness compares with the renderer's resource once
    /// everything has settled.
    pub fn scanout_in_step(&self, scanout_id: u32) -> Option<(u32, Rect, u32, Vec<u8>)> {
        let s = self.scanouts.get(scanout_id as usize)?;
        if !s.is_enabled() || s.blob.is_some() || !s.sync.in_step() {
            return None;
        }
        let buffer = s.buffer.as_ref()?;
        let bytes = buffer.copy_rect(&s.rect)?;
        Some((s.resource_id, s.rect, buffer.stride(), bytes))
    }

    /// Whether the frontend keeps scanout buffers of `resource_id` in step itself: a 2D
    /// resource on a device without virgl (a virgl context could render into it).
    fn mirrored(&self, resource_id: u32) -> bool {
        !self.config.virgl
            && self
                .resources
                .get(resource_id)
                .is_ok_and(|r| matches!(r.kind, crate::resources::ResourceKind::TwoD { .. }))
    }

    /// Applies a checked TRANSFER_TO_HOST_2D to the buffers of the scanouts showing the
    /// resource, where they are in step; a buffer it cannot be applied to is out of step
    /// (its next flush goes through the renderer).
    fn mirror_transfer(&mut self, resource_id: u32, rect: &Rect, offset: u64) {
        let showing = self.scanouts_showing(resource_id);
        if showing.is_empty() {
            return;
        }
        let mirrored = self.mirrored(resource_id);
        let entries = self
            .resources
            .get(resource_id)
            .ok()
            .and_then(|r| r.entries.clone());
        for id in showing {
            let s = &mut self.scanouts[id as usize];
            if s.rect.intersect(rect).is_none() {
                // Nothing shown changes.
                continue;
            }
            if !mirrored || s.blob.is_some() || !s.sync.in_step() {
                s.sync.lose();
                continue;
            }
            let applied = match (&self.mem, &entries, s.buffer.as_ref()) {
                (Some(mem), Some(entries), Some(buffer)) => {
                    crate::mirror::apply_transfer(mem, entries, rect, offset, buffer)
                }
                _ => Err(crate::mirror::MirrorError::NoEntries),
            };
            if let Err(e) = applied {
                log::debug!(
                    "scanout {id}: transfer {rect:?} at {offset} not applied to its buffer \
                     ({e}); the next flush goes through the renderer"
                );
                s.sync.lose();
            }
        }
    }

    fn flush(&mut self, resource_id: u32, rect: Rect, fence: Option<FenceInfo>) -> Outcome {
        if self.is_blob(resource_id) {
            // A blob has no 2D shape of its own: the rect is in the framebuffer coordinates
            // of the blob scanouts showing it, and must lie inside each of them.
            let fits = self.scanouts_showing(resource_id).iter().all(|id| {
                self.scanouts[id as usize]
                    .blob
                    .is_some_and(|fb| rect.is_inside(fb.width, fb.height))
            });
            if !fits {
                crate::guest_warn!(
                    "RESOURCE_FLUSH of blob {resource_id}: {rect:?} outside its framebuffer"
                );
                return Ok(Err(ErrorCode::InvalidParameter));
            }
        } else if let Err(code) = self.resources.check_rect(resource_id, &rect) {
            return Ok(Err(code));
        }
        let mirrored = self.mirrored(resource_id);
        // A buffer in step is sent as it is; the others are the renderer's to write first
        // (the vector allocates only then: the renderer's path is the slow one anyway).
        let mut writes = Vec::new();
        for scanout_id in self.scanouts_showing(resource_id) {
            let s = &self.scanouts[scanout_id as usize];
            let Some(damage) = s.rect.intersect(&rect) else {
                continue;
            };
            if !mirrored || s.blob.is_some() {
                writes.push((scanout_id, damage, damage));
            } else if s.sync.in_step() {
                self.send_update(scanout_id, damage);
            } else if s.sync.catching_up() {
                // In step once the renderer writes on their way are done: the damage alone.
                writes.push((scanout_id, damage, damage));
            } else {
                // Out of step: the renderer copies the whole scanout rectangle, which
                // brings the buffer back in step; the UPDATE carries the damage only.
                writes.push((scanout_id, s.rect, damage));
            }
        }
        let last = writes.len().saturating_sub(1);
        for (i, (scanout_id, copy, damage)) in writes.iter().copied().enumerate() {
            self.request_scanout_write(
                scanout_id,
                copy,
                if i == last { fence } else { None },
                After::Flushed {
                    scanout_id,
                    rect: damage,
                },
            )?;
        }
        if writes.is_empty() {
            return Ok(Ok(Some(Response::OkNodata)));
        }
        Ok(Ok(None))
    }

    fn update_cursor(
        &mut self,
        pos: CursorPos,
        resource_id: u32,
        hot: (u32, u32),
        fence: Option<FenceInfo>,
    ) -> Outcome {
        if resource_id == 0 {
            if let Some(d) = self.display.as_mut() {
                d.cursor_pos(pos.scanout_id, pos.x, pos.y, false);
            }
            return Ok(Ok(Some(Response::OkNodata)));
        }
        let format = match self.resources.get(resource_id).map(|r| r.pixel_format()) {
            Ok(Some(format)) => format,
            // The image is read as 4-byte pixels; a blob or a 3D resource of any other
            // shape or format has none to read.
            Ok(None) => return Ok(Err(ErrorCode::InvalidParameter)),
            Err(code) => return Ok(Err(code)),
        };
        self.request(
            RendererOp::ReadCursor { resource_id },
            fence,
            After::Cursor {
                format,
                pos: (pos.scanout_id, pos.x, pos.y),
                hot,
            },
        )?;
        Ok(Ok(None))
    }

    /// Bytes of every scanout's buffer, but for `except` (whose buffer is about to be
    /// replaced).
    fn scanout_bytes_except(&self, except: Option<u32>) -> u64 {
        self.scanouts
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except.map(|id| id as usize))
            .filter_map(|(_, s)| s.buffer.as_ref())
            .map(|b| b.len() as u64)
            .sum()
    }

    /// Gives scanout `scanout_id` a new sealed buffer for what `source` shows of resource
    /// `resource_id`, and hands the buffer to the renderer.
    pub(crate) fn bind_scanout_buffer(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        source: ScanoutSource,
    ) -> Result<Result<(), ErrorCode>, FrontendError> {
        let (row, height) = match source {
            ScanoutSource::Resource { stride, height } => (stride, height),
            // The framebuffer is packed at width * 4 per row in the buffer; width is at
            // most max_dimension (checked by the caller), so this does not overflow.
            ScanoutSource::Blob(layout) => match layout.width.checked_mul(4) {
                Some(row) => (row, layout.height),
                None => return Ok(Err(ErrorCode::InvalidParameter)),
            },
        };
        let (fds, size) = match self.install_scanout_buffer(scanout_id, row, height)? {
            Ok(installed) => installed,
            Err(code) => return Ok(Err(code)),
        };
        let op = match source {
            ScanoutSource::Resource { stride, .. } => RendererOp::SetScanoutBuffer {
                scanout_id,
                resource_id,
                size,
                stride,
                fds,
            },
            ScanoutSource::Blob(layout) => RendererOp::SetScanoutBlobBuffer {
                scanout_id,
                resource_id,
                layout,
                size,
                fds,
            },
        };
        self.request(op, None, After::Nothing)?;
        Ok(Ok(()))
    }

    /// Allocates a sealed scanout buffer of `stride * height` bytes, installs it on the
    /// scanout (in place of its old one) and puts its fd on the lane. Err(OutOfMemory) when
    /// the per-VM byte budget (which scanout buffers share with resources) or the host
    /// cannot hold it; the budget is checked before anything is allocated.
    pub(crate) fn install_scanout_buffer(
        &mut self,
        scanout_id: u32,
        stride: u32,
        height: u32,
    ) -> Result<Result<(protocol::lane::FdTicket, u64), ErrorCode>, FrontendError> {
        let others = self.scanout_bytes_except(Some(scanout_id));
        let wanted = u64::from(stride)
            .checked_mul(u64::from(height))
            .and_then(|len| len.checked_add(others));
        let reserved = wanted.map_or(Err(ErrorCode::OutOfMemory), |total| {
            self.resources.reserve_scanout_bytes(total)
        });
        if let Err(code) = reserved {
            crate::guest_warn!(
                "scanout {scanout_id}: a buffer of {height} rows of {stride} bytes exceeds \
                 the memory budget ({} bytes of resources, {others} of other scanouts)",
                self.resources.bytes_in_use()
            );
            return Ok(Err(code));
        }
        let buffer = match ScanoutBuffer::new(stride, height) {
            Ok(b) => b,
            Err(e) => {
                crate::guest_warn!("scanout {scanout_id}: buffer allocation failed: {e}");
                // The old buffer (if any) is still installed: charge what really exists.
                let total = self.scanout_bytes_except(None);
                self.resources.set_scanout_bytes(total);
                return Ok(Err(ErrorCode::OutOfMemory));
            }
        };
        let fds = match self.link.send_fds(&[buffer.fd()]) {
            Ok(fds) => fds,
            Err(e) => {
                self.renderer_gone(&e.to_string());
                let total = self.scanout_bytes_except(None);
                self.resources.set_scanout_bytes(total);
                return Ok(Err(ErrorCode::Unspec));
            }
        };
        let size = buffer.len() as u64;
        self.scanouts[scanout_id as usize].buffer = Some(buffer);
        Ok(Ok((fds, size)))
    }

    /// Acts on a successful renderer reply: Ok(Some) is the guest's response when the
    /// reply carries it, an Err is the guest-visible error to report.
    pub(crate) fn after_ok(
        &mut self,
        after: After,
        body: ReplyBody,
    ) -> Result<Option<Response>, ErrorCode> {
        self.after_ok_inner(after, body)
    }

    fn after_ok_inner(
        &mut self,
        after: After,
        body: ReplyBody,
    ) -> Result<Option<Response>, ErrorCode> {
        match after {
            After::Nothing
            | After::Created { .. }
            | After::Attached { .. }
            | After::Transferred { .. }
            | After::BlobCreated { .. }
            | After::ContextCreated { .. } => Ok(None),
            After::Respond => match body {
                ReplyBody::CapsetInfo {
                    capset_id,
                    max_version,
                    max_size,
                } => Ok(Some(Response::OkCapsetInfo {
                    capset_id,
                    max_version,
                    max_size,
                })),
                ReplyBody::Capset(bytes) if bytes.len() <= MAX_CAPSET_BYTES => {
                    Ok(Some(Response::OkCapset(bytes)))
                }
                other => {
                    log::warn!("renderer answered a capset request with {other:?}");
                    Err(ErrorCode::Unspec)
                }
            },
            After::BlobMap { .. } | After::BlobUnmap { .. } | After::BlobFinalize { .. } => {
                if let Err(e) = self.on_blob_reply(after, Ok(body)) {
                    log::error!("blob reply: {e}");
                    return Err(ErrorCode::Unspec);
                }
                Ok(None)
            }
            After::ScanoutShown { scanout_id } => {
                let Some(s) = self.scanouts.get_mut(scanout_id as usize) else {
                    return Ok(None);
                };
                s.sync.write_answered(true);
                let rect = s.rect;
                if let Some(d) = self.display.as_mut() {
                    d.scanout(scanout_id, rect.width, rect.height);
                }
                self.send_update(scanout_id, rect);
                Ok(None)
            }
            After::Flushed { scanout_id, rect } => {
                if let Some(s) = self.scanouts.get_mut(scanout_id as usize) {
                    s.sync.write_answered(true);
                }
                self.send_update(scanout_id, rect);
                Ok(None)
            }
            After::Cursor { format, pos, hot } => {
                let ReplyBody::CursorImage(pixels) = body else {
                    log::warn!("renderer answered a cursor read without pixels");
                    return Err(ErrorCode::Unspec);
                };
                if pixels.len() != CURSOR_BYTES {
                    log::warn!("renderer sent a {}-byte cursor image", pixels.len());
                    return Err(ErrorCode::Unspec);
                }
                let mut bgra = vec![0u8; CURSOR_BYTES];
                format.convert_row_to_bgrx(&pixels, &mut bgra);
                if let Some(d) = self.display.as_mut() {
                    d.cursor_update(pos, hot, &bgra);
                }
                Ok(None)
            }
        }
    }

    /// Undoes the optimistic state change of a request the renderer refused.
    pub(crate) fn after_err(&mut self, after: After) {
        match after {
            After::Created { resource_id } => {
                let _ = self.resources.remove(resource_id);
            }
            After::Attached { resource_id } => {
                let _ = self.resources.detach_backing(resource_id);
            }
            After::BlobCreated { resource_id } => self.forget_blob(resource_id),
            After::ContextCreated { ctx_id } => self.forget_context(ctx_id),
            After::BlobMap { .. } | After::BlobUnmap { .. } | After::BlobFinalize { .. } => {
                if let Err(e) = self.on_blob_reply(after, Err(())) {
                    log::error!("blob reply: {e}");
                }
            }
            After::ScanoutShown { scanout_id } | After::Flushed { scanout_id, .. } => {
                if let Some(s) = self.scanouts.get_mut(scanout_id as usize) {
                    s.sync.write_answered(false);
                }
            }
            After::Transferred { resource_id } => {
                for id in self.scanouts_showing(resource_id) {
                    self.scanouts[id as usize].sync.lose();
                }
            }
            _ => {}
        }
    }

    /// Sends `rect` (resource coordinates, inside the scanout) of a scanout's buffer.
    fn send_update(&mut self, scanout_id: u32, rect: Rect) {
        let Some(s) = self.scanouts.get(scanout_id as usize) else {
            return;
        };
        let (Some(buffer), Some(display)) = (s.buffer.as_ref(), self.display.as_mut()) else {
            return;
        };
        let Some(pixels) = buffer.read_bgrx(s.format, &rect, &mut self.update_buf) else {
            log::warn!("scanout {scanout_id}: damage {rect:?} outside its buffer");
            return;
        };
        let on_screen = Rect {
            x: rect.x - s.rect.x,
            y: rect.y - s.rect.y,
            width: rect.width,
            height: rect.height,
        };
        display.update(scanout_id, &on_screen, pixels);
        self.stats.updates += 1;
        self.stats.update_bytes += pixels.len() as u64;
        if self.update_buf.capacity() > KEPT_UPDATE_BUFFER {
            // A large converted update does not keep its megabytes for good.
            self.update_buf = Vec::new();
        }
    }
}
