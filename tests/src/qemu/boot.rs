//! One boot: a vhost-user-gpu backend (ours or QEMU's reference), QEMU with a Linux guest
//! that draws three frames (fbdev, KMS SETCRTC, KMS page flip), each compared exactly
//! against a QMP screendump; then QEMU ends and the backend must exit 0 with nothing left.

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::lines::{Lines, WaitError};
use super::qmp::Qmp;
use super::{pattern, ppm, QemuEnv, REFERENCE_BACKEND};
use crate::stack::{ProcessInfo, Stack};

/// Bound on the kernel's first console line after QEMU starts.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on each guest marker after the previous one.
pub const MARKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one QMP exchange.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a screendump showing the expected frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on QEMU and the backend exiting at the end.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Which backend serves the vhost-user socket.
#[derive(Clone, Debug)]
pub enum BackendSpec {
    /// The `vgpu-sandbox` binary with `--socket-path <tmp>` and these extra options.
    Ours(Vec<String>),
    /// The `vgpu-sandbox` binary with `--fd` naming one end of a socketpair whose other
    /// end QEMU gets as `-chardev socket,fd=N`, as libvirt connects them, and these options.
    OursConnected(Vec<String>),
    /// QEMU's `/usr/lib/qemu/vhost-user-gpu --socket-path <tmp>`.
    Reference,
}

/// The descriptor number our backend gets its end of the socketpair at.
const BACKEND_FD: i32 = 7;
/// The descriptor number QEMU gets its end at.
const QEMU_FD: i32 = 3;

/// How the boot ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The guest powers off (ACPI); QEMU exits on its own.
    GuestPowerOff,
    /// The host sends QMP `quit` while the guest still runs.
    QmpQuit,
}

/// What to boot and expect.
#[derive(Clone, Debug)]
pub struct BootSpec {
    /// Name used in messages.
    pub name: String,
    /// The backend.
    pub backend: BackendSpec,
    /// The mode the guest must see (connector, sysfs, fbdev).
    pub mode: (u32, u32),
    /// Whether the connector must have an EDID blob.
    pub expect_edid: bool,
    /// How the boot ends.
    pub ending: Ending,
}

/// One frame compared against a screendump.
#[derive(Clone, Debug)]
pub struct FrameCheck {
    /// Pattern number.
    pub frame: u32,
    /// How the guest put it on screen.
    pub how: &'static str,
    /// Screendump size.
    pub size: (u32, u32),
    /// Screendumps taken until it matched.
    pub attempts: u32,
}

/// What a successful boot saw.
#[derive(Clone, Debug, Default)]
pub struct BootReport {
    /// QEMU's version (QMP greeting).
    pub qemu_version: String,
    /// The guest driver's `features:` lines (from its dmesg).
    pub features: Vec<String>,
    /// Every "VGPU: ..." line the guest printed.
    pub guest_lines: Vec<String>,
    /// Connector mode (DRM GETCONNECTOR, preferred mode).
    pub connector_mode: (u32, u32),
    /// First mode in /sys/class/drm/card*-*/modes.
    pub sysfs_mode: (u32, u32),
    /// fbdev visible and virtual size.
    pub fb_mode: ((u32, u32), (u32, u32)),
    /// EDID blob size and first bytes (hex), if any.
    pub edid: Option<(usize, String)>,
    /// Frames compared.
    pub frames: Vec<FrameCheck>,
    /// The backend's log line about the disconnect (ours only).
    pub disconnect_line: Option<String>,
    /// The backend's exit status.
    pub backend_exit: String,
    /// QEMU's exit status.
    pub qemu_exit: String,
    /// Milestones since QEMU started.
    pub timings: Vec<(String, Duration)>,
    /// The QEMU command line used.
    pub command_line: Vec<String>,
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits (bounded, on a pidfd) for `child` to exit and reaps it.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let fd = pidfd_open(child.id());
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let Some(fd) = &fd else {
            // pidfd_open fails only for a pid that is gone: try_wait reaps it next round.
            continue;
        };
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
    }
}

/// QEMU's reference backend, killed on drop.
struct Reference {
    child: Child,
    log: Arc<Lines>,
    status: Option<ExitStatus>,
}

impl Drop for Reference {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

enum Running {
    Ours(Stack),
    Reference(Reference),
}

impl Running {
    fn log_tail(&self, n: usize) -> String {
        match self {
            Running::Ours(s) => {
                let lines = s.log_lines();
                let skip = lines.len().saturating_sub(n);
                lines[skip..]
                    .iter()
                    .map(|l| format!("    {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            Running::Reference(r) => r.log.tail(n),
        }
    }
}

/// QEMU, killed on drop.
struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
    serial: Arc<Lines>,
    stderr: Arc<Lines>,
    status: Option<ExitStatus>,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The QEMU command line the test uses (also what README.md shows).
pub fn qemu_args(
    kernel: &Path,
    initrd: &Path,
    vgpu_socket: &Path,
    qmp_socket: &Path,
) -> Vec<String> {
    let chardev = format!("socket,id=vgpu,path={}", vgpu_socket.to_string_lossy());
    qemu_args_with_chardev(kernel, initrd, &chardev, qmp_socket)
}

/// [`qemu_args`] with the vhost-user chardev spelt out (`socket,id=vgpu,...`).
fn qemu_args_with_chardev(
    kernel: &Path,
    initrd: &Path,
    chardev: &str,
    qmp_socket: &Path,
) -> Vec<String> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    [
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35,accel=tcg",
        "-m",
        "512M",
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        chardev,
        "-device",
        "vhost-user-gpu-pci,chardev=vgpu",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-qmp",
        &format!("unix:{},server=on,wait=off", s(qmp_socket)),
        "-no-reboot",
        "-kernel",
        &s(kernel),
        "-initrd",
        &s(initrd),
        "-append",
        "console=ttyS0 panic=-1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

struct Boot<'a> {
    spec: &'a BootSpec,
    // Field order is drop order: QEMU goes before the backend.
    qemu: Qemu,
    backend: Running,
    dir: tempfile::TempDir,
    pos: usize,
    t0: Instant,
    report: BootReport,
}

fn parse_wxh(s: &str) -> Option<(u32, u32)> {
    let s = s.split('@').next()?;
    let (w, h) = s.split_once('x')?;
    Some((w.parse().ok()?, h.parse().ok()?))
}

/// The value of `key=` in a "VGPU: ..." line.
fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

impl Boot<'_> {
    /// Log lines that usually explain a failure: the backend losing the VMM or dying, a
    /// seccomp kill, QEMU's vhost errors.
    fn likely_causes(&self) -> Vec<String> {
        let backend: Vec<String> = match &self.backend {
            Running::Ours(s) => s.log_lines(),
            Running::Reference(r) => r.log.all(),
        };
        let mut out: Vec<String> = backend
            .into_iter()
            .filter(|l| {
                [
                    "connection ended",
                    "VMM disconnected",
                    "SIGSYS",
                    "killed",
                    "ERROR",
                    "panicked",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .map(|l| format!("    backend: {l}"))
            .collect();
        out.extend(
            self.qemu
                .stderr
                .all()
                .into_iter()
                .filter(|l| l.contains("vhost") || l.contains("Failed"))
                .map(|l| format!("    QEMU: {l}")),
        );
        out
    }

    fn context(&self, what: &str) -> String {
        let causes = self.likely_causes();
        let causes = if causes.is_empty() {
            String::new()
        } else {
            format!("\n--- before that, during the boot:\n{}", causes.join("\n"))
        };
        format!(
            "[{}] {what}{causes}\n--- guest serial console (last 40 lines):\n{}\n--- QEMU stderr (last 20 lines):\n{}\n--- backend log (last 60 lines):\n{}",
            self.spec.name,
            self.qemu.serial.tail(40),
            self.qemu.stderr.tail(20),
            self.backend.log_tail(60),
        )
    }

    fn mark(&mut self, what: &str) {
        self.report
            .timings
            .push((what.to_string(), self.t0.elapsed()));
    }

    /// Waits for a serial line containing `marker`; a guest error or a kernel panic
    /// fails at once.
    fn wait_serial(&mut self, marker: &str, timeout: Duration) -> Result<String, String> {
        let r = self.qemu.serial.wait_for(
            &mut self.pos,
            |l| l.contains(marker),
            |l| {
                l.starts_with("VGPU: error")
                    || l.contains("Kernel panic")
                    || l.contains("BUG:")
                    || l.contains("Oops")
            },
            timeout,
        );
        r.map_err(|e| {
            let why = match e {
                WaitError::TimedOut => format!("not within {timeout:?}"),
                WaitError::Closed => "QEMU's console closed first (QEMU exited)".into(),
                WaitError::Failed(l) => format!("the guest failed first: {l:?}"),
            };
            self.context(&format!("no serial line containing {marker:?}: {why}"))
        })
    }

    fn send_line(&mut self) -> Result<(), String> {
        let r = match self.qemu.stdin.as_mut() {
            Some(s) => s.write_all(b"\n").and_then(|_| s.flush()),
            None => Ok(()),
        };
        r.map_err(|e| self.context(&format!("writing to the guest's serial console: {e}")))
    }

    fn check_frame(&mut self, qmp: &mut Qmp, frame: u32, how: &'static str) -> Result<(), String> {
        let (w, h) = self.spec.mode;
        let expected = pattern::frame_rgb(w, h, frame);
        let file = self.dir.path().join(format!("frame{frame}.ppm"));
        let deadline = Instant::now() + FRAME_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            qmp.screendump(&file, QMP_TIMEOUT)
                .map_err(|e| self.context(&format!("screendump for frame {frame}: {e}")))?;
            let data = fs::read(&file).map_err(|e| {
                self.context(&format!("reading screendump {}: {e}", file.display()))
            })?;
            let img = ppm::parse(&data)
                .map_err(|e| self.context(&format!("screendump for frame {frame}: {e}")))?;
            if (img.width, img.height) == (w, h) && img.rgb == expected {
                self.report.frames.push(FrameCheck {
                    frame,
                    how,
                    size: (w, h),
                    attempts,
                });
                self.mark(&format!("frame {frame} verified"));
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = describe_mismatch(&img, w, h, frame);
                let keep = super::cache_dir().join(format!(
                    "mismatch-{}-frame{frame}.ppm",
                    self.spec
                        .name
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                ));
                let _ = fs::write(&keep, &data);
                return Err(self.context(&format!(
                    "frame {frame} ({how}) never appeared within {FRAME_TIMEOUT:?} \
                     ({attempts} screendumps): {why}; last screendump kept at {}",
                    keep.display()
                )));
            }
            // A poll interval between screendumps, not a synchronisation: the deadline
            // bounds the wait and every attempt checks the real pixels.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn describe_mismatch(img: &ppm::Ppm, w: u32, h: u32, frame: u32) -> String {
    if (img.width, img.height) != (w, h) {
        return format!(
            "screendump is {}x{}, expected {w}x{h}",
            img.width, img.height
        );
    }
    for other in (0..=6).filter(|k| *k != frame) {
        if img.rgb == pattern::frame_rgb(w, h, other) {
            return format!("the screen still shows pattern {other}");
        }
    }
    let expected = pattern::frame_rgb(w, h, frame);
    let mut bad = 0usize;
    let mut first = None;
    for (i, (a, b)) in img.rgb.chunks(3).zip(expected.chunks(3)).enumerate() {
        if a != b {
            bad += 1;
            if first.is_none() {
                first = Some((i as u32 % w, i as u32 / w, a.to_vec(), b.to_vec()));
            }
        }
    }
    match first {
        Some((x, y, got, want)) => format!(
            "{bad} of {} pixels differ; first at ({x},{y}): got {got:?}, want {want:?}",
            w * h
        ),
        None => "identical (raced)".into(),
    }
}

/// Whether a unix socket bound at `path` is listening (from /proc/net/unix: flag
/// __SO_ACCEPTCON, 0x10000).
fn unix_listening(path: &Path) -> bool {
    let want = path.to_string_lossy();
    fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8
                && f[7] == want
                && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
        })
}

fn start_reference(socket: &Path) -> Result<Reference, String> {
    let mut child = Command::new(REFERENCE_BACKEND)
        .arg("--socket-path")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {REFERENCE_BACKEND}: {e}"))?;
    let log = Lines::new("reference-backend");
    if let Some(o) = child.stdout.take() {
        log.spawn_reader(o);
    }
    if let Some(e) = child.stderr.take() {
        log.spawn_reader(e);
    }
    let mut r = Reference {
        child,
        log,
        status: None,
    };
    // It prints nothing when ready: poll (bounded) until its socket listens. Connecting to
    // probe would use up the one connection it serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !unix_listening(socket) {
        if let Ok(Some(s)) = r.child.try_wait() {
            r.status = Some(s);
            return Err(format!(
                "{REFERENCE_BACKEND} exited ({s}) before listening; output:\n{}",
                r.log.tail(20)
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{REFERENCE_BACKEND} did not listen on {} within 10 s; output:\n{}",
                socket.display(),
                r.log.tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(r)
}

/// Boots QEMU against the backend in `spec` and checks everything; `Err` carries what did
/// not happen with the tails of the serial console, QEMU's stderr and the backend's log.
pub fn run_boot(env: &QemuEnv, spec: &BootSpec) -> Result<BootReport, String> {
    let dir = tempfile::Builder::new()
        .prefix("vgpu-qemu")
        .tempdir()
        .map_err(|e| format!("tempdir: {e}"))?;
    let (backend, chardev, qemu_end) = match &spec.backend {
        BackendSpec::Ours(args) => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let stack = Stack::start(&args).map_err(|e| format!("starting vgpu-sandbox: {e}"))?;
            let socket = stack.socket_path().to_string_lossy().into_owned();
            (
                Running::Ours(stack),
                format!("socket,id=vgpu,path={socket}"),
                None,
            )
        }
        BackendSpec::OursConnected(args) => {
            let (ours, theirs) =
                std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            let mut cmd = Command::new(
                crate::stack::default_binary().map_err(|e| format!("vgpu-sandbox: {e}"))?,
            );
            cmd.arg("--fd").arg(BACKEND_FD.to_string()).args(args);
            crate::stack::inherit_fd(&mut cmd, ours.as_raw_fd(), BACKEND_FD);
            let stack_dir = tempfile::Builder::new()
                .prefix("vgpu-qemu-fd")
                .tempdir()
                .map_err(|e| format!("tempdir: {e}"))?;
            // Never connected to: QEMU talks on the socketpair.
            let unused = stack_dir.path().join("unused.sock");
            let stack = Stack::start_command(cmd, stack_dir, unused, true)
                .map_err(|e| format!("starting vgpu-sandbox --fd {BACKEND_FD}: {e}"))?;
            drop(ours);
            (
                Running::Ours(stack),
                format!("socket,id=vgpu,fd={QEMU_FD}"),
                Some(theirs),
            )
        }
        BackendSpec::Reference => {
            let socket = dir.path().join("reference.sock");
            let chardev = format!("socket,id=vgpu,path={}", socket.to_string_lossy());
            (Running::Reference(start_reference(&socket)?), chardev, None)
        }
    };
    let qmp_path = dir.path().join("qmp.sock");
    let args = qemu_args_with_chardev(&env.kernel.vmlinuz, &env.initramfs, &chardev, &qmp_path);
    let mut qemu = Command::new(&env.qemu);
    if let Some(end) = &qemu_end {
        crate::stack::inherit_fd(&mut qemu, end.as_raw_fd(), QEMU_FD);
    }
    let mut child = qemu
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", env.qemu.display()))?;
    // QEMU holds its end now: ours must see it close when QEMU goes.
    drop(qemu_end);
    let serial = Lines::new(&format!("{} guest", spec.name));
    let stderr = Lines::new(&format!("{} qemu", spec.name));
    if let Some(o) = child.stdout.take() {
        serial.spawn_reader(o);
    }
    if let Some(e) = child.stderr.take() {
        stderr.spawn_reader(e);
    }
    let stdin = child.stdin.take();
    let mut command_line = vec![env.qemu.to_string_lossy().into_owned()];
    command_line.extend(args);
    let mut boot = Boot {
        spec,
        qemu: Qemu {
            child,
            stdin,
            serial,
            stderr,
            status: None,
        },
        backend,
        dir,
        pos: 0,
        t0: Instant::now(),
        report: BootReport {
            command_line,
            ..BootReport::default()
        },
    };
    boot.run()?;
    Ok(boot.report)
}

impl Boot<'_> {
    fn run(&mut self) -> Result<(), String> {
        // The kernel's first console line: QEMU has set up its chardevs (QMP included)
        // and the machine runs.
        self.wait_serial("Linux version", BOOT_TIMEOUT)?;
        self.mark("kernel booting");
        let qmp_path = self.dir.path().join("qmp.sock");
        let mut qmp = Qmp::connect(&qmp_path, QMP_TIMEOUT)
            .map_err(|e| self.context(&format!("QMP connection: {e}")))?;
        self.report.qemu_version = qmp.version.clone();

        self.wait_serial("VGPU: init started", MARKER_TIMEOUT)?;
        self.mark("init started");
        self.wait_serial("VGPU: modules loaded", MARKER_TIMEOUT)?;
        self.mark("virtio_gpu loaded");
        self.wait_serial("VGPU: frame 1 ready", MARKER_TIMEOUT)?;
        self.mark("frame 1 drawn");
        self.collect_guest_report()?;
        self.check_frame(&mut qmp, 1, "fbdev mmap")?;
        self.send_line()?;

        self.wait_serial("VGPU: frame 2 ready", MARKER_TIMEOUT)?;
        self.check_frame(&mut qmp, 2, "KMS dumb buffer + SETCRTC")?;
        self.send_line()?;

        self.wait_serial("VGPU: frame 3 ready", MARKER_TIMEOUT)?;
        self.check_frame(&mut qmp, 3, "KMS dumb buffer + PAGE_FLIP (event)")?;

        match self.spec.ending {
            Ending::GuestPowerOff => {
                self.send_line()?;
                self.wait_serial("VGPU: done", MARKER_TIMEOUT)?;
            }
            Ending::QmpQuit => {
                qmp.quit(QMP_TIMEOUT)
                    .map_err(|e| self.context(&format!("QMP quit: {e}")))?;
            }
        }
        let status = wait_child(&mut self.qemu.child, EXIT_TIMEOUT)
            .map_err(|e| self.context(&format!("waiting for QEMU: {e}")))?;
        let Some(status) = status else {
            return Err(self.context(&format!(
                "QEMU did not exit within {EXIT_TIMEOUT:?} after {:?}",
                self.spec.ending
            )));
        };
        self.qemu.status = Some(status);
        self.report.qemu_exit = status.to_string();
        self.mark("QEMU exited");
        if !status.success() {
            return Err(self.context(&format!("QEMU exited with {status}")));
        }
        self.check_backend_exit()
    }

    fn collect_guest_report(&mut self) -> Result<(), String> {
        let lines = self.qemu.serial.all();
        let vgpu: Vec<String> = lines
            .iter()
            .filter(|l| l.starts_with("VGPU: "))
            .cloned()
            .collect();
        self.report.features = vgpu
            .iter()
            .filter(|l| l.starts_with("VGPU: dmesg:") && l.contains("features:"))
            .map(|l| l.trim_start_matches("VGPU: dmesg:").trim().to_string())
            .collect();
        self.report.guest_lines = vgpu.clone();
        let find = |p: &str| vgpu.iter().find(|l| l.starts_with(p)).cloned();
        if self.report.features.is_empty() {
            return Err(self.context("the guest's dmesg has no virtio_gpu `features:` line"));
        }
        let want = self.spec.mode;
        let conn =
            find("VGPU: connector ").ok_or_else(|| self.context("no `VGPU: connector` line"))?;
        if field(&conn, "status") != Some("connected") {
            return Err(self.context(&format!("connector not connected: {conn}")));
        }
        self.report.connector_mode = field(&conn, "mode")
            .and_then(parse_wxh)
            .ok_or_else(|| self.context(&format!("no mode in {conn:?}")))?;
        let sysfs = find("VGPU: sysfs ").ok_or_else(|| self.context("no `VGPU: sysfs` line"))?;
        self.report.sysfs_mode = field(&sysfs, "first")
            .and_then(parse_wxh)
            .ok_or_else(|| self.context(&format!("no mode in {sysfs:?}")))?;
        let fb = find("VGPU: fb ").ok_or_else(|| self.context("no `VGPU: fb` line"))?;
        let fb_mode = field(&fb, "mode").and_then(parse_wxh);
        let fb_virtual = field(&fb, "virtual").and_then(parse_wxh);
        let (Some(fb_mode), Some(fb_virtual)) = (fb_mode, fb_virtual) else {
            return Err(self.context(&format!("cannot parse {fb:?}")));
        };
        self.report.fb_mode = (fb_mode, fb_virtual);
        if self.report.connector_mode != want
            || self.report.sysfs_mode != want
            || fb_mode != want
            || fb_virtual.0 != want.0
            || fb_virtual.1 != want.1
        {
            return Err(self.context(&format!(
                "the guest's mode is not the configured {}x{}: connector {:?}, sysfs {:?}, \
                 fbdev {:?} virtual {:?}",
                want.0,
                want.1,
                self.report.connector_mode,
                self.report.sysfs_mode,
                fb_mode,
                fb_virtual
            )));
        }
        let edid = find("VGPU: edid ").ok_or_else(|| self.context("no `VGPU: edid` line"))?;
        if let Some(size) = field(&edid, "size").and_then(|s| s.parse::<usize>().ok()) {
            let head = find("VGPU: edid head ")
                .map(|l| l.trim_start_matches("VGPU: edid head ").to_string())
                .unwrap_or_default();
            if size < 128 || !head.starts_with("00ffffffffffff00") {
                return Err(self.context(&format!(
                    "the EDID blob is not an EDID: {size} bytes, starts {head}"
                )));
            }
            self.report.edid = Some((size, head));
        } else if self.spec.expect_edid {
            return Err(self.context(&format!("the connector has no EDID blob: {edid:?}")));
        }
        Ok(())
    }

    fn check_backend_exit(&mut self) -> Result<(), String> {
        match &mut self.backend {
            Running::Ours(stack) => {
                let line = stack
                    .wait_for_log("VMM disconnected", EXIT_TIMEOUT)
                    .map_err(|e| {
                        format!(
                            "[{}] the backend did not log the disconnect: {e}",
                            self.spec.name
                        )
                    })?;
                self.report.disconnect_line = Some(line);
                let status = stack
                    .wait_exit(EXIT_TIMEOUT)
                    .map_err(|e| format!("[{}] the backend did not exit: {e}", self.spec.name))?;
                self.report.backend_exit = status.to_string();
                if !status.success() {
                    return Err(format!(
                        "[{}] vgpu-sandbox exited with {status} after QEMU quit; log:\n{}",
                        self.spec.name,
                        stack.log_text()
                    ));
                }
                let left: Vec<ProcessInfo> = stack.wait_all_gone(EXIT_TIMEOUT);
                if !left.is_empty() {
                    return Err(format!(
                        "[{}] processes left after vgpu-sandbox exited: {left:?}",
                        self.spec.name
                    ));
                }
            }
            Running::Reference(r) => {
                let status = wait_child(&mut r.child, EXIT_TIMEOUT)
                    .map_err(|e| format!("waiting for the reference backend: {e}"))?;
                let Some(status) = status else {
                    return Err(format!(
                        "[{}] the reference backend did not exit within {EXIT_TIMEOUT:?} after QEMU quit; log:\n{}",
                        self.spec.name,
                        r.log.tail(40)
                    ));
                };
                r.status = Some(status);
                self.report.backend_exit = status.to_string();
                if !status.success() {
                    return Err(format!(
                        "[{}] the reference backend exited with {status}; log:\n{}",
                        self.spec.name,
                        r.log.tail(40)
                    ));
                }
            }
        }
        self.mark("backend exited");
        Ok(())
    }
}
