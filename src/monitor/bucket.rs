//! The open bucket of one stream (model, version, signature): what its observations
//! add up to, and the points it becomes when it closes.
//!
//! A bucket only aggregates; deciding when it opens and closes, which reference it
//! compares to and where late observations go is the engine's job.

use crate::catalog::{self, Sample, ScopeValues};
use crate::monitor::drift;
use crate::monitor::entropy;
use crate::monitor::estimate::ExpectedConfusion;
use crate::monitor::merge::Merge;
use crate::monitor::reference::{Reference, ReferenceBuilder, OTHER_CATEGORY};
use crate::monitor::regression::PredictionStats;
use crate::monitor::stats::{CategoryCounts, FastMap, IntegerCounts, Summary};
use crate::monitor::MonitorConfig;
use crate::sinks::Point;
use crate::tfserving::{FeatureValues, Observation, Probabilities, StreamKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Statistics of the predicted classes and probabilities of a bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassStats {
    /// Class names by index; fixed by the stream's first probabilities.
    pub names: Vec<String>,
    /// Predicted counts and the sums CBPE needs (also the class distribution).
    pub confusion: ExpectedConfusion,
    /// Each row's top probability.
    pub max_proba: Summary,
    /// Each row's top-1 minus top-2 probability.
    pub spread12: Summary,
    /// Each row's entropy of its probabilities, in nats.
    pub entropy: Summary,
}

/// Statistics of one numeric feature in a bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NumericStats {
    /// Moments, extremes and quantiles of the finite values.
    pub summary: Summary,
    /// Value counts of integer features (top-k while few, distinct estimate).
    pub integers: Option<IntegerCounts>,
    /// Counts per reference bin; present only when the reference was frozen before
    /// the feature's first value in this bucket, so that drift covers every value.
    pub bins: Option<Vec<u64>>,
}

/// Statistics of one feature in a bucket.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FeatureStats {
    /// Missing values: NaN and infinities, null, and rows of observations without the feature.
    pub missing: u64,
    /// Present when the feature had numeric values.
    pub numeric: Option<NumericStats>,
    /// Present when the feature had categorical values (or is declared categorical).
    pub categorical: Option<CategoryCounts>,
    /// Sequence number of the last observation that had the feature, to count the
    /// rows of observations without it as missing; meaningless once the bucket closed.
    #[serde(skip)]
    pub last_observation: u64,
}

/// The open bucket of one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamBucket {
    /// Bucket start, epoch seconds.
    pub start: i64,
    /// Rows observed (`buffer_count`).
    pub rows: u64,
    /// Present once an observation had probabilities.
    pub classes: Option<ClassStats>,
    /// Present once an observation had regression predictions.
    pub regression: Option<PredictionStats>,
    /// Per feature, by name.
    pub features: FastMap<String, FeatureStats>,
    /// Values of feature columns ignored because the stream had `max_features` features.
    pub feature_limit_dropped: u64,
    /// Observations whose probabilities did not match the stream's class count.
    pub class_count_mismatch: u64,
    /// Observations seen, and those whose inputs were sampled for feature statistics
    /// (`sampled_fraction`), with the rows of the latter (features are missing per
    /// sampled row).
    pub sampling: Sampling,
}

/// How much of a bucket's traffic its feature statistics were computed from.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Sampling {
    pub observations: u64,
    pub sampled_observations: u64,
    pub sampled_rows: u64,
}

/// What a bucket needs to know about its stream to become points.
pub struct EmitContext<'a> {
    /// Every feature the stream tracks, in name order; those absent from the bucket
    /// had all their rows missing.
    pub known_features: &'a BTreeSet<String>,
    /// The stream's class names, for the zero counts of an empty bucket.
    pub class_names: Option<&'a Vec<String>>,
    /// The frozen reference, for drift.
    pub reference: Option<&'a Reference>,
    /// Rows that arrived for an already closed bucket of the stream since the last close.
    pub late_dropped: u64,
    pub config: &'a MonitorConfig,
}

/// What a bucket needs to know about its stream while observing.
pub struct StreamContext<'a> {
    pub config: &'a MonitorConfig,
    /// Features the stream tracks; grows up to `max_features`.
    pub known_features: &'a mut BTreeSet<String>,
    /// Features of this model declared categorical in the config.
    pub categorical_features: &'a BTreeSet<String>,
    /// The frozen reference, when there is one.
    pub reference: Option<&'a Reference>,
    /// The reference being learned, when this bucket is in its window.
    pub builder: Option<&'a mut ReferenceBuilder>,
    /// Class names of the stream, fixed at its first probabilities.
    pub class_names: &'a mut Option<Vec<String>>,
    /// Sequence number of the observation, to find features it lacks.
    pub sequence: u64,
    /// False for an observation of a count record: it has outputs but no inputs, so it
    /// counts rows and classes and leaves the features alone.
    pub features_sampled: bool,
    /// Buffers for the per-row output statistics of an observation, kept by the
    /// engine so that observing allocates nothing per exchange.
    pub output_columns: &'a mut OutputColumns,
}

/// The per-row values of one observation's output statistics, gathered before they
/// are added to their summaries a column at a time.
#[derive(Debug, Default)]
pub struct OutputColumns {
    /// Each row's top probability.
    top1: Vec<f64>,
    /// Each row's top-1 minus top-2 probability.
    spread12: Vec<f64>,
    /// Each row's entropy, in nats.
    entropy: Vec<f64>,
}

impl OutputColumns {
    fn clear(&mut self) {
        self.top1.clear();
        self.spread12.clear();
        self.entropy.clear();
    }
}

impl StreamBucket {
    pub fn new(start: i64) -> Self {
        StreamBucket {
            start,
            rows: 0,
            classes: None,
            regression: None,
            features: FastMap::default(),
            feature_limit_dropped: 0,
            class_count_mismatch: 0,
            sampling: Sampling::default(),
        }
    }

    /// Adds one observation.
    pub fn observe(&mut self, obs: &Observation, mut ctx: StreamContext<'_>) {
        let rows = obs.rows as u64;
        self.rows += rows;
        if let Some(b) = ctx.builder.as_deref_mut() {
            b.add_rows(rows);
        }
        self.sampling.observations += 1;
        if ctx.features_sampled {
            self.sampling.sampled_observations += 1;
            self.observe_features(obs, &mut ctx);
        }
        if let Some(p) = &obs.probabilities {
            self.observe_probabilities(p, obs.rows, &mut ctx);
        }
        if let Some(values) = &obs.regression {
            let reference = ctx.reference.and_then(|r| r.prediction.as_ref());
            let alpha = ctx.config.quantile_relative_accuracy;
            self.regression.get_or_insert_with(|| PredictionStats::new(alpha, reference)).add(values, reference);
            if let Some(b) = ctx.builder.as_deref_mut() {
                b.add_prediction_values(values);
            }
        }
    }

    fn observe_features(&mut self, obs: &Observation, ctx: &mut StreamContext<'_>) {
        let rows = obs.rows as u64;
        let rows_before = self.sampling.sampled_rows;
        self.sampling.sampled_rows += rows;
        let alpha = ctx.config.quantile_relative_accuracy;
        for column in &obs.features {
            if column.values.len() != obs.rows {
                // A column that does not have one value per row cannot be attributed to
                // rows; the decoder reports such payloads, and the column counts missing.
                continue;
            }
            if !ctx.known_features.contains(&column.name) {
                if ctx.known_features.len() >= ctx.config.max_features {
                    self.feature_limit_dropped += rows;
                    continue;
                }
                ctx.known_features.insert(column.name.clone());
            }
            let declared_categorical = ctx.categorical_features.contains(&column.name);
            let feature = match self.features.get_mut(column.name.as_str()) {
                Some(f) => f,
                None => self
                    .features
                    .entry(column.name.clone())
                    .or_insert_with(|| FeatureStats { missing: rows_before, ..FeatureStats::default() }),
            };
            feature.last_observation = ctx.sequence;
            match &column.values {
                FeatureValues::Numeric { values, integer } if !declared_categorical => {
                    let numeric = feature.numeric.get_or_insert_with(|| NumericStats {
                        summary: Summary::new(alpha),
                        integers: integer.then(|| IntegerCounts::new(ctx.config.max_categories)),
                        bins: ctx
                            .reference
                            .and_then(|r| r.numeric.get(&column.name))
                            .map(|n| vec![0; drift::bin_count(&n.edges)]),
                    });
                    feature.missing += numeric.summary.add_slice(values);
                    if let Some(ints) = &mut numeric.integers {
                        ints.add_slice(values);
                    }
                    if let (Some(bins), Some(reference)) =
                        (&mut numeric.bins, ctx.reference.and_then(|r| r.numeric.get(&column.name)))
                    {
                        for &v in values {
                            if v.is_finite() {
                                bins[drift::bin_of(&reference.edges, v)] += 1;
                            }
                        }
                    }
                    if let Some(b) = ctx.builder.as_deref_mut() {
                        b.add_numeric(&column.name, values);
                    }
                }
                FeatureValues::Numeric { values, integer } => {
                    let max = ctx.config.max_categories;
                    let counts = feature.categorical.get_or_insert_with(|| CategoryCounts::new(max));
                    let mut text = String::new();
                    for &v in values {
                        if !v.is_finite() {
                            feature.missing += 1;
                            continue;
                        }
                        text.clear();
                        if *integer || v.fract() == 0.0 {
                            text.push_str(&(v as i64).to_string());
                        } else {
                            text.push_str(&v.to_string());
                        }
                        counts.add(&text);
                        if let Some(b) = ctx.builder.as_deref_mut() {
                            b.categorical_mut(&column.name).add(&text);
                        }
                    }
                }
                FeatureValues::Categorical(values) => {
                    let max = ctx.config.max_categories;
                    let counts = feature.categorical.get_or_insert_with(|| CategoryCounts::new(max));
                    for v in values {
                        match v {
                            Some(v) => {
                                counts.add(v);
                                if let Some(b) = ctx.builder.as_deref_mut() {
                                    b.categorical_mut(&column.name).add(v);
                                }
                            }
                            None => feature.missing += 1,
                        }
                    }
                }
            }
        }
        // Features this bucket knows that the observation lacks: all its rows are missing.
        if !self.features.is_empty() {
            for feature in self.features.values_mut() {
                if feature.last_observation != ctx.sequence {
                    feature.missing += rows;
                }
            }
        }
    }

    fn observe_probabilities(&mut self, p: &Probabilities, rows: usize, ctx: &mut StreamContext<'_>) {
        if p.classes < 2 || p.rows() != rows || p.values.len() != rows * p.classes {
            self.class_count_mismatch += 1;
            return;
        }
        let names = ctx.class_names.get_or_insert_with(|| (0..p.classes).map(|c| p.class_name(c)).collect());
        if names.len() != p.classes {
            self.class_count_mismatch += 1;
            return;
        }
        let alpha = ctx.config.quantile_relative_accuracy;
        let classes = self.classes.get_or_insert_with(|| ClassStats {
            names: names.clone(),
            confusion: ExpectedConfusion::new(p.classes),
            max_proba: Summary::new(alpha),
            spread12: Summary::new(alpha),
            entropy: Summary::new(alpha),
        });
        // Per-row values are gathered first and added a column at a time, which lets
        // the summaries merge a batch's moments at once instead of row by row; the
        // columns are the engine's, reused from one observation to the next.
        let columns = &mut *ctx.output_columns;
        columns.clear();
        let threshold = p.threshold.filter(|_| p.classes == 2);
        // One pass over each row finds what every output statistic needs: finiteness,
        // the top two probabilities (the first of equal maxima is the predicted class,
        // as `Probabilities::predicted_class` decides) and the entropy.
        for probs in p.values.chunks_exact(p.classes) {
            let (mut top1, mut top2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            let mut argmax = 0;
            let mut entropy = 0.0;
            let mut finite = true;
            for (class, &v) in probs.iter().enumerate() {
                finite &= v.is_finite();
                if v > top1 {
                    top2 = top1;
                    top1 = v;
                    argmax = class;
                } else if v > top2 {
                    top2 = v;
                }
                entropy += entropy::term(v);
            }
            if !finite {
                continue;
            }
            let predicted = match threshold {
                Some(t) => usize::from(probs[1] > t),
                None => argmax,
            };
            classes.confusion.add_row(probs, predicted);
            columns.top1.push(top1);
            columns.spread12.push(top1 - top2);
            columns.entropy.push(entropy);
            if let Some(b) = ctx.builder.as_deref_mut() {
                let names = &classes.names;
                b.add_prediction(predicted, || names.clone());
            }
        }
        classes.max_proba.add_slice(&columns.top1);
        classes.spread12.add_slice(&columns.spread12);
        classes.entropy.add_slice(&columns.entropy);
    }

    /// The points of this bucket, in a stable order: counts, outputs, estimates,
    /// prediction drift, then features by name.
    pub fn points(&mut self, key: &StreamKey, ctx: EmitContext<'_>) -> Vec<Point> {
        use catalog::Dimension::{Category, ClassName, FeatName, Method, Stat};
        let EmitContext { known_features, class_names, reference, late_dropped, config } = ctx;
        let ts = self.start;
        let version = key.version.map(|v| v.to_string());
        let scope =
            ScopeValues { model: Some(&key.model), version: version.as_deref(), signature: Some(&key.signature) };
        let mut out = Vec::new();
        let mut push = |sample: Sample<'_>| {
            if let Some(p) = Point::from_sample(&sample, &scope, ts) {
                out.push(p);
            }
        };
        push(catalog::BUFFER_COUNT.sample(self.rows as f64));
        push(catalog::LATE_DROPPED.sample(late_dropped as f64));
        if self.sampling.observations > 0 {
            let fraction = self.sampling.sampled_observations as f64 / self.sampling.observations as f64;
            push(catalog::SAMPLED_FRACTION.sample(fraction));
        }
        if self.feature_limit_dropped > 0 {
            push(catalog::FEATURE_LIMIT_DROPPED.sample(self.feature_limit_dropped as f64));
        }
        if self.class_count_mismatch > 0 {
            push(catalog::CLASS_COUNT_MISMATCH.sample(self.class_count_mismatch as f64));
        }
        if let Some(classes) = &mut self.classes {
            for summary in [&mut classes.max_proba, &mut classes.spread12, &mut classes.entropy] {
                summary.settle();
            }
        }
        if let Some(classes) = &self.classes {
            let rows = classes.confusion.rows();
            for (c, name) in classes.names.iter().enumerate() {
                let count = classes.confusion.predicted[c];
                push(catalog::PREDICTION_COUNT.sample(count as f64).with(ClassName, name));
                if rows > 0 {
                    push(catalog::PREDICTION_FREQ.sample(count as f64 / rows as f64).with(ClassName, name));
                }
            }
            for (metric, summary) in [
                (&catalog::MAX_PREDICTION_PROBA, &classes.max_proba),
                (&catalog::SPREAD12_PREDICTION_PROBA, &classes.spread12),
                (&catalog::PREDICTION_ENTROPY, &classes.entropy),
            ] {
                for (stat, v) in summary.stats() {
                    push(metric.sample(v).with(Stat, stat));
                }
            }
            if rows > 0 {
                for (c, name) in classes.names.iter().enumerate() {
                    let mean = classes.confusion.actual[c] / rows as f64;
                    push(catalog::CLASS_PROBA_MEAN.sample(mean).with(ClassName, name));
                }
            }
            let estimates = classes.confusion.estimates();
            if let Some(a) = estimates.accuracy {
                push(catalog::ESTIMATED_ACCURACY.sample(a));
            }
            for (c, name) in classes.names.iter().enumerate() {
                for (metric, v) in [
                    (&catalog::ESTIMATED_PRECISION, estimates.precision[c]),
                    (&catalog::ESTIMATED_RECALL, estimates.recall[c]),
                    (&catalog::ESTIMATED_F1, estimates.f1[c]),
                ] {
                    if let Some(v) = v {
                        push(metric.sample(v).with(ClassName, name));
                    }
                }
            }
            if let (Some(r), Some(current)) =
                (reference.and_then(|r| r.classes.as_ref()), drift::frequencies(&classes.confusion.predicted))
            {
                if r.frequencies.len() == current.len() {
                    let drift = &catalog::PREDICTION_DRIFT;
                    push(drift.sample(drift::psi(&r.frequencies, &current)).with(Method, "psi"));
                    push(drift.sample(drift::js(&r.frequencies, &current)).with(Method, "js"));
                    push(drift.sample(drift::linf(&r.frequencies, &current)).with(Method, "linf"));
                }
            }
        } else if self.rows == 0 {
            // A heartbeat: the stream's classes, if known, are reported with 0 rows.
            if let Some(names) = class_names {
                for name in names {
                    push(catalog::PREDICTION_COUNT.sample(0.0).with(ClassName, name));
                }
            }
        }
        if let Some(regression) = &self.regression {
            regression.samples(reference.and_then(|r| r.prediction.as_ref()), &mut push);
        }
        for name in known_features {
            let Some(feature) = self.features.get_mut(name.as_str()) else {
                let rows = self.sampling.sampled_rows;
                if rows > 0 {
                    push(catalog::FEATURE_MISSING_COUNT.sample(rows as f64).with(FeatName, name));
                }
                continue;
            };
            push(catalog::FEATURE_MISSING_COUNT.sample(feature.missing as f64).with(FeatName, name));
            let category_freq = |value: f64| catalog::FEATURE_CATEGORY_FREQ.sample(value).with(FeatName, name);
            if let Some(numeric) = &mut feature.numeric {
                numeric.summary.settle();
                for (stat, v) in numeric.summary.stats() {
                    push(catalog::FEATURE_VALUE.sample(v).with(FeatName, name).with(Stat, stat));
                }
                if let Some(ints) = &mut numeric.integers {
                    push(catalog::FEATURE_DISTINCT_ESTIMATE.sample(ints.distinct()).with(FeatName, name));
                    let total = numeric.summary.count();
                    if let Some(few) = ints.few(config.integer_categorical_max_distinct) {
                        let top = few.len().min(config.top_k);
                        let rest: u64 = few.iter().skip(top).map(|(_, c)| c).sum();
                        for (value, count) in &few[..top] {
                            let category = value.to_string();
                            push(category_freq(*count as f64 / total as f64).with(Category, &category));
                        }
                        if rest > 0 {
                            push(category_freq(rest as f64 / total as f64).with(Category, OTHER_CATEGORY));
                        }
                    }
                }
                if let (Some(bins), Some(r)) = (&numeric.bins, reference.and_then(|r| r.numeric.get(name.as_str()))) {
                    if let Some(current) = drift::frequencies(bins) {
                        let drift = |value: f64| catalog::FEATURE_DRIFT.sample(value).with(FeatName, name);
                        push(drift(drift::psi(&r.frequencies, &current)).with(Method, "psi"));
                        push(drift(drift::js(&r.frequencies, &current)).with(Method, "js"));
                    }
                }
            }
            if let Some(counts) = &mut feature.categorical {
                let total = counts.total();
                push(catalog::FEATURE_DISTINCT_ESTIMATE.sample(counts.distinct()).with(FeatName, name));
                if counts.untracked() > 0 {
                    push(catalog::CATEGORY_LIMIT_DROPPED.sample(counts.untracked() as f64).with(FeatName, name));
                }
                if total > 0 {
                    let (top, rest) = counts.top_k(config.top_k);
                    for (category, count) in &top {
                        push(category_freq(*count as f64 / total as f64).with(Category, category));
                    }
                    if rest > 0 {
                        push(category_freq(rest as f64 / total as f64).with(Category, OTHER_CATEGORY));
                    }
                    if let Some(r) = reference.and_then(|r| r.categorical.get(name.as_str())) {
                        let linf = categorical_linf(r, counts);
                        push(catalog::FEATURE_DRIFT.sample(linf).with(FeatName, name).with(Method, "linf"));
                    }
                }
            }
        }
        out
    }
}

impl Merge for Sampling {
    fn merge(&mut self, other: &Self) {
        self.observations += other.observations;
        self.sampled_observations += other.sampled_observations;
        self.sampled_rows += other.sampled_rows;
    }
}

impl Merge for ClassStats {
    /// Both sides have the stream's class names (fixed by its first probabilities);
    /// a partial with another class count is counted as a mismatch by the bucket.
    fn merge(&mut self, other: &Self) {
        self.confusion.merge(&other.confusion);
        self.max_proba.merge(&other.max_proba);
        self.spread12.merge(&other.spread12);
        self.entropy.merge(&other.entropy);
    }
}

impl Merge for NumericStats {
    fn merge(&mut self, other: &Self) {
        self.summary.merge(&other.summary);
        Merge::merge(&mut self.integers, &other.integers);
        // Drift covers every value only when both sides binned all of theirs against
        // the same (shared) reference; otherwise the bucket has no feature drift.
        self.bins = match (self.bins.take(), &other.bins) {
            (Some(mut mine), Some(theirs)) if mine.len() == theirs.len() => {
                for (m, t) in mine.iter_mut().zip(theirs) {
                    *m += t;
                }
                Some(mine)
            }
            _ => None,
        };
    }
}

impl Merge for FeatureStats {
    fn merge(&mut self, other: &Self) {
        self.missing += other.missing;
        Merge::merge(&mut self.numeric, &other.numeric);
        Merge::merge(&mut self.categorical, &other.categorical);
    }
}

impl Merge for StreamBucket {
    /// The partial of the same stream and bucket from another replica. A feature one
    /// side never saw had all that side's sampled rows missing, as a single bucket
    /// counts the rows of observations without it.
    fn merge(&mut self, other: &Self) {
        self.rows += other.rows;
        match (&mut self.classes, &other.classes) {
            (Some(mine), Some(theirs)) if mine.names == theirs.names => mine.merge(theirs),
            (Some(_), Some(theirs)) => self.class_count_mismatch += theirs.confusion.rows(),
            (None, Some(theirs)) => self.classes = Some(theirs.clone()),
            (_, None) => {}
        }
        let (my_rows, their_rows) = (self.sampling.sampled_rows, other.sampling.sampled_rows);
        for (name, feature) in self.features.iter_mut() {
            if !other.features.contains_key(name) {
                feature.missing += their_rows;
            }
        }
        for (name, theirs) in &other.features {
            match self.features.get_mut(name) {
                Some(mine) => mine.merge(theirs),
                None => {
                    let mut feature = theirs.clone();
                    feature.missing += my_rows;
                    self.features.insert(name.clone(), feature);
                }
            }
        }
        self.regression.merge(&other.regression);
        self.feature_limit_dropped += other.feature_limit_dropped;
        self.class_count_mismatch += other.class_count_mismatch;
        self.sampling.merge(&other.sampling);
    }
}

/// L∞ between reference category frequencies and a bucket's counts, over the union
/// of categories; untracked values on either side are compared as `__other__`.
fn categorical_linf(reference: &BTreeMap<String, f64>, counts: &CategoryCounts) -> f64 {
    let total = counts.total() as f64;
    let mut worst: f64 = 0.0;
    let mut current_other = counts.untracked() as f64 / total;
    for (category, count) in counts.counts() {
        let cur = count as f64 / total;
        match reference.get(category) {
            Some(r) => worst = worst.max((r - cur).abs()),
            None if reference.contains_key(OTHER_CATEGORY) => current_other += cur,
            None => worst = worst.max(cur),
        }
    }
    for (category, r) in reference {
        if category == OTHER_CATEGORY {
            worst = worst.max((r - current_other).abs());
        } else if counts.get(category).is_none() {
            worst = worst.max(*r);
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tfserving::InferenceMethod;
    use std::time::{Duration, SystemTime};

    fn observation(classes: usize, values: Vec<f64>, threshold: Option<f64>) -> Observation {
        Observation {
            stream: StreamKey { model: "m".into(), version: Some(1), signature: "serving_default".into() },
            method: InferenceMethod::Predict,
            event_time: SystemTime::UNIX_EPOCH,
            request_id: "r".into(),
            rows: values.len() / classes,
            features: Vec::new(),
            probabilities: Some(Probabilities { classes, values, class_names: None, threshold }),
            regression: None,
            row_ids: None,
            upstream_latency: Duration::ZERO,
        }
    }

    /// Observes count records (outputs only) into a new bucket with fresh buffers.
    fn observed(observations: &[Observation]) -> StreamBucket {
        let config = MonitorConfig::default();
        let (mut known, categorical, mut names) = (BTreeSet::new(), BTreeSet::new(), None);
        let mut columns = OutputColumns::default();
        let mut bucket = StreamBucket::new(0);
        for (sequence, obs) in observations.iter().enumerate() {
            bucket.observe(
                obs,
                StreamContext {
                    config: &config,
                    known_features: &mut known,
                    categorical_features: &categorical,
                    reference: None,
                    builder: None,
                    class_names: &mut names,
                    sequence: sequence as u64 + 1,
                    features_sampled: false,
                    output_columns: &mut columns,
                },
            );
        }
        bucket
    }

    fn close(actual: Option<f64>, expected: f64) -> bool {
        actual.is_some_and(|a| (a - expected).abs() <= 1e-12 * expected.abs().max(1e-300))
    }

    #[test]
    fn output_statistics_of_each_row_are_those_of_its_probabilities() {
        let rows: [[f64; 3]; 6] = [
            [0.7, 0.2, 0.1],
            [0.2, 0.2, 0.6],
            [0.5, 0.5, 0.0],
            [f64::NAN, 0.5, 0.5],
            [1.0, 0.0, 0.0],
            [0.25, 0.125, 0.625],
        ];
        // Two observations, so that the engine's buffers are reused between them.
        let first = observation(3, rows[..3].concat(), None);
        let second = observation(3, rows[3..].concat(), None);
        let bucket = observed(&[first, second]);
        let classes = bucket.classes.as_ref().expect("class statistics");
        let finite: Vec<&[f64; 3]> = rows.iter().filter(|r| r.iter().all(|v| v.is_finite())).collect();
        assert_eq!(finite.len(), 5);
        // The first of equal maxima is the predicted class.
        assert_eq!(classes.confusion.predicted, vec![3, 0, 2]);
        let entropy = |r: &[f64; 3]| -> f64 { r.iter().filter(|p| **p > 0.0).map(|p| -p * p.ln()).sum() };
        let top1 = |r: &[f64; 3]| r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let spread = |r: &[f64; 3]| {
            let mut sorted = r.to_vec();
            sorted.sort_by(|a, b| b.total_cmp(a));
            sorted[0] - sorted[1]
        };
        for (summary, f) in [
            (&classes.max_proba, &top1 as &dyn Fn(&[f64; 3]) -> f64),
            (&classes.spread12, &spread),
            (&classes.entropy, &entropy),
        ] {
            let values: Vec<f64> = finite.iter().map(|r| f(r)).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(summary.count(), 5);
            assert!(close(summary.mean(), mean), "{:?} vs {mean} for {values:?}", summary.mean());
            assert!(close(summary.min(), min) || (min == 0.0 && summary.min() == Some(0.0)), "{values:?}");
            assert!(close(summary.max(), max), "{values:?}");
        }
        // Row by row: a tie has no spread and ln 2 of entropy, a certain row none.
        assert_eq!(classes.spread12.min(), Some(0.0));
        assert_eq!(classes.entropy.min(), Some(0.0));
        assert!(close(classes.entropy.max(), entropy(&rows[0]).max(entropy(&rows[1])).max(entropy(&rows[5]))));
    }

    #[test]
    fn a_binary_sigmoid_row_is_predicted_by_its_threshold() {
        let bucket = observed(&[observation(2, vec![0.6, 0.4, 0.8, 0.2], Some(0.3))]);
        let classes = bucket.classes.as_ref().expect("class statistics");
        assert_eq!(classes.confusion.predicted, vec![1, 1]);
        // The statistics of the outputs do not depend on the threshold.
        assert!(close(classes.max_proba.mean(), 0.7));
        assert!(close(classes.spread12.mean(), 0.4));
    }
}
