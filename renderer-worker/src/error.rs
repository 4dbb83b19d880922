//! Why the renderer-worker role stopped.

use protocol::ipc::RenderError;

/// A failure of the renderer-worker process as a whole (not of one request: those are
/// answered with a [`RenderError`] and the worker goes on).
#[derive(Debug, thiserror::Error)]
pub enum RendererError {
    /// The bootstrap the broker sent cannot be used.
    #[error("bad bootstrap: {0}")]
    Bootstrap(String),
    /// The renderer backend could not be built.
    #[error("renderer initialisation failed: {0}")]
    Init(#[source] RenderError),
    /// `--virgl` was asked for and cannot work here.
    #[error("--virgl: {0}")]
    Virgl(String),
    /// Hardening or the seccomp filter could not be applied.
    #[error("entering the sandbox failed: {0}")]
    Sandbox(#[from] policy::PolicyError),
    /// The request channel from the frontend broke (other than by being closed).
    #[error("request channel failed: {0}")]
    Requests(#[source] ipc_channel::IpcError),
    /// The status channel to the broker broke.
    #[error("status channel to the broker failed: {0}")]
    Broker(#[source] ipc_channel::IpcError),
}
