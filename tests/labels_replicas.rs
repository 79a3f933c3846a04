//! Two whole mltap instances (proxy, worker, admin server) share one real Redis: a
//! prediction made through one and its labels posted to the other are joined, and the
//! bucket's label metrics are emitted exactly once, with the values a single instance
//! computes by hand.

mod labels_support;
mod support;

use bytes::Bytes;
use labels_support::RedisServer;
use mltap::capture::{Exchange, Protocol};
use mltap::config::LabelsStoreConfig;
use mltap::sinks::Point;
use mltap::tfserving::grpc::frame;
use mltap::tfserving::Decoder;
use std::path::Path;
use std::time::{Duration, SystemTime};
use support::fake_tfserving::{grpc_fixtures, FakeTfServing};
use support::mltap::{channel, config, Mltap};
use support::raw_codec::call_raw;

/// The predicted class of every row of the fixture, as mltap's decoder sees it.
fn predicted_classes(path: &str, request: &Bytes, response: &Bytes) -> (String, Vec<usize>) {
    let exchange = Exchange {
        protocol: Protocol::Grpc,
        path: path.to_string(),
        method: mltap::capture::RouteKind::of_request(Protocol::Grpc, path).method,
        request_id: "x".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: vec![frame(request)],
        response_body: vec![frame(response)],
        status: 200,
        grpc_status: Some(0),
        origin: None,
        started_at: SystemTime::now(),
        upstream_latency: Duration::ZERO,
        complete: true,
    };
    let decoded = Decoder::new(Default::default()).decode(&exchange);
    let observation = decoded.observations.into_iter().next().expect("the fixture decodes to an observation");
    let probabilities = observation.probabilities.expect("the fixture has probabilities");
    let classes = (0..observation.rows).map(|row| probabilities.predicted_class(row)).collect();
    (observation.stream.model, classes)
}

/// Every point of `what` for `model` (without a class dimension) in an output dir.
fn overall_points(output_dir: &Path, model: &str, what: &str) -> Vec<Point> {
    let dir = output_dir.join("anodot").join(model);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let Ok(points) = serde_json::from_str::<Vec<Point>>(&text) else { continue };
        found.extend(points.into_iter().filter(|p| p.what() == what && p.property("class_name").is_none()));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_over_one_redis_join_across_replicas_and_emit_label_metrics_once() {
    let redis = RedisServer::start(false);
    let fake = FakeTfServing::start().await;
    let replica = || {
        let mut c = config(&fake.grpc_url(), &fake.rest_url());
        c.labels_store = LabelsStoreConfig::Redis(redis.url());
        c.labels.allow_unauthenticated = true;
        c.bucket = Duration::from_secs(1);
        c.label_horizon = Duration::from_secs(3);
        c
    };
    let (config_a, config_b) = (replica(), replica());
    let (dir_a, dir_b) = (config_a.output_dir.clone(), config_b.output_dir.clone());
    let a = Mltap::start(config_a).await;
    let b = Mltap::start(config_b).await;

    let fixture = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let (model, predicted) = predicted_classes(&fixture.path, &fixture.request, &fixture.response);
    assert_eq!(predicted.len(), 64);
    let classes = predicted.iter().max().unwrap() + 1;
    call_raw(&channel(a.grpc_url()).await, &fixture.path, fixture.request.clone(), &[("x-request-id", "replica-run")])
        .await
        .expect("the prediction passes through instance A");

    // 48 of 64 labels agree with the prediction: accuracy is exactly 0.75.
    let labels: Vec<serde_json::Value> = predicted
        .iter()
        .enumerate()
        .map(|(row, &class)| {
            let label = if row < 48 { class } else { (class + 1) % classes.max(2) };
            serde_json::json!({"id": format!("replica-run:{row}"), "label": label})
        })
        .collect();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    // Instance A records its predictions in Redis off the hot path; wait for that
    // before posting to instance B rather than counting early labels as unmatched.
    let mut answer = serde_json::Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let probe = serde_json::json!([{"id": "replica-run:0", "label": predicted[0]}]);
        let response = client.post(format!("{}/v1/labels", b.admin_url())).json(&probe).send().await.unwrap();
        answer = response.json().await.unwrap();
        if answer["accepted"] == 1 {
            break;
        }
    }
    assert_eq!(answer["accepted"], 1, "instance B joins a prediction seen by instance A: {answer}");
    let response = client.post(format!("{}/v1/labels", b.admin_url())).json(&labels[1..]).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["accepted"], 63, "{answer}");
    assert_eq!(answer["unmatched"], 0, "{answer}");

    // The horizon passes; one of the two instances emits the bucket's label metrics.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if [&dir_a, &dir_b].iter().any(|d| !overall_points(d, &model, "accuracy").is_empty()) {
            break;
        }
    }
    // Both instances keep ticking for a while: neither emits the bucket again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let emitted: Vec<Point> = [&dir_a, &dir_b].iter().flat_map(|d| overall_points(d, &model, "accuracy")).collect();
    assert_eq!(emitted.len(), 1, "the bucket's accuracy is emitted exactly once across replicas: {emitted:?}");
    assert_eq!(emitted[0].value, 0.75);
    let fraction: Vec<Point> =
        [&dir_a, &dir_b].iter().flat_map(|d| overall_points(d, &model, "labeled_fraction")).collect();
    assert_eq!(fraction.len(), 1, "{fraction:?}");
    assert_eq!(fraction[0].value, 1.0);
    a.stop().await;
    b.stop().await;
}
