//! Request logging that TF Serving's open-source build lacks: a sampled log of
//! inference exchanges as TFRecord files of `tensorflow.serving.PredictionLog` (the
//! format TF Serving's own request logger writes), and a JSON access log of every
//! exchange.
//!
//! The proxy calls in at two points of an exchange, through `ExchangeLogs`: when its
//! record is created (`sample`, one uniform draw, independent of the monitoring's own
//! sampling) and when it ends (`log_request`, `access`). Both hand over with a
//! `try_send` to a bounded channel and never wait: when a channel or its byte budget
//! is full, the record is dropped and counted. Converting, framing and writing happen
//! on a thread of each log's own. This module never changes what a client receives.
//!
//! Every inference exchange ends in exactly one outcome of
//! `request_log_exchanges_total` (logged, not sampled, failed exchange, or dropped
//! with its reason), so the counts are exact whatever the load.

pub mod access;
pub mod convert;
pub mod tfrecord;
pub mod upload;
pub mod writer;

use crate::capture::Exchange;
use crate::tfserving::{SchemaCache, SchemaKey, SchemaSource};
use crate::units::ConfigError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

pub use access::{AccessLogConfig, AccessRecord};

/// Exchanges the request log's channel holds at most (its byte budget usually binds first).
const QUEUE_EXCHANGES: usize = 16 * 1024;
/// How long the writer waits, once per model version, for the signature that types
/// a REST body's tensors.
const SCHEMA_WAIT: Duration = Duration::from_secs(2);

/// `[request_log]`: the sampled PredictionLog TFRecord files.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestLogConfig {
    /// Share of inference exchanges logged, drawn uniformly: 0 is off, 1 logs all.
    /// `[models.NAME] request_log_sampling_rate` overrides it per model.
    pub sampling_rate: f64,
    /// Where the files go, one folder per model; `OUTPUT_DIR/requests` when unset.
    pub dir: Option<PathBuf>,
    /// A file is closed (and a new one opened) before it passes this size.
    pub max_file_bytes: u64,
    /// A file is closed once it has been open this long.
    #[serde(deserialize_with = "crate::units::deserialize_duration")]
    pub max_file_age: Duration,
    /// All files together stay under this; the oldest closed files are deleted first.
    pub max_total_bytes: u64,
    /// Bytes of exchanges waiting for the writer at most; past it records are dropped.
    pub buffer_bytes: usize,
    /// Records reach the open file within this long.
    #[serde(deserialize_with = "crate::units::deserialize_duration")]
    pub flush_interval: Duration,
    /// `s3://bucket/prefix`: closed files are uploaded there, then deleted locally.
    pub upload: Option<String>,
}

impl Default for RequestLogConfig {
    fn default() -> Self {
        RequestLogConfig {
            sampling_rate: 0.0,
            dir: None,
            max_file_bytes: 64 << 20,
            max_file_age: Duration::from_secs(600),
            max_total_bytes: 1 << 30,
            buffer_bytes: 16 << 20,
            flush_interval: Duration::from_secs(1),
            upload: None,
        }
    }
}

impl RequestLogConfig {
    /// Checks of the section alone: the failing key and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, problem: String| Err((key.to_string(), problem));
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return bad("sampling_rate", format!("{} is not between 0 and 1", self.sampling_rate));
        }
        if self.max_file_bytes < 1024 {
            return bad("max_file_bytes", "must be at least 1024".into());
        }
        if self.max_total_bytes < self.max_file_bytes {
            return bad("max_total_bytes", "must be at least request_log.max_file_bytes".into());
        }
        if self.buffer_bytes == 0 {
            return bad("buffer_bytes", "must be positive".into());
        }
        if let Some(url) = &self.upload {
            upload::UploadTarget::parse(url).map_err(|problem| ("upload".to_string(), problem))?;
        }
        Ok(())
    }
}

/// The sampling rate of each model: the section's, or the model's override.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingRates {
    pub default: f64,
    pub per_model: BTreeMap<String, f64>,
}

impl SamplingRates {
    pub fn for_model(&self, model: &str) -> f64 {
        self.per_model.get(model).copied().unwrap_or(self.default)
    }

    /// The rate the proxy draws with: the largest of all, so that the writer can
    /// thin each model down to its own rate once it knows the model.
    pub fn proxy_rate(&self) -> f64 {
        self.per_model.values().copied().fold(self.default, f64::max)
    }
}

/// Exact counts of the request log, shared by the proxy and the writer.
#[derive(Debug, Default)]
pub struct RequestLogStats {
    /// Records on disk.
    pub logged: AtomicU64,
    /// Exchanges the sampling left out.
    pub not_sampled: AtomicU64,
    /// Exchanges that did not succeed (an error status, a cancelled call): they have
    /// no response message to log.
    pub failed_exchange: AtomicU64,
    /// Sampled exchanges dropped because the writer's buffer was full.
    pub dropped_queue_full: AtomicU64,
    /// Sampled exchanges dropped because their bodies passed `capture.max_exchange_bytes`.
    pub dropped_oversize: AtomicU64,
    /// Sampled exchanges whose bodies could not be converted to a PredictionLog.
    pub dropped_unconvertible: AtomicU64,
    /// Records dropped because writing them failed (disk full, I/O error).
    pub dropped_write_error: AtomicU64,
    /// Framed bytes written.
    pub bytes_written: AtomicU64,
    pub files_closed: AtomicU64,
    /// Closed files deleted to stay under `max_total_bytes`.
    pub files_deleted: AtomicU64,
    /// Bytes of exchanges waiting for the writer.
    pub queued_bytes: AtomicUsize,
    /// Closed files accepted by the object store (then deleted locally).
    pub uploaded_files: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    /// Upload attempts that failed (each is retried).
    pub upload_failures: AtomicU64,
    /// Files deleted (by the total cap) before they could be uploaded.
    pub upload_lost: AtomicU64,
}

/// The request log's side of the proxy: the sampling draw and the channel.
#[derive(Debug)]
struct RequestLane {
    /// The largest sampling rate of any model: the writer thins each model to its own.
    proxy_rate: f64,
    buffer_bytes: usize,
    sender: SyncSender<Exchange>,
    stats: Arc<RequestLogStats>,
    /// Drops for a full buffer are reported at warn, at most every `WARN_EVERY`.
    warning: RateLimitedWarning,
}

/// A warning about dropped records at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// What the proxy holds of the request and access logs. The default has both off.
#[derive(Debug, Clone, Default)]
pub struct ExchangeLogs {
    requests: Option<Arc<RequestLane>>,
    access: Option<Arc<access::AccessLane>>,
}

impl ExchangeLogs {
    /// Whether the access log wants every exchange (its path, id and byte counts).
    pub fn access_on(&self) -> bool {
        self.access.is_some()
    }

    /// One uniform draw for an inference exchange: whether its bodies are copied for
    /// the request log. An exchange left out is counted here.
    pub fn sample(&self) -> bool {
        let Some(lane) = &self.requests else { return false };
        let sampled = lane.proxy_rate >= 1.0 || rand::random::<f64>() < lane.proxy_rate;
        if !sampled {
            lane.stats.not_sampled.fetch_add(1, Ordering::Relaxed);
        }
        sampled
    }

    /// Hands a sampled exchange to the writer, or counts why it is not logged.
    /// `oversize` is set when its bodies passed the capture cap and are incomplete.
    pub fn log_request(&self, exchange: Exchange, oversize: bool) {
        let Some(lane) = &self.requests else { return };
        let stats = &lane.stats;
        if oversize {
            stats.dropped_oversize.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !exchange.complete || exchange.origin.is_some() {
            stats.failed_exchange.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let bytes = exchange.captured_bytes();
        let queued = stats.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        let sent = queued + bytes <= lane.buffer_bytes
            && !matches!(lane.sender.try_send(exchange), Err(TrySendError::Full(_) | TrySendError::Disconnected(_)));
        if !sent {
            stats.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            let dropped = stats.dropped_queue_full.fetch_add(1, Ordering::Relaxed) + 1;
            if lane.warning.allow(WARN_EVERY) {
                warn!(
                    message = "Request log buffer full (slow disk?): sampled exchanges dropped; proxied traffic is unaffected.",
                    dropped_so_far = dropped,
                );
            }
        }
    }

    /// Hands one access log line over without waiting.
    pub fn access(&self, record: AccessRecord) {
        if let Some(lane) = &self.access {
            lane.submit(record);
        }
    }
}

/// What the logs take from the configuration (`app` builds it).
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub request_log: RequestLogConfig,
    pub access_log: AccessLogConfig,
    /// `[models.NAME] request_log_sampling_rate`, for the models that set it.
    pub model_rates: BTreeMap<String, f64>,
    /// `OUTPUT_DIR`: the request log's files go under `requests/` when
    /// `request_log.dir` is unset.
    pub output_dir: PathBuf,
    /// Where signatures are fetched to type REST bodies' tensors.
    pub grpc_upstream: http::Uri,
    pub rest_upstream: http::Uri,
}

impl LogSettings {
    /// Where the request log's files go.
    pub fn request_dir(&self) -> PathBuf {
        request_dir(&self.request_log, &self.output_dir)
    }
}

/// Where the request log's files go: `request_log.dir`, or `OUTPUT_DIR/requests`.
pub fn request_dir(config: &RequestLogConfig, output_dir: &std::path::Path) -> PathBuf {
    config.dir.clone().unwrap_or_else(|| output_dir.join("requests"))
}

/// The running logs: the handle the proxy holds and the threads behind it.
#[derive(Debug)]
pub struct RunningLogs {
    pub logs: ExchangeLogs,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Uploads closed files; ends once the writer has closed its last file.
    uploader: Option<tokio::task::JoinHandle<()>>,
}

impl RunningLogs {
    /// Starts the logs the configuration turns on and registers their metrics.
    /// Must run inside a tokio runtime when the request log is on (it fetches
    /// signatures for REST bodies on it).
    pub fn start(
        settings: &LogSettings,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<RunningLogs, ConfigError> {
        let mut logs = ExchangeLogs::default();
        let mut threads = Vec::new();
        let mut uploader = None;
        let config = &settings.request_log;
        let rates = SamplingRates { default: config.sampling_rate, per_model: settings.model_rates.clone() };
        let request_stats = Arc::new(RequestLogStats::default());
        if rates.proxy_rate() > 0.0 {
            let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_EXCHANGES);
            let files = writer::FileSettings {
                dir: settings.request_dir(),
                max_file_bytes: config.max_file_bytes,
                max_file_age: config.max_file_age,
                max_total_bytes: config.max_total_bytes,
            };
            std::fs::create_dir_all(&files.dir).map_err(|e| {
                ConfigError::new("request_log.dir", "", format!("cannot create {}: {e}", files.dir.display()))
            })?;
            let schemas = tokio::runtime::Handle::try_current().ok().map(|runtime| {
                let _entered = runtime.enter();
                let cache = SchemaCache::spawn(SchemaSource::new(
                    Some(settings.grpc_upstream.clone()),
                    Some(settings.rest_upstream.clone()),
                    SCHEMA_WAIT,
                ));
                (runtime, cache)
            });
            let closed_files = match &config.upload {
                Some(url) => {
                    let bad = |problem: String| ConfigError::new("request_log.upload", "", problem);
                    let target = upload::UploadTarget::parse(url).map_err(bad)?;
                    if tokio::runtime::Handle::try_current().is_err() {
                        return Err(bad("uploads need mltap's runtime".into()));
                    }
                    let (sender, task) =
                        upload::spawn(target, files.dir.clone(), request_stats.clone()).map_err(bad)?;
                    uploader = Some(task);
                    Some(sender)
                }
                None => None,
            };
            let lane = RequestLane {
                proxy_rate: rates.proxy_rate(),
                buffer_bytes: config.buffer_bytes,
                sender,
                stats: request_stats.clone(),
                warning: RateLimitedWarning::default(),
            };
            let worker = RequestWriter {
                rates,
                proxy_rate: lane.proxy_rate,
                flush_interval: config.flush_interval,
                stats: request_stats.clone(),
                files: writer::RequestFiles::open(files, request_stats.clone(), closed_files),
                schemas,
                waited: HashSet::new(),
            };
            let thread = std::thread::Builder::new()
                .name("mltap-request-log".into())
                .spawn(move || worker.run(receiver))
                .map_err(|e| ConfigError::new("request_log", "", format!("cannot start the writer: {e}")))?;
            threads.push(thread);
            logs.requests = Some(Arc::new(lane));
        }
        registry.register_collector(Box::new(RequestLogCollector { stats: request_stats }));
        if let Some((lane, thread)) = access::start(&settings.access_log, registry)? {
            logs.access = Some(lane);
            threads.push(thread);
        }
        Ok(RunningLogs { logs, threads, uploader })
    }

    /// Waits for the writers to close their files, once every proxy has let go of
    /// its `ExchangeLogs` (their channels close then).
    pub async fn finish(self) {
        let RunningLogs { logs, threads, uploader } = self;
        drop(logs);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        if let Some(uploader) = uploader {
            let _ = uploader.await;
        }
    }
}

/// The request log's thread: converts, thins to each model's rate, writes.
struct RequestWriter {
    rates: SamplingRates,
    proxy_rate: f64,
    flush_interval: Duration,
    stats: Arc<RequestLogStats>,
    files: writer::RequestFiles,
    /// Signatures to type REST tensors, fetched on the runtime mltap runs on.
    schemas: Option<(tokio::runtime::Handle, SchemaCache)>,
    /// Model versions whose signature was waited for once already.
    waited: HashSet<SchemaKey>,
}

impl RequestWriter {
    fn run(mut self, receiver: Receiver<Exchange>) {
        let mut last_flush = Instant::now();
        loop {
            match receiver.recv_timeout(self.flush_interval) {
                Ok(exchange) => {
                    self.stats.queued_bytes.fetch_sub(exchange.captured_bytes(), Ordering::Relaxed);
                    self.write(&exchange);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last_flush.elapsed() >= self.flush_interval {
                self.files.tick();
                last_flush = Instant::now();
            }
        }
        self.files.close_all();
    }

    fn write(&mut self, exchange: &Exchange) {
        let schema = self.rest_schema(exchange);
        let signature =
            convert::Signature { schema: schema.as_ref().and_then(|(schema, name)| schema.signature(name)) };
        // Stamped with the proxy's rate first; the model's own rate is known after.
        let converted = match convert::convert(exchange, self.proxy_rate, signature) {
            Ok(converted) => converted,
            Err(problem) => {
                self.stats.dropped_unconvertible.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(message = "An exchange cannot be logged as a PredictionLog.", %problem, path = %exchange.path);
                return;
            }
        };
        let rate = self.rates.for_model(&converted.model);
        if rate < self.proxy_rate && rand::random::<f64>() >= rate / self.proxy_rate {
            self.stats.not_sampled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let record = if rate == self.proxy_rate {
            converted.record
        } else {
            match convert::convert(exchange, rate, signature) {
                Ok(converted) => converted.record,
                Err(_) => {
                    self.stats.dropped_unconvertible.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        self.files.append(&converted.model, &record);
    }

    /// The signature of a REST call's model version and the signature name it used,
    /// waiting for it the first time a model version is seen.
    fn rest_schema(&mut self, exchange: &Exchange) -> Option<(Arc<crate::tfserving::ModelSchema>, String)> {
        if exchange.protocol != crate::capture::Protocol::Rest {
            return None;
        }
        let (runtime, cache) = self.schemas.as_ref()?;
        let target = convert::rest_target(&exchange.path)?;
        let key = SchemaKey { model: target.model, version: target.version, label: target.label };
        let schema = match cache.get(&key) {
            Some(schema) => schema,
            None if self.waited.insert(key.clone()) => runtime.block_on(cache.resolved(&key, SCHEMA_WAIT))?,
            None => return None,
        };
        let body = exchange.request_bytes();
        let name = signature_name(&body).unwrap_or_default();
        Some((schema, name))
    }
}

/// The `signature_name` of a REST body, if it has one at its top level.
fn signature_name(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        signature_name: Option<String>,
    }
    serde_json::from_slice::<Named>(body).ok()?.signature_name
}

/// Scrape-time view of the request log's counts.
#[derive(Debug)]
struct RequestLogCollector {
    stats: Arc<RequestLogStats>,
}

impl Collector for RequestLogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let outcomes = [
            ("logged", load(&s.logged)),
            ("not_sampled", load(&s.not_sampled)),
            ("failed_exchange", load(&s.failed_exchange)),
            ("dropped_queue_full", load(&s.dropped_queue_full)),
            ("dropped_oversize", load(&s.dropped_oversize)),
            ("dropped_unconvertible", load(&s.dropped_unconvertible)),
            ("dropped_write_error", load(&s.dropped_write_error)),
        ];
        let mut family = encoder.encode_descriptor(
            "request_log_exchanges",
            "Inference exchanges by what the request log did with them; every exchange has exactly one outcome",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (outcome, value) in outcomes {
            let labels = [("outcome", outcome)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let counters = [
            ("request_log_bytes_written", "Framed TFRecord bytes written to request log files", load(&s.bytes_written)),
            ("request_log_files_closed", "Request log files closed (renamed to .tfrecord)", load(&s.files_closed)),
            (
                "request_log_files_deleted",
                "Closed request log files deleted to stay under request_log.max_total_bytes",
                load(&s.files_deleted),
            ),
            (
                "request_log_uploaded_files",
                "Closed request log files uploaded (then deleted locally)",
                load(&s.uploaded_files),
            ),
            ("request_log_uploaded_bytes", "Bytes of request log files uploaded", load(&s.uploaded_bytes)),
            ("request_log_upload_failures", "Failed upload attempts (each one is retried)", load(&s.upload_failures)),
            (
                "request_log_upload_lost",
                "Closed request log files deleted by the total size cap before they were uploaded",
                load(&s.upload_lost),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let gauge = ConstGauge::new(s.queued_bytes.load(Ordering::Relaxed) as i64);
        gauge.encode(encoder.encode_descriptor(
            "request_log_queue_bytes",
            "Bytes of sampled exchanges waiting for the request log writer",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Reports a warning at most once per `every`; for drops on a hot path.
#[derive(Debug, Default)]
pub(crate) struct RateLimitedWarning {
    last: std::sync::Mutex<Option<Instant>>,
}

impl RateLimitedWarning {
    pub(crate) fn allow(&self, every: Duration) -> bool {
        let Ok(mut last) = self.last.try_lock() else { return false };
        if last.is_some_and(|at| at.elapsed() < every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}
