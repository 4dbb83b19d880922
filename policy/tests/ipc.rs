//! ipc-channel under the role filters: its first use (which sizes fragments with a probe
//! socketpair and getsockopt), new channels, large fragmented messages, channels and shared
//! memory sent over channels, receiver sets and the router thread. Nothing of ipc-channel
//! is touched before the filter is installed in the child.

mod common;

use std::time::Duration;

use common::{assert_success, finish, jail, role, run_child};
use ipc_channel::ipc::{self, IpcReceiverSet, IpcSelectionResult, IpcSender, IpcSharedMemory};
use ipc_channel::router::ROUTER;
use vgpu_policy::{Role, ViolationAction};

const ROLES: [&str; 2] = ["device-frontend", "renderer-worker"];
/// Well over ipc-channel's single-fragment limit (the socket send buffer).
const LARGE: usize = 4 << 20;

#[test]
fn child_entry() {
    let Some(scenario) = common::child_scenario() else {
        return;
    };
    let parts: Vec<&str> = scenario.split(':').collect();
    match parts.as_slice() {
        ["ipc", r] => {
            jail(role(r), ViolationAction::Kill);
            finish(ipc_workload(role(r)))
        }
        _ => panic!("unknown scenario {scenario}"),
    }
}

fn err<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> String {
    move |e| format!("{what}: {e:?}")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn ipc_workload(_role: Role) -> Result<(), String> {
    // A new typed channel and a large message sent from another thread.
    let (tx, rx) = ipc::channel::<Vec<u8>>().map_err(err("channel"))?;
    let sender = std::thread::spawn(move || tx.send(pattern(LARGE)));
    let got = rx.recv().map_err(err("recv large"))?;
    sender
        .join()
        .map_err(err("join"))?
        .map_err(err("send large"))?;
    if got != pattern(LARGE) {
        return Err("large message corrupted".into());
    }

    // A channel end sent over a channel (SCM_RIGHTS), then used.
    let (outer_tx, outer_rx) = ipc::channel::<IpcSender<u32>>().map_err(err("outer"))?;
    let (inner_tx, inner_rx) = ipc::channel::<u32>().map_err(err("inner"))?;
    outer_tx.send(inner_tx).map_err(err("send sender"))?;
    let inner_tx = outer_rx.recv().map_err(err("recv sender"))?;
    inner_tx.send(7).map_err(err("send via passed sender"))?;
    if inner_rx.recv().map_err(err("recv via passed sender"))? != 7 {
        return Err("wrong value through passed sender".into());
    }

    // Shared memory (a memfd, mapped on both sides).
    let (shm_tx, shm_rx) = ipc::channel::<IpcSharedMemory>().map_err(err("shm channel"))?;
    shm_tx
        .send(IpcSharedMemory::from_bytes(&pattern(1 << 20)))
        .map_err(err("send shm"))?;
    let shm = shm_rx.recv().map_err(err("recv shm"))?;
    if *shm != pattern(1 << 20)[..] {
        return Err("shared memory corrupted".into());
    }

    // Bytes channel, non-blocking and timed receives.
    let (bytes_tx, bytes_rx) = ipc::bytes_channel().map_err(err("bytes_channel"))?;
    if bytes_rx.try_recv().is_ok() {
        return Err("try_recv on an empty channel succeeded".into());
    }
    bytes_tx
        .send(&pattern(300_000))
        .map_err(err("bytes send"))?;
    if bytes_rx.recv().map_err(err("bytes recv"))? != pattern(300_000) {
        return Err("bytes corrupted".into());
    }
    let (t_tx, t_rx) = ipc::channel::<u8>().map_err(err("timeout channel"))?;
    if t_rx.try_recv_timeout(Duration::from_millis(1)).is_ok() {
        return Err("try_recv_timeout on an empty channel succeeded".into());
    }
    t_tx.send(1).map_err(err("send"))?;
    t_rx.try_recv_timeout(Duration::from_secs(10))
        .map_err(err("try_recv_timeout"))?;

    // A receiver set (mio epoll inside).
    let (set_tx, set_rx) = ipc::channel::<u8>().map_err(err("set channel"))?;
    let mut set = IpcReceiverSet::new().map_err(err("IpcReceiverSet"))?;
    let id = set.add(set_rx).map_err(err("set add"))?;
    set_tx.send(9).map_err(err("set send"))?;
    let results = set.select().map_err(err("select"))?;
    match results.into_iter().next() {
        Some(IpcSelectionResult::MessageReceived(got_id, message)) if got_id == id => {
            if message.to::<u8>().map_err(err("decode"))? != 9 {
                return Err("wrong value from the set".into());
            }
        }
        other => return Err(format!("unexpected selection {other:?}")),
    }

    // The router thread (a receiver set on its own thread, woken by a channel).
    let (r_tx, r_rx) = ipc::channel::<u64>().map_err(err("router channel"))?;
    let routed = ROUTER.route_ipc_receiver_to_new_crossbeam_receiver::<u64>(r_rx);
    r_tx.send(11).map_err(err("router send"))?;
    if routed.recv().map_err(err("routed recv"))? != 11 {
        return Err("wrong value from the router".into());
    }
    Ok(())
}

#[test]
fn ipc_channel_works_under_each_role() {
    for role in ROLES {
        assert_success(&run_child(&format!("ipc:{role}")));
    }
}
