//! Overflow-checked rectangle arithmetic shared by every bounds check in the worker.

use protocol::ipc::RenderError;
use protocol::virtio_gpu::Rect;

use crate::backend::BYTES_PER_PIXEL;

/// Checks that `rect` lies inside a `width` x `height` surface (with overflow checks).
pub fn check_rect_inside(rect: &Rect, width: u32, height: u32) -> Result<(), RenderError> {
    let right = rect.x.checked_add(rect.width);
    let bottom = rect.y.checked_add(rect.height);
    match (right, bottom) {
        (Some(r), Some(b)) if r <= width && b <= height => Ok(()),
        _ => Err(RenderError::InvalidParameter(format!(
            "rect {}x{}+{}+{} outside {width}x{height}",
            rect.width, rect.height, rect.x, rect.y
        ))),
    }
}

/// Whether the rect covers no pixel.
pub fn is_empty(rect: &Rect) -> bool {
    rect.width == 0 || rect.height == 0
}

/// Bytes a buffer laid out at resource coordinates with `stride` bytes per row needs so
/// that `rect` fits: up to the end of the rect's last row. `None` on overflow or if a row
/// of the rect does not fit in `stride`. Zero for an empty rect.
pub fn strided_extent(rect: &Rect, stride: u32) -> Option<u64> {
    if is_empty(rect) {
        return Some(0);
    }
    let bpp = u64::from(BYTES_PER_PIXEL);
    let row_end = (u64::from(rect.x) + u64::from(rect.width)) * bpp;
    if row_end > u64::from(stride) {
        return None;
    }
    let last_row = u64::from(rect.y) + u64::from(rect.height) - 1;
    last_row
        .checked_mul(u64::from(stride))?
        .checked_add(row_end)
}

/// Bytes of a packed `width` x `height` surface at 4 bytes per pixel (`None` on overflow).
pub fn packed_size(width: u32, height: u32) -> Option<u64> {
    u64::from(width)
        .checked_mul(u64::from(height))?
        .checked_mul(u64::from(BYTES_PER_PIXEL))
}

/// Checks the arguments of a new 2D resource against the virtio-gpu formats and the
/// per-VM maximum side, as every backend must before its library sees them.
pub fn check_new_2d(
    format: u32,
    width: u32,
    height: u32,
    max_dimension: u32,
) -> Result<(), RenderError> {
    if !crate::backend::VIRTIO_GPU_FORMATS.contains(&format) {
        return Err(RenderError::InvalidParameter(format!("format {format}")));
    }
    if width == 0 || height == 0 || width > max_dimension || height > max_dimension {
        return Err(RenderError::InvalidParameter(format!(
            "size {width}x{height} (at most {max_dimension} per side)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn rect_bounds() {
        assert!(check_rect_inside(&rect(0, 0, 4, 4), 4, 4).is_ok());
        assert!(check_rect_inside(&rect(1, 0, 4, 4), 4, 4).is_err());
        assert!(check_rect_inside(&rect(u32::MAX, 0, 2, 1), 4, 4).is_err());
        assert!(check_rect_inside(&rect(0, u32::MAX, 1, 2), 4, 4).is_err());
    }

    #[test]
    fn extents() {
        assert_eq!(strided_extent(&rect(1, 2, 3, 2), 32), Some(3 * 32 + 16));
        assert_eq!(strided_extent(&rect(1, 2, 8, 2), 32), None);
        assert_eq!(strided_extent(&rect(0, 0, 0, 9), 0), Some(0));
        assert_eq!(packed_size(u32::MAX, u32::MAX), None);
        assert_eq!(packed_size(3, 5), Some(60));
    }
}
