//! The virgl backend: virglrenderer (0.10.4 on Debian 12) headless on EGL, Mesa llvmpipe
//! without a GPU. It serves 2D commands too (2D resources are virgl textures, as in QEMU's
//! virgl mode), so a guest gets one renderer for everything; rutabaga's cross-domain is
//! not available in this mode.
//!
//! Fences are asynchronous: virglrenderer reports them from `virgl_renderer_poll`, which
//! the executor calls through [`Renderer::poll_fences`] while any is pending.

mod ffi;

use std::collections::{BTreeMap, BTreeSet};

use protocol::config::Limits;
use protocol::ipc::{FenceInfo, RenderError, Resource3d, Transfer3d};
use protocol::virtio_gpu::{
    Rect, VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_CAPSET_DRM, VIRTIO_GPU_CAPSET_VIRGL,
    VIRTIO_GPU_CAPSET_VIRGL2,
};
use virglrenderer_sys as sys;

use crate::backend::{BlobCreate, CapsetInfo, ExportedBlob, Renderer, BYTES_PER_PIXEL};
use crate::geometry::check_rect_inside;
use crate::guest_memory::Backing;

pub use ffi::VirglError;
use ffi::{Signaled, Virgl, VirglBox};

/// The capsets this backend may offer, in GET_CAPSET_INFO index order; each only when the
/// library reports it (a version above 0). DRM native contexts need a virglrenderer built
/// with them and GPU hardware; Venus is left out: it needs virglrenderer's render server
/// (a process of its own, which would need a jail of its own).
pub const VIRGL_CAPSETS: [u32; 3] = [
    VIRTIO_GPU_CAPSET_VIRGL,
    VIRTIO_GPU_CAPSET_VIRGL2,
    VIRTIO_GPU_CAPSET_DRM,
];

/// PIPE_TEXTURE_2D: the target of 2D resources.
const PIPE_TEXTURE_2D: u32 = 2;
/// PIPE_TEXTURE_3D: depth is an extent that shrinks with the mip level.
const PIPE_TEXTURE_3D: u32 = 3;
/// PIPE_TEXTURE_1D_ARRAY: the layers are the rows.
const PIPE_TEXTURE_1D_ARRAY: u32 = 6;
/// VIRGL_BIND_RENDER_TARGET: what a 2D resource is bound as (QEMU does the same).
const VIRGL_BIND_RENDER_TARGET: u32 = 1 << 1;
/// VIRTIO_GPU_RESOURCE_FLAG_Y_0_TOP: 2D resources have their first row on top.
const Y_0_TOP: u32 = 1;
/// Longest context debug name passed on.
const MAX_CONTEXT_NAME: usize = 64;

/// A live resource.
#[derive(Debug)]
struct Resource {
    /// Width and height (pixels) for textures, used to bound readbacks.
    width: u32,
    height: u32,
    /// The shape it was created with (2D resources: a 2D texture), to bound transfers.
    shape: Resource3d,
    /// Whether it is a blob.
    blob: bool,
    /// The backing and the iovec array virglrenderer holds a pointer to: both must live,
    /// unmoved, until the library lets go of them (detach or unref).
    backing: Option<(Backing, Vec<libc::iovec>)>,
}

/// The virgl renderer.
pub struct VirglRenderer {
    virgl: Virgl,
    limits: Limits,
    capsets: Vec<CapsetInfo>,
    resources: BTreeMap<u32, Resource>,
    contexts: BTreeSet<u32>,
    on_fence: Box<dyn Fn(FenceInfo) + Send + Sync>,
    /// Context-0 fences by the 32-bit id virglrenderer carries for them.
    global_fences: BTreeMap<u32, FenceInfo>,
    next_global: u32,
    /// Context fences not yet signalled.
    context_fences: BTreeSet<(u32, u8, u64)>,
}

impl std::fmt::Debug for VirglRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirglRenderer")
            .field("capsets", &self.capsets)
            .field("resources", &self.resources.len())
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

fn unspec(e: VirglError) -> RenderError {
    RenderError::Unspec(e.to_string())
}

fn invalid(e: VirglError) -> RenderError {
    RenderError::InvalidParameter(e.to_string())
}

fn to_box(rect: &Rect) -> VirglBox {
    VirglBox {
        x: rect.x,
        y: rect.y,
        z: 0,
        w: rect.width,
        h: rect.height,
        d: 1,
    }
}

fn box_of(t: &Transfer3d) -> VirglBox {
    VirglBox {
        x: t.bbox.x,
        y: t.bbox.y,
        z: t.bbox.z,
        w: t.bbox.w,
        h: t.bbox.h,
        d: t.bbox.d,
    }
}

impl VirglRenderer {
    /// Initialises virglrenderer, on `render_node` when given (else surfaceless: Mesa's
    /// software rasteriser); `on_fence` is called for each signalled fence, from
    /// [`Renderer::create_fence`] or [`Renderer::poll_fences`].
    ///
    /// Mesa's shader cache must be off (`MESA_SHADER_CACHE_DISABLE=true` in the process
    /// environment before this): it would write files under the user's cache directory,
    /// which a jailed renderer cannot open.
    pub fn new(
        limits: Limits,
        render_node: Option<std::os::fd::OwnedFd>,
        on_fence: impl Fn(FenceInfo) + Send + Sync + 'static,
    ) -> Result<Self, VirglError> {
        let virgl = Virgl::init(render_node)?;
        let capsets = VIRGL_CAPSETS
            .iter()
            .map(|&id| {
                let (max_version, max_size) = virgl.capset_info(id);
                CapsetInfo {
                    capset_id: id,
                    max_version,
                    max_size,
                }
            })
            .filter(|c| c.max_version > 0 && c.max_size > 0)
            .collect();
        Ok(VirglRenderer {
            virgl,
            limits,
            capsets,
            resources: BTreeMap::new(),
            contexts: BTreeSet::new(),
            on_fence: Box::new(on_fence),
            global_fences: BTreeMap::new(),
            next_global: 1,
            context_fences: BTreeSet::new(),
        })
    }

    fn resource(&self, resource_id: u32) -> Result<&Resource, RenderError> {
        self.resources
            .get(&resource_id)
            .ok_or(RenderError::InvalidResource(resource_id))
    }

    fn context(&self, ctx_id: u32) -> Result<(), RenderError> {
        if self.contexts.contains(&ctx_id) {
            Ok(())
        } else {
            Err(RenderError::InvalidParameter(format!(
                "no context {ctx_id}"
            )))
        }
    }

    fn new_id(&self, resource_id: u32) -> Result<(), RenderError> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(RenderError::InvalidResource(resource_id));
        }
        Ok(())
    }

    /// Checks a 3D transfer's box against the resource's shape at the transfer's mip level.
    /// virglrenderer checks too, but a transfer it refuses in a context marks that whole
    /// context as failed, and every later submit to it is silently dropped. (The bytes
    /// against the backing depend on the format; those virglrenderer checks alone.)
    fn check_transfer(&self, resource_id: u32, t: &Transfer3d) -> Result<(), RenderError> {
        let r = self.resource(resource_id)?;
        if r.blob || r.backing.is_none() {
            return Err(RenderError::InvalidParameter(format!(
                "resource {resource_id} has no backing to transfer with"
            )));
        }
        let s = &r.shape;
        if t.level > s.last_level || t.level >= 32 {
            return Err(RenderError::InvalidParameter(format!(
                "mip level {} of a resource with {} levels",
                t.level,
                u64::from(s.last_level) + 1
            )));
        }
        let at_level = |extent: u32| (extent >> t.level).max(1);
        let (rows, layers) = match s.target {
            PIPE_TEXTURE_1D_ARRAY => (s.array_size, 1),
            PIPE_TEXTURE_3D => (at_level(s.height), at_level(s.depth)),
            _ => (at_level(s.height), s.array_size.max(1)),
        };
        let b = &t.bbox;
        let inside = |start: u32, len: u32, extent: u32| {
            start.checked_add(len).is_some_and(|end| end <= extent)
        };
        if !(inside(b.x, b.w, at_level(s.width))
            && inside(b.y, b.h, rows)
            && inside(b.z, b.d, layers))
        {
            return Err(RenderError::InvalidParameter(format!(
                "box {b:?} outside level {} of resource {resource_id}",
                t.level
            )));
        }
        Ok(())
    }

    /// Lets go of a resource's backing in virglrenderer, then drops ours.
    fn detach(&mut self, resource_id: u32) {
        if let Some(r) = self.resources.get_mut(&resource_id) {
            if r.backing.take().is_some() {
                self.virgl.detach_iov(resource_id);
            }
        }
    }

    /// Reports fences virglrenderer signalled; a fence signals every earlier one of its
    /// ring too (virtio-gpu fences are ordered per ring).
    fn retire(&mut self, signaled: Vec<Signaled>) {
        for s in signaled {
            match s {
                Signaled::Global(id) => {
                    if let Some(fence) = self.global_fences.remove(&id) {
                        (self.on_fence)(fence);
                    } else {
                        log::debug!("virgl signalled unknown global fence {id}");
                    }
                }
                Signaled::Context {
                    ctx_id,
                    ring_idx,
                    fence_id,
                } => {
                    let Ok(ring) = u8::try_from(ring_idx) else {
                        continue;
                    };
                    let done: Vec<_> = self
                        .context_fences
                        .range((ctx_id, ring, 0)..=(ctx_id, ring, fence_id))
                        .copied()
                        .collect();
                    for key in done {
                        self.context_fences.remove(&key);
                        (self.on_fence)(FenceInfo {
                            fence_id: key.2,
                            ctx_id: key.0,
                            ring_idx: key.1,
                        });
                    }
                }
            }
        }
    }

    /// Signals every pending fence of `ctx_id` (all of them for `None`): the work they
    /// waited for is gone, and a guest must not wait forever.
    fn flush_fences(&mut self, ctx_id: Option<u32>) {
        let gone: Vec<_> = self
            .context_fences
            .iter()
            .filter(|k| ctx_id.is_none_or(|c| k.0 == c))
            .copied()
            .collect();
        for key in gone {
            self.context_fences.remove(&key);
            (self.on_fence)(FenceInfo {
                fence_id: key.2,
                ctx_id: key.0,
                ring_idx: key.1,
            });
        }
        if ctx_id.is_none() {
            for (_, fence) in std::mem::take(&mut self.global_fences) {
                (self.on_fence)(fence);
            }
        }
    }
}

impl Renderer for VirglRenderer {
    fn create_resource_2d(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(), RenderError> {
        self.new_id(resource_id)?;
        crate::geometry::check_new_2d(format, width, height, self.limits.max_dimension)?;
        // virtio-gpu's 2D formats are numbered as virgl's own.
        let mut args = sys::virgl_renderer_resource_create_args {
            handle: resource_id,
            target: PIPE_TEXTURE_2D,
            format,
            bind: VIRGL_BIND_RENDER_TARGET,
            width,
            height,
            depth: 1,
            array_size: 1,
            last_level: 0,
            nr_samples: 0,
            flags: Y_0_TOP,
        };
        self.virgl.resource_create(&mut args).map_err(invalid)?;
        self.resources.insert(
            resource_id,
            Resource {
                width,
                height,
                shape: Resource3d {
                    target: PIPE_TEXTURE_2D,
                    width,
                    height,
                    depth: 1,
                    array_size: 1,
                    ..Resource3d::default()
                },
                blob: false,
                backing: None,
            },
        );
        Ok(())
    }

    fn create_resource_3d(&mut self, resource_id: u32, a: Resource3d) -> Result<(), RenderError> {
        self.new_id(resource_id)?;
        let mut args = sys::virgl_renderer_resource_create_args {
            handle: resource_id,
            target: a.target,
            format: a.format,
            bind: a.bind,
            width: a.width,
            height: a.height,
            depth: a.depth,
            array_size: a.array_size,
            last_level: a.last_level,
            nr_samples: a.nr_samples,
            flags: a.flags,
        };
        // virglrenderer validates target, format, bind and sizes itself.
        self.virgl.resource_create(&mut args).map_err(invalid)?;
        self.resources.insert(
            resource_id,
            Resource {
                width: a.width,
                height: a.height,
                shape: a,
                blob: false,
                backing: None,
            },
        );
        Ok(())
    }

    fn unref(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.resource(resource_id)?;
        self.detach(resource_id);
        self.virgl.resource_unref(resource_id);
        self.resources.remove(&resource_id);
        Ok(())
    }

    fn attach_backing(&mut self, resource_id: u32, backing: Backing) -> Result<(), RenderError> {
        let r = self.resource(resource_id)?;
        if r.blob {
            return Err(RenderError::InvalidParameter(format!(
                "resource {resource_id} is a blob"
            )));
        }
        if r.backing.is_some() {
            self.detach(resource_id);
        }
        let mut iovecs = ffi::to_iovecs(backing.iovecs());
        // SAFETY: `iovecs` and `backing` (which keeps the memory mapped) are stored in the
        // resource right below and dropped only after `detach_iov` / `resource_unref`.
        unsafe { self.virgl.attach_iov(resource_id, &mut iovecs) }.map_err(unspec)?;
        if let Some(r) = self.resources.get_mut(&resource_id) {
            r.backing = Some((backing, iovecs));
        }
        Ok(())
    }

    fn detach_backing(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.resource(resource_id)?;
        self.detach(resource_id);
        Ok(())
    }

    fn transfer_to_host_2d(
        &mut self,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<(), RenderError> {
        let r = self.resource(resource_id)?;
        check_rect_inside(&rect, r.width, r.height)?;
        if r.backing.is_none() {
            return Err(RenderError::InvalidParameter(format!(
                "resource {resource_id} has no backing"
            )));
        }
        self.virgl
            .transfer_write(resource_id, 0, 0, 0, 0, to_box(&rect), offset)
            .map_err(invalid)
    }

    fn transfer_to_host_3d(&mut self, resource_id: u32, t: Transfer3d) -> Result<(), RenderError> {
        self.check_transfer(resource_id, &t)?;
        self.virgl
            .transfer_write(
                resource_id,
                t.ctx_id,
                t.level,
                t.stride,
                t.layer_stride,
                box_of(&t),
                t.offset,
            )
            .map_err(invalid)
    }

    fn transfer_from_host_3d(
        &mut self,
        resource_id: u32,
        t: Transfer3d,
    ) -> Result<(), RenderError> {
        self.check_transfer(resource_id, &t)?;
        self.virgl
            .transfer_read(
                resource_id,
                t.ctx_id,
                t.level,
                t.stride,
                t.layer_stride,
                box_of(&t),
                t.offset,
                None,
            )
            .map_err(invalid)
    }

    fn read_rect(
        &mut self,
        resource_id: u32,
        rect: Rect,
        stride: u32,
        dst: &mut [u8],
    ) -> Result<(), RenderError> {
        let r = self.resource(resource_id)?;
        check_rect_inside(&rect, r.width, r.height)?;
        if rect.width == 0 || rect.height == 0 {
            return Ok(());
        }
        // The last byte written is that of the rect's bottom-right pixel (the rect is
        // inside the resource, so neither edge overflows; the products are checked).
        let row_end = u64::from(rect.x + rect.width) * u64::from(BYTES_PER_PIXEL);
        let end = u64::from(rect.y + rect.height - 1)
            .checked_mul(u64::from(stride))
            .and_then(|last_row| last_row.checked_add(row_end));
        if row_end > u64::from(stride) || end.is_none_or(|end| end > dst.len() as u64) {
            return Err(RenderError::InvalidParameter(format!(
                "rect does not fit a {}-byte buffer of stride {stride}",
                dst.len()
            )));
        }
        let offset =
            u64::from(rect.y) * u64::from(stride) + u64::from(rect.x) * u64::from(BYTES_PER_PIXEL);
        self.virgl
            .transfer_read(
                resource_id,
                0,
                0,
                stride,
                0,
                to_box(&rect),
                offset,
                Some(dst),
            )
            .map_err(unspec)
    }

    fn create_fence(&mut self, fence: FenceInfo) -> Result<(), RenderError> {
        if fence.ctx_id != 0 && self.contexts.contains(&fence.ctx_id) {
            self.virgl
                .context_create_fence(fence.ctx_id, u32::from(fence.ring_idx), fence.fence_id)
                .map_err(unspec)?;
            self.context_fences
                .insert((fence.ctx_id, fence.ring_idx, fence.fence_id));
        } else {
            // 2D commands and commands of contexts virgl does not know (the executor has
            // already refused those) go on context 0's timeline.
            let id = self.next_global;
            self.next_global = self.next_global.wrapping_add(1).max(1);
            self.virgl.create_fence(id).map_err(unspec)?;
            self.global_fences.insert(id, fence);
        }
        // llvmpipe has usually finished already: report at once when it has.
        let signaled = self.virgl.poll();
        self.retire(signaled);
        Ok(())
    }

    fn poll_fences(&mut self) -> bool {
        if self.global_fences.is_empty() && self.context_fences.is_empty() {
            return false;
        }
        let signaled = self.virgl.poll();
        self.retire(signaled);
        !(self.global_fences.is_empty() && self.context_fences.is_empty())
    }

    fn reset(&mut self) -> Result<(), RenderError> {
        for ctx_id in std::mem::take(&mut self.contexts) {
            self.virgl.context_destroy(ctx_id);
        }
        let ids: Vec<u32> = self.resources.keys().copied().collect();
        for id in ids {
            self.detach(id);
            self.virgl.resource_unref(id);
        }
        self.resources.clear();
        self.flush_fences(None);
        Ok(())
    }

    fn num_capsets(&self) -> u32 {
        self.capsets.len() as u32
    }

    fn capset_info(&self, index: u32) -> Result<CapsetInfo, RenderError> {
        self.capsets
            .get(index as usize)
            .copied()
            .ok_or_else(|| RenderError::InvalidParameter(format!("capset index {index}")))
    }

    fn capset(&self, capset_id: u32, version: u32) -> Result<Vec<u8>, RenderError> {
        let info = self
            .capsets
            .iter()
            .find(|c| c.capset_id == capset_id)
            .ok_or_else(|| RenderError::InvalidParameter(format!("capset {capset_id}")))?;
        if version > info.max_version {
            return Err(RenderError::InvalidParameter(format!(
                "capset {capset_id} version {version} (at most {})",
                info.max_version
            )));
        }
        let mut data = vec![0u8; info.max_size as usize];
        self.virgl.fill_caps(capset_id, version, &mut data);
        Ok(data)
    }

    fn create_context(
        &mut self,
        ctx_id: u32,
        context_init: u32,
        name: &str,
    ) -> Result<(), RenderError> {
        if ctx_id == 0 || self.contexts.contains(&ctx_id) {
            return Err(RenderError::InvalidParameter(format!(
                "context id {ctx_id}"
            )));
        }
        // The low byte is the capset; 0 (no context_init) is a VIRGL context.
        let capset = context_init & 0xff;
        if capset != 0 && !self.capsets.iter().any(|c| c.capset_id == capset) {
            return Err(RenderError::InvalidParameter(format!(
                "capset {capset} is not available with virgl here"
            )));
        }
        let name = &name.as_bytes()[..name.len().min(MAX_CONTEXT_NAME)];
        self.virgl
            .context_create(ctx_id, capset, name)
            .map_err(unspec)?;
        self.contexts.insert(ctx_id);
        Ok(())
    }

    fn destroy_context(&mut self, ctx_id: u32) -> Result<(), RenderError> {
        self.context(ctx_id)?;
        self.virgl.context_destroy(ctx_id);
        self.contexts.remove(&ctx_id);
        self.flush_fences(Some(ctx_id));
        Ok(())
    }

    fn context_attach_resource(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
    ) -> Result<(), RenderError> {
        self.context(ctx_id)?;
        self.resource(resource_id)?;
        self.virgl.ctx_attach_resource(ctx_id, resource_id);
        Ok(())
    }

    fn context_detach_resource(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
    ) -> Result<(), RenderError> {
        self.context(ctx_id)?;
        self.resource(resource_id)?;
        self.virgl.ctx_detach_resource(ctx_id, resource_id);
        Ok(())
    }

    fn submit_3d(
        &mut self,
        ctx_id: u32,
        _ring_idx: u8,
        commands: &mut [u8],
    ) -> Result<(), RenderError> {
        self.context(ctx_id)?;
        // The frontend checked this too; a badly framed stream would make virglrenderer
        // drop the whole context silently (see protocol::virgl).
        protocol::virgl::check(commands)
            .map_err(|e| RenderError::InvalidParameter(e.to_string()))?;
        self.virgl.submit(ctx_id, commands).map_err(invalid)
    }

    fn create_blob(
        &mut self,
        resource_id: u32,
        create: BlobCreate,
        backing: Option<Backing>,
    ) -> Result<(), RenderError> {
        self.new_id(resource_id)?;
        if create.blob_mem != VIRTIO_GPU_BLOB_MEM_GUEST {
            self.context(create.ctx_id)?;
        }
        let iovecs = backing
            .as_ref()
            .map(|b| ffi::to_iovecs(b.iovecs()))
            .unwrap_or_default();
        let args = sys::virgl_renderer_resource_create_blob_args {
            res_handle: resource_id,
            ctx_id: create.ctx_id,
            blob_mem: create.blob_mem,
            blob_flags: create.blob_flags,
            blob_id: create.blob_id,
            size: create.size,
            iovecs: iovecs.as_ptr().cast(),
            num_iovs: iovecs.len() as u32,
        };
        // SAFETY: `iovecs` and `backing` move into the resource entry below (a Vec's heap
        // buffer does not move with it) and live until unref.
        unsafe { self.virgl.create_blob(&args) }.map_err(invalid)?;
        self.resources.insert(
            resource_id,
            Resource {
                width: 0,
                height: 0,
                shape: Resource3d::default(),
                blob: true,
                backing: backing.map(|b| (b, iovecs)),
            },
        );
        Ok(())
    }

    fn export_blob(&mut self, resource_id: u32) -> Result<ExportedBlob, RenderError> {
        let r = self.resource(resource_id)?;
        if !r.blob {
            return Err(RenderError::InvalidParameter(format!(
                "resource {resource_id} is not a blob"
            )));
        }
        let (fd, kind) = self.virgl.export_blob(resource_id).map_err(|e| {
            RenderError::Unspec(format!(
                "blob {resource_id} cannot be exported as a descriptor ({e}); it is never \
                 mapped through a pointer"
            ))
        })?;
        let map_info = self.virgl.map_info(resource_id).map_err(unspec)?;
        let size = nix::sys::stat::fstat(&fd)
            .map(|st| st.st_size as u64)
            .map_err(|e| RenderError::Unspec(format!("exported blob (fd type {kind}): {e}")))?;
        Ok(ExportedBlob { fd, size, map_info })
    }

    fn unmap_blob(&mut self, resource_id: u32) -> Result<(), RenderError> {
        // Never mapped by this process: only the VMM holds the exported descriptor.
        self.resource(resource_id).map(|_| ())
    }

    fn finalize_blob(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.resource(resource_id).map(|_| ())
    }

    fn read_blob(
        &mut self,
        resource_id: u32,
        offset: u64,
        dst: &mut [u8],
    ) -> Result<(), RenderError> {
        let r = self.resource(resource_id)?;
        let Some((backing, _)) = r.backing.as_ref().filter(|_| r.blob) else {
            return Err(RenderError::InvalidParameter(format!(
                "blob {resource_id} has no guest backing to read"
            )));
        };
        backing.read_at(offset, dst)
    }
}
