//! Lazy libc work that touches files, done before the filter so it never happens after.
//!
//! glibc's malloc reads `/proc/sys/vm/overcommit_memory` (an `openat`) the first time it
//! shrinks the heap of a per-thread arena (`check_may_shrink_heap`, called from
//! `heap_trim` when a `free` leaves more than the trim threshold at the top of a thread's
//! heap), then caches the answer for the life of the process. Under the filter that first
//! shrink would kill the process at a random `free` in some worker thread. Forcing one
//! shrink now makes glibc read the file while it still may.

/// Size of each block: always below glibc's mmap threshold (at least 128 KiB), so the
/// blocks come from the thread's arena heap rather than from their own mappings.
const BLOCK: usize = 64 << 10;
/// Total allocated: more than one arena heap (`HEAP_MAX_SIZE`, 64 MiB on 64-bit), so that
/// after the frees the first heap's top chunk is as large as a heap can hold, which
/// reaches any trim threshold a later shrink could need (the threshold only grows, and
/// one of 64 MiB or more can never be reached by a heap, so no shrink, no read, ever).
/// The blocks are never written: only their headers' pages are touched (about 4 MiB,
/// for a few milliseconds).
const TOTAL: usize = 72 << 20;

/// Runs glibc's first per-thread-arena heap shrink on a short-lived thread, once per
/// process: [`crate::enter_empty_root`] needs it done while `/proc` is still there, and
/// [`crate::install_seccomp`] before the filter, whichever comes first.
pub(crate) fn warm_up_malloc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(warm_up_malloc_now);
}

fn warm_up_malloc_now() {
    let primed = std::thread::Builder::new()
        .name("policy-warm-up".into())
        .spawn(|| {
            // Capacity only: malloc without touching the memory.
            let blocks: Vec<Vec<u8>> = (0..TOTAL / BLOCK)
                .map(|_| Vec::with_capacity(BLOCK))
                .collect();
            // Free the most recent first, so each block merges straight into the top.
            blocks.into_iter().rev().for_each(drop);
        })
        .and_then(|thread| thread.join().map_err(|_| std::io::Error::other("panicked")));
    if let Err(e) = primed {
        log::warn!("malloc warm-up thread failed: {e}");
    }
}
