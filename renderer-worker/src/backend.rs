//! The one trait every renderer backend implements (rutabaga 2D + cross-domain now, virgl
//! later).
//!
//! Backends are driven from a single thread (virglrenderer needs all its calls on one GL
//! thread), strictly in request order, and answer every problem with a
//! [`RenderError`] instead of panicking: the arguments come, indirectly, from the guest.

use std::os::fd::OwnedFd;

use protocol::ipc::{FenceInfo, RenderError, Resource3d, Transfer3d};
use protocol::virtio_gpu::Rect;

use crate::guest_memory::Backing;

/// Bytes per pixel of every format virtio-gpu 2D resources can have.
pub const BYTES_PER_PIXEL: u32 = 4;

/// The VIRTIO_GPU_FORMAT_* values a 2D resource may have (all 4 bytes per pixel).
pub const VIRTIO_GPU_FORMATS: [u32; 8] = [1, 2, 3, 4, 67, 68, 121, 134];

/// What RESOURCE_CREATE_BLOB asks for, minus the resource id and the backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobCreate {
    /// Context that owns the blob (0 for BLOB_MEM_GUEST).
    pub ctx_id: u32,
    /// VIRTIO_GPU_BLOB_MEM_*.
    pub blob_mem: u32,
    /// VIRTIO_GPU_BLOB_FLAG_*.
    pub blob_flags: u32,
    /// Context-specific name of the host allocation (HOST3D, HOST3D_GUEST).
    pub blob_id: u64,
    /// Size in bytes (never 0).
    pub size: u64,
}

/// A blob exported for the VMM to map into the guest's host-visible window.
#[derive(Debug)]
pub struct ExportedBlob {
    /// A descriptor the VMM can `mmap` (`MAP_SHARED`): a memfd / shm file.
    pub fd: OwnedFd,
    /// Bytes of `fd` that belong to the blob (from offset 0).
    pub size: u64,
    /// VIRTIO_GPU_MAP_CACHE_* of the mapping.
    pub map_info: u32,
}

/// One capability set as GET_CAPSET_INFO reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsetInfo {
    /// VIRTIO_GPU_CAPSET_*.
    pub capset_id: u32,
    /// Highest version.
    pub max_version: u32,
    /// Bytes of the capset data.
    pub max_size: u32,
}

/// A renderer backend.
///
/// Resource ids are one namespace across 2D resources and blobs; context ids are the
/// guest's. Each method checks its own ids and arguments (the executor checks them too).
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

    /// Destroys every context and every resource (device reset).
    fn reset(&mut self) -> Result<(), RenderError>;

    /// Number of capability sets (the device's `num_capsets`).
    fn num_capsets(&self) -> u32;

    /// The capability set at `index` (below [`Renderer::num_capsets`]).
    fn capset_info(&self, index: u32) -> Result<CapsetInfo, RenderError>;

    /// The bytes of capability set `capset_id` at `version` (at most its max version).
    fn capset(&self, capset_id: u32, version: u32) -> Result<Vec<u8>, RenderError>;

    /// Creates rendering context `ctx_id` of the capset in the low byte of `context_init`.
    fn create_context(
        &mut self,
        ctx_id: u32,
        context_init: u32,
        name: &str,
    ) -> Result<(), RenderError>;

    /// Destroys a context; the resources attached to it stay alive.
    fn destroy_context(&mut self, ctx_id: u32) -> Result<(), RenderError>;

    /// Makes a resource visible to a context (CTX_ATTACH_RESOURCE).
    fn context_attach_resource(&mut self, ctx_id: u32, resource_id: u32)
        -> Result<(), RenderError>;

    /// Withdraws a resource from a context (CTX_DETACH_RESOURCE).
    fn context_detach_resource(&mut self, ctx_id: u32, resource_id: u32)
        -> Result<(), RenderError>;

    /// Executes a SUBMIT_3D command stream in the context's own protocol.
    fn submit_3d(
        &mut self,
        ctx_id: u32,
        ring_idx: u8,
        commands: &mut [u8],
    ) -> Result<(), RenderError>;

    /// Creates blob resource `resource_id`. `backing` is the translated guest memory for
    /// BLOB_MEM_GUEST (required) and HOST3D_GUEST (optional); the backend keeps it (and the
    /// guest mapping) alive until the blob is destroyed.
    fn create_blob(
        &mut self,
        resource_id: u32,
        create: BlobCreate,
        backing: Option<Backing>,
    ) -> Result<(), RenderError>;

    /// Exports a host blob for mapping (RESOURCE_MAP_BLOB). A blob without the MAPPABLE
    /// flag, or one living in guest memory, is an [`RenderError::InvalidParameter`].
    fn export_blob(&mut self, resource_id: u32) -> Result<ExportedBlob, RenderError>;

    /// The VMM is taking the exported blob out of the guest's window: stop any CPU access
    /// of the backend's own through the export.
    fn unmap_blob(&mut self, resource_id: u32) -> Result<(), RenderError>;

    /// The unmap is complete on both sides: release the backend's mapping state.
    fn finalize_blob(&mut self, resource_id: u32) -> Result<(), RenderError>;

    /// Copies `dst.len()` bytes of a blob, from byte `offset`, into `dst` (scanout of blob
    /// resources, and proof that the renderer sees what the guest wrote).
    fn read_blob(
        &mut self,
        resource_id: u32,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), RenderError>;

    /// Creates a 3D (virgl) resource. Only a 3D renderer has them.
    fn create_resource_3d(
        &mut self,
        resource_id: u32,
        args: Resource3d,
    ) -> Result<(), RenderError> {
        let _ = (resource_id, args);
        Err(no_3d("RESOURCE_CREATE_3D"))
    }

    /// Copies a box from the resource's backing into the resource (TRANSFER_TO_HOST_3D).
    fn transfer_to_host_3d(
        &mut self,
        resource_id: u32,
        transfer: Transfer3d,
    ) -> Result<(), RenderError> {
        let _ = (resource_id, transfer);
        Err(no_3d("TRANSFER_TO_HOST_3D"))
    }

    /// Copies a box of the resource into its backing (TRANSFER_FROM_HOST_3D).
    fn transfer_from_host_3d(
        &mut self,
        resource_id: u32,
        transfer: Transfer3d,
    ) -> Result<(), RenderError> {
        let _ = (resource_id, transfer);
        Err(no_3d("TRANSFER_FROM_HOST_3D"))
    }

    /// Lets asynchronous work report its fences; true while some fence is still pending
    /// (the executor then polls again soon instead of blocking on the next request).
    /// Synchronous backends signal every fence inside [`Renderer::create_fence`].
    fn poll_fences(&mut self) -> bool {
        false
    }
}

fn no_3d(what: &str) -> RenderError {
    RenderError::Unspec(format!(
        "{what}: this renderer has no 3D resources (start with --virgl)"
    ))
}
