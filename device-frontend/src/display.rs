//! The vhost-user-gpu display socket (VHOST_USER_GPU_SET_SOCKET): how the VMM learns about
//! scanouts, damaged rectangles and the cursor. Failures here never stop the device: the
//! guest keeps being served, the picture is just not shown, and the log says why.

use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuProtocolFeatures,
    VhostUserGpuScanout, VhostUserGpuUpdate,
};
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::GpuBackend;

use protocol::virtio_gpu::Rect;

/// Bytes of a cursor image in a CURSOR_UPDATE (64 x 64 pixels, 4 bytes each).
pub const CURSOR_BYTES: usize = 64 * 64 * 4;

/// The VMM's display endpoint, once it has been handed to us.
pub struct Display {
    backend: GpuBackend,
    vmm_features: VhostUserGpuProtocolFeatures,
    failed: bool,
}

impl Display {
    /// Negotiates the display protocol features the way QEMU expects: ask, then set the
    /// subset we use.
    pub fn connect(backend: GpuBackend) -> std::io::Result<Display> {
        let offered = backend.get_protocol_features()?;
        let vmm_features = VhostUserGpuProtocolFeatures::from_bits_truncate(offered.value);
        let wanted = vmm_features & VhostUserGpuProtocolFeatures::EDID;
        backend.set_protocol_features(&VhostUserU64::new(wanted.bits()))?;
        log::info!("display socket connected, VMM display features {vmm_features:?}");
        Ok(Display {
            backend,
            vmm_features,
            failed: false,
        })
    }

    /// The features the VMM offered.
    pub fn vmm_features(&self) -> VhostUserGpuProtocolFeatures {
        self.vmm_features
    }

    /// Announces a scanout's size (0 x 0 disables it).
    pub fn scanout(&mut self, scanout_id: u32, width: u32, height: u32) {
        let msg = VhostUserGpuScanout {
            scanout_id,
            width,
            height,
        };
        let r = self.backend.set_scanout(&msg);
        self.check("SCANOUT", r);
    }

    /// Sends a damaged rectangle (scanout coordinates) with its BGRX pixels.
    pub fn update(&mut self, scanout_id: u32, rect: &Rect, pixels: &[u8]) {
        let msg = VhostUserGpuUpdate {
            scanout_id,
            x: rect.x,
            y: rect.y,
            width: rect.width,
            height: rect.height,
        };
        let r = self.backend.update_scanout(&msg, pixels);
        self.check("UPDATE", r);
    }

    /// Moves the cursor, or hides it when `visible` is false.
    pub fn cursor_pos(&mut self, scanout_id: u32, x: u32, y: u32, visible: bool) {
        let pos = VhostUserGpuCursorPos { scanout_id, x, y };
        let r = if visible {
            self.backend.cursor_pos(&pos)
        } else {
            self.backend.cursor_pos_hide(&pos)
        };
        self.check("CURSOR_POS", r);
    }

    /// Sends a new cursor image (BGRA, 64 x 64) with its hot spot.
    pub fn cursor_update(&mut self, pos: (u32, u32, u32), hot: (u32, u32), image: &[u8]) {
        if image.len() != CURSOR_BYTES {
            log::warn!(
                "cursor image of {} bytes not sent, want {CURSOR_BYTES}",
                image.len()
            );
            return;
        }
        let mut data = [0u8; CURSOR_BYTES];
        data.copy_from_slice(image);
        let msg = VhostUserGpuCursorUpdate {
            pos: VhostUserGpuCursorPos {
                scanout_id: pos.0,
                x: pos.1,
                y: pos.2,
            },
            hot_x: hot.0,
            hot_y: hot.1,
        };
        let r = self.backend.cursor_update(&msg, &data);
        self.check("CURSOR_UPDATE", r);
    }

    fn check(&mut self, what: &str, r: std::io::Result<()>) {
        if let Err(e) = r {
            if !self.failed {
                log::warn!(
                    "display socket: sending {what} failed: {e}; the picture will not update"
                );
            }
            self.failed = true;
        }
    }
}
