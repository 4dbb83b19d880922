//! The renderer-worker's allowlists: the shared one, with or without executable memory.
//!
//! No `ioctl` at all: neither rutabaga's 2D and cross-domain components nor virglrenderer
//! on llvmpipe (surfaceless EGL, no render node) make one after set-up. A render node
//! (`--render-node`, GPU hardware) will need the DRM ioctls of its driver, by request
//! number; that cannot be derived without the hardware, so it is not allowed yet. No
//! sockets are accepted or created, beyond ipc-channel's socketpairs.

use super::common::{self, ExecMemory};
use super::permit::Permit;

/// rutabaga's 2D and cross-domain components: no `PROT_EXEC` in `mmap`/`mprotect`.
pub(crate) fn permits_2d(pid: u32) -> Vec<Permit> {
    common::permits(ExecMemory::Deny, pid)
}

/// virglrenderer on Mesa llvmpipe: `PROT_EXEC` allowed, because llvmpipe JIT-compiles
/// every shader (and vertex fetch, and rasteriser variant) to machine code when it is
/// first used, long after set-up. Everything else llvmpipe and virglrenderer do after
/// set-up (its worker threads already exist, the GL context is current) is in the shared
/// list: derived with `--seccomp trap` / `log` from `renderer-worker/tests/jailed_virgl.rs`
/// and the QEMU guest under `--virgl`.
pub(crate) fn permits_virgl(pid: u32) -> Vec<Permit> {
    common::permits(ExecMemory::Allow, pid)
}
