//! The frontend's end of the link to the renderer-worker: typed requests on ipc-channel,
//! fds on the descriptor lane, and a pump thread that turns renderer events into mailbox
//! messages for the control actor.

use std::os::fd::BorrowedFd;
use std::thread::JoinHandle;

use ipc_channel::ipc::{IpcReceiver, IpcSender};
use protocol::ipc::{FenceInfo, RendererEvent, RendererOp, RendererRequest};
use protocol::lane::{FdTicket, Lane};

use crate::control::Input;
use crate::error::FrontendError;
use crate::mailbox::Mailbox;

/// Sends requests to the renderer, numbering them.
pub struct RendererLink {
    tx: IpcSender<RendererRequest>,
    lane: Lane,
    next_seq: u64,
}

impl RendererLink {
    /// Wraps the request channel and the lane.
    pub fn new(tx: IpcSender<RendererRequest>, lane: Lane) -> Self {
        RendererLink {
            tx,
            lane,
            next_seq: 1,
        }
    }

    /// Puts `fds` on the lane; the returned ticket goes into the op that uses them.
    pub fn send_fds(&self, fds: &[BorrowedFd<'_>]) -> Result<FdTicket, FrontendError> {
        Ok(self.lane.send(fds)?)
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
}

/// Forwards renderer events into the control actor's mailbox until the renderer hangs up.
pub fn spawn_event_pump(
    rx: IpcReceiver<RendererEvent>,
    mailbox: Mailbox,
) -> Result<JoinHandle<()>, FrontendError> {
    std::thread::Builder::new()
        .name("renderer-events".into())
        .spawn(move || loop {
            match rx.recv() {
                Ok(event) => {
                    if !mailbox.post(Input::Renderer(event)) {
                        return;
                    }
                }
                Err(e) => {
                    log::debug!("renderer event channel closed: {e:?}");
                    mailbox.post(Input::RendererGone);
                    return;
                }
            }
        })
        .map_err(|e| FrontendError::Thread("renderer-events", e))
}
