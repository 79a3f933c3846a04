//! Connects the label service to the running worker: every decoded observation is
//! recorded in the join store, and every bucket whose label horizon has passed gets
//! its label points appended to its Anodot file (and shown on the dashboard).
//!
//! The worker's listeners run on its monitor thread and must never wait: there each
//! observation is reduced to what the store keeps (`LabelService::prepare`: one
//! record per exchange, no features), gathered for the batch of exchanges the monitor
//! thread is feeding, and the batch crosses to an async task over a bounded channel in
//! one hand-off (one wake-up of the task per batch, not per exchange); when that
//! channel is full the batch is not recorded and `label_record_dropped` counts its
//! observations. The task writes whatever queued up meanwhile in one store call, so a
//! busy worker gets large transactions.

use crate::admin::history::History;
use crate::labels::{LabelService, PreparedRecord};
use crate::sinks::files::FileSink;
use crate::sinks::prometheus::ModelGauges;
use crate::tfserving::Observation;
use crate::worker::ObservationListener;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;

/// Batches of prepared observations waiting to be recorded (a few hundred bytes
/// each, at most `FEED_BATCH` per batch, so at most 8192 and about 6 MiB of 64-row
/// binary exchanges); beyond it they are dropped and counted. Holds half a second of
/// 64-row exchanges at 1 M rows/s when the worker hands over full batches: a tick's
/// durable commit at saturation can outlast even that (`label_record_dropped` 1 013
/// in ten minutes of saturation with 64 batches, 66 with 128; BENCHMARKS.md).
const PENDING_BATCHES: usize = 128;
/// Prepared observations gathered before they are handed on, whatever the batch.
const FEED_BATCH: usize = 64;
/// Prepared observations written in one store call at most.
const RECORD_CHUNK: usize = 512;
/// How often buckets past their label horizon are looked for.
const DUE_TICK: Duration = Duration::from_secs(1);

/// The worker-side end: prepares each observation's record, gathers them for the
/// monitor thread's batch, and hands the batch to the recording task without waiting.
struct ObservationFeed {
    /// Turns observations into records (and names their streams).
    labels: Arc<LabelService>,
    /// Records prepared since the last hand-off (monitor threads share it).
    gathered: std::sync::Mutex<Vec<PreparedRecord>>,
    /// To the recording task.
    tx: mpsc::Sender<Vec<PreparedRecord>>,
    /// Observations not recorded because the task fell behind.
    dropped: Counter,
}

impl ObservationFeed {
    fn new(labels: Arc<LabelService>, tx: mpsc::Sender<Vec<PreparedRecord>>, dropped: Counter) -> ObservationFeed {
        ObservationFeed { labels, gathered: std::sync::Mutex::new(Vec::new()), tx, dropped }
    }

    /// Hands what was gathered to the recording task, or counts it dropped.
    fn hand_on(&self, gathered: Vec<PreparedRecord>) {
        if gathered.is_empty() {
            return;
        }
        if let Err(refused) = self.tx.try_send(gathered) {
            self.dropped.inc_by(refused.into_inner().len() as u64);
        }
    }
}

impl ObservationListener for ObservationFeed {
    fn on_observation(&self, observation: &Arc<Observation>, bucket_start: i64) {
        if observation.probabilities.is_none() && observation.regression.is_none() {
            return;
        }
        // The record holds the ids and probabilities (or predictions) only: queueing the observation
        // itself would keep its feature columns (50 KiB for 64 rows × 100 features)
        // alive for every queued entry.
        let Some(prepared) = self.labels.prepare(observation, bucket_start) else { return };
        let full = {
            let mut gathered = self.gathered.lock().unwrap_or_else(|p| p.into_inner());
            gathered.push(prepared);
            (gathered.len() >= FEED_BATCH).then(|| std::mem::take(&mut *gathered))
        };
        if let Some(full) = full {
            self.hand_on(full);
        }
    }

    fn on_batch_end(&self) {
        let gathered = std::mem::take(&mut *self.gathered.lock().unwrap_or_else(|p| p.into_inner()));
        self.hand_on(gathered);
    }
}

/// Records a batch of prepared observations and whatever else is queued, in one
/// store call.
async fn record_queued(
    labels: &LabelService,
    first: Vec<PreparedRecord>,
    rx: &mut mpsc::Receiver<Vec<PreparedRecord>>,
) {
    let mut chunk = first;
    while chunk.len() < RECORD_CHUNK {
        match rx.try_recv() {
            Ok(more) => chunk.extend(more),
            Err(_) => break,
        }
    }
    if let Err(error) = labels.record_all(chunk).await {
        warn!(message = "Predictions could not be recorded for labels.", %error);
    }
}

/// The running link; `finish` stores what is pending and stops it.
pub struct LabelLink {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl LabelLink {
    /// Attaches the label service to a worker's hooks and starts the recording and
    /// emission task.
    pub fn spawn(
        labels: Arc<LabelService>,
        hooks: &crate::worker::Hooks,
        files: FileSink,
        history: Option<Arc<History>>,
        gauges: Option<ModelGauges>,
        registry: &mut Registry,
    ) -> LabelLink {
        Self::spawn_counted(labels, hooks, files, history, gauges, Self::register_dropped(registry))
    }

    /// Registers the count of observations not recorded because recording fell
    /// behind, for `spawn_counted`.
    pub fn register_dropped(registry: &mut Registry) -> Counter {
        let dropped = Counter::default();
        registry.register(
            "label_record_dropped",
            "Observations not recorded for labels because recording fell behind",
            dropped.clone(),
        );
        dropped
    }

    /// `spawn`, counting into a counter registered beforehand (`register_dropped`).
    pub fn spawn_counted(
        labels: Arc<LabelService>,
        hooks: &crate::worker::Hooks,
        files: FileSink,
        history: Option<Arc<History>>,
        gauges: Option<ModelGauges>,
        dropped: Counter,
    ) -> LabelLink {
        let (tx, mut rx) = mpsc::channel(PENDING_BATCHES);
        hooks.add_observation_listener(Arc::new(ObservationFeed::new(labels.clone(), tx, dropped)));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(DUE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    received = rx.recv() => match received {
                        Some(prepared) => record_queued(&labels, prepared, &mut rx).await,
                        None => break,
                    },
                    _ = tick.tick() => emit_due(&labels, &files, history.as_deref(), gauges.as_ref()).await,
                    _ = stopped.changed() => break,
                }
            }
            while let Ok(prepared) = rx.try_recv() {
                record_queued(&labels, prepared, &mut rx).await;
            }
            if let Err(error) = labels.flush().await {
                warn!(message = "Recorded predictions could not be flushed to the label store.", %error);
            }
            emit_due(&labels, &files, history.as_deref(), gauges.as_ref()).await;
        });
        LabelLink { task, stop }
    }

    /// Records what is pending, emits what is due, and stops.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn confirm(labels: &LabelService, claimed: Vec<crate::labels::record::BucketId>) {
    if let Err(error) = labels.confirm(claimed).await {
        // The lease ends and another replica (or this one) emits the bucket again.
        warn!(message = "Label buckets written could not be confirmed in the label store.", %error);
    }
}

/// Appends the label points of every bucket past its horizon to that bucket's file,
/// and shows them on the dashboard and `/metrics`.
async fn emit_due(labels: &LabelService, files: &FileSink, history: Option<&History>, gauges: Option<&ModelGauges>) {
    let due = match labels.due(SystemTime::now()).await {
        Ok(due) => due,
        Err(error) => {
            warn!(message = "Label metrics could not be read from the label store.", %error);
            return;
        }
    };
    // Test-only hook (docs/fleet.md): stop for good between claim and write, so that a
    // test can kill the process holding label buckets' claims.
    if !due.is_empty() && std::env::var(crate::fleet::TEST_PAUSE_ENV).is_ok_and(|v| v == "during_label_emit") {
        warn!(message = "Fleet test pause reached; label emission stops here.", point = "during_label_emit");
        std::future::pending::<()>().await;
    }
    for bucket in due {
        let claimed = bucket.claimed;
        if bucket.points.is_empty() {
            confirm(labels, claimed).await;
            continue;
        }
        let (files, model, start, points) = (files.clone(), bucket.model.clone(), bucket.bucket_start, bucket.points);
        let written = tokio::task::spawn_blocking(move || {
            let result = files.write(&model, start, &points);
            (result, points)
        })
        .await;
        match written {
            Ok((Ok(_), points)) => {
                confirm(labels, claimed).await;
                if let Some(history) = history {
                    history.record(&bucket.model, &points);
                }
                if let Some(gauges) = gauges {
                    gauges.update(&bucket.model, start, &points);
                }
            }
            Ok((Err(error), _)) => {
                warn!(message = "Label metrics could not be written.", model = %bucket.model, %error)
            }
            Err(error) => warn!(message = "Label metrics writer failed.", %error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelsStoreConfig;
    use crate::labels::{LabelSettings, LabelsConfig};
    use crate::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Probabilities, StreamKey};

    fn observation(features: usize) -> Arc<Observation> {
        Arc::new(Observation {
            stream: StreamKey { model: "m".into(), version: Some(2), signature: "serving_default".into() },
            method: InferenceMethod::Predict,
            event_time: SystemTime::now(),
            request_id: "req".into(),
            rows: 2,
            features: (0..features)
                .map(|f| FeatureColumn {
                    name: format!("x_{f}"),
                    values: FeatureValues::Numeric { values: vec![1.0, 2.0], integer: false },
                })
                .collect(),
            probabilities: Some(Probabilities {
                classes: 2,
                values: vec![0.2, 0.8, 0.6, 0.4],
                class_names: Some(vec!["no".into(), "yes".into()]),
                threshold: Some(0.5),
            }),
            regression: None,
            row_ids: None,
            upstream_latency: Duration::from_millis(3),
        })
    }

    #[tokio::test]
    async fn the_recorder_queue_holds_one_record_per_exchange_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let labels = LabelService::open(LabelSettings {
            bucket: Duration::from_secs(60),
            horizon: Duration::from_secs(3600),
            output_dir: dir.path().to_path_buf(),
            store: LabelsStoreConfig::Embedded,
            labels: LabelsConfig::default(),
            models: Default::default(),
        })
        .await
        .unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let feed = ObservationFeed::new(labels.clone(), tx, Counter::default());
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        let bucket_start = now - now % 60;
        feed.on_observation(&observation(100), bucket_start);
        assert!(rx.try_recv().is_err(), "gathered until the monitor thread's batch ends");
        feed.on_batch_end();
        let mut queued = rx.try_recv().expect("queued");
        assert_eq!(queued.len(), 1, "one record for the exchange");
        let queued = queued.remove(0);
        assert_eq!(queued.rows(), 2, "both rows of the exchange, in one record");
        assert_eq!(feed.dropped.get(), 0);

        // A full gathering is handed on before its batch ends.
        for _ in 0..FEED_BATCH {
            feed.on_observation(&observation(0), bucket_start);
        }
        assert_eq!(rx.try_recv().expect("a full gathering").len(), FEED_BATCH);
        feed.on_observation(&observation(0), bucket_start);
        feed.on_batch_end();
        feed.on_observation(&observation(0), bucket_start);
        feed.on_observation(&observation(0), bucket_start);
        feed.on_batch_end();
        assert_eq!(feed.dropped.get(), 2, "the queue held one batch; the next batch's two are dropped and counted");

        // What was queued joins its labels by `ID:ROW`.
        labels.record_all(vec![queued]).await.unwrap();
        let entries = crate::labels::endpoint::parse_body(br#"[{"id": "req:1", "label": "no"}]"#).unwrap().0;
        assert_eq!(labels.ingest(entries, SystemTime::now()).await.unwrap().accepted, 1);
    }
}
