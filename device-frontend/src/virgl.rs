//! The virgl resource commands on the control actor (VIRTIO_GPU_F_VIRGL):
//! RESOURCE_CREATE_3D, TRANSFER_TO_HOST_3D and TRANSFER_FROM_HOST_3D, checked against the
//! resource table and the contexts and turned into renderer requests. Contexts and
//! SUBMIT_3D (with the virgl stream's framing check) are in `blobs.rs` with the other
//! context commands.
//!
//! Error answers:
//! - a device without virgl: ERR_UNSPEC (the decoder already says so; this is the
//!   executor's own guard);
//! - a header `ctx_id` that is not 0 and names no context: ERR_INVALID_CONTEXT_ID;
//! - CREATE_3D of an id in use: ERR_INVALID_RESOURCE_ID; a side or layer count above
//!   the device's max_dimension: ERR_INVALID_PARAMETER; over the resource count or byte
//!   budget: ERR_OUT_OF_MEMORY;
//! - a transfer of an unknown resource: ERR_INVALID_RESOURCE_ID; of a blob, a level
//!   beyond the resource's, a box outside the level, an offset outside the backing:
//!   ERR_INVALID_PARAMETER; of a resource without backing: ERR_UNSPEC (as for 2D).

use protocol::ipc::{Box3d, RendererOp, Transfer3d};
use protocol::virtio_gpu::{Command, CtrlHeader, ErrorCode, Rect, TransferHost3d};

use crate::control::{After, Control};
use crate::execute::Outcome;

/// Which way a 3D transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Guest backing -> resource (TRANSFER_TO_HOST_3D, and TRANSFER_TO_HOST_2D of a 3D
    /// resource).
    ToHost,
    /// Resource -> guest backing (TRANSFER_FROM_HOST_3D).
    FromHost,
}

/// TRANSFER_TO_HOST_2D's `rect` at `offset` as the 3D transfer it is: the box
/// `rect` x 1 of level 0, the renderer's own strides (what QEMU does in virgl mode).
pub(crate) fn transfer_of_rect(rect: &Rect, offset: u64) -> TransferHost3d {
    TransferHost3d {
        bbox: Box3d {
            x: rect.x,
            y: rect.y,
            z: 0,
            w: rect.width,
            h: rect.height,
            d: 1,
        },
        offset,
        level: 0,
        stride: 0,
        layer_stride: 0,
    }
}

impl Control {
    /// RESOURCE_CREATE_3D, TRANSFER_TO_HOST_3D, TRANSFER_FROM_HOST_3D.
    pub(crate) fn virgl_command(&mut self, hdr: &CtrlHeader, cmd: Command) -> Outcome {
        if !self.config.virgl {
            return Ok(Err(ErrorCode::Unspec));
        }
        if hdr.ctx_id != 0 && !self.has_context(hdr.ctx_id) {
            crate::guest_warn!(
                "{}: header names context {}, which does not exist",
                crate::decode::cmd_name(cmd.cmd_type()).unwrap_or("3D command"),
                hdr.ctx_id
            );
            return Ok(Err(ErrorCode::InvalidContextId));
        }
        match cmd {
            Command::ResourceCreate3d { resource_id, args } => {
                if let Err(code) = self.resources.create_3d(resource_id, args) {
                    crate::guest_warn!(
                        "RESOURCE_CREATE_3D {resource_id} ({args:?}) refused: {code:?}"
                    );
                    return Ok(Err(code));
                }
                let fence = self.fence_of(hdr);
                let op = RendererOp::CreateResource3d { resource_id, args };
                self.request(op, fence, After::Created { resource_id })?;
                Ok(Ok(None))
            }
            Command::TransferToHost3d {
                resource_id,
                transfer,
            } => self.transfer_3d(hdr, resource_id, transfer, Direction::ToHost),
            Command::TransferFromHost3d {
                resource_id,
                transfer,
            } => self.transfer_3d(hdr, resource_id, transfer, Direction::FromHost),
            other => {
                log::error!("virgl_command called with {:#x}", other.cmd_type());
                Ok(Err(ErrorCode::Unspec))
            }
        }
    }

    /// A checked 3D transfer (see the module's error answers), sent to the renderer in
    /// the header's context.
    pub(crate) fn transfer_3d(
        &mut self,
        hdr: &CtrlHeader,
        resource_id: u32,
        t: TransferHost3d,
        direction: Direction,
    ) -> Outcome {
        if hdr.ctx_id != 0 && !self.has_context(hdr.ctx_id) {
            return Ok(Err(ErrorCode::InvalidContextId));
        }
        if let Err(code) = self.resources.check_transfer_3d(resource_id, &t) {
            crate::guest_warn!(
                "{direction:?} transfer of resource {resource_id} ({t:?}) refused: {code:?}"
            );
            return Ok(Err(code));
        }
        let transfer = Transfer3d {
            ctx_id: hdr.ctx_id,
            bbox: t.bbox,
            offset: t.offset,
            level: t.level,
            stride: t.stride,
            layer_stride: t.layer_stride,
        };
        let op = match direction {
            Direction::ToHost => RendererOp::TransferToHost3d {
                resource_id,
                transfer,
            },
            Direction::FromHost => RendererOp::TransferFromHost3d {
                resource_id,
                transfer,
            },
        };
        let fence = self.fence_of(hdr);
        self.request(op, fence, After::Nothing)?;
        Ok(Ok(None))
    }
}
