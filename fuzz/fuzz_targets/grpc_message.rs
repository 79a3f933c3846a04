//! The gRPC decoder on arbitrary bodies: framing across chunks, compression flags
//! and encodings, and every PredictionService message, end to end to observations.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::grpc::frame;
use mltap::tfserving::{DecodeLimits, Decoder};
use std::time::{Duration, SystemTime};

const METHODS: [&str; 4] = ["Predict", "Classify", "Regress", "MultiInference"];
const ENCODINGS: [Option<&str>; 4] = [None, Some("gzip"), Some("deflate"), Some("identity")];

fuzz_target!(|data: &[u8]| {
    let [selector, chunk, rest @ ..] = data else { return };
    let method = METHODS[usize::from(selector & 3)];
    let framed = selector & 4 != 0;
    let encoding = ENCODINGS[usize::from((selector >> 3) & 3)];
    let chunk = usize::from(*chunk) + 1;
    let (request, response) = rest.split_at(rest.len() / 2);
    let body = |b: &[u8]| -> Vec<Bytes> {
        let b = if framed { frame(b) } else { Bytes::copy_from_slice(b) };
        (0..b.len()).step_by(chunk).map(|i| b.slice(i..(i + chunk).min(b.len()))).collect()
    };
    let exchange = Exchange {
        protocol: Protocol::Grpc,
        path: format!("/tensorflow.serving.PredictionService/{method}"),
        method: mltap::capture::RouteKind::of_request(Protocol::Grpc, &format!("/tensorflow.serving.PredictionService/{method}")).method,
        request_id: "fuzz".into(),
        request_id_generated: false,
        request_encoding: encoding.map(String::from),
        response_encoding: encoding.map(String::from),
        bodies: mltap::capture::Bodies::Full,
        request_body: body(request),
        response_body: body(response),
        status: 200,
        grpc_status: Some(0),
        origin: None,
        started_at: SystemTime::UNIX_EPOCH,
        upstream_latency: Duration::ZERO,
        complete: true,
    };
    let limits = DecodeLimits { max_elements: 1 << 16, max_decompressed_bytes: 1 << 20, ..DecodeLimits::default() };
    let _ = Decoder::default().with_limits(limits).decode(&exchange);
});
