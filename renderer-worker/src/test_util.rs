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

/// How many mappings of `file` this process has, from /proc/self/maps (matched by inode,
/// which each memfd has its own of).
pub fn mappings_of(file: &impl std::os::fd::AsFd) -> usize {
    let ino = nix::sys::stat::fstat(file).expect("fstat").st_ino;
    std::fs::read_to_string("/proc/self/maps")
        .expect("read /proc/self/maps")
        .lines()
        .filter(|line| line.split_whitespace().nth(4) == Some(&ino.to_string()))
        .count()
}
