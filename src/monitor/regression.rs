//! A regression stream's predictions in one bucket: `prediction_value` (the same
//! statistics and quantiles as `feature_value`), `prediction_missing_count`, and
//! `prediction_drift` against the reference's bins of the predictions (PSI and JS, as
//! for numeric features).
//!
//! The bucket owns one `PredictionStats` once an observation carried regression
//! values; a classifier's bucket never has one, and a regression bucket never has
//! class statistics (decoding gives an observation one or the other).

use crate::catalog::{self, Dimension, Sample};
use crate::monitor::drift;
use crate::monitor::merge::Merge;
use crate::monitor::reference::NumericReference;
use crate::monitor::stats::Summary;
use serde::{Deserialize, Serialize};

/// Statistics of one bucket's regression predictions. Mergeable: two replicas' stats
/// of the same bucket merge into those of the union of their rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PredictionStats {
    /// Moments, extremes and quantiles of the finite predictions.
    pub summary: Summary,
    /// Rows whose prediction was NaN or infinite.
    pub missing: u64,
    /// Counts per reference bin; present only when the reference was frozen before
    /// the bucket's first prediction, so that drift covers every prediction.
    pub bins: Option<Vec<u64>>,
}

impl PredictionStats {
    /// Empty statistics with quantiles of relative accuracy `alpha`, binned against the
    /// reference's prediction bins when there are some.
    pub fn new(alpha: f64, reference: Option<&NumericReference>) -> Self {
        PredictionStats {
            summary: Summary::new(alpha),
            missing: 0,
            bins: reference.map(|r| vec![0; drift::bin_count(&r.edges)]),
        }
    }

    /// Adds one observation's predictions (`reference` is the one `new` was given).
    pub fn add(&mut self, values: &[f64], reference: Option<&NumericReference>) {
        self.missing += self.summary.add_slice(values);
        if let (Some(bins), Some(reference)) = (&mut self.bins, reference) {
            for &v in values {
                if v.is_finite() {
                    bins[drift::bin_of(&reference.edges, v)] += 1;
                }
            }
        }
    }

    /// The bucket's prediction metrics, handed to `push` in a stable order.
    pub fn samples(&self, reference: Option<&NumericReference>, mut push: impl FnMut(Sample<'_>)) {
        // The count of finite predictions first, then `feature_value`'s statistics.
        push(catalog::PREDICTION_VALUE.sample(self.summary.count() as f64).with(Dimension::Stat, "count"));
        for (stat, v) in self.summary.stats() {
            push(catalog::PREDICTION_VALUE.sample(v).with(Dimension::Stat, stat));
        }
        push(catalog::PREDICTION_MISSING_COUNT.sample(self.missing as f64));
        if let (Some(bins), Some(r)) = (&self.bins, reference) {
            if let Some(current) = drift::frequencies(bins).filter(|c| c.len() == r.frequencies.len()) {
                let drift = &catalog::PREDICTION_DRIFT;
                push(drift.sample(drift::psi(&r.frequencies, &current)).with(Dimension::Method, "psi"));
                push(drift.sample(drift::js(&r.frequencies, &current)).with(Dimension::Method, "js"));
            }
        }
    }
}

impl Merge for PredictionStats {
    /// Merges another bucket's statistics of the same stream into these.
    fn merge(&mut self, other: &Self) {
        self.summary.merge(&other.summary);
        self.missing += other.missing;
        self.bins = match (self.bins.take(), &other.bins) {
            (Some(mut mine), Some(theirs)) if mine.len() == theirs.len() => {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    *m += t;
                }
                Some(mine)
            }
            // Drift needs every prediction binned; one side without bins voids it.
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values_of(stats: &PredictionStats, reference: Option<&NumericReference>) -> Vec<(String, String, f64)> {
        let mut out = Vec::new();
        stats.samples(reference, |s| {
            let dim = s.dims().first().map(|(_, v)| v.to_string()).unwrap_or_default();
            out.push((s.metric.name.to_string(), dim, s.value));
        });
        out
    }

    #[test]
    fn predictions_give_exact_moments_missing_rows_and_drift_against_the_reference() {
        let reference = NumericReference::of_sample(&(0..100).map(f64::from).collect::<Vec<_>>()).unwrap();
        let mut stats = PredictionStats::new(0.01, Some(&reference));
        stats.add(&[10.0, 20.0, f64::NAN, 30.0], Some(&reference));
        let points = values_of(&stats, Some(&reference));
        let get = |what: &str, dim: &str| points.iter().find(|p| p.0 == what && p.1 == dim).map(|p| p.2);
        assert_eq!(get("prediction_value", "count"), Some(3.0));
        assert_eq!(get("prediction_value", "mean"), Some(20.0));
        assert_eq!(get("prediction_value", "min"), Some(10.0));
        assert_eq!(get("prediction_value", "max"), Some(30.0));
        assert_eq!(get("prediction_value", "std"), Some(10.0));
        assert_eq!(get("prediction_missing_count", ""), Some(1.0));
        assert!(get("prediction_drift", "psi").unwrap() > 0.0);
        assert!(get("prediction_drift", "js").unwrap() > 0.0);
        assert_eq!(get("prediction_drift", "linf"), None);
        // Without a reference there is no drift.
        let mut plain = PredictionStats::new(0.01, None);
        plain.add(&[1.0], None);
        assert!(values_of(&plain, None).iter().all(|p| p.0 != "prediction_drift"));
    }

    #[test]
    fn merged_stats_equal_the_stats_of_all_rows() {
        let reference = NumericReference::of_sample(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let (left, right) = ([1.5, 2.5, 9.0], [0.5, f64::INFINITY, 4.5]);
        let mut a = PredictionStats::new(0.01, Some(&reference));
        a.add(&left, Some(&reference));
        let mut b = PredictionStats::new(0.01, Some(&reference));
        b.add(&right, Some(&reference));
        a.merge(&b);
        let mut all = PredictionStats::new(0.01, Some(&reference));
        all.add(&[left, right].concat(), Some(&reference));
        assert_eq!(a.bins, all.bins);
        assert_eq!(a.missing, all.missing);
        assert_eq!(a.summary.count(), all.summary.count());
        assert!((a.summary.mean().unwrap() - all.summary.mean().unwrap()).abs() < 1e-12);
        assert!((a.summary.std().unwrap() - all.summary.std().unwrap()).abs() < 1e-12);
    }
}
