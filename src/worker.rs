//! The worker: takes exchanges off the capture queue, decodes them into
//! observations, and feeds the monitor, the label store and the sinks.
//!
//! For now it only counts what it receives, by protocol; decoding and aggregation
//! plug in behind the same `spawn`/`finish` interface. It never touches the proxy's
//! hot path: the queue is its only input.

use crate::capture::{CaptureReceiver, Protocol};
use crate::config::Config;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

/// The running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The task consuming the queue; it ends when the queue is empty and closed.
    task: JoinHandle<()>,
}

/// Starts the worker on the current runtime and registers its metrics.
pub fn spawn(config: Arc<Config>, mut receiver: CaptureReceiver, registry: &mut Registry) -> WorkerHandle {
    let received = Family::<ProtocolLabels, Counter>::default();
    registry.register("worker_exchanges_received", "Exchanges taken off the capture queue", received.clone());
    let task = tokio::spawn(async move {
        // Held for the decoders that read per-model settings.
        let _config = config;
        while let Some(exchange) = receiver.recv().await {
            let protocol = match exchange.protocol {
                Protocol::Grpc => "grpc",
                Protocol::Rest => "rest",
            };
            received.get_or_create(&ProtocolLabels { protocol }).inc();
        }
    });
    WorkerHandle { task }
}

impl WorkerHandle {
    /// Returns once every sender is gone and the queue is drained.
    pub async fn finish(self) {
        if let Err(error) = self.task.await {
            tracing::error!(message = "Worker task failed.", %error);
        }
    }
}
