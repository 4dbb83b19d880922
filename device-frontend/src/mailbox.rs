//! The control actor's mailbox. The actor runs on vhost-user-backend's vring worker thread
//! (so a queue kick is handled where it lands, without a hop to another thread); what the
//! vhost-user thread learns (memory table, display socket, reset, ring stop) is posted here
//! and the worker is woken through an eventfd registered in its epoll loop. (Renderer
//! events do not pass through here: they ring their own doorbell, see `renderer_link`.)

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::control::Input;

/// The epoll `data` value of the mailbox's eventfd: above the queue indices and the value
/// vhost-user-backend reserves for its own exit event.
pub const MAILBOX_EVENT: u16 = crate::control::NUM_QUEUES as u16 + 1;
/// The epoll `data` value of the renderer's doorbell.
pub const RENDERER_EVENT: u16 = MAILBOX_EVENT + 1;
/// The epoll `data` value of the metrics timer (`--metrics-file`).
pub const METRICS_EVENT: u16 = RENDERER_EVENT + 1;
/// The epoll `data` value of the VMM's backend request channel (its replies).
pub const VMM_EVENT: u16 = METRICS_EVENT + 1;

/// Posting side; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<Input>,
    wake: Arc<EventFd>,
}

/// Receiving side, owned by the actor's thread.
pub struct Inbox {
    rx: Receiver<Input>,
    wake: Arc<EventFd>,
}

/// A connected mailbox.
pub fn mailbox() -> std::io::Result<(Mailbox, Inbox)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        Mailbox {
            tx,
            wake: wake.clone(),
        },
        Inbox { rx, wake },
    ))
}

impl Mailbox {
    /// Posts `input` and wakes the actor; false once the actor is gone.
    pub fn post(&self, input: Input) -> bool {
        if self.tx.send(input).is_err() {
            return false;
        }
        // A failed write means the counter is saturated: the actor is awake anyway.
        let _ = self.wake.write(1);
        true
    }
}

impl Inbox {
    /// The eventfd to register in the actor thread's epoll loop.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Takes every posted input, in order, without blocking.
    pub fn drain(&self) -> impl Iterator<Item = Input> + '_ {
        // Consume the wake-up first: an input posted after this read re-arms it.
        let _ = self.wake.read();
        std::iter::from_fn(move || self.rx.try_recv().ok())
    }
}
