//! The pixel path: guest backing -> TRANSFER_TO_HOST_2D -> SET_SCANOUT -> RESOURCE_FLUSH ->
//! VHOST_USER_GPU_UPDATE with exact pixels.

mod common;

use common::{assert_pixels, image, ok, resource_with, start, wait_update_rect, WAIT};
use vgpu_tests::gpu::{format, resp, Rect};
use vgpu_tests::DisplayEvent;

fn wait_scanout(vmm: &vgpu_tests::TestVmm, w: u32, h: u32) {
    vmm.display()
        .wait_for(&format!("VHOST_USER_GPU_SCANOUT 0 {w}x{h}"), WAIT, |e| {
            matches!(e, DisplayEvent::Scanout { scanout_id: 0, width, height } if *width == w && *height == h)
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn full_frame_bgrx_pixels_arrive_exactly() {
    let (_stack, mut vmm) = start(&[]);
    let (w, h) = (1280, 800);
    let pixels = image(w, h, 1);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, w, h, &pixels);
    let full = Rect::new(0, 0, w, h);
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 1, full));
    wait_scanout(&vmm, w, h);
    vmm.display().skip_to_end();
    ok("RESOURCE_FLUSH", vmm.gpu().resource_flush(1, full));
    wait_update_rect(&vmm, full);
    let (fw, fh, fb) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_eq!((fw, fh), (w, h));
    assert_pixels(&fb, &pixels, w, "B8G8R8X8 guest bytes vs UPDATE bytes");
    common::no_violations(&vmm);
}

#[test]
fn sub_rect_flush_updates_only_that_rect() {
    let (_stack, mut vmm) = start(&[]);
    let (w, h) = (640, 480);
    let first = image(w, h, 2);
    let backing = resource_with(&mut vmm, 7, format::B8G8R8X8_UNORM, w, h, &first);
    let full = Rect::new(0, 0, w, h);
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 7, full));
    ok("RESOURCE_FLUSH (full)", vmm.gpu().resource_flush(7, full));
    wait_update_rect(&vmm, full);

    // New content everywhere in guest memory and in the host resource...
    let second = image(w, h, 3);
    vmm.memory().write(backing.addr, &second).unwrap();
    ok(
        "TRANSFER_TO_HOST_2D",
        vmm.gpu().transfer_to_host_2d(7, full, 0),
    );
    // ...but only this rect is flushed, so only it may reach the display.
    let damage = Rect::new(100, 50, 200, 120);
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH (sub-rect)",
        vmm.gpu().resource_flush(7, damage),
    );
    wait_update_rect(&vmm, damage.intersect(&full));
    let (_, _, fb) = vmm.display().framebuffer(0).unwrap();
    let mut want = first.clone();
    for y in damage.y..damage.y + damage.height {
        let o = ((y * w + damage.x) * 4) as usize;
        let n = (damage.width * 4) as usize;
        want[o..o + n].copy_from_slice(&second[o..o + n]);
    }
    assert_pixels(&fb, &want, w, "after a sub-rect flush");
    let extra: Vec<_> = vmm
        .display()
        .pending()
        .into_iter()
        .filter(|e| matches!(e, DisplayEvent::Update { .. }))
        .collect();
    assert!(
        extra.is_empty(),
        "UPDATEs beyond the flushed rect: {extra:?}"
    );
    common::no_violations(&vmm);
}

#[test]
fn flush_rect_is_clipped_to_the_scanout() {
    // A scanout showing the top-left 320x200 of a 640x400 resource: a flush of a rect that
    // straddles the scanout's edge reaches the display clipped to the scanout.
    let (_stack, mut vmm) = start(&["--output", "320x200"]);
    let (w, h) = (640, 400);
    let pixels = image(w, h, 4);
    resource_with(&mut vmm, 3, format::B8G8R8X8_UNORM, w, h, &pixels);
    let shown = Rect::new(0, 0, 320, 200);
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 3, shown));
    wait_scanout(&vmm, 320, 200);
    vmm.display().skip_to_end();
    let damage = Rect::new(300, 150, 100, 100);
    ok("RESOURCE_FLUSH", vmm.gpu().resource_flush(3, damage));
    wait_update_rect(&vmm, damage.intersect(&shown));
    common::no_violations(&vmm);
}

#[test]
fn r8g8b8a8_is_converted_to_bgrx() {
    let (_stack, mut vmm) = start(&[]);
    let (w, h) = (256, 128);
    let rgba = image(w, h, 5);
    resource_with(&mut vmm, 2, format::R8G8B8A8_UNORM, w, h, &rgba);
    ok(
        "SET_SCANOUT",
        vmm.gpu().set_scanout(0, 2, Rect::new(0, 0, w, h)),
    );
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH",
        vmm.gpu().resource_flush(2, Rect::new(0, 0, w, h)),
    );
    wait_update_rect(&vmm, Rect::new(0, 0, w, h));
    let (fw, fh, fb) = vmm.display().framebuffer(0).unwrap();
    assert_eq!((fw, fh), (w, h));
    for (i, (got, src)) in fb.chunks_exact(4).zip(rgba.chunks_exact(4)).enumerate() {
        // BGRX: the X byte carries no colour, so only B, G, R are compared.
        let want = [src[2], src[1], src[0]];
        assert_eq!(
            &got[..3],
            &want,
            "pixel ({},{}): R8G8B8A8 {:02x?} should be BGR {:02x?} on the display",
            i as u32 % w,
            i as u32 / w,
            src,
            want
        );
    }
    common::no_violations(&vmm);
}

#[test]
fn set_scanout_switches_between_two_resources() {
    let (_stack, mut vmm) = start(&["--output", "320x240"]);
    let (w, h) = (320, 240);
    let full = Rect::new(0, 0, w, h);
    let a = image(w, h, 10);
    let b = image(w, h, 11);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, w, h, &a);
    resource_with(&mut vmm, 2, format::B8G8R8X8_UNORM, w, h, &b);
    for (round, (id, want)) in [(1, &a), (2, &b), (1, &a), (2, &b)].into_iter().enumerate() {
        ok(
            &format!("SET_SCANOUT to {id}"),
            vmm.gpu().set_scanout(0, id, full),
        );
        vmm.display().skip_to_end();
        ok(
            &format!("RESOURCE_FLUSH {id}"),
            vmm.gpu().resource_flush(id, full),
        );
        wait_update_rect(&vmm, full);
        let (_, _, fb) = vmm.display().framebuffer(0).unwrap();
        assert_pixels(
            &fb,
            want,
            w,
            &format!("round {round}: scanout showing resource {id}"),
        );
    }
    // Flushing the resource that is no longer scanned out must not touch the display.
    vmm.display().skip_to_end();
    ok(
        "RESOURCE_FLUSH of the hidden resource",
        vmm.gpu().resource_flush(1, full),
    );
    ok(
        "RESOURCE_FLUSH of the shown resource",
        vmm.gpu().resource_flush(2, full),
    );
    let ev = vmm
        .display()
        .wait_update(0, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, _, fb) = vmm.display().framebuffer(0).unwrap();
    assert_pixels(
        &fb,
        &b,
        w,
        &format!("after flushing the hidden resource ({ev:?})"),
    );
    common::no_violations(&vmm);
}

#[test]
fn output_option_sets_display_info_and_scanout_size() {
    let (_stack, mut vmm) = start(&["--output", "1024x768"]);
    let r = vmm.gpu().get_display_info().expect("GET_DISPLAY_INFO");
    assert_eq!(r.kind, resp::OK_DISPLAY_INFO, "got {}", r.kind_name());
    assert_eq!(r.used_len as usize, vgpu_tests::gpu::DISPLAY_INFO_SIZE);
    let modes = r.display_modes();
    assert!(modes[0].enabled, "scanout 0 not enabled: {:?}", modes[0]);
    assert_eq!((modes[0].rect.width, modes[0].rect.height), (1024, 768));
    assert!(
        modes[1..].iter().all(|m| !m.enabled),
        "only one output: {modes:?}"
    );
    let pixels = image(1024, 768, 6);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, 1024, 768, &pixels);
    ok(
        "SET_SCANOUT",
        vmm.gpu().set_scanout(0, 1, Rect::new(0, 0, 1024, 768)),
    );
    wait_scanout(&vmm, 1024, 768);
    common::no_violations(&vmm);
}

#[test]
fn default_display_info_is_one_1280x800_output() {
    let (_stack, mut vmm) = start(&[]);
    let r = vmm.gpu().get_display_info().expect("GET_DISPLAY_INFO");
    assert_eq!(r.kind, resp::OK_DISPLAY_INFO, "got {}", r.kind_name());
    let modes = r.display_modes();
    assert!(modes[0].enabled);
    assert_eq!((modes[0].rect.width, modes[0].rect.height), (1280, 800));
    assert!(modes[1..].iter().all(|m| !m.enabled), "{modes:?}");
}
