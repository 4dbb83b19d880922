//! The frontend's resource table: the authority on which ids exist, how big they are and
//! what backing they have. Every guest command is checked here before the renderer sees it,
//! and the byte budget here is what bounds the host memory a guest can make us allocate.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::config::Limits;
use protocol::ipc::{BackingEntry, Resource3d};
use protocol::virtio_gpu::{
    ErrorCode, Format, Rect, TransferHost3d, PIPE_TEXTURE_2D, PIPE_TEXTURE_3D,
};

/// Bytes per pixel of every virtio-gpu 2D format.
pub const BYTES_PER_PIXEL: u64 = 4;

/// What kind of resource it is, with what only that kind has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    /// RESOURCE_CREATE_2D: 4 bytes per pixel of `format`.
    TwoD {
        /// Pixel format.
        format: Format,
    },
    /// RESOURCE_CREATE_BLOB: `size` bytes, no 2D shape (width and height are 0), so the
    /// 2D commands refuse it.
    Blob {
        /// Size in bytes.
        size: u64,
    },
    /// RESOURCE_CREATE_3D (virgl), as the guest created it.
    ThreeD {
        /// Target, format, size and levels.
        args: Resource3d,
        /// Host bytes it is charged (see [`Resource3d::host_bytes`]).
        bytes: u64,
    },
}

/// The geometry a 3D transfer is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape3d {
    /// PIPE_* target.
    pub target: u32,
    /// Width of level 0 (bytes for a buffer).
    pub width: u32,
    /// Height of level 0.
    pub height: u32,
    /// Depth of level 0 (a 3D texture's; 1 otherwise).
    pub depth: u32,
    /// Layers.
    pub array_size: u32,
    /// Highest mip level.
    pub last_level: u32,
}

/// What the frontend knows about one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Its kind.
    pub kind: ResourceKind,
    /// Width in pixels (0 for a blob).
    pub width: u32,
    /// Height in pixels (0 for a blob).
    pub height: u32,
    /// Total length of the attached backing, if any.
    pub backing_len: Option<u64>,
    /// The guest's backing entries (a 2D resource's attached backing, a guest blob's),
    /// kept to rebuild the resource in a restarted renderer-worker; None when it has none
    /// or they did not fit [`KEPT_ENTRIES_BUDGET`].
    pub entries: Option<Arc<[BackingEntry]>>,
}

/// Most backing entries (16 bytes each) the table keeps for rebuilding resources after a
/// renderer restart, over all resources: a guest can attach up to `max_backing_entries`
/// per resource, and this bounds what the frontend holds on top of the renderer. A
/// resource whose entries do not fit is lost, not rebuilt, at a restart.
pub const KEPT_ENTRIES_BUDGET: usize = 1 << 20;

impl Resource {
    /// Host bytes the resource occupies in the renderer.
    pub fn byte_size(&self) -> u64 {
        match self.kind {
            ResourceKind::TwoD { .. } => {
                u64::from(self.width) * u64::from(self.height) * BYTES_PER_PIXEL
            }
            ResourceKind::Blob { size } => size,
            ResourceKind::ThreeD { bytes, .. } => bytes,
        }
    }

    /// Bytes per row.
    pub fn stride(&self) -> u64 {
        u64::from(self.width) * BYTES_PER_PIXEL
    }

    /// The whole resource as a rectangle.
    pub fn rect(&self) -> Rect {
        Rect {
            x: 0,
            y: 0,
            width: self.width,
            height: self.height,
        }
    }

    /// The format its pixels have as 4-byte pixels at `width * 4` bytes per row, which is
    /// what a scanout or the cursor needs: a 2D resource's own; for a 3D resource, only a
    /// single-layer, single-sample 2D texture in one of the eight 2D formats (virgl's
    /// format numbers for them are the same). None for anything else.
    pub fn pixel_format(&self) -> Option<Format> {
        match &self.kind {
            ResourceKind::TwoD { format } => Some(*format),
            ResourceKind::Blob { .. } => None,
            ResourceKind::ThreeD { args, .. } => {
                let plain_2d = args.target == PIPE_TEXTURE_2D
                    && args.depth == 1
                    && args.array_size == 1
                    && args.nr_samples <= 1;
                plain_2d.then(|| Format::from_u32(args.format)).flatten()
            }
        }
    }

    /// The geometry 3D transfers are checked against: a 3D resource's, or a 2D
    /// resource's as the single-level 2D texture it is in a virgl renderer. None for a
    /// blob.
    pub fn shape_3d(&self) -> Option<Shape3d> {
        match &self.kind {
            ResourceKind::TwoD { .. } => Some(Shape3d {
                target: PIPE_TEXTURE_2D,
                width: self.width,
                height: self.height,
                depth: 1,
                array_size: 1,
                last_level: 0,
            }),
            ResourceKind::Blob { .. } => None,
            ResourceKind::ThreeD { args, .. } => Some(Shape3d {
                target: args.target,
                width: args.width,
                height: args.height,
                depth: args.depth,
                array_size: args.array_size,
                last_level: args.last_level,
            }),
        }
    }

    /// Whether it was created by RESOURCE_CREATE_3D.
    pub fn is_3d(&self) -> bool {
        matches!(self.kind, ResourceKind::ThreeD { .. })
    }
}

/// A mip level's size along one side: halved per level, never below 1.
fn minify(size: u32, level: u32) -> u32 {
    size.checked_shr(level).unwrap_or(0).max(1)
}

/// Resource ids and their sizes, with the per-VM byte budget.
#[derive(Debug)]
pub struct ResourceTable {
    limits: Limits,
    resources: HashMap<u32, Resource>,
    bytes_in_use: u64,
    /// Bytes of the scanout buffers the frontend made to show resources (sealed memfds the
    /// renderer fills): host memory the guest causes as much as a resource's, charged to
    /// the same budget (without it, one resource shown on 16 scanouts would cost 17 times
    /// its size).
    scanout_bytes: u64,
    /// Backing entries kept over all resources (at most [`KEPT_ENTRIES_BUDGET`]).
    kept_entries: usize,
}

impl ResourceTable {
    /// An empty table enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        ResourceTable {
            limits,
            resources: HashMap::new(),
            bytes_in_use: 0,
            scanout_bytes: 0,
            kept_entries: 0,
        }
    }

    /// The ids of every live resource, in ascending order.
    pub fn ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.resources.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Keeps a copy of `entries` (merged where contiguous) with resource `id`, if they fit
    /// [`KEPT_ENTRIES_BUDGET`]; replaces what it kept before.
    pub fn keep_entries(&mut self, id: u32, entries: &[BackingEntry]) {
        self.forget_entries(id);
        let mut merged: Vec<BackingEntry> = Vec::new();
        for e in entries {
            match merged.last_mut() {
                Some(last)
                    if last.addr.checked_add(u64::from(last.length)) == Some(e.addr)
                        && last.length.checked_add(e.length).is_some() =>
                {
                    last.length += e.length;
                }
                _ => merged.push(*e),
            }
        }
        if self.kept_entries + merged.len() > KEPT_ENTRIES_BUDGET {
            log::debug!(
                "resource {id}: {} backing entries not kept ({} kept already): it will not \
                 survive a renderer restart",
                merged.len(),
                self.kept_entries
            );
            return;
        }
        if let Some(r) = self.resources.get_mut(&id) {
            self.kept_entries += merged.len();
            r.entries = Some(merged.into());
        }
    }

    fn forget_entries(&mut self, id: u32) {
        if let Some(kept) = self.resources.get_mut(&id).and_then(|r| r.entries.take()) {
            self.kept_entries -= kept.len();
        }
    }

    /// Looks a resource up.
    pub fn get(&self, id: u32) -> Result<&Resource, ErrorCode> {
        self.resources.get(&id).ok_or(ErrorCode::InvalidResourceId)
    }

    /// Number of live resources.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// Whether there are no resources.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Host bytes accounted to live resources.
    pub fn bytes_in_use(&self) -> u64 {
        self.bytes_in_use
    }

    /// Host bytes accounted to scanout buffers.
    pub fn scanout_bytes(&self) -> u64 {
        self.scanout_bytes
    }

    /// Whether `bytes` more fit the budget beside resources and scanout buffers of
    /// `scanout_bytes`.
    fn fits(&self, scanout_bytes: u64, bytes: u64) -> bool {
        self.bytes_in_use
            .checked_add(scanout_bytes)
            .and_then(|used| used.checked_add(bytes))
            .is_some_and(|total| total <= self.limits.max_resource_bytes)
    }

    /// Charges scanout buffers of `total` bytes in all (instead of what was charged for
    /// them so far), if the budget allows it; Err(OutOfMemory) changes nothing. Call it
    /// before a buffer is made.
    pub fn reserve_scanout_bytes(&mut self, total: u64) -> Result<(), ErrorCode> {
        if total > self.scanout_bytes && !self.fits(total, 0) {
            return Err(ErrorCode::OutOfMemory);
        }
        self.scanout_bytes = total;
        Ok(())
    }

    /// Records that the scanout buffers now take `total` bytes (after one was dropped, or
    /// a reserved one could not be made). Never refused.
    pub fn set_scanout_bytes(&mut self, total: u64) {
        self.scanout_bytes = total;
    }

    /// Admits a new 2D resource, charging its bytes to the budget.
    pub fn create_2d(
        &mut self,
        id: u32,
        format: Format,
        width: u32,
        height: u32,
    ) -> Result<(), ErrorCode> {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(ErrorCode::InvalidResourceId);
        }
        if width == 0
            || height == 0
            || width > self.limits.max_dimension
            || height > self.limits.max_dimension
        {
            return Err(ErrorCode::InvalidParameter);
        }
        self.admit(
            id,
            Resource {
                kind: ResourceKind::TwoD { format },
                width,
                height,
                backing_len: None,
                entries: None,
            },
        )
    }

    /// Admits a new 3D (virgl) resource, charging [`Resource3d::host_bytes`] to the
    /// budget, as the renderer does. Its extents must be within
    /// [`Resource3d::extents_within`] (the renderer requires that too).
    pub fn create_3d(&mut self, id: u32, args: Resource3d) -> Result<(), ErrorCode> {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(ErrorCode::InvalidResourceId);
        }
        if !args.extents_within(self.limits.max_dimension) {
            return Err(ErrorCode::InvalidParameter);
        }
        let bytes = args.host_bytes().ok_or(ErrorCode::OutOfMemory)?;
        self.admit(
            id,
            Resource {
                kind: ResourceKind::ThreeD { args, bytes },
                width: args.width,
                height: args.height,
                backing_len: None,
                entries: None,
            },
        )
    }

    /// Enters a resource whose id and shape were checked, if the count and byte budgets
    /// allow it.
    fn admit(&mut self, id: u32, resource: Resource) -> Result<(), ErrorCode> {
        let bytes = resource.byte_size();
        let count_ok =
            u32::try_from(self.resources.len()).is_ok_and(|n| n < self.limits.max_resources);
        if !count_ok || !self.fits(self.scanout_bytes, bytes) {
            return Err(ErrorCode::OutOfMemory);
        }
        self.bytes_in_use += bytes;
        self.resources.insert(id, resource);
        Ok(())
    }

    /// Admits a blob of `size` bytes, charging them to the budget. A blob has no 2D shape
    /// (width and height 0), so the 2D commands refuse it.
    pub fn create_blob(&mut self, id: u32, size: u64) -> Result<(), ErrorCode> {
        if id == 0 || self.resources.contains_key(&id) {
            return Err(ErrorCode::InvalidResourceId);
        }
        self.admit(
            id,
            Resource {
                kind: ResourceKind::Blob { size },
                width: 0,
                height: 0,
                backing_len: None,
                entries: None,
            },
        )
    }

    /// Removes a resource and returns what it was.
    pub fn remove(&mut self, id: u32) -> Result<Resource, ErrorCode> {
        self.forget_entries(id);
        let resource = self
            .resources
            .remove(&id)
            .ok_or(ErrorCode::InvalidResourceId)?;
        self.bytes_in_use -= resource.byte_size();
        Ok(resource)
    }

    /// Records an attached backing. `entries` must already be checked against guest memory.
    pub fn attach_backing(&mut self, id: u32, entries: &[BackingEntry]) -> Result<(), ErrorCode> {
        let resource = self
            .resources
            .get_mut(&id)
            .ok_or(ErrorCode::InvalidResourceId)?;
        if resource.backing_len.is_some() {
            // Attaching twice would leak the first mapping in the renderer; QEMU answers
            // this with ERR_UNSPEC as well.
            return Err(ErrorCode::Unspec);
        }
        let total = entries
            .iter()
            .try_fold(0u64, |acc, e| acc.checked_add(u64::from(e.length)))
            .ok_or(ErrorCode::InvalidParameter)?;
        resource.backing_len = Some(total);
        self.keep_entries(id, entries);
        Ok(())
    }

    /// Forgets a resource's backing.
    pub fn detach_backing(&mut self, id: u32) -> Result<(), ErrorCode> {
        let resource = self
            .resources
            .get_mut(&id)
            .ok_or(ErrorCode::InvalidResourceId)?;
        resource.backing_len = None;
        self.forget_entries(id);
        Ok(())
    }

    /// Checks a TRANSFER_TO_HOST_2D: the rectangle lies inside the resource and every byte
    /// it reads, starting at `offset` with the resource's stride, lies inside the backing.
    pub fn check_transfer(&self, id: u32, rect: &Rect, offset: u64) -> Result<(), ErrorCode> {
        let resource = self.get(id)?;
        let backing_len = resource.backing_len.ok_or(ErrorCode::Unspec)?;
        if !rect.is_inside(resource.width, resource.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        if rect.is_empty() {
            return Ok(());
        }
        let last_row_start = u64::from(rect.height - 1)
            .checked_mul(resource.stride())
            .and_then(|v| v.checked_add(offset));
        let end = last_row_start
            .and_then(|v| v.checked_add(u64::from(rect.width) * BYTES_PER_PIXEL))
            .ok_or(ErrorCode::InvalidParameter)?;
        if end > backing_len {
            return Err(ErrorCode::InvalidParameter);
        }
        Ok(())
    }

    /// Checks a TRANSFER_TO_HOST_3D / TRANSFER_FROM_HOST_3D (or a 2D transfer of a 3D
    /// resource, as the box `rect` x 1 of level 0): resource `id` exists
    /// (ERR_INVALID_RESOURCE_ID), is not a blob and `level` is one of its mip levels and
    /// the box lies inside that level (ERR_INVALID_PARAMETER), it has a backing
    /// (ERR_UNSPEC, as for 2D), and the box's first byte, at `offset`, lies inside the
    /// backing (ERR_INVALID_PARAMETER). How far the rows reach depends on the format's
    /// block layout, which is the renderer's to know: virglrenderer bounds every row by
    /// the backing, and the renderer maps nothing of the guest but the attached ranges.
    pub fn check_transfer_3d(&self, id: u32, t: &TransferHost3d) -> Result<(), ErrorCode> {
        let resource = self.get(id)?;
        let shape = resource.shape_3d().ok_or(ErrorCode::InvalidParameter)?;
        let backing_len = resource.backing_len.ok_or(ErrorCode::Unspec)?;
        if t.level > shape.last_level {
            return Err(ErrorCode::InvalidParameter);
        }
        let layers = if shape.target == PIPE_TEXTURE_3D {
            minify(shape.depth, t.level)
        } else {
            shape.array_size
        };
        let b = &t.bbox;
        let fits =
            |start: u32, len: u32, size: u32| start.checked_add(len).is_some_and(|end| end <= size);
        if !fits(b.x, b.w, minify(shape.width, t.level))
            || !fits(b.y, b.h, minify(shape.height, t.level))
            || !fits(b.z, b.d, layers)
        {
            return Err(ErrorCode::InvalidParameter);
        }
        let empty = b.w == 0 || b.h == 0 || b.d == 0;
        let inside = if empty {
            t.offset <= backing_len
        } else {
            t.offset < backing_len
        };
        if !inside {
            return Err(ErrorCode::InvalidParameter);
        }
        Ok(())
    }

    /// Checks that `rect` lies inside resource `id`.
    pub fn check_rect(&self, id: u32, rect: &Rect) -> Result<&Resource, ErrorCode> {
        let resource = self.get(id)?;
        if !rect.is_inside(resource.width, resource.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        Ok(resource)
    }

    /// Drops every resource (device reset, which drops the scanout buffers too).
    pub fn clear(&mut self) {
        self.resources.clear();
        self.bytes_in_use = 0;
        self.scanout_bytes = 0;
        self.kept_entries = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::virtio_gpu::{PIPE_BUFFER, PIPE_TEXTURE_2D_ARRAY};

    fn table() -> ResourceTable {
        ResourceTable::new(Limits {
            max_resources: 2,
            max_resource_bytes: 64 * 64 * 4 * 2,
            max_dimension: 4096,
            max_backing_entries: 16,
            ..policy::limits::DEFAULT
        })
    }

    #[test]
    fn ids_budget_and_dimensions() {
        let mut t = table();
        let f = Format::B8G8R8X8Unorm;
        assert_eq!(t.create_2d(0, f, 1, 1), Err(ErrorCode::InvalidResourceId));
        assert_eq!(t.create_2d(1, f, 0, 1), Err(ErrorCode::InvalidParameter));
        assert_eq!(t.create_2d(1, f, 4097, 1), Err(ErrorCode::InvalidParameter));
        assert_eq!(t.create_2d(1, f, 64, 64), Ok(()));
        assert_eq!(t.create_2d(1, f, 64, 64), Err(ErrorCode::InvalidResourceId));
        assert_eq!(t.create_2d(2, f, 64, 65), Err(ErrorCode::OutOfMemory));
        assert_eq!(t.create_2d(2, f, 64, 64), Ok(()));
        assert_eq!(t.create_2d(3, f, 1, 1), Err(ErrorCode::OutOfMemory));
        assert_eq!(t.bytes_in_use(), 64 * 64 * 4 * 2);
        t.remove(1).unwrap();
        assert_eq!(t.bytes_in_use(), 64 * 64 * 4);
        assert_eq!(t.remove(1), Err(ErrorCode::InvalidResourceId));
    }

    #[test]
    fn scanout_buffers_share_the_byte_budget() {
        let mut t = table();
        let f = Format::B8G8R8X8Unorm;
        let one = 64 * 64 * 4;
        t.create_2d(1, f, 64, 64).unwrap();
        // The resource's own size again, for the scanout showing it: the budget is full.
        assert_eq!(t.reserve_scanout_bytes(one), Ok(()));
        assert_eq!(t.create_2d(2, f, 1, 1), Err(ErrorCode::OutOfMemory));
        // A second scanout of it would exceed the budget; nothing changes.
        assert_eq!(
            t.reserve_scanout_bytes(2 * one),
            Err(ErrorCode::OutOfMemory)
        );
        assert_eq!(t.scanout_bytes(), one);
        // Shrinking is never refused, and gives the bytes back.
        t.set_scanout_bytes(0);
        assert_eq!(t.create_2d(2, f, 64, 64), Ok(()));
        assert_eq!(t.reserve_scanout_bytes(1), Err(ErrorCode::OutOfMemory));
        t.clear();
        assert_eq!((t.bytes_in_use(), t.scanout_bytes()), (0, 0));
    }

    #[test]
    fn transfer_bounds_use_stride_and_offset() {
        let mut t = table();
        t.create_2d(1, Format::B8G8R8X8Unorm, 16, 16).unwrap();
        let r = Rect {
            x: 0,
            y: 0,
            width: 16,
            height: 16,
        };
        assert_eq!(t.check_transfer(1, &r, 0), Err(ErrorCode::Unspec));
        t.attach_backing(
            1,
            &[BackingEntry {
                addr: 0x1000,
                length: 16 * 16 * 4,
            }],
        )
        .unwrap();
        assert_eq!(t.check_transfer(1, &r, 0), Ok(()));
        assert_eq!(t.check_transfer(1, &r, 4), Err(ErrorCode::InvalidParameter));
        assert_eq!(
            t.check_transfer(1, &r, u64::MAX),
            Err(ErrorCode::InvalidParameter)
        );
        let outside = Rect {
            x: 8,
            y: 0,
            width: 9,
            height: 1,
        };
        assert_eq!(
            t.check_transfer(1, &outside, 0),
            Err(ErrorCode::InvalidParameter)
        );
        assert_eq!(
            t.attach_backing(1, &[BackingEntry { addr: 0, length: 1 }]),
            Err(ErrorCode::Unspec)
        );
    }

    fn args(target: u32, w: u32, h: u32, d: u32, a: u32, last_level: u32) -> Resource3d {
        Resource3d {
            target,
            format: 2,
            bind: 2,
            width: w,
            height: h,
            depth: d,
            array_size: a,
            last_level,
            nr_samples: 0,
            flags: 0,
        }
    }

    fn transfer(bx: [u32; 6], offset: u64, level: u32) -> TransferHost3d {
        TransferHost3d {
            bbox: protocol::ipc::Box3d {
                x: bx[0],
                y: bx[1],
                z: bx[2],
                w: bx[3],
                h: bx[4],
                d: bx[5],
            },
            offset,
            level,
            stride: 0,
            layer_stride: 0,
        }
    }

    #[test]
    fn create_3d_ids_limits_and_budget() {
        let mut t = ResourceTable::new(Limits {
            max_resources: 3,
            max_resource_bytes: 64 * 64 * 16 * 2,
            max_dimension: 4096,
            max_backing_entries: 16,
            ..policy::limits::DEFAULT
        });
        let a = args(PIPE_TEXTURE_2D, 64, 64, 1, 1, 0);
        assert_eq!(t.create_3d(0, a), Err(ErrorCode::InvalidResourceId));
        for bad in [
            args(PIPE_TEXTURE_2D, 4097, 1, 1, 1, 0),
            args(PIPE_TEXTURE_2D, 1, 4097, 1, 1, 0),
            args(PIPE_TEXTURE_3D, 1, 1, 4097, 1, 0),
            args(PIPE_TEXTURE_2D_ARRAY, 1, 1, 1, 4097, 0),
            args(PIPE_TEXTURE_2D, 0, 1, 1, 1, 0),
            args(PIPE_TEXTURE_2D, 1, 1, 1, 0, 0),
        ] {
            assert_eq!(
                t.create_3d(1, bad),
                Err(ErrorCode::InvalidParameter),
                "{bad:?}"
            );
        }
        // Charged 16 bytes per texel, twice with mip levels, as the renderer does.
        assert_eq!(a.host_bytes(), Some(64 * 64 * 16));
        assert_eq!(
            args(PIPE_TEXTURE_2D, 64, 64, 1, 1, 6).host_bytes(),
            Some(64 * 64 * 32)
        );
        assert_eq!(
            args(PIPE_TEXTURE_3D, u32::MAX, u32::MAX, u32::MAX, u32::MAX, 1).host_bytes(),
            None
        );
        // A buffer is charged its bytes, and may be wider than max_dimension.
        assert_eq!(
            args(PIPE_BUFFER, 1 << 20, 1, 1, 1, 0).host_bytes(),
            Some(1 << 20)
        );
        assert_eq!(t.create_3d(1, a), Ok(()));
        assert_eq!(t.create_3d(1, a), Err(ErrorCode::InvalidResourceId));
        assert_eq!(
            t.create_2d(1, Format::B8G8R8X8Unorm, 1, 1),
            Err(ErrorCode::InvalidResourceId)
        );
        assert_eq!(t.bytes_in_use(), 64 * 64 * 16);
        // One byte over the budget.
        assert_eq!(
            t.create_3d(2, args(PIPE_TEXTURE_2D, 64, 65, 1, 1, 0)),
            Err(ErrorCode::OutOfMemory)
        );
        assert_eq!(t.create_3d(2, a), Ok(()));
        assert_eq!(
            t.create_3d(3, args(PIPE_BUFFER, 1, 1, 1, 1, 0)),
            Err(ErrorCode::OutOfMemory)
        );
        assert_eq!(t.remove(2).map(|r| r.byte_size()), Ok(64 * 64 * 16));
        assert_eq!(t.bytes_in_use(), 64 * 64 * 16);
        assert!(t.get(1).unwrap().is_3d());
    }

    #[test]
    fn pixel_formats_of_each_kind() {
        let mut t = table();
        t.create_2d(1, Format::R8G8B8A8Unorm, 4, 4).unwrap();
        t.create_blob(2, 4096).unwrap();
        let mut t3 = ResourceTable::new(policy::limits::DEFAULT);
        t3.create_3d(3, args(PIPE_TEXTURE_2D, 8, 8, 1, 1, 0))
            .unwrap();
        t3.create_3d(4, args(PIPE_TEXTURE_2D_ARRAY, 8, 8, 1, 2, 0))
            .unwrap();
        t3.create_3d(
            5,
            Resource3d {
                format: 30,
                ..args(PIPE_TEXTURE_2D, 8, 8, 1, 1, 0)
            },
        )
        .unwrap();
        t3.create_3d(6, args(PIPE_BUFFER, 64, 1, 1, 1, 0)).unwrap();
        assert_eq!(
            t.get(1).unwrap().pixel_format(),
            Some(Format::R8G8B8A8Unorm)
        );
        assert_eq!(t.get(2).unwrap().pixel_format(), None);
        assert_eq!(
            t3.get(3).unwrap().pixel_format(),
            Some(Format::B8G8R8X8Unorm)
        );
        for id in [4, 5, 6] {
            assert_eq!(t3.get(id).unwrap().pixel_format(), None, "resource {id}");
        }
        assert_eq!(t.get(2).unwrap().shape_3d(), None);
        assert_eq!(
            t.get(1).unwrap().shape_3d(),
            Some(Shape3d {
                target: PIPE_TEXTURE_2D,
                width: 4,
                height: 4,
                depth: 1,
                array_size: 1,
                last_level: 0
            })
        );
    }

    #[test]
    fn transfer_3d_bounds() {
        let mut t = ResourceTable::new(policy::limits::DEFAULT);
        // 64x32, levels 0..=2 (64x32, 32x16, 16x8).
        t.create_3d(1, args(PIPE_TEXTURE_2D, 64, 32, 1, 1, 2))
            .unwrap();
        let whole = transfer([0, 0, 0, 64, 32, 1], 0, 0);
        assert_eq!(
            t.check_transfer_3d(9, &whole),
            Err(ErrorCode::InvalidResourceId)
        );
        assert_eq!(t.check_transfer_3d(1, &whole), Err(ErrorCode::Unspec));
        t.attach_backing(
            1,
            &[BackingEntry {
                addr: 0x1000,
                length: 64 * 32 * 4,
            }],
        )
        .unwrap();
        assert_eq!(t.check_transfer_3d(1, &whole), Ok(()));
        assert_eq!(
            t.check_transfer_3d(1, &transfer([0, 0, 0, 16, 8, 1], 0, 2)),
            Ok(())
        );
        for (bad, what) in [
            (transfer([0, 0, 0, 65, 32, 1], 0, 0), "too wide"),
            (transfer([1, 0, 0, 64, 32, 1], 0, 0), "x + w past the edge"),
            (transfer([0, 0, 0, 64, 33, 1], 0, 0), "too high"),
            (transfer([0, 0, 1, 1, 1, 1], 0, 0), "layer 1 of 1"),
            (transfer([0, 0, 0, 1, 1, 2], 0, 0), "two layers of 1"),
            (transfer([0, 0, 0, 17, 8, 1], 0, 2), "wider than level 2"),
            (transfer([0, 0, 0, 1, 1, 1], 0, 3), "level 3 of 0..=2"),
            (transfer([0, 0, 0, 1, 1, 1], 0, u32::MAX), "level u32::MAX"),
            (transfer([u32::MAX, 0, 0, 2, 1, 1], 0, 0), "x + w overflows"),
            (
                transfer([0, 0, 0, 1, 1, 1], 64 * 32 * 4, 0),
                "offset at the end of the backing",
            ),
            (transfer([0, 0, 0, 1, 1, 1], u64::MAX, 0), "offset u64::MAX"),
        ] {
            assert_eq!(
                t.check_transfer_3d(1, &bad),
                Err(ErrorCode::InvalidParameter),
                "{what}"
            );
        }
        // An empty box moves nothing; its offset may be the end of the backing.
        assert_eq!(
            t.check_transfer_3d(1, &transfer([0, 0, 0, 0, 1, 1], 64 * 32 * 4, 0)),
            Ok(())
        );

        // A 3D texture's depth shrinks with the levels; an array's layers do not.
        t.create_3d(2, args(PIPE_TEXTURE_3D, 8, 8, 8, 1, 3))
            .unwrap();
        t.create_3d(3, args(PIPE_TEXTURE_2D_ARRAY, 8, 8, 1, 6, 3))
            .unwrap();
        for id in [2, 3] {
            t.attach_backing(
                id,
                &[BackingEntry {
                    addr: 0x1000,
                    length: 4096,
                }],
            )
            .unwrap();
        }
        assert_eq!(
            t.check_transfer_3d(2, &transfer([0, 0, 0, 4, 4, 4], 0, 1)),
            Ok(())
        );
        assert_eq!(
            t.check_transfer_3d(2, &transfer([0, 0, 0, 4, 4, 5], 0, 1)),
            Err(ErrorCode::InvalidParameter)
        );
        assert_eq!(
            t.check_transfer_3d(3, &transfer([0, 0, 0, 4, 4, 6], 0, 1)),
            Ok(())
        );
        assert_eq!(
            t.check_transfer_3d(3, &transfer([0, 0, 5, 1, 1, 2], 0, 1)),
            Err(ErrorCode::InvalidParameter)
        );

        // Blobs have no texels; 2D resources are single-level 2D textures.
        t.create_blob(4, 4096).unwrap();
        t.attach_backing(
            4,
            &[BackingEntry {
                addr: 0x1000,
                length: 4096,
            }],
        )
        .unwrap();
        assert_eq!(
            t.check_transfer_3d(4, &transfer([0, 0, 0, 1, 1, 1], 0, 0)),
            Err(ErrorCode::InvalidParameter)
        );
        t.create_2d(5, Format::B8G8R8X8Unorm, 16, 16).unwrap();
        t.attach_backing(
            5,
            &[BackingEntry {
                addr: 0x1000,
                length: 1024,
            }],
        )
        .unwrap();
        assert_eq!(
            t.check_transfer_3d(5, &transfer([0, 0, 0, 16, 16, 1], 0, 0)),
            Ok(())
        );
        assert_eq!(
            t.check_transfer_3d(5, &transfer([0, 0, 0, 8, 8, 1], 0, 1)),
            Err(ErrorCode::InvalidParameter)
        );
    }
}
