//! Promises of the worker: every exchange taken off the capture queue is counted in
//! the files (request counts, decode errors), capture drops are reported, `finish`
//! drains the queue and flushes the open buckets, and attached listeners see every
//! closed bucket that was written.

use bytes::Bytes;
use mltap::capture::{self, Exchange, Protocol};
use mltap::cli::ServeArgs;
use mltap::config::{CaptureConfig, Config};
use mltap::monitor::ClosedBucket;
use mltap::tfserving::Observation;
use mltap::worker::{self, BucketListener, ObservationListener, WorkerSettings};
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
        method: mltap::capture::RouteKind::of_request(Protocol::Rest, "/v1/models/iris:predict").method,
        request_id: "r".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: vec![Bytes::from_static(b"{not json")],
        response_body: vec![Bytes::from_static(b"{\"predictions\": [[0.5, 0.5]]}")],
        status: 200,
        grpc_status: None,
        origin: None,
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
    let handle = worker::spawn(WorkerSettings::from(config.as_ref()), receiver, &mut registry);
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
    let handle = worker::spawn(WorkerSettings::from(config.as_ref()), receiver, &mut registry);
    drop(sender);
    handle.finish().await;
    let points = all_points(dir.path());
    assert_eq!(total(&points, "capture_dropped"), 3.0);
    assert_eq!(total(&points, "request_count"), 2.0);
    let global = points.iter().find(|p| p["properties"]["what"] == "capture_dropped").unwrap();
    assert!(global["properties"].get("model").is_none());
}

#[derive(Default)]
struct Observations(Mutex<Vec<(String, usize, i64)>>);

impl ObservationListener for Observations {
    fn on_observation(&self, observation: &Arc<Observation>, bucket_start: i64) {
        self.0.lock().unwrap().push((observation.stream.model.clone(), observation.rows, bucket_start));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_listeners_get_each_decoded_observation_with_its_bucket_start() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tfserving/rest");
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(config(dir.path()));
    let (sender, receiver) = capture::queue(&config.capture);
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    let listener = Arc::new(Observations::default());
    let hooks = worker::Hooks::default();
    hooks.add_observation_listener(listener.clone());
    let handle = worker::spawn_with(WorkerSettings::from(config.as_ref()), receiver, &mut registry, hooks);
    let started_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_123);
    let mut e = exchange();
    e.started_at = started_at;
    e.request_body = vec![std::fs::read(fixtures.join("row_single_input.request.json")).unwrap().into()];
    e.response_body = vec![std::fs::read(fixtures.join("row_single_input.response.json")).unwrap().into()];
    assert!(sender.offer(e));
    drop(sender);
    handle.finish().await;

    assert_eq!(*listener.0.lock().unwrap(), vec![("iris".to_string(), 3, 1_700_000_123)]);
    let points = all_points(dir.path());
    assert_eq!(total(&points, "buffer_count"), 3.0);
    assert_eq!(total(&points, "prediction_count"), 3.0);
    // The last closed bucket is also on /metrics.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains(r#"mltap_model_rows_total{model="iris",signature="serving_default"} 3"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_model_is_aggregated_whatever_the_number_of_aggregation_threads() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tfserving/rest");
    for threads in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        config.monitor.aggregation_threads = threads;
        config.monitor.decode_threads = 2;
        let config = Arc::new(config);
        let (sender, receiver) = capture::queue(&config.capture);
        let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
        let handle = worker::spawn(WorkerSettings::from(config.as_ref()), receiver, &mut registry);
        let case = |name: &str, path: &str| {
            let mut e = exchange();
            e.path = path.to_string();
            e.request_body = vec![std::fs::read(fixtures.join(format!("{name}.request.json"))).unwrap().into()];
            e.response_body = vec![std::fs::read(fixtures.join(format!("{name}.response.json"))).unwrap().into()];
            e
        };
        for _ in 0..4 {
            assert!(sender.offer(case("row_single_input", "/v1/models/iris:predict")));
            assert!(sender.offer(case("columnar_named", "/v1/models/credit:predict")));
        }
        drop(sender);
        handle.finish().await;
        let points = all_points(dir.path());
        let rows = |model: &str| -> f64 {
            points
                .iter()
                .filter(|p| p["properties"]["what"] == "buffer_count" && p["properties"]["model"] == model)
                .map(|p| p["value"].as_f64().unwrap())
                .sum()
        };
        assert_eq!(rows("iris"), 12.0, "{threads} threads");
        assert_eq!(rows("credit"), 8.0, "{threads} threads");
        assert_eq!(total(&points, "request_count"), 8.0);
        // Only one thread reports capture drops: one point per bucket.
        let stamps: Vec<i64> = points
            .iter()
            .filter(|p| p["properties"]["what"] == "capture_dropped")
            .map(|p| p["timestamp"].as_i64().unwrap())
            .collect();
        let distinct: std::collections::BTreeSet<i64> = stamps.iter().copied().collect();
        assert!(!stamps.is_empty());
        assert_eq!(distinct.len(), stamps.len(), "{threads} threads");
    }
}

/// The scheduling policy (`/proc/.../stat` field 41) of this process's threads whose
/// name starts with `prefix`.
#[cfg(target_os = "linux")]
fn policies_of_threads(prefix: &str) -> Vec<u32> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else { continue };
        if !name.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else { continue };
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        // Fields after the name start at field 3; the policy is field 41.
        policies.push(after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap());
    }
    policies
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_background_statistics_sampled_exchanges_decode_at_idle_priority_and_counts_at_the_normal_one() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_IDLE: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.monitor.decode_threads = 2;
    config.monitor.statistics_priority = mltap::monitor::StatisticsPriority::Background;
    let (sender, receiver) = capture::queue(&config.capture);
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    let handle = worker::spawn(WorkerSettings::from(&config), receiver, &mut registry);
    // The statistics threads lower their own priority as they start. (Other tests of
    // this file run workers with the default, normal priority at the same time.)
    let idle = |policies: &[u32]| policies.iter().filter(|&&p| p == SCHED_IDLE).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let statistics = loop {
        let policies = policies_of_threads("mltap-decode-");
        if idle(&policies) >= 2 || std::time::Instant::now() > deadline {
            break policies;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(idle(&statistics) >= 2, "{statistics:?}");
    let counts = policies_of_threads("mltap-count-");
    assert!(counts.len() >= 2 && counts.iter().all(|&p| p == SCHED_OTHER), "{counts:?}");
    let monitors = policies_of_threads("mltap-monitor-");
    assert!(!monitors.is_empty() && monitors.iter().all(|&p| p == SCHED_OTHER), "{monitors:?}");
    drop(sender);
    handle.finish().await;
}
