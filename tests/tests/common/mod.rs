//! Helpers shared by the end-to-end test files.
// Each test file uses a different subset.
#![allow(dead_code)]

use std::time::Duration;

use vgpu_tests::cross_domain;
use vgpu_tests::gpu::{
    capset, format, resp, Backing, BlobParams, GpuError, MemEntry, Rect, Response,
};
use vgpu_tests::{DisplayEvent, Stack, TestVmm};

/// Bound on every display-socket wait.
pub const WAIT: Duration = Duration::from_secs(10);

/// Starts the stack with `args` and connects a test VMM; panics with the log on failure.
pub fn start(args: &[&str]) -> (Stack, TestVmm) {
    let stack = Stack::start(args).unwrap_or_else(|e| panic!("starting vgpu-sandbox: {e}"));
    let vmm = stack.connect().unwrap_or_else(|e| {
        panic!(
            "test VMM set-up failed: {e}\nvgpu-sandbox output:\n{}",
            stack.log_text()
        )
    });
    (stack, vmm)
}

/// Asserts a command's response type, naming the command, expected and actual codes.
#[track_caller]
pub fn expect(what: &str, r: Result<Response, GpuError>, want: u32) -> Response {
    let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        r.kind,
        want,
        "{what}: expected {}, got {} (used len {})",
        resp::name(want),
        r.kind_name(),
        r.used_len
    );
    if want == resp::OK_NODATA || want >= resp::ERR_UNSPEC {
        assert_eq!(
            r.used_len, 24,
            "{what}: used len for a bare header response"
        );
    }
    r
}

/// Asserts OK_NODATA.
#[track_caller]
pub fn ok(what: &str, r: Result<Response, GpuError>) -> Response {
    expect(what, r, resp::OK_NODATA)
}

/// A deterministic test image: `w*h` pixels of 4 bytes, different per `seed`.
pub fn image(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity((w * h * 4) as usize);
    let mut s = seed.wrapping_mul(0x9e37_79b9) | 1;
    for _ in 0..w * h {
        // xorshift32: cheap, and every byte position varies.
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

/// Creates a `w`x`h` resource in `fmt` with backing filled with `pixels`, and transfers it.
pub fn resource_with(
    vmm: &mut TestVmm,
    id: u32,
    fmt: u32,
    w: u32,
    h: u32,
    pixels: &[u8],
) -> Backing {
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    let (b, c, a) = gpu
        .create_backed_resource(id, fmt, w, h)
        .unwrap_or_else(|e| panic!("create resource {id}: {e}"));
    ok(&format!("RESOURCE_CREATE_2D {id}"), Ok(c));
    ok(&format!("RESOURCE_ATTACH_BACKING {id}"), Ok(a));
    mem.write(b.addr, pixels).expect("write backing");
    ok(
        &format!("TRANSFER_TO_HOST_2D {id}"),
        gpu.transfer_to_host_2d(id, Rect::new(0, 0, w, h), 0),
    );
    b
}

/// Proves the device still serves commands: display info, then create + unref a resource.
#[track_caller]
pub fn still_works(vmm: &mut TestVmm, after: &str) {
    let gpu = vmm.gpu();
    let r = gpu
        .get_display_info()
        .unwrap_or_else(|e| panic!("after {after}: GET_DISPLAY_INFO: {e}"));
    assert_eq!(
        r.kind,
        resp::OK_DISPLAY_INFO,
        "after {after}: GET_DISPLAY_INFO got {}",
        r.kind_name()
    );
    ok(
        &format!("after {after}: RESOURCE_CREATE_2D 4242"),
        gpu.resource_create_2d(4242, format::B8G8R8X8_UNORM, 16, 16),
    );
    ok(
        &format!("after {after}: RESOURCE_UNREF 4242"),
        gpu.resource_unref(4242),
    );
}

/// Asserts the display socket saw no protocol violation.
#[track_caller]
pub fn no_violations(vmm: &TestVmm) {
    let v = vmm.display().violations();
    assert!(v.is_empty(), "display socket protocol violations: {v:#?}");
}

/// Waits (bounded) for an UPDATE of scanout 0 with exactly the rectangle `r`.
pub fn wait_update_rect(vmm: &TestVmm, r: Rect) {
    vmm.display()
        .wait_for(
            &format!(
                "VHOST_USER_GPU_UPDATE for scanout 0 with rect {},{} {}x{}",
                r.x, r.y, r.width, r.height
            ),
            WAIT,
            |e| {
                matches!(e, DisplayEvent::Update { scanout_id: 0, x, y, width, height, .. }
                    if (*x, *y, *width, *height) == (r.x, r.y, r.width, r.height))
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
}

#[track_caller]
/// Asserts exact pixels, naming the first differing one.
pub fn assert_pixels(got: &[u8], want: &[u8], width: u32, what: &str) {
    if let Some(d) = vgpu_tests::scenario::first_difference(got, want, width) {
        panic!("{what}: {d}");
    }
}

/// Descriptors each process of the stack holds, by role (one process per role), sorted.
pub fn fd_counts(stack: &mut Stack) -> Vec<(String, usize)> {
    let mut counts: Vec<_> = stack
        .processes()
        .into_iter()
        .map(|p| {
            let n = std::fs::read_dir(format!("/proc/{}/fd", p.pid))
                .map(|d| d.count())
                .unwrap_or(usize::MAX);
            (p.role.to_string(), n)
        })
        .collect();
    counts.sort();
    counts
}

/// A guest page.
const PAGE_SIZE: u64 = 4096;

/// Creates cross-domain context `ctx` with its query ring (guest blob `ring`) and
/// initialises it; returns the ring's guest address.
pub fn cross_domain_context(vmm: &mut TestVmm, ctx: u32, ring: u32) -> u64 {
    let mem = vmm.memory().clone();
    let gpu = vmm.gpu();
    ok(
        "CTX_CREATE (cross-domain)",
        gpu.ctx_create(ctx, capset::CROSS_DOMAIN, b"vgpu-test"),
    );
    let ring_addr = mem
        .alloc_aligned(PAGE_SIZE, PAGE_SIZE)
        .expect("query ring page");
    ok(
        "RESOURCE_CREATE_BLOB (query ring, guest memory)",
        gpu.resource_create_blob(
            ctx,
            ring,
            BlobParams::guest(PAGE_SIZE, 0),
            &[MemEntry {
                addr: ring_addr,
                length: PAGE_SIZE as u32,
            }],
        ),
    );
    ok(
        "CTX_ATTACH_RESOURCE (query ring)",
        gpu.ctx_attach_resource(ctx, ring),
    );
    ok(
        "SUBMIT_3D cross-domain INIT",
        gpu.submit_3d(ctx, &cross_domain::init(ring)),
    );
    ring_addr
}

/// Connects a test VMM that offers a hostmem window of `hostmem` bytes (and resets the
/// device on the way, as a guest driver does); panics with the stack's log on failure.
pub fn connect_hostmem(stack: &Stack, hostmem: u64) -> TestVmm {
    let opts = vgpu_tests::VmmOptions {
        hostmem: Some(hostmem),
        reset_device: true,
        ..vgpu_tests::VmmOptions::default()
    };
    stack.connect_with(&opts).unwrap_or_else(|e| {
        panic!(
            "test VMM set-up with hostmem failed: {e}\nvgpu-sandbox output:\n{}",
            stack.log_text()
        )
    })
}

/// RESOURCE_FLUSH of `rect` of resource `id`, shown on scanout 0: the UPDATE of exactly
/// `rect` must arrive, and scanout 0's framebuffer (`width` pixels wide) must then be
/// `want`, byte for byte.
#[track_caller]
pub fn flush_shows(vmm: &mut TestVmm, id: u32, rect: Rect, want: &[u8], width: u32, what: &str) {
    vmm.display().skip_to_end();
    ok(
        &format!("RESOURCE_FLUSH {id} ({what})"),
        vmm.gpu().resource_flush(id, rect),
    );
    wait_update_rect(vmm, rect);
    let (_, _, fb) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_pixels(&fb, want, width, what);
}

/// GET_IMAGE_REQUIREMENTS for a `w`x`h` XR24 image in context `ctx`, answered in its ring.
pub fn image_requirements(
    vmm: &mut TestVmm,
    ctx: u32,
    ring_addr: u64,
    w: u32,
    h: u32,
) -> cross_domain::ImageRequirements {
    let mem = vmm.memory().clone();
    mem.write(ring_addr, &[0; cross_domain::IMAGE_REQUIREMENTS_SIZE])
        .expect("clear the query ring");
    ok(
        &format!("SUBMIT_3D GET_IMAGE_REQUIREMENTS {w}x{h} to context {ctx}"),
        vmm.gpu().submit_3d(
            ctx,
            &cross_domain::get_image_requirements(w, h, cross_domain::DRM_FORMAT_XRGB8888, 0),
        ),
    );
    let answer = mem
        .read_vec(ring_addr, cross_domain::IMAGE_REQUIREMENTS_SIZE)
        .expect("read the query ring");
    let reqs = cross_domain::ImageRequirements::parse(&answer).expect("image requirements");
    assert!(
        reqs.size >= u64::from(w * h * 4) && reqs.strides[0] >= w * 4,
        "requirements for {w}x{h}: {reqs:?}"
    );
    reqs
}

/// A mappable cross-domain (HOST3D) blob `resource_id` for a `w`x`h` XR24 image, made in
/// context `ctx` with its query ring at `ring_addr`; its image requirements.
pub fn mappable_host_blob(
    vmm: &mut TestVmm,
    ctx: u32,
    ring_addr: u64,
    resource_id: u32,
    w: u32,
    h: u32,
) -> cross_domain::ImageRequirements {
    let reqs = image_requirements(vmm, ctx, ring_addr, w, h);
    let params = BlobParams::host3d(
        u64::from(reqs.blob_id),
        reqs.size,
        vgpu_tests::gpu::blob::FLAG_MAPPABLE,
    );
    ok(
        &format!("RESOURCE_CREATE_BLOB {resource_id} (HOST3D, MAPPABLE)"),
        vmm.gpu()
            .resource_create_blob(ctx, resource_id, params, &[]),
    );
    reqs
}

/// SIGKILLs the renderer-worker and waits (bounded by `timeout`) until the frontend has
/// linked its replacement, the `restarts`th since the device started; returns that log
/// line.
pub fn kill_renderer_until_linked(stack: &mut Stack, restarts: usize, timeout: Duration) -> String {
    let old = stack.expect_child(&vgpu_tests::stack::Role::RendererWorker);
    stack
        .signal_process(&old, nix::sys::signal::Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    stack
        .wait_for_log_count("new renderer-worker linked", restarts, timeout)
        .unwrap_or_else(|e| panic!("no new renderer-worker linked (restart {restarts}): {e}"))
}
