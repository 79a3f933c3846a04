//! Connection governance of `mltap serve` (the real binary): a flood of idle
//! connections under a lowered open-file limit is refused clearly and then closed,
//! without starving the admin port or later clients; a client holding many unfinished
//! gRPC streams does not delay another client's call.

mod hardening_support;
mod support;

use hardening_support::{get, metric, raw_status, Serve, ServeOptions};
use std::time::Duration;
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::channel;
use support::raw_codec::call_raw;
use tokio::io::AsyncReadExt;

const LIMITS: &str = "[limits]\nreserved_fds = 128\nidle_timeout = \"3s\"\n";

#[tokio::test]
async fn an_idle_connection_flood_is_refused_clearly_and_closed_without_starving_anyone() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    // 256 descriptors, 128 reserved: at most 64 client connections.
    options.open_files = Some(256);
    options.config = Some(LIMITS);
    let mut mltap = Serve::start(options).await;

    // 600 idle connections, half on each proxy port: more than the process has
    // descriptors for.
    let mut idle = Vec::new();
    for i in 0..600 {
        let addr = if i % 2 == 0 { mltap.grpc } else { mltap.rest };
        if let Ok(stream) = tokio::net::TcpStream::connect(addr).await {
            idle.push(stream);
        }
    }
    // A REST client over the limit is told why, with a 503.
    let fixture = rest_fixtures().into_iter().next().unwrap();
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: mltap\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        fixture.path,
        fixture.request.len()
    );
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(&fixture.request);
    assert_eq!(raw_status(mltap.rest, &bytes).await, Some(503));

    // The admin port still answers, and says how many were refused.
    assert_eq!(get(format!("{}/healthz", mltap.admin_url())).await.0, 200);
    let (_, metrics) = get(format!("{}/metrics", mltap.admin_url())).await;
    let refused = metric(&metrics, "mltap_connections_refused_total").expect("refusals counted");
    assert!(refused >= 400.0, "{refused} refused\n{metrics}");
    assert!(metric(&metrics, "mltap_open_connections").unwrap() <= 64.0, "{metrics}");

    // Idle connections are closed after the idle timeout (3 s, checked every 3 s),
    // those still in the accept queue once accepted and idle in turn.
    let mut open = 0;
    for stream in &mut idle {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        if closed.is_err() {
            open += 1;
        }
    }
    assert_eq!(open, 0, "{open} of {} idle connections still open", idle.len());
    drop(idle);

    // Everyone is served again, on both ports.
    assert_eq!(raw_status(mltap.rest, &bytes).await, Some(fixture.status));
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let answer = call_raw(&channel(format!("http://{}", mltap.grpc)).await, &f.path, f.request.clone(), &[]).await;
    assert_eq!(answer.expect("gRPC served after the flood").get_ref(), &f.response);
    let stderr = mltap.stderr().await;
    assert!(stderr.contains("Client connections refused"), "{stderr}");
    assert!(!stderr.contains("Too many open files"), "{stderr}");
}

#[tokio::test]
async fn a_greedy_grpc_client_holding_many_streams_does_not_delay_another_client() {
    // TF Serving's gRPC server bounds the streams of one connection (200 here).
    let fake = FakeTfServing::start_with_max_streams(200).await;
    let out = tempfile::tempdir().unwrap();
    let mltap = Serve::start(ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path())).await;
    let url = format!("http://{}", mltap.grpc);
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();

    // Two greedy connections hold 250 calls each that TF Serving never answers.
    let mut greedy = Vec::new();
    for _ in 0..2 {
        let connection = channel(url.clone()).await;
        for _ in 0..250 {
            let (connection, f) = (connection.clone(), f.clone());
            greedy.push(tokio::spawn(async move {
                let _ = call_raw(&connection, &f.path, f.request.clone(), &[("x-fake-hang", "1")]).await;
            }));
        }
    }
    // All 500 reach TF Serving: mltap opened more upstream connections as the
    // streams of the first filled up.
    fake.state.wait_received(500).await;

    // A third client is answered at once.
    let normal = channel(url).await;
    let answer = tokio::time::timeout(Duration::from_secs(5), call_raw(&normal, &f.path, f.request.clone(), &[]))
        .await
        .expect("answered while the greedy streams are held");
    assert_eq!(answer.expect("call").get_ref(), &f.response);
    for task in greedy {
        task.abort();
    }
}
