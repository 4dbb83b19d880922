//! The cost of isolation (issue 9): vgpu-sandbox's process split against QEMU's own
//! `vhost-user-gpu` and against this machine's floor (a single-core memcpy and a bare
//! Unix-socket round trip between two processes), all measured in the same run. See
//! docs/BENCHMARKS.md ("Isolation bench") for what each line means.
//!
//! ```text
//! cargo build --release -p vgpu-sandbox
//! VGPU_REFERENCE_BACKEND=$(scripts/fetch-reference-backend.sh) \
//!     cargo bench -p vgpu-tests --bench isolation -- [--backend ours|reference|both]
//!     [--size WxH] [--frames N] [--samples S] [--commands C] [--blob-cycles B]
//!     [--reps R] [--warmup W] [--bin PATH]
//! ```
//!
//! Every repetition starts a fresh VM (backend process + test VMM) per backend, the
//! backends alternating (A B, then B A). Throughputs are the median over repetitions;
//! latencies are the median and p99 over all samples of all counted repetitions.
//!
//! `tests/tests/bench_smoke.rs` includes this file as a module and calls [`run`] with tiny
//! counts, so `run` must print the whole table and return it.

use std::fs;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vgpu_tests::bench::{
    fmt, fmt_ratio, our_binary, percentile, reference_binary, table_rule, turned_ratio, Args,
};
use vgpu_tests::cross_domain::{self, ImageRequirements, DRM_FORMAT_XRGB8888};
use vgpu_tests::display::DisplayConfig;
use vgpu_tests::gpu::{blob, capset, format, resp, BlobParams, MemEntry, Rect};
use vgpu_tests::scenario::pattern;
use vgpu_tests::stack::children_of;
use vgpu_tests::{Command, DisplayEvent, Response, Stack, TestVmm, VmmOptions};

const SCANOUT: u32 = 0;
const TIMEOUT: Duration = Duration::from_secs(10);
/// Side of the small damage rectangle.
const DAMAGE: u32 = 64;
/// Distinct full-frame patterns (one primes the scanout).
const PATTERNS: u32 = 4;
/// Hostmem window of the blob VM (`--hostmem 64M`).
const HOSTMEM: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// The cross-domain context and its query ring of the blob VM.
const CTX: u32 = 1;
const RING: u32 = 100;
const BLOB: u32 = 200;
/// The guest RAM memfd's name (tests/src/guest_memory.rs), as it appears in smaps.
const GUEST_RAM: &str = "vgpu-test-guest-ram";

pub type BenchResult<T> = Result<T, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Ours,
    Reference,
    /// Another backend, e.g. rust-vmm's vhost-device-gpu (`VGPU_PEER_BACKEND`).
    Peer,
}

struct Backend {
    kind: Kind,
    bin: PathBuf,
    /// Options after `--socket-path X` (the peer's).
    args: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Options {
    backends: String,
    width: u32,
    height: u32,
    frames: u32,
    samples: usize,
    commands: usize,
    blob_cycles: usize,
    pingpongs: usize,
    memcpys: usize,
    reps: usize,
    warmup: usize,
    bin: Option<PathBuf>,
    /// VMs of each backend run at once in the fleet part (0: no fleet part).
    fleet: usize,
    /// Full frames each fleet VM draws, at 640x480.
    fleet_frames: u32,
}

pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> BenchResult<Options> {
    let mut o = Options {
        backends: "both".into(),
        width: 1920,
        height: 1080,
        frames: 120,
        samples: 500,
        commands: 2000,
        blob_cycles: 1000,
        pingpongs: 20000,
        memcpys: 100,
        reps: 5,
        warmup: 1,
        bin: None,
        fleet: 0,
        fleet_frames: 60,
    };
    let mut args = Args::new(args);
    while let Some((key, mut opt)) = args.next_option() {
        match key.as_str() {
            "--bench" => {}
            "--backend" => o.backends = opt.backends()?,
            "--size" => (o.width, o.height) = opt.size(DAMAGE, 4096)?,
            "--frames" => o.frames = opt.num()?.clamp(1, 100_000) as u32,
            "--samples" => o.samples = opt.num()?.clamp(1, 1_000_000) as usize,
            "--commands" => o.commands = opt.num()?.clamp(1, 1_000_000) as usize,
            "--blob-cycles" => o.blob_cycles = opt.num()?.clamp(1, 1_000_000) as usize,
            "--pingpongs" => o.pingpongs = opt.num()?.clamp(1, 10_000_000) as usize,
            "--memcpys" => o.memcpys = opt.num()?.clamp(1, 100_000) as usize,
            "--reps" => o.reps = opt.num()?.clamp(1, 1000) as usize,
            "--warmup" => o.warmup = opt.num()?.min(100) as usize,
            "--bin" => o.bin = Some(PathBuf::from(opt.value()?)),
            "--fleet" => o.fleet = opt.num()?.min(256) as usize,
            "--fleet-frames" => o.fleet_frames = opt.num()?.clamp(1, 100_000) as u32,
            "-h" | "--help" => {
                return Err("usage: cargo bench -p vgpu-tests --bench isolation -- \
                     [--backend ours|reference|both] [--size WxH] [--frames N] [--samples S] \
                     [--commands C] [--blob-cycles B] [--pingpongs P] [--memcpys M] [--reps R] \
                     [--warmup W] [--bin PATH] [--fleet N] [--fleet-frames F]"
                    .into())
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    Ok(o)
}

fn our_backend(o: &Options) -> BenchResult<Backend> {
    let bin = our_binary(o.bin.as_deref())?;
    Ok(Backend {
        kind: Kind::Ours,
        bin,
        args: Vec::new(),
    })
}

/// Same search as the frames bench: `VGPU_REFERENCE_BACKEND`, the fetch script's cache,
/// the system's copy.
fn reference_backend() -> Option<Backend> {
    Some(Backend {
        kind: Kind::Reference,
        bin: reference_binary()?,
        args: Vec::new(),
    })
}

/// A third backend to compare with, where one is built: `VGPU_PEER_BACKEND` (a binary
/// taking `--socket-path`) with `VGPU_PEER_ARGS` (default `--gpu-mode virglrenderer`, for
/// rust-vmm's vhost-device-gpu 0.1, which needs a virglrenderer >= 1.0 to build: see
/// docs/BENCHMARKS.md). It may send a whole frame for any flush; its damage round trips
/// accept an UPDATE that contains the damage.
fn peer_backend() -> Option<Backend> {
    let bin = PathBuf::from(std::env::var_os("VGPU_PEER_BACKEND")?);
    let args = std::env::var("VGPU_PEER_ARGS")
        .unwrap_or_else(|_| "--gpu-mode virglrenderer".into())
        .split_whitespace()
        .map(String::from)
        .collect();
    bin.is_file().then_some(Backend {
        kind: Kind::Peer,
        bin,
        args,
    })
}

/// A VM's backend: ours as a [`Stack`] (broker + children), the reference as one child.
enum Vm {
    Ours(Stack),
    Reference {
        child: Child,
        /// The connection that proved the socket ready; the test VMM takes it over.
        stream: Option<UnixStream>,
        _dir: tempfile::TempDir,
    },
}

impl Vm {
    /// Execs the backend with `--socket-path` and returns it with the time until it is
    /// ready: ours' "ready: serving on" line (the broker listens before printing it), the
    /// reference's socket accepting a connection (kept for the test VMM).
    fn start(b: &Backend, o: &Options, extra: &[&str]) -> BenchResult<(Vm, Duration)> {
        match b.kind {
            Kind::Ours => {
                let size = format!("{}x{}", o.width, o.height);
                let mut args = vec!["--output", size.as_str(), "--log-level=info"];
                args.extend_from_slice(extra);
                let t0 = Instant::now();
                let stack = Stack::start_with(&b.bin, &args, false)
                    .map_err(|e| format!("starting {}: {e}", b.bin.display()))?;
                Ok((Vm::Ours(stack), t0.elapsed()))
            }
            Kind::Reference | Kind::Peer => {
                let dir = tempfile::Builder::new()
                    .prefix("vgpu-bench")
                    .tempdir()
                    .map_err(|e| format!("tempdir: {e}"))?;
                let socket = dir.path().join("ref.sock");
                let t0 = Instant::now();
                let mut child = Process::new(&b.bin)
                    .arg("--socket-path")
                    .arg(&socket)
                    .args(&b.args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("spawn {}: {e}", b.bin.display()))?;
                // Bounded poll; the socket is the only signal QEMU's backend gives (the file
                // appears at bind, a moment before listen).
                let stream = loop {
                    if let Ok(s) = UnixStream::connect(&socket) {
                        break s;
                    }
                    if t0.elapsed() > TIMEOUT {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err("the reference backend never created its socket".into());
                    }
                    if let Ok(Some(st)) = child.try_wait() {
                        return Err(format!("the reference backend exited: {st}"));
                    }
                    std::thread::sleep(Duration::from_micros(20));
                };
                let ready = t0.elapsed();
                Ok((
                    Vm::Reference {
                        child,
                        stream: Some(stream),
                        _dir: dir,
                    },
                    ready,
                ))
            }
        }
    }

    fn connect(&mut self, opts: &VmmOptions) -> BenchResult<TestVmm> {
        match self {
            Vm::Ours(s) => s
                .connect_with(opts)
                .map_err(|e| format!("connect: {e}\n{}", s.log_text())),
            Vm::Reference { stream, .. } => {
                let s = stream
                    .take()
                    .ok_or("the reference VM is already connected")?;
                TestVmm::from_stream(s, opts).map_err(|e| format!("connect: {e}"))
            }
        }
    }

    /// Every process of the VM's backend (ours: broker and its children).
    fn pids(&self) -> Vec<i32> {
        let pid = match self {
            Vm::Ours(s) => s.pid(),
            Vm::Reference { child, .. } => child.id() as i32,
        };
        let mut v = vec![pid];
        v.extend(children_of(pid).into_iter().map(|c| c.pid));
        v
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Ours: Stack's Drop SIGKILLs every process.
        if let Vm::Reference { child, .. } = self {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Proportional set size of some processes, in KiB, split by what the pages are.
#[derive(Clone, Copy, Debug, Default)]
struct Pss {
    /// Everything.
    total: u64,
    /// The test VMM's guest RAM memfd (shared with the VMM, so PSS gives the backend half
    /// of each page both touch).
    guest_ram: u64,
    /// Other memfd / shared-memory mappings (ours: the sealed scanout memfd, the IPC rings).
    memfd: u64,
}

fn pss_of(pids: &[i32]) -> Pss {
    let mut p = Pss::default();
    for pid in pids {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
            continue;
        };
        let mut class = 0;
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let Some(first) = it.next() else { continue };
            if !first.ends_with(':') {
                // A mapping header: "start-end perms offset dev inode [path]".
                let path = line.split_whitespace().nth(5).unwrap_or("");
                class = if line.contains(GUEST_RAM) {
                    1
                } else if path.starts_with("/memfd:") || path.starts_with("/dev/shm") {
                    2
                } else {
                    0
                };
            } else if first == "Pss:" {
                let kb: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                p.total += kb;
                match class {
                    1 => p.guest_ram += kb,
                    2 => p.memfd += kb,
                    _ => {}
                }
            }
        }
    }
    p
}

fn check(what: &str, r: Result<Response, impl std::fmt::Display>, want: u32) -> BenchResult<()> {
    let r = r.map_err(|e| format!("{what}: {e}"))?;
    if r.kind == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: expected {}, got {}",
            resp::name(want),
            r.kind_name()
        ))
    }
}

/// One VM's figures.
#[derive(Clone, Debug, Default)]
struct Sample {
    ready_ms: f64,
    /// Exec to the first `connect()` that succeeds: when a VMM can connect (the
    /// reference's `ready_ms` is this already).
    socket_ms: f64,
    fps: f64,
    gbps: f64,
    damage_us: Vec<f64>,
    small_us: Vec<f64>,
    fenced_us: Vec<f64>,
    pss: Pss,
    blob_us: Vec<f64>,
    blob_ready_ms: f64,
}

fn vm_session(b: &Backend, o: &Options, patterns: &[(Vec<u8>, u64)]) -> BenchResult<Sample> {
    let (w, h) = (o.width, o.height);
    let frame = u64::from(w) * u64::from(h) * 4;
    let socket_ms = match b.kind {
        Kind::Ours => socket_ready(b, o)?.as_secs_f64() * 1e3,
        Kind::Reference | Kind::Peer => f64::NAN,
    };
    let (mut vm, ready) = Vm::start(b, o, &[])?;
    let opts = VmmOptions {
        mem_size: frame + (64 << 20),
        timeout: TIMEOUT,
        display: DisplayConfig {
            outputs: vec![(w, h)],
            ..Default::default()
        },
        ..VmmOptions::default()
    };
    let mut vmm = vm.connect(&opts)?;
    let mut s = Sample {
        ready_ms: ready.as_secs_f64() * 1e3,
        socket_ms: if socket_ms.is_nan() {
            ready.as_secs_f64() * 1e3
        } else {
            socket_ms
        },
        ..Sample::default()
    };
    draw(&mut vmm, o, patterns, b.kind == Kind::Peer, &mut s)?;
    // After the frames and the damage updates: every page the workload needs is in.
    s.pss = pss_of(&vm.pids());
    commands(&mut vmm, o, &mut s)?;
    // Ours must speak the display protocol cleanly. QEMU's backend is not ours to judge
    // here: it sometimes sends UPDATEs with uninitialised header flags (seen with small
    // outputs), which the test VMM records as violations; say so and go on.
    let v = vmm.display().violations();
    if !v.is_empty() {
        if b.kind == Kind::Ours {
            return Err(format!("display protocol violations: {v:?}"));
        }
        eprintln!(
            "  note: the reference backend broke the display protocol {} time(s): {}",
            v.len(),
            v[0]
        );
    }
    Ok(s)
}

/// Ours measured as the reference is: exec of `--socket-path X` to the first `connect()`
/// that succeeds (the broker listens before it starts its children; a VMM connecting then
/// is served once the frontend is up). A process of its own, killed afterwards (its
/// children follow by their parent-death signal).
fn socket_ready(b: &Backend, o: &Options) -> BenchResult<Duration> {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-bench")
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;
    let socket = dir.path().join("vgpu.sock");
    let t0 = Instant::now();
    let mut child = Process::new(&b.bin)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--output")
        .arg(format!("{}x{}", o.width, o.height))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", b.bin.display()))?;
    let connected = loop {
        if UnixStream::connect(&socket).is_ok() {
            break Ok(t0.elapsed());
        }
        if t0.elapsed() > TIMEOUT {
            break Err("vgpu-sandbox never accepted a connection".to_string());
        }
        if let Ok(Some(st)) = child.try_wait() {
            break Err(format!("vgpu-sandbox exited: {st}"));
        }
        std::thread::sleep(Duration::from_micros(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    connected
}

/// Full frames (TRANSFER_TO_HOST_2D + RESOURCE_FLUSH until the UPDATE is in), then 64x64
/// damage round trips.
fn draw(
    vmm: &mut TestVmm,
    o: &Options,
    patterns: &[(Vec<u8>, u64)],
    whole_frame_damage: bool,
    s: &mut Sample,
) -> BenchResult<()> {
    let (w, h) = (o.width, o.height);
    let full = Rect::new(0, 0, w, h);
    let stride = u64::from(w) * 4;
    let display = vmm.display().clone();
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    let (backing, c, a) = gpu
        .create_backed_resource(1, format::B8G8R8X8_UNORM, w, h)
        .map_err(|e| format!("create: {e}"))?;
    check("RESOURCE_CREATE_2D", Ok::<_, String>(c), resp::OK_NODATA)?;
    check("ATTACH_BACKING", Ok::<_, String>(a), resp::OK_NODATA)?;
    check(
        "SET_SCANOUT",
        gpu.set_scanout(SCANOUT, 1, full),
        resp::OK_NODATA,
    )?;
    let (prime, prime_hash) = &patterns[patterns.len() - 1];
    mem.write(backing.addr, prime).map_err(|e| e.to_string())?;
    check(
        "TRANSFER_TO_HOST_2D",
        gpu.transfer_to_host_2d(1, full, 0),
        resp::OK_NODATA,
    )?;
    check(
        "RESOURCE_FLUSH",
        gpu.resource_flush(1, full),
        resp::OK_NODATA,
    )?;
    display
        .wait_for(
            "the priming frame's UPDATE",
            TIMEOUT,
            |e| matches!(e, DisplayEvent::Update { hash, .. } if hash == prime_hash),
        )
        .map_err(|e| e.to_string())?;
    let mut busy = Duration::ZERO;
    for f in 0..o.frames {
        let (pixels, hash) = &patterns[f as usize % (patterns.len() - 1)];
        mem.write(backing.addr, pixels).map_err(|e| e.to_string())?;
        display.skip_to_end();
        let t = Instant::now();
        vgpu_tests::bench::transfer_and_flush(gpu, full, 0)?;
        let ev = display
            .wait_update(SCANOUT, TIMEOUT)
            .map_err(|e| format!("frame {f}: {e}"))?;
        busy += t.elapsed();
        match ev {
            DisplayEvent::Update {
                width,
                height,
                hash: got,
                ..
            } if (width, height) == (w, h) && got == *hash => {}
            other => {
                return Err(format!(
                    "frame {f}: expected the frame's full UPDATE, got {}",
                    vgpu_tests::display::summarize(&other)
                ))
            }
        }
    }
    let secs = busy.as_secs_f64().max(1e-9);
    s.fps = f64::from(o.frames) / secs;
    s.gbps = (u64::from(w) * u64::from(h) * 4 * u64::from(o.frames)) as f64 / 1e9 / secs;

    for i in 0..o.samples {
        let (rect, offset, row) = vgpu_tests::bench::damage_sample(i, (w, h), stride, DAMAGE);
        for r in 0..u64::from(DAMAGE) {
            mem.write(backing.addr + offset + r * stride, &row)
                .map_err(|e| e.to_string())?;
        }
        display.skip_to_end();
        let t = Instant::now();
        vgpu_tests::bench::transfer_and_flush(gpu, rect, offset)?;
        let ev = display
            .wait_update(SCANOUT, TIMEOUT)
            .map_err(|e| format!("damage {i}: {e}"))?;
        s.damage_us.push(t.elapsed().as_secs_f64() * 1e6);
        match ev {
            DisplayEvent::Update {
                x,
                y,
                width,
                height,
                ..
            } if (x, y, width, height) == (rect.x, rect.y, rect.width, rect.height) => {}
            DisplayEvent::Update {
                x,
                y,
                width,
                height,
                ..
            } if whole_frame_damage
                && x <= rect.x
                && y <= rect.y
                && x + width >= rect.x + rect.width
                && y + height >= rect.y + rect.height => {}
            other => {
                return Err(format!(
                    "damage {i}: expected an UPDATE of {rect:?}, got {}",
                    vgpu_tests::display::summarize(&other)
                ))
            }
        }
    }
    Ok(())
}

/// Small commands one at a time: RESOURCE_FLUSH of a resource on no scanout, without and
/// with a fence (VIRTIO_GPU_FLAG_FENCE: the answer comes once the fence is signalled).
fn commands(vmm: &mut TestVmm, o: &Options, s: &mut Sample) -> BenchResult<()> {
    let gpu = vmm.gpu();
    check(
        "RESOURCE_CREATE_2D",
        gpu.resource_create_2d(2, format::B8G8R8X8_UNORM, DAMAGE, DAMAGE),
        resp::OK_NODATA,
    )?;
    let cheap = Command::ResourceFlush {
        resource_id: 2,
        rect: Rect::new(0, 0, DAMAGE, DAMAGE),
    };
    for i in 0..o.commands {
        let t = Instant::now();
        let r = gpu.execute(&cheap);
        s.small_us.push(t.elapsed().as_secs_f64() * 1e6);
        check("RESOURCE_FLUSH", r, resp::OK_NODATA)?;
        let t = Instant::now();
        let r = gpu.execute_fenced(&cheap, i as u64 + 1);
        s.fenced_us.push(t.elapsed().as_secs_f64() * 1e6);
        check("RESOURCE_FLUSH (fenced)", r, resp::OK_NODATA)?;
    }
    Ok(())
}

/// Ours only: a `--hostmem 64M` VM with a cross-domain context and one mappable HOST3D blob
/// of a WxH XRGB8888 image; each cycle is RESOURCE_MAP_BLOB (device -> VMM SHMEM_MAP, the
/// VMM's REPLY_ACK, OK_MAP_INFO) + RESOURCE_UNMAP_BLOB (SHMEM_UNMAP, ack, OK_NODATA).
fn blob_session(b: &Backend, o: &Options, s: &mut Sample) -> BenchResult<()> {
    let (mut vm, ready) = Vm::start(b, o, &["--hostmem", "64M"])?;
    s.blob_ready_ms = ready.as_secs_f64() * 1e3;
    let opts = VmmOptions {
        hostmem: Some(HOSTMEM),
        timeout: TIMEOUT,
        ..VmmOptions::default()
    };
    let mut vmm = vm.connect(&opts)?;
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    check(
        "CTX_CREATE",
        gpu.ctx_create(CTX, capset::CROSS_DOMAIN, b"bench"),
        resp::OK_NODATA,
    )?;
    let ring = mem.alloc_aligned(PAGE, PAGE).map_err(|e| e.to_string())?;
    check(
        "RESOURCE_CREATE_BLOB (ring)",
        gpu.resource_create_blob(
            CTX,
            RING,
            BlobParams::guest(PAGE, 0),
            &[MemEntry {
                addr: ring,
                length: PAGE as u32,
            }],
        ),
        resp::OK_NODATA,
    )?;
    check(
        "CTX_ATTACH_RESOURCE",
        gpu.ctx_attach_resource(CTX, RING),
        resp::OK_NODATA,
    )?;
    check(
        "SUBMIT_3D INIT",
        gpu.submit_3d(CTX, &cross_domain::init(RING)),
        resp::OK_NODATA,
    )?;
    check(
        "SUBMIT_3D GET_IMAGE_REQUIREMENTS",
        gpu.submit_3d(
            CTX,
            &cross_domain::get_image_requirements(o.width, o.height, DRM_FORMAT_XRGB8888, 0),
        ),
        resp::OK_NODATA,
    )?;
    let answer = mem
        .read_vec(ring, cross_domain::IMAGE_REQUIREMENTS_SIZE)
        .map_err(|e| e.to_string())?;
    let reqs = ImageRequirements::parse(&answer).ok_or("bad image requirements")?;
    if reqs.size > HOSTMEM {
        return Err(format!("the blob ({} bytes) exceeds the window", reqs.size));
    }
    check(
        "RESOURCE_CREATE_BLOB (HOST3D)",
        gpu.resource_create_blob(
            CTX,
            BLOB,
            BlobParams {
                blob_mem: blob::MEM_HOST3D,
                blob_flags: blob::FLAG_MAPPABLE,
                blob_id: u64::from(reqs.blob_id),
                size: reqs.size,
            },
            &[],
        ),
        resp::OK_NODATA,
    )?;
    for _ in 0..o.blob_cycles {
        let t = Instant::now();
        let m = gpu.resource_map_blob(BLOB, 0);
        let u = gpu.resource_unmap_blob(BLOB);
        s.blob_us.push(t.elapsed().as_secs_f64() * 1e6);
        check("RESOURCE_MAP_BLOB", m, resp::OK_MAP_INFO)?;
        check("RESOURCE_UNMAP_BLOB", u, resp::OK_NODATA)?;
    }
    if let Some(r) = vmm.backend_requests() {
        let v = r.violations();
        if !v.is_empty() {
            return Err(format!("backend request violations: {v:?}"));
        }
    }
    Ok(())
}

/// CPU time (ms) the test VMM's display peer spends per full WxH UPDATE: a [`DisplayPeer`]
/// fed `frames` real UPDATE messages (the patterns in turn, each awaited) through a
/// socketpair, timed by its thread's CPU clock (/proc/self/task/TID/schedstat), so the
/// sender's own work is not counted. NaN where schedstat is missing.
fn display_peer_ms(w: u32, h: u32, patterns: &[(Vec<u8>, u64)], frames: u32) -> BenchResult<f64> {
    use std::io::Write;
    use vgpu_tests::display::{req, DisplayPeer};
    let tasks = || -> Vec<String> {
        fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = tasks();
    let (mut ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let peer = DisplayPeer::start(
        theirs,
        DisplayConfig {
            outputs: vec![(w, h)],
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let message = |request: u32, words: &[u32], payload: usize| -> Vec<u8> {
        let size = (words.len() * 4 + payload) as u32;
        [request, 0, size]
            .iter()
            .chain(words)
            .flat_map(|v| v.to_le_bytes())
            .collect()
    };
    let events = peer.events().clone();
    ours.write_all(&message(req::SCANOUT, &[SCANOUT, w, h], 0))
        .map_err(|e| format!("display socket: {e}"))?;
    events
        .wait_for("the SCANOUT", TIMEOUT, |e| {
            matches!(e, DisplayEvent::Scanout { .. })
        })
        .map_err(|e| e.to_string())?;
    // The peer's thread (named by itself once it runs: it has, it answered the SCANOUT).
    let tid = tasks().into_iter().find(|t| {
        !before.contains(t)
            && fs::read_to_string(format!("/proc/self/task/{t}/comm"))
                .is_ok_and(|c| c.trim() == "vmm-display")
    });
    let cpu_ns = || -> Option<u64> {
        let t = fs::read_to_string(format!("/proc/self/task/{}/schedstat", tid.as_ref()?)).ok()?;
        t.split_whitespace().next()?.parse().ok()
    };
    let t0 = cpu_ns();
    for f in 0..frames as usize {
        let (pixels, hash) = &patterns[f % patterns.len()];
        ours.write_all(&message(req::UPDATE, &[SCANOUT, 0, 0, w, h], pixels.len()))
            .and_then(|()| ours.write_all(pixels))
            .map_err(|e| format!("display socket: {e}"))?;
        match events.wait_update(SCANOUT, TIMEOUT) {
            Ok(DisplayEvent::Update { hash: got, .. }) if got == *hash => {}
            other => return Err(format!("display peer, frame {f}: {other:?}")),
        }
    }
    let t1 = cpu_ns();
    let v = events.violations();
    if !v.is_empty() {
        return Err(format!("display peer: violations {v:?}"));
    }
    Ok(match (t0, t1) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6 / f64::from(frames.max(1)),
        _ => f64::NAN,
    })
}

/// Single-core memcpy of one WxHx4 frame, repeated (the same two buffers, so they stay in
/// the cache when they fit): GB/s (median over `n` copies).
fn memcpy_gbps(bytes: usize, n: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| (i * 7) as u8).collect();
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(&mut dst).copy_from_slice(std::hint::black_box(&src));
            bytes as f64 / 1e9 / t.elapsed().as_secs_f64().max(1e-12)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Bytes of this machine's last-level cache (cpu0's cache index3), if sysfs says.
fn llc_bytes() -> Option<usize> {
    let s = fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size").ok()?;
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: usize = digits.parse().ok()?;
    let mult = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        _ => return None,
    };
    Some(n * mult).filter(|&b| b > 0)
}

/// The out-of-cache memcpy's working set: distinct (source, destination) pairs of `bytes`
/// each, together at least 4x the last-level cache (256 MiB when sysfs does not say), so
/// that every copy's source and destination were evicted since their last use.
struct ColdSet {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ColdSet {
    fn new(bytes: usize) -> ColdSet {
        let total = llc_bytes().map_or(256 << 20, |c| c * 4);
        let n = total.div_ceil(2 * bytes.max(1)).max(2);
        // vec![x; n] with x != 0 writes every page: all are faulted in before timing.
        let pairs = (0..n)
            .map(|i| (vec![(i as u8) | 1; bytes], vec![0xffu8; bytes]))
            .collect();
        ColdSet { pairs }
    }

    fn bytes(&self) -> usize {
        self.pairs.iter().map(|(s, d)| s.len() + d.len()).sum()
    }

    /// Single-core memcpy GB/s, median over `n` copies, each from the next pair in turn.
    fn gbps(&mut self, n: usize) -> f64 {
        let len = self.pairs.len();
        let mut v: Vec<f64> = (0..n)
            .map(|i| {
                let (src, dst) = &mut self.pairs[i % len];
                let bytes = src.len();
                let t = Instant::now();
                std::hint::black_box(&mut *dst).copy_from_slice(std::hint::black_box(&*src));
                bytes as f64 / 1e9 / t.elapsed().as_secs_f64().max(1e-12)
            })
            .collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    }
}

/// 1-byte ping-pong over a Unix socketpair between this process and a forked child: the
/// round-trip times in µs.
fn socket_pingpong(n: usize) -> BenchResult<Vec<f64>> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid 2-int array.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } != 0
    {
        return Err(format!("socketpair: {}", std::io::Error::last_os_error()));
    }
    let (mine, theirs) = (fds[0], fds[1]);
    // SAFETY: the child calls only async-signal-safe functions (read, write, close, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: plain syscalls on fds this process owns.
        unsafe {
            libc::close(mine);
            let mut b = 0u8;
            while libc::read(theirs, (&mut b as *mut u8).cast(), 1) == 1 {
                if libc::write(theirs, (&b as *const u8).cast(), 1) != 1 {
                    break;
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the child's end.
    unsafe { libc::close(theirs) };
    let mut out = Vec::with_capacity(n);
    let mut err = None;
    for i in 0..n + n / 10 {
        let mut b = i as u8;
        let t = Instant::now();
        // SAFETY: 1-byte buffers on the stack, fd owned here.
        let ok = unsafe {
            libc::write(mine, (&b as *const u8).cast(), 1) == 1
                && libc::read(mine, (&mut b as *mut u8).cast(), 1) == 1
        };
        let us = t.elapsed().as_secs_f64() * 1e6;
        if !ok {
            err = Some(format!("ping-pong: {}", std::io::Error::last_os_error()));
            break;
        }
        // The first tenth warms up.
        if i >= n / 10 {
            out.push(us);
        }
    }
    // SAFETY: closing our end makes the child's read return 0; then reap it.
    unsafe {
        libc::close(mine);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    percentile(&s, 0.5)
}

fn pooled(samples: &[Sample], get: fn(&Sample) -> &Vec<f64>, p: f64) -> f64 {
    let mut all: Vec<f64> = samples
        .iter()
        .flat_map(|s| get(s).iter().copied())
        .collect();
    all.sort_by(f64::total_cmp);
    percentile(&all, p)
}

/// Runs the bench with parsed options; prints progress to stderr and the tables to stdout,
/// and returns the tables.
pub fn run(o: &Options) -> BenchResult<String> {
    let mut backends = Vec::new();
    if o.backends != "reference" {
        backends.push(our_backend(o)?);
    }
    let mut missing = false;
    if o.backends != "ours" {
        match reference_backend() {
            Some(b) => backends.push(b),
            None if o.backends == "reference" => {
                return Err("no reference backend (scripts/fetch-reference-backend.sh)".into())
            }
            None => missing = true,
        }
    }
    if o.backends == "both" {
        backends.extend(peer_backend());
    }
    let (w, h) = (o.width, o.height);
    let frame = (w as usize) * (h as usize) * 4;
    let mut out = String::new();
    let mut line = |s: String| {
        println!("{s}");
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "isolation bench: {w}x{h} XRGB, {} frames, {} damage samples, {} small + {} fenced \
         commands, {} blob map/unmap cycles per VM; {} reps (+{} warm-up)",
        o.frames, o.samples, o.commands, o.commands, o.blob_cycles, o.reps, o.warmup
    ));
    for b in &backends {
        line(format!("  {:<9} {}", name(b.kind), b.bin.display()));
    }
    if missing {
        line("BASELINE MISSING: no QEMU vhost-user-gpu found; ours alone, no ratios".into());
    }
    let patterns: Vec<(Vec<u8>, u64)> = (0..PATTERNS)
        .map(|f| {
            let p = pattern(w, h, f * 17 + 1);
            let hash = vgpu_tests::display::payload_hash(&p);
            (p, hash)
        })
        .collect();

    // What the test VMM's display peer spends per full frame, inside every backend's frame
    // time alike: its thread's CPU time for real UPDATE messages sent through a socketpair.
    let harness_ms = display_peer_ms(w, h, &patterns, o.frames)?;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); backends.len()];
    let mut memcpy = Vec::new();
    let mut memcpy_cold = Vec::new();
    let mut cold_set = ColdSet::new(frame);
    let mut sock: Vec<f64> = Vec::new();
    for rep in 0..o.warmup + o.reps {
        let counted = rep >= o.warmup;
        let mut order: Vec<usize> = (0..backends.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let b = &backends[i];
            let mut s =
                vm_session(b, o, &patterns).map_err(|e| format!("{} VM: {e}", name(b.kind)))?;
            if b.kind == Kind::Ours {
                blob_session(b, o, &mut s).map_err(|e| format!("ours, blob VM: {e}"))?;
            }
            eprintln!(
                "  {} {:<9} ready {:>6.2} ms  {:>6.1} frame/s  damage p50 {:>6.1} us  small p50 {:>5.1} us  fenced p50 {:>5.1} us  PSS {} KiB",
                if counted { "rep    " } else { "warm-up" },
                name(b.kind),
                s.ready_ms,
                s.fps,
                median(&s.damage_us),
                median(&s.small_us),
                median(&s.fenced_us),
                s.pss.total
            );
            if counted {
                samples[i].push(s);
            }
        }
        let m = memcpy_gbps(frame, o.memcpys);
        let mc = cold_set.gbps(o.memcpys);
        let p = socket_pingpong(o.pingpongs)?;
        if counted {
            memcpy.push(m);
            memcpy_cold.push(mc);
            sock.extend(p);
        }
    }
    sock.sort_by(f64::total_cmp);
    let memcpy = median(&memcpy);
    let memcpy_cold = median(&memcpy_cold);
    let (cold_buffers, cold_mb) = (cold_set.pairs.len(), cold_set.bytes() as f64 / 1e6);
    drop(cold_set);
    let (sock50, sock99) = (percentile(&sock, 0.5), percentile(&sock, 0.99));

    let ours = backends.iter().position(|b| b.kind == Kind::Ours);
    let theirs = backends.iter().position(|b| b.kind == Kind::Reference);
    let peer = backends.iter().position(|b| b.kind == Kind::Peer);
    let get = |i: Option<usize>, f: &dyn Fn(&[Sample]) -> f64| -> f64 {
        i.map(|i| f(&samples[i])).unwrap_or(f64::NAN)
    };
    // (label, unit, ours, QEMU's, the peer's, higher is better)
    let mut rows: Vec<(String, &str, f64, f64, f64, bool)> = Vec::new();
    let thr =
        |f: fn(&Sample) -> f64| move |v: &[Sample]| median(&v.iter().map(f).collect::<Vec<_>>());
    for (label, unit, f, hib) in [
        (
            "start-to-ready (exec -> ready line / socket)",
            "ms",
            thr(|s| s.ready_ms),
            false,
        ),
        (
            "socket accepts a connection (exec -> connect)",
            "ms",
            thr(|s| s.socket_ms),
            false,
        ),
        (
            "full frames (TRANSFER+FLUSH+UPDATE)",
            "frame/s",
            thr(|s| s.fps),
            true,
        ),
        ("full-frame bandwidth", "GB/s", thr(|s| s.gbps), true),
    ] {
        rows.push((
            label.into(),
            unit,
            get(ours, &f),
            get(theirs, &f),
            get(peer, &f),
            hib,
        ));
    }
    type Series = fn(&Sample) -> &Vec<f64>;
    let series: [(&str, Series); 3] = [
        ("small command, one at a time", |s| &s.small_us),
        ("fenced command round trip", |s| &s.fenced_us),
        ("64x64 damage round trip", |s| &s.damage_us),
    ];
    for (label, f) in series {
        for (q, p) in [("median", 0.5), ("p99", 0.99)] {
            let g = |v: &[Sample]| pooled(v, f, p);
            rows.push((
                format!("{label}, {q}"),
                "us",
                get(ours, &g),
                get(theirs, &g),
                get(peer, &g),
                false,
            ));
        }
    }
    let kib = |f: fn(&Pss) -> u64| {
        move |v: &[Sample]| median(&v.iter().map(|s| f(&s.pss) as f64).collect::<Vec<_>>())
    };
    for (label, f) in [
        (
            "PSS, all processes, without guest RAM",
            kib(|p| p.total - p.guest_ram),
        ),
        ("  of which memfd / shm mappings", kib(|p| p.memfd)),
        (
            "PSS of guest RAM memfd (shared with the VMM)",
            kib(|p| p.guest_ram),
        ),
        ("PSS, all processes, total", kib(|p| p.total)),
    ] {
        rows.push((
            label.into(),
            "KiB",
            get(ours, &f),
            get(theirs, &f),
            get(peer, &f),
            false,
        ));
    }
    // What is left once guest RAM, the shared memfds (ours: the scanout) and the 2D
    // resource's pixels (one WxHx4 copy in each backend's heap, fully written by the
    // full frames) are taken out: the processes' own overhead, approximately.
    let pixels_kib = (frame / 1024) as f64;
    let rest = move |v: &[Sample]| {
        median(
            &v.iter()
                .map(|s| (s.pss.total - s.pss.guest_ram - s.pss.memfd) as f64 - pixels_kib)
                .collect::<Vec<_>>(),
        )
    };
    rows.push((
        "PSS less guest RAM, memfds and resource pixels".into(),
        "KiB",
        get(ours, &rest),
        get(theirs, &rest),
        get(peer, &rest),
        false,
    ));

    line(String::new());
    line(format!(
        "results ({} reps): throughput and start-up = median over reps, PSS = median over reps \
         (after drawing), latency = median / p99 over all samples; ratio = ours vs reference \
         (>1: ours better)",
        o.reps
    ));
    line(vgpu_tests::bench::table_row(
        &["benchmark", "unit", "vgpu-sandbox", "QEMU", "ratio"],
        &WIDTHS,
    ));
    line(table_rule(&WIDTHS));
    for (label, unit, a, b, _, hib) in &rows {
        line(table_row(label, unit, *a, *b, *hib));
    }
    let blob50 = get(ours, &|v| pooled(v, |s| &s.blob_us, 0.5));
    let blob99 = get(ours, &|v| pooled(v, |s| &s.blob_us, 0.99));
    let blob_ready = get(ours, &|v| {
        median(&v.iter().map(|s| s.blob_ready_ms).collect::<Vec<_>>())
    });
    for (label, unit, a) in [
        ("blob MAP+UNMAP cycle (--hostmem 64M), median", "us", blob50),
        ("blob MAP+UNMAP cycle (--hostmem 64M), p99", "us", blob99),
        ("start-to-ready with --hostmem 64M", "ms", blob_ready),
    ] {
        line(vgpu_tests::bench::table_row(
            &[label, unit, &fmt(a), "no blobs", "-"],
            &WIDTHS,
        ));
    }
    if let Some(p) = peer {
        line(String::new());
        line(format!(
            "the same run against the peer {} {} (ratio = ours vs peer, >1: ours better):",
            backends[p].bin.display(),
            backends[p].args.join(" ")
        ));
        line(vgpu_tests::bench::table_row(
            &["benchmark", "unit", "vgpu-sandbox", "peer", "ratio"],
            &WIDTHS,
        ));
        line(table_rule(&WIDTHS));
        for (label, unit, a, _, c, hib) in &rows {
            line(table_row(label, unit, *a, *c, *hib));
        }
    }

    let gbps_ours = get(ours, &thr(|s| s.gbps));
    let gbps_ref = get(theirs, &thr(|s| s.gbps));
    let fenced50 = get(ours, &|v| pooled(v, |s| &s.fenced_us, 0.5));
    let fenced50_ref = get(theirs, &|v| pooled(v, |s| &s.fenced_us, 0.5));
    line(String::new());
    line("this machine, same run:".into());
    line(format!(
        "| single-core memcpy of a {w}x{h}x4 buffer, cache-hot (one buffer) | {} GB/s | full-frame path / memcpy: ours {:.3}, reference {:.3} |",
        fmt(memcpy),
        gbps_ours / memcpy,
        gbps_ref / memcpy
    ));
    line(format!(
        "| single-core memcpy of a {w}x{h}x4 buffer, out of cache ({cold_buffers} source + {cold_buffers} destination buffers, {cold_mb:.0} MB) | {} GB/s | full-frame path / memcpy: ours {:.3}, reference {:.3} |",
        fmt(memcpy_cold),
        gbps_ours / memcpy_cold,
        gbps_ref / memcpy_cold
    ));
    line(format!(
        "| 1-byte Unix-socket round trip, two processes | median {} us, p99 {} us | fenced command / socket RT (medians): ours {:.1}x, reference {:.1}x |",
        fmt(sock50),
        fmt(sock99),
        fenced50 / sock50,
        fenced50_ref / sock50
    ));
    // A MAP_BLOB and an UNMAP_BLOB each wake the device from the guest, the VMM from the
    // device, the device again and the guest: four socket round trips' worth of wake-ups
    // that no backend mapping through the VMM can avoid.
    line(format!(
        "| blob MAP+UNMAP floor: four socket round trips (guest and VMM, map and unmap) | {} us | blob cycle / floor (medians): ours {:.1}x |",
        fmt(4.0 * sock50),
        blob50 / (4.0 * sock50)
    ));
    line(format!(
        "| test VMM display peer per full frame (its thread's CPU time: socket read, checks, hash, framebuffer write; in both backends' frame time) | {} ms |",
        fmt(harness_ms)
    ));
    line(format!(
        "resource pixels per VM: {} KiB in the 2D resource ({w}x{h}x4) plus, for ours, the scanout \
         memfd of the same size; guest RAM is the test VMM's memfd, counted by PSS as shared \
         between the VMM and the backend process(es) that mapped it",
        frame / 1024
    ));
    if o.fleet > 0 {
        line(String::new());
        let results = backends
            .iter()
            .map(|b| match b.kind {
                // Two backends are enough to hold 2 x N VMs on one machine.
                Kind::Peer => Ok(None),
                _ => fleet(b, o)
                    .map(Some)
                    .map_err(|e| format!("{} fleet: {e}", name(b.kind))),
            })
            .collect::<BenchResult<Vec<_>>>()?;
        for l in fleet_table(o, &backends, &results) {
            line(l);
        }
    }
    if missing {
        line("BASELINE MISSING: the figures above are vgpu-sandbox alone".into());
    }
    Ok(out)
}

/// Frame size of the fleet part: 32 1080p VMs would be 32 x 16 MiB of pixels drawn on two
/// cores; 640x480 keeps the fleet about the processes, not the copies.
const FLEET_SIZE: (u32, u32) = (640, 480);

/// What a fleet of VMs of one backend gave.
struct FleetResult {
    /// Start-to-ready of each VM, started one after another while the earlier ones run.
    ready_ms: Vec<f64>,
    /// Each VM's full frames per second while all draw at once.
    fps: Vec<f64>,
    /// All VMs' frames per second of wall time.
    total_fps: f64,
    /// Each VM's PSS without guest RAM, after drawing, all still running.
    pss_kib: Vec<f64>,
}

/// `o.fleet` VMs of backend `b` at once, each drawing `o.fleet_frames` full frames in its
/// own thread: start-up on a host already running the others, frames/s under contention,
/// and PSS per VM.
fn fleet(b: &Backend, o: &Options) -> BenchResult<FleetResult> {
    let (w, h) = FLEET_SIZE;
    let fo = Options {
        width: w,
        height: h,
        frames: o.fleet_frames,
        samples: 0,
        ..o.clone()
    };
    let patterns: Vec<(Vec<u8>, u64)> = (0..PATTERNS)
        .map(|f| {
            let p = pattern(w, h, f * 23 + 5);
            let hash = vgpu_tests::display::payload_hash(&p);
            (p, hash)
        })
        .collect();
    let opts = VmmOptions {
        mem_size: u64::from(w) * u64::from(h) * 4 + (16 << 20),
        timeout: TIMEOUT * 6,
        display: DisplayConfig {
            outputs: vec![(w, h)],
            ..Default::default()
        },
        ..VmmOptions::default()
    };
    let mut vms = Vec::with_capacity(o.fleet);
    let mut ready_ms = Vec::with_capacity(o.fleet);
    for _ in 0..o.fleet {
        let (vm, ready) = Vm::start(b, &fo, &[])?;
        ready_ms.push(ready.as_secs_f64() * 1e3);
        vms.push(vm);
    }
    let mut vmms = vms
        .iter_mut()
        .map(|vm| vm.connect(&opts))
        .collect::<BenchResult<Vec<_>>>()?;
    let t0 = Instant::now();
    let samples = std::thread::scope(|scope| {
        let running: Vec<_> = vmms
            .iter_mut()
            .map(|vmm| {
                let (fo, patterns) = (&fo, &patterns);
                scope.spawn(move || {
                    let mut s = Sample::default();
                    draw(vmm, fo, patterns, b.kind == Kind::Peer, &mut s).map(|()| s)
                })
            })
            .collect();
        running
            .into_iter()
            .map(|t| {
                t.join()
                    .map_err(|_| "a fleet VM's thread panicked".to_string())?
            })
            .collect::<BenchResult<Vec<_>>>()
    })?;
    let wall = t0.elapsed().as_secs_f64().max(1e-9);
    let pss_kib = vms
        .iter()
        .map(|vm| {
            let p = pss_of(&vm.pids());
            (p.total - p.guest_ram) as f64
        })
        .collect();
    Ok(FleetResult {
        ready_ms,
        fps: samples.iter().map(|s| s.fps).collect(),
        total_fps: (o.fleet as f64 * f64::from(o.fleet_frames)) / wall,
        pss_kib,
    })
}

/// `v` sorted, for [`percentile`].
fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn fleet_table(o: &Options, backends: &[Backend], results: &[Option<FleetResult>]) -> Vec<String> {
    let (w, h) = FLEET_SIZE;
    let mut out = vec![
        format!(
            "fleet: {} VMs of each backend at once, each drawing {} full {w}x{h} frames in its \
             own thread (ratio = ours vs reference, >1: ours better)",
            o.fleet, o.fleet_frames
        ),
        vgpu_tests::bench::table_row(&["fleet", "unit", "vgpu-sandbox", "QEMU", "ratio"], &WIDTHS),
        table_rule(&WIDTHS),
    ];
    let of = |kind: Kind| {
        backends
            .iter()
            .position(|b| b.kind == kind)
            .and_then(|i| results[i].as_ref())
    };
    type Stat = fn(&FleetResult) -> f64;
    let rows: [(&str, &str, Stat, bool); 6] = [
        (
            "start-to-ready, median over the fleet",
            "ms",
            |r| percentile(&sorted(&r.ready_ms), 0.5),
            false,
        ),
        (
            "start-to-ready, slowest VM",
            "ms",
            |r| percentile(&sorted(&r.ready_ms), 1.0),
            false,
        ),
        (
            "frames/s per VM, median",
            "frame/s",
            |r| percentile(&sorted(&r.fps), 0.5),
            true,
        ),
        (
            "frames/s of all VMs together",
            "frame/s",
            |r| r.total_fps,
            true,
        ),
        (
            "PSS per VM without guest RAM, median",
            "KiB",
            |r| percentile(&sorted(&r.pss_kib), 0.5),
            false,
        ),
        (
            "PSS per VM without guest RAM, largest",
            "KiB",
            |r| percentile(&sorted(&r.pss_kib), 1.0),
            false,
        ),
    ];
    for (label, unit, f, hib) in rows {
        let a = of(Kind::Ours).map_or(f64::NAN, f);
        let b = of(Kind::Reference).map_or(f64::NAN, f);
        out.push(table_row(label, unit, a, b, hib));
    }
    out
}

/// The columns' widths of every table here: benchmark, unit, ours, the other, ratio.
const WIDTHS: [usize; 5] = [46, 7, 12, 12, 7];

/// One row: ours, the other, and the ratio turned so that >1 means ours is better.
fn table_row(label: &str, unit: &str, ours: f64, other: f64, higher_is_better: bool) -> String {
    let r = fmt_ratio(turned_ratio(ours, other, higher_is_better));
    vgpu_tests::bench::table_row(&[label, unit, &fmt(ours), &fmt(other), &r], &WIDTHS)
}

fn name(k: Kind) -> &'static str {
    match k {
        Kind::Ours => "ours",
        Kind::Reference => "reference",
        Kind::Peer => "peer",
    }
}

#[allow(dead_code)]
fn main() {
    let r = parse_args(std::env::args().skip(1)).and_then(|o| run(&o));
    if let Err(e) = r {
        eprintln!("isolation bench: {e}");
        std::process::exit(1);
    }
}
