//! mltap itself inside the demo: binds its listeners and runs the same composition as
//! `mltap serve` (`app::run`) in-process, with a stop handle instead of signals.
//!
//! It composes only; it never changes what `serve` does.

use crate::app::{self, Listeners, ServeError};
use crate::config::Config;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the running mltap listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// gRPC listener (clients call this instead of TF Serving's gRPC port).
    pub grpc: SocketAddr,
    /// REST listener (instead of TF Serving's REST port).
    pub rest: SocketAddr,
    /// Admin server: dashboard, `/metrics`, `/v1/labels`.
    pub admin: SocketAddr,
}

/// A running mltap.
#[derive(Debug)]
pub struct RunningMltap {
    /// The bound addresses (port 0 in the config becomes the real port here).
    pub addresses: Addresses,
    /// Tells `app::run` to shut down.
    stop: CancellationToken,
    /// `app::run`, to await its graceful shutdown.
    task: JoinHandle<Result<(), ServeError>>,
}

/// Binds mltap's listeners and starts it; a bind failure is a configuration error
/// (exit code 2), already printed.
pub async fn start(config: Config) -> Result<RunningMltap, ExitCode> {
    let listeners = match Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("mltap: {error}");
            return Err(ExitCode::from(crate::units::EXIT_CONFIG));
        }
    };
    let address =
        |listener: &tokio::net::TcpListener| listener.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let addresses =
        Addresses { grpc: address(&listeners.grpc), rest: address(&listeners.rest), admin: address(&listeners.admin) };
    let stop = CancellationToken::new();
    let task = tokio::spawn(app::run(Arc::new(config), listeners, Vec::new(), stop.clone().cancelled_owned()));
    Ok(RunningMltap { addresses, stop, task })
}

impl RunningMltap {
    /// Shuts mltap down gracefully (in-flight exchanges finish, buckets are flushed).
    pub async fn stop(self) -> Result<(), String> {
        self.stop.cancel();
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(format!("mltap stopped abnormally: {error}")),
        }
    }
}
