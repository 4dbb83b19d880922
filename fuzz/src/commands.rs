//! The `commands` target: random sequences of virtio-gpu commands, valid-ish and invalid,
//! through the device-frontend's real control actor (virtqueue popping, decoding,
//! execution, resource table, scanouts, responses) and the renderer-worker's real executor
//! with rutabaga 2D and cross-domain, in one process.
//!
//! The seam: [`Control`] is built on a [`RendererLink`] over in-process ipc-channel
//! channels and a descriptor-lane socketpair, exactly as in the frontend process; the
//! renderer's [`Executor`] sits on the other ends, as in the renderer process. This
//! harness plays the two event loops by hand on one thread (it moves each request to the
//! executor, then hands the executor's events back to the actor), so a run is
//! deterministic. The guest is a memfd of guest RAM holding two split virtqueues that the
//! harness drives as a driver would; the VMM's display socket, when a run asks for it, is
//! the test VMM's display peer (`vgpu_tests::display`), and its backend request channel,
//! when a run asks for one, is the test VMM's SHMEM_MAP/UNMAP server over a real hostmem
//! window (`vgpu_tests::backend_req`), whose server thread answers the frontend's
//! requests; both report protocol violations. That thread answers asynchronously: the
//! harness waits for its acks only where a command is suspended on them, so a run with the
//! backend channel is deterministic except for when an ack nobody waits for is taken in.
//! Not covered: the vhost-user socket itself (the VMM side of the rings is set up
//! directly), the processes' sandboxes, and virgl.
//!
//! Rules checked after every step:
//! - nothing panics, and neither side reports a broken link;
//! - once a queue has been kicked and the actor and renderer are idle, every chain the
//!   driver made available on it has been answered, in the order it was queued;
//! - every answer fits its writable buffers, is a VIRTIO_GPU_RESP_OK_* or _ERR_* header
//!   (whole whenever there is room for one), and carries the request's fence exactly when
//!   a readable request asked for one;
//! - the display peer and the VMM's request server saw no protocol violation (nothing
//!   unmapped that was not mapped, no overlap, nothing outside the window, ...).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Result as ArbResult, Unstructured};
use device_frontend::backend_channel::BackendChannel;
use device_frontend::control::{Control, GuestMem, Input, CONTROL_QUEUE, CURSOR_QUEUE};
use device_frontend::renderer_link::RendererLink;
use device_frontend::vmm_requests::{VmmRequests, HOSTMEM_SHMID};
use ipc_channel::ipc::{self, IpcReceiver};
use nix::sys::eventfd::{EfdFlags, EventFd};
use protocol::config::{DeviceConfig, Limits, OutputConfig};
use protocol::ipc::{BackingEntry, RendererBatch, RendererEvent};
use protocol::lane::Lane;
use protocol::virtio_gpu::{
    BlobMem, Command, CtrlHeader, CursorPos, Format, Rect, Request, CTRL_HDR_SIZE,
    VIRTIO_GPU_CAPSET_CROSS_DOMAIN, VIRTIO_GPU_FLAG_FENCE, VIRTIO_GPU_FLAG_INFO_RING_IDX,
    VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER, VIRTIO_GPU_RESP_ERR_UNSPEC, VIRTIO_GPU_RESP_OK_MAP_INFO,
    VIRTIO_GPU_RESP_OK_NODATA,
};
use renderer_worker::{EventSink, Executor, Renderer, RutabagaRenderer, NUM_CAPSETS};
use vgpu_tests::backend_req::{AckAction, BackendEvent, BackendRequests, RequestKind, ACK_EINVAL};
use vgpu_tests::cross_domain;
use vgpu_tests::display::{DisplayConfig, DisplayPeer};
use vgpu_tests::hostmem::HostmemWindow;
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};

/// Guest physical address of guest RAM.
pub const GUEST_BASE: u64 = 0x4000_0000;
/// Bytes of guest RAM.
pub const GUEST_SIZE: u64 = 4 << 20;
/// Descriptors per virtqueue.
const QUEUE_SIZE: u16 = 256;
/// Where each queue's descriptor table, available ring and used ring live.
const QUEUE_AT: [u64; 2] = [GUEST_BASE, GUEST_BASE + 0x4000];
const AVAIL_OFFSET: u64 = 0x1000;
const USED_OFFSET: u64 = 0x2000;
/// Request and response buffers are carved from here.
const BUF_START: u64 = GUEST_BASE + 0x1_0000;
const BUF_END: u64 = GUEST_BASE + 0x9_0000;
/// Guest pages for backings: what ATTACH_BACKING and guest blobs usually point at.
pub const DATA_START: u64 = GUEST_BASE + 0x10_0000;
/// Bytes of the data area.
pub const DATA_LEN: u64 = GUEST_SIZE - 0x10_0000;
/// Room for any response the device can write (the largest, EDID, is 1056 bytes).
const FULL_RESPONSE: u32 = 4096;
/// Steps played per input: bounds a run's time.
const MAX_STEPS: usize = 160;
/// Size of the host-visible window (config `hostmem`).
const HOSTMEM: u64 = 64 << 20;
/// How long a command may wait for the VMM before the run counts as hung.
const VMM_PATIENCE: Duration = Duration::from_secs(5);
/// The resource id [`Step::MappableBlob`] uses for its query ring.
pub const QUERY_RING_ID: u32 = 7;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

// ---------------------------------------------------------------------------------------
// The input.

/// A resource id: mostly one of a handful, so that commands meet the resources earlier
/// commands made; sometimes 0 or anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Id(pub u32);

impl<'a> Arbitrary<'a> for Id {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        let tag: u8 = u.arbitrary()?;
        Ok(Id(match tag {
            0..=239 => u32::from(tag % 6) + 1,
            240..=247 => 0,
            _ => u.arbitrary()?,
        }))
    }
}

/// A width or height: mostly small, sometimes at or past the limits, sometimes anything.
#[derive(Clone, Copy, Debug)]
pub struct Dim(pub u32);

impl<'a> Arbitrary<'a> for Dim {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        const EDGES: [u32; 10] = [0, 1, 64, 4095, 4096, 16383, 16384, 16385, 1 << 31, u32::MAX];
        let tag: u8 = u.arbitrary()?;
        Ok(Dim(match tag {
            0..=199 => u32::from(tag % 64) + 1,
            200..=229 => u32::from(u.arbitrary::<u16>()?),
            230..=239 => EDGES[usize::from(tag - 230)],
            _ => u.arbitrary()?,
        }))
    }
}

/// A scanout id: mostly a configured one, sometimes beyond the configured count or the
/// protocol's 16.
#[derive(Clone, Copy, Debug)]
pub struct Scanout(pub u32);

impl<'a> Arbitrary<'a> for Scanout {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        let tag: u8 = u.arbitrary()?;
        Ok(Scanout(match tag {
            0..=199 => u32::from(tag % 3),
            200..=249 => u32::from(tag - 200) % 20,
            _ => u.arbitrary()?,
        }))
    }
}

/// A rectangle, resolved against the size the resource was created with (as far as this
/// harness knows it).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum RectSpec {
    /// The whole resource.
    Full,
    /// Some rectangle inside it.
    Inside(u16, u16, u16, u16),
    /// Just past its right or bottom edge.
    Past(bool),
    /// Anything.
    Any(u32, u32, u32, u32),
}

/// A byte offset into a resource's backing (TRANSFER_TO_HOST_2D).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum OffsetSpec {
    /// 0.
    Zero,
    /// The start of a row.
    Row(u8),
    /// Small.
    Small(u16),
    /// Anything.
    Any(u64),
}

/// A guest memory entry.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum EntrySpec {
    /// Exactly the bytes the resource needs, in the data area.
    Covering(u8),
    /// Somewhere in the data area.
    Data(u32, u32),
    /// Over the virtqueues and request buffers (a guest may do that).
    Rings(u16, u16),
    /// Straddling the end of guest RAM.
    End(u16, u16),
    /// Anything.
    Any(u64, u32),
}

/// A blob's size.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum SizeSpec {
    /// The size the last cross-domain image query answered.
    Queried,
    /// Whole pages.
    Pages(u8),
    /// Anything.
    Any(u64),
}

/// A blob id.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum BlobIdSpec {
    /// The id the last cross-domain image query answered.
    Queried,
    /// Anything.
    Any(u64),
}

/// A cross-domain command stream for SUBMIT_3D.
#[derive(Arbitrary, Clone, Debug)]
pub enum Submit {
    /// INIT with this resource as the query ring.
    Init(Id),
    /// GET_IMAGE_REQUIREMENTS.
    ImageRequirements(Dim, Dim, bool),
    /// POLL.
    Poll,
    /// Anything.
    Bytes(Vec<u8>),
}

/// One command, in terms the harness resolves into a [`Command`] (or raw bytes).
#[derive(Arbitrary, Clone, Debug)]
pub enum Cmd {
    /// GET_DISPLAY_INFO.
    GetDisplayInfo,
    /// GET_EDID.
    GetEdid(Scanout),
    /// RESOURCE_CREATE_2D.
    Create2d(Id, u8, Dim, Dim),
    /// RESOURCE_UNREF.
    Unref(Id),
    /// RESOURCE_ATTACH_BACKING.
    Attach(Id, Vec<EntrySpec>),
    /// RESOURCE_DETACH_BACKING.
    Detach(Id),
    /// TRANSFER_TO_HOST_2D.
    Transfer(Id, RectSpec, OffsetSpec),
    /// SET_SCANOUT.
    SetScanout(Scanout, Id, RectSpec),
    /// RESOURCE_FLUSH.
    Flush(Id, RectSpec),
    /// UPDATE_CURSOR.
    UpdateCursor(Scanout, Id, u16, u16, u8, u8),
    /// MOVE_CURSOR.
    MoveCursor(Scanout, u16, u16),
    /// GET_CAPSET_INFO.
    GetCapsetInfo(u8),
    /// GET_CAPSET of cross-domain (or anything), some version.
    GetCapset(bool, u32, u8),
    /// RESOURCE_ASSIGN_UUID.
    AssignUuid(Id),
    /// CTX_CREATE: cross-domain, or any context_init; a name.
    CtxCreate(Option<u32>, Vec<u8>),
    /// CTX_DESTROY.
    CtxDestroy,
    /// CTX_ATTACH_RESOURCE.
    CtxAttach(Id),
    /// CTX_DETACH_RESOURCE.
    CtxDetach(Id),
    /// RESOURCE_CREATE_BLOB.
    CreateBlob {
        /// New id.
        id: Id,
        /// GUEST, HOST3D or HOST3D_GUEST.
        mem: u8,
        /// Flag bits (low four: one undefined).
        flags: u8,
        /// Blob id.
        blob_id: BlobIdSpec,
        /// Size.
        size: SizeSpec,
        /// Entries.
        entries: Vec<EntrySpec>,
    },
    /// SET_SCANOUT_BLOB.
    SetScanoutBlob {
        /// Scanout.
        scanout: Scanout,
        /// Blob.
        id: Id,
        /// Shown part of the framebuffer.
        rect: RectSpec,
        /// Framebuffer width, height.
        size: (Dim, Dim),
        /// Format index.
        format: u8,
        /// Plane 0 stride: packed (width * 4) plus this, or anything.
        stride: Result<u8, u32>,
        /// Plane 0 offset: this many 64-byte lines, or anything.
        offset: Result<u8, u32>,
    },
    /// SUBMIT_3D.
    Submit3d(Submit),
    /// RESOURCE_MAP_BLOB at a page multiple or anywhere.
    MapBlob(Id, Result<u16, u64>),
    /// RESOURCE_UNMAP_BLOB.
    UnmapBlob(Id),
    /// Raw request bytes.
    Raw(Vec<u8>),
}

/// The request header's optional parts.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Header {
    /// Fenced, with this id.
    pub fence: Option<u16>,
    /// Context id tag: 0 is context 0, else one of three contexts.
    pub ctx: u8,
    /// VIRTIO_GPU_FLAG_INFO_RING_IDX with this ring.
    pub ring: Option<u8>,
}

/// How the command travels. Mostly plainly (one request descriptor, room for any
/// response, kicked at once): a corrupted request rarely gets far, and the commands around
/// it should.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    /// Split the request over two descriptors at this byte.
    pub split: Option<u16>,
    /// Writable room: full, this many bytes, or no writable descriptor at all.
    pub response: Option<Option<u8>>,
    /// Bytes of the encoded request to flip (position, xor mask).
    pub flips: Vec<(u16, u8)>,
    /// Cut the request to this many bytes.
    pub truncate: Option<u16>,
    /// Put it on the other queue.
    pub wrong_queue: bool,
    /// Make it available without kicking (a later kick takes it).
    pub defer: bool,
}

impl<'a> Arbitrary<'a> for Shape {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        let tag: u8 = u.arbitrary()?;
        let mut shape = Shape::default();
        match tag {
            0..=179 => {}
            180..=199 => shape.defer = true,
            200..=209 => shape.split = Some(u.arbitrary()?),
            210..=219 => shape.response = Some(Some(u.arbitrary()?)),
            220..=224 => shape.response = Some(None),
            225..=239 => {
                for _ in 0..u.int_in_range(1..=3)? {
                    shape.flips.push(u.arbitrary()?);
                }
            }
            240..=247 => shape.truncate = Some(u.arbitrary()?),
            _ => shape.wrong_queue = true,
        }
        Ok(shape)
    }
}

/// One step of a run: mostly commands; resets and the other device events are rarer, or
/// they would wipe out what the commands build.
#[derive(Clone, Debug)]
pub enum Step {
    /// A command.
    Cmd(Cmd, Header, Shape),
    /// Kick the control (false) or cursor (true) queue.
    Kick(bool),
    /// VHOST_USER_RESET_DEVICE.
    Reset,
    /// The VMM sends the memory table again.
    NewMemoryTable,
    /// VHOST_USER_GET_VRING_BASE on the control (false) or cursor (true) queue.
    StopQueue(bool),
    /// The guest writes into the data area.
    GuestWrite(u32, Vec<u8>),
    /// The whole way to a mappable cross-domain blob `id` for a `w` x `h` image, as the
    /// Linux driver goes it: CTX_CREATE (context 1, cross-domain), a guest blob as the
    /// query ring ([`QUERY_RING_ID`]), CTX_ATTACH_RESOURCE, SUBMIT_3D INIT and
    /// GET_IMAGE_REQUIREMENTS, then RESOURCE_CREATE_BLOB (HOST3D, MAPPABLE) with the
    /// answer. Each command is an ordinary step; later ones may fail if earlier ones did.
    MappableBlob(Id, Dim, Dim),
    /// The VMM acks its next SHMEM_UNMAP (true) or SHMEM_MAP (false) request twice, or
    /// refuses that SHMEM_MAP; nothing without a backend request channel. (Never a refused
    /// unmap: the device then releases the range anyway, by design, and the window's
    /// complaint about the next map there would be the VMM's doing.)
    VmmNext {
        /// Which request.
        unmap: bool,
        /// Ack twice (always for an unmap).
        duplicate: bool,
    },
}

impl Step {
    /// `c` on its queue, unfenced, outside any context, whole and kicked at once.
    pub fn unfenced(c: Cmd) -> Step {
        let hdr = Header {
            fence: None,
            ctx: 0,
            ring: None,
        };
        Step::Cmd(c, hdr, Shape::default())
    }
}

impl<'a> Arbitrary<'a> for Step {
    fn arbitrary(u: &mut Unstructured<'a>) -> ArbResult<Self> {
        let tag: u8 = u.arbitrary()?;
        Ok(match tag {
            0..=215 => Step::Cmd(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
            216..=223 => Step::Kick(u.arbitrary()?),
            224..=227 => Step::Reset,
            228..=229 => Step::NewMemoryTable,
            230..=231 => Step::StopQueue(u.arbitrary()?),
            232..=241 => Step::GuestWrite(u.arbitrary()?, u.arbitrary()?),
            242..=245 => Step::VmmNext {
                unmap: u.arbitrary()?,
                duplicate: u.arbitrary()?,
            },
            _ => Step::MappableBlob(u.arbitrary()?, u.arbitrary()?, u.arbitrary()?),
        })
    }
}

/// The device configuration of a run.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Setup {
    /// Connect the VMM's display socket.
    pub display: bool,
    /// Ask the display for the display info and EDID.
    pub display_from_vmm: bool,
    /// Offer EDID.
    pub edid: bool,
    /// Number of outputs, 1 to 3.
    pub outputs: u8,
    /// Connect the VMM's backend request channel (blobs can be mapped).
    pub vmm: bool,
    /// How that VMM acks, all run long.
    pub vmm_acks: VmmAcks,
}

/// A VMM's standing habit with SHMEM_MAP/UNMAP acks.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VmmAcks {
    /// One ack per request.
    #[default]
    Normal,
    /// Every SHMEM_MAP acked twice.
    DuplicateMaps,
    /// Every SHMEM_UNMAP acked twice.
    DuplicateUnmaps,
    /// Every request acked twice.
    DuplicateAll,
    /// Every SHMEM_MAP refused.
    RefuseMaps,
}

/// One input of the target.
#[derive(Arbitrary, Clone, Debug)]
pub struct CommandsInput {
    /// Configuration.
    pub setup: Setup,
    /// Steps, played in order (at most 160).
    pub steps: Vec<Step>,
}

// ---------------------------------------------------------------------------------------
// The driver side of a virtqueue.

/// A chain the driver made available and the device has not answered yet.
#[derive(Debug)]
struct Pending {
    head: u16,
    descs: Vec<u16>,
    /// The request's header as the device can read it, if the request is short enough
    /// that the device must read it.
    req_hdr: Option<CtrlHeader>,
    resp_addr: u64,
    resp_room: u32,
    what: String,
}

struct DriverQueue {
    index: usize,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
    outstanding: VecDeque<Pending>,
}

impl DriverQueue {
    fn new(index: usize) -> Self {
        DriverQueue {
            index,
            free: (0..QUEUE_SIZE).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
            outstanding: VecDeque::new(),
        }
    }

    fn desc_addr(&self) -> u64 {
        QUEUE_AT[self.index]
    }

    fn avail_addr(&self) -> u64 {
        QUEUE_AT[self.index] + AVAIL_OFFSET
    }

    fn used_addr(&self) -> u64 {
        QUEUE_AT[self.index] + USED_OFFSET
    }
}

// ---------------------------------------------------------------------------------------
// The harness.

/// The frontend's control actor and the renderer's executor, wired together in-process,
/// with a guest and (optionally) a VMM display peer.
pub struct Harness {
    control: Control,
    executor: Executor<RutabagaRenderer>,
    requests: IpcReceiver<RendererBatch>,
    mem: GuestMem,
    vrings: [VringRwLock; 2],
    queues: [DriverQueue; 2],
    buf_next: u64,
    display: Option<DisplayPeer>,
    /// Width and height each resource id was last created with (successfully or not).
    dims: HashMap<u32, (u32, u32)>,
    /// The guest address of the last guest blob's first entry (the query ring, if the
    /// guest made it one).
    query_ring: Option<u64>,
    /// The VMM's backend request channel, when connected.
    vmm: Option<Vmm>,
    /// Called with true before and false after every call into the control actor (what
    /// the frontend process does), so that a test can tell its work from the harness's and
    /// the renderer's (`tests/tests/allocations.rs` counts its allocations).
    actor_probe: Option<fn(bool)>,
    /// Response type of every answered chain, in the order the harness collected them.
    answers: Vec<(String, u32)>,
}

/// The VMM's side of the backend request channel.
struct Vmm {
    server: BackendRequests,
    /// Acks handed to the actor so far.
    delivered: usize,
}

/// The configuration a run uses.
pub fn device_config(setup: &Setup) -> DeviceConfig {
    let outputs = usize::from(setup.outputs % 3) + 1;
    DeviceConfig {
        outputs: (0..outputs)
            .map(|i| OutputConfig {
                width: 64 + 32 * i as u32,
                height: 48,
            })
            .collect(),
        display_from_vmm: setup.display_from_vmm,
        edid: setup.edid,
        limits: Limits {
            max_resources: 32,
            max_resource_bytes: 8 << 20,
            max_dimension: 16384,
            max_backing_entries: 64,
            max_submit_bytes: 16 << 10,
            ..policy::limits::DEFAULT
        },
        seccomp: false,
        hostmem: Some(HOSTMEM),
        num_capsets: NUM_CAPSETS,
        ..DeviceConfig::with_limits(policy::limits::DEFAULT)
    }
}

fn guest_memory() -> GuestMem {
    let fd: OwnedFd =
        nix::sys::memfd::memfd_create(c"fuzz-guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd_create");
    let file = File::from(fd);
    file.set_len(GUEST_SIZE).expect("size guest memory");
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(GUEST_BASE),
        GUEST_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("map guest memory");
    GuestMemoryAtomic::new(mem)
}

impl Harness {
    /// Builds the actor and the executor with `setup`, hands over guest memory and sets up
    /// both virtqueues.
    pub fn new(setup: &Setup) -> Harness {
        let config = device_config(setup);
        let (req_tx, req_rx) = ipc::channel::<RendererBatch>().expect("request channel");
        let (ev_tx, ev_rx) = ipc::channel::<RendererEvent>().expect("event channel");
        let (ours, theirs) = Lane::pair().expect("descriptor lane");
        // Non-blocking, as the broker makes it: the actor reads it without waiting.
        let bell: OwnedFd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .expect("doorbell")
            .into();
        let bell_for_sink = bell.try_clone().expect("doorbell");
        let link = RendererLink::new(req_tx, ev_rx, bell, Lane::new(ours));
        let mut control = Control::new(config.clone(), link, Arc::new(AtomicBool::new(false)));

        let sink = EventSink::with_doorbell(ev_tx, bell_for_sink);
        let renderer =
            RutabagaRenderer::new(config.limits, sink.fence_callback()).expect("renderer");
        let executor = Executor::new(renderer, Lane::new(theirs), sink, &config);

        let display = setup.display.then(|| {
            let (vmm_end, device_end) = UnixStream::pair().expect("display socketpair");
            let peer = DisplayPeer::start(
                vmm_end,
                DisplayConfig {
                    outputs: config.outputs.iter().map(|o| (o.width, o.height)).collect(),
                    offer_edid: true,
                },
            )
            .expect("display peer");
            control
                .handle(Input::GpuSocket(GpuBackend::from_stream(device_end)))
                .expect("display socket");
            peer
        });

        let vmm = setup.vmm.then(|| {
            let window = HostmemWindow::reserve(HOSTMEM).expect("hostmem window");
            let (server, device_end) =
                BackendRequests::start(Arc::new(window), HOSTMEM_SHMID, true)
                    .expect("backend request server");
            let requests = VmmRequests::new(BackendChannel::from_stream(device_end));
            control
                .handle(Input::VmmChannel(requests))
                .expect("backend request channel");
            let twice = AckAction::Duplicate;
            match setup.vmm_acks {
                VmmAcks::Normal => {}
                VmmAcks::DuplicateMaps => server.set_standing(RequestKind::Map, twice),
                VmmAcks::DuplicateUnmaps => server.set_standing(RequestKind::Unmap, twice),
                VmmAcks::DuplicateAll => {
                    server.set_standing(RequestKind::Map, twice.clone());
                    server.set_standing(RequestKind::Unmap, twice);
                }
                VmmAcks::RefuseMaps => {
                    server.set_standing(RequestKind::Map, AckAction::Fail(ACK_EINVAL))
                }
            }
            Vmm {
                server,
                delivered: 0,
            }
        });

        let mem = guest_memory();
        let vrings = [0, 1].map(|q| {
            let vring = VringRwLock::new(mem.clone(), QUEUE_SIZE).expect("vring");
            vring.set_queue_size(QUEUE_SIZE);
            vring
                .set_queue_info(
                    QUEUE_AT[q],
                    QUEUE_AT[q] + AVAIL_OFFSET,
                    QUEUE_AT[q] + USED_OFFSET,
                )
                .expect("queue addresses");
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vring
        });
        let mut h = Harness {
            control,
            executor,
            requests: req_rx,
            mem,
            vrings,
            queues: [DriverQueue::new(0), DriverQueue::new(1)],
            buf_next: BUF_START,
            display,
            dims: HashMap::new(),
            query_ring: None,
            vmm,
            actor_probe: None,
            answers: Vec::new(),
        };
        h.input(Input::Memory(h.mem.clone()));
        h
    }

    /// Plays a whole input.
    pub fn run(input: &CommandsInput) {
        let mut h = Harness::new(&input.setup);
        for (i, step) in input.steps.iter().take(MAX_STEPS).enumerate() {
            h.step(step);
            h.check(&format!("step {i}: {step:?}"));
        }
        h.finish();
    }

    /// Kicks both queues one last time (whatever was left deferred must be answered),
    /// checks, and takes everything down.
    pub fn finish(mut self) -> Vec<(String, u32)> {
        for q in 0..2 {
            self.kick(q);
        }
        self.check("final kicks");
        self.answers
    }

    /// Response types of the chains answered so far, with what each command was.
    pub fn answers(&self) -> &[(String, u32)] {
        &self.answers
    }

    /// The control actor, to look at.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The display peer's view, when the run has one.
    pub fn display(&self) -> Option<&DisplayPeer> {
        self.display.as_ref()
    }

    /// Hands one mailbox input to the actor and lets everything settle, VMM acks that
    /// are already back included.
    fn input(&mut self, input: Input) {
        self.actor(|c| c.handle(input))
            .expect("control actor input");
        self.pump();
        self.take_vmm_acks(None);
    }

    /// Whether the renderer's doorbell is readable (without consuming it).
    fn doorbell_rang(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::BorrowedFd;
        // SAFETY: the actor owns the doorbell and keeps it open for this call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.control.renderer_doorbell()) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
    }

    /// Has `probe` called around every call into the control actor from now on.
    pub fn probe_actor(&mut self, probe: fn(bool)) {
        self.actor_probe = Some(probe);
    }

    /// Runs `f` on the control actor, between the probe's calls.
    fn actor<R>(&mut self, f: impl FnOnce(&mut Control) -> R) -> R {
        if let Some(p) = self.actor_probe {
            p(true);
        }
        let r = f(&mut self.control);
        if let Some(p) = self.actor_probe {
            p(false);
        }
        r
    }

    /// Hands the VMM's acks to the actor: those already back, then, while the VMM has
    /// acked more than the actor has seen (or until `deadline`), the ones on their way.
    fn take_vmm_acks(&mut self, deadline: Option<Instant>) {
        let mut patience: Option<Instant> = None;
        loop {
            let Some(vmm) = self.vmm.as_mut() else {
                return;
            };
            let taken = self.control.vmm_readable().expect("VMM acks");
            if taken == 0 {
                let acked = vmm
                    .server
                    .count(|e| e.is_acked(RequestKind::Map) || e.is_acked(RequestKind::Unmap));
                let limit = if acked > vmm.delivered {
                    *patience.get_or_insert_with(|| Instant::now() + VMM_PATIENCE)
                } else if let Some(d) = deadline {
                    d
                } else {
                    return;
                };
                if Instant::now() >= limit {
                    return;
                }
                // The ack is in the socket microseconds after the VMM wrote it.
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            vmm.delivered += taken;
            self.pump();
        }
    }

    /// Moves the actor's renderer requests to the executor and the executor's events back
    /// until neither has anything left, as the two processes' event loops would.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            self.actor(Control::finish_batch).expect("finish batch");
            let mut handled = false;
            while let Ok(batch) = self.requests.try_recv() {
                handled = true;
                self.executor
                    .handle_batch(batch)
                    .expect("the frontend takes the renderer's events");
            }
            // Replies and fence completions, when the doorbell rang (as the frontend's
            // event loop takes them: only then).
            if self.doorbell_rang() {
                self.actor(Control::renderer_events)
                    .expect("renderer events");
            }
            if !handled {
                self.actor(Control::finish_batch).expect("finish batch");
                return;
            }
        }
        panic!("the frontend and the renderer never settle");
    }

    fn kick(&mut self, q: usize) {
        let vring = self.vrings[q].clone();
        self.input(Input::Kick {
            queue: q as u16,
            vring,
        });
        self.collect(q);
        if self.vmm.is_some() {
            // A command suspended on a blob waits for the VMM's acks.
            let deadline = Instant::now() + VMM_PATIENCE;
            while !self.queues[q].outstanding.is_empty() && Instant::now() < deadline {
                self.take_vmm_acks(Some(Instant::now() + Duration::from_millis(1)));
                self.collect(q);
            }
        }
        if let Some(p) = self.queues[q].outstanding.front() {
            panic!(
                "queue {q}: kicked, device idle, but {} chain(s) unanswered, first: {}",
                self.queues[q].outstanding.len(),
                p.what
            );
        }
    }

    /// Plays one step.
    pub fn step(&mut self, step: &Step) {
        match step {
            Step::MappableBlob(id, w, h) => {
                let ctx1 = Header {
                    fence: None,
                    ctx: 3,
                    ring: None,
                };
                let ring = Id(QUERY_RING_ID);
                for cmd in [
                    Cmd::CtxCreate(None, b"fuzz".to_vec()),
                    Cmd::CreateBlob {
                        id: ring,
                        mem: 0,
                        flags: 0,
                        blob_id: BlobIdSpec::Any(0),
                        size: SizeSpec::Pages(0),
                        entries: Vec::new(),
                    },
                    Cmd::CtxAttach(ring),
                    Cmd::Submit3d(Submit::Init(ring)),
                    Cmd::Submit3d(Submit::ImageRequirements(*w, *h, false)),
                    Cmd::CreateBlob {
                        id: *id,
                        mem: 1,
                        flags: protocol::virtio_gpu::VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE as u8,
                        blob_id: BlobIdSpec::Queried,
                        size: SizeSpec::Queried,
                        entries: Vec::new(),
                    },
                ] {
                    self.command(&cmd, &ctx1, &Shape::default());
                }
            }
            Step::Cmd(cmd, hdr, shape) => self.command(cmd, hdr, shape),
            Step::Kick(cursor) => self.kick(usize::from(*cursor)),
            Step::Reset => self.input(Input::Reset),
            Step::NewMemoryTable => self.input(Input::Memory(self.mem.clone())),
            Step::StopQueue(cursor) => {
                let (done, _) = crossbeam_channel::bounded(1);
                self.input(Input::StopQueue {
                    queue: u16::from(*cursor),
                    done,
                });
            }
            Step::VmmNext { unmap, duplicate } => {
                if let Some(vmm) = &self.vmm {
                    let kind = if *unmap {
                        RequestKind::Unmap
                    } else {
                        RequestKind::Map
                    };
                    let action = if *duplicate || *unmap {
                        AckAction::Duplicate
                    } else {
                        AckAction::Fail(ACK_EINVAL)
                    };
                    vmm.server.on_next(Some(kind), action);
                }
            }
            Step::GuestWrite(at, bytes) => {
                let at = u64::from(*at) % DATA_LEN;
                let n = bytes.len().min((DATA_LEN - at) as usize);
                self.mem
                    .memory()
                    .write_slice(&bytes[..n], GuestAddress(DATA_START + at))
                    .expect("guest write");
            }
        }
    }

    fn dims(&self, id: u32) -> (u32, u32) {
        self.dims.get(&id).copied().unwrap_or((64, 64))
    }

    fn rect(&self, id: u32, spec: RectSpec) -> Rect {
        rect_in(self.dims(id), spec)
    }

    /// Entries for a backing of `need` bytes (what [`EntrySpec::Covering`] covers).
    fn entries(&self, need: u64, specs: &[EntrySpec]) -> Vec<BackingEntry> {
        let need = need.clamp(1, DATA_LEN);
        specs
            .iter()
            .map(|s| match *s {
                EntrySpec::Covering(at) => {
                    let at = (u64::from(at) * 4096).min(DATA_LEN - need);
                    BackingEntry {
                        addr: DATA_START + at,
                        length: need as u32,
                    }
                }
                EntrySpec::Data(at, len) => {
                    let at = u64::from(at) % DATA_LEN;
                    BackingEntry {
                        addr: DATA_START + at,
                        length: (u64::from(len) % (DATA_LEN - at)).max(1) as u32,
                    }
                }
                EntrySpec::Rings(at, len) => BackingEntry {
                    addr: GUEST_BASE + u64::from(at),
                    length: u32::from(len).max(1),
                },
                EntrySpec::End(back, len) => BackingEntry {
                    addr: GUEST_BASE + GUEST_SIZE - u64::from(back),
                    length: u32::from(len).max(1),
                },
                EntrySpec::Any(addr, length) => BackingEntry { addr, length },
            })
            .collect()
    }

    /// The cross-domain image query's answer in the query ring (zeroes if none).
    fn queried(&self) -> (u64, u64) {
        let Some(ring) = self.query_ring else {
            return (0, 0);
        };
        let mut answer = [0u8; cross_domain::IMAGE_REQUIREMENTS_SIZE];
        if self
            .mem
            .memory()
            .read_slice(&mut answer, GuestAddress(ring))
            .is_err()
        {
            return (0, 0);
        }
        match cross_domain::ImageRequirements::parse(&answer) {
            Some(r) => (u64::from(r.blob_id), r.size),
            None => (0, 0),
        }
    }

    /// Resolves a [`Cmd`] into its wire bytes.
    fn encode(&mut self, cmd: &Cmd, header: &Header) -> Vec<u8> {
        let mut hdr = CtrlHeader {
            ctx_id: if header.ctx == 0 {
                0
            } else {
                u32::from(header.ctx % 3) + 1
            },
            ..CtrlHeader::default()
        };
        if let Some(fence) = header.fence {
            hdr.flags |= VIRTIO_GPU_FLAG_FENCE;
            hdr.fence_id = u64::from(fence);
        }
        if let Some(ring) = header.ring {
            hdr.flags |= VIRTIO_GPU_FLAG_INFO_RING_IDX;
            hdr.ring_idx = ring % 4;
        }
        let cmd = match cmd.clone() {
            Cmd::Raw(bytes) => return bytes,
            Cmd::GetDisplayInfo => Command::GetDisplayInfo,
            Cmd::GetEdid(s) => Command::GetEdid { scanout_id: s.0 },
            Cmd::Create2d(id, format, w, h) => {
                self.dims.insert(id.0, (w.0, h.0));
                Command::ResourceCreate2d {
                    resource_id: id.0,
                    format: Format::ALL[usize::from(format % 8)],
                    width: w.0,
                    height: h.0,
                }
            }
            Cmd::Unref(id) => Command::ResourceUnref { resource_id: id.0 },
            Cmd::Attach(id, specs) => {
                let (w, h) = self.dims(id.0);
                Command::ResourceAttachBacking {
                    resource_id: id.0,
                    // Saturating: the harness names any size; the device must refuse it.
                    entries: self.entries((u64::from(w) * u64::from(h)).saturating_mul(4), &specs),
                }
            }
            Cmd::Detach(id) => Command::ResourceDetachBacking { resource_id: id.0 },
            Cmd::Transfer(id, rect, offset) => {
                let stride = u64::from(self.dims(id.0).0) * 4;
                Command::TransferToHost2d {
                    resource_id: id.0,
                    rect: self.rect(id.0, rect),
                    offset: match offset {
                        OffsetSpec::Zero => 0,
                        OffsetSpec::Row(r) => u64::from(r) * stride,
                        OffsetSpec::Small(o) => u64::from(o),
                        OffsetSpec::Any(o) => o,
                    },
                }
            }
            Cmd::SetScanout(s, id, rect) => Command::SetScanout {
                scanout_id: s.0,
                resource_id: id.0,
                rect: self.rect(id.0, rect),
            },
            Cmd::Flush(id, rect) => Command::ResourceFlush {
                resource_id: id.0,
                rect: self.rect(id.0, rect),
            },
            Cmd::UpdateCursor(s, id, x, y, hot_x, hot_y) => Command::UpdateCursor {
                pos: CursorPos {
                    scanout_id: s.0,
                    x: u32::from(x),
                    y: u32::from(y),
                },
                resource_id: id.0,
                hot_x: u32::from(hot_x),
                hot_y: u32::from(hot_y),
            },
            Cmd::MoveCursor(s, x, y) => Command::MoveCursor {
                pos: CursorPos {
                    scanout_id: s.0,
                    x: u32::from(x),
                    y: u32::from(y),
                },
            },
            Cmd::GetCapsetInfo(i) => Command::GetCapsetInfo {
                capset_index: u32::from(i % 4),
            },
            Cmd::GetCapset(cross, id, version) => Command::GetCapset {
                capset_id: if cross {
                    VIRTIO_GPU_CAPSET_CROSS_DOMAIN
                } else {
                    id
                },
                capset_version: u32::from(version % 3),
            },
            Cmd::AssignUuid(id) => Command::ResourceAssignUuid { resource_id: id.0 },
            Cmd::CtxCreate(init, name) => Command::CtxCreate {
                context_init: init.unwrap_or(VIRTIO_GPU_CAPSET_CROSS_DOMAIN),
                name,
            },
            Cmd::CtxDestroy => Command::CtxDestroy,
            Cmd::CtxAttach(id) => Command::CtxAttachResource { resource_id: id.0 },
            Cmd::CtxDetach(id) => Command::CtxDetachResource { resource_id: id.0 },
            Cmd::CreateBlob {
                id,
                mem,
                flags,
                blob_id,
                size,
                entries,
            } => {
                let blob_mem =
                    [BlobMem::Guest, BlobMem::Host3d, BlobMem::Host3dGuest][usize::from(mem % 3)];
                let (queried_id, queried_size) = self.queried();
                let size = match size {
                    SizeSpec::Queried => queried_size,
                    SizeSpec::Pages(n) => (u64::from(n) + 1) * 4096,
                    SizeSpec::Any(s) => s,
                };
                self.dims.insert(id.0, (0, 0));
                let mut entries = self.entries(size, &entries);
                if blob_mem == BlobMem::Guest && entries.is_empty() {
                    // The usual query ring: one page of the data area.
                    entries.push(BackingEntry {
                        addr: DATA_START + DATA_LEN - 4096,
                        length: 4096,
                    });
                }
                if blob_mem == BlobMem::Host3d {
                    entries.clear();
                }
                if blob_mem == BlobMem::Guest {
                    self.query_ring = entries.first().map(|e| e.addr);
                }
                Command::ResourceCreateBlob {
                    resource_id: id.0,
                    blob_mem,
                    blob_flags: u32::from(flags & 0xf),
                    blob_id: match blob_id {
                        BlobIdSpec::Queried => queried_id,
                        BlobIdSpec::Any(b) => b,
                    },
                    size,
                    entries,
                }
            }
            Cmd::SetScanoutBlob {
                scanout,
                id,
                rect,
                size: (w, h),
                format,
                stride,
                offset,
            } => Command::SetScanoutBlob {
                scanout_id: scanout.0,
                resource_id: id.0,
                rect: rect_in((w.0, h.0), rect),
                width: w.0,
                height: h.0,
                format: Format::ALL[usize::from(format % 8)],
                strides: [
                    match stride {
                        Ok(extra) => w.0.wrapping_mul(4).wrapping_add(u32::from(extra)),
                        Err(any) => any,
                    },
                    0,
                    0,
                    0,
                ],
                offsets: [
                    match offset {
                        Ok(lines) => u32::from(lines) * 64,
                        Err(any) => any,
                    },
                    0,
                    0,
                    0,
                ],
            },
            Cmd::Submit3d(s) => Command::Submit3d {
                commands: match s {
                    Submit::Init(ring) => cross_domain::init(ring.0),
                    Submit::ImageRequirements(w, h, alpha) => cross_domain::get_image_requirements(
                        w.0,
                        h.0,
                        if alpha {
                            cross_domain::DRM_FORMAT_ARGB8888
                        } else {
                            cross_domain::DRM_FORMAT_XRGB8888
                        },
                        0,
                    ),
                    Submit::Poll => cross_domain::poll(),
                    Submit::Bytes(b) => b,
                },
            },
            Cmd::MapBlob(id, offset) => Command::ResourceMapBlob {
                resource_id: id.0,
                offset: match offset {
                    Ok(page) => u64::from(page) * 4096,
                    Err(any) => any,
                },
            },
            Cmd::UnmapBlob(id) => Command::ResourceUnmapBlob { resource_id: id.0 },
        };
        Request { hdr, cmd }.encode()
    }

    fn command(&mut self, cmd: &Cmd, header: &Header, shape: &Shape) {
        let mut bytes = self.encode(cmd, header);
        for &(at, mask) in &shape.flips {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[usize::from(at) % n] ^= mask;
            }
        }
        if let Some(cut) = shape.truncate {
            bytes.truncate(usize::from(cut) % (bytes.len() + 1));
        }
        let cursor = matches!(cmd, Cmd::UpdateCursor(..) | Cmd::MoveCursor(..));
        let q = usize::from(cursor != shape.wrong_queue);
        let room = match shape.response {
            None => FULL_RESPONSE,
            Some(Some(n)) => u32::from(n),
            Some(None) => 0,
        };
        if !self.make_available(q, &bytes, shape.split, room, format!("{cmd:?}")) {
            return;
        }
        if !shape.defer {
            self.kick(q);
        }
    }

    /// Writes a chain (request descriptors, then a writable one of `room` bytes unless 0)
    /// and publishes it; false when the ring or the buffer area is full.
    fn make_available(
        &mut self,
        q: usize,
        request: &[u8],
        split: Option<u16>,
        room: u32,
        what: String,
    ) -> bool {
        let len = request.len() as u64;
        let need = len + u64::from(room);
        if self.buf_next + need > BUF_END {
            if self.queues.iter().any(|d| !d.outstanding.is_empty()) {
                return false;
            }
            self.buf_next = BUF_START;
            if self.buf_next + need > BUF_END {
                return false;
            }
        }
        let req_addr = self.buf_next;
        let resp_addr = req_addr + len;
        self.buf_next += need.next_multiple_of(8);

        let mut parts: Vec<(u64, u32, u16)> = Vec::new();
        match split.map(u64::from) {
            Some(at) if at > 0 && at < len => {
                parts.push((req_addr, at as u32, 0));
                parts.push((req_addr + at, (len - at) as u32, 0));
            }
            _ => parts.push((req_addr, len as u32, 0)),
        }
        if room > 0 {
            parts.push((resp_addr, room, VIRTQ_DESC_F_WRITE));
        }
        let dq = &mut self.queues[q];
        if dq.free.len() < parts.len() {
            return false;
        }
        let descs: Vec<u16> = (0..parts.len())
            .map(|_| dq.free.pop().expect("free descriptor"))
            .collect();
        let mem = self.mem.memory();
        mem.write_slice(request, GuestAddress(req_addr))
            .expect("write request");
        // A stale response must not pass for a fresh one.
        mem.write_slice(&vec![0xa5; room as usize], GuestAddress(resp_addr))
            .expect("poison response");
        for (i, &(addr, len, flags)) in parts.iter().enumerate() {
            let next = descs.get(i + 1).copied();
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let flags = flags | if next.is_some() { VIRTQ_DESC_F_NEXT } else { 0 };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
            mem.write_slice(&d, GuestAddress(dq.desc_addr() + 16 * u64::from(descs[i])))
                .expect("write descriptor");
        }
        let slot = dq.avail_addr() + 4 + 2 * u64::from(dq.avail_idx % QUEUE_SIZE);
        mem.write_obj(descs[0], GuestAddress(slot))
            .expect("write avail ring");
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        mem.write_obj(dq.avail_idx, GuestAddress(dq.avail_addr() + 2))
            .expect("write avail idx");
        // The device must read whatever header a request of a readable size has.
        let req_hdr = if request.len() <= 4096 {
            CtrlHeader::from_bytes(request)
        } else {
            None
        };
        dq.outstanding.push_back(Pending {
            head: descs[0],
            descs,
            req_hdr,
            resp_addr,
            resp_room: room,
            what,
        });
        true
    }

    /// Takes the used entries of queue `q` and checks each answer.
    fn collect(&mut self, q: usize) {
        let mem = self.mem.memory();
        let Harness {
            queues, answers, ..
        } = self;
        let dq = &mut queues[q];
        let used_idx: u16 = mem
            .read_obj(GuestAddress(dq.used_addr() + 2))
            .expect("read used idx");
        while dq.used_seen != used_idx {
            let at = dq.used_addr() + 4 + 8 * u64::from(dq.used_seen % QUEUE_SIZE);
            let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
            dq.used_seen = dq.used_seen.wrapping_add(1);
            let p = dq
                .outstanding
                .pop_front()
                .unwrap_or_else(|| panic!("queue {q}: used entry {id} for no chain"));
            assert_eq!(
                id,
                u32::from(p.head),
                "queue {q}: answered out of order (expected the answer to {})",
                p.what
            );
            assert!(
                len <= p.resp_room,
                "queue {q}: {len} bytes written into {} bytes of room: {}",
                p.resp_room,
                p.what
            );
            if p.resp_room as usize >= CTRL_HDR_SIZE {
                assert!(
                    len as usize >= CTRL_HDR_SIZE,
                    "queue {q}: only {len} bytes answered {}",
                    p.what
                );
            }
            let mut resp = vec![0u8; len as usize];
            mem.read_slice(&mut resp, GuestAddress(p.resp_addr))
                .expect("read response");
            answers.push((
                p.what.clone(),
                CtrlHeader::from_bytes(&resp).map_or(0, |h| h.type_),
            ));
            if let Some(rh) = CtrlHeader::from_bytes(&resp) {
                let ok =
                    (VIRTIO_GPU_RESP_OK_NODATA..=VIRTIO_GPU_RESP_OK_MAP_INFO).contains(&rh.type_);
                let err = (VIRTIO_GPU_RESP_ERR_UNSPEC..=VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER)
                    .contains(&rh.type_);
                assert!(
                    ok || err,
                    "queue {q}: response type {:#x} to {}",
                    rh.type_,
                    p.what
                );
                let asked = p.req_hdr.filter(CtrlHeader::is_fenced);
                let echoed = rh.flags & VIRTIO_GPU_FLAG_FENCE != 0;
                if let Some(req) = asked {
                    assert!(echoed, "queue {q}: fence not echoed: {}", p.what);
                    assert_eq!(rh.fence_id, req.fence_id, "queue {q}: {}", p.what);
                    assert_eq!(rh.ctx_id, req.ctx_id, "queue {q}: {}", p.what);
                } else if p.req_hdr.is_some() {
                    assert!(!echoed, "queue {q}: fence invented: {}", p.what);
                }
            }
            dq.free.extend(p.descs);
        }
    }

    /// Checks every rule that must hold between steps (panics naming `after` otherwise).
    pub fn check(&mut self, after: &str) {
        for q in [CONTROL_QUEUE, CURSOR_QUEUE] {
            self.collect(usize::from(q));
        }
        if let Some(peer) = &self.display {
            let v = peer.events().violations();
            assert!(
                v.is_empty(),
                "display protocol violations after {after}: {v:?}"
            );
        }
        // A scanout buffer the frontend holds in step (and sends flushes from without the
        // renderer) must hold exactly what the renderer's resource holds.
        for id in 0..16 {
            let Some((resource_id, rect, stride, shown)) = self.control.scanout_in_step(id) else {
                continue;
            };
            // The renderer places the rectangle at resource coordinates.
            let (y0, rows) = (rect.y as usize, rect.height as usize);
            let mut whole = vec![0u8; stride as usize * (y0 + rows)];
            let read = self
                .executor
                .renderer()
                .read_rect(resource_id, rect, stride, &mut whole);
            let row = rect.width as usize * 4;
            let x0 = rect.x as usize * 4;
            let held: Vec<u8> = (y0..y0 + rows)
                .flat_map(|r| {
                    let at = r * stride as usize + x0;
                    whole[at..at + row].iter().copied()
                })
                .collect();
            assert!(
                read.is_ok(),
                "scanout {id} in step with resource {resource_id} the renderer cannot read \
                 ({read:?}) after {after}"
            );
            if let Some(at) = held.iter().zip(&shown).position(|(a, b)| a != b) {
                panic!(
                    "scanout {id}: the buffer in step differs from resource {resource_id} \
                     in {rect:?} at byte {at} after {after}"
                );
            }
        }
        if let Some(vmm) = &self.vmm {
            let v = vmm.server.violations();
            assert!(v.is_empty(), "VMM request violations after {after}: {v:?}");
            let closed = vmm.server.count(|e| matches!(e, BackendEvent::Closed(_)));
            assert_eq!(closed, 0, "backend request channel closed after {after}");
        }
    }
}

/// `spec` resolved against a `w` x `h` area.
fn rect_in((w, h): (u32, u32), spec: RectSpec) -> Rect {
    let (w, h) = (w.max(1), h.max(1));
    match spec {
        RectSpec::Full => Rect {
            x: 0,
            y: 0,
            width: w,
            height: h,
        },
        RectSpec::Inside(x, y, rw, rh) => {
            let x = u32::from(x) % w;
            let y = u32::from(y) % h;
            Rect {
                x,
                y,
                width: u32::from(rw) % (w - x) + 1,
                height: u32::from(rh) % (h - y) + 1,
            }
        }
        RectSpec::Past(right) => Rect {
            x: u32::from(right),
            y: u32::from(!right),
            width: w,
            height: h,
        },
        RectSpec::Any(x, y, width, height) => Rect {
            x,
            y,
            width,
            height,
        },
    }
}

/// Runs one input; panics on a broken rule.
pub fn run(input: &CommandsInput) {
    Harness::run(input);
}
