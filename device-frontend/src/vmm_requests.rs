//! The VMM side of blob mapping: VHOST_USER_BACKEND_SHMEM_MAP / SHMEM_UNMAP on the backend
//! request channel. Each request blocks until the VMM's REPLY_ACK, so the requests run on
//! their own thread, and each acknowledgment comes back
//! to the control actor as a mailbox input: to the mapping state machine an ack is an
//! event like any other, and a late (or never arriving) ack blocks nothing but the blob it
//! belongs to.

use std::os::fd::{AsFd, OwnedFd};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};

use crate::backend_channel::BackendChannel;
use crate::control::Input;
use crate::mailbox::Mailbox;

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

/// The control actor's handle on the request thread.
#[derive(Clone)]
pub struct VmmRequests {
    tx: Sender<VmmRequest>,
}

impl VmmRequests {
    /// Starts the request thread over `channel` (the VMM's backend request channel).
    pub fn start(
        channel: BackendChannel,
        mailbox: Mailbox,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = std::thread::Builder::new()
            .name("vmm-requests".into())
            .spawn(move || serve(channel, rx, mailbox))?;
        Ok((VmmRequests { tx }, handle))
    }

    /// Queues a request; false when the request thread is gone.
    pub fn send(&self, request: VmmRequest) -> bool {
        self.tx.send(request).is_ok()
    }
}

fn serve(mut channel: BackendChannel, rx: Receiver<VmmRequest>, mailbox: Mailbox) {
    for request in rx {
        let (resource_id, ack) = match request {
            VmmRequest::Map {
                resource_id,
                offset,
                len,
                fd,
            } => {
                let msg = VhostUserMMap {
                    shmid: HOSTMEM_SHMID,
                    fd_offset: 0,
                    shm_offset: offset,
                    len,
                    flags: VhostUserMMapFlags::WRITABLE.bits(),
                    ..Default::default()
                };
                let r = channel.shmem_map(&msg, fd.as_fd());
                if let Err(e) = &r {
                    log::warn!("SHMEM_MAP of resource {resource_id} at {offset:#x}+{len:#x}: {e}");
                }
                (resource_id, VmmAck::Map(r.map_err(|_| ())))
            }
            VmmRequest::Unmap {
                resource_id,
                offset,
                len,
            } => {
                let msg = VhostUserMMap {
                    shmid: HOSTMEM_SHMID,
                    fd_offset: 0,
                    shm_offset: offset,
                    len,
                    flags: 0,
                    ..Default::default()
                };
                let r = channel.shmem_unmap(&msg);
                if let Err(e) = &r {
                    log::warn!(
                        "SHMEM_UNMAP of resource {resource_id} at {offset:#x}+{len:#x}: {e}"
                    );
                }
                (resource_id, VmmAck::Unmap(r.map_err(|_| ())))
            }
        };
        if !mailbox.post(Input::Vmm { resource_id, ack }) {
            return;
        }
    }
}
