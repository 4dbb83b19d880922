//! Per-VM limits (issue 8), end to end: the real binary started with a small value of one
//! limit, driven past it through the test VMM.
//!
//! The contract asserted here (policy/src/limits.rs, docs/SECURITY.md "Per-VM limits"):
//! - beyond a count or byte limit the command gets ERR_OUT_OF_MEMORY and creates nothing
//!   (no resource, no context, no SHMEM_MAP to the VMM);
//! - the device then serves valid commands correctly (exact pixels on the display, blob
//!   bytes through the hostmem window, cross-domain answers in the guest's ring);
//! - freeing (RESOURCE_UNREF, SET_SCANOUT 0, CTX_DESTROY, RESOURCE_UNMAP_BLOB) makes room.

mod common;

use std::sync::Arc;

use common::{assert_pixels, expect, image, ok, resource_with, start, still_works, WAIT};
use vgpu_tests::backend_req::{BackendRequests, RequestKind};
use vgpu_tests::cross_domain::{self, ImageRequirements};
use vgpu_tests::gpu::{blob, capset, format, resp, BlobParams, Command, MemEntry, Rect};
use vgpu_tests::hostmem::HostmemWindow;
use vgpu_tests::{DisplayEvent, Stack, TestVmm, VmmOptions};

/// The hostmem window of the blob tests.
const HOSTMEM: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// The cross-domain context of the blob tests.
const CTX: u32 = 1;
/// Its query ring (a one-page guest blob).
const RING: u32 = 100;

/// Shows resource `id` (`w`x`h`, already transferred from `pixels`) on scanout 0 and
/// checks that the display received exactly those pixels.
#[track_caller]
fn show_and_check(vmm: &mut TestVmm, id: u32, w: u32, h: u32, pixels: &[u8]) {
    let full = Rect::new(0, 0, w, h);
    vmm.display().skip_to_end();
    ok(
        &format!("SET_SCANOUT of resource {id}"),
        vmm.gpu().set_scanout(0, id, full),
    );
    ok(
        &format!("RESOURCE_FLUSH of resource {id}"),
        vmm.gpu().resource_flush(id, full),
    );
    vmm.display()
        .wait_for("VHOST_USER_GPU_UPDATE of the whole frame", WAIT, |e| {
            matches!(e, DisplayEvent::Update { scanout_id: 0, x: 0, y: 0, width, height, .. }
                if (*width, *height) == (w, h))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (fw, fh, fb) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_eq!((fw, fh), (w, h), "framebuffer size");
    assert_pixels(&fb, pixels, w, &format!("resource {id} on the display"));
}

#[test]
fn resources_beyond_the_count_limit_are_out_of_memory() {
    let (_s, mut vmm) = start(&["--max-resources", "3", "--output", "64x64"]);
    let pixels = image(64, 64, 7);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, 64, 64, &pixels);
    let gpu = vmm.gpu();
    for id in [2, 3] {
        ok(
            &format!("RESOURCE_CREATE_2D {id} of 3"),
            gpu.resource_create_2d(id, format::B8G8R8X8_UNORM, 8, 8),
        );
    }
    expect(
        "RESOURCE_CREATE_2D of a 4th resource with --max-resources 3",
        gpu.resource_create_2d(4, format::B8G8R8X8_UNORM, 8, 8),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The refused create made nothing: resource 4 does not exist.
    expect(
        "RESOURCE_UNREF of the refused resource",
        gpu.resource_unref(4),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    ok("RESOURCE_UNREF 2", gpu.resource_unref(2));
    ok(
        "RESOURCE_CREATE_2D 4 after an unref made room",
        gpu.resource_create_2d(4, format::B8G8R8X8_UNORM, 8, 8),
    );
    expect(
        "RESOURCE_CREATE_2D 5 (full again)",
        gpu.resource_create_2d(5, format::B8G8R8X8_UNORM, 8, 8),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The device draws correctly with its table full.
    show_and_check(&mut vmm, 1, 64, 64, &pixels);
    ok("RESOURCE_UNREF 4", vmm.gpu().resource_unref(4));
    still_works(&mut vmm, "the resource count limit");
}

#[test]
fn resource_memory_beyond_the_budget_is_out_of_memory_and_scanouts_count() {
    // 1 MiB for everything: resource 1 (256 KiB) shown on scanout 0 (another 256 KiB for
    // its scanout buffer) leaves 512 KiB.
    let (_s, mut vmm) = start(&["--max-resource-memory", "1", "--output", "256x256"]);
    let pixels = image(256, 256, 3);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, 256, 256, &pixels);
    show_and_check(&mut vmm, 1, 256, 256, &pixels);
    let gpu = vmm.gpu();
    // 640 KiB: it would fit beside resource 1 alone, not beside its scanout buffer too.
    expect(
        "RESOURCE_CREATE_2D of 640 KiB with 512 KiB left",
        gpu.resource_create_2d(2, format::B8G8R8X8_UNORM, 256, 640),
        resp::ERR_OUT_OF_MEMORY,
    );
    // Disabling the scanout gives its buffer's bytes back.
    ok(
        "SET_SCANOUT 0 to resource 0 (disable)",
        gpu.set_scanout(0, 0, Rect::new(0, 0, 0, 0)),
    );
    ok(
        "RESOURCE_CREATE_2D of 640 KiB once the scanout buffer is gone",
        gpu.resource_create_2d(2, format::B8G8R8X8_UNORM, 256, 640),
    );
    // 256 + 640 + 2 * 64 = 1024 KiB: exactly the budget, then not one byte more.
    for id in [3, 4] {
        ok(
            &format!("RESOURCE_CREATE_2D {id} of 64 KiB"),
            gpu.resource_create_2d(id, format::B8G8R8X8_UNORM, 128, 128),
        );
    }
    expect(
        "RESOURCE_CREATE_2D of 4 bytes with the budget used up",
        gpu.resource_create_2d(5, format::B8G8R8X8_UNORM, 1, 1),
        resp::ERR_OUT_OF_MEMORY,
    );
    // Showing resource 1 again needs a 256 KiB scanout buffer: refused, and the scanout
    // stays off.
    expect(
        "SET_SCANOUT with no budget left for its buffer",
        gpu.set_scanout(0, 1, Rect::new(0, 0, 256, 256)),
        resp::ERR_OUT_OF_MEMORY,
    );
    ok("RESOURCE_UNREF 2", gpu.resource_unref(2));
    show_and_check(&mut vmm, 1, 256, 256, &pixels);
    for id in [3, 4] {
        ok("RESOURCE_UNREF", vmm.gpu().resource_unref(id));
    }
    still_works(&mut vmm, "the resource memory budget");
}

/// A stack with `--hostmem 64M` + `extra`, a test VMM with the hostmem window, and an
/// initialised cross-domain context [`CTX`] with its query ring [`RING`].
struct Fx {
    _stack: Stack,
    vmm: TestVmm,
    reqs: Arc<BackendRequests>,
    window: Arc<HostmemWindow>,
    ring_addr: u64,
}

fn start_hostmem(extra: &[&str]) -> Fx {
    let mut args = vec!["--hostmem", "64M"];
    args.extend_from_slice(extra);
    let stack = Stack::start(&args)
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox {}: {e}", args.join(" ")));
    let opts = VmmOptions {
        hostmem: Some(HOSTMEM),
        ..VmmOptions::default()
    };
    let mut vmm = stack.connect_with(&opts).unwrap_or_else(|e| {
        panic!(
            "test VMM set-up with hostmem failed: {e}\nvgpu-sandbox output:\n{}",
            stack.log_text()
        )
    });
    let reqs = vmm.backend_requests().expect("backend requests").clone();
    let window = vmm.hostmem().expect("hostmem window").clone();
    let ring_addr = init_context(&mut vmm, CTX, RING);
    Fx {
        _stack: stack,
        vmm,
        reqs,
        window,
        ring_addr,
    }
}

/// Creates cross-domain context `ctx` with a one-page query ring blob `ring` and sends
/// INIT; returns the ring's guest address.
fn init_context(vmm: &mut TestVmm, ctx: u32, ring: u32) -> u64 {
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    ok(
        &format!("CTX_CREATE {ctx} (cross-domain)"),
        gpu.ctx_create(ctx, capset::CROSS_DOMAIN, b"limits-test"),
    );
    let ring_addr = mem.alloc_aligned(PAGE, PAGE).expect("query ring page");
    ok(
        &format!("RESOURCE_CREATE_BLOB {ring} (query ring, guest memory)"),
        gpu.resource_create_blob(
            ctx,
            ring,
            BlobParams::guest(PAGE, 0),
            &[MemEntry {
                addr: ring_addr,
                length: PAGE as u32,
            }],
        ),
    );
    ok(
        &format!("CTX_ATTACH_RESOURCE {ring} to context {ctx}"),
        gpu.ctx_attach_resource(ctx, ring),
    );
    ok(
        &format!("SUBMIT_3D cross-domain INIT to context {ctx}"),
        gpu.submit_3d(ctx, &cross_domain::init(ring)),
    );
    ring_addr
}

/// RESOURCE_CREATE_BLOB of a mappable HOST3D blob for a `w`x`h` image; the response.
fn create_host_blob(
    fx: &mut Fx,
    resource_id: u32,
    w: u32,
    h: u32,
) -> (ImageRequirements, vgpu_tests::Response) {
    let reqs = common::image_requirements(&mut fx.vmm, CTX, fx.ring_addr, w, h);
    let params = BlobParams::host3d(u64::from(reqs.blob_id), reqs.size, blob::FLAG_MAPPABLE);
    let r = fx
        .vmm
        .gpu()
        .resource_create_blob(CTX, resource_id, params, &[])
        .unwrap_or_else(|e| panic!("RESOURCE_CREATE_BLOB {resource_id}: {e}"));
    (reqs, r)
}

fn window_len(reqs: &ImageRequirements) -> u64 {
    reqs.size.div_ceil(PAGE) * PAGE
}

/// Writes a pattern through the window at `offset` and reads it back (the guest's view of
/// a mapped blob).
#[track_caller]
fn write_and_read_back(fx: &Fx, offset: u64, len: u64, seed: u8) {
    let pattern: Vec<u8> = (0..len as usize)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    fx.window.write(offset, &pattern).expect("guest write");
    assert_eq!(
        fx.window.read(offset, len as usize).expect("guest read"),
        pattern,
        "blob bytes through the window at {offset:#x}"
    );
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

#[test]
fn host_blobs_share_the_memory_budget() {
    let mut fx = start_hostmem(&["--max-resource-memory", "1"]);
    let (a, r) = create_host_blob(&mut fx, 1, 256, 256);
    expect("RESOURCE_CREATE_BLOB 1 (256x256)", Ok(r), resp::OK_NODATA);
    // The ring (one page), two such blobs and a 512 KiB resource do not fit 1 MiB; the
    // ring and two blobs do.
    let budget = 1 << 20;
    assert!(PAGE + 2 * a.size + (512 << 10) > budget && PAGE + 2 * a.size <= budget);
    ok(
        "RESOURCE_CREATE_2D of 512 KiB",
        fx.vmm
            .gpu()
            .resource_create_2d(2, format::B8G8R8X8_UNORM, 512, 256),
    );
    let (_, r) = create_host_blob(&mut fx, 3, 256, 256);
    expect(
        "RESOURCE_CREATE_BLOB beyond the memory budget",
        Ok(r),
        resp::ERR_OUT_OF_MEMORY,
    );
    expect(
        "RESOURCE_MAP_BLOB of the refused blob",
        fx.vmm.gpu().resource_map_blob(3, 0),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    ok("RESOURCE_UNREF 2", fx.vmm.gpu().resource_unref(2));
    let (b, r) = create_host_blob(&mut fx, 3, 256, 256);
    expect(
        "RESOURCE_CREATE_BLOB once there is room",
        Ok(r),
        resp::OK_NODATA,
    );
    // The blob admitted after the refusal serves: mapped, written and read by the guest.
    let map = fx.vmm.gpu().resource_map_blob(3, 0);
    expect("RESOURCE_MAP_BLOB 3", map, resp::OK_MAP_INFO);
    write_and_read_back(&fx, 0, window_len(&b), 5);
    ok("RESOURCE_UNMAP_BLOB 3", fx.vmm.gpu().resource_unmap_blob(3));
    no_violations(&fx);
    still_works(&mut fx.vmm, "the blob memory budget");
}

#[test]
fn mappings_beyond_the_limit_are_out_of_memory() {
    let mut fx = start_hostmem(&["--max-mappings", "2"]);
    let mut blobs = Vec::new();
    for id in 1..=3 {
        let (reqs, r) = create_host_blob(&mut fx, id, 64, 64);
        expect(
            &format!("RESOURCE_CREATE_BLOB {id}"),
            Ok(r),
            resp::OK_NODATA,
        );
        blobs.push(reqs);
    }
    let offset = |id: u32| u64::from(id) * 16 * PAGE;
    for id in [1, 2] {
        expect(
            &format!("RESOURCE_MAP_BLOB {id}"),
            fx.vmm.gpu().resource_map_blob(id, offset(id)),
            resp::OK_MAP_INFO,
        );
    }
    let maps_before = fx.reqs.count(|e| e.is_received(RequestKind::Map));
    expect(
        "RESOURCE_MAP_BLOB of a 3rd blob with --max-mappings 2",
        fx.vmm.gpu().resource_map_blob(3, offset(3)),
        resp::ERR_OUT_OF_MEMORY,
    );
    assert_eq!(
        fx.reqs.count(|e| e.is_received(RequestKind::Map)),
        maps_before,
        "a refused map reached the VMM:\n{}",
        fx.reqs.summary()
    );
    assert_eq!(fx.window.mappings().len(), 2);
    // An unmap makes room; the third blob then maps and serves.
    ok("RESOURCE_UNMAP_BLOB 1", fx.vmm.gpu().resource_unmap_blob(1));
    expect(
        "RESOURCE_MAP_BLOB 3 after an unmap made room",
        fx.vmm.gpu().resource_map_blob(3, offset(3)),
        resp::OK_MAP_INFO,
    );
    write_and_read_back(&fx, offset(3), window_len(&blobs[2]), 9);
    expect(
        "RESOURCE_MAP_BLOB 1 (full again)",
        fx.vmm.gpu().resource_map_blob(1, offset(1)),
        resp::ERR_OUT_OF_MEMORY,
    );
    // UNREF of a mapped blob unmaps it first, which makes room too.
    ok(
        "RESOURCE_UNREF of mapped blob 2",
        fx.vmm.gpu().resource_unref(2),
    );
    expect(
        "RESOURCE_MAP_BLOB 1 after an unref made room",
        fx.vmm.gpu().resource_map_blob(1, offset(1)),
        resp::OK_MAP_INFO,
    );
    write_and_read_back(&fx, offset(1), window_len(&blobs[0]), 11);
    write_and_read_back(&fx, offset(3), window_len(&blobs[2]), 13);
    assert_eq!(fx.window.mappings().len(), 2);
    no_violations(&fx);
    still_works(&mut fx.vmm, "the mapping limit");
}

#[test]
fn contexts_beyond_the_limit_are_out_of_memory() {
    let mut fx = start_hostmem(&["--max-contexts", "2"]);
    let gpu = fx.vmm.gpu();
    ok(
        "CTX_CREATE 2 (cross-domain)",
        gpu.ctx_create(2, capset::CROSS_DOMAIN, b"second"),
    );
    expect(
        "CTX_CREATE of a 3rd context with --max-contexts 2",
        gpu.ctx_create(3, capset::CROSS_DOMAIN, b"third"),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The refused context does not exist.
    expect(
        "SUBMIT_3D to the refused context",
        gpu.submit_3d(3, &cross_domain::poll()),
        resp::ERR_INVALID_CONTEXT_ID,
    );
    expect(
        "CTX_DESTROY of the refused context",
        gpu.ctx_destroy(3),
        resp::ERR_INVALID_CONTEXT_ID,
    );
    ok("CTX_DESTROY 2", gpu.ctx_destroy(2));
    // Room again: context 3 is created and serves a real query.
    let ring3 = init_context(&mut fx.vmm, 3, 300);
    let reqs = common::image_requirements(&mut fx.vmm, 3, ring3, 32, 16);
    assert!(reqs.size >= 32 * 16 * 4, "{reqs:?}");
    expect(
        "CTX_CREATE 4 (full again)",
        fx.vmm.gpu().ctx_create(4, capset::CROSS_DOMAIN, b"fourth"),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The first context was never disturbed.
    common::image_requirements(&mut fx.vmm, CTX, fx.ring_addr, 16, 16);
    no_violations(&fx);
    still_works(&mut fx.vmm, "the context limit");
}

#[test]
fn submits_beyond_the_size_limit_are_out_of_memory() {
    let mut fx = start_hostmem(&["--max-submit-size", "4K"]);
    // 256 POLLs of 16 bytes: exactly the limit.
    let polls = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| cross_domain::poll()).collect() };
    assert_eq!(polls(256).len(), 4096);
    let gpu = fx.vmm.gpu();
    ok(
        "SUBMIT_3D of exactly 4 KiB",
        gpu.submit_3d(CTX, &polls(256)),
    );
    expect(
        "SUBMIT_3D of 4 KiB + 16 bytes",
        gpu.submit_3d(CTX, &polls(257)),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The size field is what counts, even when the bytes are not all there.
    expect(
        "SUBMIT_3D claiming 8 KiB with 16 bytes present",
        gpu.execute_in_ctx(
            CTX,
            &Command::Submit3d {
                commands: cross_domain::poll(),
                size: Some(8192),
            },
        ),
        resp::ERR_OUT_OF_MEMORY,
    );
    // Longer than any command the device accepts (its request buffer is about 1 MiB): the
    // same answer, and the device reads no more of it than its largest valid command.
    expect(
        "SUBMIT_3D of 2 MiB",
        gpu.submit_3d(CTX, &polls(2 << 16)),
        resp::ERR_OUT_OF_MEMORY,
    );
    // The context still answers correctly.
    let ring = fx.ring_addr;
    common::image_requirements(&mut fx.vmm, CTX, ring, 64, 48);
    no_violations(&fx);
    still_works(&mut fx.vmm, "the submit size limit");
}

/// virgl contexts (virglrenderer on llvmpipe) count against the same limit.
#[cfg(feature = "virgl")]
#[test]
fn virgl_contexts_beyond_the_limit_are_out_of_memory() {
    let args = ["--virgl", "--max-contexts", "1"];
    let stack = Stack::start(&args)
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox {}: {e}", args.join(" ")));
    let opts = VmmOptions {
        // llvmpipe's first context on a loaded 2-core machine.
        timeout: std::time::Duration::from_secs(30),
        ..VmmOptions::default()
    };
    let mut vmm = stack
        .connect_with(&opts)
        .unwrap_or_else(|e| panic!("{e}\nvgpu-sandbox output:\n{}", stack.log_text()));
    let gpu = vmm.gpu();
    ok("CTX_CREATE 1 (VIRGL)", gpu.ctx_create(1, 0, b"first"));
    expect(
        "CTX_CREATE of a 2nd virgl context with --max-contexts 1",
        gpu.ctx_create(2, 0, b"second"),
        resp::ERR_OUT_OF_MEMORY,
    );
    expect(
        "SUBMIT_3D to the refused context",
        gpu.submit_3d(2, &[]),
        resp::ERR_INVALID_CONTEXT_ID,
    );
    ok("CTX_DESTROY 1", gpu.ctx_destroy(1));
    ok(
        "CTX_CREATE 2 after a destroy made room",
        gpu.ctx_create(2, 0, b"second"),
    );
    ok("SUBMIT_3D of nothing to context 2", gpu.submit_3d(2, &[]));
    still_works(&mut vmm, "the virgl context limit");
}
