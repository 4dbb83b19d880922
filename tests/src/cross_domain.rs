//! A guest-side encoder for the cross-domain context protocol (capset 5), as far as a
//! device without channels (no Wayland/X11 sockets) can run it: set up the query ring,
//! ask for an image's memory requirements, and read the answer.
//!
//! Every command is little-endian and starts with an 8-byte header:
//!
//! ```text
//! offset size field
//!      0    1 cmd        (1 INIT, 2 GET_IMAGE_REQUIREMENTS, 3 POLL, ...)
//!      1    1 ring_idx   (0)
//!      2    2 cmd_size   (bytes of the whole command, header included)
//!      4    4 pad        (0)
//! ```
//!
//! - INIT (20 bytes): header, `query_ring_id: u32` (a BLOB_MEM_GUEST resource attached to
//!   the context, whose first bytes receive the answers), `channel_ring_id: u32`,
//!   `channel_type: u32` (0: no channel). A 16-byte legacy form and a 36-byte form with a
//!   socket uuid exist too.
//! - GET_IMAGE_REQUIREMENTS (24 bytes): header, `width`, `height`, `drm_format` (fourcc),
//!   `flags` (gralloc usage bits; 0 is fine). The renderer writes an
//!   [`ImageRequirements`] (64 bytes) at offset 0 of the query ring, synchronously.
//! - POLL (16 bytes): header, 8 bytes of padding; a no-op without a channel.
//!
//! The answer's `blob_id` then names the allocation in RESOURCE_CREATE_BLOB
//! (BLOB_MEM_HOST3D, the same context, `size` equal to the answer's `size`): the host
//! allocates shared memory for it, which RESOURCE_MAP_BLOB maps into the guest.

/// CROSS_DOMAIN_CMD_INIT.
pub const CMD_INIT: u8 = 1;
/// CROSS_DOMAIN_CMD_GET_IMAGE_REQUIREMENTS.
pub const CMD_GET_IMAGE_REQUIREMENTS: u8 = 2;
/// CROSS_DOMAIN_CMD_POLL.
pub const CMD_POLL: u8 = 3;
/// CROSS_DOMAIN_CMD_SEND (needs a channel).
pub const CMD_SEND: u8 = 4;

/// Bytes of the command header.
pub const HEADER_SIZE: usize = 8;
/// Bytes of an INIT command (the form with a channel ring, without a socket uuid).
pub const INIT_SIZE: usize = 20;
/// Bytes of a GET_IMAGE_REQUIREMENTS command.
pub const GET_IMAGE_REQUIREMENTS_SIZE: usize = 24;
/// Bytes of a POLL command.
pub const POLL_SIZE: usize = 16;
/// Bytes of the answer to GET_IMAGE_REQUIREMENTS in the query ring.
pub const IMAGE_REQUIREMENTS_SIZE: usize = 64;
/// Bytes of the cross-domain capset.
pub const CAPABILITIES_SIZE: usize = 16;

/// The cross-domain capset id.
pub const CAPSET_CROSS_DOMAIN: u32 = 5;

/// A DRM fourcc code.
pub const fn fourcc(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_le_bytes([a, b, c, d])
}

/// DRM_FORMAT_XRGB8888 ('XR24'): 4 bytes per pixel.
pub const DRM_FORMAT_XRGB8888: u32 = fourcc(b'X', b'R', b'2', b'4');
/// DRM_FORMAT_ARGB8888 ('AR24').
pub const DRM_FORMAT_ARGB8888: u32 = fourcc(b'A', b'R', b'2', b'4');

/// The 8-byte header of a `size`-byte command `cmd`.
pub fn header(cmd: u8, size: usize) -> [u8; HEADER_SIZE] {
    let size = u16::try_from(size).expect("cross-domain commands are at most 64 KiB");
    let s = size.to_le_bytes();
    [cmd, 0, s[0], s[1], 0, 0, 0, 0]
}

fn push_u32s(out: &mut Vec<u8>, words: &[u32]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// INIT with `query_ring_id` as the query ring and no channel.
pub fn init(query_ring_id: u32) -> Vec<u8> {
    init_with_channel(query_ring_id, 0, 0)
}

/// INIT naming a channel (`channel_type` 1 is Wayland); refused by a device without
/// channels.
pub fn init_with_channel(query_ring_id: u32, channel_ring_id: u32, channel_type: u32) -> Vec<u8> {
    let mut out = header(CMD_INIT, INIT_SIZE).to_vec();
    push_u32s(&mut out, &[query_ring_id, channel_ring_id, channel_type]);
    out
}

/// GET_IMAGE_REQUIREMENTS for a `width` x `height` image of fourcc `drm_format`.
pub fn get_image_requirements(width: u32, height: u32, drm_format: u32, flags: u32) -> Vec<u8> {
    let mut out = header(CMD_GET_IMAGE_REQUIREMENTS, GET_IMAGE_REQUIREMENTS_SIZE).to_vec();
    push_u32s(&mut out, &[width, height, drm_format, flags]);
    out
}

/// POLL (a no-op without a channel).
pub fn poll() -> Vec<u8> {
    let mut out = header(CMD_POLL, POLL_SIZE).to_vec();
    out.extend_from_slice(&[0; 8]);
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The answer to GET_IMAGE_REQUIREMENTS, as the host writes it into the query ring.
///
/// ```text
/// offset size field
///      0   16 strides[4]   u32 each
///     16   16 offsets[4]   u32 each
///     32    8 modifier     u64
///     40    8 size         u64 (page-rounded)
///     48    4 blob_id      u32: the blob_id for RESOURCE_CREATE_BLOB
///     52    4 map_info     u32: VIRTIO_GPU_MAP_CACHE_* (1: cached)
///     56    4 memory_idx   i32 (-1 without Vulkan)
///     60    4 physical_device_idx i32 (-1)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRequirements {
    /// Bytes per row of each plane.
    pub strides: [u32; 4],
    /// Offset of each plane.
    pub offsets: [u32; 4],
    /// DRM format modifier.
    pub modifier: u64,
    /// Bytes to allocate (the blob's size).
    pub size: u64,
    /// The blob_id naming this allocation in RESOURCE_CREATE_BLOB.
    pub blob_id: u32,
    /// VIRTIO_GPU_MAP_CACHE_* of a mapping.
    pub map_info: u32,
    /// Vulkan memory type index, -1 without Vulkan.
    pub memory_idx: i32,
    /// Deprecated, -1.
    pub physical_device_idx: i32,
}

impl ImageRequirements {
    /// Parses the first [`IMAGE_REQUIREMENTS_SIZE`] bytes of the query ring.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < IMAGE_REQUIREMENTS_SIZE {
            return None;
        }
        let mut strides = [0; 4];
        let mut offsets = [0; 4];
        for i in 0..4 {
            strides[i] = u32_at(bytes, 4 * i);
            offsets[i] = u32_at(bytes, 16 + 4 * i);
        }
        Some(ImageRequirements {
            strides,
            offsets,
            modifier: u64_at(bytes, 32),
            size: u64_at(bytes, 40),
            blob_id: u32_at(bytes, 48),
            map_info: u32_at(bytes, 52),
            memory_idx: u32_at(bytes, 56) as i32,
            physical_device_idx: u32_at(bytes, 60) as i32,
        })
    }
}

/// The cross-domain capset (GET_CAPSET of capset 5, version 0): four u32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Protocol version (1: every command up to WRITE).
    pub version: u32,
    /// Bit `1 << channel_type` for each channel the host offers (0: none).
    pub supported_channels: u32,
    /// Whether blobs may be dma-bufs.
    pub supports_dmabuf: u32,
    /// Whether external GPU memory is supported.
    pub supports_external_gpu_memory: u32,
}

impl Capabilities {
    /// Parses the capset bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != CAPABILITIES_SIZE {
            return None;
        }
        Some(Capabilities {
            version: u32_at(bytes, 0),
            supported_channels: u32_at(bytes, 4),
            supports_dmabuf: u32_at(bytes, 8),
            supports_external_gpu_memory: u32_at(bytes, 12),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_have_their_documented_bytes() {
        assert_eq!(
            init(7),
            [1, 0, 20, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let reqs = get_image_requirements(64, 32, DRM_FORMAT_XRGB8888, 0);
        assert_eq!(reqs.len(), GET_IMAGE_REQUIREMENTS_SIZE);
        assert_eq!(reqs[..8], [2, 0, 24, 0, 0, 0, 0, 0]);
        assert_eq!(reqs[8..12], 64u32.to_le_bytes());
        assert_eq!(&reqs[16..20], b"XR24");
        assert_eq!(poll()[..4], [3, 0, 16, 0]);
    }

    #[test]
    fn answers_parse() {
        let mut ring = vec![0u8; 64];
        ring[0..4].copy_from_slice(&256u32.to_le_bytes());
        ring[40..48].copy_from_slice(&16384u64.to_le_bytes());
        ring[48..52].copy_from_slice(&2u32.to_le_bytes());
        ring[52..56].copy_from_slice(&1u32.to_le_bytes());
        ring[56..64].copy_from_slice(&[0xff; 8]);
        let r = ImageRequirements::parse(&ring).unwrap();
        assert_eq!(
            (r.strides[0], r.size, r.blob_id, r.map_info),
            (256, 16384, 2, 1)
        );
        assert_eq!((r.memory_idx, r.physical_device_idx), (-1, -1));
        assert!(ImageRequirements::parse(&ring[..63]).is_none());
        let caps = Capabilities::parse(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(caps.map(|c| c.version), Some(1));
    }
}
