//! Lazy libc work that touches files, done before the filter so it never happens after.
//!
//! glibc's malloc reads `/proc/sys/vm/overcommit_memory` (an `openat`) the first time it
//! shrinks the heap of a per-thread arena (`check_may_shrink_heap`, called from
//! `heap_trim` when a `free` leaves more than the trim threshold at the top of a thread's
//! heap), then caches the answer for the life of the process. Under the filter that first
//! shrink would kill the process at a random `free` in some worker thread. So the trim
//! threshold is fixed where no thread heap can reach it, before the filter.

/// Makes glibc's thread heaps never shrink, once per process: [`crate::enter_empty_root`]
/// needs it done while `/proc` is still there, and [`crate::install_seccomp`] before the
/// filter, whichever comes first.
pub(crate) fn warm_up_malloc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(warm_up_malloc_now);
}

fn warm_up_malloc_now() {
    // A fixed trim threshold at least as large as a thread heap can be (HEAP_MAX_SIZE,
    // 64 MiB on 64-bit) means `heap_trim` never reaches `shrink_heap`, so glibc never
    // needs to read the file; whole heaps are still unmapped when they empty (no file
    // read there). The main arena then trims (with sbrk, no file) only above 64 MiB of
    // free top: memory that is free, not resident. Cheaper than forcing the first shrink
    // (72 MiB of allocations, several milliseconds of every child's start-up).
    // SAFETY: mallopt takes two integers and touches only malloc's own parameters.
    let set = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
    if set != 1 {
        log::warn!("mallopt(M_TRIM_THRESHOLD) failed; a thread heap shrink may read /proc");
    }
}

/// glibc's largest thread heap (`HEAP_MAX_SIZE` = 2 * `DEFAULT_MMAP_THRESHOLD_MAX`).
const TRIM_THRESHOLD: libc::c_int = 64 << 20;
