//! The JSON access log: one line per exchange, inference or not, written on a thread
//! of its own to a file (rotated by size) or to stdout. The proxy hands each line
//! over with a `try_send`; when the channel is full the line is dropped and counted.

use super::convert;
use crate::capture::{CallMethod, ErrorOrigin, Protocol};
use crate::units::ConfigError;
use bytes::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use serde::Deserialize;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::warn;

/// How often written lines are flushed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// `[access_log]`: one JSON line per exchange.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// A file, or `-` for stdout; unset turns the access log off.
    pub path: Option<String>,
    /// The file is rotated (to `PATH.1`, `PATH.2`, ...) before it passes this size.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one.
    pub max_files: usize,
    /// Lines waiting for the writer at most; past it lines are dropped.
    pub buffer_lines: usize,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig { path: None, max_file_bytes: 100 << 20, max_files: 5, buffer_lines: 65_536 }
    }
}

impl AccessLogConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.path.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err(("path".into(), "must not be empty (use `-` for stdout)".into()));
        }
        if self.buffer_lines == 0 {
            return Err(("buffer_lines".into(), "must be positive".into()));
        }
        if self.max_file_bytes < 1024 {
            return Err(("max_file_bytes".into(), "must be at least 1024".into()));
        }
        Ok(())
    }
}

/// What the proxy knows of one exchange at its end.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// When the request reached mltap.
    pub time: SystemTime,
    pub protocol: Protocol,
    pub method: CallMethod,
    /// The method as its protocol names it (`Predict`, `predict`, `metadata`).
    pub method_label: &'static str,
    /// Path of the request (gRPC method path for gRPC).
    pub path: String,
    /// HTTP status the client got.
    pub status: u16,
    /// gRPC status, for gRPC.
    pub grpc_status: Option<i32>,
    pub upstream_latency: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The client's request id (or the generated one); empty when there is none.
    pub request_id: String,
    pub client: Option<SocketAddr>,
    pub origin: Option<ErrorOrigin>,
    /// The first bytes of a gRPC inference request, where its `model_spec` is.
    pub request_prefix: Vec<Bytes>,
    pub request_encoding: Option<String>,
}

impl AccessRecord {
    /// The JSON line (without its newline).
    pub fn to_json(&self) -> serde_json::Value {
        let (model, version, signature) = self.model();
        serde_json::json!({
            "time": humantime::format_rfc3339_millis(self.time).to_string(),
            "protocol": self.protocol.as_str(),
            "method": self.method_label,
            "path": self.path,
            "model": model,
            "version": version,
            "signature": signature,
            "status": self.status,
            "grpc_status": self.grpc_status,
            "upstream_latency_seconds": self.upstream_latency.as_secs_f64(),
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "request_id": (!self.request_id.is_empty()).then_some(&self.request_id),
            "client": self.client.map(|c| c.to_string()),
            "error_origin": self.origin.map(ErrorOrigin::as_str),
        })
    }

    /// Model, version and signature the call asked for, when it says.
    fn model(&self) -> (Option<String>, Option<String>, Option<String>) {
        use crate::tfserving::proto::serving::model_spec::VersionChoice;
        match self.protocol {
            Protocol::Rest => match convert::rest_target(&self.path).or_else(|| rest_model_path(&self.path)) {
                Some(t) => (Some(t.model), t.version.map(|v| v.to_string()).or(t.label), None),
                None => (None, None, None),
            },
            Protocol::Grpc => {
                match convert::grpc_model_spec(self.method, &self.request_prefix, self.request_encoding.as_deref()) {
                    Some(spec) => {
                        let version = match spec.version_choice {
                            Some(VersionChoice::Version(v)) => Some(v.to_string()),
                            Some(VersionChoice::VersionLabel(l)) => Some(l),
                            None => None,
                        };
                        let signature = (!spec.signature_name.is_empty()).then_some(spec.signature_name);
                        (Some(spec.name).filter(|n| !n.is_empty()), version, signature)
                    }
                    None => (None, None, None),
                }
            }
        }
    }
}

/// Model and version of a REST status or metadata path (`/v1/models/M[/versions/V][/metadata]`).
fn rest_model_path(path: &str) -> Option<convert::RestTarget> {
    let rest = path.split_once('?').map_or(path, |(p, _)| p).strip_prefix("/v1/models/")?;
    let rest = rest.strip_suffix("/metadata").unwrap_or(rest);
    let mut parts = rest.split('/');
    let model = parts.next().filter(|m| !m.is_empty())?.to_string();
    let (version, label) = match (parts.next(), parts.next()) {
        (Some("versions"), Some(v)) => (v.parse().ok(), None),
        (Some("labels"), Some(l)) => (None, Some(l.to_string())),
        _ => (None, None),
    };
    Some(convert::RestTarget { model, version, label })
}

/// Counts of the access log.
#[derive(Debug, Default)]
pub struct AccessLogStats {
    pub written: AtomicU64,
    /// Lines dropped because the channel was full or the write failed.
    pub dropped: AtomicU64,
}

/// The proxy's side of the access log.
#[derive(Debug)]
pub struct AccessLane {
    sender: SyncSender<AccessRecord>,
    stats: Arc<AccessLogStats>,
}

impl AccessLane {
    pub(super) fn submit(&self, record: AccessRecord) {
        if self.sender.try_send(record).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The proxy's side of a started access log, and its writer thread.
pub(super) type Started = (Arc<AccessLane>, std::thread::JoinHandle<()>);

/// Starts the access log when the configuration has a path.
pub(super) fn start(
    config: &AccessLogConfig,
    registry: &mut prometheus_client::registry::Registry,
) -> Result<Option<Started>, ConfigError> {
    let Some(path) = config.path.clone() else { return Ok(None) };
    let stats = Arc::new(AccessLogStats::default());
    let output = if path == "-" {
        Output::Stdout
    } else {
        let path = PathBuf::from(path);
        let file = open_append(&path)
            .map_err(|e| ConfigError::new("access_log.path", "", format!("cannot open {}: {e}", path.display())))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Output::File { path, file: std::io::BufWriter::new(file), size }
    };
    let (sender, receiver) = std::sync::mpsc::sync_channel(config.buffer_lines);
    let mut writer = AccessWriter {
        output,
        max_file_bytes: config.max_file_bytes,
        max_files: config.max_files,
        stats: stats.clone(),
        last_warning: None,
    };
    let thread = std::thread::Builder::new()
        .name("mltap-access-log".into())
        .spawn(move || writer.run(receiver))
        .map_err(|e| ConfigError::new("access_log", "", format!("cannot start the writer: {e}")))?;
    registry.register_collector(Box::new(AccessLogCollector { stats: stats.clone() }));
    Ok(Some((Arc::new(AccessLane { sender, stats }), thread)))
}

fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new().create(true).append(true).open(path)
}

enum Output {
    Stdout,
    File { path: PathBuf, file: std::io::BufWriter<std::fs::File>, size: u64 },
}

struct AccessWriter {
    output: Output,
    max_file_bytes: u64,
    max_files: usize,
    stats: Arc<AccessLogStats>,
    last_warning: Option<Instant>,
}

impl AccessWriter {
    fn run(&mut self, receiver: Receiver<AccessRecord>) {
        let mut last_flush = Instant::now();
        loop {
            match receiver.recv_timeout(FLUSH_EVERY) {
                Ok(record) => self.write(&record),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if last_flush.elapsed() >= FLUSH_EVERY {
                self.flush();
                last_flush = Instant::now();
            }
        }
        self.flush();
    }

    fn write(&mut self, record: &AccessRecord) {
        let mut line = record.to_json().to_string();
        line.push('\n');
        let result = match &mut self.output {
            Output::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Output::File { file, size, .. } => {
                *size += line.len() as u64;
                file.write_all(line.as_bytes())
            }
        };
        match result {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                self.warn_failed(&error);
            }
        }
        if matches!(&self.output, Output::File { size, .. } if *size >= self.max_file_bytes) {
            self.rotate();
        }
    }

    fn flush(&mut self) {
        let result = match &mut self.output {
            Output::Stdout => std::io::stdout().flush(),
            Output::File { file, .. } => file.flush(),
        };
        if let Err(error) = result {
            self.warn_failed(&error);
        }
    }

    /// `PATH` becomes `PATH.1`, `PATH.1` becomes `PATH.2`, ..., the oldest goes.
    fn rotate(&mut self) {
        self.flush();
        let Output::File { path, file, size } = &mut self.output else { return };
        let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
        if self.max_files == 0 {
            let _ = std::fs::remove_file(&*path);
        } else {
            let _ = std::fs::remove_file(numbered(self.max_files));
            for n in (1..self.max_files).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            let _ = std::fs::rename(&*path, numbered(1));
        }
        match open_append(path) {
            Ok(new) => {
                *file = std::io::BufWriter::new(new);
                *size = 0;
            }
            Err(error) => self.warn_failed(&error),
        }
    }

    fn warn_failed(&mut self, error: &std::io::Error) {
        if self.last_warning.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            return;
        }
        self.last_warning = Some(Instant::now());
        warn!(message = "Access log write failed; proxied traffic is unaffected.", %error);
    }
}

#[derive(Debug)]
struct AccessLogCollector {
    stats: Arc<AccessLogStats>,
}

impl Collector for AccessLogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counters = [
            ("access_log_lines_written", "Access log lines written", self.stats.written.load(Ordering::Relaxed)),
            (
                "access_log_lines_dropped",
                "Access log lines dropped (writer behind, or the write failed)",
                self.stats.dropped.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> AccessRecord {
        AccessRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250),
            protocol: Protocol::Rest,
            method: CallMethod::Predict,
            method_label: "predict",
            path: path.into(),
            status: 200,
            grpc_status: None,
            upstream_latency: Duration::from_millis(12),
            request_bytes: 10,
            response_bytes: 20,
            request_id: "abc".into(),
            client: Some("127.0.0.1:5555".parse().unwrap()),
            origin: None,
            request_prefix: Vec::new(),
            request_encoding: None,
        }
    }

    #[test]
    fn a_line_names_the_call_and_its_model() {
        let line = record("/v1/models/churn/versions/2:predict").to_json();
        assert_eq!(line["time"], "2023-11-14T22:13:20.250Z");
        assert_eq!(line["model"], "churn");
        assert_eq!(line["version"], "2");
        assert_eq!(line["status"], 200);
        assert_eq!(line["upstream_latency_seconds"], 0.012);
        assert_eq!(line["client"], "127.0.0.1:5555");
        assert_eq!(record("/v1/models/churn/metadata").to_json()["model"], "churn");
        assert_eq!(record("/healthz").to_json()["model"], serde_json::Value::Null);
    }

    #[test]
    fn the_file_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let config = AccessLogConfig {
            path: Some(path.display().to_string()),
            max_file_bytes: 1024,
            max_files: 2,
            buffer_lines: 1000,
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let (lane, thread) = start(&config, &mut registry).unwrap().unwrap();
        for _ in 0..40 {
            lane.submit(record("/v1/models/m:predict"));
        }
        drop(lane);
        thread.join().unwrap();
        let mut lines = 0;
        for name in ["access.log", "access.log.1", "access.log.2"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(text.len() < 1024 + 512, "{name} was rotated at its size: {} bytes", text.len());
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(value["request_id"], "abc");
                lines += 1;
            }
        }
        assert!(!dir.path().join("access.log.3").exists());
        assert!((6..40).contains(&lines), "older files are deleted past max_files: {lines}");
    }
}
