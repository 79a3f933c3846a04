//! Promises of the worker: every exchange taken off the capture queue is counted in
//! the files (request counts, decode errors), capture drops are reported, `finish`
//! drains the queue and flushes the open buckets, and attached listeners see every
//! closed bucket that was written.

use bytes::Bytes;
use mltap::capture::{self, Exchange, Protocol};
use mltap::config::{CaptureConfig, Config, ServeArgs};
use mltap::monitor::ClosedBucket;
use mltap::worker::{self, BucketListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

fn config(dir: &std::path::Path) -> Config {
    Config::load(&ServeArgs {
        output_dir: Some(dir.display().to_string()),
        bucket: Some("1s".into()),
        ..ServeArgs::default()
    })
    .unwrap()
}

fn exchange() -> Exchange {
    Exchange {
        protocol: Protocol::Rest,
        path: "/v1/models/iris:predict".into(),
        request_id: "r".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        request_body: vec![Bytes::from_static(b"{not json")],
        response_body: vec![Bytes::from_static(b"{\"predictions\": [[0.5, 0.5]]}")],
        status: 200,
        grpc_status: None,
        started_at: SystemTime::now(),
        upstream_latency: Duration::from_millis(2),
        complete: true,
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<ClosedBucket>>);

impl BucketListener for Recorder {
    fn on_closed(&self, bucket: &ClosedBucket) {
        self.0.lock().unwrap().push(bucket.clone());
    }
}

fn all_points(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut points = Vec::new();
    for model in std::fs::read_dir(dir.join("anodot")).unwrap() {
        for file in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            points.extend(serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap());
        }
    }
    points
}

fn total(points: &[serde_json::Value], what: &str) -> f64 {
    points.iter().filter(|p| p["properties"]["what"] == what).map(|p| p["value"].as_f64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_drains_the_queue_and_every_exchange_is_counted_in_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config(dir.path()));
    let (sender, receiver) = capture::queue(&config.capture);
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    let handle = worker::spawn(config, receiver, &mut registry);
    let recorder = Arc::new(Recorder::default());
    handle.add_bucket_listener(recorder.clone());
    for _ in 0..50 {
        assert!(sender.offer(exchange()));
    }
    handle.finish().await;
    drop(sender);

    let points = all_points(dir.path());
    assert_eq!(total(&points, "request_count"), 50.0);
    assert!(total(&points, "decode_errors") >= 1.0);
    assert_eq!(total(&points, "capture_dropped"), 0.0);
    let seen = recorder.0.lock().unwrap();
    let listened: usize = seen.iter().map(|b| b.points.len()).sum();
    assert_eq!(listened, points.len());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("mltap_worker_exchanges_decoded_total 50"), "{text}");
    assert!(text.contains(r#"mltap_worker_exchanges_received_total{protocol="rest"} 50"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_dropped_by_a_full_queue_are_reported_as_capture_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.capture = CaptureConfig { queue_exchanges: 2, ..CaptureConfig::default() };
    let config = Arc::new(config);
    let (sender, receiver) = capture::queue(&config.capture);
    for _ in 0..5 {
        sender.offer(exchange());
    }
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    let handle = worker::spawn(config, receiver, &mut registry);
    drop(sender);
    handle.finish().await;
    let points = all_points(dir.path());
    assert_eq!(total(&points, "capture_dropped"), 3.0);
    assert_eq!(total(&points, "request_count"), 2.0);
    let global = points.iter().find(|p| p["properties"]["what"] == "capture_dropped").unwrap();
    assert!(global["properties"].get("model").is_none());
}
