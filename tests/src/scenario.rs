//! The demo scenario behind `vgpu-sandbox demo`: start the real stack, drive it like a
//! guest would, verify every frame's pixels on the display socket, and shut it down.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::display::{DisplayError, DisplayEvent};
use crate::gpu::{format, resp, GpuError, Rect, Response};
use crate::guest_memory::MemoryError;
use crate::stack::{ProcessInfo, Stack, StackError};
use crate::vmm::{VmmError, VmmOptions};

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Frames to draw and verify.
    pub frames: u32,
    /// Output width.
    pub width: u32,
    /// Output height.
    pub height: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            frames: 60,
            width: 1280,
            height: 800,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// The stack's processes (broker first).
    pub processes: Vec<ProcessInfo>,
    /// Commands sent, by type.
    pub commands: BTreeMap<String, u64>,
    /// Frames whose pixels matched exactly on the display socket.
    pub frames_verified: u32,
    /// Frames per second over the drawing loop.
    pub frames_per_second: f64,
    /// UPDATE pixel payload in MB/s over the drawing loop.
    pub update_mb_per_second: f64,
    /// Whole run, start to exit.
    pub wall_time: Duration,
    /// The broker's exit code after SIGTERM.
    pub exit_code: Option<i32>,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Starting or stopping the stack.
    #[error(transparent)]
    Stack(#[from] StackError),
    /// The VMM.
    #[error(transparent)]
    Vmm(#[from] VmmError),
    /// A command.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The display socket.
    #[error(transparent)]
    Display(#[from] DisplayError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The device did something other than expected.
    #[error("{0}")]
    Check(String),
    /// Writing the report.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

const SCANOUT: u32 = 0;
const TIMEOUT: Duration = Duration::from_secs(10);

fn expect_ok(what: &str, r: &Response) -> Result<(), DemoError> {
    if r.kind == resp::OK_NODATA {
        Ok(())
    } else {
        Err(DemoError::Check(format!(
            "{what}: expected OK_NODATA, got {}",
            r.kind_name()
        )))
    }
}

/// The moving pattern: diagonal colour bands scrolled by `frame`, BGRX bytes.
pub fn pattern(width: u32, height: u32, frame: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(width as usize * height as usize * 4);
    for y in 0..height {
        for x in 0..width {
            let t = x.wrapping_add(y).wrapping_add(frame.wrapping_mul(8));
            let b = (t & 0xff) as u8;
            let g = ((y.wrapping_mul(2) + frame) & 0xff) as u8;
            let r = ((x ^ y ^ frame.wrapping_mul(3)) & 0xff) as u8;
            v.extend_from_slice(&[b, g, r, 0xff]);
        }
    }
    v
}

/// Runs the demo against the binary at `bin`, writing a human-readable log to `out`.
pub fn run_demo(
    bin: &Path,
    opts: &DemoOptions,
    out: &mut dyn Write,
) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let (w, h) = (opts.width, opts.height);
    let output = format!("{w}x{h}");
    writeln!(out, "starting {} --output {output}", bin.display())?;
    let mut stack = Stack::start_with(bin, &["--output", &output], false)?;
    let processes = stack.processes();
    writeln!(out, "processes:")?;
    for p in &processes {
        writeln!(out, "  pid {:>7}  {}", p.pid, p.role)?;
    }

    let frame_bytes = u64::from(w) * u64::from(h) * 4;
    let vmm_opts = VmmOptions {
        mem_size: 2 * frame_bytes + (32 << 20),
        display: crate::display::DisplayConfig {
            outputs: vec![(w, h)],
            ..Default::default()
        },
        timeout: TIMEOUT,
        ..VmmOptions::default()
    };
    let mut vmm = stack.connect_with(&vmm_opts)?;
    let cfg = vmm.config();
    writeln!(
        out,
        "connected: {} scanout(s), features {:#x}",
        cfg.num_scanouts,
        vmm.acked_features()
    )?;
    let display = vmm.display().clone();
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();

    let info = gpu.get_display_info()?;
    let mode = info.display_modes()[0];
    if info.kind != resp::OK_DISPLAY_INFO || (mode.rect.width, mode.rect.height) != (w, h) {
        return Err(DemoError::Check(format!(
            "GET_DISPLAY_INFO: expected OK_DISPLAY_INFO with scanout 0 {w}x{h}, got {} with {}x{}",
            info.kind_name(),
            mode.rect.width,
            mode.rect.height
        )));
    }

    let full = Rect::new(0, 0, w, h);
    let mut backings = Vec::new();
    for id in [1u32, 2] {
        let (b, c, a) = gpu.create_backed_resource(id, format::B8G8R8X8_UNORM, w, h)?;
        expect_ok("RESOURCE_CREATE_2D", &c)?;
        expect_ok("RESOURCE_ATTACH_BACKING", &a)?;
        backings.push(b);
    }

    let loop_start = Instant::now();
    let bytes_before = display.bytes_updated();
    let mut verified = 0;
    for frame in 0..opts.frames {
        let idx = (frame % 2) as usize;
        let id = idx as u32 + 1;
        let pixels = pattern(w, h, frame);
        mem.write(backings[idx].addr, &pixels)?;
        display.skip_to_end();
        expect_ok(
            "TRANSFER_TO_HOST_2D",
            &gpu.transfer_to_host_2d(id, full, 0)?,
        )?;
        expect_ok("SET_SCANOUT", &gpu.set_scanout(SCANOUT, id, full)?)?;
        expect_ok("RESOURCE_FLUSH", &gpu.resource_flush(id, full)?)?;
        display.wait_for(
            &format!("full-frame VHOST_USER_GPU_UPDATE for scanout 0 (frame {frame})"),
            TIMEOUT,
            |e| {
                matches!(e, DisplayEvent::Update { scanout_id: SCANOUT, x: 0, y: 0, width, height, .. }
                    if *width == w && *height == h)
            },
        )?;
        let mismatch = display
            .with_framebuffer(SCANOUT, |fb| {
                if (fb.width, fb.height) != (w, h) {
                    return Some(format!(
                        "scanout is {}x{}, expected {w}x{h}",
                        fb.width, fb.height
                    ));
                }
                first_difference(&fb.pixels, &pixels, w)
            })
            .unwrap_or_else(|| Some("no framebuffer for scanout 0".into()));
        if let Some(m) = mismatch {
            return Err(DemoError::Check(format!("frame {frame}: {m}")));
        }
        verified += 1;
    }
    let loop_time = loop_start.elapsed();
    let update_bytes = display.bytes_updated() - bytes_before;
    writeln!(out, "frames verified: {verified}/{}", opts.frames)?;

    // Cursor: a 64x64 image with a hotspot, then a move.
    let cursor = pattern(64, 64, 7);
    let (cb, c, a) = gpu.create_backed_resource(3, format::B8G8R8A8_UNORM, 64, 64)?;
    expect_ok("RESOURCE_CREATE_2D (cursor)", &c)?;
    expect_ok("RESOURCE_ATTACH_BACKING (cursor)", &a)?;
    mem.write(cb.addr, &cursor)?;
    expect_ok(
        "TRANSFER_TO_HOST_2D (cursor)",
        &gpu.transfer_to_host_2d(3, Rect::new(0, 0, 64, 64), 0)?,
    )?;
    display.skip_to_end();
    gpu.update_cursor(SCANOUT, 100, 120, 3, 5, 6)?;
    let ev = display.wait_for("VHOST_USER_GPU_CURSOR_UPDATE", TIMEOUT, |e| {
        matches!(e, DisplayEvent::CursorUpdate { .. })
    })?;
    match ev {
        DisplayEvent::CursorUpdate {
            x: 100,
            y: 120,
            hot_x: 5,
            hot_y: 6,
            ref image,
            ..
        } if *image == cursor => {}
        other => {
            return Err(DemoError::Check(format!(
                "cursor update mismatch: {:?}",
                crate::display::summarize(&other)
            )))
        }
    }
    gpu.move_cursor(SCANOUT, 300, 200)?;
    display.wait_for("VHOST_USER_GPU_CURSOR_POS at 300,200", TIMEOUT, |e| {
        matches!(e, DisplayEvent::CursorPos { x: 300, y: 200, .. })
    })?;
    writeln!(out, "cursor: update and move verified")?;

    let commands = vmm.gpu().stats().clone();
    let violations = vmm.display().violations();
    if !violations.is_empty() {
        return Err(DemoError::Check(format!(
            "display protocol violations: {violations:?}"
        )));
    }
    writeln!(out, "sending SIGTERM")?;
    let status = stack.terminate(TIMEOUT)?;
    drop(vmm);
    let left = stack.wait_all_gone(TIMEOUT);
    if !status.success() {
        return Err(DemoError::Check(format!(
            "vgpu-sandbox exited with {status} after SIGTERM; output:\n{}",
            stack.log_text()
        )));
    }
    if !left.is_empty() {
        return Err(DemoError::Check(format!("processes left behind: {left:?}")));
    }

    let secs = loop_time.as_secs_f64().max(1e-9);
    let report = DemoReport {
        processes,
        commands,
        frames_verified: verified,
        frames_per_second: f64::from(verified) / secs,
        update_mb_per_second: update_bytes as f64 / 1e6 / secs,
        wall_time: started.elapsed(),
        exit_code: status.code(),
    };
    writeln!(out, "exit: {status}; no process left")?;
    writeln!(out, "summary:")?;
    writeln!(out, "  processes: {}", report.processes.len())?;
    writeln!(out, "  commands sent:")?;
    for (k, v) in &report.commands {
        writeln!(out, "    {k:<26} {v}")?;
    }
    writeln!(out, "  frames verified: {}", report.frames_verified)?;
    writeln!(
        out,
        "  {:.1} frame/s, {:.1} MB/s of pixel updates",
        report.frames_per_second, report.update_mb_per_second
    )?;
    writeln!(out, "  wall time: {:.2?}", report.wall_time)?;
    Ok(report)
}

/// Describes the first differing pixel between `got` and `want` (rows of `width` pixels).
pub fn first_difference(got: &[u8], want: &[u8], width: u32) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} bytes, expected {}", got.len(), want.len()));
    }
    let i = got
        .chunks_exact(4)
        .zip(want.chunks_exact(4))
        .position(|(a, b)| a != b)?;
    let (x, y) = (i as u32 % width, i as u32 / width);
    Some(format!(
        "pixel ({x},{y}) is {:02x?}, expected {:02x?}",
        &got[i * 4..i * 4 + 4],
        &want[i * 4..i * 4 + 4]
    ))
}
