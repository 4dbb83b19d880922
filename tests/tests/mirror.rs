//! The frontend keeps a scanout's buffer in step with its 2D resource (issue 9: a flush
//! then needs no renderer round trip). What the display shows must stay exactly what the
//! renderer's resource holds, whatever order transfers, flushes and scanout changes come
//! in, and with the renderer stopped a flush of a buffer in step is still answered.

mod common;

use std::time::Duration;

use common::{assert_pixels, flush_shows, image, ok, resource_with, start};
use nix::sys::signal::Signal;
use vgpu_tests::gpu::{format, Command, MemEntry, Rect};
use vgpu_tests::stack::Role;
use vgpu_tests::DisplayEvent;

const W: u32 = 320;
const H: u32 = 200;
const STRIDE: usize = W as usize * 4;

/// What the resource holds after TRANSFER_TO_HOST_2D of `rect` from byte `offset` of the
/// backing `src` (row r of the rect from `offset + r * stride`), as virtio-gpu defines it.
fn transferred(resource: &mut [u8], src: &[u8], rect: Rect, offset: usize) {
    let row = rect.width as usize * 4;
    for r in 0..rect.height as usize {
        let from = offset + r * STRIDE;
        let to = (rect.y as usize + r) * STRIDE + rect.x as usize * 4;
        resource[to..to + row].copy_from_slice(&src[from..from + row]);
    }
}

#[test]
fn a_flush_of_a_buffer_in_step_needs_no_renderer() {
    let (mut stack, mut vmm) = start(&[]);
    let full = Rect::new(0, 0, W, H);
    let first = image(W, H, 1);
    let backing = resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, W, H, &first);
    ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 1, full));
    // Through the renderer: the buffer is in step from here on.
    flush_shows(&mut vmm, 1, full, &first, W, "first picture");

    let renderer = stack.expect_child(&Role::RendererWorker);
    stack
        .signal_process(&renderer, Signal::SIGSTOP)
        .unwrap_or_else(|e| panic!("{e}"));
    vmm.gpu().set_timeout(Duration::from_secs(5));
    let second = image(W, H, 2);
    vmm.memory().write(backing.addr, &second).unwrap();
    ok(
        "TRANSFER_TO_HOST_2D with the renderer stopped",
        vmm.gpu().transfer_to_host_2d(1, full, 0),
    );
    flush_shows(
        &mut vmm,
        1,
        full,
        &second,
        W,
        "flushed with the renderer stopped",
    );

    // A sub-rectangle at its natural offset, flushed as part of a larger damage.
    let third = image(W, H, 3);
    vmm.memory().write(backing.addr, &third).unwrap();
    let part = Rect::new(40, 30, 100, 50);
    let offset = part.y as usize * STRIDE + part.x as usize * 4;
    ok(
        "sub-rect TRANSFER_TO_HOST_2D",
        vmm.gpu().transfer_to_host_2d(1, part, offset as u64),
    );
    let mut want = second.clone();
    transferred(&mut want, &third, part, offset);
    flush_shows(&mut vmm, 1, full, &want, W, "sub-rect, renderer stopped");

    stack
        .signal_process(&renderer, Signal::SIGCONT)
        .unwrap_or_else(|e| panic!("{e}"));
    common::still_works(&mut vmm, "flushes answered while the renderer was stopped");
    common::no_violations(&vmm);
}

/// SET_SCANOUT, TRANSFER and FLUSH queued back to back (the renderer's fill of the new
/// buffer is still on its way when the transfer comes), scanouts switched between two
/// resources, and transfers the frontend must apply exactly as the renderer does: an
/// offset past the rect's natural one, a backing split over entries, one the renderer
/// refuses.
#[test]
fn the_display_shows_what_the_resource_holds_in_every_order() {
    let (_stack, mut vmm) = start(&[]);
    let full = Rect::new(0, 0, W, H);
    let a = image(W, H, 10);
    let b = image(W, H, 20);
    let backing_a = resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, W, H, &a);
    // Resource 2's backing in three pieces, out of address order.
    let len = STRIDE * H as usize;
    let pieces = [len / 3 + 12, len / 3 - 12, len - 2 * (len / 3)];
    let mut entries = Vec::new();
    let mut addrs = Vec::new();
    for p in pieces.iter().rev() {
        addrs.push(vmm.memory().alloc(*p as u64).expect("guest memory"));
    }
    addrs.reverse();
    for (p, addr) in pieces.iter().zip(&addrs) {
        entries.push(MemEntry {
            addr: *addr,
            length: *p as u32,
        });
    }
    let write_b = |vmm: &mut vgpu_tests::TestVmm, bytes: &[u8]| {
        let mut at = 0;
        for (p, addr) in pieces.iter().zip(&addrs) {
            vmm.memory().write(*addr, &bytes[at..at + p]).unwrap();
            at += p;
        }
    };
    ok(
        "RESOURCE_CREATE_2D 2",
        vmm.gpu()
            .resource_create_2d(2, format::B8G8R8X8_UNORM, W, H),
    );
    ok("ATTACH_BACKING 2", vmm.gpu().attach_backing(2, &entries));
    write_b(&mut vmm, &b);
    ok("TRANSFER 2", vmm.gpu().transfer_to_host_2d(2, full, 0));

    // Scanout, transfer and flush in one go, twice, switching resources.
    let mut resource_a = a.clone();
    let mut resource_b = b.clone();
    for (round, id) in [(0u32, 1u32), (1, 2), (2, 1)] {
        let fresh = image(W, H, 100 + round);
        if id == 1 {
            vmm.memory().write(backing_a.addr, &fresh).unwrap();
            resource_a = fresh.clone();
        } else {
            write_b(&mut vmm, &fresh);
            resource_b = fresh.clone();
        }
        vmm.display().skip_to_end();
        let gpu = vmm.gpu();
        let pending = [
            gpu.submit(
                &Command::SetScanout {
                    scanout_id: 0,
                    resource_id: id,
                    rect: full,
                },
                None,
            ),
            gpu.submit(
                &Command::TransferToHost2d {
                    resource_id: id,
                    rect: full,
                    offset: 0,
                },
                None,
            ),
            gpu.submit(
                &Command::ResourceFlush {
                    resource_id: id,
                    rect: full,
                },
                None,
            ),
        ];
        for p in pending {
            ok("queued command", gpu.wait(p.expect("submit")));
        }
        // The fill's UPDATE (the resource before the transfer) comes first, then the
        // flush's: wait for the one carrying the new picture.
        let hash = vgpu_tests::display::payload_hash(&fresh);
        vmm.display()
            .wait_for(
                &format!("round {round}: the new picture"),
                common::WAIT,
                |e| matches!(e, DisplayEvent::Update { hash: h, .. } if *h == hash),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let (_, _, fb) = vmm.display().framebuffer(0).unwrap();
        assert_pixels(&fb, &fresh, W, &format!("round {round}, resource {id}"));
    }
    // Resource 1 is shown and in step now; resource 2 keeps what it holds.

    // An offset past the natural one: row r comes from offset + r * stride.
    let src = image(W, H, 7);
    vmm.memory().write(backing_a.addr, &src).unwrap();
    let part = Rect::new(8, 16, 64, 40);
    let offset = part.y as usize * STRIDE + part.x as usize * 4 + 3 * STRIDE + 20;
    ok(
        "TRANSFER at a later offset",
        vmm.gpu().transfer_to_host_2d(1, part, offset as u64),
    );
    transferred(&mut resource_a, &src, part, offset);
    flush_shows(&mut vmm, 1, full, &resource_a, W, "a later offset");

    // An offset before the rect's natural one: the renderer refuses it, and the display
    // must not show it either. (The frontend answers the unfenced transfer at once.)
    let refused = image(W, H, 8);
    vmm.memory().write(backing_a.addr, &refused).unwrap();
    let part = Rect::new(100, 100, 50, 50);
    let _ = vmm.gpu().transfer_to_host_2d(1, part, 4);
    flush_shows(
        &mut vmm,
        1,
        full,
        &resource_a,
        W,
        "a transfer the renderer refuses",
    );

    // Sub-rect damage of a sub-rect transfer on the split backing, after switching to it.
    ok("SET_SCANOUT 2", vmm.gpu().set_scanout(0, 2, full));
    flush_shows(&mut vmm, 2, full, &resource_b, W, "resource 2 again");
    let src = image(W, H, 9);
    write_b(&mut vmm, &src);
    let part = Rect::new(0, 60, W, 80);
    let offset = part.y as usize * STRIDE;
    ok(
        "TRANSFER over the entry boundaries",
        vmm.gpu().transfer_to_host_2d(2, part, offset as u64),
    );
    let shown = resource_b.clone();
    transferred(&mut resource_b, &src, part, offset);
    let damage = Rect::new(30, 50, 200, 100);
    vmm.display().skip_to_end();
    ok("sub-rect FLUSH", vmm.gpu().resource_flush(2, damage));
    common::wait_update_rect(&vmm, damage);
    let (_, _, fb) = vmm.display().framebuffer(0).unwrap();
    // Outside the damage the display still shows resource 2 as flushed before.
    let mut want = shown;
    for y in damage.y..damage.y + damage.height {
        let o = y as usize * STRIDE + damage.x as usize * 4;
        let n = damage.width as usize * 4;
        want[o..o + n].copy_from_slice(&resource_b[o..o + n]);
    }
    assert_pixels(&fb, &want, W, "sub-rect damage over a split backing");
    common::no_violations(&vmm);
}
