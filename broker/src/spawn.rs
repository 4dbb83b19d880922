//! Starting a child role: re-execute this binary (a fresh address space, never a fork
//! without exec) with the role and the name of a one-shot bootstrap server, and place the
//! fds it inherits at fixed numbers.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipc_channel::ipc::IpcOneShotServer;
use protocol::bootstrap::{ChildHello, Role, BOOTSTRAP_FLAG, ROLE_FLAG};

use crate::logger::LOG_ENV;

/// How long a child may take from exec to its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

/// A started child and its bootstrap hello.
pub struct Spawned {
    /// The process.
    pub child: Child,
    /// What it said first.
    pub hello: ChildHello,
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Creating the bootstrap server or spawning failed.
    #[error("starting the {role}: {err}")]
    Io {
        /// Which role.
        role: &'static str,
        /// What failed.
        err: io::Error,
    },
    /// The child died before saying hello.
    #[error("the {role} exited during start-up ({status})")]
    DiedEarly {
        /// Which role.
        role: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The child did not connect in time.
    #[error("the {role} did not connect to the broker within {timeout:?}")]
    Timeout {
        /// Which role.
        role: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The hello was malformed or from the wrong role.
    #[error("the {role} sent a bad hello: {why}")]
    BadHello {
        /// Which role.
        role: &'static str,
        /// What was wrong.
        why: String,
    },
}

/// Moves `fd` to a number above the fixed child slots so the dup2s in the child cannot
/// clobber one another.
pub fn lift_fd(fd: OwnedFd) -> io::Result<OwnedFd> {
    Ok(
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(16)).map(|raw| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        })?,
    )
}

/// Most fds a child inherits at fixed numbers.
const MAX_INHERITED: usize = 4;

/// Spawns `role`, handing it each `(fd, number)` of `fds` at that fixed number (every
/// source fd must already be above the fixed numbers: see [`lift_fd`]).
pub fn spawn(
    role: Role,
    fds: &[(&OwnedFd, RawFd)],
    log_level: log::LevelFilter,
    seccomp: Option<&str>,
) -> Result<Spawned, SpawnError> {
    let name = role.name();
    let io_err = |err| SpawnError::Io { role: name, err };
    let (server, server_name) = IpcOneShotServer::<ChildHello>::new().map_err(io_err)?;
    if fds.len() > MAX_INHERITED {
        return Err(io_err(io::Error::other("too many inherited fds")));
    }
    // A fixed-size copy: the pre_exec closure must not allocate.
    let mut moves = [(-1 as RawFd, -1 as RawFd); MAX_INHERITED];
    for (slot, (fd, number)) in moves.iter_mut().zip(fds) {
        *slot = (fd.as_raw_fd(), *number);
    }
    let first_free = fds.iter().map(|(_, n)| *n).max().unwrap_or(2) + 1;
    let broker_pid = nix::unistd::getpid();

    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("vgpu-sandbox")
        .args([ROLE_FLAG, name, BOOTSTRAP_FLAG, &server_name])
        .env(LOG_ENV, log_level.to_string())
        .envs(seccomp.map(|mode| (policy::SECCOMP_ENV, mode)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (dup2, prctl, getppid, sigprocmask, close_range, unshare, _exit); it
    // allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            for &(src, dst) in moves.iter().filter(|(src, _)| *src >= 0) {
                if libc::dup2(src, dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // No orphan, ever: the child dies with the broker.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != broker_pid.as_raw() {
                libc::_exit(1);
            }
            // The broker blocks signals to read them from a signalfd; the child must not
            // inherit that mask.
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Anything else this process happened to have open must not reach the child.
            libc::syscall(
                libc::SYS_close_range,
                first_free as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            // Own network and System V IPC namespaces: no interface but a down loopback,
            // no shared IPC objects. Unix sockets by path (the bootstrap server) still
            // work. Where the host does not allow it the child keeps the broker's, and
            // the broker logs which it got (`namespaces_of`).
            libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWIPC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(io_err)?;
    log::debug!("started {name} as pid {}", child.id());

    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("accept-{name}"))
        .spawn(move || {
            let _ = tx.send(server.accept());
        })
        .map_err(io_err)?;
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let hello = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok((_rx, hello))) => break hello,
            Ok(Err(e)) => {
                kill_and_reap(&mut child);
                return Err(SpawnError::BadHello {
                    role: name,
                    why: format!("{e:?}"),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(SpawnError::DiedEarly { role: name, status });
                }
                if Instant::now() >= deadline {
                    kill_and_reap(&mut child);
                    return Err(SpawnError::Timeout {
                        role: name,
                        timeout: HELLO_TIMEOUT,
                    });
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                kill_and_reap(&mut child);
                return Err(SpawnError::BadHello {
                    role: name,
                    why: "bootstrap server thread ended".into(),
                });
            }
        }
    };
    if hello.role != role || hello.pid != child.id() {
        kill_and_reap(&mut child);
        return Err(SpawnError::BadHello {
            role: name,
            why: format!(
                "claims to be {:?} pid {}, started as pid {}",
                hello.role,
                hello.pid,
                child.id()
            ),
        });
    }
    Ok(Spawned { child, hello })
}

/// Which of the broker's namespaces `pid` left, for the log: e.g. "own net, own ipc" or
/// "shares the broker's net and ipc (the host refused new namespaces)".
pub fn namespaces_of(pid: u32) -> String {
    let differs = |ns: &str| {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        matches!((mine, theirs), (Ok(a), Ok(b)) if a != b)
    };
    let own: Vec<&str> = ["net", "ipc"]
        .into_iter()
        .filter(|ns| differs(ns))
        .collect();
    if own.is_empty() {
        "shares the broker's net and ipc namespaces (the host refused new ones)".into()
    } else {
        format!("own {} namespace(s)", own.join(" and "))
    }
}

/// SIGKILL and wait; used on start-up failures where nothing is worth waiting for.
pub fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
