//! Bounded, mergeable statistics of one series of values: exact count, mean and
//! standard deviation (Welford, merged with Chan's parallel formula), exact min and
//! max, quantiles from a DDSketch (`ddsketchy`, with Datadog's cubically interpolated
//! index mapping), and category counts with a HyperLogLog fallback.
//!
//! Nothing here grows with the number of values: a `Summary` is a few words plus a
//! sketch of at most `MAX_SKETCH_BINS` bins per sign, and `CategoryCounts` counts at
//! most its configured number of categories exactly.

use crate::monitor::merge::Merge;
use ddsketchy::{DDSketch, IndexMapping};
use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// Bins per sign of every quantile sketch. With the default 1 % relative accuracy
/// (bins of width ≈ 0.0198 in ln v under the cubic mapping) they span 40 orders
/// of e (about 17 decades) before the lowest bins collapse; documented in
/// docs/metrics.md.
pub const MAX_SKETCH_BINS: usize = 2048;
/// The sketches' accuracy when the configured one is unusable (config validation
/// keeps it in (0, 1), so this only guards programming errors).
const FALLBACK_ACCURACY: f64 = 0.01;
/// HyperLogLog++ precision: 2^12 registers, standard error 1.04/sqrt(4096) ≈ 1.6 %.
pub const HLL_PRECISION: u8 = 12;

/// The `stat` values of `feature_value`, `max_prediction_proba`,
/// `spread12_prediction_proba` and `prediction_entropy`, in emission order.
pub const STATS: [&str; 12] =
    ["mean", "median", "std", "range", "q25", "q50", "q75", "iqr", "min", "max", "q01", "q99"];

/// Exact moments and extremes plus a quantile sketch of a series of finite values.
#[derive(Clone, Serialize, Deserialize)]
#[serde(from = "SummaryWire", into = "SummaryWire")]
pub struct Summary {
    /// Values added (finite ones only: callers count the rest as missing).
    count: u64,
    /// Running mean (Welford).
    mean: f64,
    /// Sum of squared deviations from the mean (Welford's M2).
    m2: f64,
    /// Exact smallest value.
    min: f64,
    /// Exact largest value.
    max: f64,
    /// Quantiles with relative accuracy alpha; merged across buckets for references.
    /// Holds every value but those still gathered in `pending`.
    sketch: DDSketch,
    /// Values of `add_slice` counted by their bin of `sketch`, not yet in it (see
    /// `PendingBins`); every reader sees the sketch with them.
    pending: PendingBins,
}

/// A `Summary` as written to the fleet's store: the extremes of an empty summary
/// (infinities, which JSON cannot carry) are left out.
#[derive(Serialize, Deserialize)]
struct SummaryWire {
    count: u64,
    mean: f64,
    m2: f64,
    min: Option<f64>,
    max: Option<f64>,
    sketch: DDSketch,
}

impl From<Summary> for SummaryWire {
    fn from(mut s: Summary) -> Self {
        s.settle();
        let known = s.count > 0;
        SummaryWire {
            count: s.count,
            mean: s.mean,
            m2: s.m2,
            min: known.then_some(s.min),
            max: known.then_some(s.max),
            sketch: s.sketch,
        }
    }
}

impl From<SummaryWire> for Summary {
    fn from(w: SummaryWire) -> Self {
        Summary {
            count: w.count,
            mean: w.mean,
            m2: w.m2,
            min: w.min.filter(|_| w.count > 0).unwrap_or(f64::INFINITY),
            max: w.max.filter(|_| w.count > 0).unwrap_or(f64::NEG_INFINITY),
            sketch: w.sketch,
            pending: PendingBins::default(),
        }
    }
}

impl Merge for Summary {
    fn merge(&mut self, other: &Self) {
        Summary::merge(self, other);
    }
}

impl std::fmt::Debug for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Summary")
            .field("count", &self.count)
            .field("mean", &self.mean)
            .field("min", &self.min)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Summary {
    /// An empty summary whose quantiles have relative accuracy `alpha`.
    pub fn new(alpha: f64) -> Self {
        Summary {
            count: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sketch: new_sketch(alpha).or_else(|_| new_sketch(FALLBACK_ACCURACY)).unwrap_or_default(),
            pending: PendingBins::default(),
        }
    }

    /// Adds one value; non-finite values are ignored (the caller counts them missing).
    pub fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.count += 1;
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sketch.add(v);
    }

    /// Adds a column of values at once and returns how many were not finite (missing).
    /// The batch's own mean and M2 are computed in two tight passes and merged with
    /// Chan's formula, which is both faster and as exact as adding one by one.
    pub fn add_slice(&mut self, values: &[f64]) -> u64 {
        let mut n = 0u64;
        let mut sum = 0.0;
        let mut min = f64::INFINITY;
        let mut max = f64::NEG_INFINITY;
        // The pending tallies are kept in registers for the batch, not in memory.
        let (mut positive, mut zeros, mut pending_sum) = (0u64, 0u64, 0.0);
        let smallest = self.sketch.min_possible();
        for &v in values {
            if v.is_finite() {
                n += 1;
                sum += v;
                min = min.min(v);
                max = max.max(v);
                if v >= smallest {
                    if self.pending.count(self.sketch.key(v)) {
                        positive += 1;
                        pending_sum += v;
                    } else {
                        self.sketch.add(v);
                    }
                } else if v > -smallest {
                    zeros += 1;
                    pending_sum += v;
                } else {
                    self.sketch.add(v);
                }
            }
        }
        let missing = values.len() as u64 - n;
        if n == 0 {
            return missing;
        }
        self.pending.add_tallies(positive, zeros, pending_sum, min, max);
        let batch_mean = sum / n as f64;
        let mut batch_m2 = 0.0;
        for &v in values {
            if v.is_finite() {
                let d = v - batch_mean;
                batch_m2 += d * d;
            }
        }
        self.merge_moments(n, batch_mean, batch_m2, min, max);
        missing
    }

    fn merge_moments(&mut self, n: u64, mean: f64, m2: f64, min: f64, max: f64) {
        if self.count == 0 {
            self.count = n;
            self.mean = mean;
            self.m2 = m2;
        } else {
            let total = (self.count + n) as f64;
            let delta = mean - self.mean;
            self.mean += delta * n as f64 / total;
            self.m2 += m2 + delta * delta * self.count as f64 * n as f64 / total;
            self.count += n;
        }
        self.min = self.min.min(min);
        self.max = self.max.max(max);
    }

    /// Merges another summary (same accuracy) into this one.
    pub fn merge(&mut self, other: &Summary) {
        if other.count == 0 {
            return;
        }
        self.merge_moments(other.count, other.mean, other.m2, other.min, other.max);
        self.settle();
        // Both sketches come from `Summary::new` with the engine's one alpha; a
        // mismatch would be a programming error, and the moments stay right anyway.
        let _ = self.sketch.merge(&other.sketch);
        if !other.pending.is_empty() {
            let _ = self.sketch.merge(&other.pending.to_sketch(&other.sketch));
        }
    }

    /// Moves the values gathered by `add_slice` into the sketch; reading several
    /// statistics of a settled summary reads the sketch as it is.
    pub fn settle(&mut self) {
        if !self.pending.is_empty() {
            let _ = self.sketch.merge(&self.pending.to_sketch(&self.sketch));
            self.pending.clear();
        }
    }

    /// The sketch of every value added: itself, or a copy with the pending values.
    fn full_sketch(&self) -> Cow<'_, DDSketch> {
        if self.pending.is_empty() {
            return Cow::Borrowed(&self.sketch);
        }
        let mut sketch = self.sketch.clone();
        let _ = sketch.merge(&self.pending.to_sketch(&self.sketch));
        Cow::Owned(sketch)
    }

    /// Values added.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Exact mean, None when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then_some(self.mean)
    }

    /// Exact sample standard deviation (n - 1 in the denominator, as pandas'
    /// `describe` that MLWatcher used); None below two values.
    pub fn std(&self) -> Option<f64> {
        (self.count > 1).then(|| (self.m2.max(0.0) / (self.count - 1) as f64).sqrt())
    }

    /// Exact minimum, None when empty.
    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }

    /// Exact maximum, None when empty.
    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    /// The q-quantile: the value of rank floor(q·(n-1)) in sorted order, within the
    /// sketch's relative accuracy (values below about 1e-308 in magnitude read as 0), clamped to
    /// the exact [min, max]. None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.quantile_of(&self.full_sketch(), q)
    }

    /// `quantile`, read from `full_sketch` (taken once for several quantiles).
    fn quantile_of(&self, sketch: &DDSketch, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        // Ranks 0 and n - 1 are the exact extremes; the sketch would give their bins.
        if q <= 0.0 {
            return Some(self.min);
        }
        if q >= 1.0 {
            return Some(self.max);
        }
        let v = sketch.quantile(q).ok()?;
        Some(v.clamp(self.min, self.max))
    }

    /// The statistics named in `STATS`, in that order, skipping undefined ones.
    pub fn stats(&self) -> Vec<(&'static str, f64)> {
        let mut out = Vec::with_capacity(STATS.len());
        if self.count == 0 {
            return out;
        }
        let sketch = self.full_sketch();
        let quantile = |q| self.quantile_of(&sketch, q);
        let (q01, q25, q50, q75, q99) = (quantile(0.01), quantile(0.25), quantile(0.5), quantile(0.75), quantile(0.99));
        let pairs: [(&'static str, Option<f64>); 12] = [
            ("mean", self.mean()),
            ("median", q50),
            ("std", self.std()),
            ("range", Some(self.max - self.min)),
            ("q25", q25),
            ("q50", q50),
            ("q75", q75),
            ("iqr", q75.zip(q25).map(|(a, b)| a - b)),
            ("min", self.min()),
            ("max", self.max()),
            ("q01", q01),
            ("q99", q99),
        ];
        for (name, v) in pairs {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                out.push((name, v));
            }
        }
        out
    }
}

/// A DDSketch with relative accuracy `alpha`. The cubically interpolated mapping
/// (Datadog's `CubicallyInterpolatedMapping`) replaces the `ln` per value by a cubic
/// polynomial of the float's mantissa and narrows the bins to keep the same relative
/// accuracy guarantee; inserts cost about a third less.
fn new_sketch(alpha: f64) -> Result<DDSketch, ddsketchy::DDSketchError> {
    DDSketch::builder(alpha).max_bins(MAX_SKETCH_BINS).mapping(IndexMapping::Cubic).build()
}

/// Keys of the sketch per chunk of `PendingBins`, as the sketch's own stores grow.
const PENDING_CHUNK: usize = 128;

/// Values on their way into a `Summary`'s sketch, counted per bin of it.
///
/// A DDSketch insert maps the value to its bin (the key: a cubic approximation of ln v
/// scaled by the bin width) and counts it in its store, with range checks, its own
/// extremes and sum, behind a call. The output statistics insert three values per
/// prediction row of every exchange, which made that a fifth of the aggregation
/// thread's time. Here a positive value's key comes from the sketch's own mapping
/// (`DDSketch::key`, inlined), and it is counted in a plain array over a window of keys;
/// values in the sketch's zero bin are counted apart. The counts reach the sketch as a
/// second sketch with exactly those bins (`to_sketch`), merged with the sketch's own
/// merge, when the summary is read, merged or written. So every value ends in the
/// bin `DDSketch::add` would have put it in, and quantiles are those of the sketch
/// (when the keys span more than the sketch's `MAX_SKETCH_BINS` and its lowest bins
/// collapse, they collapse at the merge instead, as the sketch's merge does).
/// Negative values and keys beyond a window of `MAX_SKETCH_BINS` go to the sketch
/// directly.
#[derive(Debug, Clone)]
struct PendingBins {
    /// The key of `counts[0]`.
    first_key: i32,
    /// Values per key from `first_key`; empty until the first positive value. Its
    /// length is a multiple of `PENDING_CHUNK`, at most `MAX_SKETCH_BINS`.
    counts: Vec<u64>,
    /// Values in `counts`.
    positive: u64,
    /// Values whose magnitude is below the sketch's smallest indexable value (its
    /// zero bin).
    zeros: u64,
    /// Sum, smallest and largest of the pending values, which the sketch keeps too
    /// (the extremes may include values of the same batches that went to it directly).
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for PendingBins {
    fn default() -> Self {
        PendingBins {
            first_key: 0,
            counts: Vec::new(),
            positive: 0,
            zeros: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl PendingBins {
    fn is_empty(&self) -> bool {
        self.positive == 0 && self.zeros == 0
    }

    /// Counts a value of the sketch's bin `key` (a positive value's); false when the
    /// window cannot reach it (the value must go to the sketch itself). The caller
    /// tallies what was counted (`add_tallies`).
    #[inline]
    fn count(&mut self, key: i32) -> bool {
        let at = i64::from(key) - i64::from(self.first_key);
        let slot = match usize::try_from(at) {
            Ok(at) if at < self.counts.len() => at,
            _ => match self.widen(key) {
                Some(at) => at,
                None => return false,
            },
        };
        match self.counts.get_mut(slot) {
            Some(count) => {
                *count += 1;
                true
            }
            None => false,
        }
    }

    /// Adds a batch's tallies: values counted by key, values of the zero bin, their
    /// sum, and the batch's extremes.
    fn add_tallies(&mut self, positive: u64, zeros: u64, sum: f64, min: f64, max: f64) {
        self.positive += positive;
        self.zeros += zeros;
        self.sum += sum;
        if positive + zeros > 0 {
            self.min = self.min.min(min);
            self.max = self.max.max(max);
        }
    }

    /// Grows the window to hold `key` if it then spans at most `MAX_SKETCH_BINS`
    /// keys; returns the key's slot.
    #[cold]
    fn widen(&mut self, key: i32) -> Option<usize> {
        let (first, last) = match self.counts.len() {
            0 => (i64::from(key), i64::from(key)),
            len => {
                let first = i64::from(self.first_key);
                (first.min(i64::from(key)), (first + len as i64 - 1).max(i64::from(key)))
            }
        };
        let len = usize::try_from(last - first + 1).ok()?.div_ceil(PENDING_CHUNK) * PENDING_CHUNK;
        if len > MAX_SKETCH_BINS {
            return None;
        }
        // Room is left on the side the window grew toward.
        let new_first = if self.counts.is_empty() || i64::from(key) < i64::from(self.first_key) {
            last - len as i64 + 1
        } else {
            first
        };
        let new_first = i32::try_from(new_first).ok()?;
        let mut counts = vec![0; len];
        if !self.counts.is_empty() {
            let shift = usize::try_from(i64::from(self.first_key) - i64::from(new_first)).ok()?;
            counts[shift..shift + self.counts.len()].copy_from_slice(&self.counts);
        }
        self.first_key = new_first;
        self.counts = counts;
        usize::try_from(i64::from(key) - i64::from(new_first)).ok()
    }

    /// Forgets the pending values (they went into the sketch); keeps the window.
    fn clear(&mut self) {
        self.counts.fill(0);
        self.positive = 0;
        self.zeros = 0;
        self.sum = 0.0;
        self.min = f64::INFINITY;
        self.max = f64::NEG_INFINITY;
    }

    /// A sketch like `like` (same mapping and accuracy) holding exactly the pending
    /// values' bins.
    fn to_sketch(&self, like: &DDSketch) -> DDSketch {
        // `like`'s accuracy and mapping without copying its bins; a sketch of another
        // mapping would not merge (its values would be lost), so that one is copied.
        let empty = match new_sketch(like.alpha()) {
            Ok(empty) if empty.mapping() == like.mapping() => empty,
            _ => {
                let mut empty = like.clone();
                empty.clear();
                empty
            }
        };
        match self.sketch_by_parts(&empty) {
            Some(sketch) => sketch,
            None => self.sketch_by_adding(empty),
        }
    }

    /// The sketch built from its serialized parts: its positive store is the array of
    /// populated bins with the keys of its first (lowest) and last (highest) bin.
    fn sketch_by_parts(&self, empty: &DDSketch) -> Option<DDSketch> {
        let mut parts = serde_json::to_value(empty).ok()?;
        let populated = self.counts.iter().position(|c| *c > 0);
        if let Some(lowest) = populated {
            let highest = self.counts.iter().rposition(|c| *c > 0)?;
            let key_at = |slot: usize| i64::from(self.first_key) + slot as i64;
            // Only the populated bins: the window is mostly empty, and its bins are
            // copied twice on the way (to JSON values and back).
            parts["positive_store"] = serde_json::json!({
                "bins": &self.counts[lowest..=highest],
                "count": self.positive,
                "min_key": key_at(lowest),
                "max_key": key_at(highest),
                "offset": key_at(lowest),
                "bin_limit": MAX_SKETCH_BINS,
                "is_collapsed": false,
            });
        }
        parts["zero_count"] = self.zeros.into();
        parts["sum"] = self.sum.into();
        parts["min"] = self.min.into();
        parts["max"] = self.max.into();
        let sketch: DDSketch = serde_json::from_value(parts).ok()?;
        // The parts are only trusted when the sketch reads them as meant.
        (sketch.count() == self.positive + self.zeros && sketch.get_zero_count() == self.zeros).then_some(sketch)
    }

    /// The same sketch by adding each bin's representative value as often as it was
    /// counted: slower, for a `ddsketchy` whose serialized parts differ.
    fn sketch_by_adding(&self, mut sketch: DDSketch) -> DDSketch {
        for (slot, count) in self.counts.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let key = self.first_key.saturating_add(i32::try_from(slot).unwrap_or(i32::MAX));
            let value = sketch.value(key);
            for _ in 0..*count {
                sketch.add(value);
            }
        }
        for _ in 0..self.zeros {
            sketch.add(0.0);
        }
        sketch
    }
}

/// A small, fast, non-cryptographic hasher (FxHash's multiply-rotate) for maps keyed
/// by category values, which are hashed once per row on the aggregation path.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(FX_SEED);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// `HashMap` with `FastHasher`.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// The hash of the distinct-value estimators: the same on every replica (std's
/// SipHash with its fixed default keys), so that HyperLogLog registers written by
/// several processes of one build merge into the estimate of their union.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct StableHash;

impl BuildHasher for StableHash {
    type Hasher = std::hash::DefaultHasher;

    fn build_hasher(&self) -> Self::Hasher {
        std::hash::DefaultHasher::new()
    }
}

type Hll = HyperLogLogPlus<String, StableHash>;
type IntegerHll = HyperLogLogPlus<i64, StableHash>;

/// Exact counts of up to `max_categories` categories; further categories are counted
/// together (`untracked`) and, from the moment the table is full, distinct values are
/// estimated with HyperLogLog++ (seeded with every tracked category, so the estimate
/// covers all values).
#[derive(Clone, Serialize, Deserialize)]
pub struct CategoryCounts {
    /// Count per tracked category.
    counts: FastMap<String, u64>,
    /// Values of categories that did not fit in the table.
    untracked: u64,
    /// Most categories tracked exactly.
    max_categories: usize,
    /// Distinct estimator, created when the table first overflows.
    hll: Option<Box<Hll>>,
}

impl std::fmt::Debug for CategoryCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CategoryCounts")
            .field("tracked", &self.counts.len())
            .field("untracked", &self.untracked)
            .finish_non_exhaustive()
    }
}

impl CategoryCounts {
    pub fn new(max_categories: usize) -> Self {
        CategoryCounts { counts: FastMap::default(), untracked: 0, max_categories, hll: None }
    }

    /// Counts one value.
    pub fn add(&mut self, value: &str) {
        if let Some(c) = self.counts.get_mut(value) {
            *c += 1;
            return;
        }
        if self.counts.len() < self.max_categories {
            self.counts.insert(value.to_string(), 1);
            return;
        }
        self.untracked += 1;
        if self.hll.is_none() {
            self.start_estimating();
        }
        if let Some(hll) = &mut self.hll {
            hll.insert_any(value);
        }
    }

    /// Creates the distinct estimator, seeded with every tracked category.
    fn start_estimating(&mut self) {
        // Precision 12 is within HyperLogLog++'s 4..=18, so creation succeeds.
        if let Ok(mut hll) = Hll::new(HLL_PRECISION, StableHash) {
            for key in self.counts.keys() {
                hll.insert_any(key.as_str());
            }
            self.hll = Some(Box::new(hll));
        }
    }

    /// Values counted (tracked and untracked).
    pub fn total(&self) -> u64 {
        self.counts.values().sum::<u64>() + self.untracked
    }

    /// Values whose category was not tracked because the table was full.
    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    /// Distinct categories: exact while the table has room, else HyperLogLog++.
    pub fn distinct(&mut self) -> f64 {
        match &mut self.hll {
            Some(hll) => hll.count().max(self.counts.len() as f64),
            None => self.counts.len() as f64,
        }
    }

    /// The count of a tracked category.
    pub fn get(&self, category: &str) -> Option<u64> {
        self.counts.get(category).copied()
    }

    /// Tracked categories and their counts.
    pub fn counts(&self) -> impl Iterator<Item = (&str, u64)> {
        self.counts.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// The `k` most frequent categories (ties by name), and the count of all others.
    pub fn top_k(&self, k: usize) -> (Vec<(&str, u64)>, u64) {
        let mut all: Vec<(&str, u64)> = self.counts().collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let rest: u64 = all.iter().skip(k).map(|(_, c)| *c).sum::<u64>() + self.untracked;
        all.truncate(k);
        (all, rest)
    }
}

/// Exact counts of an integer feature's values while they are few (for top-k
/// frequencies), then exact distinct counting up to `max_categories`, then
/// HyperLogLog++.
#[derive(Clone, Serialize, Deserialize)]
pub struct IntegerCounts {
    /// Count per value, dropped once distinct values exceed `max_categories`.
    counts: Option<FastMap<i64, u64>>,
    /// Most distinct values counted exactly.
    max_categories: usize,
    /// Distinct estimator once `counts` is dropped.
    hll: Option<Box<IntegerHll>>,
}

impl std::fmt::Debug for IntegerCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntegerCounts").field("exact", &self.counts.as_ref().map(|c| c.len())).finish_non_exhaustive()
    }
}

impl IntegerCounts {
    pub fn new(max_categories: usize) -> Self {
        IntegerCounts { counts: Some(FastMap::default()), max_categories, hll: None }
    }

    /// Counts the finite values of a column.
    pub fn add_slice(&mut self, values: &[f64]) {
        for &v in values {
            if v.is_finite() {
                self.add(v as i64);
            }
        }
    }

    fn add(&mut self, v: i64) {
        self.add_count(v, 1);
    }

    /// Counts `n` occurrences of `v` (n ≥ 1).
    fn add_count(&mut self, v: i64, n: u64) {
        if let Some(counts) = &mut self.counts {
            if let Some(c) = counts.get_mut(&v) {
                *c += n;
                return;
            }
            if counts.len() < self.max_categories {
                counts.insert(v, n);
                return;
            }
            self.start_estimating();
        }
        if let Some(hll) = &mut self.hll {
            hll.insert(&v);
        }
    }

    /// Drops the exact counts for a distinct estimator seeded with their values.
    fn start_estimating(&mut self) {
        let Some(counts) = self.counts.take() else { return };
        if let Ok(mut hll) = IntegerHll::new(HLL_PRECISION, StableHash) {
            for key in counts.keys() {
                hll.insert(key);
            }
            self.hll = Some(Box::new(hll));
        }
    }

    /// Distinct values: exact up to `max_categories`, then estimated.
    pub fn distinct(&mut self) -> f64 {
        match (&self.counts, &mut self.hll) {
            (Some(counts), _) => counts.len() as f64,
            (None, Some(hll)) => hll.count(),
            (None, None) => 0.0,
        }
    }

    /// The counts per value when there are at most `max_distinct` distinct values.
    pub fn few(&self, max_distinct: usize) -> Option<Vec<(i64, u64)>> {
        let counts = self.counts.as_ref()?;
        if counts.len() > max_distinct {
            return None;
        }
        let mut all: Vec<(i64, u64)> = counts.iter().map(|(k, v)| (*k, *v)).collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Some(all)
    }
}

impl Merge for CategoryCounts {
    /// Tracked categories of both add up while the table has room; the others count as
    /// untracked, and the distinct estimate covers the union of both sides' values.
    fn merge(&mut self, other: &Self) {
        for (category, count) in &other.counts {
            if let Some(c) = self.counts.get_mut(category) {
                *c += count;
            } else if self.counts.len() < self.max_categories {
                self.counts.insert(category.clone(), *count);
            } else {
                self.untracked += count;
                if self.hll.is_none() {
                    self.start_estimating();
                }
                if let Some(hll) = &mut self.hll {
                    hll.insert_any(category.as_str());
                }
            }
        }
        self.untracked += other.untracked;
        if let Some(theirs) = &other.hll {
            if self.hll.is_none() {
                self.start_estimating();
            }
            if let Some(hll) = &mut self.hll {
                // Same precision on both sides (HLL_PRECISION), so merging succeeds.
                let _ = hll.merge(theirs.as_ref());
                for key in self.counts.keys() {
                    hll.insert_any(key.as_str());
                }
            }
        }
    }
}

impl Merge for IntegerCounts {
    fn merge(&mut self, other: &Self) {
        if let Some(counts) = &other.counts {
            for (value, count) in counts {
                self.add_count(*value, *count);
            }
        }
        if let Some(theirs) = &other.hll {
            self.start_estimating();
            if let Some(hll) = &mut self.hll {
                let _ = hll.merge(theirs.as_ref());
            }
        }
    }
}

/// A uniform sample of at most `capacity` values of a series (Vitter's algorithm R
/// with a xorshift generator), from which a reference's bins and frequencies are
/// computed.
#[derive(Debug, Clone)]
pub struct Reservoir {
    /// Values offered so far.
    seen: u64,
    /// The sample.
    values: Vec<f64>,
    /// Most values kept.
    capacity: usize,
    /// xorshift64 state; deterministic so that tests and restarts are reproducible.
    state: u64,
}

impl Reservoir {
    pub fn new(capacity: usize) -> Self {
        Reservoir { seen: 0, values: Vec::new(), capacity: capacity.max(1), state: 0x9E37_79B9_7F4A_7C15 }
    }

    /// Offers the finite values of a column.
    pub fn add_slice(&mut self, values: &[f64]) {
        for &v in values {
            if !v.is_finite() {
                continue;
            }
            self.seen += 1;
            if self.values.len() < self.capacity {
                self.values.push(v);
                continue;
            }
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let j = self.state % self.seen;
            if (j as usize) < self.capacity {
                self.values[j as usize] = v;
            }
        }
    }

    /// The sample, in no particular order.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Values offered.
    pub fn seen(&self) -> u64 {
        self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_zero_and_positive_values_have_accurate_quantiles() {
        let mut s = Summary::new(0.01);
        let values: Vec<f64> = (-50..=50).map(|i| i as f64).collect();
        s.add_slice(&values);
        assert_eq!(s.quantile(0.0), Some(-50.0));
        assert_eq!(s.quantile(0.5), Some(0.0));
        let q25 = s.quantile(0.25).unwrap();
        assert!((q25 - -25.0).abs() <= 0.25 + 1e-9, "{q25}");
        let q90 = s.quantile(0.9).unwrap();
        assert!((q90 - 40.0).abs() <= 0.4 + 1e-9, "{q90}");
        assert_eq!(s.quantile(1.0), Some(50.0));
    }

    /// Values of many magnitudes and both signs, zeros and a value in the zero bin.
    fn mixed_values(n: usize) -> Vec<f64> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                match i % 7 {
                    0 => 0.0,
                    1 => -u * 50.0,
                    2 => 1e-310,
                    3 => u * 1e-6,
                    _ => u,
                }
            })
            .collect()
    }

    fn quantiles(sketch: &DDSketch) -> Vec<f64> {
        (0..=2000).map(|i| sketch.quantile(f64::from(i) / 2000.0).unwrap()).collect()
    }

    #[test]
    fn values_added_in_batches_land_in_the_bins_of_single_inserts() {
        let values = mixed_values(5_000);
        let mut one_by_one = new_sketch(0.01).unwrap();
        let mut summary = Summary::new(0.01);
        for chunk in values.chunks(64) {
            for v in chunk {
                one_by_one.add(*v);
            }
            summary.add_slice(chunk);
        }
        assert!(!summary.pending.is_empty(), "the batches were not gathered");
        let full = summary.full_sketch().into_owned();
        assert_eq!(full.count(), one_by_one.count());
        assert_eq!(full.get_zero_count(), one_by_one.get_zero_count());
        assert_eq!(quantiles(&full), quantiles(&one_by_one));
        assert_eq!(full.positive_store_count(), one_by_one.positive_store_count());
        assert_eq!(full.negative_store_count(), one_by_one.negative_store_count());
        // Reading settles nothing; settling changes no quantile.
        let before: Vec<Option<f64>> = (1..100).map(|i| summary.quantile(f64::from(i) / 100.0)).collect();
        summary.settle();
        assert!(summary.pending.is_empty());
        let after: Vec<Option<f64>> = (1..100).map(|i| summary.quantile(f64::from(i) / 100.0)).collect();
        assert_eq!(before, after);
        assert_eq!(quantiles(&summary.sketch), quantiles(&one_by_one));
    }

    #[test]
    fn keys_beyond_the_window_go_to_the_sketch_and_quantiles_stay_accurate() {
        // 1e-30 .. 1e30 spans more keys than a window (or the sketch) holds: the lowest
        // bins collapse (the sketch keeps about 17 decades), as they do with single
        // inserts, and the quantiles in the upper 17 decades stay within its accuracy.
        let values: Vec<f64> = (0..4_000).map(|i| 10f64.powf(f64::from(i % 61) - 30.0) * 1.5).collect();
        let mut summary = Summary::new(0.01);
        let mut one_by_one = new_sketch(0.01).unwrap();
        for chunk in values.chunks(50) {
            summary.add_slice(chunk);
            chunk.iter().for_each(|v| one_by_one.add(*v));
        }
        assert_eq!(summary.full_sketch().count(), 4_000);
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        for q in [0.75, 0.9, 0.99] {
            let exact = sorted[(q * (sorted.len() - 1) as f64) as usize];
            let estimate = summary.quantile(q).unwrap();
            let single = one_by_one.quantile(q).unwrap();
            assert!((single - exact).abs() <= 0.01 * exact, "single inserts q{q}: {single} vs {exact}");
            assert!((estimate - exact).abs() <= 0.01 * exact, "q{q}: {estimate} vs {exact}");
        }
    }

    #[test]
    fn pending_bins_become_a_sketch_from_its_parts_not_by_adding() {
        let mut summary = Summary::new(0.01);
        let values = mixed_values(1_000);
        summary.add_slice(&values);
        // Every value but the negative ones waits in the bins.
        let not_negative = values.iter().filter(|v| **v >= 0.0).count() as u64;
        assert_eq!(summary.pending.positive + summary.pending.zeros, not_negative);
        let empty = {
            let mut e = summary.sketch.clone();
            e.clear();
            e
        };
        // A `ddsketchy` whose serialized form changed would fall back to adding, which
        // is right but slow: this test says so.
        let by_parts = summary.pending.sketch_by_parts(&empty).expect("the sketch's parts changed");
        let by_adding = summary.pending.sketch_by_adding(empty);
        assert_eq!(by_parts.count(), summary.pending.positive + summary.pending.zeros);
        assert_eq!(quantiles(&by_parts), quantiles(&by_adding));
        assert_eq!(by_parts.positive_store_count(), by_adding.positive_store_count());
    }

    #[test]
    fn merged_and_written_summaries_keep_their_pending_values() {
        let values = mixed_values(3_000);
        let (left, right) = values.split_at(1_700);
        let mut all = Summary::new(0.01);
        all.add_slice(&values);
        let mut merged = Summary::new(0.01);
        merged.add_slice(left);
        let mut other = Summary::new(0.01);
        other.add_slice(right);
        merged.merge(&other);
        let written: Summary = serde_json::from_str(&serde_json::to_string(&other).unwrap()).unwrap();
        assert!(written.pending.is_empty());
        assert_eq!(quantiles(&written.sketch), quantiles(&other.full_sketch()));
        assert_eq!(merged.count(), 3_000);
        assert_eq!(quantiles(&merged.full_sketch()), quantiles(&all.full_sketch()));
        assert_eq!(merged.stats().len(), STATS.len());
        let pick = |s: &Summary| s.stats().into_iter().filter(|(n, _)| n.starts_with('q')).collect::<Vec<_>>();
        assert_eq!(pick(&merged), pick(&all));
    }

    #[test]
    fn not_finite_values_are_missing_not_zero() {
        let mut s = Summary::new(0.01);
        let missing = s.add_slice(&[1.0, f64::NAN, 3.0, f64::INFINITY]);
        assert_eq!(missing, 2);
        assert_eq!(s.count(), 2);
        assert_eq!(s.mean(), Some(2.0));
        // The sketch alone would have put NaN among the zeros.
        assert!(s.quantile(0.0).unwrap() >= 1.0);
    }

    #[test]
    fn category_table_overflow_goes_to_other_and_keeps_distinct_estimate() {
        let mut c = CategoryCounts::new(3);
        for v in ["a", "b", "a", "c", "d", "e", "a"] {
            c.add(v);
        }
        assert_eq!(c.total(), 7);
        assert_eq!(c.untracked(), 2);
        let (top, rest) = c.top_k(1);
        assert_eq!(top, vec![("a", 3)]);
        assert_eq!(rest, 4);
        assert!((c.distinct() - 5.0).abs() < 0.5);
        assert_eq!(c.counts().count(), 3);
    }

    #[test]
    fn integer_counts_report_few_values_and_then_only_distinct() {
        let mut c = IntegerCounts::new(5);
        c.add_slice(&[1.0, 2.0, 2.0, f64::NAN]);
        assert_eq!(c.few(20), Some(vec![(2, 2), (1, 1)]));
        c.add_slice(&[3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(c.few(20), None);
        assert!((c.distinct() - 7.0).abs() < 0.5);
    }
}
