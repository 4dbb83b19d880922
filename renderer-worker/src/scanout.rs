//! Scanout buffers: frontend-allocated, sealed memfds that the worker maps and fills with
//! a scanout's resource pixels on each flush, so the frontend can hand them to the VMM
//! without ever seeing a renderer pointer.
//!
//! A 2D scanout's buffer holds the whole resource at resource coordinates; a blob
//! scanout's (SET_SCANOUT_BLOB) holds the whole framebuffer, packed, at framebuffer
//! coordinates, and each flushed row is copied out of the blob with its own layout.

use std::os::fd::OwnedFd;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::stat::fstat;
use protocol::config::MAX_SCANOUTS;
use protocol::ipc::{BlobScanout, RenderError};
use protocol::virtio_gpu::Rect;

use crate::backend::{Renderer, BYTES_PER_PIXEL};
use crate::geometry::{check_rect_inside, is_empty, strided_extent};
use crate::mapping::SharedMapping;
use crate::resources::ResourceLedger;

/// Where a scanout's pixels come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// A 2D resource, read with [`Renderer::read_rect`].
    Resource,
    /// A blob, read row by row with [`Renderer::read_blob`] at this layout.
    Blob(BlobScanout),
}

/// The buffer bound to one scanout.
#[derive(Debug)]
struct ScanoutBuffer {
    resource_id: u32,
    stride: u32,
    source: Source,
    mapping: SharedMapping,
}

/// Every scanout's buffer, if bound.
#[derive(Debug)]
pub struct Scanouts {
    slots: Vec<Option<ScanoutBuffer>>,
}

fn invalid(msg: String) -> RenderError {
    RenderError::InvalidParameter(msg)
}

/// Maps a frontend's scanout memfd of `size` bytes after checking that the file really
/// holds that many bytes and is sealed against shrinking, so a flush can never fault.
fn map_buffer(fd: &OwnedFd, size: u64) -> Result<SharedMapping, RenderError> {
    let len = usize::try_from(size).map_err(|_| invalid(format!("size {size}")))?;
    let stat = fstat(fd).map_err(|e| invalid(format!("fstat of scanout buffer: {e}")))?;
    if u64::try_from(stat.st_size).unwrap_or(0) < size {
        return Err(invalid(format!(
            "scanout memfd holds {} bytes, {size} announced",
            stat.st_size
        )));
    }
    let seals = fcntl(fd, FcntlArg::F_GET_SEALS)
        .map(SealFlag::from_bits_truncate)
        .map_err(|e| invalid(format!("scanout buffer is not a sealable memfd: {e}")))?;
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        return Err(invalid(
            "scanout memfd is not sealed against shrinking".into(),
        ));
    }
    SharedMapping::new(fd, 0, len)
}

impl Scanouts {
    /// `count` unbound scanouts (capped at virtio-gpu's 16).
    pub fn new(count: usize) -> Self {
        let mut slots = Vec::new();
        slots.resize_with(count.min(MAX_SCANOUTS), || None);
        Scanouts { slots }
    }

    fn slot(&mut self, scanout_id: u32) -> Result<&mut Option<ScanoutBuffer>, RenderError> {
        let count = self.slots.len();
        self.slots
            .get_mut(scanout_id as usize)
            .ok_or_else(|| invalid(format!("scanout {scanout_id} (device has {count})")))
    }

    /// Maps `fd` as the buffer of `scanout_id`, showing `resource_id`, replacing any
    /// previous buffer. The buffer must hold the whole resource at `stride` bytes per row
    /// and be sealed against shrinking, so a later flush can never fault on it.
    pub fn bind(
        &mut self,
        ledger: &ResourceLedger,
        scanout_id: u32,
        resource_id: u32,
        size: u64,
        stride: u32,
        fd: OwnedFd,
    ) -> Result<(), RenderError> {
        self.slot(scanout_id)?;
        let info = ledger.get(resource_id)?;
        let needed = u64::from(info.width) * u64::from(BYTES_PER_PIXEL);
        if u64::from(stride) < needed {
            return Err(invalid(format!(
                "stride {stride} < {needed} for width {}",
                info.width
            )));
        }
        let min_size = u64::from(stride) * u64::from(info.height);
        if size < min_size {
            return Err(invalid(format!(
                "scanout buffer of {size} bytes, resource needs {min_size}"
            )));
        }
        let mapping = map_buffer(&fd, size)?;
        *self.slot(scanout_id)? = Some(ScanoutBuffer {
            resource_id,
            stride,
            source: Source::Resource,
            mapping,
        });
        Ok(())
    }

    /// Maps `fd` as the buffer of `scanout_id`, showing the framebuffer `layout` of blob
    /// `resource_id`, replacing any previous buffer. The buffer holds the framebuffer
    /// packed (`layout.width * 4` bytes per row) and must be sealed against shrinking.
    /// The caller bounds the framebuffer's sides by the device's maximum dimension.
    pub fn bind_blob(
        &mut self,
        ledger: &ResourceLedger,
        scanout_id: u32,
        resource_id: u32,
        layout: BlobScanout,
        size: u64,
        fd: OwnedFd,
    ) -> Result<(), RenderError> {
        self.slot(scanout_id)?;
        if !ledger.get(resource_id)?.blob {
            return Err(invalid(format!("resource {resource_id} is not a blob")));
        }
        let BlobScanout {
            width,
            height,
            stride,
            ..
        } = layout;
        let row = width
            .checked_mul(BYTES_PER_PIXEL)
            .filter(|_| width != 0 && height != 0)
            .ok_or_else(|| invalid(format!("blob framebuffer {width}x{height}")))?;
        if stride < row {
            return Err(invalid(format!(
                "blob stride {stride} < {row} for width {width}"
            )));
        }
        let min_size = u64::from(row) * u64::from(height);
        if size < min_size {
            return Err(invalid(format!(
                "scanout buffer of {size} bytes, framebuffer needs {min_size}"
            )));
        }
        let mapping = map_buffer(&fd, size)?;
        *self.slot(scanout_id)? = Some(ScanoutBuffer {
            resource_id,
            stride: row,
            source: Source::Blob(layout),
            mapping,
        });
        Ok(())
    }

    /// Unbinds and unmaps a scanout's buffer (a no-op if none is bound).
    pub fn disable(&mut self, scanout_id: u32) -> Result<(), RenderError> {
        *self.slot(scanout_id)? = None;
        Ok(())
    }

    /// Copies `rect` of the scanout's resource into its buffer at resource coordinates
    /// (framebuffer coordinates for a blob scanout).
    pub fn flush(
        &mut self,
        renderer: &mut dyn Renderer,
        ledger: &ResourceLedger,
        scanout_id: u32,
        rect: Rect,
    ) -> Result<(), RenderError> {
        let buffer = self
            .slot(scanout_id)?
            .as_mut()
            .ok_or_else(|| invalid(format!("scanout {scanout_id} has no buffer")))?;
        let info = ledger.get(buffer.resource_id)?;
        let (width, height) = match buffer.source {
            Source::Resource => (info.width, info.height),
            Source::Blob(layout) => (layout.width, layout.height),
        };
        check_rect_inside(&rect, width, height)?;
        let extent = strided_extent(&rect, buffer.stride)
            .filter(|e| *e <= buffer.mapping.len() as u64)
            .ok_or_else(|| {
                invalid(format!(
                    "rect {rect:?} does not fit scanout {scanout_id}'s buffer"
                ))
            })?;
        log::trace!("flush scanout {scanout_id}: {extent} bytes span");
        match buffer.source {
            Source::Resource => renderer.read_rect(
                buffer.resource_id,
                rect,
                buffer.stride,
                buffer.mapping.as_mut_slice(),
            ),
            Source::Blob(layout) => {
                if !info.blob {
                    return Err(invalid(format!(
                        "resource {} is no longer a blob",
                        buffer.resource_id
                    )));
                }
                flush_blob_rows(renderer, buffer, layout, rect)
            }
        }
    }

    /// Unbinds every scanout.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
    }
}

/// Copies each row of `rect` out of the blob (at `layout`) into the buffer (packed, at
/// framebuffer coordinates). The rect has been checked against the framebuffer and the
/// buffer; the blob extent is checked here before any byte is written, so a framebuffer
/// that does not fit the blob changes nothing.
fn flush_blob_rows(
    renderer: &mut dyn Renderer,
    buffer: &mut ScanoutBuffer,
    layout: BlobScanout,
    rect: Rect,
) -> Result<(), RenderError> {
    if is_empty(&rect) {
        return Ok(());
    }
    let bpp = u64::from(BYTES_PER_PIXEL);
    let too_far = || invalid(format!("rect {rect:?} of blob layout {layout:?} overflows"));
    // Byte in the blob of pixel (x, y) of the framebuffer.
    let src_of = |x: u32, y: u32| -> Option<u64> {
        u64::from(y)
            .checked_mul(u64::from(layout.stride))?
            .checked_add(u64::from(x) * bpp)?
            .checked_add(layout.offset)
    };
    let row_len = u64::from(rect.width) * bpp;
    let last_row = rect.y + rect.height - 1; // inside the framebuffer: no overflow
    let end = src_of(rect.x, last_row)
        .and_then(|s| s.checked_add(row_len))
        .ok_or_else(too_far)?;
    // An empty read at the end offset asks the backend whether the rect lies in the blob.
    renderer.read_blob(buffer.resource_id, end, &mut [])?;
    let row_len = usize::try_from(row_len).map_err(|_| too_far())?;
    let stride = buffer.stride as usize;
    let dst = buffer.mapping.as_mut_slice();
    for y in rect.y..=last_row {
        let src = src_of(rect.x, y).ok_or_else(too_far)?;
        let at = (y as usize)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(rect.x as usize * BYTES_PER_PIXEL as usize))
            .ok_or_else(too_far)?;
        let row = at
            .checked_add(row_len)
            .and_then(|e| dst.get_mut(at..e))
            .ok_or_else(too_far)?;
        renderer.read_blob(buffer.resource_id, src, row)?;
    }
    Ok(())
}
