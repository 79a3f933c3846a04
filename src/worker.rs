//! The worker: takes exchanges off the capture queue, decodes them into
//! observations, and feeds the monitor, the label store and the sinks.
//!
//! For now it only counts what it receives, by protocol; decoding and aggregation
//! plug in behind the same `spawn`/`finish` interface. It never touches the proxy's
//! hot path: the queue is its only input.
//!
//! It takes exchanges in batches on a short tick instead of awaiting each one: a
//! receiver parked in `recv` makes every `offer` on the hot path wake a thread of
//! another runtime (a futex or eventfd write per exchange), which measurably costs
//! proxy throughput. Only at shutdown does it await the queue to its end.

use crate::capture::{CaptureReceiver, Exchange, Protocol};
use crate::config::Config;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

/// How often the worker takes what has queued up.
const BATCH_TICK: Duration = Duration::from_millis(20);

/// The running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// The task consuming the queue; it ends when the queue is empty and closed.
    task: JoinHandle<()>,
    /// Tells the task to await the queue to its end instead of ticking.
    finishing: oneshot::Sender<()>,
}

/// Starts the worker on the current runtime and registers its metrics.
pub fn spawn(config: Arc<Config>, mut receiver: CaptureReceiver, registry: &mut Registry) -> WorkerHandle {
    let received = Family::<ProtocolLabels, Counter>::default();
    registry.register("worker_exchanges_received", "Exchanges taken off the capture queue", received.clone());
    let (finishing, mut finish_requested) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // Held for the decoders that read per-model settings.
        let _config = config;
        let count = |exchange: Exchange| {
            let protocol = match exchange.protocol {
                Protocol::Grpc => "grpc",
                Protocol::Rest => "rest",
            };
            received.get_or_create(&ProtocolLabels { protocol }).inc();
        };
        let mut tick = tokio::time::interval(BATCH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    while let Some(exchange) = receiver.try_recv() {
                        count(exchange);
                    }
                }
                _ = &mut finish_requested => break,
            }
        }
        while let Some(exchange) = receiver.recv().await {
            count(exchange);
        }
    });
    WorkerHandle { task, finishing }
}

impl WorkerHandle {
    /// Returns once every sender is gone and the queue is drained.
    pub async fn finish(self) {
        let _ = self.finishing.send(());
        if let Err(error) = self.task.await {
            tracing::error!(message = "Worker task failed.", %error);
        }
    }
}
