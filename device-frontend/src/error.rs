//! Errors of the device-frontend process.

use std::io;

use protocol::lane::LaneError;

/// Why the frontend stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The inherited vhost-user listener could not be used.
    #[error("vhost-user listener: {0}")]
    Listener(io::Error),
    /// The vhost-user daemon failed to start or serve.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// The renderer-worker went away while the device was running.
    #[error("renderer-worker disconnected")]
    RendererGone,
    /// Sending to the renderer failed.
    #[error("sending to the renderer-worker failed: {0}")]
    RendererSend(String),
    /// The descriptor lane failed.
    #[error("descriptor lane: {0}")]
    Lane(#[from] LaneError),
    /// Entering the sandbox failed.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// Talking to the broker failed.
    #[error("broker channel: {0}")]
    Broker(String),
    /// A worker thread could not be started.
    #[error("spawning the {0} thread failed: {1}")]
    Thread(&'static str, io::Error),
}
