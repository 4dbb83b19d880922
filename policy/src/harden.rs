//! Process hardening that comes before the seccomp filter.

use nix::sys::prctl;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

use crate::PolicyError;

/// The cap on open descriptors (`RLIMIT_NOFILE`, soft and hard) of a jailed process.
///
/// The frontend holds at most 509 guest memory region fds (vhost-user's largest
/// `VHOST_USER_MAX_RAM_SLOTS` that backends report), the same fds once more while it
/// forwards them to the renderer over the descriptor lane (a descriptor in flight in an
/// `SCM_RIGHTS` message counts against the sender's `RLIMIT_NOFILE` in the kernel's
/// `too_many_unix_fds` check), a handful of kick/call/err eventfds per queue, its sockets,
/// ipc-channel's socketpairs and the scanout/blob memfds it passes on. 2048 leaves room for
/// all of that; the renderer needs fewer. A hard limit the process already has that is
/// lower is kept (it cannot be raised without `CAP_SYS_RESOURCE`).
pub const MAX_OPEN_FILES: u64 = 2048;

/// Hardens the calling process before [`crate::install_seccomp`]:
///
/// - `PR_SET_NO_NEW_PRIVS`: no exec can gain privileges (also required for an unprivileged
///   seccomp filter).
/// - `PR_SET_DUMPABLE 0`: no ptrace attach by other processes of the same user, `/proc/<pid>`
///   owned by root, no core dump.
/// - `RLIMIT_CORE` 0: no core file even if dumpable were set again.
/// - `RLIMIT_NOFILE` at most [`MAX_OPEN_FILES`] (soft and hard), so a bug cannot exhaust the
///   system's descriptors and the hard limit cannot be raised again.
///
/// None of these stop a later mmap, thread creation or fd passing. Process-wide: call it
/// once, from any thread.
pub fn harden_process() -> Result<(), PolicyError> {
    prctl::set_no_new_privs().map_err(|source| PolicyError::Prctl {
        what: "PR_SET_NO_NEW_PRIVS",
        source,
    })?;
    prctl::set_dumpable(false).map_err(|source| PolicyError::Prctl {
        what: "PR_SET_DUMPABLE",
        source,
    })?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|source| PolicyError::Rlimit {
        what: "RLIMIT_CORE",
        source,
    })?;
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|source| PolicyError::Rlimit {
        what: "RLIMIT_NOFILE",
        source,
    })?;
    let cap = hard.min(MAX_OPEN_FILES);
    setrlimit(Resource::RLIMIT_NOFILE, cap, cap).map_err(|source| PolicyError::Rlimit {
        what: "RLIMIT_NOFILE",
        source,
    })?;
    log::debug!("process hardened: no_new_privs, not dumpable, RLIMIT_CORE 0, RLIMIT_NOFILE {cap}");
    Ok(())
}
