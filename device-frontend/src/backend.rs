//! The vhost-user backend: what vhost-user-backend's daemon calls. The control actor lives
//! here and runs only on the vring worker thread (`handle_event`): queue kicks are handled
//! where they land; calls made on the vhost-user thread (memory table, display socket,
//! reset, ring stop) are posted to the actor's mailbox, so that thread never blocks on the
//! renderer and the device state has one owner.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserShMemConfig};
use vhost::vhost_user::Backend;
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock};
use virtio_bindings::virtio_config::{VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use protocol::config::DeviceConfig;
use protocol::virtio_gpu::{
    VIRTIO_GPU_F_CONTEXT_INIT, VIRTIO_GPU_F_EDID, VIRTIO_GPU_F_RESOURCE_BLOB, VIRTIO_GPU_F_VIRGL,
};

use crate::backend_channel::BackendChannel;
use crate::config_space::ConfigSpace;
use crate::control::{Control, GuestMem, Input, NUM_QUEUES};
use crate::mailbox::{Inbox, Mailbox, MAILBOX_EVENT, METRICS_EVENT, RENDERER_EVENT, VMM_EVENT};
use crate::metrics::Reporter;
use crate::vmm_requests::{VmmRequests, HOSTMEM_SHMID};
use crate::EXIT_RENDERER_GONE;

/// How long GET_VRING_BASE waits for a queue's in-flight commands to be answered.
const STOP_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest virtqueue the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// The device as vhost-user-backend sees it.
#[derive(Clone)]
pub struct GpuDevice {
    inner: Arc<Inner>,
}

struct Inner {
    mailbox: Mailbox,
    inbox: Inbox,
    /// Locked only by the vring worker thread (and by `run` after that thread is gone):
    /// the mutex is what makes the actor's state `Sync`, not a point of contention.
    control: Mutex<Control>,
    features: u64,
    config: Mutex<ConfigSpace>,
    event_idx: Arc<AtomicBool>,
    /// Size of the host-visible region, when blobs are on.
    hostmem: Option<u64>,
    /// Wakes the vring worker thread to exit: vhost-user-backend joins it when the daemon is
    /// dropped, so without an exit event the frontend would hang on its way out. One per
    /// daemon (`--keep-listening` makes a daemon per connection): a signalled event would
    /// stop the next daemon's worker at once.
    exit: Mutex<(EventConsumer, EventNotifier)>,
    /// The exit consumers handed to vring workers. vhost-user-backend 0.24 turns each into
    /// a raw fd for its epoll and never closes it: one descriptor per daemon. With a
    /// daemon per connection that would leak one per reconnect, so they are closed here
    /// once their daemon is gone (`tests/tests/reconnect.rs` counts every descriptor, so a
    /// library that starts closing them itself shows up as a count below the baseline).
    handed_out: Mutex<Vec<std::os::fd::RawFd>>,
    /// The metrics timer and sender (`--metrics-file`); used only on the vring worker.
    metrics: Mutex<Option<Reporter>>,
    /// The current daemon's event loop, where the VMM's backend channel is watched once it
    /// arrives. Weak: the loop holds the device, and a daemon's loop must go with it.
    event_loop: Mutex<Vec<Weak<VringEpollHandler<GpuDevice>>>>,
}

impl GpuDevice {
    /// The device around its control actor; `event_idx` is shared with the actor.
    pub fn new(
        config: &DeviceConfig,
        control: Control,
        (mailbox, inbox): (Mailbox, Inbox),
        event_idx: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        // INDIRECT_DESC is served by virtio-queue's chain walker. RING_RESET is offered
        // because QEMU forwards the guest's transport features to SET_FEATURES without
        // masking them with ours, and vhost-user-backend drops the connection on any bit
        // it did not offer; the Linux virtio-gpu driver never resets a single queue, and a
        // reset ring comes back through the usual SET_VRING_* messages.
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1u64 << VIRTIO_F_RING_RESET)
            | VHOST_USER_F_PROTOCOL_FEATURES;
        if config.edid {
            features |= 1u64 << VIRTIO_GPU_F_EDID;
        }
        if config.hostmem.is_some() {
            features |= (1u64 << VIRTIO_GPU_F_RESOURCE_BLOB) | (1u64 << VIRTIO_GPU_F_CONTEXT_INIT);
        }
        if config.virgl {
            features |= 1u64 << VIRTIO_GPU_F_VIRGL;
        }
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(GpuDevice {
            inner: Arc::new(Inner {
                mailbox,
                inbox,
                control: Mutex::new(control),
                features,
                config: Mutex::new(ConfigSpace {
                    events_read: 0,
                    num_scanouts: config.outputs.len() as u32,
                    num_capsets: crate::blobs::num_capsets(config),
                }),
                event_idx,
                hostmem: config.hostmem,
                exit: Mutex::new(exit),
                handed_out: Mutex::new(Vec::new()),
                metrics: Mutex::new(None),
                event_loop: Mutex::new(Vec::new()),
            }),
        })
    }

    fn send(&self, input: Input) {
        if !self.inner.mailbox.post(input) {
            log::debug!("control actor gone; event dropped");
        }
    }

    /// The fd the vring worker's epoll loop must watch (as [`MAILBOX_EVENT`]).
    pub fn mailbox_fd(&self) -> std::os::fd::RawFd {
        self.inner.inbox.wake_fd()
    }

    /// The renderer's doorbell, for the epoll loop to watch (as [`RENDERER_EVENT`]).
    pub fn renderer_doorbell_fd(&self) -> Option<std::os::fd::RawFd> {
        self.with_control(|c| c.renderer_doorbell())
    }

    /// A fresh exit event for the next daemon's vring worker (the last one's was signalled
    /// when that daemon was dropped). Call only once the last daemon has been dropped: it
    /// closes the exit descriptors that daemon left open.
    pub fn renew_exit_event(&self) -> io::Result<()> {
        let handed_out = std::mem::take(
            &mut *self
                .inner
                .handed_out
                .lock()
                .map_err(|_| io::Error::other("exit event lock poisoned"))?,
        );
        for fd in handed_out {
            // SAFETY: the dropped daemon took this descriptor over with `into_raw_fd` and
            // never closes it; its worker thread (the only user) has been joined, so no one
            // owns it and this closes it exactly once.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
        let fresh = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let mut exit = self
            .inner
            .exit
            .lock()
            .map_err(|_| io::Error::other("exit event lock poisoned"))?;
        *exit = fresh;
        Ok(())
    }

    /// Resets the device after the VMM disconnected, so it can serve the next connection;
    /// false when that did not finish within `timeout` (an unmap whose acknowledgment
    /// never came, or the actor is gone).
    pub fn reset_after_disconnect(&self, timeout: std::time::Duration) -> bool {
        let (done, finished) = crossbeam_channel::bounded(1);
        self.send(Input::Disconnected { done });
        finished.recv_timeout(timeout).is_ok()
    }

    /// Reports metrics through `reporter` from now on; returns its timer's fd, which each
    /// daemon's epoll loop must watch (as [`METRICS_EVENT`]).
    pub fn set_metrics(&self, reporter: Reporter) -> io::Result<std::os::fd::RawFd> {
        let fd = reporter.timer_fd();
        *self
            .inner
            .metrics
            .lock()
            .map_err(|_| io::Error::other("metrics lock poisoned"))? = Some(reporter);
        Ok(fd)
    }

    /// The event loop(s) of the daemon now serving: the VMM's backend channel is added
    /// there when it arrives.
    pub fn set_event_loop(&self, handlers: &[Arc<VringEpollHandler<GpuDevice>>]) {
        if let Ok(mut l) = self.inner.event_loop.lock() {
            *l = handlers.iter().map(Arc::downgrade).collect();
        }
    }

    /// Runs `f` on the control actor; used once the vring worker is gone (statistics).
    pub fn with_control<R>(&self, f: impl FnOnce(&Control) -> R) -> Option<R> {
        self.inner.control.lock().ok().map(|c| f(&c))
    }
}

impl VhostUserBackend for GpuDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.inner.features
    }

    fn acked_features(&self, features: u64) {
        log::info!("driver features acked: {features:#x}");
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // RESET_DEVICE: a guest reset must drop resources, and only this message tells a
        // virtio reset apart from the VMM merely stopping the rings (a paused VM).
        let base = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE;
        if self.inner.hostmem.is_some() {
            // Blobs are mapped by the VMM on request over the backend channel.
            base | VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHMEM
        } else {
            base
        }
    }

    fn reset_device(&self) {
        self.send(Input::Reset);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match self.inner.config.lock() {
            Ok(c) => c.read(offset, size),
            Err(_) => vec![0; size.min(16) as usize],
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut c = self
            .inner
            .config
            .lock()
            .map_err(|_| io::Error::other("config lock poisoned"))?;
        if !c.write(offset, buf) {
            log::warn!(
                "ignored write of {} byte(s) to read-only config offset {offset}",
                buf.len()
            );
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        self.send(Input::Memory(mem));
        Ok(())
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        let Some(size) = self.inner.hostmem else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no host-visible region (start with --hostmem)",
            ));
        };
        // Regions are indexed by shmid; virtio-gpu's host-visible region is shmid 1.
        let mut sizes = vec![0u64; usize::from(HOSTMEM_SHMID) + 1];
        sizes[usize::from(HOSTMEM_SHMID)] = size;
        Ok(VhostUserShMemConfig::new(sizes.len() as u32, &sizes))
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        let channel = match BackendChannel::adopt(backend, policy::MAX_OPEN_FILES) {
            Ok(channel) => channel,
            Err(e) => {
                log::error!("{e}; blobs cannot be mapped on this connection");
                return;
            }
        };
        // Watched before the actor owns it: the actor closes the socket when the VMM does,
        // and a number registered after that could name some other descriptor.
        let fd = channel.as_fd().as_raw_fd();
        let handlers: Vec<_> = match self.inner.event_loop.lock() {
            Ok(l) => l.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => Vec::new(),
        };
        if handlers.is_empty() {
            log::error!(
                "no event loop to watch the backend request channel; blobs cannot be mapped"
            );
            return;
        }
        for handler in handlers {
            if let Err(e) = handler.register_listener(fd, EventSet::IN, u64::from(VMM_EVENT)) {
                log::error!(
                    "watching the backend request channel failed: {e}; blobs cannot be mapped"
                );
                return;
            }
        }
        self.send(Input::VmmChannel(VmmRequests::new(channel)));
    }

    fn set_gpu_socket(&self, gpu_backend: GpuBackend) -> io::Result<()> {
        self.send(Input::GpuSocket(gpu_backend));
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Ok(queue) = u16::try_from(queue_index) else {
            return Ok(());
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        self.send(Input::StopQueue {
            queue,
            done: done_tx,
        });
        match done_rx.recv_timeout(STOP_QUEUE_TIMEOUT) {
            Ok(()) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {}
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => log::warn!(
                "queue {queue}: commands still in flight after {STOP_QUEUE_TIMEOUT:?}; \
                 stopping it anyway (the guest will not see their answers)"
            ),
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let exit = self.inner.exit.lock().ok()?;
        let (consumer, notifier) = &*exit;
        match (consumer.try_clone(), notifier.try_clone()) {
            (Ok(c), Ok(n)) => {
                if let Ok(mut fds) = self.inner.handed_out.lock() {
                    fds.push(c.as_raw_fd());
                }
                Some((c, n))
            }
            (Err(e), _) | (_, Err(e)) => {
                log::error!("cloning the vring worker's exit event failed: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The VMM's channel reports its hang-up as such; reading it finds the end.
        if evset != EventSet::IN && device_event != VMM_EVENT {
            return Err(io::Error::other(format!(
                "unexpected epoll events {evset:?} for event {device_event}"
            )));
        }
        let mut control = self
            .inner
            .control
            .lock()
            .map_err(|_| io::Error::other("control actor poisoned"))?;
        let result = if device_event == MAILBOX_EVENT {
            self.inner
                .inbox
                .drain()
                .try_for_each(|input| control.handle(input))
        } else if device_event == RENDERER_EVENT {
            control.renderer_events()
        } else if device_event == VMM_EVENT {
            control.vmm_readable().map(|_| ())
        } else if device_event == METRICS_EVENT {
            if let Some(reporter) = self
                .inner
                .metrics
                .lock()
                .ok()
                .as_mut()
                .and_then(|m| m.as_mut())
            {
                reporter.tick(&control);
            }
            Ok(())
        } else {
            match vrings.get(device_event as usize) {
                Some(vring) => control.kick(device_event, vring.clone()),
                None => {
                    return Err(io::Error::other(format!(
                        "event for unknown queue {device_event}"
                    )))
                }
            }
        };
        if let Err(e) = result.and_then(|()| control.finish_batch()) {
            // The device cannot go on without its renderer; the broker reports this exit
            // code and tears the rest down.
            log::error!("control actor stopped: {e}");
            std::process::exit(EXIT_RENDERER_GONE);
        }
        Ok(())
    }
}
