//! The VMM's hostmem window (the virtio shared memory region 0 of the GPU), done the way
//! QEMU's MAP_FIXED design does it: the whole window is reserved once, a blob's fd is mapped
//! over its range with `MAP_FIXED | MAP_SHARED`, and an unmap maps anonymous zero memory
//! back over the range with `MAP_FIXED`, so the window never has a hole.
//!
//! The guest's view of the window is [`HostmemWindow::read`] / [`HostmemWindow::write`]:
//! "the guest reads and writes the blob through the window". Every map, unmap and refusal
//! is logged; a request the device should never have sent (outside the window, unaligned,
//! overlapping a live mapping, unmapping what is not mapped, beyond the end of the fd) is
//! refused with an error and recorded as a violation.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Mutex, MutexGuard};

/// Errors of the hostmem window.
#[derive(Debug, thiserror::Error)]
pub enum HostmemError {
    /// The window size is zero or not a multiple of the page size.
    #[error("hostmem window size {0:#x} is zero or not page aligned")]
    BadSize(u64),
    /// An mmap call failed.
    #[error("{what}: {source}")]
    Os {
        /// Which call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A range is not inside the window.
    #[error("range {offset:#x}+{len:#x} is outside the {size:#x}-byte hostmem window")]
    OutOfWindow {
        /// Offset in the window.
        offset: u64,
        /// Length.
        len: u64,
        /// Window size.
        size: u64,
    },
    /// An offset or length is not page aligned (or a length is zero).
    #[error("{what} {value:#x} is not a non-zero multiple of the page size {page:#x}")]
    Unaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size.
        page: u64,
    },
    /// A map overlaps a live mapping.
    #[error("map {offset:#x}+{len:#x} overlaps the live mapping {live_offset:#x}+{live_len:#x}")]
    Overlap {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The live mapping's offset.
        live_offset: u64,
        /// The live mapping's length.
        live_len: u64,
    },
    /// An unmap does not name exactly one live mapping.
    #[error("unmap {offset:#x}+{len:#x} does not match a live mapping (live: {live})")]
    NotMapped {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The live mappings, for the message.
        live: String,
    },
    /// The mapped range would extend past the end of the fd (touching it would SIGBUS).
    #[error(
        "fd range {fd_offset:#x}+{len:#x} extends past the end of the file ({file_size:#x} bytes)"
    )]
    BeyondFile {
        /// fd offset.
        fd_offset: u64,
        /// Length.
        len: u64,
        /// The file's size.
        file_size: u64,
    },
    /// A guest write to a range mapped read-only.
    #[error("write {offset:#x}+{len:#x} touches the read-only mapping at {map_offset:#x}")]
    ReadOnly {
        /// Offset of the write.
        offset: u64,
        /// Length of the write.
        len: u64,
        /// The read-only mapping's offset.
        map_offset: u64,
    },
}

/// A live mapping in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Offset in the window.
    pub shm_offset: u64,
    /// Length.
    pub len: u64,
    /// Offset in the blob's fd.
    pub fd_offset: u64,
    /// Mapped writable.
    pub writable: bool,
}

/// What happened to the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WindowEvent {
    /// A blob fd was mapped.
    Mapped(Mapping),
    /// A range was unmapped (anonymous memory mapped back over it).
    Unmapped {
        /// Offset in the window.
        shm_offset: u64,
        /// Length.
        len: u64,
    },
    /// A map or unmap was refused.
    Refused {
        /// "map" or "unmap".
        op: &'static str,
        /// Offset in the window.
        shm_offset: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: String,
    },
}

#[derive(Default)]
struct State {
    live: BTreeMap<u64, Mapping>,
    log: Vec<WindowEvent>,
    violations: Vec<String>,
}

/// The reserved hostmem window. Every mapping change and every guest access holds one lock,
/// so a guest access never races a remap.
pub struct HostmemWindow {
    // Host address of the reservation (a usize so the window is Send + Sync; it is only
    // turned back into a pointer under the lock).
    base: usize,
    size: u64,
    page: u64,
    state: Mutex<State>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn os(what: &'static str) -> HostmemError {
    HostmemError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

const ANON_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

impl HostmemWindow {
    /// Reserves `size` bytes of address space (anonymous, zero-filled, not committed).
    pub fn reserve(size: u64) -> Result<HostmemWindow, HostmemError> {
        let page = page_size();
        if size == 0 || !size.is_multiple_of(page) {
            return Err(HostmemError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| HostmemError::BadSize(size))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks; it aliases no
        // Rust object. The result is checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                ANON_FLAGS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap (reserve the hostmem window)"));
        }
        Ok(HostmemWindow {
            base: p as usize,
            size,
            page,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The page size offsets and lengths must be multiples of.
    pub fn page_size(&self) -> u64 {
        self.page
    }

    /// The host address of the window (for diagnostics).
    pub fn host_address(&self) -> usize {
        self.base
    }

    fn check_in_window(&self, offset: u64, len: u64) -> Result<(), HostmemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(HostmemError::OutOfWindow {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_aligned(
        &self,
        what: &'static str,
        value: u64,
        nonzero: bool,
    ) -> Result<(), HostmemError> {
        if !value.is_multiple_of(self.page) || (nonzero && value == 0) {
            return Err(HostmemError::Unaligned {
                what,
                value,
                page: self.page,
            });
        }
        Ok(())
    }

    fn refuse(
        &self,
        st: &mut State,
        op: &'static str,
        shm_offset: u64,
        len: u64,
        e: HostmemError,
    ) -> HostmemError {
        log::warn!("hostmem: refused {op} {shm_offset:#x}+{len:#x}: {e}");
        st.violations
            .push(format!("{op} {shm_offset:#x}+{len:#x} refused: {e}"));
        st.log.push(WindowEvent::Refused {
            op,
            shm_offset,
            len,
            reason: e.to_string(),
        });
        e
    }

    fn validate_map(
        &self,
        st: &State,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
    ) -> Result<(), HostmemError> {
        self.check_in_window(shm_offset, len)?;
        self.check_aligned("shm_offset", shm_offset, false)?;
        self.check_aligned("len", len, true)?;
        self.check_aligned("fd_offset", fd_offset, false)?;
        let end = shm_offset + len;
        if let Some(m) = st
            .live
            .values()
            .find(|m| m.shm_offset < end && shm_offset < m.shm_offset + m.len)
        {
            return Err(HostmemError::Overlap {
                offset: shm_offset,
                len,
                live_offset: m.shm_offset,
                live_len: m.len,
            });
        }
        let stat = nix::sys::stat::fstat(fd).map_err(|e| HostmemError::Os {
            what: "fstat (blob fd)",
            source: e.into(),
        })?;
        // Regular files (memfd, shm) have a meaningful size; mapping past it would SIGBUS on
        // the first guest access. Other kinds (dmabuf) report no usable size.
        if stat.st_mode & libc::S_IFMT == libc::S_IFREG {
            let file_size = stat.st_size as u64;
            if fd_offset.checked_add(len).is_none_or(|e| e > file_size) {
                return Err(HostmemError::BeyondFile {
                    fd_offset,
                    len,
                    file_size,
                });
            }
        }
        Ok(())
    }

    /// Maps `len` bytes of `fd` from `fd_offset` at `shm_offset` in the window with
    /// `MAP_FIXED | MAP_SHARED`. Refuses (error + violation) ranges outside the window,
    /// unaligned values, overlap with a live mapping, and ranges past the end of the file.
    pub fn map(
        &self,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        shm_offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Mapping, HostmemError> {
        let mut st = self.lock();
        if let Err(e) = self.validate_map(&st, fd, fd_offset, shm_offset, len) {
            return Err(self.refuse(&mut st, "map", shm_offset, len, e));
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let Ok(off) = libc::off_t::try_from(fd_offset) else {
            let e = HostmemError::Unaligned {
                what: "fd_offset",
                value: fd_offset,
                page: self.page,
            };
            return Err(self.refuse(&mut st, "map", shm_offset, len, e));
        };
        let addr = self.base + shm_offset as usize;
        // SAFETY: [addr, addr+len) lies inside our own reservation (checked above) and holds
        // no live mapping; no Rust reference points into the window (guest accesses copy
        // under this same lock), so replacing the pages there cannot invalidate anything.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            let e = os("mmap MAP_FIXED (blob fd)");
            return Err(self.refuse(&mut st, "map", shm_offset, len, e));
        }
        let m = Mapping {
            shm_offset,
            len,
            fd_offset,
            writable,
        };
        st.live.insert(shm_offset, m);
        st.log.push(WindowEvent::Mapped(m));
        Ok(m)
    }

    /// Unmaps the live mapping at exactly `shm_offset`+`len` by mapping anonymous zero
    /// memory back over it with `MAP_FIXED` (the window never has a hole). Refuses (error +
    /// violation) anything that is not exactly one live mapping.
    pub fn unmap(&self, shm_offset: u64, len: u64) -> Result<(), HostmemError> {
        let mut st = self.lock();
        let matches = st.live.get(&shm_offset).is_some_and(|m| m.len == len);
        if !matches {
            let e = match self.check_in_window(shm_offset, len) {
                Err(e) => e,
                Ok(()) => HostmemError::NotMapped {
                    offset: shm_offset,
                    len,
                    live: format!(
                        "{:?}",
                        st.live
                            .values()
                            .map(|m| (m.shm_offset, m.len))
                            .collect::<Vec<_>>()
                    ),
                },
            };
            return Err(self.refuse(&mut st, "unmap", shm_offset, len, e));
        }
        let addr = self.base + shm_offset as usize;
        // SAFETY: the range is a live mapping inside our reservation; mapping anonymous
        // memory over it with MAP_FIXED only replaces pages we own, and no Rust reference
        // points into the window.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                ANON_FLAGS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = os("mmap MAP_FIXED (anonymous, unmap)");
            return Err(self.refuse(&mut st, "unmap", shm_offset, len, e));
        }
        st.live.remove(&shm_offset);
        st.log.push(WindowEvent::Unmapped { shm_offset, len });
        Ok(())
    }

    /// The guest reads `len` bytes at `offset` through the window.
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, HostmemError> {
        let _st = self.lock();
        self.check_in_window(offset, len as u64)?;
        let mut out = vec![0u8; len];
        // SAFETY: the range is inside the reservation, which is always mapped readable
        // (blob mappings are at least PROT_READ and were checked to lie inside their file,
        // so no SIGBUS); the lock keeps the mappings stable during the copy; `out` is a
        // distinct allocation of `len` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + offset as usize) as *const u8,
                out.as_mut_ptr(),
                len,
            );
        }
        Ok(out)
    }

    /// The guest writes `bytes` at `offset` through the window. Refused where the range
    /// touches a read-only mapping.
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), HostmemError> {
        let st = self.lock();
        let len = bytes.len() as u64;
        self.check_in_window(offset, len)?;
        let end = offset + len;
        if let Some(m) = st
            .live
            .values()
            .find(|m| !m.writable && m.shm_offset < end && offset < m.shm_offset + m.len)
        {
            return Err(HostmemError::ReadOnly {
                offset,
                len,
                map_offset: m.shm_offset,
            });
        }
        // SAFETY: the range is inside the reservation and every page of it is writable
        // (anonymous memory or a writable blob mapping, checked above, within its file);
        // the lock keeps the mappings stable during the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.base + offset as usize) as *mut u8,
                bytes.len(),
            );
        }
        Ok(())
    }

    /// The live mappings, by offset.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.lock().live.values().copied().collect()
    }

    /// Every map, unmap and refusal so far.
    pub fn log(&self) -> Vec<WindowEvent> {
        self.lock().log.clone()
    }

    /// Requests the device should never have made.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }
}

impl Drop for HostmemWindow {
    fn drop(&mut self) {
        // SAFETY: the reservation is ours, and with `&mut self` nobody accesses it any more.
        unsafe {
            libc::munmap(self.base as *mut libc::c_void, self.size as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    use nix::sys::memfd::{memfd_create, MFdFlags};

    fn memfd(len: u64, fill: u8) -> File {
        let fd = memfd_create(c"hostmem-test-blob", MFdFlags::MFD_CLOEXEC).expect("memfd");
        let f = File::from(fd);
        f.set_len(len).expect("set_len");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![fill; len as usize], 0).expect("fill");
        f
    }

    const P: u64 = 4096;

    #[test]
    fn map_read_write_unmap_zeros() {
        let w = HostmemWindow::reserve(16 * P).unwrap();
        assert_eq!(
            w.read(0, (16 * P) as usize).unwrap(),
            vec![0; (16 * P) as usize]
        );
        let f = memfd(2 * P, 0x5a);
        w.map(f.as_fd(), 0, 4 * P, 2 * P, true).unwrap();
        assert_eq!(w.read(4 * P, 8).unwrap(), vec![0x5a; 8]);
        w.write(4 * P + 10, b"hello").unwrap();
        // The write went to the blob itself.
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello");
        // Around the mapping: still zeros.
        assert_eq!(w.read(4 * P - 4, 4).unwrap(), vec![0; 4]);
        assert_eq!(w.read(6 * P, 4).unwrap(), vec![0; 4]);
        w.unmap(4 * P, 2 * P).unwrap();
        assert_eq!(
            w.read(4 * P, (2 * P) as usize).unwrap(),
            vec![0; (2 * P) as usize]
        );
        // The blob kept its bytes.
        f.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(w.violations().is_empty());
        assert_eq!(w.log().len(), 2);
        assert!(w.mappings().is_empty());
    }

    #[test]
    fn fd_offset_and_read_only() {
        let w = HostmemWindow::reserve(8 * P).unwrap();
        let f = memfd(4 * P, 0);
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"second page", P).unwrap();
        w.map(f.as_fd(), P, 0, P, false).unwrap();
        assert_eq!(w.read(0, 11).unwrap(), b"second page");
        assert!(matches!(
            w.write(0, b"x"),
            Err(HostmemError::ReadOnly { .. })
        ));
        w.write(P, b"x").unwrap();
    }

    #[test]
    fn refusals_are_violations() {
        let w = HostmemWindow::reserve(8 * P).unwrap();
        let f = memfd(8 * P, 1);
        let fd = f.as_fd();
        assert!(matches!(
            w.map(fd, 0, 100, P, true),
            Err(HostmemError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(fd, 0, 0, 100, true),
            Err(HostmemError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(fd, 7, 0, P, true),
            Err(HostmemError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(fd, 0, 7 * P, 2 * P, true),
            Err(HostmemError::OutOfWindow { .. })
        ));
        assert!(matches!(
            w.map(fd, 0, u64::MAX - P + 1, P, true),
            Err(HostmemError::OutOfWindow { .. })
        ));
        assert!(matches!(
            w.map(fd, 0, 0, 0, true),
            Err(HostmemError::Unaligned { .. })
        ));
        assert!(matches!(
            w.map(fd, 4 * P, 0, 8 * P, true),
            Err(HostmemError::BeyondFile { .. })
        ));
        w.map(fd, 0, 2 * P, 2 * P, true).unwrap();
        for (off, len) in [(2 * P, P), (P, 2 * P), (3 * P, 2 * P), (0, 8 * P)] {
            assert!(
                matches!(
                    w.map(fd, 0, off, len, true),
                    Err(HostmemError::Overlap { .. })
                ),
                "{off:#x}+{len:#x}"
            );
        }
        // Adjacent is fine.
        w.map(fd, 0, 4 * P, P, true).unwrap();
        w.map(fd, 0, P, P, true).unwrap();
        // Unmaps must name a live mapping exactly.
        assert!(matches!(
            w.unmap(2 * P, P),
            Err(HostmemError::NotMapped { .. })
        ));
        assert!(matches!(
            w.unmap(6 * P, P),
            Err(HostmemError::NotMapped { .. })
        ));
        assert!(matches!(
            w.unmap(8 * P, P),
            Err(HostmemError::OutOfWindow { .. })
        ));
        w.unmap(2 * P, 2 * P).unwrap();
        assert!(matches!(
            w.unmap(2 * P, 2 * P),
            Err(HostmemError::NotMapped { .. })
        ));
        assert_eq!(w.violations().len(), 7 + 4 + 4);
        assert_eq!(w.mappings().len(), 2);
        assert!(w.read(8 * P - 1, 2).is_err());
        assert!(matches!(
            HostmemWindow::reserve(100),
            Err(HostmemError::BadSize(100))
        ));
        assert!(matches!(
            HostmemWindow::reserve(0),
            Err(HostmemError::BadSize(0))
        ));
    }
}
