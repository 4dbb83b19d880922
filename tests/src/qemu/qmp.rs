//! A QMP client over a unix socket: greeting, `qmp_capabilities`, commands, events skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP connection in command mode.
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Asynchronous events received so far (e.g. SHUTDOWN), in order.
    pub events: Vec<Value>,
    /// QEMU's version from the greeting, e.g. "10.0.2".
    pub version: String,
}

impl Qmp {
    /// Connects to `path`, reads the greeting and enters command mode, all within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("QMP: cannot connect to {}: {e}", path.display()))?;
        let reader = stream
            .try_clone()
            .map_err(|e| format!("QMP: dup socket: {e}"))?;
        let mut qmp = Qmp {
            writer: stream,
            reader: BufReader::new(reader),
            events: Vec::new(),
            version: String::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = qmp.read_message(deadline, "the QMP greeting")?;
        let v = &greeting["QMP"]["version"]["qemu"];
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        qmp.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        qmp.execute_until("qmp_capabilities", None, deadline)?;
        Ok(qmp)
    }

    fn read_message(&mut self, deadline: Instant, what: &str) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("QMP: no {what} before the deadline"));
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(deadline - now))
                .map_err(|e| format!("QMP: set_read_timeout: {e}"))?;
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(format!("QMP: connection closed while waiting for {what}")),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(format!("QMP: no {what} before the deadline"))
                }
                Err(e) => return Err(format!("QMP: read error while waiting for {what}: {e}")),
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .map_err(|e| format!("QMP: bad JSON {line:?}: {e}"));
        }
    }

    fn execute_until(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("QMP: sending {command}: {e}"))?;
        let what = format!("reply to {command}");
        loop {
            let m = self.read_message(deadline, &what)?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(format!("QMP: {command} failed: {e}"));
            }
            return Err(format!(
                "QMP: unexpected message {m} while waiting for {what}"
            ));
        }
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, String> {
        self.execute_until(command, arguments, Instant::now() + timeout)
    }

    /// `screendump` of the primary console into `file` as PPM.
    pub fn screendump(&mut self, file: &Path, timeout: Duration) -> Result<(), String> {
        self.execute(
            "screendump",
            Some(json!({ "filename": file.to_string_lossy(), "format": "ppm" })),
            timeout,
        )
        .map(|_| ())
    }

    /// `quit`: QEMU acknowledges, then exits.
    pub fn quit(&mut self, timeout: Duration) -> Result<(), String> {
        self.execute("quit", None, timeout).map(|_| ())
    }
}
