//! The backend request channel (VHOST_USER_BACKEND_SHMEM_MAP / SHMEM_UNMAP), run by the
//! device itself rather than through vhost's `Backend`.
//!
//! vhost-user replies carry no request id: a reply names only the request code it answers.
//! vhost 0.18's `Backend` reads exactly one reply per request, blocking, and keeps its
//! socket private, so a VMM that acknowledges a request twice leaves the second ack in the
//! socket, where it is read as the reply to the next request; a wrong code fails that
//! request and leaves its real reply behind, and from then on every request is off by one.
//! Owning the socket lets the device write requests without waiting (the control actor
//! must not block on the VMM), read replies whenever they arrive, and match them to the
//! requests itself (`vmm_requests`): stale, duplicated or late acks are dropped with a log
//! line. What no device can tell apart is a duplicate of the same code that arrives after
//! the next request of that code was sent: the protocol has nothing to tell them by.
//!
//! Every request is sent with NEED_REPLY: the mapping state machine needs the VMM's ack to
//! know a range is in (or out of) the guest's window. QEMU answers every request that asks
//! for a reply; blob mapping therefore needs the REPLY_ACK protocol feature, which the
//! device offers and QEMU always accepts.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::message::{BackendReq, VhostUserHeaderFlag, VhostUserMMap};
use vhost::vhost_user::Backend;
use vm_memory::ByteValued;

/// The largest reply body read and thrown away. Replies on this channel are a `u64`; a
/// larger size means the stream is not framed the way the device thinks, and reading on
/// would interpret payload bytes as headers.
const MAX_REPLY_BODY: u32 = 4096;

/// Reads of up to 512 bytes per [`BackendChannel::read_replies`] call.
const MAX_READS_PER_CALL: usize = 64;

/// Why a request did not get a positive answer.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The VMM's channel was not found among the process's descriptors.
    #[error("cannot find the VMM's backend request socket: {0}")]
    NotFound(&'static str),
    /// Sending the request failed.
    #[error("sending {request:?} to the VMM: {err}")]
    Send {
        /// The request.
        request: BackendReq,
        /// What failed.
        err: io::Error,
    },
    /// Reading the reply failed.
    #[error("reading the VMM's reply: {0}")]
    Recv(io::Error),
    /// The VMM closed the channel.
    #[error("the VMM closed the backend request channel")]
    Closed,
    /// The VMM wrote something that is not a vhost-user reply; the channel is unusable.
    #[error("the VMM broke the backend request channel's framing: {0}")]
    Framing(String),
    /// The VMM's end is not being read: nothing of the request was written.
    #[error("the VMM is not reading its backend request channel ({request:?} not sent)")]
    Stalled {
        /// The request.
        request: BackendReq,
    },
}

impl ChannelError {
    /// Whether the channel is unusable from now on (everything but a stalled send).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ChannelError::Stalled { .. })
    }
}

/// The vhost-user protocol version every header carries in its flags.
const VERSION_1: u32 = 0x1;

/// A vhost-user message header (vhost keeps its own type private): request code, flags,
/// body size, each a little-endian `u32`.
#[derive(Clone, Copy, Debug)]
struct Header {
    code: u32,
    flags: u32,
    size: u32,
}

impl Header {
    const LEN: usize = 12;

    fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; Self::LEN]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            code: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    fn is_reply(&self) -> bool {
        self.flags & VhostUserHeaderFlag::VERSION.bits() == VERSION_1
            && self.flags & VhostUserHeaderFlag::REPLY.bits() != 0
    }
}

/// A reply read from the channel: the request code it answers and its (bounded) body.
#[derive(Debug)]
pub struct Reply {
    /// The request code the VMM says it answers.
    pub code: u32,
    /// The body; a REPLY_ACK's is one little-endian `u64` status.
    pub body: Vec<u8>,
}

impl Reply {
    /// The REPLY_ACK status (0: success); None when the body is not one `u64`.
    pub fn status(&self) -> Option<u64> {
        <[u8; 8]>::try_from(self.body.as_slice())
            .ok()
            .map(u64::from_le_bytes)
    }
}

/// The device's end of the VMM's backend request channel.
#[derive(Debug)]
pub struct BackendChannel {
    sock: OwnedFd,
    /// Set once the framing is lost: every later request fails with it.
    broken: Option<String>,
    /// Bytes of a reply not yet whole.
    inbuf: Vec<u8>,
}

impl BackendChannel {
    /// Uses `sock`, the device's end of the channel.
    pub fn from_stream(sock: UnixStream) -> Self {
        BackendChannel {
            sock: sock.into(),
            broken: None,
            inbuf: Vec::new(),
        }
    }

    /// Takes the socket out of vhost's `backend`, which is consumed.
    ///
    /// The crate offers no way to the descriptor, so it is identified by elimination: every
    /// Unix stream socket the process holds is duplicated, `backend` (the only owner of its
    /// socket: vhost-user-backend hands it over by value) is dropped, which closes its
    /// descriptor, and the one candidate whose number no longer names the same socket is
    /// the channel; its duplicate is kept. A descriptor number reused by another thread in
    /// between names a different inode and still counts as gone; two candidates gone at
    /// once (another thread closing a socket in the same instant) is refused rather than
    /// guessed.
    pub fn adopt(backend: Backend, max_fds: u64) -> Result<Self, ChannelError> {
        let max_fd = RawFd::try_from(max_fds).unwrap_or(RawFd::MAX);
        // Numbers first, duplicates after: a duplicate made while scanning would be scanned
        // (and duplicated) again.
        let numbers: Vec<(RawFd, (u64, u64))> = (0..max_fd)
            .filter_map(|fd| Some((fd, unix_stream_inode(fd)?)))
            .collect();
        let candidates: Vec<Candidate> = numbers
            .into_iter()
            .filter_map(|(fd, inode)| Candidate::duplicate(fd, inode))
            .collect();
        drop(backend);
        let mut gone = candidates.into_iter().filter(|c| !c.still_open());
        match (gone.next(), gone.next()) {
            (Some(channel), None) => {
                log::debug!("backend request channel adopted (was fd {})", channel.fd);
                Ok(BackendChannel {
                    sock: channel.dup,
                    broken: None,
                    inbuf: Vec::new(),
                })
            }
            (None, _) => Err(ChannelError::NotFound(
                "no socket closed with vhost's Backend",
            )),
            (Some(_), Some(_)) => Err(ChannelError::NotFound(
                "more than one socket closed while looking",
            )),
        }
    }

    /// Writes one request (with `fd` attached, if any) without waiting for anything: the
    /// reply is read by [`BackendChannel::read_replies`] once the socket is readable.
    /// Every request asks for a reply.
    pub fn send_request(
        &mut self,
        request: BackendReq,
        msg: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelError> {
        if let Some(why) = &self.broken {
            return Err(ChannelError::Framing(why.clone()));
        }
        let header = Header {
            code: request as u32,
            flags: VERSION_1 | VhostUserHeaderFlag::NEED_REPLY.bits(),
            size: std::mem::size_of_val(msg) as u32,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(msg.as_slice());
        let fds = fd.map(|f| [f.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> =
            fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
        let iov = [IoSlice::new(&bytes)];
        let sent = loop {
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(n) => break n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return Err(ChannelError::Stalled { request }),
                Err(e) => {
                    return Err(ChannelError::Send {
                        request,
                        err: e.into(),
                    })
                }
            }
        };
        if sent < bytes.len() {
            // A stream socket takes part of a message only when its buffer is all but
            // full: the rest cannot be written without waiting, and a request cut in two
            // leaves nothing on the channel that can be read correctly.
            let why = format!(
                "only {sent} of the {} bytes of a {request:?} request fit in the socket",
                bytes.len()
            );
            self.broken = Some(why.clone());
            return Err(ChannelError::Framing(why));
        }
        Ok(())
    }

    /// Reads what the VMM has written so far, without waiting, and appends every whole
    /// reply to `out`. A reply cut short stays buffered for the next call. `Closed` once
    /// the VMM has closed its end (after the replies before the end are in `out`).
    pub fn read_replies(&mut self, out: &mut Vec<Reply>) -> Result<(), ChannelError> {
        if let Some(why) = &self.broken {
            return Err(ChannelError::Framing(why.clone()));
        }
        // A bound on one call's reads: a VMM that writes without pause gets the rest read
        // on the event loop's next round, not this one.
        for _ in 0..MAX_READS_PER_CALL {
            let mut chunk = [0u8; 512];
            let got = self.recv_chunk(&mut chunk)?;
            let Some(got) = got else {
                return Ok(());
            };
            if got == 0 {
                return Err(ChannelError::Closed);
            }
            self.inbuf.extend_from_slice(&chunk[..got]);
            if let Err(e) = self.parse(out) {
                if let ChannelError::Framing(why) = &e {
                    self.broken = Some(why.clone());
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Moves every whole message at the front of `inbuf` to `out`.
    fn parse(&mut self, out: &mut Vec<Reply>) -> Result<(), ChannelError> {
        loop {
            let Some(raw) = self.inbuf.first_chunk::<{ Header::LEN }>() else {
                return Ok(());
            };
            let header = Header::from_bytes(raw);
            let size = header.size;
            if !header.is_reply() || size > MAX_REPLY_BODY {
                return Err(ChannelError::Framing(format!(
                    "flags {:#x} and a {size}-byte body where a reply belongs",
                    header.flags
                )));
            }
            let end = Header::LEN + size as usize;
            if self.inbuf.len() < end {
                return Ok(());
            }
            let body = self.inbuf[Header::LEN..end].to_vec();
            self.inbuf.drain(..end);
            out.push(Reply {
                code: header.code,
                body,
            });
        }
    }

    /// One non-blocking read: None when nothing is waiting, Some(0) at end of stream.
    /// Descriptors sent along are closed: no reply carries any.
    fn recv_chunk(&self, buf: &mut [u8]) -> Result<Option<usize>, ChannelError> {
        loop {
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(buf)];
            return match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    for c in msg.cmsgs().into_iter().flatten() {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            log::warn!(
                                "closed {} descriptor(s) the VMM sent with a reply",
                                fds.len()
                            );
                            for fd in fds {
                                // SAFETY: SCM_RIGHTS just installed `fd` in this process and
                                // nothing else knows of it.
                                drop(unsafe { OwnedFd::from_raw_fd(fd) });
                            }
                        }
                    }
                    Ok(Some(msg.bytes))
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => Ok(None),
                Err(e) => Err(ChannelError::Recv(e.into())),
            };
        }
    }
}

impl AsFd for BackendChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// A Unix stream socket the process held before vhost's `Backend` was dropped.
struct Candidate {
    fd: RawFd,
    inode: (u64, u64),
    dup: OwnedFd,
}

impl Candidate {
    fn duplicate(fd: RawFd, inode: (u64, u64)) -> Option<Candidate> {
        // SAFETY: fcntl on a plain number; a failure is checked below.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return None;
        }
        // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        Some(Candidate { fd, inode, dup })
    }

    fn still_open(&self) -> bool {
        inode_of(self.fd) == Some(self.inode)
    }
}

/// The (device, inode) of the Unix stream socket at `fd`, if that is what it is. Raw calls
/// throughout: the numbers probed are not known to be open, so they cannot be borrowed as
/// descriptors.
fn unix_stream_inode(fd: RawFd) -> Option<(u64, u64)> {
    let inode = inode_of(fd)?;
    let is_unix_stream = socket_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && socket_option(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX);
    is_unix_stream.then_some(inode)
}

/// An integer `SOL_SOCKET` option (`SO_TYPE`, `SO_DOMAIN`: both in every role's seccomp
/// allowlist).
fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// The (device, inode) of a socket at `fd`; `None` for anything else or nothing.
fn inode_of(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: all-zero bytes are a valid `stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes; fstat on a closed number fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    ((st.st_mode & libc::S_IFMT) == libc::S_IFSOCK).then_some((st.st_dev, st.st_ino))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};

    pub(crate) const SHMEM_MAP: u32 = BackendReq::SHMEM_MAP as u32;
    pub(crate) const SHMEM_UNMAP: u32 = BackendReq::SHMEM_UNMAP as u32;

    fn unmap_msg(offset: u64) -> VhostUserMMap {
        VhostUserMMap {
            shmid: 1,
            shm_offset: offset,
            len: 4096,
            ..Default::default()
        }
    }

    /// The VMM's side: reads one request, returns its header.
    pub(crate) fn read_request(vmm: &mut UnixStream) -> (u32, u32) {
        let mut raw = [0u8; Header::LEN];
        vmm.read_exact(&mut raw).expect("request header");
        let header = Header::from_bytes(&raw);
        let mut body = vec![0u8; header.size as usize];
        vmm.read_exact(&mut body).expect("request body");
        (header.code, header.flags)
    }

    pub(crate) fn reply_bytes(code: u32, status: u64) -> Vec<u8> {
        let header = Header {
            code,
            flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(),
            size: 8,
        };
        let mut out = header.to_bytes().to_vec();
        out.extend_from_slice(&status.to_le_bytes());
        out
    }

    pub(crate) fn pair() -> (BackendChannel, UnixStream) {
        let (ours, vmm) = UnixStream::pair().expect("socketpair");
        vmm.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        (BackendChannel::from_stream(ours), vmm)
    }

    /// Waits (bounded) until `fd` is readable, as the event loop would.
    pub(crate) fn wait_readable(fd: BorrowedFd<'_>) {
        let mut pfd = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let n = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(10_000u16)).expect("poll");
        assert_eq!(n, 1, "nothing readable on the channel within 10 s");
    }

    #[test]
    fn requests_ask_for_a_reply_and_replies_carry_the_status() {
        let (mut ch, mut vmm) = pair();
        ch.send_request(BackendReq::SHMEM_UNMAP, &unmap_msg(0), None)
            .expect("sent");
        let (code, flags) = read_request(&mut vmm);
        assert_eq!(code, SHMEM_UNMAP);
        assert_ne!(flags & VhostUserHeaderFlag::NEED_REPLY.bits(), 0);
        let mut out = Vec::new();
        ch.read_replies(&mut out).expect("nothing to read is fine");
        assert!(out.is_empty(), "a reply before the VMM wrote one: {out:?}");
        vmm.write_all(&reply_bytes(SHMEM_UNMAP, 22)).expect("reply");
        wait_readable(ch.as_fd());
        ch.read_replies(&mut out).expect("read");
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].code, out[0].status()), (SHMEM_UNMAP, Some(22)));
    }

    #[test]
    fn a_reply_cut_in_two_is_kept_until_whole() {
        let (mut ch, mut vmm) = pair();
        let bytes = reply_bytes(SHMEM_MAP, 0);
        let mut out = Vec::new();
        vmm.write_all(&bytes[..7]).expect("first part");
        wait_readable(ch.as_fd());
        ch.read_replies(&mut out).expect("read");
        assert!(out.is_empty(), "half a reply taken for a whole one");
        vmm.write_all(&bytes[7..]).expect("rest");
        wait_readable(ch.as_fd());
        ch.read_replies(&mut out).expect("read");
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].code, out[0].status()), (SHMEM_MAP, Some(0)));
    }

    #[test]
    fn a_non_reply_breaks_the_channel_for_good() {
        let (mut ch, mut vmm) = pair();
        let bogus = Header {
            code: SHMEM_UNMAP,
            flags: VERSION_1,
            size: u32::MAX,
        };
        vmm.write_all(&bogus.to_bytes()).expect("write");
        wait_readable(ch.as_fd());
        let mut out = Vec::new();
        assert!(matches!(
            ch.read_replies(&mut out),
            Err(ChannelError::Framing(_))
        ));
        assert!(matches!(
            ch.send_request(BackendReq::SHMEM_UNMAP, &unmap_msg(0), None),
            Err(ChannelError::Framing(_))
        ));
    }

    #[test]
    fn a_closed_channel_is_reported_after_the_replies_before_it() {
        let (mut ch, mut vmm) = pair();
        vmm.write_all(&reply_bytes(SHMEM_UNMAP, 0)).expect("reply");
        drop(vmm);
        let mut out = Vec::new();
        assert!(matches!(
            ch.read_replies(&mut out),
            Err(ChannelError::Closed)
        ));
        assert_eq!(out.len(), 1, "the reply written before the close is lost");
        assert!(ch
            .send_request(BackendReq::SHMEM_UNMAP, &unmap_msg(0), None)
            .is_err_and(|e| e.is_fatal()));
    }

    #[test]
    fn descriptors_sent_with_a_reply_are_closed() {
        let (mut ch, vmm) = pair();
        let memfd = nix::sys::memfd::memfd_create("stray", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        let bytes = reply_bytes(SHMEM_MAP, 0);
        let fds = [memfd.as_raw_fd()];
        sendmsg::<()>(
            vmm.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let strays = || {
            std::fs::read_dir("/proc/self/fd")
                .expect("fds")
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().contains("memfd:stray"))
                .count()
        };
        let mut out = Vec::new();
        ch.read_replies(&mut out).expect("read");
        assert_eq!(out.len(), 1);
        assert_eq!(strays(), 1, "the VMM's descriptor was kept next to ours");
    }
}
