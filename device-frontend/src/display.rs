//! The vhost-user-gpu display socket (VHOST_USER_GPU_SET_SOCKET): how the VMM learns about
//! scanouts, damaged rectangles and the cursor. Failures here never stop the device: the
//! guest keeps being served, the picture is just not shown, and the log says why.

use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuEdidRequest, VhostUserGpuScanout,
    VhostUserGpuUpdate,
};
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::GpuBackend;

use protocol::virtio_gpu::{
    DisplayOne, Rect, VIRTIO_GPU_EDID_MAX_SIZE, VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
    VIRTIO_GPU_RESP_OK_EDID,
};

/// VHOST_USER_GPU_PROTOCOL_F_EDID. Our own constant: vhost 0.18 declares
/// `VhostUserGpuProtocolFeatures::EDID` as the value 0 (an empty set) instead of bit 0,
/// which would make every VMM look EDID-capable and never enable it.
pub const DISPLAY_F_EDID: u64 = 1 << 0;

/// Bytes of a cursor image in a CURSOR_UPDATE (64 x 64 pixels, 4 bytes each).
pub const CURSOR_BYTES: usize = 64 * 64 * 4;

/// The VMM's display endpoint, once it has been handed to us.
pub struct Display {
    backend: GpuBackend,
    vmm_features: u64,
    failed: bool,
}

impl Display {
    /// Negotiates the display protocol features the way QEMU expects: ask, then set the
    /// subset we use.
    pub fn connect(backend: GpuBackend) -> std::io::Result<Display> {
        let offered = backend.get_protocol_features()?;
        let vmm_features = offered.value;
        let wanted = vmm_features & DISPLAY_F_EDID;
        backend.set_protocol_features(&VhostUserU64::new(wanted))?;
        log::info!(
            "display socket connected, VMM display features {vmm_features:#x}, enabled {wanted:#x}"
        );
        Ok(Display {
            backend,
            vmm_features,
            failed: false,
        })
    }

    /// The display protocol features the VMM offered.
    pub fn vmm_features(&self) -> u64 {
        self.vmm_features
    }

    /// The VMM's preferred display configuration (what its UI shows), for the first
    /// `count` scanouts. None when the VMM does not answer sensibly; the caller then falls
    /// back to the configured outputs. Sizes beyond `max_side` are refused, not clamped: a
    /// VMM that reports them is confused, and our own default is the safer answer.
    pub fn display_info(&mut self, count: usize, max_side: u32) -> Option<Vec<DisplayOne>> {
        if self.failed {
            return None;
        }
        let reply = match self.backend.get_display_info() {
            Ok(r) => r,
            Err(e) => {
                self.check("GET_DISPLAY_INFO", Err(e));
                return None;
            }
        };
        if reply.hdr.type_ != VIRTIO_GPU_RESP_OK_DISPLAY_INFO {
            log::warn!(
                "VMM answered GET_DISPLAY_INFO with type {:#x}; using the configured outputs",
                reply.hdr.type_
            );
            return None;
        }
        let mut out = Vec::with_capacity(count);
        for pm in reply.pmodes.iter().take(count) {
            if pm.r.width > max_side || pm.r.height > max_side {
                log::warn!(
                    "VMM reported a {}x{} display; using the configured outputs",
                    pm.r.width,
                    pm.r.height
                );
                return None;
            }
            out.push(DisplayOne {
                rect: Rect {
                    x: pm.r.x,
                    y: pm.r.y,
                    width: pm.r.width,
                    height: pm.r.height,
                },
                enabled: pm.enabled != 0,
                flags: pm.flags,
            });
        }
        Some(out)
    }

    /// The VMM's EDID for a scanout, when it offered the EDID display feature.
    pub fn edid(&mut self, scanout_id: u32) -> Option<Vec<u8>> {
        if self.failed || self.vmm_features & DISPLAY_F_EDID == 0 {
            return None;
        }
        let reply = match self
            .backend
            .get_edid(&VhostUserGpuEdidRequest { scanout_id })
        {
            Ok(r) => r,
            Err(e) => {
                self.check("GET_EDID", Err(e));
                return None;
            }
        };
        let size = reply.size as usize;
        if reply.hdr.type_ != VIRTIO_GPU_RESP_OK_EDID
            || size == 0
            || size > VIRTIO_GPU_EDID_MAX_SIZE
        {
            log::warn!(
                "VMM answered GET_EDID with type {:#x}, size {}; using our own EDID",
                reply.hdr.type_,
                reply.size
            );
            return None;
        }
        Some(reply.edid[..size].to_vec())
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
