//! Per-bucket label aggregates as flat fields, the one representation both stores
//! keep (a Redis hash, or a map in the embedded file), and the deltas a batch of
//! joined labels adds to them.
//!
//! Everything a bucket's label metrics need is a sum (counts, confusion cells, log
//! loss and Brier sums, histogram bins), so replicas add deltas atomically and any of
//! them can compute the same metrics. The only per-row state is the list of scores
//! kept for an exact `roc_auc`, capped by `auc_exact_rows`. This module does no I/O.

use super::record::PendingRow;
use std::collections::BTreeMap;

/// Prediction rows recorded in the bucket (the denominator of `labeled_fraction`).
pub const F_PREDICTED: &str = "n";
/// Labels joined to the bucket.
pub const F_LABELED: &str = "l";
/// Sum of each labeled row's log loss.
pub const F_LOG_LOSS: &str = "ll";
/// Sum of each labeled row's Brier score.
pub const F_BRIER: &str = "br";
/// Labels that arrived after their prediction bucket was emitted (arrival bucket).
pub const F_LATE: &str = "late";
/// Labels that matched no prediction (arrival bucket).
pub const F_UNMATCHED: &str = "unm";
/// Set once, by the replica that claims the bucket's emission.
pub const F_CLAIMED: &str = "claimed";
/// Entries in the exact AUC list (the embedded store's stand-in for `LLEN`).
pub const F_AUC_LEN: &str = "al";
/// Bins of the positive-class score histogram used for AUC past the exact cap.
pub const AUC_BINS: usize = 1000;
/// Probabilities are clipped to [EPS, 1 - EPS] in log loss, as scikit-learn does.
pub const LOG_LOSS_EPS: f64 = 1e-15;

fn confusion_field(actual: usize, predicted: usize) -> String {
    format!("c:{actual}:{predicted}")
}

/// The histogram bin of a score in [0, 1].
pub fn auc_bin(score: f64) -> usize {
    ((score.clamp(0.0, 1.0) * AUC_BINS as f64) as usize).min(AUC_BINS - 1)
}

/// What one batch adds to one bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BucketDelta {
    /// Integer fields and their increments.
    pub ints: BTreeMap<String, i64>,
    /// Float fields and their increments (sums of per-row values, added in row order).
    pub floats: BTreeMap<String, f64>,
    /// Exact AUC entries `score,label`, appended while the bucket's list has room.
    pub auc: Vec<String>,
}

impl BucketDelta {
    /// Adds `n` to an integer field.
    pub fn add_int(&mut self, field: &str, n: i64) {
        *self.ints.entry(field.to_string()).or_insert(0) += n;
    }

    /// Adds one joined label: the row's prediction against the actual class.
    pub fn add_label(&mut self, row: &PendingRow, actual: usize) {
        let k = row.probabilities.len();
        self.add_int(F_LABELED, 1);
        self.add_int(&confusion_field(actual, usize::from(row.predicted)), 1);
        let p_actual = f64::from(row.probabilities.get(actual).copied().unwrap_or(0.0));
        let log_loss = -p_actual.clamp(LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS).ln();
        *self.floats.entry(F_LOG_LOSS.to_string()).or_insert(0.0) += log_loss;
        let brier = if k == 2 {
            // Binary: scikit-learn's brier_score_loss, on the positive class.
            let y = if actual == 1 { 1.0 } else { 0.0 };
            (f64::from(row.probabilities[1]) - y).powi(2)
        } else {
            // Multiclass: Brier's original definition, summed over classes.
            row.probabilities
                .iter()
                .enumerate()
                .map(|(j, p)| (f64::from(*p) - if j == actual { 1.0 } else { 0.0 }).powi(2))
                .sum()
        };
        *self.floats.entry(F_BRIER.to_string()).or_insert(0.0) += brier;
        if k == 2 {
            let score = row.probabilities[1];
            let positive = actual == 1;
            let bin = auc_bin(f64::from(score));
            self.add_int(&format!("{}:{bin}", if positive { "hp" } else { "hn" }), 1);
            self.auc.push(format!("{score},{}", u8::from(positive)));
        }
    }

    /// Adds one numeric label joined to a regression row's prediction (see
    /// `labels::regression`).
    pub fn add_regression_label(&mut self, prediction: f64, label: f64) {
        self.add_int(F_LABELED, 1);
        let (ints, floats) = super::regression::label_delta(prediction, label);
        for (field, n) in ints {
            self.add_int(&field, n);
        }
        for (field, x) in floats {
            *self.floats.entry(field.to_string()).or_insert(0.0) += x;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ints.is_empty() && self.floats.is_empty() && self.auc.is_empty()
    }
}

/// Adds a delta to a bucket's fields, as the Redis script does: integers add,
/// floats add in f64 and are kept in their shortest round-trip form. Returns how many
/// AUC entries fit under `auc_cap` (the caller appends those to its list).
pub fn apply_delta(fields: &mut BTreeMap<String, String>, delta: &BucketDelta, auc_cap: usize) -> usize {
    for (field, n) in &delta.ints {
        let current = fields.get(field).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        fields.insert(field.clone(), (current + n).to_string());
    }
    for (field, x) in &delta.floats {
        let current = fields.get(field).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        fields.insert(field.clone(), format_float(current + x));
    }
    let kept = fields.get(F_AUC_LEN).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    let room = auc_cap.saturating_sub(kept).min(delta.auc.len());
    if room > 0 {
        fields.insert(F_AUC_LEN.to_string(), (kept + room).to_string());
    }
    room
}

/// Shortest round-trip text of a float (what Lua's `%.17g` also parses back exactly).
pub fn format_float(x: f64) -> String {
    format!("{x:?}")
}

/// A bucket's aggregate, parsed from its fields when it is emitted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregate {
    /// Prediction rows recorded in the bucket (denominator of `labeled_fraction`).
    pub predicted_rows: u64,
    /// Labels joined to the bucket (denominator of every label metric).
    pub labeled: u64,
    /// `(actual, predicted) -> count`.
    pub confusion: BTreeMap<(usize, usize), u64>,
    /// Sum of the labeled rows' log loss (mean = sum / labeled).
    pub log_loss_sum: f64,
    /// Sum of the labeled rows' Brier score.
    pub brier_sum: f64,
    /// Positive-class score histograms of positive and negative labels (binary).
    pub hist_pos: BTreeMap<usize, u64>,
    pub hist_neg: BTreeMap<usize, u64>,
    /// The exact `(score, positive)` list, complete only when its length is `labeled`.
    pub auc_rows: Vec<(f64, bool)>,
    /// Late labels that arrived in this bucket.
    pub late: u64,
    /// Unmatched labels that arrived in this bucket.
    pub unmatched: u64,
    /// Numeric labels of regression rows (also counted in `labeled`).
    pub regression: super::regression::RegressionAggregate,
}

impl Aggregate {
    /// Parses a bucket's fields and exact AUC entries; unknown or malformed fields are
    /// ignored (a field written by a newer version must not break emission).
    pub fn parse<'a>(
        fields: impl IntoIterator<Item = (&'a str, &'a str)>,
        auc: impl IntoIterator<Item = &'a str>,
    ) -> Aggregate {
        let mut a = Aggregate::default();
        for (field, value) in fields {
            let int = || value.parse::<u64>().unwrap_or(0);
            match field {
                F_PREDICTED => a.predicted_rows = int(),
                F_LABELED => a.labeled = int(),
                F_LOG_LOSS => a.log_loss_sum = value.parse().unwrap_or(f64::NAN),
                F_BRIER => a.brier_sum = value.parse().unwrap_or(f64::NAN),
                F_LATE => a.late = int(),
                F_UNMATCHED => a.unmatched = int(),
                _ if a.regression.parse_field(field, value) => {}
                _ => {
                    let mut parts = field.split(':');
                    match (parts.next(), parts.next(), parts.next(), parts.next()) {
                        (Some("c"), Some(actual), Some(predicted), None) => {
                            if let (Ok(actual), Ok(predicted)) = (actual.parse(), predicted.parse()) {
                                a.confusion.insert((actual, predicted), int());
                            }
                        }
                        (Some(side @ ("hp" | "hn")), Some(bin), None, None) => {
                            if let Ok(bin) = bin.parse::<usize>() {
                                let hist = if side == "hp" { &mut a.hist_pos } else { &mut a.hist_neg };
                                hist.insert(bin, int());
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        for entry in auc {
            if let Some((score, label)) = entry.split_once(',') {
                if let Ok(score) = score.parse::<f32>() {
                    a.auc_rows.push((f64::from(score), label == "1"));
                }
            }
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(predicted: u16, probabilities: Vec<f32>) -> PendingRow {
        PendingRow { stream: 1, bucket_start: 0, expires_ms: 0, predicted, probabilities, prediction: None }
    }

    #[test]
    fn deltas_applied_to_fields_parse_back_into_the_same_sums() {
        let mut delta = BucketDelta::default();
        delta.add_label(&row(1, vec![0.25, 0.75]), 1);
        delta.add_label(&row(1, vec![0.5, 0.5]), 0);
        let mut fields = BTreeMap::new();
        assert_eq!(apply_delta(&mut fields, &delta, 1), 1);
        let agg = Aggregate::parse(
            fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            delta.auc[..1].iter().map(|s| s.as_str()),
        );
        assert_eq!(agg.labeled, 2);
        assert_eq!(agg.confusion[&(1, 1)], 1);
        assert_eq!(agg.confusion[&(0, 1)], 1);
        assert_eq!(agg.log_loss_sum, -(0.75f64.ln()) - 0.5f64.ln());
        assert_eq!(agg.brier_sum, 0.0625 + 0.25);
        assert_eq!(agg.hist_pos[&750], 1);
        assert_eq!(agg.hist_neg[&500], 1);
        assert_eq!(agg.auc_rows, vec![(0.75, true)]);
    }
}
