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
/// - Every capability set emptied (bounding, ambient, effective, permitted, inheritable).
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
    let caps = drop_capabilities()?;
    log::info!(
        "process hardened: no_new_privs, not dumpable, RLIMIT_CORE 0, RLIMIT_NOFILE {cap}, {caps}"
    );
    Ok(())
}

/// Empties every capability set this process could use or regain: the bounding set (so no
/// exec could bring one back), the ambient set, and the effective, permitted and
/// inheritable sets. The processes run as whatever user started the broker, often root on
/// a VMM host; after this, root in them is an ordinary user for the kernel's permission
/// checks. Part of [`harden_process`]; the broker calls it alone once its children run.
/// Returns a description for the log.
pub fn drop_capabilities() -> Result<String, PolicyError> {
    let capset_err = |what| {
        move |errno: nix::Error| PolicyError::Prctl {
            what,
            source: errno,
        }
    };
    // The bounding set: one prctl per capability until the kernel says the number is past
    // its last one. Dropping needs CAP_SETPCAP; without it there is nothing to drop that
    // this process could use, and the capset below clears the rest.
    let mut bounding = "bounding set cleared";
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            match nix::Error::last() {
                nix::Error::EINVAL => break,
                nix::Error::EPERM => {
                    bounding = "bounding set kept (no CAP_SETPCAP)";
                    break;
                }
                e => return Err(capset_err("PR_CAPBSET_DROP")(e)),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(capset_err("PR_CAP_AMBIENT_CLEAR_ALL")(nix::Error::last()));
    }
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data structs, both alive and of the
    // layout the kernel expects (linux/capability.h).
    let r = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if r != 0 {
        return Err(capset_err("capset")(nix::Error::last()));
    }
    Ok(format!("capabilities dropped ({bounding})"))
}
