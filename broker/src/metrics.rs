//! `--metrics-file PATH`: the device's metrics in Prometheus' text format (0.0.4), for
//! node_exporter's textfile collector, without opening any network port.
//!
//! The counters live in the device-frontend, which has no file system: it sends a
//! snapshot every [`PERIOD`] on its status channel (`device-frontend/src/metrics.rs`); the
//! broker's thread that receives it hands it to a writer thread of its own (so a slow disk
//! never backs up into the frontend's sends), which writes the file, adding what only the
//! broker knows (renderer restarts). The jailed broker cannot open a path: the file's directory is
//! opened at start (`O_PATH`), and its filter allows exactly one `openat`, relative to
//! that directory and with [`policy::METRICS_OPEN_FLAGS`], and `renameat` within it
//! (`policy/src/seccomp/broker.rs`). Each write goes to `.NAME.tmp` and is renamed over
//! `NAME`, so a reader (node_exporter) sees the old file or the new one, never a part.

use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use protocol::metrics::{
    command_name, error_name, Histogram, MetricsSnapshot, COMMAND_KINDS, ERROR_KINDS,
    LATENCY_BUCKETS_NS,
};

/// How often the frontend reports: a fraction of node_exporter's usual 15 s scrape, for a
/// message of a few hundred bytes and one small file write.
pub const PERIOD: Duration = Duration::from_secs(2);

/// The shortest time between two writes, whatever the frontend sends.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// The metrics file and what the broker adds to the frontend's snapshots.
pub struct MetricsFile {
    /// The file's directory (`O_PATH`): the only directory the jailed broker can write in.
    dir: OwnedFd,
    path: String,
    name: CString,
    tmp: CString,
    /// The `vm` label's value, quoted and escaped: `vm="name"`.
    vm_label: String,
    /// Renderer-workers replaced so far (bumped by the supervisor thread).
    renderer_restarts: Arc<AtomicU64>,
    state: Mutex<State>,
    /// Tells the writer thread a snapshot came (or the file was removed).
    wake: Condvar,
    /// Held across a write and across the removal, so a write never brings the file back.
    io: Mutex<()>,
}

struct State {
    last: MetricsSnapshot,
    /// `last` has not been written yet.
    fresh: bool,
    /// Removed on the way out: a snapshot still in flight must not bring it back.
    removed: bool,
    /// The last write failed (logged once until one succeeds again).
    failing: bool,
    /// When the file was last written.
    written: Option<Instant>,
}

impl MetricsFile {
    /// Opens `path`'s directory and writes a first file (all zero) there, which proves the
    /// directory exists and is writable before anything starts; an Err is one line for
    /// the user. `limit` is the host memory limit, `vm` the VM's name.
    pub fn create(
        path: &Path,
        vm: &str,
        limit: u64,
        renderer_restarts: Arc<AtomicU64>,
    ) -> Result<Arc<MetricsFile>, String> {
        let shown = path.display().to_string();
        let bad = |why: &str| format!("--metrics-file {shown}: {why}");
        let Some(name) = path.file_name() else {
            return Err(bad("not a file name"));
        };
        if path.is_dir() {
            return Err(bad("is a directory"));
        }
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir_fd = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| bad(&format!("directory {}: {}", dir.display(), e.desc())))?;
        let cstring = |bytes: &[u8]| CString::new(bytes).map_err(|_| bad("contains a NUL byte"));
        let mut tmp = b".".to_vec();
        tmp.extend_from_slice(name.as_bytes());
        tmp.extend_from_slice(b".tmp");
        let last = MetricsSnapshot {
            host_memory_limit_bytes: limit,
            ..MetricsSnapshot::default()
        };
        let file = MetricsFile {
            dir: dir_fd,
            path: shown.clone(),
            name: cstring(name.as_bytes())?,
            tmp: cstring(&tmp)?,
            vm_label: format!("vm=\"{}\"", escape_label(OsStr::new(vm))),
            renderer_restarts,
            wake: Condvar::new(),
            io: Mutex::new(()),
            state: Mutex::new(State {
                last,
                fresh: false,
                removed: false,
                failing: false,
                written: None,
            }),
        };
        let state = file.state.lock().map_err(|_| bad("lock poisoned"))?;
        file.write(&state.last)
            .map_err(|e| bad(&format!("cannot write in {}: {}", dir.display(), e.desc())))?;
        drop(state);
        if path.extension() != Some(OsStr::new("prom")) {
            log::warn!(
                "--metrics-file {shown}: node_exporter's textfile collector reads only *.prom \
                 files"
            );
        }
        Ok(Arc::new(file))
    }

    /// The directory's descriptor number, which the broker's filter is built for.
    pub fn dir_fd(&self) -> RawFd {
        self.dir.as_raw_fd()
    }

    /// Takes `snapshot` (the frontend's latest) for the writer thread. Never waits for the
    /// disk: the frontend's status messages are received here, and a receiver stuck on a
    /// hung file system would in time block the frontend's sends, and its virtqueues. The
    /// snapshot holds only numbers, and every name and label is the broker's own, so a
    /// frontend taken over can make the file lie but not break its format; it also cannot
    /// make the broker write more than once per [`MIN_INTERVAL`].
    pub fn update(&self, snapshot: MetricsSnapshot) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.last = snapshot;
        state.fresh = true;
        self.wake.notify_one();
    }

    /// Starts the thread that writes what [`MetricsFile::update`] took, at most once per
    /// [`MIN_INTERVAL`], until the file is removed.
    pub fn start_writer(self: &Arc<Self>) -> Result<(), String> {
        let file = Arc::clone(self);
        std::thread::Builder::new()
            .name("metrics-writer".into())
            .spawn(move || file.write_loop())
            .map(|_| ())
            .map_err(|e| format!("--metrics-file {}: starting its writer: {e}", self.path))
    }

    fn write_loop(&self) {
        loop {
            let snapshot = {
                let Ok(mut state) = self.state.lock() else {
                    return;
                };
                loop {
                    if state.removed {
                        return;
                    }
                    let wait = state
                        .written
                        .map_or(Duration::ZERO, |t| MIN_INTERVAL.saturating_sub(t.elapsed()));
                    state = match (state.fresh, wait.is_zero()) {
                        (true, true) => break,
                        (true, false) => match self.wake.wait_timeout(state, wait) {
                            Ok((s, _)) => s,
                            Err(_) => return,
                        },
                        (false, _) => match self.wake.wait(state) {
                            Ok(s) => s,
                            Err(_) => return,
                        },
                    };
                }
                state.fresh = false;
                state.written = Some(Instant::now());
                state.last.clone()
            };
            let Ok(_io) = self.io.lock() else {
                return;
            };
            if self.state.lock().map_or(true, |s| s.removed) {
                return;
            }
            let result = self.write(&snapshot);
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            match result {
                Ok(()) if state.failing => {
                    state.failing = false;
                    log::info!("--metrics-file {}: written again", self.path);
                }
                Ok(()) => {}
                Err(e) if !state.failing => {
                    state.failing = true;
                    log::warn!("--metrics-file {}: not written: {}", self.path, e.desc());
                }
                Err(_) => {}
            }
        }
    }

    /// Removes the file (the device is gone: node_exporter should stop exporting it).
    pub fn remove(&self) {
        let _io = self.io.lock();
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.removed = true;
        self.wake.notify_one();
        for name in [&self.name, &self.tmp] {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                name.as_c_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    /// Write to the temporary name, then rename it over the real one. No fsync: after a
    /// host crash a stale or empty file is harmless (the next write, 2 s later, replaces
    /// it), and the filter stays one call smaller.
    fn write(&self, snapshot: &MetricsSnapshot) -> nix::Result<()> {
        let text = render(
            snapshot,
            self.renderer_restarts.load(Ordering::Relaxed),
            &self.vm_label,
            SystemTime::now(),
        );
        let fd = nix::fcntl::openat(
            &self.dir,
            self.tmp.as_c_str(),
            OFlag::from_bits_retain(policy::METRICS_OPEN_FLAGS),
            Mode::from_bits_truncate(0o644),
        )?;
        let mut file = std::fs::File::from(fd);
        let written = file.write_all(text.as_bytes());
        drop(file);
        let renamed = written
            .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(|()| {
                nix::fcntl::renameat(
                    self.dir.as_fd(),
                    self.tmp.as_c_str(),
                    self.dir.as_fd(),
                    self.name.as_c_str(),
                )
            });
        if renamed.is_err() {
            let _ = nix::unistd::unlinkat(
                &self.dir,
                self.tmp.as_c_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        renamed
    }
}

/// A label value as the text format wants it: backslash, double quote and line feed
/// escaped.
fn escape_label(value: &OsStr) -> String {
    let mut out = String::new();
    for c in value.to_string_lossy().chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The file's text. `vm_label` is `vm="..."`, or empty for no label.
pub fn render(
    s: &MetricsSnapshot,
    renderer_restarts: u64,
    vm_label: &str,
    now: SystemTime,
) -> String {
    let mut t = Text {
        out: String::with_capacity(8192),
        vm_label,
    };
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let name = "vgpu_metrics_timestamp_seconds";
    t.head(
        name,
        "gauge",
        "When the broker wrote this file (Unix time).",
    );
    t.sample(name, "", format_args!("{secs:.3}"));

    let name = "vgpu_commands_total";
    t.head(name, "counter", "Guest commands answered, by command type.");
    for (i, n) in s.commands.iter().enumerate().take(COMMAND_KINDS) {
        let label = format!("type=\"{}\"", command_name(i));
        t.sample(name, &label, format_args!("{n}"));
    }
    let name = "vgpu_command_errors_total";
    t.head(
        name,
        "counter",
        "Guest commands answered with an error, by VIRTIO_GPU_RESP_ code.",
    );
    for (i, n) in s.errors.iter().enumerate().take(ERROR_KINDS) {
        let label = format!("code=\"{}\"", error_name(i));
        t.sample(name, &label, format_args!("{n}"));
    }
    for (name, kind, help, value) in [
        (
            "vgpu_fences_total",
            "counter",
            "Fenced commands answered (fences signalled to the guest).",
            s.fences,
        ),
        (
            "vgpu_transfer_to_host_bytes_total",
            "counter",
            "Bytes copied from guest memory by successful TRANSFER_TO_HOST_2D commands.",
            s.transfer_to_host_bytes,
        ),
        (
            "vgpu_display_updates_total",
            "counter",
            "Display updates sent to the VMM.",
            s.display_updates,
        ),
        (
            "vgpu_display_update_bytes_total",
            "counter",
            "Pixel bytes in display updates sent to the VMM.",
            s.display_update_bytes,
        ),
        (
            "vgpu_resources",
            "gauge",
            "Live guest resources (2D, 3D and blobs).",
            s.resources,
        ),
        ("vgpu_blobs", "gauge", "Live blob resources.", s.blobs),
        (
            "vgpu_mappings",
            "gauge",
            "Blobs holding a range of the host-visible window.",
            s.mappings,
        ),
        (
            "vgpu_host_memory_bytes",
            "gauge",
            "Host memory charged to the guest: resources, blobs and scanout buffers.",
            s.host_memory_bytes,
        ),
        (
            "vgpu_host_memory_limit_bytes",
            "gauge",
            "The per-VM limit on that (--max-resource-memory).",
            s.host_memory_limit_bytes,
        ),
        (
            "vgpu_renderer_restarts_total",
            "counter",
            "Renderer-workers that died and were replaced.",
            renderer_restarts,
        ),
    ] {
        t.head(name, kind, help);
        t.sample(name, "", format_args!("{value}"));
    }
    for (name, what, h) in [
        (
            "vgpu_map_latency_seconds",
            "RESOURCE_MAP_BLOB",
            &s.map_latency,
        ),
        (
            "vgpu_unmap_latency_seconds",
            "RESOURCE_UNMAP_BLOB",
            &s.unmap_latency,
        ),
    ] {
        let help = format!("{what} latency, from the command's arrival to its successful answer.");
        t.head(name, "histogram", &help);
        t.histogram(name, h);
    }
    t.out
}

/// The text being written, with the `vm` label every sample carries.
struct Text<'a> {
    out: String,
    vm_label: &'a str,
}

impl Text<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line; `label` is `key="value"` or empty.
    fn sample(&mut self, name: &str, label: &str, value: std::fmt::Arguments<'_>) {
        let labels = match (self.vm_label.is_empty(), label.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("{{{label}}}"),
            (false, true) => format!("{{{}}}", self.vm_label),
            (false, false) => format!("{{{},{label}}}", self.vm_label),
        };
        let _ = writeln!(self.out, "{name}{labels} {value}");
    }

    fn histogram(&mut self, name: &str, h: &Histogram) {
        let bucket = format!("{name}_bucket");
        for (bound, n) in LATENCY_BUCKETS_NS.iter().zip(h.cumulative()) {
            let le = *bound as f64 / 1e9;
            self.sample(&bucket, &format!("le=\"{le}\""), format_args!("{n}"));
        }
        self.sample(&bucket, "le=\"+Inf\"", format_args!("{}", h.count));
        let sum = h.sum_ns as f64 / 1e9;
        self.sample(&format!("{name}_sum"), "", format_args!("{sum}"));
        self.sample(&format!("{name}_count"), "", format_args!("{}", h.count));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_help_type_and_labels() {
        let mut s = MetricsSnapshot::default();
        s.commands[protocol::metrics::command_index(0x0101)] = 3;
        s.errors
            [protocol::metrics::error_index(protocol::virtio_gpu::ErrorCode::InvalidResourceId)] =
            1;
        s.map_latency.observe(Duration::from_micros(70));
        let vm = format!("vm=\"{}\"", escape_label(OsStr::new("a\"b")));
        let text = render(
            &s,
            2,
            &vm,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
        );
        assert!(text.contains("vgpu_metrics_timestamp_seconds{vm=\"a\\\"b\"} 1.500\n"));
        assert!(text.contains("vgpu_commands_total{vm=\"a\\\"b\",type=\"RESOURCE_CREATE_2D\"} 3\n"));
        assert!(text.contains("code=\"ERR_INVALID_RESOURCE_ID\"} 1\n"));
        assert!(text.contains("vgpu_renderer_restarts_total{vm=\"a\\\"b\"} 2\n"));
        assert!(text.contains("vgpu_map_latency_seconds_bucket{vm=\"a\\\"b\",le=\"0.00005\"} 0\n"));
        assert!(text.contains("vgpu_map_latency_seconds_bucket{vm=\"a\\\"b\",le=\"0.0001\"} 1\n"));
        assert!(text.contains("vgpu_map_latency_seconds_count{vm=\"a\\\"b\"} 1\n"));
        let unlabelled = render(&s, 0, "", SystemTime::UNIX_EPOCH);
        assert!(unlabelled.contains("vgpu_blobs 0\n"));
        assert!(unlabelled.contains("vgpu_commands_total{type=\"GET_DISPLAY_INFO\"} 0\n"));
    }
}
