//! The sending side of the events channel, shared by the executor (replies) and the
//! renderer's fence callback (fence completions), which may run on another thread.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use ipc_channel::ipc::IpcSender;
use protocol::ipc::{FenceInfo, RendererEvent};

/// A cloneable, thread-safe handle on the events channel to the frontend.
///
/// The mutex also serialises the two writers, so a reply sent before a fence is created
/// is on the channel before that fence's completion.
#[derive(Clone, Debug)]
pub struct EventSink {
    sender: Arc<Mutex<Sending>>,
    doorbell: Option<Arc<OwnedFd>>,
}

/// The sender, and whether the bell is held for a batch (under the same lock, so an event
/// sent from another thread while the executor releases the bell is never left unrung).
#[derive(Debug)]
struct Sending {
    sender: IpcSender<RendererEvent>,
    /// The executor is handling a batch: ring once at its end, not per event.
    held: bool,
    /// An event was sent while the bell was held.
    owed: bool,
}

/// The frontend is gone: the events channel could not take a message.
#[derive(Debug, thiserror::Error)]
#[error("events channel to the frontend failed: {0}")]
pub struct SinkClosed(pub String);

impl EventSink {
    /// Wraps the events sender.
    pub fn new(sender: IpcSender<RendererEvent>) -> Self {
        EventSink {
            sender: Arc::new(Mutex::new(Sending::new(sender))),
            doorbell: None,
        }
    }

    /// Also rings `doorbell` (an eventfd) after every event, so the frontend's event loop
    /// knows there is something to read on the channel.
    pub fn with_doorbell(sender: IpcSender<RendererEvent>, doorbell: OwnedFd) -> Self {
        EventSink {
            sender: Arc::new(Mutex::new(Sending::new(sender))),
            doorbell: Some(Arc::new(doorbell)),
        }
    }

    /// Sends one event, and rings the bell unless it is held for a batch.
    pub fn send(&self, event: RendererEvent) -> Result<(), SinkClosed> {
        let mut sending = self.lock();
        sending
            .sender
            .send(event)
            .map_err(|e| SinkClosed(e.to_string()))?;
        // After the send, never before: the frontend reads the channel when it hears the
        // bell, so the event must already be there.
        if sending.held {
            sending.owed = true;
            return Ok(());
        }
        self.ring()
    }

    /// Holds the bell while the executor handles a batch: one wake-up of the frontend for
    /// all the batch's replies.
    pub fn hold(&self) {
        self.lock().held = true;
    }

    /// Releases the bell, ringing it if anything was sent while it was held.
    pub fn release(&self) -> Result<(), SinkClosed> {
        let mut sending = self.lock();
        sending.held = false;
        if std::mem::take(&mut sending.owed) {
            return self.ring();
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sending> {
        // A poisoned lock only means another sender panicked mid-send; the sender itself
        // holds no invariant we could break, so keep using it.
        self.sender.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// EAGAIN (the counter is saturated) means the frontend has a wake-up pending anyway.
    fn ring(&self) -> Result<(), SinkClosed> {
        if let Some(bell) = &self.doorbell {
            match nix::unistd::write(bell.as_ref(), &1u64.to_ne_bytes()) {
                Ok(_) | Err(nix::Error::EAGAIN) => {}
                Err(e) => return Err(SinkClosed(format!("doorbell: {e}"))),
            }
        }
        Ok(())
    }

    /// A fence callback for a renderer backend: reports each completed fence.
    pub fn fence_callback(&self) -> impl Fn(FenceInfo) + Send + Sync + 'static {
        let sink = self.clone();
        move |fence| {
            log::debug!(
                "fence {} (ctx {}, ring {}) signalled",
                fence.fence_id,
                fence.ctx_id,
                fence.ring_idx
            );
            if let Err(e) = sink.send(RendererEvent::FenceSignaled(fence)) {
                log::warn!("fence {} lost: {e}", fence.fence_id);
            }
        }
    }
}

impl Sending {
    fn new(sender: IpcSender<RendererEvent>) -> Self {
        Sending {
            sender,
            held: false,
            owed: false,
        }
    }
}
