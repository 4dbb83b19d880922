//! `--metrics-file` (issue 10): the device's counters in Prometheus' text format, written
//! by the broker every 2 s from the frontend's snapshots and replaced atomically
//! (`broker/src/metrics.rs`, `device-frontend/src/metrics.rs`).
//!
//! Every file read here is parsed in full (HELP and TYPE for every family, every sample
//! line `name{labels} value`, a `vm` label on each): a partial file fails the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expect, image, ok, resource_with, still_works};
use vgpu_tests::backend_req::BackendRequests;
use vgpu_tests::gpu::{format, resp, Command as Gpu};
use vgpu_tests::stack::default_binary;
use vgpu_tests::{Stack, TestVmm};

/// Bound on waiting for the file to show something: a few of the broker's 2 s periods.
const WAIT: Duration = Duration::from_secs(15);
/// How often a wait re-reads the file.
const POLL: Duration = Duration::from_millis(20);

/// One parsed metrics file: samples by series without the `vm` label, e.g.
/// `vgpu_commands_total{type="RESOURCE_FLUSH"}` or `vgpu_resources`.
#[derive(Debug)]
struct Metrics {
    samples: BTreeMap<String, f64>,
    text: String,
}

impl Metrics {
    /// Parses `text`, checking the format; Err says what is wrong.
    fn parse(text: &str) -> Result<Metrics, String> {
        if !text.ends_with('\n') {
            return Err("does not end with a line feed".into());
        }
        let mut help = BTreeSet::new();
        let mut types = BTreeMap::new();
        let mut samples = BTreeMap::new();
        let mut vm = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').ok_or(format!("bad HELP: {line}"))?;
                if doc.is_empty() || !help.insert(name.to_string()) {
                    return Err(format!("empty or repeated HELP: {line}"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
                if !["counter", "gauge", "histogram"].contains(&kind) {
                    return Err(format!("unknown type: {line}"));
                }
                if !help.contains(name) || types.insert(name.to_string(), kind).is_some() {
                    return Err(format!("TYPE without HELP, or repeated: {line}"));
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
            let value: f64 = value.parse().map_err(|_| format!("bad value: {line}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.strip_suffix('}').ok_or(format!("unclosed: {line}"))?)
                        .map_err(|e| format!("{e}: {line}"))?,
                ),
                None => (series, Vec::new()),
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(format!("bad metric name: {line}"));
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|s| name.strip_suffix(s))
                .find(|base| types.get(*base) == Some(&"histogram"))
                .unwrap_or(name);
            match types.get(family) {
                None => return Err(format!("sample before its HELP and TYPE: {line}")),
                Some(&"counter") if !family.ends_with("_total") => {
                    return Err(format!("counter not named *_total: {line}"))
                }
                Some(_) => {}
            }
            let mut rest = Vec::new();
            for (k, v) in labels {
                if k == "vm" {
                    match &vm {
                        None => vm = Some(v),
                        Some(seen) if *seen == v => {}
                        Some(seen) => return Err(format!("vm {v:?} after {seen:?}: {line}")),
                    }
                } else {
                    rest.push(format!("{k}=\"{v}\""));
                }
            }
            if vm.is_none() {
                return Err(format!("no vm label: {line}"));
            }
            let key = if rest.is_empty() {
                name.to_string()
            } else {
                format!("{name}{{{}}}", rest.join(","))
            };
            if samples.insert(key, value).is_some() {
                return Err(format!("repeated series: {line}"));
            }
        }
        if samples.is_empty() {
            return Err("no samples".into());
        }
        Ok(Metrics {
            samples,
            text: text.to_string(),
        })
    }

    /// A sample that must be there.
    #[track_caller]
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in:\n{}", self.text))
    }

    fn command(&self, type_: &str) -> f64 {
        self.get(&format!("vgpu_commands_total{{type=\"{type_}\"}}"))
    }

    fn error(&self, code: &str) -> f64 {
        self.get(&format!("vgpu_command_errors_total{{code=\"{code}\"}}"))
    }

    /// The sum of a labelled family's samples.
    fn sum(&self, family: &str) -> f64 {
        let prefix = format!("{family}{{");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
    }
}

/// `k="v",k2="v2"` with the text format's escapes.
fn parse_labels(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        if chars.next() != Some('"') {
            return Err("label value not quoted".into());
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('\\') => value.push('\\'),
                    Some('"') => value.push('"'),
                    Some('n') => value.push('\n'),
                    _ => return Err("bad escape".into()),
                },
                Some(c) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        }
        out.push((key, value));
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(c) => return Err(format!("{c:?} after a label")),
        }
    }
    Ok(out)
}

/// Reads and parses the file; None while it does not exist. A file that exists but does
/// not parse fails the test (a reader must never see a partial file).
#[track_caller]
fn read(path: &Path) -> Option<Metrics> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("reading {}: {e}", path.display()),
    };
    Some(
        Metrics::parse(&text)
            .unwrap_or_else(|e| panic!("{} is not valid: {e}\n{text}", path.display())),
    )
}

/// Waits (bounded by [`WAIT`]) until the file satisfies `done`.
#[track_caller]
fn wait_for(path: &Path, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    let deadline = Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Some(m) = read(path) {
            if done(&m) {
                return m;
            }
            last = Some(m.text);
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: not in {} within {WAIT:?}; last content:\n{}",
                path.display(),
                last.as_deref().unwrap_or("(no file)")
            );
        }
        std::thread::sleep(POLL);
    }
}

/// A scratch directory and the metrics file's path in it.
fn metrics_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-metrics-test")
        .tempdir()
        .expect("tempdir");
    let path = dir.path().join("vgpu.prom");
    (dir, path)
}

fn start(path: &Path, more: &[&str]) -> Stack {
    let mut args = vec!["--metrics-file", path.to_str().expect("utf-8 path")];
    args.extend_from_slice(more);
    Stack::start(&args).unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"))
}

fn connect(stack: &Stack) -> TestVmm {
    stack.connect().unwrap_or_else(|e| {
        panic!(
            "test VMM set-up failed: {e}\nvgpu-sandbox output:\n{}",
            stack.log_text()
        )
    })
}

#[test]
fn counters_reflect_exactly_the_commands_sent() {
    let (_dir, path) = metrics_path();
    let stack = start(&path, &[]);
    let first = wait_for(&path, "the first file", |_| true);
    assert_eq!(first.sum("vgpu_commands_total"), 0.0, "{}", first.text);
    assert_eq!(
        first.get("vgpu_host_memory_limit_bytes"),
        (1024 << 20) as f64
    );
    let mut vmm = connect(&stack);

    let (w, h) = (64u32, 32u32);
    let bytes = f64::from(w * h * 4);
    for id in 1..=3 {
        ok(
            "RESOURCE_CREATE_2D",
            vmm.gpu()
                .resource_create_2d(id, format::B8G8R8X8_UNORM, w, h),
        );
    }
    expect(
        "RESOURCE_UNREF of an unknown id",
        vmm.gpu().resource_unref(99),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    let m = wait_for(&path, "3 creates and 1 unref", |m| {
        m.command("RESOURCE_CREATE_2D") == 3.0 && m.command("RESOURCE_UNREF") == 1.0
    });
    assert_eq!(m.sum("vgpu_commands_total"), 4.0, "{}", m.text);
    assert_eq!(m.error("ERR_INVALID_RESOURCE_ID"), 1.0);
    assert_eq!(m.sum("vgpu_command_errors_total"), 1.0, "{}", m.text);
    assert_eq!(m.get("vgpu_resources"), 3.0);
    assert_eq!(m.get("vgpu_host_memory_bytes"), 3.0 * bytes);
    assert_eq!(m.get("vgpu_fences_total"), 0.0);
    assert_eq!(m.get("vgpu_blobs"), 0.0);

    ok("RESOURCE_UNREF 1", vmm.gpu().resource_unref(1));
    let m = wait_for(&path, "the unref", |m| m.command("RESOURCE_UNREF") == 2.0);
    assert_eq!(m.get("vgpu_resources"), 2.0);
    assert_eq!(m.get("vgpu_host_memory_bytes"), 2.0 * bytes);

    // Create, attach, transfer 16x8 pixels; then one fenced command.
    resource_with(
        &mut vmm,
        10,
        format::B8G8R8X8_UNORM,
        16,
        8,
        &image(16, 8, 1),
    );
    let create = Gpu::ResourceCreate2d {
        resource_id: 11,
        format: format::B8G8R8X8_UNORM,
        width: 8,
        height: 8,
    };
    ok(
        "fenced RESOURCE_CREATE_2D",
        vmm.gpu().execute_fenced(&create, 1),
    );
    let m = wait_for(&path, "the transfer and the fence", |m| {
        m.get("vgpu_fences_total") == 1.0
    });
    assert_eq!(m.command("TRANSFER_TO_HOST_2D"), 1.0);
    assert_eq!(m.command("RESOURCE_ATTACH_BACKING"), 1.0);
    assert_eq!(m.command("RESOURCE_CREATE_2D"), 5.0);
    assert_eq!(m.get("vgpu_transfer_to_host_bytes_total"), 16.0 * 8.0 * 4.0);
    assert_eq!(m.sum("vgpu_commands_total"), 9.0, "{}", m.text);
    assert_eq!(m.get("vgpu_resources"), 4.0);
    assert_eq!(m.get("vgpu_renderer_restarts_total"), 0.0);
}

#[test]
fn file_is_replaced_atomically_and_removed_at_exit() {
    let (dir, path) = metrics_path();
    let mut stack = start(&path, &[]);
    let deadline = Instant::now() + WAIT * 2;
    let mut stamps = BTreeSet::new();
    let mut inodes = BTreeSet::new();
    let mut reads = 0u32;
    // Every read parses (`read` fails the test otherwise), over at least three writes.
    while stamps.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "saw only {} write(s) in {:?}",
            stamps.len(),
            WAIT * 2
        );
        if let Ok(meta) = std::fs::metadata(&path) {
            inodes.insert(meta.ino());
        }
        if let Some(m) = read(&path) {
            stamps.insert(m.get("vgpu_metrics_timestamp_seconds").to_bits());
            reads += 1;
        }
        std::thread::sleep(POLL);
    }
    assert!(reads > 10, "only {reads} reads");
    // Each write is a new file renamed over the old one, never a rewrite in place.
    assert!(inodes.len() >= 3, "inodes seen: {inodes:?}");
    let status = stack
        .terminate(WAIT)
        .unwrap_or_else(|e| panic!("SIGTERM: {e}"));
    assert_eq!(status.code(), Some(0), "{}", stack.log_text());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in the metrics directory: {left:?}");
}

#[test]
fn renderer_restarts_are_counted() {
    let (_dir, path) = metrics_path();
    let mut stack = start(&path, &[]);
    let mut vmm = connect(&stack);
    ok(
        "RESOURCE_CREATE_2D",
        vmm.gpu()
            .resource_create_2d(1, format::B8G8R8X8_UNORM, 16, 16),
    );
    common::kill_renderer_until_linked(&mut stack, 1, WAIT);
    let m = wait_for(&path, "one renderer restart", |m| {
        m.get("vgpu_renderer_restarts_total") == 1.0
    });
    // The frontend's counters go on across the restart.
    assert_eq!(m.command("RESOURCE_CREATE_2D"), 1.0);
    still_works(&mut vmm, "the renderer restart");
}

#[test]
fn bad_metrics_directory_is_one_line_and_exit_1() {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-metrics-bad")
        .tempdir()
        .expect("tempdir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").expect("a plain file");
    for (path, why) in [
        (dir.path().join("missing/vgpu.prom"), "directory"),
        (file.join("vgpu.prom"), "directory"),
        (dir.path().to_path_buf(), "is a directory"),
    ] {
        let socket = dir.path().join("vgpu.sock");
        let mut child = Command::new(default_binary().unwrap_or_else(|e| panic!("{e}")))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--metrics-file")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning vgpu-sandbox");
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "--metrics-file {}: still running after {WAIT:?}",
                    path.display()
                );
            }
            std::thread::sleep(POLL);
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
            .expect("stderr");
        assert_eq!(status.code(), Some(1), "{}: {stderr}", path.display());
        let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(lines.len(), 1, "one error line expected:\n{stderr}");
        let want = format!("--metrics-file {}: ", path.display());
        assert!(
            lines[0].contains(&want) && lines[0].contains(why),
            "{}: {stderr}",
            path.display()
        );
        assert!(!socket.exists(), "the socket was bound before the check");
    }
}

// --- blobs: the map and unmap latency histograms (the hostmem fixture of blobs.rs) ---

const HOSTMEM: u64 = 64 << 20;
const CTX: u32 = 1;
const RING: u32 = 100;
const BLOB: u32 = 7;

/// A cross-domain context with its query ring, then a mappable HOST3D blob `BLOB`.
fn context_and_blob(vmm: &mut TestVmm) {
    let ring_addr = common::cross_domain_context(vmm, CTX, RING);
    common::mappable_host_blob(vmm, CTX, ring_addr, BLOB, 64, 64);
}

#[test]
fn map_and_unmap_latencies_are_counted() {
    let (_dir, path) = metrics_path();
    let stack = start(&path, &["--hostmem", "64M"]);
    let mut vmm = common::connect_hostmem(&stack, HOSTMEM);
    let reqs: Arc<BackendRequests> = vmm.backend_requests().expect("backend requests").clone();
    context_and_blob(&mut vmm);
    expect(
        "RESOURCE_MAP_BLOB",
        vmm.gpu().resource_map_blob(BLOB, 0),
        resp::OK_MAP_INFO,
    );
    let m = wait_for(&path, "one map", |m| {
        m.get("vgpu_map_latency_seconds_count") == 1.0
    });
    assert_eq!(m.get("vgpu_mappings"), 1.0);
    assert_eq!(m.get("vgpu_blobs"), 2.0, "the query ring and the blob");
    assert_eq!(m.get("vgpu_map_latency_seconds_bucket{le=\"+Inf\"}"), 1.0);
    assert!(m.get("vgpu_map_latency_seconds_sum") > 0.0);
    assert_eq!(m.get("vgpu_unmap_latency_seconds_count"), 0.0);

    ok("RESOURCE_UNMAP_BLOB", vmm.gpu().resource_unmap_blob(BLOB));
    let m = wait_for(&path, "one unmap", |m| {
        m.get("vgpu_unmap_latency_seconds_count") == 1.0
    });
    assert_eq!(m.get("vgpu_mappings"), 0.0);
    assert_eq!(m.get("vgpu_unmap_latency_seconds_bucket{le=\"+Inf\"}"), 1.0);
    assert_eq!(m.command("RESOURCE_MAP_BLOB"), 1.0);
    assert_eq!(m.command("RESOURCE_UNMAP_BLOB"), 1.0);
    assert!(reqs.violations().is_empty(), "{}", reqs.summary());
}
