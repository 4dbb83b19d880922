//! The children's namespaces, in one place: which ones they get, how the broker creates
//! them, what happens when the host refuses some, and the empty root each child switches
//! to once its set-up no longer needs the file system.
//!
//! A child's life, in order:
//!
//! 1. **Clone** ([`spawn`], in the broker): the child is created straight into new user,
//!    mount, pid, net and ipc namespaces by `clone(2)`. (`unshare` would not do for the
//!    pid namespace: it moves only the caller's future children.) Between clone and exec
//!    the child writes its uid and gid maps (`setgroups` denied; root inside is the
//!    broker's user outside, a single id), sets its parent-death signal, places its
//!    descriptors at fixed numbers and executes `/proc/self/exe`. It is pid 1 of its pid
//!    namespace; the broker knows it by its pid outside.
//! 2. **Bootstrap**: it connects to the broker's one-shot server by a path under /tmp.
//! 3. **Set-up**: everything that still reads files (glibc's malloc warm-up, rutabaga's
//!    auxiliary vector, thread start-up).
//! 4. **Empty root** ([`enter_empty_root`]): an empty read-only tmpfs becomes its root and
//!    the host's tree is detached, so no path resolves to anything of the host.
//! 5. **Harden** ([`crate::harden_process`]): no capability is left, in any namespace.
//! 6. **Seccomp** ([`crate::install_seccomp`]): mount, pivot_root and friends were needed
//!    only in step 4, so the filters allow none of them.
//!
//! **Fallback.** Where the host refuses a namespace (user namespaces disabled by a sysctl,
//! a container runtime's seccomp profile, no `CAP_SYS_ADMIN` without a user namespace),
//! [`spawn`] walks down [`LADDER`] and starts the child with the first set the host
//! allows, down to none at all; the broker logs which each child got and what was refused
//! ([`describe`]). A child without its own mount namespace keeps the host's root (and
//! says so); seccomp still keeps it from opening anything.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

/// The environment variable through which the broker tells a child which namespaces it was
/// given (and which mount namespace is the broker's, so that a child can never pivot the
/// broker's root): e.g. `user,mount,pid,net,ipc;broker-mnt=4026531841`.
pub const NAMESPACES_ENV: &str = "VGPU_SANDBOX_NAMESPACES";

/// The fixed numbers a child's inherited descriptors are placed at must be below this;
/// their sources, and the spawn's own report pipe, live at or above it, so that placing
/// one can never overwrite another.
pub const FIXED_FD_LIMIT: RawFd = 16;

/// Where the empty root is mounted before it becomes `/`: a directory that exists on every
/// host this runs on (the child was just executed as `/proc/self/exe`). The tmpfs covers
/// it only in the child's own mount namespace.
const EMPTY_ROOT_MOUNT_POINT: &CStr = c"/proc";

/// Exit status of a child that aborted as init of its own pid namespace (128 + SIGABRT, as
/// a shell reports a death by SIGABRT).
pub const ABORT_EXIT_CODE: i32 = 128 + libc::SIGABRT;

/// One kind of namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// Its own user namespace: capabilities there are worth nothing outside, and it lets an
    /// unprivileged broker create the others.
    User,
    /// Its own mount namespace, whose root becomes an empty tmpfs.
    Mount,
    /// Its own pid namespace: it is pid 1 and sees no other process.
    Pid,
    /// Its own network namespace: a down loopback, no interface.
    Net,
    /// Its own System V IPC namespace: no shared IPC objects.
    Ipc,
}

impl Namespace {
    /// Every kind, in the order they are named.
    pub const ALL: [Namespace; 5] = [
        Namespace::User,
        Namespace::Mount,
        Namespace::Pid,
        Namespace::Net,
        Namespace::Ipc,
    ];

    /// The name in logs and in [`NAMESPACES_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Namespace::User => "user",
            Namespace::Mount => "mount",
            Namespace::Pid => "pid",
            Namespace::Net => "net",
            Namespace::Ipc => "ipc",
        }
    }

    /// The name of its link in `/proc/PID/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            Namespace::Mount => "mnt",
            other => other.name(),
        }
    }

    const fn bit(self) -> u8 {
        match self {
            Namespace::User => 1,
            Namespace::Mount => 2,
            Namespace::Pid => 4,
            Namespace::Net => 8,
            Namespace::Ipc => 16,
        }
    }

    fn clone_flag(self) -> libc::c_int {
        match self {
            Namespace::User => libc::CLONE_NEWUSER,
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::Net => libc::CLONE_NEWNET,
            Namespace::Ipc => libc::CLONE_NEWIPC,
        }
    }
}

/// A set of [`Namespace`]s. Displays as e.g. `user, mount and pid` (or `none`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NamespaceSet(u8);

impl NamespaceSet {
    /// No namespace of its own.
    pub const NONE: NamespaceSet = NamespaceSet(0);
    /// Every kind: what the broker asks for.
    pub const ALL: NamespaceSet = NamespaceSet(31);

    /// Whether `ns` is in the set.
    pub fn contains(self, ns: Namespace) -> bool {
        self.0 & ns.bit() != 0
    }

    /// The set with `ns` added.
    pub const fn with(self, ns: Namespace) -> NamespaceSet {
        NamespaceSet(self.0 | ns.bit())
    }

    /// The set without `ns`.
    pub const fn without(self, ns: Namespace) -> NamespaceSet {
        NamespaceSet(self.0 & !ns.bit())
    }

    /// What both sets hold.
    pub fn intersection(self, other: NamespaceSet) -> NamespaceSet {
        NamespaceSet(self.0 & other.0)
    }

    /// What `self` holds and `other` does not.
    pub fn difference(self, other: NamespaceSet) -> NamespaceSet {
        NamespaceSet(self.0 & !other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The kinds in the set, in [`Namespace::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Namespace> {
        Namespace::ALL
            .into_iter()
            .filter(move |ns| self.contains(*ns))
    }

    fn clone_flags(self) -> libc::c_ulong {
        self.iter()
            .fold(0, |flags, ns| flags | ns.clone_flag() as libc::c_ulong)
    }

    /// `user,mount` (the form of [`NAMESPACES_ENV`]); empty for none.
    fn to_list(self) -> String {
        self.iter()
            .map(Namespace::name)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn parse_list(list: &str) -> Result<NamespaceSet, String> {
        list.split(',')
            .filter(|name| !name.is_empty())
            .try_fold(NamespaceSet::NONE, |set, name| {
                Namespace::ALL
                    .into_iter()
                    .find(|ns| ns.name() == name)
                    .map(|ns| set.with(ns))
                    .ok_or_else(|| format!("unknown namespace {name:?}"))
            })
    }
}

impl fmt::Display for NamespaceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Namespace::name).collect();
        match names.split_last() {
            None => f.write_str("none"),
            Some((last, [])) => f.write_str(last),
            Some((last, rest)) => write!(f, "{} and {last}", rest.join(", ")),
        }
    }
}

/// The sets [`spawn`] tries, in order, each cut down to what was asked for; the first the
/// host allows is what the child gets:
///
/// 1. everything (any user where user namespaces are allowed);
/// 2. all but the user namespace (a root broker on a host that forbids user namespaces);
/// 3. net and ipc only (a root broker in a runtime that forbids mount or pid namespaces);
/// 4. none: the child shares the broker's namespaces and relies on seccomp alone.
pub const LADDER: [NamespaceSet; 4] = [
    NamespaceSet::ALL,
    NamespaceSet::ALL.without(Namespace::User),
    NamespaceSet::NONE.with(Namespace::Net).with(Namespace::Ipc),
    NamespaceSet::NONE,
];

/// A step of a new child between clone and exec (or the clone itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// `clone(2)`.
    Clone,
    /// `prctl(PR_SET_PDEATHSIG)`.
    ParentDeathSignal,
    /// Writing `deny` to `/proc/self/setgroups`.
    Setgroups,
    /// Writing `/proc/self/uid_map`.
    UidMap,
    /// Writing `/proc/self/gid_map`.
    GidMap,
    /// Placing an inherited descriptor at its fixed number (`dup2`).
    MoveFd,
    /// Emptying the signal mask.
    SignalMask,
    /// `execve`.
    Exec,
}

impl Step {
    const REPORTED: [Step; 7] = [
        Step::ParentDeathSignal,
        Step::Setgroups,
        Step::UidMap,
        Step::GidMap,
        Step::MoveFd,
        Step::SignalMask,
        Step::Exec,
    ];

    fn code(self) -> u32 {
        match self {
            Step::Clone => 0,
            Step::ParentDeathSignal => 1,
            Step::Setgroups => 2,
            Step::UidMap => 3,
            Step::GidMap => 4,
            Step::MoveFd => 5,
            Step::SignalMask => 6,
            Step::Exec => 7,
        }
    }

    fn from_code(code: u32) -> Option<Step> {
        Step::REPORTED.into_iter().find(|s| s.code() == code)
    }

    /// A failure here means the host would not let this process map its ids in a new user
    /// namespace (AppArmor's restriction of unprivileged user namespaces works this way):
    /// a refusal of the user namespace, not a broken spawn.
    fn refuses_user_namespace(self) -> bool {
        matches!(self, Step::Setgroups | Step::UidMap | Step::GidMap)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Clone => "clone",
            Step::ParentDeathSignal => "prctl(PR_SET_PDEATHSIG)",
            Step::Setgroups => "writing /proc/self/setgroups",
            Step::UidMap => "writing /proc/self/uid_map",
            Step::GidMap => "writing /proc/self/gid_map",
            Step::MoveFd => "dup2 of an inherited descriptor",
            Step::SignalMask => "emptying the signal mask",
            Step::Exec => "execve",
        })
    }
}

/// A set the host did not allow, and how it said so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The namespaces asked for.
    pub tried: NamespaceSet,
    /// Where it failed.
    pub step: Step,
    /// The kernel's answer.
    pub errno: Errno,
}

/// Why a child could not be started, or its root not emptied.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// The pipe through which a new child reports a failed step could not be made.
    #[error("creating the child's report pipe: {0}")]
    ReportPipe(Errno),
    /// Reading the child's report failed or it was cut short.
    #[error("reading the child's report: {0}")]
    Report(String),
    /// The descriptors to inherit are not laid out as [`FIXED_FD_LIMIT`] requires.
    #[error("descriptor {src} to number {dst}: numbers must be unique and below {FIXED_FD_LIMIT}, sources at or above it")]
    FdLayout {
        /// The source descriptor.
        src: RawFd,
        /// The number it was to get.
        dst: RawFd,
    },
    /// An argument or environment entry holds a NUL byte.
    #[error("an argument or environment entry holds a NUL byte")]
    Nul,
    /// `clone(2)` failed for another reason than a refused namespace.
    #[error("clone: {0}")]
    Clone(Errno),
    /// The new child failed a step between clone and exec.
    #[error("the new child failed at {step}: {errno}")]
    ChildSetUp {
        /// The step.
        step: Step,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The probe child of [`probe`] did not exit cleanly.
    #[error("the probe child ended with wait status {0:#x}")]
    Probe(libc::c_int),
    /// [`NAMESPACES_ENV`] is malformed.
    #[error("{NAMESPACES_ENV}: {0}")]
    BadGrant(String),
    /// [`NAMESPACES_ENV`] names a mount namespace, but this process is in the broker's (or
    /// either cannot be read): switching roots there would change the broker's.
    #[error("not in a mount namespace of its own (this process's {own:?}, the broker's {broker:?}); the root is left alone")]
    SameMountNamespace {
        /// This process's mount namespace id.
        own: Option<u64>,
        /// The broker's, from [`NAMESPACES_ENV`].
        broker: Option<u64>,
    },
    /// A step of the switch to the empty root failed.
    #[error("switching to an empty root: {step}: {errno}")]
    EmptyRoot {
        /// The step.
        step: &'static str,
        /// The kernel's answer.
        errno: Errno,
    },
    /// The new root is not empty.
    #[error("the new root is not empty: {0}")]
    RootNotEmpty(String),
}

/// What the child is to execute, prepared by the caller of [`spawn`].
pub struct ExecPlan<'a> {
    /// The program (the broker re-executes itself: `/proc/self/exe`).
    pub program: &'a CStr,
    /// `argv`, `argv[0]` included.
    pub args: &'a [CString],
    /// The environment, `NAME=value` each; [`spawn`] replaces any [`NAMESPACES_ENV`].
    pub env: &'a [CString],
    /// Descriptors to place at fixed numbers in the child: `(source, number)`. Numbers are
    /// unique and below [`FIXED_FD_LIMIT`], sources at or above it. Everything else the
    /// caller has open is marked close-on-exec in the child.
    pub fds: &'a [(BorrowedFd<'a>, RawFd)],
    /// Start it as the caller's sibling (`CLONE_PARENT`): its parent is the caller's
    /// parent, which reaps and supervises it. The caller cannot wait for it then, and must
    /// not be init of a pid namespace (the kernel refuses).
    pub sibling: bool,
}

/// A child that [`spawn`] started: it has executed the program.
#[derive(Debug)]
pub struct Started {
    /// Its pid in the caller's pid namespace. The caller must reap it.
    pub pid: libc::pid_t,
    /// The namespaces it was created in.
    pub namespaces: NamespaceSet,
    /// The sets tried before and refused, in order.
    pub refused: Vec<Refusal>,
}

/// Starts `plan` in as many of `wanted` namespaces as the host allows (walking down
/// [`LADDER`]) and returns once the child has executed it.
///
/// Must be called from the thread that stays alive as long as the child should: the
/// child's parent-death signal (SIGKILL) fires when this thread exits.
pub fn spawn(wanted: NamespaceSet, plan: &ExecPlan<'_>) -> Result<Started, NamespaceError> {
    check_fd_layout(plan.fds)?;
    start(wanted, Some(plan))
}

/// Which of `wanted` a child would get on this host: starts a child down [`LADDER`] as
/// [`spawn`] does, up to its uid and gid maps, and lets it exit at once. Leaves nothing
/// behind.
pub fn probe(wanted: NamespaceSet) -> Result<(NamespaceSet, Vec<Refusal>), NamespaceError> {
    let started = start(wanted, None)?;
    let status = reap(started.pid);
    if status != Some(0) {
        return Err(NamespaceError::Probe(status.unwrap_or(-1)));
    }
    Ok((started.namespaces, started.refused))
}

fn check_fd_layout(fds: &[(BorrowedFd<'_>, RawFd)]) -> Result<(), NamespaceError> {
    for (i, (src, dst)) in fds.iter().enumerate() {
        let src = src.as_raw_fd();
        let unique = fds[..i].iter().all(|(_, other)| other != dst);
        if !(0..FIXED_FD_LIMIT).contains(dst) || src < FIXED_FD_LIMIT || !unique {
            return Err(NamespaceError::FdLayout { src, dst: *dst });
        }
    }
    Ok(())
}

fn start(wanted: NamespaceSet, plan: Option<&ExecPlan<'_>>) -> Result<Started, NamespaceError> {
    let broker_mnt = ns_id("self", Namespace::Mount);
    let mut refused = Vec::new();
    let mut tried = Vec::new();
    for rung in LADDER {
        let set = rung.intersection(wanted);
        if tried.contains(&set) {
            continue;
        }
        tried.push(set);
        // Everything the child uses is made here: between clone and exec it must not
        // allocate (another thread of this process may hold the allocator's lock).
        let maps = set.contains(Namespace::User).then(IdMaps::of_this_process);
        let grant = Grant {
            namespaces: set,
            broker_mnt,
        };
        let exec = plan.map(|p| PreparedExec::new(p, &grant)).transpose()?;
        let sibling = plan.is_some_and(|p| p.sibling);
        let flags = set.clone_flags()
            | if sibling {
                libc::CLONE_PARENT as libc::c_ulong
            } else {
                0
            };
        let (report_r, report_w) = report_pipe()?;
        let (report_r_raw, report_w_raw) = (report_r.as_raw_fd(), report_w.as_raw_fd());
        // SAFETY: fork semantics (no CLONE_VM, no new stack). The child branch runs only
        // `child_side`, which makes async-signal-safe system calls on data prepared above
        // and never returns.
        let pid = match unsafe { clone_process(flags) } {
            Ok(0) => {
                // SAFETY: we are the new child; see `child_side`.
                unsafe { child_side(report_r_raw, report_w_raw, maps.as_ref(), exec.as_ref()) }
            }
            Ok(pid) => pid,
            Err(errno) if !set.is_empty() && is_refusal(errno) => {
                refused.push(Refusal {
                    tried: set,
                    step: Step::Clone,
                    errno,
                });
                continue;
            }
            Err(errno) => return Err(NamespaceError::Clone(errno)),
        };
        drop(report_w);
        match read_report(report_r) {
            Ok(None) => {
                return Ok(Started {
                    pid,
                    namespaces: set,
                    refused,
                })
            }
            Ok(Some((step, errno))) => {
                reap(pid);
                if step.refuses_user_namespace() {
                    refused.push(Refusal {
                        tried: set,
                        step,
                        errno,
                    });
                    continue;
                }
                return Err(NamespaceError::ChildSetUp { step, errno });
            }
            Err(e) => {
                // SAFETY: FFI; `pid` is our unreaped child, so the number is not reused.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                reap(pid);
                return Err(e);
            }
        }
    }
    // LADDER ends with NONE, whose failures return above.
    Err(NamespaceError::Clone(Errno::EINVAL))
}

/// What `clone` answers when the host does not allow a namespace: EPERM (no privilege, a
/// sysctl, a seccomp profile), EINVAL (a kind the kernel lacks), ENOSPC or EUSERS (a
/// `user.max_*_namespaces` limit or the nesting depth), EACCES (an LSM).
fn is_refusal(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::EPERM | Errno::EINVAL | Errno::ENOSPC | Errno::EUSERS | Errno::EACCES
    )
}

/// `fork()` with namespace flags.
///
/// # Safety
///
/// In the child (`Ok(0)`) only async-signal-safe code may run until exec or `_exit`: it is
/// a copy of a possibly multi-threaded process, and glibc's fork handlers do not run.
unsafe fn clone_process(flags: libc::c_ulong) -> Result<libc::pid_t, Errno> {
    // SAFETY: clone with a NULL stack and without CLONE_VM continues the child on a copy of
    // the caller's stack, as fork does; no pointer arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(r as libc::pid_t)
    }
}

/// A close-on-exec pipe above [`FIXED_FD_LIMIT`]: the child writes a failed step and its
/// errno; exec closes it, so end-of-file without a word means the program runs.
fn report_pipe() -> Result<(OwnedFd, OwnedFd), NamespaceError> {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(NamespaceError::ReportPipe)?;
    Ok((lift(r)?, lift(w)?))
}

fn lift(fd: OwnedFd) -> Result<OwnedFd, NamespaceError> {
    let raw = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIXED_FD_LIMIT))
        .map_err(NamespaceError::ReportPipe)?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn read_report(fd: OwnedFd) -> Result<Option<(Step, Errno)>, NamespaceError> {
    let mut file = std::fs::File::from(fd);
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(NamespaceError::Report(e.to_string())),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got != buf.len() {
        return Err(NamespaceError::Report(format!("{got} of 8 bytes")));
    }
    let word = u64::from_ne_bytes(buf);
    let step = Step::from_code((word >> 32) as u32)
        .ok_or_else(|| NamespaceError::Report(format!("unknown step in {word:#x}")))?;
    Ok(Some((step, Errno::from_raw(word as u32 as i32))))
}

/// Waits for `pid`; its raw wait status, `None` if waiting failed.
fn reap(pid: libc::pid_t) -> Option<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: FFI; `status` is a live local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && Errno::last() != Errno::EINTR {
            return None;
        }
    }
}

/// The new child's uid and gid maps: root inside is this process's user outside, and no
/// other id exists. Root inside keeps its capabilities over the exec (a non-root uid would
/// lose them), which step 4 needs; [`crate::harden_process`] drops them after.
struct IdMaps {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl IdMaps {
    fn of_this_process() -> IdMaps {
        // SAFETY: FFI; geteuid and getegid cannot fail and take no arguments.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        IdMaps {
            uid_map: format!("0 {uid} 1\n").into_bytes(),
            gid_map: format!("0 {gid} 1\n").into_bytes(),
        }
    }
}

/// What [`NAMESPACES_ENV`] carries.
struct Grant {
    namespaces: NamespaceSet,
    broker_mnt: Option<u64>,
}

impl Grant {
    fn to_env(&self) -> String {
        format!(
            "{NAMESPACES_ENV}={};broker-mnt={}",
            self.namespaces.to_list(),
            self.broker_mnt.unwrap_or(0)
        )
    }

    fn parse(value: &str) -> Result<Grant, NamespaceError> {
        let bad = |why: &str| NamespaceError::BadGrant(format!("{why} in {value:?}"));
        let (list, mnt) = value
            .split_once(";broker-mnt=")
            .ok_or_else(|| bad("no broker-mnt"))?;
        let namespaces = NamespaceSet::parse_list(list).map_err(|e| bad(&e))?;
        let broker_mnt: u64 = mnt.parse().map_err(|_| bad("bad broker-mnt"))?;
        Ok(Grant {
            namespaces,
            broker_mnt: (broker_mnt != 0).then_some(broker_mnt),
        })
    }

    fn from_env() -> Result<Option<Grant>, NamespaceError> {
        match std::env::var_os(NAMESPACES_ENV) {
            None => Ok(None),
            Some(v) => {
                let text = v
                    .to_str()
                    .ok_or_else(|| NamespaceError::BadGrant("not UTF-8".into()))?;
                Grant::parse(text).map(Some)
            }
        }
    }
}

/// An [`ExecPlan`] as C strings and pointer arrays, with [`NAMESPACES_ENV`] set.
struct PreparedExec {
    program: CString,
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    moves: Vec<(RawFd, RawFd)>,
    first_free: RawFd,
}

impl PreparedExec {
    fn new(plan: &ExecPlan<'_>, grant: &Grant) -> Result<PreparedExec, NamespaceError> {
        let prefix = format!("{NAMESPACES_ENV}=");
        let grant = CString::new(grant.to_env()).map_err(|_| NamespaceError::Nul)?;
        let env: Vec<CString> = plan
            .env
            .iter()
            .filter(|e| !e.as_bytes().starts_with(prefix.as_bytes()))
            .cloned()
            .chain([grant])
            .collect();
        let args = plan.args.to_vec();
        let pointers = |strings: &[CString]| {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain([std::ptr::null()])
                .collect::<Vec<_>>()
        };
        let argv = pointers(&args);
        let envp = pointers(&env);
        let moves: Vec<(RawFd, RawFd)> = plan
            .fds
            .iter()
            .map(|(src, dst)| (src.as_raw_fd(), *dst))
            .collect();
        let first_free = moves
            .iter()
            .map(|(_, dst)| dst + 1)
            .max()
            .unwrap_or(3)
            .max(3);
        let mut strings = args;
        strings.extend(env);
        Ok(PreparedExec {
            program: plan.program.to_owned(),
            _strings: strings,
            argv,
            envp,
            moves,
            first_free,
        })
    }
}

/// The new child, from clone to exec (or, for [`probe`], to `_exit(0)` after its maps).
///
/// # Safety
///
/// Only in the child of [`clone_process`]. Everything here is an async-signal-safe system
/// call on memory prepared before the clone; nothing allocates, locks or panics.
unsafe fn child_side(
    report_r: RawFd,
    report: RawFd,
    maps: Option<&IdMaps>,
    exec: Option<&PreparedExec>,
) -> ! {
    // SAFETY (whole body): FFI calls with valid pointers to live data (C strings and
    // pointer arrays owned by `exec`, byte slices of `maps`, locals).
    unsafe {
        libc::close(report_r);
        // No orphan, ever: the child dies with the broker's spawning thread.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(report, Step::ParentDeathSignal);
        }
        // The broker may have died before the prctl. With no reader left (our copy is
        // closed), its report pipe polls as an error. (getppid would not tell: in a new pid
        // namespace the parent is outside, and it reads 0.)
        let mut pfd = libc::pollfd {
            fd: report,
            events: 0,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) != 0 && pfd.revents & libc::POLLERR != 0 {
            libc::_exit(1);
        }
        if let Some(maps) = maps {
            // Required before an unprivileged gid_map; nothing here needs setgroups.
            // Kernels before 3.19 have no such file and no such requirement.
            if write_proc(c"/proc/self/setgroups", b"deny").is_err()
                && Errno::last() != Errno::ENOENT
            {
                fail(report, Step::Setgroups);
            }
            if write_proc(c"/proc/self/uid_map", &maps.uid_map).is_err() {
                fail(report, Step::UidMap);
            }
            if write_proc(c"/proc/self/gid_map", &maps.gid_map).is_err() {
                fail(report, Step::GidMap);
            }
        }
        let Some(exec) = exec else {
            libc::_exit(0);
        };
        for &(src, dst) in &exec.moves {
            if libc::dup2(src, dst) < 0 {
                fail(report, Step::MoveFd);
            }
        }
        // The broker blocks signals to read them from a signalfd; the child must not
        // inherit that mask.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            fail(report, Step::SignalMask);
        }
        // Anything else this process happened to have open must not reach the child.
        libc::syscall(
            libc::SYS_close_range,
            exec.first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        libc::execve(
            exec.program.as_ptr(),
            exec.argv.as_ptr(),
            exec.envp.as_ptr(),
        );
        fail(report, Step::Exec)
    }
}

/// Writes `data` to `path` in one `write`, async-signal-safe.
///
/// # Safety
///
/// FFI only; callable between clone and exec.
unsafe fn write_proc(path: &CStr, data: &[u8]) -> Result<(), ()> {
    // SAFETY: `path` is a C string, `data` a live slice of its length.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        let errno = Errno::last_raw();
        libc::close(fd);
        if n == data.len() as isize {
            Ok(())
        } else {
            // close may have changed errno; the caller reports write's.
            Errno::set_raw(if n < 0 { errno } else { libc::EIO });
            Err(())
        }
    }
}

/// Reports `step` with the current errno to the parent and exits.
///
/// # Safety
///
/// FFI only; callable between clone and exec.
unsafe fn fail(report: RawFd, step: Step) -> ! {
    let word = (u64::from(step.code()) << 32) | u64::from(Errno::last_raw() as u32);
    let bytes = word.to_ne_bytes();
    // SAFETY: `bytes` is a live local of its length.
    unsafe {
        libc::write(report, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// The namespace id (inode of `/proc/<who>/ns/<kind>`), `None` if unreadable.
fn ns_id(who: &str, ns: Namespace) -> Option<u64> {
    std::fs::metadata(format!("/proc/{who}/ns/{}", ns.proc_name()))
        .ok()
        .map(|m| m.ino())
}

/// Which namespaces the process `pid` does not share with the calling process, read from
/// `/proc` (kinds whose links cannot be read count as shared).
pub fn own_namespaces_of(pid: u32) -> NamespaceSet {
    Namespace::ALL
        .into_iter()
        .filter(|ns| {
            let mine = std::fs::read_link(format!("/proc/self/ns/{}", ns.proc_name()));
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{}", ns.proc_name()));
            matches!((mine, theirs), (Ok(a), Ok(b)) if a != b)
        })
        .fold(NamespaceSet::NONE, NamespaceSet::with)
}

/// One phrase for the broker's start line: which namespaces a child has of its own, which
/// of `wanted` it shares with the broker, and what the host refused.
pub fn describe(own: NamespaceSet, wanted: NamespaceSet, refused: &[Refusal]) -> String {
    let shared = wanted.difference(own);
    let mut text = if own.is_empty() {
        "no namespace of its own".to_string()
    } else {
        format!("own {own} namespace(s)")
    };
    if !shared.is_empty() {
        text.push_str(&format!("; shares the broker's {shared} namespace(s)"));
        // Consecutive refusals with the same step and answer read as one.
        let mut why: Vec<(Step, Errno, Vec<String>)> = Vec::new();
        for r in refused {
            let tried = r.tried.to_list().replace(',', "+");
            match why.last_mut() {
                Some((step, errno, sets)) if *step == r.step && *errno == r.errno => {
                    sets.push(tried)
                }
                _ => why.push((r.step, r.errno, vec![tried])),
            }
        }
        let why: Vec<String> = why
            .into_iter()
            .map(|(step, errno, sets)| format!("{step} with {}: {errno:?}", sets.join(", ")))
            .collect();
        if why.is_empty() {
            text.push_str(" (not created)");
        } else {
            text.push_str(&format!(" (the host refused them: {})", why.join("; ")));
        }
    }
    text
}

/// This process's pid as the broker sees it: `/proc` is still the broker's mount of the
/// broker's pid namespace until [`enter_empty_root`], so `/proc/self` names it there. In a
/// pid namespace of its own `getpid()` says 1.
pub fn pid_outside() -> u32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .unwrap_or_else(std::process::id)
}

/// What [`enter_empty_root`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSwitch {
    /// The root is an empty read-only tmpfs; the host's tree is detached.
    Emptied,
    /// The broker could not give this process a mount namespace: the host's root stays.
    NoMountNamespace,
    /// Not started by the broker's [`spawn`] (no [`NAMESPACES_ENV`]), e.g. a test harness.
    NotSpawned,
}

impl fmt::Display for RootSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RootSwitch::Emptied => {
                "root switched to an empty read-only tmpfs (the host's file system is detached)"
            }
            RootSwitch::NoMountNamespace => {
                "no mount namespace of its own: the host's file system stays visible \
                 (seccomp still forbids opening anything)"
            }
            RootSwitch::NotSpawned => "not started by the broker: the root is left alone",
        })
    }
}

/// Step 4 of a child's life: once set-up no longer needs a file, make an empty read-only
/// tmpfs the root of this process's own mount namespace and detach the host's tree.
///
/// Needs `CAP_SYS_ADMIN` in the user namespace that owns the mount namespace, so it comes
/// before [`crate::harden_process`]; and mount, pivot_root and umount2 are allowed by no
/// filter, so before [`crate::install_seccomp`]. It first does glibc's lazy malloc read of
/// `/proc` (see `warm_up.rs`) while `/proc` is still there. All threads share the root
/// (they share their `fs_struct`) and the mount namespace.
///
/// Does nothing unless [`NAMESPACES_ENV`] says the broker gave this process a mount
/// namespace, and refuses when this process is in fact in the broker's.
pub fn enter_empty_root() -> Result<RootSwitch, NamespaceError> {
    let Some(grant) = Grant::from_env()? else {
        return Ok(RootSwitch::NotSpawned);
    };
    if !grant.namespaces.contains(Namespace::Mount) {
        return Ok(RootSwitch::NoMountNamespace);
    }
    let own = ns_id("self", Namespace::Mount);
    match (own, grant.broker_mnt) {
        (Some(own), Some(broker)) if own != broker => {}
        (own, broker) => return Err(NamespaceError::SameMountNamespace { own, broker }),
    }
    crate::warm_up::warm_up_malloc();
    switch_to_empty_root()?;
    Ok(RootSwitch::Emptied)
}

fn switch_to_empty_root() -> Result<(), NamespaceError> {
    let check = |step: &'static str, r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(NamespaceError::EmptyRoot {
                step,
                errno: Errno::last(),
            })
        }
    };
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY (all calls below): FFI with C string literals and null pointers only.
    unsafe {
        // Nothing we mount may propagate to the broker's namespace (a mount namespace
        // created without a new user namespace copies shared mounts as shared), and
        // pivot_root refuses shared mounts.
        check(
            "making every mount private",
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
        )?;
        check(
            "mounting an empty tmpfs",
            libc::mount(
                c"tmpfs".as_ptr(),
                EMPTY_ROOT_MOUNT_POINT.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"mode=0555,size=4k".as_ptr().cast(),
            ),
        )?;
        let switched =
            check("chdir", libc::chdir(EMPTY_ROOT_MOUNT_POINT.as_ptr())).and_then(|()| {
                // The old root ends up stacked on "." (pivot_root(2), "new_root and
                // put_old may be the same directory"); detaching it leaves the tmpfs.
                check(
                    "pivot_root",
                    libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as i32,
                )
            });
        if let Err(e) = switched {
            libc::umount2(EMPTY_ROOT_MOUNT_POINT.as_ptr(), libc::MNT_DETACH);
            libc::chdir(c"/".as_ptr());
            return Err(e);
        }
        check(
            "detaching the old root",
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        )?;
        check("chdir /", libc::chdir(c"/".as_ptr()))?;
    }
    let left: Vec<String> = std::fs::read_dir("/")
        .map_err(|e| NamespaceError::RootNotEmpty(format!("reading /: {e}")))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().as_bytes().escape_ascii().to_string())
        .collect();
    if left.is_empty() {
        Ok(())
    } else {
        Err(NamespaceError::RootNotEmpty(left.join(", ")))
    }
}

static ABORT_HANDLER: AtomicBool = AtomicBool::new(false);

/// As init (pid 1) of its own pid namespace a process cannot die of a signal it sends
/// itself without a handler: `abort()`'s SIGABRT would be dropped, and glibc's fallback
/// calls `rt_sigaction`, which the filters forbid, so an abort would read as a seccomp
/// violation. This handler makes it exit with [`ABORT_EXIT_CODE`] instead. Installed
/// before the filter (which forbids `rt_sigaction`); does nothing unless this process is
/// pid 1.
pub(crate) fn exit_on_abort_as_init() -> Result<(), nix::Error> {
    if std::process::id() != 1 || ABORT_HANDLER.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let action = SigAction::new(
        SigHandler::Handler(on_abort),
        SaFlags::SA_ONSTACK,
        SigSet::all(),
    );
    // SAFETY: FFI. The handler only writes a constant line and calls _exit.
    unsafe { sigaction(Signal::SIGABRT, &action) }.map(drop)
}

extern "C" fn on_abort(_signal: libc::c_int) {
    const LINE: &[u8] = b"vgpu-sandbox: aborted (exit status 134: as init of its pid namespace the process cannot die of SIGABRT)\n";
    // SAFETY: FFI; write and _exit are async-signal-safe; LINE is static.
    unsafe {
        libc::write(libc::STDERR_FILENO, LINE.as_ptr().cast(), LINE.len());
        libc::_exit(ABORT_EXIT_CODE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_display_parse_and_map_to_clone_flags() {
        assert_eq!(
            NamespaceSet::ALL.to_string(),
            "user, mount, pid, net and ipc"
        );
        assert_eq!(NamespaceSet::NONE.to_string(), "none");
        assert_eq!(NamespaceSet::NONE.with(Namespace::Pid).to_string(), "pid");
        assert_eq!(LADDER[2].to_string(), "net and ipc");
        for set in LADDER {
            assert_eq!(NamespaceSet::parse_list(&set.to_list()).unwrap(), set);
        }
        assert!(NamespaceSet::parse_list("user,cgroup").is_err());
        assert_eq!(
            NamespaceSet::ALL.clone_flags() as libc::c_int,
            libc::CLONE_NEWUSER
                | libc::CLONE_NEWNS
                | libc::CLONE_NEWPID
                | libc::CLONE_NEWNET
                | libc::CLONE_NEWIPC
        );
        assert_eq!(NamespaceSet::NONE.clone_flags(), 0);
    }

    #[test]
    fn grant_round_trips_and_rejects_garbage() {
        let g = Grant {
            namespaces: LADDER[1],
            broker_mnt: Some(4026531841),
        };
        let env = g.to_env();
        let value = env.strip_prefix(&format!("{NAMESPACES_ENV}=")).unwrap();
        let back = Grant::parse(value).unwrap();
        assert_eq!(back.namespaces, LADDER[1]);
        assert_eq!(back.broker_mnt, Some(4026531841));
        let none = Grant::parse(";broker-mnt=0").unwrap();
        assert_eq!(none.namespaces, NamespaceSet::NONE);
        assert_eq!(none.broker_mnt, None);
        for bad in ["user,mount", "user;broker-mnt=x", "bogus;broker-mnt=1", ""] {
            assert!(Grant::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn descriptions_name_what_is_shared_and_why() {
        assert_eq!(
            describe(NamespaceSet::ALL, NamespaceSet::ALL, &[]),
            "own user, mount, pid, net and ipc namespace(s)"
        );
        let refused = [Refusal {
            tried: NamespaceSet::ALL,
            step: Step::Clone,
            errno: Errno::EPERM,
        }];
        assert_eq!(
            describe(LADDER[1], NamespaceSet::ALL, &refused),
            "own mount, pid, net and ipc namespace(s); shares the broker's user namespace(s) \
             (the host refused them: clone with user+mount+pid+net+ipc: EPERM)"
        );
        let refused = [
            refused[0],
            Refusal {
                tried: LADDER[1],
                step: Step::Clone,
                errno: Errno::EPERM,
            },
            Refusal {
                tried: LADDER[2],
                step: Step::Clone,
                errno: Errno::ENOSPC,
            },
        ];
        assert_eq!(
            describe(NamespaceSet::NONE, NamespaceSet::ALL, &refused),
            "no namespace of its own; shares the broker's user, mount, pid, net and ipc \
             namespace(s) (the host refused them: clone with user+mount+pid+net+ipc, \
             mount+pid+net+ipc: EPERM; clone with net+ipc: ENOSPC)"
        );
    }

    #[test]
    fn fd_layout_is_checked() {
        let high = nix::fcntl::fcntl(
            std::io::stderr(),
            nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(FIXED_FD_LIMIT),
        )
        .unwrap();
        // SAFETY: a fresh descriptor owned by nothing else.
        let high = unsafe { OwnedFd::from_raw_fd(high) };
        let b = std::os::fd::AsFd::as_fd(&high);
        assert!(check_fd_layout(&[(b, 3), (b, 4)]).is_ok());
        assert!(check_fd_layout(&[(b, 3), (b, 3)]).is_err());
        assert!(check_fd_layout(&[(b, FIXED_FD_LIMIT)]).is_err());
        // SAFETY: stderr is open for the life of the test.
        let low = unsafe { BorrowedFd::borrow_raw(2) };
        assert!(check_fd_layout(&[(low, 3)]).is_err());
    }

    #[test]
    fn step_codes_round_trip() {
        for step in Step::REPORTED {
            assert_eq!(Step::from_code(step.code()), Some(step));
        }
        assert_eq!(Step::from_code(0), None);
        assert_eq!(Step::from_code(99), None);
    }
}
