//! A virtio-gpu driver (virtio 1.3 §5.7) on the test VMM's virtqueues.
//!
//! The command encoder here is deliberately independent of the product's `protocol` crate,
//! so a layout bug there is caught rather than mirrored. Everything is little-endian.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::guest_memory::{GuestMemory, MemoryError};
use crate::virtqueue::{Buffer, QueueError, SplitQueue};

/// Command codes (enum virtio_gpu_ctrl_type).
pub mod cmd {
    /// VIRTIO_GPU_CMD_GET_DISPLAY_INFO
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_2D
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    /// VIRTIO_GPU_CMD_RESOURCE_UNREF
    pub const RESOURCE_UNREF: u32 = 0x0102;
    /// VIRTIO_GPU_CMD_SET_SCANOUT
    pub const SET_SCANOUT: u32 = 0x0103;
    /// VIRTIO_GPU_CMD_RESOURCE_FLUSH
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    /// VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    /// VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    /// VIRTIO_GPU_CMD_GET_CAPSET_INFO
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    /// VIRTIO_GPU_CMD_GET_CAPSET
    pub const GET_CAPSET: u32 = 0x0109;
    /// VIRTIO_GPU_CMD_GET_EDID
    pub const GET_EDID: u32 = 0x010a;
    /// VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID
    pub const RESOURCE_ASSIGN_UUID: u32 = 0x010b;
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB
    pub const RESOURCE_CREATE_BLOB: u32 = 0x010c;
    /// VIRTIO_GPU_CMD_SET_SCANOUT_BLOB
    pub const SET_SCANOUT_BLOB: u32 = 0x010d;
    /// VIRTIO_GPU_CMD_CTX_CREATE
    pub const CTX_CREATE: u32 = 0x0200;
    /// VIRTIO_GPU_CMD_CTX_DESTROY
    pub const CTX_DESTROY: u32 = 0x0201;
    /// VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE
    pub const CTX_ATTACH_RESOURCE: u32 = 0x0202;
    /// VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE
    pub const CTX_DETACH_RESOURCE: u32 = 0x0203;
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_3D
    pub const RESOURCE_CREATE_3D: u32 = 0x0204;
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D
    pub const TRANSFER_TO_HOST_3D: u32 = 0x0205;
    /// VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D
    pub const TRANSFER_FROM_HOST_3D: u32 = 0x0206;
    /// VIRTIO_GPU_CMD_SUBMIT_3D
    pub const SUBMIT_3D: u32 = 0x0207;
    /// VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB
    pub const RESOURCE_MAP_BLOB: u32 = 0x0208;
    /// VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB
    pub const RESOURCE_UNMAP_BLOB: u32 = 0x0209;
    /// VIRTIO_GPU_CMD_UPDATE_CURSOR
    pub const UPDATE_CURSOR: u32 = 0x0300;
    /// VIRTIO_GPU_CMD_MOVE_CURSOR
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response codes.
pub mod resp {
    /// VIRTIO_GPU_RESP_OK_NODATA
    pub const OK_NODATA: u32 = 0x1100;
    /// VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    /// VIRTIO_GPU_RESP_OK_CAPSET_INFO
    pub const OK_CAPSET_INFO: u32 = 0x1102;
    /// VIRTIO_GPU_RESP_OK_CAPSET
    pub const OK_CAPSET: u32 = 0x1103;
    /// VIRTIO_GPU_RESP_OK_EDID
    pub const OK_EDID: u32 = 0x1104;
    /// VIRTIO_GPU_RESP_OK_RESOURCE_UUID
    pub const OK_RESOURCE_UUID: u32 = 0x1105;
    /// VIRTIO_GPU_RESP_OK_MAP_INFO
    pub const OK_MAP_INFO: u32 = 0x1106;
    /// VIRTIO_GPU_RESP_ERR_UNSPEC
    pub const ERR_UNSPEC: u32 = 0x1200;
    /// VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    /// VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    /// VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    /// VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID
    pub const ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
    /// VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;

    /// A readable name for a response code, for assertion messages.
    pub fn name(code: u32) -> String {
        match code {
            OK_NODATA => "OK_NODATA".into(),
            OK_DISPLAY_INFO => "OK_DISPLAY_INFO".into(),
            OK_CAPSET_INFO => "OK_CAPSET_INFO".into(),
            OK_CAPSET => "OK_CAPSET".into(),
            OK_EDID => "OK_EDID".into(),
            OK_RESOURCE_UUID => "OK_RESOURCE_UUID".into(),
            OK_MAP_INFO => "OK_MAP_INFO".into(),
            ERR_UNSPEC => "ERR_UNSPEC".into(),
            ERR_OUT_OF_MEMORY => "ERR_OUT_OF_MEMORY".into(),
            ERR_INVALID_SCANOUT_ID => "ERR_INVALID_SCANOUT_ID".into(),
            ERR_INVALID_RESOURCE_ID => "ERR_INVALID_RESOURCE_ID".into(),
            ERR_INVALID_CONTEXT_ID => "ERR_INVALID_CONTEXT_ID".into(),
            ERR_INVALID_PARAMETER => "ERR_INVALID_PARAMETER".into(),
            other => format!("{other:#x}"),
        }
    }
}

/// Pixel formats (enum virtio_gpu_formats).
pub mod format {
    /// VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM
    pub const B8G8R8A8_UNORM: u32 = 1;
    /// VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM
    pub const B8G8R8X8_UNORM: u32 = 2;
    /// VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM
    pub const A8R8G8B8_UNORM: u32 = 3;
    /// VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM
    pub const X8R8G8B8_UNORM: u32 = 4;
    /// VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM
    pub const R8G8B8A8_UNORM: u32 = 67;
    /// VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM
    pub const X8B8G8R8_UNORM: u32 = 68;
    /// VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM
    pub const A8B8G8R8_UNORM: u32 = 121;
    /// VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM
    pub const R8G8B8X8_UNORM: u32 = 134;
}

/// Blob memory kinds and flags (RESOURCE_CREATE_BLOB), and map cache types.
pub mod blob {
    /// VIRTIO_GPU_BLOB_MEM_GUEST
    pub const MEM_GUEST: u32 = 1;
    /// VIRTIO_GPU_BLOB_MEM_HOST3D
    pub const MEM_HOST3D: u32 = 2;
    /// VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST
    pub const MEM_HOST3D_GUEST: u32 = 3;
    /// VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE
    pub const FLAG_MAPPABLE: u32 = 1;
    /// VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE
    pub const FLAG_SHAREABLE: u32 = 2;
    /// VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE
    pub const FLAG_CROSS_DEVICE: u32 = 4;
    /// VIRTIO_GPU_MAP_CACHE_MASK
    pub const MAP_CACHE_MASK: u32 = 0x0f;
    /// VIRTIO_GPU_MAP_CACHE_NONE
    pub const MAP_CACHE_NONE: u32 = 0;
    /// VIRTIO_GPU_MAP_CACHE_CACHED
    pub const MAP_CACHE_CACHED: u32 = 1;
    /// VIRTIO_GPU_MAP_CACHE_UNCACHED
    pub const MAP_CACHE_UNCACHED: u32 = 2;
    /// VIRTIO_GPU_MAP_CACHE_WC
    pub const MAP_CACHE_WC: u32 = 3;
}

/// Capability set ids (VIRTIO_GPU_CAPSET_*).
pub mod capset {
    /// VIRTIO_GPU_CAPSET_VIRGL
    pub const VIRGL: u32 = 1;
    /// VIRTIO_GPU_CAPSET_VIRGL2
    pub const VIRGL2: u32 = 2;
    /// VIRTIO_GPU_CAPSET_GFXSTREAM_VULKAN
    pub const GFXSTREAM_VULKAN: u32 = 3;
    /// VIRTIO_GPU_CAPSET_VENUS
    pub const VENUS: u32 = 4;
    /// VIRTIO_GPU_CAPSET_CROSS_DOMAIN
    pub const CROSS_DOMAIN: u32 = 5;
    /// VIRTIO_GPU_CAPSET_DRM
    pub const DRM: u32 = 6;
}

/// Gallium texture targets (enum pipe_texture_target), RESOURCE_CREATE_3D's `target`.
pub mod target {
    /// PIPE_BUFFER
    pub const BUFFER: u32 = 0;
    /// PIPE_TEXTURE_1D
    pub const TEXTURE_1D: u32 = 1;
    /// PIPE_TEXTURE_2D
    pub const TEXTURE_2D: u32 = 2;
    /// PIPE_TEXTURE_3D
    pub const TEXTURE_3D: u32 = 3;
    /// PIPE_TEXTURE_CUBE
    pub const TEXTURE_CUBE: u32 = 4;
    /// PIPE_TEXTURE_2D_ARRAY
    pub const TEXTURE_2D_ARRAY: u32 = 7;
}

/// Virgl bind flags (VIRGL_BIND_*), RESOURCE_CREATE_3D's `bind`.
pub mod bind {
    /// VIRGL_BIND_RENDER_TARGET
    pub const RENDER_TARGET: u32 = 1 << 1;
    /// VIRGL_BIND_SAMPLER_VIEW
    pub const SAMPLER_VIEW: u32 = 1 << 3;
    /// VIRGL_BIND_VERTEX_BUFFER
    pub const VERTEX_BUFFER: u32 = 1 << 4;
}

/// VIRTIO_GPU_FLAG_FENCE.
pub const FLAG_FENCE: u32 = 1;
/// VIRTIO_GPU_FLAG_INFO_RING_IDX.
pub const FLAG_INFO_RING_IDX: u32 = 2;
/// Size of struct virtio_gpu_ctrl_hdr.
pub const HDR_SIZE: usize = 24;
/// Size of struct virtio_gpu_resp_display_info.
pub const DISPLAY_INFO_SIZE: usize = HDR_SIZE + 16 * 24;
/// Size of struct virtio_gpu_resp_edid.
pub const EDID_RESP_SIZE: usize = HDR_SIZE + 8 + 1024;
/// Size of struct virtio_gpu_resp_capset_info (id, max version, max size, padding).
pub const CAPSET_INFO_RESP_SIZE: usize = HDR_SIZE + 16;
/// Size of struct virtio_gpu_resp_resource_uuid.
pub const UUID_RESP_SIZE: usize = HDR_SIZE + 16;
/// Size of struct virtio_gpu_resp_map_info (map_info, padding).
pub const MAP_INFO_RESP_SIZE: usize = HDR_SIZE + 8;
/// Size of the debug_name array of struct virtio_gpu_ctx_create.
pub const CTX_NAME_SIZE: usize = 64;
/// Byte the response buffer is filled with before submission, to catch unwritten bytes.
pub const POISON: u8 = 0xa5;

/// Which virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Queue {
    /// controlq (index 0).
    Control = 0,
    /// cursorq (index 1).
    Cursor = 1,
}

/// struct virtio_gpu_rect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    /// Left.
    pub x: u32,
    /// Top.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// A rect.
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// Intersection with another rect (empty rects have width or height 0).
    pub fn intersect(&self, o: &Rect) -> Rect {
        let x0 = self.x.max(o.x);
        let y0 = self.y.max(o.y);
        let x1 =
            (u64::from(self.x) + u64::from(self.width)).min(u64::from(o.x) + u64::from(o.width));
        let y1 =
            (u64::from(self.y) + u64::from(self.height)).min(u64::from(o.y) + u64::from(o.height));
        if x1 <= u64::from(x0) || y1 <= u64::from(y0) {
            return Rect::new(x0, y0, 0, 0);
        }
        Rect::new(
            x0,
            y0,
            (x1 - u64::from(x0)) as u32,
            (y1 - u64::from(y0)) as u32,
        )
    }

    fn put(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// struct virtio_gpu_mem_entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
}

/// The framebuffer description of SET_SCANOUT_BLOB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlobFb {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// One of [`format`].
    pub format: u32,
    /// Bytes per row of each plane.
    pub strides: [u32; 4],
    /// Byte offset of each plane in the blob.
    pub offsets: [u32; 4],
}

impl BlobFb {
    /// A single-plane, 4-bytes-per-pixel, tightly packed framebuffer at offset 0.
    pub fn linear(width: u32, height: u32, format: u32) -> BlobFb {
        BlobFb {
            width,
            height,
            format,
            strides: [width.wrapping_mul(4), 0, 0, 0],
            offsets: [0; 4],
        }
    }
}

/// The fixed fields of RESOURCE_CREATE_BLOB besides the resource id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobParams {
    /// One of the `blob::MEM_*` kinds.
    pub blob_mem: u32,
    /// `blob::FLAG_*` bits.
    pub blob_flags: u32,
    /// Context-defined id of the host object (host blobs).
    pub blob_id: u64,
    /// Size in bytes.
    pub size: u64,
}

impl BlobParams {
    /// A guest-memory blob of `size` bytes with the given flags.
    pub fn guest(size: u64, blob_flags: u32) -> BlobParams {
        BlobParams {
            blob_mem: blob::MEM_GUEST,
            blob_flags,
            blob_id: 0,
            size,
        }
    }

    /// A host-only blob (HOST3D) of `size` bytes, naming the context's object `blob_id`.
    pub fn host3d(blob_id: u64, size: u64, blob_flags: u32) -> BlobParams {
        BlobParams {
            blob_mem: blob::MEM_HOST3D,
            blob_flags,
            blob_id,
            size,
        }
    }
}

/// The fields of RESOURCE_CREATE_3D besides the resource id (struct
/// virtio_gpu_resource_create_3d).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Create3d {
    /// One of [`target`].
    pub target: u32,
    /// A virgl format (the 2D ones share [`format`]'s values).
    pub format: u32,
    /// [`bind`] flags.
    pub bind: u32,
    /// Width (bytes for a buffer).
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Depth.
    pub depth: u32,
    /// Layers.
    pub array_size: u32,
    /// Highest mip level.
    pub last_level: u32,
    /// Samples.
    pub nr_samples: u32,
    /// VIRTIO_GPU_RESOURCE_FLAG_*.
    pub flags: u32,
}

impl Create3d {
    /// A single-level 2D texture, what the Linux driver creates for a framebuffer.
    pub fn texture_2d(format: u32, bind: u32, width: u32, height: u32) -> Create3d {
        Create3d {
            target: target::TEXTURE_2D,
            format,
            bind,
            width,
            height,
            depth: 1,
            array_size: 1,
            last_level: 0,
            nr_samples: 0,
            flags: 0,
        }
    }
}

/// struct virtio_gpu_box.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Box3 {
    /// Left.
    pub x: u32,
    /// Top.
    pub y: u32,
    /// Front (layer for arrays).
    pub z: u32,
    /// Width.
    pub w: u32,
    /// Height.
    pub h: u32,
    /// Depth (layers for arrays).
    pub d: u32,
}

/// The fields of TRANSFER_TO_HOST_3D / TRANSFER_FROM_HOST_3D besides the resource id
/// (struct virtio_gpu_transfer_host_3d).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfer3d {
    /// The box.
    pub bbox: Box3,
    /// Byte offset in the backing of the box's first byte.
    pub offset: u64,
    /// Mip level.
    pub level: u32,
    /// Bytes per row in the backing (0: the device's own).
    pub stride: u32,
    /// Bytes per layer in the backing (0: the device's own).
    pub layer_stride: u32,
}

impl Transfer3d {
    /// The `w`x`h` rectangle at (`x`, `y`) of level 0, layer 0, at `offset`, with
    /// `stride` bytes per row.
    pub fn rect(x: u32, y: u32, w: u32, h: u32, offset: u64, stride: u32) -> Transfer3d {
        Transfer3d {
            bbox: Box3 {
                x,
                y,
                z: 0,
                w,
                h,
                d: 1,
            },
            offset,
            level: 0,
            stride,
            layer_stride: 0,
        }
    }
}

/// The header fields a driver sets besides the command code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HdrFields {
    /// Sets VIRTIO_GPU_FLAG_FENCE and the fence id.
    pub fence: Option<u64>,
    /// The context id (0 for 2D commands).
    pub ctx_id: u32,
    /// Sets VIRTIO_GPU_FLAG_INFO_RING_IDX and the ring index.
    pub ring_idx: Option<u8>,
}

impl HdrFields {
    /// Only a fence (or none): what [`Command::encode`] uses.
    pub fn fenced(fence: Option<u64>) -> HdrFields {
        HdrFields {
            fence,
            ..HdrFields::default()
        }
    }

    /// A context id, no fence.
    pub fn ctx(ctx_id: u32) -> HdrFields {
        HdrFields {
            ctx_id,
            ..HdrFields::default()
        }
    }
}

/// A virtio-gpu command, encoded by [`Command::encode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// GET_DISPLAY_INFO.
    GetDisplayInfo,
    /// GET_EDID.
    GetEdid {
        /// Scanout.
        scanout_id: u32,
    },
    /// RESOURCE_CREATE_2D.
    ResourceCreate2d {
        /// Resource id.
        resource_id: u32,
        /// One of [`format`].
        format: u32,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// RESOURCE_UNREF.
    ResourceUnref {
        /// Resource id.
        resource_id: u32,
    },
    /// SET_SCANOUT.
    SetScanout {
        /// Scanout.
        scanout_id: u32,
        /// Resource id (0 disables the scanout).
        resource_id: u32,
        /// Source rect in the resource.
        rect: Rect,
    },
    /// RESOURCE_FLUSH.
    ResourceFlush {
        /// Resource id.
        resource_id: u32,
        /// Damaged rect.
        rect: Rect,
    },
    /// TRANSFER_TO_HOST_2D.
    TransferToHost2d {
        /// Resource id.
        resource_id: u32,
        /// Rect in the resource.
        rect: Rect,
        /// Byte offset into the backing of the rect's first pixel.
        offset: u64,
    },
    /// RESOURCE_ATTACH_BACKING; `nr_entries` defaults to `entries.len()` but can lie.
    AttachBacking {
        /// Resource id.
        resource_id: u32,
        /// Scatter-gather entries.
        entries: Vec<MemEntry>,
        /// The nr_entries field, if it should differ from `entries.len()`.
        nr_entries: Option<u32>,
    },
    /// RESOURCE_DETACH_BACKING.
    DetachBacking {
        /// Resource id.
        resource_id: u32,
    },
    /// UPDATE_CURSOR (cursorq).
    UpdateCursor {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
        /// Cursor image resource (0 hides).
        resource_id: u32,
        /// Hotspot x.
        hot_x: u32,
        /// Hotspot y.
        hot_y: u32,
    },
    /// MOVE_CURSOR (cursorq).
    MoveCursor {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
    },
    /// GET_CAPSET_INFO.
    GetCapsetInfo {
        /// Capset index.
        capset_index: u32,
    },
    /// GET_CAPSET; `max_size` is the capset data the response buffer leaves room for.
    GetCapset {
        /// Capset id (one of [`capset`]).
        capset_id: u32,
        /// Capset version.
        capset_version: u32,
        /// Bytes of capset data the response buffer holds after the header.
        max_size: u32,
    },
    /// RESOURCE_ASSIGN_UUID.
    ResourceAssignUuid {
        /// Resource id.
        resource_id: u32,
    },
    /// RESOURCE_CREATE_BLOB; `nr_entries` defaults to `entries.len()` but can lie.
    ResourceCreateBlob {
        /// Resource id.
        resource_id: u32,
        /// Memory kind, flags, blob id and size.
        params: BlobParams,
        /// Guest memory entries.
        entries: Vec<MemEntry>,
        /// The nr_entries field, if it should differ from `entries.len()`.
        nr_entries: Option<u32>,
    },
    /// SET_SCANOUT_BLOB.
    SetScanoutBlob {
        /// Scanout.
        scanout_id: u32,
        /// Blob resource id (0 disables the scanout).
        resource_id: u32,
        /// Source rect in the framebuffer.
        rect: Rect,
        /// Framebuffer layout.
        fb: BlobFb,
    },
    /// CTX_CREATE (the context id is the header's); `nlen` defaults to `name.len()` but
    /// can lie. At most 64 bytes of `name` are sent.
    CtxCreate {
        /// Capset id in the low 8 bits (VIRTIO_GPU_F_CONTEXT_INIT), else 0.
        context_init: u32,
        /// Debug name.
        name: Vec<u8>,
        /// The nlen field, if it should differ from `name.len()`.
        nlen: Option<u32>,
    },
    /// CTX_DESTROY (of the header's context).
    CtxDestroy,
    /// CTX_ATTACH_RESOURCE (to the header's context).
    CtxAttachResource {
        /// Resource id.
        resource_id: u32,
    },
    /// CTX_DETACH_RESOURCE (from the header's context).
    CtxDetachResource {
        /// Resource id.
        resource_id: u32,
    },
    /// SUBMIT_3D (to the header's context); `size` defaults to `commands.len()` but can lie.
    Submit3d {
        /// Command stream.
        commands: Vec<u8>,
        /// The size field, if it should differ from `commands.len()`.
        size: Option<u32>,
    },
    /// RESOURCE_MAP_BLOB.
    ResourceMapBlob {
        /// Resource id.
        resource_id: u32,
        /// Offset in the hostmem region.
        offset: u64,
    },
    /// RESOURCE_UNMAP_BLOB.
    ResourceUnmapBlob {
        /// Resource id.
        resource_id: u32,
    },
    /// RESOURCE_CREATE_3D.
    ResourceCreate3d {
        /// Resource id.
        resource_id: u32,
        /// Target, format, bind, size, levels, samples, flags.
        params: Create3d,
    },
    /// TRANSFER_TO_HOST_3D (in the header's context, 0 for none).
    TransferToHost3d {
        /// Resource id.
        resource_id: u32,
        /// Box, offset, level, strides.
        transfer: Transfer3d,
    },
    /// TRANSFER_FROM_HOST_3D (in the header's context, 0 for none).
    TransferFromHost3d {
        /// Resource id.
        resource_id: u32,
        /// Box, offset, level, strides.
        transfer: Transfer3d,
    },
}

impl Command {
    /// The command code.
    pub fn code(&self) -> u32 {
        match self {
            Command::GetDisplayInfo => cmd::GET_DISPLAY_INFO,
            Command::GetEdid { .. } => cmd::GET_EDID,
            Command::ResourceCreate2d { .. } => cmd::RESOURCE_CREATE_2D,
            Command::ResourceUnref { .. } => cmd::RESOURCE_UNREF,
            Command::SetScanout { .. } => cmd::SET_SCANOUT,
            Command::ResourceFlush { .. } => cmd::RESOURCE_FLUSH,
            Command::TransferToHost2d { .. } => cmd::TRANSFER_TO_HOST_2D,
            Command::AttachBacking { .. } => cmd::RESOURCE_ATTACH_BACKING,
            Command::DetachBacking { .. } => cmd::RESOURCE_DETACH_BACKING,
            Command::UpdateCursor { .. } => cmd::UPDATE_CURSOR,
            Command::MoveCursor { .. } => cmd::MOVE_CURSOR,
            Command::GetCapsetInfo { .. } => cmd::GET_CAPSET_INFO,
            Command::GetCapset { .. } => cmd::GET_CAPSET,
            Command::ResourceAssignUuid { .. } => cmd::RESOURCE_ASSIGN_UUID,
            Command::ResourceCreateBlob { .. } => cmd::RESOURCE_CREATE_BLOB,
            Command::SetScanoutBlob { .. } => cmd::SET_SCANOUT_BLOB,
            Command::CtxCreate { .. } => cmd::CTX_CREATE,
            Command::CtxDestroy => cmd::CTX_DESTROY,
            Command::CtxAttachResource { .. } => cmd::CTX_ATTACH_RESOURCE,
            Command::CtxDetachResource { .. } => cmd::CTX_DETACH_RESOURCE,
            Command::Submit3d { .. } => cmd::SUBMIT_3D,
            Command::ResourceMapBlob { .. } => cmd::RESOURCE_MAP_BLOB,
            Command::ResourceUnmapBlob { .. } => cmd::RESOURCE_UNMAP_BLOB,
            Command::ResourceCreate3d { .. } => cmd::RESOURCE_CREATE_3D,
            Command::TransferToHost3d { .. } => cmd::TRANSFER_TO_HOST_3D,
            Command::TransferFromHost3d { .. } => cmd::TRANSFER_FROM_HOST_3D,
        }
    }

    /// The command's name, for statistics and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::GetDisplayInfo => "GET_DISPLAY_INFO",
            Command::GetEdid { .. } => "GET_EDID",
            Command::ResourceCreate2d { .. } => "RESOURCE_CREATE_2D",
            Command::ResourceUnref { .. } => "RESOURCE_UNREF",
            Command::SetScanout { .. } => "SET_SCANOUT",
            Command::ResourceFlush { .. } => "RESOURCE_FLUSH",
            Command::TransferToHost2d { .. } => "TRANSFER_TO_HOST_2D",
            Command::AttachBacking { .. } => "RESOURCE_ATTACH_BACKING",
            Command::DetachBacking { .. } => "RESOURCE_DETACH_BACKING",
            Command::UpdateCursor { .. } => "UPDATE_CURSOR",
            Command::MoveCursor { .. } => "MOVE_CURSOR",
            Command::GetCapsetInfo { .. } => "GET_CAPSET_INFO",
            Command::GetCapset { .. } => "GET_CAPSET",
            Command::ResourceAssignUuid { .. } => "RESOURCE_ASSIGN_UUID",
            Command::ResourceCreateBlob { .. } => "RESOURCE_CREATE_BLOB",
            Command::SetScanoutBlob { .. } => "SET_SCANOUT_BLOB",
            Command::CtxCreate { .. } => "CTX_CREATE",
            Command::CtxDestroy => "CTX_DESTROY",
            Command::CtxAttachResource { .. } => "CTX_ATTACH_RESOURCE",
            Command::CtxDetachResource { .. } => "CTX_DETACH_RESOURCE",
            Command::Submit3d { .. } => "SUBMIT_3D",
            Command::ResourceMapBlob { .. } => "RESOURCE_MAP_BLOB",
            Command::ResourceUnmapBlob { .. } => "RESOURCE_UNMAP_BLOB",
            Command::ResourceCreate3d { .. } => "RESOURCE_CREATE_3D",
            Command::TransferToHost3d { .. } => "TRANSFER_TO_HOST_3D",
            Command::TransferFromHost3d { .. } => "TRANSFER_FROM_HOST_3D",
        }
    }

    /// The queue the command belongs on.
    pub fn queue(&self) -> Queue {
        match self {
            Command::UpdateCursor { .. } | Command::MoveCursor { .. } => Queue::Cursor,
            _ => Queue::Control,
        }
    }

    /// Size of the response buffer the driver provides.
    pub fn response_len(&self) -> usize {
        match self {
            Command::GetDisplayInfo => DISPLAY_INFO_SIZE,
            Command::GetEdid { .. } => EDID_RESP_SIZE,
            Command::GetCapsetInfo { .. } => CAPSET_INFO_RESP_SIZE,
            Command::GetCapset { max_size, .. } => HDR_SIZE + *max_size as usize,
            Command::ResourceAssignUuid { .. } => UUID_RESP_SIZE,
            Command::ResourceMapBlob { .. } => MAP_INFO_RESP_SIZE,
            _ => HDR_SIZE,
        }
    }

    /// Encodes the command (header included); `fence` sets VIRTIO_GPU_FLAG_FENCE.
    pub fn encode(&self, fence: Option<u64>) -> Vec<u8> {
        self.encode_with(HdrFields::fenced(fence))
    }

    /// Encodes the command with the given header fields (fence, context, ring).
    pub fn encode_with(&self, hdr: HdrFields) -> Vec<u8> {
        let mut out = encode_hdr_with(self.code(), hdr);
        let mut put = |vals: &[u32]| {
            for v in vals {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        match self {
            Command::GetDisplayInfo => {}
            Command::GetEdid { scanout_id } => put(&[*scanout_id, 0]),
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => put(&[*resource_id, *format, *width, *height]),
            Command::ResourceUnref { resource_id }
            | Command::DetachBacking { resource_id }
            | Command::ResourceAssignUuid { resource_id }
            | Command::CtxAttachResource { resource_id }
            | Command::CtxDetachResource { resource_id }
            | Command::ResourceUnmapBlob { resource_id } => put(&[*resource_id, 0]),
            Command::GetCapsetInfo { capset_index } => put(&[*capset_index, 0]),
            Command::GetCapset {
                capset_id,
                capset_version,
                ..
            } => put(&[*capset_id, *capset_version]),
            Command::SetScanout {
                scanout_id,
                resource_id,
                rect,
            } => {
                rect.put(&mut out);
                out.extend_from_slice(&scanout_id.to_le_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
            }
            Command::ResourceFlush { resource_id, rect } => {
                rect.put(&mut out);
                out.extend_from_slice(&resource_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } => {
                rect.put(&mut out);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Command::AttachBacking {
                resource_id,
                entries,
                nr_entries,
            } => {
                let n = nr_entries.unwrap_or(entries.len() as u32);
                put(&[*resource_id, n]);
                for e in entries {
                    out.extend_from_slice(&e.addr.to_le_bytes());
                    out.extend_from_slice(&e.length.to_le_bytes());
                    out.extend_from_slice(&0u32.to_le_bytes());
                }
            }
            Command::UpdateCursor {
                scanout_id,
                x,
                y,
                resource_id,
                hot_x,
                hot_y,
            } => put(&[*scanout_id, *x, *y, 0, *resource_id, *hot_x, *hot_y, 0]),
            Command::MoveCursor { scanout_id, x, y } => put(&[*scanout_id, *x, *y, 0, 0, 0, 0, 0]),
            Command::ResourceCreateBlob {
                resource_id,
                params,
                entries,
                nr_entries,
            } => {
                let n = nr_entries.unwrap_or(entries.len() as u32);
                put(&[*resource_id, params.blob_mem, params.blob_flags, n]);
                out.extend_from_slice(&params.blob_id.to_le_bytes());
                out.extend_from_slice(&params.size.to_le_bytes());
                for e in entries {
                    out.extend_from_slice(&e.addr.to_le_bytes());
                    out.extend_from_slice(&e.length.to_le_bytes());
                    out.extend_from_slice(&0u32.to_le_bytes());
                }
            }
            Command::SetScanoutBlob {
                scanout_id,
                resource_id,
                rect,
                fb,
            } => {
                rect.put(&mut out);
                for v in [*scanout_id, *resource_id, fb.width, fb.height, fb.format, 0]
                    .iter()
                    .chain(&fb.strides)
                    .chain(&fb.offsets)
                {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Command::CtxCreate {
                context_init,
                name,
                nlen,
            } => {
                let n = nlen.unwrap_or(name.len() as u32);
                put(&[n, *context_init]);
                let mut debug_name = [0u8; CTX_NAME_SIZE];
                let len = name.len().min(CTX_NAME_SIZE);
                debug_name[..len].copy_from_slice(&name[..len]);
                out.extend_from_slice(&debug_name);
            }
            Command::CtxDestroy => {}
            Command::Submit3d { commands, size } => {
                put(&[size.unwrap_or(commands.len() as u32), 0]);
                out.extend_from_slice(commands);
            }
            Command::ResourceMapBlob {
                resource_id,
                offset,
            } => {
                put(&[*resource_id, 0]);
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Command::ResourceCreate3d {
                resource_id,
                params: c,
            } => put(&[
                *resource_id,
                c.target,
                c.format,
                c.bind,
                c.width,
                c.height,
                c.depth,
                c.array_size,
                c.last_level,
                c.nr_samples,
                c.flags,
                0, // padding
            ]),
            Command::TransferToHost3d {
                resource_id,
                transfer: t,
            }
            | Command::TransferFromHost3d {
                resource_id,
                transfer: t,
            } => {
                let b = t.bbox;
                put(&[b.x, b.y, b.z, b.w, b.h, b.d]);
                out.extend_from_slice(&t.offset.to_le_bytes());
                for v in [*resource_id, t.level, t.stride, t.layer_stride] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }
}

/// Encodes a struct virtio_gpu_ctrl_hdr with context 0.
pub fn encode_hdr(code: u32, fence: Option<u64>) -> Vec<u8> {
    encode_hdr_with(code, HdrFields::fenced(fence))
}

/// Encodes a struct virtio_gpu_ctrl_hdr with the given fence, context and ring.
pub fn encode_hdr_with(code: u32, hdr: HdrFields) -> Vec<u8> {
    let mut flags = 0;
    if hdr.fence.is_some() {
        flags |= FLAG_FENCE;
    }
    if hdr.ring_idx.is_some() {
        flags |= FLAG_INFO_RING_IDX;
    }
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&hdr.fence.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&hdr.ctx_id.to_le_bytes());
    out.push(hdr.ring_idx.unwrap_or(0));
    out.extend_from_slice(&[0u8; 3]); // padding
    out
}

/// One capability set's description, from a GET_CAPSET_INFO response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapsetInfo {
    /// Capset id.
    pub capset_id: u32,
    /// Highest supported version.
    pub max_version: u32,
    /// Size of the capset data in bytes.
    pub max_size: u32,
}

/// One scanout in a GET_DISPLAY_INFO response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisplayMode {
    /// Preferred rect.
    pub rect: Rect,
    /// Whether the display is enabled.
    pub enabled: bool,
    /// Flags.
    pub flags: u32,
}

/// A response as the device wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The response type (e.g. [`resp::OK_NODATA`]); read from the buffer whatever
    /// `used_len` says, so a device that never wrote it shows [`POISON`] bytes.
    pub kind: u32,
    /// Header flags.
    pub flags: u32,
    /// Header fence id.
    pub fence_id: u64,
    /// Header ctx id.
    pub ctx_id: u32,
    /// Header ring idx.
    pub ring_idx: u8,
    /// The used ring's len for the chain.
    pub used_len: u32,
    /// The whole response buffer.
    pub bytes: Vec<u8>,
}

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

impl Response {
    fn parse(bytes: Vec<u8>, used_len: u32) -> Response {
        let fence_id = u64::from(le32(&bytes, 8)) | (u64::from(le32(&bytes, 12)) << 32);
        Response {
            kind: le32(&bytes, 0),
            flags: le32(&bytes, 4),
            fence_id,
            ctx_id: le32(&bytes, 16),
            ring_idx: bytes.get(20).copied().unwrap_or(0),
            used_len,
            bytes,
        }
    }

    /// Whether the response type is one of the OK_* codes.
    pub fn is_ok(&self) -> bool {
        (0x1100..0x1200).contains(&self.kind)
    }

    /// The response type's name.
    pub fn kind_name(&self) -> String {
        resp::name(self.kind)
    }

    /// Parses a GET_DISPLAY_INFO payload (16 modes).
    pub fn display_modes(&self) -> Vec<DisplayMode> {
        (0..16)
            .map(|i| {
                let o = HDR_SIZE + i * 24;
                DisplayMode {
                    rect: Rect::new(
                        le32(&self.bytes, o),
                        le32(&self.bytes, o + 4),
                        le32(&self.bytes, o + 8),
                        le32(&self.bytes, o + 12),
                    ),
                    enabled: le32(&self.bytes, o + 16) != 0,
                    flags: le32(&self.bytes, o + 20),
                }
            })
            .collect()
    }

    /// Parses a RESOURCE_MAP_BLOB payload: the map_info field (cache type in the low bits).
    pub fn map_info(&self) -> u32 {
        le32(&self.bytes, HDR_SIZE)
    }

    /// Parses a RESOURCE_ASSIGN_UUID payload (None if the buffer is too short).
    pub fn uuid(&self) -> Option<[u8; 16]> {
        self.bytes.get(HDR_SIZE..UUID_RESP_SIZE)?.try_into().ok()
    }

    /// Parses a GET_CAPSET_INFO payload.
    pub fn capset_info(&self) -> CapsetInfo {
        CapsetInfo {
            capset_id: le32(&self.bytes, HDR_SIZE),
            max_version: le32(&self.bytes, HDR_SIZE + 4),
            max_size: le32(&self.bytes, HDR_SIZE + 8),
        }
    }

    /// The capset data of a GET_CAPSET response: the bytes after the header that the
    /// device reported writing (`used_len`), never more than the buffer.
    pub fn capset(&self) -> Vec<u8> {
        let end = (self.used_len as usize).min(self.bytes.len());
        self.bytes.get(HDR_SIZE..end).unwrap_or_default().to_vec()
    }

    /// Parses a GET_EDID payload: the `size` first bytes of the EDID blob (None if size > 1024).
    pub fn edid(&self) -> Option<Vec<u8>> {
        let size = le32(&self.bytes, HDR_SIZE) as usize;
        if size > 1024 {
            return None;
        }
        self.bytes
            .get(HDR_SIZE + 8..HDR_SIZE + 8 + size)
            .map(<[u8]>::to_vec)
    }
}

/// Errors of the GPU driver.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Virtqueue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// No response for a command in time.
    #[error("no response to {what} on {queue:?} queue within {timeout:?}: {source}")]
    Timeout {
        /// The command.
        what: String,
        /// The queue.
        queue: Queue,
        /// How long we waited.
        timeout: Duration,
        /// The queue's error (with ring indices).
        #[source]
        source: QueueError,
    },
    /// The command arena is full because responses were never collected.
    #[error("command arena exhausted ({0} bytes wanted); collect pending responses")]
    ArenaFull(u64),
    /// The device reported a len larger than the writable buffers.
    #[error("{what}: used len {used_len} exceeds the {writable} writable bytes offered")]
    UsedLenTooLarge {
        /// The command.
        what: String,
        /// The used len.
        used_len: u32,
        /// Writable bytes.
        writable: u32,
    },
}

/// A command in flight; redeem with [`GpuDriver::wait`].
#[derive(Debug)]
pub struct Pending {
    token: u64,
    queue: Queue,
    what: String,
    resp_addr: u64,
    resp_len: u32,
}

impl Pending {
    /// The command's name.
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// A resource's guest backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

const ARENA_SIZE: u64 = 8 << 20;

/// The virtio-gpu driver: both queues, a scratch arena for command and response buffers,
/// and per-command statistics.
pub struct GpuDriver {
    mem: Arc<GuestMemory>,
    queues: [SplitQueue; 2],
    // head -> (token, description) of the chain in flight on each queue.
    heads: [HashMap<u16, (u64, String)>; 2],
    // Descriptions of completed chains, in the order the device returned them.
    completions: Vec<String>,
    // token -> used len, for chains the device returned but nobody waited for yet.
    done: HashMap<u64, u32>,
    next_token: u64,
    arena_start: u64,
    arena_next: u64,
    outstanding: usize,
    timeout: Duration,
    stats: BTreeMap<String, u64>,
}

impl GpuDriver {
    /// Builds a driver on the given control and cursor queues.
    pub fn new(
        mem: Arc<GuestMemory>,
        control: SplitQueue,
        cursor: SplitQueue,
        timeout: Duration,
    ) -> Result<GpuDriver, GpuError> {
        let arena_start = mem.alloc(ARENA_SIZE)?;
        Ok(GpuDriver {
            mem,
            queues: [control, cursor],
            heads: [HashMap::new(), HashMap::new()],
            completions: Vec::new(),
            done: HashMap::new(),
            next_token: 1,
            arena_start,
            arena_next: arena_start,
            outstanding: 0,
            timeout,
            stats: BTreeMap::new(),
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the per-command timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Commands sent so far, by name (raw submissions count as "RAW").
    pub fn stats(&self) -> &BTreeMap<String, u64> {
        &self.stats
    }

    /// Descriptions of completed commands in the order the device returned them
    /// (fenced ones read "NAME (fence N)"). Cleared by [`GpuDriver::clear_completions`].
    pub fn completions(&self) -> &[String] {
        &self.completions
    }

    /// Forgets the completion order recorded so far.
    pub fn clear_completions(&mut self) {
        self.completions.clear();
    }

    /// The driver-side queue.
    pub fn queue(&self, q: Queue) -> &SplitQueue {
        &self.queues[q as usize]
    }

    fn arena_alloc(&mut self, len: u64) -> Result<u64, GpuError> {
        let start = self.arena_next.div_ceil(64) * 64;
        let end = start + len.max(1);
        if end > self.arena_start + ARENA_SIZE {
            return Err(GpuError::ArenaFull(len));
        }
        self.arena_next = end;
        Ok(start)
    }

    /// Puts a chain of `readable` buffers followed by one writable buffer of `writable_len`
    /// bytes (none if 0) on `queue`.
    pub fn submit_raw_parts(
        &mut self,
        queue: Queue,
        readable: &[&[u8]],
        writable_len: u32,
        what: &str,
    ) -> Result<Pending, GpuError> {
        if self.outstanding == 0 {
            // Nothing in flight: every earlier buffer is dead, start over.
            self.arena_next = self.arena_start;
        }
        let mut bufs = Vec::new();
        for part in readable {
            let addr = self.arena_alloc(part.len() as u64)?;
            self.mem.write(addr, part)?;
            bufs.push(Buffer {
                addr,
                len: part.len() as u32,
                writable: false,
            });
        }
        let resp_addr = self.arena_alloc(u64::from(writable_len))?;
        if writable_len > 0 {
            self.mem.fill(resp_addr, POISON, writable_len as usize)?;
            bufs.push(Buffer {
                addr: resp_addr,
                len: writable_len,
                writable: true,
            });
        }
        let head = self.queues[queue as usize].add(&bufs)?;
        let token = self.next_token;
        self.next_token += 1;
        self.heads[queue as usize].insert(head, (token, what.to_string()));
        self.outstanding += 1;
        Ok(Pending {
            token,
            queue,
            what: what.to_string(),
            resp_addr,
            resp_len: writable_len,
        })
    }

    /// Submits a command on its queue, optionally fenced.
    pub fn submit(&mut self, c: &Command, fence: Option<u64>) -> Result<Pending, GpuError> {
        self.submit_on(c.queue(), c, fence)
    }

    /// Submits a command on a chosen queue (to test commands on the wrong queue).
    pub fn submit_on(
        &mut self,
        queue: Queue,
        c: &Command,
        fence: Option<u64>,
    ) -> Result<Pending, GpuError> {
        self.submit_with(queue, c, HdrFields::fenced(fence))
    }

    /// Submits a command on a chosen queue with the given header fields (fence, context,
    /// ring index).
    pub fn submit_with(
        &mut self,
        queue: Queue,
        c: &Command,
        hdr: HdrFields,
    ) -> Result<Pending, GpuError> {
        *self.stats.entry(c.name().to_string()).or_default() += 1;
        let bytes = c.encode_with(hdr);
        let what = match hdr.fence {
            Some(f) => format!("{} (fence {f})", c.name()),
            None => c.name().to_string(),
        };
        self.submit_raw_parts(queue, &[&bytes], c.response_len() as u32, &what)
    }

    /// Waits (bounded by the driver timeout) for a submitted command's response.
    pub fn wait(&mut self, p: Pending) -> Result<Response, GpuError> {
        let deadline = Instant::now() + self.timeout;
        let qi = p.queue as usize;
        let used_len = loop {
            if let Some(len) = self.done.remove(&p.token) {
                break len;
            }
            let got = self.queues[qi]
                .wait_used(deadline)
                .map_err(|source| match source {
                    QueueError::Timeout { .. } => GpuError::Timeout {
                        what: p.what.clone(),
                        queue: p.queue,
                        timeout: self.timeout,
                        source,
                    },
                    other => GpuError::Queue(other),
                })?;
            for u in got {
                if let Some((token, what)) = self.heads[qi].remove(&u.id) {
                    self.done.insert(token, u.len);
                    self.completions.push(what);
                }
            }
        };
        self.outstanding = self.outstanding.saturating_sub(1);
        if used_len > p.resp_len {
            return Err(GpuError::UsedLenTooLarge {
                what: p.what,
                used_len,
                writable: p.resp_len,
            });
        }
        let bytes = self.mem.read_vec(p.resp_addr, p.resp_len as usize)?;
        Ok(Response::parse(bytes, used_len))
    }

    /// Submits and waits.
    pub fn execute(&mut self, c: &Command) -> Result<Response, GpuError> {
        let p = self.submit(c, None)?;
        self.wait(p)
    }

    /// Submits with VIRTIO_GPU_FLAG_FENCE and `fence_id`, and waits.
    pub fn execute_fenced(&mut self, c: &Command, fence_id: u64) -> Result<Response, GpuError> {
        let p = self.submit(c, Some(fence_id))?;
        self.wait(p)
    }

    /// Submits on the command's queue with the given header fields, and waits.
    pub fn execute_with(&mut self, c: &Command, hdr: HdrFields) -> Result<Response, GpuError> {
        let p = self.submit_with(c.queue(), c, hdr)?;
        self.wait(p)
    }

    /// Submits with the header's ctx_id set to `ctx_id`, and waits.
    pub fn execute_in_ctx(&mut self, ctx_id: u32, c: &Command) -> Result<Response, GpuError> {
        self.execute_with(c, HdrFields::ctx(ctx_id))
    }

    /// Sends arbitrary bytes on `queue` with a `writable_len`-byte response buffer
    /// (0: no writable descriptor). Returns (used len, response buffer).
    pub fn raw(
        &mut self,
        queue: Queue,
        readable: &[u8],
        writable_len: u32,
    ) -> Result<(u32, Vec<u8>), GpuError> {
        *self.stats.entry("RAW".to_string()).or_default() += 1;
        let p = self.submit_raw_parts(queue, &[readable], writable_len, "raw command")?;
        let r = self.wait(p)?;
        Ok((r.used_len, r.bytes))
    }

    /// GET_DISPLAY_INFO.
    pub fn get_display_info(&mut self) -> Result<Response, GpuError> {
        self.execute(&Command::GetDisplayInfo)
    }

    /// GET_EDID.
    pub fn get_edid(&mut self, scanout_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::GetEdid { scanout_id })
    }

    /// RESOURCE_CREATE_2D.
    pub fn resource_create_2d(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceCreate2d {
            resource_id,
            format,
            width,
            height,
        })
    }

    /// RESOURCE_UNREF.
    pub fn resource_unref(&mut self, resource_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceUnref { resource_id })
    }

    /// SET_SCANOUT.
    pub fn set_scanout(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        rect: Rect,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::SetScanout {
            scanout_id,
            resource_id,
            rect,
        })
    }

    /// RESOURCE_FLUSH.
    pub fn resource_flush(&mut self, resource_id: u32, rect: Rect) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceFlush { resource_id, rect })
    }

    /// TRANSFER_TO_HOST_2D.
    pub fn transfer_to_host_2d(
        &mut self,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::TransferToHost2d {
            resource_id,
            rect,
            offset,
        })
    }

    /// RESOURCE_ATTACH_BACKING.
    pub fn attach_backing(
        &mut self,
        resource_id: u32,
        entries: &[MemEntry],
    ) -> Result<Response, GpuError> {
        self.execute(&Command::AttachBacking {
            resource_id,
            entries: entries.to_vec(),
            nr_entries: None,
        })
    }

    /// RESOURCE_DETACH_BACKING.
    pub fn detach_backing(&mut self, resource_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::DetachBacking { resource_id })
    }

    /// UPDATE_CURSOR.
    pub fn update_cursor(
        &mut self,
        scanout_id: u32,
        x: u32,
        y: u32,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::UpdateCursor {
            scanout_id,
            x,
            y,
            resource_id,
            hot_x,
            hot_y,
        })
    }

    /// MOVE_CURSOR.
    pub fn move_cursor(&mut self, scanout_id: u32, x: u32, y: u32) -> Result<Response, GpuError> {
        self.execute(&Command::MoveCursor { scanout_id, x, y })
    }

    /// GET_CAPSET_INFO.
    pub fn get_capset_info(&mut self, capset_index: u32) -> Result<Response, GpuError> {
        self.execute(&Command::GetCapsetInfo { capset_index })
    }

    /// GET_CAPSET, with room for `max_size` bytes of capset data in the response.
    pub fn get_capset(
        &mut self,
        capset_id: u32,
        capset_version: u32,
        max_size: u32,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::GetCapset {
            capset_id,
            capset_version,
            max_size,
        })
    }

    /// RESOURCE_ASSIGN_UUID.
    pub fn resource_assign_uuid(&mut self, resource_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceAssignUuid { resource_id })
    }

    /// CTX_CREATE of context `ctx_id`.
    pub fn ctx_create(
        &mut self,
        ctx_id: u32,
        context_init: u32,
        name: &[u8],
    ) -> Result<Response, GpuError> {
        let c = Command::CtxCreate {
            context_init,
            name: name.to_vec(),
            nlen: None,
        };
        self.execute_in_ctx(ctx_id, &c)
    }

    /// CTX_DESTROY of context `ctx_id`.
    pub fn ctx_destroy(&mut self, ctx_id: u32) -> Result<Response, GpuError> {
        self.execute_in_ctx(ctx_id, &Command::CtxDestroy)
    }

    /// CTX_ATTACH_RESOURCE of `resource_id` to context `ctx_id`.
    pub fn ctx_attach_resource(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
    ) -> Result<Response, GpuError> {
        self.execute_in_ctx(ctx_id, &Command::CtxAttachResource { resource_id })
    }

    /// CTX_DETACH_RESOURCE of `resource_id` from context `ctx_id`.
    pub fn ctx_detach_resource(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
    ) -> Result<Response, GpuError> {
        self.execute_in_ctx(ctx_id, &Command::CtxDetachResource { resource_id })
    }

    /// SUBMIT_3D of `commands` to context `ctx_id`.
    pub fn submit_3d(&mut self, ctx_id: u32, commands: &[u8]) -> Result<Response, GpuError> {
        let c = Command::Submit3d {
            commands: commands.to_vec(),
            size: None,
        };
        self.execute_in_ctx(ctx_id, &c)
    }

    /// RESOURCE_CREATE_BLOB in context `ctx_id` (0 for guest blobs without a context).
    pub fn resource_create_blob(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
        params: BlobParams,
        entries: &[MemEntry],
    ) -> Result<Response, GpuError> {
        let c = Command::ResourceCreateBlob {
            resource_id,
            params,
            entries: entries.to_vec(),
            nr_entries: None,
        };
        self.execute_in_ctx(ctx_id, &c)
    }

    /// RESOURCE_MAP_BLOB at `offset` in the hostmem region; read the cache type with
    /// [`Response::map_info`].
    pub fn resource_map_blob(
        &mut self,
        resource_id: u32,
        offset: u64,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceMapBlob {
            resource_id,
            offset,
        })
    }

    /// RESOURCE_UNMAP_BLOB.
    pub fn resource_unmap_blob(&mut self, resource_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceUnmapBlob { resource_id })
    }

    /// SET_SCANOUT_BLOB.
    pub fn set_scanout_blob(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        rect: Rect,
        fb: BlobFb,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::SetScanoutBlob {
            scanout_id,
            resource_id,
            rect,
            fb,
        })
    }

    /// RESOURCE_CREATE_3D.
    pub fn resource_create_3d(
        &mut self,
        resource_id: u32,
        params: Create3d,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceCreate3d {
            resource_id,
            params,
        })
    }

    /// TRANSFER_TO_HOST_3D in context `ctx_id` (0 for none).
    pub fn transfer_to_host_3d(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
        transfer: Transfer3d,
    ) -> Result<Response, GpuError> {
        self.execute_in_ctx(
            ctx_id,
            &Command::TransferToHost3d {
                resource_id,
                transfer,
            },
        )
    }

    /// TRANSFER_FROM_HOST_3D in context `ctx_id` (0 for none).
    pub fn transfer_from_host_3d(
        &mut self,
        ctx_id: u32,
        resource_id: u32,
        transfer: Transfer3d,
    ) -> Result<Response, GpuError> {
        self.execute_in_ctx(
            ctx_id,
            &Command::TransferFromHost3d {
                resource_id,
                transfer,
            },
        )
    }

    /// Allocates `width*height*4` bytes of guest RAM, creates the resource and attaches the
    /// memory as one entry. Returns the backing and the two responses are required OK.
    pub fn create_backed_resource(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(Backing, Response, Response), GpuError> {
        let len = u64::from(width) * u64::from(height) * 4;
        let addr = self.mem.alloc(len)?;
        let created = self.resource_create_2d(resource_id, format, width, height)?;
        let attached = self.attach_backing(
            resource_id,
            &[MemEntry {
                addr,
                length: len as u32,
            }],
        )?;
        Ok((Backing { addr, len }, created, attached))
    }
}

#[cfg(test)]
mod tests {
    //! The two encoders (this one and the product's `protocol` crate) were written
    //! independently; here they must agree byte for byte on every blob, context and
    //! capset command, and on the spec's struct sizes.

    use super::*;
    use protocol::ipc::BackingEntry;
    use protocol::virtio_gpu as p;

    fn product(ctx_id: u32, fence: Option<u64>, cmd: p::Command) -> Vec<u8> {
        p::Request {
            hdr: p::CtrlHeader {
                type_: 0,
                flags: if fence.is_some() {
                    p::VIRTIO_GPU_FLAG_FENCE
                } else {
                    0
                },
                fence_id: fence.unwrap_or(0),
                ctx_id,
                ring_idx: 0,
            },
            cmd,
        }
        .encode()
    }

    #[test]
    fn encoders_agree_on_new_commands() {
        let rect = Rect::new(1, 2, 3, 4);
        let prect = p::Rect {
            x: 1,
            y: 2,
            width: 3,
            height: 4,
        };
        let fb = BlobFb {
            width: 64,
            height: 32,
            format: format::R8G8B8X8_UNORM,
            strides: [256, 1, 2, 3],
            offsets: [0, 4, 5, 6],
        };
        let cases: Vec<(Command, p::Command, usize)> = vec![
            (
                Command::GetCapsetInfo { capset_index: 3 },
                p::Command::GetCapsetInfo { capset_index: 3 },
                32,
            ),
            (
                Command::GetCapset {
                    capset_id: capset::VIRGL2,
                    capset_version: 2,
                    max_size: 100,
                },
                p::Command::GetCapset {
                    capset_id: 2,
                    capset_version: 2,
                },
                32,
            ),
            (
                Command::ResourceAssignUuid { resource_id: 7 },
                p::Command::ResourceAssignUuid { resource_id: 7 },
                32,
            ),
            (
                Command::ResourceCreateBlob {
                    resource_id: 7,
                    params: BlobParams::guest(8192, blob::FLAG_SHAREABLE),
                    entries: vec![
                        MemEntry {
                            addr: 0x1000,
                            length: 4096,
                        },
                        MemEntry {
                            addr: 0x9000,
                            length: 4096,
                        },
                    ],
                    nr_entries: None,
                },
                p::Command::ResourceCreateBlob {
                    resource_id: 7,
                    blob_mem: p::BlobMem::Guest,
                    blob_flags: p::VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
                    blob_id: 0,
                    size: 8192,
                    entries: vec![
                        BackingEntry {
                            addr: 0x1000,
                            length: 4096,
                        },
                        BackingEntry {
                            addr: 0x9000,
                            length: 4096,
                        },
                    ],
                },
                56 + 32,
            ),
            (
                Command::ResourceCreateBlob {
                    resource_id: 8,
                    params: BlobParams::host3d(0xfeed, 1 << 20, blob::FLAG_MAPPABLE),
                    entries: vec![],
                    nr_entries: None,
                },
                p::Command::ResourceCreateBlob {
                    resource_id: 8,
                    blob_mem: p::BlobMem::Host3d,
                    blob_flags: p::VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                    blob_id: 0xfeed,
                    size: 1 << 20,
                    entries: vec![],
                },
                56,
            ),
            (
                Command::SetScanoutBlob {
                    scanout_id: 1,
                    resource_id: 8,
                    rect,
                    fb,
                },
                p::Command::SetScanoutBlob {
                    scanout_id: 1,
                    resource_id: 8,
                    rect: prect,
                    width: 64,
                    height: 32,
                    format: p::Format::R8G8B8X8Unorm,
                    strides: [256, 1, 2, 3],
                    offsets: [0, 4, 5, 6],
                },
                96,
            ),
            (
                Command::CtxCreate {
                    context_init: capset::CROSS_DOMAIN,
                    name: b"test-ctx".to_vec(),
                    nlen: None,
                },
                p::Command::CtxCreate {
                    context_init: p::VIRTIO_GPU_CAPSET_CROSS_DOMAIN,
                    name: b"test-ctx".to_vec(),
                },
                96,
            ),
            (Command::CtxDestroy, p::Command::CtxDestroy, 24),
            (
                Command::CtxAttachResource { resource_id: 9 },
                p::Command::CtxAttachResource { resource_id: 9 },
                32,
            ),
            (
                Command::CtxDetachResource { resource_id: 9 },
                p::Command::CtxDetachResource { resource_id: 9 },
                32,
            ),
            (
                Command::Submit3d {
                    commands: vec![1, 2, 3, 4, 5],
                    size: None,
                },
                p::Command::Submit3d {
                    commands: vec![1, 2, 3, 4, 5],
                },
                32 + 5,
            ),
            (
                Command::ResourceMapBlob {
                    resource_id: 9,
                    offset: 0x1_0000_2000,
                },
                p::Command::ResourceMapBlob {
                    resource_id: 9,
                    offset: 0x1_0000_2000,
                },
                40,
            ),
            (
                Command::ResourceUnmapBlob { resource_id: 9 },
                p::Command::ResourceUnmapBlob { resource_id: 9 },
                32,
            ),
            (
                Command::ResourceCreate3d {
                    resource_id: 9,
                    params: Create3d {
                        target: target::TEXTURE_3D,
                        format: format::R8G8B8A8_UNORM,
                        bind: bind::SAMPLER_VIEW | bind::RENDER_TARGET,
                        width: 64,
                        height: 32,
                        depth: 16,
                        array_size: 1,
                        last_level: 5,
                        nr_samples: 0,
                        flags: 1,
                    },
                },
                p::Command::ResourceCreate3d {
                    resource_id: 9,
                    args: protocol::ipc::Resource3d {
                        target: p::PIPE_TEXTURE_3D,
                        format: 67,
                        bind: 10,
                        width: 64,
                        height: 32,
                        depth: 16,
                        array_size: 1,
                        last_level: 5,
                        nr_samples: 0,
                        flags: 1,
                    },
                },
                72,
            ),
        ];
        for (ours, theirs, len) in cases {
            assert_eq!(ours.code(), theirs.cmd_type(), "{}", ours.name());
            assert_eq!(ours.queue(), Queue::Control, "{}", ours.name());
            let hdr = HdrFields {
                fence: Some(11),
                ctx_id: 5,
                ring_idx: None,
            };
            let b = ours.encode_with(hdr);
            assert_eq!(b.len(), len, "{}", ours.name());
            assert_eq!(b, product(5, Some(11), theirs), "{}", ours.name());
        }
    }

    #[test]
    fn encoders_agree_on_3d_transfers() {
        let ours = Transfer3d {
            bbox: Box3 {
                x: 1,
                y: 2,
                z: 3,
                w: 4,
                h: 5,
                d: 6,
            },
            offset: 0x1_0000_0040,
            level: 2,
            stride: 256,
            layer_stride: 8192,
        };
        let theirs = p::TransferHost3d {
            bbox: protocol::ipc::Box3d {
                x: 1,
                y: 2,
                z: 3,
                w: 4,
                h: 5,
                d: 6,
            },
            offset: 0x1_0000_0040,
            level: 2,
            stride: 256,
            layer_stride: 8192,
        };
        for (c, pc) in [
            (
                Command::TransferToHost3d {
                    resource_id: 3,
                    transfer: ours,
                },
                p::Command::TransferToHost3d {
                    resource_id: 3,
                    transfer: theirs,
                },
            ),
            (
                Command::TransferFromHost3d {
                    resource_id: 3,
                    transfer: ours,
                },
                p::Command::TransferFromHost3d {
                    resource_id: 3,
                    transfer: theirs,
                },
            ),
        ] {
            assert_eq!(c.code(), pc.cmd_type(), "{}", c.name());
            let b = c.encode_with(HdrFields {
                fence: Some(4),
                ctx_id: 7,
                ring_idx: None,
            });
            assert_eq!(b.len(), 72, "{}", c.name());
            assert_eq!(b, product(7, Some(4), pc), "{}", c.name());
            // Field positions spelled out once, independent of the product's encoder.
            assert_eq!(le32(&b, 24), 1);
            assert_eq!(le32(&b, 44), 6);
            assert_eq!((le32(&b, 48), le32(&b, 52)), (0x40, 1));
            assert_eq!(le32(&b, 56), 3);
            assert_eq!(le32(&b, 68), 8192);
        }
    }

    #[test]
    fn header_fields() {
        let b = encode_hdr_with(
            cmd::SUBMIT_3D,
            HdrFields {
                fence: Some(0x0102_0304_0506_0708),
                ctx_id: 0xaabb,
                ring_idx: Some(3),
            },
        );
        assert_eq!(b.len(), HDR_SIZE);
        assert_eq!(le32(&b, 0), cmd::SUBMIT_3D);
        assert_eq!(le32(&b, 4), FLAG_FENCE | FLAG_INFO_RING_IDX);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(le32(&b, 16), 0xaabb);
        assert_eq!(&b[20..24], &[3, 0, 0, 0]);
        // The old entry point still writes context 0 and no ring.
        assert_eq!(
            encode_hdr(cmd::GET_DISPLAY_INFO, Some(1)),
            encode_hdr_with(cmd::GET_DISPLAY_INFO, HdrFields::fenced(Some(1)))
        );
        assert_eq!(le32(&encode_hdr(cmd::GET_DISPLAY_INFO, None), 16), 0);
    }

    #[test]
    fn lying_counts_and_long_names() {
        let c = Command::CtxCreate {
            context_init: 0,
            name: vec![b'a'; 80],
            nlen: None,
        };
        let b = c.encode(None);
        assert_eq!(b.len(), HDR_SIZE + 8 + CTX_NAME_SIZE);
        assert_eq!(le32(&b, HDR_SIZE), 80);
        let c = Command::CtxCreate {
            context_init: 0,
            name: b"ab".to_vec(),
            nlen: Some(65),
        };
        assert_eq!(le32(&c.encode(None), HDR_SIZE), 65);
        let c = Command::Submit3d {
            commands: vec![0; 4],
            size: Some(u32::MAX),
        };
        let b = c.encode(None);
        assert_eq!((b.len(), le32(&b, HDR_SIZE)), (HDR_SIZE + 12, u32::MAX));
        let c = Command::ResourceCreateBlob {
            resource_id: 1,
            params: BlobParams::guest(4096, 0),
            entries: vec![],
            nr_entries: Some(7),
        };
        assert_eq!(le32(&c.encode(None), HDR_SIZE + 12), 7);
    }

    #[test]
    fn response_lengths_and_parsers() {
        assert_eq!(
            Command::GetCapsetInfo { capset_index: 0 }.response_len(),
            40
        );
        assert_eq!(
            Command::GetCapset {
                capset_id: 1,
                capset_version: 0,
                max_size: 308
            }
            .response_len(),
            HDR_SIZE + 308
        );
        assert_eq!(
            Command::ResourceAssignUuid { resource_id: 1 }.response_len(),
            40
        );
        assert_eq!(
            Command::ResourceMapBlob {
                resource_id: 1,
                offset: 0
            }
            .response_len(),
            32
        );
        assert_eq!(Command::CtxDestroy.response_len(), HDR_SIZE);

        let info = p::encode_response(
            None,
            &p::Response::OkCapsetInfo {
                capset_id: 5,
                max_version: 1,
                max_size: 64,
            },
        );
        let r = Response::parse(info.clone(), info.len() as u32);
        assert_eq!(r.kind, resp::OK_CAPSET_INFO);
        assert_eq!(
            r.capset_info(),
            CapsetInfo {
                capset_id: 5,
                max_version: 1,
                max_size: 64
            }
        );

        let mut data = p::encode_response(None, &p::Response::OkCapset(vec![9; 10]));
        let used = data.len() as u32;
        data.resize(HDR_SIZE + 64, POISON);
        let r = Response::parse(data, used);
        assert_eq!(r.capset(), vec![9; 10]);
        // A used_len beyond the buffer or short of the header never panics.
        assert_eq!(Response::parse(vec![0; 30], 1000).capset().len(), 6);
        assert!(Response::parse(vec![0; 30], 3).capset().is_empty());

        let uuid: [u8; 16] = core::array::from_fn(|i| i as u8);
        let b = p::encode_response(None, &p::Response::OkResourceUuid(uuid));
        let r = Response::parse(b, 40);
        assert_eq!(r.kind_name(), "OK_RESOURCE_UUID");
        assert_eq!(r.uuid(), Some(uuid));
        assert_eq!(Response::parse(vec![0; 39], 39).uuid(), None);

        let b = p::encode_response(
            None,
            &p::Response::OkMapInfo {
                map_info: blob::MAP_CACHE_WC,
            },
        );
        let r = Response::parse(b, 32);
        assert_eq!(r.kind_name(), "OK_MAP_INFO");
        assert_eq!(r.map_info() & blob::MAP_CACHE_MASK, blob::MAP_CACHE_WC);
    }
}
