//! Surviving the renderer-worker's death (docs/renderer-restart.md).
//!
//! When the renderer goes away (its event channel closes, or a send to it fails) the
//! control actor answers everything it owed with `ERR_UNSPEC`, tells every blob's state
//! machine (so unmaps in flight complete once the VMM acks, and no queue stays blocked),
//! drops the contexts, and holds both queues. The broker starts a fresh renderer and
//! sends its link on the renewals channel, then rings the shared doorbell. On that link
//! the frontend rebuilds from its own table what needs nothing but guest memory: every 2D
//! resource with its backing and its content, every guest blob, every scanout with a new
//! sealed buffer. 3D resources and host blobs lived in the dead renderer's contexts and
//! are lost: their next use is answered with an error.

use protocol::bootstrap::RendererLinkRenewal;
use protocol::ipc::RendererOp;
use protocol::lane::Lane;
use protocol::virtio_gpu::ErrorCode;

use crate::control::{After, Control, NUM_QUEUES};
use crate::error::FrontendError;
use crate::execute::ScanoutSource;
use crate::resources::ResourceKind;

/// The broker's side of a renderer restart: the channel new links arrive on, and the
/// descriptor lane that carries each link's lane end.
pub struct Renewals {
    rx: ipc_channel::ipc::IpcReceiver<RendererLinkRenewal>,
    lane: Lane,
}

impl Renewals {
    /// Wraps the bootstrap's renewals receiver and the broker's lane.
    pub fn new(rx: ipc_channel::ipc::IpcReceiver<RendererLinkRenewal>, lane: Lane) -> Self {
        Renewals { rx, lane }
    }
}

impl Control {
    /// Takes new links from the broker when a renderer dies (without, a renderer death
    /// ends the device).
    pub fn set_renewals(&mut self, renewals: Renewals) {
        self.renewals = Some(renewals);
    }

    /// Notes that the renderer is gone; what it owed is answered by
    /// [`Control::settle_renderer_loss`].
    pub(crate) fn renderer_gone(&mut self, why: &str) {
        if self.link.is_alive() {
            log::warn!(
                "renderer-worker gone ({why}): answering what it owed with errors and \
                 holding the queues until the broker links a new one"
            );
            self.link.mark_gone();
            self.loss_settled = false;
        }
    }

    /// While the renderer is gone: every reply it owed fails, fenced commands fail, and,
    /// once per loss, the blobs and contexts learn it.
    pub(crate) fn settle_renderer_loss(&mut self) -> Result<(), FrontendError> {
        if self.link.is_alive() {
            return Ok(());
        }
        // Quiet requests it may not have executed: their effects are undone as for a
        // refusal (none has a guest command waiting).
        while let Some((_, after)) = self.quiet.pop_front() {
            self.after_err(after);
        }
        let mut owed: Vec<_> = self.pending.drain().collect();
        owed.sort_unstable_by_key(|(seq, _)| *seq);
        let mut failed = 0usize;
        for (_, p) in owed {
            match p.after {
                // Their state machines learn of the loss below, as a whole.
                After::BlobMap { .. } | After::BlobUnmap { .. } | After::BlobFinalize { .. } => {}
                after => self.after_err(after),
            }
            if let Some((q, id)) = p.entry {
                if let Some(e) = self.entry_mut(q, id) {
                    e.replies_left = e.replies_left.saturating_sub(1);
                    e.fail(ErrorCode::Unspec);
                    failed += 1;
                }
            }
        }
        // A fence of the dead renderer never signals.
        for fifo in &mut self.fifos {
            for e in fifo.iter_mut().filter(|e| e.fence_pending()) {
                e.fence_done = true;
                e.fail(ErrorCode::Unspec);
                failed += 1;
            }
        }
        if failed > 0 {
            log::warn!("{failed} command(s) in flight answered ERR_UNSPEC: the renderer died");
        }
        if !self.loss_settled {
            self.loss_settled = true;
            self.blobs_renderer_gone()?;
        }
        Ok(())
    }

    /// Links the new renderer the broker announced, if any; rebuilds the 2D state in it
    /// and lets the held queues go on.
    pub(crate) fn take_renewal(&mut self) -> Result<(), FrontendError> {
        let Some(renewals) = self.renewals.as_ref() else {
            return Err(FrontendError::RendererGone);
        };
        let renewal = match renewals.rx.try_recv() {
            Ok(renewal) => renewal,
            // The broker rings again once it has one.
            Err(ipc_channel::TryRecvError::Empty) => return Ok(()),
            Err(ipc_channel::TryRecvError::IpcError(e)) => {
                return Err(FrontendError::Broker(format!(
                    "the renewals channel failed: {e:?}"
                )))
            }
        };
        let mut fds = renewals.lane.recv(renewal.lane)?;
        let (Some(lane), true) = (fds.pop(), fds.is_empty()) else {
            return Err(FrontendError::Broker(
                "a renderer link came without exactly one lane end".into(),
            ));
        };
        self.link
            .renew(renewal.to_renderer, renewal.from_renderer, Lane::new(lane));
        self.rebuild()?;
        for q in 0..NUM_QUEUES {
            if std::mem::take(&mut self.held[q]) {
                self.drain_queue(q)?;
            }
        }
        Ok(())
    }

    /// Makes in the new renderer what the frontend can make from its table and guest
    /// memory; forgets the rest.
    fn rebuild(&mut self) -> Result<(), FrontendError> {
        if let Some(mem) = self.mem.clone() {
            self.set_memory(mem)?;
        }
        let (mut rebuilt, mut lost) = (0usize, 0usize);
        let mut blobs_made = std::collections::HashSet::new();
        for id in self.resources.ids() {
            let Ok(r) = self.resources.get(id) else {
                continue;
            };
            let r = r.clone();
            match r.kind {
                ResourceKind::TwoD { format } => {
                    let op = RendererOp::CreateResource2d {
                        resource_id: id,
                        format: format.as_u32(),
                        width: r.width,
                        height: r.height,
                    };
                    self.request(op, None, After::Nothing)?;
                    if let Some(entries) = &r.entries {
                        let op = RendererOp::AttachBacking {
                            resource_id: id,
                            entries: entries.to_vec(),
                        };
                        self.request(op, None, After::Nothing)?;
                        // The guest's backing holds the picture (or a newer one).
                        let op = RendererOp::TransferToHost2d {
                            resource_id: id,
                            rect: r.rect(),
                            offset: 0,
                        };
                        self.request(op, None, After::Nothing)?;
                    } else if r.backing_len.is_some() {
                        // Its entries did not fit the budget: without them it has no
                        // backing in the new renderer.
                        let _ = self.resources.detach_backing(id);
                    }
                    rebuilt += 1;
                }
                ResourceKind::Blob { .. } => match self.blob_rebuild_op(id) {
                    Some(op) => {
                        self.request(op, None, After::Nothing)?;
                        blobs_made.insert(id);
                        rebuilt += 1;
                    }
                    // Kept so the guest can still unmap and unref it; the renderer now
                    // answers every other use with ERR_INVALID_RESOURCE_ID.
                    None => lost += 1,
                },
                ResourceKind::ThreeD { .. } => {
                    let _ = self.resources.remove(id);
                    lost += 1;
                }
            }
        }
        self.mark_lost_blobs(|id| blobs_made.contains(&id));
        let mut shown = 0usize;
        for scanout_id in 0..self.scanouts.len() as u32 {
            if self.show_again(scanout_id)? {
                shown += 1;
            }
        }
        log::info!(
            "new renderer-worker linked: {rebuilt} resource(s) rebuilt from guest memory, \
             {lost} lost with the old renderer's contexts, {shown} scanout(s) shown again"
        );
        Ok(())
    }

    /// Gives an enabled scanout a new buffer in the new renderer and shows it; disables it
    /// when its resource is lost. True when it is shown.
    fn show_again(&mut self, scanout_id: u32) -> Result<bool, FrontendError> {
        let s = &self.scanouts[scanout_id as usize];
        if !s.is_enabled() {
            return Ok(false);
        }
        let (resource_id, rect, blob) = (s.resource_id, s.rect, s.blob);
        let rebuilt = match self.resources.get(resource_id) {
            Ok(r) if r.pixel_format().is_some() => true,
            Ok(r) if matches!(r.kind, ResourceKind::Blob { .. }) => {
                self.blob_rebuild_op(resource_id).is_some()
            }
            _ => false,
        };
        if !rebuilt {
            self.disable_scanout(scanout_id)?;
            return Ok(false);
        }
        let source = match blob {
            None => {
                let Ok(r) = self.resources.get(resource_id) else {
                    return Ok(false);
                };
                ScanoutSource::Resource {
                    stride: r.width.saturating_mul(4),
                    height: r.height,
                }
            }
            Some(layout) => ScanoutSource::Blob(layout),
        };
        if self
            .bind_scanout_buffer(scanout_id, resource_id, source)?
            .is_err()
        {
            self.disable_scanout(scanout_id)?;
            return Ok(false);
        }
        // What the old renderer owed was answered as failed; the new one fills the buffer.
        self.scanouts[scanout_id as usize].sync.lose();
        self.request_scanout_write(scanout_id, rect, None, After::ScanoutShown { scanout_id })?;
        Ok(true)
    }
}
