//! The `[anodot]` section: how delivery to Anodot batches, paces, retries and keeps
//! files, and which protocol it speaks. Validated once at start.

use crate::units::{deserialize_duration, deserialize_optional_duration};
use serde::{Deserialize, Deserializer};
use std::time::Duration;

/// Which of Anodot's metric protocols delivery speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AnodotProtocol {
    /// `protocol=anodot20`: self-describing points, one value each, no schema.
    #[default]
    V20,
    /// `protocol=anodot30`: points bound to a stream schema per model, plus a
    /// watermark per closed bucket so Anodot processes it without waiting.
    V30,
}

impl AnodotProtocol {
    /// The value of Anodot's `protocol` query parameter.
    pub fn query_value(self) -> &'static str {
        match self {
            AnodotProtocol::V20 => "anodot20",
            AnodotProtocol::V30 => "anodot30",
        }
    }

    /// Parses `2.0`, `3.0`, `anodot20` or `anodot30`.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "2.0" | "2" | "anodot20" => Ok(AnodotProtocol::V20),
            "3.0" | "3" | "anodot30" => Ok(AnodotProtocol::V30),
            other => Err(format!("`{other}` is not an Anodot protocol (expected 2.0 or 3.0)")),
        }
    }
}

impl<'de> Deserialize<'de> for AnodotProtocol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        AnodotProtocol::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Delivery to Anodot (`[anodot]`); the URL itself is the flat key `anodot_url` and
/// the data-collection token always comes from the `ANODOT_TOKEN` environment variable.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnodotConfig {
    /// Most points per request (Anodot accepts at most 1000).
    pub batch_points: usize,
    /// Points per second sent at most, retries included: Anodot throttles accounts
    /// above their contracted rate (error 2003) and throttled requests only add load.
    pub points_per_second: u32,
    /// `2.0` (default) or `3.0`.
    pub protocol: AnodotProtocol,
    /// How long one request may take before it counts as failed and is retried.
    #[serde(deserialize_with = "deserialize_duration")]
    pub request_timeout: Duration,
    /// Longest wait between two retries; an hour-long outage costs at most this much
    /// extra delay once Anodot is back.
    #[serde(deserialize_with = "deserialize_duration")]
    pub max_backoff: Duration,
    /// Delivered files whose bucket started longer ago than this are deleted; `off`
    /// keeps them. Files with points not yet delivered are never deleted.
    #[serde(deserialize_with = "deserialize_optional_duration")]
    pub retention: Option<Duration>,
    /// How often the output dir is scanned for new or grown files.
    #[serde(deserialize_with = "deserialize_duration")]
    pub scan_interval: Duration,
    /// Environment variable holding the Anodot access key (3.0 only), exchanged for
    /// the bearer token the stream-schema API needs. A variable, never the key itself,
    /// so that no secret sits in a configuration file.
    pub access_key_env: String,
    /// Base URL of Anodot's API for schemas and access tokens (3.0 only); default:
    /// the scheme, host and port of `anodot_url`.
    pub api_url: Option<String>,
    /// Prefix of the stream-schema names mltap creates (3.0 only): `PREFIXMODEL` and
    /// `PREFIXMODEL_labels`.
    pub schema_prefix: String,
}

impl Default for AnodotConfig {
    fn default() -> Self {
        AnodotConfig {
            batch_points: 1000,
            points_per_second: 2000,
            protocol: AnodotProtocol::V20,
            request_timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(60),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            scan_interval: Duration::from_secs(2),
            access_key_env: "ANODOT_ACCESS_KEY".to_string(),
            api_url: None,
            schema_prefix: "mltap_".to_string(),
        }
    }
}

impl AnodotConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.batch_points == 0 || self.batch_points > 1000 {
            return Err(("batch_points".into(), format!("{} is not in 1..=1000", self.batch_points)));
        }
        if self.points_per_second == 0 {
            return Err(("points_per_second".into(), "must be at least 1".into()));
        }
        if self.max_backoff < Duration::from_millis(100) {
            return Err(("max_backoff".into(), "must be at least 100ms".into()));
        }
        if self.protocol == AnodotProtocol::V30 {
            if self.access_key_env.trim().is_empty() {
                return Err(("access_key_env".into(), "must name an environment variable for protocol 3.0".into()));
            }
            if self.schema_prefix.is_empty()
                || !self.schema_prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err((
                    "schema_prefix".into(),
                    format!("`{}` must be non-empty letters, digits, `_` or `-`", self.schema_prefix),
                ));
            }
        }
        if let Some(url) = &self.api_url {
            match url.parse::<http::Uri>() {
                Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() => {}
                _ => return Err(("api_url".into(), format!("`{url}` must be an http:// or https:// URL with a host"))),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anodot_section_parses_durations_protocol_and_retention_off() {
        let c: AnodotConfig = toml::from_str(
            "protocol = \"3.0\"\nrequest_timeout = \"5s\"\nretention = \"off\"\npoints_per_second = 500\n",
        )
        .unwrap();
        assert_eq!(c.protocol, AnodotProtocol::V30);
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert_eq!(c.retention, None);
        assert_eq!(c.points_per_second, 500);
        assert_eq!(c.batch_points, 1000);
        c.validate().unwrap();
    }

    #[test]
    fn a_bad_protocol_or_batch_size_names_the_key() {
        let e = toml::from_str::<AnodotConfig>("protocol = \"4.0\"\n").unwrap_err();
        assert!(e.to_string().contains("not an Anodot protocol"), "{e}");
        let c = AnodotConfig { batch_points: 1001, ..AnodotConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "batch_points");
        let c = AnodotConfig { protocol: AnodotProtocol::V30, access_key_env: " ".into(), ..AnodotConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "access_key_env");
    }
}
