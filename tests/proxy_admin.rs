//! The admin server: health, readiness against the real upstreams, Prometheus
//! metrics after real traffic, and registered routes.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::{channel, config, dead_address, Mltap};
use support::raw_codec::call_raw;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn get(url: String) -> (u16, String) {
    let response = client().get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn admin_serves_health_readiness_and_metrics_after_traffic() {
    let fake = FakeTfServing::start().await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &fake.rest_url())).await;
    assert_eq!(get(format!("{}/healthz", mltap.admin_url())).await.0, 200);
    assert_eq!(get(format!("{}/readyz", mltap.admin_url())).await.0, 200);

    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    call_raw(&channel(mltap.grpc_url()).await, &f.path, f.request.clone(), &[]).await.unwrap();
    let r = rest_fixtures().into_iter().find(|f| f.name == "error_not_found").unwrap();
    client().post(format!("{}{}", mltap.rest_url(), r.path)).body(r.request.clone()).send().await.unwrap();

    let want = [
        r#"mltap_requests_total{protocol="grpc",method="Predict",status="0"} 1"#,
        r#"mltap_requests_total{protocol="rest",method="predict",status="404"} 1"#,
        r#"mltap_worker_exchanges_received_total{protocol="grpc"} 1"#,
        r#"mltap_worker_exchanges_received_total{protocol="rest"} 1"#,
        "mltap_capture_dropped_total 0",
        "mltap_capture_skipped_oversize_total 0",
        "mltap_capture_queue_depth 0",
        // A lightly loaded mltap samples every exchange it has room for.
        "mltap_capture_statistics_share 1.0",
        r#"mltap_upstream_latency_seconds_count{protocol="grpc"} 1"#,
    ];
    // Exchanges are counted when they end, just after the client has its answer.
    let mut metrics = String::new();
    for _ in 0..200 {
        let (status, text) = get(format!("{}/metrics", mltap.admin_url())).await;
        assert_eq!(status, 200);
        metrics = text;
        if want.iter().all(|line| metrics.contains(line)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for line in want {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    mltap.stop().await;
}

#[tokio::test]
async fn readyz_names_an_unreachable_upstream() {
    let fake = FakeTfServing::start().await;
    let dead = dead_address().await;
    let mltap = Mltap::start(config(&format!("http://{dead}"), &fake.rest_url())).await;
    let (status, body) = get(format!("{}/readyz", mltap.admin_url())).await;
    assert_eq!(status, 503);
    assert!(body.contains(&dead.to_string()), "{body}");
    assert!(!body.contains(&fake.rest.to_string()), "the reachable upstream is not blamed: {body}");
    assert_eq!(get(format!("{}/healthz", mltap.admin_url())).await.0, 200, "mltap itself stays up");
}

struct Labels;

impl mltap::admin::AdminRoute for Labels {
    fn matches(&self, _method: &http::Method, path: &str) -> bool {
        path == "/v1/labels" || path == "/healthz"
    }

    fn call(&self, _request: mltap::admin::AdminRequest) -> mltap::admin::AdminFuture {
        use http_body_util::{BodyExt, Full};
        Box::pin(async {
            http::Response::new(Full::new(bytes::Bytes::from_static(b"labels")).map_err(|n| match n {}).boxed_unsync())
        })
    }
}

#[tokio::test]
async fn registered_admin_routes_are_served_after_the_builtin_ones() {
    let fake = FakeTfServing::start().await;
    let mltap = Mltap::start_with_routes(config(&fake.grpc_url(), &fake.rest_url()), vec![Arc::new(Labels)]).await;
    assert_eq!(get(format!("{}/v1/labels", mltap.admin_url())).await, (200, "labels".to_string()));
    assert_eq!(get(format!("{}/healthz", mltap.admin_url())).await, (200, "ok\n".to_string()));
    assert_eq!(get(format!("{}/nothing", mltap.admin_url())).await.0, 404);
}
