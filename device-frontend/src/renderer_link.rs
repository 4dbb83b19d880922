//! The frontend's end of the link to the renderer-worker: typed requests and events on
//! ipc-channel, fds on the descriptor lane, and the renderer's doorbell.
//!
//! The control actor runs in an epoll loop, and an ipc-channel receiver cannot be polled;
//! so the renderer rings an eventfd (the doorbell) after each event it sends, the loop
//! watches that, and the actor then takes every event already on the channel without
//! blocking. No thread sits between the renderer and the actor.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use ipc_channel::ipc::{IpcReceiver, IpcSender};
use protocol::ipc::{FenceInfo, RendererEvent, RendererOp, RendererRequest};
use protocol::lane::{FdTicket, Lane};

use crate::error::FrontendError;

/// Requests out, events in.
pub struct RendererLink {
    tx: IpcSender<RendererRequest>,
    rx: IpcReceiver<RendererEvent>,
    doorbell: OwnedFd,
    lane: Lane,
    next_seq: u64,
}

impl RendererLink {
    /// Wraps the channels, the doorbell eventfd and the lane.
    pub fn new(
        tx: IpcSender<RendererRequest>,
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
        }
    }

    /// The doorbell, for the event loop to watch.
    pub fn doorbell_fd(&self) -> RawFd {
        self.doorbell.as_raw_fd()
    }

    /// Puts `fds` on the lane; the returned ticket goes into the op that uses them.
    pub fn send_fds(&self, fds: &[BorrowedFd<'_>]) -> Result<FdTicket, FrontendError> {
        Ok(self.lane.send(fds)?)
    }

    /// Takes the fds the renderer put on the lane under `ticket` (a blob export).
    pub fn recv_fds(&self, ticket: FdTicket) -> Result<Vec<OwnedFd>, FrontendError> {
        Ok(self.lane.recv(ticket)?)
    }

    /// Sends one request and returns its sequence number.
    pub fn send(&mut self, op: RendererOp, fence: Option<FenceInfo>) -> Result<u64, FrontendError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.tx
            .send(RendererRequest { seq, op, fence })
            .map_err(|e| FrontendError::RendererSend(e.to_string()))?;
        Ok(seq)
    }

    /// Every event the renderer has sent so far, after the doorbell rang. An Err means the
    /// renderer is gone (or sent something that is not an event).
    pub fn take_events(&mut self) -> Result<Vec<RendererEvent>, FrontendError> {
        // Silence the bell before reading: an event sent after this read rings it again.
        let mut buf = [0u8; 8];
        let _ = nix::unistd::read(&self.doorbell, &mut buf);
        let mut events = Vec::new();
        loop {
            match self.rx.try_recv() {
                Ok(event) => events.push(event),
                Err(ipc_channel::TryRecvError::Empty) => return Ok(events),
                Err(ipc_channel::TryRecvError::IpcError(e)) => {
                    log::debug!("renderer event channel: {e:?}");
                    if events.is_empty() {
                        return Err(FrontendError::RendererGone);
                    }
                    // Handle what did arrive; the next ring (or the broker) ends us.
                    return Ok(events);
                }
            }
        }
    }
}
