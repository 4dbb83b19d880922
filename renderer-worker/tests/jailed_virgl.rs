//! The virgl renderer's real main (`run()` with `DeviceConfig::virgl`) in a child process
//! under the real renderer seccomp filter, on Mesa llvmpipe: 2D through virgl textures
//! shown on a scanout, a VIRGL context drawing with a real command stream, transfers both
//! ways, fences on context 0 and on a context ring, a hostile stream refused, reset, and a
//! clean exit: every system call llvmpipe and virglrenderer make after set-up is allowed,
//! and none else is needed.
#![cfg(feature = "virgl")]

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::{child_side, memfd, Jailed};
use protocol::config::DeviceConfig;
use protocol::ipc::{
    BackingEntry, Box3d, FenceInfo, GuestRegion, RenderError, RendererOp, ReplyBody, Resource3d,
    Transfer3d,
};
use protocol::virtio_gpu::Rect;

const TEST_NAME: &str = "virgl_serves_requests_under_seccomp";
const GUEST: u64 = 0x1_0000_0000;
const W: u32 = 64;
const H: u32 = 64;

fn cmd0(cmd: u32, obj: u32, len: u32) -> u32 {
    cmd | (obj << 8) | (len << 16)
}

/// A surface on `res`, bound as the only colour buffer, cleared to `rgba`.
#[rustfmt::skip]
fn clear_stream(res: u32, rgba: [f32; 4]) -> Vec<u8> {
    let [r, g, b, a] = rgba.map(f32::to_bits);
    [
        cmd0(1, 8, 5), 10, res, 2, 0, 0,
        cmd0(5, 0, 3), 1, 0, 10,
        cmd0(7, 0, 8), 4, r, g, b, a, 0, 0, 0,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect()
}

#[test]
fn virgl_serves_requests_under_seccomp() {
    child_side();
    let config = DeviceConfig {
        virgl: true,
        num_capsets: 2,
        ..DeviceConfig::with_limits(policy::limits::DEFAULT)
    };
    let mut r = Jailed::start(TEST_NAME, config);
    let size = u64::from(W * H * 4);
    let guest = memfd(c"guest", 4 * size);
    let fds = r.lane.send(&[guest.as_fd()]).unwrap();
    let regions = vec![GuestRegion {
        guest_addr: GUEST,
        size: 4 * size,
        fd_offset: 0,
    }];
    r.call(RendererOp::SetGuestMemory { regions, fds }, None);
    let backing = |at: u64| {
        vec![BackingEntry {
            addr: GUEST + at,
            length: size as u32,
        }]
    };

    // Capsets from virglrenderer.
    match r.call(RendererOp::GetCapsetInfo { index: 1 }, None) {
        ReplyBody::CapsetInfo {
            capset_id,
            max_version,
            max_size,
        } => assert_eq!((capset_id, max_version, max_size), (2, 2, 1376)),
        other => panic!("expected capset info, got {other:?}"),
    }
    match r.call(
        RendererOp::GetCapset {
            capset_id: 2,
            version: 2,
        },
        None,
    ) {
        ReplyBody::Capset(bytes) => assert_eq!(bytes.len(), 1376),
        other => panic!("expected the capset, got {other:?}"),
    }

    // 2D through virgl, shown on a scanout.
    let pattern: Vec<u8> = (0..size as usize).map(|i| (i * 13 % 251) as u8).collect();
    guest.write_all_at(&pattern, 0).unwrap();
    r.call(
        RendererOp::CreateResource2d {
            resource_id: 1,
            format: 2,
            width: W,
            height: H,
        },
        None,
    );
    r.call(
        RendererOp::AttachBacking {
            resource_id: 1,
            entries: backing(0),
        },
        None,
    );
    let full = Rect {
        x: 0,
        y: 0,
        width: W,
        height: H,
    };
    let fence = FenceInfo {
        fence_id: 1,
        ctx_id: 0,
        ring_idx: 0,
    };
    r.call(
        RendererOp::TransferToHost2d {
            resource_id: 1,
            rect: full,
            offset: 0,
        },
        Some(fence),
    );
    r.expect_fence(fence);
    let shown = r.show_on_scanout(1, W, H);
    for (i, (got, want)) in shown.chunks(4).zip(pattern.chunks(4)).enumerate() {
        assert_eq!(&got[..3], &want[..3], "scanout pixel {i}");
    }

    // A VIRGL context clears a render target; the pixels come back to guest memory.
    r.call(
        RendererOp::CreateContext {
            ctx_id: 1,
            context_init: 0,
            name: b"jailed".to_vec(),
        },
        None,
    );
    let args = Resource3d {
        target: 2,
        format: 2,
        bind: 2,
        width: W,
        height: H,
        depth: 1,
        array_size: 1,
        ..Resource3d::default()
    };
    r.call(
        RendererOp::CreateResource3d {
            resource_id: 5,
            args,
        },
        None,
    );
    r.call(
        RendererOp::AttachBacking {
            resource_id: 5,
            entries: backing(size),
        },
        None,
    );
    r.call(
        RendererOp::AttachResource {
            ctx_id: 1,
            resource_id: 5,
        },
        None,
    );
    let ring_fence = FenceInfo {
        fence_id: 9,
        ctx_id: 1,
        ring_idx: 1,
    };
    r.call(
        RendererOp::Submit3d {
            ctx_id: 1,
            ring_idx: 1,
            commands: clear_stream(5, [0.0, 0.0, 1.0, 1.0]),
        },
        Some(ring_fence),
    );
    r.expect_fence(ring_fence);
    let transfer = Transfer3d {
        ctx_id: 1,
        bbox: Box3d {
            x: 0,
            y: 0,
            z: 0,
            w: W,
            h: H,
            d: 1,
        },
        stride: W * 4,
        ..Transfer3d::default()
    };
    r.call(
        RendererOp::TransferFromHost3d {
            resource_id: 5,
            transfer,
        },
        None,
    );
    let mut drawn = vec![0; size as usize];
    guest.read_exact_at(&mut drawn, size).unwrap();
    assert!(
        drawn.chunks(4).all(|p| p[..3] == [255, 0, 0]),
        "the clear (blue: B8G8R8X8 stores B first) reached guest memory: {:?}",
        &drawn[..4]
    );
    guest.write_all_at(&pattern, size).unwrap();
    r.call(
        RendererOp::TransferToHost3d {
            resource_id: 5,
            transfer,
        },
        None,
    );

    // A stream whose command runs past its end: refused, and the context still draws.
    let truncated: Vec<u8> = [cmd0(9, 0, 500), 1]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let refused = r.try_call(
        RendererOp::Submit3d {
            ctx_id: 1,
            ring_idx: 0,
            commands: truncated,
        },
        None,
    );
    assert!(
        matches!(refused, Err(RenderError::InvalidParameter(_))),
        "{refused:?}"
    );
    r.call(
        RendererOp::Submit3d {
            ctx_id: 1,
            ring_idx: 0,
            commands: clear_stream(5, [0.0, 1.0, 0.0, 1.0]),
        },
        None,
    );
    r.call(
        RendererOp::TransferFromHost3d {
            resource_id: 5,
            transfer,
        },
        None,
    );
    guest.read_exact_at(&mut drawn, size).unwrap();
    assert_eq!(
        &drawn[..3],
        &[0, 255, 0],
        "the context draws after the hostile stream"
    );

    r.call(RendererOp::DestroyContext { ctx_id: 1 }, None);
    r.call(RendererOp::Reset, None);
    r.finish();
}
