//! `run()` — the role's real main — in a child process under the real renderer seccomp
//! filter, serving a scanout flush, a cursor read, a fence, and the whole cross-domain
//! path (context, query ring, image requirements, a shm blob exported, mapped, written,
//! unmapped, finalized and mapped again; capsets), then exiting 0 when the frontend
//! closes the request channel. The child is this test binary re-executed; the
//! test plays broker and frontend. (The full broker/frontend/VMM stack is tested by the
//! workspace's integration tests.)

mod common;

use common::{child_side, memfd, Jailed};
use vgpu_tests::cross_domain;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use protocol::config::DeviceConfig;
use protocol::ipc::{BackingEntry, FenceInfo, GuestRegion, RenderError, RendererOp, ReplyBody};
use protocol::virtio_gpu::Rect;

const TEST_NAME: &str = "run_serves_requests_under_seccomp";

#[test]
fn run_serves_requests_under_seccomp() {
    child_side();
    let mut r = Jailed::start(
        TEST_NAME,
        DeviceConfig::with_limits(policy::limits::DEFAULT),
    );
    let guest = memfd(c"guest", 0x10000);
    let pattern: Vec<u8> = (0..0x10000u32).map(|i| (i % 249) as u8).collect();
    guest.write_all_at(&pattern, 0).unwrap();
    let fds = r.lane.send(&[guest.as_fd()]).unwrap();
    let regions = vec![GuestRegion {
        guest_addr: 0x1_0000_0000,
        size: 0x10000,
        fd_offset: 0,
    }];
    r.call(RendererOp::SetGuestMemory { regions, fds }, None);
    let (w, h) = (64u32, 48u32);
    let create = RendererOp::CreateResource2d {
        resource_id: 1,
        format: 1,
        width: w,
        height: h,
    };
    r.call(create, None);
    let entries = vec![BackingEntry {
        addr: 0x1_0000_0000,
        length: w * h * 4,
    }];
    r.call(
        RendererOp::AttachBacking {
            resource_id: 1,
            entries,
        },
        None,
    );
    let full = Rect {
        x: 0,
        y: 0,
        width: w,
        height: h,
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
    let size = u64::from(w * h * 4);
    let shown = r.show_on_scanout(1, w, h);
    assert_eq!(shown, pattern[..size as usize]);
    match r.call(RendererOp::ReadCursor { resource_id: 1 }, None) {
        ReplyBody::CursorImage(image) => {
            assert_eq!(image.len(), 16384);
            assert_eq!(image[..256], pattern[..256]);
        }
        other => panic!("expected a cursor image, got {other:?}"),
    }
    cross_domain_under_seccomp(&mut r, &guest);
    r.call(RendererOp::Reset, None);

    // Every event rang the doorbell: the counter holds one ring per event (at least the
    // replies above), which is what wakes the frontend's event loop.
    let mut rings = [0u8; 8];
    nix::unistd::read(&r.bell, &mut rings).expect("the doorbell was never rung");
    assert!(u64::from_ne_bytes(rings) >= 5, "too few doorbell rings");

    r.finish();
}

/// Sends `Map` for blob `id`; returns the reply's size and the fd from the lane.
fn map(r: &mut Jailed, id: u32) -> (u64, File) {
    match r.call(RendererOp::Map { resource_id: id }, None) {
        ReplyBody::MapReady {
            resource_id,
            size,
            map_info,
            fds,
        } => {
            assert_eq!((resource_id, map_info), (id, 1));
            let mut fds = r.lane.recv(fds).unwrap();
            assert_eq!(fds.len(), 1);
            (size, File::from(fds.remove(0)))
        }
        other => panic!("expected MapReady, got {other:?}"),
    }
}

/// The cross-domain path, as a guest drives it, with the renderer jailed.
fn cross_domain_under_seccomp(r: &mut Jailed, guest: &File) {
    const CTX: u32 = 3;
    const RING: u32 = 20;
    const BLOB: u32 = 21;
    const RING_AT: u64 = 0x8000;
    match r
        .try_call(RendererOp::GetCapsetInfo { index: 0 }, None)
        .unwrap()
    {
        ReplyBody::CapsetInfo {
            capset_id,
            max_version,
            max_size,
        } => assert_eq!((capset_id, max_version, max_size), (5, 0, 16)),
        other => panic!("expected capset info, got {other:?}"),
    }
    let capset = RendererOp::GetCapset {
        capset_id: cross_domain::CAPSET_CROSS_DOMAIN,
        version: 0,
    };
    match r.try_call(capset, None).unwrap() {
        ReplyBody::Capset(bytes) => {
            let caps = cross_domain::Capabilities::parse(&bytes).unwrap();
            assert_eq!((caps.version, caps.supported_channels), (1, 0));
        }
        other => panic!("expected the capset, got {other:?}"),
    }
    let create = RendererOp::CreateContext {
        ctx_id: CTX,
        context_init: cross_domain::CAPSET_CROSS_DOMAIN,
        name: b"jailed".to_vec(),
    };
    r.try_call(create, None).unwrap();
    let ring = RendererOp::CreateBlob {
        ctx_id: CTX,
        resource_id: RING,
        blob_mem: 1,
        blob_flags: 0,
        blob_id: 0,
        size: 0x1000,
        entries: vec![BackingEntry {
            addr: 0x1_0000_0000 + RING_AT,
            length: 0x1000,
        }],
    };
    r.try_call(ring, None).unwrap();
    let attach = RendererOp::AttachResource {
        ctx_id: CTX,
        resource_id: RING,
    };
    r.try_call(attach, None).unwrap();
    let mut commands = cross_domain::init(RING);
    commands.extend(cross_domain::poll());
    commands.extend(cross_domain::get_image_requirements(
        128,
        64,
        cross_domain::DRM_FORMAT_ARGB8888,
        0,
    ));
    let submit = RendererOp::Submit3d {
        ctx_id: CTX,
        ring_idx: 0,
        commands,
    };
    r.try_call(submit, None).unwrap();
    let mut answer = [0u8; cross_domain::IMAGE_REQUIREMENTS_SIZE];
    guest.read_exact_at(&mut answer, RING_AT).unwrap();
    let reqs = cross_domain::ImageRequirements::parse(&answer).unwrap();
    assert_eq!((reqs.strides[0], reqs.size), (512, 128 * 64 * 4));
    // The blob is a memfd the jailed renderer creates (memfd_create + ftruncate).
    let blob = RendererOp::CreateBlob {
        ctx_id: CTX,
        resource_id: BLOB,
        blob_mem: 2,
        blob_flags: 1,
        blob_id: u64::from(reqs.blob_id),
        size: reqs.size,
        entries: Vec::new(),
    };
    r.try_call(blob, None).unwrap();
    let (size, window) = map(r, BLOB);
    assert_eq!(size, reqs.size);
    window
        .write_all_at(b"written by the VMM's guest", 4096)
        .unwrap();
    assert_eq!(
        r.try_call(RendererOp::Unmap { resource_id: BLOB }, None)
            .unwrap(),
        ReplyBody::UnmapAck { resource_id: BLOB }
    );
    assert_eq!(
        r.try_call(RendererOp::Finalize { resource_id: BLOB }, None)
            .unwrap(),
        ReplyBody::FinalizeAck { resource_id: BLOB }
    );
    drop(window);
    let (_, again) = map(r, BLOB);
    let mut seen = [0u8; 26];
    again.read_exact_at(&mut seen, 4096).unwrap();
    assert_eq!(&seen, b"written by the VMM's guest");
    // Streams that would hang rutabaga (a command of size 0) or make it create a pipe
    // (SEND of a read pipe, a syscall the filter kills) are refused with an error reply,
    // and the renderer lives on.
    let hostile: [Vec<u8>; 2] = [vec![3, 0, 0, 0, 0, 0, 0, 0], send_with_read_pipe()];
    for commands in hostile {
        let r = r.try_call(
            RendererOp::Submit3d {
                ctx_id: CTX,
                ring_idx: 0,
                commands,
            },
            None,
        );
        assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");
    }
    let destroy = RendererOp::DestroyContext { ctx_id: CTX };
    r.try_call(destroy, None).unwrap();
}

/// A CROSS_DOMAIN_CMD_SEND carrying one identifier of type READ_PIPE (3): header, then
/// num_identifiers, opaque_data_size, identifiers[28], identifier_types[28],
/// identifier_sizes[28] (u32 each).
fn send_with_read_pipe() -> Vec<u8> {
    let size = 8 + 8 + 3 * 28 * 4;
    let mut out = cross_domain::header(cross_domain::CMD_SEND, size).to_vec();
    out.resize(size, 0);
    out[8..12].copy_from_slice(&1u32.to_le_bytes());
    out[16..20].copy_from_slice(&0x8000_0001u32.to_le_bytes());
    out[16 + 28 * 4..16 + 28 * 4 + 4].copy_from_slice(&3u32.to_le_bytes());
    out
}
