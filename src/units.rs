//! The vocabulary every configuration section shares: durations (one parser, its
//! serde helpers and its display), byte sizes, and the error that names a bad key.
//!
//! A leaf: it imports no other module of mltap, so that every component can own its
//! section type and its validation without importing `config`, which composes them.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::time::Duration;

/// Exit code of a configuration error (unknown key, bad value, port in use).
pub const EXIT_CONFIG: u8 = 2;

/// One mebibyte, for byte-size defaults (`16 * MIB` reads as the 16 MiB it is).
pub const MIB: usize = 1 << 20;

/// Parses a duration such as `2s`, `500ms`, `5m`, `1h`, rejecting zero. Every
/// duration of the command line and of the configuration file goes through here.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(value.trim())
        .map_err(|e| format!("`{value}` is not a duration ({e}; expected e.g. 2s, 5m, 1h)"))?;
    if d.is_zero() {
        return Err(format!("`{value}` must be longer than zero"));
    }
    Ok(d)
}

/// `parse_duration`, or None for `off`, `never` or `none` (e.g. a retention that
/// keeps everything).
pub fn parse_optional_duration(value: &str) -> Result<Option<Duration>, String> {
    if matches!(value.trim(), "off" | "never" | "none") {
        return Ok(None);
    }
    parse_duration(value).map(Some)
}

/// Serde helper for a duration key (`#[serde(deserialize_with = "...")]`), written as
/// `parse_duration` reads it.
pub fn deserialize_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(deserializer)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Serde helper for a duration key that can be switched off, as
/// `parse_optional_duration` reads it.
pub fn deserialize_optional_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(deserializer)?;
    parse_optional_duration(&s).map_err(serde::de::Error::custom)
}

/// A duration as people write it (`1m 30s`), the form `parse_duration` reads back.
pub fn format_duration(duration: Duration) -> impl fmt::Display {
    humantime::format_duration(duration)
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

    /// Turns a section's `(key, problem)` validation error into one naming the full
    /// key, `section.key`. Sections validate themselves without knowing where they
    /// sit in the file; this puts them back in place.
    pub fn in_section<'a, K: fmt::Display + 'a>(
        section: &'a str,
        source: &'a str,
    ) -> impl FnOnce((K, String)) -> ConfigError + 'a {
        move |(key, problem)| ConfigError::new(format!("{section}.{key}"), source, problem)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them_and_zero_is_refused() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration(" 500ms "), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").unwrap_err().contains("longer than zero"));
        assert!(parse_duration("soon").unwrap_err().contains("is not a duration"));
        assert_eq!(parse_optional_duration("off"), Ok(None));
        assert_eq!(parse_optional_duration("7d"), Ok(Some(Duration::from_secs(7 * 86_400))));
        assert_eq!(parse_duration(&format_duration(Duration::from_secs(90)).to_string()), Ok(Duration::from_secs(90)));
    }

    #[test]
    fn serde_helpers_parse_like_the_command_line() {
        #[derive(Deserialize)]
        struct Section {
            #[serde(deserialize_with = "deserialize_duration")]
            timeout: Duration,
            #[serde(deserialize_with = "deserialize_optional_duration")]
            retention: Option<Duration>,
        }
        let s: Section = toml::from_str("timeout = \"5s\"\nretention = \"never\"\n").unwrap();
        assert_eq!((s.timeout, s.retention), (Duration::from_secs(5), None));
        let e = toml::from_str::<Section>("timeout = \"0s\"\nretention = \"1h\"\n").err().unwrap();
        assert!(e.to_string().contains("longer than zero"), "{e}");
    }

    #[test]
    fn a_section_error_names_the_full_key_and_its_source() {
        let e = ConfigError::in_section("monitor", "mltap.toml")(("top_k", "must be at least 1".to_string()));
        assert_eq!(e.key, "monitor.top_k");
        assert_eq!(e.to_string(), "configuration key `monitor.top_k` (from mltap.toml): must be at least 1");
        assert_eq!(ConfigError::new("bucket", "", "bad").to_string(), "configuration key `bucket`: bad");
    }
}
