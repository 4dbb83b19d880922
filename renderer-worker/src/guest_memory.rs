//! The guest's memory: the region fds the VMM gave the frontend, and the translation of
//! guest scatter-gather lists into host iovecs.
//!
//! Least privilege: a memory table maps nothing. Each translation maps only the guest
//! ranges it names (page-aligned, from the region's fd, contiguous entries of one region
//! merged into one mapping), and those mappings belong to the returned [`Backing`]: they are
//! unmapped when the backing is dropped (detach, unref, reset). The renderer therefore
//! holds in its address space the guest memory attached as backing, not the whole of guest
//! RAM. A backing does not depend on the table it was translated with, so a later
//! `SetGuestMemory` leaves attached backings intact.
//!
//! The former way, mapping every region whole when the table arrives, is kept only as the
//! baseline of the `attach` benchmark ([`GuestMemory::new_whole_mapped`]).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use nix::sys::stat::{fstat, SFlag};
use protocol::ipc::{BackingEntry, GuestRegion, RenderError};

use crate::mapping::{page_size, SharedMapping};

/// Most regions one memory table may have (the descriptor lane's limit per ticket).
pub const MAX_REGIONS: usize = protocol::lane::MAX_FDS_PER_TICKET;

/// Most per-range guest mappings alive in this process at once. Linux refuses new mappings
/// past `vm.max_map_count` (65530 by default) for every user of the address space, the
/// allocator and rutabaga included; a guest that scatters its backings page by page must
/// get an error on its own attach, well before that.
pub const MAX_LIVE_RANGE_MAPPINGS: usize = 57344;

/// Per-range mappings alive now, process-wide.
static LIVE_RANGE_MAPPINGS: AtomicUsize = AtomicUsize::new(0);

/// How a region is reached.
#[derive(Debug)]
enum Source {
    /// The region's fd, mapped range by range at translation (the normal way).
    Fd(OwnedFd),
    /// The whole region, mapped once (benchmark baseline only).
    Whole(SharedMapping),
}

/// One guest memory region.
#[derive(Debug)]
struct Region {
    guest_addr: u64,
    /// Exclusive end in guest physical addresses (no overflow: checked at build).
    guest_end: u64,
    /// Offset of `guest_addr` in the fd (`fd_offset + size` checked not to overflow).
    fd_offset: u64,
    /// Granularity of mmap offsets and lengths for this fd: the page size, or the huge page
    /// size of a hugetlbfs file.
    align: usize,
    source: Source,
}

/// One generation of the guest memory map.
#[derive(Debug)]
pub struct GuestMemory {
    /// Sorted by `guest_addr`, non-overlapping.
    regions: Vec<Region>,
}

/// A contiguous range of host memory inside a mapped guest range.
#[derive(Clone, Copy, Debug)]
pub struct HostIovec {
    base: *mut u8,
    len: usize,
}

impl HostIovec {
    /// Host address of the first byte.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty entries are dropped during translation.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One mapped guest range, counted against [`MAX_LIVE_RANGE_MAPPINGS`].
#[derive(Debug)]
struct RangeMapping(SharedMapping);

impl RangeMapping {
    fn new(fd: &OwnedFd, offset: u64, len: usize, align: usize) -> Result<Self, RenderError> {
        LIVE_RANGE_MAPPINGS
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_LIVE_RANGE_MAPPINGS).then_some(n + 1)
            })
            .map_err(|n| {
                RenderError::OutOfMemory(format!("{n} guest ranges mapped, no more allowed"))
            })?;
        match SharedMapping::with_alignment(fd, offset, len, align) {
            Ok(mapping) => Ok(RangeMapping(mapping)),
            Err(e) => {
                LIVE_RANGE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

impl Drop for RangeMapping {
    fn drop(&mut self) {
        // The SharedMapping inside unmaps right after this.
        LIVE_RANGE_MAPPINGS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What keeps a backing's iovecs valid.
#[derive(Debug)]
enum Keep {
    /// The backing's own mappings (per-range translation).
    Ranges(Vec<RangeMapping>),
    /// The whole-region mappings of the generation it was translated with (baseline).
    Generation { _memory: Arc<GuestMemory> },
}

/// A resource's backing store in host addresses, owning the mappings its iovecs point into
/// for as long as it lives.
#[derive(Debug)]
pub struct Backing {
    iovecs: Vec<HostIovec>,
    len: u64,
    /// Keeps every pointer in `iovecs` valid; unmaps the ranges when dropped.
    _keep: Keep,
}

impl Backing {
    /// The host iovecs, in guest order. Valid for as long as `self` lives.
    pub fn iovecs(&self) -> &[HostIovec] {
        &self.iovecs
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the backing has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `dst.len()` bytes from byte `offset` of the backing into `dst`.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<(), RenderError> {
        offset
            .checked_add(dst.len() as u64)
            .filter(|end| *end <= self.len)
            .ok_or_else(|| {
                RenderError::InvalidParameter(format!(
                    "{} bytes at {offset} of a {}-byte backing",
                    dst.len(),
                    self.len
                ))
            })?;
        let mut offset = offset;
        let mut done = 0;
        for iov in &self.iovecs {
            if done == dst.len() {
                break;
            }
            let len = iov.len() as u64;
            if offset >= len {
                offset -= len;
                continue;
            }
            // Both below fit in usize: they are bounded by this iovec's length.
            let start = offset as usize;
            let take = (iov.len() - start).min(dst.len() - done);
            // SAFETY: `iov` lies inside a guest memory mapping that `self` keeps alive for
            // this borrow, and `start + take <= iov.len()`. The guest may write the same
            // bytes concurrently; they are plain bytes, copied without forming a reference.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    iov.base().add(start),
                    dst[done..].as_mut_ptr(),
                    take,
                );
            }
            done += take;
            offset = 0;
        }
        Ok(())
    }

    /// Number of guest ranges this backing mapped (0 for a whole-region baseline backing).
    pub fn mapping_count(&self) -> usize {
        match &self._keep {
            Keep::Ranges(maps) => maps.len(),
            Keep::Generation { .. } => 0,
        }
    }
}

/// A piece of one backing entry inside one region.
#[derive(Clone, Copy, Debug)]
struct Piece {
    region: usize,
    addr: u64,
    len: u64,
}

fn invalid(msg: String) -> RenderError {
    RenderError::InvalidParameter(msg)
}

impl GuestMemory {
    /// Takes `regions`, one fd per region in the same order. Maps nothing: see
    /// [`GuestMemory::translate`].
    ///
    /// Every fd must be a regular file (memfd, shm or hugetlbfs file) at least
    /// `fd_offset + size` bytes long; regions must be non-empty and must not overlap.
    pub fn new(regions: &[GuestRegion], fds: Vec<OwnedFd>) -> Result<Self, RenderError> {
        Self::build(regions, fds, false)
    }

    /// The former way: maps every region whole now, and translations point into those
    /// mappings. Kept only as the baseline of the `attach` benchmark; not used by the
    /// renderer.
    #[doc(hidden)]
    pub fn new_whole_mapped(
        regions: &[GuestRegion],
        fds: Vec<OwnedFd>,
    ) -> Result<Self, RenderError> {
        Self::build(regions, fds, true)
    }

    fn build(regions: &[GuestRegion], fds: Vec<OwnedFd>, whole: bool) -> Result<Self, RenderError> {
        if regions.len() != fds.len() {
            return Err(invalid(format!(
                "{} regions but {} fds",
                regions.len(),
                fds.len()
            )));
        }
        if regions.len() > MAX_REGIONS {
            return Err(invalid(format!("{} regions", regions.len())));
        }
        let mut checked = Vec::with_capacity(regions.len());
        for (region, fd) in regions.iter().zip(fds) {
            checked.push(check_region(region, fd, whole)?);
        }
        checked.sort_by_key(|r| r.guest_addr);
        for pair in checked.windows(2) {
            if pair[0].guest_end > pair[1].guest_addr {
                return Err(invalid(format!(
                    "guest regions at {:#x} and {:#x} overlap",
                    pair[0].guest_addr, pair[1].guest_addr
                )));
            }
        }
        Ok(GuestMemory { regions: checked })
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Translates a guest scatter-gather list into host iovecs, mapping the ranges it
    /// names (see the module documentation).
    ///
    /// An entry may run across adjacent regions (it is split); an entry that touches a
    /// guest address outside every region is an error. At most `max_entries` entries and
    /// `max_len` bytes in total are accepted, so a hostile list cannot make us do
    /// unbounded work. Empty entries are skipped. The iovecs follow the entries (one per
    /// entry and region); entries that continue the previous one in the same region share
    /// its mapping.
    pub fn translate(
        self: &Arc<Self>,
        entries: &[BackingEntry],
        max_entries: usize,
        max_len: u64,
    ) -> Result<Backing, RenderError> {
        if entries.len() > max_entries {
            return Err(invalid(format!(
                "{} backing entries, at most {max_entries}",
                entries.len()
            )));
        }
        // u32 lengths summed over a bounded list cannot overflow a u64.
        let total: u64 = entries.iter().map(|e| u64::from(e.length)).sum();
        if total > max_len {
            return Err(invalid(format!(
                "backing of {total} bytes, at most {max_len}"
            )));
        }
        let mut pieces = Vec::with_capacity(entries.len());
        for entry in entries {
            self.split_entry(entry, &mut pieces)?;
        }
        let mut iovecs = Vec::with_capacity(pieces.len());
        let keep = if self.is_whole_mapped() {
            for piece in &pieces {
                let region = &self.regions[piece.region];
                let Source::Whole(mapping) = &region.source else {
                    unreachable!("a table is mapped whole or not at all");
                };
                // Both fit in usize: they are bounded by the region's mapping length.
                iovecs.push(HostIovec {
                    base: mapping
                        .as_ptr()
                        .wrapping_add((piece.addr - region.guest_addr) as usize),
                    len: piece.len as usize,
                });
            }
            Keep::Generation {
                _memory: Arc::clone(self),
            }
        } else {
            Keep::Ranges(self.map_pieces(&pieces, &mut iovecs)?)
        };
        Ok(Backing {
            iovecs,
            len: total,
            _keep: keep,
        })
    }

    fn is_whole_mapped(&self) -> bool {
        self.regions
            .first()
            .is_some_and(|r| matches!(r.source, Source::Whole(_)))
    }

    /// Maps each run of `pieces` that is contiguous in one region once, and pushes an
    /// iovec per piece into those mappings.
    fn map_pieces(
        &self,
        pieces: &[Piece],
        iovecs: &mut Vec<HostIovec>,
    ) -> Result<Vec<RangeMapping>, RenderError> {
        let mut mappings = Vec::new();
        let mut rest = pieces;
        while let Some(first) = rest.first() {
            let mut run_len = first.len;
            let mut count = 1;
            for next in &rest[1..] {
                if next.region != first.region || next.addr != first.addr + run_len {
                    break;
                }
                run_len += next.len;
                count += 1;
            }
            let (run, tail) = rest.split_at(count);
            rest = tail;
            let region = &self.regions[first.region];
            let Source::Fd(fd) = &region.source else {
                unreachable!("a table is mapped whole or not at all");
            };
            // A run lies inside its region, whose size fits in usize (checked at build).
            let len = usize::try_from(run_len)
                .map_err(|_| invalid(format!("backing run of {run_len} bytes")))?;
            let offset = region.fd_offset + (first.addr - region.guest_addr);
            let mapping = RangeMapping::new(fd, offset, len, region.align)?;
            let base = mapping.0.as_ptr();
            for piece in run {
                // Inside the run just mapped, so below `len`.
                iovecs.push(HostIovec {
                    base: base.wrapping_add((piece.addr - first.addr) as usize),
                    len: piece.len as usize,
                });
            }
            mappings.push(mapping);
        }
        Ok(mappings)
    }

    fn split_entry(&self, entry: &BackingEntry, out: &mut Vec<Piece>) -> Result<(), RenderError> {
        let outside = || {
            invalid(format!(
                "backing entry {:#x}+{:#x} lies outside guest memory",
                entry.addr, entry.length
            ))
        };
        let mut addr = entry.addr;
        let mut left = u64::from(entry.length);
        while left > 0 {
            let index = self.region_containing(addr).ok_or_else(outside)?;
            let region = &self.regions[index];
            let take = left.min(region.guest_end - addr);
            out.push(Piece {
                region: index,
                addr,
                len: take,
            });
            left -= take;
            // Only reached with left > 0 when the region ended before the entry did, so
            // the next region must start exactly here.
            addr = region.guest_end;
        }
        Ok(())
    }

    fn region_containing(&self, addr: u64) -> Option<usize> {
        let idx = self.regions.partition_point(|r| r.guest_end <= addr);
        self.regions
            .get(idx)
            .filter(|r| r.guest_addr <= addr && addr < r.guest_end)
            .map(|_| idx)
    }
}

fn check_region(region: &GuestRegion, fd: OwnedFd, whole: bool) -> Result<Region, RenderError> {
    if region.size == 0 {
        return Err(invalid(format!(
            "empty guest region at {:#x}",
            region.guest_addr
        )));
    }
    let guest_end = region
        .guest_addr
        .checked_add(region.size)
        .ok_or_else(|| invalid(format!("guest region {region:?} wraps around")))?;
    let fd_end = region
        .fd_offset
        .checked_add(region.size)
        .ok_or_else(|| invalid(format!("guest region {region:?}: fd range overflows")))?;
    let len = usize::try_from(region.size)
        .map_err(|_| invalid(format!("guest region {region:?} too large")))?;
    let stat = fstat(&fd).map_err(|e| invalid(format!("fstat of a region fd: {e}")))?;
    // Devices and sockets have no business backing guest RAM; refusing them keeps the
    // mmaps of this fd to ordinary memory.
    if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(invalid("a region fd is not a regular file".into()));
    }
    let file_len = u64::try_from(stat.st_size).unwrap_or(0);
    if file_len < fd_end {
        return Err(invalid(format!(
            "region fd holds {file_len} bytes, region needs {fd_end}"
        )));
    }
    // A hugetlbfs file reports its huge page size as the block size and takes only mmaps
    // aligned to it; memfd and tmpfs files report the page size (or their huge page size,
    // where aligning to it costs nothing). Anything odd falls back to the page size.
    let align = usize::try_from(stat.st_blksize)
        .ok()
        .filter(|b| b.is_power_of_two() && *b <= 1 << 30)
        .map_or(page_size(), |b| b.max(page_size()));
    let source = if whole {
        Source::Whole(SharedMapping::with_alignment(
            &fd,
            region.fd_offset,
            len,
            align,
        )?)
    } else {
        Source::Fd(fd)
    };
    Ok(Region {
        guest_addr: region.guest_addr,
        guest_end,
        fd_offset: region.fd_offset,
        align,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::memfd_with;

    fn two_adjacent_regions() -> Arc<GuestMemory> {
        // Region A: guest 0x1000..0x3000 at fd offset 0x1000 of a 0x3000-byte file;
        // region B: guest 0x3000..0x4000 at offset 0 of its own file.
        let a = memfd_with(0x3000, |i| (i / 0x1000) as u8);
        let b = memfd_with(0x1000, |_| 0xbb);
        let regions = [
            GuestRegion {
                guest_addr: 0x3000,
                size: 0x1000,
                fd_offset: 0,
            },
            GuestRegion {
                guest_addr: 0x1000,
                size: 0x2000,
                fd_offset: 0x1000,
            },
        ];
        Arc::new(GuestMemory::new(&regions, vec![b, a]).unwrap())
    }

    fn bytes(iov: &HostIovec) -> &[u8] {
        // SAFETY: test-only view of an iovec whose backing outlives this borrow.
        unsafe { std::slice::from_raw_parts(iov.base(), iov.len()) }
    }

    #[test]
    fn entry_spanning_two_regions_is_split() {
        let mem = two_adjacent_regions();
        let entries = [BackingEntry {
            addr: 0x2ff0,
            length: 0x20,
        }];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        assert_eq!(backing.len(), 0x20);
        let iovs = backing.iovecs();
        assert_eq!(iovs.len(), 2);
        assert_eq!(iovs[0].len(), 0x10);
        assert_eq!(iovs[1].len(), 0x10);
        // Guest 0x2ff0 is fd offset 0x2ff0 of file A, whose third page holds 2s.
        assert!(bytes(&iovs[0]).iter().all(|&b| b == 2));
        assert!(bytes(&iovs[1]).iter().all(|&b| b == 0xbb));
    }

    #[test]
    fn fd_offset_is_honoured() {
        let mem = two_adjacent_regions();
        let entries = [BackingEntry {
            addr: 0x1000,
            length: 4,
        }];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        assert_eq!(bytes(&backing.iovecs()[0]), &[1, 1, 1, 1]);
    }

    #[test]
    fn outside_entries_and_caps_are_rejected() {
        let mem = two_adjacent_regions();
        let outside = |addr, length| {
            let r = mem.translate(&[BackingEntry { addr, length }], 16, 1 << 20);
            assert!(
                matches!(r, Err(RenderError::InvalidParameter(_))),
                "{addr:#x}+{length:#x}: {r:?}"
            );
        };
        outside(0, 0x10);
        outside(0xff0, 0x20);
        outside(0x3ff0, 0x20);
        outside(u64::MAX - 4, 0x10);
        let big = [BackingEntry {
            addr: 0x1000,
            length: 0x3000,
        }];
        assert!(mem.translate(&big, 16, 0x2fff).is_err());
        assert!(mem.translate(&big, 16, 0x3000).is_ok());
        let many = vec![
            BackingEntry {
                addr: 0x1000,
                length: 1
            };
            17
        ];
        assert!(mem.translate(&many, 16, 1 << 20).is_err());
    }

    /// Whether `addr` lies in a mapping of this process (msync answers ENOMEM otherwise).
    fn is_mapped(addr: *mut u8) -> bool {
        let page = page_size();
        let aligned = (addr as usize) & !(page - 1);
        // SAFETY: msync only inspects the address range; it touches no memory we own.
        unsafe { libc::msync(aligned as *mut libc::c_void, page, libc::MS_ASYNC) == 0 }
    }

    #[test]
    fn unaligned_entry_points_at_its_byte() {
        let fd = memfd_with(0x4000, |i| (i % 251) as u8);
        let mem = Arc::new(
            GuestMemory::new(
                &[GuestRegion {
                    guest_addr: 0x10_0000,
                    size: 0x3000,
                    fd_offset: 0x1000,
                }],
                vec![fd],
            )
            .unwrap(),
        );
        let entries = [BackingEntry {
            addr: 0x10_1234,
            length: 0x1000,
        }];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        assert_eq!(backing.mapping_count(), 1);
        let iov = &backing.iovecs()[0];
        assert_eq!(iov.len(), 0x1000);
        // Guest 0x10_1234 is fd offset 0x2234.
        let want: Vec<u8> = (0x2234..0x3234).map(|i| (i % 251) as u8).collect();
        assert_eq!(bytes(iov), &want[..]);
    }

    #[test]
    fn contiguous_entries_share_one_mapping() {
        let mem = two_adjacent_regions();
        let entries = [
            BackingEntry {
                addr: 0x1800,
                length: 0x100,
            },
            BackingEntry {
                addr: 0x1900,
                length: 0x800,
            },
            // Not contiguous with the previous one: its own mapping.
            BackingEntry {
                addr: 0x1000,
                length: 0x10,
            },
        ];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        assert_eq!(backing.mapping_count(), 2);
        let iovs = backing.iovecs();
        assert_eq!(iovs.len(), 3);
        assert_eq!(iovs[1].base(), iovs[0].base().wrapping_add(0x100));
        assert!(bytes(&iovs[0]).iter().all(|&b| b == 1));
        // 0x1900..0x2100 crosses from fd page 1 into page 2.
        assert!(bytes(&iovs[1])[..0x700].iter().all(|&b| b == 1));
        assert!(bytes(&iovs[1])[0x700..].iter().all(|&b| b == 2));
        assert!(bytes(&iovs[2]).iter().all(|&b| b == 1));
    }

    #[test]
    fn entries_in_two_regions_map_each_region() {
        let mem = two_adjacent_regions();
        let entries = [
            BackingEntry {
                addr: 0x3800,
                length: 0x10,
            },
            BackingEntry {
                addr: 0x2000,
                length: 0x10,
            },
        ];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        assert_eq!(backing.mapping_count(), 2);
        assert!(bytes(&backing.iovecs()[0]).iter().all(|&b| b == 0xbb));
        assert!(bytes(&backing.iovecs()[1]).iter().all(|&b| b == 2));
    }

    #[test]
    fn dropping_the_backing_unmaps_its_ranges() {
        let mem = two_adjacent_regions();
        let entries = [
            BackingEntry {
                addr: 0x1000,
                length: 0x10,
            },
            BackingEntry {
                addr: 0x3000,
                length: 0x10,
            },
        ];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        let bases: Vec<_> = backing.iovecs().iter().map(|i| i.base()).collect();
        assert!(bases.iter().all(|&b| is_mapped(b)));
        drop(backing);
        assert!(bases.iter().all(|&b| !is_mapped(b)));
    }

    #[test]
    fn the_table_itself_maps_nothing() {
        let mem = two_adjacent_regions();
        assert!(mem
            .regions
            .iter()
            .all(|r| matches!(r.source, Source::Fd(_))));
    }

    #[test]
    fn a_new_table_leaves_attached_backings_alone() {
        let mem = two_adjacent_regions();
        let entries = [BackingEntry {
            addr: 0x3000,
            length: 0x1000,
        }];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        // The executor drops its table for the next one; the backing must not care.
        drop(mem);
        let _next = two_adjacent_regions();
        let iov = &backing.iovecs()[0];
        assert!(is_mapped(iov.base()));
        assert!(bytes(iov).iter().all(|&b| b == 0xbb));
    }

    #[test]
    fn whole_mapped_baseline_translates_the_same_bytes() {
        let a = memfd_with(0x3000, |i| (i / 0x1000) as u8);
        let mem = Arc::new(
            GuestMemory::new_whole_mapped(
                &[GuestRegion {
                    guest_addr: 0x1000,
                    size: 0x2000,
                    fd_offset: 0x1000,
                }],
                vec![a],
            )
            .unwrap(),
        );
        let entries = [BackingEntry {
            addr: 0x1ff0,
            length: 0x20,
        }];
        let backing = mem.translate(&entries, 16, 1 << 20).unwrap();
        assert_eq!(backing.mapping_count(), 0);
        let b = bytes(&backing.iovecs()[0]);
        assert!(b[..0x10].iter().all(|&x| x == 1) && b[0x10..].iter().all(|&x| x == 2));
    }

    #[test]
    fn bad_tables_are_rejected() {
        let short = memfd_with(0x1000, |_| 0);
        let r = GuestMemory::new(
            &[GuestRegion {
                guest_addr: 0,
                size: 0x2000,
                fd_offset: 0,
            }],
            vec![short],
        );
        assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");

        let f = memfd_with(0x1000, |_| 0);
        let r = GuestMemory::new(
            &[GuestRegion {
                guest_addr: 0,
                size: 0x1000,
                fd_offset: u64::MAX,
            }],
            vec![f],
        );
        assert!(matches!(r, Err(RenderError::InvalidParameter(_))), "{r:?}");

        let (f, g) = (memfd_with(0x2000, |_| 0), memfd_with(0x2000, |_| 0));
        let overlapping = [
            GuestRegion {
                guest_addr: 0,
                size: 0x2000,
                fd_offset: 0,
            },
            GuestRegion {
                guest_addr: 0x1000,
                size: 0x1000,
                fd_offset: 0,
            },
        ];
        assert!(GuestMemory::new(&overlapping, vec![f, g]).is_err());

        let f = memfd_with(0x1000, |_| 0);
        assert!(GuestMemory::new(&[], vec![f]).is_err());
    }
}
