//! The metric catalogue: every metric mltap emits, declared once — its name, kind,
//! unit, dimensions, the Anodot 3.0 stream and the Prometheus family it belongs to,
//! and whether its value is exact or estimated.
//!
//! Producers (the bucket, the engine's exchange facts, the label metrics) emit typed
//! [`Sample`]s naming a [`MetricDef`] and [`Dimension`]s, never strings; every sink
//! (Anodot 2.0 files, the 3.0 schemas and samples, Prometheus, the dashboard history)
//! renders from these declarations. A metric that is not declared here cannot be
//! emitted, and a sink that maps metrics cannot miss one. This module is pure data:
//! it knows no sink format and does no I/O.

/// A dimension a metric's points may carry. Its `key` is the Anodot property name
/// (MLWatcher's, kept for existing dashboards).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dimension {
    /// The model's name; absent on the points of the global pseudo-model.
    Model,
    /// The model version, when the request or the metadata names one.
    Version,
    /// The signature (`serving_default` unless the request names another).
    Signature,
    /// A class (`class_0` … unless the model's config names them); for the confusion
    /// matrix, the predicted class.
    ClassName,
    /// The labelled class of a confusion-matrix cell.
    ActualClass,
    /// A feature (input column) name.
    FeatName,
    /// Which statistic of a distribution (`mean`, `q50`, ...).
    Stat,
    /// A drift method (`psi`, `js`, `linf`) or an inference method (`predict`, ...).
    Method,
    /// An exchange's status (`200`, `grpc_0`, `incomplete`).
    Status,
    /// Why something was dropped or not decoded.
    Reason,
    /// A category of a categorical feature (top-k, the rest `__other__`).
    Category,
    /// Who failed a failed exchange: `client`, `mltap` (its own 502/504 answers) or
    /// `upstream` (TF Serving's answers); absent on successful exchanges.
    Origin,
}

impl Dimension {
    /// Every dimension.
    pub const ALL: [Dimension; 12] = [
        Dimension::Model,
        Dimension::Version,
        Dimension::Signature,
        Dimension::ClassName,
        Dimension::ActualClass,
        Dimension::FeatName,
        Dimension::Stat,
        Dimension::Method,
        Dimension::Status,
        Dimension::Reason,
        Dimension::Category,
        Dimension::Origin,
    ];
    /// How many dimensions there are (for tables indexed by dimension).
    pub const COUNT: usize = Dimension::ALL.len();

    /// The Anodot property key.
    pub const fn key(self) -> &'static str {
        match self {
            Dimension::Model => "model",
            Dimension::Version => "version",
            Dimension::Signature => "signature",
            Dimension::ClassName => "class_name",
            Dimension::ActualClass => "actual_class",
            Dimension::FeatName => "feat_name",
            Dimension::Stat => "stat",
            Dimension::Method => "method",
            Dimension::Status => "status",
            Dimension::Reason => "reason",
            Dimension::Category => "category",
            Dimension::Origin => "origin",
        }
    }

    /// The Prometheus label, or None for a dimension whose values are unbounded (data
    /// values, or one series per pair of classes): a metric carrying one is left to
    /// the Anodot files.
    pub const fn prometheus_label(self) -> Option<&'static str> {
        match self {
            Dimension::Model => Some("model"),
            Dimension::Version => Some("version"),
            Dimension::Signature => Some("signature"),
            Dimension::ClassName => Some("class"),
            Dimension::FeatName => Some("feature"),
            Dimension::Stat => Some("stat"),
            Dimension::Method => Some("method"),
            Dimension::Status => Some("status"),
            Dimension::Reason => Some("reason"),
            Dimension::Origin => Some("origin"),
            Dimension::ActualClass | Dimension::Category => None,
        }
    }

    /// The dimension whose Anodot property key is `key`, for points read back from
    /// files; None for properties that are no dimension of mltap's.
    pub fn from_key(key: &str) -> Option<Dimension> {
        Dimension::ALL.into_iter().find(|d| d.key() == key)
    }

    /// Position in `ALL`, for tables indexed by dimension.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// How a metric aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A count over the bucket; Anodot sums counters over time.
    Counter,
    /// A value of the bucket; Anodot averages gauges.
    Gauge,
    /// One gauge per statistic of a distribution, told apart by the `stat` dimension.
    Statistic,
}

impl Kind {
    /// Whether the metric's values are per-bucket counts (rather than levels).
    pub const fn is_counter(self) -> bool {
        matches!(self, Kind::Counter)
    }
}

/// What a metric's value counts or measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Rows (one per example of a batch).
    Rows,
    /// Values of feature columns.
    Values,
    /// Observations (decoded exchanges).
    Observations,
    /// Exchanges (request and response).
    Exchanges,
    /// Payloads or parts of payloads.
    Payloads,
    /// Labels posted to the label endpoint.
    Labels,
    /// A share between 0 and 1 (frequencies, accuracy, precision, ...).
    Ratio,
    /// A probability between 0 and 1.
    Probability,
    /// Natural-log information (entropy, log loss).
    Nats,
    /// Milliseconds.
    Milliseconds,
    /// The feature's own unit.
    FeatureUnit,
    /// Distinct values.
    Distinct,
    /// A divergence between two distributions (`psi`, `js` in bits, `linf`).
    Divergence,
    /// A squared error of probabilities (Brier score).
    SquaredError,
    /// A regression model's own unit (its predictions, labels and errors).
    PredictionUnit,
    /// A coefficient of determination: at most 1, negative when worse than the mean.
    Coefficient,
}

/// How exact a metric's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exactness {
    /// Computed from every row (or label) of the bucket.
    Exact,
    /// Quantiles (`q..`, `median`, `iqr`) from a DDSketch within the configured relative
    /// accuracy; moments, `min`, `max` and `range` exact.
    Sketched,
    /// An estimate by nature: confidence-based performance before labels, HyperLogLog
    /// distinct counts beyond `max_categories`, ROC AUC from score histograms beyond the
    /// exact-rows cap.
    Estimated,
}

impl Exactness {
    /// The word the docs use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Exactness::Exact => "exact",
            Exactness::Sketched => "sketched",
            Exactness::Estimated => "estimated",
        }
    }
}

/// Which of a model's two Anodot 3.0 streams a metric belongs to: they are complete
/// at different times, so they carry separate watermarks. The values are the bit
/// flags the delivery cursor keeps for watermarks already posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    /// Metrics of the traffic, complete when the bucket closes.
    Traffic = 1,
    /// Metrics of joined labels, appended to a bucket up to the label horizon.
    Labels = 2,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Traffic, Stream::Labels];
}

/// Which entity a metric's points describe, hence their identifying dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One stream: `model`, `version` (when known), `signature` (when known).
    Stream,
    /// One model (exchange-level facts): `model`, absent for the global pseudo-model.
    Model,
}

impl Scope {
    /// The identifying dimensions, in property order.
    pub const fn dims(self) -> &'static [Dimension] {
        match self {
            Scope::Stream => &[Dimension::Model, Dimension::Version, Dimension::Signature],
            Scope::Model => &[Dimension::Model],
        }
    }
}

/// Most own dimensions (beyond the scope's) a metric has.
pub const MAX_DIMS: usize = 3;

/// One metric's declaration.
#[derive(Debug, PartialEq)]
pub struct MetricDef {
    /// Anodot's `what`, the 3.0 measure name and the root of the Prometheus name.
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    /// Which entity its points describe.
    pub scope: Scope,
    /// Its own dimensions, in property order (after the scope's).
    pub dims: &'static [Dimension],
    /// Those of `dims` a point may leave out: `accuracy` without `class_name` is the
    /// overall accuracy.
    pub optional_dims: &'static [Dimension],
    /// The Anodot 3.0 stream whose schema holds it.
    pub stream: Stream,
    /// The Prometheus family (registered under the app's `mltap_` prefix), or None when
    /// it is not exposed there: a counter's is a cumulative `..._total` counter named
    /// for what it counts (`model_predictions_total`), a gauge's `model_<name>` shows
    /// the last closed bucket (label metrics: the latest settled one).
    pub prometheus: Option<&'static str>,
    pub exactness: Exactness,
    /// What the value is, in a line.
    pub help: &'static str,
}

impl MetricDef {
    /// Every dimension its points may carry: the scope's, then its own.
    pub fn all_dims(&'static self) -> impl Iterator<Item = Dimension> {
        self.scope.dims().iter().chain(self.dims).copied()
    }

    /// A sample of this metric with no dimension set yet.
    pub fn sample<'a>(&'static self, value: f64) -> Sample<'a> {
        Sample::new(self, value)
    }
}

/// One value of a metric with its own dimensions, as a producer emits it; the scope's
/// dimensions (model, version, signature) and the timestamp are the bucket's, added by
/// the sink that renders it. Borrowed and fixed-size: building one allocates nothing.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub metric: &'static MetricDef,
    dims: [(Dimension, &'a str); MAX_DIMS],
    len: usize,
    pub value: f64,
}

impl<'a> Sample<'a> {
    pub fn new(metric: &'static MetricDef, value: f64) -> Self {
        Sample { metric, dims: [(Dimension::Model, ""); MAX_DIMS], len: 0, value }
    }

    /// Sets the next dimension. Dimensions come in the metric's declared order; one it
    /// does not declare is a programming error, which debug builds assert and release
    /// builds ignore (the catalogue tests drive every producer in debug).
    pub fn with(mut self, dim: Dimension, value: &'a str) -> Self {
        let declared = self.metric.dims[self.len..].contains(&dim);
        debug_assert!(declared, "{} does not declare {:?} at this position", self.metric.name, dim);
        if declared && self.len < MAX_DIMS {
            self.dims[self.len] = (dim, value);
            self.len += 1;
        }
        self
    }

    /// The dimensions set, in order.
    pub fn dims(&self) -> &[(Dimension, &'a str)] {
        &self.dims[..self.len]
    }
}

/// The identifying dimensions of a bucket's points (its scope), rendered once per
/// bucket rather than per point.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScopeValues<'a> {
    /// None for the global pseudo-model.
    pub model: Option<&'a str>,
    pub version: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> ScopeValues<'a> {
    /// The values set, in property order.
    pub fn dims(&self) -> impl Iterator<Item = (Dimension, &'a str)> {
        [(Dimension::Model, self.model), (Dimension::Version, self.version), (Dimension::Signature, self.signature)]
            .into_iter()
            .filter_map(|(d, v)| v.map(|v| (d, v)))
    }
}

/// Declares one metric as a `pub static MetricDef`; `optional` defaults to none.
macro_rules! metric {
    ($ident:ident = $name:literal, kind: $kind:ident, unit: $unit:ident, scope: $scope:ident,
     dims: [$($dim:ident),*], stream: $stream:ident,
     prometheus: $prom:expr, exactness: $exact:ident, help: $help:literal) => {
        metric! {
            $ident = $name, kind: $kind, unit: $unit, scope: $scope, dims: [$($dim),*], optional: [],
            stream: $stream, prometheus: $prom, exactness: $exact, help: $help
        }
    };
    ($ident:ident = $name:literal, kind: $kind:ident, unit: $unit:ident, scope: $scope:ident,
     dims: [$($dim:ident),*], optional: [$($opt:ident),*], stream: $stream:ident,
     prometheus: $prom:expr, exactness: $exact:ident, help: $help:literal) => {
        #[doc = $help]
        pub static $ident: MetricDef = MetricDef {
            name: $name,
            kind: Kind::$kind,
            unit: Unit::$unit,
            scope: Scope::$scope,
            dims: &[$(Dimension::$dim),*],
            optional_dims: &[$(Dimension::$opt),*],
            stream: Stream::$stream,
            prometheus: $prom,
            exactness: Exactness::$exact,
            help: $help,
        };
    };
}

// Per stream, from the traffic (`monitor::bucket`).
metric! {
    BUFFER_COUNT = "buffer_count", kind: Counter, unit: Rows, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_rows_total"), exactness: Exact,
    help: "rows observed in the bucket"
}
metric! {
    LATE_DROPPED = "late_dropped", kind: Counter, unit: Rows, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_late_dropped_rows_total"), exactness: Exact,
    help: "rows that arrived after their bucket closed (since the previous close)"
}
metric! {
    FEATURE_LIMIT_DROPPED = "feature_limit_dropped", kind: Counter, unit: Values, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_feature_limit_dropped_values_total"), exactness: Exact,
    help: "values of feature columns ignored because the stream already tracks max_features features"
}
metric! {
    CLASS_COUNT_MISMATCH = "class_count_mismatch", kind: Counter, unit: Observations, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_class_count_mismatch_observations_total"), exactness: Exact,
    help: "observations whose probabilities were ignored: their class count differs from the stream's"
}
metric! {
    SAMPLED_FRACTION = "sampled_fraction", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_sampled_fraction"), exactness: Exact,
    help: "fraction of the bucket's exchanges whose statistics were computed, 1.0 when nothing was shed"
}
metric! {
    PREDICTION_COUNT = "prediction_count", kind: Counter, unit: Rows, scope: Stream, dims: [ClassName],
    stream: Traffic, prometheus: Some("model_predictions_total"), exactness: Exact,
    help: "rows whose predicted class is this class"
}
metric! {
    PREDICTION_FREQ = "prediction_freq", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Traffic, prometheus: Some("model_prediction_freq"), exactness: Exact,
    help: "prediction_count over the rows with probabilities"
}
metric! {
    MAX_PREDICTION_PROBA = "max_prediction_proba", kind: Statistic, unit: Probability, scope: Stream, dims: [Stat],
    stream: Traffic, prometheus: Some("model_max_prediction_proba"), exactness: Sketched,
    help: "statistics of each row's top probability"
}
metric! {
    SPREAD12_PREDICTION_PROBA = "spread12_prediction_proba", kind: Statistic, unit: Probability, scope: Stream,
    dims: [Stat], stream: Traffic, prometheus: Some("model_spread12_prediction_proba"), exactness: Sketched,
    help: "statistics of each row's top-1 minus top-2 probability"
}
metric! {
    PREDICTION_ENTROPY = "prediction_entropy", kind: Statistic, unit: Nats, scope: Stream, dims: [Stat],
    stream: Traffic, prometheus: Some("model_prediction_entropy"), exactness: Sketched,
    help: "statistics of each row's entropy of its probabilities"
}
metric! {
    CLASS_PROBA_MEAN = "class_proba_mean", kind: Gauge, unit: Probability, scope: Stream, dims: [ClassName],
    stream: Traffic, prometheus: Some("model_class_proba_mean"), exactness: Exact,
    help: "mean probability of the class over the rows"
}
metric! {
    ESTIMATED_ACCURACY = "estimated_accuracy", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_estimated_accuracy"), exactness: Estimated,
    help: "accuracy expected from the probabilities alone (CBPE)"
}
metric! {
    ESTIMATED_PRECISION = "estimated_precision", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Traffic, prometheus: Some("model_estimated_precision"), exactness: Estimated,
    help: "one-vs-rest precision expected from the probabilities (CBPE)"
}
metric! {
    ESTIMATED_RECALL = "estimated_recall", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Traffic, prometheus: Some("model_estimated_recall"), exactness: Estimated,
    help: "one-vs-rest recall expected from the probabilities (CBPE)"
}
metric! {
    ESTIMATED_F1 = "estimated_f1", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Traffic, prometheus: Some("model_estimated_f1"), exactness: Estimated,
    help: "one-vs-rest F1 expected from the probabilities (CBPE)"
}
metric! {
    PREDICTION_DRIFT = "prediction_drift", kind: Gauge, unit: Divergence, scope: Stream, dims: [Method],
    stream: Traffic, prometheus: Some("model_prediction_drift"), exactness: Exact,
    help: "predicted-class distribution (classifiers) or predicted values (regression) against the reference's"
}
metric! {
    PREDICTION_VALUE = "prediction_value", kind: Statistic, unit: PredictionUnit, scope: Stream, dims: [Stat],
    stream: Traffic, prometheus: Some("model_prediction_value"), exactness: Sketched,
    help: "statistics of a regression model's finite predictions"
}
metric! {
    PREDICTION_MISSING_COUNT = "prediction_missing_count", kind: Counter, unit: Rows, scope: Stream, dims: [],
    stream: Traffic, prometheus: Some("model_prediction_missing_rows_total"), exactness: Exact,
    help: "rows of a regression model whose prediction is NaN or infinite"
}
metric! {
    FEATURE_MISSING_COUNT = "feature_missing_count", kind: Counter, unit: Values, scope: Stream, dims: [FeatName],
    stream: Traffic, prometheus: Some("model_feature_missing_values_total"), exactness: Exact,
    help: "NaN, infinite and null values, and rows of observations without the feature"
}
metric! {
    FEATURE_VALUE = "feature_value", kind: Statistic, unit: FeatureUnit, scope: Stream, dims: [FeatName, Stat],
    stream: Traffic, prometheus: Some("model_feature_value"), exactness: Sketched,
    help: "statistics of a numeric feature's finite values"
}
metric! {
    FEATURE_DISTINCT_ESTIMATE = "feature_distinct_estimate", kind: Gauge, unit: Distinct, scope: Stream,
    dims: [FeatName], stream: Traffic, prometheus: Some("model_feature_distinct_estimate"), exactness: Estimated,
    help: "distinct values of a categorical or integer feature (exact up to max_categories)"
}
metric! {
    FEATURE_CATEGORY_FREQ = "feature_category_freq", kind: Gauge, unit: Ratio, scope: Stream,
    dims: [FeatName, Category], stream: Traffic, prometheus: None, exactness: Exact,
    help: "frequency of a top-k category of a feature, the rest as __other__"
}
metric! {
    FEATURE_DRIFT = "feature_drift", kind: Gauge, unit: Divergence, scope: Stream, dims: [FeatName, Method],
    stream: Traffic, prometheus: Some("model_feature_drift"), exactness: Exact,
    help: "a feature's distribution against the reference's"
}
metric! {
    CATEGORY_LIMIT_DROPPED = "category_limit_dropped", kind: Counter, unit: Values, scope: Stream, dims: [FeatName],
    stream: Traffic, prometheus: Some("model_category_limit_dropped_values_total"), exactness: Exact,
    help: "values of categories not tracked because the feature holds max_categories categories"
}

// Per model, from the exchanges (`monitor::engine`).
metric! {
    REQUEST_COUNT = "request_count", kind: Counter, unit: Exchanges, scope: Model, dims: [Method, Status, Origin], optional: [Origin],
    stream: Traffic, prometheus: Some("model_requests_total"), exactness: Exact,
    help: "exchanges by inference method and status, and on failed ones who failed (origin)"
}
// Prometheus has the histogram `model_upstream_latency_seconds` instead (`sinks::prometheus`).
metric! {
    UPSTREAM_LATENCY_MS = "upstream_latency_ms", kind: Statistic, unit: Milliseconds, scope: Model, dims: [Stat],
    stream: Traffic, prometheus: None, exactness: Sketched,
    help: "from sending the request upstream to the end of the response"
}
metric! {
    DECODE_ERRORS = "decode_errors", kind: Counter, unit: Payloads, scope: Model, dims: [Reason],
    stream: Traffic, prometheus: Some("decode_errors_total"), exactness: Exact,
    help: "payloads (or parts) that could not be decoded, by reason"
}
metric! {
    STREAM_LIMIT_DROPPED = "stream_limit_dropped", kind: Counter, unit: Rows, scope: Model, dims: [],
    stream: Traffic, prometheus: Some("model_stream_limit_dropped_rows_total"), exactness: Exact,
    help: "rows of observations of streams beyond max_streams"
}
// Only the global pseudo-model has it; Prometheus has the capture queue's own counter.
metric! {
    CAPTURE_DROPPED = "capture_dropped", kind: Counter, unit: Exchanges, scope: Model, dims: [],
    stream: Traffic, prometheus: None, exactness: Exact,
    help: "exchanges the capture queue dropped during the bucket"
}

// Per stream, from joined labels (`labels::metrics`).
metric! {
    ACCURACY = "accuracy", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName], optional: [ClassName],
    stream: Labels, prometheus: Some("model_accuracy"), exactness: Exact,
    help: "share of labeled rows predicted right; one-vs-rest with class_name"
}
metric! {
    PRECISION = "precision", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Labels, prometheus: Some("model_precision"), exactness: Exact,
    help: "one-vs-rest precision from joined labels"
}
metric! {
    RECALL = "recall", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Labels, prometheus: Some("model_recall"), exactness: Exact,
    help: "one-vs-rest recall from joined labels"
}
metric! {
    F1 = "f1", kind: Gauge, unit: Ratio, scope: Stream, dims: [ClassName],
    stream: Labels, prometheus: Some("model_f1"), exactness: Exact,
    help: "one-vs-rest F1 from joined labels"
}
metric! {
    MACRO_F1 = "macro_f1", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_macro_f1"), exactness: Exact,
    help: "mean of the classes' F1"
}
metric! {
    WEIGHTED_F1 = "weighted_f1", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_weighted_f1"), exactness: Exact,
    help: "the classes' F1 weighted by their labeled rows"
}
metric! {
    LOG_LOSS = "log_loss", kind: Gauge, unit: Nats, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_log_loss"), exactness: Exact,
    help: "mean negative log probability of the labelled class"
}
metric! {
    BRIER_SCORE = "brier_score", kind: Gauge, unit: SquaredError, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_brier_score"), exactness: Exact,
    help: "mean squared error of the probabilities against the one-hot label"
}
metric! {
    ROC_AUC = "roc_auc", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_roc_auc"), exactness: Estimated,
    help: "binary ROC AUC: exact while every labeled row's score is kept, else from score histograms"
}
metric! {
    CONFUSION_COUNT = "confusion_count", kind: Counter, unit: Rows, scope: Stream, dims: [ActualClass, ClassName],
    stream: Labels, prometheus: None, exactness: Exact,
    help: "labeled rows of this actual class predicted as class_name"
}
metric! {
    LABEL_COUNT = "label_count", kind: Counter, unit: Rows, scope: Stream, dims: [ClassName],
    stream: Labels, prometheus: Some("model_labels_total"), exactness: Exact,
    help: "labels whose actual class is this class"
}
metric! {
    LABELED_FRACTION = "labeled_fraction", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_labeled_fraction"), exactness: Exact,
    help: "labeled rows over predicted rows of the bucket"
}
metric! {
    MAE = "mae", kind: Gauge, unit: PredictionUnit, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_mae"), exactness: Exact,
    help: "mean absolute error of the labeled rows of a regression model"
}
metric! {
    RMSE = "rmse", kind: Gauge, unit: PredictionUnit, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_rmse"), exactness: Exact,
    help: "root mean squared error of the labeled rows of a regression model"
}
metric! {
    MAPE = "mape", kind: Gauge, unit: Ratio, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_mape"), exactness: Exact,
    help: "mean absolute percentage error, as a fraction, over the labeled rows whose label is not 0"
}
metric! {
    MAPE_EXCLUDED_COUNT = "mape_excluded_count", kind: Counter, unit: Rows, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_mape_excluded_rows_total"), exactness: Exact,
    help: "labeled rows left out of mape because their label is 0"
}
metric! {
    R2 = "r2", kind: Gauge, unit: Coefficient, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_r2"), exactness: Exact,
    help: "coefficient of determination of the labeled rows (undefined when all labels are equal)"
}
metric! {
    ERROR_MEAN = "error_mean", kind: Gauge, unit: PredictionUnit, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_error_mean"), exactness: Exact,
    help: "mean of prediction minus label (the bias) of the labeled rows"
}
metric! {
    ERROR_VALUE = "error_value", kind: Statistic, unit: PredictionUnit, scope: Stream, dims: [Stat],
    stream: Labels, prometheus: Some("model_error_value"), exactness: Sketched,
    help: "statistics of the absolute errors |prediction - label| of the labeled rows"
}
metric! {
    LABEL_VALUE = "label_value", kind: Statistic, unit: PredictionUnit, scope: Stream, dims: [Stat],
    stream: Labels, prometheus: Some("model_label_value"), exactness: Sketched,
    help: "statistics of the numeric labels joined to the bucket"
}
metric! {
    LABEL_LATE_COUNT = "label_late_count", kind: Counter, unit: Labels, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_labels_late_total"), exactness: Exact,
    help: "labels arriving in this bucket whose prediction bucket was already emitted"
}
metric! {
    LABEL_UNMATCHED_COUNT = "label_unmatched_count", kind: Counter, unit: Labels, scope: Stream, dims: [],
    stream: Labels, prometheus: Some("model_labels_unmatched_total"), exactness: Exact,
    help: "labels arriving in this bucket whose id matched no recorded prediction"
}

/// Every metric mltap emits, in the order the docs list them.
pub static ALL: &[&MetricDef] = &[
    &BUFFER_COUNT,
    &LATE_DROPPED,
    &FEATURE_LIMIT_DROPPED,
    &CLASS_COUNT_MISMATCH,
    &SAMPLED_FRACTION,
    &PREDICTION_COUNT,
    &PREDICTION_FREQ,
    &MAX_PREDICTION_PROBA,
    &SPREAD12_PREDICTION_PROBA,
    &PREDICTION_ENTROPY,
    &CLASS_PROBA_MEAN,
    &ESTIMATED_ACCURACY,
    &ESTIMATED_PRECISION,
    &ESTIMATED_RECALL,
    &ESTIMATED_F1,
    &PREDICTION_DRIFT,
    &PREDICTION_VALUE,
    &PREDICTION_MISSING_COUNT,
    &FEATURE_MISSING_COUNT,
    &FEATURE_VALUE,
    &FEATURE_DISTINCT_ESTIMATE,
    &FEATURE_CATEGORY_FREQ,
    &FEATURE_DRIFT,
    &CATEGORY_LIMIT_DROPPED,
    &REQUEST_COUNT,
    &UPSTREAM_LATENCY_MS,
    &DECODE_ERRORS,
    &STREAM_LIMIT_DROPPED,
    &CAPTURE_DROPPED,
    &ACCURACY,
    &PRECISION,
    &RECALL,
    &F1,
    &MACRO_F1,
    &WEIGHTED_F1,
    &LOG_LOSS,
    &BRIER_SCORE,
    &ROC_AUC,
    &CONFUSION_COUNT,
    &LABEL_COUNT,
    &LABELED_FRACTION,
    &MAE,
    &RMSE,
    &MAPE,
    &MAPE_EXCLUDED_COUNT,
    &R2,
    &ERROR_MEAN,
    &ERROR_VALUE,
    &LABEL_VALUE,
    &LABEL_LATE_COUNT,
    &LABEL_UNMATCHED_COUNT,
];

/// The metric named `name`, for points read back from files.
pub fn find(name: &str) -> Option<&'static MetricDef> {
    ALL.iter().copied().find(|m| m.name == name)
}

/// The metrics of one Anodot 3.0 stream.
pub fn of_stream(stream: Stream) -> impl Iterator<Item = &'static MetricDef> {
    ALL.iter().copied().filter(move |m| m.stream == stream)
}

/// Why a point's properties do not fit its metric's declaration, if they do not:
/// every key must be a dimension of the metric (scope or own), each at most once and
/// in declared order, and every own dimension not optional must be there. Used by the
/// tests that drive the producers, and by anyone checking points from elsewhere.
pub fn check_dims<'k>(metric: &MetricDef, keys: impl IntoIterator<Item = &'k str>) -> Result<(), String> {
    let declared: Vec<Dimension> = metric.scope.dims().iter().chain(metric.dims).copied().collect();
    let mut next = 0;
    let mut seen = Vec::new();
    for key in keys {
        let Some(dim) = Dimension::from_key(key) else {
            return Err(format!("{}: `{key}` is not a dimension", metric.name));
        };
        match declared[next..].iter().position(|d| *d == dim) {
            Some(i) => {
                next += i + 1;
                seen.push(dim);
            }
            None => return Err(format!("{}: `{key}` is not declared (or out of order)", metric.name)),
        }
    }
    for dim in metric.dims {
        if !seen.contains(dim) && !metric.optional_dims.contains(dim) {
            return Err(format!("{}: `{}` is missing", metric.name, dim.key()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique_and_anodot_safe() {
        let mut names = BTreeSet::new();
        for m in ALL {
            assert!(names.insert(m.name), "{} is declared twice", m.name);
            assert!(
                m.name.len() <= 50 && m.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            );
            assert_eq!(find(m.name).map(|f| f.name), Some(m.name));
        }
    }

    #[test]
    fn every_declared_metric_is_listed() {
        // A static declared but left out of ALL would be invisible to every sink; the
        // macro's statics and ALL are compared through the source itself.
        let source = include_str!("catalog.rs");
        let declared = source.matches("\nmetric! {").count();
        assert_eq!(declared, ALL.len());
    }

    #[test]
    fn every_dimension_is_rendered_and_used() {
        let keys: BTreeSet<&str> = Dimension::ALL.iter().map(|d| d.key()).collect();
        assert_eq!(keys.len(), Dimension::COUNT, "two dimensions share a key");
        for (i, d) in Dimension::ALL.iter().enumerate() {
            assert_eq!(d.index(), i);
            assert_eq!(Dimension::from_key(d.key()), Some(*d));
            let used = ALL.iter().any(|m| m.all_dims().any(|x| x == *d));
            assert!(used, "{d:?} is declared but no metric carries it");
        }
        let labels: BTreeSet<&str> = Dimension::ALL.iter().filter_map(|d| d.prometheus_label()).collect();
        assert_eq!(labels.len(), Dimension::ALL.iter().filter(|d| d.prometheus_label().is_some()).count());
    }

    #[test]
    fn declarations_are_consistent() {
        for m in ALL {
            assert!(m.dims.len() <= MAX_DIMS, "{}", m.name);
            assert_eq!(
                m.kind == Kind::Statistic,
                m.dims.contains(&Dimension::Stat),
                "{}: a statistic has `stat`",
                m.name
            );
            assert!(m.optional_dims.iter().all(|d| m.dims.contains(d)), "{}", m.name);
            assert!(!m.dims.iter().any(|d| m.scope.dims().contains(d)), "{}", m.name);
            let unbounded = m.dims.iter().any(|d| d.prometheus_label().is_none());
            if unbounded {
                assert_eq!(m.prometheus, None, "{} has an unbounded dimension", m.name);
            }
            // Counters are cumulative `_total` counters on /metrics, named for what
            // they count; the other metrics keep their name.
            if let Some(family) = m.prometheus {
                if m.kind.is_counter() {
                    assert!(family.ends_with("_total") && !family.contains("count_total"), "{}", m.name);
                } else {
                    assert_eq!(family, format!("model_{}", m.name));
                }
            }
        }
    }

    #[test]
    fn label_side_metrics_are_in_the_labels_stream() {
        for name in ["accuracy", "confusion_count", "label_count", "label_late_count", "label_unmatched_count"] {
            assert_eq!(find(name).unwrap().stream, Stream::Labels, "{name}");
        }
        for name in ["buffer_count", "feature_value", "decode_errors", "class_count_mismatch", "sampled_fraction"] {
            assert_eq!(find(name).unwrap().stream, Stream::Traffic, "{name}");
        }
    }

    #[test]
    fn samples_keep_declared_dimensions_in_order() {
        let s = FEATURE_VALUE.sample(1.0).with(Dimension::FeatName, "age").with(Dimension::Stat, "mean");
        assert_eq!(s.dims(), &[(Dimension::FeatName, "age"), (Dimension::Stat, "mean")]);
        assert!(check_dims(&FEATURE_VALUE, ["model", "feat_name", "stat"]).is_ok());
        assert!(check_dims(&FEATURE_VALUE, ["model", "stat", "feat_name"]).is_err());
        assert!(check_dims(&FEATURE_VALUE, ["model", "feat_name"]).is_err());
        assert!(check_dims(&ACCURACY, ["model", "version"]).is_ok());
        assert!(check_dims(&BUFFER_COUNT, ["model", "shard"]).is_err());
    }
}
