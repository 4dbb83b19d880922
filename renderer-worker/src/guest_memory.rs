//! The guest's memory, mapped from the region fds the VMM gave the frontend, and the
//! translation of guest scatter-gather lists into host iovecs.
//!
//! Each `SetGuestMemory` builds a new generation behind an [`Arc`]. A resource's attached
//! [`Backing`] holds the `Arc` of the generation it was translated with, so the host
//! pointers handed to the renderer stay mapped until the backing is detached or the
//! resource destroyed, even if the VMM sends a new memory table meanwhile.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::stat::{fstat, SFlag};
use protocol::ipc::{BackingEntry, GuestRegion, RenderError};

use crate::mapping::SharedMapping;

/// Most regions one memory table may have (the descriptor lane's limit per ticket).
pub const MAX_REGIONS: usize = protocol::lane::MAX_FDS_PER_TICKET;

/// One mapped guest memory region.
#[derive(Debug)]
struct Region {
    guest_addr: u64,
    /// Exclusive end in guest physical addresses (no overflow: checked at build).
    guest_end: u64,
    mapping: SharedMapping,
}

/// One generation of the guest memory map.
#[derive(Debug)]
pub struct GuestMemory {
    /// Sorted by `guest_addr`, non-overlapping.
    regions: Vec<Region>,
}

/// A contiguous range of host memory inside a mapped guest region.
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

/// A resource's backing store in host addresses, keeping its guest memory generation
/// mapped for as long as it lives.
#[derive(Debug)]
pub struct Backing {
    iovecs: Vec<HostIovec>,
    len: u64,
    /// Keeps every pointer in `iovecs` valid.
    _memory: Arc<GuestMemory>,
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
}

fn invalid(msg: String) -> RenderError {
    RenderError::InvalidParameter(msg)
}

impl GuestMemory {
    /// Maps `regions`, one fd per region in the same order.
    ///
    /// Every fd must be a regular file (memfd, shm or hugetlbfs file) at least
    /// `fd_offset + size` bytes long; regions must be non-empty and must not overlap.
    pub fn new(regions: &[GuestRegion], fds: Vec<OwnedFd>) -> Result<Self, RenderError> {
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
        let mut mapped = Vec::with_capacity(regions.len());
        for (region, fd) in regions.iter().zip(fds) {
            mapped.push(map_region(region, fd)?);
        }
        mapped.sort_by_key(|r| r.guest_addr);
        for pair in mapped.windows(2) {
            if pair[0].guest_end > pair[1].guest_addr {
                return Err(invalid(format!(
                    "guest regions at {:#x} and {:#x} overlap",
                    pair[0].guest_addr, pair[1].guest_addr
                )));
            }
        }
        Ok(GuestMemory { regions: mapped })
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Translates a guest scatter-gather list into host iovecs.
    ///
    /// An entry may run across adjacent regions (it is split); an entry that touches a
    /// guest address outside every region is an error. At most `max_entries` entries and
    /// `max_len` bytes in total are accepted, so a hostile list cannot make us do
    /// unbounded work. Empty entries are skipped.
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
        let mut iovecs = Vec::with_capacity(entries.len());
        for entry in entries {
            self.translate_entry(entry, &mut iovecs)?;
        }
        Ok(Backing {
            iovecs,
            len: total,
            _memory: Arc::clone(self),
        })
    }

    fn translate_entry(
        &self,
        entry: &BackingEntry,
        out: &mut Vec<HostIovec>,
    ) -> Result<(), RenderError> {
        let outside = || {
            invalid(format!(
                "backing entry {:#x}+{:#x} lies outside guest memory",
                entry.addr, entry.length
            ))
        };
        let mut addr = entry.addr;
        let mut left = u64::from(entry.length);
        while left > 0 {
            let region = self.region_containing(addr).ok_or_else(outside)?;
            // Both fit in usize: they are bounded by the region's mapping length.
            let within = (addr - region.guest_addr) as usize;
            let take = left.min(region.guest_end - addr);
            out.push(HostIovec {
                base: region.mapping.as_ptr().wrapping_add(within),
                len: take as usize,
            });
            left -= take;
            // Only reached with left > 0 when the region ended before the entry did, so
            // the next region must start exactly here.
            addr = region.guest_end;
        }
        Ok(())
    }

    fn region_containing(&self, addr: u64) -> Option<&Region> {
        let idx = self.regions.partition_point(|r| r.guest_end <= addr);
        self.regions
            .get(idx)
            .filter(|r| r.guest_addr <= addr && addr < r.guest_end)
    }
}

fn map_region(region: &GuestRegion, fd: OwnedFd) -> Result<Region, RenderError> {
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
    // mmap below to ordinary memory.
    if SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
        return Err(invalid("a region fd is not a regular file".into()));
    }
    let file_len = u64::try_from(stat.st_size).unwrap_or(0);
    if file_len < fd_end {
        return Err(invalid(format!(
            "region fd holds {file_len} bytes, region needs {fd_end}"
        )));
    }
    let mapping = SharedMapping::new(&fd, region.fd_offset, len)?;
    Ok(Region {
        guest_addr: region.guest_addr,
        guest_end,
        mapping,
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
