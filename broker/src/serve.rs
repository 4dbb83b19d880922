//! The broker's main job: bind (or adopt) the vhost-user socket, start and wire the two
//! children, report readiness, supervise.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ipc_channel::ipc;
use nix::sys::socket::{getsockopt, sockopt};
use protocol::bootstrap::{
    ChildBootstrap, ChildHello, FrontendBootstrap, RendererLinkRenewal, Role, BROKER_LANE_FD,
    DOORBELL_FD, LANE_FD, LISTENER_FD,
};
use protocol::lane::Lane;

use crate::cli::ServeArgs;
use crate::metrics;
use crate::relay;
use crate::restart::{self, Restarter, StatusRx};
use crate::spawn::{self, Launch, Spawned};
use crate::spawner::Spawner;
use crate::supervise::{self, Managed};

/// Removes the metrics file when the broker ends: a VM that is gone should not be
/// exported by node_exporter any longer.
struct MetricsGuard(Option<Arc<metrics::MetricsFile>>);

impl Drop for MetricsGuard {
    fn drop(&mut self) {
        if let Some(file) = self.0.take() {
            file.remove();
        }
    }
}

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
    // First, while the broker has one thread: where its stderr is lost (a manager started
    // it without one), the log goes to the system log instead.
    let to_syslog = crate::logger::route_lost_stderr();
    let sfd = supervise::signal_fd().map_err(|e| format!("setting up signal handling: {e}"))?;
    crate::logger::init("broker", &args.vm_name(), args.log_level);
    if to_syslog {
        log::info!("stderr goes nowhere: logging to the system log");
    }

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
    // Before anything starts, so a bad path is one line and nothing to clean up.
    let restarts = Arc::new(AtomicU64::new(0));
    let metrics = match &args.metrics_file {
        Some(path) => Some(metrics::MetricsFile::create(
            path,
            &args.vm_name(),
            config.limits.max_resource_bytes,
            restarts.clone(),
        )?),
        None => None,
    };
    let _metrics_file = MetricsGuard(metrics.clone());
    if let Some(file) = &metrics {
        file.start_writer()?;
    }
    if let Some(mode) = args.seccomp.as_deref().filter(|m| *m != "kill") {
        log::warn!(
            "--seccomp {mode}: violations do not kill the children; for debugging a policy only"
        );
    }

    let mut relay = None;
    let (listener, where_, _socket_file) = match (&args.socket_path, args.fd) {
        (Some(path), None) => {
            let l = bind(path)?;
            (
                l,
                path.display().to_string(),
                SocketFile(Some(path.clone())),
            )
        }
        (None, Some(fd)) => match adopt_fd(fd, args.keep_listening)? {
            Adopted::Listener(l) => (l, format!("fd {fd}"), SocketFile(None)),
            Adopted::Connected(l, r) => {
                relay = Some(r);
                (l, format!("fd {fd} (connected)"), SocketFile(None))
            }
        },
        (None, None) => {
            return Err("one of --socket-path PATH or --fd N is required".into());
        }
        (Some(_), Some(_)) => return Err("--socket-path and --fd are exclusive".into()),
    };
    let listener = spawn::lift_fd(listener).map_err(|e| format!("preparing the listener: {e}"))?;

    // The first renderer and the frontend start at once, so that their execs, dynamic
    // linking and set-up overlap; the spawner (for the renderers that replace a dead one,
    // once the broker can no longer create processes) only after the device is ready, to
    // keep it off the start-up's critical path.
    let started = start_children(&args, &listener)?;
    // The frontend holds its own copy of the listener now.
    drop(listener);
    let Started {
        renderer,
        frontend,
        doorbell,
        broker_lane,
    } = started;
    let mut renderer_m = Managed::new(Role::Renderer.name(), renderer.child);
    let mut frontend_m = Managed::new(Role::Frontend.name(), frontend.child);
    // One line per child: which protections it has, and which the host refused.
    for (m, namespaces) in [
        (&renderer_m, &renderer.namespaces),
        (&frontend_m, &frontend.namespaces),
    ] {
        log::info!("started {} (pid {}): {namespaces}", m.role, m.child.id());
    }

    let wired = wire(
        config.clone(),
        metrics.as_ref().map(|_| metrics::PERIOD),
        frontend.hello.bootstrap,
        &renderer.hello.bootstrap,
    );
    let (fe_status, re_status, renewals) = match wired {
        Ok(s) => s,
        Err(e) => {
            supervise::stop_all(&sfd, &mut [&mut frontend_m, &mut renderer_m]);
            return Err(e);
        }
    };
    for (status, role) in [(&fe_status, Role::Frontend), (&re_status, Role::Renderer)] {
        if let Err(e) = restart::wait_ready(status, role) {
            supervise::stop_all(&sfd, &mut [&mut frontend_m, &mut renderer_m]);
            return Err(e);
        }
    }
    log::info!("ready: serving on {where_}");
    restart::spawn_status_logger(fe_status, Role::Frontend, metrics.clone());
    restart::spawn_status_logger(re_status, Role::Renderer, None);
    let spawner = Spawner::launch(args.log_level, args.seccomp.as_deref())
        .and_then(|pending| pending.finish());
    let (spawner, spawner_child) = match spawner {
        Ok(s) => s,
        Err(e) => {
            supervise::stop_all(&sfd, &mut [&mut frontend_m, &mut renderer_m]);
            return Err(format!("starting the spawner: {e}"));
        }
    };
    let mut spawner_m = Managed::new(crate::spawner::SPAWNER_ROLE, spawner_child);
    // Set-up is over (children started and wired, every thread running): from here the
    // broker only supervises, and its own filter says so.
    // Started while threads may still be created; it needs nothing the filter forbids.
    if let Some(Err(e)) = relay.take().map(relay::Relay::start) {
        supervise::stop_all(
            &sfd,
            &mut [&mut frontend_m, &mut renderer_m, &mut spawner_m],
        );
        return Err(e);
    }
    let metrics_dir = metrics.as_ref().map(|m| m.dir_fd());
    if let Err(e) = jail_broker(args.seccomp.as_deref(), metrics_dir) {
        supervise::stop_all(
            &sfd,
            &mut [&mut frontend_m, &mut renderer_m, &mut spawner_m],
        );
        return Err(e);
    }
    let mut restarter = Restarter::new(
        spawner,
        doorbell,
        broker_lane,
        renewals,
        config,
        args.max_renderer_restarts,
        restarts,
    );
    let mut children = supervise::Children {
        frontend: frontend_m,
        renderer: renderer_m,
        spawner: spawner_m,
    };
    Ok(supervise::supervise(&sfd, &mut children, &mut restarter))
}

/// The broker's own seccomp filter (role "broker"), with the children's violation action;
/// with `metrics_dir` (the metrics file's directory, open for good) it may write there.
fn jail_broker(mode: Option<&str>, metrics_dir: Option<i32>) -> Result<(), String> {
    let action = policy::ViolationAction::parse(mode).map_err(|e| e.to_string())?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("PR_SET_NO_NEW_PRIVS: {e}"))?;
    // The children's namespaces were the last thing that needed a capability (where no
    // user namespace could be had); signalling them (same user, from outside their
    // namespaces) and removing the socket file (in a directory this user may write) need
    // none.
    let caps = policy::drop_capabilities().map_err(|e| e.to_string())?;
    log::info!("broker: {caps}");
    let filter = match metrics_dir {
        Some(dir_fd) => policy::Filter::BrokerMetrics { dir_fd },
        None => policy::Filter::Broker,
    };
    policy::install_seccomp(filter, action).map_err(|e| e.to_string())
}

/// The first renderer and the frontend, started and said hello, with what links them.
struct Started {
    renderer: Spawned,
    frontend: Spawned,
    /// The device's doorbell (every renderer shares it; the broker keeps it to ring).
    doorbell: OwnedFd,
    /// The broker's end of its descriptor lane to the frontend.
    broker_lane: Lane,
}

/// Launches the first renderer and the frontend, then waits for both hellos.
fn start_children(args: &ServeArgs, listener: &OwnedFd) -> Result<Started, String> {
    let lift = |fd| spawn::lift_fd(fd).map_err(|e| e.to_string());
    let doorbell = lift(doorbell().map_err(|e| format!("creating the doorbell: {e}"))?)?;
    let (lane_fe, lane_re) =
        Lane::pair().map_err(|e| format!("creating the descriptor lane: {e}"))?;
    let (lane_fe, lane_re) = (lift(lane_fe)?, lift(lane_re)?);
    let (broker_lane, fe_broker_lane) =
        Lane::pair().map_err(|e| format!("creating the broker's lane: {e}"))?;
    let fe_broker_lane = lift(fe_broker_lane)?;
    let renderer = spawn::launch::<ChildHello>(&Launch::role(
        Role::Renderer,
        &[(&lane_re, LANE_FD), (&doorbell, DOORBELL_FD)],
        args.log_level,
        args.seccomp.as_deref(),
    ))
    .map_err(|e| e.to_string())?;
    let frontend = spawn::launch::<ChildHello>(&Launch::role(
        Role::Frontend,
        &[
            (&lane_fe, LANE_FD),
            (listener, LISTENER_FD),
            (&doorbell, DOORBELL_FD),
            (&fe_broker_lane, BROKER_LANE_FD),
        ],
        args.log_level,
        args.seccomp.as_deref(),
    ))
    .map_err(|e| e.to_string())?;
    // A failure drops (and so kills) whichever is still pending; a renderer already
    // waited for is killed here.
    let mut renderer = renderer.wait().map_err(|e| e.to_string())?;
    let frontend = match frontend.wait() {
        Ok(f) => f,
        Err(e) => {
            spawn::kill_and_reap(&mut renderer.child);
            return Err(e.to_string());
        }
    };
    Ok(Started {
        renderer,
        frontend,
        doorbell,
        broker_lane: Lane::new(broker_lane),
    })
}

/// Sends the renderer and the frontend their bootstraps; returns their status receivers
/// and the sender of the frontend's link renewals.
fn wire(
    config: protocol::config::DeviceConfig,
    metrics_period: Option<std::time::Duration>,
    to_frontend: ipc::IpcSender<ChildBootstrap>,
    to_renderer: &ipc::IpcSender<ChildBootstrap>,
) -> Result<(StatusRx, StatusRx, ipc::IpcSender<RendererLinkRenewal>), String> {
    let e = |e: std::io::Error| format!("creating channels: {e}");
    let renderer = restart::wire_renderer(config.clone(), to_renderer)?;
    let (fe_status_tx, fe_status_rx) = ipc::channel().map_err(e)?;
    let (renewals_tx, renewals_rx) = ipc::channel().map_err(e)?;
    to_frontend
        .send(ChildBootstrap::Frontend(FrontendBootstrap {
            config,
            to_renderer: renderer.to_renderer,
            from_renderer: renderer.from_renderer,
            to_broker: fe_status_tx,
            lane_fd: LANE_FD,
            listener_fd: LISTENER_FD,
            doorbell_fd: DOORBELL_FD,
            renewals: renewals_rx,
            broker_lane_fd: BROKER_LANE_FD,
            metrics_period,
        }))
        .map_err(|e| format!("sending the device-frontend its bootstrap: {e}"))?;
    Ok((fe_status_rx, renderer.status, renewals_tx))
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

/// What `--fd` named.
enum Adopted {
    /// A listening socket: the frontend accepts the VMM's connections on it.
    Listener(OwnedFd),
    /// A socket connected to the VMM (libvirt's way), served through a relay.
    Connected(OwnedFd, relay::Relay),
}

fn adopt_fd(fd: i32, keep_listening: bool) -> Result<Adopted, String> {
    if fd < 3 {
        return Err(format!("--fd {fd}: not a socket (fds 0-2 are stdio)"));
    }
    // SAFETY: fcntl(F_GETFD) only queries whether the number is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--fd {fd}: not an open file descriptor"));
    }
    // SAFETY: the user handed this fd to us; from here on the broker owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(listening) => listening,
        Err(_) => return Err(format!("--fd {fd}: not a socket")),
    };
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::Stream) => {}
        _ => return Err(format!("--fd {fd}: not a stream socket")),
    }
    if listening {
        return Ok(Adopted::Listener(owned));
    }
    if !relay::is_connected(owned.as_fd()) {
        return Err(format!(
            "--fd {fd}: neither listening nor connected to a VMM"
        ));
    }
    if keep_listening {
        return Err(format!(
            "--fd {fd}: a connected socket serves one VMM connection; --keep-listening needs \
             a listening socket"
        ));
    }
    let (listener, relay) = relay::adopt_connected(owned).map_err(|e| format!("--fd {fd}: {e}"))?;
    Ok(Adopted::Connected(listener, relay))
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
