//! The VMM side of the vhost-user backend request channel (`SET_BACKEND_REQ_FD`): serves
//! `VHOST_USER_BACKEND_SHMEM_MAP` / `SHMEM_UNMAP` against a [`HostmemWindow`] and answers
//! them with REPLY_ACK acks (a `VhostUserU64`, 0 = success) when the backend asked for one.
//!
//! The channel is run by hand rather than through the vhost crate's `FrontendReqHandler`,
//! because that one always writes the ack itself right after the handler returns: here a
//! test decides, per request, whether the ack is sent normally, held until the test
//! releases it ([`AckAction::Delay`]), never sent ([`AckAction::Drop`]), sent twice
//! ([`AckAction::Duplicate`]) or sent as a failure ([`AckAction::Fail`]).
//!
//! Two threads: the reader receives each message (12-byte header, body, SCM_RIGHTS fds),
//! validates it, applies it to the window at once (unless the test chose `Fail`) and queues
//! its ack; the writer sends the acks strictly in request order, waiting on a held ack's
//! [`AckGate`] before sending it or anything behind it. Because the reader keeps reading,
//! a backend that sends a second request while the first one's ack is held is seen at once.

use std::collections::VecDeque;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use vhost::vhost_user::message::{
    BackendReq, VhostUserHeaderFlag, VhostUserMMap, VhostUserMMapFlags, VhostUserMsgValidator,
    VhostUserU64,
};
use vm_memory::ByteValued;

use crate::hostmem::HostmemWindow;

/// Size of the vhost-user message header.
pub const HEADER_LEN: usize = 12;
/// Largest body accepted (the vhost crate's MAX_MSG_SIZE).
pub const MAX_BODY: usize = 0x1000;
/// Most fds accepted on one message.
const MAX_FDS: usize = 8;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;
/// errno-style failure the VMM answers a refused request with (as QEMU: -EINVAL).
pub const ACK_EINVAL: u64 = (-libc::EINVAL) as u64;

/// The kind of a backend request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// VHOST_USER_BACKEND_SHMEM_MAP.
    Map,
    /// VHOST_USER_BACKEND_SHMEM_UNMAP.
    Unmap,
    /// Any other request code (refused).
    Other(u32),
}

impl RequestKind {
    fn from_code(code: u32) -> RequestKind {
        if code == BackendReq::SHMEM_MAP as u32 {
            RequestKind::Map
        } else if code == BackendReq::SHMEM_UNMAP as u32 {
            RequestKind::Unmap
        } else {
            RequestKind::Other(code)
        }
    }
}

/// A release handle for a held ack: [`AckGate::release`] lets the writer send it.
#[derive(Clone)]
pub struct AckGate {
    id: u64,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AckGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AckGate({}, released: {})", self.id, self.is_released())
    }
}

impl AckGate {
    /// Lets every ack held on this gate go (idempotent).
    pub fn release(&self) {
        let mut st = self.shared.lock();
        if !st.released.contains(&self.id) {
            st.released.push(self.id);
        }
        drop(st);
        self.shared.cond.notify_all();
    }

    /// Whether [`AckGate::release`] was called.
    pub fn is_released(&self) -> bool {
        self.shared.lock().released.contains(&self.id)
    }
}

/// What the VMM does with a request's ack.
#[derive(Clone, Debug, Default)]
pub enum AckAction {
    /// Apply the request and ack it at once.
    #[default]
    Normal,
    /// Apply the request at once, hold the ack (and every ack behind it) until the gate is
    /// released.
    Delay(AckGate),
    /// Apply the request, never answer it.
    Drop,
    /// Apply the request and send its ack twice.
    Duplicate,
    /// Do not apply the request; answer with this non-zero value.
    Fail(u64),
}

/// A received SHMEM_MAP / SHMEM_UNMAP request (or a refused message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRequest {
    /// 1-based sequence number of the message on the channel.
    pub seq: u64,
    /// Request kind.
    pub kind: RequestKind,
    /// Header flags as sent.
    pub flags: u32,
    /// Whether the backend set NEED_REPLY.
    pub need_reply: bool,
    /// Number of fds that came with it.
    pub fds: usize,
    /// VhostUserMMap.shmid.
    pub shmid: u8,
    /// VhostUserMMap.fd_offset.
    pub fd_offset: u64,
    /// VhostUserMMap.shm_offset.
    pub shm_offset: u64,
    /// VhostUserMMap.len.
    pub len: u64,
    /// VhostUserMMap.flags.
    pub mmap_flags: u64,
    /// Whether it was applied to the window, or why not.
    pub outcome: Result<(), String>,
}

/// What happened on the channel, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// A message was received (and applied or refused).
    Received(BackendRequest),
    /// An ack is being held on a gate.
    Held {
        /// The request's sequence number.
        seq: u64,
        /// The request's kind.
        kind: RequestKind,
    },
    /// An ack is written (`copies` 2 for a duplicate); recorded just before the write.
    Acked {
        /// The request's sequence number.
        seq: u64,
        /// The request's kind.
        kind: RequestKind,
        /// The value sent (0 = success).
        value: u64,
        /// How many times it was written.
        copies: u32,
        /// Whether it was held first.
        delayed: bool,
    },
    /// An ack was dropped on purpose.
    Dropped {
        /// The request's sequence number.
        seq: u64,
        /// The request's kind.
        kind: RequestKind,
    },
    /// The backend closed the channel, or it broke.
    Closed(String),
}

impl BackendEvent {
    /// The request, for `Received`.
    pub fn request(&self) -> Option<&BackendRequest> {
        match self {
            BackendEvent::Received(r) => Some(r),
            _ => None,
        }
    }

    /// Whether this is a `Received` of `kind`.
    pub fn is_received(&self, kind: RequestKind) -> bool {
        matches!(self, BackendEvent::Received(r) if r.kind == kind)
    }

    /// Whether this is an `Acked` of `kind`.
    pub fn is_acked(&self, kind: RequestKind) -> bool {
        matches!(self, BackendEvent::Acked { kind: k, .. } if *k == kind)
    }
}

#[derive(Default)]
struct State {
    events: Vec<BackendEvent>,
    violations: Vec<String>,
    // One-shot actions: the first request whose kind matches (None = any) takes it.
    once: VecDeque<(Option<RequestKind>, AckAction)>,
    // Standing actions per kind.
    standing: Vec<(RequestKind, AckAction)>,
    released: Vec<u64>,
    next_gate: u64,
    shutdown: bool,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, ev: BackendEvent) {
        log::debug!("backend request channel: {ev:?}");
        self.lock().events.push(ev);
        self.cond.notify_all();
    }

    fn violation(&self, msg: String) {
        log::warn!("backend request channel: {msg}");
        self.lock().violations.push(msg);
        self.cond.notify_all();
    }

    fn take_action(&self, kind: RequestKind) -> AckAction {
        let mut st = self.lock();
        if let Some(i) = st
            .once
            .iter()
            .position(|(k, _)| k.is_none_or(|k| k == kind))
        {
            if let Some((_, a)) = st.once.remove(i) {
                return a;
            }
        }
        st.standing
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }
}

/// The VMM's backend request channel: the serving threads plus the test's controls and the
/// event log. Dropping it stops the threads (held acks are then never sent).
pub struct BackendRequests {
    shared: Arc<Shared>,
    window: Arc<HostmemWindow>,
    sock: UnixStream,
    cursor: Mutex<usize>,
    reader: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
}

struct PendingAck {
    seq: u64,
    code: u32,
    kind: RequestKind,
    value: u64,
    action: AckAction,
}

impl BackendRequests {
    /// Creates the channel: returns the server and the backend's end of the socketpair
    /// (send it with SET_BACKEND_REQ_FD, then drop it). `shmid`: the shared memory region
    /// the window is (requests for any other are refused; virtio-gpu's host-visible region
    /// is [`crate::vmm::HOSTMEM_SHMID`]). `reply_ack`: whether REPLY_ACK was negotiated
    /// (acks are only sent for requests with NEED_REPLY when it was).
    pub fn start(
        window: Arc<HostmemWindow>,
        shmid: u8,
        reply_ack: bool,
    ) -> std::io::Result<(BackendRequests, UnixStream)> {
        let (ours, theirs) = UnixStream::pair()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel::<PendingAck>();
        let reader = {
            let sock = ours.try_clone()?;
            let shared = shared.clone();
            let window = window.clone();
            std::thread::Builder::new()
                .name("vmm-backend-req-reader".into())
                .spawn(move || read_loop(&sock, &shared, &window, shmid, reply_ack, &tx))?
        };
        let writer = {
            let sock = ours.try_clone()?;
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("vmm-backend-req-writer".into())
                .spawn(move || write_loop(sock, &shared, &rx))?
        };
        Ok((
            BackendRequests {
                shared,
                window,
                sock: ours,
                cursor: Mutex::new(0),
                reader: Some(reader),
                writer: Some(writer),
            },
            theirs,
        ))
    }

    /// The window the requests are served against.
    pub fn window(&self) -> &Arc<HostmemWindow> {
        &self.window
    }

    /// A new, unreleased gate.
    pub fn gate(&self) -> AckGate {
        let mut st = self.shared.lock();
        st.next_gate += 1;
        AckGate {
            id: st.next_gate,
            shared: self.shared.clone(),
        }
    }

    /// The next request of `kind` (any kind if None) gets `action` (one-shot, FIFO).
    pub fn on_next(&self, kind: Option<RequestKind>, action: AckAction) {
        self.shared.lock().once.push_back((kind, action));
    }

    /// Every later request of `kind` (not taken by a one-shot action) gets `action`;
    /// `Normal` clears it.
    pub fn set_standing(&self, kind: RequestKind, action: AckAction) {
        let mut st = self.shared.lock();
        st.standing.retain(|(k, _)| *k != kind);
        if !matches!(action, AckAction::Normal) {
            st.standing.push((kind, action));
        }
    }

    /// Holds the ack of the next request of `kind`; returns its release handle.
    pub fn delay_next(&self, kind: RequestKind) -> AckGate {
        let gate = self.gate();
        self.on_next(Some(kind), AckAction::Delay(gate.clone()));
        gate
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<BackendEvent> {
        self.shared.lock().events.clone()
    }

    /// The received requests so far.
    pub fn requests(&self) -> Vec<BackendRequest> {
        self.shared
            .lock()
            .events
            .iter()
            .filter_map(|e| e.request().cloned())
            .collect()
    }

    /// How many events so far match `pred`.
    pub fn count(&self, pred: impl Fn(&BackendEvent) -> bool) -> usize {
        self.shared.lock().events.iter().filter(|e| pred(e)).count()
    }

    /// Protocol violations (malformed messages, bad shmid, refused maps/unmaps); the
    /// window's own violations are in [`HostmemWindow::violations`].
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.shared.lock().violations.clone();
        v.extend(self.window.violations());
        v
    }

    /// Whether the channel was closed by the backend (or broke).
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// Waits (bounded) for the next event, after the last one `wait_for` returned, that
    /// matches `pred`; events before it are consumed. None on timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&BackendEvent) -> bool,
    ) -> Option<BackendEvent> {
        let deadline = Instant::now() + timeout;
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = self.shared.lock();
        loop {
            while *cursor < st.events.len() {
                let i = *cursor;
                *cursor += 1;
                if pred(&st.events[i]) {
                    return Some(st.events[i].clone());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits (bounded) until `pred` holds over the whole event log; does not consume.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[BackendEvent]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if pred(&st.events) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Consumes every event so far, so the next `wait_for` only sees newer ones.
    pub fn skip_to_end(&self) {
        let len = self.shared.lock().events.len();
        *self.cursor.lock().unwrap_or_else(|p| p.into_inner()) = len;
    }

    /// A readable summary of the log, for assertion messages.
    pub fn summary(&self) -> String {
        self.events()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for BackendRequests {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.cond.notify_all();
        // Wakes the reader's recvmsg (end of stream) and fails any write.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        for t in [self.reader.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

struct Message {
    code: u32,
    flags: u32,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

enum ReadError {
    Eof,
    Broken(String),
}

/// Receives exactly `buf.len()` bytes, collecting any fds that come along.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    at_boundary: bool,
) -> Result<(), ReadError> {
    let mut got = 0;
    while got < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ReadError::Broken(format!("recvmsg: {e}"))),
        };
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed this fd for us; nothing else
                        // owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if truncated {
            return Err(ReadError::Broken(format!(
                "more than {MAX_FDS} fds on one message (control data truncated)"
            )));
        }
        if msg.bytes == 0 {
            return Err(if got == 0 && at_boundary {
                ReadError::Eof
            } else {
                ReadError::Broken(format!("end of stream inside a message ({got} bytes)"))
            });
        }
        got += msg.bytes;
    }
    Ok(())
}

fn read_message(sock: &UnixStream) -> Result<Message, ReadError> {
    let mut hdr = [0u8; HEADER_LEN];
    let mut fds = Vec::new();
    recv_exact(sock, &mut hdr, &mut fds, true)?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_BODY {
        return Err(ReadError::Broken(format!(
            "request {code} announces a {size}-byte body (max {MAX_BODY})"
        )));
    }
    let mut body = vec![0u8; size];
    recv_exact(sock, &mut body, &mut fds, false)?;
    Ok(Message {
        code,
        flags,
        body,
        fds,
    })
}

fn read_loop(
    sock: &UnixStream,
    shared: &Shared,
    window: &HostmemWindow,
    shmid: u8,
    reply_ack: bool,
    tx: &mpsc::Sender<PendingAck>,
) {
    let mut seq = 0u64;
    let reason = loop {
        let msg = match read_message(sock) {
            Ok(m) => m,
            Err(ReadError::Eof) => break "closed by the backend".to_string(),
            Err(ReadError::Broken(e)) => {
                shared.violation(e.clone());
                break e;
            }
        };
        seq += 1;
        let (req, action) = handle(seq, &msg, shared, window, shmid);
        let kind = req.kind;
        let value = match (&req.outcome, &action) {
            (_, AckAction::Fail(v)) => *v,
            (Ok(()), _) => 0,
            (Err(_), _) => ACK_EINVAL,
        };
        let need_reply = req.need_reply;
        shared.record(BackendEvent::Received(req));
        if need_reply && !reply_ack {
            shared.violation(format!(
                "request {seq} ({kind:?}) asks for a reply but REPLY_ACK was not negotiated"
            ));
        }
        if need_reply && reply_ack {
            let ack = PendingAck {
                seq,
                code: msg.code,
                kind,
                value,
                action,
            };
            if tx.send(ack).is_err() {
                break "ack writer gone".to_string();
            }
        }
    };
    let mut st = shared.lock();
    st.closed = true;
    st.events.push(BackendEvent::Closed(reason));
    drop(st);
    shared.cond.notify_all();
}

/// Validates and applies one message; returns its record and the ack action.
fn handle(
    seq: u64,
    msg: &Message,
    shared: &Shared,
    window: &HostmemWindow,
    window_shmid: u8,
) -> (BackendRequest, AckAction) {
    let kind = RequestKind::from_code(msg.code);
    let need_reply = msg.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0;
    let mut req = BackendRequest {
        seq,
        kind,
        flags: msg.flags,
        need_reply,
        fds: msg.fds.len(),
        shmid: 0,
        fd_offset: 0,
        shm_offset: 0,
        len: 0,
        mmap_flags: 0,
        outcome: Ok(()),
    };
    let action = shared.take_action(kind);
    let checked = (|| -> Result<VhostUserMMap, String> {
        if msg.flags & 0x3 != VERSION_1 {
            return Err(format!("header version {} (want 1)", msg.flags & 0x3));
        }
        if msg.flags & VhostUserHeaderFlag::REPLY.bits() != 0 {
            return Err("REPLY flag set on a request".into());
        }
        if msg.flags & VhostUserHeaderFlag::RESERVED_BITS.bits() != 0 {
            return Err(format!("reserved header flag bits set: {:#x}", msg.flags));
        }
        let want_fds = match kind {
            RequestKind::Map => 1,
            RequestKind::Unmap => 0,
            RequestKind::Other(c) => return Err(format!("unsupported backend request {c}")),
        };
        if msg.body.len() != std::mem::size_of::<VhostUserMMap>() {
            return Err(format!(
                "body is {} bytes (VhostUserMMap is {})",
                msg.body.len(),
                std::mem::size_of::<VhostUserMMap>()
            ));
        }
        if msg.fds.len() != want_fds {
            return Err(format!("{} fds attached (want {want_fds})", msg.fds.len()));
        }
        let body = VhostUserMMap::from_slice(&msg.body)
            .copied()
            .ok_or_else(|| "cannot read VhostUserMMap".to_string())?;
        Ok(body)
    })();
    let body = match checked {
        Ok(b) => b,
        Err(e) => {
            shared.violation(format!("request {seq} ({kind:?}): {e}"));
            req.outcome = Err(e);
            return (req, action);
        }
    };
    req.shmid = body.shmid;
    req.fd_offset = body.fd_offset;
    req.shm_offset = body.shm_offset;
    req.len = body.len;
    req.mmap_flags = body.flags;
    let (shmid, fd_offset, shm_offset, len, flags) = (
        body.shmid,
        body.fd_offset,
        body.shm_offset,
        body.len,
        body.flags,
    );
    let valid = (|| -> Result<(), String> {
        if shmid != window_shmid {
            return Err(format!("shmid {shmid} (the only region is {window_shmid})"));
        }
        if !body.is_valid() {
            return Err(format!(
                "invalid VhostUserMMap: fd_offset {fd_offset:#x} shm_offset {shm_offset:#x} \
                 len {len:#x} flags {flags:#x}"
            ));
        }
        if kind == RequestKind::Unmap && (fd_offset != 0 || flags != 0) {
            // The spec leaves them unused on unmap; a non-zero value is suspicious, not
            // fatal.
            log::info!("request {seq}: SHMEM_UNMAP with fd_offset {fd_offset:#x} flags {flags:#x}");
        }
        Ok(())
    })();
    if let Err(e) = valid {
        shared.violation(format!("request {seq} ({kind:?}): {e}"));
        req.outcome = Err(e);
        return (req, action);
    }
    if let AckAction::Fail(v) = action {
        req.outcome = Err(format!("not applied: the test fails it with {v:#x}"));
        return (req, action);
    }
    let writable =
        VhostUserMMapFlags::from_bits_truncate(flags).contains(VhostUserMMapFlags::WRITABLE);
    let applied = match kind {
        RequestKind::Map => window
            .map(msg.fds[0].as_fd(), fd_offset, shm_offset, len, writable)
            .map(|_| ()),
        _ => window.unmap(shm_offset, len),
    };
    req.outcome = applied.map_err(|e| e.to_string());
    (req, action)
}

fn write_ack(sock: &mut UnixStream, code: u32, value: u64) -> std::io::Result<()> {
    let flags = VERSION_1 | VhostUserHeaderFlag::REPLY.bits();
    let body = VhostUserU64::new(value);
    let mut out = Vec::with_capacity(HEADER_LEN + 8);
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&(std::mem::size_of::<VhostUserU64>() as u32).to_le_bytes());
    out.extend_from_slice(body.as_slice());
    sock.write_all(&out)
}

fn write_loop(mut sock: UnixStream, shared: &Shared, rx: &mpsc::Receiver<PendingAck>) {
    for ack in rx.iter() {
        let PendingAck {
            seq,
            code,
            kind,
            value,
            action,
        } = ack;
        let mut delayed = false;
        let copies = match action {
            AckAction::Drop => {
                shared.record(BackendEvent::Dropped { seq, kind });
                continue;
            }
            AckAction::Delay(gate) => {
                shared.record(BackendEvent::Held { seq, kind });
                let mut st = shared.lock();
                while !st.released.contains(&gate.id) && !st.shutdown {
                    st = shared.cond.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.shutdown {
                    return;
                }
                delayed = true;
                1
            }
            AckAction::Duplicate => 2,
            AckAction::Normal | AckAction::Fail(_) => 1,
        };
        // Recorded before the write, so whoever the ack wakes already sees it in the log.
        shared.record(BackendEvent::Acked {
            seq,
            kind,
            value,
            copies,
            delayed,
        });
        for _ in 0..copies {
            if let Err(e) = write_ack(&mut sock, code, value) {
                if !shared.lock().shutdown {
                    shared.violation(format!("writing the ack of request {seq}: {e}"));
                }
                return;
            }
        }
    }
}
