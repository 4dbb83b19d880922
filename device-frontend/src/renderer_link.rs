//! The frontend's end of the link to the renderer-worker: typed requests and events on
//! ipc-channel, fds on the descriptor lane, and the renderer's doorbell.
//!
//! The control actor runs in an epoll loop, and an ipc-channel receiver cannot be polled;
//! so the renderer rings an eventfd (the doorbell) after each event it sends, the loop
//! watches that, and the actor then takes every event already on the channel without
//! blocking. No thread sits between the renderer and the actor.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use ipc_channel::ipc::{IpcReceiver, IpcSender};
use protocol::ipc::{FenceInfo, RendererBatch, RendererEvent, RendererOp, RendererRequest};
use protocol::lane::{FdTicket, Lane};

use crate::error::FrontendError;

/// Requests out, events in.
pub struct RendererLink {
    tx: IpcSender<RendererBatch>,
    rx: IpcReceiver<RendererEvent>,
    doorbell: OwnedFd,
    lane: Lane,
    next_seq: u64,
    /// Requests made since the last [`RendererLink::flush`].
    batch: RendererBatch,
    /// False from the moment the renderer is known to be gone until a new one is linked.
    alive: bool,
}

impl RendererLink {
    /// Wraps the channels, the doorbell eventfd and the lane.
    pub fn new(
        tx: IpcSender<RendererBatch>,
        rx: IpcReceiver<RendererEvent>,
        doorbell: OwnedFd,
        lane: Lane,
    ) -> Self {
        RendererLink {
            tx,
            rx,
            doorbell,
            lane,
            next_seq: 1,
            batch: Vec::new(),
            alive: true,
        }
    }

    /// Links a new renderer-worker in place of a dead one (same doorbell: every renderer
    /// the broker starts shares it).
    pub fn renew(
        &mut self,
        tx: IpcSender<RendererBatch>,
        rx: IpcReceiver<RendererEvent>,
        lane: Lane,
    ) {
        self.tx = tx;
        self.rx = rx;
        self.lane = lane;
        self.next_seq = 1;
        self.batch.clear();
        self.alive = true;
    }

    /// Whether a renderer is linked.
    pub fn is_alive(&self) -> bool {
        self.alive
    }

    /// The renderer is gone: nothing more is sent until [`RendererLink::renew`].
    pub fn mark_gone(&mut self) {
        self.alive = false;
        self.batch.clear();
    }

    /// The doorbell, for the event loop to watch.
    pub fn doorbell_fd(&self) -> RawFd {
        self.doorbell.as_raw_fd()
    }

    /// Puts `fds` on the lane; the returned ticket goes into the op that uses them.
    pub fn send_fds(&self, fds: &[BorrowedFd<'_>]) -> Result<FdTicket, FrontendError> {
        if !self.alive {
            return Err(FrontendError::RendererGone);
        }
        Ok(self.lane.send(fds)?)
    }

    /// Takes the fds the renderer put on the lane under `ticket` (a blob export).
    pub fn recv_fds(&self, ticket: FdTicket) -> Result<Vec<OwnedFd>, FrontendError> {
        Ok(self.lane.recv(ticket)?)
    }

    /// Queues one request for the next [`RendererLink::flush`] and returns its sequence
    /// number; a `quiet` one is answered only if refused (see [`RendererRequest::quiet`]).
    pub fn send(
        &mut self,
        op: RendererOp,
        fence: Option<FenceInfo>,
        quiet: bool,
    ) -> Result<u64, FrontendError> {
        if !self.alive {
            return Err(FrontendError::RendererGone);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.batch.push(RendererRequest {
            seq,
            op,
            fence,
            quiet: quiet && fence.is_none(),
        });
        Ok(seq)
    }

    /// Sends the queued requests as one message (nothing when none are queued).
    pub fn flush(&mut self) -> Result<(), FrontendError> {
        if self.batch.is_empty() || !self.alive {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.tx
            .send(batch)
            .map_err(|e| FrontendError::RendererSend(e.to_string()))
    }

    /// A sequence number for a request that could not be sent (its reply is made up by
    /// the frontend when it answers what the dead renderer owed).
    pub fn burn_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Appends every event the renderer has sent so far to `events` (a buffer the caller
    /// reuses), after the doorbell rang; true when the renderer is gone (its channel
    /// closed, or it sent something that is not an event).
    pub fn take_events(&mut self, events: &mut Vec<RendererEvent>) -> bool {
        // Silence the bell before reading: an event sent after this read rings it again.
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&self.doorbell, &mut buf);
        if !self.alive {
            return true;
        }
        loop {
            match self.rx.try_recv() {
                Ok(event) => events.push(event),
                Err(ipc_channel::TryRecvError::Empty) => return false,
                Err(ipc_channel::TryRecvError::IpcError(e)) => {
                    log::debug!("renderer event channel: {e:?}");
                    return true;
                }
            }
        }
    }
}
