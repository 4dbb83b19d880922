//! `--fd N` with a connected socket: what libvirt hands a vhost-user backend it starts
//! (one end of a socketpair, the VMM at the other), as QEMU's own backends accept it.
//!
//! vhost-user-backend serves only connections it accepts from a listener, so the broker
//! makes a private listener for the frontend, connects to it itself, and relays the
//! vhost-user messages between the VMM's socket and that connection, each message whole
//! with its descriptors. Only the control socket goes through the relay, and it carries
//! set-up messages: the display socket and the backend request channel are descriptors in
//! those messages and reach the frontend directly, and the virtqueues are shared memory
//! with eventfds. The relay threads start before the broker jails itself and need nothing
//! its filter forbids (recvmsg, sendmsg, shutdown, close).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};

use nix::sys::socket::{
    recvmsg, sendmsg, shutdown, ControlMessage, ControlMessageOwned, MsgFlags, Shutdown,
};

/// A vhost-user message header: request, flags, payload size (all u32, little-endian).
const HEADER_LEN: usize = 12;
/// Largest payload relayed. vhost-user's largest messages (a memory table, the config
/// space) are a few hundred bytes; a VMM that announces more is broken.
const MAX_PAYLOAD: usize = 64 << 10;
/// Most descriptors one message may carry (vhost-user's limit is 32).
const MAX_FDS: usize = 32;

/// The VMM's connected socket and the broker's connection to the frontend's listener.
pub struct Relay {
    vmm: OwnedFd,
    device: OwnedFd,
}

/// Whether `fd` is a connected stream socket (not a listening one).
pub fn is_connected(fd: BorrowedFd<'_>) -> bool {
    nix::sys::socket::getpeername::<nix::sys::socket::UnixAddr>(fd.as_raw_fd()).is_ok()
}

/// Takes the VMM's connected socket; returns the listener the frontend serves on (one
/// connection is already waiting in it) and the relay to start.
pub fn adopt_connected(vmm: OwnedFd) -> Result<(OwnedFd, Relay), String> {
    let dir = std::env::temp_dir().join(format!(
        "vgpu-sandbox-relay-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join("vhost-user");
    let made = UnixListener::bind(&path).and_then(|l| Ok((UnixStream::connect(&path)?, l)));
    // The connection is made: nobody else may find the path, and nothing is left behind.
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let (device, listener) = made.map_err(|e| format!("the relay's private listener: {e}"))?;
    Ok((
        listener.into(),
        Relay {
            vmm,
            device: device.into(),
        },
    ))
}

impl Relay {
    /// Starts one thread per direction; each ends when its side closes, and closes the
    /// other side's writing half so that the far end sees the disconnect.
    pub fn start(self) -> Result<(), String> {
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("relay: {e}"));
        let (vmm2, device2) = (dup(&self.vmm)?, dup(&self.device)?);
        for (name, from, to) in [
            ("relay-to-device", self.vmm, device2),
            ("relay-to-vmm", self.device, vmm2),
        ] {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if let Err(why) = pump(from.as_fd(), to.as_fd()) {
                        log::info!("{name}: {why}");
                    }
                    let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
                })
                .map_err(|e| format!("starting the relay: {e}"))?;
        }
        Ok(())
    }
}

/// Moves whole messages from `from` to `to` until `from` closes (Ok) or breaks (Err).
fn pump(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> Result<(), String> {
    let mut buf = vec![0u8; HEADER_LEN + MAX_PAYLOAD];
    loop {
        let Some(fds) = read_with_fds(from, &mut buf[..HEADER_LEN])? else {
            return Ok(());
        };
        let size = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if size > MAX_PAYLOAD {
            return Err(format!("a message of {size} bytes: not vhost-user"));
        }
        if size > 0 && read_exact(from, &mut buf[HEADER_LEN..HEADER_LEN + size])?.is_none() {
            return Err("closed in the middle of a message".into());
        }
        write_all_with_fds(to, &buf[..HEADER_LEN + size], &fds)?;
        // `fds` are closed here: the receiver has its own copies.
    }
}

/// Fills `buf`, taking the descriptors that come with its first bytes. None at a clean
/// end of stream before the first byte.
fn read_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<Vec<OwnedFd>>, String> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut fds = Vec::new();
    let n = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("recvmsg: {e}"))?;
        for c in msg.cmsgs().map_err(|e| format!("control message: {e}"))? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for this process.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err("more descriptors than vhost-user allows".into());
        }
        msg.bytes
    };
    if n == 0 {
        return Ok(None);
    }
    if n < buf.len() && read_exact(fd, &mut buf[n..])?.is_none() {
        return Err("closed in the middle of a header".into());
    }
    Ok(Some(fds))
}

/// Fills `buf`; None when the stream ends first.
fn read_exact(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Option<()>, String> {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::read(fd, &mut buf[done..]) {
            Ok(0) => return Ok(None),
            Ok(n) => done += n,
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(Some(()))
}

/// Writes all of `bytes`, the descriptors with the first chunk.
fn write_all_with_fds(fd: BorrowedFd<'_>, bytes: &[u8], fds: &[OwnedFd]) -> Result<(), String> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let mut cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let mut done = 0;
    while done < bytes.len() {
        let iov = [IoSlice::new(&bytes[done..])];
        match sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => {
                done += n;
                cmsgs = &[];
            }
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(format!("sendmsg: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend(1u32.to_le_bytes());
        m.extend((payload.len() as u32).to_le_bytes());
        m.extend(payload);
        m
    }

    #[test]
    fn messages_and_their_descriptors_cross_whole_in_both_directions() {
        let (mut vmm, vmm_end) = UnixStream::pair().unwrap();
        let (listener, relay) = adopt_connected(vmm_end.into()).unwrap();
        let listener = UnixListener::from(listener);
        relay.start().unwrap();
        let (mut device, _) = listener.accept().unwrap();

        // VMM -> device, with a descriptor (a pipe's read end) attached.
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        let first = message(5, &[7; 40]);
        write_all_with_fds(vmm.as_fd(), &first, &[pipe_r]).unwrap();
        let mut got = vec![0u8; HEADER_LEN];
        let fds = read_with_fds(device.as_fd(), &mut got).unwrap().unwrap();
        let mut payload = vec![0u8; 40];
        device.read_exact(&mut payload).unwrap();
        got.extend(payload);
        assert_eq!(got, first);
        assert_eq!(fds.len(), 1, "the descriptor crossed with its message");
        nix::unistd::write(&pipe_w, b"x").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(&fds[0], &mut byte).unwrap();
        assert_eq!(&byte, b"x", "it is the same pipe");

        // Device -> VMM, no descriptors.
        let reply = message(5, &42u64.to_le_bytes());
        device.write_all(&reply).unwrap();
        let mut back = vec![0u8; reply.len()];
        vmm.read_exact(&mut back).unwrap();
        assert_eq!(back, reply);

        // The VMM hangs up: the device sees the end of the stream.
        drop(vmm);
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn an_oversized_message_ends_the_relay() {
        let (mut vmm, vmm_end) = UnixStream::pair().unwrap();
        let (listener, relay) = adopt_connected(vmm_end.into()).unwrap();
        relay.start().unwrap();
        let (mut device, _) = UnixListener::from(listener).accept().unwrap();
        let mut header = 1u32.to_le_bytes().to_vec();
        header.extend(1u32.to_le_bytes());
        header.extend(((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        vmm.write_all(&header).unwrap();
        let mut rest = Vec::new();
        device.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "nothing of it reached the device");
    }
}
