//! Runs sandboxing scenarios in child processes: the test binary re-executes itself, running
//! only its `child_entry` test, with the scenario named in an environment variable. The
//! filter is then installed in that child, never in the test process.

#![allow(dead_code)] // Each test binary uses a different part.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use vgpu_policy::{Filter, Role, ViolationAction};

/// The environment variable that turns a run of the test binary into a child.
pub const CHILD_ENV: &str = "VGPU_POLICY_TEST_CHILD";
/// The exit status of a child whose forbidden syscall unexpectedly returned.
pub const SURVIVED: i32 = 42;
/// The exit status of a child whose scenario failed in another way.
pub const FAILED: i32 = 43;

/// The scenario this process must run, if it is a child.
pub fn child_scenario() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Runs `scenario` in a child (the `child_entry` test of this binary) and returns its output.
pub fn run_child(scenario: &str) -> Output {
    let exe = std::env::current_exe().expect("current_exe");
    Command::new(exe)
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, scenario)
        .env_remove("VGPU_SANDBOX_SECCOMP")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("spawning the child")
}

/// Ends a child scenario: exit 0 on success, [`FAILED`] with the message on stderr.
pub fn finish(result: Result<(), String>) -> ! {
    match result {
        Ok(()) => std::process::exit(0),
        Err(message) => {
            eprintln!("child failed: {message}");
            std::process::exit(FAILED)
        }
    }
}

/// Parses a role name of a scenario.
pub fn role(name: &str) -> Role {
    Role::from_name(name).unwrap_or_else(|| panic!("unknown role {name}"))
}

/// Parses the filter of a scenario: a role name (its default filter), or
/// `renderer-worker-virgl`.
pub fn filter(name: &str) -> Filter {
    match name {
        "renderer-worker-virgl" => Filter::RendererVirgl,
        role_name => role(role_name).into(),
    }
}

/// Parses an action name of a scenario.
pub fn action(name: &str) -> ViolationAction {
    ViolationAction::parse(Some(name)).expect("action")
}

/// Hardens and jails the calling (child) process as `role`.
pub fn jail(role: impl Into<Filter>, action: ViolationAction) {
    vgpu_policy::harden_process().expect("harden_process");
    vgpu_policy::install_seccomp(role, action).expect("install_seccomp");
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts that the child exited 0.
pub fn assert_success(output: &Output) {
    assert_eq!(output.status.code(), Some(0), "{}", describe(output));
}

/// Asserts that the child was killed by SIGSYS (seccomp's KILL_PROCESS).
pub fn assert_killed_by_sigsys(output: &Output) {
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGSYS),
        "{}",
        describe(output)
    );
}

/// Asserts that the child trapped: exit 159 and `expected` (the violation line) on stderr.
pub fn assert_trapped(output: &Output, expected: &str) {
    assert_eq!(
        output.status.code(),
        Some(vgpu_policy::TRAP_EXIT_CODE),
        "{}",
        describe(output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(expected), "{}", describe(output));
}

fn check<T, E: std::fmt::Debug>(what: &str, result: Result<T, E>) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e:?}"))
}

/// What a jailed process does all day: threads, heap, anonymous and shared mappings,
/// memfds passed over a socketpair with SCM_RIGHTS, eventfds and epoll.
pub fn allowed_workload(role: Role) -> Result<(), String> {
    // A named thread that allocates and returns.
    let worker = std::thread::Builder::new()
        .name("workload".into())
        .spawn(|| {
            let data = vec![7u8; 8 << 20];
            data.iter().map(|&b| u64::from(b)).sum::<u64>()
        });
    let sum = check("join", check("spawn", worker)?.join())?;
    if sum != 7 * (8 << 20) {
        return Err(format!("bad sum {sum}"));
    }

    // Anonymous memory.
    // SAFETY: FFI; a fresh private anonymous mapping, unmapped below.
    let anon = check("mmap anon", unsafe {
        mmap_anonymous(
            None,
            std::num::NonZeroUsize::new(1 << 20).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    })?;
    // SAFETY: FFI; `anon` is the 1 MiB mapping made above, not used afterwards.
    check("munmap anon", unsafe { munmap(anon, 1 << 20) })?;

    // A sealed memfd, as the frontend makes for scanouts.
    let memfd = check(
        "memfd_create",
        memfd_create(
            "vgpu-policy-test",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        ),
    )?;
    check("ftruncate", nix::unistd::ftruncate(&memfd, 1 << 16))?;
    check(
        "F_ADD_SEALS",
        nix::fcntl::fcntl(
            &memfd,
            nix::fcntl::FcntlArg::F_ADD_SEALS(
                nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW,
            ),
        ),
    )?;
    // SAFETY: FFI; a shared mapping of the memfd just sized to 64 KiB.
    let shared = check("mmap memfd", unsafe {
        mmap(
            None,
            std::num::NonZeroUsize::new(1 << 16).unwrap(),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &memfd,
            0,
        )
    })?;
    // SAFETY: `shared` is a live 64 KiB read-write mapping.
    unsafe { shared.cast::<u8>().as_ptr().write_bytes(0xab, 1 << 16) };
    // SAFETY: FFI; unmapping the mapping made above, not used afterwards.
    check("munmap memfd", unsafe { munmap(shared, 1 << 16) })?;

    // The descriptor lane: the memfd over a socketpair with SCM_RIGHTS.
    let (left, right) = check(
        "socketpair",
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ),
    )?;
    let fds = [memfd.as_raw_fd()];
    check(
        "sendmsg",
        sendmsg::<()>(
            left.as_raw_fd(),
            &[IoSlice::new(b"fd")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        ),
    )?;
    let mut buf = [0u8; 2];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = check(
        "recvmsg",
        recvmsg::<()>(
            right.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ),
    )?;
    let mut received = None;
    for cmsg in check("cmsgs", msg.cmsgs())? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            // SAFETY: the kernel just installed this fd for us; we own it.
            received = fds.first().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    let received = received.ok_or("no fd received")?;
    // fstat (glibc: newfstatat AT_EMPTY_PATH) and File::metadata (statx AT_EMPTY_PATH).
    let stat = check("fstat", nix::sys::stat::fstat(received.as_fd()))?;
    if stat.st_size != 1 << 16 {
        return Err(format!("received memfd has size {}", stat.st_size));
    }
    let file = std::fs::File::from(received);
    let metadata = check("metadata", file.metadata())?;
    if metadata.len() != 1 << 16 {
        return Err(format!("metadata says {}", metadata.len()));
    }
    let _clone = check("try_clone", file.try_clone())?;

    // eventfd + epoll, as the vhost-user backend's threads use them.
    let eventfd = check(
        "eventfd",
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK),
    )?;
    let epoll = check("epoll_create1", Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC))?;
    check(
        "epoll_ctl",
        epoll.add(eventfd.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 7)),
    )?;
    let notifier = std::thread::spawn(move || eventfd.write(1).map(|_| eventfd));
    let eventfd = check("eventfd write", check("join", notifier.join())?)?;
    let mut events = [EpollEvent::empty(); 4];
    let n = check("epoll_wait", epoll.wait(&mut events, EpollTimeout::NONE))?;
    if n != 1 || events[0].data() != 7 {
        return Err(format!("epoll returned {n} events"));
    }
    check("eventfd read", eventfd.read())?;

    // Clocks and a mutex/condvar handshake (futex).
    let start = std::time::Instant::now();
    let pair = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let pair2 = pair.clone();
    let waker = std::thread::spawn(move || {
        *pair2.0.lock().unwrap() = true;
        pair2.1.notify_all();
    });
    let mut ready = pair.0.lock().unwrap();
    while !*ready {
        ready = pair.1.wait(ready).unwrap();
    }
    drop(ready);
    check("join waker", waker.join())?;
    let _ = start.elapsed();

    if role == Role::Frontend {
        // The frontend's listener is made non-blocking through ioctl(FIONBIO).
        let (a, _b) = check("UnixStream::pair", std::os::unix::net::UnixStream::pair())?;
        check("set_nonblocking", a.set_nonblocking(true))?;
    }
    Ok(())
}

/// Makes glibc shrink the heap of a thread's malloc arena: a new thread gets its own
/// arena, and freeing `total` bytes of blocks small enough to come from it makes `free`
/// trim the heap once the top exceeds the trim threshold. The first shrink in a process
/// reads `/proc/sys/vm/overcommit_memory`.
pub fn shrink_thread_arena(total: usize) -> Result<(), String> {
    std::thread::spawn(move || {
        let blocks: Vec<Vec<u8>> = (0..total / (96 << 10))
            .map(|i| vec![i as u8; 96 << 10])
            .collect();
        let sum: usize = blocks.iter().map(|b| b.len()).sum();
        blocks.into_iter().rev().for_each(drop);
        sum
    })
    .join()
    .map(|_| ())
    .map_err(|_| "arena thread panicked".to_string())
}

/// Raises glibc's dynamic mmap and trim thresholds, as a process that freed a large
/// buffer during set-up has them (freeing a mapped chunk of N bytes makes the mmap
/// threshold N and the trim threshold 2N).
pub fn raise_malloc_thresholds() {
    let big = vec![1u8; 20 << 20];
    std::hint::black_box(&big);
    drop(big);
}
