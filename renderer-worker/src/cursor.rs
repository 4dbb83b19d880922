//! Cursor images: a fixed 64x64 block of pixels the frontend forwards to the VMM.

use protocol::ipc::RenderError;
use protocol::virtio_gpu::Rect;

use crate::backend::{Renderer, BYTES_PER_PIXEL};
use crate::resources::ResourceInfo;

/// Cursor width and height in pixels (virtio-gpu cursors are always 64x64).
pub const CURSOR_SIZE: u32 = 64;
/// Bytes of a cursor image: 64 rows of 64 pixels, 4 bytes each.
pub const CURSOR_BYTES: usize = (CURSOR_SIZE * CURSOR_SIZE * BYTES_PER_PIXEL) as usize;

/// Reads the top-left 64x64 pixels of a resource (clipped to its size; the rest stays
/// zero, so no stale or uninitialised bytes reach the guest-visible cursor).
pub fn read_cursor(
    renderer: &mut dyn Renderer,
    resource_id: u32,
    info: ResourceInfo,
) -> Result<Vec<u8>, RenderError> {
    let mut image = vec![0u8; CURSOR_BYTES];
    let rect = Rect {
        x: 0,
        y: 0,
        width: info.width.min(CURSOR_SIZE),
        height: info.height.min(CURSOR_SIZE),
    };
    renderer.read_rect(resource_id, rect, CURSOR_SIZE * BYTES_PER_PIXEL, &mut image)?;
    Ok(image)
}
