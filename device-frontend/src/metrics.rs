//! Periodic metrics reports to the broker (`--metrics-file`).
//!
//! The frontend has no file system, so it cannot write the file itself: every period it
//! sends a [`MetricsSnapshot`] on its status channel and the broker writes the file. The
//! period comes from a timerfd watched by the vring worker's epoll loop, next to the
//! mailbox: the snapshot is taken on the control actor's own thread, between two inputs,
//! so it reads the counters without a lock or a copy shared with another thread. The timer
//! is created and armed before the jail, so the filter needs nothing for it beyond `read`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use ipc_channel::ipc::IpcSender;
use protocol::bootstrap::ChildStatus;
use protocol::metrics::MetricsSnapshot;
use vmm_sys_util::timerfd::TimerFd;

use crate::control::Control;

/// Sends the control actor's counters to the broker every period.
pub struct Reporter {
    timer: TimerFd,
    to_broker: IpcSender<ChildStatus>,
}

impl Reporter {
    /// A reporter whose timer fires every `period`, starting one `period` from now. Call
    /// it before the jail: `timerfd_create` and `timerfd_settime` are not allowed after.
    pub fn start(period: Duration, to_broker: IpcSender<ChildStatus>) -> io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(period, Some(period))?;
        Ok(Reporter { timer, to_broker })
    }

    /// The timer, for the epoll loop to watch (as [`crate::mailbox::METRICS_EVENT`]).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer fired: consume its expirations and send one snapshot (however many
    /// periods passed: the counters are totals, a missed period loses nothing).
    pub fn tick(&mut self, control: &Control) {
        // Epoll said it is readable, so this read does not block.
        if let Err(e) = self.timer.wait() {
            log::warn!("reading the metrics timer failed: {e}");
        }
        let snapshot = Box::new(snapshot(control));
        if let Err(e) = self.to_broker.send(ChildStatus::Metrics(snapshot)) {
            log::debug!("metrics not sent: {e}");
        }
    }
}

/// The actor's counters and gauges now.
pub fn snapshot(control: &Control) -> MetricsSnapshot {
    let stats = control.stats();
    let (blobs, mappings) = control.blob_counts();
    let resources = &control.resources;
    MetricsSnapshot {
        commands: stats.by_type,
        errors: stats.by_error,
        fences: stats.fences,
        transfer_to_host_bytes: stats.transfer_bytes,
        display_updates: stats.updates,
        display_update_bytes: stats.update_bytes,
        resources: resources.len() as u64,
        blobs: blobs as u64,
        mappings: mappings as u64,
        host_memory_bytes: resources.bytes_in_use() + resources.scanout_bytes(),
        host_memory_limit_bytes: control.config.limits.max_resource_bytes,
        map_latency: stats.map_latency,
        unmap_latency: stats.unmap_latency,
    }
}
