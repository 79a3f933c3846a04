//! Black-box transparency tests of the gRPC listener: a real tonic client talks to
//! the fake TF Serving directly and through mltap, and the answers must agree.

mod support;

use bytes::Bytes;
use mltap::tfserving::proto::serving;
use mltap::tfserving::proto::serving::prediction_service_client::PredictionServiceClient;
use prost::Message;
use support::fake_tfserving::{grpc_fixtures, FakeTfServing};
use support::mltap::{channel, config, dead_address, Mltap};
use support::raw_codec::call_raw;
use tonic::Code;

const PREDICT: &str = "/tensorflow.serving.PredictionService/Predict";

async fn setup() -> (FakeTfServing, Mltap) {
    let fake = FakeTfServing::start().await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &fake.rest_url())).await;
    (fake, mltap)
}

fn batch64x16() -> support::fake_tfserving::GrpcFixture {
    grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").expect("batch64x16 fixture")
}

#[tokio::test]
async fn grpc_every_fixture_is_answered_byte_identically_through_mltap() {
    let (fake, mltap) = setup().await;
    let (direct, proxied) = (channel(fake.grpc_url()).await, channel(mltap.grpc_url()).await);
    let fixtures = grpc_fixtures();
    assert!(fixtures.len() >= 10, "fixtures found: {}", fixtures.len());
    for f in fixtures {
        let a = call_raw(&direct, &f.path, f.request.clone(), &[]).await.expect("direct");
        let b = call_raw(&proxied, &f.path, f.request.clone(), &[]).await.expect("through mltap");
        assert_eq!(a.get_ref(), &f.response, "{}: the fake answers the recording", f.name);
        assert_eq!(b.get_ref(), a.get_ref(), "{}: bytes through mltap differ", f.name);
        assert_eq!(b.metadata().get("content-type"), a.metadata().get("content-type"), "{}", f.name);
    }
}

#[tokio::test]
async fn grpc_generated_client_gets_the_recorded_predict_response() {
    let (_fake, mltap) = setup().await;
    let f = batch64x16();
    let mut client = PredictionServiceClient::new(channel(mltap.grpc_url()).await);
    let request = serving::PredictRequest::decode(f.request.clone()).unwrap();
    let response = client.predict(request).await.expect("predict through mltap").into_inner();
    assert_eq!(response, serving::PredictResponse::decode(f.response.clone()).unwrap());
}

#[tokio::test]
async fn grpc_model_metadata_and_status_pass() {
    let (fake, mltap) = setup().await;
    let mut client = PredictionServiceClient::new(channel(mltap.grpc_url()).await);
    let request = serving::GetModelMetadataRequest {
        model_spec: Some(serving::ModelSpec { name: "iris".into(), ..Default::default() }),
        metadata_field: vec!["signature_def".into()],
    };
    let response = client.get_model_metadata(request).await.expect("metadata").into_inner();
    assert_eq!(response.model_spec.unwrap().name, "iris");
    let mut models = serving::model_service_client::ModelServiceClient::new(channel(mltap.grpc_url()).await);
    let status = models
        .get_model_status(serving::GetModelStatusRequest { model_spec: None })
        .await
        .expect("model status")
        .into_inner();
    assert_eq!(status.model_version_status.len(), 1);
    assert_eq!(fake.state.received.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn grpc_error_code_and_message_in_trailers_are_relayed() {
    let (fake, mltap) = setup().await;
    let f = batch64x16();
    let meta = [("x-fake-grpc-error-after-data", "3")];
    let direct = call_raw(&channel(fake.grpc_url()).await, PREDICT, f.request.clone(), &meta).await.unwrap_err();
    let proxied = call_raw(&channel(mltap.grpc_url()).await, PREDICT, f.request.clone(), &meta).await.unwrap_err();
    assert_eq!(direct.code(), Code::InvalidArgument);
    assert_eq!(proxied.code(), direct.code());
    assert_eq!(proxied.message(), "failed after data");
    assert_eq!(proxied.message(), direct.message());
}

#[tokio::test]
async fn grpc_trailers_only_error_is_relayed() {
    let (_fake, mltap) = setup().await;
    let f = batch64x16();
    let meta = [("x-fake-grpc-error", "5"), ("x-fake-grpc-message", "Servable not found: iris")];
    let status = call_raw(&channel(mltap.grpc_url()).await, PREDICT, f.request.clone(), &meta).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "Servable not found: iris");

    // On the wire: the status is in the response head and the stream ends there.
    let response = h2_post(&mltap.grpc_url(), PREDICT, &f.request, &meta).await;
    assert_eq!(response.0.get("grpc-status").unwrap(), "5");
    assert!(response.1.is_empty(), "a trailers-only answer has no body");
    assert!(response.2.is_none(), "and no separate trailers");
}

/// A plain HTTP/2 gRPC POST: response head, body bytes, trailers.
async fn h2_post(
    url: &str,
    path: &str,
    message: &[u8],
    meta: &[(&str, &str)],
) -> (http::HeaderMap, Bytes, Option<http::HeaderMap>) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    let mut request = http::Request::post(format!("{url}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed)))
        .unwrap();
    for (k, v) in meta {
        request.headers_mut().insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let response = client.request(request).await.expect("h2 request");
    let head = response.headers().clone();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    (head, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn grpc_metadata_passes_unchanged() {
    let (fake, mltap) = setup().await;
    let f = batch64x16();
    let mut client = PredictionServiceClient::new(channel(mltap.grpc_url()).await);
    let mut request = tonic::Request::new(serving::PredictRequest::decode(f.request.clone()).unwrap());
    request.set_timeout(std::time::Duration::from_secs(30));
    request.metadata_mut().insert("x-request-id", "req-42".parse().unwrap());
    request.metadata_mut().insert("x-tenant", "blue".parse().unwrap());
    request.metadata_mut().insert_bin("trace-bin", tonic::metadata::MetadataValue::from_bytes(&[0, 1, 2, 255]));
    client.predict(request).await.expect("predict");
    let seen = fake.state.last_headers();
    assert_eq!(seen.get("x-request-id").unwrap(), "req-42");
    assert_eq!(seen.get("x-tenant").unwrap(), "blue");
    assert_eq!(seen.get("trace-bin").unwrap(), "AAEC/w");
    assert_eq!(seen.get("te").unwrap(), "trailers");
    assert!(seen.get("grpc-timeout").is_some(), "grpc-timeout reaches TF Serving: {seen:?}");
    assert_eq!(seen.get("content-type").unwrap(), "application/grpc");
}

#[tokio::test]
async fn grpc_32_mib_message_passes_both_ways() {
    let (fake, mltap) = setup().await;
    let big: Bytes = (0..32u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let response = call_raw(&channel(mltap.grpc_url()).await, PREDICT, big.clone(), &[("x-fake-echo", "1")])
        .await
        .expect("32 MiB through mltap");
    assert_eq!(fake.state.last_body().len(), big.len());
    assert!(response.get_ref() == &big, "the echoed 32 MiB message differs");
}

#[tokio::test]
async fn grpc_client_cancel_reaches_upstream() {
    let (fake, mltap) = setup().await;
    let proxied = channel(mltap.grpc_url()).await;
    let call = call_raw(&proxied, PREDICT, Bytes::from_static(b"x"), &[("x-fake-hang", "1")]);
    let mut call = Box::pin(call);
    // Drop the call once TF Serving has it: tonic resets the stream.
    tokio::select! {
        _ = &mut call => panic!("a hanging call answered"),
        _ = fake.state.wait_received(1) => {}
    }
    drop(call);
    fake.state.wait_cancelled(1).await;
}

#[tokio::test]
async fn grpc_upstream_reset_reaches_client_with_its_reason() {
    let (fake, mltap) = setup().await;
    let (direct, proxied) = (channel(fake.grpc_url()).await, channel(mltap.grpc_url()).await);
    for mode in ["before-headers", "after-data"] {
        let meta = [("x-fake-reset", mode)];
        let a = call_raw(&direct, PREDICT, Bytes::from_static(b"x"), &meta).await.unwrap_err();
        let b = call_raw(&proxied, PREDICT, Bytes::from_static(b"x"), &meta).await.unwrap_err();
        // RST_STREAM(ENHANCE_YOUR_CALM) is what tonic reports as RESOURCE_EXHAUSTED.
        assert_eq!(a.code(), Code::ResourceExhausted, "{mode} direct: {a:?}");
        assert_eq!(b.code(), a.code(), "{mode} through mltap: {b:?}");
    }
    // The reset did not poison the pooled connection.
    let f = batch64x16();
    call_raw(&proxied, &f.path, f.request.clone(), &[]).await.expect("a later call succeeds");
}

#[tokio::test]
async fn grpc_500_concurrent_streams_on_one_connection() {
    let (fake, mltap) = setup().await;
    // TF Serving releases every answer only once all 500 calls are in flight at once.
    fake.state.set_barrier(500);
    let proxied = channel(mltap.grpc_url()).await;
    let f = batch64x16();
    let calls = (0..500).map(|_| {
        let (proxied, f) = (proxied.clone(), f.clone());
        tokio::spawn(async move { call_raw(&proxied, &f.path, f.request.clone(), &[("x-fake-barrier", "1")]).await })
    });
    let all = futures_util::future::join_all(calls);
    let results =
        tokio::time::timeout(std::time::Duration::from_secs(60), all).await.expect("500 streams concurrently");
    for result in results {
        assert_eq!(result.unwrap().expect("call").get_ref(), &f.response);
    }
}

#[tokio::test]
async fn grpc_dead_upstream_answers_unavailable_naming_it() {
    let fake = FakeTfServing::start().await;
    let dead = dead_address().await;
    let mltap = Mltap::start(config(&format!("http://{dead}"), &fake.rest_url())).await;
    let f = batch64x16();
    let status = call_raw(&channel(mltap.grpc_url()).await, &f.path, f.request.clone(), &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&dead.to_string()), "message names the upstream: {}", status.message());
}

#[tokio::test]
async fn grpc_slow_upstream_answers_deadline_exceeded() {
    let fake = FakeTfServing::start().await;
    let mut config = config(&fake.grpc_url(), &fake.rest_url());
    config.upstream_timeout = std::time::Duration::from_millis(200);
    let mltap = Mltap::start(config).await;
    let f = batch64x16();
    let meta = [("x-fake-delay-ms", "5000")];
    let status = call_raw(&channel(mltap.grpc_url()).await, &f.path, f.request.clone(), &meta).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains(&fake.grpc.to_string()), "{}", status.message());
}
