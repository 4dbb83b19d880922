//! A renderer-worker under its real seccomp filter, in a child process: the test binary
//! re-executed, fetching its bootstrap from the test (which plays broker and frontend) and
//! handing it to `run()`, the role's real main.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::thread;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcOneShotServer, IpcReceiver, IpcSender};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use protocol::bootstrap::{ChildStatus, RendererBootstrap};
use protocol::config::DeviceConfig;
use protocol::ipc::{
    FenceInfo, RenderError, RendererEvent, RendererOp, RendererRequest, ReplyBody,
};
use protocol::lane::Lane;

/// Set in the child: the name of the test's one-shot server.
const CHILD_ENV: &str = "VGPU_RENDERER_WORKER_JAILED_CHILD";
/// Bound on every wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// A sealable memfd of `len` bytes.
pub fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

/// Waits for a blocking call on a helper thread, at most `WAIT`.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT:?}"))
}

/// In the re-executed child (the test function calls this first): never returns there.
pub fn child_side() {
    let Ok(server) = std::env::var(CHILD_ENV) else {
        return;
    };
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

/// The jailed renderer and the test's ends of its channels.
pub struct Jailed {
    pub child: Child,
    pub req_tx: IpcSender<Vec<RendererRequest>>,
    pub ev_rx: IpcReceiver<RendererEvent>,
    pub lane: Lane,
    pub bell: OwnedFd,
    seq: u64,
}

impl Jailed {
    /// Starts test `test_name` of this binary as the renderer with `config`, seccomp in
    /// trap mode (a violation names the system call and exits 159), and waits for Ready.
    pub fn start(test_name: &str, config: DeviceConfig) -> Jailed {
        let (server, name) = IpcOneShotServer::<IpcSender<RendererBootstrap>>::new().unwrap();
        let (ours, theirs) = Lane::pair().unwrap();
        // The child inherits its lane end at the same number.
        fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        // And the doorbell: the same eventfd in both processes, so the test can hear it.
        // SAFETY: eventfd has no memory arguments; the result is checked and then owned.
        let bell = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
        assert!(bell >= 0, "eventfd: {}", std::io::Error::last_os_error());
        // SAFETY: `bell` is a fresh fd that nothing else owns.
        let bell = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(bell) };
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, name)
            .env("VGPU_SANDBOX_SECCOMP", "trap")
            .env("MESA_SHADER_CACHE_DISABLE", "true")
            .spawn()
            .unwrap();
        let lane_fd = theirs.as_raw_fd();
        let (_, boot_tx) = bounded("the child's hello", move || server.accept().unwrap());
        drop(theirs);

        let (req_tx, req_rx) = ipc::channel::<Vec<RendererRequest>>().unwrap();
        let (ev_tx, ev_rx) = ipc::channel::<RendererEvent>().unwrap();
        let (st_tx, st_rx) = ipc::channel::<ChildStatus>().unwrap();
        boot_tx
            .send(RendererBootstrap {
                config: DeviceConfig {
                    seccomp: true,
                    ..config
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
        Jailed {
            child,
            req_tx,
            ev_rx,
            lane: Lane::new(ours),
            bell,
            seq: 0,
        }
    }

    /// Sends one request and waits for its reply (events before it must not come).
    pub fn try_call(
        &mut self,
        op: RendererOp,
        fence: Option<FenceInfo>,
    ) -> Result<ReplyBody, RenderError> {
        self.seq += 1;
        let seq = self.seq;
        self.req_tx
            .send(vec![RendererRequest {
                seq,
                op,
                fence,
                quiet: false,
            }])
            .unwrap();
        match self.ev_rx.try_recv_timeout(WAIT) {
            Ok(RendererEvent::Reply { seq: got, result }) if got == seq => result,
            other => panic!("expected reply {seq}, got {other:?}"),
        }
    }

    /// [`Jailed::try_call`] that must succeed.
    pub fn call(&mut self, op: RendererOp, fence: Option<FenceInfo>) -> ReplyBody {
        self.try_call(op, fence).unwrap()
    }

    /// Waits for the next event, which must be `fence` signalled.
    pub fn expect_fence(&self, fence: FenceInfo) {
        match self.ev_rx.try_recv_timeout(WAIT) {
            Ok(RendererEvent::FenceSignaled(f)) => assert_eq!(f, fence),
            other => panic!("expected fence {fence:?}, got {other:?}"),
        }
    }

    /// Shows resource `resource_id` (`width` x `height`) on scanout 0 through a sealed
    /// memfd, as the frontend does, flushes it whole and returns what the buffer holds.
    pub fn show_on_scanout(&mut self, resource_id: u32, width: u32, height: u32) -> Vec<u8> {
        use nix::fcntl::SealFlag;
        use protocol::virtio_gpu::Rect;
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;

        let size = u64::from(width * height * 4);
        let buffer = memfd(c"scanout", size);
        fcntl(
            &buffer,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .unwrap();
        let fds = self.lane.send(&[buffer.as_fd()]).unwrap();
        self.call(
            RendererOp::SetScanoutBuffer {
                scanout_id: 0,
                resource_id,
                size,
                stride: width * 4,
                fds,
            },
            None,
        );
        let rect = Rect {
            x: 0,
            y: 0,
            width,
            height,
        };
        self.call(
            RendererOp::FlushToScanout {
                scanout_id: 0,
                rect,
            },
            None,
        );
        let mut shown = vec![0; size as usize];
        buffer.read_exact_at(&mut shown, 0).unwrap();
        shown
    }

    /// Closes the request channel and checks the renderer exits 0 (no violation).
    pub fn finish(self) {
        drop(self.req_tx);
        let mut child = self.child;
        let status = bounded("the child's exit", move || child.wait().unwrap());
        assert!(
            status.success(),
            "jailed renderer exited with {status:?} (signal {:?})",
            status.signal()
        );
    }
}
