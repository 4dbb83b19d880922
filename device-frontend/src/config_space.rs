//! The virtio-gpu device configuration space (struct virtio_gpu_config).

/// Byte size of struct virtio_gpu_config.
pub const CONFIG_SIZE: usize = 16;
const EVENTS_CLEAR_OFFSET: u32 = 4;

/// events_read / events_clear / num_scanouts / num_capsets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigSpace {
    /// Pending VIRTIO_GPU_EVENT_* bits.
    pub events_read: u32,
    /// Number of scanouts.
    pub num_scanouts: u32,
    /// Number of capability sets.
    pub num_capsets: u32,
}

impl ConfigSpace {
    /// The bytes the driver reads at `offset`, `size` long; out-of-range reads get zeros
    /// for the missing part rather than an error, as virtio config reads cannot fail.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut all = [0u8; CONFIG_SIZE];
        all[0..4].copy_from_slice(&self.events_read.to_le_bytes());
        // events_clear always reads as 0: it is a write-to-clear register.
        all[8..12].copy_from_slice(&self.num_scanouts.to_le_bytes());
        all[12..16].copy_from_slice(&self.num_capsets.to_le_bytes());
        let mut out = vec![0u8; size.min(CONFIG_SIZE as u32) as usize];
        for (i, b) in out.iter_mut().enumerate() {
            if let Some(v) = (offset as usize).checked_add(i).and_then(|at| all.get(at)) {
                *b = *v;
            }
        }
        out
    }

    /// Applies a driver write; only events_clear is writable. Returns false for writes
    /// to read-only fields, which are ignored.
    pub fn write(&mut self, offset: u32, buf: &[u8]) -> bool {
        if offset != EVENTS_CLEAR_OFFSET || buf.len() != 4 {
            return false;
        }
        let clear = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
        self.events_read &= !clear;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_events_clear() {
        let mut c = ConfigSpace {
            events_read: 1,
            num_scanouts: 2,
            num_capsets: 0,
        };
        assert_eq!(
            c.read(0, 16),
            [1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(c.read(8, 4), [2, 0, 0, 0]);
        assert_eq!(c.read(14, 8), [0; 8]);
        assert_eq!(c.read(u32::MAX, 4), [0, 0, 0, 0]);
        assert!(c.write(4, &1u32.to_le_bytes()));
        assert_eq!(c.events_read, 0);
        assert!(!c.write(8, &5u32.to_le_bytes()));
        assert_eq!(c.num_scanouts, 2);
    }
}
