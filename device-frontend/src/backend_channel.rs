//! The backend request channel (VHOST_USER_BACKEND_SHMEM_MAP / SHMEM_UNMAP), run by the
//! device itself rather than through vhost's `Backend`.
//!
//! vhost-user replies carry no request id: a reply names only the request code it answers.
//! vhost 0.18's `Backend` reads exactly one reply per request and keeps its socket private,
//! so a VMM that acknowledges a request twice leaves the second ack in the socket, where it
//! is read as the reply to the next request; a wrong code fails that request and leaves its
//! real reply behind, and from then on every request is off by one. Owning the socket lets
//! the device read everything that arrived while no request was pending (stale, duplicated
//! or late acks) and drop it with a log line before sending, and skip a reply to another
//! code while waiting. What no device can tell apart is a duplicate of the same code that
//! arrives after the next request of that code was sent: the protocol has nothing to tell
//! them by.
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
    /// The VMM answered with a non-zero status.
    #[error("the VMM refused {request:?} (status {status})")]
    Refused {
        /// The request.
        request: BackendReq,
        /// The VMM's status.
        status: u64,
    },
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

/// A vhost-user message read from the channel: header and (bounded) body.
struct Reply {
    header: Header,
    body: Vec<u8>,
}

/// The device's end of the VMM's backend request channel.
#[derive(Debug)]
pub struct BackendChannel {
    sock: OwnedFd,
    /// Set once the framing is lost: every later request fails with it.
    broken: Option<String>,
}

impl BackendChannel {
    /// Uses `sock`, the device's end of the channel.
    pub fn from_stream(sock: UnixStream) -> Self {
        BackendChannel {
            sock: sock.into(),
            broken: None,
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

    /// Sends SHMEM_MAP of `fd` and waits for the VMM's ack.
    pub fn shmem_map(
        &mut self,
        msg: &VhostUserMMap,
        fd: BorrowedFd<'_>,
    ) -> Result<(), ChannelError> {
        self.request(BackendReq::SHMEM_MAP, msg, Some(fd))
    }

    /// Sends SHMEM_UNMAP and waits for the VMM's ack.
    pub fn shmem_unmap(&mut self, msg: &VhostUserMMap) -> Result<(), ChannelError> {
        self.request(BackendReq::SHMEM_UNMAP, msg, None)
    }

    fn request(
        &mut self,
        request: BackendReq,
        msg: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelError> {
        if let Some(why) = &self.broken {
            return Err(ChannelError::Framing(why.clone()));
        }
        let result = self.exchange(request, msg, fd);
        if let Err(ChannelError::Framing(why)) = &result {
            self.broken = Some(why.clone());
        }
        result
    }

    fn exchange(
        &mut self,
        request: BackendReq,
        msg: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelError> {
        // Whatever is readable now answers no request of ours.
        while let Some(stale) = self.read_reply(MsgFlags::MSG_DONTWAIT)? {
            log::warn!(
                "ignored a reply from the VMM that answers no pending request (code {}: \
                 a duplicated or late ack)",
                stale.header.code
            );
        }
        self.send(request, msg, fd)?;
        loop {
            let reply = self
                .read_reply(MsgFlags::empty())?
                .ok_or(ChannelError::Closed)?;
            if reply.header.code != request as u32 {
                log::warn!(
                    "ignored a reply to code {} from the VMM while waiting for {request:?}'s \
                     (a duplicated or late ack)",
                    reply.header.code
                );
                continue;
            }
            let status = <[u8; 8]>::try_from(reply.body.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| {
                    ChannelError::Framing(format!(
                        "a {}-byte reply to {request:?} (expected 8)",
                        reply.body.len()
                    ))
                })?;
            return match status {
                0 => Ok(()),
                status => Err(ChannelError::Refused { request, status }),
            };
        }
    }

    fn send(
        &self,
        request: BackendReq,
        msg: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ChannelError> {
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
        let send_err = |err: io::Error| ChannelError::Send { request, err };
        let mut sent = 0;
        while sent < bytes.len() {
            // The descriptor travels with the first byte only.
            let cmsgs = if sent == 0 { &cmsgs[..] } else { &[] };
            let iov = [IoSlice::new(&bytes[sent..])];
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(send_err(e.into())),
            }
        }
        Ok(())
    }

    /// Reads one whole message. With `MSG_DONTWAIT`, `None` when nothing is waiting; the
    /// rest of a message whose first byte has arrived is waited for, since the VMM writes
    /// it in one go. Without, `None` means the VMM closed the channel.
    fn read_reply(&self, first: MsgFlags) -> Result<Option<Reply>, ChannelError> {
        let mut raw = [0u8; Header::LEN];
        match self.read_exact(&mut raw, first)? {
            0 => return Ok(None),
            n if n < Header::LEN => return Err(ChannelError::Closed),
            _ => {}
        }
        let header = Header::from_bytes(&raw);
        let size = header.size;
        if !header.is_reply() || size > MAX_REPLY_BODY {
            return Err(ChannelError::Framing(format!(
                "flags {:#x} and a {size}-byte body where a reply belongs",
                header.flags
            )));
        }
        let mut body = vec![0u8; size as usize];
        if self.read_exact(&mut body, MsgFlags::empty())? < body.len() {
            return Err(ChannelError::Closed);
        }
        Ok(Some(Reply { header, body }))
    }

    /// Fills `buf` (the first read with `first`, the rest blocking); returns how much was
    /// read before end of stream, or 0 when `MSG_DONTWAIT` found nothing. Descriptors sent
    /// along are closed: no reply carries any.
    fn read_exact(&self, buf: &mut [u8], first: MsgFlags) -> Result<usize, ChannelError> {
        let mut filled = 0;
        let mut flags = first;
        while filled < buf.len() {
            let mut cmsg = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [IoSliceMut::new(&mut buf[filled..])];
            let got = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                flags | MsgFlags::MSG_CMSG_CLOEXEC,
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
                    msg.bytes
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) if filled == 0 && flags.contains(MsgFlags::MSG_DONTWAIT) => {
                    return Ok(0)
                }
                Err(e) => return Err(ChannelError::Recv(e.into())),
            };
            if got == 0 {
                return Ok(filled);
            }
            filled += got;
            flags = MsgFlags::empty();
        }
        Ok(filled)
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
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const SHMEM_MAP: u32 = BackendReq::SHMEM_MAP as u32;
    const SHMEM_UNMAP: u32 = BackendReq::SHMEM_UNMAP as u32;

    fn unmap_msg(offset: u64) -> VhostUserMMap {
        VhostUserMMap {
            shmid: 1,
            shm_offset: offset,
            len: 4096,
            ..Default::default()
        }
    }

    /// The VMM's side: reads one request, returns its header.
    fn read_request(vmm: &mut UnixStream) -> Header {
        let mut raw = [0u8; Header::LEN];
        vmm.read_exact(&mut raw).expect("request header");
        let header = Header::from_bytes(&raw);
        let mut body = vec![0u8; header.size as usize];
        vmm.read_exact(&mut body).expect("request body");
        header
    }

    fn reply(vmm: &mut UnixStream, code: u32, status: u64) {
        let header = Header {
            code,
            flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(),
            size: 8,
        };
        let mut out = header.to_bytes().to_vec();
        out.extend_from_slice(&status.to_le_bytes());
        vmm.write_all(&out).expect("reply");
    }

    fn pair() -> (BackendChannel, UnixStream) {
        let (ours, vmm) = UnixStream::pair().expect("socketpair");
        vmm.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        (BackendChannel::from_stream(ours), vmm)
    }

    #[test]
    fn requests_ask_for_a_reply_and_take_the_status() {
        let (mut ch, mut vmm) = pair();
        let vmm = std::thread::spawn(move || {
            let h = read_request(&mut vmm);
            assert_eq!(h.code, SHMEM_UNMAP);
            assert_ne!(h.flags & VhostUserHeaderFlag::NEED_REPLY.bits(), 0);
            reply(&mut vmm, SHMEM_UNMAP, 0);
            read_request(&mut vmm);
            reply(&mut vmm, SHMEM_UNMAP, 22);
        });
        ch.shmem_unmap(&unmap_msg(0)).expect("acked");
        assert!(matches!(
            ch.shmem_unmap(&unmap_msg(0)),
            Err(ChannelError::Refused { status: 22, .. })
        ));
        vmm.join().expect("vmm");
    }

    #[test]
    fn a_duplicated_ack_is_drained_before_the_next_request() {
        let (mut ch, mut vmm) = pair();
        let memfd = nix::sys::memfd::memfd_create("blob", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        let (acked_tx, acked_rx) = std::sync::mpsc::channel();
        let vmm = std::thread::spawn(move || {
            read_request(&mut vmm);
            reply(&mut vmm, SHMEM_UNMAP, 0);
            reply(&mut vmm, SHMEM_UNMAP, 0);
            acked_tx.send(()).expect("signal");
            // The map must be answered by its own reply, a failure here: were the stale
            // UNMAP ack taken for it, the map would "succeed".
            assert_eq!(read_request(&mut vmm).code, SHMEM_MAP);
            reply(&mut vmm, SHMEM_MAP, 5);
        });
        ch.shmem_unmap(&unmap_msg(0)).expect("first unmap");
        acked_rx.recv().expect("the VMM wrote both acks");
        let r = ch.shmem_map(&unmap_msg(0), memfd.as_fd());
        assert!(
            matches!(r, Err(ChannelError::Refused { status: 5, .. })),
            "the map took a stale ack: {r:?}"
        );
        vmm.join().expect("vmm");
    }

    #[test]
    fn a_reply_to_another_code_is_skipped_while_waiting() {
        let (mut ch, mut vmm) = pair();
        let vmm = std::thread::spawn(move || {
            read_request(&mut vmm);
            reply(&mut vmm, SHMEM_MAP, 0);
            reply(&mut vmm, SHMEM_UNMAP, 3);
        });
        assert!(matches!(
            ch.shmem_unmap(&unmap_msg(0)),
            Err(ChannelError::Refused { status: 3, .. })
        ));
        vmm.join().expect("vmm");
    }

    #[test]
    fn a_non_reply_breaks_the_channel_for_good() {
        let (mut ch, mut vmm) = pair();
        let vmm = std::thread::spawn(move || {
            read_request(&mut vmm);
            let bogus = Header {
                code: SHMEM_UNMAP,
                flags: VERSION_1,
                size: u32::MAX,
            };
            vmm.write_all(&bogus.to_bytes()).expect("write");
            vmm
        });
        assert!(matches!(
            ch.shmem_unmap(&unmap_msg(0)),
            Err(ChannelError::Framing(_))
        ));
        let _vmm = vmm.join().expect("vmm");
        assert!(matches!(
            ch.shmem_unmap(&unmap_msg(0)),
            Err(ChannelError::Framing(_))
        ));
    }

    #[test]
    fn a_closed_channel_is_reported() {
        let (mut ch, vmm) = pair();
        drop(vmm);
        assert!(matches!(
            ch.shmem_unmap(&unmap_msg(0)),
            Err(ChannelError::Send { .. } | ChannelError::Closed)
        ));
    }
}
