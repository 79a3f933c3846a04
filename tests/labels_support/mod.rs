//! Shared helpers of the label tests: observations built from known probabilities,
//! service settings, a loopback HTTP server for an `AdminRoute`, and real Redis
//! servers (single and 3-node cluster) started on free loopback ports.
#![allow(dead_code)]

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mltap::admin::AdminRoute;
use mltap::config::LabelsStoreConfig;
use mltap::labels::{LabelService, LabelSettings, LabelsConfig};
use mltap::sinks::Point;
use mltap::tfserving::{InferenceMethod, Observation, Probabilities, StreamKey};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const WIDTH: u64 = 60;
pub const HORIZON: u64 = 3600;

/// The start of the current bucket, epoch seconds.
pub fn current_bucket() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    now - now % WIDTH as i64
}

/// A time `secs` seconds after a bucket start.
pub fn at(bucket_start: i64, secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs((bucket_start + secs) as u64)
}

/// When a bucket's labels are certainly due (and its rows not yet expired).
pub fn after_horizon(bucket_start: i64) -> SystemTime {
    at(bucket_start, (WIDTH + HORIZON) as i64 + 1)
}

pub fn stream(model: &str) -> StreamKey {
    StreamKey { model: model.to_string(), version: Some(3), signature: "serving_default".to_string() }
}

/// An observation of `rows` (one probability vector per row).
pub fn observation(model: &str, request_id: &str, rows: &[Vec<f64>], names: Option<&[&str]>) -> Observation {
    let classes = rows[0].len();
    Observation {
        stream: stream(model),
        method: InferenceMethod::Predict,
        event_time: SystemTime::now(),
        request_id: request_id.to_string(),
        rows: rows.len(),
        features: Vec::new(),
        probabilities: Some(Probabilities {
            classes,
            values: rows.iter().flatten().copied().collect(),
            class_names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
            threshold: if classes == 2 { Some(0.5) } else { None },
        }),
        regression: None,
        row_ids: None,
        upstream_latency: Duration::from_millis(3),
    }
}

pub fn settings(output_dir: &Path, store: LabelsStoreConfig) -> LabelSettings {
    LabelSettings {
        bucket: Duration::from_secs(WIDTH),
        horizon: Duration::from_secs(HORIZON),
        output_dir: output_dir.to_path_buf(),
        store,
        // The endpoint's access rules have their own tests; these post without a token.
        labels: LabelsConfig { allow_unauthenticated: true, ..LabelsConfig::default() },
        models: Default::default(),
    }
}

/// The value of the one point of metric `what` with exactly these dimensions.
pub fn value(points: &[Point], what: &str, dims: &[(&str, &str)]) -> Option<f64> {
    let standard = ["what", "target_type", "model", "version", "signature", "ver"];
    let found: Vec<&Point> = points
        .iter()
        .filter(|p| p.what() == what)
        .filter(|p| {
            let own: Vec<(&str, &str)> = p
                .properties()
                .iter()
                .filter(|(k, _)| !standard.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            own.len() == dims.len() && dims.iter().all(|d| own.contains(d))
        })
        .collect();
    assert!(found.len() <= 1, "several {what} points with {dims:?}");
    found.first().map(|p| p.value)
}

pub fn assert_close(actual: Option<f64>, expected: f64, what: &str) {
    let actual = actual.unwrap_or_else(|| panic!("{what} was not emitted"));
    assert!((actual - expected).abs() < 1e-12, "{what}: {actual} != {expected}");
}

/// Serves one admin route on loopback, as the admin server would.
pub async fn serve_route(route: Arc<dyn AdminRoute>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let route = route.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                    let route = route.clone();
                    async move {
                        let request = request.map(|body| body.boxed_unsync());
                        if route.matches(request.method(), request.uri().path()) {
                            Ok::<_, std::convert::Infallible>(route.call(request).await)
                        } else {
                            let mut not_found = http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new())
                                    .map_err(|never| match never {})
                                    .boxed_unsync(),
                            );
                            *not_found.status_mut() = http::StatusCode::NOT_FOUND;
                            Ok(not_found)
                        }
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    addr
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Posts a label body and returns the status and the JSON answer.
pub async fn post_labels(addr: SocketAddr, body: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = client()
        .post(format!("http://{addr}/v1/labels"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Opens a service over its own store.
pub async fn service(settings: LabelSettings) -> Arc<LabelService> {
    LabelService::open(settings).await.unwrap()
}

/// A Redis tool found on `PATH`; a missing one fails the test (never skips it) with
/// how to install it.
fn redis_tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: these tests need a real Redis (Debian package `redis-server`)")
        })
}

/// A loopback port that is free now (and, when `bus` is set, whose cluster bus port
/// `port + 10000` is free too).
fn free_port(bus: bool) -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if !bus {
            return port;
        }
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// One redis-server process, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start(cluster: bool) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port(cluster);
        let mut command = Command::new(redis_tool("redis-server"));
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if cluster {
            command.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
        }
        let child = command.spawn().expect("redis-server did not start");
        let server = RedisServer { port, child, _dir: dir };
        server.wait_until(|| cli(port, &["PING"]).is_some_and(|out| out.trim() == "PONG"), "answer PING");
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn wait_until(&self, ready: impl Fn() -> bool, what: &str) {
        for _ in 0..200 {
            if ready() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server on port {} did not {what} within 5 s", self.port);
    }

    /// Keys held by this server.
    pub fn dbsize(&self) -> u64 {
        cli(self.port, &["DBSIZE"]).and_then(|out| out.trim().parse().ok()).unwrap_or(0)
    }

    /// Whether this server holds `key`.
    pub fn exists(&self, key: &str) -> bool {
        cli(self.port, &["EXISTS", key]).is_some_and(|out| out.trim() == "1")
    }

    /// Bytes Redis uses for data (`used_memory`).
    pub fn used_memory(&self) -> u64 {
        let info = cli(self.port, &["INFO", "memory"]).unwrap_or_default();
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new(redis_tool("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

/// A 3-node Redis Cluster (no replicas) on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start(true)).collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new(redis_tool("redis-cli"))
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli did not run");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        for node in &nodes {
            node.wait_until(
                || cli(node.port, &["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")),
                "report cluster_state:ok",
            );
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }
}

pub fn temp_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

/// Positive-class probabilities of the 8-row fraud batch; row 7 is never labeled.
/// Dyadic values, so the f32 the store keeps is exact and the expected values below
/// are computed by hand without rounding.
pub const FRAUD_P: [f64; 8] = [0.875, 0.75, 0.625, 0.25, 0.125, 0.375, 0.5, 0.9375];

/// One request of 8 rows (ids `tx-batch:0` ... `tx-batch:7`), classes legit/fraud.
pub fn fraud_observation(model: &str) -> Observation {
    let rows: Vec<Vec<f64>> = FRAUD_P.iter().map(|p| vec![1.0 - p, *p]).collect();
    observation(model, "tx-batch", &rows, Some(&["legit", "fraud"]))
}

/// Labels of rows 0-6 as name, boolean and index: actual 1, 1, 0, 1, 0, 0, 0.
pub const FRAUD_LABELS: &str = r#"[
 {"id": "tx-batch:0", "label": "fraud"},
 {"id": "tx-batch:1", "label": true},
 {"id": "tx-batch:2", "label": 0},
 {"id": "tx-batch:3", "label": 1},
 {"id": "tx-batch:4", "label": "legit"},
 {"id": "tx-batch:5", "label": false},
 {"id": "tx-batch:6", "label": 0}
]"#;

/// The label metrics of the fraud batch, by hand. Predicted (p > 0.5): 1 1 1 0 0 0 0;
/// actual: 1 1 0 1 0 0 0. Fraud: TP 2, FP 1, FN 1, TN 3; legit: TP 3, FP 1, FN 1, TN 2.
pub fn assert_fraud_metrics(points: &[Point]) {
    assert_close(value(points, "accuracy", &[]), 5.0 / 7.0, "accuracy");
    for class in ["legit", "fraud"] {
        assert_close(value(points, "accuracy", &[("class_name", class)]), 5.0 / 7.0, "one-vs-rest accuracy");
    }
    assert_close(value(points, "precision", &[("class_name", "fraud")]), 2.0 / 3.0, "precision fraud");
    assert_close(value(points, "recall", &[("class_name", "fraud")]), 2.0 / 3.0, "recall fraud");
    assert_close(value(points, "f1", &[("class_name", "fraud")]), 2.0 / 3.0, "f1 fraud");
    assert_close(value(points, "precision", &[("class_name", "legit")]), 0.75, "precision legit");
    assert_close(value(points, "recall", &[("class_name", "legit")]), 0.75, "recall legit");
    assert_close(value(points, "f1", &[("class_name", "legit")]), 0.75, "f1 legit");
    assert_close(value(points, "macro_f1", &[]), (2.0 / 3.0 + 0.75) / 2.0, "macro_f1");
    // Supports: legit 4, fraud 3.
    assert_close(value(points, "weighted_f1", &[]), (4.0 * 0.75 + 3.0 * 2.0 / 3.0) / 7.0, "weighted_f1");
    // Probability of the actual class per labeled row.
    let p_actual: [f64; 7] = [0.875, 0.75, 0.375, 0.25, 0.875, 0.625, 0.5];
    let log_loss = -p_actual.iter().map(|p| p.ln()).sum::<f64>() / 7.0;
    assert_close(value(points, "log_loss", &[]), log_loss, "log_loss");
    // (p - y)^2: 1/64, 1/16, 25/64, 9/16, 1/64, 9/64, 1/4 = 92/64.
    assert_close(value(points, "brier_score", &[]), 92.0 / 64.0 / 7.0, "brier_score");
    // Positives 0.875, 0.75, 0.25 against negatives 0.625, 0.125, 0.375, 0.5: 4 + 4 + 1 of 12.
    assert_close(value(points, "roc_auc", &[]), 0.75, "roc_auc");
    let cell = |actual: &str, predicted: &str| {
        value(points, "confusion_count", &[("actual_class", actual), ("class_name", predicted)])
    };
    assert_eq!(cell("legit", "legit"), Some(3.0));
    assert_eq!(cell("legit", "fraud"), Some(1.0));
    assert_eq!(cell("fraud", "legit"), Some(1.0));
    assert_eq!(cell("fraud", "fraud"), Some(2.0));
    assert_eq!(value(points, "label_count", &[("class_name", "legit")]), Some(4.0));
    assert_eq!(value(points, "label_count", &[("class_name", "fraud")]), Some(3.0));
    assert_close(value(points, "labeled_fraction", &[]), 7.0 / 8.0, "labeled_fraction");
    for p in points {
        assert!(p.property("model").is_some());
        assert_eq!(p.property("version"), Some("3"));
        assert_eq!(p.property("signature"), Some("serving_default"));
    }
    let counters = ["confusion_count", "label_count", "label_late_count", "label_unmatched_count"];
    for p in points {
        let expected = if counters.contains(&p.what()) { "counter" } else { "gauge" };
        assert_eq!(p.property("target_type"), Some(expected), "{}", p.what());
    }
}

/// One binary exchange of `rows` rows (positive-class probability `(row % 8) / 8`),
/// whose rows are labeled `request_id:<row>` (or `request_id` for one row).
pub fn exchange_observation(model: &str, request_id: &str, rows: usize) -> Observation {
    let rows: Vec<Vec<f64>> = (0..rows)
        .map(|row| {
            let p = (row % 8) as f64 / 8.0;
            vec![1.0 - p, p]
        })
        .collect();
    observation(model, request_id, &rows, Some(&["legit", "fraud"]))
}

/// A label body giving class 1 to each of these ids.
pub fn labels_body(ids: &[String]) -> String {
    let entries: Vec<String> = ids.iter().map(|id| format!("{{\"id\": \"{id}\", \"label\": 1}}")).collect();
    format!("[{}]", entries.join(","))
}

/// The ids of every row of an exchange of `rows` rows (`rows` > 1).
pub fn row_ids(request_id: &str, rows: usize) -> Vec<String> {
    (0..rows).map(|row| format!("{request_id}:{row}")).collect()
}

/// The text of a service's `/metrics` counters and gauges.
pub fn metrics_text(service: &LabelService) -> String {
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    service.register_metrics(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}
