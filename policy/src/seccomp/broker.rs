//! The broker's allowlist, installed once both children run: the shared one without
//! executable memory, plus what supervision needs. From then on the broker can reap and
//! signal its children, read its signalfd and status channels, log, and remove the socket
//! file it created on the way out; it can no longer open files, start processes, create
//! sockets or trace anything.

use super::common::{self, ExecMemory};
use super::permit::{sys, Permit};

/// The broker's permits.
pub(crate) fn permits(pid: u32) -> Vec<Permit> {
    let mut permits = common::permits(ExecMemory::Deny, pid);
    permits.extend([
        // Reaping children (waitpid, i.e. wait4).
        Permit::any(sys!(SYS_wait4)),
        // Stopping children: SIGKILL only (as init of their own pid namespaces they would
        // ignore SIGTERM, having no handler for it; see broker/src/supervise.rs).
        Permit::arg_in(sys!(SYS_kill), 1, &[libc::SIGKILL as u64]),
        // Removing the vhost-user socket file it bound (--socket-path) when it exits.
        Permit::any(sys!(SYS_unlink)),
        Permit::any(sys!(SYS_unlinkat)),
    ]);
    permits
}
