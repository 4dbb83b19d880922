//! The cursor queue: UPDATE_CURSOR -> VHOST_USER_GPU_CURSOR_UPDATE, MOVE_CURSOR ->
//! VHOST_USER_GPU_CURSOR_POS, resource 0 -> VHOST_USER_GPU_CURSOR_POS_HIDE.

mod common;

use common::{image, resource_with, start, WAIT};
use vgpu_tests::gpu::format;
use vgpu_tests::DisplayEvent;

/// Waits for the CURSOR_UPDATE of an earlier UPDATE_CURSOR, so later waits see only newer
/// events (cursor messages may reach the display after the command's response).
fn wait_cursor_update(vmm: &vgpu_tests::TestVmm, x: u32, y: u32) {
    vmm.display()
        .wait_for(&format!("VHOST_USER_GPU_CURSOR_UPDATE at {x},{y}"), WAIT, |e| {
            matches!(e, DisplayEvent::CursorUpdate { x: ex, y: ey, .. } if (*ex, *ey) == (x, y))
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn update_cursor_sends_image_and_hotspot() {
    let (_stack, mut vmm) = start(&[]);
    let cursor = image(64, 64, 21);
    resource_with(&mut vmm, 9, format::B8G8R8A8_UNORM, 64, 64, &cursor);
    vmm.display().skip_to_end();
    vmm.gpu()
        .update_cursor(0, 33, 44, 9, 7, 3)
        .expect("UPDATE_CURSOR completes");
    let ev = vmm
        .display()
        .wait_for("VHOST_USER_GPU_CURSOR_UPDATE", WAIT, |e| {
            matches!(e, DisplayEvent::CursorUpdate { .. })
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let DisplayEvent::CursorUpdate {
        scanout_id,
        x,
        y,
        hot_x,
        hot_y,
        image: got,
    } = ev
    else {
        unreachable!("predicate matched CursorUpdate")
    };
    assert_eq!((scanout_id, x, y), (0, 33, 44), "cursor position");
    assert_eq!((hot_x, hot_y), (7, 3), "cursor hotspot");
    if let Some(d) = vgpu_tests::scenario::first_difference(&got, &cursor, 64) {
        panic!("cursor image (B8G8R8A8 guest bytes vs CURSOR_UPDATE bytes): {d}");
    }
    common::no_violations(&vmm);
}

#[test]
fn move_cursor_sends_position() {
    let (_stack, mut vmm) = start(&[]);
    let cursor = image(64, 64, 22);
    resource_with(&mut vmm, 9, format::B8G8R8A8_UNORM, 64, 64, &cursor);
    vmm.gpu()
        .update_cursor(0, 1, 2, 9, 0, 0)
        .expect("UPDATE_CURSOR");
    wait_cursor_update(&vmm, 1, 2);
    vmm.gpu().move_cursor(0, 640, 400).expect("MOVE_CURSOR");
    let ev = vmm
        .display()
        .wait_for("VHOST_USER_GPU_CURSOR_POS", WAIT, |e| {
            matches!(
                e,
                DisplayEvent::CursorPos { .. } | DisplayEvent::CursorUpdate { .. }
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        ev == DisplayEvent::CursorPos {
            scanout_id: 0,
            x: 640,
            y: 400
        },
        "MOVE_CURSOR must send only a position (0, 640, 400), no new image; got {}",
        vgpu_tests::display::summarize(&ev)
    );
    common::no_violations(&vmm);
}

#[test]
fn cursor_resource_zero_hides_the_cursor() {
    let (_stack, mut vmm) = start(&[]);
    let cursor = image(64, 64, 23);
    resource_with(&mut vmm, 9, format::B8G8R8A8_UNORM, 64, 64, &cursor);
    vmm.gpu()
        .update_cursor(0, 5, 5, 9, 0, 0)
        .expect("UPDATE_CURSOR");
    wait_cursor_update(&vmm, 5, 5);
    vmm.gpu()
        .update_cursor(0, 10, 20, 0, 0, 0)
        .expect("UPDATE_CURSOR with resource 0");
    let ev = vmm
        .display()
        .wait_for("VHOST_USER_GPU_CURSOR_POS_HIDE", WAIT, |e| {
            matches!(
                e,
                DisplayEvent::CursorHide { .. }
                    | DisplayEvent::CursorUpdate { .. }
                    | DisplayEvent::CursorPos { .. }
            )
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(ev, DisplayEvent::CursorHide { scanout_id: 0, .. }),
        "resource 0 must hide the cursor, got {}",
        vgpu_tests::display::summarize(&ev)
    );
    common::no_violations(&vmm);
}
