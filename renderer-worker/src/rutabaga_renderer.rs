//! The rutabaga backend: rutabaga_gfx's 2D component for classic resources, and its
//! cross-domain component for contexts and blobs (shm-backed, mappable, no GPU needed).
//!
//! Rutabaga builds one *default* component per instance: with the cross-domain capset
//! enabled it leaves 2D out, and without it it leaves cross-domain out. So this backend
//! owns two instances: `two_d` (2D resources, fences) and `cross` (contexts, blobs,
//! capsets). Resource ids are one namespace: [`RutabagaRenderer`] keeps its own record of
//! which instance owns each id.
//!
//! Cross-domain is configured without channels (no Wayland/X11/PipeWire paths): it
//! never opens or creates sockets, starts no worker thread, and allocates blobs with
//! `memfd_create` + `ftruncate` (rutabaga's system gralloc; no GBM, no Vulkan, no
//! udmabuf). Every command it could run that needs a channel, a pipe or an eventfd is
//! refused here before rutabaga sees it (see [`check_cross_domain_commands`]), so the
//! guest cannot make it issue a syscall outside the renderer's seccomp filter.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use nix::sys::stat::{fstat, SFlag};
use protocol::config::Limits;
use protocol::ipc::{FenceInfo, RenderError};
use protocol::virtio_gpu::{
    Rect, VIRTIO_GPU_BLOB_FLAGS_ALL, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
    VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE, VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_BLOB_MEM_HOST3D,
    VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST, VIRTIO_GPU_CAPSET_CROSS_DOMAIN,
    VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK,
};
use rutabaga_gfx::{
    DrmFormat, ImageAllocationInfo, ResourceCreateBlob, Rutabaga, RutabagaBuilder,
    RutabagaComponentType, RutabagaError, RutabagaFence, RutabagaFenceHandler, RutabagaGralloc,
    RutabagaGrallocBackendFlags, RutabagaGrallocFlags, RutabagaHandle, RutabagaIntoRawDescriptor,
    RutabagaIovec, Transfer3D, RUTABAGA_FLAG_FENCE, RUTABAGA_MAP_CACHE_MASK,
    RUTABAGA_PIPE_BIND_RENDER_TARGET, RUTABAGA_PIPE_TEXTURE_2D,
};

use crate::backend::{BlobCreate, CapsetInfo, ExportedBlob, Renderer, BYTES_PER_PIXEL};
use crate::geometry::{check_rect_inside, is_empty, packed_size, strided_extent};
use crate::guest_memory::Backing;

/// The capability sets this backend offers, in GET_CAPSET_INFO index order.
pub const CAPSETS: [u32; 1] = [VIRTIO_GPU_CAPSET_CROSS_DOMAIN];

/// The device's `num_capsets` for this backend (the frontend's config space must say the
/// same; [`Renderer::num_capsets`] reports the built value, which a test pins to this).
pub const NUM_CAPSETS: u32 = CAPSETS.len() as u32;

/// Most CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS one context may run. Rutabaga records every
/// answer in the context's item table for the context's whole life (a blob_id stays
/// usable), so an unbounded number would let a guest grow the renderer's memory without
/// limit: about 150 bytes per query, at most ~2.5 MiB per context, ~160 MiB for the default
/// 64 contexts (`Limits::max_contexts`, see `vgpu_policy::limits`).
pub const MAX_IMAGE_QUERIES_PER_CONTEXT: u32 = 1 << 14;

/// Cross-domain protocol: every command starts with this 8-byte header
/// (`cmd: u8, ring_idx: u8, cmd_size: u16 LE, pad: u32`).
const CROSS_DOMAIN_HEADER_SIZE: usize = 8;
/// CROSS_DOMAIN_CMD_INIT: sets up the query ring (and a channel, refused here).
const CROSS_DOMAIN_CMD_INIT: u8 = 1;
/// CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS: answer written to the query ring.
const CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS: u8 = 2;
/// CROSS_DOMAIN_CMD_POLL: a no-op until a channel exists.
const CROSS_DOMAIN_CMD_POLL: u8 = 3;
/// Offset of `channel_type` in every CROSS_DOMAIN_CMD_INIT layout (after the header,
/// `query_ring_id`, `channel_ring_id`; the legacy 16-byte form has it at 12).
const CROSS_DOMAIN_INIT_CHANNEL_TYPE_AT: usize = 16;
/// Size of the legacy CROSS_DOMAIN_CMD_INIT (header, query_ring_id, channel_type).
const CROSS_DOMAIN_INIT_LEGACY_SIZE: usize = 16;

/// A 2D resource: its size for bounds checks, and the backing that keeps the guest memory
/// rutabaga points into mapped.
struct Resource2d {
    width: u32,
    height: u32,
    backing: Option<Backing>,
}

/// A blob resource of the cross-domain instance.
struct Blob {
    blob_mem: u32,
    /// The guest's flags (rutabaga is told SHAREABLE too, see `create_blob`).
    blob_flags: u32,
    size: u64,
    /// Guest memory (GUEST, HOST3D_GUEST): rutabaga, and contexts the blob is attached to,
    /// hold raw pointers into it, so it lives until the blob is destroyed.
    backing: Option<Backing>,
    /// Contexts it is attached to, detached before the blob is destroyed.
    contexts: BTreeSet<u32>,
}

enum Resource {
    TwoD(Resource2d),
    Blob(Blob),
}

/// What this backend remembers of a context.
#[derive(Default)]
struct Context {
    /// Blobs attached to it.
    blobs: BTreeSet<u32>,
    /// GET_IMAGE_REQUIREMENTS commands run so far.
    image_queries: u32,
}

/// The rutabaga renderer: 2D resources plus cross-domain contexts and blobs.
pub struct RutabagaRenderer {
    two_d: Rutabaga,
    cross: Rutabaga,
    resources: BTreeMap<u32, Resource>,
    contexts: BTreeMap<u32, Context>,
    limits: Limits,
}

/// The name this backend had when it did 2D only.
pub type Rutabaga2d = RutabagaRenderer;

impl std::fmt::Debug for RutabagaRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RutabagaRenderer")
            .field("resources", &self.resources.len())
            .field("contexts", &self.contexts.len())
            .finish_non_exhaustive()
    }
}

fn from_rutabaga(resource_id: u32, err: RutabagaError) -> RenderError {
    match err {
        RutabagaError::InvalidResourceId => RenderError::InvalidResource(resource_id),
        e @ (RutabagaError::InvalidIovec
        | RutabagaError::CheckedRange { .. }
        | RutabagaError::CheckedArithmetic { .. }
        | RutabagaError::InvalidContextId
        | RutabagaError::InvalidCapset
        | RutabagaError::InvalidCommandBuffer
        | RutabagaError::InvalidCommandSize(_)
        | RutabagaError::InvalidCrossDomainChannel
        | RutabagaError::InvalidCrossDomainItemId
        | RutabagaError::InvalidCrossDomainItemType
        | RutabagaError::InvalidCrossDomainState) => RenderError::InvalidParameter(e.to_string()),
        e => RenderError::Unspec(e.to_string()),
    }
}

fn invalid(msg: String) -> RenderError {
    RenderError::InvalidParameter(msg)
}

/// Walks a cross-domain command stream the way rutabaga will and refuses it unless every
/// command is one that works without a channel: INIT without a channel, GET_IMAGE_
/// REQUIREMENTS and POLL. Returns the number of GET_IMAGE_REQUIREMENTS commands.
///
/// This also guards rutabaga's own loop, which advances by each header's `cmd_size` and
/// would spin forever on a command of size 0.
pub fn check_cross_domain_commands(commands: &[u8]) -> Result<u32, RenderError> {
    let mut rest = commands;
    let mut image_queries = 0u32;
    while !rest.is_empty() {
        if rest.len() < CROSS_DOMAIN_HEADER_SIZE {
            return Err(invalid(format!(
                "{} trailing bytes are no cross-domain header",
                rest.len()
            )));
        }
        let cmd = rest[0];
        let size = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
        if size < CROSS_DOMAIN_HEADER_SIZE || size > rest.len() {
            return Err(invalid(format!(
                "cross-domain command {cmd} of {size} bytes, {} left",
                rest.len()
            )));
        }
        match cmd {
            CROSS_DOMAIN_CMD_INIT => {
                let at = if size == CROSS_DOMAIN_INIT_LEGACY_SIZE {
                    12
                } else {
                    CROSS_DOMAIN_INIT_CHANNEL_TYPE_AT
                };
                let channel = rest
                    .get(at..at + 4)
                    .filter(|_| at + 4 <= size)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| invalid(format!("cross-domain INIT of {size} bytes")))?;
                if channel != 0 {
                    return Err(invalid(format!(
                        "cross-domain channel type {channel}: this device has no channels"
                    )));
                }
            }
            CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS => image_queries += 1,
            CROSS_DOMAIN_CMD_POLL => {}
            other => {
                return Err(invalid(format!(
                    "cross-domain command {other} needs a channel, which this device has not"
                )));
            }
        }
        rest = &rest[size..];
    }
    Ok(image_queries)
}

impl RutabagaRenderer {
    /// Builds rutabaga's 2D component and its cross-domain component (no channels).
    /// `on_fence` is called for each completed fence; all work here is synchronous, so
    /// that happens inside [`Renderer::create_fence`].
    ///
    /// Per-resource `limits` (dimension, bytes) are enforced here too, so the backend is
    /// safe on its own; the executor additionally enforces the totals.
    pub fn new(
        limits: Limits,
        on_fence: impl Fn(FenceInfo) + Send + Sync + 'static,
    ) -> Result<Self, RenderError> {
        let handler = RutabagaFenceHandler::new(move |fence: RutabagaFence| {
            on_fence(FenceInfo {
                fence_id: fence.fence_id,
                ctx_id: fence.ctx_id,
                ring_idx: fence.ring_idx,
            })
        });
        let two_d = RutabagaBuilder::new(0, handler.clone())
            .set_default_component(RutabagaComponentType::Rutabaga2D)
            .build()
            .map_err(|e| RenderError::Unspec(format!("rutabaga 2D init: {e}")))?;
        warm_up_before_jail()?;
        let capset_mask = CAPSETS.iter().fold(0u64, |mask, id| mask | (1 << id));
        let cross = RutabagaBuilder::new(capset_mask, handler)
            .set_rutabaga_paths(None)
            .build()
            .map_err(|e| RenderError::Unspec(format!("rutabaga cross-domain init: {e}")))?;
        Ok(RutabagaRenderer {
            two_d,
            cross,
            resources: BTreeMap::new(),
            contexts: BTreeMap::new(),
            limits,
        })
    }

    fn resource_2d(&self, resource_id: u32) -> Result<&Resource2d, RenderError> {
        match self.resources.get(&resource_id) {
            Some(Resource::TwoD(r)) => Ok(r),
            _ => Err(RenderError::InvalidResource(resource_id)),
        }
    }

    fn resource_2d_mut(&mut self, resource_id: u32) -> Result<&mut Resource2d, RenderError> {
        match self.resources.get_mut(&resource_id) {
            Some(Resource::TwoD(r)) => Ok(r),
            _ => Err(RenderError::InvalidResource(resource_id)),
        }
    }

    fn blob(&self, resource_id: u32) -> Result<&Blob, RenderError> {
        match self.resources.get(&resource_id) {
            Some(Resource::Blob(b)) => Ok(b),
            _ => Err(RenderError::InvalidResource(resource_id)),
        }
    }

    /// A host blob the guest allowed to be mapped.
    fn mappable_blob(&self, resource_id: u32) -> Result<&Blob, RenderError> {
        let blob = self.blob(resource_id)?;
        if blob.blob_mem == VIRTIO_GPU_BLOB_MEM_GUEST {
            return Err(invalid(format!(
                "blob {resource_id} lives in guest memory: nothing to map"
            )));
        }
        if blob.blob_flags & VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE == 0 {
            return Err(invalid(format!("blob {resource_id} is not MAPPABLE")));
        }
        Ok(blob)
    }

    fn context(&self, ctx_id: u32) -> Result<&Context, RenderError> {
        self.contexts
            .get(&ctx_id)
            .ok_or_else(|| invalid(format!("no context {ctx_id}")))
    }

    /// A descriptor of a host blob's memory (a dup; rutabaga keeps its own).
    fn blob_fd(&mut self, resource_id: u32) -> Result<OwnedFd, RenderError> {
        let handle = self
            .cross
            .export_blob(resource_id)
            .map_err(|e| RenderError::Unspec(format!("export of blob {resource_id}: {e}")))?;
        let RutabagaHandle::MagmaGpuHandle(handle) = handle else {
            return Err(RenderError::Unspec(format!(
                "blob {resource_id} has no OS handle"
            )));
        };
        let raw = handle.os_handle.into_raw_descriptor();
        // SAFETY: `into_raw_descriptor` released ownership of `raw`, a descriptor rutabaga
        // had just duplicated for this export; nothing else owns or closes it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn destroy_blob(&mut self, resource_id: u32, blob: Blob) -> Result<(), RenderError> {
        // Contexts hold raw pointers into a guest blob's backing (the cross-domain query
        // ring) and a reference on a host blob's memory: detach from each first, so that
        // nothing points into the backing once it is dropped below.
        for ctx_id in &blob.contexts {
            if let Some(ctx) = self.contexts.get_mut(ctx_id) {
                ctx.blobs.remove(&resource_id);
            }
            if let Err(e) = self.cross.context_detach_resource(*ctx_id, resource_id) {
                log::warn!("detach of blob {resource_id} from context {ctx_id}: {e}");
            }
        }
        let result = self
            .cross
            .unref_resource(resource_id)
            .map_err(|e| from_rutabaga(resource_id, e));
        drop(blob);
        result
    }
}

impl Renderer for RutabagaRenderer {
    fn create_resource_2d(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(), RenderError> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(RenderError::InvalidResource(resource_id));
        }
        crate::geometry::check_new_2d(format, width, height, self.limits.max_dimension)?;
        // Rutabaga computes the stride as a u32 and allocates the whole buffer at once;
        // both must be bounded before it sees the numbers.
        let bytes = packed_size(width, height)
            .filter(|b| *b <= self.limits.max_resource_bytes)
            .filter(|_| width.checked_mul(BYTES_PER_PIXEL).is_some())
            .ok_or_else(|| RenderError::OutOfMemory(format!("{width}x{height} too large")))?;
        let create = rutabaga_gfx::ResourceCreate3D {
            target: RUTABAGA_PIPE_TEXTURE_2D,
            format,
            bind: RUTABAGA_PIPE_BIND_RENDER_TARGET,
            width,
            height,
            depth: 1,
            array_size: 1,
            last_level: 0,
            nr_samples: 0,
            flags: 0,
        };
        self.two_d
            .resource_create_3d(resource_id, create)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        log::debug!("created 2D resource {resource_id}: {width}x{height}, {bytes} bytes");
        self.resources.insert(
            resource_id,
            Resource::TwoD(Resource2d {
                width,
                height,
                backing: None,
            }),
        );
        Ok(())
    }

    fn unref(&mut self, resource_id: u32) -> Result<(), RenderError> {
        match self.resources.remove(&resource_id) {
            None => Err(RenderError::InvalidResource(resource_id)),
            Some(Resource::TwoD(resource)) => {
                let result = self
                    .two_d
                    .unref_resource(resource_id)
                    .map_err(|e| from_rutabaga(resource_id, e));
                // Rutabaga no longer points into the backing (or never knew the
                // resource), so the guest mapping may go now.
                drop(resource);
                result
            }
            Some(Resource::Blob(blob)) => self.destroy_blob(resource_id, blob),
        }
    }

    fn attach_backing(&mut self, resource_id: u32, backing: Backing) -> Result<(), RenderError> {
        let resource = self.resource_2d(resource_id)?;
        if resource.backing.is_some() {
            return Err(RenderError::Unspec(format!(
                "resource {resource_id} already has a backing"
            )));
        }
        let iovecs = backing
            .iovecs()
            .iter()
            .map(|iov| RutabagaIovec {
                base: iov.base().cast(),
                len: iov.len(),
            })
            .collect();
        self.two_d
            .attach_backing(resource_id, iovecs)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        self.resource_2d_mut(resource_id)?.backing = Some(backing);
        Ok(())
    }

    fn detach_backing(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.resource_2d(resource_id)?;
        self.two_d
            .detach_backing(resource_id)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        // Only now that rutabaga forgot the iovecs may their mapping be released.
        self.resource_2d_mut(resource_id)?.backing = None;
        Ok(())
    }

    fn transfer_to_host_2d(
        &mut self,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<(), RenderError> {
        let resource = self.resource_2d(resource_id)?;
        let backing_len = match &resource.backing {
            Some(b) => b.len(),
            None => return Err(RenderError::InvalidResource(resource_id)),
        };
        check_rect_inside(&rect, resource.width, resource.height)?;
        if is_empty(&rect) {
            return Ok(());
        }
        // Rutabaga reads row r of the rect at `t.offset + (y + r) * stride + x * 4`, while
        // virtio-gpu (and the guest drivers) put the rect's first pixel at `offset`; so
        // rutabaga gets `offset` minus the rect's own position in a packed buffer.
        let stride = resource.width * BYTES_PER_PIXEL;
        let start_in_packed = u64::from(rect.y)
            .checked_mul(u64::from(stride))
            .and_then(|row| row.checked_add(u64::from(rect.x) * u64::from(BYTES_PER_PIXEL)))
            .ok_or_else(|| RenderError::InvalidParameter("rect position overflows".into()))?;
        let rutabaga_offset = offset.checked_sub(start_in_packed).ok_or_else(|| {
            RenderError::InvalidParameter(format!(
                "offset {offset} lies before the rect's row start {start_in_packed}"
            ))
        })?;
        // The last byte read is offset + (h - 1) * stride + w * 4; rutabaga would silently
        // copy less if the backing were shorter, so refuse that explicitly.
        let needed = Rect {
            x: 0,
            y: 0,
            width: rect.width,
            height: rect.height,
        };
        let end = strided_extent(&needed, stride)
            .and_then(|extent| extent.checked_add(offset))
            .ok_or_else(|| RenderError::InvalidParameter("transfer end overflows".into()))?;
        if end > backing_len {
            return Err(RenderError::InvalidParameter(format!(
                "transfer reads up to byte {end}, backing has {backing_len}"
            )));
        }
        let transfer = Transfer3D::new_2d(rect.x, rect.y, rect.width, rect.height, rutabaga_offset);
        self.two_d
            .transfer_write(0, resource_id, transfer, None)
            .map_err(|e| from_rutabaga(resource_id, e))
    }

    fn read_rect(
        &mut self,
        resource_id: u32,
        rect: Rect,
        stride: u32,
        dst: &mut [u8],
    ) -> Result<(), RenderError> {
        let resource = self.resource_2d(resource_id)?;
        check_rect_inside(&rect, resource.width, resource.height)?;
        let extent = strided_extent(&rect, stride).ok_or_else(|| {
            RenderError::InvalidParameter(format!("rect does not fit stride {stride}"))
        })?;
        if extent > dst.len() as u64 {
            return Err(RenderError::InvalidParameter(format!(
                "rect needs {extent} bytes, buffer has {}",
                dst.len()
            )));
        }
        if is_empty(&rect) {
            return Ok(());
        }
        let mut transfer = Transfer3D::new_2d(rect.x, rect.y, rect.width, rect.height, 0);
        transfer.stride = stride;
        self.two_d
            .transfer_read(0, resource_id, transfer, Some(IoSliceMut::new(dst)))
            .map_err(|e| from_rutabaga(resource_id, e))
    }

    fn create_fence(&mut self, fence: FenceInfo) -> Result<(), RenderError> {
        // Every operation of this backend, cross-domain included (it has no channel, so
        // no asynchronous work), is complete when its request returns. So every fence,
        // context fences too, goes to the 2D component, which signals it at once with the
        // ids we gave it. (Cross-domain's own channel ring would queue it for a worker
        // thread that does not exist without a channel: it would never signal.)
        let fence = RutabagaFence {
            flags: RUTABAGA_FLAG_FENCE,
            fence_id: fence.fence_id,
            ctx_id: fence.ctx_id,
            ring_idx: fence.ring_idx,
        };
        self.two_d
            .create_fence(fence)
            .map_err(|e| RenderError::Unspec(format!("create_fence: {e}")))
    }

    fn reset(&mut self) -> Result<(), RenderError> {
        let contexts: Vec<u32> = self.contexts.keys().copied().collect();
        for ctx_id in contexts {
            if let Err(e) = self.destroy_context(ctx_id) {
                log::warn!("reset: destroy of context {ctx_id} failed: {e}");
            }
        }
        let ids: Vec<u32> = self.resources.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.unref(id) {
                log::warn!("reset: unref of resource {id} failed: {e}");
            }
        }
        Ok(())
    }

    fn num_capsets(&self) -> u32 {
        self.cross.get_num_capsets()
    }

    fn capset_info(&self, index: u32) -> Result<CapsetInfo, RenderError> {
        let (capset_id, max_version, max_size) = self
            .cross
            .get_capset_info(index)
            .map_err(|e| invalid(format!("capset index {index}: {e}")))?;
        Ok(CapsetInfo {
            capset_id,
            max_version,
            max_size,
        })
    }

    fn capset(&self, capset_id: u32, version: u32) -> Result<Vec<u8>, RenderError> {
        // Rutabaga answers an unknown id with its default component's capset; only the
        // ids it listed are real here.
        let info = (0..self.num_capsets())
            .filter_map(|index| self.capset_info(index).ok())
            .find(|info| info.capset_id == capset_id)
            .ok_or_else(|| invalid(format!("no capset {capset_id}")))?;
        if version > info.max_version {
            return Err(invalid(format!(
                "capset {capset_id} version {version} (at most {})",
                info.max_version
            )));
        }
        let bytes = self
            .cross
            .get_capset(capset_id, version)
            .map_err(|e| invalid(format!("capset {capset_id}: {e}")))?;
        if bytes.len() != info.max_size as usize {
            return Err(RenderError::Unspec(format!(
                "capset {capset_id} has {} bytes, its info says {}",
                bytes.len(),
                info.max_size
            )));
        }
        Ok(bytes)
    }

    fn create_context(
        &mut self,
        ctx_id: u32,
        context_init: u32,
        name: &str,
    ) -> Result<(), RenderError> {
        if ctx_id == 0 || self.contexts.contains_key(&ctx_id) {
            return Err(invalid(format!("context id {ctx_id} is taken or reserved")));
        }
        let capset_id = context_init & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK;
        // Rutabaga would give an unknown capset (0 included) its default component.
        if !CAPSETS.contains(&capset_id) {
            return Err(invalid(format!("context capset {capset_id} not offered")));
        }
        // Each cross-domain context keeps a table rutabaga never shrinks (see
        // [`MAX_IMAGE_QUERIES_PER_CONTEXT`]): the per-VM context limit bounds them here
        // too, so the backend is safe on its own.
        let max = self.limits.max_contexts;
        if u32::try_from(self.contexts.len()).map_or(true, |n| n >= max) {
            return Err(RenderError::OutOfMemory(format!("{max} contexts already")));
        }
        self.cross
            .create_context(ctx_id, context_init, Some(name))
            .map_err(|e| from_rutabaga(0, e))?;
        log::debug!("created context {ctx_id} ({name:?}), capset {capset_id}");
        self.contexts.insert(ctx_id, Context::default());
        Ok(())
    }

    fn destroy_context(&mut self, ctx_id: u32) -> Result<(), RenderError> {
        let ctx = self
            .contexts
            .remove(&ctx_id)
            .ok_or_else(|| invalid(format!("no context {ctx_id}")))?;
        for id in &ctx.blobs {
            if let Some(Resource::Blob(blob)) = self.resources.get_mut(id) {
                blob.contexts.remove(&ctx_id);
            }
        }
        self.cross
            .destroy_context(ctx_id)
            .map_err(|e| from_rutabaga(0, e))
    }

    fn context_attach_resource(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
    ) -> Result<(), RenderError> {
        self.context(ctx_id)?;
        match self.resources.get(&resource_id) {
            None => return Err(RenderError::InvalidResource(resource_id)),
            // Guests attach every resource a context's process opens, dumb buffers too;
            // a cross-domain context has no use for a 2D resource, so this is a no-op.
            Some(Resource::TwoD(_)) => return Ok(()),
            Some(Resource::Blob(blob)) if blob.contexts.contains(&ctx_id) => return Ok(()),
            Some(Resource::Blob(_)) => {}
        }
        self.cross
            .context_attach_resource(ctx_id, resource_id)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        if let Some(Resource::Blob(blob)) = self.resources.get_mut(&resource_id) {
            blob.contexts.insert(ctx_id);
        }
        if let Some(ctx) = self.contexts.get_mut(&ctx_id) {
            ctx.blobs.insert(resource_id);
        }
        Ok(())
    }

    fn context_detach_resource(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
    ) -> Result<(), RenderError> {
        self.context(ctx_id)?;
        match self.resources.get(&resource_id) {
            None => return Err(RenderError::InvalidResource(resource_id)),
            Some(Resource::TwoD(_)) => return Ok(()),
            Some(Resource::Blob(blob)) if !blob.contexts.contains(&ctx_id) => return Ok(()),
            Some(Resource::Blob(_)) => {}
        }
        let result = self
            .cross
            .context_detach_resource(ctx_id, resource_id)
            .map_err(|e| from_rutabaga(resource_id, e));
        if let Some(Resource::Blob(blob)) = self.resources.get_mut(&resource_id) {
            blob.contexts.remove(&ctx_id);
        }
        if let Some(ctx) = self.contexts.get_mut(&ctx_id) {
            ctx.blobs.remove(&resource_id);
        }
        result
    }

    fn submit_3d(
        &mut self,
        ctx_id: u32,
        ring_idx: u8,
        commands: &mut [u8],
    ) -> Result<(), RenderError> {
        let queries = self.context(ctx_id)?.image_queries;
        let more = check_cross_domain_commands(commands)?;
        let total = queries
            .checked_add(more)
            .filter(|t| *t <= MAX_IMAGE_QUERIES_PER_CONTEXT)
            .ok_or_else(|| {
                RenderError::OutOfMemory(format!(
                    "context {ctx_id} asked for image requirements {MAX_IMAGE_QUERIES_PER_CONTEXT} times"
                ))
            })?;
        if let Some(ctx) = self.contexts.get_mut(&ctx_id) {
            // Counted before running: a stream that fails half-way has still added items.
            ctx.image_queries = total;
        }
        log::trace!("context {ctx_id} ring {ring_idx}: {} bytes", commands.len());
        // Whatever fails in a guest's command stream is a bad parameter of SUBMIT_3D.
        self.cross
            .submit_command(ctx_id, commands, &[])
            .map_err(|e| invalid(format!("context {ctx_id} command stream: {e}")))
    }

    fn create_blob(
        &mut self,
        resource_id: u32,
        create: BlobCreate,
        backing: Option<Backing>,
    ) -> Result<(), RenderError> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(RenderError::InvalidResource(resource_id));
        }
        let BlobCreate {
            ctx_id,
            blob_mem,
            blob_flags,
            blob_id,
            size,
        } = create;
        if blob_flags & !VIRTIO_GPU_BLOB_FLAGS_ALL != 0 {
            return Err(invalid(format!("blob flags {blob_flags:#x}")));
        }
        if size == 0 {
            return Err(invalid("empty blob".into()));
        }
        let iovecs = |backing: &Backing| -> Vec<RutabagaIovec> {
            backing
                .iovecs()
                .iter()
                .map(|iov| RutabagaIovec {
                    base: iov.base().cast(),
                    len: iov.len(),
                })
                .collect()
        };
        let (rutabaga_ctx, request, iovecs) = match blob_mem {
            VIRTIO_GPU_BLOB_MEM_GUEST => {
                let backing = backing
                    .as_ref()
                    .ok_or_else(|| invalid("guest blob without backing".into()))?;
                if backing.len() != size {
                    return Err(invalid(format!(
                        "guest blob of {size} bytes with {} bytes of backing",
                        backing.len()
                    )));
                }
                // Created outside any context: a cross-domain context would look the
                // (meaningless) blob_id up as one of its allocations. The guest attaches
                // it to contexts with CTX_ATTACH_RESOURCE.
                let request = ResourceCreateBlob {
                    blob_mem,
                    blob_flags,
                    blob_id: 0,
                    size,
                };
                (0, request, Some(iovecs(backing)))
            }
            VIRTIO_GPU_BLOB_MEM_HOST3D | VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST => {
                self.context(ctx_id)?;
                if size > self.limits.max_resource_bytes {
                    return Err(RenderError::OutOfMemory(format!(
                        "blob of {size} bytes (at most {})",
                        self.limits.max_resource_bytes
                    )));
                }
                if blob_id > u64::from(u32::MAX) {
                    return Err(invalid(format!("blob_id {blob_id:#x}")));
                }
                if blob_mem == VIRTIO_GPU_BLOB_MEM_HOST3D && backing.is_some() {
                    return Err(invalid("HOST3D blob with guest backing".into()));
                }
                // Rutabaga's export of a blob without SHAREABLE *moves* its only handle
                // out (and loses it if a context holds a reference), so a second MAP would
                // fail. Every map exports here, so rutabaga always gets SHAREABLE; the
                // guest's own flags are what this backend checks.
                let request = ResourceCreateBlob {
                    blob_mem,
                    blob_flags: blob_flags | VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
                    blob_id,
                    size,
                };
                (ctx_id, request, backing.as_ref().map(iovecs))
            }
            other => return Err(invalid(format!("blob_mem {other}"))),
        };
        self.cross
            .resource_create_blob(rutabaga_ctx, resource_id, request, iovecs, None)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        log::debug!(
            "created blob {resource_id}: mem {blob_mem}, flags {blob_flags:#x}, {size} bytes"
        );
        self.resources.insert(
            resource_id,
            Resource::Blob(Blob {
                blob_mem,
                blob_flags,
                size,
                backing,
                contexts: BTreeSet::new(),
            }),
        );
        Ok(())
    }

    fn export_blob(&mut self, resource_id: u32) -> Result<ExportedBlob, RenderError> {
        let size = self.mappable_blob(resource_id)?.size;
        let fd = self.blob_fd(resource_id)?;
        // Only something the VMM can mmap leaves: a regular (memfd/shm) file that holds
        // the whole blob.
        let stat = fstat(&fd)
            .map_err(|e| RenderError::Unspec(format!("fstat of blob {resource_id}: {e}")))?;
        if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err(RenderError::Unspec(format!(
                "blob {resource_id} is not backed by shared memory"
            )));
        }
        let file_len = u64::try_from(stat.st_size).unwrap_or(0);
        if file_len < size {
            return Err(RenderError::Unspec(format!(
                "blob {resource_id} memory holds {file_len} bytes, the blob {size}"
            )));
        }
        let map_info = self
            .cross
            .map_info(resource_id)
            .map_err(|e| RenderError::Unspec(format!("map info of blob {resource_id}: {e}")))?
            & RUTABAGA_MAP_CACHE_MASK;
        if map_info == 0 {
            return Err(RenderError::Unspec(format!(
                "blob {resource_id} has no cache type"
            )));
        }
        Ok(ExportedBlob { fd, size, map_info })
    }

    fn unmap_blob(&mut self, resource_id: u32) -> Result<(), RenderError> {
        // The export is an fd the VMM maps; this backend made no CPU mapping of its own.
        self.mappable_blob(resource_id).map(|_| ())
    }

    fn finalize_blob(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.mappable_blob(resource_id)?;
        // Drops rutabaga's own mapping of the blob, if anything ever made one.
        self.cross
            .unmap(resource_id)
            .map_err(|e| RenderError::Unspec(format!("unmap of blob {resource_id}: {e}")))
    }

    fn read_blob(
        &mut self,
        resource_id: u32,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), RenderError> {
        let blob = self.blob(resource_id)?;
        offset
            .checked_add(dst.len() as u64)
            .filter(|end| *end <= blob.size)
            .ok_or_else(|| {
                invalid(format!(
                    "{} bytes at {offset} of a {}-byte blob",
                    dst.len(),
                    blob.size
                ))
            })?;
        if blob.blob_mem == VIRTIO_GPU_BLOB_MEM_GUEST {
            let backing = blob
                .backing
                .as_ref()
                .ok_or(RenderError::InvalidResource(resource_id))?;
            return backing.read_at(offset, dst);
        }
        let file = File::from(self.blob_fd(resource_id)?);
        file.read_exact_at(dst, offset)
            .map_err(|e| RenderError::Unspec(format!("read of blob {resource_id}: {e}")))
    }
}

/// Runs, once and before the seccomp filter is installed, what rutabaga would otherwise do
/// lazily on the first cross-domain request with a syscall the filter refuses.
///
/// Rutabaga rounds image sizes up to the page size (magma-gpu `round_up_to_page_size`),
/// which asks rustix; rustix's linux_raw backend reads the auxiliary vector on first use
/// with `prctl(PR_GET_AUXV)`, falling back to `open("/proc/self/auxv")`. Both are outside
/// the renderer's filter (prctl only for PR_SET_NAME; no open at all). The answer is cached
/// process-wide, so asking once here, through the same path, keeps the jailed renderer
/// from ever making those calls.
fn warm_up_before_jail() -> Result<(), RenderError> {
    let mut gralloc = RutabagaGralloc::new(RutabagaGrallocBackendFlags::new())
        .map_err(|e| RenderError::Unspec(format!("rutabaga gralloc: {e}")))?;
    let info = ImageAllocationInfo {
        width: 1,
        height: 1,
        drm_format: DrmFormat::new(b'X', b'R', b'2', b'4'),
        flags: RutabagaGrallocFlags::empty(),
    };
    let reqs = gralloc
        .get_image_memory_requirements(info)
        .map_err(|e| RenderError::Unspec(format!("rutabaga gralloc warm-up: {e}")))?;
    log::debug!("gralloc warm-up: a 1x1 image takes {} bytes", reqs.size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};

    use protocol::ipc::{BackingEntry, GuestRegion};

    use super::*;
    use crate::guest_memory::GuestMemory;
    use crate::test_util::{mappings_of, memfd_with};

    const W: u32 = 8;
    const H: u32 = 6;
    const STRIDE: u32 = W * 4;
    const GUEST_BASE: u64 = 0x10_0000;
    const FORMAT_B8G8R8X8: u32 = 2;

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    struct Fixture {
        renderer: RutabagaRenderer,
        fences: Arc<Mutex<Vec<FenceInfo>>>,
        memory: Arc<GuestMemory>,
        /// A second handle on the guest memory file, to play the guest writing pixels.
        guest: File,
    }

    /// A renderer and one page of "guest memory" at `GUEST_BASE`, whose byte `i` is
    /// `i % 251` (a period that no row stride divides, so misplaced rows show).
    fn fixture() -> Fixture {
        let fences = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&fences);
        let renderer = RutabagaRenderer::new(policy::limits::DEFAULT, move |f| {
            sink.lock().unwrap().push(f)
        })
        .expect("rutabaga 2D builds");
        let fd = memfd_with(0x1000, |_| 0);
        let guest = File::from(fd.try_clone().unwrap());
        let memory = GuestMemory::new(
            &[GuestRegion {
                guest_addr: GUEST_BASE,
                size: 0x1000,
                fd_offset: 0,
            }],
            vec![fd],
        )
        .unwrap();
        let pattern: Vec<u8> = (0..0x1000).map(|i| (i % 251) as u8).collect();
        guest.write_all_at(&pattern, 0).unwrap();
        Fixture {
            renderer,
            fences,
            memory: Arc::new(memory),
            guest,
        }
    }

    /// Backing of the whole packed resource, split mid-row into two guest ranges so the
    /// copy crosses an iovec boundary.
    fn backing(memory: &Arc<GuestMemory>, len: u32) -> Backing {
        let first = 50.min(len);
        let entries = [
            BackingEntry {
                addr: GUEST_BASE,
                length: first,
            },
            BackingEntry {
                addr: GUEST_BASE + u64::from(first),
                length: len - first,
            },
        ];
        memory.translate(&entries, 16, 1 << 20).unwrap()
    }

    fn with_resource(fx: &mut Fixture, id: u32) {
        fx.renderer
            .create_resource_2d(id, FORMAT_B8G8R8X8, W, H)
            .unwrap();
        let b = backing(&fx.memory, W * H * 4);
        fx.renderer.attach_backing(id, b).unwrap();
    }

    fn read_all(renderer: &mut RutabagaRenderer, id: u32) -> Vec<u8> {
        let mut out = vec![0xee; (STRIDE * H) as usize];
        renderer
            .read_rect(id, rect(0, 0, W, H), STRIDE, &mut out)
            .unwrap();
        out
    }

    fn guest_byte(i: u64) -> u8 {
        (i % 251) as u8
    }

    #[test]
    fn transfer_sub_rect_at_its_natural_offset() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        let r = rect(2, 1, 3, 2);
        let offset = u64::from(r.y * STRIDE + r.x * 4);
        fx.renderer.transfer_to_host_2d(1, r, offset).unwrap();
        let pixels = read_all(&mut fx.renderer, 1);
        for y in 0..H {
            for x in 0..W {
                let at = (y * STRIDE + x * 4) as usize;
                let inside = (2..5).contains(&x) && (1..3).contains(&y);
                for c in 0..4 {
                    let want = if inside {
                        guest_byte((at + c) as u64)
                    } else {
                        0
                    };
                    assert_eq!(pixels[at + c], want, "pixel ({x},{y}) byte {c}");
                }
            }
        }
    }

    #[test]
    fn transfer_honours_an_offset_other_than_the_natural_one() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        // The rect's first pixel comes from 7 bytes past the start of backing row 3;
        // each further row one stride later.
        let r = rect(1, 2, 4, 3);
        let offset = u64::from(3 * STRIDE + 7);
        fx.renderer.transfer_to_host_2d(1, r, offset).unwrap();
        let pixels = read_all(&mut fx.renderer, 1);
        for row in 0..3u32 {
            for col in 0..16u32 {
                let dst = ((2 + row) * STRIDE + 4 + col) as usize;
                let src = offset + u64::from(row * STRIDE + col);
                assert_eq!(pixels[dst], guest_byte(src), "row {row} byte {col}");
            }
        }
        assert_eq!(
            pixels[(2 * STRIDE) as usize..(2 * STRIDE + 4) as usize],
            [0; 4]
        );
    }

    #[test]
    fn guest_writes_after_attach_are_seen() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        fx.guest.write_all_at(&[1, 2, 3, 4], 0).unwrap();
        fx.renderer
            .transfer_to_host_2d(1, rect(0, 0, 1, 1), 0)
            .unwrap();
        assert_eq!(read_all(&mut fx.renderer, 1)[..4], [1, 2, 3, 4]);
    }

    #[test]
    fn read_rect_places_pixels_at_resource_coordinates_with_any_stride() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        fx.renderer
            .transfer_to_host_2d(1, rect(0, 0, W, H), 0)
            .unwrap();
        let stride = 64;
        let mut out = vec![0xee; (stride * H) as usize];
        fx.renderer
            .read_rect(1, rect(2, 1, 3, 2), stride, &mut out)
            .unwrap();
        for y in 0..H {
            for x in 0..(stride / 4) {
                let at = (y * stride + x * 4) as usize;
                let inside = (2..5).contains(&x) && (1..3).contains(&y);
                let want: Vec<u8> = if inside {
                    (0..4)
                        .map(|c| guest_byte(u64::from(y * STRIDE + x * 4 + c)))
                        .collect()
                } else {
                    vec![0xee; 4]
                };
                assert_eq!(out[at..at + 4], want[..], "pixel ({x},{y})");
            }
        }
    }

    #[test]
    fn unknown_ids_are_invalid_resources() {
        let mut fx = fixture();
        let b = backing(&fx.memory, 16);
        let bad = Err(RenderError::InvalidResource(9));
        assert_eq!(fx.renderer.attach_backing(9, b), bad);
        assert_eq!(fx.renderer.detach_backing(9), bad);
        assert_eq!(fx.renderer.transfer_to_host_2d(9, rect(0, 0, 1, 1), 0), bad);
        assert_eq!(
            fx.renderer.read_rect(9, rect(0, 0, 1, 1), 4, &mut [0; 4]),
            bad
        );
        assert_eq!(fx.renderer.unref(9), bad);
        assert_eq!(
            fx.renderer.create_resource_2d(0, FORMAT_B8G8R8X8, 1, 1),
            Err(RenderError::InvalidResource(0))
        );
    }

    #[test]
    fn creation_is_checked() {
        let mut fx = fixture();
        fx.renderer
            .create_resource_2d(1, FORMAT_B8G8R8X8, W, H)
            .unwrap();
        assert_eq!(
            fx.renderer.create_resource_2d(1, FORMAT_B8G8R8X8, W, H),
            Err(RenderError::InvalidResource(1))
        );
        let param = |r: Result<(), RenderError>| {
            assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
        };
        param(fx.renderer.create_resource_2d(2, 999, W, H));
        param(fx.renderer.create_resource_2d(2, FORMAT_B8G8R8X8, 0, H));
        param(fx.renderer.create_resource_2d(2, FORMAT_B8G8R8X8, 16385, 1));
        // Within the per-side limit but beyond the byte limit (16384^2 * 4 = 1 GiB is
        // exactly the default limit, so ask for a tighter one).
        let mut small = RutabagaRenderer::new(
            Limits {
                max_resource_bytes: 1 << 20,
                ..policy::limits::DEFAULT
            },
            |_| {},
        )
        .unwrap();
        let r = small.create_resource_2d(1, FORMAT_B8G8R8X8, 1024, 1024);
        assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}");
    }

    #[test]
    fn out_of_bounds_rects_are_invalid_parameters() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        let param = |r: Result<(), RenderError>| {
            assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
        };
        let r = &mut fx.renderer;
        param(r.transfer_to_host_2d(1, rect(0, 0, W + 1, 1), 0));
        param(r.transfer_to_host_2d(1, rect(W, 0, 1, 1), 0));
        param(r.transfer_to_host_2d(1, rect(0, H - 1, 1, 2), 0));
        param(r.transfer_to_host_2d(1, rect(u32::MAX, 0, 2, 1), 0));
        param(r.transfer_to_host_2d(1, rect(0, u32::MAX, 1, 2), 0));
        // Offset before the rect's own position, beyond the backing, or overflowing.
        param(r.transfer_to_host_2d(1, rect(1, 1, 1, 1), 0));
        param(r.transfer_to_host_2d(1, rect(0, 0, W, H), 1));
        param(r.transfer_to_host_2d(1, rect(0, 0, 1, 1), u64::MAX - 2));
        let mut buf = vec![0; (STRIDE * H) as usize];
        param(r.read_rect(1, rect(0, 0, W, H + 1), STRIDE, &mut buf));
        param(r.read_rect(1, rect(0, 0, W, H), STRIDE - 4, &mut buf));
        param(r.read_rect(1, rect(0, 0, W, H), STRIDE, &mut buf[1..]));
        param(r.read_rect(1, rect(0, 0, W, H), u32::MAX, &mut buf));
        // Empty rects inside the resource are fine and touch nothing.
        r.transfer_to_host_2d(1, rect(3, 3, 0, 3), 0).unwrap();
        r.read_rect(1, rect(3, 3, 5, 0), 0, &mut []).unwrap();
        param(r.transfer_to_host_2d(1, rect(3, 3, 0, 5), 0));
    }

    #[test]
    fn detach_then_transfer_fails_and_releases_guest_memory() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        assert!(mappings_of(&fx.guest) > 0, "backing keeps the mapping");
        let b = backing(&fx.memory, 16);
        assert!(matches!(
            fx.renderer.attach_backing(1, b),
            Err(RenderError::Unspec(_))
        ));
        fx.renderer.detach_backing(1).unwrap();
        assert_eq!(mappings_of(&fx.guest), 0);
        assert_eq!(
            fx.renderer.transfer_to_host_2d(1, rect(0, 0, 1, 1), 0),
            Err(RenderError::InvalidResource(1))
        );
        // A short backing: the transfer would read past its end.
        let b = backing(&fx.memory, 60);
        fx.renderer.attach_backing(1, b).unwrap();
        fx.renderer
            .transfer_to_host_2d(1, rect(0, 0, 8, 2), 0)
            .unwrap_err();
        fx.renderer
            .transfer_to_host_2d(1, rect(0, 0, 7, 1), 0)
            .unwrap();
        fx.renderer.unref(1).unwrap();
        assert_eq!(mappings_of(&fx.guest), 0);
    }

    #[test]
    fn fences_signal_at_once_and_reset_drops_everything() {
        let mut fx = fixture();
        with_resource(&mut fx, 1);
        with_resource(&mut fx, 2);
        let fence = FenceInfo {
            fence_id: 42,
            ctx_id: 0,
            ring_idx: 0,
        };
        fx.renderer.create_fence(fence).unwrap();
        assert_eq!(*fx.fences.lock().unwrap(), vec![fence]);
        fx.renderer.reset().unwrap();
        assert_eq!(mappings_of(&fx.guest), 0);
        assert_eq!(
            fx.renderer.transfer_to_host_2d(2, rect(0, 0, 1, 1), 0),
            Err(RenderError::InvalidResource(2))
        );
        // Ids are free again after a reset.
        fx.renderer
            .create_resource_2d(1, FORMAT_B8G8R8X8, 1, 1)
            .unwrap();
    }

    // --- cross-domain contexts and blobs -------------------------------------------

    const CTX: u32 = 1;
    const RING: u32 = 100;
    const XR24: u32 = u32::from_le_bytes(*b"XR24");

    fn cmd(cmd: u8, words: &[u32]) -> Vec<u8> {
        let size = 8 + 4 * words.len();
        let mut out = vec![cmd, 0, size as u8, (size >> 8) as u8, 0, 0, 0, 0];
        for w in words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// A cross-domain context whose query ring is guest page `GUEST_BASE`, initialised.
    fn cross_domain(fx: &mut Fixture) {
        fx.renderer
            .create_context(CTX, VIRTIO_GPU_CAPSET_CROSS_DOMAIN, "test")
            .unwrap();
        let ring = fx
            .memory
            .translate(
                &[BackingEntry {
                    addr: GUEST_BASE,
                    length: 0x1000,
                }],
                16,
                0x1000,
            )
            .unwrap();
        let guest_blob = BlobCreate {
            ctx_id: CTX,
            blob_mem: VIRTIO_GPU_BLOB_MEM_GUEST,
            blob_flags: 0,
            blob_id: 0,
            size: 0x1000,
        };
        fx.renderer
            .create_blob(RING, guest_blob, Some(ring))
            .unwrap();
        fx.renderer.context_attach_resource(CTX, RING).unwrap();
        fx.renderer
            .submit_3d(CTX, 0, &mut cmd(1, &[RING, 0, 0]))
            .unwrap();
    }

    /// Asks for a `w` x `h` XR24 image; returns (blob_id, size) from the query ring.
    fn image_requirements(fx: &mut Fixture, w: u32, h: u32) -> (u64, u64) {
        fx.renderer
            .submit_3d(CTX, 0, &mut cmd(2, &[w, h, XR24, 0]))
            .unwrap();
        let mut answer = [0u8; 64];
        fx.guest.read_exact_at(&mut answer, 0).unwrap();
        let stride = u32::from_le_bytes(answer[0..4].try_into().unwrap());
        assert_eq!(stride, w * 4);
        let size = u64::from_le_bytes(answer[40..48].try_into().unwrap());
        let blob_id = u32::from_le_bytes(answer[48..52].try_into().unwrap());
        let map_info = u32::from_le_bytes(answer[52..56].try_into().unwrap());
        assert_eq!(map_info, 1, "cached");
        (u64::from(blob_id), size)
    }

    fn host_blob(blob_id: u64, size: u64, flags: u32) -> BlobCreate {
        BlobCreate {
            ctx_id: CTX,
            blob_mem: VIRTIO_GPU_BLOB_MEM_HOST3D,
            blob_flags: flags,
            blob_id,
            size,
        }
    }

    #[test]
    fn capsets_are_cross_domain_only() {
        let fx = fixture();
        let r = &fx.renderer;
        assert_eq!(r.num_capsets(), NUM_CAPSETS);
        assert_eq!(NUM_CAPSETS, 1);
        assert_eq!(
            r.capset_info(0).unwrap(),
            CapsetInfo {
                capset_id: 5,
                max_version: 0,
                max_size: 16
            }
        );
        assert!(r.capset_info(1).is_err());
        assert!(r.capset_info(u32::MAX).is_err());
        // version 1, no channels, no dma-buf, no external GPU memory.
        let caps = r.capset(5, 0).unwrap();
        assert_eq!(caps, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(r.capset(5, 1).is_err());
        assert!(
            r.capset(1, 0).is_err(),
            "no virgl capset behind the default"
        );
        assert!(r.capset(0, 0).is_err());
    }

    #[test]
    fn cross_domain_blob_is_shared_memory_the_renderer_sees() {
        let mut fx = fixture();
        cross_domain(&mut fx);
        let (blob_id, size) = image_requirements(&mut fx, 64, 64);
        assert_eq!(size, 64 * 64 * 4);
        let flags = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE;
        fx.renderer
            .create_blob(7, host_blob(blob_id, size, flags), None)
            .unwrap();
        let exported = fx.renderer.export_blob(7).unwrap();
        assert_eq!((exported.size, exported.map_info), (size, 1));
        // The "VMM" writes through its fd; the renderer reads the same bytes.
        let vmm = File::from(exported.fd);
        vmm.write_all_at(b"through the window", 100).unwrap();
        let mut seen = [0u8; 18];
        fx.renderer.read_blob(7, 100, &mut seen).unwrap();
        assert_eq!(&seen, b"through the window");
        // Unmap and finalize release nothing the export needs: it can be exported again.
        fx.renderer.unmap_blob(7).unwrap();
        fx.renderer.finalize_blob(7).unwrap();
        let again = File::from(fx.renderer.export_blob(7).unwrap().fd);
        let mut seen = [0u8; 18];
        again.read_exact_at(&mut seen, 100).unwrap();
        assert_eq!(&seen, b"through the window");
        // The blob_id stays valid for further allocations of the same requirements.
        fx.renderer
            .create_blob(8, host_blob(blob_id, size, flags), None)
            .unwrap();
        assert!(fx.renderer.read_blob(7, size - 1, &mut [0; 2]).is_err());
        fx.renderer.unref(7).unwrap();
        assert_eq!(
            fx.renderer.export_blob(7).map(|_| ()),
            Err(RenderError::InvalidResource(7))
        );
    }

    #[test]
    fn blobs_are_refused_when_they_cannot_be_mapped_or_made() {
        let mut fx = fixture();
        cross_domain(&mut fx);
        let (blob_id, size) = image_requirements(&mut fx, 16, 16);
        let param = |r: Result<(), RenderError>| {
            assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
        };
        // Not MAPPABLE: created, but not exportable.
        fx.renderer
            .create_blob(7, host_blob(blob_id, size, 0), None)
            .unwrap();
        param(fx.renderer.export_blob(7).map(|_| ()));
        param(fx.renderer.unmap_blob(7));
        // A guest blob has nothing to export.
        param(fx.renderer.export_blob(RING).map(|_| ()));
        // Unknown blob_id, wrong size, no context, context 0, bad flags and memory type.
        let m = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE;
        param(fx.renderer.create_blob(9, host_blob(99, size, m), None));
        let r = fx
            .renderer
            .create_blob(9, host_blob(blob_id, size + 4096, m), None);
        assert!(r.is_err(), "{r:?}");
        param(
            fx.renderer
                .create_blob(9, host_blob(blob_id + (1 << 32), size, m), None),
        );
        let mut no_ctx = host_blob(blob_id, size, m);
        no_ctx.ctx_id = 2;
        param(fx.renderer.create_blob(9, no_ctx, None));
        no_ctx.ctx_id = 0;
        param(fx.renderer.create_blob(9, no_ctx, None));
        param(
            fx.renderer
                .create_blob(9, host_blob(blob_id, size, 8), None),
        );
        let mut bad_mem = host_blob(blob_id, size, m);
        bad_mem.blob_mem = 4;
        param(fx.renderer.create_blob(9, bad_mem, None));
        // Ids are shared with 2D resources.
        fx.renderer
            .create_resource_2d(9, FORMAT_B8G8R8X8, 1, 1)
            .unwrap();
        assert_eq!(
            fx.renderer
                .create_blob(9, host_blob(blob_id, size, m), None),
            Err(RenderError::InvalidResource(9))
        );
        assert_eq!(
            fx.renderer.export_blob(9).map(|_| ()),
            Err(RenderError::InvalidResource(9))
        );
        assert_eq!(
            fx.renderer
                .read_rect(RING, rect(0, 0, 1, 1), 4, &mut [0; 4]),
            Err(RenderError::InvalidResource(RING))
        );
        // A guest blob whose backing does not match its size.
        let short = backing(&fx.memory, 100);
        let guest = BlobCreate {
            ctx_id: 0,
            blob_mem: VIRTIO_GPU_BLOB_MEM_GUEST,
            blob_flags: 0,
            blob_id: 0,
            size: 4096,
        };
        param(fx.renderer.create_blob(10, guest, Some(short)));
        param(fx.renderer.create_blob(10, guest, None));
    }

    #[test]
    fn guest_blobs_read_from_guest_memory() {
        let mut fx = fixture();
        let b = backing(&fx.memory, 200);
        let guest = BlobCreate {
            ctx_id: 0,
            blob_mem: VIRTIO_GPU_BLOB_MEM_GUEST,
            blob_flags: VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            blob_id: 0,
            size: 200,
        };
        fx.renderer.create_blob(3, guest, Some(b)).unwrap();
        assert!(mappings_of(&fx.guest) > 0);
        // Across the split between the backing's two entries (at byte 50).
        let mut out = [0u8; 30];
        fx.renderer.read_blob(3, 40, &mut out).unwrap();
        let want: Vec<u8> = (40..70).map(guest_byte).collect();
        assert_eq!(out[..], want[..]);
        fx.guest.write_all_at(&[9, 9], 199).unwrap();
        let mut last = [0u8; 1];
        fx.renderer.read_blob(3, 199, &mut last).unwrap();
        assert_eq!(last, [9]);
        assert!(fx.renderer.read_blob(3, 199, &mut [0; 2]).is_err());
        assert!(fx.renderer.read_blob(3, u64::MAX, &mut [0; 2]).is_err());
        fx.renderer.unref(3).unwrap();
        assert_eq!(mappings_of(&fx.guest), 0);
    }

    #[test]
    fn hostile_command_streams_are_refused_before_rutabaga_sees_them() {
        let mut fx = fixture();
        cross_domain(&mut fx);
        let mut refuse = |mut bytes: Vec<u8>| {
            let r = fx.renderer.submit_3d(CTX, 0, &mut bytes);
            assert!(
                matches!(r, Err(RenderError::InvalidParameter(_))),
                "{bytes:?}: {r:?}"
            );
        };
        // cmd_size 0 would make rutabaga's loop spin forever.
        refuse(vec![3, 0, 0, 0, 0, 0, 0, 0]);
        refuse(vec![3, 0, 4, 0, 0, 0, 0, 0]);
        // cmd_size beyond the stream, a truncated header.
        refuse(vec![3, 0, 64, 0, 0, 0, 0, 0]);
        refuse(vec![3, 0, 8, 0, 0, 0, 0, 0, 3]);
        // Channels, and commands that need one (SEND would create a pipe).
        refuse(cmd(1, &[RING, RING, 1]));
        let mut send = cmd(4, &[1, 0]);
        send.resize(8 + 8 + 3 * 28 * 4, 0);
        let size = send.len() as u16;
        send[2..4].copy_from_slice(&size.to_le_bytes());
        send[16 + 28 * 4..16 + 28 * 4 + 4].copy_from_slice(&3u32.to_le_bytes());
        refuse(send);
        for other in [0u8, 5, 6, 7, 8, 9, 10, 11, 12, 13, 255] {
            refuse(cmd(other, &[0, 0]));
        }
        // An INIT too short to hold its channel type.
        refuse(cmd(1, &[RING]));
        // A good stream still runs, and POLL is a no-op.
        let mut ok = cmd(3, &[0, 0]);
        ok.extend(cmd(2, &[8, 8, XR24, 0]));
        fx.renderer.submit_3d(CTX, 0, &mut ok).unwrap();
        assert!(fx.renderer.submit_3d(2, 0, &mut cmd(3, &[0, 0])).is_err());
    }

    #[test]
    fn image_queries_and_contexts_are_bounded() {
        let mut fx = fixture();
        cross_domain(&mut fx);
        let mut many = Vec::new();
        for _ in 0..MAX_IMAGE_QUERIES_PER_CONTEXT {
            many.extend(cmd(2, &[1, 1, XR24, 0]));
        }
        // In several submissions, as a guest would: the count is per context.
        for piece in many.chunks_mut(24 * 1024) {
            fx.renderer.submit_3d(CTX, 0, piece).unwrap();
        }
        let r = fx.renderer.submit_3d(CTX, 0, &mut cmd(2, &[1, 1, XR24, 0]));
        assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}");
        for ctx in 2..=policy::limits::DEFAULT.max_contexts {
            fx.renderer.create_context(ctx, 5, "").unwrap();
        }
        let r = fx.renderer.create_context(1000, 5, "");
        assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}");
        fx.renderer.destroy_context(2).unwrap();
        fx.renderer.create_context(1000, 5, "").unwrap();
    }

    #[test]
    fn contexts_are_checked() {
        let mut fx = fixture();
        let param = |r: Result<(), RenderError>| {
            assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
        };
        param(fx.renderer.create_context(0, 5, "zero"));
        param(fx.renderer.create_context(1, 0, "no capset"));
        param(fx.renderer.create_context(1, 1, "virgl"));
        fx.renderer.create_context(1, 5 | 0x100, "flags").unwrap();
        param(fx.renderer.create_context(1, 5, "again"));
        param(fx.renderer.destroy_context(2));
        param(fx.renderer.context_attach_resource(2, 1));
        assert_eq!(
            fx.renderer.context_attach_resource(1, 9),
            Err(RenderError::InvalidResource(9))
        );
        // A 2D resource attaches (and detaches) as a no-op.
        fx.renderer
            .create_resource_2d(9, FORMAT_B8G8R8X8, 1, 1)
            .unwrap();
        fx.renderer.context_attach_resource(1, 9).unwrap();
        fx.renderer.context_detach_resource(1, 9).unwrap();
        fx.renderer.destroy_context(1).unwrap();
        param(fx.renderer.destroy_context(1));
    }

    #[test]
    fn an_unreffed_ring_is_detached_first_and_reset_drops_everything() {
        let mut fx = fixture();
        cross_domain(&mut fx);
        image_requirements(&mut fx, 4, 4);
        // The context held raw pointers into the ring's guest memory: after unref, the
        // memory is released and the context must not write there any more.
        fx.renderer.unref(RING).unwrap();
        assert_eq!(mappings_of(&fx.guest), 0);
        let r = fx.renderer.submit_3d(CTX, 0, &mut cmd(2, &[4, 4, XR24, 0]));
        assert!(r.is_err(), "{r:?}");
        // Reset: contexts and blobs go, ids are free again.
        cross_domain_again(&mut fx);
        let (blob_id, size) = image_requirements(&mut fx, 4, 4);
        fx.renderer
            .create_blob(7, host_blob(blob_id, size, 1), None)
            .unwrap();
        let exported = fx.renderer.export_blob(7).unwrap();
        fx.renderer.reset().unwrap();
        assert_eq!(mappings_of(&fx.guest), 0);
        assert!(fx.renderer.submit_3d(CTX, 0, &mut cmd(3, &[0, 0])).is_err());
        assert!(fx.renderer.export_blob(7).is_err());
        // The VMM's fd outlives the blob: its memory stays valid until the VMM lets go.
        File::from(exported.fd).write_all_at(&[1], 0).unwrap();
        cross_domain(&mut fx);
    }

    /// `cross_domain` again, on a fixture whose context `CTX` already exists.
    fn cross_domain_again(fx: &mut Fixture) {
        fx.renderer.destroy_context(CTX).unwrap();
        cross_domain(fx);
    }
}
