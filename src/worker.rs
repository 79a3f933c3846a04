//! The worker: takes exchanges off the capture queue, decodes them into
//! observations, feeds the monitoring engine, and hands each closed bucket to the
//! Anodot files, the Prometheus model gauges and any attached listeners.
//!
//! It runs on its own threads, never on the proxy's runtime: one thread moves
//! exchanges from the capture queue (in batches every 20 ms, so that the hot path
//! never has to wake it) to a pool of decode threads, which hand each
//! decoded exchange to the aggregation (monitor) thread of its model. Each monitor
//! thread owns an engine for its share of the models (so a model's streams and files
//! stay on one thread), ticks every 250 ms (or a quarter of the bucket width if
//! shorter), closes due buckets and writes their files.
//!
//! The capture thread takes the count lane first and whole (count records are small
//! and cheap: their response only is decoded), then sampled exchanges only while the
//! decode threads have room, so that a backlog stays in the sampled lane, where it
//! lowers the proxy's keep-probability. When the worker falls behind, the proxy sheds
//! statistics by uniform sampling and keeps the counts exact (`capture` module): the
//! worker never slows the proxy down. On `finish`, it drains both lanes, flushes the
//! open buckets, writes their files and returns.
//!
//! Other components attach through two hooks, called on the monitor threads (so
//! they must be quick, thread-safe, and hand heavy work to their own threads):
//! `BucketListener` sees every closed bucket after its file is written,
//! `ObservationListener` sees every decoded observation with the start of its bucket.

use crate::capture::{CaptureReceiver, CaptureStats, Exchange};
use crate::fleet::{Fleet, FleetSettings};
use crate::monitor::{BucketState, ClosedBucket, Engine, EngineOptions, ExchangeFacts, MonitorConfig, ReferenceSet};
use crate::sinks::files::FileSink;
use crate::sinks::prometheus::ModelGauges;
use crate::tfserving::{
    DecodeLimits, Decoder, ModelConfig, Observation, SchemaCache, SchemaSource, ServedVersions, VersionSource,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How often the capture thread takes what has queued up. It does not wait in `recv`:
/// a parked receiver makes every `offer` on the proxy's hot path wake this thread
/// (a futex write per exchange), which costs proxy throughput.
const CAPTURE_TICK: Duration = Duration::from_millis(20);
/// At shutdown, how long the queue may stay empty before the worker stops taking.
const FINISH_IDLE: Duration = Duration::from_millis(200);
/// Exchanges waiting between the capture thread and the decode threads; small, since
/// the capture queue in front of it is the buffer that counts drops.
const DECODE_HANDOFF: usize = 32;
/// Decoded exchanges waiting for the monitor thread; each holds its decoded columns
/// (a 64 × 100 float batch is 50 KiB), so this stays small.
const MONITOR_HANDOFF: usize = 16;
/// How long one signature fetch from TF Serving may take.
const SCHEMA_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two ticks of the monitor thread.
const MAX_TICK: Duration = Duration::from_millis(250);

/// Sees every closed bucket (after its Anodot file is written), on the monitor thread.
pub trait BucketListener: Send + Sync + 'static {
    fn on_closed(&self, bucket: &ClosedBucket);
}

/// Sees every decoded observation with the start of its bucket (event time), on the
/// monitor thread, including observations the engine counted as late: the prediction
/// still happened and its labels still belong to that bucket. The observation is
/// shared (`Arc`) so that a listener can keep it or send it on without copying it.
pub trait ObservationListener: Send + Sync + 'static {
    fn on_observation(&self, observation: &Arc<Observation>, bucket_start: i64);
}

/// The listeners of a worker; cheap to clone, listeners can be added at any time.
#[derive(Clone, Default)]
pub struct Hooks {
    buckets: Arc<RwLock<Vec<Arc<dyn BucketListener>>>>,
    observations: Arc<RwLock<Vec<Arc<dyn ObservationListener>>>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").finish_non_exhaustive()
    }
}

impl Hooks {
    pub fn add_bucket_listener(&self, listener: Arc<dyn BucketListener>) {
        self.buckets.write().unwrap_or_else(|p| p.into_inner()).push(listener);
    }

    pub fn add_observation_listener(&self, listener: Arc<dyn ObservationListener>) {
        self.observations.write().unwrap_or_else(|p| p.into_inner()).push(listener);
    }

    fn closed(&self, bucket: &ClosedBucket) {
        for listener in self.buckets.read().unwrap_or_else(|p| p.into_inner()).iter() {
            if std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_closed(bucket))).is_err() {
                tracing::error!(message = "A bucket listener panicked; monitoring goes on.", model = %bucket.model);
            }
        }
    }

    fn observed(&self, observation: &Arc<Observation>, bucket_start: i64) {
        let listeners = self.observations.read().unwrap_or_else(|p| p.into_inner());
        for listener in listeners.iter() {
            if std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_observation(observation, bucket_start)))
                .is_err()
            {
                tracing::error!(message = "An observation listener panicked; monitoring goes on.");
            }
        }
    }
}

/// Counters of the worker itself, on `/metrics`.
#[derive(Debug, Default, Clone)]
struct WorkerMetrics {
    received: Family<ProtocolLabels, Counter>,
    exchanges: Counter,
    observations: Counter,
    files_written: Counter,
    file_errors: Counter,
}

impl WorkerMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("worker_exchanges_received", "Exchanges taken off the capture queue", self.received.clone());
        registry.register("worker_exchanges_decoded", "Exchanges decoded and aggregated", self.exchanges.clone());
        registry.register("worker_observations", "Observations aggregated", self.observations.clone());
        registry.register("worker_files_written", "Anodot files written or merged", self.files_written.clone());
        registry.register("worker_file_errors", "Anodot files that could not be written", self.file_errors.clone());
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: &'static str,
}

/// What a decode thread hands to the monitor thread.
struct Decoded {
    facts: ExchangeFacts,
    observations: Vec<Arc<Observation>>,
    /// Whether the observations carry the inputs (feature statistics), or only the
    /// outputs of a count record.
    sampled: bool,
    /// Whether observation listeners (the label join) get the observations: not when
    /// the rows of a count record cannot be named because the model ids them by a
    /// feature of the inputs that were not copied.
    to_listeners: bool,
}

/// What the worker takes from the configuration.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Bucket width.
    pub bucket: Duration,
    /// Where the Anodot files and the learned references are written.
    pub output_dir: PathBuf,
    /// TF Serving's gRPC port, asked for the signatures that name unnamed REST inputs.
    pub grpc_upstream: http::Uri,
    /// TF Serving's REST port, asked when the gRPC port cannot answer.
    pub rest_upstream: http::Uri,
    /// The `[monitor]` section: engine limits and thread counts.
    pub monitor: MonitorConfig,
    /// The `[models.NAME]` overrides, for decoding and categorical features.
    pub models: BTreeMap<String, ModelConfig>,
    /// The drift references of `monitor.reference_file`, read once at start.
    pub references: Arc<ReferenceSet>,
    /// With a shared store: closed buckets are merged across replicas and emitted
    /// once by the fleet (`crate::fleet`) instead of by this worker alone.
    pub fleet: Option<FleetSettings>,
}

impl WorkerSettings {
    /// The engine's options, with the engine started now.
    fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            bucket: self.bucket,
            monitor: self.monitor.clone(),
            output_dir: Some(self.output_dir.clone()),
            categorical_features: self
                .models
                .iter()
                .map(|(name, m)| (name.clone(), m.categorical_features.iter().cloned().collect()))
                .collect(),
            started_at: SystemTime::now(),
        }
    }
}

/// The running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    /// Listeners, shared with the monitor thread.
    hooks: Hooks,
    /// Tells the capture thread to drain the queue and stop.
    stop: Arc<tokio::sync::Notify>,
    /// Capture, decode and monitor threads, joined by `finish`.
    threads: Vec<JoinHandle<()>>,
    /// The fleet, finished after the monitor threads handed it their last buckets.
    fleet: Option<Fleet>,
    /// The Prometheus model metrics the monitor threads update.
    gauges: ModelGauges,
}

/// Starts the worker on its own threads; registers its gauges and counters.
pub fn spawn(config: WorkerSettings, receiver: CaptureReceiver, registry: &mut Registry) -> WorkerHandle {
    spawn_with(config, receiver, registry, Hooks::default())
}

/// `spawn` with listeners attached from the first exchange on.
pub fn spawn_with(
    config: WorkerSettings,
    receiver: CaptureReceiver,
    registry: &mut Registry,
    hooks: Hooks,
) -> WorkerHandle {
    let gauges = ModelGauges::new();
    gauges.register(registry);
    let metrics = WorkerMetrics::default();
    metrics.register(registry);
    let stop = Arc::new(tokio::sync::Notify::new());
    let capture_stats = receiver.stats().clone();

    let (exchange_tx, exchange_rx) = mpsc::sync_channel::<Exchange>(DECODE_HANDOFF);
    let exchange_rx = Arc::new(Mutex::new(exchange_rx));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    let pick = |configured: usize| if configured == 0 { cores } else { configured };
    let (decoders, shards) = (pick(config.monitor.decode_threads), pick(config.monitor.aggregation_threads));
    let mut to_shards = Vec::with_capacity(shards);
    let mut shard_inputs = Vec::with_capacity(shards);
    for _ in 0..shards {
        let (tx, rx) = mpsc::sync_channel::<Decoded>(MONITOR_HANDOFF);
        to_shards.push(tx);
        shard_inputs.push(rx);
    }
    let to_shards = Arc::new(to_shards);
    let mut threads = Vec::new();

    let stop_capture = stop.clone();
    let received = metrics.received.clone();
    threads.extend(spawn_thread("mltap-capture", move || capture_loop(receiver, exchange_tx, stop_capture, received)));

    let mut decoder = Decoder::new(config.models.clone()).with_limits(DecodeLimits::default());
    // The signature fetcher (names of unnamed REST inputs) is a task on the caller's
    // runtime; without one, unnamed inputs keep the name `input`.
    if tokio::runtime::Handle::try_current().is_ok() {
        decoder = decoder.with_schemas(SchemaCache::spawn(SchemaSource::new(
            Some(config.grpc_upstream.clone()),
            Some(config.rest_upstream.clone()),
            SCHEMA_TIMEOUT,
        )));
        // REST calls that name no version are attributed to the one TF Serving serves.
        decoder = decoder.with_versions(ServedVersions::spawn(VersionSource::new(config.rest_upstream.clone())));
    }
    let decoder = Arc::new(decoder);
    for i in 0..decoders {
        let (rx, tx, decoder) = (exchange_rx.clone(), to_shards.clone(), decoder.clone());
        threads.extend(spawn_thread(&format!("mltap-decode-{i}"), move || decode_loop(&decoder, &rx, &tx)));
    }
    drop(to_shards);

    let emitter = Emitter {
        files: FileSink::new(&config.output_dir),
        gauges: gauges.clone(),
        hooks: hooks.clone(),
        metrics: metrics.clone(),
    };
    let fleet = config.fleet.clone().and_then(|settings| {
        let emitter = emitter.clone();
        let emit: crate::fleet::EmitFn = Arc::new(move |bucket: ClosedBucket| emitter.emit(vec![bucket]));
        Fleet::start(settings, emit, registry)
            .map_err(|error| {
                tracing::error!(message = "The fleet cannot start; this replica emits its own buckets.", %error)
            })
            .ok()
    });
    let mut options = config.engine_options();
    options.monitor.max_streams = options.monitor.max_streams.div_ceil(shards);
    for (i, input) in shard_inputs.into_iter().enumerate() {
        let mut engine = Engine::with_references(options.clone(), config.references.clone());
        if let Some(fleet) = &fleet {
            engine.share_references(fleet.references());
        }
        let monitor = MonitorThread {
            engine,
            emitter: emitter.clone(),
            fleet: fleet.clone(),
            metrics: metrics.clone(),
            // One thread reports the capture queue's drops.
            capture_stats: (i == 0).then(|| capture_stats.clone()),
            capture_dropped_seen: 0,
            tick: (config.bucket / 4).clamp(Duration::from_millis(50), MAX_TICK),
        };
        threads.extend(spawn_thread(&format!("mltap-monitor-{i}"), move || monitor.run(input)));
    }
    WorkerHandle { hooks, stop, threads, fleet, gauges }
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new().name(name.to_string()).spawn(f) {
        Ok(handle) => Some(handle),
        Err(error) => {
            // The process is out of threads; monitoring degrades, the proxy goes on.
            tracing::error!(message = "Cannot start a worker thread.", %error, thread = name);
            None
        }
    }
}

impl WorkerHandle {
    /// The Prometheus model metrics, for label metrics shown beside the traffic's.
    pub fn model_gauges(&self) -> ModelGauges {
        self.gauges.clone()
    }

    /// The listeners; add to them at any time.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// Attaches a listener of closed buckets.
    pub fn add_bucket_listener(&self, listener: Arc<dyn BucketListener>) {
        self.hooks.add_bucket_listener(listener);
    }

    /// Attaches a listener of observations.
    pub fn add_observation_listener(&self, listener: Arc<dyn ObservationListener>) {
        self.hooks.add_observation_listener(listener);
    }

    /// Drains the capture queue, flushes the open buckets, writes their files and
    /// returns once every worker thread has ended. Call it after the proxy stopped
    /// accepting exchanges.
    pub async fn finish(self) {
        let _ = tokio::task::spawn_blocking(move || self.finish_blocking()).await;
    }

    /// `finish` for callers outside an async context.
    pub fn finish_blocking(self) {
        self.stop.notify_one();
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!(message = "A worker thread panicked before shutdown.");
            }
        }
        if let Some(fleet) = self.fleet {
            fleet.finish();
        }
    }
}

/// Moves exchanges from the capture queue to the decode threads, in batches on a
/// short tick, until stopped; then drains the queue.
fn capture_loop(
    mut receiver: CaptureReceiver,
    to_decoders: mpsc::SyncSender<Exchange>,
    stop: Arc<tokio::sync::Notify>,
    received: Family<ProtocolLabels, Counter>,
) {
    let count = |exchange: &Exchange| {
        received.get_or_create(&ProtocolLabels { protocol: exchange.protocol.as_str() }).inc();
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            tracing::error!(message = "Cannot start the capture thread's runtime.", %error);
            return;
        }
    };
    runtime.block_on(async {
        let mut tick = tokio::time::interval(CAPTURE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A sampled exchange taken off the queue that the decode threads had no room for.
        let mut waiting: Option<Exchange> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    while let Some(record) = receiver.try_recv_count() {
                        count(&record);
                        if to_decoders.send(record).is_err() {
                            return;
                        }
                    }
                    loop {
                        let exchange = match waiting.take() {
                            Some(exchange) => exchange,
                            None => match receiver.try_recv() {
                                Some(exchange) => {
                                    count(&exchange);
                                    exchange
                                }
                                None => break,
                            },
                        };
                        match to_decoders.try_send(exchange) {
                            Ok(()) => {}
                            Err(mpsc::TrySendError::Full(exchange)) => {
                                waiting = Some(exchange);
                                break;
                            }
                            Err(mpsc::TrySendError::Disconnected(_)) => return,
                        }
                    }
                }
                _ = stop.notified() => break,
            }
        }
        // Shutdown: what is queued, and what exchanges still in flight add, until every
        // sender is gone or the queue stays idle for a moment.
        if let Some(exchange) = waiting {
            if to_decoders.send(exchange).is_err() {
                return;
            }
        }
        while let Ok(Some(exchange)) = tokio::time::timeout(FINISH_IDLE, receiver.recv_any()).await {
            count(&exchange);
            if to_decoders.send(exchange).is_err() {
                return;
            }
        }
    });
}

/// Decodes exchanges until the capture thread is gone.
fn decode_loop(
    decoder: &Decoder,
    from_capture: &Mutex<mpsc::Receiver<Exchange>>,
    to_shards: &[mpsc::SyncSender<Decoded>],
) {
    loop {
        let exchange = {
            let rx = from_capture.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(exchange) => exchange,
                Err(_) => return,
            }
        };
        let decoded = match std::panic::catch_unwind(AssertUnwindSafe(|| decoder.decode(&exchange))) {
            Ok(decoded) => decoded,
            Err(_) => {
                tracing::error!(message = "The decoder panicked on an exchange; it is counted as a decode error.",
                    path = %exchange.path);
                crate::tfserving::Decoded {
                    errors: vec![crate::tfserving::DecodeError { reason: "decoder_panic", detail: String::new() }],
                    ..Default::default()
                }
            }
        };
        let facts = ExchangeFacts::new(&exchange, &decoded);
        drop(exchange);
        let sampled = decoded.sampled;
        let to_listeners = sampled || !facts.model.as_deref().is_some_and(|m| decoder.ids_rows_by_feature(m));
        let observations = decoded.observations.into_iter().map(Arc::new).collect();
        let shard = &to_shards[shard_of(facts.model.as_deref(), to_shards.len())];
        if shard.send(Decoded { facts, observations, sampled, to_listeners }).is_err() {
            return;
        }
    }
}

/// The aggregation thread of a model: all its streams (and its Anodot files) stay
/// on one thread; facts without a model go to the first, which also reports drops.
fn shard_of(model: Option<&str>, shards: usize) -> usize {
    let Some(model) = model else { return 0 };
    // FNV-1a: stable across runs and platforms, unlike std's randomized hasher.
    let hash = model.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % shards.max(1) as u64) as usize
}

/// Where closed buckets' points go: the Anodot files, the Prometheus model gauges and
/// the bucket listeners. Used by the monitor threads, and by the fleet for the merged
/// buckets this replica claims.
#[derive(Clone)]
struct Emitter {
    files: FileSink,
    gauges: ModelGauges,
    hooks: Hooks,
    metrics: WorkerMetrics,
}

impl Emitter {
    fn emit(&self, closed: Vec<ClosedBucket>) {
        for bucket in closed {
            match self.files.write(&bucket.model, bucket.start, &bucket.points) {
                Ok(_) => {
                    self.metrics.files_written.inc();
                }
                Err(error) => {
                    self.metrics.file_errors.inc();
                    tracing::warn!(message = "Could not write an Anodot file.", %error, model = %bucket.model,
                        start = bucket.start);
                }
            };
            // The global pseudo-model's counts (decode errors of unknown models) too.
            self.gauges.update(&bucket.model, bucket.start, &bucket.points);
            self.hooks.closed(&bucket);
        }
    }
}

/// The state of one aggregation (monitor) thread.
struct MonitorThread {
    engine: Engine,
    emitter: Emitter,
    /// With a shared store, closed buckets' states go to the fleet instead.
    fleet: Option<Fleet>,
    metrics: WorkerMetrics,
    /// The capture queue's counters, for `capture_dropped` (first thread only).
    capture_stats: Option<Arc<CaptureStats>>,
    /// `capture_stats.dropped` already counted.
    capture_dropped_seen: u64,
    tick: Duration,
}

impl MonitorThread {
    fn run(mut self, from_decoders: mpsc::Receiver<Decoded>) {
        let mut next_tick = Instant::now() + self.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match from_decoders.recv_timeout(wait) {
                Ok(decoded) => self.feed(decoded),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                self.count_capture_drops();
                let closed = self.engine.close_due_states(SystemTime::now());
                self.emit(closed);
                next_tick = Instant::now() + self.tick;
            }
        }
        self.count_capture_drops();
        let closed = self.engine.flush_all_states();
        self.emit(closed);
    }

    fn feed(&mut self, decoded: Decoded) {
        self.metrics.exchanges.inc();
        self.engine.record_exchange(&decoded.facts);
        self.emitter.gauges.observe_latency(decoded.facts.model.as_deref(), decoded.facts.upstream_latency);
        for observation in &decoded.observations {
            let observed = if decoded.sampled {
                self.engine.observe(observation)
            } else {
                self.engine.observe_unsampled(observation)
            };
            self.metrics.observations.inc();
            if decoded.to_listeners {
                self.emitter.hooks.observed(observation, observed.bucket_start);
            }
        }
    }

    fn count_capture_drops(&mut self) {
        let Some(stats) = &self.capture_stats else { return };
        let dropped = stats.dropped.load(Ordering::Relaxed);
        let delta = dropped.saturating_sub(self.capture_dropped_seen);
        self.capture_dropped_seen = dropped;
        self.engine.record_capture_dropped(SystemTime::now(), delta);
    }

    /// Hands closed buckets to the fleet, or turns them into points and emits them.
    fn emit(&self, closed: Vec<BucketState>) {
        match &self.fleet {
            Some(fleet) => fleet.submit(closed),
            None => self.emitter.emit(self.engine.into_points(closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_always_goes_to_the_same_aggregation_thread() {
        for shards in 1..5 {
            let first = shard_of(Some("iris"), shards);
            assert!(first < shards);
            assert_eq!(shard_of(Some("iris"), shards), first);
            assert_eq!(shard_of(None, shards), 0);
        }
        let spread: std::collections::BTreeSet<usize> =
            ["iris", "credit", "churn", "bench", "census", "price"].iter().map(|m| shard_of(Some(m), 3)).collect();
        assert!(spread.len() > 1, "models should spread over the threads");
    }
}
