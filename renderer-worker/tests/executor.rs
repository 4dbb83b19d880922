//! The executor driven the way the frontend drives it: real ipc-channel channels, a real
//! descriptor lane, real memfds for guest memory and scanout buffers, real rutabaga 2D.
//! The executor runs on its own thread here; multi-process runs are the integration
//! tests' job.

use vgpu_tests::cross_domain;

use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::thread;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::stat::fstat;
use protocol::config::{DeviceConfig, Limits, OutputConfig};
use protocol::ipc::{
    BackingEntry, BlobScanout, FenceInfo, GuestRegion, RenderError, RendererEvent, RendererOp,
    RendererRequest, ReplyBody,
};
use protocol::lane::Lane;
use protocol::virtio_gpu::Rect;
use vgpu_renderer_worker::{
    EventSink, Executor, RendererError, RutabagaRenderer, CURSOR_BYTES, NUM_CAPSETS,
};

const WAIT: Duration = Duration::from_secs(10);
const FORMAT: u32 = 2; // B8G8R8X8_UNORM
const GUEST_BASE: u64 = 0x8000_0000;
const REGION: u64 = 0x4000;

fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
    Rect {
        x,
        y,
        width,
        height,
    }
}

/// Byte `i` of the guest memory pattern (relative to `GUEST_BASE`).
fn guest_byte(i: u64) -> u8 {
    (i % 253) as u8
}

fn memfd(name: &std::ffi::CStr, len: u64, sealable: bool) -> File {
    let flags = if sealable {
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING
    } else {
        MFdFlags::MFD_CLOEXEC
    };
    let file = File::from(memfd_create(name, flags).expect("memfd_create"));
    file.set_len(len).expect("size memfd");
    file
}

/// A scanout buffer as the frontend makes it: a memfd sealed against shrink and grow.
fn sealed_buffer(len: u64) -> File {
    let file = memfd(c"scanout", len, true);
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
    )
    .expect("seal scanout buffer");
    file
}

/// Plays the frontend against an executor running on its own thread.
struct Frontend {
    requests: Option<IpcSender<Vec<RendererRequest>>>,
    events: IpcReceiver<RendererEvent>,
    lane: Lane,
    done: crossbeam_channel::Receiver<Result<(), RendererError>>,
    seq: u64,
}

impl Frontend {
    fn start(config: DeviceConfig) -> Frontend {
        let (req_tx, req_rx) = ipc::channel::<Vec<RendererRequest>>().unwrap();
        let (ev_tx, ev_rx) = ipc::channel::<RendererEvent>().unwrap();
        let (ours, theirs) = Lane::pair().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            // Built on the executor's thread: the renderer stays on the thread it was
            // created on, as virgl will require.
            let sink = EventSink::new(ev_tx);
            let renderer = RutabagaRenderer::new(config.limits, sink.fence_callback()).unwrap();
            let executor = Executor::new(renderer, Lane::new(theirs), sink, &config);
            let _ = done_tx.send(executor.run(&req_rx));
        });
        Frontend {
            requests: Some(req_tx),
            events: ev_rx,
            lane: Lane::new(ours),
            done: done_rx,
            seq: 0,
        }
    }

    fn send(&mut self, op: RendererOp, fence: Option<FenceInfo>) -> u64 {
        self.push(op, fence, false)
    }

    /// Sends `op` quiet: a reply only if it is refused.
    fn send_quiet(&mut self, op: RendererOp) -> u64 {
        self.push(op, None, true)
    }

    fn push(&mut self, op: RendererOp, fence: Option<FenceInfo>, quiet: bool) -> u64 {
        self.seq += 1;
        let request = RendererRequest {
            seq: self.seq,
            op,
            fence,
            quiet,
        };
        self.requests
            .as_ref()
            .expect("request channel open")
            .send(vec![request])
            .expect("send request");
        self.seq
    }

    fn next_event(&self) -> RendererEvent {
        self.events
            .try_recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no event from the executor within {WAIT:?}: {e:?}"))
    }

    fn reply(&self, seq: u64) -> Result<ReplyBody, RenderError> {
        match self.next_event() {
            RendererEvent::Reply { seq: got, result } => {
                assert_eq!(got, seq, "replies come in request order");
                result
            }
            other => panic!("expected the reply to request {seq}, got {other:?}"),
        }
    }

    fn call(&mut self, op: RendererOp) -> Result<ReplyBody, RenderError> {
        let seq = self.send(op, None);
        self.reply(seq)
    }

    fn ok(&mut self, op: RendererOp) {
        let what = format!("{op:?}");
        assert_eq!(self.call(op), Ok(ReplyBody::Done), "{what}");
    }

    /// Guest memory: two adjacent regions of `REGION` bytes from `GUEST_BASE`, the first
    /// at a non-zero offset of its file. Returns the files, to play the guest.
    fn set_guest_memory(&mut self) -> (File, File) {
        let a = memfd(c"guest-a", REGION + 0x1000, false);
        let b = memfd(c"guest-b", REGION, false);
        let bytes: Vec<u8> = (0..2 * REGION).map(guest_byte).collect();
        a.write_all_at(&bytes[..REGION as usize], 0x1000).unwrap();
        b.write_all_at(&bytes[REGION as usize..], 0).unwrap();
        let fds = self.lane.send(&[b.as_fd(), a.as_fd()]).unwrap();
        self.ok(RendererOp::SetGuestMemory {
            regions: vec![
                GuestRegion {
                    guest_addr: GUEST_BASE + REGION,
                    size: REGION,
                    fd_offset: 0,
                },
                GuestRegion {
                    guest_addr: GUEST_BASE,
                    size: REGION,
                    fd_offset: 0x1000,
                },
            ],
            fds,
        });
        (a, b)
    }

    /// A `width` x `height` resource backed by guest memory from `backing_at` (relative
    /// to `GUEST_BASE`), in two entries.
    fn resource(&mut self, id: u32, width: u32, height: u32, backing_at: u64) {
        self.ok(RendererOp::CreateResource2d {
            resource_id: id,
            format: FORMAT,
            width,
            height,
        });
        let len = width * height * 4;
        let first = len / 3;
        self.ok(RendererOp::AttachBacking {
            resource_id: id,
            entries: vec![
                BackingEntry {
                    addr: GUEST_BASE + backing_at,
                    length: first,
                },
                BackingEntry {
                    addr: GUEST_BASE + backing_at + u64::from(first),
                    length: len - first,
                },
            ],
        });
    }

    fn bind_scanout(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        stride: u32,
        height: u32,
    ) -> File {
        let size = u64::from(stride) * u64::from(height);
        let buffer = sealed_buffer(size);
        let fds = self.lane.send(&[buffer.as_fd()]).unwrap();
        self.ok(RendererOp::SetScanoutBuffer {
            scanout_id,
            resource_id,
            size,
            stride,
            fds,
        });
        buffer
    }

    /// Closes the request channel and waits for the executor to return.
    fn finish(mut self) -> Result<(), RendererError> {
        drop(self.requests.take());
        self.done
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("executor did not stop within {WAIT:?}"))
    }
}

fn config() -> DeviceConfig {
    DeviceConfig {
        outputs: vec![
            OutputConfig {
                width: 640,
                height: 480,
            };
            2
        ],
        seccomp: false,
        ..DeviceConfig::with_limits(policy::limits::DEFAULT)
    }
}

fn read_file(file: &File, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    file.read_exact_at(&mut out, 0).unwrap();
    out
}

#[test]
fn guest_pixels_reach_the_scanout_buffer_exactly() {
    const W: u32 = 40;
    const H: u32 = 30;
    // Backing starts 0x3000 into guest memory, so it runs across the two regions.
    const AT: u64 = 0x3000;
    let mut fe = Frontend::start(config());
    let _guest = fe.set_guest_memory();
    fe.resource(7, W, H, AT);
    // The guest sends a damaged rect at its natural offset, as Linux does.
    let damaged = rect(3, 2, 20, 25);
    fe.ok(RendererOp::TransferToHost2d {
        resource_id: 7,
        rect: damaged,
        offset: u64::from(damaged.y * W * 4 + damaged.x * 4),
    });
    let stride = W * 4 + 24; // padded rows, as a frontend may choose
    let buffer = fe.bind_scanout(1, 7, stride, H);
    let flushed = rect(5, 4, 10, 12);
    fe.ok(RendererOp::FlushToScanout {
        scanout_id: 1,
        rect: flushed,
    });
    let got = read_file(&buffer, (stride * H) as usize);
    for y in 0..H {
        for x in 0..stride / 4 {
            let at = (y * stride + x * 4) as usize;
            let in_flush = (5..15).contains(&x) && (4..16).contains(&y);
            let want: Vec<u8> = if in_flush {
                (0..4)
                    .map(|c| guest_byte(AT + u64::from(y * W * 4 + x * 4 + c)))
                    .collect()
            } else {
                vec![0; 4]
            };
            assert_eq!(got[at..at + 4], want[..], "scanout pixel ({x},{y})");
        }
    }
    // A flush outside the resource or the buffer is refused, and changes nothing.
    for bad in [
        rect(0, 0, W + 1, 1),
        rect(0, H, 1, 1),
        rect(u32::MAX, 0, 2, 1),
    ] {
        let r = fe.call(RendererOp::FlushToScanout {
            scanout_id: 1,
            rect: bad,
        });
        assert!(
            matches!(r, Err(RenderError::InvalidParameter(_))),
            "{bad:?}: {r:?}"
        );
    }
    assert_eq!(read_file(&buffer, got.len()), got);
    fe.ok(RendererOp::DisableScanout { scanout_id: 1 });
    let r = fe.call(RendererOp::FlushToScanout {
        scanout_id: 1,
        rect: flushed,
    });
    assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");
    fe.finish().unwrap();
}

#[test]
fn a_quiet_request_is_answered_only_when_refused() {
    let mut fe = Frontend::start(config());
    let _guest = fe.set_guest_memory();
    fe.resource(7, 16, 16, 0);
    // Executed, not answered: the next event is the reply to the request after it.
    fe.send_quiet(RendererOp::TransferToHost2d {
        resource_id: 7,
        rect: rect(0, 0, 16, 16),
        offset: 0,
    });
    let refused = fe.send_quiet(RendererOp::TransferToHost2d {
        resource_id: 99,
        rect: rect(0, 0, 16, 16),
        offset: 0,
    });
    assert!(
        fe.reply(refused).is_err(),
        "a refused quiet request is answered with its error"
    );
    let loud = fe.send(RendererOp::DetachBacking { resource_id: 7 }, None);
    assert_eq!(fe.reply(loud), Ok(ReplyBody::Done));
    fe.finish().expect("clean exit");
}

#[test]
fn a_fenced_request_gets_its_reply_then_its_fence() {
    let mut fe = Frontend::start(config());
    let fence = |id| FenceInfo {
        fence_id: id,
        ctx_id: 0,
        ring_idx: 0,
    };
    let seq = fe.send(
        RendererOp::CreateResource2d {
            resource_id: 1,
            format: FORMAT,
            width: 4,
            height: 4,
        },
        Some(fence(10)),
    );
    assert_eq!(fe.reply(seq), Ok(ReplyBody::Done));
    match fe.next_event() {
        RendererEvent::FenceSignaled(f) => assert_eq!(f, fence(10)),
        other => panic!("expected fence 10, got {other:?}"),
    }
    // A refused request still answers first, then signals its fence.
    let seq = fe.send(RendererOp::Unref { resource_id: 99 }, Some(fence(11)));
    assert_eq!(fe.reply(seq), Err(RenderError::InvalidResource(99)));
    match fe.next_event() {
        RendererEvent::FenceSignaled(f) => assert_eq!(f, fence(11)),
        other => panic!("expected fence 11, got {other:?}"),
    }
    // Unfenced requests produce nothing but their reply.
    fe.ok(RendererOp::Unref { resource_id: 1 });
    assert!(fe.events.try_recv().is_err(), "no stray events");
    fe.finish().unwrap();
}

#[test]
fn cursor_is_the_clipped_top_left_64x64_zero_padded() {
    const W: u32 = 32;
    const H: u32 = 80;
    let mut fe = Frontend::start(config());
    let _guest = fe.set_guest_memory();
    fe.resource(3, W, H, 0);
    fe.ok(RendererOp::TransferToHost2d {
        resource_id: 3,
        rect: rect(0, 0, W, H),
        offset: 0,
    });
    let image = match fe.call(RendererOp::ReadCursor { resource_id: 3 }) {
        Ok(ReplyBody::CursorImage(image)) => image,
        other => panic!("expected a cursor image, got {other:?}"),
    };
    assert_eq!(image.len(), CURSOR_BYTES);
    assert_eq!(image.len(), 16384);
    for y in 0..64u32 {
        for x in 0..64u32 {
            let at = (y * 256 + x * 4) as usize;
            let want: Vec<u8> = if x < W {
                (0..4)
                    .map(|c| guest_byte(u64::from(y * W * 4 + x * 4 + c)))
                    .collect()
            } else {
                vec![0; 4]
            };
            assert_eq!(image[at..at + 4], want[..], "cursor pixel ({x},{y})");
        }
    }
    assert_eq!(
        fe.call(RendererOp::ReadCursor { resource_id: 4 }),
        Err(RenderError::InvalidResource(4))
    );
    fe.finish().unwrap();
}

#[test]
fn reset_drops_resources_scanouts_and_guest_memory() {
    let mut fe = Frontend::start(config());
    let _guest = fe.set_guest_memory();
    fe.resource(5, 8, 8, 0);
    let _buffer = fe.bind_scanout(0, 5, 32, 8);
    fe.ok(RendererOp::Reset);
    assert_eq!(
        fe.call(RendererOp::TransferToHost2d {
            resource_id: 5,
            rect: rect(0, 0, 8, 8),
            offset: 0,
        }),
        Err(RenderError::InvalidResource(5))
    );
    let r = fe.call(RendererOp::FlushToScanout {
        scanout_id: 0,
        rect: rect(0, 0, 1, 1),
    });
    assert!(r.is_err(), "scanout unbound by reset: {r:?}");
    // The id is free again, but there is no guest memory until the frontend resends it.
    fe.ok(RendererOp::CreateResource2d {
        resource_id: 5,
        format: FORMAT,
        width: 8,
        height: 8,
    });
    let r = fe.call(RendererOp::AttachBacking {
        resource_id: 5,
        entries: vec![BackingEntry {
            addr: GUEST_BASE,
            length: 256,
        }],
    });
    assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");
    fe.finish().unwrap();
}

#[test]
fn attached_resources_keep_their_memory_across_a_new_table() {
    let mut fe = Frontend::start(config());
    let (old_a, _old_b) = fe.set_guest_memory();
    fe.resource(1, 4, 1, 0);
    // The VMM replaces the table; the resource keeps the generation it was attached with.
    let _new = fe.set_guest_memory();
    old_a.write_all_at(&[9; 16], 0x1000).unwrap();
    fe.ok(RendererOp::TransferToHost2d {
        resource_id: 1,
        rect: rect(0, 0, 4, 1),
        offset: 0,
    });
    let buffer = fe.bind_scanout(0, 1, 16, 1);
    fe.ok(RendererOp::FlushToScanout {
        scanout_id: 0,
        rect: rect(0, 0, 4, 1),
    });
    assert_eq!(read_file(&buffer, 16), vec![9; 16]);
    fe.finish().unwrap();
}

#[test]
fn hostile_requests_are_refused_and_the_lane_stays_in_step() {
    let limits = Limits {
        max_resources: 3,
        max_resource_bytes: 64 * 64 * 4 * 2,
        max_dimension: 64,
        max_backing_entries: 8,
        ..policy::limits::DEFAULT
    };
    let mut fe = Frontend::start(DeviceConfig { limits, ..config() });
    let _guest = fe.set_guest_memory();
    fe.resource(1, 64, 64, 0);
    let invalid = |r: Result<ReplyBody, RenderError>| {
        assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
    };
    let create = |id, w, h| RendererOp::CreateResource2d {
        resource_id: id,
        format: FORMAT,
        width: w,
        height: h,
    };
    assert_eq!(
        fe.call(create(1, 4, 4)),
        Err(RenderError::InvalidResource(1))
    );
    invalid(fe.call(create(2, 65, 1)));
    invalid(fe.call(create(2, 4, 0)));
    fe.ok(create(2, 64, 64));
    let r = fe.call(create(3, 1, 1));
    assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}");
    // Backing outside guest memory, too long, or with too many entries.
    let attach = |entries| RendererOp::AttachBacking {
        resource_id: 2,
        entries,
    };
    invalid(fe.call(attach(vec![BackingEntry {
        addr: GUEST_BASE + 2 * REGION - 8,
        length: 16,
    }])));
    invalid(fe.call(attach(vec![BackingEntry {
        addr: u64::MAX - 8,
        length: 16,
    }])));
    invalid(fe.call(attach(vec![
        BackingEntry {
            addr: GUEST_BASE,
            length: u32::MAX,
        };
        2
    ])));
    invalid(fe.call(attach(vec![
        BackingEntry {
            addr: GUEST_BASE,
            length: 1,
        };
        9
    ])));
    // Transfers with overflowing or out-of-range offsets.
    invalid(fe.call(RendererOp::TransferToHost2d {
        resource_id: 1,
        rect: rect(0, 0, 64, 64),
        offset: u64::MAX - 100,
    }));
    invalid(fe.call(RendererOp::TransferToHost2d {
        resource_id: 1,
        rect: rect(60, 60, 8, 8),
        offset: 0,
    }));
    // Scanout buffers: unsealed, too small, bad scanout id, bad stride. Each still
    // consumes its fd from the lane, so the next good one lines up.
    let unsealed = memfd(c"unsealed", 64 * 64 * 4, true);
    let fds = fe.lane.send(&[unsealed.as_fd()]).unwrap();
    invalid(fe.call(RendererOp::SetScanoutBuffer {
        scanout_id: 0,
        resource_id: 1,
        size: 64 * 64 * 4,
        stride: 256,
        fds,
    }));
    for (scanout_id, size, stride, file_len) in [
        (0, 64 * 64 * 4, 256, 100),
        (9, 64 * 64 * 4, 256, 64 * 64 * 4),
        (0, 64 * 64 * 4, 252, 64 * 64 * 4),
        (0, 64 * 63 * 4, 256, 64 * 64 * 4),
    ] {
        let buffer = sealed_buffer(file_len);
        let fds = fe.lane.send(&[buffer.as_fd()]).unwrap();
        invalid(fe.call(RendererOp::SetScanoutBuffer {
            scanout_id,
            resource_id: 1,
            size,
            stride,
            fds,
        }));
    }
    let fds = fe.lane.send(&[]).unwrap();
    invalid(fe.call(RendererOp::SetScanoutBuffer {
        scanout_id: 0,
        resource_id: 1,
        size: 64 * 64 * 4,
        stride: 256,
        fds,
    }));
    let _ok = fe.bind_scanout(0, 1, 256, 64);
    // A guest memory table whose fd is shorter than the region.
    let short: OwnedFd = memfd(c"short", 0x1000, false).into();
    let fds = fe.lane.send(&[short.as_fd()]).unwrap();
    invalid(fe.call(RendererOp::SetGuestMemory {
        regions: vec![GuestRegion {
            guest_addr: 0,
            size: 0x2000,
            fd_offset: 0,
        }],
        fds,
    }));
    invalid(fe.call(RendererOp::DisableScanout { scanout_id: 2 }));
    fe.finish().unwrap();
}

#[test]
fn a_vanished_frontend_ends_the_loop_cleanly() {
    let mut fe = Frontend::start(config());
    // Dropping the events receiver first: the next reply cannot be delivered.
    let Frontend {
        requests,
        events,
        done,
        ..
    } = {
        fe.send(RendererOp::Reset, None);
        fe
    };
    drop(events);
    // Keep the request channel open: the loop must end because replies cannot be
    // delivered, not because the requests stopped.
    let requests = requests.unwrap();
    requests
        .send(vec![RendererRequest {
            seq: 99,
            op: RendererOp::Reset,
            fence: None,
            quiet: false,
        }])
        .unwrap();
    let result = done
        .recv_timeout(WAIT)
        .expect("executor stops when the frontend is gone");
    drop(requests);
    assert!(result.is_ok(), "{result:?}");
}

// --- cross-domain contexts, blobs and the map / unmap / finalize steps ---------------

const CTX: u32 = 1;
const RING: u32 = 50;
/// The query ring's guest address (relative to `GUEST_BASE`): file A, offset 0x3000.
const RING_AT: u64 = 0x2000;
const MAPPABLE: u32 = 1;
const BLOB_MEM_GUEST: u32 = 1;
const BLOB_MEM_HOST3D: u32 = 2;

/// A shared mapping of an exported blob, as the VMM makes it.
struct VmmMapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl VmmMapping {
    fn new(fd: &OwnedFd, len: usize) -> VmmMapping {
        // SAFETY: a fresh mapping at an address of the kernel's choosing aliases nothing;
        // it is unmapped once, in Drop.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .expect("the exported blob fd can be mmapped");
        VmmMapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr..ptr+len` is a live read-write mapping owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for VmmMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped only here.
        unsafe { munmap(self.ptr.cast(), self.len) }.unwrap();
    }
}

impl Frontend {
    fn submit(&mut self, commands: Vec<u8>) -> Result<ReplyBody, RenderError> {
        self.call(RendererOp::Submit3d {
            ctx_id: CTX,
            ring_idx: 0,
            commands,
        })
    }

    /// A cross-domain context with an initialised query ring at `RING_AT`.
    fn cross_domain_context(&mut self) {
        self.ok(RendererOp::CreateContext {
            ctx_id: CTX,
            context_init: cross_domain::CAPSET_CROSS_DOMAIN,
            name: b"sommelier \xff\xfe".to_vec(),
        });
        self.ok(RendererOp::CreateBlob {
            ctx_id: CTX,
            resource_id: RING,
            blob_mem: BLOB_MEM_GUEST,
            blob_flags: 0,
            blob_id: 0,
            size: 0x1000,
            entries: vec![BackingEntry {
                addr: GUEST_BASE + RING_AT,
                length: 0x1000,
            }],
        });
        self.ok(RendererOp::AttachResource {
            ctx_id: CTX,
            resource_id: RING,
        });
        assert_eq!(self.submit(cross_domain::init(RING)), Ok(ReplyBody::Done));
    }

    /// GET_IMAGE_REQUIREMENTS through SUBMIT_3D; the answer read from the guest's ring.
    fn image_requirements(
        &mut self,
        ring: &File,
        w: u32,
        h: u32,
    ) -> cross_domain::ImageRequirements {
        let commands =
            cross_domain::get_image_requirements(w, h, cross_domain::DRM_FORMAT_XRGB8888, 0);
        assert_eq!(self.submit(commands), Ok(ReplyBody::Done));
        let mut answer = [0u8; cross_domain::IMAGE_REQUIREMENTS_SIZE];
        ring.read_exact_at(&mut answer, 0x1000 + RING_AT).unwrap();
        cross_domain::ImageRequirements::parse(&answer).unwrap()
    }

    fn host_blob(
        &mut self,
        resource_id: u32,
        blob_id: u32,
        size: u64,
        flags: u32,
    ) -> Result<ReplyBody, RenderError> {
        self.call(RendererOp::CreateBlob {
            ctx_id: CTX,
            resource_id,
            blob_mem: BLOB_MEM_HOST3D,
            blob_flags: flags,
            blob_id: u64::from(blob_id),
            size,
            entries: Vec::new(),
        })
    }

    /// Map: the reply, and the fd it put on the lane.
    fn map(&mut self, resource_id: u32) -> (u64, u32, OwnedFd) {
        match self.call(RendererOp::Map { resource_id }) {
            Ok(ReplyBody::MapReady {
                resource_id: got,
                size,
                map_info,
                fds,
            }) => {
                assert_eq!(got, resource_id);
                let mut fds = self.lane.recv(fds).unwrap();
                assert_eq!(fds.len(), 1);
                (size, map_info, fds.remove(0))
            }
            other => panic!("expected MapReady for {resource_id}, got {other:?}"),
        }
    }
}

#[test]
fn cross_domain_blob_maps_unmaps_and_finalizes() {
    let mut fe = Frontend::start(config());
    let (guest_a, _b) = fe.set_guest_memory();
    fe.cross_domain_context();
    let reqs = fe.image_requirements(&guest_a, 64, 32);
    assert_eq!(reqs.strides[0], 256);
    assert_eq!(reqs.size, 64 * 32 * 4);
    assert_eq!(reqs.map_info, 1, "VIRTIO_GPU_MAP_CACHE_CACHED");
    assert_ne!(reqs.blob_id, 0);

    // A fenced HOST3D blob creation: reply first, then the context's fence.
    let fence = FenceInfo {
        fence_id: 5,
        ctx_id: CTX,
        ring_idx: 0,
    };
    let seq = fe.send(
        RendererOp::CreateBlob {
            ctx_id: CTX,
            resource_id: 60,
            blob_mem: BLOB_MEM_HOST3D,
            blob_flags: MAPPABLE,
            blob_id: u64::from(reqs.blob_id),
            size: reqs.size,
            entries: Vec::new(),
        },
        Some(fence),
    );
    assert_eq!(fe.reply(seq), Ok(ReplyBody::Done));
    match fe.next_event() {
        RendererEvent::FenceSignaled(f) => assert_eq!(f, fence),
        other => panic!("expected the context fence, got {other:?}"),
    }

    let (size, map_info, fd) = fe.map(60);
    assert_eq!((size, map_info), (reqs.size, 1));
    let stat = fstat(&fd).unwrap();
    assert!(stat.st_size as u64 >= size);
    let mut window = VmmMapping::new(&fd, size as usize);
    assert!(
        window.bytes().iter().all(|&b| b == 0),
        "a new blob reads as zeros"
    );
    let pattern: Vec<u8> = (0..size).map(|i| (i % 241) as u8).collect();
    window.bytes().copy_from_slice(&pattern);

    // Out of order and repeated steps are refused, never a panic.
    let wrong_state = Err(RenderError::InvalidResource(60));
    assert_eq!(fe.call(RendererOp::Map { resource_id: 60 }), wrong_state);
    assert_eq!(
        fe.call(RendererOp::Finalize { resource_id: 60 }),
        wrong_state
    );
    assert_eq!(
        fe.call(RendererOp::Unmap { resource_id: 60 }),
        Ok(ReplyBody::UnmapAck { resource_id: 60 })
    );
    assert_eq!(fe.call(RendererOp::Unmap { resource_id: 60 }), wrong_state);
    assert_eq!(fe.call(RendererOp::Map { resource_id: 60 }), wrong_state);
    assert_eq!(
        fe.call(RendererOp::Finalize { resource_id: 60 }),
        Ok(ReplyBody::FinalizeAck { resource_id: 60 })
    );
    assert_eq!(
        fe.call(RendererOp::Finalize { resource_id: 60 }),
        wrong_state
    );
    assert_eq!(fe.call(RendererOp::Unmap { resource_id: 60 }), wrong_state);
    drop(window);

    // Mapped again: the same memory, holding what was written through the first window.
    let (_, _, again) = fe.map(60);
    assert_eq!(fstat(&again).unwrap().st_ino, stat.st_ino);
    let mut window = VmmMapping::new(&again, size as usize);
    assert_eq!(window.bytes(), &pattern[..]);

    // Unref of a mapped blob is allowed (the frontend has unmapped it by then); the VMM's
    // mapping stays valid until it goes.
    fe.ok(RendererOp::Unref { resource_id: 60 });
    window.bytes()[0] = 1;
    assert_eq!(
        fe.call(RendererOp::Unmap { resource_id: 60 }),
        Err(RenderError::InvalidResource(60))
    );
    fe.finish().unwrap();
}

#[test]
fn maps_of_blobs_that_cannot_be_mapped_are_refused() {
    let mut fe = Frontend::start(config());
    let (guest_a, _b) = fe.set_guest_memory();
    fe.cross_domain_context();
    let reqs = fe.image_requirements(&guest_a, 16, 16);
    assert_eq!(
        fe.host_blob(61, reqs.blob_id, reqs.size, 0),
        Ok(ReplyBody::Done)
    );
    let invalid = |r: Result<ReplyBody, RenderError>| {
        assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
    };
    invalid(fe.call(RendererOp::Map { resource_id: 61 }));
    invalid(fe.call(RendererOp::Map { resource_id: RING }));
    fe.ok(RendererOp::CreateResource2d {
        resource_id: 62,
        format: FORMAT,
        width: 4,
        height: 4,
    });
    invalid(fe.call(RendererOp::Map { resource_id: 62 }));
    invalid(fe.call(RendererOp::Unmap { resource_id: 62 }));
    for op in [
        RendererOp::Map { resource_id: 99 },
        RendererOp::Unmap { resource_id: 99 },
        RendererOp::Finalize { resource_id: 99 },
    ] {
        assert_eq!(fe.call(op), Err(RenderError::InvalidResource(99)));
    }
    // A refused Map leaves nothing on the lane: the next good one lines up.
    assert_eq!(
        fe.host_blob(63, reqs.blob_id, reqs.size, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    let (size, _, _fd) = fe.map(63);
    assert_eq!(size, reqs.size);
    // Blob creation errors: unknown blob_id, wrong size, unknown context, no context.
    invalid(fe.host_blob(64, 12345, reqs.size, MAPPABLE));
    assert!(fe
        .host_blob(64, reqs.blob_id, reqs.size * 2, MAPPABLE)
        .is_err());
    invalid(fe.call(RendererOp::CreateBlob {
        ctx_id: 0,
        resource_id: 64,
        blob_mem: BLOB_MEM_HOST3D,
        blob_flags: MAPPABLE,
        blob_id: u64::from(reqs.blob_id),
        size: reqs.size,
        entries: Vec::new(),
    }));
    // The id is still free after every refusal.
    assert_eq!(
        fe.host_blob(64, reqs.blob_id, reqs.size, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    assert_eq!(
        fe.host_blob(64, reqs.blob_id, reqs.size, MAPPABLE),
        Err(RenderError::InvalidResource(64))
    );
    // A guest blob outside guest memory, or whose entries do not add up to its size.
    for (addr, length, size) in [
        (GUEST_BASE + 2 * REGION, 0x1000, 0x1000),
        (GUEST_BASE, 0x800, 0x1000),
    ] {
        invalid(fe.call(RendererOp::CreateBlob {
            ctx_id: 0,
            resource_id: 65,
            blob_mem: BLOB_MEM_GUEST,
            blob_flags: 0,
            blob_id: 0,
            size,
            entries: vec![BackingEntry { addr, length }],
        }));
    }
    // Hostile command streams.
    invalid(fe.submit(vec![3, 0, 0, 0, 0, 0, 0, 0]));
    invalid(fe.submit(cross_domain::init_with_channel(RING, RING, 1)));
    fe.finish().unwrap();
}

#[test]
fn blob_bytes_count_against_the_limits() {
    let limits = Limits {
        max_resources: 4,
        max_resource_bytes: 3 * 4096,
        ..policy::limits::DEFAULT
    };
    let mut fe = Frontend::start(DeviceConfig { limits, ..config() });
    let (guest_a, _b) = fe.set_guest_memory();
    fe.cross_domain_context();
    let reqs = fe.image_requirements(&guest_a, 32, 32);
    assert_eq!(reqs.size, 4096);
    // The guest ring costs no host bytes; two 4 KiB blobs fit, with room for one more...
    assert_eq!(
        fe.host_blob(1, reqs.blob_id, 4096, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    assert_eq!(
        fe.host_blob(2, reqs.blob_id, 4096, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    let big = fe.image_requirements(&guest_a, 64, 32);
    let r = fe.host_blob(3, big.blob_id, big.size, MAPPABLE);
    assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}");
    assert_eq!(
        fe.host_blob(3, reqs.blob_id, 4096, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    // ...and the count limit holds for blobs too.
    fe.ok(RendererOp::Unref { resource_id: 1 });
    fe.ok(RendererOp::CreateResource2d {
        resource_id: 1,
        format: FORMAT,
        width: 1,
        height: 1,
    });
    let r = fe.host_blob(9, reqs.blob_id, 4096, MAPPABLE);
    assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}");
    fe.finish().unwrap();
}

#[test]
fn capsets_come_from_rutabaga() {
    let mut fe = Frontend::start(config());
    assert_eq!(NUM_CAPSETS, 1);
    assert_eq!(
        fe.call(RendererOp::GetCapsetInfo { index: 0 }),
        Ok(ReplyBody::CapsetInfo {
            capset_id: cross_domain::CAPSET_CROSS_DOMAIN,
            max_version: 0,
            max_size: cross_domain::CAPABILITIES_SIZE as u32,
        })
    );
    let r = fe.call(RendererOp::GetCapsetInfo { index: NUM_CAPSETS });
    assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");
    match fe.call(RendererOp::GetCapset {
        capset_id: cross_domain::CAPSET_CROSS_DOMAIN,
        version: 0,
    }) {
        Ok(ReplyBody::Capset(bytes)) => {
            let caps = cross_domain::Capabilities::parse(&bytes).unwrap();
            assert_eq!(
                caps,
                cross_domain::Capabilities {
                    version: 1,
                    supported_channels: 0,
                    supports_dmabuf: 0,
                    supports_external_gpu_memory: 0,
                }
            );
        }
        other => panic!("expected the cross-domain capset, got {other:?}"),
    }
    for (capset_id, version) in [(1, 0), (5, 1), (0, 0)] {
        let r = fe.call(RendererOp::GetCapset { capset_id, version });
        assert!(
            matches!(r, Err(RenderError::InvalidParameter(_))),
            "{capset_id} v{version}: {r:?}"
        );
    }
    fe.finish().unwrap();
}

#[test]
fn reset_destroys_contexts_and_blobs() {
    let mut fe = Frontend::start(config());
    let (guest_a, _b) = fe.set_guest_memory();
    fe.cross_domain_context();
    let reqs = fe.image_requirements(&guest_a, 16, 16);
    assert_eq!(
        fe.host_blob(70, reqs.blob_id, reqs.size, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    let (_, _, _fd) = fe.map(70);
    fe.ok(RendererOp::Reset);
    assert!(fe.submit(cross_domain::poll()).is_err(), "context gone");
    assert_eq!(
        fe.call(RendererOp::Unmap { resource_id: 70 }),
        Err(RenderError::InvalidResource(70))
    );
    assert_eq!(
        fe.call(RendererOp::AttachResource {
            ctx_id: CTX,
            resource_id: RING
        }),
        Err(RenderError::InvalidResource(RING))
    );
    // Everything can be made again under the same ids (guest memory is resent first).
    let (guest_a, _b) = fe.set_guest_memory();
    fe.cross_domain_context();
    let reqs = fe.image_requirements(&guest_a, 16, 16);
    assert_eq!(
        fe.host_blob(70, reqs.blob_id, reqs.size, MAPPABLE),
        Ok(ReplyBody::Done)
    );
    fe.ok(RendererOp::DetachResource {
        ctx_id: CTX,
        resource_id: RING,
    });
    fe.ok(RendererOp::DestroyContext { ctx_id: CTX });
    let r = fe.call(RendererOp::DestroyContext { ctx_id: CTX });
    assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");
    fe.finish().unwrap();
}

/// A blob scanout (SET_SCANOUT_BLOB) bound with this layout, its packed buffer returned.
fn bind_blob_scanout(
    fe: &mut Frontend,
    scanout_id: u32,
    resource_id: u32,
    layout: BlobScanout,
) -> Result<File, RenderError> {
    let size = u64::from(layout.width) * 4 * u64::from(layout.height);
    let buffer = sealed_buffer(size.max(1));
    let fds = fe.lane.send(&[buffer.as_fd()]).unwrap();
    fe.call(RendererOp::SetScanoutBlobBuffer {
        scanout_id,
        resource_id,
        layout,
        size,
        fds,
    })
    .map(|body| {
        assert_eq!(body, ReplyBody::Done);
        buffer
    })
}

#[test]
fn blob_scanout_flush_copies_rows_with_the_blob_layout() {
    // A guest blob of 0x4000 bytes from 0x2000 into guest memory: it runs across the two
    // regions. The framebuffer starts 0x1f00 into it with padded rows, so its rows cross
    // the region boundary too.
    const AT: u64 = 0x2000;
    const SIZE: u64 = 0x4000;
    const W: u32 = 20;
    const H: u32 = 10;
    let layout = BlobScanout {
        offset: 0x1f00,
        stride: W * 4 + 44,
        width: W,
        height: H,
    };
    let mut fe = Frontend::start(config());
    let (guest_a, _guest_b) = fe.set_guest_memory();
    fe.ok(RendererOp::CreateBlob {
        ctx_id: 0,
        resource_id: 5,
        blob_mem: BLOB_MEM_GUEST,
        blob_flags: 0,
        blob_id: 0,
        size: SIZE,
        entries: vec![
            BackingEntry {
                addr: GUEST_BASE + AT,
                length: 0x1000,
            },
            BackingEntry {
                addr: GUEST_BASE + AT + 0x1000,
                length: (SIZE - 0x1000) as u32,
            },
        ],
    });
    let buffer = bind_blob_scanout(&mut fe, 1, 5, layout).unwrap();
    let blob_byte = |x: u32, y: u32, c: u32| {
        guest_byte(AT + layout.offset + u64::from(y * layout.stride + x * 4 + c))
    };
    let flushed = rect(3, 2, 12, 7);
    fe.ok(RendererOp::FlushToScanout {
        scanout_id: 1,
        rect: flushed,
    });
    let got = read_file(&buffer, (W * 4 * H) as usize);
    for y in 0..H {
        for x in 0..W {
            let at = ((y * W + x) * 4) as usize;
            let in_flush = (3..15).contains(&x) && (2..9).contains(&y);
            let want: Vec<u8> = if in_flush {
                (0..4).map(|c| blob_byte(x, y, c)).collect()
            } else {
                vec![0; 4]
            };
            assert_eq!(got[at..at + 4], want[..], "blob scanout pixel ({x},{y})");
        }
    }
    // The guest writes pixel (0, 0) of the framebuffer (it lives in region a, whose file
    // holds guest memory from offset 0x1000): a flush of just that pixel shows it, and
    // nothing else changes.
    let first_pixel = 0x1000 + AT + layout.offset;
    guest_a
        .write_all_at(&[0xde, 0xad, 0xbe, 0xef], first_pixel)
        .unwrap();
    fe.ok(RendererOp::FlushToScanout {
        scanout_id: 1,
        rect: rect(0, 0, 1, 1),
    });
    let mut want = got.clone();
    want[..4].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(read_file(&buffer, want.len()), want);

    // Flushes outside the framebuffer are refused and change nothing.
    for bad in [
        rect(0, 0, W + 1, 1),
        rect(0, H, 1, 1),
        rect(u32::MAX, 0, 2, 1),
    ] {
        let r = fe.call(RendererOp::FlushToScanout {
            scanout_id: 1,
            rect: bad,
        });
        assert!(
            matches!(r, Err(RenderError::InvalidParameter(_))),
            "{bad:?}: {r:?}"
        );
    }
    // A layout reaching past the blob binds (the renderer cannot size a guest blob before
    // reading it) but its flushes are refused before any byte is written.
    let beyond = BlobScanout {
        offset: SIZE - 100,
        ..layout
    };
    let far = bind_blob_scanout(&mut fe, 0, 5, beyond).unwrap();
    let r = fe.call(RendererOp::FlushToScanout {
        scanout_id: 0,
        rect: rect(0, 0, W, H),
    });
    assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");
    assert_eq!(
        read_file(&far, (W * 4 * H) as usize),
        vec![0; (W * 4 * H) as usize]
    );
    let huge = BlobScanout {
        offset: u64::MAX - 8,
        ..layout
    };
    let _huge = bind_blob_scanout(&mut fe, 0, 5, huge).unwrap();
    let r = fe.call(RendererOp::FlushToScanout {
        scanout_id: 0,
        rect: rect(0, 0, W, H),
    });
    assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");

    // Malformed bindings: each still takes its fd off the lane.
    let invalid = |r: Result<File, RenderError>| {
        assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}")
    };
    fe.resource(7, 4, 4, 0);
    invalid(bind_blob_scanout(&mut fe, 0, 7, layout)); // a 2D resource
    invalid(bind_blob_scanout(
        &mut fe,
        0,
        5,
        BlobScanout {
            stride: W * 4 - 1,
            ..layout
        },
    ));
    invalid(bind_blob_scanout(
        &mut fe,
        0,
        5,
        BlobScanout { width: 0, ..layout },
    ));
    invalid(bind_blob_scanout(
        &mut fe,
        0,
        5,
        BlobScanout {
            width: 1 << 30,
            stride: u32::MAX,
            ..layout
        },
    ));
    invalid(bind_blob_scanout(&mut fe, 9, 5, layout)); // no such scanout
    assert_eq!(
        bind_blob_scanout(&mut fe, 0, 99, layout).err(),
        Some(RenderError::InvalidResource(99))
    );
    // The scanout still works; once the blob is gone its flushes fail cleanly.
    fe.ok(RendererOp::FlushToScanout {
        scanout_id: 1,
        rect: rect(0, 0, W, H),
    });
    fe.ok(RendererOp::Unref { resource_id: 5 });
    let r = fe.call(RendererOp::FlushToScanout {
        scanout_id: 1,
        rect: rect(0, 0, 1, 1),
    });
    assert_eq!(r, Err(RenderError::InvalidResource(5)));
    fe.finish().unwrap();
}

/// The per-VM limits hold in the renderer even when the frontend lets everything through
/// (a frontend bug, or a compromised one): contexts, SUBMIT_3D size and mappings, each
/// ERR_OUT_OF_MEMORY beyond its limit, and room again once freed.
#[test]
fn the_renderer_enforces_the_limits_on_its_own() {
    let limits = Limits {
        max_contexts: 2,
        max_submit_bytes: 4096,
        max_mappings: 2,
        ..policy::limits::DEFAULT
    };
    let mut fe = Frontend::start(DeviceConfig { limits, ..config() });
    let (guest_a, _b) = fe.set_guest_memory();
    fe.cross_domain_context();
    let oom = |r: Result<ReplyBody, RenderError>| {
        assert!(matches!(r, Err(RenderError::OutOfMemory(_))), "{r:?}")
    };
    let create = |ctx_id| RendererOp::CreateContext {
        ctx_id,
        context_init: cross_domain::CAPSET_CROSS_DOMAIN,
        name: Vec::new(),
    };

    // Contexts: CTX and one more; a third is refused until one is destroyed.
    fe.ok(create(2));
    oom(fe.call(create(3)));
    fe.ok(RendererOp::DestroyContext { ctx_id: 2 });
    fe.ok(create(3));
    oom(fe.call(create(4)));

    // SUBMIT_3D: 256 POLLs are exactly 4 KiB, one more is refused before rutabaga sees it.
    let polls = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| cross_domain::poll()).collect() };
    assert_eq!(fe.submit(polls(256)), Ok(ReplyBody::Done));
    oom(fe.submit(polls(257)));

    // Mappings: two exports at once; Finalize (not Unmap) gives the slot back.
    let reqs = fe.image_requirements(&guest_a, 16, 16);
    for id in [61, 62, 63] {
        assert_eq!(
            fe.host_blob(id, reqs.blob_id, reqs.size, MAPPABLE),
            Ok(ReplyBody::Done)
        );
    }
    let (_, _, fd61) = fe.map(61);
    let (_, _, _fd62) = fe.map(62);
    oom(fe.call(RendererOp::Map { resource_id: 63 }));
    assert_eq!(
        fe.call(RendererOp::Unmap { resource_id: 61 }),
        Ok(ReplyBody::UnmapAck { resource_id: 61 })
    );
    oom(fe.call(RendererOp::Map { resource_id: 63 }));
    assert_eq!(
        fe.call(RendererOp::Finalize { resource_id: 61 }),
        Ok(ReplyBody::FinalizeAck { resource_id: 61 })
    );
    drop(fd61);
    let (size, _, fd63) = fe.map(63);
    assert_eq!(size, reqs.size);
    // The refused map put nothing on the lane: the one that followed got its own fd.
    assert!(fstat(&fd63).unwrap().st_size as u64 >= size);
    // Unref of an exported blob frees its slot as well.
    fe.ok(RendererOp::Unref { resource_id: 62 });
    let (_, _, _fd61) = fe.map(61);

    // A reset forgets every context and export.
    fe.ok(RendererOp::Reset);
    let _guest = fe.set_guest_memory();
    fe.ok(create(1));
    fe.ok(create(2));
    fe.finish().unwrap();
}
