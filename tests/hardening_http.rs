//! Client faults are the client's, in the answer and in the counts; RFC 9112's Host
//! rules hold; CONNECT is refused; TF Serving breaking a response mid-way is logged.
//! Against `mltap serve`, the real binary.

mod hardening_support;
mod support;

use hardening_support::{get, metric, raw_status, Serve, ServeOptions};
use std::time::Duration;
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::channel;
use support::raw_codec::call_raw;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn predict_fixture() -> support::fake_tfserving::RestFixture {
    rest_fixtures().into_iter().find(|f| f.status == 200 && f.path.ends_with(":predict")).unwrap()
}

async fn start(fake: &FakeTfServing, out: &std::path::Path) -> Serve {
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out);
    options.config = Some("upstream_timeout = \"1s\"\n");
    Serve::start(options).await
}

#[tokio::test]
async fn a_slow_or_malformed_client_body_is_answered_as_the_clients_fault() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut mltap = start(&fake, out.path()).await;
    let f = predict_fixture();

    // A body announced at 100 bytes of which 10 come: 408, not 504.
    let mut stream = tokio::net::TcpStream::connect(mltap.rest).await.unwrap();
    let head = format!("POST {} HTTP/1.1\r\nHost: mltap\r\nContent-Length: 100\r\n\r\n{{\"instance", f.path);
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("request body did not arrive"), "{answer}");

    // A malformed chunked body: 400.
    let bad_chunk =
        format!("POST {} HTTP/1.1\r\nHost: mltap\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n", f.path);
    assert_eq!(raw_status(mltap.rest, bad_chunk.as_bytes()).await, Some(400));

    let (_, metrics) = get(format!("{}/metrics", mltap.admin_url())).await;
    assert!(metrics.contains(r#"mltap_requests_total{protocol="rest",method="predict",status="408"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"mltap_requests_total{protocol="rest",method="predict",status="400"} 1"#), "{metrics}");
    assert!(!metrics.contains(r#"status="504""#) && !metrics.contains(r#"status="502""#), "{metrics}");
    let stderr = mltap.stderr().await;
    assert!(!stderr.contains("REST upstream timed out") && !stderr.contains("REST upstream failed"), "{stderr}");
}

#[tokio::test]
async fn host_must_appear_exactly_once_and_connect_is_refused() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mltap = start(&fake, out.path()).await;
    let rest = mltap.rest;
    assert_eq!(raw_status(rest, b"GET /v1/models/iris HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await, Some(400));
    assert_eq!(raw_status(rest, b"GET /v1/models/iris HTTP/1.1\r\n\r\n").await, Some(400));
    assert_eq!(raw_status(rest, b"CONNECT tfs:8501 HTTP/1.1\r\nHost: tfs:8501\r\n\r\n").await, Some(405));
    // None of them reached TF Serving.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.state.received.load(std::sync::atomic::Ordering::SeqCst), 0);
    // HTTP/1.0 has no Host requirement; one Host is fine.
    assert_eq!(raw_status(rest, b"GET /v1/models/iris HTTP/1.0\r\n\r\n").await, Some(200));
    assert_eq!(
        raw_status(rest, b"GET /v1/models/iris HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await,
        Some(200)
    );
    let (_, metrics) = get(format!("{}/metrics", mltap.admin_url())).await;
    assert_eq!(metric(&metrics, "mltap_client_faults_total"), Some(3.0), "{metrics}");
}

#[tokio::test]
async fn an_upstream_reset_mid_response_is_logged() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut mltap = start(&fake, out.path()).await;
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let proxied = channel(format!("http://{}", mltap.grpc)).await;
    let status = call_raw(&proxied, &f.path, f.request.clone(), &[("x-fake-reset", "after-data")]).await.unwrap_err();
    assert_ne!(status.code(), tonic::Code::Ok);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stderr = mltap.stderr().await;
    assert!(
        stderr.contains("Upstream reset or broke its response mid-body")
            || stderr.contains("Upstream reset the stream"),
        "{stderr}"
    );
}
