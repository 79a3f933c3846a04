//! Where metrics go: Anodot 2.0 points (`anodot`), JSON files in the output dir,
//! delivery to Anodot's REST API with the files as the spool, and Prometheus.
//!
//! Sinks never decide what a metric means; they receive finished points.

pub mod anodot;
pub mod files;
pub mod prometheus;

use serde::Deserialize;

pub use anodot::{Point, TargetType};

/// Delivery to Anodot (`[anodot]`); the URL itself is the flat key `anodot_url`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnodotConfig {
    /// Most points per request (Anodot accepts at most 1000).
    pub batch_points: usize,
    /// Points per second sent at most.
    pub points_per_second: u32,
}

impl Default for AnodotConfig {
    fn default() -> Self {
        AnodotConfig { batch_points: 1000, points_per_second: 2000 }
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
        Ok(())
    }
}
