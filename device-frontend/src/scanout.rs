//! Scanouts and their pixel buffers.
//!
//! Pixels go renderer -> frontend through one shared memfd per scanout, never inside IPC
//! messages. The frontend creates the memfd, sizes it and seals it against shrinking and
//! growing before the renderer sees it: a renderer (less trusted) that could truncate the
//! file would make the frontend's reads fault with SIGBUS. The frontend maps it read-write:
//! for a 2D resource it applies the guest's transfers to the buffer itself (`mirror`), so
//! that a flush needs no renderer round trip.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::unistd::ftruncate;
use protocol::ipc::BlobScanout;
use protocol::virtio_gpu::{Format, Rect};
use vm_memory::VolatileSlice;

use crate::mirror::BufferSync;

/// A sealed memfd holding one resource's pixels at resource coordinates.
#[derive(Debug)]
pub struct ScanoutBuffer {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    stride: u32,
}

// SAFETY: the mapping is owned by this value; it is read as bytes and written only through
// volatile slices. The renderer writes it concurrently from another process, which can
// only change pixel values: bytes are copied, never interpreted as anything but pixels.
unsafe impl Send for ScanoutBuffer {}

impl ScanoutBuffer {
    /// Creates a sealed buffer of `stride * height` bytes.
    pub fn new(stride: u32, height: u32) -> nix::Result<Self> {
        let len = u64::from(stride) * u64::from(height);
        let len_usize = usize::try_from(len).map_err(|_| nix::Error::EOVERFLOW)?;
        let nz = NonZeroUsize::new(len_usize).ok_or(nix::Error::EINVAL)?;
        let fd = memfd_create(
            c"vgpu-scanout",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )?;
        ftruncate(&fd, i64::try_from(len).map_err(|_| nix::Error::EOVERFLOW)?)?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )?;
        // SAFETY: a fresh shared mapping of a file we own, sized to the file; the seals
        // guarantee the file keeps that size for the mapping's lifetime.
        let ptr = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(ScanoutBuffer {
            fd,
            ptr: ptr.cast(),
            len: len_usize,
            stride,
        })
    }

    /// The memfd, to hand to the renderer on the descriptor lane.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes per row.
    pub fn stride(&self) -> u32 {
        self.stride
    }

    /// The pixels of `rect` (resource coordinates) as BGRX rows. Borrowed straight from
    /// the shared buffer when the format needs no conversion and the rows are contiguous
    /// (full-width damage, the common full-frame case), so the pixels go from the memfd to
    /// the display socket without a copy here; otherwise converted into `scratch` (reused
    /// from one update to the next) in one pass. None when `rect` does not fit the buffer.
    pub fn read_bgrx<'a>(
        &'a self,
        format: Format,
        rect: &Rect,
        scratch: &'a mut Vec<u8>,
    ) -> Option<&'a [u8]> {
        let span = self.span(rect)?;
        let all = self.bytes();
        if format.is_bgrx_layout() && span.row_bytes == span.stride {
            return Some(&all[span.first..span.end]);
        }
        scratch.clear();
        scratch.resize(span.row_bytes * rect.height as usize, 0);
        for (row, dst) in span
            .rows(rect.height)
            .zip(scratch.chunks_exact_mut(span.row_bytes.max(1)))
        {
            format.convert_row_to_bgrx(&all[row], dst);
        }
        Some(&scratch[..])
    }

    /// A copy of the bytes of `rect` (resource coordinates), row after row, as they are
    /// (no format conversion); None when `rect` does not fit the buffer.
    pub fn copy_rect(&self, rect: &Rect) -> Option<Vec<u8>> {
        let span = self.span(rect)?;
        let all = self.bytes();
        let mut out = Vec::with_capacity(span.row_bytes * rect.height as usize);
        for row in span.rows(rect.height) {
            out.extend_from_slice(&all[row]);
        }
        Some(out)
    }

    /// Where `rect`'s rows lie in the buffer; None when it does not fit.
    fn span(&self, rect: &Rect) -> Option<Span> {
        let row_bytes = usize::try_from(rect.width).ok()?.checked_mul(4)?;
        let stride = self.stride as usize;
        let x_bytes = (rect.x as usize).checked_mul(4)?;
        if x_bytes.checked_add(row_bytes)? > stride {
            return None;
        }
        let first = (rect.y as usize).checked_mul(stride)?;
        let end = (rect.y as usize)
            .checked_add(rect.height as usize)?
            .checked_mul(stride)?;
        if end > self.len {
            return None;
        }
        Some(Span {
            row_bytes,
            stride,
            x_bytes,
            first,
            end,
        })
    }

    /// `len` bytes at `offset`, to write into (None when outside the buffer).
    pub fn slice(&self, offset: u64, len: u64) -> Option<VolatileSlice<'_>> {
        let offset = usize::try_from(offset).ok()?;
        let len = usize::try_from(len).ok()?;
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: `offset + len` lies inside the mapping (checked above), which is
        // writable, alive as long as `self` (the slice borrows it) and sealed against
        // shrinking; a volatile slice makes no assumption about concurrent writers.
        Some(unsafe { VolatileSlice::new(self.ptr.as_ptr().add(offset), len) })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, alive as long as `self`, and sealed
        // against shrinking, so every byte stays mapped. The renderer may write it from its
        // process; it has finished with a rectangle before it replies (the frontend reads
        // only after the reply), and a renderer that keeps writing can only change pixel
        // values, which are never interpreted here, only copied.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ScanoutBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping created in `new`, unmapped only here.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::warn!("munmap of a scanout buffer failed: {e}");
        }
    }
}

/// A rectangle's rows in a buffer, checked to fit it.
struct Span {
    row_bytes: usize,
    stride: usize,
    x_bytes: usize,
    /// Start of the first row (at x = 0).
    first: usize,
    /// End of the last row (at x = 0 of the next).
    end: usize,
}

impl Span {
    /// The byte range of each of the `height` rows.
    fn rows(&self, height: u32) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..height as usize).map(move |i| {
            let start = self.first + i * self.stride + self.x_bytes;
            start..start + self.row_bytes
        })
    }
}

/// A set of scanout ids (there are at most 16), without allocating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanoutIds(u16);

impl ScanoutIds {
    /// Adds `id` (ids from 16 on are not representable and ignored).
    pub fn insert(&mut self, id: u32) {
        if id < 16 {
            self.0 |= 1 << id;
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The ids, lowest first.
    pub fn iter(self) -> ScanoutIdsIter {
        ScanoutIdsIter(self.0)
    }
}

impl IntoIterator for ScanoutIds {
    type Item = u32;
    type IntoIter = ScanoutIdsIter;

    fn into_iter(self) -> ScanoutIdsIter {
        ScanoutIdsIter(self.0)
    }
}

/// The ids of a [`ScanoutIds`], lowest first.
pub struct ScanoutIdsIter(u16);

impl Iterator for ScanoutIdsIter {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.0 == 0 {
            return None;
        }
        let id = self.0.trailing_zeros();
        // Clears the lowest set bit.
        self.0 &= self.0 - 1;
        Some(id)
    }
}

/// What one scanout shows.
#[derive(Debug)]
pub struct Scanout {
    /// The resource shown, 0 when disabled.
    pub resource_id: u32,
    /// The shown resource's format, for converting its pixels.
    pub format: Format,
    /// The part of the resource shown.
    pub rect: Rect,
    /// The pixel buffer shared with the renderer (present while enabled).
    pub buffer: Option<ScanoutBuffer>,
    /// For a blob scanout (SET_SCANOUT_BLOB), where its framebuffer lies in the blob;
    /// `rect` and the buffer are then in framebuffer coordinates.
    pub blob: Option<BlobScanout>,
    /// Whether the buffer holds what the resource holds (see `mirror`).
    pub sync: BufferSync,
}

impl Default for Scanout {
    fn default() -> Self {
        Scanout {
            resource_id: 0,
            format: Format::B8G8R8X8Unorm,
            rect: Rect::default(),
            buffer: None,
            blob: None,
            sync: BufferSync::default(),
        }
    }
}

impl Scanout {
    /// Whether the scanout shows a resource.
    pub fn is_enabled(&self) -> bool {
        self.resource_id != 0
    }

    /// Disables the scanout and drops its buffer; only the count of renderer writes still
    /// on their way is kept (their answers will come).
    pub fn clear(&mut self) {
        *self = Scanout {
            sync: self.sync.rebound(),
            ..Scanout::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_sealed_and_reads_convert() {
        let buf = ScanoutBuffer::new(16, 4).unwrap();
        assert_eq!(buf.len(), 64);
        let seals = fcntl(buf.fd(), FcntlArg::F_GET_SEALS).unwrap();
        let want = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        assert_eq!(seals & want.bits(), want.bits());
        assert!(ftruncate(buf.fd(), 8).is_err(), "shrinking must be refused");
        // Write through a second mapping, as the renderer would.
        let mut writer = ScanoutWriter::map(buf.fd(), 64);
        for (i, b) in writer.bytes().iter_mut().enumerate() {
            *b = i as u8;
        }
        let rect = Rect {
            x: 1,
            y: 2,
            width: 2,
            height: 1,
        };
        let mut scratch = Vec::new();
        let got = buf
            .read_bgrx(Format::B8G8R8X8Unorm, &rect, &mut scratch)
            .unwrap()
            .to_vec();
        assert_eq!(got, (36u8..44).collect::<Vec<_>>());
        let rows = Rect {
            x: 0,
            y: 1,
            width: 4,
            height: 2,
        };
        let mut scratch = Vec::new();
        let whole_rows = buf
            .read_bgrx(Format::B8G8R8X8Unorm, &rows, &mut scratch)
            .unwrap();
        assert_eq!(whole_rows, &(16u8..48).collect::<Vec<_>>()[..]);
        assert!(scratch.is_empty(), "full rows need no copy");
        let swapped = buf
            .read_bgrx(Format::R8G8B8X8Unorm, &rows, &mut scratch)
            .unwrap();
        assert_eq!(&swapped[..4], &[18, 17, 16, 19]);
        let outside = Rect {
            x: 3,
            y: 0,
            width: 2,
            height: 1,
        };
        assert!(buf
            .read_bgrx(Format::B8G8R8X8Unorm, &outside, &mut scratch)
            .is_none());
        let below = Rect {
            x: 0,
            y: 4,
            width: 1,
            height: 1,
        };
        assert!(buf
            .read_bgrx(Format::B8G8R8X8Unorm, &below, &mut scratch)
            .is_none());
    }

    struct ScanoutWriter {
        ptr: NonNull<u8>,
        len: usize,
    }

    impl ScanoutWriter {
        fn map(fd: BorrowedFd<'_>, len: usize) -> Self {
            // SAFETY: shared RW mapping of a sealed memfd of at least `len` bytes.
            let ptr = unsafe {
                mmap(
                    None,
                    NonZeroUsize::new(len).unwrap(),
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_SHARED,
                    fd,
                    0,
                )
                .unwrap()
            };
            ScanoutWriter {
                ptr: ptr.cast(),
                len,
            }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is live for self and only this test touches it.
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
        }
    }

    impl Drop for ScanoutWriter {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `map`.
            unsafe { munmap(self.ptr.cast(), self.len).unwrap() };
        }
    }
}
