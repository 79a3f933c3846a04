//! The capture tap seen from outside: real clients through the real listeners, a
//! real bounded queue, and what arrives on it (or is dropped and counted).

mod support;

use bytes::Bytes;
use mltap::capture::{CaptureReceiver, Protocol};
use mltap::config::Config;
use mltap::proxy::{Proxy, ProxyMetrics, ProxySettings};
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::{channel, config};
use support::raw_codec::call_raw;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The proxy alone, with the worker's end of the queue left to the test.
struct Tapped {
    grpc: String,
    rest: String,
    receiver: CaptureReceiver,
    stats: std::sync::Arc<mltap::capture::CaptureStats>,
    _stop: watch::Sender<bool>,
}

async fn tapped(fake: &FakeTfServing, adjust: impl FnOnce(&mut Config)) -> Tapped {
    let mut config = config(&fake.grpc_url(), &fake.rest_url());
    adjust(&mut config);
    let (sender, receiver) = mltap::capture::queue(&config.capture);
    let stats = sender.stats().clone();
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = Proxy::new(&ProxySettings::from(&config), sender, ProxyMetrics::register(&mut registry)).unwrap();
    let (grpc, rest) =
        (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let urls = (format!("http://{}", grpc.local_addr().unwrap()), format!("http://{}", rest.local_addr().unwrap()));
    let (stop, stopped) = watch::channel(false);
    let (p, s) = (proxy.clone(), stopped.clone());
    tokio::spawn(async move { p.serve_grpc(grpc, s).await });
    tokio::spawn(async move { proxy.serve_rest(rest, stopped).await });
    Tapped { grpc: urls.0, rest: urls.1, receiver, stats, _stop: stop }
}

fn framed(message: &[u8]) -> Bytes {
    let mut v = vec![0u8];
    v.extend_from_slice(&(message.len() as u32).to_be_bytes());
    v.extend_from_slice(message);
    v.into()
}

async fn next(receiver: &mut CaptureReceiver) -> mltap::capture::Exchange {
    tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await.expect("an exchange is queued").unwrap()
}

/// Waits (bounded) until `counter` reaches `want`; the tap counts after the response.
async fn until(counter: &std::sync::atomic::AtomicU64, want: u64) {
    for _ in 0..500 {
        if counter.load(Ordering::SeqCst) >= want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counter.load(Ordering::SeqCst), want);
}

#[tokio::test]
async fn capture_copies_inference_exchanges_byte_for_byte() {
    let fake = FakeTfServing::start().await;
    let mut t = tapped(&fake, |_| {}).await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "classify").unwrap();
    let proxied = channel(t.grpc.clone()).await;
    call_raw(&proxied, &f.path, f.request.clone(), &[("x-request-id", "req-1")]).await.unwrap();
    let e = next(&mut t.receiver).await;
    assert_eq!(e.protocol, Protocol::Grpc);
    assert_eq!(e.path, "/tensorflow.serving.PredictionService/Classify");
    assert_eq!(e.request_bytes(), framed(&f.request));
    assert_eq!(e.response_bytes(), framed(&f.response));
    assert_eq!((e.status, e.grpc_status, e.complete), (200, Some(0), true));
    assert_eq!((e.request_id.as_str(), e.request_id_generated), ("req-1", false));

    // Calls that are not inference are forwarded but not captured.
    let metadata = "/tensorflow.serving.PredictionService/GetModelMetadata";
    call_raw(&proxied, metadata, Bytes::new(), &[]).await.unwrap();
    let r = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    client.get(format!("{}/v1/models/iris/metadata", t.rest)).send().await.unwrap().bytes().await.unwrap();
    let answer = client.post(format!("{}{}", t.rest, r.path)).body(r.request.clone()).send().await.unwrap();
    assert_eq!(answer.bytes().await.unwrap(), r.response);
    let e = next(&mut t.receiver).await;
    assert_eq!(e.protocol, Protocol::Rest, "the next captured exchange is the REST predict");
    assert_eq!(e.path, r.path);
    assert_eq!(e.request_bytes(), r.request);
    assert_eq!(e.response_bytes(), r.response);
    assert_eq!((e.status, e.grpc_status, e.complete), (200, None, true));
    assert!(e.request_id_generated && !e.request_id.is_empty(), "an id is generated when the client sent none");
    assert!(t.receiver.try_recv().is_none());
}

#[tokio::test]
async fn capture_records_the_status_of_a_trailers_only_error() {
    let fake = FakeTfServing::start().await;
    let mut t = tapped(&fake, |_| {}).await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let meta = [("x-fake-grpc-error", "5")];
    let status = call_raw(&channel(t.grpc.clone()).await, &f.path, f.request.clone(), &meta).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    let e = next(&mut t.receiver).await;
    assert_eq!((e.grpc_status, e.complete), (Some(5), true));
    assert!(e.response_body.is_empty());
    assert_eq!(e.request_bytes(), framed(&f.request));
}

#[tokio::test]
async fn capture_full_queue_drops_and_counts_while_every_response_stays_correct() {
    let fake = FakeTfServing::start().await;
    let mut t = tapped(&fake, |c| c.capture.queue_exchanges = 2).await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let r = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let proxied = channel(t.grpc.clone()).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for _ in 0..20 {
        let answer = call_raw(&proxied, &f.path, f.request.clone(), &[]).await.expect("gRPC answer");
        assert_eq!(answer.get_ref(), &f.response);
        let answer = client.post(format!("{}{}", t.rest, r.path)).body(r.request.clone()).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.bytes().await.unwrap(), r.response);
    }
    until(&t.stats.dropped, 38).await;
    assert_eq!(t.stats.enqueued.load(Ordering::SeqCst), 2);
    assert_eq!(t.stats.depth.load(Ordering::SeqCst), 2);
    assert_eq!(next(&mut t.receiver).await.response_bytes(), framed(&f.response), "the oldest exchanges were kept");
}

#[tokio::test]
async fn capture_skips_and_counts_an_exchange_over_the_byte_cap() {
    let fake = FakeTfServing::start().await;
    let mut t = tapped(&fake, |c| c.capture.max_exchange_bytes = 1024).await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    assert!(f.request.len() > 1024);
    let answer = call_raw(&channel(t.grpc.clone()).await, &f.path, f.request.clone(), &[]).await.unwrap();
    assert_eq!(answer.get_ref(), &f.response, "the response is whole although the copy was cut");
    until(&t.stats.skipped_oversize, 1).await;
    assert!(t.receiver.try_recv().is_none());
}

#[tokio::test]
async fn generated_request_ids_are_returned_only_when_configured() {
    let fake = FakeTfServing::start().await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "regress").unwrap();
    let r = rest_fixtures().into_iter().find(|f| f.name == "regress").unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for returned in [false, true] {
        let mut t = tapped(&fake, |c| c.capture.return_request_id = returned).await;
        let answer = call_raw(&channel(t.grpc.clone()).await, &f.path, f.request.clone(), &[]).await.unwrap();
        let grpc_id = answer.metadata().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
        let answer = client.post(format!("{}{}", t.rest, r.path)).body(r.request.clone()).send().await.unwrap();
        let rest_id = answer.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
        let (g, rr) = (next(&mut t.receiver).await, next(&mut t.receiver).await);
        if returned {
            assert_eq!(grpc_id.as_deref(), Some(g.request_id.as_str()));
            assert_eq!(rest_id.as_deref(), Some(rr.request_id.as_str()));
        } else {
            assert_eq!((grpc_id, rest_id), (None, None), "transparent by default");
        }
        // A client's own id is never echoed back: the response stays TF Serving's.
        let answer = call_raw(&channel(t.grpc.clone()).await, &f.path, f.request.clone(), &[("x-request-id", "mine")])
            .await
            .unwrap();
        assert!(answer.metadata().get("x-request-id").is_none());
    }
}
