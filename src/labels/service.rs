//! `LabelService`: the one handle the worker, the admin server and tests use.
//! `record` remembers prediction rows, `ingest` joins labels to them, `due` claims the
//! buckets whose label horizon has passed and returns their points.
//!
//! Attribution: a label belongs to its prediction's bucket (or, with
//! `attribute_to_arrival`, to the bucket of its arrival). A label whose prediction
//! bucket is already due is counted in `label_late_count` of the arrival bucket; a
//! label matching no pending row is counted in `label_unmatched_count` of the arrival
//! bucket, under the model the entry names (when that model is known) or `_unknown`.
//! The service holds no lock across an await and never logs labels or tokens.

use super::aggregate::{Aggregate, BucketDelta, F_LATE, F_UNMATCHED};
use super::metrics;
use super::record::{BucketId, ExchangeWriter, StreamMeta, MAX_CLASSES};
use super::store::embedded::EmbeddedStore;
use super::store::redis::RedisStore;
use super::store::{BucketUpdate, ClaimedBucket, LabelStore, RecordBatch, StoreError};
use super::{LabelsConfig, LabelsStoreConfig};
use crate::sinks::Point;
use crate::tfserving::{ModelConfig, Observation, Probabilities, StreamKey};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest id accepted, in bytes (ids are request ids or feature values).
pub const MAX_ID_BYTES: usize = 1024;
/// Model under which unmatched labels that name no known model are counted.
pub const UNKNOWN_MODEL: &str = "_unknown";
/// How long a bucket's aggregate outlives its last pending row, so a claim is still
/// visible to a label racing the expiry of its row.
const RETAIN_MARGIN_MS: i64 = 60_000;
/// Name of the embedded store's file under the output dir.
pub const EMBEDDED_FILE: &str = "labels.redb";

/// What the service needs from the configuration.
#[derive(Debug, Clone)]
pub struct LabelSettings {
    /// Bucket width (aligned bucket starts come from the worker).
    pub bucket: Duration,
    /// How long a bucket waits for labels before its label metrics are emitted.
    pub horizon: Duration,
    /// Where the embedded store's file lives.
    pub output_dir: PathBuf,
    /// Which store joins labels (`--labels-store`).
    pub store: LabelsStoreConfig,
    /// The `[labels]` section.
    pub labels: LabelsConfig,
    /// Configured models: their class names resolve labels given by name, and their
    /// names are accepted to attribute unmatched labels.
    pub models: BTreeMap<String, ModelConfig>,
}

/// A label as posted, checked for shape but not yet joined.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelEntry {
    /// Position in the posted body, for the answer.
    pub index: usize,
    /// The prediction row's id (see `Observation::row_id`).
    pub id: String,
    /// The actual class, as posted.
    pub label: RawLabel,
    /// The model the poster says the id belongs to; only used to attribute the label
    /// when it matches nothing.
    pub model: Option<String>,
}

/// A label value before it is resolved against the prediction's classes.
#[derive(Debug, Clone, PartialEq)]
pub enum RawLabel {
    /// A non-negative integer: a class index, or a regression model's value.
    Index(u64),
    Name(String),
    Bool(bool),
    /// Any other JSON number: a regression model's value.
    Number(f64),
}

/// An entry that was not accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    /// Position of the entry in the posted body.
    pub index: usize,
    /// Why it was not accepted, for the poster to fix it.
    pub error: String,
}

/// The answer to a batch of labels.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestOutcome {
    /// Labels joined to a prediction (late ones included).
    pub accepted: u64,
    /// Labels for which no prediction is known (never seen, expired, or labeled before).
    pub unmatched: u64,
    /// Accepted labels whose prediction bucket was already emitted or due.
    pub late: u64,
    /// Entries not accepted, by index.
    pub rejected: Vec<Rejected>,
}

/// The rows of one observation as the store keeps them (see `LabelService::prepare`).
#[derive(Debug, Clone)]
pub struct PreparedRecord {
    /// The stream's metadata, written once per process.
    meta: Arc<StreamMeta>,
    /// The rows and their bucket.
    batch: RecordBatch,
}

impl PreparedRecord {
    /// Rows a label can join through the record.
    pub fn rows(&self) -> u64 {
        self.batch.rows
    }
}

/// A stream's metadata as last prepared, with what it was built from, so preparing
/// an observation of a known stream allocates nothing for it.
#[derive(Debug)]
struct PreparedStream {
    /// Class names the observation carried (None: configured or `class_<i>`).
    carried_names: Option<Vec<String>>,
    /// Classes of the observation.
    classes: usize,
    /// The metadata built from them.
    meta: Arc<StreamMeta>,
}

/// The label points of one model and bucket, ready to append to that bucket's file.
#[derive(Debug, Clone, PartialEq)]
pub struct DueBucket {
    /// The model: the folder of the Anodot file the points go to.
    pub model: String,
    /// Start of the bucket the points belong to (their timestamp), epoch seconds.
    pub bucket_start: i64,
    /// The bucket's label points, timestamped `bucket_start`.
    pub points: Vec<Point>,
    /// The claimed store buckets these points come from, to `confirm` once written.
    pub claimed: Vec<crate::labels::record::BucketId>,
}

/// Why the service could not start or do its work.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("labels.token_env names `{0}`, which is not set or empty")]
    MissingToken(String),
}

/// The label service's counters for `/metrics`, process-local. Registered before the
/// store opens (`LabelService::open_counted`), so that they are on `/metrics` even
/// while a store that could not open yet is retried.
#[derive(Debug, Clone, Default)]
pub struct LabelCounters {
    /// Prediction rows written to the store.
    recorded: Counter,
    /// Labels joined (late ones included).
    accepted: Counter,
    /// Labels matching no pending row.
    unmatched: Counter,
    /// Labels joined after their bucket was due.
    late: Counter,
    /// Entries rejected, by shape or by class.
    rejected: Counter,
    /// Store evictions (embedded store).
    evictions: Counter,
    /// Recorded rows the store failed to write.
    failed: Counter,
    /// Damaged store files moved aside (embedded store).
    corrupt: Counter,
    /// Pending rows at the last tick (embedded store).
    pending: Gauge,
}

/// Joins labels to predictions and emits label metrics; share it behind an `Arc`.
pub struct LabelService {
    /// Where rows, aggregates and claims live.
    store: Box<dyn LabelStore>,
    /// Widths, horizon and options, fixed at start.
    settings: LabelSettings,
    /// Stream metadata already written to the store by this process (or read from
    /// it): avoids a store write per observation and a read per label.
    /// Both maps are looked up once per exchange, so they hash with foldhash rather
    /// than SipHash (their keys are model names and ids, not chosen per request).
    streams: Mutex<HashMap<u64, Arc<StreamMeta>, foldhash::fast::RandomState>>,
    /// The metadata `prepare` built last per stream, reused while the observation's
    /// classes are the same: `prepare` runs once per exchange on the worker's thread.
    prepared_streams: Mutex<HashMap<StreamKey, PreparedStream, foldhash::fast::RandomState>>,
    /// Models whose name may attribute an unmatched label: configured or recorded.
    known_models: Mutex<HashSet<String, foldhash::fast::RandomState>>,
    /// Process-local counters for `/metrics`.
    counters: LabelCounters,
    /// Store evictions, failed rows and corrupt files already added to the counters,
    /// to add only the difference.
    store_counts_seen: Mutex<(u64, u64, u64)>,
}

fn epoch_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

impl LabelService {
    /// Opens the configured store (creating the embedded file, or connecting to Redis).
    pub async fn open(settings: LabelSettings) -> Result<Arc<LabelService>, LabelError> {
        Self::open_counted(settings, LabelCounters::default()).await
    }

    /// `open`, counting into counters registered beforehand.
    pub async fn open_counted(
        settings: LabelSettings,
        counters: LabelCounters,
    ) -> Result<Arc<LabelService>, LabelError> {
        let labels = &settings.labels;
        let store: Box<dyn LabelStore> = match &settings.store {
            LabelsStoreConfig::Embedded => Box::new(EmbeddedStore::open(
                &settings.output_dir.join(EMBEDDED_FILE),
                labels.max_pending_rows,
                labels.auc_exact_rows,
            )?),
            LabelsStoreConfig::Redis(url) => Box::new(
                RedisStore::connect(std::slice::from_ref(url), &labels.redis_key_prefix, labels.auc_exact_rows).await?,
            ),
            LabelsStoreConfig::RedisCluster(nodes) => {
                Box::new(RedisStore::connect(nodes, &labels.redis_key_prefix, labels.auc_exact_rows).await?)
            }
        };
        let known_models = settings.models.keys().cloned().collect();
        let stats = store.stats();
        Ok(Arc::new(LabelService {
            store,
            settings,
            streams: Mutex::new(HashMap::default()),
            prepared_streams: Mutex::new(HashMap::default()),
            known_models: Mutex::new(known_models),
            counters,
            // A file set aside at start counts: the counter starts at zero.
            store_counts_seen: Mutex::new((stats.evictions, stats.failed_rows, 0)),
        }))
    }

    /// What is wrong with the join store, when it cannot serve; for `/readyz`.
    pub fn store_health(&self) -> Option<String> {
        self.store.health()
    }

    /// The settings the service runs with.
    pub fn settings(&self) -> &LabelSettings {
        &self.settings
    }

    fn width_ms(&self) -> i64 {
        (self.settings.bucket.as_millis() as i64).max(1000)
    }

    fn arrival_mode(&self) -> bool {
        self.settings.labels.attribute_to_arrival
    }

    /// When a bucket's label metrics are due, epoch ms.
    fn due_ms(&self, start: i64) -> i64 {
        let end = start * 1000 + self.width_ms();
        if self.arrival_mode() {
            end + self.settings.labels.arrival_grace_seconds as i64 * 1000
        } else {
            end + self.settings.horizon.as_millis() as i64
        }
    }

    /// Until when a prediction row of a bucket is kept: past the horizon by the late
    /// window (the horizon also bounds how long arrival-mode rows wait for a label).
    fn row_expiry_ms(&self, start: i64) -> i64 {
        start * 1000
            + self.width_ms()
            + self.settings.horizon.as_millis() as i64
            + self.settings.labels.late_window_seconds as i64 * 1000
    }

    fn retain_ms(&self, start: i64) -> i64 {
        self.row_expiry_ms(start).max(self.due_ms(start)) + RETAIN_MARGIN_MS
    }

    fn bucket_of(&self, now_ms: i64) -> i64 {
        let width_s = self.width_ms() / 1000;
        now_ms.div_euclid(1000).div_euclid(width_s) * width_s
    }

    /// Writes a stream's metadata to the store unless this process already did.
    async fn ensure_stream(&self, meta: Arc<StreamMeta>) -> Result<Arc<StreamMeta>, StoreError> {
        let id = meta.id();
        if let Some(known) = self.streams.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            if Arc::ptr_eq(known, &meta) || known.class_names == meta.class_names {
                return Ok(known.clone());
            }
        }
        self.store.put_stream(StreamMeta::clone(&meta)).await?;
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).insert(id, meta.clone());
        Ok(meta)
    }

    /// A stream's metadata, from this process or the store (another replica's).
    async fn stream(&self, id: u64) -> Result<Option<Arc<StreamMeta>>, StoreError> {
        if let Some(known) = self.streams.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(Some(known.clone()));
        }
        let Some(meta) = self.store.stream(id).await? else { return Ok(None) };
        let meta = Arc::new(meta);
        self.streams.lock().unwrap_or_else(|e| e.into_inner()).insert(id, meta.clone());
        Ok(Some(meta))
    }

    /// Remembers the prediction rows of one observation, which belongs to the bucket
    /// starting at `bucket_start` (epoch s). Observations without class probabilities
    /// (regression) and rows without a usable id are skipped.
    pub async fn record(&self, observation: &Observation, bucket_start: i64) -> Result<(), StoreError> {
        match self.prepare(observation, bucket_start) {
            Some(prepared) => self.record_prepared(prepared).await,
            None => Ok(()),
        }
    }

    /// The synchronous half of `record`: what the store will keep of an observation,
    /// one record for the exchange (a few bytes per row). A worker that must not wait
    /// for the store can prepare on its loop and hand the result to `record_prepared`
    /// or `record_all` without cloning the observation.
    ///
    /// The record is keyed by the request id and holds every row, so a label `ID:ROW`
    /// (or `ID` for a one-row exchange) finds its row; rows that have their own id (id
    /// feature) get a one-row record each under that id. Rows whose id would be empty
    /// or longer than `MAX_ID_BYTES` are not joinable, as labels cannot name them.
    pub fn prepare(&self, observation: &Observation, bucket_start: i64) -> Option<PreparedRecord> {
        let Some(probabilities) = observation.probabilities.as_ref() else {
            return self.prepare_regression(observation, bucket_start);
        };
        let classes = probabilities.classes;
        if !(2..=MAX_CLASSES).contains(&classes) {
            return None;
        }
        let expires_ms = self.row_expiry_ms(bucket_start);
        if expires_ms <= epoch_ms(SystemTime::now()) {
            return None;
        }
        let meta = self.prepared_stream(&observation.stream, probabilities);
        let stream = meta.id();
        let rows = observation.rows.min(probabilities.rows());
        let own_ids = observation.row_ids.as_deref().unwrap_or_default();
        let suffixed = observation.rows > 1;
        let request_id = &observation.request_id;
        // Rows without their own id are joined as `REQUESTID:ROW` (or `REQUESTID`): those
        // whose id fits in a label's id, which is a first run of rows.
        let addressable = addressable_rows(request_id.len(), suffixed, rows);
        let by_request = addressable.saturating_sub(own_ids.len());
        let mut records = Vec::with_capacity(1);
        let mut joinable = 0;
        if by_request > 0 {
            let mut writer = ExchangeWriter::new(stream, bucket_start, expires_ms, suffixed, classes, rows);
            writer.push_rows(&probabilities.values[..rows * classes], |row| probabilities.predicted_class(row) as u16);
            for row in (0..own_ids.len().min(rows)).chain(addressable..rows) {
                writer.mark_taken(row);
            }
            records.push((request_id.clone(), writer.finish()));
            joinable += by_request;
        }
        for (row, id) in own_ids.iter().enumerate().take(rows) {
            if id.is_empty() || id.len() > MAX_ID_BYTES {
                continue;
            }
            let mut writer = ExchangeWriter::new(stream, bucket_start, expires_ms, false, classes, 1);
            writer.push_row(probabilities.predicted_class(row) as u16, probabilities.row(row));
            records.push((id.clone(), writer.finish()));
            joinable += 1;
        }
        if joinable == 0 {
            return None;
        }
        let batch = RecordBatch {
            bucket: BucketId { stream, start: bucket_start },
            due_ms: self.due_ms(bucket_start),
            retain_until_ms: self.retain_ms(bucket_start),
            expires_ms,
            rows: joinable as u64,
            records,
        };
        Some(PreparedRecord { meta, batch })
    }

    /// `prepare` for a regression observation: one record for the exchange (and one
    /// per row with its own id) holding each row's prediction.
    fn prepare_regression(&self, observation: &Observation, bucket_start: i64) -> Option<PreparedRecord> {
        let predictions = observation.regression.as_ref()?;
        let expires_ms = self.row_expiry_ms(bucket_start);
        if expires_ms <= epoch_ms(SystemTime::now()) {
            return None;
        }
        let meta = {
            let mut prepared = self.prepared_streams.lock().unwrap_or_else(|e| e.into_inner());
            match prepared.get(&observation.stream).filter(|known| known.classes == 0) {
                Some(known) => known.meta.clone(),
                None => {
                    let meta = Arc::new(StreamMeta::of(&observation.stream, Vec::new()));
                    let entry = PreparedStream { carried_names: None, classes: 0, meta: meta.clone() };
                    prepared.insert(observation.stream.clone(), entry);
                    meta
                }
            }
        };
        let stream = meta.id();
        let rows = observation.rows.min(predictions.len());
        let own_ids = observation.row_ids.as_deref().unwrap_or_default();
        let suffixed = observation.rows > 1;
        let request_id = &observation.request_id;
        let addressable = |row: usize| {
            if suffixed {
                request_id.len() + 1 + decimal_digits(row) <= MAX_ID_BYTES
            } else {
                !request_id.is_empty() && request_id.len() <= MAX_ID_BYTES
            }
        };
        // A row without a finite prediction has no error to measure.
        let usable = |row: usize| predictions[row].is_finite();
        let by_request = (own_ids.len()..rows).filter(|row| addressable(*row) && usable(*row)).count();
        let mut records = Vec::with_capacity(1);
        let mut joinable = 0;
        if by_request > 0 {
            let mut writer = ExchangeWriter::new_regression(stream, bucket_start, expires_ms, suffixed, rows);
            for (row, prediction) in predictions.iter().enumerate().take(rows) {
                writer.push_prediction(*prediction);
                if row < own_ids.len() || !addressable(row) || !usable(row) {
                    writer.mark_taken(row);
                }
            }
            records.push((request_id.clone(), writer.finish()));
            joinable += by_request;
        }
        for (row, id) in own_ids.iter().enumerate().take(rows) {
            if id.is_empty() || id.len() > MAX_ID_BYTES || !usable(row) {
                continue;
            }
            let mut writer = ExchangeWriter::new_regression(stream, bucket_start, expires_ms, false, 1);
            writer.push_prediction(predictions[row]);
            records.push((id.clone(), writer.finish()));
            joinable += 1;
        }
        if joinable == 0 {
            return None;
        }
        let batch = RecordBatch {
            bucket: BucketId { stream, start: bucket_start },
            due_ms: self.due_ms(bucket_start),
            retain_until_ms: self.retain_ms(bucket_start),
            expires_ms,
            rows: joinable as u64,
            records,
        };
        Some(PreparedRecord { meta, batch })
    }

    /// The metadata of an observation's stream, built once per stream and classes.
    fn prepared_stream(&self, stream: &StreamKey, probabilities: &Probabilities) -> Arc<StreamMeta> {
        let classes = probabilities.classes;
        let mut prepared = self.prepared_streams.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = prepared.get(stream) {
            if known.classes == classes && known.carried_names == probabilities.class_names {
                return known.meta.clone();
            }
        }
        let configured = self.settings.models.get(&stream.model).and_then(|m| m.class_names.as_ref());
        let names = (0..classes)
            .map(|i| match (&probabilities.class_names, configured.and_then(|c| c.get(i))) {
                (None, Some(name)) => name.clone(),
                _ => probabilities.class_name(i),
            })
            .collect();
        let meta = Arc::new(StreamMeta::of(stream, names));
        let entry = PreparedStream { carried_names: probabilities.class_names.clone(), classes, meta: meta.clone() };
        prepared.insert(stream.clone(), entry);
        meta
    }

    /// The asynchronous half of `record`: writes prepared rows to the store.
    pub async fn record_prepared(&self, prepared: PreparedRecord) -> Result<(), StoreError> {
        self.record_all(vec![prepared]).await
    }

    /// Writes many prepared observations to the store at once (one transaction or
    /// round trip for all of them where the store allows).
    pub async fn record_all(&self, prepared: Vec<PreparedRecord>) -> Result<(), StoreError> {
        let mut rows = 0;
        let mut batches = Vec::with_capacity(prepared.len());
        let mut last_stream: Option<Arc<StreamMeta>> = None;
        // A store that fails before the rows reach it loses them all: count them.
        let all_rows: u64 = prepared.iter().map(|record| record.batch.rows).sum();
        for record in prepared {
            if !last_stream.as_ref().is_some_and(|last| Arc::ptr_eq(last, &record.meta)) {
                if let Err(error) = self.ensure_stream(record.meta.clone()).await {
                    self.counters.failed.inc_by(all_rows);
                    return Err(error);
                }
                let mut known = self.known_models.lock().unwrap_or_else(|e| e.into_inner());
                if !known.contains(&record.meta.model) {
                    known.insert(record.meta.model.clone());
                }
                drop(known);
                last_stream = Some(record.meta);
            }
            rows += record.batch.rows;
            batches.push(record.batch);
        }
        if batches.is_empty() {
            return Ok(());
        }
        self.store.record(batches).await?;
        self.counters.recorded.inc_by(rows);
        Ok(())
    }

    /// Returns once every row recorded before the call is in the store, visible to
    /// other replicas (recording writes behind the caller's back).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    /// Joins labels (already checked for shape) to their predictions at time `now`.
    pub async fn ingest(&self, entries: Vec<LabelEntry>, now: SystemTime) -> Result<IngestOutcome, StoreError> {
        // A label must see every prediction this replica recorded before it.
        self.store.flush().await?;
        let now_ms = epoch_ms(now);
        let arrival = self.bucket_of(now_ms);
        let ids = entries.iter().map(|e| e.id.clone()).collect();
        let taken = self.store.take(ids, now_ms).await?;

        let mut outcome = IngestOutcome::default();
        let mut deltas: BTreeMap<BucketId, (u64, BucketDelta)> = BTreeMap::new();
        let mut restore = Vec::new();
        let mut unmatched_by_model: BTreeMap<String, i64> = BTreeMap::new();
        for (entry, taken) in entries.into_iter().zip(taken) {
            let Some(taken) = taken else {
                let model = match &entry.model {
                    Some(m) if self.known_models.lock().unwrap_or_else(|e| e.into_inner()).contains(m) => m.clone(),
                    _ => UNKNOWN_MODEL.to_string(),
                };
                *unmatched_by_model.entry(model).or_insert(0) += 1;
                outcome.unmatched += 1;
                continue;
            };
            let row = &taken.row;
            let meta = self.stream(row.stream).await?;
            let names = meta.as_ref().map(|m| m.class_names.as_slice()).unwrap_or_default();
            let resolved = match row.prediction {
                Some(prediction) => numeric_label(&entry.label).map(|label| Joined::Value { prediction, label }),
                None => resolve(&entry.label, row.probabilities.len(), names).map(Joined::Class),
            };
            match resolved {
                Ok(label) => {
                    let start = if self.arrival_mode() { arrival } else { row.bucket_start };
                    let slot = deltas.entry(BucketId { stream: row.stream, start }).or_default();
                    slot.0 += 1;
                    match label {
                        Joined::Class(actual) => slot.1.add_label(row, actual),
                        Joined::Value { prediction, label } => slot.1.add_regression_label(prediction, label),
                    }
                    outcome.accepted += 1;
                }
                Err(error) => {
                    restore.push(taken);
                    outcome.rejected.push(Rejected { index: entry.index, error });
                }
            }
        }
        if !restore.is_empty() {
            self.store.restore(restore).await?;
        }

        let (counts, updates): (Vec<u64>, Vec<BucketUpdate>) = deltas
            .into_iter()
            .map(|(bucket, (count, delta))| {
                let update = BucketUpdate {
                    bucket,
                    due_ms: self.due_ms(bucket.start),
                    retain_until_ms: self.retain_ms(bucket.start),
                    refuse_when_due: !self.arrival_mode(),
                    delta,
                };
                (count, update)
            })
            .unzip();
        let streams: Vec<u64> = updates.iter().map(|u| u.bucket.stream).collect();
        let applied = self.store.apply(updates, now_ms).await?;

        let mut late: BTreeMap<u64, i64> = BTreeMap::new();
        for ((stream, count), applied) in streams.into_iter().zip(counts).zip(applied) {
            if !applied {
                *late.entry(stream).or_insert(0) += count as i64;
                outcome.late += count;
            }
        }
        let mut counters = Vec::new();
        for (stream, n) in late {
            counters.push(self.counter_update(stream, arrival, F_LATE, n));
        }
        for (model, n) in unmatched_by_model {
            let meta = self.ensure_stream(Arc::new(StreamMeta::unmatched(&model))).await?;
            counters.push(self.counter_update(meta.id(), arrival, F_UNMATCHED, n));
        }
        if !counters.is_empty() {
            self.store.apply(counters, now_ms).await?;
        }
        self.counters.accepted.inc_by(outcome.accepted);
        self.counters.unmatched.inc_by(outcome.unmatched);
        self.counters.late.inc_by(outcome.late);
        self.counters.rejected.inc_by(outcome.rejected.len() as u64);
        Ok(outcome)
    }

    fn counter_update(&self, stream: u64, start: i64, field: &str, n: i64) -> BucketUpdate {
        let mut delta = BucketDelta::default();
        delta.add_int(field, n);
        BucketUpdate {
            bucket: BucketId { stream, start },
            due_ms: self.due_ms(start),
            retain_until_ms: self.retain_ms(start),
            refuse_when_due: false,
            delta,
        }
    }

    /// Counts entries rejected before they reached `ingest` (bad shape).
    pub fn count_rejected(&self, n: u64) {
        self.counters.rejected.inc_by(n);
    }

    /// Claims every bucket whose labels are due at `now` and returns its points, one
    /// entry per model and bucket; call it periodically (each second is plenty). Also
    /// drops expired rows and makes the embedded store's writes durable.
    pub async fn due(&self, now: SystemTime) -> Result<Vec<DueBucket>, StoreError> {
        let now_ms = epoch_ms(now);
        let ticked = self.tick(now_ms).await;
        // The counters follow the store even while it fails (failed rows above all).
        self.sync_store_counters();
        let claimed = ticked?;
        let mut out: BTreeMap<(i64, String), (Vec<Point>, Vec<crate::labels::record::BucketId>)> = BTreeMap::new();
        let mut nothing_to_write = Vec::new();
        for bucket in claimed {
            let meta = match self.stream(bucket.bucket.stream).await? {
                Some(meta) => meta,
                None => {
                    tracing::warn!(
                        message = "Label bucket of an unknown stream; emitted under the unknown model.",
                        bucket = %bucket.bucket.key()
                    );
                    Arc::new(StreamMeta::unmatched(UNKNOWN_MODEL))
                }
            };
            let aggregate = Aggregate::parse(
                bucket.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                bucket.auc.iter().map(|s| s.as_str()),
            );
            let points = metrics::points(&meta, bucket.bucket.start, &aggregate, self.arrival_mode());
            if points.is_empty() {
                // Nothing to write: the bucket is done at once.
                nothing_to_write.push(bucket.bucket);
                continue;
            }
            let entry = out.entry((bucket.bucket.start, meta.model.clone())).or_default();
            entry.0.extend(points);
            entry.1.push(bucket.bucket);
        }
        self.store.confirm(nothing_to_write).await?;
        Ok(out
            .into_iter()
            .map(|((bucket_start, model), (points, claimed))| DueBucket { model, bucket_start, points, claimed })
            .collect())
    }

    /// Writes buffered rows, drops expired ones and claims the due buckets.
    async fn tick(&self, now_ms: i64) -> Result<Vec<ClaimedBucket>, StoreError> {
        self.store.flush().await?;
        self.store.maintain(now_ms).await?;
        self.store.claim_due(now_ms).await
    }

    /// Adds what the store counted since the last call to the counters.
    fn sync_store_counters(&self) {
        let stats = self.store.stats();
        if let Some(pending) = stats.pending_rows {
            self.counters.pending.set(pending as i64);
        }
        {
            let mut seen = self.store_counts_seen.lock().unwrap_or_else(|e| e.into_inner());
            self.counters.evictions.inc_by(stats.evictions.saturating_sub(seen.0));
            self.counters.failed.inc_by(stats.failed_rows.saturating_sub(seen.1));
            self.counters.corrupt.inc_by(stats.corrupt_files.saturating_sub(seen.2));
            *seen = (stats.evictions.max(seen.0), stats.failed_rows.max(seen.1), stats.corrupt_files.max(seen.2));
        }
    }

    /// Confirms that due buckets' points were written (or had none): with a store
    /// shared by replicas, until then another replica takes the bucket over once the
    /// claim's lease ends, so that label metrics are emitted exactly once.
    pub async fn confirm(&self, claimed: Vec<crate::labels::record::BucketId>) -> Result<(), StoreError> {
        self.store.confirm(claimed).await
    }

    /// Registers the service's counters with the admin server's registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.counters.register(registry);
    }
}

impl LabelCounters {
    /// Registers the counters with the admin server's registry.
    pub fn register(&self, registry: &mut Registry) {
        let c = self;
        registry.register("label_rows_recorded", "Prediction rows recorded for label joins", c.recorded.clone());
        registry.register("labels_accepted", "Labels joined to a prediction", c.accepted.clone());
        registry.register("labels_unmatched", "Labels matching no known prediction", c.unmatched.clone());
        registry.register("labels_late", "Labels joined after their bucket was due", c.late.clone());
        registry.register("labels_rejected", "Label entries rejected as invalid", c.rejected.clone());
        registry.register(
            "label_store_evictions",
            "Pending rows evicted because the label store was full",
            c.evictions.clone(),
        );
        registry.register("label_rows_failed", "Prediction rows the label store failed to write", c.failed.clone());
        registry.register(
            "label_store_corrupt_files",
            "Damaged embedded label store files moved aside and replaced by an empty store",
            c.corrupt.clone(),
        );
        registry.register(
            "label_store_pending_rows",
            "Prediction rows waiting for a label (embedded store)",
            c.pending.clone(),
        );
    }
}

/// Digits of a row number in decimal (the length of its `:ROW` suffix, less one).
fn decimal_digits(row: usize) -> usize {
    row.checked_ilog10().unwrap_or(0) as usize + 1
}

/// How many of an exchange's first rows can be joined by request id: the label id of
/// row r, `REQUESTID:r` (several rows) or `REQUESTID` (one), must fit in
/// `MAX_ID_BYTES`. Ids only grow with r, so the addressable rows are a first run.
fn addressable_rows(request_id_len: usize, suffixed: bool, rows: usize) -> usize {
    if !suffixed {
        let fits = request_id_len > 0 && request_id_len <= MAX_ID_BYTES;
        return if fits { rows } else { 0 };
    }
    // Room left for the row's digits after `REQUESTID:`.
    let Some(digits) = MAX_ID_BYTES.checked_sub(request_id_len + 1) else { return 0 };
    if digits == 0 {
        return 0;
    }
    // Rows with at most `digits` digits: 0 ..= 10^digits − 1.
    match u32::try_from(digits).ok().and_then(|d| 10usize.checked_pow(d)) {
        Some(limit) => rows.min(limit),
        None => rows,
    }
}

/// A label resolved against the prediction it joined.
enum Joined {
    /// The actual class of a classifier's row.
    Class(usize),
    /// A regression row's prediction and its numeric label.
    Value { prediction: f64, label: f64 },
}

/// The value of a label posted for a regression model's prediction: a number.
pub fn numeric_label(label: &RawLabel) -> Result<f64, String> {
    match label {
        RawLabel::Index(i) => Ok(*i as f64),
        RawLabel::Number(x) if x.is_finite() => Ok(*x),
        RawLabel::Number(x) => Err(format!("label {x} is not a finite number")),
        RawLabel::Name(_) | RawLabel::Bool(_) => {
            Err("the prediction is a regression model's: its label must be a number, not a class name or boolean"
                .into())
        }
    }
}

/// Resolves a posted label to a class index of a prediction with `classes` classes.
pub fn resolve(label: &RawLabel, classes: usize, names: &[String]) -> Result<usize, String> {
    match label {
        RawLabel::Number(x) => Err(format!(
            "label {x} is not a class: the prediction is a classifier's (post a class index, name or boolean)"
        )),
        RawLabel::Index(i) => usize::try_from(*i)
            .ok()
            .filter(|i| *i < classes)
            .ok_or_else(|| format!("class index {i} is out of range: the model has {classes} classes")),
        RawLabel::Bool(b) if classes == 2 => Ok(usize::from(*b)),
        RawLabel::Bool(_) => Err(format!("a boolean label needs a binary model; this one has {classes} classes")),
        RawLabel::Name(name) => {
            if let Some(i) = names.iter().position(|n| n == name) {
                return Ok(i);
            }
            if let Some(i) = name.strip_prefix("class_").and_then(|s| s.parse::<usize>().ok()) {
                if i < classes && names.get(i).is_none_or(|n| n == name) {
                    return Ok(i);
                }
            }
            let mut known: Vec<&str> = names.iter().take(10).map(|s| s.as_str()).collect();
            if names.len() > 10 {
                known.push("...");
            }
            let shown: String = name.chars().take(64).collect();
            Err(format!("unknown class name `{shown}` (classes: {})", known.join(", ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addressable_rows_are_those_whose_label_id_fits() {
        // Each row's id as the old per-row rule checked it.
        let fits = |len: usize, suffixed: bool, row: usize| {
            if suffixed {
                len + 1 + decimal_digits(row) <= MAX_ID_BYTES
            } else {
                len > 0 && len <= MAX_ID_BYTES
            }
        };
        for len in [0, 1, 36, MAX_ID_BYTES - 4, MAX_ID_BYTES - 3, MAX_ID_BYTES - 2, MAX_ID_BYTES - 1, MAX_ID_BYTES] {
            for suffixed in [false, true] {
                let rows = 1200;
                let expected = (0..rows).take_while(|row| fits(len, suffixed, *row)).count();
                assert!((expected..rows).all(|row| !fits(len, suffixed, row)), "not a first run: {len}");
                assert_eq!(addressable_rows(len, suffixed, rows), expected, "len {len}, suffixed {suffixed}");
            }
        }
        assert_eq!(addressable_rows(MAX_ID_BYTES - 3, true, 1200), 100);
        assert_eq!(addressable_rows(MAX_ID_BYTES - 1, true, 64), 0);
        assert_eq!(addressable_rows(MAX_ID_BYTES + 1, false, 1), 0);
        assert_eq!(addressable_rows(36, true, 64), 64);
    }

    #[test]
    fn labels_resolve_by_index_name_and_boolean() {
        let names = vec!["legit".to_string(), "fraud".to_string()];
        assert_eq!(resolve(&RawLabel::Index(1), 2, &names), Ok(1));
        assert_eq!(resolve(&RawLabel::Name("fraud".into()), 2, &names), Ok(1));
        assert_eq!(resolve(&RawLabel::Bool(false), 2, &names), Ok(0));
        assert!(resolve(&RawLabel::Index(2), 2, &names).unwrap_err().contains("out of range"));
        assert!(resolve(&RawLabel::Name("spam".into()), 2, &names).unwrap_err().contains("legit, fraud"));
        assert!(resolve(&RawLabel::Bool(true), 3, &[]).unwrap_err().contains("binary"));
        assert_eq!(resolve(&RawLabel::Name("class_2".into()), 3, &[]), Ok(2));
        assert!(resolve(&RawLabel::Number(2.5), 3, &[]).unwrap_err().contains("classifier"));
    }

    #[test]
    fn regression_labels_are_numbers() {
        assert_eq!(numeric_label(&RawLabel::Index(7)), Ok(7.0));
        assert_eq!(numeric_label(&RawLabel::Number(-2.5)), Ok(-2.5));
        assert!(numeric_label(&RawLabel::Name("fraud".into())).unwrap_err().contains("must be a number"));
        assert!(numeric_label(&RawLabel::Bool(true)).unwrap_err().contains("must be a number"));
    }
}
