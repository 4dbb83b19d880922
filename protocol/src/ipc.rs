//! Typed messages between the device-frontend and the renderer-worker.
//!
//! The frontend is the more trusted side: it validates every guest command against its own
//! resource table before anything reaches the renderer, and it validates every reply (ids,
//! sizes) before acting on it. Requests are handled by the renderer strictly in order, and
//! each request gets exactly one [`RendererEvent::Reply`] carrying the request's `seq`.

use serde::{Deserialize, Serialize};

use crate::lane::FdTicket;
use crate::virtio_gpu::Rect;

/// One guest memory region as the VMM described it in `VHOST_USER_SET_MEM_TABLE`.
///
/// The region's fd travels on the descriptor lane; `fd_offset` is where the region starts
/// inside that fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the first byte inside the region's fd.
    pub fd_offset: u64,
}

/// One scatter-gather entry of a resource's backing store, in guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingEntry {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
}

/// A fence the renderer must create after the request's operation has been executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceInfo {
    /// The guest's fence id (monotonic per ring).
    pub fence_id: u64,
    /// Context the fence belongs to (0 for 2D).
    pub ctx_id: u32,
    /// Ring index inside the context (0 unless VIRTIO_GPU_FLAG_INFO_RING_IDX).
    pub ring_idx: u8,
}

/// Where a blob scanout's framebuffer lies inside its blob (plane 0 of SET_SCANOUT_BLOB,
/// 4 bytes per pixel): pixel (x, y) is at byte `offset + y * stride + x * 4` of the blob.
/// The frontend has checked that the whole framebuffer lies inside the blob; the renderer
/// bounds-checks every row it copies again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobScanout {
    /// Byte offset of the framebuffer's first pixel in the blob.
    pub offset: u64,
    /// Bytes per row in the blob (at least `width * 4`).
    pub stride: u32,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Framebuffer height in pixels.
    pub height: u32,
}

/// What the frontend sends the renderer in one message: every request one batch of
/// input (a queue kick, a memory table, an ack) made, in order. One message and one
/// wake-up of the renderer per batch instead of per command.
pub type RendererBatch = Vec<RendererRequest>;

/// A request from the frontend to the renderer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RendererRequest {
    /// Sequence number; the reply echoes it. Strictly increasing.
    pub seq: u64,
    /// What to do.
    pub op: RendererOp,
    /// A fence to create once `op` has been executed, if the guest asked for one.
    pub fence: Option<FenceInfo>,
    /// Reply only if `op` is refused. For operations the frontend has already answered
    /// (its own checks decided the outcome): a success changes nothing there, so the
    /// renderer neither serialises a reply nor wakes the frontend for it. The frontend
    /// learns that a quiet request succeeded from the next reply, to any later request
    /// (replies come in `seq` order). Never set together with `fence`.
    pub quiet: bool,
}

/// Operations the renderer executes. Every id and rectangle has already been validated by
/// the frontend; the renderer checks again and answers with an error, never a panic.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RendererOp {
    /// Replace the guest memory map. One fd per region arrives on the lane under `fds`,
    /// in the order of `regions`. Resources keep the mapping they were attached with.
    SetGuestMemory {
        /// Regions, in the order of their fds.
        regions: Vec<GuestRegion>,
        /// Where the region fds are on the lane.
        fds: FdTicket,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_2D.
    CreateResource2d {
        /// Guest-chosen resource id (never 0).
        resource_id: u32,
        /// VIRTIO_GPU_FORMAT_* value.
        format: u32,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_UNREF.
    Unref {
        /// Resource to destroy.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING: entries are guest physical ranges that the
    /// frontend has checked to lie inside guest memory.
    AttachBacking {
        /// Resource to attach to.
        resource_id: u32,
        /// Scatter-gather list in guest physical addresses.
        entries: Vec<BackingEntry>,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING.
    DetachBacking {
        /// Resource to detach from.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D: copy `rect` from the backing (starting at byte
    /// `offset` of the backing) into the resource.
    TransferToHost2d {
        /// Destination resource.
        resource_id: u32,
        /// Rectangle inside the resource.
        rect: Rect,
        /// Offset in the backing of the rectangle's first pixel.
        offset: u64,
    },
    /// Bind a frontend-allocated, sealed memfd as the pixel buffer of a scanout. The buffer
    /// holds the whole resource at resource coordinates, `stride` bytes per row.
    SetScanoutBuffer {
        /// Scanout index.
        scanout_id: u32,
        /// Resource shown on it.
        resource_id: u32,
        /// Buffer size in bytes (stride * resource height).
        size: u64,
        /// Bytes per row.
        stride: u32,
        /// The memfd, on the lane.
        fds: FdTicket,
    },
    /// Bind a frontend-allocated, sealed memfd as the pixel buffer of a scanout showing a
    /// blob (SET_SCANOUT_BLOB). The buffer holds the whole `layout.width` x `layout.height`
    /// framebuffer packed (`layout.width * 4` bytes per row, framebuffer coordinates);
    /// [`RendererOp::FlushToScanout`] then copies each row of its rect out of the blob
    /// according to `layout`. Replaces any previous buffer of the scanout.
    SetScanoutBlobBuffer {
        /// Scanout index.
        scanout_id: u32,
        /// Blob resource shown on it.
        resource_id: u32,
        /// Where the framebuffer (plane 0) lies in the blob.
        layout: BlobScanout,
        /// Buffer size in bytes (`layout.width * 4 * layout.height`).
        size: u64,
        /// The memfd, on the lane.
        fds: FdTicket,
    },
    /// Unbind and unmap a scanout's buffer (SET_SCANOUT with resource 0).
    DisableScanout {
        /// Scanout index.
        scanout_id: u32,
    },
    /// Copy `rect` (resource coordinates; framebuffer coordinates for a blob scanout) of
    /// the scanout's resource into its buffer.
    FlushToScanout {
        /// Scanout index.
        scanout_id: u32,
        /// Damage rectangle, already clipped to the scanout.
        rect: Rect,
    },
    /// Read a 64x64 cursor resource's pixels (answered with [`ReplyBody::CursorImage`]).
    ReadCursor {
        /// Cursor resource.
        resource_id: u32,
    },
    /// Device reset: drop every resource, scanout buffer and guest mapping.
    Reset,
    /// VIRTIO_GPU_CMD_CTX_CREATE: a rendering context of the capability set in the low
    /// byte of `context_init` (VIRTIO_GPU_F_CONTEXT_INIT), e.g. cross-domain.
    CreateContext {
        /// Guest-chosen context id (never 0).
        ctx_id: u32,
        /// The guest's context_init field (capset id in bits 0..8).
        context_init: u32,
        /// Debug name, at most 64 bytes, not trusted to be UTF-8.
        name: Vec<u8>,
    },
    /// VIRTIO_GPU_CMD_CTX_DESTROY.
    DestroyContext {
        /// Context to destroy.
        ctx_id: u32,
    },
    /// VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE.
    AttachResource {
        /// Context.
        ctx_id: u32,
        /// Resource made visible to it.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE.
    DetachResource {
        /// Context.
        ctx_id: u32,
        /// Resource withdrawn from it.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_SUBMIT_3D: opaque bytes for the context's own protocol.
    Submit3d {
        /// Context.
        ctx_id: u32,
        /// Ring of the context (0 unless VIRTIO_GPU_FLAG_INFO_RING_IDX).
        ring_idx: u8,
        /// The command stream, copied out of guest memory (bounded by the frontend).
        commands: Vec<u8>,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_3D (virgl renderer only).
    CreateResource3d {
        /// Guest-chosen resource id (never 0).
        resource_id: u32,
        /// What to create.
        args: Resource3d,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D: from the backing into the resource.
    TransferToHost3d {
        /// The resource.
        resource_id: u32,
        /// Where.
        transfer: Transfer3d,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D: from the resource into its backing (guest
    /// memory).
    TransferFromHost3d {
        /// The resource.
        resource_id: u32,
        /// Where.
        transfer: Transfer3d,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB.
    CreateBlob {
        /// Context that owns the blob (0 for BLOB_MEM_GUEST).
        ctx_id: u32,
        /// Guest-chosen resource id (never 0).
        resource_id: u32,
        /// VIRTIO_GPU_BLOB_MEM_*.
        blob_mem: u32,
        /// VIRTIO_GPU_BLOB_FLAG_*.
        blob_flags: u32,
        /// Context-specific id naming the host allocation (HOST3D*).
        blob_id: u64,
        /// Size in bytes.
        size: u64,
        /// Guest backing (BLOB_MEM_GUEST and HOST3D_GUEST), checked against guest memory.
        entries: Vec<BackingEntry>,
    },
    /// Export a mappable blob for RESOURCE_MAP_BLOB; answered with
    /// [`ReplyBody::MapReady`] and the fd on the lane.
    Map {
        /// Blob to export.
        resource_id: u32,
    },
    /// The VMM is taking the blob out of the guest's window; answered with
    /// [`ReplyBody::UnmapAck`] once the renderer holds no CPU access of its own to it.
    Unmap {
        /// Blob being unmapped.
        resource_id: u32,
    },
    /// Both sides have acknowledged the unmap: release the renderer's mapping state;
    /// answered with [`ReplyBody::FinalizeAck`].
    Finalize {
        /// Blob whose unmap is complete.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_GET_CAPSET_INFO: answered with [`ReplyBody::CapsetInfo`].
    GetCapsetInfo {
        /// Capset index, below the device's num_capsets.
        index: u32,
    },
    /// VIRTIO_GPU_CMD_GET_CAPSET: answered with [`ReplyBody::Capset`].
    GetCapset {
        /// Capset id.
        capset_id: u32,
        /// Version asked for.
        version: u32,
    },
    /// Test only (cargo feature `test-hooks`, never in a default build): the renderer
    /// really makes the forbidden system call `which`, so that a test can watch its
    /// seccomp filter kill it and the broker report that.
    #[cfg(feature = "test-hooks")]
    TestForbiddenSyscall {
        /// The call to make.
        which: ForbiddenSyscall,
    },
}

/// Environment variable (read by the device-frontend at start-up, only in a build with the
/// `test-hooks` feature): `open`, `socket` or `exec` makes the frontend send
/// [`RendererOp::TestForbiddenSyscall`] when the first guest command arrives.
#[cfg(feature = "test-hooks")]
pub const TEST_FORBIDDEN_ENV: &str = "VGPU_SANDBOX_TEST_FORBIDDEN";

/// A system call that no renderer filter allows (test-only, feature `test-hooks`).
#[cfg(feature = "test-hooks")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForbiddenSyscall {
    /// `open("/etc/hostname", O_RDONLY)` (glibc makes it an `openat`).
    OpenFile,
    /// `socket(AF_INET, SOCK_STREAM, 0)`.
    CreateSocket,
    /// `execve("/bin/true")`.
    Exec,
}

#[cfg(feature = "test-hooks")]
impl ForbiddenSyscall {
    /// Parses the value of [`TEST_FORBIDDEN_ENV`]: `open`, `socket` or `exec`.
    pub fn from_env_value(value: &str) -> Option<Self> {
        match value {
            "open" => Some(ForbiddenSyscall::OpenFile),
            "socket" => Some(ForbiddenSyscall::CreateSocket),
            "exec" => Some(ForbiddenSyscall::Exec),
            _ => None,
        }
    }
}

/// The arguments of VIRTIO_GPU_CMD_RESOURCE_CREATE_3D (a virgl resource), as the guest
/// gave them; the frontend has bounded the sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource3d {
    /// PIPE_TEXTURE_* / PIPE_BUFFER target.
    pub target: u32,
    /// VIRGL_FORMAT_*.
    pub format: u32,
    /// VIRGL_BIND_* flags.
    pub bind: u32,
    /// Width in pixels (bytes for a buffer).
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Depth (3D textures).
    pub depth: u32,
    /// Array layers.
    pub array_size: u32,
    /// Highest mip level.
    pub last_level: u32,
    /// Samples per pixel (0 or 1: none).
    pub nr_samples: u32,
    /// VIRTIO_GPU_RESOURCE_FLAG_*.
    pub flags: u32,
}

impl Resource3d {
    /// Bytes per texel a texture is charged at: the widest format (four 32-bit channels),
    /// since only the renderer knows the real one and no format may get past the budget.
    pub const CHARGED_BYTES_PER_TEXEL: u64 = 16;

    /// Whether it is a buffer (PIPE_BUFFER), whose width is in bytes.
    pub fn is_buffer(&self) -> bool {
        self.target == crate::virtio_gpu::PIPE_BUFFER
    }

    /// Whether every extent is at least 1 and within `max_dimension`; a buffer's width is
    /// a byte count, bounded by the memory budget instead (vertex buffers of megabytes
    /// are ordinary).
    pub fn extents_within(&self, max_dimension: u32) -> bool {
        let width_max = if self.is_buffer() {
            u32::MAX
        } else {
            max_dimension
        };
        self.width >= 1
            && self.width <= width_max
            && [self.height, self.depth, self.array_size]
                .iter()
                .all(|&d| d >= 1 && d <= max_dimension)
    }

    /// The host bytes it is charged against the per-VM budget: a buffer its width; a
    /// texture every texel of every layer at [`Resource3d::CHARGED_BYTES_PER_TEXEL`],
    /// doubled with mip levels (a full chain adds at most a third). None on overflow.
    pub fn host_bytes(&self) -> Option<u64> {
        if self.is_buffer() {
            return Some(u64::from(self.width));
        }
        let mips = if self.last_level > 0 { 2 } else { 1 };
        [self.width, self.height, self.depth, self.array_size]
            .iter()
            .try_fold(Self::CHARGED_BYTES_PER_TEXEL * mips, |acc, &d| {
                acc.checked_mul(u64::from(d))
            })
    }
}

/// A box inside a 3D resource (struct virtio_gpu_box).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Box3d {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Front layer.
    pub z: u32,
    /// Width.
    pub w: u32,
    /// Height.
    pub h: u32,
    /// Depth.
    pub d: u32,
}

/// The arguments of TRANSFER_TO_HOST_3D / TRANSFER_FROM_HOST_3D: `bbox` of mip `level`
/// between the resource and its backing, starting at byte `offset` of the backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer3d {
    /// Context the transfer runs in (the header's ctx_id; 0 for none).
    pub ctx_id: u32,
    /// The box.
    pub bbox: Box3d,
    /// Byte offset in the backing.
    pub offset: u64,
    /// Mip level.
    pub level: u32,
    /// Bytes per row in the backing (0: the resource's own).
    pub stride: u32,
    /// Bytes per layer in the backing (0: the resource's own).
    pub layer_stride: u32,
}

/// What a successful reply carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyBody {
    /// Done, nothing to return.
    Done,
    /// 64 * 64 * 4 bytes of cursor pixels in the resource's format.
    CursorImage(Vec<u8>),
    /// A blob exported for mapping: its fd is on the lane under `fds` (one fd).
    MapReady {
        /// Echo of the blob's resource id (checked by the frontend).
        resource_id: u32,
        /// Bytes the VMM may map (at most the blob's size).
        size: u64,
        /// VIRTIO_GPU_MAP_CACHE_* for RESP_OK_MAP_INFO.
        map_info: u32,
        /// The exported fd on the lane.
        fds: FdTicket,
    },
    /// The renderer no longer accesses the blob through the exported mapping.
    UnmapAck {
        /// Echo of the blob's resource id.
        resource_id: u32,
    },
    /// The renderer released its mapping state for the blob.
    FinalizeAck {
        /// Echo of the blob's resource id.
        resource_id: u32,
    },
    /// One capability set's id, highest version and size.
    CapsetInfo {
        /// Capset id (VIRTIO_GPU_CAPSET_*).
        capset_id: u32,
        /// Highest version.
        max_version: u32,
        /// Size in bytes of the capset data.
        max_size: u32,
    },
    /// A capability set's bytes.
    Capset(Vec<u8>),
}

/// Why the renderer could not execute a request. Maps one-to-one onto a
/// `VIRTIO_GPU_RESP_ERR_*` code in the frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RenderError {
    /// No such resource (or it is in the wrong state for the operation).
    #[error("invalid resource id {0}")]
    InvalidResource(u32),
    /// A parameter the renderer rejected.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// Host allocation failed.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Anything else, with the renderer's explanation.
    #[error("renderer error: {0}")]
    Unspec(String),
}

/// Messages from the renderer to the frontend.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RendererEvent {
    /// The answer to the request with the same `seq`.
    Reply {
        /// Echo of [`RendererRequest::seq`].
        seq: u64,
        /// Outcome.
        result: Result<ReplyBody, RenderError>,
    },
    /// A fence has been signalled; every fence of the same ring with a lower or equal id
    /// is complete too.
    FenceSignaled(FenceInfo),
}

#[cfg(test)]
mod tests {
    use serde::de::value::{Error, StrDeserializer};
    use serde::de::IntoDeserializer;
    use serde::Deserialize;

    use super::RendererOp;

    /// What deserializing the variant name `TestForbiddenSyscall` (without its fields)
    /// says: "unknown variant" when the enum has no such variant.
    fn test_op_by_name() -> String {
        let name: StrDeserializer<'_, Error> = "TestForbiddenSyscall".into_deserializer();
        match RendererOp::deserialize(name) {
            Ok(op) => panic!("a bare name deserialized into {op:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A default build has no test-only request: the renderer cannot be asked, by any
    /// message, to make a forbidden call.
    #[cfg(not(feature = "test-hooks"))]
    #[test]
    fn default_build_has_no_test_only_request() {
        let why = test_op_by_name();
        assert!(why.starts_with("unknown variant"), "{why}");
    }

    /// With `test-hooks` the request exists (and wants its fields).
    #[cfg(feature = "test-hooks")]
    #[test]
    fn test_hooks_build_has_the_test_only_request() {
        let why = test_op_by_name();
        assert!(!why.starts_with("unknown variant"), "{why}");
        use super::ForbiddenSyscall;
        assert_eq!(
            ForbiddenSyscall::from_env_value("open"),
            Some(ForbiddenSyscall::OpenFile)
        );
        assert_eq!(
            ForbiddenSyscall::from_env_value("socket"),
            Some(ForbiddenSyscall::CreateSocket)
        );
        assert_eq!(
            ForbiddenSyscall::from_env_value("exec"),
            Some(ForbiddenSyscall::Exec)
        );
        assert_eq!(ForbiddenSyscall::from_env_value("openat"), None);
    }
}
