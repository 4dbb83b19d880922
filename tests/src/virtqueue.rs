//! A driver-side virtio 1.x split virtqueue living in guest RAM (virtio 1.3 §2.7).
//!
//! Layout: descriptor table (16 bytes per entry), available ring (flags, idx, ring[N],
//! used_event) and used ring (flags, idx, ring[N] of {id u32, len u32}, avail_event).
//! All fields are little-endian. The driver logic (free list, publishing, notification
//! suppression with VIRTIO_RING_F_EVENT_IDX, collecting used entries) is written here.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest_memory::{GuestMemory, MemoryError};

/// Descriptor flag: the chain continues at `next`.
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Size of one descriptor table entry.
const DESC_SIZE: u64 = 16;

/// Errors of the driver-side queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Guest memory access failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Queue size must be a power of two in 1..=32768.
    #[error("invalid queue size {0}")]
    InvalidSize(u16),
    /// The chain needs more descriptors than are free.
    #[error("queue {queue}: chain of {wanted} descriptors but only {free} free")]
    Full {
        /// Queue index.
        queue: u16,
        /// Descriptors asked for.
        wanted: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain must have at least one buffer.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// eventfd or poll failed.
    #[error("queue {queue}: eventfd: {source}")]
    EventFd {
        /// Queue index.
        queue: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No used buffer within the timeout.
    #[error("queue {queue}: no used buffer within {timeout:?} (avail idx {avail_idx}, used idx {used_idx}, last seen used {last_used})")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// How long we waited.
        timeout: Duration,
        /// Our published avail idx.
        avail_idx: u16,
        /// The device's used idx.
        used_idx: u16,
        /// The last used idx we consumed.
        last_used: u16,
    },
    /// The device returned something that breaks the split-ring rules.
    #[error("queue {queue}: device protocol violation: {msg}")]
    Violation {
        /// Queue index.
        queue: u16,
        /// What was wrong.
        msg: String,
    },
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// One used ring element as the device returned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index of the chain.
    pub id: u16,
    /// Bytes the device says it wrote into the writable buffers.
    pub len: u32,
}

/// Guest addresses of the three ring parts (for SET_VRING_ADDR).
#[derive(Clone, Copy, Debug)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// A driver-side split virtqueue with its kick and call eventfds.
pub struct SplitQueue {
    mem: Arc<GuestMemory>,
    index: u16,
    size: u16,
    addrs: RingAddrs,
    event_idx: bool,
    kick: EventFd,
    call: EventFd,
    free: VecDeque<u16>,
    // Descriptor chain per head, to return them to the free list when used.
    chains: Vec<Option<Vec<u16>>>,
    avail_idx: u16,
    last_used: u16,
    kicks: u64,
    suppressed_kicks: u64,
}

impl SplitQueue {
    /// Allocates the rings in guest RAM. `index` is the vhost-user vring index.
    pub fn new(
        mem: Arc<GuestMemory>,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> Result<SplitQueue, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::InvalidSize(size));
        }
        let n = u64::from(size);
        // Each part gets its own page-aligned allocation; that satisfies the 16/2/4 alignment.
        let desc = mem.alloc(DESC_SIZE * n)?;
        let avail = mem.alloc(6 + 2 * n)?;
        let used = mem.alloc(6 + 8 * n)?;
        let ev = |source| QueueError::EventFd {
            queue: index,
            source,
        };
        Ok(SplitQueue {
            mem,
            index,
            size,
            addrs: RingAddrs { desc, avail, used },
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK).map_err(ev)?,
            call: EventFd::new(EFD_NONBLOCK).map_err(ev)?,
            free: (0..size).collect(),
            chains: vec![None; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            kicks: 0,
            suppressed_kicks: 0,
        })
    }

    /// vhost-user vring index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest addresses of the ring parts.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// The eventfd the driver writes to notify the device (SET_VRING_KICK).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device writes to interrupt the driver (SET_VRING_CALL).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Chains published but not yet returned by the device.
    pub fn in_flight(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }

    /// (kicks sent, kicks suppressed because the device asked for none).
    pub fn kick_stats(&self) -> (u64, u64) {
        (self.kicks, self.suppressed_kicks)
    }

    fn avail_ring_slot(&self, i: u16) -> u64 {
        self.addrs.avail + 4 + 2 * u64::from(i % self.size)
    }

    fn used_event_addr(&self) -> u64 {
        self.addrs.avail + 4 + 2 * u64::from(self.size)
    }

    fn avail_event_addr(&self) -> u64 {
        self.addrs.used + 4 + 8 * u64::from(self.size)
    }

    /// Writes a chain into the descriptor table and returns its head, without publishing it.
    fn write_chain(&mut self, bufs: &[Buffer]) -> Result<u16, QueueError> {
        if bufs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        if bufs.len() > self.free.len() {
            return Err(QueueError::Full {
                queue: self.index,
                wanted: bufs.len(),
                free: self.free.len(),
            });
        }
        let ids: Vec<u16> = (0..bufs.len())
            .filter_map(|_| self.free.pop_front())
            .collect();
        for (i, (buf, id)) in bufs.iter().zip(&ids).enumerate() {
            let mut flags = 0u16;
            if buf.writable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            let next = if i + 1 < ids.len() {
                flags |= VIRTQ_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&buf.addr.to_le_bytes());
            d[8..12].copy_from_slice(&buf.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem
                .write(self.addrs.desc + DESC_SIZE * u64::from(*id), &d)?;
        }
        let head = ids[0];
        self.chains[usize::from(head)] = Some(ids);
        Ok(head)
    }

    /// Adds a chain, publishes it in the available ring and notifies the device if it
    /// wants to be notified. Returns the head descriptor index.
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, QueueError> {
        let head = self.write_chain(bufs)?;
        let old = self.avail_idx;
        self.mem
            .write(self.avail_ring_slot(old), &head.to_le_bytes())?;
        let new = old.wrapping_add(1);
        // Release: the descriptor and ring slot writes are visible before the new idx.
        self.mem
            .store_u16(self.addrs.avail + 2, new, Ordering::Release)?;
        self.avail_idx = new;
        self.notify(old, new)?;
        Ok(head)
    }

    fn notify(&mut self, old: u16, new: u16) -> Result<(), QueueError> {
        // Full barrier: the idx store must be visible before we read the device's
        // suppression state, or both sides could decide the other will act (virtio 1.3 §2.7.10).
        fence(Ordering::SeqCst);
        let wanted = if self.event_idx {
            let avail_event = self
                .mem
                .load_u16(self.avail_event_addr(), Ordering::Acquire)?;
            need_event(avail_event, new, old)
        } else {
            // used.flags bit 0 is VIRTQ_USED_F_NO_NOTIFY.
            let flags = self.mem.load_u16(self.addrs.used, Ordering::Acquire)?;
            flags & 1 == 0
        };
        if wanted {
            self.kick.write(1).map_err(|source| QueueError::EventFd {
                queue: self.index,
                source,
            })?;
            self.kicks += 1;
        } else {
            self.suppressed_kicks += 1;
        }
        Ok(())
    }

    /// Returns the used elements the device has published since the last call (no wait).
    pub fn poll_used(&mut self) -> Result<Vec<UsedElem>, QueueError> {
        let used_idx = self.mem.load_u16(self.addrs.used + 2, Ordering::Acquire)?;
        let pending = used_idx.wrapping_sub(self.last_used);
        let in_flight = self.in_flight();
        if usize::from(pending) > in_flight {
            return Err(QueueError::Violation {
                queue: self.index,
                msg: format!(
                    "used idx {used_idx} is {pending} ahead of last seen {} but only {in_flight} chains are in flight",
                    self.last_used
                ),
            });
        }
        let mut out = Vec::with_capacity(usize::from(pending));
        while self.last_used != used_idx {
            let slot = self.addrs.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id = self.mem.read_u32(slot)?;
            let len = self.mem.read_u32(slot + 4)?;
            let head = u16::try_from(id)
                .ok()
                .filter(|h| *h < self.size)
                .ok_or_else(|| QueueError::Violation {
                    queue: self.index,
                    msg: format!("used element id {id} is not a descriptor index"),
                })?;
            let chain =
                self.chains[usize::from(head)]
                    .take()
                    .ok_or_else(|| QueueError::Violation {
                        queue: self.index,
                        msg: format!(
                            "used element id {head} is not the head of an in-flight chain"
                        ),
                    })?;
            self.free.extend(chain);
            out.push(UsedElem { id: head, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Waits (bounded) until at least one used element arrives, and returns all that did.
    pub fn wait_used(&mut self, deadline: Instant) -> Result<Vec<UsedElem>, QueueError> {
        let start = Instant::now();
        loop {
            // Ask to be notified for the next entry we have not seen (used_event = last_used),
            // then re-check the ring so an entry added in between is not missed.
            if self.event_idx {
                self.mem
                    .store_u16(self.used_event_addr(), self.last_used, Ordering::Release)?;
                fence(Ordering::SeqCst);
            }
            let got = self.poll_used()?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                let used_idx = self
                    .mem
                    .load_u16(self.addrs.used + 2, Ordering::Acquire)
                    .unwrap_or(0);
                return Err(QueueError::Timeout {
                    queue: self.index,
                    timeout: now - start,
                    avail_idx: self.avail_idx,
                    used_idx,
                    last_used: self.last_used,
                });
            }
            // SAFETY: the eventfd is owned by `self` and outlives this borrow.
            let call = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
            wait_readable(call, deadline - now).map_err(|source| QueueError::EventFd {
                queue: self.index,
                source,
            })?;
            // Drain the counter; EAGAIN just means nothing was signalled (timeout path).
            let _ = self.call.read();
        }
    }
}

/// virtio's vring_need_event: does moving the index from `old` to `new` cross `event`?
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Waits until `fd` is readable or `timeout` passes; Ok either way (the caller re-checks).
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(
        &mut fds,
        PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
    ) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Device asked for a notification at index 0; moving 0 -> 1 crosses it.
        assert!(need_event(0, 1, 0));
        // Device asked for 5; moving 1 -> 2 does not cross it.
        assert!(!need_event(5, 2, 1));
        // Moving 3 -> 7 crosses 5.
        assert!(need_event(5, 7, 3));
        // Wrap-around.
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
    }
}
