//! Scanout buffers: frontend-allocated, sealed memfds that the worker maps and fills with
//! a scanout's resource pixels on each flush, so the frontend can hand them to the VMM
//! without ever seeing a renderer pointer.

use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::stat::fstat;
use protocol::config::MAX_SCANOUTS;
use protocol::ipc::RenderError;
use protocol::virtio_gpu::Rect;

use crate::backend::{Renderer, BYTES_PER_PIXEL};
use crate::geometry::{check_rect_inside, strided_extent};
use crate::mapping::SharedMapping;
use crate::resources::ResourceLedger;

/// The buffer bound to one scanout.
#[derive(Debug)]
struct ScanoutBuffer {
    resource_id: u32,
    stride: u32,
    mapping: SharedMapping,
}

/// Every scanout's buffer, if bound.
#[derive(Debug)]
pub struct Scanouts {
    slots: Vec<Option<ScanoutBuffer>>,
}

fn invalid(msg: String) -> RenderError {
    RenderError::InvalidParameter(msg)
}

impl Scanouts {
    /// `count` unbound scanouts (capped at virtio-gpu's 16).
    pub fn new(count: usize) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(count.min(MAX_SCANOUTS), || None);
        Scanouts { slots }
    }

    fn slot(&mut self, scanout_id: u32) -> Result<&mut Option<ScanoutBuffer>, RenderError> {
        let count = self.slots.len();
        self.slots
            .get_mut(scanout_id as usize)
            .ok_or_else(|| invalid(format!("scanout {scanout_id} (device has {count})")))
    }

    /// Maps `fd` as the buffer of `scanout_id`, showing `resource_id`, replacing any
    /// previous buffer. The buffer must hold the whole resource at `stride` bytes per row
    /// and be sealed against shrinking, so a later flush can never fault on it.
    pub fn bind(
        &mut self,
        ledger: &ResourceLedger,
        scanout_id: u32,
        resource_id: u32,
        size: u64,
        stride: u32,
        fd: OwnedFd,
    ) -> Result<(), RenderError> {
        self.slot(scanout_id)?;
        let info = ledger.get(resource_id)?;
        let needed = u64::from(info.width) * u64::from(BYTES_PER_PIXEL);
        if u64::from(stride) < needed {
            return Err(invalid(format!(
                "stride {stride} < {needed} for width {}",
                info.width
            )));
        }
        let min_size = u64::from(stride) * u64::from(info.height);
        if size < min_size {
            return Err(invalid(format!(
                "scanout buffer of {size} bytes, resource needs {min_size}"
            )));
        }
        let len = usize::try_from(size).map_err(|_| invalid(format!("size {size}")))?;
        let stat = fstat(&fd).map_err(|e| invalid(format!("fstat of scanout buffer: {e}")))?;
        if u64::try_from(stat.st_size).unwrap_or(0) < size {
            return Err(invalid(format!(
                "scanout memfd holds {} bytes, {size} announced",
                stat.st_size
            )));
        }
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)
            .map(SealFlag::from_bits_truncate)
            .map_err(|e| invalid(format!("scanout buffer is not a sealable memfd: {e}")))?;
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(invalid(
                "scanout memfd is not sealed against shrinking".into(),
            ));
        }
        let mapping = SharedMapping::new(&fd, 0, len)?;
        *self.slot(scanout_id)? = Some(ScanoutBuffer {
            resource_id,
            stride,
            mapping,
        });
        Ok(())
    }

    /// Unbinds and unmaps a scanout's buffer (a no-op if none is bound).
    pub fn disable(&mut self, scanout_id: u32) -> Result<(), RenderError> {
        *self.slot(scanout_id)? = None;
        Ok(())
    }

    /// Copies `rect` of the scanout's resource into its buffer at resource coordinates.
    pub fn flush(
        &mut self,
        renderer: &mut dyn Renderer,
        ledger: &ResourceLedger,
        scanout_id: u32,
        rect: Rect,
    ) -> Result<(), RenderError> {
        let buffer = self
            .slot(scanout_id)?
            .as_mut()
            .ok_or_else(|| invalid(format!("scanout {scanout_id} has no buffer")))?;
        let info = ledger.get(buffer.resource_id)?;
        check_rect_inside(&rect, info.width, info.height)?;
        let extent = strided_extent(&rect, buffer.stride)
            .filter(|e| *e <= buffer.mapping.len() as u64)
            .ok_or_else(|| {
                invalid(format!(
                    "rect {rect:?} does not fit scanout {scanout_id}'s buffer"
                ))
            })?;
        log::trace!("flush scanout {scanout_id}: {extent} bytes span");
        renderer.read_rect(
            buffer.resource_id,
            rect,
            buffer.stride,
            buffer.mapping.as_mut_slice(),
        )
    }

    /// Unbinds every scanout.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
    }
}
