//! The one trait every renderer backend implements (2D rutabaga now, virgl later).
//!
//! Backends are driven from a single thread (virglrenderer needs all its calls on one GL
//! thread), strictly in request order, and answer every problem with a
//! [`RenderError`] instead of panicking: the arguments come, indirectly, from the guest.

use protocol::ipc::{FenceInfo, RenderError};
use protocol::virtio_gpu::Rect;

use crate::guest_memory::Backing;

/// Bytes per pixel of every format virtio-gpu 2D resources can have.
pub const BYTES_PER_PIXEL: u32 = 4;

/// The VIRTIO_GPU_FORMAT_* values a 2D resource may have (all 4 bytes per pixel).
pub const VIRTIO_GPU_FORMATS: [u32; 8] = [1, 2, 3, 4, 67, 68, 121, 134];

/// A renderer backend.
pub trait Renderer {
    /// Creates a `width` x `height` 2D resource of a VIRTIO_GPU_FORMAT_* `format`.
    /// An id that already exists is an [`RenderError::InvalidResource`] error.
    fn create_resource_2d(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(), RenderError>;

    /// Destroys a resource, dropping its backing.
    fn unref(&mut self, resource_id: u32) -> Result<(), RenderError>;

    /// Attaches guest memory, already translated to host iovecs, as the resource's backing.
    /// The backend keeps `backing` (and with it the guest mapping) until detach or unref.
    fn attach_backing(&mut self, resource_id: u32, backing: Backing) -> Result<(), RenderError>;

    /// Detaches the resource's backing.
    fn detach_backing(&mut self, resource_id: u32) -> Result<(), RenderError>;

    /// Copies `rect` from the backing into the resource. The backing holds rows of the
    /// resource's width; the rect's first pixel is at byte `offset` of the backing and each
    /// following row one resource stride (`width * 4`) further.
    fn transfer_to_host_2d(
        &mut self,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<(), RenderError>;

    /// Copies `rect` of the resource into `dst` at resource coordinates: pixel (x, y) goes
    /// to byte `y * stride + x * 4`. Used for scanout flushes and cursor reads.
    fn read_rect(
        &mut self,
        resource_id: u32,
        rect: Rect,
        stride: u32,
        dst: &mut [u8],
    ) -> Result<(), RenderError>;

    /// Creates a fence that the backend's fence callback reports once all work submitted
    /// before it has completed (at once, for 2D).
    fn create_fence(&mut self, fence: FenceInfo) -> Result<(), RenderError>;

    /// Destroys every resource (device reset).
    fn reset(&mut self) -> Result<(), RenderError>;
}
