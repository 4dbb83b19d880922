//! The virgl backend on the real virglrenderer and Mesa llvmpipe (no GPU): capsets, 2D
//! through virgl textures, a 3D transfer round trip, a real virgl command stream (a clear)
//! read back, fences, and hostile streams refused. virglrenderer is one state per process
//! and one GL thread, so everything runs in one test, step by step.
#![cfg(feature = "virgl")]

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use nix::sys::memfd::{memfd_create, MFdFlags};
use protocol::ipc::{
    BackingEntry, Box3d, FenceInfo, GuestRegion, RenderError, Resource3d, Transfer3d,
};
use protocol::virtio_gpu::{Rect, VIRTIO_GPU_CAPSET_VIRGL, VIRTIO_GPU_CAPSET_VIRGL2};
use protocol::virtio_gpu::{VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_BLOB_MEM_HOST3D};
use vgpu_renderer_worker::{BlobCreate, GuestMemory, Renderer, VirglRenderer};

const MEM: u64 = 4 << 20;
const W: u32 = 64;
const H: u32 = 64;

fn cmd0(cmd: u32, obj: u32, len: u32) -> u32 {
    cmd | (obj << 8) | (len << 16)
}

fn bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A surface on `res`, bound as the only colour buffer, cleared to `rgba`.
#[rustfmt::skip]
fn clear_stream(res: u32, rgba: [f32; 4]) -> Vec<u8> {
    let [r, g, b, a] = rgba.map(f32::to_bits);
    bytes(&[
        cmd0(1, 8, 5),
        10,
        res,
        2,
        0,
        0,
        cmd0(5, 0, 3),
        1,
        0,
        10,
        cmd0(7, 0, 8),
        4,
        r,
        g,
        b,
        a,
        0,
        0,
        0,
    ])
}

fn guest() -> (Arc<GuestMemory>, File) {
    let fd: OwnedFd = memfd_create(c"guest", MFdFlags::MFD_CLOEXEC).expect("memfd");
    let file = File::from(fd);
    file.set_len(MEM).expect("size");
    let dup: OwnedFd = file.try_clone().expect("dup").into();
    let mem = GuestMemory::new(
        &[GuestRegion {
            guest_addr: 0,
            size: MEM,
            fd_offset: 0,
        }],
        vec![dup],
    )
    .expect("guest memory");
    (Arc::new(mem), file)
}

#[test]
fn virgl_on_llvmpipe() {
    // SAFETY-free: this test binary's only thread that touches the environment, before
    // virglrenderer (and Mesa's threads) start.
    std::env::set_var("MESA_SHADER_CACHE_DISABLE", "true");
    let fences = Arc::new(Mutex::new(Vec::new()));
    let sink = fences.clone();
    let mut r = VirglRenderer::new(policy::limits::DEFAULT, None, move |f| {
        sink.lock().unwrap().push(f)
    })
    .expect("virglrenderer on llvmpipe");

    // Capsets, as the guest's Mesa reads them.
    assert_eq!(r.num_capsets(), 2);
    let v1 = r.capset_info(0).unwrap();
    let v2 = r.capset_info(1).unwrap();
    assert_eq!(
        (v1.capset_id, v1.max_version, v1.max_size),
        (VIRTIO_GPU_CAPSET_VIRGL, 1, 308)
    );
    assert_eq!(
        (v2.capset_id, v2.max_version, v2.max_size),
        (VIRTIO_GPU_CAPSET_VIRGL2, 2, 1376)
    );
    assert_eq!(r.capset(VIRTIO_GPU_CAPSET_VIRGL2, 2).unwrap().len(), 1376);
    assert!(
        r.capset(VIRTIO_GPU_CAPSET_VIRGL2, 3).is_err(),
        "too new a version"
    );
    assert!(r.capset(99, 1).is_err(), "unknown capset");
    assert!(r.capset_info(2).is_err(), "index past the end");
    // Venus and DRM native contexts are not in Debian 12's virglrenderer: refused cleanly.
    for capset in [4, 6] {
        assert!(
            matches!(
                r.create_context(3, capset, "no"),
                Err(RenderError::InvalidParameter(_))
            ),
            "a context of capset {capset}"
        );
    }

    let (mem, file) = guest();
    let stride = W * 4;
    let size = u64::from(stride * H);
    let backing = |at: u64| {
        mem.translate(
            &[BackingEntry {
                addr: at,
                length: size as u32,
            }],
            16,
            size,
        )
        .expect("backing")
    };

    // 2D through virgl: a pattern in guest memory, transferred, read back as a scanout would.
    let pattern: Vec<u8> = (0..size as usize).map(|i| (i * 7 % 251) as u8).collect();
    file.write_all_at(&pattern, 0).unwrap();
    r.create_resource_2d(1, 2, W, H).expect("2D resource");
    r.attach_backing(1, backing(0)).expect("attach");
    r.transfer_to_host_2d(
        1,
        Rect {
            x: 0,
            y: 0,
            width: W,
            height: H,
        },
        0,
    )
    .expect("transfer");
    let mut shown = vec![0u8; size as usize];
    r.read_rect(
        1,
        Rect {
            x: 0,
            y: 0,
            width: W,
            height: H,
        },
        stride,
        &mut shown,
    )
    .expect("readback");
    // B8G8R8X8: the X byte reads back as whatever the driver keeps; compare B, G, R.
    for (i, (got, want)) in shown.chunks(4).zip(pattern.chunks(4)).enumerate() {
        assert_eq!(&got[..3], &want[..3], "pixel {i} after the 2D round trip");
    }
    // A sub-rectangle lands at its resource coordinates, rows one stride apart.
    let mut part = vec![0u8; size as usize];
    r.read_rect(
        1,
        Rect {
            x: 3,
            y: 5,
            width: 7,
            height: 2,
        },
        stride,
        &mut part,
    )
    .expect("partial readback");
    let at = (5 * stride + 3 * 4) as usize;
    assert_eq!(
        &part[at..at + 3],
        &pattern[at..at + 3],
        "partial rect origin"
    );
    assert_eq!(part[0], 0, "nothing outside the rect is written");
    assert!(
        r.read_rect(
            1,
            Rect {
                x: 60,
                y: 0,
                width: 8,
                height: 1
            },
            stride,
            &mut part
        )
        .is_err(),
        "a rect past the resource"
    );

    // A fence on context 0 (2D) is reported.
    r.create_fence(FenceInfo {
        fence_id: 7,
        ctx_id: 0,
        ring_idx: 0,
    })
    .unwrap();
    assert!(!r.poll_fences() || fences.lock().unwrap().is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.poll_fences() {
        assert!(
            std::time::Instant::now() < deadline,
            "2D fence never signalled"
        );
    }
    assert!(fences.lock().unwrap().iter().any(|f| f.fence_id == 7));

    // 3D: a render target in a VIRGL context, cleared by a real command stream, then read
    // back into guest memory with TRANSFER_FROM_HOST_3D.
    r.create_context(1, 0, "test").expect("context");
    let target = Resource3d {
        target: 2,
        format: 2,
        bind: 2,
        width: W,
        height: H,
        depth: 1,
        array_size: 1,
        last_level: 0,
        nr_samples: 0,
        flags: 0,
    };
    r.create_resource_3d(5, target).expect("3D resource");
    r.attach_backing(5, backing(size)).expect("attach 3D");
    r.context_attach_resource(1, 5).expect("ctx attach");
    r.submit_3d(1, 0, &mut clear_stream(5, [1.0, 0.0, 1.0, 1.0]))
        .expect("submit");
    r.create_fence(FenceInfo {
        fence_id: 1,
        ctx_id: 1,
        ring_idx: 0,
    })
    .unwrap();
    let t = Transfer3d {
        ctx_id: 1,
        bbox: Box3d {
            x: 0,
            y: 0,
            z: 0,
            w: W,
            h: H,
            d: 1,
        },
        offset: 0,
        level: 0,
        stride,
        layer_stride: 0,
    };
    r.transfer_from_host_3d(5, t).expect("transfer from host");
    let mut got = vec![0u8; size as usize];
    file.read_exact_at(&mut got, size).unwrap();
    assert!(
        got.chunks(4).all(|p| p[..3] == [255, 0, 255]),
        "the clear reached guest memory: first pixel {:?}",
        &got[..4]
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.poll_fences() {
        assert!(
            std::time::Instant::now() < deadline,
            "context fence never signalled"
        );
    }
    assert!(fences.lock().unwrap().contains(&FenceInfo {
        fence_id: 1,
        ctx_id: 1,
        ring_idx: 0
    }));

    // A fresh resource reads back as zeros, never as stale host memory (the
    // CVE-2022-0175 class): fill the renderer's heap first with resources it frees.
    for id in 30..34 {
        r.create_resource_3d(id, target).expect("scratch");
        r.attach_backing(id, backing(0)).expect("attach scratch");
        r.transfer_to_host_3d(id, Transfer3d { ctx_id: 0, ..t })
            .expect("fill scratch");
        r.unref(id).expect("unref scratch");
    }
    r.create_resource_3d(40, target).expect("fresh resource");
    r.attach_backing(40, backing(3 * size))
        .expect("attach fresh");
    file.write_all_at(&vec![0xa5u8; size as usize], 3 * size)
        .unwrap();
    r.transfer_from_host_3d(40, Transfer3d { ctx_id: 0, ..t })
        .expect("read fresh");
    let mut fresh = vec![0u8; size as usize];
    file.read_exact_at(&mut fresh, 3 * size).unwrap();
    let nonzero = fresh.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count();
    assert_eq!(
        nonzero,
        0,
        "a fresh resource read back non-zero pixels: {:?}",
        &fresh[..16]
    );
    r.unref(40).expect("unref fresh");

    // TRANSFER_TO_HOST_3D then back: a pattern survives the round trip.
    file.write_all_at(&pattern, size).unwrap();
    r.transfer_to_host_3d(5, t).expect("transfer to host");
    file.write_all_at(&vec![0u8; size as usize], size).unwrap();
    r.transfer_from_host_3d(5, t).expect("transfer from host");
    file.read_exact_at(&mut got, size).unwrap();
    for (i, (g, w)) in got.chunks(4).zip(pattern.chunks(4)).enumerate() {
        assert_eq!(&g[..3], &w[..3], "pixel {i} after the 3D round trip");
    }

    // Hostile streams and arguments: refused, and the renderer keeps serving.
    assert!(matches!(
        r.submit_3d(1, 0, &mut [1, 2, 3]),
        Err(RenderError::InvalidParameter(_))
    ));
    assert!(
        r.submit_3d(9, 0, &mut clear_stream(5, [0.0; 4])).is_err(),
        "unknown context"
    );
    let mut truncated = bytes(&[cmd0(9, 0, 1000), 1, 2]);
    assert!(
        matches!(
            r.submit_3d(1, 0, &mut truncated),
            Err(RenderError::InvalidParameter(_))
        ),
        "a command running past the stream (CVE-2022-0135 class)"
    );
    assert!(
        r.create_resource_3d(
            6,
            Resource3d {
                target: 77,
                ..target
            }
        )
        .is_err(),
        "bad target"
    );
    assert!(r.create_resource_3d(5, target).is_err(), "id in use");
    let mut out_of_range = t;
    out_of_range.bbox.w = W + 1;
    assert!(
        r.transfer_from_host_3d(5, out_of_range).is_err(),
        "box past the resource"
    );
    let mut bad_level = t;
    bad_level.level = 1;
    assert!(
        r.transfer_from_host_3d(5, bad_level).is_err(),
        "a mip level it does not have"
    );
    // Refused before virglrenderer saw them, so the context is still usable.
    r.submit_3d(1, 0, &mut clear_stream(5, [0.0, 1.0, 0.0, 1.0]))
        .expect("still serving");
    r.transfer_from_host_3d(5, t).expect("transfer from host");
    file.read_exact_at(&mut got, size).unwrap();
    assert_eq!(
        &got[..3],
        &[0, 255, 0],
        "the second clear after the hostile streams"
    );

    // Blobs: a HOST3D blob naming no allocation of the context, and the export of a guest
    // blob, are refused with errors (nothing is ever mapped through a pointer).
    let host3d = BlobCreate {
        ctx_id: 1,
        blob_mem: VIRTIO_GPU_BLOB_MEM_HOST3D,
        blob_flags: 1,
        blob_id: 12345,
        size: 4096,
    };
    assert!(
        r.create_blob(20, host3d, None).is_err(),
        "HOST3D blob of no allocation"
    );
    let guest_blob = BlobCreate {
        ctx_id: 0,
        blob_mem: VIRTIO_GPU_BLOB_MEM_GUEST,
        blob_flags: 1,
        blob_id: 0,
        size,
    };
    r.create_blob(21, guest_blob, Some(backing(2 * size)))
        .expect("guest blob");
    assert!(r.export_blob(21).is_err(), "a guest blob is not exported");
    let mut head = [0u8; 3];
    file.write_all_at(&[1, 2, 3], 2 * size).unwrap();
    r.read_blob(21, 0, &mut head).expect("guest blob read");
    assert_eq!(head, [1, 2, 3]);
    // Reset drops everything and signals what was pending.
    r.reset().expect("reset");
    assert!(
        r.transfer_from_host_3d(5, t).is_err(),
        "resources gone after reset"
    );
    r.create_context(1, 0, "again")
        .expect("context ids free again after reset");
}
