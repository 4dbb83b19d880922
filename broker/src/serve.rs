//! The broker's main job: bind (or adopt) the vhost-user socket, start and wire the two
//! children, report readiness, supervise.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipc_channel::ipc::{self, IpcReceiver};
use nix::sys::socket::{getsockopt, sockopt};
use protocol::bootstrap::{
    ChildBootstrap, ChildStatus, FrontendBootstrap, RendererBootstrap, Role, DOORBELL_FD, LANE_FD,
    LISTENER_FD,
};
use protocol::lane::Lane;

use crate::cli::ServeArgs;
use crate::spawn::{self, kill_and_reap};
use crate::supervise::{self, Managed};

/// How long both children may take from bootstrap to ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Removes the socket file we created when the broker ends.
struct SocketFile(Option<PathBuf>);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn serve(args: ServeArgs) -> Result<i32, String> {
    // Before any thread exists, so every thread inherits the blocked mask.
    let sfd = supervise::signal_fd().map_err(|e| format!("setting up signal handling: {e}"))?;
    crate::logger::init("broker", args.log_level);

    // Fails early, in one line, where --virgl cannot work.
    let virgl_capsets = if args.virgl {
        let capsets = crate::virgl_probe::run()
            .map_err(|why| format!("--virgl: {why}; start without --virgl"))?;
        Some(capsets)
    } else {
        None
    };
    if let Some(node) = &args.render_node {
        check_render_node(node, args.virgl)?;
    }
    let mut config = args.device_config()?;
    if let Some(n) = virgl_capsets {
        config.num_capsets = n;
    }
    if let Some(mode) = args.seccomp.as_deref().filter(|m| *m != "kill") {
        log::warn!(
            "--seccomp {mode}: violations do not kill the children; for debugging a policy only"
        );
    }

    let (listener, where_, _socket_file) = match (&args.socket_path, args.fd) {
        (Some(path), None) => {
            let l = bind(path)?;
            (
                l,
                path.display().to_string(),
                SocketFile(Some(path.clone())),
            )
        }
        (None, Some(fd)) => (adopt_fd(fd)?, format!("fd {fd}"), SocketFile(None)),
        (None, None) => {
            return Err("one of --socket-path PATH or --fd N is required".into());
        }
        (Some(_), Some(_)) => return Err("--socket-path and --fd are exclusive".into()),
    };
    let listener = spawn::lift_fd(listener).map_err(|e| format!("preparing the listener: {e}"))?;

    let (lane_fe, lane_re) =
        Lane::pair().map_err(|e| format!("creating the descriptor lane: {e}"))?;
    let lane_fe = spawn::lift_fd(lane_fe).map_err(|e| e.to_string())?;
    let lane_re = spawn::lift_fd(lane_re).map_err(|e| e.to_string())?;

    let doorbell = spawn::lift_fd(doorbell().map_err(|e| format!("creating the doorbell: {e}"))?)
        .map_err(|e| e.to_string())?;

    let renderer = spawn::spawn(
        Role::Renderer,
        &[(&lane_re, LANE_FD), (&doorbell, DOORBELL_FD)],
        args.log_level,
        args.seccomp.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    let mut renderer_child = renderer.child;
    let frontend = match spawn::spawn(
        Role::Frontend,
        &[
            (&lane_fe, LANE_FD),
            (&listener, LISTENER_FD),
            (&doorbell, DOORBELL_FD),
        ],
        args.log_level,
        args.seccomp.as_deref(),
    ) {
        Ok(f) => f,
        Err(e) => {
            kill_and_reap(&mut renderer_child);
            return Err(e.to_string());
        }
    };
    // The children hold their own copies now.
    drop((lane_fe, lane_re, listener, doorbell));
    let mut frontend_m = Managed::new(Role::Frontend.name(), frontend.child);
    let mut renderer_m = Managed::new(Role::Renderer.name(), renderer_child);
    // One line per child: which protections it has, and which the host refused.
    for (m, namespaces) in [
        (&renderer_m, &renderer.namespaces),
        (&frontend_m, &frontend.namespaces),
    ] {
        log::info!("started {} (pid {}): {namespaces}", m.role, m.child.id());
    }

    let wired = wire(config, frontend.hello.bootstrap, renderer.hello.bootstrap);
    let (fe_status, re_status) = match wired {
        Ok(s) => s,
        Err(e) => {
            supervise::stop_all(&sfd, &mut [&mut frontend_m, &mut renderer_m]);
            return Err(e);
        }
    };
    for (status, role) in [(&fe_status, Role::Frontend), (&re_status, Role::Renderer)] {
        if let Err(e) = wait_ready(status, role) {
            supervise::stop_all(&sfd, &mut [&mut frontend_m, &mut renderer_m]);
            return Err(e);
        }
    }
    log::info!("ready: serving on {where_}");
    spawn_status_logger(fe_status, Role::Frontend);
    spawn_status_logger(re_status, Role::Renderer);
    // Set-up is over (children started and wired, every thread running): from here the
    // broker only supervises, and its own filter says so.
    if let Err(e) = jail_broker(args.seccomp.as_deref()) {
        supervise::stop_all(&sfd, &mut [&mut frontend_m, &mut renderer_m]);
        return Err(e);
    }

    Ok(supervise::supervise(&sfd, &mut frontend_m, &mut renderer_m))
}

type StatusRx = IpcReceiver<ChildStatus>;

/// The broker's own seccomp filter (role "broker"), with the children's violation action.
fn jail_broker(mode: Option<&str>) -> Result<(), String> {
    let action = policy::ViolationAction::parse(mode).map_err(|e| e.to_string())?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    // The children's namespaces were the last thing that needed a capability (where no
    // user namespace could be had); signalling them (same user, from outside their
    // namespaces) and removing the socket file (in a directory this user may write) need
    // none.
    let caps = policy::drop_capabilities().map_err(|e| e.to_string())?;
    log::info!("broker: {caps}");
    policy::install_seccomp(Role::Broker, action).map_err(|e| e.to_string())
}

fn wire(
    config: protocol::config::DeviceConfig,
    to_frontend: ipc::IpcSender<ChildBootstrap>,
    to_renderer: ipc::IpcSender<ChildBootstrap>,
) -> Result<(StatusRx, StatusRx), String> {
    let e = |e: std::io::Error| format!("creating channels: {e}");
    let (req_tx, req_rx) = ipc::channel().map_err(e)?;
    let (ev_tx, ev_rx) = ipc::channel().map_err(e)?;
    let (fe_status_tx, fe_status_rx) = ipc::channel().map_err(e)?;
    let (re_status_tx, re_status_rx) = ipc::channel().map_err(e)?;
    to_renderer
        .send(ChildBootstrap::Renderer(RendererBootstrap {
            config: config.clone(),
            requests: req_rx,
            events: ev_tx,
            to_broker: re_status_tx,
            lane_fd: LANE_FD,
            doorbell_fd: DOORBELL_FD,
        }))
        .map_err(|e| format!("sending the renderer-worker its bootstrap: {e}"))?;
    to_frontend
        .send(ChildBootstrap::Frontend(FrontendBootstrap {
            config,
            to_renderer: req_tx,
            from_renderer: ev_rx,
            to_broker: fe_status_tx,
            lane_fd: LANE_FD,
            listener_fd: LISTENER_FD,
            doorbell_fd: DOORBELL_FD,
        }))
        .map_err(|e| format!("sending the device-frontend its bootstrap: {e}"))?;
    Ok((fe_status_rx, re_status_rx))
}

fn wait_ready(status: &StatusRx, role: Role) -> Result<(), String> {
    match status.try_recv_timeout(READY_TIMEOUT) {
        Ok(ChildStatus::Ready) => Ok(()),
        Ok(other) => Err(format!(
            "the {} reported {other:?} before being ready",
            role.name()
        )),
        Err(ipc_channel::TryRecvError::Empty) => Err(format!(
            "the {} was not ready within {READY_TIMEOUT:?}",
            role.name()
        )),
        Err(ipc_channel::TryRecvError::IpcError(e)) => Err(format!(
            "the {} failed during start-up ({e:?}); see its log above",
            role.name()
        )),
    }
}

fn spawn_status_logger(rx: StatusRx, role: Role) {
    let _ = std::thread::Builder::new()
        .name(format!("status-{}", role.name()))
        .spawn(move || {
            while let Ok(s) = rx.recv() {
                log::debug!("{} reports {s:?}", role.name());
            }
        });
}

/// The renderer's doorbell: a non-blocking eventfd (see `protocol::bootstrap::DOORBELL_FD`).
fn doorbell() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments; a non-negative result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(path: &Path) -> Result<OwnedFd, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            // A stale socket of an earlier run; QEMU's backends replace it too.
            std::fs::remove_file(path).map_err(|e| {
                format!(
                    "--socket-path {}: removing the old socket: {e}",
                    path.display()
                )
            })?;
        }
        Ok(_) => {
            return Err(format!(
                "--socket-path {}: exists and is not a socket",
                path.display()
            ))
        }
        Err(_) => {}
    }
    let l =
        UnixListener::bind(path).map_err(|e| format!("--socket-path {}: {e}", path.display()))?;
    Ok(OwnedFd::from(l))
}

fn adopt_fd(fd: i32) -> Result<OwnedFd, String> {
    if fd < 3 {
        return Err(format!("--fd {fd}: not a socket (fds 0-2 are stdio)"));
    }
    // SAFETY: fcntl(F_GETFD) only queries whether the number is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--fd {fd}: not an open file descriptor"));
    }
    // SAFETY: the user handed this fd to us; from here on the broker owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(format!("--fd {fd}: socket is not listening")),
        Err(_) => return Err(format!("--fd {fd}: not a socket")),
    }
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::Stream) => {}
        _ => return Err(format!("--fd {fd}: not a stream socket")),
    }
    let _ = owned.as_raw_fd();
    Ok(owned)
}

fn check_render_node(node: &Path, virgl: bool) -> Result<(), String> {
    let m =
        std::fs::metadata(node).map_err(|e| format!("--render-node {}: {e}", node.display()))?;
    if !m.file_type().is_char_device() {
        return Err(format!(
            "--render-node {}: not a character device",
            node.display()
        ));
    }
    if virgl {
        log::info!(
            "render node {}: the virgl renderer draws on it",
            node.display()
        );
    } else {
        log::info!(
            "render node {} accepted; the 2D renderer does not open it",
            node.display()
        );
    }
    Ok(())
}
