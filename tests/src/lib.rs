//! The test VMM and end-to-end harness for vgpu-sandbox.
//!
//! - [`cross_domain`]: a guest-side encoder for the cross-domain context protocol.
//! - [`guest_memory`]: memfd guest RAM and a bump allocator.
//! - [`virtqueue`]: a driver-side split virtqueue.
//! - [`vmm`]: [`TestVmm`], a real vhost-user frontend.
//! - [`display`]: the vhost-user-gpu display-socket peer.
//! - [`hostmem`]: [`hostmem::HostmemWindow`], the VMM's MAP_FIXED hostmem window.
//! - [`backend_req`]: [`backend_req::BackendRequests`], the VMM side of SHMEM_MAP/UNMAP.
//! - [`gpu`]: [`GpuDriver`], a virtio-gpu driver with its own command encoder.
//! - [`stack`]: [`Stack`], spawning and supervising the real `vgpu-sandbox` binary.
//! - [`scenario`]: [`run_demo`], the `vgpu-sandbox demo` scenario.
//! - [`edid`]: EDID generation and checking.
//! - [`virgl`]: a builder of virgl command streams (SUBMIT_3D to a VIRGL context).

pub mod backend_req;
pub mod bench;
pub mod cross_domain;
pub mod display;
pub mod edid;
pub mod gpu;
pub mod guest_memory;
pub mod hostmem;
pub mod qemu;
pub mod scenario;
pub mod stack;
pub mod virgl;
pub mod virtqueue;
pub mod vmm;

pub use display::{DisplayEvent, DisplayEvents};
pub use gpu::{Command, GpuDriver, Queue, Rect, Response};
pub use scenario::{run_demo, DemoOptions, DemoReport};
pub use stack::{ProcessInfo, Role, Stack};
pub use vmm::{TestVmm, VmmOptions};
