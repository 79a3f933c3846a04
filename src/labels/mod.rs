//! Delayed ground truth: the `/v1/labels` endpoint, the join store (embedded or
//! Redis) that maps prediction ids to what label metrics need, and label metrics.
//!
//! The worker hands every observation to `LabelService::record`, which keeps, per
//! prediction row, only its stream, bucket, predicted class and probabilities (never
//! the raw features). Labels posted to `/v1/labels` are joined to those rows by id and
//! folded into per-bucket aggregates; `LabelService::due` claims each bucket once its
//! label horizon has passed and turns its aggregate into Anodot points. With Redis,
//! aggregates and claims live in Redis, so a fleet of replicas emits each bucket once.
//!
//! This module never blocks the proxy, never logs label bodies or the bearer token,
//! and never writes a metric whose value is undefined.

pub mod aggregate;
pub mod endpoint;
pub mod link;
pub mod metrics;
pub mod record;
pub mod regression;
pub mod service;
pub mod store;

use crate::units::MIB;
use serde::Deserialize;

pub use endpoint::LabelsRoute;
pub use service::{
    DueBucket, IngestOutcome, LabelCounters, LabelError, LabelService, LabelSettings, PreparedRecord, Rejected,
};
pub use store::StoreError;

/// Where the join store for labels lives (`labels_store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelsStoreConfig {
    /// An embedded file under the output dir (single replica).
    Embedded,
    /// One Redis server, `redis://host:port/db`.
    Redis(String),
    /// A Redis Cluster, given by several node addresses.
    RedisCluster(Vec<String>),
}

impl LabelsStoreConfig {
    /// Reads `embedded` (or nothing), one `redis://host:port/db` URL, or several
    /// comma-separated node URLs of a Redis Cluster.
    pub fn parse(value: &str) -> Result<LabelsStoreConfig, String> {
        let value = value.trim();
        if value.is_empty() || value == "embedded" {
            return Ok(LabelsStoreConfig::Embedded);
        }
        let nodes: Vec<String> = value.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        for node in &nodes {
            let uri: http::Uri = node.parse().map_err(|e| format!("`{node}` is not a URL ({e})"))?;
            if !matches!(uri.scheme_str(), Some("redis") | Some("rediss")) || uri.authority().is_none() {
                return Err(format!("`{node}` must be redis://host:port/db, or `embedded`"));
            }
        }
        Ok(if nodes.len() == 1 {
            LabelsStoreConfig::Redis(nodes.into_iter().next().unwrap_or_default())
        } else {
            LabelsStoreConfig::RedisCluster(nodes)
        })
    }
}

/// Settings of label ingestion (`[labels]`); the store and horizon are flat keys.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelsConfig {
    /// Environment variable holding the bearer token that protects `/v1/labels`; the
    /// name lives in the config so the token itself never does.
    pub token_env: Option<String>,
    /// Accept label posts without a token. Off by default: labels feed accuracy
    /// metrics, so anyone reaching the admin port could otherwise skew them. Only for
    /// a port nobody else reaches (the demo sets it).
    pub allow_unauthenticated: bool,
    /// Largest accepted label body, so one request cannot exhaust memory.
    pub max_body_bytes: usize,
    /// Most prediction rows the embedded store keeps; the rows closest to expiry are
    /// evicted (and counted) past it, so disk use stays bounded under any traffic.
    pub max_pending_rows: u64,
    /// Attribute labels to the bucket of their arrival instead of their prediction's,
    /// for users whose labels come days later than any sensible horizon.
    pub attribute_to_arrival: bool,
    /// Seconds a prediction row is kept past its bucket's label horizon, only to tell a
    /// late label (counted in `label_late_count`) from one that matches nothing.
    pub late_window_seconds: u64,
    /// Labeled rows per bucket whose scores are kept exactly for `roc_auc`; past it the
    /// AUC comes from a fixed 1000-bin histogram, so a bucket's state stays bounded.
    pub auc_exact_rows: usize,
    /// Seconds after its end an arrival-attributed bucket waits for labels still in
    /// flight (and replica clock skew) before it is emitted.
    pub arrival_grace_seconds: u64,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub redis_key_prefix: String,
}

impl Default for LabelsConfig {
    fn default() -> Self {
        LabelsConfig {
            token_env: None,
            allow_unauthenticated: false,
            max_body_bytes: 10 * MIB,
            max_pending_rows: 2_000_000,
            attribute_to_arrival: false,
            late_window_seconds: 3600,
            auc_exact_rows: 10_000,
            arrival_grace_seconds: 5,
            redis_key_prefix: "mltap".to_string(),
        }
    }
}

impl LabelsConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(name) = &self.token_env {
            if name.trim().is_empty() || name.contains('=') || name.contains('\0') {
                return Err(("token_env".into(), format!("`{name}` is not an environment variable name")));
            }
        }
        if self.max_body_bytes == 0 {
            return Err(("max_body_bytes".into(), "must be at least 1".into()));
        }
        if self.max_pending_rows == 0 {
            return Err(("max_pending_rows".into(), "must be at least 1".into()));
        }
        if self.auc_exact_rows > 10_000_000 {
            return Err(("auc_exact_rows".into(), format!("{} is above 10000000", self.auc_exact_rows)));
        }
        if self.redis_key_prefix.is_empty() || self.redis_key_prefix.contains(['{', '}', ' ']) {
            return Err((
                "redis_key_prefix".into(),
                "must be non-empty, without braces or spaces (braces are Redis Cluster hash tags)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_labels_section_names_its_key() {
        let bad = LabelsConfig { max_body_bytes: 0, ..LabelsConfig::default() };
        assert_eq!(bad.validate().unwrap_err().0, "max_body_bytes");
        let bad = LabelsConfig { redis_key_prefix: "a{b}".into(), ..LabelsConfig::default() };
        assert_eq!(bad.validate().unwrap_err().0, "redis_key_prefix");
        let bad = LabelsConfig { token_env: Some(" ".into()), ..LabelsConfig::default() };
        assert_eq!(bad.validate().unwrap_err().0, "token_env");
        assert!(LabelsConfig::default().validate().is_ok());
    }

    #[test]
    fn the_store_is_embedded_one_redis_or_a_cluster() {
        assert_eq!(LabelsStoreConfig::parse(""), Ok(LabelsStoreConfig::Embedded));
        assert_eq!(LabelsStoreConfig::parse("embedded"), Ok(LabelsStoreConfig::Embedded));
        assert_eq!(LabelsStoreConfig::parse("redis://a:1/0"), Ok(LabelsStoreConfig::Redis("redis://a:1/0".into())));
        let cluster = LabelsStoreConfig::parse("redis://a:1, redis://b:2").unwrap();
        assert_eq!(cluster, LabelsStoreConfig::RedisCluster(vec!["redis://a:1".into(), "redis://b:2".into()]));
        assert!(LabelsStoreConfig::parse("http://x").unwrap_err().contains("must be redis://"));
    }
}
