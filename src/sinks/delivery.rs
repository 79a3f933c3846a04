//! Delivery of the spool to Anodot: reads the files the engine wrote, sends the points
//! past the cursor in requests of at most `batch_points`, in timestamp order, under a
//! token-bucket rate limit, retries what is transient with exponential backoff and
//! jitter, records what Anodot answered for in the durable cursor, posts 3.0
//! watermarks, prunes delivered files past the retention, and reports itself in
//! Prometheus metrics.
//!
//! The same `Engine` serves the long-running task of `serve` (`Delivery::spawn`) and
//! the one-shot `mltap send`. It never changes a point, never drops one that Anodot
//! has not answered for, and never logs a secret.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::anodot_api::{redacted, AnodotClient, ApiError, Endpoints, PostOutcome, Rejection, Secret};
use super::anodot_spool::{self, Cursor, FileCursor, SpoolFile};
use super::anodot_v3::{self, Stream};
use super::{AnodotConfig, AnodotProtocol, Point};
use crate::units::ConfigError;

/// Environment variable holding Anodot's data-collection token.
pub const TOKEN_ENV: &str = "ANODOT_TOKEN";
/// First wait before a retry; doubled per failure up to `max_backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Rejections logged one by one per request; the rest are summed up.
const REJECTIONS_LOGGED_PER_REQUEST: usize = 20;

/// Everything delivery needs, resolved and validated: where, with which secrets, how.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Metrics, watermark and API URLs.
    pub endpoints: Endpoints,
    /// Data-collection token (`ANODOT_TOKEN`).
    pub token: Secret,
    /// Access key for the 3.0 schema API.
    pub access_key: Option<Secret>,
    /// The `[anodot]` section: batch size, rate, protocol, timeouts, retention.
    pub anodot: AnodotConfig,
    /// Bucket width: a 3.0 watermark for a bucket is the start of the next one.
    pub bucket: Duration,
    /// How long label metrics may still be appended to a closed bucket's file, so the
    /// 3.0 labels stream's watermark waits that long.
    pub label_horizon: Duration,
}

impl DeliverySettings {
    /// Resolves the settings, reading secrets through `env` (the process environment
    /// outside tests). Errors name the configuration key at fault.
    pub fn resolve(
        anodot_url: &str,
        anodot: AnodotConfig,
        bucket: Duration,
        label_horizon: Duration,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<DeliverySettings, ConfigError> {
        anodot.validate().map_err(|(key, problem)| ConfigError::new(format!("anodot.{key}"), "", problem))?;
        let endpoints = Endpoints::new(anodot_url, anodot.api_url.as_deref())
            .map_err(|problem| ConfigError::new("anodot_url", "", problem))?;
        let token = env(TOKEN_ENV).map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).ok_or_else(|| {
            ConfigError::new(
                "anodot_url",
                "",
                format!("delivery to Anodot needs the data-collection token in the {TOKEN_ENV} environment variable"),
            )
        })?;
        let access_key = match anodot.protocol {
            AnodotProtocol::V20 => None,
            AnodotProtocol::V30 => {
                let name = &anodot.access_key_env;
                let key = env(name).map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).ok_or_else(|| {
                    ConfigError::new(
                        "anodot.access_key_env",
                        "",
                        format!("protocol 3.0 needs an Anodot access key in the {name} environment variable"),
                    )
                })?;
                Some(Secret::new(key))
            }
        };
        Ok(DeliverySettings { endpoints, token: Secret::new(token), access_key, anodot, bucket, label_horizon })
    }

    /// Points per request: at most `batch_points`, and never more than a second's worth.
    fn batch_size(&self) -> usize {
        self.anodot.batch_points.min(self.anodot.points_per_second as usize).max(1)
    }
}

/// Delivery's self-metrics, on the admin server's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct DeliveryMetrics {
    /// Points Anodot accepted.
    pub delivered: Counter,
    /// Points Anodot refused for good (logged with its code and description).
    pub rejected: Counter,
    /// Points sent again after a transient failure.
    pub retried: Counter,
    /// 3.0 watermarks posted.
    pub watermarks: Counter,
    /// Points in the spool not yet answered for.
    pub backlog_points: Gauge,
    /// Seconds since the start of the oldest bucket with points not yet answered for;
    /// 0 when the spool is delivered.
    pub lag_seconds: Gauge<f64, AtomicU64>,
}

impl DeliveryMetrics {
    /// Registers the metrics (names start with `mltap_anodot_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("anodot_points_delivered", "Points Anodot accepted", self.delivered.clone());
        registry.register("anodot_points_rejected", "Points Anodot refused for good", self.rejected.clone());
        registry.register("anodot_points_retried", "Points sent again after a transient failure", self.retried.clone());
        registry.register("anodot_watermarks_posted", "Anodot 3.0 watermarks posted", self.watermarks.clone());
        registry.register(
            "anodot_backlog_points",
            "Points in the spool not yet delivered",
            self.backlog_points.clone(),
        );
        registry.register(
            "anodot_delivery_lag_seconds",
            "Seconds since the start of the oldest bucket not yet delivered",
            self.lag_seconds.clone(),
        );
    }
}

/// How long to keep trying when Anodot fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `serve`: the spool holds everything, so keep trying until stopped.
    Forever,
    /// `send`: give up after this long of consecutive failures (or at once when the
    /// token or URL is refused).
    GiveUpAfter(Duration),
}

/// Why a pass stopped before delivering everything.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("Anodot refused delivery: {0}")]
    Halted(String),
    #[error("gave up after {}s of failures; last: {reason}", .after.as_secs())]
    GaveUp { after: Duration, reason: String },
    #[error("spool or cursor: {0}")]
    Io(#[from] io::Error),
    #[error("stopped")]
    Stopped,
}

/// Counts of one engine's life, for `send`'s summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Points Anodot accepted.
    pub accepted: u64,
    /// Points Anodot refused for good.
    pub rejected: u64,
    /// Requests sent again after a transient failure.
    pub retries: u64,
    /// Watermarks posted.
    pub watermarks: u64,
}

/// What a pass found and left.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Points waiting when the pass began.
    pub pending: u64,
    /// Points already answered for (earlier runs) in the files the pass looked at.
    pub already_done: u64,
    /// Files that could not be read as Anodot points (skipped until they change).
    pub unreadable: Vec<String>,
}

/// Progress of a pass, for `send`'s progress bar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Points answered for in this pass so far.
    pub done: u64,
    /// Points waiting when the pass began.
    pub pending: u64,
    /// Totals so far.
    pub totals: Totals,
}

/// A token bucket of points: `capacity` may go at once, then `per_second`. Time is
/// tokio's, so tests can pause it.
#[derive(Debug)]
pub struct RateLimiter {
    /// Refill rate.
    per_second: f64,
    /// Most tokens held; the burst after an idle time.
    capacity: f64,
    /// Current tokens; negative while a reserved send waits.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32, capacity: usize) -> RateLimiter {
        let capacity = capacity.max(1) as f64;
        RateLimiter { per_second: f64::from(per_second.max(1)), capacity, tokens: capacity, updated: Instant::now() }
    }

    /// Takes `n` tokens at `now` and says how long to wait before sending them.
    pub fn reserve(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }

    /// Waits until `n` points may be sent.
    pub async fn acquire(&mut self, n: usize) {
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Exponential backoff with jitter: a random wait in [d/2, d], d = 500ms · 2^(attempt-1)
/// capped at `max`; an explicit Retry-After wins, capped the same way.
pub fn backoff(attempt: u32, max: Duration, retry_after: Option<Duration>) -> Duration {
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let exp = INITIAL_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(max);
    let half = d / 2;
    half + Duration::from_secs_f64(rand::rng().random_range(0.0..=1.0) * half.as_secs_f64())
}

fn now_epoch() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// One slice of a file in a request.
#[derive(Debug, Clone)]
struct Segment {
    /// The file's cursor key.
    key: String,
    /// Cursor position once this request is answered for (the slice ends here).
    to: usize,
    /// Points the file held when read, recorded so a settled file is not read again.
    total: usize,
    /// The file's size when listed, recorded for the same reason.
    size: u64,
    /// Where this slice sits in `Batch::points`, to attribute refused points to files.
    range: std::ops::Range<usize>,
}

/// The points of one request and where they came from.
#[derive(Debug, Default)]
struct Batch {
    /// The file slices, in spool order.
    segments: Vec<Segment>,
    /// The points with their model (3.0 picks the schema by model).
    points: Vec<(String, Point)>,
}

/// The delivery engine over one spool and its cursor.
pub struct Engine {
    /// Where, how and with which secrets.
    settings: DeliverySettings,
    /// The HTTP side.
    client: AnodotClient,
    /// The `anodot/` folder.
    root: PathBuf,
    /// What Anodot has answered for, durably.
    cursor: Cursor,
    /// Holds the configured points per second.
    limiter: RateLimiter,
    /// Self-metrics, shared with the registry.
    metrics: DeliveryMetrics,
    /// Retry forever (`serve`) or give up (`send`).
    persistence: Persistence,
    /// Stream-schema ids by (model, stream), 3.0 only.
    schemas: HashMap<(String, Stream), String>,
    /// Files that failed to read, with the size they had: retried once they change,
    /// and logged once rather than at every pass.
    unreadable: HashMap<String, u64>,
    /// Counts since the engine opened, for `send`'s summary.
    totals: Totals,
    /// Oldest buckets with points waiting: (key, bucket start, points waiting), for
    /// the lag gauge.
    waiting: VecDeque<(String, i64, usize)>,
    /// `send`'s progress bar.
    progress: Option<Box<dyn FnMut(Progress) + Send>>,
    /// Points answered for in the current pass.
    pass_done: u64,
    /// Points waiting at the start of the current pass.
    pass_pending: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("root", &self.root).field("client", &self.client).finish()
    }
}

impl Engine {
    /// Opens the engine over `spool_root` (the `anodot/` folder) with its cursor in
    /// `state_dir`.
    pub fn open(
        settings: DeliverySettings,
        spool_root: &Path,
        state_dir: &Path,
        metrics: DeliveryMetrics,
        persistence: Persistence,
    ) -> io::Result<Engine> {
        let client = AnodotClient::new(
            settings.endpoints.clone(),
            settings.token.clone(),
            settings.access_key.clone(),
            settings.anodot.request_timeout,
        )
        .map_err(io::Error::other)?;
        let cursor = Cursor::open(state_dir)?;
        let limiter = RateLimiter::new(settings.anodot.points_per_second, settings.batch_size());
        Ok(Engine {
            settings,
            client,
            root: spool_root.to_path_buf(),
            cursor,
            limiter,
            metrics,
            persistence,
            schemas: HashMap::new(),
            unreadable: HashMap::new(),
            totals: Totals::default(),
            waiting: VecDeque::new(),
            progress: None,
            pass_done: 0,
            pass_pending: 0,
        })
    }

    /// Calls `f` after each request that Anodot answered for.
    pub fn on_progress(&mut self, f: impl FnMut(Progress) + Send + 'static) {
        self.progress = Some(Box::new(f));
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    pub fn metrics(&self) -> &DeliveryMetrics {
        &self.metrics
    }

    /// Points in the spool not yet answered for, reading only files that changed.
    pub fn backlog(&self) -> io::Result<u64> {
        let mut backlog = 0u64;
        for f in anodot_spool::list(&self.root)? {
            let c = self.cursor.get(&f.key);
            if c.settled(f.size) {
                continue;
            }
            if let Ok(points) = anodot_spool::read_points(&f.path) {
                backlog += points.len().saturating_sub(c.acked) as u64;
            }
        }
        Ok(backlog)
    }

    /// Sends every point waiting in the spool now, then the 3.0 watermarks that are due.
    pub async fn pass(&mut self, stop: &CancellationToken) -> Result<PassReport, DeliveryError> {
        let files = anodot_spool::list(&self.root)?;
        let mut report = PassReport::default();
        let mut pending: Vec<SpoolFile> = Vec::new();
        self.waiting.clear();
        for f in &files {
            let c = self.cursor.get(&f.key);
            if c.settled(f.size) {
                report.already_done += c.acked as u64;
                continue;
            }
            if self.unreadable.get(&f.key) == Some(&f.size) {
                report.unreadable.push(f.key.clone());
                continue;
            }
            match anodot_spool::read_points(&f.path) {
                Ok(points) => {
                    let waiting = points.len().saturating_sub(c.acked);
                    report.pending += waiting as u64;
                    report.already_done += c.acked.min(points.len()) as u64;
                    if waiting > 0 {
                        self.waiting.push_back((f.key.clone(), f.bucket_start, waiting));
                    }
                    pending.push(f.clone());
                }
                Err(e) => {
                    error!(message = "Spool file skipped: not readable as Anodot points.", error = %e);
                    self.unreadable.insert(f.key.clone(), f.size);
                    report.unreadable.push(f.key.clone());
                }
            }
        }
        self.pass_done = 0;
        self.pass_pending = report.pending;
        self.update_gauges(report.pending);

        let cap = self.settings.batch_size();
        let mut batch = Batch::default();
        for f in pending {
            let points = match anodot_spool::read_points(&f.path) {
                Ok(p) => p,
                Err(e) => {
                    error!(message = "Spool file skipped: not readable as Anodot points.", error = %e);
                    self.unreadable.insert(f.key.clone(), f.size);
                    continue;
                }
            };
            let c = self.cursor.get(&f.key);
            let total = points.len();
            if total < c.acked {
                warn!(
                    message = "Spool file holds fewer points than were delivered; it was replaced, not appended to.",
                    file = %f.key, points = total, delivered = c.acked
                );
            }
            let mut from = c.acked.min(total);
            if from == total {
                // Nothing new (e.g. rewritten at the same length): remember its size.
                self.cursor.commit(&[(f.key.clone(), FileCursor { total, size: f.size, ..c })])?;
                continue;
            }
            let model = f.model.clone();
            let mut points = points.into_iter().skip(from);
            while from < total {
                let take = (total - from).min(cap - batch.points.len());
                let start = batch.points.len();
                batch.points.extend(points.by_ref().take(take).map(|p| (model.clone(), p)));
                from += take;
                batch.segments.push(Segment {
                    key: f.key.clone(),
                    to: from,
                    total,
                    size: f.size,
                    range: start..batch.points.len(),
                });
                if batch.points.len() >= cap {
                    self.send_batch(std::mem::take(&mut batch), stop).await?;
                }
            }
        }
        if !batch.points.is_empty() {
            self.send_batch(batch, stop).await?;
        }
        self.update_gauges(0);

        if self.settings.anodot.protocol == AnodotProtocol::V30 {
            self.post_watermarks(stop).await?;
        }
        Ok(report)
    }

    fn update_gauges(&mut self, backlog: u64) {
        self.metrics.backlog_points.set(i64::try_from(backlog).unwrap_or(i64::MAX));
        let lag = match self.waiting.front() {
            Some((_, start, _)) => (now_epoch() - start).max(0) as f64,
            None => 0.0,
        };
        self.metrics.lag_seconds.set(lag);
    }

    /// Sends one request's points until Anodot answers for all of them, then records it.
    async fn send_batch(&mut self, batch: Batch, stop: &CancellationToken) -> Result<(), DeliveryError> {
        let protocol = self.settings.anodot.protocol;
        if protocol == AnodotProtocol::V30 {
            self.ensure_schemas(&batch.points, stop).await?;
        }
        // Indices into batch.points still to send, in timestamp order (stable, so the
        // spool's order holds within a timestamp).
        let mut remaining: Vec<usize> = (0..batch.points.len()).collect();
        remaining.sort_by_key(|&i| batch.points[i].1.timestamp);
        let mut rejected: BTreeMap<usize, Rejection> = BTreeMap::new();
        let mut failures: u32 = 0;
        let mut failing_since: Option<Instant> = None;
        while !remaining.is_empty() {
            self.limiter.acquire(remaining.len()).await;
            let body = self.body(protocol, &batch.points, &remaining);
            let outcome = self.client.post_points(protocol, body).await;
            match outcome {
                PostOutcome::Answered { rejected: errors } => {
                    for e in errors {
                        match e.index.and_then(|i| remaining.get(i)) {
                            Some(&i) => {
                                rejected.insert(i, e);
                            }
                            None => warn!(
                                message = "Anodot reported an error about the request.",
                                code = e.code, description = %e.description
                            ),
                        }
                    }
                    remaining.clear();
                }
                PostOutcome::Refused { rejected: errors, whole_request } => {
                    let mut refused: HashSet<usize> = HashSet::new();
                    if !whole_request {
                        for e in &errors {
                            if let Some(&i) = e.index.and_then(|i| remaining.get(i)) {
                                refused.insert(i);
                                rejected.insert(i, e.clone());
                            }
                        }
                    }
                    if refused.is_empty() {
                        let first = errors.into_iter().next().unwrap_or(Rejection {
                            index: None,
                            code: 0,
                            description: "request refused".to_string(),
                        });
                        for &i in &remaining {
                            rejected.insert(i, first.clone());
                        }
                        remaining.clear();
                    } else {
                        // The other points were not taken: send them again without the
                        // refused ones.
                        remaining.retain(|i| !refused.contains(i));
                    }
                }
                PostOutcome::Retry { reason, retry_after } => {
                    failures += 1;
                    self.retry_pause(&mut failing_since, failures, &reason, retry_after, remaining.len(), stop).await?;
                }
                PostOutcome::Halt { reason } => {
                    error!(message = "Anodot refused delivery; points stay in the spool.", reason = %reason,
                           endpoint = %redacted(&self.settings.endpoints.metrics));
                    if matches!(self.persistence, Persistence::GiveUpAfter(_)) {
                        return Err(DeliveryError::Halted(reason));
                    }
                    failures += 1;
                    let wait = self.settings.anodot.max_backoff;
                    self.retry_pause(&mut failing_since, failures, &reason, Some(wait), remaining.len(), stop).await?;
                }
            }
        }
        self.record(batch, rejected)
    }

    /// Counts a failed attempt and waits before the next, or gives up.
    async fn retry_pause(
        &mut self,
        failing_since: &mut Option<Instant>,
        failures: u32,
        reason: &str,
        retry_after: Option<Duration>,
        points: usize,
        stop: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let since = *failing_since.get_or_insert_with(Instant::now);
        if let Persistence::GiveUpAfter(limit) = self.persistence {
            if since.elapsed() >= limit {
                return Err(DeliveryError::GaveUp { after: limit, reason: reason.to_string() });
            }
        }
        let wait = backoff(failures, self.settings.anodot.max_backoff, retry_after);
        if wait >= Duration::from_secs(5) {
            // A long outage: files keep arriving, so the backlog is measured again
            // rather than left at its value from the start of the pass.
            if let Ok(backlog) = self.backlog() {
                self.update_gauges(backlog);
            }
        }
        warn!(message = "Anodot request failed; retrying.", reason = %reason, attempt = failures,
              wait_ms = wait.as_millis() as u64, points);
        self.totals.retries += 1;
        self.metrics.retried.inc_by(points as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => Ok(()),
            _ = stop.cancelled() => Err(DeliveryError::Stopped),
        }
    }

    fn body(&self, protocol: AnodotProtocol, points: &[(String, Point)], order: &[usize]) -> Vec<u8> {
        let result = match protocol {
            AnodotProtocol::V20 => serde_json::to_vec(&order.iter().map(|&i| &points[i].1).collect::<Vec<_>>()),
            AnodotProtocol::V30 => serde_json::to_vec(
                &order
                    .iter()
                    .map(|&i| {
                        let (model, p) = &points[i];
                        let stream = anodot_v3::stream_of(p.what());
                        let id = self.schemas.get(&(model.clone(), stream)).map(String::as_str).unwrap_or_default();
                        anodot_v3::sample(id, p)
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        // Points are finite numbers and strings: serializing them cannot fail.
        result.unwrap_or_default()
    }

    /// Records a request Anodot answered for: cursor first (durable), then counts.
    fn record(&mut self, batch: Batch, rejected: BTreeMap<usize, Rejection>) -> Result<(), DeliveryError> {
        let mut updates: Vec<(String, FileCursor)> = Vec::with_capacity(batch.segments.len());
        for s in &batch.segments {
            let refused = rejected.range(s.range.clone()).count();
            let mut state = updates.iter().rev().find(|(k, _)| *k == s.key).map(|(_, c)| *c);
            let base = state.get_or_insert_with(|| self.cursor.get(&s.key));
            let next = FileCursor {
                acked: s.to,
                rejected: base.rejected + refused,
                total: s.total,
                size: s.size,
                watermarks: base.watermarks,
            };
            updates.retain(|(k, _)| *k != s.key);
            updates.push((s.key.clone(), next));
        }
        self.cursor.commit(&updates)?;

        let n = batch.points.len() as u64;
        let refused = rejected.len() as u64;
        self.totals.accepted += n - refused;
        self.totals.rejected += refused;
        self.metrics.delivered.inc_by(n - refused);
        self.metrics.rejected.inc_by(refused);
        for (logged, (i, e)) in rejected.iter().enumerate() {
            if logged == REJECTIONS_LOGGED_PER_REQUEST {
                warn!(message = "More points refused by Anodot in this request.", count = rejected.len() - logged);
                break;
            }
            let (model, p) = &batch.points[*i];
            warn!(message = "Anodot refused a point.", code = e.code, description = %e.description,
                  model = %model, what = %p.what(), timestamp = p.timestamp);
        }
        debug!(message = "Request delivered.", points = n, rejected = refused);

        for s in &batch.segments {
            let mut left = s.range.len();
            while left > 0 {
                let Some(front) = self.waiting.iter_mut().find(|(k, _, w)| *k == s.key && *w > 0) else { break };
                let take = left.min(front.2);
                front.2 -= take;
                left -= take;
            }
        }
        while self.waiting.front().is_some_and(|(_, _, w)| *w == 0) {
            self.waiting.pop_front();
        }
        self.pass_done += n;
        let backlog = self.pass_pending.saturating_sub(self.pass_done);
        self.update_gauges(backlog);
        let progress = Progress { done: self.pass_done, pending: self.pass_pending, totals: self.totals };
        if let Some(f) = self.progress.as_mut() {
            f(progress);
        }
        Ok(())
    }

    /// Finds or creates the 3.0 schemas the points need.
    async fn ensure_schemas(
        &mut self,
        points: &[(String, Point)],
        stop: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        let mut needed: Vec<(String, Stream)> = Vec::new();
        for (model, p) in points {
            let k = (model.clone(), anodot_v3::stream_of(p.what()));
            if !self.schemas.contains_key(&k) && !needed.contains(&k) {
                needed.push(k);
            }
        }
        for (model, stream) in needed {
            let sample: Vec<Point> = points.iter().filter(|(m, _)| *m == model).map(|(_, p)| p.clone()).collect();
            self.schema_id(&model, stream, &sample, stop).await?;
        }
        Ok(())
    }

    async fn schema_id(
        &mut self,
        model: &str,
        stream: Stream,
        sample: &[Point],
        stop: &CancellationToken,
    ) -> Result<String, DeliveryError> {
        if let Some(id) = self.schemas.get(&(model.to_string(), stream)) {
            return Ok(id.clone());
        }
        let name = stream.schema_name(&self.settings.anodot.schema_prefix, model);
        let mut failures = 0;
        let mut failing_since = None;
        loop {
            let found = match self.client.find_schema(&name).await {
                Ok(Some(id)) => Ok(id),
                Ok(None) => {
                    let schema = anodot_v3::schema(&name, stream, sample);
                    let created = self.client.create_schema(&schema).await;
                    if created.is_ok() {
                        info!(message = "Anodot stream schema created.", schema = %name);
                    }
                    created
                }
                Err(e) => Err(e),
            };
            match found {
                Ok(id) => {
                    self.schemas.insert((model.to_string(), stream), id.clone());
                    return Ok(id);
                }
                Err(ApiError::Fatal(reason)) if matches!(self.persistence, Persistence::GiveUpAfter(_)) => {
                    return Err(DeliveryError::Halted(format!("stream schema {name}: {reason}")));
                }
                Err(e) => {
                    failures += 1;
                    let reason = format!("stream schema {name}: {e}");
                    self.retry_pause(&mut failing_since, failures, &reason, None, 0, stop).await?;
                }
            }
        }
    }

    /// Posts, per model and stream, the watermark of the latest bucket that is complete
    /// and answered for, with every earlier bucket of that model answered for too.
    async fn post_watermarks(&mut self, stop: &CancellationToken) -> Result<(), DeliveryError> {
        let files = anodot_spool::list(&self.root)?;
        let width = self.settings.bucket.as_secs().max(1) as i64;
        let horizon = self.settings.label_horizon.as_secs() as i64;
        let now = now_epoch();
        // (model, stream) -> files whose watermark bit is to be set, and the watermark.
        let mut due: BTreeMap<(String, Stream), (Vec<String>, i64)> = BTreeMap::new();
        let mut blocked: HashSet<String> = HashSet::new();
        for f in &files {
            if blocked.contains(&f.model) {
                continue;
            }
            let c = self.cursor.get(&f.key);
            if !c.settled(f.size) {
                blocked.insert(f.model.clone());
                continue;
            }
            let end = f.bucket_start + width;
            for stream in Stream::ALL {
                if c.watermarks & stream.bit() != 0 {
                    continue;
                }
                if stream == Stream::Labels && now < end + horizon + width {
                    continue;
                }
                let entry = due.entry((f.model.clone(), stream)).or_insert_with(|| (Vec::new(), end));
                entry.0.push(f.key.clone());
                entry.1 = entry.1.max(end);
            }
        }
        for ((model, stream), (keys, watermark)) in due {
            let id = self.schema_id(&model, stream, &[], stop).await?;
            let mut failures = 0;
            let mut failing_since = None;
            loop {
                match self.client.post_watermark(&id, watermark).await {
                    PostOutcome::Answered { .. } => break,
                    PostOutcome::Refused { rejected, .. } => {
                        let why = rejected.first().map(|e| e.description.clone()).unwrap_or_default();
                        warn!(message = "Anodot refused a watermark.", model = %model, watermark, reason = %why);
                        break;
                    }
                    PostOutcome::Retry { reason, retry_after } => {
                        failures += 1;
                        self.retry_pause(&mut failing_since, failures, &reason, retry_after, 0, stop).await?;
                    }
                    PostOutcome::Halt { reason } => {
                        if matches!(self.persistence, Persistence::GiveUpAfter(_)) {
                            return Err(DeliveryError::Halted(reason));
                        }
                        failures += 1;
                        let wait = Some(self.settings.anodot.max_backoff);
                        self.retry_pause(&mut failing_since, failures, &reason, wait, 0, stop).await?;
                    }
                }
            }
            self.totals.watermarks += 1;
            self.metrics.watermarks.inc();
            let updates: Vec<(String, FileCursor)> = keys
                .into_iter()
                .map(|k| {
                    let mut c = self.cursor.get(&k);
                    c.watermarks |= stream.bit();
                    (k, c)
                })
                .collect();
            self.cursor.commit(&updates)?;
        }
        Ok(())
    }

    /// Deletes delivered files whose bucket started before `now - retention` (and whose
    /// 3.0 watermarks are posted), and forgets cursor entries of files that are gone.
    pub fn prune(&mut self) -> io::Result<usize> {
        let files = anodot_spool::list(&self.root)?;
        let present: HashSet<&str> = files.iter().map(|f| f.key.as_str()).collect();
        let mut gone: Vec<String> =
            self.cursor.files().keys().filter(|k| !present.contains(k.as_str())).cloned().collect();
        let mut deleted = 0;
        if let Some(retention) = self.settings.anodot.retention {
            let cutoff = now_epoch() - retention.as_secs() as i64;
            let all_watermarks = match self.settings.anodot.protocol {
                AnodotProtocol::V20 => 0,
                AnodotProtocol::V30 => Stream::Traffic.bit() | Stream::Labels.bit(),
            };
            for f in files.iter().filter(|f| f.bucket_start < cutoff) {
                let c = self.cursor.get(&f.key);
                if !c.settled(f.size) || c.watermarks & all_watermarks != all_watermarks {
                    continue;
                }
                match std::fs::remove_file(&f.path) {
                    Ok(()) => {
                        deleted += 1;
                        gone.push(f.key.clone());
                    }
                    Err(e) => warn!(message = "Cannot delete a delivered spool file.", file = %f.key, error = %e),
                }
            }
        }
        self.cursor.forget(&gone)?;
        if deleted > 0 {
            info!(message = "Delivered spool files past the retention deleted.", files = deleted);
        }
        Ok(deleted)
    }
}

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
            next_prune = Instant::now() + Duration::from_secs(60);
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

    /// Stops at once, as a crash would (tests).
    pub fn abort(self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_holds_the_configured_points_per_second() {
        let mut limiter = RateLimiter::new(2000, 1000);
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0usize;
        // 20 requests of 1000 points, each sent as soon as the limiter allows: one
        // burst of 1000, then 2000 points per second.
        for _ in 0..20 {
            now += limiter.reserve(1000, now);
            sent += 1000;
            let allowed = 1000.0 + 2000.0 * (now - start).as_secs_f64();
            assert!(sent as f64 <= allowed + 1e-6, "{sent} points by {:?}", now - start);
        }
        assert_eq!((now - start).as_millis(), 9500);
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let max = Duration::from_secs(60);
        for attempt in 1..30 {
            let d = backoff(attempt, max, None);
            let full = INITIAL_BACKOFF.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert_eq!(backoff(1, max, Some(Duration::from_secs(600))), max);
    }

    #[test]
    fn settings_need_the_token_and_for_30_the_access_key() {
        let none = |_: &str| None;
        let e = DeliverySettings::resolve(
            "https://a.example",
            AnodotConfig::default(),
            Duration::from_secs(60),
            Duration::from_secs(3600),
            none,
        )
        .unwrap_err();
        assert!(e.problem.contains("ANODOT_TOKEN"), "{e}");
        let v30 = AnodotConfig { protocol: AnodotProtocol::V30, ..AnodotConfig::default() };
        let token_only = |k: &str| (k == TOKEN_ENV).then(|| "t".to_string());
        let e = DeliverySettings::resolve(
            "https://a.example",
            v30,
            Duration::from_secs(60),
            Duration::from_secs(3600),
            token_only,
        )
        .unwrap_err();
        assert_eq!(e.key, "anodot.access_key_env");
        let s = DeliverySettings::resolve(
            "https://a.example",
            AnodotConfig::default(),
            Duration::from_secs(60),
            Duration::from_secs(3600),
            token_only,
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("\"t\""));
    }
}
