//! Device configuration, chosen on the broker's command line and handed to the children.

use serde::{Deserialize, Serialize};

/// One display output (scanout) as the guest sees it in GET_DISPLAY_INFO.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputConfig {
    /// Preferred width in pixels.
    pub width: u32,
    /// Preferred height in pixels.
    pub height: u32,
}

/// Per-VM limits that bound what a guest can make the host allocate. This is the plain
/// value both children receive; the defaults, the reason for each, and which values a
/// user may choose are the policy crate's (`vgpu_policy::limits`), which is why there is
/// no `Default` here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Most live resources (2D, 3D and blobs together).
    pub max_resources: u32,
    /// Most bytes of host memory all resources together may need: 2D and 3D resources,
    /// blobs, and the scanout buffers the frontend makes to show them.
    pub max_resource_bytes: u64,
    /// Largest width or height of one resource.
    pub max_dimension: u32,
    /// Most scatter-gather entries in one ATTACH_BACKING or CREATE_BLOB.
    pub max_backing_entries: u32,
    /// Most live contexts (CTX_CREATE without CTX_DESTROY).
    pub max_contexts: u32,
    /// Largest SUBMIT_3D command stream, in bytes.
    pub max_submit_bytes: u32,
    /// Most blobs in the host-visible window at once (from RESOURCE_MAP_BLOB until their
    /// unmap has completed).
    pub max_mappings: u32,
}

/// Everything the frontend and the renderer need to know about the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// The outputs, in scanout order (at least 1, at most 16).
    pub outputs: Vec<OutputConfig>,
    /// Ask the VMM (its display socket) for the preferred display configuration and EDID
    /// instead of answering from `outputs`; set when the user gave no explicit outputs,
    /// so QEMU's own `xres`/`yres` and window size reach the guest.
    pub display_from_vmm: bool,
    /// Whether VIRTIO_GPU_F_EDID is offered.
    pub edid: bool,
    /// Guest-facing limits.
    pub limits: Limits,
    /// Whether each child installs its seccomp filter (always true outside debugging).
    pub seccomp: bool,
    /// Size of the host-visible memory region (blobs mapped for the guest), in bytes; None
    /// leaves blobs, contexts and the region out (VIRTIO_GPU_F_RESOURCE_BLOB and
    /// VIRTIO_GPU_F_CONTEXT_INIT are not offered).
    pub hostmem: Option<u64>,
    /// Capability sets the renderer offers (config space num_capsets), when blobs are on.
    pub num_capsets: u32,
    /// The renderer is virglrenderer (VIRTIO_GPU_F_VIRGL, virgl capsets, 3D commands)
    /// instead of rutabaga's 2D and cross-domain components.
    pub virgl: bool,
    /// The DRM render node the virgl renderer uses instead of a surfaceless (software)
    /// display; opened by the renderer before its jail, never by the frontend.
    pub render_node: Option<String>,
    /// After the VMM disconnects, reset the device and serve the next connection on the
    /// same socket, instead of ending (which is what QEMU's own backends do).
    pub keep_listening: bool,
}

/// Largest host-visible region accepted (the VMM reserves this much address space).
pub const MAX_HOSTMEM: u64 = 64 << 30;

/// The most scanouts virtio-gpu allows.
pub const MAX_SCANOUTS: usize = 16;

impl DeviceConfig {
    /// The default device under `limits`: one 1280x800 output whose size the VMM's display
    /// may decide, EDID on, seccomp on, no hostmem window (no blobs), the 2D renderer.
    pub fn with_limits(limits: Limits) -> Self {
        DeviceConfig {
            outputs: vec![OutputConfig {
                width: 1280,
                height: 800,
            }],
            display_from_vmm: true,
            edid: true,
            limits,
            seccomp: true,
            hostmem: None,
            num_capsets: 0,
            virgl: false,
            render_node: None,
            keep_listening: false,
        }
    }
}
