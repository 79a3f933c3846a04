//! TF Serving protocol knowledge: URL shapes, JSON formats, TensorProto, tf.Example,
//! gRPC framing and compression. Turns a captured `Exchange` into an `Observation`.
//!
//! Everything here runs in the worker, off the hot path, on untrusted bytes: it never
//! panics on input and never allocates past a configured bound (`DecodeLimits`).
//!
//! Layers: `tensor` (TensorProto, tf.Example lists → `Tensor`), `json` (TF Serving's
//! JSON, scanned without recursion), `grpc` and `rest` (protocol → `Call`), `observe`
//! (naming and probability rules → `Observation`), `schema` (model signatures fetched
//! once per model version, off the decode path).
//!
//! Wiring in the worker:
//!
//! ```ignore
//! // inside the tokio runtime (the signature fetcher is a task on it):
//! let source = SchemaSource::new(Some(grpc_upstream), Some(rest_upstream), Duration::from_secs(5));
//! let decoder = Decoder::new(models).with_schemas(SchemaCache::spawn(source));
//! // per exchange, on a worker thread (synchronous, never waits on the network):
//! let decoded = decoder.decode(&exchange);
//! for e in &decoded.errors { /* decode_errors{reason = e.reason} += 1 */ }
//! ```

pub mod call;
pub mod grpc;
pub mod json;
pub mod model_config;
pub mod observe;
pub mod proto;
pub mod rest;
pub mod schema;
pub mod tensor;
pub mod versions;

pub use call::{Call, CallDecoded, Inputs, Outputs, TaskResult};
pub use model_config::{ModelConfig, Task};
pub use schema::{ModelSchema, SchemaCache, SchemaKey, SchemaSource, SignatureSchema};
pub use tensor::{DType, NamedTensor, Tensor, TensorValues};
pub use versions::{ServedVersions, VersionSource};

use crate::capture::{Bodies, CallMethod};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Which inference API produced an observation: the inference subset of the proxy's
/// `CallMethod`, spelled the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InferenceMethod {
    Predict,
    Classify,
    Regress,
    MultiInference,
}

impl InferenceMethod {
    /// The name used in metric dimensions (`method` property): `CallMethod`'s spelling.
    pub fn as_str(self) -> &'static str {
        CallMethod::from(self).as_str()
    }

    /// The inference method of a call the proxy classified; None for other calls.
    pub fn of_call(method: CallMethod) -> Option<InferenceMethod> {
        Some(match method {
            CallMethod::Predict => InferenceMethod::Predict,
            CallMethod::Classify => InferenceMethod::Classify,
            CallMethod::Regress => InferenceMethod::Regress,
            CallMethod::MultiInference => InferenceMethod::MultiInference,
            _ => return None,
        })
    }
}

impl From<InferenceMethod> for CallMethod {
    fn from(method: InferenceMethod) -> CallMethod {
        match method {
            InferenceMethod::Predict => CallMethod::Predict,
            InferenceMethod::Classify => CallMethod::Classify,
            InferenceMethod::Regress => CallMethod::Regress,
            InferenceMethod::MultiInference => CallMethod::MultiInference,
        }
    }
}

/// The unit of monitoring: one model version and signature.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
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

/// One named input feature (`age`, `x_3`, ...), as docs/architecture.md names them.
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

impl DecodeError {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        DecodeError { reason, detail: detail.into() }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for DecodeError {}

/// The fixed `reason` labels of `DecodeError`.
pub mod reason {
    /// A gRPC frame header or message cut short (or an invalid compressed flag).
    pub const TRUNCATED_FRAME: &str = "truncated_frame";
    /// A gRPC body with no message at all.
    pub const MISSING_MESSAGE: &str = "missing_message";
    /// More than one message in a unary gRPC body (the first is used).
    pub const EXTRA_FRAMES: &str = "extra_frames";
    /// Bytes that are not the expected protobuf message.
    pub const BAD_PROTOBUF: &str = "bad_protobuf";
    /// A body that is not TF Serving's JSON, or lacks its required keys.
    pub const BAD_JSON: &str = "bad_json";
    /// JSON nested deeper than `max_json_depth`.
    pub const TOO_DEEP: &str = "too_deep";
    /// A `{"b64": ...}` value that is not base64.
    pub const BAD_BASE64: &str = "bad_base64";
    /// Nested lists of different lengths in one tensor, or a named input missing from some rows.
    pub const RAGGED: &str = "ragged";
    /// Numbers, strings and bools mixed in one tensor.
    pub const MIXED_TYPES: &str = "mixed_types";
    /// A compressed body that does not inflate.
    pub const BAD_COMPRESSION: &str = "bad_compression";
    /// A compression other than gzip/deflate/identity.
    pub const UNSUPPORTED_ENCODING: &str = "unsupported_encoding";
    /// Past `max_elements` or `max_decompressed_bytes`.
    pub const TOO_LARGE: &str = "too_large";
    /// A negative dimension or an unknown rank.
    pub const BAD_SHAPE: &str = "bad_shape";
    /// More typed values than the shape holds.
    pub const BAD_TENSOR: &str = "bad_tensor";
    /// `tensor_content` whose length is not elements × width.
    pub const BAD_TENSOR_CONTENT: &str = "bad_tensor_content";
    /// A dtype mltap does not decode (complex, quantized, ...); the tensor is skipped.
    pub const UNSUPPORTED_DTYPE: &str = "unsupported_dtype";
    /// Not a PredictionService method or a REST inference URL.
    pub const UNKNOWN_PATH: &str = "unknown_path";
    /// A REST call that named no version, whose served version TF Serving's model
    /// status did not give (unreachable): observed without a version.
    pub const UNRESOLVED_VERSION: &str = "unresolved_version";
    /// A tensor (or results) whose rows differ from the batch.
    pub const BATCH_MISMATCH: &str = "batch_mismatch";
    /// An input that would pass `max_features` feature columns; it is skipped.
    pub const TOO_MANY_FEATURES: &str = "too_many_features";
    /// The probabilities output holds rows that are not distributions.
    pub const NOT_PROBABILITIES: &str = "not_probabilities";
    /// Classify results whose labels differ between examples.
    pub const INCONSISTENT_CLASSES: &str = "inconsistent_classes";
    /// A regression model's prediction output that is not one number per row.
    pub const NOT_REGRESSION: &str = "not_regression";
    /// Results that contradict the model's configured `task` (Classify results of a
    /// regression model, Regress results of a classifier); they are not scored.
    pub const TASK_MISMATCH: &str = "task_mismatch";

    /// Every reason, to pre-register metric labels.
    pub const ALL: [&str; 24] = [
        TRUNCATED_FRAME,
        MISSING_MESSAGE,
        EXTRA_FRAMES,
        BAD_PROTOBUF,
        BAD_JSON,
        TOO_DEEP,
        BAD_BASE64,
        RAGGED,
        MIXED_TYPES,
        BAD_COMPRESSION,
        UNSUPPORTED_ENCODING,
        TOO_LARGE,
        BAD_SHAPE,
        BAD_TENSOR,
        BAD_TENSOR_CONTENT,
        UNSUPPORTED_DTYPE,
        UNKNOWN_PATH,
        BATCH_MISMATCH,
        TOO_MANY_FEATURES,
        NOT_PROBABILITIES,
        INCONSISTENT_CLASSES,
        NOT_REGRESSION,
        TASK_MISMATCH,
        UNRESOLVED_VERSION,
    ];
}

/// What decoding one exchange works with: its bounds, its element budget, and
/// whether the response is read (it is not for a failed exchange).
pub struct Decoding<'a> {
    pub limits: &'a DecodeLimits,
    pub budget: tensor::Budget,
    pub with_response: bool,
}

/// Bounds on what decoding one exchange may allocate.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeLimits {
    /// Tensor elements (values, strings, example features) decoded per exchange.
    pub max_elements: usize,
    /// Bytes an inflated body or gRPC message may reach (gzip bombs stop here).
    pub max_decompressed_bytes: usize,
    /// JSON nesting accepted (tensors are rarely deeper than 5).
    pub max_json_depth: usize,
    /// Feature columns per observation; wider inputs (images) are skipped.
    pub max_features: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_elements: 1 << 23,
            max_decompressed_bytes: 100 << 20,
            max_json_depth: 64,
            max_features: 1024,
        }
    }
}

/// Lets a few debug lines through per second, so that a flood of bad payloads
/// cannot flood the log.
#[derive(Debug, Default)]
struct LogLimiter {
    /// The second (since the epoch) the count belongs to.
    second: AtomicU64,
    /// Lines logged in that second.
    count: AtomicU64,
}

impl LogLimiter {
    const PER_SECOND: u64 = 10;

    fn allow(&self) -> bool {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < Self::PER_SECOND
    }
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
    /// Whether the observations carry the inputs (a sampled exchange). Observations of
    /// a count record carry the outputs only: they count rows and classes exactly and
    /// leave feature statistics to the sampled exchanges.
    pub sampled: bool,
}

/// Turns exchanges into observations, with the per-model overrides of the config.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// Per-model overrides: probabilities output, class names, threshold, categorical
    /// features, id feature.
    models: std::collections::BTreeMap<String, ModelConfig>,
    /// Allocation bounds per exchange.
    limits: DecodeLimits,
    /// Model signatures, to name unnamed REST tensors; None names them `input`.
    schemas: Option<SchemaCache>,
    /// Served versions, for REST calls that name none; None leaves them versionless.
    versions: Option<ServedVersions>,
    /// Shared by clones, so that all worker threads share one log budget.
    log: Arc<LogLimiter>,
}

impl Decoder {
    pub fn new(models: std::collections::BTreeMap<String, ModelConfig>) -> Self {
        Decoder { models, ..Decoder::default() }
    }

    /// Replaces the default allocation bounds.
    pub fn with_limits(mut self, limits: DecodeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Names unnamed REST tensors from model signatures (see `SchemaCache::spawn`).
    pub fn with_schemas(mut self, schemas: SchemaCache) -> Self {
        self.schemas = Some(schemas);
        self
    }

    /// Attributes REST calls that name no version to the version TF Serving serves
    /// (see `ServedVersions`). Decoding may then wait up to `first_wait` on a model's
    /// first call: only decode on threads that may block.
    pub fn with_versions(mut self, versions: ServedVersions) -> Self {
        self.versions = Some(versions);
        self
    }

    /// The allocation bounds in use.
    pub fn limits(&self) -> &DecodeLimits {
        &self.limits
    }

    /// Decodes the bodies of one exchange into a protocol-neutral `Call`, without
    /// naming or probability rules. The bodies of a failed or incomplete exchange are
    /// not read, except a gRPC request's, for the model name. A count record (only
    /// the response and a request prefix) gives a call with `Inputs::Unsampled`.
    pub fn decode_call(&self, exchange: &crate::capture::Exchange) -> CallDecoded {
        let succeeded = exchange.complete && exchange.status == 200 && exchange.grpc_status.unwrap_or(0) == 0;
        let mut decoding = Decoding {
            limits: &self.limits,
            budget: tensor::Budget::new(self.limits.max_elements),
            with_response: succeeded,
        };
        let sampled = exchange.bodies == Bodies::Full;
        let mut out = match (exchange.protocol, sampled) {
            (crate::capture::Protocol::Grpc, true) => grpc::decode_exchange(exchange, &mut decoding),
            (crate::capture::Protocol::Rest, true) => rest::decode_exchange(exchange, &mut decoding),
            (crate::capture::Protocol::Grpc, false) => grpc::decode_count_record(exchange, &mut decoding),
            (crate::capture::Protocol::Rest, false) => rest::decode_count_record(exchange, &mut decoding),
        };
        out.succeeded = succeeded;
        if !succeeded {
            // The upstream or the client failed the call; its payload problems are theirs.
            out.errors.clear();
            out.call = None;
        }
        out
    }

    /// Decodes one exchange.
    pub fn decode(&self, exchange: &crate::capture::Exchange) -> Decoded {
        let CallDecoded { model, method, mut call, errors, .. } = self.decode_call(exchange);
        let sampled = exchange.sampled();
        let mut decoded = Decoded { model, method, observations: Vec::new(), errors, sampled };
        if let (Some(call), Some(versions)) = (&mut call, &self.versions) {
            let unversioned = call.version.is_none() && call.version_label.is_none();
            if unversioned && exchange.protocol == crate::capture::Protocol::Rest {
                call.version = versions.get(&call.model);
                if call.version.is_none() {
                    decoded.errors.push(DecodeError::new(
                        reason::UNRESOLVED_VERSION,
                        format!("model `{}`: TF Serving's model status gave no served version", call.model),
                    ));
                }
            }
        }
        if let Some(call) = call {
            let schema = self.schema_for(exchange, &call);
            let context = observe::Context {
                exchange,
                models: &self.models,
                limits: &self.limits,
                signature: schema.as_deref().and_then(|s| s.signature(&call.signature)),
            };
            decoded.observations = observe::observations(&call, &context, &mut decoded.errors);
        }
        for error in &decoded.errors {
            if self.log.allow() {
                tracing::debug!(
                    message = "Payload not fully decoded.",
                    reason = error.reason,
                    detail = %error.detail,
                    path = %exchange.path,
                    request_id = %exchange.request_id,
                );
            }
        }
        decoded
    }

    /// Whether labels of `model` refer to rows by an input feature (`id_feature`): the
    /// rows of its count records, whose inputs are not copied, cannot be joined.
    pub fn ids_rows_by_feature(&self, model: &str) -> bool {
        self.models.get(model).is_some_and(|m| m.id_feature.is_some())
    }

    /// The signature of a REST call's model version, when the cache has it (a miss
    /// asks the fetcher and returns None at once).
    fn schema_for(&self, exchange: &crate::capture::Exchange, call: &Call) -> Option<Arc<ModelSchema>> {
        if exchange.protocol != crate::capture::Protocol::Rest {
            return None;
        }
        let key = SchemaKey { model: call.model.clone(), version: call.version, label: call.version_label.clone() };
        self.schemas.as_ref()?.get(&key)
    }
}
