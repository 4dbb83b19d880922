//! A virtio-gpu driver (virtio 1.3 §5.7) on the test VMM's virtqueues.
//!
//! The command encoder here is deliberately independent of the product's `protocol` crate,
//! so a layout bug there is caught rather than mirrored. Everything is little-endian.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::guest_memory::{GuestMemory, MemoryError};
use crate::virtqueue::{Buffer, QueueError, SplitQueue};

/// Command codes (enum virtio_gpu_ctrl_type).
pub mod cmd {
    /// VIRTIO_GPU_CMD_GET_DISPLAY_INFO
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    /// VIRTIO_GPU_CMD_RESOURCE_CREATE_2D
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    /// VIRTIO_GPU_CMD_RESOURCE_UNREF
    pub const RESOURCE_UNREF: u32 = 0x0102;
    /// VIRTIO_GPU_CMD_SET_SCANOUT
    pub const SET_SCANOUT: u32 = 0x0103;
    /// VIRTIO_GPU_CMD_RESOURCE_FLUSH
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    /// VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    /// VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    /// VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    /// VIRTIO_GPU_CMD_GET_CAPSET_INFO
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    /// VIRTIO_GPU_CMD_GET_CAPSET
    pub const GET_CAPSET: u32 = 0x0109;
    /// VIRTIO_GPU_CMD_GET_EDID
    pub const GET_EDID: u32 = 0x010a;
    /// VIRTIO_GPU_CMD_UPDATE_CURSOR
    pub const UPDATE_CURSOR: u32 = 0x0300;
    /// VIRTIO_GPU_CMD_MOVE_CURSOR
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response codes.
pub mod resp {
    /// VIRTIO_GPU_RESP_OK_NODATA
    pub const OK_NODATA: u32 = 0x1100;
    /// VIRTIO_GPU_RESP_OK_DISPLAY_INFO
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    /// VIRTIO_GPU_RESP_OK_CAPSET_INFO
    pub const OK_CAPSET_INFO: u32 = 0x1102;
    /// VIRTIO_GPU_RESP_OK_CAPSET
    pub const OK_CAPSET: u32 = 0x1103;
    /// VIRTIO_GPU_RESP_OK_EDID
    pub const OK_EDID: u32 = 0x1104;
    /// VIRTIO_GPU_RESP_ERR_UNSPEC
    pub const ERR_UNSPEC: u32 = 0x1200;
    /// VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    /// VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    /// VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    /// VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID
    pub const ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
    /// VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;

    /// A readable name for a response code, for assertion messages.
    pub fn name(code: u32) -> String {
        match code {
            OK_NODATA => "OK_NODATA".into(),
            OK_DISPLAY_INFO => "OK_DISPLAY_INFO".into(),
            OK_CAPSET_INFO => "OK_CAPSET_INFO".into(),
            OK_CAPSET => "OK_CAPSET".into(),
            OK_EDID => "OK_EDID".into(),
            ERR_UNSPEC => "ERR_UNSPEC".into(),
            ERR_OUT_OF_MEMORY => "ERR_OUT_OF_MEMORY".into(),
            ERR_INVALID_SCANOUT_ID => "ERR_INVALID_SCANOUT_ID".into(),
            ERR_INVALID_RESOURCE_ID => "ERR_INVALID_RESOURCE_ID".into(),
            ERR_INVALID_CONTEXT_ID => "ERR_INVALID_CONTEXT_ID".into(),
            ERR_INVALID_PARAMETER => "ERR_INVALID_PARAMETER".into(),
            other => format!("{other:#x}"),
        }
    }
}

/// Pixel formats (enum virtio_gpu_formats).
pub mod format {
    /// VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM
    pub const B8G8R8A8_UNORM: u32 = 1;
    /// VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM
    pub const B8G8R8X8_UNORM: u32 = 2;
    /// VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM
    pub const A8R8G8B8_UNORM: u32 = 3;
    /// VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM
    pub const X8R8G8B8_UNORM: u32 = 4;
    /// VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM
    pub const R8G8B8A8_UNORM: u32 = 67;
    /// VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM
    pub const X8B8G8R8_UNORM: u32 = 68;
    /// VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM
    pub const A8B8G8R8_UNORM: u32 = 121;
    /// VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM
    pub const R8G8B8X8_UNORM: u32 = 134;
}

/// VIRTIO_GPU_FLAG_FENCE.
pub const FLAG_FENCE: u32 = 1;
/// Size of struct virtio_gpu_ctrl_hdr.
pub const HDR_SIZE: usize = 24;
/// Size of struct virtio_gpu_resp_display_info.
pub const DISPLAY_INFO_SIZE: usize = HDR_SIZE + 16 * 24;
/// Size of struct virtio_gpu_resp_edid.
pub const EDID_RESP_SIZE: usize = HDR_SIZE + 8 + 1024;
/// Byte the response buffer is filled with before submission, to catch unwritten bytes.
pub const POISON: u8 = 0xa5;

/// Which virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Queue {
    /// controlq (index 0).
    Control = 0,
    /// cursorq (index 1).
    Cursor = 1,
}

/// struct virtio_gpu_rect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rect {
    /// Left.
    pub x: u32,
    /// Top.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// A rect.
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// Intersection with another rect (empty rects have width or height 0).
    pub fn intersect(&self, o: &Rect) -> Rect {
        let x0 = self.x.max(o.x);
        let y0 = self.y.max(o.y);
        let x1 =
            (u64::from(self.x) + u64::from(self.width)).min(u64::from(o.x) + u64::from(o.width));
        let y1 =
            (u64::from(self.y) + u64::from(self.height)).min(u64::from(o.y) + u64::from(o.height));
        if x1 <= u64::from(x0) || y1 <= u64::from(y0) {
            return Rect::new(x0, y0, 0, 0);
        }
        Rect::new(
            x0,
            y0,
            (x1 - u64::from(x0)) as u32,
            (y1 - u64::from(y0)) as u32,
        )
    }

    fn put(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// struct virtio_gpu_mem_entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
}

/// A virtio-gpu command, encoded by [`Command::encode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// GET_DISPLAY_INFO.
    GetDisplayInfo,
    /// GET_EDID.
    GetEdid {
        /// Scanout.
        scanout_id: u32,
    },
    /// RESOURCE_CREATE_2D.
    ResourceCreate2d {
        /// Resource id.
        resource_id: u32,
        /// One of [`format`].
        format: u32,
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// RESOURCE_UNREF.
    ResourceUnref {
        /// Resource id.
        resource_id: u32,
    },
    /// SET_SCANOUT.
    SetScanout {
        /// Scanout.
        scanout_id: u32,
        /// Resource id (0 disables the scanout).
        resource_id: u32,
        /// Source rect in the resource.
        rect: Rect,
    },
    /// RESOURCE_FLUSH.
    ResourceFlush {
        /// Resource id.
        resource_id: u32,
        /// Damaged rect.
        rect: Rect,
    },
    /// TRANSFER_TO_HOST_2D.
    TransferToHost2d {
        /// Resource id.
        resource_id: u32,
        /// Rect in the resource.
        rect: Rect,
        /// Byte offset into the backing of the rect's first pixel.
        offset: u64,
    },
    /// RESOURCE_ATTACH_BACKING; `nr_entries` defaults to `entries.len()` but can lie.
    AttachBacking {
        /// Resource id.
        resource_id: u32,
        /// Scatter-gather entries.
        entries: Vec<MemEntry>,
        /// The nr_entries field, if it should differ from `entries.len()`.
        nr_entries: Option<u32>,
    },
    /// RESOURCE_DETACH_BACKING.
    DetachBacking {
        /// Resource id.
        resource_id: u32,
    },
    /// UPDATE_CURSOR (cursorq).
    UpdateCursor {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
        /// Cursor image resource (0 hides).
        resource_id: u32,
        /// Hotspot x.
        hot_x: u32,
        /// Hotspot y.
        hot_y: u32,
    },
    /// MOVE_CURSOR (cursorq).
    MoveCursor {
        /// Scanout.
        scanout_id: u32,
        /// X.
        x: u32,
        /// Y.
        y: u32,
    },
}

impl Command {
    /// The command code.
    pub fn code(&self) -> u32 {
        match self {
            Command::GetDisplayInfo => cmd::GET_DISPLAY_INFO,
            Command::GetEdid { .. } => cmd::GET_EDID,
            Command::ResourceCreate2d { .. } => cmd::RESOURCE_CREATE_2D,
            Command::ResourceUnref { .. } => cmd::RESOURCE_UNREF,
            Command::SetScanout { .. } => cmd::SET_SCANOUT,
            Command::ResourceFlush { .. } => cmd::RESOURCE_FLUSH,
            Command::TransferToHost2d { .. } => cmd::TRANSFER_TO_HOST_2D,
            Command::AttachBacking { .. } => cmd::RESOURCE_ATTACH_BACKING,
            Command::DetachBacking { .. } => cmd::RESOURCE_DETACH_BACKING,
            Command::UpdateCursor { .. } => cmd::UPDATE_CURSOR,
            Command::MoveCursor { .. } => cmd::MOVE_CURSOR,
        }
    }

    /// The command's name, for statistics and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::GetDisplayInfo => "GET_DISPLAY_INFO",
            Command::GetEdid { .. } => "GET_EDID",
            Command::ResourceCreate2d { .. } => "RESOURCE_CREATE_2D",
            Command::ResourceUnref { .. } => "RESOURCE_UNREF",
            Command::SetScanout { .. } => "SET_SCANOUT",
            Command::ResourceFlush { .. } => "RESOURCE_FLUSH",
            Command::TransferToHost2d { .. } => "TRANSFER_TO_HOST_2D",
            Command::AttachBacking { .. } => "RESOURCE_ATTACH_BACKING",
            Command::DetachBacking { .. } => "RESOURCE_DETACH_BACKING",
            Command::UpdateCursor { .. } => "UPDATE_CURSOR",
            Command::MoveCursor { .. } => "MOVE_CURSOR",
        }
    }

    /// The queue the command belongs on.
    pub fn queue(&self) -> Queue {
        match self {
            Command::UpdateCursor { .. } | Command::MoveCursor { .. } => Queue::Cursor,
            _ => Queue::Control,
        }
    }

    /// Size of the response buffer the driver provides.
    pub fn response_len(&self) -> usize {
        match self {
            Command::GetDisplayInfo => DISPLAY_INFO_SIZE,
            Command::GetEdid { .. } => EDID_RESP_SIZE,
            _ => HDR_SIZE,
        }
    }

    /// Encodes the command (header included); `fence` sets VIRTIO_GPU_FLAG_FENCE.
    pub fn encode(&self, fence: Option<u64>) -> Vec<u8> {
        let mut out = encode_hdr(self.code(), fence);
        let mut put = |vals: &[u32]| {
            for v in vals {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        match self {
            Command::GetDisplayInfo => {}
            Command::GetEdid { scanout_id } => put(&[*scanout_id, 0]),
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => put(&[*resource_id, *format, *width, *height]),
            Command::ResourceUnref { resource_id } | Command::DetachBacking { resource_id } => {
                put(&[*resource_id, 0])
            }
            Command::SetScanout {
                scanout_id,
                resource_id,
                rect,
            } => {
                rect.put(&mut out);
                out.extend_from_slice(&scanout_id.to_le_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
            }
            Command::ResourceFlush { resource_id, rect } => {
                rect.put(&mut out);
                out.extend_from_slice(&resource_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } => {
                rect.put(&mut out);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&resource_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Command::AttachBacking {
                resource_id,
                entries,
                nr_entries,
            } => {
                let n = nr_entries.unwrap_or(entries.len() as u32);
                put(&[*resource_id, n]);
                for e in entries {
                    out.extend_from_slice(&e.addr.to_le_bytes());
                    out.extend_from_slice(&e.length.to_le_bytes());
                    out.extend_from_slice(&0u32.to_le_bytes());
                }
            }
            Command::UpdateCursor {
                scanout_id,
                x,
                y,
                resource_id,
                hot_x,
                hot_y,
            } => put(&[*scanout_id, *x, *y, 0, *resource_id, *hot_x, *hot_y, 0]),
            Command::MoveCursor { scanout_id, x, y } => put(&[*scanout_id, *x, *y, 0, 0, 0, 0, 0]),
        }
        out
    }
}

/// Encodes a struct virtio_gpu_ctrl_hdr.
pub fn encode_hdr(code: u32, fence: Option<u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(if fence.is_some() { FLAG_FENCE } else { 0 }).to_le_bytes());
    out.extend_from_slice(&fence.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // ctx_id
    out.extend_from_slice(&[0u8; 4]); // ring_idx + padding
    out
}

/// One scanout in a GET_DISPLAY_INFO response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DisplayMode {
    /// Preferred rect.
    pub rect: Rect,
    /// Whether the display is enabled.
    pub enabled: bool,
    /// Flags.
    pub flags: u32,
}

/// A response as the device wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The response type (e.g. [`resp::OK_NODATA`]); read from the buffer whatever
    /// `used_len` says, so a device that never wrote it shows [`POISON`] bytes.
    pub kind: u32,
    /// Header flags.
    pub flags: u32,
    /// Header fence id.
    pub fence_id: u64,
    /// Header ctx id.
    pub ctx_id: u32,
    /// Header ring idx.
    pub ring_idx: u8,
    /// The used ring's len for the chain.
    pub used_len: u32,
    /// The whole response buffer.
    pub bytes: Vec<u8>,
}

fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

impl Response {
    fn parse(bytes: Vec<u8>, used_len: u32) -> Response {
        let fence_id = u64::from(le32(&bytes, 8)) | (u64::from(le32(&bytes, 12)) << 32);
        Response {
            kind: le32(&bytes, 0),
            flags: le32(&bytes, 4),
            fence_id,
            ctx_id: le32(&bytes, 16),
            ring_idx: bytes.get(20).copied().unwrap_or(0),
            used_len,
            bytes,
        }
    }

    /// Whether the response type is one of the OK_* codes.
    pub fn is_ok(&self) -> bool {
        (0x1100..0x1200).contains(&self.kind)
    }

    /// The response type's name.
    pub fn kind_name(&self) -> String {
        resp::name(self.kind)
    }

    /// Parses a GET_DISPLAY_INFO payload (16 modes).
    pub fn display_modes(&self) -> Vec<DisplayMode> {
        (0..16)
            .map(|i| {
                let o = HDR_SIZE + i * 24;
                DisplayMode {
                    rect: Rect::new(
                        le32(&self.bytes, o),
                        le32(&self.bytes, o + 4),
                        le32(&self.bytes, o + 8),
                        le32(&self.bytes, o + 12),
                    ),
                    enabled: le32(&self.bytes, o + 16) != 0,
                    flags: le32(&self.bytes, o + 20),
                }
            })
            .collect()
    }

    /// Parses a GET_EDID payload: the `size` first bytes of the EDID blob (None if size > 1024).
    pub fn edid(&self) -> Option<Vec<u8>> {
        let size = le32(&self.bytes, HDR_SIZE) as usize;
        if size > 1024 {
            return None;
        }
        self.bytes
            .get(HDR_SIZE + 8..HDR_SIZE + 8 + size)
            .map(<[u8]>::to_vec)
    }
}

/// Errors of the GPU driver.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Virtqueue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// No response for a command in time.
    #[error("no response to {what} on {queue:?} queue within {timeout:?}: {source}")]
    Timeout {
        /// The command.
        what: String,
        /// The queue.
        queue: Queue,
        /// How long we waited.
        timeout: Duration,
        /// The queue's error (with ring indices).
        #[source]
        source: QueueError,
    },
    /// The command arena is full because responses were never collected.
    #[error("command arena exhausted ({0} bytes wanted); collect pending responses")]
    ArenaFull(u64),
    /// The device reported a len larger than the writable buffers.
    #[error("{what}: used len {used_len} exceeds the {writable} writable bytes offered")]
    UsedLenTooLarge {
        /// The command.
        what: String,
        /// The used len.
        used_len: u32,
        /// Writable bytes.
        writable: u32,
    },
}

/// A command in flight; redeem with [`GpuDriver::wait`].
#[derive(Debug)]
pub struct Pending {
    token: u64,
    queue: Queue,
    what: String,
    resp_addr: u64,
    resp_len: u32,
}

impl Pending {
    /// The command's name.
    pub fn what(&self) -> &str {
        &self.what
    }
}

/// A resource's guest backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

const ARENA_SIZE: u64 = 8 << 20;

/// The virtio-gpu driver: both queues, a scratch arena for command and response buffers,
/// and per-command statistics.
pub struct GpuDriver {
    mem: Arc<GuestMemory>,
    queues: [SplitQueue; 2],
    // head -> (token, description) of the chain in flight on each queue.
    heads: [HashMap<u16, (u64, String)>; 2],
    // Descriptions of completed chains, in the order the device returned them.
    completions: Vec<String>,
    // token -> used len, for chains the device returned but nobody waited for yet.
    done: HashMap<u64, u32>,
    next_token: u64,
    arena_start: u64,
    arena_next: u64,
    outstanding: usize,
    timeout: Duration,
    stats: BTreeMap<String, u64>,
}

impl GpuDriver {
    /// Builds a driver on the given control and cursor queues.
    pub fn new(
        mem: Arc<GuestMemory>,
        control: SplitQueue,
        cursor: SplitQueue,
        timeout: Duration,
    ) -> Result<GpuDriver, GpuError> {
        let arena_start = mem.alloc(ARENA_SIZE)?;
        Ok(GpuDriver {
            mem,
            queues: [control, cursor],
            heads: [HashMap::new(), HashMap::new()],
            completions: Vec::new(),
            done: HashMap::new(),
            next_token: 1,
            arena_start,
            arena_next: arena_start,
            outstanding: 0,
            timeout,
            stats: BTreeMap::new(),
        })
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// The per-command timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the per-command timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Commands sent so far, by name (raw submissions count as "RAW").
    pub fn stats(&self) -> &BTreeMap<String, u64> {
        &self.stats
    }

    /// Descriptions of completed commands in the order the device returned them
    /// (fenced ones read "NAME (fence N)"). Cleared by [`GpuDriver::clear_completions`].
    pub fn completions(&self) -> &[String] {
        &self.completions
    }

    /// Forgets the completion order recorded so far.
    pub fn clear_completions(&mut self) {
        self.completions.clear();
    }

    /// The driver-side queue.
    pub fn queue(&self, q: Queue) -> &SplitQueue {
        &self.queues[q as usize]
    }

    fn arena_alloc(&mut self, len: u64) -> Result<u64, GpuError> {
        let start = self.arena_next.div_ceil(64) * 64;
        let end = start + len.max(1);
        if end > self.arena_start + ARENA_SIZE {
            return Err(GpuError::ArenaFull(len));
        }
        self.arena_next = end;
        Ok(start)
    }

    /// Puts a chain of `readable` buffers followed by one writable buffer of `writable_len`
    /// bytes (none if 0) on `queue`.
    pub fn submit_raw_parts(
        &mut self,
        queue: Queue,
        readable: &[&[u8]],
        writable_len: u32,
        what: &str,
    ) -> Result<Pending, GpuError> {
        if self.outstanding == 0 {
            // Nothing in flight: every earlier buffer is dead, start over.
            self.arena_next = self.arena_start;
        }
        let mut bufs = Vec::new();
        for part in readable {
            let addr = self.arena_alloc(part.len() as u64)?;
            self.mem.write(addr, part)?;
            bufs.push(Buffer {
                addr,
                len: part.len() as u32,
                writable: false,
            });
        }
        let resp_addr = self.arena_alloc(u64::from(writable_len))?;
        if writable_len > 0 {
            self.mem.fill(resp_addr, POISON, writable_len as usize)?;
            bufs.push(Buffer {
                addr: resp_addr,
                len: writable_len,
                writable: true,
            });
        }
        let head = self.queues[queue as usize].add(&bufs)?;
        let token = self.next_token;
        self.next_token += 1;
        self.heads[queue as usize].insert(head, (token, what.to_string()));
        self.outstanding += 1;
        Ok(Pending {
            token,
            queue,
            what: what.to_string(),
            resp_addr,
            resp_len: writable_len,
        })
    }

    /// Submits a command on its queue, optionally fenced.
    pub fn submit(&mut self, c: &Command, fence: Option<u64>) -> Result<Pending, GpuError> {
        self.submit_on(c.queue(), c, fence)
    }

    /// Submits a command on a chosen queue (to test commands on the wrong queue).
    pub fn submit_on(
        &mut self,
        queue: Queue,
        c: &Command,
        fence: Option<u64>,
    ) -> Result<Pending, GpuError> {
        *self.stats.entry(c.name().to_string()).or_default() += 1;
        let bytes = c.encode(fence);
        let what = match fence {
            Some(f) => format!("{} (fence {f})", c.name()),
            None => c.name().to_string(),
        };
        self.submit_raw_parts(queue, &[&bytes], c.response_len() as u32, &what)
    }

    /// Waits (bounded by the driver timeout) for a submitted command's response.
    pub fn wait(&mut self, p: Pending) -> Result<Response, GpuError> {
        let deadline = Instant::now() + self.timeout;
        let qi = p.queue as usize;
        let used_len = loop {
            if let Some(len) = self.done.remove(&p.token) {
                break len;
            }
            let got = self.queues[qi]
                .wait_used(deadline)
                .map_err(|source| match source {
                    QueueError::Timeout { .. } => GpuError::Timeout {
                        what: p.what.clone(),
                        queue: p.queue,
                        timeout: self.timeout,
                        source,
                    },
                    other => GpuError::Queue(other),
                })?;
            for u in got {
                if let Some((token, what)) = self.heads[qi].remove(&u.id) {
                    self.done.insert(token, u.len);
                    self.completions.push(what);
                }
            }
        };
        self.outstanding = self.outstanding.saturating_sub(1);
        if used_len > p.resp_len {
            return Err(GpuError::UsedLenTooLarge {
                what: p.what,
                used_len,
                writable: p.resp_len,
            });
        }
        let bytes = self.mem.read_vec(p.resp_addr, p.resp_len as usize)?;
        Ok(Response::parse(bytes, used_len))
    }

    /// Submits and waits.
    pub fn execute(&mut self, c: &Command) -> Result<Response, GpuError> {
        let p = self.submit(c, None)?;
        self.wait(p)
    }

    /// Submits with VIRTIO_GPU_FLAG_FENCE and `fence_id`, and waits.
    pub fn execute_fenced(&mut self, c: &Command, fence_id: u64) -> Result<Response, GpuError> {
        let p = self.submit(c, Some(fence_id))?;
        self.wait(p)
    }

    /// Sends arbitrary bytes on `queue` with a `writable_len`-byte response buffer
    /// (0: no writable descriptor). Returns (used len, response buffer).
    pub fn raw(
        &mut self,
        queue: Queue,
        readable: &[u8],
        writable_len: u32,
    ) -> Result<(u32, Vec<u8>), GpuError> {
        *self.stats.entry("RAW".to_string()).or_default() += 1;
        let p = self.submit_raw_parts(queue, &[readable], writable_len, "raw command")?;
        let r = self.wait(p)?;
        Ok((r.used_len, r.bytes))
    }

    /// GET_DISPLAY_INFO.
    pub fn get_display_info(&mut self) -> Result<Response, GpuError> {
        self.execute(&Command::GetDisplayInfo)
    }

    /// GET_EDID.
    pub fn get_edid(&mut self, scanout_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::GetEdid { scanout_id })
    }

    /// RESOURCE_CREATE_2D.
    pub fn resource_create_2d(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceCreate2d {
            resource_id,
            format,
            width,
            height,
        })
    }

    /// RESOURCE_UNREF.
    pub fn resource_unref(&mut self, resource_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceUnref { resource_id })
    }

    /// SET_SCANOUT.
    pub fn set_scanout(
        &mut self,
        scanout_id: u32,
        resource_id: u32,
        rect: Rect,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::SetScanout {
            scanout_id,
            resource_id,
            rect,
        })
    }

    /// RESOURCE_FLUSH.
    pub fn resource_flush(&mut self, resource_id: u32, rect: Rect) -> Result<Response, GpuError> {
        self.execute(&Command::ResourceFlush { resource_id, rect })
    }

    /// TRANSFER_TO_HOST_2D.
    pub fn transfer_to_host_2d(
        &mut self,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::TransferToHost2d {
            resource_id,
            rect,
            offset,
        })
    }

    /// RESOURCE_ATTACH_BACKING.
    pub fn attach_backing(
        &mut self,
        resource_id: u32,
        entries: &[MemEntry],
    ) -> Result<Response, GpuError> {
        self.execute(&Command::AttachBacking {
            resource_id,
            entries: entries.to_vec(),
            nr_entries: None,
        })
    }

    /// RESOURCE_DETACH_BACKING.
    pub fn detach_backing(&mut self, resource_id: u32) -> Result<Response, GpuError> {
        self.execute(&Command::DetachBacking { resource_id })
    }

    /// UPDATE_CURSOR.
    pub fn update_cursor(
        &mut self,
        scanout_id: u32,
        x: u32,
        y: u32,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    ) -> Result<Response, GpuError> {
        self.execute(&Command::UpdateCursor {
            scanout_id,
            x,
            y,
            resource_id,
            hot_x,
            hot_y,
        })
    }

    /// MOVE_CURSOR.
    pub fn move_cursor(&mut self, scanout_id: u32, x: u32, y: u32) -> Result<Response, GpuError> {
        self.execute(&Command::MoveCursor { scanout_id, x, y })
    }

    /// Allocates `width*height*4` bytes of guest RAM, creates the resource and attaches the
    /// memory as one entry. Returns the backing and the two responses are required OK.
    pub fn create_backed_resource(
        &mut self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(Backing, Response, Response), GpuError> {
        let len = u64::from(width) * u64::from(height) * 4;
        let addr = self.mem.alloc(len)?;
        let created = self.resource_create_2d(resource_id, format, width, height)?;
        let attached = self.attach_backing(
            resource_id,
            &[MemEntry {
                addr,
                length: len as u32,
            }],
        )?;
        Ok((Backing { addr, len }, created, attached))
    }
}
