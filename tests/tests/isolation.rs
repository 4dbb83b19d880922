//! Process isolation beyond seccomp. The children hold no capability at all, whatever user started the broker (root on this
//! machine kind): every set in /proc/PID/status is empty, the bounding set included, so
//! not even an exec (which seccomp forbids anyway) could bring one back.

use std::time::Duration;

use vgpu_tests::{Role, Stack};

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
    let children: Vec<_> = stack
        .processes()
        .into_iter()
        .filter(|p| p.role != Role::Broker)
        .collect();
    assert_eq!(children.len(), 2, "{children:?}");
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

/// Each child has its own network and IPC namespaces (this machine kind allows them; the
/// broker logs when a host does not).
#[test]
fn children_have_their_own_net_and_ipc_namespaces() {
    let mut stack = Stack::start(&[]).unwrap_or_else(|e| panic!("starting: {e}"));
    let procs = stack.processes();
    let broker = procs
        .iter()
        .find(|p| p.role == Role::Broker)
        .expect("the broker");
    let ns = |pid: i32, kind: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
    };
    for child in procs.iter().filter(|p| p.role != Role::Broker) {
        for kind in ["net", "ipc"] {
            assert_ne!(
                ns(child.pid, kind),
                ns(broker.pid, kind),
                "{:?} shares the broker's {kind} namespace",
                child.role
            );
        }
    }
    assert!(stack.log_text().contains("own net and ipc namespace(s)"));
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
