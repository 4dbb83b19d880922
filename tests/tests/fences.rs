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

/// Pipelining (issue 9): an unfenced TRANSFER_TO_HOST_2D, fully decided by the frontend's
/// own checks, is answered without waiting for the renderer (here stopped with SIGSTOP);
/// a fenced one waits for it, and so does everything queued behind it; both are executed
/// once the renderer runs again, in order.
#[test]
fn unfenced_transfers_are_answered_at_once_fenced_ones_wait_for_the_renderer() {
    use nix::sys::signal::Signal;
    use std::time::Duration;
    use vgpu_tests::gpu::GpuError;
    use vgpu_tests::stack::Role;

    let (mut stack, mut vmm) = start(&[]);
    let (w, h) = (64, 64);
    resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, w, h, &image(w, h, 5));
    let rect = Rect::new(0, 0, w, h);
    let transfer = Command::TransferToHost2d {
        resource_id: 1,
        rect,
        offset: 0,
    };
    let renderer = stack.expect_child(&Role::RendererWorker);
    stack
        .signal_process(&renderer, Signal::SIGSTOP)
        .unwrap_or_else(|e| panic!("{e}"));
    let gpu = vmm.gpu();
    let r = gpu
        .execute(&transfer)
        .unwrap_or_else(|e| panic!("an unfenced transfer waited for a stopped renderer: {e}"));
    assert_eq!(r.kind, resp::OK_NODATA, "{}", r.kind_name());

    let fenced = gpu.submit(&transfer, Some(9)).expect("submit fenced");
    let timeout = gpu.timeout();
    gpu.set_timeout(Duration::from_millis(500));
    let behind = gpu
        .submit(&Command::GetDisplayInfo, None)
        .expect("submit GET_DISPLAY_INFO");
    let r = gpu.wait(behind);
    assert!(
        matches!(r, Err(GpuError::Timeout { .. })),
        "answered before the fenced transfer ahead of it: {r:?}"
    );
    stack
        .signal_process(&renderer, Signal::SIGCONT)
        .unwrap_or_else(|e| panic!("{e}"));
    let gpu = vmm.gpu();
    gpu.set_timeout(timeout);
    let r = gpu
        .wait(fenced)
        .unwrap_or_else(|e| panic!("fenced transfer: {e}"));
    assert_eq!(r.kind, resp::OK_NODATA, "{}", r.kind_name());
    assert_ne!(r.flags & FLAG_FENCE, 0, "fence flag echoed");
    common::still_works(&mut vmm, "a stopped and resumed renderer");
}
