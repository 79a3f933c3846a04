//! `serve`'s delivery: a task that runs a pass over the spool every `scan_interval`,
//! prunes past the retention every minute, and on shutdown makes one last pass over
//! what the engine wrote while stopping.

use prometheus_client::registry::Registry;
use std::io;
use std::path::Path;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{DeliveryError, Engine};
use crate::sinks::anodot::api::redacted;
use crate::sinks::anodot::{DeliveryMetrics, DeliverySettings, Persistence};

/// How often retention runs: deleting files is not urgent, and listing the spool for
/// it at every scan would double the directory reads.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// The long-running delivery of `serve`.
#[derive(Debug)]
pub struct Delivery;

impl Delivery {
    /// Registers the self-metrics and starts delivering `output_dir/anodot/` with the
    /// cursor in `output_dir/delivery/`. Call within a tokio runtime.
    pub fn spawn(settings: DeliverySettings, output_dir: &Path, registry: &mut Registry) -> io::Result<DeliveryHandle> {
        let metrics = DeliveryMetrics::default();
        metrics.register(registry);
        let engine = Engine::open(
            settings,
            &output_dir.join("anodot"),
            &output_dir.join("delivery"),
            metrics,
            Persistence::Forever,
        )?;
        Ok(Delivery::spawn_engine(engine))
    }

    /// Starts delivering with an engine already opened.
    pub fn spawn_engine(engine: Engine) -> DeliveryHandle {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(engine, stop.clone()));
        DeliveryHandle { stop, task }
    }
}

async fn run(mut engine: Engine, stop: CancellationToken) {
    info!(message = "Delivering to Anodot.", endpoint = %redacted(&engine.settings.endpoints.metrics),
          protocol = engine.settings.anodot.protocol.query_value());
    let scan = engine.settings.anodot.scan_interval;
    let mut next_prune = Instant::now();
    loop {
        let stopping = stop.is_cancelled();
        match engine.pass(&stop).await {
            Ok(_) | Err(DeliveryError::Stopped) => {}
            Err(e) => error!(message = "Delivery pass failed; trying again.", error = %e),
        }
        if Instant::now() >= next_prune {
            if let Err(e) = engine.prune() {
                warn!(message = "Pruning the spool failed.", error = %e);
            }
            next_prune = Instant::now() + PRUNE_INTERVAL;
        }
        // After a stop, one last pass has delivered what the engine wrote at shutdown.
        if stopping {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(scan) => {}
            _ = stop.cancelled() => {}
        }
    }
    info!(message = "Delivery stopped.");
}

/// Control of the running delivery.
#[derive(Debug)]
pub struct DeliveryHandle {
    /// Asks the task to finish: one last pass without retry waits.
    stop: CancellationToken,
    /// The delivery task, awaited (or aborted) by `finish`.
    task: JoinHandle<()>,
}

impl DeliveryHandle {
    /// Delivers what the spool holds now (no waiting on retries), then stops; after
    /// `grace` the task is aborted. Nothing is lost either way: the cursor is committed
    /// per request, and what is left goes out at the next start.
    pub async fn finish(mut self, grace: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            warn!(message = "Delivery did not finish within the shutdown grace; the rest goes at the next start.");
            self.task.abort();
        }
    }
}
