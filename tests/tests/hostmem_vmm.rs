//! The test VMM's side of SHMEM_MAP / SHMEM_UNMAP, tested against itself: the backend side
//! is played by the vhost crate's own `Backend` (what a vhost-user device sends with), or
//! by hand-written messages where a test needs bytes `Backend` would never send.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vgpu_tests::backend_req::{AckAction, BackendEvent, BackendRequests, RequestKind, ACK_EINVAL};
use vgpu_tests::hostmem::{HostmemWindow, WindowEvent};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

const P: u64 = 4096;
const WINDOW: u64 = 64 * P;
/// Bound on every positive wait.
const WAIT: Duration = Duration::from_secs(10);
/// Bound on a negative wait ("this has not happened yet").
const QUIET: Duration = Duration::from_millis(300);

/// virtio-gpu's host-visible region.
const SHMID: u8 = vgpu_tests::vmm::HOSTMEM_SHMID;
const SHMEM_MAP: u32 = 9;
const SHMEM_UNMAP: u32 = 10;

fn memfd(len: u64, fill: u8) -> File {
    let fd = memfd_create(c"hostmem-vmm-blob", MFdFlags::MFD_CLOEXEC).expect("memfd");
    let f = File::from(fd);
    f.set_len(len).expect("set_len");
    f.write_all_at(&vec![fill; len as usize], 0).expect("fill");
    f
}

fn mmap_req(shm_offset: u64, len: u64, writable: bool) -> VhostUserMMap {
    VhostUserMMap {
        shmid: SHMID,
        padding: [0; 7],
        fd_offset: 0,
        shm_offset,
        len,
        flags: if writable {
            VhostUserMMapFlags::WRITABLE.bits()
        } else {
            0
        },
    }
}

/// A VMM channel over a fresh window, and a vhost `Backend` on the other end with REPLY_ACK
/// and SHMEM negotiated.
fn setup() -> (Arc<BackendRequests>, Backend) {
    let window = Arc::new(HostmemWindow::reserve(WINDOW).expect("reserve"));
    let (vmm, theirs) = BackendRequests::start(window, SHMID, true).expect("start");
    let backend = Backend::from_stream(theirs);
    backend.set_reply_ack_flag(true);
    backend.set_shmem_flag(true);
    (Arc::new(vmm), backend)
}

/// Like [`setup`], but the backend end is a raw socket for hand-written messages.
fn setup_raw() -> (Arc<BackendRequests>, UnixStream) {
    let window = Arc::new(HostmemWindow::reserve(WINDOW).expect("reserve"));
    let (vmm, theirs) = BackendRequests::start(window, SHMID, true).expect("start");
    theirs.set_read_timeout(Some(WAIT)).expect("timeout");
    (Arc::new(vmm), theirs)
}

/// Sends one message by hand: header (code, flags, body length), body, optional fd.
fn send_raw(sock: &UnixStream, code: u32, flags: u32, body: &[u8], fd: Option<&File>) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsg = fds.as_ref().map(|f| [ControlMessage::ScmRights(f)]);
    let cmsgs: &[ControlMessage] = cmsg.as_ref().map(|c| &c[..]).unwrap_or(&[]);
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(&msg)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("sendmsg");
    assert_eq!(n, msg.len());
}

fn mmap_body(shmid: u8, fd_offset: u64, shm_offset: u64, len: u64, flags: u64) -> Vec<u8> {
    let mut b = vec![shmid, 0, 0, 0, 0, 0, 0, 0];
    for v in [fd_offset, shm_offset, len, flags] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// Version 1 + NEED_REPLY.
const NEED_REPLY: u32 = 0x1 | 0x8;

/// Reads one ack: (request code, flags, value).
fn read_ack(sock: &mut UnixStream) -> (u32, u32, u64) {
    let mut b = [0u8; 20];
    sock.read_exact(&mut b).expect("ack");
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    assert_eq!(w(8), 8, "ack body size");
    (w(0), w(4), u64::from(w(12)) | (u64::from(w(16)) << 32))
}

fn received(vmm: &BackendRequests, kind: RequestKind) -> vgpu_tests::backend_req::BackendRequest {
    vmm.wait_for(WAIT, |e| e.is_received(kind))
        .unwrap_or_else(|| panic!("no {kind:?} request seen:\n{}", vmm.summary()))
        .request()
        .cloned()
        .expect("a request")
}

#[test]
fn blob_mapped_at_an_offset_reads_and_writes_through_the_window_and_unmap_leaves_zeros() {
    let (vmm, backend) = setup();
    let blob = memfd(2 * P, 0x5a);
    blob.write_all_at(b"from the renderer", 100).unwrap();
    let r = backend.shmem_map(&mmap_req(8 * P, 2 * P, true), &blob);
    assert_eq!(r.expect("SHMEM_MAP acked"), 0);

    let req = received(&vmm, RequestKind::Map);
    assert_eq!(
        (req.shmid, req.shm_offset, req.len, req.fd_offset, req.fds),
        (SHMID, 8 * P, 2 * P, 0, 1)
    );
    assert!(req.need_reply);
    assert_eq!(req.outcome, Ok(()));
    let w = vmm.window();
    assert_eq!(w.read(8 * P + 100, 17).unwrap(), b"from the renderer");
    assert_eq!(w.read(8 * P, 4).unwrap(), vec![0x5a; 4]);
    w.write(9 * P + 7, b"from the guest").unwrap();
    let mut buf = [0u8; 14];
    blob.read_exact_at(&mut buf, P + 7).unwrap();
    assert_eq!(
        &buf, b"from the guest",
        "the guest's write reached the blob"
    );

    assert_eq!(
        backend.shmem_unmap(&mmap_req(8 * P, 2 * P, false)).unwrap(),
        0
    );
    let req = received(&vmm, RequestKind::Unmap);
    assert_eq!((req.shm_offset, req.len, req.fds), (8 * P, 2 * P, 0));
    assert_eq!(
        w.read(8 * P, (2 * P) as usize).unwrap(),
        vec![0; (2 * P) as usize],
        "the range reads as zeros after the unmap"
    );
    assert!(w.mappings().is_empty());
    assert_eq!(
        w.log(),
        vec![
            WindowEvent::Mapped(vgpu_tests::hostmem::Mapping {
                shm_offset: 8 * P,
                len: 2 * P,
                fd_offset: 0,
                writable: true
            }),
            WindowEvent::Unmapped {
                shm_offset: 8 * P,
                len: 2 * P
            }
        ]
    );
    // Both acks were sent once, with 0.
    assert_eq!(
        vmm.count(|e| matches!(
            e,
            BackendEvent::Acked {
                value: 0,
                copies: 1,
                delayed: false,
                ..
            }
        )),
        2,
        "{}",
        vmm.summary()
    );
    assert!(vmm.violations().is_empty(), "{:?}", vmm.violations());

    // The blob's bytes outlive the mapping; remapping it shows them again.
    assert_eq!(
        backend
            .shmem_map(&mmap_req(0, 2 * P, false), &blob)
            .unwrap(),
        0
    );
    assert_eq!(w.read(P + 7, 14).unwrap(), b"from the guest");
    drop(backend);
    assert!(
        vmm.wait_until(WAIT, |ev| matches!(
            ev.last(),
            Some(BackendEvent::Closed(_))
        )),
        "closing the backend end is seen"
    );
    assert!(vmm.is_closed());
}

#[test]
fn invalid_requests_are_refused_with_a_failure_ack_and_recorded() {
    let (vmm, backend) = setup();
    let blob = memfd(4 * P, 1);
    let cases: Vec<(&str, VhostUserMMap)> = vec![
        ("unaligned shm_offset", mmap_req(P + 1, P, true)),
        ("unaligned len", mmap_req(0, P + 1, true)),
        ("beyond the window", mmap_req(WINDOW - P, 2 * P, true)),
        ("offset past the window", mmap_req(WINDOW, P, true)),
        ("len past the end of the blob", mmap_req(0, 8 * P, true)),
        ("zero len", mmap_req(0, 0, true)),
        (
            "shmid 0",
            VhostUserMMap {
                shmid: 0,
                ..mmap_req(0, P, true)
            },
        ),
        (
            "unknown flag",
            VhostUserMMap {
                flags: 2,
                ..mmap_req(0, P, true)
            },
        ),
    ];
    for (what, req) in &cases {
        assert!(
            backend.shmem_map(req, &blob).is_err(),
            "{what}: the backend must see a failed ack"
        );
    }
    assert_eq!(
        backend
            .shmem_map(&mmap_req(4 * P, 2 * P, true), &blob)
            .unwrap(),
        0
    );
    for (what, off, len) in [
        ("same range", 4 * P, 2 * P),
        ("overlapping start", 3 * P, 2 * P),
        ("overlapping end", 5 * P, 2 * P),
        ("inside", 5 * P, P),
    ] {
        assert!(
            backend.shmem_map(&mmap_req(off, len, true), &blob).is_err(),
            "overlap ({what}) must be refused"
        );
    }
    for (what, off, len) in [("not mapped", 10 * P, P), ("part of a mapping", 4 * P, P)] {
        assert!(
            backend.shmem_unmap(&mmap_req(off, len, false)).is_err(),
            "unmap ({what}) must be refused"
        );
    }
    let n_refused = cases.len() + 4 + 2;
    assert!(
        vmm.wait_until(WAIT, |ev| ev
            .iter()
            .filter(|e| matches!(e, BackendEvent::Acked { value, .. } if *value == ACK_EINVAL))
            .count()
            == n_refused),
        "{}",
        vmm.summary()
    );
    assert_eq!(
        vmm.requests().iter().filter(|r| r.outcome.is_err()).count(),
        n_refused
    );
    assert_eq!(vmm.violations().len(), n_refused, "{:#?}", vmm.violations());
    assert_eq!(
        vmm.window().mappings().len(),
        1,
        "only the valid map is live"
    );
}

#[test]
fn delayed_ack_blocks_the_backend_until_released() {
    let (vmm, backend) = setup();
    let gate = vmm.delay_next(RequestKind::Map);
    let blob = memfd(P, 7);
    let (tx, rx) = mpsc::channel();
    let b2 = backend.clone();
    let t = std::thread::spawn(move || {
        let r = b2
            .shmem_map(&mmap_req(0, P, true), &blob)
            .map_err(|e| e.to_string());
        let _ = tx.send(r);
    });
    assert!(
        vmm.wait_for(WAIT, |e| matches!(
            e,
            BackendEvent::Held {
                kind: RequestKind::Map,
                ..
            }
        ))
        .is_some(),
        "{}",
        vmm.summary()
    );
    // The VMM applied the map; only the ack is held.
    assert_eq!(vmm.window().read(0, 1).unwrap(), vec![7]);
    assert!(
        rx.recv_timeout(QUIET).is_err(),
        "the backend's SHMEM_MAP returned before its ack was released"
    );
    assert!(!gate.is_released());
    gate.release();
    assert_eq!(rx.recv_timeout(WAIT).expect("returns after release"), Ok(0));
    t.join().unwrap();
    assert!(vmm
        .wait_for(WAIT, |e| matches!(
            e,
            BackendEvent::Acked {
                kind: RequestKind::Map,
                value: 0,
                copies: 1,
                delayed: true,
                ..
            }
        ))
        .is_some());
    // The next one goes through at once again.
    assert_eq!(backend.shmem_unmap(&mmap_req(0, P, false)).unwrap(), 0);
    assert!(vmm.violations().is_empty(), "{:?}", vmm.violations());
}

#[test]
fn acks_stay_in_order_behind_a_held_one_while_requests_keep_being_read() {
    let (vmm, mut sock) = setup_raw();
    let blob = memfd(4 * P, 3);
    let gate = vmm.delay_next(RequestKind::Map);
    send_raw(
        &sock,
        SHMEM_MAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 1),
        Some(&blob),
    );
    send_raw(
        &sock,
        SHMEM_UNMAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 0),
        None,
    );
    // Both are read and applied while the first ack is held.
    assert!(
        vmm.wait_until(WAIT, |ev| ev
            .iter()
            .filter(|e| e.request().is_some())
            .count()
            == 2),
        "{}",
        vmm.summary()
    );
    assert!(vmm.window().mappings().is_empty());
    assert_eq!(vmm.count(|e| matches!(e, BackendEvent::Acked { .. })), 0);
    sock.set_read_timeout(Some(QUIET)).unwrap();
    let mut b = [0u8; 1];
    assert!(sock.read(&mut b).is_err(), "an ack came out while held");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    gate.release();
    assert_eq!(read_ack(&mut sock), (SHMEM_MAP, 0x1 | 0x4, 0));
    assert_eq!(read_ack(&mut sock), (SHMEM_UNMAP, 0x1 | 0x4, 0));
}

#[test]
fn dropped_ack_is_never_sent_and_the_backend_is_freed_when_the_vmm_goes() {
    let (vmm, backend) = setup();
    let blob = memfd(P, 1);
    assert_eq!(backend.shmem_map(&mmap_req(0, P, true), &blob).unwrap(), 0);
    vmm.on_next(Some(RequestKind::Unmap), AckAction::Drop);
    let (tx, rx) = mpsc::channel();
    let b2 = backend.clone();
    let t = std::thread::spawn(move || {
        let _ = tx.send(
            b2.shmem_unmap(&mmap_req(0, P, false))
                .map_err(|e| e.to_string()),
        );
    });
    assert!(vmm
        .wait_for(WAIT, |e| matches!(
            e,
            BackendEvent::Dropped {
                kind: RequestKind::Unmap,
                ..
            }
        ))
        .is_some());
    assert!(
        rx.recv_timeout(QUIET).is_err(),
        "SHMEM_UNMAP returned without an ack"
    );
    // The unmap itself was applied.
    assert!(vmm.window().mappings().is_empty());
    drop(Arc::into_inner(vmm).expect("sole owner"));
    let r = rx
        .recv_timeout(WAIT)
        .expect("the backend is freed when the channel closes");
    assert!(r.is_err(), "no ack, so the call fails: {r:?}");
    t.join().unwrap();
}

#[test]
fn duplicated_ack_is_written_twice() {
    let (vmm, mut sock) = setup_raw();
    let blob = memfd(P, 1);
    send_raw(
        &sock,
        SHMEM_MAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 1),
        Some(&blob),
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_MAP, 0x5, 0));
    vmm.on_next(Some(RequestKind::Unmap), AckAction::Duplicate);
    send_raw(
        &sock,
        SHMEM_UNMAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 0),
        None,
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_UNMAP, 0x5, 0));
    assert_eq!(read_ack(&mut sock), (SHMEM_UNMAP, 0x5, 0));
    assert!(vmm
        .wait_for(WAIT, |e| matches!(
            e,
            BackendEvent::Acked {
                kind: RequestKind::Unmap,
                copies: 2,
                ..
            }
        ))
        .is_some());
    // The one-shot action is used up: the next unmap-kind ack is single again.
    send_raw(
        &sock,
        SHMEM_MAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 1),
        Some(&blob),
    );
    send_raw(
        &sock,
        SHMEM_UNMAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 0),
        None,
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_MAP, 0x5, 0));
    assert_eq!(read_ack(&mut sock), (SHMEM_UNMAP, 0x5, 0));
    sock.set_read_timeout(Some(QUIET)).unwrap();
    let mut b = [0u8; 1];
    assert!(sock.read(&mut b).is_err(), "a third ack");
}

/// What a device built on vhost's `Backend` is up against: the crate reads exactly one reply
/// per request, so a duplicated SHMEM_UNMAP ack is taken as the reply to the *next*
/// request. If that is another SHMEM_UNMAP, it "succeeds" before the VMM even saw it; a
/// SHMEM_MAP fails (wrong request code). A device must survive this (e.g. by draining).
#[test]
fn vhost_backend_takes_a_duplicated_ack_as_the_next_reply() {
    let (vmm, backend) = setup();
    let blob = memfd(2 * P, 1);
    assert_eq!(backend.shmem_map(&mmap_req(0, P, true), &blob).unwrap(), 0);
    vmm.on_next(Some(RequestKind::Unmap), AckAction::Duplicate);
    assert_eq!(backend.shmem_unmap(&mmap_req(0, P, false)).unwrap(), 0);
    assert!(vmm
        .wait_for(WAIT, |e| matches!(e, BackendEvent::Acked { copies: 2, .. }))
        .is_some());
    assert!(
        backend.shmem_map(&mmap_req(P, P, true), &blob).is_err(),
        "vhost's Backend read the stale UNMAP ack as the MAP's reply"
    );
}

#[test]
fn fail_answers_the_given_code_and_does_not_apply() {
    let (vmm, backend) = setup();
    let blob = memfd(P, 9);
    vmm.on_next(Some(RequestKind::Map), AckAction::Fail(5));
    assert!(backend.shmem_map(&mmap_req(0, P, true), &blob).is_err());
    assert!(vmm
        .wait_for(WAIT, |e| matches!(
            e,
            BackendEvent::Acked {
                kind: RequestKind::Map,
                value: 5,
                ..
            }
        ))
        .is_some());
    assert!(vmm.window().mappings().is_empty());
    assert_eq!(vmm.window().read(0, 1).unwrap(), vec![0]);
    // Standing actions apply to every request of the kind until cleared.
    vmm.set_standing(RequestKind::Map, AckAction::Fail(7));
    assert!(backend.shmem_map(&mmap_req(0, P, true), &blob).is_err());
    assert!(backend.shmem_map(&mmap_req(0, P, true), &blob).is_err());
    vmm.set_standing(RequestKind::Map, AckAction::Normal);
    assert_eq!(backend.shmem_map(&mmap_req(0, P, true), &blob).unwrap(), 0);
    assert_eq!(vmm.window().read(0, 1).unwrap(), vec![9]);
    // A Fail is the test's choice, not a device violation.
    assert!(vmm.violations().is_empty(), "{:?}", vmm.violations());
}

#[test]
fn without_need_reply_nothing_is_answered() {
    let (vmm, backend) = setup();
    backend.set_reply_ack_flag(false);
    let blob = memfd(P, 4);
    // Returns at once: the vhost Backend does not wait without REPLY_ACK.
    assert_eq!(backend.shmem_map(&mmap_req(0, P, true), &blob).unwrap(), 0);
    let req = received(&vmm, RequestKind::Map);
    assert!(!req.need_reply);
    assert_eq!(vmm.window().read(0, 1).unwrap(), vec![4]);
    backend.set_reply_ack_flag(true);
    assert_eq!(backend.shmem_unmap(&mmap_req(0, P, false)).unwrap(), 0);
    assert_eq!(vmm.count(|e| matches!(e, BackendEvent::Acked { .. })), 1);
}

#[test]
fn malformed_messages_are_refused() {
    let (vmm, mut sock) = setup_raw();
    let blob = memfd(P, 1);
    // SHMEM_MAP without its fd.
    send_raw(
        &sock,
        SHMEM_MAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 1),
        None,
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_MAP, 0x5, ACK_EINVAL));
    // SHMEM_UNMAP with an fd.
    send_raw(
        &sock,
        SHMEM_UNMAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 0),
        Some(&blob),
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_UNMAP, 0x5, ACK_EINVAL));
    // Short body.
    send_raw(&sock, SHMEM_MAP, NEED_REPLY, &[0u8; 16], Some(&blob));
    assert_eq!(read_ack(&mut sock), (SHMEM_MAP, 0x5, ACK_EINVAL));
    // Unsupported request (CONFIG_CHANGE_MSG).
    send_raw(&sock, 2, NEED_REPLY, &[], None);
    assert_eq!(read_ack(&mut sock), (2, 0x5, ACK_EINVAL));
    // REPLY flag on a request.
    send_raw(
        &sock,
        SHMEM_UNMAP,
        NEED_REPLY | 0x4,
        &mmap_body(SHMID, 0, 0, P, 0),
        None,
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_UNMAP, 0x5, ACK_EINVAL));
    assert_eq!(vmm.violations().len(), 5, "{:#?}", vmm.violations());
    assert!(vmm.window().mappings().is_empty());
    // Still serving.
    send_raw(
        &sock,
        SHMEM_MAP,
        NEED_REPLY,
        &mmap_body(SHMID, 0, 0, P, 1),
        Some(&blob),
    );
    assert_eq!(read_ack(&mut sock), (SHMEM_MAP, 0x5, 0));
    // An absurd body length breaks the channel (recorded, closed).
    let mut hdr = Vec::new();
    for v in [SHMEM_MAP, NEED_REPLY, 1 << 20] {
        hdr.extend_from_slice(&v.to_le_bytes());
    }
    sock.write_all(&hdr).unwrap();
    assert!(vmm.wait_until(WAIT, |ev| matches!(
        ev.last(),
        Some(BackendEvent::Closed(_))
    )));
    assert_eq!(vmm.violations().len(), 6);
}
