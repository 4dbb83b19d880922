//! The VMM end of the vhost-user-gpu display socket (what QEMU's vhost-user-gpu device does).
//!
//! A thread reads the backend's requests (12-byte header: request, flags, size; then `size`
//! bytes), answers the ones the backend waits for (GET_PROTOCOL_FEATURES, GET_DISPLAY_INFO,
//! GET_EDID), validates everything, keeps a framebuffer per scanout and records typed events.
//! Anything that breaks the protocol is recorded as a violation for the tests to fail on.
//!
//! Receiving costs what a real VMM pays and no more (it is inside every benchmarked frame):
//! one receive buffer reused for every message, and a large UPDATE of full framebuffer rows
//! goes from the socket straight into the framebuffer (then hashed from there), without a
//! copy. Such an update is visible row by row while it arrives (the lock is taken per
//! socket read, never across a blocking one); its event comes once it is complete, and a
//! socket closed inside it leaves the rows received so far in the framebuffer.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::gpu_message::{
    VirtioGpuCtrlHdr, VirtioGpuDisplayOne, VirtioGpuRect, VirtioGpuRespDisplayInfo,
    VirtioGpuRespGetEdid, VIRTIO_GPU_MAX_SCANOUTS,
};
use vm_memory::ByteValued;

/// vhost-user-gpu request codes (QEMU docs/interop/vhost-user-gpu.rst).
pub mod req {
    /// VHOST_USER_GPU_GET_PROTOCOL_FEATURES
    pub const GET_PROTOCOL_FEATURES: u32 = 1;
    /// VHOST_USER_GPU_SET_PROTOCOL_FEATURES
    pub const SET_PROTOCOL_FEATURES: u32 = 2;
    /// VHOST_USER_GPU_GET_DISPLAY_INFO
    pub const GET_DISPLAY_INFO: u32 = 3;
    /// VHOST_USER_GPU_CURSOR_POS
    pub const CURSOR_POS: u32 = 4;
    /// VHOST_USER_GPU_CURSOR_POS_HIDE
    pub const CURSOR_POS_HIDE: u32 = 5;
    /// VHOST_USER_GPU_CURSOR_UPDATE
    pub const CURSOR_UPDATE: u32 = 6;
    /// VHOST_USER_GPU_SCANOUT
    pub const SCANOUT: u32 = 7;
    /// VHOST_USER_GPU_UPDATE
    pub const UPDATE: u32 = 8;
    /// VHOST_USER_GPU_DMABUF_SCANOUT
    pub const DMABUF_SCANOUT: u32 = 9;
    /// VHOST_USER_GPU_DMABUF_UPDATE
    pub const DMABUF_UPDATE: u32 = 10;
    /// VHOST_USER_GPU_GET_EDID
    pub const GET_EDID: u32 = 11;
    /// VHOST_USER_GPU_DMABUF_SCANOUT2
    pub const DMABUF_SCANOUT2: u32 = 12;
}

/// Reply flag in the vhost-user-gpu header.
const FLAG_REPLY: u32 = 0x4;
/// VHOST_USER_GPU_PROTOCOL_F_EDID.
pub const GPU_PROTOCOL_F_EDID: u64 = 1 << 0;
/// Cursor images are 64x64 pixels, 4 bytes each.
pub const CURSOR_BYTES: usize = 64 * 64 * 4;
/// Largest message we accept (a 16384x16384 UPDATE would be 1 GiB; no test needs that).
const MAX_MESSAGE: u32 = 256 << 20;
/// virtio-gpu response codes used in replies.
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
const RESP_OK_EDID: u32 = 0x1104;

/// One thing the backend did on the display socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DisplayEvent {
    /// GET_PROTOCOL_FEATURES (answered with EDID).
    ProtocolFeaturesRequested,
    /// SET_PROTOCOL_FEATURES with this mask.
    ProtocolFeaturesSet(u64),
    /// GET_DISPLAY_INFO (answered from the configured outputs).
    DisplayInfoRequested,
    /// GET_EDID for a scanout (answered with a generated EDID).
    EdidRequested {
        /// Scanout asked about.
        scanout_id: u32,
    },
    /// SCANOUT: the scanout's size changed (0x0 disables it).
    Scanout {
        /// Scanout.
        scanout_id: u32,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// UPDATE: a rectangle of BGRX pixels was written to a scanout (pixels are in the
    /// framebuffer, not in the event, to keep the log small).
    Update {
        /// Scanout.
        scanout_id: u32,
        /// Left.
        x: u32,
        /// Top.
        y: u32,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
        /// [`payload_hash`] of the pixel payload, to tell updates apart cheaply.
        hash: u64,
    },
    /// CURSOR_POS.
    CursorPos {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
    },
    /// CURSOR_POS_HIDE.
    CursorHide {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
    },
    /// CURSOR_UPDATE with a 64x64 BGRA image.
    CursorUpdate {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
        /// Hotspot x.
        hot_x: u32,
        /// Hotspot y.
        hot_y: u32,
        /// 64*64*4 bytes.
        image: Vec<u8>,
    },
    /// The backend closed the socket.
    Closed,
}

/// A scanout's framebuffer as assembled from SCANOUT and UPDATE messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Framebuffer {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// BGRX pixels, `width * 4` bytes per row.
    pub pixels: Vec<u8>,
}

/// What the display peer answers for GET_PROTOCOL_FEATURES / GET_DISPLAY_INFO / GET_EDID.
#[derive(Clone, Debug)]
pub struct DisplayConfig {
    /// Outputs (width, height) the VMM's UI would show.
    pub outputs: Vec<(u32, u32)>,
    /// Offer VHOST_USER_GPU_PROTOCOL_F_EDID (QEMU does).
    pub offer_edid: bool,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            outputs: vec![(1280, 800)],
            offer_edid: true,
        }
    }
}

/// Errors of the display peer.
#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    /// The wait ran out.
    #[error("no {what} within {timeout:?} (display socket {state}; recent events: {recent}; violations: {violations:?})")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// "open" or "closed".
        state: &'static str,
        /// The last few events.
        recent: String,
        /// Protocol violations so far.
        violations: Vec<String>,
    },
    /// Starting the thread failed.
    #[error("cannot start the display thread: {0}")]
    Spawn(#[source] std::io::Error),
}

#[derive(Default)]
struct State {
    events: Vec<DisplayEvent>,
    framebuffers: BTreeMap<u32, Framebuffer>,
    cursor_image: Option<Vec<u8>>,
    violations: Vec<String>,
    closed: bool,
    bytes_updated: u64,
    // The mask of the last SET_PROTOCOL_FEATURES.
    acked_features: u64,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to what the display peer has seen. `wait_for` consumes events in order, like a
/// channel receiver that skips events it is not interested in.
pub struct DisplayEvents {
    shared: Arc<Shared>,
    cursor: Mutex<usize>,
}

impl DisplayEvents {
    /// Waits (bounded) for the next event after the last one `wait_for` returned that
    /// matches `pred`; events before it are consumed. `what` names it in the error.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&DisplayEvent) -> bool,
    ) -> Result<DisplayEvent, DisplayError> {
        let deadline = Instant::now() + timeout;
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = self.shared.lock();
        loop {
            while *cursor < st.events.len() {
                let i = *cursor;
                *cursor += 1;
                if pred(&st.events[i]) {
                    return Ok(st.events[i].clone());
                }
            }
            let now = Instant::now();
            if st.closed || now >= deadline {
                let recent = st
                    .events
                    .iter()
                    .rev()
                    .take(6)
                    .map(|e| format!("{}", Short(e)))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(DisplayError::Timeout {
                    what: what.to_string(),
                    timeout,
                    state: if st.closed { "closed" } else { "open" },
                    recent,
                    violations: st.violations.clone(),
                });
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits for the next UPDATE on `scanout_id`.
    pub fn wait_update(
        &self,
        scanout_id: u32,
        timeout: Duration,
    ) -> Result<DisplayEvent, DisplayError> {
        self.wait_for(
            &format!("VHOST_USER_GPU_UPDATE for scanout {scanout_id}"),
            timeout,
            |e| matches!(e, DisplayEvent::Update { scanout_id: s, .. } if *s == scanout_id),
        )
    }

    /// Consumes every event seen so far, so the next `wait_for` only sees newer ones.
    pub fn skip_to_end(&self) {
        let len = self.shared.lock().events.len();
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = len;
    }

    /// Events not yet consumed by `wait_for` (a snapshot; does not consume).
    pub fn pending(&self) -> Vec<DisplayEvent> {
        let cursor = *self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.shared.lock();
        st.events
            .get(cursor..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    /// Every event so far.
    pub fn all_events(&self) -> Vec<DisplayEvent> {
        self.shared.lock().events.clone()
    }

    /// The scanout's framebuffer: (width, height, BGRX pixels), if it was ever set.
    pub fn framebuffer(&self, scanout_id: u32) -> Option<(u32, u32, Vec<u8>)> {
        self.shared
            .lock()
            .framebuffers
            .get(&scanout_id)
            .map(|f| (f.width, f.height, f.pixels.clone()))
    }

    /// Runs `f` on the scanout's framebuffer without copying it.
    pub fn with_framebuffer<R>(
        &self,
        scanout_id: u32,
        f: impl FnOnce(&Framebuffer) -> R,
    ) -> Option<R> {
        self.shared.lock().framebuffers.get(&scanout_id).map(f)
    }

    /// The last cursor image (64*64*4 bytes).
    pub fn cursor_image(&self) -> Option<Vec<u8>> {
        self.shared.lock().cursor_image.clone()
    }

    /// Protocol violations seen so far (each a sentence).
    pub fn violations(&self) -> Vec<String> {
        self.shared.lock().violations.clone()
    }

    /// Whether the backend closed the display socket.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Total UPDATE pixel payload bytes received.
    pub fn bytes_updated(&self) -> u64 {
        self.shared.lock().bytes_updated
    }
}

/// An event formatted without its pixel payload, for messages.
pub fn summarize(e: &DisplayEvent) -> String {
    Short(e).to_string()
}

/// Compact event formatting for error messages (no pixel dumps).
struct Short<'a>(&'a DisplayEvent);

impl std::fmt::Display for Short<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            DisplayEvent::CursorUpdate {
                scanout_id,
                x,
                y,
                hot_x,
                hot_y,
                ..
            } => write!(
                f,
                "CursorUpdate{{scanout {scanout_id} at {x},{y} hot {hot_x},{hot_y}}}"
            ),
            DisplayEvent::Update {
                scanout_id,
                x,
                y,
                width,
                height,
                ..
            } => write!(f, "Update{{scanout {scanout_id} {x},{y} {width}x{height}}}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// The display-socket peer: owns the reader thread.
pub struct DisplayPeer {
    events: Arc<DisplayEvents>,
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
}

impl DisplayPeer {
    /// Starts serving `stream` (our end of the socketpair given to the backend).
    pub fn start(stream: UnixStream, config: DisplayConfig) -> Result<DisplayPeer, DisplayError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let reader = stream.try_clone().map_err(DisplayError::Spawn)?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vmm-display".into())
            .spawn(move || serve(reader, &thread_shared, &config))
            .map_err(DisplayError::Spawn)?;
        Ok(DisplayPeer {
            events: Arc::new(DisplayEvents {
                shared,
                cursor: Mutex::new(0),
            }),
            stream,
            thread: Some(thread),
        })
    }

    /// The event handle (shareable).
    pub fn events(&self) -> &Arc<DisplayEvents> {
        &self.events
    }
}

impl Drop for DisplayPeer {
    fn drop(&mut self) {
        // Unblocks the reader's read() so the thread ends.
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// Hash of an UPDATE payload, to tell updates apart cheaply: FNV-1a-style mixing over
/// 8-byte words in four independent lanes, so hashing a 4 MB frame costs well under a
/// millisecond instead of dominating the display peer (it is inside every benchmarked
/// frame). Not cryptographic; a test compares exact pixels where it matters.
pub fn payload_hash(data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut lanes = [0xcbf2_9ce4_8422_2325u64; 4];
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w)).wrapping_mul(PRIME);
        }
    }
    let mut h = lanes
        .iter()
        .fold(data.len() as u64, |h, l| (h ^ l).wrapping_mul(PRIME));
    for b in chunks.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
    }
    h
}

fn reply(stream: &mut UnixStream, request: u32, body: &[u8]) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(12 + body.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&FLAG_REPLY.to_le_bytes());
    msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
    msg.extend_from_slice(body);
    stream.write_all(&msg)
}

/// UPDATEs with at least this many pixel bytes whose rows are contiguous in the
/// framebuffer are read from the socket straight into it; smaller or narrower ones go
/// through the receive buffer (one read, one copy under the lock).
const DIRECT_UPDATE_MIN: usize = 64 << 10;

fn serve(mut stream: UnixStream, shared: &Shared, config: &DisplayConfig) {
    let mut hdr = [0u8; 12];
    // One receive buffer for every message, grown to the largest seen (at most
    // MAX_MESSAGE), so no message allocates or faults in fresh pages.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if stream.read_exact(&mut hdr).is_err() {
            break;
        }
        let (request, flags, size) = (u32_at(&hdr, 0), u32_at(&hdr, 4), u32_at(&hdr, 8));
        if size > MAX_MESSAGE {
            violation(
                shared,
                format!("request {request} claims {size} payload bytes; cannot resynchronise"),
            );
            break;
        }
        let size = size as usize;
        if buf.len() < size {
            buf.resize(size, 0);
        }
        // A large UPDATE of full framebuffer rows: its 20-byte header first, then the
        // pixels straight into the framebuffer.
        if request == req::UPDATE && size >= 20 + DIRECT_UPDATE_MIN {
            if stream.read_exact(&mut buf[..20]).is_err() {
                closed_inside(shared, request, size);
                break;
            }
            if let Some(region) = direct_region(shared, &buf[..20], size - 20) {
                if let Err(e) = read_into_framebuffer(&stream, shared, &region) {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        closed_inside(shared, request, size);
                    } else {
                        violation(shared, format!("request {request}: cannot read: {e}"));
                    }
                    break;
                }
                if flags != 0 {
                    violation(shared, format!("request {request} has flags {flags:#x}; the backend sends requests with flags 0"));
                }
                finish_direct_update(shared, &region);
                continue;
            }
            if stream.read_exact(&mut buf[20..size]).is_err() {
                closed_inside(shared, request, size);
                break;
            }
        } else if stream.read_exact(&mut buf[..size]).is_err() {
            closed_inside(shared, request, size);
            break;
        }
        if flags != 0 {
            violation(shared, format!("request {request} has flags {flags:#x}; the backend sends requests with flags 0"));
        }
        if let Err(e) = handle(&mut stream, shared, config, request, &buf[..size]) {
            violation(shared, format!("request {request}: cannot reply: {e}"));
            break;
        }
    }
    let mut st = shared.lock();
    st.closed = true;
    st.events.push(DisplayEvent::Closed);
    shared.cond.notify_all();
}

fn closed_inside(shared: &Shared, request: u32, size: usize) {
    violation(
        shared,
        format!("request {request}: socket closed inside a {size}-byte payload"),
    );
}

/// Where a direct UPDATE's pixels go: `len` bytes at `start` of the scanout's pixels.
struct DirectRegion {
    scanout_id: u32,
    rect: [u32; 4],
    start: usize,
    len: usize,
}

/// The framebuffer region an UPDATE with this 20-byte header and `data_len` pixel bytes
/// can be read into directly: only when it passes every check of [`handle_update`] (so
/// the others still go through it and report what is wrong) and its rows are contiguous
/// in the framebuffer (the full width).
fn direct_region(shared: &Shared, hdr: &[u8], data_len: usize) -> Option<DirectRegion> {
    let (scanout_id, x, y, width, height) = (
        u32_at(hdr, 0),
        u32_at(hdr, 4),
        u32_at(hdr, 8),
        u32_at(hdr, 12),
        u32_at(hdr, 16),
    );
    if u64::from(width) * u64::from(height) * 4 != data_len as u64 {
        return None;
    }
    let st = shared.lock();
    let fb = st.framebuffers.get(&scanout_id)?;
    let rows_fit = u64::from(y) + u64::from(height) <= u64::from(fb.height);
    if x != 0 || width != fb.width || !rows_fit {
        return None;
    }
    let start = y as usize * fb.width as usize * 4;
    Some(DirectRegion {
        scanout_id,
        rect: [x, y, width, height],
        start,
        len: data_len,
    })
}

/// Receives `region.len` bytes into the framebuffer rows of `region`. Never blocks while
/// holding the state lock: each round takes what the socket has queued (MSG_DONTWAIT)
/// under the lock and waits for more without it, so a backend that stalls inside a frame
/// cannot block the test's waits and their timeouts. UnexpectedEof when the socket closes.
fn read_into_framebuffer(
    stream: &UnixStream,
    shared: &Shared,
    region: &DirectRegion,
) -> std::io::Result<()> {
    use nix::errno::Errno;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::{AsFd, AsRawFd};

    let mut done = 0;
    while done < region.len {
        let got = {
            let mut st = shared.lock();
            // Only this thread changes framebuffers, so the one checked is still there.
            let Some(fb) = st.framebuffers.get_mut(&region.scanout_id) else {
                return Err(std::io::Error::other("the framebuffer went away"));
            };
            let dst = &mut fb.pixels[region.start + done..region.start + region.len];
            recv(stream.as_raw_fd(), dst, MsgFlags::MSG_DONTWAIT)
        };
        match got {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(Errno::EAGAIN | Errno::EINTR) => {
                let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What [`handle_update`] does once the pixels are in the framebuffer: the payload's hash
/// (over the framebuffer rows, which hold exactly the payload bytes), the byte count and
/// the event.
fn finish_direct_update(shared: &Shared, region: &DirectRegion) {
    let [x, y, width, height] = region.rect;
    let mut st = shared.lock();
    let hash = match st.framebuffers.get(&region.scanout_id) {
        Some(fb) => payload_hash(&fb.pixels[region.start..region.start + region.len]),
        None => return,
    };
    st.bytes_updated += region.len as u64;
    st.events.push(DisplayEvent::Update {
        scanout_id: region.scanout_id,
        x,
        y,
        width,
        height,
        hash,
    });
    shared.cond.notify_all();
}

fn violation(shared: &Shared, msg: String) {
    log::error!("display socket: {msg}");
    let mut st = shared.lock();
    st.violations.push(msg);
    shared.cond.notify_all();
}

fn record(shared: &Shared, ev: DisplayEvent) {
    let mut st = shared.lock();
    st.events.push(ev);
    shared.cond.notify_all();
}

fn expect_size(shared: &Shared, name: &str, body: &[u8], want: usize) -> bool {
    if body.len() != want {
        violation(
            shared,
            format!("{name}: payload is {} bytes, expected {want}", body.len()),
        );
        return false;
    }
    true
}

fn handle(
    stream: &mut UnixStream,
    shared: &Shared,
    config: &DisplayConfig,
    request: u32,
    body: &[u8],
) -> std::io::Result<()> {
    match request {
        req::GET_PROTOCOL_FEATURES => {
            expect_size(shared, "GET_PROTOCOL_FEATURES", body, 0);
            record(shared, DisplayEvent::ProtocolFeaturesRequested);
            let offered = if config.offer_edid {
                GPU_PROTOCOL_F_EDID
            } else {
                0
            };
            reply(stream, request, &offered.to_le_bytes())?;
        }
        req::SET_PROTOCOL_FEATURES => {
            if expect_size(shared, "SET_PROTOCOL_FEATURES", body, 8) {
                let mut v = [0u8; 8];
                v.copy_from_slice(body);
                let mask = u64::from_le_bytes(v);
                if mask & !GPU_PROTOCOL_F_EDID != 0 {
                    violation(
                        shared,
                        format!(
                            "SET_PROTOCOL_FEATURES {mask:#x} enables features we did not offer"
                        ),
                    );
                }
                shared.lock().acked_features = mask;
                record(shared, DisplayEvent::ProtocolFeaturesSet(mask));
            }
        }
        req::GET_DISPLAY_INFO => {
            expect_size(shared, "GET_DISPLAY_INFO", body, 0);
            record(shared, DisplayEvent::DisplayInfoRequested);
            let mut info = VirtioGpuRespDisplayInfo {
                hdr: VirtioGpuCtrlHdr {
                    type_: RESP_OK_DISPLAY_INFO,
                    ..Default::default()
                },
                ..Default::default()
            };
            for (i, (w, h)) in config
                .outputs
                .iter()
                .take(VIRTIO_GPU_MAX_SCANOUTS)
                .enumerate()
            {
                info.pmodes[i] = VirtioGpuDisplayOne {
                    r: VirtioGpuRect {
                        x: 0,
                        y: 0,
                        width: *w,
                        height: *h,
                    },
                    enabled: 1,
                    flags: 0,
                };
            }
            reply(stream, request, info.as_slice())?;
        }
        req::GET_EDID => {
            // A wrong size is recorded; the backend still waits for a reply, so answer anyway.
            expect_size(shared, "GET_EDID", body, 4);
            // vhost-user-gpu.rst: GET_EDID requires VHOST_USER_GPU_PROTOCOL_F_EDID; QEMU's own
            // backend only sends it once the feature is negotiated (offered and set).
            let acked = shared.lock().acked_features;
            if !config.offer_edid {
                violation(
                    shared,
                    "GET_EDID although the VMM did not offer VHOST_USER_GPU_PROTOCOL_F_EDID".into(),
                );
            } else if acked & GPU_PROTOCOL_F_EDID == 0 {
                violation(
                    shared,
                    format!(
                        "GET_EDID although SET_PROTOCOL_FEATURES ({acked:#x}) did not enable \
                         VHOST_USER_GPU_PROTOCOL_F_EDID"
                    ),
                );
            }
            let scanout_id = if body.len() >= 4 {
                u32_at(body, 0)
            } else {
                u32::MAX
            };
            record(shared, DisplayEvent::EdidRequested { scanout_id });
            let (w, h) = config
                .outputs
                .get(scanout_id as usize)
                .copied()
                .unwrap_or((1024, 768));
            let edid = crate::edid::generate(w, h);
            let mut resp = VirtioGpuRespGetEdid {
                hdr: VirtioGpuCtrlHdr {
                    type_: RESP_OK_EDID,
                    ..Default::default()
                },
                size: edid.len() as u32,
                ..Default::default()
            };
            resp.edid[..edid.len()].copy_from_slice(&edid);
            reply(stream, request, resp.as_slice())?;
        }
        req::SCANOUT => {
            if expect_size(shared, "SCANOUT", body, 12) {
                let (scanout_id, width, height) =
                    (u32_at(body, 0), u32_at(body, 4), u32_at(body, 8));
                if scanout_id as usize >= VIRTIO_GPU_MAX_SCANOUTS {
                    violation(shared, format!("SCANOUT for scanout {scanout_id} >= 16"));
                    return Ok(());
                }
                let bytes = u64::from(width) * u64::from(height) * 4;
                if bytes > u64::from(MAX_MESSAGE) {
                    violation(
                        shared,
                        format!("SCANOUT {width}x{height} is larger than any test uses"),
                    );
                    return Ok(());
                }
                let mut st = shared.lock();
                st.framebuffers.insert(
                    scanout_id,
                    Framebuffer {
                        width,
                        height,
                        pixels: vec![0; bytes as usize],
                    },
                );
                st.events.push(DisplayEvent::Scanout {
                    scanout_id,
                    width,
                    height,
                });
                shared.cond.notify_all();
            }
        }
        req::UPDATE => handle_update(shared, body),
        req::CURSOR_POS | req::CURSOR_POS_HIDE => {
            let name = if request == req::CURSOR_POS {
                "CURSOR_POS"
            } else {
                "CURSOR_POS_HIDE"
            };
            if expect_size(shared, name, body, 12) {
                let (scanout_id, x, y) = (u32_at(body, 0), u32_at(body, 4), u32_at(body, 8));
                record(
                    shared,
                    if request == req::CURSOR_POS {
                        DisplayEvent::CursorPos { scanout_id, x, y }
                    } else {
                        DisplayEvent::CursorHide { scanout_id, x, y }
                    },
                );
            }
        }
        req::CURSOR_UPDATE => {
            if expect_size(shared, "CURSOR_UPDATE", body, 20 + CURSOR_BYTES) {
                let image = body[20..].to_vec();
                let mut st = shared.lock();
                st.cursor_image = Some(image.clone());
                st.events.push(DisplayEvent::CursorUpdate {
                    scanout_id: u32_at(body, 0),
                    x: u32_at(body, 4),
                    y: u32_at(body, 8),
                    hot_x: u32_at(body, 12),
                    hot_y: u32_at(body, 16),
                    image,
                });
                shared.cond.notify_all();
            }
        }
        req::DMABUF_UPDATE => {
            violation(
                shared,
                "DMABUF_UPDATE from a 2D device that never set a dmabuf scanout".into(),
            );
            // The backend waits for an (empty) ack; give it one so it does not hang.
            reply(stream, request, &[])?;
        }
        req::DMABUF_SCANOUT | req::DMABUF_SCANOUT2 => {
            violation(
                shared,
                format!("DMABUF scanout request {request} from a 2D device"),
            );
        }
        other => violation(shared, format!("unknown request code {other}")),
    }
    Ok(())
}

fn handle_update(shared: &Shared, body: &[u8]) {
    if body.len() < 20 {
        violation(
            shared,
            format!(
                "UPDATE payload is {} bytes, shorter than its 20-byte header",
                body.len()
            ),
        );
        return;
    }
    let (scanout_id, x, y, width, height) = (
        u32_at(body, 0),
        u32_at(body, 4),
        u32_at(body, 8),
        u32_at(body, 12),
        u32_at(body, 16),
    );
    let data = &body[20..];
    let want = u64::from(width) * u64::from(height) * 4;
    if data.len() as u64 != want {
        violation(
            shared,
            format!(
                "UPDATE {width}x{height} carries {} pixel bytes, expected {want}",
                data.len()
            ),
        );
        return;
    }
    let hash = payload_hash(data);
    let mut st = shared.lock();
    let Some(fb) = st.framebuffers.get_mut(&scanout_id) else {
        drop(st);
        violation(
            shared,
            format!("UPDATE for scanout {scanout_id} before any SCANOUT message"),
        );
        return;
    };
    let fits = u64::from(x) + u64::from(width) <= u64::from(fb.width)
        && u64::from(y) + u64::from(height) <= u64::from(fb.height);
    if !fits {
        let (fw, fh) = (fb.width, fb.height);
        drop(st);
        violation(
            shared,
            format!(
                "UPDATE rect {x},{y} {width}x{height} is outside scanout {scanout_id} ({fw}x{fh})"
            ),
        );
        return;
    }
    let stride = fb.width as usize * 4;
    let row = width as usize * 4;
    for r in 0..height as usize {
        let dst = (y as usize + r) * stride + x as usize * 4;
        fb.pixels[dst..dst + row].copy_from_slice(&data[r * row..(r + 1) * row]);
    }
    st.bytes_updated += want;
    st.events.push(DisplayEvent::Update {
        scanout_id,
        x,
        y,
        width,
        height,
        hash,
    });
    shared.cond.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(request: u32, words: &[u32], payload: &[u8]) -> Vec<u8> {
        let size = (words.len() * 4 + payload.len()) as u32;
        let mut m: Vec<u8> = [request, 0, size]
            .iter()
            .chain(words)
            .flat_map(|v| v.to_le_bytes())
            .collect();
        m.extend_from_slice(payload);
        m
    }

    const T: Duration = Duration::from_secs(5);

    /// Full-width UPDATEs (read straight into the framebuffer) and narrower ones (through
    /// the receive buffer) give the same framebuffer and hashes as the payloads.
    #[test]
    fn direct_and_buffered_updates_agree() {
        let (w, h) = (256u32, 128u32);
        let (mut backend, vmm) = UnixStream::pair().unwrap();
        let peer = DisplayPeer::start(vmm, DisplayConfig::default()).unwrap();
        backend
            .write_all(&message(req::SCANOUT, &[0, w, h], &[]))
            .unwrap();
        let mut want = vec![0u8; (w * h * 4) as usize];
        // (x, y, width, height): full width (direct), full width too small to be direct,
        // a narrower rect (buffered).
        for (i, (x, y, rw, rh)) in [(0, 3, w, 100), (0, 0, w, 2), (5, 7, 100, 90)]
            .into_iter()
            .enumerate()
        {
            let px: Vec<u8> = (0..rw * rh * 4)
                .map(|b| (b as usize * 7 + i) as u8)
                .collect();
            backend
                .write_all(&message(req::UPDATE, &[0, x, y, rw, rh], &px))
                .unwrap();
            let ev = peer.events().wait_update(0, T).unwrap();
            assert_eq!(
                ev,
                DisplayEvent::Update {
                    scanout_id: 0,
                    x,
                    y,
                    width: rw,
                    height: rh,
                    hash: payload_hash(&px)
                }
            );
            let row = (rw * 4) as usize;
            for r in 0..rh as usize {
                let dst = ((y as usize + r) * w as usize + x as usize) * 4;
                want[dst..dst + row].copy_from_slice(&px[r * row..(r + 1) * row]);
            }
            assert!(
                peer.events().framebuffer(0).unwrap().2 == want,
                "update {i}"
            );
        }
        assert!(peer.events().violations().is_empty());
    }

    /// A backend stalled inside a large UPDATE does not block the test side (the lock is
    /// never held across a blocking read); closing inside it is the usual violation.
    #[test]
    fn a_stall_inside_a_direct_update_blocks_no_one() {
        let (w, h) = (512u32, 256u32);
        let (mut backend, vmm) = UnixStream::pair().unwrap();
        let peer = DisplayPeer::start(vmm, DisplayConfig::default()).unwrap();
        backend
            .write_all(&message(req::SCANOUT, &[0, w, h], &[]))
            .unwrap();
        let px = vec![7u8; (w * h * 4) as usize];
        let m = message(req::UPDATE, &[0, 0, 0, w, h], &px);
        backend.write_all(&m[..m.len() / 2]).unwrap();
        // The first half is in the framebuffer (so the peer is inside the update).
        let deadline = Instant::now() + T;
        while peer
            .events()
            .with_framebuffer(0, |fb| fb.pixels[0] != 7)
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "the first half of the update never reached the framebuffer"
            );
            std::thread::yield_now();
        }
        let t = Instant::now();
        assert!(peer.events().violations().is_empty());
        assert!(peer.events().framebuffer(0).is_some());
        assert!(peer
            .events()
            .wait_update(0, Duration::from_millis(100))
            .is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(backend);
        peer.events()
            .wait_for("Closed", T, |e| *e == DisplayEvent::Closed)
            .unwrap();
        let v = peer.events().violations();
        assert!(
            v.len() == 1 && v[0].contains("socket closed inside a"),
            "{v:?}"
        );
    }
}
