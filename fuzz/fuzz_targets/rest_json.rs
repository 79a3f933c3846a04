//! The REST decoder on arbitrary bodies: TF Serving's JSON (NaN/Infinity tokens,
//! b64 objects, row and columnar formats, classify/regress), nesting bounds, and
//! the whole path to observations.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::{DecodeLimits, Decoder};
use std::time::{Duration, SystemTime};

const VERBS: [&str; 3] = ["predict", "classify", "regress"];
const VALID_REQUEST: &[u8] = br#"{"instances": [[1.0, 2.0]], "examples": [{"a": 1}]}"#;
const VALID_RESPONSE: &[u8] = br#"{"predictions": [[0.5, 0.5]], "results": [[["a", 1.0]]]}"#;

fuzz_target!(|data: &[u8]| {
    let [selector, body @ ..] = data else { return };
    let verb = VERBS[usize::from(selector % 3)];
    let (request, response) = if selector & 0x80 == 0 { (body, VALID_RESPONSE) } else { (VALID_REQUEST, body) };
    let exchange = Exchange {
        protocol: Protocol::Rest,
        path: format!("/v1/models/m:{verb}"),
        method: mltap::capture::RouteKind::of_request(Protocol::Rest, &format!("/v1/models/m:{verb}")).method,
        request_id: "fuzz".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: vec![Bytes::copy_from_slice(request)],
        response_body: vec![Bytes::copy_from_slice(response)],
        status: 200,
        grpc_status: None,
        origin: None,
        started_at: SystemTime::UNIX_EPOCH,
        upstream_latency: Duration::ZERO,
        complete: true,
    };
    let limits = DecodeLimits { max_elements: 1 << 16, ..DecodeLimits::default() };
    let _ = Decoder::default().with_limits(limits).decode(&exchange);
});
