//! Delivery of the spool to Anodot: reads the files the engine wrote, sends the points
//! past the cursor in requests of at most `batch_points`, in timestamp order, under a
//! token-bucket rate limit, retries each call under the rules of `retry`, records what
//! Anodot answered for in the durable cursor, posts 3.0 watermarks (`streams`), prunes
//! delivered files past the retention, and reports itself in Prometheus metrics.
//!
//! The same `Engine` serves the long-running task of `serve` (`task`:
//! `Delivery::spawn`) and the one-shot `mltap send`. It never changes a point, never
//! drops one that Anodot has not answered for, and never logs a secret.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::api::{redacted, AnodotClient, PostOutcome, Rejection};
use super::encode3::{self, Stream};
use super::rate_limit::RateLimiter;
use super::retry::{Failure, GiveUp, Persistence, Retry};
use super::spool::{self, Cursor, FileCursor, SpoolFile};
use super::{AnodotProtocol, DeliveryMetrics, DeliverySettings, Point};

mod streams;
mod task;

pub use task::{Delivery, DeliveryHandle};

/// Rejections logged one by one per request; the rest are summed up.
const REJECTIONS_LOGGED_PER_REQUEST: usize = 20;
/// A retry wait from which the backlog gauge is measured again before waiting: during
/// a long outage files keep arriving, and the gauge would otherwise keep its value
/// from the start of the pass.
const BACKLOG_REMEASURED_FROM_WAIT: Duration = Duration::from_secs(5);

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

impl From<GiveUp> for DeliveryError {
    fn from(stop: GiveUp) -> Self {
        match stop {
            GiveUp::Halted(reason) => DeliveryError::Halted(reason),
            GiveUp::After { after, reason } => DeliveryError::GaveUp { after, reason },
        }
    }
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
        for f in spool::list(&self.root)? {
            let c = self.cursor.get(&f.key);
            if c.settled(f.size) {
                continue;
            }
            if let Ok(points) = spool::read_points(&f.path) {
                backlog += points.len().saturating_sub(c.acked) as u64;
            }
        }
        Ok(backlog)
    }

    /// Sends every point waiting in the spool now, then the 3.0 watermarks that are due.
    pub async fn pass(&mut self, stop: &CancellationToken) -> Result<PassReport, DeliveryError> {
        let files = spool::list(&self.root)?;
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
            let Some(points) = self.read_or_skip(f) else {
                report.unreadable.push(f.key.clone());
                continue;
            };
            let waiting = points.len().saturating_sub(c.acked);
            report.pending += waiting as u64;
            report.already_done += c.acked.min(points.len()) as u64;
            if waiting > 0 {
                self.waiting.push_back((f.key.clone(), f.bucket_start, waiting));
            }
            pending.push(f.clone());
        }
        self.pass_done = 0;
        self.pass_pending = report.pending;
        self.update_gauges(report.pending);

        let cap = self.settings.batch_size();
        let mut batch = Batch::default();
        for f in pending {
            let Some(points) = self.read_or_skip(&f) else { continue };
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

    /// A spool file's points, or None when it is not readable as points: it is then
    /// logged and remembered with its size, and skipped until it changes.
    fn read_or_skip(&mut self, f: &SpoolFile) -> Option<Vec<Point>> {
        match spool::read_points(&f.path) {
            Ok(points) => Some(points),
            Err(e) => {
                error!(message = "Spool file skipped: not readable as Anodot points.", error = %e);
                self.unreadable.insert(f.key.clone(), f.size);
                None
            }
        }
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
        let mut retry = self.retry();
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
                PostOutcome::Failed(failure) => self.pause(&mut retry, failure, remaining.len(), stop).await?,
            }
        }
        self.record(batch, rejected)
    }

    /// The retry state of one call, under this engine's persistence and backoff cap.
    fn retry(&self) -> Retry {
        Retry::new(self.persistence, self.settings.anodot.max_backoff)
    }

    /// Counts a failed attempt of a call carrying `points` and waits before the next
    /// one, or says why the call is no longer retried.
    async fn pause(
        &mut self,
        retry: &mut Retry,
        failure: Failure,
        points: usize,
        stop: &CancellationToken,
    ) -> Result<(), DeliveryError> {
        if let Failure::Halt { reason } = &failure {
            error!(message = "Anodot refused delivery; points stay in the spool.", reason = %reason,
                   endpoint = %redacted(&self.settings.endpoints.metrics));
        }
        let wait = retry.after(&failure, Instant::now())?;
        if wait >= BACKLOG_REMEASURED_FROM_WAIT {
            if let Ok(backlog) = self.backlog() {
                self.update_gauges(backlog);
            }
        }
        warn!(message = "Anodot request failed; retrying.", reason = %failure.reason(), attempt = retry.failures(),
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
                        let stream = encode3::stream_of(p.what());
                        let id = self.schemas.get(&(model.clone(), stream)).map(String::as_str).unwrap_or_default();
                        encode3::sample(id, p)
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

    /// Deletes delivered files whose bucket started before `now - retention` (and whose
    /// 3.0 watermarks are posted), and forgets cursor entries of files that are gone.
    pub fn prune(&mut self) -> io::Result<usize> {
        let files = spool::list(&self.root)?;
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
