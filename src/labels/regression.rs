//! Label aggregates and metrics of regression streams: numeric labels joined to a
//! prediction row add sums (exact `mae`, `rmse`, `error_mean`, `r2`, `mape`) and
//! counts per logarithmic bin (quantiles of `error_value` and `label_value`) to the
//! bucket's flat fields, which both stores add atomically (see `aggregate`), so
//! replicas' labels merge by addition.
//!
//! Bins: a value v ≠ 0 falls in bin `ceil(ln|v| / ln γ)` with γ = (1 + α)/(1 − α),
//! α = `BIN_RELATIVE_ACCURACY`; the bin's value `2γ^i/(γ + 1)` is within α of every
//! value in it (DDSketch's mapping). Values of magnitude below `ZERO_BELOW` count as
//! zero. This module does no I/O.

use crate::catalog::{self, Dimension, Sample};

/// Labels joined to regression rows of the bucket.
pub const F_COUNT: &str = "r:n";
/// Σ |prediction − label|.
pub const F_ABS_ERROR: &str = "r:ae";
/// Σ (prediction − label)².
pub const F_SQUARED_ERROR: &str = "r:se";
/// Σ (prediction − label).
pub const F_ERROR: &str = "r:e";
/// Σ label.
pub const F_LABEL: &str = "r:y";
/// Σ label².
pub const F_LABEL_SQUARED: &str = "r:yy";
/// Σ |prediction − label| / |label| over labels ≠ 0.
pub const F_ABS_PERCENT_ERROR: &str = "r:ape";
/// Labels equal to 0, left out of `mape`.
pub const F_ZERO_LABELS: &str = "r:y0";
/// Prefix of the |error| bin counts (`r:eb:<bin>`).
const ERROR_BINS: &str = "r:eb:";
/// Prefix of the label bin counts (`r:lb:<bin>`, negative labels `r:lb:-<bin>`
/// prefixed `n`: `r:lb:n<bin>`; zero `r:lb:z`).
const LABEL_BINS: &str = "r:lb:";
/// Relative accuracy of the quantiles of `error_value` and `label_value`.
pub const BIN_RELATIVE_ACCURACY: f64 = 0.01;
/// Magnitudes below this are binned as 0.
pub const ZERO_BELOW: f64 = 1e-9;

fn gamma() -> f64 {
    (1.0 + BIN_RELATIVE_ACCURACY) / (1.0 - BIN_RELATIVE_ACCURACY)
}

/// The bin of a magnitude ≥ `ZERO_BELOW`.
fn bin_of(magnitude: f64) -> i32 {
    (magnitude.ln() / gamma().ln()).ceil() as i32
}

/// The representative magnitude of a bin.
fn bin_value(bin: i32) -> f64 {
    let g = gamma();
    2.0 * g.powi(bin) / (g + 1.0)
}

/// The field counting a value in the bins under `prefix`.
fn bin_field(prefix: &str, v: f64) -> String {
    if v.abs() < ZERO_BELOW {
        format!("{prefix}z")
    } else if v < 0.0 {
        format!("{prefix}n{}", bin_of(-v))
    } else {
        format!("{prefix}{}", bin_of(v))
    }
}

/// Parses a bin field's suffix into a signed position: the order of the values.
fn parse_bin(suffix: &str) -> Option<(i8, i32)> {
    if suffix == "z" {
        return Some((0, 0));
    }
    match suffix.strip_prefix('n') {
        Some(bin) => Some((-1, bin.parse().ok()?)),
        None => Some((1, suffix.parse().ok()?)),
    }
}

/// Integer increments of a bucket's fields: `(field, +n)`.
pub type IntIncrements = Vec<(String, i64)>;
/// Float sums added to a bucket's fields: `(field, +x)`.
pub type FloatIncrements = Vec<(&'static str, f64)>;

/// What one joined label adds to a bucket.
pub fn label_delta(prediction: f64, label: f64) -> (IntIncrements, FloatIncrements) {
    let error = prediction - label;
    let mut ints =
        vec![(F_COUNT.to_string(), 1), (bin_field(ERROR_BINS, error.abs()), 1), (bin_field(LABEL_BINS, label), 1)];
    let mut floats = vec![
        (F_ABS_ERROR, error.abs()),
        (F_SQUARED_ERROR, error * error),
        (F_ERROR, error),
        (F_LABEL, label),
        (F_LABEL_SQUARED, label * label),
    ];
    if label == 0.0 {
        ints.push((F_ZERO_LABELS.to_string(), 1));
    } else {
        floats.push((F_ABS_PERCENT_ERROR, error.abs() / label.abs()));
    }
    (ints, floats)
}

/// A bucket's regression label aggregate, parsed from its fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegressionAggregate {
    /// Labels joined to regression rows: n of every mean.
    pub count: u64,
    /// Σ|e|, for `mae` and the mean of `error_value`.
    pub abs_error_sum: f64,
    /// Σe², for `rmse`, `r2` and the spread of `error_value`.
    pub squared_error_sum: f64,
    /// Σe, for `error_mean` (the bias).
    pub error_sum: f64,
    /// Σy, for `r2`'s total sum of squares and `label_value`'s mean.
    pub label_sum: f64,
    /// Σy², for `r2` and `label_value`'s spread.
    pub label_squared_sum: f64,
    /// Σ|e|/|y| over labels ≠ 0, for `mape`.
    pub abs_percent_error_sum: f64,
    /// Labels equal to 0: left out of `mape` and reported.
    pub zero_labels: u64,
    /// |error| counts per bin, by signed position.
    pub error_bins: Vec<((i8, i32), u64)>,
    /// Label counts per bin, by signed position.
    pub label_bins: Vec<((i8, i32), u64)>,
}

impl RegressionAggregate {
    /// Takes a field of the bucket if it is a regression one; false for other fields.
    pub fn parse_field(&mut self, field: &str, value: &str) -> bool {
        let int = || value.parse::<u64>().unwrap_or(0);
        let float = || value.parse::<f64>().unwrap_or(f64::NAN);
        match field {
            F_COUNT => self.count = int(),
            F_ABS_ERROR => self.abs_error_sum = float(),
            F_SQUARED_ERROR => self.squared_error_sum = float(),
            F_ERROR => self.error_sum = float(),
            F_LABEL => self.label_sum = float(),
            F_LABEL_SQUARED => self.label_squared_sum = float(),
            F_ABS_PERCENT_ERROR => self.abs_percent_error_sum = float(),
            F_ZERO_LABELS => self.zero_labels = int(),
            _ => {
                if let Some(bin) = field.strip_prefix(ERROR_BINS).and_then(parse_bin) {
                    self.error_bins.push((bin, int()));
                } else if let Some(bin) = field.strip_prefix(LABEL_BINS).and_then(parse_bin) {
                    self.label_bins.push((bin, int()));
                } else {
                    return false;
                }
            }
        }
        true
    }

    /// The bucket's regression label metrics, handed to `push`; nothing without labels.
    pub fn samples(&self, mut push: impl FnMut(Sample<'_>)) {
        if self.count == 0 {
            return;
        }
        let n = self.count as f64;
        let mae = self.abs_error_sum / n;
        push(catalog::MAE.sample(mae));
        push(catalog::RMSE.sample((self.squared_error_sum / n).max(0.0).sqrt()));
        push(catalog::ERROR_MEAN.sample(self.error_sum / n));
        let with_percent = self.count.saturating_sub(self.zero_labels);
        if with_percent > 0 {
            push(catalog::MAPE.sample(self.abs_percent_error_sum / with_percent as f64));
        }
        push(catalog::MAPE_EXCLUDED_COUNT.sample(self.zero_labels as f64));
        if let Some(r2) = r2(self.count, self.squared_error_sum, self.label_sum, self.label_squared_sum) {
            push(catalog::R2.sample(r2));
        }
        // |error|: mean is the MAE, its spread from Σe² and Σ|e|.
        let error_std = sample_std(self.count, mae, self.squared_error_sum);
        for (stat, v) in stats(self.count, mae, error_std, &self.error_bins) {
            push(catalog::ERROR_VALUE.sample(v).with(Dimension::Stat, stat));
        }
        let label_mean = self.label_sum / n;
        let label_std = sample_std(self.count, label_mean, self.label_squared_sum);
        for (stat, v) in stats(self.count, label_mean, label_std, &self.label_bins) {
            push(catalog::LABEL_VALUE.sample(v).with(Dimension::Stat, stat));
        }
    }
}

/// R² = 1 − SSE / SST, with SST = Σy² − (Σy)²/n; None for fewer than two labels or
/// labels that are all equal (SST = 0: R² is undefined).
pub fn r2(count: u64, squared_error_sum: f64, label_sum: f64, label_squared_sum: f64) -> Option<f64> {
    if count < 2 {
        return None;
    }
    let n = count as f64;
    let total = label_squared_sum - label_sum * label_sum / n;
    // Rounding leaves a tiny SST for equal labels; relative to Σy² it is noise.
    if total <= f64::EPSILON * 16.0 * label_squared_sum.max(f64::MIN_POSITIVE) {
        return None;
    }
    Some(1.0 - squared_error_sum / total)
}

/// Sample standard deviation (n − 1) from the mean and the sum of squares; None below
/// two values.
fn sample_std(count: u64, mean: f64, sum_of_squares: f64) -> Option<f64> {
    (count > 1).then(|| {
        let n = count as f64;
        ((sum_of_squares - n * mean * mean).max(0.0) / (n - 1.0)).sqrt()
    })
}

/// `count` and the statistics of `monitor::stats::STATS` from exact moments and binned values:
/// quantiles, min and max come from the bins (within `BIN_RELATIVE_ACCURACY`).
fn stats(count: u64, mean: f64, std: Option<f64>, bins: &[((i8, i32), u64)]) -> Vec<(&'static str, f64)> {
    let mut sorted: Vec<((i8, i32), u64)> = bins.iter().copied().filter(|(_, c)| *c > 0).collect();
    // Negative values: a larger bin is a smaller value.
    sorted.sort_by_key(|((sign, bin), _)| (*sign, if *sign < 0 { -*bin } else { *bin }));
    let total: u64 = sorted.iter().map(|(_, c)| c).sum();
    let value = |(sign, bin): (i8, i32)| if sign == 0 { 0.0 } else { f64::from(sign) * bin_value(bin) };
    // The value of rank floor(q·(total − 1)), as `Summary::quantile` defines it.
    let quantile = |q: f64| {
        if total == 0 {
            return None;
        }
        let rank = (q * (total - 1) as f64).floor() as u64;
        let mut seen = 0;
        for (bin, c) in &sorted {
            seen += c;
            if seen > rank {
                return Some(value(*bin));
            }
        }
        sorted.last().map(|(bin, _)| value(*bin))
    };
    let (min, max) = (quantile(0.0), quantile(1.0));
    let (q01, q25, q50, q75, q99) = (quantile(0.01), quantile(0.25), quantile(0.5), quantile(0.75), quantile(0.99));
    let pairs: [(&'static str, Option<f64>); 13] = [
        ("count", Some(count as f64)),
        ("mean", (count > 0).then_some(mean)),
        ("median", q50),
        ("std", std),
        ("range", max.zip(min).map(|(a, b)| a - b)),
        ("q25", q25),
        ("q50", q50),
        ("q75", q75),
        ("iqr", q75.zip(q25).map(|(a, b)| a - b)),
        ("min", min),
        ("max", max),
        ("q01", q01),
        ("q99", q99),
    ];
    pairs.into_iter().filter_map(|(name, v)| v.filter(|v| v.is_finite()).map(|v| (name, v))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The aggregate of `(prediction, label)` rows, through the fields as a store keeps them.
    fn aggregate_of(rows: &[(f64, f64)]) -> RegressionAggregate {
        let mut fields: BTreeMap<String, f64> = BTreeMap::new();
        for (prediction, label) in rows {
            let (ints, floats) = label_delta(*prediction, *label);
            for (field, n) in ints {
                *fields.entry(field).or_insert(0.0) += n as f64;
            }
            for (field, x) in floats {
                *fields.entry(field.to_string()).or_insert(0.0) += x;
            }
        }
        let mut a = RegressionAggregate::default();
        for (field, v) in &fields {
            let text = if field.starts_with("r:eb:")
                || field.starts_with("r:lb:")
                || field == F_COUNT
                || field == F_ZERO_LABELS
            {
                format!("{}", *v as u64)
            } else {
                format!("{v:?}")
            };
            assert!(a.parse_field(field, &text), "{field}");
        }
        a
    }

    fn metrics(rows: &[(f64, f64)]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        aggregate_of(rows).samples(|s| {
            let stat = s.dims().first().map(|(_, v)| format!(":{v}")).unwrap_or_default();
            out.insert(format!("{}{stat}", s.metric.name), s.value);
        });
        out
    }

    #[test]
    fn hand_computed_errors() {
        // Errors: +1, −2, +3, −4 (predictions 3, 2, 9, 4 against labels 2, 4, 6, 8).
        let m = metrics(&[(3.0, 2.0), (2.0, 4.0), (9.0, 6.0), (4.0, 8.0)]);
        assert_eq!(m["mae"], 2.5);
        assert_eq!(m["rmse"], 7.5f64.sqrt());
        assert_eq!(m["error_mean"], -0.5);
        // Labels: mean 5, SST = 4²·... = 9 + 1 + 1 + 9 = 20; SSE = 30.
        assert_eq!(m["r2"], 1.0 - 30.0 / 20.0);
        assert_eq!(m["mape"], (0.5 + 0.5 + 0.5 + 0.5) / 4.0);
        assert_eq!(m["mape_excluded_count"], 0.0);
        assert_eq!(m["label_value:count"], 4.0);
        assert_eq!(m["label_value:mean"], 5.0);
        assert_eq!(m["error_value:mean"], 2.5);
        assert!((m["label_value:max"] - 8.0).abs() <= 8.0 * BIN_RELATIVE_ACCURACY);
        assert!((m["error_value:median"] - 2.0).abs() <= 2.0 * BIN_RELATIVE_ACCURACY);
    }

    #[test]
    fn zero_labels_are_left_out_of_mape_and_counted_and_equal_labels_have_no_r2() {
        let m = metrics(&[(1.0, 0.0), (3.0, 2.0)]);
        assert_eq!(m["mape"], 0.5);
        assert_eq!(m["mape_excluded_count"], 1.0);
        let m = metrics(&[(1.0, 0.0), (3.0, 0.0)]);
        assert!(!m.contains_key("mape") && !m.contains_key("r2"));
        assert_eq!(m["mape_excluded_count"], 2.0);
        assert!(metrics(&[]).is_empty());
    }

    #[test]
    fn negative_labels_are_ordered_below_zero_and_positive_ones() {
        let m = metrics(&[(0.0, -10.0), (0.0, 0.0), (0.0, 5.0)]);
        assert!((m["label_value:min"] + 10.0).abs() <= 10.0 * BIN_RELATIVE_ACCURACY);
        assert_eq!(m["label_value:median"], 0.0);
        assert!((m["label_value:max"] - 5.0).abs() <= 5.0 * BIN_RELATIVE_ACCURACY);
    }

    proptest::proptest! {
        #[test]
        fn the_metrics_match_their_definitions(
            rows in proptest::collection::vec((-1000i32..1000, -1000i32..1000), 1..80)
        ) {
            let rows: Vec<(f64, f64)> = rows.into_iter().map(|(p, y)| (f64::from(p) / 8.0, f64::from(y) / 8.0)).collect();
            let m = metrics(&rows);
            let n = rows.len() as f64;
            let errors: Vec<f64> = rows.iter().map(|(p, y)| p - y).collect();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * (1.0 + b.abs());
            proptest::prop_assert!(close(m["mae"], errors.iter().map(|e| e.abs()).sum::<f64>() / n));
            proptest::prop_assert!(close(m["rmse"], (errors.iter().map(|e| e * e).sum::<f64>() / n).sqrt()));
            proptest::prop_assert!(close(m["error_mean"], errors.iter().sum::<f64>() / n));
            let mean = rows.iter().map(|(_, y)| y).sum::<f64>() / n;
            let sst: f64 = rows.iter().map(|(_, y)| (y - mean).powi(2)).sum();
            let sse: f64 = errors.iter().map(|e| e * e).sum();
            match m.get("r2") {
                Some(r2) => proptest::prop_assert!((r2 - (1.0 - sse / sst)).abs() <= 1e-6 * (1.0 + (sse / sst).abs())),
                None => proptest::prop_assert!(rows.len() < 2 || sst == 0.0),
            }
            let nonzero: Vec<&(f64, f64)> = rows.iter().filter(|(_, y)| *y != 0.0).collect();
            proptest::prop_assert_eq!(m["mape_excluded_count"], (rows.len() - nonzero.len()) as f64);
            if !nonzero.is_empty() {
                let mape = nonzero.iter().map(|(p, y)| ((p - y) / y).abs()).sum::<f64>() / nonzero.len() as f64;
                proptest::prop_assert!(close(m["mape"], mape));
            }
            // Quantiles of |error| lie within the bins' accuracy of the exact ones.
            let mut sorted: Vec<f64> = errors.iter().map(|e| e.abs()).collect();
            sorted.sort_by(f64::total_cmp);
            let exact = sorted[((0.5 * (sorted.len() - 1) as f64).floor()) as usize];
            let tolerance = exact * BIN_RELATIVE_ACCURACY + ZERO_BELOW;
            proptest::prop_assert!((m["error_value:median"] - exact).abs() <= tolerance * 1.000001);
        }
    }
}
