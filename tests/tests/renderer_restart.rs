//! A renderer-worker that dies is replaced (issue 8, docs/renderer-restart.md): the
//! commands in flight are answered, the broker's spawner starts a fresh renderer, the
//! frontend rebuilds the guest's 2D state from its table and the guest's memory (the
//! picture comes back without the guest re-uploading it), and nothing leaks. Past
//! `--max-renderer-restarts` the device stops naming why. (Blobs mapped or being unmapped
//! when the renderer dies: `blobs.rs`.)

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::{fd_counts, flush_shows, image, ok, resource_with, still_works};
use nix::sys::signal::Signal;
use vgpu_tests::gpu::{format, resp, Rect};
use vgpu_tests::stack::{ProcessInfo, Role};
use vgpu_tests::{Stack, TestVmm};

/// Bound on every positive wait.
const WAIT: Duration = Duration::from_secs(20);
const W: u32 = 320;
const H: u32 = 200;

fn renderer(stack: &mut Stack) -> ProcessInfo {
    stack.expect_child(&Role::RendererWorker)
}

/// SIGKILLs the renderer and waits (bounded) for the broker to report its replacement.
/// Returns the new renderer.
fn kill_renderer_and_wait_restart(stack: &mut Stack, restarts_so_far: usize) -> ProcessInfo {
    let old = renderer(stack);
    stack
        .signal_process(&old, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let line = format!(
        "renderer-worker (pid {}) was killed by SIGKILL; restarted it as pid",
        old.pid
    );
    stack
        .wait_for_log(&line, WAIT)
        .unwrap_or_else(|e| panic!("no restart reported: {e}"));
    stack
        .wait_for_log_count("new renderer-worker linked", restarts_so_far + 1, WAIT)
        .unwrap_or_else(|e| panic!("the frontend did not link the new renderer: {e}"));
    let new = renderer(stack);
    assert_ne!(new.pid, old.pid, "the renderer was not replaced");
    assert_eq!(
        new.ppid,
        stack.pid(),
        "the new renderer is not the broker's child"
    );
    new
}

/// A `W`x`H` resource 1 with `pixels`, shown on scanout 0 and checked on the display;
/// returns the guest address of its backing.
fn show(vmm: &mut TestVmm, pixels: &[u8]) -> u64 {
    let full = Rect::new(0, 0, W, H);
    let backing = resource_with(vmm, 1, format::B8G8R8X8_UNORM, W, H, pixels);
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 1, full));
    flush_shows(vmm, 1, full, pixels, W, "before the restart");
    backing.addr
}

#[test]
fn killed_renderer_is_replaced_and_the_guest_keeps_its_picture() {
    let mut stack = Stack::start(&["--output", "320x200"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("connecting: {e}"));
    let full = Rect::new(0, 0, W, H);
    let first = image(W, H, 7);
    let backing = show(&mut vmm, &first);
    // A resource shown nowhere, with a backing: rebuilt too.
    resource_with(
        &mut vmm,
        2,
        format::B8G8R8A8_UNORM,
        16,
        16,
        &image(16, 16, 3),
    );
    let before = fd_counts(&mut stack);
    assert_eq!(
        before.len(),
        4,
        "broker, frontend, renderer, spawner: {before:?}"
    );

    kill_renderer_and_wait_restart(&mut stack, 0);

    // The guest only flushes: its picture comes from the rebuilt resource (re-uploaded
    // from the guest's backing by the frontend).
    flush_shows(
        &mut vmm,
        1,
        full,
        &first,
        W,
        "flush after the restart, no new upload",
    );

    // New pixels through the new renderer, exact.
    let second = image(W, H, 8);
    vmm.memory().write(backing, &second).expect("write backing");
    ok(
        "TRANSFER_TO_HOST_2D",
        vmm.gpu().transfer_to_host_2d(1, full, 0),
    );
    flush_shows(&mut vmm, 1, full, &second, W, "new frame after the restart");
    // Resource 2 exists in the new renderer: unref succeeds there.
    ok("RESOURCE_UNREF 2", vmm.gpu().resource_unref(2));
    still_works(&mut vmm, "a renderer restart");

    let after = fd_counts(&mut stack);
    assert_eq!(
        after, before,
        "descriptors per process differ after a renderer restart"
    );
    let status = stack.terminate(WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(0), "{}", stack.log_text());
    let left = stack.wait_all_gone(WAIT);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The renderer is SIGKILLed under a stream of transfers and flushes: every command gets
/// an answer (OK, or ERR_UNSPEC for those the dead renderer owed), none hangs, and the
/// stream goes on through the new renderer with exact pixels.
#[test]
fn renderer_killed_under_a_stream_of_transfers_every_command_is_answered() {
    let mut stack = Stack::start(&["--output", "320x200"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("connecting: {e}"));
    let pixels = image(W, H, 41);
    let _ = show(&mut vmm, &pixels);
    let full = Rect::new(0, 0, W, H);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<(u64, u64)>();
    let stop2 = stop.clone();
    let guest = std::thread::spawn(move || {
        let (mut ok_rounds, mut failed) = (0u64, 0u64);
        while !stop2.load(Ordering::Relaxed) {
            for r in [
                vmm.gpu().transfer_to_host_2d(1, full, 0),
                vmm.gpu().resource_flush(1, full),
            ] {
                // A timeout (no answer) fails the test here: every command is answered.
                let r = r.unwrap_or_else(|e| panic!("a command got no answer: {e}"));
                match r.kind {
                    resp::OK_NODATA => ok_rounds += 1,
                    resp::ERR_UNSPEC => failed += 1,
                    other => panic!("unexpected answer {other:#x}"),
                }
            }
            let _ = tx.send((ok_rounds, failed));
        }
        vmm
    });
    let wait_rounds = |at_least: u64, what: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((n, _)) if n >= at_least => return n,
                Ok(_) => {}
                Err(e) => panic!("{what}: the stream stalled ({e})"),
            }
        }
    };
    let before = wait_rounds(10, "before the kill");
    kill_renderer_and_wait_restart(&mut stack, 0);
    // Well past the restart: the stream goes on.
    wait_rounds(before + 40, "after the restart");
    stop.store(true, Ordering::Relaxed);
    let mut vmm = guest.join().expect("guest thread panicked");
    flush_shows(
        &mut vmm,
        1,
        full,
        &pixels,
        W,
        "after the restart under the stream",
    );
    still_works(&mut vmm, "a restart under a stream");
    assert_eq!(stack.processes().len(), 4, "{:#?}", stack.processes());
}

/// One death more than `--max-renderer-restarts` allows within a minute stops the device
/// with a line that says why, and nothing is left.
#[test]
fn past_the_restart_limit_the_device_stops_naming_why() {
    let mut stack = Stack::start(&["--max-renderer-restarts", "1"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("connecting: {e}"));
    kill_renderer_and_wait_restart(&mut stack, 0);
    still_works(&mut vmm, "the first restart");
    let second = renderer(&mut stack);
    stack
        .signal_process(&second, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(1), "{}", stack.log_text());
    let line = format!(
        "renderer-worker (pid {}) was killed by SIGKILL; not restarting it: it was restarted \
         1 time(s) within the last 60s already (--max-renderer-restarts 1)",
        second.pid
    );
    stack
        .wait_for_log(&line, WAIT)
        .unwrap_or_else(|e| panic!("no line says why: {e}"));
    let left = stack.wait_all_gone(WAIT);
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(vmm);
}

/// `--max-renderer-restarts 0`: the first renderer death stops the device.
#[test]
fn restarts_off_a_renderer_death_stops_the_device() {
    let (mut stack, _vmm) = common::start(&["--max-renderer-restarts", "0"]);
    let r = renderer(&mut stack);
    stack
        .signal_process(&r, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(WAIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.code(), Some(1), "{}", stack.log_text());
    stack
        .wait_for_log("not restarting it: restarts are off", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    expect_nothing_left(&mut stack);
}

fn expect_nothing_left(stack: &mut Stack) {
    let left = stack.wait_all_gone(WAIT);
    assert!(left.is_empty(), "left behind: {left:?}");
}
