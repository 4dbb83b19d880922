//! `BackendChannel::adopt` finds the socket inside vhost's `Backend` by elimination, which
//! assumes no other thread closes a Unix stream socket at the same instant: true in the
//! frontend, not among a test binary's parallel tests, so this test has a process of its own.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vgpu_device_frontend::backend_channel::BackendChannel;
use vhost::vhost_user::message::{BackendReq, VhostUserMMap};
use vhost::vhost_user::Backend;

#[test]
fn adopt_finds_the_socket_vhost_hid_and_leaves_the_others_open() {
    let (theirs, mut vmm) = UnixStream::pair().expect("socketpair");
    let (decoy, mut decoy_peer) = UnixStream::pair().expect("socketpair");
    let backend = Backend::from_stream(theirs);
    let mut channel = BackendChannel::adopt(backend, 4096).expect("adopted");

    vmm.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let vmm = std::thread::spawn(move || {
        let mut header = [0u8; 12];
        vmm.read_exact(&mut header)
            .expect("a request on the adopted socket");
        let code = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap());
        let mut body = vec![0u8; size as usize];
        vmm.read_exact(&mut body).expect("body");
        let mut reply = Vec::new();
        reply.extend_from_slice(&code.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        vmm.write_all(&reply).expect("reply");
        (code, vmm)
    });
    let msg = VhostUserMMap {
        shmid: 1,
        len: 4096,
        ..Default::default()
    };
    channel
        .send_request(BackendReq::SHMEM_UNMAP, &msg, None)
        .expect("sent");
    let (code, _vmm) = vmm
        .join()
        .expect("the adopted socket reaches the VMM's end");
    assert_eq!(code, BackendReq::SHMEM_UNMAP as u32);
    // The VMM has written its reply before its thread ended.
    let mut replies = Vec::new();
    channel.read_replies(&mut replies).expect("the reply");
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].status(), Some(0));

    // The decoy is untouched: still open, still connected.
    assert!(decoy.as_raw_fd() >= 0);
    (&decoy).write_all(b"x").expect("the decoy is still open");
    let mut b = [0u8; 1];
    decoy_peer.read_exact(&mut b).expect("and connected");
}
