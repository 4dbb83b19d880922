//! Starting a child role: re-execute this binary (a fresh address space, never a fork
//! without exec) with the role and the name of a one-shot bootstrap server, in its own
//! namespaces where the host allows them (`policy::namespaces::spawn`: the clone, the
//! fallback and the steps before exec live there), and place the fds it inherits at fixed
//! numbers.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ipc_channel::ipc::IpcOneShotServer;
use nix::errno::Errno;
use policy::namespaces::{self, ExecPlan, NamespaceSet, FIXED_FD_LIMIT};
use protocol::bootstrap::{ChildHello, Role, BOOTSTRAP_FLAG, ROLE_FLAG};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::logger::{LOG_ENV, NAME_ENV};

/// How long a child may take from exec to its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(20);

/// The namespaces the broker asks for, for each child.
pub const WANTED_NAMESPACES: NamespaceSet = NamespaceSet::ALL;

/// A child process of the broker, known by its pid in the broker's pid namespace (the
/// child itself reads 1 there when it has a pid namespace of its own). Not killed on drop.
#[derive(Debug)]
pub struct ChildProcess {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
    /// For a sibling (started by the spawner, reaped by the broker): a pidfd, the only
    /// race-free way for a process that is not the parent to see it exit and signal it.
    pidfd: Option<OwnedFd>,
}

impl ChildProcess {
    /// A child the spawner started as the broker's (see [`Launch::sibling`]): the broker
    /// is its parent and reaps it.
    pub fn adopt(pid: u32) -> Self {
        ChildProcess {
            pid: pid as libc::pid_t,
            status: None,
            pidfd: None,
        }
    }

    /// The pid, as the broker (and the host) sees it.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Its exit status if it has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.wait_with(libc::WNOHANG)
    }

    /// Waits for it to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_with(0)? {
                return Ok(status);
            }
        }
    }

    /// Records a status that a wait for any child returned for this one.
    pub fn set_status(&mut self, status: ExitStatus) {
        self.status.get_or_insert(status);
    }

    /// Whether it has exited (for a sibling, which this process cannot reap: whether its
    /// pidfd says so).
    fn has_exited(&mut self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n > 0)
            }
            None => matches!(self.try_wait(), Ok(Some(_))),
        }
    }

    /// SIGKILL, unless already reaped. Forced even on init of a pid namespace, since the
    /// broker is outside it.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        if let Some(fd) = &self.pidfd {
            // SAFETY: FFI; `fd` is a live pidfd; no pointer arguments (siginfo NULL).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
            return if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            };
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(io::Error::from)
    }

    fn wait_with(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: FFI; `raw` is a live local; `pid` is our child, unreaped until here.
        let r = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
        match r {
            0 => Ok(None),
            r if r == self.pid => {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                Ok(Some(status))
            }
            _ if Errno::last() == Errno::EINTR => Ok(None),
            _ => Err(io::Error::last_os_error()),
        }
    }
}

/// What a child says first over its bootstrap server.
pub trait Hello: Serialize + DeserializeOwned + Send + 'static {
    /// The pid it claims, as the broker sees it.
    fn pid(&self) -> u32;
    /// Whether it claims to be the role named `name`.
    fn is(&self, name: &str) -> bool;
}

impl Hello for ChildHello {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn is(&self, name: &str) -> bool {
        self.role.name() == name
    }
}

/// How to start a child.
pub struct Launch<'a> {
    /// Its role name (command line and messages).
    pub name: &'static str,
    /// Each `(fd, number)` to hand it at that fixed number (every source fd must already
    /// be above the fixed numbers: see [`lift_fd`]).
    pub fds: &'a [(&'a OwnedFd, RawFd)],
    /// Its log level.
    pub log_level: log::LevelFilter,
    /// `--seccomp` mode for its filter, if not the default.
    pub seccomp: Option<&'a str>,
    /// The namespaces to ask for (it gets what the host allows of them).
    pub namespaces: NamespaceSet,
    /// Start it as this process's sibling (the spawner starting a renderer for the broker).
    pub sibling: bool,
}

impl<'a> Launch<'a> {
    /// A child role in [`WANTED_NAMESPACES`], this process's own child.
    pub fn role(
        role: Role,
        fds: &'a [(&'a OwnedFd, RawFd)],
        log_level: log::LevelFilter,
        seccomp: Option<&'a str>,
    ) -> Self {
        Launch {
            name: role.name(),
            fds,
            log_level,
            seccomp,
            namespaces: WANTED_NAMESPACES,
            sibling: false,
        }
    }
}

/// A started child and its bootstrap hello.
pub struct Spawned<H = ChildHello> {
    /// The process.
    pub child: ChildProcess,
    /// What it said first.
    pub hello: H,
    /// Which namespaces it has of its own and which it shares, for the log.
    pub namespaces: String,
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
    /// Creating the process (in its namespaces) failed.
    #[error("starting the {role}: {source}")]
    Namespaces {
        /// Which role.
        role: &'static str,
        /// What failed.
        source: namespaces::NamespaceError,
    },
    /// The child died before saying hello.
    #[error("the {role} exited during start-up ({status})")]
    DiedEarly {
        /// Which role.
        role: &'static str,
        /// Its exit status, as far as this process can know it.
        status: String,
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
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIXED_FD_LIMIT)).map(
            |raw| {
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
            },
        )?,
    )
}

/// Starts the child `launch` describes; its hello is awaited by [`Pending::wait`], so
/// that several children can start at once.
///
/// Call it from the thread that lives as long as the broker: the child's parent-death
/// signal is tied to it.
pub fn launch<H: Hello>(launch: &Launch<'_>) -> Result<Pending<H>, SpawnError> {
    let name = launch.name;
    let io_err = |err| SpawnError::Io { role: name, err };
    let (server, server_name) = IpcOneShotServer::<H>::new().map_err(io_err)?;
    let dev_null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(io_err)?;
    let dev_null = lift_fd(dev_null.into()).map_err(io_err)?;
    let mut inherited: Vec<_> = launch.fds.iter().map(|(fd, n)| (fd.as_fd(), *n)).collect();
    // stdin and stdout are /dev/null; stderr (the log) is the broker's.
    inherited.extend([(dev_null.as_fd(), 0), (dev_null.as_fd(), 1)]);

    let cstring = |bytes: Vec<u8>| CString::new(bytes).map_err(|e| io_err(e.into()));
    let args = [
        "vgpu-sandbox",
        ROLE_FLAG,
        name,
        BOOTSTRAP_FLAG,
        server_name.as_str(),
    ]
    .into_iter()
    .map(|a| cstring(a.as_bytes().to_vec()))
    .collect::<Result<Vec<_>, _>>()?;
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        // RUST_LOG is not among them: the children apply it as the broker does.
        if key == LOG_ENV || key == NAME_ENV || key == policy::SECCOMP_ENV {
            continue;
        }
        let mut entry = key;
        entry.push("=");
        entry.push(value);
        env.push(cstring(entry.into_vec())?);
    }
    env.push(cstring(
        format!("{LOG_ENV}={}", launch.log_level).into_bytes(),
    )?);
    // The spawner passes on what the broker gave it, so renderers started later log
    // under the same name.
    let vm_name = crate::logger::name()
        .map(str::to_owned)
        .unwrap_or_else(crate::logger::name_from_env);
    env.push(cstring(format!("{NAME_ENV}={vm_name}").into_bytes())?);
    if let Some(mode) = launch.seccomp {
        env.push(cstring(
            format!("{}={mode}", policy::SECCOMP_ENV).into_bytes(),
        )?);
    }

    let started = namespaces::spawn(
        launch.namespaces,
        &ExecPlan {
            program: c"/proc/self/exe",
            args: &args,
            env: &env,
            fds: &inherited,
            sibling: launch.sibling,
        },
    )
    .map_err(|source| SpawnError::Namespaces { role: name, source })?;
    drop(dev_null);
    let pidfd = if launch.sibling {
        Some(pidfd_open(started.pid).map_err(io_err)?)
    } else {
        None
    };
    let mut child = ChildProcess {
        pid: started.pid,
        status: None,
        pidfd,
    };
    log::debug!(
        "started {name} as pid {} in {} namespace(s)",
        child.id(),
        started.namespaces
    );

    let (tx, rx) = mpsc::channel();
    if let Err(e) = std::thread::Builder::new()
        .name(format!("accept-{name}"))
        .spawn(move || {
            let _ = tx.send(server.accept());
        })
    {
        kill_and_reap(&mut child);
        return Err(io_err(e));
    }
    Ok(Pending {
        name,
        child: Some(child),
        hello: rx,
        deadline: Instant::now() + HELLO_TIMEOUT,
        wanted: launch.namespaces,
        refused: started.refused,
    })
}

/// What a child's bootstrap server thread hands back: the hello, or why there is none.
type HelloResult<H> = Result<(ipc_channel::ipc::IpcReceiver<H>, H), ipc_channel::IpcError>;

/// A child started by [`launch`] that has not said hello yet. Killed (and, if this
/// process's child, reaped) when dropped before [`Pending::wait`].
pub struct Pending<H: Hello> {
    name: &'static str,
    child: Option<ChildProcess>,
    hello: mpsc::Receiver<HelloResult<H>>,
    deadline: Instant,
    wanted: NamespaceSet,
    refused: Vec<namespaces::Refusal>,
}

impl<H: Hello> Drop for Pending<H> {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

/// Starts the child `launch` describes and waits (bounded) for its hello.
///
/// Call it from the thread that lives as long as the broker: the child's parent-death
/// signal is tied to it.
pub fn spawn<H: Hello>(launch: &Launch<'_>) -> Result<Spawned<H>, SpawnError> {
    self::launch::<H>(launch)?.wait()
}

impl<H: Hello> Pending<H> {
    /// Waits (bounded by [`HELLO_TIMEOUT`] from the launch) for the child's hello and
    /// checks it.
    pub fn wait(mut self) -> Result<Spawned<H>, SpawnError> {
        let name = self.name;
        let hello = loop {
            let failure = match self.hello.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok((_rx, hello))) => break hello,
                Ok(Err(e)) => SpawnError::BadHello {
                    role: name,
                    why: format!("{e:?}"),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let Some(child) = self.child.as_mut() else {
                        unreachable_child(name)
                    };
                    if child.has_exited() {
                        let status = match child.try_wait() {
                            Ok(Some(status)) => crate::supervise::describe(status),
                            // A sibling: the broker reaps it and logs how it ended.
                            _ => "it ended".into(),
                        };
                        SpawnError::DiedEarly { role: name, status }
                    } else if Instant::now() >= self.deadline {
                        SpawnError::Timeout {
                            role: name,
                            timeout: HELLO_TIMEOUT,
                        }
                    } else {
                        continue;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => SpawnError::BadHello {
                    role: name,
                    why: "bootstrap server thread ended".into(),
                },
            };
            // Dropping `self` kills the child.
            return Err(failure);
        };
        let Some(child) = self.child.take() else {
            unreachable_child(name)
        };
        if !hello.is(name) || hello.pid() != child.id() {
            self.child = Some(child);
            return Err(SpawnError::BadHello {
                role: name,
                why: format!(
                    "claims to be another role or pid {}, started as pid {}",
                    hello.pid(),
                    self.child.as_ref().map_or(0, ChildProcess::id)
                ),
            });
        }
        // Read from /proc rather than taken from the clone flags: what the child really has.
        let namespaces = namespaces::describe(
            namespaces::own_namespaces_of(child.id()),
            self.wanted,
            &self.refused,
        );
        Ok(Spawned {
            child,
            hello,
            namespaces,
        })
    }
}

/// `Pending::child` is only taken by `wait`, which consumes the value.
fn unreachable_child(name: &str) -> ! {
    unreachable!("the pending {name} has no child")
}

/// SIGKILL and wait; used on start-up failures where nothing is worth waiting for. (A
/// sibling is only killed: the broker reaps it.)
pub fn kill_and_reap(child: &mut ChildProcess) {
    let _ = child.kill();
    if child.pidfd.is_none() {
        let _ = child.wait();
    }
}

/// A pidfd for `pid` (Linux 5.3).
fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: FFI without pointer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}
