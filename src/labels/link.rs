//! Connects the label service to the running worker: every decoded observation is
//! recorded in the join store, and every bucket whose label horizon has passed gets
//! its label points appended to its Anodot file (and shown on the dashboard).
//!
//! The worker's listeners run on its monitor thread and must never wait, so the
//! observations cross to an async task over a bounded channel; when that channel is
//! full the observation is not recorded and `label_record_dropped` counts it.

use crate::admin::history::History;
use crate::labels::LabelService;
use crate::sinks::files::FileSink;
use crate::tfserving::Observation;
use crate::worker::ObservationListener;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;

/// Observations waiting to be recorded; beyond it they are dropped and counted.
const PENDING_OBSERVATIONS: usize = 1024;
/// How often buckets past their label horizon are looked for.
const DUE_TICK: Duration = Duration::from_secs(1);

/// The worker-side end: hands observations to the recording task without waiting.
struct ObservationFeed {
    /// To the recording task.
    tx: mpsc::Sender<(Arc<Observation>, i64)>,
    /// Observations not recorded because the task fell behind.
    dropped: Counter,
}

impl ObservationListener for ObservationFeed {
    fn on_observation(&self, observation: &Arc<Observation>, bucket_start: i64) {
        if observation.probabilities.is_none() {
            return;
        }
        // The store needs the ids and probabilities only; queueing the observation
        // itself would keep its feature columns (50 KiB for 64 rows × 100 features)
        // alive for every queued entry.
        let outputs = Observation {
            stream: observation.stream.clone(),
            method: observation.method,
            event_time: observation.event_time,
            request_id: observation.request_id.clone(),
            rows: observation.rows,
            features: Vec::new(),
            probabilities: observation.probabilities.clone(),
            regression: None,
            row_ids: observation.row_ids.clone(),
            upstream_latency: observation.upstream_latency,
        };
        if self.tx.try_send((Arc::new(outputs), bucket_start)).is_err() {
            self.dropped.inc();
        }
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
        registry: &mut Registry,
    ) -> LabelLink {
        let (tx, mut rx) = mpsc::channel(PENDING_OBSERVATIONS);
        let dropped = Counter::default();
        registry.register(
            "label_record_dropped",
            "Observations not recorded for labels because recording fell behind",
            dropped.clone(),
        );
        hooks.add_observation_listener(Arc::new(ObservationFeed { tx, dropped }));
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(DUE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    received = rx.recv() => match received {
                        Some((observation, bucket_start)) => {
                            if let Err(error) = labels.record(&observation, bucket_start).await {
                                warn!(message = "Predictions could not be recorded for labels.", %error);
                            }
                        }
                        None => break,
                    },
                    _ = tick.tick() => emit_due(&labels, &files, history.as_deref()).await,
                    _ = stopped.changed() => break,
                }
            }
            while let Ok((observation, bucket_start)) = rx.try_recv() {
                if let Err(error) = labels.record(&observation, bucket_start).await {
                    warn!(message = "Predictions could not be recorded for labels.", %error);
                }
            }
            if let Err(error) = labels.flush().await {
                warn!(message = "Recorded predictions could not be flushed to the label store.", %error);
            }
            emit_due(&labels, &files, history.as_deref()).await;
        });
        LabelLink { task, stop }
    }

    /// Records what is pending, emits what is due, and stops.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Appends the label points of every bucket past its horizon to that bucket's file.
async fn emit_due(labels: &LabelService, files: &FileSink, history: Option<&History>) {
    let due = match labels.due(SystemTime::now()).await {
        Ok(due) => due,
        Err(error) => {
            warn!(message = "Label metrics could not be read from the label store.", %error);
            return;
        }
    };
    for bucket in due {
        if bucket.points.is_empty() {
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
                if let Some(history) = history {
                    history.record(&bucket.model, &points);
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
    use crate::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Probabilities, StreamKey};

    #[test]
    fn the_recorder_queue_holds_ids_and_probabilities_without_the_features() {
        let (tx, mut rx) = mpsc::channel(4);
        let feed = ObservationFeed { tx, dropped: Counter::default() };
        let observation = Arc::new(Observation {
            stream: StreamKey { model: "m".into(), version: Some(2), signature: "serving_default".into() },
            method: InferenceMethod::Predict,
            event_time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            request_id: "req".into(),
            rows: 2,
            features: vec![FeatureColumn {
                name: "x".into(),
                values: FeatureValues::Numeric { values: vec![1.0, 2.0], integer: false },
            }],
            probabilities: Some(Probabilities {
                classes: 2,
                values: vec![0.2, 0.8, 0.6, 0.4],
                class_names: Some(vec!["no".into(), "yes".into()]),
                threshold: Some(0.5),
            }),
            regression: None,
            row_ids: Some(vec!["a".into(), "b".into()]),
            upstream_latency: Duration::from_millis(3),
        });
        feed.on_observation(&observation, 1_700_000_000);
        let (queued, bucket_start) = rx.try_recv().expect("queued");
        assert_eq!(bucket_start, 1_700_000_000);
        assert!(queued.features.is_empty());
        assert_eq!(queued.probabilities, observation.probabilities);
        assert_eq!(queued.row_ids, observation.row_ids);
        assert_eq!((queued.row_id(0), queued.row_id(1)), ("a".to_string(), "b".to_string()));
        assert_eq!((&queued.stream, queued.event_time, queued.rows), (&observation.stream, observation.event_time, 2));
        assert_eq!(feed.dropped.get(), 0);
    }
}
