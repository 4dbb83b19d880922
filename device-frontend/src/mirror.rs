//! The scanout buffer kept in step with a 2D resource by the frontend itself, so that a
//! RESOURCE_FLUSH needs no renderer round trip.
//!
//! A 2D resource (without virgl) changes only through TRANSFER_TO_HOST_2D, a plain copy
//! of guest rows into the resource. While a scanout's buffer is known to hold what the
//! renderer's resource holds, the frontend applies each transfer to the buffer as well,
//! from the same guest memory (the renderer still applies it to the resource, in
//! parallel), and a flush of that resource is an UPDATE straight from the buffer: the
//! guest sees no more wake-ups than in a one-process backend. The renderer stays the owner
//! of the resource: whenever the buffer may differ from it (a new scanout, a transfer the
//! frontend could not apply, a renderer write still on its way, a renderer restart) the
//! next flush goes through the renderer, which copies the whole scanout rectangle and so
//! brings the buffer back in step.
//!
//! The copy reads only the guest ranges attached as the resource's backing, each row
//! bounds-checked against the backing as the renderer checks it; the pixels are never
//! interpreted.

use protocol::ipc::BackingEntry;
use protocol::virtio_gpu::Rect;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use crate::control::GuestMem;
use crate::scanout::ScanoutBuffer;

/// Whether a scanout's buffer can be trusted to equal its resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferSync {
    /// Every transfer the frontend has executed is in the buffer (meaningful only while
    /// no renderer write is in flight).
    synced: bool,
    /// Renderer requests that write the buffer (fills and flushes) not yet answered.
    writes_in_flight: u32,
    /// A renderer write of the whole scanout rectangle is in flight, requested after the
    /// last transfer the buffer missed: once every write is answered, the buffer is in
    /// step.
    resync_pending: bool,
}

impl BufferSync {
    /// Whether a transfer may be applied to the buffer, and a flush sent from it, now.
    pub fn in_step(&self) -> bool {
        self.synced && self.writes_in_flight == 0
    }

    /// Whether the buffer will be in step once the renderer writes on their way are done
    /// (a flush then needs the renderer to copy its damage only).
    pub fn catching_up(&self) -> bool {
        self.synced || self.resync_pending
    }

    /// What a scanout that is disabled or reset keeps: the renderer writes still on their
    /// way (their answers are still counted), nothing else.
    pub fn rebound(self) -> Self {
        BufferSync {
            writes_in_flight: self.writes_in_flight,
            ..BufferSync::default()
        }
    }

    /// The buffer missed a change of the resource (or may have).
    pub fn lose(&mut self) {
        self.synced = false;
        self.resync_pending = false;
    }

    /// A renderer request that writes the buffer was sent; `whole` when it covers the
    /// whole scanout rectangle (that brings the buffer back in step).
    pub fn write_requested(&mut self, whole: bool) {
        self.writes_in_flight = self.writes_in_flight.saturating_add(1);
        if whole {
            self.resync_pending = true;
        }
    }

    /// The renderer answered a write (`ok`: it did it).
    pub fn write_answered(&mut self, ok: bool) {
        self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
        if !ok {
            self.lose();
        } else if self.writes_in_flight == 0 && self.resync_pending {
            self.synced = true;
            self.resync_pending = false;
        }
    }
}

/// Why a transfer could not be applied to the buffer (the buffer is then out of step).
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The frontend does not keep the resource's backing entries.
    #[error("the backing entries are not kept")]
    NoEntries,
    /// The transfer does not fit the resource, the backing or the buffer as the renderer
    /// reads it (the renderer refuses it, or would read what the frontend cannot).
    #[error("the transfer does not fit as the renderer reads it")]
    OutOfRange,
    /// A backing range is not in guest memory.
    #[error("guest memory at {0:#x}: {1}")]
    Guest(u64, vm_memory::GuestMemoryError),
}

/// Applies TRANSFER_TO_HOST_2D of `rect` from byte `offset` of the backing `entries` to
/// `buffer` (the resource's pixels at resource coordinates, `stride` bytes per row),
/// exactly as the renderer applies it to the resource: row `r` of the rectangle is
/// `rect.width * 4` bytes from backing byte `offset + r * stride`.
pub fn apply_transfer(
    mem: &GuestMem,
    entries: &[BackingEntry],
    rect: &Rect,
    offset: u64,
    buffer: &ScanoutBuffer,
) -> Result<(), MirrorError> {
    if rect.width == 0 || rect.height == 0 {
        return Ok(());
    }
    let stride = u64::from(buffer.stride());
    let row_bytes = u64::from(rect.width) * 4;
    let x_bytes = u64::from(rect.x) * 4;
    // The renderer refuses an offset before the rectangle's own place in a packed buffer.
    let start_in_packed = u64::from(rect.y)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(x_bytes))
        .ok_or(MirrorError::OutOfRange)?;
    if offset < start_in_packed || x_bytes + row_bytes > stride {
        return Err(MirrorError::OutOfRange);
    }
    let mut backing = Backing::new(entries);
    let mem = mem.memory();
    for r in 0..u64::from(rect.height) {
        let src = offset
            .checked_add(r * stride)
            .ok_or(MirrorError::OutOfRange)?;
        let dst = (u64::from(rect.y) + r)
            .checked_mul(stride)
            .and_then(|v| v.checked_add(x_bytes))
            .ok_or(MirrorError::OutOfRange)?;
        let row = buffer
            .slice(dst, row_bytes)
            .ok_or(MirrorError::OutOfRange)?;
        let mut done = 0usize;
        backing.for_each_range(src, row_bytes, |addr, len| {
            for piece in mem.get_slices(GuestAddress(addr), len as usize) {
                let piece = piece.map_err(|e| MirrorError::Guest(addr, e))?;
                let to = row
                    .subslice(done, piece.len())
                    .map_err(|_| MirrorError::OutOfRange)?;
                piece.copy_to_volatile_slice(to);
                done += piece.len();
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// The backing as one byte range over its entries. Rows are looked up in increasing
/// order, so a cursor remembers where the last one was (no table is built: nothing is
/// allocated per transfer).
struct Backing<'a> {
    entries: &'a [BackingEntry],
    total: u64,
    /// The entry the last lookup started in, and the backing offset where it starts.
    cursor: (usize, u64),
}

impl<'a> Backing<'a> {
    fn new(entries: &'a [BackingEntry]) -> Self {
        let total = entries.iter().map(|e| u64::from(e.length)).sum();
        Backing {
            entries,
            total,
            cursor: (0, 0),
        }
    }

    /// Calls `f` with each guest range (address, length) holding backing bytes
    /// `[from, from + len)`, in order.
    fn for_each_range(
        &mut self,
        from: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), MirrorError>,
    ) -> Result<(), MirrorError> {
        let end = from.checked_add(len).ok_or(MirrorError::OutOfRange)?;
        if end > self.total {
            return Err(MirrorError::OutOfRange);
        }
        if from < self.cursor.1 {
            self.cursor = (0, 0);
        }
        let (mut i, mut start) = self.cursor;
        // Past the entries that end at or before `from`.
        while let Some(e) = self.entries.get(i) {
            if start + u64::from(e.length) > from {
                break;
            }
            start += u64::from(e.length);
            i += 1;
        }
        self.cursor = (i, start);
        let mut at = from;
        while at < end {
            let entry = self.entries.get(i).ok_or(MirrorError::OutOfRange)?;
            let within = at - start;
            let n = (u64::from(entry.length) - within).min(end - at);
            if n > 0 {
                f(
                    entry
                        .addr
                        .checked_add(within)
                        .ok_or(MirrorError::OutOfRange)?,
                    n,
                )?;
            }
            at += n;
            start += u64::from(entry.length);
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: u64, length: u32) -> BackingEntry {
        BackingEntry { addr, length }
    }

    fn ranges(b: &mut Backing<'_>, from: u64, len: u64) -> Result<Vec<(u64, u64)>, MirrorError> {
        let mut out = Vec::new();
        b.for_each_range(from, len, |a, n| {
            out.push((a, n));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn backing_ranges_follow_the_entries() {
        let entries = [entry(0x1000, 100), entry(0x9000, 50), entry(0x5000, 10)];
        let b = &mut Backing::new(&entries);
        assert_eq!(ranges(b, 0, 100).unwrap(), [(0x1000, 100)]);
        assert_eq!(
            ranges(b, 90, 20).unwrap(),
            [(0x1000 + 90, 10), (0x9000, 10)]
        );
        assert_eq!(
            ranges(b, 99, 61).unwrap(),
            [(0x1000 + 99, 1), (0x9000, 50), (0x5000, 10)]
        );
        assert_eq!(ranges(b, 150, 10).unwrap(), [(0x5000, 10)]);
        assert!(matches!(ranges(b, 151, 10), Err(MirrorError::OutOfRange)));
        assert!(matches!(
            ranges(b, u64::MAX, 2),
            Err(MirrorError::OutOfRange)
        ));
    }

    #[test]
    fn zero_length_entries_are_skipped() {
        let entries = [
            entry(0x1000, 0),
            entry(0x2000, 8),
            entry(0x3000, 0),
            entry(0x4000, 8),
        ];
        let b = &mut Backing::new(&entries);
        assert_eq!(ranges(b, 0, 16).unwrap(), [(0x2000, 8), (0x4000, 8)]);
        assert_eq!(ranges(b, 8, 8).unwrap(), [(0x4000, 8)]);
    }

    #[test]
    fn sync_comes_back_only_with_a_whole_write_after_the_last_miss() {
        let mut s = BufferSync::default();
        assert!(!s.in_step(), "a new buffer is filled by the renderer first");
        s.write_requested(true);
        assert!(!s.in_step());
        s.write_answered(true);
        assert!(s.in_step());
        // A partial renderer write in flight: not in step until answered.
        s.write_requested(false);
        assert!(!s.in_step());
        s.write_answered(true);
        assert!(s.in_step());
        // A miss while a whole write is in flight: that write does not restore it.
        s.lose();
        s.write_requested(true);
        s.lose();
        s.write_answered(true);
        assert!(!s.in_step());
        // Disabled while a write is on its way, then shown again: the old write's answer
        // must not stand for the new fill.
        s.write_requested(false);
        s = s.rebound();
        s.write_requested(true);
        s.write_answered(true);
        assert!(!s.in_step(), "the old write's answer taken for the fill's");
        s.write_answered(true);
        assert!(s.in_step());
        // A refused write loses it too.
        s.write_requested(true);
        s.write_answered(false);
        assert!(!s.in_step());
        s.write_requested(true);
        s.write_answered(true);
        assert!(s.in_step());
    }
}
