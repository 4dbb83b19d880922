//! Guest RAM for the test VMM: one memfd, mapped shared in this process and handed to the
//! backend with SET_MEM_TABLE, plus a bump allocator for rings, command buffers and backings.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use nix::sys::memfd::{memfd_create, MFdFlags};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// The page size the allocator aligns to (and the guest would use).
pub const PAGE_SIZE: u64 = 4096;

/// Default guest RAM size.
pub const DEFAULT_MEM_SIZE: u64 = 64 << 20;

/// Errors from guest memory set-up and access.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// vm-memory could not map the memfd.
    #[error("cannot map guest RAM: {0}")]
    Map(String),
    /// The bump allocator ran out of guest RAM.
    #[error("guest RAM exhausted: {requested} bytes requested, {left} left (of {size})")]
    Exhausted {
        /// Bytes asked for.
        requested: u64,
        /// Bytes still free.
        left: u64,
        /// Guest RAM size.
        size: u64,
    },
    /// A guest access outside guest RAM.
    #[error("guest access at {addr:#x} (+{len}) is outside guest RAM: {msg}")]
    Access {
        /// Guest address.
        addr: u64,
        /// Length of the access.
        len: usize,
        /// What vm-memory said.
        msg: String,
    },
}

/// Guest RAM: a memfd mapped at guest physical address `base`.
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    fd: RawFd,
    base: u64,
    size: u64,
    // Next free guest address of the bump allocator; a Mutex because drivers share the RAM.
    next: Mutex<u64>,
}

impl GuestMemory {
    /// Creates `size` bytes of guest RAM (rounded up to a page) at guest address `base`.
    pub fn new(base: u64, size: u64) -> Result<GuestMemory, MemoryError> {
        let size = size.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let fd = memfd_create(c"vgpu-test-guest-ram", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| MemoryError::Memfd(e.into()))?;
        let file = File::from(fd);
        file.set_len(size).map_err(MemoryError::Memfd)?;
        let raw = file.as_raw_fd();
        let len = usize::try_from(size).map_err(|e| MemoryError::Map(e.to_string()))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            len,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestMemory {
            mem,
            // The File lives inside the region's FileOffset for as long as `mem` does.
            fd: raw,
            base,
            size,
            // Keep the first page unused so guest address `base` is never a valid allocation:
            // a device that treats 0 as "no buffer" cannot be fooled by our own layout.
            next: Mutex::new(base + PAGE_SIZE),
        })
    }

    /// The memfd backing guest RAM (valid as long as `self`).
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Guest physical address of the first byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of the start of the mapping (what SET_MEM_TABLE calls user_addr).
    pub fn host_base(&self) -> u64 {
        self.host_address(self.base).unwrap_or(0)
    }

    /// Host virtual address of guest address `addr` (vhost-user ring addresses are these).
    pub fn host_address(&self, addr: u64) -> Result<u64, MemoryError> {
        self.mem
            .get_host_address(GuestAddress(addr))
            .map(|p| p as u64)
            .map_err(|e| MemoryError::Access {
                addr,
                len: 0,
                msg: e.to_string(),
            })
    }

    /// The vm-memory view, for callers that want its API.
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// mmap offset of the region in the memfd (always 0 here).
    pub fn region_offset(&self) -> u64 {
        self.mem
            .iter()
            .next()
            .and_then(|r| r.file_offset().map(|f| f.start()))
            .unwrap_or(0)
    }

    /// Allocates `len` bytes, page aligned, zero-filled. Never freed: tests are short-lived.
    pub fn alloc(&self, len: u64) -> Result<u64, MemoryError> {
        self.alloc_aligned(len, PAGE_SIZE)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two), zero-filled.
    pub fn alloc_aligned(&self, len: u64, align: u64) -> Result<u64, MemoryError> {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let align = align.max(1);
        let start = next.div_ceil(align) * align;
        let end = self.base + self.size;
        let len_rounded = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        match start.checked_add(len_rounded) {
            Some(stop) if stop <= end => {
                *next = stop;
                drop(next);
                self.fill(start, 0, len_rounded as usize)?;
                Ok(start)
            }
            _ => Err(MemoryError::Exhausted {
                requested: len,
                left: end.saturating_sub(start),
                size: self.size,
            }),
        }
    }

    /// Writes `data` at guest address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| MemoryError::Access {
                addr,
                len: data.len(),
                msg: e.to_string(),
            })
    }

    /// Reads `buf.len()` bytes at guest address `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| MemoryError::Access {
                addr,
                len: buf.len(),
                msg: e.to_string(),
            })
    }

    /// Reads `len` bytes at `addr` into a new vector.
    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: u64, byte: u8, len: usize) -> Result<(), MemoryError> {
        // Chunked so a large fill does not need a buffer of its size.
        const CHUNK: usize = 1 << 16;
        let chunk = vec![byte; CHUNK.min(len)];
        let mut done = 0usize;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write(addr + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Atomic little-endian u16 load (ring indices the device updates concurrently).
    pub fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemoryError> {
        self.mem
            .load::<u16>(GuestAddress(addr), order)
            .map(u16::from_le)
            .map_err(|e| MemoryError::Access {
                addr,
                len: 2,
                msg: e.to_string(),
            })
    }

    /// Atomic little-endian u16 store.
    pub fn store_u16(&self, addr: u64, val: u16, order: Ordering) -> Result<(), MemoryError> {
        self.mem
            .store::<u16>(val.to_le(), GuestAddress(addr), order)
            .map_err(|e| MemoryError::Access {
                addr,
                len: 2,
                msg: e.to_string(),
            })
    }

    /// Little-endian u32 read.
    pub fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
