//! One exchange into one `tensorflow.serving.PredictionLog`, the record TF Serving's
//! own request logger writes.
//!
//! - **gRPC**: the request and response messages are embedded exactly as they passed
//!   (after gRPC decompression), never decoded and re-encoded, so the log holds the
//!   bytes the client sent and received. Only their `model_spec` is read, for
//!   `log_metadata` and the model's folder.
//! - **REST**: the JSON bodies are converted into the equivalent `PredictRequest` /
//!   `PredictResponse` (row `instances`/`predictions` and columnar `inputs`/`outputs`),
//!   `ClassificationRequest` / `ClassificationResponse` or `RegressionRequest` /
//!   `RegressionResponse` (`examples`, `context`, `result`). A tensor takes the dtype
//!   the model's signature declares when it is known; otherwise the JSON's natural
//!   type: strings and `{"b64": ...}` are `DT_STRING`, booleans `DT_BOOL`, integers
//!   `DT_INT64`, any other number `DT_FLOAT`. A tensor the body leaves unnamed takes
//!   the signature's only input (output) name, else `input` (`predictions` or
//!   `outputs`, as TF Serving's response key says).
//!
//! Nothing here panics on a payload: whatever cannot be converted is an error the
//! writer counts.

use crate::capture::{CallMethod, Exchange, Protocol};
use crate::tfserving::grpc::inflate;
use crate::tfserving::proto::serving::{
    self, input, model_spec::VersionChoice, ClassificationRequest, ClassificationResponse, ClassificationResult,
    Classifications, ExampleList, ExampleListWithContext, Input, LogMetadata, ModelSpec, PredictRequest,
    PredictResponse, RegressionRequest, RegressionResponse, RegressionResult, SamplingConfig,
};
use crate::tfserving::proto::{tensorflow, DataType, Example, Feature, Features, TensorProto, TensorShapeProto};
use crate::tfserving::{DType, SignatureSchema};
use bytes::Bytes;
use prost::Message;
use serde_json::Value;
use std::collections::HashMap;
use std::time::UNIX_EPOCH;

/// Field numbers of `PredictionLog`'s `log_type` and of its parts.
const LOG_METADATA: u32 = 1;
const CLASSIFY_LOG: u32 = 2;
const REGRESS_LOG: u32 = 3;
const MULTI_INFERENCE_LOG: u32 = 4;
const PREDICT_LOG: u32 = 6;
const LOG_REQUEST: u32 = 1;
const LOG_RESPONSE: u32 = 2;

/// Bytes a decompressed body may grow to: as large as the capture cap allows, and
/// no gzip bomb more.
const MAX_INFLATED_BYTES: usize = 64 << 20;
/// How deep a JSON tensor may nest.
const MAX_RANK: usize = 32;

/// One converted exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// The model the call went to, for the file's folder.
    pub model: String,
    /// The serialized `PredictionLog`.
    pub record: Vec<u8>,
}

/// What the REST conversion knows of the model beyond the body.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signature<'a> {
    pub schema: Option<&'a SignatureSchema>,
}

/// Model name, version and signature of a REST call, read from its path and body,
/// for the schema lookup before conversion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestTarget {
    pub model: String,
    pub version: Option<i64>,
    pub label: Option<String>,
}

/// Where a REST exchange went, from its path alone.
pub fn rest_target(path: &str) -> Option<RestTarget> {
    let parsed = crate::tfserving::rest::parse_path(path)?;
    Some(RestTarget { model: parsed.model, version: parsed.version, label: parsed.label })
}

/// The model a gRPC exchange's request names (its `model_spec.name`), from the
/// request's first bytes; for the access log.
pub fn grpc_model_spec(method: CallMethod, request: &[Bytes], encoding: Option<&str>) -> Option<ModelSpec> {
    let message = grpc_message(request, encoding).ok()?;
    request_spec(method, &message)
}

/// Converts an exchange into a `PredictionLog` stamped with `sampling_rate`.
pub fn convert(exchange: &Exchange, sampling_rate: f64, signature: Signature<'_>) -> Result<Converted, String> {
    let (spec, log_field, sub_log) = match exchange.protocol {
        Protocol::Grpc => grpc_log(exchange)?,
        Protocol::Rest => rest_log(exchange, signature)?,
    };
    let timestamp_secs = exchange.started_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let metadata = LogMetadata {
        model_spec: Some(spec.clone()),
        sampling_config: Some(SamplingConfig { sampling_rate, attributes: 0 }),
        timestamp_secs,
        ..LogMetadata::default()
    };
    let mut record = Vec::with_capacity(sub_log.len() + 64);
    prost::encoding::message::encode(LOG_METADATA, &metadata, &mut record);
    length_delimited(log_field, &sub_log, &mut record);
    Ok(Converted { model: spec.name, record })
}

/// Appends `data` as field `field` of wire type LEN.
fn length_delimited(field: u32, data: &[u8], out: &mut Vec<u8>) {
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// `{request = 1, response = 2}`: the shape of every `*Log` message.
fn request_response(request: &[u8], response: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(request.len() + response.len() + 16);
    length_delimited(LOG_REQUEST, request, &mut out);
    length_delimited(LOG_RESPONSE, response, &mut out);
    out
}

fn log_field(method: CallMethod) -> Result<u32, String> {
    match method {
        CallMethod::Predict => Ok(PREDICT_LOG),
        CallMethod::Classify => Ok(CLASSIFY_LOG),
        CallMethod::Regress => Ok(REGRESS_LOG),
        CallMethod::MultiInference => Ok(MULTI_INFERENCE_LOG),
        other => Err(format!("{} calls are not logged", other.as_str())),
    }
}

fn grpc_log(exchange: &Exchange) -> Result<(ModelSpec, u32, Vec<u8>), String> {
    let field = log_field(exchange.method)?;
    let request = grpc_message(&exchange.request_body, exchange.request_encoding.as_deref())
        .map_err(|e| format!("request: {e}"))?;
    let response = grpc_message(&exchange.response_body, exchange.response_encoding.as_deref())
        .map_err(|e| format!("response: {e}"))?;
    let asked = request_spec(exchange.method, &request).unwrap_or_default();
    let served = response_spec(exchange.method, &response).unwrap_or_default();
    Ok((merge_specs(asked, served), field, request_response(&request, &response)))
}

/// The spec TF Serving resolved: the name asked for, with the version and signature
/// that served it when the response says so.
fn merge_specs(asked: ModelSpec, served: ModelSpec) -> ModelSpec {
    let name = if asked.name.is_empty() { served.name } else { asked.name };
    let version_choice = served.version_choice.or(asked.version_choice);
    let signature_name = if !served.signature_name.is_empty() {
        served.signature_name
    } else if !asked.signature_name.is_empty() {
        asked.signature_name
    } else {
        "serving_default".to_string()
    };
    ModelSpec { name, version_choice, signature_name }
}

/// The one message of a unary gRPC body, decompressed.
fn grpc_message(chunks: &[Bytes], encoding: Option<&str>) -> Result<Vec<u8>, String> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut body = Vec::with_capacity(total);
    for chunk in chunks {
        body.extend_from_slice(chunk);
    }
    if body.len() < 5 {
        return Err("no gRPC message".into());
    }
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let message = body.get(5..5 + length).ok_or("gRPC message cut short")?;
    match body[0] {
        0 => Ok(message.to_vec()),
        1 => inflate(encoding.unwrap_or("identity"), message, MAX_INFLATED_BYTES).map_err(|e| e.to_string()),
        flag => Err(format!("invalid gRPC compressed flag {flag}")),
    }
}

/// The first length-delimited field `wanted` of a message, without decoding the rest.
fn field_bytes(mut message: &[u8], wanted: u32) -> Option<&[u8]> {
    use prost::encoding::{decode_key, decode_varint, WireType};
    while !message.is_empty() {
        let (field, wire_type) = decode_key(&mut message).ok()?;
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut message).ok()?;
            }
            WireType::SixtyFourBit => message = message.get(8..)?,
            WireType::ThirtyTwoBit => message = message.get(4..)?,
            WireType::LengthDelimited => {
                let length = usize::try_from(decode_varint(&mut message).ok()?).ok()?;
                let data = message.get(..length)?;
                if field == wanted {
                    return Some(data);
                }
                message = &message[length..];
            }
            WireType::StartGroup | WireType::EndGroup => return None,
        }
    }
    None
}

/// `model_spec` of a request: field 1, or the first task's for MultiInference.
fn request_spec(method: CallMethod, request: &[u8]) -> Option<ModelSpec> {
    let spec = match method {
        CallMethod::MultiInference => field_bytes(field_bytes(request, 1)?, 1)?,
        _ => field_bytes(request, 1)?,
    };
    ModelSpec::decode(spec).ok()
}

/// `model_spec` of a response: field 2, or the first result's for MultiInference.
fn response_spec(method: CallMethod, response: &[u8]) -> Option<ModelSpec> {
    let spec = match method {
        CallMethod::MultiInference => field_bytes(field_bytes(response, 1)?, 1)?,
        _ => field_bytes(response, 2)?,
    };
    ModelSpec::decode(spec).ok()
}

fn rest_json(chunks: &[Bytes], encoding: Option<&str>) -> Result<Value, String> {
    let mut body = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
    for chunk in chunks {
        body.extend_from_slice(chunk);
    }
    let body = match encoding.map(str::trim) {
        None | Some("") | Some("identity") => body,
        Some(e) => inflate(e, &body, MAX_INFLATED_BYTES).map_err(|e| e.to_string())?,
    };
    serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))
}

fn rest_log(exchange: &Exchange, signature: Signature<'_>) -> Result<(ModelSpec, u32, Vec<u8>), String> {
    let field = log_field(exchange.method)?;
    let target = rest_target(&exchange.path).ok_or_else(|| format!("`{}` is no inference path", exchange.path))?;
    let request =
        rest_json(&exchange.request_body, exchange.request_encoding.as_deref()).map_err(|e| format!("request: {e}"))?;
    let response = rest_json(&exchange.response_body, exchange.response_encoding.as_deref())
        .map_err(|e| format!("response: {e}"))?;
    let signature_name = request.get("signature_name").and_then(Value::as_str).unwrap_or_default().to_string();
    let version_choice = match (target.version, target.label) {
        (Some(v), _) => Some(VersionChoice::Version(v)),
        (None, Some(l)) => Some(VersionChoice::VersionLabel(l)),
        (None, None) => None,
    };
    let asked = ModelSpec { name: target.model.clone(), version_choice: version_choice.clone(), signature_name };
    let served = ModelSpec {
        name: target.model,
        version_choice: version_choice.filter(|v| matches!(v, VersionChoice::Version(_))),
        signature_name: if asked.signature_name.is_empty() {
            "serving_default".to_string()
        } else {
            asked.signature_name.clone()
        },
    };
    let (request_bytes, response_bytes) = match exchange.method {
        CallMethod::Predict => (
            rest_predict_request(&request, asked.clone(), signature.schema)?.encode_to_vec(),
            rest_predict_response(&response, served.clone(), signature.schema)?.encode_to_vec(),
        ),
        CallMethod::Classify => (
            ClassificationRequest { model_spec: Some(asked.clone()), input: Some(rest_input(&request)?) }
                .encode_to_vec(),
            rest_classify_response(&response, served.clone())?.encode_to_vec(),
        ),
        CallMethod::Regress => (
            RegressionRequest { model_spec: Some(asked.clone()), input: Some(rest_input(&request)?) }.encode_to_vec(),
            rest_regress_response(&response, served.clone())?.encode_to_vec(),
        ),
        other => return Err(format!("REST {} calls are not logged", other.as_str())),
    };
    Ok((merge_specs(asked, served), field, request_response(&request_bytes, &response_bytes)))
}

/// The only name in a signature's list, when there is exactly one.
fn only_name(names: Option<&[(String, Option<DType>)]>) -> Option<String> {
    match names? {
        [(name, _)] => Some(name.clone()),
        _ => None,
    }
}

fn dtype_of(names: Option<&[(String, Option<DType>)]>, name: &str) -> Option<DType> {
    names?.iter().find(|(n, _)| n == name).and_then(|(_, d)| *d)
}

/// Named tensors from TF Serving's row (`rows`) or columnar (`columns`) JSON.
fn named_tensors(
    rows: Option<&Value>,
    columns: Option<&Value>,
    declared: Option<&[(String, Option<DType>)]>,
    unnamed: &str,
) -> Result<HashMap<String, TensorProto>, String> {
    let unnamed = only_name(declared).unwrap_or_else(|| unnamed.to_string());
    let tensor = |name: &str, value: &Value| tensor(value, dtype_of(declared, name));
    let mut out = HashMap::new();
    match (rows, columns) {
        (Some(Value::Array(rows)), _) => {
            if !rows.is_empty() && rows.iter().all(Value::is_object) && !rows.iter().any(is_b64) {
                let mut names: Vec<&String> = rows.iter().filter_map(Value::as_object).flat_map(|r| r.keys()).collect();
                names.sort();
                names.dedup();
                for name in names {
                    let column: Vec<Value> = rows
                        .iter()
                        .map(|row| row.get(name.as_str()).cloned().ok_or_else(|| format!("a row lacks `{name}`")))
                        .collect::<Result<_, _>>()?;
                    out.insert(name.clone(), tensor(name, &Value::Array(column))?);
                }
            } else {
                out.insert(unnamed.clone(), tensor(&unnamed, &Value::Array(rows.clone()))?);
            }
        }
        (Some(_), _) => return Err("`instances`/`predictions` is not a list".into()),
        (None, Some(Value::Object(map))) if !is_b64(&Value::Object(map.clone())) => {
            for (name, value) in map {
                out.insert(name.clone(), tensor(name, value)?);
            }
        }
        (None, Some(value)) => {
            out.insert(unnamed.clone(), tensor(&unnamed, value)?);
        }
        (None, None) => return Err("the body has neither the row nor the columnar key".into()),
    }
    Ok(out)
}

fn rest_predict_request(
    body: &Value,
    spec: ModelSpec,
    schema: Option<&SignatureSchema>,
) -> Result<PredictRequest, String> {
    let inputs = named_tensors(body.get("instances"), body.get("inputs"), schema.map(|s| &s.inputs[..]), "input")?;
    Ok(PredictRequest { model_spec: Some(spec), inputs, output_filter: Vec::new() })
}

fn rest_predict_response(
    body: &Value,
    spec: ModelSpec,
    schema: Option<&SignatureSchema>,
) -> Result<PredictResponse, String> {
    let unnamed = if body.get("predictions").is_some() { "predictions" } else { "outputs" };
    let outputs = named_tensors(body.get("predictions"), body.get("outputs"), schema.map(|s| &s.outputs[..]), unnamed)?;
    Ok(PredictResponse { model_spec: Some(spec), outputs })
}

fn is_b64(value: &Value) -> bool {
    matches!(value, Value::Object(map) if map.len() == 1 && map.get("b64").is_some_and(Value::is_string))
}

/// A leaf of a JSON tensor.
enum Leaf {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Bytes(Vec<u8>),
}

fn leaf(value: &Value) -> Result<Leaf, String> {
    match value {
        Value::Bool(b) => Ok(Leaf::Bool(*b)),
        Value::String(s) => Ok(Leaf::Bytes(s.as_bytes().to_vec())),
        Value::Number(n) => Ok(if let Some(i) = n.as_i64() {
            Leaf::Int(i)
        } else if let Some(u) = n.as_u64() {
            Leaf::UInt(u)
        } else {
            Leaf::Float(n.as_f64().unwrap_or(f64::NAN))
        }),
        Value::Object(map) if is_b64(value) => {
            let text = map.get("b64").and_then(Value::as_str).unwrap_or_default();
            crate::tfserving::json::decode_b64(text.as_bytes()).map(Leaf::Bytes).map_err(|e| e.to_string())
        }
        // TF Serving reads a JSON NaN written as a string; a null is a missing value.
        Value::Null => Ok(Leaf::Float(f64::NAN)),
        other => Err(format!("`{other}` is not a tensor value")),
    }
}

/// Shape and row-major leaves of a nested JSON list.
fn flatten<'v>(value: &'v Value, shape: &mut Vec<i64>, leaves: &mut Vec<&'v Value>) -> Result<(), String> {
    fn walk<'v>(
        value: &'v Value,
        depth: usize,
        shape: &mut Vec<i64>,
        leaves: &mut Vec<&'v Value>,
    ) -> Result<(), String> {
        if depth > MAX_RANK {
            return Err("tensor nests too deep".into());
        }
        match value {
            Value::Array(items) => {
                if shape.len() == depth {
                    shape.push(items.len() as i64);
                } else if shape.get(depth) != Some(&(items.len() as i64)) {
                    return Err("a tensor's lists differ in length".into());
                }
                for item in items {
                    walk(item, depth + 1, shape, leaves)?;
                }
                Ok(())
            }
            _ => {
                if leaves.is_empty() && shape.len() > depth {
                    // An empty list before a scalar at this depth: ragged.
                    return Err("a tensor's lists differ in depth".into());
                }
                if !leaves.is_empty() && shape.len() != depth {
                    return Err("a tensor's lists differ in depth".into());
                }
                leaves.push(value);
                Ok(())
            }
        }
    }
    walk(value, 0, shape, leaves)
}

/// A `TensorProto` of a JSON value, typed as declared or by its values.
fn tensor(value: &Value, declared: Option<DType>) -> Result<TensorProto, String> {
    let mut shape = Vec::new();
    let mut values = Vec::new();
    flatten(value, &mut shape, &mut values)?;
    if shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d)) != Some(values.len() as i64) {
        return Err("a tensor's lists differ in depth".into());
    }
    let leaves: Vec<Leaf> = values.into_iter().map(leaf).collect::<Result<_, _>>()?;
    let natural = if leaves.iter().any(|l| matches!(l, Leaf::Bytes(_))) {
        DType::String
    } else if !leaves.is_empty() && leaves.iter().all(|l| matches!(l, Leaf::Bool(_))) {
        DType::Bool
    } else if leaves.iter().all(|l| matches!(l, Leaf::Int(_) | Leaf::UInt(_))) && !leaves.is_empty() {
        DType::Int64
    } else {
        DType::Float
    };
    let dtype = match declared {
        // Half precision has no JSON reading of its own here: keep the values exact.
        Some(DType::Half | DType::BFloat16) | None => natural,
        Some(d) => d,
    };
    let number = |l: &Leaf| match l {
        Leaf::Int(i) => *i as f64,
        Leaf::UInt(u) => *u as f64,
        Leaf::Float(f) => *f,
        Leaf::Bool(b) => f64::from(u8::from(*b)),
        Leaf::Bytes(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(f64::NAN),
    };
    let integer = |l: &Leaf| match l {
        Leaf::Int(i) => *i,
        Leaf::UInt(u) => *u as i64,
        other => number(other) as i64,
    };
    let mut proto = TensorProto {
        tensor_shape: Some(TensorShapeProto {
            dim: shape
                .into_iter()
                .map(|size| tensorflow::tensor_shape_proto::Dim { size, name: String::new() })
                .collect(),
            unknown_rank: false,
        }),
        ..TensorProto::default()
    };
    let data_type = match dtype {
        DType::Float | DType::Half | DType::BFloat16 => {
            proto.float_val = leaves.iter().map(|l| number(l) as f32).collect();
            DataType::DtFloat
        }
        DType::Double => {
            proto.double_val = leaves.iter().map(number).collect();
            DataType::DtDouble
        }
        DType::Int8 | DType::Int16 | DType::Int32 | DType::UInt8 | DType::UInt16 => {
            proto.int_val = leaves.iter().map(|l| integer(l) as i32).collect();
            match dtype {
                DType::Int8 => DataType::DtInt8,
                DType::Int16 => DataType::DtInt16,
                DType::UInt8 => DataType::DtUint8,
                DType::UInt16 => DataType::DtUint16,
                _ => DataType::DtInt32,
            }
        }
        DType::Int64 => {
            proto.int64_val = leaves.iter().map(integer).collect();
            DataType::DtInt64
        }
        DType::UInt32 => {
            proto.uint32_val = leaves.iter().map(|l| integer(l) as u32).collect();
            DataType::DtUint32
        }
        DType::UInt64 => {
            proto.uint64_val = leaves.iter().map(|l| integer(l) as u64).collect();
            DataType::DtUint64
        }
        DType::Bool => {
            proto.bool_val = leaves.iter().map(|l| number(l) != 0.0).collect();
            DataType::DtBool
        }
        DType::String => {
            proto.string_val = leaves
                .into_iter()
                .map(|l| match l {
                    Leaf::Bytes(b) => b,
                    Leaf::Bool(b) => b.to_string().into_bytes(),
                    Leaf::Int(i) => i.to_string().into_bytes(),
                    Leaf::UInt(u) => u.to_string().into_bytes(),
                    Leaf::Float(f) => f.to_string().into_bytes(),
                })
                .collect();
            DataType::DtString
        }
    };
    proto.dtype = data_type as i32;
    Ok(proto)
}

/// A `tf.Example` feature of a JSON value (a scalar or a list of scalars).
fn feature(value: &Value) -> Result<Feature, String> {
    use tensorflow::feature::Kind;
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let leaves: Vec<Leaf> = items.into_iter().map(leaf).collect::<Result<_, _>>()?;
    let kind = if leaves.iter().any(|l| matches!(l, Leaf::Bytes(_))) {
        Kind::BytesList(tensorflow::BytesList {
            value: leaves
                .into_iter()
                .map(|l| match l {
                    Leaf::Bytes(b) => b,
                    _ => Vec::new(),
                })
                .collect(),
        })
    } else if leaves.iter().all(|l| matches!(l, Leaf::Int(_) | Leaf::UInt(_) | Leaf::Bool(_))) && !leaves.is_empty() {
        Kind::Int64List(tensorflow::Int64List {
            value: leaves
                .iter()
                .map(|l| match l {
                    Leaf::Int(i) => *i,
                    Leaf::UInt(u) => *u as i64,
                    Leaf::Bool(b) => i64::from(*b),
                    _ => 0,
                })
                .collect(),
        })
    } else {
        Kind::FloatList(tensorflow::FloatList {
            value: leaves
                .iter()
                .map(|l| match l {
                    Leaf::Int(i) => *i as f32,
                    Leaf::UInt(u) => *u as f32,
                    Leaf::Float(f) => *f as f32,
                    Leaf::Bool(b) => f32::from(u8::from(*b)),
                    Leaf::Bytes(_) => f32::NAN,
                })
                .collect(),
        })
    };
    Ok(Feature { kind: Some(kind) })
}

fn example(value: &Value) -> Result<Example, String> {
    let map = value.as_object().ok_or("an example is not an object")?;
    let feature = map.iter().map(|(name, value)| Ok((name.clone(), feature(value)?))).collect::<Result<_, String>>()?;
    Ok(Example { features: Some(Features { feature }) })
}

/// The `Input` of a REST classify/regress body.
fn rest_input(body: &Value) -> Result<Input, String> {
    let examples = body
        .get("examples")
        .and_then(Value::as_array)
        .ok_or("the body has no `examples` list")?
        .iter()
        .map(example)
        .collect::<Result<Vec<_>, _>>()?;
    let kind = match body.get("context") {
        Some(context) => {
            input::Kind::ExampleListWithContext(ExampleListWithContext { examples, context: Some(example(context)?) })
        }
        None => input::Kind::ExampleList(ExampleList { examples }),
    };
    Ok(Input { kind: Some(kind) })
}

fn results(body: &Value) -> Result<&Vec<Value>, String> {
    body.get("result").and_then(Value::as_array).ok_or_else(|| "the response has no `result` list".to_string())
}

fn rest_classify_response(body: &Value, spec: ModelSpec) -> Result<ClassificationResponse, String> {
    let classifications = results(body)?
        .iter()
        .map(|row| {
            let classes = row
                .as_array()
                .ok_or("a classification is not a list")?
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([label, score]) => Ok(serving::Class {
                        label: label.as_str().map(str::to_string).unwrap_or_else(|| label.to_string()),
                        score: score.as_f64().ok_or("a class score is not a number")? as f32,
                    }),
                    _ => Err("a class is not a [label, score] pair".to_string()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Classifications { classes })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(ClassificationResponse { model_spec: Some(spec), result: Some(ClassificationResult { classifications }) })
}

fn rest_regress_response(body: &Value, spec: ModelSpec) -> Result<RegressionResponse, String> {
    let regressions = results(body)?
        .iter()
        .map(|v| {
            let value = match v {
                Value::Array(items) if items.len() == 1 => items[0].as_f64(),
                other => other.as_f64(),
            };
            value.map(|value| serving::Regression { value: value as f32 }).ok_or("a regression is not a number")
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RegressionResponse { model_spec: Some(spec), result: Some(RegressionResult { regressions }) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Bodies;
    use crate::tfserving::proto::serving::{prediction_log::LogType, PredictionLog};
    use std::time::{Duration, SystemTime};

    fn exchange(protocol: Protocol, method: CallMethod, path: &str, request: &[u8], response: &[u8]) -> Exchange {
        Exchange {
            protocol,
            method,
            path: path.into(),
            request_id: "r".into(),
            request_id_generated: false,
            request_encoding: None,
            response_encoding: None,
            bodies: Bodies::Full,
            request_body: vec![Bytes::copy_from_slice(request)],
            response_body: vec![Bytes::copy_from_slice(response)],
            status: 200,
            grpc_status: if protocol == Protocol::Grpc { Some(0) } else { None },
            origin: None,
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            upstream_latency: Duration::from_millis(3),
            complete: true,
        }
    }

    fn dims(t: &TensorProto) -> Vec<i64> {
        t.tensor_shape.as_ref().unwrap().dim.iter().map(|d| d.size).collect()
    }

    #[test]
    fn grpc_messages_are_embedded_byte_for_byte() {
        let request = PredictRequest {
            model_spec: Some(ModelSpec { name: "m".into(), version_choice: None, signature_name: String::new() }),
            ..PredictRequest::default()
        }
        .encode_to_vec();
        let response = PredictResponse {
            model_spec: Some(ModelSpec {
                name: "m".into(),
                version_choice: Some(VersionChoice::Version(7)),
                signature_name: "serving_default".into(),
            }),
            outputs: HashMap::new(),
        }
        .encode_to_vec();
        let framed = |m: &[u8]| crate::tfserving::grpc::frame(m).to_vec();
        let e = exchange(
            Protocol::Grpc,
            CallMethod::Predict,
            "/tensorflow.serving.PredictionService/Predict",
            &framed(&request),
            &framed(&response),
        );
        let converted = convert(&e, 0.5, Signature::default()).unwrap();
        assert_eq!(converted.model, "m");
        let log = PredictionLog::decode(&converted.record[..]).unwrap();
        let metadata = log.log_metadata.unwrap();
        assert_eq!(metadata.model_spec.unwrap().version_choice, Some(VersionChoice::Version(7)));
        assert_eq!(metadata.sampling_config.unwrap().sampling_rate, 0.5);
        assert_eq!(metadata.timestamp_secs, 1_700_000_000);
        let Some(LogType::PredictLog(predict)) = log.log_type else { panic!("a predict log") };
        assert_eq!(predict.request.unwrap().encode_to_vec(), request);
        assert_eq!(predict.response.unwrap().encode_to_vec(), response);
    }

    #[test]
    fn rest_rows_become_typed_tensors() {
        let request = br#"{"signature_name": "s", "instances": [{"a": 1, "b": [0.5, 1], "c": "x"}, {"a": 2, "b": [1.5, 2], "c": {"b64": "eQ=="}}]}"#;
        let response = br#"{"predictions": [[0.25, 0.75], [0.5, 0.5]]}"#;
        let e = exchange(Protocol::Rest, CallMethod::Predict, "/v1/models/m/versions/3:predict", request, response);
        let log = PredictionLog::decode(&convert(&e, 1.0, Signature::default()).unwrap().record[..]).unwrap();
        let Some(LogType::PredictLog(predict)) = log.log_type else { panic!("a predict log") };
        let request = predict.request.unwrap();
        let spec = request.model_spec.unwrap();
        assert_eq!((spec.name.as_str(), spec.signature_name.as_str()), ("m", "s"));
        assert_eq!(spec.version_choice, Some(VersionChoice::Version(3)));
        let a = &request.inputs["a"];
        assert_eq!((a.dtype, dims(a), a.int64_val.clone()), (DataType::DtInt64 as i32, vec![2], vec![1, 2]));
        let b = &request.inputs["b"];
        assert_eq!(
            (b.dtype, dims(b), b.float_val.clone()),
            (DataType::DtFloat as i32, vec![2, 2], vec![0.5, 1.0, 1.5, 2.0])
        );
        assert_eq!(request.inputs["c"].string_val, vec![b"x".to_vec(), b"y".to_vec()]);
        let outputs = predict.response.unwrap().outputs;
        assert_eq!(dims(&outputs["predictions"]), vec![2, 2]);
    }

    #[test]
    fn a_declared_dtype_wins_over_the_json_type() {
        let schema = SignatureSchema {
            inputs: vec![("x".into(), Some(DType::Double))],
            outputs: vec![("probabilities".into(), Some(DType::Float))],
        };
        let e = exchange(
            Protocol::Rest,
            CallMethod::Predict,
            "/v1/models/m:predict",
            br#"{"inputs": [[1, 2, 3]]}"#,
            br#"{"outputs": [0.9]}"#,
        );
        let log =
            PredictionLog::decode(&convert(&e, 1.0, Signature { schema: Some(&schema) }).unwrap().record[..]).unwrap();
        let Some(LogType::PredictLog(predict)) = log.log_type else { panic!("a predict log") };
        let x = &predict.request.unwrap().inputs["x"];
        assert_eq!((x.dtype, x.double_val.clone()), (DataType::DtDouble as i32, vec![1.0, 2.0, 3.0]));
        assert_eq!(predict.response.unwrap().outputs["probabilities"].float_val, vec![0.9]);
    }

    #[test]
    fn rest_classify_becomes_examples_and_classes() {
        let e = exchange(
            Protocol::Rest,
            CallMethod::Classify,
            "/v1/models/m:classify",
            br#"{"context": {"c": "de"}, "examples": [{"x": 1.5, "n": 2}, {"x": [1, 2.5]}]}"#,
            br#"{"result": [[["a", 0.25], ["b", 0.75]], [["a", 1.0]]]}"#,
        );
        let log = PredictionLog::decode(&convert(&e, 1.0, Signature::default()).unwrap().record[..]).unwrap();
        let Some(LogType::ClassifyLog(classify)) = log.log_type else { panic!("a classify log") };
        let Some(input::Kind::ExampleListWithContext(list)) = classify.request.unwrap().input.unwrap().kind else {
            panic!("examples with context")
        };
        assert_eq!(list.examples.len(), 2);
        let result = classify.response.unwrap().result.unwrap();
        assert_eq!(result.classifications[0].classes[1].label, "b");
        assert_eq!(result.classifications[0].classes[1].score, 0.75);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for (request, response) in [
            (&b"{"[..], &b"{}"[..]),
            (br#"{"instances": [[1], [1, 2]]}"#, br#"{"predictions": []}"#),
            (br#"{"instances": [{"a": 1}, {"b": 2}]}"#, br#"{"predictions": [1]}"#),
            (br#"{"instances": 3}"#, br#"{"predictions": [1]}"#),
        ] {
            let e = exchange(Protocol::Rest, CallMethod::Predict, "/v1/models/m:predict", request, response);
            assert!(convert(&e, 1.0, Signature::default()).is_err());
        }
        let e = exchange(Protocol::Grpc, CallMethod::Predict, "/x", &[0, 0, 0, 0, 9, 1], &[]);
        assert!(convert(&e, 1.0, Signature::default()).is_err());
    }
}
