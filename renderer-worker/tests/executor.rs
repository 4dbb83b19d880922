//! The executor driven the way the frontend drives it: real ipc-channel channels, a real
//! descriptor lane, real memfds for guest memory and scanout buffers, real rutabaga 2D.
//! The executor runs on its own thread here; multi-process runs are the integration
//! tests' job.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::thread;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use protocol::config::{DeviceConfig, Limits, OutputConfig};
use protocol::ipc::{
    BackingEntry, FenceInfo, GuestRegion, RenderError, RendererEvent, RendererOp, RendererRequest,
    ReplyBody,
};
use protocol::lane::Lane;
use protocol::virtio_gpu::Rect;
use vgpu_renderer_worker::{EventSink, Executor, RendererError, Rutabaga2d, CURSOR_BYTES};

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
    requests: Option<IpcSender<RendererRequest>>,
    events: IpcReceiver<RendererEvent>,
    lane: Lane,
    done: crossbeam_channel::Receiver<Result<(), RendererError>>,
    seq: u64,
}

impl Frontend {
    fn start(config: DeviceConfig) -> Frontend {
        let (req_tx, req_rx) = ipc::channel::<RendererRequest>().unwrap();
        let (ev_tx, ev_rx) = ipc::channel::<RendererEvent>().unwrap();
        let (ours, theirs) = Lane::pair().unwrap();
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            // Built on the executor's thread: the renderer stays on the thread it was
            // created on, as virgl will require.
            let sink = EventSink::new(ev_tx);
            let renderer = Rutabaga2d::new(config.limits, sink.fence_callback()).unwrap();
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
        self.seq += 1;
        let request = RendererRequest {
            seq: self.seq,
            op,
            fence,
        };
        self.requests
            .as_ref()
            .expect("request channel open")
            .send(request)
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
        ..DeviceConfig::default()
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
        .send(RendererRequest {
            seq: 99,
            op: RendererOp::Reset,
            fence: None,
        })
        .unwrap();
    let result = done
        .recv_timeout(WAIT)
        .expect("executor stops when the frontend is gone");
    drop(requests);
    assert!(result.is_ok(), "{result:?}");
}
