//! The device-frontend's allowlist: the shared one without executable memory, plus the
//! vhost-user listener.

use super::common::{self, ExecMemory};
use super::permit::{sys, ArgCheck, Permit};

/// The frontend's permits. It never needs executable memory: `PROT_EXEC` is refused in
/// `mmap` and `mprotect`.
pub(crate) fn permits(pid: u32) -> Vec<Permit> {
    let mut permits = common::permits(ExecMemory::Deny, pid);
    permits.extend([
        // Connections of the VMM on the inherited vhost-user listening socket.
        Permit::any(sys!(SYS_accept4)),
        // Rust std's set_nonblocking on sockets (the vhost crate toggles the listener) is
        // ioctl(FIONBIO); it only flips O_NONBLOCK, as fcntl(F_SETFL) may. No other ioctl.
        Permit::when(sys!(SYS_ioctl), vec![ArgCheck::eq32(1, libc::FIONBIO)]),
    ]);
    permits
}
