//! TF Serving protocol knowledge: URL shapes, JSON formats, TensorProto, tf.Example,
//! gRPC framing and compression. Turns a captured `Exchange` into an `Observation`.
//!
//! Everything here runs in the worker, off the hot path, on untrusted bytes: it never
//! panics on input and never allocates past a configured bound.

pub mod proto;

use std::time::{Duration, SystemTime};

/// Which inference API produced an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InferenceMethod {
    Predict,
    Classify,
    Regress,
    MultiInference,
}

impl InferenceMethod {
    /// The name used in metric dimensions (`method` property).
    pub fn as_str(self) -> &'static str {
        match self {
            InferenceMethod::Predict => "predict",
            InferenceMethod::Classify => "classify",
            InferenceMethod::Regress => "regress",
            InferenceMethod::MultiInference => "multi_inference",
        }
    }
}

/// The unit of monitoring: one model version and signature.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// Model name, from the URL (REST) or the request's `model_spec` (gRPC).
    pub model: String,
    /// Served version, from the response's `model_spec` or the URL; None when unknown.
    pub version: Option<i64>,
    /// Signature name; `serving_default` when the request names none.
    pub signature: String,
}

/// The values of one feature column, one entry per row.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureValues {
    /// Floats and integers; NaN marks a missing value. `integer` is true for integer
    /// dtypes, which also get top-k frequencies while their distinct values are few.
    Numeric { values: Vec<f64>, integer: bool },
    /// Strings and bools (as `true`/`false`); None marks a missing value.
    Categorical(Vec<Option<String>>),
}

impl FeatureValues {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            FeatureValues::Numeric { values, .. } => values.len(),
            FeatureValues::Categorical(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One named input feature (`age`, `x_3`, ...), as DESIGN.md names them.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureColumn {
    pub name: String,
    pub values: FeatureValues,
}

/// Class probabilities of every row, `rows × classes`, row-major.
///
/// A binary sigmoid output `[n]`/`[n,1]` is represented as two classes
/// `[1 - p, p]` with `threshold` set: class 1 is predicted when `p > threshold`.
#[derive(Debug, Clone, PartialEq)]
pub struct Probabilities {
    /// Number of classes, at least 2.
    pub classes: usize,
    /// `rows × classes` values in [0, 1], row-major.
    pub values: Vec<f64>,
    /// Class names by index (from `Classify` labels or the model's config).
    pub class_names: Option<Vec<String>>,
    /// Set for binary sigmoid outputs (and binary models configured with one).
    pub threshold: Option<f64>,
}

impl Probabilities {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.values.len().checked_div(self.classes).unwrap_or(0)
    }

    /// The probabilities of one row.
    pub fn row(&self, row: usize) -> &[f64] {
        &self.values[row * self.classes..(row + 1) * self.classes]
    }

    /// The predicted class of one row: by threshold for binary sigmoid, else argmax.
    pub fn predicted_class(&self, row: usize) -> usize {
        let p = self.row(row);
        if let (Some(t), 2) = (self.threshold, self.classes) {
            return usize::from(p[1] > t);
        }
        let mut best = 0;
        for (i, v) in p.iter().enumerate() {
            if *v > p[best] {
                best = i;
            }
        }
        best
    }

    /// The name of a class: the configured or reported name, else `class_<i>`.
    pub fn class_name(&self, class: usize) -> String {
        match self.class_names.as_ref().and_then(|names| names.get(class)) {
            Some(name) => name.clone(),
            None => format!("class_{class}"),
        }
    }
}

/// What the worker learned from one exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub stream: StreamKey,
    pub method: InferenceMethod,
    /// The exchange's start: the time that buckets it.
    pub event_time: SystemTime,
    /// The exchange's request id (see `row_id`).
    pub request_id: String,
    /// Rows (examples) in the batch.
    pub rows: usize,
    /// Input features, each with exactly `rows` values.
    pub features: Vec<FeatureColumn>,
    /// Class probabilities (Predict) or scores per label (Classify).
    pub probabilities: Option<Probabilities>,
    /// Regression values (Regress, or a Predict output that is not probabilities).
    pub regression: Option<Vec<f64>>,
    /// Per-row ids from the configured id feature, when the model has one.
    pub row_ids: Option<Vec<String>>,
    /// Upstream latency of the exchange.
    pub upstream_latency: Duration,
}

impl Observation {
    /// The id labels use for one row: the id feature's value, else the request id,
    /// suffixed `:<row>` when the batch has more than one row.
    pub fn row_id(&self, row: usize) -> String {
        if let Some(id) = self.row_ids.as_ref().and_then(|ids| ids.get(row)) {
            return id.clone();
        }
        if self.rows > 1 {
            format!("{}:{row}", self.request_id)
        } else {
            self.request_id.clone()
        }
    }
}

/// Why a payload could not be turned into observations. `reason` is a short,
/// fixed label (`truncated_frame`, `bad_protobuf`, `bad_json`, `not_probabilities`,
/// `unsupported_dtype`, `too_large`, ...) used in metrics; `detail` is for debug logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub reason: &'static str,
    pub detail: String,
}

/// What the worker learns from one exchange, whatever its outcome.
#[derive(Debug, Clone, Default)]
pub struct Decoded {
    /// The model, when the URL or the request says it (also for failed exchanges).
    pub model: Option<String>,
    /// The inference method, when known.
    pub method: Option<InferenceMethod>,
    /// The observations: one for Predict/Classify/Regress, one per task for
    /// MultiInference, none for an exchange that failed upstream or could not be decoded.
    pub observations: Vec<Observation>,
    /// Problems met while decoding; data that decoded fine is still observed.
    pub errors: Vec<DecodeError>,
}

/// Turns exchanges into observations, with the per-model overrides of the config.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    models: std::collections::BTreeMap<String, crate::config::ModelConfig>,
}

impl Decoder {
    pub fn new(models: std::collections::BTreeMap<String, crate::config::ModelConfig>) -> Self {
        Decoder { models }
    }

    /// Decodes one exchange. (Placeholder until the decoders land: reports the
    /// exchange as undecoded.)
    pub fn decode(&self, _exchange: &crate::capture::Exchange) -> Decoded {
        let _ = &self.models;
        Decoded {
            errors: vec![DecodeError { reason: "not_implemented", detail: "decoders pending".into() }],
            ..Decoded::default()
        }
    }
}
