//! Line logs of child processes (the guest's serial console, QEMU's and the backends'
//! stderr), with bounded waits for a line.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    lines: Vec<String>,
    open_streams: usize,
}

/// A growing list of output lines, shared with the reader threads.
pub struct Lines {
    name: String,
    state: Mutex<State>,
    cond: Condvar,
}

/// Why a wait for a line ended without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitError {
    /// The bound ran out.
    TimedOut,
    /// Every stream was closed (the process exited).
    Closed,
    /// A line matched the failure predicate; here it is.
    Failed(String),
}

impl Lines {
    /// An empty log called `name` (used as the echo prefix).
    pub fn new(name: &str) -> Arc<Lines> {
        Arc::new(Lines {
            name: name.to_string(),
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `stream` line by line on a thread ('\r' dropped, invalid UTF-8 replaced),
    /// echoing each line to stderr (shown by the test harness when a test fails).
    pub fn spawn_reader(self: &Arc<Self>, stream: impl Read + Send + 'static) {
        let me = self.clone();
        me.lock().open_streams += 1;
        let spawned = std::thread::Builder::new()
            .name(format!("lines-{}", self.name))
            .spawn(move || {
                let mut r = BufReader::new(stream);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .replace('\r', "");
                    eprintln!("[{}] {line}", me.name);
                    me.lock().lines.push(line);
                    me.cond.notify_all();
                }
                me.lock().open_streams -= 1;
                me.cond.notify_all();
            });
        if spawned.is_err() {
            self.lock().open_streams -= 1;
        }
    }

    /// Number of lines so far.
    pub fn len(&self) -> usize {
        self.lock().lines.len()
    }

    /// Whether no line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All lines so far.
    pub fn all(&self) -> Vec<String> {
        self.lock().lines.clone()
    }

    /// The last `n` lines, joined with newlines (for failure messages).
    pub fn tail(&self, n: usize) -> String {
        let st = self.lock();
        let skip = st.lines.len().saturating_sub(n);
        if st.lines.is_empty() {
            return "    (nothing)".into();
        }
        st.lines[skip..]
            .iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (bounded) for a line at index >= `*from` matching `want`; on success returns
    /// it and moves `*from` past it. A line matching `fail` first ends the wait.
    pub fn wait_for(
        &self,
        from: &mut usize,
        want: impl Fn(&str) -> bool,
        fail: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, WaitError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            while *from < st.lines.len() {
                let line = &st.lines[*from];
                *from += 1;
                if want(line) {
                    return Ok(line.clone());
                }
                if fail(line) {
                    return Err(WaitError::Failed(line.clone()));
                }
            }
            if st.open_streams == 0 {
                return Err(WaitError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::TimedOut);
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
