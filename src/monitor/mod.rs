//! Buckets, sketches, per-feature and per-class statistics, drift and estimated
//! performance: from observations to the Anodot points of each closed bucket.
//!
//! The monitor owns the meaning of every input and output metric (names, dimensions,
//! statistics, drift methods, bins). It never touches the network or the proxy and
//! never writes anything but its drift references: it is fed by the worker, which
//! hands the finished points of each closed bucket to the sinks.
//!
//! Memory is bounded by configuration whatever the traffic: streams, features per
//! stream and categories per feature have limits (counted when hit), quantiles come
//! from fixed-size DDSketches and distinct counts from HyperLogLog.
//!
//! Every metric mltap emits (the label metrics included) is declared once in the
//! crate's `catalog`, which producers name and sinks render from.

pub mod bucket;
pub mod drift;
pub mod engine;
pub mod entropy;
pub mod estimate;
pub mod merge;
pub mod reference;
pub mod regression;
pub mod stats;

use serde::Deserialize;
use std::path::PathBuf;

pub use engine::{
    BucketState, ClosedBucket, Engine, EngineOptions, ExchangeFacts, SharedReferences, StreamState, GLOBAL_MODEL,
};
pub use merge::Merge;
pub use reference::{Reference, ReferenceSet};

/// Settings of the monitoring engine (`[monitor]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// How long after its end a bucket still accepts observations, in seconds: late
    /// exchanges (slow upstream, queueing) still land in the bucket of their start.
    pub grace_seconds: u64,
    /// How many complete, non-empty buckets of a stream make its drift reference.
    pub reference_buckets: usize,
    /// A reference file (the JSON that mltap exports under `OUTPUT_DIR/reference/`);
    /// streams it names use it instead of learning their own.
    pub reference_file: Option<PathBuf>,
    /// Values per numeric feature kept (reservoir sample) while a reference is being
    /// learned; the reference's bins and frequencies are computed from it.
    pub reference_sample_size: usize,
    /// Categories per categorical feature reported in `feature_category_freq`; the
    /// rest is reported as `__other__`.
    pub top_k: usize,
    /// Features tracked per stream; columns beyond are counted in `feature_limit_dropped`.
    pub max_features: usize,
    /// Categories counted exactly per feature and bucket; values of further categories
    /// go to `__other__` and are counted in `category_limit_dropped`.
    pub max_categories: usize,
    /// An integer feature also gets top-k frequencies while its distinct values in a
    /// bucket stay at most this many.
    pub integer_categorical_max_distinct: usize,
    /// Streams (model, version, signature) monitored at once; observations of further
    /// streams are counted in `stream_limit_dropped`.
    pub max_streams: usize,
    /// Relative accuracy of the quantile sketches (DDSketch's alpha).
    pub quantile_relative_accuracy: f64,
    /// Threads decoding exchanges; 0 picks the number of cores, at most 4.
    pub decode_threads: usize,
    /// Threads aggregating observations, each owning the streams of a share of the
    /// models (a model's streams always go to the same thread); 0 picks the number of
    /// cores, at most 4. `max_streams` is divided among them.
    pub aggregation_threads: usize,
    /// Sample statistics more thinly while mltap's threads wait for CPU, and back to
    /// every exchange once they do not: on a machine whose cores are busy, statistics
    /// give way to serving. Counts are exact either way.
    pub statistics_yield_cpu: bool,
    /// The scheduling priority of the threads that decode sampled exchanges for
    /// statistics: `normal` (default), or `background` (Linux `SCHED_IDLE`: only CPU
    /// time nothing else wants, for hosts whose cores are never all busy; where they
    /// are, sampled exchanges can wait in the queue past their bucket's grace and be
    /// counted late).
    pub statistics_priority: StatisticsPriority,
}

/// See `MonitorConfig::statistics_priority`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatisticsPriority {
    /// The scheduler's normal share.
    #[default]
    Normal,
    /// Linux `SCHED_IDLE`: runs when a core would otherwise idle.
    Background,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            grace_seconds: 5,
            reference_buckets: 10,
            reference_file: None,
            reference_sample_size: 4096,
            top_k: 10,
            max_features: 200,
            max_categories: 1000,
            integer_categorical_max_distinct: 20,
            max_streams: 100,
            quantile_relative_accuracy: 0.01,
            decode_threads: 0,
            aggregation_threads: 0,
            statistics_yield_cpu: true,
            statistics_priority: StatisticsPriority::Normal,
        }
    }
}

impl MonitorConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let positive = |key: &str, v: usize| {
            if v == 0 {
                Err((key.to_string(), "must be at least 1".to_string()))
            } else {
                Ok(())
            }
        };
        positive("reference_buckets", self.reference_buckets)?;
        positive("reference_sample_size", self.reference_sample_size)?;
        positive("top_k", self.top_k)?;
        positive("max_features", self.max_features)?;
        positive("max_categories", self.max_categories)?;
        positive("max_streams", self.max_streams)?;
        if self.decode_threads > 64 {
            return Err(("decode_threads".into(), format!("{} is above 64", self.decode_threads)));
        }
        if self.aggregation_threads > 64 {
            return Err(("aggregation_threads".into(), format!("{} is above 64", self.aggregation_threads)));
        }
        if self.reference_sample_size > 1_000_000 {
            return Err(("reference_sample_size".into(), "must be at most 1000000".into()));
        }
        if self.top_k > self.max_categories {
            return Err(("top_k".into(), format!("{} is above max_categories ({})", self.top_k, self.max_categories)));
        }
        if self.integer_categorical_max_distinct > self.max_categories {
            return Err((
                "integer_categorical_max_distinct".into(),
                format!("{} is above max_categories ({})", self.integer_categorical_max_distinct, self.max_categories),
            ));
        }
        let alpha = self.quantile_relative_accuracy;
        if !(0.0001..=0.1).contains(&alpha) {
            return Err(("quantile_relative_accuracy".into(), format!("{alpha} is not between 0.0001 and 0.1")));
        }
        if let Some(path) = &self.reference_file {
            if !path.is_file() {
                return Err(("reference_file".into(), format!("{} is not a readable file", path.display())));
            }
        }
        Ok(())
    }

    /// Reads and checks `reference_file` (no references when it is unset). Start-up
    /// reads it once and shares the result with every aggregation thread.
    pub fn load_references(&self) -> Result<ReferenceSet, (String, String)> {
        match &self.reference_file {
            Some(path) => ReferenceSet::load(path).map_err(|e| ("reference_file".to_string(), e)),
            None => Ok(ReferenceSet::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(MonitorConfig::default().validate(), Ok(()));
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let c = MonitorConfig { top_k: 0, ..MonitorConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "top_k");
        let c = MonitorConfig { quantile_relative_accuracy: 0.5, ..MonitorConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "quantile_relative_accuracy");
        let c = MonitorConfig { reference_file: Some("/nonexistent/ref.json".into()), ..MonitorConfig::default() };
        assert_eq!(c.validate().unwrap_err().0, "reference_file");
    }

    #[test]
    fn a_reference_file_that_is_not_a_reference_export_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ref.json");
        std::fs::write(&path, "{\"not\": \"a reference\"}").unwrap();
        let c = MonitorConfig { reference_file: Some(path), ..MonitorConfig::default() };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.load_references().unwrap_err().0, "reference_file");
        assert_eq!(MonitorConfig::default().load_references(), Ok(ReferenceSet::default()));
    }
}
