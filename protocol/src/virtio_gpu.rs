//! virtio-gpu wire format (virtio 1.3, section 5.7): constants, structs, typed commands.
//!
//! Everything here is plain data and byte (de)serialisation: no I/O and no validation
//! beyond what the layout itself demands. Decoding guest bytes into a [`Request`], with
//! all the checks that make a command safe to execute, lives in the device frontend.
//! All multi-byte fields on the wire are little-endian.

use serde::{Deserialize, Serialize};

use crate::ipc::{BackingEntry, Box3d, Resource3d};

// ---------------------------------------------------------------------------------------
// Feature bits.

/// Feature bit: virgl 3D mode is supported.
pub const VIRTIO_GPU_F_VIRGL: u32 = 0;
/// Feature bit: EDID is supported (VIRTIO_GPU_CMD_GET_EDID).
pub const VIRTIO_GPU_F_EDID: u32 = 1;
/// Feature bit: assigning resources UUIDs for export to other virtio devices.
pub const VIRTIO_GPU_F_RESOURCE_UUID: u32 = 2;
/// Feature bit: creating and using size-based blob resources.
pub const VIRTIO_GPU_F_RESOURCE_BLOB: u32 = 3;
/// Feature bit: multiple context types and synchronization timelines.
pub const VIRTIO_GPU_F_CONTEXT_INIT: u32 = 4;

// ---------------------------------------------------------------------------------------
// Command types (enum virtio_gpu_ctrl_type).

/// 2D: ask for the scanouts' geometry.
pub const VIRTIO_GPU_CMD_GET_DISPLAY_INFO: u32 = 0x0100;
/// 2D: create a host resource with a pixel format and size.
pub const VIRTIO_GPU_CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
/// 2D: destroy a resource.
pub const VIRTIO_GPU_CMD_RESOURCE_UNREF: u32 = 0x0102;
/// 2D: show a resource (or nothing, with resource id 0) on a scanout.
pub const VIRTIO_GPU_CMD_SET_SCANOUT: u32 = 0x0103;
/// 2D: push a resource's rectangle to the scanouts that show it.
pub const VIRTIO_GPU_CMD_RESOURCE_FLUSH: u32 = 0x0104;
/// 2D: copy guest backing memory into a resource.
pub const VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
/// 2D: attach guest pages as a resource's backing store.
pub const VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
/// 2D: detach a resource's backing store.
pub const VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
/// Ask for the description of one capability set.
pub const VIRTIO_GPU_CMD_GET_CAPSET_INFO: u32 = 0x0108;
/// Ask for the contents of one capability set.
pub const VIRTIO_GPU_CMD_GET_CAPSET: u32 = 0x0109;
/// Ask for a scanout's EDID blob.
pub const VIRTIO_GPU_CMD_GET_EDID: u32 = 0x010a;
/// Ask the device to assign a UUID to a resource.
pub const VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID: u32 = 0x010b;
/// Create a blob resource.
pub const VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB: u32 = 0x010c;
/// Show a blob resource on a scanout.
pub const VIRTIO_GPU_CMD_SET_SCANOUT_BLOB: u32 = 0x010d;

/// 3D: create a rendering context.
pub const VIRTIO_GPU_CMD_CTX_CREATE: u32 = 0x0200;
/// 3D: destroy a rendering context.
pub const VIRTIO_GPU_CMD_CTX_DESTROY: u32 = 0x0201;
/// 3D: make a resource usable by a context.
pub const VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE: u32 = 0x0202;
/// 3D: revoke a context's use of a resource.
pub const VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE: u32 = 0x0203;
/// 3D: create a 3D resource.
pub const VIRTIO_GPU_CMD_RESOURCE_CREATE_3D: u32 = 0x0204;
/// 3D: copy guest memory into a 3D resource.
pub const VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D: u32 = 0x0205;
/// 3D: copy a 3D resource into guest memory.
pub const VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D: u32 = 0x0206;
/// 3D: submit a context-specific command buffer.
pub const VIRTIO_GPU_CMD_SUBMIT_3D: u32 = 0x0207;
/// Map a host blob resource into the host-visible shared memory region.
pub const VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB: u32 = 0x0208;
/// Unmap a blob resource from the host-visible shared memory region.
pub const VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB: u32 = 0x0209;

/// Cursor queue: set the cursor image and position.
pub const VIRTIO_GPU_CMD_UPDATE_CURSOR: u32 = 0x0300;
/// Cursor queue: move the cursor only.
pub const VIRTIO_GPU_CMD_MOVE_CURSOR: u32 = 0x0301;

// ---------------------------------------------------------------------------------------
// Response types.

/// Success, no payload.
pub const VIRTIO_GPU_RESP_OK_NODATA: u32 = 0x1100;
/// Success, struct virtio_gpu_resp_display_info follows.
pub const VIRTIO_GPU_RESP_OK_DISPLAY_INFO: u32 = 0x1101;
/// Success, struct virtio_gpu_resp_capset_info follows.
pub const VIRTIO_GPU_RESP_OK_CAPSET_INFO: u32 = 0x1102;
/// Success, capability set data follows.
pub const VIRTIO_GPU_RESP_OK_CAPSET: u32 = 0x1103;
/// Success, struct virtio_gpu_resp_edid follows.
pub const VIRTIO_GPU_RESP_OK_EDID: u32 = 0x1104;
/// Success, struct virtio_gpu_resp_resource_uuid follows.
pub const VIRTIO_GPU_RESP_OK_RESOURCE_UUID: u32 = 0x1105;
/// Success, struct virtio_gpu_resp_map_info follows.
pub const VIRTIO_GPU_RESP_OK_MAP_INFO: u32 = 0x1106;

/// Failure without a more specific reason.
pub const VIRTIO_GPU_RESP_ERR_UNSPEC: u32 = 0x1200;
/// Failure: the host ran out of memory.
pub const VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
/// Failure: the scanout id does not exist.
pub const VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
/// Failure: the resource id does not exist or may not be used here.
pub const VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
/// Failure: the context id does not exist.
pub const VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
/// Failure: a parameter is out of range or inconsistent.
pub const VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

// ---------------------------------------------------------------------------------------
// Header flags, limits, misc enums.

/// Header flag: the request carries a fence; answer only once the command completed.
pub const VIRTIO_GPU_FLAG_FENCE: u32 = 1 << 0;
/// Header flag: `ring_idx` names the context's timeline the fence belongs to.
pub const VIRTIO_GPU_FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// The largest number of scanouts the protocol can describe.
pub const VIRTIO_GPU_MAX_SCANOUTS: u32 = 16;
/// Size of the EDID array in struct virtio_gpu_resp_edid.
pub const VIRTIO_GPU_EDID_MAX_SIZE: usize = 1024;
/// Mask of the capset id inside `context_init` of CTX_CREATE.
pub const VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK: u32 = 0x0000_00ff;

/// Capability set: virgl.
pub const VIRTIO_GPU_CAPSET_VIRGL: u32 = 1;
/// Capability set: virgl2.
pub const VIRTIO_GPU_CAPSET_VIRGL2: u32 = 2;
/// Capability set: gfxstream Vulkan.
pub const VIRTIO_GPU_CAPSET_GFXSTREAM_VULKAN: u32 = 3;
/// Capability set: Venus (Vulkan over virtio-gpu).
pub const VIRTIO_GPU_CAPSET_VENUS: u32 = 4;
/// Capability set: cross-domain (Wayland and friends).
pub const VIRTIO_GPU_CAPSET_CROSS_DOMAIN: u32 = 5;
/// Capability set: DRM native context.
pub const VIRTIO_GPU_CAPSET_DRM: u32 = 6;

/// Blob memory: guest-only memory.
pub const VIRTIO_GPU_BLOB_MEM_GUEST: u32 = 1;
/// Blob memory: host-only memory.
pub const VIRTIO_GPU_BLOB_MEM_HOST3D: u32 = 2;
/// Blob memory: host memory mirrored in guest memory.
pub const VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST: u32 = 3;

/// Blob flag: the blob may be mapped into the guest.
pub const VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE: u32 = 1 << 0;
/// Blob flag: the blob may be shared with other virtio devices.
pub const VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE: u32 = 1 << 1;
/// Blob flag: the blob may be shared across devices.
pub const VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE: u32 = 1 << 2;
/// Every blob flag the spec defines; any other bit is invalid.
pub const VIRTIO_GPU_BLOB_FLAGS_ALL: u32 = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE
    | VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE
    | VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE;

/// Size of the `debug_name` array in struct virtio_gpu_ctx_create.
pub const VIRTIO_GPU_CTX_DEBUG_NAME_SIZE: usize = 64;
/// Size of a resource UUID.
pub const VIRTIO_GPU_UUID_SIZE: usize = 16;

/// Map info: mask of the caching type bits.
pub const VIRTIO_GPU_MAP_CACHE_MASK: u32 = 0x0f;
/// Map info: caching type unknown.
pub const VIRTIO_GPU_MAP_CACHE_NONE: u32 = 0x00;
/// Map info: cached mapping.
pub const VIRTIO_GPU_MAP_CACHE_CACHED: u32 = 0x01;
/// Map info: uncached mapping.
pub const VIRTIO_GPU_MAP_CACHE_UNCACHED: u32 = 0x02;
/// Map info: write-combined mapping.
pub const VIRTIO_GPU_MAP_CACHE_WC: u32 = 0x03;

/// Shared memory region id of the host-visible blob window.
pub const VIRTIO_GPU_SHM_ID_HOST_VISIBLE: u8 = 1;

// Gallium texture targets (enum pipe_texture_target), the `target` of RESOURCE_CREATE_3D.

/// PIPE_BUFFER: a buffer; its width is in bytes.
pub const PIPE_BUFFER: u32 = 0;
/// PIPE_TEXTURE_1D.
pub const PIPE_TEXTURE_1D: u32 = 1;
/// PIPE_TEXTURE_2D: what the Linux driver creates for framebuffers in virgl mode.
pub const PIPE_TEXTURE_2D: u32 = 2;
/// PIPE_TEXTURE_3D: the only target whose `depth` is a mip-mapped dimension.
pub const PIPE_TEXTURE_3D: u32 = 3;
/// PIPE_TEXTURE_CUBE.
pub const PIPE_TEXTURE_CUBE: u32 = 4;
/// PIPE_TEXTURE_RECT.
pub const PIPE_TEXTURE_RECT: u32 = 5;
/// PIPE_TEXTURE_1D_ARRAY.
pub const PIPE_TEXTURE_1D_ARRAY: u32 = 6;
/// PIPE_TEXTURE_2D_ARRAY.
pub const PIPE_TEXTURE_2D_ARRAY: u32 = 7;
/// PIPE_TEXTURE_CUBE_ARRAY: the highest target.
pub const PIPE_TEXTURE_CUBE_ARRAY: u32 = 8;

// ---------------------------------------------------------------------------------------
// Struct sizes in bytes (header included where the struct embeds one).

/// struct virtio_gpu_ctrl_hdr.
pub const CTRL_HDR_SIZE: usize = 24;
/// struct virtio_gpu_rect.
pub const RECT_SIZE: usize = 16;
/// struct virtio_gpu_display_one.
pub const DISPLAY_ONE_SIZE: usize = 24;
/// struct virtio_gpu_resp_display_info.
pub const RESP_DISPLAY_INFO_SIZE: usize =
    CTRL_HDR_SIZE + VIRTIO_GPU_MAX_SCANOUTS as usize * DISPLAY_ONE_SIZE;
/// struct virtio_gpu_get_edid.
pub const GET_EDID_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resp_edid.
pub const RESP_EDID_SIZE: usize = CTRL_HDR_SIZE + 8 + VIRTIO_GPU_EDID_MAX_SIZE;
/// struct virtio_gpu_resource_create_2d.
pub const RESOURCE_CREATE_2D_SIZE: usize = CTRL_HDR_SIZE + 16;
/// struct virtio_gpu_resource_unref.
pub const RESOURCE_UNREF_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_set_scanout.
pub const SET_SCANOUT_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 8;
/// struct virtio_gpu_resource_flush.
pub const RESOURCE_FLUSH_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 8;
/// struct virtio_gpu_transfer_to_host_2d.
pub const TRANSFER_TO_HOST_2D_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 16;
/// struct virtio_gpu_resource_attach_backing, without its trailing entries.
pub const RESOURCE_ATTACH_BACKING_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_mem_entry.
pub const MEM_ENTRY_SIZE: usize = 16;
/// struct virtio_gpu_resource_detach_backing.
pub const RESOURCE_DETACH_BACKING_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_cursor_pos.
pub const CURSOR_POS_SIZE: usize = 16;
/// struct virtio_gpu_update_cursor (also used by MOVE_CURSOR).
pub const UPDATE_CURSOR_SIZE: usize = CTRL_HDR_SIZE + CURSOR_POS_SIZE + 16;
/// struct virtio_gpu_get_capset_info.
pub const GET_CAPSET_INFO_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resp_capset_info.
pub const RESP_CAPSET_INFO_SIZE: usize = CTRL_HDR_SIZE + 16;
/// struct virtio_gpu_get_capset.
pub const GET_CAPSET_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resp_capset, without its trailing capset data.
pub const RESP_CAPSET_SIZE: usize = CTRL_HDR_SIZE;
/// struct virtio_gpu_resource_assign_uuid.
pub const RESOURCE_ASSIGN_UUID_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resp_resource_uuid.
pub const RESP_RESOURCE_UUID_SIZE: usize = CTRL_HDR_SIZE + VIRTIO_GPU_UUID_SIZE;
/// struct virtio_gpu_resource_create_blob, without its trailing entries.
pub const RESOURCE_CREATE_BLOB_SIZE: usize = CTRL_HDR_SIZE + 32;
/// struct virtio_gpu_set_scanout_blob.
pub const SET_SCANOUT_BLOB_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 24 + 32;
/// struct virtio_gpu_ctx_create.
pub const CTX_CREATE_SIZE: usize = CTRL_HDR_SIZE + 8 + VIRTIO_GPU_CTX_DEBUG_NAME_SIZE;
/// struct virtio_gpu_ctx_destroy (the header alone).
pub const CTX_DESTROY_SIZE: usize = CTRL_HDR_SIZE;
/// struct virtio_gpu_ctx_resource (CTX_ATTACH_RESOURCE and CTX_DETACH_RESOURCE).
pub const CTX_RESOURCE_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_cmd_submit, without its trailing command bytes.
pub const CMD_SUBMIT_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resource_map_blob.
pub const RESOURCE_MAP_BLOB_SIZE: usize = CTRL_HDR_SIZE + 16;
/// struct virtio_gpu_resp_map_info.
pub const RESP_MAP_INFO_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resource_unmap_blob.
pub const RESOURCE_UNMAP_BLOB_SIZE: usize = CTRL_HDR_SIZE + 8;
/// struct virtio_gpu_resource_create_3d: resource_id, target, format, bind, width,
/// height, depth, array_size, last_level, nr_samples, flags, padding.
pub const RESOURCE_CREATE_3D_SIZE: usize = CTRL_HDR_SIZE + 48;
/// struct virtio_gpu_box: x, y, z, w, h, d.
pub const BOX_SIZE: usize = 24;
/// struct virtio_gpu_transfer_host_3d (TRANSFER_TO_HOST_3D and TRANSFER_FROM_HOST_3D):
/// box, offset (u64), resource_id, level, stride, layer_stride.
pub const TRANSFER_HOST_3D_SIZE: usize = CTRL_HDR_SIZE + BOX_SIZE + 8 + 16;

// ---------------------------------------------------------------------------------------
// Little-endian field access. Callers check lengths first; these return None rather than
// panic so a missed check degrades into an error, not a crash.

/// Reads a little-endian u32 at byte `off` of `b`; None if `b` is too short.
pub fn read_le_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

/// Reads a little-endian u64 at byte `off` of `b`; None if `b` is too short.
pub fn read_le_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------
// Header.

/// The header every request and response starts with (struct virtio_gpu_ctrl_hdr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CtrlHeader {
    /// Command or response type (`VIRTIO_GPU_CMD_*`, `VIRTIO_GPU_RESP_*`).
    pub type_: u32,
    /// `VIRTIO_GPU_FLAG_*` bits.
    pub flags: u32,
    /// Fence id, meaningful with `VIRTIO_GPU_FLAG_FENCE`.
    pub fence_id: u64,
    /// 3D context id; 0 for 2D commands.
    pub ctx_id: u32,
    /// Timeline index, meaningful with `VIRTIO_GPU_FLAG_INFO_RING_IDX`.
    pub ring_idx: u8,
}

impl CtrlHeader {
    /// Whether the driver asked for a fence on this request.
    pub fn is_fenced(&self) -> bool {
        self.flags & VIRTIO_GPU_FLAG_FENCE != 0
    }

    /// Parses the first [`CTRL_HDR_SIZE`] bytes; None if there are fewer. The three
    /// padding bytes are ignored because drivers are not required to zero them.
    pub fn from_bytes(b: &[u8]) -> Option<CtrlHeader> {
        let b = b.get(..CTRL_HDR_SIZE)?;
        Some(CtrlHeader {
            type_: read_le_u32(b, 0)?,
            flags: read_le_u32(b, 4)?,
            fence_id: read_le_u64(b, 8)?,
            ctx_id: read_le_u32(b, 16)?,
            ring_idx: *b.get(20)?,
        })
    }

    /// The header's wire form, padding zeroed.
    pub fn to_bytes(&self) -> [u8; CTRL_HDR_SIZE] {
        let mut out = [0u8; CTRL_HDR_SIZE];
        out[0..4].copy_from_slice(&self.type_.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.fence_id.to_le_bytes());
        out[16..20].copy_from_slice(&self.ctx_id.to_le_bytes());
        out[20] = self.ring_idx;
        out
    }
}

// ---------------------------------------------------------------------------------------
// Rect.

/// A rectangle in pixels (struct virtio_gpu_rect).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// `x + width`, or None if that overflows u32.
    pub fn checked_right(&self) -> Option<u32> {
        self.x.checked_add(self.width)
    }

    /// `y + height`, or None if that overflows u32.
    pub fn checked_bottom(&self) -> Option<u32> {
        self.y.checked_add(self.height)
    }

    /// Whether the rectangle covers no pixel.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Whether the rectangle lies entirely within `[0, width) x [0, height)`. A rectangle
    /// whose edges overflow u32 is never inside.
    pub fn is_inside(&self, width: u32, height: u32) -> bool {
        match (self.checked_right(), self.checked_bottom()) {
            (Some(r), Some(b)) => r <= width && b <= height,
            _ => false,
        }
    }

    /// The common part of both rectangles, or None if they do not overlap (or either is
    /// empty). Edges that overflow u32 are clamped to u32::MAX so this never fails on
    /// unvalidated input.
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let right = |r: &Rect| r.x.saturating_add(r.width);
        let bottom = |r: &Rect| r.y.saturating_add(r.height);
        let x = self.x.max(other.x);
        let y = self.y.max(other.y);
        let r = right(self).min(right(other));
        let b = bottom(self).min(bottom(other));
        if r <= x || b <= y {
            return None;
        }
        Some(Rect {
            x,
            y,
            width: r - x,
            height: b - y,
        })
    }

    /// Parses a rect from the first [`RECT_SIZE`] bytes at `off`.
    pub fn from_bytes_at(b: &[u8], off: usize) -> Option<Rect> {
        Some(Rect {
            x: read_le_u32(b, off)?,
            y: read_le_u32(b, off.checked_add(4)?)?,
            width: read_le_u32(b, off.checked_add(8)?)?,
            height: read_le_u32(b, off.checked_add(12)?)?,
        })
    }

    /// The rect's wire form.
    pub fn to_bytes(&self) -> [u8; RECT_SIZE] {
        let mut out = [0u8; RECT_SIZE];
        out[0..4].copy_from_slice(&self.x.to_le_bytes());
        out[4..8].copy_from_slice(&self.y.to_le_bytes());
        out[8..12].copy_from_slice(&self.width.to_le_bytes());
        out[12..16].copy_from_slice(&self.height.to_le_bytes());
        out
    }
}

// ---------------------------------------------------------------------------------------
// Formats.

/// The 2D pixel formats (enum virtio_gpu_formats), all 4 bytes per pixel.
///
/// The name lists the bytes in memory order, first byte first: the Linux driver creates
/// `B8G8R8X8_UNORM` for DRM_FORMAT_XRGB8888 on little-endian guests, whose bytes are
/// B, G, R, X. (QEMU's pixman mapping agrees: B8G8R8X8 is PIXMAN_x8r8g8b8 there.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Format {
    /// Bytes B, G, R, A.
    B8G8R8A8Unorm,
    /// Bytes B, G, R, X.
    B8G8R8X8Unorm,
    /// Bytes A, R, G, B.
    A8R8G8B8Unorm,
    /// Bytes X, R, G, B.
    X8R8G8B8Unorm,
    /// Bytes R, G, B, A.
    R8G8B8A8Unorm,
    /// Bytes X, B, G, R.
    X8B8G8R8Unorm,
    /// Bytes A, B, G, R.
    A8B8G8R8Unorm,
    /// Bytes R, G, B, X.
    R8G8B8X8Unorm,
}

/// Wire value of [`Format::B8G8R8A8Unorm`].
pub const VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM: u32 = 1;
/// Wire value of [`Format::B8G8R8X8Unorm`].
pub const VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM: u32 = 2;
/// Wire value of [`Format::A8R8G8B8Unorm`].
pub const VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM: u32 = 3;
/// Wire value of [`Format::X8R8G8B8Unorm`].
pub const VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM: u32 = 4;
/// Wire value of [`Format::R8G8B8A8Unorm`].
pub const VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM: u32 = 67;
/// Wire value of [`Format::X8B8G8R8Unorm`].
pub const VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM: u32 = 68;
/// Wire value of [`Format::A8B8G8R8Unorm`].
pub const VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM: u32 = 121;
/// Wire value of [`Format::R8G8B8X8Unorm`].
pub const VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM: u32 = 134;

/// How one pixel's bytes move to reach B, G, R, X order. The eight formats need only
/// four permutations, each a single cheap operation on the little-endian u32.
#[derive(Clone, Copy)]
enum Swizzle {
    /// Already B, G, R, (A|X).
    Identity,
    /// (A|X), R, G, B: a full byte reversal.
    Reverse,
    /// R, G, B, (A|X): swap bytes 0 and 2.
    SwapRb,
    /// (A|X), B, G, R: rotate down by one byte.
    RotateDown,
}

impl Swizzle {
    #[inline(always)]
    fn apply(self, v: u32) -> u32 {
        match self {
            Swizzle::Identity => v,
            Swizzle::Reverse => v.swap_bytes(),
            Swizzle::SwapRb => (v & 0xff00_ff00) | ((v >> 16) & 0xff) | ((v & 0xff) << 16),
            Swizzle::RotateDown => v.rotate_right(8),
        }
    }
}

impl Format {
    /// All formats, in wire-value order.
    pub const ALL: [Format; 8] = [
        Format::B8G8R8A8Unorm,
        Format::B8G8R8X8Unorm,
        Format::A8R8G8B8Unorm,
        Format::X8R8G8B8Unorm,
        Format::R8G8B8A8Unorm,
        Format::X8B8G8R8Unorm,
        Format::A8B8G8R8Unorm,
        Format::R8G8B8X8Unorm,
    ];

    /// The format with wire value `v`, if it is one of the eight 2D formats.
    pub fn from_u32(v: u32) -> Option<Format> {
        Some(match v {
            VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM => Format::B8G8R8A8Unorm,
            VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM => Format::B8G8R8X8Unorm,
            VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM => Format::A8R8G8B8Unorm,
            VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM => Format::X8R8G8B8Unorm,
            VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM => Format::R8G8B8A8Unorm,
            VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM => Format::X8B8G8R8Unorm,
            VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM => Format::A8B8G8R8Unorm,
            VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM => Format::R8G8B8X8Unorm,
            _ => return None,
        })
    }

    /// The format's wire value.
    pub fn as_u32(self) -> u32 {
        match self {
            Format::B8G8R8A8Unorm => VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM,
            Format::B8G8R8X8Unorm => VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
            Format::A8R8G8B8Unorm => VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM,
            Format::X8R8G8B8Unorm => VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM,
            Format::R8G8B8A8Unorm => VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM,
            Format::X8B8G8R8Unorm => VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM,
            Format::A8B8G8R8Unorm => VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM,
            Format::R8G8B8X8Unorm => VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM,
        }
    }

    /// Bytes per pixel (4 for every 2D format).
    pub fn bytes_per_pixel(self) -> u32 {
        4
    }

    /// Whether the fourth channel is alpha rather than padding.
    pub fn has_alpha(self) -> bool {
        matches!(
            self,
            Format::B8G8R8A8Unorm
                | Format::A8R8G8B8Unorm
                | Format::R8G8B8A8Unorm
                | Format::A8B8G8R8Unorm
        )
    }

    /// Whether pixels of this format already lie in memory as B, G, R, X/A bytes, so
    /// [`Format::convert_row_to_bgrx`] is a plain copy and can be skipped altogether.
    pub fn is_bgrx_layout(self) -> bool {
        matches!(self.swizzle(), Swizzle::Identity)
    }

    fn swizzle(self) -> Swizzle {
        match self {
            Format::B8G8R8A8Unorm | Format::B8G8R8X8Unorm => Swizzle::Identity,
            Format::A8R8G8B8Unorm | Format::X8R8G8B8Unorm => Swizzle::Reverse,
            Format::R8G8B8A8Unorm | Format::R8G8B8X8Unorm => Swizzle::SwapRb,
            Format::X8B8G8R8Unorm | Format::A8B8G8R8Unorm => Swizzle::RotateDown,
        }
    }

    /// Reorders one pixel's bytes, as they lie in memory in this format, into B, G, R, X
    /// (PIXMAN_x8r8g8b8 on little-endian, what VHOST_USER_GPU_UPDATE carries). The X byte
    /// carries the source's alpha or padding byte unchanged: consumers of x8r8g8b8 ignore
    /// it, and keeping it makes the two BGR formats a plain copy.
    pub fn to_bgrx(self, px: [u8; 4]) -> [u8; 4] {
        self.swizzle().apply(u32::from_le_bytes(px)).to_le_bytes()
    }

    /// Converts a row of pixels into B, G, R, X order (see [`Format::to_bgrx`]).
    ///
    /// Converts `min(src.len(), dst.len()) / 4` whole pixels; callers pass equal lengths
    /// that are multiples of 4, and anything beyond the whole pixels of the shorter slice
    /// is left untouched rather than treated as an error, so that this can never panic.
    pub fn convert_row_to_bgrx(self, src: &[u8], dst: &mut [u8]) {
        let n = src.len().min(dst.len()) / 4 * 4;
        let (src, dst) = (&src[..n], &mut dst[..n]);
        // One loop per swizzle so each body is branch-free and the compiler vectorises it.
        fn run(src: &[u8], dst: &mut [u8], f: impl Fn(u32) -> u32) {
            for (s, d) in src.chunks_exact(4).zip(dst.chunks_exact_mut(4)) {
                let v = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                d.copy_from_slice(&f(v).to_le_bytes());
            }
        }
        match self.swizzle() {
            Swizzle::Identity => dst.copy_from_slice(src),
            Swizzle::Reverse => run(src, dst, |v| Swizzle::Reverse.apply(v)),
            Swizzle::SwapRb => run(src, dst, |v| Swizzle::SwapRb.apply(v)),
            Swizzle::RotateDown => run(src, dst, |v| Swizzle::RotateDown.apply(v)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Blob memory kinds.

/// Where a blob resource's memory lives (the `blob_mem` field of RESOURCE_CREATE_BLOB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobMem {
    /// VIRTIO_GPU_BLOB_MEM_GUEST: guest memory only, described by memory entries.
    Guest,
    /// VIRTIO_GPU_BLOB_MEM_HOST3D: host memory only, created by a context.
    Host3d,
    /// VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST: host memory created by a context, mirrored in
    /// guest memory described by memory entries.
    Host3dGuest,
}

impl BlobMem {
    /// The kind with wire value `v`, if it is one the spec defines.
    pub fn from_u32(v: u32) -> Option<BlobMem> {
        Some(match v {
            VIRTIO_GPU_BLOB_MEM_GUEST => BlobMem::Guest,
            VIRTIO_GPU_BLOB_MEM_HOST3D => BlobMem::Host3d,
            VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST => BlobMem::Host3dGuest,
            _ => return None,
        })
    }

    /// The kind's wire value.
    pub fn as_u32(self) -> u32 {
        match self {
            BlobMem::Guest => VIRTIO_GPU_BLOB_MEM_GUEST,
            BlobMem::Host3d => VIRTIO_GPU_BLOB_MEM_HOST3D,
            BlobMem::Host3dGuest => VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST,
        }
    }

    /// Whether the blob is backed by guest memory entries (GUEST and HOST3D_GUEST).
    pub fn has_guest_backing(self) -> bool {
        !matches!(self, BlobMem::Host3d)
    }

    /// Whether the blob is created by a rendering context (HOST3D and HOST3D_GUEST), so
    /// the request's header must name one.
    pub fn needs_context(self) -> bool {
        !matches!(self, BlobMem::Guest)
    }
}

// ---------------------------------------------------------------------------------------
// Commands.

/// A cursor position on a scanout (struct virtio_gpu_cursor_pos).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CursorPos {
    /// Scanout the cursor is on.
    pub scanout_id: u32,
    /// Horizontal position in pixels.
    pub x: u32,
    /// Vertical position in pixels.
    pub y: u32,
}

/// The fields of struct virtio_gpu_transfer_host_3d besides the header and the resource
/// id: which box of which mip level moves, and where its bytes lie in the backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferHost3d {
    /// The box in the resource (struct virtio_gpu_box), in texels of mip `level`; for
    /// array and cube targets `z` and `d` count layers.
    pub bbox: Box3d,
    /// Byte offset in the backing of the box's first byte.
    pub offset: u64,
    /// Mip level.
    pub level: u32,
    /// Bytes per row in the backing; 0 means the renderer's own for the format.
    pub stride: u32,
    /// Bytes per layer (or depth slice) in the backing; 0 means the renderer's own.
    pub layer_stride: u32,
}

impl TransferHost3d {
    /// Parses the struct from its body, which starts (with the box) at byte `off` of
    /// `b`; the resource id at `off + 32` is not part of it. None if `b` is too short.
    pub fn from_bytes_at(b: &[u8], off: usize) -> Option<TransferHost3d> {
        let word = |i: usize| read_le_u32(b, off.checked_add(i)?);
        Some(TransferHost3d {
            bbox: Box3d {
                x: word(0)?,
                y: word(4)?,
                z: word(8)?,
                w: word(12)?,
                h: word(16)?,
                d: word(20)?,
            },
            offset: read_le_u64(b, off.checked_add(BOX_SIZE)?)?,
            level: word(36)?,
            stride: word(40)?,
            layer_stride: word(44)?,
        })
    }

    /// The box's wire form (struct virtio_gpu_box).
    pub fn bbox_bytes(&self) -> [u8; BOX_SIZE] {
        let b = &self.bbox;
        let mut out = [0u8; BOX_SIZE];
        for (i, v) in [b.x, b.y, b.z, b.w, b.h, b.d].into_iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// A decoded guest command. Variants carry the fields of the matching
/// `struct virtio_gpu_*`, minus header and padding.
///
/// Commands that act on a context (CTX_*, SUBMIT_3D, host blobs) take it from the
/// request header's `ctx_id`; it is not repeated in the variant. New commands are added
/// as new variants together with a [`Command::cmd_type`] arm and an encoder arm.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// VIRTIO_GPU_CMD_GET_DISPLAY_INFO.
    GetDisplayInfo,
    /// VIRTIO_GPU_CMD_GET_EDID.
    GetEdid {
        /// Scanout whose EDID is wanted.
        scanout_id: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_2D.
    ResourceCreate2d {
        /// New resource's id (non-zero).
        resource_id: u32,
        /// Pixel format.
        format: Format,
        /// Width in pixels (non-zero).
        width: u32,
        /// Height in pixels (non-zero).
        height: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_UNREF.
    ResourceUnref {
        /// Resource to destroy.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_SET_SCANOUT.
    SetScanout {
        /// Scanout to configure.
        scanout_id: u32,
        /// Resource to show; 0 disables the scanout.
        resource_id: u32,
        /// Part of the resource to show.
        rect: Rect,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_FLUSH.
    ResourceFlush {
        /// Resource whose contents changed.
        resource_id: u32,
        /// Changed area, in resource coordinates.
        rect: Rect,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D.
    TransferToHost2d {
        /// Destination resource.
        resource_id: u32,
        /// Area to copy, in resource coordinates.
        rect: Rect,
        /// Byte offset into the backing where the rect's first pixel lies.
        offset: u64,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING.
    ResourceAttachBacking {
        /// Resource to back.
        resource_id: u32,
        /// Guest memory regions, concatenated in order.
        entries: Vec<BackingEntry>,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING.
    ResourceDetachBacking {
        /// Resource to detach from.
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_UPDATE_CURSOR (cursor queue).
    UpdateCursor {
        /// Where the cursor is.
        pos: CursorPos,
        /// Cursor image resource; 0 hides the cursor.
        resource_id: u32,
        /// Hotspot x within the image.
        hot_x: u32,
        /// Hotspot y within the image.
        hot_y: u32,
    },
    /// VIRTIO_GPU_CMD_MOVE_CURSOR (cursor queue).
    MoveCursor {
        /// Where the cursor is.
        pos: CursorPos,
    },
    /// VIRTIO_GPU_CMD_GET_CAPSET_INFO.
    GetCapsetInfo {
        /// Index of the capability set, from 0 to the configured count minus one.
        capset_index: u32,
    },
    /// VIRTIO_GPU_CMD_GET_CAPSET.
    GetCapset {
        /// Capability set id (`VIRTIO_GPU_CAPSET_*`).
        capset_id: u32,
        /// Version wanted, at most the set's max_version.
        capset_version: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID.
    ResourceAssignUuid {
        /// Resource to export (non-zero).
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB. The context, for host blobs, is the header's
    /// `ctx_id`.
    ResourceCreateBlob {
        /// New resource's id (non-zero).
        resource_id: u32,
        /// Where the memory lives.
        blob_mem: BlobMem,
        /// `VIRTIO_GPU_BLOB_FLAG_USE_*` bits (no others).
        blob_flags: u32,
        /// Context-defined id of the host object (host blobs); unused for guest blobs.
        blob_id: u64,
        /// Size in bytes (non-zero).
        size: u64,
        /// Guest memory backing, concatenated in order; empty for HOST3D.
        entries: Vec<BackingEntry>,
    },
    /// VIRTIO_GPU_CMD_SET_SCANOUT_BLOB.
    SetScanoutBlob {
        /// Scanout to configure.
        scanout_id: u32,
        /// Blob resource to show; 0 disables the scanout.
        resource_id: u32,
        /// Part of the framebuffer to show.
        rect: Rect,
        /// Framebuffer width in pixels.
        width: u32,
        /// Framebuffer height in pixels.
        height: u32,
        /// Pixel format.
        format: Format,
        /// Bytes per row of each plane.
        strides: [u32; 4],
        /// Byte offset of each plane in the blob.
        offsets: [u32; 4],
    },
    /// VIRTIO_GPU_CMD_CTX_CREATE. The new context's id is the header's `ctx_id`.
    CtxCreate {
        /// With VIRTIO_GPU_F_CONTEXT_INIT: the capset id in the low 8 bits
        /// ([`VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK`]); 0 means the default (virgl).
        context_init: u32,
        /// Debug name: the first `nlen` bytes of `debug_name` (at most 64), not
        /// necessarily UTF-8 or NUL-free.
        name: Vec<u8>,
    },
    /// VIRTIO_GPU_CMD_CTX_DESTROY of the header's `ctx_id`.
    CtxDestroy,
    /// VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE to the header's `ctx_id`.
    CtxAttachResource {
        /// Resource to make usable by the context (non-zero).
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE from the header's `ctx_id`.
    CtxDetachResource {
        /// Resource to revoke (non-zero).
        resource_id: u32,
    },
    /// VIRTIO_GPU_CMD_SUBMIT_3D to the header's `ctx_id`.
    Submit3d {
        /// The context-specific command stream, opaque to the device frontend.
        commands: Vec<u8>,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_3D (struct virtio_gpu_resource_create_3d): a virgl
    /// resource. Resources are global; the header's `ctx_id` plays no part.
    ResourceCreate3d {
        /// New resource's id (non-zero).
        resource_id: u32,
        /// Target, format, bind flags, size, mip levels, samples and flags.
        args: Resource3d,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D: from the backing into the resource, in the
    /// header's `ctx_id` (0: none).
    TransferToHost3d {
        /// The resource (non-zero).
        resource_id: u32,
        /// Which part, and where it lies in the backing.
        transfer: TransferHost3d,
    },
    /// VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D: from the resource into its backing, in the
    /// header's `ctx_id` (0: none).
    TransferFromHost3d {
        /// The resource (non-zero).
        resource_id: u32,
        /// Which part, and where it goes in the backing.
        transfer: TransferHost3d,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB.
    ResourceMapBlob {
        /// Mappable blob resource (non-zero).
        resource_id: u32,
        /// Byte offset in the host-visible shared memory region.
        offset: u64,
    },
    /// VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB.
    ResourceUnmapBlob {
        /// Mapped blob resource (non-zero).
        resource_id: u32,
    },
}

impl Command {
    /// The command's wire type (`VIRTIO_GPU_CMD_*`).
    pub fn cmd_type(&self) -> u32 {
        match self {
            Command::GetDisplayInfo => VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
            Command::GetEdid { .. } => VIRTIO_GPU_CMD_GET_EDID,
            Command::ResourceCreate2d { .. } => VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
            Command::ResourceUnref { .. } => VIRTIO_GPU_CMD_RESOURCE_UNREF,
            Command::SetScanout { .. } => VIRTIO_GPU_CMD_SET_SCANOUT,
            Command::ResourceFlush { .. } => VIRTIO_GPU_CMD_RESOURCE_FLUSH,
            Command::TransferToHost2d { .. } => VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
            Command::ResourceAttachBacking { .. } => VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
            Command::ResourceDetachBacking { .. } => VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING,
            Command::UpdateCursor { .. } => VIRTIO_GPU_CMD_UPDATE_CURSOR,
            Command::MoveCursor { .. } => VIRTIO_GPU_CMD_MOVE_CURSOR,
            Command::GetCapsetInfo { .. } => VIRTIO_GPU_CMD_GET_CAPSET_INFO,
            Command::GetCapset { .. } => VIRTIO_GPU_CMD_GET_CAPSET,
            Command::ResourceAssignUuid { .. } => VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
            Command::ResourceCreateBlob { .. } => VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
            Command::SetScanoutBlob { .. } => VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
            Command::CtxCreate { .. } => VIRTIO_GPU_CMD_CTX_CREATE,
            Command::CtxDestroy => VIRTIO_GPU_CMD_CTX_DESTROY,
            Command::CtxAttachResource { .. } => VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
            Command::CtxDetachResource { .. } => VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
            Command::Submit3d { .. } => VIRTIO_GPU_CMD_SUBMIT_3D,
            Command::ResourceCreate3d { .. } => VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
            Command::TransferToHost3d { .. } => VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
            Command::TransferFromHost3d { .. } => VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
            Command::ResourceMapBlob { .. } => VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
            Command::ResourceUnmapBlob { .. } => VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
        }
    }

    /// Whether the command travels on the cursor queue rather than the control queue.
    pub fn is_cursor(&self) -> bool {
        matches!(
            self,
            Command::UpdateCursor { .. } | Command::MoveCursor { .. }
        )
    }
}

/// A decoded request: its header and its command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The request header (fence, context, ring).
    pub hdr: CtrlHeader,
    /// The command.
    pub cmd: Command,
}

impl Request {
    /// The request's wire form, as a driver would write it. The header's `type_` is taken
    /// from the command, not from `hdr`. Used by the guest simulator and by tests.
    pub fn encode(&self) -> Vec<u8> {
        let hdr = CtrlHeader {
            type_: self.cmd.cmd_type(),
            ..self.hdr
        };
        let mut out = hdr.to_bytes().to_vec();
        let mut put = |v: u32| out.extend_from_slice(&v.to_le_bytes());
        match &self.cmd {
            Command::GetDisplayInfo => {}
            Command::GetEdid { scanout_id } => {
                put(*scanout_id);
                put(0);
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => {
                put(*resource_id);
                put(format.as_u32());
                put(*width);
                put(*height);
            }
            Command::ResourceUnref { resource_id }
            | Command::ResourceDetachBacking { resource_id }
            | Command::ResourceAssignUuid { resource_id }
            | Command::CtxAttachResource { resource_id }
            | Command::CtxDetachResource { resource_id }
            | Command::ResourceUnmapBlob { resource_id } => {
                put(*resource_id);
                put(0);
            }
            Command::SetScanout {
                scanout_id,
                resource_id,
                rect,
            } => {
                out.extend_from_slice(&rect.to_bytes());
                out.extend_from_slice(&scanout_id.to_le_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
            }
            Command::ResourceFlush { resource_id, rect } => {
                out.extend_from_slice(&rect.to_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } => {
                out.extend_from_slice(&rect.to_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            } => {
                put(*resource_id);
                put(count_u32(entries.len()));
                put_entries(&mut out, entries);
            }
            Command::GetCapsetInfo { capset_index } => {
                put(*capset_index);
                put(0);
            }
            Command::GetCapset {
                capset_id,
                capset_version,
            } => {
                put(*capset_id);
                put(*capset_version);
            }
            Command::ResourceCreateBlob {
                resource_id,
                blob_mem,
                blob_flags,
                blob_id,
                size,
                entries,
            } => {
                put(*resource_id);
                put(blob_mem.as_u32());
                put(*blob_flags);
                put(count_u32(entries.len()));
                out.extend_from_slice(&blob_id.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                put_entries(&mut out, entries);
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
                out.extend_from_slice(&rect.to_bytes());
                let fields = [
                    *scanout_id,
                    *resource_id,
                    *width,
                    *height,
                    format.as_u32(),
                    0,
                ];
                for v in fields.iter().chain(strides).chain(offsets) {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Command::CtxCreate { context_init, name } => {
                // nlen is the name's true length, so an over-long name encodes as the
                // malformed request it is; only the first 64 bytes fit in debug_name.
                put(count_u32(name.len()));
                put(*context_init);
                let n = name.len().min(VIRTIO_GPU_CTX_DEBUG_NAME_SIZE);
                out.extend_from_slice(&name[..n]);
                out.resize(CTX_CREATE_SIZE, 0);
            }
            Command::CtxDestroy => {}
            Command::Submit3d { commands } => {
                put(count_u32(commands.len()));
                put(0);
                out.extend_from_slice(commands);
            }
            Command::ResourceMapBlob {
                resource_id,
                offset,
            } => {
                put(*resource_id);
                put(0);
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Command::ResourceCreate3d { resource_id, args } => {
                for v in [
                    *resource_id,
                    args.target,
                    args.format,
                    args.bind,
                    args.width,
                    args.height,
                    args.depth,
                    args.array_size,
                    args.last_level,
                    args.nr_samples,
                    args.flags,
                    0,
                ] {
                    put(v);
                }
            }
            Command::TransferToHost3d {
                resource_id,
                transfer,
            }
            | Command::TransferFromHost3d {
                resource_id,
                transfer,
            } => {
                out.extend_from_slice(&transfer.bbox_bytes());
                out.extend_from_slice(&transfer.offset.to_le_bytes());
                for v in [
                    *resource_id,
                    transfer.level,
                    transfer.stride,
                    transfer.layer_stride,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Command::UpdateCursor {
                pos,
                resource_id,
                hot_x,
                hot_y,
            } => {
                for v in [
                    pos.scanout_id,
                    pos.x,
                    pos.y,
                    0,
                    *resource_id,
                    *hot_x,
                    *hot_y,
                    0,
                ] {
                    put(v);
                }
            }
            Command::MoveCursor { pos } => {
                for v in [pos.scanout_id, pos.x, pos.y, 0, 0, 0, 0, 0] {
                    put(v);
                }
            }
        }
        out
    }
}

/// A length as a u32 wire count; a simulator never builds more than u32::MAX of
/// anything, but saturate rather than truncate anyway.
fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends struct virtio_gpu_mem_entry for each entry.
fn put_entries(out: &mut Vec<u8>, entries: &[BackingEntry]) {
    for e in entries {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// Responses.

/// Error responses (`VIRTIO_GPU_RESP_ERR_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// VIRTIO_GPU_RESP_ERR_UNSPEC.
    Unspec,
    /// VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY.
    OutOfMemory,
    /// VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID.
    InvalidScanoutId,
    /// VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID.
    InvalidResourceId,
    /// VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID.
    InvalidContextId,
    /// VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER.
    InvalidParameter,
}

impl ErrorCode {
    /// Every error code, in the order of their response types.
    pub const ALL: [ErrorCode; 6] = [
        ErrorCode::Unspec,
        ErrorCode::OutOfMemory,
        ErrorCode::InvalidScanoutId,
        ErrorCode::InvalidResourceId,
        ErrorCode::InvalidContextId,
        ErrorCode::InvalidParameter,
    ];

    /// The response type on the wire.
    pub fn resp_type(self) -> u32 {
        match self {
            ErrorCode::Unspec => VIRTIO_GPU_RESP_ERR_UNSPEC,
            ErrorCode::OutOfMemory => VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
            ErrorCode::InvalidScanoutId => VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
            ErrorCode::InvalidResourceId => VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID,
            ErrorCode::InvalidContextId => VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
            ErrorCode::InvalidParameter => VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        }
    }

    /// The error code for response type `t`, if it is an error response.
    pub fn from_resp_type(t: u32) -> Option<ErrorCode> {
        Some(match t {
            VIRTIO_GPU_RESP_ERR_UNSPEC => ErrorCode::Unspec,
            VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY => ErrorCode::OutOfMemory,
            VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID => ErrorCode::InvalidScanoutId,
            VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID => ErrorCode::InvalidResourceId,
            VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID => ErrorCode::InvalidContextId,
            VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER => ErrorCode::InvalidParameter,
            _ => return None,
        })
    }
}

/// One scanout's entry in the display info response (struct virtio_gpu_display_one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DisplayOne {
    /// Preferred geometry.
    pub rect: Rect,
    /// Whether the scanout is connected.
    pub enabled: bool,
    /// Flags (none are defined).
    pub flags: u32,
}

/// A response to a control or cursor queue request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// VIRTIO_GPU_RESP_OK_NODATA.
    OkNodata,
    /// VIRTIO_GPU_RESP_OK_DISPLAY_INFO: one entry per scanout, in scanout order. On the
    /// wire this is always the fixed 16-entry array; missing entries are zero, entries
    /// past the 16th are dropped.
    OkDisplayInfo(Vec<DisplayOne>),
    /// VIRTIO_GPU_RESP_OK_EDID: the EDID blob; only the first 1024 bytes fit on the wire,
    /// the rest is dropped.
    OkEdid(Vec<u8>),
    /// VIRTIO_GPU_RESP_OK_CAPSET_INFO: one capability set's description.
    OkCapsetInfo {
        /// Capability set id (`VIRTIO_GPU_CAPSET_*`).
        capset_id: u32,
        /// Highest version of the set the device supports.
        max_version: u32,
        /// Size in bytes of the set's data, the most GET_CAPSET will return.
        max_size: u32,
    },
    /// VIRTIO_GPU_RESP_OK_CAPSET: the capability set's bytes, right after the header.
    /// The executor must bound these by the set's `max_size` and by the writable buffer
    /// (CVE-2021-3546).
    OkCapset(Vec<u8>),
    /// VIRTIO_GPU_RESP_OK_RESOURCE_UUID: the UUID assigned to the resource.
    OkResourceUuid([u8; VIRTIO_GPU_UUID_SIZE]),
    /// VIRTIO_GPU_RESP_OK_MAP_INFO: how the mapped blob is cached.
    OkMapInfo {
        /// `VIRTIO_GPU_MAP_CACHE_*` in the low bits ([`VIRTIO_GPU_MAP_CACHE_MASK`]).
        map_info: u32,
    },
    /// An error.
    Err(ErrorCode),
}

impl Response {
    /// The response type on the wire.
    pub fn resp_type(&self) -> u32 {
        match self {
            Response::OkNodata => VIRTIO_GPU_RESP_OK_NODATA,
            Response::OkDisplayInfo(_) => VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
            Response::OkEdid(_) => VIRTIO_GPU_RESP_OK_EDID,
            Response::OkCapsetInfo { .. } => VIRTIO_GPU_RESP_OK_CAPSET_INFO,
            Response::OkCapset(_) => VIRTIO_GPU_RESP_OK_CAPSET,
            Response::OkResourceUuid(_) => VIRTIO_GPU_RESP_OK_RESOURCE_UUID,
            Response::OkMapInfo { .. } => VIRTIO_GPU_RESP_OK_MAP_INFO,
            Response::Err(e) => e.resp_type(),
        }
    }

    /// The encoded length of this response in bytes.
    pub fn encoded_len(&self) -> usize {
        match self {
            Response::OkNodata | Response::Err(_) => CTRL_HDR_SIZE,
            Response::OkDisplayInfo(_) => RESP_DISPLAY_INFO_SIZE,
            Response::OkEdid(_) => RESP_EDID_SIZE,
            Response::OkCapsetInfo { .. } => RESP_CAPSET_INFO_SIZE,
            Response::OkCapset(data) => RESP_CAPSET_SIZE.saturating_add(data.len()),
            Response::OkResourceUuid(_) => RESP_RESOURCE_UUID_SIZE,
            Response::OkMapInfo { .. } => RESP_MAP_INFO_SIZE,
        }
    }
}

/// The header of the response to a request with header `req`.
///
/// Per the spec, a fenced request's response carries VIRTIO_GPU_FLAG_FENCE and the same
/// fence_id; the context id and (with VIRTIO_GPU_FLAG_INFO_RING_IDX) the ring index are
/// copied too so the driver can tell which timeline signalled. Unfenced requests (and
/// requests whose header could not be read) get all-zero fields.
pub fn response_header(req: Option<&CtrlHeader>, resp_type: u32) -> CtrlHeader {
    match req {
        Some(h) if h.is_fenced() => CtrlHeader {
            type_: resp_type,
            flags: h.flags & (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX),
            fence_id: h.fence_id,
            ctx_id: h.ctx_id,
            ring_idx: if h.flags & VIRTIO_GPU_FLAG_INFO_RING_IDX != 0 {
                h.ring_idx
            } else {
                0
            },
        },
        _ => CtrlHeader {
            type_: resp_type,
            ..CtrlHeader::default()
        },
    }
}

/// Encodes `resp` as the answer to the request with header `req` (see
/// [`response_header`] for how the header is filled).
pub fn encode_response(req: Option<&CtrlHeader>, resp: &Response) -> Vec<u8> {
    let mut out = Vec::with_capacity(resp.encoded_len());
    encode_response_into(req, resp, &mut out);
    out
}

/// [`encode_response`] into `out` (cleared first), so that a caller can reuse one buffer
/// for every response.
pub fn encode_response_into(req: Option<&CtrlHeader>, resp: &Response, out: &mut Vec<u8>) {
    out.clear();
    let hdr = response_header(req, resp.resp_type());
    out.reserve(resp.encoded_len());
    out.extend_from_slice(&hdr.to_bytes());
    match resp {
        Response::OkNodata | Response::Err(_) => {}
        Response::OkDisplayInfo(displays) => {
            for i in 0..VIRTIO_GPU_MAX_SCANOUTS as usize {
                let d = displays.get(i).copied().unwrap_or_default();
                out.extend_from_slice(&d.rect.to_bytes());
                out.extend_from_slice(&u32::from(d.enabled).to_le_bytes());
                out.extend_from_slice(&d.flags.to_le_bytes());
            }
        }
        Response::OkEdid(edid) => {
            let n = edid.len().min(VIRTIO_GPU_EDID_MAX_SIZE);
            // n <= 1024, so the cast is lossless.
            out.extend_from_slice(&(n as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&edid[..n]);
            out.resize(RESP_EDID_SIZE, 0);
        }
        Response::OkCapsetInfo {
            capset_id,
            max_version,
            max_size,
        } => {
            for v in [*capset_id, *max_version, *max_size, 0] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Response::OkCapset(data) => out.extend_from_slice(data),
        Response::OkResourceUuid(uuid) => out.extend_from_slice(uuid),
        Response::OkMapInfo { map_info } => {
            out.extend_from_slice(&map_info.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
    }
}

/// Parses a response as a driver would; None if it is too short or of a type this
/// module does not model. Used by the guest simulator and by tests.
pub fn decode_response(b: &[u8]) -> Option<(CtrlHeader, Response)> {
    let hdr = CtrlHeader::from_bytes(b)?;
    let resp = match hdr.type_ {
        VIRTIO_GPU_RESP_OK_NODATA => Response::OkNodata,
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO => {
            if b.len() < RESP_DISPLAY_INFO_SIZE {
                return None;
            }
            let mut v = Vec::with_capacity(VIRTIO_GPU_MAX_SCANOUTS as usize);
            for i in 0..VIRTIO_GPU_MAX_SCANOUTS as usize {
                let off = CTRL_HDR_SIZE + i * DISPLAY_ONE_SIZE;
                v.push(DisplayOne {
                    rect: Rect::from_bytes_at(b, off)?,
                    enabled: read_le_u32(b, off + RECT_SIZE)? != 0,
                    flags: read_le_u32(b, off + RECT_SIZE + 4)?,
                });
            }
            Response::OkDisplayInfo(v)
        }
        VIRTIO_GPU_RESP_OK_EDID => {
            let size = usize::try_from(read_le_u32(b, CTRL_HDR_SIZE)?).ok()?;
            if size > VIRTIO_GPU_EDID_MAX_SIZE {
                return None;
            }
            let start = CTRL_HDR_SIZE + 8;
            Response::OkEdid(b.get(start..start + size)?.to_vec())
        }
        VIRTIO_GPU_RESP_OK_CAPSET_INFO => {
            if b.len() < RESP_CAPSET_INFO_SIZE {
                return None;
            }
            Response::OkCapsetInfo {
                capset_id: read_le_u32(b, CTRL_HDR_SIZE)?,
                max_version: read_le_u32(b, CTRL_HDR_SIZE + 4)?,
                max_size: read_le_u32(b, CTRL_HDR_SIZE + 8)?,
            }
        }
        // The data has no length field: it is everything after the header, so pass
        // exactly the bytes the device wrote.
        VIRTIO_GPU_RESP_OK_CAPSET => Response::OkCapset(b.get(RESP_CAPSET_SIZE..)?.to_vec()),
        VIRTIO_GPU_RESP_OK_RESOURCE_UUID => {
            let uuid = b.get(CTRL_HDR_SIZE..RESP_RESOURCE_UUID_SIZE)?;
            Response::OkResourceUuid(uuid.try_into().ok()?)
        }
        VIRTIO_GPU_RESP_OK_MAP_INFO => {
            if b.len() < RESP_MAP_INFO_SIZE {
                return None;
            }
            Response::OkMapInfo {
                map_info: read_le_u32(b, CTRL_HDR_SIZE)?,
            }
        }
        t => Response::Err(ErrorCode::from_resp_type(t)?),
    };
    Some((hdr, resp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_ignores_padding() {
        let h = CtrlHeader {
            type_: VIRTIO_GPU_CMD_RESOURCE_FLUSH,
            flags: VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX,
            fence_id: 0x0102_0304_0506_0708,
            ctx_id: 7,
            ring_idx: 3,
        };
        let mut b = h.to_bytes();
        assert_eq!(b.len(), CTRL_HDR_SIZE);
        assert_eq!(&b[0..4], &[0x04, 0x01, 0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        b[21..24].copy_from_slice(&[0xaa, 0xbb, 0xcc]);
        assert_eq!(CtrlHeader::from_bytes(&b), Some(h));
        assert!(h.is_fenced());
        assert_eq!(CtrlHeader::from_bytes(&b[..23]), None);
    }

    #[test]
    fn struct_sizes_match_spec() {
        assert_eq!(RESP_DISPLAY_INFO_SIZE, 408);
        assert_eq!(RESP_EDID_SIZE, 1056);
        assert_eq!(RESOURCE_CREATE_2D_SIZE, 40);
        assert_eq!(SET_SCANOUT_SIZE, 48);
        assert_eq!(RESOURCE_FLUSH_SIZE, 48);
        assert_eq!(TRANSFER_TO_HOST_2D_SIZE, 56);
        assert_eq!(RESOURCE_ATTACH_BACKING_SIZE, 32);
        assert_eq!(UPDATE_CURSOR_SIZE, 56);
        // The blob, context and capset structs, as laid out in virtio 1.3 section 5.7.6.
        assert_eq!(GET_CAPSET_INFO_SIZE, 32);
        assert_eq!(RESP_CAPSET_INFO_SIZE, 40);
        assert_eq!(GET_CAPSET_SIZE, 32);
        assert_eq!(RESOURCE_ASSIGN_UUID_SIZE, 32);
        assert_eq!(RESP_RESOURCE_UUID_SIZE, 40);
        assert_eq!(RESOURCE_CREATE_BLOB_SIZE, 56);
        assert_eq!(SET_SCANOUT_BLOB_SIZE, 96);
        assert_eq!(CTX_CREATE_SIZE, 96);
        assert_eq!(CTX_DESTROY_SIZE, 24);
        assert_eq!(CTX_RESOURCE_SIZE, 32);
        assert_eq!(CMD_SUBMIT_SIZE, 32);
        assert_eq!(RESOURCE_MAP_BLOB_SIZE, 40);
        assert_eq!(RESP_MAP_INFO_SIZE, 32);
        assert_eq!(RESOURCE_UNMAP_BLOB_SIZE, 32);
    }

    #[test]
    fn blob_mem_wire_values_roundtrip() {
        for m in [BlobMem::Guest, BlobMem::Host3d, BlobMem::Host3dGuest] {
            assert_eq!(BlobMem::from_u32(m.as_u32()), Some(m));
        }
        assert_eq!(BlobMem::Guest.as_u32(), 1);
        assert_eq!(BlobMem::Host3dGuest.as_u32(), 3);
        assert_eq!(BlobMem::from_u32(0), None);
        assert_eq!(BlobMem::from_u32(4), None);
        assert!(BlobMem::Guest.has_guest_backing() && !BlobMem::Guest.needs_context());
        assert!(!BlobMem::Host3d.has_guest_backing() && BlobMem::Host3d.needs_context());
        assert!(BlobMem::Host3dGuest.has_guest_backing() && BlobMem::Host3dGuest.needs_context());
        assert_eq!(VIRTIO_GPU_BLOB_FLAGS_ALL, 7);
    }

    #[test]
    fn new_responses_roundtrip() {
        let fenced = CtrlHeader {
            type_: VIRTIO_GPU_CMD_GET_CAPSET,
            flags: VIRTIO_GPU_FLAG_FENCE,
            fence_id: 3,
            ctx_id: 0,
            ring_idx: 0,
        };
        let cases = [
            (
                Response::OkCapsetInfo {
                    capset_id: VIRTIO_GPU_CAPSET_CROSS_DOMAIN,
                    max_version: 0,
                    max_size: 308,
                },
                RESP_CAPSET_INFO_SIZE,
            ),
            (Response::OkCapset(vec![1, 2, 3, 4, 5]), CTRL_HDR_SIZE + 5),
            (Response::OkCapset(Vec::new()), CTRL_HDR_SIZE),
            (
                Response::OkResourceUuid(core::array::from_fn(|i| i as u8 + 1)),
                RESP_RESOURCE_UUID_SIZE,
            ),
            (
                Response::OkMapInfo {
                    map_info: VIRTIO_GPU_MAP_CACHE_CACHED,
                },
                RESP_MAP_INFO_SIZE,
            ),
        ];
        for (resp, len) in cases {
            assert_eq!(resp.encoded_len(), len, "{resp:?}");
            let b = encode_response(Some(&fenced), &resp);
            assert_eq!(b.len(), len, "{resp:?}");
            let (h, back) = decode_response(&b).unwrap();
            assert_eq!(h.type_, resp.resp_type());
            assert_eq!(h.fence_id, 3);
            assert_eq!(back, resp);
            // Truncated fixed-size responses do not decode.
            if !matches!(resp, Response::OkCapset(_)) {
                assert_eq!(decode_response(&b[..len - 1]), None, "{resp:?}");
            }
        }
        let b = encode_response(
            None,
            &Response::OkCapsetInfo {
                capset_id: 5,
                max_version: 6,
                max_size: 7,
            },
        );
        assert_eq!(read_le_u32(&b, 24), Some(5));
        assert_eq!(read_le_u32(&b, 28), Some(6));
        assert_eq!(read_le_u32(&b, 32), Some(7));
        assert_eq!(read_le_u32(&b, 36), Some(0));
        let b = encode_response(None, &Response::OkMapInfo { map_info: 3 });
        assert_eq!(&b[24..], &[3, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn new_request_layouts() {
        let enc = |cmd: Command| {
            Request {
                hdr: CtrlHeader {
                    ctx_id: 9,
                    ..CtrlHeader::default()
                },
                cmd,
            }
            .encode()
        };

        let b = enc(Command::CtxCreate {
            context_init: VIRTIO_GPU_CAPSET_CROSS_DOMAIN,
            name: b"wayland".to_vec(),
        });
        assert_eq!(b.len(), CTX_CREATE_SIZE);
        assert_eq!(read_le_u32(&b, 0), Some(VIRTIO_GPU_CMD_CTX_CREATE));
        assert_eq!(read_le_u32(&b, 16), Some(9));
        assert_eq!(read_le_u32(&b, 24), Some(7));
        assert_eq!(read_le_u32(&b, 28), Some(5));
        assert_eq!(&b[32..39], b"wayland");
        assert!(b[39..].iter().all(|&x| x == 0));
        // An over-long name keeps its true nlen but only 64 bytes of it.
        let b = enc(Command::CtxCreate {
            context_init: 0,
            name: vec![b'x'; 100],
        });
        assert_eq!(b.len(), CTX_CREATE_SIZE);
        assert_eq!(read_le_u32(&b, 24), Some(100));

        assert_eq!(enc(Command::CtxDestroy).len(), CTX_DESTROY_SIZE);

        let b = enc(Command::Submit3d {
            commands: vec![0xcc; 12],
        });
        assert_eq!(b.len(), CMD_SUBMIT_SIZE + 12);
        assert_eq!(read_le_u32(&b, 24), Some(12));
        assert_eq!(read_le_u32(&b, 28), Some(0));

        let b = enc(Command::ResourceCreateBlob {
            resource_id: 4,
            blob_mem: BlobMem::Host3dGuest,
            blob_flags: VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            blob_id: 0x1122_3344_5566_7788,
            size: 0x1_0000_0000,
            entries: vec![BackingEntry {
                addr: 0xabc000,
                length: 4096,
            }],
        });
        assert_eq!(b.len(), RESOURCE_CREATE_BLOB_SIZE + MEM_ENTRY_SIZE);
        assert_eq!(read_le_u32(&b, 24), Some(4));
        assert_eq!(read_le_u32(&b, 28), Some(3));
        assert_eq!(read_le_u32(&b, 32), Some(1));
        assert_eq!(read_le_u32(&b, 36), Some(1));
        assert_eq!(read_le_u64(&b, 40), Some(0x1122_3344_5566_7788));
        assert_eq!(read_le_u64(&b, 48), Some(0x1_0000_0000));
        assert_eq!(read_le_u64(&b, 56), Some(0xabc000));
        assert_eq!(read_le_u32(&b, 64), Some(4096));

        let b = enc(Command::SetScanoutBlob {
            scanout_id: 1,
            resource_id: 2,
            rect: Rect {
                x: 3,
                y: 4,
                width: 5,
                height: 6,
            },
            width: 7,
            height: 8,
            format: Format::B8G8R8X8Unorm,
            strides: [10, 11, 12, 13],
            offsets: [20, 21, 22, 23],
        });
        assert_eq!(b.len(), SET_SCANOUT_BLOB_SIZE);
        let words: Vec<u32> = (24..96)
            .step_by(4)
            .map(|o| read_le_u32(&b, o).unwrap())
            .collect();
        assert_eq!(
            words,
            [3, 4, 5, 6, 1, 2, 7, 8, 2, 0, 10, 11, 12, 13, 20, 21, 22, 23]
        );

        let b = enc(Command::ResourceMapBlob {
            resource_id: 5,
            offset: 0x20_0000,
        });
        assert_eq!(b.len(), RESOURCE_MAP_BLOB_SIZE);
        assert_eq!(read_le_u32(&b, 24), Some(5));
        assert_eq!(read_le_u64(&b, 32), Some(0x20_0000));

        for (cmd, len) in [
            (Command::ResourceUnmapBlob { resource_id: 5 }, 32),
            (Command::ResourceAssignUuid { resource_id: 5 }, 32),
            (Command::CtxAttachResource { resource_id: 5 }, 32),
            (Command::CtxDetachResource { resource_id: 5 }, 32),
            (Command::GetCapsetInfo { capset_index: 5 }, 32),
        ] {
            let b = enc(cmd.clone());
            assert_eq!(b.len(), len, "{cmd:?}");
            assert_eq!(read_le_u32(&b, 0), Some(cmd.cmd_type()));
            assert_eq!(read_le_u32(&b, 24), Some(5), "{cmd:?}");
            assert_eq!(read_le_u32(&b, 28), Some(0), "{cmd:?}");
        }
        let b = enc(Command::GetCapset {
            capset_id: 2,
            capset_version: 1,
        });
        assert_eq!(b.len(), GET_CAPSET_SIZE);
        assert_eq!(
            (read_le_u32(&b, 24), read_le_u32(&b, 28)),
            (Some(2), Some(1))
        );
        assert!(!Command::Submit3d { commands: vec![] }.is_cursor());
    }

    #[test]
    fn three_d_request_layouts() {
        let args = Resource3d {
            target: PIPE_TEXTURE_2D,
            format: 2,
            bind: 2,
            width: 64,
            height: 32,
            depth: 1,
            array_size: 1,
            last_level: 0,
            nr_samples: 0,
            flags: 1,
        };
        let b = Request {
            hdr: CtrlHeader::default(),
            cmd: Command::ResourceCreate3d {
                resource_id: 5,
                args,
            },
        }
        .encode();
        assert_eq!(b.len(), RESOURCE_CREATE_3D_SIZE);
        assert_eq!(read_le_u32(&b, 0), Some(VIRTIO_GPU_CMD_RESOURCE_CREATE_3D));
        let words: Vec<u32> = (24..72)
            .step_by(4)
            .map(|o| read_le_u32(&b, o).unwrap())
            .collect();
        assert_eq!(words, [5, 2, 2, 2, 64, 32, 1, 1, 0, 0, 1, 0]);

        let transfer = TransferHost3d {
            bbox: Box3d {
                x: 1,
                y: 2,
                z: 3,
                w: 4,
                h: 5,
                d: 6,
            },
            offset: 0x1_0000_0007,
            level: 8,
            stride: 9,
            layer_stride: 10,
        };
        for (cmd, t) in [
            (
                Command::TransferToHost3d {
                    resource_id: 11,
                    transfer,
                },
                VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
            ),
            (
                Command::TransferFromHost3d {
                    resource_id: 11,
                    transfer,
                },
                VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
            ),
        ] {
            assert_eq!(cmd.cmd_type(), t);
            let b = Request {
                hdr: CtrlHeader::default(),
                cmd,
            }
            .encode();
            assert_eq!(b.len(), TRANSFER_HOST_3D_SIZE);
            assert_eq!(read_le_u32(&b, 0), Some(t));
            let words: Vec<u32> = (24..48)
                .step_by(4)
                .map(|o| read_le_u32(&b, o).unwrap())
                .collect();
            assert_eq!(words, [1, 2, 3, 4, 5, 6]);
            assert_eq!(read_le_u64(&b, 48), Some(0x1_0000_0007));
            assert_eq!(read_le_u32(&b, 56), Some(11));
            assert_eq!(read_le_u32(&b, 60), Some(8));
            assert_eq!(read_le_u32(&b, 64), Some(9));
            assert_eq!(read_le_u32(&b, 68), Some(10));
            assert_eq!(
                TransferHost3d::from_bytes_at(&b, CTRL_HDR_SIZE),
                Some(transfer)
            );
            assert_eq!(TransferHost3d::from_bytes_at(&b[..71], CTRL_HDR_SIZE), None);
            assert_eq!(TransferHost3d::from_bytes_at(&b, usize::MAX), None);
        }
    }

    #[test]
    fn format_wire_values_roundtrip() {
        for f in Format::ALL {
            assert_eq!(Format::from_u32(f.as_u32()), Some(f));
        }
        assert_eq!(Format::from_u32(0), None);
        assert_eq!(Format::from_u32(5), None);
        assert_eq!(Format::from_u32(u32::MAX), None);
    }

    // Pixel with B=0x11, G=0x22, R=0x33, alpha/pad=0x44, laid out per format.
    fn sample(f: Format) -> [u8; 4] {
        let (b, g, r, a) = (0x11, 0x22, 0x33, 0x44);
        match f {
            Format::B8G8R8A8Unorm | Format::B8G8R8X8Unorm => [b, g, r, a],
            Format::A8R8G8B8Unorm | Format::X8R8G8B8Unorm => [a, r, g, b],
            Format::R8G8B8A8Unorm | Format::R8G8B8X8Unorm => [r, g, b, a],
            Format::X8B8G8R8Unorm | Format::A8B8G8R8Unorm => [a, b, g, r],
        }
    }

    #[test]
    fn to_bgrx_each_format() {
        for f in Format::ALL {
            assert_eq!(f.to_bgrx(sample(f)), [0x11, 0x22, 0x33, 0x44], "{f:?}");
        }
        // Spelled out once more, independent of `sample`, for the names that are easiest
        // to get backwards.
        assert_eq!(Format::B8G8R8X8Unorm.to_bgrx([1, 2, 3, 4]), [1, 2, 3, 4]);
        assert_eq!(Format::X8R8G8B8Unorm.to_bgrx([4, 3, 2, 1]), [1, 2, 3, 4]);
        assert_eq!(Format::R8G8B8A8Unorm.to_bgrx([3, 2, 1, 4]), [1, 2, 3, 4]);
        assert_eq!(Format::A8B8G8R8Unorm.to_bgrx([4, 1, 2, 3]), [1, 2, 3, 4]);
    }

    #[test]
    fn convert_row_each_format() {
        for f in Format::ALL {
            let src: Vec<u8> = (0..5).flat_map(|_| sample(f)).collect();
            let mut dst = vec![0u8; src.len()];
            f.convert_row_to_bgrx(&src, &mut dst);
            for px in dst.chunks_exact(4) {
                assert_eq!(px, [0x11, 0x22, 0x33, 0x44], "{f:?}");
            }
        }
    }

    #[test]
    fn convert_row_uneven_lengths_do_not_panic() {
        let src = [1u8, 2, 3, 4, 5, 6, 7];
        let mut dst = [0u8; 9];
        Format::R8G8B8X8Unorm.convert_row_to_bgrx(&src, &mut dst);
        assert_eq!(dst, [3, 2, 1, 4, 0, 0, 0, 0, 0]);
        Format::B8G8R8A8Unorm.convert_row_to_bgrx(&src, &mut dst[..2]);
    }

    #[test]
    fn rect_helpers() {
        let r = Rect {
            x: 10,
            y: 20,
            width: 30,
            height: 40,
        };
        assert_eq!(r.checked_right(), Some(40));
        assert_eq!(r.checked_bottom(), Some(60));
        assert!(r.is_inside(40, 60));
        assert!(!r.is_inside(39, 60));
        assert!(!r.is_inside(40, 59));
        assert!(!r.is_empty());
        let huge = Rect {
            x: u32::MAX,
            y: 0,
            width: 2,
            height: 1,
        };
        assert_eq!(huge.checked_right(), None);
        assert!(!huge.is_inside(u32::MAX, u32::MAX));
        assert!(Rect::default().is_empty());
        assert!(Rect::default().is_inside(0, 0));
    }

    #[test]
    fn rect_intersect() {
        let a = Rect {
            x: 0,
            y: 0,
            width: 10,
            height: 10,
        };
        let b = Rect {
            x: 5,
            y: 7,
            width: 10,
            height: 10,
        };
        assert_eq!(
            a.intersect(&b),
            Some(Rect {
                x: 5,
                y: 7,
                width: 5,
                height: 3
            })
        );
        assert_eq!(b.intersect(&a), a.intersect(&b));
        let touching = Rect {
            x: 10,
            y: 0,
            width: 5,
            height: 5,
        };
        assert_eq!(a.intersect(&touching), None);
        assert_eq!(a.intersect(&Rect::default()), None);
        let overflowing = Rect {
            x: 5,
            y: 5,
            width: u32::MAX,
            height: u32::MAX,
        };
        assert_eq!(
            a.intersect(&overflowing),
            Some(Rect {
                x: 5,
                y: 5,
                width: 5,
                height: 5
            })
        );
    }

    #[test]
    fn response_echoes_fence_only_when_fenced() {
        let fenced = CtrlHeader {
            type_: VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
            flags: VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX | 0x80,
            fence_id: 99,
            ctx_id: 5,
            ring_idx: 2,
        };
        let b = encode_response(Some(&fenced), &Response::OkNodata);
        assert_eq!(b.len(), CTRL_HDR_SIZE);
        let h = CtrlHeader::from_bytes(&b).unwrap();
        assert_eq!(h.type_, VIRTIO_GPU_RESP_OK_NODATA);
        assert_eq!(
            h.flags,
            VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX
        );
        assert_eq!((h.fence_id, h.ctx_id, h.ring_idx), (99, 5, 2));

        let no_ring = CtrlHeader {
            flags: VIRTIO_GPU_FLAG_FENCE,
            ..fenced
        };
        let h =
            CtrlHeader::from_bytes(&encode_response(Some(&no_ring), &Response::OkNodata)).unwrap();
        assert_eq!(
            (h.flags, h.fence_id, h.ring_idx),
            (VIRTIO_GPU_FLAG_FENCE, 99, 0)
        );

        let unfenced = CtrlHeader { flags: 0, ..fenced };
        let b = encode_response(Some(&unfenced), &Response::Err(ErrorCode::InvalidParameter));
        let h = CtrlHeader::from_bytes(&b).unwrap();
        assert_eq!(
            h,
            CtrlHeader {
                type_: VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
                ..CtrlHeader::default()
            }
        );
        let h = CtrlHeader::from_bytes(&encode_response(None, &Response::OkNodata)).unwrap();
        assert_eq!(h.flags, 0);
    }

    #[test]
    fn display_info_encoding() {
        let d = DisplayOne {
            rect: Rect {
                x: 0,
                y: 0,
                width: 1280,
                height: 800,
            },
            enabled: true,
            flags: 0,
        };
        let b = encode_response(None, &Response::OkDisplayInfo(vec![d]));
        assert_eq!(b.len(), RESP_DISPLAY_INFO_SIZE);
        assert_eq!(read_le_u32(&b, 24 + 8), Some(1280));
        assert_eq!(read_le_u32(&b, 24 + 12), Some(800));
        assert_eq!(read_le_u32(&b, 24 + 16), Some(1));
        assert!(b[24 + DISPLAY_ONE_SIZE..].iter().all(|&x| x == 0));
        let (_, r) = decode_response(&b).unwrap();
        let Response::OkDisplayInfo(v) = r else {
            panic!("wrong type")
        };
        assert_eq!(v.len(), 16);
        assert_eq!(v[0], d);

        // More than 16 entries must not grow the response.
        let many = vec![d; 40];
        assert_eq!(
            encode_response(None, &Response::OkDisplayInfo(many)).len(),
            RESP_DISPLAY_INFO_SIZE
        );
    }

    #[test]
    fn edid_encoding_truncates() {
        let b = encode_response(None, &Response::OkEdid(vec![0xab; 128]));
        assert_eq!(b.len(), RESP_EDID_SIZE);
        assert_eq!(read_le_u32(&b, 24), Some(128));
        assert_eq!(read_le_u32(&b, 28), Some(0));
        assert!(b[32..160].iter().all(|&x| x == 0xab));
        assert!(b[160..].iter().all(|&x| x == 0));
        assert_eq!(
            decode_response(&b).unwrap().1,
            Response::OkEdid(vec![0xab; 128])
        );

        let b = encode_response(None, &Response::OkEdid(vec![1; 5000]));
        assert_eq!(b.len(), RESP_EDID_SIZE);
        assert_eq!(read_le_u32(&b, 24), Some(1024));
    }

    #[test]
    fn error_codes_roundtrip() {
        for e in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_resp_type(e.resp_type()), Some(e));
        }
        assert_eq!(ErrorCode::Unspec.resp_type(), 0x1200);
        assert_eq!(ErrorCode::InvalidParameter.resp_type(), 0x1205);
    }

    #[test]
    fn request_encode_layout() {
        let req = Request {
            hdr: CtrlHeader::default(),
            cmd: Command::TransferToHost2d {
                resource_id: 9,
                rect: Rect {
                    x: 1,
                    y: 2,
                    width: 3,
                    height: 4,
                },
                offset: 0x1_0000_0000,
            },
        };
        let b = req.encode();
        assert_eq!(b.len(), TRANSFER_TO_HOST_2D_SIZE);
        assert_eq!(read_le_u32(&b, 0), Some(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D));
        assert_eq!(read_le_u32(&b, 24), Some(1));
        assert_eq!(read_le_u32(&b, 36), Some(4));
        assert_eq!(read_le_u64(&b, 40), Some(0x1_0000_0000));
        assert_eq!(read_le_u32(&b, 48), Some(9));

        let cursor = Request {
            hdr: CtrlHeader::default(),
            cmd: Command::UpdateCursor {
                pos: CursorPos {
                    scanout_id: 1,
                    x: 2,
                    y: 3,
                },
                resource_id: 4,
                hot_x: 5,
                hot_y: 6,
            },
        }
        .encode();
        assert_eq!(cursor.len(), UPDATE_CURSOR_SIZE);
        assert_eq!(read_le_u32(&cursor, 40), Some(4));
        assert_eq!(read_le_u32(&cursor, 48), Some(6));
    }
}
