//! The broker's allowlist, installed once both children run: the shared one without
//! executable memory, plus what supervision needs. From then on the broker can reap and
//! signal its children, read its signalfd and status channels, log, and remove the socket
//! file it created on the way out; it can no longer open files, start processes, create
//! sockets or trace anything.
//!
//! With `--metrics-file` ([`Filter::BrokerMetrics`](super::Filter::BrokerMetrics)) it can
//! also create and replace files in that one directory, opened before the filter.

use super::common::{self, ExecMemory};
use super::permit::{sys, ArgCheck, Permit};

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

/// The flags of the one `openat` the broker makes after its jail: the metrics file's
/// temporary name, write-only, created or truncated, and never through a symbolic link
/// (someone who can write the directory must not make the broker write elsewhere).
pub const METRICS_OPEN_FLAGS: i32 =
    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_NOFOLLOW;

/// The broker's permits with `--metrics-file`, whose directory is open at `dir_fd`.
///
/// Both calls are pinned to that directory's descriptor: `openat` only relative to
/// `dir_fd` and only with [`METRICS_OPEN_FLAGS`] (create or truncate, write only: no
/// reading, no `O_PATH`, no following a link), `renameat`/`renameat2` only with both
/// directory arguments equal to `dir_fd`. `open`, `openat2` and `creat` stay forbidden, so
/// the broker still cannot read any file. Known limit: seccomp cannot read the path, and
/// an absolute path makes the kernel ignore the descriptor, so a broker taken over could
/// still create, truncate or rename a file its user may write elsewhere (it could already
/// delete one: `unlink` is needed for the socket file). Without `--metrics-file` none of
/// this is allowed.
pub(crate) fn permits_with_metrics(pid: u32, dir_fd: i32) -> Vec<Permit> {
    let dir = dir_fd as u32 as u64;
    let mut permits = permits(pid);
    permits.extend([
        // Creating the temporary file (`.NAME.tmp`) in the metrics directory.
        Permit::when(
            sys!(SYS_openat),
            vec![
                ArgCheck::eq32(0, dir),
                ArgCheck::eq32(2, METRICS_OPEN_FLAGS as u32 as u64),
            ],
        ),
        // Moving it over the metrics file: glibc's renameat is SYS_renameat on x86_64;
        // renameat2 (without flags: no RENAME_EXCHANGE or RENAME_WHITEOUT) for a libc that
        // uses it instead.
        Permit::when(
            sys!(SYS_renameat),
            vec![ArgCheck::eq32(0, dir), ArgCheck::eq32(2, dir)],
        ),
        Permit::when(
            sys!(SYS_renameat2),
            vec![
                ArgCheck::eq32(0, dir),
                ArgCheck::eq32(2, dir),
                ArgCheck::eq32(4, 0),
            ],
        ),
    ]);
    permits
}
