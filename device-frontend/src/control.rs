//! The control actor: the single owner of the device state (resource table, scanouts,
//! in-flight commands). Every input (a queue kick, a new memory table, a renderer reply, a
//! reset) arrives in its mailbox and is handled to completion before the next one, so no
//! state is shared between threads.
//!
//! Commands of one queue are answered in the order the guest queued them. A command that
//! needs the renderer stays in its queue's FIFO until every reply it waits for (and, when
//! fenced, its fence) has arrived; that is what makes fenced commands complete in fence
//! order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use protocol::config::DeviceConfig;
use protocol::ipc::{FenceInfo, RendererEvent, RendererOp, ReplyBody};
use protocol::virtio_gpu::{encode_response_into, CtrlHeader, ErrorCode, Format, Rect, Response};
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::decode::Queue;
use crate::display::Display;
use crate::error::FrontendError;
use crate::renderer_link::RendererLink;
use crate::resources::ResourceTable;
use crate::scanout::Scanout;

/// Guest memory as vhost-user-backend hands it to us.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// A descriptor chain popped from a virtqueue.
pub type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// Index of the control queue.
pub const CONTROL_QUEUE: u16 = 0;
/// Index of the cursor queue.
pub const CURSOR_QUEUE: u16 = 1;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 2;

/// Quiet renderer requests in flight at most; the next is sent with a reply asked for.
const MAX_QUIET: usize = 256;

/// The capacity of the request buffer kept between commands (every fixed-size command
/// and ordinary SUBMIT_3D streams fit).
const KEPT_REQUEST_BUFFER: usize = 64 << 10;

/// The control actor's mailbox messages.
pub enum Input {
    /// The driver kicked a queue.
    Kick {
        /// Queue index.
        queue: u16,
        /// The queue's vring (cheap clone of a shared handle).
        vring: VringRwLock,
    },
    /// The VMM sent a new memory table.
    Memory(GuestMem),
    /// The VMM's display socket.
    GpuSocket(GpuBackend),
    /// VHOST_USER_RESET_DEVICE.
    Reset,
    /// The VMM's backend request channel is up (VHOST_USER_SET_BACKEND_REQ_FD).
    VmmChannel(crate::vmm_requests::VmmRequests),
    /// The VMM disconnected and the device will serve another connection: reset it as a
    /// device reset does, let go of everything of that VMM (rings, memory table, display
    /// socket, backend channel), and say so on `done`.
    Disconnected {
        /// Signalled once the device is as fresh as at start.
        done: crossbeam_channel::Sender<()>,
    },
    /// VHOST_USER_GET_VRING_BASE: finish the queue's in-flight commands, then let go of
    /// the ring and say so on `done`. The VMM takes the ring's index as final, so a
    /// command popped but not answered here would never be answered at all.
    StopQueue {
        /// Queue index.
        queue: u16,
        /// Signalled once the queue is idle and released.
        done: crossbeam_channel::Sender<()>,
    },
}

/// What to do when the renderer answers one request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum After {
    /// Nothing beyond answering the guest.
    Nothing,
    /// CREATE failed in the renderer: forget the resource again.
    Created { resource_id: u32 },
    /// ATTACH failed in the renderer: forget the backing again.
    Attached { resource_id: u32 },
    /// The scanout's buffer holds the new picture: announce the scanout and show it all.
    ScanoutShown { scanout_id: u32 },
    /// Damage copied into the scanout buffer: send it as an UPDATE.
    Flushed { scanout_id: u32, rect: Rect },
    /// A 2D transfer the frontend may have applied to scanout buffers too: were it refused
    /// by the renderer, those buffers no longer equal the resource.
    Transferred { resource_id: u32 },
    /// Cursor pixels arrived.
    Cursor {
        format: Format,
        pos: (u32, u32, u32),
        hot: (u32, u32),
    },
    /// The reply's body is the guest's response (capset info, capset bytes).
    Respond,
    /// CREATE_BLOB failed in the renderer: forget the blob again.
    BlobCreated { resource_id: u32 },
    /// CTX_CREATE failed in the renderer: forget the context again.
    ContextCreated { ctx_id: u32 },
    /// The renderer answered `Map`.
    BlobMap { resource_id: u32 },
    /// The renderer answered `Unmap`.
    BlobUnmap { resource_id: u32 },
    /// The renderer answered `Finalize`.
    BlobFinalize { resource_id: u32 },
}

pub(crate) struct PendingReply {
    /// (queue, entry id) of the guest command waiting for this reply, if any.
    pub(crate) entry: Option<(usize, u64)>,
    pub(crate) after: After,
}

/// A guest command between being popped and being answered.
pub(crate) struct Entry {
    id: u64,
    chain: Chain,
    hdr: Option<CtrlHeader>,
    response: Response,
    pub(crate) replies_left: u32,
    fence: Option<FenceInfo>,
    pub(crate) fence_done: bool,
    /// Suspended on a blob's mapping state machine (map answer or unmap completion).
    pub(crate) waiting_on: Option<crate::blobs::Wait>,
    /// When a MAP_BLOB or UNMAP_BLOB arrived, for the latency histograms (other commands
    /// do not pay for reading the clock).
    arrived: Option<std::time::Instant>,
    /// What a TRANSFER_TO_HOST_2D copies, counted once it is answered without error.
    transfer_bytes: u64,
}

impl Entry {
    pub(crate) fn set_response(&mut self, response: Response) {
        self.response = response;
    }

    /// Answers it with `code`, unless it already has an error (the first one stands).
    pub(crate) fn fail(&mut self, code: ErrorCode) {
        if !matches!(self.response, Response::Err(_)) {
            self.response = Response::Err(code);
        }
    }

    /// Whether it waits for a fence.
    pub(crate) fn fence_pending(&self) -> bool {
        self.fence.is_some() && !self.fence_done
    }

    fn ready(&self) -> bool {
        self.replies_left == 0
            && (self.fence.is_none() || self.fence_done)
            && self.waiting_on.is_none()
    }
}

/// The actor's state.
pub struct Control {
    pub(crate) config: DeviceConfig,
    /// The command being read, reused from one command to the next.
    request_buf: Vec<u8>,
    /// The response being written, likewise.
    response_buf: Vec<u8>,
    /// Damage converted for an UPDATE (a sub-rectangle, or a format other than BGRX),
    /// likewise.
    pub(crate) update_buf: Vec<u8>,
    /// The renderer's events being handled, likewise.
    events_buf: Vec<RendererEvent>,
    pub(crate) link: RendererLink,
    pub(crate) resources: ResourceTable,
    pub(crate) scanouts: Vec<Scanout>,
    pub(crate) display: Option<Display>,
    pub(crate) mem: Option<GuestMem>,
    vrings: [Option<VringRwLock>; NUM_QUEUES],
    stopping: [Option<crossbeam_channel::Sender<()>>; NUM_QUEUES],
    pub(crate) fifos: [VecDeque<Entry>; NUM_QUEUES],
    /// The control queue had work left when it was blocked on a blob: drain it again once
    /// unblocked (the driver will not kick for what it already queued).
    control_deferred: bool,
    pub(crate) pending: HashMap<u64, PendingReply>,
    /// Quiet requests (answered already, see `request_decided`) not yet known to have
    /// succeeded, oldest first: a reply to a later request settles them.
    pub(crate) quiet: VecDeque<(u64, After)>,
    next_entry_id: u64,
    /// The entry being executed right now, so `request` can charge replies to it.
    pub(crate) current: Option<(usize, u64)>,
    event_idx: Arc<AtomicBool>,
    pub(crate) stats: Stats,
    /// Blobs, contexts, the host-visible window and the VMM request thread.
    pub(crate) blobs: crate::blobs::Blobs,
    /// A disconnect's reset is under way: told when it has finished.
    disconnected: Option<crossbeam_channel::Sender<()>>,
    /// Where new links to a restarted renderer-worker come from (None: a renderer death
    /// ends the device).
    pub(crate) renewals: Option<crate::restart::Renewals>,
    /// The queues that have work left which waits for a renderer to be linked again.
    pub(crate) held: [bool; NUM_QUEUES],
    /// What the dead renderer owed has been answered (until the next link).
    pub(crate) loss_settled: bool,
    /// Test only: the forbidden call to ask the renderer for on the first guest command.
    #[cfg(feature = "test-hooks")]
    test_forbidden: Option<protocol::ipc::ForbiddenSyscall>,
    /// Test only: the frontend itself tries to open the render node on the first command.
    #[cfg(feature = "test-hooks")]
    test_frontend_open: bool,
}

/// Test only: reads [`protocol::ipc::TEST_FORBIDDEN_ENV`] (`open`, `socket`, `exec`).
#[cfg(feature = "test-hooks")]
fn test_forbidden_from_env() -> Option<protocol::ipc::ForbiddenSyscall> {
    use protocol::ipc::{ForbiddenSyscall, TEST_FORBIDDEN_ENV};
    let value = std::env::var(TEST_FORBIDDEN_ENV).ok()?;
    if value == FRONTEND_OPEN_HOOK {
        return None;
    }
    let which = ForbiddenSyscall::from_env_value(&value);
    match which {
        Some(which) => log::warn!(
            "test hook: the renderer will be asked to make {which:?} on the first guest command"
        ),
        None => log::error!(
            "test hook: {TEST_FORBIDDEN_ENV}={value:?} is not open, socket, exec or \
             {FRONTEND_OPEN_HOOK}; ignored"
        ),
    }
    which
}

/// Test only: the value of [`protocol::ipc::TEST_FORBIDDEN_ENV`] that makes the frontend
/// itself open the render node, which its filter forbids.
#[cfg(feature = "test-hooks")]
const FRONTEND_OPEN_HOOK: &str = "frontend-open-render-node";

/// Counters for the log at shutdown and the metrics (`crate::metrics`): fixed arrays
/// and plain integers, bumped by the single-threaded actor with no allocation or lock.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands answered.
    pub commands: u64,
    /// Commands answered with an error.
    pub errors: u64,
    /// UPDATE messages sent.
    pub updates: u64,
    /// Pixel bytes sent in UPDATEs.
    pub update_bytes: u64,
    /// Commands answered, by `protocol::metrics::command_index`.
    pub by_type: [u64; protocol::metrics::COMMAND_KINDS],
    /// Error answers, by `protocol::metrics::error_index`.
    pub by_error: [u64; protocol::metrics::ERROR_KINDS],
    /// Fenced commands answered.
    pub fences: u64,
    /// TRANSFER_TO_HOST_2D payload bytes.
    pub transfer_bytes: u64,
    /// MAP_BLOB arrival to successful answer.
    pub map_latency: protocol::metrics::Histogram,
    /// UNMAP_BLOB arrival to successful answer.
    pub unmap_latency: protocol::metrics::Histogram,
}

impl Control {
    /// A fresh device.
    pub fn new(config: DeviceConfig, link: RendererLink, event_idx: Arc<AtomicBool>) -> Self {
        let scanouts = config.outputs.iter().map(|_| Scanout::default()).collect();
        Control {
            request_buf: Vec::new(),
            response_buf: Vec::new(),
            update_buf: Vec::new(),
            events_buf: Vec::new(),
            resources: ResourceTable::new(config.limits),
            config,
            link,
            scanouts,
            display: None,
            mem: None,
            vrings: [None, None],
            stopping: [None, None],
            fifos: [VecDeque::new(), VecDeque::new()],
            control_deferred: false,
            pending: HashMap::new(),
            quiet: VecDeque::new(),
            next_entry_id: 1,
            current: None,
            event_idx,
            stats: Stats::default(),
            blobs: crate::blobs::Blobs::default(),
            disconnected: None,
            renewals: None,
            held: [false; NUM_QUEUES],
            loss_settled: false,
            #[cfg(feature = "test-hooks")]
            test_forbidden: test_forbidden_from_env(),
            #[cfg(feature = "test-hooks")]
            test_frontend_open: std::env::var(protocol::ipc::TEST_FORBIDDEN_ENV)
                .is_ok_and(|v| v == FRONTEND_OPEN_HOOK),
        }
    }

    /// Handles one mailbox input. An Err means the device cannot go on.
    pub fn handle(&mut self, input: Input) -> Result<(), FrontendError> {
        match input {
            Input::Kick { queue, vring } => self.kick(queue, vring)?,
            Input::Memory(mem) => self.set_memory(mem)?,
            Input::GpuSocket(backend) => match Display::connect(backend) {
                Ok(d) => self.display = Some(d),
                Err(e) => log::warn!("display socket handshake failed: {e}"),
            },
            Input::Reset => self.reset()?,
            Input::VmmChannel(vmm) => self.set_vmm_channel(vmm)?,
            Input::Disconnected { done } => {
                // Nothing of the old VMM may be used again: its memory table and rings
                // are gone, and the renderer's Reset drops its mappings.
                self.mem = None;
                self.vrings = [None, None];
                self.stopping = [None, None];
                self.disconnected = Some(done);
                // Its mappings went with it: the reset's unmaps need no ack from it.
                self.drop_vmm_channel()?;
                self.reset()?;
            }
            Input::StopQueue { queue, done } => {
                if let Some(slot) = self.stopping.get_mut(queue as usize) {
                    *slot = Some(done);
                }
            }
        }
        Ok(())
    }

    /// The renderer (or the broker, with a new renderer) rang the doorbell: take the
    /// renderer's replies and fence completions; if it is gone, answer what it owed and
    /// take a new link if the broker has one.
    pub fn renderer_events(&mut self) -> Result<(), FrontendError> {
        // The buffer is taken out while its events are handled (they need the actor) and
        // put back empty, so its capacity serves the next batch.
        let mut events = std::mem::take(&mut self.events_buf);
        let gone = self.link.take_events(&mut events);
        for event in events.drain(..) {
            match event {
                RendererEvent::Reply { seq, result } => self.on_reply(seq, result),
                RendererEvent::FenceSignaled(f) => self.on_fence(f),
            }
        }
        self.events_buf = events;
        if gone {
            self.renderer_gone("its event channel closed");
            self.settle_renderer_loss()?;
            self.take_renewal()?;
        }
        Ok(())
    }

    /// Quiet renderer requests not yet known to have succeeded (bounded by
    /// `MAX_QUIET`).
    pub fn quiet_in_flight(&self) -> usize {
        self.quiet.len()
    }

    /// The doorbell the event loop must watch.
    pub fn renderer_doorbell(&self) -> std::os::fd::RawFd {
        self.link.doorbell_fd()
    }

    /// The driver kicked `queue`: take every available command.
    pub fn kick(&mut self, queue: u16, vring: VringRwLock) -> Result<(), FrontendError> {
        if let Some(slot) = self.vrings.get_mut(queue as usize) {
            *slot = Some(vring);
            // A kick means the ring runs (again): a stop that gave up waiting for its
            // in-flight commands must not release the restarted ring later.
            self.stopping[queue as usize] = None;
            self.drain_queue(queue as usize)?;
        }
        Ok(())
    }

    /// Answers whatever has become answerable and releases stopped queues; called after
    /// every batch of inputs.
    pub fn settle(&mut self) -> Result<(), FrontendError> {
        self.settle_renderer_loss()?;
        let control = CONTROL_QUEUE as usize;
        // Answering may unblock the control queue, and draining it may answer more.
        while self.control_deferred && !self.control_blocked() {
            self.control_deferred = false;
            self.complete_ready(control);
            self.drain_queue(control)?;
        }
        for q in 0..NUM_QUEUES {
            self.complete_ready(q);
            self.release_if_stopped(q);
        }
        Ok(())
    }

    /// Ends a batch of inputs: answers what became answerable, then sends the renderer
    /// every request the batch made, in one message. Called by the event loop before it
    /// sleeps again.
    pub fn finish_batch(&mut self) -> Result<(), FrontendError> {
        // Acks that arrived while a request to the VMM was being sent.
        self.take_vmm_answers()?;
        self.settle()?;
        if let Err(e) = self.link.flush() {
            self.renderer_gone(&e.to_string());
            // What it owed now includes the batch that could not be sent.
            self.settle()?;
        }
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub(crate) fn set_memory(&mut self, mem: GuestMem) -> Result<(), FrontendError> {
        use protocol::ipc::GuestRegion;
        use std::os::fd::AsFd;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

        let snapshot = mem.memory();
        let mut regions = Vec::new();
        let mut fds = Vec::new();
        for region in snapshot.iter() {
            let Some(fo) = region.file_offset() else {
                log::warn!(
                    "guest memory region at {:#x} has no fd; the renderer cannot reach it",
                    region.start_addr().0
                );
                continue;
            };
            regions.push(GuestRegion {
                guest_addr: region.start_addr().0,
                size: region.len(),
                fd_offset: fo.start(),
            });
            fds.push(fo.file().as_fd());
        }
        log::info!("guest memory table: {} region(s)", regions.len());
        let ticket = match self.link.send_fds(&fds) {
            Ok(ticket) => ticket,
            Err(e) => {
                // The next renderer gets the table when it is linked.
                drop(fds);
                self.renderer_gone(&e.to_string());
                self.mem = Some(mem);
                return Ok(());
            }
        };
        drop(fds);
        self.mem = Some(mem.clone());
        self.request(
            RendererOp::SetGuestMemory {
                regions,
                fds: ticket,
            },
            None,
            After::Nothing,
        )?;
        Ok(())
    }

    fn reset(&mut self) -> Result<(), FrontendError> {
        log::info!(
            "device reset: dropping {} resource(s) and {} in-flight command(s)",
            self.resources.len(),
            self.fifos.iter().map(VecDeque::len).sum::<usize>()
        );
        for fifo in &mut self.fifos {
            fifo.clear();
        }
        self.current = None;
        // Replies that drive a blob's state machine still matter (the unmaps the reset
        // waits for depend on them); they just answer nobody now. Any other reply of the
        // old device is dropped.
        self.pending.retain(|_, p| {
            p.entry = None;
            matches!(
                p.after,
                After::Nothing
                    | After::BlobMap { .. }
                    | After::BlobUnmap { .. }
                    | After::BlobFinalize { .. }
            )
        });
        if self.reset_blobs()? {
            // Finished by the last unmap's completion (`finish_reset`).
            return Ok(());
        }
        self.finish_reset()
    }

    /// The rest of a device reset, once no blob is in the host-visible window.
    pub(crate) fn finish_reset(&mut self) -> Result<(), FrontendError> {
        self.resources.clear();
        for (id, s) in self.scanouts.iter_mut().enumerate() {
            if s.is_enabled() {
                if let Some(d) = self.display.as_mut() {
                    d.scanout(id as u32, 0, 0);
                }
            }
            s.clear();
        }
        self.request(RendererOp::Reset, None, After::Nothing)?;
        // A virtio reset does not change the vhost-user memory table, but the renderer's
        // Reset drops its mappings with everything else: hand the table over again.
        if let Some(mem) = self.mem.clone() {
            self.set_memory(mem)?;
        }
        if let Some(done) = self.disconnected.take() {
            // The last unmap (if any) has been acknowledged, the channel is no longer
            // needed; the next VMM brings its own display socket and channel.
            self.display = None;
            self.drop_vmm_channel()?;
            log::info!(
                "device reset after the VMM disconnected: {} command(s) served so far",
                self.stats.commands
            );
            let _ = done.send(());
        }
        Ok(())
    }

    /// Sends a renderer request on behalf of the command being executed (if any).
    pub(crate) fn request(
        &mut self,
        op: RendererOp,
        fence: Option<FenceInfo>,
        after: After,
    ) -> Result<(), FrontendError> {
        let seq = self.send_or_burn(op, fence, false);
        let entry = self.current;
        if let Some((q, id)) = entry {
            if let Some(e) = self.fifos[q].iter_mut().rev().find(|e| e.id == id) {
                e.replies_left += 1;
                if fence.is_some() {
                    e.fence = fence;
                }
            }
        }
        self.pending.insert(seq, PendingReply { entry, after });
        Ok(())
    }

    /// Queues `op` for the renderer; its sequence number. A request that cannot be sent
    /// is recorded as sent all the same: `settle_renderer_loss` answers it with everything
    /// else the renderer owed, at a point where no state machine is half-way through a
    /// step.
    fn send_or_burn(&mut self, op: RendererOp, fence: Option<FenceInfo>, quiet: bool) -> u64 {
        match self.link.send(op, fence, quiet) {
            Ok(seq) => seq,
            Err(e) => {
                self.renderer_gone(&e.to_string());
                self.link.burn_seq()
            }
        }
    }

    /// Sends a request whose outcome the frontend's own checks have decided already (an
    /// unfenced command that needs no rollback), so that the guest can be answered now:
    /// the renderer still executes it in order with everything else, so a later command
    /// sees its effect, and a refusal in its reply is logged only.
    pub(crate) fn request_decided(
        &mut self,
        op: RendererOp,
        after: After,
    ) -> Result<(), FrontendError> {
        // Quiet: no reply unless refused. A bounded number at a time, so that a guest that
        // sends nothing else still gets a reply now and then, which settles the rest.
        if self.quiet.len() < MAX_QUIET {
            let seq = self.send_or_burn(op, None, true);
            self.quiet.push_back((seq, after));
            return Ok(());
        }
        // Charged to no guest command: it has been answered.
        let current = self.current.take();
        let sent = self.request(op, None, after);
        self.current = current;
        sent
    }

    pub(crate) fn drain_queue(&mut self, q: usize) -> Result<(), FrontendError> {
        let (Some(vring), Some(mem)) = (self.vrings[q].clone(), self.mem.clone()) else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            // A stopped ring (GET_VRING_BASE) still shows new avail entries; without this
            // check the EVENT_IDX re-check below would spin on them forever.
            if !vring.get_ref().get_queue().ready() {
                break;
            }
            if event_idx {
                if let Err(e) = vring.disable_notification() {
                    crate::guest_warn!("queue {q}: disabling notifications failed: {e}");
                }
            }
            loop {
                if !self.link.is_alive() {
                    // Everything it would ask the renderer waits for the next one.
                    self.held[q] = true;
                    return Ok(());
                }
                if q == CONTROL_QUEUE as usize && self.control_blocked() {
                    self.control_deferred = true;
                    return Ok(());
                }
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.memory());
                let Some(chain) = chain else { break };
                self.handle_chain(q, chain)?;
            }
            if !event_idx {
                break;
            }
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    crate::guest_warn!("queue {q}: enabling notifications failed: {e}");
                    break;
                }
            }
        }
        Ok(())
    }

    fn handle_chain(&mut self, q: usize, chain: Chain) -> Result<(), FrontendError> {
        #[cfg(feature = "test-hooks")]
        if std::mem::take(&mut self.test_frontend_open) {
            log::warn!("test hook: device-frontend opening the render node");
            let path = c"/dev/dri/renderD128";
            // SAFETY: FFI with a NUL-terminated path; the result is only closed.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
            // Only reached when the filter let the call through (--seccomp log).
            log::error!("test hook: open of the render node returned {fd}; the filter allowed it");
            if fd >= 0 {
                // SAFETY: `fd` was just returned by open and is owned by nothing else.
                unsafe { libc::close(fd) };
            }
        }
        #[cfg(feature = "test-hooks")]
        if let Some(which) = self.test_forbidden.take() {
            // Charged to no guest command: the renderer is not expected to answer.
            self.request(
                RendererOp::TestForbiddenSyscall { which },
                None,
                After::Nothing,
            )?;
        }
        let id = self.next_entry_id;
        self.next_entry_id += 1;
        let max = self.max_request_bytes();
        let read = crate::chain_io::read_request(&chain, max, &mut self.request_buf);
        self.fifos[q].push_back(Entry {
            id,
            chain,
            hdr: None,
            response: Response::OkNodata,
            replies_left: 0,
            fence: None,
            fence_done: false,
            waiting_on: None,
            arrived: None,
            transfer_bytes: 0,
        });
        let queue = if q == CONTROL_QUEUE as usize {
            Queue::Control
        } else {
            Queue::Cursor
        };
        let outcome = match read {
            Ok(()) => {
                let limits = crate::decode::DecodeLimits::from(&self.config.limits);
                let bytes = &self.request_buf;
                let decoded = if self.config.virgl {
                    crate::decode::decode_virgl(queue, bytes, limits)
                } else {
                    crate::decode::decode(queue, bytes, limits)
                };
                if self.request_buf.capacity() > KEPT_REQUEST_BUFFER {
                    // A rare large command (a SUBMIT_3D stream, a CREATE_BLOB with many
                    // entries) does not keep its megabytes for the life of the device.
                    self.request_buf = Vec::new();
                }
                match decoded {
                    Ok(req) => {
                        self.set_current_hdr(q, id, Some(req.hdr));
                        self.note_for_metrics(q, id, &req);
                        self.current = Some((q, id));
                        let r = self.execute(req);
                        self.current = None;
                        r
                    }
                    Err(e) => {
                        crate::guest_warn!("queue {q}: rejected command: {e}");
                        self.set_current_hdr(q, id, e.header());
                        Ok(Err(e.error_code()))
                    }
                }
            }
            Err(why) => {
                crate::guest_warn!("queue {q}: unreadable descriptor chain: {why}");
                Ok(Err(ErrorCode::Unspec))
            }
        };
        match outcome? {
            Ok(Some(response)) => self.set_response(q, id, response),
            Ok(None) => {}
            Err(code) => self.set_response(q, id, Response::Err(code)),
        }
        Ok(())
    }

    fn max_request_bytes(&self) -> usize {
        use protocol::virtio_gpu::{CMD_SUBMIT_SIZE, RESOURCE_CREATE_BLOB_SIZE};
        // The largest command the limits allow: a CREATE_BLOB (the larger fixed part of the
        // two commands with entries) with every entry, or a SUBMIT_3D with its whole stream.
        // The limits are validated (policy::limits), so this is a few MiB at most.
        let limits = &self.config.limits;
        let entries = (limits.max_backing_entries as usize)
            .saturating_mul(protocol::virtio_gpu::MEM_ENTRY_SIZE)
            .saturating_add(RESOURCE_CREATE_BLOB_SIZE);
        let submit = (limits.max_submit_bytes as usize).saturating_add(CMD_SUBMIT_SIZE);
        entries.max(submit).max(4096)
    }

    pub(crate) fn entry_mut(&mut self, q: usize, id: u64) -> Option<&mut Entry> {
        self.fifos[q].iter_mut().rev().find(|e| e.id == id)
    }

    /// What the metrics need of a command at its arrival: the clock for the two timed
    /// commands, the payload of a 2D transfer.
    fn note_for_metrics(&mut self, q: usize, id: u64, req: &protocol::virtio_gpu::Request) {
        use protocol::virtio_gpu::Command;
        let (arrived, transfer_bytes) = match &req.cmd {
            Command::ResourceMapBlob { .. } | Command::ResourceUnmapBlob { .. } => {
                (Some(std::time::Instant::now()), 0)
            }
            // The rectangle is not checked yet: a guest's u32 sides can overflow the product.
            Command::TransferToHost2d { rect, .. } => (
                None,
                u64::from(rect.width)
                    .saturating_mul(u64::from(rect.height))
                    .saturating_mul(crate::resources::BYTES_PER_PIXEL),
            ),
            _ => return,
        };
        if let Some(e) = self.entry_mut(q, id) {
            e.arrived = arrived;
            e.transfer_bytes = transfer_bytes;
        }
    }

    /// Counts an answered command.
    fn count_answer(&mut self, entry: &Entry) {
        use protocol::metrics::{command_index, error_index};
        use protocol::virtio_gpu::{
            VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB, VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
        };
        let s = &mut self.stats;
        s.commands += 1;
        let type_ = entry.hdr.as_ref().map_or(0, |h| h.type_);
        s.by_type[command_index(type_)] += 1;
        if entry.fence.is_some() {
            s.fences += 1;
        }
        if let Response::Err(code) = entry.response {
            s.errors += 1;
            s.by_error[error_index(code)] += 1;
            return;
        }
        s.transfer_bytes = s.transfer_bytes.saturating_add(entry.transfer_bytes);
        if let Some(arrived) = entry.arrived {
            let histogram = match type_ {
                VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => &mut s.map_latency,
                VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => &mut s.unmap_latency,
                _ => return,
            };
            histogram.observe(arrived.elapsed());
        }
    }

    fn set_current_hdr(&mut self, q: usize, id: u64, hdr: Option<CtrlHeader>) {
        if let Some(e) = self.entry_mut(q, id) {
            e.hdr = hdr;
        }
    }

    pub(crate) fn set_response(&mut self, q: usize, id: u64, response: Response) {
        if let Some(e) = self.entry_mut(q, id) {
            e.response = response;
        }
    }

    fn on_reply(&mut self, seq: u64, result: Result<ReplyBody, protocol::ipc::RenderError>) {
        // Replies come in order: the quiet requests before this one succeeded.
        while self.quiet.front().is_some_and(|(q, _)| *q < seq) {
            self.quiet.pop_front();
        }
        if self.quiet.front().is_some_and(|(q, _)| *q == seq) {
            if let (Some((_, after)), Err(e)) = (self.quiet.pop_front(), &result) {
                crate::guest_warn!("renderer refused request {seq}: {e}");
                self.after_err(after);
            }
            return;
        }
        let Some(p) = self.pending.remove(&seq) else {
            log::warn!("renderer replied to unknown request {seq}; ignored");
            return;
        };
        let outcome = match result {
            Ok(body) => self.after_ok(p.after, body),
            Err(e) => {
                crate::guest_warn!("renderer refused request {seq}: {e}");
                self.after_err(p.after);
                Err(render_error_code(&e))
            }
        };
        if let Some((q, id)) = p.entry {
            if let Some(e) = self.entry_mut(q, id) {
                e.replies_left = e.replies_left.saturating_sub(1);
                match outcome {
                    Err(code) => {
                        if !matches!(e.response, Response::Err(_)) {
                            e.response = Response::Err(code);
                        }
                    }
                    Ok(Some(response)) => {
                        if !matches!(e.response, Response::Err(_)) {
                            e.response = response;
                        }
                    }
                    Ok(None) => {}
                }
            }
        }
    }

    fn on_fence(&mut self, f: FenceInfo) {
        for fifo in &mut self.fifos {
            for e in fifo.iter_mut() {
                if let Some(mine) = e.fence {
                    if mine.ctx_id == f.ctx_id
                        && mine.ring_idx == f.ring_idx
                        && mine.fence_id <= f.fence_id
                    {
                        e.fence_done = true;
                    }
                }
            }
        }
    }

    fn release_if_stopped(&mut self, q: usize) {
        if self.stopping[q].is_some() && self.fifos[q].is_empty() {
            self.vrings[q] = None;
            if let Some(done) = self.stopping[q].take() {
                let _ = done.send(());
            }
        }
    }

    fn complete_ready(&mut self, q: usize) {
        let Some(vring) = self.vrings[q].clone() else {
            return;
        };
        let mut used = false;
        while self.fifos[q].front().is_some_and(Entry::ready) {
            let Some(entry) = self.fifos[q].pop_front() else {
                break;
            };
            self.count_answer(&entry);
            encode_response_into(entry.hdr.as_ref(), &entry.response, &mut self.response_buf);
            let written = write_response(&entry.chain, &self.response_buf);
            if let Err(e) = vring.add_used(entry.chain.head_index(), written) {
                crate::guest_warn!("queue {q}: add_used failed: {e}");
            }
            used = true;
        }
        if used {
            match vring.needs_notification() {
                Ok(true) => {
                    if let Err(e) = vring.signal_used_queue() {
                        log::warn!("queue {q}: signalling the driver failed: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => crate::guest_warn!("queue {q}: needs_notification failed: {e}"),
            }
        }
    }
}

/// Maps a renderer refusal onto the guest-visible error.
fn render_error_code(e: &protocol::ipc::RenderError) -> ErrorCode {
    use protocol::ipc::RenderError;
    match e {
        RenderError::InvalidResource(_) => ErrorCode::InvalidResourceId,
        RenderError::InvalidParameter(_) => ErrorCode::InvalidParameter,
        RenderError::OutOfMemory(_) => ErrorCode::OutOfMemory,
        RenderError::Unspec(_) => ErrorCode::Unspec,
    }
}

/// Writes as much of the response as the chain's writable part holds; returns the length
/// written (0 when the chain has no usable writable part).
fn write_response(chain: &Chain, bytes: &[u8]) -> u32 {
    match crate::chain_io::write_response(chain, bytes) {
        Ok(w) => {
            if w.room < bytes.len() {
                crate::guest_warn!(
                    "response truncated: {} bytes of room for a {}-byte response",
                    w.room,
                    bytes.len()
                );
            }
            w.len
        }
        Err(e) => {
            crate::guest_warn!("response not written: bad writable descriptors: {e}");
            0
        }
    }
}
