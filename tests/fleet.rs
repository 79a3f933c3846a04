//! Several whole `mltap serve` processes share one real Redis (a server, or a real
//! 3-node Redis Cluster) and report as one: traffic split across them over gRPC and
//! REST is emitted once per (metric, dimensions, timestamp) across all their output
//! dirs, with the counts, class counts and feature means of one mltap fed everything
//! (a single instance without Redis, run beside them) and its quantiles within α. A
//! replica killed with -9 at the worst moments (after writing its partial, while
//! holding the claim, while emitting) loses no bucket and duplicates none.

mod labels_support;
mod support;

use bytes::Bytes;
use labels_support::{RedisCluster, RedisServer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::channel;
use support::raw_codec::call_raw;

/// Bucket width of every instance, seconds: the traffic of a test fits in one bucket.
const BUCKET: i64 = 4;
/// The sketches' relative accuracy (the default `quantile_relative_accuracy`).
const ALPHA: f64 = 0.01;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `mltap serve` process.
struct Instance {
    child: Child,
    grpc_port: u16,
    rest_port: u16,
    admin_port: u16,
    out: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Instance {
    fn spawn(fake: &FakeTfServing, store: Option<&str>, pause: Option<&str>) -> Instance {
        Instance::spawn_with(fake, store, pause, &[])
    }

    fn spawn_with(fake: &FakeTfServing, store: Option<&str>, pause: Option<&str>, flags: &[&str]) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let log = dir.path().join("stderr.log");
        let config = dir.path().join("mltap.toml");
        std::fs::write(
            &config,
            "[monitor]\ngrace_seconds = 1\nreference_buckets = 1\n[fleet]\nsettle_seconds = 2\nlease_seconds = 2\n\
             [labels]\nallow_unauthenticated = true\n",
        )
        .unwrap();
        let (grpc_port, rest_port, admin_port) = (free_port(), free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_mltap"));
        command
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--rest-listen", &format!("127.0.0.1:{rest_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--grpc-upstream", &fake.grpc_url()])
            .args(["--rest-upstream", &fake.rest_url()])
            .args(["--bucket", &format!("{BUCKET}s"), "--output-dir"])
            .arg(&out)
            .args(flags)
            .env_remove("MLTAP_FLEET_TEST_PAUSE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(store) = store {
            command.args(["--labels-store", store]);
        }
        if let Some(point) = pause {
            command.env("MLTAP_FLEET_TEST_PAUSE", point);
        }
        let child = command.spawn().unwrap();
        for port in [grpc_port, rest_port, admin_port] {
            for _ in 0..200 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        Instance { child, grpc_port, rest_port, admin_port, out, log, _dir: dir }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// SIGTERM and wait for the graceful stop.
    fn stop(mut self) -> Stopped {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        Stopped { out: self.out, _dir: self._dir }
    }

    /// kill -9.
    fn kill(mut self) -> Stopped {
        self.child.kill().unwrap();
        let _ = self.child.wait();
        Stopped { out: self.out, _dir: self._dir }
    }

    fn log_contains(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(text))
    }
}

/// What is left of a stopped instance: its output dir.
struct Stopped {
    out: PathBuf,
    _dir: tempfile::TempDir,
}

/// Every point of every Anodot file under `out`.
fn points(out: &Path) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    let Ok(models) = std::fs::read_dir(out.join("anodot")) else { return all };
    for model in models.flatten() {
        for file in std::fs::read_dir(model.path()).into_iter().flatten().flatten() {
            if file.path().extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(file.path()).unwrap();
            all.extend(serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap());
        }
    }
    all
}

/// A point's identity: its properties (sorted) and timestamp.
fn identity(point: &serde_json::Value) -> String {
    let properties: BTreeMap<String, String> = point["properties"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    format!("{properties:?}@{}", point["timestamp"])
}

/// Values by identity; fails on any identity emitted twice.
fn once_each(outputs: &[&Path]) -> BTreeMap<String, f64> {
    let mut seen: BTreeMap<String, f64> = BTreeMap::new();
    for out in outputs {
        for point in points(out) {
            let id = identity(&point);
            let value = point["value"].as_f64().unwrap();
            assert!(seen.insert(id.clone(), value).is_none(), "{id} is emitted more than once across the replicas");
        }
    }
    seen
}

/// Sum of the values of `what` points (with the given dims) over all timestamps.
fn total(values: &BTreeMap<String, f64>, what: &str, dims: &[(&str, &str)]) -> f64 {
    values
        .iter()
        .filter(|(id, _)| id.contains(&format!("\"what\": \"{what}\"")))
        .filter(|(id, _)| dims.iter().all(|(k, v)| id.contains(&format!("\"{k}\": \"{v}\""))))
        .map(|(_, v)| v)
        .sum()
}

/// Values of `what` points with the given dims at one timestamp, by identity.
fn at(values: &BTreeMap<String, f64>, start: i64, what: &str) -> BTreeMap<String, f64> {
    values
        .iter()
        .filter(|(id, _)| id.ends_with(&format!("@{start}")) && id.contains(&format!("\"what\": \"{what}\"")))
        .map(|(id, v)| (id.clone(), *v))
        .collect()
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Waits for the start of a bucket plus 0.2 s and returns that bucket's start, so that
/// traffic sent within the next seconds lands in one bucket on every instance.
async fn next_bucket() -> i64 {
    let now = now_s();
    let start = (now as i64).div_euclid(BUCKET) * BUCKET + BUCKET;
    tokio::time::sleep(Duration::from_secs_f64(start as f64 + 0.2 - now)).await;
    start
}

/// Sends `rounds` gRPC Predict batches and REST predicts, each to one replica in turn
/// and each also to the single instance. Returns the bucket they landed in.
async fn send_split(replicas: &[&Instance], single: &Instance, rounds: usize) -> i64 {
    let grpc = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let rest = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut channels = Vec::new();
    for r in replicas.iter().copied().chain([single]) {
        channels.push(channel(format!("http://127.0.0.1:{}", r.grpc_port)).await);
    }
    let start = next_bucket().await;
    let single_channel = channels.last().unwrap().clone();
    for round in 0..rounds {
        let i = round % replicas.len();
        for ch in [&channels[i], &single_channel] {
            call_raw(ch, &grpc.path, grpc.request.clone(), &[]).await.expect("gRPC predict passes");
        }
        for port in [replicas[i].rest_port, single.rest_port] {
            let response = client
                .post(format!("http://127.0.0.1:{port}{}", rest.path))
                .header("content-type", "application/json")
                .body(Bytes::clone(&rest.request))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    assert!(now_s() < (start + BUCKET) as f64 - 0.3, "the traffic did not fit in one bucket");
    start
}

/// The fleet's output equals the single instance's: counts and class counts exactly,
/// feature means to rounding, quantiles within α.
fn assert_fleet_matches_single(fleet: &BTreeMap<String, f64>, single: &BTreeMap<String, f64>, start: i64) {
    for (what, dims) in
        [("request_count", vec![("method", "predict")]), ("prediction_count", vec![]), ("buffer_count", vec![])]
    {
        let (f, s) = (total(fleet, what, &dims), total(single, what, &dims));
        assert!(s > 0.0, "the single instance has {what}");
        assert_eq!(f, s, "{what} {dims:?}: the fleet's total equals the single instance's");
    }
    let single_classes = at(single, start, "prediction_count");
    assert!(!single_classes.is_empty());
    assert_eq!(at(fleet, start, "prediction_count"), single_classes, "class counts per class");
    let fleet_features = at(fleet, start, "feature_value");
    let single_features = at(single, start, "feature_value");
    assert!(single_features.len() > 10, "feature statistics in the traffic's bucket");
    assert_eq!(
        fleet_features.keys().collect::<Vec<_>>(),
        single_features.keys().collect::<Vec<_>>(),
        "the same feature statistics"
    );
    for (id, s) in &single_features {
        let f = fleet_features[id];
        let exact = ["mean", "min", "max", "range"].iter().any(|stat| id.contains(&format!("\"stat\": \"{stat}\"")));
        let tolerance = if exact { 1e-9 * s.abs().max(1.0) } else { 2.0 * ALPHA * s.abs() + 1e-12 };
        assert!((f - s).abs() <= tolerance, "{id}: fleet {f}, single {s}");
    }
}

/// Waits until `start`'s bucket has points of `what` in one of the dirs.
async fn wait_emitted(outputs: &[&Path], start: i64, what: &str) {
    for _ in 0..300 {
        let found = outputs
            .iter()
            .any(|o| points(o).iter().any(|p| p["timestamp"] == start && p["properties"]["what"] == what));
        if found {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("bucket {start} was not emitted");
}

async fn replicas_report_as_one(stores: Vec<String>) {
    let fake = FakeTfServing::start().await;
    let replicas: Vec<Instance> = stores.iter().map(|s| Instance::spawn(&fake, Some(s), None)).collect();
    let single = Instance::spawn(&fake, None, None);
    let start = send_split(&replicas.iter().collect::<Vec<_>>(), &single, 12).await;
    // The drift reference is learned from the first bucket; the next one is compared
    // to it, on every replica to the same (shared) one, or the merged bucket has none.
    let after = send_split(&replicas.iter().collect::<Vec<_>>(), &single, 6).await;
    let dirs: Vec<PathBuf> = replicas.iter().map(|r| r.out.clone()).collect();
    let dir_refs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    wait_emitted(&dir_refs, start, "feature_value").await;
    wait_emitted(&dir_refs, after, "feature_drift").await;
    // Each replica's /metrics shows its own share of the fleet's work.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut written = 0.0;
    for replica in &replicas {
        let text = client
            .get(format!("http://127.0.0.1:{}/metrics", replica.admin_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let line = text.lines().find(|l| l.starts_with("mltap_fleet_partials_written_total")).expect(&text);
        written += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    }
    assert!(written >= 2.0 * replicas.len() as f64, "every replica wrote the partials of its buckets: {written}");
    wait_emitted(&[single.out.as_path()], start, "feature_value").await;
    let stopped: Vec<Stopped> = replicas.into_iter().map(Instance::stop).collect();
    let single = single.stop();
    let outputs: Vec<&Path> = stopped.iter().map(|s| s.out.as_path()).collect();
    let fleet = once_each(&outputs);
    let single = once_each(&[single.out.as_path()]);
    assert_fleet_matches_single(&fleet, &single, start);
    let drift = at(&fleet, after, "feature_drift");
    assert!(drift.len() >= 16, "feature drift of every feature against the shared reference: {drift:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_over_one_redis_emit_each_point_once_with_the_totals_of_one_instance() {
    let redis = RedisServer::start(false);
    replicas_report_as_one(vec![redis.url(), redis.url()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_over_a_redis_cluster_emit_each_point_once_with_the_totals_of_one_instance() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls().join(",");
    replicas_report_as_one(vec![urls.clone(), urls.clone(), urls]).await;
}

/// Replica A stops for good at `point` on the traffic's bucket and is killed -9 there;
/// replica B emits every bucket once, with everything both were sent.
async fn a_replica_killed_at(point: &str) {
    let redis = RedisServer::start(false);
    let fake = FakeTfServing::start().await;
    let a = Instance::spawn(&fake, Some(&redis.url()), Some(point));
    let b = Instance::spawn(&fake, Some(&redis.url()), None);
    let single = Instance::spawn(&fake, None, None);
    let start = send_split(&[&a, &b], &single, 8).await;
    if point != "after_partial" {
        // B writes its partials (end + grace), then is stopped until A holds the claim,
        // so that A is the one that dies with it.
        wait_for_both_partials(redis.port, start).await;
        b.signal("-STOP");
    }
    let mut reached = false;
    for _ in 0..150 {
        if a.log_contains("Fleet test pause reached") {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = a.kill();
    if point != "after_partial" {
        b.signal("-CONT");
    }
    assert!(reached, "replica A reached the pause point {point}");
    wait_emitted(&[b.out.as_path(), a.out.as_path()], start, "feature_value").await;
    // Both lease and settle pass: nothing is emitted again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = b.stop();
    let single = single.stop();
    let fleet = once_each(&[a.out.as_path(), b.out.as_path()]);
    let single = once_each(&[single.out.as_path()]);
    assert!(at(&once_each(&[a.out.as_path()]), start, "feature_value").is_empty(), "A died before emitting");
    assert_fleet_matches_single(&fleet, &single, start);
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Waits until both replicas' partials of every model's bucket `start` are in Redis.
async fn wait_for_both_partials(port: u16, start: i64) {
    for _ in 0..100 {
        let keys = redis_cli(port, &["--scan", "--pattern", &format!("mltap:fp:*:{start}}}")]);
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        // The gRPC and the REST fixture are two models.
        if keys.len() >= 2 && keys.iter().all(|k| redis_cli(port, &["HLEN", k]).trim() == "2") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replicas' partials of bucket {start} did not reach Redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_after_writing_its_partial_loses_no_bucket() {
    a_replica_killed_at("after_partial").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_holding_the_claim_loses_no_bucket_and_duplicates_none() {
    a_replica_killed_at("during_claim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_emitting_loses_no_bucket_and_duplicates_none() {
    a_replica_killed_at("during_emit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_emitting_label_metrics_loses_none_and_duplicates_none() {
    let redis = RedisServer::start(false);
    let fake = FakeTfServing::start().await;
    let horizon = ["--label-horizon", "5s"];
    let a = Instance::spawn_with(&fake, Some(&redis.url()), Some("during_label_emit"), &horizon);
    let b = Instance::spawn_with(&fake, Some(&redis.url()), None, &horizon);
    let grpc = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let start = next_bucket().await;
    let channel_a = channel(format!("http://127.0.0.1:{}", a.grpc_port)).await;
    call_raw(&channel_a, &grpc.path, grpc.request.clone(), &[("x-request-id", "fleet-labels")]).await.unwrap();

    // Labels go to B; A's recorded rows reach Redis off the hot path, so probe first.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let labels_url = format!("http://127.0.0.1:{}/v1/labels", b.admin_port);
    let mut accepted = 0;
    for _ in 0..50 {
        let probe = serde_json::json!([{"id": "fleet-labels:0", "label": 0}]);
        let answer: serde_json::Value =
            client.post(&labels_url).json(&probe).send().await.unwrap().json().await.unwrap();
        if answer["accepted"] == 1 {
            accepted = 1;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(accepted, 1, "B joins a label to A's prediction");
    let rest: Vec<serde_json::Value> =
        (1..64).map(|row| serde_json::json!({"id": format!("fleet-labels:{row}"), "label": row % 3})).collect();
    let answer: serde_json::Value = client.post(&labels_url).json(&rest).send().await.unwrap().json().await.unwrap();
    assert_eq!(answer["accepted"], 63, "{answer}");

    // B stops before the label bucket is due (end + horizon), so A claims it and dies.
    let due = (start + BUCKET + 5) as f64;
    assert!(now_s() < due - 1.0, "the labels were posted before the bucket was due");
    tokio::time::sleep(Duration::from_secs_f64(due - 0.8 - now_s())).await;
    b.signal("-STOP");
    let mut reached = false;
    for _ in 0..100 {
        if a.log_contains("Fleet test pause reached; label emission stops here.") {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = a.kill();
    b.signal("-CONT");
    assert!(reached, "replica A claimed the label bucket and stopped before writing it");

    // B takes the bucket over once A's lease has ended.
    wait_emitted(&[b.out.as_path()], start, "accuracy").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = b.stop();
    let values = once_each(&[a.out.as_path(), b.out.as_path()]);
    assert!(at(&once_each(&[a.out.as_path()]), start, "accuracy").is_empty(), "A died before writing");
    assert!(at(&values, start, "accuracy").len() >= 2, "overall accuracy and one per class");
    assert_eq!(total(&values, "label_count", &[]), 64.0, "every label counted once");
    assert_eq!(total(&values, "labeled_fraction", &[]), 1.0);
}

/// A drift reference of stream `credit` whose one numeric feature has `edges`.
fn reference(edges: Vec<f64>) -> mltap::monitor::Reference {
    let bins = edges.len() + 1;
    mltap::monitor::Reference {
        format: "mltap-reference/1".into(),
        model: "credit".into(),
        version: Some(1),
        signature: "serving_default".into(),
        bucket_seconds: 60,
        first_bucket: 0,
        buckets: 1,
        rows: 100,
        numeric: [(
            "amount".to_string(),
            mltap::monitor::reference::NumericReference { edges, frequencies: vec![1.0 / bins as f64; bins] },
        )]
        .into_iter()
        .collect(),
        categorical: BTreeMap::new(),
        classes: None,
        prediction: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_published_drift_reference_is_the_one_every_replica_uses() {
    let cluster = RedisCluster::start();
    let stores = [
        mltap::fleet::store::FleetStore::connect(&cluster.urls(), "mltap").await.unwrap(),
        mltap::fleet::store::FleetStore::connect(&cluster.urls(), "mltap").await.unwrap(),
    ];
    let key =
        mltap::tfserving::StreamKey { model: "credit".into(), version: Some(1), signature: "serving_default".into() };
    assert_eq!(stores[1].reference(&key).await.unwrap(), None, "nothing published yet");
    let first = reference(vec![0.0, 1.0, 2.0]);
    let second = reference(vec![5.0, 6.0]);
    assert_eq!(stores[0].publish_reference(&key, &first).await.unwrap(), first);
    assert_eq!(stores[1].publish_reference(&key, &second).await.unwrap(), first, "the later replica adopts the first");
    assert_eq!(stores[1].reference(&key).await.unwrap(), Some(first));
}
