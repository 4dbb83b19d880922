//! SET_SCANOUT_BLOB end to end: a BLOB_MEM_GUEST blob holding a framebuffer (padded
//! rows, non-zero offset), as the Linux driver uses for dumb buffers with RESOURCE_BLOB,
//! shown on a scanout; RESOURCE_FLUSH of the blob; formats; disabling; UNREF of a shown
//! blob; and every malformed framebuffer refused with its specific error code.
//!
//! Contract (device-frontend/src/blobs.rs, `set_scanout_blob`): the scanout id is checked
//! first (ERR_INVALID_SCANOUT_ID), resource 0 disables, an unknown resource is
//! ERR_INVALID_RESOURCE_ID, a 2D resource and any framebuffer that does not fit (zero or
//! oversized sides, empty rect or rect outside width x height, stride below width * 4,
//! plane 0 reaching past the blob) ERR_INVALID_PARAMETER. Only plane 0 is used. A flush
//! rect of a blob is in framebuffer coordinates and must lie inside the framebuffer.

mod common;

use common::{
    assert_pixels, expect, image, ok, resource_with, still_works, wait_update_rect, WAIT,
};
use vgpu_tests::gpu::{format, resp, BlobFb, BlobParams, MemEntry, Rect};
use vgpu_tests::{DisplayEvent, Stack, TestVmm, VmmOptions};

/// The hostmem window the device is started with (blobs need `--hostmem`).
const HOSTMEM: u64 = 64 << 20;
const PAGE: u64 = 4096;
/// The framebuffer: width, height, padded stride and offset of plane 0 in the blob.
const W: u32 = 96;
const H: u32 = 64;
const STRIDE: u32 = W * 4 + 160;
const OFFSET: u32 = 2 * 4096 + 64;
/// The blob: exactly as long as plane 0 needs.
const BLOB_SIZE: u64 = OFFSET as u64 + STRIDE as u64 * (H as u64 - 1) + W as u64 * 4;

fn start() -> (Stack, TestVmm) {
    let stack = Stack::start(&["--hostmem", "64M"])
        .unwrap_or_else(|e| panic!("starting vgpu-sandbox --hostmem 64M: {e}"));
    let opts = VmmOptions {
        hostmem: Some(HOSTMEM),
        ..VmmOptions::default()
    };
    let vmm = stack.connect_with(&opts).unwrap_or_else(|e| {
        panic!(
            "test VMM set-up with hostmem failed: {e}\nvgpu-sandbox output:\n{}",
            stack.log_text()
        )
    });
    (stack, vmm)
}

/// A guest blob `id` of `BLOB_SIZE` bytes filled with `bytes`; returns its guest address.
fn guest_blob(vmm: &mut TestVmm, id: u32, bytes: &[u8]) -> u64 {
    assert_eq!(bytes.len() as u64, BLOB_SIZE);
    let mem = vmm.memory().clone();
    let addr = mem
        .alloc_aligned(BLOB_SIZE.div_ceil(PAGE) * PAGE, PAGE)
        .expect("guest memory for the blob");
    mem.write(addr, bytes).expect("fill the blob");
    ok(
        &format!("RESOURCE_CREATE_BLOB {id} (guest memory)"),
        vmm.gpu().resource_create_blob(
            0,
            id,
            BlobParams::guest(BLOB_SIZE, 0),
            &[MemEntry {
                addr,
                length: BLOB_SIZE as u32,
            }],
        ),
    );
    addr
}

/// Deterministic blob contents, different per `seed` (padding bytes included).
fn blob_bytes(seed: u32) -> Vec<u8> {
    let mut v = image(BLOB_SIZE.div_ceil(4) as u32, 1, seed);
    v.truncate(BLOB_SIZE as usize);
    v
}

/// The framebuffer's pixels, packed, as they lie in `blob`.
fn packed(blob: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((W * H * 4) as usize);
    for y in 0..H {
        let at = (OFFSET + y * STRIDE) as usize;
        out.extend_from_slice(&blob[at..at + (W * 4) as usize]);
    }
    out
}

fn fb(fmt: u32) -> BlobFb {
    BlobFb {
        width: W,
        height: H,
        format: fmt,
        strides: [STRIDE, 0, 0, 0],
        offsets: [OFFSET, 0, 0, 0],
    }
}

/// What a driver sends to disable: resource 0, everything else zero but a valid format.
fn disabled() -> BlobFb {
    BlobFb {
        format: format::B8G8R8X8_UNORM,
        ..BlobFb::default()
    }
}

fn full() -> Rect {
    Rect::new(0, 0, W, H)
}

fn wait_scanout(vmm: &TestVmm, w: u32, h: u32) {
    vmm.display()
        .wait_for(&format!("VHOST_USER_GPU_SCANOUT 0 {w}x{h}"), WAIT, |e| {
            matches!(e, DisplayEvent::Scanout { scanout_id: 0, width, height } if (*width, *height) == (w, h))
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[track_caller]
fn no_updates_pending(vmm: &TestVmm, what: &str) {
    let extra: Vec<_> = vmm
        .display()
        .pending()
        .into_iter()
        .filter(|e| matches!(e, DisplayEvent::Update { .. }))
        .collect();
    assert!(extra.is_empty(), "{what}: unexpected UPDATEs {extra:?}");
}

#[test]
fn blob_scanout_shows_exact_pixels_and_flushes_only_the_damage() {
    let (_stack, mut vmm) = start();
    let first = blob_bytes(1);
    let addr = guest_blob(&mut vmm, 1, &first);
    ok(
        "SET_SCANOUT_BLOB",
        vmm.gpu()
            .set_scanout_blob(0, 1, full(), fb(format::B8G8R8X8_UNORM)),
    );
    wait_scanout(&vmm, W, H);
    wait_update_rect(&vmm, full());
    let (fw, fh, frame) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_eq!((fw, fh), (W, H));
    assert_pixels(&frame, &packed(&first), W, "SET_SCANOUT_BLOB's first frame");

    // The guest draws everywhere (padding included) but flushes one rect: only that rect
    // may reach the display, with exactly the new pixels.
    let second = blob_bytes(2);
    vmm.memory().write(addr, &second).unwrap();
    let damage = Rect::new(17, 9, 40, 23);
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH (sub-rect)",
        vmm.gpu().resource_flush(1, damage),
    );
    wait_update_rect(&vmm, damage);
    let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
    let mut want = packed(&first);
    let new = packed(&second);
    for y in damage.y..damage.y + damage.height {
        let o = ((y * W + damage.x) * 4) as usize;
        let n = (damage.width * 4) as usize;
        want[o..o + n].copy_from_slice(&new[o..o + n]);
    }
    assert_pixels(
        &frame,
        &want,
        W,
        "after a sub-rect RESOURCE_FLUSH of the blob",
    );
    no_updates_pending(&vmm, "after the sub-rect flush");

    // A full flush brings the rest.
    ok("RESOURCE_FLUSH (full)", vmm.gpu().resource_flush(1, full()));
    wait_update_rect(&vmm, full());
    let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
    assert_pixels(&frame, &new, W, "after a full RESOURCE_FLUSH of the blob");
    common::no_violations(&vmm);
}

#[test]
fn blob_scanout_shows_a_sub_rect_of_the_framebuffer() {
    let (_stack, mut vmm) = start();
    let bytes = blob_bytes(3);
    guest_blob(&mut vmm, 1, &bytes);
    let shown = Rect::new(16, 8, 64, 48);
    ok(
        "SET_SCANOUT_BLOB (sub-rect)",
        vmm.gpu()
            .set_scanout_blob(0, 1, shown, fb(format::B8G8R8X8_UNORM)),
    );
    wait_scanout(&vmm, shown.width, shown.height);
    wait_update_rect(&vmm, Rect::new(0, 0, shown.width, shown.height));
    let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
    let all = packed(&bytes);
    let mut want = Vec::new();
    for y in shown.y..shown.y + shown.height {
        let o = ((y * W + shown.x) * 4) as usize;
        want.extend_from_slice(&all[o..o + (shown.width * 4) as usize]);
    }
    assert_pixels(
        &frame,
        &want,
        shown.width,
        "the shown part of the framebuffer",
    );
    // Damage straddling the shown part reaches the display clipped, in screen coordinates.
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH (straddling)",
        vmm.gpu().resource_flush(1, Rect::new(0, 0, 20, 10)),
    );
    wait_update_rect(&vmm, Rect::new(0, 0, 4, 2));
    common::no_violations(&vmm);
}

#[test]
fn x8r8g8b8_and_b8g8r8x8_blobs_convert_to_bgrx() {
    let (_stack, mut vmm) = start();
    let bytes = blob_bytes(4);
    guest_blob(&mut vmm, 1, &bytes);
    let src = packed(&bytes);
    for (fmt, name) in [
        (format::X8R8G8B8_UNORM, "X8R8G8B8"),
        (format::B8G8R8X8_UNORM, "B8G8R8X8"),
        (format::X8R8G8B8_UNORM, "X8R8G8B8 again"),
    ] {
        vmm.display().skip_to_end();
        ok(
            &format!("SET_SCANOUT_BLOB {name}"),
            vmm.gpu().set_scanout_blob(0, 1, full(), fb(fmt)),
        );
        wait_update_rect(&vmm, full());
        let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
        for (i, (got, s)) in frame.chunks_exact(4).zip(src.chunks_exact(4)).enumerate() {
            // Bytes in memory: X8R8G8B8 is X, R, G, B; B8G8R8X8 is B, G, R, X. The display
            // gets B, G, R, X; X carries no colour and is not compared.
            let want = if fmt == format::X8R8G8B8_UNORM {
                [s[3], s[2], s[1]]
            } else {
                [s[0], s[1], s[2]]
            };
            assert_eq!(
                &got[..3],
                &want,
                "{name}: pixel ({},{}) from {s:02x?}",
                i as u32 % W,
                i as u32 / W
            );
        }
    }
    common::no_violations(&vmm);
}

#[test]
fn resource_zero_and_unref_disable_the_blob_scanout() {
    let (_stack, mut vmm) = start();
    let bytes = blob_bytes(5);
    guest_blob(&mut vmm, 1, &bytes);
    ok(
        "SET_SCANOUT_BLOB",
        vmm.gpu()
            .set_scanout_blob(0, 1, full(), fb(format::B8G8R8X8_UNORM)),
    );
    wait_scanout(&vmm, W, H);
    ok(
        "SET_SCANOUT_BLOB resource 0",
        vmm.gpu()
            .set_scanout_blob(0, 0, Rect::new(0, 0, 0, 0), disabled()),
    );
    wait_scanout(&vmm, 0, 0);
    // A flush of a blob no scanout shows has nothing to update.
    ok(
        "RESOURCE_FLUSH (hidden)",
        vmm.gpu().resource_flush(1, full()),
    );
    no_updates_pending(&vmm, "flush of a hidden blob");

    // Shown again, then a 2D resource takes the scanout over, then the blob again.
    ok(
        "SET_SCANOUT_BLOB again",
        vmm.gpu()
            .set_scanout_blob(0, 1, full(), fb(format::B8G8R8X8_UNORM)),
    );
    wait_update_rect(&vmm, full());
    let pixels = image(W, H, 6);
    resource_with(&mut vmm, 2, format::B8G8R8X8_UNORM, W, H, &pixels);
    ok("SET_SCANOUT 2D", vmm.gpu().set_scanout(0, 2, full()));
    wait_update_rect(&vmm, full());
    let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
    assert_pixels(&frame, &pixels, W, "the 2D resource after the blob");
    ok(
        "SET_SCANOUT_BLOB after 2D",
        vmm.gpu()
            .set_scanout_blob(0, 1, full(), fb(format::B8G8R8X8_UNORM)),
    );
    wait_update_rect(&vmm, full());
    let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
    assert_pixels(&frame, &packed(&bytes), W, "the blob after the 2D resource");
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH of the hidden 2D",
        vmm.gpu().resource_flush(2, full()),
    );
    no_updates_pending(&vmm, "flush of the hidden 2D resource");

    // UNREF of the shown blob takes it off the scanout.
    ok(
        "RESOURCE_UNREF of the shown blob",
        vmm.gpu().resource_unref(1),
    );
    wait_scanout(&vmm, 0, 0);
    expect(
        "RESOURCE_FLUSH of the unreffed blob",
        vmm.gpu().resource_flush(1, full()),
        resp::ERR_INVALID_RESOURCE_ID,
    );
    no_updates_pending(&vmm, "after UNREF");
    still_works(&mut vmm, "UNREF of a shown blob");
    common::no_violations(&vmm);
}

#[test]
fn malformed_set_scanout_blob_gets_specific_errors() {
    let (_stack, mut vmm) = start();
    let bytes = blob_bytes(7);
    guest_blob(&mut vmm, 1, &bytes);
    resource_with(&mut vmm, 2, format::B8G8R8X8_UNORM, W, H, &image(W, H, 8));
    let good = fb(format::B8G8R8X8_UNORM);
    let cases: Vec<(&str, u32, u32, Rect, BlobFb, u32)> = vec![
        (
            "scanout 1 of a 1-output device",
            1,
            1,
            full(),
            good,
            resp::ERR_INVALID_SCANOUT_ID,
        ),
        (
            "scanout 15",
            15,
            1,
            full(),
            good,
            resp::ERR_INVALID_SCANOUT_ID,
        ),
        (
            "unknown resource",
            0,
            99,
            full(),
            good,
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "a 2D resource",
            0,
            2,
            full(),
            good,
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "stride below width * 4",
            0,
            1,
            full(),
            BlobFb {
                strides: [W * 4 - 4, 0, 0, 0],
                ..good
            },
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "plane 0 one byte past the blob",
            0,
            1,
            full(),
            BlobFb {
                offsets: [OFFSET + 1, 0, 0, 0],
                ..good
            },
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "one row more than the blob holds",
            0,
            1,
            Rect::new(0, 0, W, H),
            BlobFb {
                height: H + 1,
                ..good
            },
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "offset and stride overflowing",
            0,
            1,
            full(),
            BlobFb {
                strides: [u32::MAX, 0, 0, 0],
                offsets: [u32::MAX, 0, 0, 0],
                ..good
            },
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "rect outside the framebuffer",
            0,
            1,
            Rect::new(1, 0, W, H),
            good,
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "empty rect",
            0,
            1,
            Rect::new(0, 0, 0, H),
            good,
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "width 0",
            0,
            1,
            Rect::new(0, 0, 0, 0),
            BlobFb { width: 0, ..good },
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "width beyond the maximum dimension",
            0,
            1,
            Rect::new(0, 0, 1, 1),
            BlobFb {
                width: 1 << 20,
                height: 1,
                strides: [4 << 20, 0, 0, 0],
                offsets: [0; 4],
                ..good
            },
            resp::ERR_INVALID_PARAMETER,
        ),
    ];
    for (what, scanout, res, rect, bad, code) in cases {
        vmm.display().skip_to_end();
        expect(
            &format!("SET_SCANOUT_BLOB with {what}"),
            vmm.gpu().set_scanout_blob(scanout, res, rect, bad),
            code,
        );
        no_updates_pending(&vmm, what);
        // The device still works: the good framebuffer is shown, exactly.
        ok(
            &format!("SET_SCANOUT_BLOB after {what}"),
            vmm.gpu().set_scanout_blob(0, 1, full(), good),
        );
        wait_update_rect(&vmm, full());
        let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
        assert_pixels(&frame, &packed(&bytes), W, &format!("after {what}"));
    }
    // A flush rect outside the blob's framebuffer.
    for r in [Rect::new(0, 0, W + 1, 1), Rect::new(0, H, 1, 1)] {
        expect(
            &format!("RESOURCE_FLUSH of the blob with {r:?}"),
            vmm.gpu().resource_flush(1, r),
            resp::ERR_INVALID_PARAMETER,
        );
        ok(
            "RESOURCE_FLUSH of the blob",
            vmm.gpu().resource_flush(1, full()),
        );
        wait_update_rect(&vmm, full());
    }
    still_works(&mut vmm, "malformed SET_SCANOUT_BLOB");
    common::no_violations(&vmm);
}

/// A renderer-worker that dies is replaced, and a guest blob shown on a scanout (the Linux
/// driver's dumb buffer with RESOURCE_BLOB) is made again from guest memory: the scanout
/// shows the blob's current pixels after the restart, and flushes go on.
#[test]
fn a_shown_guest_blob_survives_a_renderer_restart() {
    let (mut stack, mut vmm) = start();
    let first = blob_bytes(5);
    let addr = guest_blob(&mut vmm, 1, &first);
    ok(
        "SET_SCANOUT_BLOB",
        vmm.gpu()
            .set_scanout_blob(0, 1, full(), fb(format::B8G8R8X8_UNORM)),
    );
    wait_update_rect(&vmm, full());
    let renderer = stack.expect_child(&vgpu_tests::stack::Role::RendererWorker);
    // The guest draws while the renderer is gone; the rebuilt scanout shows it.
    let second = blob_bytes(6);
    vmm.memory().write(addr, &second).unwrap();
    vmm.display().skip_to_end();
    stack
        .signal_process(&renderer, nix::sys::signal::Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    stack
        .wait_for_log(
            "new renderer-worker linked: 1 resource(s) rebuilt from guest memory, 0 lost",
            WAIT,
        )
        .unwrap_or_else(|e| panic!("the blob was not rebuilt: {e}"));
    wait_update_rect(&vmm, full());
    let (_, _, frame) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_pixels(
        &frame,
        &packed(&second),
        W,
        "the blob scanout after the restart",
    );
    let third = blob_bytes(7);
    vmm.memory().write(addr, &third).unwrap();
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH after the restart",
        vmm.gpu().resource_flush(1, full()),
    );
    wait_update_rect(&vmm, full());
    let (_, _, frame) = vmm.display().framebuffer(0).unwrap();
    assert_pixels(
        &frame,
        &packed(&third),
        W,
        "a flush through the new renderer",
    );
    still_works(&mut vmm, "a renderer restart with a blob scanout");
}
