//! Decode throughput per core: the 64×16 gRPC Predict fixture (request + response,
//! 1344 float values) and a REST row-format exchange of the same tensors, through
//! the full decoder (bodies → observation) and through the protocol layer alone.
//! A serde_json `Value` parse of the same REST bodies runs beside them as a baseline.
//!
//! Run: `cargo bench --bench decode`. Each case is reported twice, as values/s
//! (`.../values`) and as bytes/s (`.../bytes`).

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::grpc::frame;
use mltap::tfserving::Decoder;
use std::time::{Duration, SystemTime};

#[path = "../tests/support/mod.rs"]
mod support;

fn exchange(protocol: Protocol, path: &str, request: Bytes, response: Bytes) -> Exchange {
    Exchange {
        protocol,
        path: path.into(),
        method: mltap::capture::RouteKind::of_request(protocol, path).method,
        request_id: "bench".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: vec![request],
        response_body: vec![response],
        status: 200,
        grpc_status: (protocol == Protocol::Grpc).then_some(0),
        origin: None,
        started_at: SystemTime::UNIX_EPOCH,
        upstream_latency: Duration::ZERO,
        complete: true,
    }
}

/// Rows of a fixture tensor, as Python's `json.dumps(array.tolist())` writes them.
fn json_rows(values: &[serde_json::Value], width: usize) -> String {
    let rows: Vec<String> = values
        .chunks(width)
        .map(|row| format!("[{}]", row.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")))
        .collect();
    format!("[{}]", rows.join(", "))
}

fn bench(c: &mut Criterion) {
    let dir = support::fixtures_dir().join("grpc");
    let request = std::fs::read(dir.join("batch64x16.request.pb")).unwrap();
    let response = std::fs::read(dir.join("batch64x16.response.pb")).unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("batch64x16.expected.json")).unwrap()).unwrap();
    let inputs = expected["inputs"]["x"]["values"].as_array().unwrap();
    let outputs = expected["outputs"]["probabilities"]["values"].as_array().unwrap();
    let values = (inputs.len() + outputs.len()) as u64;

    let grpc =
        exchange(Protocol::Grpc, "/tensorflow.serving.PredictionService/Predict", frame(&request), frame(&response));
    let rest_request = format!(r#"{{"instances": {}}}"#, json_rows(inputs, 16));
    let rest_response = format!(r#"{{"predictions": {}}}"#, json_rows(outputs, 5));
    let rest = exchange(
        Protocol::Rest,
        "/v1/models/bench:predict",
        Bytes::from(rest_request.clone()),
        Bytes::from(rest_response.clone()),
    );
    let decoder = Decoder::default();
    assert!(decoder.decode(&grpc).errors.is_empty());
    assert!(decoder.decode(&rest).errors.is_empty());
    assert_eq!(decoder.decode(&rest).observations[0].features.len(), 16);

    let mut group = c.benchmark_group("decode");
    group.measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    let cases: [(&str, &Exchange); 2] = [("grpc_batch64x16", &grpc), ("rest_row_batch64x16", &rest)];
    for (name, ex) in cases {
        for (unit, throughput) in
            [("values", Throughput::Elements(values)), ("bytes", Throughput::Bytes(ex.captured_bytes() as u64))]
        {
            group.throughput(throughput);
            group.bench_function(format!("{name}/observation/{unit}"), |b| b.iter(|| decoder.decode(black_box(ex))));
            group.bench_function(format!("{name}/call/{unit}"), |b| b.iter(|| decoder.decode_call(black_box(ex))));
        }
    }
    group.throughput(Throughput::Elements(values));
    group.bench_function("rest_row_batch64x16/serde_json_value_baseline/values", |b| {
        b.iter(|| {
            let request: serde_json::Value = serde_json::from_str(black_box(&rest_request)).unwrap();
            let response: serde_json::Value = serde_json::from_str(black_box(&rest_response)).unwrap();
            (request, response)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
