//! The device-frontend's counters as it reports them to the broker
//! ([`crate::bootstrap::ChildStatus::Metrics`]), which turns them into the `--metrics-file`.
//!
//! The frontend counts into fixed arrays indexed by [`command_index`] and [`error_index`]
//! (no allocation and no lock per command: its control actor is single-threaded) and
//! sends a whole [`MetricsSnapshot`] every few seconds. Counters are totals since the
//! frontend started, so a lost or late snapshot costs resolution, never correctness.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::virtio_gpu::{self as gpu, ErrorCode};

/// Every command type the device knows, with the name the metrics give it (the
/// `VIRTIO_GPU_CMD_` prefix dropped). Index `i` here is index `i` of
/// [`MetricsSnapshot::commands`].
pub const COMMAND_TYPES: [(u32, &str); 26] = [
    (gpu::VIRTIO_GPU_CMD_GET_DISPLAY_INFO, "GET_DISPLAY_INFO"),
    (gpu::VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, "RESOURCE_CREATE_2D"),
    (gpu::VIRTIO_GPU_CMD_RESOURCE_UNREF, "RESOURCE_UNREF"),
    (gpu::VIRTIO_GPU_CMD_SET_SCANOUT, "SET_SCANOUT"),
    (gpu::VIRTIO_GPU_CMD_RESOURCE_FLUSH, "RESOURCE_FLUSH"),
    (
        gpu::VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
        "TRANSFER_TO_HOST_2D",
    ),
    (
        gpu::VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
        "RESOURCE_ATTACH_BACKING",
    ),
    (
        gpu::VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING,
        "RESOURCE_DETACH_BACKING",
    ),
    (gpu::VIRTIO_GPU_CMD_GET_CAPSET_INFO, "GET_CAPSET_INFO"),
    (gpu::VIRTIO_GPU_CMD_GET_CAPSET, "GET_CAPSET"),
    (gpu::VIRTIO_GPU_CMD_GET_EDID, "GET_EDID"),
    (
        gpu::VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
        "RESOURCE_ASSIGN_UUID",
    ),
    (
        gpu::VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
        "RESOURCE_CREATE_BLOB",
    ),
    (gpu::VIRTIO_GPU_CMD_SET_SCANOUT_BLOB, "SET_SCANOUT_BLOB"),
    (gpu::VIRTIO_GPU_CMD_CTX_CREATE, "CTX_CREATE"),
    (gpu::VIRTIO_GPU_CMD_CTX_DESTROY, "CTX_DESTROY"),
    (
        gpu::VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
        "CTX_ATTACH_RESOURCE",
    ),
    (
        gpu::VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
        "CTX_DETACH_RESOURCE",
    ),
    (gpu::VIRTIO_GPU_CMD_RESOURCE_CREATE_3D, "RESOURCE_CREATE_3D"),
    (
        gpu::VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
        "TRANSFER_TO_HOST_3D",
    ),
    (
        gpu::VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
        "TRANSFER_FROM_HOST_3D",
    ),
    (gpu::VIRTIO_GPU_CMD_SUBMIT_3D, "SUBMIT_3D"),
    (gpu::VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB, "RESOURCE_MAP_BLOB"),
    (
        gpu::VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
        "RESOURCE_UNMAP_BLOB",
    ),
    (gpu::VIRTIO_GPU_CMD_UPDATE_CURSOR, "UPDATE_CURSOR"),
    (gpu::VIRTIO_GPU_CMD_MOVE_CURSOR, "MOVE_CURSOR"),
];

/// Number of command counters: every type of [`COMMAND_TYPES`], then one for commands
/// whose type is unknown or unreadable (named [`UNKNOWN_COMMAND`]).
pub const COMMAND_KINDS: usize = COMMAND_TYPES.len() + 1;

/// The name of the counter of commands of no known type.
pub const UNKNOWN_COMMAND: &str = "UNKNOWN";

/// The counter index of a command of wire type `type_` (`VIRTIO_GPU_CMD_*`).
pub fn command_index(type_: u32) -> usize {
    // The types come in three dense runs, so this is arithmetic, not a search.
    let (base, first, count) = match type_ {
        0x0100..=0x010d => (0, 0x0100, 14),
        0x0200..=0x0209 => (14, 0x0200, 10),
        0x0300..=0x0301 => (24, 0x0300, 2),
        _ => return COMMAND_KINDS - 1,
    };
    let index = base + (type_ - first) as usize;
    debug_assert!(index < base + count);
    index
}

/// The name of command counter `index` (see [`COMMAND_TYPES`]).
pub fn command_name(index: usize) -> &'static str {
    COMMAND_TYPES
        .get(index)
        .map_or(UNKNOWN_COMMAND, |(_, name)| name)
}

/// Every error answer, in the order of [`MetricsSnapshot::errors`].
pub const ERROR_CODES: [ErrorCode; 6] = ErrorCode::ALL;

/// Number of error counters.
pub const ERROR_KINDS: usize = ERROR_CODES.len();

/// The counter index of error answer `code`.
pub fn error_index(code: ErrorCode) -> usize {
    match code {
        ErrorCode::Unspec => 0,
        ErrorCode::OutOfMemory => 1,
        ErrorCode::InvalidScanoutId => 2,
        ErrorCode::InvalidResourceId => 3,
        ErrorCode::InvalidContextId => 4,
        ErrorCode::InvalidParameter => 5,
    }
}

/// The name of error counter `index`: the `VIRTIO_GPU_RESP_` suffix (`ERR_OUT_OF_MEMORY`).
pub fn error_name(index: usize) -> &'static str {
    match ERROR_CODES.get(index) {
        Some(ErrorCode::Unspec) => "ERR_UNSPEC",
        Some(ErrorCode::OutOfMemory) => "ERR_OUT_OF_MEMORY",
        Some(ErrorCode::InvalidScanoutId) => "ERR_INVALID_SCANOUT_ID",
        Some(ErrorCode::InvalidResourceId) => "ERR_INVALID_RESOURCE_ID",
        Some(ErrorCode::InvalidContextId) => "ERR_INVALID_CONTEXT_ID",
        Some(ErrorCode::InvalidParameter) => "ERR_INVALID_PARAMETER",
        None => "ERR_UNKNOWN",
    }
}

/// Upper bounds of the latency histograms' buckets, in nanoseconds (50 µs to 100 ms): a
/// map or unmap is two message round trips (renderer, VMM), normally well under a
/// millisecond; the tail shows a slow VMM. Slower answers land in the `+Inf` bucket.
pub const LATENCY_BUCKETS_NS: [u64; 11] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
];

/// A latency histogram with the buckets of [`LATENCY_BUCKETS_NS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Observations per bucket, not cumulative: `buckets[i]` counts those above bucket
    /// `i - 1`'s bound and at most bucket `i`'s. Those above the last bound are
    /// `count` minus the sum of these.
    pub buckets: [u64; LATENCY_BUCKETS_NS.len()],
    /// Observations in all.
    pub count: u64,
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: u64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        if let Some(i) = LATENCY_BUCKETS_NS.iter().position(|&bound| ns <= bound) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_ns = self.sum_ns.saturating_add(ns);
    }

    /// Observations at most each bucket's bound, as Prometheus' `le` buckets count them.
    pub fn cumulative(&self) -> [u64; LATENCY_BUCKETS_NS.len()] {
        let mut total = 0;
        self.buckets.map(|n| {
            total += n;
            total
        })
    }
}

/// The frontend's counters and gauges at one moment; totals since it started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    /// Commands answered, by [`command_index`].
    pub commands: [u64; COMMAND_KINDS],
    /// Commands answered with an error, by [`error_index`].
    pub errors: [u64; ERROR_KINDS],
    /// Fenced commands answered (each answer signals its fence to the guest).
    pub fences: u64,
    /// Bytes copied from guest memory into resources by successful TRANSFER_TO_HOST_2D
    /// commands (rectangle width × height × 4).
    pub transfer_to_host_bytes: u64,
    /// `VHOST_USER_GPU_UPDATE` messages sent to the VMM.
    pub display_updates: u64,
    /// Pixel bytes in those messages.
    pub display_update_bytes: u64,
    /// Live resources (2D, 3D and blobs).
    pub resources: u64,
    /// Live blob resources.
    pub blobs: u64,
    /// Blobs occupying a range of the host-visible window (mapped, or on their way in or
    /// out).
    pub mappings: u64,
    /// Host memory charged to the guest: resources, blobs and scanout buffers.
    pub host_memory_bytes: u64,
    /// The per-VM limit on that (`--max-resource-memory`).
    pub host_memory_limit_bytes: u64,
    /// RESOURCE_MAP_BLOB latency, from the command's arrival to its successful answer.
    pub map_latency: Histogram,
    /// RESOURCE_UNMAP_BLOB latency, from the command's arrival to its successful answer.
    pub unmap_latency: Histogram,
}

impl Default for MetricsSnapshot {
    fn default() -> Self {
        MetricsSnapshot {
            commands: [0; COMMAND_KINDS],
            errors: [0; ERROR_KINDS],
            fences: 0,
            transfer_to_host_bytes: 0,
            display_updates: 0,
            display_update_bytes: 0,
            resources: 0,
            blobs: 0,
            mappings: 0,
            host_memory_bytes: 0,
            host_memory_limit_bytes: 0,
            map_latency: Histogram::default(),
            unmap_latency: Histogram::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_type_has_its_own_index() {
        for (i, (type_, name)) in COMMAND_TYPES.iter().enumerate() {
            assert_eq!(command_index(*type_), i, "{name}");
            assert_eq!(command_name(i), *name);
        }
        assert_eq!(command_index(0), COMMAND_KINDS - 1);
        assert_eq!(command_index(0x010e), COMMAND_KINDS - 1);
        assert_eq!(command_index(0x020a), COMMAND_KINDS - 1);
        assert_eq!(command_index(0x0302), COMMAND_KINDS - 1);
        assert_eq!(command_name(COMMAND_KINDS - 1), UNKNOWN_COMMAND);
    }

    #[test]
    fn every_error_code_has_its_own_index() {
        for (i, code) in ERROR_CODES.iter().enumerate() {
            assert_eq!(error_index(*code), i);
        }
        assert_eq!(error_name(1), "ERR_OUT_OF_MEMORY");
    }

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(1));
        assert_eq!(h.count, 3);
        let c = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[1], 2);
        assert_eq!(c[LATENCY_BUCKETS_NS.len() - 1], 2);
        assert_eq!(h.sum_ns, 50_000 + 51_000 + 1_000_000_000);
    }

    #[test]
    fn snapshot_survives_the_wire() {
        let mut s = MetricsSnapshot::default();
        s.commands[3] = 7;
        s.map_latency.observe(Duration::from_millis(1));
        let bytes = postcard_roundtrip(&s);
        assert_eq!(bytes, s);
    }

    fn postcard_roundtrip(s: &MetricsSnapshot) -> MetricsSnapshot {
        // ipc-channel is the real wire; a channel in this process carries the same bytes.
        let (tx, rx) = ipc_channel::ipc::channel().unwrap();
        tx.send(s.clone()).unwrap();
        rx.recv().unwrap()
    }
}
