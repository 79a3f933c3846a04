//! Performance estimated from the probabilities alone, before any label exists
//! (confidence-based performance estimation, as NannyML's CBPE does offline).
//!
//! If the model is calibrated, a row predicted as class ŷ with probabilities p is
//! right with probability p[ŷ], and its actual class is c with probability p[c]. The
//! expected confusion counts over a bucket are therefore, per class c:
//! TP_c = Σ_{ŷ=c} p[c], FP_c = Σ_{ŷ=c} (1 - p[c]), FN_c = Σ_{ŷ≠c} p[c]. Accuracy,
//! precision, recall and F1 follow from them. This module never sees labels and does
//! not calibrate: an uncalibrated model gives biased estimates (documented).

/// Sums over a bucket's rows that the estimates need, per class.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ExpectedConfusion {
    /// Rows predicted as each class.
    pub predicted: Vec<u64>,
    /// Σ p[c] over rows predicted as c: the expected true positives of c.
    pub true_positive: Vec<f64>,
    /// Σ p[c] over all rows: the expected number of rows whose actual class is c.
    pub actual: Vec<f64>,
}

impl crate::monitor::merge::Merge for ExpectedConfusion {
    /// Sums of the same classes add up; a side with another class count is ignored
    /// (the bucket counts it as a class count mismatch before it gets here).
    fn merge(&mut self, other: &Self) {
        if self.predicted.is_empty() {
            *self = other.clone();
            return;
        }
        if other.predicted.len() != self.predicted.len() {
            return;
        }
        for c in 0..self.predicted.len() {
            self.predicted[c] += other.predicted[c];
            self.true_positive[c] += other.true_positive[c];
            self.actual[c] += other.actual[c];
        }
    }
}

/// The estimates of one bucket; undefined ratios (0/0) are None.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimates {
    pub accuracy: Option<f64>,
    pub precision: Vec<Option<f64>>,
    pub recall: Vec<Option<f64>>,
    pub f1: Vec<Option<f64>>,
}

impl ExpectedConfusion {
    pub fn new(classes: usize) -> Self {
        ExpectedConfusion { predicted: vec![0; classes], true_positive: vec![0.0; classes], actual: vec![0.0; classes] }
    }

    /// Adds one row: its probabilities and its predicted class.
    pub fn add_row(&mut self, probabilities: &[f64], predicted: usize) {
        if predicted >= self.predicted.len() || probabilities.len() != self.predicted.len() {
            return;
        }
        self.predicted[predicted] += 1;
        self.true_positive[predicted] += probabilities[predicted];
        for (sum, p) in self.actual.iter_mut().zip(probabilities) {
            *sum += p;
        }
    }

    /// Rows added.
    pub fn rows(&self) -> u64 {
        self.predicted.iter().sum()
    }

    /// Expected accuracy and per-class precision, recall and F1.
    pub fn estimates(&self) -> Estimates {
        let rows = self.rows();
        let ratio = |num: f64, den: f64| (den > 0.0).then(|| num / den).filter(|v| v.is_finite());
        let accuracy = ratio(self.true_positive.iter().sum(), rows as f64);
        let mut precision = Vec::with_capacity(self.predicted.len());
        let mut recall = Vec::with_capacity(self.predicted.len());
        let mut f1 = Vec::with_capacity(self.predicted.len());
        for c in 0..self.predicted.len() {
            let tp = self.true_positive[c];
            let fp = self.predicted[c] as f64 - tp;
            let fne = self.actual[c] - tp;
            precision.push(ratio(tp, tp + fp));
            recall.push(ratio(tp, tp + fne));
            f1.push(ratio(2.0 * tp, 2.0 * tp + fp + fne));
        }
        Estimates { accuracy, precision, recall, f1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_binary_case() {
        // Rows: [0.2, 0.8] -> 1, [0.6, 0.4] -> 0, [0.1, 0.9] -> 1.
        let mut e = ExpectedConfusion::new(2);
        e.add_row(&[0.2, 0.8], 1);
        e.add_row(&[0.6, 0.4], 0);
        e.add_row(&[0.1, 0.9], 1);
        let est = e.estimates();
        // Accuracy: (0.8 + 0.6 + 0.9) / 3.
        assert!((est.accuracy.unwrap() - 2.3 / 3.0).abs() < 1e-12);
        // Class 1: TP = 1.7, FP = 0.3, FN = 0.4.
        assert!((est.precision[1].unwrap() - 1.7 / 2.0).abs() < 1e-12);
        assert!((est.recall[1].unwrap() - 1.7 / 2.1).abs() < 1e-12);
        assert!((est.f1[1].unwrap() - 3.4 / (3.4 + 0.3 + 0.4)).abs() < 1e-12);
        // Class 0: TP = 0.6, FP = 0.4, FN = 0.3.
        assert!((est.precision[0].unwrap() - 0.6).abs() < 1e-12);
        assert!((est.recall[0].unwrap() - 0.6 / 0.9).abs() < 1e-12);
    }

    #[test]
    fn a_class_never_predicted_has_no_precision() {
        let mut e = ExpectedConfusion::new(3);
        e.add_row(&[0.7, 0.2, 0.1], 0);
        let est = e.estimates();
        assert_eq!(est.precision[1], None);
        assert!((est.recall[1].unwrap() - 0.0).abs() < 1e-12);
    }
}
