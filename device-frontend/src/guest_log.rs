//! A rate limit for log lines a guest can trigger at will (every refused command logs why).
//! Without it a hostile guest could turn the host's journal into its own disk-filling
//! channel; with it, the first lines of each window are kept (they explain the problem)
//! and the rest are counted.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per window.
const BURST: u32 = 50;
/// Length of a window.
const WINDOW: Duration = Duration::from_secs(10);

struct Budget {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

static BUDGET: Mutex<Budget> = Mutex::new(Budget {
    window_start: None,
    logged: 0,
    suppressed: 0,
});

/// Whether one more guest-triggered line may be logged now.
pub fn allow() -> bool {
    let Ok(mut b) = BUDGET.lock() else {
        return false;
    };
    let now = Instant::now();
    if b.window_start
        .is_none_or(|start| now.duration_since(start) >= WINDOW)
    {
        if b.suppressed > 0 {
            log::warn!(
                "{} more guest-triggered warning(s) suppressed in the last {WINDOW:?}",
                b.suppressed
            );
        }
        *b = Budget {
            window_start: Some(now),
            logged: 0,
            suppressed: 0,
        };
    }
    if b.logged < BURST {
        b.logged += 1;
        true
    } else {
        b.suppressed += 1;
        false
    }
}

/// `log::warn!` for conditions a guest controls, rate limited.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if $crate::guest_log::allow() {
            log::warn!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppressed() {
        let allowed = (0..BURST * 3).filter(|_| allow()).count() as u32;
        assert_eq!(allowed, BURST);
    }
}
