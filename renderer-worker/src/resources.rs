//! The executor's own ledger of live resources, which enforces the per-VM limits
//! (count, dimensions, total bytes) independently of whatever the frontend checked.

use std::collections::BTreeMap;

use protocol::config::Limits;
use protocol::ipc::RenderError;

use crate::geometry::packed_size;

/// What the ledger knows of one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceInfo {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Host bytes it accounts for.
    pub bytes: u64,
    /// Whether it is a blob (width and height are then 0: blobs have no 2D shape).
    pub blob: bool,
}

/// Live resources and the bytes they hold.
#[derive(Debug)]
pub struct ResourceLedger {
    limits: Limits,
    resources: BTreeMap<u32, ResourceInfo>,
    total_bytes: u64,
}

impl ResourceLedger {
    /// An empty ledger enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        ResourceLedger {
            limits,
            resources: BTreeMap::new(),
            total_bytes: 0,
        }
    }

    /// Checks that a `width` x `height` resource `resource_id` may be created, without
    /// recording it (call [`ResourceLedger::insert`] once the renderer created it).
    pub fn admit(
        &self,
        resource_id: u32,
        width: u32,
        height: u32,
    ) -> Result<ResourceInfo, RenderError> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(RenderError::InvalidResource(resource_id));
        }
        let max = self.limits.max_dimension;
        if width == 0 || height == 0 || width > max || height > max {
            return Err(RenderError::InvalidParameter(format!(
                "size {width}x{height} (at most {max} per side)"
            )));
        }
        if self.resources.len() >= self.limits.max_resources as usize {
            return Err(RenderError::OutOfMemory(format!(
                "{} resources already",
                self.resources.len()
            )));
        }
        let bytes = packed_size(width, height)
            .filter(|b| {
                self.total_bytes
                    .checked_add(*b)
                    .is_some_and(|t| t <= self.limits.max_resource_bytes)
            })
            .ok_or_else(|| {
                RenderError::OutOfMemory(format!(
                    "{width}x{height} exceeds the resource memory limit ({} of {} bytes used)",
                    self.total_bytes, self.limits.max_resource_bytes
                ))
            })?;
        Ok(ResourceInfo {
            width,
            height,
            bytes,
            blob: false,
        })
    }

    /// Checks that blob `resource_id`, holding `host_bytes` of host memory, may be created,
    /// without recording it (call [`ResourceLedger::insert`] once the renderer created it).
    pub fn admit_blob(
        &self,
        resource_id: u32,
        host_bytes: u64,
    ) -> Result<ResourceInfo, RenderError> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(RenderError::InvalidResource(resource_id));
        }
        if self.resources.len() >= self.limits.max_resources as usize {
            return Err(RenderError::OutOfMemory(format!(
                "{} resources already",
                self.resources.len()
            )));
        }
        let fits = self
            .total_bytes
            .checked_add(host_bytes)
            .is_some_and(|t| t <= self.limits.max_resource_bytes);
        if !fits {
            return Err(RenderError::OutOfMemory(format!(
                "blob of {host_bytes} bytes exceeds the resource memory limit ({} of {} bytes used)",
                self.total_bytes, self.limits.max_resource_bytes
            )));
        }
        Ok(ResourceInfo {
            width: 0,
            height: 0,
            bytes: host_bytes,
            blob: true,
        })
    }

    /// Checks that 3D resource `resource_id` may be created, charging
    /// [`protocol::ipc::Resource3d::host_bytes`] (its real size depends on a format only
    /// virglrenderer knows, so it is charged as the widest could be).
    pub fn admit_3d(
        &self,
        resource_id: u32,
        args: &protocol::ipc::Resource3d,
    ) -> Result<ResourceInfo, RenderError> {
        let max = self.limits.max_dimension;
        if !args.extents_within(max) {
            return Err(RenderError::InvalidParameter(format!(
                "3D size {}x{}x{} with {} layers (each at least 1, at most {max}; a \
                 buffer's width is bytes)",
                args.width, args.height, args.depth, args.array_size
            )));
        }
        // A full mip chain ends at 1x1(x1): level floor(log2(largest side)); a buffer has
        // one level. The frontend refuses more (its decoder), and so does this ledger:
        // the shape is kept for later transfer checks, which shift by the level.
        let mut largest = args.width.max(args.height);
        if args.target == protocol::virtio_gpu::PIPE_TEXTURE_3D {
            largest = largest.max(args.depth);
        }
        let max_level = if args.is_buffer() {
            0
        } else {
            largest.checked_ilog2().unwrap_or(0)
        };
        if args.last_level > max_level {
            return Err(RenderError::InvalidParameter(format!(
                "last mip level {} (at most {max_level} for its size)",
                args.last_level
            )));
        }
        let bytes = args
            .host_bytes()
            .ok_or_else(|| RenderError::OutOfMemory("3D resource size overflows".into()))?;
        let info = self.admit_blob(resource_id, bytes)?;
        Ok(ResourceInfo {
            width: args.width,
            height: args.height,
            blob: false,
            ..info
        })
    }

    /// Records a resource that [`ResourceLedger::admit`] accepted.
    pub fn insert(&mut self, resource_id: u32, info: ResourceInfo) {
        self.total_bytes += info.bytes;
        self.resources.insert(resource_id, info);
    }

    /// Forgets a resource, releasing its bytes.
    pub fn remove(&mut self, resource_id: u32) -> Option<ResourceInfo> {
        let info = self.resources.remove(&resource_id)?;
        self.total_bytes -= info.bytes;
        Some(info)
    }

    /// Looks a resource up.
    pub fn get(&self, resource_id: u32) -> Result<ResourceInfo, RenderError> {
        self.resources
            .get(&resource_id)
            .copied()
            .ok_or(RenderError::InvalidResource(resource_id))
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.resources.clear();
        self.total_bytes = 0;
    }

    /// Bytes all live resources account for.
    #[cfg(test)]
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_resources: 2,
            max_resource_bytes: 1000,
            max_dimension: 16,
            max_backing_entries: 4,
            ..policy::limits::DEFAULT
        };
        let mut ledger = ResourceLedger::new(limits);
        assert!(ledger.admit(0, 1, 1).is_err());
        assert!(ledger.admit(1, 17, 1).is_err());
        assert!(ledger.admit(1, 1, 0).is_err());
        let a = ledger.admit(1, 10, 10).unwrap();
        assert_eq!(a.bytes, 400);
        ledger.insert(1, a);
        assert_eq!(ledger.admit(1, 1, 1), Err(RenderError::InvalidResource(1)));
        assert!(matches!(
            ledger.admit(2, 16, 16),
            Err(RenderError::OutOfMemory(_))
        ));
        let b = ledger.admit(2, 15, 10).unwrap();
        ledger.insert(2, b);
        assert_eq!(ledger.total_bytes(), 1000);
        assert!(matches!(
            ledger.admit(3, 1, 1),
            Err(RenderError::OutOfMemory(_))
        ));
        ledger.remove(1);
        assert_eq!(ledger.total_bytes(), 600);
        ledger.clear();
        assert_eq!(ledger.total_bytes(), 0);
        assert!(ledger.get(2).is_err());
    }

    #[test]
    fn blobs_share_the_count_and_byte_limits() {
        let limits = Limits {
            max_resources: 2,
            max_resource_bytes: 1000,
            max_dimension: 16,
            max_backing_entries: 4,
            ..policy::limits::DEFAULT
        };
        let mut ledger = ResourceLedger::new(limits);
        assert!(ledger.admit_blob(0, 1).is_err());
        assert!(matches!(
            ledger.admit_blob(1, 1001),
            Err(RenderError::OutOfMemory(_))
        ));
        let a = ledger.admit_blob(1, 600).unwrap();
        assert!(a.blob && a.width == 0 && a.height == 0);
        ledger.insert(1, a);
        assert_eq!(
            ledger.admit_blob(1, 0),
            Err(RenderError::InvalidResource(1))
        );
        assert!(ledger.admit_blob(2, 401).is_err());
        assert!(ledger.admit(2, 10, 11).is_err());
        let b = ledger.admit_blob(2, 0).unwrap();
        ledger.insert(2, b);
        assert!(matches!(
            ledger.admit_blob(3, 0),
            Err(RenderError::OutOfMemory(_))
        ));
        assert_eq!(ledger.remove(1).map(|i| i.bytes), Some(600));
        assert_eq!(ledger.total_bytes(), 0);
    }

    #[test]
    fn three_d_mip_levels_are_bounded_by_the_largest_side() {
        use protocol::ipc::Resource3d;
        use protocol::virtio_gpu::{PIPE_BUFFER, PIPE_TEXTURE_2D, PIPE_TEXTURE_3D};
        let ledger = ResourceLedger::new(policy::limits::DEFAULT);
        let tex = |target, width, height, depth, last_level| Resource3d {
            target,
            width,
            height,
            depth,
            array_size: 1,
            last_level,
            ..Resource3d::default()
        };
        // 64x32: levels 0..=6; a 3D texture's depth counts, a buffer has level 0 only.
        assert!(ledger
            .admit_3d(1, &tex(PIPE_TEXTURE_2D, 64, 32, 1, 6))
            .is_ok());
        for (what, args) in [
            ("2D, level 7", tex(PIPE_TEXTURE_2D, 64, 32, 1, 7)),
            (
                "2D, level u32::MAX",
                tex(PIPE_TEXTURE_2D, 64, 32, 1, u32::MAX),
            ),
            ("3D 4x4x256, level 9", tex(PIPE_TEXTURE_3D, 4, 4, 256, 9)),
            ("buffer, level 1", tex(PIPE_BUFFER, 4096, 1, 1, 1)),
        ] {
            assert!(
                matches!(
                    ledger.admit_3d(1, &args),
                    Err(RenderError::InvalidParameter(_))
                ),
                "{what}"
            );
        }
        assert!(ledger
            .admit_3d(1, &tex(PIPE_TEXTURE_3D, 4, 4, 256, 8))
            .is_ok());
    }
}
