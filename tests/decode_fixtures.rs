//! Every real TF Serving encoding in the shared fixtures decodes to exactly what
//! TensorFlow itself finds in it (`expected.json`: dtype, shape, values; null = NaN).

use bytes::Bytes;
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::call::{ExampleFeatures, Inputs, Outputs};
use mltap::tfserving::grpc::frame;
use mltap::tfserving::{Decoder, NamedTensor, TensorValues};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, SystemTime};

mod support;

fn cases(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".expected.json").map(String::from))
        .collect();
    names.sort();
    names
}

/// Splits a body into small chunks, as HTTP/2 DATA frames may carry it.
fn chunked(body: Bytes, size: usize) -> Vec<Bytes> {
    (0..body.len()).step_by(size).map(|i| body.slice(i..(i + size).min(body.len()))).collect()
}

pub fn exchange(protocol: Protocol, path: &str, request: Vec<Bytes>, response: Vec<Bytes>, status: u16) -> Exchange {
    Exchange {
        protocol,
        path: path.to_string(),
        method: mltap::capture::RouteKind::of_request(protocol, path).method,
        request_id: "req-1".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: request,
        response_body: response,
        status,
        grpc_status: (protocol == Protocol::Grpc).then_some(0),
        origin: None,
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        upstream_latency: Duration::from_millis(3),
        complete: true,
    }
}

/// Compares decoded values with the fixture's, exactly (NaN where it has null).
fn assert_values(context: &str, got: &TensorValues, want: &[Value]) {
    assert_eq!(got.len(), want.len(), "{context}: element count");
    for (i, w) in want.iter().enumerate() {
        let ok = match (got, w) {
            (TensorValues::Float(v), Value::Null) => v[i].is_nan(),
            (TensorValues::Float(v), w) => w.as_f64().is_some_and(|w| w.to_bits() == v[i].to_bits()),
            (TensorValues::Int(v), w) => w.as_i64() == Some(v[i]),
            (TensorValues::UInt(v), w) => w.as_u64() == Some(v[i]),
            (TensorValues::Bool(v), w) => w.as_bool() == Some(v[i]),
            (TensorValues::Bytes(v), Value::String(s)) => v[i] == s.as_bytes(),
            (TensorValues::Bytes(v), Value::Object(o)) => {
                use base64::Engine;
                let b64 = o["b64"].as_str().unwrap();
                v[i] == base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
            }
            _ => false,
        };
        assert!(ok, "{context}: element {i}: decoded {got:?} expected {w}");
    }
}

fn assert_tensors(context: &str, got: &[NamedTensor], want: &Value, exact_set: bool) {
    let want = want.as_object().unwrap();
    if exact_set {
        let names: Vec<&str> = got.iter().map(|t| t.name.as_str()).collect();
        let mut wanted: Vec<&str> = want.keys().map(String::as_str).collect();
        wanted.sort();
        assert_eq!(names, wanted, "{context}: tensor names");
    }
    for (name, w) in want {
        let t = got.iter().find(|t| &t.name == name).unwrap_or_else(|| panic!("{context}: no tensor `{name}`"));
        let ctx = format!("{context} `{name}`");
        if let Some(dtype) = w.get("dtype") {
            assert_eq!(t.tensor.dtype.tf_name(), dtype.as_str().unwrap(), "{ctx}: dtype");
        }
        let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(t.tensor.shape, shape, "{ctx}: shape");
        assert_values(&ctx, &t.tensor.values, w["values"].as_array().unwrap());
    }
}

fn assert_examples(context: &str, got: &[ExampleFeatures], want: &Value) {
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{context}: examples");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = w.as_object().unwrap();
        let names: Vec<&str> = g.iter().map(|(n, _)| n.as_str()).collect();
        let mut wanted: Vec<&str> = w.keys().map(String::as_str).collect();
        wanted.sort();
        assert_eq!(names, wanted, "{context}: example {i} features");
        for (name, values) in g {
            assert_values(&format!("{context} example {i} `{name}`"), values, w[name].as_array().unwrap());
        }
    }
}

fn assert_results(context: &str, got: &Outputs, want: &Value) {
    let want = want.as_array().unwrap();
    match got {
        Outputs::Classifications(rows) => {
            assert_eq!(rows.len(), want.len(), "{context}: result rows");
            for (row, w) in rows.iter().zip(want) {
                let w = w.as_array().unwrap();
                assert_eq!(row.len(), w.len(), "{context}: classes");
                for ((label, score), pair) in row.iter().zip(w) {
                    assert_eq!(label, pair[0].as_str().unwrap(), "{context}: label");
                    assert_eq!(score.to_bits(), pair[1].as_f64().unwrap().to_bits(), "{context}: score of {label}");
                }
            }
        }
        Outputs::Regressions(values) => {
            let want: Vec<f64> = want.iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(values, &want, "{context}: regression values");
        }
        other => panic!("{context}: expected results, decoded {other:?}"),
    }
}

#[test]
fn every_grpc_fixture_decodes_to_what_tensorflow_finds() {
    let dir = support::fixtures_dir().join("grpc");
    let names = cases(&dir);
    assert!(names.len() >= 12, "fixtures missing: {names:?}");
    let decoder = Decoder::default();
    for name in names {
        let expected: Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.expected.json"))).unwrap()).unwrap();
        let request = std::fs::read(dir.join(format!("{name}.request.pb"))).unwrap();
        let response = std::fs::read(dir.join(format!("{name}.response.pb"))).unwrap();
        let method = match (expected.get("results"), expected.get("results").and_then(|r| r[0].as_array())) {
            (Some(_), Some(_)) => "Classify",
            (Some(_), None) => "Regress",
            _ => "Predict",
        };
        let ex = exchange(
            Protocol::Grpc,
            &format!("/tensorflow.serving.PredictionService/{method}"),
            chunked(frame(&request), 7),
            chunked(frame(&response), 11),
            200,
        );
        let decoded = decoder.decode_call(&ex);
        assert!(decoded.errors.is_empty(), "{name}: {:?}", decoded.errors);
        let call = decoded.call.unwrap_or_else(|| panic!("{name}: no call"));
        assert_eq!(call.model, expected["model"].as_str().unwrap(), "{name}: model");
        if let Some(v) = expected.get("served_version") {
            assert_eq!(call.version, v.as_i64(), "{name}: served version");
        }
        match (&call.inputs, expected.get("inputs"), expected.get("examples")) {
            (Inputs::Tensors(t), Some(want), None) => assert_tensors(&name, t, want, true),
            (Inputs::Examples(e), None, Some(want)) => assert_examples(&name, e, want),
            (got, _, _) => panic!("{name}: unexpected inputs {got:?}"),
        }
        match (&call.outputs, expected.get("outputs"), expected.get("results")) {
            (Outputs::Tensors(t), Some(want), None) => assert_tensors(&name, t, want, true),
            (outputs, None, Some(want)) => assert_results(&name, outputs, want),
            (got, _, _) => panic!("{name}: unexpected outputs {got:?}"),
        }
    }
}

#[test]
fn every_rest_fixture_decodes_to_what_tensorflow_finds() {
    let dir = support::fixtures_dir().join("rest");
    let names = cases(&dir);
    assert!(names.len() >= 10, "fixtures missing: {names:?}");
    let decoder = Decoder::default();
    for name in names {
        let expected: Value =
            serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.expected.json"))).unwrap()).unwrap();
        let request = Bytes::from(std::fs::read(dir.join(format!("{name}.request.json"))).unwrap());
        let response = Bytes::from(std::fs::read(dir.join(format!("{name}.response.json"))).unwrap());
        let status = expected["status"].as_u64().unwrap() as u16;
        let path = expected["path"].as_str().unwrap();
        let ex = exchange(Protocol::Rest, path, chunked(request, 64), vec![response], status);
        let decoded = decoder.decode_call(&ex);
        assert!(decoded.errors.is_empty(), "{name}: {:?}", decoded.errors);
        if expected.get("error").is_some() {
            assert!(decoded.call.is_none(), "{name}: a failed exchange has nothing to observe");
            assert!(!decoded.succeeded);
            assert!(decoded.model.is_some(), "{name}: the URL still names the model");
            continue;
        }
        let call = decoded.call.unwrap_or_else(|| panic!("{name}: no call"));
        if let Some(v) = expected.get("version") {
            assert_eq!(call.version, v.as_i64(), "{name}: version");
        }
        if let Some(l) = expected.get("version_label") {
            assert_eq!(call.version_label.as_deref(), l.as_str(), "{name}: label");
        }
        if let Some(s) = expected.get("signature_name") {
            assert_eq!(call.signature, s.as_str().unwrap(), "{name}: signature");
        }
        if let Some(want) = expected.get("inputs") {
            let Inputs::Tensors(t) = &call.inputs else { panic!("{name}: inputs {:?}", call.inputs) };
            assert_tensors(&name, t, want, true);
        }
        if let Some(want) = expected.get("outputs") {
            let Outputs::Tensors(t) = &call.outputs else { panic!("{name}: outputs {:?}", call.outputs) };
            // The fixtures list the outputs that matter (probabilities); others may be present.
            assert_tensors(&name, t, want, false);
        }
        if let Some(want) = expected.get("results") {
            assert_results(&name, &call.outputs, want);
        }
    }
}
