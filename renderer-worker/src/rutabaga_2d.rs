//! The 2D backend: rutabaga_gfx's `Rutabaga2D` component, which keeps each resource as a
//! host buffer and copies pixels between it and guest memory.

use std::collections::BTreeMap;
use std::io::IoSliceMut;

use protocol::config::Limits;
use protocol::ipc::{FenceInfo, RenderError};
use protocol::virtio_gpu::Rect;
use rutabaga_gfx::{
    Rutabaga, RutabagaBuilder, RutabagaComponentType, RutabagaError, RutabagaFence,
    RutabagaFenceHandler, RutabagaIovec, Transfer3D, RUTABAGA_FLAG_FENCE,
    RUTABAGA_PIPE_BIND_RENDER_TARGET, RUTABAGA_PIPE_TEXTURE_2D,
};

use crate::backend::{Renderer, BYTES_PER_PIXEL, VIRTIO_GPU_FORMATS};
use crate::geometry::{check_rect_inside, is_empty, packed_size, strided_extent};
use crate::guest_memory::Backing;

/// What this backend remembers of a resource beside rutabaga's own record: its size for
/// bounds checks, and the backing that keeps the guest memory rutabaga points into mapped.
struct Resource2d {
    width: u32,
    height: u32,
    backing: Option<Backing>,
}

/// The rutabaga 2D renderer.
pub struct Rutabaga2d {
    rutabaga: Rutabaga,
    resources: BTreeMap<u32, Resource2d>,
    limits: Limits,
}

impl std::fmt::Debug for Rutabaga2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rutabaga2d")
            .field("resources", &self.resources.len())
            .finish_non_exhaustive()
    }
}

fn from_rutabaga(resource_id: u32, err: RutabagaError) -> RenderError {
    match err {
        RutabagaError::InvalidResourceId => RenderError::InvalidResource(resource_id),
        e @ (RutabagaError::InvalidIovec
        | RutabagaError::CheckedRange { .. }
        | RutabagaError::CheckedArithmetic { .. }) => RenderError::InvalidParameter(e.to_string()),
        e => RenderError::Unspec(e.to_string()),
    }
}

impl Rutabaga2d {
    /// Builds rutabaga with only its 2D component. `on_fence` is called for each
    /// completed fence; for 2D that happens inside [`Renderer::create_fence`].
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
        let rutabaga = RutabagaBuilder::new(0, handler)
            .set_default_component(RutabagaComponentType::Rutabaga2D)
            .build()
            .map_err(|e| RenderError::Unspec(format!("rutabaga 2D init: {e}")))?;
        Ok(Rutabaga2d {
            rutabaga,
            resources: BTreeMap::new(),
            limits,
        })
    }

    fn resource(&self, resource_id: u32) -> Result<&Resource2d, RenderError> {
        self.resources
            .get(&resource_id)
            .ok_or(RenderError::InvalidResource(resource_id))
    }
}

impl Renderer for Rutabaga2d {
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
        if !VIRTIO_GPU_FORMATS.contains(&format) {
            return Err(RenderError::InvalidParameter(format!("format {format}")));
        }
        let max = self.limits.max_dimension;
        if width == 0 || height == 0 || width > max || height > max {
            return Err(RenderError::InvalidParameter(format!(
                "size {width}x{height} (at most {max} per side)"
            )));
        }
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
        self.rutabaga
            .resource_create_3d(resource_id, create)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        log::debug!("created 2D resource {resource_id}: {width}x{height}, {bytes} bytes");
        self.resources.insert(
            resource_id,
            Resource2d {
                width,
                height,
                backing: None,
            },
        );
        Ok(())
    }

    fn unref(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.resource(resource_id)?;
        let result = self
            .rutabaga
            .unref_resource(resource_id)
            .map_err(|e| from_rutabaga(resource_id, e));
        // Rutabaga no longer points into the backing (or never knew the resource), so
        // the guest mapping may go now.
        self.resources.remove(&resource_id);
        result
    }

    fn attach_backing(&mut self, resource_id: u32, backing: Backing) -> Result<(), RenderError> {
        let resource = self.resource(resource_id)?;
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
        self.rutabaga
            .attach_backing(resource_id, iovecs)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        if let Some(resource) = self.resources.get_mut(&resource_id) {
            resource.backing = Some(backing);
        }
        Ok(())
    }

    fn detach_backing(&mut self, resource_id: u32) -> Result<(), RenderError> {
        self.resource(resource_id)?;
        self.rutabaga
            .detach_backing(resource_id)
            .map_err(|e| from_rutabaga(resource_id, e))?;
        // Only now that rutabaga forgot the iovecs may their mapping be released.
        if let Some(resource) = self.resources.get_mut(&resource_id) {
            resource.backing = None;
        }
        Ok(())
    }

    fn transfer_to_host_2d(
        &mut self,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<(), RenderError> {
        let resource = self.resource(resource_id)?;
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
        self.rutabaga
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
        let resource = self.resource(resource_id)?;
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
        self.rutabaga
            .transfer_read(0, resource_id, transfer, Some(IoSliceMut::new(dst)))
            .map_err(|e| from_rutabaga(resource_id, e))
    }

    fn create_fence(&mut self, fence: FenceInfo) -> Result<(), RenderError> {
        // No RING_IDX flag: 2D has no contexts, so the fence goes to the 2D component,
        // which signals it at once with the ids we gave it.
        let fence = RutabagaFence {
            flags: RUTABAGA_FLAG_FENCE,
            fence_id: fence.fence_id,
            ctx_id: fence.ctx_id,
            ring_idx: fence.ring_idx,
        };
        self.rutabaga
            .create_fence(fence)
            .map_err(|e| RenderError::Unspec(format!("create_fence: {e}")))
    }

    fn reset(&mut self) -> Result<(), RenderError> {
        let ids: Vec<u32> = self.resources.keys().copied().collect();
        for id in ids {
            if let Err(e) = self.unref(id) {
                log::warn!("reset: unref of resource {id} failed: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::{Arc, Mutex};

    use protocol::ipc::{BackingEntry, GuestRegion};

    use super::*;
    use crate::guest_memory::GuestMemory;
    use crate::test_util::memfd_with;

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
        renderer: Rutabaga2d,
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
        let renderer = Rutabaga2d::new(Limits::default(), move |f| sink.lock().unwrap().push(f))
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

    fn read_all(renderer: &mut Rutabaga2d, id: u32) -> Vec<u8> {
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
        let mut small = Rutabaga2d::new(
            Limits {
                max_resource_bytes: 1 << 20,
                ..Limits::default()
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
        assert_eq!(
            Arc::strong_count(&fx.memory),
            2,
            "backing keeps the mapping"
        );
        let b = backing(&fx.memory, 16);
        assert!(matches!(
            fx.renderer.attach_backing(1, b),
            Err(RenderError::Unspec(_))
        ));
        fx.renderer.detach_backing(1).unwrap();
        assert_eq!(Arc::strong_count(&fx.memory), 1);
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
        assert_eq!(Arc::strong_count(&fx.memory), 1);
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
        assert_eq!(Arc::strong_count(&fx.memory), 1);
        assert_eq!(
            fx.renderer.transfer_to_host_2d(2, rect(0, 0, 1, 1), 0),
            Err(RenderError::InvalidResource(2))
        );
        // Ids are free again after a reset.
        fx.renderer
            .create_resource_2d(1, FORMAT_B8G8R8X8, 1, 1)
            .unwrap();
    }
}
