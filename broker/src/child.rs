//! The child side of the bootstrap: connect to the broker's one-shot server, say hello with
//! a sender for the bootstrap, receive it, and run the role.

use std::process::ExitCode;

use ipc_channel::ipc::{self, IpcSender};
use protocol::bootstrap::{ChildBootstrap, ChildHello, Role, BOOTSTRAP_FLAG, ROLE_FLAG};

use crate::logger;

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let level = std::env::var(logger::LOG_ENV)
        .ok()
        .and_then(|l| logger::parse_level(&l).ok())
        .unwrap_or(log::LevelFilter::Info);
    let (role, server) = match (args.get(1), args.get(2), args.get(3), args.get(4)) {
        (Some(f1), Some(role), Some(f2), Some(server))
            if f1 == ROLE_FLAG && f2 == BOOTSTRAP_FLAG =>
        {
            if role == crate::spawner::SPAWNER_ROLE {
                return crate::spawner::main(server.clone());
            }
            match Role::from_name(role) {
                Some(r) => (r, server.clone()),
                None => {
                    eprintln!("vgpu-sandbox: unknown internal role '{role}'");
                    return ExitCode::from(2);
                }
            }
        }
        _ => {
            eprintln!("vgpu-sandbox: {ROLE_FLAG} is internal: started by the broker only");
            return ExitCode::from(2);
        }
    };
    logger::init(role.name(), &logger::name_from_env(), level);
    match bootstrap(role, server) {
        Ok(boot) => {
            let result = match boot {
                ChildBootstrap::Frontend(b) if role == Role::Frontend => {
                    device_frontend::run(b).map_err(|e| e.to_string())
                }
                ChildBootstrap::Renderer(b) if role == Role::Renderer => {
                    renderer_worker::run(b).map_err(|e| e.to_string())
                }
                _ => Err("the broker sent the bootstrap of another role".into()),
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Err(e) => {
            log::error!("bootstrap failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn bootstrap(role: Role, server: String) -> Result<ChildBootstrap, String> {
    let hello_tx: IpcSender<ChildHello> =
        IpcSender::connect(server).map_err(|e| format!("connecting to the broker: {e}"))?;
    let (tx, rx) = ipc::channel().map_err(|e| format!("creating a channel: {e}"))?;
    hello_tx
        .send(ChildHello {
            role,
            // In a pid namespace of its own this process is pid 1; the broker knows it by
            // its pid outside.
            pid: policy::namespaces::pid_outside(),
            bootstrap: tx,
        })
        .map_err(|e| format!("sending hello: {e}"))?;
    rx.recv()
        .map_err(|e| format!("receiving the bootstrap: {e:?}"))
}
