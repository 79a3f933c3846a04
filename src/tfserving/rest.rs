//! TF Serving's REST API: the URL shapes (`/v1/models/NAME[/versions/N|/labels/L]:verb`),
//! request bodies in row format (`instances`) and columnar format (`inputs`),
//! classify/regress bodies (`examples`, `context`), and the responses
//! (`predictions`, `outputs`, `results`), gzip- or deflate-encoded or not, turned into
//! a protocol-neutral `Call`.
//!
//! Bodies are read with the `json` scanner, never into a value tree. An unnamed
//! tensor keeps the empty name `""`; naming it is `observe`'s business.

use super::call::{Call, CallDecoded, ExampleFeatures, Inputs, Outputs};
use super::grpc::inflate;
use super::json::{Json, TensorBuilder};
use super::tensor::{Budget, NamedTensor, TensorValues};
use super::{reason, DecodeError, DecodeLimits, Decoding, InferenceMethod};
use crate::capture::Exchange;
use std::borrow::Cow;
use std::collections::HashMap;

/// What a REST inference URL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestPath {
    pub model: String,
    /// From `/versions/N`.
    pub version: Option<i64>,
    /// From `/labels/L`.
    pub label: Option<String>,
    pub method: InferenceMethod,
}

impl RestPath {
    /// The call this URL names, with its signature and inputs, before its outputs.
    fn call(self, signature: Option<String>, inputs: Inputs) -> Call {
        Call {
            method: self.method,
            model: self.model,
            version: self.version,
            version_label: self.label,
            signature: signature.unwrap_or_default(),
            inputs,
            outputs: Outputs::None,
        }
    }
}

/// Parses `/v1/models/NAME[/versions/N | /labels/L]:verb` (a query string is
/// ignored); None for any other path or verb.
pub fn parse_path(path: &str) -> Option<RestPath> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let rest = path.strip_prefix("/v1/models/")?;
    let (target, verb) = rest.rsplit_once(':')?;
    let method = match verb {
        "predict" => InferenceMethod::Predict,
        "classify" => InferenceMethod::Classify,
        "regress" => InferenceMethod::Regress,
        _ => return None,
    };
    let mut parts = target.split('/');
    let model = parts.next().filter(|m| !m.is_empty())?.to_string();
    let (version, label) = match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => (None, None),
        (Some("versions"), Some(v), None) => (Some(v.parse::<i64>().ok().filter(|v| *v >= 0)?), None),
        (Some("labels"), Some(l), None) if !l.is_empty() => (None, Some(l.to_string())),
        _ => return None,
    };
    Some(RestPath { model, version, label, method })
}

/// Inflates a body according to its `Content-Encoding`.
fn body<'b>(raw: &'b [u8], encoding: Option<&str>, limits: &DecodeLimits) -> Result<Cow<'b, [u8]>, DecodeError> {
    match encoding.map(str::trim) {
        None | Some("") | Some("identity") => Ok(Cow::Borrowed(raw)),
        Some(e) => inflate(e, raw, limits.max_decompressed_bytes).map(Cow::Owned),
    }
}

/// Decodes the bodies of a REST exchange; `with_response` is false for a failed
/// exchange, whose bodies are not read at all (only the URL is).
pub fn decode_exchange(exchange: &Exchange, decoding: &mut Decoding) -> CallDecoded {
    let Decoding { limits, ref mut budget, with_response } = *decoding;
    let mut out = CallDecoded::default();
    let Some(path) = inference_path(exchange, &mut out) else { return out };
    if !with_response {
        return out;
    }
    let raw = exchange.request_bytes();
    let request = body(&raw, exchange.request_encoding.as_deref(), limits)
        .and_then(|b| decode_request(path.method, &b, limits, budget));
    let (signature, inputs) = match request {
        Ok(r) => r,
        Err(e) => {
            out.errors.push(e);
            return out;
        }
    };
    let mut call = path.call(signature, inputs);
    response_into(&mut call, exchange, decoding, &mut out.errors);
    out.call = Some(call);
    out
}

/// Decodes the response's body into `call`'s outputs.
fn response_into(call: &mut Call, exchange: &Exchange, decoding: &mut Decoding, errors: &mut Vec<DecodeError>) {
    let Decoding { limits, ref mut budget, .. } = *decoding;
    let raw = exchange.response_bytes();
    match body(&raw, exchange.response_encoding.as_deref(), limits)
        .and_then(|b| decode_response(call.method, &b, limits, budget))
    {
        Ok(outputs) => call.outputs = outputs,
        Err(e) => errors.push(e),
    }
}

/// Model, version and label from the URL, with the method the proxy classified it as;
/// None (and `unknown_path`) when it is no inference URL.
fn inference_path(exchange: &Exchange, out: &mut CallDecoded) -> Option<RestPath> {
    let parsed = parse_path(&exchange.path);
    let method = InferenceMethod::of_call(exchange.method);
    let (Some(mut path), Some(method)) = (parsed, method) else {
        out.errors.push(DecodeError::new(reason::UNKNOWN_PATH, format!("`{}` is not an inference URL", exchange.path)));
        return None;
    };
    path.method = method;
    out.model = Some(path.model.clone());
    out.method = Some(method);
    Some(path)
}

/// Decodes a count record: model and version from the URL, `signature_name` from the
/// request's prefix (when the prefix holds it), the outputs from the response. The
/// call's inputs are `Inputs::Unsampled`.
pub fn decode_count_record(exchange: &Exchange, decoding: &mut Decoding) -> CallDecoded {
    let Decoding { limits, with_response, .. } = *decoding;
    let mut out = CallDecoded::default();
    let Some(path) = inference_path(exchange, &mut out) else { return out };
    let prefix = crate::capture::prefix(&exchange.request_body, crate::capture::REQUEST_PREFIX_BYTES).concat();
    let signature = match exchange.request_encoding.as_deref().map(str::trim) {
        None | Some("") | Some("identity") => prefix_signature(&prefix, limits),
        Some(_) => None,
    };
    let mut call = path.call(signature, Inputs::Unsampled);
    if with_response && exchange.bodies == crate::capture::Bodies::ResponseOnly {
        response_into(&mut call, exchange, decoding, &mut out.errors);
    }
    out.call = Some(call);
    out
}

/// A request's top-level `signature_name` when it comes before the prefix ends.
fn prefix_signature(prefix: &[u8], limits: &DecodeLimits) -> Option<String> {
    let mut json = Json::new(prefix, limits.max_json_depth);
    json.begin_object().ok()?;
    let mut first = true;
    while let Some(key) = json.next_key(&mut first).ok()? {
        if key == "signature_name" {
            return json.text().ok().map(Cow::into_owned);
        }
        json.skip_value().ok()?;
    }
    None
}

/// Decodes a request body: its `signature_name` and its inputs.
pub fn decode_request(
    method: InferenceMethod,
    body: &[u8],
    limits: &DecodeLimits,
    budget: &mut Budget,
) -> Result<(Option<String>, Inputs), DecodeError> {
    let mut json = Json::new(body, limits.max_json_depth);
    json.begin_object()?;
    let mut signature = None;
    let mut tensors: Option<Vec<NamedTensor>> = None;
    let mut examples: Option<Vec<ExampleFeatures>> = None;
    let mut context: Option<ExampleFeatures> = None;
    let mut first = true;
    while let Some(key) = json.next_key(&mut first)? {
        match (key.as_ref(), method) {
            ("signature_name", _) => signature = Some(json.text()?.into_owned()),
            ("instances", InferenceMethod::Predict) => tensors = Some(rows(&mut json, budget)?),
            ("inputs", InferenceMethod::Predict) => tensors = Some(columns(&mut json, budget)?),
            ("examples", InferenceMethod::Classify | InferenceMethod::Regress) => {
                let mut list = Vec::new();
                json.begin_array()?;
                let mut first = true;
                while json.next_element(&mut first)? {
                    list.push(features(&mut json, budget)?);
                }
                examples = Some(list);
            }
            ("context", InferenceMethod::Classify | InferenceMethod::Regress) => {
                context = Some(features(&mut json, budget)?)
            }
            _ => json.skip_value()?,
        }
    }
    json.end()?;
    let inputs = match method {
        InferenceMethod::Predict => Inputs::Tensors(
            tensors
                .ok_or_else(|| DecodeError::new(reason::BAD_JSON, "request has neither `instances` nor `inputs`"))?,
        ),
        _ => {
            let mut examples = examples
                .ok_or_else(|| DecodeError::new(reason::BAD_JSON, "classify/regress request has no `examples`"))?;
            if let Some(context) = context {
                for example in &mut examples {
                    for (name, values) in &context {
                        if example.binary_search_by(|(n, _)| n.cmp(name)).is_err() {
                            budget.take_copy(values)?;
                            example.push((name.clone(), values.clone()));
                        }
                    }
                    example.sort_by(|a, b| a.0.cmp(&b.0));
                }
            }
            Inputs::Examples(examples)
        }
    };
    Ok((signature, inputs))
}

/// Decodes a response body.
pub fn decode_response(
    method: InferenceMethod,
    body: &[u8],
    limits: &DecodeLimits,
    budget: &mut Budget,
) -> Result<Outputs, DecodeError> {
    let mut json = Json::new(body, limits.max_json_depth);
    json.begin_object()?;
    let mut outputs = None;
    let mut first = true;
    while let Some(key) = json.next_key(&mut first)? {
        match (key.as_ref(), method) {
            ("predictions", InferenceMethod::Predict) => outputs = Some(Outputs::Tensors(rows(&mut json, budget)?)),
            ("outputs", InferenceMethod::Predict) => outputs = Some(Outputs::Tensors(columns(&mut json, budget)?)),
            ("results", InferenceMethod::Classify) => outputs = Some(classify_results(&mut json, budget)?),
            ("results", InferenceMethod::Regress) => {
                let mut builder = TensorBuilder::default();
                json.tensor(&mut builder, budget)?;
                let values = match builder.finish(false)?.values {
                    TensorValues::Float(v) => v,
                    TensorValues::Int(v) => v.into_iter().map(|x| x as f64).collect(),
                    _ => return Err(DecodeError::new(reason::BAD_JSON, "regress results are not numbers")),
                };
                outputs = Some(Outputs::Regressions(values));
            }
            _ => json.skip_value()?,
        }
    }
    json.end()?;
    outputs.ok_or_else(|| DecodeError::new(reason::BAD_JSON, "response has no predictions, outputs or results"))
}

/// True when the value at the position is an object other than `{"b64": ...}`:
/// an object of named tensors.
fn is_named_object(json: &mut Json<'_>) -> Result<bool, DecodeError> {
    if json.peek() != Some(b'{') {
        return Ok(false);
    }
    let at = json.position();
    let b64 = json.b64_object();
    json.rewind(at);
    Ok(!matches!(b64, Ok(Some(_)) | Err(_)))
}

/// Row format (`instances`, `predictions`): a list of values, or of objects of
/// named tensors stacked along a leading batch dimension.
fn rows(json: &mut Json<'_>, budget: &mut Budget) -> Result<Vec<NamedTensor>, DecodeError> {
    let at = json.position();
    json.begin_array()?;
    let named = is_named_object(json)?;
    json.rewind(at);
    if !named {
        let mut builder = TensorBuilder::default();
        json.tensor(&mut builder, budget)?;
        return Ok(vec![NamedTensor { name: String::new(), tensor: builder.finish(false)? }]);
    }
    let mut builders: Vec<(String, TensorBuilder)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut row_count = 0usize;
    json.begin_array()?;
    let mut first = true;
    while json.next_element(&mut first)? {
        json.begin_object()?;
        let mut first_key = true;
        while let Some(key) = json.next_key(&mut first_key)? {
            let slot = match index.get(key.as_ref()) {
                Some(&slot) => slot,
                None => {
                    builders.push((key.to_string(), TensorBuilder::default()));
                    index.insert(key.into_owned(), builders.len() - 1);
                    builders.len() - 1
                }
            };
            json.tensor(&mut builders[slot].1, budget)?;
        }
        row_count += 1;
    }
    let mut out = Vec::with_capacity(builders.len());
    for (name, builder) in builders {
        if builder.parts() != row_count {
            return Err(DecodeError::new(
                reason::RAGGED,
                format!("`{name}` appears in {} of {row_count} rows", builder.parts()),
            ));
        }
        out.push(NamedTensor { name, tensor: builder.finish(true)? });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Columnar format (`inputs`, `outputs`): one value, or an object of named values.
fn columns(json: &mut Json<'_>, budget: &mut Budget) -> Result<Vec<NamedTensor>, DecodeError> {
    if !is_named_object(json)? {
        let mut builder = TensorBuilder::default();
        json.tensor(&mut builder, budget)?;
        return Ok(vec![NamedTensor { name: String::new(), tensor: builder.finish(false)? }]);
    }
    let mut out = Vec::new();
    json.begin_object()?;
    let mut first = true;
    while let Some(key) = json.next_key(&mut first)? {
        let mut builder = TensorBuilder::default();
        json.tensor(&mut builder, budget)?;
        out.push(NamedTensor { name: key.into_owned(), tensor: builder.finish(false)? });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    Ok(out)
}

/// One example (or the context) of a classify/regress request: an object of
/// feature values, each a scalar or a flat list.
fn features(json: &mut Json<'_>, budget: &mut Budget) -> Result<ExampleFeatures, DecodeError> {
    let mut out: ExampleFeatures = Vec::new();
    json.begin_object()?;
    let mut first = true;
    while let Some(key) = json.next_key(&mut first)? {
        let mut builder = TensorBuilder::default();
        json.tensor(&mut builder, budget)?;
        out.push((key.into_owned(), builder.finish(false)?.values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// `[[[label, score], ...], ...]`, one list per example.
fn classify_results(json: &mut Json<'_>, budget: &mut Budget) -> Result<Outputs, DecodeError> {
    let mut rows = Vec::new();
    json.begin_array()?;
    let mut first_row = true;
    while json.next_element(&mut first_row)? {
        let mut row = Vec::new();
        json.begin_array()?;
        let mut first_pair = true;
        while json.next_element(&mut first_pair)? {
            budget.take(1)?;
            json.begin_array()?;
            let mut first = true;
            if !json.next_element(&mut first)? {
                return Err(json.error("empty classification pair"));
            }
            let label = json.text()?.into_owned();
            if !json.next_element(&mut first)? {
                return Err(json.error("classification pair without a score"));
            }
            let score = json.number()?.as_f64();
            if json.next_element(&mut first)? {
                return Err(json.error("classification pair with more than two elements"));
            }
            row.push((label, score));
        }
        rows.push(row);
    }
    Ok(Outputs::Classifications(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_model_version_label_and_verb() {
        let p = parse_path("/v1/models/iris/versions/2:predict").unwrap();
        assert_eq!((p.model.as_str(), p.version, p.method), ("iris", Some(2), InferenceMethod::Predict));
        let p = parse_path("/v1/models/iris/labels/stable:classify?x=1").unwrap();
        assert_eq!((p.label.as_deref(), p.method), (Some("stable"), InferenceMethod::Classify));
        assert_eq!(parse_path("/v1/models/price:regress").unwrap().method, InferenceMethod::Regress);
        for bad in
            ["/v1/models/iris", "/v1/models/iris/metadata", "/v1/models/:predict", "/v1/models/m/versions/x:predict"]
        {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }
}
