//! The captured copy of one inference exchange and the bounded queue that carries it
//! from the proxy's hot path to the worker.
//!
//! The queue has two lanes, so that what mltap counts never depends on load:
//! - the **sampled lane** carries exchanges with both bodies, for statistics of the
//!   features and outputs. When the worker falls behind, the proxy sheds load by
//!   uniform sampling: each exchange is kept with a probability that falls as this
//!   lane fills (`CaptureSender::sample`), and an exchange that finds the lane full
//!   anyway is shed too. Shed exchanges are counted in `capture_dropped`.
//! - the **count lane** carries every exchange that was shed, with its response and
//!   only the first bytes of its request (enough for the model spec or the REST
//!   `signature_name`), so that request, row and class counts stay exact. It only
//!   loses an exchange when the whole byte budget is spent (`uncounted`).
//!
//! `CaptureSender::submit` and `offer` never wait. This module never parses a payload.

use crate::units::MIB;
use bytes::Bytes;
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// Request bytes a count record keeps: the gRPC frame header and the request's
/// `model_spec` (field 1, serialized first), or a REST body's leading keys where
/// clients put `signature_name`.
pub const REQUEST_PREFIX_BYTES: usize = 1024;
/// Count records the count lane holds at most, whatever `queue_exchanges` says (the
/// sampled lane's bound): a small sampled lane must not make counts lossy. The byte
/// budget bounds the count lane in practice.
const COUNT_LANE_EXCHANGES: usize = 1 << 16;
/// What a count record weighs in the byte budget besides its bodies (the struct, its
/// path and id), so that records without bodies are bounded too.
const RECORD_OVERHEAD_BYTES: usize = 256;

/// The wire protocol an exchange arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// gRPC over HTTP/2 cleartext.
    Grpc,
    /// TF Serving's REST API over HTTP/1.1.
    Rest,
}

impl Protocol {
    /// The `protocol` label of mltap's own metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Rest => "rest",
        }
    }
}

/// What a call asks TF Serving to do, whichever protocol carries it. The one spelling
/// of a method in metric dimensions is `as_str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum CallMethod {
    Predict,
    Classify,
    Regress,
    MultiInference,
    /// gRPC `GetModelMetadata`, REST `GET /v1/models/M[/versions/V]/metadata`.
    GetModelMetadata,
    /// gRPC `ModelService/GetModelStatus`, REST `GET /v1/models/M[/versions/V]`.
    GetModelStatus,
    /// gRPC `ModelService/HandleReloadConfigRequest`.
    ReloadConfig,
    /// Anything else: forwarded, never captured.
    Other,
}

impl CallMethod {
    /// The `method` dimension of mltap's points.
    pub fn as_str(self) -> &'static str {
        match self {
            CallMethod::Predict => "predict",
            CallMethod::Classify => "classify",
            CallMethod::Regress => "regress",
            CallMethod::MultiInference => "multi_inference",
            CallMethod::GetModelMetadata => "get_model_metadata",
            CallMethod::GetModelStatus => "get_model_status",
            CallMethod::ReloadConfig => "reload_config",
            CallMethod::Other => "other",
        }
    }

    /// Whether calls of this method carry model inputs and outputs (and are captured).
    pub fn is_inference(self) -> bool {
        matches!(self, CallMethod::Predict | CallMethod::Classify | CallMethod::Regress | CallMethod::MultiInference)
    }
}

/// What kind of call a request is, as the proxy classifies it from the protocol,
/// HTTP method and path alone: metric label and capture decision in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RouteKind {
    pub protocol: Protocol,
    pub method: CallMethod,
}

impl RouteKind {
    /// Classifies a gRPC path; only TF Serving's own methods get their own kind.
    pub fn grpc(path: &str) -> RouteKind {
        let method = match path {
            "/tensorflow.serving.PredictionService/Predict" => CallMethod::Predict,
            "/tensorflow.serving.PredictionService/Classify" => CallMethod::Classify,
            "/tensorflow.serving.PredictionService/Regress" => CallMethod::Regress,
            "/tensorflow.serving.PredictionService/MultiInference" => CallMethod::MultiInference,
            "/tensorflow.serving.PredictionService/GetModelMetadata" => CallMethod::GetModelMetadata,
            "/tensorflow.serving.ModelService/GetModelStatus" => CallMethod::GetModelStatus,
            "/tensorflow.serving.ModelService/HandleReloadConfigRequest" => CallMethod::ReloadConfig,
            _ => CallMethod::Other,
        };
        RouteKind { protocol: Protocol::Grpc, method }
    }

    /// Classifies a REST call by method and path (`/v1/models/M[/versions/V]:verb`).
    pub fn rest(method: &http::Method, path: &str) -> RouteKind {
        let kind = |method| RouteKind { protocol: Protocol::Rest, method };
        if method == http::Method::POST {
            if path.ends_with(":predict") {
                return kind(CallMethod::Predict);
            }
            if path.ends_with(":classify") {
                return kind(CallMethod::Classify);
            }
            if path.ends_with(":regress") {
                return kind(CallMethod::Regress);
            }
        }
        if method == http::Method::GET && path.starts_with("/v1/models/") {
            return kind(if path.ends_with("/metadata") {
                CallMethod::GetModelMetadata
            } else {
                CallMethod::GetModelStatus
            });
        }
        kind(CallMethod::Other)
    }

    /// The kind of an inference request on `protocol` (a REST request is a POST).
    pub fn of_request(protocol: Protocol, path: &str) -> RouteKind {
        match protocol {
            Protocol::Grpc => RouteKind::grpc(path),
            Protocol::Rest => RouteKind::rest(&http::Method::POST, path),
        }
    }

    /// Whether the exchange is copied to the worker.
    pub fn captured(self) -> bool {
        self.method.is_inference()
    }

    /// The `method` label of the proxy's `requests` metric: the method as its protocol
    /// names it on the wire (gRPC `Predict`, REST verb `predict`, `metadata`, `status`),
    /// so that a dashboard tells the two listeners' calls apart at a glance.
    pub fn label(self) -> &'static str {
        match (self.protocol, self.method) {
            (Protocol::Grpc, CallMethod::Predict) => "Predict",
            (Protocol::Grpc, CallMethod::Classify) => "Classify",
            (Protocol::Grpc, CallMethod::Regress) => "Regress",
            (Protocol::Grpc, CallMethod::MultiInference) => "MultiInference",
            (Protocol::Grpc, CallMethod::GetModelMetadata) => "GetModelMetadata",
            (Protocol::Grpc, CallMethod::GetModelStatus) => "GetModelStatus",
            (Protocol::Grpc, CallMethod::ReloadConfig) => "HandleReloadConfigRequest",
            (Protocol::Rest, CallMethod::GetModelMetadata) => "metadata",
            (Protocol::Rest, CallMethod::GetModelStatus) => "status",
            (Protocol::Rest, method) => method.as_str(),
            (Protocol::Grpc, CallMethod::Other) => "other",
        }
    }
}

/// Whose fault a failed exchange was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum ErrorOrigin {
    /// The client cancelled, reset its stream or went away before the end.
    Client,
    /// mltap answered itself because TF Serving could not be reached in time
    /// (REST 502/504, gRPC `UNAVAILABLE`/`DEADLINE_EXCEEDED` trailers-only).
    Mltap,
    /// TF Serving answered with an error status, reset the stream or broke its body.
    Upstream,
}

impl ErrorOrigin {
    /// The `origin` dimension of failed requests.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorOrigin::Client => "client",
            ErrorOrigin::Mltap => "mltap",
            ErrorOrigin::Upstream => "upstream",
        }
    }
}

/// Which bodies a captured copy holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bodies {
    /// Both bodies whole: a sampled exchange, for statistics.
    Full,
    /// The response whole and the request's first `REQUEST_PREFIX_BYTES`: a count record.
    ResponseOnly,
    /// Neither (the response passed `max_exchange_bytes`): counted as a request only.
    Neither,
}

/// A copy of one request/response pair, taken as the bytes passed through the proxy.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Which listener saw it; decides how the bodies are framed.
    pub protocol: Protocol,
    /// The call's method, as the proxy classified the request: the decoder does not
    /// work it out again.
    pub method: CallMethod,
    /// The request path: `/tensorflow.serving.PredictionService/Predict` for gRPC,
    /// `/v1/models/iris/versions/2:predict` for REST. Model, version and verb of a
    /// REST call are read from it by the decoder.
    pub path: String,
    /// The request id: the configured header's value, or a generated one.
    pub request_id: String,
    /// True when mltap generated `request_id` (the client sent none).
    pub request_id_generated: bool,
    /// `Content-Encoding` (REST) or `grpc-encoding` (gRPC) of the request, to inflate it.
    pub request_encoding: Option<String>,
    /// `Content-Encoding` (REST) or `grpc-encoding` (gRPC) of the response.
    pub response_encoding: Option<String>,
    /// Which of the bodies below are whole; count records hold a request prefix only.
    pub bodies: Bodies,
    /// Request body chunks in the order they passed; gRPC frames may span chunks.
    pub request_body: Vec<Bytes>,
    /// Response body chunks in the order they passed.
    pub response_body: Vec<Bytes>,
    /// HTTP status of the response (502/504 when mltap answered for a dead upstream).
    pub status: u16,
    /// gRPC status from the trailers (or a trailers-only response); None for REST.
    pub grpc_status: Option<i32>,
    /// Whose fault it was when the exchange failed; None when it succeeded.
    pub origin: Option<ErrorOrigin>,
    /// When the request reached mltap: the event time that buckets the exchange.
    pub started_at: SystemTime,
    /// From sending the request upstream to the end of the upstream's response.
    pub upstream_latency: Duration,
    /// False when the exchange ended early (client cancel, upstream reset).
    pub complete: bool,
}

impl Exchange {
    /// Bytes of request and response bodies held by this copy.
    pub fn captured_bytes(&self) -> usize {
        self.request_body.iter().chain(&self.response_body).map(Bytes::len).sum()
    }

    /// The request body as one contiguous buffer (no copy when it arrived in one chunk).
    pub fn request_bytes(&self) -> Bytes {
        concat(&self.request_body)
    }

    /// The response body as one contiguous buffer (no copy when it arrived in one chunk).
    pub fn response_bytes(&self) -> Bytes {
        concat(&self.response_body)
    }

    /// Whether both bodies are whole, so that statistics can be computed from it.
    pub fn sampled(&self) -> bool {
        self.bodies == Bodies::Full
    }

    /// The `status` dimension of `request_count`: the HTTP status for REST (`200`), the
    /// gRPC status for gRPC (`grpc_0`), `incomplete` for exchanges cut short.
    pub fn status_dimension(&self) -> String {
        if !self.complete {
            return "incomplete".to_string();
        }
        match (self.protocol, self.grpc_status) {
            (Protocol::Grpc, Some(code)) => format!("grpc_{code}"),
            _ => self.status.to_string(),
        }
    }

    /// Turns a sampled copy into a count record: the request is cut to its prefix.
    fn into_count_record(mut self) -> Exchange {
        if self.bodies == Bodies::Full {
            self.request_body = prefix(&self.request_body, REQUEST_PREFIX_BYTES);
            self.bodies = Bodies::ResponseOnly;
        }
        self
    }
}

/// The first `limit` bytes of a chunked body, copied.
pub fn prefix(chunks: &[Bytes], limit: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut left = limit;
    for chunk in chunks {
        if left == 0 {
            break;
        }
        let take = chunk.len().min(left);
        // A copy, so that the prefix does not pin the whole request buffer.
        out.push(Bytes::copy_from_slice(&chunk[..take]));
        left -= take;
    }
    out
}

fn concat(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut all = Vec::with_capacity(many.iter().map(Bytes::len).sum());
            for chunk in many {
                all.extend_from_slice(chunk);
            }
            Bytes::from(all)
        }
    }
}

/// Counters of the capture path, read by `/metrics`.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Exchanges put on the sampled lane.
    pub enqueued: AtomicU64,
    /// Exchanges shed from statistics: not sampled while the worker was behind, or
    /// sampled but finding the sampled lane full (or, through `offer`, dropped).
    pub dropped: AtomicU64,
    /// Exchanges whose bodies exceeded the per-exchange cap: their statistics are not
    /// computed (they are still counted when their response fits).
    pub skipped_oversize: AtomicU64,
    /// Exchanges currently waiting in the sampled lane.
    pub depth: AtomicUsize,
    /// Body bytes currently waiting in the sampled lane.
    pub depth_bytes: AtomicUsize,
    /// Count records put on the count lane.
    pub count_enqueued: AtomicU64,
    /// Count records currently waiting in the count lane.
    pub count_depth: AtomicUsize,
    /// Bytes currently waiting in the count lane (bodies and a fixed overhead per record).
    pub count_depth_bytes: AtomicUsize,
    /// Exchanges lost entirely because both lanes were full: missing from the counts.
    pub uncounted: AtomicU64,
    /// The share of exchanges withheld from statistics while the sampled lane has
    /// room, in units of `1 / FULL_SHARE` (0: none; see `statistics_share`).
    statistics_withheld: AtomicU32,
}

/// The statistics share when every exchange may be sampled.
pub const FULL_SHARE: u32 = 1 << 16;

impl CaptureStats {
    /// The share of exchanges sampled for statistics while the sampled lane has room,
    /// in units of `1 / FULL_SHARE`: lowered by the worker while mltap's threads wait
    /// for CPU (`worker`), so that statistics give way to serving.
    pub fn statistics_share(&self) -> u32 {
        FULL_SHARE - self.statistics_withheld.load(Ordering::Relaxed).min(FULL_SHARE)
    }

    /// Sets the statistics share (clamped to `FULL_SHARE`).
    pub fn set_statistics_share(&self, share: u32) {
        self.statistics_withheld.store(FULL_SHARE - share.min(FULL_SHARE), Ordering::Relaxed);
    }
}

/// The hot path's end of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CaptureSender {
    /// The sampled lane; its capacity bounds the number of queued exchanges.
    tx: mpsc::Sender<Exchange>,
    /// The count lane.
    count_tx: mpsc::Sender<Exchange>,
    /// Shared with the receiver, which gives bytes back as it takes exchanges.
    stats: Arc<CaptureStats>,
    /// Exchanges the sampled lane holds.
    max_exchanges: usize,
    /// Byte budget of the sampled lane: three quarters of the queue's, so that count
    /// records always find room in the rest.
    max_sampled_bytes: usize,
    /// Byte budget of both lanes together (`capture.queue_bytes`).
    max_bytes: usize,
    /// Bytes kept per exchange; above it the tee stops copying.
    max_exchange_bytes: usize,
}

/// The worker's end of the queue.
#[derive(Debug)]
pub struct CaptureReceiver {
    rx: mpsc::Receiver<Exchange>,
    count_rx: mpsc::Receiver<Exchange>,
    stats: Arc<CaptureStats>,
}

/// Creates the bounded capture queue.
pub fn queue(config: &CaptureConfig) -> (CaptureSender, CaptureReceiver) {
    let capacity = config.queue_exchanges.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let (count_tx, count_rx) = mpsc::channel(capacity.max(COUNT_LANE_EXCHANGES));
    let stats = Arc::new(CaptureStats::default());
    (
        CaptureSender {
            tx,
            count_tx,
            stats: stats.clone(),
            max_exchanges: capacity,
            max_sampled_bytes: config.queue_bytes / 4 * 3,
            max_bytes: config.queue_bytes,
            max_exchange_bytes: config.max_exchange_bytes,
        },
        CaptureReceiver { rx, count_rx, stats },
    )
}

thread_local! {
    /// Per-thread xorshift state for the sampling decision: a few cycles, no lock.
    static SAMPLING_RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let local = 0u8;
    // Distinct per thread (stack address) and per run (clock); never zero.
    (nanos ^ (&local as *const u8 as u64).rotate_left(32)) | 1
}

/// A uniform number in [0, 1) from the calling thread's generator.
fn uniform() -> f64 {
    SAMPLING_RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    })
}

/// The probability of keeping an exchange for statistics when the sampled lane is
/// `occupancy` full: all of them up to half full, then falling linearly to none when
/// full. Under sustained overload the lane settles where the kept share is what the
/// worker can process, and the choice is uniform over exchanges, not bursts.
pub fn keep_probability(occupancy: f64) -> f64 {
    ((1.0 - occupancy) * 2.0).clamp(0.0, 1.0)
}

impl CaptureSender {
    /// Decides, at the start of an exchange, whether its statistics are computed
    /// (both bodies are copied) or it is only counted: with the keep-probability of
    /// the sampled lane's occupancy, times the statistics share.
    pub fn sample(&self) -> bool {
        let by_count = self.stats.depth.load(Ordering::Relaxed) as f64 / self.max_exchanges as f64;
        let by_bytes = self.stats.depth_bytes.load(Ordering::Relaxed) as f64 / self.max_sampled_bytes.max(1) as f64;
        let share = f64::from(self.stats.statistics_share()) / f64::from(FULL_SHARE);
        let p = keep_probability(by_count.max(by_bytes)) * share;
        p >= 1.0 || (p > 0.0 && uniform() < p)
    }

    /// Hands over a finished exchange without waiting: a sampled one to the sampled
    /// lane when it has room, else (and any other) as a count record to the count lane.
    /// A sampled exchange that finds no room is shed from statistics and counted so.
    pub fn submit(&self, exchange: Exchange) {
        let record = if exchange.sampled() {
            match self.offer_sampled(exchange) {
                None => return,
                Some(refused) => {
                    self.shed();
                    refused.into_count_record()
                }
            }
        } else {
            exchange
        };
        self.offer_count(record);
    }

    /// Counts an exchange shed from statistics when it started (`sample` said no).
    pub fn shed(&self) {
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Puts an exchange on the sampled lane without waiting; drops and counts it when
    /// full (drop-newest; it is not counted elsewhere). Returns whether it was queued.
    pub fn offer(&self, exchange: Exchange) -> bool {
        match self.offer_sampled(exchange) {
            None => true,
            Some(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues an exchange on the sampled lane; gives it back when the lane is full.
    fn offer_sampled(&self, exchange: Exchange) -> Option<Exchange> {
        let bytes = exchange.captured_bytes();
        let before = self.stats.depth_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.max_sampled_bytes {
            self.stats.depth_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Some(exchange);
        }
        match self.tx.try_send(exchange) {
            Ok(()) => {
                self.stats.depth.fetch_add(1, Ordering::AcqRel);
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(error) => {
                self.stats.depth_bytes.fetch_sub(bytes, Ordering::AcqRel);
                Some(error.into_inner())
            }
        }
    }

    /// Puts a count record on the count lane; when both lanes together hold the whole
    /// byte budget the exchange is lost and counted in `uncounted`.
    fn offer_count(&self, exchange: Exchange) {
        let bytes = exchange.captured_bytes() + RECORD_OVERHEAD_BYTES;
        let before = self.stats.count_depth_bytes.fetch_add(bytes, Ordering::AcqRel);
        let sampled = self.stats.depth_bytes.load(Ordering::Relaxed);
        if before + sampled + bytes > self.max_bytes {
            self.stats.count_depth_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.stats.uncounted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match self.count_tx.try_send(exchange) {
            Ok(()) => {
                self.stats.count_depth.fetch_add(1, Ordering::AcqRel);
                self.stats.count_enqueued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.count_depth_bytes.fetch_sub(bytes, Ordering::AcqRel);
                self.stats.uncounted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts an exchange whose bodies were larger than the per-exchange cap.
    pub fn skip_oversize(&self) {
        self.stats.skipped_oversize.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes the tee may keep for one exchange.
    pub fn max_exchange_bytes(&self) -> usize {
        self.max_exchange_bytes
    }

    /// The queue's counters.
    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }
}

impl CaptureReceiver {
    /// The next sampled exchange; None once every sender is gone and the lane is empty.
    pub async fn recv(&mut self) -> Option<Exchange> {
        let exchange = self.rx.recv().await?;
        self.release(&exchange);
        Some(exchange)
    }

    /// The next sampled exchange if one is waiting.
    pub fn try_recv(&mut self) -> Option<Exchange> {
        let exchange = self.rx.try_recv().ok()?;
        self.release(&exchange);
        Some(exchange)
    }

    /// The next count record if one is waiting.
    pub fn try_recv_count(&mut self) -> Option<Exchange> {
        let exchange = self.count_rx.try_recv().ok()?;
        self.release_count(&exchange);
        Some(exchange)
    }

    fn release(&self, exchange: &Exchange) {
        Lane::Sampled.release(&self.stats, exchange);
    }

    fn release_count(&self, exchange: &Exchange) {
        Lane::Count.release(&self.stats, exchange);
    }

    /// The queue's counters.
    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }

    /// Splits the queue into its two lanes, `(sampled, count)`, so that each is taken
    /// by its own threads: the threads of one lane never wait on a lock the other's
    /// hold, whatever their scheduling priorities.
    pub fn into_lanes(self) -> (LaneReceiver, LaneReceiver) {
        let CaptureReceiver { rx, count_rx, stats } = self;
        (
            LaneReceiver { rx, stats: stats.clone(), lane: Lane::Sampled },
            LaneReceiver { rx: count_rx, stats, lane: Lane::Count },
        )
    }
}

/// Which lane a `LaneReceiver` takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Sampled,
    Count,
}

impl Lane {
    /// Gives back what a taken exchange held of the lane's depth and bytes.
    fn release(self, stats: &CaptureStats, exchange: &Exchange) {
        match self {
            Lane::Sampled => {
                stats.depth.fetch_sub(1, Ordering::AcqRel);
                stats.depth_bytes.fetch_sub(exchange.captured_bytes(), Ordering::AcqRel);
            }
            Lane::Count => {
                stats.count_depth.fetch_sub(1, Ordering::AcqRel);
                stats.count_depth_bytes.fetch_sub(exchange.captured_bytes() + RECORD_OVERHEAD_BYTES, Ordering::AcqRel);
            }
        }
    }
}

/// Why a lane gave no exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneEmpty {
    /// Nothing is waiting now.
    Empty,
    /// Nothing is waiting and every sender is gone: nothing will come.
    Closed,
}

/// One lane of the capture queue, as the worker takes it (see `into_lanes`).
#[derive(Debug)]
pub struct LaneReceiver {
    rx: mpsc::Receiver<Exchange>,
    stats: Arc<CaptureStats>,
    lane: Lane,
}

impl LaneReceiver {
    /// The next exchange waiting in this lane, without waiting.
    pub fn try_recv(&mut self) -> Result<Exchange, LaneEmpty> {
        match self.rx.try_recv() {
            Ok(exchange) => {
                self.lane.release(&self.stats, &exchange);
                Ok(exchange)
            }
            Err(mpsc::error::TryRecvError::Empty) => Err(LaneEmpty::Empty),
            Err(mpsc::error::TryRecvError::Disconnected) => Err(LaneEmpty::Closed),
        }
    }

    /// The queue's counters.
    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }
}

/// Bounds of the capture tap and its queue (`[capture]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Exchanges the queue holds before it drops the newest.
    pub queue_exchanges: usize,
    /// Bytes of captured bodies the queue holds before it drops the newest.
    pub queue_bytes: usize,
    /// Bytes kept per exchange (request + response); larger exchanges are skipped.
    pub max_exchange_bytes: usize,
    /// Return a generated request id to the client in the request-id header.
    pub return_request_id: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            queue_exchanges: 10_000,
            // Together with the worker's small hand-offs, these bound what monitoring
            // adds to mltap's memory whatever the traffic (< 100 MiB RSS in all).
            queue_bytes: 16 * MIB,
            max_exchange_bytes: 8 * MIB,
            return_request_id: false,
        }
    }
}

impl CaptureConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.queue_exchanges == 0 {
            return Err(("queue_exchanges".into(), "must be at least 1".into()));
        }
        if self.max_exchange_bytes == 0 || self.queue_bytes < self.max_exchange_bytes {
            return Err((
                "queue_bytes".into(),
                "must be at least capture.max_exchange_bytes, which must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(body: usize) -> Exchange {
        Exchange {
            protocol: Protocol::Rest,
            method: CallMethod::Predict,
            path: "/v1/models/m:predict".into(),
            request_id: "r".into(),
            request_id_generated: false,
            request_encoding: None,
            response_encoding: None,
            bodies: Bodies::Full,
            request_body: vec![Bytes::from(vec![0u8; body])],
            response_body: vec![],
            status: 200,
            grpc_status: None,
            origin: None,
            started_at: SystemTime::now(),
            upstream_latency: Duration::ZERO,
            complete: true,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_newest_and_counts_it() {
        let config = CaptureConfig { queue_exchanges: 2, ..CaptureConfig::default() };
        let (tx, mut rx) = queue(&config);
        assert!(tx.offer(exchange(1)));
        assert!(tx.offer(exchange(2)));
        assert!(!tx.offer(exchange(3)));
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 1);
        assert_eq!(rx.recv().await.unwrap().captured_bytes(), 1);
        assert_eq!(rx.recv().await.unwrap().captured_bytes(), 2);
        assert_eq!(rx.stats().depth.load(Ordering::Relaxed), 0);
        assert_eq!(rx.stats().depth_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn the_byte_budget_bounds_the_queue() {
        let config = CaptureConfig { queue_bytes: 100, max_exchange_bytes: 100, ..CaptureConfig::default() };
        let (tx, mut rx) = queue(&config);
        assert!(tx.offer(exchange(60)));
        assert!(!tx.offer(exchange(60)));
        rx.recv().await.unwrap();
        assert!(tx.offer(exchange(60)));
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn split_bodies_are_joined_in_order() {
        let mut e = exchange(0);
        e.request_body = vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")];
        assert_eq!(e.request_bytes(), Bytes::from_static(b"abcd"));
    }

    #[tokio::test]
    async fn a_sampled_exchange_finding_the_lane_full_becomes_a_count_record() {
        let config = CaptureConfig { queue_exchanges: 1, ..CaptureConfig::default() };
        let (tx, mut rx) = queue(&config);
        tx.submit(exchange(10));
        tx.submit(exchange(REQUEST_PREFIX_BYTES * 3));
        assert_eq!(rx.try_recv().unwrap().captured_bytes(), 10);
        let record = rx.try_recv_count().expect("the second is counted");
        assert_eq!(record.bodies, Bodies::ResponseOnly);
        assert_eq!(record.captured_bytes(), REQUEST_PREFIX_BYTES, "the request is cut to its prefix");
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 1);
        assert_eq!(tx.stats().uncounted.load(Ordering::Relaxed), 0);
        assert_eq!(rx.stats().count_depth_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn count_records_are_lost_only_past_the_whole_byte_budget() {
        let budget = 2 * RECORD_OVERHEAD_BYTES + 100;
        let config = CaptureConfig { queue_bytes: budget, queue_exchanges: 10, ..CaptureConfig::default() };
        let (tx, mut rx) = queue(&config);
        let record = |body| Exchange { bodies: Bodies::ResponseOnly, ..exchange(body) };
        tx.submit(record(60));
        tx.submit(record(60));
        assert_eq!(tx.stats().uncounted.load(Ordering::Relaxed), 1);
        assert!(rx.try_recv_count().is_some());
        assert!(rx.try_recv_count().is_none());
    }

    #[test]
    fn the_keep_probability_falls_from_half_full_to_full() {
        assert_eq!(keep_probability(0.0), 1.0);
        assert_eq!(keep_probability(0.5), 1.0);
        assert!((keep_probability(0.75) - 0.5).abs() < 1e-12);
        assert_eq!(keep_probability(1.0), 0.0);
        assert_eq!(keep_probability(3.0), 0.0);
    }

    #[test]
    fn sampling_keeps_about_the_keep_probability() {
        let kept = (0..100_000).filter(|_| uniform() < 0.3).count();
        assert!((28_000..32_000).contains(&kept), "{kept}");
    }
}
