//! What a captured exchange says besides its bodies: the method the proxy classified
//! it as, whose fault a failure was (mltap's own 502 versus TF Serving's errors), and
//! that a count record (response and request prefix only) decodes to the same stream,
//! rows and classes as the whole exchange.

mod support;

use bytes::Bytes;
use mltap::capture::{Bodies, CallMethod, CaptureReceiver, ErrorOrigin, Exchange, Protocol, RouteKind};
use mltap::config::Config;
use mltap::proxy::{Proxy, ProxyMetrics, ProxySettings};
use mltap::tfserving::Decoder;
use std::time::{Duration, SystemTime};
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::{channel, config, dead_address};
use support::raw_codec::call_raw;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The proxy alone in front of `grpc`/`rest` upstream URLs, with the worker's end of
/// the queue left to the test.
async fn tapped(grpc: &str, rest: &str) -> (String, String, CaptureReceiver, watch::Sender<bool>) {
    let config: Config = config(grpc, rest);
    let (sender, receiver) = mltap::capture::queue(&config.capture);
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = Proxy::new(&ProxySettings::from(&config), sender, ProxyMetrics::register(&mut registry)).unwrap();
    let (g, r) = (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let urls = (format!("http://{}", g.local_addr().unwrap()), format!("http://{}", r.local_addr().unwrap()));
    let (stop, stopped) = watch::channel(false);
    let (p, s) = (proxy.clone(), stopped.clone());
    tokio::spawn(async move { p.serve_grpc(g, s).await });
    tokio::spawn(async move { proxy.serve_rest(r, stopped).await });
    (urls.0, urls.1, receiver, stop)
}

async fn next(receiver: &mut CaptureReceiver) -> Exchange {
    tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await.expect("an exchange is queued").unwrap()
}

#[tokio::test]
async fn exchanges_carry_the_method_and_whose_fault_a_failure_was() {
    let fake = FakeTfServing::start().await;
    let (grpc, rest, mut receiver, _stop) = tapped(&fake.grpc_url(), &fake.rest_url()).await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "classify").unwrap();
    let proxied = channel(grpc).await;
    call_raw(&proxied, &f.path, f.request.clone(), &[]).await.unwrap();
    let e = next(&mut receiver).await;
    assert_eq!((e.method, e.origin, e.bodies), (CallMethod::Classify, None, Bodies::Full));

    let meta = [("x-fake-grpc-error", "5")];
    call_raw(&proxied, &f.path, f.request.clone(), &meta).await.unwrap_err();
    let e = next(&mut receiver).await;
    assert_eq!((e.origin, e.status_dimension().as_str()), (Some(ErrorOrigin::Upstream), "grpc_5"));

    let r = rest_fixtures().into_iter().find(|f| f.name == "error_not_found").unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let answer = client.post(format!("{rest}{}", r.path)).body(r.request.clone()).send().await.unwrap();
    assert_eq!(answer.status(), r.status);
    let e = next(&mut receiver).await;
    assert_eq!((e.method, e.origin), (CallMethod::Predict, Some(ErrorOrigin::Upstream)), "TF Serving's own error");
}

#[tokio::test]
async fn mltap_answers_for_a_dead_upstream_are_told_apart_from_tf_servings() {
    let dead = format!("http://{}", dead_address().await);
    let (grpc, rest, mut receiver, _stop) = tapped(&dead, &dead).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let answer = client.post(format!("{rest}/v1/models/iris:predict")).body("{}").send().await.unwrap();
    assert_eq!(answer.status(), 502);
    let e = next(&mut receiver).await;
    assert_eq!((e.status, e.origin), (502, Some(ErrorOrigin::Mltap)));

    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let status = call_raw(&channel(grpc).await, &f.path, f.request.clone(), &[]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let e = next(&mut receiver).await;
    assert_eq!((e.grpc_status, e.origin), (Some(14), Some(ErrorOrigin::Mltap)));
}

fn framed(message: &[u8]) -> Bytes {
    let mut v = vec![0u8];
    v.extend_from_slice(&(message.len() as u32).to_be_bytes());
    v.extend_from_slice(message);
    v.into()
}

fn exchange(protocol: Protocol, path: &str, bodies: Bodies, request: Bytes, response: Bytes) -> Exchange {
    let request = match bodies {
        Bodies::Full => vec![request],
        _ => mltap::capture::prefix(&[request], mltap::capture::REQUEST_PREFIX_BYTES),
    };
    Exchange {
        protocol,
        method: RouteKind::of_request(protocol, path).method,
        path: path.to_string(),
        request_id: "r".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies,
        request_body: request,
        response_body: vec![response],
        status: 200,
        grpc_status: (protocol == Protocol::Grpc).then_some(0),
        origin: None,
        started_at: SystemTime::UNIX_EPOCH,
        upstream_latency: Duration::ZERO,
        complete: true,
    }
}

#[test]
fn a_count_record_decodes_to_the_same_stream_rows_and_classes_without_features() {
    let decoder = Decoder::default();
    let grpc = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let rest = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let rest_signed = Bytes::from(r#"{"signature_name": "scores", "instances": [[1.0, 2.0, 3.0, 4.0]]}"#);
    let cases = [
        (Protocol::Grpc, grpc.path.clone(), framed(&grpc.request), framed(&grpc.response)),
        (Protocol::Rest, rest.path.clone(), rest.request.clone(), rest.response.clone()),
        (Protocol::Rest, rest.path.clone(), rest_signed, Bytes::from(r#"{"predictions": [[0.2, 0.3, 0.5]]}"#)),
    ];
    for (protocol, path, request, response) in cases {
        let full = decoder.decode(&exchange(protocol, &path, Bodies::Full, request.clone(), response.clone()));
        let counted = decoder.decode(&exchange(protocol, &path, Bodies::ResponseOnly, request, response));
        assert!(full.sampled && !counted.sampled);
        assert!(counted.errors.is_empty(), "{path}: {:?}", counted.errors);
        assert_eq!(counted.model, full.model, "{path}");
        let (whole, outputs) = (&full.observations[0], &counted.observations[0]);
        assert_eq!(outputs.stream, whole.stream, "{path}: the same model, version and signature");
        assert_eq!(outputs.rows, whole.rows);
        assert_eq!(outputs.probabilities, whole.probabilities);
        assert!(!whole.features.is_empty() && outputs.features.is_empty(), "{path}");
    }
    let signed = decoder.decode(&exchange(
        Protocol::Rest,
        &rest.path,
        Bodies::ResponseOnly,
        Bytes::from(r#"{"signature_name": "scores", "instances": [[1.0]]}"#),
        Bytes::from(r#"{"predictions": [[0.2, 0.8]]}"#),
    ));
    assert_eq!(signed.observations[0].stream.signature, "scores", "the signature is read from the prefix");
}

#[test]
fn a_record_without_bodies_counts_the_request_and_no_rows() {
    let decoder = Decoder::default();
    let mut e = exchange(
        Protocol::Rest,
        "/v1/models/iris:predict",
        Bodies::Neither,
        Bytes::new(),
        Bytes::from_static(b"ignored"),
    );
    e.request_body.clear();
    let decoded = decoder.decode(&e);
    assert_eq!(decoded.model.as_deref(), Some("iris"));
    assert!(decoded.observations.is_empty() && decoded.errors.is_empty(), "{:?}", decoded.errors);
}
