//! Spawning and supervising the real `vgpu-sandbox` binary (broker + its two children).

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::virtqueue::wait_readable;
use crate::vmm::{TestVmm, VmmError, VmmOptions};

/// Env var that overrides where the binary is.
pub const BIN_ENV: &str = "VGPU_SANDBOX_BIN";
/// The line the broker prints once both children are up.
pub const READY_LINE: &str = "ready: serving on";
/// The broker's last set-up line: after the ready line it starts the spawner, then jails
/// itself. Until then a process list may show the spawner half-started (forked, not yet
/// executed), under the broker's command line.
pub const SETTLED_LINE: &str = "broker: seccomp filter installed";
/// Default bound on start-up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the stack harness.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// No binary to run.
    #[error("vgpu-sandbox binary not found at {0}; run `cargo build -p vgpu-sandbox` first (or set {BIN_ENV})")]
    BinaryMissing(PathBuf),
    /// Spawning failed.
    #[error("cannot spawn {bin}: {source}")]
    Spawn {
        /// Binary.
        bin: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A bounded wait ran out.
    #[error("{what} within {timeout:?}; vgpu-sandbox output so far:\n{log}")]
    Timeout {
        /// What did not happen.
        what: String,
        /// The bound.
        timeout: Duration,
        /// Captured output.
        log: String,
    },
    /// The broker exited when it should not have.
    #[error("vgpu-sandbox exited ({status}) {when}; output:\n{log}")]
    Exited {
        /// Exit status.
        status: String,
        /// While doing what.
        when: String,
        /// Captured output.
        log: String,
    },
    /// Other OS errors.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The role a process plays.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The binary the user started.
    Broker,
    /// `--internal-role device-frontend`.
    DeviceFrontend,
    /// `--internal-role renderer-worker`.
    RendererWorker,
    /// `--internal-role spawner`: starts the renderer-workers for the broker.
    Spawner,
    /// Something else (role string from the command line, or "unknown").
    Other(String),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Broker => f.write_str("broker"),
            Role::DeviceFrontend => f.write_str("device-frontend"),
            Role::RendererWorker => f.write_str("renderer-worker"),
            Role::Spawner => f.write_str("spawner"),
            Role::Other(s) => f.write_str(s),
        }
    }
}

/// A process of the stack, from /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    /// pid.
    pub pid: i32,
    /// Parent pid.
    pub ppid: i32,
    /// Role.
    pub role: Role,
    /// Start time in clock ticks since boot (guards against pid reuse).
    pub starttime: u64,
    /// One-letter state (R, S, Z, ...).
    pub state: char,
}

/// Makes `fd` (of this process) appear as descriptor `at`, without FD_CLOEXEC, in the
/// child that `cmd` starts (how a manager hands a backend a socket: `--fd`, QEMU's
/// `-chardev socket,fd=N`). `fd` must stay open until the child has been spawned.
pub fn inherit_fd(cmd: &mut std::process::Command, fd: std::os::fd::RawFd, at: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (dup2, fcntl) on descriptor numbers; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if fd == at {
                // dup2 onto itself keeps FD_CLOEXEC: clear it explicitly.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, at) < 0 {
                // The descriptor dup2 creates has FD_CLOEXEC cleared.
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads /proc/<pid>/stat: (state, ppid, starttime).
fn read_stat(pid: i32) -> Option<(char, i32, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may itself contain ") "; fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    // starttime is field 22 of stat; field 3 (state) is index 0 here.
    let starttime = fields.get(19)?.parse().ok()?;
    Some((state, ppid, starttime))
}

fn role_of(pid: i32) -> Role {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return Role::Other("unknown".into());
    };
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut role = None;
    for (i, a) in args.iter().enumerate() {
        if a == "--internal-role" {
            role = args.get(i + 1).cloned();
        } else if let Some(r) = a.strip_prefix("--internal-role=") {
            role = Some(r.to_string());
        }
    }
    match role.as_deref() {
        Some("device-frontend") => Role::DeviceFrontend,
        Some("renderer-worker") => Role::RendererWorker,
        Some("spawner") => Role::Spawner,
        Some(other) => Role::Other(other.to_string()),
        None => Role::Other("unknown".into()),
    }
}

/// All processes whose parent is `ppid`.
pub fn children_of(ppid: i32) -> Vec<ProcessInfo> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((state, parent, starttime)) = read_stat(pid) {
            if parent == ppid {
                out.push(ProcessInfo {
                    pid,
                    ppid: parent,
                    role: role_of(pid),
                    starttime,
                    state,
                });
            }
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// Whether the process is still alive (same start time, not a zombie).
pub fn is_alive(p: &ProcessInfo) -> bool {
    matches!(read_stat(p.pid), Some((state, _, st)) if st == p.starttime && state != 'Z' && state != 'X')
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits (bounded) until the process exits; true if it did. Uses a pidfd, no polling loop.
pub fn wait_gone(p: &ProcessInfo, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let Some(fd) = pidfd_open(p.pid) else {
        // ESRCH: already gone (and reaped).
        return true;
    };
    // The pid might have been reused between the scan and pidfd_open.
    if !is_alive(p) {
        return true;
    }
    loop {
        let now = Instant::now();
        if now >= deadline {
            return !is_alive(p);
        }
        if let Ok(true) = wait_readable(fd.as_fd(), deadline - now) {
            return true;
        }
    }
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    open_streams: usize,
}

struct Log {
    state: Mutex<LogState>,
    cond: Condvar,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn text(&self) -> String {
        let st = self.lock();
        let skip = st.lines.len().saturating_sub(200);
        st.lines[skip..].join("\n")
    }
}

fn spawn_reader(
    log: Arc<Log>,
    stream: impl Read + Send + 'static,
    prefix: &'static str,
    echo: bool,
) -> std::io::Result<()> {
    log.lock().open_streams += 1;
    std::thread::Builder::new()
        .name(format!("vgpu-sandbox-{prefix}"))
        .spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if echo {
                    // Captured by the test harness; shown only when a test fails.
                    eprintln!("[vgpu-sandbox {prefix}] {line}");
                }
                let mut st = log.lock();
                st.lines.push(if prefix == "stderr" {
                    line
                } else {
                    format!("[{prefix}] {line}")
                });
                log.cond.notify_all();
            }
            log.lock().open_streams -= 1;
            log.cond.notify_all();
        })?;
    Ok(())
}

/// Where the binary is: `$VGPU_SANDBOX_BIN`, else `target/<profile>/vgpu-sandbox` next to
/// the running test executable (`target/<profile>/deps/<test>`).
pub fn default_binary() -> Result<PathBuf, StackError> {
    if let Some(p) = std::env::var_os(BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(StackError::BinaryMissing(p))
        };
    }
    let exe = std::env::current_exe().map_err(|source| StackError::Io {
        what: "current_exe".into(),
        source,
    })?;
    let candidates = [
        exe.parent()
            .and_then(Path::parent)
            .map(|d| d.join("vgpu-sandbox")),
        exe.parent().map(|d| d.join("vgpu-sandbox")),
    ];
    for c in candidates.iter().flatten() {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(StackError::BinaryMissing(
        candidates[0]
            .clone()
            .unwrap_or_else(|| PathBuf::from("vgpu-sandbox")),
    ))
}

/// A running vgpu-sandbox. Dropping it SIGKILLs every process of the stack.
pub struct Stack {
    child: Child,
    pid: i32,
    // Kept for its Drop, which removes the socket directory.
    _dir: tempfile::TempDir,
    socket: PathBuf,
    log: Arc<Log>,
    known: Vec<ProcessInfo>,
    status: Option<ExitStatus>,
    /// The broker's set-up is over ([`SETTLED_LINE`]), or it never will be.
    settled: bool,
}

impl Stack {
    /// Starts the binary from [`default_binary`] with `--socket-path <tmp>/vgpu.sock` + `args`
    /// and waits (bounded) for its ready line. Its output is echoed to the test's stderr.
    pub fn start(args: &[&str]) -> Result<Stack, StackError> {
        Self::start_with(&default_binary()?, args, true)
    }

    /// Like [`Stack::start`] with an explicit binary; `echo` copies its output to stderr.
    pub fn start_with(bin: &Path, args: &[&str], echo: bool) -> Result<Stack, StackError> {
        if !bin.is_file() {
            return Err(StackError::BinaryMissing(bin.to_path_buf()));
        }
        let dir = tempfile::Builder::new()
            .prefix("vgpu-sandbox-test")
            .tempdir()
            .map_err(|source| StackError::Io {
                what: "tempdir".into(),
                source,
            })?;
        let socket = dir.path().join("vgpu.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("--socket-path").arg(&socket).args(args);
        Self::start_command(cmd, dir, socket, echo)
    }

    /// Starts a prepared command line of the binary (e.g. one that hands it an inherited
    /// listening fd with `--fd N` via `pre_exec`) and waits (bounded) for its ready line.
    /// `socket` is where a VMM connects ([`Stack::connect`]); `dir` is removed on drop.
    /// Stdin becomes /dev/null; stdout and stderr are captured as by [`Stack::start`].
    pub fn start_command(
        mut cmd: Command,
        dir: tempfile::TempDir,
        socket: PathBuf,
        echo: bool,
    ) -> Result<Stack, StackError> {
        let bin = PathBuf::from(cmd.get_program());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| StackError::Spawn { bin, source })?;
        let log = Arc::new(Log {
            state: Mutex::new(LogState::default()),
            cond: Condvar::new(),
        });
        let io = |source| StackError::Io {
            what: "output reader thread".into(),
            source,
        };
        if let Some(err) = child.stderr.take() {
            spawn_reader(log.clone(), err, "stderr", echo).map_err(io)?;
        }
        if let Some(out) = child.stdout.take() {
            spawn_reader(log.clone(), out, "stdout", echo).map_err(io)?;
        }
        let pid = child.id() as i32;
        let mut stack = Stack {
            child,
            pid,
            _dir: dir,
            socket,
            log,
            known: Vec::new(),
            status: None,
            settled: false,
        };
        stack.wait_for_log(READY_LINE, START_TIMEOUT)?;
        stack.known = stack.scan();
        Ok(stack)
    }

    /// The vhost-user socket path.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The broker's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Connects a test VMM with default options.
    pub fn connect(&self) -> Result<TestVmm, VmmError> {
        TestVmm::connect(&self.socket)
    }

    /// Connects a test VMM with the given options.
    pub fn connect_with(&self, opts: &VmmOptions) -> Result<TestVmm, VmmError> {
        TestVmm::connect_with(&self.socket, opts)
    }

    /// The broker and its live children, with roles (children from /proc, ppid == broker),
    /// once the broker has finished its set-up (bounded wait; at once if it has exited).
    pub fn processes(&mut self) -> Vec<ProcessInfo> {
        if !self.settled {
            // An Err means it exited or never settles; the list says what there is.
            let _ = self.wait_for_log(SETTLED_LINE, START_TIMEOUT);
            self.settled = true;
        }
        self.scan()
    }

    fn scan(&mut self) -> Vec<ProcessInfo> {
        let mut out = Vec::new();
        if let Some((state, ppid, starttime)) = read_stat(self.pid) {
            out.push(ProcessInfo {
                pid: self.pid,
                ppid,
                role: Role::Broker,
                starttime,
                state,
            });
        }
        let kids = children_of(self.pid);
        for k in &kids {
            if !self
                .known
                .iter()
                .any(|p| p.pid == k.pid && p.starttime == k.starttime)
            {
                self.known.push(k.clone());
            }
        }
        out.extend(kids);
        out
    }

    /// The live child with this role, if exactly one.
    pub fn child_with_role(&mut self, role: &Role) -> Option<ProcessInfo> {
        let mut v: Vec<_> = self
            .processes()
            .into_iter()
            .filter(|p| &p.role == role)
            .collect();
        if v.len() == 1 {
            v.pop()
        } else {
            None
        }
    }

    /// The live child with this role; panics, listing the processes, unless there is
    /// exactly one.
    #[track_caller]
    pub fn expect_child(&mut self, role: &Role) -> ProcessInfo {
        match self.child_with_role(role) {
            Some(p) => p,
            None => panic!("no single {role} among {:#?}", self.processes()),
        }
    }

    /// Every process ever seen as part of this stack (broker excluded).
    pub fn known_children(&self) -> &[ProcessInfo] {
        &self.known
    }

    /// Captured output lines (stderr as-is, stdout prefixed "[stdout]").
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().lines.clone()
    }

    /// The last 200 output lines, joined, for failure messages.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// Waits (bounded) for an output line containing `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<String, StackError> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits (bounded) until `count` output lines contain `needle`; returns the last of
    /// them.
    pub fn wait_for_log_count(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<String, StackError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.log.lock();
        loop {
            let mut matching = st.lines.iter().filter(|l| l.contains(needle));
            if let Some(l) = matching.nth(count.saturating_sub(1)) {
                return Ok(l.clone());
            }
            let now = Instant::now();
            if st.open_streams == 0 || now >= deadline {
                drop(st);
                let what = format!("fewer than {count} output line(s) containing {needle:?}");
                return Err(StackError::Timeout {
                    what: if self.log.lock().open_streams == 0 {
                        format!("{what} (its output was closed: it exited)")
                    } else {
                        what
                    },
                    timeout,
                    log: self.log.text(),
                });
            }
            st = self
                .log
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Sends `sig` to the broker.
    pub fn signal(&self, sig: Signal) -> Result<(), StackError> {
        kill(Pid::from_raw(self.pid), sig).map_err(|e| StackError::Io {
            what: format!("kill({}, {sig})", self.pid),
            source: e.into(),
        })
    }

    /// Sends `sig` to a process of the stack (checked against pid reuse).
    pub fn signal_process(&self, p: &ProcessInfo, sig: Signal) -> Result<(), StackError> {
        if !is_alive(p) {
            return Err(StackError::Io {
                what: format!("{} (pid {}) is not alive", p.role, p.pid),
                source: std::io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        kill(Pid::from_raw(p.pid), sig).map_err(|e| StackError::Io {
            what: format!("kill({}, {sig})", p.pid),
            source: e.into(),
        })
    }

    /// Waits (bounded) for the broker to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, StackError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let deadline = Instant::now() + timeout;
        let fd = pidfd_open(self.pid);
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.status = Some(s);
                    return Ok(s);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(StackError::Io {
                        what: "waitpid".into(),
                        source,
                    })
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StackError::Timeout {
                    what: format!("vgpu-sandbox (pid {}) did not exit", self.pid),
                    timeout,
                    log: self.log_text(),
                });
            }
            match &fd {
                Some(fd) => {
                    // Readable once the broker has exited; then try_wait reaps it.
                    let _ = wait_readable(fd.as_fd(), deadline - now);
                }
                None => {
                    // pidfd_open only fails for a pid that is gone: try_wait will reap it.
                }
            }
        }
    }

    /// SIGTERM, then wait (bounded) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, StackError> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(timeout)
    }

    /// Waits (bounded) until no known process of the stack is alive; returns the ones
    /// still alive at the deadline (empty is success).
    pub fn wait_all_gone(&mut self, timeout: Duration) -> Vec<ProcessInfo> {
        let deadline = Instant::now() + timeout;
        // Pick up children that appeared since start (e.g. a restarted renderer).
        if self.status.is_none() {
            let _ = self.processes();
        }
        let mut left = Vec::new();
        for p in &self.known {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !wait_gone(p, remaining) {
                left.push(p.clone());
            }
        }
        left
    }

    /// The exit status, if the broker has been reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.status
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.processes();
        }
        for p in &self.known {
            if is_alive(p) {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
