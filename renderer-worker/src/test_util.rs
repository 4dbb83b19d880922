//! Helpers for unit tests: real memfds standing in for guest memory.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use nix::sys::memfd::{memfd_create, MFdFlags};

/// A memfd of `len` bytes where byte `i` is `fill(i)`.
pub fn memfd_with(len: usize, fill: impl Fn(usize) -> u8) -> OwnedFd {
    let fd = memfd_create(c"guest-test", MFdFlags::MFD_CLOEXEC).expect("memfd_create");
    let mut file = File::from(fd);
    let bytes: Vec<u8> = (0..len).map(fill).collect();
    file.write_all(&bytes).expect("fill memfd");
    file.into()
}
