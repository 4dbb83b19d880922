//! `vgpu-sandbox check-host`: what this host supports of what the sandbox uses or plans to
//! use, one line each, and whether vgpu-sandbox can run here at all.
//!
//! Every probe runs in this (unconfined) process and leaves nothing behind: no filter is
//! installed, no namespace entered by this process. Two processes are started: `qemu-system-x86_64
//! --version`, and one that is cloned into the children's namespaces exactly as a child
//! would be (down to its uid/gid maps) and exits at once, and this binary's `probe-virgl`. Lines read `NAME: ok|missing|unknown: reason`; the exit status is 1 when a
//! requirement (seccomp filter mode, memfd sealing) is missing, else 0.

use std::fs;
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::process::{Command, ExitCode, Stdio};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::ftruncate;
use policy::namespaces::{Namespace, NamespaceError, NamespaceSet, Refusal};

/// The QEMU binary looked for on `PATH`.
const QEMU: &str = "qemu-system-x86_64";

/// `SECCOMP_GET_ACTION_AVAIL` (linux/seccomp.h), an operation of seccomp(2).
const SECCOMP_GET_ACTION_AVAIL: libc::c_uint = 2;
/// `SECCOMP_RET_KILL_PROCESS` (linux/seccomp.h), the action of every filter's violations.
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `SECCOMP_RET_TRAP`, the action of `--seccomp trap`.
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
/// `SECCOMP_RET_LOG`, the action of `--seccomp log`.
const SECCOMP_RET_LOG: u32 = 0x7ffc_0000;

/// How a probe came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ok,
    Missing,
    Unknown,
}

impl State {
    fn word(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Missing => "missing",
            State::Unknown => "unknown",
        }
    }
}

/// One printed line.
struct Check {
    name: &'static str,
    state: State,
    /// vgpu-sandbox does not start without it.
    required: bool,
    reason: String,
}

impl Check {
    fn new(name: &'static str, state: State, reason: impl Into<String>) -> Check {
        Check {
            name,
            state,
            required: false,
            reason: reason.into(),
        }
    }

    fn required(mut self) -> Check {
        self.required = true;
        self
    }

    /// A requirement that is not known to be there.
    fn fails(&self) -> bool {
        self.required && self.state != State::Ok
    }

    fn line(&self) -> String {
        let mut line = format!("{}: {}: {}", self.name, self.state.word(), self.reason);
        if self.fails() {
            line.push_str(" (required: vgpu-sandbox cannot run without it)");
        }
        line
    }
}

/// Runs every probe, prints one line each on stdout, and returns 1 when a requirement is
/// missing (with one more line on stderr naming it). What the serving options given with
/// it ask for (`--virgl`, `--render-node PATH`) is required too: `vgpu-sandbox --virgl
/// check-host` fails where `--virgl` could not start.
pub fn run(asked: &crate::cli::ServeArgs) -> ExitCode {
    let probe = policy::namespaces::probe(NamespaceSet::ALL);
    let mut checks = vec![
        seccomp_filter(),
        seccomp_kill_process(),
        seccomp_log(),
        no_new_privs(),
        namespace(&probe, Namespace::User),
        namespace(&probe, Namespace::Mount),
        namespace(&probe, Namespace::Pid),
        net_ipc_namespaces(&probe),
        memfd_sealing(),
        close_range(),
        pidfd_open(),
        qemu(),
        render_nodes(),
        asked_for(virgl(), asked.virgl),
    ];
    checks.extend(render_node(asked.render_node.as_deref()));
    for check in &checks {
        println!("{}", check.line());
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| c.fails())
        .map(|c| c.name)
        .collect();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "vgpu-sandbox: error: this host lacks {}, which vgpu-sandbox cannot run without",
            failed.join(", ")
        );
        ExitCode::from(1)
    }
}

/// The value of `field` in `/proc/self/status` (`Seccomp`, `NoNewPrivs`, ...).
fn self_status(field: &str) -> Option<String> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == field).then(|| value.trim().to_string())
    })
}

/// seccomp(SECCOMP_GET_ACTION_AVAIL, 0, &action): whether the kernel knows `action`.
fn action_available(action: u32) -> io::Result<()> {
    // SAFETY: FFI. SECCOMP_GET_ACTION_AVAIL only reads one u32 from the pointer, which
    // points at a live local for the duration of the call; it changes no process state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0 as libc::c_uint,
            &action as *const u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn seccomp_filter() -> Check {
    const NAME: &str = "seccomp-filter";
    // PR_GET_SECCOMP: EINVAL without CONFIG_SECCOMP; 0 unfiltered, 2 under a filter (a
    // container runtime's, say: ours stacks on top of it). Mode 1 (strict) cannot reach
    // this line, it would have been killed by the prctl.
    // SAFETY: FFI; PR_GET_SECCOMP takes no pointer and changes nothing.
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode < 0 {
        let e = io::Error::last_os_error();
        return Check::new(NAME, State::Missing, format!("prctl(PR_GET_SECCOMP): {e}")).required();
    }
    let field = self_status("Seccomp").unwrap_or_else(|| "absent".into());
    match action_available(SECCOMP_RET_TRAP) {
        Ok(()) => Check::new(
            NAME,
            State::Ok,
            format!(
                "seccomp(2) filters available (this process: Seccomp {field}); used: each \
                 child installs its role's allowlist on all threads (TSYNC)"
            ),
        ),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Check::new(
            NAME,
            State::Missing,
            "seccomp(2) is ENOSYS (kernel built without CONFIG_SECCOMP_FILTER, or a \
             filter of this process's runtime refuses it)",
        )
        .required(),
        Err(e) => Check::new(
            NAME,
            State::Unknown,
            format!("seccomp(SECCOMP_GET_ACTION_AVAIL): {e}"),
        )
        .required(),
    }
}

fn seccomp_kill_process() -> Check {
    const NAME: &str = "seccomp-kill-process";
    match action_available(SECCOMP_RET_KILL_PROCESS) {
        Ok(()) => Check::new(
            NAME,
            State::Ok,
            "SECCOMP_RET_KILL_PROCESS available; used: a forbidden syscall kills the whole \
             child (the default; --seccomp trap uses SECCOMP_RET_TRAP instead)",
        ),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Check::new(
            NAME,
            State::Missing,
            "the kernel does not know SECCOMP_RET_KILL_PROCESS (Linux < 4.14): a violation \
             would not be handled as intended",
        ),
        Err(e) => Check::new(
            NAME,
            State::Unknown,
            format!("seccomp(SECCOMP_GET_ACTION_AVAIL, KILL_PROCESS): {e}"),
        ),
    }
}

fn seccomp_log() -> Check {
    const NAME: &str = "seccomp-log";
    match action_available(SECCOMP_RET_LOG) {
        Ok(()) => Check::new(
            NAME,
            State::Ok,
            "SECCOMP_RET_LOG available; used only with --seccomp log (development)",
        ),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Check::new(
            NAME,
            State::Missing,
            "the kernel does not know SECCOMP_RET_LOG (Linux < 4.14); only --seccomp log \
             needs it",
        ),
        Err(e) => Check::new(
            NAME,
            State::Unknown,
            format!("seccomp(SECCOMP_GET_ACTION_AVAIL, LOG): {e}"),
        ),
    }
}

fn no_new_privs() -> Check {
    const NAME: &str = "no-new-privs";
    // SAFETY: FFI; PR_GET_NO_NEW_PRIVS takes no pointer and changes nothing.
    let rc = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Check::new(
            NAME,
            State::Missing,
            format!("prctl(PR_GET_NO_NEW_PRIVS): {e}"),
        );
    }
    Check::new(
        NAME,
        State::Ok,
        format!("available (this process: NoNewPrivs {rc}); used: each child sets it"),
    )
}

/// Reads a sysctl as a trimmed string; `None` when the file does not exist.
fn sysctl(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// What a child would get, from [`policy::namespaces::probe`].
type Probe = Result<(NamespaceSet, Vec<Refusal>), NamespaceError>;

/// Why a namespace was refused, for a `missing` line: the probe's refusals, and for the
/// user namespace the sysctls that usually explain it.
fn refusal_reason(ns: Namespace, refused: &[Refusal]) -> String {
    let tried: Vec<String> = refused
        .iter()
        .filter(|r| r.tried.contains(ns))
        .map(|r| format!("{} at {}: {}", r.tried, r.step, r.errno))
        .collect();
    let mut why = format!("refused ({})", tried.join("; "));
    if ns == Namespace::User {
        let hints: Vec<String> = [
            (
                "user.max_user_namespaces",
                "/proc/sys/user/max_user_namespaces",
            ),
            // Debian and Ubuntu kernels: 0 forbids them to unprivileged users.
            (
                "kernel.unprivileged_userns_clone",
                "/proc/sys/kernel/unprivileged_userns_clone",
            ),
            // Ubuntu 23.10+: AppArmor may restrict them even when the above allow them.
            (
                "kernel.apparmor_restrict_unprivileged_userns",
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            ),
        ]
        .into_iter()
        .filter_map(|(name, path)| Some(format!("{name} {}", sysctl(path)?)))
        .collect();
        if !hints.is_empty() {
            why.push_str(&format!("; {}", hints.join(", ")));
        }
    }
    why
}

/// One of the namespaces each child is cloned into, as the probe found it.
fn namespace(probe: &Probe, ns: Namespace) -> Check {
    let name = match ns {
        Namespace::User => "user-namespaces",
        Namespace::Mount => "mount-namespaces",
        Namespace::Pid => "pid-namespaces",
        Namespace::Net | Namespace::Ipc => "net-ipc-namespaces",
    };
    let (used, without) = match ns {
        Namespace::User => (
            "used: each child gets its own (root inside is this user outside), which also \
             lets a broker without CAP_SYS_ADMIN create the others",
            "the children keep the broker's user namespace, and get the other namespaces \
             only where the broker holds CAP_SYS_ADMIN",
        ),
        Namespace::Mount => (
            "used: each child switches to an empty read-only root after its set-up",
            "the children keep the host's file system in view (seccomp still forbids \
             opening anything)",
        ),
        Namespace::Pid => (
            "used: each child is pid 1 of its own pid namespace and sees no other process",
            "the children see the host's processes (seccomp still forbids signalling or \
             tracing them)",
        ),
        Namespace::Net | Namespace::Ipc => (
            "used: each child gets its own network and IPC namespaces",
            "the children share the broker's network and IPC namespaces",
        ),
    };
    match probe {
        Ok((got, _)) if got.contains(ns) => Check::new(
            name,
            State::Ok,
            format!("a child was started in one (tried, as the broker would); {used}"),
        ),
        Ok((_, refused)) => Check::new(
            name,
            State::Missing,
            format!(
                "{}; {without}; the broker logs so at start",
                refusal_reason(ns, refused)
            ),
        ),
        Err(e) => Check::new(name, State::Unknown, format!("probing failed: {e}")),
    }
}

fn net_ipc_namespaces(probe: &Probe) -> Check {
    let kernel: Vec<&str> = ["net", "ipc"]
        .into_iter()
        .filter(|ns| fs::symlink_metadata(format!("/proc/self/ns/{ns}")).is_err())
        .collect();
    if !kernel.is_empty() {
        return Check::new(
            "net-ipc-namespaces",
            State::Missing,
            format!(
                "no /proc/self/ns/{} (kernel without them): the children share the \
                 broker's",
                kernel.join(", /proc/self/ns/")
            ),
        );
    }
    match probe {
        // Both or neither: they are created together.
        Ok((got, refused)) if got.contains(Namespace::Net) != got.contains(Namespace::Ipc) => {
            Check::new(
                "net-ipc-namespaces",
                State::Unknown,
                format!("only one of net and ipc ({got}); {refused:?}"),
            )
        }
        _ => namespace(probe, Namespace::Net),
    }
}

fn memfd_sealing() -> Check {
    const NAME: &str = "memfd-sealing";
    match probe_memfd_sealing() {
        Ok(()) => Check::new(
            NAME,
            State::Ok,
            "memfd_create(MFD_ALLOW_SEALING) and F_SEAL_SHRINK|GROW|SEAL hold; used: every \
             scanout buffer is a sealed memfd",
        )
        .required(),
        Err(why) => Check::new(NAME, State::Missing, why).required(),
    }
}

/// Creates a 4 KiB memfd, seals it as the frontend seals scanout buffers, and checks that
/// the seals read back and that resizing is refused.
fn probe_memfd_sealing() -> Result<(), String> {
    let fd = memfd_create(
        c"vgpu-check-host",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| format!("memfd_create(MFD_ALLOW_SEALING): {e}"))?;
    ftruncate(&fd, 4096).map_err(|e| format!("ftruncate of the memfd: {e}"))?;
    let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(&fd, FcntlArg::F_ADD_SEALS(want)).map_err(|e| format!("F_ADD_SEALS: {e}"))?;
    let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|e| format!("F_GET_SEALS: {e}"))?;
    if seals & want.bits() != want.bits() {
        return Err(format!("F_GET_SEALS reads {seals:#x} after sealing"));
    }
    if ftruncate(fd.as_fd(), 0).is_ok() || ftruncate(fd.as_fd(), 8192).is_ok() {
        return Err("a sealed memfd could still be resized".into());
    }
    Ok(())
}

fn close_range() -> Check {
    const NAME: &str = "close-range";
    // The two highest descriptor numbers, which no process can have open: nothing is
    // closed or changed, only the call and its CLOEXEC flag are tried.
    // SAFETY: FFI; the range holds no open descriptor, so the call has no effect.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            libc::c_uint::MAX - 1,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Check::new(
            NAME,
            State::Ok,
            "close_range(CLOSE_RANGE_CLOEXEC) works; used: the broker marks every stray \
             descriptor close-on-exec before a child starts",
        );
    }
    let e = io::Error::last_os_error();
    Check::new(
        NAME,
        State::Missing,
        format!(
            "close_range(CLOSE_RANGE_CLOEXEC): {e} (Linux < 5.11): a descriptor the broker \
             inherited without FD_CLOEXEC would reach the children"
        ),
    )
}

/// `check` made a requirement when the options asked for what it checks.
fn asked_for(check: Check, asked: bool) -> Check {
    if asked {
        check.required()
    } else {
        check
    }
}

/// `--render-node PATH`, when given: it must be a character device this user can open.
fn render_node(path: Option<&std::path::Path>) -> Option<Check> {
    const NAME: &str = "render-node";
    let path = path?;
    let check = match fs::metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()) => {
            match fs::OpenOptions::new().read(true).write(true).open(path) {
                Ok(_) => Check::new(NAME, State::Ok, format!("{} opens", path.display())),
                Err(e) => Check::new(NAME, State::Missing, format!("{}: {e}", path.display())),
            }
        }
        Ok(_) => Check::new(
            NAME,
            State::Missing,
            format!("{}: not a character device", path.display()),
        ),
        Err(e) => Check::new(NAME, State::Missing, format!("{}: {e}", path.display())),
    };
    Some(check.required())
}

fn pidfd_open() -> Check {
    const NAME: &str = "pidfd-open";
    // SAFETY: FFI; pidfd_open of our own pid returns a new descriptor or fails.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0 as libc::c_uint) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Check::new(
            NAME,
            State::Missing,
            format!(
                "pidfd_open: {e} (Linux < 5.3); used: the spawner watches a replacement \
                 renderer it started for the broker (a renderer restart fails without it)"
            ),
        );
    }
    // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(rc as libc::c_int) });
    Check::new(
        NAME,
        State::Ok,
        "available; used: the spawner watches a replacement renderer it started for the \
         broker until it says hello (the broker reaps it)",
    )
}

fn qemu() -> Check {
    const NAME: &str = "qemu";
    let out = Command::new(QEMU)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let first = text.lines().next().unwrap_or("").trim();
            Check::new(
                NAME,
                State::Ok,
                format!("{QEMU}: {first}; optional (vhost-user-gpu-pci connects to --socket-path)"),
            )
        }
        Ok(out) => Check::new(
            NAME,
            State::Unknown,
            format!("{QEMU} --version exited with {}", out.status),
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Check::new(
            NAME,
            State::Missing,
            format!("{QEMU} not on PATH; optional (any vhost-user VMM will do)"),
        ),
        Err(e) => Check::new(NAME, State::Unknown, format!("running {QEMU}: {e}")),
    }
}

fn virgl() -> Check {
    const NAME: &str = "virgl";
    match crate::virgl_probe::run() {
        Ok(n) => Check::new(
            NAME,
            State::Ok,
            format!("virglrenderer initialises here with {n} capsets; --virgl can be used"),
        ),
        Err(why) => Check::new(
            NAME,
            State::Missing,
            format!("{why}; --virgl cannot be used"),
        ),
    }
}

fn render_nodes() -> Check {
    const NAME: &str = "render-nodes";
    const NOT_USED: &str = "used only with --virgl --render-node (the 2D renderer opens none)";
    let entries = match fs::read_dir("/dev/dri") {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Check::new(NAME, State::Missing, format!("no /dev/dri; {NOT_USED}"))
        }
        Err(e) => return Check::new(NAME, State::Unknown, format!("/dev/dri: {e}; {NOT_USED}")),
    };
    let mut nodes: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("renderD"))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_char_device()))
        .map(|e| e.path().display().to_string())
        .collect();
    nodes.sort();
    if nodes.is_empty() {
        Check::new(
            NAME,
            State::Missing,
            format!("no renderD* in /dev/dri; {NOT_USED}"),
        )
    } else {
        Check::new(NAME, State::Ok, format!("{}; {NOT_USED}", nodes.join(" ")))
    }
}
