//! Process lifecycle: the processes and their roles, clean exits on SIGTERM and on VMM
//! disconnect, and a loud failure when a child dies for good (the renderer with restarts
//! off; its restart is `renderer_restart.rs`).

mod common;

use std::time::Duration;

use common::{start, WAIT};
use nix::sys::signal::Signal;
use vgpu_tests::stack::Role;
use vgpu_tests::Stack;

const EXIT: Duration = Duration::from_secs(10);

#[track_caller]
fn assert_nothing_left(stack: &mut Stack) {
    let left = stack.wait_all_gone(EXIT);
    assert!(
        left.is_empty(),
        "processes still alive after the broker exited: {left:?}\noutput:\n{}",
        stack.log_text()
    );
}

#[test]
fn four_processes_each_role_once_children_of_the_broker() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let procs = stack.processes();
    let broker = stack.pid();
    let count = |r: &Role| procs.iter().filter(|p| &p.role == r).count();
    assert_eq!(
        procs.len(),
        4,
        "expected broker + 3 children, got {procs:#?}"
    );
    assert_eq!(count(&Role::Broker), 1, "{procs:#?}");
    assert_eq!(count(&Role::DeviceFrontend), 1, "{procs:#?}");
    assert_eq!(count(&Role::RendererWorker), 1, "{procs:#?}");
    assert_eq!(count(&Role::Spawner), 1, "{procs:#?}");
    for p in procs.iter().filter(|p| p.role != Role::Broker) {
        assert_eq!(
            p.ppid, broker,
            "{} (pid {}) is not a child of the broker",
            p.role, p.pid
        );
    }
}

#[test]
fn sigterm_exits_zero_and_leaves_no_process() {
    let (mut stack, vmm) = start(&[]);
    let status = stack.terminate(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
    drop(vmm);
}

#[test]
fn sigterm_without_a_vmm_exits_zero() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let status = stack.terminate(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
}

#[test]
fn vmm_disconnect_exits_zero_and_leaves_no_process() {
    let (mut stack, mut vmm) = start(&[]);
    common::ok(
        "a command before disconnecting",
        vmm.gpu()
            .resource_create_2d(1, vgpu_tests::gpu::format::B8G8R8X8_UNORM, 8, 8),
    );
    let display = vmm.disconnect();
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after VMM disconnect: {status}\n{}",
        stack.log_text()
    );
    assert_nothing_left(&mut stack);
    display
        .wait_for("display socket closed by the backend", WAIT, |e| {
            matches!(e, vgpu_tests::DisplayEvent::Closed)
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

/// SIGKILLs the child of `role`: the broker must exit non-zero with a line naming it
/// (`named`), and nothing may be left.
fn killed_child_fails_the_broker(role: Role, named: &str, args: &[&str]) {
    let (mut stack, _vmm) = start(args);
    let child = stack
        .child_with_role(&role)
        .unwrap_or_else(|| panic!("no single {role:?} among {:#?}", stack.processes()));
    stack
        .signal_process(&child, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !status.success(),
        "broker exited successfully although its {role:?} was killed\n{}",
        stack.log_text()
    );
    // The broker's own report, by pid (the start-up line names both roles, so a bare
    // role name would always be found); waited for, as the output may still be in flight.
    let report = format!("{named} (pid {}) was killed by SIGKILL", child.pid);
    stack
        .wait_for_log(&report, EXIT)
        .unwrap_or_else(|e| panic!("no output line reports {report:?}: {e}"));
    assert_nothing_left(&mut stack);
}

#[test]
fn killed_renderer_makes_the_broker_fail_naming_it() {
    killed_child_fails_the_broker(
        Role::RendererWorker,
        "renderer-worker",
        &["--max-renderer-restarts", "0"],
    );
}

#[test]
fn killed_device_frontend_makes_the_broker_fail() {
    killed_child_fails_the_broker(Role::DeviceFrontend, "device-frontend", &[]);
}

/// Without its spawner no renderer could be replaced: the device stops, naming it, rather
/// than serve on with no way to survive a renderer's death.
#[test]
fn killed_spawner_makes_the_broker_fail_naming_it() {
    killed_child_fails_the_broker(Role::Spawner, "spawner", &[]);
}

// ---------------------------------------------------------------- broker killed, sandboxing

/// Bound on a process disappearing once it has been told to (signal, PDEATHSIG).
const GONE: Duration = Duration::from_secs(10);

fn status_field(pid: i32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
        .map(|v| v.trim().to_string())
}

/// The broker gets SIGKILL and cannot clean up: its children must still go, through their
/// PR_SET_PDEATHSIG. They are re-parented to init (or the nearest subreaper), which may not
/// reap them at once, so "gone" means /proc/<pid> vanished, is another process (start time
/// differs), or is in state Z (dead, waiting to be reaped); [`vgpu_tests::stack::wait_gone`]
/// and [`vgpu_tests::stack::is_alive`] implement exactly that.
#[test]
fn broker_killed_with_sigkill_takes_every_child_with_it() {
    let (mut stack, vmm) = start(&[]);
    let frontend = stack.expect_child(&Role::DeviceFrontend);
    let renderer = stack.expect_child(&Role::RendererWorker);
    let spawner = stack.expect_child(&Role::Spawner);
    stack
        .signal(Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "broker status: {status}"
    );
    for child in [&frontend, &renderer, &spawner] {
        assert!(
            vgpu_tests::stack::wait_gone(child, GONE),
            "{} (pid {}) still alive {GONE:?} after its broker was SIGKILLed (state {:?}, \
             parent {:?}): PR_SET_PDEATHSIG did not take it down\n{}",
            child.role,
            child.pid,
            status_field(child.pid, "State"),
            status_field(child.pid, "PPid"),
            stack.log_text()
        );
    }
    drop(vmm);
}

/// All three processes run under a seccomp filter (mode 2) with no_new_privs: each child
/// before it reads untrusted bytes, the broker once its children run (its own filter: one
/// more than the test process has).
#[test]
fn every_process_is_seccomp_filtered() {
    let (mut stack, mut vmm) = start(&[]);
    // After a command went through, both children have read untrusted bytes: their
    // filters must be in place by now. The broker installs its own right after reporting
    // ready, so wait for its line.
    common::still_works(&mut vmm, "set-up");
    stack
        .wait_for_log("broker: seccomp filter installed", EXIT)
        .unwrap_or_else(|e| panic!("the broker did not install its filter: {e}"));
    for role in [Role::DeviceFrontend, Role::RendererWorker] {
        let p = stack
            .child_with_role(&role)
            .unwrap_or_else(|| panic!("no single {role} among {:#?}", stack.processes()));
        assert_eq!(
            status_field(p.pid, "Seccomp").as_deref(),
            Some("2"),
            "{role} (pid {}) Seccomp mode",
            p.pid
        );
        assert_eq!(
            status_field(p.pid, "NoNewPrivs").as_deref(),
            Some("1"),
            "{role} (pid {}) NoNewPrivs",
            p.pid
        );
    }
    let broker = stack.pid();
    assert_eq!(status_field(broker, "Seccomp").as_deref(), Some("2"));
    assert_eq!(status_field(broker, "NoNewPrivs").as_deref(), Some("1"));
    let own_filters: u32 = status_field(std::process::id() as i32, "Seccomp_filters")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let broker_filters: u32 = status_field(broker, "Seccomp_filters")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert_eq!(
        broker_filters,
        own_filters + 1,
        "the broker (pid {broker}) should add exactly its own filter"
    );
}

/// Socket inodes of a process's open fds (`socket:[N]` links in /proc/<pid>/fd).
fn socket_inodes(pid: i32) -> Vec<(String, u64)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"));
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy().into_owned();
        if let Some(n) = t
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            out.push((e.file_name().to_string_lossy().into_owned(), n));
        }
    }
    out
}

/// Unix sockets of the network namespace `pid` is in: (inode, listening, path).
fn unix_sockets(pid: i32) -> Vec<(u64, bool, String)> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/unix"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/net/unix: {e}"));
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // Num RefCount Protocol Flags Type St Inode [Path]
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(6)?.parse().ok()?;
            let path = f.get(7).map(|p| p.to_string()).unwrap_or_default();
            Some((inode, flags & 0x0001_0000 != 0, path))
        })
        .collect()
}

/// The renderer never sees the VMM's socket: neither the listener the frontend inherited
/// (fd 4) nor the accepted connection, and it holds no listening socket at all.
#[test]
fn renderer_holds_neither_the_listener_nor_the_vmm_connection() {
    let mut stack =
        vgpu_tests::Stack::start(&["--output", "320x200"]).unwrap_or_else(|e| panic!("{e}"));
    let frontend = stack.expect_child(&Role::DeviceFrontend);
    let renderer = stack.expect_child(&Role::RendererWorker);
    let fe_sockets = socket_inodes(frontend.pid);
    let listener = fe_sockets
        .iter()
        .find(|(fd, _)| fd == "4")
        .map(|(_, ino)| *ino)
        .unwrap_or_else(|| {
            panic!("the frontend has no socket at fd 4 (its listener): {fe_sockets:?}")
        });
    let mut vmm = stack.connect().unwrap_or_else(|e| panic!("{e}"));
    draw_one_frame(&mut vmm, 1, 21);

    let socket_path = stack.socket_path().to_string_lossy().into_owned();
    // The VMM's sockets live in the broker's network namespace (the renderer has its own,
    // whose table lists only its own sockets): look at both.
    let mut table = unix_sockets(stack.pid());
    table.extend(unix_sockets(renderer.pid));
    // Sockets bound to (listening on) or accepted from the VMM's path, plus fd 4.
    let vmm_side: Vec<u64> = table
        .iter()
        .filter(|(_, _, p)| *p == socket_path)
        .map(|(ino, _, _)| *ino)
        .collect();
    assert!(
        vmm_side.contains(&listener),
        "the frontend's fd 4 (inode {listener}) is not the socket bound to {socket_path}: \
         sockets on that path {vmm_side:?}"
    );
    assert!(
        vmm_side.len() >= 2,
        "expected the listener and the accepted VMM connection on {socket_path}, got {vmm_side:?}"
    );
    let listening: Vec<u64> = table
        .iter()
        .filter(|(_, l, _)| *l)
        .map(|(ino, _, _)| *ino)
        .collect();
    let re_sockets = socket_inodes(renderer.pid);
    for (fd, ino) in &re_sockets {
        assert!(
            !vmm_side.contains(ino),
            "renderer-worker fd {fd} is the VMM's socket (inode {ino}; listener {listener}, \
             sockets on {socket_path}: {vmm_side:?})"
        );
        assert!(
            !listening.contains(ino),
            "renderer-worker fd {fd} is a listening socket (inode {ino})"
        );
    }
    assert!(
        !re_sockets.is_empty(),
        "the renderer has no sockets at all, so the check above proved nothing"
    );
}

// ---------------------------------------------------------------- device reset

fn draw_one_frame(vmm: &mut vgpu_tests::TestVmm, id: u32, seed: u32) {
    use vgpu_tests::gpu::{format, Rect};
    let (w, h) = (320, 200);
    let pixels = common::image(w, h, seed);
    common::resource_with(vmm, id, format::B8G8R8X8_UNORM, w, h, &pixels);
    let full = Rect::new(0, 0, w, h);
    vmm.display().skip_to_end();
    common::ok("SET_SCANOUT", vmm.gpu().set_scanout(0, id, full));
    common::ok("RESOURCE_FLUSH", vmm.gpu().resource_flush(id, full));
    vmm.display()
        .wait_for("VHOST_USER_GPU_UPDATE of the whole frame", WAIT, |e| {
            matches!(e, vgpu_tests::DisplayEvent::Update { scanout_id: 0, x: 0, y: 0, width, height, .. }
                if (*width, *height) == (w, h))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (fw, fh, fb) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert_eq!((fw, fh), (w, h), "framebuffer size");
    if let Some(d) = vgpu_tests::scenario::first_difference(&fb, &pixels, w) {
        panic!("resource {id}: guest bytes vs UPDATE bytes: {d}");
    }
    common::no_violations(vmm);
}

/// What QEMU does on a virtio reset of a vhost-user device, then the driver's re-init:
/// stop the rings (GET_VRING_BASE), VHOST_USER_RESET_DEVICE, then as on start: SET_FEATURES,
/// SET_MEM_TABLE, and fresh rings (NUM, ADDR, BASE 0, CALL, KICK, ENABLE) driven by a new
/// driver. The test VMM does not ack RESET_DEVICE at connect, so it is acked here first.
fn reset_and_reinit(vmm: &mut vgpu_tests::TestVmm) {
    use vgpu_tests::virtqueue::SplitQueue;
    use vgpu_tests::vmm::{NUM_QUEUES, VIRTIO_RING_F_EVENT_IDX};
    use vgpu_tests::GpuDriver;
    use vhost::vhost_user::{VhostUserFrontend, VhostUserProtocolFeatures};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

    let queue_size = vgpu_tests::VmmOptions::default().queue_size;
    let timeout = vmm.gpu().timeout();
    let acked = vmm.acked_features();
    let proto = vmm.protocol_features();
    let mem = vmm.memory().clone();
    let fe = vmm.frontend();
    let offered = fe
        .get_protocol_features()
        .unwrap_or_else(|e| panic!("GET_PROTOCOL_FEATURES: {e}"));
    assert!(
        offered.contains(VhostUserProtocolFeatures::RESET_DEVICE),
        "the backend does not offer RESET_DEVICE (offered {offered:?})"
    );
    fe.set_protocol_features(proto | VhostUserProtocolFeatures::RESET_DEVICE)
        .unwrap_or_else(|e| panic!("SET_PROTOCOL_FEATURES with RESET_DEVICE: {e}"));
    for q in 0..NUM_QUEUES {
        fe.get_vring_base(q)
            .unwrap_or_else(|e| panic!("GET_VRING_BASE {q} (stopping the ring): {e}"));
    }
    fe.reset_device()
        .unwrap_or_else(|e| panic!("VHOST_USER_RESET_DEVICE: {e}"));
    fe.set_features(acked)
        .unwrap_or_else(|e| panic!("SET_FEATURES after reset: {e}"));
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: mem.base(),
        memory_size: mem.size(),
        userspace_addr: mem.host_base(),
        mmap_offset: mem.region_offset(),
        mmap_handle: mem.fd(),
    };
    fe.set_mem_table(&[region])
        .unwrap_or_else(|e| panic!("SET_MEM_TABLE after reset: {e}"));
    let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
    let mut queues = Vec::new();
    for index in 0..NUM_QUEUES {
        let q = SplitQueue::new(mem.clone(), index as u16, queue_size, event_idx)
            .unwrap_or_else(|e| panic!("queue {index}: {e}"));
        let a = q.addrs();
        let cfg = VringConfigData {
            queue_max_size: queue_size,
            queue_size,
            flags: 0,
            desc_table_addr: mem.host_address(a.desc).unwrap(),
            used_ring_addr: mem.host_address(a.used).unwrap(),
            avail_ring_addr: mem.host_address(a.avail).unwrap(),
            log_addr: None,
        };
        let what = |op: &str, e: vhost::Error| panic!("{op} {index} after reset: {e}");
        fe.set_vring_num(index, queue_size)
            .unwrap_or_else(|e| what("SET_VRING_NUM", e));
        fe.set_vring_addr(index, &cfg)
            .unwrap_or_else(|e| what("SET_VRING_ADDR", e));
        fe.set_vring_base(index, 0)
            .unwrap_or_else(|e| what("SET_VRING_BASE", e));
        fe.set_vring_call(index, q.call_fd())
            .unwrap_or_else(|e| what("SET_VRING_CALL", e));
        fe.set_vring_kick(index, q.kick_fd())
            .unwrap_or_else(|e| what("SET_VRING_KICK", e));
        fe.set_vring_enable(index, true)
            .unwrap_or_else(|e| what("SET_VRING_ENABLE", e));
        queues.push(q);
    }
    let cursor = queues.pop().unwrap();
    let control = queues.pop().unwrap();
    *vmm.gpu() = GpuDriver::new(mem, control, cursor, timeout)
        .unwrap_or_else(|e| panic!("new driver after reset: {e}"));
}

/// VHOST_USER_RESET_DEVICE drops every resource: an id used before the reset can be
/// created again afterwards, and frames still draw with exact pixels.
#[test]
fn device_reset_drops_resources_and_the_device_serves_again() {
    let (stack, mut vmm) = start(&["--output", "320x200"]);
    draw_one_frame(&mut vmm, 1, 31);
    common::ok(
        "RESOURCE_CREATE_2D 2 before reset",
        vmm.gpu()
            .resource_create_2d(2, vgpu_tests::gpu::format::B8G8R8X8_UNORM, 16, 16),
    );
    // Without a reset, the id is taken.
    common::expect(
        "RESOURCE_CREATE_2D 2 again before reset",
        vmm.gpu()
            .resource_create_2d(2, vgpu_tests::gpu::format::B8G8R8X8_UNORM, 16, 16),
        vgpu_tests::gpu::resp::ERR_INVALID_RESOURCE_ID,
    );
    reset_and_reinit(&mut vmm);
    common::ok(
        "RESOURCE_CREATE_2D 2 after reset (must have been dropped)",
        vmm.gpu()
            .resource_create_2d(2, vgpu_tests::gpu::format::B8G8R8X8_UNORM, 16, 16),
    );
    // Resource 1 was the scanout's: it must be gone too, and the new one draws exactly.
    draw_one_frame(&mut vmm, 1, 32);
    common::still_works(&mut vmm, "a device reset");
    assert!(
        stack.log_lines().iter().all(|l| !l.contains("ERROR")),
        "errors logged around the reset:\n{}",
        stack.log_text()
    );
}

// ---------------------------------------------------------------- renderer dies mid-stream

/// With restarts off, the renderer is SIGKILLed while the guest keeps submitting commands:
/// the broker exits non-zero naming the renderer-worker, and no process of the stack is
/// left.
#[test]
fn renderer_killed_mid_stream_fails_the_broker_naming_it() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use vgpu_tests::gpu::{format, Rect};

    let (mut stack, mut vmm) = start(&["--output", "320x200", "--max-renderer-restarts", "0"]);
    let (w, h) = (320, 200);
    common::resource_with(
        &mut vmm,
        1,
        format::B8G8R8X8_UNORM,
        w,
        h,
        &common::image(w, h, 41),
    );
    let full = Rect::new(0, 0, w, h);
    common::ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 1, full));
    // Once the renderer is gone, a command may never be answered: keep that wait short.
    vmm.gpu().set_timeout(Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<u64>();
    let stop2 = stop.clone();
    let guest = std::thread::spawn(move || {
        let mut rounds = 0u64;
        let end = loop {
            if stop2.load(Ordering::Relaxed) {
                break "stopped".to_string();
            }
            let r = vmm
                .gpu()
                .transfer_to_host_2d(1, full, 0)
                .and_then(|_| vmm.gpu().resource_flush(1, full));
            match r {
                Ok(_) => {
                    rounds += 1;
                    let _ = tx.send(rounds);
                }
                Err(e) => break e.to_string(),
            }
        };
        (rounds, end, vmm)
    });
    // Let the stream get going: a few rounds answered.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) if n >= 5 => break,
            Ok(_) => {}
            Err(e) => panic!(
                "the guest did not get 5 rounds answered within {WAIT:?} ({e})\n{}",
                stack.log_text()
            ),
        }
    }
    let renderer = stack.expect_child(&Role::RendererWorker);
    stack
        .signal_process(&renderer, Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("{e}"));
    let status = stack.wait_exit(EXIT).unwrap_or_else(|e| panic!("{e}"));
    stop.store(true, Ordering::Relaxed);
    assert!(
        !status.success(),
        "broker exited successfully although its renderer was killed mid-stream\n{}",
        stack.log_text()
    );
    let report = format!(
        "renderer-worker (pid {}) was killed by SIGKILL",
        renderer.pid
    );
    stack
        .wait_for_log(&report, EXIT)
        .unwrap_or_else(|e| panic!("no output line reports {report:?}: {e}"));
    assert_nothing_left(&mut stack);
    let (rounds, end, _vmm) = guest.join().expect("guest thread panicked");
    eprintln!("guest loop: {rounds} rounds answered, then: {end}");
}
