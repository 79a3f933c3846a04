//! The bucketing engine: tumbling windows aligned to multiples of the bucket width in
//! UTC epoch seconds, one series of buckets per stream (model, version, signature),
//! closed at their end plus a grace period, with heartbeats for quiet streams.
//!
//! The engine is synchronous and single-owner: the worker feeds it observations and
//! exchange facts and asks it, on every tick, for the buckets that are due. It never
//! reads the clock itself (callers pass `now`), so tests drive time explicitly.

use crate::capture::{CallMethod, ErrorOrigin, Exchange};
use crate::catalog::{self, Sample, ScopeValues};
use crate::monitor::bucket::{EmitContext, OutputColumns, StreamBucket, StreamContext};
use crate::monitor::merge::{self, Merge};
use crate::monitor::reference::{reference_path, Reference, ReferenceBuilder, ReferenceSet};
use crate::monitor::stats::Summary;
use crate::monitor::MonitorConfig;
use crate::sinks::Point;
use crate::tfserving::{Decoded, Observation, StreamKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The pseudo-model of facts that belong to no model (`capture_dropped`, and requests
/// or decode errors whose model is unknown). Its files are under `anodot/__mltap__/`
/// and its points carry no `model` property.
pub const GLOBAL_MODEL: &str = crate::sinks::files::PSEUDO_MODEL;
/// Most empty buckets emitted for one stream in one go (after a long pause of the
/// process, older gaps are skipped rather than flooding the sinks).
pub const MAX_HEARTBEAT_BUCKETS: i64 = 1000;

/// The points of one closed bucket of one model (all its streams), ready for sinks.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedBucket {
    /// Model name, or `GLOBAL_MODEL`.
    pub model: String,
    /// Bucket start, epoch seconds (UTC).
    pub start: i64,
    /// Anodot points, all with `timestamp == start`.
    pub points: Vec<Point>,
}

/// The mergeable state of one closed bucket of one model (all its streams): everything
/// its points are computed from. A single mltap turns it into points at once; in a
/// fleet every replica writes its partial state, one replica merges them (`Merge`) and
/// turns the merged state into points with the same code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BucketState {
    /// Model name, or `GLOBAL_MODEL`.
    pub model: String,
    /// Bucket start, epoch seconds (UTC).
    pub start: i64,
    /// Exchange-level facts of the model (requests, latency, decode errors).
    pub exchanges: Option<ModelBucket>,
    /// The model's streams, in key order (the order of their points).
    #[serde(with = "merge::pairs")]
    pub streams: BTreeMap<StreamKey, StreamState>,
}

/// The closed bucket of one stream with what its points need to know of the stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamState {
    pub bucket: StreamBucket,
    /// Features the stream tracks: those absent from the bucket had every row missing.
    pub known_features: BTreeSet<String>,
    /// The stream's class names, for the zero counts of an empty bucket.
    pub class_names: Option<Vec<String>>,
    /// Rows that arrived for an already closed bucket of the stream since the last close.
    pub late_dropped: u64,
    /// Identifies the reference this bucket's drift is computed against (see
    /// `reference_fingerprint`); None when the bucket has no drift.
    pub reference_fingerprint: Option<u64>,
    /// That reference; not written with the state: a reader resolves it from the
    /// fingerprint (`set_reference`).
    #[serde(skip)]
    pub reference: Option<Arc<Reference>>,
}

impl Merge for StreamState {
    fn merge(&mut self, other: &Self) {
        self.bucket.merge(&other.bucket);
        self.known_features.extend(other.known_features.iter().cloned());
        if self.class_names.is_none() {
            self.class_names = other.class_names.clone();
        }
        self.late_dropped += other.late_dropped;
        match (self.reference_fingerprint, other.reference_fingerprint) {
            // Two references for one bucket: compare to neither rather than to half.
            (Some(mine), Some(theirs)) if mine != theirs => {
                self.reference_fingerprint = None;
                self.reference = None;
            }
            (None, Some(theirs)) => {
                self.reference_fingerprint = Some(theirs);
                self.reference = other.reference.clone();
            }
            _ => {}
        }
    }
}

impl Merge for BucketState {
    fn merge(&mut self, other: &Self) {
        Merge::merge(&mut self.exchanges, &other.exchanges);
        merge::merge_maps(&mut self.streams, &other.streams);
    }
}

impl BucketState {
    fn new(model: &str, start: i64) -> Self {
        BucketState { model: model.to_string(), start, exchanges: None, streams: BTreeMap::new() }
    }

    /// The points of this bucket: the model's exchange facts, then each stream's.
    pub fn into_closed(self, config: &MonitorConfig) -> ClosedBucket {
        let BucketState { model, start, exchanges, streams } = self;
        let mut points = exchanges.map(|e| e.points(&model, start)).unwrap_or_default();
        for (key, mut stream) in streams {
            points.extend(stream.bucket.points(
                &key,
                EmitContext {
                    known_features: &stream.known_features,
                    class_names: stream.class_names.as_ref(),
                    reference: stream.reference.as_deref(),
                    late_dropped: stream.late_dropped,
                    config,
                },
            ));
        }
        ClosedBucket { model, start, points }
    }

    /// The references this state's drift needs that it does not hold (a state read
    /// back from the fleet's store): stream and fingerprint.
    pub fn missing_references(&self) -> Vec<(StreamKey, u64)> {
        self.streams
            .iter()
            .filter(|(_, s)| s.reference.is_none())
            .filter_map(|(k, s)| s.reference_fingerprint.map(|f| (k.clone(), f)))
            .collect()
    }

    /// Gives a stream the reference its fingerprint names; one with another
    /// fingerprint leaves the stream without drift.
    pub fn set_reference(&mut self, key: &StreamKey, reference: Option<Arc<Reference>>) {
        if let Some(stream) = self.streams.get_mut(key) {
            let matches =
                reference.as_deref().is_some_and(|r| Some(reference_fingerprint(r)) == stream.reference_fingerprint);
            if matches {
                stream.reference = reference;
            } else {
                stream.reference = None;
                stream.reference_fingerprint = None;
                for feature in stream.bucket.features.values_mut() {
                    if let Some(numeric) = &mut feature.numeric {
                        numeric.bins = None;
                    }
                }
            }
        }
    }
}

/// A stable fingerprint of a reference's content (FNV-1a of its JSON), which tells
/// replicas whether they compare to the same one.
pub fn reference_fingerprint(reference: &Reference) -> u64 {
    let json = serde_json::to_vec(reference).unwrap_or_default();
    json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A drift reference shared by the replicas of a fleet: learned (or loaded) once and
/// used by every replica, so that their drift bins add up. Called on the aggregation
/// thread when a stream is first seen and when its reference freezes; rare and may
/// block briefly. Without it, each engine learns its own.
pub trait SharedReferences: Send + Sync + std::fmt::Debug + 'static {
    /// The reference the fleet uses for a stream, if one was published.
    fn find(&self, key: &StreamKey) -> Option<Reference>;
    /// Publishes a reference unless one was published first; returns the one the
    /// fleet uses (`candidate` when the store cannot be reached).
    fn adopt(&self, key: &StreamKey, candidate: Reference) -> Reference;
}

/// Where an observation went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// Start of the bucket of its event time.
    pub bucket_start: i64,
    /// False when it was counted but not aggregated: its bucket had already closed
    /// (`late_dropped`) or the stream limit was reached (`stream_limit_dropped`).
    pub accepted: bool,
}

/// Exchange-level facts, known whether or not the payload decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeFacts {
    /// The model, when the URL or the request names it.
    pub model: Option<String>,
    /// The call's method, as the proxy classified it.
    pub method: CallMethod,
    /// `request_count`'s `status` (`Exchange::status_dimension`).
    pub status: String,
    /// Whose fault it was when the exchange failed (`request_count`'s `origin`).
    pub origin: Option<ErrorOrigin>,
    /// The exchange's start: the time that buckets it.
    pub event_time: SystemTime,
    /// From sending the request upstream to the end of the response.
    pub upstream_latency: Duration,
    /// The reasons of the decode errors met.
    pub decode_errors: Vec<&'static str>,
}

impl ExchangeFacts {
    /// The facts of a captured exchange and what decoding it gave.
    pub fn new(exchange: &Exchange, decoded: &Decoded) -> Self {
        ExchangeFacts {
            model: decoded.model.clone(),
            method: exchange.method,
            status: exchange.status_dimension(),
            origin: exchange.origin,
            event_time: exchange.started_at,
            upstream_latency: exchange.upstream_latency,
            decode_errors: decoded.errors.iter().map(|e| e.reason).collect(),
        }
    }
}

/// What the engine is built from.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Bucket width (whole seconds; shorter widths count as one second).
    pub bucket: Duration,
    pub monitor: MonitorConfig,
    /// The output dir: learned references are persisted under `reference/` in it and
    /// read back after a restart. None keeps references in memory only.
    pub output_dir: Option<PathBuf>,
    /// Per model, the features the config declares categorical.
    pub categorical_features: BTreeMap<String, BTreeSet<String>>,
    /// When the engine started: the bucket containing this instant is incomplete and
    /// never part of a reference.
    pub started_at: SystemTime,
}

/// Where a stream's drift reference stands.
#[derive(Debug)]
enum ReferenceState {
    /// No complete bucket seen yet.
    Pending,
    /// The reference window is being collected.
    Learning(Box<ReferenceBuilder>),
    /// Frozen: drift is computed against it (with its fingerprint).
    Frozen(Arc<Reference>, u64),
}

impl ReferenceState {
    fn frozen(reference: Reference) -> Self {
        let fingerprint = reference_fingerprint(&reference);
        ReferenceState::Frozen(Arc::new(reference), fingerprint)
    }
}

/// Everything the engine keeps about one stream.
#[derive(Debug)]
struct Stream {
    /// Open buckets by start.
    open: BTreeMap<i64, StreamBucket>,
    /// Start of the last closed bucket; observations for it or earlier are late.
    closed_through: Option<i64>,
    /// Features tracked (at most `max_features`), in name order.
    known_features: BTreeSet<String>,
    /// Class names, fixed at the stream's first probabilities.
    class_names: Option<Vec<String>>,
    reference: ReferenceState,
    /// Rows that arrived after their bucket closed, reported at the next close.
    late_rows: u64,
}

/// Exchange-level facts of one model's bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelBucket {
    /// Exchanges per (method, status, error origin).
    #[serde(with = "merge::pairs")]
    requests: BTreeMap<(CallMethod, String, Option<ErrorOrigin>), u64>,
    /// Upstream latency in milliseconds.
    latency: Summary,
    /// Decode errors per reason.
    decode_errors: BTreeMap<String, u64>,
    /// Rows of observations of streams beyond `max_streams`.
    stream_limit_dropped: u64,
    /// Exchanges the capture queue dropped (global pseudo-model of the engine that
    /// reports them only).
    capture_dropped: Option<u64>,
}

impl Merge for ModelBucket {
    fn merge(&mut self, other: &Self) {
        merge::merge_maps(&mut self.requests, &other.requests);
        self.latency.merge(&other.latency);
        merge::merge_maps(&mut self.decode_errors, &other.decode_errors);
        self.stream_limit_dropped += other.stream_limit_dropped;
        Merge::merge(&mut self.capture_dropped, &other.capture_dropped);
    }
}

/// Open exchange-level buckets of one model.
#[derive(Debug, Default)]
struct ModelState {
    open: BTreeMap<i64, ModelBucket>,
    /// Start of the last closed bucket.
    closed_through: Option<i64>,
}

/// The monitoring engine. See the module documentation.
#[derive(Debug)]
pub struct Engine {
    /// Bucket width, seconds.
    width: i64,
    /// Grace after a bucket's end, seconds.
    grace: i64,
    config: MonitorConfig,
    output_dir: Option<PathBuf>,
    categorical_features: BTreeMap<String, BTreeSet<String>>,
    /// Engine start, epoch seconds.
    started_at: i64,
    /// References from `monitor.reference_file`, read once and shared by every engine.
    reference_set: Arc<ReferenceSet>,
    streams: BTreeMap<StreamKey, Stream>,
    models: BTreeMap<String, ModelState>,
    /// Observations seen, to detect features an observation lacks.
    sequence: u64,
    /// Stands in for a model without declared categorical features.
    no_features: BTreeSet<String>,
    /// Whether this engine reports `capture_dropped` (then its global pseudo-model
    /// has a heartbeat).
    reports_capture: bool,
    /// The fleet's shared drift references, when replicas share one.
    shared_references: Option<Arc<dyn SharedReferences>>,
    /// Buffers every observation's output statistics are gathered in (reused: the
    /// engine observes every exchange, and allocating per exchange showed).
    output_columns: OutputColumns,
}

impl Engine {
    /// A new engine; reads `monitor.reference_file` when set.
    pub fn new(options: EngineOptions) -> Result<Engine, String> {
        let reference_set = match &options.monitor.reference_file {
            Some(path) => ReferenceSet::load(path)?,
            None => ReferenceSet::default(),
        };
        Ok(Engine::with_references(options, Arc::new(reference_set)))
    }

    /// A new engine with already loaded references (`monitor.reference_file` unread).
    pub fn with_references(options: EngineOptions, reference_set: Arc<ReferenceSet>) -> Engine {
        Engine {
            width: options.bucket.as_secs().max(1) as i64,
            grace: options.monitor.grace_seconds as i64,
            config: options.monitor,
            output_dir: options.output_dir,
            categorical_features: options.categorical_features,
            started_at: epoch_seconds(options.started_at),
            reference_set,
            streams: BTreeMap::new(),
            models: BTreeMap::new(),
            sequence: 0,
            no_features: BTreeSet::new(),
            reports_capture: false,
            shared_references: None,
            output_columns: OutputColumns::default(),
        }
    }

    /// Uses (and publishes) the fleet's shared drift references instead of learning
    /// one per engine.
    pub fn share_references(&mut self, shared: Arc<dyn SharedReferences>) {
        self.shared_references = Some(shared);
    }

    /// Bucket width in seconds.
    pub fn width(&self) -> i64 {
        self.width
    }

    /// The start of the bucket holding an instant.
    pub fn bucket_of(&self, t: SystemTime) -> i64 {
        epoch_seconds(t).div_euclid(self.width) * self.width
    }

    /// Aggregates one observation into the bucket of its event time.
    pub fn observe(&mut self, obs: &Observation) -> Observed {
        self.observe_sampled(obs, true)
    }

    /// Aggregates an observation of a count record (outputs only): it counts rows,
    /// classes and output statistics, and lowers the bucket's `sampled_fraction`.
    pub fn observe_unsampled(&mut self, obs: &Observation) -> Observed {
        self.observe_sampled(obs, false)
    }

    fn observe_sampled(&mut self, obs: &Observation, features_sampled: bool) -> Observed {
        let start = self.bucket_of(obs.event_time);
        let rows = obs.rows as u64;
        if !self.streams.contains_key(&obs.stream) {
            if self.streams.len() >= self.config.max_streams {
                let model = self.model_slot(Some(&obs.stream.model));
                self.model_bucket(&model, start, |bucket| bucket.stream_limit_dropped += rows);
                return Observed { bucket_start: start, accepted: false };
            }
            let stream = self.new_stream(&obs.stream);
            self.streams.insert(obs.stream.clone(), stream);
        }
        let complete = self.is_complete(start);
        let (width, buckets, sample, max_categories) =
            (self.width, self.config.reference_buckets, self.config.reference_sample_size, self.config.max_categories);
        let output_dir = self.output_dir.as_deref();
        let shared = self.shared_references.as_deref();
        let Some(stream) = self.streams.get_mut(&obs.stream) else {
            return Observed { bucket_start: start, accepted: false };
        };
        if stream.closed_through.is_some_and(|closed| start <= closed) {
            stream.late_rows += rows;
            return Observed { bucket_start: start, accepted: false };
        }
        match &stream.reference {
            ReferenceState::Pending if complete => {
                stream.reference = ReferenceState::Learning(Box::new(ReferenceBuilder::new(
                    start,
                    width,
                    buckets,
                    sample,
                    max_categories,
                )));
            }
            // Traffic after the window freezes the reference at once, so that the
            // first bucket after it already has drift.
            ReferenceState::Learning(b) if start > b.last_bucket() => {
                freeze(stream, &obs.stream, output_dir, shared);
            }
            _ => {}
        }
        self.sequence += 1;
        let categorical = self.categorical_features.get(&obs.stream.model).unwrap_or(&self.no_features);
        let Stream { open, known_features, class_names, reference, .. } = stream;
        let (reference, builder) = match reference {
            ReferenceState::Frozen(r, _) => (Some(&**r), None),
            ReferenceState::Learning(b) if b.covers(start) => (None, Some(&mut **b)),
            _ => (None, None),
        };
        let bucket = open.entry(start).or_insert_with(|| StreamBucket::new(start));
        bucket.observe(
            obs,
            StreamContext {
                config: &self.config,
                known_features,
                categorical_features: categorical,
                reference,
                builder,
                class_names,
                sequence: self.sequence,
                features_sampled,
                output_columns: &mut self.output_columns,
            },
        );
        Observed { bucket_start: start, accepted: true }
    }

    /// Counts an exchange's request, latency and decode errors in its model's bucket.
    /// Facts for a bucket that already closed are counted in the next open one.
    pub fn record_exchange(&mut self, facts: &ExchangeFacts) {
        let model = self.model_slot(facts.model.as_deref());
        let start = self.bucket_of(facts.event_time);
        self.model_bucket(&model, start, |bucket| bucket.count(facts));
    }

    /// Counts exchanges the capture queue dropped, in the bucket of `now`.
    pub fn record_capture_dropped(&mut self, now: SystemTime, dropped: u64) {
        let start = self.bucket_of(now);
        self.reports_capture = true;
        self.model_bucket(GLOBAL_MODEL, start, |bucket| *bucket.capture_dropped.get_or_insert(0) += dropped);
    }

    /// Closes every bucket whose end plus grace is at or before `now`, filling gaps of
    /// known streams with empty buckets (heartbeats).
    pub fn close_due(&mut self, now: SystemTime) -> Vec<ClosedBucket> {
        let states = self.close_due_states(now);
        self.into_points(states)
    }

    /// `close_due`, giving the mergeable state of each closed bucket instead of its
    /// points.
    pub fn close_due_states(&mut self, now: SystemTime) -> Vec<BucketState> {
        let limit = (epoch_seconds(now) - self.grace - self.width).div_euclid(self.width) * self.width;
        self.close_through(limit)
    }

    /// Closes every open bucket (shutdown).
    pub fn flush_all(&mut self) -> Vec<ClosedBucket> {
        let states = self.flush_all_states();
        self.into_points(states)
    }

    /// The points of closed buckets' states, in the engine's configuration.
    pub fn into_points(&self, states: Vec<BucketState>) -> Vec<ClosedBucket> {
        states.into_iter().map(|state| state.into_closed(&self.config)).collect()
    }

    /// `flush_all`, giving states instead of points.
    pub fn flush_all_states(&mut self) -> Vec<BucketState> {
        let width = self.width;
        // A stream whose late rows have no later bucket to be reported in gets one.
        let last_stream = self
            .streams
            .values()
            .filter_map(|s| match (s.open.keys().next_back(), s.closed_through) {
                (Some(open), _) => Some(*open),
                (None, Some(closed)) if s.late_rows > 0 => Some(closed + width),
                _ => None,
            })
            .max();
        let last_model = self.models.values().filter_map(|m| m.open.keys().next_back()).max().copied();
        match last_stream.max(last_model) {
            Some(limit) => self.close_through(limit),
            None => Vec::new(),
        }
    }

    /// The frozen references of all streams.
    pub fn references(&self) -> Vec<Reference> {
        self.streams
            .values()
            .filter_map(|s| match &s.reference {
                ReferenceState::Frozen(r, _) => Some((**r).clone()),
                _ => None,
            })
            .collect()
    }

    /// The frozen references as the JSON array `monitor.reference_file` accepts.
    pub fn export_references(&self) -> serde_json::Value {
        serde_json::to_value(self.references()).unwrap_or(serde_json::Value::Array(Vec::new()))
    }

    fn close_through(&mut self, limit: i64) -> Vec<BucketState> {
        let width = self.width;
        let reports_capture = self.reports_capture;
        let mut out: BTreeMap<(i64, String), BucketState> = BTreeMap::new();
        for (model, state) in &mut self.models {
            let mut starts: BTreeSet<i64> = state.open.range(..=limit).map(|(s, _)| *s).collect();
            let heartbeat = model == GLOBAL_MODEL && reports_capture;
            if heartbeat {
                if let Some(closed) = state.closed_through {
                    starts.extend(gap_starts(closed, limit, width));
                }
            }
            for start in starts {
                let mut bucket = state.open.remove(&start).unwrap_or_else(ModelBucket::new);
                if heartbeat {
                    bucket.capture_dropped.get_or_insert(0);
                }
                out.entry((start, model.clone())).or_insert_with(|| BucketState::new(model, start)).exchanges =
                    Some(bucket);
                state.closed_through = Some(state.closed_through.map_or(start, |c| c.max(start)));
            }
        }
        let output_dir = self.output_dir.as_deref();
        let shared = self.shared_references.as_deref();
        for (key, stream) in &mut self.streams {
            let mut starts: BTreeSet<i64> = stream.open.range(..=limit).map(|(s, _)| *s).collect();
            if let Some(closed) = stream.closed_through {
                starts.extend(gap_starts(closed, limit, width));
            }
            for start in starts {
                let bucket = stream.open.remove(&start).unwrap_or_else(|| StreamBucket::new(start));
                // Buckets of the window a reference was learned from are not compared to it.
                let (reference, reference_fingerprint) = match &stream.reference {
                    ReferenceState::Frozen(r, fingerprint) if !r.learned_from(start) => {
                        (Some(r.clone()), Some(*fingerprint))
                    }
                    _ => (None, None),
                };
                let closed = StreamState {
                    bucket,
                    known_features: stream.known_features.clone(),
                    class_names: stream.class_names.clone(),
                    late_dropped: std::mem::take(&mut stream.late_rows),
                    reference_fingerprint,
                    reference,
                };
                out.entry((start, key.model.clone()))
                    .or_insert_with(|| BucketState::new(&key.model, start))
                    .streams
                    .insert(key.clone(), closed);
                stream.closed_through = Some(start);
                if matches!(&stream.reference, ReferenceState::Learning(b) if start >= b.last_bucket()) {
                    freeze(stream, key, output_dir, shared);
                }
            }
        }
        out.into_values().collect()
    }

    /// The bucket containing `start`'s instant is complete unless the engine started
    /// strictly inside it.
    fn is_complete(&self, start: i64) -> bool {
        !(start < self.started_at && self.started_at < start + self.width)
    }

    fn new_stream(&self, key: &StreamKey) -> Stream {
        let mut reference = ReferenceState::Pending;
        if let Some(r) = self.reference_set.find(key) {
            reference = ReferenceState::frozen(r.clone());
        } else if let Some(r) = self.shared_references.as_ref().and_then(|shared| shared.find(key)) {
            tracing::info!(message = "Uses the fleet's shared drift reference.", model = %key.model);
            reference = ReferenceState::frozen(r);
        } else if let Some(dir) = &self.output_dir {
            let path = reference_path(dir, key);
            if path.exists() {
                match Reference::load(&path) {
                    Ok(r) => {
                        tracing::info!(message = "Loaded the persisted drift reference.", path = %path.display());
                        let r = match &self.shared_references {
                            Some(shared) => shared.adopt(key, r),
                            None => r,
                        };
                        reference = ReferenceState::frozen(r);
                    }
                    Err(error) => {
                        tracing::warn!(message = "Ignoring an unreadable drift reference; learning a new one.", %error);
                    }
                }
            }
        }
        Stream {
            open: BTreeMap::new(),
            closed_through: None,
            known_features: BTreeSet::new(),
            class_names: None,
            reference,
            late_rows: 0,
        }
    }

    /// The model a fact is counted under: itself, or the global pseudo-model when it
    /// is unknown or when the number of models has reached its bound.
    fn model_slot<'m>(&self, model: Option<&'m str>) -> std::borrow::Cow<'m, str> {
        match model.map(client_model_key) {
            Some(m) if self.models.contains_key(m.as_ref()) || self.models.len() <= self.config.max_streams => m,
            _ => std::borrow::Cow::Borrowed(GLOBAL_MODEL),
        }
    }

    /// Updates the open model bucket for `start`, or the next open one when `start` is
    /// closed. The model's name is copied only for its first bucket, not per exchange.
    fn model_bucket(&mut self, model: &str, start: i64, update: impl FnOnce(&mut ModelBucket)) {
        let width = self.width;
        let open_bucket = |state: &mut ModelState| {
            let start = match state.closed_through {
                Some(closed) if start <= closed => closed + width,
                _ => start,
            };
            update(state.open.entry(start).or_insert_with(ModelBucket::new));
        };
        match self.models.get_mut(model) {
            Some(state) => open_bucket(state),
            None => open_bucket(self.models.entry(model.to_string()).or_default()),
        }
    }
}

/// Starts of the buckets after `closed` up to `limit`, at most `MAX_HEARTBEAT_BUCKETS`.
fn gap_starts(closed: i64, limit: i64, width: i64) -> impl Iterator<Item = i64> {
    let first = (closed + width).max(limit - (MAX_HEARTBEAT_BUCKETS - 1) * width);
    (0..).map(move |i| first + i * width).take_while(move |s| *s <= limit)
}

/// Freezes a stream's reference (the fleet's, when one was published first) and
/// persists it when there is an output dir.
fn freeze(
    stream: &mut Stream,
    key: &StreamKey,
    output_dir: Option<&std::path::Path>,
    shared: Option<&dyn SharedReferences>,
) {
    let ReferenceState::Learning(builder) = std::mem::replace(&mut stream.reference, ReferenceState::Pending) else {
        return;
    };
    let mut reference = builder.freeze(key);
    if let Some(shared) = shared {
        reference = shared.adopt(key, reference);
    }
    if let Some(dir) = output_dir {
        let path = reference_path(dir, key);
        match reference.save(&path) {
            Ok(()) => tracing::info!(message = "Froze and saved the drift reference.", path = %path.display()),
            Err(error) => {
                tracing::warn!(message = "Could not save the drift reference; it is kept in memory.", %error, path = %path.display())
            }
        }
    }
    stream.reference = ReferenceState::frozen(reference);
}

impl ModelBucket {
    /// Counts one exchange's request, latency and decode errors.
    fn count(&mut self, facts: &ExchangeFacts) {
        // Keys are looked up before they are built: this runs for every exchange, and
        // a bucket has a handful of (method, status, origin) keys.
        let counted = self
            .requests
            .iter_mut()
            .find(|((method, status, origin), _)| {
                *method == facts.method && *status == facts.status && *origin == facts.origin
            })
            .map(|(_, count)| *count += 1);
        if counted.is_none() {
            self.requests.insert((facts.method, facts.status.clone(), facts.origin), 1);
        }
        self.latency.add(facts.upstream_latency.as_secs_f64() * 1000.0);
        for reason in &facts.decode_errors {
            match self.decode_errors.get_mut(*reason) {
                Some(count) => *count += 1,
                None => {
                    self.decode_errors.insert((*reason).to_string(), 1);
                }
            }
        }
    }

    fn new() -> Self {
        // Latency needs no finer accuracy than the default sketch's 1 %.
        ModelBucket {
            requests: BTreeMap::new(),
            latency: Summary::new(0.01),
            decode_errors: BTreeMap::new(),
            stream_limit_dropped: 0,
            capture_dropped: None,
        }
    }

    fn points(&self, model: &str, start: i64) -> Vec<Point> {
        use catalog::Dimension::{Method, Origin, Reason, Stat, Status};
        let scope = ScopeValues { model: (model != GLOBAL_MODEL).then_some(model), ..ScopeValues::default() };
        let mut out = Vec::new();
        let mut push = |sample: Sample<'_>| out.extend(Point::from_sample(&sample, &scope, start));
        if let Some(dropped) = self.capture_dropped {
            push(catalog::CAPTURE_DROPPED.sample(dropped as f64));
        }
        for ((method, status, origin), count) in &self.requests {
            let sample =
                catalog::REQUEST_COUNT.sample(*count as f64).with(Method, method.as_str()).with(Status, status);
            push(match origin {
                Some(origin) => sample.with(Origin, origin.as_str()),
                None => sample,
            });
        }
        for (stat, q) in [("q50", 0.5), ("q90", 0.9), ("q99", 0.99)] {
            if let Some(v) = self.latency.quantile(q) {
                push(catalog::UPSTREAM_LATENCY_MS.sample(v).with(Stat, stat));
            }
        }
        if let Some(v) = self.latency.max() {
            push(catalog::UPSTREAM_LATENCY_MS.sample(v).with(Stat, "max"));
        }
        for (reason, count) in &self.decode_errors {
            push(catalog::DECODE_ERRORS.sample(*count as f64).with(Reason, reason));
        }
        if self.stream_limit_dropped > 0 {
            push(catalog::STREAM_LIMIT_DROPPED.sample(self.stream_limit_dropped as f64));
        }
        out
    }
}

/// Whole seconds since the epoch (negative before it).
pub fn epoch_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    }
}

/// A client's model name as the engine keys it: names of the form `_…_mltap__…`
/// (one or more `_`, then `_mltap__`) get one more leading `_`, so that no client model
/// is ever counted as the pseudo-model `__mltap__`, and two client names stay two.
fn client_model_key(name: &str) -> std::borrow::Cow<'_, str> {
    let underscores = name.bytes().take_while(|b| *b == b'_').count();
    if underscores >= 2 && name[underscores - 1..].starts_with("_mltap__") {
        std::borrow::Cow::Owned(format!("_{name}"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}
