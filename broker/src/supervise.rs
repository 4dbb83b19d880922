//! Supervision: the broker sleeps on a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP), reaps
//! its children, and decides how the device ends: cleanly (SIGTERM, or the VMM went away and
//! the frontend exited 0) or with an error that names the child that failed.

use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::restart::Restarter;
use crate::spawn::ChildProcess;

/// How long a child may take to be reaped after SIGKILL before the broker gives up on it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit code of the frontend when its renderer went away (see device-frontend).
const FRONTEND_RENDERER_GONE: i32 = device_frontend::EXIT_RENDERER_GONE;
/// Exit code of a child whose seccomp filter trapped (diagnostic mode, see policy).
const SECCOMP_TRAP_EXIT: i32 = 159;
/// Exit code of a child that aborted as init of its own pid namespace (see policy).
const ABORT_EXIT: i32 = policy::namespaces::ABORT_EXIT_CODE;

/// Blocks the signals the broker handles and returns a signalfd for them. Must run before
/// any thread is started, so that every thread inherits the mask.
pub fn signal_fd() -> nix::Result<SignalFd> {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set.thread_block()?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC)
}

/// A child with its role name.
pub struct Managed {
    /// Role name for messages.
    pub role: &'static str,
    /// The process.
    pub child: ChildProcess,
    /// Its exit status once reaped.
    pub status: Option<ExitStatus>,
}

impl Managed {
    /// Wraps a child.
    pub fn new(role: &'static str, child: ChildProcess) -> Self {
        Managed {
            role,
            child,
            status: None,
        }
    }

    fn reap(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }
}

/// Describes an exit status for humans.
pub fn describe(status: ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| format!("signal {sig}"));
        let why = if sig == libc::SIGSYS {
            " (seccomp violation: it made a forbidden system call)"
        } else {
            ""
        };
        return format!("was killed by {name}{why}");
    }
    match status.code() {
        Some(0) => "exited with status 0".into(),
        Some(SECCOMP_TRAP_EXIT) => {
            "exited with status 159 (seccomp violation, reported above)".into()
        }
        Some(ABORT_EXIT) => "exited with status 134 (it aborted)".into(),
        Some(c) => format!("exited with status {c}"),
        None => "ended".into(),
    }
}

/// The broker's children.
pub struct Children {
    /// The device-frontend.
    pub frontend: Managed,
    /// The renderer-worker now serving (replaced after a restart).
    pub renderer: Managed,
    /// The spawner of renderer-workers.
    pub spawner: Managed,
}

impl Children {
    fn all(&mut self) -> [&mut Managed; 3] {
        [&mut self.frontend, &mut self.renderer, &mut self.spawner]
    }

    /// Reaps every child that has exited, the known ones by name and any other (a
    /// renderer the spawner started that failed before the broker knew its pid).
    fn reap(&mut self) {
        loop {
            let mut raw = 0;
            // SAFETY: FFI; `raw` is a live local.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let status = ExitStatus::from_raw(raw);
            match self.all().into_iter().find(|m| m.child.id() == pid as u32) {
                Some(m) => {
                    m.child.set_status(status);
                    m.status.get_or_insert(status);
                }
                None => log::debug!("reaped pid {pid}, {}", describe(status)),
            }
        }
    }
}

/// Supervises the children until the device ends; returns the broker's exit code. A
/// renderer-worker that dies under a live frontend is replaced through `restarter`.
pub fn supervise(sfd: &SignalFd, children: &mut Children, restarter: &mut Restarter) -> i32 {
    loop {
        let sig = match sfd.read_signal() {
            Ok(Some(info)) => info.ssi_signo as i32,
            Ok(None) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                log::error!("reading signals failed: {e}; stopping");
                stop_all(sfd, &mut children.all());
                return 1;
            }
        };
        if sig == libc::SIGCHLD {
            children.reap();
            let (frontend, renderer) = (&mut children.frontend, &mut children.renderer);
            let mut fe = frontend.status;
            let mut re = renderer.status;
            if fe.is_none() && re.is_some_and(|st| st.code() == Some(0)) {
                // The renderer ends cleanly when the frontend closes its channel on the way
                // out; the frontend's own exit may be a moment behind. Wait for it.
                fe = wait_for_exit(sfd, frontend, STOP_TIMEOUT);
                re = renderer.reap();
            }
            let clean = |st: Option<ExitStatus>| st.is_none_or(|st| st.code() == Some(0));
            if fe.is_none() && !clean(re) {
                if replace_renderer(children, restarter) {
                    continue;
                }
                stop_all(sfd, &mut children.all());
                return 1;
            }
            let (frontend, renderer) = (&children.frontend, &children.renderer);
            match (fe, re) {
                (None, None) if children.spawner.status.is_none() => continue,
                (None, None) => {
                    let st = children.spawner.status.unwrap_or(ExitStatus::from_raw(0));
                    log::error!(
                        "spawner (pid {}) {}: no renderer-worker could be restarted; \
                         stopping the device",
                        children.spawner.child.id(),
                        describe(st)
                    );
                    stop_all(sfd, &mut children.all());
                    return 1;
                }
                (Some(st), re) if st.code() == Some(0) && clean(re) => {
                    log::info!("device-frontend finished (VMM disconnected); stopping the device");
                    stop_all(sfd, &mut [&mut children.renderer, &mut children.spawner]);
                    return 0;
                }
                _ => {
                    let culprit = culprit(frontend, fe, renderer, re);
                    log::error!("{culprit}; stopping the device");
                    stop_all(sfd, &mut children.all());
                    return 1;
                }
            }
        }
        let name = Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("signal");
        log::info!("received {name}; stopping the device");
        stop_all(sfd, &mut children.all());
        return 0;
    }
}

/// The renderer died under a live frontend: start another one. False when there is none
/// (the limit, or a failure), with the reason logged.
fn replace_renderer(children: &mut Children, restarter: &mut Restarter) -> bool {
    let old = &children.renderer;
    let what = format!(
        "{} (pid {}) {}",
        old.role,
        old.child.id(),
        old.status.map_or_else(|| "ended".into(), describe)
    );
    match restarter.restart() {
        Ok((child, count)) => {
            log::warn!(
                "{what}; restarted it as pid {} (restart {count} within {}s)",
                child.id(),
                crate::restart::RESTART_WINDOW.as_secs()
            );
            children.renderer = Managed::new(old.role, child);
            true
        }
        Err(why) => {
            log::error!("{what}; not restarting it: {why}; stopping the device");
            false
        }
    }
}

/// Names the child whose exit ended the device. The renderer is named first when it failed:
/// the frontend then follows with EXIT_RENDERER_GONE, and the renderer is the news.
fn culprit(
    frontend: &Managed,
    fe: Option<ExitStatus>,
    renderer: &Managed,
    re: Option<ExitStatus>,
) -> String {
    let frontend_ok = fe.is_none_or(|f| f.code() == Some(0));
    match (re, fe) {
        (Some(st), _) if st.code() != Some(0) || frontend_ok => {
            let mut s = format!(
                "{} (pid {}) {}",
                renderer.role,
                renderer.child.id(),
                describe(st)
            );
            if st.code() == Some(0) {
                s.push_str(" while the device-frontend was still serving");
            }
            s
        }
        (_, Some(st)) => {
            let mut s = format!(
                "{} (pid {}) {}",
                frontend.role,
                frontend.child.id(),
                describe(st)
            );
            if st.code() == Some(FRONTEND_RENDERER_GONE) {
                s.push_str(" after losing the renderer-worker");
            }
            s
        }
        _ => "a child ended".into(),
    }
}

/// Waits (bounded) for one child to exit, reading SIGCHLDs from the signalfd.
fn wait_for_exit(sfd: &SignalFd, m: &mut Managed, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = m.reap() {
            return Some(st);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        wait_signal(sfd, left);
    }
}

/// Sleeps on the signalfd for at most `left` (capped at a second) and drains one signal.
fn wait_signal(sfd: &SignalFd, left: Duration) {
    let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(left.as_millis().min(1000) as i32).unwrap_or(PollTimeout::MAX);
    if let Ok(n) = poll(&mut fds, ms) {
        if n > 0 {
            let _ = sfd.read_signal();
        }
    }
}

/// SIGKILL to every live child, then a bounded wait for their exits.
///
/// Not SIGTERM first: the children keep nothing that needs a graceful exit (their only
/// state is the device's, which ends with them), and as init of their own pid namespaces
/// they would ignore SIGTERM, having no handler for it. SIGKILL from the broker, outside
/// their namespace, is always delivered.
pub fn stop_all(sfd: &SignalFd, children: &mut [&mut Managed]) {
    for m in children.iter_mut() {
        if m.reap().is_none() {
            let _ = m.child.kill();
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while children.iter_mut().any(|m| m.reap().is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for m in children.iter_mut().filter(|m| m.status.is_none()) {
                log::warn!(
                    "{} (pid {}) was not reaped within {STOP_TIMEOUT:?} of SIGKILL",
                    m.role,
                    m.child.id()
                );
            }
            break;
        }
        // SIGCHLD is what we wait for.
        wait_signal(sfd, left);
    }
    for m in children.iter_mut() {
        if let Some(st) = m.status {
            log::debug!("{} (pid {}) {}", m.role, m.child.id(), describe(st));
        }
    }
}
