//! virtio-gpu wire format (virtio 1.3, section 5.7): constants, structs, typed commands.

use serde::{Deserialize, Serialize};

/// A rectangle in pixels (struct virtio_gpu_rect).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}
