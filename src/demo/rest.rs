//! The demo model server's REST front end, in TF Serving's shapes: `GET /v1/models/M`
//! (status), `GET /v1/models/M/metadata`, `POST /v1/models/M[/versions/V]:predict`
//! in the row (`instances` → `predictions`) and columnar (`inputs` → `outputs`)
//! formats, `:classify` over JSON examples, `:regress`, and errors as
//! `{"error": "..."}` with TF Serving's statuses.
//!
//! It translates JSON only; what the model computes lives in `serving`.

use super::model::LinearModel;
use super::serving::{self, Registry, ServingError, VersionRequest};
use super::tensor::{example, Column};
use crate::tfserving::proto::tensorflow::{SignatureDef, TensorInfo};
use crate::tfserving::proto::{DataType, Example};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Largest request body read, so that a runaway client cannot exhaust memory.
const MAX_BODY_BYTES: usize = 32 << 20;

/// The REST front end over one registry.
#[derive(Debug, Clone)]
pub struct RestModelServer {
    /// The served models, shared with the gRPC front end.
    pub registry: Arc<Registry>,
}

/// What a `/v1/models/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    model: String,
    version: VersionRequest,
    /// `predict`, `classify`, `regress`, `metadata`, or empty for the status.
    action: String,
}

fn parse_target(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/v1/models/")?;
    let (rest, verb) = match rest.rsplit_once(':') {
        Some((head, verb)) => (head, Some(verb)),
        None => (rest, None),
    };
    let mut parts: Vec<&str> = rest.split('/').collect();
    let mut action = verb.unwrap_or("").to_string();
    if verb.is_none() && parts.last() == Some(&"metadata") {
        parts.pop();
        action = "metadata".into();
    }
    let version = match parts.as_slice() {
        [_] => VersionRequest::Latest,
        [_, "versions", v] => VersionRequest::Specific(v.parse().ok()?),
        [_, "labels", l] => VersionRequest::Label(l.to_string()),
        _ => return None,
    };
    if parts[0].is_empty() {
        return None;
    }
    Some(Target { model: parts[0].to_string(), version, action })
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    // TF Serving pretty-prints with four spaces.
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    if serde::Serialize::serialize(body, &mut serializer).is_err() {
        out = b"{}".to_vec();
    }
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(out)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error_response(error: &ServingError) -> Response<Full<Bytes>> {
    json_response(error.http_status(), &json!({ "error": error.message }))
}

impl RestModelServer {
    /// Answers one HTTP request.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        if !path.starts_with("/v1/") {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Full::new(Bytes::new()))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
        }
        let malformed = || ServingError::invalid(format!("Malformed request: {method} {path}"));
        let Some(target) = parse_target(&path) else { return error_response(&malformed()) };
        let body = match Limited::new(request.into_body(), MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return error_response(&ServingError::invalid(format!("Could not read the request body: {e}"))),
        };
        let result = match (&method, target.action.as_str()) {
            (&Method::GET, "") => self.status(&target),
            (&Method::GET, "metadata") => self.metadata(&target),
            (&Method::POST, "predict") => self.predict(&target, &body),
            (&Method::POST, "classify") => self.classify(&target, &body),
            (&Method::POST, "regress") => self.regress(&target, &body),
            _ => Err(malformed()),
        };
        match result {
            Ok(value) => json_response(200, &value),
            Err(error) => error_response(&error),
        }
    }

    fn resolve(&self, target: &Target) -> Result<&LinearModel, ServingError> {
        self.registry.resolve(&target.model, &target.version)
    }

    fn status(&self, target: &Target) -> Result<Value, ServingError> {
        let model = self.resolve(target)?;
        Ok(json!({
            "model_version_status": [{
                "version": model.version.to_string(),
                "state": "AVAILABLE",
                "status": { "error_code": "OK", "error_message": "" }
            }]
        }))
    }

    fn metadata(&self, target: &Target) -> Result<Value, ServingError> {
        let model = self.resolve(target)?;
        let mut defs: Vec<(String, SignatureDef)> = serving::signature_defs(model).into_iter().collect();
        defs.sort_by(|a, b| a.0.cmp(&b.0));
        let signature_def: Map<String, Value> =
            defs.iter().map(|(name, def)| (name.clone(), signature_json(def))).collect();
        Ok(json!({
            "model_spec": { "name": model.name, "signature_name": "", "version": model.version.to_string() },
            "metadata": { "signature_def": { "signature_def": signature_def } }
        }))
    }

    fn predict(&self, target: &Target, body: &[u8]) -> Result<Value, ServingError> {
        let model = self.resolve(target)?;
        let request = parse_json(body)?;
        let signature = request.get("signature_name").and_then(Value::as_str).unwrap_or("");
        let (columns, row_format) = match (request.get("instances"), request.get("inputs")) {
            (Some(_), Some(_)) => {
                return Err(ServingError::invalid(
                    "Not formatted correctly expecting only one of 'inputs' or 'instances' keys exists",
                ))
            }
            (Some(instances), None) => (row_columns(model, instances)?, true),
            (None, Some(inputs)) => (columnar_columns(model, inputs)?, false),
            (None, None) => return Err(ServingError::invalid("Missing 'inputs' or 'instances' key")),
        };
        let prediction = serving::predict(model, signature, &columns)?;
        let probability_row = |p: &[f32]| Value::Array(p.iter().map(|&v| float_json(v)).collect());
        if model.is_regression() {
            // A single output: TF Serving answers its values without the output's name.
            let values: Vec<Value> = prediction.probabilities.iter().map(|p| probability_row(p)).collect();
            let key = if row_format { "predictions" } else { "outputs" };
            return Ok(json!({ key: values }));
        }
        if row_format {
            let predictions = prediction
                .probabilities
                .iter()
                .zip(&prediction.class_ids)
                .map(|(p, c)| json!({ "probabilities": probability_row(p), "class_ids": c }))
                .collect();
            Ok(json!({ "predictions": Value::Array(predictions) }))
        } else {
            let probabilities: Vec<Value> = prediction.probabilities.iter().map(|p| probability_row(p)).collect();
            Ok(json!({ "outputs": { "probabilities": probabilities, "class_ids": prediction.class_ids } }))
        }
    }

    fn classify(&self, target: &Target, body: &[u8]) -> Result<Value, ServingError> {
        let model = self.resolve(target)?;
        let request = parse_json(body)?;
        let signature = request.get("signature_name").and_then(Value::as_str).unwrap_or("");
        serving::expect_method(signature, "classification", serving::CLASSIFY_METHOD)?;
        let examples = match request.get("examples") {
            Some(Value::Array(items)) => items.iter().map(json_example).collect::<Result<Vec<_>, _>>()?,
            _ => return Err(ServingError::invalid("'examples' key is missing in the request")),
        };
        let context = request.get("context").map(json_example).transpose()?;
        let results = serving::classify(model, &examples, context.as_ref())?;
        let results: Vec<Value> = results
            .into_iter()
            .map(|classes| {
                Value::Array(classes.into_iter().map(|(label, score)| json!([label, float_json(score)])).collect())
            })
            .collect();
        Ok(json!({ "results": results }))
    }

    fn regress(&self, target: &Target, body: &[u8]) -> Result<Value, ServingError> {
        self.resolve(target)?;
        let request = parse_json(body)?;
        let signature = request.get("signature_name").and_then(Value::as_str).unwrap_or("");
        // Neither demo model has a regression head: this fails as TF Serving would.
        serving::expect_method(signature, "regression", serving::REGRESS_METHOD)?;
        Err(ServingError::invalid("no regression signature"))
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ServingError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ServingError::invalid(format!("JSON Parse error: {e} at line {} column {}", e.line(), e.column()))
    })?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ServingError::invalid("JSON Value: the request body must be a JSON object"))
    }
}

fn float_json(v: f32) -> Value {
    serde_json::Number::from_f64(f64::from(v)).map(Value::Number).unwrap_or(Value::Null)
}

/// A scalar of a row or column: a number, a string, or either wrapped in a one-element
/// list (a `[n, 1]` input).
fn scalar(value: &Value) -> Option<&Value> {
    match value {
        Value::Array(items) if items.len() == 1 => scalar(&items[0]),
        Value::Number(_) | Value::String(_) => Some(value),
        _ => None,
    }
}

/// Builds a column from the JSON values of one input, checking each value's type.
fn column(model: &LinearModel, name: &str, values: &[&Value]) -> Result<Column, ServingError> {
    let bad = |i: usize, want: &str| {
        ServingError::invalid(format!("input '{name}', value {i}: expected a {want} (or a list holding one)"))
    };
    if name == model.categorical {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| scalar(v).and_then(Value::as_str).map(str::to_string).ok_or_else(|| bad(i, "string")))
            .collect::<Result<Vec<_>, _>>()
            .map(Column::Strings)
    } else {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| scalar(v).and_then(Value::as_f64).ok_or_else(|| bad(i, "number")))
            .collect::<Result<Vec<_>, _>>()
            .map(Column::Numeric)
    }
}

fn row_columns(model: &LinearModel, instances: &Value) -> Result<HashMap<String, Column>, ServingError> {
    let Value::Array(rows) = instances else {
        return Err(ServingError::invalid("Excepted 'instances' to be a list/array"));
    };
    let mut by_name: HashMap<&str, Vec<&Value>> = HashMap::new();
    for (index, row) in rows.iter().enumerate() {
        let Value::Object(fields) = row else {
            return Err(ServingError::invalid(format!(
                "instances[{index}]: expecting an object keyed by input name, as the model has several inputs"
            )));
        };
        for (name, value) in fields {
            by_name.entry(name.as_str()).or_default().push(value);
        }
    }
    let mut columns = HashMap::new();
    for (name, values) in by_name {
        if values.len() != rows.len() {
            return Err(ServingError::invalid(format!(
                "Failed to process element: {} key: {name} of 'instances' list. Error: Invalid argument: \
                 expecting all lists to be of same size",
                values.len()
            )));
        }
        columns.insert(name.to_string(), column(model, name, &values)?);
    }
    Ok(columns)
}

fn columnar_columns(model: &LinearModel, inputs: &Value) -> Result<HashMap<String, Column>, ServingError> {
    let Value::Object(by_name) = inputs else {
        return Err(ServingError::invalid(
            "'inputs' must be an object keyed by input name, as the model has several inputs",
        ));
    };
    let mut columns = HashMap::new();
    for (name, values) in by_name {
        let values: Vec<&Value> = match values {
            Value::Array(items) => items.iter().collect(),
            single => vec![single],
        };
        columns.insert(name.clone(), column(model, name, &values)?);
    }
    Ok(columns)
}

/// A JSON example (`{"age": 30.5, "country": "fr"}`) as a tf.Example.
fn json_example(value: &Value) -> Result<Example, ServingError> {
    let Value::Object(fields) = value else {
        return Err(ServingError::invalid("each example must be a JSON object of feature values"));
    };
    let mut numeric = Vec::new();
    let mut text = Vec::new();
    for (name, value) in fields {
        match scalar(value) {
            Some(Value::Number(n)) => numeric.push((name.as_str(), n.as_f64().unwrap_or(f64::NAN))),
            Some(Value::String(s)) => text.push((name.as_str(), s.as_str())),
            _ => return Err(ServingError::invalid(format!("feature '{name}' must be a number or a string"))),
        }
    }
    Ok(example(&numeric, &text))
}

fn signature_json(def: &SignatureDef) -> Value {
    let tensors = |map: &HashMap<String, TensorInfo>| -> Value {
        let mut names: Vec<&String> = map.keys().collect();
        names.sort();
        Value::Object(names.into_iter().map(|n| (n.clone(), tensor_info_json(&map[n]))).collect())
    };
    json!({ "inputs": tensors(&def.inputs), "outputs": tensors(&def.outputs), "method_name": def.method_name })
}

fn tensor_info_json(info: &TensorInfo) -> Value {
    use crate::tfserving::proto::tensorflow::tensor_info::Encoding;
    let dims: Vec<Value> = info
        .tensor_shape
        .as_ref()
        .map(|s| s.dim.iter().map(|d| json!({ "size": d.size.to_string(), "name": d.name })).collect())
        .unwrap_or_default();
    let name = match &info.encoding {
        Some(Encoding::Name(n)) => n.clone(),
        _ => String::new(),
    };
    let dtype = DataType::try_from(info.dtype).map(|d| d.as_str_name()).unwrap_or("DT_INVALID");
    json!({ "dtype": dtype, "tensor_shape": { "dim": dims, "unknown_rank": false }, "name": name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_like_tf_serving_routes_them() {
        let t = parse_target("/v1/models/churn/versions/1:predict").unwrap();
        assert_eq!(
            (t.model.as_str(), &t.version, t.action.as_str()),
            ("churn", &VersionRequest::Specific(1), "predict")
        );
        let t = parse_target("/v1/models/churn/metadata").unwrap();
        assert_eq!((t.version, t.action.as_str()), (VersionRequest::Latest, "metadata"));
        assert!(parse_target("/v1/models/churn/versions/x:predict").is_none());
        assert!(parse_target("/v1/models/:predict").is_none());
    }
}
