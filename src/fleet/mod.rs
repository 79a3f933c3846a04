//! The fleet: replicas of mltap that share one Redis (or Redis Cluster) report as one.
//!
//! With a shared store configured, the worker does not turn a closed bucket into
//! points itself: it hands the bucket's mergeable state (`monitor::BucketState`) to
//! the fleet, which writes it to Redis as this replica's partial. Once the bucket's
//! settle delay has passed, exactly one replica claims it (a lease with expiry and a
//! fencing token), merges every replica's partial (`monitor::Merge`), turns the merged
//! state into points with the same code as a single replica, and emits them to its
//! sinks. A replica that dies after writing its partial, or while holding the claim,
//! loses nothing: its lease expires and another replica claims the bucket. Drift
//! references are shared too (`SharedReferences`): the first replica to freeze one
//! publishes it, every other adopts it.
//!
//! The fleet runs on its own thread and runtime, never on the proxy's: a slow or
//! unreachable Redis delays monitoring output, never the client. Layout, guarantees
//! and limits are in docs/fleet.md.

pub mod codec;
pub mod store;

use crate::monitor::{BucketState, ClosedBucket, Merge, MonitorConfig, Reference, SharedReferences};
use crate::tfserving::StreamKey;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use store::{Claim, FleetStore};

/// The test-only environment variable that makes the fleet thread stop for good at one
/// point of its work (`after_partial`, `during_claim`, `during_emit`), so that tests
/// can kill the process there. Never set it in production.
pub const TEST_PAUSE_ENV: &str = "MLTAP_FLEET_TEST_PAUSE";
/// How long after its first partial with model data the `after_partial` test pause
/// waits, for the partials of the same bucket from the other aggregation threads.
const AFTER_PARTIAL_PAUSE_DELAY: Duration = Duration::from_millis(1000);
/// How often the fleet looks for buckets due to be claimed.
const CLAIM_TICK: Duration = Duration::from_millis(200);
/// Buckets claimed per look at most; the rest wait for the next tick.
const CLAIMS_PER_TICK: usize = 64;
/// Closed buckets waiting for the fleet thread; the monitor threads wait when it is
/// full (Redis slower than the buckets close), which never reaches the proxy.
const QUEUE_BUCKETS: usize = 1024;
/// How long a shared reference lookup may hold an aggregation thread.
const REFERENCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings of the fleet (`[fleet]`); the store is `labels_store`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Merge the replicas' buckets through the shared store when `labels_store` is
    /// Redis; false keeps each replica's metrics its own (labels are still shared).
    pub enabled: bool,
    /// Seconds after a bucket's end plus grace before it is claimed, for every
    /// replica's partial to arrive (their clocks and ticks differ a little).
    pub settle_seconds: u64,
    /// Seconds a claim is held; a replica that dies while holding it delays the
    /// bucket by this much, after which another replica claims it.
    pub lease_seconds: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { enabled: true, settle_seconds: 3, lease_seconds: 10 }
    }
}

impl FleetConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.lease_seconds == 0 {
            return Err(("lease_seconds".into(), "must be at least 1".into()));
        }
        if self.settle_seconds > 3600 {
            return Err(("settle_seconds".into(), "must be at most 3600".into()));
        }
        Ok(())
    }
}

/// What the fleet takes from the configuration.
#[derive(Debug, Clone)]
pub struct FleetSettings {
    /// Redis URL, or several node URLs of a Redis Cluster.
    pub nodes: Vec<String>,
    /// Key prefix shared by the replicas of one fleet.
    pub prefix: String,
    /// Bucket width.
    pub bucket: Duration,
    /// The `[monitor]` section: grace, and what points are computed with.
    pub monitor: MonitorConfig,
    pub config: FleetConfig,
}

impl FleetSettings {
    fn settle_ms(&self) -> i64 {
        (self.config.settle_seconds * 1000) as i64
    }

    fn lease_ms(&self) -> i64 {
        (self.config.lease_seconds * 1000) as i64
    }

    /// When a bucket may be claimed: its end, plus grace, plus settle.
    fn due_ms(&self, start: i64) -> i64 {
        (start + self.bucket.as_secs().max(1) as i64 + self.monitor.grace_seconds as i64) * 1000 + self.settle_ms()
    }

    /// How long partial states, claims' fences and done markers are kept: long enough
    /// for a takeover after lease expiry, bounded so Redis memory stays bounded.
    fn retention_ms(&self) -> i64 {
        (self.lease_ms() * 6).max(600_000)
    }
}

/// Where the test hook stops the fleet thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PausePoint {
    AfterPartial,
    DuringClaim,
    DuringEmit,
}

fn pause_point() -> Option<PausePoint> {
    match std::env::var(TEST_PAUSE_ENV).ok()?.as_str() {
        "after_partial" => Some(PausePoint::AfterPartial),
        "during_claim" => Some(PausePoint::DuringClaim),
        "during_emit" => Some(PausePoint::DuringEmit),
        _ => None,
    }
}

/// Counters of the fleet on `/metrics`: this replica's own work.
#[derive(Debug, Clone, Default)]
struct FleetMetrics {
    partials_written: Counter,
    partial_bytes: Counter,
    partials_late: Counter,
    buckets_emitted: Counter,
    claims_lost: Counter,
    errors: Counter,
}

impl FleetMetrics {
    fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register("fleet_partials_written", "Partial bucket states this replica wrote", self.partials_written.clone());
        r.register("fleet_partial_bytes", "Bytes of partial states this replica wrote", self.partial_bytes.clone());
        r.register(
            "fleet_partials_late",
            "Partial states that arrived after their bucket was claimed (not in its points)",
            self.partials_late.clone(),
        );
        r.register(
            "fleet_buckets_emitted",
            "Merged buckets this replica claimed and emitted",
            self.buckets_emitted.clone(),
        );
        r.register(
            "fleet_claims_lost",
            "Claims whose lease expired before emission (another replica emits the bucket)",
            self.claims_lost.clone(),
        );
        r.register("fleet_errors", "Redis errors of the fleet (retried)", self.errors.clone());
    }
}

/// Emits a merged bucket to this replica's sinks (files, gauges, listeners).
pub type EmitFn = Arc<dyn Fn(ClosedBucket) + Send + Sync>;

/// The running fleet: a queue to its thread and the shared references.
#[derive(Clone)]
pub struct Fleet {
    to_thread: tokio::sync::mpsc::Sender<Vec<BucketState>>,
    references: Arc<FleetReferences>,
    /// Joined at shutdown.
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// Starts the fleet thread; it connects (and reconnects) to Redis on its own, so
    /// an unreachable store delays monitoring output and never start-up or the proxy.
    pub fn start(settings: FleetSettings, emit: EmitFn, registry: &mut Registry) -> Result<Fleet, String> {
        let metrics = FleetMetrics::default();
        metrics.register(registry);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mltap-fleet")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the fleet's runtime: {e}"))?;
        let (to_thread, from_workers) = tokio::sync::mpsc::channel(QUEUE_BUCKETS);
        let references = Arc::new(FleetReferences {
            runtime: runtime.handle().clone(),
            store: Arc::new(tokio::sync::OnceCell::new()),
            cache: Mutex::new(HashMap::new()),
            prefix: settings.prefix.clone(),
        });
        let refs = references.clone();
        let thread = std::thread::Builder::new()
            .name("mltap-fleet-main".into())
            .spawn(move || {
                runtime.block_on(run(settings, emit, from_workers, refs, metrics));
            })
            .map_err(|e| format!("cannot start the fleet thread: {e}"))?;
        Ok(Fleet { to_thread, references, thread: Arc::new(Mutex::new(Some(thread))) })
    }

    /// Hands closed buckets' states to the fleet thread; waits while its queue is full.
    pub fn submit(&self, states: Vec<BucketState>) {
        if states.is_empty() {
            return;
        }
        if self.to_thread.blocking_send(states).is_err() {
            tracing::error!(message = "The fleet thread has stopped; closed buckets are not emitted.");
        }
    }

    /// The shared drift references, for the engines.
    pub fn references(&self) -> Arc<dyn SharedReferences> {
        self.references.clone()
    }

    /// Waits for the fleet thread to write what it was given and emit what is due;
    /// call once every sender (engine) is done.
    pub fn finish(self) {
        let Fleet { to_thread, thread, .. } = self;
        drop(to_thread);
        let handle = thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

/// Drift references shared through Redis (`SharedReferences`), cached per stream.
struct FleetReferences {
    runtime: tokio::runtime::Handle,
    /// Set once the fleet thread has connected.
    store: Arc<tokio::sync::OnceCell<FleetStore>>,
    /// References seen, by stream, with their fingerprint.
    cache: Mutex<HashMap<StreamKey, (u64, Arc<Reference>)>>,
    prefix: String,
}

impl std::fmt::Debug for FleetReferences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetReferences").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl FleetReferences {
    fn remember(&self, key: &StreamKey, reference: Reference) -> Arc<Reference> {
        let fingerprint = crate::monitor::engine::reference_fingerprint(&reference);
        let reference = Arc::new(reference);
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), (fingerprint, reference.clone()));
        reference
    }

    /// The reference with this fingerprint, from the cache or the store.
    async fn resolve(&self, store: &FleetStore, key: &StreamKey, fingerprint: u64) -> Option<Arc<Reference>> {
        if let Some((f, r)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(key) {
            if *f == fingerprint {
                return Some(r.clone());
            }
        }
        let found = store.reference(key).await.ok().flatten()?;
        let reference = self.remember(key, found);
        (crate::monitor::engine::reference_fingerprint(&reference) == fingerprint).then_some(reference)
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = Option<T>>) -> Option<T> {
        // Called on aggregation threads, never on a runtime.
        if tokio::runtime::Handle::try_current().is_ok() {
            return None;
        }
        self.runtime.block_on(async { tokio::time::timeout(REFERENCE_TIMEOUT, f).await.ok().flatten() })
    }
}

impl SharedReferences for FleetReferences {
    fn find(&self, key: &StreamKey) -> Option<Reference> {
        let store = self.store.clone();
        let found = self.block_on(async move { store.get()?.reference(key).await.ok().flatten() })?;
        self.remember(key, found.clone());
        Some(found)
    }

    fn adopt(&self, key: &StreamKey, candidate: Reference) -> Reference {
        let store = self.store.clone();
        let offered = candidate.clone();
        let adopted =
            self.block_on(async move { store.get()?.publish_reference(key, &offered).await.ok() }).unwrap_or(candidate);
        self.remember(key, adopted.clone());
        adopted
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The fleet thread: writes partials as they come, claims and emits due buckets on a
/// tick; at shutdown, writes the rest and emits what becomes due within the settle
/// delay (later buckets are emitted by the other replicas, or at the next start).
async fn run(
    settings: FleetSettings,
    emit: EmitFn,
    mut from_workers: tokio::sync::mpsc::Receiver<Vec<BucketState>>,
    references: Arc<FleetReferences>,
    metrics: FleetMetrics,
) {
    let pause = pause_point();
    let replica = codec::replica_id();
    let store = loop {
        match FleetStore::connect(&settings.nodes, &settings.prefix).await {
            Ok(store) => break store,
            Err(error) => {
                metrics.errors.inc();
                tracing::warn!(message = "Cannot reach the fleet's Redis; retrying.", %error);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let _ = references.store.set(store.clone());
    let fleet = FleetThread {
        settings,
        emit,
        store,
        references,
        metrics,
        pause,
        replica,
        paused: false,
        model_partial_written: None,
    };
    let mut tick = tokio::time::interval(CLAIM_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_due = 0;
    let mut fleet = fleet;
    loop {
        tokio::select! {
            states = from_workers.recv() => match states {
                Some(states) => {
                    for state in states {
                        last_due = last_due.max(fleet.settings.due_ms(state.start));
                        fleet.write_partial(state).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => fleet.claim_due().await,
        }
    }
    // Shutdown: emit what becomes due soon; wait at most settle + a tick for it.
    let deadline = now_ms() + fleet.settings.settle_ms() + 1000;
    while now_ms() < last_due.min(deadline) {
        fleet.claim_due().await;
        tokio::time::sleep(CLAIM_TICK).await;
    }
    fleet.claim_due().await;
}

/// The fleet thread's state.
struct FleetThread {
    settings: FleetSettings,
    emit: EmitFn,
    store: FleetStore,
    references: Arc<FleetReferences>,
    metrics: FleetMetrics,
    /// The test hook's stop, if set.
    pause: Option<PausePoint>,
    /// This process's name among the partials of a bucket.
    replica: String,
    /// Whether the test hook has stopped this thread's work.
    paused: bool,
    /// When the first partial with model data was written (for the test hook).
    model_partial_written: Option<std::time::Instant>,
}

impl FleetThread {
    /// Test hook: stops the fleet's work for good at `point` (the process lives on
    /// until the test kills it).
    async fn maybe_pause(&mut self, point: PausePoint) -> bool {
        if self.pause == Some(point) {
            tracing::warn!(message = "Fleet test pause reached; the fleet stops here.", point = ?point);
            self.paused = true;
            std::future::pending::<()>().await;
        }
        self.paused
    }

    async fn write_partial(&mut self, state: BucketState) {
        if self.paused {
            return;
        }
        let bytes = match codec::encode(&state) {
            Ok(bytes) => bytes,
            Err(error) => {
                self.metrics.errors.inc();
                tracing::error!(message = "Cannot encode a bucket's partial state.", %error, model = %state.model);
                return;
            }
        };
        let has_streams = !state.streams.is_empty();
        let (due, retention) = (self.settings.due_ms(state.start), self.settings.retention_ms());
        let ttl = (due - now_ms()).max(0) + retention;
        let mut attempt = 0;
        loop {
            match self.store.write_partial(&state.model, state.start, &self.replica, &bytes, due, ttl).await {
                Ok(true) => {
                    self.metrics.partials_written.inc();
                    self.metrics.partial_bytes.inc_by(bytes.len() as u64);
                    break;
                }
                Ok(false) => {
                    self.metrics.partials_late.inc();
                    tracing::warn!(message = "A bucket's partial state arrived after the bucket was claimed; it is not in the fleet's points.",
                        model = %state.model, start = state.start);
                    break;
                }
                Err(error) => {
                    self.metrics.errors.inc();
                    attempt += 1;
                    if attempt >= 5 {
                        tracing::error!(message = "Cannot write a bucket's partial state to the fleet's Redis; it is lost.",
                            %error, model = %state.model, start = state.start);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        if has_streams && self.model_partial_written.is_none() {
            self.model_partial_written = Some(std::time::Instant::now());
        }
    }

    async fn claim_due(&mut self) {
        if self.paused {
            return;
        }
        // The test hook stops once this replica's partials of a bucket with model data
        // are written (every aggregation thread's, which close within a tick), before
        // it claims anything after them.
        if let (Some(PausePoint::AfterPartial), Some(written)) = (self.pause, self.model_partial_written) {
            if written.elapsed() < AFTER_PARTIAL_PAUSE_DELAY {
                return;
            }
            self.maybe_pause(PausePoint::AfterPartial).await;
        }
        let due = match self.store.due(now_ms(), CLAIMS_PER_TICK).await {
            Ok(due) => due,
            Err(error) => {
                self.metrics.errors.inc();
                tracing::warn!(message = "Cannot read the fleet's due buckets.", %error);
                return;
            }
        };
        for (model, start) in due {
            if let Err(error) = self.claim_and_emit(&model, start).await {
                self.metrics.errors.inc();
                tracing::warn!(message = "Cannot claim a fleet bucket; retrying on the next tick.", %error, model = %model, start);
            }
        }
    }

    async fn claim_and_emit(&mut self, model: &str, start: i64) -> Result<(), String> {
        let (lease, retention) = (self.settings.lease_ms(), self.settings.retention_ms());
        let (token, partials) = match self.store.claim(model, start, lease, retention).await? {
            Claim::Done | Claim::Gone => {
                self.store.forget_due(model, start).await?;
                return Ok(());
            }
            Claim::Held => return Ok(()),
            Claim::Claimed { token, partials } => (token, partials),
        };
        let mut merged: Option<BucketState> = None;
        for bytes in &partials {
            match codec::decode(bytes) {
                Ok(state) => match &mut merged {
                    Some(m) => m.merge(&state),
                    None => merged = Some(state),
                },
                Err(error) => {
                    self.metrics.errors.inc();
                    tracing::error!(message = "A partial state in the fleet's Redis cannot be read; it is skipped.",
                        %error, model = %model, start);
                }
            }
        }
        if let Some(mut state) = merged {
            if !state.streams.is_empty() && self.maybe_pause(PausePoint::DuringClaim).await {
                return Ok(());
            }
            for (key, fingerprint) in state.missing_references() {
                let reference = self.references.resolve(&self.store, &key, fingerprint).await;
                state.set_reference(&key, reference);
            }
            let has_streams = !state.streams.is_empty();
            let closed = state.into_closed(&self.settings.monitor);
            if has_streams && self.maybe_pause(PausePoint::DuringEmit).await {
                return Ok(());
            }
            // Fencing: emit only while the lease is still ours, renewed for the write.
            if !self.store.renew(model, start, token, lease).await? {
                self.metrics.claims_lost.inc();
                tracing::warn!(message = "A fleet claim expired before emission; another replica emits the bucket.",
                    model = %model, start);
                return Ok(());
            }
            (self.emit)(closed);
            self.metrics.buckets_emitted.inc();
        }
        if !self.store.finish(model, start, token, retention).await? {
            self.metrics.claims_lost.inc();
        }
        self.store.forget_due(model, start).await
    }
}

/// Merges partial states of one bucket in order (for tests and benchmarks).
pub fn merge_states(states: impl IntoIterator<Item = BucketState>) -> Option<BucketState> {
    let mut merged: Option<BucketState> = None;
    for state in states {
        match &mut merged {
            Some(m) => m.merge(&state),
            None => merged = Some(state),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_a_bad_value_names_its_key() {
        assert_eq!(FleetConfig::default().validate(), Ok(()));
        let c = FleetConfig { lease_seconds: 0, ..FleetConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "lease_seconds");
        let c = FleetConfig { settle_seconds: 7200, ..FleetConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "settle_seconds");
    }

    #[test]
    fn a_bucket_is_due_after_its_end_grace_and_settle() {
        let settings = FleetSettings {
            nodes: vec!["redis://127.0.0.1:6379".into()],
            prefix: "mltap".into(),
            bucket: Duration::from_secs(60),
            monitor: MonitorConfig { grace_seconds: 5, ..MonitorConfig::default() },
            config: FleetConfig { settle_seconds: 3, ..FleetConfig::default() },
        };
        assert_eq!(settings.due_ms(120), (120 + 60 + 5) * 1000 + 3000);
        assert!(settings.retention_ms() >= settings.lease_ms() * 6);
    }

    #[test]
    fn the_test_pause_is_off_unless_named() {
        // The variable is unset in the test environment.
        assert_eq!(std::env::var(TEST_PAUSE_ENV).ok().and_then(|_| pause_point()), None);
    }
}
