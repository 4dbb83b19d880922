//! The descriptor lane: file descriptors between processes with SCM_RIGHTS.
//!
//! ipc-channel carries typed messages but cannot carry an arbitrary fd, so fds travel on a
//! separate `SOCK_SEQPACKET` socket pair. Each packet carries an [`FdTicket`] header and the
//! fds; the typed message that needs them names the same ticket. Because both the lane and
//! the message channel are ordered and each direction has one sender, the receiver simply
//! takes the next packet and checks that its ticket matches: a mismatch means the peer is
//! broken or hostile, and the receiver drops the fds (closing them) and reports it.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

/// Most fds one ticket may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_TICKET: usize = 64;

const HEADER_LEN: usize = 12;

/// Names one packet on the lane: its sequence number and how many fds it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdTicket {
    /// Sequence number, strictly increasing per direction.
    pub seq: u64,
    /// Number of fds in the packet.
    pub count: u32,
}

/// Errors of the descriptor lane.
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    /// `socketpair`, `sendmsg` or `recvmsg` failed.
    #[error("descriptor lane I/O failed: {0}")]
    Io(#[from] nix::Error),
    /// More fds than [`MAX_FDS_PER_TICKET`].
    #[error("{0} fds in one ticket, at most {MAX_FDS_PER_TICKET} allowed")]
    TooManyFds(usize),
    /// The peer closed the lane.
    #[error("descriptor lane closed by the peer")]
    Closed,
    /// The packet was not the one the message named.
    #[error("descriptor lane out of step: expected {expected:?}, got {got:?}")]
    TicketMismatch {
        /// What the typed message named.
        expected: FdTicket,
        /// What the lane delivered.
        got: FdTicket,
    },
    /// A short packet, a truncated control message or a non-fd control message.
    #[error("malformed packet on the descriptor lane: {0}")]
    Malformed(&'static str),
}

/// One end of the descriptor lane.
#[derive(Debug)]
pub struct Lane {
    sock: OwnedFd,
    next_seq: std::sync::atomic::AtomicU64,
}

impl Lane {
    /// A connected pair of lane ends (close-on-exec; the broker clears it for the child).
    pub fn pair() -> Result<(OwnedFd, OwnedFd), LaneError> {
        Ok(socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?)
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn new(sock: OwnedFd) -> Self {
        Lane {
            sock,
            next_seq: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Takes ownership of an inherited fd number.
    ///
    /// # Safety
    /// `fd` must be an open socket that nothing else owns.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller guarantees exclusive ownership of an open fd.
        Self::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Sends `fds` as one packet and returns the ticket that the typed message must carry.
    pub fn send(&self, fds: &[BorrowedFd<'_>]) -> Result<FdTicket, LaneError> {
        if fds.len() > MAX_FDS_PER_TICKET {
            return Err(LaneError::TooManyFds(fds.len()));
        }
        let ticket = FdTicket {
            seq: self
                .next_seq
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            count: fds.len() as u32,
        };
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&ticket.seq.to_le_bytes());
        header[8..].copy_from_slice(&ticket.count.to_le_bytes());
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let iov = [IoSlice::new(&header)];
        let cmsgs = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsgs };
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        Ok(ticket)
    }

    /// Receives the next packet and checks it is `expected`.
    pub fn recv(&self, expected: FdTicket) -> Result<Vec<OwnedFd>, LaneError> {
        let mut header = [0u8; HEADER_LEN];
        let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS_PER_TICKET]);
        let mut fds = Vec::new();
        let (bytes, truncated) = {
            let mut iov = [IoSliceMut::new(&mut header)];
            let msg = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )?;
            for cmsg in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(raw) = cmsg {
                    for fd in raw {
                        // SAFETY: the kernel just installed this fd for us; nothing else
                        // owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
            (
                msg.bytes,
                msg.flags
                    .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC),
            )
        };
        if bytes == 0 {
            return Err(LaneError::Closed);
        }
        if truncated {
            return Err(LaneError::Malformed("truncated packet or control message"));
        }
        if bytes != HEADER_LEN {
            return Err(LaneError::Malformed("packet header has the wrong length"));
        }
        let got = FdTicket {
            seq: u64::from_le_bytes(header[..8].try_into().expect("8 bytes")),
            count: u32::from_le_bytes(header[8..].try_into().expect("4 bytes")),
        };
        if got != expected || fds.len() != expected.count as usize {
            return Err(LaneError::TicketMismatch { expected, got });
        }
        Ok(fds)
    }
}

impl AsFd for Lane {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, Write};

    fn lanes() -> (Lane, Lane) {
        let (a, b) = Lane::pair().unwrap();
        (Lane::new(a), Lane::new(b))
    }

    #[test]
    fn fds_arrive_with_their_ticket() {
        let (a, b) = lanes();
        let mut f = tempfile_in_memory();
        f.write_all(b"lane").unwrap();
        let ticket = a.send(&[f.as_fd()]).unwrap();
        let mut got = b.recv(ticket).unwrap();
        assert_eq!(got.len(), 1);
        let mut g = File::from(got.remove(0));
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "lane");
    }

    #[test]
    fn out_of_step_ticket_is_rejected() {
        let (a, b) = lanes();
        let f = tempfile_in_memory();
        let first = a.send(&[f.as_fd()]).unwrap();
        let _second = a.send(&[f.as_fd(), f.as_fd()]).unwrap();
        let wrong = FdTicket {
            seq: first.seq + 1,
            count: 2,
        };
        assert!(matches!(
            b.recv(wrong),
            Err(LaneError::TicketMismatch { .. })
        ));
    }

    #[test]
    fn empty_ticket_and_limits() {
        let (a, b) = lanes();
        let t = a.send(&[]).unwrap();
        assert!(b.recv(t).unwrap().is_empty());
        let f = tempfile_in_memory();
        let many: Vec<_> = (0..MAX_FDS_PER_TICKET + 1).map(|_| f.as_fd()).collect();
        assert!(matches!(a.send(&many), Err(LaneError::TooManyFds(_))));
    }

    #[test]
    fn closed_peer_is_reported() {
        let (a, b) = lanes();
        drop(a);
        assert!(matches!(
            b.recv(FdTicket { seq: 1, count: 0 }),
            Err(LaneError::Closed)
        ));
    }

    fn tempfile_in_memory() -> File {
        let fd =
            nix::sys::memfd::memfd_create(c"lane-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        File::from(fd)
    }
}
