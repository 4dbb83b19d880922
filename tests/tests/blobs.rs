//! Blob mapping end to end (issue 5): the guest maps cross-domain blobs into the hostmem
//! window through the test VMM (QEMU's MAP_FIXED design, `vgpu_tests::hostmem`), and the
//! bug class of QEMU's mapping-state patch is exercised with held, dropped and duplicated
//! VMM acks (`vgpu_tests::backend_req`).
//!
//! Contract details asserted here (device-frontend/src/blobs.rs):
//! an invalid map offset (unaligned, outside the window, over a live mapping) is
//! ERR_INVALID_PARAMETER and never reaches the VMM; a re-entered UNMAP_BLOB is answered
//! OK_NODATA once the single unmap completed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{expect, ok, still_works};
use vgpu_tests::backend_req::{AckAction, AckGate, BackendEvent, BackendRequests, RequestKind};
use vgpu_tests::cross_domain::{self, ImageRequirements, DRM_FORMAT_XRGB8888};
use vgpu_tests::gpu::{blob, resp, BlobParams, Command, GpuError};
use vgpu_tests::hostmem::HostmemWindow;
use vgpu_tests::vmm::HOSTMEM_SHMID;
use vgpu_tests::{Stack, TestVmm, VmmOptions};
use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};

/// The hostmem window the device is started with.
const HOSTMEM: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// Bound on every positive wait.
const WAIT: Duration = Duration::from_secs(10);
/// Bound on a negative wait ("this has not happened (yet)").
const QUIET: Duration = Duration::from_millis(500);
/// Bound on the stack's exit.
const EXIT: Duration = Duration::from_secs(10);
/// The cross-domain context.
const CTX: u32 = 1;
/// The context's query ring (a guest blob).
const RING: u32 = 100;
/// VIRTIO_GPU_F_RESOURCE_BLOB.
const F_RESOURCE_BLOB: u64 = 1 << 3;
/// VIRTIO_GPU_F_CONTEXT_INIT.
const F_CONTEXT_INIT: u64 = 1 << 4;

/// A started stack with a hostmem-enabled test VMM and an initialised cross-domain context.
struct Fx {
    stack: Stack,
    vmm: TestVmm,
    reqs: Arc<BackendRequests>,
    window: Arc<HostmemWindow>,
    ring_addr: u64,
}

fn start() -> Fx {
    let stack = Stack::start(&["--hostmem", "64M"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox --hostmem 64M: {e}"));
    connect(stack)
}

/// Connects a hostmem-enabled test VMM to `stack` and initialises a cross-domain context.
fn connect(stack: Stack) -> Fx {
    let mut vmm = common::connect_hostmem(&stack, HOSTMEM);
    for (bit, name) in [
        (F_RESOURCE_BLOB, "VIRTIO_GPU_F_RESOURCE_BLOB"),
        (F_CONTEXT_INIT, "VIRTIO_GPU_F_CONTEXT_INIT"),
    ] {
        assert_ne!(
            vmm.device_features() & bit,
            0,
            "--hostmem must offer {name} (offered {:#x})",
            vmm.device_features()
        );
    }
    let reqs = vmm.backend_requests().expect("backend requests").clone();
    let window = vmm.hostmem().expect("hostmem window").clone();
    assert_eq!(window.size(), HOSTMEM);

    let ring_addr = common::cross_domain_context(&mut vmm, CTX, RING);
    Fx {
        stack,
        vmm,
        reqs,
        window,
        ring_addr,
    }
}

/// Creates a mappable cross-domain (HOST3D) blob for a `w`x`h` XR24 image.
fn host_blob(fx: &mut Fx, resource_id: u32, w: u32, h: u32) -> ImageRequirements {
    common::mappable_host_blob(&mut fx.vmm, CTX, fx.ring_addr, resource_id, w, h)
}

/// The blob's window length: its size in whole pages.
fn window_len(reqs: &ImageRequirements) -> u64 {
    reqs.size.div_ceil(PAGE) * PAGE
}

/// RESOURCE_MAP_BLOB that must succeed; checks the cache type and the SHMEM_MAP it caused.
#[track_caller]
fn map_ok(fx: &mut Fx, resource_id: u32, offset: u64, reqs: &ImageRequirements) {
    let r = expect(
        &format!("RESOURCE_MAP_BLOB {resource_id} at {offset:#x}"),
        fx.vmm.gpu().resource_map_blob(resource_id, offset),
        resp::OK_MAP_INFO,
    );
    assert_eq!(
        r.map_info(),
        reqs.map_info,
        "OK_MAP_INFO carries the blob's real cache type"
    );
    let ev = fx
        .reqs
        .wait_for(WAIT, |e| e.is_received(RequestKind::Map))
        .unwrap_or_else(|| panic!("no SHMEM_MAP seen:\n{}", fx.reqs.summary()));
    let req = ev.request().expect("request");
    assert_eq!(
        (req.shmid, req.shm_offset, req.len, req.fd_offset),
        (HOSTMEM_SHMID, offset, window_len(reqs), 0),
        "SHMEM_MAP of resource {resource_id}: {req:?}"
    );
    assert!(req.need_reply, "SHMEM_MAP must ask for REPLY_ACK: {req:?}");
    assert_eq!(req.mmap_flags & 1, 1, "mapped writable: {req:?}");
    assert_eq!(req.outcome, Ok(()), "the VMM applied the map: {req:?}");
}

#[track_caller]
fn no_violations(fx: &Fx) {
    let v = fx.reqs.violations();
    assert!(
        v.is_empty(),
        "the device asked the VMM for something it must not: {v:#?}\n{}",
        fx.reqs.summary()
    );
}

fn unmaps_received(fx: &Fx) -> usize {
    fx.reqs.count(|e| e.is_received(RequestKind::Unmap))
}

/// Asserts the control queue is blocked: a GET_DISPLAY_INFO sentinel gets no answer
/// within [`QUIET`]. The sentinel is consumed; its completion shows up later in
/// `completions()` once the queue moves again.
#[track_caller]
/// Waits (bounded) until the VMM side holds an unmap's ack; `why` says what should have
/// sent the SHMEM_UNMAP.
fn wait_unmap_held(fx: &Fx, why: &str) {
    let held = fx.reqs.wait_for(WAIT, |e| {
        matches!(
            e,
            BackendEvent::Held {
                kind: RequestKind::Unmap,
                ..
            }
        )
    });
    assert!(held.is_some(), "{why}:\n{}", fx.reqs.summary());
}

fn assert_control_queue_blocked(fx: &mut Fx, why: &str) {
    let gpu = fx.vmm.gpu();
    let sentinel = gpu
        .submit(&Command::GetDisplayInfo, None)
        .expect("submit GET_DISPLAY_INFO");
    let t = gpu.timeout();
    gpu.set_timeout(QUIET);
    let r = gpu.wait(sentinel);
    gpu.set_timeout(t);
    assert!(
        matches!(r, Err(GpuError::Timeout { .. })),
        "{why}: GET_DISPLAY_INFO behind it was answered ({r:?})"
    );
}

#[test]
fn hostmem_handshake_reports_the_window_and_opens_the_request_channel() {
    let stack = Stack::start(&["--hostmem", "64M"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox --hostmem 64M: {e}"));
    let opts = VmmOptions {
        hostmem: Some(HOSTMEM),
        ..VmmOptions::default()
    };
    let vmm = stack
        .connect_with(&opts)
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_text()));
    assert_eq!(vmm.hostmem().expect("window").size(), HOSTMEM);
    let reqs = vmm.backend_requests().expect("channel");
    assert!(!reqs.is_closed());
    assert!(reqs.events().is_empty(), "{}", reqs.summary());
    // A VMM configured for another size is refused at GET_SHMEM_CONFIG.
    let wrong = VmmOptions {
        hostmem: Some(HOSTMEM / 2),
        ..VmmOptions::default()
    };
    drop(vmm);
    let stack2 = Stack::start(&["--hostmem", "64M"]).unwrap_or_else(|e| panic!("{e}"));
    assert!(stack2.connect_with(&wrong).is_err());
}

/// (1) create, map at 0, the guest writes and reads through the window, unmap, zeros.
#[test]
fn mapped_blob_is_read_and_written_through_the_window_and_reads_zero_after_unmap() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    let len = window_len(&reqs);
    assert_eq!(fx.window.mappings().len(), 1);

    let pattern: Vec<u8> = (0..len as usize).map(|i| (i * 7 + 3) as u8).collect();
    fx.window.write(0, &pattern).expect("guest write");
    assert_eq!(fx.window.read(0, len as usize).unwrap(), pattern);

    ok("RESOURCE_UNMAP_BLOB 1", fx.vmm.gpu().resource_unmap_blob(1));
    let ev = fx
        .reqs
        .wait_for(WAIT, |e| e.is_received(RequestKind::Unmap))
        .unwrap_or_else(|| panic!("no SHMEM_UNMAP:\n{}", fx.reqs.summary()));
    let req = ev.request().expect("request");
    assert_eq!(
        (req.shmid, req.shm_offset, req.len),
        (HOSTMEM_SHMID, 0, len)
    );
    assert_eq!(
        fx.window.read(0, len as usize).unwrap(),
        vec![0; len as usize],
        "the range reads as zeros after the unmap"
    );
    assert!(fx.window.mappings().is_empty());

    // The blob kept what the guest wrote: mapped again elsewhere, the bytes are there.
    map_ok(&mut fx, 1, 16 * PAGE, &reqs);
    assert_eq!(fx.window.read(16 * PAGE, len as usize).unwrap(), pattern);
    ok(
        "RESOURCE_UNMAP_BLOB 1 (again)",
        fx.vmm.gpu().resource_unmap_blob(1),
    );
    ok("RESOURCE_UNREF 1", fx.vmm.gpu().resource_unref(1));
    no_violations(&fx);
    still_works(&mut fx.vmm, "map / unmap");
}

/// UNMAP_BLOB of `resource_id` with the VMM's ack held, then RESET_DEVICE; returns the
/// gate that holds the ack.
fn reset_behind_a_held_unmap(fx: &mut Fx, resource_id: u32) -> AckGate {
    let gate = fx.reqs.delay_next(RequestKind::Unmap);
    let _unmap = fx
        .vmm
        .gpu()
        .submit(&Command::ResourceUnmapBlob { resource_id }, None)
        .expect("submit UNMAP_BLOB");
    wait_unmap_held(fx, "UNMAP_BLOB sent no SHMEM_UNMAP");
    // RESET_DEVICE itself is answered at once: a VMM such as QEMU services the backend
    // channel on the thread that waits for this reply, so holding the reply until the
    // unmap ack arrived would deadlock it. The reset is finished inside the device instead:
    // its control queue stays closed until every unmap completed.
    fx.vmm
        .frontend()
        .reset_device()
        .unwrap_or_else(|e| panic!("RESET_DEVICE: {e}\n{}", fx.stack.log_text()));
    gate
}

/// The reset waits while `gate` holds the unmap's ack, and finishes once it is released.
#[track_caller]
fn reset_finishes_on_the_release(fx: &Fx, gate: &AckGate) {
    const FINISHED: &str = "every blob unmapped: the device reset goes on";
    assert!(
        fx.stack.wait_for_log(FINISHED, QUIET).is_err(),
        "the reset finished while an unmap's VMM ack was held"
    );
    gate.release();
    fx.stack
        .wait_for_log(FINISHED, WAIT)
        .unwrap_or_else(|e| panic!("the reset never finished after the release: {e}"));
    assert!(gate.is_released());
}

/// (2) UNMAP_BLOB re-entered while the first unmap waits for the VMM's ack.
#[test]
fn unmap_reentered_while_in_flight_unmaps_once_and_answers_both() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    let gate = fx.reqs.delay_next(RequestKind::Unmap);
    let gpu = fx.vmm.gpu();
    let unmap = Command::ResourceUnmapBlob { resource_id: 1 };
    let first = gpu.submit(&unmap, None).expect("submit UNMAP_BLOB");
    wait_unmap_held(&fx, "the first UNMAP_BLOB sent no SHMEM_UNMAP");
    let second = fx
        .vmm
        .gpu()
        .submit(&unmap, None)
        .expect("submit UNMAP_BLOB");
    assert!(
        !fx.reqs.wait_until(QUIET, |ev| ev
            .iter()
            .filter(|e| e.is_received(RequestKind::Unmap))
            .count()
            > 1),
        "a second SHMEM_UNMAP while the first was in flight:\n{}",
        fx.reqs.summary()
    );
    gate.release();
    let gpu = fx.vmm.gpu();
    ok("first RESOURCE_UNMAP_BLOB", gpu.wait(first));
    ok("re-entered RESOURCE_UNMAP_BLOB", gpu.wait(second));
    assert_eq!(unmaps_received(&fx), 1, "{}", fx.reqs.summary());
    assert!(fx.window.mappings().is_empty());
    // The queue is not stalled (QEMU's bug: a second renderer_blocked++ never undone).
    still_works(&mut fx.vmm, "a re-entered unmap");
    // The blob is unmapped once and for all: mapping it again works.
    map_ok(&mut fx, 1, 0, &reqs);
    assert_eq!(unmaps_received(&fx), 1);
    no_violations(&fx);
}

/// (3) RESOURCE_UNREF of a mapped blob: SHMEM_UNMAP first, the unref answered after it.
#[test]
fn unref_of_a_mapped_blob_unmaps_it_first() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    let gate = fx.reqs.delay_next(RequestKind::Unmap);
    let unref = fx
        .vmm
        .gpu()
        .submit(&Command::ResourceUnref { resource_id: 1 }, None)
        .expect("submit UNREF");
    wait_unmap_held(&fx, "UNREF of a mapped blob sent no SHMEM_UNMAP");
    let req = fx
        .reqs
        .requests()
        .into_iter()
        .rfind(|r| r.kind == RequestKind::Unmap)
        .expect("unmap");
    assert_eq!((req.shm_offset, req.len), (0, window_len(&reqs)));
    assert_control_queue_blocked(&mut fx, "UNREF waiting for its unmap");
    gate.release();
    let gpu = fx.vmm.gpu();
    ok("RESOURCE_UNREF of a mapped blob", gpu.wait(unref));
    let order = gpu.completions().to_vec();
    let pos = |name: &str| order.iter().rposition(|c| c == name);
    assert!(
        pos("RESOURCE_UNREF") < pos("GET_DISPLAY_INFO"),
        "completion order: {order:?}"
    );
    assert_eq!(unmaps_received(&fx), 1);
    assert!(fx.window.mappings().is_empty());
    expect(
        "RESOURCE_MAP_BLOB of the unreffed blob",
        fx.vmm.gpu().resource_map_blob(1, 0),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    no_violations(&fx);
    still_works(&mut fx.vmm, "unref of a mapped blob");
}

/// (4) RESET_DEVICE with an unmap in flight and the VMM's ack held: the reset completes
/// only after the ack, and nothing is unmapped twice.
#[test]
fn reset_with_an_unmap_in_flight_waits_for_the_ack() {
    let mut fx = start();
    assert!(
        fx.vmm
            .protocol_features()
            .contains(VhostUserProtocolFeatures::RESET_DEVICE),
        "--hostmem must offer protocol feature RESET_DEVICE"
    );
    let a = host_blob(&mut fx, 1, 64, 64);
    let b = host_blob(&mut fx, 2, 32, 32);
    map_ok(&mut fx, 1, 0, &a);
    map_ok(&mut fx, 2, 64 * PAGE, &b);
    let gate = reset_behind_a_held_unmap(&mut fx, 1);
    reset_finishes_on_the_release(&fx, &gate);
    // Every blob left the window, each exactly once. (The predicates look only at the
    // events they are handed: the request log's lock is held while they run.)
    let unmaps_at = |events: &[BackendEvent], off: u64| {
        events
            .iter()
            .filter(|e| matches!(e, BackendEvent::Received(r) if r.kind == RequestKind::Unmap && r.shm_offset == off))
            .count()
    };
    assert!(
        fx.reqs.wait_until(WAIT, |ev| unmaps_at(ev, 0) >= 1
            && unmaps_at(ev, 64 * PAGE) >= 1),
        "not every blob was unmapped:\n{}",
        fx.reqs.summary()
    );
    assert!(
        !fx.reqs.wait_until(QUIET, |ev| unmaps_at(ev, 0) > 1
            || unmaps_at(ev, 64 * PAGE) > 1),
        "double unmap:\n{}",
        fx.reqs.summary()
    );
    assert!(
        fx.window.mappings().is_empty(),
        "still mapped after reset: {:?}",
        fx.window.mappings()
    );
    no_violations(&fx);
}

/// (5) A command queued behind a suspended unmap is answered only after it completes.
#[test]
fn command_behind_a_suspended_unmap_runs_after_it() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    let gate = fx.reqs.delay_next(RequestKind::Unmap);
    let gpu = fx.vmm.gpu();
    gpu.clear_completions();
    let unmap = gpu
        .submit(&Command::ResourceUnmapBlob { resource_id: 1 }, None)
        .expect("submit UNMAP_BLOB");
    wait_unmap_held(&fx, "UNMAP_BLOB sent no SHMEM_UNMAP");
    assert_control_queue_blocked(&mut fx, "UNMAP_BLOB suspended");
    gate.release();
    let gpu = fx.vmm.gpu();
    ok("RESOURCE_UNMAP_BLOB", gpu.wait(unmap));
    // Collect the sentinel too: a fresh command is answered, so everything before it was.
    let r = gpu.get_display_info().expect("GET_DISPLAY_INFO");
    assert_eq!(r.kind, resp::OK_DISPLAY_INFO);
    assert_eq!(
        gpu.completions(),
        [
            "RESOURCE_UNMAP_BLOB",
            "GET_DISPLAY_INFO",
            "GET_DISPLAY_INFO"
        ],
        "the device answered in this order"
    );
    no_violations(&fx);
}

/// (6a) A duplicated SHMEM_UNMAP ack is ignored with a log line: the device drains it
/// before its next request, so the next map and unmap get their own acks (vhost's own
/// `Backend` would take the stale ack as the next reply and stay off by one for good:
/// `hostmem_vmm::vhost_backend_takes_a_duplicated_ack_as_the_next_reply`).
#[test]
fn duplicated_unmap_ack_is_ignored_and_later_requests_get_their_own_acks() {
    let mut fx = start();
    let a = host_blob(&mut fx, 1, 64, 64);
    let b = host_blob(&mut fx, 2, 64, 64);
    map_ok(&mut fx, 1, 0, &a);
    fx.reqs
        .on_next(Some(RequestKind::Unmap), AckAction::Duplicate);
    ok("RESOURCE_UNMAP_BLOB 1", fx.vmm.gpu().resource_unmap_blob(1));
    assert!(fx
        .reqs
        .wait_for(WAIT, |e| matches!(
            e,
            BackendEvent::Acked {
                kind: RequestKind::Unmap,
                copies: 2,
                ..
            }
        ))
        .is_some());
    // Both the map and the unmap after it must see their own replies: an off-by-one
    // channel would refuse the map (a stale UNMAP ack) and then the unmap (the map's ack).
    map_ok(&mut fx, 2, 32 * PAGE, &b);
    ok("RESOURCE_UNMAP_BLOB 2", fx.vmm.gpu().resource_unmap_blob(2));
    map_ok(&mut fx, 1, 0, &a);
    fx.stack
        .wait_for_log("ignored a reply", WAIT)
        .unwrap_or_else(|e| panic!("the duplicate was not logged: {e}"));
    still_works(&mut fx.vmm, "a duplicated ack");
    no_violations(&fx);
}

/// (6b) A dropped SHMEM_UNMAP ack leaves the unmap pending (queue blocked), and the stack
/// still shuts down cleanly on SIGTERM.
#[test]
fn dropped_unmap_ack_keeps_the_unmap_pending_and_sigterm_still_exits_cleanly() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    fx.reqs.on_next(Some(RequestKind::Unmap), AckAction::Drop);
    let _unmap = fx
        .vmm
        .gpu()
        .submit(&Command::ResourceUnmapBlob { resource_id: 1 }, None)
        .expect("submit UNMAP_BLOB");
    assert!(
        fx.reqs
            .wait_for(WAIT, |e| matches!(
                e,
                BackendEvent::Dropped {
                    kind: RequestKind::Unmap,
                    ..
                }
            ))
            .is_some(),
        "{}",
        fx.reqs.summary()
    );
    assert_control_queue_blocked(&mut fx, "the unmap whose ack never comes");
    let status = fx.stack.terminate(EXIT).unwrap_or_else(|e| {
        panic!(
            "SIGTERM with an unmap pending: {e}\n{}",
            fx.stack.log_text()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM with an unmap pending: {status}\n{}",
        fx.stack.log_text()
    );
    let left = fx.stack.wait_all_gone(EXIT);
    assert!(left.is_empty(), "processes left: {left:?}");
    assert_eq!(unmaps_received(&fx), 1);
    no_violations(&fx);
}

/// (7) Invalid map offsets are ERR_INVALID_PARAMETER and never reach the VMM.
#[test]
fn invalid_map_offsets_are_invalid_parameters() {
    let mut fx = start();
    let a = host_blob(&mut fx, 1, 64, 64);
    let b = host_blob(&mut fx, 2, 64, 64);
    map_ok(&mut fx, 1, 8 * PAGE, &a);
    let len_b = window_len(&b);
    let cases = [
        ("not page aligned", 0x1001),
        ("half a page", PAGE / 2),
        ("at the end of the window", HOSTMEM),
        ("crossing the end of the window", HOSTMEM - PAGE),
        ("far beyond the window", 1 << 40),
        ("overflowing", u64::MAX - PAGE + 1),
        ("on the live mapping", 8 * PAGE),
        ("overlapping its start", 8 * PAGE - len_b + PAGE),
        ("overlapping its end", 8 * PAGE + window_len(&a) - PAGE),
    ];
    for (what, offset) in cases {
        expect(
            &format!("RESOURCE_MAP_BLOB 2 at {offset:#x} ({what})"),
            fx.vmm.gpu().resource_map_blob(2, offset),
            resp::ERR_INVALID_PARAMETER,
        );
    }
    assert_eq!(
        fx.reqs.count(|e| e.is_received(RequestKind::Map)),
        1,
        "an invalid map reached the VMM:\n{}",
        fx.reqs.summary()
    );
    // Adjacent on either side is fine.
    map_ok(&mut fx, 2, 8 * PAGE + window_len(&a), &b);
    ok("RESOURCE_UNMAP_BLOB 2", fx.vmm.gpu().resource_unmap_blob(2));
    map_ok(&mut fx, 2, 8 * PAGE - len_b, &b);
    no_violations(&fx);
    still_works(&mut fx.vmm, "invalid map offsets");
}

/// (1b) What the guest writes through the window is what the renderer reads: a host blob
/// written only through its mapping, then shown with SET_SCANOUT_BLOB, reaches the
/// display socket byte for byte (the renderer read the blob's memory, not a copy).
#[test]
fn bytes_written_through_the_window_are_what_the_renderer_shows() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    let stride = reqs.strides[0];
    assert!(stride >= 64 * 4, "cross-domain stride {stride}");
    let mut want = Vec::with_capacity(64 * 64 * 4);
    for y in 0..64u32 {
        let row: Vec<u8> = (0..64u32)
            .flat_map(|x| [(x * 3) as u8, (y * 5) as u8, (x ^ y) as u8, 0xff])
            .collect();
        let at = u64::from(reqs.offsets[0]) + u64::from(y) * u64::from(stride);
        fx.window
            .write(at, &row)
            .expect("guest write through the window");
        want.extend_from_slice(&row);
    }
    let fb = vgpu_tests::gpu::BlobFb {
        width: 64,
        height: 64,
        format: vgpu_tests::gpu::format::B8G8R8X8_UNORM,
        strides: [stride, 0, 0, 0],
        offsets: [reqs.offsets[0], 0, 0, 0],
    };
    let rect = vgpu_tests::Rect::new(0, 0, 64, 64);
    ok(
        "SET_SCANOUT_BLOB of the host blob",
        fx.vmm.gpu().set_scanout_blob(0, 1, rect, fb),
    );
    fx.vmm
        .display()
        .wait_update(0, WAIT)
        .unwrap_or_else(|e| panic!("no UPDATE for the host blob: {e}"));
    let (w, h, got) = fx
        .vmm
        .display()
        .framebuffer(0)
        .expect("a framebuffer for scanout 0");
    assert_eq!((w, h), (64, 64));
    assert!(
        got == want,
        "the display does not show what the guest wrote through the window"
    );
    no_violations(&fx);
}

/// With `--keep-listening`, a VMM that goes away while a blob is mapped does not keep the
/// device waiting: the reset's SHMEM_UNMAP fails on the closed channel (the window went
/// with the VMM), the reset completes, and the next VMM maps a blob at the same offset.
#[test]
fn a_vmm_gone_with_a_blob_mapped_leaves_a_fresh_device_for_the_next() {
    let stack = Stack::start(&["--hostmem", "64M", "--keep-listening"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let mut fx = connect(stack);
    let a = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &a);
    let Fx { stack, vmm, .. } = fx;
    vmm.disconnect();
    stack
        .wait_for_log("waiting for the next VMM connection", WAIT)
        .unwrap_or_else(|e| panic!("the device did not reset: {e}"));
    let mut fx = connect(stack);
    let b = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &b);
    still_works(&mut fx.vmm, "a reconnect with a blob mapped");
    no_violations(&fx);
}

// ---------------------------------------------------------------- renderer restart

/// SIGKILLs the renderer-worker and waits (bounded) until the frontend has linked the
/// replacement the broker started.
fn kill_renderer(fx: &mut Fx) {
    common::kill_renderer_until_linked(&mut fx.stack, 1, WAIT);
}

/// After a restart: the device serves, the dead renderer's context is gone (its next use
/// is an error), the window is empty, and the stack is its four processes.
#[track_caller]
fn serves_after_restart(fx: &mut Fx) {
    still_works(&mut fx.vmm, "a renderer restart");
    expect(
        "SUBMIT_3D to the dead renderer's context",
        fx.vmm.gpu().submit_3d(CTX, &cross_domain::init(RING)),
        resp::ERR_INVALID_CONTEXT_ID,
    );
    assert!(
        fx.window.mappings().is_empty(),
        "{:?}",
        fx.window.mappings()
    );
    assert_eq!(fx.stack.processes().len(), 4, "{:#?}", fx.stack.processes());
    no_violations(fx);
}

/// Renderer killed with a blob mapped: the VMM's mapping stays until the guest unmaps it,
/// which then completes with the VMM's ack alone; the lost blob's unref is answered.
#[test]
fn renderer_killed_with_a_blob_mapped_the_guest_still_unmaps_and_unrefs_it() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    kill_renderer(&mut fx);
    assert_eq!(
        fx.window.mappings().len(),
        1,
        "the guest's mapping must stay"
    );
    ok(
        "RESOURCE_UNMAP_BLOB after the restart",
        fx.vmm.gpu().resource_unmap_blob(1),
    );
    assert_eq!(unmaps_received(&fx), 1, "{}", fx.reqs.summary());
    ok(
        "RESOURCE_UNREF of the lost blob",
        fx.vmm.gpu().resource_unref(1),
    );
    serves_after_restart(&mut fx);
}

/// Renderer killed while an unmap waits for the VMM's ack: the unmap completes once the
/// ack comes (the renderer's part is moot), and the queue goes on.
#[test]
fn renderer_killed_during_an_unmap_the_unmap_completes_on_the_vmm_ack() {
    let mut fx = start();
    let reqs = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &reqs);
    let gate = fx.reqs.delay_next(RequestKind::Unmap);
    let unmap = fx
        .vmm
        .gpu()
        .submit(&Command::ResourceUnmapBlob { resource_id: 1 }, None)
        .expect("submit UNMAP_BLOB");
    wait_unmap_held(&fx, "UNMAP_BLOB sent no SHMEM_UNMAP");
    kill_renderer(&mut fx);
    gate.release();
    ok(
        "UNMAP_BLOB in flight at the renderer's death",
        fx.vmm.gpu().wait(unmap),
    );
    assert_eq!(unmaps_received(&fx), 1, "{}", fx.reqs.summary());
    serves_after_restart(&mut fx);
}

/// Renderer killed while a map waits for the VMM's ack: the blob died with its renderer,
/// so once the VMM has mapped it the map is answered with an error and undone by the
/// device itself (blob_map.rs), and the guest's later unmap has nothing left to do.
#[test]
fn renderer_killed_during_a_map_the_map_fails_and_is_undone() {
    let mut fx = start();
    let _ = host_blob(&mut fx, 1, 64, 64);
    let gate = fx.reqs.delay_next(RequestKind::Map);
    let map = fx
        .vmm
        .gpu()
        .submit(
            &Command::ResourceMapBlob {
                resource_id: 1,
                offset: 0,
            },
            None,
        )
        .expect("submit MAP_BLOB");
    let held = fx.reqs.wait_for(WAIT, |e| {
        matches!(
            e,
            BackendEvent::Held {
                kind: RequestKind::Map,
                ..
            }
        )
    });
    assert!(held.is_some(), "no SHMEM_MAP held:\n{}", fx.reqs.summary());
    kill_renderer(&mut fx);
    gate.release();
    expect(
        "MAP_BLOB in flight at the renderer's death",
        fx.vmm.gpu().wait(map),
        resp::ERR_UNSPEC,
    );
    let undone = fx.reqs.wait_for(WAIT, |e| e.is_acked(RequestKind::Unmap));
    assert!(
        undone.is_some(),
        "the device did not undo the map:\n{}",
        fx.reqs.summary()
    );
    ok("RESOURCE_UNMAP_BLOB", fx.vmm.gpu().resource_unmap_blob(1));
    assert_eq!(unmaps_received(&fx), 1, "{}", fx.reqs.summary());
    serves_after_restart(&mut fx);
}

/// One map/unmap cycle of a fresh host blob `id` in context `ctx` (query ring at
/// `ring_addr`), as a guest whose renderer may die at any moment runs it: every command
/// must be answered (a timeout panics), whatever the answer. Returns whether the blob is
/// still mapped at the end.
fn cycle(vmm: &mut TestVmm, ctx: u32, ring_addr: u64, id: u32) -> bool {
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    let answered = |what: &str, r: Result<vgpu_tests::gpu::Response, GpuError>| {
        r.unwrap_or_else(|e| panic!("{what} of blob {id} was not answered: {e}"))
    };
    let query = cross_domain::get_image_requirements(64, 64, DRM_FORMAT_XRGB8888, 0);
    if answered("SUBMIT_3D", gpu.submit_3d(ctx, &query)).kind != resp::OK_NODATA {
        return false;
    }
    let Some(reqs) = mem
        .read_vec(ring_addr, cross_domain::IMAGE_REQUIREMENTS_SIZE)
        .ok()
        .and_then(|a| ImageRequirements::parse(&a))
    else {
        return false;
    };
    let params = BlobParams {
        blob_mem: blob::MEM_HOST3D,
        blob_flags: blob::FLAG_MAPPABLE,
        blob_id: u64::from(reqs.blob_id),
        size: reqs.size,
    };
    if answered(
        "CREATE_BLOB",
        gpu.resource_create_blob(ctx, id, params, &[]),
    )
    .kind
        != resp::OK_NODATA
    {
        return false;
    }
    let mut mapped = answered("MAP_BLOB", gpu.resource_map_blob(id, 0)).kind == resp::OK_MAP_INFO;
    if mapped {
        mapped = answered("UNMAP_BLOB", gpu.resource_unmap_blob(id)).kind != resp::OK_NODATA;
    }
    if !mapped {
        answered("UNREF", gpu.resource_unref(id));
    }
    mapped
}

/// Ten times, the renderer is killed at another point of a stream of map/unmap cycles
/// (each blob in whatever stage it is then): every command is answered, the guest unmaps
/// whatever is left mapped, the window ends empty, and no descriptor piles up in the
/// broker, the frontend or the spawner.
#[test]
fn renderer_killed_at_random_points_of_map_unmap_cycles_leaks_nothing() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    let stack = Stack::start(&["--hostmem", "64M", "--max-renderer-restarts", "20"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let mut fx = connect(stack);
    let survivors = |counts: Vec<(String, usize)>| -> Vec<(String, usize)> {
        counts
            .into_iter()
            .filter(|(role, _)| role != "renderer-worker")
            .collect()
    };
    let baseline = survivors(common::fd_counts(&mut fx.stack));
    let mut renderer_fds = None;
    let mut next_id = 1000u32;
    for round in 0..10u32 {
        let (ctx, ring) = (10 + round, 500 + round);
        let ring_addr = common::cross_domain_context(&mut fx.vmm, ctx, ring);
        let stop = AtomicBool::new(false);
        let cycles = AtomicU32::new(0);
        let first_id = next_id;
        let (vmm, stack) = (&mut fx.vmm, &mut fx.stack);
        let (left_mapped, ids_used) = std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let mut left = Vec::new();
                let mut id = first_id;
                while !stop.load(Ordering::Relaxed) {
                    if cycle(vmm, ctx, ring_addr, id) {
                        left.push(id);
                    }
                    id += 1;
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                (left, id - first_id)
            });
            // A different moment each round: after 1 to 4 whole cycles, plus whatever
            // part of the next one the kill lands in.
            let deadline = std::time::Instant::now() + WAIT;
            while cycles.load(Ordering::Relaxed) < round % 4 + 1 {
                assert!(
                    std::time::Instant::now() < deadline && !worker.is_finished(),
                    "round {round}: the cycles stalled"
                );
                std::thread::yield_now();
            }
            common::kill_renderer_until_linked(stack, round as usize + 1, WAIT);
            stop.store(true, Ordering::Relaxed);
            worker.join().expect("the guest's cycles panicked")
        });
        next_id += ids_used;
        for id in left_mapped {
            ok(
                &format!("round {round}: UNMAP_BLOB {id} left mapped"),
                fx.vmm.gpu().resource_unmap_blob(id),
            );
            ok(
                &format!("round {round}: UNREF {id}"),
                fx.vmm.gpu().resource_unref(id),
            );
        }
        assert!(
            fx.window.mappings().is_empty(),
            "round {round}: still mapped: {:?}",
            fx.window.mappings()
        );
        // The ring was a guest blob: rebuilt in the new renderer, so unref is plain.
        ok(
            &format!("round {round}: UNREF the query ring"),
            fx.vmm.gpu().resource_unref(ring),
        );
        expect(
            &format!("round {round}: CTX_DESTROY of a context lost with its renderer"),
            fx.vmm.gpu().ctx_destroy(ctx),
            resp::ERR_INVALID_CONTEXT_ID,
        );
        let counts = common::fd_counts(&mut fx.stack);
        let renderer = counts
            .iter()
            .find(|(role, _)| role == "renderer-worker")
            .map(|(_, n)| *n);
        match renderer_fds {
            None => renderer_fds = renderer,
            Some(n) => assert_eq!(renderer, Some(n), "round {round}: renderer fds {counts:?}"),
        }
        assert_eq!(
            survivors(counts),
            baseline,
            "round {round}: descriptors piled up"
        );
    }
    still_works(&mut fx.vmm, "ten renderer restarts");
    no_violations(&fx);
}

/// The renderer dies while a device reset waits for an unmap's VMM ack: the reset still
/// finishes once the ack comes (the renderer's part of the unmap is moot), the window is
/// empty, and the new renderer serves the reset device.
#[test]
fn renderer_killed_while_a_reset_waits_for_an_unmap_the_reset_finishes() {
    let mut fx = start();
    let a = host_blob(&mut fx, 1, 64, 64);
    map_ok(&mut fx, 1, 0, &a);
    let gate = reset_behind_a_held_unmap(&mut fx, 1);
    kill_renderer(&mut fx);
    reset_finishes_on_the_release(&fx, &gate);
    assert!(
        fx.window.mappings().is_empty(),
        "{:?}",
        fx.window.mappings()
    );
    assert_eq!(unmaps_received(&fx), 1, "{}", fx.reqs.summary());
    no_violations(&fx);
}
