//! The spawner: a helper process that starts every replacement renderer-worker, on the
//! broker's request.
//!
//! Why it exists: after set-up the broker runs under a seccomp filter that allows no
//! process creation, and a filter is inherited across `clone` and `execve`; a renderer the
//! jailed broker started itself would carry the broker's filter on top of its own and die
//! setting itself up. The spawner is started before the broker jails itself and is never
//! filtered. It holds nothing but its channels to the broker: it reads one kind of request
//! ("start a renderer with these two descriptors"), starts the renderer as the broker's
//! child (`CLONE_PARENT`: the broker's supervision, reaping and parent-death signal stay as
//! they are), and answers with the pid and the renderer's hello. Neither the guest nor the
//! other children can reach it. The first renderer is started by the broker itself, at
//! the same time as the frontend; the spawner is started once the device is ready, before
//! the broker's jail, so that its exec is off the start-up's critical path. See
//! docs/renderer-restart.md.

use std::os::fd::{AsFd, OwnedFd};
use std::process::ExitCode;
use std::time::Duration;

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use policy::namespaces::NamespaceSet;
use protocol::bootstrap::{ChildHello, Role, DOORBELL_FD, LANE_FD};
use protocol::lane::{FdTicket, Lane};
use serde::{Deserialize, Serialize};

use crate::logger::{self, LOG_ENV};
use crate::spawn::{self, ChildProcess, Hello, Launch, HELLO_TIMEOUT};

/// The spawner's role name on the command line and in logs.
pub const SPAWNER_ROLE: &str = "spawner";

/// How long the broker waits for the spawner's answer: the renderer's own hello timeout,
/// plus the time to start it.
const ANSWER_TIMEOUT: Duration = HELLO_TIMEOUT.saturating_add(Duration::from_secs(10));

/// The spawner's first message to the broker.
#[derive(Debug, Serialize, Deserialize)]
pub struct SpawnerHello {
    pid: u32,
    bootstrap: IpcSender<SpawnerBootstrap>,
}

impl Hello for SpawnerHello {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn is(&self, name: &str) -> bool {
        name == SPAWNER_ROLE
    }
}

/// The spawner's channels.
#[derive(Debug, Serialize, Deserialize)]
struct SpawnerBootstrap {
    requests: IpcReceiver<SpawnRequest>,
    replies: IpcSender<SpawnReply>,
}

/// Start a renderer-worker with the two descriptors on the lane under `fds`: its end of
/// the descriptor lane to the frontend, and the doorbell.
#[derive(Debug, Serialize, Deserialize)]
struct SpawnRequest {
    fds: FdTicket,
}

#[derive(Debug, Serialize, Deserialize)]
enum SpawnReply {
    Started {
        pid: u32,
        hello: ChildHello,
        namespaces: String,
    },
    Failed {
        why: String,
    },
}

/// A renderer-worker the spawner started; the broker is its parent.
pub struct StartedRenderer {
    /// The process.
    pub child: ChildProcess,
    /// Its hello (with the sender for its bootstrap).
    pub hello: ChildHello,
    /// Which namespaces it got, for the log.
    pub namespaces: String,
}

/// A spawner started by [`Spawner::launch`], not yet wired.
pub struct PendingSpawner {
    pending: spawn::Pending<SpawnerHello>,
    lane: OwnedFd,
}

impl PendingSpawner {
    /// Waits (bounded) for the spawner's hello and gives it its channels.
    pub fn finish(self) -> Result<(Spawner, ChildProcess), String> {
        let spawned = self.pending.wait().map_err(|e| e.to_string())?;
        let mut child = spawned.child;
        let wired = (|| {
            let (requests, their_requests) = ipc::channel()?;
            let (their_replies, replies) = ipc::channel()?;
            spawned
                .hello
                .bootstrap
                .send(SpawnerBootstrap {
                    requests: their_requests,
                    replies: their_replies,
                })
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>((requests, replies))
        })();
        match wired {
            Ok((requests, replies)) => Ok((
                Spawner {
                    requests,
                    replies,
                    lane: Lane::new(self.lane),
                },
                child,
            )),
            Err(e) => {
                spawn::kill_and_reap(&mut child);
                Err(format!("wiring the spawner: {e}"))
            }
        }
    }
}

/// The broker's handle on the spawner.
pub struct Spawner {
    requests: IpcSender<SpawnRequest>,
    replies: IpcReceiver<SpawnReply>,
    lane: Lane,
}

impl Spawner {
    /// Starts the spawner (before the broker jails itself); [`PendingSpawner::finish`]
    /// waits for it. It gets no namespaces of its own: it must be able to give its
    /// renderers theirs, and as init of a pid namespace it could not use `CLONE_PARENT`.
    pub fn launch(
        log_level: log::LevelFilter,
        seccomp: Option<&str>,
    ) -> Result<PendingSpawner, String> {
        let (lane, theirs) =
            Lane::pair().map_err(|e| format!("creating the spawner's lane: {e}"))?;
        let theirs = spawn::lift_fd(theirs).map_err(|e| e.to_string())?;
        let pending = spawn::launch::<SpawnerHello>(&Launch {
            name: SPAWNER_ROLE,
            fds: &[(&theirs, LANE_FD)],
            log_level,
            seccomp,
            namespaces: NamespaceSet::NONE,
            sibling: false,
        })
        .map_err(|e| e.to_string())?;
        Ok(PendingSpawner { pending, lane })
    }

    /// Asks for a renderer-worker holding `lane_end` and `doorbell`, and waits (bounded)
    /// for it to have said hello.
    pub fn renderer(
        &self,
        lane_end: &OwnedFd,
        doorbell: &OwnedFd,
    ) -> Result<StartedRenderer, String> {
        let fds = self
            .lane
            .send(&[lane_end.as_fd(), doorbell.as_fd()])
            .map_err(|e| format!("handing the spawner the renderer's descriptors: {e}"))?;
        self.requests
            .send(SpawnRequest { fds })
            .map_err(|e| format!("asking the spawner for a renderer-worker: {e}"))?;
        match self.replies.try_recv_timeout(ANSWER_TIMEOUT) {
            Ok(SpawnReply::Started {
                pid,
                hello,
                namespaces,
            }) => Ok(StartedRenderer {
                child: ChildProcess::adopt(pid),
                hello,
                namespaces,
            }),
            Ok(SpawnReply::Failed { why }) => Err(why),
            Err(ipc_channel::TryRecvError::Empty) => Err(format!(
                "the spawner did not answer within {ANSWER_TIMEOUT:?}"
            )),
            Err(ipc_channel::TryRecvError::IpcError(e)) => {
                Err(format!("the spawner is gone ({e:?})"))
            }
        }
    }
}

/// The spawner role's main: serve the broker's requests until it goes away.
pub fn main(server: String) -> ExitCode {
    let level = std::env::var(LOG_ENV)
        .ok()
        .and_then(|l| logger::parse_level(&l).ok())
        .unwrap_or(log::LevelFilter::Info);
    logger::init(SPAWNER_ROLE, &logger::name_from_env(), level);
    let seccomp = std::env::var(policy::SECCOMP_ENV).ok();
    let boot = match bootstrap(server) {
        Ok(boot) => boot,
        Err(e) => {
            log::error!("bootstrap failed: {e}");
            return ExitCode::from(1);
        }
    };
    // SAFETY: the broker placed the lane at this fd number for this process alone.
    let lane = unsafe { Lane::from_raw_fd(LANE_FD) };
    while let Ok(request) = boot.requests.recv() {
        let reply = match start_renderer(&lane, request, level, seccomp.as_deref()) {
            Ok(started) => started,
            Err(why) => SpawnReply::Failed { why },
        };

        if boot.replies.send(reply).is_err() {
            break;
        }
    }
    // The broker closed its end: the device is over.
    ExitCode::SUCCESS
}

fn bootstrap(server: String) -> Result<SpawnerBootstrap, String> {
    let hello_tx: IpcSender<SpawnerHello> =
        IpcSender::connect(server).map_err(|e| format!("connecting to the broker: {e}"))?;
    let (tx, rx) = ipc::channel().map_err(|e| format!("creating a channel: {e}"))?;
    hello_tx
        .send(SpawnerHello {
            pid: policy::namespaces::pid_outside(),
            bootstrap: tx,
        })
        .map_err(|e| format!("sending hello: {e}"))?;
    rx.recv()
        .map_err(|e| format!("receiving the bootstrap: {e:?}"))
}

fn start_renderer(
    lane: &Lane,
    request: SpawnRequest,
    log_level: log::LevelFilter,
    seccomp: Option<&str>,
) -> Result<SpawnReply, String> {
    let fds = lane
        .recv(request.fds)
        .map_err(|e| format!("receiving the renderer's descriptors: {e}"))?;
    let [lane_end, doorbell]: [OwnedFd; 2] = fds
        .try_into()
        .map_err(|fds: Vec<_>| format!("{} descriptors instead of 2", fds.len()))?;
    let lift = |fd| spawn::lift_fd(fd).map_err(|e| e.to_string());
    let (lane_end, doorbell) = (lift(lane_end)?, lift(doorbell)?);
    let spawned = spawn::spawn::<ChildHello>(&Launch {
        sibling: true,
        ..Launch::role(
            Role::Renderer,
            &[(&lane_end, LANE_FD), (&doorbell, DOORBELL_FD)],
            log_level,
            seccomp,
        )
    })
    .map_err(|e| e.to_string())?;
    Ok(SpawnReply::Started {
        pid: spawned.child.id(),
        hello: spawned.hello,
        namespaces: spawned.namespaces,
    })
}
