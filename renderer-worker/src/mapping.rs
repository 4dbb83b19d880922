//! A shared, read-write memory mapping of a file descriptor that unmaps itself on drop.
//!
//! Guest memory regions and scanout buffers are both files another process hands us; this
//! type is the one place where such a file becomes addressable memory.

use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::ptr::NonNull;

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use protocol::ipc::RenderError;

/// `length` bytes of a file, starting at `offset`, mapped `MAP_SHARED` and read-write.
#[derive(Debug)]
pub struct SharedMapping {
    /// Start of the whole mapping (page-aligned, as mmap returned it).
    base: NonNull<u8>,
    /// Length of the whole mapping, including the alignment slack before the data.
    map_len: usize,
    /// Bytes between `base` and the first byte the caller asked for.
    slack: usize,
    /// What the caller asked for.
    len: usize,
}

// SAFETY: the mapping is plain shared memory with no thread affinity. Through `&self` it
// only hands out a raw pointer and its length (dereferencing those is the user's own
// unsafe contract); bytes are borrowed as a slice only through `&mut self`. Moving it to
// another thread, or sharing a reference, therefore cannot create a data race that safe
// code could observe.
unsafe impl Send for SharedMapping {}
// SAFETY: see the `Send` impl above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` starting at byte `offset` (which need not be page-aligned).
    ///
    /// The caller has already checked that the file is at least `offset + len` bytes long;
    /// a file that shrinks later would make accesses fault, which is why scanout buffers
    /// must be sealed against shrinking.
    pub fn new(fd: impl AsFd, offset: u64, len: usize) -> Result<Self, RenderError> {
        Self::with_alignment(fd, offset, len, page_size())
    }

    /// Like [`SharedMapping::new`], but the mapped file range starts and ends on a multiple
    /// of `align` (a power of two, at least the page size; hugetlbfs files refuse anything
    /// not aligned to their huge page size).
    pub fn with_alignment(
        fd: impl AsFd,
        offset: u64,
        len: usize,
        align: usize,
    ) -> Result<Self, RenderError> {
        if len == 0 {
            return Err(RenderError::InvalidParameter("empty mapping".into()));
        }
        let align = if align.is_power_of_two() {
            align.max(page_size())
        } else {
            page_size()
        };
        let slack = (offset % align as u64) as usize;
        let aligned_offset = offset - slack as u64;
        let aligned_offset = libc::off_t::try_from(aligned_offset)
            .map_err(|_| RenderError::InvalidParameter(format!("offset {offset} too large")))?;
        let map_len = len
            .checked_add(slack)
            .and_then(|l| l.checked_next_multiple_of(align))
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| RenderError::InvalidParameter("mapping length overflows".into()))?;
        // SAFETY: we ask the kernel for a fresh mapping at an address of its choosing, so no
        // existing Rust object is aliased; the mapping is owned by the returned value and
        // unmapped exactly once in `Drop`.
        let base = unsafe {
            mmap(
                None,
                map_len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                aligned_offset,
            )
        }
        .map_err(|e| RenderError::OutOfMemory(format!("mmap of {len} bytes failed: {e}")))?;
        Ok(SharedMapping {
            base: base.cast(),
            map_len: map_len.get(),
            slack,
            len,
        })
    }

    /// Pointer to the first requested byte.
    pub fn as_ptr(&self) -> *mut u8 {
        // The slack is inside the mapping, so the result stays inside it.
        self.base.as_ptr().wrapping_add(self.slack)
    }

    /// Number of requested bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The mapped bytes, for writing.
    ///
    /// Another process may read (scanout) or write (guest memory) the same pages at the
    /// same time; that is inherent to shared memory and harmless for plain pixel bytes.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `as_ptr()..as_ptr()+len` lies inside a live read-write mapping that this
        // value owns; `&mut self` guarantees no other slice of it exists in this process.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` describe the mapping created in `new`, which nothing else
        // unmaps; every pointer derived from it is tied to this value's lifetime (backings
        // keep the owning `Arc` alive), so nothing uses the pages after this.
        if let Err(e) = unsafe { munmap(self.base.cast(), self.map_len) } {
            log::error!("munmap of {} bytes failed: {e}", self.map_len);
        }
    }
}

/// The page size, which mmap offsets must be a multiple of.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a constant of the C library; it has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}
