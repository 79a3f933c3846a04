//! Label metrics of one bucket, from its aggregate to Anodot points: overall and
//! one-vs-rest accuracy, precision, recall and F1 (MLWatcher's names and dimensions),
//! macro and weighted F1, log loss, Brier score, ROC AUC (binary), confusion and label
//! counts, labeled fraction, late and unmatched label counts.
//!
//! A value that is undefined (no labels, no positives, a single class for AUC) is
//! omitted, never written as 0. This module does no I/O.

use super::aggregate::Aggregate;
use super::record::StreamMeta;
use crate::catalog::{self, Sample, ScopeValues};
use crate::sinks::Point;

/// Builds the points of one bucket. `arrival_mode` buckets hold labels by arrival, so
/// their labeled fraction (labels over predictions of the same bucket) means nothing
/// and is omitted.
pub fn points(meta: &StreamMeta, bucket_start: i64, agg: &Aggregate, arrival_mode: bool) -> Vec<Point> {
    use catalog::Dimension::{ActualClass, ClassName};
    let version = meta.version.map(|v| v.to_string());
    let scope = ScopeValues {
        model: Some(&meta.model),
        version: version.as_deref(),
        signature: (!meta.signature.is_empty()).then_some(meta.signature.as_str()),
    };
    let mut out = Vec::new();
    let mut push = |sample: Sample<'_>| out.extend(Point::from_sample(&sample, &scope, bucket_start));
    let classes = meta.class_names.len().max(agg.confusion.keys().map(|(a, p)| a.max(p) + 1).max().unwrap_or(0));
    let name = |i: usize| meta.class_names.get(i).cloned().unwrap_or_else(|| format!("class_{i}"));

    // A regression row's label is no class label: the class metrics count the others.
    let class_labeled = agg.labeled.saturating_sub(agg.regression.count);
    if class_labeled > 0 {
        let n = class_labeled as f64;
        let cell = |a: usize, p: usize| agg.confusion.get(&(a, p)).copied().unwrap_or(0);
        let correct: u64 = (0..classes).map(|i| cell(i, i)).sum();
        push(catalog::ACCURACY.sample(correct as f64 / n));

        let mut f1s = Vec::new();
        let mut weighted = 0.0;
        for i in 0..classes {
            let class = name(i);
            let tp = cell(i, i);
            let support: u64 = (0..classes).map(|p| cell(i, p)).sum();
            let predicted: u64 = (0..classes).map(|a| cell(a, i)).sum();
            // Saturating: a store edited by hand must not make emission panic.
            let (fp, fn_) = (predicted.saturating_sub(tp), support.saturating_sub(tp));
            let tn = class_labeled.saturating_sub(tp + fp + fn_);
            push(catalog::ACCURACY.sample((tp + tn) as f64 / n).with(ClassName, &class));
            if predicted > 0 {
                push(catalog::PRECISION.sample(tp as f64 / predicted as f64).with(ClassName, &class));
            }
            if support > 0 {
                push(catalog::RECALL.sample(tp as f64 / support as f64).with(ClassName, &class));
            }
            let f1_denominator = 2 * tp + fp + fn_;
            if f1_denominator > 0 {
                let f1 = 2.0 * tp as f64 / f1_denominator as f64;
                push(catalog::F1.sample(f1).with(ClassName, &class));
                f1s.push(f1);
                weighted += f1 * support as f64;
            }
        }
        if !f1s.is_empty() {
            push(catalog::MACRO_F1.sample(f1s.iter().sum::<f64>() / f1s.len() as f64));
            push(catalog::WEIGHTED_F1.sample(weighted / n));
        }
        push(catalog::LOG_LOSS.sample(agg.log_loss_sum / n));
        push(catalog::BRIER_SCORE.sample(agg.brier_sum / n));
        if classes == 2 {
            if let Some(auc) = roc_auc(agg) {
                push(catalog::ROC_AUC.sample(auc));
            }
        }
        for ((a, p), count) in &agg.confusion {
            if *count > 0 {
                let (actual, predicted) = (name(*a), name(*p));
                push(
                    catalog::CONFUSION_COUNT
                        .sample(*count as f64)
                        .with(ActualClass, &actual)
                        .with(ClassName, &predicted),
                );
            }
        }
        for i in 0..classes {
            let count: u64 = (0..classes).map(|p| cell(i, p)).sum();
            push(catalog::LABEL_COUNT.sample(count as f64).with(ClassName, &name(i)));
        }
    }
    agg.regression.samples(&mut push);
    if !arrival_mode && agg.predicted_rows > 0 {
        let fraction = agg.labeled as f64 / agg.predicted_rows as f64;
        push(catalog::LABELED_FRACTION.sample(fraction));
    }
    if agg.late > 0 {
        push(catalog::LABEL_LATE_COUNT.sample(agg.late as f64));
    }
    if agg.unmatched > 0 {
        push(catalog::LABEL_UNMATCHED_COUNT.sample(agg.unmatched as f64));
    }
    out
}

/// ROC AUC of a binary bucket: exact (Mann-Whitney, ties counted half) when every
/// labeled row's score was kept, else from the score histograms, where pairs in the
/// same bin count half (error at most half the share of such pairs). None without
/// both positive and negative labels.
pub fn roc_auc(agg: &Aggregate) -> Option<f64> {
    if agg.auc_rows.len() as u64 == agg.labeled {
        let mut rows = agg.auc_rows.clone();
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let positives = rows.iter().filter(|(_, y)| *y).count() as f64;
        let negatives = rows.len() as f64 - positives;
        if positives == 0.0 || negatives == 0.0 {
            return None;
        }
        let mut rank_sum = 0.0;
        let mut i = 0;
        while i < rows.len() {
            let mut j = i;
            while j + 1 < rows.len() && rows[j + 1].0 == rows[i].0 {
                j += 1;
            }
            // Ranks are 1-based; tied scores share the mean of their ranks.
            let mean_rank = (i + j) as f64 / 2.0 + 1.0;
            rank_sum += mean_rank * rows[i..=j].iter().filter(|(_, y)| *y).count() as f64;
            i = j + 1;
        }
        return Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives));
    }
    let positives: u64 = agg.hist_pos.values().sum();
    let negatives: u64 = agg.hist_neg.values().sum();
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut below = 0.0;
    let mut pairs = 0.0;
    for bin in 0..super::aggregate::AUC_BINS {
        let pos = agg.hist_pos.get(&bin).copied().unwrap_or(0) as f64;
        let neg = agg.hist_neg.get(&bin).copied().unwrap_or(0) as f64;
        pairs += pos * (below + neg / 2.0);
        below += neg;
    }
    Some(pairs / (positives as f64 * negatives as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_auc_counts_ties_half() {
        // Positives 0.8, 0.4; negatives 0.4, 0.2: pairs (0.8>0.4)=1, (0.8>0.2)=1,
        // (0.4=0.4)=0.5, (0.4>0.2)=1 -> 3.5 / 4.
        let agg = Aggregate {
            labeled: 4,
            auc_rows: vec![(0.8, true), (0.4, true), (0.4, false), (0.2, false)],
            ..Aggregate::default()
        };
        assert_eq!(roc_auc(&agg), Some(0.875));
    }

    #[test]
    fn histogram_auc_is_used_when_the_exact_list_is_incomplete() {
        let mut agg = Aggregate { labeled: 3, auc_rows: vec![(0.9, true)], ..Aggregate::default() };
        agg.hist_pos.insert(900, 1);
        agg.hist_neg.insert(100, 1);
        agg.hist_neg.insert(900, 1);
        // One negative below (1) and one in the same bin (0.5) -> 1.5 / 2.
        assert_eq!(roc_auc(&agg), Some(0.75));
    }

    #[test]
    fn auc_is_undefined_with_one_class() {
        let agg = Aggregate { labeled: 1, auc_rows: vec![(0.9, true)], ..Aggregate::default() };
        assert_eq!(roc_auc(&agg), None);
    }

    fn aggregate_of(rows: &[(f32, usize)], auc_cap: usize) -> Aggregate {
        use super::super::aggregate::{apply_delta, BucketDelta};
        use super::super::record::PendingRow;
        let mut delta = BucketDelta::default();
        for (score, actual) in rows {
            let row = PendingRow {
                stream: 1,
                bucket_start: 0,
                expires_ms: 0,
                predicted: u16::from(*score > 0.5),
                probabilities: vec![1.0 - score, *score],
                prediction: None,
            };
            delta.add_label(&row, *actual);
        }
        let mut fields = std::collections::BTreeMap::new();
        let kept = apply_delta(&mut fields, &delta, auc_cap);
        Aggregate::parse(
            fields.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            delta.auc[..kept].iter().map(|s| s.as_str()),
        )
    }

    fn brute_force_auc(rows: &[(f32, usize)]) -> Option<(f64, f64)> {
        let (mut wins, mut pairs, mut same_bin) = (0.0, 0.0, 0.0);
        for (p, _) in rows.iter().filter(|(_, y)| *y == 1) {
            for (n, _) in rows.iter().filter(|(_, y)| *y == 0) {
                pairs += 1.0;
                wins += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
                let bin = |s: f32| super::super::aggregate::auc_bin(f64::from(s));
                if bin(*p) == bin(*n) {
                    same_bin += 1.0;
                }
            }
        }
        (pairs > 0.0).then(|| (wins / pairs, same_bin / pairs))
    }

    proptest::proptest! {
        #[test]
        fn auc_matches_the_pairwise_definition(
            rows in proptest::collection::vec((0u16..=64, 0usize..2), 1..60)
        ) {
            let rows: Vec<(f32, usize)> = rows.into_iter().map(|(s, y)| (f32::from(s) / 64.0, y)).collect();
            let exact = roc_auc(&aggregate_of(&rows, usize::MAX));
            let binned = roc_auc(&aggregate_of(&rows, 0));
            match brute_force_auc(&rows) {
                None => proptest::prop_assert!(exact.is_none() && binned.is_none()),
                Some((auc, same_bin_share)) => {
                    proptest::prop_assert!((exact.unwrap() - auc).abs() < 1e-12);
                    proptest::prop_assert!((binned.unwrap() - auc).abs() <= same_bin_share / 2.0 + 1e-12);
                }
            }
        }

        #[test]
        fn accuracy_and_f1_match_their_definitions(
            rows in proptest::collection::vec((0u16..=64, 0usize..2), 1..60)
        ) {
            let rows: Vec<(f32, usize)> = rows.into_iter().map(|(s, y)| (f32::from(s) / 64.0, y)).collect();
            let meta = StreamMeta { model: "m".into(), version: None, signature: "s".into(), class_names: vec![] };
            let points = points(&meta, 0, &aggregate_of(&rows, 0), false);
            let get = |what: &str, class: Option<&str>| points.iter().find(|p| {
                p.what() == what && p.property("class_name") == class
            }).map(|p| p.value);
            let predicted = |s: f32| usize::from(s > 0.5);
            let correct = rows.iter().filter(|(s, y)| predicted(*s) == *y).count() as f64;
            proptest::prop_assert!((get("accuracy", None).unwrap() - correct / rows.len() as f64).abs() < 1e-12);
            let tp = rows.iter().filter(|(s, y)| predicted(*s) == 1 && *y == 1).count() as f64;
            let fp = rows.iter().filter(|(s, y)| predicted(*s) == 1 && *y == 0).count() as f64;
            let fn_ = rows.iter().filter(|(s, y)| predicted(*s) == 0 && *y == 1).count() as f64;
            match get("f1", Some("class_1")) {
                Some(f1) => proptest::prop_assert!((f1 - 2.0 * tp / (2.0 * tp + fp + fn_)).abs() < 1e-12),
                None => proptest::prop_assert!(tp + fp + fn_ == 0.0),
            }
            proptest::prop_assert_eq!(get("precision", Some("class_1")).is_some(), tp + fp > 0.0);
            proptest::prop_assert_eq!(get("recall", Some("class_1")).is_some(), tp + fn_ > 0.0);
        }
    }
}
