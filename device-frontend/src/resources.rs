//! The frontend's resource table: the authority on which ids exist, how big they are and
//! what backing they have. Every guest command is checked here before the renderer sees it,
//! and the byte budget here is what bounds the host memory a guest can make us allocate.

use std::collections::HashMap;

use protocol::config::Limits;
use protocol::ipc::BackingEntry;
use protocol::virtio_gpu::{ErrorCode, Format, Rect};

/// Bytes per pixel of every virtio-gpu 2D format.
pub const BYTES_PER_PIXEL: u64 = 4;

/// What the frontend knows about one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// Pixel format.
    pub format: Format,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Total length of the attached backing, if any.
    pub backing_len: Option<u64>,
    /// For a blob, its size in bytes (it is charged that, not width * height * 4).
    pub blob_size: Option<u64>,
}

impl Resource {
    /// Host bytes the resource occupies in the renderer.
    pub fn byte_size(&self) -> u64 {
        self.blob_size
            .unwrap_or(u64::from(self.width) * u64::from(self.height) * BYTES_PER_PIXEL)
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
}

/// Resource ids and their sizes, with the per-VM byte budget.
#[derive(Debug)]
pub struct ResourceTable {
    limits: Limits,
    resources: HashMap<u32, Resource>,
    bytes_in_use: u64,
}

impl ResourceTable {
    /// An empty table enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        ResourceTable {
            limits,
            resources: HashMap::new(),
            bytes_in_use: 0,
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
        let resource = Resource {
            format,
            width,
            height,
            backing_len: None,
            blob_size: None,
        };
        let bytes = resource.byte_size();
        if self.resources.len() >= self.limits.max_resources as usize
            || self
                .bytes_in_use
                .checked_add(bytes)
                .is_none_or(|total| total > self.limits.max_resource_bytes)
        {
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
        if self.resources.len() >= self.limits.max_resources as usize
            || self
                .bytes_in_use
                .checked_add(size)
                .is_none_or(|total| total > self.limits.max_resource_bytes)
        {
            return Err(ErrorCode::OutOfMemory);
        }
        self.bytes_in_use += size;
        self.resources.insert(
            id,
            Resource {
                format: Format::B8G8R8X8Unorm,
                width: 0,
                height: 0,
                backing_len: None,
                blob_size: Some(size),
            },
        );
        Ok(())
    }

    /// Removes a resource and returns what it was.
    pub fn remove(&mut self, id: u32) -> Result<Resource, ErrorCode> {
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
        Ok(())
    }

    /// Forgets a resource's backing.
    pub fn detach_backing(&mut self, id: u32) -> Result<(), ErrorCode> {
        let resource = self
            .resources
            .get_mut(&id)
            .ok_or(ErrorCode::InvalidResourceId)?;
        resource.backing_len = None;
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

    /// Checks that `rect` lies inside resource `id`.
    pub fn check_rect(&self, id: u32, rect: &Rect) -> Result<&Resource, ErrorCode> {
        let resource = self.get(id)?;
        if !rect.is_inside(resource.width, resource.height) {
            return Err(ErrorCode::InvalidParameter);
        }
        Ok(resource)
    }

    /// Drops every resource (device reset).
    pub fn clear(&mut self) {
        self.resources.clear();
        self.bytes_in_use = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ResourceTable {
        ResourceTable::new(Limits {
            max_resources: 2,
            max_resource_bytes: 64 * 64 * 4 * 2,
            max_dimension: 4096,
            max_backing_entries: 16,
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
}
