//! Fences: VIRTIO_GPU_FLAG_FENCE commands are answered with the fence echoed, in fence order.

mod common;

use common::{image, resource_with, start};
use vgpu_tests::gpu::{format, resp, Command, Rect, FLAG_FENCE};

#[test]
fn fenced_commands_complete_in_fence_order_with_fence_echoed() {
    let (_stack, mut vmm) = start(&[]);
    let (w, h) = (256, 256);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, w, h, &image(w, h, 31));
    let full = Rect::new(0, 0, w, h);
    let gpu = vmm.gpu();
    gpu.clear_completions();
    // Pipelined: every command is in the ring before the first response is collected.
    let cmds = [
        Command::TransferToHost2d {
            resource_id: 1,
            rect: full,
            offset: 0,
        },
        Command::SetScanout {
            scanout_id: 0,
            resource_id: 1,
            rect: full,
        },
        Command::ResourceFlush {
            resource_id: 1,
            rect: full,
        },
        Command::ResourceCreate2d {
            resource_id: 2,
            format: format::B8G8R8X8_UNORM,
            width: 8,
            height: 8,
        },
        Command::TransferToHost2d {
            resource_id: 1,
            rect: Rect::new(0, 0, 16, 16),
            offset: 0,
        },
        Command::ResourceFlush {
            resource_id: 1,
            rect: Rect::new(0, 0, 16, 16),
        },
        Command::ResourceUnref { resource_id: 2 },
        Command::GetDisplayInfo,
    ];
    let mut pending = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        let fence = 100 + i as u64 * 3;
        pending.push((fence, c.name(), gpu.submit(c, Some(fence)).expect("submit")));
    }
    for (fence, name, p) in pending {
        let r = gpu
            .wait(p)
            .unwrap_or_else(|e| panic!("{name} (fence {fence}): {e}"));
        assert!(r.is_ok(), "{name} (fence {fence}): got {}", r.kind_name());
        assert_ne!(
            r.flags & FLAG_FENCE,
            0,
            "{name}: response lacks VIRTIO_GPU_FLAG_FENCE"
        );
        assert_eq!(r.fence_id, fence, "{name}: fence id not echoed");
    }
    let order = gpu.completions().to_vec();
    let fences: Vec<u64> = order
        .iter()
        .filter_map(|s| s.split("(fence ").nth(1))
        .filter_map(|s| s.trim_end_matches(')').parse().ok())
        .collect();
    let mut sorted = fences.clone();
    sorted.sort_unstable();
    assert_eq!(fences.len(), cmds.len(), "completions: {order:?}");
    assert_eq!(
        fences, sorted,
        "fenced commands completed out of fence order: {order:?}"
    );
    common::no_violations(&vmm);
}

#[test]
fn unfenced_response_has_no_fence_flag() {
    let (_stack, mut vmm) = start(&[]);
    let r = vmm.gpu().get_display_info().expect("GET_DISPLAY_INFO");
    assert_eq!(
        r.flags & FLAG_FENCE,
        0,
        "unfenced command answered with the fence flag"
    );
    assert_eq!(r.fence_id, 0);
}

#[test]
fn failing_fenced_command_still_echoes_its_fence() {
    let (_stack, mut vmm) = start(&[]);
    let r = vmm
        .gpu()
        .execute_fenced(&Command::ResourceUnref { resource_id: 77 }, 5)
        .expect("RESOURCE_UNREF");
    assert_eq!(
        r.kind,
        resp::ERR_INVALID_RESOURCE_ID,
        "got {}",
        r.kind_name()
    );
    assert_eq!(
        (r.flags & FLAG_FENCE, r.fence_id),
        (FLAG_FENCE, 5),
        "fence not echoed on error"
    );
    // A later fenced command still completes.
    let r = vmm
        .gpu()
        .execute_fenced(&Command::GetDisplayInfo, 6)
        .expect("GET_DISPLAY_INFO");
    assert_eq!((r.kind, r.fence_id), (resp::OK_DISPLAY_INFO, 6));
}
