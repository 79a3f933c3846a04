//! Connection governance of the proxy's listeners (`[limits]`): how many client
//! connections may be open, how long an idle one is kept, how many streams one HTTP/2
//! connection may hold, and how many HTTP/2 connections to TF Serving a serving
//! thread may open. Without them a few clients could exhaust the process's file
//! descriptors or the one upstream connection's streams and starve everyone else
//! (docs/security.md has the reasoning and the defaults).

use serde::Deserialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The `[limits]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections open at once over both proxy listeners; past it new ones
    /// are refused (REST: 503, gRPC: `UNAVAILABLE`, then closed). Unset: derived from
    /// the open-file limit, see `reserved_fds`.
    pub max_connections: Option<usize>,
    /// File descriptors kept out of the automatic `max_connections` for the worker,
    /// the label store, the output files, upstream connections and the admin port.
    pub reserved_fds: usize,
    /// A client connection with no request in flight is closed after this long.
    #[serde(deserialize_with = "crate::units::deserialize_duration")]
    pub idle_timeout: Duration,
    /// HTTP/2 keep-alive: a gRPC client connection is pinged after this much silence
    /// and closed when the ping is not answered within the same time.
    #[serde(deserialize_with = "crate::units::deserialize_duration")]
    pub keepalive_interval: Duration,
    /// Concurrent streams mltap advertises to each gRPC client connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams_per_connection: u32,
    /// HTTP/2 connections each serving thread may open to TF Serving's gRPC port; a
    /// new one is opened when the others' streams are all in use.
    pub upstream_grpc_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: None,
            reserved_fds: 256,
            idle_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            max_streams_per_connection: 1000,
            upstream_grpc_connections: 16,
        }
    }
}

impl LimitsConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_connections == Some(0) {
            return Err(("max_connections".into(), "must be at least 1".into()));
        }
        if self.max_streams_per_connection == 0 {
            return Err(("max_streams_per_connection".into(), "must be at least 1".into()));
        }
        if self.upstream_grpc_connections == 0 {
            return Err(("upstream_grpc_connections".into(), "must be at least 1".into()));
        }
        if self.idle_timeout.is_zero() || self.keepalive_interval.is_zero() {
            return Err(("idle_timeout".into(), "idle_timeout and keepalive_interval must be positive".into()));
        }
        Ok(())
    }

    /// The connection limit: configured, else what the open-file limit leaves after
    /// `reserved_fds`, halved (a proxied connection may hold an upstream one too).
    pub fn effective_max_connections(&self) -> usize {
        if let Some(max) = self.max_connections {
            return max;
        }
        match open_file_limit() {
            Some(limit) => (limit.saturating_sub(self.reserved_fds as u64) / 2).clamp(16, 1 << 20) as usize,
            None => 10_000,
        }
    }
}

/// The soft limit on open files (`ulimit -n`), read from `/proc/self/limits`;
/// None when unlimited or unknown.
pub fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// The count of open client connections shared by every listener and serving thread.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Admitted {
    open: Arc<AtomicUsize>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionBudget {
    pub fn new(max: usize) -> ConnectionBudget {
        ConnectionBudget { open: Arc::default(), max }
    }

    /// A place for one more connection, or None when `max` are open.
    pub fn admit(&self) -> Option<Admitted> {
        let previous = self.open.fetch_add(1, Ordering::Relaxed);
        if previous >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Admitted { open: self.open.clone() })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_past_its_maximum_and_frees_places() {
        let budget = ConnectionBudget::new(2);
        let a = budget.admit().unwrap();
        let _b = budget.admit().unwrap();
        assert!(budget.admit().is_none());
        drop(a);
        assert!(budget.admit().is_some());
        assert_eq!(budget.open(), 1);
    }

    #[test]
    fn the_automatic_limit_leaves_the_reserved_descriptors() {
        let config = LimitsConfig::default();
        assert!(open_file_limit().is_some());
        let limit = open_file_limit().unwrap();
        let expected = (limit.saturating_sub(256) / 2).clamp(16, 1 << 20) as usize;
        assert_eq!(config.effective_max_connections(), expected);
        assert_eq!(LimitsConfig { max_connections: Some(7), ..config }.effective_max_connections(), 7);
    }
}
