//! What one inference call carried, protocol-neutral: the model spec, the inputs
//! (tensors or tf.Examples) and the outputs (tensors, classifications, regressions,
//! or per-task results of MultiInference). The gRPC and REST decoders produce it;
//! `observe` turns it into observations. It holds no naming or probability rules.

use super::tensor::{NamedTensor, TensorValues};
use super::{DecodeError, InferenceMethod};

/// One tf.Example (context merged in): its features by name, sorted by name.
pub type ExampleFeatures = Vec<(String, TensorValues)>;

/// The inputs of a call.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Inputs {
    /// Nothing decodable (a failed or malformed request).
    #[default]
    None,
    /// Predict: named tensors, sorted by name (`""` for an unnamed REST input).
    Tensors(Vec<NamedTensor>),
    /// Classify, Regress, MultiInference: one entry per example.
    Examples(Vec<ExampleFeatures>),
    /// Not copied: the exchange was only counted. Rows come from the outputs.
    Unsampled,
}

/// The outputs of a call.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Outputs {
    /// Nothing decodable (failed upstream, or a malformed response).
    #[default]
    None,
    /// Predict: named tensors, sorted by name (`""` for an unnamed REST output).
    Tensors(Vec<NamedTensor>),
    /// Classify: per example, its `(label, score)` pairs in the order served.
    Classifications(Vec<Vec<(String, f64)>>),
    /// Regress: one value per example.
    Regressions(Vec<f64>),
    /// MultiInference: one result per task.
    Tasks(Vec<TaskResult>),
}

/// The result of one MultiInference task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    /// Model name of the task (from the result's `model_spec`).
    pub model: String,
    /// Served version of the task, when the result says it.
    pub version: Option<i64>,
    /// Signature name of the task (may be empty).
    pub signature: String,
    /// Classify or Regress.
    pub method: InferenceMethod,
    /// `Classifications` or `Regressions`.
    pub outputs: Outputs,
}

/// A decoded call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: InferenceMethod,
    /// Model name from the request (gRPC `model_spec`, REST URL).
    pub model: String,
    /// The served version from the response's `model_spec`, else the requested one.
    pub version: Option<i64>,
    /// The requested version label (`/labels/L` or `version_label`), if any.
    pub version_label: Option<String>,
    /// Signature name: the response's, else the request's; empty when neither names one.
    pub signature: String,
    pub inputs: Inputs,
    pub outputs: Outputs,
}

/// The outcome of decoding the bodies of an exchange.
#[derive(Debug, Clone, Default)]
pub struct CallDecoded {
    /// The model, when known, even when decoding failed.
    pub model: Option<String>,
    /// The method, when the path says it.
    pub method: Option<InferenceMethod>,
    /// The call, when the request could be decoded (outputs may still be missing).
    pub call: Option<Call>,
    /// False when the upstream failed or the exchange ended early: nothing to observe.
    pub succeeded: bool,
    /// Problems met; data that decoded fine is kept.
    pub errors: Vec<DecodeError>,
}
