//! The worker: takes exchanges off the capture queue, decodes them into
//! observations, feeds the monitoring engine, and hands each closed bucket to the
//! Anodot files, the Prometheus model gauges and any attached listeners.
//!
//! It runs on its own threads, never on the proxy's runtime. Each lane of the capture
//! queue has its own decode threads, which take what has queued up in batches and
//! sleep a short tick when the lane is empty (so that the hot path never has to wake
//! them), and hand each batch of decoded exchanges to the aggregation (monitor) thread
//! of its model. Each monitor thread owns an engine for its share of the models (so a
//! model's streams and files stay on one thread), ticks every 250 ms (or a quarter of
//! the bucket width if shorter), closes due buckets and writes their files.
//!
//! What must be exact goes first, and what may be sampled gives way:
//! - the **count threads** (`mltap-count-N`) take count records: only their response
//!   is decoded, for the request, row and class counts and the label join. The monitor
//!   threads take every waiting batch of them before each sampled batch.
//! - the **statistics threads** (`mltap-decode-N`) take sampled exchanges, whose
//!   requests are decoded for feature statistics. While mltap's threads wait for CPU
//!   (`CpuGovernor`), the share of exchanges the proxy samples is lowered, so that
//!   statistics give way to serving and come from a thinner uniform sample; counts stay
//!   exact. With `monitor.statistics_priority = "background"` these threads also run at
//!   Linux's `SCHED_IDLE`.
//!
//! On `finish`, the decode threads drain their lanes, the monitor threads flush the
//! open buckets and write their files, and it returns.
//!
//! Other components attach through two hooks, called on the monitor threads (so
//! they must be quick, thread-safe, and hand heavy work to their own threads):
//! `BucketListener` sees every closed bucket after its file is written,
//! `ObservationListener` sees every decoded observation with the start of its bucket.

use crate::capture::{CaptureReceiver, CaptureStats, Exchange, LaneEmpty, LaneReceiver, Protocol, FULL_SHARE};
use crate::fleet::{Fleet, FleetSettings};
use crate::monitor::{
    BucketState, ClosedBucket, Engine, EngineOptions, ExchangeFacts, MonitorConfig, ReferenceSet, StatisticsPriority,
};
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How long a decode thread sleeps when its lane is empty. It does not wait in a
/// blocking `recv`: a parked receiver makes every `offer` on the proxy's hot path wake
/// a thread (a futex write per exchange), which costs proxy throughput.
const LANE_TICK: Duration = Duration::from_millis(20);
/// The same while finishing, when the last exchanges are drained.
const FINISH_TICK: Duration = Duration::from_millis(5);
/// At shutdown, how long a lane may stay empty before its threads stop taking.
const FINISH_IDLE: Duration = Duration::from_millis(200);
/// Count records a count thread takes per batch; each crosses to its monitor thread
/// in one hand-off (one wake-up per batch, not per exchange).
const COUNT_BATCH: usize = 64;
/// Sampled exchanges a statistics thread takes per batch: few, since each decoded one
/// holds its columns (a 64 × 100 float batch is 50 KiB).
const SAMPLED_BATCH: usize = 4;
/// Decoded batches waiting for a monitor thread; with the batch sizes above this
/// bounds what waits between decode and aggregation to 16 sampled exchanges and a
/// few hundred count records' outputs.
const MONITOR_HANDOFF: usize = 4;
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
    /// Called on the monitor thread after each batch of exchanges it took: a listener
    /// that gathers observations hands them on here, one hand-off per batch.
    fn on_batch_end(&self) {}
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

    fn batch_end(&self) {
        let listeners = self.observations.read().unwrap_or_else(|p| p.into_inner());
        for listener in listeners.iter() {
            if std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_batch_end())).is_err() {
                tracing::error!(message = "An observation listener panicked; monitoring goes on.");
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
    /// Tells the decode threads to drain their lanes and stop.
    stop: Arc<AtomicBool>,
    /// Decode and monitor threads, joined by `finish`.
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
    let stop = Arc::new(AtomicBool::new(false));
    let capture_stats = receiver.stats().clone();
    let (sampled_lane, count_lane) = receiver.into_lanes();
    let (sampled_lane, count_lane) = (Arc::new(Mutex::new(sampled_lane)), Arc::new(Mutex::new(count_lane)));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4);
    let pick = |configured: usize| if configured == 0 { cores } else { configured };
    let (decoders, shards) = (pick(config.monitor.decode_threads), pick(config.monitor.aggregation_threads));
    let mut to_shards = Vec::with_capacity(shards);
    let mut shard_inputs = Vec::with_capacity(shards);
    for _ in 0..shards {
        let (counts_tx, counts) = mpsc::sync_channel::<Handoff>(MONITOR_HANDOFF);
        let (sampled_tx, sampled) = mpsc::sync_channel::<Vec<Decoded>>(MONITOR_HANDOFF);
        to_shards.push(ShardSender { counts: counts_tx, sampled: sampled_tx });
        shard_inputs.push(ShardInput { counts, sampled });
    }
    let to_shards = Arc::new(to_shards);
    let mut threads = Vec::new();

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
    let background = config.monitor.statistics_priority == StatisticsPriority::Background;
    for i in 0..decoders {
        for (lane, sampled, name, batch, in_background) in [
            (&count_lane, false, format!("mltap-count-{i}"), COUNT_BATCH, false),
            (&sampled_lane, true, format!("mltap-decode-{i}"), SAMPLED_BATCH, background),
        ] {
            let decode = LaneDecoder {
                lane: lane.clone(),
                batch,
                sampled,
                decoder: decoder.clone(),
                to_shards: to_shards.clone(),
                stop: stop.clone(),
                received: metrics.received.clone(),
            };
            threads.extend(spawn_thread(&name, move || {
                if in_background {
                    run_in_background();
                }
                decode.run();
            }));
        }
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
            governor: (i == 0 && config.monitor.statistics_yield_cpu).then(|| CpuGovernor::new(capture_stats.clone())),
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
        self.stop.store(true, Ordering::Release);
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

/// Lowers the calling thread to Linux's `SCHED_IDLE`: it then runs only when a core
/// would otherwise idle, and anything else that wakes up preempts it at once.
fn run_in_background() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy, ThreadPriority,
            ThreadSchedulePolicy,
        };
        // Lowering a thread's own priority needs no privilege.
        let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
        if let Err(error) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
            tracing::warn!(message = "Cannot lower the statistics thread's priority; it runs at the normal one.",
                error = ?error);
        }
    }
}

/// One decode thread: takes batches off its lane, decodes them and hands them to
/// the monitor threads, until the lane is closed or, once stopped, stays empty.
struct LaneDecoder {
    /// The lane, shared by the threads of this lane only.
    lane: Arc<Mutex<LaneReceiver>>,
    /// Exchanges taken per batch.
    batch: usize,
    /// Whether this is the sampled lane (else the count lane).
    sampled: bool,
    decoder: Arc<Decoder>,
    to_shards: Arc<Vec<ShardSender>>,
    stop: Arc<AtomicBool>,
    received: Family<ProtocolLabels, Counter>,
}

impl LaneDecoder {
    fn run(self) {
        let mut batch = Vec::with_capacity(self.batch);
        let mut empty_since: Option<Instant> = None;
        loop {
            let closed = self.take(&mut batch);
            if batch.is_empty() {
                if closed {
                    return;
                }
                if !self.stop.load(Ordering::Acquire) {
                    std::thread::sleep(LANE_TICK);
                    continue;
                }
                // Finishing: what is queued, and what exchanges still in flight add,
                // until every sender is gone or the lane stays empty for a moment.
                let since = *empty_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= FINISH_IDLE {
                    return;
                }
                std::thread::sleep(FINISH_TICK);
                continue;
            }
            empty_since = None;
            let drained = batch.len() < self.batch;
            if !self.decode(&mut batch) {
                return;
            }
            // A lane taken faster than it fills is left to fill for a tick, so that
            // exchanges cross to the monitor threads in batches, not one by one.
            if drained && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(LANE_TICK);
            }
        }
    }

    /// Takes up to a batch off the lane; returns whether the lane is closed.
    fn take(&self, batch: &mut Vec<Exchange>) -> bool {
        let mut lane = self.lane.lock().unwrap_or_else(|p| p.into_inner());
        while batch.len() < self.batch {
            match lane.try_recv() {
                Ok(exchange) => batch.push(exchange),
                Err(LaneEmpty::Empty) => return false,
                Err(LaneEmpty::Closed) => return true,
            }
        }
        false
    }

    /// Decodes a batch and hands it to the monitor threads, one hand-off per thread;
    /// false once the monitor threads are gone.
    fn decode(&self, batch: &mut Vec<Exchange>) -> bool {
        let (mut grpc, mut rest) = (0, 0);
        let mut per_shard: Vec<Vec<Decoded>> = (0..self.to_shards.len()).map(|_| Vec::new()).collect();
        for exchange in batch.drain(..) {
            match exchange.protocol {
                Protocol::Grpc => grpc += 1,
                Protocol::Rest => rest += 1,
            }
            let decoded = decode_exchange(&self.decoder, exchange);
            per_shard[shard_of(decoded.facts.model.as_deref(), self.to_shards.len())].push(decoded);
        }
        for (protocol, n) in [(Protocol::Grpc, grpc), (Protocol::Rest, rest)] {
            if n > 0 {
                self.received.get_or_create(&ProtocolLabels { protocol: protocol.as_str() }).inc_by(n);
            }
        }
        for (shard, decoded) in self.to_shards.iter().zip(per_shard) {
            if decoded.is_empty() {
                continue;
            }
            let sent = if self.sampled {
                let sent = shard.sampled.send(decoded).is_ok();
                // Wakes the aggregation thread, which waits on count records only; a
                // full hand-off means it is busy and looks for sampled batches anyway.
                let _ = shard.counts.try_send(Handoff::SampledWaiting);
                sent
            } else {
                shard.counts.send(Handoff::Counts(decoded)).is_ok()
            };
            if !sent {
                return false;
            }
        }
        true
    }
}

/// Decodes one exchange; a panic of the decoder is counted as a decode error.
fn decode_exchange(decoder: &Decoder, exchange: Exchange) -> Decoded {
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
    Decoded { facts, observations, sampled, to_listeners }
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

/// What an aggregation (monitor) thread takes: decoded count records and decoded
/// sampled exchanges, each from its own lane's decode threads.
struct ShardInput {
    counts: mpsc::Receiver<Handoff>,
    sampled: mpsc::Receiver<Vec<Decoded>>,
}

/// The decode threads' ends of an aggregation thread's hand-offs.
struct ShardSender {
    counts: mpsc::SyncSender<Handoff>,
    sampled: mpsc::SyncSender<Vec<Decoded>>,
}

/// What crosses an aggregation thread's first hand-off: decoded count records, or
/// word that a sampled batch waits in the second.
enum Handoff {
    Counts(Vec<Decoded>),
    SampledWaiting,
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
    /// Lowers the statistics share while mltap waits for CPU (first thread only).
    governor: Option<CpuGovernor>,
    tick: Duration,
}

impl MonitorThread {
    fn run(mut self, input: ShardInput) {
        let ShardInput { counts, sampled } = input;
        let (mut counts_open, mut sampled_open) = (true, true);
        let mut next_tick = Instant::now() + self.tick;
        while counts_open || sampled_open {
            // Every count batch waiting goes first, then one sampled batch: counts
            // never wait behind statistics.
            let mut fed = false;
            while counts_open {
                match counts.try_recv() {
                    Ok(Handoff::Counts(batch)) => {
                        self.feed_all(batch);
                        fed = true;
                    }
                    Ok(Handoff::SampledWaiting) => {}
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => counts_open = false,
                }
            }
            if sampled_open {
                match sampled.try_recv() {
                    Ok(batch) => {
                        self.feed_all(batch);
                        fed = true;
                    }
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => sampled_open = false,
                }
            }
            if Instant::now() >= next_tick {
                if let Some(governor) = &mut self.governor {
                    governor.adjust();
                }
                self.count_capture_drops();
                let closed = self.engine.close_due_states(SystemTime::now());
                self.emit(closed);
                next_tick = Instant::now() + self.tick;
            }
            // Sampled batches come with a wake-up on the count hand-off, so waiting on it
            // alone misses neither. (Every decode thread holds a count sender: once the
            // count hand-off is closed, the sampled one is drained above.)
            if !fed && counts_open {
                match counts.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                    Ok(Handoff::Counts(batch)) => self.feed_all(batch),
                    Ok(Handoff::SampledWaiting) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => counts_open = false,
                }
            }
        }
        self.count_capture_drops();
        let closed = self.engine.flush_all_states();
        self.emit(closed);
    }

    fn feed_all(&mut self, batch: Vec<Decoded>) {
        for decoded in batch {
            self.feed(decoded);
        }
        self.emitter.hooks.batch_end();
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

/// Wait / (run + wait) of mltap's threads over a tick above which its threads are
/// taken to compete for CPU; after `CONTENDED_TICKS` such ticks in a row the
/// statistics share halves, and again after each further one.
const CONTENDED: f64 = 0.15;
/// Contended ticks in a row before the share falls: a moment of contention (start-up,
/// a neighbour's burst) leaves statistics alone.
const CONTENDED_TICKS: u32 = 4;
/// Below it, the share grows back by `SHARE_STEP` per tick.
const UNCONTENDED: f64 = 0.05;
/// Cores' worth of CPU mltap's threads must have run during a tick for its waits to
/// count: a lightly loaded mltap keeps sampling every exchange whatever else the
/// machine does.
const BUSY_CORES: f64 = 0.5;
/// The share's floor: statistics never stop altogether.
const MIN_SHARE: u32 = FULL_SHARE / 256;
/// The share's growth per uncontended tick: from the floor to every exchange in 16.
const SHARE_STEP: u32 = FULL_SHARE / 16;

/// Sets the share of exchanges sampled for statistics from how long mltap's threads
/// waited for a CPU (Linux schedstat): halved each tick they waited long, grown back
/// step by step each tick they did not. Statistics then give way to serving on a
/// machine whose cores are busy, and cover every exchange again once they are not.
struct CpuGovernor {
    stats: Arc<CaptureStats>,
    /// The process's threads' run and wait nanoseconds at the last tick, and when.
    last: Option<(u64, u64)>,
    at: Instant,
    /// Contended ticks in a row so far.
    contended: u32,
}

impl CpuGovernor {
    fn new(stats: Arc<CaptureStats>) -> CpuGovernor {
        CpuGovernor { stats, last: process_cpu_times(), at: Instant::now(), contended: 0 }
    }

    fn adjust(&mut self) {
        let now = process_cpu_times();
        let elapsed = self.at.elapsed().as_nanos() as f64;
        self.at = Instant::now();
        let (Some((run, wait)), Some((last_run, last_wait))) = (now, self.last) else {
            self.last = now;
            return;
        };
        self.last = now;
        // Threads that ended take their times with them: such a tick tells nothing.
        let (Some(ran), Some(waited)) = (run.checked_sub(last_run), wait.checked_sub(last_wait)) else { return };
        let busy = ran as f64 >= BUSY_CORES * elapsed;
        let waiting = if busy { waited as f64 / (ran + waited).max(1) as f64 } else { 0.0 };
        self.contended = if waiting > CONTENDED { self.contended + 1 } else { 0 };
        if (1..CONTENDED_TICKS).contains(&self.contended) {
            return;
        }
        self.stats.set_statistics_share(next_share(self.stats.statistics_share(), waiting));
    }
}

/// The statistics share after a tick in which mltap's threads spent `waiting` of
/// their runnable time waiting for a CPU.
fn next_share(share: u32, waiting: f64) -> u32 {
    if waiting > CONTENDED {
        (share / 2).max(MIN_SHARE)
    } else if waiting < UNCONTENDED {
        share.saturating_add(SHARE_STEP).min(FULL_SHARE)
    } else {
        share
    }
}

/// Nanoseconds this process's threads ran and waited runnable for a CPU, summed
/// over its current threads (`/proc/self/task/*/schedstat`); None where the kernel
/// does not say.
fn process_cpu_times() -> Option<(u64, u64)> {
    let mut totals = (0u64, 0u64);
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else { continue };
        let mut fields = text.split_ascii_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(run)), Some(Ok(wait))) = (fields.next(), fields.next()) {
            totals.0 += run;
            totals.1 += wait;
        }
    }
    Some(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statistics_share_halves_while_contended_and_grows_back_step_by_step() {
        assert_eq!(next_share(FULL_SHARE, 0.5), FULL_SHARE / 2);
        assert_eq!(next_share(FULL_SHARE / 2, 0.1), FULL_SHARE / 2, "between the thresholds it holds");
        assert_eq!(next_share(FULL_SHARE / 2, 0.0), FULL_SHARE / 2 + SHARE_STEP);
        assert_eq!(next_share(FULL_SHARE, 0.0), FULL_SHARE);
        let mut share = FULL_SHARE;
        for _ in 0..20 {
            share = next_share(share, 0.9);
        }
        assert_eq!(share, MIN_SHARE, "statistics never stop altogether");
        for _ in 0..16 {
            share = next_share(share, 0.01);
        }
        assert_eq!(share, FULL_SHARE);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_how_long_its_threads_ran() {
        let (run, _wait) = process_cpu_times().expect("schedstat");
        assert!(run > 0);
    }

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
