//! Decoding and static validation of guest virtio-gpu requests.
//!
//! The decoder turns the gathered bytes of one descriptor chain into a typed
//! [`Request`]. It checks everything that can be checked without state (lengths, known
//! command for the queue, formats, ids that must be non-zero, arithmetic that must not
//! overflow, bounded entry counts), so the executor only has to check what depends on
//! the resource table and the device configuration (whether a resource exists, whether
//! a scanout id is below the configured count, per-VM memory limits, rects against
//! resource sizes, offsets against the attached backing).
//!
//! Bodies longer than their struct are accepted and the excess ignored: the Linux driver
//! may hand over a larger buffer than the command needs, and QEMU accepts that too.
//!
//! The virgl commands (RESOURCE_CREATE_3D, TRANSFER_TO_HOST_3D, TRANSFER_FROM_HOST_3D) are
//! decoded only by [`decode_virgl`], for a device that offers VIRTIO_GPU_F_VIRGL; [`decode`]
//! answers them as unsupported.

use protocol::ipc::{BackingEntry, Box3d, Resource3d};
use protocol::virtio_gpu::*;
use thiserror::Error;

/// The default bound on SUBMIT_3D's command stream, in bytes (the per-VM default of
/// `policy::limits`).
pub const DEFAULT_MAX_SUBMIT_BYTES: u32 = policy::limits::DEFAULT.max_submit_bytes;

/// The bounds the decoder enforces before it allocates anything for a request, so a
/// request can make the decoder allocate at most what these allow and its own bytes hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most memory entries in RESOURCE_ATTACH_BACKING and RESOURCE_CREATE_BLOB; also
    /// bounds TRANSFER_TO_HOST_2D's offset (no backing can be longer than this many
    /// entries of u32::MAX bytes).
    pub max_backing_entries: u32,
    /// Most bytes of commands in one SUBMIT_3D.
    pub max_submit_bytes: u32,
}

impl From<&protocol::config::Limits> for DecodeLimits {
    fn from(limits: &protocol::config::Limits) -> Self {
        DecodeLimits {
            max_backing_entries: limits.max_backing_entries,
            max_submit_bytes: limits.max_submit_bytes,
        }
    }
}

/// The virtqueue a request arrived on; each accepts only its own commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Queue {
    /// The control queue (queue 0): every command except the cursor ones.
    Control,
    /// The cursor queue (queue 1): UPDATE_CURSOR and MOVE_CURSOR only.
    Cursor,
}

/// A request that could not be decoded: what was wrong, and the request header when it
/// could be read, so the error response can still echo the fence.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{kind}")]
pub struct DecodeError {
    /// The request header, if the request was at least [`CTRL_HDR_SIZE`] bytes long.
    pub hdr: Option<CtrlHeader>,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    /// The request header, if it could be parsed (pass it to `encode_response`).
    pub fn header(&self) -> Option<CtrlHeader> {
        self.hdr
    }

    /// The virtio-gpu error to answer the request with.
    pub fn error_code(&self) -> ErrorCode {
        self.kind.error_code()
    }

    /// Whether the command is known but not implemented, as opposed to malformed; lets
    /// the caller log these at a different level.
    pub fn is_unsupported(&self) -> bool {
        matches!(self.kind, DecodeErrorKind::Unsupported(_))
    }
}

/// The reasons a request is rejected by the decoder.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeErrorKind {
    /// Fewer bytes than a control header.
    #[error("request of {len} bytes is shorter than the {CTRL_HDR_SIZE}-byte header")]
    ShortHeader {
        /// Bytes available.
        len: usize,
    },
    /// The body is shorter than the command's struct.
    #[error("{} needs {need} bytes but the request has {got}", cmd_label(*.cmd))]
    ShortBody {
        /// Command type.
        cmd: u32,
        /// Bytes the command's struct needs, header included.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// Not a virtio-gpu command type.
    #[error("unknown command type {0:#x}")]
    UnknownCommand(u32),
    /// A cursor command on the control queue or a control command on the cursor queue.
    #[error("{} is not allowed on the {queue:?} queue", cmd_label(*.cmd))]
    WrongQueue {
        /// Command type.
        cmd: u32,
        /// The queue it arrived on.
        queue: Queue,
    },
    /// A known command this device does not implement (yet).
    #[error("{} is not supported", cmd_label(*.0))]
    Unsupported(u32),
    /// Not one of the 2D pixel formats.
    #[error("unknown pixel format {0}")]
    InvalidFormat(u32),
    /// Resource id 0 where the command needs a real resource.
    #[error("{} needs a non-zero resource id", cmd_label(*.cmd))]
    ZeroResourceId {
        /// Command type.
        cmd: u32,
    },
    /// A resource with a zero width or height.
    #[error("resource size {width}x{height} has a zero dimension")]
    ZeroSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// A rect whose right or bottom edge overflows u32.
    #[error("rect at ({}, {}) of {}x{} overflows u32", .0.x, .0.y, .0.width, .0.height)]
    RectOverflow(Rect),
    /// A scanout id beyond what the protocol can describe.
    #[error("scanout id {0} is not below {VIRTIO_GPU_MAX_SCANOUTS}")]
    InvalidScanoutId(u32),
    /// A transfer offset beyond the largest backing an attach could have created.
    #[error("transfer offset {offset:#x} is beyond the largest possible backing ({max:#x} bytes)")]
    BadOffset {
        /// Requested offset.
        offset: u64,
        /// Largest possible backing size.
        max: u64,
    },
    /// ATTACH_BACKING or CREATE_BLOB with more memory entries than allowed.
    #[error("{n} memory entries, at most {max} are allowed")]
    TooManyEntries {
        /// Entries claimed by the request.
        n: u32,
        /// Configured maximum.
        max: u32,
    },
    /// ATTACH_BACKING, or CREATE_BLOB of guest-backed memory, with no entries.
    #[error("guest backing without any memory entry")]
    NoEntries,
    /// ATTACH_BACKING or CREATE_BLOB whose bytes end before its entries do.
    #[error("request claims {n} memory entries ({need} bytes) but has {got} bytes")]
    TruncatedEntries {
        /// Entries claimed by the request.
        n: u32,
        /// Bytes those entries need, header included.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A backing entry that is empty or wraps around the address space.
    #[error("backing entry {index} (addr {addr:#x}, length {length}) is empty or wraps around")]
    BadEntry {
        /// Position of the entry in the request.
        index: u32,
        /// Its guest address.
        addr: u64,
        /// Its length.
        length: u32,
    },
    /// Context id 0 in the header of a command that needs a context.
    #[error("{} needs a non-zero context id", cmd_label(*.cmd))]
    ZeroContextId {
        /// Command type.
        cmd: u32,
    },
    /// CTX_CREATE whose `nlen` exceeds the 64-byte debug name.
    #[error("context name length {nlen} exceeds {VIRTIO_GPU_CTX_DEBUG_NAME_SIZE} bytes")]
    NameTooLong {
        /// The `nlen` field.
        nlen: u32,
    },
    /// SUBMIT_3D with a command stream larger than the per-VM limit allows: a budget
    /// exceeded, so ERR_OUT_OF_MEMORY, whether or not the bytes are there.
    #[error("SUBMIT_3D of {size} bytes, at most {max} are allowed")]
    SubmitTooLarge {
        /// The `size` field.
        size: u32,
        /// Configured maximum.
        max: u32,
    },
    /// CREATE_BLOB with a `blob_mem` the spec does not define.
    #[error("unknown blob_mem {0}")]
    InvalidBlobMem(u32),
    /// CREATE_BLOB with flag bits the spec does not define.
    #[error("blob flags {0:#x} have bits outside MAPPABLE|SHAREABLE|CROSS_DEVICE")]
    InvalidBlobFlags(u32),
    /// CREATE_BLOB of size 0.
    #[error("blob of size 0")]
    ZeroBlobSize,
    /// CREATE_BLOB of host-only memory that still lists guest memory entries.
    #[error("HOST3D blob with {n} memory entries, it must have none")]
    UnexpectedEntries {
        /// The `nr_entries` field.
        n: u32,
    },
    /// CREATE_BLOB of guest-backed memory larger than its entries.
    #[error("blob of {size} bytes is larger than its {backing}-byte guest backing")]
    BlobLargerThanBacking {
        /// The `size` field.
        size: u64,
        /// Sum of the entries' lengths.
        backing: u64,
    },
    /// RESOURCE_CREATE_3D with a target beyond PIPE_TEXTURE_CUBE_ARRAY.
    #[error("3D resource target {0} is not a gallium texture target")]
    InvalidTarget(u32),
    /// RESOURCE_CREATE_3D with a zero width, height, depth or layer count.
    #[error("3D resource size {width}x{height}x{depth} with {array_size} layers has a zero")]
    ZeroSize3d {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
        /// Requested depth.
        depth: u32,
        /// Requested layer count.
        array_size: u32,
    },
    /// RESOURCE_CREATE_3D with more mip levels than its largest side allows.
    #[error("last mip level {last_level}, at most {max} for its size")]
    TooManyLevels {
        /// The `last_level` field.
        last_level: u32,
        /// The last level a full mip chain of this size has.
        max: u32,
    },
    /// RESOURCE_CREATE_3D of a buffer that is not one row, one layer, one level.
    #[error(
        "buffer of height {height}, depth {depth}, {array_size} layers, last level {last_level}"
    )]
    BufferShape {
        /// Requested height (must be 1).
        height: u32,
        /// Requested depth (must be 1).
        depth: u32,
        /// Requested layer count (must be 1).
        array_size: u32,
        /// Requested last mip level (must be 0).
        last_level: u32,
    },
    /// A TRANSFER_*_3D box whose far edge overflows u32.
    #[error("box {0:?} overflows u32")]
    BoxOverflow(Box3d),
}

impl DecodeErrorKind {
    /// The virtio-gpu error for this kind of failure.
    pub fn error_code(&self) -> ErrorCode {
        use DecodeErrorKind::*;
        match self {
            ShortHeader { .. }
            | ShortBody { .. }
            | UnknownCommand(_)
            | WrongQueue { .. }
            | Unsupported(_) => ErrorCode::Unspec,
            ZeroResourceId { .. } => ErrorCode::InvalidResourceId,
            ZeroContextId { .. } => ErrorCode::InvalidContextId,
            InvalidScanoutId(_) => ErrorCode::InvalidScanoutId,
            SubmitTooLarge { .. } => ErrorCode::OutOfMemory,
            NameTooLong { .. }
            | InvalidBlobMem(_)
            | InvalidBlobFlags(_)
            | ZeroBlobSize
            | UnexpectedEntries { .. }
            | BlobLargerThanBacking { .. }
            | InvalidTarget(_)
            | ZeroSize3d { .. }
            | TooManyLevels { .. }
            | BufferShape { .. }
            | BoxOverflow(_)
            | InvalidFormat(_)
            | ZeroSize { .. }
            | RectOverflow(_)
            | BadOffset { .. }
            | TooManyEntries { .. }
            | NoEntries
            | TruncatedEntries { .. }
            | BadEntry { .. } => ErrorCode::InvalidParameter,
        }
    }
}

/// The spec's name of a command type, for messages.
pub fn cmd_name(cmd: u32) -> Option<&'static str> {
    Some(match cmd {
        VIRTIO_GPU_CMD_GET_DISPLAY_INFO => "GET_DISPLAY_INFO",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => "RESOURCE_CREATE_2D",
        VIRTIO_GPU_CMD_RESOURCE_UNREF => "RESOURCE_UNREF",
        VIRTIO_GPU_CMD_SET_SCANOUT => "SET_SCANOUT",
        VIRTIO_GPU_CMD_RESOURCE_FLUSH => "RESOURCE_FLUSH",
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => "TRANSFER_TO_HOST_2D",
        VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => "RESOURCE_ATTACH_BACKING",
        VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING => "RESOURCE_DETACH_BACKING",
        VIRTIO_GPU_CMD_GET_CAPSET_INFO => "GET_CAPSET_INFO",
        VIRTIO_GPU_CMD_GET_CAPSET => "GET_CAPSET",
        VIRTIO_GPU_CMD_GET_EDID => "GET_EDID",
        VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID => "RESOURCE_ASSIGN_UUID",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => "RESOURCE_CREATE_BLOB",
        VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => "SET_SCANOUT_BLOB",
        VIRTIO_GPU_CMD_CTX_CREATE => "CTX_CREATE",
        VIRTIO_GPU_CMD_CTX_DESTROY => "CTX_DESTROY",
        VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE => "CTX_ATTACH_RESOURCE",
        VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => "CTX_DETACH_RESOURCE",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_3D => "RESOURCE_CREATE_3D",
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D => "TRANSFER_TO_HOST_3D",
        VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D => "TRANSFER_FROM_HOST_3D",
        VIRTIO_GPU_CMD_SUBMIT_3D => "SUBMIT_3D",
        VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => "RESOURCE_MAP_BLOB",
        VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => "RESOURCE_UNMAP_BLOB",
        VIRTIO_GPU_CMD_UPDATE_CURSOR => "UPDATE_CURSOR",
        VIRTIO_GPU_CMD_MOVE_CURSOR => "MOVE_CURSOR",
        _ => return None,
    })
}

/// A printable label for any command type, known or not.
fn cmd_label(cmd: u32) -> String {
    match cmd_name(cmd) {
        Some(n) => n.to_string(),
        None => format!("command {cmd:#x}"),
    }
}

/// How the decoder treats a command type.
enum Class {
    /// Decoded here; valid on the given queue.
    Supported(Queue),
    /// Known, valid on the control queue, decoded only for a virgl device.
    Virgl,
}

fn classify(cmd: u32) -> Option<Class> {
    Some(match cmd {
        VIRTIO_GPU_CMD_GET_DISPLAY_INFO
        | VIRTIO_GPU_CMD_RESOURCE_CREATE_2D
        | VIRTIO_GPU_CMD_RESOURCE_UNREF
        | VIRTIO_GPU_CMD_SET_SCANOUT
        | VIRTIO_GPU_CMD_RESOURCE_FLUSH
        | VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D
        | VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING
        | VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING
        | VIRTIO_GPU_CMD_GET_EDID
        | VIRTIO_GPU_CMD_GET_CAPSET_INFO
        | VIRTIO_GPU_CMD_GET_CAPSET
        | VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID
        | VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB
        | VIRTIO_GPU_CMD_SET_SCANOUT_BLOB
        | VIRTIO_GPU_CMD_CTX_CREATE
        | VIRTIO_GPU_CMD_CTX_DESTROY
        | VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE
        | VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE
        | VIRTIO_GPU_CMD_SUBMIT_3D
        | VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB
        | VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => Class::Supported(Queue::Control),
        VIRTIO_GPU_CMD_UPDATE_CURSOR | VIRTIO_GPU_CMD_MOVE_CURSOR => {
            Class::Supported(Queue::Cursor)
        }
        VIRTIO_GPU_CMD_RESOURCE_CREATE_3D
        | VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D
        | VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D => Class::Virgl,
        _ => return None,
    })
}

/// The struct size (header included) of a supported command.
fn struct_size(cmd: u32) -> usize {
    match cmd {
        VIRTIO_GPU_CMD_GET_EDID => GET_EDID_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => RESOURCE_CREATE_2D_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_UNREF => RESOURCE_UNREF_SIZE,
        VIRTIO_GPU_CMD_SET_SCANOUT => SET_SCANOUT_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_FLUSH => RESOURCE_FLUSH_SIZE,
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => TRANSFER_TO_HOST_2D_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => RESOURCE_ATTACH_BACKING_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING => RESOURCE_DETACH_BACKING_SIZE,
        VIRTIO_GPU_CMD_UPDATE_CURSOR | VIRTIO_GPU_CMD_MOVE_CURSOR => UPDATE_CURSOR_SIZE,
        VIRTIO_GPU_CMD_GET_CAPSET_INFO => GET_CAPSET_INFO_SIZE,
        VIRTIO_GPU_CMD_GET_CAPSET => GET_CAPSET_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID => RESOURCE_ASSIGN_UUID_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => RESOURCE_CREATE_BLOB_SIZE,
        VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => SET_SCANOUT_BLOB_SIZE,
        VIRTIO_GPU_CMD_CTX_CREATE => CTX_CREATE_SIZE,
        VIRTIO_GPU_CMD_CTX_DESTROY => CTX_DESTROY_SIZE,
        VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE | VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => {
            CTX_RESOURCE_SIZE
        }
        VIRTIO_GPU_CMD_SUBMIT_3D => CMD_SUBMIT_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => RESOURCE_MAP_BLOB_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => RESOURCE_UNMAP_BLOB_SIZE,
        VIRTIO_GPU_CMD_RESOURCE_CREATE_3D => RESOURCE_CREATE_3D_SIZE,
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D | VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D => {
            TRANSFER_HOST_3D_SIZE
        }
        _ => CTRL_HDR_SIZE,
    }
}

/// Field reader over a body whose length was checked against the struct size, so a
/// failed read cannot happen; it still maps to `ShortBody` instead of panicking, in case
/// a size constant and a field offset ever disagree.
struct Fields<'a> {
    b: &'a [u8],
    cmd: u32,
    need: usize,
}

impl Fields<'_> {
    fn short(&self) -> DecodeErrorKind {
        DecodeErrorKind::ShortBody {
            cmd: self.cmd,
            need: self.need,
            got: self.b.len(),
        }
    }

    fn u32(&self, off: usize) -> Result<u32, DecodeErrorKind> {
        read_le_u32(self.b, off).ok_or_else(|| self.short())
    }

    fn u64(&self, off: usize) -> Result<u64, DecodeErrorKind> {
        read_le_u64(self.b, off).ok_or_else(|| self.short())
    }

    fn rect(&self, off: usize) -> Result<Rect, DecodeErrorKind> {
        let r = Rect::from_bytes_at(self.b, off).ok_or_else(|| self.short())?;
        if r.checked_right().is_none() || r.checked_bottom().is_none() {
            return Err(DecodeErrorKind::RectOverflow(r));
        }
        Ok(r)
    }

    fn resource_id(&self, off: usize) -> Result<u32, DecodeErrorKind> {
        match self.u32(off)? {
            0 => Err(DecodeErrorKind::ZeroResourceId { cmd: self.cmd }),
            id => Ok(id),
        }
    }

    /// The header's context id, which must not be 0.
    fn ctx_id(&self, hdr: &CtrlHeader) -> Result<u32, DecodeErrorKind> {
        match hdr.ctx_id {
            0 => Err(DecodeErrorKind::ZeroContextId { cmd: self.cmd }),
            id => Ok(id),
        }
    }

    fn scanout_id(&self, off: usize) -> Result<u32, DecodeErrorKind> {
        match self.u32(off)? {
            id if id >= VIRTIO_GPU_MAX_SCANOUTS => Err(DecodeErrorKind::InvalidScanoutId(id)),
            id => Ok(id),
        }
    }

    fn cursor_pos(&self) -> Result<CursorPos, DecodeErrorKind> {
        let h = CTRL_HDR_SIZE;
        Ok(CursorPos {
            scanout_id: self.scanout_id(h)?,
            x: self.u32(h + 4)?,
            y: self.u32(h + 8)?,
        })
    }
}

/// Decodes and statically validates one request for a device without virgl: the virgl
/// commands are [`DecodeErrorKind::Unsupported`].
///
/// `bytes` are all the device-readable bytes of the descriptor chain, gathered in
/// order. `limits` bound the memory entry counts and SUBMIT_3D's size; they are checked
/// before anything is allocated, so a request can make the decoder allocate at most
/// what its own bytes hold.
pub fn decode(queue: Queue, bytes: &[u8], limits: DecodeLimits) -> Result<Request, DecodeError> {
    decode_for(queue, bytes, limits, false)
}

/// [`decode`] for a device that offers VIRTIO_GPU_F_VIRGL: RESOURCE_CREATE_3D and the
/// two 3D transfers are decoded too.
pub fn decode_virgl(
    queue: Queue,
    bytes: &[u8],
    limits: DecodeLimits,
) -> Result<Request, DecodeError> {
    decode_for(queue, bytes, limits, true)
}

fn decode_for(
    queue: Queue,
    bytes: &[u8],
    limits: DecodeLimits,
    virgl: bool,
) -> Result<Request, DecodeError> {
    let hdr = CtrlHeader::from_bytes(bytes).ok_or(DecodeError {
        hdr: None,
        kind: DecodeErrorKind::ShortHeader { len: bytes.len() },
    })?;
    decode_body(queue, hdr, bytes, limits, virgl)
        .map(|cmd| Request { hdr, cmd })
        .map_err(|kind| DecodeError {
            hdr: Some(hdr),
            kind,
        })
}

fn decode_body(
    queue: Queue,
    hdr: CtrlHeader,
    b: &[u8],
    limits: DecodeLimits,
    virgl: bool,
) -> Result<Command, DecodeErrorKind> {
    let max_backing_entries = limits.max_backing_entries;
    use DecodeErrorKind as E;
    let cmd = hdr.type_;
    let class = classify(cmd).ok_or(E::UnknownCommand(cmd))?;
    let home = match class {
        Class::Supported(q) => q,
        Class::Virgl => Queue::Control,
    };
    if home != queue {
        return Err(E::WrongQueue { cmd, queue });
    }
    if matches!(class, Class::Virgl) && !virgl {
        return Err(E::Unsupported(cmd));
    }
    let need = struct_size(cmd);
    if b.len() < need {
        return Err(E::ShortBody {
            cmd,
            need,
            got: b.len(),
        });
    }
    let f = Fields { b, cmd, need };
    let h = CTRL_HDR_SIZE;
    Ok(match cmd {
        VIRTIO_GPU_CMD_GET_DISPLAY_INFO => Command::GetDisplayInfo,
        VIRTIO_GPU_CMD_GET_EDID => Command::GetEdid {
            scanout_id: f.scanout_id(h)?,
        },
        VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => {
            let resource_id = f.resource_id(h)?;
            let raw_format = f.u32(h + 4)?;
            let format = Format::from_u32(raw_format).ok_or(E::InvalidFormat(raw_format))?;
            let (width, height) = (f.u32(h + 8)?, f.u32(h + 12)?);
            if width == 0 || height == 0 {
                return Err(E::ZeroSize { width, height });
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            }
        }
        VIRTIO_GPU_CMD_RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: f.resource_id(h)?,
        },
        VIRTIO_GPU_CMD_SET_SCANOUT => {
            let rect = f.rect(h)?;
            // resource_id 0 is how the driver disables a scanout.
            Command::SetScanout {
                scanout_id: f.scanout_id(h + 16)?,
                resource_id: f.u32(h + 20)?,
                rect,
            }
        }
        VIRTIO_GPU_CMD_RESOURCE_FLUSH => {
            let rect = f.rect(h)?;
            Command::ResourceFlush {
                resource_id: f.resource_id(h + 16)?,
                rect,
            }
        }
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => {
            let rect = f.rect(h)?;
            let offset = f.u64(h + 16)?;
            let resource_id = f.resource_id(h + 24)?;
            // No backing can be longer than max entries of u32::MAX bytes each, so a
            // larger offset can never be valid; (2^32-1)^2 fits in u64.
            let max = u64::from(max_backing_entries) * u64::from(u32::MAX);
            if offset > max {
                return Err(E::BadOffset { offset, max });
            }
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            }
        }
        VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => {
            let resource_id = f.resource_id(h)?;
            let n = f.u32(h + 4)?;
            Command::ResourceAttachBacking {
                resource_id,
                entries: decode_entries(b, RESOURCE_ATTACH_BACKING_SIZE, n, max_backing_entries)?,
            }
        }
        VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING => Command::ResourceDetachBacking {
            resource_id: f.resource_id(h)?,
        },
        VIRTIO_GPU_CMD_UPDATE_CURSOR => Command::UpdateCursor {
            pos: f.cursor_pos()?,
            // resource_id 0 hides the cursor.
            resource_id: f.u32(h + 16)?,
            hot_x: f.u32(h + 20)?,
            hot_y: f.u32(h + 24)?,
        },
        VIRTIO_GPU_CMD_MOVE_CURSOR => Command::MoveCursor {
            pos: f.cursor_pos()?,
        },
        VIRTIO_GPU_CMD_GET_CAPSET_INFO => Command::GetCapsetInfo {
            capset_index: f.u32(h)?,
        },
        VIRTIO_GPU_CMD_GET_CAPSET => Command::GetCapset {
            capset_id: f.u32(h)?,
            capset_version: f.u32(h + 4)?,
        },
        VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID => Command::ResourceAssignUuid {
            resource_id: f.resource_id(h)?,
        },
        VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => decode_create_blob(&f, &hdr, max_backing_entries)?,
        VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => {
            let rect = f.rect(h)?;
            let scanout_id = f.scanout_id(h + 16)?;
            // resource_id 0 disables the scanout, as with SET_SCANOUT.
            let resource_id = f.u32(h + 20)?;
            let (width, height) = (f.u32(h + 24)?, f.u32(h + 28)?);
            let raw_format = f.u32(h + 32)?;
            let format = Format::from_u32(raw_format).ok_or(E::InvalidFormat(raw_format))?;
            let mut strides = [0u32; 4];
            let mut offsets = [0u32; 4];
            for (i, (s, o)) in strides.iter_mut().zip(offsets.iter_mut()).enumerate() {
                *s = f.u32(h + 40 + 4 * i)?;
                *o = f.u32(h + 56 + 4 * i)?;
            }
            Command::SetScanoutBlob {
                scanout_id,
                resource_id,
                rect,
                width,
                height,
                format,
                strides,
                offsets,
            }
        }
        VIRTIO_GPU_CMD_CTX_CREATE => {
            f.ctx_id(&hdr)?;
            let nlen = f.u32(h)?;
            let context_init = f.u32(h + 4)?;
            let name = usize::try_from(nlen)
                .ok()
                .filter(|&n| n <= VIRTIO_GPU_CTX_DEBUG_NAME_SIZE)
                .and_then(|n| b.get(h + 8..h + 8 + n))
                .ok_or(E::NameTooLong { nlen })?;
            Command::CtxCreate {
                context_init,
                name: name.to_vec(),
            }
        }
        VIRTIO_GPU_CMD_CTX_DESTROY => {
            f.ctx_id(&hdr)?;
            Command::CtxDestroy
        }
        VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE => {
            f.ctx_id(&hdr)?;
            Command::CtxAttachResource {
                resource_id: f.resource_id(h)?,
            }
        }
        VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => {
            f.ctx_id(&hdr)?;
            Command::CtxDetachResource {
                resource_id: f.resource_id(h)?,
            }
        }
        VIRTIO_GPU_CMD_SUBMIT_3D => {
            f.ctx_id(&hdr)?;
            let size = f.u32(h)?;
            let max = limits.max_submit_bytes;
            if size > max {
                return Err(E::SubmitTooLarge { size, max });
            }
            let short = |need| E::ShortBody {
                cmd,
                need,
                got: b.len(),
            };
            let need = usize::try_from(size)
                .ok()
                .and_then(|s| s.checked_add(CMD_SUBMIT_SIZE))
                .ok_or_else(|| short(usize::MAX))?;
            // Bounded by max and by the bytes present.
            let commands = b.get(CMD_SUBMIT_SIZE..need).ok_or_else(|| short(need))?;
            Command::Submit3d {
                commands: commands.to_vec(),
            }
        }
        VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => Command::ResourceMapBlob {
            resource_id: f.resource_id(h)?,
            offset: f.u64(h + 8)?,
        },
        VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => Command::ResourceUnmapBlob {
            resource_id: f.resource_id(h)?,
        },
        VIRTIO_GPU_CMD_RESOURCE_CREATE_3D => decode_create_3d(&f)?,
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D | VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D => {
            let transfer = TransferHost3d::from_bytes_at(b, h).ok_or_else(|| f.short())?;
            let resource_id = f.resource_id(h + BOX_SIZE + 8)?;
            let bx = transfer.bbox;
            if bx.x.checked_add(bx.w).is_none()
                || bx.y.checked_add(bx.h).is_none()
                || bx.z.checked_add(bx.d).is_none()
            {
                return Err(E::BoxOverflow(bx));
            }
            // As for TRANSFER_TO_HOST_2D: no backing can reach further than this.
            let max = u64::from(max_backing_entries) * u64::from(u32::MAX);
            if transfer.offset > max {
                return Err(E::BadOffset {
                    offset: transfer.offset,
                    max,
                });
            }
            if cmd == VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D {
                Command::TransferToHost3d {
                    resource_id,
                    transfer,
                }
            } else {
                Command::TransferFromHost3d {
                    resource_id,
                    transfer,
                }
            }
        }
        // classify() and this match list the same supported commands.
        _ => return Err(E::Unsupported(cmd)),
    })
}

/// RESOURCE_CREATE_BLOB: the fixed part, then (for guest-backed blobs) the entries.
fn decode_create_blob(
    f: &Fields<'_>,
    hdr: &CtrlHeader,
    max_backing_entries: u32,
) -> Result<Command, DecodeErrorKind> {
    use DecodeErrorKind as E;
    let h = CTRL_HDR_SIZE;
    let resource_id = f.resource_id(h)?;
    let raw_mem = f.u32(h + 4)?;
    let blob_mem = BlobMem::from_u32(raw_mem).ok_or(E::InvalidBlobMem(raw_mem))?;
    let blob_flags = f.u32(h + 8)?;
    if blob_flags & !VIRTIO_GPU_BLOB_FLAGS_ALL != 0 {
        return Err(E::InvalidBlobFlags(blob_flags));
    }
    let n = f.u32(h + 12)?;
    let blob_id = f.u64(h + 16)?;
    let size = f.u64(h + 24)?;
    if size == 0 {
        return Err(E::ZeroBlobSize);
    }
    // Host blobs are created by a context; guest blobs may come from context 0.
    if blob_mem.needs_context() {
        f.ctx_id(hdr)?;
    }
    let entries = if blob_mem.has_guest_backing() {
        let entries = decode_entries(f.b, RESOURCE_CREATE_BLOB_SIZE, n, max_backing_entries)?;
        // Each length is a u32 and there are at most u32::MAX of them: no overflow.
        let backing: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
        if size > backing {
            return Err(E::BlobLargerThanBacking { size, backing });
        }
        entries
    } else if n != 0 {
        return Err(E::UnexpectedEntries { n });
    } else {
        Vec::new()
    };
    Ok(Command::ResourceCreateBlob {
        resource_id,
        blob_mem,
        blob_flags,
        blob_id,
        size,
        entries,
    })
}

/// RESOURCE_CREATE_3D: what can be checked without the device's limits (those, and the
/// memory budget, are the resource table's). Formats and bind flags are virglrenderer's
/// to judge; it knows which the host supports.
fn decode_create_3d(f: &Fields<'_>) -> Result<Command, DecodeErrorKind> {
    use DecodeErrorKind as E;
    let h = CTRL_HDR_SIZE;
    let resource_id = f.resource_id(h)?;
    let word = |i: usize| f.u32(h + 4 + 4 * i);
    let args = Resource3d {
        target: word(0)?,
        format: word(1)?,
        bind: word(2)?,
        width: word(3)?,
        height: word(4)?,
        depth: word(5)?,
        array_size: word(6)?,
        last_level: word(7)?,
        nr_samples: word(8)?,
        flags: word(9)?,
    };
    if args.target > PIPE_TEXTURE_CUBE_ARRAY {
        return Err(E::InvalidTarget(args.target));
    }
    if [args.width, args.height, args.depth, args.array_size].contains(&0) {
        return Err(E::ZeroSize3d {
            width: args.width,
            height: args.height,
            depth: args.depth,
            array_size: args.array_size,
        });
    }
    if args.target == PIPE_BUFFER
        && (args.height, args.depth, args.array_size, args.last_level) != (1, 1, 1, 0)
    {
        return Err(E::BufferShape {
            height: args.height,
            depth: args.depth,
            array_size: args.array_size,
            last_level: args.last_level,
        });
    }
    // A full mip chain ends at 1x1(x1): level floor(log2(largest side)). Only a 3D
    // texture's depth shrinks with the levels; other targets' layers do not.
    let mut largest = args.width.max(args.height);
    if args.target == PIPE_TEXTURE_3D {
        largest = largest.max(args.depth);
    }
    let max = largest.checked_ilog2().unwrap_or(0);
    if args.last_level > max {
        return Err(E::TooManyLevels {
            last_level: args.last_level,
            max,
        });
    }
    Ok(Command::ResourceCreate3d { resource_id, args })
}

/// Reads `n` memory entries that start at byte `base` of `b`.
fn decode_entries(
    b: &[u8],
    base: usize,
    n: u32,
    max: u32,
) -> Result<Vec<BackingEntry>, DecodeErrorKind> {
    use DecodeErrorKind as E;
    if n > max {
        return Err(E::TooManyEntries { n, max });
    }
    if n == 0 {
        return Err(E::NoEntries);
    }
    let truncated = |need| E::TruncatedEntries {
        n,
        need,
        got: b.len(),
    };
    let need = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_mul(MEM_ENTRY_SIZE))
        .and_then(|s| s.checked_add(base))
        .ok_or_else(|| truncated(usize::MAX))?;
    let raw = b.get(base..need).ok_or_else(|| truncated(need))?;
    // n is bounded by max and by the bytes actually present, so this allocation is too.
    let mut entries = Vec::with_capacity(raw.len() / MEM_ENTRY_SIZE);
    for (index, e) in (0u32..).zip(raw.chunks_exact(MEM_ENTRY_SIZE)) {
        let (addr, length) = match (read_le_u64(e, 0), read_le_u32(e, 8)) {
            (Some(a), Some(l)) => (a, l),
            _ => return Err(truncated(need)),
        };
        if length == 0 || addr.checked_add(u64::from(length)).is_none() {
            return Err(E::BadEntry {
                index,
                addr,
                length,
            });
        }
        entries.push(BackingEntry { addr, length });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1024;
    const SUBMIT_MAX: u32 = 4096;

    /// The decoder with `max` backing entries and a 4 KiB SUBMIT_3D bound; shadows the
    /// real `decode` in these tests.
    fn decode(q: Queue, b: &[u8], max: u32) -> Result<Request, DecodeError> {
        super::decode(
            q,
            b,
            DecodeLimits {
                max_backing_entries: max,
                max_submit_bytes: SUBMIT_MAX,
            },
        )
    }

    fn hdr_ctx(type_: u32, ctx_id: u32) -> Vec<u8> {
        CtrlHeader {
            type_,
            ctx_id,
            ..CtrlHeader::default()
        }
        .to_bytes()
        .to_vec()
    }

    /// Asserts `b` is rejected with `kind`, answered with `code`, header kept.
    fn rejects(b: &[u8], kind: DecodeErrorKind, code: ErrorCode) {
        let e = decode(Queue::Control, b, MAX).expect_err("rejected");
        assert_eq!(e.kind, kind);
        assert_eq!(e.error_code(), code, "{kind:?}");
        assert!(e.header().is_some());
        assert!(!e.to_string().is_empty());
    }

    fn hdr(type_: u32) -> Vec<u8> {
        CtrlHeader {
            type_,
            ..CtrlHeader::default()
        }
        .to_bytes()
        .to_vec()
    }

    fn with(mut b: Vec<u8>, words: &[u32]) -> Vec<u8> {
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    }

    fn ok(q: Queue, b: &[u8]) -> Command {
        decode(q, b, MAX).expect("decodes").cmd
    }

    fn err(q: Queue, b: &[u8]) -> DecodeErrorKind {
        decode(q, b, MAX).expect_err("rejected").kind
    }

    fn entry(addr: u64, len: u32) -> Vec<u8> {
        let mut v = addr.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&0xdead_beefu32.to_le_bytes()); // padding, ignored
        v
    }

    #[test]
    fn header_fields_are_kept() {
        let h = CtrlHeader {
            type_: VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
            flags: VIRTIO_GPU_FLAG_FENCE,
            fence_id: 42,
            ctx_id: 3,
            ring_idx: 1,
        };
        let r = decode(Queue::Control, &h.to_bytes(), MAX).unwrap();
        assert_eq!(r.hdr, h);
        assert_eq!(r.cmd, Command::GetDisplayInfo);
    }

    #[test]
    fn get_edid() {
        let b = with(hdr(VIRTIO_GPU_CMD_GET_EDID), &[3, 0]);
        assert_eq!(ok(Queue::Control, &b), Command::GetEdid { scanout_id: 3 });
        let b = with(hdr(VIRTIO_GPU_CMD_GET_EDID), &[16, 0]);
        assert_eq!(
            err(Queue::Control, &b),
            DecodeErrorKind::InvalidScanoutId(16)
        );
    }

    #[test]
    fn resource_create_2d() {
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D), &[5, 2, 640, 480]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceCreate2d {
                resource_id: 5,
                format: Format::B8G8R8X8Unorm,
                width: 640,
                height: 480
            }
        );
        for f in Format::ALL {
            let b = with(
                hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D),
                &[5, f.as_u32(), 1, 1],
            );
            assert!(matches!(
                ok(Queue::Control, &b),
                Command::ResourceCreate2d { format, .. } if format == f
            ));
        }
    }

    #[test]
    fn resource_create_2d_rejects() {
        let h = || hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D);
        assert_eq!(
            err(Queue::Control, &with(h(), &[0, 2, 640, 480])),
            DecodeErrorKind::ZeroResourceId {
                cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_2D
            }
        );
        assert_eq!(
            err(Queue::Control, &with(h(), &[1, 5, 640, 480])),
            DecodeErrorKind::InvalidFormat(5)
        );
        assert_eq!(
            err(Queue::Control, &with(h(), &[1, 2, 0, 480])),
            DecodeErrorKind::ZeroSize {
                width: 0,
                height: 480
            }
        );
        assert_eq!(
            err(Queue::Control, &with(h(), &[1, 2, 640, 0])),
            DecodeErrorKind::ZeroSize {
                width: 640,
                height: 0
            }
        );
    }

    #[test]
    fn unref_and_detach() {
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_UNREF), &[7, 0]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceUnref { resource_id: 7 }
        );
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING), &[8, 0]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceDetachBacking { resource_id: 8 }
        );
        for cmd in [
            VIRTIO_GPU_CMD_RESOURCE_UNREF,
            VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING,
        ] {
            let e = decode(Queue::Control, &with(hdr(cmd), &[0, 0]), MAX).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::ZeroResourceId { cmd });
            assert_eq!(e.error_code(), ErrorCode::InvalidResourceId);
        }
    }

    #[test]
    fn set_scanout_allows_resource_zero() {
        let b = with(hdr(VIRTIO_GPU_CMD_SET_SCANOUT), &[1, 2, 3, 4, 0, 9]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::SetScanout {
                scanout_id: 0,
                resource_id: 9,
                rect: Rect {
                    x: 1,
                    y: 2,
                    width: 3,
                    height: 4
                }
            }
        );
        let disable = with(hdr(VIRTIO_GPU_CMD_SET_SCANOUT), &[0, 0, 0, 0, 1, 0]);
        assert_eq!(
            ok(Queue::Control, &disable),
            Command::SetScanout {
                scanout_id: 1,
                resource_id: 0,
                rect: Rect::default()
            }
        );
        let bad_scanout = with(hdr(VIRTIO_GPU_CMD_SET_SCANOUT), &[0, 0, 1, 1, 99, 1]);
        let e = decode(Queue::Control, &bad_scanout, MAX).unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::InvalidScanoutId(99));
        assert_eq!(e.error_code(), ErrorCode::InvalidScanoutId);
    }

    #[test]
    fn flush() {
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_FLUSH), &[0, 0, 64, 32, 4, 0]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceFlush {
                resource_id: 4,
                rect: Rect {
                    x: 0,
                    y: 0,
                    width: 64,
                    height: 32
                }
            }
        );
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_FLUSH), &[0, 0, 64, 32, 0, 0]);
        assert!(matches!(
            err(Queue::Control, &b),
            DecodeErrorKind::ZeroResourceId { .. }
        ));
    }

    #[test]
    fn rect_overflow_is_rejected() {
        for words in [
            [u32::MAX, 0, 1, 1, 1, 0],
            [1, 0, u32::MAX, 1, 1, 0],
            [0, u32::MAX, 1, 1, 1, 0],
            [0, 1, 1, u32::MAX, 1, 0],
        ] {
            for cmd in [VIRTIO_GPU_CMD_RESOURCE_FLUSH, VIRTIO_GPU_CMD_SET_SCANOUT] {
                let e = decode(Queue::Control, &with(hdr(cmd), &words), MAX).unwrap_err();
                assert!(matches!(e.kind, DecodeErrorKind::RectOverflow(_)), "{e}");
                assert_eq!(e.error_code(), ErrorCode::InvalidParameter);
            }
        }
        // The largest rect that does not overflow is fine.
        let b = with(
            hdr(VIRTIO_GPU_CMD_RESOURCE_FLUSH),
            &[1, 1, u32::MAX - 1, u32::MAX - 1, 1, 0],
        );
        assert!(decode(Queue::Control, &b, MAX).is_ok());
    }

    #[test]
    fn transfer_to_host_2d() {
        let mut b = with(hdr(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D), &[2, 3, 10, 20]);
        b.extend_from_slice(&4096u64.to_le_bytes());
        let b = with(b, &[6, 0]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::TransferToHost2d {
                resource_id: 6,
                rect: Rect {
                    x: 2,
                    y: 3,
                    width: 10,
                    height: 20
                },
                offset: 4096
            }
        );
    }

    #[test]
    fn transfer_rejects() {
        let build = |offset: u64, res: u32| {
            let mut b = with(hdr(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D), &[0, 0, 1, 1]);
            b.extend_from_slice(&offset.to_le_bytes());
            with(b, &[res, 0])
        };
        assert!(matches!(
            err(Queue::Control, &build(0, 0)),
            DecodeErrorKind::ZeroResourceId { .. }
        ));
        let e = decode(Queue::Control, &build(u64::MAX, 1), 4).unwrap_err();
        assert_eq!(
            e.kind,
            DecodeErrorKind::BadOffset {
                offset: u64::MAX,
                max: 4 * u64::from(u32::MAX)
            }
        );
        assert!(decode(Queue::Control, &build(4 * u64::from(u32::MAX), 1), 4).is_ok());
        // Even the largest allowed entry count cannot justify u64::MAX.
        assert!(decode(Queue::Control, &build(u64::MAX, 1), u32::MAX).is_err());
    }

    #[test]
    fn attach_backing() {
        let mut b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING), &[3, 2]);
        b.extend(entry(0x1000, 4096));
        b.extend(entry(0x8000_0000, 8192));
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceAttachBacking {
                resource_id: 3,
                entries: vec![
                    BackingEntry {
                        addr: 0x1000,
                        length: 4096
                    },
                    BackingEntry {
                        addr: 0x8000_0000,
                        length: 8192
                    },
                ]
            }
        );
        // An entry ending exactly at the top of the address space does not wrap.
        let mut b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING), &[3, 1]);
        b.extend(entry(u64::MAX - 4095, 4095));
        assert!(decode(Queue::Control, &b, MAX).is_ok());
    }

    #[test]
    fn attach_backing_rejects() {
        let h = |res, n| with(hdr(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING), &[res, n]);

        // A huge count is refused before anything is read or allocated.
        let e = decode(Queue::Control, &h(1, u32::MAX), MAX).unwrap_err();
        assert_eq!(
            e.kind,
            DecodeErrorKind::TooManyEntries {
                n: u32::MAX,
                max: MAX
            }
        );
        assert_eq!(e.error_code(), ErrorCode::InvalidParameter);

        // Even with no limit, a count the bytes do not hold is refused.
        let mut b = h(1, u32::MAX);
        b.extend(entry(0x1000, 4096));
        assert!(matches!(
            decode(Queue::Control, &b, u32::MAX).unwrap_err().kind,
            DecodeErrorKind::TruncatedEntries { n: u32::MAX, .. }
        ));

        let mut b = h(1, 2);
        b.extend(entry(0x1000, 4096));
        b.extend(&entry(0x2000, 4096)[..15]);
        assert_eq!(
            err(Queue::Control, &b),
            DecodeErrorKind::TruncatedEntries {
                n: 2,
                need: 64,
                got: 63
            }
        );

        assert_eq!(err(Queue::Control, &h(1, 0)), DecodeErrorKind::NoEntries);

        let mut b = h(0, 1);
        b.extend(entry(0x1000, 4096));
        assert!(matches!(
            err(Queue::Control, &b),
            DecodeErrorKind::ZeroResourceId { .. }
        ));

        let mut b = h(1, 2);
        b.extend(entry(0x1000, 4096));
        b.extend(entry(0x2000, 0));
        assert_eq!(
            err(Queue::Control, &b),
            DecodeErrorKind::BadEntry {
                index: 1,
                addr: 0x2000,
                length: 0
            }
        );

        let mut b = h(1, 1);
        b.extend(entry(u64::MAX - 10, 4096));
        assert!(matches!(
            err(Queue::Control, &b),
            DecodeErrorKind::BadEntry { index: 0, .. }
        ));
    }

    #[test]
    fn cursor_commands() {
        let b = with(
            hdr(VIRTIO_GPU_CMD_UPDATE_CURSOR),
            &[1, 100, 200, 0, 9, 3, 4, 0],
        );
        assert_eq!(
            ok(Queue::Cursor, &b),
            Command::UpdateCursor {
                pos: CursorPos {
                    scanout_id: 1,
                    x: 100,
                    y: 200
                },
                resource_id: 9,
                hot_x: 3,
                hot_y: 4
            }
        );
        // Resource 0 hides the cursor.
        let b = with(hdr(VIRTIO_GPU_CMD_UPDATE_CURSOR), &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(matches!(
            ok(Queue::Cursor, &b),
            Command::UpdateCursor { resource_id: 0, .. }
        ));
        let b = with(hdr(VIRTIO_GPU_CMD_MOVE_CURSOR), &[0, 5, 6, 0, 77, 1, 1, 0]);
        assert_eq!(
            ok(Queue::Cursor, &b),
            Command::MoveCursor {
                pos: CursorPos {
                    scanout_id: 0,
                    x: 5,
                    y: 6
                }
            }
        );
        let b = with(hdr(VIRTIO_GPU_CMD_MOVE_CURSOR), &[16, 5, 6, 0, 0, 0, 0, 0]);
        assert_eq!(
            err(Queue::Cursor, &b),
            DecodeErrorKind::InvalidScanoutId(16)
        );
    }

    #[test]
    fn wrong_queue() {
        let cursor = with(hdr(VIRTIO_GPU_CMD_MOVE_CURSOR), &[0; 8]);
        assert_eq!(
            err(Queue::Control, &cursor),
            DecodeErrorKind::WrongQueue {
                cmd: VIRTIO_GPU_CMD_MOVE_CURSOR,
                queue: Queue::Control
            }
        );
        let ctrl = hdr(VIRTIO_GPU_CMD_GET_DISPLAY_INFO);
        assert_eq!(
            err(Queue::Cursor, &ctrl),
            DecodeErrorKind::WrongQueue {
                cmd: VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
                queue: Queue::Cursor
            }
        );
        // Unsupported control commands are still control commands, and every blob,
        // context and capset command belongs on the control queue.
        let e = err(Queue::Cursor, &hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_3D));
        assert!(matches!(e, DecodeErrorKind::WrongQueue { .. }));
        for t in [
            VIRTIO_GPU_CMD_GET_CAPSET_INFO,
            VIRTIO_GPU_CMD_GET_CAPSET,
            VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
            VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
            VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
            VIRTIO_GPU_CMD_CTX_CREATE,
            VIRTIO_GPU_CMD_CTX_DESTROY,
            VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
            VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
            VIRTIO_GPU_CMD_SUBMIT_3D,
            VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
            VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
        ] {
            let mut b = hdr_ctx(t, 1);
            b.resize(512, 0);
            assert_eq!(
                err(Queue::Cursor, &b),
                DecodeErrorKind::WrongQueue {
                    cmd: t,
                    queue: Queue::Cursor
                }
            );
        }
    }

    #[test]
    fn unknown_and_unsupported() {
        for t in [0, 0x10e, 0x20a, 0x302, 0x1100, u32::MAX] {
            let e = decode(Queue::Control, &hdr(t), MAX).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::UnknownCommand(t));
            assert_eq!(e.error_code(), ErrorCode::Unspec);
        }
        for t in [
            VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
            VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
        ] {
            let e = decode(Queue::Control, &with(hdr(t), &[0; 32]), MAX).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::Unsupported(t));
            assert!(e.is_unsupported());
            assert_eq!(e.error_code(), ErrorCode::Unspec);
            assert!(e.to_string().contains("not supported"), "{e}");
        }
    }

    #[test]
    fn short_header_and_body() {
        for len in 0..CTRL_HDR_SIZE {
            let e = decode(Queue::Control, &vec![0u8; len], MAX).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::ShortHeader { len });
            assert_eq!(e.header(), None);
            assert_eq!(e.error_code(), ErrorCode::Unspec);
        }
        let full = with(hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D), &[1, 2, 3, 4]);
        for len in CTRL_HDR_SIZE..full.len() {
            let e = decode(Queue::Control, &full[..len], MAX).unwrap_err();
            assert_eq!(
                e.kind,
                DecodeErrorKind::ShortBody {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
                    need: RESOURCE_CREATE_2D_SIZE,
                    got: len
                }
            );
            assert!(e.header().is_some());
        }
        let e = decode(Queue::Cursor, &hdr(VIRTIO_GPU_CMD_UPDATE_CURSOR), MAX).unwrap_err();
        assert!(matches!(e.kind, DecodeErrorKind::ShortBody { .. }));
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let b = with(
            hdr(VIRTIO_GPU_CMD_RESOURCE_UNREF),
            &[7, 0, 0xffff_ffff, 1, 2],
        );
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceUnref { resource_id: 7 }
        );
        let mut b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING), &[3, 1]);
        b.extend(entry(0x1000, 4096));
        b.extend(entry(0, 0)); // beyond nr_entries: not an entry
        assert!(matches!(
            ok(Queue::Control, &b),
            Command::ResourceAttachBacking { entries, .. } if entries.len() == 1
        ));
    }

    #[test]
    fn error_keeps_header_for_fence_echo() {
        let h = CtrlHeader {
            type_: VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
            flags: VIRTIO_GPU_FLAG_FENCE,
            fence_id: 77,
            ctx_id: 0,
            ring_idx: 0,
        };
        let b = with(h.to_bytes().to_vec(), &[0, 2, 1, 1]);
        let e = decode(Queue::Control, &b, MAX).unwrap_err();
        assert_eq!(e.header(), Some(h));
        let resp = encode_response(e.header().as_ref(), &Response::Err(e.error_code()));
        let rh = CtrlHeader::from_bytes(&resp).unwrap();
        assert_eq!(rh.type_, VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID);
        assert_eq!(rh.fence_id, 77);
        assert!(e.to_string().contains("RESOURCE_CREATE_2D"), "{e}");
    }

    #[test]
    fn encode_decode_roundtrip() {
        let reqs = [
            Command::GetDisplayInfo,
            Command::GetEdid { scanout_id: 15 },
            Command::ResourceCreate2d {
                resource_id: 1,
                format: Format::R8G8B8A8Unorm,
                width: 3,
                height: 4,
            },
            Command::ResourceAttachBacking {
                resource_id: 1,
                entries: vec![BackingEntry {
                    addr: 0x10_0000,
                    length: 48,
                }],
            },
            Command::MoveCursor {
                pos: CursorPos {
                    scanout_id: 2,
                    x: 1,
                    y: 1,
                },
            },
        ];
        for cmd in reqs {
            let q = if cmd.is_cursor() {
                Queue::Cursor
            } else {
                Queue::Control
            };
            let req = Request {
                hdr: CtrlHeader {
                    type_: cmd.cmd_type(),
                    flags: VIRTIO_GPU_FLAG_FENCE,
                    fence_id: 5,
                    ctx_id: 2,
                    ..CtrlHeader::default()
                },
                cmd,
            };
            assert_eq!(decode(q, &req.encode(), MAX), Ok(req));
        }
    }

    #[test]
    fn capset_commands() {
        let b = with(hdr(VIRTIO_GPU_CMD_GET_CAPSET_INFO), &[2, 0xffff]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::GetCapsetInfo { capset_index: 2 }
        );
        let b = with(
            hdr(VIRTIO_GPU_CMD_GET_CAPSET),
            &[VIRTIO_GPU_CAPSET_VIRGL2, 1],
        );
        assert_eq!(
            ok(Queue::Control, &b),
            Command::GetCapset {
                capset_id: VIRTIO_GPU_CAPSET_VIRGL2,
                capset_version: 1
            }
        );
        for t in [VIRTIO_GPU_CMD_GET_CAPSET_INFO, VIRTIO_GPU_CMD_GET_CAPSET] {
            rejects(
                &with(hdr(t), &[1]),
                DecodeErrorKind::ShortBody {
                    cmd: t,
                    need: 32,
                    got: 28,
                },
                ErrorCode::Unspec,
            );
        }
    }

    #[test]
    fn resource_id_only_commands() {
        for (t, make) in [
            (
                VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
                (|resource_id| Command::ResourceAssignUuid { resource_id }) as fn(u32) -> Command,
            ),
            (VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB, |resource_id| {
                Command::ResourceUnmapBlob { resource_id }
            }),
            (VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, |resource_id| {
                Command::CtxAttachResource { resource_id }
            }),
            (VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE, |resource_id| {
                Command::CtxDetachResource { resource_id }
            }),
        ] {
            let b = with(hdr_ctx(t, 4), &[9, 0xdead]);
            assert_eq!(ok(Queue::Control, &b), make(9));
            rejects(
                &with(hdr_ctx(t, 4), &[0, 0]),
                DecodeErrorKind::ZeroResourceId { cmd: t },
                ErrorCode::InvalidResourceId,
            );
            rejects(
                &with(hdr_ctx(t, 4), &[9]),
                DecodeErrorKind::ShortBody {
                    cmd: t,
                    need: 32,
                    got: 28,
                },
                ErrorCode::Unspec,
            );
        }
        // Only the context commands need a context.
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID), &[9, 0]);
        assert!(decode(Queue::Control, &b, MAX).is_ok());
        for t in [
            VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
            VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
        ] {
            rejects(
                &with(hdr(t), &[9, 0]),
                DecodeErrorKind::ZeroContextId { cmd: t },
                ErrorCode::InvalidContextId,
            );
        }
    }

    fn ctx_create(ctx_id: u32, nlen: u32, context_init: u32, name: &[u8]) -> Vec<u8> {
        let mut b = with(
            hdr_ctx(VIRTIO_GPU_CMD_CTX_CREATE, ctx_id),
            &[nlen, context_init],
        );
        b.extend_from_slice(name);
        b.resize(CTX_CREATE_SIZE, 0xee); // unused name bytes: not part of the name
        b
    }

    #[test]
    fn ctx_create_and_destroy() {
        let b = ctx_create(3, 7, VIRTIO_GPU_CAPSET_CROSS_DOMAIN, b"wayland");
        let r = decode(Queue::Control, &b, MAX).unwrap();
        assert_eq!(r.hdr.ctx_id, 3);
        assert_eq!(
            r.cmd,
            Command::CtxCreate {
                context_init: VIRTIO_GPU_CAPSET_CROSS_DOMAIN,
                name: b"wayland".to_vec()
            }
        );
        // No name at all, and a name filling all 64 bytes.
        assert_eq!(
            ok(Queue::Control, &ctx_create(3, 0, 0, b"")),
            Command::CtxCreate {
                context_init: 0,
                name: vec![]
            }
        );
        assert_eq!(
            ok(Queue::Control, &ctx_create(3, 64, 0, &[b'n'; 64])),
            Command::CtxCreate {
                context_init: 0,
                name: vec![b'n'; 64]
            }
        );
        for nlen in [65, 1000, u32::MAX] {
            rejects(
                &ctx_create(3, nlen, 0, b"x"),
                DecodeErrorKind::NameTooLong { nlen },
                ErrorCode::InvalidParameter,
            );
        }
        rejects(
            &ctx_create(0, 1, 0, b"x"),
            DecodeErrorKind::ZeroContextId {
                cmd: VIRTIO_GPU_CMD_CTX_CREATE,
            },
            ErrorCode::InvalidContextId,
        );
        // The debug name array is part of the struct even when nlen is short.
        rejects(
            &ctx_create(3, 1, 0, b"x")[..CTX_CREATE_SIZE - 1],
            DecodeErrorKind::ShortBody {
                cmd: VIRTIO_GPU_CMD_CTX_CREATE,
                need: CTX_CREATE_SIZE,
                got: CTX_CREATE_SIZE - 1,
            },
            ErrorCode::Unspec,
        );

        let r = decode(Queue::Control, &hdr_ctx(VIRTIO_GPU_CMD_CTX_DESTROY, 5), MAX).unwrap();
        assert_eq!((r.hdr.ctx_id, r.cmd), (5, Command::CtxDestroy));
        rejects(
            &hdr(VIRTIO_GPU_CMD_CTX_DESTROY),
            DecodeErrorKind::ZeroContextId {
                cmd: VIRTIO_GPU_CMD_CTX_DESTROY,
            },
            ErrorCode::InvalidContextId,
        );
    }

    fn submit(ctx_id: u32, size: u32, data: &[u8]) -> Vec<u8> {
        let mut b = with(hdr_ctx(VIRTIO_GPU_CMD_SUBMIT_3D, ctx_id), &[size, 0]);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn submit_3d() {
        let r = decode(Queue::Control, &submit(2, 5, b"hello and more"), MAX).unwrap();
        assert_eq!(r.hdr.ctx_id, 2);
        assert_eq!(
            r.cmd,
            Command::Submit3d {
                commands: b"hello".to_vec()
            }
        );
        assert_eq!(
            ok(Queue::Control, &submit(2, 0, b"")),
            Command::Submit3d { commands: vec![] }
        );
        let full = vec![0x5a; SUBMIT_MAX as usize];
        assert_eq!(
            ok(Queue::Control, &submit(2, SUBMIT_MAX, &full)),
            Command::Submit3d { commands: full }
        );

        rejects(
            &submit(0, 1, b"x"),
            DecodeErrorKind::ZeroContextId {
                cmd: VIRTIO_GPU_CMD_SUBMIT_3D,
            },
            ErrorCode::InvalidContextId,
        );
        // Huge sizes are refused on the number alone, before any allocation.
        for size in [SUBMIT_MAX + 1, u32::MAX] {
            rejects(
                &submit(2, size, b"tiny"),
                DecodeErrorKind::SubmitTooLarge {
                    size,
                    max: SUBMIT_MAX,
                },
                ErrorCode::OutOfMemory,
            );
        }
        rejects(
            &submit(2, 10, b"short"),
            DecodeErrorKind::ShortBody {
                cmd: VIRTIO_GPU_CMD_SUBMIT_3D,
                need: CMD_SUBMIT_SIZE + 10,
                got: CMD_SUBMIT_SIZE + 5,
            },
            ErrorCode::Unspec,
        );
        rejects(
            &submit(2, 10, b"")[..28],
            DecodeErrorKind::ShortBody {
                cmd: VIRTIO_GPU_CMD_SUBMIT_3D,
                need: CMD_SUBMIT_SIZE,
                got: 28,
            },
            ErrorCode::Unspec,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn create_blob(
        ctx_id: u32,
        res: u32,
        mem: u32,
        flags: u32,
        n: u32,
        blob_id: u64,
        size: u64,
        entries: &[(u64, u32)],
    ) -> Vec<u8> {
        let mut b = with(
            hdr_ctx(VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, ctx_id),
            &[res, mem, flags, n],
        );
        b.extend_from_slice(&blob_id.to_le_bytes());
        b.extend_from_slice(&size.to_le_bytes());
        for &(addr, len) in entries {
            b.extend(entry(addr, len));
        }
        b
    }

    #[test]
    fn resource_create_blob() {
        let pages = [(0x10_0000, 4096), (0x20_0000, 8192)];
        // A guest blob from context 0, as the Linux driver creates for dumb buffers.
        let b = create_blob(0, 5, 1, 2, 2, 0, 12288, &pages);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceCreateBlob {
                resource_id: 5,
                blob_mem: BlobMem::Guest,
                blob_flags: VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE,
                blob_id: 0,
                size: 12288,
                entries: vec![
                    BackingEntry {
                        addr: 0x10_0000,
                        length: 4096
                    },
                    BackingEntry {
                        addr: 0x20_0000,
                        length: 8192
                    }
                ]
            }
        );
        // A host blob from a context: no entries, any blob id.
        let b = create_blob(7, 6, 2, 7, 0, u64::MAX, 1 << 40, &[]);
        let r = decode(Queue::Control, &b, MAX).unwrap();
        assert_eq!(r.hdr.ctx_id, 7);
        assert_eq!(
            r.cmd,
            Command::ResourceCreateBlob {
                resource_id: 6,
                blob_mem: BlobMem::Host3d,
                blob_flags: 7,
                blob_id: u64::MAX,
                size: 1 << 40,
                entries: vec![]
            }
        );
        // HOST3D_GUEST: a context and guest entries; size may be below the backing.
        let b = create_blob(7, 8, 3, 1, 1, 3, 100, &pages[..1]);
        assert!(matches!(
            ok(Queue::Control, &b),
            Command::ResourceCreateBlob { blob_mem: BlobMem::Host3dGuest, entries, size: 100, .. }
                if entries.len() == 1
        ));
    }

    #[test]
    fn resource_create_blob_rejects() {
        use DecodeErrorKind as K;
        use ErrorCode::*;
        let page = [(0x10_0000u64, 4096u32)];
        let cases: Vec<(Vec<u8>, K, ErrorCode)> = vec![
            (
                create_blob(1, 0, 1, 0, 1, 0, 4096, &page),
                K::ZeroResourceId {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
                },
                InvalidResourceId,
            ),
            (
                create_blob(1, 5, 0, 0, 1, 0, 4096, &page),
                K::InvalidBlobMem(0),
                InvalidParameter,
            ),
            (
                create_blob(1, 5, 4, 0, 1, 0, 4096, &page),
                K::InvalidBlobMem(4),
                InvalidParameter,
            ),
            (
                create_blob(1, 5, 1, 8, 1, 0, 4096, &page),
                K::InvalidBlobFlags(8),
                InvalidParameter,
            ),
            (
                create_blob(1, 5, 1, 0x8000_0001, 1, 0, 4096, &page),
                K::InvalidBlobFlags(0x8000_0001),
                InvalidParameter,
            ),
            (
                create_blob(1, 5, 1, 0, 1, 0, 0, &page),
                K::ZeroBlobSize,
                InvalidParameter,
            ),
            (
                create_blob(1, 5, 2, 1, 1, 0, 4096, &page),
                K::UnexpectedEntries { n: 1 },
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 2, 1, 0, 0, 4096, &[]),
                K::ZeroContextId {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
                },
                InvalidContextId,
            ),
            (
                create_blob(0, 5, 3, 1, 1, 0, 4096, &page),
                K::ZeroContextId {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
                },
                InvalidContextId,
            ),
            (
                create_blob(0, 5, 1, 0, 0, 0, 4096, &[]),
                K::NoEntries,
                InvalidParameter,
            ),
            (
                create_blob(1, 5, 3, 0, 0, 0, 4096, &[]),
                K::NoEntries,
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 1, 0, MAX + 1, 0, 4096, &page),
                K::TooManyEntries {
                    n: MAX + 1,
                    max: MAX,
                },
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 1, 0, u32::MAX, 0, 4096, &page),
                K::TooManyEntries {
                    n: u32::MAX,
                    max: MAX,
                },
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 1, 0, 2, 0, 4096, &page),
                K::TruncatedEntries {
                    n: 2,
                    need: RESOURCE_CREATE_BLOB_SIZE + 32,
                    got: RESOURCE_CREATE_BLOB_SIZE + 16,
                },
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 1, 0, 1, 0, 4096, &[(0x1000, 0)]),
                K::BadEntry {
                    index: 0,
                    addr: 0x1000,
                    length: 0,
                },
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 1, 0, 1, 0, 4097, &page),
                K::BlobLargerThanBacking {
                    size: 4097,
                    backing: 4096,
                },
                InvalidParameter,
            ),
            (
                create_blob(0, 5, 1, 0, 1, 0, 4096, &page)[..RESOURCE_CREATE_BLOB_SIZE - 1]
                    .to_vec(),
                K::ShortBody {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
                    need: RESOURCE_CREATE_BLOB_SIZE,
                    got: RESOURCE_CREATE_BLOB_SIZE - 1,
                },
                Unspec,
            ),
        ];
        for (b, kind, code) in cases {
            rejects(&b, kind, code);
        }
    }

    #[test]
    fn map_and_unmap_blob() {
        let mut b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB), &[4, 0xffff]);
        b.extend_from_slice(&0x1_0020_0000u64.to_le_bytes());
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceMapBlob {
                resource_id: 4,
                offset: 0x1_0020_0000
            }
        );
        rejects(
            &b[..RESOURCE_MAP_BLOB_SIZE - 1],
            DecodeErrorKind::ShortBody {
                cmd: VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
                need: RESOURCE_MAP_BLOB_SIZE,
                got: RESOURCE_MAP_BLOB_SIZE - 1,
            },
            ErrorCode::Unspec,
        );
        let mut b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB), &[0, 0]);
        b.extend_from_slice(&0u64.to_le_bytes());
        rejects(
            &b,
            DecodeErrorKind::ZeroResourceId {
                cmd: VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
            },
            ErrorCode::InvalidResourceId,
        );
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB), &[4, 0]);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::ResourceUnmapBlob { resource_id: 4 }
        );
    }

    fn scanout_blob(rect: [u32; 4], scanout: u32, res: u32, format: u32) -> Vec<u8> {
        let mut words = rect.to_vec();
        words.extend([scanout, res, 640, 480, format, 0xdead]);
        words.extend([2560, 0, 0, 0, 0, 4096, 0, 0]);
        with(hdr(VIRTIO_GPU_CMD_SET_SCANOUT_BLOB), &words)
    }

    #[test]
    fn set_scanout_blob() {
        let b = scanout_blob([0, 0, 640, 480], 1, 7, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM);
        assert_eq!(b.len(), SET_SCANOUT_BLOB_SIZE);
        assert_eq!(
            ok(Queue::Control, &b),
            Command::SetScanoutBlob {
                scanout_id: 1,
                resource_id: 7,
                rect: Rect {
                    x: 0,
                    y: 0,
                    width: 640,
                    height: 480
                },
                width: 640,
                height: 480,
                format: Format::B8G8R8X8Unorm,
                strides: [2560, 0, 0, 0],
                offsets: [0, 4096, 0, 0]
            }
        );
        // Resource 0 disables the scanout.
        let b = scanout_blob([0; 4], 0, 0, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM);
        assert!(matches!(
            ok(Queue::Control, &b),
            Command::SetScanoutBlob { resource_id: 0, .. }
        ));

        rejects(
            &scanout_blob([0, 0, 1, 1], 16, 7, 2),
            DecodeErrorKind::InvalidScanoutId(16),
            ErrorCode::InvalidScanoutId,
        );
        for f in [0, 5, 200] {
            rejects(
                &scanout_blob([0, 0, 1, 1], 0, 7, f),
                DecodeErrorKind::InvalidFormat(f),
                ErrorCode::InvalidParameter,
            );
        }
        for rect in [
            [u32::MAX, 0, 1, 1],
            [1, 0, u32::MAX, 1],
            [0, u32::MAX, 1, 1],
            [0, 1, 1, u32::MAX],
        ] {
            let e = err(Queue::Control, &scanout_blob(rect, 0, 7, 2));
            assert!(matches!(e, DecodeErrorKind::RectOverflow(_)), "{e}");
            assert_eq!(e.error_code(), ErrorCode::InvalidParameter);
        }
        let b = scanout_blob([0, 0, 1, 1], 0, 7, 2);
        rejects(
            &b[..SET_SCANOUT_BLOB_SIZE - 1],
            DecodeErrorKind::ShortBody {
                cmd: VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
                need: SET_SCANOUT_BLOB_SIZE,
                got: SET_SCANOUT_BLOB_SIZE - 1,
            },
            ErrorCode::Unspec,
        );
    }

    #[test]
    fn new_commands_roundtrip() {
        let cmds = [
            Command::GetCapsetInfo { capset_index: 1 },
            Command::GetCapset {
                capset_id: 5,
                capset_version: 0,
            },
            Command::ResourceAssignUuid { resource_id: 3 },
            Command::ResourceCreateBlob {
                resource_id: 3,
                blob_mem: BlobMem::Host3d,
                blob_flags: VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                blob_id: 77,
                size: 1 << 21,
                entries: vec![],
            },
            Command::SetScanoutBlob {
                scanout_id: 0,
                resource_id: 3,
                rect: Rect {
                    x: 0,
                    y: 0,
                    width: 8,
                    height: 8,
                },
                width: 8,
                height: 8,
                format: Format::R8G8B8A8Unorm,
                strides: [32, 0, 0, 0],
                offsets: [0; 4],
            },
            Command::CtxCreate {
                context_init: VIRTIO_GPU_CAPSET_CROSS_DOMAIN,
                name: b"ctx".to_vec(),
            },
            Command::CtxDestroy,
            Command::CtxAttachResource { resource_id: 3 },
            Command::CtxDetachResource { resource_id: 3 },
            Command::Submit3d {
                commands: vec![1, 2, 3],
            },
            Command::ResourceMapBlob {
                resource_id: 3,
                offset: 0x4000,
            },
            Command::ResourceUnmapBlob { resource_id: 3 },
        ];
        for cmd in cmds {
            let req = Request {
                hdr: CtrlHeader {
                    type_: cmd.cmd_type(),
                    ctx_id: 1,
                    ..CtrlHeader::default()
                },
                cmd,
            };
            assert_eq!(decode(Queue::Control, &req.encode(), MAX), Ok(req));
        }
    }

    #[test]
    fn error_codes_of_new_kinds() {
        use DecodeErrorKind as K;
        for (k, code) in [
            (K::ZeroContextId { cmd: 0x200 }, ErrorCode::InvalidContextId),
            (K::NameTooLong { nlen: 65 }, ErrorCode::InvalidParameter),
            (
                K::SubmitTooLarge { size: 2, max: 1 },
                ErrorCode::OutOfMemory,
            ),
            (K::InvalidBlobMem(9), ErrorCode::InvalidParameter),
            (K::InvalidBlobFlags(9), ErrorCode::InvalidParameter),
            (K::ZeroBlobSize, ErrorCode::InvalidParameter),
            (K::UnexpectedEntries { n: 1 }, ErrorCode::InvalidParameter),
            (
                K::BlobLargerThanBacking {
                    size: 2,
                    backing: 1,
                },
                ErrorCode::InvalidParameter,
            ),
        ] {
            assert_eq!(k.error_code(), code, "{k}");
        }
    }

    fn virgl(q: Queue, b: &[u8]) -> Result<Request, DecodeError> {
        super::decode_virgl(
            q,
            b,
            DecodeLimits {
                max_backing_entries: MAX,
                max_submit_bytes: SUBMIT_MAX,
            },
        )
    }

    /// RESOURCE_CREATE_3D with these fields, padding 0.
    fn create_3d(words: [u32; 11]) -> Vec<u8> {
        with(with(hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_3D), &words), &[0])
    }

    fn transfer_3d(cmd: u32, bx: [u32; 6], offset: u64, tail: [u32; 4]) -> Vec<u8> {
        let mut b = with(hdr(cmd), &bx);
        b.extend_from_slice(&offset.to_le_bytes());
        with(b, &tail)
    }

    #[test]
    fn virgl_commands_only_with_virgl() {
        let c = create_3d([5, 2, 2, 2, 64, 64, 1, 1, 0, 0, 0]);
        let t = transfer_3d(
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
            [0, 0, 0, 64, 64, 1],
            0,
            [5, 0, 0, 0],
        );
        let f = transfer_3d(
            VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
            [0, 0, 0, 64, 64, 1],
            0,
            [5, 0, 0, 0],
        );
        for b in [&c, &t, &f] {
            let e = decode(Queue::Control, b, MAX).unwrap_err();
            assert!(e.is_unsupported(), "{e}");
            assert_eq!(e.error_code(), ErrorCode::Unspec);
            assert!(virgl(Queue::Control, b).is_ok());
            // Still control commands only.
            assert!(matches!(
                virgl(Queue::Cursor, b).unwrap_err().kind,
                DecodeErrorKind::WrongQueue { .. }
            ));
        }
        // Everything else decodes the same way in both modes.
        let b = with(hdr(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D), &[5, 2, 640, 480]);
        assert_eq!(decode(Queue::Control, &b, MAX), virgl(Queue::Control, &b));
    }

    #[test]
    fn resource_create_3d() {
        let r = virgl(
            Queue::Control,
            &create_3d([5, 2, 2, 2, 64, 32, 1, 1, 6, 0, 1]),
        )
        .unwrap();
        assert_eq!(
            r.cmd,
            Command::ResourceCreate3d {
                resource_id: 5,
                args: Resource3d {
                    target: PIPE_TEXTURE_2D,
                    format: 2,
                    bind: 2,
                    width: 64,
                    height: 32,
                    depth: 1,
                    array_size: 1,
                    last_level: 6,
                    nr_samples: 0,
                    flags: 1,
                },
            }
        );
        // A buffer: bytes wide, one row, layer and level.
        assert!(virgl(
            Queue::Control,
            &create_3d([6, PIPE_BUFFER, 0, 1, 1 << 20, 1, 1, 1, 0, 0, 0])
        )
        .is_ok());
        // A 3D texture's depth counts for its mip chain; an array's layers do not.
        assert!(virgl(
            Queue::Control,
            &create_3d([7, PIPE_TEXTURE_3D, 2, 0, 4, 4, 64, 1, 6, 0, 0])
        )
        .is_ok());
        assert!(virgl(
            Queue::Control,
            &create_3d([7, PIPE_TEXTURE_2D_ARRAY, 2, 0, 4, 4, 1, 64, 2, 0, 0])
        )
        .is_ok());
    }

    #[test]
    fn resource_create_3d_rejects() {
        use DecodeErrorKind as K;
        let cases = [
            (
                [0, 2, 2, 2, 64, 64, 1, 1, 0, 0, 0],
                K::ZeroResourceId {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
                },
                ErrorCode::InvalidResourceId,
            ),
            (
                [5, 9, 2, 2, 64, 64, 1, 1, 0, 0, 0],
                K::InvalidTarget(9),
                ErrorCode::InvalidParameter,
            ),
            (
                [5, u32::MAX, 2, 2, 64, 64, 1, 1, 0, 0, 0],
                K::InvalidTarget(u32::MAX),
                ErrorCode::InvalidParameter,
            ),
            (
                [5, 2, 2, 2, 64, 64, 0, 1, 0, 0, 0],
                K::ZeroSize3d {
                    width: 64,
                    height: 64,
                    depth: 0,
                    array_size: 1,
                },
                ErrorCode::InvalidParameter,
            ),
            (
                [5, 2, 2, 2, 0, 64, 1, 1, 0, 0, 0],
                K::ZeroSize3d {
                    width: 0,
                    height: 64,
                    depth: 1,
                    array_size: 1,
                },
                ErrorCode::InvalidParameter,
            ),
            (
                [5, 2, 2, 2, 64, 64, 1, 0, 0, 0, 0],
                K::ZeroSize3d {
                    width: 64,
                    height: 64,
                    depth: 1,
                    array_size: 0,
                },
                ErrorCode::InvalidParameter,
            ),
            // 64x32: levels 0 (64x32) to 6 (1x1).
            (
                [5, 2, 2, 2, 64, 32, 1, 1, 7, 0, 0],
                K::TooManyLevels {
                    last_level: 7,
                    max: 6,
                },
                ErrorCode::InvalidParameter,
            ),
            (
                [5, 2, 2, 2, 1, 1, 1, 1, u32::MAX, 0, 0],
                K::TooManyLevels {
                    last_level: u32::MAX,
                    max: 0,
                },
                ErrorCode::InvalidParameter,
            ),
            // An array's layers do not make the chain longer.
            (
                [5, PIPE_TEXTURE_2D_ARRAY, 2, 0, 4, 4, 1, 64, 3, 0, 0],
                K::TooManyLevels {
                    last_level: 3,
                    max: 2,
                },
                ErrorCode::InvalidParameter,
            ),
            (
                [5, PIPE_BUFFER, 0, 1, 4096, 2, 1, 1, 0, 0, 0],
                K::BufferShape {
                    height: 2,
                    depth: 1,
                    array_size: 1,
                    last_level: 0,
                },
                ErrorCode::InvalidParameter,
            ),
            (
                [5, PIPE_BUFFER, 0, 1, 4096, 1, 1, 1, 1, 0, 0],
                K::BufferShape {
                    height: 1,
                    depth: 1,
                    array_size: 1,
                    last_level: 1,
                },
                ErrorCode::InvalidParameter,
            ),
        ];
        for (words, kind, code) in cases {
            let e = virgl(Queue::Control, &create_3d(words)).unwrap_err();
            assert_eq!(e.kind, kind, "{words:?}");
            assert_eq!(e.error_code(), code, "{words:?}");
            assert!(e.header().is_some());
        }
        let full = create_3d([5, 2, 2, 2, 64, 64, 1, 1, 0, 0, 0]);
        for len in CTRL_HDR_SIZE..RESOURCE_CREATE_3D_SIZE {
            assert_eq!(
                virgl(Queue::Control, &full[..len]).unwrap_err().kind,
                DecodeErrorKind::ShortBody {
                    cmd: VIRTIO_GPU_CMD_RESOURCE_CREATE_3D,
                    need: RESOURCE_CREATE_3D_SIZE,
                    got: len
                }
            );
        }
    }

    #[test]
    fn transfers_3d() {
        for cmd in [
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D,
            VIRTIO_GPU_CMD_TRANSFER_FROM_HOST_3D,
        ] {
            let b = transfer_3d(cmd, [1, 2, 3, 4, 5, 6], 0x1000, [9, 1, 256, 4096]);
            let transfer = TransferHost3d {
                bbox: Box3d {
                    x: 1,
                    y: 2,
                    z: 3,
                    w: 4,
                    h: 5,
                    d: 6,
                },
                offset: 0x1000,
                level: 1,
                stride: 256,
                layer_stride: 4096,
            };
            let want = if cmd == VIRTIO_GPU_CMD_TRANSFER_TO_HOST_3D {
                Command::TransferToHost3d {
                    resource_id: 9,
                    transfer,
                }
            } else {
                Command::TransferFromHost3d {
                    resource_id: 9,
                    transfer,
                }
            };
            assert_eq!(virgl(Queue::Control, &b).unwrap().cmd, want);

            let e = virgl(
                Queue::Control,
                &transfer_3d(cmd, [0, 0, 0, 1, 1, 1], 0, [0, 0, 0, 0]),
            )
            .unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::ZeroResourceId { cmd });
            assert_eq!(e.error_code(), ErrorCode::InvalidResourceId);

            for bx in [
                [u32::MAX, 0, 0, 1, 1, 1],
                [0, u32::MAX, 0, 1, 1, 1],
                [0, 0, u32::MAX, 1, 1, 1],
                [1, 0, 0, u32::MAX, 1, 1],
                [0, 1, 0, 1, u32::MAX, 1],
                [0, 0, 1, 1, 1, u32::MAX],
            ] {
                let e = virgl(Queue::Control, &transfer_3d(cmd, bx, 0, [9, 0, 0, 0])).unwrap_err();
                assert!(
                    matches!(e.kind, DecodeErrorKind::BoxOverflow(_)),
                    "{bx:?}: {e}"
                );
                assert_eq!(e.error_code(), ErrorCode::InvalidParameter);
            }
            // The largest box that does not overflow is the executor's to judge.
            assert!(virgl(
                Queue::Control,
                &transfer_3d(
                    cmd,
                    [1, 1, 1, u32::MAX - 1, u32::MAX - 1, u32::MAX - 1],
                    0,
                    [9, 0, 0, 0]
                )
            )
            .is_ok());

            let e = virgl(
                Queue::Control,
                &transfer_3d(cmd, [0, 0, 0, 1, 1, 1], u64::MAX, [9, 0, 0, 0]),
            )
            .unwrap_err();
            assert_eq!(
                e.kind,
                DecodeErrorKind::BadOffset {
                    offset: u64::MAX,
                    max: u64::from(MAX) * u64::from(u32::MAX)
                }
            );
            assert_eq!(e.error_code(), ErrorCode::InvalidParameter);

            let full = transfer_3d(cmd, [0, 0, 0, 1, 1, 1], 0, [9, 0, 0, 0]);
            for len in CTRL_HDR_SIZE..TRANSFER_HOST_3D_SIZE {
                assert_eq!(
                    virgl(Queue::Control, &full[..len]).unwrap_err().kind,
                    DecodeErrorKind::ShortBody {
                        cmd,
                        need: TRANSFER_HOST_3D_SIZE,
                        got: len
                    }
                );
            }
        }
    }

    #[test]
    fn error_codes_of_3d_kinds() {
        use DecodeErrorKind as K;
        for k in [
            K::InvalidTarget(9),
            K::ZeroSize3d {
                width: 0,
                height: 1,
                depth: 1,
                array_size: 1,
            },
            K::TooManyLevels {
                last_level: 1,
                max: 0,
            },
            K::BufferShape {
                height: 2,
                depth: 1,
                array_size: 1,
                last_level: 0,
            },
            K::BoxOverflow(Box3d::default()),
        ] {
            assert_eq!(k.error_code(), ErrorCode::InvalidParameter, "{k}");
            assert!(!k.to_string().is_empty());
        }
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn known_type() -> impl Strategy<Value = u32> {
            prop_oneof![
                0x100u32..=0x10e,
                0x200u32..=0x20a,
                0x300u32..=0x302,
                any::<u32>()
            ]
        }

        fn arb_rect() -> impl Strategy<Value = Rect> {
            (0u32..10_000, 0u32..10_000, 0u32..10_000, 0u32..10_000).prop_map(
                |(x, y, width, height)| Rect {
                    x,
                    y,
                    width,
                    height,
                },
            )
        }

        fn arb_valid_cmd() -> impl Strategy<Value = Command> {
            let id = 1u32..;
            let scanout = 0..VIRTIO_GPU_MAX_SCANOUTS;
            let pos = (scanout.clone(), any::<u32>(), any::<u32>())
                .prop_map(|(scanout_id, x, y)| CursorPos { scanout_id, x, y });
            let entry = (0u64..u64::MAX / 2, 1u32..)
                .prop_map(|(addr, length)| BackingEntry { addr, length });
            prop_oneof![
                Just(Command::GetDisplayInfo),
                scanout
                    .clone()
                    .prop_map(|scanout_id| Command::GetEdid { scanout_id }),
                (id.clone(), 0..8usize, 1u32.., 1u32..).prop_map(
                    |(resource_id, f, width, height)| {
                        Command::ResourceCreate2d {
                            resource_id,
                            format: Format::ALL[f],
                            width,
                            height,
                        }
                    }
                ),
                id.clone()
                    .prop_map(|resource_id| Command::ResourceUnref { resource_id }),
                (scanout, any::<u32>(), arb_rect()).prop_map(|(scanout_id, resource_id, rect)| {
                    Command::SetScanout {
                        scanout_id,
                        resource_id,
                        rect,
                    }
                }),
                (id.clone(), arb_rect())
                    .prop_map(|(resource_id, rect)| Command::ResourceFlush { resource_id, rect }),
                // 64 entries of at most 4 GiB bound the offset at about 2^38.
                (id.clone(), arb_rect(), 0u64..1 << 36).prop_map(|(resource_id, rect, offset)| {
                    Command::TransferToHost2d {
                        resource_id,
                        rect,
                        offset,
                    }
                }),
                (id.clone(), prop::collection::vec(entry, 1..20)).prop_map(
                    |(resource_id, entries)| Command::ResourceAttachBacking {
                        resource_id,
                        entries
                    }
                ),
                id.prop_map(|resource_id| Command::ResourceDetachBacking { resource_id }),
                (pos.clone(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
                    |(pos, resource_id, hot_x, hot_y)| Command::UpdateCursor {
                        pos,
                        resource_id,
                        hot_x,
                        hot_y,
                    }
                ),
                pos.prop_map(|pos| Command::MoveCursor { pos }),
            ]
        }

        fn arb_blob_ctx_cmd() -> impl Strategy<Value = Command> {
            let id = 1u32..;
            let entry = (0u64..u64::MAX / 2, 1u32..)
                .prop_map(|(addr, length)| BackingEntry { addr, length });
            let mems = [BlobMem::Guest, BlobMem::Host3d, BlobMem::Host3dGuest];
            prop_oneof![
                any::<u32>().prop_map(|capset_index| Command::GetCapsetInfo { capset_index }),
                (any::<u32>(), any::<u32>()).prop_map(|(capset_id, capset_version)| {
                    Command::GetCapset {
                        capset_id,
                        capset_version,
                    }
                }),
                id.clone()
                    .prop_map(|resource_id| Command::ResourceAssignUuid { resource_id }),
                (
                    id.clone(),
                    0..3usize,
                    0..=VIRTIO_GPU_BLOB_FLAGS_ALL,
                    any::<u64>(),
                    prop::collection::vec(entry, 1..20),
                    any::<u64>(),
                )
                    .prop_map(
                        move |(resource_id, m, blob_flags, blob_id, entries, r)| {
                            let blob_mem = mems[m];
                            let (entries, size) = if blob_mem.has_guest_backing() {
                                let total: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
                                (entries, 1 + r % total)
                            } else {
                                (Vec::new(), r.max(1))
                            };
                            Command::ResourceCreateBlob {
                                resource_id,
                                blob_mem,
                                blob_flags,
                                blob_id,
                                size,
                                entries,
                            }
                        }
                    ),
                (
                    0..VIRTIO_GPU_MAX_SCANOUTS,
                    any::<u32>(),
                    arb_rect(),
                    (any::<u32>(), any::<u32>(), 0..8usize),
                    any::<[u32; 4]>(),
                    any::<[u32; 4]>(),
                )
                    .prop_map(
                        |(scanout_id, resource_id, rect, (width, height, f), strides, offsets)| {
                            Command::SetScanoutBlob {
                                scanout_id,
                                resource_id,
                                rect,
                                width,
                                height,
                                format: Format::ALL[f],
                                strides,
                                offsets,
                            }
                        }
                    ),
                (
                    any::<u32>(),
                    prop::collection::vec(any::<u8>(), 0..=VIRTIO_GPU_CTX_DEBUG_NAME_SIZE)
                )
                    .prop_map(|(context_init, name)| Command::CtxCreate { context_init, name }),
                Just(Command::CtxDestroy),
                id.clone()
                    .prop_map(|resource_id| Command::CtxAttachResource { resource_id }),
                id.clone()
                    .prop_map(|resource_id| Command::CtxDetachResource { resource_id }),
                prop::collection::vec(any::<u8>(), 0..512)
                    .prop_map(|commands| Command::Submit3d { commands }),
                (id.clone(), any::<u64>()).prop_map(|(resource_id, offset)| {
                    Command::ResourceMapBlob {
                        resource_id,
                        offset,
                    }
                }),
                id.prop_map(|resource_id| Command::ResourceUnmapBlob { resource_id }),
            ]
        }

        fn arb_virgl_cmd() -> impl Strategy<Value = Command> {
            let create = (
                1u32..,
                (0..=PIPE_TEXTURE_CUBE_ARRAY, any::<u32>(), any::<u32>()),
                (1u32..=4096, 1u32..=4096, 1u32..=64, 1u32..=64),
                (0u32..=3, any::<u32>(), any::<u32>()),
            )
                .prop_map(
                    |(
                        resource_id,
                        (target, format, bind),
                        (w, h, d, a),
                        (lvl, nr_samples, flags),
                    )| {
                        let buffer = target == PIPE_BUFFER;
                        let (height, depth, array_size) =
                            if buffer { (1, 1, 1) } else { (h, d, a) };
                        let mut largest = w.max(height);
                        if target == PIPE_TEXTURE_3D {
                            largest = largest.max(depth);
                        }
                        let last_level = if buffer { 0 } else { lvl.min(largest.ilog2()) };
                        Command::ResourceCreate3d {
                            resource_id,
                            args: Resource3d {
                                target,
                                format,
                                bind,
                                width: w,
                                height,
                                depth,
                                array_size,
                                last_level,
                                nr_samples,
                                flags,
                            },
                        }
                    },
                );
            let side = || (0u32..1 << 31, 0u32..1 << 31);
            let transfer = (
                1u32..,
                side(),
                side(),
                side(),
                0u64..1 << 36,
                any::<[u32; 3]>(),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        resource_id,
                        (x, w),
                        (y, h),
                        (z, d),
                        offset,
                        [level, stride, layer_stride],
                        to_host,
                    )| {
                        let transfer = TransferHost3d {
                            bbox: Box3d { x, y, z, w, h, d },
                            offset,
                            level,
                            stride,
                            layer_stride,
                        };
                        if to_host {
                            Command::TransferToHost3d {
                                resource_id,
                                transfer,
                            }
                        } else {
                            Command::TransferFromHost3d {
                                resource_id,
                                transfer,
                            }
                        }
                    },
                );
            prop_oneof![create, transfer]
        }

        proptest! {
            #[test]
            fn never_panics_on_arbitrary_bytes(
                bytes in prop::collection::vec(any::<u8>(), 0..512),
                cursor in any::<bool>(),
                max in prop_oneof![Just(0u32), Just(u32::MAX), 0u32..64],
            ) {
                let q = if cursor { Queue::Cursor } else { Queue::Control };
                let r = decode(q, &bytes, max);
                if let Err(e) = r {
                    let _ = (e.to_string(), e.error_code());
                    prop_assert_eq!(e.header().is_some(), bytes.len() >= CTRL_HDR_SIZE);
                }
            }

            #[test]
            fn never_panics_with_plausible_type(
                t in known_type(),
                n in prop_oneof![any::<u32>(), 0u32..8],
                body in prop::collection::vec(any::<u8>(), 0..256),
                cursor in any::<bool>(),
            ) {
                let mut b = hdr(t);
                // Lay a plausible nr_entries where ATTACH_BACKING reads it.
                b.extend_from_slice(&1u32.to_le_bytes());
                b.extend_from_slice(&n.to_le_bytes());
                b.extend_from_slice(&body);
                let q = if cursor { Queue::Cursor } else { Queue::Control };
                if let Ok(req) = decode(q, &b, 16) {
                    prop_assert_eq!(req.cmd.cmd_type(), t);
                    prop_assert_eq!(req.cmd.is_cursor(), cursor);
                }
            }

            #[test]
            fn valid_requests_roundtrip(
                cmd in prop_oneof![arb_valid_cmd(), arb_blob_ctx_cmd()],
                fence in any::<u64>(),
                ctx_id in 1u32..,
            ) {
                let q = if cmd.is_cursor() { Queue::Cursor } else { Queue::Control };
                let req = Request {
                    hdr: CtrlHeader {
                        type_: cmd.cmd_type(),
                        flags: VIRTIO_GPU_FLAG_FENCE,
                        fence_id: fence,
                        ctx_id,
                        ..CtrlHeader::default()
                    },
                    cmd,
                };
                prop_assert_eq!(decode(q, &req.encode(), 64), Ok(req));
            }

            #[test]
            fn virgl_requests_roundtrip(
                cmd in arb_virgl_cmd(),
                fence in any::<u64>(),
                ctx_id in any::<u32>(),
                cut in any::<usize>(),
            ) {
                let req = Request {
                    hdr: CtrlHeader {
                        type_: cmd.cmd_type(),
                        flags: VIRTIO_GPU_FLAG_FENCE,
                        fence_id: fence,
                        ctx_id,
                        ..CtrlHeader::default()
                    },
                    cmd,
                };
                let b = req.encode();
                prop_assert_eq!(virgl(Queue::Control, &b), Ok(req));
                // Without virgl the same bytes are unsupported, never misread.
                let e = decode(Queue::Control, &b, 64).unwrap_err();
                prop_assert!(e.is_unsupported());
                // Any truncation is refused as a short body.
                let short = &b[..cut % b.len()];
                let e = virgl(Queue::Control, short).unwrap_err();
                let short_ok = matches!(
                    e.kind,
                    DecodeErrorKind::ShortBody { .. } | DecodeErrorKind::ShortHeader { .. }
                );
                prop_assert!(short_ok, "{}", e);
            }

            #[test]
            fn never_panics_on_mutated_valid_requests(
                cmd in arb_blob_ctx_cmd(),
                ctx_id in prop_oneof![Just(0u32), 1u32..],
                flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
                cut in any::<usize>(),
                max_submit in prop_oneof![Just(0u32), Just(u32::MAX), 0u32..1024],
            ) {
                let mut b = Request {
                    hdr: CtrlHeader { ctx_id, ..CtrlHeader::default() },
                    cmd,
                }
                .encode();
                for (at, v) in flips {
                    let n = b.len();
                    b[at % n] ^= v;
                }
                let n = b.len();
                b.truncate(cut % (n + 1));
                let limits = DecodeLimits { max_backing_entries: 16, max_submit_bytes: max_submit };
                match super::super::decode(Queue::Control, &b, limits) {
                    Ok(req) => {
                        prop_assert_eq!(req.cmd.cmd_type(), req.hdr.type_);
                        if let Command::Submit3d { commands } = &req.cmd {
                            prop_assert!(commands.len() <= max_submit as usize);
                        }
                    }
                    Err(e) => {
                        let _ = (e.to_string(), e.error_code());
                    }
                }
            }
        }
    }
}
