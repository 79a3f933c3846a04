//! gRPC knowledge: the PredictionService paths, the 5-byte length-prefixed message
//! framing (messages may span captured chunks), per-message compression with the
//! exchange's `grpc-encoding`, and the Predict, Classify, Regress and MultiInference
//! messages, turned into a protocol-neutral `Call`.
//!
//! It never trusts a length: a frame is read only when its bytes are all there, and
//! an inflated message stops at the configured decompressed-size cap.

use super::call::{Call, CallDecoded, ExampleFeatures, Inputs, Outputs, TaskResult};
use super::proto::serving::{
    self, inference_result, input, model_spec::VersionChoice, ClassificationRequest, ClassificationResponse,
    MultiInferenceRequest, MultiInferenceResponse, PredictRequest, PredictResponse, RegressionRequest,
    RegressionResponse,
};
use super::tensor::{self, Budget, NamedTensor, TensorValues};
use super::{reason, DecodeError, DecodeLimits, Decoding, InferenceMethod};
use crate::capture::Exchange;
use bytes::Bytes;
use prost::Message;
use std::io::Read;

/// The method of a PredictionService path; None for other services and methods.
pub fn method_of_path(path: &str) -> Option<InferenceMethod> {
    let method = path.strip_prefix("/tensorflow.serving.PredictionService/")?;
    Some(match method {
        "Predict" => InferenceMethod::Predict,
        "Classify" => InferenceMethod::Classify,
        "Regress" => InferenceMethod::Regress,
        "MultiInference" => InferenceMethod::MultiInference,
        _ => return None,
    })
}

/// Reads the length-prefixed messages of a body captured as `chunks`.
struct Frames<'a> {
    /// The captured chunks.
    chunks: &'a [Bytes],
    /// Index of the chunk holding the next unread byte.
    chunk: usize,
    /// Offset of the next unread byte in that chunk.
    offset: usize,
}

impl<'a> Frames<'a> {
    fn new(chunks: &'a [Bytes]) -> Self {
        Frames { chunks, chunk: 0, offset: 0 }
    }

    fn remaining(&self) -> usize {
        let rest: usize = self.chunks.iter().skip(self.chunk).map(Bytes::len).sum();
        rest.saturating_sub(self.offset)
    }

    /// The next `n` bytes: a zero-copy slice when one chunk holds them, else a copy.
    /// The caller checked `n <= remaining()`.
    fn take(&mut self, n: usize) -> Bytes {
        while self.chunk < self.chunks.len() && self.offset == self.chunks[self.chunk].len() {
            self.chunk += 1;
            self.offset = 0;
        }
        if let Some(current) = self.chunks.get(self.chunk) {
            if current.len() - self.offset >= n {
                let slice = current.slice(self.offset..self.offset + n);
                self.offset += n;
                return slice;
            }
        }
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let Some(current) = self.chunks.get(self.chunk) else { break };
            let available = &current[self.offset..];
            let wanted = (n - out.len()).min(available.len());
            out.extend_from_slice(&available[..wanted]);
            self.offset += wanted;
            if self.offset == current.len() {
                self.chunk += 1;
                self.offset = 0;
            }
        }
        Bytes::from(out)
    }

    /// The next message (inflated when flagged compressed); None at the end.
    fn next(&mut self, encoding: Option<&str>, limits: &DecodeLimits) -> Result<Option<Bytes>, DecodeError> {
        let remaining = self.remaining();
        if remaining == 0 {
            return Ok(None);
        }
        if remaining < 5 {
            return Err(DecodeError::new(reason::TRUNCATED_FRAME, format!("{remaining} bytes cannot hold a header")));
        }
        let header = self.take(5);
        let compressed = header[0];
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if length > self.remaining() {
            return Err(DecodeError::new(
                reason::TRUNCATED_FRAME,
                format!("frame announces {length} bytes, {} captured", self.remaining()),
            ));
        }
        let message = self.take(length);
        match compressed {
            0 => Ok(Some(message)),
            1 => {
                let encoding = encoding.unwrap_or("identity");
                inflate(encoding, &message, limits.max_decompressed_bytes).map(|m| Some(Bytes::from(m)))
            }
            flag => Err(DecodeError::new(reason::TRUNCATED_FRAME, format!("invalid compressed flag {flag}"))),
        }
    }
}

/// Inflates `data` compressed with `encoding` (`gzip`, `deflate`; `identity` and
/// none pass through), stopping with `too_large` past `cap` bytes of output.
pub fn inflate(encoding: &str, data: &[u8], cap: usize) -> Result<Vec<u8>, DecodeError> {
    let encoding = encoding.trim().to_ascii_lowercase();
    match encoding.as_str() {
        "" | "identity" => {
            if data.len() > cap {
                return Err(too_large_inflated(cap));
            }
            Ok(data.to_vec())
        }
        "gzip" | "x-gzip" => read_capped(flate2::read::MultiGzDecoder::new(data), cap),
        // gRPC's and HTTP's "deflate" is the zlib format; some peers send raw deflate.
        "deflate" => match read_capped(flate2::read::ZlibDecoder::new(data), cap) {
            Err(e) if e.reason == reason::BAD_COMPRESSION => read_capped(flate2::read::DeflateDecoder::new(data), cap),
            other => other,
        },
        other => Err(DecodeError::new(reason::UNSUPPORTED_ENCODING, format!("encoding `{other}` is not decoded"))),
    }
}

fn too_large_inflated(cap: usize) -> DecodeError {
    DecodeError::new(reason::TOO_LARGE, format!("inflated body exceeds the {cap}-byte cap"))
}

/// Reads to the end, growing the buffer in steps that never pass `cap + 1` bytes.
fn read_capped(mut reader: impl Read, cap: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out: Vec<u8> = Vec::new();
    let mut step = [0u8; 16 * 1024];
    loop {
        let n = reader
            .read(&mut step)
            .map_err(|e| DecodeError::new(reason::BAD_COMPRESSION, format!("cannot inflate: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > cap {
            return Err(too_large_inflated(cap));
        }
        if out.capacity() - out.len() < n {
            let wanted = (out.capacity() * 2).max(64 * 1024).min(cap).max(out.len() + n);
            out.reserve_exact(wanted - out.len());
        }
        out.extend_from_slice(&step[..n]);
    }
}

/// The one message of a unary body; extra messages are reported and ignored.
fn unary_message(
    chunks: &[Bytes],
    encoding: Option<&str>,
    limits: &DecodeLimits,
    errors: &mut Vec<DecodeError>,
) -> Result<Bytes, DecodeError> {
    let mut frames = Frames::new(chunks);
    let first = frames
        .next(encoding, limits)?
        .ok_or_else(|| DecodeError::new(reason::MISSING_MESSAGE, "body holds no gRPC message"))?;
    if frames.remaining() > 0 {
        errors.push(DecodeError::new(reason::EXTRA_FRAMES, "a unary call carried more than one message"));
    }
    Ok(first)
}

fn bad_protobuf(what: &str, e: prost::DecodeError) -> DecodeError {
    DecodeError::new(reason::BAD_PROTOBUF, format!("{what}: {e}"))
}

/// Name, version, label and signature of a `ModelSpec`.
fn spec_parts(spec: Option<&serving::ModelSpec>) -> (String, Option<i64>, Option<String>, String) {
    match spec {
        None => (String::new(), None, None, String::new()),
        Some(s) => {
            let (version, label) = match &s.version_choice {
                Some(VersionChoice::Version(v)) => (Some(*v), None),
                Some(VersionChoice::VersionLabel(l)) => (None, Some(l.clone())),
                None => (None, None),
            };
            (s.name.clone(), version, label, s.signature_name.clone())
        }
    }
}

/// Decodes named TensorProtos, skipping (and reporting) the ones that fail.
pub fn decode_tensor_map(
    map: std::collections::HashMap<String, super::proto::TensorProto>,
    budget: &mut Budget,
    errors: &mut Vec<DecodeError>,
) -> Vec<NamedTensor> {
    let mut named: Vec<_> = map.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(named.len());
    for (name, proto) in named {
        match tensor::tensor_from_proto(&proto, budget) {
            Ok(tensor) => out.push(NamedTensor { name, tensor }),
            Err(mut e) => {
                e.detail = format!("tensor `{name}`: {}", e.detail);
                errors.push(e);
            }
        }
    }
    out
}

/// The examples of an `Input`, each with the context's features merged in (an
/// example's own feature wins over the context's of the same name).
pub fn decode_input(
    input: Option<serving::Input>,
    budget: &mut Budget,
    errors: &mut Vec<DecodeError>,
) -> Vec<ExampleFeatures> {
    let (examples, context) = match input.and_then(|i| i.kind) {
        None => (Vec::new(), None),
        Some(input::Kind::ExampleList(list)) => (list.examples, None),
        Some(input::Kind::ExampleListWithContext(list)) => (list.examples, list.context),
    };
    let context_features =
        context.and_then(|c| c.features).map(|f| example_features(f.feature, budget, errors)).unwrap_or_default();
    let mut out = Vec::with_capacity(examples.len());
    for example in examples {
        let mut features = example.features.map(|f| example_features(f.feature, budget, errors)).unwrap_or_default();
        for (name, values) in &context_features {
            if features.binary_search_by(|(n, _)| n.cmp(name)).is_err() {
                if budget.take_copy(values).is_err() {
                    errors.push(DecodeError::new(reason::TOO_LARGE, "context features exceed the element budget"));
                    return out;
                }
                features.push((name.clone(), values.clone()));
            }
        }
        features.sort_by(|a, b| a.0.cmp(&b.0));
        out.push(features);
    }
    out
}

fn example_features(
    map: std::collections::HashMap<String, super::proto::Feature>,
    budget: &mut Budget,
    errors: &mut Vec<DecodeError>,
) -> Vec<(String, TensorValues)> {
    let mut out = Vec::with_capacity(map.len());
    for (name, feature) in map {
        match tensor::feature_values(&feature, budget) {
            Ok(Some(values)) => out.push((name, values)),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn classifications(result: Option<serving::ClassificationResult>, budget: &mut Budget) -> Result<Outputs, DecodeError> {
    let result = result.unwrap_or_default();
    let mut rows = Vec::with_capacity(result.classifications.len());
    for c in result.classifications {
        budget.take(c.classes.len())?;
        rows.push(c.classes.into_iter().map(|class| (class.label, f64::from(class.score))).collect());
    }
    Ok(Outputs::Classifications(rows))
}

fn regressions(result: Option<serving::RegressionResult>) -> Outputs {
    Outputs::Regressions(result.unwrap_or_default().regressions.iter().map(|r| f64::from(r.value)).collect())
}

/// The method the proxy classified the exchange's path as (it is carried with the
/// exchange), recorded in `out`; None (and `unknown_path`) when it is no inference method.
fn inference_method(exchange: &Exchange, out: &mut CallDecoded) -> Option<InferenceMethod> {
    out.method = InferenceMethod::of_call(exchange.method);
    if out.method.is_none() {
        out.errors
            .push(DecodeError::new(reason::UNKNOWN_PATH, format!("`{}` is not an inference method", exchange.path)));
    }
    out.method
}

/// Decodes the response's message into `call`'s outputs, version and signature.
fn response_into(call: &mut Call, exchange: &Exchange, decoding: &mut Decoding, errors: &mut Vec<DecodeError>) {
    let Decoding { limits, ref mut budget, .. } = *decoding;
    let response = unary_message(&exchange.response_body, exchange.response_encoding.as_deref(), limits, errors)
        .and_then(|message| decode_response(call, message, budget, errors));
    if let Err(e) = response {
        errors.push(e);
    }
}

/// Decodes the request and (when `with_response`) the response of a gRPC exchange.
pub fn decode_exchange(exchange: &Exchange, decoding: &mut Decoding) -> CallDecoded {
    let Decoding { limits, ref mut budget, with_response } = *decoding;
    let mut out = CallDecoded::default();
    let Some(method) = inference_method(exchange, &mut out) else { return out };
    let request =
        match unary_message(&exchange.request_body, exchange.request_encoding.as_deref(), limits, &mut out.errors) {
            Ok(m) => m,
            Err(e) => {
                out.errors.push(e);
                return out;
            }
        };
    let mut call = match decode_request(method, request, budget, &mut out.errors) {
        Ok(call) => call,
        Err(e) => {
            out.errors.push(e);
            return out;
        }
    };
    out.model = Some(call.model.clone());
    if with_response {
        response_into(&mut call, exchange, decoding, &mut out.errors);
    }
    out.call = Some(call);
    out
}

/// Decodes a count record: the model spec from the request's prefix (when it is
/// uncompressed and holds it whole), the outputs, served version and signature from
/// the response. The call's inputs are `Inputs::Unsampled`.
pub fn decode_count_record(exchange: &Exchange, decoding: &mut Decoding) -> CallDecoded {
    let with_response = decoding.with_response;
    let mut out = CallDecoded::default();
    let Some(method) = inference_method(exchange, &mut out) else { return out };
    let spec = prefix_model_spec(&exchange.request_body, method);
    let (model, version, version_label, signature) = spec_parts(spec.as_ref());
    let mut call =
        Call { method, model, version, version_label, signature, inputs: Inputs::Unsampled, outputs: Outputs::None };
    if with_response && exchange.bodies == crate::capture::Bodies::ResponseOnly {
        response_into(&mut call, exchange, decoding, &mut out.errors);
    }
    out.model = (!call.model.is_empty()).then(|| call.model.clone());
    out.call = Some(call);
    out
}

/// The `model_spec` of a request from the first bytes of its body: field 1 of every
/// request message (of the first `InferenceTask` for MultiInference), which protobuf
/// encoders write first. None when the prefix is compressed or cuts it.
fn prefix_model_spec(chunks: &[Bytes], method: InferenceMethod) -> Option<serving::ModelSpec> {
    let prefix = crate::capture::prefix(chunks, crate::capture::REQUEST_PREFIX_BYTES).concat();
    let (&flag, rest) = prefix.split_first()?;
    if flag != 0 || rest.len() < 4 {
        return None;
    }
    let length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let message = &rest[4..];
    let message = &message[..message.len().min(length)];
    let first = first_field(message)?;
    match method {
        InferenceMethod::MultiInference => serving::InferenceTask::decode(first_field(first)?).ok()?.model_spec,
        _ => serving::ModelSpec::decode(first).ok(),
    }
}

/// The bytes of field 1 when a message starts with it, length-delimited and whole.
fn first_field(mut message: &[u8]) -> Option<&[u8]> {
    let tag = prost::encoding::decode_varint(&mut message).ok()?;
    if tag != (1 << 3) | 2 {
        return None;
    }
    let length = usize::try_from(prost::encoding::decode_varint(&mut message).ok()?).ok()?;
    message.get(..length)
}

/// Decodes one request message of `method`.
pub fn decode_request(
    method: InferenceMethod,
    message: Bytes,
    budget: &mut Budget,
    errors: &mut Vec<DecodeError>,
) -> Result<Call, DecodeError> {
    let (spec, inputs) = match method {
        InferenceMethod::Predict => {
            let r = PredictRequest::decode(message).map_err(|e| bad_protobuf("PredictRequest", e))?;
            (r.model_spec, Inputs::Tensors(decode_tensor_map(r.inputs, budget, errors)))
        }
        InferenceMethod::Classify => {
            let r = ClassificationRequest::decode(message).map_err(|e| bad_protobuf("ClassificationRequest", e))?;
            (r.model_spec, Inputs::Examples(decode_input(r.input, budget, errors)))
        }
        InferenceMethod::Regress => {
            let r = RegressionRequest::decode(message).map_err(|e| bad_protobuf("RegressionRequest", e))?;
            (r.model_spec, Inputs::Examples(decode_input(r.input, budget, errors)))
        }
        InferenceMethod::MultiInference => {
            let r = MultiInferenceRequest::decode(message).map_err(|e| bad_protobuf("MultiInferenceRequest", e))?;
            let spec = r.tasks.first().and_then(|t| t.model_spec.clone());
            (spec, Inputs::Examples(decode_input(r.input, budget, errors)))
        }
    };
    let (model, version, version_label, signature) = spec_parts(spec.as_ref());
    Ok(Call { method, model, version, version_label, signature, inputs, outputs: Outputs::None })
}

/// Decodes one response message into `call`'s outputs, taking the served version
/// and signature from its `model_spec`.
pub fn decode_response(
    call: &mut Call,
    message: Bytes,
    budget: &mut Budget,
    errors: &mut Vec<DecodeError>,
) -> Result<(), DecodeError> {
    let (spec, outputs) = match call.method {
        InferenceMethod::Predict => {
            let r = PredictResponse::decode(message).map_err(|e| bad_protobuf("PredictResponse", e))?;
            (r.model_spec, Outputs::Tensors(decode_tensor_map(r.outputs, budget, errors)))
        }
        InferenceMethod::Classify => {
            let r = ClassificationResponse::decode(message).map_err(|e| bad_protobuf("ClassificationResponse", e))?;
            (r.model_spec, classifications(r.result, budget)?)
        }
        InferenceMethod::Regress => {
            let r = RegressionResponse::decode(message).map_err(|e| bad_protobuf("RegressionResponse", e))?;
            (r.model_spec, regressions(r.result))
        }
        InferenceMethod::MultiInference => {
            let r = MultiInferenceResponse::decode(message).map_err(|e| bad_protobuf("MultiInferenceResponse", e))?;
            let mut tasks = Vec::with_capacity(r.results.len());
            for result in r.results {
                let (model, version, _, signature) = spec_parts(result.model_spec.as_ref());
                let (method, outputs) = match result.result {
                    Some(inference_result::Result::ClassificationResult(c)) => {
                        (InferenceMethod::Classify, classifications(Some(c), budget)?)
                    }
                    Some(inference_result::Result::RegressionResult(r)) => {
                        (InferenceMethod::Regress, regressions(Some(r)))
                    }
                    None => continue,
                };
                tasks.push(TaskResult { model, version, signature, method, outputs });
            }
            (None, Outputs::Tasks(tasks))
        }
    };
    call.outputs = outputs;
    apply_spec(call, spec.as_ref());
    Ok(())
}

fn apply_spec(call: &mut Call, spec: Option<&serving::ModelSpec>) {
    let (model, version, _, signature) = spec_parts(spec);
    if call.model.is_empty() {
        // A count record whose request prefix did not hold the model spec.
        call.model = model;
    }
    if version.is_some() {
        call.version = version;
    }
    if !signature.is_empty() {
        call.signature = signature;
    }
}

/// Frames one message as gRPC does (uncompressed), for tests and benchmarks.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_split_across_chunks_is_reassembled() {
        let body = frame(b"hello world");
        let chunks: Vec<Bytes> = body.chunks(3).map(Bytes::copy_from_slice).collect();
        let mut frames = Frames::new(&chunks);
        let limits = DecodeLimits::default();
        assert_eq!(frames.next(None, &limits).unwrap().unwrap(), Bytes::from_static(b"hello world"));
        assert_eq!(frames.next(None, &limits).unwrap(), None);
    }

    #[test]
    fn a_length_beyond_the_capture_is_truncated_not_allocated() {
        let chunks = vec![Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff, 1, 2])];
        let e = Frames::new(&chunks).next(None, &DecodeLimits::default()).unwrap_err();
        assert_eq!(e.reason, reason::TRUNCATED_FRAME);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_cap() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; 10 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        assert_eq!(inflate("gzip", &bomb, 1 << 20).unwrap_err().reason, reason::TOO_LARGE);
        assert_eq!(inflate("gzip", &bomb, 11 << 20).unwrap().len(), 10 << 20);
        assert_eq!(inflate("snappy", &bomb, 1).unwrap_err().reason, reason::UNSUPPORTED_ENCODING);
    }
}
