//! `run()` — the role's real main — in a child process under the real renderer seccomp
//! filter, serving a scanout flush, a cursor read and a fence, then exiting 0 when the
//! frontend closes the request channel. The child is this test binary re-executed; the
//! test plays broker and frontend. (The full broker/frontend/VMM stack is tested by the
//! workspace's integration tests.)

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::thread;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcOneShotServer, IpcSender};
use nix::fcntl::{fcntl, FcntlArg, FdFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use protocol::bootstrap::{ChildStatus, RendererBootstrap};
use protocol::config::DeviceConfig;
use protocol::ipc::{
    BackingEntry, FenceInfo, GuestRegion, RendererEvent, RendererOp, RendererRequest, ReplyBody,
};
use protocol::lane::Lane;
use protocol::virtio_gpu::Rect;

const CHILD_ENV: &str = "VGPU_RENDERER_WORKER_JAILED_CHILD";
const TEST_NAME: &str = "run_serves_requests_under_seccomp";
const WAIT: Duration = Duration::from_secs(20);

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

/// The child: fetch the bootstrap from the test and hand it to `run()`.
fn child(server: String) -> ! {
    let (tx, rx) = ipc::channel::<RendererBootstrap>().unwrap();
    IpcSender::connect(server).unwrap().send(tx).unwrap();
    let boot = rx.recv().unwrap();
    let code = match vgpu_renderer_worker::run(boot) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("run failed: {e}");
            1
        }
    };
    std::process::exit(code)
}

/// Waits for a blocking call on a helper thread, at most `WAIT`.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT:?}"))
}

#[test]
fn run_serves_requests_under_seccomp() {
    if let Ok(server) = std::env::var(CHILD_ENV) {
        child(server);
    }
    let (server, name) = IpcOneShotServer::<IpcSender<RendererBootstrap>>::new().unwrap();
    let (ours, theirs) = Lane::pair().unwrap();
    // The child inherits its lane end at the same number.
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    // And the doorbell: the same eventfd in both processes, so this test can hear it.
    // SAFETY: eventfd has no memory arguments; the result is checked and then owned.
    let bell = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(bell >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `bell` is a fresh fd that nothing else owns.
    let bell = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(bell) };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env("VGPU_SANDBOX_SECCOMP", "trap")
        .spawn()
        .unwrap();
    let lane_fd = theirs.as_raw_fd();
    let (_, boot_tx) = bounded("the child's hello", move || server.accept().unwrap());
    drop(theirs);

    let (req_tx, req_rx) = ipc::channel::<RendererRequest>().unwrap();
    let (ev_tx, ev_rx) = ipc::channel::<RendererEvent>().unwrap();
    let (st_tx, st_rx) = ipc::channel::<ChildStatus>().unwrap();
    boot_tx
        .send(RendererBootstrap {
            config: DeviceConfig {
                seccomp: true,
                ..DeviceConfig::default()
            },
            requests: req_rx,
            events: ev_tx,
            to_broker: st_tx,
            lane_fd,
            doorbell_fd: bell.as_raw_fd(),
        })
        .unwrap();
    match st_rx.try_recv_timeout(WAIT) {
        Ok(ChildStatus::Ready) => {}
        other => panic!("expected Ready from the jailed renderer, got {other:?}"),
    }
    // Ready means jailed: the filter is in place before the first request is read.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "renderer not in seccomp filter mode:\n{status}"
    );

    let lane = Lane::new(ours);
    let mut seq = 0;
    let mut call = |op: RendererOp, fence: Option<FenceInfo>| {
        seq += 1;
        req_tx.send(RendererRequest { seq, op, fence }).unwrap();
        match ev_rx.try_recv_timeout(WAIT) {
            Ok(RendererEvent::Reply { seq: got, result }) if got == seq => result.unwrap(),
            other => panic!("expected reply {seq}, got {other:?}"),
        }
    };

    let guest = memfd(c"guest", 0x10000);
    let pattern: Vec<u8> = (0..0x10000u32).map(|i| (i % 249) as u8).collect();
    guest.write_all_at(&pattern, 0).unwrap();
    let fds = lane.send(&[guest.as_fd()]).unwrap();
    let regions = vec![GuestRegion {
        guest_addr: 0x1_0000_0000,
        size: 0x10000,
        fd_offset: 0,
    }];
    call(RendererOp::SetGuestMemory { regions, fds }, None);
    let (w, h) = (64u32, 48u32);
    let create = RendererOp::CreateResource2d {
        resource_id: 1,
        format: 1,
        width: w,
        height: h,
    };
    call(create, None);
    let entries = vec![BackingEntry {
        addr: 0x1_0000_0000,
        length: w * h * 4,
    }];
    call(
        RendererOp::AttachBacking {
            resource_id: 1,
            entries,
        },
        None,
    );
    let full = Rect {
        x: 0,
        y: 0,
        width: w,
        height: h,
    };
    let fence = FenceInfo {
        fence_id: 1,
        ctx_id: 0,
        ring_idx: 0,
    };
    call(
        RendererOp::TransferToHost2d {
            resource_id: 1,
            rect: full,
            offset: 0,
        },
        Some(fence),
    );
    match ev_rx.try_recv_timeout(WAIT) {
        Ok(RendererEvent::FenceSignaled(f)) => assert_eq!(f, fence),
        other => panic!("expected the fence, got {other:?}"),
    }
    let size = u64::from(w * h * 4);
    let buffer = memfd(c"scanout", size);
    fcntl(
        &buffer,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
    )
    .unwrap();
    let fds = lane.send(&[buffer.as_fd()]).unwrap();
    let bind = RendererOp::SetScanoutBuffer {
        scanout_id: 0,
        resource_id: 1,
        size,
        stride: w * 4,
        fds,
    };
    call(bind, None);
    call(
        RendererOp::FlushToScanout {
            scanout_id: 0,
            rect: full,
        },
        None,
    );
    let mut shown = vec![0; size as usize];
    buffer.read_exact_at(&mut shown, 0).unwrap();
    assert_eq!(shown, pattern[..size as usize]);
    match call(RendererOp::ReadCursor { resource_id: 1 }, None) {
        ReplyBody::CursorImage(image) => {
            assert_eq!(image.len(), 16384);
            assert_eq!(image[..256], pattern[..256]);
        }
        other => panic!("expected a cursor image, got {other:?}"),
    }
    call(RendererOp::Reset, None);

    // Every event rang the doorbell: the counter holds one ring per event (at least the
    // replies above), which is what wakes the frontend's event loop.
    let mut rings = [0u8; 8];
    nix::unistd::read(&bell, &mut rings).expect("the doorbell was never rung");
    assert!(u64::from_ne_bytes(rings) >= 5, "too few doorbell rings");

    drop(req_tx);
    let status = bounded("the child's exit", move || child.wait().unwrap());
    assert!(
        status.success(),
        "jailed renderer exited with {status:?} (signal {:?})",
        status.signal()
    );
}
