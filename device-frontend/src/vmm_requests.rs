//! The VMM side of blob mapping: VHOST_USER_BACKEND_SHMEM_MAP / SHMEM_UNMAP on the backend
//! request channel, driven by the control actor itself. A request is written without
//! waiting; the channel's socket sits in the actor's epoll loop, and each reply becomes an
//! acknowledgment for the mapping state machine like any other event. No thread and no
//! mailbox lie between the actor and the VMM, so a map/unmap cycle costs the VMM's own
//! round trips and nothing more; a late (or never arriving) ack still blocks nothing but
//! the blob it belongs to.
//!
//! vhost-user replies name only the request code they answer, and a VMM answers in order:
//! requests waiting for their reply form a queue, and a reply answers the oldest one when
//! its code matches. One that matches nothing pending (a duplicated or late ack) is logged
//! and dropped.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use vhost::vhost_user::message::{BackendReq, VhostUserMMap, VhostUserMMapFlags};

use crate::backend_channel::{BackendChannel, ChannelError, Reply};

/// The host-visible memory region's id (VIRTIO_GPU_SHM_ID_HOST_VISIBLE).
pub const HOSTMEM_SHMID: u8 = protocol::virtio_gpu::VIRTIO_GPU_SHM_ID_HOST_VISIBLE;

/// A request for the VMM.
#[derive(Debug)]
pub enum VmmRequest {
    /// Map `fd` (from offset 0) at `offset` of the window, `len` bytes.
    Map {
        /// The blob.
        resource_id: u32,
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The renderer's export.
        fd: OwnedFd,
    },
    /// Take `len` bytes at `offset` out of the window.
    Unmap {
        /// The blob.
        resource_id: u32,
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// What the VMM answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmAck {
    /// SHMEM_MAP acknowledged (Ok) or refused / failed (Err).
    Map(Result<(), ()>),
    /// SHMEM_UNMAP acknowledged (Ok) or refused / failed (Err).
    Unmap(Result<(), ()>),
}

/// A request sent and not answered yet.
#[derive(Debug)]
struct Pending {
    resource_id: u32,
    request: BackendReq,
}

impl Pending {
    fn ack(&self, result: Result<(), ()>) -> (u32, VmmAck) {
        let ack = if self.request == BackendReq::SHMEM_MAP {
            VmmAck::Map(result)
        } else {
            VmmAck::Unmap(result)
        };
        (self.resource_id, ack)
    }
}

/// The actor's end of the VMM's backend request channel.
pub struct VmmRequests {
    /// None once the channel closed or broke: every request fails at once from then on.
    channel: Option<BackendChannel>,
    pending: VecDeque<Pending>,
    /// Acknowledgments read and not yet handed to the state machine, in order.
    answered: Vec<(u32, VmmAck)>,
}

impl std::fmt::Debug for VmmRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmRequests")
            .field("open", &self.channel.is_some())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl VmmRequests {
    /// Requests over `channel` (the VMM's backend request channel).
    pub fn new(channel: BackendChannel) -> Self {
        VmmRequests {
            channel: Some(channel),
            pending: VecDeque::new(),
            answered: Vec::new(),
        }
    }

    /// The socket the event loop must watch for replies; None once closed.
    pub fn fd(&self) -> Option<RawFd> {
        self.channel.as_ref().map(|c| c.as_fd().as_raw_fd())
    }

    /// Sends `request` without waiting for its answer; false when it could not be sent
    /// (the channel is closed or broken, or the VMM does not read it).
    pub fn send(&mut self, request: VmmRequest) -> bool {
        // What arrived before this request answers an older one (or none): read it first,
        // so that a stale ack of the same code is not taken for this request's.
        self.read_replies();
        let Some(channel) = self.channel.as_mut() else {
            return false;
        };
        let (resource_id, request, msg, fd) = match request {
            VmmRequest::Map {
                resource_id,
                offset,
                len,
                fd,
            } => (
                resource_id,
                BackendReq::SHMEM_MAP,
                mmap_msg(offset, len, VhostUserMMapFlags::WRITABLE.bits()),
                Some(fd),
            ),
            VmmRequest::Unmap {
                resource_id,
                offset,
                len,
            } => (
                resource_id,
                BackendReq::SHMEM_UNMAP,
                mmap_msg(offset, len, 0),
                None,
            ),
        };
        match channel.send_request(request, &msg, fd.as_ref().map(|f| f.as_fd())) {
            Ok(()) => {
                self.pending.push_back(Pending {
                    resource_id,
                    request,
                });
                true
            }
            Err(e) => {
                let (offset, len) = (msg.shm_offset, msg.len);
                log::warn!("{request:?} of resource {resource_id} at {offset:#x}+{len:#x}: {e}");
                if e.is_fatal() {
                    self.close();
                }
                false
            }
        }
    }

    /// Reads every reply that has arrived (the socket was reported readable, or hung up)
    /// and matches it to its request; a closed or broken channel fails every request still
    /// waiting.
    pub fn read_replies(&mut self) {
        let Some(channel) = self.channel.as_mut() else {
            return;
        };
        let mut replies = Vec::new();
        let result = channel.read_replies(&mut replies);
        for reply in replies {
            self.take_reply(reply);
        }
        if let Err(e) = result {
            match e {
                ChannelError::Closed => log::info!("the VMM closed its backend request channel"),
                e => log::warn!("backend request channel: {e}"),
            }
            self.close();
        }
    }

    /// The acknowledgments read so far, in the order the VMM gave them.
    pub fn take_answered(&mut self) -> Vec<(u32, VmmAck)> {
        std::mem::take(&mut self.answered)
    }

    /// Lets go of the channel: every request still waiting is answered as failed (the VMM
    /// will not answer it now), and the socket is closed, which also takes it out of the
    /// event loop.
    pub fn close(&mut self) {
        if self.channel.take().is_some() && !self.pending.is_empty() {
            log::warn!(
                "{} request(s) to the VMM unanswered as its channel went away",
                self.pending.len()
            );
        }
        let failed = self.pending.drain(..).map(|p| p.ack(Err(())));
        self.answered.extend(failed);
    }

    fn take_reply(&mut self, reply: Reply) {
        let matches = self
            .pending
            .front()
            .is_some_and(|p| p.request as u32 == reply.code);
        if !matches {
            let waiting = self.pending.front().map(|p| p.request);
            log::warn!(
                "ignored a reply to code {} from the VMM while waiting for {waiting:?} \
                 (a duplicated or late ack)",
                reply.code
            );
            return;
        }
        let Some(pending) = self.pending.pop_front() else {
            return;
        };
        let result = match reply.status() {
            Some(0) => Ok(()),
            Some(status) => {
                log::warn!(
                    "the VMM refused {:?} of resource {} (status {status})",
                    pending.request,
                    pending.resource_id
                );
                Err(())
            }
            None => {
                log::warn!(
                    "a {}-byte reply to {:?} (expected 8): the channel's framing is lost",
                    reply.body.len(),
                    pending.request
                );
                self.answered.push(pending.ack(Err(())));
                self.close();
                return;
            }
        };
        self.answered.push(pending.ack(result));
    }
}

fn mmap_msg(offset: u64, len: u64, flags: u64) -> VhostUserMMap {
    VhostUserMMap {
        shmid: HOSTMEM_SHMID,
        fd_offset: 0,
        shm_offset: offset,
        len,
        flags,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend_channel::tests::{
        pair, read_request, reply_bytes, wait_readable, SHMEM_MAP, SHMEM_UNMAP,
    };
    use std::io::Write;

    fn unmap(resource_id: u32) -> VmmRequest {
        VmmRequest::Unmap {
            resource_id,
            offset: 0,
            len: 4096,
        }
    }

    fn map(resource_id: u32) -> VmmRequest {
        let fd = nix::sys::memfd::memfd_create("blob", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        VmmRequest::Map {
            resource_id,
            offset: 0,
            len: 4096,
            fd,
        }
    }

    /// Reads replies until `n` acks are in (bounded by `wait_readable`'s timeout).
    fn acks(vmm: &mut VmmRequests, n: usize) -> Vec<(u32, VmmAck)> {
        let mut got = Vec::new();
        while got.len() < n {
            wait_readable(vmm.channel.as_ref().expect("open").as_fd());
            vmm.read_replies();
            got.extend(vmm.take_answered());
        }
        got
    }

    #[test]
    fn replies_answer_requests_in_order() {
        let (ch, mut vmm_end) = pair();
        let mut vmm = VmmRequests::new(ch);
        assert!(vmm.send(map(1)));
        assert!(vmm.send(unmap(2)));
        assert_eq!(read_request(&mut vmm_end).0, SHMEM_MAP);
        assert_eq!(read_request(&mut vmm_end).0, SHMEM_UNMAP);
        vmm_end.write_all(&reply_bytes(SHMEM_MAP, 0)).expect("ack");
        vmm_end
            .write_all(&reply_bytes(SHMEM_UNMAP, 5))
            .expect("refusal");
        assert_eq!(
            acks(&mut vmm, 2),
            [(1, VmmAck::Map(Ok(()))), (2, VmmAck::Unmap(Err(())))]
        );
    }

    #[test]
    fn a_duplicated_ack_is_not_taken_for_the_next_request() {
        let (ch, mut vmm_end) = pair();
        let mut vmm = VmmRequests::new(ch);
        assert!(vmm.send(unmap(1)));
        read_request(&mut vmm_end);
        vmm_end
            .write_all(&reply_bytes(SHMEM_UNMAP, 0))
            .expect("ack");
        vmm_end
            .write_all(&reply_bytes(SHMEM_UNMAP, 0))
            .expect("duplicate");
        // Both acks are in the socket before the next request of the same code is sent:
        // the second unmap's own answer (a refusal) must be the one it gets.
        assert!(vmm.send(unmap(2)));
        assert_eq!(vmm.take_answered(), [(1, VmmAck::Unmap(Ok(())))]);
        read_request(&mut vmm_end);
        vmm_end
            .write_all(&reply_bytes(SHMEM_UNMAP, 9))
            .expect("refusal");
        assert_eq!(acks(&mut vmm, 1), [(2, VmmAck::Unmap(Err(())))]);
    }

    #[test]
    fn a_reply_to_another_code_is_skipped() {
        let (ch, mut vmm_end) = pair();
        let mut vmm = VmmRequests::new(ch);
        assert!(vmm.send(unmap(7)));
        read_request(&mut vmm_end);
        vmm_end
            .write_all(&reply_bytes(SHMEM_MAP, 0))
            .expect("stray");
        vmm_end
            .write_all(&reply_bytes(SHMEM_UNMAP, 3))
            .expect("refusal");
        assert_eq!(acks(&mut vmm, 1), [(7, VmmAck::Unmap(Err(())))]);
    }

    #[test]
    fn a_closed_channel_fails_what_is_pending_and_every_later_request() {
        let (ch, mut vmm_end) = pair();
        let mut vmm = VmmRequests::new(ch);
        assert!(vmm.send(map(1)));
        assert!(vmm.send(unmap(2)));
        read_request(&mut vmm_end);
        drop(vmm_end);
        assert_eq!(
            acks(&mut vmm, 2),
            [(1, VmmAck::Map(Err(()))), (2, VmmAck::Unmap(Err(())))]
        );
        assert_eq!(vmm.fd(), None, "the socket stays in the event loop");
        assert!(!vmm.send(unmap(3)));
        assert!(vmm.take_answered().is_empty());
    }

    #[test]
    fn a_malformed_ack_breaks_the_channel() {
        let (ch, mut vmm_end) = pair();
        let mut vmm = VmmRequests::new(ch);
        assert!(vmm.send(unmap(1)));
        assert!(vmm.send(unmap(2)));
        let mut short = reply_bytes(SHMEM_UNMAP, 0);
        short[8] = 4; // a 4-byte body
        short.truncate(16);
        vmm_end.write_all(&short).expect("short ack");
        assert_eq!(
            acks(&mut vmm, 2),
            [(1, VmmAck::Unmap(Err(()))), (2, VmmAck::Unmap(Err(())))]
        );
        assert!(!vmm.send(unmap(3)));
    }
}
