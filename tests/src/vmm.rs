//! The test VMM: a real vhost-user frontend (vhost crate `Frontend`) over a unix socket,
//! with memfd guest RAM, driver-side split virtqueues and the vhost-user-gpu display peer.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

use crate::backend_req::BackendRequests;
use crate::display::{DisplayConfig, DisplayError, DisplayEvents, DisplayPeer};
use crate::gpu::{GpuDriver, GpuError};
use crate::guest_memory::{GuestMemory, MemoryError, DEFAULT_MEM_SIZE};
use crate::hostmem::{HostmemError, HostmemWindow};
use crate::virtqueue::{QueueError, SplitQueue};

/// VIRTIO_GPU_F_VIRGL.
pub const VIRTIO_GPU_F_VIRGL: u64 = 1 << 0;
/// VIRTIO_GPU_F_EDID.
pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
/// VIRTIO_GPU_F_RESOURCE_BLOB.
pub const VIRTIO_GPU_F_RESOURCE_BLOB: u64 = 1 << 3;
/// VIRTIO_GPU_F_CONTEXT_INIT.
pub const VIRTIO_GPU_F_CONTEXT_INIT: u64 = 1 << 4;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VHOST_USER_GPU_SET_SOCKET request code.
pub const VHOST_USER_GPU_SET_SOCKET: u32 = 33;
/// Header flags: version 1.
const VHOST_USER_VERSION: u32 = 0x1;
/// Header flags: reply.
const VHOST_USER_REPLY: u32 = 0x4;
/// Header flags: need reply.
const VHOST_USER_NEED_REPLY: u32 = 0x8;
/// The shared memory region id of virtio-gpu's host-visible memory
/// (VIRTIO_GPU_SHM_ID_HOST_VISIBLE): the index of the hostmem region in GET_SHMEM_CONFIG
/// and the shmid of every SHMEM_MAP / SHMEM_UNMAP.
pub const HOSTMEM_SHMID: u8 = 1;
/// Number of virtio-gpu queues (control, cursor).
pub const NUM_QUEUES: usize = 2;

/// Errors of the test VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Connecting the vhost-user socket failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {op} failed: {source}")]
    Vhost {
        /// The request.
        op: &'static str,
        /// What the vhost crate said.
        #[source]
        source: vhost::Error,
    },
    /// The backend does not offer a feature the test VMM needs.
    #[error("backend does not offer {what} (offered {offered:#x})")]
    MissingFeature {
        /// Which.
        what: &'static str,
        /// What it offered.
        offered: u64,
    },
    /// Sending VHOST_USER_GPU_SET_SOCKET failed.
    #[error("VHOST_USER_GPU_SET_SOCKET: {0}")]
    SetSocket(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Virtqueue.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Display peer.
    #[error(transparent)]
    Display(#[from] DisplayError),
    /// GPU driver.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// Socket set-up.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// GET_SHMEM_CONFIG did not report the hostmem region the test asked for.
    #[error("GET_SHMEM_CONFIG: {0}")]
    ShmemConfig(String),
    /// Reserving the hostmem window.
    #[error(transparent)]
    Hostmem(#[from] HostmemError),
}

fn vh<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, VmmError> {
    r.map_err(|source| VmmError::Vhost { op, source })
}

/// struct virtio_gpu_config as GET_CONFIG returned it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuConfig {
    /// events_read.
    pub events_read: u32,
    /// events_clear.
    pub events_clear: u32,
    /// num_scanouts.
    pub num_scanouts: u32,
    /// num_capsets.
    pub num_capsets: u32,
}

/// Knobs of the test VMM.
#[derive(Clone, Debug)]
pub struct VmmOptions {
    /// Guest RAM size.
    pub mem_size: u64,
    /// Guest physical address of guest RAM.
    pub mem_base: u64,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX (if offered).
    pub event_idx: bool,
    /// Bound on every wait (vhost-user replies, command responses).
    pub timeout: Duration,
    /// What the display peer answers.
    pub display: DisplayConfig,
    /// Hostmem (shared memory region [`HOSTMEM_SHMID`]) size the backend must report. When
    /// set, the VMM negotiates BACKEND_REQ + SHMEM (+ REPLY_ACK, already wanted), checks
    /// GET_SHMEM_CONFIG's region [`HOSTMEM_SHMID`] is exactly this size, acknowledges
    /// VIRTIO_GPU_F_RESOURCE_BLOB and F_CONTEXT_INIT (when offered), reserves the window and serves
    /// SHMEM_MAP / SHMEM_UNMAP on a backend request channel (SET_BACKEND_REQ_FD).
    pub hostmem: Option<u64>,
    /// Negotiate VHOST_USER_PROTOCOL_F_RESET_DEVICE (if offered), as QEMU does, so
    /// `frontend().reset_device()` can be sent.
    pub reset_device: bool,
}

impl Default for VmmOptions {
    fn default() -> Self {
        VmmOptions {
            mem_size: DEFAULT_MEM_SIZE,
            mem_base: 0,
            queue_size: 256,
            event_idx: true,
            timeout: Duration::from_secs(10),
            display: DisplayConfig::default(),
            hostmem: None,
            reset_device: false,
        }
    }
}

/// A connected, fully set-up test VMM with one virtio-gpu device.
pub struct TestVmm {
    // Field order is drop order: the driver and rings go before the connection closes.
    gpu: GpuDriver,
    frontend: Frontend,
    raw: UnixStream,
    display: DisplayPeer,
    mem: Arc<GuestMemory>,
    config: GpuConfig,
    device_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    backend_requests: Option<Arc<BackendRequests>>,
    hostmem: Option<Arc<HostmemWindow>>,
}

impl TestVmm {
    /// Connects with default options.
    pub fn connect(socket_path: &Path) -> Result<TestVmm, VmmError> {
        Self::connect_with(socket_path, &VmmOptions::default())
    }

    /// Connects and performs the vhost-user set-up in QEMU's order.
    pub fn connect_with(socket_path: &Path, opts: &VmmOptions) -> Result<TestVmm, VmmError> {
        let stream = UnixStream::connect(socket_path).map_err(|source| VmmError::Connect {
            path: socket_path.display().to_string(),
            source,
        })?;
        Self::from_stream(stream, opts)
    }

    /// Performs the vhost-user set-up on an already connected socket (e.g. one end of a
    /// socketpair whose other end a backend inherited).
    pub fn from_stream(stream: UnixStream, opts: &VmmOptions) -> Result<TestVmm, VmmError> {
        // The vhost crate's frontend blocks on replies without a bound; a socket timeout
        // turns a hung backend into an error instead of a hung test.
        stream.set_read_timeout(Some(opts.timeout))?;
        stream.set_write_timeout(Some(opts.timeout))?;
        let raw = stream.try_clone()?;
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);

        vh("SET_OWNER", frontend.set_owner())?;
        let device_features = vh("GET_FEATURES", frontend.get_features())?;
        for (bit, what) in [
            (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (
                VHOST_USER_F_PROTOCOL_FEATURES,
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ),
        ] {
            if device_features & bit == 0 {
                return Err(VmmError::MissingFeature {
                    what,
                    offered: device_features,
                });
            }
        }
        let offered_proto = vh("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
        if !offered_proto.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VmmError::MissingFeature {
                what: "protocol feature CONFIG",
                offered: offered_proto.bits(),
            });
        }
        let mut wanted_proto =
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
        if opts.hostmem.is_some() {
            for (bit, what) in [
                (
                    VhostUserProtocolFeatures::BACKEND_REQ,
                    "protocol feature BACKEND_REQ",
                ),
                (VhostUserProtocolFeatures::SHMEM, "protocol feature SHMEM"),
            ] {
                if !offered_proto.contains(bit) {
                    return Err(VmmError::MissingFeature {
                        what,
                        offered: offered_proto.bits(),
                    });
                }
            }
            wanted_proto |=
                VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHMEM;
        }
        if opts.reset_device {
            wanted_proto |= VhostUserProtocolFeatures::RESET_DEVICE;
        }
        let protocol_features = offered_proto & wanted_proto;
        vh(
            "SET_PROTOCOL_FEATURES",
            frontend.set_protocol_features(protocol_features),
        )?;
        let reply_ack = protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK);
        if reply_ack {
            // Every request is then acknowledged, so a rejected request fails right here
            // instead of surfacing later as a missing response.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }

        let (hostmem, backend_requests) = match opts.hostmem {
            Some(size) => {
                let (w, b) = setup_hostmem(&mut frontend, size, reply_ack)?;
                (Some(w), Some(b))
            }
            None => (None, None),
        };

        let (_, cfg) = vh(
            "GET_CONFIG",
            frontend.get_config(0, 16, VhostUserConfigFlags::empty(), &[0u8; 16]),
        )?;
        let word = |i: usize| u32::from_le_bytes([cfg[i], cfg[i + 1], cfg[i + 2], cfg[i + 3]]);
        let config = GpuConfig {
            events_read: word(0),
            events_clear: word(4),
            num_scanouts: word(8),
            num_capsets: word(12),
        };

        // The display socket comes before the device is started, as in QEMU.
        let (ours, theirs) = UnixStream::pair()?;
        let display = DisplayPeer::start(ours, opts.display.clone())?;
        send_gpu_set_socket(&raw, theirs.as_raw_fd(), reply_ack, opts.timeout)?;
        drop(theirs);

        // VIRGL is acked whenever offered, as a guest with a 3D driver (Mesa) does.
        let mut wanted = VIRTIO_F_VERSION_1
            | VHOST_USER_F_PROTOCOL_FEATURES
            | VIRTIO_GPU_F_EDID
            | VIRTIO_GPU_F_VIRGL;
        if opts.event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.hostmem.is_some() {
            // A guest driver that sees the host-visible region uses blobs and contexts.
            wanted |= VIRTIO_GPU_F_RESOURCE_BLOB | VIRTIO_GPU_F_CONTEXT_INIT;
        }
        let acked_features = device_features & wanted;
        vh("SET_FEATURES", frontend.set_features(acked_features))?;
        let event_idx = acked_features & VIRTIO_RING_F_EVENT_IDX != 0;

        let mem = Arc::new(GuestMemory::new(opts.mem_base, opts.mem_size)?);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.base(),
            memory_size: mem.size(),
            userspace_addr: mem.host_base(),
            mmap_offset: mem.region_offset(),
            mmap_handle: mem.fd(),
        };
        vh("SET_MEM_TABLE", frontend.set_mem_table(&[region]))?;

        let mut queues = Vec::with_capacity(NUM_QUEUES);
        for index in 0..NUM_QUEUES {
            let q = SplitQueue::new(mem.clone(), index as u16, opts.queue_size, event_idx)?;
            let a = q.addrs();
            let cfg = VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: mem.host_address(a.desc)?,
                used_ring_addr: mem.host_address(a.used)?,
                avail_ring_addr: mem.host_address(a.avail)?,
                log_addr: None,
            };
            vh(
                "SET_VRING_NUM",
                frontend.set_vring_num(index, opts.queue_size),
            )?;
            vh("SET_VRING_ADDR", frontend.set_vring_addr(index, &cfg))?;
            vh("SET_VRING_BASE", frontend.set_vring_base(index, 0))?;
            vh(
                "SET_VRING_CALL",
                frontend.set_vring_call(index, q.call_fd()),
            )?;
            vh(
                "SET_VRING_KICK",
                frontend.set_vring_kick(index, q.kick_fd()),
            )?;
            vh("SET_VRING_ENABLE", frontend.set_vring_enable(index, true))?;
            queues.push(q);
        }
        let cursor = queues
            .pop()
            .ok_or(VmmError::SetSocket("no queues".into()))?;
        let control = queues
            .pop()
            .ok_or(VmmError::SetSocket("no queues".into()))?;
        let gpu = GpuDriver::new(mem.clone(), control, cursor, opts.timeout)?;

        Ok(TestVmm {
            gpu,
            frontend,
            raw,
            display,
            mem,
            config,
            device_features,
            acked_features,
            protocol_features,
            backend_requests,
            hostmem,
        })
    }

    /// The virtio-gpu driver.
    pub fn gpu(&mut self) -> &mut GpuDriver {
        &mut self.gpu
    }

    /// What arrived on the display socket.
    pub fn display(&self) -> &Arc<DisplayEvents> {
        self.display.events()
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// virtio_gpu_config from GET_CONFIG.
    pub fn config(&self) -> GpuConfig {
        self.config
    }

    /// Features GET_FEATURES offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Features acknowledged with SET_FEATURES.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Protocol features acknowledged.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The hostmem window (when [`VmmOptions::hostmem`] was set): the guest's view of the
    /// blobs the backend mapped.
    pub fn hostmem(&self) -> Option<&Arc<HostmemWindow>> {
        self.hostmem.as_ref()
    }

    /// The backend request channel serving SHMEM_MAP / SHMEM_UNMAP (when
    /// [`VmmOptions::hostmem`] was set): its ack controls and event log.
    pub fn backend_requests(&self) -> Option<&Arc<BackendRequests>> {
        self.backend_requests.as_ref()
    }

    /// The vhost-user frontend, for requests the helpers do not cover.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Closes the vhost-user connection (the VMM going away) and returns the display
    /// handle, which stays valid to observe the backend closing its end.
    pub fn disconnect(self) -> Arc<DisplayEvents> {
        let events = self.display.events().clone();
        let _ = self.raw.shutdown(std::net::Shutdown::Both);
        drop(self);
        events
    }
}

/// GET_SHMEM_CONFIG (region [`HOSTMEM_SHMID`] must be exactly `size` bytes; the others,
/// none or empty), reserves the window, starts
/// the backend request channel and hands its other end over with SET_BACKEND_REQ_FD.
fn setup_hostmem(
    frontend: &mut Frontend,
    size: u64,
    reply_ack: bool,
) -> Result<(Arc<HostmemWindow>, Arc<BackendRequests>), VmmError> {
    let cfg = vh("GET_SHMEM_CONFIG", frontend.get_shmem_config())?;
    let nregions = cfg.nregions as usize;
    let sizes = cfg.memory_sizes;
    let id = usize::from(HOSTMEM_SHMID);
    if nregions <= id || nregions > sizes.len() {
        return Err(VmmError::ShmemConfig(format!(
            "{nregions} regions reported (want region {id} of {size:#x} bytes)"
        )));
    }
    if sizes[id] != size {
        return Err(VmmError::ShmemConfig(format!(
            "region {id} is {:#x} bytes, the VMM was configured for {size:#x}",
            sizes[id]
        )));
    }
    if let Some((other, len)) = sizes[..nregions]
        .iter()
        .enumerate()
        .find(|(i, len)| *i != id && **len != 0)
    {
        return Err(VmmError::ShmemConfig(format!(
            "unexpected region {other} of {len:#x} bytes (a GPU has only region {id})"
        )));
    }
    let window = Arc::new(HostmemWindow::reserve(size)?);
    let (requests, theirs) = BackendRequests::start(window.clone(), HOSTMEM_SHMID, reply_ack)?;
    vh(
        "SET_BACKEND_REQ_FD",
        frontend.set_backend_request_fd(&theirs),
    )?;
    drop(theirs);
    Ok((window, Arc::new(requests)))
}

/// Sends VHOST_USER_GPU_SET_SOCKET (the vhost crate's Frontend has no method for it) on the
/// same connection, and reads the ack when REPLY_ACK is on. Nothing else is in flight: the
/// caller owns the Frontend and issues requests one at a time.
fn send_gpu_set_socket(
    sock: &UnixStream,
    fd: RawFd,
    reply_ack: bool,
    timeout: Duration,
) -> Result<(), VmmError> {
    let flags = VHOST_USER_VERSION | if reply_ack { VHOST_USER_NEED_REPLY } else { 0 };
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&VHOST_USER_GPU_SET_SOCKET.to_le_bytes());
    hdr[4..8].copy_from_slice(&flags.to_le_bytes());
    hdr[8..12].copy_from_slice(&0u32.to_le_bytes());
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&hdr)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| VmmError::SetSocket(format!("sendmsg: {e}")))?;
    if n != hdr.len() {
        return Err(VmmError::SetSocket(format!("short send: {n} of 12 bytes")));
    }
    if !reply_ack {
        return Ok(());
    }
    let mut reply = [0u8; 20];
    (&*sock)
        .read_exact(&mut reply)
        .map_err(|e| VmmError::SetSocket(format!("no ack within {timeout:?}: {e}")))?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    let (req, rflags, size) = (word(0), word(4), word(8));
    let value = u64::from(word(12)) | (u64::from(word(16)) << 32);
    if req != VHOST_USER_GPU_SET_SOCKET || rflags & VHOST_USER_REPLY == 0 || size != 8 {
        return Err(VmmError::SetSocket(format!(
            "unexpected reply header: request {req}, flags {rflags:#x}, size {size}"
        )));
    }
    if value != 0 {
        return Err(VmmError::SetSocket(format!(
            "backend nacked it (status {value})"
        )));
    }
    Ok(())
}
