//! The renderer-worker's allowlist: the shared one, with executable memory.

use super::common::{self, ExecMemory};
use super::permit::Permit;

/// The renderer's permits.
///
/// `PROT_EXEC` stays allowed in `mmap`/`mprotect`: llvmpipe (virglrenderer's software
/// rasteriser) JIT-compiles shaders. Once the 3D backend lands and is measured, this can
/// become role-specific (2D only: deny).
///
/// No `ioctl` at all: rutabaga's 2D backend needs none. DRM ioctls (render node) come with
/// the virglrenderer backend and will be restricted by request number then. No sockets are
/// accepted or created, beyond ipc-channel's socketpairs.
pub(crate) fn permits(pid: u32) -> Vec<Permit> {
    common::permits(ExecMemory::Allow, pid)
}
