//! The one typed configuration of mltap, composed once at start from (highest first)
//! command-line flags, `MLTAP_<KEY>` environment variables, the TOML file given with
//! `--config`, and built-in defaults, then validated. Nothing downstream reads a
//! string key again: a bad value stops start-up here with one line naming the key.
//!
//! The flat keys are the `serve` flags (the command line itself is `cli`'s). Sections
//! (`[capture]`, `[monitor]`, `[fleet]`, `[labels]`, `[anodot]`, `[tls]`, `[request_log]`,
//! `[access_log]`, `[models.NAME]`) hold
//! settings that have no flag; each section's type and its validation live beside the
//! component it configures, and durations, sizes and `ConfigError` in `units`. This
//! module only composes them; `app` hands each component what it takes from the whole.

use crate::fleet::FleetConfig;
use crate::logging::LogFormat;
use crate::monitor::{MonitorConfig, ReferenceSet};
use crate::proxy::tls::TlsConfig;
use crate::request_log::{AccessLogConfig, RequestLogConfig};
use crate::sinks::AnodotConfig;
use crate::units::parse_duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use crate::capture::CaptureConfig;
pub use crate::labels::{LabelsConfig, LabelsStoreConfig};
pub use crate::tfserving::ModelConfig;
pub use crate::units::ConfigError;

/// The flat keys as given on the command line or in `MLTAP_<KEY>` environment
/// variables (the command line folds the two), before the file and the defaults fill
/// in what they leave out. `Config::load` applies the precedence. Each field is the
/// key of its name, as written (`cli::ServeArgs` documents them); None when not given.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    /// The TOML configuration file (`--config`).
    pub config: Option<PathBuf>,
    pub grpc_listen: Option<String>,
    pub rest_listen: Option<String>,
    pub grpc_upstream: Option<String>,
    pub rest_upstream: Option<String>,
    pub admin_listen: Option<String>,
    pub bucket: Option<String>,
    pub output_dir: Option<String>,
    pub labels_store: Option<String>,
    pub label_horizon: Option<String>,
    pub anodot_url: Option<String>,
    pub request_id_header: Option<String>,
    pub log: Option<String>,
    /// `RUST_LOG`: the log filter when neither `--log` nor `MLTAP_LOG` gives one.
    pub rust_log: Option<String>,
    pub log_format: Option<String>,
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
    /// The log filter, checked to parse.
    pub log: String,
    pub log_format: LogFormat,
    pub capture: CaptureConfig,
    pub monitor: MonitorConfig,
    /// Merging of the replicas' buckets through the shared store (`[fleet]`).
    pub fleet: FleetConfig,
    pub labels: LabelsConfig,
    pub anodot: AnodotConfig,
    pub models: BTreeMap<String, ModelConfig>,
    /// TLS towards `https://` upstreams and on mltap's own listeners.
    pub tls: TlsConfig,
    /// Connection governance of the proxy's listeners.
    pub limits: crate::proxy::limits::LimitsConfig,
    /// The admin port's token for the dashboard and its API.
    pub admin: crate::admin::AdminConfig,
    /// Sampled PredictionLog TFRecord files of inference exchanges.
    pub request_log: RequestLogConfig,
    /// One JSON line per exchange.
    pub access_log: AccessLogConfig,
    /// The drift references of `monitor.reference_file`, read once here (where a bad
    /// file stops start-up) and shared by every aggregation thread.
    pub references: Arc<ReferenceSet>,
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
    log_format: Option<String>,
    #[serde(default)]
    capture: CaptureConfig,
    #[serde(default)]
    monitor: MonitorConfig,
    #[serde(default)]
    fleet: FleetConfig,
    #[serde(default)]
    labels: LabelsConfig,
    #[serde(default)]
    limits: crate::proxy::limits::LimitsConfig,
    #[serde(default)]
    admin: crate::admin::AdminConfig,
    #[serde(default)]
    anodot: AnodotConfig,
    #[serde(default)]
    models: BTreeMap<String, ModelConfig>,
    #[serde(default)]
    tls: TlsConfig,
    #[serde(default)]
    request_log: RequestLogConfig,
    #[serde(default)]
    access_log: AccessLogConfig,
}

/// A raw value with the place it came from, for error messages.
struct Raw<'a> {
    key: &'static str,
    value: &'a str,
    source: String,
}

impl Config {
    /// Builds and validates the configuration from flags, env (already folded into
    /// the flags by the command line) and the optional file.
    pub fn load(flags: impl Into<Flags>) -> Result<Config, ConfigError> {
        let args = &flags.into();
        let file_name = args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        // Flags and env come folded by the command line, which does not say which it was.
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
        let admin_listen = pick("admin_listen", &args.admin_listen, &file.admin_listen, "0.0.0.0:8510");
        let grpc_upstream = pick("grpc_upstream", &args.grpc_upstream, &file.grpc_upstream, "http://127.0.0.1:9500");
        let rest_upstream = pick("rest_upstream", &args.rest_upstream, &file.rest_upstream, "http://127.0.0.1:9501");
        let bucket = pick("bucket", &args.bucket, &file.bucket, "60s");
        let output_dir = pick("output_dir", &args.output_dir, &file.output_dir, "./mltap-out");
        let label_horizon = pick("label_horizon", &args.label_horizon, &file.label_horizon, "1h");
        let request_id_header =
            pick("request_id_header", &args.request_id_header, &file.request_id_header, "x-request-id");
        let log = match (&args.log, &args.rust_log) {
            (None, Some(rust_log)) => ("log", rust_log.clone(), "RUST_LOG".to_string()),
            _ => pick("log", &args.log, &file.log, "info"),
        };
        let log_format = pick("log_format", &args.log_format, &file.log_format, "text");
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
            // Empty is unset, so that a compose file can pass `${MLTAP_ANODOT_URL:-}` through.
            anodot_url: match args.anodot_url.clone().filter(|v| !v.trim().is_empty()).or(file.anodot_url.clone()) {
                None => None,
                Some(v) => {
                    let source = if args.anodot_url.as_deref().is_some_and(|v| !v.trim().is_empty()) {
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
            log: {
                let (key, value, source) = log;
                crate::logging::parse_filter(&value).map_err(|problem| ConfigError::new(key, source, problem))?;
                value
            },
            log_format: {
                let (key, value, source) = log_format;
                value.parse().map_err(|problem| ConfigError::new(key, source, problem))?
            },
            capture: file.capture,
            monitor: file.monitor,
            fleet: file.fleet,
            labels: file.labels,
            limits: file.limits,
            admin: file.admin,
            anodot: file.anodot,
            models: file.models,
            tls: file.tls,
            request_log: file.request_log,
            access_log: file.access_log,
            references: Arc::default(),
        };
        let references = config.validate(&file_name)?;
        Ok(Config { references: Arc::new(references), ..config })
    }

    /// Checks every section, naming the full key at fault, and reads the reference
    /// file (the one time it is read).
    fn validate(&self, file_name: &str) -> Result<ReferenceSet, ConfigError> {
        self.capture.validate().map_err(ConfigError::in_section("capture", file_name))?;
        for (name, model) in &self.models {
            model.validate().map_err(ConfigError::in_section(&format!("models.{name}"), file_name))?;
        }
        self.monitor.validate().map_err(ConfigError::in_section("monitor", file_name))?;
        let references = self.monitor.load_references().map_err(ConfigError::in_section("monitor", file_name))?;
        self.fleet.validate().map_err(ConfigError::in_section("fleet", file_name))?;
        self.labels.validate().map_err(ConfigError::in_section("labels", file_name))?;
        self.limits.validate().map_err(ConfigError::in_section("limits", file_name))?;
        self.admin.validate().map_err(ConfigError::in_section("admin", file_name))?;
        self.anodot.validate().map_err(ConfigError::in_section("anodot", file_name))?;
        self.tls.validate().map_err(ConfigError::in_section("tls", file_name))?;
        self.request_log.validate().map_err(ConfigError::in_section("request_log", file_name))?;
        self.access_log.validate().map_err(ConfigError::in_section("access_log", file_name))?;
        Ok(references)
    }

    /// The overrides of one model, or the defaults.
    pub fn model(&self, name: &str) -> ModelConfig {
        self.models.get(name).cloned().unwrap_or_default()
    }
}

impl From<&Flags> for Flags {
    fn from(flags: &Flags) -> Flags {
        flags.clone()
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
    LabelsStoreConfig::parse(raw.value).map_err(|problem| ConfigError::new(raw.key, raw.source, problem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Flags {
        Flags::default()
    }

    #[test]
    fn an_empty_anodot_url_leaves_delivery_off() {
        let c = Config::load(Flags { anodot_url: Some(String::new()), ..args() }).unwrap();
        assert_eq!(c.anodot_url, None);
    }

    #[test]
    fn the_log_filter_comes_from_the_flag_then_rust_log_and_must_parse() {
        let c = Config::load(Flags { rust_log: Some("mltap=debug".into()), ..args() }).unwrap();
        assert_eq!((c.log.as_str(), c.log_format), ("mltap=debug", LogFormat::Text));
        let c = Config::load(Flags { log: Some("warn".into()), rust_log: Some("debug".into()), ..args() }).unwrap();
        assert_eq!(c.log, "warn");
        let e = Config::load(Flags { log: Some("mltap=loud".into()), ..args() }).unwrap_err().to_string();
        assert!(e.contains("`log`") && e.contains("--log or MLTAP_LOG"), "{e}");
        let e = Config::load(Flags { rust_log: Some("=".into()), ..args() }).unwrap_err().to_string();
        assert!(e.contains("RUST_LOG"), "{e}");
        let c = Config::load(Flags { log_format: Some("json".into()), ..args() }).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let e = Config::load(Flags { log_format: Some("yaml".into()), ..args() }).unwrap_err().to_string();
        assert!(e.contains("log_format"), "{e}");
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::load(args()).unwrap();
        assert_eq!(c.grpc_listen, "0.0.0.0:8500".parse().unwrap());
        assert_eq!(c.rest_listen, "0.0.0.0:8501".parse().unwrap());
        assert_eq!(c.admin_listen, "0.0.0.0:8510".parse().unwrap());
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
        let a = Flags { bucket: Some("soon".into()), ..args() };
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
        let a = Flags { config: Some(path), rest_listen: Some("127.0.0.1:2".into()), ..args() };
        let c = Config::load(&a).unwrap();
        assert_eq!(c.bucket, Duration::from_secs(300));
        assert_eq!(c.rest_listen, "127.0.0.1:2".parse().unwrap());
        assert_eq!(c.model("iris").threshold, Some(0.7));
    }

    #[test]
    fn the_fleet_section_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "[fleet]\nsettle_seconds = 1\nlease_seconds = 4\n").unwrap();
        let c = Config::load(Flags { config: Some(path.clone()), ..args() }).unwrap();
        assert_eq!((c.fleet.enabled, c.fleet.settle_seconds, c.fleet.lease_seconds), (true, 1, 4));
        std::fs::write(&path, "[fleet]\nlease_seconds = 0\n").unwrap();
        let e = Config::load(Flags { config: Some(path), ..args() }).unwrap_err();
        assert_eq!(e.key, "fleet.lease_seconds", "{e}");
    }

    #[test]
    fn an_unknown_file_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "buckett = \"5m\"\n").unwrap();
        let e = Config::load(Flags { config: Some(path), ..args() }).unwrap_err();
        assert_eq!(e.key, "buckett", "{e}");
    }

    #[test]
    fn malformed_urls_are_rejected() {
        let e = Config::load(Flags { grpc_upstream: Some("127.0.0.1:9500".into()), ..args() }).unwrap_err();
        assert_eq!(e.key, "grpc_upstream");
        let e = Config::load(Flags { labels_store: Some("http://x".into()), ..args() }).unwrap_err();
        assert_eq!(e.key, "labels_store");
        let c =
            Config::load(Flags { labels_store: Some("redis://a:1,redis://b:2,redis://c:3".into()), ..args() }).unwrap();
        assert!(matches!(c.labels_store, LabelsStoreConfig::RedisCluster(ref n) if n.len() == 3));
    }

    #[test]
    fn a_threshold_outside_the_unit_interval_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "[models.m]\nthreshold = 1.5\n").unwrap();
        let e = Config::load(Flags { config: Some(path), ..args() }).unwrap_err();
        assert_eq!(e.key, "models.m.threshold");
    }

    #[test]
    fn the_labels_section_is_read_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mltap.toml");
        std::fs::write(&path, "[labels]\nmax_body_bytes = 0\n").unwrap();
        let args = Flags { config: Some(path.clone()), ..Default::default() };
        assert_eq!(Config::load(&args).unwrap_err().key, "labels.max_body_bytes");
        std::fs::write(&path, "[labels]\ntoken_env = \"LABELS_TOKEN\"\nattribute_to_arrival = true\n").unwrap();
        let config = Config::load(&args).unwrap();
        assert!(config.labels.attribute_to_arrival);
        assert_eq!(config.labels.max_body_bytes, 10 << 20);
    }

    #[test]
    fn the_reference_file_is_read_once_at_load_and_a_bad_one_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (config_path, reference_path) = (dir.path().join("mltap.toml"), dir.path().join("ref.json"));
        std::fs::write(&config_path, format!("[monitor]\nreference_file = {:?}\n", reference_path)).unwrap();
        std::fs::write(&reference_path, "[]").unwrap();
        let args = Flags { config: Some(config_path), ..Default::default() };
        let config = Config::load(&args).unwrap();
        assert_eq!(*config.references, ReferenceSet::default());
        // Copies of the configuration share what load read: the file is not read again.
        std::fs::write(&reference_path, "not json").unwrap();
        assert!(Arc::ptr_eq(&config.clone().references, &config.references));
        let e = Config::load(&args).unwrap_err();
        assert_eq!(e.key, "monitor.reference_file");
        assert!(e.to_string().contains("is not JSON"), "{e}");
    }
}
