//! The one typed configuration of mltap, built once at start from (highest first)
//! command-line flags, `MLTAP_<KEY>` environment variables, the TOML file given with
//! `--config`, and built-in defaults, then validated. Nothing downstream reads a
//! string key again: a bad value stops start-up here with one line naming the key.
//!
//! The flat keys are the `serve` flags of DESIGN.md. Sections (`[capture]`,
//! `[monitor]`, `[labels]`, `[anodot]`, `[models.NAME]`) hold settings that have no
//! flag; each section's type lives beside the component it configures.

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The command line.
#[derive(Debug, Parser)]
#[command(name = "mltap", version, about = "Transparent monitoring proxy for TensorFlow Serving")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy and its monitoring worker.
    Serve(ServeArgs),
    /// Run a self-contained demonstration: model server, proxy, traffic and labels.
    Demo(DemoArgs),
    /// Upload stored Anodot files to Anodot (token from ANODOT_TOKEN).
    Send(SendArgs),
}

/// `serve` flags. Every flag is optional here so that the file and the defaults can
/// fill in what the command line leaves out; `Config::load` applies the precedence.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "MLTAP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// gRPC listener (h2c) [default: 0.0.0.0:8500]
    #[arg(long, env = "MLTAP_GRPC_LISTEN", value_name = "ADDR")]
    pub grpc_listen: Option<String>,
    /// REST listener (HTTP/1.1) [default: 0.0.0.0:8501]
    #[arg(long, env = "MLTAP_REST_LISTEN", value_name = "ADDR")]
    pub rest_listen: Option<String>,
    /// TF Serving gRPC port [default: http://127.0.0.1:9500]
    #[arg(long, env = "MLTAP_GRPC_UPSTREAM", value_name = "URL")]
    pub grpc_upstream: Option<String>,
    /// TF Serving REST port [default: http://127.0.0.1:9501]
    #[arg(long, env = "MLTAP_REST_UPSTREAM", value_name = "URL")]
    pub rest_upstream: Option<String>,
    /// Admin server: /metrics, /healthz, /readyz, /v1/labels, dashboard [default: 0.0.0.0:9090]
    #[arg(long, env = "MLTAP_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Bucket width, e.g. 2s, 5m, 1h [default: 60s]
    #[arg(long, env = "MLTAP_BUCKET", value_name = "DURATION")]
    pub bucket: Option<String>,
    /// Anodot JSON files and local state [default: ./mltap-out]
    #[arg(long, env = "MLTAP_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<String>,
    /// Label join store: redis://host:port/db (comma-separated nodes for a cluster) [default: embedded file in the output dir]
    #[arg(long, env = "MLTAP_LABELS_STORE", value_name = "URL")]
    pub labels_store: Option<String>,
    /// How long a bucket waits for its labels before its label metrics are emitted [default: 1h]
    #[arg(long, env = "MLTAP_LABEL_HORIZON", value_name = "DURATION")]
    pub label_horizon: Option<String>,
    /// Anodot metrics endpoint; token from ANODOT_TOKEN
    #[arg(long, env = "MLTAP_ANODOT_URL", value_name = "URL")]
    pub anodot_url: Option<String>,
    /// Header (or gRPC metadata key) carrying the request id [default: x-request-id]
    #[arg(long, env = "MLTAP_REQUEST_ID_HEADER", value_name = "NAME")]
    pub request_id_header: Option<String>,
    /// Log filter, e.g. info, debug, mltap=debug [default: info]
    #[arg(long, env = "MLTAP_LOG", value_name = "FILTER")]
    pub log: Option<String>,
}

/// `demo` flags: its own duration plus every `serve` flag.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long to run; runs until Ctrl-C when absent.
    #[arg(long = "for", value_name = "DURATION")]
    pub run_for: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `send` arguments.
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Directory of stored Anodot files (an output dir or its `anodot/` folder).
    pub dir: PathBuf,
    /// Anodot metrics endpoint.
    #[arg(long, env = "MLTAP_ANODOT_URL", value_name = "URL")]
    pub anodot_url: String,
    /// Metric protocol: 2.0, or 3.0 (stream schemas and watermarks; access key from ANODOT_ACCESS_KEY).
    #[arg(long, value_name = "VERSION", default_value = "2.0")]
    pub protocol: String,
    /// Points per second sent at most.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub points_per_second: u32,
    /// Stop when Anodot keeps failing this long; a later run resumes where this one stopped.
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub give_up_after: String,
}

/// A configuration problem, reported as one line naming the key; exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The configuration key (`bucket`, `models.iris.threshold`, ...) at fault.
    pub key: String,
    /// Where the bad value came from (`--bucket`, `MLTAP_BUCKET`, `mltap.toml`).
    pub source: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, source: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError { key: key.into(), source: source.into(), problem: problem.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.source.is_empty() {
            write!(f, "configuration key `{}`: {}", self.key, self.problem)
        } else {
            write!(f, "configuration key `{}` (from {}): {}", self.key, self.source, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where the join store for labels lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelsStoreConfig {
    /// An embedded file under the output dir (single replica).
    Embedded,
    /// One Redis server, `redis://host:port/db`.
    Redis(String),
    /// A Redis Cluster, given by several node addresses.
    RedisCluster(Vec<String>),
}

/// Bounds of the capture tap and its queue (`[capture]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
            queue_bytes: 16 << 20,
            max_exchange_bytes: 8 << 20,
            return_request_id: false,
        }
    }
}

/// Per-model overrides (`[models.NAME]`), for what the payload cannot say.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The output holding the class probabilities.
    pub probabilities_output: Option<String>,
    /// Class names, by class index.
    pub class_names: Option<Vec<String>>,
    /// Binary sigmoid models predict class 1 when p > threshold.
    pub threshold: Option<f64>,
    /// Features to treat as categorical even when numeric.
    pub categorical_features: Vec<String>,
    /// An input feature whose per-row value is the id labels refer to.
    pub id_feature: Option<String>,
    /// This model's share of exchanges in the request log, instead of `request_log.sampling_rate`.
    pub request_log_sampling_rate: Option<f64>,
}

/// The validated configuration of `serve` (and of the proxy inside `demo`).
#[derive(Debug, Clone)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub rest_listen: SocketAddr,
    pub grpc_upstream: http::Uri,
    pub rest_upstream: http::Uri,
    pub admin_listen: SocketAddr,
    pub bucket: Duration,
    pub output_dir: PathBuf,
    pub labels_store: LabelsStoreConfig,
    pub label_horizon: Duration,
    pub anodot_url: Option<String>,
    pub request_id_header: http::HeaderName,
    /// Upstream response-header timeout for REST (504) and gRPC without a deadline.
    pub upstream_timeout: Duration,
    /// How long shutdown waits for in-flight exchanges and the capture queue.
    pub shutdown_grace: Duration,
    pub log: String,
    pub capture: CaptureConfig,
    pub monitor: crate::monitor::MonitorConfig,
    pub labels: crate::labels::LabelsConfig,
    pub anodot: crate::sinks::AnodotConfig,
    pub models: BTreeMap<String, ModelConfig>,
    /// TLS towards `https://` upstreams and on mltap's own listeners.
    pub tls: crate::proxy::tls::TlsConfig,
    /// Sampled PredictionLog TFRecord files of inference exchanges.
    pub request_log: crate::request_log::RequestLogConfig,
    /// One JSON line per exchange.
    pub access_log: crate::request_log::AccessLogConfig,
}

/// The TOML file: the flat keys as strings (parsed with the same rules as flags) and
/// the typed sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    grpc_listen: Option<String>,
    rest_listen: Option<String>,
    grpc_upstream: Option<String>,
    rest_upstream: Option<String>,
    admin_listen: Option<String>,
    bucket: Option<String>,
    output_dir: Option<String>,
    labels_store: Option<String>,
    label_horizon: Option<String>,
    anodot_url: Option<String>,
    request_id_header: Option<String>,
    upstream_timeout: Option<String>,
    shutdown_grace: Option<String>,
    log: Option<String>,
    #[serde(default)]
    capture: CaptureConfig,
    #[serde(default)]
    monitor: crate::monitor::MonitorConfig,
    #[serde(default)]
    labels: crate::labels::LabelsConfig,
    #[serde(default)]
    anodot: crate::sinks::AnodotConfig,
    #[serde(default)]
    models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    tls: crate::proxy::tls::TlsConfig,
    #[serde(default)]
    request_log: crate::request_log::RequestLogConfig,
    #[serde(default)]
    access_log: crate::request_log::AccessLogConfig,
}

/// A raw value with the place it came from, for error messages.
struct Raw<'a> {
    key: &'static str,
    value: &'a str,
    source: String,
}

impl Config {
    /// Builds and validates the configuration from flags, env (already folded into
    /// `args` by clap) and the optional file.
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file_name = args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        // Flags and env come through clap; clap does not say which of the two it was.
        let pick = |key: &'static str, flag: &Option<String>, from_file: &Option<String>, default: &'static str| {
            let flag_source = format!("--{} or MLTAP_{}", key.replace('_', "-"), key.to_uppercase());
            match (flag, from_file) {
                (Some(v), _) => (key, v.clone(), flag_source),
                (None, Some(v)) => (key, v.clone(), file_name.clone()),
                (None, None) => (key, default.to_string(), "default".to_string()),
            }
        };

        let grpc_listen = pick("grpc_listen", &args.grpc_listen, &file.grpc_listen, "0.0.0.0:8500");
        let rest_listen = pick("rest_listen", &args.rest_listen, &file.rest_listen, "0.0.0.0:8501");
        let admin_listen = pick("admin_listen", &args.admin_listen, &file.admin_listen, "0.0.0.0:9090");
        let grpc_upstream = pick("grpc_upstream", &args.grpc_upstream, &file.grpc_upstream, "http://127.0.0.1:9500");
        let rest_upstream = pick("rest_upstream", &args.rest_upstream, &file.rest_upstream, "http://127.0.0.1:9501");
        let bucket = pick("bucket", &args.bucket, &file.bucket, "60s");
        let output_dir = pick("output_dir", &args.output_dir, &file.output_dir, "./mltap-out");
        let label_horizon = pick("label_horizon", &args.label_horizon, &file.label_horizon, "1h");
        let request_id_header =
            pick("request_id_header", &args.request_id_header, &file.request_id_header, "x-request-id");
        let log = pick("log", &args.log, &file.log, "info");
        let upstream_timeout = pick("upstream_timeout", &None, &file.upstream_timeout, "60s");
        let shutdown_grace = pick("shutdown_grace", &None, &file.shutdown_grace, "10s");

        let config = Config {
            grpc_listen: parse_addr(grpc_listen)?,
            rest_listen: parse_addr(rest_listen)?,
            admin_listen: parse_addr(admin_listen)?,
            grpc_upstream: parse_upstream(grpc_upstream)?,
            rest_upstream: parse_upstream(rest_upstream)?,
            bucket: parse_positive_duration(bucket)?,
            output_dir: PathBuf::from(non_empty(output_dir)?),
            labels_store: match args.labels_store.clone().or(file.labels_store.clone()) {
                None => LabelsStoreConfig::Embedded,
                Some(v) => {
                    let source = if args.labels_store.is_some() {
                        "--labels-store or MLTAP_LABELS_STORE".to_string()
                    } else {
                        file_name.clone()
                    };
                    parse_labels_store(Raw { key: "labels_store", value: &v, source })?
                }
            },
            label_horizon: parse_positive_duration(label_horizon)?,
            anodot_url: match args.anodot_url.clone().or(file.anodot_url.clone()) {
                None => None,
                Some(v) => {
                    let source = if args.anodot_url.is_some() {
                        "--anodot-url or MLTAP_ANODOT_URL".to_string()
                    } else {
                        file_name.clone()
                    };
                    Some(parse_http_url(Raw { key: "anodot_url", value: &v, source })?)
                }
            },
            request_id_header: {
                let (key, value, source) = request_id_header;
                http::HeaderName::from_bytes(value.to_ascii_lowercase().as_bytes())
                    .map_err(|_| ConfigError::new(key, source, format!("`{value}` is not a valid header name")))?
            },
            upstream_timeout: parse_positive_duration(upstream_timeout)?,
            shutdown_grace: parse_positive_duration(shutdown_grace)?,
            log: non_empty(log)?,
            capture: file.capture,
            monitor: file.monitor,
            labels: file.labels,
            anodot: file.anodot,
            models: file.models,
            tls: file.tls,
            request_log: file.request_log,
            access_log: file.access_log,
        };
        config.validate(&file_name)?;
        Ok(config)
    }

    /// Checks that cross keys or sections.
    fn validate(&self, file_name: &str) -> Result<(), ConfigError> {
        let c = &self.capture;
        if c.queue_exchanges == 0 {
            return Err(ConfigError::new("capture.queue_exchanges", file_name, "must be at least 1"));
        }
        if c.max_exchange_bytes == 0 || c.queue_bytes < c.max_exchange_bytes {
            return Err(ConfigError::new(
                "capture.queue_bytes",
                file_name,
                "must be at least capture.max_exchange_bytes, which must be positive",
            ));
        }
        for (name, model) in &self.models {
            if let Some(t) = model.threshold {
                if !(t > 0.0 && t < 1.0) {
                    return Err(ConfigError::new(
                        format!("models.{name}.threshold"),
                        file_name,
                        format!("{t} is not strictly between 0 and 1"),
                    ));
                }
            }
            if let Some(rate) = model.request_log_sampling_rate.filter(|r| !(0.0..=1.0).contains(r)) {
                return Err(ConfigError::new(
                    format!("models.{name}.request_log_sampling_rate"),
                    file_name,
                    format!("{rate} is not between 0 and 1"),
                ));
            }
        }
        self.monitor
            .validate()
            .map_err(|(key, problem)| ConfigError::new(format!("monitor.{key}"), file_name, problem))?;
        self.labels
            .validate()
            .map_err(|(key, problem)| ConfigError::new(format!("labels.{key}"), file_name, problem))?;
        self.anodot
            .validate()
            .map_err(|(key, problem)| ConfigError::new(format!("anodot.{key}"), file_name, problem))?;
        self.tls.validate().map_err(|(key, problem)| ConfigError::new(format!("tls.{key}"), file_name, problem))?;
        self.request_log
            .validate()
            .map_err(|(key, problem)| ConfigError::new(format!("request_log.{key}"), file_name, problem))?;
        self.access_log
            .validate()
            .map_err(|(key, problem)| ConfigError::new(format!("access_log.{key}"), file_name, problem))?;
        Ok(())
    }

    /// The overrides of one model, or the defaults.
    pub fn model(&self, name: &str) -> ModelConfig {
        self.models.get(name).cloned().unwrap_or_default()
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", "--config or MLTAP_CONFIG", format!("cannot read {shown}: {e}")))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message names the unknown or mistyped key and where it is.
        let message = e.message().to_string();
        let key = e
            .span()
            .and_then(|span| text.get(span))
            .map(|s| s.trim().trim_matches('"').to_string())
            .filter(|s| !s.is_empty() && s.len() < 80)
            .unwrap_or_else(|| "config".to_string());
        let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1)).unwrap_or(0);
        ConfigError::new(key, format!("{shown} line {line}"), message)
    })
}

fn non_empty((key, value, source): (&'static str, String, String)) -> Result<String, ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::new(key, source, "must not be empty"))
    } else {
        Ok(value)
    }
}

fn parse_addr((key, value, source): (&'static str, String, String)) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError::new(key, source, format!("`{value}` is not a socket address (expected e.g. 0.0.0.0:8500)"))
    })
}

/// Parses a duration such as `2s`, `500ms`, `5m`, `1h`, rejecting zero.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| format!("`{value}` is not a duration ({e}; expected e.g. 2s, 5m, 1h)"))?;
    if d.is_zero() {
        return Err(format!("`{value}` must be longer than zero"));
    }
    Ok(d)
}

fn parse_positive_duration((key, value, source): (&'static str, String, String)) -> Result<Duration, ConfigError> {
    parse_duration(&value).map_err(|problem| ConfigError::new(key, source, problem))
}

fn parse_upstream((key, value, source): (&'static str, String, String)) -> Result<http::Uri, ConfigError> {
    let uri: http::Uri =
        value.parse().map_err(|e| ConfigError::new(key, source.clone(), format!("`{value}` is not a URL ({e})")))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http") | Some("https"), Some(_)) => Ok(uri),
        _ => Err(ConfigError::new(key, source, format!("`{value}` must be an http:// or https:// URL with a host"))),
    }
}

fn parse_http_url(raw: Raw<'_>) -> Result<String, ConfigError> {
    let uri = parse_upstream((raw.key, raw.value.to_string(), raw.source))?;
    Ok(uri.to_string())
}

fn parse_labels_store(raw: Raw<'_>) -> Result<LabelsStoreConfig, ConfigError> {
    let bad = |problem: String| ConfigError::new(raw.key, raw.source.clone(), problem);
    let value = raw.value.trim();
    if value.is_empty() || value == "embedded" {
        return Ok(LabelsStoreConfig::Embedded);
    }
    let nodes: Vec<String> = value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for node in &nodes {
        let uri: http::Uri = node.parse().map_err(|e| bad(format!("`{node}` is not a URL ({e})")))?;
        if !matches!(uri.scheme_str(), Some("redis") | Some("rediss")) || uri.authority().is_none() {
            return Err(bad(format!("`{node}` must be redis://host:port/db, or `embedded`")));
        }
    }
    Ok(if nodes.len() == 1 {
        LabelsStoreConfig::Redis(nodes.into_iter().next().unwrap_or_default())
    } else {
        LabelsStoreConfig::RedisCluster(nodes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs::default()
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::load(&args()).unwrap();
        assert_eq!(c.grpc_listen, "0.0.0.0:8500".parse().unwrap());
        assert_eq!(c.rest_listen, "0.0.0.0:8501".parse().unwrap());
        assert_eq!(c.admin_listen, "0.0.0.0:9090".parse().unwrap());
        assert_eq!(c.grpc_upstream, "http://127.0.0.1:9500");
        assert_eq!(c.rest_upstream, "http://127.0.0.1:9501");
        assert_eq!(c.bucket, Duration::from_secs(60));
        assert_eq!(c.label_horizon, Duration::from_secs(3600));
        assert_eq!(c.output_dir, PathBuf::from("./mltap-out"));
        assert_eq!(c.labels_store, LabelsStoreConfig::Embedded);
        assert_eq!(c.request_id_header, "x-request-id");
        assert!(c.anodot_url.is_none());
    }

    #[test]
    fn a_bad_duration_names_the_key_and_its_source() {
        let a = ServeArgs { bucket: Some("soon".into()), ..args() };
        let e = Config::load(&a).unwrap_err();
        assert_eq!(e.key, "bucket");
        assert!(e.to_string().contains("--bucket"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "bucket = \"5m\"\nrest_listen = \"127.0.0.1:1\"\n[models.iris]\nthreshold = 0.7\n")
            .unwrap();
        let a = ServeArgs { config: Some(path), rest_listen: Some("127.0.0.1:2".into()), ..args() };
        let c = Config::load(&a).unwrap();
        assert_eq!(c.bucket, Duration::from_secs(300));
        assert_eq!(c.rest_listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.model("iris").threshold, Some(0.7));
    }

    #[test]
    fn an_unknown_file_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "buckett = \"5m\"\n").unwrap();
        let e = Config::load(&ServeArgs { config: Some(path), ..args() }).unwrap_err();
        assert_eq!(e.key, "buckett", "{e}");
    }

    #[test]
    fn malformed_urls_are_rejected() {
        let e = Config::load(&ServeArgs { grpc_upstream: Some("127.0.0.1:9500".into()), ..args() }).unwrap_err();
        assert_eq!(e.key, "grpc_upstream");
        let e = Config::load(&ServeArgs { labels_store: Some("http://x".into()), ..args() }).unwrap_err();
        assert_eq!(e.key, "labels_store");
        let c = Config::load(&ServeArgs { labels_store: Some("redis://a:1,redis://b:2,redis://c:3".into()), ..args() })
            .unwrap();
        assert!(matches!(c.labels_store, LabelsStoreConfig::RedisCluster(ref n) if n.len() == 3));
    }

    #[test]
    fn a_threshold_outside_the_unit_interval_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "[models.m]\nthreshold = 1.5\n").unwrap();
        let e = Config::load(&ServeArgs { config: Some(path), ..args() }).unwrap_err();
        assert_eq!(e.key, "models.m.threshold");
    }
}
