//! Buckets, sketches, per-feature and per-class statistics, drift and estimated
//! performance: from observations to the points of each closed bucket.
//!
//! The monitor never touches the network or the proxy; it is fed by the worker.

use serde::Deserialize;

/// Settings of the monitoring engine (`[monitor]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How long after its end a bucket still accepts observations, in seconds.
    pub grace_seconds: u64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig { grace_seconds: 5 }
    }
}

impl MonitorConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        Ok(())
    }
}
