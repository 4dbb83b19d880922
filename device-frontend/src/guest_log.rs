//! A rate limit for log lines a guest can trigger at will (every refused command logs why).
//! Without it a hostile guest could turn the host's journal into its own disk-filling
//! channel; with it, the first lines of each window are kept (they explain the problem),
//! one line says that the rest is being dropped, and the rest are counted.
//!
//! The count of a window is logged with the first guest-triggered line after the window
//! ended, not by a timer: the frontend is jailed (no new threads, no timers) and a guest
//! that went quiet has nothing more to report anyway.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines let through per window.
const BURST: u32 = 50;
/// Length of a window.
const WINDOW: Duration = Duration::from_secs(10);

/// One window's budget.
struct RateLimit {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// What to do with one guest-triggered line.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    /// Log the line.
    allow: bool,
    /// A window ended with this many lines dropped: say so first.
    ended_with_suppressed: Option<u64>,
    /// This is the window's first dropped line: say that the rest will be dropped.
    starts_suppressing: bool,
}

impl RateLimit {
    const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    fn check(&mut self, now: Instant) -> Verdict {
        let mut ended_with_suppressed = None;
        if self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window)
        {
            ended_with_suppressed = Some(self.suppressed).filter(|&n| n > 0);
            self.window_start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        let allow = self.logged < self.burst;
        if allow {
            self.logged += 1;
        } else {
            self.suppressed += 1;
        }
        Verdict {
            allow,
            ended_with_suppressed,
            starts_suppressing: self.suppressed == 1 && !allow,
        }
    }
}

static LIMIT: Mutex<RateLimit> = Mutex::new(RateLimit::new(BURST, WINDOW));

/// Whether one more guest-triggered line may be logged now; logs the window's notices.
pub fn allow() -> bool {
    // A poisoned lock only means a panic elsewhere while counting: the counts still hold.
    let verdict = LIMIT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check(Instant::now());
    // Logged outside the lock: a slow stderr must not hold up the other queue's thread.
    if let Some(n) = verdict.ended_with_suppressed {
        log::warn!("suppressed {n} guest-triggered warning(s) in the last {WINDOW:?}");
    }
    if verdict.starts_suppressing {
        log::warn!(
            "more than {BURST} guest-triggered warnings within {WINDOW:?}: suppressing the \
             rest of this window (their count follows)"
        );
    }
    verdict.allow
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
    fn burst_then_suppressed_then_counted_when_the_window_ends() {
        let mut limit = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..10).map(|_| limit.check(t0)).collect();
        assert_eq!(verdicts.iter().filter(|v| v.allow).count(), 3);
        assert!(verdicts[..3].iter().all(|v| v.allow));
        let notices: Vec<usize> = (0..10)
            .filter(|&i| verdicts[i].starts_suppressing)
            .collect();
        assert_eq!(notices, [3], "one notice, at the first dropped line");
        assert!(verdicts.iter().all(|v| v.ended_with_suppressed.is_none()));

        // Still inside the window: dropped, no second notice.
        let v = limit.check(t0 + Duration::from_millis(9_999));
        assert!(!v.allow && !v.starts_suppressing && v.ended_with_suppressed.is_none());

        // The next line after the window reports the 8 dropped ones and is logged itself.
        let v = limit.check(t0 + Duration::from_secs(10));
        assert_eq!(
            v,
            Verdict {
                allow: true,
                ended_with_suppressed: Some(8),
                starts_suppressing: false,
            }
        );
        // A window without drops ends without a summary.
        let v = limit.check(t0 + Duration::from_secs(25));
        assert_eq!(v.ended_with_suppressed, None);
        assert!(v.allow);
    }

    #[test]
    fn the_shared_limit_lets_a_burst_through() {
        // Other tests of this crate may spend some of the same budget meanwhile.
        let allowed = (0..BURST * 3).filter(|_| allow()).count() as u32;
        assert!(allowed <= BURST, "{allowed} lines let through");
    }
}
