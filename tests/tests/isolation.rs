//! Process isolation beyond seccomp. The children hold no capability at all, whatever user started the broker (root on this
//! machine kind): every set in /proc/PID/status is empty, the bounding set included, so
//! not even an exec (which seccomp forbids anyway) could bring one back.
//!
//! Each child has its own user, mount, pid, net and ipc namespaces, is pid 1 of its pid
//! namespace, and has an empty read-only root. Where the host refuses namespaces (here
//! played by a seccomp filter on the broker, as a container runtime's profile would), the
//! children still start with what is allowed and the broker's line for each says what it
//! got and what was refused.

mod common;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vgpu_tests::gpu::{format, Rect};
use vgpu_tests::{ProcessInfo, Role, Stack};

/// The five kinds, as named in /proc/PID/ns/.
const KINDS: [&str; 5] = ["user", "mnt", "pid", "net", "ipc"];
/// The broker's phrase for a child that got every namespace.
const ALL_OWN: &str = "own user, mount, pid, net and ipc namespace(s)";

fn cap_sets(pid: i32) -> Vec<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .filter_map(|l| {
            let (name, value) = l.split_once(':')?;
            Some((
                name.to_string(),
                u64::from_str_radix(value.trim(), 16).ok()?,
            ))
        })
        .collect()
}

#[test]
fn children_hold_no_capabilities() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("starting: {e}"));
    // Ready means both children are hardened and jailed.
    stack
        .wait_for_log("capabilities dropped", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("no child reported its capabilities dropped: {e}"));
    let children = children(&mut stack);
    for child in children {
        let sets = cap_sets(child.pid);
        for name in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let value = sets
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("{name} missing for {:?}", child.role));
            assert_eq!(
                value, 0,
                "{:?} (pid {}) {name} = {value:#x}",
                child.role, child.pid
            );
        }
    }
}

fn ns(pid: i32, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
}

/// The jailed children (the spawner is neither jailed nor namespaced: see
/// broker/src/spawner.rs).
fn children(stack: &mut Stack) -> Vec<ProcessInfo> {
    let children: Vec<_> = stack
        .processes()
        .into_iter()
        .filter(|p| p.role != Role::Broker && p.role != Role::Spawner)
        .collect();
    assert_eq!(children.len(), 2, "{children:?}\n{}", stack.log_text());
    children
}

/// The broker's start line for `child`, waited for (bounded) by its exact beginning.
fn start_line(stack: &Stack, child: &ProcessInfo) -> String {
    stack
        .wait_for_log(
            &format!("INFO started {} (pid {}): ", child.role, child.pid),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("no start line for {child:?}: {e}"))
}

/// `(pid in the reader's namespace .. pid in its own)` from the NSpid line.
fn nspid(pid: i32) -> Vec<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap_or_else(|| panic!("no NSpid in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().unwrap_or_else(|e| panic!("NSpid {n:?}: {e}")))
        .collect()
}

/// What a process's root holds, as seen from outside through /proc/PID/root.
fn root_entries(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/root: {e}"))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Mount points and file system types of the mount table `pid` sees.
fn mounts(pid: &str) -> Vec<(String, String, String)> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/mountinfo: {e}"));
    table
        .lines()
        .filter_map(|l| {
            // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let f: Vec<&str> = l.split_whitespace().collect();
            let dash = f.iter().position(|x| *x == "-")?;
            Some((
                f.get(4)?.to_string(),
                f.get(dash + 1)?.to_string(),
                f.get(5)?.to_string(),
            ))
        })
        .collect()
}

/// Asserts that none of the children's empty roots reached the host's mount table (the
/// test's own): mounted over /proc in a child's namespace, it would show up there if it
/// propagated.
fn assert_host_mounts_untouched() {
    let leaked: Vec<_> = mounts("self")
        .into_iter()
        .filter(|(point, fstype, _)| point == "/proc" && fstype == "tmpfs")
        .collect();
    assert!(leaked.is_empty(), "the host's mount table has {leaked:?}");
}

/// Asserts that `child`'s root is an empty read-only tmpfs and the only mount it sees.
fn assert_empty_root(child: &ProcessInfo) {
    let entries = root_entries(child.pid);
    assert!(entries.is_empty(), "{child:?} sees {entries:?} in its root");
    let table = mounts(&child.pid.to_string());
    assert_eq!(table.len(), 1, "{child:?} sees mounts {table:?}");
    let (point, fstype, options) = &table[0];
    assert_eq!(
        (point.as_str(), fstype.as_str()),
        ("/", "tmpfs"),
        "{table:?}"
    );
    assert!(
        options.split(',').any(|o| o == "ro"),
        "{child:?}'s root is not read-only: {options}"
    );
}

/// Every kind of namespace of each child differs from the broker's, the broker's line for
/// each child says so, and each child is pid 1 of its own pid namespace.
#[test]
fn children_have_their_own_user_mount_pid_net_and_ipc_namespaces() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("starting: {e}"));
    let broker = stack.pid();
    for child in children(&mut stack) {
        for kind in KINDS {
            assert_ne!(
                ns(child.pid, kind),
                ns(broker, kind),
                "{:?} shares the broker's {kind} namespace\n{}",
                child.role,
                stack.log_text()
            );
        }
        let line = start_line(&stack, &child);
        assert!(line.ends_with(ALL_OWN), "{line}");
        // Two levels: the pid the host sees, then 1 inside.
        assert_eq!(nspid(child.pid), vec![child.pid, 1], "{child:?}");
    }
}

/// Root inside each child's user namespace is the broker's user outside, and nothing
/// else is mapped; setgroups is denied.
#[test]
fn children_map_only_the_brokers_ids() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("starting: {e}"));
    // SAFETY: FFI; geteuid and getegid take no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    for child in children(&mut stack) {
        let read = |file: &str| {
            let text = std::fs::read_to_string(format!("/proc/{}/{file}", child.pid))
                .unwrap_or_else(|e| panic!("/proc/{}/{file}: {e}", child.pid));
            text.split_whitespace().collect::<Vec<_>>().join(" ")
        };
        assert_eq!(read("uid_map"), format!("0 {uid} 1"), "{child:?}");
        assert_eq!(read("gid_map"), format!("0 {gid} 1"), "{child:?}");
        assert_eq!(read("setgroups"), "deny", "{child:?}");
    }
}

/// After set-up each child's root is an empty read-only tmpfs and it sees no other mount;
/// nothing of that reached the broker's (and this test's) mount table.
#[test]
fn children_have_an_empty_read_only_root() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("starting: {e}"));
    // Ready means both children switched root, hardened and installed their filters.
    for child in children(&mut stack) {
        assert_empty_root(&child);
    }
    assert!(stack
        .log_text()
        .contains("root switched to an empty read-only tmpfs"));
    assert_host_mounts_untouched();
}

/// The device works inside all that: a frame drawn by the guest reaches the VMM.
fn assert_serves_a_frame(stack: &Stack) {
    let mut vmm = stack
        .connect()
        .unwrap_or_else(|e| panic!("connecting: {e}\n{}", stack.log_text()));
    let (w, h) = (64, 48);
    let pixels = common::image(w, h, 7);
    common::resource_with(&mut vmm, 1, format::B8G8R8X8_UNORM, w, h, &pixels);
    let full = Rect::new(0, 0, w, h);
    vmm.display().skip_to_end();
    common::ok("SET_SCANOUT", vmm.gpu().set_scanout(0, 1, full));
    common::ok("RESOURCE_FLUSH", vmm.gpu().resource_flush(1, full));
    vmm.display()
        .wait_for("the whole frame", common::WAIT, |e| {
            matches!(e, vgpu_tests::DisplayEvent::Update { width, height, .. }
                if (*width, *height) == (w, h))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.log_text()));
    let (_, _, fb) = vmm.display().framebuffer(0).expect("scanout 0 framebuffer");
    assert!(fb == pixels, "the frame differs from the guest's pixels");
}

/// A seccomp filter on the broker that answers `clone` and `unshare` with EPERM when any
/// flag of `refused` is set (and `clone3` with ENOSYS, so that glibc uses `clone`): what a
/// container runtime's default profile does to namespace creation.
fn refuse_namespaces(cmd: &mut Command, refused: u32) {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = vec![
        op(LD_W_ABS, 0, 0, 4), // arch
        op(JEQ_K, 0, 8, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, 0), // nr
        op(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        op(RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32),
        op(JEQ_K, 1, 0, libc::SYS_clone as u32),
        op(JEQ_K, 0, 3, libc::SYS_unshare as u32),
        op(LD_W_ABS, 0, 0, 16), // args[0], low half: the flags
        op(JSET_K, 0, 1, refused),
        op(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, RET_ALLOW),
    ];
    // SAFETY: runs between fork and exec; prctl only, on a program built before the fork
    // and kept alive by the closure.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts the broker with `--socket-path` in a fresh directory, `prepare`d first.
fn start_prepared(prepare: impl FnOnce(&mut Command, &std::path::Path)) -> Stack {
    let bin = vgpu_tests::stack::default_binary().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::Builder::new()
        .prefix("vgpu-sandbox-isolation")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"));
    let socket = dir.path().join("vgpu.sock");
    let mut cmd = Command::new(bin);
    cmd.arg("--socket-path").arg(&socket);
    prepare(&mut cmd, dir.path());
    Stack::start_command(cmd, dir, socket, true).unwrap_or_else(|e| panic!("starting: {e}"))
}

/// A host without user namespaces and a root broker: the children still get their own
/// mount (with an empty root), pid, net and ipc namespaces, and the broker says the user
/// namespace was refused. The empty root is made in a mount namespace that is not owned by
/// a user namespace of its own, so nothing may propagate back to the host's table.
#[test]
fn without_user_namespaces_a_root_broker_still_isolates_its_children() {
    let mut stack = start_prepared(|cmd, _| refuse_namespaces(cmd, libc::CLONE_NEWUSER as u32));
    let broker = stack.pid();
    for child in children(&mut stack) {
        assert_eq!(ns(child.pid, "user"), ns(broker, "user"), "{child:?}");
        for kind in ["mnt", "pid", "net", "ipc"] {
            assert_ne!(ns(child.pid, kind), ns(broker, kind), "{child:?} {kind}");
        }
        let line = start_line(&stack, &child);
        assert!(
            line.ends_with(
                "own mount, pid, net and ipc namespace(s); shares the broker's user \
                 namespace(s) (the host refused them: clone with user+mount+pid+net+ipc: \
                 EPERM)"
            ),
            "{line}"
        );
        assert_eq!(nspid(child.pid), vec![child.pid, 1], "{child:?}");
        assert_empty_root(&child);
    }
    assert_host_mounts_untouched();
    assert_serves_a_frame(&stack);
}

/// A host that refuses every namespace: the children start anyway, under seccomp, the
/// broker's line names each namespace as shared and why, each child warns that the host's
/// file system stays visible (and does not touch the root it shares with the broker), and
/// the device serves.
#[test]
fn when_the_host_refuses_every_namespace_the_children_start_and_the_broker_says_so() {
    let every = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC;
    let mut stack = start_prepared(|cmd, _| refuse_namespaces(cmd, every as u32));
    let broker = stack.pid();
    for child in children(&mut stack) {
        for kind in KINDS {
            assert_eq!(ns(child.pid, kind), ns(broker, kind), "{child:?} {kind}");
        }
        let line = start_line(&stack, &child);
        assert!(
            line.ends_with(
                "no namespace of its own; shares the broker's user, mount, pid, net and ipc \
                 namespace(s) (the host refused them: clone with user+mount+pid+net+ipc, \
                 mount+pid+net+ipc, net+ipc: EPERM)"
            ),
            "{line}"
        );
        assert_eq!(nspid(child.pid), vec![child.pid], "{child:?}");
        assert!(!root_entries(child.pid).is_empty(), "{child:?}");
        stack
            .wait_for_log(
                &format!(
                    " {} {}]: WARN no mount namespace of its own: the host's file system \
                     stays visible",
                    child.role, child.pid
                ),
                Duration::from_secs(5),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(status.contains("Seccomp:\t2"), "{child:?}: {status}");
    }
    assert_host_mounts_untouched();
    assert_serves_a_frame(&stack);
}

/// An unprivileged broker (nobody, no capability): through the user namespace its
/// children still get every namespace and an empty root, root inside being nobody outside.
/// Needs a host that lets unprivileged users create user namespaces, as this machine kind
/// does (`vgpu-sandbox check-host` run as that user says whether a host does).
#[test]
fn an_unprivileged_broker_still_gets_every_namespace() {
    const NOBODY: u32 = 65534;
    let mut stack = start_prepared(|cmd, dir| {
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY))
            .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
        cmd.uid(NOBODY).gid(NOBODY);
    });
    let broker = stack.pid();
    let status = std::fs::read_to_string(format!("/proc/{broker}/status")).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65534")),
        "the broker does not run as nobody: {status}"
    );
    for child in children(&mut stack) {
        for kind in KINDS {
            assert_ne!(ns(child.pid, kind), ns(broker, kind), "{child:?} {kind}");
        }
        let line = start_line(&stack, &child);
        assert!(line.ends_with(ALL_OWN), "{line}");
        let uid_map =
            std::fs::read_to_string(format!("/proc/{}/uid_map", child.pid)).expect("uid_map");
        assert_eq!(
            uid_map.split_whitespace().collect::<Vec<_>>(),
            ["0", "65534", "1"],
            "{child:?}"
        );
        assert_empty_root(&child);
    }
    assert_serves_a_frame(&stack);
}

/// Once its children run, the broker gives up its capabilities too (it only needed them
/// to create the children's namespaces).
#[test]
fn broker_drops_its_capabilities_after_set_up() {
    let stack = Stack::start(&[]).unwrap_or_else(|e| panic!("starting: {e}"));
    stack
        .wait_for_log("broker: seccomp filter installed", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the broker did not finish its set-up: {e}"));
    let sets = cap_sets(stack.pid());
    for name in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let value = sets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("{name} missing for the broker"));
        assert_eq!(value, 0, "broker {name} = {value:#x}");
    }
}

/// `check-host` tries the namespaces as the broker would, and names what the host
/// refused: here user namespaces, refused by a seccomp filter as above.
#[test]
fn check_host_names_the_namespaces_the_host_refuses() {
    let bin = vgpu_tests::stack::default_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(bin);
    cmd.arg("check-host");
    refuse_namespaces(&mut cmd, libc::CLONE_NEWUSER as u32);
    let out = cmd.output().unwrap_or_else(|e| panic!("check-host: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line:\n{stdout}"))
            .to_string()
    };
    let user = line("user-namespaces");
    assert!(
        user.starts_with(
            "user-namespaces: missing: refused (user, mount, pid, net and ipc at clone: EPERM"
        ),
        "{user}"
    );
    for name in ["mount-namespaces", "pid-namespaces", "net-ipc-namespaces"] {
        let l = line(name);
        assert!(l.starts_with(&format!("{name}: ok: ")), "{l}");
    }
}
