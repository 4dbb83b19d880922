//! vgpu-sandbox's shared vocabulary: the typed messages between its processes
//! ([`ipc`], [`bootstrap`]), the descriptor lane that carries fds beside them ([`lane`]),
//! the device configuration ([`config`]), the frontend's counters ([`metrics`]), the
//! virtio-gpu wire format ([`virtio_gpu`]) and the framing of virgl command streams
//! ([`virgl`]).

pub mod bootstrap;
pub mod config;
pub mod ipc;
pub mod lane;
pub mod metrics;
pub mod virgl;
pub mod virtio_gpu;
