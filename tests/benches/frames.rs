//! vgpu-sandbox against QEMU's own `vhost-user-gpu`, driven by the same test VMM with the
//! same guest workload. See docs/BENCHMARKS.md for what each number means.
//!
//! ```text
//! cargo build --release -p vgpu-sandbox
//! VGPU_REFERENCE_BACKEND=$(scripts/fetch-reference-backend.sh) \
//!     cargo bench -p vgpu-tests --bench frames -- [--backend ours|reference|both]
//!     [--frames N] [--size WxH] [--reps R] [--warmup W] [--samples S] [--commands C]
//! ```
//!
//! Each repetition starts a fresh process of each backend; the two backends alternate
//! (A B, then B A) so a drift of the machine's speed hits both alike. Every figure is
//! reported as the median over the repetitions with its min and max; the ratio compares
//! the medians (and gives the range of the per-repetition ratios).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vgpu_tests::bench::{
    fmt, our_binary, percentile, reference_binary, table_row, table_rule, turned_ratio, Args,
};
use vgpu_tests::display::DisplayConfig;
use vgpu_tests::gpu::{format, resp, Rect};
use vgpu_tests::scenario::pattern;
use vgpu_tests::stack::children_of;
use vgpu_tests::{Command, DisplayEvent, Response, TestVmm, VmmOptions};

const SCANOUT: u32 = 0;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Distinct full-frame patterns: one primes the scanout, the loop cycles through the rest
/// (consecutive frames differ).
const PATTERNS: u32 = 4;
/// Commands in flight at once in the pipelined round-trip test (queue has 256 descriptors).
const WINDOW: usize = 128;
/// Side of the small damage rectangle.
const DAMAGE: u32 = 64;

type BenchResult<T> = Result<T, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ours,
    Reference,
}

struct Backend {
    kind: Kind,
    bin: PathBuf,
    label: String,
}

#[derive(Clone, Debug)]
struct Options {
    backends: String,
    frames: u32,
    width: u32,
    height: u32,
    reps: usize,
    warmup: usize,
    samples: usize,
    commands: usize,
}

fn parse_args() -> BenchResult<Options> {
    let mut o = Options {
        backends: "both".into(),
        frames: 120,
        width: 1280,
        height: 800,
        reps: 7,
        warmup: 1,
        samples: 500,
        commands: 8000,
    };
    let mut args = Args::new(std::env::args().skip(1));
    while let Some((key, mut opt)) = args.next_option() {
        match key.as_str() {
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "--backend" => o.backends = opt.backends()?,
            "--frames" => o.frames = opt.num()?.clamp(1, 100_000) as u32,
            "--size" => (o.width, o.height) = opt.size(DAMAGE, 8192)?,
            "--reps" => o.reps = opt.num()?.clamp(1, 1000) as usize,
            "--warmup" => o.warmup = opt.num()?.min(100) as usize,
            "--samples" => o.samples = opt.num()?.clamp(10, 1_000_000) as usize,
            "--commands" => o.commands = opt.num()?.clamp(WINDOW as u64, 10_000_000) as usize,
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench -p vgpu-tests --bench frames -- [--backend ours|reference|both] \
                     [--frames N] [--size WxH] [--reps R] [--warmup W] [--samples S] [--commands C]\n\
                     env: VGPU_SANDBOX_BIN (default target/release/vgpu-sandbox), \
                     VGPU_REFERENCE_BACKEND (default: what scripts/fetch-reference-backend.sh cached)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    Ok(o)
}

fn our_backend() -> BenchResult<Backend> {
    let bin = our_binary(None)?;
    let out = Process::new(&bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} --version: {e}", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let profile = bin
        .parent()
        .and_then(Path::file_name)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(Backend {
        kind: Kind::Ours,
        label: format!("{version} ({profile} build)"),
        bin,
    })
}

/// `VGPU_REFERENCE_BACKEND`, else a copy cached by scripts/fetch-reference-backend.sh,
/// else the system's /usr/lib/qemu/vhost-user-gpu. None if there is none.
fn reference_backend() -> Option<Backend> {
    let bin = reference_binary()?;
    // The fetch script writes VERSION four levels above the binary
    // (<suite>/root/usr/lib/qemu/vhost-user-gpu); a system copy has dpkg's record.
    let version = bin
        .ancestors()
        .nth(5)
        .and_then(|d| fs::read_to_string(d.join("VERSION")).ok())
        .or_else(|| {
            Process::new("dpkg-query")
                .args(["-W", "-f=${Version}", "qemu-system-gui"])
                .output()
                .ok()
                .filter(|o| o.status.success() && bin.starts_with("/usr"))
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "version unknown".into());
    Some(Backend {
        kind: Kind::Reference,
        label: format!("QEMU vhost-user-gpu {version} (Debian qemu-system-gui)"),
        bin,
    })
}

/// A running backend process (for ours: the broker; its children die with it).
struct Running {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The process and its children (ours: broker, device-frontend, renderer-worker).
    fn pids(&self) -> Vec<(i32, String)> {
        let pid = self.child.id() as i32;
        let mut v = vec![(pid, "main".to_string())];
        for c in children_of(pid) {
            v.push((c.pid, c.role.to_string()));
        }
        v
    }

    fn stop(mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// On-CPU nanoseconds of every thread of `pid` so far (/proc/<pid>/task/*/schedstat).
fn cpu_ns(pid: i32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn cpu_snapshot(pids: &[(i32, String)]) -> Vec<u64> {
    pids.iter().map(|(p, _)| cpu_ns(*p)).collect()
}

/// Spawns the backend on a fresh connection and returns it with a connected test VMM and
/// the time from spawn to the first OK GET_DISPLAY_INFO.
fn start(b: &Backend, o: &Options, mem_size: u64) -> BenchResult<(Running, TestVmm, Duration)> {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-bench")
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;
    let log = dir.path().join("backend.log");
    let logf = fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
    let logf2 = logf.try_clone().map_err(|e| format!("log file: {e}"))?;
    let opts = VmmOptions {
        mem_size,
        timeout: TIMEOUT,
        display: DisplayConfig {
            outputs: vec![(o.width, o.height)],
            ..Default::default()
        },
        ..VmmOptions::default()
    };
    let mut cmd = Process::new(&b.bin);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(logf))
        .stderr(Stdio::from(logf2));
    // Both backends get an inherited fd, so neither start-up includes polling for a socket
    // file: ours wants a listening socket, QEMU's a connected one.
    let t0 = Instant::now();
    let (child, ours, inherited): (Child, UnixStream, OwnedFd) = match b.kind {
        Kind::Ours => {
            let path = dir.path().join("vgpu.sock");
            let listener = UnixListener::bind(&path).map_err(|e| format!("bind: {e}"))?;
            fcntl(&listener, FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(|e| format!("fcntl: {e}"))?;
            let child = cmd
                .arg(format!("--fd={}", listener.as_raw_fd()))
                .arg("--output")
                .arg(format!("{}x{}", o.width, o.height))
                .arg("--log-level=warn")
                .spawn()
                .map_err(|e| format!("spawn {}: {e}", b.bin.display()))?;
            // Queued in the backlog until the broker accepts it.
            let s = UnixStream::connect(&path).map_err(|e| format!("connect: {e}"))?;
            (child, s, listener.into())
        }
        Kind::Reference => {
            let (s, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(|e| format!("fcntl: {e}"))?;
            let child = cmd
                .arg(format!("--fd={}", theirs.as_raw_fd()))
                .spawn()
                .map_err(|e| format!("spawn {}: {e}", b.bin.display()))?;
            (child, s, theirs.into())
        }
    };
    drop(inherited);
    let running = Running {
        child,
        log,
        _dir: dir,
    };
    let mut vmm = match TestVmm::from_stream(ours, &opts) {
        Ok(v) => v,
        Err(e) => {
            let tail = running.log_tail();
            running.stop();
            return Err(format!("vhost-user set-up: {e}; backend output:\n{tail}"));
        }
    };
    let info = vmm.gpu().get_display_info();
    let ready = t0.elapsed();
    let info = info.map_err(|e| format!("GET_DISPLAY_INFO: {e}"))?;
    if info.kind != resp::OK_DISPLAY_INFO {
        return Err(format!("GET_DISPLAY_INFO answered {}", info.kind_name()));
    }
    let m = info.display_modes()[0];
    if (m.rect.width, m.rect.height) != (o.width, o.height) {
        return Err(format!(
            "scanout 0 is {}x{}, expected {}x{}",
            m.rect.width, m.rect.height, o.width, o.height
        ));
    }
    Ok((running, vmm, ready))
}

fn ok(what: &str, r: &Response) -> BenchResult<()> {
    if r.kind == resp::OK_NODATA {
        Ok(())
    } else {
        Err(format!("{what}: expected OK_NODATA, got {}", r.kind_name()))
    }
}

/// One repetition's figures for one backend.
#[derive(Clone, Debug, Default)]
struct Sample {
    ready_ms: f64,
    fps: f64,
    mbps: f64,
    frame_cpu_us: Vec<(String, f64)>,
    lat_median_us: f64,
    lat_p99_us: f64,
    serial_per_s: f64,
    pipelined_per_s: f64,
    serial_cpu_us: Vec<(String, f64)>,
}

fn session(b: &Backend, o: &Options, patterns: &[(Vec<u8>, u64)]) -> BenchResult<Sample> {
    let (w, h) = (o.width, o.height);
    let frame_bytes = u64::from(w) * u64::from(h) * 4;
    let (running, mut vmm, ready) = start(b, o, frame_bytes + (64 << 20))?;
    let result = measure(&running, &mut vmm, o, patterns, ready);
    let violations = vmm.display().violations();
    drop(vmm);
    let tail = running.log_tail();
    running.stop();
    match result {
        Ok(s) if violations.is_empty() => Ok(s),
        Ok(_) => Err(format!("display protocol violations: {violations:?}")),
        Err(e) => Err(format!("{e}; backend output:\n{tail}")),
    }
}

fn measure(
    running: &Running,
    vmm: &mut TestVmm,
    o: &Options,
    patterns: &[(Vec<u8>, u64)],
    ready: Duration,
) -> BenchResult<Sample> {
    let (w, h) = (o.width, o.height);
    let full = Rect::new(0, 0, w, h);
    let stride = u64::from(w) * 4;
    let display = vmm.display().clone();
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    let mut s = Sample {
        ready_ms: ready.as_secs_f64() * 1e3,
        ..Sample::default()
    };
    let pids = running.pids();

    // 1. Full-frame updates.
    let (backing, c, a) = gpu
        .create_backed_resource(1, format::B8G8R8X8_UNORM, w, h)
        .map_err(|e| format!("create: {e}"))?;
    ok("RESOURCE_CREATE_2D", &c)?;
    ok("RESOURCE_ATTACH_BACKING", &a)?;
    ok(
        "SET_SCANOUT",
        &gpu.set_scanout(SCANOUT, 1, full)
            .map_err(|e| e.to_string())?,
    )?;
    // Priming frame (untimed): SET_SCANOUT may itself send an UPDATE (ours sends the whole
    // scanout), which can reach the display thread after SET_SCANOUT's response; wait for
    // the primed pixels so every later UPDATE belongs to a timed frame.
    let (prime, prime_hash) = &patterns[patterns.len() - 1];
    mem.write(backing.addr, prime).map_err(|e| e.to_string())?;
    ok(
        "TRANSFER_TO_HOST_2D",
        &gpu.transfer_to_host_2d(1, full, 0)
            .map_err(|e| e.to_string())?,
    )?;
    ok(
        "RESOURCE_FLUSH",
        &gpu.resource_flush(1, full).map_err(|e| e.to_string())?,
    )?;
    display
        .wait_for(
            "the priming frame's UPDATE",
            TIMEOUT,
            |e| matches!(e, DisplayEvent::Update { hash, .. } if hash == prime_hash),
        )
        .map_err(|e| e.to_string())?;
    let mut busy = Duration::ZERO;
    let cpu0 = cpu_snapshot(&pids);
    for frame in 0..o.frames {
        let (pixels, hash) = &patterns[frame as usize % (patterns.len() - 1)];
        // The guest's drawing is not the device's work: not timed.
        mem.write(backing.addr, pixels).map_err(|e| e.to_string())?;
        display.skip_to_end();
        let t = Instant::now();
        vgpu_tests::bench::transfer_and_flush(gpu, full, 0)?;
        let ev = display
            .wait_update(SCANOUT, TIMEOUT)
            .map_err(|e| format!("frame {frame}: {e}"))?;
        busy += t.elapsed();
        match ev {
            DisplayEvent::Update {
                x: 0,
                y: 0,
                width,
                height,
                hash: got,
                ..
            } if (width, height) == (w, h) && got == *hash => {}
            other => {
                return Err(format!(
                    "frame {frame}: expected a full {w}x{h} UPDATE with the frame's pixels, got {}",
                    vgpu_tests::display::summarize(&other)
                ))
            }
        }
    }
    let cpu1 = cpu_snapshot(&pids);
    let last = &patterns[(o.frames as usize - 1) % (patterns.len() - 1)].0;
    let exact = display
        .with_framebuffer(SCANOUT, |fb| fb.pixels == *last)
        .unwrap_or(false);
    if !exact {
        return Err("the last frame's pixels on the display differ from the guest's".into());
    }
    let secs = busy.as_secs_f64().max(1e-9);
    s.fps = f64::from(o.frames) / secs;
    s.mbps = (frame_bytes(w, h) * u64::from(o.frames)) as f64 / 1e6 / secs;
    s.frame_cpu_us = pids
        .iter()
        .zip(cpu0.iter().zip(&cpu1))
        .map(|((_, role), (a, b))| (role.clone(), (b - a) as f64 / 1e3 / f64::from(o.frames)))
        .collect();

    // 2. Small-damage latency: a 64x64 rect at a new place each time.
    let mut lat = Vec::with_capacity(o.samples);
    let mut want_fb = last.clone();
    for i in 0..o.samples {
        let (rect, offset, row) = vgpu_tests::bench::damage_sample(i, (w, h), stride, DAMAGE);
        for r in 0..u64::from(DAMAGE) {
            mem.write(backing.addr + offset + r * stride, &row)
                .map_err(|e| e.to_string())?;
            let dst = (offset + r * stride) as usize;
            want_fb[dst..dst + row.len()].copy_from_slice(&row);
        }
        display.skip_to_end();
        let t = Instant::now();
        vgpu_tests::bench::transfer_and_flush(gpu, rect, offset)?;
        let ev = display
            .wait_update(SCANOUT, TIMEOUT)
            .map_err(|e| format!("damage {i}: {e}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        match ev {
            DisplayEvent::Update {
                x,
                y,
                width,
                height,
                ..
            } if (x, y, width, height) == (rect.x, rect.y, rect.width, rect.height) => {}
            other => {
                return Err(format!(
                    "damage {i}: expected an UPDATE of exactly {rect:?}, got {}",
                    vgpu_tests::display::summarize(&other)
                ))
            }
        }
    }
    let exact = display
        .with_framebuffer(SCANOUT, |fb| fb.pixels == want_fb)
        .unwrap_or(false);
    if !exact {
        return Err("after the damage updates the display differs from the guest's frame".into());
    }
    lat.sort_by(f64::total_cmp);
    s.lat_median_us = percentile(&lat, 0.5);
    s.lat_p99_us = percentile(&lat, 0.99);

    // 3. Command round trips: RESOURCE_FLUSH of a resource on no scanout (no UPDATE).
    let c = gpu
        .resource_create_2d(2, format::B8G8R8X8_UNORM, DAMAGE, DAMAGE)
        .map_err(|e| e.to_string())?;
    ok("RESOURCE_CREATE_2D", &c)?;
    let cheap = Command::ResourceFlush {
        resource_id: 2,
        rect: Rect::new(0, 0, DAMAGE, DAMAGE),
    };
    let serial_n = o.commands / 2;
    let c0 = cpu_snapshot(&pids);
    let t = Instant::now();
    for _ in 0..serial_n {
        ok(
            "RESOURCE_FLUSH",
            &gpu.execute(&cheap).map_err(|e| e.to_string())?,
        )?;
    }
    let serial = t.elapsed().as_secs_f64().max(1e-9);
    let c1 = cpu_snapshot(&pids);
    s.serial_per_s = serial_n as f64 / serial;
    s.serial_cpu_us = pids
        .iter()
        .zip(c0.iter().zip(&c1))
        .map(|((_, role), (a, b))| (role.clone(), (b - a) as f64 / 1e3 / serial_n as f64))
        .collect();
    let batches = o.commands / WINDOW;
    let t = Instant::now();
    for _ in 0..batches {
        let pending = (0..WINDOW)
            .map(|_| gpu.submit(&cheap, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        for p in pending {
            ok("RESOURCE_FLUSH", &gpu.wait(p).map_err(|e| e.to_string())?)?;
        }
    }
    s.pipelined_per_s = (batches * WINDOW) as f64 / t.elapsed().as_secs_f64().max(1e-9);
    Ok(s)
}

fn frame_bytes(w: u32, h: u32) -> u64 {
    u64::from(w) * u64::from(h) * 4
}

/// (median, min, max).
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med, s[0], s[n - 1])
}

struct Metric {
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    get: fn(&Sample) -> f64,
}

fn main() {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("frames bench: {e}");
            std::process::exit(2);
        }
    };
    let mut backends = Vec::new();
    if o.backends != "reference" {
        match our_backend() {
            Ok(b) => backends.push(b),
            Err(e) => {
                eprintln!("frames bench: {e}");
                std::process::exit(1);
            }
        }
    }
    if o.backends != "ours" {
        match reference_backend() {
            Some(b) => backends.push(b),
            None if o.backends == "reference" => {
                eprintln!(
                    "frames bench: no reference backend: run scripts/fetch-reference-backend.sh \
                     and set VGPU_REFERENCE_BACKEND to the path it prints"
                );
                std::process::exit(1);
            }
            None => println!(
                "BASELINE MISSING: no QEMU vhost-user-gpu found (run scripts/fetch-reference-backend.sh \
                 or set VGPU_REFERENCE_BACKEND); measuring vgpu-sandbox alone, no ratios"
            ),
        }
    }
    let (w, h) = (o.width, o.height);
    println!("frames bench: {w}x{h} B8G8R8X8, {} frames, {} damage samples, {} commands (half serial, half in batches of {WINDOW}), {} reps (+{} warm-up)",
        o.frames, o.samples, o.commands, o.reps, o.warmup);
    for (i, b) in backends.iter().enumerate() {
        println!(
            "  [{}] {:<9} {}  ({})",
            (b'A' + i as u8) as char,
            name(b.kind),
            b.label,
            b.bin.display()
        );
    }

    let patterns: Vec<(Vec<u8>, u64)> = (0..PATTERNS)
        .map(|f| {
            let p = pattern(w, h, f * 17 + 1);
            let hash = vgpu_tests::display::payload_hash(&p);
            (p, hash)
        })
        .collect();
    // What the test VMM's own display peer spends per full frame (hash + framebuffer copy),
    // included in every backend's frame time alike.
    let harness = {
        let mut fb = vec![0u8; patterns[0].0.len()];
        let t = Instant::now();
        for (p, _) in &patterns {
            std::hint::black_box(vgpu_tests::display::payload_hash(p));
            fb.copy_from_slice(p);
        }
        std::hint::black_box(&fb);
        t.elapsed().as_secs_f64() * 1e6 / patterns.len() as f64
    };

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); backends.len()];
    let total = o.warmup + o.reps;
    for rep in 0..total {
        let mut order: Vec<usize> = (0..backends.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let b = &backends[i];
            match session(b, &o, &patterns) {
                Ok(s) => {
                    let tag = if rep < o.warmup { "warm-up" } else { "rep" };
                    eprintln!(
                        "  {tag} {} {:<9} ready {:>7.2} ms  {:>7.1} frame/s  damage p50 {:>7.1} us  serial {:>7.0}/s  pipelined {:>7.0}/s",
                        rep.saturating_sub(o.warmup) + usize::from(rep >= o.warmup),
                        name(b.kind),
                        s.ready_ms,
                        s.fps,
                        s.lat_median_us,
                        s.serial_per_s,
                        s.pipelined_per_s
                    );
                    if rep >= o.warmup {
                        samples[i].push(s);
                    }
                }
                Err(e) => {
                    eprintln!("frames bench: {} ({}) FAILED: {e}", name(b.kind), b.label);
                    std::process::exit(1);
                }
            }
        }
    }

    let metrics = [
        Metric {
            name: "start-to-ready (spawn -> GET_DISPLAY_INFO answered)",
            unit: "ms",
            higher_is_better: false,
            get: |s| s.ready_ms,
        },
        Metric {
            name: "full-frame updates",
            unit: "frame/s",
            higher_is_better: true,
            get: |s| s.fps,
        },
        Metric {
            name: "full-frame update bandwidth",
            unit: "MB/s",
            higher_is_better: true,
            get: |s| s.mbps,
        },
        Metric {
            name: "64x64 damage round trip, median",
            unit: "us",
            higher_is_better: false,
            get: |s| s.lat_median_us,
        },
        Metric {
            name: "64x64 damage round trip, p99",
            unit: "us",
            higher_is_better: false,
            get: |s| s.lat_p99_us,
        },
        Metric {
            name: "RESOURCE_FLUSH round trips, serial",
            unit: "cmd/s",
            higher_is_better: true,
            get: |s| s.serial_per_s,
        },
        Metric {
            name: "RESOURCE_FLUSH round trips, 128 in flight",
            unit: "cmd/s",
            higher_is_better: true,
            get: |s| s.pipelined_per_s,
        },
    ];

    println!();
    println!(
        "results: median [min .. max] over {} reps; ratio = ours / reference of the medians \
         (>1 means ours is better), [range of per-rep ratios]",
        o.reps
    );
    let ours = backends.iter().position(|b| b.kind == Kind::Ours);
    let theirs = backends.iter().position(|b| b.kind == Kind::Reference);
    let col = |i: Option<usize>, m: &Metric| -> String {
        match i {
            Some(i) => {
                let v: Vec<f64> = samples[i].iter().map(m.get).collect();
                let (med, lo, hi) = stats(&v);
                format!("{} [{} .. {}]", fmt(med), fmt(lo), fmt(hi))
            }
            None => "-".into(),
        }
    };
    const WIDTHS: [usize; 5] = [52, 7, 28, 28, 22];
    println!(
        "{}",
        table_row(
            &[
                "benchmark",
                "unit",
                "vgpu-sandbox",
                "QEMU vhost-user-gpu",
                "ratio"
            ],
            &WIDTHS
        )
    );
    println!("{}", table_rule(&WIDTHS));
    for m in &metrics {
        let ratio = match (ours, theirs) {
            (Some(a), Some(b)) => {
                let turn = |x: f64, y: f64| turned_ratio(x, y, m.higher_is_better);
                let va: Vec<f64> = samples[a].iter().map(m.get).collect();
                let vb: Vec<f64> = samples[b].iter().map(m.get).collect();
                let r = turn(stats(&va).0, stats(&vb).0);
                let per: Vec<f64> = va.iter().zip(&vb).map(|(x, y)| turn(*x, *y)).collect();
                let (_, lo, hi) = stats(&per);
                format!("{r:.2}x [{lo:.2} .. {hi:.2}]")
            }
            (Some(_), None) => "baseline missing".into(),
            _ => "n/a (one backend)".into(),
        };
        println!(
            "{}",
            table_row(
                &[m.name, m.unit, &col(ours, m), &col(theirs, m), &ratio],
                &WIDTHS
            )
        );
    }

    println!();
    println!(
        "backend CPU time (all threads, from /proc/<pid>/task/*/schedstat), median over reps:"
    );
    for (i, b) in backends.iter().enumerate() {
        for (label, get) in [
            (
                "per full frame",
                (|s: &Sample| s.frame_cpu_us.clone()) as fn(&Sample) -> Vec<(String, f64)>,
            ),
            ("per serial command", |s: &Sample| s.serial_cpu_us.clone()),
        ] {
            let roles: Vec<String> = samples[i]
                .first()
                .map(|s| get(s).into_iter().map(|(r, _)| r).collect())
                .unwrap_or_default();
            let parts: Vec<String> = roles
                .iter()
                .enumerate()
                .map(|(k, role)| {
                    let v: Vec<f64> = samples[i]
                        .iter()
                        .filter_map(|s| get(s).get(k).map(|x| x.1))
                        .collect();
                    let role = if role == "main" && b.kind == Kind::Ours {
                        "broker"
                    } else {
                        role.as_str()
                    };
                    format!("{role} {} us", fmt(stats(&v).0))
                })
                .collect();
            println!("  {:<9} {label:<19} {}", name(b.kind), parts.join(", "));
        }
    }
    println!(
        "test-VMM display peer, per full frame (payload hash + framebuffer copy, in every \
         backend's frame time): {} us",
        fmt(harness)
    );
    if theirs.is_none() && o.backends != "ours" {
        println!("BASELINE MISSING: the figures above are vgpu-sandbox alone");
    }
}

fn name(k: Kind) -> &'static str {
    match k {
        Kind::Ours => "ours",
        Kind::Reference => "reference",
    }
}
