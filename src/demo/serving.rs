//! The protocol-neutral core of the demo's model server: which model a request names,
//! which signature it calls, turning input columns or tf.Examples into rows, running
//! the model, and TF Serving's error codes and messages. The gRPC and REST front ends
//! only translate between their wire formats and this.
//!
//! It never does I/O and never panics on a request, however malformed.

use super::model::{LinearModel, Row};
use super::tensor::{example_feature, Column, FeatureValue};
use crate::tfserving::proto::tensorflow::tensor_info::Encoding;
use crate::tfserving::proto::tensorflow::{SignatureDef, TensorInfo};
use crate::tfserving::proto::{DataType, Example, Feature};
use std::collections::{BTreeSet, HashMap};

/// The predict signature, and the one used when a request names none.
pub const SERVING_DEFAULT: &str = "serving_default";
/// The classify signature, taking serialized tf.Examples.
pub const CLASSIFICATION: &str = "classification";
/// `method_name` of predict signatures.
pub const PREDICT_METHOD: &str = "tensorflow/serving/predict";
/// `method_name` of classify signatures.
pub const CLASSIFY_METHOD: &str = "tensorflow/serving/classify";
/// `method_name` of regress signatures.
pub const REGRESS_METHOD: &str = "tensorflow/serving/regress";

/// The canonical error codes TF Serving answers with, as far as the demo needs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Bad request: malformed body, unknown input, wrong dtype or shape.
    InvalidArgument,
    /// No such model, version or signature.
    NotFound,
    /// An API this server does not offer.
    Unimplemented,
}

/// A failed request: its canonical code and TF Serving's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServingError {
    /// Decides the gRPC status and the HTTP status.
    pub code: ErrorCode,
    /// The message clients see (`{"error": ...}` in REST, the status message in gRPC).
    pub message: String,
}

impl ServingError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ServingError { code: ErrorCode::InvalidArgument, message: message.into() }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ServingError { code: ErrorCode::NotFound, message: message.into() }
    }

    /// The HTTP status TF Serving's REST API maps the code to.
    pub fn http_status(&self) -> u16 {
        match self.code {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Unimplemented => 501,
        }
    }

    /// The gRPC status.
    pub fn grpc_status(&self) -> tonic::Status {
        let code = match self.code {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::Unimplemented => tonic::Code::Unimplemented,
        };
        tonic::Status::new(code, self.message.clone())
    }
}

/// How a request names the version it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionRequest {
    /// No version: the latest.
    Latest,
    /// `version` in model_spec or `/versions/N` in the URL.
    Specific(i64),
    /// `version_label` or `/labels/L`.
    Label(String),
}

/// The models the server holds.
#[derive(Debug, Clone)]
pub struct Registry {
    /// Served models; names are unique.
    pub models: Vec<LinearModel>,
}

/// The outputs of a Predict call, in TF Serving's types (float32 probabilities).
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// `probabilities`, one row of `probability_width` values per input row.
    pub probabilities: Vec<Vec<f32>>,
    /// `class_ids`, one per input row.
    pub class_ids: Vec<i64>,
}

impl Registry {
    pub fn new(models: Vec<LinearModel>) -> Registry {
        Registry { models }
    }

    /// Finds the servable a request names, with TF Serving's not-found messages.
    pub fn resolve(&self, name: &str, version: &VersionRequest) -> Result<&LinearModel, ServingError> {
        let model = self.models.iter().find(|m| m.name == name);
        match (model, version) {
            (Some(m), VersionRequest::Latest) => Ok(m),
            (Some(m), VersionRequest::Specific(v)) if *v == m.version => Ok(m),
            (_, VersionRequest::Latest) => {
                Err(ServingError::not_found(format!("Servable not found for request: Latest({name})")))
            }
            (_, VersionRequest::Specific(v)) => {
                Err(ServingError::not_found(format!("Servable not found for request: Specific({name}, {v})")))
            }
            (Some(_), VersionRequest::Label(label)) => {
                Err(ServingError::invalid(format!("Unrecognized servable version label: {label}")))
            }
            (None, VersionRequest::Label(_)) => {
                Err(ServingError::not_found(format!("Servable not found for request: Latest({name})")))
            }
        }
    }
}

/// The signature a request names, `serving_default` when it names none.
pub fn signature_name(requested: &str) -> &str {
    if requested.is_empty() {
        SERVING_DEFAULT
    } else {
        requested
    }
}

/// The `method_name` of a signature of the model, or TF Serving's not-found error.
pub fn signature_method(requested: &str) -> Result<&'static str, ServingError> {
    match signature_name(requested) {
        SERVING_DEFAULT => Ok(PREDICT_METHOD),
        CLASSIFICATION => Ok(CLASSIFY_METHOD),
        other => Err(ServingError::invalid(format!("Serving signature name: \"{other}\" not found in signature def"))),
    }
}

/// Checks that a signature is of the kind an API needs, with TF Serving's message.
pub fn expect_method(requested: &str, api: &str, method: &str) -> Result<(), ServingError> {
    let found = signature_method(requested)?;
    if found == method {
        Ok(())
    } else {
        Err(ServingError::invalid(format!("Expected {api} signature method_name to be {method}. Was: {found}")))
    }
}

fn name_set<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let set: BTreeSet<&str> = names.into_iter().collect();
    format!("{{{}}}", set.into_iter().collect::<Vec<_>>().join(","))
}

/// The output of a regression model's predict signature: one value per row, `[n, 1]`.
pub const REGRESSION_OUTPUT: &str = "predictions";

/// Runs Predict on the model's predict signature, from named input columns.
pub fn predict(
    model: &LinearModel,
    signature: &str,
    inputs: &HashMap<String, Column>,
) -> Result<Prediction, ServingError> {
    if signature_method(signature)? != PREDICT_METHOD {
        return Err(ServingError::invalid(format!(
            "Predict on the \"{}\" signature is not offered by this model server; call Classify",
            signature_name(signature)
        )));
    }
    let expected = model.input_names();
    if let Some(unknown) = inputs.keys().find(|k| !expected.contains(&k.as_str())) {
        return Err(ServingError::invalid(format!(
            "input tensor alias not found in signature: {unknown}. Inputs expected to be in the set {}.",
            name_set(expected.iter().copied())
        )));
    }
    let missing: Vec<&str> = expected.iter().copied().filter(|n| !inputs.contains_key(*n)).collect();
    if !missing.is_empty() {
        return Err(ServingError::invalid(format!(
            "input size does not match signature: {}!={} len({}) != len({}). Sent extra: {{}}. Missing but required: {}.",
            inputs.len(),
            expected.len(),
            name_set(inputs.keys().map(String::as_str)),
            name_set(expected.iter().copied()),
            name_set(missing)
        )));
    }
    let rows = inputs.values().next().map(Column::len).unwrap_or(0);
    if let Some((name, column)) = inputs.iter().find(|(_, c)| c.len() != rows) {
        return Err(ServingError::invalid(format!(
            "input '{name}' has {} rows while the other inputs have {rows}: all inputs must share the batch size",
            column.len()
        )));
    }
    let mut batch: Vec<Row> =
        (0..rows).map(|_| Row { numeric: Vec::with_capacity(model.numeric.len()), category: String::new() }).collect();
    for (index, input) in model.numeric.iter().enumerate() {
        match &inputs[input.name] {
            Column::Numeric(values) => batch.iter_mut().zip(values).for_each(|(row, v)| row.numeric.push(*v)),
            Column::Strings(_) => {
                return Err(ServingError::invalid(format!(
                    "Expects arg[{index}] ({}) to be float but string is provided",
                    input.name
                )))
            }
        }
    }
    match &inputs[model.categorical] {
        Column::Strings(values) => batch.iter_mut().zip(values).for_each(|(row, v)| row.category = v.clone()),
        Column::Numeric(_) => {
            return Err(ServingError::invalid(format!(
                "Expects arg[{}] ({}) to be string but float is provided",
                model.numeric.len(),
                model.categorical
            )))
        }
    }
    Ok(run(model, &batch))
}

fn run(model: &LinearModel, batch: &[Row]) -> Prediction {
    let mut probabilities = Vec::with_capacity(batch.len());
    let mut class_ids = Vec::with_capacity(batch.len());
    for row in batch {
        let p = model.probabilities(row);
        class_ids.push(model.class_id(&p) as i64);
        // The served graph computes in float32; clients see float32 values.
        probabilities.push(p.iter().map(|&v| v as f32).collect());
    }
    Prediction { probabilities, class_ids }
}

/// Runs the classify signature on tf.Examples (with optional context features, which
/// every example inherits): per example, one `(class name, score)` per class.
pub fn classify(
    model: &LinearModel,
    examples: &[Example],
    context: Option<&Example>,
) -> Result<Vec<Vec<(String, f32)>>, ServingError> {
    if model.is_regression() {
        return Err(ServingError::invalid(format!(
            "Classify is not offered by {}: it is a regression model (call Predict)",
            model.name
        )));
    }
    let empty = HashMap::new();
    let context_features = context.and_then(|c| c.features.as_ref()).map(|f| &f.feature).unwrap_or(&empty);
    let mut results = Vec::with_capacity(examples.len());
    for example in examples {
        let features = example.features.as_ref().map(|f| &f.feature).unwrap_or(&empty);
        let row = row_from_example(model, features, context_features)?;
        let p = model.probabilities(&row);
        let scores = model.class_scores(&p);
        results.push(model.class_names.iter().zip(scores).map(|(name, s)| (name.to_string(), s as f32)).collect());
    }
    Ok(results)
}

fn row_from_example(
    model: &LinearModel,
    features: &HashMap<String, Feature>,
    context: &HashMap<String, Feature>,
) -> Result<Row, ServingError> {
    let lookup = |name: &str, kind: &str| -> Result<FeatureValue, ServingError> {
        let found = match example_feature(features, name).map_err(ServingError::invalid)? {
            Some(v) => Some(v),
            None => example_feature(context, name).map_err(ServingError::invalid)?,
        };
        found.ok_or_else(|| {
            ServingError::invalid(format!(
                "Name: <unknown>, Feature: {name} (data type: {kind}) is required but could not be found."
            ))
        })
    };
    let mut numeric = Vec::with_capacity(model.numeric.len());
    for input in &model.numeric {
        match lookup(input.name, "float")? {
            FeatureValue::Number(v) => numeric.push(v),
            FeatureValue::Text(_) => {
                return Err(ServingError::invalid(format!(
                    "Name: <unknown>, Feature: {} (data type: float) is a bytes_list",
                    input.name
                )))
            }
        }
    }
    let category = match lookup(model.categorical, "string")? {
        FeatureValue::Text(v) => v,
        FeatureValue::Number(_) => {
            return Err(ServingError::invalid(format!(
                "Name: <unknown>, Feature: {} (data type: string) is not a bytes_list",
                model.categorical
            )))
        }
    };
    Ok(Row { numeric, category })
}

fn tensor_info(name: &str, dtype: DataType, dims: &[i64]) -> TensorInfo {
    TensorInfo {
        encoding: Some(Encoding::Name(name.to_string())),
        dtype: dtype as i32,
        tensor_shape: Some(super::tensor::shape(dims)),
    }
}

/// The model's SignatureDefs, as `GetModelMetadata` reports them.
pub fn signature_defs(model: &LinearModel) -> HashMap<String, SignatureDef> {
    let k = model.probability_width() as i64;
    let classes = model.classes() as i64;
    let mut inputs: HashMap<String, TensorInfo> = model
        .numeric
        .iter()
        .map(|i| (i.name.to_string(), tensor_info(&format!("serving_default_{}:0", i.name), DataType::DtFloat, &[-1])))
        .collect();
    inputs.insert(
        model.categorical.to_string(),
        tensor_info(&format!("serving_default_{}:0", model.categorical), DataType::DtString, &[-1]),
    );
    if model.is_regression() {
        let outputs = HashMap::from([(
            REGRESSION_OUTPUT.to_string(),
            tensor_info("StatefulPartitionedCall:0", DataType::DtFloat, &[-1, 1]),
        )]);
        let predict = SignatureDef { inputs, outputs, method_name: PREDICT_METHOD.to_string() };
        return HashMap::from([(SERVING_DEFAULT.to_string(), predict)]);
    }
    let outputs = HashMap::from([
        ("probabilities".to_string(), tensor_info("StatefulPartitionedCall:0", DataType::DtFloat, &[-1, k])),
        ("class_ids".to_string(), tensor_info("StatefulPartitionedCall:1", DataType::DtInt64, &[-1])),
    ]);
    let predict = SignatureDef { inputs, outputs, method_name: PREDICT_METHOD.to_string() };
    let classify = SignatureDef {
        inputs: HashMap::from([(
            "inputs".to_string(),
            tensor_info("input_example_tensor:0", DataType::DtString, &[-1]),
        )]),
        outputs: HashMap::from([
            ("classes".to_string(), tensor_info("StatefulPartitionedCall_1:0", DataType::DtString, &[-1, classes])),
            ("scores".to_string(), tensor_info("StatefulPartitionedCall_1:1", DataType::DtFloat, &[-1, classes])),
        ]),
        method_name: CLASSIFY_METHOD.to_string(),
    };
    HashMap::from([(SERVING_DEFAULT.to_string(), predict), (CLASSIFICATION.to_string(), classify)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn churn_inputs(rows: usize) -> HashMap<String, Column> {
        let model = LinearModel::churn();
        let mut inputs: HashMap<String, Column> =
            model.numeric.iter().map(|i| (i.name.to_string(), Column::Numeric(vec![i.center; rows]))).collect();
        inputs.insert("country".into(), Column::Strings(vec!["fr".into(); rows]));
        inputs
    }

    #[test]
    fn a_missing_input_is_named_in_the_error() {
        let mut inputs = churn_inputs(2);
        inputs.remove("income");
        let e = predict(&LinearModel::churn(), "", &inputs).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("Missing but required: {income}"), "{}", e.message);
    }

    #[test]
    fn an_unknown_version_is_not_found_with_tf_servings_message() {
        let registry = Registry::new(vec![LinearModel::churn()]);
        let e = registry.resolve("churn", &VersionRequest::Specific(7)).unwrap_err();
        assert_eq!((e.http_status(), e.message.as_str()), (404, "Servable not found for request: Specific(churn, 7)"));
        assert!(registry.resolve("churn", &VersionRequest::Specific(1)).is_ok());
    }

    #[test]
    fn classify_on_the_predict_signature_is_rejected_like_tf_serving() {
        let e = expect_method("", "classification", CLASSIFY_METHOD).unwrap_err();
        assert_eq!(
            e.message,
            "Expected classification signature method_name to be tensorflow/serving/classify. Was: tensorflow/serving/predict"
        );
    }
}
